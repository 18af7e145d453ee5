"""Shared fixtures: a Tavus emulator on a free loopback port, a consent registry, and kits
configured for both.

Every test that uses the emulator fails if it leaves a vendor session open (billing leak).
``CONSENT`` is a valid token for avatar "amelia" (and "bob"), purpose "support", from the
test registry ``ISSUER``; kits from ``make_kit`` trust that registry and read its status list
from the test's ``consent_authority``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest

from avatarkit import AudioChunk, AvatarKit, AvatarSession, KitConfig, SessionEvent
from avatarkit.consent.authority import ConsentAuthority
from avatarkit.consent.grant import ConsentGrant
from avatarkit.consent.keys import IssuerKey
from avatarkit.consent.store import SQLiteConsentStore
from avatarkit.consent.tokens import issue_consent_token
from avatarkit.emulators import TavusEmulator


def pytest_configure(config: pytest.Config) -> None:
    # Session ledgers default to a file under the user's state dir: keep tests out of it.
    state = tempfile.mkdtemp(prefix="avatarkit-test-state-")
    os.environ["AVATARKIT_STATE_DIR"] = state
    config.add_cleanup(lambda: shutil.rmtree(state, ignore_errors=True))


API_KEY = "tvs-test-key-7d1c9e"
FACE = "r_amelia"
ECHO_PAL = "p_echo_amelia"
FAST_RETRY = {"max_retries": 3, "initial_backoff": 0.01, "max_backoff": 0.05}


async def serve_tavus(label: str) -> AsyncIterator[TavusEmulator]:
    """A Tavus emulator knowing the test faces; fails the test if a session is left open."""
    emulator = TavusEmulator(api_keys=[API_KEY], faces=[FACE, "r_bob"])
    emulator.add_pal(ECHO_PAL, FACE)
    async with emulator:
        yield emulator
        leaked = emulator.open_sessions
        assert leaked == 0, f"the test left {leaked} vendor session(s) open at {label}"


@pytest.fixture
async def tavus_emulator() -> AsyncIterator[TavusEmulator]:
    async for emulator in serve_tavus("the emulator"):
        yield emulator


def tavus_toml(emulator: TavusEmulator, *extra: str) -> str:
    """``[providers.tavus]`` and ``[avatars.amelia]`` for a config file (``extra`` lines go
    into the provider section)."""
    lines = "\n".join(extra)
    return f"""
[providers.tavus]
api_key = "{API_KEY}"
base_url = "{emulator.url}"
channel = "websocket"
pal_id = "{ECHO_PAL}"
price_per_minute = "0.30"
{lines}

[avatars.amelia]
tavus = "{FACE}"
"""


KitFactory = Callable[..., AvatarKit]

ISSUER = "https://consent.test"
AUDIENCE = "avatarkit-tests"
ISSUER_KEY = IssuerKey.generate()


def grant_fields(**overrides: Any) -> dict[str, Any]:
    """Fields of a grant for "amelia" and "bob", purpose "support", valid for a day."""
    now = datetime.now(UTC)
    fields: dict[str, Any] = {
        "subject": {"subject_ref": "subj_amelia", "display_name": "Amelia Example"},
        "grantor": {"grantor_ref": "subj_amelia"},
        "avatars": ["amelia", "bob"],
        "purposes": ["support", "demo"],
        "valid_from": now - timedelta(minutes=5),
        "expires_at": now + timedelta(days=1),
        "evidence": {"recording_sha256": "ab" * 32, "storage_ref": "vault://consent/amelia.mp4",
                     "challenge_phrase": "amber otter lantern"},
    }
    fields.update(overrides)
    return fields


#: A token for index 0 of the test registry's status list (valid unless a test revokes it).
CONSENT_GRANT = ConsentGrant.model_validate({
    **grant_fields(expires_at=datetime.now(UTC) + timedelta(days=2)), "issuer": ISSUER,
    "status": {"uri": f"{ISSUER}/status/1", "idx": 0}})
CONSENT = issue_consent_token(CONSENT_GRANT, ISSUER_KEY, audience=AUDIENCE)


@pytest.fixture
async def consent_authority() -> AsyncIterator[ConsentAuthority]:
    """The test registry, with ``CONSENT_GRANT`` recorded at index 0 of its status list."""
    authority = ConsentAuthority(ISSUER_KEY, issuer=ISSUER, store=SQLiteConsentStore(":memory:"),
                                 status_ttl_s=1)
    async with authority:
        ref = await authority.store.allocate_status_index(authority.status_uri)
        assert ref == CONSENT_GRANT.status
        await authority.store.record_grant(CONSENT_GRANT)
        await authority.publish()
        yield authority


def consent_config(**overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {"audience": AUDIENCE, "issuers": [ISSUER],
                              "jwks": {"keys": [ISSUER_KEY.public_jwk()]}}
    config.update(overrides)
    return config


@pytest.fixture
def make_kit(tavus_emulator: TavusEmulator, consent_authority: ConsentAuthority) -> KitFactory:
    """Build a kit for the emulator; keyword arguments override ``[providers.tavus]`` keys
    (``session=`` and ``consent=`` override those sections)."""

    def factory(**tavus: Any) -> AvatarKit:
        session = tavus.pop("session", {})
        consent = consent_config(**tavus.pop("consent", {}))
        metering = {"ledger": ":memory:", **tavus.pop("metering", {})}
        settings: dict[str, Any] = {
            "api_key": API_KEY,
            "base_url": tavus_emulator.url,
            "channel": "websocket",
            "pal_id": ECHO_PAL,
            "price_per_minute": "0.30",
            "retry": FAST_RETRY,
        }
        settings.update(tavus)
        settings = {k: v for k, v in settings.items() if v is not None}
        return AvatarKit(KitConfig(providers={"tavus": settings},
                                   avatars={"amelia": {"tavus": FACE}, "bob": {"tavus": "r_bob"}},
                                   session=session, consent=consent, metering=metering),
                         status_source=consent_authority.source,
                         consent_store=consent_authority.store)

    return factory


def speech(seconds: float, rate: int = 48_000, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    mono = (0.4 * np.sin(2 * np.pi * 180 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t)))
    mono = mono.astype(np.float32)
    return np.stack([mono] * channels, axis=1) if channels > 1 else mono


async def send_speech(session: AvatarSession, seconds: float, *, rate: int = 48_000,
                      channels: int = 1, chunk_ms: int = 20) -> None:
    """Send ``seconds`` of audio in ``chunk_ms`` chunks as fast as the session takes them."""
    audio = speech(seconds, rate, channels)
    step = rate * chunk_ms // 1000
    for offset in range(0, len(audio), step):
        await session.send_audio(
            AudioChunk.from_float(audio[offset:offset + step], sample_rate=rate,
                                  channels=channels))


async def next_event(events: AsyncIterator[SessionEvent], kind: str,
                     within: float = 5.0) -> SessionEvent:
    """The next event of type ``kind`` from an ``events()`` stream (waits ``within`` seconds)."""
    async with asyncio.timeout(within):
        async for event in events:
            if event.type == kind:
                return event
    raise AssertionError(f"the event stream ended without a {kind!r} event")


def sdk_tasks(before: set[asyncio.Task[Any]]) -> list[asyncio.Task[Any]]:
    """Tasks started since ``before`` that belong to the SDK (not the emulator's server)."""
    leftover = []
    for task in asyncio.all_tasks() - before:
        if task.done() or task is asyncio.current_task():
            continue
        code = getattr(task.get_coro(), "cr_code", None)
        filename = code.co_filename if code else ""
        if "/aiohttp/" in filename or "/emulators/" in filename:
            continue
        leftover.append(task)
    return leftover


@pytest.fixture
async def tavus_b() -> AsyncIterator[TavusEmulator]:
    """A second Tavus emulator (a second account or region), configured as ``tavus-b``."""
    async for emulator in serve_tavus("tavus-b"):
        yield emulator


def provider_settings(emulator: TavusEmulator, **overrides: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "api_key": API_KEY, "base_url": emulator.url, "channel": "websocket",
        "pal_id": ECHO_PAL, "price_per_minute": "0.30", "retry": FAST_RETRY,
    }
    settings.update(overrides)
    return {k: v for k, v in settings.items() if v is not None}


@pytest.fixture
def make_pair_kit(tavus_emulator: TavusEmulator, tavus_b: TavusEmulator,
                  consent_authority: ConsentAuthority) -> KitFactory:
    """A kit with two providers: ``tavus`` (the first emulator) then ``tavus-b`` (kind tavus,
    the second). ``a=``/``b=`` override their settings; other keywords are config sections."""

    def factory(*, a: dict[str, Any] | None = None, b: dict[str, Any] | None = None,
                **sections: Any) -> AvatarKit:
        consent = consent_config(**sections.pop("consent", {}))
        # each kit its own ledger: usage (and budgets) must not leak between tests
        sections["metering"] = {"ledger": ":memory:", **sections.pop("metering", {})}
        providers = {
            "tavus": provider_settings(tavus_emulator, **(a or {})),
            "tavus-b": {"kind": "tavus", **provider_settings(tavus_b, **(b or {}))},
        }
        ledger = sections.pop("ledger", None)
        config = KitConfig(providers=providers,
                           avatars={"amelia": {"tavus": FACE, "tavus-b": FACE}},
                           consent=consent, **sections)
        return AvatarKit(config, status_source=consent_authority.source,
                         consent_store=consent_authority.store, ledger=ledger)

    return factory


def creates(emulator: TavusEmulator) -> int:
    """How many conversation creates reached ``emulator`` (failed ones included)."""
    return sum(1 for r in emulator.requests
               if r.method == "POST" and r.path == "/v2/conversations")


async def eventually(check: Callable[[], bool], *, within: float = 5.0,
                     every: float = 0.02) -> None:
    """Wait until ``check()`` holds (polling state the test cannot await directly)."""
    for _ in range(max(1, int(within / every))):
        if check():
            return
        await asyncio.sleep(every)
    assert check(), f"condition not met within {within} s"
