"""The reaper: ends vendor sessions whose owning process died, so a crash never leaks billing.

A session's ledger row is written before the vendor create call and closed only when the
vendor confirmed the end, so a process killed in between (SIGKILL, OOM, a lost host) leaves a
non-terminal row. :func:`reap_orphans` finds rows whose owner is gone (same host: the pid is
dead or reused; other hosts: no heartbeat for ``stale_after_s``), ends each at its vendor with
the configured provider, and closes the row:

* an ``open`` row has the vendor's session id: end it;
* a ``creating`` row may or may not have reached the vendor: ask the provider to find it by
  the session id (``Provider.find_session``); end it if found, else mark it ``abandoned``.

Run it from ``avatarkit sessions reap --config F`` (cron, a systemd timer, a pod's preStop
hook) or ``await kit.reap()``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from ..contract import Provider
from ..errors import AvatarKitError
from .ledger import SessionLedger, SessionRow, cost_of

__all__ = ["ReapOutcome", "end_row", "reap_orphans"]

logger = logging.getLogger("avatarkit.reaper")

_ReapAction = Literal["ended", "abandoned", "failed", "skipped", "not_found"]


@dataclass(frozen=True, slots=True)
class ReapOutcome:
    """What the reaper did with one orphaned row. ``error`` says why it ``failed`` (the row
    stays open and the next run tries again) or was ``skipped`` (provider not configured)."""

    row: SessionRow
    action: _ReapAction
    vendor_session_id: str | None = None
    error: str | None = None


async def reap_orphans(
    ledger: SessionLedger,
    providers: Mapping[str, Provider],
    *,
    stale_after_s: float,
) -> list[ReapOutcome]:
    """End every orphaned session at its vendor and close its ledger row."""
    outcomes: list[ReapOutcome] = []
    for row in await ledger.orphans(stale_after_s=stale_after_s):
        outcomes.append(await _reap(ledger, providers, row))
    return outcomes


async def _reap(ledger: SessionLedger, providers: Mapping[str, Provider],
                row: SessionRow) -> ReapOutcome:
    provider = providers.get(row.provider)
    if provider is None:
        return ReapOutcome(row, "skipped", row.vendor_session_id,
                           f"provider {row.provider!r} is not configured here")
    outcome = await end_row(
        ledger, provider, row,
        reason=f"reaped: owner process {row.owner.pid} on {row.owner.host} died",
        abandon_reason="reaped: owner died before the vendor created it (nothing open at "
        "the vendor)")
    logger.log(logging.WARNING if outcome.action == "failed" else logging.INFO,
               "reaper: %s %s (%s %s)%s", outcome.action, row.row_id, row.provider,
               outcome.vendor_session_id, f": {outcome.error}" if outcome.error else "")
    return outcome


async def end_row(ledger: SessionLedger, provider: Provider, row: SessionRow, *,
                  reason: str, abandon_reason: str | None) -> ReapOutcome:
    """End ``row``'s vendor session and close the row as ended (billed until now at most:
    the vendor may have stopped earlier on its own timeout).

    A row without a vendor id is looked up by the name its create used. When the vendor says
    there is none, the row is marked abandoned with ``abandon_reason``, or, without one, left
    as it is (``not_found``: look again later). A vendor that cannot end it or cannot be asked
    gives ``failed`` and the row stays open. Ledger errors propagate.
    """
    vendor_id = row.vendor_session_id
    try:
        if vendor_id is None:
            vendor_id = await provider.find_session(session_id=row.session_id,
                                                    idempotency_key=row.idempotency_key)
            if vendor_id is None:
                if abandon_reason is None:
                    return ReapOutcome(row, "not_found")
                await ledger.mark_abandoned(row.row_id, reason=abandon_reason)
                return ReapOutcome(row, "abandoned")
        await provider.end_session(vendor_id)
    except AvatarKitError as exc:
        return ReapOutcome(row, "failed", vendor_id, str(exc))
    now = datetime.now(UTC)
    billed = max(0.0, (now - (row.billing_started_at or row.created_at)).total_seconds())
    await ledger.mark_ended(row.row_id, ended_at=now, billed_seconds=billed,
                            cost=cost_of(billed, row.price_per_minute), reason=reason,
                            vendor_session_id=vendor_id)
    return ReapOutcome(row, "ended", vendor_id)
