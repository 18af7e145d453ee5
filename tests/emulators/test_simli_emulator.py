"""Tests of the Simli emulator over real sockets (httpx, websockets and an aiortc peer)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import av
import httpx
import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from avatarkit.emulators._media import mouth_opening
from avatarkit.emulators.simli import (
    LIVEKIT_PATH,
    P2P_PATHS,
    RATE_LINE,
    SimliEmulator,
    SimliSessionRecord,
    session_id_for_token,
)

API_KEY = "test-key"
FACE = "face-amelia"
RATE = 16_000
HEADERS = {"x-simli-api-key": API_KEY}


@pytest.fixture
async def emu() -> AsyncIterator[SimliEmulator]:
    async with SimliEmulator(faces=[FACE], max_concurrent=2) as emulator:
        yield emulator


@pytest.fixture
async def client(emu: SimliEmulator) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=emu.url, timeout=5.0, trust_env=False) as http:
        yield http


async def mint(client: httpx.AsyncClient, **body: Any) -> str:
    response = await client.post("/compose/token", json={"faceId": FACE, **body},
                                 headers=HEADERS)
    assert response.status_code == 200, response.text
    token: str = response.json()["session_token"]
    return token


def record(emu: SimliEmulator, token: str) -> SimliSessionRecord:
    return emu.sessions[session_id_for_token(token)]


def dial(emu: SimliEmulator, token: str, path: str = LIVEKIT_PATH) -> connect:
    url = emu.url.replace("http://", "ws://") + f"{path}?session_token={token}"
    return connect(url, proxy=None, open_timeout=2, close_timeout=2, max_size=None)


async def line(ws: ClientConnection, within: float = 1.0) -> str:
    message = await asyncio.wait_for(ws.recv(), within)
    assert isinstance(message, str)
    return message


async def lines_until_closed(ws: ClientConnection, within: float = 3.0) -> list[str]:
    received: list[str] = []
    async with asyncio.timeout(within):
        try:
            while True:
                message = await ws.recv()
                assert isinstance(message, str)
                received.append(message)
        except ConnectionClosed:
            return received


async def expect_nothing(ws: ClientConnection, seconds: float) -> None:
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(ws.recv(), seconds)


async def livekit_session(emu: SimliEmulator, client: httpx.AsyncClient,
                          **body: Any) -> tuple[ClientConnection, SimliSessionRecord]:
    """A started session on the LiveKit channel (no media: quick)."""
    token = await mint(client, **body)
    ws = await dial(emu, token)
    join = json.loads(await line(ws))
    assert set(join) == {"livekit_url", "livekit_token"}
    assert json.loads(await line(ws)) == {"video_metadata": {"fps": 25, "width": 256,
                                                            "height": 256}}
    assert await line(ws) == "START"
    return ws, record(emu, token)


def pcm(seconds: float, *, amplitude: float = 0.0) -> bytes:
    t = np.arange(round(seconds * RATE)) / RATE
    wave = amplitude * np.sin(2 * np.pi * 220 * t) * 32767
    return wave.astype("<i2").tobytes()


def frames(audio: bytes, size: int = 6000) -> list[bytes]:
    return [audio[offset:offset + size] for offset in range(0, len(audio), size)]


class Viewer:
    """A raw aiortc client: receive-only audio and video, frames decoded to RGB."""

    def __init__(self) -> None:
        self.pc = RTCPeerConnection(configuration=RTCConfiguration(iceServers=[]))
        self.frames: asyncio.Queue[np.ndarray[Any, Any]] = asyncio.Queue()
        self.tasks: list[asyncio.Task[None]] = []

        @self.pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "video":
                self.tasks.append(asyncio.create_task(self._pump(track)))

    async def _pump(self, track: MediaStreamTrack) -> None:
        try:
            while True:
                frame = await track.recv()
                assert isinstance(frame, av.VideoFrame)
                self.frames.put_nowait(frame.to_ndarray(format="rgb24"))
        except MediaStreamError:
            return

    async def offer(self) -> str:
        self.pc.addTransceiver("audio", direction="recvonly")
        self.pc.addTransceiver("video", direction="recvonly")
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return str(self.pc.localDescription.sdp)

    async def accept(self, sdp: str) -> None:
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))

    async def openings(self, seconds: float) -> list[float]:
        """The mouth opening of each frame received over the next ``seconds``."""
        found: list[float] = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                found.append(mouth_opening(await asyncio.wait_for(self.frames.get(), left)))
            except TimeoutError:
                break
        return found

    def drain(self) -> None:
        while not self.frames.empty():
            self.frames.get_nowait()

    async def close(self) -> None:
        await self.pc.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


@pytest.fixture
async def viewer() -> AsyncIterator[Viewer]:
    peer = Viewer()
    yield peer
    await peer.close()


async def p2p_session(emu: SimliEmulator, client: httpx.AsyncClient, viewer: Viewer,
                      path: str = P2P_PATHS[0]) -> tuple[ClientConnection, SimliSessionRecord]:
    token = await mint(client)
    ws = await dial(emu, token, path)
    await ws.send(json.dumps({"type": "offer", "sdp": await viewer.offer()}))
    answer = json.loads(await line(ws, within=5.0))
    assert answer["type"] == "answer" and "m=video" in answer["sdp"]
    await viewer.accept(answer["sdp"])
    assert await line(ws) == "START"
    return ws, record(emu, token)


# -- REST -----------------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [{}, {"x-simli-api-key": "wrong-key"},
                                     {"Authorization": f"Bearer {API_KEY}"}])
async def test_token_needs_the_api_key(emu: SimliEmulator, client: httpx.AsyncClient,
                                       headers: dict[str, str]) -> None:
    response = await client.post("/compose/token", json={"faceId": FACE}, headers=headers)
    assert response.status_code == 401
    assert response.json() == {"detail": "Invalid or missing API key"}
    assert not emu.sessions
    assert "wrong-key" not in json.dumps(emu.state())


async def test_token_defaults_and_options(emu: SimliEmulator, client: httpx.AsyncClient) -> None:
    plain = await client.post("/compose/token", json={"faceId": FACE}, headers=HEADERS)
    assert plain.status_code == 200 and set(plain.json()) == {"session_token"}
    session = record(emu, plain.json()["session_token"])
    assert (session.max_session_length, session.max_idle_time, session.handle_silence,
            session.status, session.face_id) == (3600, 300, True, "minted", FACE)
    detailed = await client.post("/compose/token", headers=HEADERS, json={
        "faceId": f"{FACE}/happy", "apiVersion": "v2", "handleSilence": False,
        "maxSessionLength": 60, "maxIdleTime": 10, "audioInputFormat": "pcm16",
        "model": "artalk", "streaming_width": 1024, "camera": {"zoom": 1.5}})
    assert detailed.status_code == 200
    assert detailed.json()["warnings"] == [
        "model is deprecated and ignored: every session runs fasttalk"]
    other = record(emu, detailed.json()["session_token"])
    assert (other.face_id, other.emotion_id, other.max_session_length, other.max_idle_time,
            other.handle_silence, other.model) == (FACE, "happy", 60, 10, False, "artalk")
    assert other.extras == {"streaming_width": 1024, "camera": {"zoom": 1.5}}
    # minting bills nothing
    assert (emu.open_sessions, emu.billed_seconds) == (0, 0.0)


async def test_unknown_face_is_fail_token(emu: SimliEmulator, client: httpx.AsyncClient) -> None:
    response = await client.post("/compose/token", json={"faceId": "nobody"}, headers=HEADERS)
    assert response.status_code == 400
    assert response.json() == {"session_token": "FAIL TOKEN", "detail": "Invalid faceId: nobody"}
    assert not emu.sessions


async def test_out_of_credits_is_402(emu: SimliEmulator, client: httpx.AsyncClient) -> None:
    emu.out_of_credits = True
    response = await client.post("/compose/token", json={"faceId": FACE}, headers=HEADERS)
    assert response.status_code == 402 and "BILLING" in response.json()["detail"]
    control = await client.post("/_emulator/simli", json={"out_of_credits": False})
    assert control.status_code == 200 and control.json()["out_of_credits"] is False
    assert (await client.post("/compose/token", json={"faceId": FACE},
                              headers=HEADERS)).status_code == 200


@pytest.mark.parametrize(("body", "field"), [
    ({}, "faceId"),
    ({"faceId": ""}, "faceId"),
    ({"faceId": FACE, "audioInputFormat": "wav"}, "audioInputFormat"),
    ({"faceId": FACE, "maxSessionLength": -5}, "maxSessionLength"),
    ({"faceId": FACE, "maxIdleTime": "30"}, "maxIdleTime"),
    ({"faceId": FACE, "apiVersion": "v1"}, "apiVersion"),
    ({"faceId": FACE, "handleSilence": "yes"}, "handleSilence"),
    ({"faceId": FACE, "streaming_width": 256}, "streaming_width"),
    ({"faceId": FACE, "avatar_position_x": 2}, "avatar_position_x"),
])
async def test_invalid_token_request_is_422(emu: SimliEmulator, client: httpx.AsyncClient,
                                            body: dict[str, Any], field: str) -> None:
    response = await client.post("/compose/token", json=body, headers=HEADERS)
    assert response.status_code == 422
    [detail] = response.json()["detail"]
    assert detail["loc"] == ["body", field]
    assert not emu.sessions


async def test_token_route_faults(emu: SimliEmulator, client: httpx.AsyncClient) -> None:
    emu.faults.fail_next_creates(1, status=503)
    emu.faults.rate_limit_next(1, retry_after=2, route="create")
    failed = await client.post("/compose/token", json={"faceId": FACE}, headers=HEADERS)
    limited = await client.post("/compose/token", json={"faceId": FACE}, headers=HEADERS)
    assert failed.status_code == 503 and failed.json() == {"detail": "injected failure"}
    assert limited.status_code == 429 and limited.headers["Retry-After"] == "2"
    assert (await client.post("/compose/token", json={"faceId": FACE},
                              headers=HEADERS)).status_code == 200


async def test_ice_servers_and_usage(emu: SimliEmulator, client: httpx.AsyncClient) -> None:
    assert (await client.get("/compose/ice")).status_code == 401
    empty = await client.get("/compose/ice", headers=HEADERS)
    assert empty.status_code == 200 and empty.json() == []
    turn = {"urls": ["turn:turn.example:3478"], "username": "u", "credential": "c"}
    configured = await client.post("/_emulator/simli", json={"ice_servers": [turn]})
    assert configured.status_code == 200
    assert (await client.get("/compose/ice", headers=HEADERS)).json() == [turn]
    usage = await client.get("/ratelimiter/sessions", headers=HEADERS)
    assert usage.json() == {"currentUsage": 0}
    ws, _ = await livekit_session(emu, client)
    usage = await client.get("/ratelimiter/sessions", headers=HEADERS)
    assert usage.json() == {"currentUsage": 1}
    await ws.close()
    await asyncio.sleep(0.05)
    usage = await client.get("/ratelimiter/sessions", headers=HEADERS)
    assert usage.json() == {"currentUsage": 0}


# -- the WebSocket: handshake -----------------------------------------------------------------


async def test_bad_and_used_tokens_are_refused_at_the_handshake(
    emu: SimliEmulator, client: httpx.AsyncClient
) -> None:
    with pytest.raises(InvalidStatus) as unknown:
        await dial(emu, "not-a-token")
    assert unknown.value.response.status_code == 401
    assert unknown.value.response.body == b"Invalid session token"
    ws, session = await livekit_session(emu, client)
    with pytest.raises(InvalidStatus) as used:
        await dial(emu, session.session_token)
    assert used.value.response.status_code == 403
    assert used.value.response.body == b"Session token already used"
    assert session.refused_connections == 1 and session.status == "active"
    await ws.close()


async def test_an_unused_token_expires_unbilled() -> None:
    async with SimliEmulator(faces=[FACE], token_ttl=0.1) as emu, httpx.AsyncClient(
        base_url=emu.url, trust_env=False
    ) as http:
        token = await mint(http)
        await asyncio.sleep(0.2)
        assert record(emu, token).status == "expired"
        assert (emu.open_sessions, emu.billed_seconds) == (0, 0.0)
        with pytest.raises(InvalidStatus) as expired:
            await dial(emu, token)
        assert expired.value.response.status_code == 401


async def test_billing_can_start_at_the_token() -> None:
    async with SimliEmulator(faces=[FACE], billing_starts="token", token_ttl=0.2) as emu, \
            httpx.AsyncClient(base_url=emu.url, trust_env=False) as http:
        token = await mint(http)
        assert emu.open_sessions == 1
        await asyncio.sleep(0.3)
        session = record(emu, token)
        assert session.status == "expired" and emu.open_sessions == 0
        assert session.billed_seconds == pytest.approx(0.2, abs=0.05)


async def test_livekit_channel_starts_the_meter(emu: SimliEmulator,
                                                client: httpx.AsyncClient) -> None:
    ws, session = await livekit_session(emu, client)
    assert (session.status, session.transport, session.path) == ("active", "livekit",
                                                                  LIVEKIT_PATH)
    assert emu.open_sessions == 1 and session.ledger_entry is not None
    assert session.livekit_token is not None
    state = json.dumps(emu.state())
    assert session.livekit_token not in state and session.session_token not in state
    await ws.close()
    await asyncio.sleep(0.05)
    assert session.status == "ended" and session.end_reason == "DISCONNECTED"
    assert emu.open_sessions == 0


@pytest.mark.parametrize("path", P2P_PATHS)
async def test_p2p_offer_answer_start_and_video(emu: SimliEmulator, client: httpx.AsyncClient,
                                                viewer: Viewer, path: str) -> None:
    ws, session = await p2p_session(emu, client, viewer, path)
    assert (session.transport, session.path, session.offer_received) == ("p2p", path, True)
    assert session.lines_sent == ["{answer}", "START"]
    openings = await viewer.openings(1.0)
    assert len(openings) >= 15  # 25 fps, less the connection setup
    assert max(openings) < 0.3  # silence: the mouth is closed
    await ws.close()
    await asyncio.sleep(0.05)
    assert session.status == "ended" and session.pc is None and emu.open_sessions == 0


@pytest.mark.parametrize(("audio_track", "sending"), [(False, 1), (True, 2)])
async def test_audio_track_is_optional(viewer: Viewer, audio_track: bool, sending: int) -> None:
    async with SimliEmulator(faces=[FACE], audio_track=audio_track) as emu, \
            httpx.AsyncClient(base_url=emu.url, trust_env=False) as http:
        token = await mint(http)
        async with dial(emu, token, P2P_PATHS[0]) as ws:
            await ws.send(json.dumps({"type": "offer", "sdp": await viewer.offer()}))
            answer = json.loads(await line(ws, within=5.0))
            assert answer["sdp"].count("a=sendonly") == sending  # video, and audio if asked


@pytest.mark.parametrize("first", ["SKIP", json.dumps({"type": "answer", "sdp": "x"}), b"\0\0"])
async def test_the_offer_must_come_first(emu: SimliEmulator, client: httpx.AsyncClient,
                                         first: str | bytes) -> None:
    token = await mint(client)
    async with dial(emu, token, P2P_PATHS[0]) as ws:
        await ws.send(first)
        assert await lines_until_closed(ws) == []
        assert ws.close_code == 1008
    session = record(emu, token)
    assert session.status == "refused" and session.ledger_entry is None
    assert "offer" in session.protocol_errors[0]
    assert emu.billed_seconds == 0.0


async def test_an_unusable_offer_is_refused(emu: SimliEmulator,
                                            client: httpx.AsyncClient) -> None:
    token = await mint(client)
    async with dial(emu, token, P2P_PATHS[1]) as ws:
        await ws.send(json.dumps({"type": "offer", "sdp": "v=0\r\nnonsense\r\n"}))
        assert await lines_until_closed(ws) == []
        assert ws.close_code == 1008
    assert record(emu, token).status == "refused" and emu.open_sessions == 0


async def test_no_offer_in_time_is_refused() -> None:
    async with SimliEmulator(faces=[FACE], offer_timeout=0.2) as emu, httpx.AsyncClient(
        base_url=emu.url, trust_env=False
    ) as http:
        token = await mint(http)
        async with dial(emu, token, P2P_PATHS[0]) as ws:
            assert await lines_until_closed(ws) == []
            assert ws.close_code == 1008
        session = record(emu, token)
        assert session.status == "refused"
        assert session.protocol_errors == ["no SDP offer within 0.2 s"]


# -- the WebSocket: audio, speech and interrupts --------------------------------------------


async def test_audio_frames_are_recorded_with_their_sizes(emu: SimliEmulator,
                                                          client: httpx.AsyncClient) -> None:
    ws, session = await livekit_session(emu, client)
    for frame in frames(pcm(0.5)):  # 16000 bytes: 6000, 6000, 4000
        await ws.send(frame)
    await ws.send(bytes(6001))
    await ws.send(bytes(8000))
    assert await line(ws) == "SPEAK"
    await ws.close()
    await asyncio.sleep(0.05)
    assert session.frame_sizes == [6000, 6000, 4000, 6001, 8000]
    assert session.audio_seconds_received == pytest.approx(0.5 + 6000 / 32000 + 0.25)
    assert session.protocol_errors == [
        "audio frame of 6001 bytes; frames are at most 6000 bytes",
        "audio frame of 6001 bytes: an odd byte count is not PCM16 (last byte dropped)",
        "audio frame of 8000 bytes; frames are at most 6000 bytes",
    ]


async def test_other_commands_are_recorded(emu: SimliEmulator,
                                           client: httpx.AsyncClient) -> None:
    ws, session = await livekit_session(emu, client)
    await ws.send("ping")
    assert await line(ws) == "pong"
    await ws.send("BG_00000000-0000-0000-0000-000000000000")
    await ws.send(b"CAM_" + bytes(36))
    await ws.send("HELLO")
    await ws.send(b"PLAY_IMMEDIATE" + pcm(0.1))
    assert await line(ws) == "SPEAK"
    await ws.send("DONE")
    await ws.send(pcm(0.1))  # after DONE: ignored
    assert await lines_until_closed(ws) == [
        "SILENT", "ENDFRAME", "CLOSING REASON: DONE", "STOP"]
    assert (session.pings, session.camera_commands, session.play_immediate) == (1, 1, 1)
    assert session.asset_commands == ["BG_00000000-0000-0000-0000-000000000000"]
    assert session.protocol_errors == ["unknown text command 'HELLO'", "audio after DONE ignored"]
    described = emu.state()["sessions"][0]
    assert described["frame_sizes"] == {"3200": 2}
    assert described["lines_sent"] == ["START", "pong", "SPEAK", "SILENT", "ENDFRAME",
                                       "CLOSING REASON: DONE", "STOP"]


async def test_speak_and_silent_follow_real_time_playback(emu: SimliEmulator,
                                                          client: httpx.AsyncClient) -> None:
    ws, session = await livekit_session(emu, client)
    sent = time.monotonic()
    for frame in frames(pcm(0.5)):
        await ws.send(frame)
    assert await line(ws) == "SPEAK"
    assert await line(ws) == "SILENT"
    assert time.monotonic() - sent == pytest.approx(0.5, abs=0.1)
    # a second burst after silence speaks again
    await ws.send(pcm(0.1))
    assert [await line(ws), await line(ws)] == ["SPEAK", "SILENT"]
    assert (session.speak_events, session.silent_events) == (2, 2)
    await ws.close()


async def test_skip_drops_the_queue_and_answers_silent(emu: SimliEmulator,
                                                       client: httpx.AsyncClient) -> None:
    ws, session = await livekit_session(emu, client)
    for frame in frames(pcm(2.0)):
        await ws.send(frame)
    assert await line(ws) == "SPEAK"
    await asyncio.sleep(0.2)
    skipped = time.monotonic()
    await ws.send("SKIP")
    assert await line(ws) == "SILENT"
    assert time.monotonic() - skipped < 0.2
    await expect_nothing(ws, 0.3)  # the rest of the 2 s is gone
    await ws.send(b"SKIP")  # as bytes, and while silent: still acknowledged
    assert await line(ws) == "SILENT"
    assert (session.skips, session.useless_skips) == (2, 1)
    await ws.close()


async def test_mute_interrupts_skips_without_acknowledging(emu: SimliEmulator,
                                                           client: httpx.AsyncClient) -> None:
    ws, session = await livekit_session(emu, client)
    emu.faults.mute_interrupts = True
    for frame in frames(pcm(1.0)):
        await ws.send(frame)
    assert await line(ws) == "SPEAK"
    await ws.send("SKIP")
    await expect_nothing(ws, 1.2)  # neither the ack nor the end of the skipped speech
    assert session.skips == 1 and not session.speaking
    await ws.close()


async def test_done_plays_out_then_ends_the_session(emu: SimliEmulator,
                                                    client: httpx.AsyncClient) -> None:
    ws, session = await livekit_session(emu, client)
    for frame in frames(pcm(0.4)):
        await ws.send(frame)
    await ws.send(b"DONE")  # the SDK sends it as bytes
    sent = time.monotonic()
    assert await lines_until_closed(ws) == [
        "SPEAK", "SILENT", "ENDFRAME", "CLOSING REASON: DONE", "STOP"]
    assert time.monotonic() - sent == pytest.approx(0.4, abs=0.15)
    assert ws.close_code == 1000
    assert (session.status, session.end_reason, session.done_received) == ("ended", "DONE", True)
    assert emu.open_sessions == 0


async def test_idle_timeout_ends_the_session(emu: SimliEmulator,
                                             client: httpx.AsyncClient) -> None:
    ws, session = await livekit_session(emu, client, maxIdleTime=1)
    await asyncio.sleep(0.6)
    await ws.send(pcm(0.2))  # audio postpones the idle timeout
    started = time.monotonic()
    assert await lines_until_closed(ws, within=3.0) == [
        "SPEAK", "SILENT", "ENDFRAME", "CLOSING REASON: IDLE", "STOP"]
    assert time.monotonic() - started == pytest.approx(1.2, abs=0.2)
    assert ws.close_code == 1000
    assert (session.status, session.end_reason) == ("ended", "IDLE")
    assert emu.open_sessions == 0
    assert session.billed_seconds == pytest.approx(1.8, abs=0.25)


async def test_max_session_length_cuts_mid_sentence(emu: SimliEmulator,
                                                    client: httpx.AsyncClient) -> None:
    ws, session = await livekit_session(emu, client, maxSessionLength=1, maxIdleTime=30)
    started = time.monotonic()
    for frame in frames(pcm(3.0)):
        await ws.send(frame)
    assert await lines_until_closed(ws) == ["SPEAK", "ENDFRAME", "CLOSING REASON: MAX", "STOP"]
    assert time.monotonic() - started == pytest.approx(1.0, abs=0.2)
    assert (session.status, session.end_reason) == ("ended", "MAX")
    assert emu.open_sessions == 0


async def test_stop_reason_spelling() -> None:
    async with SimliEmulator(faces=[FACE], closing_prefix="STOP REASON") as emu, \
            httpx.AsyncClient(base_url=emu.url, trust_env=False) as http:
        ws, session = await livekit_session(emu, http)
        emu.end_session(session.session_id, "MAX")
        assert await lines_until_closed(ws) == ["ENDFRAME", "STOP REASON: MAX", "STOP"]


async def test_error_fault_ends_the_session(emu: SimliEmulator,
                                            client: httpx.AsyncClient) -> None:
    ws, session = await livekit_session(emu, client)
    emu.send_error(session.session_id, "BILLING_ERROR")
    assert await lines_until_closed(ws) == ["ERROR: BILLING_ERROR"]
    assert (session.status, session.end_reason) == ("ended", "ERROR: BILLING_ERROR")
    assert emu.open_sessions == 0
    # the same through the control API, with a warning first that ends nothing
    ws, other = await livekit_session(emu, client)
    ok = await client.post("/_emulator/simli", json={"send": {"line": "WARNING: slow"}})
    assert ok.status_code == 200 and await line(ws) == "WARNING: slow"
    ok = await client.post("/_emulator/simli", json={"send": {
        "line": "RATE LIMIT EXCEEDED", "end": True, "session_id": other.session_id}})
    assert ok.status_code == 200
    assert await lines_until_closed(ws) == ["RATE LIMIT EXCEEDED"]
    assert other.status == "ended" and emu.open_sessions == 0


@pytest.mark.parametrize("spec", [
    {"nonsense": 1}, {"send": {"line": ""}}, {"send": {"line": "X", "session_id": "nope"}},
    {"start_line": 5}, {"ice_servers": [{"username": "u"}]}, {"out_of_credits": "yes"},
])
async def test_control_api_validates(emu: SimliEmulator, client: httpx.AsyncClient,
                                     spec: dict[str, Any]) -> None:
    response = await client.post("/_emulator/simli", json=spec)
    assert response.status_code == 400 and response.json()["error"] == "invalid request"


async def test_start_line_replaces_start(emu: SimliEmulator, client: httpx.AsyncClient) -> None:
    await client.post("/_emulator/simli", json={"start_line": "ERROR: INVALID_API_KEY"})
    token = await mint(client)
    async with dial(emu, token) as ws:
        received = await lines_until_closed(ws)
    assert received[-1] == "ERROR: INVALID_API_KEY" and "START" not in received
    session = record(emu, token)
    assert session.status == "refused" and session.ledger_entry is None


async def test_concurrency_limit_sends_rate(emu: SimliEmulator, client: httpx.AsyncClient) -> None:
    first, _ = await livekit_session(emu, client)
    second, _ = await livekit_session(emu, client)
    token = await mint(client)  # minting is not limited: nothing runs yet
    async with dial(emu, token) as ws:
        assert (await lines_until_closed(ws))[-1] == RATE_LINE
    assert record(emu, token).status == "refused" and emu.open_sessions == 2
    await first.close()
    await second.close()


@pytest.mark.parametrize(("abruptly", "code"), [(False, 1011), (True, 1006)])
async def test_drop_fault_drops_the_socket_mid_utterance(abruptly: bool, code: int) -> None:
    async with SimliEmulator(faces=[FACE], drop_abruptly=abruptly) as emu, httpx.AsyncClient(
        base_url=emu.url, trust_env=False
    ) as http:
        ws, session = await livekit_session(emu, http)
        emu.faults.drop_channel_after(0.5)
        for frame in frames(pcm(0.4)):
            await ws.send(frame)
        assert await line(ws) == "SPEAK"
        with pytest.raises(ConnectionClosed):
            for frame in frames(pcm(1.0)):
                await ws.send(frame)
                await asyncio.sleep(0.01)
            await ws.recv()
        assert ws.close_code == code
        await asyncio.sleep(0.05)
        assert session.channel_dropped and session.status == "ended"
        assert session.end_reason == "DISCONNECTED" and emu.open_sessions == 0


async def test_without_end_on_disconnect_a_closed_socket_keeps_billing() -> None:
    async with SimliEmulator(faces=[FACE], end_on_disconnect=False) as emu, httpx.AsyncClient(
        base_url=emu.url, trust_env=False
    ) as http:
        ws, session = await livekit_session(emu, http, maxIdleTime=1)
        await ws.close()
        await asyncio.sleep(0.1)
        assert session.status == "active" and emu.open_sessions == 1
        await asyncio.sleep(1.0)
        assert (session.status, session.end_reason) == ("ended", "IDLE")
        assert emu.open_sessions == 0


async def test_reset_ends_every_session(emu: SimliEmulator, client: httpx.AsyncClient) -> None:
    ws, session = await livekit_session(emu, client)
    emu.start_line = "RATE"
    reset = await client.post("/_emulator/reset")
    assert reset.status_code == 200
    assert await lines_until_closed(ws) == ["ENDFRAME", "CLOSING REASON: RESET", "STOP"]
    assert session.status == "ended" and not emu.sessions
    assert emu.open_sessions == 0 and emu.start_line is None


# -- real media -----------------------------------------------------------------------------


async def test_mouth_follows_the_audio(emu: SimliEmulator, client: httpx.AsyncClient,
                                       viewer: Viewer) -> None:
    ws, session = await p2p_session(emu, client, viewer)
    assert (await viewer.openings(0.4))  # media flows before any audio
    viewer.drain()
    for frame in frames(pcm(1.0, amplitude=0.5)):
        await ws.send(frame)
    assert await line(ws) == "SPEAK"
    loud = await viewer.openings(0.8)
    assert await line(ws, within=1.0) == "SILENT"
    await asyncio.sleep(0.2)  # frames in flight
    viewer.drain()
    quiet = await viewer.openings(0.5)
    assert max(loud) > 0.8 and sum(o > 0.8 for o in loud) >= 10
    assert quiet and max(quiet) < 0.3
    assert session.pattern is not None
    assert session.pattern.audio_seconds_rendered == pytest.approx(1.0, abs=0.05)
    await ws.close()


async def test_skip_closes_the_mouth(emu: SimliEmulator, client: httpx.AsyncClient,
                                     viewer: Viewer) -> None:
    ws, _ = await p2p_session(emu, client, viewer)
    for frame in frames(pcm(3.0, amplitude=0.5)):
        await ws.send(frame)
    assert await line(ws) == "SPEAK"
    assert max(await viewer.openings(0.4)) > 0.8
    await ws.send("SKIP")
    assert await line(ws) == "SILENT"
    await asyncio.sleep(0.2)
    viewer.drain()
    assert max(await viewer.openings(0.4)) < 0.3
    await ws.close()


async def test_aclose_closes_peer_connections_and_sockets(viewer: Viewer) -> None:
    emulator = SimliEmulator(faces=[FACE])
    async with emulator, httpx.AsyncClient(base_url=emulator.url, trust_env=False) as http:
        ws, session = await p2p_session(emulator, http, viewer)
        pc = session.pc
        assert pc is not None and pc.connectionState in ("new", "connecting", "connected")
    assert pc.connectionState == "closed"
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(ws.recv(), 1.0)
    assert ws.close_code == 1001
