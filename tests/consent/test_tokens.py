"""Consent tokens: issuance, the verifier's attack catalogue, scope, status, replay, keys.

Every refusal asserts the exact exception class and its ``check``: a verifier that refused
for the wrong reason (say, KEY where the algorithm should have stopped it) hides which
defence actually held.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from avatarkit.consent.grant import (
    ConsentEvidence,
    ConsentGrant,
    Grantor,
    LikenessSubject,
    StatusReference,
)
from avatarkit.consent.keys import (
    IssuerKey,
    KeySet,
    TrustedIssuers,
    b64url,
    jwk_thumbprint,
    unb64url,
)
from avatarkit.consent.status import (
    StaticStatusListSource,
    StatusChecker,
    StatusList,
    TokenStatus,
    issue_status_list_token,
)
from avatarkit.consent.tokens import (
    CONSENT_TOKEN_TYPE,
    ConsentRequest,
    ConsentScope,
    ConsentVerifier,
    MemoryReplayGuard,
    VerifiedConsent,
    issue_consent_token,
)
from avatarkit.errors import (
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

NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z
ISSUER = "https://registry.example"
AUDIENCE = "deploy-eu-1"
URI = "https://registry.example/status/1"
IDX = 7
DISPLAY_NAME = "Amelia Quartermaine-Example"
SUBJECT_REF = "subj_8f3a2c"
Check = ConsentCheck


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FlakySource(StaticStatusListSource):
    """An in-memory source that can be made to fail, and counts fetches."""

    def __init__(self) -> None:
        super().__init__()
        self.failing = False
        self.fetches = 0

    async def fetch(self, uri: str) -> str:
        self.fetches += 1
        if self.failing:
            raise ConnectionError("registry unreachable")
        return await super().fetch(uri)


def at(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def make_grant(**overrides: Any) -> ConsentGrant:
    fields: dict[str, Any] = {
        "consent_id": "cns_01JTESTCONSENT0000000000001",
        "subject": LikenessSubject(subject_ref=SUBJECT_REF, display_name=DISPLAY_NAME),
        "grantor": Grantor(grantor_ref=SUBJECT_REF),
        "avatars": ["amelia"],
        "vendor_ids": {"tavus": ["r_amelia"]},
        "purposes": ["training_video", "customer_support_live"],
        "languages": ["en", "de-CH"],
        "providers": ["tavus", "selfhosted"],
        "regions": ["eu"],
        "valid_from": at(NOW - 86400),
        "expires_at": at(NOW + 30 * 86400),
        "evidence": ConsentEvidence(recording_sha256="ab" * 32, storage_ref="vault://rec/1",
                                    challenge_phrase="amber falcon ninety"),
        "issuer": ISSUER,
        "status": StatusReference(uri=URI, idx=IDX),
    }
    fields.update(overrides)
    return ConsentGrant(**fields)


@dataclass
class Env:
    key: IssuerKey = field(default_factory=IssuerKey.generate)
    other: IssuerKey = field(default_factory=IssuerKey.generate)
    clock: Clock = field(default_factory=Clock)
    source: FlakySource = field(default_factory=FlakySource)
    status_list: StatusList = field(default_factory=lambda: StatusList(64))
    replay: MemoryReplayGuard = field(default_factory=MemoryReplayGuard)
    max_age_s: float = 3600.0

    def __post_init__(self) -> None:
        self.keys = KeySet.of(self.key)
        self.checker = StatusChecker(self.keys, self.source, max_age_s=self.max_age_s,
                                     clock=self.clock)
        self.verifier = self.make_verifier()
        self.publish()

    def make_verifier(self, **overrides: Any) -> ConsentVerifier:
        kwargs: dict[str, Any] = {"issuers": [ISSUER], "audience": AUDIENCE,
                                  "status": self.checker, "replay": self.replay,
                                  "clock": self.clock}
        kwargs.update(overrides)
        keys = kwargs.pop("keys", self.keys)
        return ConsentVerifier(keys, **kwargs)

    def publish(self, *, key: IssuerKey | None = None, uri: str = URI,
                sub: str | None = None, issued_at: float | None = None) -> None:
        token = issue_status_list_token(self.status_list, key or self.key, uri=sub or uri,
                                        issued_at=self.clock.now if issued_at is None
                                        else issued_at)
        self.source.publish(uri, token)

    def token(self, grant: ConsentGrant | None = None, **kwargs: Any) -> str:
        kwargs.setdefault("audience", AUDIENCE)
        kwargs.setdefault("issued_at", at(self.clock.now))
        return issue_consent_token(grant or make_grant(), self.key, **kwargs)


@pytest.fixture
def env() -> Env:
    return Env()


REQUEST = ConsentRequest(avatar="amelia", purpose="training_video")


def b64json(value: Any) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def split(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    head, body, _ = token.split(".")
    return json.loads(unb64url(head)), json.loads(unb64url(body))


def forge(header: dict[str, Any], claims: dict[str, Any], signer: IssuerKey | None) -> str:
    """A compact JWS with exactly this header and payload, Ed25519-signed by ``signer``."""
    signing_input = f"{b64json(header)}.{b64json(claims)}"
    sig = b64url(signer.private_key.sign(signing_input.encode())) if signer else ""
    return f"{signing_input}.{sig}"


def resign(env: Env, edit: Callable[[dict[str, Any]], None],
           grant: ConsentGrant | None = None) -> str:
    """A genuine token with its claims edited, then properly signed by the trusted key."""
    header, claims = split(env.token(grant))
    edit(claims)
    return forge(header, claims, env.key)


async def refused(env: Env, token: Any, exc_type: type[ConsentViolation], check: ConsentCheck,
                  request: ConsentRequest | None = REQUEST, *,
                  verifier: ConsentVerifier | None = None,
                  record: ConsentGrant | None = None) -> ConsentViolation:
    with pytest.raises(ConsentViolation) as info:
        await (verifier or env.verifier).verify(token, request, record=record)
    assert type(info.value) is exc_type, f"{type(info.value).__name__}: {info.value}"
    assert info.value.check is check, f"{info.value.check}: {info.value}"
    return info.value


# -- the happy path ----------------------------------------------------------------------


async def test_valid_token_verifies_with_every_field(env: Env) -> None:
    grant = make_grant()
    token = env.token(grant)
    got = await env.verifier.verify(token, REQUEST, record=grant)
    assert got.consent_id == grant.consent_id
    assert got.issuer == ISSUER
    assert got.subject_ref == SUBJECT_REF
    assert got.audience == (AUDIENCE,)
    assert got.issued_at == at(NOW)
    assert got.not_before == grant.valid_from
    assert got.expires_at == grant.expires_at
    assert got.record_hash == grant.record_hash()
    assert got.evidence_sha256 == "ab" * 32
    assert got.token_sha256 == hashlib.sha256(token.encode()).hexdigest()
    assert got.status_ref == StatusReference(uri=URI, idx=IDX)
    assert got.status is TokenStatus.VALID
    assert got.single_use is False
    assert got.scope.avatars == ("amelia",)
    assert got.scope.regions == ("eu",)
    assert "political" in got.scope.prohibited
    assert got.issued_at.tzinfo is not None


async def test_token_header_and_claims_are_as_documented(env: Env) -> None:
    header, claims = split(env.token(single_use=True))
    assert header == {"alg": "EdDSA", "typ": CONSENT_TOKEN_TYPE, "kid": env.key.kid}
    assert set(claims) == {"iss", "sub", "aud", "iat", "nbf", "exp", "jti", "rec", "evd",
                           "scope", "status", "once"}
    assert claims["status"] == {"status_list": {"idx": IDX, "uri": URI}}
    assert claims["once"] is True
    assert claims["scope"]["prohibited"] == sorted(make_grant().prohibited)
    assert all(isinstance(claims[c], int) for c in ("iat", "nbf", "exp"))


async def test_token_payload_has_no_display_name(env: Env) -> None:
    token = env.token()
    payload = unb64url(token.split(".")[1]).decode()
    assert DISPLAY_NAME not in payload
    assert "display_name" not in payload
    assert "amber falcon" not in payload  # the challenge phrase stays in the record too


async def test_token_without_status_or_once_omits_them(env: Env) -> None:
    _, claims = split(env.token(make_grant(status=None)))
    assert "status" not in claims and "once" not in claims


# -- the attack catalogue: shape ---------------------------------------------------------


@pytest.mark.parametrize("token", [
    "", "garbage", "a.b", "a.b.c.d", "....", "!!!.@@@.###", "eyJhbGciOiJFZERTQSJ9..",
    f"{b64url(b'not json')}.{b64json({'iss': 'x'})}.",
    f"{b64json(['alg', 'EdDSA'])}.{b64json({'iss': 'x'})}.",
    f"{b64json({'alg': 'EdDSA'})}.{b64url(b'{nope')}.",
    f"{b64json({'alg': 'EdDSA'})}.{b64json('a string')}.",
    f"{b64json({'alg': 'EdDSA'})}.{b64json({'iss': 'x'})}.sig+with/std=alphabet",
], ids=["empty", "word", "two-parts", "four-parts", "dots", "non-b64", "no-payload",
        "header-not-json", "header-array", "payload-not-json", "payload-string",
        "bad-sig-alphabet"])
async def test_malformed_tokens(env: Env, token: str) -> None:
    await refused(env, token, InvalidConsentToken, Check.MALFORMED)


@pytest.mark.parametrize("value", [None, 123, b"a.b.c", ["a", "b", "c"]],
                         ids=["none", "int", "bytes", "list"])
async def test_non_string_tokens(env: Env, value: Any) -> None:
    await refused(env, value, InvalidConsentToken, Check.MALFORMED)


async def test_oversized_token_is_malformed(env: Env) -> None:
    await refused(env, "a" * (2 << 20), InvalidConsentToken, Check.MALFORMED)


# -- header: algorithm, type, key --------------------------------------------------------


async def test_alg_none_unsigned_token(env: Env) -> None:
    _, claims = split(env.token())
    token = forge({"alg": "none", "typ": CONSENT_TOKEN_TYPE}, claims, None)
    err = await refused(env, token, InvalidConsentToken, Check.ALGORITHM)
    assert err.consent_id == claims["jti"]


@pytest.mark.parametrize("secret_form", ["raw", "pem", "jwk-x"])
async def test_hs256_signed_with_the_public_key_as_secret(env: Env, secret_form: str) -> None:
    """The key-confusion attack: the public key is public, so if a verifier let the header
    pick HMAC and fed it the 'key' it holds, anyone could mint tokens. It must stop at the
    algorithm check, whatever the kid says."""
    public = env.key.public_key
    secret = {
        "raw": public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw),
        "pem": public.public_bytes(serialization.Encoding.PEM,
                                   serialization.PublicFormat.SubjectPublicKeyInfo),
        "jwk-x": env.key.public_jwk()["x"].encode(),
    }[secret_form]
    _, claims = split(env.token())
    claims["scope"]["purposes"].append("political")
    for kid in (env.key.kid, "unknown-kid"):
        signing_input = f"{b64json({'alg': 'HS256', 'typ': CONSENT_TOKEN_TYPE, 'kid': kid})}." \
                        f"{b64json(claims)}"
        mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        await refused(env, f"{signing_input}.{b64url(mac)}", InvalidConsentToken,
                      Check.ALGORITHM)


@pytest.mark.parametrize("alg", ["RS256", "ES256", "PS256", "HS512", "eddsa", "Ed25519",
                                 "EdDSA ", 1, None])
async def test_other_algorithms_in_header(env: Env, alg: Any) -> None:
    header, claims = split(env.token())
    header["alg"] = alg
    await refused(env, forge(header, claims, env.key), InvalidConsentToken, Check.ALGORITHM)


async def test_missing_alg(env: Env) -> None:
    header, claims = split(env.token())
    del header["alg"]
    await refused(env, forge(header, claims, env.key), InvalidConsentToken, Check.ALGORITHM)


@pytest.mark.parametrize("typ", ["JWT", "at+jwt", "statuslist+jwt", "AVK-CONSENT+JWT", None])
async def test_wrong_typ(env: Env, typ: Any) -> None:
    header, claims = split(env.token())
    header["typ"] = typ
    await refused(env, forge(header, claims, env.key), InvalidConsentToken, Check.TYPE)


async def test_missing_typ(env: Env) -> None:
    header, claims = split(env.token())
    del header["typ"]
    await refused(env, forge(header, claims, env.key), InvalidConsentToken, Check.TYPE)


async def test_status_list_token_presented_as_consent(env: Env) -> None:
    """Same trusted key, validly signed, but a status list: explicit typing refuses it."""
    token = issue_status_list_token(env.status_list, env.key, uri=URI, issued_at=NOW)
    await refused(env, token, InvalidConsentToken, Check.TYPE)


async def test_unknown_kid(env: Env) -> None:
    token = issue_consent_token(make_grant(), env.other, audience=AUDIENCE,
                                issued_at=at(NOW))
    await refused(env, token, InvalidConsentToken, Check.KEY)


@pytest.mark.parametrize("kid", [None, 42, ""])
async def test_missing_or_non_string_kid(env: Env, kid: Any) -> None:
    header, claims = split(env.token())
    if kid is None:
        del header["kid"]
    else:
        header["kid"] = kid
    await refused(env, forge(header, claims, env.key), InvalidConsentToken, Check.KEY)


async def test_pinned_kid_but_signed_by_another_key(env: Env) -> None:
    header, claims = split(env.token())
    assert header["kid"] == env.key.kid
    await refused(env, forge(header, claims, env.other), InvalidConsentToken,
                  Check.SIGNATURE)


async def test_tampered_payload_keeps_signature(env: Env) -> None:
    token = env.token()
    head, _, sig = token.split(".")
    _, claims = split(token)
    claims["scope"]["avatars"].append("bob")
    await refused(env, f"{head}.{b64json(claims)}.{sig}", InvalidConsentToken,
                  Check.SIGNATURE)


async def test_tampered_expiry_keeps_signature(env: Env) -> None:
    token = env.token(expires_at=at(NOW + 60))
    head, _, sig = token.split(".")
    _, claims = split(token)
    claims["exp"] = int(NOW + 365 * 86400)
    await refused(env, f"{head}.{b64json(claims)}.{sig}", InvalidConsentToken,
                  Check.SIGNATURE)


async def test_stripped_signature(env: Env) -> None:
    head, body, _ = env.token().split(".")
    await refused(env, f"{head}.{body}.", InvalidConsentToken, Check.SIGNATURE)


async def test_signature_from_another_token(env: Env) -> None:
    one = env.token()
    two = env.token(make_grant(consent_id="cns_other"))
    head, body, _ = one.split(".")
    await refused(env, f"{head}.{body}.{two.split('.')[2]}", InvalidConsentToken,
                  Check.SIGNATURE)


async def test_crit_header_is_not_accepted(env: Env) -> None:
    header, claims = split(env.token())
    header.update({"crit": ["exp"], "exp": 1})
    await refused(env, forge(header, claims, env.key), InvalidConsentToken, Check.SIGNATURE)


# -- claims ------------------------------------------------------------------------------


@pytest.mark.parametrize("claim", ["iss", "sub", "aud", "exp", "nbf", "iat", "jti", "rec",
                                   "scope"])
async def test_missing_required_claim(env: Env, claim: str) -> None:
    await refused(env, resign(env, lambda c: c.pop(claim)), InvalidConsentToken, Check.CLAIMS)


@pytest.mark.parametrize(("claim", "value"), [
    ("iss", 7), ("sub", ""), ("aud", 5), ("aud", []), ("aud", [AUDIENCE, 3]),
    ("exp", "2030-01-01"), ("iat", True), ("nbf", None), ("jti", ["x"]), ("rec", "abc"),
    ("rec", "AB" * 32), ("evd", 12), ("scope", "all"), ("scope", {"avatars": ["amelia"]}),
    ("status", {"status_list": {"idx": -1, "uri": URI}}), ("status", {"uri": URI}),
    ("once", "yes"), ("exp", 1e300),
])
async def test_claim_with_wrong_type(env: Env, claim: str, value: Any) -> None:
    def edit(c: dict[str, Any]) -> None:
        c[claim] = value
    await refused(env, resign(env, edit), InvalidConsentToken, Check.CLAIMS)


async def test_unknown_scope_restriction_fails_closed(env: Env) -> None:
    """An issuer newer than this verifier adds a restriction: refuse rather than ignore."""
    await refused(env, resign(env, lambda c: c["scope"].update(devices=["kiosk"])),
                  InvalidConsentToken, Check.CLAIMS)


async def test_foreign_issuer(env: Env) -> None:
    token = env.token(make_grant(issuer="https://evil.example"))
    await refused(env, token, InvalidConsentToken, Check.ISSUER)


async def test_wrong_audience(env: Env) -> None:
    await refused(env, env.token(audience=["deploy-us-1", "deploy-us-2"]),
                  InvalidConsentToken, Check.AUDIENCE)


async def test_audience_list_containing_ours(env: Env) -> None:
    got = await env.verifier.verify(env.token(audience=["deploy-us-1", AUDIENCE]), REQUEST)
    assert got.audience == ("deploy-us-1", AUDIENCE)


async def test_expired(env: Env) -> None:
    token = env.token(expires_at=at(NOW + 600))
    env.clock.now = NOW + 600  # exp is exact: at exp the token is no longer valid
    await refused(env, token, ConsentExpired, Check.EXPIRED)


async def test_not_yet_valid(env: Env) -> None:
    token = env.token(not_before=at(NOW + 3600))
    await refused(env, token, ConsentExpired, Check.NOT_YET_VALID)


async def test_leeway_applies_to_nbf(env: Env) -> None:
    token = env.token(not_before=at(NOW + 4))
    got = await env.verifier.verify(token, REQUEST)  # within the default 5 s leeway
    assert got.not_before == at(NOW + 4)
    strict = env.make_verifier(leeway_s=0)
    await refused(env, token, ConsentExpired, Check.NOT_YET_VALID, verifier=strict)
    await refused(env, env.token(not_before=at(NOW + 6)), ConsentExpired, Check.NOT_YET_VALID)


async def test_record_hash_mismatch(env: Env) -> None:
    grant = make_grant()
    token = env.token(grant)
    altered = grant.model_copy(update={"purposes": ["training_video", "marketing"]})
    await refused(env, token, InvalidConsentToken, Check.RECORD, record=altered)
    await refused(env, token, InvalidConsentToken, Check.RECORD,
                  record=make_grant(consent_id="cns_someone_else"))


# -- scope -------------------------------------------------------------------------------


async def test_wrong_avatar(env: Env) -> None:
    await refused(env, env.token(), ConsentOutOfScope, Check.AVATAR,
                  ConsentRequest(avatar="bob", purpose="training_video"))


async def test_wrong_purpose(env: Env) -> None:
    await refused(env, env.token(), ConsentOutOfScope, Check.PURPOSE,
                  ConsentRequest(avatar="amelia", purpose="marketing"))


async def test_prohibited_purpose(env: Env) -> None:
    err = await refused(env, env.token(), ConsentOutOfScope, Check.PURPOSE,
                        ConsentRequest(avatar="amelia", purpose="political"))
    assert "prohibits" in str(err)


async def test_prohibited_purpose_wins_over_a_forged_grant_listing(env: Env) -> None:
    """Even a (validly signed) scope listing a purpose as both allowed and prohibited
    refuses it."""
    token = resign(env, lambda c: c["scope"]["purposes"].append("political"))
    await refused(env, token, ConsentOutOfScope, Check.PURPOSE,
                  ConsentRequest(avatar="amelia", purpose="political"))


async def test_wrong_channel(env: Env) -> None:
    await refused(env, env.token(make_grant(channels=["recorded"])), ConsentOutOfScope,
                  Check.CHANNEL, ConsentRequest(avatar="amelia", purpose="training_video",
                                                channel="live"))


async def test_wrong_modality(env: Env) -> None:
    token = env.token(make_grant(modalities=["voice"]))
    await refused(env, token, ConsentOutOfScope, Check.MODALITY)
    ok = ConsentRequest(avatar="amelia", purpose="training_video",
                        modalities=frozenset({"voice"}))
    assert (await env.verifier.verify(token, ok)).scope.modalities == ("voice",)


@pytest.mark.parametrize("language", ["fr", "de", "de-AT", "english", "e"])
async def test_wrong_language(env: Env, language: str) -> None:
    await refused(env, env.token(), ConsentOutOfScope, Check.LANGUAGE,
                  ConsentRequest(avatar="amelia", purpose="training_video", language=language))


@pytest.mark.parametrize("language", ["en", "en-GB", "EN-us", "de-CH", "de-ch-1996"])
async def test_granted_language(env: Env, language: str) -> None:
    request = ConsentRequest(avatar="amelia", purpose="training_video", language=language)
    await env.verifier.verify(env.token(), request)


async def test_any_language(env: Env) -> None:
    request = ConsentRequest(avatar="amelia", purpose="training_video", language="ja")
    await env.verifier.verify(env.token(make_grant(languages=["*"])), request)


async def test_provider_outside_scope(env: Env) -> None:
    await refused(env, env.token(), ConsentOutOfScope, Check.PROVIDER,
                  ConsentRequest(avatar="amelia", purpose="training_video", provider="heygen",
                                 region="eu"))


async def test_region_outside_scope(env: Env) -> None:
    await refused(env, env.token(), ConsentOutOfScope, Check.REGION,
                  ConsentRequest(avatar="amelia", purpose="training_video", provider="tavus",
                                 region="us"))


async def test_unknown_region_under_a_region_restriction(env: Env) -> None:
    await refused(env, env.token(), ConsentOutOfScope, Check.REGION,
                  ConsentRequest(avatar="amelia", purpose="training_video", provider="tavus"))


async def test_vendor_id_outside_scope(env: Env) -> None:
    await refused(env, env.token(), ConsentOutOfScope, Check.PROVIDER,
                  ConsentRequest(avatar="amelia", purpose="training_video", provider="tavus",
                                 region="eu", vendor_id="r_someone_else"))


async def test_full_request_in_scope(env: Env) -> None:
    request = ConsentRequest(avatar="amelia", purpose="customer_support_live",
                             channel="live", language="en-GB", provider="tavus", region="eu",
                             vendor_id="r_amelia")
    await env.verifier.verify(env.token(), request)


async def test_unrestricted_grant_allows_any_provider_and_region(env: Env) -> None:
    token = env.token(make_grant(providers=None, regions=None, vendor_ids={}))
    request = ConsentRequest(avatar="amelia", purpose="training_video", provider="heygen",
                             vendor_id="anything")
    got = await env.verifier.verify(token, request)
    assert got.allows_region(None) and got.allows_provider("d-id")


def test_request_vendor_id_needs_provider() -> None:
    with pytest.raises(ValueError, match="vendor_id needs provider"):
        ConsentRequest(avatar="a", purpose="p", vendor_id="x")


async def test_routing_constraint_methods(env: Env) -> None:
    got = await env.verifier.verify(env.token(), REQUEST)
    assert got.allows_provider("tavus") and not got.allows_provider("heygen")
    assert got.allows_region("eu") and not got.allows_region("us")
    assert not got.allows_region(None)  # unknown region under a restriction: fail closed
    assert got.allows_vendor_id("tavus", "r_amelia")
    assert not got.allows_vendor_id("tavus", "r_bob")
    assert got.allows_vendor_id("selfhosted", "whatever")  # no ids listed for it
    got.check_route("tavus", "eu", "r_amelia")
    for args, check in ((("heygen", "eu"), Check.PROVIDER), (("tavus", "us"), Check.REGION),
                        (("tavus", None), Check.REGION),
                        (("tavus", "eu", "r_bob"), Check.PROVIDER)):
        with pytest.raises(ConsentOutOfScope) as info:
            got.check_route(*args)
        assert info.value.check is check
        assert info.value.consent_id == got.consent_id


# -- status ------------------------------------------------------------------------------


async def test_revoked(env: Env) -> None:
    env.status_list[IDX] = TokenStatus.INVALID
    env.publish()
    err = await refused(env, env.token(), ConsentWithdrawn, Check.REVOKED)
    assert err.consent_id == make_grant().consent_id


@pytest.mark.parametrize("value", [TokenStatus.SUSPENDED, TokenStatus.APPLICATION_SPECIFIC])
async def test_suspended_or_application_specific(env: Env, value: TokenStatus) -> None:
    env.status_list[IDX] = value
    env.publish()
    await refused(env, env.token(), ConsentWithdrawn, Check.SUSPENDED)


async def test_stale_status_list(env: Env) -> None:
    token = env.token()
    await env.verifier.verify(token, REQUEST)  # caches the list
    env.source.failing = True
    env.clock.now = NOW + env.max_age_s + 1  # past max_age, the list's exp not yet reached
    err = await refused(env, token, ConsentStatusUnavailable, Check.STATUS_STALE)
    assert err.consent_id == make_grant().consent_id


async def test_unreachable_status_list_without_cache(env: Env) -> None:
    env.source.failing = True
    await refused(env, env.token(), ConsentStatusUnavailable, Check.STATUS_UNAVAILABLE)


async def test_status_list_signed_by_untrusted_key(env: Env) -> None:
    env.publish(key=env.other)
    await refused(env, env.token(), ConsentStatusUnavailable, Check.STATUS_UNAVAILABLE)


async def test_status_list_for_a_different_uri(env: Env) -> None:
    """A validly signed list for another URI (with our index VALID) must not answer."""
    env.publish(sub="https://registry.example/status/2")
    await refused(env, env.token(), ConsentStatusUnavailable, Check.STATUS_UNAVAILABLE)


async def test_no_status_reference(env: Env) -> None:
    await refused(env, env.token(make_grant(status=None)), InvalidConsentToken, Check.CLAIMS)


async def test_no_status_reference_allowed_when_not_required(env: Env) -> None:
    lax = env.make_verifier(status=None, require_status=False)
    got = await lax.verify(env.token(make_grant(status=None)), REQUEST)
    assert got.status is None and got.status_ref is None
    # with status checking off, a reference is carried but not checked
    got = await lax.verify(env.token(), REQUEST)
    assert got.status is None and got.status_ref is not None


def test_require_status_needs_a_checker(env: Env) -> None:
    with pytest.raises(ConfigError) as info:
        env.make_verifier(status=None)
    assert info.value.field == "status"


# -- single use --------------------------------------------------------------------------


async def test_replayed_single_use_token(env: Env) -> None:
    token = env.token(single_use=True)
    got = await env.verifier.verify(token, REQUEST)
    assert got.single_use is True
    await refused(env, token, ConsentReplayed, Check.REPLAY)


async def test_single_use_without_replay_guard_fails_closed(env: Env) -> None:
    no_guard = env.make_verifier(replay=None)
    await refused(env, env.token(single_use=True), ConsentReplayed, Check.REPLAY,
                  verifier=no_guard)
    await no_guard.verify(env.token(), REQUEST)  # reusable tokens need no guard


async def test_refused_single_use_token_is_not_spent(env: Env) -> None:
    """The jti is claimed last: a token refused for scope can still be used correctly."""
    token = env.token(single_use=True)
    await refused(env, token, ConsentOutOfScope, Check.AVATAR,
                  ConsentRequest(avatar="bob", purpose="training_video"))
    await env.verifier.verify(token, REQUEST)


async def test_memory_replay_guard_forgets_after_expiry() -> None:
    clock = Clock()
    guard = MemoryReplayGuard(clock=clock)
    assert await guard.claim("a", NOW + 10)
    assert not await guard.claim("a", NOW + 10)
    assert await guard.claim("b", NOW + 1000)
    clock.now = NOW + 11
    assert await guard.claim("c", NOW + 20)
    assert len(guard) == 2  # "a" dropped once past its expiry
    assert not await guard.claim("b", NOW + 1000)


# -- recheck -----------------------------------------------------------------------------


async def test_recheck_sees_revocation_after_ttl(env: Env) -> None:
    got = await env.verifier.verify(env.token(), REQUEST)
    env.status_list[IDX] = TokenStatus.INVALID
    env.publish()
    assert await env.verifier.recheck(got) is TokenStatus.VALID  # cached within ttl
    env.clock.now += 301  # the list's ttl (300 s) has passed
    with pytest.raises(ConsentWithdrawn) as info:
        await env.verifier.recheck(got)
    assert info.value.check is Check.REVOKED


async def test_recheck_fresh_within_forces_a_refetch(env: Env) -> None:
    got = await env.verifier.verify(env.token(), REQUEST)
    env.status_list[IDX] = TokenStatus.SUSPENDED
    env.publish()
    env.clock.now += 61
    with pytest.raises(ConsentWithdrawn) as info:
        await env.verifier.recheck(got, fresh_within_s=60)
    assert info.value.check is Check.SUSPENDED


async def test_recheck_expiry(env: Env) -> None:
    got = await env.verifier.verify(env.token(expires_at=at(NOW + 100)), REQUEST)
    env.clock.now = NOW + 100
    with pytest.raises(ConsentExpired) as info:
        await env.verifier.recheck(got)
    assert info.value.check is Check.EXPIRED


async def test_recheck_status_unavailable(env: Env) -> None:
    got = await env.verifier.verify(env.token(), REQUEST)
    env.source.failing = True
    env.clock.now += env.max_age_s + 1
    with pytest.raises(ConsentStatusUnavailable) as info:
        await env.verifier.recheck(got)
    assert info.value.check is Check.STATUS_STALE
    assert info.value.consent_id == got.consent_id


# -- key rotation, errors without token text ---------------------------------------------


async def test_key_rotation(env: Env) -> None:
    new = IssuerKey.generate()
    both = KeySet.of(env.key, new)
    rotated = env.make_verifier(keys=both, status=StatusChecker(both, env.source,
                                                                clock=env.clock))
    old_token = env.token()
    new_token = issue_consent_token(make_grant(), new, audience=AUDIENCE, issued_at=at(NOW))
    await rotated.verify(old_token, REQUEST)
    await rotated.verify(new_token, REQUEST)
    retired = both.without(env.key.kid)
    after = env.make_verifier(keys=retired, status=StatusChecker(retired, env.source,
                                                                 clock=env.clock))
    await refused(env, old_token, InvalidConsentToken, Check.KEY, verifier=after)
    env.publish(key=new)  # lists must be re-signed with a key still pinned
    await after.verify(new_token, REQUEST)


async def test_errors_never_contain_the_token(env: Env, caplog: pytest.LogCaptureFixture
                                              ) -> None:
    caplog.set_level("DEBUG", logger="avatarkit")
    good = env.token()
    head, body, sig = good.split(".")
    attempts = [
        (f"{head}.{body}.", REQUEST),
        (f"{head}.{body}.{sig[:-4]}AAAA", REQUEST),
        (good, ConsentRequest(avatar="bob", purpose="training_video")),
        (good, ConsentRequest(avatar="amelia", purpose="political")),
        (env.token(make_grant(issuer="https://evil.example")), REQUEST),
        (f"{head}.{body}", REQUEST),
        (f"{b64json({'alg': 'none'})}.{body}.", REQUEST),
    ]
    for token, request in attempts:
        with pytest.raises(ConsentViolation) as info:
            await env.verifier.verify(token, request)
        shown = f"{info.value} {info.value!r} {info.value.args}"
        for secret in (token, *[part for part in token.split(".") if len(part) > 8]):
            assert secret not in shown
    logged = caplog.text
    assert caplog.records  # refusals are logged...
    for part in good.split("."):
        assert part not in logged  # ...without the token
    assert DISPLAY_NAME not in logged


async def test_verified_consent_carries_no_token_text(env: Env) -> None:
    token = env.token()
    got = await env.verifier.verify(token, REQUEST)
    dumped = got.model_dump_json() + repr(got)
    assert all(part not in dumped for part in token.split("."))


# -- issuance refusals -------------------------------------------------------------------


def test_issue_refuses_to_outlive_the_grant(env: Env) -> None:
    grant = make_grant()
    with pytest.raises(ConfigError) as info:
        env.token(grant, expires_at=grant.expires_at + timedelta(seconds=1))
    assert info.value.field == "expires_at"
    with pytest.raises(ConfigError) as info:
        env.token(grant, not_before=grant.valid_from - timedelta(seconds=1))
    assert info.value.field == "not_before"
    with pytest.raises(ConfigError) as info:
        env.token(grant, expires_at=datetime(2027, 1, 20))  # naive
    assert info.value.field == "expires_at"
    with pytest.raises(ConfigError) as info:
        env.token(grant, audience=[])
    assert info.value.field == "audience"
    with pytest.raises(ConfigError):
        env.token(grant, not_before=at(NOW + 100), expires_at=at(NOW + 100))


def test_issue_rounds_the_window_inwards(env: Env) -> None:
    grant = make_grant(valid_from=at(NOW + 0.5), expires_at=at(NOW + 99.5))
    _, claims = split(env.token(grant))
    assert (claims["nbf"], claims["exp"]) == (int(NOW) + 1, int(NOW) + 99)


def test_scope_from_grant_round_trips() -> None:
    grant = make_grant()
    scope = ConsentScope.from_grant(grant)
    assert ConsentScope.model_validate(scope.model_dump(mode="json")) == scope
    assert scope.prohibited == tuple(sorted(grant.prohibited))


def test_verifier_config_is_checked(env: Env) -> None:
    with pytest.raises(ConfigError) as info:
        env.make_verifier(issuers=ISSUER)  # a str is a collection of characters
    assert info.value.field == "issuers"
    with pytest.raises(ConfigError):
        env.make_verifier(audience="")


# -- issuers and their keys: one registry cannot sign for another -------------------------

ISSUER_B = "https://partner-registry.example"
URI_B = "https://partner-registry.example/status/1"


@dataclass
class TwoIssuers:
    """A deployment trusting registries A (``env.key``, ``ISSUER``) and B (its own key)."""

    env: Env
    key_b: IssuerKey = field(default_factory=IssuerKey.generate)

    def __post_init__(self) -> None:
        self.trusted = TrustedIssuers({ISSUER: KeySet.of(self.env.key),
                                       ISSUER_B: KeySet.of(self.key_b)})
        self.checker = StatusChecker(self.trusted, self.env.source, clock=self.env.clock)
        self.verifier = ConsentVerifier(self.trusted, audience=AUDIENCE, status=self.checker,
                                        replay=self.env.replay, clock=self.env.clock)
        self.env.source.publish(URI_B, issue_status_list_token(
            StatusList(64), self.key_b, uri=URI_B, issuer=ISSUER_B,
            issued_at=self.env.clock.now))

    def token_b(self) -> str:
        grant = make_grant(issuer=ISSUER_B, consent_id="cns_01JTESTCONSENTB00000000001",
                           status=StatusReference(uri=URI_B, idx=IDX))
        return issue_consent_token(grant, self.key_b, audience=AUDIENCE, issued_at=at(NOW))


@pytest.fixture
def two(env: Env) -> TwoIssuers:
    return TwoIssuers(env)


async def test_each_trusted_issuer_verifies_its_own_tokens(two: TwoIssuers) -> None:
    assert (await two.verifier.verify(two.env.token(), REQUEST)).issuer == ISSUER
    assert (await two.verifier.verify(two.token_b(), REQUEST)).issuer == ISSUER_B
    assert two.verifier.issuers == {ISSUER, ISSUER_B}


async def test_a_token_re_signed_with_another_trusted_issuers_key_is_refused(
        two: TwoIssuers) -> None:
    header, claims = split(two.env.token())  # iss = A
    forged = forge({**header, "kid": two.key_b.kid}, claims, two.key_b)
    error = await refused(two.env, forged, InvalidConsentToken, Check.KEY,
                          verifier=two.verifier)
    assert error.consent_id == claims["jti"]
    # and the other way round: B's token claiming to be A's, signed by B
    _, claims_b = split(two.token_b())
    claims_b["iss"] = ISSUER
    forged_b = forge({"alg": "EdDSA", "typ": CONSENT_TOKEN_TYPE, "kid": two.key_b.kid},
                     claims_b, two.key_b)
    await refused(two.env, forged_b, InvalidConsentToken, Check.KEY, verifier=two.verifier)


async def test_a_status_list_for_one_issuers_uri_signed_by_another_is_refused(
        two: TwoIssuers) -> None:
    """Registry B must not un-revoke registry A's consents by publishing at A's URI."""
    env = two.env
    token = env.token()
    await two.verifier.verify(token, REQUEST)
    env.status_list[IDX] = TokenStatus.INVALID  # A revokes...
    env.publish()
    two.checker.invalidate()
    await refused(env, token, ConsentWithdrawn, Check.REVOKED, verifier=two.verifier)
    # ...and B's key signs an all-valid list for A's URI, dated later than A's
    env.source.publish(URI, issue_status_list_token(StatusList(64), two.key_b, uri=URI,
                                                    issued_at=env.clock.now + 1))
    two.checker.invalidate()
    env.clock.now += 2
    await refused(env, token, ConsentStatusUnavailable, Check.STATUS_UNAVAILABLE,
                  verifier=two.verifier)
    # with iss naming B, even signed by a key pinned for both, it does not answer for A
    shared = IssuerKey.generate()
    both = TrustedIssuers({ISSUER: KeySet.of(env.key, shared),
                           ISSUER_B: KeySet.of(two.key_b, shared)})
    checker = StatusChecker(both, env.source, clock=env.clock)
    env.source.publish(URI, issue_status_list_token(StatusList(64), shared, uri=URI,
                                                    issuer=ISSUER_B,
                                                    issued_at=env.clock.now))
    with pytest.raises(ConsentStatusUnavailable):
        await checker.status(StatusReference(uri=URI, idx=IDX), issuer=ISSUER)
    assert await checker.status(StatusReference(uri=URI, idx=IDX),
                                issuer=ISSUER_B) is TokenStatus.VALID


def test_one_key_set_is_not_pinned_for_several_issuers(env: Env) -> None:
    both = KeySet.of(env.key, IssuerKey.generate())
    with pytest.raises(ConfigError) as info:
        ConsentVerifier(both, issuers=[ISSUER, ISSUER_B], audience=AUDIENCE,
                        status=StatusChecker(both, env.source))
    assert info.value.field == "jwks"
    trusted = TrustedIssuers({ISSUER: KeySet.of(env.key), ISSUER_B: both})
    with pytest.raises(ConfigError) as info:  # a checker sharing one set among issuers
        ConsentVerifier(trusted, audience=AUDIENCE, status=StatusChecker(both, env.source))
    assert info.value.field == "status"
    with pytest.raises(ConfigError) as info:
        ConsentVerifier(trusted, issuers=[ISSUER], audience=AUDIENCE,
                        status=StatusChecker(trusted, env.source))
    assert info.value.field == "issuers"
    for bad in ({}, {ISSUER: KeySet({})}, {"": KeySet.of(env.key)}, both):
        with pytest.raises(ConfigError):
            TrustedIssuers(bad)  # type: ignore[arg-type]


# -- issue time --------------------------------------------------------------------------


async def test_token_issued_in_the_future_is_refused(env: Env) -> None:
    ahead = env.token(issued_at=at(NOW + 6))  # the verifier's leeway is 5 s
    error = await refused(env, ahead, InvalidConsentToken, Check.ISSUED_AT)
    assert error.consent_id == make_grant().consent_id
    await env.verifier.verify(env.token(issued_at=at(NOW + 4)), REQUEST)  # within leeway
    env.clock.now += 2
    await env.verifier.verify(ahead, REQUEST)  # once the clock has caught up


# -- duplicate members and non-JSON constants --------------------------------------------


def forge_raw(header: str, payload: str, signer: IssuerKey) -> str:
    """A compact JWS of exactly these JSON texts, Ed25519-signed by ``signer``."""
    signing_input = f"{b64url(header.encode())}.{b64url(payload.encode())}"
    return f"{signing_input}.{b64url(signer.private_key.sign(signing_input.encode()))}"


def with_member(obj: dict[str, Any], text: str) -> str:
    """``obj`` as JSON with ``text`` (e.g. ``"exp":1``) appended as one more member."""
    return json.dumps(obj, separators=(",", ":"))[:-1] + "," + text + "}"


@pytest.mark.parametrize("where", ["header alg", "header kid", "payload exp", "payload aud",
                                   "payload iss", "nested scope"])
async def test_duplicate_member_names_are_malformed(env: Env, where: str) -> None:
    header, claims = split(env.token())
    head = json.dumps(header, separators=(",", ":"))
    body = json.dumps(claims, separators=(",", ":"))
    if where == "header alg":
        head = with_member(header, '"alg":"EdDSA"')
    elif where == "header kid":
        head = with_member(header, json.dumps("kid") + ":" + json.dumps(env.key.kid))
    elif where == "payload exp":  # a second exp a year later: last-wins parsers extend it
        body = with_member(claims, f'"exp":{claims["exp"] + 365 * 86400}')
    elif where == "payload aud":
        body = with_member(claims, '"aud":"another-deployment"')
    elif where == "payload iss":
        body = with_member(claims, f'"iss":{json.dumps(ISSUER)}')
    else:
        scope = json.dumps(claims["scope"], separators=(",", ":"))[:-1] + \
            ',"purposes":["political"]}'
        body = body.replace(json.dumps(claims["scope"], separators=(",", ":")), scope)
        assert body.count('"purposes"') == 2
    error = await refused(env, forge_raw(head, body, env.key), InvalidConsentToken,
                          Check.MALFORMED)
    assert "more than once" in str(error)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
async def test_non_json_constants_are_malformed(env: Env, constant: str) -> None:
    header, claims = split(env.token())
    body = json.dumps(claims, separators=(",", ":")).replace(
        f'"exp":{claims["exp"]}', f'"exp":{constant}')
    await refused(env, forge_raw(json.dumps(header), body, env.key), InvalidConsentToken,
                  Check.MALFORMED)


# -- keys --------------------------------------------------------------------------------

RFC8037_D = "nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A"
RFC8037_X = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
RFC8037_THUMBPRINT = "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"


def test_kid_is_the_rfc7638_thumbprint() -> None:
    """RFC 8037 appendix A.3."""
    assert jwk_thumbprint(RFC8037_X) == RFC8037_THUMBPRINT
    key = IssuerKey.from_jwk({"kty": "OKP", "crv": "Ed25519", "d": RFC8037_D,
                              "x": RFC8037_X})
    assert key.kid == RFC8037_THUMBPRINT
    assert key.public_jwk() == {"kty": "OKP", "crv": "Ed25519", "x": RFC8037_X,
                                "kid": RFC8037_THUMBPRINT, "alg": "EdDSA", "use": "sig"}
    assert key.private_jwk()["d"] == RFC8037_D


def test_issuer_key_save_load_and_repr(tmp_path: Path) -> None:
    key = IssuerKey.generate()
    path = tmp_path / "issuer.json"
    key.save(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    loaded = IssuerKey.load(path)
    assert loaded.kid == key.kid
    assert loaded.private_jwk() == key.private_jwk()
    d = key.private_jwk()["d"]
    assert repr(key) == f"IssuerKey(kid={key.kid!r})"
    assert d not in repr(key) and d not in str(key)
    assert d not in repr(KeySet.of(key))


def test_issuer_key_file_with_mismatched_halves(tmp_path: Path) -> None:
    jwk = IssuerKey.generate().private_jwk()
    jwk["x"] = IssuerKey.generate().public_jwk()["x"]
    with pytest.raises(ConfigError, match="x is not the public key"):
        IssuerKey.from_jwk(jwk)
    jwk = IssuerKey.generate().private_jwk()
    jwk["kid"] = "chosen-kid"
    with pytest.raises(ConfigError, match="thumbprint"):
        IssuerKey.from_jwk(jwk)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError) as info:
        IssuerKey.load(tmp_path / "bad.json")
    assert "{not json" not in str(info.value)


def test_keyset_round_trip_and_lookup(tmp_path: Path) -> None:
    a, b = IssuerKey.generate(), IssuerKey.generate()
    keys = KeySet.of(a, b)
    path = tmp_path / "jwks.json"
    keys.save(path)
    loaded = KeySet.load(path)
    assert set(loaded.kids) == {a.kid, b.kid}
    assert loaded.to_jwks() == keys.to_jwks()
    assert all("d" not in jwk for jwk in loaded.to_jwks()["keys"])
    assert loaded.get(a.kid) is not None
    with pytest.raises(InvalidConsentToken) as info:
        loaded.get("nope")
    assert info.value.check is Check.KEY
    # a JWK without kid gets its thumbprint
    bare = {k: v for k, v in a.public_jwk().items() if k != "kid"}
    assert KeySet.from_jwks({"keys": [bare]}).kids == (a.kid,)


@pytest.mark.parametrize(("edit", "field"), [
    (lambda j: j.update(kty="oct", k=base64.urlsafe_b64encode(b"s" * 32).decode()),
     "jwks[0].kty"),
    (lambda j: j.update(kty="RSA"), "jwks[0].kty"),
    (lambda j: j.update(crv="X25519"), "jwks[0].kty"),
    (lambda j: j.update(crv="P-256", kty="EC"), "jwks[0].kty"),
    (lambda j: j.update(d=RFC8037_D), "jwks[0].d"),
    (lambda j: j.update(kid="my-key-1"), "jwks[0].kid"),
    (lambda j: j.update(alg="HS256"), "jwks[0].alg"),
    (lambda j: j.update(use="enc"), "jwks[0].use"),
    (lambda j: j.update(x="AAAA"), "jwks[0].x"),
    (lambda j: j.pop("x"), "jwks[0].x"),
])
def test_keyset_refuses_bad_entries(edit: Callable[[dict[str, Any]], Any], field: str) -> None:
    jwk: dict[str, Any] = dict(IssuerKey.generate().public_jwk())
    edit(jwk)
    with pytest.raises(ConfigError) as info:
        KeySet.from_jwks({"keys": [jwk]})
    assert info.value.field == field


def test_keyset_refuses_duplicate_kids() -> None:
    jwk = IssuerKey.generate().public_jwk()
    with pytest.raises(ConfigError) as info:
        KeySet.from_jwks({"keys": [jwk, dict(jwk)]})
    assert info.value.field == "jwks[1].kid"
    with pytest.raises(ConfigError):
        KeySet.from_jwks({"nokeys": []})


def test_verified_consent_is_frozen(env: Env) -> None:
    assert VerifiedConsent.model_config.get("frozen") is True
    assert ConsentRequest.model_config.get("frozen") is True
