"""WebRTC egress: AvatarBroadcast (fan-out, bounded queues, pts rebasing, A/V sharing one
timestamp, 20 ms audio frames), WhepEndpoint (every WHEP status, CORS, cleanup of viewers that
leave, time out or fail) and WhepClient (frames end to end, typed errors, nothing left open),
over real loopback sockets with real aiortc peers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from fractions import Fraction
from typing import Any

import av
import httpx
import numpy as np
import pytest
from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from avatarkit import (
    AuthenticationError,
    InvalidRequestError,
    MediaFormatError,
    NotFoundError,
    ProviderConnectionError,
    ProviderError,
    ProviderTimeoutError,
    ServerError,
    SessionStateError,
)
from avatarkit.errors import ErrorCategory
from avatarkit.transport.webrtc import (
    AvatarBroadcast,
    BroadcastFull,
    ViewerTracks,
    WhepClient,
)

from ..conftest import eventually, sdk_tasks
from . import (
    FPS,
    HEIGHT,
    IDLE_RGB,
    RATE,
    SPEAKING_RGB,
    WIDTH,
    runner_frame,
    serve_app,
    serve_stream,
    tone,
)

TOKEN = "viewer-token-5f1e9a77c3"


def broadcast(**kwargs: Any) -> AvatarBroadcast:
    options: dict[str, Any] = {"fps": FPS, "sample_rate": RATE, "width": WIDTH,
                               "height": HEIGHT}
    options.update(kwargs)
    return AvatarBroadcast(**options)


async def take(tracks: ViewerTracks, videos: int, audios: int,
               ) -> tuple[list[av.VideoFrame], list[av.AudioFrame]]:
    video = [await asyncio.wait_for(tracks.video.recv(), 1) for _ in range(videos)]
    audio = [await asyncio.wait_for(tracks.audio.recv(), 1) for _ in range(audios)]
    assert all(isinstance(v, av.VideoFrame) for v in video)
    assert all(isinstance(a, av.AudioFrame) for a in audio)
    return video, audio  # type: ignore[return-value]


def samples_of(frame: av.AudioFrame) -> np.ndarray[Any, np.dtype[np.int16]]:
    return np.asarray(frame.to_ndarray(), dtype=np.int16).reshape(-1)


# -- AvatarBroadcast --------------------------------------------------------------------------


async def test_each_viewer_starts_at_pts_zero_and_audio_shares_the_video_timestamp() -> None:
    cast = broadcast()
    first = cast.subscribe()
    for i in range(3):
        cast.publish(runner_frame(i))
    late = cast.subscribe()  # joins at frame 3 (t = 0.12 s)
    for i in range(3, 5):
        cast.publish(runner_frame(i))
    assert cast.frames_published == 5 and cast.viewers == 2

    video, audio = await take(first, 5, 10)
    assert [v.pts for v in video] == [i * 3600 for i in range(5)]
    assert all(v.time_base == Fraction(1, 90_000) and v.format.name == "rgb24"
               for v in video)
    assert [int(v.to_ndarray()[0, 0, 0]) for v in video] == [0, 1, 2, 3, 4]
    # 640 samples (40 ms) per frame become two 20 ms frames of 320, one Opus packet each
    assert [a.samples for a in audio] == [320] * 10
    assert [a.pts for a in audio] == [k * 320 for k in range(10)]
    assert all(a.sample_rate == RATE and a.format.name == "s16" and a.layout.name == "mono"
               for a in audio)
    # one timestamp: frame i's picture and audio start at the same time
    for i, v in enumerate(video):
        video_pts, audio_pts = v.pts, audio[2 * i].pts
        assert video_pts is not None and audio_pts is not None
        assert video_pts / 90_000 == pytest.approx(audio_pts / RATE)
        assert set(samples_of(audio[2 * i])) == set(samples_of(audio[2 * i + 1])) == {i}

    video, audio = await take(late, 2, 4)
    assert [v.pts for v in video] == [0, 3600]  # rebased to the late viewer's first frame
    assert [a.pts for a in audio] == [0, 320, 640, 960]
    assert [int(v.to_ndarray()[0, 0, 0]) for v in video] == [3, 4]
    assert [int(samples_of(a)[0]) for a in audio] == [3, 3, 4, 4]
    await cast.aclose()


async def test_a_slow_viewer_loses_its_oldest_frames_audio_and_video_alike() -> None:
    cast = broadcast(max_queued_frames=3)
    slow, fast = cast.subscribe(), cast.subscribe()
    for i in range(10):
        cast.publish(runner_frame(i))  # synchronous: never waits for a viewer
        if i < 9:
            await take(fast, 1, 2)
    video, audio = await take(slow, 3, 6)
    assert [int(v.to_ndarray()[0, 0, 0]) for v in video] == [7, 8, 9]
    assert [int(samples_of(a)[0]) for a in audio] == [7, 7, 8, 8, 9, 9]
    assert [v.pts for v in video] == [7 * 3600, 8 * 3600, 9 * 3600]  # the gap stays a gap
    assert [a.pts for a in audio] == [k * 320 for k in range(14, 20)]
    assert slow.frames_dropped == 7 and fast.frames_dropped == 0
    video, _ = await take(fast, 1, 2)
    assert int(video[0].to_ndarray()[0, 0, 0]) == 9
    await cast.aclose()


async def test_audio_that_is_not_a_multiple_of_20_ms_is_carried_over() -> None:
    cast = broadcast(fps=30.0)  # 533 samples per frame at 16 kHz
    viewer = cast.subscribe()
    rng = np.random.default_rng(3)
    sent = [rng.integers(-3000, 3000, 533).astype(np.int16) for _ in range(3)]
    for i, samples in enumerate(sent):
        cast.publish(runner_frame(i, fps=30.0, samples=samples))
    _, audio = await take(viewer, 3, 4)  # 1599 samples: four frames of 320, 319 carried
    assert [a.pts for a in audio] == [0, 320, 640, 960]
    received = np.concatenate([samples_of(a) for a in audio])
    assert np.array_equal(received, np.concatenate(sent)[:1280])
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(viewer.audio.recv(), 0.05)
    await cast.aclose()


async def test_viewer_limit_unsubscribe_and_close() -> None:
    cast = broadcast(max_viewers=2)
    a, b = cast.subscribe(), cast.subscribe()
    with pytest.raises(BroadcastFull) as full:
        cast.subscribe()
    assert isinstance(full.value, SessionStateError) and full.value.max_viewers == 2
    a.stop()
    a.stop()  # idempotent
    assert cast.viewers == 1
    with pytest.raises(MediaStreamError):
        await a.video.recv()
    c = cast.subscribe()
    waiting = asyncio.create_task(b.video.recv())
    await asyncio.sleep(0.01)
    await cast.aclose()
    await cast.aclose()
    with pytest.raises(MediaStreamError):
        await asyncio.wait_for(waiting, 1)
    with pytest.raises(MediaStreamError):
        await c.audio.recv()
    assert cast.viewers == 0
    with pytest.raises(SessionStateError):
        cast.subscribe()
    cast.publish(runner_frame(0))  # a drain task racing aclose is not an error
    assert cast.frames_published == 0


async def test_publish_refuses_frames_that_do_not_match_the_broadcast() -> None:
    cast = broadcast()
    with pytest.raises(MediaFormatError, match=r"frame\.video"):
        cast.publish(runner_frame(0, width=WIDTH + 2))
    with pytest.raises(MediaFormatError, match=r"frame\.audio"):
        cast.publish(runner_frame(0, rate=24_000))
    with pytest.raises(ValueError):
        broadcast(max_viewers=0)
    await cast.aclose()


# -- WHEP end to end --------------------------------------------------------------------------


@pytest.fixture
async def tasks_before() -> AsyncIterator[set[asyncio.Task[Any]]]:
    before = asyncio.all_tasks()
    yield before


async def no_tasks_left(before: set[asyncio.Task[Any]]) -> None:
    await eventually(lambda: not sdk_tasks(before), within=3)


def colour_of(frame: np.ndarray[Any, Any]) -> str:
    mean = frame.reshape(-1, 3).mean(axis=0)
    idle = np.abs(mean - IDLE_RGB).sum()
    speaking = np.abs(mean - SPEAKING_RGB).sum()
    return "idle" if idle < 40 else "speaking" if speaking < 40 else "mixed"


async def test_frames_arrive_speech_changes_them_and_delete_ends_the_resource(
        tasks_before: set[asyncio.Task[Any]]) -> None:
    async with serve_stream() as served:
        client = WhepClient(served.whep(), timeout=5)
        await client.connect()
        assert client.resource_url is not None
        assert client.resource_url.startswith(served.whep() + "/")
        assert served.endpoint.sessions == 1 and served.broadcast.viewers == 1
        seen: list[str] = []
        frames = client.video_frames()
        async for frame in frames:
            assert frame.data.shape == (HEIGHT, WIDTH, 3)
            seen.append(colour_of(frame.data))
            if len(seen) == 5:
                assert set(seen) == {"idle"}
                await served.runner.push_audio(tone(0.4))
                served.runner.end_utterance()
            if "speaking" in seen and seen[-1] == "idle":
                break
            assert len(seen) < 100, seen
        await frames.aclose()  # type: ignore[attr-defined]
        speaking = seen.index("speaking")
        assert seen[speaking:].count("speaking") >= 6  # 0.4 s = 10 frames, allow codec mix
        await client.aclose()
        await client.aclose()
        assert served.endpoint.sessions == 0 and served.broadcast.viewers == 0
    await no_tasks_left(tasks_before)


async def raw_offer() -> RTCPeerConnection:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("video", direction="recvonly")
    pc.addTransceiver("audio", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    return pc


async def test_the_received_audio_is_the_tone_that_was_spoken(
        tasks_before: set[asyncio.Task[Any]]) -> None:
    """A plain aiortc viewer decodes the Opus stream: silence while idle, the 440 Hz tone
    while speaking (so the 20 ms re-chunking and the timestamps are right)."""
    async with serve_stream() as served:
        pc = await raw_offer()
        received: list[np.ndarray[Any, Any]] = []
        done = asyncio.Event()

        async def listen(track: Any) -> None:
            with contextlib.suppress(MediaStreamError):
                while len(received) < 75:  # 1.5 s of 20 ms frames
                    frame = await track.recv()
                    assert frame.sample_rate == 48_000
                    stereo = frame.to_ndarray().reshape(-1, 2)
                    received.append(stereo[:, 0].astype(np.float64))
            done.set()

        listeners: list[asyncio.Task[None]] = []

        @pc.on("track")
        def on_track(track: Any) -> None:
            if track.kind == "audio":
                listeners.append(asyncio.create_task(listen(track)))

        async with httpx.AsyncClient() as http:
            response = await http.post(served.whep(), content=pc.localDescription.sdp,
                                       headers={"Content-Type": "application/sdp"})
            assert response.status_code == 201
            assert response.headers["Content-Type"].startswith("application/sdp")
            location = response.headers["Location"]
            assert location.startswith("/whep/avatar/")  # an absolute path
            await pc.setRemoteDescription(RTCSessionDescription(response.text, "answer"))
            await eventually(lambda: len(received) >= 15, within=3)
            await served.runner.push_audio(tone(1.0, freq=440.0))
            served.runner.end_utterance()
            await asyncio.wait_for(done.wait(), 5)
            assert (await http.delete(served.base_url + location)).status_code == 200
        await pc.close()
        for task in listeners:
            await task
    levels = np.array([np.sqrt(np.mean(f**2)) for f in received])
    assert levels[:10].max() < 50  # idle frames: near silence (int16 scale)
    loud = np.flatnonzero(levels > 2000)
    assert len(loud) >= 30, levels.round()  # most of the 1 s tone arrived
    signal = np.concatenate([received[i] for i in loud[5:-5]])
    spectrum = np.abs(np.fft.rfft(signal * np.hanning(len(signal))))
    peak = np.fft.rfftfreq(len(signal), 1 / 48_000)[int(spectrum.argmax())]
    assert abs(peak - 440.0) < 5, peak
    await no_tasks_left(tasks_before)


async def post(http: httpx.AsyncClient, url: str, body: str, **headers: str,
               ) -> httpx.Response:
    return await http.post(url, content=body.encode(),
                           headers={"Content-Type": "application/sdp", **headers})


async def test_every_whep_status(tasks_before: set[asyncio.Task[Any]]) -> None:
    def authorize(stream: str, token: str | None) -> bool:
        return token == TOKEN

    async with serve_stream(max_viewers=1, authorize=authorize) as served, \
            httpx.AsyncClient() as http:
        pc = await raw_offer()
        offer = pc.localDescription.sdp
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        # 415: not SDP
        r = await http.post(served.whep(), content=offer.encode(),
                            headers={"Content-Type": "text/plain", **bearer})
        assert r.status_code == 415 and "application/sdp" in r.text
        # 401 without and with a wrong token, asking for a bearer token
        r = await post(http, served.whep(), offer)
        assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
        r = await post(http, served.whep(), offer, Authorization="Bearer wrong")
        assert r.status_code == 401 and TOKEN not in r.text
        # 404: unknown stream
        r = await post(http, served.whep("nobody"), offer, **bearer)
        assert r.status_code == 404
        # 400: malformed SDP, and nothing left open
        r = await post(http, served.whep(), "v=0\r\nthis is not a session description\r\n",
                       **bearer)
        assert r.status_code == 400 and "SDP" in r.text
        assert served.endpoint.sessions == 0 and served.broadcast.viewers == 0
        # 201 with Location, an SDP answer, and CORS headers a page on another origin reads
        r = await post(http, served.whep(), offer, Origin="https://app.example", **bearer)
        assert r.status_code == 201, r.text
        assert r.headers["Content-Type"].startswith("application/sdp")
        assert r.text.startswith("v=0") and "a=sendonly" in r.text
        assert r.headers["Access-Control-Allow-Origin"] == "*"
        assert "Location" in r.headers["Access-Control-Expose-Headers"]
        resource = served.base_url + r.headers["Location"]
        assert served.endpoint.sessions == 1
        # 503 + Retry-After: the one viewer slot is taken
        r = await post(http, served.whep(), offer, **bearer)
        assert r.status_code == 503 and int(r.headers["Retry-After"]) > 0
        # 405: no trickle ICE / ICE restart
        r = await http.patch(resource, content=b"a=end-of-candidates",
                             headers={"Content-Type": "application/trickle-ice-sdpfrag",
                                      **bearer})
        assert r.status_code == 405
        # CORS preflights
        r = await http.options(served.whep(), headers={
            "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        assert r.status_code == 204
        assert r.headers["Access-Control-Allow-Origin"] == "*"
        assert "POST" in r.headers["Access-Control-Allow-Methods"]
        assert "Authorization" in r.headers["Access-Control-Allow-Headers"]
        assert r.headers["Accept-Post"] == "application/sdp"
        r = await http.options(resource, headers={"Origin": "https://app.example"})
        assert r.status_code == 204 and "DELETE" in r.headers["Access-Control-Allow-Methods"]
        # DELETE: the token is needed, an unknown resource is 404, then 200, then 404
        assert (await http.delete(resource)).status_code == 401
        assert (await http.delete(served.whep() + "/nope", headers=bearer)).status_code == 404
        assert (await http.delete(resource, headers=bearer)).status_code == 200
        assert served.endpoint.sessions == 0 and served.broadcast.viewers == 0
        assert (await http.delete(resource, headers=bearer)).status_code == 404
        await pc.close()
    await no_tasks_left(tasks_before)


async def test_cors_allows_only_the_listed_origins() -> None:
    async with serve_stream(cors_origins=["https://app.example"]) as served, \
            httpx.AsyncClient() as http:
        r = await http.options(served.whep(), headers={"Origin": "https://app.example"})
        assert r.headers["Access-Control-Allow-Origin"] == "https://app.example"
        assert r.headers["Vary"] == "Origin"
        r = await http.options(served.whep(), headers={"Origin": "https://evil.example"})
        assert "Access-Control-Allow-Origin" not in r.headers


async def test_a_viewer_that_leaves_without_delete_is_cleaned_up(
        tasks_before: set[asyncio.Task[Any]]) -> None:
    async with serve_stream() as served:
        client = WhepClient(served.whep(), timeout=5)
        await client.connect()
        assert served.endpoint.sessions == 1
        receiver = client.receiver
        assert receiver is not None
        await receiver.aclose()  # the peer goes away (DTLS close), no DELETE is sent
        await eventually(lambda: served.endpoint.sessions == 0, within=3)
        assert served.broadcast.viewers == 0
        await client.aclose()  # its DELETE now finds nothing: 404 is fine
    await no_tasks_left(tasks_before)


async def test_a_viewer_that_never_connects_is_dropped_after_the_timeout(
        tasks_before: set[asyncio.Task[Any]]) -> None:
    async with serve_stream(connect_timeout=0.5) as served, httpx.AsyncClient() as http:
        pc = await raw_offer()
        r = await post(http, served.whep(), pc.localDescription.sdp)
        assert r.status_code == 201
        await pc.close()  # never applies the answer: ICE never starts
        assert served.endpoint.sessions == 1
        await eventually(lambda: served.endpoint.sessions == 0, within=3)
        assert served.broadcast.viewers == 0
    await no_tasks_left(tasks_before)


async def test_end_stream_and_aclose_end_every_viewer(
        tasks_before: set[asyncio.Task[Any]]) -> None:
    async with serve_stream() as served:
        clients = [WhepClient(served.whep(), timeout=5) for _ in range(2)]
        await asyncio.gather(*(c.connect() for c in clients))
        assert served.endpoint.sessions == 2 and served.broadcast.viewers == 2

        async def count(client: WhepClient) -> int:
            return len([f async for f in client.video_frames()])

        counting = [asyncio.create_task(count(c)) for c in clients]
        await asyncio.sleep(0.3)
        await served.endpoint.end_stream("avatar")
        assert served.endpoint.sessions == 0 and served.broadcast.viewers == 0
        received = await asyncio.wait_for(asyncio.gather(*counting), 3)  # the streams end
        assert all(n > 0 for n in received)
        await served.endpoint.aclose()
        await served.endpoint.aclose()
        async with httpx.AsyncClient() as http:
            pc = await raw_offer()
            r = await post(http, served.whep(), pc.localDescription.sdp)
            assert r.status_code == 503
            await pc.close()
        for client in clients:
            await client.aclose()
    await no_tasks_left(tasks_before)


# -- WhepClient errors ------------------------------------------------------------------------


class FakeWhep:
    """A WHEP server that answers what a test tells it to, and records DELETEs."""

    def __init__(self) -> None:
        self.deletes: list[str] = []
        self.app = web.Application()
        self.app.router.add_post("/status/{code}", self.status)
        self.app.router.add_post("/no-location", self.no_location)
        self.app.router.add_post("/bad-answer", self.bad_answer)
        self.app.router.add_post("/slow", self.slow)
        self.app.router.add_delete("/resource/{id}", self.delete)

    async def status(self, request: web.Request) -> web.Response:
        code = int(request.match_info["code"])
        auth = request.headers.get("Authorization", "")
        return web.Response(status=code, text=f"refused ({auth})",
                            headers={"Retry-After": "2"})

    async def no_location(self, request: web.Request) -> web.Response:
        return web.Response(status=201, text="v=0\r\n", content_type="application/sdp")

    async def bad_answer(self, request: web.Request) -> web.Response:
        return web.Response(status=201, text="v=0\r\nnot an answer\r\n",
                            content_type="application/sdp",
                            headers={"Location": "/resource/r1"})

    async def slow(self, request: web.Request) -> web.Response:
        await asyncio.sleep(1.0)
        return web.Response(status=500)

    async def delete(self, request: web.Request) -> web.Response:
        self.deletes.append(request.match_info["id"])
        return web.Response(status=404)


@pytest.mark.parametrize(("status", "error", "category", "retryable"), [
    (401, AuthenticationError, ErrorCategory.AUTHENTICATION, False),
    (403, AuthenticationError, ErrorCategory.AUTHENTICATION, False),
    (404, NotFoundError, ErrorCategory.NOT_FOUND, False),
    (400, InvalidRequestError, ErrorCategory.INVALID_REQUEST, False),
    (415, InvalidRequestError, ErrorCategory.INVALID_REQUEST, False),
    (503, ServerError, ErrorCategory.SERVER, True),
    (500, ServerError, ErrorCategory.SERVER, True),
])
async def test_client_maps_each_status_to_a_typed_error(
        status: int, error: type[ProviderError], category: ErrorCategory, retryable: bool,
        tasks_before: set[asyncio.Task[Any]]) -> None:
    fake = FakeWhep()
    async with serve_app(fake.app) as base:
        client = WhepClient(f"{base}/status/{status}", token=TOKEN, timeout=3)
        with pytest.raises(error) as raised:
            await client.connect()
        assert type(raised.value) is error
        assert raised.value.status == status and raised.value.provider == "local"
        assert raised.value.category == category and raised.value.retryable is retryable
        # the fake echoes the Authorization header: the token must not leak
        assert TOKEN not in str(raised.value) and TOKEN not in repr(client)
        assert client.resource_url is None and fake.deletes == []
        await client.aclose()
    await no_tasks_left(tasks_before)


async def test_client_needs_a_location_and_a_usable_answer_and_cleans_up(
        tasks_before: set[asyncio.Task[Any]]) -> None:
    fake = FakeWhep()
    async with serve_app(fake.app) as base:
        client = WhepClient(f"{base}/no-location", timeout=3)
        with pytest.raises(ProviderError, match="Location") as raised:
            await client.connect()
        assert type(raised.value) is ProviderError
        await client.aclose()
        client = WhepClient(f"{base}/bad-answer", token=TOKEN, timeout=3)
        with pytest.raises(ProviderError, match="not usable"):
            await client.connect()
        assert fake.deletes == ["r1"]  # the resource it was given is released
        await client.aclose()
        await client.aclose()
        assert fake.deletes == ["r1"]
    await no_tasks_left(tasks_before)


async def test_client_connection_refused_and_timeout(
        tasks_before: set[asyncio.Task[Any]]) -> None:
    fake = FakeWhep()
    async with serve_app(fake.app) as base:
        client = WhepClient(f"{base}/slow", timeout=0.5)
        with pytest.raises(ProviderTimeoutError) as timed_out:
            await client.connect()
        assert timed_out.value.retryable
        await client.aclose()
    client = WhepClient(f"{base}/status/201", timeout=2)  # the server is gone now
    with pytest.raises(ProviderConnectionError):
        await client.connect()
    await client.aclose()
    await no_tasks_left(tasks_before)


async def test_client_with_a_shared_http_client_and_context_manager(
        tasks_before: set[asyncio.Task[Any]]) -> None:
    def authorize(stream: str, token: str | None) -> bool:
        return token == TOKEN

    async with serve_stream(authorize=authorize) as served, httpx.AsyncClient() as http:
        from pydantic import SecretStr

        async with WhepClient(served.whep(), token=SecretStr(TOKEN), http=http) as client:
            assert TOKEN not in repr(client)
            frame = await anext(aiter(client.video_frames()))
            assert frame.width == WIDTH and frame.timestamp == 0.0
            assert served.endpoint.sessions == 1
        assert served.endpoint.sessions == 0  # the DELETE carried the token
        assert not http.is_closed  # not ours to close
        with pytest.raises(SessionStateError):
            client.video_frames()
        with pytest.raises(AuthenticationError):
            await WhepClient(served.whep(), http=http).connect()
    await no_tasks_left(tasks_before)
