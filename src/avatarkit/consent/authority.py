"""``ConsentAuthority``: a consent registry that issues tokens and publishes revocation status.

It ties the parts together for a deployment that is its own registry (or for tests and the
demo): the issuer's signing key, a :class:`~avatarkit.consent.store.ConsentStore` (ledger of
grants and status changes), and a :class:`~avatarkit.consent.status.StaticStatusListSource`
that always holds the current signed status list, so a kit reading from it sees a revocation
at its next check.

    authority = ConsentAuthority(IssuerKey.generate(), issuer="https://consent.example",
                                 store=SQLiteConsentStore("consent.db"))
    grant, token = await authority.grant(subject=..., grantor=..., avatars=["amelia"], ...,
                                         audience="acme-support")
    await authority.revoke(grant.consent_id, reason="subject withdrew consent")
"""

from __future__ import annotations

import contextlib
from types import TracebackType
from typing import Any, Self

from ..errors import ConfigError
from .grant import ConsentGrant
from .keys import IssuerKey, KeySet, TrustedIssuers
from .status import StaticStatusListSource, TokenStatus, issue_status_list_token
from .store import ConsentStore, LedgerEntry
from .tokens import issue_consent_token

__all__ = ["ConsentAuthority"]


class ConsentAuthority:
    """Issues consent tokens under ``issuer`` and keeps their status list published."""

    def __init__(
        self,
        key: IssuerKey,
        *,
        issuer: str,
        store: ConsentStore,
        status_uri: str | None = None,
        status_ttl_s: int = 60,
        source: StaticStatusListSource | None = None,
    ) -> None:
        self.key = key
        self.issuer = issuer
        self.store = store
        self.status_uri = status_uri or f"{issuer.rstrip('/')}/status/1"
        self.status_ttl_s = status_ttl_s
        #: where the current signed status list is published (give it to the kit)
        self.source = source if source is not None else StaticStatusListSource()

    @property
    def keys(self) -> KeySet:
        """The public key set verifiers pin (``[consent] jwks``)."""
        return KeySet.of(self.key)

    @property
    def trusted(self) -> TrustedIssuers:
        """:attr:`keys` pinned for :attr:`issuer` (what a verifier of this registry holds)."""
        return TrustedIssuers({self.issuer: self.keys})

    def jwks(self) -> dict[str, Any]:
        return self.keys.to_jwks()

    async def grant(self, *, audience: str | list[str], single_use: bool = False,
                    **fields: Any) -> tuple[ConsentGrant, str]:
        """Record a new grant (``ConsentGrant`` fields as keywords; ``issuer`` and ``status``
        are filled in) and return it with a token for ``audience``."""
        status = await self.store.allocate_status_index(self.status_uri)
        grant = ConsentGrant.model_validate({**fields, "issuer": self.issuer, "status": status})
        await self.store.record_grant(grant)
        await self.publish()
        return grant, issue_consent_token(grant, self.key, audience=audience,
                                          single_use=single_use)

    def token(self, grant: ConsentGrant, *, audience: str | list[str],
              single_use: bool = False) -> str:
        """Another token for a recorded grant (e.g. for a second deployment)."""
        return issue_consent_token(grant, self.key, audience=audience, single_use=single_use)

    async def revoke(self, consent_id: str, *, reason: str,
                     actor: str | None = None) -> LedgerEntry:
        """Revoke for good; sessions under it end at their next check."""
        return await self._set(consent_id, TokenStatus.INVALID, reason, actor)

    async def suspend(self, consent_id: str, *, reason: str,
                      actor: str | None = None) -> LedgerEntry:
        return await self._set(consent_id, TokenStatus.SUSPENDED, reason, actor)

    async def reinstate(self, consent_id: str, *, reason: str,
                        actor: str | None = None) -> LedgerEntry:
        return await self._set(consent_id, TokenStatus.VALID, reason, actor)

    async def _set(self, consent_id: str, status: TokenStatus, reason: str,
                   actor: str | None) -> LedgerEntry:
        entry = await self.store.set_status(consent_id, status, reason=reason, actor=actor)
        await self.publish()
        return entry

    async def publish(self) -> str:
        """Sign the current status list and publish it to :attr:`source`; returns it."""
        status_list = await self.store.status_list(self.status_uri)
        token = issue_status_list_token(status_list, self.key, uri=self.status_uri,
                                        ttl_s=self.status_ttl_s, issuer=self.issuer)
        self.source.publish(self.status_uri, token)
        return token

    async def __aenter__(self) -> Self:
        # A reopened registry publishes the list it already has; a new one has none yet.
        with contextlib.suppress(ConfigError):
            await self.publish()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the store. Idempotent."""
        await self.store.aclose()
