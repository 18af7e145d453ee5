"""LiveKit rooms on your own server: access tokens, the room link, the room service, and the
agent side of LiveKit's avatar-worker contract.

Vendors that render into *your* LiveKit room (D-ID ``sessions/join``; Tavus and Simli offer the
same) all speak one contract (``shared/research/vendor-contracts.md`` §6.2): the avatar worker
joins the room with a token we mint, receives the agent's audio as a LiveKit **byte stream** on
topic ``lk.audio_stream`` (one stream per utterance, attributes ``sample_rate`` and
``num_channels``, raw interleaved PCM16), is interrupted with the RPC ``lk.clear_buffer``, and
reports ``lk.playback_started`` / ``lk.playback_finished`` (``{"playback_position",
"interrupted"}``) back by RPC. :class:`AvatarWorkerChannel` is that contract, agent side;
adapters only add their vendor's REST calls.

:class:`RoomLink` is one participant's connection to a room. :func:`connect_room` opens it with
the ``livekit`` SDK (the ``livekit`` extra) unless the URL belongs to an in-process LiveKit
server registered with :func:`register_local_server` (the emulators' :class:`~avatarkit.
emulators.livekit.LiveKitServerEmulator`): connections to it stay in this process, so tests and
``avatarkit emulate`` run without a LiveKit binary. :class:`RoomService` is LiveKit's server API
(Twirp JSON over HTTP): removing a participant is how a vendor's avatar is sent away, and so how
its session ends.

Tokens are HS256 JWTs in LiveKit's claim layout (``iss`` = API key, ``sub`` = identity,
``video`` grants, ``kind``, ``attributes``), signed with the API secret. Nothing here is
imported by ``import avatarkit``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import secrets
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import httpx
import jwt
from pydantic import SecretStr

from ..errors import (
    AuthenticationError,
    ConfigError,
    NotFoundError,
    ProviderConnectionError,
    ProviderError,
    ProviderTimeoutError,
)
from ..vendor_http import RetryPolicy, VendorHttp

__all__ = [
    "AUDIO_STREAM_TOPIC",
    "RPC_CLEAR_BUFFER",
    "RPC_PLAYBACK_FINISHED",
    "RPC_PLAYBACK_STARTED",
    "AvatarWorkerChannel",
    "ByteStreamHandler",
    "ByteStreamSink",
    "IncomingByteStream",
    "RoomConnector",
    "RoomLink",
    "RoomRpcError",
    "RoomService",
    "RpcHandler",
    "TextHandler",
    "connect_room",
    "http_url",
    "mint_token",
    "register_local_server",
    "unregister_local_server",
    "ws_url",
]

logger = logging.getLogger("avatarkit.providers.livekit")

AUDIO_STREAM_TOPIC = "lk.audio_stream"
RPC_CLEAR_BUFFER = "lk.clear_buffer"
RPC_PLAYBACK_STARTED = "lk.playback_started"
RPC_PLAYBACK_FINISHED = "lk.playback_finished"

_ParticipantKind = Literal["standard", "agent"]


# --------------------------------------------------------------------------------------------
# Tokens and URLs
# --------------------------------------------------------------------------------------------


def mint_token(*, api_key: str, api_secret: str, identity: str, room: str | None,
               name: str | None = None, kind: _ParticipantKind = "standard",
               attributes: Mapping[str, str] | None = None, ttl_s: float = 600.0,
               can_publish: bool = True, can_subscribe: bool = True,
               can_publish_data: bool = True, room_admin: bool = False,
               room_join: bool = True) -> str:
    """A LiveKit access token (HS256 JWT) for ``identity`` in ``room``."""
    if not identity and room_join:
        raise ValueError("a token that joins a room needs an identity")
    now = int(time.time())
    video: dict[str, Any] = {}
    if room is not None:
        video["room"] = room
    if room_join:
        video.update(roomJoin=True, canPublish=can_publish, canSubscribe=can_subscribe,
                     canPublishData=can_publish_data)
    if room_admin:
        video["roomAdmin"] = True
    claims: dict[str, Any] = {"iss": api_key, "sub": identity, "nbf": now - 5,
                              "exp": now + math.ceil(ttl_s), "video": video}
    if name:
        claims["name"] = name
    if kind != "standard":
        claims["kind"] = kind
    if attributes:
        claims["attributes"] = dict(attributes)
    return jwt.encode(claims, api_secret, algorithm="HS256")


def http_url(url: str) -> str:
    """The HTTP(S) base of a LiveKit server URL (``wss://x`` -> ``https://x``)."""
    parsed = httpx.URL(url)
    scheme = {"ws": "http", "wss": "https"}.get(parsed.scheme, parsed.scheme)
    if scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"not a LiveKit server URL (ws://, wss://, http:// or https://): "
                         f"{url!r}")
    return str(parsed.copy_with(scheme=scheme, query=None, fragment=None)).rstrip("/")


def ws_url(url: str) -> str:
    """The WebSocket form of a LiveKit server URL (``https://x`` -> ``wss://x``)."""
    parsed = httpx.URL(http_url(url))
    return str(parsed.copy_with(scheme="wss" if parsed.scheme == "https" else "ws"))


# --------------------------------------------------------------------------------------------
# The room link
# --------------------------------------------------------------------------------------------


class RoomRpcError(Exception):
    """An RPC failed: LiveKit's error ``code`` (1400 unsupported method, 1401 recipient not
    found, 1500 application error, 1502 response timeout, 1503 recipient disconnected...)."""

    UNSUPPORTED_METHOD = 1400
    RECIPIENT_NOT_FOUND = 1401
    APPLICATION_ERROR = 1500
    CONNECTION_TIMEOUT = 1501
    RESPONSE_TIMEOUT = 1502
    RECIPIENT_DISCONNECTED = 1503

    def __init__(self, code: int, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"RPC error {code}: {message}")


class ByteStreamSink(Protocol):
    """An outgoing byte stream: ``write`` chunks in order, ``aclose`` ends it."""

    async def write(self, data: bytes) -> None: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class IncomingByteStream:
    """A byte stream another participant opened to us."""

    sender: str
    topic: str
    name: str
    attributes: Mapping[str, str]
    chunks: AsyncIterator[bytes]


RpcHandler = Callable[[str, str], Awaitable[str]]
"""``handler(caller_identity, payload) -> response``; raise :class:`RoomRpcError` to fail."""
ByteStreamHandler = Callable[[IncomingByteStream], Awaitable[None]]
TextHandler = Callable[[str, str], Awaitable[None]]
"""``handler(sender_identity, text)``."""


class RoomLink(ABC):
    """One participant's connection to a LiveKit room.

    Callbacks run on the event loop and must not block. ``on_participant_left`` is called with
    each remote identity that leaves, ``on_disconnected`` once with a reason when the server
    drops or removes this participant (never after :meth:`aclose`).
    """

    identity: str
    room: str

    def __init__(self) -> None:
        self.on_participant_left: Callable[[str], None] | None = None
        self.on_disconnected: Callable[[str], None] | None = None

    @abstractmethod
    def participants(self) -> frozenset[str]:
        """Identities of the other participants in the room now."""

    @abstractmethod
    async def wait_for_participant(self, identity: str) -> None:
        """Return once ``identity`` is in the room (the caller bounds the wait)."""

    @abstractmethod
    async def open_byte_stream(self, *, topic: str, destination: str, name: str,
                               attributes: Mapping[str, str]) -> ByteStreamSink:
        """Start a byte stream to one participant."""

    @abstractmethod
    async def send_text(self, text: str, *, topic: str, destination: str) -> None:
        """Send a text message on ``topic`` to one participant."""

    @abstractmethod
    async def perform_rpc(self, *, destination: str, method: str, payload: str,
                          response_timeout: float) -> str:
        """Call ``method`` on ``destination``; :class:`RoomRpcError` when it fails."""

    @abstractmethod
    def register_rpc(self, method: str, handler: RpcHandler) -> None:
        """Answer RPCs to ``method`` with ``handler``."""

    @abstractmethod
    def register_byte_stream_handler(self, topic: str, handler: ByteStreamHandler) -> None:
        """Receive byte streams on ``topic`` (each in its own task)."""

    @abstractmethod
    def register_text_handler(self, topic: str, handler: TextHandler) -> None:
        """Receive text messages on ``topic``."""

    @abstractmethod
    async def aclose(self) -> None:
        """Leave the room. Idempotent."""


RoomConnector = Callable[[str, str], Awaitable[RoomLink]]
"""``connector(url, token)``: a joined :class:`RoomLink`."""

_local_servers: dict[str, RoomConnector] = {}


def _server_key(url: str) -> str:
    return http_url(url).lower()


def register_local_server(url: str, connector: RoomConnector) -> None:
    """Route connections to ``url`` to an in-process LiveKit server (the emulators')."""
    _local_servers[_server_key(url)] = connector


def unregister_local_server(url: str) -> None:
    _local_servers.pop(_server_key(url), None)


async def connect_room(url: str, token: str, *, provider: str,
                       join_timeout: float) -> RoomLink:
    """Join the room ``token`` grants, on the LiveKit server at ``url``.

    Raises ``ProviderTimeoutError`` after ``join_timeout`` seconds, ``AuthenticationError`` when the
    server refuses the token, ``ProviderConnectionError`` when it cannot be reached.
    """
    local = _local_servers.get(_server_key(url))
    try:
        async with asyncio.timeout(join_timeout):
            if local is not None:
                return await local(url, token)
            return await _SDKRoomLink.connect(url, token, provider=provider)
    except TimeoutError:
        raise ProviderTimeoutError(f"joining the LiveKit room at {http_url(url)} took more "
                                   f"than {join_timeout:g} s", provider=provider) from None
    except PermissionError as exc:
        raise AuthenticationError(f"the LiveKit server refused the room token: {exc}",
                                  provider=provider) from None
    except (ConnectionError, OSError) as exc:
        raise ProviderConnectionError(f"could not join the LiveKit room at {http_url(url)}: "
                                      f"{exc}", provider=provider) from None


class _SDKRoomLink(RoomLink):
    """A :class:`RoomLink` over the ``livekit`` SDK (``livekit.rtc``)."""

    def __init__(self, room: Any, *, provider: str) -> None:
        super().__init__()
        self._room = room
        self._provider = provider
        self.identity = room.local_participant.identity
        self.room = room.name
        self._joined: dict[str, asyncio.Event] = {}
        self._closed = False
        self._tasks: set[asyncio.Task[None]] = set()
        room.on("participant_connected", self._on_connected)
        room.on("participant_disconnected", self._on_left)
        room.on("disconnected", self._on_room_disconnected)

    @classmethod
    async def connect(cls, url: str, token: str, *, provider: str) -> _SDKRoomLink:
        try:
            from livekit import rtc
        except ImportError:  # pragma: no cover - depends on the environment
            raise ConfigError("LiveKit rooms need the livekit SDK: pip install "
                              "'avatarkit[livekit]'", field=f"providers.{provider}") from None
        room = rtc.Room()
        try:
            await room.connect(ws_url(url), token)
        except rtc.ConnectError as exc:
            await room.disconnect()
            text = str(exc)
            if "401" in text or "nauthorized" in text or "invalid token" in text.lower():
                raise PermissionError(text.strip()) from None
            raise ConnectionError(text.strip()) from None
        except BaseException:
            await room.disconnect()
            raise
        return cls(room, provider=provider)

    def _on_connected(self, participant: Any) -> None:
        event = self._joined.get(participant.identity)
        if event is not None:
            event.set()

    def _on_left(self, participant: Any) -> None:
        if self.on_participant_left is not None:
            self.on_participant_left(participant.identity)

    def _on_room_disconnected(self, reason: Any) -> None:
        if not self._closed and self.on_disconnected is not None:
            self.on_disconnected(str(reason))

    def participants(self) -> frozenset[str]:
        return frozenset(self._room.remote_participants)

    async def wait_for_participant(self, identity: str) -> None:
        event = self._joined.setdefault(identity, asyncio.Event())
        if identity in self._room.remote_participants:
            return
        await event.wait()

    async def open_byte_stream(self, *, topic: str, destination: str, name: str,
                               attributes: Mapping[str, str]) -> ByteStreamSink:
        writer = await self._room.local_participant.stream_bytes(
            name, topic=topic, attributes=dict(attributes),
            destination_identities=[destination])
        return _SDKByteSink(writer)

    async def send_text(self, text: str, *, topic: str, destination: str) -> None:
        await self._room.local_participant.send_text(text, topic=topic,
                                                     destination_identities=[destination])

    async def perform_rpc(self, *, destination: str, method: str, payload: str,
                          response_timeout: float) -> str:
        from livekit import rtc

        try:
            response: str = await self._room.local_participant.perform_rpc(
                destination_identity=destination, method=method, payload=payload,
                response_timeout=response_timeout)
        except rtc.RpcError as exc:
            raise RoomRpcError(int(exc.code), exc.message) from None
        return response

    def register_rpc(self, method: str, handler: RpcHandler) -> None:
        from livekit import rtc

        async def answer(data: Any) -> str:
            try:
                return await handler(data.caller_identity, data.payload)
            except RoomRpcError as exc:
                raise rtc.RpcError(exc.code, exc.message) from None

        self._room.local_participant.register_rpc_method(method, answer)

    def register_byte_stream_handler(self, topic: str, handler: ByteStreamHandler) -> None:
        def on_stream(reader: Any, sender: str) -> None:
            info = reader.info

            async def chunks() -> AsyncIterator[bytes]:
                async for chunk in reader:
                    yield bytes(chunk)

            self._spawn(handler(IncomingByteStream(
                sender=sender, topic=info.topic, name=info.name,
                attributes=dict(info.attributes or {}), chunks=chunks())))

        self._room.register_byte_stream_handler(topic, on_stream)

    def register_text_handler(self, topic: str, handler: TextHandler) -> None:
        def on_text(reader: Any, sender: str) -> None:
            async def read() -> None:
                await handler(sender, await reader.read_all())

            self._spawn(read())

        self._room.register_text_stream_handler(topic, on_text)

    def _spawn(self, work: Awaitable[None]) -> None:
        async def run() -> None:
            try:
                await work
            except Exception:
                logger.exception("%s: a LiveKit stream handler failed", self._provider)

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._room.disconnect()


class _SDKByteSink:
    def __init__(self, writer: Any) -> None:
        self._writer = writer

    async def write(self, data: bytes) -> None:
        await self._writer.write(data)

    async def aclose(self) -> None:
        await self._writer.aclose()


# --------------------------------------------------------------------------------------------
# The room service (server API)
# --------------------------------------------------------------------------------------------


class RoomService:
    """LiveKit's RoomService over Twirp JSON, authenticated with a short-lived admin token."""

    def __init__(self, *, provider: str, client: httpx.AsyncClient, url: str,
                 api_key: SecretStr, api_secret: SecretStr, retry: RetryPolicy,
                 timeout: float) -> None:
        self._provider = provider
        self._client = client
        self._base_url = http_url(url)
        self._api_key = api_key
        self._api_secret = api_secret
        self._retry = retry
        self._timeout = timeout

    def _api(self, room: str) -> VendorHttp:
        def headers() -> dict[str, str]:
            token = mint_token(api_key=self._api_key.get_secret_value(),
                               api_secret=self._api_secret.get_secret_value(), identity="",
                               room=room, room_join=False, room_admin=True, ttl_s=60)
            return {"Authorization": f"Bearer {token}"}

        return VendorHttp(provider=self._provider, client=self._client,
                          base_url=self._base_url, auth_headers=headers, retry=self._retry,
                          timeout=self._timeout)

    async def remove_participant(self, room: str, identity: str) -> bool:
        """Send ``identity`` out of ``room``; False when it was not there (not an error)."""
        try:
            await self._api(room).request_json(
                "POST", "/twirp/livekit.RoomService/RemoveParticipant",
                json={"room": room, "identity": identity})
        except NotFoundError:
            return False
        return True

    async def list_participants(self, room: str) -> list[str]:
        """Identities in ``room`` (empty when the room does not exist)."""
        try:
            body = await self._api(room).request_json(
                "POST", "/twirp/livekit.RoomService/ListParticipants", json={"room": room})
        except NotFoundError:
            return []
        found = body.get("participants")
        return [p["identity"] for p in found if isinstance(p, Mapping)
                and isinstance(p.get("identity"), str)] if isinstance(found, list) else []


# --------------------------------------------------------------------------------------------
# The avatar-worker contract, agent side
# --------------------------------------------------------------------------------------------


def _short_id() -> str:
    return secrets.token_hex(6)


class AvatarWorkerChannel:
    """Our half of LiveKit's avatar-worker contract with one avatar participant.

    Audio goes out as one ``lk.audio_stream`` byte stream per segment (:meth:`write` opens it,
    :meth:`end_segment` closes it: the end of the segment). :meth:`clear_buffer` is the
    interrupt RPC. The worker's ``lk.playback_started`` / ``lk.playback_finished`` RPCs reach
    ``on_started()`` / ``on_finished(position, interrupted)``; calls from anyone but the avatar
    are answered ``"reject"``, as LiveKit's own agent does.
    """

    def __init__(self, link: RoomLink, *, avatar_identity: str, sample_rate: int,
                 provider: str, on_started: Callable[[], None],
                 on_finished: Callable[[float | None, bool], None]) -> None:
        self._link = link
        self.avatar_identity = avatar_identity
        self.sample_rate = sample_rate
        self._provider = provider
        self._on_started = on_started
        self._on_finished = on_finished
        self._sink: ByteStreamSink | None = None
        link.register_rpc(RPC_PLAYBACK_STARTED, self._playback_started)
        link.register_rpc(RPC_PLAYBACK_FINISHED, self._playback_finished)

    @property
    def segment_open(self) -> bool:
        return self._sink is not None

    async def write(self, pcm: bytes) -> None:
        """Send PCM16 mono at ``sample_rate``, opening a segment if none is open."""
        if self._sink is None:
            self._sink = await self._link.open_byte_stream(
                topic=AUDIO_STREAM_TOPIC, destination=self.avatar_identity,
                name=f"AUDIO_{_short_id()}",
                attributes={"sample_rate": str(self.sample_rate), "num_channels": "1"})
        await self._sink.write(pcm)

    async def end_segment(self) -> None:
        """Close the open segment's stream (the worker plays what it has, then finishes)."""
        sink, self._sink = self._sink, None
        if sink is not None:
            await sink.aclose()

    async def clear_buffer(self, *, response_timeout: float) -> None:
        """End the open segment, then ask the worker to stop and drop its queue; raise
        ``ProviderError`` if it refuses."""
        with contextlib.suppress(ConnectionError, RuntimeError):  # the stream is dead anyway
            await self.end_segment()
        try:
            await self._link.perform_rpc(destination=self.avatar_identity,
                                         method=RPC_CLEAR_BUFFER, payload="",
                                         response_timeout=response_timeout)
        except RoomRpcError as exc:
            error_type = ProviderTimeoutError if exc.code in (
                RoomRpcError.RESPONSE_TIMEOUT, RoomRpcError.CONNECTION_TIMEOUT) \
                else ProviderConnectionError if exc.code in (
                RoomRpcError.RECIPIENT_NOT_FOUND, RoomRpcError.RECIPIENT_DISCONNECTED) \
                else ProviderError
            raise error_type(f"the avatar refused {RPC_CLEAR_BUFFER}: {exc}",
                             provider=self._provider) from None

    async def _playback_started(self, caller: str, payload: str) -> str:
        if caller != self.avatar_identity:
            return "reject"
        self._on_started()
        return "ok"

    async def _playback_finished(self, caller: str, payload: str) -> str:
        if caller != self.avatar_identity:
            return "reject"
        position: float | None = None
        interrupted = False
        with contextlib.suppress(ValueError):
            data = json.loads(payload)
            if isinstance(data, Mapping):
                raw = data.get("playback_position")
                if isinstance(raw, int | float) and not isinstance(raw, bool) and raw >= 0:
                    position = float(raw)
                interrupted = data.get("interrupted") is True
        self._on_finished(position, interrupted)
        return "ok"
