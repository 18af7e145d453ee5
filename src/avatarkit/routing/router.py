"""The router: which configured provider serves a session, and a record of why.

This version applies the constraints every route has (provider enabled, avatar present at the
provider), then any request-specific :class:`RouteConstraint` (the consent scope is one: a
grant may name the providers and regions it allows), and orders the eligible providers as
configured. Policy constraints and scoring (residency, price, latency, budgets) plug in as
further filters and a scoring step; the ``RouteDecision`` record already carries every
candidate with its exclusion or rank.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field

from ..catalog import Avatar
from ..errors import ConfigError, NoRouteError
from ..providers.base import ProviderProfile, ProviderSettings
from .policy import Metric, RoutingPolicy

__all__ = ["RouteCandidate", "RouteConstraint", "RouteDecision", "Router"]


class RouteConstraint(Protocol):
    """A hard constraint on which providers may serve one request."""

    #: names the constraint in ``RouteCandidate.excluded_by`` (e.g. ``"consent"``)
    name: str

    def exclusion(self, provider: str, profile: ProviderProfile,
                  avatar_id: str) -> str | None:
        """Why ``provider`` may not serve the request, or None when it may."""
        ...


class RouteCandidate(BaseModel):
    """One provider as the router saw it: excluded (and by what) or eligible (and its rank)."""

    model_config = ConfigDict(frozen=True)

    provider: str
    eligible: bool
    excluded_by: str | None = Field(default=None, description="The constraint that failed.")
    reason: str | None = None
    rank: int | None = None
    score: float | None = Field(default=None, description="Weighted objective; lower is better.")
    avatar_id: str | None = None
    inputs: dict[str, str | float | None] | None = Field(
        default=None, description="Price, latency (and its source), regions as routing saw them.")


class RouteDecision(BaseModel):
    """The outcome of routing: the chosen provider and every candidate considered."""

    model_config = ConfigDict(frozen=True)

    avatar: str
    purpose: str | None
    policy: str | None
    policy_version: int | None = None
    chosen: str | None
    candidates: tuple[RouteCandidate, ...]

    @property
    def ranked(self) -> list[RouteCandidate]:
        """Eligible candidates, best first (the order start-up tries them in)."""
        return sorted((c for c in self.candidates if c.eligible), key=lambda c: c.rank or 0)

    def explain(self) -> str:
        """A human-readable account of the decision."""
        head = f"route for avatar {self.avatar!r}"
        if self.purpose:
            head += f", purpose {self.purpose!r}"
        head += (f", policy {self.policy!r} v{self.policy_version}" if self.policy
                 else ", no policy")
        lines = [head + ":"]
        for c in self.candidates:
            if c.eligible:
                mark = "->" if c.provider == self.chosen else "  "
                score = f", score {c.score:.3f}" if c.score is not None else ""
                lines.append(f" {mark} {c.provider}: eligible, rank {c.rank}{score}")
            else:
                lines.append(f"    {c.provider}: excluded by {c.excluded_by} ({c.reason})")
        lines.append(f"chosen: {self.chosen}" if self.chosen else "chosen: none")
        return "\n".join(lines)


class Router:
    """Filters the configured providers for a request, scores the rest and ranks them.

    Filters, in order: provider enabled, avatar present at the provider, the policy's hard
    constraints (each names itself in ``excluded_by``), then request constraints such as the
    consent scope. Scoring follows the policy's objective; without a policy, config order.
    ``observed_latency_ms`` (provider -> EWMA of first-frame latency) replaces the declared
    latency wherever a provider has samples.
    """

    def __init__(
        self,
        settings: Mapping[str, ProviderSettings],
        profiles: Mapping[str, ProviderProfile],
        policies: Mapping[str, RoutingPolicy] | None = None,
    ) -> None:
        self._settings = dict(settings)
        self._profiles = dict(profiles)
        self._policies = dict(policies or {})

    def policy(self, name: str) -> RoutingPolicy:
        try:
            return self._policies[name]
        except KeyError:
            known = ", ".join(sorted(self._policies)) or "none are configured"
            raise ConfigError(f"unknown policy {name!r} (known: {known})",
                              field="policy") from None

    def route(
        self,
        avatar: Avatar,
        *,
        purpose: str | None = None,
        policy: str | None = None,
        constraints: Sequence[RouteConstraint] = (),
        observed_latency_ms: Mapping[str, float] | None = None,
    ) -> RouteDecision:
        """Decide, without starting anything. Raises ``NoRouteError`` when nothing qualifies."""
        rules = self.policy(policy) if policy is not None else None
        observed = observed_latency_ms or {}
        candidates: list[RouteCandidate] = []
        eligible: list[tuple[int, RouteCandidate]] = []
        for position, (name, settings) in enumerate(self._settings.items()):
            profile = self._profiles[name]
            avatar_id = avatar.id_at(name)
            inputs = _inputs(profile, observed.get(name))
            excluded: tuple[str, str] | None
            if not settings.enabled:
                excluded = ("enabled", "provider disabled in config")
            elif avatar_id is None:
                excluded = ("avatar_present", f"avatar {avatar.name!r} has no id at {name}")
            else:
                excluded = _policy_exclusion(rules, name, profile, inputs) if rules else None
                if excluded is None:
                    excluded = next(
                        ((c.name, why) for c in constraints
                         if (why := c.exclusion(name, profile, avatar_id)) is not None), None)
            candidate = RouteCandidate(
                provider=name, eligible=excluded is None,
                excluded_by=excluded[0] if excluded else None,
                reason=excluded[1] if excluded else None, avatar_id=avatar_id, inputs=inputs)
            candidates.append(candidate)
            if excluded is None:
                eligible.append((position, candidate))
        ranked = _rank(rules, eligible)
        by_name = {c.provider: c for c in ranked}
        final = tuple(by_name.get(c.provider, c) for c in candidates)
        decision = RouteDecision(
            avatar=avatar.name,
            purpose=purpose,
            policy=policy,
            policy_version=rules.version if rules else None,
            chosen=ranked[0].provider if ranked else None,
            candidates=final,
        )
        if not ranked:
            raise NoRouteError(
                f"no provider can serve avatar {avatar.name!r}:\n{decision.explain()}",
                decision=decision,
            )
        return decision

    def profile(self, provider: str) -> ProviderProfile:
        return self._profiles[provider]


def _inputs(profile: ProviderProfile, observed: float | None) -> dict[str, str | float | None]:
    """What scoring and constraints look at, recorded in the decision as they were seen."""
    latency, source = (observed, "observed") if observed is not None else (
        profile.first_frame_latency_ms, "declared" if profile.first_frame_latency_ms else None)
    return {
        "price_per_minute": str(profile.price_per_minute)
        if profile.price_per_minute is not None else None,
        "currency": profile.currency,
        "first_frame_latency_ms": latency,
        "latency_source": source,
        "regions": ",".join(sorted(profile.regions)) if profile.regions is not None else None,
        "self_hosted": "yes" if profile.self_hosted else "no",
    }


def _policy_exclusion(rules: RoutingPolicy, name: str, profile: ProviderProfile,
                      inputs: Mapping[str, str | float | None]) -> tuple[str, str] | None:
    """The first of the policy's hard constraints ``name`` fails, as (constraint, reason)."""
    if rules.providers_allowed is not None and name not in rules.providers_allowed:
        return "providers_allowed", f"{name} is not in the policy's allowed providers"
    if name in rules.providers_denied:
        return "providers_denied", f"the policy denies {name}"
    if rules.self_hosted_only and not profile.self_hosted:
        return "self_hosted_only", f"{name} is a hosted vendor"
    if rules.residency is not None:
        regions = profile.regions
        if regions is None:
            return "residency", f"{name}'s rendering region is unknown (fails closed)"
        outside = sorted(regions - set(rules.residency))
        if outside:
            return "residency", (f"{name} renders in {', '.join(outside)}, outside "
                                 f"{', '.join(rules.residency)}")
    if rules.max_price_per_minute is not None:
        price = profile.price_per_minute
        if price is None:
            return "max_price_per_minute", f"{name}'s price is unknown (fails closed)"
        if price > rules.max_price_per_minute:
            return "max_price_per_minute", (
                f"{price} {profile.currency}/min > {rules.max_price_per_minute}")
    if rules.max_first_frame_latency_ms is not None:
        latency = inputs["first_frame_latency_ms"]
        if not isinstance(latency, float | int):
            return "max_first_frame_latency_ms", f"{name}'s latency is unknown (fails closed)"
        if latency > rules.max_first_frame_latency_ms:
            return "max_first_frame_latency_ms", (
                f"{inputs['latency_source']} {latency:.0f} ms > "
                f"{rules.max_first_frame_latency_ms:.0f} ms")
    missing = [c for c in rules.require if not getattr(profile.capabilities, c)]
    if missing:
        return "require", f"{name} lacks {', '.join(missing)}"
    return None


def _metric(candidate: RouteCandidate, metric: Metric) -> float | None:
    key = "first_frame_latency_ms" if metric == "latency" else "price_per_minute"
    value = (candidate.inputs or {}).get(key)
    return float(value) if value is not None else None


def _rank(rules: RoutingPolicy | None,
          eligible: list[tuple[int, RouteCandidate]]) -> list[RouteCandidate]:
    """Order the eligible candidates (ties keep config order) and stamp rank and score."""
    ordered: list[tuple[RouteCandidate, float | None]]
    if rules is None or rules.objective == "config-order":
        ordered = [(c, None) for _, c in eligible]
    elif rules.objective == "lexicographic":
        def key(item: tuple[int, RouteCandidate]) -> tuple[float, ...]:
            position, c = item
            values = [_metric(c, m) for m in rules.order]
            # unknown sorts last: it is never assumed to be cheap or fast
            return (*(v if v is not None else math.inf for v in values), float(position))
        ordered = [(c, None) for _, c in sorted(eligible, key=key)]
    else:
        scores = _weighted_scores(rules, [c for _, c in eligible])
        ordered = [(c, scores[c.provider]) for _, c in
                   sorted(eligible, key=lambda item: (scores[item[1].provider], item[0]))]
    return [c.model_copy(update={"rank": rank, "score": score})
            for rank, (c, score) in enumerate(ordered, start=1)]


def _weighted_scores(rules: RoutingPolicy,
                     candidates: list[RouteCandidate]) -> dict[str, float]:
    """Lower is better: each metric min-max normalised over the candidates to [0, 1] and
    weighted; an unknown value counts as the worst (1.0), never the best."""
    scores = {c.provider: 0.0 for c in candidates}
    weighted: tuple[tuple[Metric, float], ...] = (
        ("latency", rules.weights.latency), ("price", rules.weights.price))
    for metric, weight in weighted:
        if weight == 0:
            continue
        values = {c.provider: _metric(c, metric) for c in candidates}
        known = [v for v in values.values() if v is not None]
        low, high = (min(known), max(known)) if known else (0.0, 0.0)
        for provider, value in values.items():
            if value is None:
                norm = 1.0
            elif high > low:
                norm = (value - low) / (high - low)
            else:
                norm = 0.0
            scores[provider] += weight * norm
    return {p: round(v, 6) for p, v in scores.items()}
