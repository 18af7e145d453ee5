"""Simli emulator: a stateful contract fake of ``https://api.simli.ai`` (compose API).

REST (header ``x-simli-api-key``; FastAPI-style error bodies ``{"detail": ...}``):

* ``POST /compose/token`` — validates the session settings (``faceId`` required; ``apiVersion``
  ``"v2"``; ``handleSilence``; ``maxSessionLength`` default 3600 s; ``maxIdleTime`` default
  300 s; ``startFrame``; ``audioInputFormat`` only ``"pcm16"``; ``sessionAggregator``; the
  deprecated ``model``, accepted with a warning; Trinity-2 extras) and mints a single-use
  ``session_token``. 401 for a bad key, 402 for an account marked out of credits, 400
  ``{"session_token": "FAIL TOKEN", "detail": ...}`` for an unknown face, 422 ``detail[]`` for
  invalid fields. The emulator's ``fail_creates`` / ``rate_limit`` / ``slow`` faults apply here.
* ``GET /compose/ice`` — the ICE servers (``ice_servers``; default none, because unreachable
  STUN servers stall ICE gathering on loopback).
* ``GET /ratelimiter/sessions`` — ``{"currentUsage": <open sessions>}``.

Control (no auth): the shared ``/_emulator/state``, ``faults``, ``faces`` and ``reset``, plus
``POST /_emulator/simli`` (:meth:`SimliEmulator.configure`): ``out_of_credits``,
``start_line`` (a line sent instead of ``START``), ``ice_servers``, ``send`` (a raw line such as
``ERROR: BILLING_ERROR`` or ``RATE ...``, optionally ending the session) and ``end`` (a
vendor-style end with a reason).

WebSockets (``?session_token=...``): ``/compose/webrtc/p2p`` and ``/compose/webrtc/peer_to_peer``
(both spellings exist: the SDK's and the AsyncAPI document's) serve peer-to-peer WebRTC;
``/compose/webrtc/livekit`` serves the LiveKit channel. An unknown, expired or already used token
is refused at the handshake with an HTTP status and a plain-text body.

* P2P: the first message must be the JSON ``{"type": "offer", "sdp": ...}`` within
  ``offer_timeout`` (30 s). The emulator answers ``{"type": "answer", "sdp": ...}`` from a real
  aiortc peer connection that sends a :class:`~avatarkit.emulators._media.TalkingPattern` video
  track (Trinity: 25 fps; 256x256 by default) whose mouth follows the received audio, then sends
  ``START``.
* LiveKit: the emulator sends ``{"livekit_url", "livekit_token"}`` (fake values: no LiveKit
  server runs) and ``{"video_metadata": {"fps", "width", "height"}}``, then ``START``.

After ``START``, binary frames are PCM16 LE 16 kHz mono audio. Each frame's size is recorded
(the SDK sends 6000-byte frames = 187.5 ms; odd sizes and frames above ``max_frame_bytes`` are
recorded in ``protocol_errors`` but still played). Audio is "played" in real time
(:class:`~avatarkit.emulators._base.SpeechPlayback`): ``SPEAK`` when the avatar starts speaking,
``SILENT`` when the queue runs dry. ``SKIP`` drops the queue and answers ``SILENT``. ``DONE``
(text, or the same bytes in a binary frame as the SDK sends it) lets the queue play out, then
ends the session. ``ping`` is answered ``pong``; ``BG_``/``FG_`` text and ``CAM_`` binary
commands are recorded and ignored; ``PLAY_IMMEDIATE`` + audio drops the queue and plays the
audio. An orderly end sends ``ENDFRAME``, ``CLOSING REASON: <reason>`` and ``STOP``, then closes
the WebSocket (1000); reasons are ``IDLE``, ``MAX``, ``DONE`` and ``RESET`` (emulator reset).

Behaviour this fake chooses where the contract is unverified (and how to change it):

* Billing starts when the session starts on the WebSocket (``START`` sent) and stops when it
  ends. A token that is never connected expires after ``token_ttl`` (60 s) without billing.
  ``billing_starts="token"`` meters from the token instead (the token then bills until its
  session ends or it expires).
* The session ends when its WebSocket closes, even without ``DONE`` (``end_on_disconnect``,
  default True: the WebSocket is the session). With ``end_on_disconnect=False`` a closed socket
  leaves the session rendering and billed until its idle or max timer fires, and nothing can
  end it (Simli has no REST end).
* ``DONE`` lets the queued audio play, then ends the session with reason ``DONE`` (the SDK
  closes its socket right after ``DONE``, which ends it earlier, under ``end_on_disconnect``).
* Idle (``maxIdleTime``) means no audio: the timer starts at ``START``, stops while the avatar
  speaks, restarts when it goes silent (or is skipped) and is not reset by anything else. Any
  received audio counts, silence included.
* ``maxSessionLength`` counts from ``START`` and cuts the session mid-sentence.
* ``START`` follows the SDP answer (or the LiveKit join info) after ``start_delay`` (0 s).
* Tokens are single use: a second connection with a used token gets 403; unknown or expired
  tokens get 401.
* A first P2P message that is not an SDP offer, an unusable offer or no offer in time closes the
  socket with 1008 (the session is refused; nothing billed).
* Concurrency: starting a session while ``max_concurrent`` are open sends
  ``RATE LIMIT: concurrent session limit reached`` instead of ``START`` and closes the socket
  (with ``billing_starts="token"`` the token request is refused with
  ``concurrency_limit_status`` instead). ``start_line`` replaces ``START`` the same way (e.g.
  ``"ERROR: BILLING_ERROR"``), for start-time failures.
* ``SKIP`` is acknowledged with ``SILENT`` even when the avatar was silent, unless the
  ``mute_interrupts`` fault is set.
* The reason line reads ``CLOSING REASON: <reason>`` (``closing_prefix="STOP REASON"`` for the
  other spelling clients accept).
* Frames above ``max_frame_bytes`` (6000) are protocol errors but still played; messages sent
  before ``START`` (during ``start_delay``) are protocol errors and dropped.
* The P2P answer sends video only (no audio track); ``audio_track=True`` adds a silent audio
  track in place of Simli's 48 kHz stereo voice.
* ``handleSilence`` is recorded; the video always renders idle frames (as ``true`` does).
* The ``drop_channel`` fault closes the socket with 1011 (``drop_abruptly=True``: the TCP
  connection is aborted, no close frame); the session then ends as any disconnect does.
* ``ERROR: <CODE>`` injected by :meth:`SimliEmulator.send_error` ends the session (billing
  stops) and closes the socket with 1000, without the ``ENDFRAME`` sequence.
* Sessions are keyed by ``session_id``: the first 32 hex digits of SHA-256 of the session
  token (the vendor returns no session id; the token itself is a secret).

Why one module: the token route and the WebSocket (P2P or LiveKit) are the lifecycle of one
session record (minted, connecting, active, ended), and the commands, timers and end sequence on
the socket all move that one state machine; the shared plumbing, the PCM16 checks and the
talking face are in ``_base`` and ``_media``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, Literal, get_args

from aiohttp import WSCloseCode, WSMessage, WSMsgType, web

from ._base import (
    ChannelPeer,
    EmulatorServer,
    ProtocolError,
    SessionRecord,
    SpeechPlayback,
    now_iso,
    read_json_object,
)
from ._base import (
    FastAPIValidationError as _ValidationError,
)
from ._media import TalkingPattern, pcm16_seconds, talking_pattern_track, whole_samples

if TYPE_CHECKING:
    from aiortc import RTCPeerConnection

__all__ = [
    "FRAME_BYTES",
    "LIVEKIT_PATH",
    "P2P_PATHS",
    "RATE_LINE",
    "TOKEN_PATH",
    "BillingStart",
    "ClosingPrefix",
    "SimliEmulator",
    "SimliSessionRecord",
    "session_id_for_token",
]

_SessionStatus = Literal["minted", "connecting", "active", "ended", "expired", "refused"]
_Transport = Literal["p2p", "livekit"]
#: When the meter starts: at ``START`` on the WebSocket, or when the token is minted.
BillingStart = Literal["start", "token"]
#: The line that carries the end reason (both spellings are seen in clients).
ClosingPrefix = Literal["CLOSING REASON", "STOP REASON"]

_SAMPLE_RATE = 16_000
FRAME_BYTES = 6000
_DEFAULT_MAX_SESSION_LENGTH = 3600
_DEFAULT_MAX_IDLE_TIME = 300
TOKEN_PATH = "/compose/token"
P2P_PATHS = ("/compose/webrtc/p2p", "/compose/webrtc/peer_to_peer")
LIVEKIT_PATH = "/compose/webrtc/livekit"
RATE_LINE = "RATE LIMIT: concurrent session limit reached"
#: A close code the vendor uses for a refused session (policy violation).
_REFUSED_CLOSE = WSCloseCode.POLICY_VIOLATION

_CLOSED_TYPES = frozenset({WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED,
                           WSMsgType.ERROR})
_BILLING_STARTS: frozenset[str] = frozenset(get_args(BillingStart))
_CLOSING_PREFIXES: frozenset[str] = frozenset(get_args(ClosingPrefix))
_TRINITY_DIMENSIONS = ("streaming_width", "streaming_height")
_TRINITY_POSITIONS = ("avatar_position_x", "avatar_position_y")
_TRINITY_STRINGS = ("background_id", "foreground_id")


def session_id_for_token(session_token: str) -> str:
    """The id the emulator (and the adapter) give a session: a digest of its secret token."""
    return hashlib.sha256(session_token.encode()).hexdigest()[:32]


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class SimliSessionRecord(SessionRecord):
    """One session: its token request, its lifecycle, and what its WebSocket received and sent.

    Billed from ``START`` (or from the token, with ``billing_starts="token"``). The session
    token, SDPs and LiveKit token are kept out of :meth:`describe` (and reprs).
    """

    session_id: str
    session_token: str = field(repr=False)
    face_id: str
    emotion_id: str | None
    max_session_length: int
    max_idle_time: int
    handle_silence: bool
    api_version: str | None
    start_frame: int
    session_aggregator: str | None
    model: str | None
    extras: dict[str, Any]
    created_at: str = field(default_factory=now_iso)
    status: _SessionStatus = "minted"
    # The WebSocket: which route, and what it received.
    transport: _Transport | None = None
    path: str | None = None
    ws_connections: int = 0
    refused_connections: int = 0
    offer_received: bool = False
    frame_sizes: list[int] = field(default_factory=list)
    audio_seconds_received: float = 0.0
    skips: int = 0
    useless_skips: int = 0
    done_received: bool = False
    play_immediate: int = 0
    camera_commands: int = 0
    asset_commands: list[str] = field(default_factory=list)
    pings: int = 0
    # What it sent (text lines and JSON, in order), and channel state.
    lines_sent: list[str] = field(default_factory=list)
    speak_events: int = 0
    silent_events: int = 0
    channel_dropped: bool = False
    disconnected: bool = False
    livekit_token: str | None = field(default=None, repr=False)
    # Runtime state.
    peer: ChannelPeer | None = field(default=None, repr=False)
    socket_transport: asyncio.BaseTransport | None = field(default=None, repr=False)
    pc: RTCPeerConnection | None = field(default=None, repr=False)
    pattern: TalkingPattern | None = field(default=None, repr=False)
    playback: SpeechPlayback = field(init=False, repr=False)
    burst: int = field(default=0, repr=False)

    @property
    def audio_frames(self) -> int:
        return len(self.frame_sizes)

    @property
    def speaking(self) -> bool:
        return self.playback.speaking_id is not None

    def describe(self) -> dict[str, Any]:
        """The emulator's view, for ``GET /_emulator/state`` (no tokens, no SDPs)."""
        pattern = self.pattern
        return {
            "session_id": self.session_id,
            "face_id": self.face_id,
            "emotion_id": self.emotion_id,
            "max_session_length": self.max_session_length,
            "max_idle_time": self.max_idle_time,
            "handle_silence": self.handle_silence,
            "api_version": self.api_version,
            "start_frame": self.start_frame,
            "session_aggregator": self.session_aggregator,
            "model": self.model,
            "extras": dict(self.extras),
            "created_at": self.created_at,
            "status": self.status,
            "end_reason": self.end_reason,
            "billed_seconds": self.billed_seconds,
            "transport": self.transport,
            "path": self.path,
            "ws_connections": self.ws_connections,
            "refused_connections": self.refused_connections,
            "offer_received": self.offer_received,
            "audio_frames": self.audio_frames,
            "frame_sizes": {str(size): self.frame_sizes.count(size)
                            for size in sorted(set(self.frame_sizes))},
            "audio_seconds_received": self.audio_seconds_received,
            "skips": self.skips,
            "useless_skips": self.useless_skips,
            "done_received": self.done_received,
            "play_immediate": self.play_immediate,
            "camera_commands": self.camera_commands,
            "asset_commands": list(self.asset_commands),
            "pings": self.pings,
            "protocol_errors": list(self.protocol_errors),
            "lines_sent": [line for line in self.lines_sent if not line.startswith("{")],
            "speak_events": self.speak_events,
            "silent_events": self.silent_events,
            "channel_dropped": self.channel_dropped,
            "disconnected": self.disconnected,
            "frames_rendered": pattern.frames_rendered if pattern is not None else 0,
            "audio_seconds_rendered": pattern.audio_seconds_rendered if pattern else 0.0,
        }


@dataclass(frozen=True)
class _TokenRequest:
    face_id: str
    emotion_id: str | None
    max_session_length: int
    max_idle_time: int
    handle_silence: bool
    api_version: str | None
    start_frame: int
    session_aggregator: str | None
    model: str | None
    extras: dict[str, Any]


# --------------------------------------------------------------------------------------------
# Request validation
# --------------------------------------------------------------------------------------------


def _int_field(body: Mapping[str, Any], name: str, default: int, low: int) -> int:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _ValidationError(name, "Input should be a valid integer", "int_type", value)
    if value < low:
        raise _ValidationError(name, f"Input should be greater than or equal to {low}",
                               "greater_than_equal", value)
    return value


def _parse_token_request(body: Mapping[str, Any], *, max_session_length: int,
                         max_idle_time: int) -> _TokenRequest:
    """Validate a token request the way the vendor's FastAPI model would (422 on failure)."""
    face = body.get("faceId")
    if face is None:
        raise _ValidationError("faceId", "Field required", "missing")
    if not isinstance(face, str) or not face.strip():
        raise _ValidationError("faceId", "Input should be a non-empty string", "string_type",
                               face)
    face_id, _, emotion = face.partition("/")
    api_version = body.get("apiVersion")
    if api_version is not None and api_version != "v2":
        raise _ValidationError("apiVersion", "Input should be 'v2'", "literal_error", api_version)
    handle_silence = body.get("handleSilence", True)
    if not isinstance(handle_silence, bool):
        raise _ValidationError("handleSilence", "Input should be a valid boolean", "bool_type",
                               handle_silence)
    audio_format = body.get("audioInputFormat", "pcm16")
    if audio_format != "pcm16":
        raise _ValidationError("audioInputFormat", "Input should be 'pcm16'", "literal_error",
                               audio_format)
    aggregator = body.get("sessionAggregator")
    if aggregator is not None and not isinstance(aggregator, str):
        raise _ValidationError("sessionAggregator", "Input should be a valid string",
                               "string_type", aggregator)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _ValidationError("model", "Input should be a valid string", "string_type", model)
    extras: dict[str, Any] = {}
    for name in _TRINITY_DIMENSIONS:
        if body.get(name) is not None:
            extras[name] = _int_field(body, name, 768, 512)
    for name in _TRINITY_POSITIONS:
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
            raise _ValidationError(name, "Input should be a number between 0 and 1",
                                   "float_type", value)
        extras[name] = float(value)
    for name in _TRINITY_STRINGS:
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            raise _ValidationError(name, "Input should be a valid string", "string_type", value)
        extras[name] = value
    camera = body.get("camera")
    if camera is not None:
        if not isinstance(camera, dict):
            raise _ValidationError("camera", "Input should be an object", "dict_type", camera)
        extras["camera"] = dict(camera)
    return _TokenRequest(
        face_id=face_id,
        emotion_id=emotion or None,
        max_session_length=_int_field(body, "maxSessionLength", max_session_length, 1),
        max_idle_time=_int_field(body, "maxIdleTime", max_idle_time, 1),
        handle_silence=handle_silence,
        api_version=api_version,
        start_frame=_int_field(body, "startFrame", 0, 0),
        session_aggregator=aggregator,
        model=model,
        extras=extras,
    )


def _parse_offer(message: WSMessage) -> str:
    """The SDP of the first P2P message, which must be ``{"type": "offer", "sdp": ...}``."""
    if message.type is not WSMsgType.TEXT:
        raise ProtocolError("the first message must be the JSON SDP offer, got a "
                            f"{message.type.name.lower()} frame")
    try:
        offer = json.loads(message.data)
    except ValueError:
        raise ProtocolError("the first message must be the JSON SDP offer, got text that is "
                            "not JSON") from None
    if not isinstance(offer, dict) or offer.get("type") != "offer":
        raise ProtocolError('the first message must be {"type": "offer", "sdp": ...}')
    sdp = offer.get("sdp")
    if not isinstance(sdp, str) or not sdp.strip():
        raise ProtocolError("the SDP offer has no sdp string")
    return sdp


# --------------------------------------------------------------------------------------------
# The emulator
# --------------------------------------------------------------------------------------------


class SimliEmulator(EmulatorServer):
    """Simli compose API contract fake. ``async with SimliEmulator(faces=[...]) as emu:``.

    ``faces`` are the known face ids (``accept_any_face``: every id exists). See the module
    docstring for what each option controls. Python control surface: :attr:`sessions`,
    :meth:`end_session`, :meth:`send_line`, :meth:`send_error`, :attr:`out_of_credits`,
    :attr:`start_line`, :attr:`ice_servers` and the shared ``faults``; the same over
    ``POST /_emulator/simli`` (see :meth:`configure`).
    """

    name: ClassVar[str] = "simli"
    auth_header: ClassVar[str] = "x-simli-api-key"

    def __init__(
        self,
        *,
        api_keys: Iterable[str] = ("test-key",),
        faces: Iterable[str] = (),
        max_concurrent: int = 10,
        host: str = "127.0.0.1",
        port: int = 0,
        accept_any_face: bool = False,
        ice_servers: Sequence[Mapping[str, Any]] = (),
        token_ttl: float = 60.0,
        offer_timeout: float = 30.0,
        billing_starts: BillingStart = "start",
        end_on_disconnect: bool = True,
        default_max_session_length: int = _DEFAULT_MAX_SESSION_LENGTH,
        default_max_idle_time: int = _DEFAULT_MAX_IDLE_TIME,
        max_frame_bytes: int = FRAME_BYTES,
        closing_prefix: ClosingPrefix = "CLOSING REASON",
        drop_abruptly: bool = False,
        fps: int = 25,
        width: int = 256,
        height: int = 256,
        audio_track: bool = False,
        start_delay: float = 0.0,
        concurrency_limit_status: int = 429,
        livekit_url: str = "wss://simli-emulator.livekit.invalid",
    ) -> None:
        super().__init__(
            api_keys=api_keys, faces=faces, accept_any_face=accept_any_face, host=host,
            port=port, max_concurrent=max_concurrent,
            concurrency_limit_status=concurrency_limit_status)
        for name, seconds in (("token_ttl", token_ttl), ("offer_timeout", offer_timeout)):
            if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds <= 0:
                raise ValueError(f"{name} must be a number of seconds > 0")
        if isinstance(start_delay, bool) or not isinstance(start_delay, int | float) or (
                start_delay < 0):
            raise ValueError("start_delay must be a number of seconds >= 0")
        for name, limit in (
            ("default_max_session_length", default_max_session_length),
            ("default_max_idle_time", default_max_idle_time),
            ("max_frame_bytes", max_frame_bytes),
            ("fps", fps),
        ):
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
                raise ValueError(f"{name} must be a positive integer")
        if billing_starts not in _BILLING_STARTS:
            raise ValueError(f"billing_starts must be one of {sorted(_BILLING_STARTS)}")
        if closing_prefix not in _CLOSING_PREFIXES:
            raise ValueError(f"closing_prefix must be one of {sorted(_CLOSING_PREFIXES)}")
        TalkingPattern(width=width, height=height, fps=fps)  # validates the video size
        self.ice_servers: list[dict[str, Any]] = [dict(server) for server in ice_servers]
        self.token_ttl = float(token_ttl)
        self.offer_timeout = float(offer_timeout)
        self.billing_starts: BillingStart = billing_starts
        self.end_on_disconnect = end_on_disconnect
        self.default_max_session_length = default_max_session_length
        self.default_max_idle_time = default_max_idle_time
        self.max_frame_bytes = max_frame_bytes
        self.closing_prefix: ClosingPrefix = closing_prefix
        self.drop_abruptly = drop_abruptly
        self.fps, self.width, self.height = fps, width, height
        self.audio_track = audio_track
        self.start_delay = float(start_delay)
        self.livekit_url = livekit_url
        #: the account is out of credits: token requests answer 402
        self.out_of_credits = False
        #: a line sent instead of ``START`` (the session is refused), e.g. "ERROR: BILLING_ERROR"
        self.start_line: str | None = None
        self._sessions: dict[str, SimliSessionRecord] = {}
        self._by_token: dict[str, SimliSessionRecord] = {}
        self._background: set[asyncio.Task[None]] = set()

    # -- Python control surface ------------------------------------------------------------

    @property
    def sessions(self) -> Mapping[str, SimliSessionRecord]:
        """Every session minted since the last reset (ended ones included), by session id."""
        return MappingProxyType(self._sessions)

    def end_session(self, session_id: str, reason: str = "MAX") -> None:
        """End a session as the vendor does: ``ENDFRAME``, ``CLOSING REASON: <reason>``,
        ``STOP``, close; the meter stops."""
        self._end(self._sessions[session_id], reason)

    def send_line(self, session_id: str, line: str, *, end: bool = False) -> None:
        """Send a raw text line on a session's WebSocket (e.g. ``"WARNING: slow network"`` or
        ``"RATE LIMIT EXCEEDED"``); with ``end``, the session then ends without the ``ENDFRAME``
        sequence and its socket closes."""
        session = self._sessions[session_id]
        if session.peer is not None and session.status in ("connecting", "active"):
            self._send(session, line)
        if end:
            self._end(session, line, announce=False)

    def send_error(self, session_id: str, code: str) -> None:
        """Send ``ERROR: <code>`` (``INVALID_API_KEY``, ``BILLING_ERROR``...) and end the
        session, as the vendor does on a fatal error."""
        self.send_line(session_id, f"ERROR: {code}", end=True)

    def configure(self, spec: Mapping[str, Any]) -> None:
        """Apply the JSON form of ``POST /_emulator/simli``; ``ValueError`` if invalid.

        Keys: ``out_of_credits`` (bool), ``start_line`` (str or null), ``ice_servers`` (list),
        ``send`` ``{line, end, session_id}`` and ``end`` ``{reason, session_id}`` (without
        ``session_id``: every live session). Everything is validated before anything is done.
        """
        known = {"out_of_credits", "start_line", "ice_servers", "send", "end"}
        if unknown := sorted(set(spec) - known):
            raise ValueError(f"unknown key(s) {unknown}; known: {sorted(known)}")
        if "out_of_credits" in spec and not isinstance(spec["out_of_credits"], bool):
            raise ValueError("out_of_credits must be a boolean")
        start_line = spec.get("start_line")
        if start_line is not None and (not isinstance(start_line, str) or not start_line):
            raise ValueError("start_line must be a non-empty string or null")
        ice = spec.get("ice_servers", [])
        if not isinstance(ice, list) or not all(
            isinstance(server, dict) and server.get("urls") for server in ice
        ):
            raise ValueError("ice_servers must be a list of objects with urls")
        send = spec.get("send")
        targets_send = self._targets(send, "send") if send is not None else []
        if send is not None and (not isinstance(send.get("line"), str) or not send["line"]
                                 or not isinstance(send.get("end", False), bool)):
            raise ValueError("send needs a non-empty string line (and a boolean end)")
        end = spec.get("end")
        targets_end = self._targets(end, "end") if end is not None else []
        if end is not None and (not isinstance(end.get("reason", "MAX"), str)
                                or not end.get("reason", "MAX")):
            raise ValueError("end.reason must be a non-empty string")
        if "out_of_credits" in spec:
            self.out_of_credits = spec["out_of_credits"]
        if "start_line" in spec:
            self.start_line = start_line
        if "ice_servers" in spec:
            self.ice_servers = [dict(server) for server in ice]
        if send is not None:
            for session in targets_send:
                self.send_line(session.session_id, send["line"], end=send.get("end", False))
        if end is not None:
            for session in targets_end:
                self.end_session(session.session_id, end.get("reason", "MAX"))

    def _targets(self, options: object, key: str) -> list[SimliSessionRecord]:
        if not isinstance(options, dict):
            raise ValueError(f"{key} must be a JSON object")
        session_id = options.get("session_id")
        if session_id is None:
            return [s for s in self._sessions.values() if s.status == "active"]
        if session_id not in self._sessions:
            raise ValueError(f"{key}.session_id {session_id!r} is not a known session")
        return [self._sessions[session_id]]

    # -- lifecycle -------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close every peer connection and WebSocket and cancel every timer and task."""
        connections = [s.pc for s in self._sessions.values() if s.pc is not None]
        for session in self._sessions.values():
            session.pc = None
        await asyncio.gather(*(pc.close() for pc in connections), return_exceptions=True)
        await self._drain_background()
        await super().aclose()

    async def reset(self) -> None:
        await super().reset()
        await self._drain_background()
        self.out_of_credits = False
        self.start_line = None

    async def _drain_background(self) -> None:
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- EmulatorServer hooks --------------------------------------------------------------

    def _add_vendor_routes(self, app: web.Application) -> None:
        route = self._add_api_route
        route(app, "POST", TOKEN_PATH, self._handle_token, operation="create")
        route(app, "GET", "/compose/ice", self._handle_ice)
        route(app, "GET", "/ratelimiter/sessions", self._handle_usage)
        for path in P2P_PATHS:
            app.router.add_get(path, self._handle_p2p)
        app.router.add_get(LIVEKIT_PATH, self._handle_livekit)
        app.router.add_post("/_emulator/simli", self._handle_control)

    def _error_response(
        self, status: int, message: str, *, headers: Mapping[str, str] | None = None
    ) -> web.Response:
        return web.json_response({"detail": message}, status=status, headers=headers)

    def _vendor_state(self) -> dict[str, Any]:
        return {
            "sessions": [session.describe() for session in self._sessions.values()],
            "faces": sorted(self.faces),
            "out_of_credits": self.out_of_credits,
            "start_line": self.start_line,
            "ice_servers": len(self.ice_servers),
        }

    def _reset_sessions(self) -> None:
        self._end_and_forget(self._sessions, self._end, "RESET")
        self._by_token.clear()

    # -- REST --------------------------------------------------------------------------------

    async def _handle_token(self, request: web.Request) -> web.Response:
        if self.out_of_credits:
            return self._error_response(402, "BILLING: your account has no credits left")
        try:
            spec = _parse_token_request(
                await read_json_object(request),
                max_session_length=self.default_max_session_length,
                max_idle_time=self.default_max_idle_time)
        except _ValidationError as exc:
            return exc.response()
        except ValueError as exc:
            return self._error_response(400, str(exc))
        if not self.has_face(spec.face_id):
            return web.json_response(
                {"session_token": "FAIL TOKEN", "detail": f"Invalid faceId: {spec.face_id}"},
                status=400)
        if self.billing_starts == "token" and self.at_capacity:
            return self._error_response(self.concurrency_limit_status,
                                        "concurrent session limit reached")
        token = secrets.token_urlsafe(32)
        session = SimliSessionRecord(
            session_id=session_id_for_token(token), session_token=token,
            face_id=spec.face_id, emotion_id=spec.emotion_id,
            max_session_length=spec.max_session_length, max_idle_time=spec.max_idle_time,
            handle_silence=spec.handle_silence, api_version=spec.api_version,
            start_frame=spec.start_frame, session_aggregator=spec.session_aggregator,
            model=spec.model, extras=spec.extras)
        session.playback = self._playback(
            on_started=lambda _burst: self._on_speech_started(session),
            on_stopped=lambda _burst, _played: self._on_speech_stopped(session))
        self._sessions[session.session_id] = session
        self._by_token[token] = session
        if self.billing_starts == "token":
            self._bill(session, session.session_id)
        self._timers.rearm(session.timers, "token_ttl", self.token_ttl,
                           lambda: self._expire(session))
        body: dict[str, Any] = {"session_token": token}
        if spec.model is not None:
            body["warnings"] = ["model is deprecated and ignored: every session runs fasttalk"]
        return web.json_response(body)

    async def _handle_ice(self, request: web.Request) -> web.Response:
        return web.json_response(self.ice_servers)

    async def _handle_usage(self, request: web.Request) -> web.Response:
        return web.json_response({"currentUsage": self.open_sessions})

    async def _handle_control(self, request: web.Request) -> web.Response:
        try:
            self.configure(await read_json_object(request))
        except ValueError as exc:
            return web.json_response({"error": "invalid request", "message": str(exc)},
                                     status=400)
        return web.json_response(self._vendor_state())

    def _expire(self, session: SimliSessionRecord) -> None:
        if session.status == "minted":
            session.status = "expired"
            self._stop_session(session, "token_expired")  # the meter keeps the short reason
            session.end_reason = "token expired unused"

    # -- the WebSocket -------------------------------------------------------------------------

    def _claim(self, request: web.Request) -> SimliSessionRecord | web.Response:
        """The session of the request's token, or the plain-text handshake refusal."""
        token = request.query.get("session_token", "")
        session = self._by_token.get(token) if token else None
        if session is None:
            return web.Response(status=401, text="Invalid session token")
        if session.status == "expired":
            session.refused_connections += 1
            return web.Response(status=401, text="Session token expired")
        if session.status != "minted":
            session.refused_connections += 1
            return web.Response(status=403, text="Session token already used")
        return session

    async def _handle_p2p(self, request: web.Request) -> web.StreamResponse:
        return await self._serve_socket(request, "p2p")

    async def _handle_livekit(self, request: web.Request) -> web.StreamResponse:
        return await self._serve_socket(request, "livekit")

    async def _serve_socket(self, request: web.Request,
                            transport: _Transport) -> web.StreamResponse:
        claimed = self._claim(request)
        if isinstance(claimed, web.Response):
            return claimed
        session = claimed
        session.status = "connecting"
        session.transport, session.path = transport, request.path
        session.ws_connections += 1
        self._timers.disarm(session.timers, "token_ttl")
        async with self._open_channel(request) as peer:
            session.peer = peer
            session.socket_transport = request.transport
            try:
                if transport == "p2p":
                    started = await self._negotiate(session, peer)
                else:
                    peer.send_json({"livekit_url": self.livekit_url,
                                    "livekit_token": self._livekit_token(session)})
                    self._record_sent(session, "{livekit join info}")
                    self._json(session, {"video_metadata": {
                        "fps": self.fps, "width": self.width, "height": self.height}})
                    started = True
                if started and self.start_delay:
                    started = await self._delay_start(session, peer)
                if started and self._go_live(session):
                    async for message in peer.ws:
                        self._on_frame(session, message)
            finally:
                self._on_disconnect(session)
        return peer.ws

    def _livekit_token(self, session: SimliSessionRecord) -> str:
        session.livekit_token = secrets.token_urlsafe(24)
        return session.livekit_token

    async def _negotiate(self, session: SimliSessionRecord, peer: ChannelPeer) -> bool:
        """Read the SDP offer and answer it; False when the session was refused."""
        try:
            message = await peer.ws.receive(timeout=self.offer_timeout)
        except TimeoutError:
            self._refuse(session, f"no SDP offer within {self.offer_timeout:g} s")
            return False
        if message.type in _CLOSED_TYPES:
            return False
        try:
            offer_sdp = _parse_offer(message)
        except ProtocolError as exc:
            self._refuse(session, str(exc))
            return False
        session.offer_received = True
        try:
            answer_sdp = await self._answer(session, offer_sdp)
        except ImportError:
            self._refuse(session, "P2P needs aiortc here: pip install 'avatarkit[webrtc]'")
            return False
        except Exception as exc:  # aiortc raises several types for an unusable offer
            self._refuse(session, f"the SDP offer could not be used: {type(exc).__name__}")
            return False
        if session.status != "connecting":  # ended (reset) while aiortc worked
            return False
        peer.send_json({"type": "answer", "sdp": answer_sdp})
        self._record_sent(session, "{answer}")
        return True

    async def _delay_start(self, session: SimliSessionRecord, peer: ChannelPeer) -> bool:
        """Wait ``start_delay`` before ``START``; False when the client left meanwhile."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.start_delay
        while (left := deadline - loop.time()) > 0:
            try:
                message = await peer.ws.receive(timeout=left)
            except TimeoutError:
                break
            if message.type in _CLOSED_TYPES:
                return False
            session.protocol_errors.append("message before START ignored")
        return True

    async def _answer(self, session: SimliSessionRecord, offer_sdp: str) -> str:
        from aiortc import (
            RTCConfiguration,
            RTCPeerConnection,
            RTCSessionDescription,
        )
        from aiortc.mediastreams import AudioStreamTrack

        pc = RTCPeerConnection(configuration=RTCConfiguration(iceServers=[]))
        session.pc = pc
        pattern = TalkingPattern(width=self.width, height=self.height, fps=self.fps,
                                 sample_rate=_SAMPLE_RATE)
        session.pattern = pattern
        await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        pc.addTrack(talking_pattern_track(pattern))
        if self.audio_track:
            pc.addTrack(AudioStreamTrack())
        await pc.setLocalDescription(await pc.createAnswer())
        return str(pc.localDescription.sdp)

    def _refuse(self, session: SimliSessionRecord, problem: str) -> None:
        """A session that never started: the socket closes with 1008, nothing was billed
        (unless billing starts at the token)."""
        session.protocol_errors.append(problem)
        if session.status != "connecting":
            return
        self._close_session(session, "refused", problem, code=_REFUSED_CLOSE)

    def _go_live(self, session: SimliSessionRecord) -> bool:
        """Send ``START`` (or the refusal that replaces it) and start the meter and timers."""
        if session.status != "connecting":
            return False
        refusal = self.start_line
        if refusal is None and self.billing_starts == "start" and self.at_capacity:
            refusal = RATE_LINE
        if refusal is not None:
            self._send(session, refusal)
            self._close_session(session, "refused", refusal, code=WSCloseCode.OK)
            return False
        session.status = "active"
        if session.ledger_entry is None:
            self._bill(session, session.session_id)
        self._end_after(session, "max", session.max_session_length, self._end, reason="MAX")
        self._arm_idle(session)
        self._send(session, "START")
        return True

    def _on_frame(self, session: SimliSessionRecord, message: WSMessage) -> None:
        if session.status != "active":
            return  # in flight while the session was ending
        try:
            if message.type is WSMsgType.TEXT:
                self._on_text(session, message.data)
            elif message.type is WSMsgType.BINARY:
                self._on_binary(session, message.data)
        except ProtocolError as exc:
            session.protocol_errors.append(str(exc))

    def _on_text(self, session: SimliSessionRecord, text: str) -> None:
        command = text.strip()
        if command == "SKIP":
            self._on_skip(session)
        elif command == "DONE":
            self._on_done(session)
        elif command == "ping":
            session.pings += 1
            self._send(session, "pong")
        elif command.startswith(("BG_", "FG_")):
            session.asset_commands.append(command)
        elif command.startswith("{"):
            raise ProtocolError("JSON message after START ignored (the SDP offer goes first, "
                                "once)")
        else:
            raise ProtocolError(f"unknown text command {command[:40]!r}")

    def _on_binary(self, session: SimliSessionRecord, data: bytes) -> None:
        if data in (b"DONE", b"SKIP"):
            (self._on_done if data == b"DONE" else self._on_skip)(session)
        elif data.startswith(b"PLAY_IMMEDIATE"):
            session.play_immediate += 1
            self._drop_queue(session)
            self._on_audio(session, data[len(b"PLAY_IMMEDIATE"):])
        elif data.startswith(b"CAM_"):
            session.camera_commands += 1
        else:
            self._on_audio(session, data)

    def _on_audio(self, session: SimliSessionRecord, data: bytes) -> None:
        size = len(data)
        session.frame_sizes.append(size)
        if session.done_received:
            raise ProtocolError("audio after DONE ignored")
        if size == 0:
            raise ProtocolError("empty audio frame")
        if size > self.max_frame_bytes:
            session.protocol_errors.append(
                f"audio frame of {size} bytes; frames are at most {self.max_frame_bytes} bytes")
        data = whole_samples(data)
        if len(data) != size:
            session.protocol_errors.append(
                f"audio frame of {size} bytes: an odd byte count is not PCM16 (last byte "
                "dropped)")
        seconds = pcm16_seconds(len(data), _SAMPLE_RATE)
        session.audio_seconds_received += seconds
        if session.pattern is not None:
            session.pattern.feed(data)
        if seconds > 0:
            if not session.speaking:
                session.burst += 1
            self._timers.disarm(session.timers, "idle")
            session.playback.feed(f"burst-{session.burst}", seconds, done=True)
        if not session.channel_dropped and self.faults.channel_drop_due(
                session.audio_seconds_received):
            self._drop(session)

    def _drop_queue(self, session: SimliSessionRecord) -> bool:
        """Stop speaking now; True when something was playing."""
        stopped = session.playback.interrupt()
        if session.pattern is not None:
            session.pattern.clear()
        return stopped is not None

    def _on_skip(self, session: SimliSessionRecord) -> None:
        session.skips += 1
        if not self._drop_queue(session):
            session.useless_skips += 1
        if not self.faults.mute_interrupts:
            self._send(session, "SILENT")
            session.silent_events += 1
        if session.done_received:
            self._end(session, "DONE")
        else:
            self._arm_idle(session)

    def _on_done(self, session: SimliSessionRecord) -> None:
        session.done_received = True
        if not session.speaking:
            self._end(session, "DONE")

    def _on_speech_started(self, session: SimliSessionRecord) -> None:
        session.speak_events += 1
        self._send(session, "SPEAK")

    def _on_speech_stopped(self, session: SimliSessionRecord) -> None:
        session.silent_events += 1
        self._send(session, "SILENT")
        if session.done_received:
            self._end(session, "DONE")
        else:
            self._arm_idle(session)

    def _arm_idle(self, session: SimliSessionRecord) -> None:
        if session.status == "active":
            self._end_after(session, "idle", session.max_idle_time, self._end, reason="IDLE")

    def _drop(self, session: SimliSessionRecord) -> None:
        """The ``drop_channel`` fault: the socket dies under the session."""
        session.channel_dropped = True
        transport = session.socket_transport
        if self.drop_abruptly and isinstance(transport, asyncio.Transport):
            transport.abort()
        elif session.peer is not None:
            session.peer.close(WSCloseCode.INTERNAL_ERROR, "channel dropped")

    def _on_disconnect(self, session: SimliSessionRecord) -> None:
        session.disconnected = True
        session.peer = None
        session.socket_transport = None
        if session.status == "connecting":
            # Closed before START: nothing was played; only a token-billed session is metered.
            self._close_session(session, "refused", "closed before START")
        elif session.status == "active" and self.end_on_disconnect:
            reason = "DONE" if session.done_received else "DISCONNECTED"
            self._end(session, reason, announce=False)

    # -- ending --------------------------------------------------------------------------------

    def _end(self, session: SimliSessionRecord, reason: str, *, announce: bool = True) -> None:
        """End a session the vendor's way: ``ENDFRAME``, ``CLOSING REASON``, ``STOP``, close
        (``announce=False``: just close). The meter stops; the peer connection closes."""
        if session.status in ("ended", "expired", "refused"):
            return
        if session.status != "active":
            self._close_session(session, "ended", reason)
            return
        if announce and session.peer is not None:
            self._send(session, "ENDFRAME")
            self._send(session, f"{self.closing_prefix}: {reason}")
            self._send(session, "STOP")
        self._close_session(session, "ended", reason)

    def _close_session(self, session: SimliSessionRecord, status: _SessionStatus, reason: str,
                       *, code: int = WSCloseCode.OK) -> None:
        session.status = status
        self._stop_session(session, reason, session.playback)
        if session.pattern is not None:
            session.pattern.clear()
        if session.peer is not None:
            session.peer.close(code, reason[:120])
        pc, session.pc = session.pc, None
        if pc is not None:
            self._spawn(pc.close())

    # -- sending -------------------------------------------------------------------------------

    def _send(self, session: SimliSessionRecord, line: str) -> None:
        if session.peer is not None:
            self._record_sent(session, line)
            session.peer.send_text(line)

    def _json(self, session: SimliSessionRecord, payload: Mapping[str, Any]) -> None:
        if session.peer is not None:
            self._record_sent(session, json.dumps(payload))
            session.peer.send_json(payload)

    @staticmethod
    def _record_sent(session: SimliSessionRecord, line: str) -> None:
        session.lines_sent.append(line)
