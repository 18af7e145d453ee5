"""The LiveAvatar (LITE) adapter through AvatarKit/AvatarSession, against LiveAvatarEmulator
over real sockets (httpx for REST, websockets for the LITE channel)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from aiohttp import web
from pydantic import SecretStr

from avatarkit import (
    AuthenticationError,
    AvatarKit,
    CapabilityError,
    Closed,
    ConfigError,
    Interrupted,
    KitConfig,
    ProviderConnectionError,
    ProviderTimeoutError,
    RateLimitError,
    ServerError,
    SessionState,
    SpeechEnded,
    SpeechStarted,
)
from avatarkit.consent.authority import ConsentAuthority
from avatarkit.disclosure.metadata import DisclosureMetadata
from avatarkit.emulators import LiveAvatarEmulator
from avatarkit.emulators.liveavatar import MAX_MESSAGE_BYTES, LiveAvatarSessionRecord
from avatarkit.join import JoinInfo
from avatarkit.media import AudioChunk
from avatarkit.providers import SessionRequest, get_provider_class
from avatarkit.providers.liveavatar import (
    LiveAvatarProvider,
    LiveAvatarSettings,
)
from avatarkit.providers.liveavatar import (
    LiveAvatarSession as AdapterSession,
)

from ..conftest import (
    CONSENT,
    consent_config,
    eventually,
    next_event,
    sdk_tasks,
    send_speech,
)
from ..contract.harness import FAST_RETRY
from ..contract.harness_liveavatar import AMELIA, API_KEY, BOB

KitMaker = Callable[..., AvatarKit]
#: a policy that closes the session when its vendor session dies (no failover to a new one)
STRICT = {"strict": {"failover": False, "objective": "config-order"}}


@contextlib.asynccontextmanager
async def serving(emulator_class: type[LiveAvatarEmulator] = LiveAvatarEmulator,
                  **options: Any) -> AsyncIterator[LiveAvatarEmulator]:
    """An emulator knowing amelia and bob; fails the test if a session is left open."""
    async with emulator_class(api_keys=[API_KEY], faces=[AMELIA, BOB], **options) as emulator:
        yield emulator
        assert emulator.open_sessions == 0, "the test left a LiveAvatar session open"


@pytest.fixture
async def emu() -> AsyncIterator[LiveAvatarEmulator]:
    async with serving() as emulator:
        yield emulator


@pytest.fixture
def kit_for(consent_authority: ConsentAuthority) -> KitMaker:
    """``kit_for(emulator, **settings)``: a kit with ``[providers.liveavatar]`` pointing at
    the emulator (``section=`` renames it, ``session=`` sets ``[session]``)."""

    def factory(emulator: LiveAvatarEmulator, *, section: str = "liveavatar",
                session: dict[str, Any] | None = None, **settings: Any) -> AvatarKit:
        provider: dict[str, Any] = {"api_key": API_KEY, "base_url": emulator.url,
                                    "price_per_minute": "0.10", "retry": FAST_RETRY}
        provider.update(settings)
        config = KitConfig(providers={section: provider},
                           avatars={"amelia": {"liveavatar": AMELIA},
                                    "bob": {"liveavatar": BOB}},
                           policies=STRICT, session=session or {}, consent=consent_config(),
                           metering={"ledger": ":memory:"})
        return AvatarKit(config, status_source=consent_authority.source,
                         consent_store=consent_authority.store)

    return factory


def record_of(emulator: LiveAvatarEmulator,
              vendor_session_id: str | None) -> LiveAvatarSessionRecord:
    assert vendor_session_id is not None
    return emulator.sessions[vendor_session_id]


def paths(emulator: LiveAvatarEmulator) -> list[tuple[str, str, int | None]]:
    """The REST calls the emulator got (method, path, status), WebSocket upgrades left out."""
    return [(r.method, r.path, r.status) for r in emulator.requests
            if not r.path.startswith("/v1/lite/")]


# -- a full session -------------------------------------------------------------------------------


async def test_full_session_paces_24khz_audio_and_reports_speech(
        emu: LiveAvatarEmulator, kit_for: KitMaker) -> None:
    before = asyncio.all_tasks()
    async with kit_for(emu) as kit, kit.session("amelia", consent=CONSENT,
                                                purpose="support") as s:
        events = s.events()
        assert s.provider == "liveavatar" and s.state is SessionState.LIVE
        await send_speech(s, 1.8)  # 48 kHz in: converted to 24 kHz mono
        await s.end_utterance()
        started = await next_event(events, "speech_started")
        ended = await next_event(events, "speech_ended", within=4)
        assert isinstance(started, SpeechStarted) and isinstance(ended, SpeechEnded)
        assert started.utterance_id == ended.utterance_id and not ended.interrupted
        assert ended.duration == pytest.approx(1.8, abs=0.15)  # measured from the events
        await send_speech(s, 0.3)  # a second utterance: its own event id
        await s.end_utterance()
        second = await next_event(events, "speech_ended", within=3)
        record = record_of(emu, s.vendor_session_id)
    first, last = record.utterances
    # ~0.6 s first, then 1 s pieces, the rest at end_utterance; one event id per utterance
    assert first.chunk_seconds == [pytest.approx(0.6), pytest.approx(1.0),
                                   pytest.approx(0.2, abs=0.002)]
    assert first.event_ids == [started.utterance_id] and first.outcome == "finished"
    assert last.event_ids == [second.utterance_id] != first.event_ids  # type: ignore[union-attr]
    assert last.chunk_seconds == [pytest.approx(0.3, abs=0.002)]
    assert record.speak_ends == [started.utterance_id, second.utterance_id]  # type: ignore[union-attr]
    assert all(c.message_bytes <= MAX_MESSAGE_BYTES for c in record.speak_chunks)
    assert record.protocol_errors == [] and record.messages_before_connected == 0
    assert record.interrupts == 0 and record.ignored_chunks == 0
    # stopped with POST /v1/sessions/stop, reason USER_DISCONNECTED
    assert (record.status, record.end_reason, record.stop_reason) == (
        "ended", "stopped", "USER_DISCONNECTED")
    assert [(m, p) for m, p, _ in paths(emu)] == [
        ("POST", "/v1/sessions/token"), ("POST", "/v1/sessions/start"),
        ("POST", "/v1/sessions/stop")]
    assert [r.api_key_present for r in emu.requests if r.method == "POST"] == [
        True, False, False]
    assert not record.is_sandbox and record.video_quality is None
    history = [e async for e in s.events()]
    closed = history[-1]
    assert isinstance(closed, Closed) and closed.vendor_ended and closed.error is None
    assert closed.billed_seconds == pytest.approx(record.billed_seconds, abs=0.1)
    await asyncio.sleep(0)
    assert sdk_tasks(before) == []


async def test_big_chunks_stay_under_the_message_limit(emu: LiveAvatarEmulator,
                                                       kit_for: KitMaker) -> None:
    async with kit_for(emu, chunk_ms=10_000) as kit, \
            kit.session("amelia", consent=CONSENT, purpose="support") as s:
        await send_speech(s, 11.0, chunk_ms=200)
        await s.end_utterance()
        record = record_of(emu, s.vendor_session_id)
        # the stop (REST) must not overtake the 640 KB message (WebSocket) at the vendor
        await eventually(lambda: len(record.speak_chunks) == 3)
    assert record.utterances[0].chunk_seconds == [
        pytest.approx(0.6), pytest.approx(10.0), pytest.approx(0.4, abs=0.002)]
    biggest = max(c.message_bytes for c in record.speak_chunks)
    assert 640_000 < biggest <= MAX_MESSAGE_BYTES and record.protocol_errors == []


def test_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="keep_alive_s"):
        KitConfig(providers={"liveavatar": {"api_key": "k", "keep_alive_s": 300}})
    with pytest.raises(ConfigError, match="chunk_ms"):
        KitConfig(providers={"liveavatar": {"api_key": "k", "chunk_ms": 20_000}})
    with pytest.raises(ConfigError, match="video_quality"):
        KitConfig(providers={"liveavatar": {"api_key": "k", "video_quality": "4k"}})
    with pytest.raises(ConfigError, match=r"providers\.liveavatar\.api_key"):
        AvatarKit(KitConfig(providers={"liveavatar": {}}))
    settings = LiveAvatarSettings()
    assert (settings.base_url, settings.first_chunk_ms, settings.chunk_ms,
            settings.keep_alive_s, settings.is_sandbox) == (
        "https://api.liveavatar.com", 600, 1000, 60.0, False)


async def test_profile_and_the_heygen_alias(emu: LiveAvatarEmulator, kit_for: KitMaker) -> None:
    assert get_provider_class("heygen") is LiveAvatarProvider
    assert get_provider_class("liveavatar") is LiveAvatarProvider
    async with kit_for(emu, section="heygen") as kit:
        assert list(kit.providers) == ["liveavatar"]
        profile = kit.providers["liveavatar"].profile
        assert (profile.audio_format.sample_rate, profile.audio_format.channels) == (24_000, 1)
        assert profile.capabilities.join_kinds == frozenset({"livekit"})
        assert profile.capabilities.interrupt and profile.capabilities.playback_events
        assert not profile.capabilities.frames_in_process
        assert profile.first_frame_latency_ms == 400.0 and profile.vendor == "liveavatar"
        async with kit.session("amelia", consent=CONSENT, purpose="support") as s:
            assert s.provider == "liveavatar"
    unpriced = LiveAvatarProvider(LiveAvatarSettings(api_key="k"), http=kit._http)
    assert unpriced.profile.price_per_minute is None  # unknown unless configured


async def test_token_request_carries_the_settings(emu: LiveAvatarEmulator,
                                                  kit_for: KitMaker) -> None:
    async with kit_for(emu, video_quality="high", max_session_duration=900) as kit:
        async with kit.session("amelia", consent=CONSENT, purpose="support") as s:
            long_record = record_of(emu, s.vendor_session_id)
        async with kit.session("bob", consent=CONSENT, purpose="support",
                               max_duration_s=30) as s:
            short_record = record_of(emu, s.vendor_session_id)
    assert (long_record.video_quality, long_record.max_session_duration) == ("high", 900)
    assert (short_record.avatar_id, short_record.max_session_duration) == (BOB, 30)


# -- the connected gate ---------------------------------------------------------------------------


async def test_nothing_is_sent_before_connected(kit_for: KitMaker) -> None:
    async with serving(connected_delay=0.5) as emu, kit_for(emu) as kit:
        began = time.monotonic()
        async with kit.session("amelia", consent=CONSENT, purpose="support") as s:
            start_took = time.monotonic() - began
            events = s.events()
            await send_speech(s, 1.2)  # queued until the vendor says "connected"
            await s.end_utterance()
            await next_event(events, "speech_ended", within=4)
            record = record_of(emu, s.vendor_session_id)
    assert start_took < 0.4  # start() did not wait for the gate: audio could be prepared
    assert record.messages_before_connected == 0 and record.protocol_errors == []
    assert record.utterances[0].chunk_seconds == [pytest.approx(0.6),
                                                  pytest.approx(0.6, abs=0.002)]
    assert record.speak_ends == record.utterances[0].event_ids


async def test_wait_connected_makes_start_wait_for_the_gate(kit_for: KitMaker) -> None:
    async with serving(connected_delay=0.4) as emu, kit_for(emu, wait_connected=True) as kit:
        began = time.monotonic()
        async with kit.session("amelia", consent=CONSENT, purpose="support") as s:
            assert time.monotonic() - began >= 0.4
            await send_speech(s, 0.7)
            await s.end_utterance()
            record = record_of(emu, s.vendor_session_id)
    assert record.messages_before_connected == 0 and record.protocol_errors == []
    assert record.audio_seconds_received == pytest.approx(0.7, abs=0.002)


async def test_gate_timeout_in_start_is_typed_and_stops_the_session(kit_for: KitMaker) -> None:
    async with serving(connected_delay=5) as emu, \
            kit_for(emu, wait_connected=True, connect_timeout_s=0.3) as kit:
        began = time.monotonic()
        session = kit.session("amelia", consent=CONSENT, purpose="support")
        with pytest.raises(ProviderTimeoutError, match="connected"):
            async with session:
                pytest.fail("the body must not run")
        assert 0.3 <= time.monotonic() - began < 2
        (record,) = emu.sessions.values()
        assert record.status == "ended" and record.end_reason == "stopped"
        assert emu.open_sessions == 0
        # the adapter stopped what it began: the ledger says failed, not "creating" forever
        (row,) = await kit.ledger.rows(session_id=session.session_id)
        assert row.state == "failed"


async def test_gate_timeout_after_start_closes_with_a_typed_error(kit_for: KitMaker) -> None:
    async with serving(connected_delay=5) as emu, kit_for(emu, connect_timeout_s=0.3) as kit:
        async with kit.session("amelia", consent=CONSENT, purpose="support",
                               policy="strict") as s:
            events = s.events()
            await send_speech(s, 1.0)  # queued; never sent
            closed = await next_event(events, "closed", within=3)
            with pytest.raises(ProviderTimeoutError):
                await send_speech(s, 0.1)
        record = record_of(emu, s.vendor_session_id)
        assert isinstance(closed, Closed) and closed.vendor_ended
        assert closed.error is not None and "connected" in closed.error
        assert record.end_reason == "stopped" and record.messages_received == 0
        assert emu.open_sessions == 0


# -- interrupts -----------------------------------------------------------------------------------


async def test_interrupt_while_speaking_is_acknowledged(emu: LiveAvatarEmulator,
                                                        kit_for: KitMaker) -> None:
    async with kit_for(emu) as kit, kit.session("amelia", consent=CONSENT,
                                                purpose="support") as s:
        events = s.events()
        await send_speech(s, 3.0)
        await s.end_utterance()
        await next_event(events, "speech_started")
        await asyncio.sleep(0.4)
        began = time.monotonic()
        position = await s.interrupt()
        took = time.monotonic() - began
        ended = await next_event(events, "speech_ended")
        interrupted = await next_event(events, "interrupted")
        assert isinstance(ended, SpeechEnded) and ended.interrupted
        assert isinstance(interrupted, Interrupted) and interrupted.acknowledged
        assert took < 0.5 and 0.3 < position < 0.8
        # the session speaks normally afterwards
        await send_speech(s, 0.3)
        await s.end_utterance()
        again = await next_event(events, "speech_ended", within=3)
        assert isinstance(again, SpeechEnded) and not again.interrupted
        record = record_of(emu, s.vendor_session_id)
    assert (record.interrupts, record.useless_interrupts) == (1, 0)
    assert [u.outcome for u in record.utterances] == ["interrupted", "finished"]
    assert record.protocol_errors == []


async def test_interrupt_with_nothing_at_the_vendor_sends_nothing(
        emu: LiveAvatarEmulator, kit_for: KitMaker) -> None:
    async with kit_for(emu) as kit, kit.session("amelia", consent=CONSENT,
                                                purpose="support") as s:
        events = s.events()
        await send_speech(s, 0.4)  # under first_chunk_ms: still buffered here
        began = time.monotonic()
        await s.interrupt()
        took = time.monotonic() - began
        interrupted = await next_event(events, "interrupted")
        record = record_of(emu, s.vendor_session_id)
    assert isinstance(interrupted, Interrupted) and interrupted.acknowledged
    assert took < 0.1  # acknowledged here, no ack timeout
    assert record.interrupts == 0 and record.speak_chunks == [] and record.speak_ends == []


async def test_interrupt_before_connected_drops_the_queue(kit_for: KitMaker) -> None:
    async with serving(connected_delay=0.4) as emu, kit_for(emu) as kit, \
            kit.session("amelia", consent=CONSENT, purpose="support") as s:
        events = s.events()
        await send_speech(s, 1.5)
        await s.interrupt()
        interrupted = await next_event(events, "interrupted", within=0.2)
        assert isinstance(interrupted, Interrupted) and interrupted.acknowledged
        await asyncio.sleep(0.6)  # past the gate: the queued audio must not go out
        record = record_of(emu, s.vendor_session_id)
        assert record.messages_received == 0 and record.interrupts == 0


async def test_a_mute_vendor_does_not_hang_an_interrupt(emu: LiveAvatarEmulator,
                                                        kit_for: KitMaker) -> None:
    emu.faults.mute_interrupts = True
    async with kit_for(emu, session={"interrupt_ack_timeout": 0.5}) as kit, \
            kit.session("amelia", consent=CONSENT, purpose="support") as s:
        events = s.events()
        await send_speech(s, 3.0)
        await s.end_utterance()
        await next_event(events, "speech_started")
        await asyncio.sleep(0.3)
        began = time.monotonic()
        position = await s.interrupt()
        took = time.monotonic() - began
        interrupted = await next_event(events, "interrupted")
        record = record_of(emu, s.vendor_session_id)
    assert 0.5 <= took < 0.8
    assert isinstance(interrupted, Interrupted) and not interrupted.acknowledged
    assert 0.2 < position < 0.7  # the session's estimate
    assert record.interrupts == 1 and record.utterances[0].outcome == "interrupted"


# -- keep-alive and the vendor's own ends ---------------------------------------------------------


async def test_keep_alive_holds_the_session_past_the_idle_timeout(kit_for: KitMaker) -> None:
    async with serving(idle_timeout=0.5, idle_reset_by_any_message=False) as emu, \
            kit_for(emu, keep_alive_s=0.15) as kit, \
            kit.session("amelia", consent=CONSENT, purpose="support") as s:
        await asyncio.sleep(1.3)
        record = record_of(emu, s.vendor_session_id)
        assert record.status == "active" and s.state is SessionState.LIVE
        assert record.keep_alives >= 5 and record.protocol_errors == []


async def test_any_send_postpones_the_keep_alive(emu: LiveAvatarEmulator,
                                                 kit_for: KitMaker) -> None:
    async with kit_for(emu, keep_alive_s=0.3) as kit, \
            kit.session("amelia", consent=CONSENT, purpose="support") as s:
        record = record_of(emu, s.vendor_session_id)
        for _ in range(8):  # a message every 0.1 s for 0.8 s
            await send_speech(s, 1.0, chunk_ms=100)
            await asyncio.sleep(0.1)
        assert record.keep_alives == 0
        await s.end_utterance()
        await eventually(lambda: record.keep_alives >= 1, within=1.0)


async def test_the_vendor_idle_timeout_ends_the_session_without_failover(
        kit_for: KitMaker) -> None:
    async with serving(idle_timeout=0.4) as emu, kit_for(emu) as kit, \
            kit.session("amelia", consent=CONSENT, purpose="support") as s:
        events = s.events()  # default policy: failover on, but an idle end is deliberate
        closed = await next_event(events, "closed", within=3)
        assert isinstance(closed, Closed) and closed.reason == "vendor: idle_timeout"
        assert closed.vendor_ended and s.providers_used == ["liveavatar"]
        assert len(emu.sessions) == 1 and emu.open_sessions == 0


async def test_a_vendor_side_end_stops_billing_and_closes(emu: LiveAvatarEmulator,
                                                          kit_for: KitMaker) -> None:
    async with kit_for(emu) as kit, kit.session("amelia", consent=CONSENT, purpose="support",
                                                policy="strict") as s:
        events = s.events()
        await send_speech(s, 1.0)
        emu.end_session(str(s.vendor_session_id), reason="credits_exhausted")
        closed = await next_event(events, "closed")
        with pytest.raises(ProviderConnectionError):
            await send_speech(s, 0.1)
    assert isinstance(closed, Closed) and closed.reason == "vendor: credits_exhausted"
    assert closed.vendor_ended
    assert record_of(emu, s.vendor_session_id).end_reason == "credits_exhausted"


# -- stopping -------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [404, 405])
async def test_stop_falls_back_to_delete_and_remembers_it(kit_for: KitMaker,
                                                         status: int) -> None:
    async with serving(post_stop_status=status) as emu, kit_for(emu) as kit:
        for avatar in ("amelia", "bob"):
            async with kit.session(avatar, consent=CONSENT, purpose="support"):
                pass
        stops = [(m, st) for m, p, st in paths(emu) if p in ("/v1/sessions/stop", "/v1/sessions")]
        assert stops == [("POST", status), ("DELETE", 200), ("DELETE", 200)]
        assert [r.end_reason for r in emu.sessions.values()] == ["stopped", "stopped"]


async def test_a_missing_delete_route_is_never_needed(kit_for: KitMaker) -> None:
    async with serving(delete_stop_status=405) as emu, kit_for(emu) as kit:
        async with kit.session("amelia", consent=CONSENT, purpose="support"):
            pass
        assert [(m, p) for m, p, _ in paths(emu)][-1] == ("POST", "/v1/sessions/stop")


async def test_a_failed_stop_is_reported_and_retried(emu: LiveAvatarEmulator,
                                                     kit_for: KitMaker) -> None:
    emu.faults.fail_next_ends(10, status=500)
    kit = kit_for(emu, retry={"max_retries": 1, "initial_backoff": 0.01})
    s = kit.session("amelia", consent=CONSENT, purpose="support")
    await s.start()
    with pytest.raises(ServerError):
        await s.aclose()
    assert emu.open_sessions == 1  # still billed, and the caller was told
    emu.faults.clear()
    await s.aclose()
    assert emu.open_sessions == 0
    await kit.aclose()


# -- every exit path stops the vendor session -----------------------------------------------------


async def test_an_exception_in_the_block_stops_the_session(emu: LiveAvatarEmulator,
                                                           kit_for: KitMaker) -> None:
    before = asyncio.all_tasks()
    with pytest.raises(RuntimeError, match="app bug"):
        async with kit_for(emu) as kit, kit.session("amelia", consent=CONSENT,
                                                    purpose="support") as s:
            await send_speech(s, 0.8)
            raise RuntimeError("app bug")
    assert emu.open_sessions == 0
    assert record_of(emu, s.vendor_session_id).end_reason == "stopped"
    await asyncio.sleep(0)
    assert sdk_tasks(before) == []


async def test_cancelling_the_session_start_leaves_nothing_open(kit_for: KitMaker) -> None:
    async with serving() as emu, kit_for(emu) as kit:
        emu.faults.slow_next(2, 0.3, route="create")  # the token, then the start
        s = kit.session("amelia", consent=CONSENT, purpose="support")
        start = asyncio.create_task(s.start())
        await eventually(lambda: any(r.path == "/v1/sessions/start" for r in emu.requests))
        start.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await start
        await eventually(lambda: bool(emu.sessions) and all(
            r.status == "ended" for r in emu.sessions.values()), within=5)
        assert emu.open_sessions == 0


def _request(avatar_id: str = AMELIA) -> SessionRequest:
    return SessionRequest(
        session_id="ses_test", avatar="amelia", avatar_id=avatar_id, idempotency_key="avk-1",
        disclosure=DisclosureMetadata(generation_id="gen_1", provider="liveavatar",
                                      avatar="amelia"))


async def test_cancelling_the_adapter_start_stops_the_session(kit_for: KitMaker) -> None:
    """The adapter's own guarantee, without the session layer: a start cancelled while it
    waits for 'connected' stops the started session before it ends."""
    async with serving(connected_delay=5) as emu, kit_for(emu, wait_connected=True) as kit:
        provider = kit.providers["liveavatar"]
        start = asyncio.create_task(provider.start(_request()))
        await eventually(lambda: any(r.status == "active" for r in emu.sessions.values()))
        start.cancel()
        with pytest.raises(asyncio.CancelledError):
            await start
        assert emu.open_sessions == 0
        assert next(iter(emu.sessions.values())).end_reason == "stopped"


class RefusingEmulator(LiveAvatarEmulator):
    """Refuses the LITE WebSocket with 503, echoing its token (as a careless proxy might)."""

    async def _handle_websocket(self, request: web.Request) -> web.StreamResponse:
        return self._error_response(503, f"no capacity for token {request.query.get('token')}")


async def test_a_refused_websocket_is_typed_and_the_session_is_stopped(
        kit_for: KitMaker) -> None:
    async with serving(RefusingEmulator) as emu, \
            kit_for(emu, retry={"max_retries": 0}) as kit:
        with pytest.raises(ServerError) as raised:
            async with kit.session("amelia", consent=CONSENT, purpose="support"):
                pytest.fail("the body must not run")
        (record,) = emu.sessions.values()
        assert raised.value.status == 503 and "refused" in str(raised.value)
        assert record.ws_token not in str(raised.value) and "***" in str(raised.value)
        assert record.end_reason == "stopped" and emu.open_sessions == 0


async def test_a_dropped_websocket_closes_with_a_typed_error_and_stops(
        emu: LiveAvatarEmulator, kit_for: KitMaker) -> None:
    emu.faults.drop_channel_after(0.5)
    before = asyncio.all_tasks()
    async with kit_for(emu) as kit, kit.session("amelia", consent=CONSENT, purpose="support",
                                                policy="strict") as s:
        events = s.events()
        with pytest.raises(ProviderConnectionError):
            for _ in range(40):  # the drop surfaces on a send
                await send_speech(s, 0.2)
                await asyncio.sleep(0.02)
        closed = await next_event(events, "closed")
        record = record_of(emu, s.vendor_session_id)
    assert isinstance(closed, Closed) and closed.vendor_ended
    assert closed.error is not None and "dropped" in closed.error
    assert record.channel_dropped and record.end_reason == "stopped"  # we stopped it
    await asyncio.sleep(0)
    assert sdk_tasks(before) == []


# -- errors before anything is billed -------------------------------------------------------------


async def test_a_bad_api_key_is_typed_and_creates_nothing(emu: LiveAvatarEmulator,
                                                          kit_for: KitMaker) -> None:
    async with kit_for(emu, api_key="not-the-right-key") as kit:
        with pytest.raises(AuthenticationError) as raised:
            async with kit.session("amelia", consent=CONSENT, purpose="support"):
                pytest.fail("the body must not run")
    assert raised.value.status == 401 and raised.value.provider == "liveavatar"
    assert "not-the-right-key" not in str(raised.value)
    assert not emu.sessions and paths(emu) == [("POST", "/v1/sessions/token", 401)]


async def test_a_rate_limited_token_is_a_rate_limit_error(emu: LiveAvatarEmulator,
                                                          kit_for: KitMaker) -> None:
    emu.faults.rate_limit_next(1, retry_after=7, route="create")
    async with kit_for(emu, retry={"max_retries": 0}) as kit:
        with pytest.raises(RateLimitError) as raised:
            await kit.session("amelia", consent=CONSENT, purpose="support").start()
    assert raised.value.retry_after == 7.0 and raised.value.status == 429
    assert not emu.sessions


async def test_a_rate_limited_token_is_retried_after_the_wait(emu: LiveAvatarEmulator,
                                                              kit_for: KitMaker) -> None:
    emu.faults.rate_limit_next(1, retry_after=0.2, route="create")
    began = time.monotonic()
    async with kit_for(emu) as kit, kit.session("amelia", consent=CONSENT, purpose="support"):
        assert time.monotonic() - began >= 0.2
    assert [st for _, p, st in paths(emu) if p == "/v1/sessions/token"] == [429, 200]
    assert len(emu.sessions) == 1


# -- secrets --------------------------------------------------------------------------------------


async def test_session_tokens_never_reach_logs_or_reprs(emu: LiveAvatarEmulator,
                                                        kit_for: KitMaker,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    emu.faults.fail_next_ends(1, status=500)  # a retried stop: logged with the Bearer call
    texts: list[str] = []
    async with kit_for(emu) as kit, kit.session("amelia", consent=CONSENT,
                                                purpose="support") as s:
        vendor = s._vendor
        assert isinstance(vendor, AdapterSession)
        texts += [repr(kit.providers["liveavatar"]), repr(vendor), repr(vendor._api),
                  repr(s.join), str(s.join), repr(kit.config)]
        join = s.join
        await send_speech(s, 0.7)
        await s.end_utterance()
        record = record_of(emu, s.vendor_session_id)
    texts += [r.getMessage() for r in caplog.records]
    secrets = [record.session_token, record.ws_token, str(record.livekit_agent_token),
               str(record.livekit_client_token), API_KEY]
    assert any(r.name == "avatarkit.http" for r in caplog.records)  # logging did happen
    for secret in secrets:
        assert all(secret not in text for text in texts)
    # viewers get the client token, never the agent's
    assert join.kind == "livekit" and join.url == emu.livekit_url
    assert join.token is not None
    assert join.token.get_secret_value() == record.livekit_client_token
    assert str(record.livekit_agent_token) not in join.model_dump_json()
    assert record.tokens_distinct


# -- what LiveAvatar cannot do --------------------------------------------------------------------


async def test_no_reaping_or_lookup_by_id(emu: LiveAvatarEmulator, kit_for: KitMaker) -> None:
    async with kit_for(emu) as kit:
        provider = kit.providers["liveavatar"]
        with pytest.raises(CapabilityError):
            await provider.end_session("any-session-id")
        with pytest.raises(CapabilityError):
            await provider.find_session(session_id="ses_x", idempotency_key="avk-x")
        async with kit.session("amelia", consent=CONSENT, purpose="support") as s:
            with pytest.raises(CapabilityError, match="livekit"):
                s.video()


async def test_probe_lists_avatars_with_the_api_key(kit_for: KitMaker) -> None:
    async with serving(LiveAvatarEmulator) as emu:
        async with kit_for(emu) as kit:
            await kit.providers["liveavatar"].probe()
        async with kit_for(emu, api_key="revoked", retry={"max_retries": 0}) as kit:
            with pytest.raises(AuthenticationError):
                await kit.providers["liveavatar"].probe()
        assert [(m, p, st) for m, p, st in paths(emu)] == [
            ("GET", "/v1/avatars", 200), ("GET", "/v1/avatars", 401)]
        assert not emu.sessions


# -- races (review findings) ------------------------------------------------------------------


class _StallingSocket:
    """A LITE socket double that records each frame when written and can stall in the drain
    that follows (websockets writes, then waits for the buffer under backpressure)."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.drained = asyncio.Event()
        self.drained.set()
        self.inbox: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    async def send_text(self, data: str | bytes) -> None:
        self.sent.append(json.loads(data))
        await self.drained.wait()

    async def json_messages(self) -> AsyncIterator[dict[str, Any]]:
        while (message := await self.inbox.get()) is not None:
            yield message

    async def aclose(self) -> None:
        self.inbox.put_nowait(None)


def _raw_session(socket: _StallingSocket) -> AdapterSession:
    provider = LiveAvatarProvider(LiveAvatarSettings(api_key="k", base_url="http://unused"),
                                  http=httpx.AsyncClient())

    async def stopped(api: object, session_id: str) -> None:
        return None

    provider._stop = stopped  # type: ignore[method-assign]
    join = JoinInfo(kind="livekit", url="wss://room", token=SecretStr("t"),
                    disclosure=DisclosureMetadata(generation_id="g", provider="liveavatar",
                                                  avatar="amelia"))
    return AdapterSession(provider, session_id="s1", api=provider.api,
                          socket=socket, join=join)  # type: ignore[arg-type]


def _pcm(seconds: float) -> AudioChunk:
    return AudioChunk.from_pcm16(b"\x01\x00" * int(24_000 * seconds), sample_rate=24_000,
                                 channels=1)


async def test_no_audio_of_an_interrupted_utterance_follows_the_interrupt() -> None:
    socket = _StallingSocket()
    s = _raw_session(socket)
    socket.inbox.put_nowait({"type": "session.state_updated", "state": "connected"})
    await s.wait_connected()
    await s.send_audio(_pcm(0.7), utterance_id="A")
    socket.drained.clear()  # backpressure: the next send waits in its drain
    # B's first send finishes A first and waits on the socket; the app interrupts meanwhile
    send = asyncio.create_task(s.send_audio(_pcm(1.0), utterance_id="B"))
    await asyncio.sleep(0.01)
    interrupt = asyncio.create_task(s.interrupt())
    await asyncio.sleep(0.01)
    socket.drained.set()
    await send
    await interrupt
    kinds = [(m["type"], m.get("event_id")) for m in socket.sent]
    after = kinds[kinds.index(("agent.interrupt", None)) + 1:]
    assert ("agent.speak", "B") not in after
    await s.end()


async def test_wait_connected_returns_when_the_session_ends_first() -> None:
    s = _raw_session(_StallingSocket())
    waiter = asyncio.create_task(s.wait_connected())
    await asyncio.sleep(0.01)
    await s.end()
    with pytest.raises(ProviderConnectionError, match="before it connected"):
        async with asyncio.timeout(1):
            await waiter


async def test_a_closing_kit_waits_for_the_end_of_a_cancelled_start(
        kit_for: KitMaker, monkeypatch: pytest.MonkeyPatch) -> None:
    from avatarkit.session import settling

    monkeypatch.setattr(settling, "ABANDONED_START_GRACE", 1.0)
    async with serving() as emu:
        async with kit_for(emu) as kit:
            emu.faults.slow_next(2, 0.35, route="create")  # token, then start: ~0.7 s
            emu.faults.slow_next(1, 0.8, route="end")  # the stop outlasts the kit's wait
            s = kit.session("amelia", consent=CONSENT, purpose="support")
            start = asyncio.create_task(s.start())
            await eventually(lambda: any(r.path == "/v1/sessions/token" for r in emu.requests))
            start.cancel()
            with pytest.raises(asyncio.CancelledError):
                await start
        # kit.aclose() let the stop finish instead of cancelling it half-way
        assert emu.open_sessions == 0
