"""Tests of the HeyGen LiveAvatar (LITE) emulator over real sockets (httpx + websockets)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

import avatarkit.emulators
from avatarkit.emulators import EMULATORS, LiveAvatarEmulator, run_emulators
from avatarkit.emulators.liveavatar import SANDBOX_AVATAR_ID

API_KEY = "test-key"
AVATAR = "a-anna"
RATE = 24000


@pytest.fixture
async def emu() -> AsyncIterator[LiveAvatarEmulator]:
    async with LiveAvatarEmulator(faces=[AVATAR], max_concurrent=2) as emulator:
        yield emulator


@pytest.fixture
async def client(emu: LiveAvatarEmulator) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=emu.url, timeout=5.0, trust_env=False) as http:
        yield http


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def mint(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    response = await client.post(
        "/v1/sessions/token",
        json={"mode": "LITE", "avatar_id": AVATAR, **body},
        headers={"X-API-KEY": API_KEY},
    )
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()["data"]
    return data


async def start(client: httpx.AsyncClient, token: str) -> dict[str, Any]:
    response = await client.post("/v1/sessions/start", headers=bearer(token))
    assert response.status_code == 201, response.text
    data: dict[str, Any] = response.json()["data"]
    return data


async def open_session(client: httpx.AsyncClient, **body: Any) -> tuple[str, str, str]:
    """Mint and start a session: its id, session token and ws_url."""
    minted = await mint(client, **body)
    started = await start(client, minted["session_token"])
    return minted["session_id"], minted["session_token"], started["ws_url"]


async def stop(client: httpx.AsyncClient, token: str, **body: Any) -> httpx.Response:
    return await client.post("/v1/sessions/stop", json=body, headers=bearer(token))


def dial(ws_url: str) -> connect:
    return connect(ws_url, proxy=None, open_timeout=2, close_timeout=2, max_size=None)


async def next_event(ws: ClientConnection, within: float = 1.0) -> dict[str, Any]:
    event: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), within))
    return event


async def connected(ws_url: str) -> ClientConnection:
    """A WebSocket past the vendor's ``connected`` gate."""
    ws = await dial(ws_url)
    assert await next_event(ws) == {"type": "session.state_updated", "state": "connecting"}
    assert await next_event(ws) == {"type": "session.state_updated", "state": "connected"}
    return ws


async def expect_silence(ws: ClientConnection, seconds: float) -> None:
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(ws.recv(), seconds)


def pcm(seconds: float, rate: int = RATE) -> bytes:
    return bytes(2 * round(seconds * rate))


def speak(event_id: str, seconds: float = 0.0, *, raw: bytes | None = None, **extra: Any) -> str:
    audio = base64.b64encode(pcm(seconds) if raw is None else raw).decode()
    return json.dumps({"type": "agent.speak", "event_id": event_id, "audio": audio, **extra})


def msg(kind: str, **fields: Any) -> str:
    return json.dumps({"type": kind, **fields})


async def wait_until_ended(emu: LiveAvatarEmulator, session_id: str, within: float) -> None:
    deadline = time.monotonic() + within
    while emu.sessions[session_id].status != "ended":
        assert time.monotonic() < deadline, "session did not end in time"
        await asyncio.sleep(0.02)


# -- REST: auth, token, start -------------------------------------------------------------------


@pytest.mark.parametrize("headers", [{}, {"X-API-KEY": "wrong-key"}, {"Authorization": "Bearer x"}])
async def test_token_needs_the_api_key(
    emu: LiveAvatarEmulator, client: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    response = await client.post(
        "/v1/sessions/token", json={"mode": "LITE", "avatar_id": AVATAR}, headers=headers
    )
    state = (await client.get("/_emulator/state")).text
    assert response.status_code == 401
    assert response.json() == {"code": 401, "message": "Invalid or missing API key", "data": None}
    assert not emu.sessions and emu.requests[-1].status == 401
    assert "wrong-key" not in state


async def test_start_needs_the_session_token_not_the_api_key(
    emu: LiveAvatarEmulator, client: httpx.AsyncClient
) -> None:
    minted = await mint(client)
    refused = [
        await client.post("/v1/sessions/start"),
        await client.post("/v1/sessions/start", headers={"X-API-KEY": API_KEY}),
        await client.post("/v1/sessions/start", headers=bearer("not-a-session-token")),
        await client.post("/v1/sessions/start", headers={"Authorization": minted["session_token"]}),
    ]
    assert [r.status_code for r in refused] == [401] * 4
    assert emu.sessions[minted["session_id"]].status == "minted"
    response = await client.post(
        "/v1/sessions/start",
        json={"session_id": minted["session_id"]},
        headers=bearer(minted["session_token"]),
    )
    assert response.status_code == 201
    assert response.json()["code"] == 1000


async def test_billing_starts_at_start_not_at_token(
    emu: LiveAvatarEmulator, client: httpx.AsyncClient
) -> None:
    minted = await mint(client)
    assert set(minted) == {"session_id", "session_token"}
    await asyncio.sleep(0.1)
    assert (emu.open_sessions, emu.billed_seconds) == (0, 0.0)
    started = await start(client, minted["session_token"])
    assert emu.open_sessions == 1
    assert emu.ledger.entries[minted["session_id"]].is_open
    assert set(started) == {
        "session_id",
        "livekit_url",
        "livekit_client_token",
        "livekit_agent_token",
        "max_session_duration",
        "ws_url",
    }
    assert started["session_id"] == minted["session_id"]
    assert started["livekit_client_token"] != started["livekit_agent_token"]
    assert started["livekit_url"].startswith("wss://")
    assert started["ws_url"].startswith(emu.url.replace("http://", "ws://"))
    assert started["max_session_duration"] == 3600
    record = emu.sessions[minted["session_id"]]
    assert record.tokens_distinct and record.status == "active"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"avatar_id": AVATAR}, "mode"),
        ({"mode": "lite", "avatar_id": AVATAR}, "mode"),
        ({"mode": "LITE"}, "avatar_id"),
        ({"mode": "LITE", "avatar_id": 7}, "avatar_id"),
        ({"mode": "LITE", "avatar_id": AVATAR, "is_sandbox": "yes"}, "is_sandbox"),
        ({"mode": "LITE", "avatar_id": AVATAR, "max_session_duration": 0}, "max_session_duration"),
        ({"mode": "LITE", "avatar_id": AVATAR, "video_quality": "4k"}, "video_quality"),
        (
            {"mode": "LITE", "avatar_id": AVATAR, "video_settings": {"quality": "ultra"}},
            "video_settings.quality",
        ),
        (
            {"mode": "LITE", "avatar_id": AVATAR, "livekit_config": {"url": "wss://x"}},
            "livekit_config",
        ),
    ],
)
async def test_invalid_token_request_is_422_fastapi_style(
    emu: LiveAvatarEmulator, client: httpx.AsyncClient, body: dict[str, Any], field: str
) -> None:
    response = await client.post("/v1/sessions/token", json=body, headers={"X-API-KEY": API_KEY})
    assert response.status_code == 422
    [detail] = response.json()["detail"]
    assert detail["loc"] == ["body", field]
    assert not emu.sessions


async def test_full_mode_and_unknown_avatar_are_refused(
    emu: LiveAvatarEmulator, client: httpx.AsyncClient
) -> None:
    headers = {"X-API-KEY": API_KEY}
    full = await client.post(
        "/v1/sessions/token", json={"mode": "FULL", "avatar_id": AVATAR}, headers=headers
    )
    unknown = await client.post(
        "/v1/sessions/token", json={"mode": "LITE", "avatar_id": "a-none"}, headers=headers
    )
    not_json = await client.post("/v1/sessions/token", content=b"[1]", headers=headers)
    assert full.status_code == 400 and "LITE" in full.json()["message"]
    assert unknown.status_code == 404 and "a-none" in unknown.json()["message"]
    assert not_json.status_code == 400
    assert not emu.sessions


async def test_token_accepts_both_field_vocabularies(
    emu: LiveAvatarEmulator, client: httpx.AsyncClient
) -> None:
    plugin = await mint(
        client,
        video_quality="high",
        livekit_config={
            "livekit_url": "wss://lk",
            "livekit_room": "r1",
            "livekit_client_token": "t",
        },
    )
    guide = await mint(
        client, video_settings={"quality": "low"}, livekit_config={"url": "wss://lk2", "token": "t"}
    )
    first, second = emu.sessions[plugin["session_id"]], emu.sessions[guide["session_id"]]
    assert (first.video_quality, first.byo_livekit) == (
        "high",
        {"livekit_url": "wss://lk", "livekit_room": "r1"},
    )
    assert (second.video_quality, second.byo_livekit) == (
        "low",
        {"livekit_url": "wss://lk2", "livekit_room": None},
    )


async def test_start_twice_after_stop_or_for_another_session_is_400(
    emu: LiveAvatarEmulator, client: httpx.AsyncClient
) -> None:
    session_id, token, _ = await open_session(client)
    again = await client.post("/v1/sessions/start", headers=bearer(token))
    other = await mint(client)
    mismatched = await client.post(
        "/v1/sessions/start",
        json={"session_id": session_id},
        headers=bearer(other["session_token"]),
    )
    await stop(client, other["session_token"])
    after_stop = await client.post("/v1/sessions/start", headers=bearer(other["session_token"]))
    assert again.status_code == 400 and "already active" in again.json()["message"]
    assert mismatched.status_code == 400 and "does not match" in mismatched.json()["message"]
    assert after_stop.status_code == 400 and "already ended" in after_stop.json()["message"]
    assert emu.open_sessions == 1


async def test_concurrency_counts_started_sessions_only() -> None:
    async with (
        LiveAvatarEmulator(faces=[AVATAR], max_concurrent=1, concurrency_limit_status=429) as emu,
        httpx.AsyncClient(base_url=emu.url, trust_env=False) as http,
    ):
        first, second = await mint(http), await mint(http)
        await start(http, first["session_token"])
        refused = await http.post("/v1/sessions/start", headers=bearer(second["session_token"]))
        await stop(http, first["session_token"])
        retried = await http.post("/v1/sessions/start", headers=bearer(second["session_token"]))
    assert refused.status_code == 429
    assert refused.json()["message"] == "concurrent session limit reached"
    assert retried.status_code == 201


async def test_error_shape_is_configurable() -> None:
    async with (
        LiveAvatarEmulator(error_shape="detail") as emu,
        httpx.AsyncClient(base_url=emu.url, trust_env=False) as http,
    ):
        response = await http.post("/v1/sessions/token", json={})
    assert response.status_code == 401
    assert response.json() == {"detail": "Invalid or missing API key"}


def test_constructor_rejects_impossible_choices() -> None:
    with pytest.raises(ValueError, match="at least one stop route"):
        LiveAvatarEmulator(post_stop_status=404, delete_stop_status=405)
    with pytest.raises(ValueError, match="None, 404 or 405"):
        LiveAvatarEmulator(post_stop_status=500)
    with pytest.raises(ValueError, match="interrupt_events"):
        LiveAvatarEmulator(interrupt_events=["agent.stopped"])
    with pytest.raises(ValueError, match="idle_timeout"):
        LiveAvatarEmulator(idle_timeout=-1)
    with pytest.raises(ValueError, match="api_keys"):
        LiveAvatarEmulator(api_keys=[])


# -- the LITE WebSocket -------------------------------------------------------------------------


async def test_full_flow_speaks_and_stop_ends_billing(
    emu: LiveAvatarEmulator, client: httpx.AsyncClient
) -> None:
    session_id, token, ws_url = await open_session(client)
    async with await connected(ws_url) as ws:
        await ws.send(speak("e-1", 0.6))
        started = await next_event(ws)
        began = time.monotonic()
        await ws.send(speak("e-1", 0.3))
        await ws.send(speak("e-1", 0.1))
        await ws.send(msg("agent.speak_end", event_id="e-1"))
        ended = await next_event(ws, within=2.0)
        elapsed = time.monotonic() - began
        response = await stop(client, token, session_id=session_id, reason="USER_DISCONNECTED")
        closed = await next_event(ws)
        with pytest.raises(ConnectionClosed):
            await ws.recv()
    assert started["type"] == "agent.speak_started" and started["event_id"] == "e-1"
    assert ended["type"] == "agent.speak_ended" and ended["event_id"] == "e-1"
    assert started["task"]["id"] == ended["task"]["id"]
    assert 0.9 <= elapsed <= 1.4  # played in real time, not as fast as it arrived
    assert (response.status_code, response.json()["code"]) == (200, 1000)
    assert closed == {"type": "session.state_updated", "state": "closed", "reason": "stopped"}
    assert ws.close_code == 1000
    record = emu.sessions[session_id]
    assert (record.status, record.end_reason, record.stop_reason) == (
        "ended",
        "stopped",
        "USER_DISCONNECTED",
    )
    [utterance] = record.utterances
    assert utterance.chunk_seconds == pytest.approx([0.6, 0.3, 0.1])
    assert (utterance.outcome, utterance.end_event_id) == ("finished", "e-1")
    assert utterance.played_seconds == pytest.approx(1.0, abs=0.01)
    assert [c.audio_bytes for c in record.speak_chunks] == [28800, 14400, 4800]
    assert all(c.message_bytes > c.audio_bytes * 4 / 3 for c in record.speak_chunks)
    assert record.audio_seconds_by_event == {"e-1": pytest.approx(1.0)}
    assert record.protocol_errors == [] and record.speak_ends == ["e-1"]
    billed = emu.billed_seconds
    await asyncio.sleep(0.1)
    assert emu.open_sessions == 0 and emu.billed_seconds == billed == record.billed_seconds


async def test_messages_before_connected_are_dropped_and_counted() -> None:
    async with (
        LiveAvatarEmulator(faces=[AVATAR], connected_delay=0.3) as emu,
        httpx.AsyncClient(base_url=emu.url, trust_env=False) as http,
    ):
        session_id, _, ws_url = await open_session(http)
        async with dial(ws_url) as ws:
            assert (await next_event(ws))["state"] == "connecting"
            await ws.send(speak("e-early", 0.2))
            await ws.send(msg("session.keep_alive", event_id="k-1"))
            assert (await next_event(ws))["state"] == "connected"  # and no speak_started
            await ws.send(speak("e-late", 0.1))
            assert (await next_event(ws))["event_id"] == "e-late"
        record = emu.sessions[session_id]
    assert record.messages_before_connected == 2 and record.keep_alives == 0
    assert len(record.protocol_errors) == 2
    assert all("before session.state_updated 'connected'" in e for e in record.protocol_errors)
    assert list(record.audio_seconds_by_event) == ["e-late"]


async def test_invalid_messages_are_dropped_and_counted(
    emu: LiveAvatarEmulator, client: httpx.AsyncClient
) -> None:
    session_id, _, ws_url = await open_session(client)
    wav = b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(36)
    invalid: list[str | bytes] = [
        "not json",
        "[1]",
        json.dumps({"event_id": "e-1"}),
        speak("e-1", 0.1, sample_rate=16000),
        speak("e-1", raw=b"abc"),
        json.dumps({"type": "agent.speak", "event_id": "e-1", "audio": "***"}),
        speak("e-1", raw=b""),
        speak("e-1", raw=wav),
        speak("e-1", raw=b"ID3\x04" + bytes(100)),
        speak("e-1", raw=bytes(750_000)),  # 1,000,000 base64 characters plus the envelope
        json.dumps({"type": "agent.speak", "audio": base64.b64encode(pcm(0.1)).decode()}),
        msg("agent.speak_end"),
        msg("agent.dance"),
        b"\x00\x01",
    ]
    async with await connected(ws_url) as ws:
        for frame in invalid:
            await ws.send(frame)
        await ws.send(speak("e-ok", 0.1))
        assert (await next_event(ws))["event_id"] == "e-ok"
    record = emu.sessions[session_id]
    expected = [
        "JSON",
        "not a JSON object",
        "'type'",
        "sample_rate 16000",
        "odd byte count",
        "base64",
        "empty",
        "WAV header",
        "MP3",
        "limit is 1000000 bytes",
        "event_id",
        "event_id",
        "unknown message type",
        "binary frame",
    ]
    assert len(record.protocol_errors) == len(expected)
    for word, error in zip(expected, record.protocol_errors, strict=True):
        assert word in error
    assert record.messages_received == len(invalid) + 1
    assert list(record.audio_seconds_by_event) == ["e-ok"]


async def test_message_size_limit_is_configurable() -> None:
    async with (
        LiveAvatarEmulator(faces=[AVATAR], max_message_bytes=2000) as emu,
        httpx.AsyncClient(base_url=emu.url, trust_env=False) as http,
    ):
        session_id, _, ws_url = await open_session(http)
        too_big, fits = speak("e-1", raw=bytes(1600)), speak("e-2", raw=bytes(1200))
        async with await connected(ws_url) as ws:
            await ws.send(too_big)
            await ws.send(fits)
            assert (await next_event(ws))["event_id"] == "e-2"
    assert len(too_big) > 2000 > len(fits)
    assert emu.sessions[session_id].protocol_errors == [
        f"message is {len(too_big)} bytes; the limit is 2000 bytes per message"
    ]


async def test_durations_are_measured_at_24_khz(
    emu: LiveAvatarEmulator, client: httpx.AsyncClient
) -> None:
    session_id, _, ws_url = await open_session(client)
    async with await connected(ws_url) as ws:
        await ws.send(speak("e-1", raw=pcm(0.6, rate=16000)))  # an SDK that did not resample
        await ws.send(speak("e-1", raw=pcm(1.0, rate=16000)))
        await next_event(ws)
    [utterance] = emu.sessions[session_id].utterances
    assert utterance.chunk_seconds == pytest.approx([0.4, 2 / 3])


async def test_speak_end_is_needed_to_return_to_idle(
    emu: LiveAvatarEmulator, client: httpx.AsyncClient
) -> None:
    session_id, _, ws_url = await open_session(client)
    async with await connected(ws_url) as ws:
        await ws.send(speak("e-1", 0.2))
        assert (await next_event(ws))["type"] == "agent.speak_started"
        await expect_silence(ws, 0.5)  # the audio ran out, but without speak_end it never ends
        assert emu.sessions[session_id].speaking
        await ws.send(msg("agent.speak_end", event_id="e-1"))
        ended = await next_event(ws, within=0.2)
    assert ended["type"] == "agent.speak_ended"
    assert not emu.sessions[session_id].speaking


async def test_next_utterance_queues_behind_the_current_one(
    emu: LiveAvatarEmulator, client: httpx.AsyncClient
) -> None:
    session_id, _, ws_url = await open_session(client)
    async with await connected(ws_url) as ws:
        began = time.monotonic()
        for event_id in ("e-1", "e-2"):
            await ws.send(speak(event_id, 0.3))
            await ws.send(msg("agent.speak_end", event_id=event_id))
        events = [await next_event(ws, within=1.0) for _ in range(4)]
        elapsed = time.monotonic() - began
    assert [(e["type"], e["event_id"]) for e in events] == [
        ("agent.speak_started", "e-1"),
        ("agent.speak_ended", "e-1"),
        ("agent.speak_started", "e-2"),
        ("agent.speak_ended", "e-2"),
    ]
    assert 0.55 <= elapsed <= 0.9  # e-2 waited for e-1 instead of cutting it off
    outcomes = [(u.event_ids, u.outcome) for u in emu.sessions[session_id].utterances]
    assert outcomes == [(["e-1"], "finished"), (["e-2"], "finished")]


async def test_chunks_with_their_own_event_ids_form_one_utterance(
    emu: LiveAvatarEmulator, client: httpx.AsyncClient
) -> None:
    # The LiveKit plugin gives every chunk and the speak_end a fresh uuid.
    session_id, _, ws_url = await open_session(client)
    async with await connected(ws_url) as ws:
        await ws.send(speak("c-1", 0.2))
        await ws.send(speak("c-2", 0.1))
        await ws.send(msg("agent.speak_end", event_id="c-3"))
        started, ended = await next_event(ws), await next_event(ws)
        await expect_silence(ws, 0.2)
    assert (started["event_id"], ended["event_id"]) == ("c-1", "c-1")
    [utterance] = emu.sessions[session_id].utterances
    assert (utterance.event_ids, utterance.end_event_id) == (["c-1", "c-2"], "c-3")


async def test_audio_after_its_speak_end_is_a_protocol_error(
    emu: LiveAvatarEmulator, client: httpx.AsyncClient
) -> None:
    session_id, _, ws_url = await open_session(client)
    async with await connected(ws_url) as ws:
        await ws.send(speak("e-1", 0.3))
        await ws.send(msg("agent.speak_end", event_id="e-1"))
        await ws.send(speak("e-1", 0.3))
        await next_event(ws)
        ended = await next_event(ws)
    assert ended["type"] == "agent.speak_ended"
    record = emu.sessions[session_id]
    assert record.protocol_errors == ["agent.speak for event_id 'e-1' after its speak_end"]
    assert record.utterances[0].chunk_seconds == pytest.approx([0.3])


async def test_interrupt_while_speaking_stops_and_acknowledges(
    emu: LiveAvatarEmulator, client: httpx.AsyncClient
) -> None:
    session_id, _, ws_url = await open_session(client)
    async with await connected(ws_url) as ws:
        await ws.send(speak("e-1", 1.0))
        started = await next_event(ws)
        await ws.send(speak("e-2", 0.5))  # more of the same open utterance: cleared too
        await asyncio.sleep(0.3)
        await ws.send(msg("agent.interrupt", event_id="i-1"))
        interrupted, ended = await next_event(ws), await next_event(ws)
        await ws.send(speak("e-1", 0.2))  # a late chunk: not played
        await ws.send(msg("agent.speak_end", event_id="e-1"))
        await expect_silence(ws, 0.4)
    assert [interrupted["type"], ended["type"]] == ["agent.speak_interrupted", "agent.speak_ended"]
    assert interrupted["event_id"] == ended["event_id"] == started["event_id"] == "e-1"
    assert interrupted["task"] == started["task"]
    record = emu.sessions[session_id]
    [utterance] = record.utterances
    assert (utterance.outcome, utterance.event_ids) == ("interrupted", ["e-1", "e-2"])
    assert 0.25 <= utterance.played_seconds < 0.6
    assert (record.interrupts, record.useless_interrupts) == (1, 0)
    assert (record.ignored_chunks, record.stray_speak_ends) == (1, 1)
    assert not record.speak_chunks[-1].played


async def test_interrupt_while_idle_is_recorded_as_useless(
    emu: LiveAvatarEmulator, client: httpx.AsyncClient
) -> None:
    session_id, _, ws_url = await open_session(client)
    async with await connected(ws_url) as ws:
        await ws.send(msg("agent.interrupt"))
        await expect_silence(ws, 0.2)
    record = emu.sessions[session_id]
    assert (record.interrupts, record.useless_interrupts) == (1, 1)


async def test_interrupt_events_are_configurable() -> None:
    async with (
        LiveAvatarEmulator(faces=[AVATAR], interrupt_events=["agent.speak_ended"]) as emu,
        httpx.AsyncClient(base_url=emu.url, trust_env=False) as http,
    ):
        _, _, ws_url = await open_session(http)
        async with await connected(ws_url) as ws:
            await ws.send(speak("e-1", 1.0))
            await next_event(ws)
            await ws.send(msg("agent.interrupt"))
            assert (await next_event(ws))["type"] == "agent.speak_ended"
            await expect_silence(ws, 0.2)


async def test_listening_messages_are_recorded(
    emu: LiveAvatarEmulator, client: httpx.AsyncClient
) -> None:
    session_id, _, ws_url = await open_session(client)
    async with await connected(ws_url) as ws:
        await ws.send(msg("agent.start_listening", event_id="l-1"))
        await ws.send(msg("agent.stop_listening", event_id="l-2"))
        await ws.send(msg("agent.interrupt"))  # a marker: processed after the two above
        await asyncio.sleep(0.1)
    record = emu.sessions[session_id]
    assert record.listening_events == ["agent.start_listening", "agent.stop_listening"]
    assert record.protocol_errors == []


async def test_websocket_needs_its_token_and_an_active_session(
    emu: LiveAvatarEmulator, client: httpx.AsyncClient
) -> None:
    minted = await mint(client)
    _, token, ws_url = await open_session(client)
    for url, status in (
        (ws_url.split("?")[0], 401),
        (ws_url.replace("token=", "token=x"), 401),
        (f"{ws_url.split('/v1/')[0]}/v1/lite/{minted['session_id']}?token=x", 404),
    ):
        with pytest.raises(InvalidStatus) as refused:
            await dial(url)
        assert refused.value.response.status_code == status
    await stop(client, token)
    with pytest.raises(InvalidStatus) as after_stop:
        await dial(ws_url)
    assert after_stop.value.response.status_code == 404


# -- idle timeout, keep-alive, leaks --------------------------------------------------------------


async def test_keep_alive_resets_the_idle_timer() -> None:
    async with (
        LiveAvatarEmulator(
            faces=[AVATAR], idle_timeout=0.4, idle_reset_by_any_message=False
        ) as emu,
        httpx.AsyncClient(base_url=emu.url, trust_env=False) as http,
    ):
        session_id, token, ws_url = await open_session(http)
        async with await connected(ws_url) as ws:
            for _ in range(4):
                await asyncio.sleep(0.2)
                await ws.send(msg("session.keep_alive", event_id="k"))
            rest = await http.post("/v1/sessions/keep-alive", headers=bearer(token))
            await asyncio.sleep(0.25)
            assert emu.sessions[session_id].status == "active"  # 1.05 s after start
            began = time.monotonic()
            for _ in range(3):  # other messages do not count with this option
                await ws.send(msg("agent.start_listening", event_id="l"))
                await asyncio.sleep(0.05)
            closed = await next_event(ws, within=1.0)
        record = emu.sessions[session_id]
    assert rest.status_code == 200 and record.rest_keep_alives == 1
    assert record.keep_alives == 4
    assert closed == {"type": "session.state_updated", "state": "closed", "reason": "idle_timeout"}
    assert time.monotonic() - began < 0.35  # measured from the REST keep-alive, not the messages


async def test_any_message_resets_the_idle_timer_by_default() -> None:
    async with (
        LiveAvatarEmulator(faces=[AVATAR], idle_timeout=0.4) as emu,
        httpx.AsyncClient(base_url=emu.url, trust_env=False) as http,
    ):
        session_id, _, ws_url = await open_session(http)
        async with await connected(ws_url) as ws:
            for _ in range(5):
                await asyncio.sleep(0.2)
                await ws.send(msg("agent.start_listening", event_id="l"))
            assert emu.sessions[session_id].status == "active"
            await wait_until_ended(emu, session_id, within=1.0)


async def test_idle_timeout_ends_the_session_and_stops_billing() -> None:
    async with (
        LiveAvatarEmulator(faces=[AVATAR], idle_timeout=0.3, end_close_code=4000) as emu,
        httpx.AsyncClient(base_url=emu.url, trust_env=False) as http,
    ):
        session_id, token, ws_url = await open_session(http)
        async with await connected(ws_url) as ws:
            closed = await next_event(ws, within=1.0)
            with pytest.raises(ConnectionClosed):
                await ws.recv()
        assert ws.close_code == 4000 and ws.close_reason == "idle_timeout"
        assert closed["reason"] == "idle_timeout"
        record = emu.sessions[session_id]
        assert (record.status, record.end_reason) == ("ended", "idle_timeout")
        assert emu.ledger.entries[session_id].end_reason == "idle_timeout"
        assert emu.open_sessions == 0 and 0.3 <= record.billed_seconds < 0.6
        stopped_late = await stop(http, token)
    assert stopped_late.status_code == 200  # stopping an ended session still succeeds


async def test_closing_the_websocket_alone_keeps_billing(
    emu: LiveAvatarEmulator, client: httpx.AsyncClient
) -> None:
    session_id, token, ws_url = await open_session(client)
    async with await connected(ws_url):
        pass
    await asyncio.sleep(0.2)
    record = emu.sessions[session_id]
    assert record.status == "active" and emu.open_sessions == 1
    billed = record.billed_seconds
    await asyncio.sleep(0.1)
    assert record.billed_seconds > billed >= 0.2
    async with await connected(ws_url):  # the session is still there to reconnect to
        assert record.ws_connections == 2
    assert (await stop(client, token)).status_code == 200
    assert emu.open_sessions == 0


async def test_max_session_duration_ends_the_session(
    emu: LiveAvatarEmulator, client: httpx.AsyncClient
) -> None:
    minted = await mint(client, max_session_duration=1)
    started = await start(client, minted["session_token"])
    assert started["max_session_duration"] == 1
    async with await connected(started["ws_url"]) as ws:
        await ws.send(msg("session.keep_alive", event_id="k"))
        closed = await next_event(ws, within=2.0)
    assert closed["reason"] == "max_session_duration"
    assert 0.95 <= emu.sessions[minted["session_id"]].billed_seconds <= 1.3


async def test_sandbox_is_free_and_short() -> None:
    async with (
        LiveAvatarEmulator(sandbox_max_session_duration=1) as emu,
        httpx.AsyncClient(base_url=emu.url, trust_env=False) as http,
    ):
        minted = await mint(http, avatar_id=SANDBOX_AVATAR_ID, is_sandbox=True)
        started = await start(http, minted["session_token"])
        assert started["max_session_duration"] == 1
        assert (emu.open_sessions, emu.billed_seconds) == (0, 0.0)
        await wait_until_ended(emu, minted["session_id"], within=2.0)
        refused = await http.post(
            "/v1/sessions/token",
            json={"mode": "LITE", "avatar_id": SANDBOX_AVATAR_ID},
            headers={"X-API-KEY": API_KEY},
        )
    assert emu.sessions[minted["session_id"]].end_reason == "max_session_duration"
    assert refused.status_code == 404  # the stock avatar is known to the sandbox only


# -- stop routes ----------------------------------------------------------------------------------


async def test_delete_stops_too(emu: LiveAvatarEmulator, client: httpx.AsyncClient) -> None:
    session_id, token, _ = await open_session(client)
    response = await client.delete("/v1/sessions", headers=bearer(token))
    assert response.status_code == 200 and response.json()["code"] == 1000
    assert emu.sessions[session_id].end_reason == "stopped" and emu.open_sessions == 0


async def test_stop_needs_the_session_token(
    emu: LiveAvatarEmulator, client: httpx.AsyncClient
) -> None:
    session_id, _, _ = await open_session(client)
    with_key = await client.post(
        "/v1/sessions/stop", json={"session_id": session_id}, headers={"X-API-KEY": API_KEY}
    )
    assert with_key.status_code == 401 and emu.open_sessions == 1


@pytest.mark.parametrize("status", [404, 405])
async def test_missing_post_stop_exercises_the_delete_fallback(status: int) -> None:
    async with (
        LiveAvatarEmulator(faces=[AVATAR], post_stop_status=status) as emu,
        httpx.AsyncClient(base_url=emu.url, trust_env=False) as http,
    ):
        session_id, token, _ = await open_session(http)
        emu.faults.fail_next_ends(1)  # a route the vendor lacks never reaches the fault
        missing = await stop(http, token, session_id=session_id)
        assert missing.status_code == status and "detail" in missing.json()
        assert emu.sessions[session_id].status == "active" and emu.open_sessions == 1
        failed = await http.delete("/v1/sessions", headers=bearer(token))
        deleted = await http.delete("/v1/sessions", headers=bearer(token))
    assert (failed.status_code, deleted.status_code) == (500, 200)
    assert emu.open_sessions == 0


async def test_missing_delete_route_answers_fastapi_404() -> None:
    async with (
        LiveAvatarEmulator(faces=[AVATAR], delete_stop_status=404) as emu,
        httpx.AsyncClient(base_url=emu.url, trust_env=False) as http,
    ):
        _, token, _ = await open_session(http)
        missing = await http.delete("/v1/sessions", headers=bearer(token))
        assert (missing.status_code, missing.json()) == (404, {"detail": "Not Found"})
        assert (await stop(http, token)).status_code == 200
        assert emu.open_sessions == 0


async def test_vendor_side_end_closes_the_channel(
    emu: LiveAvatarEmulator, client: httpx.AsyncClient
) -> None:
    session_id, _, ws_url = await open_session(client)
    async with await connected(ws_url) as ws:
        await ws.send(speak("e-1", 1.0))
        await next_event(ws)
        emu.end_session(session_id, reason="credits_exhausted")
        closed = await next_event(ws)
        with pytest.raises(ConnectionClosed):
            await ws.recv()
    assert closed["reason"] == "credits_exhausted"  # no speak_ended: the session is gone
    record = emu.sessions[session_id]
    assert (record.end_reason, record.utterances[0].outcome) == ("credits_exhausted", "abandoned")
    assert emu.open_sessions == 0


# -- faults ---------------------------------------------------------------------------------------


async def test_fail_creates_applies_to_token_and_start_after_auth(
    emu: LiveAvatarEmulator, client: httpx.AsyncClient
) -> None:
    emu.faults.fail_next_creates(1, status=503)
    headers = {"X-API-KEY": API_KEY}
    body = {"mode": "LITE", "avatar_id": AVATAR}
    wrong_key = await client.post("/v1/sessions/token", json=body, headers={"X-API-KEY": "x"})
    failed_token = await client.post("/v1/sessions/token", json=body, headers=headers)
    minted = await mint(client)
    emu.faults.fail_next_creates(1, status=503)
    wrong_bearer = await client.post("/v1/sessions/start", headers=bearer("not-a-token"))
    assert wrong_bearer.status_code == 401  # checked before the fault, which stays queued
    failed_start = await client.post("/v1/sessions/start", headers=bearer(minted["session_token"]))
    started = await client.post("/v1/sessions/start", headers=bearer(minted["session_token"]))
    statuses = [r.status_code for r in (wrong_key, failed_token, failed_start, started)]
    assert statuses == [401, 503, 503, 201]
    assert failed_start.json() == {"code": 503, "message": "injected failure", "data": None}
    assert emu.open_sessions == 1


async def test_rate_limit_sends_retry_after(
    emu: LiveAvatarEmulator, client: httpx.AsyncClient
) -> None:
    minted = await mint(client)
    emu.faults.rate_limit_next(1, retry_after=2)
    emu.faults.rate_limit_next(1, retry_after=None, route="create")
    limited = await client.post(
        "/v1/sessions/token",
        json={"mode": "LITE", "avatar_id": AVATAR},
        headers={"X-API-KEY": API_KEY},
    )
    no_header = await client.post("/v1/sessions/start", headers=bearer(minted["session_token"]))
    assert (limited.status_code, limited.headers["Retry-After"]) == (429, "2")
    assert no_header.status_code == 429 and "Retry-After" not in no_header.headers
    await start(client, minted["session_token"])


async def test_slow_fault_delays_the_start(
    emu: LiveAvatarEmulator, client: httpx.AsyncClient
) -> None:
    minted = await mint(client)
    emu.faults.slow_next(1, 0.3)
    began = time.monotonic()
    await start(client, minted["session_token"])
    assert time.monotonic() - began >= 0.3


async def test_fail_ends_keeps_the_session_billing_until_a_retry(
    emu: LiveAvatarEmulator, client: httpx.AsyncClient
) -> None:
    session_id, token, _ = await open_session(client)
    emu.faults.fail_next_ends(1, status=502)
    emu.faults.rate_limit_next(1, route="end")
    failed, limited = await stop(client, token), await stop(client, token)
    assert (failed.status_code, limited.status_code) == (502, 429)
    assert emu.sessions[session_id].status == "active" and emu.open_sessions == 1
    assert (await stop(client, token)).status_code == 200
    assert emu.open_sessions == 0


async def test_dropped_channel_closes_1011_and_keeps_billing(
    emu: LiveAvatarEmulator, client: httpx.AsyncClient
) -> None:
    emu.faults.drop_channel_after(0.5)
    session_id, _, ws_url = await open_session(client)
    async with await connected(ws_url) as ws:
        await ws.send(speak("e-1", 0.3))
        assert (await next_event(ws))["type"] == "agent.speak_started"
        await ws.send(speak("e-1", 0.3))
        with pytest.raises(ConnectionClosed):
            await next_event(ws)
    assert ws.close_code == 1011
    await asyncio.sleep(0.1)
    record = emu.sessions[session_id]
    assert record.status == "active" and record.channel_dropped
    assert all(e.get("state") != "closed" for e in record.events_sent)
    assert emu.open_sessions == 1


async def test_muted_interrupts_stop_playback_without_acknowledgement(
    emu: LiveAvatarEmulator, client: httpx.AsyncClient
) -> None:
    emu.faults.mute_interrupts = True
    session_id, _, ws_url = await open_session(client)
    async with await connected(ws_url) as ws:
        await ws.send(speak("e-1", 0.3))
        await ws.send(msg("agent.speak_end", event_id="e-1"))
        await next_event(ws)
        await ws.send(msg("agent.interrupt"))
        await expect_silence(ws, 0.6)  # neither an acknowledgement nor the natural end at 0.3 s
    record = emu.sessions[session_id]
    assert record.interrupts == 1 and record.utterances[0].outcome == "interrupted"
    assert record.events_sent[-1]["type"] == "agent.speak_started"


# -- control API, reset, lifecycle, CLI -----------------------------------------------------------


async def test_control_http_api(emu: LiveAvatarEmulator, client: httpx.AsyncClient) -> None:
    faults = {"fail_creates": {"count": 1, "status": 502}, "mute_interrupts": True}
    assert (await client.post("/_emulator/faults", json=faults)).status_code == 200
    refused = await client.post(
        "/v1/sessions/token",
        json={"mode": "LITE", "avatar_id": "a-new"},
        headers={"X-API-KEY": API_KEY},
    )
    assert refused.status_code == 502
    await client.post("/_emulator/faces", json={"face_ids": ["a-new"]})
    session_id, token, ws_url = await open_session(client, avatar_id="a-new")
    async with await connected(ws_url) as ws:
        await ws.send(speak("e-1", 0.1))
        await next_event(ws)
    state = (await client.get("/_emulator/state")).json()
    text = (await client.get("/_emulator/state")).text
    assert state["emulator"] == "liveavatar" and state["open_sessions"] == 1
    assert state["faults"]["mute_interrupts"] is True and "a-new" in state["faces"]
    [session] = state["sessions"]
    assert (session["session_id"], session["avatar_id"], session["status"]) == (
        session_id,
        "a-new",
        "active",
    )
    assert session["tokens_distinct"] is True and session["speak_messages"] == 1
    assert session["utterances"][0]["chunk_seconds"] == [pytest.approx(0.1)]
    assert [r["status"] for r in state["requests"]] == [502, 200, 201, 101]
    assert token not in text and emu.sessions[session_id].ws_token not in text
    assert (await client.post("/_emulator/reset")).status_code == 200
    state = (await client.get("/_emulator/state")).json()
    assert state["sessions"] == [] and state["open_sessions"] == 0
    assert state["requests"] == [] and state["faults"]["mute_interrupts"] is False


async def test_reset_ends_sessions_and_closes_channels(
    emu: LiveAvatarEmulator, client: httpx.AsyncClient
) -> None:
    _, token, ws_url = await open_session(client)
    async with await connected(ws_url) as ws:
        await emu.reset()
        closed = await next_event(ws)
        with pytest.raises(ConnectionClosed):
            await ws.recv()
    assert closed["reason"] == "emulator_reset"
    assert emu.open_sessions == 0 and not emu.sessions
    assert (await stop(client, token)).status_code == 401  # the token is forgotten


async def test_aclose_is_idempotent_and_leaves_no_tasks() -> None:
    before = asyncio.all_tasks()
    emu = LiveAvatarEmulator(faces=[AVATAR])
    async with emu, httpx.AsyncClient(base_url=emu.url, trust_env=False) as http:
        _, _, ws_url = await open_session(http)
        ws = await connected(ws_url)
        await ws.send(speak("e-1", 1.0))
        await next_event(ws)
    await emu.aclose()
    with pytest.raises(ConnectionClosed):
        await ws.recv()
    assert ws.close_code == 1001
    await ws.close()
    assert asyncio.all_tasks() - before == set()


async def test_run_emulators_knows_liveavatar() -> None:
    assert "liveavatar" in EMULATORS
    with pytest.raises(ValueError, match="valid names: tavus, liveavatar, simli, did"):
        run_emulators(["heygen"], api_key="k")


def test_run_emulators_serves_liveavatar_until_sigterm() -> None:
    src = Path(avatarkit.emulators.__file__).parents[2]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")])),
    }
    code = (
        "from avatarkit.emulators import run_emulators; run_emulators(['liveavatar'], api_key='k1')"
    )
    with subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env
    ) as process:
        assert process.stdout is not None
        line = process.stdout.readline()
        name, url, *_ = line.split()
        assert (name, line.strip().endswith("(api key: k1)")) == ("liveavatar", True)
        response = httpx.post(
            f"{url}/v1/sessions/token",
            json={"mode": "LITE", "avatar_id": "any-avatar"},
            headers={"X-API-KEY": "k1"},
            trust_env=False,
        )
        assert response.status_code == 200 and "session_token" in response.json()["data"]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=5) == 0
