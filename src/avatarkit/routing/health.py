"""Per-provider health: latency and error EWMAs, cooldowns with back-off, recovery probes.

The router needs two things from live traffic: which providers to keep away from right now
(a hard constraint) and how fast each one really is (observed first-frame latency replaces
the declared figure). :class:`HealthMonitor` keeps both, per provider, from the outcomes the
session layer reports with :meth:`HealthMonitor.record_success` and
:meth:`HealthMonitor.record_failure`.

It follows LiteLLM Router's cooldowns (N failures inside a window take a deployment out for
a while; a 429 does so at once) with two differences that users asked for or that bit
others:

* the state is inspectable: :meth:`HealthMonitor.snapshot` says who is out, why and until
  when, and the exclusion text lands in every ``RouteDecision``;
* recovery is active: LiveKit's FallbackAdapter never re-probes a failed provider, so one
  transient outage pins all traffic on the fallback for the life of the process. Here a
  cooldown always ends, and :meth:`HealthMonitor.run_probes` checks a provider whose
  cooldown ended before real sessions depend on it.

States, computed from the clock rather than stored, so that nothing has to wake up when a
cooldown ends::

    healthy --(threshold failures in window | 429)--> cooling_down   (now < cooldown_until)
    cooling_down --(time passes)--> probing                          (now >= cooldown_until)
    probing --(a success: traffic or probe)--> healthy               (cooldowns reset to 0)
    probing --(any failure: traffic or probe)--> cooling_down        (length doubled)

A provider that is ``probing`` is allowed to take traffic (half-open): without active probes
the first real request is the probe. The n-th cooldown in a row lasts
``cooldown_s * 2**(n-1)``, capped at ``max_cooldown_s``.

The monitor is meant for one event loop (no locks): every method except the probe coroutines
is synchronous and cheap, because the router calls :meth:`HealthMonitor.exclusion` and
:meth:`HealthMonitor.observed_latency_ms` on every routing decision.

    [health]
    failure_threshold = 3
    failure_window_s = 60
    cooldown_s = 30
    max_cooldown_s = 300
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import ConfigError, ErrorCategory, ProviderError, RateLimitError

if TYPE_CHECKING:  # the router pulls in providers and the catalog; config imports this module
    from ..contract import ProviderProfile

__all__ = ["HealthConstraint", "HealthMonitor", "HealthSettings", "HealthState",
           "ProviderHealth"]

logger = logging.getLogger("avatarkit.health")

HealthState = Literal["healthy", "cooling_down", "probing"]

#: error texts are kept for the exclusion reason and the snapshot; a vendor's HTML error
#: page must not end up in every RouteDecision
_MAX_ERROR_TEXT = 300


class HealthSettings(BaseModel):
    """The ``[health]`` config section: how failures turn into cooldowns and how they end."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ewma_alpha: float = Field(
        default=0.3, gt=0, le=1, description="Weight of the newest sample in the latency and "
        "error-rate EWMAs (1 = only the last sample counts).")
    failure_threshold: int = Field(
        default=3, ge=1, description="Failures inside the window that start a cooldown.")
    failure_window_s: float = Field(default=60, gt=0)
    cooldown_s: float = Field(default=30, gt=0, description="Length of the first cooldown; "
                              "each further one in a row doubles it.")
    max_cooldown_s: float = Field(
        default=300, gt=0, description="Cap on any cooldown, a vendor's Retry-After included, "
        "so that no provider is pinned out for long by one bad answer.")
    probe: bool = Field(default=True, description="Actively probe providers whose cooldown "
                        "ended (run_probes); off, the next real request is the probe.")
    probe_interval_s: float = Field(
        default=5, gt=0, description="How often the probe loop looks for ended cooldowns.")
    probe_timeout_s: float = Field(default=5, gt=0)

    @model_validator(mode="after")
    def _coherent(self) -> HealthSettings:
        if self.max_cooldown_s < self.cooldown_s:
            raise ValueError(f"max_cooldown_s ({self.max_cooldown_s:g}) must be >= "
                             f"cooldown_s ({self.cooldown_s:g})")
        return self


class ProviderHealth(BaseModel):
    """A point-in-time view of one provider's health (who, why, until when)."""

    model_config = ConfigDict(frozen=True)

    provider: str
    state: HealthState
    latency_ewma_ms: float | None = Field(description="None until the first latency sample.")
    latency_samples: int
    error_rate: float = Field(description="EWMA of outcomes: 1.0 failure, 0.0 success.")
    successes: int
    failures: int
    recent_failures: int = Field(description="Failures inside the current window.")
    cooldown_until: datetime | None = Field(
        description="UTC wall clock; in the past while probing, None when healthy.")
    cooldowns: int = Field(description="Cooldowns in a row; reset by a recovery.")
    last_error: str | None
    last_error_category: str | None
    last_probe_at: datetime | None


class _Health:
    """Mutable per-provider state. Slots: one of these is touched on every request."""

    __slots__ = ("cause", "cooldown_until", "cooldown_until_wall", "cooldowns", "error_rate",
                 "failure_times", "failures", "last_error", "last_error_category",
                 "last_probe_at", "latency_ewma", "latency_samples", "probed_until",
                 "probing_now", "successes")

    def __init__(self) -> None:
        self.latency_ewma: float | None = None
        self.latency_samples = 0
        self.error_rate = 0.0
        self.successes = 0
        self.failures = 0
        #: monotonic times of failures inside the window, oldest first
        self.failure_times: deque[float] = deque()
        #: monotonic end of the current (or just ended) cooldown; None when healthy
        self.cooldown_until: float | None = None
        self.cooldown_until_wall: float | None = None
        self.cooldowns = 0
        #: what started the current cooldown, for the exclusion reason
        self.cause = ""
        self.last_error: str | None = None
        self.last_error_category: ErrorCategory | None = None
        self.last_probe_at: float | None = None
        #: the cooldown_until a probe was already started for (one probe per cooldown)
        self.probed_until: float | None = None
        self.probing_now = False


class HealthConstraint:
    """A :class:`~avatarkit.routing.router.RouteConstraint` that excludes providers in
    cooldown. It asks the monitor at routing time, so one instance serves every route."""

    __slots__ = ("_monitor",)

    name: str = "health"

    def __init__(self, monitor: HealthMonitor) -> None:
        self._monitor = monitor

    def exclusion(self, provider: str, profile: ProviderProfile,
                  avatar_id: str) -> str | None:
        """Health does not depend on the avatar or the profile, only on the provider."""
        return self._monitor.exclusion(provider)


class HealthMonitor:
    """Tracks each provider's outcomes and decides which are cooling down.

    ``clock`` is monotonic (cooldowns and windows must not jump with NTP); ``wall`` is only
    used for the UTC datetimes in :class:`ProviderHealth`. Both are injectable for tests.
    """

    def __init__(
        self,
        settings: HealthSettings,
        providers: Iterable[str],
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._wall = wall
        self._health: dict[str, _Health] = {}
        #: provider -> latency EWMA, only providers with samples; kept up to date on every
        #: sample so that observed_latency_ms() is one dict copy
        self._latency: dict[str, float] = {}
        for name in providers:
            self.add_provider(name)

    # -- membership ----------------------------------------------------------------------------

    def add_provider(self, name: str) -> None:
        """Start tracking ``name`` (healthy, no samples). Idempotent: existing state is kept."""
        if name not in self._health:
            self._health[name] = _Health()

    def _get(self, provider: str) -> _Health:
        try:
            return self._health[provider]
        except KeyError:
            known = ", ".join(sorted(self._health)) or "none are tracked"
            raise ConfigError(f"unknown provider {provider!r} (known: {known})",
                              field="provider") from None

    # -- outcomes ------------------------------------------------------------------------------

    def record_success(self, provider: str, *, latency_ms: float | None = None) -> None:
        """A call to ``provider`` succeeded; ``latency_ms`` (first frame) feeds the latency
        EWMA. A success while probing ends the cooldown streak: the provider is healthy."""
        h = self._get(provider)
        alpha = self.settings.ewma_alpha
        if latency_ms is not None:
            if not math.isfinite(latency_ms) or latency_ms < 0:
                # one NaN would poison the EWMA, and with it latency routing, for good
                raise ValueError(f"latency_ms must be a finite number >= 0, not {latency_ms!r}")
            h.latency_ewma = (latency_ms if h.latency_ewma is None
                              else alpha * latency_ms + (1 - alpha) * h.latency_ewma)
            h.latency_samples += 1
            self._latency[provider] = h.latency_ewma
        h.error_rate = (1 - alpha) * h.error_rate
        h.successes += 1
        # A success that started before the cooldown (a session that was already running)
        # says nothing about the provider now, so only a half-open success recovers it.
        if h.cooldown_until is not None and self._clock() >= h.cooldown_until:
            h.cooldown_until = h.cooldown_until_wall = None
            h.cooldowns = 0
            h.cause = ""
            h.failure_times.clear()
            logger.info("provider %s recovered", provider)

    def record_failure(self, provider: str, error: BaseException) -> None:
        """A call to ``provider`` failed with ``error``.

        Policy refusals (consent, residency, budget) are ours, not the vendor's: they are
        ignored entirely. A 429 starts a cooldown at once; other failures count towards the
        threshold inside the window. Any failure while probing starts the next, longer
        cooldown.
        """
        h = self._get(provider)
        category = getattr(error, "category", None)
        if not isinstance(category, ErrorCategory):
            category = ErrorCategory.CONNECTIVITY
        if category is ErrorCategory.POLICY:
            return
        retry_after = error.retry_after if isinstance(error, RateLimitError) else None
        self._failure(provider, h, category, _error_text(error),
                      rate_limited=isinstance(error, RateLimitError), retry_after=retry_after)

    def _failure(self, provider: str, h: _Health, category: ErrorCategory, text: str, *,
                 rate_limited: bool = False, retry_after: float | None = None,
                 cause: str | None = None) -> None:
        s = self.settings
        now = self._clock()
        h.error_rate = s.ewma_alpha + (1 - s.ewma_alpha) * h.error_rate
        h.failures += 1
        h.last_error = text
        h.last_error_category = category
        state = self._state(h, now)
        if state == "cooling_down":
            # Late failures of requests started before the cooldown are stale evidence: they
            # neither lengthen the streak nor fill the next window. Only a vendor that says
            # "not before" moves the end of the cooldown, and only later.
            if rate_limited and retry_after:
                until = now + min(retry_after, s.max_cooldown_s)
                if h.cooldown_until is not None and until > h.cooldown_until:
                    self._extend(h, until - h.cooldown_until)
            return
        if rate_limited:
            self._enter_cooldown(provider, h, now, retry_after, cause or (
                f"rate limiting (retry after {retry_after:g} s)" if retry_after
                else "rate limiting"))
            return
        if state == "probing":
            self._enter_cooldown(provider, h, now, None, cause or "a failure while probing")
            return
        window = h.failure_times
        window.append(now)
        horizon = now - s.failure_window_s
        while window and window[0] <= horizon:
            window.popleft()
        if len(window) >= s.failure_threshold:
            self._enter_cooldown(provider, h, now, None,
                                 f"{len(window)} failures in {s.failure_window_s:g} s")

    def _enter_cooldown(self, provider: str, h: _Health, now: float,
                        retry_after: float | None, cause: str) -> None:
        s = self.settings
        h.cooldowns += 1
        length = min(s.cooldown_s * 2.0 ** (h.cooldowns - 1), s.max_cooldown_s)
        if retry_after:
            length = max(length, min(retry_after, s.max_cooldown_s))
        h.cooldown_until = now + length
        h.cooldown_until_wall = self._wall() + length
        h.cause = cause
        h.failure_times.clear()
        logger.warning("provider %s cooling down for %.1f s after %s (cooldown %d in a row; "
                    "last: %s)", provider, length, cause, h.cooldowns, h.last_error)

    @staticmethod
    def _extend(h: _Health, seconds: float) -> None:
        if h.cooldown_until is not None and h.cooldown_until_wall is not None:
            h.cooldown_until += seconds
            h.cooldown_until_wall += seconds

    # -- what the router asks ------------------------------------------------------------------

    @staticmethod
    def _state(h: _Health, now: float) -> HealthState:
        if h.cooldown_until is None:
            return "healthy"
        return "cooling_down" if now < h.cooldown_until else "probing"

    def exclusion(self, provider: str) -> str | None:
        """Why ``provider`` must not take traffic now, or None. Unknown providers are not
        this monitor's business (None): other constraints decide about them."""
        h = self._health.get(provider)
        if h is None or h.cooldown_until is None:
            return None
        remaining = h.cooldown_until - self._clock()
        if remaining <= 0:
            return None
        streak = f", cooldown {h.cooldowns} in a row" if h.cooldowns > 1 else ""
        last = f" (last: {h.last_error})" if h.last_error else ""
        return f"cooling down for {remaining:.1f} s more after {h.cause}{streak}{last}"

    def observed_latency_ms(self) -> dict[str, float]:
        """Latency EWMA per provider that has samples: the router's ``observed_latency_ms``.
        A copy, so a caller cannot corrupt the monitor's state."""
        return dict(self._latency)

    def constraint(self) -> HealthConstraint:
        """A route constraint (``excluded_by="health"``) backed by this monitor."""
        return HealthConstraint(self)

    def state(self, provider: str) -> HealthState:
        """The provider's state now (cheaper than :meth:`health`)."""
        return self._state(self._get(provider), self._clock())

    # -- inspection ----------------------------------------------------------------------------

    def health(self, provider: str) -> ProviderHealth:
        """A snapshot of one provider. Unknown providers raise ``ConfigError``."""
        h = self._get(provider)
        now = self._clock()
        horizon = now - self.settings.failure_window_s
        return ProviderHealth(
            provider=provider,
            state=self._state(h, now),
            latency_ewma_ms=h.latency_ewma,
            latency_samples=h.latency_samples,
            error_rate=h.error_rate,
            successes=h.successes,
            failures=h.failures,
            recent_failures=sum(1 for t in h.failure_times if t > horizon),
            cooldown_until=_utc(h.cooldown_until_wall),
            cooldowns=h.cooldowns,
            last_error=h.last_error,
            last_error_category=(str(h.last_error_category)
                                 if h.last_error_category is not None else None),
            last_probe_at=_utc(h.last_probe_at),
        )

    def snapshot(self) -> dict[str, ProviderHealth]:
        """Every tracked provider's health, in the order they were added."""
        return {name: self.health(name) for name in self._health}

    # -- active recovery -----------------------------------------------------------------------

    async def probe_due(self, probe: Callable[[str], Awaitable[None]]) -> dict[str, bool]:
        """Probe, concurrently, each provider whose cooldown has ended and that has not been
        probed since; return provider -> whether its probe passed.

        A probe that returns recovers the provider; one that raises or outlives
        ``probe_timeout_s`` starts the next (doubled) cooldown. A provider whose probe is
        still running is skipped, so overlapping callers never probe it twice.
        """
        now = self._clock()
        due = [name for name, h in self._health.items()
               if h.cooldown_until is not None and now >= h.cooldown_until
               and not h.probing_now and h.probed_until != h.cooldown_until]
        if not due:
            return {}
        # Claimed before the first await, so that a round started while these probes run
        # sees them as taken (the probe tasks themselves start later).
        wall = self._wall()
        for name in due:
            h = self._health[name]
            h.probing_now = True
            h.probed_until = h.cooldown_until
            h.last_probe_at = wall
        try:
            results = await asyncio.gather(*(self._probe_one(name, probe) for name in due))
        finally:
            for name in due:
                h = self._health[name]
                if h.probing_now:
                    # Cancelled before its probe finished (or even started): no verdict, so
                    # release the claim and let a later round probe this cooldown after all.
                    h.probing_now = False
                    h.probed_until = None
        return dict(zip(due, results, strict=True))

    async def _probe_one(self, provider: str, probe: Callable[[str], Awaitable[None]]) -> bool:
        h = self._health[provider]
        timeout = self.settings.probe_timeout_s
        try:
            async with asyncio.timeout(timeout):
                await probe(provider)
        except TimeoutError:
            h.probing_now = False
            # asyncio.timeout turns our own deadline into TimeoutError; a probe that raises
            # TimeoutError itself timed out too, as far as health is concerned
            self._failure(provider, h, ErrorCategory.TIMEOUT,
                          f"probe timed out after {timeout:g} s", cause="a probe timeout")
            logger.warning("probe of %s timed out after %g s", provider, timeout)
            return False
        except Exception as exc:
            h.probing_now = False
            # Any exception counts here, policy-categorised ones included: a probe is ours
            # and carries no request that policy could refuse.
            category = getattr(exc, "category", None)
            self._failure(provider, h, category if isinstance(category, ErrorCategory)
                          else ErrorCategory.CONNECTIVITY, _error_text(exc),
                          cause="a failed probe")
            logger.warning("probe of %s failed: %s", provider, h.last_error)
            return False
        h.probing_now = False
        self.record_success(provider)
        return True

    async def run_probes(self, probe: Callable[[str], Awaitable[None]]) -> None:
        """Probe ended cooldowns every ``probe_interval_s``, forever.

        Run it as a task and cancel it on shutdown; cancellation is the only way out (a
        failing probe is logged, never raised). With ``probe = false`` in the settings it
        returns at once: the next real request is then the probe.
        """
        if not self.settings.probe:
            logger.debug("health probes disabled; cooldowns end on the next request")
            return
        while True:
            await asyncio.sleep(self.settings.probe_interval_s)
            try:
                await self.probe_due(probe)
            except Exception:
                logger.warning("health probe round failed", exc_info=True)


def _error_text(error: BaseException) -> str:
    """``[tavus] 503 boom`` for provider errors (their ``__str__`` names the provider),
    ``TypeName: message`` for anything else."""
    if isinstance(error, ProviderError):
        text = str(error)
    else:
        message = str(error)
        text = f"{type(error).__name__}: {message}" if message else type(error).__name__
    return text if len(text) <= _MAX_ERROR_TEXT else text[:_MAX_ERROR_TEXT - 3] + "..."


def _utc(timestamp: float | None) -> datetime | None:
    return datetime.fromtimestamp(timestamp, tz=UTC) if timestamp is not None else None
