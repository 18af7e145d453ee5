"""The ``avatarkit`` command.

    avatarkit demo [--out demo.mp4] [--live]   a talking avatar rendered on this machine
    avatarkit demo --vendor-emulator   a scripted session against the offline Tavus emulator
    avatarkit emulate [VENDOR ...]     serve offline vendor emulators (default: all)
    avatarkit providers [--config F]   the provider support matrix
    avatarkit route --config F --avatar A [--purpose P] [--policy X] [--json]
    avatarkit sessions list|reap|usage --config F   the session ledger: open sessions, ending
                                       those whose process died, billed minutes and cost
    avatarkit consent keygen|init-list|issue|verify|revoke|suspend|reinstate|status|publish
    avatarkit disclosure keygen --out DIR     offline C2PA signing credentials (test CA)
    avatarkit verify FILE [--trust-anchor ROOT.pem] [--store DB] [--json]
                                       which AI-disclosure signals a media file carries
    avatarkit render --avatar IMG|VIDEO --audio SPEECH --out OUT.mp4 (--consent T --config F
                     | --demo-consent)   offline lip-sync into a labelled, signed MP4
    avatarkit serve --config F [--host H] [--port P] [--api-key env:VAR]
                                       the self-hosted engine server (sessions, WHEP, viewer)
    avatarkit weights check DIR [--version auto|v1.0|v1.5] [--json]
                                       check a MuseTalk weights folder (keys, shapes, dtypes)

Every command is one module of this package with the same two functions: ``add_parser(sub)``
registers the command (and sets ``args.run``), ``run(args) -> int`` runs it and returns the
exit status. Command modules import what they run only inside ``run``, so ``avatarkit --help``
stays fast and loads no media or network libraries.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..errors import AvatarKitError, describe_error
from . import (
    consent,
    demo,
    disclosure,
    emulate,
    providers,
    render,
    route,
    serve,
    sessions,
    weights,
)

__all__ = ["main"]

#: the command modules, in the order ``avatarkit --help`` lists them
_COMMANDS = (demo, emulate, providers, route, sessions, consent, disclosure, render, serve,
            weights)


def _parser() -> argparse.ArgumentParser:
    """The ``avatarkit`` argument _parser, with every command registered."""
    top = argparse.ArgumentParser(prog="avatarkit", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in _COMMANDS:
        command.add_parser(sub)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``avatarkit`` command; returns its exit status (2 for an SDK error)."""
    args = _parser().parse_args(argv)
    try:
        status: int = args.run(args)
    except AvatarKitError as exc:
        print(f"avatarkit: error: {describe_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return status
