"""Tests of the Tavus emulator over real sockets (httpx for REST, websockets for the room)."""

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
from avatarkit.emulators import TavusEmulator, run_emulators

API_KEY = "test-key"
FACE = "f-anna"
PAL = "p-echo"
SAMPLE_RATE = 24000


@pytest.fixture
async def emu() -> AsyncIterator[TavusEmulator]:
    async with TavusEmulator(faces=[FACE], pals={PAL: FACE}, max_concurrent=2) as emulator:
        yield emulator


@pytest.fixture
async def client(emu: TavusEmulator) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=emu.url, headers={"x-api-key": API_KEY}, timeout=5.0, trust_env=False
    ) as http:
        yield http


async def create(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    response = await client.post("/v2/conversations", json={"pal_id": PAL, **body})
    assert response.status_code == 200, response.text
    created: dict[str, Any] = response.json()
    return created


def room_url(created: dict[str, Any]) -> str:
    return str(created["conversation_url"]).replace("http://", "ws://") + "/app-messages"


def join(created: dict[str, Any], query: str = "") -> connect:
    return connect(room_url(created) + query, proxy=None, open_timeout=2, close_timeout=2)


async def next_event(ws: ClientConnection, within: float = 1.0) -> dict[str, Any]:
    event: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), within))
    return event


async def joined(created: dict[str, Any]) -> ClientConnection:
    ws = await join(created)
    assert (await next_event(ws))["event_type"] == "system.replica_joined"
    return ws


async def expect_silence(ws: ClientConnection, seconds: float) -> None:
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(ws.recv(), seconds)


def audio(
    conversation_id: str,
    inference_id: str,
    seconds: float,
    *,
    done: bool | str = False,
    sample_rate: int = SAMPLE_RATE,
) -> str:
    pcm = bytes(2 * round(seconds * sample_rate))
    return echo(
        conversation_id,
        modality="audio",
        audio=base64.b64encode(pcm).decode(),
        inference_id=inference_id,
        done=done,
        sample_rate=sample_rate,
    )


def echo(conversation_id: str, **properties: Any) -> str:
    return message(conversation_id, "conversation.echo", **properties)


def message(conversation_id: str, event_type: str, **properties: Any) -> str:
    return json.dumps(
        {
            "message_type": "conversation",
            "event_type": event_type,
            "conversation_id": conversation_id,
            "properties": properties,
        }
    )


async def wait_until_ended(emu: TavusEmulator, conversation_id: str, within: float) -> None:
    deadline = time.monotonic() + within
    while emu.conversations[conversation_id].status != "ended":
        assert time.monotonic() < deadline, "conversation did not end in time"
        await asyncio.sleep(0.02)


# -- REST: auth, create, validation ------------------------------------------------------------


@pytest.mark.parametrize("headers", [{}, {"x-api-key": "wrong-key"}])
async def test_missing_or_wrong_key_is_401_and_opens_nothing(
    emu: TavusEmulator, headers: dict[str, str]
) -> None:
    async with httpx.AsyncClient(base_url=emu.url, headers=headers, trust_env=False) as http:
        response = await http.post("/v2/conversations", json={"pal_id": PAL})
        state = (await http.get("/_emulator/state")).text
    assert response.status_code == 401
    assert response.json() == {"error": "Unauthorized", "message": "Invalid or missing API key"}
    assert emu.open_sessions == 0 and not emu.conversations
    assert emu.requests[-1].status == 401
    assert emu.requests[-1].api_key_present is bool(headers)
    assert "wrong-key" not in state


async def test_create_with_pal_and_face_vocabulary(
    emu: TavusEmulator, client: httpx.AsyncClient
) -> None:
    created = await create(
        client, face_id=FACE, conversation_name="demo", properties={"language": "en", "x": 1}
    )
    conversation_id = created["conversation_id"]
    assert conversation_id.startswith("c") and len(conversation_id) == 13
    assert created["conversation_url"] == f"{emu.url}/rooms/{conversation_id}"
    assert created["status"] == "active"
    assert created["conversation_name"] == "demo"
    assert "meeting_token" not in created
    record = emu.conversations[conversation_id]
    assert (record.pal_id, record.face_id) == (PAL, FACE)
    assert record.properties["language"] == "en" and "x" not in record.properties
    assert emu.open_sessions == 1


async def test_create_with_persona_vocabulary_falls_back_to_default_face(
    emu: TavusEmulator, client: httpx.AsyncClient
) -> None:
    response = await client.post("/v2/conversations", json={"persona_id": PAL})
    record = emu.conversations[response.json()["conversation_id"]]
    assert record.face_id == FACE
    emu.add_face("f-bob")
    response = await client.post(
        "/v2/conversations", json={"persona_id": PAL, "replica_id": "f-bob", "pal_id": PAL}
    )
    assert emu.conversations[response.json()["conversation_id"]].face_id == "f-bob"


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"pal_id": PAL, "properties": {"max_call_duration": 0}}, "properties.max_call_duration"),
        ({"pal_id": PAL, "properties": {"max_call_duration": 3601}}, "between 1 and 3600"),
        ({"pal_id": PAL, "properties": {"max_call_duration": True}}, "max_call_duration"),
        (
            {"pal_id": PAL, "properties": {"participant_left_timeout": -1}},
            "properties.participant_left_timeout",
        ),
        ({"pal_id": PAL, "properties": {"enable_recording": "yes"}}, "enable_recording"),
        ({"pal_id": PAL, "properties": [1]}, "properties must be an object"),
        ({"pal_id": PAL, "audio_only": "yes"}, "audio_only"),
        ({"face_id": FACE}, "pal_id (or persona_id) is required"),
        ({"pal_id": PAL, "persona_id": "p-other"}, "pal_id and persona_id"),
        ({"pal_id": PAL, "face_id": FACE, "replica_id": "f-x"}, "face_id and replica_id"),
        ([PAL], "JSON object"),
    ],
)
async def test_invalid_create_is_400_naming_the_field(
    emu: TavusEmulator, client: httpx.AsyncClient, body: Any, named: str
) -> None:
    response = await client.post("/v2/conversations", json=body)
    assert response.status_code == 400
    assert named in response.json()["message"]
    assert emu.open_sessions == 0


async def test_unknown_pal_or_face_is_404(emu: TavusEmulator, client: httpx.AsyncClient) -> None:
    unknown_pal = await client.post("/v2/conversations", json={"pal_id": "p-none"})
    unknown_face = await client.post("/v2/conversations", json={"pal_id": PAL, "face_id": "f-none"})
    assert unknown_pal.status_code == 404 and "p-none" in unknown_pal.json()["message"]
    assert unknown_face.status_code == 404 and "f-none" in unknown_face.json()["message"]
    assert emu.open_sessions == 0


async def test_test_mode_is_ended_without_slot_or_billing(
    emu: TavusEmulator, client: httpx.AsyncClient
) -> None:
    created = await create(client, test_mode=True)
    assert created["status"] == "ended"
    assert emu.open_sessions == 0 and emu.billed_seconds == 0.0
    with pytest.raises(InvalidStatus) as refused:
        await join(created)
    assert refused.value.response.status_code == 404


async def test_idempotency_key_replays_the_first_create(
    emu: TavusEmulator, client: httpx.AsyncClient
) -> None:
    headers = {"Idempotency-Key": "start-1"}
    first = await client.post("/v2/conversations", json={"pal_id": PAL}, headers=headers)
    again = await client.post("/v2/conversations", json={"pal_id": PAL}, headers=headers)
    other = await client.post("/v2/conversations", json={"pal_id": PAL}, headers={})
    assert again.status_code == 200 and again.json() == first.json()
    assert other.json()["conversation_id"] != first.json()["conversation_id"]
    assert emu.open_sessions == 2 and len(emu.conversations) == 2
    assert [r.headers.get("idempotency-key") for r in emu.requests] == ["start-1", "start-1", None]


async def test_error_shape_is_configurable() -> None:
    async with (
        TavusEmulator(error_shape="text") as emu,
        httpx.AsyncClient(base_url=emu.url, trust_env=False) as http,
    ):
        response = await http.get("/v2/conversations")
    assert response.status_code == 401
    assert response.headers["content-type"].startswith("text/plain")
    assert response.text == "Invalid or missing API key"


async def test_concurrency_limit_answers_the_configured_status() -> None:
    async with (
        TavusEmulator(pals={PAL: FACE}, max_concurrent=1, concurrency_limit_status=429) as emu,
        httpx.AsyncClient(
            base_url=emu.url, headers={"x-api-key": API_KEY}, trust_env=False
        ) as http,
    ):
        first = await http.post("/v2/conversations", json={"pal_id": PAL})
        refused = await http.post("/v2/conversations", json={"pal_id": PAL})
        await http.post(f"/v2/conversations/{first.json()['conversation_id']}/end")
        after_end = await http.post("/v2/conversations", json={"pal_id": PAL})
    assert refused.status_code == 429
    assert refused.json()["message"] == "maximum concurrent conversations reached"
    assert after_end.status_code == 200


async def test_end_is_idempotent_and_freezes_the_meter(
    emu: TavusEmulator, client: httpx.AsyncClient
) -> None:
    conversation_id = (await create(client))["conversation_id"]
    await asyncio.sleep(0.1)
    first = await client.post(f"/v2/conversations/{conversation_id}/end")
    second = await client.post(f"/v2/conversations/{conversation_id}/end")
    unknown = await client.post("/v2/conversations/c000000000000/end")
    assert (first.status_code, first.json(), second.status_code) == (200, {}, 200)
    assert unknown.status_code == 404
    record = emu.conversations[conversation_id]
    assert (record.status, record.end_reason) == ("ended", "ended")
    billed = emu.billed_seconds
    assert billed >= 0.1
    await asyncio.sleep(0.1)
    assert emu.billed_seconds == billed == record.billed_seconds
    assert emu.open_sessions == 0


async def test_get_list_and_delete(emu: TavusEmulator, client: httpx.AsyncClient) -> None:
    kept = (await create(client))["conversation_id"]
    deleted = (await create(client))["conversation_id"]
    fetched = (await client.get(f"/v2/conversations/{kept}")).json()
    assert (fetched["status"], fetched["end_reason"], fetched["face_id"]) == ("active", None, FACE)
    assert (await client.delete(f"/v2/conversations/{deleted}")).status_code == 204
    assert emu.conversations[deleted].end_reason == "deleted"
    assert (await client.get(f"/v2/conversations/{deleted}")).status_code == 404
    listing = (await client.get("/v2/conversations")).json()
    assert listing["total_count"] == 1 and listing["data"][0]["conversation_id"] == kept
    ended = (await client.get("/v2/conversations", params={"status": "ended"})).json()
    assert ended == {"data": [], "total_count": 0}
    assert emu.open_sessions == 1


async def test_pals_and_personas_share_one_store(
    emu: TavusEmulator, client: httpx.AsyncClient
) -> None:
    missing_face = await client.post("/v2/pals", json={"pal_name": "x"})
    unknown_face = await client.post("/v2/pals", json={"pal_name": "x", "default_face_id": "f-0"})
    bad_mode = await client.post(
        "/v2/pals", json={"pal_name": "x", "default_face_id": FACE, "pipeline_mode": "fast"}
    )
    assert missing_face.status_code == 400 and "default_face_id" in missing_face.json()["message"]
    assert unknown_face.status_code == 404
    assert bad_mode.status_code == 400 and "pipeline_mode" in bad_mode.json()["message"]
    pal = (
        await client.post(
            "/v2/pals", json={"pal_name": "bot", "default_face_id": FACE, "pipeline_mode": "echo"}
        )
    ).json()
    assert pal["pal_id"].startswith("p") and pal["pipeline_mode"] == "echo"
    persona = (await client.get(f"/v2/personas/{pal['pal_id']}")).json()
    assert persona["persona_name"] == "bot" and persona["default_replica_id"] == FACE
    legacy = (await client.post("/v2/personas", json={"persona_name": "old"})).json()
    assert (await client.get(f"/v2/pals/{legacy['persona_id']}")).json()["pal_name"] == "old"
    assert (await client.get("/v2/pals/p-none")).status_code == 404
    created = await client.post("/v2/conversations", json={"persona_id": pal["pal_id"]})
    assert emu.conversations[created.json()["conversation_id"]].face_id == FACE


# -- timeouts -----------------------------------------------------------------------------------


async def test_max_call_duration_ends_and_sends_shutdown(
    emu: TavusEmulator, client: httpx.AsyncClient
) -> None:
    created = await create(client, properties={"max_call_duration": 1})
    async with await joined(created) as ws:
        shutdown = await next_event(ws, within=2.0)
        with pytest.raises(ConnectionClosed):
            await ws.recv()
    assert shutdown["event_type"] == "system.shutdown"
    assert shutdown["properties"] == {"reason": "max_call_duration"}
    assert ws.close_code == 1000
    record = emu.conversations[created["conversation_id"]]
    assert record.end_reason == "max_call_duration"
    assert 0.95 <= record.billed_seconds <= 1.3


async def test_participant_absent_timeout_ends_an_unjoined_conversation(
    emu: TavusEmulator, client: httpx.AsyncClient
) -> None:
    created = await create(client, properties={"participant_absent_timeout": 0})
    await wait_until_ended(emu, created["conversation_id"], within=1.0)
    record = emu.conversations[created["conversation_id"]]
    assert record.end_reason == "participant_absent_timeout"
    assert record.events_sent[-1]["properties"] == {"reason": "participant_absent_timeout"}
    assert emu.open_sessions == 0


async def test_joining_cancels_absent_timer_and_leaving_starts_left_timer(
    emu: TavusEmulator, client: httpx.AsyncClient
) -> None:
    created = await create(
        client, properties={"participant_absent_timeout": 1, "participant_left_timeout": 1}
    )
    conversation_id = created["conversation_id"]
    async with await joined(created):
        await asyncio.sleep(1.2)
        assert emu.conversations[conversation_id].status == "active"
    await asyncio.sleep(0.5)
    assert emu.conversations[conversation_id].status == "active"
    await wait_until_ended(emu, conversation_id, within=1.0)
    assert emu.conversations[conversation_id].end_reason == "participant_left_timeout"


# -- the room -----------------------------------------------------------------------------------


async def test_vendor_side_end_notifies_the_room(
    emu: TavusEmulator, client: httpx.AsyncClient
) -> None:
    created = await create(client)
    async with await joined(created) as ws:
        emu.end_conversation(created["conversation_id"], reason="replica_crashed")
        shutdown = await next_event(ws)
        with pytest.raises(ConnectionClosed):
            await ws.recv()
    assert shutdown["event_type"] == "system.shutdown"
    assert shutdown["properties"] == {"reason": "replica_crashed"}
    fetched = (await client.get(f"/v2/conversations/{created['conversation_id']}")).json()
    assert (fetched["status"], fetched["end_reason"]) == ("ended", "replica_crashed")


async def test_room_join_is_404_for_unknown_or_ended_conversations(
    emu: TavusEmulator, client: httpx.AsyncClient
) -> None:
    created = await create(client)
    await client.post(f"/v2/conversations/{created['conversation_id']}/end")
    unknown = {"conversation_url": f"{emu.url}/rooms/c000000000000"}
    for target in (created, unknown):
        with pytest.raises(InvalidStatus) as refused:
            await join(target)
        assert refused.value.response.status_code == 404


async def test_private_room_requires_the_meeting_token(client: httpx.AsyncClient) -> None:
    created = await create(client, require_auth=True)
    with pytest.raises(InvalidStatus) as refused:
        await join(created)
    assert refused.value.response.status_code == 401
    async with join(created, f"?t={created['meeting_token']}") as ws:
        assert (await next_event(ws))["event_type"] == "system.replica_joined"


async def test_echo_audio_is_played_in_real_time(
    emu: TavusEmulator, client: httpx.AsyncClient
) -> None:
    created = await create(client)
    conversation_id = created["conversation_id"]
    async with await joined(created) as ws:
        await ws.send(audio(conversation_id, "i-1", 0.1))
        started = await next_event(ws)
        began = time.monotonic()
        await ws.send(audio(conversation_id, "i-1", 0.1))
        await ws.send(audio(conversation_id, "i-1", 0.1, done="true"))
        stopped = await next_event(ws)
        elapsed = time.monotonic() - began
    assert started["event_type"] == "conversation.replica.started_speaking"
    assert started["inference_id"] == "i-1" and started["conversation_id"] == conversation_id
    assert stopped["event_type"] == "conversation.replica.stopped_speaking"
    assert stopped["properties"]["duration"] == pytest.approx(0.3, abs=0.01)
    assert 0.25 <= elapsed <= 0.6
    record = emu.conversations[conversation_id]
    assert record.audio_seconds_by_inference == {"i-1": pytest.approx(0.3)}
    assert (record.echo_messages, record.done_inferences) == (3, ["i-1"])


async def test_underrun_keeps_speaking_and_pauses_the_clock(client: httpx.AsyncClient) -> None:
    created = await create(client)
    conversation_id = created["conversation_id"]
    async with await joined(created) as ws:
        await ws.send(audio(conversation_id, "i-1", 0.2))
        assert (await next_event(ws))["event_type"] == "conversation.replica.started_speaking"
        await expect_silence(ws, 0.4)  # ran dry after 0.2 s: still speaking, no stop
        await ws.send(audio(conversation_id, "i-1", 0.2, done=True))
        resumed = time.monotonic()
        stopped = await next_event(ws)
    assert time.monotonic() - resumed >= 0.15  # plays the new 0.2 s, not "catching up"
    assert stopped["properties"]["duration"] == pytest.approx(0.4, abs=0.01)


async def test_new_inference_interrupts_the_current_one(client: httpx.AsyncClient) -> None:
    created = await create(client)
    conversation_id = created["conversation_id"]
    async with await joined(created) as ws:
        await ws.send(audio(conversation_id, "i-1", 1.0, done=True))
        await next_event(ws)
        await asyncio.sleep(0.2)
        await ws.send(audio(conversation_id, "i-2", 0.1, done=True))
        events = [await next_event(ws) for _ in range(3)]
    assert [(e["event_type"], e["inference_id"]) for e in events] == [
        ("conversation.replica.stopped_speaking", "i-1"),
        ("conversation.replica.started_speaking", "i-2"),
        ("conversation.replica.stopped_speaking", "i-2"),
    ]
    assert 0.15 <= events[0]["properties"]["duration"] < 0.5


async def test_interrupt_mid_utterance_is_acknowledged(
    emu: TavusEmulator, client: httpx.AsyncClient
) -> None:
    created = await create(client)
    conversation_id = created["conversation_id"]
    async with await joined(created) as ws:
        await ws.send(audio(conversation_id, "i-1", 1.0, done=True))
        await next_event(ws)
        await asyncio.sleep(0.3)
        await ws.send(message(conversation_id, "conversation.interrupt"))
        interrupted, stopped = await next_event(ws), await next_event(ws)
        await ws.send(audio(conversation_id, "i-1", 0.2, done=True))  # late chunk: not played
        await expect_silence(ws, 0.3)
    assert interrupted["event_type"] == "conversation.replica_interrupted"
    assert interrupted["properties"] == {}
    assert stopped["event_type"] == "conversation.replica.stopped_speaking"
    assert 0.25 <= stopped["properties"]["duration"] < 0.6
    assert emu.conversations[conversation_id].interrupts == 1


async def test_interrupt_while_idle_sends_nothing(
    emu: TavusEmulator, client: httpx.AsyncClient
) -> None:
    created = await create(client)
    async with await joined(created) as ws:
        await ws.send(message(created["conversation_id"], "conversation.interrupt"))
        await expect_silence(ws, 0.2)
    assert emu.conversations[created["conversation_id"]].interrupts == 1


async def test_muted_interrupts_stop_playback_without_acknowledgement(
    emu: TavusEmulator, client: httpx.AsyncClient
) -> None:
    emu.faults.mute_interrupts = True
    created = await create(client)
    conversation_id = created["conversation_id"]
    async with await joined(created) as ws:
        await ws.send(audio(conversation_id, "i-1", 0.3, done=True))
        await next_event(ws)
        await ws.send(message(conversation_id, "conversation.interrupt"))
        await expect_silence(ws, 0.6)  # neither an ack nor the natural stop at 0.3 s
        record = emu.conversations[conversation_id]
        assert record.interrupts == 1
        assert record.events_sent[-1]["event_type"] == "conversation.replica.started_speaking"


async def test_text_echo_simulates_speech(emu: TavusEmulator, client: httpx.AsyncClient) -> None:
    created = await create(client)
    conversation_id = created["conversation_id"]
    async with await joined(created) as ws:
        await ws.send(echo(conversation_id, modality="text", text="hello"))
        started, stopped = await next_event(ws), await next_event(ws)
    assert started["event_type"] == "conversation.replica.started_speaking"
    assert stopped["inference_id"] == started["inference_id"]
    assert stopped["properties"]["duration"] == pytest.approx(0.3, abs=0.01)
    assert emu.conversations[conversation_id].text_echoes == ["hello"]


async def test_invalid_app_messages_are_ignored_and_counted(
    emu: TavusEmulator, client: httpx.AsyncClient
) -> None:
    created = await create(client)
    conversation_id = created["conversation_id"]
    valid = json.loads(audio(conversation_id, "i-1", 0.1))
    invalid = [
        "not json",
        json.dumps({**valid, "conversation_id": "c-other"}),
        echo(conversation_id, modality="audio", audio="***", inference_id="i-1"),
        echo(
            conversation_id,
            modality="audio",
            audio=base64.b64encode(b"abc").decode(),
            inference_id="i-1",
        ),
        echo(conversation_id, modality="audio", audio=""),
        audio(conversation_id, "i-1", 0.1, sample_rate=22050),
        audio(conversation_id, "i-1", 0.1, done="maybe"),
        message(conversation_id, "conversation.dance"),
    ]
    async with await joined(created) as ws:
        for frame in invalid:
            await ws.send(frame)
        await ws.send(echo(conversation_id, modality="text", text="ok"))
        assert (await next_event(ws))["event_type"] == "conversation.replica.started_speaking"
    errors = emu.conversations[conversation_id].protocol_errors
    assert len(errors) == len(invalid)
    for expected, error in zip(
        [
            "JSON",
            "does not match",
            "base64",
            "odd byte count",
            "inference_id",
            "sample_rate",
            "done",
            "event_type",
        ],
        errors,
        strict=True,
    ):
        assert expected in error
    assert emu.conversations[conversation_id].audio_seconds_by_inference == {}


async def test_llm_messages_are_recorded(emu: TavusEmulator, client: httpx.AsyncClient) -> None:
    created = await create(client)
    conversation_id = created["conversation_id"]
    sent = [
        message(conversation_id, "conversation.respond", text="hi"),
        message(conversation_id, "conversation.append_llm_context", context="more"),
        message(conversation_id, "conversation.overwrite_llm_context", context="all"),
    ]
    async with await joined(created) as ws:
        for frame in sent:
            await ws.send(frame)
        await ws.send(message(conversation_id, "conversation.interrupt"))
        await asyncio.sleep(0.1)
    record = emu.conversations[conversation_id]
    assert record.control_messages == [json.loads(frame) for frame in sent]
    assert record.protocol_errors == []


# -- faults -------------------------------------------------------------------------------------


async def test_dropped_channel_closes_1011_and_keeps_billing(
    emu: TavusEmulator, client: httpx.AsyncClient
) -> None:
    emu.faults.drop_channel_after(0.3)
    created = await create(client)
    conversation_id = created["conversation_id"]
    async with await joined(created) as ws:
        await ws.send(audio(conversation_id, "i-1", 0.2))
        assert (await next_event(ws))["event_type"] == "conversation.replica.started_speaking"
        await ws.send(audio(conversation_id, "i-1", 0.2))
        with pytest.raises(ConnectionClosed):
            await next_event(ws)
    assert ws.close_code == 1011
    await asyncio.sleep(0.1)  # participant_left_timeout is 0: a real leave would end it now
    record = emu.conversations[conversation_id]
    assert record.status == "active" and record.channel_dropped
    assert all(e["event_type"] != "system.shutdown" for e in record.events_sent)
    assert emu.open_sessions == 1 and emu.billed_seconds > 0.1


async def test_fail_creates_after_the_key_check(
    emu: TavusEmulator, client: httpx.AsyncClient
) -> None:
    emu.faults.fail_next_creates(1, status=503)
    wrong_key = await client.post(
        "/v2/conversations", json={"pal_id": PAL}, headers={"x-api-key": "nope"}
    )
    failed = await client.post("/v2/conversations", json={"pal_id": PAL})
    succeeded = await client.post("/v2/conversations", json={"pal_id": PAL})
    assert [r.status_code for r in (wrong_key, failed, succeeded)] == [401, 503, 200]
    assert failed.json()["error"] == "Service Unavailable"
    assert emu.open_sessions == 1


async def test_rate_limit_sends_retry_after(emu: TavusEmulator, client: httpx.AsyncClient) -> None:
    emu.faults.rate_limit_next(1, retry_after=1.5)
    emu.faults.rate_limit_next(1, retry_after=None)
    first = await client.get("/v2/conversations")
    second = await client.post("/v2/conversations", json={"pal_id": PAL})
    third = await client.get("/v2/conversations")
    assert (first.status_code, first.headers["Retry-After"]) == (429, "1.5")
    assert second.status_code == 429 and "Retry-After" not in second.headers
    assert third.status_code == 200 and emu.open_sessions == 0


async def test_slow_fault_delays_only_its_route(
    emu: TavusEmulator, client: httpx.AsyncClient
) -> None:
    emu.faults.slow_next(1, 0.3, route="create")
    began = time.monotonic()
    await client.get("/v2/conversations")
    listed = time.monotonic()
    await create(client)
    created = time.monotonic()
    await create(client)
    assert listed - began < 0.2
    assert created - listed >= 0.3
    assert time.monotonic() - created < 0.2


async def test_fail_ends_and_faults_apply_in_order_of_arrival(
    emu: TavusEmulator, client: httpx.AsyncClient
) -> None:
    conversation_id = (await create(client))["conversation_id"]
    emu.faults.fail_next_ends(1, status=500)
    emu.faults.rate_limit_next(1, route="end")
    statuses = [
        (await client.post(f"/v2/conversations/{conversation_id}/end")).status_code
        for _ in range(3)
    ]
    assert statuses == [500, 429, 200]
    assert emu.conversations[conversation_id].status == "ended"


# -- control API, reset, lifecycle ---------------------------------------------------------------


async def test_control_http_api(emu: TavusEmulator, client: httpx.AsyncClient) -> None:
    async with httpx.AsyncClient(base_url=emu.url, trust_env=False) as control:
        bad = await control.post("/_emulator/faults", json={"explode": True})
        assert bad.status_code == 400 and "explode" in bad.json()["message"]
        faults = {"fail_creates": {"count": 1, "status": 502}, "mute_interrupts": True}
        assert (await control.post("/_emulator/faults", json=faults)).status_code == 200
        assert (await client.post("/v2/conversations", json={"pal_id": PAL})).status_code == 502
        faces = await control.post("/_emulator/faces", json={"face_ids": ["f-new"]})
        assert "f-new" in faces.json()["face_ids"]
        await create(client, face_id="f-new")
        state = (await control.get("/_emulator/state")).json()
        assert state["open_sessions"] == 1 and state["billed_seconds"] > 0
        assert [c["face_id"] for c in state["conversations"]] == ["f-new"]
        assert [r["status"] for r in state["requests"]] == [502, 200]
        assert state["faults"]["mute_interrupts"] is True
        assert (await control.post("/_emulator/reset")).status_code == 200
        state = (await control.get("/_emulator/state")).json()
    assert state["open_sessions"] == 0 and state["conversations"] == []
    assert state["requests"] == [] and state["faults"]["mute_interrupts"] is False


async def test_reset_ends_conversations_and_notifies_the_room(
    emu: TavusEmulator, client: httpx.AsyncClient
) -> None:
    emu.faults.fail_next_ends(5)
    created = await create(client)
    async with await joined(created) as ws:
        await emu.reset()
        shutdown = await next_event(ws)
        with pytest.raises(ConnectionClosed):
            await ws.recv()
    assert shutdown["properties"] == {"reason": "emulator_reset"}
    assert emu.open_sessions == 0 and emu.billed_seconds == 0 and not emu.conversations
    assert emu.faults.pending == [] and emu.requests == []


async def test_aclose_is_idempotent_and_leaves_no_tasks() -> None:
    before = asyncio.all_tasks()
    emu = TavusEmulator(pals={PAL: FACE})
    async with (
        emu,
        httpx.AsyncClient(
            base_url=emu.url, headers={"x-api-key": API_KEY}, trust_env=False
        ) as http,
    ):
        created = await create(http, properties={"max_call_duration": 60})
        ws = await joined(created)
        await ws.send(audio(created["conversation_id"], "i-1", 1.0, done=True))
        await next_event(ws)
    await emu.aclose()
    with pytest.raises(ConnectionClosed):
        await ws.recv()
    assert ws.close_code == 1001
    await ws.close()
    assert asyncio.all_tasks() - before == set()
    with pytest.raises(RuntimeError):
        await emu.start()


async def test_run_emulators_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="valid names: tavus"):
        run_emulators(["tavus", "heygen"], api_key="k")
    with pytest.raises(ValueError, match="valid names: tavus"):
        run_emulators([], api_key="k")


def test_run_emulators_serves_until_sigterm() -> None:
    src = Path(avatarkit.emulators.__file__).parents[2]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")])),
    }
    code = "from avatarkit.emulators import run_emulators; run_emulators(['tavus'], api_key='k1')"
    with subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env
    ) as process:
        assert process.stdout is not None
        line = process.stdout.readline()
        name, url, *_ = line.split()
        assert (name, line.strip().endswith("(api key: k1)")) == ("tavus", True)
        response = httpx.get(
            f"{url}/v2/conversations", headers={"x-api-key": "k1"}, trust_env=False
        )
        assert response.json() == {"data": [], "total_count": 0}
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=5) == 0
