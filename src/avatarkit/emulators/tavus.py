"""Tavus CVI emulator: a stateful contract fake of ``https://tavusapi.com/v2`` and its room.

REST (``x-api-key`` auth): ``POST/GET /v2/conversations``, ``GET/DELETE
/v2/conversations/{id}``, ``POST /v2/conversations/{id}/end``, ``POST /v2/pals`` and
``/v2/personas`` (one store, both vocabularies) with their ``GET .../{id}``. A conversation takes
a concurrency slot and starts billing when it is created, and ends on ``/end``, ``DELETE``, or
the ``max_call_duration`` / ``participant_absent_timeout`` / ``participant_left_timeout`` timers.

The Daily room, where Tavus' Interactions Protocol travels as app-messages, is stood in for by a
public WebSocket at ``<conversation_url>/app-messages`` carrying the same JSON messages. The
replica "plays" ``conversation.echo`` audio in real time and answers with
``conversation.replica.started_speaking`` / ``stopped_speaking`` / ``replica_interrupted``;
``system.shutdown`` precedes the close when the conversation ends.

Behaviour this fake chooses where Tavus' contract is unverified (and how to change it):

* Error bodies are ``{"error": <reason phrase>, "message": <text>}`` (``error_shape``).
* Concurrency exhaustion answers ``concurrency_limit_status`` (402 by default).
* An ``Idempotency-Key`` header replays the first successful create made with the same key and
  API key (same body, no new slot, no new meter). Whether Tavus honours it is unverified.
* 429 faults send ``Retry-After`` in seconds (``faults.rate_limit_next(retry_after=None)`` omits).
* ``max_call_duration`` defaults to 3600 s when not given; ``sample_rate`` to 24000.
* A channel dropped by the ``drop_channel`` fault does not count as the participant leaving.
* Audio arriving for an utterance that already finished or was interrupted is recorded but not
  played.

Why one module: it is one vendor contract. The REST routes and the room's Interactions
Protocol act on one conversation record and its state machine (create, timers, echo playback,
end); the shared plumbing and the PCM16 checks are in ``_base`` and ``_media``.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from types import MappingProxyType
from typing import Any, ClassVar, Literal, get_args

from aiohttp import WSCloseCode, WSMsgType, web

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
from ._media import base64_audio, pcm16_seconds, require_whole_samples

__all__ = [
    "SUPPORTED_SAMPLE_RATES",
    "ErrorShape",
    "TavusConversation",
    "TavusEmulator",
    "TavusPal",
]

#: How error bodies look: ``{"error", "message"}``, ``{"message"}``, or plain text.
ErrorShape = Literal["error_message", "message", "text"]
_PipelineMode = Literal["full", "echo"]
_ConversationStatus = Literal["active", "ended"]

SUPPORTED_SAMPLE_RATES: frozenset[int] = frozenset({16000, 24000, 44100, 48000})
_DEFAULT_SAMPLE_RATE = 24000
#: Simulated speaking time of a text echo.
_SECONDS_PER_TEXT_CHARACTER = 0.06
_MAX_CALL_DURATION_LIMIT = 3600
_DEFAULT_PARTICIPANT_LEFT_TIMEOUT = 0
_DEFAULT_PARTICIPANT_ABSENT_TIMEOUT = 300

_ERROR_SHAPES: frozenset[str] = frozenset(get_args(ErrorShape))
_PIPELINE_MODES: frozenset[str] = frozenset(get_args(_PipelineMode))
_BOOLEAN_PROPERTIES = ("enable_recording", "enable_closed_captions", "apply_greenscreen")
_STRING_PROPERTIES = ("language",)
_CONTROL_EVENTS = frozenset(
    {
        "conversation.respond",
        "conversation.overwrite_llm_context",
        "conversation.append_llm_context",
    }
)


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


@dataclass
class TavusPal:
    """A PAL (legacy name: persona). ``default_face_id`` is the face (legacy: replica)."""

    pal_id: str
    name: str | None
    default_face_id: str | None
    pipeline_mode: _PipelineMode
    created_at: str = field(default_factory=now_iso)

    def as_pal(self) -> dict[str, Any]:
        return {
            "pal_id": self.pal_id,
            "pal_name": self.name,
            "default_face_id": self.default_face_id,
            "pipeline_mode": self.pipeline_mode,
            "created_at": self.created_at,
        }

    def as_persona(self) -> dict[str, Any]:
        return {
            "persona_id": self.pal_id,
            "persona_name": self.name,
            "default_replica_id": self.default_face_id,
            "pipeline_mode": self.pipeline_mode,
            "created_at": self.created_at,
        }


@dataclass(eq=False)
class TavusConversation(SessionRecord):
    """One conversation: what was created, its lifecycle, and what its room received and sent.

    Billed from creation (``ledger_entry`` is None in ``test_mode``)."""

    conversation_id: str
    conversation_name: str | None
    conversation_url: str
    pal_id: str
    face_id: str
    callback_url: str | None
    conversational_context: str | None
    custom_greeting: str | None
    audio_only: bool
    require_auth: bool
    test_mode: bool
    properties: dict[str, Any]
    meeting_token: str | None
    created_at: str = field(default_factory=now_iso)
    status: _ConversationStatus = "active"
    deleted: bool = False
    # What the room received (so tests can assert what the SDK sent).
    echo_messages: int = 0
    audio_seconds_by_inference: dict[str, float] = field(default_factory=dict)
    done_inferences: list[str] = field(default_factory=list)
    text_echoes: list[str] = field(default_factory=list)
    interrupts: int = 0
    control_messages: list[dict[str, Any]] = field(default_factory=list)
    # What the room sent, and channel state.
    events_sent: list[dict[str, Any]] = field(default_factory=list)
    channel_dropped: bool = False
    ever_joined: bool = False
    room: Room = field(default_factory=Room, repr=False)
    playback: SpeechPlayback = field(init=False, repr=False)

    @property
    def audio_seconds_received(self) -> float:
        return sum(self.audio_seconds_by_inference.values())

    @property
    def participants(self) -> int:
        return len(self.room)

    def create_response(self) -> dict[str, Any]:
        """The body of a successful ``POST /v2/conversations``."""
        body: dict[str, Any] = {
            "conversation_id": self.conversation_id,
            "conversation_name": self.conversation_name,
            "conversation_url": self.conversation_url,
            "status": self.status,
            "callback_url": self.callback_url,
            "created_at": self.created_at,
        }
        if self.require_auth:
            body["meeting_token"] = self.meeting_token
        return body

    def as_json(self) -> dict[str, Any]:
        """The conversation object of ``GET /v2/conversations[/{id}]``."""
        return {
            "conversation_id": self.conversation_id,
            "conversation_name": self.conversation_name,
            "conversation_url": self.conversation_url,
            "status": self.status,
            "end_reason": self.end_reason,
            "callback_url": self.callback_url,
            "created_at": self.created_at,
            "pal_id": self.pal_id,
            "face_id": self.face_id,
            "properties": dict(self.properties),
        }

    def describe(self) -> dict[str, Any]:
        """The emulator's view, for ``GET /_emulator/state``."""
        return {
            **self.as_json(),
            "deleted": self.deleted,
            "test_mode": self.test_mode,
            "billed_seconds": self.billed_seconds,
            "participants": self.participants,
            "echo_messages": self.echo_messages,
            "audio_seconds_by_inference": dict(self.audio_seconds_by_inference),
            "done_inferences": list(self.done_inferences),
            "text_echoes": list(self.text_echoes),
            "interrupts": self.interrupts,
            "control_messages": list(self.control_messages),
            "protocol_errors": list(self.protocol_errors),
            "events_sent": list(self.events_sent),
            "channel_dropped": self.channel_dropped,
            "ever_joined": self.ever_joined,
        }


@dataclass(frozen=True)
class _ConversationRequest:
    pal_id: str
    face_id: str | None
    conversation_name: str | None
    callback_url: str | None
    conversational_context: str | None
    custom_greeting: str | None
    audio_only: bool
    require_auth: bool
    test_mode: bool
    properties: dict[str, Any]


@dataclass(frozen=True)
class _AudioEcho:
    inference_id: str
    seconds: float
    done: bool


@dataclass(frozen=True)
class _TextEcho:
    inference_id: str
    text: str


# --------------------------------------------------------------------------------------------
# Request validation
# --------------------------------------------------------------------------------------------


def _optional_str(body: Mapping[str, Any], key: str, *, prefix: str = "") -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise BadRequest(f"{prefix}{key} must be a string")
    return value


def _optional_bool(body: Mapping[str, Any], key: str, *, prefix: str = "") -> bool | None:
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise BadRequest(f"{prefix}{key} must be a boolean")
    return value


def _aliased_str(body: Mapping[str, Any], name: str, alias: str) -> str | None:
    """A field that may be sent under its current ``name`` or its legacy ``alias``."""
    value, legacy = _optional_str(body, name), _optional_str(body, alias)
    for key, given in ((name, value), (alias, legacy)):
        if given == "":
            raise BadRequest(f"{key} must not be empty")
    if value is not None and legacy is not None and value != legacy:
        raise BadRequest(f"{name} and {alias} name the same thing but differ")
    return value if value is not None else legacy


def _integer_property(properties: Mapping[str, Any], key: str, low: int, high: int | None) -> int:
    value = properties[key]
    in_range = (
        isinstance(value, int)
        and not isinstance(value, bool)
        and value >= low
        and (high is None or value <= high)
    )
    if not in_range:
        bounds = f"between {low} and {high}" if high is not None else f">= {low}"
        raise BadRequest(f"properties.{key} must be an integer {bounds}")
    return int(value)


def _parse_properties(raw: object) -> dict[str, Any]:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise BadRequest("properties must be an object")
    properties: dict[str, Any] = {
        "max_call_duration": _MAX_CALL_DURATION_LIMIT,
        "participant_left_timeout": _DEFAULT_PARTICIPANT_LEFT_TIMEOUT,
        "participant_absent_timeout": _DEFAULT_PARTICIPANT_ABSENT_TIMEOUT,
    }
    if "max_call_duration" in raw:
        properties["max_call_duration"] = _integer_property(
            raw, "max_call_duration", 1, _MAX_CALL_DURATION_LIMIT
        )
    for key in ("participant_left_timeout", "participant_absent_timeout"):
        if key in raw:
            properties[key] = _integer_property(raw, key, 0, None)
    for key in _BOOLEAN_PROPERTIES:
        if (flag := _optional_bool(raw, key, prefix="properties.")) is not None:
            properties[key] = flag
    for key in _STRING_PROPERTIES:
        if (text := _optional_str(raw, key, prefix="properties.")) is not None:
            properties[key] = text
    return properties


def _parse_conversation_request(body: Mapping[str, Any]) -> _ConversationRequest:
    pal_id = _aliased_str(body, "pal_id", "persona_id")
    face_id = _aliased_str(body, "face_id", "replica_id")
    if pal_id is None:
        raise BadRequest("pal_id (or persona_id) is required")
    return _ConversationRequest(
        pal_id=pal_id,
        face_id=face_id,
        conversation_name=_optional_str(body, "conversation_name"),
        callback_url=_optional_str(body, "callback_url"),
        conversational_context=_optional_str(body, "conversational_context"),
        custom_greeting=_optional_str(body, "custom_greeting"),
        audio_only=_optional_bool(body, "audio_only") or False,
        require_auth=_optional_bool(body, "require_auth") or False,
        test_mode=_optional_bool(body, "test_mode") or False,
        properties=_parse_properties(body.get("properties")),
    )


def _pipeline_mode(body: Mapping[str, Any]) -> _PipelineMode:
    mode = body.get("pipeline_mode", "full")
    if mode not in _PIPELINE_MODES:
        raise BadRequest(f"pipeline_mode must be one of {sorted(_PIPELINE_MODES)}")
    checked: _PipelineMode = mode
    return checked


# --------------------------------------------------------------------------------------------
# App-message validation
# --------------------------------------------------------------------------------------------


def _parse_done(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if value in ("true", "false"):
        return value == "true"
    raise ProtocolError("properties.done must be a boolean or 'true'/'false'")


def _parse_audio_echo(properties: Mapping[str, Any]) -> _AudioEcho:
    inference_id = properties.get("inference_id")
    if not isinstance(inference_id, str) or not inference_id:
        raise ProtocolError("properties.inference_id is required in audio mode")
    sample_rate = properties.get("sample_rate", _DEFAULT_SAMPLE_RATE)
    if isinstance(sample_rate, bool) or sample_rate not in SUPPORTED_SAMPLE_RATES:
        raise ProtocolError(
            f"properties.sample_rate must be one of {sorted(SUPPORTED_SAMPLE_RATES)},"
            f" got {sample_rate!r}"
        )
    pcm = base64_audio(properties.get("audio"), "properties.audio")
    require_whole_samples(pcm, "properties.audio")
    return _AudioEcho(
        inference_id=inference_id,
        seconds=pcm16_seconds(len(pcm), sample_rate),
        done=_parse_done(properties.get("done", False)),
    )


def _parse_text_echo(properties: Mapping[str, Any]) -> _TextEcho:
    text = properties.get("text")
    if not isinstance(text, str) or not text:
        raise ProtocolError("properties.text must be a non-empty string in text mode")
    inference_id = properties.get("inference_id")
    if not isinstance(inference_id, str) or not inference_id:
        inference_id = f"text-{secrets.token_hex(4)}"
    return _TextEcho(inference_id=inference_id, text=text)


def _parse_app_message(raw: str, conversation_id: str) -> dict[str, Any]:
    """The message as an object, checked for the envelope every app-message shares."""
    message = json_message(raw)
    if message.get("message_type") != "conversation":
        raise ProtocolError("message_type must be 'conversation'")
    if message.get("conversation_id") != conversation_id:
        raise ProtocolError(
            f"conversation_id {message.get('conversation_id')!r} does not match this room"
        )
    if message.get("properties") is None:
        message["properties"] = {}
    if not isinstance(message["properties"], dict):
        raise ProtocolError("properties must be an object")
    return message


def _conversation_event(
    conversation: TavusConversation,
    event_type: str,
    *,
    inference_id: str | None = None,
    properties: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """An Interactions Protocol message from the replica to the room."""
    event: dict[str, Any] = {
        "message_type": "conversation",
        "event_type": event_type,
        "conversation_id": conversation.conversation_id,
    }
    if inference_id is not None:
        event["inference_id"] = inference_id
    event["properties"] = properties or {}
    return event


# --------------------------------------------------------------------------------------------
# The emulator
# --------------------------------------------------------------------------------------------


class TavusEmulator(EmulatorServer):
    """Tavus CVI contract fake. ``async with TavusEmulator(...) as emu:`` then use ``emu.url``.

    ``faces`` are the known face (replica) ids and ``pals`` maps known PAL (persona) ids to their
    default face, which is registered as known too. With ``accept_any_face`` every face id
    exists. At most ``max_concurrent`` conversations may be active; one more is refused with
    ``concurrency_limit_status``. See the module docstring for the unverified choices.
    """

    name: ClassVar[str] = "tavus"
    auth_header: ClassVar[str] = "x-api-key"

    def __init__(
        self,
        *,
        api_keys: Iterable[str] = ("test-key",),
        faces: Iterable[str] = (),
        pals: Mapping[str, str] | None = None,
        max_concurrent: int = 10,
        host: str = "127.0.0.1",
        port: int = 0,
        accept_any_face: bool = False,
        concurrency_limit_status: int = 402,
        error_shape: ErrorShape = "error_message",
    ) -> None:
        super().__init__(
            api_keys=api_keys, faces=faces, accept_any_face=accept_any_face, host=host,
            port=port, max_concurrent=max_concurrent,
            concurrency_limit_status=concurrency_limit_status)
        if error_shape not in _ERROR_SHAPES:
            raise ValueError(f"error_shape must be one of {sorted(_ERROR_SHAPES)}")
        self.error_shape: ErrorShape = error_shape
        self._pals: dict[str, TavusPal] = {}
        self._conversations: dict[str, TavusConversation] = {}
        self._idempotent_creates: dict[tuple[str, str], dict[str, Any]] = {}
        for pal_id, default_face_id in (pals or {}).items():
            self.add_pal(pal_id, default_face_id)

    # -- Python control surface ------------------------------------------------------------

    @property
    def conversations(self) -> Mapping[str, TavusConversation]:
        """Every conversation created since the last reset (deleted ones included)."""
        return MappingProxyType(self._conversations)

    @property
    def pals(self) -> Mapping[str, TavusPal]:
        return MappingProxyType(self._pals)

    def add_pal(
        self, pal_id: str, default_face_id: str, pipeline_mode: _PipelineMode = "echo"
    ) -> None:
        """Register a PAL (usable as a persona id too) and its default face."""
        if pipeline_mode not in _PIPELINE_MODES:
            raise ValueError(f"pipeline_mode must be one of {sorted(_PIPELINE_MODES)}")
        self.add_face(default_face_id)
        self._pals[pal_id] = TavusPal(pal_id, None, default_face_id, pipeline_mode)

    def end_conversation(self, conversation_id: str, reason: str = "ended") -> None:
        """End a conversation as Tavus would (meter stops, room gets ``system.shutdown``)."""
        self._end(self._conversations[conversation_id], reason)

    # -- EmulatorServer hooks --------------------------------------------------------------

    def _add_vendor_routes(self, app: web.Application) -> None:
        route = self._add_api_route
        route(
            app, "POST", "/v2/conversations", self._handle_create_conversation, operation="create"
        )
        route(app, "GET", "/v2/conversations", self._handle_list_conversations)
        route(app, "GET", "/v2/conversations/{conversation_id}", self._handle_get_conversation)
        route(
            app,
            "POST",
            "/v2/conversations/{conversation_id}/end",
            self._handle_end_conversation,
            operation="end",
        )
        route(
            app,
            "DELETE",
            "/v2/conversations/{conversation_id}",
            self._handle_delete_conversation,
            operation="end",
        )
        route(app, "POST", "/v2/pals", self._handle_create_pal)
        route(app, "POST", "/v2/personas", self._handle_create_persona)
        route(app, "GET", "/v2/pals/{pal_id}", self._handle_get_pal)
        route(app, "GET", "/v2/personas/{pal_id}", self._handle_get_persona)
        app.router.add_get("/rooms/{conversation_id}/app-messages", self._handle_join_room)

    def _error_response(
        self, status: int, message: str, *, headers: Mapping[str, str] | None = None
    ) -> web.Response:
        if self.error_shape == "text":
            return web.Response(status=status, text=message, headers=headers)
        body: dict[str, str] = {"message": message}
        if self.error_shape == "error_message":
            body = {"error": HTTPStatus(status).phrase, "message": message}
        return web.json_response(body, status=status, headers=headers)

    def _vendor_state(self) -> dict[str, Any]:
        return {
            "conversations": [c.describe() for c in self._conversations.values()],
            "pals": [pal.as_pal() for pal in self._pals.values()],
            "faces": sorted(self.faces),
        }

    def _reset_sessions(self) -> None:
        self._end_and_forget(self._conversations, self._end, "emulator_reset")
        self._idempotent_creates.clear()

    # -- conversations -----------------------------------------------------------------------

    async def _handle_create_conversation(self, request: web.Request) -> web.Response:
        replay_key = None
        if (idempotency_key := request.headers.get("Idempotency-Key")) is not None:
            replay_key = (self._api_key_identity(request), idempotency_key)
            if (first_response := self._idempotent_creates.get(replay_key)) is not None:
                return web.json_response(first_response)
        try:
            spec = _parse_conversation_request(await read_json_object(request))
            pal = self._pals.get(spec.pal_id)
            if pal is None:
                raise BadRequest(f"PAL (persona) {spec.pal_id!r} not found", status=404)
            face_id = spec.face_id or pal.default_face_id
            if face_id is None:
                raise BadRequest(
                    f"face_id (or replica_id) is required: PAL {pal.pal_id!r} has no default face"
                )
            if not self.has_face(face_id):
                raise BadRequest(f"face (replica) {face_id!r} not found", status=404)
            if not spec.test_mode:
                self.check_capacity("maximum concurrent conversations reached")
        except ValueError as exc:
            return self._error_response(400, str(exc))
        except BadRequest as exc:
            return self._error_response(exc.status, str(exc))
        body = self._open(spec, face_id).create_response()
        if replay_key is not None:
            self._idempotent_creates[replay_key] = body
        return web.json_response(body)

    def _open(self, spec: _ConversationRequest, face_id: str) -> TavusConversation:
        conversation_id = f"c{secrets.token_hex(6)}"
        conversation = TavusConversation(
            conversation_id=conversation_id,
            conversation_name=spec.conversation_name,
            conversation_url=f"{self.url}/rooms/{conversation_id}",
            pal_id=spec.pal_id,
            face_id=face_id,
            callback_url=spec.callback_url,
            conversational_context=spec.conversational_context,
            custom_greeting=spec.custom_greeting,
            audio_only=spec.audio_only,
            require_auth=spec.require_auth,
            test_mode=spec.test_mode,
            properties=spec.properties,
            meeting_token=secrets.token_urlsafe(24) if spec.require_auth else None,
        )
        conversation.playback = self._playback(
            on_started=lambda inference_id: self._emit(
                conversation, "conversation.replica.started_speaking", inference_id=inference_id
            ),
            on_stopped=lambda inference_id, seconds: self._emit_stopped_speaking(
                conversation, inference_id, seconds
            ),
        )
        self._conversations[conversation_id] = conversation
        if spec.test_mode:  # nothing is billed; the conversation is over at once
            conversation.status = "ended"
            conversation.end_reason = "test_mode"
            return conversation
        self._bill(conversation, conversation_id)
        for timeout in ("max_call_duration", "participant_absent_timeout"):
            self._end_after(conversation, timeout, spec.properties[timeout], self._end)
        return conversation

    def _find(self, request: web.Request) -> TavusConversation:
        conversation_id = request.match_info["conversation_id"]
        conversation = self._conversations.get(conversation_id)
        if conversation is None or conversation.deleted:
            raise BadRequest(f"conversation {conversation_id!r} not found", status=404)
        return conversation

    async def _handle_get_conversation(self, request: web.Request) -> web.Response:
        try:
            return web.json_response(self._find(request).as_json())
        except BadRequest as exc:
            return self._error_response(exc.status, str(exc))

    async def _handle_list_conversations(self, request: web.Request) -> web.Response:
        status = request.query.get("status")
        if status not in (None, "active", "ended"):
            return self._error_response(400, "status must be 'active' or 'ended'")
        data = [
            conversation.as_json()
            for conversation in self._conversations.values()
            if not conversation.deleted and status in (None, conversation.status)
        ]
        return web.json_response({"data": data, "total_count": len(data)})

    async def _handle_end_conversation(self, request: web.Request) -> web.Response:
        try:
            conversation = self._find(request)
        except BadRequest as exc:
            return self._error_response(exc.status, str(exc))
        self._end(conversation, "ended")
        return web.json_response({})

    async def _handle_delete_conversation(self, request: web.Request) -> web.Response:
        try:
            conversation = self._find(request)
        except BadRequest as exc:
            return self._error_response(exc.status, str(exc))
        self._end(conversation, "deleted")
        conversation.deleted = True
        return web.Response(status=204)

    def _end(self, conversation: TavusConversation, reason: str) -> None:
        if conversation.status == "ended":
            return
        conversation.status = "ended"
        self._stop_session(conversation, reason, conversation.playback)
        self._emit(conversation, "system.shutdown", properties={"reason": reason})
        conversation.room.close_all(WSCloseCode.OK, "conversation ended")

    # -- PALs / personas ---------------------------------------------------------------------

    async def _handle_create_pal(self, request: web.Request) -> web.Response:
        return await self._create_pal_like(request, legacy=False)

    async def _handle_create_persona(self, request: web.Request) -> web.Response:
        return await self._create_pal_like(request, legacy=True)

    async def _create_pal_like(self, request: web.Request, *, legacy: bool) -> web.Response:
        try:
            body = await read_json_object(request)
            if legacy:
                name = _aliased_str(body, "persona_name", "pal_name")
                face_id = _aliased_str(body, "default_replica_id", "default_face_id")
            else:
                name = _aliased_str(body, "pal_name", "persona_name")
                face_id = _aliased_str(body, "default_face_id", "default_replica_id")
                if name is None:
                    raise BadRequest("pal_name is required")
                if face_id is None:
                    raise BadRequest("default_face_id is required")
            mode = _pipeline_mode(body)
            if face_id is not None and not self.has_face(face_id):
                raise BadRequest(f"face (replica) {face_id!r} not found", status=404)
        except ValueError as exc:
            return self._error_response(400, str(exc))
        except BadRequest as exc:
            return self._error_response(exc.status, str(exc))
        pal = TavusPal(f"p{secrets.token_hex(6)}", name, face_id, mode)
        self._pals[pal.pal_id] = pal
        return web.json_response(pal.as_persona() if legacy else pal.as_pal())

    async def _handle_get_pal(self, request: web.Request) -> web.Response:
        if (pal := self._pals.get(request.match_info["pal_id"])) is None:
            return self._error_response(404, f"PAL {request.match_info['pal_id']!r} not found")
        return web.json_response(pal.as_pal())

    async def _handle_get_persona(self, request: web.Request) -> web.Response:
        if (pal := self._pals.get(request.match_info["pal_id"])) is None:
            return self._error_response(404, f"persona {request.match_info['pal_id']!r} not found")
        return web.json_response(pal.as_persona())

    # -- the room (stands in for the Daily room's app-messages) ------------------------------

    async def _handle_join_room(self, request: web.Request) -> web.StreamResponse:
        conversation_id = request.match_info["conversation_id"]
        conversation = self._conversations.get(conversation_id)
        if conversation is None or conversation.deleted or conversation.status != "active":
            return self._error_response(404, f"room {conversation_id!r} not found or ended")
        if conversation.require_auth and request.query.get("t") != conversation.meeting_token:
            return self._error_response(401, "this room requires a valid meeting token (?t=)")
        async with self._open_channel(request) as peer:
            self._participant_joined(conversation, peer)
            try:
                async for frame in peer.ws:
                    if frame.type is WSMsgType.TEXT:
                        self._on_app_message(conversation, frame.data)
                    elif frame.type is WSMsgType.BINARY:
                        conversation.protocol_errors.append(
                            "binary frame ignored: app-messages are JSON text"
                        )
            finally:
                self._participant_left(conversation, peer)
        return peer.ws

    def _participant_joined(self, conversation: TavusConversation, peer: ChannelPeer) -> None:
        conversation.room.add(peer)
        conversation.ever_joined = True
        self._timers.disarm(conversation.timers, "participant_absent_timeout")
        self._timers.disarm(conversation.timers, "participant_left_timeout")
        event = _conversation_event(conversation, "system.replica_joined")
        conversation.events_sent.append(event)
        peer.send_json(event)

    def _participant_left(self, conversation: TavusConversation, peer: ChannelPeer) -> None:
        conversation.room.remove(peer)
        # A channel the emulator dropped (fault) or closed (end) is not a participant leaving.
        if (
            conversation.status == "active"
            and not peer.closed_by_emulator
            and len(conversation.room) == 0
        ):
            timeout = "participant_left_timeout"
            self._end_after(conversation, timeout, conversation.properties[timeout], self._end)

    def _on_app_message(self, conversation: TavusConversation, raw: str) -> None:
        if conversation.status != "active":
            return  # in flight while the room was closing
        try:
            message = _parse_app_message(raw, conversation.conversation_id)
            event_type = message.get("event_type")
            properties: dict[str, Any] = message["properties"]
            if event_type == "conversation.echo":
                modality = properties.get("modality")
                if modality == "audio":
                    self._on_audio_echo(conversation, _parse_audio_echo(properties))
                elif modality == "text":
                    self._on_text_echo(conversation, _parse_text_echo(properties))
                else:
                    raise ProtocolError("properties.modality must be 'audio' or 'text'")
            elif event_type == "conversation.interrupt":
                self._on_interrupt(conversation)
            elif event_type in _CONTROL_EVENTS:
                conversation.control_messages.append(message)
            else:
                raise ProtocolError(f"unknown event_type {event_type!r}")
        except ProtocolError as exc:
            conversation.protocol_errors.append(str(exc))

    def _on_audio_echo(self, conversation: TavusConversation, echo: _AudioEcho) -> None:
        conversation.echo_messages += 1
        by_inference = conversation.audio_seconds_by_inference
        by_inference[echo.inference_id] = by_inference.get(echo.inference_id, 0.0) + echo.seconds
        if echo.done:
            conversation.done_inferences.append(echo.inference_id)
        conversation.playback.feed(echo.inference_id, echo.seconds, done=echo.done)
        if not conversation.channel_dropped and self.faults.channel_drop_due(
            conversation.audio_seconds_received
        ):
            conversation.channel_dropped = True
            conversation.room.close_all(WSCloseCode.INTERNAL_ERROR, "channel dropped")

    def _on_text_echo(self, conversation: TavusConversation, echo: _TextEcho) -> None:
        conversation.echo_messages += 1
        conversation.text_echoes.append(echo.text)
        seconds = len(echo.text) * _SECONDS_PER_TEXT_CHARACTER
        conversation.playback.feed(echo.inference_id, seconds, done=True)

    def _on_interrupt(self, conversation: TavusConversation) -> None:
        conversation.interrupts += 1
        stopped = conversation.playback.interrupt()
        if stopped is None or self.faults.mute_interrupts:
            return
        inference_id, played = stopped
        self._emit(conversation, "conversation.replica_interrupted", inference_id=inference_id)
        self._emit_stopped_speaking(conversation, inference_id, played)

    def _emit_stopped_speaking(
        self, conversation: TavusConversation, inference_id: str, seconds: float
    ) -> None:
        self._emit(
            conversation,
            "conversation.replica.stopped_speaking",
            inference_id=inference_id,
            properties={"duration": round(seconds, 3)},
        )

    def _emit(
        self,
        conversation: TavusConversation,
        event_type: str,
        *,
        inference_id: str | None = None,
        properties: dict[str, Any] | None = None,
    ) -> None:
        event = _conversation_event(
            conversation, event_type, inference_id=inference_id, properties=properties
        )
        conversation.events_sent.append(event)
        conversation.room.broadcast(event)
