"""``avatarkit emulate``: serve the offline vendor API emulators until Ctrl-C.

Which emulators exist, and how each is built for the command line, is the table
:data:`avatarkit.emulators.EMULATORS`; this module only parses the command.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import describe_error

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    emulate = sub.add_parser("emulate", help="serve offline vendor API emulators")
    emulate.set_defaults(run=run)
    emulate.add_argument("vendors", nargs="*", metavar="VENDOR",
                         help="which ones (default: every emulator; an unknown name lists "
                         "the valid ones)")
    emulate.add_argument("--host", default="127.0.0.1")
    emulate.add_argument("--port", type=int, default=0, help="0 picks a free port")
    emulate.add_argument("--api-key", default="test-key",
                         help="the key the emulators accept (default: test-key)")
    emulate.add_argument("--max-concurrent", type=int, default=10,
                         help="open sessions allowed per account (default: 10)")


def run(args: argparse.Namespace) -> int:
    from ..emulators import EMULATORS, run_emulators

    try:
        run_emulators(list(args.vendors) or list(EMULATORS), host=args.host, port=args.port,
                      api_key=args.api_key, max_concurrent=args.max_concurrent)
    except ValueError as exc:  # an unknown vendor name
        print(f"avatarkit: error: {describe_error(exc)}", file=sys.stderr)
        return 2
    return 0
