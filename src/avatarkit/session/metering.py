"""A session's meter: billed time and cost over its vendor attempts, ``UsageUpdated`` events,
and the budget caps it must not cross (warn at ``warn_at``, end ``end_margin_s`` before the
first cap)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from decimal import Decimal

from ..events import BudgetWarning, SessionEvent, UsageUpdated
from ..metering.budget import BudgetConstraint, BudgetStatus
from ..routing.policy import RoutingPolicy
from .attempts import VendorAttempts
from .services import SessionServices

__all__ = ["SessionMeter"]

logger = logging.getLogger("avatarkit.session")


class SessionMeter:
    """Usage and budgets of one session. :meth:`run` is the session's meter task."""

    def __init__(self, services: SessionServices, attempts: VendorAttempts, *,
                 session_id: str, tenant: str | None, rules: RoutingPolicy,
                 publish: Callable[[SessionEvent], None],
                 end_session: Callable[[str], None]) -> None:
        self._services = services
        self._attempts = attempts
        self._session_id = session_id
        self._tenant = tenant
        self._rules = rules
        self._publish = publish
        self._end_session = end_session
        self._warned: set[str] = set()

    def usage(self) -> tuple[float, Decimal | None, float]:
        """(billed seconds, cost of the priced part or None, unpriced seconds). Cost is in the
        current provider's currency; time billed in another currency counts as unpriced here
        (the ledger keeps each attempt's own cost and currency)."""
        seconds = unpriced = 0.0
        cost: Decimal | None = None
        current = self._attempts.current
        currency = current.profile.currency if current else None
        for attempt in self._attempts.all:
            billed = attempt.vendor.billed_seconds
            seconds += billed
            part = attempt.cost() if attempt.profile.currency == currency else None
            if part is None:
                unpriced += billed
            else:
                cost = part if cost is None else cost + part
        return seconds, cost, unpriced

    def usage_event(self, *, final: bool) -> UsageUpdated:
        seconds, cost, unpriced = self.usage()
        current = self._attempts.current
        return UsageUpdated(
            session_id=self._session_id, provider=current.provider if current else "",
            billed_seconds=seconds, cost=cost,
            currency=current.profile.currency if current else "USD",
            unpriced_seconds=unpriced, final=final)

    async def budget_constraint(self) -> BudgetConstraint | None:
        """The providers a new vendor session may use without crossing a cap (None when no
        budget applies to this session)."""
        guard = self._services.budget
        if not guard.applies(self._rules.budget):
            return None
        seconds, cost, _ = self.usage()
        statuses: dict[str, BudgetStatus] = {}
        for name, provider in self._services.providers.items():
            statuses[name] = await guard.status(
                profile=provider.profile, tenant=self._tenant, session_cap=self._rules.budget,
                own_seconds=seconds, own_cost=cost or Decimal(0), starting=True)
        return guard.exclusions(statuses)

    async def run(self) -> None:
        """``UsageUpdated`` every ``[metering] usage_interval_s``; with budgets, a check every
        ``check_interval_s`` (sooner as a cap nears) that warns at ``warn_at`` and ends the
        session ``end_margin_s`` before the first cap it would cross."""
        interval = self._services.metering.usage_interval_s
        budget = self._services.budget
        guard = budget if budget.applies(self._rules.budget) else None
        last_report = time.monotonic()
        while True:
            wait = interval - (time.monotonic() - last_report)
            current = self._attempts.current
            if guard is not None and current is not None:
                seconds, cost, _ = self.usage()
                try:
                    status = await guard.status(
                        profile=current.profile, tenant=self._tenant,
                        session_cap=self._rules.budget, own_seconds=seconds,
                        own_cost=cost or Decimal(0), starting=False)
                except Exception as exc:  # the ledger is busy or unreadable: try again
                    logger.warning("session %s: budget check failed: %s", self._session_id, exc)
                    await asyncio.sleep(guard.config.check_interval_s)
                    continue
                margin = guard.config.end_margin_s
                for cap in status.caps:
                    if cap.fraction >= guard.config.warn_at and cap.name not in self._warned:
                        self._warned.add(cap.name)
                        self._publish(BudgetWarning(
                            session_id=self._session_id, cap=cap.name, unit=cap.unit,
                            used=cap.used.quantize(Decimal("0.0001")), limit=cap.limit,
                            ends_in_s=max(0.0, cap.seconds_left - margin)))
                binding = status.binding
                if binding is not None and binding.seconds_left <= margin:
                    logger.warning("session %s: ending before budget cap %s (%.4f of %s)",
                                   self._session_id, binding.name, binding.used, binding.limit)
                    self._end_session(f"budget: {binding.name}")
                    return
                if binding is not None:
                    wait = min(wait, guard.config.check_interval_s,
                               max(0.01, binding.seconds_left - margin))
            await asyncio.sleep(max(0.0, wait))
            if time.monotonic() - last_report >= interval:
                last_report = time.monotonic()
                self._publish(self.usage_event(final=False))
