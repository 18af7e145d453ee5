"""WebRTC egress for the local engine: tracks, a WHEP server, a WHEP client and a viewer page.

A lip-sync engine's runner yields :class:`~avatarkit.media.AudioVideoFrame` values (the local
engine's :class:`~avatarkit.local_engine.runner.RunnerFrame`): one picture and exactly the
audio it covers, under one timestamp. This module gets them to viewers:

* :class:`AvatarBroadcast` fans one runner's output out to any number of viewers. Whoever
  drains ``runner.frames()`` calls :meth:`AvatarBroadcast.publish` (synchronous, never
  blocks); each viewer gets its own pair of aiortc tracks (:class:`ViewerTracks`) fed from
  bounded queues: a slow viewer loses its *oldest* frames, audio and video alike, never memory,
  and never slows the runner or the other viewers.
* :class:`WhepEndpoint` serves WHEP (WebRTC-HTTP Egress Protocol, draft-ietf-wish-whep, whose
  HTTP rules are those of WHIP, RFC 9725) on an aiohttp application: one endpoint per stream
  id, one resource per viewer.
* :class:`WhepClient` receives a WHEP stream into this process (the SDK uses it for a remote
  engine), built on :class:`~avatarkit.transport.receiver.WebRTCReceiver`.
* :func:`add_viewer_routes` serves ``viewer.html``: a dependency-free page that verifies the
  signed disclosure notice with WebCrypto, shows it, and plays the stream over WHEP.

A/V sync. A frame's picture and audio are queued for a viewer in the same :meth:`publish`
call and stamped from the same timestamp, rebased so that the viewer's first frame has pts 0
on both tracks: video ``round(t * 90000)`` in 1/90000, audio in samples at the runner's rate.
aiortc turns both into RTP timestamps and its RTCP sender reports tie them to one wall clock,
which is what a browser synchronises on.

Audio frame size. aiortc's Opus encoder resamples to 48 kHz and cuts 20 ms packets, but it
sends *every* packet produced from one input frame under the same RTP timestamp: a 40 ms frame
(640 samples at 16 kHz / 25 fps, what the runner produces) becomes two packets with one
timestamp, which receivers treat as a duplicate or a glitch. The audio track therefore
re-chunks the runner's audio into exactly 20 ms frames (one Opus packet each); a remainder
(frame rates whose audio is not a multiple of 20 ms) is carried into the next frame.

Choices this module makes where WHEP leaves room:

* no trickle ICE and no ICE restart: the answer carries every candidate (aiortc gathers them
  all before it returns a description), and PATCH is answered 405;
* ``Location`` is an absolute path (``/whep/<stream>/<resource>``), resource ids are random
  (128 bits), so a resource URL is not guessable; when an ``authorize`` callback is given, DELETE
  needs the same bearer token as the POST;
* a full broadcast answers 503 with ``Retry-After: 5``; a stream that does not resolve, or
  whose broadcast is closed, 404;
* a viewer whose connection fails or is closed by the peer is cleaned up (resource removed,
  tracks unsubscribed), as is one that has not connected ``connect_timeout`` seconds after its
  answer; a vanished peer is detected by ICE consent freshness (about 30 s in aiortc);
* ICE servers are used by the server's peer connections only (no ``Link`` headers).

Needs the ``webrtc`` and ``emulators`` extras (aiortc, PyAV, aiohttp); ``import avatarkit``
does not import this module.

Why one module: the broadcast, its tracks, the WHEP endpoint and the WHEP client share
one timing model (the A/V sync and 20 ms audio framing described above) and one set of
aiortc objects; keeping them together keeps that model in one place. The receive-only peer
is :mod:`avatarkit.transport.receiver`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import importlib.resources
import json
import logging
import secrets
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import urljoin

import av
import httpx
import numpy as np
from aiohttp import web
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from numpy.typing import NDArray
from pydantic import SecretStr

from ..errors import (
    AuthenticationError,
    InvalidRequestError,
    MediaFormatError,
    NotFoundError,
    ProviderConnectionError,
    ProviderError,
    ProviderTimeoutError,
    RateLimitError,
    ServerError,
    SessionStateError,
)
from ..media import AudioVideoFrame, VideoFrame
from .receiver import WebRTCReceiver

__all__ = [
    "PROVIDER",
    "AvatarBroadcast",
    "BroadcastFull",
    "ViewerConfig",
    "ViewerTracks",
    "WhepClient",
    "WhepEndpoint",
    "add_viewer_routes",
    "viewer_page",
]

logger = logging.getLogger("avatarkit.transport.webrtc")

PROVIDER = "local"
_VIDEO_CLOCK = 90_000
#: Audio frames handed to aiortc last this long: one Opus packet each (see the module doc).
_AUDIO_PTIME = 0.020
_SDP = "application/sdp"
_VIDEO_TIME_BASE = fractions.Fraction(1, _VIDEO_CLOCK)
#: what aiortc raises for an offer it cannot parse or use (answered 400, anything else 500)
_SDP_ERRORS = (ValueError, KeyError, IndexError, TypeError, AttributeError)


class BroadcastFull(SessionStateError):
    """:meth:`AvatarBroadcast.subscribe` was called with ``max_viewers`` viewers already
    subscribed. ``max_viewers`` is the limit."""

    def __init__(self, message: str, *, max_viewers: int) -> None:
        self.max_viewers = max_viewers
        super().__init__(message)


# -- tracks -----------------------------------------------------------------------------------


class _ViewerQueue:
    """One viewer's bounded queues: video frames and the 20 ms audio frames cut from them,
    tagged with the publish they came from so that an overflow drops both together."""

    def __init__(self, *, sample_rate: int, max_frames: int) -> None:
        self.sample_rate = sample_rate
        self.chunk = round(sample_rate * _AUDIO_PTIME)
        self.max_frames = max_frames
        self.video: deque[tuple[int, int, NDArray[np.uint8]]] = deque()
        self.audio: deque[tuple[int, int, NDArray[np.int16]]] = deque()
        self.video_wake = asyncio.Event()
        self.audio_wake = asyncio.Event()
        self.base: float | None = None
        self.carry: NDArray[np.int16] = np.zeros(0, np.int16)
        self.carry_pts = 0
        self.seq = 0
        self.dropped = 0
        self.closed = False

    def put(self, frame: AudioVideoFrame) -> None:
        if self.closed:
            return
        if self.base is None:
            self.base = frame.timestamp
        rel = max(0.0, frame.timestamp - self.base)
        self.seq += 1
        seq = self.seq
        self.video.append((seq, round(rel * _VIDEO_CLOCK), frame.video.data))
        if not self.carry.size:
            self.carry_pts = round(rel * self.sample_rate)
        samples = frame.audio.samples.reshape(-1)
        buf = np.concatenate((self.carry, samples)) if self.carry.size else samples
        start = 0
        while len(buf) - start >= self.chunk:
            self.audio.append((seq, self.carry_pts, buf[start:start + self.chunk]))
            self.carry_pts += self.chunk
            start += self.chunk
        self.carry = np.array(buf[start:], dtype=np.int16)
        while len(self.video) > self.max_frames:
            dropped_seq = self.video.popleft()[0]
            self.dropped += 1
            while self.audio and self.audio[0][0] <= dropped_seq:
                self.audio.popleft()
        # audio read by nobody (an offer without audio) must not grow without bound either
        audio_cap = self.max_frames * (len(samples) // self.chunk + 2)
        while len(self.audio) > audio_cap:
            self.audio.popleft()
        self.video_wake.set()
        self.audio_wake.set()

    def close(self) -> None:
        self.closed = True
        self.video.clear()
        self.audio.clear()
        self.video_wake.set()
        self.audio_wake.set()


_Item = TypeVar("_Item")


async def _next_item(track: MediaStreamTrack, queue: _ViewerQueue, items: deque[_Item],
                     wake: asyncio.Event) -> _Item:
    """The next queued item of one of a viewer's tracks; ``MediaStreamError`` (which ends
    the track for aiortc) once the viewer's queue closed or the track stopped."""
    while not items:
        if queue.closed or track.readyState != "live":
            raise MediaStreamError
        wake.clear()
        await wake.wait()
    if queue.closed or track.readyState != "live":
        raise MediaStreamError
    return items.popleft()


class _VideoTrack(MediaStreamTrack):
    kind = "video"

    def __init__(self, queue: _ViewerQueue) -> None:
        super().__init__()
        self._queue = queue

    async def recv(self) -> av.VideoFrame:
        _, pts, data = await _next_item(self, self._queue, self._queue.video,
                                        self._queue.video_wake)
        frame = av.VideoFrame.from_ndarray(data, format="rgb24")
        frame.pts = pts
        frame.time_base = _VIDEO_TIME_BASE
        return frame

    def stop(self) -> None:
        super().stop()
        self._queue.video_wake.set()


class _AudioTrack(MediaStreamTrack):
    kind = "audio"

    def __init__(self, queue: _ViewerQueue) -> None:
        super().__init__()
        self._queue = queue
        self._time_base = fractions.Fraction(1, queue.sample_rate)

    async def recv(self) -> av.AudioFrame:
        queue = self._queue
        _, pts, samples = await _next_item(self, queue, queue.audio, queue.audio_wake)
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = queue.sample_rate
        frame.pts = pts
        frame.time_base = self._time_base
        return frame

    def stop(self) -> None:
        super().stop()
        self._queue.audio_wake.set()


def _nothing() -> None:
    return None


@dataclass
class ViewerTracks:
    """One viewer's tracks: ``video`` yields ``av.VideoFrame`` (rgb24, pts in 1/90000),
    ``audio`` yields 20 ms ``av.AudioFrame`` (s16 mono at the broadcast's rate, pts in
    samples). Both start at pts 0 with the viewer's first frame. :meth:`stop` unsubscribes."""

    video: MediaStreamTrack
    audio: MediaStreamTrack
    _unsubscribe: Callable[[], None] = field(default=_nothing, repr=False, compare=False)

    def stop(self) -> None:
        """Unsubscribe and end both tracks (their ``recv`` raises ``MediaStreamError``).
        Idempotent."""
        self._unsubscribe()
        self.video.stop()
        self.audio.stop()

    @property
    def frames_dropped(self) -> int:
        """Frames this viewer lost because it did not keep up (oldest first)."""
        queue = getattr(self.video, "_queue", None)
        return queue.dropped if isinstance(queue, _ViewerQueue) else 0


class AvatarBroadcast:
    """Fans one runner's output out to any number of viewers (each gets its own pair of
    aiortc tracks).

    ``publish`` is called (on the event loop) by whoever drains ``runner.frames()``; frames are
    checked against ``width`` x ``height`` and ``sample_rate``. Each viewer queues at most
    ``max_queued_frames`` frames (about 0.4 s at 25 fps by default) and loses its oldest ones
    beyond that.
    """

    def __init__(self, *, fps: float, sample_rate: int, width: int, height: int,
                 max_viewers: int = 16, max_queued_frames: int = 10) -> None:
        if max_viewers < 1:
            raise ValueError("max_viewers must be at least 1")
        if max_queued_frames < 1:
            raise ValueError("max_queued_frames must be at least 1")
        if fps <= 0:
            raise ValueError("fps must be positive")
        self.fps = float(fps)
        self.sample_rate = int(sample_rate)
        self.width = int(width)
        self.height = int(height)
        self.max_viewers = max_viewers
        self.max_queued_frames = max_queued_frames
        self._queues: dict[int, tuple[_ViewerQueue, ViewerTracks]] = {}
        self._next_id = 0
        self._published = 0
        self._closed = False

    def publish(self, frame: AudioVideoFrame) -> None:
        """Queue ``frame`` for every viewer. Never blocks; a no-op once closed (a drain task
        racing :meth:`aclose` is not an error)."""
        if self._closed:
            return
        data = frame.video.data
        if data.shape[:2] != (self.height, self.width):
            raise MediaFormatError(f"frame is {data.shape[1]}x{data.shape[0]}",
                                   field="frame.video",
                                   expected=f"{self.width}x{self.height} as the broadcast says")
        audio = frame.audio
        if audio.sample_rate != self.sample_rate or audio.channels != 1:
            raise MediaFormatError(f"audio is {audio.sample_rate} Hz, {audio.channels} ch",
                                   field="frame.audio",
                                   expected=f"{self.sample_rate} Hz mono as the broadcast says")
        self._published += 1
        for queue, _ in self._queues.values():
            queue.put(frame)

    def subscribe(self) -> ViewerTracks:
        """A new viewer's tracks. Raises :class:`BroadcastFull` (a ``SessionStateError``) with
        ``max_viewers`` viewers subscribed, ``SessionStateError`` once closed."""
        if self._closed:
            raise SessionStateError("the broadcast is closed")
        if len(self._queues) >= self.max_viewers:
            raise BroadcastFull(f"the broadcast already has its {self.max_viewers} viewers",
                                max_viewers=self.max_viewers)
        key = self._next_id
        self._next_id += 1
        queue = _ViewerQueue(sample_rate=self.sample_rate, max_frames=self.max_queued_frames)

        def unsubscribe() -> None:
            entry = self._queues.pop(key, None)
            if entry is not None:
                entry[0].close()

        tracks = ViewerTracks(video=_VideoTrack(queue), audio=_AudioTrack(queue),
                              _unsubscribe=unsubscribe)
        self._queues[key] = (queue, tracks)
        return tracks

    @property
    def viewers(self) -> int:
        return len(self._queues)

    @property
    def frames_published(self) -> int:
        return self._published

    @property
    def closed(self) -> bool:
        return self._closed

    async def aclose(self) -> None:
        """End every viewer's tracks (their ``recv`` raises ``MediaStreamError``); later
        :meth:`subscribe` calls fail. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for _, tracks in list(self._queues.values()):
            tracks.stop()
        self._queues.clear()


# -- WHEP server ------------------------------------------------------------------------------


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def _peer_configuration(ice_servers: Sequence[Mapping[str, Any]]) -> RTCConfiguration:
    """An explicit (possibly empty) server list: aiortc's default would be Google's STUN."""
    servers = []
    for server in ice_servers:
        urls = server["urls"]
        servers.append(RTCIceServer(urls=[urls] if isinstance(urls, str) else list(urls),
                                    username=server.get("username"),
                                    credential=server.get("credential")))
    return RTCConfiguration(iceServers=servers)


@dataclass(eq=False)
class _WhepSession:
    resource_id: str
    stream_id: str
    pc: RTCPeerConnection
    tracks: ViewerTracks
    timer: asyncio.TimerHandle | None = None
    closing: bool = False


class WhepEndpoint:
    """WHEP (draft-ietf-wish-whep, with WHIP's HTTP rules from RFC 9725) on an aiohttp app:
    one endpoint per stream id, one resource per viewer.

    ``resolve(stream_id)`` returns the stream's broadcast (None: 404). ``authorize(stream_id,
    token)`` decides whether a bearer token (None when the request had none) may watch; without
    it every request is allowed. ``cors_origins`` lists the origins allowed to call the
    endpoint from a page (``"*"``: any).
    """

    def __init__(self, resolve: Callable[[str], AvatarBroadcast | None], *,
                 authorize: Callable[[str, str | None], bool] | None = None,
                 ice_servers: Sequence[Mapping[str, Any]] = (),
                 cors_origins: Sequence[str] = ("*",),
                 connect_timeout: float = 30.0) -> None:
        self._resolve = resolve
        self._authorize = authorize
        self._ice_servers = [dict(s) for s in ice_servers]
        self._origins = tuple(cors_origins)
        self._connect_timeout = connect_timeout
        self._sessions: dict[str, _WhepSession] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def add_routes(self, app: web.Application, *, prefix: str = "/whep") -> None:
        """OPTIONS/POST ``{prefix}/{stream_id}``; DELETE/PATCH/OPTIONS
        ``{prefix}/{stream_id}/{resource_id}``."""
        prefix = "/" + prefix.strip("/")
        app.router.add_route("OPTIONS", prefix + "/{stream_id}", self._options_endpoint)
        app.router.add_route("POST", prefix + "/{stream_id}", self._post)
        resource = prefix + "/{stream_id}/{resource_id}"
        app.router.add_route("OPTIONS", resource, self._options_resource)
        app.router.add_route("DELETE", resource, self._delete)
        app.router.add_route("PATCH", resource, self._patch)

    @property
    def sessions(self) -> int:
        """Live viewer resources."""
        return len(self._sessions)

    # -- HTTP ------------------------------------------------------------------------------

    def _cors(self, request: web.Request, headers: dict[str, str]) -> dict[str, str]:
        origin = request.headers.get("Origin")
        if "*" in self._origins:
            headers["Access-Control-Allow-Origin"] = "*"
        elif origin is not None and origin in self._origins:
            headers["Access-Control-Allow-Origin"] = origin
            headers["Vary"] = "Origin"
        headers["Access-Control-Expose-Headers"] = "Location, Retry-After, WWW-Authenticate"
        return headers

    def _text(self, request: web.Request, status: int, text: str,
              headers: Mapping[str, str] | None = None) -> web.Response:
        return web.Response(status=status, text=text,
                            headers=self._cors(request, dict(headers or {})))

    async def _options_endpoint(self, request: web.Request) -> web.Response:
        return web.Response(status=204, headers=self._cors(request, {
            "Access-Control-Allow-Methods": "POST, OPTIONS",
            "Access-Control-Allow-Headers": "Authorization, Content-Type",
            "Access-Control-Max-Age": "600",
            "Accept-Post": _SDP,
            "Allow": "POST, OPTIONS",
        }))

    async def _options_resource(self, request: web.Request) -> web.Response:
        return web.Response(status=204, headers=self._cors(request, {
            "Access-Control-Allow-Methods": "DELETE, OPTIONS",
            "Access-Control-Allow-Headers": "Authorization, Content-Type",
            "Access-Control-Max-Age": "600",
            "Allow": "DELETE, OPTIONS",
        }))

    async def _patch(self, request: web.Request) -> web.Response:
        return self._text(request, 405, "trickle ICE and ICE restarts are not supported",
                          {"Allow": "DELETE, OPTIONS"})

    def _refused(self, request: web.Request, stream_id: str) -> web.Response | None:
        if self._authorize is None:
            return None
        if self._authorize(stream_id, _bearer(request)):
            return None
        logger.info("WHEP %s %s refused: missing or wrong bearer token", request.method,
                    stream_id)
        return self._text(request, 401, "a valid bearer token is required",
                          {"WWW-Authenticate": 'Bearer realm="whep"'})

    async def _post(self, request: web.Request) -> web.Response:
        stream_id = request.match_info["stream_id"]
        if request.content_type != _SDP:
            return self._text(request, 415, f"the body must be an _SDP offer ({_SDP}), got "
                                            f"{request.content_type or 'no content type'}",
                              {"Accept-Post": _SDP})
        refused = self._refused(request, stream_id)
        if refused is not None:
            return refused
        if self._closed:
            return self._text(request, 503, "the server is shutting down",
                              {"Retry-After": "5"})
        broadcast = self._resolve(stream_id)
        if broadcast is None:
            return self._text(request, 404, f"no stream {stream_id[:64]!r}")
        try:
            tracks = broadcast.subscribe()
        except BroadcastFull as exc:
            return self._text(request, 503, f"stream {stream_id!r} has its {exc.max_viewers} "
                                            "viewers already", {"Retry-After": "5"})
        except SessionStateError:
            return self._text(request, 404, f"stream {stream_id!r} has ended")
        offer = await request.text()
        pc = RTCPeerConnection(configuration=_peer_configuration(self._ice_servers))
        answered = False
        try:
            try:
                await pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
            except _SDP_ERRORS as exc:  # what aiortc's parser and checks raise on bad _SDP
                reason = f": {exc}" if str(exc) else f" ({type(exc).__name__})"
                return self._text(request, 400, f"the _SDP offer could not be used{reason}")
            except Exception:
                logger.exception("WHEP POST %s: applying the offer failed", stream_id)
                return self._text(request, 500, "the server could not set up the connection")
            kinds = {t.kind for t in pc.getTransceivers()}
            if not kinds & {"audio", "video"}:
                return self._text(request, 400, "the _SDP offer has no audio or video section")
            if "video" in kinds:
                pc.addTrack(tracks.video)
            if "audio" in kinds:
                pc.addTrack(tracks.audio)
            await pc.setLocalDescription(await pc.createAnswer())
            answer = pc.localDescription.sdp
            if self._closed:
                return self._text(request, 503, "the server is shutting down",
                                  {"Retry-After": "5"})
            answered = True
        finally:
            if not answered:  # whatever went wrong, nothing stays open
                tracks.stop()
                await pc.close()
        session = _WhepSession(secrets.token_urlsafe(16), stream_id, pc, tracks)
        self._sessions[session.resource_id] = session
        self._watch(session)
        location = request.path.rstrip("/") + "/" + session.resource_id
        logger.info("WHEP viewer %s of stream %s created", session.resource_id, stream_id)
        return web.Response(status=201, text=answer, content_type=_SDP,
                            headers=self._cors(request, {"Location": location}))

    async def _delete(self, request: web.Request) -> web.Response:
        stream_id = request.match_info["stream_id"]
        refused = self._refused(request, stream_id)
        if refused is not None:
            return refused
        session = self._sessions.get(request.match_info["resource_id"])
        if session is None or session.stream_id != stream_id:
            return self._text(request, 404, "no such WHEP resource")
        logger.info("WHEP viewer %s of stream %s deleted", session.resource_id, stream_id)
        await self._close_session(session)
        return self._text(request, 200, "")

    # -- sessions --------------------------------------------------------------------------

    def _watch(self, session: _WhepSession) -> None:
        pc = session.pc

        @pc.on("connectionstatechange")
        def on_state() -> None:
            state = pc.connectionState
            if state == "connected":
                if session.timer is not None:
                    session.timer.cancel()
                    session.timer = None
            elif state in ("failed", "closed") and not session.closing:
                logger.info("WHEP viewer %s: connection %s", session.resource_id, state)
                self._spawn(self._close_session(session))

        def not_connected() -> None:
            session.timer = None
            if pc.connectionState != "connected" and not session.closing:
                logger.info("WHEP viewer %s did not connect in %g s", session.resource_id,
                            self._connect_timeout)
                self._spawn(self._close_session(session))

        session.timer = asyncio.get_running_loop().call_later(self._connect_timeout,
                                                              not_connected)

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro, name="avatarkit-whep-close")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _close_session(self, session: _WhepSession) -> None:
        if session.closing:
            return
        session.closing = True
        if session.timer is not None:
            session.timer.cancel()
            session.timer = None
        self._sessions.pop(session.resource_id, None)
        session.tracks.stop()
        try:
            await session.pc.close()
        except Exception:
            logger.exception("WHEP viewer %s: closing the peer connection failed",
                             session.resource_id)

    async def end_stream(self, stream_id: str) -> None:
        """Close every viewer of ``stream_id`` (their peers see the connection close)."""
        await asyncio.gather(*(self._close_session(s) for s in list(self._sessions.values())
                               if s.stream_id == stream_id))

    async def aclose(self) -> None:
        """Close every peer connection. Idempotent; later POSTs get 503."""
        self._closed = True
        await asyncio.gather(*(self._close_session(s) for s in list(self._sessions.values())))
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task


# -- WHEP client ------------------------------------------------------------------------------


class WhepClient:
    """Receives a WHEP stream into this process (the SDK uses it for a remote engine).

    ``async with WhepClient(url, token=...) as client:`` connects (POSTs our receive-only
    offer, applies the answer and waits until media can flow, all within ``timeout``
    seconds); :meth:`video_frames` yields decoded RGB frames; leaving DELETEs the resource and
    closes the peer. Errors are typed (``AuthenticationError``, ``NotFoundError``,
    ``InvalidRequestError``, ``RateLimitError``, ``ServerError``, ``ProviderConnectionError``,
    ``ProviderTimeoutError``, ``ProviderError`` for a malformed answer), with
    ``provider="local"``; the token never appears in them, in logs or in reprs.
    """

    def __init__(self, url: str, *, token: str | SecretStr | None = None,
                 http: httpx.AsyncClient | None = None, timeout: float = 10.0,
                 ice_servers: Sequence[Mapping[str, Any]] = ()) -> None:
        self.url = url
        self._token = SecretStr(token) if isinstance(token, str) else token
        self._http = http
        self._own_http = http is None
        self.timeout = timeout
        self._ice_servers = [dict(s) for s in ice_servers]
        self._receiver: WebRTCReceiver | None = None
        self._resource: str | None = None
        self._lost = asyncio.Event()
        self._connected = False
        self._closed = False

    def __repr__(self) -> str:
        return (f"WhepClient(url={self.url!r}, resource_url={self._resource!r}, "
                f"token={'set' if self._token is not None else None})")

    @property
    def resource_url(self) -> str | None:
        """The WHEP resource (absolute URL) once connected."""
        return self._resource

    @property
    def receiver(self) -> WebRTCReceiver | None:
        """The underlying receive-only peer (frame counters, ``connected`` event)."""
        return self._receiver

    def _headers(self, content_type: str | None = None) -> dict[str, str]:
        headers: dict[str, str] = {}
        if content_type:
            headers["Content-Type"] = content_type
        if self._token is not None:
            headers["Authorization"] = f"Bearer {self._token.get_secret_value()}"
        return headers

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=self.timeout)
        return self._http

    def _scrub(self, text: str) -> str:
        text = text.strip()[:300]
        if self._token is not None:
            secret = self._token.get_secret_value()
            if secret:
                text = text.replace(secret, "***")
        return text

    def _status_error(self, response: httpx.Response) -> ProviderError:
        status = response.status_code
        detail = self._scrub(response.text) or response.reason_phrase
        message = f"WHEP POST {self.url} answered {status}: {detail}"
        if status in (401, 403):
            return AuthenticationError(message, provider=PROVIDER, status=status)
        if status == 404:
            return NotFoundError(message, provider=PROVIDER, status=status)
        if status == 429:
            return RateLimitError(message, provider=PROVIDER, status=status,
                                  retry_after=_retry_after(response))
        if 400 <= status < 500:
            return InvalidRequestError(message, provider=PROVIDER, status=status)
        if status >= 500:
            return ServerError(message, provider=PROVIDER, status=status)
        return ProviderError(f"WHEP POST {self.url} answered {status} (expected 201 Created)",
                             provider=PROVIDER, status=status)

    async def connect(self) -> None:
        """Offer (receive-only video and audio), POST it, require ``201`` with a
        ``Location``, apply the answer, and wait for the connection. A failure leaves nothing
        open: the peer is closed and a created resource DELETEd."""
        if self._closed:
            raise SessionStateError("the WHEP client is closed")
        if self._connected or self._receiver is not None:
            raise SessionStateError("the WHEP client is already connected")
        self._receiver = WebRTCReceiver(provider=PROVIDER, ice_servers=self._ice_servers,
                                        on_closed=lambda _reason: self._lost.set())
        try:
            async with asyncio.timeout(self.timeout):
                await self._negotiate(self._receiver)
        except TimeoutError:
            await self._abort()
            raise ProviderTimeoutError(f"WHEP connection to {self.url} not established in "
                                       f"{self.timeout:g} s", provider=PROVIDER) from None
        except BaseException:
            await self._abort()
            raise
        self._connected = True

    async def _negotiate(self, receiver: WebRTCReceiver) -> None:
        offer = await receiver.offer()
        try:
            response = await self._client().post(self.url, content=offer.encode(),
                                                 headers=self._headers(_SDP))
        except httpx.TimeoutException:
            raise ProviderTimeoutError(f"WHEP POST {self.url} timed out",
                                       provider=PROVIDER) from None
        except httpx.HTTPError as exc:
            raise ProviderConnectionError(f"WHEP POST {self.url} failed: "
                                          f"{type(exc).__name__}: {self._scrub(str(exc))}",
                                          provider=PROVIDER) from None
        location = response.headers.get("Location")
        if response.status_code == 201 and location:
            self._resource = urljoin(str(response.url), location)
        if response.status_code != 201:
            raise self._status_error(response)
        if not location:
            raise ProviderError(f"WHEP POST {self.url} answered 201 without a Location "
                                "header (the resource URL is required)", provider=PROVIDER,
                                status=201)
        content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type != _SDP or not response.text.strip():
            raise ProviderError(f"WHEP POST {self.url} answered 201 without an _SDP answer "
                                f"(content type {content_type or 'none'})", provider=PROVIDER,
                                status=201)
        try:
            await receiver.accept_answer(response.text)
        except ProviderConnectionError as exc:
            raise ProviderError(f"WHEP answer from {self.url} was not usable: {exc.message}",
                                provider=PROVIDER, status=201) from None
        lost = asyncio.ensure_future(self._lost.wait())
        connected = asyncio.ensure_future(receiver.connected.wait())
        try:
            await asyncio.wait({lost, connected}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in (lost, connected):
                waiter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await waiter
        if not receiver.connected.is_set():
            raise ProviderConnectionError(f"the WebRTC connection to {self.url} failed",
                                          provider=PROVIDER)

    async def _abort(self) -> None:
        """Undo a failed connect: DELETE the resource if one was made, close everything."""
        with contextlib.suppress(Exception):
            await asyncio.shield(self._release())

    def video_frames(self) -> AsyncIterator[VideoFrame]:
        """Decoded RGB frames (timestamps from the stream, the first at 0) until the stream
        ends or :meth:`aclose`. Raises ``SessionStateError`` before :meth:`connect`."""
        if self._receiver is None or not self._connected:
            raise SessionStateError("connect() the WHEP client first")
        return self._receiver.frames()

    async def _release(self) -> None:
        """Close the peer, then DELETE the resource: in that order the server's closing of
        its side is never mistaken for a lost connection here."""
        resource, self._resource = self._resource, None
        receiver = self._receiver
        try:
            if receiver is not None:
                await receiver.aclose()
        finally:
            try:
                if resource is not None:
                    await self._delete(resource)
            finally:
                if self._own_http and self._http is not None:
                    http, self._http = self._http, None
                    await http.aclose()

    async def _delete(self, resource: str) -> None:
        try:
            response = await self._client().delete(resource, headers=self._headers(),
                                                    timeout=self.timeout)
        except httpx.HTTPError as exc:
            logger.warning("WHEP DELETE %s failed: %s", resource, type(exc).__name__)
            return
        if response.status_code not in (200, 202, 204, 404):
            logger.warning("WHEP DELETE %s answered %d", resource, response.status_code)

    async def aclose(self) -> None:
        """DELETE the resource (404 is fine), close the peer. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._connected = False
        await asyncio.shield(self._release())

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return float(response.headers.get("Retry-After", ""))
    except ValueError:
        return None


# -- viewer page ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ViewerConfig:
    """What the viewer page of one stream needs (served as its ``config.json``)."""

    #: absolute path or URL of the stream's WHEP endpoint
    whep_url: str
    #: the signed disclosure notice (compact JWS, ``typ`` ``avk-disclosure+jwt``)
    disclosure_notice: str
    #: public keys to verify it (``{"keys": [...]}`` as ``KeySet.to_jwks()`` publishes)
    jwks: Mapping[str, Any]
    #: the viewer's bearer token for the WHEP POST and DELETE, if the server wants one
    token: str | None = None
    #: ICE servers for the browser's peer connection (``[{urls, username, credential}]``)
    ice_servers: Sequence[Mapping[str, Any]] = ()

    def to_json(self) -> dict[str, Any]:
        return {"whep_url": self.whep_url, "disclosure_notice": self.disclosure_notice,
                "jwks": dict(self.jwks), "token": self.token,
                "ice_servers": [dict(s) for s in self.ice_servers]}

    def __repr__(self) -> str:
        return (f"ViewerConfig(whep_url={self.whep_url!r}, "
                f"token={'set' if self.token else None})")


def viewer_page() -> str:
    """The HTML of ``viewer.html`` (plain HTML and inline JavaScript, no external resource)."""
    return (importlib.resources.files("avatarkit.transport") / "viewer.html").read_text("utf-8")


_PAGE_HEADERS = {
    # everything is inline; the page talks only to its own config.json and the WHEP URL
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
                               "style-src 'unsafe-inline'; connect-src *; media-src * blob:; "
                               "img-src data:; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def add_viewer_routes(app: web.Application, config: Callable[[str], ViewerConfig | None], *,
                      prefix: str = "/viewer") -> None:
    """GET ``{prefix}/{stream_id}``: the page; GET ``{prefix}/{stream_id}/config.json``: the
    stream's :class:`ViewerConfig` as JSON (404 when ``config`` returns None)."""
    prefix = "/" + prefix.strip("/")
    page = viewer_page()

    async def get_page(request: web.Request) -> web.Response:
        if config(request.match_info["stream_id"]) is None:
            return web.Response(status=404, text="no such stream")
        return web.Response(text=page, content_type="text/html", charset="utf-8",
                            headers=_PAGE_HEADERS)

    async def get_config(request: web.Request) -> web.Response:
        found = config(request.match_info["stream_id"])
        if found is None:
            return web.Response(status=404, text="no such stream")
        return web.Response(text=json.dumps(found.to_json()), content_type="application/json",
                            headers={"Cache-Control": "no-store",
                                     "X-Content-Type-Options": "nosniff"})

    app.router.add_get(prefix + "/{stream_id}", get_page)
    app.router.add_get(prefix + "/{stream_id}/", get_page)
    app.router.add_get(prefix + "/{stream_id}/config.json", get_config)

