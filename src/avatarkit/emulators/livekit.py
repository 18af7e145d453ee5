"""An in-process LiveKit server: rooms, participants, byte streams, text streams and RPC, plus
the RoomService API over HTTP — what vendors that render into *your* LiveKit room need in tests.

A real LiveKit server is a separate binary this machine cannot download; this stand-in keeps
LiveKit's semantics where an avatar integration depends on them, and is reached in-process:
starting it registers its URL with :func:`avatarkit.transport.livekit.register_local_server`,
so :func:`~avatarkit.transport.livekit.connect_room` (the SDK's path to a room) and every
emulator's avatar worker join its rooms as :class:`FakeParticipant` values. Media tracks are
not emulated (no video reaches the room); data is.

What it keeps from LiveKit:

* Tokens are HS256 JWTs signed with the server's API secret, ``iss`` = the API key, ``nbf`` /
  ``exp`` checked, ``video.roomJoin`` and ``video.room`` required to join (a bad token is
  refused as the real server does, with 401 on the signalling connection: here
  ``PermissionError``). Tokens are only checked when a participant joins, as LiveKit does
  (``clock_leeway_s``, default 0, is how long past ``exp`` one is still accepted; the real
  server allows a minute). ``kind`` (``agent``) and ``attributes`` (``lk.publish_on_behalf``)
  are read from the token and shown on the participant.
* A second participant with the same identity replaces the first, which is disconnected with
  reason ``DUPLICATE_IDENTITY``.
* Byte streams go to their destination's handler for the topic, in order, split into chunks of
  at most 15 000 bytes as the SDK sends them; one without a handler is dropped (and counted in
  ``dropped_streams``, as the SDK only logs it). A sender that leaves mid-stream ends the
  stream with an error at the receiver.
* Text streams likewise, one message per call.
* RPC: recipient not in the room -> 1401, no handler for the method -> 1400, payload over
  15 KiB -> 1402, no answer within the timeout -> 1502, recipient leaving while it answers ->
  1503, a handler's own ``RoomRpcError`` passes through, any other exception -> 1500.
* RoomService (``POST /twirp/livekit.RoomService/<Method>``, Twirp JSON): ``RemoveParticipant
  {room, identity}`` (the participant is disconnected with reason ``PARTICIPANT_REMOVED``),
  ``ListParticipants {room}``, ``ListRooms {}``; a ``Bearer`` token with ``video.roomAdmin``
  for that room is required (``ListRooms`` needs ``roomList``, or ``roomAdmin`` without a
  room). Errors are Twirp bodies ``{code, msg}``: 401 ``unauthenticated``, 404 ``not_found``,
  400 ``malformed``.

Closing the server disconnects everyone with reason ``SERVER_SHUTDOWN``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import jwt
from aiohttp import web

from ..transport.livekit import (
    ByteStreamHandler,
    ByteStreamSink,
    IncomingByteStream,
    RoomLink,
    RoomRpcError,
    RpcHandler,
    TextHandler,
    register_local_server,
    unregister_local_server,
)

__all__ = ["FakeParticipant", "FakeRoom", "LiveKitServerEmulator", "TwirpRecord"]

#: Largest byte-stream chunk the SDK sends.
_STREAM_CHUNK_BYTES = 15_000
#: Largest RPC request payload LiveKit accepts.
_MAX_RPC_PAYLOAD = 15 * 1024
_END = object()


@dataclass
class TwirpRecord:
    """One RoomService call."""

    method: str
    body: dict[str, Any]
    status: int


class FakeRoom:
    """One room: its participants by identity."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._participants: dict[str, FakeParticipant] = {}
        #: identities that ever joined, in order
        self.joined: list[str] = []

    @property
    def participants(self) -> Mapping[str, FakeParticipant]:
        return MappingProxyType(self._participants)

    def _add(self, participant: FakeParticipant) -> None:
        previous = self._participants.pop(participant.identity, None)
        if previous is not None:
            for other in list(self._participants.values()):
                other._left(previous)
            previous._kick("DUPLICATE_IDENTITY")
        self._participants[participant.identity] = participant
        self.joined.append(participant.identity)
        for other in list(self._participants.values()):
            if other is not participant:
                other._joined(participant.identity)

    def _remove(self, participant: FakeParticipant) -> None:
        if self._participants.get(participant.identity) is not participant:
            return
        del self._participants[participant.identity]
        for other in list(self._participants.values()):
            other._left(participant)


@dataclass(eq=False)
class _InboundStream:
    queue: asyncio.Queue[object] = field(default_factory=asyncio.Queue)

    async def chunks(self) -> AsyncIterator[bytes]:
        while (item := await self.queue.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, bytes)
            yield item


class _FakeSink:
    def __init__(self, sender: FakeParticipant, inbound: _InboundStream | None) -> None:
        self._sender = sender
        self._inbound = inbound
        self._closed = False
        sender._open_streams.add(self)

    async def write(self, data: bytes) -> None:
        if not self._sender.connected:
            raise ConnectionError("not connected to the room")
        if self._closed:
            raise RuntimeError("write on a closed byte stream")
        if self._inbound is not None:
            for start in range(0, len(data), _STREAM_CHUNK_BYTES):
                self._inbound.queue.put_nowait(bytes(data[start:start + _STREAM_CHUNK_BYTES]))
        await asyncio.sleep(0)

    async def aclose(self) -> None:
        self._finish(_END)

    def _finish(self, marker: object) -> None:
        if self._closed:
            return
        self._closed = True
        self._sender._open_streams.discard(self)
        if self._inbound is not None:
            self._inbound.queue.put_nowait(marker)


class FakeParticipant(RoomLink):
    """A participant of a :class:`FakeRoom` (a :class:`RoomLink`)."""

    def __init__(self, server: LiveKitServerEmulator, room: FakeRoom,
                 claims: Mapping[str, Any]) -> None:
        super().__init__()
        self._server = server
        self._room = room
        self.identity = str(claims["sub"])
        self.room = room.name
        self.name = str(claims.get("name") or "")
        self.kind = str(claims.get("kind") or "standard")
        raw_attributes = claims.get("attributes")
        self.attributes: dict[str, str] = dict(raw_attributes) \
            if isinstance(raw_attributes, Mapping) else {}
        self.connected = True
        self._left_room = asyncio.Event()
        self.disconnect_reason: str | None = None
        self._rpc: dict[str, RpcHandler] = {}
        self._byte_handlers: dict[str, ByteStreamHandler] = {}
        self._text_handlers: dict[str, TextHandler] = {}
        self._waiters: dict[str, asyncio.Event] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._open_streams: set[_FakeSink] = set()
        self._inbound: set[_InboundStream] = set()
        #: RPCs this participant answered: (caller, method, payload)
        self.rpc_calls: list[tuple[str, str, str]] = []
        #: byte streams sent to this participant without a handler for their topic
        self.dropped_streams = 0

    def __repr__(self) -> str:
        return f"<FakeParticipant {self.identity!r} in {self.room!r}>"

    # -- RoomLink ------------------------------------------------------------------------

    def participants(self) -> frozenset[str]:
        return frozenset(i for i in self._room.participants if i != self.identity)

    async def wait_for_participant(self, identity: str) -> None:
        event = self._waiters.setdefault(identity, asyncio.Event())
        if identity in self._room.participants:
            return
        await event.wait()

    async def open_byte_stream(self, *, topic: str, destination: str, name: str,
                               attributes: Mapping[str, str]) -> ByteStreamSink:
        self._check_connected()
        target = self._room.participants.get(destination)
        handler = target._byte_handlers.get(topic) if target is not None else None
        if target is None or handler is None:
            if target is not None:
                target.dropped_streams += 1
            return _FakeSink(self, None)
        inbound = _InboundStream()
        target._inbound.add(inbound)
        target._spawn(handler(IncomingByteStream(
            sender=self.identity, topic=topic, name=name, attributes=dict(attributes),
            chunks=inbound.chunks())), inbound)
        return _FakeSink(self, inbound)

    async def send_text(self, text: str, *, topic: str, destination: str) -> None:
        self._check_connected()
        target = self._room.participants.get(destination)
        handler = target._text_handlers.get(topic) if target is not None else None
        if target is not None and handler is not None:
            target._spawn(handler(self.identity, text))
        await asyncio.sleep(0)

    async def perform_rpc(self, *, destination: str, method: str, payload: str,
                          response_timeout: float) -> str:
        self._check_connected()
        if len(payload.encode()) > _MAX_RPC_PAYLOAD:
            raise RoomRpcError(1402, "Request payload too large")
        target = self._room.participants.get(destination)
        if target is None:
            raise RoomRpcError(RoomRpcError.RECIPIENT_NOT_FOUND, "Recipient not found")
        handler = target._rpc.get(method)
        if handler is None:
            raise RoomRpcError(RoomRpcError.UNSUPPORTED_METHOD, "Method not supported at "
                               "destination")
        target.rpc_calls.append((self.identity, method, payload))
        call = asyncio.ensure_future(handler(self.identity, payload))
        gone = asyncio.ensure_future(target._gone())
        try:
            done, _ = await asyncio.wait({call, gone}, timeout=response_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            call.cancel()
            raise
        finally:
            gone.cancel()
        if call not in done:
            call.cancel()
            if gone in done:
                raise RoomRpcError(RoomRpcError.RECIPIENT_DISCONNECTED, "Recipient disconnected")
            raise RoomRpcError(RoomRpcError.RESPONSE_TIMEOUT, "Response timeout")
        try:
            return call.result()
        except RoomRpcError:
            raise
        except Exception as exc:
            raise RoomRpcError(RoomRpcError.APPLICATION_ERROR, f"Application error in method "
                               f"handler: {exc}") from None

    def register_rpc(self, method: str, handler: RpcHandler) -> None:
        self._rpc[method] = handler

    def register_byte_stream_handler(self, topic: str, handler: ByteStreamHandler) -> None:
        self._byte_handlers[topic] = handler

    def register_text_handler(self, topic: str, handler: TextHandler) -> None:
        self._text_handlers[topic] = handler

    async def aclose(self) -> None:
        await self._leave(None)

    # -- server side ---------------------------------------------------------------------

    def _check_connected(self) -> None:
        if not self.connected:
            raise ConnectionError(f"{self.identity} is not connected to room {self.room}")

    async def _gone(self) -> None:
        await self._left_room.wait()

    def _spawn(self, work: Any, inbound: _InboundStream | None = None) -> None:
        async def run() -> None:
            try:
                await work
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._server.handler_errors.append(f"{self.identity}: {exc!r}")
            finally:
                if inbound is not None:
                    self._inbound.discard(inbound)

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _joined(self, identity: str) -> None:
        event = self._waiters.get(identity)
        if event is not None:
            event.set()

    def _left(self, other: FakeParticipant) -> None:
        self._waiters.pop(other.identity, None)
        for sink in list(other._open_streams):
            sink._finish(ConnectionError(f"{other.identity} left before the stream ended"))
        if self.on_participant_left is not None:
            self.on_participant_left(other.identity)

    def _kick(self, reason: str) -> None:
        """The server disconnects this participant."""
        task = asyncio.get_running_loop().create_task(self._leave(reason))
        self._server._background.add(task)
        task.add_done_callback(self._server._background.discard)

    async def _leave(self, reason: str | None) -> None:
        if not self.connected:
            return
        self.connected = False
        self._left_room.set()
        self.disconnect_reason = reason or "CLIENT_INITIATED"
        self._room._remove(self)
        if reason is not None and self.on_disconnected is not None:
            self.on_disconnected(reason)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class LiveKitServerEmulator:
    """``async with LiveKitServerEmulator() as livekit:`` — rooms reachable at ``livekit.url``
    by anything in this process that joins through ``connect_room``."""

    def __init__(self, *, api_key: str = "devkey",
                 api_secret: str = "secret-of-the-livekit-emulator-0001",
                 host: str = "127.0.0.1", port: int = 0, clock_leeway_s: float = 0.0) -> None:
        if not api_key or len(api_secret) < 32:
            raise ValueError("api_key must be set and api_secret at least 32 characters "
                             "(LiveKit's own minimum)")
        self.api_key = api_key
        self.api_secret = api_secret
        #: seconds an expired token is still accepted (livekit-server allows a minute)
        self.clock_leeway_s = clock_leeway_s
        self._host = host
        self._port = port
        self._rooms: dict[str, FakeRoom] = {}
        self._runner: web.AppRunner | None = None
        self._url: str | None = None
        self._background: set[asyncio.Task[None]] = set()
        #: RoomService calls, in order
        self.twirp_calls: list[TwirpRecord] = []
        #: joins refused (bad token), with the reason
        self.refused_joins: list[str] = []
        #: exceptions raised by participants' stream handlers
        self.handler_errors: list[str] = []

    @property
    def url(self) -> str:
        """``ws://127.0.0.1:<port>`` (available once started)."""
        if self._url is None:
            raise RuntimeError("LiveKitServerEmulator is not running")
        return self._url

    @property
    def rooms(self) -> Mapping[str, FakeRoom]:
        return MappingProxyType(self._rooms)

    def participant(self, room: str, identity: str) -> FakeParticipant | None:
        found = self._rooms.get(room)
        return found.participants.get(identity) if found is not None else None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/twirp/livekit.RoomService/{method}", self._handle_twirp)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        self._runner = runner
        await web.TCPSite(runner, self._host, self._port).start()
        port = runner.addresses[0][1]
        self._url = f"ws://{self._host}:{port}"
        register_local_server(self._url, self.connect)

    async def aclose(self) -> None:
        if self._url is not None:
            unregister_local_server(self._url)
        for room in self._rooms.values():
            for participant in list(room.participants.values()):
                participant._kick("SERVER_SHUTDOWN")
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> LiveKitServerEmulator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- joining -------------------------------------------------------------------------

    def verify(self, token: str) -> dict[str, Any]:
        """The token's claims; ``PermissionError`` when this server would refuse it."""
        try:
            claims: dict[str, Any] = jwt.decode(
                token, self.api_secret, algorithms=["HS256"], issuer=self.api_key,
                options={"require": ["exp", "iss"]}, leeway=self.clock_leeway_s)
        except jwt.PyJWTError as exc:
            raise PermissionError(f"invalid token: {exc}") from None
        if not isinstance(claims.get("video"), Mapping):
            raise PermissionError("invalid token: no video grant")
        return claims

    async def connect(self, url: str, token: str) -> FakeParticipant:
        """Join the room the token grants (what ``connect_room`` calls for this server)."""
        try:
            claims = self.verify(token)
            video = claims["video"]
            room_name = video.get("room")
            if video.get("roomJoin") is not True or not isinstance(room_name, str) \
                    or not room_name:
                raise PermissionError("the token does not grant joining a room")
            if not isinstance(claims.get("sub"), str) or not claims["sub"]:
                raise PermissionError("the token has no identity")
        except PermissionError as exc:
            self.refused_joins.append(str(exc))
            raise
        await asyncio.sleep(0)
        room = self._rooms.setdefault(room_name, FakeRoom(room_name))
        participant = FakeParticipant(self, room, claims)
        room._add(participant)
        return participant

    def remove_participant(self, room: str, identity: str) -> bool:
        participant = self.participant(room, identity)
        if participant is None:
            return False
        participant._kick("PARTICIPANT_REMOVED")
        return True

    # -- RoomService -----------------------------------------------------------------------

    async def _handle_twirp(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            body = None
        if not isinstance(body, dict):
            return self._twirp_error(method, {}, 400, "malformed", "body must be a JSON object")
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        try:
            if scheme.lower() != "bearer":
                raise PermissionError("missing bearer token")
            video = self.verify(token)["video"]
        except PermissionError as exc:
            return self._twirp_error(method, body, 401, "unauthenticated", str(exc))
        room = body.get("room")
        if method == "ListRooms":
            if not (video.get("roomList") or (video.get("roomAdmin") and not video.get("room"))):
                return self._twirp_error(method, body, 401, "unauthenticated",
                                         "permissions denied")
            return self._twirp_ok(method, body, {"rooms": [
                {"name": name, "num_participants": len(r.participants)}
                for name, r in self._rooms.items()]})
        if not isinstance(room, str) or not room:
            return self._twirp_error(method, body, 400, "malformed", "room is required")
        if not video.get("roomAdmin") or video.get("room") not in (None, room):
            return self._twirp_error(method, body, 401, "unauthenticated", "permissions denied")
        if method == "RemoveParticipant":
            identity = body.get("identity")
            if not isinstance(identity, str) or not identity:
                return self._twirp_error(method, body, 400, "malformed",
                                         "identity is required")
            if not self.remove_participant(room, identity):
                return self._twirp_error(method, body, 404, "not_found",
                                         "participant not found")
            return self._twirp_ok(method, body, {})
        if method == "ListParticipants":
            found = self._rooms.get(room)
            if found is None:
                return self._twirp_error(method, body, 404, "not_found", "room not found")
            return self._twirp_ok(method, body, {"participants": [
                {"identity": p.identity, "name": p.name, "kind": p.kind.upper(),
                 "attributes": p.attributes, "state": "ACTIVE"}
                for p in found.participants.values()]})
        return self._twirp_error(method, body, 404, "bad_route", f"no method {method}")

    def _twirp_ok(self, method: str, body: dict[str, Any],
                  answer: dict[str, Any]) -> web.Response:
        self.twirp_calls.append(TwirpRecord(method, body, 200))
        return web.json_response(answer)

    def _twirp_error(self, method: str, body: dict[str, Any], status: int, code: str,
                     message: str) -> web.Response:
        self.twirp_calls.append(TwirpRecord(method, body, status))
        return web.Response(status=status, text=json.dumps({"code": code, "msg": message}),
                            content_type="application/json")
