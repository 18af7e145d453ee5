"""Budget caps against the emulators: a session about to cross a cap is ended before it does
(after a warning), and a start that would certainly cross one is refused."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any, TypeVar

import pytest

from avatarkit import BudgetExceeded, BudgetWarning, Closed, ConfigError
from avatarkit.emulators import TavusEmulator

from ..conftest import CONSENT, KitFactory, creates

# 60 per minute: one currency unit per second, so costs read as seconds.
ONE_PER_SECOND = {"price_per_minute": "60"}


def budgets(**caps: Any) -> dict[str, Any]:
    return {"end_margin_s": 0.4, "check_interval_s": 0.1, "warn_at": 0.5, **caps}


async def test_session_cost_cap_ends_the_session_before_the_cap(
        make_pair_kit: KitFactory, tavus_emulator: TavusEmulator) -> None:
    # the vendor is told floor(2.5) = 2 s as its max duration (a backstop); we end it first,
    # end_margin_s before the cap
    kit = make_pair_kit(a=ONE_PER_SECOND,
                        budgets=budgets(session={"max_cost": "2.5"}, end_margin_s=1.0))
    async with kit:
        session = kit.session("amelia", consent=CONSENT, purpose="support")
        async with session as s:
            events = s.events()
            warning = await next_of(events, BudgetWarning, within=3)
            assert warning.cap == "budgets.session.max_cost" and warning.unit == "cost"
            assert warning.limit == Decimal("2.5") and warning.used >= Decimal("1.25")
            closed = await next_of(events, Closed, within=3)
        assert closed.reason == "budget: budgets.session.max_cost"
        (conversation,) = tavus_emulator.conversations.values()
        # what the vendor billed stays under the cap, and so does our own count
        assert conversation.status == "ended"
        assert conversation.billed_seconds * 1.0 <= 2.5
        assert s.cost is not None and s.cost <= Decimal("2.5")
        (row,) = await kit.ledger.rows(session_id=s.session_id)
        assert row.cost is not None and row.cost <= Decimal("2.5")


async def test_the_vendor_is_told_the_cap_as_its_max_duration(
        make_pair_kit: KitFactory, tavus_emulator: TavusEmulator) -> None:
    kit = make_pair_kit(a=ONE_PER_SECOND, budgets=budgets(session={"max_cost": "120"}))
    async with kit, kit.session("amelia", consent=CONSENT, purpose="support"):
        (conversation,) = tavus_emulator.conversations.values()
        assert conversation.properties["max_call_duration"] == 120


async def test_policy_budget_caps_minutes(make_pair_kit: KitFactory) -> None:
    kit = make_pair_kit(budgets=budgets(end_margin_s=0.5),
                        policies={"short": {"objective": "config-order",
                                            "budget": {"max_minutes": "0.05"}}})  # 3 s
    async with kit:
        async with kit.session("amelia", consent=CONSENT, purpose="support",
                               policy="short") as s:
            closed = await next_of(s.events(), Closed, within=3)
        assert closed.reason == "budget: policy.budget.max_minutes"
        assert 2.0 < s.billed_seconds <= 3.0


async def test_spent_tenant_budget_refuses_the_next_start(
        make_pair_kit: KitFactory, tavus_emulator: TavusEmulator,
        tavus_b: TavusEmulator) -> None:
    kit = make_pair_kit(budgets=budgets(tenants={"acme": {"max_minutes": "0.02"}}))
    async with kit:
        async with kit.session("amelia", consent=CONSENT, purpose="support",
                               tenant="acme") as s:
            closed = await next_of(s.events(), Closed, within=3)
        assert closed.reason == "budget: budgets.tenants.acme.max_minutes"
        before = creates(tavus_emulator) + creates(tavus_b)
        with pytest.raises(BudgetExceeded) as caught:
            await kit.session("amelia", consent=CONSENT, purpose="support",
                              tenant="acme").start()
        assert caught.value.cap == "budgets.tenants.acme.max_minutes"
        assert creates(tavus_emulator) + creates(tavus_b) == before  # nothing reached a vendor
        # another tenant is not capped
        async with kit.session("amelia", consent=CONSENT, purpose="support",
                               tenant="globex") as other:
            assert other.provider == "tavus"


async def test_concurrent_sessions_share_the_tenant_budget(make_pair_kit: KitFactory) -> None:
    kit = make_pair_kit(budgets=budgets(tenant_daily={"max_minutes": "0.04"}))  # 2.4 s
    async with kit:
        started = asyncio.get_running_loop().time()
        async with kit.session("amelia", consent=CONSENT, purpose="support",
                               tenant="acme") as one, \
                kit.session("amelia", consent=CONSENT, purpose="support",
                            tenant="acme") as two:
            closed = await asyncio.gather(next_of(one.events(), Closed, within=4),
                                          next_of(two.events(), Closed, within=4))
        elapsed = asyncio.get_running_loop().time() - started
        # two sessions burn 2 s per second: both end after about (2.4 - margin) / 2 s
        assert all(c.reason == "budget: budgets.tenant_daily.max_minutes" for c in closed)
        assert elapsed < 2.2
        assert one.billed_seconds + two.billed_seconds <= 2.4


async def test_cost_cap_on_an_unknown_price_fails_closed(
        make_pair_kit: KitFactory, tavus_emulator: TavusEmulator,
        tavus_b: TavusEmulator) -> None:
    kit = make_pair_kit(a={"price_per_minute": None}, b={"price_per_minute": None},
                        budgets=budgets(session={"max_cost": "5"}))
    async with kit:
        with pytest.raises(BudgetExceeded, match="price is unknown"):
            await kit.session("amelia", consent=CONSENT, purpose="support").start()
    assert creates(tavus_emulator) == creates(tavus_b) == 0


async def test_spent_provider_month_routes_to_the_next_provider(
        make_pair_kit: KitFactory, tavus_b: TavusEmulator) -> None:
    kit = make_pair_kit(budgets=budgets(provider_monthly={"tavus": {"max_minutes": "0.02"}}))
    async with kit:
        async with kit.session("amelia", consent=CONSENT, purpose="support") as s:
            assert s.provider == "tavus"
            closed = await next_of(s.events(), Closed, within=3)
        assert closed.reason == "budget: budgets.provider_monthly.tavus.max_minutes"
        async with kit.session("amelia", consent=CONSENT, purpose="support") as s:
            assert s.provider == "tavus-b"
            excluded = next(c for c in s.route.candidates if c.provider == "tavus")
            assert excluded.excluded_by == "budget"
            assert "budgets.provider_monthly.tavus.max_minutes" in (excluded.reason or "")


def test_budget_config_errors_name_the_field(make_pair_kit: KitFactory) -> None:
    with pytest.raises(ConfigError) as caught:
        make_pair_kit(budgets={"session": {}})
    assert "budgets.session" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        make_pair_kit(budgets={"provider_monthly": {"heygen-x": {"max_minutes": "1"}}})
    assert caught.value.field == "budgets.provider_monthly.heygen-x"


T = TypeVar("T")


async def next_of(events: Any, kind: type[T], *, within: float) -> T:
    async with asyncio.timeout(within):
        async for event in events:
            if isinstance(event, kind):
                return event
    raise AssertionError(f"no {kind.__name__} before the stream ended")


async def test_minutes_caps_count_sessions_in_every_currency(make_pair_kit: KitFactory) -> None:
    kit = make_pair_kit(b={"currency": "EUR"},
                        # 3.6 s; the vendor backstop is floor(time left), so end 1 s early
                        budgets=budgets(tenant_daily={"max_minutes": "0.06"}, end_margin_s=1.0),
                        policies={"b-only": {"objective": "config-order",
                                             "providers_allowed": ["tavus-b"]}})
    async with kit:
        async with kit.session("amelia", consent=CONSENT, purpose="support",
                               tenant="acme") as usd:
            await asyncio.sleep(0.8)
        async with kit.session("amelia", consent=CONSENT, purpose="support", tenant="acme",
                               policy="b-only") as eur:
            assert eur.provider == "tavus-b"
            closed = await next_of(eur.events(), Closed, within=3)
        assert closed.reason == "budget: budgets.tenant_daily.max_minutes"
        assert usd.billed_seconds + eur.billed_seconds <= 3.6


async def test_tenant_caps_do_not_apply_to_untenanted_sessions(make_pair_kit: KitFactory) -> None:
    kit = make_pair_kit(budgets=budgets(tenant_daily={"max_minutes": "0.02"}))
    async with kit:
        async with kit.session("amelia", consent=CONSENT, purpose="support",
                               tenant="acme") as s:
            await next_of(s.events(), Closed, within=3)  # acme's day is spent
        async with kit.session("amelia", consent=CONSENT, purpose="support") as untenanted:
            await asyncio.sleep(1.5)  # longer than acme's whole cap
            assert untenanted.state == "live"
