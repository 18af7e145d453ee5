"""What a session needs from the kit that made it, and nothing more.

The kit builds one :class:`SessionServices` and hands it to each
:class:`~avatarkit.session.AvatarSession`; a session never touches the kit itself. That keeps
the dependency one way (``kit`` -> ``session``) and makes a session buildable in a test from
exactly the parts it uses.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ..catalog import Avatar
from ..config import DisclosureConfig, MeteringConfig, SessionDefaults
from ..contract import Provider
from ..disclosure.metadata import DisclosureMetadata
from ..metering.budget import BudgetGuard
from ..metering.ledger import SessionLedger
from ..routing.health import HealthMonitor
from ..routing.policy import RoutingPolicy
from ..routing.router import RouteConstraint, RouteDecision
from .settling import StartSettler

if TYPE_CHECKING:
    from ..consent.enforce import ConsentGate

__all__ = ["RouteFunction", "SessionServices"]


class RouteFunction(Protocol):
    """Routes ``avatar`` under ``policy`` with the kit's health applied, plus ``constraints``
    (consent scope, budgets) of the session; raises ``NoRouteError`` when none is left."""

    def __call__(self, avatar: Avatar, *, purpose: str | None, policy: str | None,
                 constraints: Sequence[RouteConstraint] = ()) -> RouteDecision: ...


@dataclass(frozen=True, slots=True)
class SessionServices:
    """The kit's parts a session uses: config sections, the consent gate, the providers, the
    router, health, the ledger and budget guard, the disclosure signer and the settler of
    starts whose outcome is unknown."""

    session_defaults: SessionDefaults
    metering: MeteringConfig
    disclosure: DisclosureConfig
    consent: ConsentGate
    providers: Mapping[str, Provider]
    route: RouteFunction
    rules: Callable[[str | None], RoutingPolicy]
    health: HealthMonitor
    ledger: SessionLedger
    budget: BudgetGuard
    sign_disclosure: Callable[[DisclosureMetadata], str]
    settler: StartSettler
