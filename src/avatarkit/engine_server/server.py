"""The self-hosted engine server behind ``avatarkit serve``: the wire protocol of
:mod:`avatarkit.engine_server.protocol` on aiohttp.

:class:`EngineServer` renders avatars from its own config (``[avatars.NAME] local = "path"``)
for clients that present a consent token the server verifies itself (``[consent]``). Each
session is one :class:`~avatarkit.local_engine.stream.EngineStream`: its frames are labelled
and watermarked with the session's generation id (:class:`~avatarkit.disclosure.stamp.
DisclosureStamp`), fanned out to WHEP viewers (:class:`~avatarkit.transport.webrtc.
AvatarBroadcast`), and driven by audio that arrives over the session's WebSocket.

Behaviour the protocol leaves open, and what this server chose:

* **Auth.** With an API key every ``/v1`` route (the audio WebSocket included) and
  ``/metrics`` need ``Authorization: Bearer <key>`` (compared in constant time; 401 with a JSON
  error otherwise); ``/health`` is open. A server bound to anything but loopback refuses to
  start without a key. WHEP accepts the session's ``viewer_token`` or the key. The viewer page
  and its ``config.json`` (which hands the viewer token to the page) need the same: the
  session's ``viewer_url`` carries ``?token=<viewer_token>`` when the server has a key; loading
  the page with it sets an ``HttpOnly``, ``SameSite=Strict`` cookie scoped to that one
  session's viewer path, which ``config.json`` then accepts.
* **Errors** are ``{"error": {"type", "message", ...}}``: 400 ``invalid_request`` with
  ``field`` and ``expected``; 401 ``unauthorized``; 403 with the consent exception's class name
  as ``type`` and the failed ``check``; 404 ``not_found`` (unknown avatar, an avatar without a
  ``local`` media path, unknown session); 409 ``idempotency_conflict`` (a key reused for
  another avatar or purpose, or with another consent token); 410 ``session_ended`` on
  ``GET /v1/sessions/{id}`` of an ended session (with ``reason``); 422 with the avatar
  preparation error's class name; 503 ``at_capacity`` / ``shutting_down`` with
  ``Retry-After``.
* **Idempotency.** A create whose ``idempotency_key`` names an open session (or one being
  created) answers 200 with that session's :class:`SessionInfo` when it carries the same
  consent token (compared by SHA-256; it is not verified a second time, so a single-use token
  survives the retry) and no second engine starts; with another token it is a 409. An ended
  session's key may be reused.
* **Client input in errors** is quoted at most ``protocol.MAX_QUOTED`` characters long
  (:func:`~.protocol.quoted`, :func:`~.protocol.validation_problem`); bodies are parsed by
  pydantic's JSON parser, whose nesting limit makes a deeply nested body a 400.
* **Order of checks on create**: body, idempotency, avatar, capacity, consent, engine. The
  capacity check comes before consent so that a single-use token is not spent on a refusal.
* **Disclosure.** The server signs the client's :class:`DisclosureMetadata` with its notice
  key (``[disclosure] notice_key``, else a key made at start) after setting what it knows
  itself: ``label_policy`` (``burned-in``, or ``disabled`` when ``[disclosure.burned_label]``
  is off), ``model`` (the engine) and the verified consent's id and token hash.
* **Audio WebSocket.** One per session: a second connection *replaces* the first, which is
  closed with code 4000 and the reason "replaced by a newer audio connection" (a client that
  reconnects after a network drop must not be locked out by its own dead socket). Text frames
  that do not parse, binary frames with an odd byte count, more than the engine's buffer (120
  s) or a chunk over 10 s are answered with an ``error`` message; the socket stays open.
  Messages over 1 MiB close the socket (1009). ``end_utterance`` for a ``speak`` that got no
  audio is answered at once with ``playback_finished`` (position 0). ``cleared`` follows the
  ``playback_finished`` of every utterance the interrupt ended (waited for up to 1 s; an
  utterance whose end the engine did not report in that time is reported finished,
  interrupted, at the length of its audio). Playback messages while no socket is connected
  are dropped.
* **Ending.** ``DELETE`` (reason ``deleted``), ``max_duration_s`` (the request's, else
  ``[session] max_duration_s``; reason ``max_duration``), consent re-checks every
  ``[consent] recheck_interval_s`` and at expiry (``consent_revoked``, ``consent_suspended``,
  ``consent_expired`` or ``consent_unverifiable``), no audio socket for ``idle_timeout_s``
  (``idle_timeout``) — all not recoverable; an engine failure (``engine_failed``) and server
  shutdown (``server_shutdown``) are recoverable. The last 1024 ended sessions are kept as
  tombstones: ``DELETE`` of one answers 200 with the same :class:`SessionEnded`.
* **Metrics** are Prometheus text format 0.0.4, written by hand (no client library).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import logging
import math
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar

import numpy as np
from aiohttp import WSCloseCode, WSMsgType, web
from pydantic import SecretStr, ValidationError

from .. import __version__
from ..catalog import Avatar, Catalog
from ..config import KitConfig
from ..errors import (
    AvatarPreparationError,
    ConfigError,
    ConsentCheck,
    ConsentOutOfScope,
    ConsentRequired,
    ConsentViolation,
    MediaFormatError,
    SessionStateError,
)
from ..local_engine.engine import LipSyncEngine
from ..local_engine.engines import EngineChoice, build_engine, choose_engine
from ..local_engine.runner import SegmentEnd
from ..local_engine.stream import EngineStream, PlaybackStart, StreamEvent
from ..media import SUPPORTED_SAMPLE_RATES, AudioChunk
from .protocol import (
    API_PREFIX,
    ClearBuffer,
    Cleared,
    CreateSession,
    EndUtterance,
    ErrorMessage,
    Health,
    PlaybackFinishedMessage,
    PlaybackStartedMessage,
    SessionEnded,
    SessionEndedMessage,
    SessionInfo,
    Speak,
    client_message,
    quoted,
    validation_problem,
)

if TYPE_CHECKING:
    import httpx

    from ..consent import ConsentLapse, ConsentWatch
    from ..consent.enforce import ConsentGate
    from ..consent.status import StatusListSource
    from ..consent.store import ConsentStore
    from ..consent.tokens import VerifiedConsent
    from ..disclosure.metadata import DisclosureMetadata
    from ..transport.webrtc import AvatarBroadcast, ViewerConfig, WhepEndpoint

__all__ = ["LATENCY_BUCKETS", "PROVIDER", "EngineServer"]

logger = logging.getLogger("avatarkit.engine_server.server")

#: the provider name consent grants must allow for this server (``providers = ["local"]``)
PROVIDER = "local"
#: first-frame latency histogram buckets, seconds
LATENCY_BUCKETS: tuple[float, ...] = (0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
_TOMBSTONES = 1024
_MAX_AUDIO_MESSAGE = 1 << 20
_CLEAR_WAIT_S = 1.0
_WS_CLOSE_S = 2.0
_CREATE_DRAIN_S = 15.0
_REPLACED = 4000
_VIEWER_COOKIE = "avk_viewer"
_RETRY_AFTER = "5"

_T = TypeVar("_T")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _secret_matches(given: str | None, expected: str | None) -> bool:
    if given is None or expected is None:
        return False
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def _bearer(request: web.Request) -> str | None:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    value = value.strip()
    return value if scheme.lower() == "bearer" and value else None


def _error(status: int, type_: str, message: str, *,
           headers: Mapping[str, str] | None = None, **extra: Any) -> web.Response:
    body = {"error": {"type": type_, "message": message, **extra}}
    return web.json_response(body, status=status, headers=dict(headers or {}))


def _json(model: SessionInfo | SessionEnded | Health, status: int = 200) -> web.Response:
    return web.Response(text=model.model_dump_json(), status=status,
                        content_type="application/json")


def _label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


# -- the audio WebSocket --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Close:
    code: int
    reason: str


class _AudioSocket:
    """One audio WebSocket: messages go out in order through one pump task."""

    def __init__(self, ws: web.WebSocketResponse) -> None:
        self.ws = ws
        self._queue: asyncio.Queue[str | _Close] = asyncio.Queue()
        self._closing = False
        self.task = asyncio.get_running_loop().create_task(self._pump(),
                                                           name="avatarkit-serve-ws-out")

    def send(self, message: PlaybackStartedMessage | PlaybackFinishedMessage | Cleared
             | SessionEndedMessage | ErrorMessage) -> None:
        if not self._closing:
            self._queue.put_nowait(message.model_dump_json())

    def close(self, code: int, reason: str) -> None:
        """Send what is queued, then close the socket with ``code``."""
        if not self._closing:
            self._closing = True
            self._queue.put_nowait(_Close(code, reason))

    async def _pump(self) -> None:
        try:
            while True:
                item = await self._queue.get()
                if isinstance(item, _Close):
                    await self.ws.close(code=item.code, message=item.reason.encode("utf-8"))
                    return
                await self.ws.send_str(item)
        except (ConnectionError, RuntimeError) as exc:  # the peer went away
            logger.debug("audio socket send failed: %s", exc)

    async def finish(self) -> None:
        """Stop the pump (after the socket closed) and wait for it."""
        self.close(WSCloseCode.GOING_AWAY, "")
        try:
            async with asyncio.timeout(_WS_CLOSE_S):
                await asyncio.shield(self.task)
        except TimeoutError:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


# -- a session ------------------------------------------------------------------------------


@dataclass(eq=False)
class _Session:
    session_id: str
    info: SessionInfo
    avatar: Avatar
    purpose: str
    generation_id: str
    verified: VerifiedConsent
    notice: str
    stream: EngineStream
    broadcast: AvatarBroadcast
    viewer_token: str | None
    label: bool
    started: float = field(default_factory=time.monotonic)
    socket: _AudioSocket | None = None
    #: utterances with audio at the engine and no end reported yet -> samples pushed
    pending: dict[str, int] = field(default_factory=dict)
    #: the utterance named by the last ``speak`` (None when none is open)
    utterance: str | None = None
    spoken: set[str] = field(default_factory=set)
    ended_event: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    consent_watch: ConsentWatch | None = None
    timers: dict[str, asyncio.TimerHandle] = field(default_factory=dict)
    ending: asyncio.Task[SessionEnded] | None = None

    @property
    def sample_rate(self) -> int:
        return self.info.sample_rate

    def cancel_timer(self, name: str) -> None:
        handle = self.timers.pop(name, None)
        if handle is not None:
            handle.cancel()


# -- the server -----------------------------------------------------------------------------


class EngineServer:
    """The engine server: ``async with EngineServer(config) as server: ... server.url``.

    Args:
        config: the kit config: ``[consent]`` (required: no face is shown without verified
            consent), ``[avatars.NAME] local = "path"``, ``[disclosure]``, ``[session]``.
        host, port: where to listen (port 0 picks a free one). A host other than loopback
            needs ``api_key``.
        engine: ``auto``, ``lite`` or ``musetalk`` (:func:`~avatarkit.local_engine.engines.
            choose_engine`); ``weights`` the MuseTalk weights directory, ``musetalk`` the
            MuseTalk engine's options (device, precision, backend, batch size).
        api_key: the bearer key of every ``/v1`` route and ``/metrics``.
        max_sessions: sessions rendered at once; more are refused with 503.
        region: the region label consent grants are checked against (``regions = [...]``).
        cache_dir: where prepared avatars are cached.
        status_source, consent_store: as for :class:`~avatarkit.AvatarKit` (tests, embedding).
        idle_timeout_s: a session with no audio WebSocket for this long is ended.
        avatar_dir: the directory relative ``local`` paths are resolved against (default: the
            working directory). ``avatarkit serve`` passes the config file's directory.
    """

    def __init__(self, config: KitConfig, *, host: str = "127.0.0.1", port: int = 0,
                 engine: str = "auto", weights: str | None = None,
                 musetalk: Mapping[str, Any] | None = None,
                 api_key: SecretStr | str | None = None, max_sessions: int = 4,
                 region: str | None = None, cache_dir: str | None = None,
                 status_source: StatusListSource | None = None,
                 consent_store: ConsentStore | None = None,
                 idle_timeout_s: float = 300.0,
                 avatar_dir: str | os.PathLike[str] | None = None) -> None:
        key = api_key.get_secret_value() if isinstance(api_key, SecretStr) else api_key
        if key is not None and not key.strip():
            raise ConfigError("must not be empty", field="api_key")
        if key is None and not _is_loopback(host):
            raise ConfigError(f"a server listening on {host!r} (not loopback) needs an API key "
                              "(--api-key env:VAR)", field="api_key")
        if config.consent is None:
            raise ConfigError(
                "the engine server needs a [consent] section naming the trusted consent "
                "issuers (audience, issuers, jwks): it shows faces only under verified "
                "consent", field="consent")
        if isinstance(max_sessions, bool) or not isinstance(max_sessions, int) or \
                max_sessions < 1:
            raise ConfigError(f"got {max_sessions!r}; expected an integer >= 1",
                              field="max_sessions")
        if not (isinstance(idle_timeout_s, int | float) and idle_timeout_s > 0):
            raise ConfigError(f"got {idle_timeout_s!r}; expected a positive number of seconds",
                              field="idle_timeout_s")
        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
            raise ConfigError(f"got {port!r}; expected 0..65535", field="port")
        self.config = config
        self.choice: EngineChoice = choose_engine(engine, weights=weights)
        self.host = host
        self.port = port
        self.max_sessions = max_sessions
        self.region = region
        self.idle_timeout_s = float(idle_timeout_s)
        self._key: str | None = key
        self._weights = weights
        self._musetalk = dict(musetalk or {})
        self._cache_dir = cache_dir
        self._avatar_dir = Path(avatar_dir) if avatar_dir is not None else None
        self._status_source = status_source
        self._consent_store = consent_store
        self.catalog = Catalog.from_config(config.avatars)
        from ..disclosure.notice import load_notice_key

        self._notice_key = load_notice_key(
            config.disclosure.notice_key,
            generated_note="server; viewers get its public key with the notice")
        self._gate: ConsentGate | None = None
        self._http: httpx.AsyncClient | None = None
        self._whep: WhepEndpoint | None = None
        self._runner: web.AppRunner | None = None
        self._url: str | None = None
        self._state = "new"
        self._live: dict[str, _Session] = {}
        self._ended: OrderedDict[str, SessionEnded] = OrderedDict()
        self._by_key: dict[str, asyncio.Future[_Session | None]] = {}
        self._creating = 0
        self._creates_done = asyncio.Event()
        self._creates_done.set()
        self._tasks: set[asyncio.Task[Any]] = set()
        # metrics
        self._started_total = 0
        self._refused: dict[str, int] = {}
        self._ended_frames = 0
        self._latency_buckets = [0] * len(LATENCY_BUCKETS)
        self._latency_sum = 0.0
        self._latency_count = 0

    def __repr__(self) -> str:
        where = self._url or f"{self.host}:{self.port}"
        return (f"<EngineServer {where} engine={self.choice.name} sessions={self.sessions}/"
                f"{self.max_sessions} api_key={'set' if self._key else None}>")

    # -- properties -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:8080`` (once started)."""
        if self._url is None:
            raise SessionStateError("the engine server is not running; use start() or "
                                    "async with")
        return self._url

    @property
    def requires_key(self) -> bool:
        """Whether clients must send the API key."""
        return self._key is not None

    @property
    def sessions(self) -> int:
        """Sessions rendering now."""
        return len(self._live)

    def disclosure_jwks(self) -> dict[str, Any]:
        """The public key set viewers verify this server's disclosure notices with."""
        from ..consent.keys import KeySet

        return KeySet.of(self._notice_key).to_jwks()

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        if self._state != "new":
            raise SessionStateError("an EngineServer can only be started once")
        self._state = "running"
        from ..consent.enforce import ConsentGate
        from ..transport.webrtc import WhepEndpoint, add_viewer_routes
        from ..vendor_http import new_http_client

        assert self.config.consent is not None
        try:
            self._http = new_http_client()
            self._gate = ConsentGate.from_config(self.config.consent, http=self._http,
                                                 status_source=self._status_source,
                                                 store=self._consent_store)
            app = web.Application(middlewares=[self._auth_middleware],
                                  client_max_size=1 << 20)
            app.router.add_get("/health", self._health)
            app.router.add_get("/metrics", self._metrics)
            app.router.add_post(f"{API_PREFIX}/sessions", self._create)
            app.router.add_get(f"{API_PREFIX}/sessions", self._list)
            app.router.add_get(f"{API_PREFIX}/sessions/{{session_id}}", self._get)
            app.router.add_delete(f"{API_PREFIX}/sessions/{{session_id}}", self._delete)
            app.router.add_get(f"{API_PREFIX}/sessions/{{session_id}}/audio", self._audio)
            self._whep = WhepEndpoint(self._resolve_broadcast,
                                      authorize=self._authorize_viewer if self._key else None)
            self._whep.add_routes(app, prefix="/whep")
            add_viewer_routes(app, self._viewer_config, prefix="/viewer")
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
            await runner.setup()
            self._runner = runner
            await web.TCPSite(runner, self.host, self.port).start()
        except BaseException:
            await self.aclose()
            raise
        port = runner.addresses[0][1]
        host = f"[{self.host}]" if ":" in self.host else self.host
        self._url = f"http://{host}:{port}"
        logger.info("engine server on %s (%s engine: %s)", self._url, self.choice.name,
                    self.choice.reason)

    async def aclose(self) -> None:
        """End every session (viewers, audio sockets told), stop serving. Idempotent."""
        if self._state == "closed":
            return
        self._state = "closed"
        # creates in flight see the state and start nothing; wait for them to notice
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_CREATE_DRAIN_S):
                await self._creates_done.wait()
        endings = [self._end_soon(s, "server_shutdown", recoverable=True)
                   for s in list(self._live.values())]
        if endings:
            await asyncio.gather(*endings, return_exceptions=True)
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if self._whep is not None:
            await self._whep.aclose()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._gate is not None:
            await self._gate.aclose()
        if self._http is not None:
            await self._http.aclose()
        self._url = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    def _spawn(self, coro: Coroutine[Any, Any, _T], name: str) -> asyncio.Task[_T]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- auth -------------------------------------------------------------------------------

    @web.middleware
    async def _auth_middleware(
            self, request: web.Request,
            handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        path = request.path
        if self._key is None or path == "/health" or path.startswith("/whep/"):
            return await handler(request)
        if path == API_PREFIX or path.startswith(API_PREFIX + "/") or path == "/metrics":
            if not _secret_matches(_bearer(request), self._key):
                return _error(401, "unauthorized", "a valid API key is required "
                              "(Authorization: Bearer <key>)",
                              headers={"WWW-Authenticate": 'Bearer realm="avatarkit"'})
            return await handler(request)
        if path.startswith("/viewer/"):
            return await self._viewer_guard(request, handler)
        return await handler(request)

    async def _viewer_guard(
            self, request: web.Request,
            handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        """The viewer page and its config.json: the key, the viewer token (bearer or
        ``?token=``), or the cookie a page load with the token set."""
        parts = request.path.split("/")
        session = self._live.get(parts[2]) if len(parts) > 2 else None
        if session is None:
            return await handler(request)  # 404 from the route
        expected = session.viewer_token
        query = request.query.get("token")
        allowed = (_secret_matches(_bearer(request), self._key)
                   or _secret_matches(_bearer(request), expected)
                   or _secret_matches(query, expected)
                   or _secret_matches(request.cookies.get(_VIEWER_COOKIE), expected))
        if not allowed:
            return _error(401, "unauthorized", "this viewer needs its token (the viewer_url "
                          "of the session, with ?token=)")
        response = await handler(request)
        if _secret_matches(query, expected) and expected is not None:
            remaining = self._remaining_s(session)
            response.set_cookie(_VIEWER_COOKIE, expected, path=f"/viewer/{session.session_id}",
                                httponly=True, samesite="Strict",
                                max_age=max(1, int(remaining)))
        return response

    def _authorize_viewer(self, stream_id: str, token: str | None) -> bool:
        if _secret_matches(token, self._key):
            return True
        session = self._live.get(stream_id)
        if session is None:
            # an ended session has nothing left to protect: WHEP answers 404 for it
            return stream_id in self._ended
        return _secret_matches(token, session.viewer_token)

    def _resolve_broadcast(self, stream_id: str) -> AvatarBroadcast | None:
        session = self._live.get(stream_id)
        return session.broadcast if session is not None and session.ending is None else None

    def _viewer_config(self, stream_id: str) -> ViewerConfig | None:
        from ..transport.webrtc import ViewerConfig

        session = self._live.get(stream_id)
        if session is None or session.ending is not None:
            return None
        return ViewerConfig(whep_url=session.info.whep_url,
                            disclosure_notice=session.notice,
                            jwks=self.disclosure_jwks(), token=session.viewer_token)

    def _remaining_s(self, session: _Session) -> float:
        handle = session.timers.get("max_duration")
        if handle is None:
            return 60.0
        return max(1.0, handle.when() - asyncio.get_running_loop().time())

    # -- health and metrics -----------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        return _json(Health(engine=self.choice.name, sessions=self.sessions,
                            max_sessions=self.max_sessions, version=__version__))

    def _refuse(self, reason: str) -> None:
        self._refused[reason] = self._refused.get(reason, 0) + 1

    def _observe_latency(self, seconds: float) -> None:
        self._latency_sum += seconds
        self._latency_count += 1
        for i, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                self._latency_buckets[i] += 1

    def metrics_text(self) -> str:
        """The Prometheus text exposition ``GET /metrics`` serves."""
        lines: list[str] = []

        def family(name: str, kind: str, help_: str) -> None:
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} {kind}")

        family("avatarkit_sessions_active", "gauge", "Sessions rendering now.")
        lines.append(f"avatarkit_sessions_active {self.sessions}")
        family("avatarkit_sessions_max", "gauge", "Sessions this server renders at once.")
        lines.append(f"avatarkit_sessions_max {self.max_sessions}")
        family("avatarkit_sessions_started_total", "counter", "Sessions started.")
        lines.append(f"avatarkit_sessions_started_total {self._started_total}")
        family("avatarkit_sessions_refused_total", "counter",
               "Session creates refused, by reason.")
        for reason, count in sorted(self._refused.items()):
            lines.append(f'avatarkit_sessions_refused_total{{reason="{_label_value(reason)}"}} '
                         f"{count}")
        frames = self._ended_frames + sum(s.stream.frames_released for s in self._live.values())
        family("avatarkit_frames_total", "counter", "Video frames released by the engines.")
        lines.append(f"avatarkit_frames_total {frames}")
        family("avatarkit_stream_fps", "gauge",
               "Frames per second each live session's engine stream releases.")
        for session in self._live.values():
            fps = session.stream.fps
            if fps is not None:
                lines.append(f'avatarkit_stream_fps{{session="'
                             f'{_label_value(session.session_id)}"}} {fps:.3f}')
        name = "avatarkit_first_frame_latency_seconds"
        family(name, "histogram", "Seconds from an utterance's first audio to its first frame.")
        for bound, count in zip(LATENCY_BUCKETS, self._latency_buckets, strict=True):
            lines.append(f'{name}_bucket{{le="{_number(bound)}"}} {count}')
        lines.append(f'{name}_bucket{{le="+Inf"}} {self._latency_count}')
        lines.append(f"{name}_sum {self._latency_sum!r}")
        lines.append(f"{name}_count {self._latency_count}")
        return "\n".join(lines) + "\n"

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=self.metrics_text(),
                            headers={"Content-Type": "text/plain; version=0.0.4; "
                                                     "charset=utf-8"})

    # -- create -----------------------------------------------------------------------------

    def _invalid(self, field_: str, expected: str, message: str) -> web.Response:
        self._refuse("invalid_request")
        return _error(400, "invalid_request", message, field=field_, expected=expected)

    async def _create(self, request: web.Request) -> web.Response:
        if self._state != "running":
            self._refuse("shutting_down")
            return _error(503, "shutting_down", "the server is shutting down",
                          headers={"Retry-After": _RETRY_AFTER})
        # pydantic's own JSON parser: bounded nesting (a deeply nested body is a 400, where
        # json.loads would raise RecursionError), strict UTF-8, and one pass to the model
        try:
            body = CreateSession.model_validate_json(await request.read())
        except ValidationError as exc:
            where, what = validation_problem(exc)
            if not where:
                return self._invalid("body", "a JSON object (CreateSession)",
                                     f"the body is not a JSON object: {what}")
            return self._invalid(where, what, f"{where}: {what}")
        if body.sample_rate not in SUPPORTED_SAMPLE_RATES:
            rates = ", ".join(str(r) for r in sorted(SUPPORTED_SAMPLE_RATES))
            return self._invalid("sample_rate", f"one of {rates}",
                                 f"sample_rate {body.sample_rate} Hz is not supported")
        if body.idempotency_key is not None:
            found = await self._by_idempotency(body)
            if found is not None:
                return found
        try:
            avatar = self.catalog.get(body.avatar)
        except ConfigError:
            self._refuse("unknown_avatar")
            return _error(404, "not_found", f"unknown avatar {quoted(body.avatar)}",
                          field="avatar")
        if avatar.local is None:
            self._refuse("unknown_avatar")
            return _error(404, "not_found", f"avatar {quoted(body.avatar)} has no media at this "
                          "server ([avatars.NAME] local = \"path\")", field="avatar")
        if len(self._live) + self._creating >= self.max_sessions:
            self._refuse("capacity")
            return _error(503, "at_capacity", f"the server renders {self.max_sessions} "
                          "sessions at once; try again later",
                          headers={"Retry-After": _RETRY_AFTER})
        future: asyncio.Future[_Session | None] | None = None
        if body.idempotency_key is not None:
            future = asyncio.get_running_loop().create_future()
            self._by_key[body.idempotency_key] = future
        self._creating += 1
        self._creates_done.clear()
        started: _Session | None = None
        try:
            outcome = await self._start_session(body, avatar)
            started = outcome if isinstance(outcome, _Session) else None
        finally:
            self._creating -= 1
            if self._creating == 0:
                self._creates_done.set()
            if future is not None:
                assert body.idempotency_key is not None
                if self._by_key.get(body.idempotency_key) is future:
                    del self._by_key[body.idempotency_key]
                future.set_result(started)
        if isinstance(outcome, _Session):
            return _json(outcome.info, status=201)
        return outcome

    async def _by_idempotency(self, body: CreateSession) -> web.Response | None:
        key = body.idempotency_key
        session = next((s for s in self._live.values()
                        if s.info.idempotency_key == key and s.ending is None), None)
        if session is None and key in self._by_key:
            # the same create is in flight: its outcome (None: it failed, so try again)
            session = await asyncio.shield(self._by_key[key])
        if session is None:
            return None
        if session.avatar.name != body.avatar or session.purpose != body.purpose:
            self._refuse("idempotency_conflict")
            return _error(409, "idempotency_conflict", "this idempotency_key names a session "
                          "of another avatar or purpose", field="idempotency_key")
        presented = hashlib.sha256(body.consent_token.get_secret_value().encode()).hexdigest()
        if not hmac.compare_digest(presented, session.verified.token_sha256):
            # a retry carries the same token; another token must be verified on its own, and
            # must not ride on (or learn of) a session started under someone else's consent
            self._refuse("idempotency_conflict")
            return _error(409, "idempotency_conflict", "this idempotency_key names a session "
                          "started under another consent token", field="consent_token")
        return _json(session.info, status=200)

    async def _start_session(self, body: CreateSession,
                             avatar: Avatar) -> _Session | web.Response:
        gate = self._gate
        assert gate is not None
        generation_id = body.disclosure.generation_id
        token = body.consent_token.get_secret_value()
        if not token.strip():
            self._refuse("consent")
            return self._consent_refusal(ConsentRequired(
                "a session needs the consent token of the person the avatar shows",
                check=ConsentCheck.MISSING))
        try:
            verified = await gate.admit(token, avatar=avatar, purpose=body.purpose,
                                        generation_id=generation_id)
        except ConsentViolation as exc:
            self._refuse("consent")
            return self._consent_refusal(exc)
        try:
            verified.check_route(PROVIDER, self.region)
        except ConsentOutOfScope as exc:
            from ..consent.store import GenerationRecord

            await gate.log(GenerationRecord(
                generation_id=generation_id, kind="consent_refused",
                consent_id=verified.consent_id, token_sha256=verified.token_sha256,
                status_check=str(exc.check), purpose=body.purpose, channel="live",
                provider=PROVIDER, avatar=avatar.name,
                details={"error": type(exc).__name__}))
            self._refuse("consent")
            return self._consent_refusal(exc)
        path = self._media_path(avatar)
        try:
            engine = await asyncio.to_thread(
                build_engine, self.choice.name, path, sample_rate=body.sample_rate,
                cache_dir=self._cache_dir, weights=self._weights, musetalk=self._musetalk)
        except AvatarPreparationError as exc:
            self._refuse("avatar_unusable")
            return _error(422, type(exc).__name__, str(exc), field="avatar")
        except (ConfigError, MediaFormatError) as exc:
            self._refuse("engine")
            return _error(500, type(exc).__name__, str(exc))
        if self._state != "running":
            self._refuse("shutting_down")
            return _error(503, "shutting_down", "the server is shutting down",
                          headers={"Retry-After": _RETRY_AFTER})
        return await self._open(body, avatar, verified, engine)

    def _consent_refusal(self, exc: ConsentViolation) -> web.Response:
        return _error(403, type(exc).__name__, str(exc), check=str(exc.check),
                      consent_id=exc.consent_id)

    def _media_path(self, avatar: Avatar) -> Path:
        assert avatar.local is not None
        path = Path(avatar.local).expanduser()
        if not path.is_absolute() and self._avatar_dir is not None:
            path = self._avatar_dir / path
        return path

    async def _open(self, body: CreateSession, avatar: Avatar, verified: VerifiedConsent,
                    engine: LipSyncEngine) -> _Session | web.Response:
        from ..disclosure.notice import sign_disclosure_notice
        from ..disclosure.stamp import DisclosureStamp
        from ..disclosure.watermark import payload_for
        from ..transport.webrtc import AvatarBroadcast

        label_config = self.config.disclosure.burned_label
        labelled = label_config.enabled
        metadata: DisclosureMetadata = body.disclosure.model_copy(update={
            "label_policy": "burned-in" if labelled else "disabled",
            "model": self.choice.name,
            "consent_id": verified.consent_id,
            "consent_token_sha256": verified.token_sha256,
        })
        notice = sign_disclosure_notice(metadata, self._notice_key)
        session_id = "ses_" + secrets.token_hex(16)
        viewer_token = secrets.token_urlsafe(24) if self._key is not None else None
        viewer_url = f"/viewer/{session_id}"
        if viewer_token is not None:
            viewer_url += f"?token={viewer_token}"
        holder: list[_Session] = []

        def on_event(event: StreamEvent) -> None:
            if holder:
                self._on_stream_event(holder[0], event)

        stamp = DisclosureStamp.for_disclosure(metadata, label=label_config)
        stream = EngineStream(engine, post=stamp, realtime=True, on_event=on_event,
                              batch_size=engine.preferred_batch_size)
        broadcast = AvatarBroadcast(fps=engine.fps, sample_rate=engine.sample_rate,
                                    width=engine.width, height=engine.height)
        try:
            stream.add_sink(broadcast.publish)
            info = SessionInfo(
                session_id=session_id, avatar=avatar.name, engine=self.choice.name,
                width=engine.width, height=engine.height, fps=engine.fps,
                sample_rate=body.sample_rate,
                audio_url=f"{API_PREFIX}/sessions/{session_id}/audio",
                whep_url=f"/whep/{session_id}", viewer_url=viewer_url,
                viewer_token=viewer_token, idempotency_key=body.idempotency_key,
                region=self.region, created_at=datetime.now(UTC),
                consent_id=verified.consent_id)
            session = _Session(session_id=session_id, info=info, avatar=avatar,
                               purpose=body.purpose, generation_id=metadata.generation_id,
                               verified=verified, notice=notice, stream=stream,
                               broadcast=broadcast, viewer_token=viewer_token, label=labelled)
            holder.append(session)
            stream.start()
        except BaseException:
            await asyncio.shield(self._close_media(stream, broadcast))
            raise
        self._live[session_id] = session
        self._started_total += 1
        loop = asyncio.get_running_loop()
        max_duration = body.max_duration_s or self.config.session.max_duration_s
        session.timers["max_duration"] = loop.call_later(
            max_duration, self._end_soon, session, "max_duration", False)
        self._arm_idle(session)
        session.consent_watch = self._watch_consent(session)
        session.tasks.append(loop.create_task(self._watch_engine(session),
                                              name=f"avatarkit-serve-engine-{session_id}"))
        await self._log(session, "session_started", status_check="valid",
                        watermark_payload=payload_for(session.generation_id).hex(),
                        details={"engine": self.choice.name, "session_id": session_id,
                                 "max_duration_s": max_duration})
        if not labelled:
            await self._log(session, "label_disabled")
        logger.info("session %s started: avatar %s, %s engine %dx%d at %g fps, consent %s",
                    session_id, avatar.name, self.choice.name, engine.width, engine.height,
                    engine.fps, verified.consent_id)
        return session

    async def _close_media(self, stream: EngineStream, broadcast: AvatarBroadcast) -> None:
        await broadcast.aclose()
        await stream.aclose()

    async def _log(self, session: _Session, kind: str, **fields: Any) -> None:
        from ..consent.store import GenerationRecord

        assert self._gate is not None
        try:
            record = GenerationRecord.model_validate({
                "generation_id": session.generation_id, "kind": kind,
                "consent_id": session.verified.consent_id,
                "token_sha256": session.verified.token_sha256,
                "purpose": session.purpose, "channel": "live", "provider": PROVIDER,
                "avatar": session.avatar.name, "label": session.label, **fields})
        except ValidationError:
            logger.exception("session %s: could not build the %s log record",
                             session.session_id, kind)
            return
        await self._gate.log(record)

    # -- session lookups --------------------------------------------------------------------

    async def _list(self, request: web.Request) -> web.Response:
        key = request.query.get("idempotency_key")
        infos = [s.info.model_dump(mode="json") for s in self._live.values()
                 if s.ending is None and (key is None or s.info.idempotency_key == key)]
        return web.json_response({"sessions": infos})

    async def _get(self, request: web.Request) -> web.Response:
        session_id = request.match_info["session_id"]
        session = self._live.get(session_id)
        if session is not None and session.ending is None:
            return _json(session.info)
        ended = self._ended.get(session_id)
        if ended is None and session is not None and session.ending is not None:
            ended = await asyncio.shield(session.ending)
        if ended is not None:
            return _error(410, "session_ended", f"session {session_id} ended ({ended.reason})",
                          reason=ended.reason, duration_s=ended.duration_s)
        return _error(404, "not_found", f"no session {quoted(session_id)}")

    async def _delete(self, request: web.Request) -> web.Response:
        session_id = request.match_info["session_id"]
        session = self._live.get(session_id)
        if session is not None:
            ended = await asyncio.shield(self._end_soon(session, "deleted", recoverable=False))
            return _json(ended)
        tombstone = self._ended.get(session_id)
        if tombstone is not None:
            return _json(tombstone)
        return _error(404, "not_found", f"no session {quoted(session_id)}")

    # -- ending -----------------------------------------------------------------------------

    def _end_soon(self, session: _Session, reason: str,
                  recoverable: bool) -> asyncio.Task[SessionEnded]:
        """End ``session`` from a task of its own (idempotent: the first reason wins)."""
        if session.ending is None:
            session.ending = self._spawn(self._finish(session, reason, recoverable),
                                         name=f"avatarkit-serve-end-{session.session_id}")
        return session.ending

    async def _finish(self, session: _Session, reason: str,
                      recoverable: bool) -> SessionEnded:
        duration = time.monotonic() - session.started
        ended = SessionEnded(session_id=session.session_id, reason=reason,
                             duration_s=round(duration, 3))
        for name in list(session.timers):
            session.cancel_timer(name)
        if session.consent_watch is not None:
            await session.consent_watch.aclose()
        current = asyncio.current_task()
        tasks = [t for t in session.tasks if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        socket = session.socket
        if socket is not None:
            socket.send(SessionEndedMessage(reason=reason, recoverable=recoverable))
            socket.close(WSCloseCode.OK, "session ended")
        if self._whep is not None:
            await self._whep.end_stream(session.session_id)
        frames = session.stream.frames_released
        await self._close_media(session.stream, session.broadcast)
        if socket is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_WS_CLOSE_S):
                    await asyncio.shield(socket.task)
        self._live.pop(session.session_id, None)
        self._ended_frames += frames
        self._ended[session.session_id] = ended
        while len(self._ended) > _TOMBSTONES:
            self._ended.popitem(last=False)
        await self._log(session, "session_ended", details={
            "reason": reason, "recoverable": recoverable, "duration_s": ended.duration_s,
            "frames": frames, "session_id": session.session_id})
        logger.info("session %s ended: %s after %.1f s", session.session_id, reason, duration)
        return ended

    def _arm_idle(self, session: _Session) -> None:
        session.cancel_timer("idle")
        if session.ending is None:
            session.timers["idle"] = asyncio.get_running_loop().call_later(
                self.idle_timeout_s, self._end_soon, session, "idle_timeout", False)

    def _watch_consent(self, session: _Session) -> ConsentWatch:
        """Re-check the consent every ``recheck_interval_s`` and at its expiry (the one
        :class:`~avatarkit.consent.ConsentWatch`); a consent that no longer holds ends the
        session, with a ``ConsentEndReason`` as the reason (fail closed)."""
        from ..consent import ConsentWatch

        assert self._gate is not None

        async def log_check(status_check: str) -> None:
            await self._log(session, "status_check", status_check=status_check)

        def lapsed(lapse: ConsentLapse) -> None:
            logger.warning("session %s: consent no longer holds (%s); ending",
                           session.session_id, lapse.error.check)
            self._end_soon(session, lapse.reason, recoverable=False)

        return ConsentWatch(self._gate, session.verified, on_lapse=lapsed, on_check=log_check,
                            name=f"avatarkit-serve-consent-{session.session_id}").start()

    async def _watch_engine(self, session: _Session) -> None:
        try:
            await session.stream.wait_finished()
        except Exception as exc:
            logger.error("session %s: the engine failed (%s); ending", session.session_id,
                         type(exc).__name__)
            self._end_soon(session, "engine_failed", recoverable=True)
            return
        if session.ending is None:
            self._end_soon(session, "engine_stopped", recoverable=True)

    # -- engine events ----------------------------------------------------------------------

    def _on_stream_event(self, session: _Session, event: StreamEvent) -> None:
        if isinstance(event, PlaybackStart):
            self._observe_latency(event.latency)
            self._send(session, PlaybackStartedMessage(utterance_id=event.utterance_id,
                                                       latency_s=event.latency))
        elif isinstance(event, SegmentEnd):
            if session.pending.pop(event.segment_id, None) is None:
                return  # already reported (cleared and given up on)
            self._send(session, PlaybackFinishedMessage(
                utterance_id=event.segment_id, position_s=event.position,
                interrupted=event.interrupted))
            session.ended_event.set()

    def _send(self, session: _Session,
              message: PlaybackStartedMessage | PlaybackFinishedMessage | Cleared
              | ErrorMessage) -> None:
        if session.socket is not None:
            session.socket.send(message)

    # -- the audio WebSocket ----------------------------------------------------------------

    async def _audio(self, request: web.Request) -> web.StreamResponse:
        session_id = request.match_info["session_id"]
        session = self._live.get(session_id)
        tombstone = self._ended.get(session_id)
        if session is None and tombstone is None:
            return _error(404, "not_found", f"no session {quoted(session_id)}")
        ws = web.WebSocketResponse(max_msg_size=_MAX_AUDIO_MESSAGE, timeout=_WS_CLOSE_S,
                                   heartbeat=30.0)
        await ws.prepare(request)
        if session is None or session.ending is not None:
            if session is not None and session.ending is not None:
                tombstone = await asyncio.shield(session.ending)
            assert tombstone is not None
            await ws.send_str(SessionEndedMessage(reason=tombstone.reason,
                                                  recoverable=False).model_dump_json())
            await ws.close(code=WSCloseCode.OK, message=b"session ended")
            return ws
        socket = _AudioSocket(ws)
        previous = session.socket
        session.socket = socket
        session.cancel_timer("idle")
        if previous is not None:
            logger.info("session %s: a new audio socket replaces the previous one", session_id)
            previous.close(_REPLACED, "replaced by a newer audio connection")
        try:
            async for message in ws:
                if session.ending is not None:
                    break
                if message.type == WSMsgType.TEXT:
                    await self._on_text(session, socket, message.data)
                elif message.type == WSMsgType.BINARY:
                    await self._on_audio(session, socket, message.data)
                elif message.type == WSMsgType.ERROR:
                    break
        finally:
            if session.socket is socket:
                session.socket = None
                if session.ending is None and self._state == "running":
                    self._arm_idle(session)
            await socket.finish()
        return ws

    async def _on_text(self, session: _Session, socket: _AudioSocket, text: str) -> None:
        try:
            message = client_message(text)
        except ValidationError as exc:
            where, what = validation_problem(exc)
            socket.send(ErrorMessage(message=f"unknown or malformed message "
                                             f"({where or 'message'}: {what}); expected speak, "
                                             "end_utterance or clear_buffer"))
            return
        try:
            if isinstance(message, Speak):
                if session.utterance is not None and session.utterance != message.utterance_id:
                    self._end_utterance(session, socket)
                session.utterance = message.utterance_id
            elif isinstance(message, EndUtterance):
                self._end_utterance(session, socket)
            elif isinstance(message, ClearBuffer):
                await self._clear(session, socket)
        except SessionStateError as exc:
            if session.ending is None:
                socket.send(ErrorMessage(message=str(exc)))

    def _end_utterance(self, session: _Session, socket: _AudioSocket) -> None:
        utterance, session.utterance = session.utterance, None
        ended = session.stream.end_utterance()
        if ended is None and utterance is not None and utterance not in session.spoken:
            # a speak with no audio: that utterance is over at once
            socket.send(PlaybackFinishedMessage(utterance_id=utterance, position_s=0.0,
                                                interrupted=False))

    async def _clear(self, session: _Session, socket: _AudioSocket) -> None:
        before = set(session.pending)
        session.utterance = None
        position = session.stream.clear_buffer()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _CLEAR_WAIT_S
        while before & session.pending.keys() and loop.time() < deadline:
            session.ended_event.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(deadline - loop.time()):
                    await session.ended_event.wait()
        for utterance in sorted(before & session.pending.keys()):
            # no end came within the wait (the engine stream stopped): report it here, so
            # the client's interrupt is always acknowledged
            played = session.pending.pop(utterance) / session.sample_rate
            position = position or played
            socket.send(PlaybackFinishedMessage(utterance_id=utterance, position_s=played,
                                                interrupted=True))
        socket.send(Cleared(position_s=position))

    async def _on_audio(self, session: _Session, socket: _AudioSocket, data: bytes) -> None:
        if len(data) % 2:
            socket.send(ErrorMessage(message=f"a binary frame of {len(data)} bytes is not "
                                             "PCM16: expected an even number of bytes "
                                             "(16-bit little-endian mono samples)"))
            return
        if not data:
            return
        try:
            samples = np.frombuffer(data, dtype="<i2").astype(np.int16)
            chunk = AudioChunk(samples, session.sample_rate)
            utterance = await session.stream.push_audio(chunk, utterance_id=session.utterance)
        except (MediaFormatError, SessionStateError) as exc:
            if session.ending is None:
                socket.send(ErrorMessage(message=str(exc)))
            return
        session.utterance = utterance
        session.spoken.add(utterance)
        session.pending[utterance] = session.pending.get(utterance, 0) + len(samples)
