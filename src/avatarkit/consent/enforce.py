"""The kit's consent checkpoint: no session starts without a verified, in-scope consent token.

:class:`ConsentGate` is built from the ``[consent]`` config section. A session asks it to
:meth:`~ConsentGate.admit` its token before anything reaches a vendor (signature, issuer,
audience, validity window, avatar, purpose, channel, modality, revocation status), turns the
verified grant into a routing constraint (:class:`ConsentRouteConstraint`: providers, regions
and vendor-side ids the grant allows), and re-checks the status on an interval while live.
Every admission, refusal and status check goes into the generation log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import httpx

from ..catalog import Avatar
from ..config import ConsentConfig
from ..contract import ProviderProfile
from ..errors import ConfigError, ConsentCheck, ConsentOutOfScope, ConsentViolation
from .grant import Channel, Modality
from .keys import KeySet, TrustedIssuers
from .status import (
    FileStatusListSource,
    HttpStatusListSource,
    StatusChecker,
    StatusListSource,
    TokenStatus,
)
from .store import ConsentStore, GenerationRecord, SQLiteConsentStore
from .tokens import ConsentRequest, ConsentVerifier, VerifiedConsent

__all__ = ["ConsentGate", "ConsentRouteConstraint"]

logger = logging.getLogger("avatarkit.consent")


class _ConfiguredStatusSource(StatusListSource):
    """Local files for the URIs the config maps, HTTP for any other http(s) URI."""

    def __init__(self, files: Mapping[str, Path], http: httpx.AsyncClient) -> None:
        self._files = FileStatusListSource(files) if files else None
        self._known = frozenset(files)
        self._http = HttpStatusListSource(http)

    async def fetch(self, uri: str) -> str:
        if self._files is not None and uri in self._known:
            return await self._files.fetch(uri)
        if uri.startswith(("https://", "http://")):
            return await self._http.fetch(uri)
        raise LookupError(f"no source for status list {uri!r}: map it under "
                          "[consent.status_lists] or use an http(s) URI")


def _trusted_issuers(config: ConsentConfig) -> TrustedIssuers:
    """``[consent]``'s issuers, each with the key set pinned for it (``jwks``)."""
    sets: dict[str, KeySet] = {}
    single = not isinstance(config.jwks, dict) or "keys" in config.jwks  # one JWKS, one issuer
    for issuer, jwks in config.jwks_by_issuer().items():
        field = "consent.jwks" if single else f"consent.jwks.{issuer}"
        try:
            sets[issuer] = KeySet.load(jwks) if isinstance(jwks, Path) \
                else KeySet.from_jwks(jwks)
        except ConfigError as exc:
            raise ConfigError(str(exc), field=field) from None
    try:
        return TrustedIssuers(sets)
    except ConfigError as exc:
        raise ConfigError(str(exc), field="consent.jwks") from None


class ConsentRouteConstraint:
    """The grant's scope as a routing constraint: only providers it names (or any), only
    regions it allows (an unknown region fails closed), only the vendor ids it lists."""

    name = "consent"

    def __init__(self, verified: VerifiedConsent) -> None:
        self._verified = verified

    def exclusion(self, provider: str, profile: ProviderProfile, avatar_id: str) -> str | None:
        v = self._verified
        vendor = profile.vendor or provider  # consent names vendors; a section may alias one
        if not v.allows_provider(vendor):
            return f"consent {v.consent_id} does not allow provider {vendor}"
        if not v.allows_vendor_id(vendor, avatar_id):
            return f"consent {v.consent_id} does not cover {vendor} id {avatar_id}"
        regions = profile.regions
        if regions is None:
            if not v.allows_region(None):
                return f"consent {v.consent_id} limits regions; {provider}'s region is unknown"
        else:
            refused = sorted(r for r in regions if not v.allows_region(r))
            if refused:
                return (f"consent {v.consent_id} does not allow region(s) "
                        f"{', '.join(refused)} where {provider} renders")
        return None


class ConsentGate:
    """Verifier + status checker + ledger of one kit. Use :meth:`from_config`."""

    def __init__(self, verifier: ConsentVerifier, store: ConsentStore, *,
                 recheck_interval_s: float, owns_store: bool = True) -> None:
        self.verifier = verifier
        self.store = store
        self.recheck_interval_s = recheck_interval_s
        self._owns_store = owns_store

    @classmethod
    def from_config(
        cls,
        config: ConsentConfig,
        *,
        http: httpx.AsyncClient,
        status_source: StatusListSource | None = None,
        store: ConsentStore | None = None,
        clock: Callable[[], float] = time.time,
    ) -> ConsentGate:
        keys = _trusted_issuers(config)
        source = status_source or _ConfiguredStatusSource(config.status_lists, http)
        checker = StatusChecker(keys, source, max_age_s=config.max_status_age_s, clock=clock)
        owns_store = store is None
        if store is None:
            if config.store is None:
                logger.warning("no [consent] store configured: the consent ledger and "
                               "generation log are kept in memory and lost at exit")
            store = SQLiteConsentStore(config.store or ":memory:")
        verifier = ConsentVerifier(
            keys, audience=config.audience, status=checker, replay=store,
            leeway_s=config.leeway_s, clock=clock)
        return cls(verifier, store, recheck_interval_s=config.recheck_interval_s,
                   owns_store=owns_store)

    async def admit(
        self,
        token: str,
        *,
        avatar: Avatar,
        purpose: str,
        generation_id: str,
        channel: Channel = "live",
        modalities: frozenset[Modality] = frozenset({"face_video", "voice"}),
        language: str | None = None,
    ) -> VerifiedConsent:
        """Verify ``token`` for showing ``avatar`` for ``purpose``; log the outcome."""
        request = ConsentRequest(avatar=avatar.name, purpose=purpose, channel=channel,
                                 modalities=modalities, language=language)
        try:
            verified = await self.verifier.verify(token, request)
            if avatar.consent_subject is not None and \
                    verified.subject_ref != avatar.consent_subject:
                raise ConsentOutOfScope(
                    f"the consent is for another person than the one avatar {avatar.name!r} "
                    "shows (its consent_subject)", check=ConsentCheck.AVATAR,
                    consent_id=verified.consent_id)
        except ConsentViolation as exc:
            await self.log(GenerationRecord(
                generation_id=generation_id, kind="consent_refused",
                consent_id=exc.consent_id, status_check=str(exc.check), purpose=purpose,
                channel=channel, language=language, avatar=avatar.name,
                details={"error": type(exc).__name__}))
            raise
        return verified

    async def recheck(self, verified: VerifiedConsent, *,
                      fresh_within_s: float | None = None) -> TokenStatus:
        """Expiry and revocation status of an admitted consent, with a status list no older
        than ``fresh_within_s`` (default: the recheck interval). Raises
        ``ConsentViolation`` subclasses."""
        fresh = self.recheck_interval_s if fresh_within_s is None else fresh_within_s
        return await self.verifier.recheck(verified, fresh_within_s=fresh)

    async def log(self, record: GenerationRecord) -> None:
        """Append to the generation log; a failing log is reported, never raised over the
        outcome it records."""
        try:
            await self.store.log_generation(record)
        except Exception:  # the log must never hide the outcome it records
            logger.exception("could not write generation log entry %s for %s",
                             record.kind, record.generation_id)

    async def aclose(self) -> None:
        if self._owns_store:
            await self.store.aclose()
