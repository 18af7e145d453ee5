"""``avatarkit disclosure keygen`` and ``avatarkit verify``: signing credentials and the detector.

    avatarkit disclosure keygen --out DIR [--algorithm ed25519|es256] [--common-name CN]
                                [--days N] [--force]
    avatarkit verify FILE [--trust-anchor ROOT.pem ...] [--store consent.db] [--json]
                          [--max-frames N]

``keygen`` creates an offline test CA and C2PA signing leaf (``root.pem``, ``chain.pem``,
``signer.key``); hand ``root.pem`` to whoever verifies your media. ``verify`` reports which
AI-disclosure signals a file carries (C2PA manifest, frame watermark, generation log) and exits
0 when at least one says "AI-generated", 1 when none does, 2 on errors, so scripts can branch
on it.

This module only builds parsers at import time; the modules that load PyAV and the C2PA
native library are imported when a command runs, so registering these commands keeps
``avatarkit --help`` fast.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import AvatarKitError, describe_error

if TYPE_CHECKING:
    from ..disclosure.verify import VerificationReport

__all__ = [
    "EXIT_AI_SIGNAL",
    "EXIT_ERROR",
    "EXIT_NO_SIGNAL",
    "add_parser",
    "run_disclosure",
    "run_verify",
]

#: ``verify`` exit statuses.
EXIT_AI_SIGNAL = 0
EXIT_NO_SIGNAL = 1
EXIT_ERROR = 2


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``disclosure`` (with ``keygen``) and ``verify`` on the main CLI's subparsers.
    Each sets ``args.run``: :func:`run_disclosure` and :func:`run_verify`."""
    disclosure = sub.add_parser("disclosure", help="C2PA signing credentials for produced media",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    disclosure.set_defaults(run=run_disclosure)
    cmds = disclosure.add_subparsers(dest="disclosure_command", required=True,
                                     metavar="ACTION")
    keygen = cmds.add_parser(
        "keygen", help="create an offline root CA and C2PA signing leaf",
        description="Writes root.pem (the trust anchor verifiers pin), chain.pem and "
                    "signer.key (0600). Public viewers trust only CAs on the C2PA Trust List; "
                    "these credentials are for tests and closed deployments.")
    keygen.add_argument("--out", required=True, type=Path, metavar="DIR")
    keygen.add_argument("--algorithm", choices=("ed25519", "es256"), default="ed25519")
    keygen.add_argument("--common-name", default="avatarkit test signer", metavar="CN")
    keygen.add_argument("--days", type=int, default=365,
                        help="validity of every certificate (default 365; max 3650)")
    keygen.add_argument("--force", action="store_true",
                        help="replace existing credentials (orphans the old trust anchor)")

    verify = sub.add_parser(
        "verify", help="which AI-disclosure signals a media file carries",
        description="Reads the C2PA manifest, the invisible frame watermark and (with "
                    "--store) the generation log. Exit 0: at least one says AI-generated; "
                    "1: none does; 2: error.")
    verify.set_defaults(run=run_verify)
    verify.add_argument("file", type=Path, metavar="FILE")
    verify.add_argument("--trust-anchor", type=Path, action="append", metavar="ROOT.pem",
                        help="PEM root whose signers are trusted (repeatable)")
    verify.add_argument("--store", type=Path, metavar="consent.db",
                        help="consent store whose generation log to search")
    verify.add_argument("--json", action="store_true", help="print the report as JSON")
    verify.add_argument("--max-frames", type=int, default=250, metavar="N",
                        help="frames to read the watermark from (default 250)")


def run_disclosure(args: argparse.Namespace) -> int:
    """Run a parsed ``disclosure`` command; returns the exit status (2 on errors)."""
    try:
        if args.disclosure_command == "keygen":
            return _keygen(args)
        raise AvatarKitError(f"unknown disclosure command {args.disclosure_command!r}")
    except (AvatarKitError, OSError) as exc:
        print(f"avatarkit disclosure: error: {describe_error(exc)}", file=sys.stderr)
        return EXIT_ERROR


def run_verify(args: argparse.Namespace) -> int:
    """Run a parsed ``verify``: print the report (prose or ``--json``) and return 0 when an
    AI signal was found, 1 when none was, 2 on errors (missing file, bad anchor, bad store)."""
    try:
        report = _verify(args)
    except (AvatarKitError, OSError, ValueError) as exc:
        print(f"avatarkit verify: error: {describe_error(exc)}", file=sys.stderr)
        return EXIT_ERROR
    print(report.model_dump_json(indent=2) if args.json else report.text())
    return EXIT_AI_SIGNAL if report.ai_generated else EXIT_NO_SIGNAL


def _keygen(args: argparse.Namespace) -> int:
    from ..disclosure.certs import generate_signing_credentials

    creds = generate_signing_credentials(args.out, algorithm=args.algorithm,
                                         common_name=args.common_name, days=args.days,
                                         overwrite=args.force)
    print(f"trust anchor (give to verifiers): {creds.root_pem_path}")
    print(f"signing chain:                    {creds.chain_pem_path}")
    print(f"signing key (keep private):       {creds.key_path}")
    return 0


class _UsageError(AvatarKitError):
    """A command-line argument names something that is not there."""


def _verify(args: argparse.Namespace) -> VerificationReport:
    file: Path = args.file
    if not file.is_file():
        raise _UsageError(f"{file}: no such file" if not file.exists() else
                          f"{file}: not a regular file")
    anchors = None
    if args.trust_anchor:
        for anchor in args.trust_anchor:
            if not anchor.is_file():
                raise _UsageError(f"--trust-anchor {anchor}: no such file")
        anchors = "\n".join(anchor.read_text("ascii") for anchor in args.trust_anchor)
    if args.store is not None and not args.store.is_file():
        # Opening a missing path would silently create an empty store and find nothing.
        raise _UsageError(f"--store {args.store}: no such consent store")
    return asyncio.run(_verify_async(file, anchors, args.store, args.max_frames))


async def _verify_async(file: Path, anchors: str | None, store_path: Path | None,
                        max_frames: int) -> VerificationReport:
    from ..disclosure.verify import verify_media

    if store_path is None:
        return await verify_media(file, trust_anchors_pem=anchors, max_frames=max_frames)
    from ..consent.store import SQLiteConsentStore

    async with SQLiteConsentStore(store_path) as store:
        return await verify_media(file, trust_anchors_pem=anchors, store=store,
                                  max_frames=max_frames)

