"""The router with policies: hard constraints that fail closed on unknowns, objectives, and a
decision record that names every provider with its reason or score."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest

from avatarkit import (
    AudioFormat,
    AvatarKit,
    Capabilities,
    ConfigError,
    KitConfig,
    NoRouteError,
    ProviderProfile,
    RouteDecision,
    RoutingPolicy,
)
from avatarkit.catalog import Avatar
from avatarkit.contract import ProviderSettings
from avatarkit.routing.router import Router

AVATAR = Avatar(name="amelia", provider_ids={n: f"id_{n}" for n in "abcde"})


def profile(name: str, *, price: str | None = None, regions: set[str] | None = None,
            latency: float | None = None, self_hosted: bool = False,
            **caps: bool) -> ProviderProfile:
    return ProviderProfile(
        name=name, capabilities=Capabilities(**caps), audio_format=AudioFormat(24_000),
        price_per_minute=Decimal(price) if price is not None else None,
        regions=frozenset(regions) if regions is not None else None,
        first_frame_latency_ms=latency, self_hosted=self_hosted)


PROFILES = {
    "a": profile("a", price="0.30", regions={"us"}, latency=900),
    "b": profile("b", price="0.10", regions={"eu"}, latency=2500),
    "c": profile("c", price=None, regions={"eu"}, latency=600),       # unknown price
    "d": profile("d", price="0.20", regions=None, latency=None),       # unknown region, latency
    "e": profile("e", price="0.05", regions={"self-hosted"}, latency=400, self_hosted=True,
                 interrupt=False),
}


def router(**policies: dict[str, Any]) -> Router:
    settings = {n: ProviderSettings() for n in PROFILES}
    return Router(settings, PROFILES,
                  policies={k: RoutingPolicy.model_validate(v) for k, v in policies.items()})


def excluded(decision: RouteDecision) -> dict[str, str | None]:
    return {c.provider: c.excluded_by for c in decision.candidates if not c.eligible}


def test_without_a_policy_config_order_and_every_provider_listed() -> None:
    decision = router().route(AVATAR)
    assert decision.chosen == "a" and [c.rank for c in decision.candidates] == [1, 2, 3, 4, 5]
    assert decision.policy is None and decision.policy_version is None


def test_residency_fails_closed_on_unknown_region() -> None:
    decision = router(eu={"residency": ["eu"]}).route(AVATAR, policy="eu")
    assert excluded(decision) == {"a": "residency", "d": "residency", "e": "residency"}
    reasons = {c.provider: c.reason for c in decision.candidates}
    assert "unknown" in (reasons["d"] or "") and "fails closed" in (reasons["d"] or "")
    assert {c.provider for c in decision.ranked} == {"b", "c"}


def test_a_provider_in_several_regions_needs_all_of_them_allowed() -> None:
    profiles = dict(PROFILES, a=profile("a", price="0.3", regions={"eu", "us"}, latency=900))
    r = Router({n: ProviderSettings() for n in profiles}, profiles,
               policies={"eu": RoutingPolicy(residency=["eu"])})
    decision = r.route(AVATAR, policy="eu")
    assert excluded(decision)["a"] == "residency"


def test_price_cap_excludes_unknown_prices() -> None:
    decision = router(cheap={"max_price_per_minute": "0.25"}).route(AVATAR, policy="cheap")
    assert excluded(decision) == {"a": "max_price_per_minute", "c": "max_price_per_minute"}
    assert "unknown" in str(next(c.reason for c in decision.candidates if c.provider == "c"))


def test_latency_cap_uses_observed_over_declared_and_excludes_unknown() -> None:
    r = router(fast={"max_first_frame_latency_ms": 1000})
    decision = r.route(AVATAR, policy="fast")
    assert excluded(decision) == {"b": "max_first_frame_latency_ms",
                                  "d": "max_first_frame_latency_ms"}
    slow_a = r.route(AVATAR, policy="fast", observed_latency_ms={"a": 1800.0, "b": 700.0})
    assert excluded(slow_a) == {"a": "max_first_frame_latency_ms",
                                "d": "max_first_frame_latency_ms"}
    b = next(c for c in slow_a.candidates if c.provider == "b")
    assert b.inputs is not None and b.inputs["latency_source"] == "observed"


def test_capabilities_allow_deny_and_self_hosted() -> None:
    r = router(p1={"require": ["interrupt"]}, p2={"providers_allowed": ["b", "e"]},
               p3={"providers_denied": ["a"]}, p4={"self_hosted_only": True})
    assert excluded(r.route(AVATAR, policy="p1")) == {"e": "require"}
    assert set(excluded(r.route(AVATAR, policy="p2"))) == {"a", "c", "d"}
    assert excluded(r.route(AVATAR, policy="p3")) == {"a": "providers_denied"}
    assert r.route(AVATAR, policy="p4").chosen == "e"


def test_weighted_objective_ranks_by_normalised_price_and_latency() -> None:
    r = router(price={"weights": {"price": 1, "latency": 0}},
               latency={"weights": {"price": 0, "latency": 1}},
               both={"weights": {"price": 1, "latency": 1}})
    by_price = r.route(AVATAR, policy="price")
    assert [c.provider for c in by_price.ranked] == ["e", "b", "d", "a", "c"]  # c unknown: last
    by_latency = r.route(AVATAR, policy="latency")
    assert [c.provider for c in by_latency.ranked] == ["e", "c", "a", "b", "d"]
    both = r.route(AVATAR, policy="both")
    assert both.chosen == "e"
    scores = {c.provider: c.score for c in both.ranked}
    assert scores["e"] == 0.0 and all(s is not None and s >= 0 for s in scores.values())
    # observed latency flips the choice when the price winner turns out slow
    observed = r.route(AVATAR, policy="latency", observed_latency_ms={"e": 5000.0})
    assert observed.chosen == "c"


def test_lexicographic_objective_and_unknowns_sort_last() -> None:
    r = router(lex={"objective": "lexicographic", "order": ["latency", "price"]})
    assert [c.provider for c in r.route(AVATAR, policy="lex").ranked] == \
        ["e", "c", "a", "b", "d"]


def test_nothing_left_raises_with_the_whole_decision() -> None:
    r = router(impossible={"residency": ["jp"]})
    with pytest.raises(NoRouteError) as info:
        r.route(AVATAR, policy="impossible")
    decision = info.value.decision
    assert isinstance(decision, RouteDecision) and decision.chosen is None
    assert len(decision.candidates) == 5 and "excluded by residency" in str(info.value)


def test_decision_json_names_every_provider_with_reason_or_score() -> None:
    decision = router(eu={"residency": ["eu", "self-hosted"], "version": 3}).route(
        AVATAR, purpose="support", policy="eu")
    data = json.loads(decision.model_dump_json())
    assert data["policy"] == "eu" and data["policy_version"] == 3
    for c in data["candidates"]:
        assert c["eligible"] == (c["score"] is not None)
        assert c["eligible"] or c["reason"]
        assert set(c["inputs"]) >= {"price_per_minute", "first_frame_latency_ms", "regions"}
    assert "policy 'eu' v3" in decision.explain()


def test_unknown_policy_is_refused_never_ignored() -> None:
    with pytest.raises(ConfigError) as info:
        router(eu={}).route(AVATAR, policy="us")
    assert info.value.field == "policy" and "known: eu" in str(info.value)


@pytest.mark.parametrize(("policy", "where"), [
    ({"residency": []}, "policies.p.residency"),
    ({"max_price_per_minute": "-1"}, "policies.p.max_price_per_minute"),
    ({"require": ["teleport"]}, "policies.p.require"),
    ({"weights": {"price": 0, "latency": 0}}, "all zero"),
    ({"providers_allowed": ["tavus"], "providers_denied": ["tavus"]}, "both allowed and denied"),
    ({"providers_allowed": ["simli"]}, "policies.p.providers_allowed"),
    ({"objective": "cheapest"}, "policies.p.objective"),
    ({"surprise": 1}, "policies.p.surprise"),
])
def test_bad_policies_name_the_field(policy: dict[str, Any], where: str) -> None:
    with pytest.raises(ConfigError) as info:
        KitConfig(providers={"tavus": {"api_key": "k", "channel": "websocket"}},
                  policies={"p": policy})
    assert where in str(info.value)


def test_policies_from_toml_route_through_the_kit(tmp_path: Any) -> None:
    (tmp_path / "avatarkit.toml").write_text(
        '[providers.tavus]\napi_key = "k"\nchannel = "websocket"\nregions = ["us"]\n'
        'price_per_minute = "0.32"\n[avatars.amelia]\ntavus = "r1"\n'
        '[policies.eu-strict]\nresidency = ["eu", "self-hosted"]\nversion = 2\n'
        '[policies.budget]\nmax_price_per_minute = "0.50"\n')
    kit = AvatarKit.from_config(tmp_path / "avatarkit.toml")
    assert kit.route("amelia", policy="budget").chosen == "tavus"
    with pytest.raises(NoRouteError) as info:
        kit.route("amelia", policy="eu-strict")
    assert "tavus renders in us, outside eu, self-hosted" in str(info.value)
