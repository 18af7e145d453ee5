"""Tests of the D-ID Agents streams emulator alone, over real sockets: httpx for REST and an
aiortc peer (the SDK's receive-only ``WebRTCReceiver``) for the media and the data channel."""

from __future__ import annotations

import asyncio
import io
import json
import time
import wave
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import pytest

from avatarkit.emulators import EMULATORS
from avatarkit.emulators._media import mouth_opening
from avatarkit.emulators.did import DATA_CHANNEL_LABEL, DIDEmulator
from avatarkit.errors import ProviderConnectionError
from avatarkit.transport.receiver import WebRTCReceiver

API_KEY = "did-test-key"
AGENT = "agt_amelia"
AUTH = {"Authorization": f"Basic {API_KEY}"}


@pytest.fixture
async def emu() -> AsyncIterator[DIDEmulator]:
    async with DIDEmulator(api_keys=[API_KEY], agents=[AGENT], max_concurrent=3) as emulator:
        yield emulator


@pytest.fixture
async def client(emu: DIDEmulator) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=emu.url, headers=AUTH, timeout=5.0,
                                 trust_env=False) as http:
        yield http


def tone_wav(seconds: float, *, rate: int = 16_000, channels: int = 1, amplitude: float = 0.5,
             width: int = 2) -> bytes:
    t = np.arange(round(seconds * rate)) / rate
    mono = amplitude * np.sin(2 * np.pi * 200 * t)
    if width == 1:
        frames = np.repeat(np.rint(mono * 127 + 128).astype(np.uint8), channels).tobytes()
    else:
        frames = np.repeat(np.rint(mono * 32767).astype("<i2"), channels).tobytes()
    out = io.BytesIO()
    with wave.open(out, "wb") as wav:
        wav.setnchannels(channels)
        wav.setsampwidth(width)
        wav.setframerate(rate)
        wav.writeframes(frames)
    return out.getvalue()


async def upload(client: httpx.AsyncClient, data: bytes, *, name: str = "audio",
                 content_type: str = "audio/wav") -> httpx.Response:
    return await client.post("/audios", files={name: ("clip.wav", data, content_type)})


def error_of(response: httpx.Response) -> tuple[int, str]:
    body = response.json()
    assert set(body) == {"kind", "description"} and body["description"], body
    return response.status_code, body["kind"]


@dataclass
class Stream:
    """One stream from the client's side: its ids, its peer and what arrived on it."""

    stream_id: str
    session_id: str
    offer: str
    receiver: WebRTCReceiver
    messages: list[tuple[float, str]] = field(default_factory=list)
    openings: list[tuple[float, float]] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    frame_size: tuple[int, int] | None = None
    reader: asyncio.Task[None] | None = None

    @property
    def path(self) -> str:
        return f"/agents/{AGENT}/streams/{self.stream_id}"

    def body(self, **fields: Any) -> dict[str, Any]:
        return {"session_id": self.session_id, **fields}

    async def message(self, prefix: str, *, within: float = 3.0, after: int = 0) -> str:
        """The first data-channel message from index ``after`` on that starts with ``prefix``."""
        deadline = time.monotonic() + within
        while True:
            for _, text in self.messages[after:]:
                if text.startswith(prefix):
                    return text
            assert time.monotonic() < deadline, f"no {prefix!r} message; got {self.messages}"
            await asyncio.sleep(0.01)

    def when(self, prefix: str) -> float:
        return next(at for at, text in self.messages if text.startswith(prefix))

    def opening_between(self, start: float, end: float) -> list[float]:
        return [opening for at, opening in self.openings if start <= at <= end]

    async def close(self) -> None:
        await self.receiver.aclose()
        if self.reader is not None:
            await self.reader


async def create(client: httpx.AsyncClient, **body: Any) -> httpx.Response:
    return await client.post(f"/agents/{AGENT}/streams", json=body)


async def open_stream(client: httpx.AsyncClient, *, answer: bool = True,
                      trickle: bool = True, **body: Any) -> Stream:
    response = await create(client, **body)
    assert response.status_code == 201, response.text
    data = response.json()
    messages: list[tuple[float, str]] = []
    lost: list[str] = []
    receiver = WebRTCReceiver(
        provider="did-test", on_message=lambda text: messages.append((time.monotonic(), text)),
        on_closed=lost.append)
    stream = Stream(data["id"], data["session_id"], data["jsep"]["sdp"], receiver,
                    messages=messages, lost=lost)
    if not answer:
        return stream
    sdp = await stream.receiver.answer(stream.offer)
    response = await client.post(stream.path + "/sdp",
                                 json=stream.body(answer={"type": "answer", "sdp": sdp}))
    assert response.status_code == 200 and response.json() == {"status": "success"}
    if trickle:
        for candidate in stream.receiver.local_candidates():
            response = await client.post(stream.path + "/ice", json=stream.body(
                candidate=candidate.candidate, sdpMid=candidate.sdp_mid,
                sdpMLineIndex=candidate.sdp_mline_index))
            assert response.status_code == 200, response.text
        assert (await client.post(stream.path + "/ice", json=stream.body())).status_code == 200
    await asyncio.wait_for(stream.receiver.connected.wait(), 3)
    await asyncio.wait_for(stream.receiver.data_channel_open.wait(), 3)

    async def read_frames() -> None:
        async for frame in stream.receiver.frames():
            stream.frame_size = (frame.width, frame.height)
            stream.openings.append((time.monotonic(), mouth_opening(frame.data)))

    stream.reader = asyncio.create_task(read_frames())
    return stream


async def speak_text(client: httpx.AsyncClient, stream: Stream, text: str) -> httpx.Response:
    return await client.post(stream.path, json=stream.body(script={"type": "text",
                                                                   "input": text}))


async def speak_audio(client: httpx.AsyncClient, stream: Stream, url: str) -> httpx.Response:
    return await client.post(stream.path, json=stream.body(script={"type": "audio",
                                                                   "audio_url": url}))


async def delete(client: httpx.AsyncClient, stream: Stream) -> httpx.Response:
    return await client.request("DELETE", stream.path, json=stream.body())


def payload(message: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(message.partition(":")[2])
    return data


async def eventually(check: Any, within: float = 3.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# -- auth and errors -----------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Basic wrong"},
                                     {"Authorization": API_KEY}])
async def test_every_route_needs_the_api_key(emu: DIDEmulator,
                                             headers: dict[str, str]) -> None:
    async with httpx.AsyncClient(base_url=emu.url, trust_env=False) as http:
        for method, path in [("POST", f"/agents/{AGENT}/streams"), ("GET", "/credits"),
                             ("POST", "/audios"), ("DELETE", f"/agents/{AGENT}/streams/x")]:
            response = await http.request(method, path, headers=headers)
            assert error_of(response) == (401, "AuthorizationError")
    assert emu.open_sessions == 0


async def test_bearer_is_accepted_too(emu: DIDEmulator) -> None:
    async with httpx.AsyncClient(base_url=emu.url, trust_env=False) as http:
        response = await http.get("/credits", headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 200
    assert response.json()["remaining"] == response.json()["total"] == 100.0


async def test_create_refusals(emu: DIDEmulator, client: httpx.AsyncClient) -> None:
    unknown = await client.post("/agents/agt_nobody/streams", json={})
    assert error_of(unknown) == (404, "NotFoundError")
    for body in ({"session_timeout": 301}, {"session_timeout": 0}, {"fluent": "yes"},
                 {"compatibility_mode": "maybe"}):
        assert error_of(await create(client, **body)) == (400, "BadRequestError"), body
    not_json = await client.post(f"/agents/{AGENT}/streams", content=b"{nope")
    assert error_of(not_json) == (400, "BadRequestError")
    emu.out_of_credits = True
    assert error_of(await create(client)) == (402, "InsufficientCreditsError")
    assert (await client.get("/credits")).json()["remaining"] == 0
    assert emu.open_sessions == 0 and emu.streams == {}


async def test_concurrency_limit_is_402(emu: DIDEmulator, client: httpx.AsyncClient) -> None:
    for _ in range(3):
        assert (await create(client)).status_code == 201
    status, kind = error_of(await create(client))
    assert (status, kind) == (402, "InsufficientCreditsError")
    assert emu.open_sessions == 3
    await emu.reset()
    assert emu.open_sessions == 0


async def test_injected_faults_use_the_error_shape(emu: DIDEmulator,
                                                   client: httpx.AsyncClient) -> None:
    emu.faults.rate_limit_next(1, retry_after=2)
    limited = await create(client)
    assert error_of(limited) == (429, "TooManyRequestsError")
    assert limited.headers["Retry-After"] == "2"
    emu.faults.fail_next_creates(1, status=500)
    assert error_of(await create(client)) == (500, "InternalServerError")
    assert emu.open_sessions == 0


# -- create, answer, ICE, media ------------------------------------------------------------------


async def test_create_offers_video_and_a_data_channel_and_starts_billing(
        emu: DIDEmulator, client: httpx.AsyncClient) -> None:
    response = await create(client, fluent=True, session_timeout=120)
    assert response.status_code == 201
    data = response.json()
    assert set(data) == {"id", "session_id", "jsep", "ice_servers"}
    assert data["jsep"]["type"] == "offer" and data["ice_servers"] == []
    sdp = data["jsep"]["sdp"]
    assert "m=video" in sdp and "webrtc-datachannel" in sdp and "m=audio" not in sdp
    assert data["session_id"].startswith("AWSALB=")
    stream = emu.streams[data["id"]]
    assert (stream.fluent, stream.session_timeout, stream.agent_id) == (True, 120.0, AGENT)
    assert emu.open_sessions == 1 and stream.ledger_entry is not None
    state = (await client.get("/_emulator/state")).json()
    assert data["session_id"] not in json.dumps(state)  # the cookie stays out of the state
    path = f"/agents/{AGENT}/streams/{data['id']}"
    deleted = await client.request("DELETE", path, json={"session_id": data["session_id"]})
    assert deleted.json() == {"status": "deleted"}
    assert emu.open_sessions == 0 and stream.end_reason == "deleted" and stream.deleted
    again = await client.request("DELETE", path, json={"session_id": data["session_id"]})
    assert error_of(again) == (404, "NotFoundError")


async def test_answer_connects_frames_flow_and_trickled_ice_is_counted(
        emu: DIDEmulator, client: httpx.AsyncClient) -> None:
    stream = await open_stream(client)
    record = emu.streams[stream.stream_id]
    try:
        assert record.connected and record.answered and record.ever_connected
        assert len(record.ice_candidates) == len(stream.receiver.local_candidates()) > 0
        assert record.ice_candidates[0]["candidate"].startswith("candidate:")
        assert record.end_of_candidates == 1
        await eventually(lambda: len(stream.openings) >= 10, within=2)
        assert stream.frame_size == (256, 256)
        # nothing spoken: the mouth stays closed
        assert max(opening for _, opening in stream.openings) < 0.3
    finally:
        assert (await delete(client, stream)).status_code == 200
        await stream.close()
    assert emu.open_sessions == 0


async def test_session_id_must_be_echoed(emu: DIDEmulator, client: httpx.AsyncClient) -> None:
    stream = await open_stream(client, answer=False)
    try:
        sdp = await stream.receiver.answer(stream.offer)
        answer = {"type": "answer", "sdp": sdp}
        missing = await client.post(stream.path + "/sdp", json={"answer": answer})
        assert error_of(missing) == (400, "SessionError")
        wrong = await client.post(stream.path + "/sdp",
                                  json={"session_id": "AWSALB=other", "answer": answer})
        assert error_of(wrong) == (400, "SessionError")
        bad = await client.post(stream.path + "/sdp", json=stream.body(answer={"sdp": sdp}))
        assert error_of(bad) == (400, "BadRequestError")
        ok = await client.post(stream.path + "/sdp", json=stream.body(answer=answer))
        assert ok.status_code == 200
        twice = await client.post(stream.path + "/sdp", json=stream.body(answer=answer))
        assert error_of(twice) == (400, "SessionError")
        no_cookie = await client.request("DELETE", stream.path, json={})
        assert error_of(no_cookie) == (400, "SessionError")
        other_agent = await client.request("DELETE", f"/agents/agt_x/streams/{stream.stream_id}",
                                           json=stream.body())
        assert error_of(other_agent) == (404, "NotFoundError")
        assert emu.open_sessions == 1
    finally:
        await delete(client, stream)
        await stream.close()


async def test_delete_without_session_id_when_not_required() -> None:
    async with DIDEmulator(api_keys=[API_KEY], agents=[AGENT], require_session_id=False) as emu, \
            httpx.AsyncClient(base_url=emu.url, headers=AUTH, trust_env=False) as client:
        data = (await create(client)).json()
        path = f"/agents/{AGENT}/streams/{data['id']}"
        assert error_of(await client.request("DELETE", path, json={"session_id": "x"})) == (
            400, "SessionError")  # a wrong one is never accepted
        assert (await client.request("DELETE", path)).json() == {"status": "deleted"}
        assert emu.open_sessions == 0


async def test_speak_before_the_connection_is_409(emu: DIDEmulator,
                                                  client: httpx.AsyncClient) -> None:
    stream = await open_stream(client, answer=False)
    try:
        assert error_of(await speak_text(client, stream, "hello there")) == (409, "NotReadyError")
        with pytest.raises(ProviderConnectionError, match="data channel is not open"):
            stream.receiver.send_data("too early")
    finally:
        await delete(client, stream)
        await stream.close()


@pytest.mark.parametrize(("mode", "present", "absent"),
                         [("on", "VP8/90000", "H264/90000"), ("off", "H264/90000", "VP8/90000")])
async def test_compatibility_mode_selects_the_codec(
        emu: DIDEmulator, client: httpx.AsyncClient, mode: str, present: str,
        absent: str) -> None:
    stream = await open_stream(client, compatibility_mode=mode)
    try:
        assert present in stream.offer and absent not in stream.offer
        await eventually(lambda: len(stream.openings) >= 3)
    finally:
        await delete(client, stream)
        await stream.close()


async def test_warmup_sends_stream_ready(emu: DIDEmulator, client: httpx.AsyncClient) -> None:
    stream = await open_stream(client, stream_warmup=True)
    try:
        assert await stream.message("stream/ready") == "stream/ready"
        assert stream.receiver._channel.label == DATA_CHANNEL_LABEL
    finally:
        await delete(client, stream)
        await stream.close()


# -- uploads and speaking ------------------------------------------------------------------------


async def test_upload_records_the_wav_and_issues_an_s3_url(emu: DIDEmulator,
                                                           client: httpx.AsyncClient) -> None:
    response = await upload(client, tone_wav(0.5, rate=24_000, channels=2))
    assert response.status_code == 201
    body = response.json()
    assert body["url"] == f"s3://did-emulator/{body['id']}.wav"
    assert body["duration"] == 0.5 and body["moderation_metadata"] == {}
    audio = emu.audios[body["id"]]
    assert (audio.sample_rate, audio.channels, audio.content_type) == (24_000, 2, "audio/wav")
    assert len(audio.pcm) == 2 * 8000  # converted for the renderer: 16 kHz mono


async def test_upload_refusals(client: httpx.AsyncClient, emu: DIDEmulator) -> None:
    as_json = await client.post("/audios", json={"audio": "x"})
    assert error_of(as_json) == (400, "BadRequestError")
    assert error_of(await upload(client, tone_wav(0.1), name="file")) == (400, "BadRequestError")
    assert error_of(await upload(client, b"ID3\x03 not a wav")) == (415,
                                                                    "UnsupportedMimeTypeError")
    assert error_of(await upload(client, tone_wav(0.1, width=1))) == (415,
                                                                      "UnsupportedMimeTypeError")
    assert error_of(await upload(client, tone_wav(0.0))) == (400, "InvalidAudioDurationError")
    emu.max_audio_bytes = 1000
    assert error_of(await upload(client, tone_wav(0.5))) == (400, "InvalidFileSizeError")
    emu.max_audio_bytes = 6 * 1024 * 1024
    emu.flag_audio_next(1)
    assert error_of(await upload(client, tone_wav(0.1))) == (451, "AudioModerationError")
    assert (await upload(client, tone_wav(0.1))).status_code == 201
    assert len(emu.audios) == 1


async def test_speak_refusals(emu: DIDEmulator, client: httpx.AsyncClient) -> None:
    emu.banned_words = {"forbidden"}
    stream = await open_stream(client)
    try:
        for script in ({"type": "text", "input": "hi"}, {"type": "text", "input": "x" * 40001},
                       {"type": "text"}, {"type": "video"},
                       {"type": "audio", "audio_url": "https://example.com/a.wav"},
                       {"type": "audio", "audio_url": "s3://bucket/a.ogg"}):
            response = await client.post(stream.path, json=stream.body(script=script))
            assert error_of(response) == (400, "BadRequestError"), script
        assert error_of(await client.post(stream.path, json=stream.body())) == (400,
                                                                               "BadRequestError")
        moderated = await speak_text(client, stream, "say the FORBIDDEN word")
        assert error_of(moderated) == (451, "TextModerationError")
        gone = await client.post(f"/agents/{AGENT}/streams/strm_nope",
                                 json=stream.body(script={"type": "text", "input": "hello"}))
        assert error_of(gone) == (404, "NotFoundError")
        assert emu.streams[stream.stream_id].clips == []
    finally:
        await delete(client, stream)
        await stream.close()


async def test_audio_clip_plays_in_real_time_and_moves_the_mouth(
        emu: DIDEmulator, client: httpx.AsyncClient) -> None:
    url = (await upload(client, tone_wav(1.0, rate=24_000, amplitude=0.6))).json()["url"]
    stream = await open_stream(client)
    try:
        await eventually(lambda: len(stream.openings) >= 5)
        response = await speak_audio(client, stream, url)
        assert response.json() == {"status": "started", "duration": 1.0,
                                   "session_id": stream.session_id}
        started = await stream.message("stream/started")
        done = await stream.message("stream/done", within=3)
        video_id = payload(started)["metadata"]["videoId"]
        assert payload(done)["metadata"]["videoId"] == video_id
        assert payload(done)["played"] == pytest.approx(1.0, abs=0.05)
        elapsed = stream.when("stream/done") - stream.when("stream/started")
        assert elapsed == pytest.approx(1.0, abs=0.15)
        begin, end = stream.when("stream/started"), stream.when("stream/done")
        speaking = stream.opening_between(begin + 0.2, end - 0.2)
        assert speaking and min(speaking) > 0.6
        await asyncio.sleep(0.4)
        assert max(stream.opening_between(end + 0.25, end + 0.4)) < 0.3
        clip = emu.streams[stream.stream_id].clips[0]
        assert (clip.clip_id, clip.kind, clip.outcome) == (video_id, "audio", "done")
        record = emu.streams[stream.stream_id]
        assert record.audio_seconds_received == 1.0
        assert record.pattern.audio_seconds_rendered == pytest.approx(1.0, abs=0.05)
    finally:
        await delete(client, stream)
        await stream.close()


async def test_text_clips_queue_and_play_in_order(emu: DIDEmulator,
                                                  client: httpx.AsyncClient) -> None:
    stream = await open_stream(client)
    try:
        first = await speak_text(client, stream, "four")  # 4 characters: 0.24 s
        second = await speak_text(client, stream, "five!")
        assert first.json()["duration"] == pytest.approx(0.24)
        assert second.json()["duration"] == pytest.approx(0.3)
        await eventually(lambda: sum(t.startswith("stream/done") for _, t in stream.messages)
                         == 2)
        kinds = [text.partition(":")[0] for _, text in stream.messages]
        assert kinds == ["stream/started", "stream/done", "stream/started", "stream/done"]
        ids = [payload(text)["metadata"]["videoId"] for _, text in stream.messages]
        clips = emu.streams[stream.stream_id].clips
        assert ids == [clips[0].clip_id] * 2 + [clips[1].clip_id] * 2
        assert [clip.text for clip in clips] == ["four", "five!"]
    finally:
        await delete(client, stream)
        await stream.close()


# -- interrupts ----------------------------------------------------------------------------------


def interrupt_message(video_id: str | None) -> str:
    return json.dumps({"type": "stream/interrupt", "videoId": video_id,
                       "timestamp": int(time.time() * 1000)})


async def test_fluent_interrupt_stops_drops_the_queue_and_acknowledges(
        emu: DIDEmulator, client: httpx.AsyncClient) -> None:
    stream = await open_stream(client, fluent=True)
    try:
        await speak_text(client, stream, "a long sentence that takes a while to say")
        await speak_text(client, stream, "and a queued one")
        video_id = payload(await stream.message("stream/started"))["metadata"]["videoId"]
        await asyncio.sleep(0.5)
        stream.receiver.send_data(interrupt_message(video_id))
        ack = payload(await stream.message("stream/done"))
        assert ack["interrupted"] is True and ack["metadata"]["videoId"] == video_id
        assert ack["played"] == pytest.approx(0.5, abs=0.15)
        record = emu.streams[stream.stream_id]
        assert [clip.outcome for clip in record.clips] == ["interrupted", "interrupted"]
        assert record.interrupts == 1 and record.protocol_errors == []
        stopped = stream.when("stream/done")
        await asyncio.sleep(0.4)
        assert max(stream.opening_between(stopped + 0.2, stopped + 0.4)) < 0.3
        assert [t.partition(":")[0] for _, t in stream.messages] == ["stream/started",
                                                                      "stream/done"]
    finally:
        await delete(client, stream)
        await stream.close()


async def test_interrupt_ack_event_is_configurable_and_can_be_muted() -> None:
    async with DIDEmulator(api_keys=[API_KEY], agents=[AGENT],
                           interrupt_ack="stream/interrupted") as emu, \
            httpx.AsyncClient(base_url=emu.url, headers=AUTH, trust_env=False) as client:
        stream = await open_stream(client, fluent=True)
        try:
            await speak_text(client, stream, "something to interrupt")
            video_id = payload(await stream.message("stream/started"))["metadata"]["videoId"]
            stream.receiver.send_data(interrupt_message(video_id))
            assert payload(await stream.message("stream/interrupted"))["interrupted"] is True
            emu.faults.mute_interrupts = True
            seen = len(stream.messages)
            await speak_text(client, stream, "something else to interrupt")
            video_id = payload(await stream.message("stream/started", after=seen))[
                "metadata"]["videoId"]
            stream.receiver.send_data(interrupt_message(video_id))
            record = emu.streams[stream.stream_id]
            await eventually(lambda: record.clips[-1].outcome == "interrupted")
            await asyncio.sleep(0.2)
            assert [t for _, t in stream.messages[seen + 1:]] == []  # stopped, not acknowledged
        finally:
            await delete(client, stream)
            await stream.close()


async def test_an_interrupt_can_leave_the_queue_playing() -> None:
    async with DIDEmulator(api_keys=[API_KEY], agents=[AGENT],
                           interrupt_clears_queue=False) as emu, \
            httpx.AsyncClient(base_url=emu.url, headers=AUTH, trust_env=False) as client:
        stream = await open_stream(client, fluent=True)
        try:
            await speak_text(client, stream, "the first clip, long enough")
            await speak_text(client, stream, "the second clip")
            first = payload(await stream.message("stream/started"))["metadata"]["videoId"]
            stream.receiver.send_data(interrupt_message(first))
            await stream.message("stream/done")
            second = payload(await stream.message("stream/started", after=2))
            record = emu.streams[stream.stream_id]
            assert second["metadata"]["videoId"] == record.clips[1].clip_id
            assert [c.outcome for c in record.clips] == ["interrupted", "playing"]
        finally:
            await delete(client, stream)
            await stream.close()


async def test_interrupts_that_are_ignored(emu: DIDEmulator, client: httpx.AsyncClient) -> None:
    legacy = await open_stream(client)
    fluent = await open_stream(client, fluent=True)
    try:
        for stream in (legacy, fluent):
            await speak_text(client, stream, "keep talking please")
            await stream.message("stream/started")
        legacy_id = payload(legacy.messages[0][1])["metadata"]["videoId"]
        legacy.receiver.send_data(interrupt_message(legacy_id))
        fluent.receiver.send_data(interrupt_message("vid_not_playing"))
        fluent.receiver.send_data("hello?")
        for stream in (legacy, fluent):
            record = emu.streams[stream.stream_id]
            await eventually(lambda r=record: len(r.protocol_errors) >= 1)
        assert "non-fluent" in emu.streams[legacy.stream_id].protocol_errors[0]
        errors = emu.streams[fluent.stream_id].protocol_errors
        await eventually(lambda: len(errors) == 2)
        assert "vid_not_playing" in errors[0] and "unknown data-channel message" in errors[1]
        for stream in (legacy, fluent):
            assert emu.streams[stream.stream_id].clips[0].outcome == "playing"
    finally:
        for stream in (legacy, fluent):
            await delete(client, stream)
            await stream.close()


# -- timeouts, faults, lifecycle -----------------------------------------------------------------


async def test_idle_timeout_ends_the_stream_and_stops_billing(
        emu: DIDEmulator, client: httpx.AsyncClient) -> None:
    stream = await open_stream(client, session_timeout=0.4)
    record = emu.streams[stream.stream_id]
    try:
        await speak_text(client, stream, "short")  # 0.3 s: the idle timer waits for it
        await stream.message("stream/done")
        assert record.end_reason is None
        await eventually(lambda: record.status == "ended", within=1.5)
        assert record.end_reason == "idle_timeout" and emu.open_sessions == 0
        assert record.billed_seconds == pytest.approx(
            stream.when("stream/done") - stream.when("stream/started") + 0.4 + 0.15, abs=0.3)
        await eventually(lambda: stream.lost != [])  # the client sees the connection close
        assert error_of(await speak_text(client, stream, "hello")) == (404, "NotFoundError")
        assert error_of(await delete(client, stream)) == (404, "NotFoundError")
    finally:
        await stream.close()


async def test_max_duration_ends_the_stream() -> None:
    async with DIDEmulator(api_keys=[API_KEY], agents=[AGENT], max_duration=0.3) as emu, \
            httpx.AsyncClient(base_url=emu.url, headers=AUTH, trust_env=False) as client:
        stream = await open_stream(client)
        try:
            record = emu.streams[stream.stream_id]
            await eventually(lambda: record.status == "ended", within=1.5)
            assert record.end_reason == "max_duration" and emu.open_sessions == 0
            assert record.billed_seconds == pytest.approx(0.3, abs=0.1)
            await eventually(lambda: stream.lost != [])
        finally:
            await stream.close()


async def test_drop_fault_closes_the_connection_mid_clip_and_keeps_billing(
        emu: DIDEmulator, client: httpx.AsyncClient) -> None:
    emu.faults.drop_channel_after(0.3)
    url = (await upload(client, tone_wav(1.0))).json()["url"]
    stream = await open_stream(client)
    record = emu.streams[stream.stream_id]
    try:
        await speak_audio(client, stream, url)
        await stream.message("stream/started")
        began = time.monotonic()
        await eventually(lambda: stream.lost != [], within=2)
        assert time.monotonic() - began == pytest.approx(0.3, abs=0.15)
        assert record.channel_dropped and record.clips[0].outcome == "abandoned"
        assert not any(t.startswith("stream/done") for _, t in stream.messages)
        assert emu.open_sessions == 1 and record.status == "created"
        assert error_of(await speak_text(client, stream, "still there?")) == (
            500, "InternalServerError")
        assert (await delete(client, stream)).status_code == 200
        assert emu.open_sessions == 0
    finally:
        await stream.close()


async def test_control_api_sets_the_account(emu: DIDEmulator, client: httpx.AsyncClient) -> None:
    async with httpx.AsyncClient(base_url=emu.url, trust_env=False) as control:
        response = await control.post("/_emulator/did/account", json={
            "out_of_credits": True, "banned_words": ["Nope"], "flag_audio_next": 2})
        assert response.json()["flagged_uploads"] == 2
        assert emu.out_of_credits and emu.banned_words == {"nope"}
        bad = await control.post("/_emulator/did/account", json={"credits": 5})
        assert bad.status_code == 400 and "unknown key" in bad.json()["message"]
        state = (await control.get("/_emulator/state")).json()
        assert state["emulator"] == "did" and state["account"]["out_of_credits"] is True
        assert state["agents"] == [AGENT]
    assert error_of(await create(client)) == (402, "InsufficientCreditsError")
    assert all(r.path != "/_emulator/did/account" for r in emu.requests)


async def test_reset_and_aclose_close_every_peer_connection() -> None:
    before = asyncio.all_tasks()
    emu = DIDEmulator(api_keys=[API_KEY], agents=[AGENT])
    async with emu, httpx.AsyncClient(base_url=emu.url, headers=AUTH,
                                      trust_env=False) as client:
        first = await open_stream(client)
        await emu.reset()
        assert emu.open_sessions == 0 and emu.streams == {}
        await eventually(lambda: first.lost != [])
        second = await open_stream(client)
        assert emu.open_sessions == 1
    await emu.aclose()
    await eventually(lambda: second.lost != [])
    assert emu.open_sessions == 1  # shutting down is not D-ID ending the stream
    for stream in (first, second):
        await stream.close()
    await asyncio.sleep(0.05)
    assert {t for t in asyncio.all_tasks() - before if not t.done()} == set()


@pytest.mark.parametrize("options", [
    {"default_session_timeout": 301}, {"max_duration": -1}, {"interrupt_ack": "stream/ok"},
    {"max_audio_bytes": 0}, {"fps": 0}, {"video_size": (63, 64)}, {"api_keys": []},
])
def test_constructor_rejects_impossible_choices(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        DIDEmulator(**options)


async def test_cli_factory_accepts_any_agent() -> None:
    emulator = EMULATORS["did"](api_key="k1", host="127.0.0.1", port=0, max_concurrent=1)
    async with emulator, httpx.AsyncClient(base_url=emulator.url, trust_env=False) as http:
        response = await http.post("/agents/agt_anything/streams", json={},
                                   headers={"Authorization": "Basic k1"})
        assert response.status_code == 201
        assert emulator.open_sessions == 1
        assert isinstance(emulator, DIDEmulator)
        emulator.end_stream(response.json()["id"])
        assert emulator.open_sessions == 0
