"""``avatarkit sessions list|reap|usage``: the session ledger from the command line."""

from __future__ import annotations

import argparse
import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import get_args

from ..errors import ConfigError
from ..metering.ledger import GroupKey, RowState, SessionRow

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sessions = sub.add_parser("sessions", help="the session ledger: list, reap, usage")
    sessions.set_defaults(run=run)
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


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_run(args))


async def _run(args: argparse.Namespace) -> int:
    from ..kit import AvatarKit

    kit = AvatarKit.from_config(args.config)
    try:
        if args.action == "list":
            open_states: tuple[RowState, ...] = ("creating", "open")
            rows = await kit.ledger.rows(states=None if args.all else open_states)
            if args.json:
                print(json.dumps([r.model_dump(mode="json") for r in rows], indent=2))
            else:
                _print_rows(rows)
            return 0
        if args.action == "reap":
            outcomes = await kit.reap()
            if args.json:
                print(json.dumps([{"row_id": o.row.row_id, "provider": o.row.provider,
                                   "action": o.action, "vendor_session_id": o.vendor_session_id,
                                   "error": o.error} for o in outcomes], indent=2))
            else:
                for o in outcomes:
                    detail = f" ({o.error})" if o.error else ""
                    print(f"{o.action:9} {o.row.row_id}  {o.row.provider}  "
                          f"{o.vendor_session_id or '-'}{detail}")
                print(f"{len(outcomes)} orphaned session(s)")
            return 1 if any(o.action == "failed" for o in outcomes) else 0
        if args.action == "usage":
            keys = [k.strip() for k in args.by.split(",") if k.strip()]
            valid = get_args(GroupKey)
            if bad := [k for k in keys if k not in valid]:
                raise ConfigError(f"cannot group by {bad}; choose from {', '.join(valid)}",
                                  field="--by")
            group_by: list[GroupKey] = [k for k in valid if k in keys]
            until = datetime.now(UTC)
            report = await kit.usage_report(since=until - timedelta(days=args.days),
                                            until=until, group_by=group_by)
            print(report.model_dump_json(indent=2) if args.json else report.to_text())
            return 0
    finally:
        await kit.aclose()
    raise AssertionError(f"unhandled action {args.action}")


def _print_rows(rows: list[SessionRow]) -> None:
    if not rows:
        print("no sessions")
        return
    now = datetime.now(UTC)
    for r in rows:
        owner = f"{r.owner.host}:{r.owner.pid}"
        minutes = r.billed_seconds_at(now) / 60
        print(f"{r.state:9} {r.row_id}  {r.provider:12} {r.vendor_session_id or '-':24} "
              f"{minutes:7.2f} min  tenant={r.tenant or '-'}  owner={owner}")
