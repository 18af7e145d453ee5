"""Consent enforcement in the session path, against the Tavus emulator over real sockets.

No session reaches a vendor without a verified, in-scope token; a live session ends when its
consent is revoked, suspended, expires or can no longer be checked; every outcome is in the
generation log and the disclosure names the consent.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from avatarkit import (
    AvatarKit,
    Closed,
    ConfigError,
    ConsentCheck,
    ConsentExpired,
    ConsentOutOfScope,
    ConsentReplayed,
    ConsentRequired,
    ConsentRevoked,
    ConsentViolation,
    ConsentWithdrawn,
    InvalidConsentToken,
    KitConfig,
    SessionStarted,
    SessionState,
)
from avatarkit.consent import ConsentAuthority, ConsentGrant, IssuerKey, issue_consent_token
from avatarkit.consent.keys import b64url, unb64url
from avatarkit.consent.status import StatusListSource
from avatarkit.disclosure.notice import verify_disclosure_notice
from avatarkit.emulators import TavusEmulator

from ..conftest import (
    API_KEY,
    AUDIENCE,
    CONSENT,
    CONSENT_GRANT,
    FACE,
    ISSUER_KEY,
    KitFactory,
    consent_config,
    grant_fields,
    next_event,
)

CREATES = "/v2/conversations"


def creates(emulator: TavusEmulator) -> int:
    return len([r for r in emulator.requests if r.path == CREATES and r.method == "POST"])


async def test_a_session_without_a_token_is_refused_before_anything_starts(
        tavus_emulator: TavusEmulator, make_kit: KitFactory) -> None:
    async with make_kit() as kit:
        for missing in (None, ""):
            with pytest.raises(ConsentRequired) as info:
                kit.session("amelia", consent=missing, purpose="support")
            assert info.value.check is ConsentCheck.MISSING
        with pytest.raises(ConfigError) as no_purpose:
            kit.session("amelia", consent=CONSENT)
        assert no_purpose.value.field == "purpose"
    assert creates(tavus_emulator) == 0


async def test_a_kit_without_consent_config_cannot_start_sessions(
        tavus_emulator: TavusEmulator) -> None:
    kit = AvatarKit(KitConfig(
        providers={"tavus": {"api_key": API_KEY, "base_url": tavus_emulator.url,
                             "channel": "websocket"}},
        avatars={"amelia": {"tavus": FACE}}))
    async with kit:
        with pytest.raises(ConfigError) as info:
            kit.session("amelia", consent=CONSENT, purpose="support")
        assert info.value.field == "consent"
    assert creates(tavus_emulator) == 0


def _signed(**overrides: Any) -> str:
    """A token for a grant that differs from ``CONSENT_GRANT`` by ``overrides`` (same key)."""
    grant = CONSENT_GRANT.model_copy(update=overrides)
    return issue_consent_token(ConsentGrant.model_validate(grant.model_dump()),
                               ISSUER_KEY, audience=AUDIENCE)


_OTHER_KEY = IssuerKey.generate()
_NOW = datetime.now(UTC)

REFUSED: list[tuple[str, Callable[[], str], type[ConsentViolation], ConsentCheck]] = [
    ("garbage", lambda: "not-a-token", InvalidConsentToken, ConsentCheck.MALFORMED),
    ("untrusted key", lambda: issue_consent_token(CONSENT_GRANT, _OTHER_KEY, audience=AUDIENCE),
     InvalidConsentToken, ConsentCheck.KEY),
    ("other audience", lambda: issue_consent_token(CONSENT_GRANT, ISSUER_KEY,
                                                   audience="someone-else"),
     InvalidConsentToken, ConsentCheck.AUDIENCE),
    ("foreign issuer", lambda: _signed(issuer="https://evil.example"),
     InvalidConsentToken, ConsentCheck.ISSUER),
    ("expired", lambda: _signed(valid_from=_NOW - timedelta(days=3),
                                expires_at=_NOW - timedelta(days=1)),
     ConsentExpired, ConsentCheck.EXPIRED),
    ("not yet valid", lambda: _signed(valid_from=_NOW + timedelta(days=1),
                                      expires_at=_NOW + timedelta(days=2)),
     ConsentExpired, ConsentCheck.NOT_YET_VALID),
    ("other avatar", lambda: _signed(avatars=["bob"]), ConsentOutOfScope, ConsentCheck.AVATAR),
    ("other purpose", lambda: _signed(purposes=["marketing"]),
     ConsentOutOfScope, ConsentCheck.PURPOSE),
    ("recorded only", lambda: _signed(channels=["recorded"]),
     ConsentOutOfScope, ConsentCheck.CHANNEL),
    ("voice only", lambda: _signed(modalities=["voice"]),
     ConsentOutOfScope, ConsentCheck.MODALITY),
    ("other provider", lambda: _signed(providers=["simli"]),
     ConsentOutOfScope, ConsentCheck.PROVIDER),
    ("other face id", lambda: _signed(vendor_ids={"tavus": ["r_someone_else"]}),
     ConsentOutOfScope, ConsentCheck.PROVIDER),
    ("region restricted, provider region unknown", lambda: _signed(regions=["eu"]),
     ConsentOutOfScope, ConsentCheck.REGION),
]


@pytest.mark.parametrize(("case", "token", "error", "check"), REFUSED,
                         ids=[case[0] for case in REFUSED])
async def test_refused_tokens_never_reach_the_vendor(
        tavus_emulator: TavusEmulator, make_kit: KitFactory,
        consent_authority: ConsentAuthority, case: str, token: Callable[[], str],
        error: type[ConsentViolation], check: ConsentCheck) -> None:
    async with make_kit() as kit:
        session = kit.session("amelia", consent=token(), purpose="support")
        with pytest.raises(error) as info:
            async with session:
                pass
        assert info.value.check is check, info.value
        assert session.state is SessionState.CLOSED
        closed = await next_event(session.events(), "closed")
        assert isinstance(closed, Closed) and closed.reason == "start_failed"
        log = await kit.consent_store.generation(session.generation_id)
        assert [r.kind for r in log] == ["consent_refused"]
        assert log[0].status_check == str(check)
    assert creates(tavus_emulator) == 0, f"{case}: a vendor session was created"


async def test_revoked_and_suspended_consents_are_refused(
        tavus_emulator: TavusEmulator, make_kit: KitFactory,
        consent_authority: ConsentAuthority) -> None:
    suspended, suspended_token = await consent_authority.grant(audience=AUDIENCE,
                                                               **grant_fields())
    await consent_authority.suspend(suspended.consent_id, reason="dispute")
    await consent_authority.revoke(CONSENT_GRANT.consent_id, reason="withdrawn")
    async with make_kit() as kit:
        for token, check in ((CONSENT, ConsentCheck.REVOKED),
                             (suspended_token, ConsentCheck.SUSPENDED)):
            with pytest.raises(ConsentWithdrawn) as info:
                async with kit.session("amelia", consent=token, purpose="support"):
                    pass
            assert info.value.check is check
    assert creates(tavus_emulator) == 0


async def test_the_avatars_consent_subject_must_match(
        tavus_emulator: TavusEmulator, consent_authority: ConsentAuthority) -> None:
    kit = AvatarKit(KitConfig(
        providers={"tavus": {"api_key": API_KEY, "base_url": tavus_emulator.url,
                             "channel": "websocket"}},
        avatars={"amelia": {"tavus": FACE, "consent_subject": "subj_somebody_else"}},
        consent=consent_config()), status_source=consent_authority.source)
    async with kit:
        with pytest.raises(ConsentOutOfScope) as info:
            async with kit.session("amelia", consent=CONSENT, purpose="support"):
                pass
    assert info.value.check is ConsentCheck.AVATAR
    assert creates(tavus_emulator) == 0


async def test_a_region_the_grant_allows_routes_and_the_decision_says_why(
        tavus_emulator: TavusEmulator, make_kit: KitFactory,
        consent_authority: ConsentAuthority) -> None:
    _, eu_only = await consent_authority.grant(audience=AUDIENCE,
                                               **grant_fields(regions=["eu"]))
    async with make_kit(regions=["eu"]) as kit, \
            kit.session("amelia", consent=eu_only, purpose="support") as s:
        assert s.route.chosen == "tavus"
    async with make_kit(regions=["us", "eu"]) as kit:
        with pytest.raises(ConsentOutOfScope) as info:
            async with kit.session("amelia", consent=eu_only, purpose="support"):
                pass
    assert info.value.check is ConsentCheck.REGION
    assert "excluded by consent" in str(info.value) and "us" in str(info.value)
    assert creates(tavus_emulator) == 1


async def test_single_use_tokens_start_one_session(
        tavus_emulator: TavusEmulator, make_kit: KitFactory,
        consent_authority: ConsentAuthority) -> None:
    _, once = await consent_authority.grant(audience=AUDIENCE, single_use=True,
                                            **grant_fields())
    async with make_kit() as kit:
        async with kit.session("amelia", consent=once, purpose="support"):
            pass
        with pytest.raises(ConsentReplayed):
            async with kit.session("amelia", consent=once, purpose="support"):
                pass
    assert creates(tavus_emulator) == 1


async def test_disclosure_names_the_consent_and_its_notice_verifies(
        tavus_emulator: TavusEmulator, make_kit: KitFactory) -> None:
    async with make_kit() as kit, \
            kit.session("amelia", consent=CONSENT, purpose="support") as s:
        started = await next_event(s.events(), "session_started")
        assert isinstance(started, SessionStarted)
        join = s.join
        disclosure = join.disclosure
        assert disclosure.consent_id == CONSENT_GRANT.consent_id == started.consent_id
        assert disclosure.consent_token_sha256 == hashlib.sha256(CONSENT.encode()).hexdigest()
        assert disclosure.generation_id == s.generation_id
        assert disclosure.digital_source_type.endswith("/trainedAlgorithmicMedia")
        assert disclosure.label_policy == "viewer-ui"  # Tavus renders; the viewer UI labels
        assert disclosure.generator.startswith("avatarkit/")
        assert "Amelia Example" not in join.model_dump_json()  # no personal data
        assert join.disclosure_notice == started.disclosure_notice is not None
        assert verify_disclosure_notice(join.disclosure_notice, kit.disclosure_keys()) \
            == disclosure
        header, payload, signature = join.disclosure_notice.split(".")
        forged = f"{header}.{payload[:-4]}AAAA.{signature}"
        with pytest.raises(InvalidConsentToken):
            verify_disclosure_notice(forged, kit.disclosure_keys())
        with pytest.raises(InvalidConsentToken):  # another deployment's keys
            verify_disclosure_notice(join.disclosure_notice,
                                     AvatarKit(KitConfig()).disclosure_keys())


async def test_the_generation_log_links_the_session_to_its_consent(
        tavus_emulator: TavusEmulator, make_kit: KitFactory) -> None:
    async with make_kit(consent={"recheck_interval_s": 0.2}) as kit:
        async with kit.session("amelia", consent=CONSENT, purpose="support") as s:
            await next_event(s.events(), "session_started")
            await asyncio.sleep(0.5)  # at least one live re-check
        log = await kit.consent_store.generations(CONSENT_GRANT.consent_id)
        store = kit.consent_store
        kinds = [r.kind for r in log]
        assert kinds[0] == "session_started" and kinds[-1] == "session_ended"
        assert "status_check" in kinds
        token_hash = hashlib.sha256(CONSENT.encode()).hexdigest()
        for record in log:
            assert record.generation_id == s.generation_id
            assert record.token_sha256 == token_hash
            assert record.provider == "tavus" and record.purpose == "support"
        assert log[0].status_check == "valid"
        assert log[-1].details["vendor_ended"] is True
        assert (await store.verify_chain()).ok


async def _live_session_ends(kit: AvatarKit, action: Callable[[], Any],
                             ) -> tuple[float, list[str], Closed]:
    async with kit.session("amelia", consent=CONSENT, purpose="support") as s:
        events = s.events()
        await next_event(events, "session_started")
        started = time.monotonic()
        await action()
        closed = await next_event(events, "closed", within=5.0)
        elapsed = time.monotonic() - started
        kinds: list[str] = [e.type for e in s._history]
    assert isinstance(closed, Closed)
    return elapsed, kinds, closed


@pytest.mark.parametrize("change", ["revoke", "suspend"])
async def test_revocation_ends_a_live_session_within_the_interval(
        tavus_emulator: TavusEmulator, make_kit: KitFactory,
        consent_authority: ConsentAuthority, change: str) -> None:
    interval = 0.5
    async with make_kit(consent={"recheck_interval_s": interval}) as kit:
        async def withdraw() -> None:
            method = getattr(consent_authority, change)
            await method(CONSENT_GRANT.consent_id, reason=f"test {change}")

        elapsed, kinds, closed = await _live_session_ends(kit, withdraw)
        assert elapsed <= interval + 1.0, f"ended after {elapsed:.2f} s"
        assert kinds.index("consent_revoked") < kinds.index("closed")
        assert closed.reason == f"consent_{'revoked' if change == 'revoke' else 'suspended'}"
        assert closed.vendor_ended
        log = await kit.consent_store.generations(CONSENT_GRANT.consent_id)
        assert log[-1].kind == "session_ended"
        assert any(r.kind == "status_check" and r.status_check in ("revoked", "suspended")
                   for r in log)
    assert tavus_emulator.open_sessions == 0


async def test_a_consent_revoked_event_says_which_status(
        tavus_emulator: TavusEmulator, make_kit: KitFactory,
        consent_authority: ConsentAuthority) -> None:
    async with make_kit(consent={"recheck_interval_s": 0.2}) as kit, \
            kit.session("amelia", consent=CONSENT, purpose="support") as s:
        events = s.events()
        await consent_authority.suspend(CONSENT_GRANT.consent_id, reason="dispute")
        event = await next_event(events, "consent_revoked", within=3.0)
        assert isinstance(event, ConsentRevoked)
        assert event.consent_id == CONSENT_GRANT.consent_id and event.status == "suspended"


class FailingSource(StatusListSource):
    """A status source that answers until ``broken`` is set, then fails (registry down)."""

    def __init__(self, inner: StatusListSource) -> None:
        self.inner = inner
        self.broken = False

    async def fetch(self, uri: str) -> str:
        if self.broken:
            raise ConnectionError("status registry unreachable")
        return await self.inner.fetch(uri)


async def test_an_unverifiable_status_ends_a_live_session_fail_closed(
        tavus_emulator: TavusEmulator, consent_authority: ConsentAuthority) -> None:
    source = FailingSource(consent_authority.source)
    kit = AvatarKit(KitConfig(
        providers={"tavus": {"api_key": API_KEY, "base_url": tavus_emulator.url,
                             "channel": "websocket", "pal_id": "p_echo_amelia"}},
        avatars={"amelia": {"tavus": FACE}},
        consent=consent_config(recheck_interval_s=0.3, max_status_age_s=1.0)),
        status_source=source)

    async def break_registry() -> None:
        source.broken = True

    async with kit:
        elapsed, kinds, closed = await _live_session_ends(kit, break_registry)
    assert closed.reason == "consent_unverifiable"
    assert "consent_revoked" not in kinds  # not revoked: unknown, which also ends it
    assert elapsed <= 1.0 + 0.3 + 1.0
    assert tavus_emulator.open_sessions == 0


async def test_a_consent_that_expires_ends_the_live_session(
        tavus_emulator: TavusEmulator, make_kit: KitFactory,
        consent_authority: ConsentAuthority) -> None:
    now = datetime.now(UTC)
    grant, _ = await consent_authority.grant(audience=AUDIENCE, **grant_fields(
        valid_from=now - timedelta(minutes=1), expires_at=now + timedelta(seconds=2)))
    token = consent_authority.token(grant, audience=AUDIENCE)
    async with make_kit(consent={"recheck_interval_s": 60, "leeway_s": 0}) as kit, \
            kit.session("amelia", consent=token, purpose="support") as s:
        closed = await next_event(s.events(), "closed", within=5.0)
        assert isinstance(closed, Closed) and closed.reason == "consent_expired"
        # the token's exp is whole seconds, at or before the grant's expires_at
        assert time.time() >= s.consent.expires_at.timestamp()
        assert s.consent.expires_at <= grant.expires_at
    assert tavus_emulator.open_sessions == 0


def test_consent_config_paths_are_relative_to_the_toml_file(tmp_path: Any) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "avatarkit.toml").write_text(
        '[consent]\naudience = "a"\nissuers = ["https://consent.example"]\n'
        'jwks = "keys/issuers.jwks.json"\nstore = "consent.db"\n'
        '[consent.status_lists]\n"https://consent.example/status/1" = "keys/status.jwt"\n')
    config = KitConfig.from_toml(tmp_path / "avatarkit.toml")
    assert config.consent is not None
    assert config.consent.jwks == tmp_path / "keys" / "issuers.jwks.json"
    assert config.consent.store == tmp_path / "consent.db"
    assert config.consent.status_lists == {
        "https://consent.example/status/1": tmp_path / "keys" / "status.jwt"}
    with pytest.raises(ConfigError) as info:
        AvatarKit(config)  # the JWKS file does not exist
    assert info.value.field == "consent.jwks"



PARTNER = "https://partner-consent.example"


def _two_issuers(partner: IssuerKey, **overrides: Any) -> dict[str, Any]:
    ours = consent_config()
    fields: dict[str, Any] = {"issuers": [ours["issuers"][0], PARTNER],
                              "jwks": {ours["issuers"][0]: ours["jwks"],
                                       PARTNER: {"keys": [partner.public_jwk()]}}}
    return consent_config(**{**fields, **overrides})


async def test_a_kit_trusting_two_registries_keeps_their_keys_apart(
        tavus_emulator: TavusEmulator, make_kit: KitFactory) -> None:
    """Registry B's key cannot sign a token in registry A's name, through the whole kit."""
    partner = IssuerKey.generate()
    header, claims = (json.loads(unb64url(part)) for part in CONSENT.split(".")[:2])
    signing_input = f"{b64url(json.dumps({**header, 'kid': partner.kid}).encode())}." \
                    f"{b64url(json.dumps(claims).encode())}"
    forged = f"{signing_input}.{b64url(partner.private_key.sign(signing_input.encode()))}"
    async with make_kit(consent=_two_issuers(partner)) as kit:
        async with kit.session("amelia", consent=CONSENT, purpose="support") as s:
            assert s.consent.issuer == claims["iss"]
        session = kit.session("amelia", consent=forged, purpose="support")
        with pytest.raises(InvalidConsentToken) as info:
            async with session:
                pass
        assert info.value.check is ConsentCheck.KEY
    assert creates(tavus_emulator) == 1


def test_consent_config_binds_each_issuer_to_its_own_keys(tmp_path: Any) -> None:
    partner = IssuerKey.generate()
    with pytest.raises(ConfigError) as info:  # one set for two issuers
        KitConfig(consent=consent_config(issuers=[consent_config()["issuers"][0], PARTNER]))
    assert info.value.field == "consent.jwks"
    assert "each issuer its own" in str(info.value)
    with pytest.raises(ConfigError) as info:  # a table that leaves an issuer out
        KitConfig(consent=_two_issuers(partner, issuers=[PARTNER]))
    assert info.value.field == "consent.jwks"
    with pytest.raises(ConfigError) as info:
        KitConfig(consent=_two_issuers(partner, jwks={PARTNER: 42}))
    assert "consent.jwks" in (info.value.field or "")
    (tmp_path / "keys").mkdir()
    (tmp_path / "avatarkit.toml").write_text(
        '[consent]\naudience = "a"\nissuers = ["https://a.example", "https://b.example"]\n'
        '[consent.jwks]\n"https://a.example" = "keys/a.jwks.json"\n'
        '"https://b.example" = "/etc/avatarkit/b.jwks.json"\n')
    config = KitConfig.from_toml(tmp_path / "avatarkit.toml")
    assert config.consent is not None
    assert config.consent.jwks_by_issuer() == {
        "https://a.example": tmp_path / "keys" / "a.jwks.json",
        "https://b.example": Path("/etc/avatarkit/b.jwks.json")}
    with pytest.raises(ConfigError) as info:
        AvatarKit(config)  # the files do not exist: the field names the issuer
    assert info.value.field == "consent.jwks.https://a.example"


async def test_an_unexpected_re_check_error_ends_a_live_session_fail_closed(
        tavus_emulator: TavusEmulator, make_kit: KitFactory,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Not only consent errors: a re-check that blows up must not leave the session live
    with nobody watching its consent."""
    from avatarkit.consent.enforce import ConsentGate

    async with make_kit(consent={"recheck_interval_s": 0.3}) as kit:
        async def broken(self: ConsentGate, verified: Any, **kwargs: Any) -> Any:
            raise RuntimeError("a bug in a status backend")

        async def install() -> None:
            monkeypatch.setattr(ConsentGate, "recheck", broken)

        elapsed, kinds, closed = await _live_session_ends(kit, install)
        assert closed.reason == "consent_unverifiable"
        assert "consent_revoked" not in kinds
        assert elapsed <= 0.3 + 1.0
        log = await kit.consent_store.generations(CONSENT_GRANT.consent_id)
        assert any(r.kind == "status_check" and r.status_check == "status_unavailable"
                   for r in log)
    assert tavus_emulator.open_sessions == 0
