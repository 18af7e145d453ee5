"""The ``local`` provider's remote mode under the contract suite: the real engine server
(:class:`~avatarkit.engine_server.server.EngineServer`, the lite engine) behind
:class:`EngineProxy`, a fault-injecting reverse proxy.

The engine server is the production code under test and has no test hooks. Everything the
suite needs from an "emulator" (request log, API-key check, injected HTTP faults, a dropped
audio channel, a vendor that never acknowledges interrupts, the open-session count, billed
seconds, what arrived on the wire) lives in the proxy, an
:class:`~avatarkit.emulators._base.EmulatorServer` subclass, so it behaves exactly as the
vendor emulators do. What the proxy chooses where the suite's contract leaves room:

* **Routes.** ``POST /v1/sessions`` (operation ``create``), ``GET /v1/sessions``,
  ``GET``/``DELETE /v1/sessions/{id}`` (``DELETE`` is operation ``end``) and ``GET /health``
  are forwarded to the server; statuses, bodies and the headers a client reads
  (``Content-Type``, ``Location``, ``Retry-After``, ``WWW-Authenticate``) come back untouched.
  The server answers with paths, never absolute URLs, so nothing is rewritten.
* **Auth.** ``/v1`` routes need ``Authorization: Bearer <proxy key>`` (401 in the server's
  error shape otherwise, before any fault); they are forwarded with the *server's* key, so a
  wrong client key never reaches the server. ``/health`` is open, as at the server. WHEP is
  forwarded with the client's own ``Authorization`` (the session's viewer token), which the
  server checks.
* **WHEP** (``POST``/``OPTIONS /whep/{id}``, ``DELETE``/``PATCH``/``OPTIONS
  /whep/{id}/{resource}``) is forwarded so ``session.video()`` works through the proxy; the
  ``Location`` is a path, which resolves against the proxy. Media flows peer to peer between
  the client and the server on loopback, not through the proxy.
* **The audio WebSocket** is relayed frame by frame both ways. Binary frames from the client
  are counted as PCM16 mono at the session's ``sample_rate`` (from the create answer; 16 kHz
  when unknown) and their sizes recorded. ``faults.drop_channel_after(s)`` closes both sides
  with 1011 once a session's relayed audio reaches ``s`` seconds (the server then sees its
  socket vanish and would end the session after its idle timeout, which is left at the
  server's long default so that a client that forgets to ``DELETE`` shows up as an open
  session). ``faults.mute_interrupts`` swallows ``cleared`` and ``playback_finished`` with
  ``interrupted: true`` (the server still stops). A close on either side is mirrored to the
  other with the same code.
* **Billing.** ``open_sessions`` is the server's own count of sessions (``EngineServer.
  sessions``). The server exposes no per-session durations, so ``billed_seconds`` comes from
  the proxy's :class:`~avatarkit.emulators._base.BillingLedger`: a meter opened by every
  ``201`` create and stopped by a ``200`` ``DELETE``, a ``410`` ``GET`` or a
  ``session_ended`` message relayed on the audio socket.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import hmac
import json
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import aiohttp
import numpy as np
from aiohttp import WSCloseCode, WSMsgType, web
from numpy.typing import NDArray

from avatarkit import KitConfig
from avatarkit.consent.authority import ConsentAuthority
from avatarkit.consent.store import SQLiteConsentStore
from avatarkit.emulators._base import EmulatorServer
from avatarkit.engine_server.server import EngineServer
from avatarkit.local_engine.engines import build_engine
from avatarkit.local_engine.lite import LiteEngine

from ..conftest import CONSENT_GRANT, ISSUER, ISSUER_KEY, consent_config
from ..local_engine import astronaut, portrait_file
from .harness import FAST_RETRY, VendorHarness

__all__ = ["EngineProxy", "LocalEngineHarness", "ProxiedSession"]

API_KEY = "local-proxy-key-3e9a71"
SERVER_KEY = "local-server-key-8b20c4"
SAMPLE_RATE = 16_000
#: MediaPipe face-mesh landmarks: the outer mouth corners, the inner lip centres
_MOUTH_CORNERS = [61, 291]
_UPPER_INNER_LIP, _LOWER_INNER_LIP = 13, 14
#: request headers forwarded to the server (``Authorization`` is set per route)
_REQUEST_HEADERS = ("Content-Type", "Accept", "Idempotency-Key", "Origin")
#: response headers passed back to the client
_RESPONSE_HEADERS = ("Content-Type", "Location", "Retry-After", "WWW-Authenticate",
                     "Accept-Post", "Allow", "Access-Control-Allow-Origin",
                     "Access-Control-Allow-Methods", "Access-Control-Allow-Headers",
                     "Access-Control-Expose-Headers", "Access-Control-Max-Age")
_WS_CLOSE_TIMEOUT = 2.0


@dataclass
class ProxiedSession:
    """What the proxy saw of one engine session."""

    session_id: str
    sample_rate: int = SAMPLE_RATE
    #: byte size of every binary (audio) frame the client sent
    frame_sizes: list[int] = field(default_factory=list)
    audio_bytes: int = 0
    #: ``error`` messages the server sent back (what it could not act on)
    engine_errors: list[str] = field(default_factory=list)
    #: text frames from the client that were not JSON objects with a ``type``
    protocol_errors: list[str] = field(default_factory=list)
    channel_dropped: bool = False
    sockets: int = 0

    @property
    def audio_seconds_received(self) -> float:
        return self.audio_bytes / 2 / self.sample_rate


class EngineProxy(EmulatorServer):
    """A fault-injecting reverse proxy in front of a running :class:`EngineServer`; see the
    module docstring for what it forwards and what it chooses."""

    name: ClassVar[str] = "local"
    auth_header: ClassVar[str] = "Authorization"

    def __init__(self, upstream: EngineServer, *, api_keys: Iterable[str],
                 upstream_key: str | None, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(api_keys=api_keys, faces=(), accept_any_face=True, host=host,
                         port=port, max_concurrent=upstream.max_sessions,
                         concurrency_limit_status=503)
        self.upstream = upstream
        self._upstream_key = upstream_key
        self._client: aiohttp.ClientSession | None = None
        self._sessions: dict[str, ProxiedSession] = {}
        self._sockets: set[tuple[web.WebSocketResponse, aiohttp.ClientWebSocketResponse]] = set()

    # -- state -----------------------------------------------------------------------------

    @property
    def sessions(self) -> Mapping[str, ProxiedSession]:
        """Every session created through the proxy (ended ones included)."""
        return dict(self._sessions)

    @property
    def open_sessions(self) -> int:
        """The sessions the engine server is rendering now (its own count)."""
        return self.upstream.sessions

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self._client = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        try:
            await super().start()
        except BaseException:
            await self._client.close()
            raise

    async def aclose(self) -> None:
        for client, upstream in list(self._sockets):
            with contextlib.suppress(Exception):
                await upstream.close(code=WSCloseCode.GOING_AWAY)
            with contextlib.suppress(Exception):
                await client.close(code=WSCloseCode.GOING_AWAY)
        await super().aclose()
        if self._client is not None:
            await self._client.close()
            self._client = None

    # -- EmulatorServer hooks --------------------------------------------------------------

    def _add_vendor_routes(self, app: web.Application) -> None:
        route = self._add_api_route
        route(app, "POST", "/v1/sessions", self._create, operation="create")
        route(app, "GET", "/v1/sessions", self._forward_authenticated)
        route(app, "GET", "/v1/sessions/{session_id}", self._get)
        route(app, "DELETE", "/v1/sessions/{session_id}", self._delete, operation="end")
        route(app, "GET", "/v1/sessions/{session_id}/audio", self._audio)
        app.router.add_get("/health", self._forward_open)
        for method in ("POST", "OPTIONS"):
            app.router.add_route(method, "/whep/{stream_id}", self._forward_open)
        for method in ("DELETE", "PATCH", "OPTIONS"):
            app.router.add_route(method, "/whep/{stream_id}/{resource_id}", self._forward_open)

    def _is_authorized(self, request: web.Request) -> bool:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return False
        return any(hmac.compare_digest(given.strip().encode(), key.encode())
                   for key in self._api_keys)

    def _error_response(self, status: int, message: str, *,
                        headers: Mapping[str, str] | None = None) -> web.Response:
        kind = {401: "unauthorized", 429: "rate_limited"}.get(status, "injected_failure")
        return web.json_response({"error": {"type": kind, "message": message}}, status=status,
                                 headers=dict(headers or {}))

    def _vendor_state(self) -> dict[str, Any]:
        return {"engine_sessions": self.upstream.sessions,
                "sessions": [{"session_id": s.session_id, "audio_seconds":
                              s.audio_seconds_received, "channel_dropped": s.channel_dropped}
                             for s in self._sessions.values()]}

    def _reset_sessions(self) -> None:
        self._sessions.clear()

    # -- HTTP ------------------------------------------------------------------------------

    def _upstream_url(self, request: web.Request) -> str:
        return self.upstream.url + request.path_qs

    async def _forward(self, request: web.Request, *, authenticated: bool) -> web.Response:
        assert self._client is not None
        headers = {name: value for name in _REQUEST_HEADERS
                   if (value := request.headers.get(name)) is not None}
        if authenticated:
            if self._upstream_key is not None:
                headers["Authorization"] = f"Bearer {self._upstream_key}"
        elif (auth := request.headers.get("Authorization")) is not None:
            headers["Authorization"] = auth
        body = await request.read()
        try:
            async with self._client.request(request.method, self._upstream_url(request),
                                            data=body or None, headers=headers,
                                            allow_redirects=False) as response:
                payload = await response.read()
                back = {name: value for name in _RESPONSE_HEADERS
                        if (value := response.headers.get(name)) is not None}
                return web.Response(status=response.status, body=payload, headers=back)
        except aiohttp.ClientError as exc:
            return self._error_response(502, f"the engine server could not be reached "
                                             f"({type(exc).__name__})")

    async def _forward_open(self, request: web.Request) -> web.StreamResponse:
        return await self._forward(request, authenticated=False)

    async def _forward_authenticated(self, request: web.Request) -> web.StreamResponse:
        return await self._forward(request, authenticated=True)

    async def _create(self, request: web.Request) -> web.StreamResponse:
        response = await self._forward(request, authenticated=True)
        if response.status == 201:
            info = _json_body(response)
            session_id = info.get("session_id")
            if isinstance(session_id, str):
                rate = info.get("sample_rate")
                self._sessions[session_id] = ProxiedSession(
                    session_id, sample_rate=rate if isinstance(rate, int) else SAMPLE_RATE)
                self.ledger.open(session_id)
        return response

    async def _get(self, request: web.Request) -> web.StreamResponse:
        response = await self._forward(request, authenticated=True)
        if response.status == 410:
            self.ledger.close(request.match_info["session_id"], "ended at the server")
        return response

    async def _delete(self, request: web.Request) -> web.StreamResponse:
        response = await self._forward(request, authenticated=True)
        if response.status == 200:
            reason = _json_body(response).get("reason")
            self.ledger.close(request.match_info["session_id"],
                              reason if isinstance(reason, str) else "deleted")
        return response

    # -- the audio WebSocket ---------------------------------------------------------------

    async def _audio(self, request: web.Request) -> web.StreamResponse:
        assert self._client is not None
        session_id = request.match_info["session_id"]
        session = self._sessions.setdefault(session_id, ProxiedSession(session_id))
        headers = {"Authorization": f"Bearer {self._upstream_key}"} \
            if self._upstream_key is not None else {}
        try:
            upstream = await self._client.ws_connect(self._upstream_url(request),
                                                     headers=headers, max_msg_size=0)
        except aiohttp.WSServerHandshakeError as exc:
            return self._error_response(exc.status, "the engine server refused the audio "
                                                    "socket")
        except aiohttp.ClientError as exc:
            return self._error_response(502, f"the engine server could not be reached "
                                             f"({type(exc).__name__})")
        client = web.WebSocketResponse(timeout=_WS_CLOSE_TIMEOUT, max_msg_size=0)
        pair = (client, upstream)
        try:
            await client.prepare(request)
            session.sockets += 1
            self._sockets.add(pair)
            up = asyncio.create_task(self._client_to_engine(session, client, upstream))
            down = asyncio.create_task(self._engine_to_client(session, client, upstream))
            try:
                await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                # one side is gone: mirror its close to the other, then let both relays end
                await _mirror_close(client, upstream)
                await asyncio.gather(up, down, return_exceptions=True)
        finally:
            self._sockets.discard(pair)
            if not upstream.closed:
                await upstream.close(code=WSCloseCode.GOING_AWAY)
        return client

    async def _client_to_engine(self, session: ProxiedSession, client: web.WebSocketResponse,
                                upstream: aiohttp.ClientWebSocketResponse) -> None:
        async for message in client:
            if message.type == WSMsgType.TEXT:
                _check_client_text(session, message.data)
                await upstream.send_str(message.data)
            elif message.type == WSMsgType.BINARY:
                data: bytes = message.data
                session.frame_sizes.append(len(data))
                session.audio_bytes += len(data)
                await upstream.send_bytes(data)
                threshold = self.faults.drop_channel_after_audio_seconds
                if (threshold is not None and not session.channel_dropped
                        and session.audio_seconds_received >= threshold):
                    session.channel_dropped = True
                    await upstream.close(code=WSCloseCode.INTERNAL_ERROR,
                                         message=b"channel dropped")
                    await client.close(code=WSCloseCode.INTERNAL_ERROR,
                                       message=b"channel dropped")
                    return
            elif message.type == WSMsgType.ERROR:
                return

    async def _engine_to_client(self, session: ProxiedSession, client: web.WebSocketResponse,
                                upstream: aiohttp.ClientWebSocketResponse) -> None:
        async for message in upstream:
            if message.type == WSMsgType.TEXT:
                event = _json_object(message.data)
                kind = event.get("type")
                if self.faults.mute_interrupts and (
                        kind == "cleared"
                        or (kind == "playback_finished" and event.get("interrupted") is True)):
                    continue
                if kind == "session_ended":
                    reason = event.get("reason")
                    self.ledger.close(session.session_id,
                                      reason if isinstance(reason, str) else "ended")
                elif kind == "error":
                    session.engine_errors.append(str(event.get("message")))
                await client.send_str(message.data)
            elif message.type == WSMsgType.BINARY:
                await client.send_bytes(message.data)
            elif message.type == WSMsgType.ERROR:
                return


async def _mirror_close(client: web.WebSocketResponse,
                        upstream: aiohttp.ClientWebSocketResponse) -> None:
    """Close whichever side is still open with the code the other side closed with."""
    if upstream.closed and not client.closed:
        code = upstream.close_code or WSCloseCode.ABNORMAL_CLOSURE
        await client.close(code=_sendable(code))
    elif client.closed and not upstream.closed:
        code = client.close_code or WSCloseCode.ABNORMAL_CLOSURE
        await upstream.close(code=_sendable(code))


def _sendable(code: int) -> int:
    """1005/1006/1015 describe a close but may not be sent in a close frame."""
    return WSCloseCode.INTERNAL_ERROR if code in (1005, 1006, 1015) else code


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _json_body(response: web.Response) -> dict[str, Any]:
    body = response.body
    return _json_object(body.decode() if isinstance(body, bytes) else "")


def _check_client_text(session: ProxiedSession, text: str) -> None:
    message = _json_object(text)
    if message.get("type") not in ("speak", "end_utterance", "clear_buffer"):
        session.protocol_errors.append(f"unexpected client message {text[:100]!r}")


# -- the harness ------------------------------------------------------------------------------


class LocalEngineHarness(VendorHarness):
    """``kind = "local"`` with ``url`` pointing at an :class:`EngineProxy` in front of an
    :class:`EngineServer` that verifies the test consent token itself."""

    name = "local"
    join_kind = "whep"
    frames_in_process = True

    def __init__(self) -> None:
        self._media: tuple[Path, Path] | None = None
        #: the portrait's mouth box ``(y0, y1, x0, x1)`` from its face landmarks
        self._mouth_box: tuple[int, int, int, int] | None = None
        self._portrait: NDArray[np.int16] | None = None

    async def _prepared_media(self) -> tuple[Path, Path]:
        """The astronaut portrait as ``amelia.png`` and a prepared-avatar cache, made once
        per test run in a temporary directory (removed at exit)."""
        if self._media is None:
            folder = Path(tempfile.mkdtemp(prefix="avatarkit-contract-local-"))
            atexit.register(shutil.rmtree, folder, ignore_errors=True)
            portrait = portrait_file(folder)
            cache = folder / "cache"
            engine = await asyncio.to_thread(build_engine, "lite", portrait, cache_dir=cache)
            assert isinstance(engine, LiteEngine)
            landmarks = engine.avatar.landmarks[0]
            left, right = landmarks[_MOUTH_CORNERS, 0]
            width = float(right - left)
            top = float(landmarks[_UPPER_INNER_LIP, 1]) - 0.25 * width
            bottom = float(landmarks[_LOWER_INNER_LIP, 1]) + 0.75 * width
            self._mouth_box = int(top), int(bottom), int(left), int(right)
            self._portrait = astronaut().astype(np.int16)
            self._media = portrait, cache
        return self._media

    def mouth_opening(self, rgb: NDArray[np.uint8]) -> float:
        """How far the engine opened the portrait's mouth in a received frame: the mean
        absolute difference from the (closed-mouth) source portrait over the box around its
        mouth (between the mouth corners, from a quarter mouth width above the upper inner lip
        to three quarters below the lower one), in units of 50 levels: about 0 at rest (only
        the watermark and the codec change it), about 0.6 to 0.7 fully open.

        :func:`avatarkit.emulators._media.mouth_opening` reads the cartoon face of the
        emulators' synthetic track at a fixed box; on this portrait that box is the
        astronaut's suit, which reads about 0.76 whatever the audio."""
        assert self._mouth_box is not None and self._portrait is not None, "serve() first"
        y0, y1, x0, x1 = self._mouth_box
        if rgb.shape != self._portrait.shape:
            raise ValueError(f"expected a {self._portrait.shape} frame, got {rgb.shape}")
        diff = np.abs(rgb[y0:y1, x0:x1].astype(np.int16) - self._portrait[y0:y1, x0:x1])
        return float(min(1.0, diff.mean() / 50.0))

    async def serve(self) -> AsyncIterator[EmulatorServer]:
        portrait, cache = await self._prepared_media()
        # the server's own view of the test registry: CONSENT_GRANT at index 0 of its list
        authority = ConsentAuthority(ISSUER_KEY, issuer=ISSUER,
                                     store=SQLiteConsentStore(":memory:"), status_ttl_s=60)
        async with authority:
            ref = await authority.store.allocate_status_index(authority.status_uri)
            assert ref == CONSENT_GRANT.status
            await authority.store.record_grant(CONSENT_GRANT)
            await authority.publish()
            config = KitConfig(avatars={"amelia": {"local": str(portrait)},
                                        "bob": {"local": str(portrait)}},
                               consent=consent_config(), metering={"ledger": ":memory:"})
            server = EngineServer(config, engine="lite", api_key=SERVER_KEY,
                                  cache_dir=str(cache), status_source=authority.source,
                                  consent_store=authority.store)
            async with server, EngineProxy(server, api_keys=[API_KEY],
                                           upstream_key=SERVER_KEY) as proxy:
                yield proxy

    def provider_settings(self, emulator: EmulatorServer) -> dict[str, Any]:
        return {"url": emulator.url, "api_key": API_KEY, "price_per_minute": "0.05",
                "retry": FAST_RETRY, "timeout": 10}

    def avatar_ids(self) -> dict[str, str]:
        return {"amelia": "amelia", "bob": "bob"}

    def received_audio_seconds(self, emulator: EmulatorServer) -> float:
        assert isinstance(emulator, EngineProxy)
        return sum(s.audio_seconds_received for s in emulator.sessions.values())

    def check_wire_format(self, emulator: EmulatorServer) -> None:
        """Audio came as binary PCM16 (even byte counts) at 16 kHz mono in frames of at most
        a second; every text frame was a protocol message; the server refused nothing."""
        assert isinstance(emulator, EngineProxy)
        sessions = [s for s in emulator.sessions.values() if s.frame_sizes]
        assert sessions, "no audio reached the engine server"
        for session in sessions:
            assert session.sample_rate == SAMPLE_RATE
            assert all(size > 0 and size % 2 == 0 for size in session.frame_sizes)
            assert max(session.frame_sizes) <= 2 * SAMPLE_RATE
            assert session.protocol_errors == [] and session.engine_errors == []

    def is_create(self, method: str, path: str) -> bool:
        return method == "POST" and path == "/v1/sessions"
