"""Consent tokens: a signed, offline-verifiable statement that a grant covers a request.

A consent token is a compact JWS (``alg: EdDSA``, ``typ: avk-consent+jwt``, ``kid`` = the
issuer key's thumbprint) whose claims copy the grant's scope (research notes section 4.4):

``iss``, ``sub`` (pseudonymous subject ref), ``aud``, ``iat``, ``nbf``, ``exp``, ``jti``
(= consent id), ``rec`` (SHA-256 of the canonical consent record), ``evd`` (SHA-256 of the
consent recording), ``scope``, ``status.status_list{idx, uri}`` and ``once`` (single use).
No display name or other personal data goes in: tokens travel to vendors and logs.

:class:`ConsentVerifier` checks a token in a fixed order, each step raising one
:class:`~avatarkit.errors.ConsentViolation` subclass with a precise ``check``. The order is
chosen for safety: the algorithm is judged from the header before any key is touched (so the
HS256-with-the-public-key-as-secret confusion cannot reach a MAC routine); the only thing
read from the payload before the signature verifies is ``iss``, to pick the keys pinned for
that issuer (:class:`~.keys.TrustedIssuers`), so a token re-signed with another trusted
issuer's key does not verify; every other claim is judged after the signature. Error
messages and log lines never contain the token text; logs name at most the consent id.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import math
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Sequence
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import (
    ConfigError,
    ConsentCheck,
    ConsentExpired,
    ConsentOutOfScope,
    ConsentReplayed,
    ConsentStatusUnavailable,
    ConsentViolation,
    ConsentWithdrawn,
    InvalidConsentToken,
)
from .grant import ANY, Channel, ConsentGrant, Modality, StatusReference
from .keys import ALGORITHM, IssuerKey, KeySet, TrustedIssuers, parse_compact, signature_valid
from .status import StatusChecker, TokenStatus

__all__ = [
    "CONSENT_TOKEN_TYPE",
    "ConsentRequest",
    "ConsentScope",
    "ConsentVerifier",
    "MemoryReplayGuard",
    "ReplayGuard",
    "VerifiedConsent",
    "issue_consent_token",
]

logger = logging.getLogger("avatarkit.consent.tokens")

#: JWS ``typ`` of a consent token. Explicit typing (RFC 8725 section 3.11) stops a token
#: minted for another purpose by the same key (a status list...) being accepted as consent.
CONSENT_TOKEN_TYPE = "avk-consent+jwt"

#: A jti read from a not-yet-verified token is reported as ``consent_id`` only if it looks
#: like an id: attacker-chosen text must not flow into logs and error reports verbatim.
_SAFE_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def _tuple_of_distinct(values: tuple[str, ...]) -> tuple[str, ...]:
    if any(not v for v in values) or len(set(values)) != len(values):
        raise ValueError("entries must be distinct non-empty strings")
    return values


class _Frozen(BaseModel):
    # extra="forbid": an issuer that adds a restriction this verifier does not know must get
    # a refusal, not a verifier that silently ignores the restriction (fail closed).
    model_config = ConfigDict(frozen=True, extra="forbid")


class ConsentScope(_Frozen):
    """The token's ``scope`` claim: what the grant allows. ``providers``/``regions`` None
    means any; ``prohibited`` purposes are refused even if listed in ``purposes``."""

    avatars: tuple[str, ...] = Field(min_length=1)
    vendor_ids: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    modalities: tuple[Modality, ...] = Field(min_length=1)
    purposes: tuple[str, ...] = Field(min_length=1)
    prohibited: tuple[str, ...] = ()
    channels: tuple[Channel, ...] = Field(min_length=1)
    languages: tuple[str, ...] = Field(min_length=1)
    providers: tuple[str, ...] | None = None
    regions: tuple[str, ...] | None = None

    @model_validator(mode="after")
    def _distinct(self) -> ConsentScope:
        for values in (self.avatars, self.purposes, self.prohibited, self.languages,
                       self.providers or (), self.regions or (), *self.vendor_ids.values()):
            _tuple_of_distinct(values)
        return self

    @classmethod
    def from_grant(cls, grant: ConsentGrant) -> ConsentScope:
        return cls(
            avatars=tuple(grant.avatars),
            vendor_ids={p: tuple(ids) for p, ids in sorted(grant.vendor_ids.items())},
            modalities=tuple(grant.modalities),
            purposes=tuple(grant.purposes),
            prohibited=tuple(sorted(grant.prohibited)),
            channels=tuple(grant.channels),
            languages=tuple(grant.languages),
            providers=None if grant.providers is None else tuple(grant.providers),
            regions=None if grant.regions is None else tuple(grant.regions),
        )

    def allows_purpose(self, purpose: str) -> bool:
        return purpose in self.purposes and purpose not in self.prohibited

    def allows_language(self, tag: str) -> bool:
        """RFC 4647 basic filtering with the granted tags as ranges: ``en`` allows ``en``
        and ``en-GB``; ``en-GB`` does not allow ``en`` or ``en-US``. Case-insensitive, as
        BCP 47 tags are. ``*`` allows any language."""
        if ANY in self.languages:
            return True
        wanted = tag.lower()
        return any(wanted == g.lower() or wanted.startswith(g.lower() + "-")
                   for g in self.languages)

    def allows_provider(self, name: str) -> bool:
        return self.providers is None or name in self.providers

    def allows_region(self, region: str | None) -> bool:
        if self.regions is None:
            return True
        return region is not None and region in self.regions

    def allows_vendor_id(self, provider: str, vendor_id: str) -> bool:
        ids = self.vendor_ids.get(provider)
        return ids is None or vendor_id in ids


class ConsentRequest(_Frozen):
    """What a caller wants to do with the likeness. ``provider``/``region``/``vendor_id``
    are optional here because routing may decide them later
    (:meth:`VerifiedConsent.check_route`)."""

    avatar: str = Field(min_length=1)
    purpose: str = Field(min_length=1)
    channel: Channel = "live"
    modalities: frozenset[Modality] = Field(default=frozenset({"face_video", "voice"}),
                                            min_length=1)
    language: str | None = None
    provider: str | None = None
    region: str | None = None
    vendor_id: str | None = None

    @model_validator(mode="after")
    def _vendor_needs_provider(self) -> ConsentRequest:
        if self.vendor_id is not None and self.provider is None:
            raise ValueError("vendor_id needs provider (vendor ids are per provider)")
        return self


class VerifiedConsent(_Frozen):
    """A token that passed every check. Carries no token text: ``token_sha256`` links it to
    the token (generation log, disclosure message) without making it replayable."""

    consent_id: str
    issuer: str
    subject_ref: str
    audience: tuple[str, ...]
    issued_at: datetime
    not_before: datetime
    expires_at: datetime
    scope: ConsentScope
    record_hash: str
    evidence_sha256: str | None
    token_sha256: str
    status_ref: StatusReference | None
    single_use: bool
    #: the status-list answer at verification; None when the token has no status reference
    #: or this verifier does not check status
    status: TokenStatus | None = None

    def allows_provider(self, name: str) -> bool:
        return self.scope.allows_provider(name)

    def allows_region(self, region: str | None) -> bool:
        """Whether the grant allows rendering in ``region``. An unknown region (None) is
        refused whenever the grant restricts regions: fail closed."""
        return self.scope.allows_region(region)

    def allows_vendor_id(self, provider: str, vendor_id: str) -> bool:
        """If the grant lists vendor-side ids for ``provider``, ``vendor_id`` must be one."""
        return self.scope.allows_vendor_id(provider, vendor_id)

    def check_route(self, provider: str, region: str | None,
                    vendor_id: str | None = None) -> None:
        """Raise :class:`ConsentOutOfScope` unless the grant allows rendering with
        ``provider`` in ``region`` (and with ``vendor_id`` there, when given)."""
        if not self.allows_provider(provider):
            raise ConsentOutOfScope(f"the consent does not allow provider {provider!r}",
                                    check=ConsentCheck.PROVIDER, consent_id=self.consent_id)
        if not self.allows_region(region):
            what = "an unknown region" if region is None else f"region {region!r}"
            raise ConsentOutOfScope(f"the consent does not allow rendering in {what}",
                                    check=ConsentCheck.REGION, consent_id=self.consent_id)
        if vendor_id is not None and not self.allows_vendor_id(provider, vendor_id):
            raise ConsentOutOfScope(
                f"the consent does not cover this {provider} avatar id",
                check=ConsentCheck.PROVIDER, consent_id=self.consent_id)


def _aware(value: datetime, field: str) -> datetime:
    if value.tzinfo is None:
        raise ConfigError("must be timezone-aware", field=field)
    return value


def issue_consent_token(
    grant: ConsentGrant,
    key: IssuerKey,
    *,
    audience: str | Sequence[str],
    issued_at: datetime | None = None,
    not_before: datetime | None = None,
    expires_at: datetime | None = None,
    single_use: bool = False,
) -> str:
    """Sign a consent token for ``grant``, valid for ``audience`` (deployment ids).

    The token's window defaults to the grant's and may only narrow it: a token outliving
    its grant would keep consent alive after the record says it ended. ``nbf`` is rounded
    up and ``exp`` down to whole seconds for the same reason.
    """
    aud: str | list[str]
    if isinstance(audience, str):
        if not audience:
            raise ConfigError("must not be empty", field="audience")
        aud = audience
    else:
        aud = list(audience)
        if not aud or any(not isinstance(a, str) or not a for a in aud):
            raise ConfigError("must be one or more non-empty strings", field="audience")
    nbf_at = _aware(not_before, "not_before") if not_before is not None else grant.valid_from
    exp_at = _aware(expires_at, "expires_at") if expires_at is not None else grant.expires_at
    if nbf_at < grant.valid_from:
        raise ConfigError("the token cannot start before the grant's valid_from",
                          field="not_before")
    if exp_at > grant.expires_at:
        raise ConfigError("the token cannot outlive the grant (after its expires_at)",
                          field="expires_at")
    nbf, exp = math.ceil(nbf_at.timestamp()), math.floor(exp_at.timestamp())
    if exp <= nbf:
        raise ConfigError("must be after not_before", field="expires_at")
    iat = int(_aware(issued_at, "issued_at").timestamp()) if issued_at is not None \
        else int(time.time())
    claims: dict[str, Any] = {
        "iss": grant.issuer,
        "sub": grant.subject.subject_ref,
        "aud": aud,
        "iat": iat,
        "nbf": nbf,
        "exp": exp,
        "jti": grant.consent_id,
        "rec": grant.record_hash(),
        "evd": grant.evidence.recording_sha256,
        "scope": ConsentScope.from_grant(grant).model_dump(mode="json"),
    }
    if grant.status is not None:
        claims["status"] = {"status_list": {"idx": grant.status.idx, "uri": grant.status.uri}}
    if single_use:
        claims["once"] = True
    return key.sign(claims, typ=CONSENT_TOKEN_TYPE)


class ReplayGuard(ABC):
    """Remembers the ids of single-use tokens already spent. Shared by every verifier of a
    deployment (a ledger table in production) so a token is spent once across processes."""

    @abstractmethod
    async def claim(self, jti: str, expires_at: float) -> bool:
        """True the first time ``jti`` is claimed, False afterwards. The entry may be
        forgotten after ``expires_at`` (the token's ``exp``: by then the expiry check
        refuses it anyway)."""


class MemoryReplayGuard(ReplayGuard):
    """In-process replay guard (one process, or tests). Expired entries are dropped as new
    claims come in, so memory is bounded by the tokens still valid."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._seen: dict[str, float] = {}
        self._expiry: list[tuple[float, str]] = []

    async def claim(self, jti: str, expires_at: float) -> bool:
        now = self._clock()
        while self._expiry and self._expiry[0][0] < now:
            _, old = heapq.heappop(self._expiry)
            if self._seen.get(old, math.inf) < now:
                del self._seen[old]
        if jti in self._seen:
            self._seen[jti] = max(self._seen[jti], expires_at)
            return False
        self._seen[jti] = expires_at
        heapq.heappush(self._expiry, (expires_at, jti))
        return True

    def __len__(self) -> int:
        return len(self._seen)


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and \
        math.isfinite(value)


def _when(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


class ConsentVerifier:
    """Verifies consent tokens against the keys pinned for their issuer, this deployment's
    audience, the clock, the request, the status list and (single use) a replay guard.

    Verification is offline: only the status source may touch the network.

    ``keys`` is a :class:`~.keys.TrustedIssuers` (each trusted issuer with its own key set),
    or a :class:`KeySet` together with ``issuers`` naming exactly one issuer. With several
    issuers, the status checker must pin keys per issuer too.

    ``require_status`` (default) refuses tokens without a status reference: a consent that
    cannot be revoked is not one. It needs a ``status`` checker. With
    ``require_status=False`` and no checker, status is not checked at all.

    A single-use token presented to a verifier without a replay guard is refused with
    :class:`ConsentReplayed` (fail closed, and a policy refusal the caller already handles,
    rather than a config error that might be retried elsewhere).

    ``leeway_s`` tolerates issuer clocks slightly ahead for ``nbf`` and ``iat`` (a token
    issued further in the future is refused: its issuer's clock is wrong, or it was minted to
    outlive a revocation); ``exp`` is exact: consent ends when it says.
    """

    def __init__(
        self,
        keys: TrustedIssuers | KeySet,
        *,
        issuers: Collection[str] | None = None,
        audience: str,
        status: StatusChecker | None,
        replay: ReplayGuard | None = None,
        require_status: bool = True,
        leeway_s: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if issuers is not None and (isinstance(issuers, str) or not issuers or
                                    any(not isinstance(i, str) or not i for i in issuers)):
            raise ConfigError("must be a non-empty collection of issuer names", field="issuers")
        if isinstance(keys, KeySet):
            if issuers is None:
                raise ConfigError("name the issuer the key set is pinned for",
                                  field="issuers")
            keys = TrustedIssuers.bind(keys, issuers)
        elif issuers is not None and frozenset(issuers) != frozenset(keys):
            raise ConfigError("must be the issuers of the TrustedIssuers (or left out)",
                              field="issuers")
        if status is not None and not status.issuer_bound and len(keys) > 1:
            raise ConfigError("the status checker shares one key set among several issuers "
                              "(each could publish lists for the others): give it the "
                              "TrustedIssuers", field="status")
        if not audience:
            raise ConfigError("must name this deployment", field="audience")
        if require_status and status is None:
            raise ConfigError("require_status needs a StatusChecker", field="status")
        if leeway_s < 0:
            raise ConfigError("must not be negative", field="leeway_s")
        self._trusted = keys
        self._audience = audience
        self._status = status
        self._replay = replay
        self._require_status = require_status
        self._leeway = leeway_s
        self._clock = clock

    async def verify(self, token: str, request: ConsentRequest | None = None, *,
                     record: ConsentGrant | None = None) -> VerifiedConsent:
        """Verify ``token`` (and, when given, that it covers ``request`` and was issued
        for ``record``). Raises a :class:`ConsentViolation` subclass naming the failed
        check."""
        try:
            verified = await self._verify(token, request, record)
        except ConsentViolation as exc:
            logger.info("consent refused: check=%s consent_id=%s", exc.check.value,
                        exc.consent_id)
            raise
        logger.debug("consent %s verified", verified.consent_id)
        return verified

    async def recheck(self, verified: VerifiedConsent, *,
                      fresh_within_s: float | None = None) -> TokenStatus:
        """Re-check a live session's consent: expiry, then status.

        The status list is fetched again once its ``ttl`` has passed, or once it is older
        than ``fresh_within_s`` when given (the session's re-check interval). Returns
        ``VALID`` when status checking is off (no reference and not required, or no
        checker); raises :class:`ConsentExpired`, :class:`ConsentWithdrawn` or
        :class:`ConsentStatusUnavailable` otherwise.
        """
        cid = verified.consent_id
        if self._clock() >= verified.expires_at.timestamp():
            raise ConsentExpired("the consent token has expired", check=ConsentCheck.EXPIRED,
                                 consent_id=cid)
        status = await self._check_status(verified.status_ref, verified.issuer, cid,
                                          fresh_within_s)
        return TokenStatus.VALID if status is None else status

    @property
    def issuers(self) -> frozenset[str]:
        """The trusted issuers."""
        return frozenset(self._trusted)

    async def _check_status(self, ref: StatusReference | None, issuer: str, cid: str,
                            fresh_within_s: float | None = None) -> TokenStatus | None:
        """The checked status, or None when status checking is off for this token."""
        if ref is None:
            if self._require_status:
                raise InvalidConsentToken("the token has no status reference and this "
                                          "verifier requires one", check=ConsentCheck.CLAIMS,
                                          consent_id=cid)
            return None
        if self._status is None:
            return None
        try:
            status = await self._status.status(ref, issuer=issuer,
                                               max_cache_age_s=fresh_within_s)
        except ConsentStatusUnavailable as exc:
            exc.consent_id = cid
            raise
        if status is TokenStatus.INVALID:
            raise ConsentWithdrawn("the consent has been revoked", check=ConsentCheck.REVOKED,
                                   consent_id=cid)
        if status is not TokenStatus.VALID:
            # SUSPENDED, and APPLICATION_SPECIFIC which avatarkit gives no meaning: refuse
            raise ConsentWithdrawn(f"the consent is suspended (status {status.name})",
                                   check=ConsentCheck.SUSPENDED, consent_id=cid)
        return status

    async def _verify(self, token: str, request: ConsentRequest | None,
                      record: ConsentGrant | None) -> VerifiedConsent:
        # 1. shape: three base64url segments, header and payload JSON objects
        try:
            header, claims = parse_compact(token)
        except ValueError as exc:
            raise InvalidConsentToken(f"not a compact JWS consent token: {exc}",
                                      check=ConsentCheck.MALFORMED) from None
        jti = claims.get("jti")
        cid = jti if isinstance(jti, str) and _SAFE_ID.fullmatch(jti) else None

        # 2. header: algorithm first, from the header alone, before any key is looked at
        alg = header.get("alg")
        if alg != ALGORITHM:
            shown = alg[:16] if isinstance(alg, str) else type(alg).__name__  # repr'd below
            raise InvalidConsentToken(f"algorithm {shown!r} is not allowed (EdDSA only)",
                                      check=ConsentCheck.ALGORITHM, consent_id=cid)
        if header.get("typ") != CONSENT_TOKEN_TYPE:
            raise InvalidConsentToken(f"typ is not {CONSENT_TOKEN_TYPE}",
                                      check=ConsentCheck.TYPE, consent_id=cid)
        # 3. the keys pinned for the token's issuer (iss read unverified, only to pick them)
        iss = claims.get("iss")
        if not isinstance(iss, str) or not iss:
            raise InvalidConsentToken("claim iss is missing or not a non-empty string",
                                      check=ConsentCheck.CLAIMS, consent_id=cid)
        try:
            keys = self._trusted.keys_for(iss)
        except InvalidConsentToken as exc:
            exc.consent_id = cid
            raise
        kid = header.get("kid")
        if not isinstance(kid, str) or kid not in keys:
            raise InvalidConsentToken("kid is missing or not a key pinned for the token's "
                                      "issuer", check=ConsentCheck.KEY, consent_id=cid)

        # 4. signature (PyJWT, EdDSA only, the pinned key object)
        if not signature_valid(token, keys.get(kid)):
            raise InvalidConsentToken("the signature does not verify",
                                      check=ConsentCheck.SIGNATURE, consent_id=cid)

        # 5. claims present and well-typed
        c = self._claims(claims, cid)
        cid = c.consent_id

        # 6. audience, issue time, validity window
        if self._audience not in c.audience:
            raise InvalidConsentToken("the token is not for this audience",
                                      check=ConsentCheck.AUDIENCE, consent_id=cid)
        now = self._clock()
        if c.issued_at.timestamp() > now + self._leeway:
            raise InvalidConsentToken("the token was issued in the future (iat ahead of this "
                                      "clock by more than the leeway)",
                                      check=ConsentCheck.ISSUED_AT, consent_id=cid)
        if c.not_before.timestamp() > now + self._leeway:
            raise ConsentExpired("the consent token is not valid yet",
                                 check=ConsentCheck.NOT_YET_VALID, consent_id=cid)
        if now >= c.expires_at.timestamp():
            raise ConsentExpired("the consent token has expired", check=ConsentCheck.EXPIRED,
                                 consent_id=cid)

        # 7. the consent record it claims to stand for
        if record is not None and (record.consent_id != c.consent_id
                                   or record.record_hash() != c.record_hash):
            raise InvalidConsentToken("the token was not issued for this consent record",
                                      check=ConsentCheck.RECORD, consent_id=cid)

        # 8. scope against the request
        if request is not None:
            self._check_request(c, request)

        # 9. revocation status, 10. single use
        status = await self._check_status(c.status_ref, c.issuer, cid)
        if c.single_use:
            if self._replay is None:
                raise ConsentReplayed("single-use token, but this verifier has no replay "
                                      "guard configured", check=ConsentCheck.REPLAY,
                                      consent_id=cid)
            if not await self._replay.claim(c.consent_id, c.expires_at.timestamp()):
                raise ConsentReplayed("this single-use token was already used",
                                      check=ConsentCheck.REPLAY, consent_id=cid)
        token_sha256 = hashlib.sha256(token.encode("ascii")).hexdigest()
        return c.model_copy(update={"status": status, "token_sha256": token_sha256})

    def _claims(self, claims: dict[str, Any], cid: str | None) -> VerifiedConsent:
        def bad(what: str) -> InvalidConsentToken:
            return InvalidConsentToken(f"claim {what}", check=ConsentCheck.CLAIMS,
                                       consent_id=cid)

        for name in ("iss", "sub", "jti"):
            value = claims.get(name)
            if not isinstance(value, str) or not value:
                raise bad(f"{name} is missing or not a non-empty string")
        aud = claims.get("aud")
        audience = (aud,) if isinstance(aud, str) else \
            tuple(aud) if isinstance(aud, list) else ()
        if not audience or any(not isinstance(a, str) or not a for a in audience):
            raise bad("aud is missing or not a string / list of strings")
        for name in ("iat", "nbf", "exp"):
            if not _number(claims.get(name)):
                raise bad(f"{name} is missing or not a NumericDate")
        rec = claims.get("rec")
        if not isinstance(rec, str) or not _SHA256_HEX.fullmatch(rec):
            raise bad("rec is missing or not a hex SHA-256")
        evd = claims.get("evd")
        if evd is not None and (not isinstance(evd, str) or not _SHA256_HEX.fullmatch(evd)):
            raise bad("evd is not a hex SHA-256")
        once = claims.get("once", False)
        if not isinstance(once, bool):
            raise bad("once is not a boolean")
        scope_claim = claims.get("scope")
        if not isinstance(scope_claim, dict):
            raise bad("scope is missing or not an object")
        try:
            scope = ConsentScope.model_validate(scope_claim)
        except ValidationError as exc:
            where = ".".join(str(p) for p in exc.errors()[0]["loc"]) or "scope"
            raise bad(f"scope is invalid at {where!r}") from None
        status_ref: StatusReference | None = None
        if "status" in claims:
            status = claims["status"]
            body = status.get("status_list") if isinstance(status, dict) else None
            idx = body.get("idx") if isinstance(body, dict) else None
            uri = body.get("uri") if isinstance(body, dict) else None
            if not isinstance(idx, int) or isinstance(idx, bool) or idx < 0 or \
                    not isinstance(uri, str) or not uri:
                raise bad("status needs status_list{idx: int >= 0, uri: str}")
            status_ref = StatusReference(uri=uri, idx=idx)
        try:
            return VerifiedConsent(
                consent_id=claims["jti"], issuer=claims["iss"], subject_ref=claims["sub"],
                audience=audience, issued_at=_when(claims["iat"]),
                not_before=_when(claims["nbf"]), expires_at=_when(claims["exp"]),
                scope=scope, record_hash=rec, evidence_sha256=evd, token_sha256="",
                status_ref=status_ref, single_use=once)
        except (ValueError, OverflowError, OSError):  # out-of-range dates
            raise bad("iat/nbf/exp out of range") from None

    def _check_request(self, c: VerifiedConsent, request: ConsentRequest) -> None:
        cid, scope = c.consent_id, c.scope

        def out(check: ConsentCheck, message: str) -> ConsentOutOfScope:
            return ConsentOutOfScope(message, check=check, consent_id=cid)

        if request.avatar not in scope.avatars:
            raise out(ConsentCheck.AVATAR, f"the consent does not cover avatar "
                                           f"{request.avatar!r}")
        if not scope.allows_purpose(request.purpose):
            why = "prohibits" if request.purpose in scope.prohibited else "does not cover"
            raise out(ConsentCheck.PURPOSE, f"the consent {why} purpose {request.purpose!r}")
        if request.channel not in scope.channels:
            raise out(ConsentCheck.CHANNEL, f"the consent does not cover the "
                                            f"{request.channel} channel")
        missing = request.modalities - frozenset(scope.modalities)
        if missing:
            raise out(ConsentCheck.MODALITY, f"the consent does not cover "
                                             f"{', '.join(sorted(missing))}")
        if request.language is not None and not scope.allows_language(request.language):
            raise out(ConsentCheck.LANGUAGE, f"the consent does not cover language "
                                             f"{request.language!r}")
        if request.provider is not None and not scope.allows_provider(request.provider):
            raise out(ConsentCheck.PROVIDER, f"the consent does not allow provider "
                                             f"{request.provider!r}")
        # a provider without a region cannot be judged against a region restriction: the
        # router would pick a region later, so refuse now rather than admit blindly
        region_known_or_needed = request.region is not None or (
            request.provider is not None and scope.regions is not None)
        if region_known_or_needed and not scope.allows_region(request.region):
            what = "an unknown region" if request.region is None \
                else f"region {request.region!r}"
            raise out(ConsentCheck.REGION, f"the consent does not allow rendering in {what}")
        if request.vendor_id is not None and request.provider is not None and \
                not scope.allows_vendor_id(request.provider, request.vendor_id):
            raise out(ConsentCheck.PROVIDER, f"the consent does not cover this "
                                             f"{request.provider} avatar id")
