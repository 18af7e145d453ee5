"""``avatarkit demo``: a talking avatar on this machine, no keys, no GPU, no network.

1. Records a demo consent for the bundled sample avatar (a public-domain portrait, see
   ``avatarkit/assets/README.md``) in a throwaway registry, and issues its token.
2. Routes with a self-hosted-only policy: the ``local`` provider wins (MuseTalk when
   ``--weights`` are given and the engine is available, else the weightless lite engine; it
   says which and why).
3. Opens a live session through the kit, speaks the first seconds of the bundled speech clip
   at real-time pace and measures the first-frame latency and the frame rate.
4. Renders the whole clip offline to ``demo.mp4``: burned-in label, watermark, C2PA manifest
   signed by a demo test CA, generation-log entry.
5. Verifies the file as ``avatarkit verify`` would and prints the summary.

``--live`` then streams the avatar to a browser viewer page over WHEP until Ctrl-C
(:mod:`avatarkit.cli.demo_live`).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..config import default_state_dir
from ..events import SpeechEnded, SpeechStarted
from ..media import AudioChunk
from ..samples import (
    SAMPLE_AVATAR,
    SAMPLE_POLICY,
    sample_avatar_path,
    sample_config,
    sample_speech_path,
)

__all__ = ["add_parser", "run", "run_demo"]

def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = sub.add_parser("demo", help="a talking avatar rendered on this machine: route, "
                          "live session, demo.mp4 with every disclosure layer, verify")
    demo.set_defaults(run=run)
    demo.add_argument("--out", type=Path, default=Path("demo.mp4"),
                      help="where the video goes (default: demo.mp4)")
    demo.add_argument("--weights", type=Path, metavar="DIR",
                      help="MuseTalk weights (the lite CPU engine renders without them)")
    demo.add_argument("--live", action="store_true",
                      help="then stream the avatar to a browser viewer page until Ctrl-C")
    demo.add_argument("--host", default="127.0.0.1", help="--live: where to listen")
    demo.add_argument("--port", type=int, default=8080, help="--live: the port (0: any)")
    demo.add_argument("--live-seconds", type=float, help=argparse.SUPPRESS)
    demo.add_argument("--vendor-emulator", action="store_true",
                      help="instead: a scripted session against the offline Tavus emulator "
                      "(consent revocation, interrupts, billing)")
    demo.add_argument("--json", action="store_true",
                      help="--vendor-emulator: print events as JSON lines")


def run(args: argparse.Namespace) -> int:
    if args.vendor_emulator:
        from .demo_vendor import run_vendor_demo

        return asyncio.run(run_vendor_demo(json_lines=args.json))
    return asyncio.run(run_demo(out=args.out, weights=args.weights, live=args.live,
                                host=args.host, port=args.port,
                                live_seconds=args.live_seconds))


async def run_demo(*, out: Path, weights: Path | None = None, live: bool = False,
                   host: str = "127.0.0.1", port: int = 8080,
                   live_seconds: float | None = None) -> int:
    from ..consent.demo import DEMO_PURPOSE, DemoConsent
    from ..consent.store import SQLiteConsentStore
    from ..disclosure.certs import demo_signing_credentials
    from ..disclosure.verify import verify_media
    from ..kit import AvatarKit
    from ..render import read_speech, render_video

    state = default_state_dir()
    state.mkdir(parents=True, exist_ok=True)
    store_path = state / "demo-consent.db"
    cache_dir = state / "prepared-avatars"
    print("avatarkit demo: a talking avatar rendered on this machine (no keys, no GPU)")
    speech = read_speech(sample_speech_path())
    async with DemoConsent(SAMPLE_AVATAR, store=SQLiteConsentStore(store_path)) as demo:
        print(f"consent    {demo.consent_id}: demo grant for the sample avatar, recorded in "
              f"{store_path}")
        config = sample_config(demo.consent_config(), weights=weights, cache_dir=cache_dir,
                             subject=demo.subject_ref)
        kit = AvatarKit(config, status_source=demo.authority.source,
                        consent_store=demo.authority.store)
        async with kit:
            decision = kit.route(SAMPLE_AVATAR, purpose=DEMO_PURPOSE, policy=SAMPLE_POLICY)
            print("route      " + decision.explain().replace("\n", "\n           "))
            from ..local_engine.engines import choose_engine

            choice = choose_engine("auto", weights=weights)
            print(f"engine     {choice.name}: {choice.reason}")
            latency, fps = await _live_check(kit, demo.token, speech)
            print(f"live       first frame {latency * 1000:.0f} ms after the first audio "
                  f"chunk; {fps:.1f} fps (real-time pace)")
        result = await render_video(
            avatar=sample_avatar_path(), audio=speech, out=out, consent=demo.token,
            gate=demo.gate, purpose=DEMO_PURPOSE, avatar_name=SAMPLE_AVATAR,
            consent_subject=demo.subject_ref, engine=choice.name, weights=weights,
            credentials=(signer := demo_signing_credentials()), cache_dir=cache_dir,
            overwrite=True, progress=True)
        print(f"render     {result.path}: {result.frames} frames, {result.duration_s:.1f} s at "
              f"{result.fps:g} fps in {result.elapsed_s:.2f} s ({result.render_fps:.0f} "
              f"frames/s)")
        anchor = signer.root_pem_path
        assert anchor is not None
        report = await verify_media(out, trust_anchors_pem=anchor.read_text(),
                                    store=demo.authority.store)
        print("verify     " + report.text().replace("\n", "\n           "))
        print(f"again      avatarkit verify {out} --trust-anchor {anchor} --store {store_path}")
        complete = report.signals == ["c2pa", "watermark", "generation-log"] and \
            report.consistent and report.manifest.state == "trusted"
        if live:
            from .demo_live import serve_live

            await serve_live(demo=demo, weights=weights, cache_dir=cache_dir, host=host,
                             port=port, speech=speech, seconds=live_seconds)
    return 0 if complete else 1


async def _live_check(kit: Any, token: str, speech: list[AudioChunk]) -> tuple[float, float]:
    """Speak the first two seconds in a live session at real-time pace: the first-frame
    latency (first audio chunk to the first frame that shows it) and the frame rate."""
    step = 320  # 20 ms at 16 kHz
    audio = np.concatenate([chunk.samples.reshape(-1) for chunk in speech])[: 2 * 16_000]
    async with kit.session(SAMPLE_AVATAR, consent=token, purpose="demo", policy=SAMPLE_POLICY) as s:
        frames = 0
        first_at = 0.0

        async def count() -> None:
            nonlocal frames, first_at
            async for _ in s.video():
                frames += 1
                if frames == 1:
                    first_at = time.monotonic()

        counter = asyncio.create_task(count())
        events = s.events()
        sent_at, sent_wall = time.monotonic(), time.time()
        for i, offset in enumerate(range(0, len(audio), step)):
            await s.send_audio(AudioChunk(audio[offset:offset + step], 16_000))
            await asyncio.sleep(max(0.0, sent_at + (i + 1) * 0.02 - time.monotonic()))
        await s.end_utterance()
        latency = math.nan
        async with asyncio.timeout(10):
            async for event in events:
                if isinstance(event, SpeechStarted):  # stamped when its first frame left
                    latency = event.at.timestamp() - sent_wall
                if isinstance(event, SpeechEnded):
                    break
        elapsed = time.monotonic() - first_at
        counted = frames
        counter.cancel()
        await asyncio.gather(counter, return_exceptions=True)
    return latency, (counted - 1) / elapsed if elapsed > 0 and counted > 1 else math.nan
