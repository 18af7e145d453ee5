"""The engine server (``avatarkit serve``) over real loopback sockets: REST sessions with
consent verified at the server, the audio WebSocket, session ends, auth, metrics, WHEP
viewers whose frames carry the label and the watermark, and the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from numpy.typing import NDArray
from PIL import Image
from pydantic import SecretStr
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from avatarkit import KitConfig
from avatarkit.cli import main
from avatarkit.cli import serve as serve_command
from avatarkit.consent.authority import ConsentAuthority
from avatarkit.consent.keys import IssuerKey
from avatarkit.disclosure.label import FrameLabeler
from avatarkit.disclosure.metadata import DisclosureMetadata
from avatarkit.disclosure.notice import verify_disclosure_notice
from avatarkit.disclosure.watermark import WatermarkDetector, payload_for
from avatarkit.engine_server.protocol import (
    Cleared,
    ErrorMessage,
    PlaybackFinishedMessage,
    PlaybackStartedMessage,
    ServerMessage,
    SessionEnded,
    SessionEndedMessage,
    SessionInfo,
    server_message,
)
from avatarkit.engine_server.server import LATENCY_BUCKETS, EngineServer
from avatarkit.errors import ConfigError
from avatarkit.local_engine.engines import build_engine

from ..conftest import AUDIENCE, ISSUER, consent_config, grant_fields, speech
from ..local_engine import astronaut, portrait_file

RATE = 16_000
FRAMES = 50  # received over WHEP: 2 s at 25 fps
KEY = "srv-key-4f1d0b9a7e"


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The astronaut as an avatar file, and a cache with it prepared (once per module)."""
    folder = tmp_path_factory.mktemp("serve")
    path = portrait_file(folder)
    cache = folder / "cache"
    build_engine("lite", path, cache_dir=cache)
    return path, cache


async def local_grant(authority: ConsentAuthority, **overrides: Any) -> tuple[str, str]:
    """A recorded grant for "amelia" on provider "local"; (consent id, token)."""
    fields = grant_fields(avatars=["amelia"], providers=["local"], purposes=["support"])
    fields.update(overrides)
    grant, token = await authority.grant(audience=AUDIENCE, **fields)
    return grant.consent_id, token


ServerFactory = Callable[..., EngineServer]


@pytest.fixture
def make_server(consent_authority: ConsentAuthority,
                media: tuple[Path, Path]) -> ServerFactory:
    path, cache = media

    def factory(*, consent: dict[str, Any] | None = None, disclosure: dict[str, Any] | None
                = None, **kwargs: Any) -> EngineServer:
        config = KitConfig(avatars={"amelia": {"local": path.name}, "nobody": {}},
                           consent=consent_config(recheck_interval_s=0.2, **(consent or {})),
                           disclosure=disclosure or {}, metering={"ledger": ":memory:"})
        return EngineServer(config, cache_dir=str(cache), avatar_dir=path.parent,
                            status_source=consent_authority.source,
                            consent_store=consent_authority.store, **kwargs)

    return factory


@pytest.fixture
async def server(make_server: ServerFactory) -> AsyncIterator[EngineServer]:
    async with make_server() as served:
        yield served


@pytest.fixture
async def http(server: EngineServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        yield client


@pytest.fixture
async def token(consent_authority: ConsentAuthority) -> str:
    return (await local_grant(consent_authority))[1]


def create_body(token: str, **overrides: Any) -> dict[str, Any]:
    generation = f"gen_{time.monotonic_ns()}"
    body: dict[str, Any] = {
        "avatar": "amelia", "consent_token": token, "purpose": "support",
        "disclosure": DisclosureMetadata(generation_id=generation, provider="local",
                                         avatar="amelia").model_dump(mode="json"),
    }
    body.update(overrides)
    return body


async def create(http: httpx.AsyncClient, token: str, **overrides: Any) -> SessionInfo:
    response = await http.post("/v1/sessions", json=create_body(token, **overrides))
    assert response.status_code == 201, response.text
    return SessionInfo.model_validate(response.json())


def ws_url(server: EngineServer, info: SessionInfo) -> str:
    return server.url.replace("http://", "ws://") + info.audio_url


async def next_message(ws: ClientConnection, kind: type[Any],
                       within: float = 5.0) -> Any:
    """The next server message of type ``kind`` (earlier ones of other types are skipped)."""
    async with asyncio.timeout(within):
        while True:
            message = server_message(await ws.recv())
            if isinstance(message, kind):
                return message


async def messages_until(ws: ClientConnection, kind: type[Any],
                         within: float = 5.0) -> list[ServerMessage]:
    """Every message up to and including the first of type ``kind``."""
    out: list[ServerMessage] = []
    async with asyncio.timeout(within):
        while True:
            out.append(server_message(await ws.recv()))
            if isinstance(out[-1], kind):
                return out


def pcm(seconds: float) -> bytes:
    samples = np.clip(speech(seconds, RATE) * 32767, -32768, 32767).astype("<i2")
    return bytes(samples.tobytes())


async def send_audio(ws: ClientConnection, seconds: float, chunk_ms: int = 20) -> None:
    data = pcm(seconds)
    step = RATE * chunk_ms // 1000 * 2
    for offset in range(0, len(data), step):
        await ws.send(data[offset:offset + step])


async def wait_for(check: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


# -- create -----------------------------------------------------------------------------------


async def test_create_returns_the_session_and_its_media_urls(
        server: EngineServer, http: httpx.AsyncClient, token: str) -> None:
    info = await create(http, token)
    assert info.session_id.startswith("ses_")
    assert (info.avatar, info.engine, info.width, info.height) == ("amelia", "lite", 512, 512)
    assert info.fps == 25.0 and info.sample_rate == RATE
    assert info.audio_url == f"/v1/sessions/{info.session_id}/audio"
    assert info.whep_url == f"/whep/{info.session_id}"
    assert info.viewer_url == f"/viewer/{info.session_id}"
    assert info.viewer_token is None  # no key, no viewer token
    assert info.consent_id and info.created_at.tzinfo is not None
    assert server.sessions == 1
    got = await http.get(f"/v1/sessions/{info.session_id}")
    assert SessionInfo.model_validate(got.json()) == info
    listed = (await http.get("/v1/sessions")).json()["sessions"]
    assert [SessionInfo.model_validate(s) for s in listed] == [info]
    health = (await http.get("/health")).json()
    assert health == {"status": "ok", "engine": "lite", "sessions": 1, "max_sessions": 4,
                      "version": health["version"]}
    # the viewer's notice is signed by the server, burned-in, under the verified consent
    config = (await http.get(f"/viewer/{info.session_id}/config.json")).json()
    assert config["whep_url"] == info.whep_url and config["token"] is None
    from avatarkit.consent.keys import KeySet

    notice = verify_disclosure_notice(config["disclosure_notice"],
                                      KeySet.from_jwks(config["jwks"]))
    assert notice.label_policy == "burned-in" and notice.consent_id == info.consent_id
    assert (await http.get(f"/viewer/{info.session_id}")).status_code == 200
    assert (await http.delete(f"/v1/sessions/{info.session_id}")).status_code == 200
    assert server.sessions == 0


@pytest.mark.parametrize(("change", "field"), [
    ({"avatar": None}, "avatar"),
    ({"purpose": ""}, "purpose"),
    ({"consent_token": None}, "consent_token"),
    ({"disclosure": {"provider": "local"}}, "disclosure.generation_id"),
    ({"sample_rate": 12345}, "sample_rate"),
    ({"max_duration_s": -1}, "max_duration_s"),
    ({"surprise": 1}, "surprise"),
])
async def test_a_bad_body_is_400_naming_the_field(
        server: EngineServer, http: httpx.AsyncClient, token: str,
        change: dict[str, Any], field: str) -> None:
    body = {k: v for k, v in {**create_body(token), **change}.items() if v is not None}
    response = await http.post("/v1/sessions", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request" and error["field"] == field
    assert error["expected"] and error["message"]
    assert token not in response.text
    assert server.sessions == 0


async def test_a_body_that_is_not_json_is_400(server: EngineServer,
                                              http: httpx.AsyncClient) -> None:
    response = await http.post("/v1/sessions", content=b"{nope",
                               headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["field"] == "body"


async def test_an_unknown_avatar_is_404(server: EngineServer, http: httpx.AsyncClient,
                                        token: str) -> None:
    for name in ("zed", "nobody"):  # unknown; known but without local media
        response = await http.post("/v1/sessions", json=create_body(token, avatar=name))
        assert response.status_code == 404
        assert response.json()["error"]["field"] == "avatar"
    assert server.sessions == 0


async def consent_case(case: str, authority: ConsentAuthority) -> str:
    if case == "missing":
        return ""
    if case == "forged":
        stranger = ConsentAuthority(IssuerKey.generate(), issuer=ISSUER,
                                    store=authority.store)
        return (await local_grant(stranger))[1]
    if case == "revoked":
        consent_id, token = await local_grant(authority)
        await authority.revoke(consent_id, reason="test")
        return token
    if case == "other-provider":
        return (await local_grant(authority, providers=["tavus"]))[1]
    if case == "other-purpose":
        return (await local_grant(authority, purposes=["marketing"]))[1]
    raise AssertionError(case)


@pytest.mark.parametrize(("case", "kind", "checks"), [
    ("missing", "ConsentRequired", {"missing"}),
    ("forged", "InvalidConsentToken", {"key", "signature"}),
    ("revoked", "ConsentWithdrawn", {"revoked"}),
    ("other-provider", "ConsentOutOfScope", {"provider"}),
    ("other-purpose", "ConsentOutOfScope", {"purpose"}),
])
async def test_consent_refusals_are_403_with_the_check_and_start_nothing(
        server: EngineServer, http: httpx.AsyncClient, consent_authority: ConsentAuthority,
        case: str, kind: str, checks: set[str]) -> None:
    token = await consent_case(case, consent_authority)
    body = create_body(token)
    response = await http.post("/v1/sessions", json=body)
    assert response.status_code == 403, response.text
    error = response.json()["error"]
    assert error["check"] in checks and error["message"]
    assert error["type"] == kind
    if token:
        assert token not in response.text
    assert server.sessions == 0
    assert 'avatarkit_sessions_refused_total{reason="consent"} 1' in server.metrics_text()


async def test_a_region_limited_grant_needs_the_servers_region(
        make_server: ServerFactory, consent_authority: ConsentAuthority) -> None:
    _, token = await local_grant(consent_authority, regions=["eu-onprem"])
    async with make_server() as anywhere, httpx.AsyncClient(base_url=anywhere.url) as http:
        response = await http.post("/v1/sessions", json=create_body(token))
        assert response.status_code == 403 and response.json()["error"]["check"] == "region"
    async with make_server(region="eu-onprem") as eu, \
            httpx.AsyncClient(base_url=eu.url) as http:
        info = await create(http, token)
        assert info.region == "eu-onprem"


async def test_the_same_idempotency_key_gets_the_same_session(
        server: EngineServer, http: httpx.AsyncClient, token: str) -> None:
    body = create_body(token, idempotency_key="attempt-1")
    first, second = await asyncio.gather(http.post("/v1/sessions", json=body),
                                         http.post("/v1/sessions", json=body))
    assert sorted([first.status_code, second.status_code]) == [200, 201]
    assert first.json() == second.json()
    again = await http.post("/v1/sessions", json=body)
    assert again.status_code == 200 and again.json() == first.json()
    assert server.sessions == 1
    found = (await http.get("/v1/sessions", params={"idempotency_key": "attempt-1"})).json()
    assert [s["session_id"] for s in found["sessions"]] == [first.json()["session_id"]]
    assert (await http.get("/v1/sessions", params={"idempotency_key": "other"})).json() == \
        {"sessions": []}
    conflict = await http.post("/v1/sessions", json={**body, "purpose": "demo"})
    assert conflict.status_code == 409
    await http.delete(f"/v1/sessions/{first.json()['session_id']}")



async def test_an_idempotent_retry_with_another_consent_token_is_refused(
        server: EngineServer, http: httpx.AsyncClient, token: str,
        consent_authority: ConsentAuthority) -> None:
    body = create_body(token, idempotency_key="attempt-7")
    first = await http.post("/v1/sessions", json=body)
    assert first.status_code == 201
    # someone else's (valid, single-use) token with the same key: no ride on this session
    _, other = await local_grant(consent_authority, single_use=True)
    conflict = await http.post("/v1/sessions", json={**body, "consent_token": other})
    assert conflict.status_code == 409
    error = conflict.json()["error"]
    assert (error["type"], error["field"]) == ("idempotency_conflict", "consent_token")
    assert first.json()["session_id"] not in conflict.text and other not in conflict.text
    assert server.sessions == 1
    assert 'avatarkit_sessions_refused_total{reason="idempotency_conflict"} 1' in \
        server.metrics_text()
    # the refused token was not spent: it still starts a session of its own
    assert (await http.post("/v1/sessions", json=create_body(other))).status_code == 201
    # and the real retry still gets the first session
    again = await http.post("/v1/sessions", json=body)
    assert again.status_code == 200 and again.json() == first.json()


@pytest.mark.parametrize("nesting", ["body", "field"])
async def test_a_deeply_nested_body_is_400_not_500(
        server: EngineServer, http: httpx.AsyncClient, token: str, nesting: str) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    if nesting == "body":
        content = deep
    else:
        content = json.dumps(create_body(token))[:-1] + f', "avatar": {deep}}}'
    response = await http.post("/v1/sessions", content=content.encode(),
                               headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request" and error["field"] == "body"
    assert "recursion" in error["message"]
    assert server.sessions == 0
    assert (await http.get("/health")).status_code == 200


async def test_errors_quote_client_input_briefly(
        server: EngineServer, http: httpx.AsyncClient, token: str) -> None:
    long = "x" * 5000 + "\u001b[31m"
    extra = await http.post("/v1/sessions", json={**create_body(token), long: 1})
    assert extra.status_code == 400
    assert len(extra.text) < 1000 and "x" * 100 not in extra.text and "\x1b" not in extra.text
    assert extra.json()["error"]["field"].startswith("'xxx")
    unknown = await http.post("/v1/sessions", json=create_body(token, avatar="y" * 200))
    assert unknown.status_code == 404 and "y" * 100 not in unknown.text
    missing = await http.get("/v1/sessions/" + "z" * 5000)
    assert missing.status_code == 404 and "z" * 100 not in missing.text
    info = await create(http, token)
    async with connect(ws_url(server, info)) as ws:
        for frame in ({"type": long}, {"type": "speak", "utterance_id": "u", long: 1},
                      {"type": "speak", "utterance_id": long}):
            await ws.send(json.dumps(frame))
            message = (await next_message(ws, ErrorMessage)).message
            assert len(message) < 500 and "x" * 100 not in message, message
        await ws.send("[" * 100_000)  # deeply nested text frame: an error, socket stays open
        assert "recursion" in (await next_message(ws, ErrorMessage)).message
        await ws.send(json.dumps({"type": "clear_buffer"}))
        await next_message(ws, Cleared)
    await http.delete(f"/v1/sessions/{info.session_id}")

async def test_a_full_server_answers_503_with_retry_after(
        make_server: ServerFactory, token: str) -> None:
    async with make_server(max_sessions=1) as served, \
            httpx.AsyncClient(base_url=served.url) as http:
        await create(http, token)
        response = await http.post("/v1/sessions", json=create_body(token))
        assert response.status_code == 503 and response.headers["Retry-After"] == "5"
        assert response.json()["error"]["type"] == "at_capacity"
        assert served.sessions == 1
        assert 'avatarkit_sessions_refused_total{reason="capacity"} 1' in served.metrics_text()


async def test_an_unusable_avatar_is_422_and_nothing_runs(
        consent_authority: ConsentAuthority, token: str, tmp_path: Path,
        media: tuple[Path, Path]) -> None:
    blank = tmp_path / "wall.png"
    Image.fromarray(np.full((256, 256, 3), 180, np.uint8)).save(blank)
    config = KitConfig(avatars={"amelia": {"local": str(blank)}},
                       consent=consent_config(), metering={"ledger": ":memory:"})
    async with EngineServer(config, cache_dir=str(media[1]),
                            status_source=consent_authority.source,
                            consent_store=consent_authority.store) as bad, \
            httpx.AsyncClient(base_url=bad.url) as http:
        response = await http.post("/v1/sessions", json=create_body(token))
        assert response.status_code == 422
        assert response.json()["error"]["type"] == "NoFaceError"
        assert bad.sessions == 0


async def test_the_generation_log_records_the_session_and_a_disabled_label(
        make_server: ServerFactory, consent_authority: ConsentAuthority) -> None:
    consent_id, token = await local_grant(consent_authority)
    async with make_server(disclosure={"burned_label": {"enabled": False}}) as served, \
            httpx.AsyncClient(base_url=served.url) as http:
        body = create_body(token)
        info = await create(http, token, disclosure=body["disclosure"])
        config = (await http.get(f"/viewer/{info.session_id}/config.json")).json()
        await http.delete(f"/v1/sessions/{info.session_id}")
    from avatarkit.consent.keys import KeySet

    notice = verify_disclosure_notice(config["disclosure_notice"],
                                      KeySet.from_jwks(config["jwks"]))
    assert notice.label_policy == "disabled" and notice.model == "lite"
    generation = body["disclosure"]["generation_id"]
    log = [r for r in await consent_authority.store.generations(consent_id)
           if r.generation_id == generation]
    kinds = [r.kind for r in log]
    assert kinds[:2] == ["session_started", "label_disabled"] and kinds[-1] == "session_ended"
    started = log[0]
    assert started.provider == "local" and started.avatar == "amelia"
    assert started.label is False and started.status_check == "valid"
    assert started.watermark_payload == payload_for(generation).hex()


# -- the audio WebSocket ----------------------------------------------------------------------


async def test_audio_plays_and_reports_start_and_finish(
        server: EngineServer, http: httpx.AsyncClient, token: str) -> None:
    info = await create(http, token)
    async with connect(ws_url(server, info)) as ws:
        await ws.send(json.dumps({"type": "speak", "utterance_id": "u1"}))
        await send_audio(ws, 1.0)
        await ws.send(json.dumps({"type": "end_utterance"}))
        started = await next_message(ws, PlaybackStartedMessage)
        assert started.utterance_id == "u1" and 0 < started.latency_s < 0.5
        finished = await next_message(ws, PlaybackFinishedMessage, within=5)
        assert finished.utterance_id == "u1" and not finished.interrupted
        assert finished.position_s == pytest.approx(1.0, abs=0.05)
        # audio without a speak gets an utterance named by the server
        await send_audio(ws, 0.2)
        await ws.send(json.dumps({"type": "end_utterance"}))
        named = await next_message(ws, PlaybackFinishedMessage)
        assert named.utterance_id and named.utterance_id != "u1"
        # a speak without audio ends at once
        await ws.send(json.dumps({"type": "speak", "utterance_id": "empty"}))
        await ws.send(json.dumps({"type": "end_utterance"}))
        empty = await next_message(ws, PlaybackFinishedMessage, within=1)
        assert (empty.utterance_id, empty.position_s) == ("empty", 0.0)
    await http.delete(f"/v1/sessions/{info.session_id}")


async def test_clear_buffer_interrupts_and_answers_cleared_after_the_finish(
        server: EngineServer, http: httpx.AsyncClient, token: str) -> None:
    info = await create(http, token)
    async with connect(ws_url(server, info)) as ws:
        await ws.send(json.dumps({"type": "clear_buffer"}))  # nothing playing
        assert (await next_message(ws, Cleared, within=2)).position_s == 0.0
        await ws.send(json.dumps({"type": "speak", "utterance_id": "long"}))
        await send_audio(ws, 3.0)
        await next_message(ws, PlaybackStartedMessage)
        await asyncio.sleep(0.5)
        await ws.send(json.dumps({"type": "clear_buffer"}))
        got = await messages_until(ws, Cleared, within=3)
        finished = [m for m in got if isinstance(m, PlaybackFinishedMessage)]
        assert len(finished) == 1 and finished[0].utterance_id == "long"
        assert finished[0].interrupted and 0.3 < finished[0].position_s < 1.5
        assert isinstance(got[-1], Cleared)
        assert got[-1].position_s == pytest.approx(finished[0].position_s)
        # the engine is idle again: a new utterance plays from its start
        await ws.send(json.dumps({"type": "speak", "utterance_id": "next"}))
        await send_audio(ws, 0.3)
        await ws.send(json.dumps({"type": "end_utterance"}))
        after = await next_message(ws, PlaybackFinishedMessage)
        assert after.utterance_id == "next" and after.position_s == pytest.approx(0.3, abs=0.05)
    await http.delete(f"/v1/sessions/{info.session_id}")


async def test_bad_socket_input_is_an_error_message_not_a_crash(
        server: EngineServer, http: httpx.AsyncClient, token: str) -> None:
    info = await create(http, token)
    async with connect(ws_url(server, info)) as ws:
        await ws.send(b"\x01\x02\x03")
        assert "even number of bytes" in (await next_message(ws, ErrorMessage)).message
        await ws.send("not json")
        assert "expected speak" in (await next_message(ws, ErrorMessage)).message
        await ws.send(json.dumps({"type": "dance"}))
        await next_message(ws, ErrorMessage)
        # more than the engine buffers (120 s): refused, the socket stays usable
        chunk = pcm(5.0)
        for _ in range(25):
            await ws.send(chunk)
        assert "buffered" in (await next_message(ws, ErrorMessage, within=5)).message
        await ws.send(json.dumps({"type": "clear_buffer"}))
        await next_message(ws, Cleared)
    assert server.sessions == 1
    await http.delete(f"/v1/sessions/{info.session_id}")


async def test_a_second_audio_socket_replaces_the_first(
        server: EngineServer, http: httpx.AsyncClient, token: str) -> None:
    info = await create(http, token)
    async with connect(ws_url(server, info)) as first, \
            connect(ws_url(server, info)) as second:
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(first.recv(), 3)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4000
        assert "replaced" in closed.value.rcvd.reason
        await second.send(json.dumps({"type": "clear_buffer"}))
        await next_message(second, Cleared)
    await http.delete(f"/v1/sessions/{info.session_id}")


# -- ending -----------------------------------------------------------------------------------


async def test_delete_ends_the_session_and_keeps_a_tombstone(
        server: EngineServer, http: httpx.AsyncClient, token: str,
        consent_authority: ConsentAuthority) -> None:
    info = await create(http, token)
    async with connect(ws_url(server, info)) as ws:
        deleted = await http.delete(f"/v1/sessions/{info.session_id}")
        assert deleted.status_code == 200
        ended = SessionEnded.model_validate(deleted.json())
        assert ended.reason == "deleted" and ended.duration_s >= 0
        message = await next_message(ws, SessionEndedMessage)
        assert (message.reason, message.recoverable) == ("deleted", False)
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 3)
    assert server.sessions == 0
    again = await http.delete(f"/v1/sessions/{info.session_id}")
    assert again.status_code == 200 and again.json() == deleted.json()
    gone = await http.get(f"/v1/sessions/{info.session_id}")
    assert gone.status_code == 410 and gone.json()["error"]["reason"] == "deleted"
    assert (await http.delete("/v1/sessions/ses_unknown")).status_code == 404
    assert (await http.get("/v1/sessions/ses_unknown")).status_code == 404
    # the WHEP endpoint and the viewer forget it
    whep = await http.post(info.whep_url, content=b"v=0",
                           headers={"Content-Type": "application/sdp"})
    assert whep.status_code == 404
    assert (await http.get(f"/viewer/{info.session_id}/config.json")).status_code == 404
    # a late audio socket is told at once
    async with connect(ws_url(server, info)) as late:
        assert (await next_message(late, SessionEndedMessage)).reason == "deleted"
    log = await consent_authority.store.generations(info.consent_id)
    kinds = [r.kind for r in log]
    assert kinds[0] == "session_started" and kinds[-1] == "session_ended"
    assert log[-1].details["reason"] == "deleted"


async def test_max_duration_ends_the_session(
        server: EngineServer, http: httpx.AsyncClient, token: str) -> None:
    info = await create(http, token, max_duration_s=0.6)
    async with connect(ws_url(server, info)) as ws:
        message = await next_message(ws, SessionEndedMessage, within=3)
        assert (message.reason, message.recoverable) == ("max_duration", False)
    await wait_for(lambda: server.sessions == 0)
    assert (await http.delete(f"/v1/sessions/{info.session_id}")).json()["reason"] == \
        "max_duration"


async def test_revoking_the_consent_ends_a_live_session(
        server: EngineServer, http: httpx.AsyncClient,
        consent_authority: ConsentAuthority) -> None:
    consent_id, token = await local_grant(consent_authority)
    info = await create(http, token)
    async with connect(ws_url(server, info)) as ws:
        await consent_authority.revoke(consent_id, reason="withdrawn by the subject")
        message = await next_message(ws, SessionEndedMessage, within=5)
        assert (message.reason, message.recoverable) == ("consent_revoked", False)
    await wait_for(lambda: server.sessions == 0)
    log = await consent_authority.store.generations(consent_id)
    assert any(r.kind == "status_check" and r.status_check == "revoked" for r in log)
    assert log[-1].kind == "session_ended"



async def test_an_unexpected_re_check_error_ends_a_live_session(
        server: EngineServer, http: httpx.AsyncClient, consent_authority: ConsentAuthority,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The server runs the same ConsentWatch as AvatarSession: same reasons, fail closed."""
    from avatarkit.consent.enforce import ConsentGate

    consent_id, token = await local_grant(consent_authority)
    info = await create(http, token)
    async with connect(ws_url(server, info)) as ws:
        async def broken(self: ConsentGate, verified: Any, **kwargs: Any) -> Any:
            raise RuntimeError("a bug in a status backend")

        monkeypatch.setattr(ConsentGate, "recheck", broken)
        message = await next_message(ws, SessionEndedMessage, within=5)
        assert (message.reason, message.recoverable) == ("consent_unverifiable", False)
    await wait_for(lambda: server.sessions == 0)
    log = await consent_authority.store.generations(consent_id)
    assert any(r.kind == "status_check" and r.status_check == "status_unavailable"
               for r in log)

async def test_a_session_without_an_audio_socket_ends_when_idle(
        make_server: ServerFactory, token: str) -> None:
    async with make_server(idle_timeout_s=0.3) as served, \
            httpx.AsyncClient(base_url=served.url) as http:
        info = await create(http, token)
        async with connect(ws_url(served, info)) as ws:
            await asyncio.sleep(0.5)  # connected: not idle
            assert served.sessions == 1
            await ws.send(json.dumps({"type": "clear_buffer"}))
            await next_message(ws, Cleared)
        await wait_for(lambda: served.sessions == 0, within=3)
        assert (await http.delete(f"/v1/sessions/{info.session_id}")).json()["reason"] == \
            "idle_timeout"


async def test_closing_the_server_ends_sessions_and_leaves_no_task(
        make_server: ServerFactory, token: str) -> None:
    before = asyncio.all_tasks()
    served = make_server()
    await served.start()
    async with httpx.AsyncClient(base_url=served.url) as http:
        info = await create(http, token)
    ws = await connect(ws_url(served, info))
    await served.aclose()
    message = await next_message(ws, SessionEndedMessage, within=3)
    assert (message.reason, message.recoverable) == ("server_shutdown", True)
    await ws.close()
    await served.aclose()  # idempotent
    assert served.sessions == 0
    await asyncio.sleep(0)
    left = [t for t in asyncio.all_tasks() - before
            if not t.done() and t is not asyncio.current_task()]
    assert left == []


# -- auth -------------------------------------------------------------------------------------


def test_a_public_host_needs_an_api_key(make_server: ServerFactory) -> None:
    with pytest.raises(ConfigError) as refused:
        make_server(host="0.0.0.0")
    assert refused.value.field == "api_key"
    served = make_server(host="0.0.0.0", api_key=SecretStr(KEY))
    assert KEY not in repr(served)


async def test_the_api_key_is_enforced(make_server: ServerFactory, token: str) -> None:
    async with make_server(api_key=KEY) as served, \
            httpx.AsyncClient(base_url=served.url) as http:
        good = {"Authorization": f"Bearer {KEY}"}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            refused = await http.post("/v1/sessions", json=create_body(token), headers=headers)
            assert refused.status_code == 401
            assert refused.json()["error"]["type"] == "unauthorized"
            assert KEY not in refused.text
            assert (await http.get("/metrics", headers=headers)).status_code == 401
        assert served.sessions == 0
        assert (await http.get("/health")).status_code == 200
        assert (await http.get("/metrics", headers=good)).status_code == 200
        created = await http.post("/v1/sessions", json=create_body(token), headers=good)
        assert created.status_code == 201
        info = SessionInfo.model_validate(created.json())
        assert info.viewer_token and info.viewer_token != KEY
        assert info.viewer_url == f"/viewer/{info.session_id}?token={info.viewer_token}"
        with pytest.raises(InvalidStatus) as ws_refused:
            await connect(ws_url(served, info))
        assert ws_refused.value.response.status_code == 401
        async with connect(ws_url(served, info), additional_headers=good) as ws:
            await ws.send(json.dumps({"type": "clear_buffer"}))
            await next_message(ws, Cleared)
        # the viewer: the page with its token sets a cookie config.json accepts
        page = f"/viewer/{info.session_id}"
        assert (await http.get(page)).status_code == 401
        assert (await http.get(page + "/config.json")).status_code == 401
        assert (await http.get(page, params={"token": "wrong"})).status_code == 401
        opened = await http.get(info.viewer_url)
        assert opened.status_code == 200 and "httponly" in \
            opened.headers["Set-Cookie"].lower()
        config = await http.get(page + "/config.json")  # the cookie jar sends it
        assert config.status_code == 200 and config.json()["token"] == info.viewer_token
        # WHEP refuses without the viewer token
        whep = await http.post(info.whep_url, content=b"v=0",
                               headers={"Content-Type": "application/sdp"})
        assert whep.status_code == 401
        assert (await http.delete(f"/v1/sessions/{info.session_id}",
                                  headers=good)).status_code == 200


# -- metrics ----------------------------------------------------------------------------------


def parse_metrics(text: str) -> tuple[dict[str, str], dict[tuple[str, str], float]]:
    """(type of each family, value of each sample keyed by name and label text)."""
    types: dict[str, str] = {}
    samples: dict[tuple[str, str], float] = {}
    sample = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
        elif line.startswith("# HELP "):
            assert len(line.split(" ", 3)) == 4
        else:
            match = sample.match(line)
            assert match, f"not a sample line: {line!r}"
            samples[(match[1], match[2] or "")] = float(match[3])
    return types, samples


async def test_metrics_show_sessions_frames_and_first_frame_latency(
        server: EngineServer, http: httpx.AsyncClient, token: str) -> None:
    info = await create(http, token)
    async with connect(ws_url(server, info)) as ws:
        await send_audio(ws, 0.3)
        await ws.send(json.dumps({"type": "end_utterance"}))
        await next_message(ws, PlaybackFinishedMessage)
    response = await http.get("/metrics")
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    types, samples = parse_metrics(response.text)
    assert types["avatarkit_sessions_active"] == "gauge"
    assert types["avatarkit_sessions_started_total"] == "counter"
    assert types["avatarkit_frames_total"] == "counter"
    assert types["avatarkit_stream_fps"] == "gauge"
    assert types["avatarkit_first_frame_latency_seconds"] == "histogram"
    assert samples[("avatarkit_sessions_active", "")] == 1
    assert samples[("avatarkit_sessions_started_total", "")] == 1
    assert samples[("avatarkit_frames_total", "")] >= 5
    fps = samples[("avatarkit_stream_fps", f'{{session="{info.session_id}"}}')]
    assert 15 < fps < 35
    name = "avatarkit_first_frame_latency_seconds"
    buckets = [samples[(f"{name}_bucket", f'{{le="{le}"}}')]
               for le in [*(repr(b) if b % 1 else str(int(b)) for b in LATENCY_BUCKETS),
                          "+Inf"]]
    assert buckets == sorted(buckets) and buckets[-1] == samples[(f"{name}_count", "")] == 1
    assert 0 < samples[(f"{name}_sum", "")] < 1
    await http.delete(f"/v1/sessions/{info.session_id}")
    _, after = parse_metrics((await http.get("/metrics")).text)
    assert after[("avatarkit_sessions_active", "")] == 0
    assert after[("avatarkit_frames_total", "")] >= samples[("avatarkit_frames_total", "")]
    assert not any(key[0] == "avatarkit_stream_fps" for key in after)


# -- WHEP -------------------------------------------------------------------------------------


async def test_a_whep_viewer_gets_labelled_watermarked_frames(
        make_server: ServerFactory, token: str) -> None:
    from avatarkit.transport.webrtc import WhepClient

    async with make_server(api_key=KEY) as served, \
            httpx.AsyncClient(base_url=served.url,
                              headers={"Authorization": f"Bearer {KEY}"}) as http:
        body = create_body(token)
        info = await create(http, token, disclosure=body["disclosure"])
        generation = body["disclosure"]["generation_id"]
        frames: list[NDArray[np.uint8]] = []
        async with WhepClient(served.url + info.whep_url, token=info.viewer_token,
                              timeout=10) as viewer:
            async with asyncio.timeout(15):
                async for received in viewer.video_frames():
                    frames.append(received.data)
                    if len(frames) == FRAMES:
                        break
        await http.delete(f"/v1/sessions/{info.session_id}")
    source = astronaut()
    assert frames[0].shape == source.shape
    y0, y1, x0, x1 = FrameLabeler().region(source.shape)
    for frame in frames[-4:]:
        label = np.abs(frame[y0:y1, x0:x1].astype(int) - source[y0:y1, x0:x1]).mean()
        elsewhere = np.abs(frame[-64:, :64].astype(int) - source[-64:, :64]).mean()
        assert label > 20 > elsewhere * 3, (label, elsewhere)
    # VP8 at WebRTC bitrates damages the mark in any one frame; voting over frames recovers it
    result = WatermarkDetector(expected=payload_for(generation)).detect(frames[FRAMES // 2:])
    assert result.matched, result


# -- the CLI ----------------------------------------------------------------------------------


def serve_args(*argv: str) -> Any:
    import argparse

    parser = argparse.ArgumentParser(prog="avatarkit")
    serve_command.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", *argv])


def write_config(folder: Path, media: tuple[Path, Path]) -> Path:
    jwks = folder / "issuers.jwks"
    from ..conftest import ISSUER_KEY

    jwks.write_text(json.dumps({"keys": [ISSUER_KEY.public_jwk()]}))
    config = folder / "avatarkit.toml"
    image = folder / "amelia.png"
    image.write_bytes(media[0].read_bytes())
    config.write_text(f"""
[consent]
audience = "{AUDIENCE}"
issuers = ["{ISSUER}"]
jwks = "issuers.jwks"

[avatars.amelia]
local = "amelia.png"

[metering]
ledger = ":memory:"
""")
    return config


def test_the_cli_refuses_what_it_must(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                      media: tuple[Path, Path]) -> None:
    config = write_config(tmp_path, media)
    assert serve_command.run(serve_args("--host", "0.0.0.0", "--config", str(config))) == 2
    assert "api_key" in capsys.readouterr().err
    assert serve_command.run(serve_args()) == 2
    assert "[consent]" in capsys.readouterr().err
    assert serve_command.run(serve_args("--config", str(tmp_path / "none.toml"))) == 2
    assert "not found" in capsys.readouterr().err
    os.environ.pop("AVATARKIT_TEST_UNSET", None)
    assert serve_command.run(serve_args("--config", str(config), "--api-key",
                                "env:AVATARKIT_TEST_UNSET")) == 2
    assert "AVATARKIT_TEST_UNSET" in capsys.readouterr().err
    with pytest.raises(SystemExit) as helped:
        serve_args("--help")
    assert helped.value.code == 0
    out = capsys.readouterr().out
    assert "--api-key-env" in out and "--max-sessions" in out and "[consent]" in out


def test_avatarkit_serve_runs_until_sigint(tmp_path: Path, media: tuple[Path, Path]) -> None:
    config = write_config(tmp_path, media)
    env = {**os.environ, "SERVE_TEST_KEY": KEY}
    process = subprocess.Popen(
        [sys.executable, "-m", "avatarkit.cli", "serve", "--config", str(config),
         "--port", "0", "--api-key", "env:SERVE_TEST_KEY", "--cache-dir", str(media[1])],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        url = first.rsplit(" ", 1)[-1].strip()
        assert first.startswith("avatarkit serve: listening on http://127.0.0.1:"), first
        assert "lite: no MuseTalk weights" in process.stdout.readline()
        health = httpx.get(url + "/health", timeout=5)
        assert health.json()["engine"] == "lite"
        assert httpx.get(url + "/metrics", timeout=5).status_code == 401
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=15)
        assert process.returncode == 0, err
        assert KEY not in out + err
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_main_is_the_same_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--host", "10.0.0.1"]) == 2  # no config: refused before anything runs
    assert "error" in capsys.readouterr().err
