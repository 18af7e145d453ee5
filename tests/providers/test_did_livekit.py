"""D-ID ``sessions/join`` (``transport = "livekit"``): the adapter against DIDEmulator and the
in-process LiveKit server, over real HTTP for both REST APIs."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import jwt
import pytest

from avatarkit import (
    AuthenticationError,
    AvatarKit,
    Closed,
    ConfigError,
    KitConfig,
    MediaFormatError,
    ProviderConnectionError,
    ServerError,
)
from avatarkit.consent.authority import ConsentAuthority
from avatarkit.disclosure.metadata import DisclosureMetadata
from avatarkit.emulators.did import DIDEmulator
from avatarkit.emulators.livekit import LiveKitServerEmulator
from avatarkit.providers import (
    PlaybackFinished,
    PlaybackStarted,
    ProviderSession,
    SessionRequest,
)
from avatarkit.providers._did_livekit import DIDLiveKitSession, room_for_attempt
from avatarkit.providers.did import DIDProvider, DIDSettings
from avatarkit.vendor_http import new_http_client

from ..conftest import CONSENT, consent_config, eventually, next_event, send_speech
from ..contract.harness import FAST_RETRY
from ..contract.harness_did import AMELIA, API_KEY, BOB

KitMaker = Callable[..., AvatarKit]
STRICT = {"strict": {"failover": False, "objective": "config-order"}}


@contextlib.asynccontextmanager
async def serving() -> AsyncIterator[tuple[DIDEmulator, LiveKitServerEmulator]]:
    async with LiveKitServerEmulator() as livekit, DIDEmulator(
            api_keys=[API_KEY], agents=[AMELIA, BOB]) as emulator:
        yield emulator, livekit
        assert emulator.open_sessions == 0, "the test left a D-ID session billing"


@pytest.fixture
async def served() -> AsyncIterator[tuple[DIDEmulator, LiveKitServerEmulator]]:
    async with serving() as pair:
        yield pair


def settings_for(emulator: DIDEmulator, livekit: LiveKitServerEmulator,
                 **overrides: Any) -> dict[str, Any]:
    return {"transport": "livekit", "api_key": API_KEY, "base_url": emulator.url,
            "livekit_url": livekit.url, "livekit_api_key": livekit.api_key,
            "livekit_api_secret": livekit.api_secret, "price_per_minute": "0.25",
            "retry": FAST_RETRY, "connect_timeout_s": 3, **overrides}


@pytest.fixture
def kit_for(consent_authority: ConsentAuthority) -> KitMaker:
    def factory(emulator: DIDEmulator, livekit: LiveKitServerEmulator,
                **overrides: Any) -> AvatarKit:
        config = KitConfig(providers={"did": settings_for(emulator, livekit, **overrides)},
                           avatars={"amelia": {"did": AMELIA}, "bob": {"did": BOB}},
                           policies=STRICT, consent=consent_config(),
                           metering={"ledger": ":memory:"})
        return AvatarKit(config, status_source=consent_authority.source,
                         consent_store=consent_authority.store)

    return factory


def _request(number: int = 1, *, max_duration_s: float | None = None) -> SessionRequest:
    return SessionRequest(
        session_id=f"ses_{number}", avatar="amelia", avatar_id=AMELIA,
        idempotency_key=f"avk-ses_{number}-1", max_duration_s=max_duration_s,
        disclosure=DisclosureMetadata(generation_id="gen_1", provider="did", avatar="amelia"))


def _provider(emulator: DIDEmulator, livekit: LiveKitServerEmulator, http: Any,
              **overrides: Any) -> DIDProvider:
    return DIDProvider(DIDSettings.model_validate(settings_for(emulator, livekit, **overrides)),
                       http=http)


def _joins(emulator: DIDEmulator) -> int:
    return sum(1 for r in emulator.requests if r.path.endswith("/sessions/join"))


async def _collect(session: ProviderSession, into: list[Any]) -> None:
    async for signal in session.signals():
        into.append(signal)


# -- through AvatarKit ------------------------------------------------------------------------


async def test_viewers_get_their_own_subscribe_only_token_never_the_avatars(
        served: tuple[DIDEmulator, LiveKitServerEmulator], kit_for: KitMaker) -> None:
    emulator, livekit = served
    async with kit_for(emulator, livekit) as kit, kit.session(
            "amelia", consent=CONSENT, purpose="support", policy="strict") as s:
        (vendor,) = emulator.room_sessions.sessions.values()
        assert s.vendor_session_id == f"room:{vendor.room}"
        assert s.join.kind == "livekit" and s.join.url == livekit.url
        assert s.join.token is not None and "**" in repr(s.join)
        viewer = jwt.decode(s.join.token.get_secret_value(), livekit.api_secret,
                            algorithms=["HS256"], issuer=livekit.api_key)
        assert viewer["sub"].startswith("viewer-") and viewer["sub"] != vendor.token_claims["sub"]
        assert viewer["video"] == {"room": vendor.room, "roomJoin": True, "canPublish": False,
                                   "canSubscribe": True, "canPublishData": False}
        # our own participant is the agent the avatar publishes on behalf of
        agent = livekit.participant(vendor.room, "avatarkit-agent")
        assert agent is not None and agent.kind == "agent"
        assert livekit.participant(vendor.room, "d-id-avatar-agent") is not None
    # closing removed the avatar through the RoomService, then we left
    assert [c.method for c in livekit.twirp_calls] == ["RemoveParticipant"]
    assert vendor.end_reason is not None and "PARTICIPANT_REMOVED" in vendor.end_reason
    assert livekit.rooms[vendor.room].participants == {}


async def test_audio_is_resampled_to_the_configured_avatar_rate(
        served: tuple[DIDEmulator, LiveKitServerEmulator], kit_for: KitMaker) -> None:
    emulator, livekit = served
    async with kit_for(emulator, livekit, livekit_sample_rate=48_000) as kit, kit.session(
            "amelia", consent=CONSENT, purpose="support", policy="strict") as s:
        events = s.events()
        await send_speech(s, 0.4, rate=16_000)
        await s.end_utterance()
        await next_event(events, "speech_ended", within=5)
    (vendor,) = emulator.room_sessions.sessions.values()
    assert vendor.sample_rate == 48_000 and vendor.all_protocol_errors == []
    assert vendor.audio_seconds_received == pytest.approx(0.4, abs=0.02)


async def test_the_local_max_duration_ends_the_session_and_sends_the_avatar_away(
        served: tuple[DIDEmulator, LiveKitServerEmulator], kit_for: KitMaker) -> None:
    emulator, livekit = served
    async with kit_for(emulator, livekit) as kit, kit.session(
            "amelia", consent=CONSENT, purpose="support", policy="strict",
            max_duration_s=0.5) as s:
        closed = await next_event(s.events(), "closed", within=5)
        assert isinstance(closed, Closed) and "max_duration_s" in closed.reason
    (vendor,) = emulator.room_sessions.sessions.values()
    assert vendor.status == "ended" and "PARTICIPANT_REMOVED" in (vendor.end_reason or "")


# -- the adapter alone ---------------------------------------------------------------------------


async def test_text_goes_to_the_avatar_on_did_speak_with_playback_events(
        served: tuple[DIDEmulator, LiveKitServerEmulator]) -> None:
    emulator, livekit = served
    async with new_http_client() as http:
        session = await _provider(emulator, livekit, http).start(_request())
        assert isinstance(session, DIDLiveKitSession)
        signals: list[Any] = []
        reader = asyncio.create_task(_collect(session, signals))
        try:
            await session.say("Hello there!", utterance_id="u-text")
            await eventually(lambda: any(isinstance(x, PlaybackFinished) for x in signals))
            started, finished = signals
            assert started == PlaybackStarted(utterance_id="u-text")
            assert isinstance(finished, PlaybackFinished)
            assert (finished.utterance_id, finished.interrupted) == ("u-text", False)
            assert finished.duration == pytest.approx(12 * 0.06, abs=0.05)
            (vendor,) = emulator.room_sessions.sessions.values()
            assert vendor.commands == [
                ("did.speak", '{"script": {"type": "text", "input": "Hello there!"}}')]
            with pytest.raises(MediaFormatError, match="3 to 40000"):
                await session.say("hi", utterance_id="u-short")
        finally:
            await session.end()
            await reader


async def test_the_reaper_ends_a_room_session_from_another_process(
        served: tuple[DIDEmulator, LiveKitServerEmulator]) -> None:
    emulator, livekit = served
    async with new_http_client() as http:
        session = await _provider(emulator, livekit, http).start(_request())
        signals: list[Any] = []
        reader = asyncio.create_task(_collect(session, signals))
        # a fresh provider instance (another process) knows only the vendor session id
        await _provider(emulator, livekit, http).end_session(session.vendor_session_id)
        await eventually(lambda: emulator.open_sessions == 0 and bool(signals))
        (ended,) = signals
        assert ended.billing_stopped and "left room" in ended.reason
        await session.end()  # the avatar is gone already: not an error
        await reader
        # ending it again (the reaper retrying) is not an error either
        await _provider(emulator, livekit, http).end_session(session.vendor_session_id)


async def test_a_start_whose_answer_was_lost_is_found_in_its_room(
        served: tuple[DIDEmulator, LiveKitServerEmulator]) -> None:
    emulator, livekit = served
    request = _request(7)
    async with new_http_client() as http:
        provider = _provider(emulator, livekit, http)
        session = await provider.start(request)
        assert session.vendor_session_id == f"room:{room_for_attempt(request.idempotency_key)}"
        found = await provider.find_session(session_id=request.session_id,
                                            idempotency_key=request.idempotency_key)
        assert found == session.vendor_session_id
        await session.end()
        assert await provider.find_session(session_id=request.session_id,
                                           idempotency_key=request.idempotency_key) is None
        assert await provider.find_session(session_id="ses_other",
                                           idempotency_key="avk-ses_other-1") is None


async def test_a_wrong_livekit_secret_is_refused_before_anything_is_billed(
        served: tuple[DIDEmulator, LiveKitServerEmulator]) -> None:
    emulator, livekit = served
    wrong = "x" * 40
    async with new_http_client() as http:
        provider = _provider(emulator, livekit, http, livekit_api_secret=wrong)
        with pytest.raises(AuthenticationError) as raised:
            await provider.start(_request())
    assert wrong not in str(raised.value)
    assert _joins(emulator) == 0 and emulator.billed_seconds == 0
    assert livekit.refused_joins


async def test_an_unreachable_livekit_server_is_a_connection_error(
        served: tuple[DIDEmulator, LiveKitServerEmulator]) -> None:
    emulator, livekit = served
    with socket.socket() as sock:  # a port nobody listens on: the livekit SDK's own path
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with new_http_client() as http:
        provider = _provider(emulator, livekit, http, livekit_url=f"ws://127.0.0.1:{port}")
        with pytest.raises(ProviderConnectionError) as raised:
            await provider.start(_request())
    assert raised.value.provider == "did"
    assert _joins(emulator) == 0


async def test_an_avatar_that_never_joins_is_sent_away_and_cannot_join_later(
        served: tuple[DIDEmulator, LiveKitServerEmulator]) -> None:
    emulator, livekit = served
    emulator.room_sessions.join_delay = 3.5
    async with new_http_client() as http:
        provider = _provider(emulator, livekit, http, connect_timeout_s=0.5)
        with pytest.raises(ServerError, match="sent away") as raised:
            await provider.start(_request())
    assert raised.value.retryable
    (vendor,) = emulator.room_sessions.sessions.values()
    # the worker turns up after its token expired: the LiveKit server refuses it, D-ID ends
    await eventually(lambda: vendor.status == "ended", within=6)
    assert vendor.end_reason == "join_failed" and "expired" in (vendor.join_error or "")
    assert livekit.rooms[vendor.room].participants == {}


@pytest.mark.parametrize("missing", ["livekit_url", "livekit_api_key", "livekit_api_secret"])
async def test_the_livekit_transport_needs_a_server_and_its_credentials(missing: str) -> None:
    raw = {"transport": "livekit", "api_key": API_KEY, "livekit_url": "wss://lk.example.com",
           "livekit_api_key": "k", "livekit_api_secret": "s" * 32}
    del raw[missing]
    async with new_http_client() as http:
        with pytest.raises(ConfigError) as raised:
            DIDProvider(DIDSettings.model_validate(raw), http=http)
        assert raised.value.field == f"providers.did.{missing}"
        with pytest.raises(ConfigError) as bad_url:
            DIDProvider(DIDSettings.model_validate(
                {**raw, "livekit_url": "ftp://lk.example.com", missing: "x" * 32}), http=http)
        assert bad_url.value.field == "providers.did.livekit_url"


async def test_the_profile_follows_the_transport() -> None:
    async with new_http_client() as http:
        room = DIDProvider(DIDSettings(
            transport="livekit", api_key=API_KEY, livekit_url="wss://lk.example.com",
            livekit_api_key="k", livekit_api_secret="s" * 32, livekit_sample_rate=16_000),
            http=http).profile
        streams = DIDProvider(DIDSettings(api_key=API_KEY), http=http).profile
    assert room.capabilities.join_kinds == {"livekit"} and room.capabilities.interrupt
    assert not room.capabilities.frames_in_process
    assert (room.audio_format.sample_rate, room.audio_format.channels) == (16_000, 1)
    assert streams.capabilities.join_kinds == {"webrtc"} and not streams.capabilities.interrupt
