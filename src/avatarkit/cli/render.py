"""``avatarkit render``: an offline lip-sync render to a disclosed MP4.

    avatarkit render --avatar IMG|VIDEO --audio SPEECH --out OUT.mp4
                     (--consent TOKEN --config avatarkit.toml | --demo-consent)
                     [--purpose P] [--engine auto|lite|musetalk] [--weights DIR]
                     [--device D] [--precision P] [--backend torch|onnx] [--batch-size N]
                     [--credentials DIR] [--fps N] [--max-side PX] [--overwrite] [--json]

``--consent`` takes the token itself, ``@FILE`` or ``env:VAR``; the config's ``[consent]``
section says whose tokens to trust and where the generation log is, its ``[disclosure]``
section how the label looks. ``--demo-consent`` records a demo grant for the avatar in a
throwaway registry instead (for trying the SDK on media you may use), logs it in
``demo-consent.db`` in the state directory, and signs with the demo test CA; the command it
prints verifies the result. ``--credentials`` is a directory from ``avatarkit disclosure
keygen``; without it a demo render uses the demo CA and a consented one is refused unless
``--unsigned`` says an unsigned file is meant. The video keeps the avatar media's resolution
unless ``--max-side`` asks for a smaller one; when the media shows several faces, the report
says which one is animated (the largest).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = ["add_musetalk_arguments", "add_parser", "musetalk_options", "read_secret_arg", "run"]


def add_musetalk_arguments(parser: argparse.ArgumentParser) -> None:
    """The MuseTalk engine's options as flags (``render`` and ``serve``)."""
    parser.add_argument("--device", help="MuseTalk: auto (default), cpu, cuda, cuda:N")
    parser.add_argument("--precision", choices=("auto", "fp32", "fp16", "bf16"),
                        help="MuseTalk: default fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--backend", choices=("torch", "onnx"), help="MuseTalk: torch "
                        "(default) or ONNX Runtime")
    parser.add_argument("--batch-size", type=int, metavar="N",
                        help="MuseTalk: frames per network call (default 8)")


def musetalk_options(args: argparse.Namespace) -> dict[str, Any]:
    """The MuseTalk options given on the command line (the rest keep their defaults)."""
    given = (("device", args.device), ("precision", args.precision),
             ("backend", args.backend), ("batch_size", args.batch_size))
    return {key: value for key, value in given if value is not None}


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    render = sub.add_parser("render", help="lip-sync an avatar to a speech file, into a "
                            "labelled, watermarked, C2PA-signed MP4", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    render.set_defaults(run=run)
    render.add_argument("--avatar", required=True, type=Path, metavar="IMG|VIDEO")
    render.add_argument("--audio", required=True, type=Path, metavar="SPEECH",
                        help="WAV, FLAC, MP3... (any rate; converted)")
    render.add_argument("--out", required=True, type=Path, metavar="OUT.mp4")
    who = render.add_mutually_exclusive_group(required=True)
    who.add_argument("--consent", metavar="TOKEN|@FILE|env:VAR",
                     help="the consent token of the person the avatar shows")
    who.add_argument("--demo-consent", action="store_true",
                     help="record a local demo grant instead (trying the SDK only)")
    render.add_argument("--config", type=Path, help="avatarkit.toml ([consent], [disclosure])")
    render.add_argument("--purpose", help="what the render is for (must be in the consent; "
                        "default: demo with --demo-consent)")
    render.add_argument("--avatar-name", help="the avatar's name in the consent (default: "
                        "the config's avatar whose local media this is, else the file stem)")
    render.add_argument("--engine", default="auto", choices=("auto", "lite", "musetalk"))
    render.add_argument("--weights", type=Path, metavar="DIR",
                        help="MuseTalk weights folder (official layout; avatarkit weights "
                             "check DIR)")
    add_musetalk_arguments(render)
    render.add_argument("--credentials", type=Path, metavar="DIR",
                        help="C2PA signing credentials (avatarkit disclosure keygen)")
    render.add_argument("--unsigned", action="store_true",
                        help="write without a C2PA manifest when no credentials are given")
    render.add_argument("--fps", type=float, help="output frame rate (default: the avatar's)")
    render.add_argument("--max-side", type=int, metavar="PX",
                        help="scale the video down to at most PX on its longer side (lite "
                             "engine; default: the avatar media's resolution)")
    render.add_argument("--overwrite", action="store_true")
    render.add_argument("--json", action="store_true", help="print the result as JSON")


def read_secret_arg(value: str, *, option: str) -> str:
    """A secret given as itself, ``@FILE`` or ``env:VAR``."""
    if value.startswith("env:"):
        found = os.environ.get(value[4:])
        if not found:
            raise ConfigError(f"environment variable {value[4:]} is not set", field=option)
        return found.strip()
    if value.startswith("@"):
        path = Path(value[1:])
        if not path.is_file():
            raise ConfigError(f"{path} does not exist", field=option)
        return path.read_text().strip()
    return value.strip()


def run(args: argparse.Namespace) -> int:
    if not args.avatar.exists():
        raise ConfigError(f"{args.avatar} does not exist", field="avatar")
    return asyncio.run(_render(args))


async def _render(args: argparse.Namespace) -> int:
    from ..config import KitConfig, default_state_dir
    from ..disclosure.certs import SigningCredentials, demo_signing_credentials
    from ..render import RenderResult, render_video

    config = KitConfig.from_toml(args.config) if args.config else None
    label = config.disclosure.burned_label if config is not None else None
    media: Path = args.avatar
    avatar_name, subject = _avatar_of(config, media, args.avatar_name)
    credentials: SigningCredentials | None
    if args.credentials is not None:
        credentials = SigningCredentials.load(args.credentials)
    elif args.demo_consent:
        credentials = demo_signing_credentials()
    elif args.unsigned:
        credentials = None
    else:
        raise ConfigError("give --credentials DIR (from `avatarkit disclosure keygen`) to sign "
                          "the C2PA manifest, or --unsigned to write without one",
                          field="credentials")
    common: dict[str, Any] = dict(
        avatar=media, audio=args.audio, out=args.out, engine=args.engine, weights=args.weights,
        musetalk=musetalk_options(args),
        credentials=credentials, label=label, fps=args.fps, max_side=args.max_side,
        overwrite=args.overwrite,
        avatar_name=avatar_name, progress=not args.json)
    result: RenderResult
    store_path: Path | None = None
    if args.demo_consent:
        from ..consent.demo import DEMO_PURPOSE, DemoConsent
        from ..consent.store import SQLiteConsentStore

        store_path = default_state_dir() / "demo-consent.db"
        store_path.parent.mkdir(parents=True, exist_ok=True)
        async with DemoConsent(avatar_name, store=SQLiteConsentStore(store_path)) as demo:
            result = await render_video(consent=demo.token, gate=demo.gate,
                                        purpose=args.purpose or DEMO_PURPOSE,
                                        consent_subject=demo.subject_ref, **common)
    else:
        if config is None or config.consent is None:
            raise ConfigError("--consent needs --config with a [consent] section naming the "
                              "trusted issuers (or use --demo-consent)", field="config")
        if not args.purpose:
            raise ConfigError("--purpose is required with --consent", field="purpose")
        import httpx

        from ..consent.enforce import ConsentGate

        token = read_secret_arg(args.consent, option="consent")
        async with httpx.AsyncClient() as http:
            gate = ConsentGate.from_config(config.consent, http=http)
            try:
                result = await render_video(consent=token, gate=gate, purpose=args.purpose,
                                            consent_subject=subject, **common)
            finally:
                await gate.aclose()
        store_path = config.consent.store
    _report(result, credentials, store_path, as_json=args.json)
    return 0


def _avatar_of(config: Any, media: Path, name: str | None) -> tuple[str, str | None]:
    """The avatar's name and consent subject: ``--avatar-name``, else the configured avatar
    whose ``local`` media is this file, else the file stem."""
    if config is not None:
        for avatar_name, avatar in config.avatars.items():
            local = avatar.local
            if (name is not None and avatar_name == name) or (
                    name is None and local is not None
                    and Path(local).resolve() == media.resolve()):
                return avatar_name, avatar.consent_subject
    return name or media.stem, None


def _report(result: Any, credentials: Any, store: Path | None, *, as_json: bool) -> None:
    anchor = credentials.root_pem_path if credentials is not None else None
    verify = f"avatarkit verify {result.path}"
    if anchor is not None:
        verify += f" --trust-anchor {anchor}"
    if store is not None:
        verify += f" --store {store}"
    if as_json:
        print(json.dumps({
            "path": str(result.path), "sha256": result.sha256, "frames": result.frames,
            "duration_s": result.duration_s, "fps": result.fps, "width": result.width,
            "height": result.height, "engine": result.engine.name,
            "engine_reason": result.engine.reason, "generation_id": result.generation_id,
            "consent_id": result.consent_id, "watermark_payload": result.watermark_payload,
            "signed": result.signed, "elapsed_s": result.elapsed_s,
            "render_fps": result.render_fps, "first_frame_s": result.first_frame_s,
            "faces": {"found": result.faces.found, "box": list(result.faces.box),
                      "frames_with_several": result.faces.frames_with_several},
            "verify": verify}))
        return
    print(f"wrote      {result.path} ({result.width}x{result.height}, {result.frames} frames, "
          f"{result.duration_s:.2f} s at {result.fps:g} fps)")
    print(f"face       {result.faces.describe()}")
    print(f"engine     {result.engine.name}: {result.engine.reason}")
    print(f"speed      {result.elapsed_s:.2f} s ({result.render_fps:.0f} frames/s, first "
          f"frame after {result.first_frame_s * 1000:.0f} ms)")
    print(f"consent    {result.consent_id}; generation {result.generation_id}")
    signed = "C2PA-signed" if result.signed else "NOT signed (no credentials)"
    print(f"disclosure label burned in, watermark {result.watermark_payload}, {signed}")
    print(f"check it   {verify}", file=sys.stdout)
