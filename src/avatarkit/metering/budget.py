"""Budgets: caps on minutes and money, enforced before a start and during a session.

Three scopes, from ``[budgets]`` (and a policy's own per-session ``budget``):

* **per session**: ``[budgets.session]`` and ``[policies.NAME] budget`` (the tighter wins);
* **per tenant per UTC day**: ``[budgets.tenant_daily]`` for every tenant, or
  ``[budgets.tenants.NAME]`` for one;
* **per provider per UTC calendar month**: ``[budgets.provider_monthly.NAME]``.

Usage comes from the session ledger, so every process sharing it counts (a tenant's sessions
in other workers spend the same daily budget). Between two checks every open session in a
scope burns its price per minute, so the time left is the remaining allowance divided by that
burn rate. A session is ended ``end_margin_s`` before the first cap it would cross (the end
call takes time and vendors round), after a :class:`~avatarkit.BudgetWarning` at ``warn_at``.

Fails closed: a cost cap on a provider whose price is unknown (or in another currency)
excludes that provider; it is never priced at 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..contract import ProviderProfile
from .ledger import SessionLedger

__all__ = [
    "BudgetCap",
    "BudgetConfig",
    "BudgetConstraint",
    "BudgetGuard",
    "BudgetStatus",
    "CapUse",
]

_Unit = Literal["minutes", "cost"]
_SIXTY = Decimal(60)


class BudgetCap(BaseModel):
    """A cap on minutes and/or money (in ``[budgets] currency``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_minutes: Decimal | None = Field(default=None, gt=0)
    max_cost: Decimal | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _something(self) -> BudgetCap:
        if self.max_minutes is None and self.max_cost is None:
            raise ValueError("set max_minutes, max_cost or both")
        return self


class BudgetConfig(BaseModel):
    """``[budgets]``: spending caps, and how close to one a session may run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    currency: str = Field(default="USD", description="The currency of every max_cost.")
    warn_at: float = Field(default=0.8, gt=0, le=1,
                           description="Fraction of a cap at which BudgetWarning is sent.")
    end_margin_s: float = Field(
        default=5.0, ge=0, le=600, description="End a session this long before it would "
        "cross a cap (the vendor's end call and its billing granularity).")
    check_interval_s: float = Field(default=5.0, gt=0, le=300,
                                    description="How often a live session re-checks caps.")
    session: BudgetCap | None = None
    tenant_daily: BudgetCap | None = Field(
        default=None, description="Every tenant's cap per UTC day (unless under tenants).")
    tenants: dict[str, BudgetCap] = Field(
        default_factory=dict, description="Daily caps of particular tenants.")
    provider_monthly: dict[str, BudgetCap] = Field(
        default_factory=dict, description="Caps per provider per UTC calendar month.")

    @property
    def any(self) -> bool:
        return bool(self.session or self.tenant_daily or self.tenants or self.provider_monthly)


@dataclass(frozen=True, slots=True)
class CapUse:
    """One cap as it applies to one session on one provider, at one moment."""

    name: str             # config path, e.g. "budgets.tenants.acme.max_cost"
    unit: _Unit
    limit: Decimal
    used: Decimal         # spent in the cap's scope and period, this session included
    burn_per_s: Decimal   # how fast the scope spends now (minutes or money per second)

    @property
    def fraction(self) -> float:
        return float(self.used / self.limit)

    @property
    def seconds_left(self) -> float:
        remaining = self.limit - self.used
        if remaining <= 0:
            return 0.0
        if self.burn_per_s <= 0:
            return float("inf")
        return float(remaining / self.burn_per_s)


@dataclass(frozen=True, slots=True)
class BudgetStatus:
    """Every cap applying to a session, the binding one first. ``blocked`` is set when a
    cap cannot even be evaluated (cost cap, unknown price): the provider is excluded."""

    caps: tuple[CapUse, ...]
    blocked: str | None = None

    @property
    def seconds_left(self) -> float:
        return min((c.seconds_left for c in self.caps), default=float("inf"))

    @property
    def binding(self) -> CapUse | None:
        return min(self.caps, key=lambda c: c.seconds_left, default=None)


@dataclass(frozen=True, slots=True)
class _ScopeUsage:
    seconds: Decimal
    cost: Decimal
    open_rate_s: Decimal      # open sessions (each bills one second per second)
    open_rate_cost: Decimal   # their summed price per second (known prices only)


class BudgetGuard:
    """Evaluates caps for a session on a provider, from the ledger and the session's own use."""

    def __init__(self, config: BudgetConfig, ledger: SessionLedger,
                 currencies: Iterable[str] = ()) -> None:
        self.config = config
        self._ledger = ledger
        # minutes caps count sessions in every currency the providers bill in
        self._currencies = sorted({config.currency, *currencies})

    def applies(self, session_cap: BudgetCap | None) -> bool:
        """Whether any cap applies to a session with this policy cap (else skip the work)."""
        return self.config.any or session_cap is not None

    async def status(
        self,
        *,
        profile: ProviderProfile,
        tenant: str | None,
        session_cap: BudgetCap | None,
        own_seconds: float,
        own_cost: Decimal,
        starting: bool,
        now: datetime | None = None,
    ) -> BudgetStatus:
        """The caps for a session of ``tenant`` on ``profile``'s provider.

        ``own_*`` is what the session has spent so far, over all its vendor attempts (0 for
        a new session). With ``starting`` the session's next attempt is not in the ledger
        yet, so it is added to each scope's burn rate; a live one is among the open rows.
        """
        cfg = self.config
        now = now or datetime.now(UTC)
        price = profile.price_per_minute
        per_s_cost = price / _SIXTY if price is not None else None
        caps: list[CapUse] = []

        # (config path, cap, usage in its period, whether the ledger holds this session)
        own = _ScopeUsage(Decimal(str(own_seconds)), own_cost, Decimal(0), Decimal(0))
        scoped: list[tuple[str, BudgetCap, _ScopeUsage, bool]] = []
        if cfg.session is not None:
            scoped.append(("budgets.session", cfg.session, own, False))
        if session_cap is not None:
            scoped.append(("policy.budget", session_cap, own, False))
        # tenant caps apply to named tenants (untenanted sessions are not one big tenant)
        tenant_cap, tenant_name = self._tenant_cap(tenant) if tenant is not None else (None, "")
        if tenant_cap is not None:
            day = now.replace(hour=0, minute=0, second=0, microsecond=0)
            scoped.append((tenant_name, tenant_cap, await self._scope(
                since=day, tenant=tenant, provider=None, now=now), not starting))
        month_cap = cfg.provider_monthly.get(profile.name)
        if month_cap is not None:
            month = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
            scoped.append((f"budgets.provider_monthly.{profile.name}", month_cap,
                           await self._scope(since=month, tenant=None,
                                             provider=profile.name, now=now), not starting))

        for name, cap, usage, in_ledger in scoped:
            # The session burns in every scope: counted among the ledger's open rows once
            # it is live there, added here while starting or for its own session caps.
            rate_s = usage.open_rate_s + (0 if in_ledger else 1)
            if cap.max_minutes is not None:
                caps.append(CapUse(f"{name}.max_minutes", "minutes", cap.max_minutes,
                                   usage.seconds / _SIXTY, rate_s / _SIXTY))
            if cap.max_cost is not None:
                if per_s_cost is None:
                    return BudgetStatus(tuple(caps), blocked=(
                        f"{name}.max_cost: {profile.name}'s price is unknown (fails closed)"))
                if profile.currency != cfg.currency:
                    return BudgetStatus(tuple(caps), blocked=(
                        f"{name}.max_cost is in {cfg.currency}, {profile.name} bills in "
                        f"{profile.currency}"))
                rate_cost = usage.open_rate_cost + (0 if in_ledger else per_s_cost)
                caps.append(CapUse(f"{name}.max_cost", "cost", cap.max_cost, usage.cost,
                                   rate_cost))
        return BudgetStatus(tuple(sorted(caps, key=lambda c: c.seconds_left)))

    def _tenant_cap(self, tenant: str | None) -> tuple[BudgetCap | None, str]:
        cfg = self.config
        if tenant is not None and tenant in cfg.tenants:
            return cfg.tenants[tenant], f"budgets.tenants.{tenant}"
        return cfg.tenant_daily, "budgets.tenant_daily"

    async def _scope(self, *, since: datetime, tenant: str | None, provider: str | None,
                     now: datetime) -> _ScopeUsage:
        seconds, cost = Decimal(0), Decimal(0)
        for currency in self._currencies:
            usage = await self._ledger.usage(since=since, until=now, tenant=tenant,
                                             provider=provider, currency=currency)
            seconds += Decimal(str(usage.billed_seconds))
            if currency == self.config.currency:
                cost = usage.cost or Decimal(0)
        open_rows = await self._ledger.rows(states=("creating", "open"), tenant=tenant,
                                            provider=provider)
        rate_cost = sum((r.price_per_minute / _SIXTY for r in open_rows
                         if r.price_per_minute is not None
                         and r.currency == self.config.currency), Decimal(0))
        return _ScopeUsage(seconds, cost, Decimal(len(open_rows)), rate_cost)

    def exclusions(self, statuses: Mapping[str, BudgetStatus]) -> BudgetConstraint:
        """A routing constraint built from statuses computed for each provider."""
        return BudgetConstraint(statuses, self.config.end_margin_s)


class BudgetConstraint:
    """Routing constraint ``budget``: excludes providers on which a start would certainly
    cross a cap (less than the end margin left) or whose cost cannot be capped."""

    name = "budget"

    def __init__(self, statuses: Mapping[str, BudgetStatus], margin_s: float) -> None:
        self._statuses = dict(statuses)
        self._margin = margin_s

    def status(self, provider: str) -> BudgetStatus | None:
        return self._statuses.get(provider)

    def exclusion(self, provider: str, profile: ProviderProfile, avatar_id: str) -> str | None:
        status = self._statuses.get(provider)
        if status is None:
            return None
        if status.blocked is not None:
            return status.blocked
        binding = status.binding
        if binding is not None and binding.seconds_left <= self._margin:
            return f"{binding.name}: {_describe(binding)}"
        return None


def _describe(cap: CapUse) -> str:
    unit = "min" if cap.unit == "minutes" else ""
    return f"{cap.used:.2f} of {cap.limit} {unit}".rstrip() + " used"

