"""A session's vendor attempts: the first vendor session, fallbacks and failovers.

One attempt is: ledger row written (``begin``) -> the vendor's create call -> row marked
``open`` with the vendor's id, or ``failed`` (the vendor refused) or left to the settler (the
create may have happened: timeouts, lost connections, a caller who cancelled). Ending an
attempt (:meth:`VendorAttempts.retire`) ends the vendor session within the close timeout and
closes its row with the billed time and cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING

from pydantic import SecretStr

from ..catalog import Avatar
from ..contract import ProviderProfile, ProviderSession, SessionRequest
from ..disclosure.metadata import DisclosureMetadata, LabelPolicy
from ..errors import AllProvidersFailed, NoRouteError, ProviderError
from ..metering.ledger import cost_of
from ..routing.policy import RoutingPolicy
from ..routing.router import RouteCandidate, RouteDecision
from .services import SessionServices

if TYPE_CHECKING:
    from ..consent.tokens import VerifiedConsent
    from ..metering.budget import BudgetConstraint

__all__ = [
    "VendorAttempt",
    "VendorAttempts",
    "describe",
]

logger = logging.getLogger("avatarkit.session")


@dataclass(slots=True)
class VendorAttempt:
    """One vendor session of a session (the first, a fallback or a failover)."""

    provider: str
    profile: ProviderProfile
    vendor: ProviderSession
    row_id: str
    disclosure: DisclosureMetadata
    recorded_end: bool = False

    def cost(self) -> Decimal | None:
        return cost_of(self.vendor.billed_seconds, self.profile.price_per_minute)


class VendorAttempts:
    """Opens, tracks and retires the vendor attempts of one session."""

    def __init__(self, services: SessionServices, *, session_id: str, generation_id: str,
                 avatar: Avatar, purpose: str, tenant: str | None, consent: str,
                 max_duration_s: float, close_timeout: float) -> None:
        self._services = services
        self._session_id = session_id
        self._generation_id = generation_id
        self._avatar = avatar
        self._purpose = purpose
        self._tenant = tenant
        self._consent = consent
        self._max_duration_s = max_duration_s
        self.close_timeout = close_timeout
        self.all: list[VendorAttempt] = []
        self.current: VendorAttempt | None = None
        self._counter = 0

    @property
    def billed_seconds(self) -> float:
        return sum(a.vendor.billed_seconds for a in self.all)

    @property
    def providers_used(self) -> list[str]:
        return [a.provider for a in self.all]

    @property
    def all_ended(self) -> bool:
        return all(a.vendor.ended for a in self.all)

    def attach(self, attempt: VendorAttempt) -> None:
        """``attempt`` is now the live one."""
        self.current = attempt
        self.all.append(attempt)

    def record(self, attempt: VendorAttempt) -> None:
        """Count ``attempt`` (opened, never made live) so that closing ends it."""
        self.all.append(attempt)

    def disclosure_for(self, provider: str, profile: ProviderProfile,
                       verified: VerifiedConsent) -> DisclosureMetadata:
        cfg = self._services.disclosure
        if not profile.self_hosted:
            policy: LabelPolicy = "viewer-ui"  # the vendor renders; the viewer UI labels
        else:
            policy = "burned-in" if cfg.burned_label.enabled else "disabled"
        return DisclosureMetadata(
            label=cfg.label, notice=cfg.notice, generator=f"avatarkit/{_version()}",
            generation_id=self._generation_id, provider=provider, avatar=self._avatar.name,
            consent_id=verified.consent_id, consent_token_sha256=verified.token_sha256,
            label_policy=policy,
        )

    async def open_ranked(self, candidates: Sequence[RouteCandidate], *, rules: RoutingPolicy,
                          verified: VerifiedConsent, budget: BudgetConstraint | None,
                          decision: RouteDecision | None) -> VendorAttempt:
        """Open the first candidate that starts. Falls back on retryable provider failures
        (when the policy allows); a permanent one or a policy violation stops at once."""
        errors: list[ProviderError] = []
        for candidate in candidates:
            try:
                return await self.open(candidate, verified=verified, budget=budget)
            except ProviderError as exc:
                self._services.health.record_failure(candidate.provider, exc)
                if errors:
                    exc.add_note("tried before: " + "; ".join(str(e) for e in errors))
                errors.append(exc)
                if exc.category.is_permanent or not rules.fallback:
                    raise
                logger.warning("session %s: %s failed to start (%s); trying the next provider",
                               self._session_id, candidate.provider, exc)
        if not errors:
            raise NoRouteError("no provider is left to try", decision=decision)
        if len(errors) == 1:
            raise errors[0]
        raise AllProvidersFailed(f"all {len(errors)} providers failed to start", errors)

    async def open(self, candidate: RouteCandidate, *, verified: VerifiedConsent,
                   budget: BudgetConstraint | None) -> VendorAttempt:
        """Start one vendor session, with its ledger row written before the create call."""
        services = self._services
        name = candidate.provider
        provider = services.providers[name]
        profile = provider.profile
        assert candidate.avatar_id is not None
        disclosure = self.disclosure_for(name, profile, verified)
        self._counter += 1
        attempt_no = self._counter
        # the session's cap covers every vendor attempt, failovers included
        max_duration = max(1.0, self._max_duration_s - self.billed_seconds)
        status = budget.status(name) if budget is not None else None
        if status is not None:
            max_duration = min(max_duration, max(1.0, status.seconds_left))
        request = SessionRequest(
            session_id=self._session_id,
            avatar=self._avatar.name,
            avatar_id=candidate.avatar_id,
            idempotency_key=f"avk-{self._session_id}-{attempt_no}",
            disclosure=disclosure,
            purpose=self._purpose,
            max_duration_s=max_duration,
            consent_token=SecretStr(self._consent) if profile.self_hosted else None,
            burned_label=(services.disclosure.burned_label
                          if disclosure.label_policy == "burned-in" else None),
        )
        ledger = services.ledger
        row = await ledger.begin(
            session_id=self._session_id, attempt=attempt_no, provider=name,
            provider_kind=provider.name, idempotency_key=request.idempotency_key,
            avatar=self._avatar.name, tenant=self._tenant, purpose=self._purpose,
            plan=provider.settings.plan, price_per_minute=profile.price_per_minute,
            currency=profile.currency)
        requested = time.monotonic()
        requested_at = datetime.now(UTC)
        # A caller that gives up (cancels) does not cancel the vendor start: the create may
        # already be billed, and only the finished start knows what to end.
        start = asyncio.ensure_future(provider.start(request))
        try:
            vendor = await asyncio.shield(start)
        except ProviderError as exc:
            if provider.may_have_created(exc):
                # The create may have reached the vendor and succeed there after we gave up:
                # the settler looks for it by the session's name and ends it.
                services.settler.settle_uncertain_create(provider, row)
            else:  # the vendor refused, or the adapter ended what it created: nothing billed
                await asyncio.shield(ledger.mark_failed(row.row_id, reason=describe(exc)))
            raise
        except asyncio.CancelledError:
            services.settler.finish_abandoned_start(provider, start, row)  # ends what it makes
            raise
        except BaseException as exc:
            await asyncio.shield(ledger.mark_failed(row.row_id, reason=describe(exc)))
            raise
        # Vendors bill from the create call; count from when it was sent (never less).
        vendor.billing_started_at = min(vendor.billing_started_at, requested)
        try:
            await ledger.mark_open(row.row_id, vendor_session_id=vendor.vendor_session_id,
                                   billing_started_at=requested_at)
        except BaseException:
            await asyncio.shield(self._end_quietly(vendor))
            raise
        services.health.record_success(name, latency_ms=(time.monotonic() - requested) * 1000)
        return VendorAttempt(name, profile, vendor, row.row_id, disclosure)

    async def _end_quietly(self, vendor: ProviderSession) -> None:
        with contextlib.suppress(ProviderError, TimeoutError):
            async with asyncio.timeout(self.close_timeout):
                await vendor.end()

    async def retire(self, attempt: VendorAttempt, reason: str) -> BaseException | None:
        """End ``attempt`` at its vendor (within the close timeout) and close its ledger row.
        Returns the failure when the vendor could not confirm (the row then stays open)."""
        vendor = attempt.vendor
        failure: BaseException | None = None
        try:
            async with asyncio.timeout(self.close_timeout):
                await vendor.end()
        except (ProviderError, TimeoutError) as exc:
            logger.warning("session %s: ending %s session %s failed: %s", self._session_id,
                           attempt.provider, vendor.vendor_session_id, exc)
            failure = exc
        if vendor.ended and not attempt.recorded_end:
            try:
                await self._services.ledger.mark_ended(
                    attempt.row_id, ended_at=datetime.now(UTC),
                    billed_seconds=vendor.billed_seconds, cost=attempt.cost(), reason=reason)
            except Exception as exc:  # the vendor end stands; closing again retries the row
                logger.error("session %s: could not record the end of %s: %s",
                             self._session_id, attempt.row_id, exc)
            else:
                attempt.recorded_end = True
        return failure

    async def retire_unended(self, reason: str) -> BaseException | None:
        """Retire every attempt not yet ended (or whose end is not recorded); returns the
        last failure."""
        failure: BaseException | None = None
        for attempt in self.all:
            if not attempt.vendor.ended or not attempt.recorded_end:
                failure = await self.retire(attempt, reason) or failure
        return failure


def describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("avatarkit")
    except PackageNotFoundError:
        return "0+unknown"
