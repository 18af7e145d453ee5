"""Failover: moving a live session to another provider when its vendor session dies.

:class:`Failover` keeps the bookkeeping: one switch per dead attempt (a new vendor session
that dies while the previous switch is still finishing gets its own switch, run after that
one), the providers that died in this session (tried again only after the others), and the
count of consecutive send failures that declares a vendor session dead. The switch itself
(retire the dead attempt, re-check consent, re-route, open the next provider) is the
session's, because it changes the session's state; :func:`replay` then sends the unplayed part
of every unfinished utterance to the new provider.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from ..errors import ProviderError
from ..media import AudioResampler
from ..routing.router import RouteCandidate
from .attempts import VendorAttempt
from .utterances import Utterance

__all__ = ["Failover", "replay"]

logger = logging.getLogger("avatarkit.session")

_Switch = Callable[[VendorAttempt, str, ProviderError | None], Awaitable[None]]


class Failover:
    """The failover tasks of one session; ``switch`` moves the session off a dead attempt."""

    def __init__(self, switch: _Switch, *, name: str) -> None:
        self._switch = switch
        self._name = name
        self.task: asyncio.Task[None] | None = None  # the latest
        self._tasks: set[asyncio.Task[None]] = set()  # every one not finished
        self._from: VendorAttempt | None = None
        self.failed_providers: set[str] = set()
        self.send_failures = 0

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    def start(self, dead: VendorAttempt, reason: str,
              error: ProviderError | None) -> asyncio.Task[None]:
        """The switch away from ``dead``: one per dead attempt."""
        running = self.task
        if running is not None and not running.done() and self._from is dead:
            return running
        self._from = dead
        self.task = task = asyncio.create_task(self._run(dead, reason, error, after=running),
                                               name=self._name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _run(self, dead: VendorAttempt, reason: str, error: ProviderError | None, *,
                   after: asyncio.Task[None] | None) -> None:
        if after is not None and not after.done():
            await asyncio.wait([after])  # its outcome is its own; our cancellation stops us
        await self._switch(dead, reason, error)

    def ranked(self, candidates: Sequence[RouteCandidate]) -> list[RouteCandidate]:
        """Other providers first; the ones that died in this session only after them (a new
        session at the same vendor; health cools a vendor that keeps dying)."""
        return ([c for c in candidates if c.provider not in self.failed_providers]
                + [c for c in candidates if c.provider in self.failed_providers])

    async def aclose(self) -> None:
        """Cancel every switch in progress (not the calling task)."""
        me = asyncio.current_task()
        for task in list(self._tasks):
            if task is not me and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self.task = None


async def replay(attempt: VendorAttempt, unfinished: Sequence[Utterance],
                 sending: Utterance | None, resampler: AudioResampler, *,
                 session_id: str) -> float:
    """Send the unplayed part of every unfinished utterance to ``attempt`` (the oldest from
    where playback got to, later ones whole); an utterance no longer being sent is ended
    there too. Returns the seconds replayed; stops at the first failed send."""
    now = time.monotonic()
    replayed = 0.0
    for index, utterance in enumerate(unfinished):
        position = utterance.estimated_position(now) if index == 0 else utterance.offset
        position = max(position, utterance.dropped_seconds)
        chunks = utterance.unplayed(position)
        utterance.offset = position
        utterance.sent_seconds = 0.0
        utterance.playback_started_at = None
        utterance.first_sent_at = now if chunks else None
        try:
            for chunk in chunks:
                converted = resampler.process(chunk)
                utterance.sent_seconds += chunk.duration
                replayed += chunk.duration
                if converted.num_frames:
                    await attempt.vendor.send_audio(converted, utterance_id=utterance.id)
            if utterance is not sending:  # finished sending before the switch
                tail = resampler.flush()
                if tail.num_frames:
                    await attempt.vendor.send_audio(tail, utterance_id=utterance.id)
                await attempt.vendor.end_utterance(utterance_id=utterance.id)
        except ProviderError as exc:
            logger.warning("session %s: replay to %s failed: %s", session_id,
                           attempt.provider, exc)
            break
    return replayed
