"""``avatarkit route``: which provider a session would use, and why (a dry run)."""

from __future__ import annotations

import argparse
import asyncio

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    route = sub.add_parser("route", help="show which provider a session would use, and why")
    route.set_defaults(run=run)
    route.add_argument("--config", required=True, help="the TOML config file")
    route.add_argument("--avatar", required=True)
    route.add_argument("--purpose")
    route.add_argument("--policy")
    route.add_argument("--json", action="store_true", help="print the decision as JSON")


def run(args: argparse.Namespace) -> int:
    from ..errors import NoRouteError
    from ..kit import AvatarKit
    from ..routing.router import RouteDecision

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
