"""The in-process LiveKit server (``LiveKitServerEmulator``), the room link the SDK joins it
with (``connect_room``), LiveKit's RoomService over real HTTP, and both halves of the
avatar-worker contract (``AvatarWorkerChannel`` against ``LiveKitAvatarWorker``) in one room.

Every claim of the emulator's module docstring has a test here; every test ends with the room
server closed and no task it started still running.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from avatarkit.emulators._livekit_worker import LiveKitAvatarWorker
from avatarkit.emulators.livekit import LiveKitServerEmulator
from avatarkit.errors import (
    AuthenticationError,
    ProviderConnectionError,
    ProviderError,
    ProviderTimeoutError,
)
from avatarkit.transport.livekit import (
    AUDIO_STREAM_TOPIC,
    RPC_CLEAR_BUFFER,
    RPC_PLAYBACK_FINISHED,
    RPC_PLAYBACK_STARTED,
    AvatarWorkerChannel,
    IncomingByteStream,
    RoomLink,
    RoomRpcError,
    RoomService,
    connect_room,
    http_url,
    mint_token,
    ws_url,
)
from avatarkit.vendor_http import RetryPolicy

from ..conftest import eventually

ROOM = "room-1"
RATE = 24_000
WRONG_SECRET = "not-the-secret-of-this-livekit-server-42"


def running_tasks(before: set[asyncio.Task[Any]]) -> list[asyncio.Task[Any]]:
    """Tasks started since ``before`` that are still running (the caller's excepted)."""
    return [task for task in asyncio.all_tasks() - before
            if not task.done() and task is not asyncio.current_task()]


@pytest.fixture
async def lk() -> AsyncIterator[LiveKitServerEmulator]:
    before = set(asyncio.all_tasks())
    async with LiveKitServerEmulator() as server:
        yield server
    await eventually(lambda: not running_tasks(before), within=2.0)


def token(lk: LiveKitServerEmulator, identity: str, room: str | None = ROOM,
          **claims: Any) -> str:
    return mint_token(api_key=lk.api_key, api_secret=lk.api_secret, identity=identity,
                      room=room, **claims)


async def join(lk: LiveKitServerEmulator, identity: str, room: str = ROOM,
               **claims: Any) -> RoomLink:
    return await connect_room(lk.url, token(lk, identity, room, **claims), provider="t",
                              join_timeout=2)


def pcm(seconds: float, rate: int = RATE) -> bytes:
    """PCM16 mono: a ramp, so that order and content are checkable."""
    samples = round(seconds * rate)
    return b"".join((i % 30_000).to_bytes(2, "little") for i in range(samples))


@dataclass
class StreamLog:
    """What a byte-stream handler saw."""

    streams: list[IncomingByteStream] = field(default_factory=list)
    chunks: list[bytes] = field(default_factory=list)
    error: BaseException | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    async def handler(self, stream: IncomingByteStream) -> None:
        self.streams.append(stream)
        try:
            async for chunk in stream.chunks:
                self.chunks.append(chunk)
        except ConnectionError as exc:
            self.error = exc
        self.ended.set()


# -- URLs and joining -------------------------------------------------------------------------


def test_urls_convert_between_websocket_and_http_forms() -> None:
    assert http_url("wss://example.livekit.cloud") == "https://example.livekit.cloud"
    assert http_url("ws://127.0.0.1:7880/") == "http://127.0.0.1:7880"
    assert ws_url("https://example.livekit.cloud") == "wss://example.livekit.cloud"
    assert ws_url("http://127.0.0.1:7880") == "ws://127.0.0.1:7880"
    for bad in ("ftp://example.com", "not a url", "wss://"):
        with pytest.raises(ValueError, match="not a LiveKit server URL"):
            http_url(bad)


async def test_valid_tokens_join_and_participants_see_each_other(
        lk: LiveKitServerEmulator) -> None:
    agent = await join(lk, "agent", kind="agent", name="The agent",
                       attributes={"lk.publish_on_behalf": "someone"})
    viewer = await join(lk, "viewer")
    assert agent.participants() == {"viewer"} and viewer.participants() == {"agent"}
    assert (agent.identity, agent.room) == ("agent", ROOM)
    assert lk.rooms[ROOM].joined == ["agent", "viewer"]
    fake = lk.participant(ROOM, "agent")
    assert fake is agent
    assert (fake.kind, fake.name, fake.attributes) == (
        "agent", "The agent", {"lk.publish_on_behalf": "someone"})
    other = lk.participant(ROOM, "viewer")
    assert other is not None and (other.kind, other.attributes) == ("standard", {})
    assert lk.refused_joins == []
    await agent.aclose()
    await agent.aclose()  # idempotent
    assert viewer.participants() == frozenset() and lk.participant(ROOM, "agent") is None
    await viewer.aclose()


async def test_wait_for_participant_returns_once_the_other_joins(
        lk: LiveKitServerEmulator) -> None:
    first = await join(lk, "first")
    waiting = asyncio.ensure_future(first.wait_for_participant("second"))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    second = await join(lk, "second")
    await asyncio.wait_for(waiting, 1.0)
    await asyncio.wait_for(second.wait_for_participant("first"), 0.1)  # already there
    for link in (first, second):
        await link.aclose()


def _wrong_secret(lk: LiveKitServerEmulator) -> str:
    return mint_token(api_key=lk.api_key, api_secret=WRONG_SECRET, identity="x", room=ROOM)


def _wrong_key(lk: LiveKitServerEmulator) -> str:
    return mint_token(api_key="another-key", api_secret=lk.api_secret, identity="x", room=ROOM)


REFUSED_TOKENS: dict[str, Callable[[LiveKitServerEmulator], str]] = {
    "wrong secret": _wrong_secret,
    "wrong api key (iss)": _wrong_key,
    "expired": lambda lk: token(lk, "x", ttl_s=-30),
    "no roomJoin grant": lambda lk: token(lk, "x", room_join=False),
    "no room": lambda lk: token(lk, "x", room=None),
    "not a JWT": lambda lk: "garbage",
}


@pytest.mark.parametrize("case", sorted(REFUSED_TOKENS))
async def test_a_bad_token_is_refused_as_an_authentication_error(
        lk: LiveKitServerEmulator, case: str) -> None:
    with pytest.raises(AuthenticationError) as caught:
        await connect_room(lk.url, REFUSED_TOKENS[case](lk), provider="t", join_timeout=2)
    assert caught.value.provider == "t"
    assert lk.api_secret not in str(caught.value) and WRONG_SECRET not in str(caught.value)
    assert len(lk.refused_joins) == 1
    assert lk.rooms == {}


async def test_clock_leeway_accepts_a_recently_expired_token() -> None:
    async with LiveKitServerEmulator(clock_leeway_s=60) as lk:
        link = await join(lk, "late", ttl_s=-30)
        assert lk.participant(ROOM, "late") is link and lk.refused_joins == []
        await link.aclose()


def test_the_api_secret_must_be_long_enough() -> None:
    with pytest.raises(ValueError, match="32 characters"):
        LiveKitServerEmulator(api_secret="short")


async def test_a_duplicate_identity_replaces_the_first_participant(
        lk: LiveKitServerEmulator) -> None:
    first = await join(lk, "dup")
    reasons: list[str] = []
    first.on_disconnected = reasons.append
    second = await join(lk, "dup")
    await eventually(lambda: reasons == ["DUPLICATE_IDENTITY"], within=1.0)
    assert lk.participant(ROOM, "dup") is second
    assert lk.rooms[ROOM].joined == ["dup", "dup"]
    with pytest.raises(ConnectionError):
        await first.send_text("hi", topic="t", destination="dup")
    await first.aclose()  # after being disconnected: a no-op
    assert lk.participant(ROOM, "dup") is second
    await second.aclose()


async def test_others_see_a_replaced_duplicate_leave(lk: LiveKitServerEmulator) -> None:
    old = await join(lk, "dup")
    watcher = await join(lk, "watcher")
    log = StreamLog()
    watcher.register_byte_stream_handler("t", log.handler)
    left: list[str] = []
    watcher.on_participant_left = left.append
    sink = await old.open_byte_stream(topic="t", destination="watcher", name="s",
                                      attributes={})
    await sink.write(b"\x00\x01")
    new = await join(lk, "dup")
    try:
        await eventually(lambda: left == ["dup"], within=1.0)
        await asyncio.wait_for(log.ended.wait(), 1.0)
        assert isinstance(log.error, ConnectionError)
    finally:
        for link in (old, new, watcher):
            await link.aclose()


# -- byte streams and text --------------------------------------------------------------------


async def test_byte_streams_arrive_in_order_in_chunks_of_15000_bytes(
        lk: LiveKitServerEmulator) -> None:
    sender = await join(lk, "sender")
    receiver = await join(lk, "receiver")
    log = StreamLog()
    receiver.register_byte_stream_handler("audio", log.handler)
    payload = bytes(i % 251 for i in range(40_000))
    sink = await sender.open_byte_stream(topic="audio", destination="receiver", name="AUDIO_1",
                                         attributes={"sample_rate": "24000"})
    await sink.write(payload)
    await sink.write(b"tail!")
    await sink.aclose()
    await sink.aclose()  # idempotent
    await asyncio.wait_for(log.ended.wait(), 1.0)
    assert [len(c) for c in log.chunks] == [15_000, 15_000, 10_000, 5]
    assert b"".join(log.chunks) == payload + b"tail!"
    (stream,) = log.streams
    assert (stream.sender, stream.topic, stream.name, dict(stream.attributes)) == (
        "sender", "audio", "AUDIO_1", {"sample_rate": "24000"})
    assert log.error is None
    with pytest.raises(RuntimeError):
        await sink.write(b"late")
    for link in (sender, receiver):
        await link.aclose()


async def test_a_stream_without_a_handler_is_dropped_and_counted(
        lk: LiveKitServerEmulator) -> None:
    sender = await join(lk, "sender")
    receiver = await join(lk, "receiver")
    log = StreamLog()
    receiver.register_byte_stream_handler("audio", log.handler)
    sink = await sender.open_byte_stream(topic="other", destination="receiver", name="x",
                                         attributes={})
    await sink.write(b"\x00" * 100)  # written into the void, as the SDK does
    await sink.aclose()
    await asyncio.sleep(0.02)
    fake = lk.participant(ROOM, "receiver")
    assert fake is not None and fake.dropped_streams == 1
    assert log.streams == [] and lk.handler_errors == []
    for link in (sender, receiver):
        await link.aclose()


async def test_a_sender_leaving_mid_stream_ends_it_with_an_error_at_the_receiver(
        lk: LiveKitServerEmulator) -> None:
    sender = await join(lk, "sender")
    receiver = await join(lk, "receiver")
    log = StreamLog()
    receiver.register_byte_stream_handler("audio", log.handler)
    sink = await sender.open_byte_stream(topic="audio", destination="receiver", name="x",
                                         attributes={})
    await sink.write(b"\x01\x02" * 10)
    await eventually(lambda: len(log.chunks) == 1, within=1.0)
    await sender.aclose()
    await asyncio.wait_for(log.ended.wait(), 1.0)
    assert isinstance(log.error, ConnectionError)
    # the server ended the stream: the sender's sink is closed (RuntimeError, not
    # ConnectionError: the adapter catches both)
    with pytest.raises((ConnectionError, RuntimeError)):
        await sink.write(b"\x00\x00")
    await receiver.aclose()


async def test_text_reaches_the_topic_handler_with_the_sender(
        lk: LiveKitServerEmulator) -> None:
    sender = await join(lk, "sender")
    receiver = await join(lk, "receiver")
    got: list[tuple[str, str]] = []

    async def on_text(who: str, text: str) -> None:
        got.append((who, text))

    receiver.register_text_handler("chat", on_text)
    await sender.send_text("nobody listens here", topic="elsewhere", destination="receiver")
    await sender.send_text("hello", topic="chat", destination="receiver")
    await sender.send_text("to nobody", topic="chat", destination="absent")
    await eventually(lambda: got == [("sender", "hello")], within=1.0)
    await asyncio.sleep(0.02)
    assert got == [("sender", "hello")] and lk.handler_errors == []
    for link in (sender, receiver):
        await link.aclose()


async def test_a_failing_stream_handler_is_recorded(lk: LiveKitServerEmulator) -> None:
    sender = await join(lk, "sender")
    receiver = await join(lk, "receiver")

    async def broken(who: str, text: str) -> None:
        raise ValueError(f"cannot read {text}")

    receiver.register_text_handler("chat", broken)
    await sender.send_text("this", topic="chat", destination="receiver")
    await eventually(lambda: len(lk.handler_errors) == 1, within=1.0)
    assert "receiver" in lk.handler_errors[0] and "cannot read this" in lk.handler_errors[0]
    for link in (sender, receiver):
        await link.aclose()


# -- RPC --------------------------------------------------------------------------------------


async def rpc(link: RoomLink, method: str, payload: str = "", *, to: str = "callee",
              response_timeout: float = 1.0) -> str:
    return await link.perform_rpc(destination=to, method=method, payload=payload,
                                  response_timeout=response_timeout)


async def test_rpc_returns_the_handlers_answer(lk: LiveKitServerEmulator) -> None:
    caller = await join(lk, "caller")
    callee = await join(lk, "callee")

    async def echo(who: str, payload: str) -> str:
        return f"{who}:{payload}"

    callee.register_rpc("echo", echo)
    assert await rpc(caller, "echo", "ping") == "caller:ping"
    assert await rpc(caller, "echo", "x" * 15 * 1024) == "caller:" + "x" * 15 * 1024
    fake = lk.participant(ROOM, "callee")
    assert fake is not None and [c[:2] for c in fake.rpc_calls] == [("caller", "echo")] * 2
    for link in (caller, callee):
        await link.aclose()


async def test_rpc_errors_carry_livekits_codes(lk: LiveKitServerEmulator) -> None:
    caller = await join(lk, "caller")
    callee = await join(lk, "callee")
    cancelled = asyncio.Event()

    async def slow(who: str, payload: str) -> str:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "too late"

    async def custom(who: str, payload: str) -> str:
        raise RoomRpcError(1542, "not today")

    async def broken(who: str, payload: str) -> str:
        raise ValueError("boom")

    for name, handler in (("slow", slow), ("custom", custom), ("broken", broken)):
        callee.register_rpc(name, handler)

    async def code_of(call: Awaitable[str]) -> RoomRpcError:
        with pytest.raises(RoomRpcError) as caught:
            await call
        return caught.value

    assert (await code_of(rpc(caller, "slow", to="nobody"))).code == 1401
    assert (await code_of(rpc(caller, "unregistered"))).code == 1400
    assert (await code_of(rpc(caller, "slow", "y" * (15 * 1024 + 1)))).code == 1402
    started = time.monotonic()
    assert (await code_of(rpc(caller, "slow", response_timeout=0.2))).code == 1502
    assert 0.15 < time.monotonic() - started < 1.0
    await asyncio.wait_for(cancelled.wait(), 1.0)  # the handler does not run on
    error = await code_of(rpc(caller, "custom"))
    assert (error.code, error.message) == (1542, "not today")
    error = await code_of(rpc(caller, "broken"))
    assert error.code == RoomRpcError.APPLICATION_ERROR and "boom" in error.message
    for link in (caller, callee):
        await link.aclose()


async def test_a_recipient_leaving_during_the_call_is_1503(lk: LiveKitServerEmulator) -> None:
    caller = await join(lk, "caller")
    callee = await join(lk, "callee")
    answering = asyncio.Event()

    async def hang(who: str, payload: str) -> str:
        answering.set()
        await asyncio.sleep(10)
        return "never"

    callee.register_rpc("hang", hang)
    call = asyncio.ensure_future(rpc(caller, "hang", response_timeout=5.0))
    await asyncio.wait_for(answering.wait(), 1.0)
    started = time.monotonic()
    await callee.aclose()
    with pytest.raises(RoomRpcError) as caught:
        await call
    assert caught.value.code == RoomRpcError.RECIPIENT_DISCONNECTED
    assert time.monotonic() - started < 1.0
    await caller.aclose()


# -- RoomService over HTTP --------------------------------------------------------------------


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(trust_env=False, timeout=5.0) as client:
        yield client


def room_service(lk: LiveKitServerEmulator, client: httpx.AsyncClient, *,
                 secret: str | None = None) -> RoomService:
    return RoomService(provider="t", client=client, url=lk.url,
                       api_key=SecretStr(lk.api_key),
                       api_secret=SecretStr(secret or lk.api_secret),
                       retry=RetryPolicy(max_retries=0), timeout=5)


async def test_room_service_lists_and_removes_participants(
        lk: LiveKitServerEmulator, http: httpx.AsyncClient) -> None:
    stays = await join(lk, "stays")
    goes = await join(lk, "goes")
    left: list[str] = []
    reasons: list[str] = []
    stays.on_participant_left = left.append
    goes.on_disconnected = reasons.append
    service = room_service(lk, http)
    assert sorted(await service.list_participants(ROOM)) == ["goes", "stays"]
    assert await service.remove_participant(ROOM, "goes") is True
    await eventually(lambda: reasons == ["PARTICIPANT_REMOVED"] and left == ["goes"],
                     within=1.0)
    fake = lk.rooms[ROOM]
    assert "goes" not in fake.participants
    assert await service.list_participants(ROOM) == ["stays"]
    assert await service.remove_participant(ROOM, "goes") is False
    assert await service.list_participants("no-such-room") == []
    assert [(c.method, c.status) for c in lk.twirp_calls] == [
        ("ListParticipants", 200), ("RemoveParticipant", 200), ("ListParticipants", 200),
        ("RemoveParticipant", 404), ("ListParticipants", 404)]
    assert lk.twirp_calls[1].body == {"room": ROOM, "identity": "goes"}
    await stays.aclose()
    await goes.aclose()  # removed already: a no-op


async def test_room_service_with_the_wrong_secret_is_an_authentication_error(
        lk: LiveKitServerEmulator, http: httpx.AsyncClient) -> None:
    link = await join(lk, "member")
    service = room_service(lk, http, secret=WRONG_SECRET)
    with pytest.raises(AuthenticationError) as caught:
        await service.remove_participant(ROOM, "member")
    text = f"{caught.value} {caught.value!r}"
    assert WRONG_SECRET not in text and lk.api_secret not in text
    assert [(c.method, c.status) for c in lk.twirp_calls] == [("RemoveParticipant", 401)]
    assert lk.participant(ROOM, "member") is link
    await link.aclose()


def _twirp_token(lk: LiveKitServerEmulator, case: str) -> str | None:
    if case == "no token":
        return None
    if case == "not an admin":
        return token(lk, "member", room_admin=False)
    if case == "admin of another room":
        return token(lk, "", room="elsewhere", room_join=False, room_admin=True)
    return token(lk, "", room_join=False, room_admin=True)


@pytest.mark.parametrize(("case", "method", "body", "status", "code"), [
    ("not an admin", "ListParticipants", {"room": ROOM}, 401, "unauthenticated"),
    ("no token", "ListParticipants", {"room": ROOM}, 401, "unauthenticated"),
    ("admin of another room", "RemoveParticipant", {"room": ROOM, "identity": "member"},
     401, "unauthenticated"),
    ("admin", "RemoveParticipant", {"room": ROOM}, 400, "malformed"),
    ("admin", "ListParticipants", {}, 400, "malformed"),
    ("admin", "DeleteEverything", {"room": ROOM}, 404, "bad_route"),
])
async def test_twirp_errors(lk: LiveKitServerEmulator, http: httpx.AsyncClient, case: str,
                           method: str, body: dict[str, Any], status: int, code: str) -> None:
    link = await join(lk, "member")
    bearer = _twirp_token(lk, case)
    headers = {} if bearer is None else {"Authorization": f"Bearer {bearer}"}
    response = await http.post(f"{http_url(lk.url)}/twirp/livekit.RoomService/{method}",
                               json=body, headers=headers)
    assert response.status_code == status
    answer = response.json()
    assert answer["code"] == code and answer["msg"]
    assert [(c.method, c.status) for c in lk.twirp_calls] == [(method, status)]
    assert lk.participant(ROOM, "member") is link
    await link.aclose()


async def test_list_rooms_needs_a_room_list_grant(lk: LiveKitServerEmulator,
                                                  http: httpx.AsyncClient) -> None:
    link = await join(lk, "member")
    url = f"{http_url(lk.url)}/twirp/livekit.RoomService/ListRooms"
    admin = token(lk, "", room=None, room_join=False, room_admin=True)
    response = await http.post(url, json={}, headers={"Authorization": f"Bearer {admin}"})
    assert response.status_code == 200
    assert response.json() == {"rooms": [{"name": ROOM, "num_participants": 1}]}
    room_admin = token(lk, "", room_join=False, room_admin=True)
    response = await http.post(url, json={}, headers={"Authorization": f"Bearer {room_admin}"})
    assert response.status_code == 401 and response.json()["code"] == "unauthenticated"
    await link.aclose()


# -- shutdown ---------------------------------------------------------------------------------


async def test_closing_the_server_disconnects_everyone_and_unregisters_its_url() -> None:
    before = set(asyncio.all_tasks())
    reasons: dict[str, list[str]] = {"a": [], "b": []}
    async with LiveKitServerEmulator() as lk:
        url = lk.url
        again = token(lk, "a")
        links = [await join(lk, identity) for identity in reasons]
        for link in links:
            link.on_disconnected = reasons[link.identity].append
    assert reasons == {"a": ["SERVER_SHUTDOWN"], "b": ["SERVER_SHUTDOWN"]}
    assert all(lk.participant(ROOM, i) is None for i in reasons)
    started = time.monotonic()
    with pytest.raises(ProviderConnectionError):  # now the SDK's path: nothing listens there
        await connect_room(url, again, provider="t", join_timeout=5)
    assert time.monotonic() - started < 3.0
    for link in links:
        await link.aclose()
    await eventually(lambda: not running_tasks(before), within=2.0)


# -- the avatar-worker contract: AvatarWorkerChannel against LiveKitAvatarWorker --------------


@dataclass
class Pair:
    """The agent's channel and the avatar's worker, in one room."""

    agent: RoomLink
    avatar: RoomLink
    channel: AvatarWorkerChannel
    worker: LiveKitAvatarWorker
    started: asyncio.Event = field(default_factory=asyncio.Event)
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    starts: int = 0
    finishes: list[tuple[float | None, bool]] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)
    muted: bool = False

    def on_started(self) -> None:
        self.starts += 1
        self.started.set()

    def on_finished(self, position: float | None, interrupted: bool) -> None:
        self.finishes.append((position, interrupted))
        self.finished.set()

    async def next_finish(self, within: float = 2.0) -> tuple[float | None, bool]:
        await asyncio.wait_for(self.finished.wait(), within)
        self.finished.clear()
        return self.finishes[-1]


async def make_pair(lk: LiveKitServerEmulator, *, channel_rate: int = RATE) -> Pair:
    agent = await join(lk, "agent", kind="agent")
    avatar = await join(lk, "avatar", kind="agent",
                        attributes={"lk.publish_on_behalf": "agent"})
    holder: list[Pair] = []
    worker = LiveKitAvatarWorker(avatar, sample_rate=RATE, agent_identity="agent",
                                 mute_interrupts=lambda: holder[0].muted,
                                 on_gone=lambda reason: holder[0].gone.append(reason))
    channel = AvatarWorkerChannel(agent, avatar_identity="avatar", sample_rate=channel_rate,
                                  provider="t", on_started=lambda: holder[0].on_started(),
                                  on_finished=lambda p, i: holder[0].on_finished(p, i))
    holder.append(Pair(agent=agent, avatar=avatar, channel=channel, worker=worker))
    return holder[0]


@pytest.fixture
async def pair(lk: LiveKitServerEmulator) -> AsyncIterator[Pair]:
    made = await make_pair(lk)
    yield made
    await made.worker.leave()
    await made.agent.aclose()


async def test_a_segment_plays_in_real_time_and_reports_start_and_finish(pair: Pair) -> None:
    started = time.monotonic()
    await pair.channel.write(pcm(0.3))
    assert pair.channel.segment_open
    await pair.channel.end_segment()
    assert not pair.channel.segment_open
    await asyncio.wait_for(pair.started.wait(), 1.0)
    position, interrupted = await pair.next_finish()
    assert interrupted is False and position == pytest.approx(0.3, abs=0.01)
    assert time.monotonic() - started >= 0.28  # played in real time, not at once
    (segment,) = pair.worker.segments
    assert (segment.kind, segment.outcome, segment.received_bytes) == ("audio", "finished",
                                                                      14_400)
    assert segment.name.startswith("AUDIO_")
    assert pair.starts == 1 and pair.worker.protocol_errors == []
    assert not pair.worker.speaking


async def test_clear_buffer_interrupts_and_drops_the_queue(pair: Pair) -> None:
    await pair.channel.write(pcm(1.0))
    await pair.channel.end_segment()
    await pair.channel.write(pcm(0.5))  # a second segment, queued behind the first
    await pair.channel.end_segment()
    await asyncio.wait_for(pair.started.wait(), 1.0)
    await asyncio.sleep(0.15)
    await pair.channel.clear_buffer(response_timeout=1.0)
    position, interrupted = await pair.next_finish()
    assert interrupted is True and position is not None and 0.05 < position < 1.0
    assert [s.outcome for s in pair.worker.segments] == ["interrupted", "interrupted"]
    assert pair.worker.interrupts == 1
    await asyncio.sleep(0.1)
    assert pair.starts == 1 and len(pair.finishes) == 1  # the queued segment never plays


async def test_clear_buffer_mid_write_ends_the_open_segment(pair: Pair) -> None:
    await pair.channel.write(pcm(0.5))
    await asyncio.wait_for(pair.started.wait(), 1.0)
    await pair.channel.clear_buffer(response_timeout=1.0)
    assert not pair.channel.segment_open
    _, interrupted = await pair.next_finish()
    assert interrupted is True
    await pair.channel.write(pcm(0.1))  # the next segment plays normally
    await pair.channel.end_segment()
    position, interrupted = await pair.next_finish()
    assert interrupted is False and position == pytest.approx(0.1, abs=0.01)
    assert [s.outcome for s in pair.worker.segments] == ["interrupted", "finished"]


async def test_with_mute_interrupts_the_worker_stops_but_sends_no_ack(pair: Pair) -> None:
    pair.muted = True
    await pair.channel.write(pcm(1.0))
    await pair.channel.end_segment()
    await asyncio.wait_for(pair.started.wait(), 1.0)
    await pair.channel.clear_buffer(response_timeout=1.0)
    await asyncio.sleep(0.3)
    assert pair.finishes == []
    assert [s.outcome for s in pair.worker.segments] == ["interrupted"]
    assert pair.worker.interrupts == 1 and not pair.worker.speaking


async def test_clear_buffer_with_nothing_playing_is_not_acknowledged(pair: Pair) -> None:
    await pair.channel.clear_buffer(response_timeout=1.0)
    await asyncio.sleep(0.05)
    assert pair.worker.interrupts == 1 and pair.finishes == []


async def test_a_stream_at_the_wrong_sample_rate_is_refused(lk: LiveKitServerEmulator) -> None:
    made = await make_pair(lk, channel_rate=16_000)
    await made.channel.write(pcm(0.2, 16_000))
    await made.channel.end_segment()
    await eventually(lambda: bool(made.worker.protocol_errors), within=1.0)
    (error,) = made.worker.protocol_errors
    assert "sample_rate='16000'" in error and "24000" in error
    await asyncio.sleep(0.05)
    assert made.worker.segments == [] and made.starts == 0
    await made.worker.leave()
    await made.agent.aclose()


async def test_odd_byte_counts_are_not_pcm16(pair: Pair) -> None:
    await pair.channel.write(b"\x00\x00\x00")
    await pair.channel.end_segment()
    await eventually(lambda: bool(pair.worker.protocol_errors), within=1.0)
    assert "3 bytes is not whole PCM16 samples" in pair.worker.protocol_errors[0]
    await pair.next_finish()


async def test_only_the_avatar_may_report_playback(lk: LiveKitServerEmulator,
                                                   pair: Pair) -> None:
    intruder = await join(lk, "intruder")
    payload = json.dumps({"playback_position": 1.0, "interrupted": False})
    for method in (RPC_PLAYBACK_STARTED, RPC_PLAYBACK_FINISHED):
        answer = await intruder.perform_rpc(destination="agent", method=method,
                                            payload=payload, response_timeout=1.0)
        assert answer == "reject"
    assert pair.starts == 0 and pair.finishes == []
    # and the worker takes audio from its agent only
    sink = await intruder.open_byte_stream(
        topic=AUDIO_STREAM_TOPIC, destination="avatar", name="AUDIO_x",
        attributes={"sample_rate": str(RATE), "num_channels": "1"})
    await sink.write(pcm(0.1))
    await sink.aclose()
    await eventually(lambda: bool(pair.worker.protocol_errors), within=1.0)
    assert "from intruder, not the agent" in pair.worker.protocol_errors[0]
    assert pair.worker.segments == []
    await intruder.aclose()


@pytest.mark.parametrize(("payload", "expected"), [
    (json.dumps({"playback_position": 1.25, "interrupted": True}), (1.25, True)),
    (json.dumps({"playback_position": -1, "interrupted": "yes"}), (None, False)),
    (json.dumps({"playback_position": True}), (None, False)),
    ("not json", (None, False)),
    ("", (None, False)),
])
async def test_playback_finished_payloads_are_read_defensively(
        lk: LiveKitServerEmulator, payload: str,
        expected: tuple[float | None, bool]) -> None:
    agent = await join(lk, "agent")
    avatar = await join(lk, "avatar")
    seen: list[tuple[float | None, bool]] = []
    AvatarWorkerChannel(agent, avatar_identity="avatar", sample_rate=RATE, provider="t",
                        on_started=lambda: None,
                        on_finished=lambda p, i: seen.append((p, i)))
    answer = await avatar.perform_rpc(destination="agent", method=RPC_PLAYBACK_FINISHED,
                                      payload=payload, response_timeout=1.0)
    assert answer == "ok" and seen == [expected]
    for link in (agent, avatar):
        await link.aclose()


async def _hang(who: str, payload: str) -> str:
    await asyncio.sleep(10)
    return "never"


async def _refuse(who: str, payload: str) -> str:
    raise RoomRpcError(RoomRpcError.APPLICATION_ERROR, "no")


@pytest.mark.parametrize(("handler", "error_type"), [
    (None, ProviderConnectionError),  # the avatar is not in the room: 1401
    ("unregistered", ProviderError),  # 1400
    (_hang, ProviderTimeoutError),  # 1502
    (_refuse, ProviderError),  # 1500
])
async def test_a_refused_clear_buffer_is_a_typed_provider_error(
        lk: LiveKitServerEmulator, handler: Any, error_type: type[ProviderError]) -> None:
    agent = await join(lk, "agent")
    avatar = await join(lk, "avatar" if handler is not None else "someone-else")
    if callable(handler):
        avatar.register_rpc(RPC_CLEAR_BUFFER, handler)
    channel = AvatarWorkerChannel(agent, avatar_identity="avatar", sample_rate=RATE,
                                  provider="t", on_started=lambda: None,
                                  on_finished=lambda p, i: None)
    with pytest.raises(error_type) as caught:
        await channel.clear_buffer(response_timeout=0.2)
    assert caught.value.provider == "t" and RPC_CLEAR_BUFFER in caught.value.message
    if error_type is ProviderError:
        assert type(caught.value) is ProviderError
    for link in (agent, avatar):
        await link.aclose()


async def test_the_worker_follows_its_agent_out(lk: LiveKitServerEmulator) -> None:
    made = await make_pair(lk)
    viewer = await join(lk, "viewer")
    await made.channel.write(pcm(1.0))
    await asyncio.wait_for(made.started.wait(), 1.0)
    await made.agent.aclose()
    await eventually(lambda: made.gone == ["agent_left"], within=1.0)
    await eventually(lambda: lk.participant(ROOM, "avatar") is None, within=1.0)
    assert viewer.participants() == frozenset()
    assert [s.outcome for s in made.worker.segments] == ["abandoned"]
    await viewer.aclose()


async def test_the_worker_reports_a_server_disconnect(lk: LiveKitServerEmulator,
                                                      http: httpx.AsyncClient) -> None:
    made = await make_pair(lk)
    assert await room_service(lk, http).remove_participant(ROOM, "avatar") is True
    await eventually(lambda: made.gone == ["disconnected: PARTICIPANT_REMOVED"], within=1.0)
    assert made.agent.participants() == frozenset()
    await made.worker.leave()
    await made.agent.aclose()


async def test_a_worker_without_an_agent_hint_takes_the_other_participant(
        lk: LiveKitServerEmulator) -> None:
    agent = await join(lk, "agent", kind="agent")
    avatar = await join(lk, "avatar")
    worker = LiveKitAvatarWorker(avatar, sample_rate=RATE, agent_identity=None,
                                 mute_interrupts=lambda: False)
    assert worker.agent_identity == "agent"
    finished: list[tuple[float | None, bool]] = []
    channel = AvatarWorkerChannel(agent, avatar_identity="avatar", sample_rate=RATE,
                                  provider="t", on_started=lambda: None,
                                  on_finished=lambda p, i: finished.append((p, i)))
    await channel.write(pcm(0.05))
    await channel.end_segment()
    await eventually(lambda: len(finished) == 1, within=1.0)
    assert finished[0][1] is False
    await worker.leave()
    await agent.aclose()
