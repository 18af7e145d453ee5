"""The router: which configured provider serves a session, and a record of why.

Filter, then score, then rank. The filters: the constraints every route has (provider
enabled, avatar present at the provider), the policy's hard constraints (residency, self-hosted
only, price, latency, capabilities, allow/deny lists; each fails closed on an unknown value),
then request-specific :class:`RouteConstraint` values: the consent scope, budgets, provider
health. The policy's objective orders what is left. The ``RouteDecision`` records every
candidate: the constraint that excluded it, or its rank, score and the inputs scoring saw.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field

from ..catalog import Avatar
from ..contract import ProviderProfile, ProviderSettings
from ..errors import ConfigError, NoRouteError
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
        self._static: dict[str, _Inputs] = {}

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
        seen: list[tuple[str, tuple[str, str] | None, str | None, _Inputs]] = []
        eligible: list[tuple[int, str, _Inputs]] = []
        for position, (name, settings) in enumerate(self._settings.items()):
            profile = self._profiles[name]
            avatar_id = avatar.id_at(name, vendor=profile.vendor,
                                     remote=getattr(settings, "url", None) is not None)
            inputs = self._inputs(name, profile, observed.get(name))
            excluded: tuple[str, str] | None
            if not settings.enabled:
                excluded = ("enabled", "provider disabled in config")
            elif avatar_id is None:
                excluded = ("avatar_present", f"avatar {avatar.name!r} has no id at {name}")
            else:
                excluded = _policy_exclusion(rules, name, profile, inputs) if rules else None
                if excluded is None:
                    for constraint in constraints:
                        why = constraint.exclusion(name, profile, avatar_id)
                        if why is not None:
                            excluded = (constraint.name, why)
                            break
            seen.append((name, excluded, avatar_id, inputs))
            if excluded is None:
                eligible.append((position, name, inputs))
        order, scores = _rank(rules, eligible)
        rank_of = {name: rank for rank, name in enumerate(order, start=1)}
        # Each candidate is built once, ranked (no copies: pydantic copies cost more).
        candidates = tuple(
            RouteCandidate(
                provider=name, eligible=excluded is None,
                excluded_by=excluded[0] if excluded else None,
                reason=excluded[1] if excluded else None,
                rank=rank_of.get(name), score=scores.get(name), avatar_id=avatar_id,
                inputs=inputs)
            for name, excluded, avatar_id, inputs in seen)
        decision = RouteDecision(
            avatar=avatar.name,
            purpose=purpose,
            policy=policy,
            policy_version=rules.version if rules else None,
            chosen=order[0] if order else None,
            candidates=candidates,
        )
        if not order:
            raise NoRouteError(
                f"no provider can serve avatar {avatar.name!r}:\n{decision.explain()}",
                decision=decision,
            )
        return decision

    def _inputs(self, name: str, profile: ProviderProfile, observed: float | None) -> _Inputs:
        """What scoring and constraints look at, recorded in the decision as they were seen
        (the static part is computed once per provider)."""
        static = self._static.get(name)
        if static is None:
            static = self._static[name] = _static_inputs(profile)
        if observed is not None:
            return {**static, "first_frame_latency_ms": observed, "latency_source": "observed"}
        declared = profile.first_frame_latency_ms
        return {**static, "first_frame_latency_ms": declared,
                "latency_source": "declared" if declared else None}


_Inputs = dict[str, str | float | None]


def _static_inputs(profile: ProviderProfile) -> _Inputs:
    return {
        "price_per_minute": str(profile.price_per_minute)
        if profile.price_per_minute is not None else None,
        "currency": profile.currency,
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


def _metric(inputs: _Inputs, metric: Metric) -> float | None:
    value = inputs.get("first_frame_latency_ms" if metric == "latency" else "price_per_minute")
    return float(value) if value is not None else None


def _rank(rules: RoutingPolicy | None, eligible: list[tuple[int, str, _Inputs]]
          ) -> tuple[list[str], dict[str, float]]:
    """The eligible providers best first (ties keep config order), and their scores."""
    if rules is None or rules.objective == "config-order":
        return [name for _, name, _ in eligible], {}
    if rules.objective == "lexicographic":
        metrics = rules.order

        def key(item: tuple[int, str, _Inputs]) -> tuple[float, ...]:
            position, _, inputs = item
            values = [_metric(inputs, m) for m in metrics]
            # unknown sorts last: it is never assumed to be cheap or fast
            return (*(v if v is not None else math.inf for v in values), float(position))
        return [name for _, name, _ in sorted(eligible, key=key)], {}
    scores = _weighted_scores(rules, eligible)
    ordered = sorted(eligible, key=lambda item: (scores[item[1]], item[0]))
    return [name for _, name, _ in ordered], scores


def _weighted_scores(rules: RoutingPolicy,
                     eligible: list[tuple[int, str, _Inputs]]) -> dict[str, float]:
    """Lower is better: each metric min-max normalised over the candidates to [0, 1] and
    weighted; an unknown value counts as the worst (1.0), never the best."""
    scores = {name: 0.0 for _, name, _ in eligible}
    weighted: tuple[tuple[Metric, float], ...] = (
        ("latency", rules.weights.latency), ("price", rules.weights.price))
    for metric, weight in weighted:
        if weight == 0:
            continue
        values = {name: _metric(inputs, metric) for _, name, inputs in eligible}
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
