"""The Simli adapter through AvatarKit/AvatarSession, against SimliEmulator over real sockets
(httpx for REST, a WebSocket for the session, aiortc for the P2P video)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from avatarkit import (
    AuthenticationError,
    AvatarKit,
    BillingError,
    CapabilityError,
    Closed,
    ConfigError,
    Interrupted,
    KitConfig,
    NotFoundError,
    ProviderConnectionError,
    ProviderTimeoutError,
    RateLimitError,
    SessionState,
    SpeechEnded,
    SpeechStarted,
)
from avatarkit.consent.authority import ConsentAuthority
from avatarkit.emulators._media import mouth_opening
from avatarkit.emulators.simli import (
    FRAME_BYTES,
    LIVEKIT_PATH,
    P2P_PATHS,
    SimliEmulator,
    SimliSessionRecord,
)
from avatarkit.providers import get_provider_class
from avatarkit.providers.simli import SimliProvider, SimliSettings

from ..conftest import CONSENT, consent_config, eventually, next_event, sdk_tasks, send_speech
from ..contract.harness import FAST_RETRY
from ..contract.harness_simli import AMELIA, API_KEY, BOB

KitMaker = Callable[..., AvatarKit]
#: a policy that closes the session when its vendor session dies (no failover to a new one)
STRICT = {"strict": {"failover": False, "objective": "config-order"}}


@contextlib.asynccontextmanager
async def serving(**options: Any) -> AsyncIterator[SimliEmulator]:
    """An emulator knowing amelia and bob; fails the test if a session is left open."""
    async with SimliEmulator(api_keys=[API_KEY], faces=[AMELIA, BOB], **options) as emulator:
        yield emulator
        assert emulator.open_sessions == 0, "the test left a Simli session open"


@pytest.fixture
async def emu() -> AsyncIterator[SimliEmulator]:
    async with serving() as emulator:
        yield emulator


@pytest.fixture
def kit_for(consent_authority: ConsentAuthority) -> KitMaker:
    """``kit_for(emulator, **settings)``: a kit with ``[providers.simli]`` pointing at the
    emulator (``second=True`` adds ``[providers.simli-b]`` of kind simli, ``session=`` sets
    ``[session]``, ``face=`` amelia's face id)."""

    def factory(emulator: SimliEmulator, *, second: bool = False,
                session: dict[str, Any] | None = None, face: str = AMELIA,
                **settings: Any) -> AvatarKit:
        provider: dict[str, Any] = {"api_key": API_KEY, "base_url": emulator.url,
                                    "price_per_minute": "0.20", "retry": FAST_RETRY}
        provider.update(settings)
        providers = {"simli": provider}
        amelia = {"simli": face}
        if second:
            providers["simli-b"] = {"kind": "simli", **provider}
            amelia["simli-b"] = face
        config = KitConfig(providers=providers, avatars={"amelia": amelia, "bob": {"simli": BOB}},
                           policies=STRICT, session=session or {}, consent=consent_config(),
                           metering={"ledger": ":memory:"})
        return AvatarKit(config, status_source=consent_authority.source,
                         consent_store=consent_authority.store)

    return factory


def record_of(emulator: SimliEmulator, vendor_session_id: str | None) -> SimliSessionRecord:
    assert vendor_session_id is not None
    return emulator.sessions[vendor_session_id]


def open_session(kit: AvatarKit, **options: Any) -> Any:
    return kit.session("amelia", consent=CONSENT, purpose="support", **options)


# -- a full P2P session ---------------------------------------------------------------------


async def test_full_p2p_session_frames_follow_the_audio(emu: SimliEmulator,
                                                        kit_for: KitMaker) -> None:
    before = asyncio.all_tasks()
    async with kit_for(emu) as kit, open_session(kit) as s:
        assert s.provider == "simli" and s.state is SessionState.LIVE
        assert s.join.kind == "webrtc" and s.join.url is None and s.join.token is None
        events = s.events()
        seen: list[tuple[float, float]] = []

        async def watch() -> None:
            async for frame in s.video():
                seen.append((time.monotonic(), mouth_opening(frame.data)))

        watcher = asyncio.create_task(watch())
        first_audio = time.monotonic()
        await send_speech(s, 1.0)  # 48 kHz in: 16 kHz mono on the wire
        await s.end_utterance()
        started = await next_event(events, "speech_started")
        started_at = time.monotonic()
        ended = await next_event(events, "speech_ended", within=3)
        ended_at = time.monotonic()
        await asyncio.sleep(0.6)
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        record = record_of(emu, s.vendor_session_id)
    assert isinstance(started, SpeechStarted) and isinstance(ended, SpeechEnded)
    assert started.utterance_id == ended.utterance_id and not ended.interrupted
    assert ended.duration == pytest.approx(1.0, abs=0.15)  # measured SPEAK..SILENT
    assert len([t for t, _ in seen if t - first_audio <= 3.0]) >= 25
    speaking = [o for t, o in seen if started_at + 0.25 <= t <= ended_at - 0.1]
    after = [o for t, o in seen if t >= ended_at + 0.3]
    assert speaking and sorted(speaking)[len(speaking) // 2] > 0.5  # the mouth moves...
    assert after and max(after) < 0.3  # ...and closes once the audio has played
    # the wire: PCM16 16 kHz mono in 6000-byte binary frames, the last one shorter
    assert record.frame_sizes == [FRAME_BYTES] * 5 + [2000]
    assert record.audio_seconds_received == pytest.approx(1.0, abs=0.002)
    assert record.protocol_errors == [] and record.skips == 0
    assert (record.path, record.transport, record.max_idle_time, record.handle_silence,
            record.max_session_length, record.api_version) == (
        P2P_PATHS[0], "p2p", 300, True, 1800, "v2")  # capped by the session's max duration
    # ended with DONE and a closed socket; billing stopped; nothing left running
    assert (record.status, record.end_reason, record.done_received) == ("ended", "DONE", True)
    assert emu.open_sessions == 0 and record.pc is None
    history = [e async for e in s.events()]
    assert isinstance(history[-1], Closed) and history[-1].vendor_ended
    assert sdk_tasks(before) == []


@pytest.mark.parametrize(("rate", "chunk_ms"), [(16_000, 1000), (16_000, 375), (24_000, 7)])
async def test_any_chunking_becomes_6000_byte_frames(emu: SimliEmulator, kit_for: KitMaker,
                                                     rate: int, chunk_ms: int) -> None:
    async with kit_for(emu, transport="livekit") as kit, open_session(kit) as s:
        for _ in range(2):  # two utterances: each one's last frame is its own
            await send_speech(s, 1.0, rate=rate, chunk_ms=chunk_ms)
            await s.end_utterance()
        record = record_of(emu, s.vendor_session_id)
    assert record.frame_sizes == ([FRAME_BYTES] * 5 + [2000]) * 2
    assert record.protocol_errors == []


async def test_the_asyncapi_p2p_path_works_too(emu: SimliEmulator, kit_for: KitMaker) -> None:
    kit = kit_for(emu, p2p_path="/compose/webrtc/peer_to_peer", enable_sfu=False)
    async with kit, open_session(kit) as s:
        frames = s.video()
        async with asyncio.timeout(3):
            first = await anext(frames)
        assert (first.width, first.height) == (256, 256)
        record = record_of(emu, s.vendor_session_id)
    assert record.path == "/compose/webrtc/peer_to_peer" and record.status == "ended"


async def test_back_to_back_utterances_are_each_reported(emu: SimliEmulator,
                                                         kit_for: KitMaker) -> None:
    async with kit_for(emu, transport="livekit") as kit, open_session(kit) as s:
        events = s.events()
        await send_speech(s, 0.3)
        await s.end_utterance()
        await send_speech(s, 0.3)
        await s.end_utterance()
        reported: list[tuple[str, str]] = []
        async with asyncio.timeout(3):
            async for event in events:
                if isinstance(event, SpeechStarted | SpeechEnded):
                    reported.append((event.type, event.utterance_id))
                if len(reported) == 4:
                    break
    first, second = reported[0][1], reported[2][1]
    assert first != second
    assert reported == [("speech_started", first), ("speech_ended", first),
                        ("speech_started", second), ("speech_ended", second)]


# -- interrupts ------------------------------------------------------------------------------


async def test_interrupt_is_acknowledged_by_silent(emu: SimliEmulator,
                                                   kit_for: KitMaker) -> None:
    async with kit_for(emu, transport="livekit") as kit, open_session(kit) as s:
        events = s.events()
        await send_speech(s, 2.0)
        await next_event(events, "speech_started")
        await asyncio.sleep(0.5)
        asked = time.monotonic()
        position = await s.interrupt()
        took = time.monotonic() - asked
        ended = await next_event(events, "speech_ended")  # the ack, reported first
        interrupted = await next_event(events, "interrupted")
        record = record_of(emu, s.vendor_session_id)
        assert isinstance(interrupted, Interrupted) and interrupted.acknowledged
        assert isinstance(ended, SpeechEnded) and ended.interrupted
        assert position == interrupted.playback_position
        assert 0.4 < position < 0.8
        assert took < 0.5  # the ack came; no timeout needed
        assert record.skips == 1 and record.useless_skips == 0 and not record.speaking
        # speech after the interrupt is reported again
        await send_speech(s, 0.2)
        await s.end_utterance()
        assert isinstance(await next_event(events, "speech_ended"), SpeechEnded)
    # ten 6000-byte frames of the first 2 s went out; the 0.125 s held back was dropped
    assert record.audio_seconds_received == pytest.approx(1.875 + 0.2, abs=0.002)


async def test_an_interrupt_right_after_the_first_audio_is_acknowledged(
        emu: SimliEmulator, kit_for: KitMaker) -> None:
    # Simli's SPEAK for the first frame is still on its way when the SKIP leaves: the SILENT
    # after it is the acknowledgement, not the end of a new speech.
    async with kit_for(emu, transport="livekit") as kit, open_session(kit) as s:
        events = s.events()
        await send_speech(s, 0.3)
        await s.interrupt()
        interrupted = await next_event(events, "interrupted")
        assert isinstance(interrupted, Interrupted) and interrupted.acknowledged
        await send_speech(s, 0.2)
        await s.end_utterance()
        started = await next_event(events, "speech_started")
        ended = await next_event(events, "speech_ended")
        assert isinstance(ended, SpeechEnded) and not ended.interrupted
        assert isinstance(started, SpeechStarted) and started.utterance_id == ended.utterance_id


async def test_a_mute_vendor_lets_the_interrupt_time_out(emu: SimliEmulator,
                                                         kit_for: KitMaker) -> None:
    emu.faults.mute_interrupts = True
    kit = kit_for(emu, transport="livekit", session={"interrupt_ack_timeout": 0.3})
    async with kit, open_session(kit) as s:
        events = s.events()
        await send_speech(s, 1.0)
        await next_event(events, "speech_started")
        asked = time.monotonic()
        await s.interrupt()
        assert time.monotonic() - asked == pytest.approx(0.3, abs=0.15)
        interrupted = await next_event(events, "interrupted")
        assert isinstance(interrupted, Interrupted) and not interrupted.acknowledged
        assert record_of(emu, s.vendor_session_id).skips == 1
        # the session carries on: new speech starts and ends
        await send_speech(s, 0.2)
        await s.end_utterance()
        assert isinstance(await next_event(events, "speech_ended"), SpeechEnded)


# -- the LiveKit channel ---------------------------------------------------------------------


async def test_livekit_transport_gives_a_livekit_join(emu: SimliEmulator,
                                                      kit_for: KitMaker) -> None:
    async with kit_for(emu, transport="livekit") as kit, open_session(kit) as s:
        assert s.join.kind == "livekit" and s.join.url == emu.livekit_url
        record = record_of(emu, s.vendor_session_id)
        assert s.join.token is not None and record.livekit_token is not None
        assert s.join.token.get_secret_value() == record.livekit_token
        assert record.livekit_token not in repr(s.join)
        with pytest.raises(CapabilityError):
            s.video()
        profile = kit.providers["simli"].profile
        assert not profile.capabilities.frames_in_process
        assert profile.capabilities.join_kinds == frozenset({"livekit"})
    assert record.path == LIVEKIT_PATH and record.status == "ended"


# -- the vendor ends the session ---------------------------------------------------------------


async def test_idle_timeout_closes_the_session_without_failover(emu: SimliEmulator,
                                                                kit_for: KitMaker) -> None:
    kit = kit_for(emu, transport="livekit", max_idle_time_s=1, second=True)
    async with kit, open_session(kit) as s:
        events = s.events()
        closed = await next_event(events, "closed", within=3)
        assert isinstance(closed, Closed)
        assert "idle" in closed.reason and closed.vendor_ended
        assert s.state is SessionState.CLOSED and s.providers_used == [s.provider]
        (record,) = emu.sessions.values()  # no second session was started elsewhere
    assert (record.status, record.end_reason) == ("ended", "IDLE")
    assert "provider_switched" not in [event.type async for event in s.events()]


async def test_max_length_end_is_not_failed_over(emu: SimliEmulator, kit_for: KitMaker) -> None:
    kit = kit_for(emu, transport="livekit", second=True)
    async with kit, open_session(kit) as s:
        events = s.events()
        emu.end_session(str(s.vendor_session_id), "MAX")
        closed = await next_event(events, "closed")
        assert isinstance(closed, Closed) and "maxSessionLength" in closed.reason
    assert len(emu.sessions) == 1


async def test_websocket_drop_mid_utterance_is_a_typed_error(emu: SimliEmulator,
                                                             kit_for: KitMaker) -> None:
    emu.faults.drop_channel_after(0.5)
    kit = kit_for(emu, transport="livekit")
    async with kit, open_session(kit, policy="strict") as s:
        events = s.events()
        with pytest.raises(ProviderConnectionError):
            for _ in range(20):
                await send_speech(s, 0.2)  # the socket drops after 0.5 s of it
                await asyncio.sleep(0.05)
        closed = await next_event(events, "closed")
        assert isinstance(closed, Closed) and "dropped" in closed.reason
        record = record_of(emu, s.vendor_session_id)
    assert record.channel_dropped and record.status == "ended"
    assert emu.open_sessions == 0


async def test_error_while_live_is_typed(emu: SimliEmulator, kit_for: KitMaker) -> None:
    kit = kit_for(emu, transport="livekit")
    async with kit, open_session(kit, policy="strict") as s:
        events = s.events()
        emu.send_error(str(s.vendor_session_id), "INVALID_API_KEY")
        closed = await next_event(events, "closed")
        assert isinstance(closed, Closed) and "INVALID_API_KEY" in closed.reason
        with pytest.raises(AuthenticationError):
            await send_speech(s, 0.1)


# -- start failures ---------------------------------------------------------------------------


async def test_billing_error_at_start(emu: SimliEmulator, kit_for: KitMaker) -> None:
    emu.start_line = "ERROR: BILLING_ERROR"
    async with kit_for(emu) as kit:
        with pytest.raises(BillingError, match="BILLING_ERROR"):
            async with open_session(kit):
                pass
    (record,) = emu.sessions.values()
    assert record.status == "refused" and record.ledger_entry is None


@pytest.mark.parametrize(("line", "error"), [
    ("ERROR: INVALID_FACE_ID", NotFoundError),
    ("RATE LIMIT EXCEEDED", RateLimitError),
])
async def test_other_start_refusals(emu: SimliEmulator, kit_for: KitMaker, line: str,
                                    error: type[Exception]) -> None:
    emu.start_line = line
    async with kit_for(emu, transport="livekit") as kit:
        with pytest.raises(error) as raised:
            async with open_session(kit):
                pass
    assert line.split(":")[-1].strip() in str(raised.value)
    assert emu.open_sessions == 0


async def test_http_402_is_a_billing_error(emu: SimliEmulator, kit_for: KitMaker) -> None:
    emu.out_of_credits = True
    async with kit_for(emu) as kit:
        with pytest.raises(BillingError) as raised:
            async with open_session(kit):
                pass
    assert raised.value.status == 402 and not emu.sessions


async def test_unknown_face_is_not_found(emu: SimliEmulator, kit_for: KitMaker) -> None:
    async with kit_for(emu, face="face-nobody") as kit:
        with pytest.raises(NotFoundError, match="face-nobody") as raised:
            async with open_session(kit):
                pass
    assert raised.value.status == 400 and not emu.sessions
    # the ICE servers were fetched first, then one token request: nothing retried
    assert [(r.method, r.path, r.status) for r in emu.requests] == [
        ("GET", "/compose/ice", 200), ("POST", "/compose/token", 400)]


async def test_bad_key_is_an_authentication_error(emu: SimliEmulator,
                                                  kit_for: KitMaker) -> None:
    before = asyncio.all_tasks()
    async with kit_for(emu, api_key="not-the-key") as kit:
        with pytest.raises(AuthenticationError) as raised:
            async with open_session(kit):
                pass
    assert "not-the-key" not in str(raised.value)
    assert not emu.sessions and emu.open_sessions == 0
    assert sdk_tasks(before) == []


async def test_a_start_that_sees_no_start_in_time_closes_the_socket(
        kit_for: KitMaker) -> None:
    async with serving(start_delay=1.0) as emu, kit_for(emu, start_timeout_s=0.2) as kit:
        with pytest.raises(ProviderTimeoutError, match="START"):
            async with open_session(kit):
                pass
        await eventually(lambda: all(r.status == "refused" for r in emu.sessions.values()))
        (record,) = emu.sessions.values()
        assert record.ledger_entry is None and record.pc is None
        assert record.end_reason == "closed before START"


# -- every exit path ends the vendor session --------------------------------------------------


async def test_an_exception_inside_async_with_ends_the_session(emu: SimliEmulator,
                                                               kit_for: KitMaker) -> None:
    async with kit_for(emu) as kit:
        with pytest.raises(RuntimeError, match="app bug"):
            async with open_session(kit) as s:
                await send_speech(s, 0.3)
                raise RuntimeError("app bug")
    (record,) = emu.sessions.values()
    assert record.status == "ended" and record.pc is None
    assert emu.open_sessions == 0


@pytest.mark.parametrize("phase", ["token", "socket"])
async def test_cancelling_the_start_leaves_nothing_open(kit_for: KitMaker, phase: str) -> None:
    # cancelled while the token is minted, or with the socket open before START
    async with serving(start_delay=0.5 if phase == "socket" else 0.0) as emu, \
            kit_for(emu) as kit:
        if phase == "token":
            emu.faults.slow_next(1, 0.4, route="create")
        task = asyncio.create_task(open_session(kit).start())
        if phase == "token":
            await eventually(lambda: len(emu.requests) >= 2)
        else:
            await eventually(lambda: any(r.status == "connecting"
                                         for r in emu.sessions.values()))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # the abandoned start finishes in the background and ends what it made
        await eventually(lambda: bool(emu.sessions) and all(
            r.status in ("ended", "refused") for r in emu.sessions.values()), within=5)
        assert emu.open_sessions == 0
        assert all(r.pc is None for r in emu.sessions.values())


async def test_the_session_token_never_reaches_logs_or_errors(
        emu: SimliEmulator, kit_for: KitMaker, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, websockets' request lines included
    async with kit_for(emu, transport="livekit") as kit, open_session(kit) as s:
        await send_speech(s, 0.3)
        await s.interrupt()
        text = repr(s.join) + str(s.vendor_session_id)
    async with serving(token_ttl=0.000001) as expiring, kit_for(expiring) as kit:
        with pytest.raises(AuthenticationError) as refused:  # the token expired: 401
            async with open_session(kit):
                pass
        assert "Session token expired" in str(refused.value)
    tokens = [r.session_token for r in (*emu.sessions.values(), *expiring.sessions.values())]
    assert len(tokens) == 2
    logged = caplog.text + text + str(refused.value)
    assert "simli" in caplog.text  # the adapter did log...
    assert "/compose/webrtc/livekit" in caplog.text  # ...and so did the socket's handshake
    assert not any(token in logged for token in tokens)


# -- settings, probe, end by id ----------------------------------------------------------------


async def test_settings_and_profile(emu: SimliEmulator) -> None:
    assert get_provider_class("simli") is SimliProvider
    with pytest.raises(ValidationError, match="even"):
        SimliSettings(api_key="k", frame_bytes=5999)
    with pytest.raises(ValidationError):
        SimliSettings(api_key="k", p2p_path="/compose/webrtc")
    async with httpx.AsyncClient() as http:
        with pytest.raises(ConfigError, match="api_key"):
            SimliProvider(SimliSettings(), http=http)
        provider = SimliProvider(SimliSettings(api_key="k"), http=http)
        profile = provider.profile
        assert (profile.audio_format.sample_rate, profile.audio_format.channels) == (16000, 1)
        assert profile.capabilities.frames_in_process
        assert profile.capabilities.join_kinds == frozenset({"webrtc"})
        assert profile.regions is None and profile.price_per_minute is None
        with pytest.raises(CapabilityError):
            await provider.end_session("anything")
        # a failed start closed its socket: there is never a session left to find
        assert await provider.find_session(session_id="s", idempotency_key="k") is None


async def test_probe_is_an_unbilled_usage_call(emu: SimliEmulator) -> None:
    async with httpx.AsyncClient(trust_env=False) as http:
        good = SimliProvider(SimliSettings(api_key=API_KEY, base_url=emu.url), http=http)
        await good.probe()
        bad = SimliProvider(SimliSettings(api_key="nope", base_url=emu.url, retry=FAST_RETRY),
                            http=http)
        with pytest.raises(AuthenticationError):
            await bad.probe()
    assert [r.path for r in emu.requests] == ["/ratelimiter/sessions"] * 2
    assert not emu.sessions
