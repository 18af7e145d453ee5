"""D-ID's LiveKit ``sessions/join`` in the D-ID emulator: D-ID's worker joins *your* room.

``POST /v2/agents/{agent_id}/sessions/join`` ``{transport: {provider: "livekit", server_url,
token, room_name}, audio_config: {sample_rate: 16000 | 24000 | 48000}}`` answers 201 ``{id}``
and **starts billing**; D-ID's worker then joins the room with the token it was given, as a
standard LiveKit avatar worker (:class:`~avatarkit.emulators._livekit_worker.
LiveKitAvatarWorker`): audio on ``lk.audio_stream`` at the configured rate, ``lk.clear_buffer``
to interrupt, ``lk.playback_started|finished`` back to the agent. Text topics from D-ID's
LiveKit commands page: ``did.speak`` (``{"script": {"type": "text", "input"}}``, spoken as
``seconds_per_text_character`` per character), ``did.interrupt`` (any payload: the same as
``lk.clear_buffer``) and ``lk.chat`` (recorded: the agent's LLM is not emulated).

The worker can only join rooms this process can reach through ``connect_room``: the in-process
:class:`~avatarkit.emulators.livekit.LiveKitServerEmulator`, or a real LiveKit server through
the ``livekit`` SDK.

Behaviour chosen where D-ID's contract is unverified (``vendor-contracts.md`` §5.3):

* The response is 201 with ``{id, status: "joining"}``; the full schema was not captured.
* Request checks: ``transport.provider`` must be ``livekit``; ``server_url``, ``token`` and
  ``room_name`` non-empty strings; the token must decode as a JWT (unverified: D-ID does not
  know your secret) whose ``video.room`` is ``room_name``; ``audio_config.sample_rate`` one of
  16000, 24000 (the default) and 48000. Any other value is 400 ``BadRequestError`` naming the
  field.
* The worker joins ``join_delay`` seconds (0) after the request.
* Billing runs from the join request until the worker leaves the room: removed through the
  RoomService (how LiveKit's own plugins end an avatar: there is no end call for these
  sessions), the agent leaving (the worker follows it out), ``session_timeout`` seconds
  without audio or commands while nothing plays (``default_session_timeout``), or
  ``max_duration``. A worker that cannot join (bad token, unreachable server) ends the session
  at once and bills nothing further.
* The drop fault (``faults.drop_channel_after``) makes the worker crash out of the room after
  that much audio, mid-segment: the session ends at D-ID (billing stops) and the agent sees
  the avatar leave.
* ``faults.mute_interrupts``: the worker still stops on ``lk.clear_buffer`` but never sends the
  interrupted ``playback_finished``.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

import jwt
from aiohttp import web

from ..errors import ProviderError
from ..transport.livekit import RoomLink, connect_room, http_url
from ._base import (
    BadRequest,
    BillingEntry,
    ProtocolError,
    SessionRecord,
    json_message,
    read_json_object,
)
from ._livekit_worker import LiveKitAvatarWorker

if TYPE_CHECKING:
    from .did import DIDEmulator

__all__ = ["AVATAR_SAMPLE_RATES", "DIDRoomSession", "DIDRoomSessions"]

AVATAR_SAMPLE_RATES = (16_000, 24_000, 48_000)
_DEFAULT_SAMPLE_RATE = 24_000
_JOIN_TIMEOUT = 5.0

_RoomSessionStatus = Literal["joining", "active", "ended"]


@dataclass(eq=False)
class DIDRoomSession(SessionRecord):
    """One ``sessions/join`` session: D-ID's worker in the client's room, billed from the join
    request (so its ``ledger_entry`` is always there)."""

    session_id: str
    agent_id: str
    room: str
    server_url: str
    sample_rate: int
    token_claims: dict[str, Any]
    session_timeout: float
    ledger_entry: BillingEntry = field(kw_only=True)
    status: _RoomSessionStatus = "joining"
    worker: LiveKitAvatarWorker | None = None
    join_error: str | None = None
    commands: list[tuple[str, str]] = field(default_factory=list)
    audio_seconds: float = 0.0
    joined: asyncio.Event = field(default_factory=asyncio.Event)
    created_at: float = field(default_factory=time.monotonic)

    @property
    def audio_seconds_received(self) -> float:
        return self.worker.audio_seconds if self.worker is not None else 0.0

    @property
    def all_protocol_errors(self) -> list[str]:
        worker = self.worker.protocol_errors if self.worker is not None else []
        return [*self.protocol_errors, *worker]

    def describe(self) -> dict[str, Any]:
        worker = self.worker
        return {
            "id": self.session_id, "agent_id": self.agent_id, "room": self.room,
            "server_url": self.server_url, "sample_rate": self.sample_rate,
            "status": self.status, "end_reason": self.end_reason,
            "billed_seconds": round(self.billed_seconds, 3),
            "identity": self.token_claims.get("sub"), "kind": self.token_claims.get("kind"),
            "attributes": self.token_claims.get("attributes"),
            "audio_seconds": round(self.audio_seconds_received, 3),
            "segments": [] if worker is None else [
                {"name": s.name, "kind": s.kind, "seconds": round(s.received_seconds, 3),
                 "played": round(s.played, 3), "outcome": s.outcome} for s in worker.segments],
            "interrupts": 0 if worker is None else worker.interrupts,
            "commands": [{"topic": t, "text": x} for t, x in self.commands],
            "join_error": self.join_error,
            "protocol_errors": self.all_protocol_errors,
        }


def _bad(description: str) -> BadRequest:
    return BadRequest(description)  # the emulator answers 400 BadRequestError


def _text(body: Mapping[str, Any], key: str, where: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value.strip():
        raise _bad(f"{where}.{key} is required (a non-empty string)")
    return value


class DIDRoomSessions:
    """The ``sessions/join`` sessions of one :class:`~avatarkit.emulators.did.DIDEmulator`."""

    def __init__(self, emulator: DIDEmulator) -> None:
        self._emulator = emulator
        self._sessions: dict[str, DIDRoomSession] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        #: seconds D-ID's worker takes to join the room after the join request
        self.join_delay = 0.0
        self._closing = False

    @property
    def sessions(self) -> Mapping[str, DIDRoomSession]:
        return MappingProxyType(self._sessions)

    def describe(self) -> list[dict[str, Any]]:
        return [session.describe() for session in self._sessions.values()]

    # -- the route ------------------------------------------------------------------------

    async def handle_join(self, request: web.Request) -> web.Response:
        emulator = self._emulator
        agent_id = request.match_info["agent_id"]
        try:
            try:
                body = await read_json_object(request)
            except ValueError as exc:
                raise _bad(str(exc)) from None
            transport = body.get("transport")
            if not isinstance(transport, Mapping):
                raise _bad("transport is required: {provider: 'livekit', server_url, token, "
                           "room_name}")
            if transport.get("provider") != "livekit":
                raise _bad(f"transport.provider must be 'livekit', got "
                           f"{transport.get('provider')!r}")
            server_url = _text(transport, "server_url", "transport")
            try:
                http_url(server_url)
            except ValueError:
                raise _bad("transport.server_url must be a ws://, wss://, http:// or https:// "
                           "URL") from None
            token = _text(transport, "token", "transport")
            room = _text(transport, "room_name", "transport")
            audio_config = body.get("audio_config", {})
            if not isinstance(audio_config, Mapping):
                raise _bad("audio_config must be an object")
            sample_rate = audio_config.get("sample_rate", _DEFAULT_SAMPLE_RATE)
            if isinstance(sample_rate, bool) or sample_rate not in AVATAR_SAMPLE_RATES:
                raise _bad(f"audio_config.sample_rate must be one of {AVATAR_SAMPLE_RATES}, "
                           f"got {sample_rate!r}")
            try:
                claims = jwt.decode(token, options={"verify_signature": False})
            except jwt.PyJWTError:
                raise _bad("transport.token is not a LiveKit access token (a JWT)") from None
            video = claims.get("video")
            if not isinstance(video, Mapping) or video.get("room") != room:
                raise _bad(f"transport.token does not grant room {room!r} "
                           f"(transport.room_name)")
            if not emulator.has_face(agent_id):
                raise BadRequest(f"agent {agent_id!r} not found", status=404)  # NotFoundError
            if emulator.out_of_credits:
                # InsufficientCreditsError
                raise BadRequest("not enough credits", status=402)
            emulator.check_capacity("maximum concurrent sessions reached")
        except BadRequest as exc:
            return emulator._refuse(exc)
        session_id = f"lks_{secrets.token_urlsafe(12)}"
        session = DIDRoomSession(
            session_id=session_id, agent_id=agent_id, room=room, server_url=server_url,
            sample_rate=int(sample_rate), token_claims=dict(claims),
            ledger_entry=emulator.ledger.open(session_id),
            session_timeout=emulator.default_session_timeout)
        self._sessions[session_id] = session
        emulator._end_after(session, "max_duration", emulator.max_duration, self.end)
        self._spawn(self._join(session, token))
        return web.json_response({"id": session_id, "status": "joining"}, status=201)

    # -- the worker -------------------------------------------------------------------------

    async def _join(self, session: DIDRoomSession, token: str) -> None:
        link: RoomLink | None = None
        if self.join_delay:
            await asyncio.sleep(self.join_delay)
            if session.status == "ended":
                return
        try:
            link = await connect_room(session.server_url, token, provider="did-emulator",
                                      join_timeout=_JOIN_TIMEOUT)
        except (ProviderError, ValueError) as exc:
            session.join_error = exc.message if isinstance(exc, ProviderError) else str(exc)
            self.end(session, "join_failed")
            return
        if session.status == "ended" or self._closing:  # ended or closed while joining
            await link.aclose()
            return
        attributes = session.token_claims.get("attributes")
        agent = attributes.get("lk.publish_on_behalf") \
            if isinstance(attributes, Mapping) else None
        worker = LiveKitAvatarWorker(
            link, sample_rate=session.sample_rate,
            agent_identity=agent if isinstance(agent, str) and agent else None,
            mute_interrupts=lambda: self._emulator.faults.mute_interrupts,
            on_audio=lambda seconds: self._on_audio(session, seconds),
            on_activity=lambda: self._touch(session),
            on_gone=lambda reason: self.end(session, reason))
        session.worker = worker
        session.status = "active"
        link.register_text_handler("did.speak", lambda sender, text: self._on_speak(
            session, sender, text))
        link.register_text_handler("did.interrupt", lambda sender, text: self._on_interrupt(
            session, sender, text))
        link.register_text_handler("lk.chat", lambda sender, text: self._on_chat(
            session, sender, text))
        session.joined.set()
        self._touch(session)

    async def _on_speak(self, session: DIDRoomSession, sender: str, text: str) -> None:
        session.commands.append(("did.speak", text))
        worker = session.worker
        if worker is None or sender != worker.agent_identity:
            session.protocol_errors.append(f"did.speak from {sender}, not the agent")
            return
        try:
            script = json_message(text).get("script")
            if not isinstance(script, Mapping) or script.get("type") != "text":
                raise ProtocolError("script must be {type: 'text', input}")
            seconds = self._emulator.text_seconds(script.get("input"))
        except (ProtocolError, BadRequest) as exc:
            session.protocol_errors.append(f"did.speak: {exc}")
            return
        worker.speak(seconds, name=f"text_{len(worker.segments)}")

    async def _on_interrupt(self, session: DIDRoomSession, sender: str, text: str) -> None:
        session.commands.append(("did.interrupt", text))
        if session.worker is not None and sender == session.worker.agent_identity:
            session.worker.clear_buffer()

    async def _on_chat(self, session: DIDRoomSession, sender: str, text: str) -> None:
        session.commands.append(("lk.chat", text))
        self._touch(session)

    def _on_audio(self, session: DIDRoomSession, seconds: float) -> None:
        session.audio_seconds += seconds
        if session.status == "active" and self._emulator.faults.channel_drop_due(
                session.audio_seconds):
            self.end(session, "worker_crashed")

    # -- timers and ending -----------------------------------------------------------------

    def _touch(self, session: DIDRoomSession) -> None:
        if session.status == "ended":
            return
        if session.worker is not None and session.worker.speaking:
            self._emulator._timers.disarm(session.timers, "idle_timeout")
        else:
            self._emulator._end_after(session, "idle_timeout", session.session_timeout,
                                      self.end)

    def end(self, session: DIDRoomSession, reason: str) -> None:
        """End a session as D-ID would: the meter stops and the worker leaves the room."""
        if session.status == "ended":
            return
        session.status = "ended"
        self._emulator._stop_session(session, reason)
        if session.worker is not None:
            self._spawn(session.worker.leave(reason))

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def reset(self) -> None:
        self._emulator._end_and_forget(self._sessions, self.end, "emulator_reset")

    async def drain(self) -> None:
        """Wait for joins and leaves in flight."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def aclose(self) -> None:
        """Workers leave their rooms (meters are left as they are); joins in flight stop."""
        self._closing = True
        for session in self._sessions.values():
            if session.worker is not None:
                self._spawn(session.worker.leave("emulator_closed"))
        await self.drain()

