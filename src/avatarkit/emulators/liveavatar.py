"""HeyGen LiveAvatar (LITE mode) emulator: a stateful contract fake of ``api.liveavatar.com/v1``.

HeyGen's Interactive/Streaming Avatar API is legacy; LiveAvatar replaced it, and LITE mode is the
one where the caller sends its own audio. This fake serves:

* ``POST /v1/sessions/token`` (``X-API-KEY``) — mints a session id and a session token. Nothing
  is billed and no concurrency slot is taken yet.
* ``POST /v1/sessions/start`` (``Authorization: Bearer <session token>``) — 201 with the LiveKit
  URL, a client token and a *different* agent token (one shared token kicked the bot out of the
  room, Pipecat PR #2266), ``max_session_duration`` and the ``ws_url``. The meter starts here.
* ``POST /v1/sessions/keep-alive`` (Bearer) — resets the idle timer.
* ``GET /v1/avatars`` (``X-API-KEY``) — lists the known avatars (the SDK's health probe: it is
  authenticated, unbilled and creates nothing).
* ``POST /v1/sessions/stop`` and ``DELETE /v1/sessions`` (Bearer) — end the session. Closing the
  WebSocket alone does **not** end it: it stays billed until stopped or timed out (livekit/agents
  #4193), which is the leak this fake exists to catch.

The LITE WebSocket at ``ws_url`` carries JSON text frames. On connect the server sends
``session.state_updated`` ``connecting`` and, ``connected_delay`` seconds later, ``connected``;
anything received before that is dropped, as the vendor does, and counted in
``protocol_errors`` so a test sees an SDK that did not buffer. ``agent.speak`` audio (base64
PCM16 LE, 24 kHz mono, at most ``max_message_bytes`` per message) is appended to one playback
buffer and "played" in real time; ``agent.speak_started`` / ``agent.speak_ended`` bracket each
utterance, an utterance being the audio from the first chunk after idle (or after the previous
``agent.speak_end``) to the next ``agent.speak_end``. ``agent.interrupt`` clears all scheduled
speech. ``session.keep_alive`` resets the idle timer (default 300 s). When a session ends the
server sends ``session.state_updated`` ``closed`` and closes the WebSocket.

Behaviour this fake chooses where the contract is unverified (and how to change it):

* Successful responses use the envelope ``{"code", "data", "message"}`` with ``code`` 1000
  (``success_code``); clients should not depend on the value (the docs say 100, the web SDK
  checks 1000, the LiveKit plugin accepts ``<= 200``).
* Error bodies are ``{"code": <HTTP status>, "message", "data": null}`` (``error_shape=
  "envelope"``) or FastAPI's ``{"detail": <text>}`` (``error_shape="detail"``); invalid token
  requests are 422 with FastAPI's ``detail[]`` list either way.
* ``mode`` is required and only ``"LITE"`` is served; ``"FULL"`` is refused with 400.
* Unknown ``avatar_id`` is 404 at token time. The sandbox stock avatar is always known; sandbox
  sessions are not billed and last at most ``sandbox_max_session_duration`` (60 s).
* ``max_session_duration`` defaults to ``default_max_session_duration`` (3600 s) when not given.
* Exceeding ``max_concurrent`` started sessions answers ``concurrency_limit_status`` (403).
* Starting a session twice, or after it ended, is 400; stopping an ended session succeeds again.
* Which stop route exists: ``post_stop_status`` / ``delete_stop_status`` (None = the route
  works; 404 or 405 = it answers that, FastAPI-style, without ending anything).
* ``connected_delay`` (0.05 s) before ``connected``; a ``connecting`` state is sent first.
* Idle timer: reset by ``session.keep_alive``, ``POST /v1/sessions/keep-alive``, a WebSocket
  connect and, with ``idle_reset_by_any_message`` (default True), any accepted message.
* Ending sends ``session.state_updated`` ``{"state": "closed", "reason": <end reason>}``, then
  closes the WebSocket with ``end_close_code`` (1000) and the reason as close reason.
* An acknowledged interrupt sends ``interrupt_events`` (``agent.speak_interrupted`` then
  ``agent.speak_ended``, which is what the LiveKit plugin handles).
* ``max_message_bytes`` is 1,000,000 (the "1 MB" limit read as decimal megabytes).
* The vendor plays wrong-rate audio as garbage without an error; the fake cannot detect a wrong
  rate in raw PCM, so it records each message's duration *at 24 kHz* (a 16 kHz sender shows up
  as 0.4 s "first chunks"), and it flags what it can: a WAV (``RIFF``) header, an MP3 (``ID3``)
  header and a ``sample_rate`` field other than 24000. Such messages are not played.
* Server events carry the ``event_id`` of the utterance's first chunk and ``task.id``. Audio
  for an event id that was interrupted or already finished is ignored (counted in
  ``ignored_chunks``); audio for an event id after its ``agent.speak_end`` is a protocol error.
* Several WebSockets may be open on one session at once (a reconnect); events go to all.
* ``GET /v1/avatars`` answers ``data.results`` as ``[{"avatar_id": ...}]`` for the known faces
  (the sandbox stock avatar not included); the vendor's list shape and paging are unverified.
* A BYO ``livekit_config`` (either field vocabulary) is recorded but does not change the URLs
  and tokens ``start`` returns.

Why one module: the REST lifecycle (token, start, keep-alive, stop) and the LITE WebSocket
drive one session record and one playback buffer, so splitting them would split one state
machine; the shared plumbing and the PCM16 checks are in ``_base`` and ``_media``.
"""

from __future__ import annotations

import asyncio
import secrets
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, Literal, get_args

from aiohttp import WSCloseCode, WSMsgType, web
from aiohttp.typedefs import Handler

from ._base import (
    BadRequest,
    ChannelPeer,
    EmulatorServer,
    ProtocolError,
    Room,
    SessionRecord,
    SpeechPlayback,
    json_message,
    now_iso,
    read_json_object,
)
from ._base import (
    FastAPIValidationError as _ValidationError,
)
from ._media import base64_audio, pcm16_seconds, require_whole_samples

__all__ = [
    "MAX_MESSAGE_BYTES",
    "SANDBOX_AVATAR_ID",
    "LiveAvatarEmulator",
    "LiveAvatarSessionRecord",
    "LiveAvatarUtterance",
    "SpeakChunk",
]

_ErrorShape = Literal["envelope", "detail"]
_SessionStatus = Literal["minted", "active", "ended"]
_UtteranceOutcome = Literal["queued", "playing", "finished", "interrupted", "abandoned"]

_SAMPLE_RATE = 24000
MAX_MESSAGE_BYTES = 1_000_000
_IDLE_TIMEOUT = 300.0
_DEFAULT_MAX_SESSION_DURATION = 3600
_SANDBOX_MAX_SESSION_DURATION = 60
#: HeyGen's stock avatar for sandbox sessions (LiveAvatar skills guide).
SANDBOX_AVATAR_ID = "dd73ea75-1218-4ef3-92ce-606d5f7fbc0a"
_SUCCESS_CODE = 1000
_TOKEN_PATH = "/v1/sessions/token"
_AVATARS_PATH = "/v1/avatars"

_ERROR_SHAPES: frozenset[str] = frozenset(get_args(_ErrorShape))
_VIDEO_QUALITIES = frozenset({"very_high", "high", "medium", "low"})
_INTERRUPT_EVENTS = frozenset({"agent.speak_interrupted", "agent.speak_ended"})
_MISSING_ROUTE_STATUSES = {404: "Not Found", 405: "Method Not Allowed"}
_LISTENING_TYPES = frozenset({"agent.start_listening", "agent.stop_listening"})


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpeakChunk:
    """One accepted ``agent.speak`` message: its size on the wire and its duration at 24 kHz."""

    event_id: str
    audio_bytes: int
    message_bytes: int
    seconds: float
    played: bool


@dataclass(eq=False)
class LiveAvatarUtterance:
    """Audio from the first chunk after idle (or after ``agent.speak_end``) to the next end.

    ``chunk_seconds`` lists each message's duration so a test can check the pacing an SDK uses
    (about 0.6 s first, then about 1 s).
    """

    utterance_id: str
    task_id: str
    event_ids: list[str] = field(default_factory=list)
    chunk_seconds: list[float] = field(default_factory=list)
    done: bool = False
    end_event_id: str | None = None
    outcome: _UtteranceOutcome = "queued"
    played_seconds: float = 0.0

    @property
    def seconds(self) -> float:
        return sum(self.chunk_seconds)

    def describe(self) -> dict[str, Any]:
        return {
            "utterance_id": self.utterance_id,
            "task_id": self.task_id,
            "event_ids": list(self.event_ids),
            "chunk_seconds": list(self.chunk_seconds),
            "done": self.done,
            "end_event_id": self.end_event_id,
            "outcome": self.outcome,
            "played_seconds": self.played_seconds,
        }


@dataclass(eq=False)
class LiveAvatarSessionRecord(SessionRecord):
    """One session: what was minted and started, and what its WebSocket received and sent.

    Billed from ``start`` (``ledger_entry`` is None before, and for sandbox sessions)."""

    session_id: str
    session_token: str
    avatar_id: str
    is_sandbox: bool
    max_session_duration: int
    video_quality: str | None
    byo_livekit: dict[str, str | None] | None
    created_at: str = field(default_factory=now_iso)
    status: _SessionStatus = "minted"
    stop_reason: str | None = None
    # Issued by start; the client and agent tokens are deliberately different.
    livekit_url: str | None = None
    livekit_client_token: str | None = None
    livekit_agent_token: str | None = None
    ws_url: str | None = None
    ws_token: str = field(default_factory=lambda: secrets.token_urlsafe(18), repr=False)
    # What the WebSocket received (so tests can assert what the SDK sent).
    ws_connections: int = 0
    messages_received: int = 0
    messages_before_connected: int = 0
    speak_chunks: list[SpeakChunk] = field(default_factory=list)
    audio_seconds_by_event: dict[str, float] = field(default_factory=dict)
    utterances: list[LiveAvatarUtterance] = field(default_factory=list)
    speak_ends: list[str] = field(default_factory=list)
    stray_speak_ends: int = 0
    ignored_chunks: int = 0
    interrupts: int = 0
    useless_interrupts: int = 0
    keep_alives: int = 0
    rest_keep_alives: int = 0
    listening_events: list[str] = field(default_factory=list)
    # What it sent, and channel state.
    events_sent: list[dict[str, Any]] = field(default_factory=list)
    channel_dropped: bool = False
    room: Room = field(default_factory=Room, repr=False)
    connected_peers: set[ChannelPeer] = field(default_factory=set, repr=False)
    playback: SpeechPlayback = field(init=False, repr=False)
    gate_timers: dict[ChannelPeer, asyncio.TimerHandle] = field(default_factory=dict, repr=False)
    open_utterance: LiveAvatarUtterance | None = field(default=None, repr=False)
    playing: LiveAvatarUtterance | None = field(default=None, repr=False)
    pending: deque[LiveAvatarUtterance] = field(default_factory=deque, repr=False)
    event_owner: dict[str, LiveAvatarUtterance] = field(default_factory=dict, repr=False)

    @property
    def audio_seconds_received(self) -> float:
        return sum(self.audio_seconds_by_event.values())

    @property
    def speaking(self) -> bool:
        return self.playing is not None

    @property
    def tokens_distinct(self) -> bool:
        """Whether start issued different LiveKit tokens to the client and the agent."""
        return (
            self.livekit_client_token is not None
            and self.livekit_agent_token is not None
            and self.livekit_client_token != self.livekit_agent_token
        )

    def describe(self) -> dict[str, Any]:
        """The emulator's view, for ``GET /_emulator/state`` (no tokens)."""
        return {
            "session_id": self.session_id,
            "avatar_id": self.avatar_id,
            "is_sandbox": self.is_sandbox,
            "status": self.status,
            "end_reason": self.end_reason,
            "stop_reason": self.stop_reason,
            "created_at": self.created_at,
            "max_session_duration": self.max_session_duration,
            "video_quality": self.video_quality,
            "byo_livekit": self.byo_livekit,
            "billed_seconds": self.billed_seconds,
            "tokens_distinct": self.tokens_distinct,
            "ws_connections": self.ws_connections,
            "connected_channels": len(self.room),
            "messages_received": self.messages_received,
            "messages_before_connected": self.messages_before_connected,
            "speak_messages": len(self.speak_chunks),
            "audio_seconds_by_event": dict(self.audio_seconds_by_event),
            "utterances": [utterance.describe() for utterance in self.utterances],
            "speak_ends": list(self.speak_ends),
            "stray_speak_ends": self.stray_speak_ends,
            "ignored_chunks": self.ignored_chunks,
            "interrupts": self.interrupts,
            "useless_interrupts": self.useless_interrupts,
            "keep_alives": self.keep_alives,
            "rest_keep_alives": self.rest_keep_alives,
            "listening_events": list(self.listening_events),
            "protocol_errors": list(self.protocol_errors),
            "events_sent": list(self.events_sent),
            "channel_dropped": self.channel_dropped,
        }


@dataclass(frozen=True)
class _TokenRequest:
    avatar_id: str
    is_sandbox: bool
    max_session_duration: int | None
    video_quality: str | None
    byo_livekit: dict[str, str | None] | None


@dataclass(frozen=True)
class _Speak:
    event_id: str
    audio_bytes: int
    message_bytes: int


# --------------------------------------------------------------------------------------------
# Request and message validation
# --------------------------------------------------------------------------------------------


def _parse_token_request(body: Mapping[str, Any]) -> _TokenRequest:
    """Validate a token request the way the vendor's FastAPI models would (422 on failure)."""
    mode = body.get("mode")
    if mode is None:
        raise _ValidationError("mode", "Field required", "missing")
    if mode not in ("FULL", "LITE"):
        raise _ValidationError("mode", "Input should be 'FULL' or 'LITE'", "enum", mode)
    if mode == "FULL":
        raise BadRequest("this emulator serves LITE mode only; FULL mode is not emulated")
    avatar_id = body.get("avatar_id")
    if avatar_id is None:
        raise _ValidationError("avatar_id", "Field required", "missing")
    if not isinstance(avatar_id, str) or not avatar_id:
        raise _ValidationError("avatar_id", "Input should be a valid string", "string_type", 0)
    is_sandbox = body.get("is_sandbox", False)
    if not isinstance(is_sandbox, bool):
        raise _ValidationError("is_sandbox", "Input should be a valid boolean", "bool_type")
    duration = body.get("max_session_duration")
    if duration is not None and (
        isinstance(duration, bool) or not isinstance(duration, int) or duration < 1
    ):
        raise _ValidationError(
            "max_session_duration", "Input should be a positive integer", "int_type", duration
        )
    return _TokenRequest(
        avatar_id=avatar_id,
        is_sandbox=is_sandbox,
        max_session_duration=duration,
        video_quality=_parse_video_quality(body),
        byo_livekit=_parse_livekit_config(body.get("livekit_config")),
    )


def _parse_video_quality(body: Mapping[str, Any]) -> str | None:
    """Top-level ``video_quality`` (LiveKit plugin) or ``video_settings.quality`` (docs)."""
    settings = body.get("video_settings")
    if settings is not None and not isinstance(settings, dict):
        raise _ValidationError("video_settings", "Input should be an object", "dict_type")
    candidates = [
        ("video_quality", body.get("video_quality")),
        ("video_settings.quality", (settings or {}).get("quality")),
    ]
    chosen: str | None = None
    for name, value in candidates:
        if value is None:
            continue
        if value not in _VIDEO_QUALITIES:
            raise _ValidationError(
                name, f"Input should be one of {sorted(_VIDEO_QUALITIES)}", "enum", value
            )
        chosen = chosen or value
    return chosen


def _parse_livekit_config(raw: object) -> dict[str, str | None] | None:
    """A BYO LiveKit room in either field vocabulary (plugins vs HeyGen's skills guide)."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise _ValidationError("livekit_config", "Input should be an object", "dict_type")
    url = raw.get("livekit_url", raw.get("url"))
    token = raw.get("livekit_client_token", raw.get("token"))
    room = raw.get("livekit_room")
    for name, value in (("url", url), ("token", token), ("livekit_room", room)):
        if value is not None and not isinstance(value, str):
            raise _ValidationError(
                f"livekit_config.{name}", "Input should be a valid string", "string_type"
            )
    if not url or not token:
        raise _ValidationError(
            "livekit_config",
            "livekit_url (url) and livekit_client_token (token) are required",
            "missing",
        )
    # The caller's token is not kept: the control API must not leak credentials.
    return {"livekit_url": url, "livekit_room": room}


def _bearer_token(request: web.Request) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def _parse_message(raw: str, max_bytes: int) -> tuple[dict[str, Any], int]:
    """The message as an object and its size in bytes, after the checks every frame gets."""
    size = len(raw.encode())
    if size > max_bytes:
        raise ProtocolError(f"message is {size} bytes; the limit is {max_bytes} bytes per message")
    message = json_message(raw)
    if not isinstance(message.get("type"), str):
        raise ProtocolError("message has no string 'type'")
    return message, size


def _required_event_id(message: Mapping[str, Any]) -> str:
    event_id = message.get("event_id")
    if not isinstance(event_id, str) or not event_id:
        raise ProtocolError(f"{message['type']} needs a non-empty string event_id")
    return event_id


def _parse_speak(message: Mapping[str, Any], size: int) -> _Speak:
    event_id = _required_event_id(message)
    declared_rate = message.get("sample_rate")
    if declared_rate is not None and declared_rate != _SAMPLE_RATE:
        raise ProtocolError(
            f"agent.speak audio must be {_SAMPLE_RATE} Hz PCM16 mono, got sample_rate"
            f" {declared_rate!r} (the vendor plays it garbled without an error)"
        )
    pcm = base64_audio(message.get("audio"), "agent.speak audio")
    if not pcm:
        raise ProtocolError("agent.speak audio is empty")
    if pcm[:4] == b"RIFF" and pcm[8:12] == b"WAVE":
        raise ProtocolError("agent.speak audio has a WAV header; send raw PCM16 (headers click)")
    if pcm[:3] == b"ID3":
        raise ProtocolError("agent.speak audio is MP3; send raw PCM16 (MP3 plays as silence)")
    require_whole_samples(pcm, "agent.speak audio")
    return _Speak(event_id=event_id, audio_bytes=len(pcm), message_bytes=size)


# --------------------------------------------------------------------------------------------
# The emulator
# --------------------------------------------------------------------------------------------


class LiveAvatarEmulator(EmulatorServer):
    """HeyGen LiveAvatar (LITE) contract fake. ``async with LiveAvatarEmulator(...) as emu:``.

    ``faces`` are the known avatar ids (with ``accept_any_face`` every id exists; the sandbox
    stock avatar always does). At most ``max_concurrent`` started, billed sessions may be open.
    See the module docstring for the unverified choices each option controls.
    """

    name: ClassVar[str] = "liveavatar"
    auth_header: ClassVar[str] = "X-API-KEY"

    def __init__(
        self,
        *,
        api_keys: Iterable[str] = ("test-key",),
        faces: Iterable[str] = (),
        max_concurrent: int = 10,
        host: str = "127.0.0.1",
        port: int = 0,
        accept_any_face: bool = False,
        idle_timeout: float = _IDLE_TIMEOUT,
        idle_reset_by_any_message: bool = True,
        connected_delay: float = 0.05,
        default_max_session_duration: int = _DEFAULT_MAX_SESSION_DURATION,
        sandbox_max_session_duration: int = _SANDBOX_MAX_SESSION_DURATION,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        concurrency_limit_status: int = 403,
        post_stop_status: int | None = None,
        delete_stop_status: int | None = None,
        interrupt_events: Iterable[str] = ("agent.speak_interrupted", "agent.speak_ended"),
        end_close_code: int = WSCloseCode.OK,
        success_code: int = _SUCCESS_CODE,
        error_shape: _ErrorShape = "envelope",
        livekit_url: str = "wss://liveavatar-emulator.livekit.invalid",
    ) -> None:
        super().__init__(
            api_keys=api_keys, faces=faces, accept_any_face=accept_any_face, host=host,
            port=port, max_concurrent=max_concurrent,
            concurrency_limit_status=concurrency_limit_status)
        for name, seconds in (("idle_timeout", idle_timeout), ("connected_delay", connected_delay)):
            if isinstance(seconds, bool) or seconds < 0:
                raise ValueError(f"{name} must be a number of seconds >= 0")
        for name, limit in (
            ("default_max_session_duration", default_max_session_duration),
            ("sandbox_max_session_duration", sandbox_max_session_duration),
            ("max_message_bytes", max_message_bytes),
        ):
            if isinstance(limit, bool) or limit < 1:
                raise ValueError(f"{name} must be a positive integer")
        for name, status in (
            ("post_stop_status", post_stop_status),
            ("delete_stop_status", delete_stop_status),
        ):
            if status is not None and status not in _MISSING_ROUTE_STATUSES:
                raise ValueError(f"{name} must be None, 404 or 405")
        if post_stop_status is not None and delete_stop_status is not None:
            raise ValueError("at least one stop route must work")
        events = tuple(interrupt_events)
        if unknown := sorted(set(events) - _INTERRUPT_EVENTS):
            known = sorted(_INTERRUPT_EVENTS)
            raise ValueError(f"interrupt_events {unknown} unknown; known: {known}")
        if error_shape not in _ERROR_SHAPES:
            raise ValueError(f"error_shape must be one of {sorted(_ERROR_SHAPES)}")
        self.idle_timeout = float(idle_timeout)
        self.idle_reset_by_any_message = idle_reset_by_any_message
        self.connected_delay = float(connected_delay)
        self.default_max_session_duration = default_max_session_duration
        self.sandbox_max_session_duration = sandbox_max_session_duration
        self.max_message_bytes = max_message_bytes
        self.post_stop_status = post_stop_status
        self.delete_stop_status = delete_stop_status
        self.interrupt_events: tuple[str, ...] = events
        self.end_close_code = end_close_code
        self.success_code = success_code
        self.error_shape: _ErrorShape = error_shape
        self.livekit_url = livekit_url
        self._sessions: dict[str, LiveAvatarSessionRecord] = {}
        self._by_token: dict[str, LiveAvatarSessionRecord] = {}

    # -- Python control surface ------------------------------------------------------------

    @property
    def sessions(self) -> Mapping[str, LiveAvatarSessionRecord]:
        """Every session minted since the last reset (ended ones included)."""
        return MappingProxyType(self._sessions)

    def end_session(self, session_id: str, reason: str = "ended") -> None:
        """End a session as the vendor would (meter stops, ``closed`` state, WebSocket closed)."""
        self._end(self._sessions[session_id], reason)

    # -- EmulatorServer hooks --------------------------------------------------------------

    def _add_vendor_routes(self, app: web.Application) -> None:
        route = self._add_api_route
        route(app, "POST", _TOKEN_PATH, self._handle_token, operation="create")
        route(app, "POST", "/v1/sessions/start", self._handle_start, operation="create")
        route(app, "POST", "/v1/sessions/keep-alive", self._handle_keep_alive)
        route(app, "GET", _AVATARS_PATH, self._handle_avatars)
        for method, path, status in (
            ("POST", "/v1/sessions/stop", self.post_stop_status),
            ("DELETE", "/v1/sessions", self.delete_stop_status),
        ):
            if status is None:
                route(app, method, path, self._handle_stop, operation="end")
            else:
                # A route the vendor does not have answers before any auth, as FastAPI does.
                app.router.add_route(method, path, _missing_route(status))
        app.router.add_get("/v1/lite/{session_id}", self._handle_websocket)

    def _is_authorized(self, request: web.Request) -> bool:
        """The API key mints tokens and lists avatars; every other vendor route takes the
        session token."""
        if request.path in (_TOKEN_PATH, _AVATARS_PATH):
            return super()._is_authorized(request)
        return self._session_for(request) is not None

    def _error_response(
        self, status: int, message: str, *, headers: Mapping[str, str] | None = None
    ) -> web.Response:
        body: dict[str, Any] = {"detail": message}
        if self.error_shape == "envelope":
            body = {"code": status, "message": message, "data": None}
        return web.json_response(body, status=status, headers=headers)

    def _vendor_state(self) -> dict[str, Any]:
        return {
            "sessions": [session.describe() for session in self._sessions.values()],
            "faces": sorted(self.faces),
        }

    def _reset_sessions(self) -> None:
        self._end_and_forget(self._sessions, self._end, "emulator_reset")
        self._by_token.clear()

    # -- REST --------------------------------------------------------------------------------

    def _envelope(
        self, data: Mapping[str, Any] | None, message: str, status: int = 200
    ) -> web.Response:
        body = {"code": self.success_code, "data": data, "message": message}
        return web.json_response(body, status=status)

    def _session_for(self, request: web.Request) -> LiveAvatarSessionRecord | None:
        token = _bearer_token(request)
        return None if token is None else self._by_token.get(token)

    def _authorized_session(self, request: web.Request) -> LiveAvatarSessionRecord:
        if (session := self._session_for(request)) is None:
            raise BadRequest("invalid or missing session token", status=401)
        return session

    async def _matching_body(
        self, request: web.Request, session: LiveAvatarSessionRecord
    ) -> dict[str, Any]:
        """The optional JSON body; a ``session_id`` in it must name the token's session."""
        try:
            body = await read_json_object(request)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        given = body.get("session_id")
        if given is not None and given != session.session_id:
            raise BadRequest(f"session_id {given!r} does not match the session token")
        return body

    async def _handle_token(self, request: web.Request) -> web.Response:
        try:
            spec = _parse_token_request(await read_json_object(request))
            known = self.has_face(spec.avatar_id) or (
                spec.is_sandbox and spec.avatar_id == SANDBOX_AVATAR_ID
            )
            if not known:
                raise BadRequest(f"avatar {spec.avatar_id!r} not found", status=404)
        except _ValidationError as exc:
            return exc.response()
        except ValueError as exc:
            return self._error_response(400, str(exc))
        except BadRequest as exc:
            return self._error_response(exc.status, str(exc))
        duration = spec.max_session_duration or self.default_max_session_duration
        if spec.is_sandbox:
            duration = min(duration, self.sandbox_max_session_duration)
        session = LiveAvatarSessionRecord(
            session_id=secrets.token_hex(16),
            session_token=secrets.token_urlsafe(32),
            avatar_id=spec.avatar_id,
            is_sandbox=spec.is_sandbox,
            max_session_duration=duration,
            video_quality=spec.video_quality,
            byo_livekit=spec.byo_livekit,
        )
        session.playback = self._playback(
            on_started=lambda _utterance_id: self._on_speech_started(session),
            on_stopped=lambda _utterance_id, played: self._on_speech_finished(session, played),
        )
        self._sessions[session.session_id] = session
        self._by_token[session.session_token] = session
        data = {"session_id": session.session_id, "session_token": session.session_token}
        return self._envelope(data, "Session token created")

    async def _handle_avatars(self, request: web.Request) -> web.Response:
        avatars = [{"avatar_id": face_id} for face_id in sorted(self.faces)]
        return self._envelope({"results": avatars}, "Avatars listed")

    async def _handle_start(self, request: web.Request) -> web.Response:
        try:
            session = self._authorized_session(request)
            await self._matching_body(request, session)
            if session.status != "minted":
                raise BadRequest(f"session {session.session_id} was already {session.status}")
            if not session.is_sandbox:
                self.check_capacity("concurrent session limit reached")
        except BadRequest as exc:
            return self._error_response(exc.status, str(exc))
        session.status = "active"
        if not session.is_sandbox:
            self._bill(session, session.session_id)
        session.livekit_url = self.livekit_url
        session.livekit_client_token = secrets.token_urlsafe(32)
        session.livekit_agent_token = secrets.token_urlsafe(32)
        ws_base = self.url.replace("http://", "ws://", 1)
        session.ws_url = f"{ws_base}/v1/lite/{session.session_id}?token={session.ws_token}"
        self._end_after(session, "max_session_duration", session.max_session_duration, self._end)
        self._touch(session)
        data = {
            "session_id": session.session_id,
            "livekit_url": session.livekit_url,
            "livekit_client_token": session.livekit_client_token,
            "livekit_agent_token": session.livekit_agent_token,
            "max_session_duration": session.max_session_duration,
            "ws_url": session.ws_url,
        }
        return self._envelope(data, "Session started", status=201)

    async def _handle_keep_alive(self, request: web.Request) -> web.Response:
        try:
            session = self._authorized_session(request)
            await self._matching_body(request, session)
            if session.status != "active":
                raise BadRequest(f"session {session.session_id} is not active")
        except BadRequest as exc:
            return self._error_response(exc.status, str(exc))
        session.rest_keep_alives += 1
        self._touch(session)
        return self._envelope(None, "Session kept alive")

    async def _handle_stop(self, request: web.Request) -> web.Response:
        try:
            session = self._authorized_session(request)
            body = await self._matching_body(request, session)
        except BadRequest as exc:
            return self._error_response(exc.status, str(exc))
        reason = body.get("reason")
        if session.status != "ended" and isinstance(reason, str):
            session.stop_reason = reason
        self._end(session, "stopped")
        return self._envelope(None, "Session stopped")

    # -- timers and ending -------------------------------------------------------------------

    def _touch(self, session: LiveAvatarSessionRecord) -> None:
        """Activity: the idle timeout starts over."""
        if session.status == "active":
            self._end_after(session, "idle_timeout", self.idle_timeout, self._end)

    def _end(self, session: LiveAvatarSessionRecord, reason: str) -> None:
        if session.status == "ended":
            return
        session.status = "ended"
        self._stop_session(session, reason, session.playback)
        for handle in session.gate_timers.values():
            self._timers.cancel(handle)
        session.gate_timers.clear()
        for utterance in (session.playing, *session.pending):
            if utterance is not None:
                utterance.outcome = "abandoned"
        session.playing, session.open_utterance = None, None
        session.pending.clear()
        self._emit(session, {"type": "session.state_updated", "state": "closed", "reason": reason})
        session.room.close_all(self.end_close_code, reason)

    # -- the LITE WebSocket ------------------------------------------------------------------

    async def _handle_websocket(self, request: web.Request) -> web.StreamResponse:
        session = self._sessions.get(request.match_info["session_id"])
        if session is None or session.status != "active":
            return self._error_response(404, "session not found or not active")
        if request.query.get("token") != session.ws_token:
            return self._error_response(401, "invalid or missing WebSocket token")
        async with self._open_channel(request) as peer:
            self._on_connect(session, peer)
            try:
                async for frame in peer.ws:
                    if frame.type is WSMsgType.TEXT:
                        self._on_message(session, peer, frame.data)
                    elif frame.type is WSMsgType.BINARY:
                        session.messages_received += 1
                        session.protocol_errors.append("binary frame dropped: send JSON text")
            finally:
                self._on_disconnect(session, peer)
        return peer.ws

    def _on_connect(self, session: LiveAvatarSessionRecord, peer: ChannelPeer) -> None:
        session.room.add(peer)
        session.ws_connections += 1
        self._touch(session)
        self._send(session, peer, {"type": "session.state_updated", "state": "connecting"})

        def connected() -> None:
            session.gate_timers.pop(peer, None)
            if session.status == "active" and not peer.closed_by_emulator:
                session.connected_peers.add(peer)
                self._send(session, peer, {"type": "session.state_updated", "state": "connected"})

        session.gate_timers[peer] = self._timers.call_later(self.connected_delay, connected)

    def _on_disconnect(self, session: LiveAvatarSessionRecord, peer: ChannelPeer) -> None:
        """A closed WebSocket is not a stop: the session (and its meter) carries on."""
        session.room.remove(peer)
        session.connected_peers.discard(peer)
        self._timers.cancel(session.gate_timers.pop(peer, None))

    def _on_message(self, session: LiveAvatarSessionRecord, peer: ChannelPeer, raw: str) -> None:
        if session.status != "active":
            return  # in flight while the channel was closing
        session.messages_received += 1
        try:
            if peer not in session.connected_peers:
                session.messages_before_connected += 1
                raise ProtocolError(
                    "message received before session.state_updated 'connected': dropped"
                )
            message, size = _parse_message(raw, self.max_message_bytes)
            kind = message["type"]
            if kind == "agent.speak":
                self._on_speak(session, _parse_speak(message, size))
            elif kind == "agent.speak_end":
                self._on_speak_end(session, _required_event_id(message))
            elif kind == "agent.interrupt":
                self._on_interrupt(session)
            elif kind == "session.keep_alive":
                session.keep_alives += 1
                self._touch(session)
            elif kind in _LISTENING_TYPES:
                session.listening_events.append(kind)
            else:
                raise ProtocolError(f"unknown message type {kind!r}")
        except ProtocolError as exc:
            session.protocol_errors.append(str(exc))
            return
        if self.idle_reset_by_any_message:
            self._touch(session)

    def _on_speak(self, session: LiveAvatarSessionRecord, speak: _Speak) -> None:
        seconds = pcm16_seconds(speak.audio_bytes, _SAMPLE_RATE)
        owner = session.event_owner.get(speak.event_id)
        if owner is not None and owner.done and owner.outcome in ("queued", "playing"):
            raise ProtocolError(f"agent.speak for event_id {speak.event_id!r} after its speak_end")
        played = owner is None or owner.outcome in ("queued", "playing")
        session.speak_chunks.append(
            SpeakChunk(speak.event_id, speak.audio_bytes, speak.message_bytes, seconds, played)
        )
        by_event = session.audio_seconds_by_event
        by_event[speak.event_id] = by_event.get(speak.event_id, 0.0) + seconds
        if not played:
            session.ignored_chunks += 1  # late audio of an interrupted or finished utterance
        else:
            self._append_audio(session, speak.event_id, seconds)
        if not session.channel_dropped and self.faults.channel_drop_due(
            session.audio_seconds_received
        ):
            session.channel_dropped = True
            session.room.close_all(WSCloseCode.INTERNAL_ERROR, "channel dropped")

    def _append_audio(
        self, session: LiveAvatarSessionRecord, event_id: str, seconds: float
    ) -> None:
        """Append to the playback buffer: the open utterance, or a new one queued behind."""
        utterance = session.open_utterance
        if utterance is None:
            number = len(session.utterances) + 1
            utterance = LiveAvatarUtterance(f"u{number}", f"task-{secrets.token_hex(6)}")
            session.utterances.append(utterance)
            session.open_utterance = utterance
            if session.playing is None:
                session.playing = utterance
                utterance.outcome = "playing"
            else:
                session.pending.append(utterance)
        if event_id not in utterance.event_ids:
            utterance.event_ids.append(event_id)
        session.event_owner[event_id] = utterance
        utterance.chunk_seconds.append(seconds)
        if utterance is session.playing:
            session.playback.feed(utterance.utterance_id, seconds, done=False)

    def _on_speak_end(self, session: LiveAvatarSessionRecord, event_id: str) -> None:
        session.speak_ends.append(event_id)
        utterance = session.open_utterance
        if utterance is None:
            session.stray_speak_ends += 1  # nothing open: after an interrupt, or a duplicate
            return
        utterance.done = True
        utterance.end_event_id = event_id
        session.open_utterance = None
        if utterance is session.playing:
            session.playback.feed(utterance.utterance_id, 0.0, done=True)

    def _on_interrupt(self, session: LiveAvatarSessionRecord) -> None:
        session.interrupts += 1
        stopped = session.playback.interrupt()
        playing = session.playing
        if stopped is None or playing is None:
            session.useless_interrupts += 1
            return
        playing.outcome = "interrupted"
        playing.played_seconds = stopped[1]
        for cleared in session.pending:
            cleared.outcome = "interrupted"
        session.playing, session.open_utterance = None, None
        session.pending.clear()
        if self.faults.mute_interrupts:
            return
        for event_type in self.interrupt_events:
            self._emit(session, _speak_event(event_type, playing))

    def _on_speech_started(self, session: LiveAvatarSessionRecord) -> None:
        if session.playing is not None:
            self._emit(session, _speak_event("agent.speak_started", session.playing))

    def _on_speech_finished(self, session: LiveAvatarSessionRecord, played: float) -> None:
        finished = session.playing
        if finished is None:
            return
        finished.outcome = "finished"
        finished.played_seconds = played
        session.playing = None
        self._emit(session, _speak_event("agent.speak_ended", finished))
        if session.pending:
            upcoming = session.pending.popleft()
            upcoming.outcome = "playing"
            session.playing = upcoming
            session.playback.feed(upcoming.utterance_id, upcoming.seconds, done=upcoming.done)

    def _send(
        self, session: LiveAvatarSessionRecord, peer: ChannelPeer, event: dict[str, Any]
    ) -> None:
        session.events_sent.append(event)
        peer.send_json(event)

    def _emit(self, session: LiveAvatarSessionRecord, event: dict[str, Any]) -> None:
        session.events_sent.append(event)
        session.room.broadcast(event)


def _speak_event(event_type: str, utterance: LiveAvatarUtterance) -> dict[str, Any]:
    return {
        "type": event_type,
        "event_id": utterance.event_ids[0],
        "task": {"id": utterance.task_id},
    }


def _missing_route(status: int) -> Handler:
    """A handler answering as FastAPI does for a route (or method) it does not have."""

    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"detail": _MISSING_ROUTE_STATUSES[status]}, status=status)

    return handler
