"""Start fallback, health and latency routing, against two Tavus emulators.

``tavus`` and ``tavus-b`` are two configured providers (``tavus-b`` is a section of kind
tavus: a second account), each backed by its own emulator, in that config order.
"""

from __future__ import annotations

import asyncio

import pytest

from avatarkit import (
    AllProvidersFailed,
    AuthenticationError,
    ConsentOutOfScope,
    NoRouteError,
    ServerError,
)
from avatarkit.consent.authority import ConsentAuthority
from avatarkit.emulators import TavusEmulator

from ..conftest import AUDIENCE, CONSENT, KitFactory, creates, eventually, grant_fields

NO_RETRY = {"max_retries": 0, "initial_backoff": 0.01, "max_backoff": 0.01}


async def test_5xx_at_start_falls_back_to_the_next_provider(
        make_pair_kit: KitFactory, tavus_emulator: TavusEmulator,
        tavus_b: TavusEmulator) -> None:
    tavus_emulator.faults.fail_next_creates(10, status=503)
    async with make_pair_kit(a={"retry": NO_RETRY}) as kit:
        async with kit.session("amelia", consent=CONSENT, purpose="support") as s:
            assert s.provider == "tavus-b"
            assert s.providers_used == ["tavus-b"]
            assert tavus_b.open_sessions == 1
        health = kit.health()["tavus"]
        assert health.failures == 1 and health.last_error_category == "server"
        rows = await kit.ledger.rows(session_id=s.session_id)
        assert [(r.attempt, r.provider, r.state) for r in rows] == [
            (1, "tavus", "failed"), (2, "tavus-b", "ended")]
    assert tavus_emulator.open_sessions == 0


async def test_timeout_at_start_falls_back_and_ends_the_late_create(
        make_pair_kit: KitFactory, tavus_emulator: TavusEmulator) -> None:
    tavus_emulator.faults.slow_next(1, 1.0, route="create")
    async with make_pair_kit(a={"retry": NO_RETRY, "timeout": 0.2}) as kit:
        async with kit.session("amelia", consent=CONSENT, purpose="support") as s:
            assert s.provider == "tavus-b"
        assert kit.health()["tavus"].last_error_category == "timeout"
        # The create timed out here but completes at the vendor a moment later: the kit
        # finds it by the session's name and ends it (no leaked billing).
        async with asyncio.timeout(10):
            while True:
                rows = await kit.ledger.rows(session_id=s.session_id, provider="tavus")
                if rows and rows[0].terminal:
                    break
                await asyncio.sleep(0.1)
        assert rows[0].state == "ended" and rows[0].vendor_session_id is not None
        assert "create timed out" in (rows[0].end_reason or "")
    assert tavus_emulator.open_sessions == 0
    assert len(tavus_emulator.conversations) == 1


async def test_401_never_falls_over(make_pair_kit: KitFactory, tavus_b: TavusEmulator) -> None:
    async with make_pair_kit(a={"api_key": "wrong-key"}) as kit:
        with pytest.raises(AuthenticationError) as caught:
            await kit.session("amelia", consent=CONSENT, purpose="support").start()
    assert caught.value.provider == "tavus"
    assert creates(tavus_b) == 0


async def test_policy_without_fallback_raises_the_first_failure(
        make_pair_kit: KitFactory, tavus_emulator: TavusEmulator,
        tavus_b: TavusEmulator) -> None:
    tavus_emulator.faults.fail_next_creates(10, status=502)
    kit = make_pair_kit(a={"retry": NO_RETRY},
                        policies={"pinned": {"objective": "config-order", "fallback": False}})
    async with kit:
        with pytest.raises(ServerError):
            await kit.session("amelia", consent=CONSENT, purpose="support",
                              policy="pinned").start()
    assert creates(tavus_b) == 0


async def test_consent_excluded_provider_is_never_a_fallback(
        make_pair_kit: KitFactory, tavus_emulator: TavusEmulator, tavus_b: TavusEmulator,
        consent_authority: ConsentAuthority) -> None:
    # Both sections are Tavus, so a grant naming the vendor covers both; one limited to
    # the EU excludes tavus-b, which renders in the US.
    _, token = await consent_authority.grant(audience=AUDIENCE, **grant_fields(regions=["eu"]))
    tavus_emulator.faults.fail_next_creates(10, status=503)
    kit = make_pair_kit(a={"retry": NO_RETRY, "regions": ["eu"]}, b={"regions": ["us"]})
    async with kit:
        with pytest.raises(ServerError):
            await kit.session("amelia", consent=token, purpose="support").start()
    assert creates(tavus_b) == 0


async def test_consent_excluding_every_provider_is_a_consent_refusal(
        make_pair_kit: KitFactory, tavus_emulator: TavusEmulator,
        consent_authority: ConsentAuthority) -> None:
    _, token = await consent_authority.grant(audience=AUDIENCE, **grant_fields(regions=["eu"]))
    async with make_pair_kit(b={"regions": ["us"]}) as kit:  # tavus: region unknown
        with pytest.raises(ConsentOutOfScope):
            await kit.session("amelia", consent=token, purpose="support").start()
    assert creates(tavus_emulator) == 0


async def test_all_providers_failing_raise_an_exception_group(
        make_pair_kit: KitFactory, tavus_emulator: TavusEmulator,
        tavus_b: TavusEmulator) -> None:
    tavus_emulator.faults.fail_next_creates(10, status=503)
    tavus_b.faults.fail_next_creates(10, status=500)
    async with make_pair_kit(a={"retry": NO_RETRY}, b={"retry": NO_RETRY}) as kit:
        session = kit.session("amelia", consent=CONSENT, purpose="support")
        with pytest.raises(AllProvidersFailed) as caught:
            await session.start()
        events = [e.type async for e in session.events()]
    error = caught.value
    assert error.providers == ["tavus", "tavus-b"]
    assert [e.status for e in error.exceptions if isinstance(e, ServerError)] == [503, 500]
    assert events == ["closed"]
    # except* works on it, as on any ExceptionGroup
    try:
        raise error
    except* ServerError as group:
        assert len(group.exceptions) == 2


async def test_latency_routing_follows_the_observed_ewma(
        make_pair_kit: KitFactory, tavus_emulator: TavusEmulator) -> None:
    kit = make_pair_kit(
        a={"first_frame_latency_ms": 100}, b={"first_frame_latency_ms": 400},
        policies={"fast": {"objective": "weighted", "weights": {"latency": 1, "price": 0}}})
    async with kit:
        assert kit.route("amelia", policy="fast").chosen == "tavus"  # declared 100 < 400
        tavus_emulator.faults.slow_next(1, 0.6, route="create")
        async with kit.session("amelia", consent=CONSENT, purpose="support",
                               policy="fast") as s:
            assert s.provider == "tavus"
        observed = kit.health()["tavus"].latency_ewma_ms
        assert observed is not None and observed >= 600
        decision = kit.route("amelia", policy="fast")
        by_name = {c.provider: c for c in decision.candidates}
        assert by_name["tavus"].inputs is not None
        assert by_name["tavus"].inputs["latency_source"] == "observed"
        assert decision.chosen == "tavus-b"
        async with kit.session("amelia", consent=CONSENT, purpose="support",
                               policy="fast") as s:
            assert s.provider == "tavus-b"


async def test_cooldown_excludes_a_failing_provider_and_a_probe_recovers_it(
        make_pair_kit: KitFactory, tavus_emulator: TavusEmulator,
        tavus_b: TavusEmulator) -> None:
    kit = make_pair_kit(a={"retry": NO_RETRY},
                        health={"failure_threshold": 2, "cooldown_s": 0.5,
                                "probe_interval_s": 0.05})
    tavus_emulator.faults.fail_next_creates(2, status=503)
    async with kit:
        for _ in range(2):  # two failures in the window: tavus cools down
            async with kit.session("amelia", consent=CONSENT, purpose="support") as s:
                assert s.provider == "tavus-b"
        assert kit.health()["tavus"].state == "cooling_down"
        decision = kit.route("amelia")
        excluded = next(c for c in decision.candidates if c.provider == "tavus")
        assert excluded.excluded_by == "health" and "cooling down" in (excluded.reason or "")
        before = creates(tavus_emulator)
        async with kit.session("amelia", consent=CONSENT, purpose="support") as s:
            assert s.provider == "tavus-b"  # not even tried while cooling down
        assert creates(tavus_emulator) == before
        # the cooldown ends, the background probe (an unbilled list call) succeeds
        await eventually(lambda: kit.health()["tavus"].state == "healthy")
        assert any(r.method == "GET" and r.path == "/v2/conversations"
                   for r in tavus_emulator.requests)
        async with kit.session("amelia", consent=CONSENT, purpose="support") as s:
            assert s.provider == "tavus"


async def test_a_failed_probe_extends_the_cooldown(
        make_pair_kit: KitFactory, tavus_emulator: TavusEmulator) -> None:
    kit = make_pair_kit(a={"retry": NO_RETRY},
                        health={"failure_threshold": 1, "cooldown_s": 0.2,
                                "probe_interval_s": 0.05})
    tavus_emulator.faults.fail_next_creates(1, status=503)
    tavus_emulator.faults.rate_limit_next(1, retry_after=None, route="any")  # the probe
    async with kit:
        async with kit.session("amelia", consent=CONSENT, purpose="support") as s:
            assert s.provider == "tavus-b"
        await eventually(lambda: kit.health()["tavus"].cooldowns >= 2)
        assert kit.health()["tavus"].state == "cooling_down"
        await eventually(lambda: kit.health()["tavus"].state == "healthy")



async def test_residency_fails_closed_on_an_unknown_region(
        make_pair_kit: KitFactory, tavus_emulator: TavusEmulator,
        tavus_b: TavusEmulator) -> None:
    kit = make_pair_kit(b={"regions": ["eu"]},  # tavus: region unknown
                        policies={"eu": {"residency": ["eu"]}})
    async with kit:
        async with kit.session("amelia", consent=CONSENT, purpose="support", policy="eu") as s:
            assert s.provider == "tavus-b"
            excluded = next(c for c in s.route.candidates if c.provider == "tavus")
            assert excluded.excluded_by == "residency" and "unknown" in (excluded.reason or "")
        kit_none = make_pair_kit(policies={"eu": {"residency": ["eu"]}})  # both unknown
        async with kit_none:
            with pytest.raises(NoRouteError):
                await kit_none.session("amelia", consent=CONSENT, purpose="support",
                                       policy="eu").start()
    assert creates(tavus_emulator) == 0


async def test_price_cap_excludes_an_unknown_price(
        make_pair_kit: KitFactory, tavus_emulator: TavusEmulator) -> None:
    kit = make_pair_kit(a={"price_per_minute": None}, b={"price_per_minute": "0.40"},
                        policies={"cheap": {"max_price_per_minute": "0.50"}})
    async with kit, kit.session("amelia", consent=CONSENT, purpose="support",
                           policy="cheap") as s:
        assert s.provider == "tavus-b"
        excluded = next(c for c in s.route.candidates if c.provider == "tavus")
        assert excluded.excluded_by == "max_price_per_minute"
        assert "unknown" in (excluded.reason or "")
    assert creates(tavus_emulator) == 0

