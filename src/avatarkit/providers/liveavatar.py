"""HeyGen LiveAvatar in LITE mode: our audio, LiveAvatar's face, viewers in a LiveKit room.

Wire contract (``shared/research/vendor-contracts.md`` §3):

1. ``POST /v1/sessions/token`` with ``X-API-KEY`` mints a session id and a session token
   (``mode: "LITE"``). Nothing is billed yet.
2. ``POST /v1/sessions/start`` with ``Authorization: Bearer <session token>`` starts it: the
   meter runs from here. The answer carries the LiveKit URL, a *client* token (handed to
   viewers in ``JoinInfo(kind="livekit")``), an *agent* token (never handed out, never kept)
   and the ``ws_url`` of the LITE WebSocket.
3. On the WebSocket (JSON text frames) audio goes as ``agent.speak`` with base64 PCM16
   24 kHz mono: the first message of an utterance once ``first_chunk_ms`` (600 ms) is
   buffered, then ``chunk_ms`` (1 s) pieces, all with one ``event_id`` (the utterance id),
   and ``agent.speak_end`` closes the utterance. ``agent.interrupt`` clears the vendor's
   queue. ``session.keep_alive`` is sent ``keep_alive_s`` after the last message of any kind,
   well inside the vendor's 5-minute idle timeout.
4. ``POST /v1/sessions/stop`` (falling back to ``DELETE /v1/sessions`` when the POST route
   answers 404 or 405) ends it. Closing the WebSocket alone does **not** end it (the session
   stays billed until its idle timeout, livekit/agents #4193), so every exit path stops it.

The "connected" gate. The vendor drops every message that arrives before it sent
``session.state_updated: connected``. ``start()`` connects the WebSocket (so a refused or
unreachable WebSocket is a typed error of ``start()``, with the session stopped) but by
default does not wait for ``connected``: it returns at once and messages sent before
``connected`` are queued and flushed, in order, the moment it arrives. This gives the lowest
time to first audio: viewers join the LiveKit room and the caller's TTS produces audio while
the avatar connects, and the first ``agent.speak`` leaves as soon as the vendor accepts it.
If ``connected`` does not come within ``connect_timeout_s``, the session reports a
``ProviderTimeoutError`` (a ``VendorSessionEnded`` signal: the session fails over or closes,
and the vendor session is stopped). With ``wait_connected = true``, ``start()`` itself waits
(bounded by ``connect_timeout_s``) and raises that error, so start fallback can move on to
another provider, at the cost of the connect time being spent before the caller can speak.

Interrupts: ``agent.interrupt`` is sent only while the vendor has speech of ours, i.e. it
said ``agent.speak_started`` for an utterance it has not reported ended, or audio we sent has
not been reported started yet (it is queued there, or its ``speak_started`` is still on the
way: skipping the interrupt then would let it play). Otherwise nothing is playing and the
adapter acknowledges the interrupt itself. The acknowledgement is the first of
``agent.speak_interrupted`` / ``agent.speak_ended`` for an interrupted utterance.

``PlaybackFinished.duration`` is measured here, from the arrival of ``agent.speak_started``
to that of ``agent.speak_ended`` (capped by the audio sent): the vendor does not report it.

Reaping from another process is not possible: LiveAvatar's stop needs the session's Bearer
token, which only the process that minted it holds; ``end_session`` and ``find_session``
keep the base class's ``CapabilityError``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import re
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit

import httpx
from pydantic import Field, SecretStr

from ..contract import (
    Capabilities,
    PlaybackFinished,
    PlaybackStarted,
    Provider,
    ProviderProfile,
    ProviderSession,
    ProviderSettings,
    SessionRequest,
    VendorSessionEnded,
)
from ..errors import (
    ConfigError,
    NotFoundError,
    ProviderConnectionError,
    ProviderError,
    ProviderTimeoutError,
    ServerError,
)
from ..join import JoinInfo
from ..media import AudioChunk, AudioFormat
from ..vendor_http import VendorHttp
from ._ws import VendorSocket

__all__ = ["LiveAvatarProvider", "LiveAvatarSession", "LiveAvatarSettings"]

logger = logging.getLogger("avatarkit.providers.liveavatar")

_SAMPLE_RATE = 24_000
_BYTES_PER_MS = _SAMPLE_RATE * 2 // 1000
_BYTES_PER_SECOND = _SAMPLE_RATE * 2
#: The vendor's limit per WebSocket message ("1 MB"; read as decimal megabytes).
_MAX_MESSAGE_BYTES = 1_000_000
#: The vendor's idle timeout; keep-alives must come well before it.
_IDLE_TIMEOUT_S = 300.0

_TOKEN_PATH = "/v1/sessions/token"
_START_PATH = "/v1/sessions/start"
_STOP_PATH = "/v1/sessions/stop"
_DELETE_PATH = "/v1/sessions"
_AVATARS_PATH = "/v1/avatars"

_MISSING_ROUTE = frozenset({404, 405})
# End reasons that are the vendor doing what it was told (our max_session_duration, its idle
# timeout, a stop with our token, the sandbox limit): another provider would not help.
_DELIBERATE_END = re.compile(r"duration|idle|timeout|stop|sandbox|user", re.IGNORECASE)
# Interrupted utterances whose acknowledgement is still awaited (a mute vendor never sends
# one): the oldest are forgotten beyond this.
_MAX_INTERRUPTED = 64

_SPEAK_SUFFIX = b'"}'
_INTERRUPT = b'{"type":"agent.interrupt"}'


class LiveAvatarSettings(ProviderSettings):
    """``[providers.liveavatar]`` (or ``[providers.heygen]``)."""

    base_url: str | None = "https://api.liveavatar.com"
    is_sandbox: bool = Field(
        default=False, description="Sandbox sessions: free, about one minute, stock avatar only.")
    video_quality: Literal["very_high", "high", "medium", "low"] | None = Field(
        default=None, description="Sent as video_settings.quality; the vendor's default if unset.")
    first_chunk_ms: int = Field(
        default=600, ge=20, le=10_000, description="Audio buffered before an utterance's first "
        "agent.speak (the vendor recommends ~600 ms).")
    chunk_ms: int = Field(
        default=1000, ge=20, le=10_000, description="Audio per later agent.speak (~1 s "
        "recommended; 10 s is ~640 KB of base64, under the 1 MB message limit).")
    keep_alive_s: float = Field(
        default=60.0, gt=0, lt=_IDLE_TIMEOUT_S, description="session.keep_alive after this long "
        "without sending anything (the vendor ends idle sessions after 300 s).")
    connect_timeout_s: float = Field(
        default=15.0, gt=0, le=300, description="Seconds to wait for the WebSocket's "
        "session.state_updated 'connected' before the session counts as failed.")
    wait_connected: bool = Field(
        default=False, description="start() waits for 'connected' (failures become start "
        "failures) instead of returning at once and queueing what is sent until then.")
    max_session_duration: int = Field(
        default=3600, ge=1, description="Upper bound (s) sent as max_session_duration; the "
        "session's own max_duration_s is used when shorter.")


class LiveAvatarProvider(Provider):
    """HeyGen LiveAvatar, LITE mode (we send the audio; viewers join a LiveKit room)."""

    name = "liveavatar"
    aliases = ("heygen",)
    settings_model = LiveAvatarSettings
    # the session token comes before anything bills: a start whose answer was lost is stopped
    uncertain_creates = False
    wire = ("`POST /v1/sessions/token` (`X-API-KEY`, `mode: LITE`) mints a session token; "
            "`POST /v1/sessions/start` (`Authorization: Bearer`) starts billing and returns "
            "the LiveKit room and the LITE WebSocket. Audio as base64 PCM16 24 kHz mono "
            "`agent.speak` (600 ms first, then 1 s; one `event_id` per utterance) and "
            "`agent.speak_end`, queued until `session.state_updated: connected`; "
            "`agent.interrupt` while the avatar has our speech; `session.keep_alive` after "
            "60 s without a message; speech events `agent.speak_started/ended`. "
            "`POST /v1/sessions/stop` (`DELETE /v1/sessions` when that route is missing) on "
            "every exit. Viewers join the LiveKit room with the client token. Health probe: "
            "`GET /v1/avatars`. No reaping from another process (stopping needs the session "
            "token).")
    unverified = (
        "The stop route: `POST /v1/sessions/stop` or `DELETE /v1/sessions` (both are handled; "
        "the one that works is remembered).",
        "The envelope's success `code` (100 in the docs, 1000 in the web SDK): never read.",
        "Rate limiting (429 with `Retry-After`) and the concurrency-limit status.",
        "`GET /v1/avatars` as the health probe's path.",
        "The time to first frame (about 400 ms is third-party).",
        "The list price (1 credit/min in LITE, about $0.10-0.13): set `price_per_minute`.",
        "Regions and compliance claims: set `regions` yourself.",
    )

    def __init__(self, settings: ProviderSettings, *, http: httpx.AsyncClient,
                 instance_name: str | None = None) -> None:
        super().__init__(settings, http=http, instance_name=instance_name)
        assert isinstance(settings, LiveAvatarSettings)
        self.settings: LiveAvatarSettings = settings
        api_key = settings.api_key
        if api_key is None:
            raise ConfigError("required (e.g. api_key = \"env:LIVEAVATAR_API_KEY\")",
                              field=f"providers.{self.instance_name}.api_key")
        if not settings.base_url:
            raise ConfigError("required (the LiveAvatar API, https://api.liveavatar.com)",
                              field=f"providers.{self.instance_name}.base_url")
        self.api = VendorHttp(
            provider=self.instance_name,
            client=http,
            base_url=settings.base_url,
            auth_headers=lambda: {"X-API-KEY": api_key.get_secret_value()},
            retry=settings.retry,
            timeout=settings.timeout,
        )
        # Which stop route answered last: the DELETE fallback is remembered once it worked.
        self._stop_method: Literal["POST", "DELETE"] = "POST"
        self._profile = self._build_profile(
            capabilities=Capabilities(audio_input=True, text_input=False, interrupt=True,
                                      playback_events=True, frames_in_process=False,
                                      join_kinds=frozenset({"livekit"})),
            audio_format=AudioFormat(_SAMPLE_RATE, 1),
            # [3p] ~400 ms time to first frame (a third-party figure, not the vendor's).
            first_frame_latency_ms=400.0,
        )

    @property
    def profile(self) -> ProviderProfile:
        return self._profile

    def _session_api(self, token: SecretStr) -> VendorHttp:
        """REST calls of one session: Bearer auth with its session token (redacted by
        VendorHttp like every auth header: the value and the token after the scheme)."""
        assert self.settings.base_url is not None
        return VendorHttp(
            provider=self.instance_name,
            client=self._http_client,
            base_url=self.settings.base_url,
            auth_headers=lambda: {"Authorization": f"Bearer {token.get_secret_value()}"},
            retry=self.settings.retry,
            timeout=self.settings.timeout,
        )

    def _token_body(self, request: SessionRequest) -> dict[str, Any]:
        duration = self.settings.max_session_duration
        if request.max_duration_s is not None:
            duration = min(duration, int(request.max_duration_s))
        body: dict[str, Any] = {
            "mode": "LITE",
            "avatar_id": request.avatar_id,
            "is_sandbox": self.settings.is_sandbox,
            "max_session_duration": max(1, duration),
        }
        if self.settings.video_quality is not None:
            body["video_settings"] = {"quality": self.settings.video_quality}
        return body

    async def start(self, request: SessionRequest) -> LiveAvatarSession:
        minted = _data(await self.api.request_json("POST", _TOKEN_PATH,
                                                   json=self._token_body(request)),
                       "token", self.instance_name)
        session_id = _text(minted, "session_id", "token", self.instance_name)
        token = SecretStr(_text(minted, "session_token", "token", self.instance_name))
        # A minted, never started session is not billed: a failure above leaves nothing to
        # stop. From the start call on, the meter may run (a start whose answer was lost
        # still started), so every failure below stops the session before raising.
        api = self._session_api(token)
        socket: VendorSocket | None = None
        session: LiveAvatarSession | None = None
        try:
            started = _data(await api.request_json("POST", _START_PATH,
                                                   json={"session_id": session_id}),
                            "start", self.instance_name)
            ws_url = _text(started, "ws_url", "start", self.instance_name)
            livekit_url = _text(started, "livekit_url", "start", self.instance_name)
            client_token = _text(started, "livekit_client_token", "start", self.instance_name)
            duration = started.get("max_session_duration")
            socket = VendorSocket(provider=self.instance_name, what="LiveAvatar LITE WebSocket",
                                  open_timeout=self.settings.timeout)
            secrets = [token.get_secret_value(), client_token, *_query_values(ws_url)]
            await socket.connect(ws_url, secrets=secrets)
            # Only the client's token is kept: the agent's would let a viewer act as us.
            join = JoinInfo(kind="livekit", url=livekit_url, token=SecretStr(client_token),
                            disclosure=request.disclosure)
            session = LiveAvatarSession(
                self, session_id=session_id, api=api, socket=socket, join=join,
                max_session_duration=duration if isinstance(duration, int) else None)
            if self.settings.wait_connected:
                await session.wait_connected()
        except BaseException:
            await asyncio.shield(self._abort(session_id, api, socket, session))
            raise
        logger.info("%s: session %s started", self.instance_name, session_id)
        return session

    async def _abort(self, session_id: str, api: VendorHttp, socket: VendorSocket | None,
                     session: LiveAvatarSession | None) -> None:
        """Stop a session whose start failed (or was cancelled) and close its socket."""
        try:
            if session is not None:
                await session.end()
                return
            try:
                await self._stop(api, session_id)
            finally:
                if socket is not None:
                    await socket.aclose()
        except ProviderError as exc:
            logger.error("%s: could not stop session %s after its start failed (%s); if the "
                         "start reached the vendor it stays billed until its idle timeout",
                         self.instance_name, session_id, exc)

    async def _stop(self, api: VendorHttp, session_id: str) -> None:
        """End a session at the vendor: the route that worked last, then the other one when
        that answers 404/405 (a route the vendor does not have). A 404 from the fallback
        means the session is already gone."""
        first = self._stop_method
        try:
            await self._stop_with(api, first, session_id)
            return
        except ProviderError as exc:
            if exc.status not in _MISSING_ROUTE:
                raise
            missing = exc.status
        second: Literal["POST", "DELETE"] = "DELETE" if first == "POST" else "POST"
        logger.info("%s: %s stop answered %s; trying %s", self.instance_name, first,
                    missing, second)
        try:
            await self._stop_with(api, second, session_id)
        except NotFoundError:
            logger.info("%s: session %s was already gone", self.instance_name, session_id)
            return
        self._stop_method = second

    async def _stop_with(self, api: VendorHttp, method: Literal["POST", "DELETE"],
                         session_id: str) -> None:
        if method == "POST":
            await api.request("POST", _STOP_PATH,
                              json={"session_id": session_id, "reason": "USER_DISCONNECTED"})
        else:
            await api.request("DELETE", _DELETE_PATH)

    async def probe(self) -> None:
        # Listing avatars is authenticated with the API key, unbilled and creates nothing.
        await self.api.request("GET", _AVATARS_PATH)


@dataclass(slots=True)
class _Speech:
    """An utterance (event id) with audio on the vendor's side."""

    sent_seconds: float = 0.0
    started_at: float | None = None  # monotonic arrival of agent.speak_started

    def duration(self, now: float) -> float | None:
        if self.started_at is None:
            return None
        return max(0.0, min(self.sent_seconds, now - self.started_at))


class LiveAvatarSession(ProviderSession):
    """One LiveAvatar LITE session, driven over its WebSocket."""

    def __init__(
        self,
        provider: LiveAvatarProvider,
        *,
        session_id: str,
        api: VendorHttp,
        socket: VendorSocket,
        join: JoinInfo,
        max_session_duration: int | None = None,
    ) -> None:
        super().__init__(provider=provider.instance_name, vendor_session_id=session_id,
                         join=join)
        settings = provider.settings
        self._provider = provider
        self._api = api
        self._socket = socket
        #: the session length the vendor enforces (seconds), as start reported it
        self.max_session_duration = max_session_duration
        self._first_bytes = settings.first_chunk_ms * _BYTES_PER_MS
        self._chunk_bytes = settings.chunk_ms * _BYTES_PER_MS
        self._keep_alive_s = settings.keep_alive_s
        self._connect_timeout_s = settings.connect_timeout_s
        # the utterance being sent: its id, its agent.speak prefix, unsent audio
        self._utterance: str | None = None
        self._prefix = b""
        self._buffer = bytearray()
        self._sent_any = False
        # the "connected" gate: messages queue up in _pending until it opens
        self._live = False
        self._on_wire = False  # something was sent (the queue flush began)
        self._pending: deque[bytes] = deque()
        self._gate_decided = asyncio.Event()  # "connected" arrived, or the channel ended
        self._settled = asyncio.Event()  # live, or the gate failed (_gate_error)
        self._gate_error: ProviderError | None = None
        self._channel_error: ProviderError | None = None  # the channel is gone
        # the vendor's speech, from its events: event id -> what we know
        self._outstanding: dict[str, _Speech] = {}
        self._interrupted: dict[str, _Speech] = {}
        self._closing = False
        self._vendor_ended = False
        self._end_reported = False
        self._keep_alives = 0
        #: bumped by every interrupt: a send that awaited across one drops its audio
        self._epoch = 0
        self._last_send = time.monotonic()
        self._reader = asyncio.create_task(self._read(), name=f"liveavatar-{session_id}-reader")
        self._lifecycle = asyncio.create_task(self._run(), name=f"liveavatar-{session_id}-gate")

    # -- sending ---------------------------------------------------------------------------

    async def wait_connected(self) -> None:
        """Wait until the vendor said ``connected`` and queued messages went out; raises the
        ``ProviderError`` that kept it from happening (bounded by ``connect_timeout_s``)."""
        await self._settled.wait()
        if self._gate_error is not None:
            raise self._gate_error

    async def send_audio(self, chunk: AudioChunk, *, utterance_id: str) -> None:
        # interrupt() takes no lock: it may run while a send below waits on the socket. The
        # epoch tells this call that its utterance was interrupted meanwhile, so none of its
        # audio follows the agent.interrupt.
        epoch = self._epoch
        if utterance_id != self._utterance:
            await self._begin(utterance_id)
            if epoch != self._epoch:
                return
        buffer = self._buffer
        buffer += chunk.to_pcm16()
        size = self._chunk_bytes if self._sent_any else self._first_bytes
        while len(buffer) >= size:
            piece = buffer[:size]
            del buffer[:size]
            await self._speak(utterance_id, piece)
            if epoch != self._epoch:
                return
            size = self._chunk_bytes

    async def end_utterance(self, *, utterance_id: str) -> None:
        if utterance_id != self._utterance:
            return  # no audio was sent for it (or an interrupt dropped it)
        await self._finish_utterance()

    async def _begin(self, utterance_id: str) -> None:
        epoch = self._epoch
        if self._utterance is not None:
            # a new utterance without end_utterance for the previous one: end that one first
            await self._finish_utterance()
            if epoch != self._epoch:
                return  # interrupted meanwhile: this utterance was dropped with it
        self._utterance = utterance_id
        self._sent_any = False
        self._prefix = (b'{"type":"agent.speak","event_id":' + json.dumps(utterance_id).encode()
                        + b',"audio":"')

    async def _finish_utterance(self) -> None:
        utterance_id = self._utterance
        assert utterance_id is not None
        rest, self._buffer = self._buffer, bytearray()
        if rest:
            await self._speak(utterance_id, rest)
        if self._sent_any:
            await self._send(json.dumps({"type": "agent.speak_end", "event_id": utterance_id},
                                        separators=(",", ":")).encode())
        self._utterance = None
        self._sent_any = False

    async def _speak(self, utterance_id: str, pcm: bytearray) -> None:
        """One ``agent.speak``. Everything but the audio is encoded once per utterance;
        base64 needs no JSON escaping, so it is spliced in."""
        speech = self._outstanding.get(utterance_id)
        if speech is None:
            speech = self._outstanding[utterance_id] = _Speech()
        speech.sent_seconds += len(pcm) / _BYTES_PER_SECOND
        self._sent_any = True
        await self._send(b"".join((self._prefix, base64.b64encode(pcm), _SPEAK_SUFFIX)))

    async def _send(self, frame: bytes) -> None:
        """Send one message, or queue it while the vendor has not said ``connected``."""
        if self._live:
            self._last_send = time.monotonic()
            await self._socket.send_text(frame)
            return
        if self._channel_error is not None:
            raise ProviderConnectionError(self._channel_error.message, provider=self.provider)
        if self._closing:
            raise ProviderConnectionError("the LiveAvatar session is closing",
                                          provider=self.provider)
        self._pending.append(frame)

    async def interrupt(self) -> None:
        self._epoch += 1
        self._buffer.clear()
        self._utterance = None
        self._sent_any = False
        self._pending.clear()  # queued before 'connected': never sent, now never will be
        if not self._on_wire:
            # Nothing reached the vendor yet: dropping the queue is the whole interrupt.
            self._outstanding.clear()
        if not self._outstanding:
            # The vendor has nothing of ours to play: acknowledge it ourselves at once.
            self._emit(PlaybackFinished(utterance_id=None, duration=None, interrupted=True))
            return
        self._interrupted.update(self._outstanding)
        self._outstanding.clear()
        while len(self._interrupted) > _MAX_INTERRUPTED:
            del self._interrupted[next(iter(self._interrupted))]
        await self._send(_INTERRUPT)

    # -- background tasks ------------------------------------------------------------------

    async def _run(self) -> None:
        """Wait (bounded) for ``connected``, flush what was queued, then keep the session
        alive: a ``session.keep_alive`` ``keep_alive_s`` after the last message sent."""
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                await self._gate_decided.wait()
        except TimeoutError:
            error = ProviderTimeoutError(
                f"LiveAvatar session {self.vendor_session_id} did not report 'connected' "
                f"within {self._connect_timeout_s:g} s", provider=self.provider)
            self._fail_gate(error)
            self._report_end(VendorSessionEnded(
                reason=f"not connected within {self._connect_timeout_s:g} s",
                billing_stopped=False, error=error))
            return
        if self._gate_error is not None:
            return  # the channel ended first; the reader reported it
        try:
            # In order; what is sent meanwhile joins the queue and goes out here too.
            while self._pending:
                frame = self._pending.popleft()
                self._on_wire = True
                self._last_send = time.monotonic()
                await self._socket.send_text(frame)
        except ProviderConnectionError as exc:
            self._fail_gate(exc)
            return  # the reader reports the drop
        self._on_wire = True
        self._live = True  # no await since the queue was seen empty: nothing is overtaken
        self._settled.set()
        while True:
            delay = self._last_send + self._keep_alive_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
                continue
            self._keep_alives += 1
            frame = ('{"type":"session.keep_alive","event_id":"keep-alive-'
                     f'{self._keep_alives}"}}').encode()
            try:
                await self._send(frame)
            except ProviderConnectionError:
                return  # the reader reports the drop

    def _fail_gate(self, error: ProviderError) -> None:
        if self._gate_error is None:
            self._gate_error = error
        self._channel_error = self._channel_error or error
        self._pending.clear()
        self._gate_decided.set()
        self._settled.set()

    async def _read(self) -> None:
        try:
            async for message in self._socket.json_messages():
                self._on_message(message)
        except ProviderConnectionError as exc:
            self._channel_gone(exc)
            return
        code = self._socket.close_code
        self._channel_gone(ProviderConnectionError(
            f"LiveAvatar LITE WebSocket closed by the vendor (code {code})",
            provider=self.provider))

    def _channel_gone(self, error: ProviderError) -> None:
        self._channel_error = self._channel_error or error
        if not self._live:
            self._fail_gate(error)
        if not self._vendor_ended:
            self._report_end(VendorSessionEnded(reason=error.message, billing_stopped=False,
                                                error=error))

    def _report_end(self, signal: VendorSessionEnded) -> None:
        """Report the session's end once (not while we are ending it ourselves)."""
        if self._closing or self._end_reported:
            return
        self._end_reported = True
        self._emit(signal)

    def _on_message(self, message: Mapping[str, Any]) -> None:
        kind = message.get("type")
        if kind == "session.state_updated":
            state = message.get("state")
            if state == "connected":
                self._gate_decided.set()
            elif state in ("closing", "closed"):
                self._on_vendor_end(message)
            return
        event_id = message.get("event_id")
        if not isinstance(event_id, str):
            return
        if kind == "agent.speak_started":
            speech = self._outstanding.get(event_id) or self._interrupted.get(event_id)
            if speech is not None:
                if speech.started_at is not None:
                    return  # reported already
                speech.started_at = time.monotonic()
            self._emit(PlaybackStarted(utterance_id=event_id))
        elif kind in ("agent.speak_ended", "agent.speak_interrupted"):
            now = time.monotonic()
            if (speech := self._interrupted.pop(event_id, None)) is not None:
                self._emit(PlaybackFinished(utterance_id=event_id, duration=speech.duration(now),
                                            interrupted=True))
            elif (speech := self._outstanding.pop(event_id, None)) is not None:
                self._emit(PlaybackFinished(
                    utterance_id=event_id, duration=speech.duration(now),
                    interrupted=kind == "agent.speak_interrupted"))
            # otherwise reported already (speak_ended after speak_interrupted)
        # anything else (agent.state, listening states, new event types) is ignored

    def _on_vendor_end(self, message: Mapping[str, Any]) -> None:
        if self._vendor_ended:
            return
        self._vendor_ended = True
        self._vendor_stopped_billing()
        reason = message.get("reason")
        text = str(reason) if isinstance(reason, str) and reason else "ended by LiveAvatar"
        if not self._live:
            self._fail_gate(ProviderConnectionError(
                f"LiveAvatar ended session {self.vendor_session_id} before it connected: "
                f"{text}", provider=self.provider))
        self._report_end(VendorSessionEnded(reason=text, billing_stopped=True,
                                            recoverable=not _DELIBERATE_END.search(text)))

    # -- ending ----------------------------------------------------------------------------

    async def _end_at_vendor(self) -> None:
        self._closing = True
        if not self._settled.is_set():  # nobody waits on wait_connected() forever
            self._fail_gate(ProviderConnectionError(
                "the LiveAvatar session was ended before it connected", provider=self.provider))
        for task in (self._lifecycle, self._reader):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        try:
            try:
                await self._provider._stop(self._api, self.vendor_session_id)
            except ProviderError as exc:
                if not self._vendor_ended:
                    raise
                # The vendor already said it ended the session: its billing stopped.
                logger.info("%s: session %s had ended at the vendor; stop answered: %s",
                            self.provider, self.vendor_session_id, exc)
        finally:
            await self._socket.aclose()


def _data(body: Mapping[str, Any], call: str, provider: str) -> Mapping[str, Any]:
    """The ``data`` object of the vendor's ``{code, data, message}`` envelope (whatever
    ``code`` says: its success value differs between the docs and the clients)."""
    data = body.get("data")
    if isinstance(data, dict):
        return data
    if "data" not in body:
        return body  # an answer without the envelope
    # The body itself stays out of the message: it may hold tokens.
    raise ServerError(f"the {call} answer has no data object", provider=provider,
                      retryable=False)


def _text(data: Mapping[str, Any], key: str, call: str, provider: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise ServerError(f"the {call} answer has no {key}", provider=provider,
                          retryable=False)
    return value


def _query_values(url: str) -> list[str]:
    """The query-string values of ``url`` (a WebSocket token): masked in error messages."""
    return [value for _, value in parse_qsl(urlsplit(url).query) if value]
