"""``AvatarSession``: one talking-avatar session, whichever provider renders it.

State machine::

    created -> starting -> live -> closing -> closed
       |           |                  ^
       +-----------+------------------+   (close before or during start, or a failed start)

Anything else raises :class:`~avatarkit.SessionStateError`. The session owns what every
provider shares: converting audio to the provider's format, utterance bookkeeping, the
interrupt acknowledgement timeout, the event stream, and closing, which always ends the vendor
session (retried; ``aclose()`` again retries an unconfirmed end) and leaves no task running.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from types import TracebackType
from typing import TYPE_CHECKING, Self

from .catalog import Avatar
from .disclosure.metadata import DisclosureMetadata, LabelPolicy
from .errors import (
    AvatarKitError,
    ConsentCheck,
    ConsentOutOfScope,
    ConsentViolation,
    ConsentWithdrawn,
    MediaFormatError,
    NoRouteError,
    ProviderConnectionError,
    ProviderError,
    SessionStateError,
)
from .events import (
    Closed,
    ConsentRevoked,
    Interrupted,
    SessionEvent,
    SessionStarted,
    SpeechEnded,
    SpeechStarted,
    UsageUpdated,
)
from .join import JoinInfo
from .media import AudioChunk, AudioResampler, VideoFrame
from .providers.base import (
    PlaybackFinished,
    PlaybackStarted,
    ProviderProfile,
    ProviderSession,
    SessionRequest,
    VendorSessionEnded,
)
from .routing.router import RouteDecision

if TYPE_CHECKING:
    from .consent.enforce import ConsentGate
    from .consent.store import GenerationRecord
    from .consent.tokens import VerifiedConsent
    from .kit import AvatarKit

__all__ = ["AvatarSession", "SessionState"]

logger = logging.getLogger("avatarkit.session")

_EVENT_HISTORY = 1000


class SessionState(StrEnum):
    CREATED = "created"
    STARTING = "starting"
    LIVE = "live"
    CLOSING = "closing"
    CLOSED = "closed"


_ALLOWED: dict[SessionState, frozenset[SessionState]] = {
    SessionState.CREATED: frozenset({SessionState.STARTING, SessionState.CLOSING}),
    SessionState.STARTING: frozenset({SessionState.LIVE, SessionState.CLOSING}),
    SessionState.LIVE: frozenset({SessionState.CLOSING}),
    SessionState.CLOSING: frozenset({SessionState.CLOSED}),
    SessionState.CLOSED: frozenset(),
}


@dataclass(slots=True)
class _Utterance:
    id: str
    sent_seconds: float = 0.0
    first_sent_at: float | None = None  # monotonic
    playback_started_at: float | None = None  # monotonic, from the vendor's event
    send_finished: bool = False

    def estimated_position(self, now: float) -> float:
        """Seconds played so far: the time since playback began, capped by what was sent."""
        start = self.playback_started_at or self.first_sent_at
        if start is None:
            return 0.0
        return max(0.0, min(self.sent_seconds, now - start))


class AvatarSession:
    """A talking-avatar session. Get one from ``kit.session(...)`` and use it with ``async with``.

    Inside the block the session is live: ``route`` says why its provider was chosen, ``join``
    tells viewers where to watch, ``send_audio`` / ``end_utterance`` make the avatar speak,
    ``interrupt`` stops it, ``events()`` reports what happens.
    """

    def __init__(
        self,
        kit: AvatarKit,
        *,
        avatar: Avatar,
        purpose: str,
        policy: str | None,
        consent: str,
        interrupt_ack_timeout: float,
        max_duration_s: float,
        close_timeout: float,
    ) -> None:
        self.session_id = f"ses_{uuid.uuid4().hex}"
        self.generation_id = f"gen_{uuid.uuid4().hex}"
        self.avatar = avatar
        self.purpose = purpose
        self.policy = policy
        self._consent = consent
        self._kit = kit
        self.interrupt_ack_timeout = interrupt_ack_timeout
        self._max_duration_s = max_duration_s
        self._close_timeout = close_timeout

        self._state = SessionState.CREATED
        self._route: RouteDecision | None = None
        self._profile: ProviderProfile | None = None
        self._vendor: ProviderSession | None = None
        self._resampler: AudioResampler | None = None
        self._pump: asyncio.Task[None] | None = None
        self._start_finished = asyncio.Event()
        self._close_task: asyncio.Task[None] | None = None
        self._vendor_failure: VendorSessionEnded | None = None
        self._end_failure: BaseException | None = None  # last failed attempt to end
        self._verified: VerifiedConsent | None = None
        self._disclosure_metadata: DisclosureMetadata | None = None
        self._notice: str | None = None
        self._consent_watch: asyncio.Task[None] | None = None

        self._sending: _Utterance | None = None  # utterance currently being sent
        self._unfinished: dict[str, _Utterance] = {}  # sent, not yet reported finished
        self._ack: asyncio.Future[PlaybackFinished] | None = None
        self._ack_target: str | None = None

        self._history: deque[SessionEvent] = deque(maxlen=_EVENT_HISTORY)
        self._subscribers: set[asyncio.Queue[SessionEvent | None]] = set()

    # -- properties ------------------------------------------------------------------------

    @property
    def state(self) -> SessionState:
        return self._state

    @property
    def route(self) -> RouteDecision:
        """Why this session's provider was chosen (every candidate, with its exclusion)."""
        if self._route is None:
            raise SessionStateError("the session has not been routed yet; start it first")
        return self._route

    @property
    def join(self) -> JoinInfo:
        """How viewers join the media, with the AI-disclosure metadata and its signed notice."""
        join = self._live_vendor("join").join
        return join.model_copy(update={"disclosure_notice": self._notice})

    @property
    def disclosure(self) -> DisclosureMetadata:
        """The session's AI-disclosure metadata (consent id, generation id, provider...)."""
        if self._disclosure_metadata is None:
            raise SessionStateError("the session has no disclosure yet; start it first")
        return self._disclosure_metadata

    @property
    def consent(self) -> VerifiedConsent:
        """The verified consent the session runs under."""
        if self._verified is None:
            raise SessionStateError("the session's consent is not verified yet; start it")
        return self._verified

    @property
    def provider(self) -> str | None:
        """The provider rendering the session (None before start)."""
        return self._vendor.provider if self._vendor else None

    @property
    def vendor_session_id(self) -> str | None:
        """The vendor's id for the session (Tavus conversation id...), for support and audits."""
        return self._vendor.vendor_session_id if self._vendor else None

    @property
    def billed_seconds(self) -> float:
        """Seconds the vendor bills for this session so far (from create to confirmed end)."""
        return self._vendor.billed_seconds if self._vendor else 0.0

    # -- lifecycle -------------------------------------------------------------------------

    def _transition(self, new: SessionState) -> None:
        if new not in _ALLOWED[self._state]:
            raise SessionStateError(f"cannot go from {self._state} to {new}")
        logger.debug("session %s: %s -> %s", self.session_id, self._state, new)
        self._state = new

    async def start(self) -> None:
        """Route, start the vendor session, go live. ``async with`` calls this for you."""
        self._transition(SessionState.STARTING)
        gate = self._kit._consent_gate()
        try:
            # Consent first: nothing reaches a vendor without a verified, in-scope token.
            self._verified = verified = await gate.admit(
                self._consent, avatar=self.avatar, purpose=self.purpose,
                generation_id=self.generation_id)
            try:
                self._route = decision = self._routed(verified)
            except ConsentOutOfScope as exc:
                await gate.log(self._record("consent_refused", status_check=str(exc.check),
                                            details={"error": type(exc).__name__}))
                raise
            assert decision.chosen is not None  # route() raises when nothing is eligible
            provider = self._kit._provider(decision.chosen)
            avatar_id = self.avatar.id_at(decision.chosen)
            assert avatar_id is not None
            profile = provider.profile
            self._disclosure_metadata = disclosure = self._disclosure(
                decision.chosen, profile, verified)
            request = SessionRequest(
                session_id=self.session_id,
                avatar=self.avatar.name,
                avatar_id=avatar_id,
                idempotency_key=f"avk-{self.session_id}",
                disclosure=disclosure,
                purpose=self.purpose,
                max_duration_s=self._max_duration_s,
            )
            vendor = await provider.start(request)
        except BaseException as exc:
            self._start_finished.set()
            self._transition(SessionState.CLOSING)
            self._finish_close(reason="start_failed", error=exc)
            raise
        self._vendor, self._profile = vendor, profile
        self._resampler = AudioResampler(profile.audio_format)
        self._start_finished.set()
        if self._state is not SessionState.STARTING:  # aclose() was called while starting
            return
        self._notice = self._kit._sign_disclosure(disclosure)
        self._pump = asyncio.create_task(self._pump_signals(vendor), name=f"{self.session_id}-pump")
        self._consent_watch = asyncio.create_task(
            self._watch_consent(gate, verified), name=f"{self.session_id}-consent")
        self._transition(SessionState.LIVE)
        await gate.log(self._record("session_started", status_check="valid"))
        self._publish(SessionStarted(
            session_id=self.session_id, provider=vendor.provider,
            vendor_session_id=vendor.vendor_session_id, consent_id=verified.consent_id,
            disclosure=disclosure, disclosure_notice=self._notice))
        logger.info("session %s live on %s (%s) under consent %s", self.session_id,
                    vendor.provider, vendor.vendor_session_id, verified.consent_id)

    def _routed(self, verified: VerifiedConsent) -> RouteDecision:
        """The route among providers the consent allows. When the consent excludes every
        provider that has the avatar, that is a consent refusal, not a routing gap."""
        from .consent.enforce import ConsentRouteConstraint

        try:
            return self._kit._route(self.avatar, purpose=self.purpose, policy=self.policy,
                                    constraints=(ConsentRouteConstraint(verified),))
        except NoRouteError as exc:
            decision = exc.decision
            assert isinstance(decision, RouteDecision)
            by_consent = [c for c in decision.candidates if c.excluded_by == "consent"]
            if not by_consent:
                raise
            check = ConsentCheck.REGION if all("region" in (c.reason or "")
                                               for c in by_consent) else ConsentCheck.PROVIDER
            raise ConsentOutOfScope(
                "the consent allows none of the providers that have this avatar:\n"
                + decision.explain(), check=check, consent_id=verified.consent_id,
            ) from None

    def _record(self, kind: str, **fields: object) -> GenerationRecord:
        from .consent.store import GenerationRecord

        verified = self._verified
        return GenerationRecord.model_validate({
            "generation_id": self.generation_id, "kind": kind,
            "consent_id": verified.consent_id if verified else None,
            "token_sha256": verified.token_sha256 if verified else None,
            "purpose": self.purpose, "channel": "live", "avatar": self.avatar.name,
            "provider": self._vendor.provider if self._vendor else None,
            "label": None if self._disclosure_metadata is None
            else self._disclosure_metadata.label_policy == "burned-in",
            **fields,
        })

    async def _watch_consent(self, gate: ConsentGate, verified: VerifiedConsent) -> None:
        """Re-check the consent every ``recheck_interval_s`` (and at its expiry). A revoked,
        suspended, expired or unverifiable consent ends the session (fail closed)."""
        interval = gate.recheck_interval_s
        while True:
            until_expiry = verified.expires_at.timestamp() - time.time()
            await asyncio.sleep(max(0.0, min(interval, until_expiry)))
            try:
                status = await gate.recheck(verified)
            except ConsentViolation as exc:
                await gate.log(self._record("status_check", status_check=str(exc.check)))
                if isinstance(exc, ConsentWithdrawn):
                    self._publish(ConsentRevoked(
                        session_id=self.session_id, consent_id=verified.consent_id,
                        status="suspended" if exc.check is ConsentCheck.SUSPENDED
                        else "revoked"))
                logger.warning("session %s: consent %s no longer holds (%s); ending",
                               self.session_id, verified.consent_id, exc.check)
                if self._close_task is None:
                    self._close_task = asyncio.create_task(
                        self._do_close(f"consent {exc.check}"), name=f"{self.session_id}-close")
                return
            await gate.log(self._record("status_check", status_check=status.name.lower()))

    async def aclose(self) -> None:
        """Close the session: end it at the vendor, stop every task. Safe to call again.

        Raises the vendor's ``ProviderError`` (after all local cleanup) when the vendor could
        not confirm the end; calling ``aclose()`` again retries it.
        """
        await self._close(reason="closed", raise_vendor_error=True)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        reason = "closed" if exc is None else f"error: {exc_type.__name__ if exc_type else ''}"
        # With an exception in flight, don't mask it with a vendor-end error (it is logged).
        await self._close(reason=reason, raise_vendor_error=exc is None)

    async def _close(self, *, reason: str, raise_vendor_error: bool) -> None:
        # A close that already finished without confirming the vendor end is retried here;
        # a close in progress (or started now) reports its own attempt's outcome.
        retry = self._close_task is not None and self._close_task.done()
        if self._close_task is None:
            self._close_task = asyncio.create_task(
                self._do_close(reason), name=f"{self.session_id}-close"
            )
        # Shielded: cancelling the caller must not abandon a half-done vendor end.
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(self._close_task)
        if self._vendor is None or self._vendor.ended:
            return
        error = await self._end_vendor() if retry else self._end_failure
        if error is None:
            return
        if raise_vendor_error:
            raise _end_error(self._vendor, error) from error
        logger.error("session %s: vendor session %s may still be open: %s",
                     self.session_id, self._vendor.vendor_session_id, error)

    async def _end_vendor(self) -> BaseException | None:
        """End the vendor session within the close timeout; the failure, or None."""
        assert self._vendor is not None
        try:
            async with asyncio.timeout(self._close_timeout):
                await self._vendor.end()
        except (ProviderError, TimeoutError) as exc:
            logger.warning("session %s: ending %s session %s failed: %s", self.session_id,
                           self._vendor.provider, self._vendor.vendor_session_id, exc)
            return exc
        return None

    async def _do_close(self, reason: str) -> None:
        if self._state is SessionState.CLOSED:
            return
        if self._state is SessionState.STARTING:
            self._transition(SessionState.CLOSING)
            await self._start_finished.wait()
        elif self._state is not SessionState.CLOSING:
            self._transition(SessionState.CLOSING)
        for task in (self._pump, self._consent_watch):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._pump = self._consent_watch = None
        if self._ack is not None and not self._ack.done():
            self._ack.cancel()
        if self._vendor is not None:
            self._end_failure = await self._end_vendor()
        if self._vendor_failure is not None and reason == "closed":
            reason = f"vendor: {self._vendor_failure.reason}"
        if self._verified is not None and self._vendor is not None:
            await self._kit._consent_gate().log(self._record("session_ended", details={
                "reason": reason, "billed_seconds": round(self._vendor.billed_seconds, 3),
                "vendor_ended": self._vendor.ended}))
        self._finish_close(reason=reason, error=self._end_failure)

    def _finish_close(self, *, reason: str, error: BaseException | None) -> None:
        vendor = self._vendor
        if vendor is not None:
            self._publish(UsageUpdated(
                session_id=self.session_id, provider=vendor.provider,
                billed_seconds=vendor.billed_seconds, cost=self._cost(vendor.billed_seconds)))
        self._publish(Closed(
            session_id=self.session_id,
            reason=reason,
            provider=vendor.provider if vendor else None,
            billed_seconds=vendor.billed_seconds if vendor else None,
            vendor_ended=vendor.ended if vendor else True,
            error=str(error) if error else None,
        ))
        self._transition(SessionState.CLOSED)
        for queue in self._subscribers:
            queue.put_nowait(None)
        logger.info("session %s closed (%s)", self.session_id, reason)

    # -- speaking ---------------------------------------------------------------------------

    async def send_audio(self, chunk: AudioChunk) -> None:
        """Send audio for the avatar to speak. Any supported rate and channel count: it is
        converted to what the provider wants. Consecutive calls form one utterance until
        ``end_utterance()`` or ``interrupt()``."""
        vendor = self._live_vendor("send_audio()")
        if not isinstance(chunk, AudioChunk):
            raise MediaFormatError(f"got {type(chunk).__name__}", field="chunk",
                                   expected="an AudioChunk (AudioChunk.from_pcm16(...))")
        utterance = self._sending
        if utterance is None:
            utterance = self._sending = _Utterance(id=f"utt_{uuid.uuid4().hex[:16]}")
            self._unfinished[utterance.id] = utterance
        assert self._resampler is not None
        converted = self._resampler.process(chunk)
        if utterance.first_sent_at is None:
            utterance.first_sent_at = time.monotonic()
        utterance.sent_seconds += chunk.duration
        if converted.num_frames:
            await vendor.send_audio(converted, utterance_id=utterance.id)

    async def end_utterance(self) -> None:
        """Mark the end of the current utterance; the avatar finishes speaking it."""
        vendor = self._live_vendor("end_utterance()")
        utterance, self._sending = self._sending, None
        if utterance is None:
            return
        assert self._resampler is not None
        tail = self._resampler.flush()
        if tail.num_frames:
            await vendor.send_audio(tail, utterance_id=utterance.id)
        utterance.send_finished = True
        await vendor.end_utterance(utterance_id=utterance.id)

    async def interrupt(self) -> float:
        """Stop the avatar now and drop unplayed audio. Returns the playback position (seconds
        into the interrupted utterance). Waits at most ``interrupt_ack_timeout`` for the
        vendor's acknowledgement, then returns an estimate: it never hangs."""
        vendor = self._live_vendor("interrupt()")
        now = time.monotonic()
        target = self._sending or self._latest_unfinished()
        self._sending = None
        if self._resampler is not None:
            self._resampler.reset()
        if target is None:
            return 0.0
        loop = asyncio.get_running_loop()
        self._ack = ack = loop.create_future()
        self._ack_target = target.id
        acknowledged: PlaybackFinished | None = None
        try:
            async with asyncio.timeout(self.interrupt_ack_timeout):
                await vendor.interrupt()
                acknowledged = await ack
        except TimeoutError:
            logger.warning("session %s: %s did not acknowledge the interrupt within %.1f s",
                           self.session_id, vendor.provider, self.interrupt_ack_timeout)
        except ProviderError as exc:
            logger.warning("session %s: interrupt not delivered: %s", self.session_id, exc)
        finally:
            self._ack = self._ack_target = None
        if acknowledged is not None and acknowledged.duration is not None:
            position = acknowledged.duration
        else:
            position = target.estimated_position(now)
        self._unfinished.pop(target.id, None)
        self._publish(Interrupted(session_id=self.session_id, utterance_id=target.id,
                                  playback_position=position,
                                  acknowledged=acknowledged is not None))
        return position

    # -- observing ---------------------------------------------------------------------------

    def events(self) -> AsyncIterator[SessionEvent]:
        """Events of the session: those so far (the latest 1000), then live ones, ending after
        ``Closed``. Each call gets its own complete stream."""
        queue: asyncio.Queue[SessionEvent | None] = asyncio.Queue()
        for event in self._history:
            queue.put_nowait(event)
        if self._state is SessionState.CLOSED:
            queue.put_nowait(None)
        else:
            self._subscribers.add(queue)
        return self._iterate(queue)

    async def _iterate(
        self, queue: asyncio.Queue[SessionEvent | None]
    ) -> AsyncIterator[SessionEvent]:
        try:
            while (event := await queue.get()) is not None:
                yield event
        finally:
            self._subscribers.discard(queue)

    def video(self) -> AsyncIterator[VideoFrame]:
        """Video frames, where the provider delivers them to this process (local engine, P2P
        vendors). Raises ``CapabilityError`` for room-based providers (join them instead)."""
        return self._live_vendor("video()").video_frames()

    # -- internals -----------------------------------------------------------------------------

    def _live_vendor(self, what: str) -> ProviderSession:
        if self._vendor is not None and self._vendor_failure is not None:
            # The vendor side died: say so with its typed error, not just "closed".
            failure = self._vendor_failure
            raise failure.error or ProviderConnectionError(
                f"the vendor session ended: {failure.reason}", provider=self._vendor.provider
            )
        if self._state is not SessionState.LIVE or self._vendor is None:
            raise SessionStateError(f"{what} needs a live session; this one is {self._state}")
        return self._vendor

    def _latest_unfinished(self) -> _Utterance | None:
        return next(reversed(self._unfinished.values()), None)

    def _disclosure(self, provider: str, profile: ProviderProfile,
                    verified: VerifiedConsent) -> DisclosureMetadata:
        cfg = self._kit.config.disclosure
        if not profile.self_hosted:
            policy: LabelPolicy = "viewer-ui"  # the vendor renders; the viewer UI labels
        else:
            policy = "burned-in" if cfg.burned_label.enabled else "disabled"
        return DisclosureMetadata(
            label=cfg.label, notice=cfg.notice, generator=f"avatarkit/{_version()}",
            generation_id=self.generation_id, provider=provider, avatar=self.avatar.name,
            consent_id=verified.consent_id, consent_token_sha256=verified.token_sha256,
            label_policy=policy,
        )

    def _cost(self, billed_seconds: float) -> Decimal | None:
        price = self._profile.price_per_minute if self._profile else None
        if price is None:
            return None
        minutes = Decimal(str(round(billed_seconds, 3))) / Decimal(60)
        return (minutes * price).quantize(Decimal("0.000001"))

    def _publish(self, event: SessionEvent) -> None:
        self._history.append(event)
        for queue in self._subscribers:
            queue.put_nowait(event)

    async def _pump_signals(self, vendor: ProviderSession) -> None:
        async for signal in vendor.signals():
            if isinstance(signal, PlaybackStarted):
                utterance = self._unfinished.get(signal.utterance_id)
                if utterance is not None and utterance.playback_started_at is None:
                    utterance.playback_started_at = time.monotonic()
                self._publish(SpeechStarted(session_id=self.session_id,
                                            utterance_id=signal.utterance_id,
                                            provider=vendor.provider))
            elif isinstance(signal, PlaybackFinished):
                self._on_playback_finished(vendor, signal)
            elif isinstance(signal, VendorSessionEnded):
                self._vendor_failure = signal
                logger.warning("session %s: %s session ended on the vendor side: %s",
                               self.session_id, vendor.provider, signal.reason)
                # Close from its own task (closing awaits this pump, which returns now).
                if self._close_task is None:
                    self._close_task = asyncio.create_task(
                        self._do_close(f"vendor: {signal.reason}"),
                        name=f"{self.session_id}-close",
                    )
                return

    def _on_playback_finished(self, vendor: ProviderSession, signal: PlaybackFinished) -> None:
        utterance_id = signal.utterance_id
        if utterance_id is None:  # vendor did not say which: the oldest one playing
            utterance_id = next(iter(self._unfinished), None)
        if utterance_id is not None:
            utterance = self._unfinished.get(utterance_id)
            if utterance is not None and (utterance.send_finished or signal.interrupted):
                del self._unfinished[utterance_id]
            self._publish(SpeechEnded(session_id=self.session_id, utterance_id=utterance_id,
                                      provider=vendor.provider, duration=signal.duration,
                                      interrupted=signal.interrupted))
        if self._ack is not None and not self._ack.done() and (
            signal.interrupted or utterance_id == self._ack_target
        ):
            self._ack.set_result(signal)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("avatarkit")
    except PackageNotFoundError:
        return "0+unknown"


def _end_error(vendor: ProviderSession, exc: BaseException) -> AvatarKitError:
    if isinstance(exc, ProviderError):
        return exc
    return ProviderConnectionError(
        f"could not confirm the end of session {vendor.vendor_session_id} in time",
        provider=vendor.provider,
    )
