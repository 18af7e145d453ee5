"""The router: which configured provider serves a session, and a record of why.

This version applies the constraints every route has (provider enabled, avatar present at the
provider), then any request-specific :class:`RouteConstraint` (the consent scope is one: a
grant may name the providers and regions it allows), and orders the eligible providers as
configured. Policy constraints and scoring (residency, price, latency, budgets) plug in as
further filters and a scoring step; the ``RouteDecision`` record already carries every
candidate with its exclusion or rank.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field

from ..catalog import Avatar
from ..errors import NoRouteError
from ..providers.base import ProviderProfile, ProviderSettings

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
    avatar_id: str | None = None


class RouteDecision(BaseModel):
    """The outcome of routing: the chosen provider and every candidate considered."""

    model_config = ConfigDict(frozen=True)

    avatar: str
    purpose: str | None
    policy: str | None
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
        head += f", policy {self.policy!r}" if self.policy else ", no policy"
        lines = [head + ":"]
        for c in self.candidates:
            if c.eligible:
                mark = "->" if c.provider == self.chosen else "  "
                lines.append(f" {mark} {c.provider}: eligible, rank {c.rank}")
            else:
                lines.append(f"    {c.provider}: excluded by {c.excluded_by} ({c.reason})")
        lines.append(f"chosen: {self.chosen}" if self.chosen else "chosen: none")
        return "\n".join(lines)


class Router:
    """Filters the configured providers for a request and ranks the rest."""

    def __init__(
        self,
        settings: Mapping[str, ProviderSettings],
        profiles: Mapping[str, ProviderProfile],
    ) -> None:
        self._settings = dict(settings)
        self._profiles = dict(profiles)

    def route(
        self,
        avatar: Avatar,
        *,
        purpose: str | None = None,
        policy: str | None = None,
        constraints: Sequence[RouteConstraint] = (),
    ) -> RouteDecision:
        """Decide, without starting anything. Raises ``NoRouteError`` when nothing qualifies."""
        candidates: list[RouteCandidate] = []
        rank = 0
        for name, settings in self._settings.items():
            avatar_id = avatar.id_at(name)
            if not settings.enabled:
                candidates.append(RouteCandidate(
                    provider=name, eligible=False, excluded_by="enabled",
                    reason="provider disabled in config"))
            elif avatar_id is None:
                candidates.append(RouteCandidate(
                    provider=name, eligible=False, excluded_by="avatar_present",
                    reason=f"avatar {avatar.name!r} has no id at {name}"))
            else:
                excluded = next(
                    ((c.name, why) for c in constraints
                     if (why := c.exclusion(name, self._profiles[name], avatar_id)) is not None),
                    None)
                if excluded is not None:
                    candidates.append(RouteCandidate(
                        provider=name, eligible=False, excluded_by=excluded[0],
                        reason=excluded[1], avatar_id=avatar_id))
                    continue
                rank += 1
                candidates.append(RouteCandidate(
                    provider=name, eligible=True, rank=rank, avatar_id=avatar_id))
        eligible = [c for c in candidates if c.eligible]
        decision = RouteDecision(
            avatar=avatar.name,
            purpose=purpose,
            policy=policy,
            chosen=eligible[0].provider if eligible else None,
            candidates=tuple(candidates),
        )
        if not eligible:
            raise NoRouteError(
                f"no provider can serve avatar {avatar.name!r}:\n{decision.explain()}",
                decision=decision,
            )
        return decision

    def profile(self, provider: str) -> ProviderProfile:
        return self._profiles[provider]
