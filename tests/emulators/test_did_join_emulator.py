"""D-ID's ``POST /v2/agents/{agent_id}/sessions/join`` in the D-ID emulator: the route over real
HTTP (httpx), D-ID's worker in a room of the in-process LiveKit server, and our agent's side of
the avatar-worker contract (``AvatarWorkerChannel``) talking to it.

Every test ends with no D-ID session billing and no task left running.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from avatarkit.emulators.did import DIDEmulator
from avatarkit.emulators.did_livekit import DIDRoomSession
from avatarkit.emulators.livekit import LiveKitServerEmulator
from avatarkit.transport.livekit import (
    AvatarWorkerChannel,
    RoomLink,
    RoomService,
    connect_room,
    mint_token,
)
from avatarkit.vendor_http import RetryPolicy

from ..conftest import eventually

API_KEY = "did-join-test-key"
AGENT = "agt_expressive"
AUTH = {"Authorization": f"Basic {API_KEY}"}
JOIN = f"/v2/agents/{AGENT}/sessions/join"
ROOM = "did-room"
AVATAR = "d-id-avatar-agent"
OUR_AGENT = "our-agent"
WRONG_SECRET = "not-the-secret-of-this-livekit-server-42"


def running_tasks(before: set[asyncio.Task[Any]]) -> list[asyncio.Task[Any]]:
    return [task for task in asyncio.all_tasks() - before
            if not task.done() and task is not asyncio.current_task()]


@dataclass
class Served:
    did: DIDEmulator
    lk: LiveKitServerEmulator
    http: httpx.AsyncClient


@contextlib.asynccontextmanager
async def serving(**options: Any) -> AsyncIterator[Served]:
    """Both servers and a D-ID client; fails if a session is left billing or a task running."""
    before = set(asyncio.all_tasks())
    options = {"seconds_per_text_character": 0.02, **options}
    async with LiveKitServerEmulator() as lk, \
            DIDEmulator(api_keys=[API_KEY], agents=[AGENT], **options) as did, \
            httpx.AsyncClient(base_url=did.url, headers=AUTH, trust_env=False,
                              timeout=5.0) as http:
        yield Served(did, lk, http)
        assert did.open_sessions == 0, "the test left a D-ID session billing"
    await eventually(lambda: not running_tasks(before), within=2.0)


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    async with serving() as pair:
        yield pair


def avatar_token(lk: LiveKitServerEmulator, *, room: str = ROOM, secret: str | None = None,
                 on_behalf: str | None = OUR_AGENT) -> str:
    """The token our agent mints for D-ID's worker, as LiveKit's D-ID plugin does."""
    return mint_token(api_key=lk.api_key, api_secret=secret or lk.api_secret,
                      identity=AVATAR, room=room, kind="agent", name="D-ID avatar",
                      attributes={"lk.publish_on_behalf": on_behalf} if on_behalf else None)


def join_body(lk: LiveKitServerEmulator, *, sample_rate: int | None = None,
              **transport: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"transport": {
        "provider": "livekit", "server_url": lk.url, "token": avatar_token(lk),
        "room_name": ROOM, **transport}}
    if sample_rate is not None:
        body["audio_config"] = {"sample_rate": sample_rate}
    return body


def error_of(response: httpx.Response) -> tuple[int, str, str]:
    body = response.json()
    assert set(body) == {"kind", "description"}, body
    return response.status_code, body["kind"], body["description"]


def pcm(seconds: float, rate: int) -> bytes:
    return b"\x10\x00" * round(seconds * rate)


class Agent:
    """Our agent in the room: its link, its half of the avatar contract, what it saw."""

    def __init__(self, link: RoomLink, *, sample_rate: int = 24_000) -> None:
        self.link = link
        self.left: list[str] = []
        self.starts = 0
        self.finishes: list[tuple[float | None, bool]] = []
        self._started = asyncio.Event()
        self._finished = asyncio.Event()
        link.on_participant_left = self.left.append
        self.channel = AvatarWorkerChannel(
            link, avatar_identity=AVATAR, sample_rate=sample_rate, provider="t",
            on_started=self._on_started, on_finished=self._on_finished)

    def _on_started(self) -> None:
        self.starts += 1
        self._started.set()

    def _on_finished(self, position: float | None, interrupted: bool) -> None:
        self.finishes.append((position, interrupted))
        self._finished.set()

    async def next_start(self) -> None:
        await asyncio.wait_for(self._started.wait(), 2.0)
        self._started.clear()

    async def next_finish(self) -> tuple[float | None, bool]:
        await asyncio.wait_for(self._finished.wait(), 2.0)
        self._finished.clear()
        return self.finishes[-1]

    async def say(self, topic: str, text: str) -> None:
        await self.link.send_text(text, topic=topic, destination=AVATAR)


async def agent_in_room(lk: LiveKitServerEmulator, *, sample_rate: int = 24_000) -> Agent:
    link = await connect_room(lk.url, mint_token(
        api_key=lk.api_key, api_secret=lk.api_secret, identity=OUR_AGENT, room=ROOM,
        kind="agent"), provider="t", join_timeout=2)
    return Agent(link, sample_rate=sample_rate)


async def start_session(s: Served, *, sample_rate: int | None = None,
                        **transport: Any) -> tuple[DIDRoomSession, Agent]:
    """Our agent joins, asks D-ID to join, and waits for D-ID's worker in the room."""
    agent = await agent_in_room(s.lk, sample_rate=sample_rate or 24_000)
    response = await s.http.post(JOIN, json=join_body(s.lk, sample_rate=sample_rate,
                                                      **transport))
    assert response.status_code == 201, response.text
    session = s.did.room_sessions.sessions[response.json()["id"]]
    await asyncio.wait_for(agent.link.wait_for_participant(AVATAR), 2.0)
    await eventually(lambda: session.status == "active", within=1.0)
    return session, agent


async def leave_and_settle(s: Served, session: DIDRoomSession, agent: Agent) -> None:
    """Our agent leaves; D-ID's worker follows it out and the session stops billing."""
    await agent.link.aclose()
    await eventually(lambda: session.status == "ended", within=2.0)
    assert session.end_reason == "agent_left"
    await eventually(lambda: s.lk.participant(ROOM, AVATAR) is None, within=1.0)


# -- a session --------------------------------------------------------------------------------


async def test_a_join_bills_and_d_ids_worker_joins_as_the_tokens_identity(
        served: Served) -> None:
    s = served
    agent = await agent_in_room(s.lk)
    response = await s.http.post(JOIN, json=join_body(s.lk))
    assert response.status_code == 201
    body = response.json()
    assert set(body) == {"id", "status"} and body["status"] == "joining"
    assert s.did.open_sessions == 1  # billing starts with the request
    await asyncio.wait_for(agent.link.wait_for_participant(AVATAR), 2.0)
    worker = s.lk.participant(ROOM, AVATAR)
    assert worker is not None
    assert (worker.kind, worker.name, worker.attributes) == (
        "agent", "D-ID avatar", {"lk.publish_on_behalf": OUR_AGENT})
    session = s.did.room_sessions.sessions[body["id"]]
    await eventually(lambda: session.status == "active", within=1.0)
    assert (session.agent_id, session.room, session.server_url, session.sample_rate) == (
        AGENT, ROOM, s.lk.url, 24_000)
    assert session.token_claims["sub"] == AVATAR
    assert session.token_claims["video"]["room"] == ROOM
    assert session.token_claims["iss"] == s.lk.api_key
    assert session.ledger_entry.is_open and session.join_error is None
    await leave_and_settle(s, session, agent)


async def test_the_agent_streams_audio_and_sends_commands_through_the_room(
        served: Served) -> None:
    s = served
    session, agent = await start_session(s, sample_rate=16_000)
    assert session.sample_rate == 16_000 and session.worker is not None
    worker = session.worker
    # audio on lk.audio_stream at the configured rate, playback RPCs back
    await agent.channel.write(pcm(0.2, 16_000))
    await agent.channel.end_segment()
    await agent.next_start()
    position, interrupted = await agent.next_finish()
    assert interrupted is False and position == pytest.approx(0.2, abs=0.01)
    assert session.audio_seconds == pytest.approx(0.2)
    # did.speak: D-ID renders the text itself
    await agent.say("did.speak", json.dumps({"script": {"type": "text",
                                                        "input": "Hello there"}}))
    await agent.next_start()
    position, interrupted = await agent.next_finish()
    assert interrupted is False and position == pytest.approx(11 * 0.02, abs=0.01)
    assert (worker.segments[-1].kind, worker.segments[-1].outcome) == ("text", "finished")
    # did.interrupt clears what plays
    await agent.say("did.speak", json.dumps({"script": {"type": "text",
                                                        "input": "x" * 100}}))
    await agent.next_start()
    await agent.say("did.interrupt", "")
    position, interrupted = await agent.next_finish()
    assert interrupted is True and position is not None and position < 2.0
    assert worker.segments[-1].outcome == "interrupted" and worker.interrupts == 1
    # lk.clear_buffer does the same
    await agent.channel.write(pcm(1.0, 16_000))
    await agent.next_start()
    await agent.channel.clear_buffer(response_timeout=1.0)
    _, interrupted = await agent.next_finish()
    assert interrupted is True and worker.interrupts == 2
    # lk.chat goes to the agent's LLM at D-ID: recorded
    await agent.say("lk.chat", "what is the weather like?")
    await eventually(lambda: ("lk.chat", "what is the weather like?") in session.commands,
                     within=1.0)
    assert [topic for topic, _ in session.commands] == [
        "did.speak", "did.speak", "did.interrupt", "lk.chat"]
    assert session.all_protocol_errors == []
    await leave_and_settle(s, session, agent)


async def test_bad_commands_are_recorded_as_protocol_errors(served: Served) -> None:
    s = served
    session, agent = await start_session(s)
    await agent.say("did.speak", "not json")
    await agent.say("did.speak", json.dumps({"script": {"type": "audio", "audio_url": "x"}}))
    await agent.say("did.speak", json.dumps({"script": {"type": "text", "input": "hi"}}))
    stranger = await connect_room(s.lk.url, mint_token(
        api_key=s.lk.api_key, api_secret=s.lk.api_secret, identity="stranger", room=ROOM),
        provider="t", join_timeout=2)
    await stranger.send_text(json.dumps({"script": {"type": "text", "input": "Hello"}}),
                             topic="did.speak", destination=AVATAR)
    await stranger.send_text("", topic="did.interrupt", destination=AVATAR)
    await eventually(lambda: len(session.commands) == 5, within=1.0)
    errors = session.all_protocol_errors
    assert len(errors) == 4 and "did.speak: message is not valid JSON" in errors
    assert "did.speak from stranger, not the agent" in errors
    assert session.worker is not None and session.worker.segments == []
    assert session.worker.interrupts == 0
    await stranger.aclose()
    await leave_and_settle(s, session, agent)


async def test_removing_the_avatar_through_the_room_service_ends_the_session(
        served: Served) -> None:
    s = served
    session, agent = await start_session(s)
    async with httpx.AsyncClient(trust_env=False) as client:
        service = RoomService(provider="t", client=client, url=s.lk.url,
                              api_key=SecretStr(s.lk.api_key),
                              api_secret=SecretStr(s.lk.api_secret),
                              retry=RetryPolicy(max_retries=0), timeout=5)
        assert await service.remove_participant(ROOM, AVATAR) is True
    await eventually(lambda: session.status == "ended", within=1.0)
    assert session.end_reason is not None and "PARTICIPANT_REMOVED" in session.end_reason
    entry = s.did.ledger.entries[session.session_id]
    assert not entry.is_open and entry.end_reason == session.end_reason
    assert s.did.open_sessions == 0
    await eventually(lambda: agent.left == [AVATAR], within=1.0)
    await agent.link.aclose()


async def test_the_agent_leaving_makes_the_worker_leave_and_ends_billing(
        served: Served) -> None:
    s = served
    session, agent = await start_session(s)
    await leave_and_settle(s, session, agent)
    assert s.did.open_sessions == 0 and s.lk.rooms[ROOM].participants == {}
    billed = session.billed_seconds
    await asyncio.sleep(0.1)
    assert session.billed_seconds == billed


async def test_without_publish_on_behalf_the_worker_still_follows_the_agent_out() -> None:
    async with serving() as s:
        agent = await agent_in_room(s.lk)
        response = await s.http.post(
            JOIN, json=join_body(s.lk, token=avatar_token(s.lk, on_behalf=None)))
        session = s.did.room_sessions.sessions[response.json()["id"]]
        await asyncio.wait_for(agent.link.wait_for_participant(AVATAR), 2.0)
        await agent.link.aclose()
        try:
            await eventually(lambda: session.status == "ended", within=1.0)
        finally:
            await s.did.reset()


# -- validation -------------------------------------------------------------------------------


def _without(lk: LiveKitServerEmulator, key: str) -> dict[str, Any]:
    body = join_body(lk)
    del body["transport"][key]
    return body


BAD_BODIES: dict[str, tuple[Any, str]] = {
    # case: (body from the LiveKit server, a field the description must name)
    "no transport": (lambda lk: {"audio_config": {"sample_rate": 24_000}}, "transport"),
    "transport not an object": (lambda lk: {"transport": "livekit"}, "transport"),
    "provider daily": (lambda lk: join_body(lk, provider="daily"), "transport.provider"),
    "no server_url": (lambda lk: _without(lk, "server_url"), "transport.server_url"),
    "no token": (lambda lk: _without(lk, "token"), "transport.token"),
    "no room_name": (lambda lk: _without(lk, "room_name"), "transport.room_name"),
    "empty room_name": (lambda lk: join_body(lk, room_name=" "), "transport.room_name"),
    "sample_rate 22050": (lambda lk: join_body(lk, sample_rate=22_050),
                          "audio_config.sample_rate"),
    "audio_config not an object": (lambda lk: {**join_body(lk), "audio_config": 24_000},
                                   "audio_config"),
    "token not a JWT": (lambda lk: join_body(lk, token="not-a-jwt"), "transport.token"),
    "token for another room": (lambda lk: join_body(lk, token=avatar_token(lk, room="other")),
                               "transport.token"),
}


@pytest.mark.parametrize("case", sorted(BAD_BODIES))
async def test_a_bad_join_request_is_400_naming_the_field(served: Served, case: str) -> None:
    s = served
    make, field_name = BAD_BODIES[case]
    status, kind, description = error_of(await s.http.post(JOIN, json=make(s.lk)))
    assert (status, kind) == (400, "BadRequestError")
    assert field_name in description
    assert s.lk.api_secret not in description
    assert s.did.room_sessions.sessions == {} and s.did.open_sessions == 0
    assert s.lk.rooms == {}


async def test_a_body_that_is_not_json_is_400(served: Served) -> None:
    response = await served.http.post(JOIN, content=b"{nope",
                                      headers={"Content-Type": "application/json"})
    assert error_of(response)[:2] == (400, "BadRequestError")


async def test_refusals_before_any_session(served: Served) -> None:
    s = served
    body = join_body(s.lk)
    status, kind, description = error_of(
        await s.http.post("/v2/agents/agt_nobody/sessions/join", json=body))
    assert (status, kind) == (404, "NotFoundError") and "agt_nobody" in description
    s.did.out_of_credits = True
    assert error_of(await s.http.post(JOIN, json=body))[:2] == (402,
                                                                 "InsufficientCreditsError")
    s.did.out_of_credits = False
    response = await s.http.post(JOIN, json=body,
                                 headers={"Authorization": "Basic wrong-key"})
    assert error_of(response)[:2] == (401, "AuthorizationError")
    assert s.did.room_sessions.sessions == {} and s.lk.rooms == {}


async def test_injected_create_failures_apply_to_the_join_route(served: Served) -> None:
    s = served
    s.did.faults.fail_next_creates(1)
    agent = await agent_in_room(s.lk)
    status, kind, _ = error_of(await s.http.post(JOIN, json=join_body(s.lk)))
    assert (status, kind) == (503, "InternalServerError")
    assert s.did.room_sessions.sessions == {} and s.did.open_sessions == 0
    response = await s.http.post(JOIN, json=join_body(s.lk))  # the next one goes through
    assert response.status_code == 201
    session = s.did.room_sessions.sessions[response.json()["id"]]
    await asyncio.wait_for(agent.link.wait_for_participant(AVATAR), 2.0)
    await leave_and_settle(s, session, agent)


async def test_the_concurrency_limit_applies_to_joins() -> None:
    async with serving(max_concurrent=1) as s:
        first, agent = await start_session(s)
        response = await s.http.post(JOIN, json=join_body(s.lk))
        assert error_of(response)[:2] == (402, "InsufficientCreditsError")
        await leave_and_settle(s, first, agent)


# -- joins that fail --------------------------------------------------------------------------


async def test_a_token_the_livekit_server_refuses_ends_the_session_as_join_failed(
        served: Served) -> None:
    s = served
    response = await s.http.post(JOIN, json=join_body(
        s.lk, token=avatar_token(s.lk, secret=WRONG_SECRET)))
    assert response.status_code == 201  # D-ID cannot check a token it has no secret for
    session = s.did.room_sessions.sessions[response.json()["id"]]
    await eventually(lambda: session.status == "ended", within=2.0)
    assert session.end_reason == "join_failed" and session.worker is None
    assert session.join_error is not None and "refused" in session.join_error
    assert WRONG_SECRET not in session.join_error
    assert not session.ledger_entry.is_open and s.did.open_sessions == 0
    assert session.billed_seconds < 1.0
    assert len(s.lk.refused_joins) == 1


async def test_a_server_that_cannot_be_reached_ends_the_session_as_join_failed(
        served: Served) -> None:
    s = served
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    response = await s.http.post(JOIN, json=join_body(s.lk, server_url=f"ws://127.0.0.1:{port}"))
    assert response.status_code == 201
    session = s.did.room_sessions.sessions[response.json()["id"]]
    await eventually(lambda: session.status == "ended", within=4.0)
    assert session.end_reason == "join_failed"
    assert session.join_error is not None and "could not join" in session.join_error
    assert s.did.open_sessions == 0


async def test_a_server_url_that_is_not_a_url_is_refused_or_fails_the_join() -> None:
    async with serving() as s:
        response = await s.http.post(JOIN, json=join_body(s.lk, server_url="not-a-url"))
        try:
            if response.status_code == 201:
                session = s.did.room_sessions.sessions[response.json()["id"]]
                await eventually(lambda: session.status == "ended", within=1.0)
                assert session.end_reason == "join_failed" and session.join_error
            else:
                status, _, description = error_of(response)
                assert status == 400 and "transport.server_url" in description
        finally:
            await s.did.reset()


# -- timing -----------------------------------------------------------------------------------


async def test_the_worker_joins_after_the_join_delay(served: Served) -> None:
    s = served
    s.did.room_sessions.join_delay = 0.4
    agent = await agent_in_room(s.lk)
    started = time.monotonic()
    response = await s.http.post(JOIN, json=join_body(s.lk))
    session = s.did.room_sessions.sessions[response.json()["id"]]
    await asyncio.sleep(0.1)
    assert s.lk.participant(ROOM, AVATAR) is None and session.status == "joining"
    assert s.did.open_sessions == 1  # billed while joining
    await asyncio.wait_for(agent.link.wait_for_participant(AVATAR), 2.0)
    assert time.monotonic() - started >= 0.4
    await eventually(lambda: session.status == "active", within=1.0)
    await leave_and_settle(s, session, agent)


async def test_a_session_ended_while_joining_never_joins(served: Served) -> None:
    s = served
    s.did.room_sessions.join_delay = 0.2
    agent = await agent_in_room(s.lk)
    response = await s.http.post(JOIN, json=join_body(s.lk))
    session = s.did.room_sessions.sessions[response.json()["id"]]
    await s.did.reset()  # waits for the join in flight
    assert (session.status, session.end_reason) == ("ended", "emulator_reset")
    await asyncio.sleep(0.1)
    assert s.lk.participant(ROOM, AVATAR) is None and agent.link.participants() == frozenset()
    await agent.link.aclose()


async def test_an_idle_session_times_out_and_the_worker_leaves() -> None:
    async with serving(default_session_timeout=0.3) as s:
        started = time.monotonic()
        session, agent = await start_session(s)
        await eventually(lambda: session.status == "ended", within=2.0)
        assert session.end_reason == "idle_timeout"
        assert time.monotonic() - started >= 0.3
        await eventually(lambda: agent.left == [AVATAR], within=1.0)
        assert s.lk.participant(ROOM, AVATAR) is None
        await agent.link.aclose()


async def test_audio_keeps_a_session_from_idling_out() -> None:
    async with serving(default_session_timeout=0.3) as s:
        session, agent = await start_session(s)
        await agent.channel.write(pcm(0.5, 24_000))  # plays longer than the idle timeout
        await agent.channel.end_segment()
        try:
            await agent.next_finish()
            assert session.status == "active"
            await eventually(lambda: session.status == "ended", within=2.0)  # idle again
            assert session.end_reason == "idle_timeout"
        finally:
            await agent.link.aclose()


async def test_max_duration_ends_the_session_and_the_worker_leaves() -> None:
    async with serving(max_duration=0.5) as s:
        started = time.monotonic()
        session, agent = await start_session(s)
        await eventually(lambda: session.status == "ended", within=2.0)
        assert session.end_reason == "max_duration"
        assert time.monotonic() - started >= 0.45
        await eventually(lambda: agent.left == [AVATAR], within=1.0)
        await agent.link.aclose()


async def test_the_drop_fault_crashes_the_worker_out_mid_segment(served: Served) -> None:
    s = served
    s.did.faults.drop_channel_after(0.2)
    session, agent = await start_session(s)
    for _ in range(20):  # 1 s of audio in 50 ms pieces, until the avatar is gone
        await agent.channel.write(pcm(0.05, 24_000))
        await asyncio.sleep(0.01)
        if session.status == "ended":
            break
    await eventually(lambda: agent.left == [AVATAR], within=1.0)
    assert (session.status, session.end_reason) == ("ended", "worker_crashed")
    assert 0.2 <= session.audio_seconds < 0.5  # crashed mid-segment, not at its end
    assert session.worker is not None
    assert [seg.outcome for seg in session.worker.segments] == ["abandoned"]
    assert s.did.open_sessions == 0
    await agent.channel.end_segment()
    await agent.link.aclose()


# -- control ----------------------------------------------------------------------------------


async def test_reset_ends_room_sessions(served: Served) -> None:
    s = served
    session, agent = await start_session(s)
    await s.did.reset()
    assert (session.status, session.end_reason) == ("ended", "emulator_reset")
    assert s.did.room_sessions.sessions == {} and s.did.open_sessions == 0
    await eventually(lambda: agent.left == [AVATAR], within=1.0)
    await agent.link.aclose()


async def test_the_state_lists_room_sessions(served: Served) -> None:
    s = served
    session, agent = await start_session(s)
    await agent.channel.write(pcm(0.1, 24_000))
    await agent.channel.end_segment()
    await agent.next_finish()
    await agent.say("lk.chat", "hi")
    await eventually(lambda: bool(session.commands), within=1.0)
    state = (await s.http.get("/_emulator/state")).json()
    assert state["open_sessions"] == 1
    (described,) = state["room_sessions"]
    assert {k: described[k] for k in ("id", "agent_id", "room", "sample_rate", "status",
                                      "identity", "kind", "attributes", "interrupts",
                                      "commands", "join_error", "protocol_errors")} == {
        "id": session.session_id, "agent_id": AGENT, "room": ROOM, "sample_rate": 24_000,
        "status": "active", "identity": AVATAR, "kind": "agent",
        "attributes": {"lk.publish_on_behalf": OUR_AGENT}, "interrupts": 0,
        "commands": [{"topic": "lk.chat", "text": "hi"}], "join_error": None,
        "protocol_errors": []}
    assert described["audio_seconds"] == pytest.approx(0.1)
    (segment,) = described["segments"]
    assert (segment["kind"], segment["outcome"]) == ("audio", "finished")
    assert s.lk.api_secret not in json.dumps(state)
    await leave_and_settle(s, session, agent)
    state = (await s.http.get("/_emulator/state")).json()
    assert state["room_sessions"][0]["status"] == "ended"
    assert state["room_sessions"][0]["end_reason"] == "agent_left"
