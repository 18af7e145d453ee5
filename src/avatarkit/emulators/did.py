"""D-ID Agents streams (v1) emulator: a stateful contract fake of ``https://api.d-id.com`` that
serves real WebRTC media.

Routes (``Authorization: Basic <api key>``, the key used as-is after ``Basic`` as D-ID's own
clients do; ``Bearer <api key>`` is accepted too, as the spec lists it):

* ``POST /agents/{agent_id}/streams`` — 201 ``{id, session_id, jsep: {type: "offer", sdp},
  ice_servers}``. The emulator makes an aiortc peer connection that sends a
  :class:`~avatarkit.emulators._media.TalkingPattern` face as video (plus, with
  ``audio_track``, a silent audio track) and opens the data channel ``JanusDataChannel``, then
  offers. **Billing and a concurrency slot start here**, not when the SDP answer arrives.
* ``POST .../streams/{stream_id}/sdp`` ``{session_id, answer: {type: "answer", sdp}}`` — applies
  the answer; the connection comes up on its own (aiortc gathers every candidate first).
* ``POST .../streams/{stream_id}/ice`` ``{candidate, sdpMid, sdpMLineIndex, session_id}`` —
  recorded and counted (``ice_candidates``), not applied: the answer SDP already carries them.
  A body without a candidate (or an empty one) is the end-of-candidates marker.
* ``POST /audios`` (multipart, field ``audio``) — 201 ``{url: "s3://did-emulator/<id>.wav", id,
  duration, moderation_metadata: {}}``. The file must be a 16-bit PCM WAV the stdlib ``wave``
  module decodes; its rate, channels and duration are recorded (:class:`DIDAudio`).
* ``POST .../streams/{stream_id}`` ``{session_id, script}`` — speak: ``{type: "text", input}``
  (3 to 40000 characters, played as ``seconds_per_text_character`` seconds of a synthetic voice per
  character) or ``{type: "audio", audio_url}`` (a URL this emulator issued). Answers ``{status:
  "started", duration, session_id}``; the clip queues behind the one playing and plays in real
  time: its decoded audio drives the face's mouth, so the received video proves the audio
  reached the renderer.
* ``DELETE .../streams/{stream_id}`` ``{session_id}`` — ends the stream: ``{status: "deleted"}``.
* ``GET /credits`` — ``{credits: [...], remaining, total}`` (an authenticated, unbilled call).
* ``POST /v2/agents/{agent_id}/sessions/join`` — D-ID's worker joins *your* LiveKit room
  (:mod:`avatarkit.emulators.did_livekit`, which lists its own unverified choices); these
  sessions are in ``emu.room_sessions``.

Data-channel messages (text, ``event:json``) as D-ID's own clients parse them:
``stream/started:{"metadata":{"videoId":<clip id>},...}`` when a clip starts,
``stream/done:{...}`` when it ends, ``stream/ready`` after the warm-up (``stream_warmup``).
The client interrupts a fluent stream with ``{"type": "stream/interrupt", "videoId": <the clip
playing>, "timestamp": <ms>}`` (what D-ID's client SDK sends).

A stream ends on ``DELETE``, after ``session_timeout`` seconds without a request on it while
nothing plays (``idle_timeout``), or after ``max_duration`` seconds (``max_duration``): the
meter stops and the peer connection is closed. Errors are always JSON ``{kind, description}``:
401 ``AuthorizationError``, 402 ``InsufficientCreditsError`` (``out_of_credits``), 404
``NotFoundError`` (unknown agent, unknown or ended stream), 400 ``SessionError`` (missing or
wrong ``session_id``) / ``BadRequestError`` (a bad body) / ``InvalidFileSizeError`` /
``InvalidAudioDurationError``, 409 ``NotReadyError`` (speak before the connection is up), 415
``UnsupportedMimeTypeError`` (an upload that is not a WAV), 451 ``TextModerationError`` /
``AudioModerationError``, 500 ``InternalServerError`` ``"Stream Error"`` (speak on a stream
whose connection dropped).

Python control: ``emu.streams`` (:class:`DIDStream`: options, ICE candidates, clips and their
outcomes, data-channel traffic, the mouth opening of every rendered frame), ``emu.audios``
(:class:`DIDAudio`), ``open_sessions`` / ``billed_seconds``, ``faults`` (the shared
:class:`~avatarkit.emulators._base.EmulatorFaults`), ``out_of_credits``, ``banned_words``,
``flag_audio_next(n)`` and ``end_stream(id)``. Over HTTP: the shared ``/_emulator/state``,
``/faults``, ``/faces`` (agents) and ``/reset``, plus ``POST /_emulator/did/account``
``{out_of_credits, banned_words, flag_audio_next}``.

Behaviour this fake chooses where D-ID's contract is unverified (and how to change it):

* 429 is **not** in D-ID's spec: it only happens as an injected fault
  (``faults.rate_limit_next``), with ``Retry-After`` in seconds; its kind is
  ``TooManyRequestsError``.
* The concurrency limit (``max_concurrent``) answers ``concurrency_limit_status`` (402,
  ``InsufficientCreditsError``, by default); D-ID's limit and its status are unknown.
* ``session_id`` is an opaque string that must be echoed verbatim. With ``require_session_id``
  (default) every call after the create must carry it; without, a missing one is accepted (the
  spec marks it optional) but a wrong one never is.
* ``session_timeout`` defaults to ``default_session_timeout`` (300 s); more than 300 is 400. The
  idle timer restarts on every request on the stream and when playback goes idle, and does not
  run while a clip plays. The "needs permission" note of the spec is not emulated.
* ``max_duration`` (3600 s) is the emulator's guess at D-ID's longest stream.
* With ``stream_warmup``, ``stream/ready`` follows the connection after ``warmup_seconds``
  (0.1 s); the warm-up video itself is the idle face. Messages produced before the data channel
  opens are sent once it does.
* A stream the vendor ends (timeout, ``DELETE``, reset) gets no data-channel message: its peer
  connection is closed (a DTLS close the client sees as the connection closing).
* ``stream/started`` / ``stream/done`` carry ``{"metadata": {"videoId": <clip id>},
  "duration": <s>}`` (and ``"played"`` on done). The clip id is not in the speak response (the
  spec has none): clients match clips by order.
* An interrupt (fluent streams only; ``interrupt_types``) stops the clip playing, drops every
  queued clip (``interrupt_clears_queue``; when false, the next queued clip starts), and is
  acknowledged with ``interrupt_ack`` (``stream/done`` with ``"interrupted": true``;
  ``"stream/interrupted"`` is the alternative) unless ``faults.mute_interrupts``. With
  ``interrupt_requires_video_id`` (default) the ``videoId`` must name the clip playing, else the
  message is ignored (a protocol error). An interrupt on a non-fluent stream is ignored and
  recorded as a protocol error.
* The ``drop_channel`` fault closes the peer connection once that many seconds of clips have
  played (mid-clip), without ending the stream: it stays billed until ``DELETE`` or a timeout,
  and a speak on it answers 500 ``Stream Error``.
* Uploads: the spec's 6 MB limit (``max_audio_bytes``) answers 400 ``InvalidFileSizeError``;
  anything but a 16-bit PCM WAV 415 ``UnsupportedMimeTypeError`` (D-ID also takes mp3, m4a, flac
  and mp4; the emulator cannot decode them); an empty one 400 ``InvalidAudioDurationError``.
  Moderation happens at upload: ``flag_audio_next(n)`` refuses the next ``n`` uploads with 451.
* Only audio this emulator issued can be spoken; any other ``audio_url`` is 400 (the emulator
  fetches nothing).
* A text script containing one of ``banned_words`` (case-insensitive) is 451
  ``TextModerationError``. Text is spoken as a synthetic tone, ``seconds_per_text_character``
  (0.06) seconds a character.
* ``compatibility_mode`` selects the video codec as documented (``on`` VP8, ``off`` H264;
  ``auto`` and unset leave aiortc's order, VP8 first).
* ``ice_servers`` defaults to none (a STUN server unreachable from a test machine would stall
  gathering); configure them to test that a client passes them on.

Why one module: the streams API is ordered by the vendor (create with an SDP offer, answer,
ICE, clips, delete) and its routes, the data channel and the clip queue act on one stream
record; the LiveKit ``sessions/join`` mode is in ``did_livekit`` and the shared plumbing in
``_base`` and ``_media``.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import secrets
import time
import wave
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, Literal, get_args

import numpy as np
import soxr
from aiohttp import BodyPartReader, web

from ._base import (
    BadRequest,
    EmulatorServer,
    SessionRecord,
    SpeechPlayback,
    now_iso,
    read_json_object,
)
from ._media import PCM16_SAMPLE_WIDTH, TalkingPattern, talking_pattern_track
from .did_livekit import DIDRoomSessions

if TYPE_CHECKING:
    from aiortc import RTCDataChannel, RTCPeerConnection

__all__ = [
    "DATA_CHANNEL_LABEL",
    "DIDAudio",
    "DIDClip",
    "DIDEmulator",
    "DIDError",
    "DIDStream",
]

#: The data channel D-ID's offer carries (its clients look for this label).
DATA_CHANNEL_LABEL = "JanusDataChannel"
#: The renderer's audio rate: uploads are converted to it before they drive the mouth.
_RENDER_RATE = 16_000
_MAX_SESSION_TIMEOUT = 300
_DEFAULT_SESSION_TIMEOUT = 300.0
_DEFAULT_MAX_DURATION = 3600.0
#: The spec's limit for ``POST /audios``.
_MAX_AUDIO_BYTES = 6 * 1024 * 1024
_TEXT_MIN, _TEXT_MAX = 3, 40_000
_SECONDS_PER_TEXT_CHARACTER = 0.06

_ClipOutcome = Literal["queued", "playing", "done", "interrupted", "abandoned"]
_StreamStatus = Literal["created", "ended"]
_CompatibilityMode = Literal["on", "off", "auto"]
_InterruptAck = Literal["stream/done", "stream/interrupted"]

_COMPATIBILITY_MODES: frozenset[str] = frozenset(get_args(_CompatibilityMode))
_INTERRUPT_ACKS: frozenset[str] = frozenset(get_args(_InterruptAck))
_CODEC_FOR_MODE = {"on": "video/vp8", "off": "video/h264"}
_AUDIO_URL = re.compile(
    r"^(https|s3)://\S+\.(?:m4a|M4A|flac|FLAC|mp3|MP3|mp4|MP4|wav|WAV)([?#][\w./=&#%-]+)?$")
_KIND_BY_STATUS = {
    400: "BadRequestError",
    401: "AuthorizationError",
    402: "InsufficientCreditsError",
    403: "PermissionError",
    404: "NotFoundError",
    409: "NotReadyError",
    415: "UnsupportedMimeTypeError",
    429: "TooManyRequestsError",
    451: "TextModerationError",
}
_UPLOAD_CHUNK = 64 * 1024


class DIDError(BadRequest):
    """A request the emulator refuses with D-ID's ``{kind, description}`` body."""

    def __init__(self, status: int, kind: str, description: str) -> None:
        super().__init__(description, status)
        self.kind = kind


def _kind_for(status: int) -> str:
    if status in _KIND_BY_STATUS:
        return _KIND_BY_STATUS[status]
    return "InternalServerError" if status >= 500 else "BadRequestError"


def _payload(data: Mapping[str, Any]) -> str:
    return json.dumps(data, separators=(",", ":"))


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class DIDAudio:
    """One uploaded audio file: what arrived and what the renderer plays."""

    audio_id: str
    url: str
    filename: str | None
    content_type: str | None
    size: int
    sample_rate: int
    channels: int
    duration: float
    #: the audio as the renderer plays it: mono PCM16 at ``_RENDER_RATE``
    pcm: bytes = field(repr=False)
    created_at: str = field(default_factory=now_iso)

    def upload_response(self) -> dict[str, Any]:
        return {"url": self.url, "id": self.audio_id, "duration": round(self.duration, 3),
                "moderation_metadata": {}}

    def describe(self) -> dict[str, Any]:
        return {"id": self.audio_id, "url": self.url, "filename": self.filename,
                "content_type": self.content_type, "size": self.size,
                "sample_rate": self.sample_rate, "channels": self.channels,
                "duration": self.duration, "created_at": self.created_at}


@dataclass(eq=False)
class DIDClip:
    """One speak request: a clip (D-ID calls it a video) queued on a stream."""

    clip_id: str
    kind: Literal["text", "audio"]
    seconds: float
    audio_id: str | None = None
    text: str | None = None
    outcome: _ClipOutcome = "queued"
    played_seconds: float = 0.0
    pcm: bytes = field(default=b"", repr=False)

    def describe(self) -> dict[str, Any]:
        return {"id": self.clip_id, "kind": self.kind, "seconds": self.seconds,
                "audio_id": self.audio_id, "text": self.text, "outcome": self.outcome,
                "played_seconds": self.played_seconds}


@dataclass(eq=False)
class DIDStream(SessionRecord):
    """One Agents stream: its options, lifecycle, media and what it received and sent.

    Billed from its create; ``session_id`` is D-ID's cookie-like value, the ledger's key is
    ``stream_id``."""

    stream_id: str
    session_id: str
    agent_id: str
    fluent: bool
    stream_warmup: bool
    compatibility_mode: str | None
    session_timeout: float
    pc: RTCPeerConnection = field(repr=False)
    channel: RTCDataChannel = field(repr=False)
    pattern: TalkingPattern = field(repr=False)
    created_at: str = field(default_factory=now_iso)
    status: _StreamStatus = "created"
    deleted: bool = False
    connection_state: str = "new"
    ever_connected: bool = False
    answered: bool = False
    # What the stream received.
    ice_candidates: list[dict[str, Any]] = field(default_factory=list)
    end_of_candidates: int = 0
    speak_requests: int = 0
    clips: list[DIDClip] = field(default_factory=list)
    data_messages_received: list[str] = field(default_factory=list)
    interrupts: int = 0
    useless_interrupts: int = 0
    # What it sent, and media state.
    data_messages_sent: list[str] = field(default_factory=list)
    channel_dropped: bool = False
    audio_seconds_started: float = 0.0
    playing: DIDClip | None = field(default=None, repr=False)
    pending: deque[DIDClip] = field(default_factory=deque, repr=False)
    outbox: list[str] = field(default_factory=list, repr=False)
    playback: SpeechPlayback = field(init=False, repr=False)
    media_closed: bool = field(default=False, repr=False)

    @property
    def connected(self) -> bool:
        return self.connection_state == "connected"

    @property
    def audio_seconds_received(self) -> float:
        """Seconds of uploaded audio spoken on this stream (text clips not counted)."""
        return sum(clip.seconds for clip in self.clips if clip.kind == "audio")

    @property
    def mouth_openings(self) -> list[float]:
        """The mouth opening of every frame the renderer drew, oldest first (0 closed .. 1)."""
        return list(self.pattern.openings)

    def create_response(self, ice_servers: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.stream_id,
            "session_id": self.session_id,
            "jsep": {"type": "offer", "sdp": self.pc.localDescription.sdp},
            "ice_servers": [dict(server) for server in ice_servers],
        }

    def describe(self) -> dict[str, Any]:
        """The emulator's view, for ``GET /_emulator/state`` (no session_id: it is a cookie)."""
        return {
            "id": self.stream_id,
            "agent_id": self.agent_id,
            "fluent": self.fluent,
            "stream_warmup": self.stream_warmup,
            "compatibility_mode": self.compatibility_mode,
            "session_timeout": self.session_timeout,
            "created_at": self.created_at,
            "status": self.status,
            "end_reason": self.end_reason,
            "deleted": self.deleted,
            "billed_seconds": self.billed_seconds,
            "connection_state": self.connection_state,
            "ever_connected": self.ever_connected,
            "answered": self.answered,
            "ice_candidates": len(self.ice_candidates),
            "end_of_candidates": self.end_of_candidates,
            "speak_requests": self.speak_requests,
            "clips": [clip.describe() for clip in self.clips],
            "interrupts": self.interrupts,
            "useless_interrupts": self.useless_interrupts,
            "protocol_errors": list(self.protocol_errors),
            "data_messages_received": list(self.data_messages_received),
            "data_messages_sent": list(self.data_messages_sent),
            "channel_dropped": self.channel_dropped,
            "frames_rendered": self.pattern.frames_rendered,
            "audio_seconds_rendered": self.pattern.audio_seconds_rendered,
        }


@dataclass(frozen=True)
class _CreateOptions:
    fluent: bool
    stream_warmup: bool
    session_timeout: float
    compatibility_mode: str | None


# --------------------------------------------------------------------------------------------
# Request validation
# --------------------------------------------------------------------------------------------


def _bad_request(description: str) -> DIDError:
    return DIDError(400, "BadRequestError", description)


def _optional_bool(body: Mapping[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if not isinstance(value, bool):
        raise _bad_request(f"{key} must be a boolean, got {value!r}")
    return value


def _parse_create(body: Mapping[str, Any], default_timeout: float) -> _CreateOptions:
    timeout = body.get("session_timeout")
    if timeout is None:
        session_timeout = default_timeout
    elif (isinstance(timeout, bool) or not isinstance(timeout, int | float)
          or not 0 < timeout <= _MAX_SESSION_TIMEOUT):
        raise _bad_request(f"session_timeout must be a number of seconds in (0, "
                           f"{_MAX_SESSION_TIMEOUT}], got {timeout!r}")
    else:
        session_timeout = float(timeout)
    mode = body.get("compatibility_mode")
    if mode is not None and mode not in _COMPATIBILITY_MODES:
        raise _bad_request(f"compatibility_mode must be one of {sorted(_COMPATIBILITY_MODES)}, "
                           f"got {mode!r}")
    return _CreateOptions(
        fluent=_optional_bool(body, "fluent"),
        stream_warmup=_optional_bool(body, "stream_warmup"),
        session_timeout=session_timeout,
        compatibility_mode=mode,
    )


def _tone(seconds: float, rate: int = _RENDER_RATE) -> bytes:
    """A synthetic voice: a 190 Hz tone with a 3 Hz syllable envelope (mono PCM16)."""
    count = max(1, round(seconds * rate))
    t = np.arange(rate) / rate
    block = 0.35 * np.sin(2 * np.pi * 190 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
    one_second = np.rint(block * 32767).astype("<i2")
    repeats = -(-count // rate)
    return np.tile(one_second, repeats)[:count].tobytes()


def _decode_wav(data: bytes) -> tuple[int, int, int, bytes]:
    """(sample rate, channels, frames, mono PCM16 at ``_RENDER_RATE``) of a 16-bit PCM WAV."""
    try:
        with wave.open(io.BytesIO(data), "rb") as wav:
            channels, width = wav.getnchannels(), wav.getsampwidth()
            rate, frames = wav.getframerate(), wav.getnframes()
            raw = wav.readframes(frames)
    except (wave.Error, EOFError, ValueError) as exc:
        raise DIDError(415, "UnsupportedMimeTypeError",
                       f"audio: not a WAV file the emulator can decode ({exc}); send 16-bit PCM "
                       "WAV") from None
    if width != PCM16_SAMPLE_WIDTH:
        raise DIDError(415, "UnsupportedMimeTypeError",
                       f"audio: {8 * width}-bit WAV; the emulator decodes 16-bit PCM WAV only")
    if channels < 1 or rate <= 0:
        raise DIDError(415, "UnsupportedMimeTypeError", "audio: WAV header is invalid")
    frame_bytes = PCM16_SAMPLE_WIDTH * channels
    frames = len(raw) // frame_bytes
    if frames == 0:
        raise DIDError(400, "InvalidAudioDurationError", "audio: the file holds no audio")
    samples = np.frombuffer(raw[: frames * frame_bytes], dtype="<i2").reshape(-1, channels)
    mono = samples.mean(axis=1) if channels > 1 else samples[:, 0].astype(np.float64)
    if rate != _RENDER_RATE:
        mono = np.asarray(soxr.resample(mono, rate, _RENDER_RATE), dtype=np.float64)
    pcm = np.clip(np.rint(mono), -32768, 32767).astype("<i2").tobytes()
    return rate, channels, frames, pcm


# --------------------------------------------------------------------------------------------
# The emulator
# --------------------------------------------------------------------------------------------


class DIDEmulator(EmulatorServer):
    """D-ID Agents streams contract fake. ``async with DIDEmulator(agents=[...]) as emu:``.

    ``agents`` are the known agent ids (with ``accept_any_agent`` every id exists). At most
    ``max_concurrent`` billed streams may be open. ``video_size`` and ``fps`` shape the served
    video. See the module docstring for what each unverified choice does.
    """

    name: ClassVar[str] = "did"
    auth_header: ClassVar[str] = "Authorization"

    def __init__(
        self,
        *,
        api_keys: Iterable[str] = ("test-key",),
        agents: Iterable[str] = (),
        accept_any_agent: bool = False,
        max_concurrent: int = 10,
        host: str = "127.0.0.1",
        port: int = 0,
        concurrency_limit_status: int = 402,
        default_session_timeout: float = _DEFAULT_SESSION_TIMEOUT,
        max_duration: float = _DEFAULT_MAX_DURATION,
        require_session_id: bool = True,
        ice_servers: Sequence[Mapping[str, Any]] = (),
        video_size: tuple[int, int] = (256, 256),
        fps: int = 25,
        audio_track: bool = False,
        warmup_seconds: float = 0.1,
        interrupt_types: Iterable[str] = ("stream/interrupt",),
        interrupt_requires_video_id: bool = True,
        interrupt_ack: _InterruptAck = "stream/done",
        interrupt_clears_queue: bool = True,
        banned_words: Iterable[str] = (),
        max_audio_bytes: int = _MAX_AUDIO_BYTES,
        seconds_per_text_character: float = _SECONDS_PER_TEXT_CHARACTER,
        credits_total: float = 100.0,
        out_of_credits: bool = False,
    ) -> None:
        super().__init__(
            api_keys=api_keys, faces=agents, accept_any_face=accept_any_agent, host=host,
            port=port, max_concurrent=max_concurrent,
            concurrency_limit_status=concurrency_limit_status)
        for name, seconds in (("max_duration", max_duration),
                              ("warmup_seconds", warmup_seconds),
                              ("seconds_per_text_character", seconds_per_text_character)):
            if isinstance(seconds, bool) or seconds < 0:
                raise ValueError(f"{name} must be a number of seconds >= 0")
        if not 0 < default_session_timeout <= _MAX_SESSION_TIMEOUT:
            raise ValueError(f"default_session_timeout must be in (0, {_MAX_SESSION_TIMEOUT}]")
        if interrupt_ack not in _INTERRUPT_ACKS:
            raise ValueError(f"interrupt_ack must be one of {sorted(_INTERRUPT_ACKS)}")
        if max_audio_bytes < 1:
            raise ValueError("max_audio_bytes must be a positive integer")
        if isinstance(fps, bool) or not 1 <= fps <= 60:
            raise ValueError("fps must be an integer from 1 to 60")
        TalkingPattern(width=video_size[0], height=video_size[1], fps=fps)  # checks the size
        self.default_session_timeout = float(default_session_timeout)
        self.max_duration = float(max_duration)
        self.require_session_id = require_session_id
        self.ice_servers: list[dict[str, Any]] = [dict(server) for server in ice_servers]
        self.video_size = video_size
        self.fps = fps
        self.audio_track = audio_track
        self.warmup_seconds = float(warmup_seconds)
        self.interrupt_types: frozenset[str] = frozenset(interrupt_types)
        self.interrupt_requires_video_id = interrupt_requires_video_id
        self.interrupt_ack: _InterruptAck = interrupt_ack
        self.interrupt_clears_queue = interrupt_clears_queue
        #: words that make a text script fail moderation (451), case-insensitive
        self.banned_words: set[str] = {word.lower() for word in banned_words}
        self.max_audio_bytes = max_audio_bytes
        self.seconds_per_text_character = float(seconds_per_text_character)
        self.credits_total = float(credits_total)
        #: the account has no credits left: creates answer 402
        self.out_of_credits = out_of_credits
        self._flagged_uploads = 0
        self._streams: dict[str, DIDStream] = {}
        self._audios: dict[str, DIDAudio] = {}
        self._audio_by_url: dict[str, DIDAudio] = {}
        self._closers: set[asyncio.Task[None]] = set()
        self._rooms = DIDRoomSessions(self)

    # -- Python control surface ------------------------------------------------------------

    @property
    def streams(self) -> Mapping[str, DIDStream]:
        """Every stream created since the last reset (ended ones included), by stream id."""
        return MappingProxyType(self._streams)

    @property
    def room_sessions(self) -> DIDRoomSessions:
        """The LiveKit ``sessions/join`` sessions (``.sessions`` by id)."""
        return self._rooms

    @property
    def audios(self) -> Mapping[str, DIDAudio]:
        """Every uploaded audio since the last reset, by id."""
        return MappingProxyType(self._audios)

    @property
    def agents(self) -> frozenset[str]:
        return self.faces

    def add_agent(self, agent_id: str) -> None:
        self.add_face(agent_id)

    def flag_audio_next(self, count: int) -> None:
        """Refuse the next ``count`` uploads with 451 ``AudioModerationError``."""
        if isinstance(count, bool) or count < 0:
            raise ValueError("count must be an integer >= 0")
        self._flagged_uploads = count

    def end_stream(self, stream_id: str, reason: str = "ended") -> None:
        """End a stream as D-ID would on its own (meter stops, peer connection closes)."""
        self._end(self._streams[stream_id], reason)

    def stream_for(self, vendor_session_id: str) -> DIDStream:
        """The stream behind an SDK vendor session id (``"<agent id>/<stream id>"`` or the
        bare stream id)."""
        return self._streams[vendor_session_id.rsplit("/", 1)[-1]]

    # -- lifecycle -------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close every peer connection (meters are left as they are), then stop serving."""
        for stream in self._streams.values():
            self._close_media(stream)
        await self._drain_closers()
        await self._rooms.aclose()
        await super().aclose()

    async def reset(self) -> None:
        await super().reset()
        await self._drain_closers()
        await self._rooms.drain()

    async def _drain_closers(self) -> None:
        while self._closers:
            await asyncio.gather(*list(self._closers), return_exceptions=True)

    # -- EmulatorServer hooks --------------------------------------------------------------

    def _add_vendor_routes(self, app: web.Application) -> None:
        route = self._add_api_route
        base = "/agents/{agent_id}/streams"
        route(app, "POST", base, self._handle_create, operation="create")
        route(app, "POST", base + "/{stream_id}/sdp", self._handle_sdp)
        route(app, "POST", base + "/{stream_id}/ice", self._handle_ice)
        route(app, "POST", base + "/{stream_id}", self._handle_speak)
        route(app, "DELETE", base + "/{stream_id}", self._handle_delete, operation="end")
        route(app, "POST", "/audios", self._handle_upload)
        route(app, "GET", "/credits", self._handle_credits)
        route(app, "POST", "/v2/agents/{agent_id}/sessions/join", self._rooms.handle_join,
              operation="create")
        app.router.add_post("/_emulator/did/account", self._handle_account)

    def _is_authorized(self, request: web.Request) -> bool:
        scheme, _, token = request.headers.get(self.auth_header, "").partition(" ")
        return scheme.lower() in ("basic", "bearer") and token.strip() in self._api_keys

    def _error_response(
        self, status: int, message: str, *, headers: Mapping[str, str] | None = None
    ) -> web.Response:
        return self._did_error(status, _kind_for(status), message, headers=headers)

    def _did_error(self, status: int, kind: str, description: str, *,
                   headers: Mapping[str, str] | None = None) -> web.Response:
        return web.json_response({"kind": kind, "description": description}, status=status,
                                 headers=headers)

    def _refuse(self, exc: BadRequest) -> web.Response:
        kind = exc.kind if isinstance(exc, DIDError) else _kind_for(exc.status)
        return self._did_error(exc.status, kind, str(exc))

    def _vendor_state(self) -> dict[str, Any]:
        return {
            "streams": [stream.describe() for stream in self._streams.values()],
            "room_sessions": self._rooms.describe(),
            "audios": [audio.describe() for audio in self._audios.values()],
            "agents": sorted(self.faces),
            "account": self._account(),
        }

    def _reset_sessions(self) -> None:
        self._end_and_forget(self._streams, self._end, "emulator_reset")
        self._rooms.reset()
        self._audios.clear()
        self._audio_by_url.clear()
        self._flagged_uploads = 0

    # -- helpers -----------------------------------------------------------------------------

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            return await read_json_object(request)
        except ValueError as exc:
            raise _bad_request(str(exc)) from None

    def _find(self, request: web.Request) -> DIDStream:
        stream_id = request.match_info["stream_id"]
        stream = self._streams.get(stream_id)
        if (stream is None or stream.agent_id != request.match_info["agent_id"]
                or stream.status == "ended"):
            raise DIDError(404, "NotFoundError", f"stream {stream_id!r} not found")
        return stream

    def _check_session(self, stream: DIDStream, body: Mapping[str, Any]) -> None:
        given = body.get("session_id")
        if given is None:
            if self.require_session_id:
                raise DIDError(400, "SessionError",
                               "session_id is required: echo the session_id of the stream's "
                               "create response")
            return
        if given != stream.session_id:
            raise DIDError(400, "SessionError", "session_id does not match this stream")

    def _account(self) -> dict[str, Any]:
        remaining = 0.0 if self.out_of_credits else self.credits_total
        return {"out_of_credits": self.out_of_credits, "remaining": remaining,
                "total": self.credits_total, "banned_words": sorted(self.banned_words),
                "flagged_uploads": self._flagged_uploads}

    # -- streams -----------------------------------------------------------------------------

    async def _handle_create(self, request: web.Request) -> web.Response:
        agent_id = request.match_info["agent_id"]
        try:
            options = _parse_create(await self._body(request), self.default_session_timeout)
            if not self.has_face(agent_id):
                raise DIDError(404, "NotFoundError", f"agent {agent_id!r} not found")
            if self.out_of_credits:
                raise DIDError(402, "InsufficientCreditsError", "not enough credits")
            self.check_capacity("maximum concurrent streams reached")
            stream = await self._open(agent_id, options)
        except BadRequest as exc:
            return self._refuse(exc)
        return web.json_response(stream.create_response(self.ice_servers), status=201)

    async def _open(self, agent_id: str, options: _CreateOptions) -> DIDStream:
        from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCRtpSender
        from aiortc.mediastreams import AudioStreamTrack

        config = RTCConfiguration(iceServers=[
            RTCIceServer(urls=server["urls"], username=server.get("username"),
                         credential=server.get("credential")) for server in self.ice_servers])
        pc = RTCPeerConnection(configuration=config)
        try:
            width, height = self.video_size
            pattern = TalkingPattern(width=width, height=height, fps=self.fps,
                                     sample_rate=_RENDER_RATE)
            video = pc.addTransceiver(talking_pattern_track(pattern), direction="sendonly")
            codec = _CODEC_FOR_MODE.get(options.compatibility_mode or "auto")
            if codec is not None:
                codecs = RTCRtpSender.getCapabilities("video").codecs
                video.setCodecPreferences(
                    [c for c in codecs if c.mimeType.lower() == codec]
                    + [c for c in codecs if c.mimeType.lower() == "video/rtx"])
            if self.audio_track:
                pc.addTransceiver(AudioStreamTrack(), direction="sendonly")
            channel = pc.createDataChannel(DATA_CHANNEL_LABEL)
            await pc.setLocalDescription(await pc.createOffer())
            # again: another create may have taken the last slot while this one offered
            self.check_capacity("maximum concurrent streams reached")
        except BaseException:
            await pc.close()
            raise
        stream_id = f"strm_{secrets.token_urlsafe(12)}"
        stream = DIDStream(
            stream_id=stream_id,
            # an opaque, cookie-like value (D-ID's looks like a load-balancer cookie)
            session_id=f"AWSALB={secrets.token_urlsafe(48)}; Path=/",
            agent_id=agent_id,
            fluent=options.fluent,
            stream_warmup=options.stream_warmup,
            compatibility_mode=options.compatibility_mode,
            session_timeout=options.session_timeout,
            pc=pc,
            channel=channel,
            pattern=pattern,
        )
        self._bill(stream, stream_id)
        stream.playback = self._playback(
            on_started=lambda clip_id: self._on_clip_started(stream, clip_id),
            on_stopped=lambda clip_id, played: self._on_clip_stopped(stream, clip_id, played),
        )
        self._streams[stream_id] = stream

        @pc.on("connectionstatechange")
        def on_state() -> None:
            self._on_connection_state(stream, pc.connectionState)

        channel.on("open", lambda: self._flush(stream))
        channel.on("message", lambda message: self._on_data(stream, message))
        self._end_after(stream, "max_duration", self.max_duration, self._end)
        self._touch(stream)
        return stream

    def _on_connection_state(self, stream: DIDStream, state: str) -> None:
        stream.connection_state = state
        if state == "connected" and not stream.ever_connected:
            stream.ever_connected = True
            if stream.stream_warmup:
                self._timers.rearm(stream.timers, "warmup", self.warmup_seconds,
                                   lambda: self._send(stream, "stream/ready"))
        elif state in ("failed", "closed") and stream.status != "ended":
            # The client went away (or the drop fault): the stream stays billed until it is
            # deleted or times out; nothing plays to nobody.
            self._stop_playback(stream, "abandoned")
            self._touch(stream)

    async def _handle_sdp(self, request: web.Request) -> web.Response:
        from aiortc import RTCSessionDescription

        try:
            stream = self._find(request)
            body = await self._body(request)
            self._check_session(stream, body)
            answer = body.get("answer")
            if (not isinstance(answer, dict) or answer.get("type") != "answer"
                    or not isinstance(answer.get("sdp"), str)):
                raise _bad_request('answer must be {"type": "answer", "sdp": <string>}')
            if stream.answered:
                raise DIDError(400, "SessionError", "this stream already has an SDP answer")
            try:
                await stream.pc.setRemoteDescription(
                    RTCSessionDescription(sdp=answer["sdp"], type="answer"))
            except Exception as exc:  # aiortc raises several types for unusable SDP
                raise _bad_request(f"answer.sdp is not a usable SDP answer: {exc}") from None
        except BadRequest as exc:
            return self._refuse(exc)
        stream.answered = True
        self._touch(stream)
        return web.json_response({"status": "success"})

    async def _handle_ice(self, request: web.Request) -> web.Response:
        try:
            stream = self._find(request)
            body = await self._body(request)
            self._check_session(stream, body)
            candidate = body.get("candidate")
            if candidate is not None and not isinstance(candidate, str):
                raise _bad_request("candidate must be a string")
            if candidate:
                mid, index = body.get("sdpMid"), body.get("sdpMLineIndex")
                if mid is not None and not isinstance(mid, str):
                    raise _bad_request("sdpMid must be a string")
                if index is not None and (isinstance(index, bool)
                                          or not isinstance(index, int | float)
                                          or index < 0 or index != int(index)):
                    raise _bad_request("sdpMLineIndex must be an integer >= 0")
                stream.ice_candidates.append({
                    "candidate": candidate, "sdpMid": mid,
                    "sdpMLineIndex": None if index is None else int(index)})
            else:
                stream.end_of_candidates += 1
        except BadRequest as exc:
            return self._refuse(exc)
        self._touch(stream)
        return web.json_response({"status": "success"})

    async def _handle_delete(self, request: web.Request) -> web.Response:
        try:
            stream = self._find(request)
            self._check_session(stream, await self._body(request))
        except BadRequest as exc:
            return self._refuse(exc)
        self._end(stream, "deleted")
        stream.deleted = True
        return web.json_response({"status": "deleted"})

    # -- speaking ----------------------------------------------------------------------------

    async def _handle_speak(self, request: web.Request) -> web.Response:
        try:
            stream = self._find(request)
            body = await self._body(request)
            self._check_session(stream, body)
            clip = self._parse_script(body.get("script"))
            if stream.channel_dropped or stream.connection_state in ("failed", "closed"):
                raise DIDError(500, "InternalServerError", "Stream Error")
            if not stream.connected:
                raise DIDError(409, "NotReadyError",
                               "the stream is not connected yet: post the SDP answer and wait "
                               "for the WebRTC connection")
        except BadRequest as exc:
            return self._refuse(exc)
        stream.speak_requests += 1
        stream.clips.append(clip)
        if stream.playing is None:
            self._start_clip(stream, clip)
        else:
            stream.pending.append(clip)
        self._touch(stream)
        return web.json_response({"status": "started", "duration": round(clip.seconds, 3),
                                  "session_id": stream.session_id})

    def text_seconds(self, text: object) -> float:
        """How long a text script plays; ``DIDError`` for a bad length (400) or a banned word
        (451 ``TextModerationError``). Streams and LiveKit sessions share this check."""
        if not isinstance(text, str) or not _TEXT_MIN <= len(text) <= _TEXT_MAX:
            size = len(text) if isinstance(text, str) else type(text).__name__
            raise _bad_request(f"script.input must be a string of {_TEXT_MIN} to "
                               f"{_TEXT_MAX} characters, got {size}")
        lowered = text.lower()
        if any(word in lowered for word in self.banned_words):
            raise DIDError(451, "TextModerationError",
                           "script.input was refused by text moderation")
        return len(text) * self.seconds_per_text_character

    def _parse_script(self, script: object) -> DIDClip:
        if not isinstance(script, dict):
            raise _bad_request("script is required: {type: 'text', input} or "
                               "{type: 'audio', audio_url}")
        kind = script.get("type")
        clip_id = f"vid_{secrets.token_urlsafe(9)}"
        if kind == "text":
            text = script.get("input")
            seconds = self.text_seconds(text)
            assert isinstance(text, str)
            return DIDClip(clip_id, "text", seconds, text=text, pcm=_tone(seconds))
        if kind == "audio":
            url = script.get("audio_url")
            if not isinstance(url, str) or not _AUDIO_URL.match(url):
                raise _bad_request("script.audio_url must be an https or s3 URL of an m4a, "
                                   "flac, mp3, mp4 or wav file")
            audio = self._audio_by_url.get(url)
            if audio is None:
                raise _bad_request("script.audio_url: the emulator plays only audio uploaded "
                                   "to it (POST /audios)")
            return DIDClip(clip_id, "audio", audio.duration, audio_id=audio.audio_id,
                           pcm=audio.pcm)
        raise _bad_request(f"script.type must be 'text' or 'audio', got {kind!r}")

    def _start_clip(self, stream: DIDStream, clip: DIDClip) -> None:
        stream.playing = clip
        clip.outcome = "playing"
        stream.pattern.feed(clip.pcm)
        threshold = self.faults.drop_channel_after_audio_seconds
        if threshold is not None and not stream.channel_dropped:
            into = threshold - stream.audio_seconds_started
            if into < clip.seconds:
                self._timers.rearm(stream.timers, "drop", max(0.0, into),
                                   lambda: self._drop(stream))
        stream.audio_seconds_started += clip.seconds
        stream.playback.feed(clip.clip_id, clip.seconds, done=True)

    def _on_clip_started(self, stream: DIDStream, clip_id: str) -> None:
        clip = stream.playing
        duration = clip.seconds if clip is not None else None
        self._send(stream, "stream/started:" + _payload(
            {"metadata": {"videoId": clip_id}, "duration": duration}))

    def _on_clip_stopped(self, stream: DIDStream, clip_id: str, played: float) -> None:
        clip = stream.playing
        if clip is None or clip.clip_id != clip_id:
            return
        clip.outcome = "done"
        clip.played_seconds = played
        stream.playing = None
        self._timers.disarm(stream.timers, "drop")
        self._send(stream, "stream/done:" + _payload(
            {"metadata": {"videoId": clip_id}, "duration": clip.seconds,
             "played": round(played, 3)}))
        if stream.pending:
            self._start_clip(stream, stream.pending.popleft())
        else:
            self._touch(stream)

    def _stop_playback(self, stream: DIDStream, outcome: _ClipOutcome) -> None:
        """Stop the clip playing and drop the queue, without any data-channel message."""
        stream.playback.stop_silently()
        stream.pattern.clear()
        self._timers.disarm(stream.timers, "drop")
        for clip in (stream.playing, *stream.pending):
            if clip is not None:
                clip.outcome = outcome
        stream.playing = None
        stream.pending.clear()

    # -- the data channel --------------------------------------------------------------------

    def _send(self, stream: DIDStream, text: str) -> None:
        if stream.media_closed:
            return
        stream.data_messages_sent.append(text)
        if stream.channel.readyState == "open":
            stream.channel.send(text)
        else:  # connecting: sent once it opens
            stream.outbox.append(text)

    def _flush(self, stream: DIDStream) -> None:
        outbox, stream.outbox = stream.outbox, []
        for text in outbox:
            if stream.channel.readyState == "open":
                stream.channel.send(text)

    def _on_data(self, stream: DIDStream, message: str | bytes) -> None:
        text = message if isinstance(message, str) else message.decode("utf-8", "replace")
        stream.data_messages_received.append(text)
        if stream.status == "ended":
            return
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None
        kind = parsed.get("type") if isinstance(parsed, dict) else None
        if kind not in self.interrupt_types:
            stream.protocol_errors.append(f"unknown data-channel message {text[:80]!r}")
            return
        assert isinstance(parsed, dict)
        self._on_interrupt(stream, parsed)

    def _on_interrupt(self, stream: DIDStream, message: Mapping[str, Any]) -> None:
        stream.interrupts += 1
        if not stream.fluent:
            stream.useless_interrupts += 1
            stream.protocol_errors.append(
                "interrupt on a non-fluent stream ignored: D-ID interrupts fluent streams only")
            return
        playing = stream.playing
        if playing is None:
            stream.useless_interrupts += 1
            return
        video_id = message.get("videoId")
        if self.interrupt_requires_video_id and video_id != playing.clip_id:
            stream.useless_interrupts += 1
            stream.protocol_errors.append(
                f"interrupt for videoId {video_id!r} ignored: {playing.clip_id!r} is playing")
            return
        stopped = stream.playback.interrupt()
        played = stopped[1] if stopped is not None else 0.0
        queued = list(stream.pending)
        stream.pending.clear()
        self._stop_playback(stream, "interrupted")
        playing.played_seconds = played
        if not self.faults.mute_interrupts:
            self._send(stream, f"{self.interrupt_ack}:" + _payload(
                {"metadata": {"videoId": playing.clip_id}, "duration": playing.seconds,
                 "played": round(played, 3), "interrupted": True}))
        if self.interrupt_clears_queue:
            for clip in queued:
                clip.outcome = "interrupted"
        elif queued:  # only the clip playing stops; the next one starts
            stream.pending.extend(queued[1:])
            self._start_clip(stream, queued[0])
        self._touch(stream)

    # -- timers, faults and ending -------------------------------------------------------------

    def _touch(self, stream: DIDStream) -> None:
        """Activity: the idle timer starts over (and does not run while a clip plays)."""
        if stream.status == "ended":
            return
        if stream.playing is not None:
            self._timers.disarm(stream.timers, "idle_timeout")
        else:
            self._end_after(stream, "idle_timeout", stream.session_timeout, self._end)

    def _drop(self, stream: DIDStream) -> None:
        """The drop fault: the peer connection dies mid-clip; the stream stays billed."""
        if stream.status == "ended" or stream.channel_dropped:
            return
        stream.channel_dropped = True
        self._stop_playback(stream, "abandoned")
        self._close_media(stream)
        self._touch(stream)

    def _end(self, stream: DIDStream, reason: str) -> None:
        if stream.status == "ended":
            return
        stream.status = "ended"
        self._stop_session(stream, reason)
        self._stop_playback(stream, "abandoned")  # silences the playback too
        self._close_media(stream)

    def _close_media(self, stream: DIDStream) -> None:
        if stream.media_closed:
            return
        stream.media_closed = True
        task = asyncio.get_running_loop().create_task(stream.pc.close())
        self._closers.add(task)
        task.add_done_callback(self._closers.discard)

    # -- audio uploads and the account ---------------------------------------------------------

    async def _handle_upload(self, request: web.Request) -> web.Response:
        try:
            audio = await self._receive_audio(request)
        except BadRequest as exc:
            return self._refuse(exc)
        except ConnectionResetError:  # the client gave up mid-upload: nothing was stored
            return self._did_error(400, "BadRequestError", "the upload was interrupted")
        return web.json_response(audio.upload_response(), status=201)

    async def _receive_audio(self, request: web.Request) -> DIDAudio:
        if not request.content_type.startswith("multipart/"):
            raise _bad_request("send the audio as multipart/form-data, the file in field 'audio'")
        try:
            reader = await request.multipart()
        except (ValueError, AssertionError) as exc:
            raise _bad_request(f"unreadable multipart body: {exc}") from None
        data: bytes | None = None
        filename: str | None = None
        content_type: str | None = None
        size = 0
        async for part in reader:
            if not isinstance(part, BodyPartReader):
                continue
            if part.name != "audio" or data is not None:
                await part.release()
                continue
            chunks: list[bytes] = []
            # Read it all (a client still sending would see a reset), keep up to the limit.
            while chunk := await part.read_chunk(_UPLOAD_CHUNK):
                size += len(chunk)
                if size <= self.max_audio_bytes:
                    chunks.append(chunk)
            data = b"".join(chunks)
            filename = part.filename
            content_type = part.headers.get("Content-Type")
        if data is None:
            raise _bad_request("audio is required: the file in multipart field 'audio'")
        if size > self.max_audio_bytes:
            raise DIDError(400, "InvalidFileSizeError",
                           f"audio: the file is {size} bytes; the limit is "
                           f"{self.max_audio_bytes} bytes")
        if self._flagged_uploads > 0:
            self._flagged_uploads -= 1
            raise DIDError(451, "AudioModerationError", "audio was refused by moderation")
        rate, channels, frames, pcm = _decode_wav(data)
        audio_id = f"aud_{secrets.token_urlsafe(12)}"
        audio = DIDAudio(
            audio_id=audio_id, url=f"s3://did-emulator/{audio_id}.wav", filename=filename,
            content_type=content_type, size=size, sample_rate=rate, channels=channels,
            duration=frames / rate, pcm=pcm)
        self._audios[audio_id] = audio
        self._audio_by_url[audio.url] = audio
        return audio

    async def _handle_credits(self, request: web.Request) -> web.Response:
        account = self._account()
        now = time.time()
        credit = {
            "owner_id": "emulator",
            "created_at": now_iso(),
            "modified_at": now_iso(),
            "remaining": account["remaining"],
            "total": account["total"],
            "expire_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + 30 * 86400)),
        }
        return web.json_response({"credits": [credit], "remaining": account["remaining"],
                                  "total": account["total"]})

    async def _handle_account(self, request: web.Request) -> web.Response:
        """Control API: ``{"out_of_credits": bool, "banned_words": [str], "flag_audio_next":
        int}`` (each optional; validated before anything is applied)."""
        try:
            body = await read_json_object(request)
            known = {"out_of_credits", "banned_words", "flag_audio_next"}
            if unknown := sorted(set(body) - known):
                raise ValueError(f"unknown key(s) {unknown}; known: {sorted(known)}")
            out_of_credits = body.get("out_of_credits", self.out_of_credits)
            if not isinstance(out_of_credits, bool):
                raise ValueError("out_of_credits must be a boolean")
            words = body.get("banned_words", sorted(self.banned_words))
            if not isinstance(words, list) or not all(isinstance(w, str) and w for w in words):
                raise ValueError("banned_words must be a list of non-empty strings")
            flagged = body.get("flag_audio_next", self._flagged_uploads)
            if isinstance(flagged, bool) or not isinstance(flagged, int) or flagged < 0:
                raise ValueError("flag_audio_next must be an integer >= 0")
        except ValueError as exc:
            return web.json_response({"error": "invalid body", "message": str(exc)}, status=400)
        self.out_of_credits = out_of_credits
        self.banned_words = {word.lower() for word in words}
        self._flagged_uploads = flagged
        return web.json_response(self._account())
