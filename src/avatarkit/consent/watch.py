"""The live consent re-check: one admitted consent watched until it no longer holds.

Both places that show a likeness live, :class:`~avatarkit.AvatarSession` and the engine
server behind ``avatarkit serve``, run a :class:`ConsentWatch`: every ``recheck_interval_s``
(and at the token's ``exp``) it asks the :class:`~.enforce.ConsentGate` again, reports each
outcome (for the generation log), and when the consent lapses calls ``on_lapse`` once with a
:class:`ConsentLapse` and stops. It fails closed: *any* error from the re-check, not only the
consent errors it is meant to raise (a bug, a store that throws, a malformed status list the
checker did not classify), is a lapse with reason ``consent_unverifiable``.

The end reasons are one set, :class:`ConsentEndReason`, used as ``Closed.reason`` of a session
and as the ``reason`` of the server's ``session_ended`` message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType
from typing import Literal, Self

from ..errors import (
    ConsentCheck,
    ConsentExpired,
    ConsentStatusUnavailable,
    ConsentViolation,
    ConsentWithdrawn,
)
from .enforce import ConsentGate
from .tokens import VerifiedConsent

__all__ = ["ConsentEndReason", "ConsentLapse", "ConsentWatch"]

logger = logging.getLogger("avatarkit.consent.watch")


class ConsentEndReason(StrEnum):
    """Why a live use of a likeness ended on consent grounds."""

    REVOKED = "consent_revoked"              # the status list says revoked (final)
    SUSPENDED = "consent_suspended"          # the status list says suspended
    EXPIRED = "consent_expired"              # the token's exp has passed
    UNVERIFIABLE = "consent_unverifiable"    # the status could not be checked: fail closed


@dataclass(frozen=True, slots=True)
class ConsentLapse:
    """A consent that no longer holds: the reason, and the error the re-check gave."""

    reason: ConsentEndReason
    error: ConsentViolation

    @classmethod
    def of(cls, error: BaseException, consent_id: str | None = None) -> ConsentLapse:
        """Classify what a re-check raised. Anything but a consent error is reported as an
        unverifiable status (``STATUS_UNAVAILABLE``), never as "still valid"."""
        if not isinstance(error, ConsentViolation):
            error = ConsentStatusUnavailable(
                f"the consent status could not be checked ({type(error).__name__})",
                check=ConsentCheck.STATUS_UNAVAILABLE, consent_id=consent_id)
        if isinstance(error, ConsentWithdrawn):
            reason = ConsentEndReason.SUSPENDED if error.check is ConsentCheck.SUSPENDED \
                else ConsentEndReason.REVOKED
        elif isinstance(error, ConsentExpired):
            reason = ConsentEndReason.EXPIRED
        else:
            reason = ConsentEndReason.UNVERIFIABLE
        return cls(reason, error)

    @property
    def withdrawn(self) -> Literal["revoked", "suspended"] | None:
        """``revoked`` / ``suspended`` when the registry withdrew the consent, else None
        (expired or unverifiable: the consent may still stand, but cannot be relied on)."""
        if self.reason is ConsentEndReason.REVOKED:
            return "revoked"
        if self.reason is ConsentEndReason.SUSPENDED:
            return "suspended"
        return None


class ConsentWatch:
    """Re-checks ``verified`` through ``gate`` on its interval until it lapses or is closed.

    ``on_check`` gets the outcome of every re-check as a ``status_check`` string (``valid``,
    or the failed check's value) for the generation log; a failing ``on_check`` is logged
    and does not stop the watch. ``on_lapse`` is called once, from the watch's task, and
    must not block (schedule the ending; the watch stops right after).
    """

    def __init__(self, gate: ConsentGate, verified: VerifiedConsent, *,
                 on_lapse: Callable[[ConsentLapse], None],
                 on_check: Callable[[str], Awaitable[None]] | None = None,
                 name: str = "consent-watch",
                 clock: Callable[[], float] = time.time) -> None:
        self._gate = gate
        self._verified = verified
        self._on_lapse = on_lapse
        self._on_check = on_check
        self._name = name
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.lapse: ConsentLapse | None = None

    def start(self) -> Self:
        """Start watching (in a task of the running loop)."""
        if self._closed:
            raise RuntimeError("this ConsentWatch is closed")
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self._name)
        return self

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _run(self) -> None:
        verified, gate = self._verified, self._gate
        while True:
            until_expiry = verified.expires_at.timestamp() - self._clock()
            await asyncio.sleep(max(0.0, min(gate.recheck_interval_s, until_expiry)))
            try:
                status = await gate.recheck(verified)
            except Exception as exc:  # fail closed: whatever went wrong, the consent lapses
                lapse = ConsentLapse.of(exc, verified.consent_id)
                if not isinstance(exc, ConsentViolation):
                    logger.error("consent %s: the re-check failed (%s); failing closed",
                                 verified.consent_id, type(exc).__name__)
                await self._report(str(lapse.error.check))
                logger.warning("consent %s no longer holds (%s)", verified.consent_id,
                               lapse.error.check)
                self.lapse = lapse
                try:
                    self._on_lapse(lapse)
                except Exception:
                    logger.exception("consent %s: on_lapse failed", verified.consent_id)
                return
            await self._report(status.name.lower())

    async def _report(self, status_check: str) -> None:
        if self._on_check is None:
            return
        try:
            await self._on_check(status_check)
        except Exception:
            logger.exception("consent %s: could not report a re-check",
                             self._verified.consent_id)

    async def aclose(self) -> None:
        """Stop watching (idempotent; a no-op from inside ``on_lapse``)."""
        self._closed = True
        task, self._task = self._task, None
        if task is None or task is asyncio.current_task() or task.done():
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def __aenter__(self) -> Self:
        return self.start()

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()
