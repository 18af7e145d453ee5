"""``AvatarKit``: holds the configured providers, the router with its health monitor, the
consent gate, the session ledger, the budget guard and the shared HTTP client.

``kit.session(...)`` makes sessions (each needs a consent token: see ``[consent]`` in the
config and docs/responsible-use.md); ``kit.route(...)`` shows the routing decision without
starting anything; ``kit.health()`` says how each provider is doing; ``kit.usage_report()``
sums billed minutes and cost from the ledger; ``kit.reap()`` ends vendor sessions whose
owning process died. The kit is an async context manager: opening it starts the health
probes and the ledger heartbeat; closing it closes every session it made that is still open
(ending them at their vendors), then the providers, the ledger and the HTTP pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import weakref
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import httpx

from .catalog import Avatar, Catalog
from .config import KitConfig
from .contract import Provider
from .errors import (
    ConfigError,
    ConsentCheck,
    ConsentRequired,
    SessionStateError,
)
from .metering.budget import BudgetGuard
from .metering.ledger import (
    GroupKey,
    SessionLedger,
    SQLiteSessionLedger,
    UsageReport,
)
from .metering.reaper import ReapOutcome, reap_orphans
from .providers.registry import get_provider_class
from .routing.health import HealthMonitor, ProviderHealth
from .routing.policy import RoutingPolicy
from .routing.router import RouteConstraint, RouteDecision, Router
from .session import AvatarSession, SessionServices
from .session.settling import StartSettler
from .vendor_http import new_http_client

if TYPE_CHECKING:
    from .consent.enforce import ConsentGate
    from .consent.keys import KeySet
    from .consent.status import StatusListSource
    from .consent.store import ConsentStore
    from .disclosure.metadata import DisclosureMetadata

__all__ = ["AvatarKit"]

logger = logging.getLogger("avatarkit.kit")


class _KitState(StrEnum):
    UNOPENED = "unopened"
    OPEN = "open"
    CLOSED = "closed"


class AvatarKit:
    """The entry point: ``AvatarKit.from_config("avatarkit.toml")`` or ``AvatarKit(config)``.

    Pass ``http_client`` to share your own ``httpx.AsyncClient`` (the kit then leaves it open),
    ``status_source`` to supply consent status lists from your own code,
    ``consent_store`` to use a consent ledger other than the configured SQLite file, and
    ``ledger`` a session ledger other than ``[metering] ledger`` (the kit leaves what you pass
    open).
    """

    def __init__(
        self,
        config: KitConfig | None = None,
        *,
        http_client: httpx.AsyncClient | None = None,
        status_source: StatusListSource | None = None,
        consent_store: ConsentStore | None = None,
        ledger: SessionLedger | None = None,
    ) -> None:
        self.config = config if config is not None else KitConfig()
        self._owns_http = http_client is None
        self._http = http_client if http_client is not None else new_http_client()
        self._gate: ConsentGate | None = None
        if self.config.consent is not None:
            from .consent.enforce import ConsentGate

            self._gate = ConsentGate.from_config(
                self.config.consent, http=self._http, status_source=status_source,
                store=consent_store)
        from .disclosure.notice import load_notice_key

        self._notice_key = load_notice_key(
            self.config.disclosure.notice_key,
            generated_note="kit; publish kit.disclosure_jwks() to viewers"
            if self.config.consent is not None else None)
        settings = self.config.provider_settings()
        self._providers: dict[str, Provider] = {
            name: get_provider_class(s.kind or name)(s, http=self._http, instance_name=name)
            for name, s in settings.items()
        }
        self.catalog = Catalog.from_config(self.config.avatars)
        self._router = Router(settings, {n: p.profile for n, p in self._providers.items()},
                              policies=self.config.policies)
        self._health = HealthMonitor(self.config.health, self._providers)
        self._owns_ledger = ledger is None
        self._ledger: SessionLedger = ledger if ledger is not None else SQLiteSessionLedger(
            _ledger_path(self.config.metering.ledger))
        self._budget = BudgetGuard(
            self.config.budgets, self._ledger,
            currencies=(p.profile.currency for p in self._providers.values()))
        self._background: list[asyncio.Task[None]] = []
        self._settler = StartSettler(self._ledger)
        self._services: SessionServices | None = None
        self._sessions: weakref.WeakSet[AvatarSession] = weakref.WeakSet()
        self._state = _KitState.UNOPENED

    @classmethod
    def from_config(cls, path: str | os.PathLike[str], **overrides: Any) -> AvatarKit:
        """Build a kit from a TOML file (environment variables override the file)."""
        return cls(KitConfig.from_toml(path, **overrides))

    @property
    def providers(self) -> dict[str, Provider]:
        """The configured providers by name (a copy)."""
        return dict(self._providers)

    @property
    def ledger(self) -> SessionLedger:
        """The session ledger (``[metering] ledger``): one row per vendor session."""
        return self._ledger

    def route(
        self, avatar: str, *, purpose: str | None = None, policy: str | None = None
    ) -> RouteDecision:
        """The routing decision for a session, without starting anything (dry run). Health
        (cooldowns, observed latency) applies; the consent scope and budgets are applied
        when a session starts, after its token is verified and usage is read."""
        return self._route(self.catalog.get(avatar), purpose=purpose, policy=policy)

    def _route(self, avatar: Avatar, *, purpose: str | None, policy: str | None,
               constraints: Sequence[RouteConstraint] = ()) -> RouteDecision:
        # An unknown policy raises ConfigError: asked for, it must never be ignored.
        return self._router.route(
            avatar, purpose=purpose, policy=policy,
            constraints=(*constraints, self._health.constraint()),
            observed_latency_ms=self._health.observed_latency_ms())

    def _rules(self, policy: str | None) -> RoutingPolicy:
        return self._router.policy(policy) if policy is not None else _DEFAULT_RULES

    def health(self) -> dict[str, ProviderHealth]:
        """Each provider's health: state (healthy, cooling down, probing), observed latency
        and error rate (EWMA), recent failures, and until when it is kept out of routing."""
        return self._health.snapshot()

    async def usage_report(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        group_by: Sequence[GroupKey] = ("provider",),
    ) -> UsageReport:
        """Billed minutes and cost from the session ledger (every process sharing it),
        grouped by provider, tenant, avatar and/or plan; the last 30 days by default.
        An unknown price stays unknown (``unpriced_seconds``), never 0."""
        until = until or datetime.now(UTC)
        since = since or until - timedelta(days=30)
        return await self._ledger.report(since=since, until=until, group_by=group_by)

    async def reap(self) -> list[ReapOutcome]:
        """End, at their vendors, the sessions in the ledger whose owning process died
        (crash, SIGKILL), and close their rows. Returns what was done with each."""
        return await reap_orphans(self._ledger, self._providers,
                                  stale_after_s=self.config.metering.stale_after_s)

    def session(
        self,
        avatar: str,
        *,
        consent: str | None = None,
        purpose: str | None = None,
        policy: str | None = None,
        tenant: str | None = None,
        interrupt_ack_timeout: float | None = None,
        max_duration_s: float | None = None,
    ) -> AvatarSession:
        """A new session for ``avatar`` (not started: use ``async with``, or ``await start()``).

        ``consent`` is the consent token of the person the avatar shows and ``purpose`` what
        the session is for; the token is verified against both when the session starts,
        before anything reaches a vendor. ``tenant`` attributes usage (reports, per-tenant
        budgets). The avatar, policy and timeouts are checked here.
        """
        if self._state is _KitState.CLOSED:
            raise SessionStateError("this AvatarKit is closed")
        services = self._session_services()  # without [consent] no session starts: say so
        if not consent:
            raise ConsentRequired(
                "a session needs the consent token of the person the avatar shows "
                "(kit.session(avatar, consent=token, purpose=...))", check=ConsentCheck.MISSING)
        if not isinstance(consent, str):
            raise ConfigError(f"expected the consent token as a str, got "
                              f"{type(consent).__name__}", field="consent")
        if purpose is None or not purpose.strip():
            raise ConfigError("a session needs a purpose its consent covers "
                              "(e.g. purpose=\"customer-support\")", field="purpose")
        defaults = self.config.session
        for name, value in (("interrupt_ack_timeout", interrupt_ack_timeout),
                            ("max_duration_s", max_duration_s)):
            if value is not None and not value > 0:
                raise ConfigError(f"expected a positive number of seconds, got {value!r}",
                                  field=name)
        if tenant is not None and (not isinstance(tenant, str) or not tenant.strip()):
            raise ConfigError("expected a non-empty tenant name", field="tenant")
        if policy is not None:
            self._router.policy(policy)  # raises ConfigError for unknown policies
        session = AvatarSession(
            services,
            avatar=self.catalog.get(avatar),
            purpose=purpose,
            policy=policy,
            consent=consent,
            tenant=tenant,
            interrupt_ack_timeout=interrupt_ack_timeout or defaults.interrupt_ack_timeout,
            max_duration_s=max_duration_s or defaults.max_duration_s,
            close_timeout=defaults.close_timeout,
        )
        self._sessions.add(session)
        return session

    def _session_services(self) -> SessionServices:
        """What sessions of this kit use (built once; needs ``[consent]``)."""
        if self._services is None:
            self._services = SessionServices(
                session_defaults=self.config.session, metering=self.config.metering,
                disclosure=self.config.disclosure, consent=self._consent_gate(),
                providers=self._providers, route=self._route, rules=self._rules,
                health=self._health, ledger=self._ledger, budget=self._budget,
                sign_disclosure=self._sign_disclosure, settler=self._settler)
        return self._services

    def _consent_gate(self) -> ConsentGate:
        if self._gate is None:
            raise ConfigError(
                "sessions need a [consent] section naming the trusted consent issuers "
                "(audience, issuers, jwks): no likeness is shown without verified consent",
                field="consent")
        return self._gate

    @property
    def consent_store(self) -> ConsentStore:
        """The consent ledger and generation log (``[consent] store``)."""
        return self._consent_gate().store

    def disclosure_jwks(self) -> dict[str, Any]:
        """The public key set viewer apps verify disclosure notices with (publish it)."""
        return self.disclosure_keys().to_jwks()

    def disclosure_keys(self) -> KeySet:
        """:meth:`disclosure_jwks` as a ``KeySet`` (for ``verify_disclosure_notice``)."""
        from .consent.keys import KeySet

        return KeySet.of(self._notice_key)

    def _sign_disclosure(self, metadata: DisclosureMetadata) -> str:
        from .disclosure.notice import sign_disclosure_notice

        return sign_disclosure_notice(metadata, self._notice_key)

    async def __aenter__(self) -> Self:
        if self._state is not _KitState.UNOPENED:
            raise SessionStateError(f"cannot open an AvatarKit that is {self._state}")
        self._state = _KitState.OPEN
        await self._ledger.__aenter__()
        if self.config.health.probe:
            self._background.append(asyncio.create_task(
                self._health.run_probes(self._probe), name="avatarkit-health-probes"))
        self._background.append(asyncio.create_task(self._heartbeat(),
                                                    name="avatarkit-ledger-heartbeat"))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _probe(self, provider: str) -> None:
        await self._providers[provider].probe()

    async def _heartbeat(self) -> None:
        """Mark this process's open ledger rows alive (reapers on other hosts look at it)."""
        while True:
            await asyncio.sleep(self.config.metering.heartbeat_interval_s)
            try:
                await self._ledger.heartbeat()
            except Exception as exc:  # a busy database must not kill the kit
                logger.warning("ledger heartbeat failed: %s", exc)

    async def aclose(self) -> None:
        """Close open sessions (ending them at their vendors), providers, the ledger and the
        HTTP pool. Idempotent."""
        if self._state is _KitState.CLOSED:
            return
        self._state = _KitState.CLOSED
        open_sessions = list(self._sessions)
        results = await asyncio.gather(*(s.aclose() for s in open_sessions),
                                       return_exceptions=True)
        for task in self._background:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._background.clear()
        # Starts a caller cancelled, and creates still unsettled: finished and settled
        # before the providers close.
        await self._settler.aclose()
        await asyncio.gather(*(p.aclose() for p in self._providers.values()),
                             return_exceptions=True)
        if self._owns_ledger:
            await self._ledger.aclose()
        if self._gate is not None:
            await self._gate.aclose()
        if self._owns_http:
            await self._http.aclose()
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]

    def __repr__(self) -> str:
        return f"<AvatarKit providers={list(self._providers)} state={self._state}>"


_DEFAULT_RULES = RoutingPolicy(objective="config-order")


def _ledger_path(path: os.PathLike[str]) -> str:
    text = os.fspath(path)
    if text != ":memory:":
        os.makedirs(os.path.dirname(os.path.abspath(text)), exist_ok=True)
    return text
