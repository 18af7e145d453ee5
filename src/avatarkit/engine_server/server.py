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

Why one module: these are the routes of one aiohttp application and the lifecycle of its
sessions (create, idempotency, consent, the tombstones, ending for each reason), which share
the server's session table. The session record and audio socket, the metrics and the HTTP
helpers are in ``audio``, ``metrics`` and ``responses``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar

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
from ..media import SUPPORTED_SAMPLE_RATES
from .audio import WS_CLOSE_S, AudioSocket, ServedSession, on_audio, on_text
from .metrics import LATENCY_BUCKETS, ServerMetrics
from .protocol import (
    API_PREFIX,
    Cleared,
    CreateSession,
    ErrorMessage,
    Health,
    PlaybackFinishedMessage,
    PlaybackStartedMessage,
    SessionEnded,
    SessionEndedMessage,
    SessionInfo,
    quoted,
    validation_problem,
)
from .responses import bearer_token, error_response, is_loopback, json_response, secret_matches

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
_TOMBSTONES = 1024
_MAX_AUDIO_MESSAGE = 1 << 20
_CREATE_DRAIN_S = 15.0
_REPLACED = 4000
_VIEWER_COOKIE = "avk_viewer"
_RETRY_AFTER = "5"

_T = TypeVar("_T")


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
        if key is None and not is_loopback(host):
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
        self._live: dict[str, ServedSession] = {}
        self._ended: OrderedDict[str, SessionEnded] = OrderedDict()
        self._by_key: dict[str, asyncio.Future[ServedSession | None]] = {}
        self._creating = 0
        self._creates_done = asyncio.Event()
        self._creates_done.set()
        self._tasks: set[asyncio.Task[Any]] = set()
        # metrics
        self._metrics = ServerMetrics()

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
            app.router.add_get("/metrics", self._serve_metrics)
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
            if not secret_matches(bearer_token(request), self._key):
                return error_response(401, "unauthorized", "a valid API key is required "
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
        allowed = (secret_matches(bearer_token(request), self._key)
                   or secret_matches(bearer_token(request), expected)
                   or secret_matches(query, expected)
                   or secret_matches(request.cookies.get(_VIEWER_COOKIE), expected))
        if not allowed:
            return error_response(
                401, "unauthorized", "this viewer needs its token (the viewer_url "
                "of the session, with ?token=)")
        response = await handler(request)
        if secret_matches(query, expected) and expected is not None:
            remaining = self._remaining_s(session)
            response.set_cookie(_VIEWER_COOKIE, expected, path=f"/viewer/{session.session_id}",
                                httponly=True, samesite="Strict",
                                max_age=max(1, int(remaining)))
        return response

    def _authorize_viewer(self, stream_id: str, token: str | None) -> bool:
        if secret_matches(token, self._key):
            return True
        session = self._live.get(stream_id)
        if session is None:
            # an ended session has nothing left to protect: WHEP answers 404 for it
            return stream_id in self._ended
        return secret_matches(token, session.viewer_token)

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

    def _remaining_s(self, session: ServedSession) -> float:
        handle = session.timers.get("max_duration")
        if handle is None:
            return 60.0
        return max(1.0, handle.when() - asyncio.get_running_loop().time())

    # -- health and metrics -----------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        return json_response(Health(engine=self.choice.name, sessions=self.sessions,
                            max_sessions=self.max_sessions, version=__version__))

    def metrics_text(self) -> str:
        """The Prometheus text exposition ``GET /metrics`` serves."""
        return self._metrics.text(
            sessions=self.sessions, max_sessions=self.max_sessions,
            live=((s.session_id, s.stream) for s in self._live.values()))

    async def _serve_metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=self.metrics_text(),
                            headers={"Content-Type": "text/plain; version=0.0.4; "
                                                     "charset=utf-8"})

    # -- create -----------------------------------------------------------------------------

    def _invalid(self, field_: str, expected: str, message: str) -> web.Response:
        self._metrics.refuse("invalid_request")
        return error_response(400, "invalid_request", message, field=field_, expected=expected)

    async def _create(self, request: web.Request) -> web.Response:
        if self._state != "running":
            self._metrics.refuse("shutting_down")
            return error_response(503, "shutting_down", "the server is shutting down",
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
            self._metrics.refuse("unknown_avatar")
            return error_response(404, "not_found", f"unknown avatar {quoted(body.avatar)}",
                                  field="avatar")
        if avatar.local is None:
            self._metrics.refuse("unknown_avatar")
            return error_response(
                404, "not_found", f"avatar {quoted(body.avatar)} has no media at this "
                "server ([avatars.NAME] local = \"path\")", field="avatar")
        if len(self._live) + self._creating >= self.max_sessions:
            self._metrics.refuse("capacity")
            return error_response(503, "at_capacity", f"the server renders {self.max_sessions} "
                                  "sessions at once; try again later",
                                  headers={"Retry-After": _RETRY_AFTER})
        future: asyncio.Future[ServedSession | None] | None = None
        if body.idempotency_key is not None:
            future = asyncio.get_running_loop().create_future()
            self._by_key[body.idempotency_key] = future
        self._creating += 1
        self._creates_done.clear()
        started: ServedSession | None = None
        try:
            outcome = await self._start_session(body, avatar)
            started = outcome if isinstance(outcome, ServedSession) else None
        finally:
            self._creating -= 1
            if self._creating == 0:
                self._creates_done.set()
            if future is not None:
                assert body.idempotency_key is not None
                if self._by_key.get(body.idempotency_key) is future:
                    del self._by_key[body.idempotency_key]
                future.set_result(started)
        if isinstance(outcome, ServedSession):
            return json_response(outcome.info, status=201)
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
            self._metrics.refuse("idempotency_conflict")
            return error_response(
                409, "idempotency_conflict", "this idempotency_key names a session "
                "of another avatar or purpose", field="idempotency_key")
        presented = hashlib.sha256(body.consent_token.get_secret_value().encode()).hexdigest()
        if not hmac.compare_digest(presented, session.verified.token_sha256):
            # a retry carries the same token; another token must be verified on its own, and
            # must not ride on (or learn of) a session started under someone else's consent
            self._metrics.refuse("idempotency_conflict")
            return error_response(
                409, "idempotency_conflict", "this idempotency_key names a session "
                "started under another consent token", field="consent_token")
        return json_response(session.info, status=200)

    async def _start_session(self, body: CreateSession,
                             avatar: Avatar) -> ServedSession | web.Response:
        gate = self._gate
        assert gate is not None
        generation_id = body.disclosure.generation_id
        token = body.consent_token.get_secret_value()
        if not token.strip():
            self._metrics.refuse("consent")
            return self._consent_refusal(ConsentRequired(
                "a session needs the consent token of the person the avatar shows",
                check=ConsentCheck.MISSING))
        try:
            verified = await gate.admit(token, avatar=avatar, purpose=body.purpose,
                                        generation_id=generation_id)
        except ConsentViolation as exc:
            self._metrics.refuse("consent")
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
            self._metrics.refuse("consent")
            return self._consent_refusal(exc)
        path = self._media_path(avatar)
        try:
            engine = await asyncio.to_thread(
                build_engine, self.choice.name, path, sample_rate=body.sample_rate,
                cache_dir=self._cache_dir, weights=self._weights, musetalk=self._musetalk)
        except AvatarPreparationError as exc:
            self._metrics.refuse("avatar_unusable")
            return error_response(422, type(exc).__name__, str(exc), field="avatar")
        except (ConfigError, MediaFormatError) as exc:
            self._metrics.refuse("engine")
            return error_response(500, type(exc).__name__, str(exc))
        if self._state != "running":
            self._metrics.refuse("shutting_down")
            return error_response(503, "shutting_down", "the server is shutting down",
                                  headers={"Retry-After": _RETRY_AFTER})
        return await self._open(body, avatar, verified, engine)

    def _consent_refusal(self, exc: ConsentViolation) -> web.Response:
        return error_response(403, type(exc).__name__, str(exc), check=str(exc.check),
                              consent_id=exc.consent_id)

    def _media_path(self, avatar: Avatar) -> Path:
        assert avatar.local is not None
        path = Path(avatar.local).expanduser()
        if not path.is_absolute() and self._avatar_dir is not None:
            path = self._avatar_dir / path
        return path

    async def _open(self, body: CreateSession, avatar: Avatar, verified: VerifiedConsent,
                    engine: LipSyncEngine) -> ServedSession | web.Response:
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
        holder: list[ServedSession] = []

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
            session = ServedSession(session_id=session_id, info=info, avatar=avatar,
                               purpose=body.purpose, generation_id=metadata.generation_id,
                               verified=verified, notice=notice, stream=stream,
                               broadcast=broadcast, viewer_token=viewer_token, label=labelled)
            holder.append(session)
            stream.start()
        except BaseException:
            await asyncio.shield(self._close_media(stream, broadcast))
            raise
        self._live[session_id] = session
        self._metrics.started_total += 1
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

    async def _log(self, session: ServedSession, kind: str, **fields: Any) -> None:
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
            return json_response(session.info)
        ended = self._ended.get(session_id)
        if ended is None and session is not None and session.ending is not None:
            ended = await asyncio.shield(session.ending)
        if ended is not None:
            return error_response(
                410, "session_ended", f"session {session_id} ended ({ended.reason})",
                reason=ended.reason, duration_s=ended.duration_s)
        return error_response(404, "not_found", f"no session {quoted(session_id)}")

    async def _delete(self, request: web.Request) -> web.Response:
        session_id = request.match_info["session_id"]
        session = self._live.get(session_id)
        if session is not None:
            ended = await asyncio.shield(self._end_soon(session, "deleted", recoverable=False))
            return json_response(ended)
        tombstone = self._ended.get(session_id)
        if tombstone is not None:
            return json_response(tombstone)
        return error_response(404, "not_found", f"no session {quoted(session_id)}")

    # -- ending -----------------------------------------------------------------------------

    def _end_soon(self, session: ServedSession, reason: str,
                  recoverable: bool) -> asyncio.Task[SessionEnded]:
        """End ``session`` from a task of its own (idempotent: the first reason wins)."""
        if session.ending is None:
            session.ending = self._spawn(self._finish(session, reason, recoverable),
                                         name=f"avatarkit-serve-end-{session.session_id}")
        return session.ending

    async def _finish(self, session: ServedSession, reason: str,
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
                async with asyncio.timeout(WS_CLOSE_S):
                    await asyncio.shield(socket.task)
        self._live.pop(session.session_id, None)
        self._metrics.ended_frames += frames
        self._ended[session.session_id] = ended
        while len(self._ended) > _TOMBSTONES:
            self._ended.popitem(last=False)
        await self._log(session, "session_ended", details={
            "reason": reason, "recoverable": recoverable, "duration_s": ended.duration_s,
            "frames": frames, "session_id": session.session_id})
        logger.info("session %s ended: %s after %.1f s", session.session_id, reason, duration)
        return ended

    def _arm_idle(self, session: ServedSession) -> None:
        session.cancel_timer("idle")
        if session.ending is None:
            session.timers["idle"] = asyncio.get_running_loop().call_later(
                self.idle_timeout_s, self._end_soon, session, "idle_timeout", False)

    def _watch_consent(self, session: ServedSession) -> ConsentWatch:
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

    async def _watch_engine(self, session: ServedSession) -> None:
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

    def _on_stream_event(self, session: ServedSession, event: StreamEvent) -> None:
        if isinstance(event, PlaybackStart):
            self._metrics.observe_latency(event.latency)
            self._send(session, PlaybackStartedMessage(utterance_id=event.utterance_id,
                                                       latency_s=event.latency))
        elif isinstance(event, SegmentEnd):
            if session.pending.pop(event.segment_id, None) is None:
                return  # already reported (cleared and given up on)
            self._send(session, PlaybackFinishedMessage(
                utterance_id=event.segment_id, position_s=event.position,
                interrupted=event.interrupted))
            session.ended_event.set()

    def _send(self, session: ServedSession,
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
            return error_response(404, "not_found", f"no session {quoted(session_id)}")
        ws = web.WebSocketResponse(max_msg_size=_MAX_AUDIO_MESSAGE, timeout=WS_CLOSE_S,
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
        socket = AudioSocket(ws)
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
                    await on_text(session, socket, message.data)
                elif message.type == WSMsgType.BINARY:
                    await on_audio(session, socket, message.data)
                elif message.type == WSMsgType.ERROR:
                    break
        finally:
            if session.socket is socket:
                session.socket = None
                if session.ending is None and self._state == "running":
                    self._arm_idle(session)
            await socket.finish()
        return ws
