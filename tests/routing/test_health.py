"""Provider health: EWMAs, cooldowns that back off and always end, and recovery probes.

Time is an injected clock (no sleeping), except for the run_probes loop, which runs with a
10 ms interval.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from pydantic import ValidationError

from avatarkit.catalog import Avatar
from avatarkit.contract import Capabilities, ProviderProfile, ProviderSettings
from avatarkit.errors import (
    ConfigError,
    ConsentCheck,
    ConsentRequired,
    ErrorCategory,
    InvalidRequestError,
    ProviderConnectionError,
    RateLimitError,
    ServerError,
)
from avatarkit.media import AudioFormat
from avatarkit.routing.health import (
    HealthMonitor,
    HealthSettings,
    ProviderHealth,
)
from avatarkit.routing.router import RouteConstraint, Router

WALL0 = 1_700_000_000.0


class Clock:
    """A monotonic clock the test moves by hand; ``wall`` is the same time, offset."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def wall(self) -> float:
        return WALL0 + self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


def monitor(clock: Clock, providers: tuple[str, ...] = ("tavus", "simli"),
            **settings: float | int | bool) -> HealthMonitor:
    return HealthMonitor(HealthSettings.model_validate(settings), providers,
                         clock=clock, wall=clock.wall)


def boom(status: int = 503) -> ServerError:
    return ServerError("boom", provider="tavus", status=status)


def fail(m: HealthMonitor, times: int, provider: str = "tavus") -> None:
    for _ in range(times):
        m.record_failure(provider, boom())


def remaining(m: HealthMonitor, clock: Clock, provider: str = "tavus") -> float:
    until = m.health(provider).cooldown_until
    assert until is not None
    return until.timestamp() - clock.wall()


# -- settings -------------------------------------------------------------------------------


def test_settings_defaults_and_validation() -> None:
    s = HealthSettings()
    assert (s.ewma_alpha, s.failure_threshold, s.failure_window_s, s.cooldown_s,
            s.max_cooldown_s, s.probe, s.probe_interval_s, s.probe_timeout_s) == (
        0.3, 3, 60, 30, 300, True, 5, 5)
    with pytest.raises(ValidationError, match="max_cooldown_s"):
        HealthSettings(cooldown_s=60, max_cooldown_s=30)
    for bad in ({"ewma_alpha": 0}, {"ewma_alpha": 1.5}, {"failure_threshold": 0},
                {"failure_window_s": 0}, {"cooldown_s": -1}, {"probe_interval_s": 0},
                {"probe_timeout_s": 0}, {"cooldwn_s": 5}):
        with pytest.raises(ValidationError):
            HealthSettings.model_validate(bad)
    assert HealthSettings(ewma_alpha=1, cooldown_s=10, max_cooldown_s=10).max_cooldown_s == 10


def test_settings_are_frozen() -> None:
    with pytest.raises(ValidationError):
        HealthSettings().cooldown_s = 1  # type: ignore[misc]


# -- EWMAs --------------------------------------------------------------------------------------


def test_latency_ewma_first_sample_sets_then_blends(clock: Clock) -> None:
    m = monitor(clock, ewma_alpha=0.5)
    assert m.observed_latency_ms() == {}
    assert m.health("tavus").latency_ewma_ms is None
    m.record_success("tavus", latency_ms=100)
    assert m.observed_latency_ms() == {"tavus": 100.0}
    m.record_success("tavus", latency_ms=200)
    assert m.observed_latency_ms() == {"tavus": 150.0}
    m.record_success("tavus", latency_ms=250)
    assert m.observed_latency_ms() == {"tavus": 200.0}
    m.record_success("tavus")  # no latency: no sample
    h = m.health("tavus")
    assert h.latency_ewma_ms == 200.0 and h.latency_samples == 3 and h.successes == 4


def test_observed_latency_only_lists_sampled_providers_and_is_a_copy(clock: Clock) -> None:
    m = monitor(clock)
    m.record_success("simli", latency_ms=700)
    observed = m.observed_latency_ms()
    assert observed == {"simli": 700.0}
    observed["tavus"] = 1.0
    assert m.observed_latency_ms() == {"simli": 700.0}


def test_latency_must_be_finite_and_non_negative(clock: Clock) -> None:
    m = monitor(clock)
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="latency_ms"):
            m.record_success("tavus", latency_ms=bad)
    assert m.observed_latency_ms() == {}


def test_error_rate_ewma(clock: Clock) -> None:
    m = monitor(clock, ewma_alpha=0.5, failure_threshold=10)
    assert m.health("tavus").error_rate == 0.0
    m.record_failure("tavus", boom())
    assert m.health("tavus").error_rate == 0.5
    m.record_failure("tavus", boom())
    assert m.health("tavus").error_rate == 0.75
    m.record_success("tavus")
    assert m.health("tavus").error_rate == 0.375
    h = m.health("tavus")
    assert (h.successes, h.failures) == (1, 2)


# -- cooldowns ----------------------------------------------------------------------------------


def test_threshold_within_window_enters_cooldown(clock: Clock) -> None:
    m = monitor(clock)
    fail(m, 2)
    assert m.health("tavus").state == "healthy" and m.exclusion("tavus") is None
    assert m.health("tavus").recent_failures == 2
    clock.advance(10)
    fail(m, 1)
    h = m.health("tavus")
    assert h.state == "cooling_down" and h.cooldowns == 1
    assert h.recent_failures == 0  # entering cooldown clears the window
    assert remaining(m, clock) == pytest.approx(30)
    assert m.health("simli").state == "healthy"


def test_failures_outside_the_window_do_not_count(clock: Clock) -> None:
    m = monitor(clock, failure_window_s=60)
    fail(m, 2)
    clock.advance(60)
    fail(m, 1)
    h = m.health("tavus")
    assert h.state == "healthy" and h.recent_failures == 1 and h.failures == 3
    clock.advance(30)
    fail(m, 1)
    assert m.health("tavus").state == "healthy"
    fail(m, 1)
    assert m.health("tavus").state == "cooling_down"


def test_recent_failures_in_snapshot_ages_out(clock: Clock) -> None:
    m = monitor(clock)
    fail(m, 2)
    clock.advance(61)
    assert m.health("tavus").recent_failures == 0


def test_cooldown_elapses_to_probing_which_takes_traffic(clock: Clock) -> None:
    m = monitor(clock)
    fail(m, 3)
    clock.advance(29.9)
    assert m.health("tavus").state == "cooling_down" and m.exclusion("tavus") is not None
    clock.advance(0.1)
    h = m.health("tavus")
    assert h.state == "probing" and m.exclusion("tavus") is None
    assert h.cooldown_until is not None and h.cooldowns == 1
    m.record_success("tavus", latency_ms=800)
    h = m.health("tavus")
    assert h.state == "healthy" and h.cooldown_until is None and h.cooldowns == 0


def test_failure_while_probing_recools_at_once_with_doubled_length(clock: Clock) -> None:
    m = monitor(clock)
    fail(m, 3)
    clock.advance(30)
    fail(m, 1)  # one failure is enough while probing
    h = m.health("tavus")
    assert h.state == "cooling_down" and h.cooldowns == 2
    assert remaining(m, clock) == pytest.approx(60)
    clock.advance(60)
    fail(m, 1)
    assert m.health("tavus").cooldowns == 3 and remaining(m, clock) == pytest.approx(120)


def test_cooldown_is_capped_at_max(clock: Clock) -> None:
    m = monitor(clock, cooldown_s=30, max_cooldown_s=100)
    fail(m, 3)
    lengths = []
    for _ in range(5):
        lengths.append(round(remaining(m, clock), 6))
        clock.advance(lengths[-1])
        fail(m, 1)
    assert lengths == [30, 60, 100, 100, 100]


def test_success_while_probing_resets_the_streak(clock: Clock) -> None:
    m = monitor(clock)
    fail(m, 3)
    clock.advance(30)
    fail(m, 1)
    clock.advance(60)
    m.record_success("tavus")
    assert m.health("tavus").cooldowns == 0
    fail(m, 3)  # the next cooldown starts from cooldown_s again
    assert m.health("tavus").cooldowns == 1 and remaining(m, clock) == pytest.approx(30)


def test_a_late_success_during_cooldown_does_not_end_it(clock: Clock) -> None:
    m = monitor(clock)
    fail(m, 3)
    clock.advance(5)
    m.record_success("tavus")  # a session started before the cooldown finished fine
    assert m.health("tavus").state == "cooling_down"


def test_late_failures_during_cooldown_neither_extend_nor_fill_the_window(clock: Clock) -> None:
    m = monitor(clock)
    fail(m, 3)
    clock.advance(5)
    fail(m, 5)
    h = m.health("tavus")
    assert h.cooldowns == 1 and h.recent_failures == 0 and h.failures == 8
    assert remaining(m, clock) == pytest.approx(25)


def test_rate_limit_cools_down_at_once_for_retry_after(clock: Clock) -> None:
    m = monitor(clock)
    m.record_failure("tavus", RateLimitError("slow", provider="tavus", retry_after=90))
    h = m.health("tavus")
    assert h.state == "cooling_down" and h.cooldowns == 1
    assert h.last_error_category == "rate_limit"
    assert remaining(m, clock) == pytest.approx(90)
    assert "rate limiting (retry after 90 s)" in (m.exclusion("tavus") or "")


def test_rate_limit_without_or_with_short_retry_after_uses_cooldown_s(clock: Clock) -> None:
    m = monitor(clock, providers=("a", "b"))
    m.record_failure("a", RateLimitError("slow", provider="a"))
    m.record_failure("b", RateLimitError("slow", provider="b", retry_after=2))
    assert remaining(m, clock, "a") == pytest.approx(30)
    assert remaining(m, clock, "b") == pytest.approx(30)


def test_retry_after_is_capped_at_max_cooldown(clock: Clock) -> None:
    m = monitor(clock, max_cooldown_s=120)
    m.record_failure("tavus", RateLimitError("slow", provider="tavus", retry_after=3600))
    assert remaining(m, clock) == pytest.approx(120)


def test_rate_limit_during_cooldown_only_extends_it(clock: Clock) -> None:
    m = monitor(clock)
    fail(m, 3)  # 30 s
    clock.advance(10)
    m.record_failure("tavus", RateLimitError("slow", provider="tavus", retry_after=50))
    h = m.health("tavus")
    assert h.cooldowns == 1 and remaining(m, clock) == pytest.approx(50)
    m.record_failure("tavus", RateLimitError("slow", provider="tavus", retry_after=5))
    assert remaining(m, clock) == pytest.approx(50)


def test_policy_errors_are_ignored_entirely(clock: Clock) -> None:
    m = monitor(clock)
    policy = ConsentRequired("no token", check=ConsentCheck.MISSING)
    assert policy.category is ErrorCategory.POLICY
    for _ in range(10):
        m.record_failure("tavus", policy)
    m.record_failure("tavus", InvalidRequestError("bad", provider="tavus", status=400,
                                                  category=ErrorCategory.POLICY))
    h = m.health("tavus")
    assert (h.state, h.failures, h.error_rate, h.last_error) == ("healthy", 0, 0.0, None)


def test_errors_without_a_category_count_as_connectivity(clock: Clock) -> None:
    m = monitor(clock)
    m.record_failure("tavus", OSError("connection refused"))
    h = m.health("tavus")
    assert h.last_error_category == "connectivity"
    assert h.last_error == "OSError: connection refused"
    m.record_failure("tavus", ProviderConnectionError("reset", provider="tavus"))
    assert m.health("tavus").last_error == "[tavus] reset"


# -- what the router sees -------------------------------------------------------------------


def test_exclusion_names_failures_remaining_time_and_last_error(clock: Clock) -> None:
    m = monitor(clock)
    fail(m, 3)
    clock.advance(17.7)
    reason = m.exclusion("tavus")
    assert reason == ("cooling down for 12.3 s more after 3 failures in 60 s "
                      "(last: [tavus] 503 boom)")
    constraint: RouteConstraint = m.constraint()
    assert constraint.name == "health"
    prof = profile("tavus")
    assert constraint.exclusion("tavus", prof, "r_amelia") == reason
    assert constraint.exclusion("simli", prof, "r_amelia") is None
    assert constraint.exclusion("nobody", prof, "r_amelia") is None
    assert m.exclusion("nobody") is None


def test_exclusion_mentions_the_streak_and_the_probe_failure(clock: Clock) -> None:
    m = monitor(clock)
    fail(m, 3)
    clock.advance(30)
    fail(m, 1)
    assert m.exclusion("tavus") == ("cooling down for 60.0 s more after a failure while "
                                    "probing, cooldown 2 in a row (last: [tavus] 503 boom)")


def test_long_error_texts_are_truncated(clock: Clock) -> None:
    m = monitor(clock)
    m.record_failure("tavus", ServerError("<html>" + "x" * 5000, provider="tavus", status=502))
    last = m.health("tavus").last_error
    assert last is not None and len(last) == 300 and last.endswith("...")


def profile(name: str) -> ProviderProfile:
    return ProviderProfile(name=name, capabilities=Capabilities(),
                           audio_format=AudioFormat(24_000), price_per_minute=Decimal("0.1"),
                           regions=frozenset({"eu"}), first_frame_latency_ms=1000)


def test_router_excludes_cooling_providers_and_uses_observed_latency(clock: Clock) -> None:
    names = ("tavus", "simli")
    router = Router({n: ProviderSettings() for n in names}, {n: profile(n) for n in names})
    avatar = Avatar(name="amelia", provider_ids={n: f"id_{n}" for n in names})
    m = monitor(clock)
    m.record_success("simli", latency_ms=640)
    fail(m, 3)
    decision = router.route(avatar, constraints=[m.constraint()],
                            observed_latency_ms=m.observed_latency_ms())
    assert decision.chosen == "simli"
    tavus = next(c for c in decision.candidates if c.provider == "tavus")
    assert tavus.excluded_by == "health" and "3 failures in 60 s" in (tavus.reason or "")
    simli = next(c for c in decision.candidates if c.provider == "simli")
    assert simli.inputs is not None and simli.inputs["first_frame_latency_ms"] == 640.0
    clock.advance(30)
    assert router.route(avatar, constraints=[m.constraint()]).chosen == "tavus"


# -- inspection -------------------------------------------------------------------------------


def test_snapshot_fields(clock: Clock) -> None:
    m = monitor(clock, ewma_alpha=0.5)
    m.record_success("simli", latency_ms=500)
    fail(m, 3)
    snap = m.snapshot()
    assert list(snap) == ["tavus", "simli"]
    assert snap["tavus"] == ProviderHealth(
        provider="tavus", state="cooling_down", latency_ewma_ms=None, latency_samples=0,
        error_rate=0.875, successes=0, failures=3, recent_failures=0,
        cooldown_until=datetime.fromtimestamp(WALL0 + 1030, tz=UTC), cooldowns=1,
        last_error="[tavus] 503 boom", last_error_category="server", last_probe_at=None)
    simli = snap["simli"]
    assert (simli.state, simli.latency_ewma_ms, simli.latency_samples, simli.successes,
            simli.cooldown_until, simli.last_error) == ("healthy", 500.0, 1, 1, None, None)
    assert snap["tavus"].cooldown_until is not None
    assert snap["tavus"].cooldown_until.tzinfo is UTC
    assert m.state("tavus") == "cooling_down"


def test_snapshot_is_immutable(clock: Clock) -> None:
    h = monitor(clock).health("tavus")
    with pytest.raises(ValidationError):
        h.state = "probing"  # type: ignore[misc]


def test_unknown_provider_is_a_config_error(clock: Clock) -> None:
    m = monitor(clock)
    for call in (lambda: m.health("nobody"), lambda: m.record_success("nobody"),
                 lambda: m.record_failure("nobody", boom()), lambda: m.state("nobody")):
        with pytest.raises(ConfigError) as info:
            call()
        assert info.value.field == "provider" and "nobody" in str(info.value)
        assert not isinstance(info.value, KeyError)


def test_add_provider_is_idempotent(clock: Clock) -> None:
    m = monitor(clock, providers=())
    assert m.snapshot() == {}
    m.add_provider("tavus")
    fail(m, 3)
    m.add_provider("tavus")
    assert m.health("tavus").state == "cooling_down"
    assert list(m.snapshot()) == ["tavus"]


# -- probes -------------------------------------------------------------------------------------


async def test_probe_due_recovers_on_success(clock: Clock) -> None:
    m = monitor(clock)
    fail(m, 3)
    probed: list[str] = []

    async def probe(provider: str) -> None:
        probed.append(provider)

    assert await m.probe_due(probe) == {}  # still cooling down: nothing is due
    clock.advance(30)
    assert await m.probe_due(probe) == {"tavus": True}
    assert probed == ["tavus"]
    h = m.health("tavus")
    assert h.state == "healthy" and h.cooldowns == 0 and h.latency_samples == 0
    assert h.last_probe_at == datetime.fromtimestamp(WALL0 + 1030, tz=UTC)
    assert await m.probe_due(probe) == {}  # healthy providers are not probed


async def test_probe_due_failure_recools_doubled(clock: Clock) -> None:
    m = monitor(clock)
    fail(m, 3)
    clock.advance(30)

    async def probe(provider: str) -> None:
        raise ProviderConnectionError("refused", provider=provider)

    assert await m.probe_due(probe) == {"tavus": False}
    h = m.health("tavus")
    assert h.state == "cooling_down" and h.cooldowns == 2 and h.last_error == "[tavus] refused"
    assert remaining(m, clock) == pytest.approx(60)
    assert "after a failed probe" in (m.exclusion("tavus") or "")
    assert await m.probe_due(probe) == {}  # not again until this cooldown ends


async def test_probe_due_timeout_recools(clock: Clock) -> None:
    m = monitor(clock, probe_timeout_s=0.05)
    fail(m, 3)
    clock.advance(30)

    async def probe(provider: str) -> None:
        await asyncio.sleep(10)

    assert await m.probe_due(probe) == {"tavus": False}
    h = m.health("tavus")
    assert h.state == "cooling_down" and h.cooldowns == 2
    assert h.last_error_category == "timeout"
    assert h.last_error == "probe timed out after 0.05 s"


async def test_probe_due_runs_probes_concurrently(clock: Clock) -> None:
    m = monitor(clock, providers=("a", "b", "c"))
    for name in ("a", "b"):
        m.record_failure(name, RateLimitError("slow", provider=name))
    clock.advance(30)
    running = 0
    peak = 0

    async def probe(provider: str) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.01)
        running -= 1
        if provider == "b":
            raise RuntimeError("still down")

    assert await m.probe_due(probe) == {"a": True, "b": False}
    assert peak == 2
    assert m.health("b").last_error == "RuntimeError: still down"


async def test_overlapping_probe_rounds_do_not_probe_twice(clock: Clock) -> None:
    m = monitor(clock)
    fail(m, 3)
    clock.advance(30)
    gate = asyncio.Event()
    calls = 0

    async def probe(provider: str) -> None:
        nonlocal calls
        calls += 1
        await gate.wait()

    first = asyncio.create_task(m.probe_due(probe))
    await asyncio.sleep(0)
    assert await m.probe_due(probe) == {}
    gate.set()
    assert await first == {"tavus": True} and calls == 1


async def test_a_cancelled_probe_round_releases_its_claim(clock: Clock) -> None:
    m = monitor(clock)
    fail(m, 3)
    clock.advance(30)
    gate = asyncio.Event()

    async def stuck(provider: str) -> None:
        await gate.wait()

    for ticks in (0, 1, 3):  # cancelled before the probe starts, and while it runs
        task = asyncio.create_task(m.probe_due(stuck))
        for _ in range(ticks):
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert m.health("tavus").state == "probing"

    async def ok(provider: str) -> None:
        return None

    assert await m.probe_due(ok) == {"tavus": True}


async def test_run_probes_recovers_and_cancels_cleanly(clock: Clock) -> None:
    m = monitor(clock, probe_interval_s=0.01)
    fail(m, 3)
    clock.advance(30)
    failed, recovered = asyncio.Event(), asyncio.Event()
    attempts = 0

    async def probe(provider: str) -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            failed.set()
            raise ServerError("still down", provider=provider, status=503)
        recovered.set()

    task = asyncio.create_task(m.run_probes(probe))
    await asyncio.wait_for(failed.wait(), timeout=2)
    await asyncio.sleep(0.03)  # a few rounds: nothing is due while the re-cooldown runs
    assert attempts == 1 and m.health("tavus").cooldowns == 2
    clock.advance(60)
    await asyncio.wait_for(recovered.wait(), timeout=2)
    await asyncio.sleep(0.03)
    assert m.health("tavus").state == "healthy" and attempts == 2
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()


async def test_run_probes_survives_a_broken_probe_round(clock: Clock,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    m = monitor(clock, probe_interval_s=0.01)
    fail(m, 3)
    clock.advance(30)
    rounds = 0
    original = m.probe_due

    async def broken(probe: object) -> dict[str, bool]:
        nonlocal rounds
        rounds += 1
        raise RuntimeError("bug in a round")

    m.probe_due = broken  # type: ignore[method-assign]

    async def probe(provider: str) -> None:
        return None

    with caplog.at_level("WARNING", logger="avatarkit.health"):
        task = asyncio.create_task(m.run_probes(probe))
        for _ in range(200):
            if rounds >= 3:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert rounds >= 3 and "health probe round failed" in caplog.text
    assert await original(probe) == {"tavus": True}


async def test_run_probes_returns_when_probing_is_off(clock: Clock) -> None:
    m = monitor(clock, probe=False)

    async def probe(provider: str) -> None:
        raise AssertionError("must not be called")

    await asyncio.wait_for(m.run_probes(probe), timeout=1)
