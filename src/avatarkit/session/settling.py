"""Settling vendor starts whose outcome this process does not know.

Two cases leave a vendor session possibly billing with nobody holding it:

* a create call timed out or lost its connection: it may still succeed at the vendor.
  :meth:`StartSettler.settle_uncertain_create` looks for the session (by the name it was
  created under) for about a minute and ends it if it shows up; otherwise it records that
  nothing was created;
* the caller cancelled while a vendor start was in flight.
  :meth:`StartSettler.finish_abandoned_start` lets the start finish (bounded by
  :data:`ABANDONED_START_GRACE`) and ends whatever it created.

One settler belongs to one kit and outlives its sessions: ``aclose()`` gives abandoned starts
their grace, then makes one last lookup for creates still unsettled (a row left ``creating``
is the reaper's once this process is gone).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from ..contract import Provider, ProviderSession
from ..errors import AvatarKitError, ProviderError
from ..metering.ledger import SessionLedger, SessionRow
from ..metering.reaper import end_row

__all__ = ["ABANDONED_START_GRACE", "SETTLE_DELAYS", "StartSettler"]

logger = logging.getLogger("avatarkit.session")

#: when to look for a session whose create call timed out (seconds between looks, ~1 min)
SETTLE_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
#: How long a start the caller cancelled may still run before the kit stops waiting for it.
ABANDONED_START_GRACE = 60.0


class StartSettler:
    """Background settling of uncertain creates and abandoned starts (one per kit)."""

    def __init__(self, ledger: SessionLedger) -> None:
        self._ledger = ledger
        self._uncertain: dict[asyncio.Task[None], tuple[Provider, SessionRow]] = {}
        self._abandoned: set[asyncio.Task[None]] = set()

    def settle_uncertain_create(self, provider: Provider, row: SessionRow) -> None:
        """A create call timed out or lost its connection: it may still succeed at the
        vendor. Look for the session for a while and end it if it shows up."""
        task = asyncio.create_task(self._settle(provider, row, SETTLE_DELAYS, abandon=True),
                                   name=f"avatarkit-settle-{row.row_id}")
        self._uncertain[task] = (provider, row)
        task.add_done_callback(lambda t: self._uncertain.pop(t, None))

    def finish_abandoned_start(self, provider: Provider,
                               start: asyncio.Future[ProviderSession], row: SessionRow) -> None:
        """The caller cancelled while ``start`` (a vendor start) was in flight. Let it finish
        (for at most :data:`ABANDONED_START_GRACE` seconds) and end whatever it created, so a
        cancelled start leaves nothing billed at any vendor, with or without a way to look
        sessions up afterwards."""
        task = asyncio.create_task(self._finish_start(provider, start, row),
                                   name=f"avatarkit-abandoned-start-{row.row_id}")
        self._abandoned.add(task)
        task.add_done_callback(self._abandoned.discard)

    async def aclose(self) -> None:
        """Give abandoned starts their grace, then settle what is still uncertain with one
        last lookup. Idempotent; call it before the providers close."""
        if self._abandoned:
            grace = ABANDONED_START_GRACE
            _done, pending = await asyncio.wait(list(self._abandoned), timeout=grace)
            for task in pending:
                logger.warning("a cancelled start is still running after %.0f s; giving up "
                               "on it (the reaper ends what it made)", grace)
                task.cancel()
            for task in pending:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for task, (provider, row) in list(self._uncertain.items()):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            with contextlib.suppress(AvatarKitError):
                await self._settle(provider, row, (0.0,), abandon=False)

    async def _finish_start(self, provider: Provider, start: asyncio.Future[ProviderSession],
                            row: SessionRow) -> None:
        try:
            async with asyncio.timeout(ABANDONED_START_GRACE):
                vendor = await asyncio.shield(start)
        except ProviderError as exc:
            if provider.may_have_created(exc):
                await self._settle(provider, row, SETTLE_DELAYS, abandon=True)
            else:  # refused, or the adapter ended what it made
                await self._ledger.mark_failed(row.row_id, reason=str(exc))
            return
        except (TimeoutError, asyncio.CancelledError):
            # the kit is closing or the vendor hangs: stop waiting and look the session up
            start.cancel()
            with contextlib.suppress(BaseException):
                await start
            if not provider.uncertain_creates:  # the adapter ended what its start made
                with contextlib.suppress(AvatarKitError):
                    await self._ledger.mark_failed(row.row_id, reason="start abandoned")
                return
            with contextlib.suppress(AvatarKitError):
                await self._settle(provider, row, (0.0,), abandon=False)
            return
        except Exception as exc:  # an adapter bug: it ended what it made (its contract)
            await self._ledger.mark_failed(row.row_id, reason=f"{type(exc).__name__}: {exc}")
            return
        # From here a vendor session exists: a kit closing meanwhile waits for its end
        # (bounded) instead of cancelling it half-way.
        ending = asyncio.ensure_future(self._end_abandoned(vendor, row))
        try:
            await asyncio.shield(ending)
        except asyncio.CancelledError:
            with contextlib.suppress(BaseException):
                await ending
            raise

    async def _end_abandoned(self, vendor: ProviderSession, row: SessionRow) -> None:
        with contextlib.suppress(AvatarKitError):  # the row is a record; the vendor end matters
            await self._ledger.mark_open(row.row_id, vendor_session_id=vendor.vendor_session_id,
                                         billing_started_at=row.created_at)
        try:
            async with asyncio.timeout(ABANDONED_START_GRACE):
                await vendor.end()
        except (ProviderError, TimeoutError) as exc:
            logger.warning("could not end %s session %s after its start was cancelled: %s "
                           "(left to the reaper)", row.provider, vendor.vendor_session_id, exc)
            return
        await self._ledger.mark_ended(row.row_id, billed_seconds=vendor.billed_seconds,
                                      reason="start cancelled by the caller; ended")
        logger.info("ended %s session %s: its start was cancelled by the caller",
                    row.provider, vendor.vendor_session_id)

    async def _settle(self, provider: Provider, row: SessionRow, delays: Sequence[float], *,
                      abandon: bool) -> None:
        """Look for ``row``'s session after each delay and end it when found. With
        ``abandon``, a search in which the vendor always answered "none" marks the row
        abandoned; otherwise it stays ``creating`` (the reaper's once this process ends)."""
        certain = True  # every lookup got an answer
        for number, delay in enumerate(delays, start=1):
            await asyncio.sleep(delay)
            final = abandon and certain and number == len(delays)
            try:
                outcome = await end_row(
                    self._ledger, provider, row,
                    reason="create timed out here but succeeded at the vendor; ended when found",
                    abandon_reason="create timed out; no session appeared at the vendor"
                    if final else None)
            except Exception as exc:  # the ledger write failed; the vendor side is settled
                logger.error("could not record how %s settled: %s", row.row_id, exc)
                return
            if outcome.action == "failed":
                certain = False
                logger.warning("settling %s at %s: %s", row.row_id, row.provider, outcome.error)
            elif outcome.action == "ended":
                logger.warning("ended %s session %s, created after its create call timed out",
                               row.provider, outcome.vendor_session_id)
                return
            elif outcome.action == "abandoned":
                return
