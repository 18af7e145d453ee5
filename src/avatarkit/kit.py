"""``AvatarKit``: holds the configured providers, the router and the shared HTTP client.

``kit.session(...)`` makes sessions; ``kit.route(...)`` shows the routing decision without
starting anything. The kit is an async context manager; closing it closes every session it
made that is still open (ending them at their vendors), then the providers and the HTTP pool.
"""

from __future__ import annotations

import asyncio
import os
import weakref
from enum import StrEnum
from types import TracebackType
from typing import Any, Self

import httpx

from ._config import KitConfig
from .catalog import Catalog
from .errors import ConfigError, SessionStateError
from .providers._http import new_http_client
from .providers.base import Provider
from .providers.registry import get_provider_class
from .routing.router import RouteDecision, Router
from .session import AvatarSession

__all__ = ["AvatarKit"]


class _KitState(StrEnum):
    UNOPENED = "unopened"
    OPEN = "open"
    CLOSED = "closed"


class AvatarKit:
    """The entry point: ``AvatarKit.from_config("avatarkit.toml")`` or ``AvatarKit(config)``.

    Pass ``http_client`` to share your own ``httpx.AsyncClient`` (the kit then leaves it open).
    """

    def __init__(
        self, config: KitConfig | None = None, *, http_client: httpx.AsyncClient | None = None
    ) -> None:
        self.config = config if config is not None else KitConfig()
        self._owns_http = http_client is None
        self._http = http_client if http_client is not None else new_http_client()
        settings = self.config.provider_settings()
        self._providers: dict[str, Provider] = {
            name: get_provider_class(name)(s, http=self._http) for name, s in settings.items()
        }
        self.catalog = Catalog.from_config(self.config.avatars)
        self._router = Router(settings, {n: p.profile for n, p in self._providers.items()})
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

    def route(
        self, avatar: str, *, purpose: str | None = None, policy: str | None = None
    ) -> RouteDecision:
        """The routing decision for a session, without starting anything (dry run)."""
        if policy is not None:
            # Fail closed: a policy that is asked for but not configured must not be ignored.
            raise ConfigError(f"unknown policy {policy!r}: no policies are configured",
                              field="policy")
        return self._router.route(self.catalog.get(avatar), purpose=purpose, policy=policy)

    def session(
        self,
        avatar: str,
        *,
        consent: str | None = None,
        purpose: str | None = None,
        policy: str | None = None,
        interrupt_ack_timeout: float | None = None,
        max_duration_s: float | None = None,
    ) -> AvatarSession:
        """A new session for ``avatar`` (not started: use ``async with``, or ``await start()``).

        The avatar, policy and timeouts are checked here, before anything reaches a vendor.
        """
        if self._state is _KitState.CLOSED:
            raise SessionStateError("this AvatarKit is closed")
        defaults = self.config.session
        for name, value in (("interrupt_ack_timeout", interrupt_ack_timeout),
                            ("max_duration_s", max_duration_s)):
            if value is not None and not value > 0:
                raise ConfigError(f"expected a positive number of seconds, got {value!r}",
                                  field=name)
        if policy is not None:
            self.route(avatar, purpose=purpose, policy=policy)  # raises for unknown policies
        session = AvatarSession(
            self,
            avatar=self.catalog.get(avatar),
            purpose=purpose,
            policy=policy,
            consent=consent,
            interrupt_ack_timeout=interrupt_ack_timeout or defaults.interrupt_ack_timeout,
            max_duration_s=max_duration_s or defaults.max_duration_s,
            close_timeout=defaults.close_timeout,
        )
        self._sessions.add(session)
        return session

    def _provider(self, name: str) -> Provider:
        return self._providers[name]

    async def __aenter__(self) -> Self:
        if self._state is not _KitState.UNOPENED:
            raise SessionStateError(f"cannot open an AvatarKit that is {self._state}")
        self._state = _KitState.OPEN
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close open sessions (ending them at their vendors), providers and the HTTP pool.
        Idempotent."""
        if self._state is _KitState.CLOSED:
            return
        self._state = _KitState.CLOSED
        open_sessions = list(self._sessions)
        results = await asyncio.gather(*(s.aclose() for s in open_sessions),
                                       return_exceptions=True)
        await asyncio.gather(*(p.aclose() for p in self._providers.values()),
                             return_exceptions=True)
        if self._owns_http:
            await self._http.aclose()
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]

    def __repr__(self) -> str:
        return f"<AvatarKit providers={list(self._providers)} state={self._state}>"
