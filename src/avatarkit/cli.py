"""The ``avatarkit`` command.

    avatarkit demo [--out demo.mp4] [--live]   a talking avatar rendered on this machine
    avatarkit demo --vendor-emulator   a scripted session against the offline Tavus emulator
    avatarkit emulate [VENDOR ...]     serve offline vendor emulators (default: all)
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
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import AvatarKitError, describe_error

__all__ = ["main"]

EMULATORS = ("tavus", "liveavatar", "simli", "did")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="avatarkit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="a talking avatar rendered on this machine: route, "
                          "live session, demo.mp4 with every disclosure layer, verify")
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

    emulate = sub.add_parser("emulate", help="serve offline vendor API emulators")
    emulate.add_argument("vendors", nargs="*", metavar="VENDOR",
                         help=f"which ones (default: all of {', '.join(EMULATORS)})")
    emulate.add_argument("--host", default="127.0.0.1")
    emulate.add_argument("--port", type=int, default=0, help="0 picks a free port")
    emulate.add_argument("--api-key", default="test-key",
                         help="the key the emulators accept (default: test-key)")
    emulate.add_argument("--max-concurrent", type=int, default=10,
                         help="open sessions allowed per account (default: 10)")

    providers = sub.add_parser("providers", help="the provider support matrix (Markdown)")
    providers.add_argument("--config", help="show the providers of this config file (prices "
                           "and regions as configured) instead of the built-in defaults")

    route = sub.add_parser("route", help="show which provider a session would use, and why")
    route.add_argument("--config", required=True, help="the TOML config file")
    route.add_argument("--avatar", required=True)
    route.add_argument("--purpose")
    route.add_argument("--policy")
    route.add_argument("--json", action="store_true", help="print the decision as JSON")

    sessions = sub.add_parser("sessions", help="the session ledger: list, reap, usage")
    actions = sessions.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="sessions in the ledger (open ones by default)")
    listing.add_argument("--config", required=True)
    listing.add_argument("--all", action="store_true", help="ended ones too")
    listing.add_argument("--json", action="store_true")
    reap = actions.add_parser("reap", help="end sessions whose owning process died")
    reap.add_argument("--config", required=True)
    reap.add_argument("--json", action="store_true")
    usage = actions.add_parser("usage", help="billed minutes and cost")
    usage.add_argument("--config", required=True)
    usage.add_argument("--by", default="provider",
                       help="comma-separated: provider, tenant, avatar, plan")
    usage.add_argument("--days", type=float, default=30.0, help="how far back (default 30)")
    usage.add_argument("--json", action="store_true")

    from .consent._cli import add_consent_parser
    from .disclosure._cli import add_disclosure_parsers
    from .local_engine._render_cli import add_render_parser
    from .local_engine._serve_cli import add_serve_parser
    from .local_engine._weights_cli import add_weights_parser

    add_consent_parser(sub)
    add_disclosure_parsers(sub)
    add_render_parser(sub)
    add_serve_parser(sub)
    add_weights_parser(sub)
    return parser


def _route(args: argparse.Namespace) -> int:
    from .errors import NoRouteError
    from .kit import AvatarKit
    from .routing.router import RouteDecision

    kit = AvatarKit.from_config(args.config)  # a dry run: nothing is started
    status = 0
    try:
        decision = kit.route(args.avatar, purpose=args.purpose, policy=args.policy)
    except NoRouteError as exc:
        if not args.json or not isinstance(exc.decision, RouteDecision):
            raise
        decision, status = exc.decision, 2  # the record still says why each was excluded
    finally:
        asyncio.run(kit.aclose())
    print(decision.model_dump_json(indent=2) if args.json else decision.explain())
    return status


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "demo":
            if args.vendor_emulator:
                from ._demo_vendor import run_vendor_demo

                return asyncio.run(run_vendor_demo(json_lines=args.json))
            from ._demo import run_demo

            return asyncio.run(run_demo(out=args.out, weights=args.weights, live=args.live,
                                        host=args.host, port=args.port,
                                        live_seconds=args.live_seconds))
        if args.command == "emulate":
            from .emulators import run_emulators

            try:
                run_emulators(list(args.vendors) or list(EMULATORS), host=args.host,
                              port=args.port, api_key=args.api_key,
                              max_concurrent=args.max_concurrent)
            except ValueError as exc:  # unknown vendor name
                print(f"avatarkit: error: {describe_error(exc)}", file=sys.stderr)
                return 2
            return 0
        if args.command == "route":
            return _route(args)
        if args.command == "providers":
            from ._config import KitConfig
            from .providers.matrix import support_matrix

            configured = KitConfig.from_toml(args.config).providers if args.config else None
            print(support_matrix(configured), end="")
            return 0
        if args.command == "sessions":
            from .metering._cli import run_sessions

            return asyncio.run(run_sessions(args))
        if args.command == "consent":
            from .consent._cli import run_consent

            return run_consent(args)
        if args.command == "disclosure":
            from .disclosure._cli import run_disclosure

            return run_disclosure(args)
        if args.command == "verify":
            from .disclosure._cli import run_verify

            return run_verify(args)
        if args.command == "render":
            from .local_engine._render_cli import run_render

            return run_render(args)
        if args.command == "serve":
            from .local_engine._serve_cli import run_serve

            return run_serve(args)
        if args.command == "weights":
            from .local_engine._weights_cli import run_weights

            return run_weights(args)
    except AvatarKitError as exc:
        print(f"avatarkit: error: {describe_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    raise SystemExit(main())
