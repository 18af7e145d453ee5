"""The D-ID Agents streams adapter through AvatarKit/AvatarSession, against DIDEmulator over real
sockets (httpx for REST, aiortc WebRTC for the media and the data channel)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import pytest
from aiohttp import web

from avatarkit import (
    AuthenticationError,
    AvatarKit,
    BillingError,
    CapabilityError,
    Closed,
    ConfigError,
    ErrorCategory,
    Interrupted,
    InvalidRequestError,
    KitConfig,
    MediaFormatError,
    ProviderConnectionError,
    ServerError,
    SpeechEnded,
    SpeechStarted,
)
from avatarkit.consent.authority import ConsentAuthority
from avatarkit.disclosure.metadata import DisclosureMetadata
from avatarkit.emulators._media import mouth_opening
from avatarkit.emulators.did import DIDEmulator, DIDStream
from avatarkit.providers import (
    PlaybackFinished,
    PlaybackStarted,
    ProviderSession,
    SessionRequest,
)
from avatarkit.providers.did import DIDProvider, DIDSettings
from avatarkit.vendor_http import new_http_client

from ..conftest import CONSENT, consent_config, eventually, next_event, sdk_tasks, send_speech
from ..contract.harness import FAST_RETRY
from ..contract.harness_did import AMELIA, API_KEY, BOB

KitMaker = Callable[..., AvatarKit]
#: a policy that closes the session when its vendor session dies (no failover to a new one)
STRICT = {"strict": {"failover": False, "objective": "config-order"}}


@contextlib.asynccontextmanager
async def serving(emulator_class: type[DIDEmulator] = DIDEmulator,
                  **options: Any) -> AsyncIterator[DIDEmulator]:
    """An emulator knowing amelia's and bob's agents; fails the test if a stream is left
    open (billed)."""
    async with emulator_class(api_keys=[API_KEY], agents=[AMELIA, BOB], **options) as emulator:
        yield emulator
        assert emulator.open_sessions == 0, "the test left a D-ID stream open"


@pytest.fixture
async def emu() -> AsyncIterator[DIDEmulator]:
    async with serving() as emulator:
        yield emulator


@pytest.fixture
def kit_for(consent_authority: ConsentAuthority) -> KitMaker:
    """``kit_for(emulator, **settings)``: a kit with ``[providers.did]`` pointing at the
    emulator and ``[avatars.amelia] did = <agent id>`` (``session=`` sets ``[session]``)."""

    def factory(emulator: DIDEmulator, *, session: dict[str, Any] | None = None,
                **settings: Any) -> AvatarKit:
        provider: dict[str, Any] = {"api_key": API_KEY, "base_url": emulator.url,
                                    "price_per_minute": "0.25", "retry": FAST_RETRY,
                                    "connect_timeout_s": 5}
        provider.update(settings)
        config = KitConfig(providers={"did": provider},
                           avatars={"amelia": {"did": AMELIA}, "bob": {"did": BOB}},
                           policies=STRICT, session=session or {}, consent=consent_config(),
                           metering={"ledger": ":memory:"})
        return AvatarKit(config, status_source=consent_authority.source,
                         consent_store=consent_authority.store)

    return factory


def open_session(kit: AvatarKit) -> Any:
    return kit.session("amelia", consent=CONSENT, purpose="support", policy="strict")


def stream_of(emulator: DIDEmulator, vendor_session_id: str | None) -> DIDStream:
    assert vendor_session_id is not None
    return emulator.stream_for(vendor_session_id)


def calls(emulator: DIDEmulator) -> list[tuple[str, str, int | None]]:
    """(method, route, status) of every vendor call, with ids replaced by placeholders."""
    out = []
    for r in emulator.requests:
        parts = r.path.split("/")
        if len(parts) > 2 and parts[1] == "agents":
            parts[2] = "{agent}"
        if len(parts) > 4:
            parts[4] = "{stream}"
        out.append((r.method, "/".join(parts), r.status))
    return out


# -- a full session -------------------------------------------------------------------------------


async def test_full_session_frames_follow_the_audio_and_speech_is_reported(
        emu: DIDEmulator, kit_for: KitMaker) -> None:
    before = asyncio.all_tasks()
    async with kit_for(emu, max_clip_s=0.5) as kit, open_session(kit) as s:
        events = s.events()
        assert s.join.kind == "webrtc" and s.join.url is None and s.join.disclosure_notice
        assert s.vendor_session_id is not None and s.vendor_session_id.startswith(AMELIA + "/")
        frames = s.video()
        idle = [mouth_opening((await anext(frames)).data) for _ in range(3)]
        assert max(idle) < 0.3  # no speech yet: the mouth is closed
        first_audio = time.monotonic()
        await send_speech(s, 2.0)  # 48 kHz in: 16 kHz mono WAV clips of 0.5 s out
        await s.end_utterance()
        openings: list[float] = []
        async with asyncio.timeout(3.0):
            async for frame in frames:
                assert (frame.width, frame.height) == (256, 256)
                openings.append(mouth_opening(frame.data))
                if len(openings) >= 25:
                    break
        assert time.monotonic() - first_audio < 3.0
        # the audio reached the renderer: the mouth opened for it
        assert float(np.median(openings[-10:])) > 0.6
        started = await next_event(events, "speech_started")
        ended = await next_event(events, "speech_ended", within=4)
        assert isinstance(started, SpeechStarted) and isinstance(ended, SpeechEnded)
        assert started.utterance_id == ended.utterance_id and not ended.interrupted
        assert ended.duration == pytest.approx(2.0, abs=0.05)
        await send_speech(s, 0.3)  # a second utterance: its own events
        await s.end_utterance()
        second = await next_event(events, "speech_ended", within=3)
        assert isinstance(second, SpeechEnded) and second.utterance_id != ended.utterance_id
        # the mouth closes again once the speech is over
        async with asyncio.timeout(2.0):
            async for frame in frames:
                if mouth_opening(frame.data) < 0.3:
                    break
        stream = stream_of(emu, s.vendor_session_id)
        assert stream.clips[0].clip_id in json.dumps(stream.data_messages_sent)
    closed = [e async for e in s.events()][-1]
    assert isinstance(closed, Closed) and closed.vendor_ended and closed.error is None
    # audio went as 16 kHz mono WAV uploads, 0.5 s each (the rest last), spoken in order
    durations = [a.duration for a in emu.audios.values()]
    assert [(a.sample_rate, a.channels) for a in emu.audios.values()] == [(16_000, 1)] * 5
    assert durations[:3] == [0.5, 0.5, 0.5] and sum(durations) == pytest.approx(2.3, abs=0.01)
    assert [c.outcome for c in stream.clips] == ["done"] * 5
    assert [c.audio_id for c in stream.clips] == list(emu.audios)
    assert stream.ice_candidates and stream.end_of_candidates == 1
    assert stream.protocol_errors == [] and stream.end_reason == "deleted"
    assert (stream.fluent, stream.stream_warmup) == (False, False)
    assert calls(emu)[:4] == [
        ("POST", "/agents/{agent}/streams", 201),
        ("POST", "/agents/{agent}/streams/{stream}/sdp", 200),
        ("POST", "/agents/{agent}/streams/{stream}/ice", 200),
        ("POST", "/agents/{agent}/streams/{stream}/ice", 200)]
    assert calls(emu)[-1] == ("DELETE", "/agents/{agent}/streams/{stream}", 200)
    await asyncio.sleep(0)
    assert sdk_tasks(before) == []


async def test_profile_and_settings(emu: DIDEmulator, kit_for: KitMaker) -> None:
    async with kit_for(emu) as kit:
        profile = kit.providers["did"].profile
    caps = profile.capabilities
    assert (caps.audio_input, caps.text_input, caps.interrupt, caps.playback_events,
            caps.frames_in_process, caps.join_kinds) == (True, True, False, True, True,
                                                         frozenset({"webrtc"}))
    assert (profile.audio_format.sample_rate, profile.audio_format.channels) == (16_000, 1)
    async with kit_for(emu, fluent=True) as kit:
        assert kit.providers["did"].profile.capabilities.interrupt
    with pytest.raises(ConfigError, match="api_key"):
        kit_for(emu, api_key=None)
    with pytest.raises(ConfigError, match="session_timeout_s"):
        kit_for(emu, session_timeout_s=301)


async def test_create_options_reach_the_vendor_and_warmup_is_awaited(kit_for: KitMaker) -> None:
    async with serving(warmup_seconds=0.3) as emu, kit_for(
            emu, fluent=True, stream_warmup=True, session_timeout_s=120,
            compatibility_mode="on") as kit:
        began = time.monotonic()
        async with open_session(kit) as s:
            assert time.monotonic() - began >= 0.3  # start() waited for stream/ready
            stream = stream_of(emu, s.vendor_session_id)
            assert (stream.fluent, stream.stream_warmup, stream.session_timeout,
                    stream.compatibility_mode) == (True, True, 120.0, "on")
            assert stream.data_messages_sent[0] == "stream/ready"


# -- interrupts -----------------------------------------------------------------------------------


async def test_fluent_interrupt_is_acknowledged(emu: DIDEmulator, kit_for: KitMaker) -> None:
    async with kit_for(emu, fluent=True, max_clip_s=0.5) as kit, open_session(kit) as s:
        events = s.events()
        await send_speech(s, 3.0)
        await s.end_utterance()
        await next_event(events, "speech_started")
        await asyncio.sleep(0.4)
        began = time.monotonic()
        position = await s.interrupt()
        assert time.monotonic() - began < 0.5
        ended = await next_event(events, "speech_ended")  # the ack, reported first
        assert isinstance(ended, SpeechEnded) and ended.interrupted
        assert ended.duration == pytest.approx(0.4, abs=0.2)
        interrupted = await next_event(events, "interrupted")
        assert isinstance(interrupted, Interrupted) and interrupted.acknowledged
        assert interrupted.utterance_id == ended.utterance_id
        assert position == pytest.approx(0.4, abs=0.2)
        stream = stream_of(emu, s.vendor_session_id)
        (message,) = stream.data_messages_received
        sent = json.loads(message)
        assert sent["type"] == "stream/interrupt" and isinstance(sent["timestamp"], int)
        assert sent["videoId"] == stream.clips[0].clip_id  # the clip that was playing
        assert [c.outcome for c in stream.clips] == ["interrupted"] * len(stream.clips)
        assert stream.protocol_errors == []
        # the session keeps working, with events for the new utterance
        await send_speech(s, 0.4)
        await s.end_utterance()
        again = await next_event(events, "speech_started")
        assert isinstance(again, SpeechStarted) and again.utterance_id != ended.utterance_id
        after = await next_event(events, "speech_ended")
        assert isinstance(after, SpeechEnded) and not after.interrupted
        assert after.duration == pytest.approx(0.4, abs=0.05)


async def test_a_stream_interrupted_ack_is_understood_too(kit_for: KitMaker) -> None:
    async with serving(interrupt_ack="stream/interrupted") as emu, \
            kit_for(emu, fluent=True) as kit, open_session(kit) as s:
        events = s.events()
        await send_speech(s, 2.0)
        await s.end_utterance()
        await next_event(events, "speech_started")
        await s.interrupt()
        interrupted = await next_event(events, "interrupted")
        assert isinstance(interrupted, Interrupted) and interrupted.acknowledged


async def test_clips_d_id_keeps_after_an_interrupt_are_stopped_as_they_start(
        kit_for: KitMaker) -> None:
    async with serving(interrupt_clears_queue=False) as emu, \
            kit_for(emu, fluent=True, max_clip_s=0.3, interrupt_clears_queue=False) as kit, \
            open_session(kit) as s:
        events = s.events()
        await send_speech(s, 1.5)
        await s.end_utterance()  # five clips, all at D-ID
        await next_event(events, "speech_started")
        stream = stream_of(emu, s.vendor_session_id)
        await s.interrupt()
        interrupted = await next_event(events, "interrupted")
        assert isinstance(interrupted, Interrupted) and interrupted.acknowledged
        # D-ID plays the queued clips on: each is interrupted as soon as it starts
        await eventually(lambda: [c.outcome for c in stream.clips] == ["interrupted"] * 5)
        assert stream.interrupts == 5 and stream.protocol_errors == []
        await send_speech(s, 0.2)
        await s.end_utterance()
        started = await next_event(events, "speech_started")
        ended = await next_event(events, "speech_ended")
        assert isinstance(started, SpeechStarted) and isinstance(ended, SpeechEnded)
        assert started.utterance_id == ended.utterance_id != interrupted.utterance_id
        assert not ended.interrupted and stream.clips[-1].outcome == "done"


async def test_interrupting_audio_not_sent_yet_is_acknowledged_at_once(
        emu: DIDEmulator, kit_for: KitMaker) -> None:
    async with kit_for(emu, fluent=True) as kit, open_session(kit) as s:
        events = s.events()
        await send_speech(s, 0.5)  # below max_clip_s: still buffered here
        began = time.monotonic()
        await s.interrupt()
        assert time.monotonic() - began < 0.5
        interrupted = await next_event(events, "interrupted")
        assert isinstance(interrupted, Interrupted) and interrupted.acknowledged
        stream = stream_of(emu, s.vendor_session_id)
        assert stream.clips == [] and emu.audios == {}
        assert stream.data_messages_received == []


async def test_a_mute_vendor_makes_the_interrupt_time_out(emu: DIDEmulator,
                                                          kit_for: KitMaker) -> None:
    emu.faults.mute_interrupts = True
    async with kit_for(emu, fluent=True, session={"interrupt_ack_timeout": 0.4}) as kit, \
            open_session(kit) as s:
        events = s.events()
        await send_speech(s, 2.0)
        await s.end_utterance()
        await next_event(events, "speech_started")
        began = time.monotonic()
        await s.interrupt()
        assert 0.35 < time.monotonic() - began < 1.0
        interrupted = await next_event(events, "interrupted")
        assert isinstance(interrupted, Interrupted) and not interrupted.acknowledged
        stream = stream_of(emu, s.vendor_session_id)
        assert stream.clips[0].outcome == "interrupted"  # it stopped, it just did not say so
        # the next utterance's events are its own, not the lost ack's
        await send_speech(s, 0.3)
        await s.end_utterance()
        started = await next_event(events, "speech_started")
        ended = await next_event(events, "speech_ended")
        assert isinstance(started, SpeechStarted) and isinstance(ended, SpeechEnded)
        assert started.utterance_id == ended.utterance_id != interrupted.utterance_id
        assert not ended.interrupted


async def test_a_non_fluent_stream_cannot_be_interrupted(emu: DIDEmulator,
                                                         kit_for: KitMaker) -> None:
    async with kit_for(emu, max_clip_s=0.5) as kit, open_session(kit) as s:
        events = s.events()
        await send_speech(s, 1.2)  # two clips go at once; the rest stays buffered
        await next_event(events, "speech_started")
        stream = stream_of(emu, s.vendor_session_id)
        await eventually(lambda: len(stream.clips) == 2)
        began = time.monotonic()
        with pytest.raises(CapabilityError, match="cannot interrupt"):
            await s.interrupt()
        assert time.monotonic() - began < 0.1
        assert stream.data_messages_received == []  # nothing D-ID would ignore was sent
        # the refused interrupt changed nothing: the whole utterance plays
        await s.end_utterance()
        ended = await next_event(events, "speech_ended", within=4)
        assert isinstance(ended, SpeechEnded) and not ended.interrupted
        assert [c.outcome for c in stream.clips] == ["done", "done", "done"]


# -- errors ---------------------------------------------------------------------------------------


async def test_out_of_credits_is_a_billing_error_and_nothing_is_left_open(
        emu: DIDEmulator, kit_for: KitMaker) -> None:
    emu.out_of_credits = True
    async with kit_for(emu) as kit:
        s = open_session(kit)
        with pytest.raises(BillingError) as raised:
            await s.start()
        assert raised.value.status == 402 and raised.value.category is ErrorCategory.QUOTA
        assert not raised.value.retryable and "InsufficientCreditsError" in str(raised.value)
        (row,) = await kit.ledger.rows(session_id=s.session_id)
        assert row.state == "failed"
    assert emu.open_sessions == 0 and emu.streams == {}


async def test_bad_key_is_an_authentication_error(emu: DIDEmulator, kit_for: KitMaker) -> None:
    async with kit_for(emu, api_key="not-the-right-key") as kit:
        with pytest.raises(AuthenticationError) as raised:
            await open_session(kit).start()
    assert raised.value.status == 401 and "not-the-right-key" not in str(raised.value)
    assert emu.streams == {}


async def test_moderated_audio_is_a_permanent_invalid_request(emu: DIDEmulator,
                                                              kit_for: KitMaker) -> None:
    async with kit_for(emu) as kit, open_session(kit) as s:
        events = s.events()
        emu.flag_audio_next(1)
        await send_speech(s, 0.4)
        with pytest.raises(InvalidRequestError) as raised:
            await s.end_utterance()
        error = raised.value
        assert (error.status, error.retryable, error.category) == (
            451, False, ErrorCategory.INVALID_REQUEST)
        assert error.category.is_permanent and "AudioModerationError" in str(error)
        ended = await next_event(events, "speech_ended")  # the utterance is over, unspoken
        assert isinstance(ended, SpeechEnded) and ended.duration == 0.0
        # the session goes on
        await send_speech(s, 0.3)
        await s.end_utterance()
        await next_event(events, "speech_started")


async def test_rate_limited_calls_are_retried(emu: DIDEmulator, kit_for: KitMaker) -> None:
    emu.faults.rate_limit_next(1, retry_after=0, route="create")
    async with kit_for(emu) as kit, open_session(kit) as s:
        events = s.events()
        emu.faults.rate_limit_next(1, retry_after=0)  # the upload gets it
        await send_speech(s, 0.3)
        await s.end_utterance()
        await next_event(events, "speech_ended", within=3)
    uploads = [status for method, route, status in calls(emu) if route == "/audios"]
    creates = [status for method, route, status in calls(emu)
               if (method, route) == ("POST", "/agents/{agent}/streams")]
    assert uploads == [429, 201] and creates == [429, 201]


# -- every exit path deletes the stream ----------------------------------------------------------


async def test_an_exception_in_the_block_deletes_the_stream(emu: DIDEmulator,
                                                            kit_for: KitMaker) -> None:
    async with kit_for(emu) as kit:
        with pytest.raises(RuntimeError, match="app failure"):
            async with open_session(kit) as s:
                await send_speech(s, 0.2)
                assert emu.open_sessions == 1
                raise RuntimeError("app failure")
        assert emu.open_sessions == 0
        assert stream_of(emu, s.vendor_session_id).end_reason == "deleted"


async def test_cancelling_a_start_deletes_the_stream(kit_for: KitMaker) -> None:
    # the stream exists and start() waits for its warm-up when the caller gives up
    async with serving(warmup_seconds=1) as emu, kit_for(emu, stream_warmup=True) as kit:
        s = open_session(kit)
        start = asyncio.create_task(s.start())
        await eventually(lambda: any(st.ever_connected for st in emu.streams.values()))
        start.cancel()
        with pytest.raises(asyncio.CancelledError):
            await start
        await eventually(lambda: emu.open_sessions == 0, within=10)
        (stream,) = emu.streams.values()
        assert stream.end_reason == "deleted"


async def test_cancelling_the_adapter_start_itself_deletes_the_stream() -> None:
    request = SessionRequest(
        session_id="ses_1", avatar="amelia", avatar_id=AMELIA, idempotency_key="avk-ses_1-1",
        disclosure=DisclosureMetadata(generation_id="gen_1", provider="did", avatar="amelia"))
    async with serving(warmup_seconds=5) as emu, new_http_client() as http:
        provider = DIDProvider(DIDSettings(api_key=API_KEY, base_url=emu.url,
                                           stream_warmup=True), http=http)
        start = asyncio.create_task(provider.start(request))
        await eventually(lambda: any(st.ever_connected for st in emu.streams.values()))
        start.cancel()
        with pytest.raises(asyncio.CancelledError):
            await start
        assert emu.open_sessions == 0  # deleted before the cancellation came out


async def test_a_failure_after_the_create_deletes_the_stream(kit_for: KitMaker) -> None:
    class SdpFails(DIDEmulator):
        async def _handle_sdp(self, request: web.Request) -> web.Response:
            return self._did_error(500, "InternalServerError", "Stream Error")

    async with serving(SdpFails) as emu, kit_for(emu) as kit:
        s = open_session(kit)
        with pytest.raises(ServerError, match="Stream Error"):
            await s.start()
        (stream,) = emu.streams.values()
        assert stream.end_reason == "deleted" and emu.open_sessions == 0
        (row,) = await kit.ledger.rows(session_id=s.session_id)
        assert row.state == "failed"


async def test_a_connection_that_never_comes_up_is_deleted_and_retryable(
        kit_for: KitMaker) -> None:
    async with serving(warmup_seconds=5) as emu, \
            kit_for(emu, stream_warmup=True, connect_timeout_s=0.3) as kit:
        s = open_session(kit)
        with pytest.raises(ServerError, match="stream/ready did not come") as raised:
            await s.start()
        assert raised.value.retryable  # another provider may do better
        assert emu.open_sessions == 0
        (row,) = await kit.ledger.rows(session_id=s.session_id)
        assert row.state == "failed"  # not an uncertain create: nothing to look for


async def test_a_connection_drop_mid_utterance_is_a_typed_error_and_deletes_the_stream(
        emu: DIDEmulator, kit_for: KitMaker) -> None:
    emu.faults.drop_channel_after(0.3)
    async with kit_for(emu, max_clip_s=0.5) as kit, open_session(kit) as s:
        events = s.events()
        await send_speech(s, 1.2)
        await next_event(events, "speech_started")
        closed = await next_event(events, "closed", within=3)
        assert isinstance(closed, Closed) and closed.reason.startswith("vendor:")
        assert closed.error is not None and "closed the WebRTC connection" in closed.error
        assert closed.vendor_ended  # our DELETE ended the stream, still billed after the drop
        with pytest.raises(ProviderConnectionError, match="closed the WebRTC connection"):
            await send_speech(s, 0.1)
    stream = stream_of(emu, s.vendor_session_id)
    assert stream.channel_dropped and stream.end_reason == "deleted"  # ended by us, not a timeout


async def test_a_vendor_idle_timeout_closes_the_session(kit_for: KitMaker) -> None:
    async with serving() as emu, kit_for(emu, session_timeout_s=1) as kit, \
            open_session(kit) as s:
        events = s.events()
        closed = await next_event(events, "closed", within=3)
        assert isinstance(closed, Closed) and closed.vendor_ended
        stream = stream_of(emu, s.vendor_session_id)
        assert stream.end_reason == "idle_timeout"  # the DELETE found it gone: fine


async def test_the_session_cap_ends_the_stream(emu: DIDEmulator, kit_for: KitMaker) -> None:
    async with kit_for(emu) as kit:
        s = kit.session("amelia", consent=CONSENT, purpose="support", policy="strict",
                        max_duration_s=0.5)
        async with s:
            events = s.events()
            closed = await next_event(events, "closed", within=3)
            assert isinstance(closed, Closed) and "max_duration_s" in closed.reason
        assert stream_of(emu, s.vendor_session_id).end_reason == "deleted"


# -- the adapter alone: text, probe, ending by id ------------------------------------------------


def _request(number: int = 1) -> SessionRequest:
    return SessionRequest(
        session_id=f"ses_{number}", avatar="amelia", avatar_id=AMELIA,
        idempotency_key=f"avk-ses_{number}-1",
        disclosure=DisclosureMetadata(generation_id="gen_1", provider="did", avatar="amelia"))


async def _signals(session: ProviderSession, into: list[Any]) -> None:
    async for signal in session.signals():
        into.append(signal)


async def test_text_is_spoken_with_the_agents_voice(emu: DIDEmulator) -> None:
    emu.banned_words = {"forbidden"}
    async with new_http_client() as http:
        provider = DIDProvider(DIDSettings(api_key=API_KEY, base_url=emu.url,
                                           retry=FAST_RETRY), http=http)
        session = await provider.start(_request())
        signals: list[Any] = []
        reader = asyncio.create_task(_signals(session, signals))
        try:
            await session.say("Hello there!", utterance_id="u-text")
            await eventually(lambda: any(isinstance(x, PlaybackFinished) for x in signals))
            started, finished = signals
            assert started == PlaybackStarted(utterance_id="u-text")
            assert isinstance(finished, PlaybackFinished) and finished.utterance_id == "u-text"
            assert finished.duration == pytest.approx(12 * 0.06, abs=0.01)
            clip = stream_of(emu, session.vendor_session_id).clips[0]
            assert (clip.kind, clip.text) == ("text", "Hello there!")
            with pytest.raises(InvalidRequestError) as raised:
                await session.say("a forbidden word", utterance_id="u-bad")
            assert raised.value.status == 451 and not raised.value.retryable
            with pytest.raises(MediaFormatError, match="3 to 40000"):
                await session.say("hi", utterance_id="u-short")
        finally:
            await session.end()
            await reader
    assert emu.open_sessions == 0


async def test_probe_reads_the_credits(emu: DIDEmulator) -> None:
    async with new_http_client() as http:
        provider = DIDProvider(DIDSettings(api_key=API_KEY, base_url=emu.url), http=http)
        await provider.probe()
        bad = DIDProvider(DIDSettings(api_key="wrong", base_url=emu.url), http=http)
        with pytest.raises(AuthenticationError):
            await bad.probe()
    assert [(r.method, r.path) for r in emu.requests] == [("GET", "/credits")] * 2
    assert emu.billed_seconds == 0


async def test_end_session_by_id_needs_a_vendor_that_deletes_without_session_id() -> None:
    async with new_http_client() as http:
        for require_session_id in (False, True):
            async with serving(require_session_id=require_session_id) as emu:
                provider = DIDProvider(DIDSettings(api_key=API_KEY, base_url=emu.url,
                                                   retry=FAST_RETRY),
                                       http=http)
                session = await provider.start(_request())
                vendor_id = session.vendor_session_id
                if require_session_id:
                    with pytest.raises(CapabilityError, match="session_id"):
                        await provider.end_session(vendor_id)
                    assert emu.open_sessions == 1
                else:
                    await provider.end_session(vendor_id)
                    assert emu.open_sessions == 0
                    await provider.end_session(vendor_id)  # already over: not an error
                await session.end()  # deletes, or finds it gone (404): both end it
                assert session.ended
                with pytest.raises(InvalidRequestError, match="not a D-ID vendor session id"):
                    await provider.end_session("no-slash")
