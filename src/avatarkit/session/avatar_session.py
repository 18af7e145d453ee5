"""``AvatarSession``: one talking-avatar session, whichever provider renders it.

State machine::

    created -> starting -> live -> closing -> closed
       |           |                  ^
       +-----------+------------------+   (close before or during start, or a failed start)

Anything else raises :class:`~avatarkit.SessionStateError`. The session owns what every
provider shares: converting audio to the provider's format, utterance bookkeeping, the
interrupt acknowledgement timeout, the event stream, and closing, which always ends the vendor
session (retried; ``aclose()`` again retries an unconfirmed end) and leaves no task running.

It also owns what makes a session survive and stay affordable:

* **start fallback**: the route's candidates are tried in rank order; a retryable failure
  (5xx, timeout, dropped connection, 429) moves on to the next, a permanent one (401, 404,
  invalid request, out of credits) or a policy violation stops at once;
* **failover**: when the live vendor session dies (its channel dropped, the vendor ended it
  for a reason another provider could fix, repeated send failures), the session re-routes
  under the same consent, policy and budgets, opens the next provider, replays the unplayed
  part of the current utterance and emits ``ProviderSwitched``; it keeps its ``session_id``,
  generation id and consent;
* **metering and budgets**: every vendor attempt is a row in the session ledger, written
  before the create call and closed on the vendor's confirmed end; ``UsageUpdated`` reports
  the billed time and cost; a budget cap ends the session before it is crossed.

Why one module: this is the session's state machine and the public methods that move it;
they share the session's live state (current attempt, utterances, the switch lock, the
close task) and each transition is checked against every other. What does not touch that
state lives beside it: vendor attempts, failover bookkeeping and replay, metering and
budgets, settling, utterances.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from decimal import Decimal
from enum import StrEnum
from types import TracebackType
from typing import TYPE_CHECKING, Self

from ..catalog import Avatar
from ..contract import (
    PlaybackFinished,
    PlaybackStarted,
    ProviderSession,
    VendorSessionEnded,
)
from ..disclosure.metadata import DisclosureMetadata
from ..errors import (
    AvatarKitError,
    BudgetExceeded,
    CapabilityError,
    ConsentCheck,
    ConsentOutOfScope,
    ConsentViolation,
    MediaFormatError,
    NoRouteError,
    ProviderConnectionError,
    ProviderError,
    SessionStateError,
)
from ..events import (
    Closed,
    ConsentRevoked,
    Interrupted,
    ProviderSwitched,
    SessionEvent,
    SessionStarted,
    SpeechEnded,
    SpeechStarted,
)
from ..join import JoinInfo
from ..media import AudioChunk, AudioResampler, VideoFrame
from ..routing.policy import RoutingPolicy
from ..routing.router import RouteConstraint, RouteDecision
from .attempts import VendorAttempt, VendorAttempts, describe
from .failover import Failover, replay
from .metering import SessionMeter
from .services import SessionServices
from .utterances import Utterance

if TYPE_CHECKING:
    from ..consent.store import GenerationRecord
    from ..consent.tokens import VerifiedConsent
    from ..consent.watch import ConsentLapse, ConsentWatch
    from ..metering.budget import BudgetConstraint

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


class AvatarSession:
    """A talking-avatar session. Get one from ``kit.session(...)`` and use it with ``async with``.

    Inside the block the session is live: ``route`` says why its provider was chosen, ``join``
    tells viewers where to watch, ``send_audio`` / ``end_utterance`` make the avatar speak,
    ``interrupt`` stops it, ``events()`` reports what happens (``ProviderSwitched`` when it
    failed over to another provider: viewers must re-join).
    """

    def __init__(
        self,
        services: SessionServices,
        *,
        avatar: Avatar,
        purpose: str,
        policy: str | None,
        consent: str,
        tenant: str | None,
        interrupt_ack_timeout: float,
        max_duration_s: float,
        close_timeout: float,
    ) -> None:
        self.session_id = f"ses_{uuid.uuid4().hex}"
        self.generation_id = f"gen_{uuid.uuid4().hex}"
        self.avatar = avatar
        self.purpose = purpose
        self.policy = policy
        self.tenant = tenant
        self._consent = consent
        self._services = services
        self._gate = services.consent
        self._rules: RoutingPolicy = services.rules(policy)
        # audio kept per utterance for a failover's replay (0: no failover, keep nothing)
        self._replay_limit_s = (services.session_defaults.replay_buffer_s
                                if self._rules.failover else 0.0)
        self.interrupt_ack_timeout = interrupt_ack_timeout
        self._attempts = VendorAttempts(
            services, session_id=self.session_id, generation_id=self.generation_id,
            avatar=avatar, purpose=purpose, tenant=tenant, consent=consent,
            max_duration_s=max_duration_s, close_timeout=close_timeout)
        self._metering = SessionMeter(
            services, self._attempts, session_id=self.session_id, tenant=tenant,
            rules=self._rules, publish=self._publish, end_session=self._close_soon)
        self._failover = Failover(self._switch_provider, name=f"{self.session_id}-failover")

        self._state = SessionState.CREATED
        self._route: RouteDecision | None = None
        self._resampler: AudioResampler | None = None
        self._pump: asyncio.Task[None] | None = None
        self._meter: asyncio.Task[None] | None = None
        self._switch_lock = asyncio.Lock()
        self._start_finished = asyncio.Event()
        self._close_task: asyncio.Task[None] | None = None
        self._vendor_failure: VendorSessionEnded | None = None
        self._end_failure: BaseException | None = None  # last failed attempt to end
        self._verified: VerifiedConsent | None = None
        self._notice: str | None = None
        self._consent_watch: ConsentWatch | None = None
        self._budget: BudgetConstraint | None = None

        self._sending: Utterance | None = None  # utterance currently being sent
        self._unfinished: dict[str, Utterance] = {}  # sent, not yet reported finished
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
        """Why this session's provider was chosen (every candidate, with its exclusion).
        After a failover, the decision that chose the current provider."""
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
        if self._current is None:
            raise SessionStateError("the session has no disclosure yet; start it first")
        return self._current.disclosure

    @property
    def consent(self) -> VerifiedConsent:
        """The verified consent the session runs under."""
        if self._verified is None:
            raise SessionStateError("the session's consent is not verified yet; start it")
        return self._verified

    @property
    def _current(self) -> VendorAttempt | None:
        return self._attempts.current

    @property
    def _vendor(self) -> ProviderSession | None:
        return self._attempts.current.vendor if self._attempts.current else None

    @property
    def provider(self) -> str | None:
        """The provider rendering the session (None before start)."""
        return self._current.provider if self._current else None

    @property
    def providers_used(self) -> list[str]:
        """Every provider that rendered this session, in order (more than one after failover)."""
        return self._attempts.providers_used

    @property
    def vendor_session_id(self) -> str | None:
        """The vendor's id for the session (Tavus conversation id...), for support and audits."""
        return self._current.vendor.vendor_session_id if self._current else None

    @property
    def billed_seconds(self) -> float:
        """Seconds billed for this session so far, over every provider it used (each from its
        create to its confirmed end)."""
        return self._attempts.billed_seconds

    @property
    def cost(self) -> Decimal | None:
        """Cost so far where prices are known (``None`` when no provider used has a price;
        see ``UsageUpdated.unpriced_seconds`` for the unpriced part)."""
        return self._metering.usage()[1]

    # -- lifecycle -------------------------------------------------------------------------

    def _transition(self, new: SessionState) -> None:
        if new not in _ALLOWED[self._state]:
            raise SessionStateError(f"cannot go from {self._state} to {new}")
        logger.debug("session %s: %s -> %s", self.session_id, self._state, new)
        self._state = new

    async def start(self) -> None:
        """Verify consent, route, start a vendor session (falling back down the route on
        retryable failures), go live. ``async with`` calls this for you."""
        self._transition(SessionState.STARTING)
        gate = self._gate
        try:
            # Consent first: nothing reaches a vendor without a verified, in-scope token.
            self._verified = verified = await gate.admit(
                self._consent, avatar=self.avatar, purpose=self.purpose,
                generation_id=self.generation_id)
            try:
                self._route = decision = await self._routed(verified)
            except ConsentOutOfScope as exc:
                await gate.log(self._record("consent_refused", status_check=str(exc.check),
                                            details={"error": type(exc).__name__}))
                raise
            attempt = await self._attempts.open_ranked(
                decision.ranked, rules=self._rules, verified=verified, budget=self._budget,
                decision=decision)
        except BaseException as exc:
            self._start_finished.set()
            if self._state is SessionState.STARTING:
                self._transition(SessionState.CLOSING)
                self._finish_close(reason="start_failed", error=exc)
            raise
        self._attach(attempt)
        self._start_finished.set()
        if self._state is not SessionState.STARTING:  # aclose() was called while starting
            return
        from ..consent.watch import ConsentWatch

        async def log_check(status_check: str) -> None:
            await gate.log(self._record("status_check", status_check=status_check))

        self._consent_watch = ConsentWatch(
            gate, verified, on_lapse=self._consent_lapsed, on_check=log_check,
            name=f"{self.session_id}-consent").start()
        self._meter = asyncio.create_task(self._metering.run(), name=f"{self.session_id}-meter")
        self._transition(SessionState.LIVE)
        await gate.log(self._record("session_started", status_check="valid"))
        assert self._notice is not None
        self._publish(SessionStarted(
            session_id=self.session_id, provider=attempt.provider,
            vendor_session_id=attempt.vendor.vendor_session_id,
            consent_id=verified.consent_id, disclosure=attempt.disclosure,
            disclosure_notice=self._notice))
        logger.info("session %s live on %s (%s) under consent %s", self.session_id,
                    attempt.provider, attempt.vendor.vendor_session_id, verified.consent_id)

    async def _routed(self, verified: VerifiedConsent) -> RouteDecision:
        """The route among providers the consent and the budgets allow.

        When the consent excludes every provider that has the avatar, that is a consent
        refusal; when budgets exclude every one the policy and consent allow, a budget one.
        Both are ``PolicyViolation``: never retried, never failed over.
        """
        from ..consent.enforce import ConsentRouteConstraint

        constraints: list[RouteConstraint] = [ConsentRouteConstraint(verified)]
        self._budget = await self._metering.budget_constraint()
        if self._budget is not None:
            constraints.append(self._budget)
        try:
            return self._services.route(self.avatar, purpose=self.purpose, policy=self.policy,
                                        constraints=constraints)
        except NoRouteError as exc:
            decision = exc.decision
            assert isinstance(decision, RouteDecision)
            by_budget = [c for c in decision.candidates if c.excluded_by == "budget"]
            if by_budget:
                raise BudgetExceeded(
                    "a session now would cross a budget cap:\n" + decision.explain(),
                    cap=(by_budget[0].reason or "").split(":", 1)[0] or None) from None
            by_consent = [c for c in decision.candidates if c.excluded_by == "consent"]
            if not by_consent:
                raise
            check = ConsentCheck.REGION if all("region" in (c.reason or "")
                                               for c in by_consent) else ConsentCheck.PROVIDER
            raise ConsentOutOfScope(
                "the consent allows none of the providers that have this avatar:\n"
                + decision.explain(), check=check, consent_id=verified.consent_id,
            ) from None

    def _attach(self, attempt: VendorAttempt) -> None:
        """Make ``attempt`` the live vendor session: its audio format, notice and signals."""
        self._attempts.attach(attempt)
        self._resampler = AudioResampler(attempt.profile.audio_format)
        self._notice = self._services.sign_disclosure(attempt.disclosure)
        self._failover.send_failures = 0
        self._pump = asyncio.create_task(self._pump_signals(attempt.vendor),
                                         name=f"{self.session_id}-pump")

    def _record(self, kind: str, **fields: object) -> GenerationRecord:
        from ..consent.store import GenerationRecord

        verified = self._verified
        current = self._current
        return GenerationRecord.model_validate({
            "generation_id": self.generation_id, "kind": kind,
            "consent_id": verified.consent_id if verified else None,
            "token_sha256": verified.token_sha256 if verified else None,
            "purpose": self.purpose, "channel": "live", "avatar": self.avatar.name,
            "provider": current.provider if current else None,
            "label": None if current is None
            else current.disclosure.label_policy == "burned-in",
            **fields,
        })

    def _consent_lapsed(self, lapse: ConsentLapse) -> None:
        """The consent watch found the consent no longer holds: say so, and end (the reason
        is one of ``ConsentEndReason``)."""
        self._publish_withdrawn(lapse)
        logger.warning("session %s: consent no longer holds (%s); ending", self.session_id,
                       lapse.error.check)
        self._close_soon(lapse.reason)

    def _publish_withdrawn(self, lapse: ConsentLapse) -> None:
        if lapse.withdrawn is not None and self._verified is not None:
            self._publish(ConsentRevoked(session_id=self.session_id,
                                         consent_id=self._verified.consent_id,
                                         status=lapse.withdrawn))

    def _close_soon(self, reason: str) -> None:
        """Close from a task of its own (the caller may be a task that closing awaits)."""
        if self._close_task is None:
            self._close_task = asyncio.create_task(self._do_close(reason),
                                                   name=f"{self.session_id}-close")

    # -- failover ----------------------------------------------------------------------------

    def _start_failover(self, dead: VendorAttempt, reason: str,
                        error: ProviderError | None) -> asyncio.Task[None]:
        return self._failover.start(dead, reason, error)

    async def _switch_provider(self, dead: VendorAttempt, reason: str,
                               error: ProviderError | None) -> None:
        """Move the session from ``dead`` to the next allowed provider, replaying the unplayed
        audio; close the session when no provider is left."""
        async with self._switch_lock:
            if self._current is not dead or self._state is not SessionState.LIVE:
                return
            logger.warning("session %s: %s session %s died (%s); failing over", self.session_id,
                           dead.provider, dead.vendor.vendor_session_id, reason)
            self._services.health.record_failure(
                dead.provider, error or ProviderConnectionError(reason, provider=dead.provider))
            self._failover.failed_providers.add(dead.provider)
            if self._pump is not None and self._pump is not asyncio.current_task():
                self._pump.cancel()
            # A dropped channel may leave the old session open (and billed): end it first.
            await self._attempts.retire(dead, f"failover: {reason}")
            if self._ack is not None and not self._ack.done():
                self._ack.cancel()
            try:
                assert self._verified is not None
                # A new vendor session is a new use of the likeness: consent must still hold.
                await self._gate.recheck(self._verified, fresh_within_s=0)
                decision = await self._routed(self._verified)
                attempt = await self._attempts.open_ranked(
                    self._failover.ranked(decision.ranked), rules=self._rules,
                    verified=self._verified, budget=self._budget, decision=decision)
            except (AvatarKitError, ExceptionGroup) as exc:
                if isinstance(exc, ConsentViolation):
                    from ..consent.watch import ConsentLapse

                    self._publish_withdrawn(ConsentLapse.of(exc))
                logger.error("session %s: failover found no provider: %s", self.session_id, exc)
                self._vendor_failure = VendorSessionEnded(reason=reason, billing_stopped=True,
                                                          error=error)
                self._close_soon(f"vendor: {reason}; failover failed: {describe(exc)}")
                return
            if self._state is not SessionState.LIVE:  # closed meanwhile: end it, count it
                self._attempts.record(attempt)
                await self._attempts.retire(attempt, "closed during failover")
                return
            self._route = decision
            self._attach(attempt)
            assert self._resampler is not None
            replayed = await replay(attempt, list(self._unfinished.values()), self._sending,
                                    self._resampler, session_id=self.session_id)
        await self._gate.log(self._record(
            "provider_switched", details={"from": dead.provider, "to": attempt.provider,
                                          "reason": reason}))
        assert self._notice is not None
        self._publish(ProviderSwitched(
            session_id=self.session_id, from_provider=dead.provider, to_provider=attempt.provider,
            reason=reason, join=attempt.vendor.join.model_copy(
                update={"disclosure_notice": self._notice}),
            vendor_session_id=attempt.vendor.vendor_session_id, replayed_seconds=replayed))
        logger.info("session %s: switched from %s to %s (%s), %.2f s replayed", self.session_id,
                    dead.provider, attempt.provider, attempt.vendor.vendor_session_id, replayed)

    # -- closing ------------------------------------------------------------------------------

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
        unended = [a for a in self._attempts.all if not a.vendor.ended]
        if not unended:
            return
        error = self._end_failure
        if retry:
            error = None
            for attempt in unended:
                error = await self._attempts.retire(attempt, "closed") or error
        if error is None:
            return
        vendor = unended[-1].vendor
        if raise_vendor_error:
            raise _end_error(vendor, error) from error
        logger.error("session %s: vendor session %s may still be open: %s",
                     self.session_id, vendor.vendor_session_id, error)

    async def _do_close(self, reason: str) -> None:
        if self._state is SessionState.CLOSED:
            return
        if self._state is SessionState.STARTING:
            self._transition(SessionState.CLOSING)
            await self._start_finished.wait()
        elif self._state is not SessionState.CLOSING:
            self._transition(SessionState.CLOSING)
        me = asyncio.current_task()
        if self._consent_watch is not None:
            await self._consent_watch.aclose()
        await self._failover.aclose()
        for task in (self._pump, self._meter):
            if task is not None and task is not me and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._pump = self._consent_watch = self._meter = None
        if self._ack is not None and not self._ack.done():
            self._ack.cancel()
        self._end_failure = await self._attempts.retire_unended(reason)
        if self._vendor_failure is not None and reason == "closed":
            reason = f"vendor: {self._vendor_failure.reason}"
        if self._verified is not None and self._current is not None:
            await self._log_quietly(self._record("session_ended", details={
                "reason": reason, "billed_seconds": round(self.billed_seconds, 3),
                "vendor_ended": self._attempts.all_ended,
                "providers": ",".join(self.providers_used)}))
        vendor_error = self._vendor_failure.error if self._vendor_failure else None
        self._finish_close(reason=reason, error=self._end_failure or vendor_error)

    async def _log_quietly(self, record: GenerationRecord) -> None:
        """Log to the generation log without letting a store failure wedge a close."""
        try:
            await self._gate.log(record)
        except Exception as exc:
            logger.error("session %s: could not log %s: %s", self.session_id, record.kind, exc)

    def _finish_close(self, *, reason: str, error: BaseException | None) -> None:
        current = self._current
        if current is not None:
            self._publish(self._metering.usage_event(final=True))
        self._publish(Closed(
            session_id=self.session_id,
            reason=reason,
            provider=current.provider if current else None,
            billed_seconds=self.billed_seconds if current else None,
            vendor_ended=self._attempts.all_ended,
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
        ``end_utterance()`` or ``interrupt()``. During a failover it waits for the switch."""
        if not isinstance(chunk, AudioChunk):
            raise MediaFormatError(f"got {type(chunk).__name__}", field="chunk",
                                   expected="an AudioChunk (AudioChunk.from_pcm16(...))")
        failure: ProviderError | None = None
        async with self._switch_lock:
            current = self._live_attempt("send_audio()")
            utterance = self._sending
            if utterance is None:
                utterance = self._sending = Utterance(id=f"utt_{uuid.uuid4().hex[:16]}")
                self._unfinished[utterance.id] = utterance
            assert self._resampler is not None
            converted = self._resampler.process(chunk)
            if utterance.first_sent_at is None:
                utterance.first_sent_at = time.monotonic()
            utterance.sent_seconds += chunk.duration
            if self._replay_limit_s:
                utterance.keep(chunk, self._replay_limit_s)
            if converted.num_frames:
                try:
                    await current.vendor.send_audio(converted, utterance_id=utterance.id)
                except ProviderError as exc:
                    failure = exc
                else:
                    self._failover.send_failures = 0
        if failure is not None:
            await self._after_send_failure(current, utterance, chunk, failure)

    async def _after_send_failure(self, attempt: VendorAttempt, utterance: Utterance,
                                  chunk: AudioChunk, error: ProviderError) -> None:
        """A send to ``attempt`` failed. If the session moves (or already moved) to another
        provider, the chunk is part of the replay and nothing is lost; otherwise it is
        dropped from the replay buffer and the error raised."""
        failover = self._failover
        task = failover.task
        if self._current is attempt and (task is None or task.done()):
            failover.send_failures += 1
            limit = self._services.session_defaults.failover_after_send_failures
            if self._rules.failover and failover.send_failures >= limit:
                task = self._start_failover(
                    attempt, f"{failover.send_failures} consecutive send failures", error)
        if task is not None and not task.done():
            await asyncio.shield(task)
        if self._current is not attempt and self._state is SessionState.LIVE:
            return  # switched: the replay carried this chunk
        utterance.forget_last(chunk)
        raise error

    async def end_utterance(self) -> None:
        """Mark the end of the current utterance; the avatar finishes speaking it."""
        async with self._switch_lock:
            vendor = self._live_attempt("end_utterance()").vendor
            utterance, self._sending = self._sending, None
            if utterance is None:
                return
            assert self._resampler is not None
            tail = self._resampler.flush()
            utterance.send_finished = True
            if tail.num_frames:
                await vendor.send_audio(tail, utterance_id=utterance.id)
            await vendor.end_utterance(utterance_id=utterance.id)

    async def interrupt(self) -> float:
        """Stop the avatar now and drop unplayed audio. Returns the playback position (seconds
        into the interrupted utterance). Waits at most ``interrupt_ack_timeout`` for the
        vendor's acknowledgement, then returns an estimate: it never hangs."""
        # No switch lock: an interrupt must not wait out a failover. The target leaves the
        # replay set at once, so a switch in progress does not replay it.
        attempt = self._live_attempt("interrupt()")
        vendor = attempt.vendor
        if not attempt.profile.capabilities.interrupt:
            raise CapabilityError(f"{attempt.provider} cannot interrupt speech (a policy with "
                                  "require = [\"interrupt\"] routes around it)")
        now = time.monotonic()
        target = self._sending or self._latest_unfinished()
        self._sending = None
        if self._resampler is not None:
            self._resampler.reset()
        if target is None:
            return 0.0
        self._unfinished.pop(target.id, None)
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
        except asyncio.CancelledError:
            if self._ack is not ack or not ack.cancelled():
                raise
            # a failover or close cancelled the wait: report our estimate
        except ProviderError as exc:
            logger.warning("session %s: interrupt not delivered: %s", self.session_id, exc)
        finally:
            self._ack = self._ack_target = None
        if acknowledged is not None and acknowledged.duration is not None:
            position = target.offset + acknowledged.duration
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

    def _live_attempt(self, what: str) -> VendorAttempt:
        current = self._current
        if current is not None and self._vendor_failure is not None:
            # The vendor side died: say so with its typed error, not just "closed".
            failure = self._vendor_failure
            raise failure.error or ProviderConnectionError(
                f"the vendor session ended: {failure.reason}", provider=current.provider
            )
        if self._state is not SessionState.LIVE or current is None:
            raise SessionStateError(f"{what} needs a live session; this one is {self._state}")
        return current

    def _live_vendor(self, what: str) -> ProviderSession:
        return self._live_attempt(what).vendor

    def _latest_unfinished(self) -> Utterance | None:
        return next(reversed(self._unfinished.values()), None)

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
                current = self._current
                logger.warning("session %s: %s session ended on the vendor side: %s",
                               self.session_id, vendor.provider, signal.reason)
                if (signal.recoverable and self._rules.failover and current is not None
                        and current.vendor is vendor and self._state is SessionState.LIVE):
                    self._start_failover(current, signal.reason, signal.error)
                    return
                self._vendor_failure = signal
                self._close_soon(f"vendor: {signal.reason}")
                return

    def _on_playback_finished(self, vendor: ProviderSession, signal: PlaybackFinished) -> None:
        utterance_id = signal.utterance_id
        if utterance_id is None:  # vendor did not say which: the oldest one playing
            utterance_id = next(iter(self._unfinished), None)
        if utterance_id is not None:
            utterance = self._unfinished.get(utterance_id)
            if utterance is not None and (utterance.send_finished or signal.interrupted):
                del self._unfinished[utterance_id]
            duration = signal.duration
            if duration is not None and utterance is not None:
                duration += utterance.offset
            self._publish(SpeechEnded(session_id=self.session_id, utterance_id=utterance_id,
                                      provider=vendor.provider, duration=duration,
                                      interrupted=signal.interrupted))
        if self._ack is not None and not self._ack.done() and (
            signal.interrupted or utterance_id == self._ack_target
        ):
            self._ack.set_result(signal)


def _end_error(vendor: ProviderSession, exc: BaseException) -> AvatarKitError:
    if isinstance(exc, ProviderError):
        return exc
    return ProviderConnectionError(
        f"could not confirm the end of session {vendor.vendor_session_id} in time",
        provider=vendor.provider,
    )
