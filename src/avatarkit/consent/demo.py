"""Demo consent: a throwaway consent registry for trying the SDK on the bundled sample avatar
(``avatarkit demo``, ``avatarkit render --demo-consent``).

It is the real machinery, not a bypass: an in-memory registry with a fresh Ed25519 key
records a grant (its evidence marked ``demo://``), issues a token, publishes a signed status
list, and a :class:`~avatarkit.consent.enforce.ConsentGate` that trusts only that registry
verifies the token and writes the generation log. The grant is valid for an hour, for
purpose ``demo`` and the self-hosted engine only; nothing outside the process trusts it.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Self

import httpx

from ..config import ConsentConfig
from .authority import ConsentAuthority
from .enforce import ConsentGate
from .keys import IssuerKey
from .store import ConsentStore, SQLiteConsentStore

__all__ = ["DEMO_AUDIENCE", "DEMO_ISSUER", "DEMO_PURPOSE", "DemoConsent"]

DEMO_ISSUER = "https://consent.demo.invalid"
DEMO_AUDIENCE = "avatarkit-demo"
DEMO_PURPOSE = "demo"


class DemoConsent:
    """``async with DemoConsent("sample") as demo:`` then ``demo.token``, ``demo.gate``.

    ``store`` keeps the consent ledger and generation log (default: in memory);
    ``providers`` the providers the grant allows (default: the local engine only).
    """

    def __init__(self, avatar: str, *, store: ConsentStore | None = None,
                 providers: tuple[str, ...] = ("local",), valid_for_s: float = 3600) -> None:
        self.avatar = avatar
        self.subject_ref = f"subj_demo_{avatar}"
        self._providers = list(providers)
        self._valid_for = timedelta(seconds=valid_for_s)
        self.authority = ConsentAuthority(
            IssuerKey.generate(), issuer=DEMO_ISSUER,
            store=store if store is not None else SQLiteConsentStore(":memory:"),
            status_ttl_s=60)
        self._http = httpx.AsyncClient()
        self._gate: ConsentGate | None = None
        self.token = ""
        self.consent_id = ""
        self._closed = False

    @property
    def gate(self) -> ConsentGate:
        if self._gate is None:
            raise RuntimeError("enter the DemoConsent first")
        return self._gate

    def consent_config(self) -> dict[str, Any]:
        """The ``[consent]`` section of a kit that trusts this registry."""
        return {"audience": DEMO_AUDIENCE, "issuers": [DEMO_ISSUER],
                "jwks": self.authority.jwks()}

    async def __aenter__(self) -> Self:
        await self.authority.__aenter__()
        try:
            now = datetime.now(UTC)
            evidence = hashlib.sha256(f"demo consent for {self.avatar}".encode()).hexdigest()
            grant, self.token = await self.authority.grant(
                audience=DEMO_AUDIENCE,
                subject={"subject_ref": self.subject_ref,
                         "display_name": f"{self.avatar} (demo)"},
                grantor={"role": "self", "grantor_ref": self.subject_ref},
                avatars=[self.avatar], purposes=[DEMO_PURPOSE], channels=["live", "recorded"],
                providers=self._providers,
                valid_from=now - timedelta(minutes=1), expires_at=now + self._valid_for,
                evidence={"recording_sha256": evidence,
                          "storage_ref": f"demo://consent/{self.avatar}",
                          "challenge_phrase": "demo only, not a real consent"},
            )
            self.consent_id = grant.consent_id
            self._gate = ConsentGate.from_config(
                ConsentConfig.model_validate(self.consent_config()), http=self._http,
                status_source=self.authority.source, store=self.authority.store)
        except BaseException:
            await self.aclose()
            raise
        return self

    async def aclose(self) -> None:
        """Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._gate is not None:
            await self._gate.aclose()  # does not own the authority's store
            self._gate = None
        await self._http.aclose()
        await self.authority.aclose()

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()
