"""Token Status List: encoding vectors, the signed list, the caching fail-closed checker,
and the sources (HTTP, files, in-memory)."""

from __future__ import annotations

import asyncio
import json
import logging
import zlib
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from avatarkit.consent.grant import StatusReference
from avatarkit.consent.keys import IssuerKey, KeySet, TrustedIssuers, b64url, unb64url
from avatarkit.consent.status import (
    STATUS_LIST_TYPE,
    FileStatusListSource,
    HttpStatusListSource,
    StaticStatusListSource,
    StatusChecker,
    StatusList,
    TokenStatus,
    issue_status_list_token,
)
from avatarkit.errors import ConfigError, ConsentCheck, ConsentStatusUnavailable

NOW = 1_800_000_000.0
URI = "https://registry.example/status/1"
REF = StatusReference(uri=URI, idx=3)


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class CountingSource(StaticStatusListSource):
    """Counts fetches; can fail; can hold every fetch until ``gate`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.fetches = 0
        self.failing = False
        self.gate: asyncio.Event | None = None

    async def fetch(self, uri: str) -> str:
        self.fetches += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.failing:
            raise OSError("source down")
        return await super().fetch(uri)


class Setup:
    def __init__(self, *, max_age_s: float = 3600.0) -> None:
        self.key = IssuerKey.generate()
        self.clock = Clock()
        self.source = CountingSource()
        self.entries = StatusList(16)
        self.checker = StatusChecker(KeySet.of(self.key), self.source, max_age_s=max_age_s,
                                     clock=self.clock)
        self.publish()

    def publish(self, *, ttl_s: int = 300, expires_in_s: int = 86400,
                issued_at: float | None = None, key: IssuerKey | None = None) -> None:
        self.source.publish(URI, issue_status_list_token(
            self.entries, key or self.key, uri=URI, ttl_s=ttl_s, expires_in_s=expires_in_s,
            issued_at=self.clock.now if issued_at is None else issued_at))


@pytest.fixture
def s() -> Setup:
    return Setup()


def unavailable(exc: pytest.ExceptionInfo[ConsentStatusUnavailable],
                check: ConsentCheck = ConsentCheck.STATUS_UNAVAILABLE) -> None:
    assert type(exc.value) is ConsentStatusUnavailable
    assert exc.value.check is check


# -- encoding ----------------------------------------------------------------------------


def test_draft_vector_one_bit() -> None:
    decoded = StatusList.decode("eNrbuRgAAhcBXQ", bits=1)
    assert [decoded[i] for i in range(16)] == [1, 0, 0, 1, 1, 1, 0, 1, 1, 1, 0, 0, 0, 1, 0, 1]


def test_draft_vector_two_bits() -> None:
    decoded = StatusList.decode("eNo76fITAAPfAgc", bits=2)
    assert [decoded[i] for i in range(12)] == [1, 2, 0, 3, 0, 1, 0, 1, 1, 2, 3, 3]


def test_vector_re_encodes_to_the_same_bytes() -> None:
    values = [1, 2, 0, 3, 0, 1, 0, 1, 1, 2, 3, 3]
    entries = StatusList(12, bits=2)
    for i, v in enumerate(values):
        entries[i] = v
    assert zlib.decompress(unb64url(entries.encode())) == \
        zlib.decompress(unb64url("eNo76fITAAPfAgc"))


@given(st.sampled_from([1, 2, 4, 8]).flatmap(
    lambda bits: st.tuples(st.just(bits),
                           st.lists(st.integers(0, (1 << bits) - 1), min_size=1,
                                    max_size=300))))
def test_encode_decode_round_trip(case: tuple[int, list[int]]) -> None:
    bits, values = case
    entries = StatusList(len(values), bits=bits)
    for i, v in enumerate(values):
        entries[i] = v
    decoded = StatusList.decode(entries.encode(), bits=bits)
    assert len(decoded) >= len(values)
    assert [decoded[i] for i in range(len(values))] == values
    assert all(decoded[i] == 0 for i in range(len(values), len(decoded)))


# -- the signed list ---------------------------------------------------------------------


def test_issue_status_list_token_claims() -> None:
    key = IssuerKey.generate()
    entries = StatusList(8)
    entries[2] = TokenStatus.SUSPENDED
    token = issue_status_list_token(entries, key, uri=URI, issued_at=NOW, ttl_s=60,
                                    expires_in_s=3600)
    head, body, _ = token.split(".")
    assert json.loads(unb64url(head)) == {"alg": "EdDSA", "typ": STATUS_LIST_TYPE,
                                          "kid": key.kid}
    claims = json.loads(unb64url(body))
    assert claims == {"sub": URI, "iat": int(NOW), "exp": int(NOW) + 3600, "ttl": 60,
                      "status_list": {"bits": 2, "lst": entries.encode()}}


async def test_checker_reads_the_published_status(s: Setup) -> None:
    s.entries[3] = TokenStatus.SUSPENDED
    s.publish()
    assert await s.checker.status(REF) is TokenStatus.SUSPENDED
    assert await s.checker.status(StatusReference(uri=URI, idx=4)) is TokenStatus.VALID


# -- caching -----------------------------------------------------------------------------


async def test_cache_respects_ttl(s: Setup) -> None:
    assert await s.checker.status(REF) is TokenStatus.VALID
    s.entries[3] = TokenStatus.INVALID
    s.publish()
    s.clock.now += 299
    assert await s.checker.status(REF) is TokenStatus.VALID  # still the cached list
    assert s.source.fetches == 1
    s.clock.now += 2  # ttl 300 s passed
    assert await s.checker.status(REF) is TokenStatus.INVALID
    assert s.source.fetches == 2


async def test_short_ttl_list(s: Setup) -> None:
    s.publish(ttl_s=10)
    await s.checker.status(REF)
    s.clock.now += 11
    await s.checker.status(REF)
    assert s.source.fetches == 2


async def test_max_cache_age_forces_refetch(s: Setup) -> None:
    await s.checker.status(REF)
    s.clock.now += 30
    await s.checker.status(REF, max_cache_age_s=60)
    assert s.source.fetches == 1
    s.clock.now += 31
    await s.checker.status(REF, max_cache_age_s=60)
    assert s.source.fetches == 2


async def test_invalidate_drops_the_cache(s: Setup) -> None:
    await s.checker.status(REF)
    s.entries[3] = TokenStatus.INVALID
    s.publish()
    s.checker.invalidate(URI)
    assert await s.checker.status(REF) is TokenStatus.INVALID
    s.checker.invalidate()
    await s.checker.status(REF)
    assert s.source.fetches == 3


async def test_concurrent_checks_share_one_fetch(s: Setup) -> None:
    s.source.gate = asyncio.Event()
    tasks = [asyncio.create_task(s.checker.status(StatusReference(uri=URI, idx=i % 16)))
             for i in range(50)]
    for _ in range(5):
        await asyncio.sleep(0)  # let every task reach the checker
    s.source.gate.set()
    results = await asyncio.gather(*tasks)
    assert results == [TokenStatus.VALID] * 50
    assert s.source.fetches == 1


# -- failing closed ----------------------------------------------------------------------


async def test_cache_used_within_max_age_when_the_source_fails(
        s: Setup, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="avatarkit.consent.status")
    s.entries[3] = TokenStatus.SUSPENDED
    s.publish()
    assert await s.checker.status(REF) is TokenStatus.SUSPENDED
    s.source.failing = True
    s.clock.now += 1800  # past ttl, within max_age (3600)
    assert await s.checker.status(REF) is TokenStatus.SUSPENDED
    assert s.source.fetches == 2
    assert "using the cached list" in caplog.text
    await s.checker.status(REF)  # within the retry back-off: no fetch storm
    assert s.source.fetches == 2
    s.clock.now += 31
    await s.checker.status(REF)
    assert s.source.fetches == 3


async def test_fail_closed_beyond_max_age(s: Setup) -> None:
    await s.checker.status(REF)
    s.source.failing = True
    s.clock.now += 3601
    with pytest.raises(ConsentStatusUnavailable) as info:
        await s.checker.status(REF)
    unavailable(info, ConsentCheck.STATUS_STALE)


async def test_never_fetched_is_unavailable(s: Setup) -> None:
    s.source.failing = True
    with pytest.raises(ConsentStatusUnavailable) as info:
        await s.checker.status(REF)
    unavailable(info)


async def test_source_recovers(s: Setup) -> None:
    s.source.failing = True
    with pytest.raises(ConsentStatusUnavailable):
        await s.checker.status(REF)
    s.source.failing = False
    assert await s.checker.status(REF) is TokenStatus.VALID


async def test_expired_list_refused(s: Setup) -> None:
    s.publish(issued_at=NOW - 7200, expires_in_s=3600)
    with pytest.raises(ConsentStatusUnavailable) as info:
        await s.checker.status(REF)
    unavailable(info)


async def test_cached_list_not_used_past_its_exp() -> None:
    s = Setup(max_age_s=86400)
    s.publish(expires_in_s=600)
    await s.checker.status(REF)
    s.source.failing = True
    s.clock.now += 601  # within max_age, but the list itself expired
    with pytest.raises(ConsentStatusUnavailable) as info:
        await s.checker.status(REF)
    unavailable(info, ConsentCheck.STATUS_STALE)


async def test_rollback_to_an_older_list_is_refused(s: Setup) -> None:
    """An attacker replaying a (validly signed, unexpired) list from before the revocation
    must not un-revoke: the older list is not taken over the cached newer one."""
    old = issue_status_list_token(s.entries, s.key, uri=URI, issued_at=NOW - 60)
    s.entries[3] = TokenStatus.INVALID
    s.publish()
    assert await s.checker.status(REF) is TokenStatus.INVALID
    s.source.publish(URI, old)
    s.clock.now += 301
    assert await s.checker.status(REF) is TokenStatus.INVALID
    s.checker.invalidate()  # no cache left, but the newest iat is remembered
    with pytest.raises(ConsentStatusUnavailable) as info:
        await s.checker.status(REF)
    unavailable(info)


async def test_index_outside_the_list(s: Setup) -> None:
    with pytest.raises(ConsentStatusUnavailable) as info:
        await s.checker.status(StatusReference(uri=URI, idx=10_000))
    unavailable(info)


def _forged_list(key: IssuerKey, header: dict[str, Any], claims: dict[str, Any]) -> str:
    def enc(value: Any) -> str:
        return b64url(json.dumps(value).encode())
    signing_input = f"{enc(header)}.{enc(claims)}"
    return f"{signing_input}.{b64url(key.private_key.sign(signing_input.encode()))}"


def _claims(**overrides: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {"sub": URI, "iat": int(NOW), "exp": int(NOW) + 3600,
                              "ttl": 300, "status_list": {"bits": 2,
                                                          "lst": StatusList(16).encode()}}
    claims.update(overrides)
    return claims


@pytest.mark.parametrize(("header", "claims"), [
    ({"alg": "HS256", "typ": STATUS_LIST_TYPE}, _claims()),
    ({"alg": "EdDSA", "typ": "JWT"}, _claims()),
    ({"alg": "EdDSA"}, _claims()),
    ({"alg": "EdDSA", "typ": "avk-consent+jwt"}, _claims()),
    ({"alg": "EdDSA", "typ": STATUS_LIST_TYPE}, _claims(sub="https://registry.example/x")),
    ({"alg": "EdDSA", "typ": STATUS_LIST_TYPE}, _claims(status_list={"bits": 3, "lst": "x"})),
    ({"alg": "EdDSA", "typ": STATUS_LIST_TYPE}, _claims(status_list={"bits": 2})),
    ({"alg": "EdDSA", "typ": STATUS_LIST_TYPE}, _claims(status_list={"bits": 2,
                                                                     "lst": "@@notb64"})),
    ({"alg": "EdDSA", "typ": STATUS_LIST_TYPE}, _claims(iat="yesterday")),
    ({"alg": "EdDSA", "typ": STATUS_LIST_TYPE}, _claims(ttl=0)),
    ({"alg": "EdDSA", "typ": STATUS_LIST_TYPE}, _claims(exp=int(NOW) - 1)),
    ({"alg": "EdDSA", "typ": STATUS_LIST_TYPE}, _claims(iat=int(NOW) + 3600,
                                                        exp=int(NOW) + 7200)),
], ids=["hs256", "typ-jwt", "no-typ", "consent-typ", "other-sub", "bits-3", "no-lst",
        "bad-lst", "iat-string", "ttl-zero", "expired", "iat-in-future"])
async def test_invalid_lists_are_refused(s: Setup, header: dict[str, Any],
                                         claims: dict[str, Any]) -> None:
    s.source.publish(URI, _forged_list(s.key, {**header, "kid": s.key.kid}, claims))
    with pytest.raises(ConsentStatusUnavailable) as info:
        await s.checker.status(REF)
    unavailable(info)


async def test_well_formed_forged_list_passes(s: Setup) -> None:
    """Control for the table above: the same builder with nothing wrong is accepted."""
    s.source.publish(URI, _forged_list(s.key, {"alg": "EdDSA", "typ": STATUS_LIST_TYPE,
                                               "kid": s.key.kid}, _claims()))
    assert await s.checker.status(REF) is TokenStatus.VALID


async def test_list_signed_by_an_untrusted_key(s: Setup) -> None:
    s.publish(key=IssuerKey.generate())
    with pytest.raises(ConsentStatusUnavailable) as info:
        await s.checker.status(REF)
    unavailable(info)


async def test_decompression_bomb_refused(s: Setup) -> None:
    bomb = b64url(zlib.compress(bytes(17 << 20), 9))
    s.source.publish(URI, _forged_list(s.key, {"alg": "EdDSA", "typ": STATUS_LIST_TYPE,
                                               "kid": s.key.kid},
                                       _claims(status_list={"bits": 1, "lst": bomb})))
    with pytest.raises(ConsentStatusUnavailable, match="decompresses"):
        await s.checker.status(REF)


async def test_unknown_values_read_as_application_specific(s: Setup) -> None:
    entries = StatusList(16, bits=4)
    entries[3] = 9
    s.source.publish(URI, issue_status_list_token(entries, s.key, uri=URI, issued_at=NOW))
    assert await s.checker.status(REF) is TokenStatus.APPLICATION_SPECIFIC


# -- sources -----------------------------------------------------------------------------


async def test_http_source() -> None:
    key = IssuerKey.generate()
    token = issue_status_list_token(StatusList(16), key, uri=URI, issued_at=NOW)
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/status/1":
            return httpx.Response(200, text=token + "\n",
                                  headers={"content-type": "application/statuslist+jwt"})
        if request.url.path == "/down":
            raise httpx.ConnectError("refused", request=request)
        if request.url.path == "/huge":
            return httpx.Response(200, content=b"a" * 5000)
        return httpx.Response(404)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        source = HttpStatusListSource(client, max_bytes=4096)
        assert await source.fetch(URI) == token
        assert seen[0].headers["accept"] == "application/statuslist+jwt"
        with pytest.raises(httpx.HTTPStatusError):
            await source.fetch("https://registry.example/missing")
        with pytest.raises(httpx.ConnectError):
            await source.fetch("https://registry.example/down")
        with pytest.raises(ValueError, match="over 4096 bytes"):
            await source.fetch("https://registry.example/huge")
        checker = StatusChecker(KeySet.of(key), source, clock=Clock())
        assert await checker.status(REF) is TokenStatus.VALID
        with pytest.raises(ConsentStatusUnavailable) as info:
            await checker.status(StatusReference(uri="https://registry.example/missing",
                                                 idx=0))
        unavailable(info)


async def test_file_source_and_discovery(tmp_path: Path) -> None:
    key = IssuerKey.generate()
    entries = StatusList(16)
    entries[3] = TokenStatus.INVALID
    (tmp_path / "one.jwt").write_text(
        issue_status_list_token(entries, key, uri=URI, issued_at=NOW) + "\n")
    (tmp_path / "noise.jwt").write_text("not a jwt")
    other = "https://registry.example/status/2"
    (tmp_path / "two.jwt").write_text(
        issue_status_list_token(StatusList(8), key, uri=other, issued_at=NOW))
    source = FileStatusListSource.discover(tmp_path)
    assert set(source.uris) == {URI, other}
    checker = StatusChecker(KeySet.of(key), source, clock=Clock())
    assert await checker.status(REF) is TokenStatus.INVALID
    assert await checker.status(StatusReference(uri=other, idx=3)) is TokenStatus.VALID
    direct = FileStatusListSource({URI: tmp_path / "one.jwt"})
    assert (await direct.fetch(URI)).count(".") == 2
    with pytest.raises(LookupError):
        await direct.fetch(other)


async def test_static_source_unknown_uri() -> None:
    with pytest.raises(LookupError):
        await StaticStatusListSource().fetch(URI)


def test_checker_and_issuer_argument_checks() -> None:
    key = IssuerKey.generate()
    with pytest.raises(ValueError):
        StatusChecker(KeySet.of(key), StaticStatusListSource(), max_age_s=0)
    with pytest.raises(ValueError):
        issue_status_list_token(StatusList(8), key, uri="")
    with pytest.raises(ValueError):
        issue_status_list_token(StatusList(8), key, uri=URI, ttl_s=0)


# -- lists are statements of one issuer ------------------------------------------------------

ISSUER_A = "https://registry.example"
ISSUER_B = "https://partner-registry.example"


class TwoRegistries:
    """A checker that pins A's key for A and B's key for B, reading A's list from ``URI``."""

    def __init__(self) -> None:
        self.key_a, self.key_b = IssuerKey.generate(), IssuerKey.generate()
        self.clock = Clock()
        self.source = CountingSource()
        self.trusted = TrustedIssuers({ISSUER_A: KeySet.of(self.key_a),
                                       ISSUER_B: KeySet.of(self.key_b)})
        self.checker = StatusChecker(self.trusted, self.source, clock=self.clock)

    def publish(self, entries: StatusList, key: IssuerKey, *, issuer: str | None = None,
                issued_at: float | None = None) -> None:
        self.source.publish(URI, issue_status_list_token(
            entries, key, uri=URI, issuer=issuer,
            issued_at=self.clock.now if issued_at is None else issued_at))


async def test_a_list_is_verified_with_the_keys_of_the_tokens_issuer() -> None:
    r = TwoRegistries()
    revoked = StatusList(16)
    revoked[REF.idx] = TokenStatus.INVALID
    r.publish(revoked, r.key_a, issuer=ISSUER_A)
    assert await r.checker.status(REF, issuer=ISSUER_A) is TokenStatus.INVALID
    # B signs an all-valid list for A's URI: it does not answer for A's tokens
    r.publish(StatusList(16), r.key_b, issued_at=NOW + 1)
    r.checker.invalidate()
    with pytest.raises(ConsentStatusUnavailable) as info:
        await r.checker.status(REF, issuer=ISSUER_A)
    unavailable(info)
    # (it verifies as B's statement, cached apart from A's)
    assert await r.checker.status(REF, issuer=ISSUER_B) is TokenStatus.VALID
    with pytest.raises(ConsentStatusUnavailable):
        await r.checker.status(REF, issuer=ISSUER_A)


async def test_a_list_whose_iss_names_another_issuer_is_refused() -> None:
    r = TwoRegistries()
    r.publish(StatusList(16), r.key_a, issuer=ISSUER_B)  # A's key, but "by B"
    with pytest.raises(ConsentStatusUnavailable) as info:
        await r.checker.status(REF, issuer=ISSUER_A)
    unavailable(info)
    r.publish(StatusList(16), r.key_a, issuer=ISSUER_A, issued_at=NOW + 1)
    assert await r.checker.status(REF, issuer=ISSUER_A) is TokenStatus.VALID


async def test_an_issuer_bound_checker_needs_a_trusted_issuer() -> None:
    r = TwoRegistries()
    r.publish(StatusList(16), r.key_a, issuer=ISSUER_A)
    assert r.checker.issuer_bound
    with pytest.raises(ConfigError) as config:
        await r.checker.status(REF)
    assert config.value.field == "issuer"
    with pytest.raises(ConsentStatusUnavailable) as info:
        await r.checker.status(REF, issuer="https://unknown.example")
    unavailable(info)
    assert r.source.fetches == 0  # nothing fetched for an issuer with no keys


def test_issued_list_names_its_issuer() -> None:
    key = IssuerKey.generate()
    token = issue_status_list_token(StatusList(8), key, uri=URI, issuer=ISSUER_A)
    assert json.loads(unb64url(token.split(".")[1]))["iss"] == ISSUER_A
    with pytest.raises(ValueError):
        issue_status_list_token(StatusList(8), key, uri=URI, issuer="")


async def test_duplicate_members_in_a_list_are_refused(s: Setup) -> None:
    header = {"alg": "EdDSA", "typ": STATUS_LIST_TYPE, "kid": s.key.kid}
    revoked = StatusList(16)
    revoked[REF.idx] = TokenStatus.INVALID
    body = json.dumps(_claims(status_list={"bits": 2, "lst": revoked.encode()}))
    # a second status_list member: a last-wins parser would read the all-valid one
    body = body[:-1] + ', "status_list": {"bits": 2, "lst": "' + StatusList(16).encode() + '"}}'
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(body.encode())}"
    s.source.publish(URI, f"{signing_input}."
                          f"{b64url(s.key.private_key.sign(signing_input.encode()))}")
    with pytest.raises(ConsentStatusUnavailable) as info:
        await s.checker.status(REF)
    unavailable(info)
    assert "more than once" in str(info.value)
