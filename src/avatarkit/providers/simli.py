"""Simli: our audio, Simli's face (the compose API).

Wire contract (``shared/research/vendor-contracts.md`` §4): ``POST /compose/token``
(``x-simli-api-key``) mints a single-use ``session_token`` for a face and the session's limits
(``maxSessionLength``, ``maxIdleTime``, ``handleSilence``...). The session itself is a WebSocket
opened with ``?session_token=``; it goes live when Simli sends ``START``. Audio goes up as binary
PCM16 16 kHz mono frames of 6000 bytes (187.5 ms); ``SKIP`` interrupts, ``DONE`` finishes.
Simli answers with text lines: ``SPEAK`` / ``SILENT`` bracket speech; ``ENDFRAME``,
``CLOSING REASON: <reason>`` and ``STOP`` end the session (``IDLE``, ``MAX``...);
``ERROR: <CODE>`` and ``RATE ...`` are fatal.

Two transports (``transport``):

* ``"p2p"`` (default): we send an SDP offer (receive-only audio + video, ICE servers from
  ``GET /compose/ice``) as the first WebSocket message and apply Simli's answer; the avatar's
  video arrives over WebRTC into this process (:meth:`SimliSession.video_frames`,
  ``JoinInfo(kind="webrtc")``). The socket path is the SDK's ``/compose/webrtc/p2p`` or the
  AsyncAPI document's ``/compose/webrtc/peer_to_peer`` (``p2p_path``).
* ``"livekit"``: ``/compose/webrtc/livekit``; Simli puts the avatar in a LiveKit room and sends
  its URL and a token, which viewers get as ``JoinInfo(kind="livekit")``.

Choices where the contract is silent:

* Simli returns no session id, and the token is a secret, so ``vendor_session_id`` is the first
  32 hex digits of the token's SHA-256 (stable, and never the token).
* A session ends when its WebSocket closes. Ending (and every failure after the socket opened)
  sends ``DONE`` first, best effort, then closes the socket and the WebRTC peer: ``DONE`` covers a
  server that would keep a session after its socket closed, the close covers one that would
  wait for the queued audio. Nothing else can end a Simli session, so :meth:`end_session` (from
  another process) is not supported, and :meth:`find_session` finds nothing: a failed start
  closed its socket.
* Utterances: Simli reports one ``SPEAK``..``SILENT`` span for audio queued back to back and
  knows nothing of utterance ids. ``SPEAK`` starts the oldest utterance whose audio was sent and
  not yet finished; ``SILENT`` finishes every such utterance that was ended with
  ``end_utterance`` (a later one that played within the same span is reported started at that
  moment); a ``SILENT`` while an utterance is still open is a buffer underrun and reports
  nothing. After ``SKIP``, the next ``SILENT`` is the interrupt's acknowledgement. A ``SPEAK``
  first means the vendor will not acknowledge it, unless Simli was silent when the ``SKIP``
  left and no audio followed it (that ``SPEAK`` was already on its way).
* Session ends: ``IDLE``, ``MAX`` and ``DONE`` are Simli doing what it was told (no failover);
  other reasons and ``ERROR`` lines may be worth another provider. A dropped socket is reported
  with ``billing_stopped=False`` (unverified whether Simli ends the session with it).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, cast
from urllib.parse import urlencode

import httpx
from pydantic import Field, field_validator

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
    AuthenticationError,
    BillingError,
    ConfigError,
    InvalidRequestError,
    NotFoundError,
    ProviderConnectionError,
    ProviderError,
    ProviderTimeoutError,
    RateLimitError,
    ServerError,
)
from ..join import JoinInfo
from ..media import AudioChunk, AudioFormat, VideoFrame
from ..transport.receiver import WebRTCReceiver, ice_servers_from
from ..vendor_http import VendorHttp, error_from_response
from ._ws import VendorSocket, to_ws_url

__all__ = [
    "SimliProvider",
    "SimliSession",
    "SimliSettings",
    "Transport",
]

logger = logging.getLogger("avatarkit.providers.simli")

_SAMPLE_RATE = 16_000
_FRAME_BYTES = 6000
_MAX_SESSION_LENGTH = 3600
#: Seconds ``DONE`` may take to leave before the socket is closed anyway.
_DONE_TIMEOUT = 1.0
_MAX_LINE = 200

Transport = Literal["p2p", "livekit"]
_P2PPath = Literal["/compose/webrtc/p2p", "/compose/webrtc/peer_to_peer"]

#: End reasons that are Simli doing what it was told: another provider would not help.
_DELIBERATE_ENDS = {
    "IDLE": "idle timeout (no audio for maxIdleTime)",
    "MAX": "maximum session length reached (maxSessionLength)",
    "DONE": "finished after DONE",
}
_ERROR_CODES: dict[str, tuple[type[ProviderError], str]] = {
    "INVALID_API_KEY": (AuthenticationError, "the API key was refused"),
    "BILLING_ERROR": (BillingError, "billing failed (out of credits?)"),
    "MISSING_BILLING_INFO": (BillingError, "the account has no billing information"),
    "INVALID_FACE_ID": (NotFoundError, "the faceId does not exist"),
    "INVALID_EMOTION": (InvalidRequestError, "the faceId's emotion does not exist"),
}


class SimliSettings(ProviderSettings):
    """``[providers.simli]``."""

    base_url: str | None = "https://api.simli.ai"
    transport: Transport = Field(
        default="p2p", description="'p2p': WebRTC video into this process (s.video()); "
        "'livekit': Simli renders into a LiveKit room that viewers join.")
    p2p_path: _P2PPath = Field(
        default="/compose/webrtc/p2p", description="The P2P WebSocket path: the SDK's, or the "
        "AsyncAPI document's /compose/webrtc/peer_to_peer.")
    enable_sfu: bool = Field(
        default=True, description="P2P: ask Simli to relay media through its SFU (Cloudflare's "
        "network), as the SDK does.")
    max_session_length_s: int = Field(
        default=_MAX_SESSION_LENGTH, ge=1, description="maxSessionLength; never above the "
        "session's own max duration.")
    max_idle_time_s: int = Field(default=300, ge=1, description="maxIdleTime: Simli ends the "
                                 "session after this long without audio.")
    handle_silence: bool = Field(default=True, description="handleSilence: Simli renders idle "
                                 "frames while no audio arrives.")
    frame_bytes: int = Field(default=_FRAME_BYTES, ge=2, le=_FRAME_BYTES,
                             description="Bytes per binary audio frame (the SDK's 6000).")
    start_timeout_s: float = Field(default=15.0, gt=0, description="Seconds from opening the "
                                   "WebSocket to Simli's START.")
    token_options: dict[str, Any] = Field(
        default_factory=dict, description="Extra /compose/token fields (Trinity-2: "
        "streaming_width, camera, background_id...). avatarkit's own fields win.")

    @field_validator("frame_bytes")
    @classmethod
    def _even(cls, value: int) -> int:
        if value % 2:
            raise ValueError("must be even (PCM16 has 2 bytes a sample)")
        return value


def _session_id(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:32]


def _error_for_code(code: str, provider: str) -> ProviderError:
    """The typed error for ``ERROR: <code>``."""
    key = code.split()[0].strip(":").upper() if code.split() else ""
    cls, meaning = _ERROR_CODES.get(key, (ServerError, "the session failed"))
    return cls(f"Simli error {code[:_MAX_LINE]}: {meaning}", provider=provider)


def _line_error(line: str, provider: str) -> ProviderError | None:
    """The error a fatal status line means, or None for any other line."""
    if line.startswith("ERROR"):
        return _error_for_code(line.partition(":")[2].strip() or line, provider)
    if line.startswith("RATE"):
        return RateLimitError(f"Simli refused the session: {line[:_MAX_LINE]}",
                              provider=provider, status=None)
    if line.startswith("CLIENT NOT CONNECTED TO LIVEKIT ROOM"):
        return ProviderConnectionError(f"Simli: {line[:_MAX_LINE]}", provider=provider)
    return None


def _json_object(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class _FailureRelay:
    """The WebRTC receiver's ``on_failed`` callback, bound to its session once it exists."""

    def __init__(self) -> None:
        self.session: SimliSession | None = None
        self.failed: str | None = None

    def __call__(self, reason: str) -> None:
        if self.session is not None:
            self.session._on_media_failed(reason)
        else:
            self.failed = reason


class SimliProvider(Provider):
    """Simli, peer-to-peer WebRTC (frames in this process) or its LiveKit channel."""

    name = "simli"
    settings_model = SimliSettings
    # the session is the WebSocket this adapter opened: a failed start has closed it
    uncertain_creates = False
    wire = ("`POST /compose/token` (`x-simli-api-key`; `faceId`, `maxSessionLength`, "
            "`maxIdleTime`, `handleSilence`) mints a session token; the session is a WebSocket "
            "opened with it. P2P: an SDP offer (ICE servers from `GET /compose/ice`) as the "
            "first message, Simli's answer back, video over WebRTC into this process; LiveKit "
            "channel: Simli sends the room's URL and token for viewers. Audio as binary PCM16 "
            "16 kHz mono frames of 6000 bytes; `SKIP` interrupts; `SPEAK`/`SILENT` bracket "
            "speech; `ENDFRAME`/`CLOSING REASON`/`STOP` and `ERROR: <CODE>` end it; `DONE` and "
            "a closed socket on every exit. Health probe: `GET /ratelimiter/sessions`.")
    unverified = (
        "Which P2P WebSocket path is canonical (`p2p_path`: the SDK's `/compose/webrtc/p2p` "
        "or the AsyncAPI document's `/compose/webrtc/peer_to_peer`).",
        "Whether a minted but unused token bills, and whether a socket closed without `DONE` "
        "ends billing (the adapter sends `DONE` and closes the socket on every exit).",
        "Price, latency, concurrency and rate-limit figures: set `price_per_minute`; limits "
        "arrive as `RATE ...` lines or HTTP 429.",
        "Where sessions render (Simli AS is in Oslo; `enable_sfu` relays media through "
        "Cloudflare): set `regions` yourself.",
    )
    documented_variants: ClassVar[dict[str, dict[str, object]]] = {
        "p2p": {}, "livekit": {"transport": "livekit"}}

    def __init__(self, settings: ProviderSettings, *, http: httpx.AsyncClient,
                 instance_name: str | None = None) -> None:
        super().__init__(settings, http=http, instance_name=instance_name)
        assert isinstance(settings, SimliSettings)
        self.settings: SimliSettings = settings
        api_key = settings.api_key
        if api_key is None:
            raise ConfigError("required (e.g. api_key = \"env:SIMLI_API_KEY\")",
                              field=f"providers.{self.instance_name}.api_key")
        self._api_key = api_key
        if settings.transport == "p2p" and not WebRTCReceiver.available():
            raise ConfigError(
                "transport 'p2p' needs aiortc: pip install 'avatarkit[webrtc]' (or set "
                "transport = \"livekit\")", field=f"providers.{self.instance_name}.transport")
        assert settings.base_url is not None
        self.api = VendorHttp(
            provider=self.instance_name,
            client=http,
            base_url=settings.base_url,
            auth_headers=lambda: {"x-simli-api-key": api_key.get_secret_value()},
            retry=settings.retry,
            timeout=settings.timeout,
        )
        p2p = settings.transport == "p2p"
        self._profile = self._build_profile(
            capabilities=Capabilities(
                audio_input=True, text_input=False, interrupt=True, playback_events=True,
                frames_in_process=p2p, join_kinds=frozenset({"webrtc" if p2p else "livekit"})),
            audio_format=AudioFormat(_SAMPLE_RATE, 1),
            # regions stay unknown: Simli AS is in Oslo (GDPR, Art. 28 DPA), but where sessions
            # render is not published, and enableSFU relays media through Cloudflare.
        )

    @property
    def profile(self) -> ProviderProfile:
        return self._profile

    def _token_body(self, request: SessionRequest) -> dict[str, Any]:
        s = self.settings
        length = s.max_session_length_s
        if request.max_duration_s is not None:
            length = min(length, int(request.max_duration_s))
        return {
            **s.token_options,
            "faceId": request.avatar_id,
            "apiVersion": "v2",
            "handleSilence": s.handle_silence,
            "maxSessionLength": max(1, length),
            "maxIdleTime": s.max_idle_time_s,
            "audioInputFormat": "pcm16",
        }

    async def _ice_servers(self) -> list[dict[str, Any]]:
        response = await self.api.request("GET", "/compose/ice")
        try:
            raw = json.loads(response.content) if response.content.strip() else []
        except ValueError:
            raise ServerError("GET /compose/ice returned a body that is not JSON",
                              provider=self.instance_name, status=response.status_code,
                              retryable=False) from None
        return ice_servers_from(raw)

    async def _mint_token(self, request: SessionRequest) -> str:
        response = await self.api.request("POST", "/compose/token",
                                          json=self._token_body(request), ok_statuses={400})
        body = _json_object(response.text) if response.content.strip() else None
        if response.status_code == 400:
            if body is None or body.get("session_token") != "FAIL TOKEN":
                raise error_from_response(self.instance_name, response,
                                          secrets=[self._api_key.get_secret_value()])
            detail = body.get("detail")
            text = " ".join(str(detail).split())[:_MAX_LINE] if detail else "no detail"
            cls = NotFoundError if "face" in text.lower() else InvalidRequestError
            raise cls(f"Simli refused a token for faceId {request.avatar_id!r}: {text}",
                      provider=self.instance_name, status=400)
        token = body.get("session_token") if body is not None else None
        if not isinstance(token, str) or not token or token == "FAIL TOKEN":
            raise ServerError("POST /compose/token returned no session_token",
                              provider=self.instance_name, status=response.status_code,
                              retryable=False)
        warnings = body.get("warnings") if body is not None else None
        for warning in warnings if isinstance(warnings, list) else []:
            logger.info("%s token warning: %s", self.instance_name, str(warning)[:_MAX_LINE])
        return token

    def _socket_url(self, token: str) -> str:
        s = self.settings
        p2p = s.transport == "p2p"
        params = {"session_token": token}
        if p2p and s.enable_sfu:
            params["enableSFU"] = "True"
        path = s.p2p_path if p2p else "/compose/webrtc/livekit"
        return f"{to_ws_url(str(self.api.url_for(path)))}?{urlencode(params)}"

    async def start(self, request: SessionRequest) -> SimliSession:
        p2p = self.settings.transport == "p2p"
        # ICE first: a failure then leaves no token behind.
        ice_servers = await self._ice_servers() if p2p else []
        token = await self._mint_token(request)
        vendor_session_id = _session_id(token)
        socket = VendorSocket(provider=self.instance_name, what="Simli WebSocket",
                              open_timeout=self.settings.timeout)
        await socket.connect(self._socket_url(token), secrets=[token])
        # The session may run (and bill) from here: every failure below ends it.
        incoming = cast(AsyncGenerator[str | bytes, None], socket.messages())
        receiver: WebRTCReceiver | None = None
        relay = _FailureRelay()
        try:
            if p2p:
                receiver = WebRTCReceiver(provider=self.instance_name, ice_servers=ice_servers,
                                          on_failed=relay)
            try:
                async with asyncio.timeout(self.settings.start_timeout_s):
                    livekit_url, livekit_token = await self._handshake(socket, incoming,
                                                                       receiver)
            except TimeoutError:
                raise ProviderTimeoutError(
                    f"Simli sent no START within {self.settings.start_timeout_s:g} s",
                    provider=self.instance_name) from None
        except BaseException:
            await asyncio.shield(_shutdown(socket, incoming, receiver))
            raise
        if p2p:
            join = JoinInfo(kind="webrtc", disclosure=request.disclosure)
        else:
            join = JoinInfo(kind="livekit", url=livekit_url, token=livekit_token,
                            disclosure=request.disclosure)
        session = SimliSession(self, vendor_session_id=vendor_session_id, join=join,
                               socket=socket, incoming=incoming, receiver=receiver)
        relay.session = session
        if relay.failed is not None:
            session._on_media_failed(relay.failed)
        logger.info("%s session %s started (%s)", self.instance_name, vendor_session_id,
                    self.settings.transport)
        return session

    async def _handshake(self, socket: VendorSocket, incoming: AsyncGenerator[str | bytes, None],
                         receiver: WebRTCReceiver | None) -> tuple[str | None, str | None]:
        """Offer/answer (P2P) or the LiveKit join info, then wait for ``START``."""
        provider = self.instance_name
        if receiver is not None:
            await socket.send_json({"type": "offer", "sdp": await receiver.offer()})
        answered = receiver is None
        livekit_url: str | None = None
        livekit_token: str | None = None
        end_reason: str | None = None
        while True:
            try:
                frame = await anext(incoming)
            except StopAsyncIteration:
                raise ProviderConnectionError(
                    f"Simli closed the WebSocket before START (code {socket.close_code})",
                    provider=provider) from None
            line = (frame.decode("utf-8", "replace") if isinstance(frame, bytes)
                    else frame).strip()
            if line.startswith("{"):
                message = _json_object(line) or {}
                if receiver is not None and message.get("type") == "answer":
                    sdp = message.get("sdp")
                    if not isinstance(sdp, str) or not sdp:
                        raise ServerError("Simli's SDP answer has no sdp", provider=provider,
                                          retryable=False)
                    await receiver.accept_answer(sdp)
                    answered = True
                elif isinstance(message.get("livekit_url"), str):
                    livekit_url = message["livekit_url"]
                    token = message.get("livekit_token")
                    livekit_token = token if isinstance(token, str) else None
                else:
                    logger.debug("%s: JSON message before START ignored", provider)
                continue
            if line == "START":
                if not answered:
                    raise ServerError("Simli sent START without an SDP answer",
                                      provider=provider, retryable=False)
                if receiver is None and (livekit_url is None or livekit_token is None):
                    raise ServerError("Simli sent START without the LiveKit room's url and "
                                      "token", provider=provider, retryable=False)
                return livekit_url, livekit_token
            if (error := _line_error(line, provider)) is not None:
                raise error
            if line.startswith(("CLOSING REASON", "STOP REASON")):
                end_reason = line.partition(":")[2].strip()
            elif line == "STOP":
                raise ServerError(f"Simli ended the session before START: "
                                  f"{end_reason or 'no reason given'}", provider=provider)
            else:
                logger.debug("%s: %r before START ignored", provider, line[:_MAX_LINE])

    async def probe(self) -> None:
        # Current usage: authenticated, unbilled, cheap.
        await self.api.request_json("GET", "/ratelimiter/sessions")

    async def find_session(self, *, session_id: str, idempotency_key: str) -> str | None:
        """Always None: a Simli session lives only while the WebSocket that started it is
        open, and a start that failed (or a process that died) closed its socket. A token
        whose answer was lost started nothing (Simli lists no sessions by name to ask)."""
        return None


async def _shutdown(socket: VendorSocket, incoming: AsyncGenerator[str | bytes, None],
                    receiver: WebRTCReceiver | None,
                    reader: asyncio.Task[None] | None = None) -> None:
    """End a Simli session: ``DONE`` (best effort), stop reading, close the socket and peer."""
    if socket.connected and socket.close_code is None:
        with contextlib.suppress(ProviderError, TimeoutError):
            async with asyncio.timeout(_DONE_TIMEOUT):
                await socket.send_text("DONE")
    if reader is not None:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
    try:
        await incoming.aclose()
    finally:
        try:
            await socket.aclose()
        finally:
            if receiver is not None:
                await receiver.aclose()


@dataclass(slots=True)
class _Utterance:
    """An utterance whose audio was sent and whose end Simli has not reported yet."""

    id: str
    ended: bool = False
    started: bool = False
    #: seconds Simli spoke it in earlier SPEAK..SILENT spans (buffer underruns)
    spoken: float = 0.0


class SimliSession(ProviderSession):
    """One Simli session: its WebSocket, and the WebRTC peer for P2P."""

    def __init__(
        self,
        provider: SimliProvider,
        *,
        vendor_session_id: str,
        join: JoinInfo,
        socket: VendorSocket,
        incoming: AsyncGenerator[str | bytes, None],
        receiver: WebRTCReceiver | None,
    ) -> None:
        super().__init__(provider=provider.instance_name, vendor_session_id=vendor_session_id,
                         join=join)
        self._socket = socket
        self._incoming = incoming
        self._receiver = receiver
        self._frame_bytes = provider.settings.frame_bytes
        self._buffer = bytearray()
        self._playing: deque[_Utterance] = deque()
        self._skipped: list[_Utterance] = []
        self._epoch = 0  # bumped by interrupt(): frames of an older epoch are not sent
        self._speaking = False
        self._speak_at: float | None = None  # when the current SPEAK..SILENT span began
        self._interrupting = False  # SKIP sent, its SILENT not seen yet
        self._speaking_at_skip = False
        self._sent_since_skip = False  # audio went out after the SKIP
        self._closing = False
        self._reported_end = False
        self._ending = False
        self._end_reason: str | None = None
        #: what Simli said about the video (LiveKit channel): fps, width, height
        self.video_metadata: dict[str, Any] | None = None
        self._reader = asyncio.create_task(self._read(),
                                           name=f"simli-{vendor_session_id[:8]}-reader")

    # -- audio up ---------------------------------------------------------------------------

    def _utterance(self, utterance_id: str) -> _Utterance:
        last = self._playing[-1] if self._playing else None
        if last is None or last.id != utterance_id:
            last = _Utterance(utterance_id)
            self._playing.append(last)
        return last

    async def send_audio(self, chunk: AudioChunk, *, utterance_id: str) -> None:
        self._utterance(utterance_id)
        size = self._frame_bytes
        epoch = self._epoch
        buffer = self._buffer
        buffer += chunk.to_pcm16()
        whole = len(buffer) - len(buffer) % size
        if not whole:
            return
        with memoryview(buffer) as view:  # released before the buffer shrinks
            frames = [bytes(view[offset:offset + size]) for offset in range(0, whole, size)]
        del buffer[:whole]
        for frame in frames:
            if epoch != self._epoch:
                return  # interrupted while sending: the rest is dropped
            self._sent_since_skip = self._interrupting
            await self._socket.send_bytes(frame)

    async def end_utterance(self, *, utterance_id: str) -> None:
        rest = bytes(self._buffer)
        self._buffer.clear()
        if rest:
            self._sent_since_skip = self._interrupting
            await self._socket.send_bytes(rest)  # the final, shorter frame
        entry = next((u for u in self._playing if u.id == utterance_id), None)
        if entry is None:
            return  # no audio at all: nothing to play or report
        entry.ended = True
        if (not rest and entry is self._playing[0] and entry.started
                and not self._speaking):
            # Simli already went silent (its queue ran dry) and nothing more is coming.
            self._playing.popleft()
            self._emit(PlaybackFinished(utterance_id=entry.id, duration=entry.spoken,
                                        interrupted=False))

    async def interrupt(self) -> None:
        self._buffer.clear()
        self._epoch += 1
        self._skipped.extend(self._playing)
        self._playing.clear()
        self._interrupting = True
        self._speaking_at_skip = self._speaking
        self._sent_since_skip = False
        await self._socket.send_text("SKIP")

    # -- status down ------------------------------------------------------------------------

    async def _read(self) -> None:
        try:
            async for frame in self._incoming:
                text = frame.decode("utf-8", "replace") if isinstance(frame, bytes) else frame
                self._on_line(text.strip())
        except ProviderConnectionError as exc:
            if self._ending:
                self._report_vendor_end()
            else:
                self._report(VendorSessionEnded(reason="Simli WebSocket dropped",
                                                billing_stopped=False, error=exc))
            return
        if self._ending:
            self._report_vendor_end()
        else:
            self._report(VendorSessionEnded(
                reason="Simli closed the WebSocket", billing_stopped=False,
                error=ProviderConnectionError(
                    f"Simli closed the WebSocket (code {self._socket.close_code})",
                    provider=self.provider)))

    def _on_line(self, line: str) -> None:
        if line == "SPEAK":
            self._on_speak()
        elif line == "SILENT":
            self._on_silent()
        elif line.startswith("ENDFRAME"):
            self._ending = True
        elif line.startswith(("CLOSING REASON", "STOP REASON")):
            self._ending = True
            self._end_reason = line.partition(":")[2].strip() or None
        elif line == "STOP":
            self._report_vendor_end()
        elif (error := _line_error(line, self.provider)) is not None:
            self._vendor_stopped_billing()
            self._report(VendorSessionEnded(reason=f"Simli: {line[:_MAX_LINE]}",
                                            billing_stopped=True, error=error))
        elif line.startswith("{"):
            message = _json_object(line) or {}
            metadata = message.get("video_metadata")
            if isinstance(metadata, dict):
                self.video_metadata = metadata
            else:
                logger.debug("%s: JSON message ignored (keys %s)", self.provider,
                             sorted(message)[:5])
        else:  # START again, ACK, pong, WARNING: ..., camera/background notices
            logger.debug("%s: %r", self.provider, line[:_MAX_LINE])

    def _span(self) -> float:
        """Seconds of the SPEAK..SILENT span that just ended (0 when none was open)."""
        began, self._speak_at = self._speak_at, None
        return time.monotonic() - began if began is not None else 0.0

    def _on_speak(self) -> None:
        self._speaking = True
        if self._speak_at is None:
            self._speak_at = time.monotonic()
        if self._interrupting:
            if not (self._speaking_at_skip or self._sent_since_skip):
                return  # sent before Simli saw the SKIP (it was silent then): the ack follows
            # Speech after the SKIP without a SILENT first: this vendor did not acknowledge it.
            self._interrupting = False
            self._skipped.clear()
        head = self._playing[0] if self._playing else None
        if head is not None and not head.started:
            head.started = True
            self._emit(PlaybackStarted(utterance_id=head.id))

    def _on_silent(self) -> None:
        self._speaking = False
        span = self._span()
        if self._interrupting:
            self._interrupting = False
            skipped, self._skipped = self._skipped, []
            if not skipped:
                self._emit(PlaybackFinished(utterance_id=None, duration=None, interrupted=True))
            for index, entry in enumerate(skipped):
                # the oldest was playing (for ``spoken`` + this span); the rest never started
                spoken = entry.spoken + span if index == 0 and entry.started else entry.spoken
                self._emit(PlaybackFinished(utterance_id=entry.id, duration=spoken,
                                            interrupted=True))
            return
        head = self._playing[0] if self._playing else None
        finished: list[_Utterance] = []
        while self._playing and self._playing[0].ended:
            finished.append(self._playing.popleft())
        if head is not None and head.started:
            head.spoken += span
        # one span per utterance: its length is what was spoken; several share it unknown
        alone = len(finished) == 1 and finished[0].started
        for entry in finished:
            if not entry.started:
                self._emit(PlaybackStarted(utterance_id=entry.id))
            self._emit(PlaybackFinished(utterance_id=entry.id,
                                        duration=entry.spoken if alone else None,
                                        interrupted=False))

    def _report_vendor_end(self) -> None:
        self._vendor_stopped_billing()
        code = (self._end_reason or "").upper()
        if code in _DELIBERATE_ENDS:
            reason = f"Simli {_DELIBERATE_ENDS[code]}"
        else:
            reason = f"ended by Simli: {self._end_reason or 'no reason given'}"
        self._report(VendorSessionEnded(reason=reason, billing_stopped=True,
                                        recoverable=code not in _DELIBERATE_ENDS))

    def _on_media_failed(self, reason: str) -> None:
        self._report(VendorSessionEnded(
            reason=f"Simli {reason}", billing_stopped=False,
            error=ProviderConnectionError(reason, provider=self.provider)))

    def _report(self, ended: VendorSessionEnded) -> None:
        """Report the session's end once (nothing after our own end started)."""
        if self._closing or self._reported_end:
            return
        self._reported_end = True
        self._emit(ended)

    # -- video, end -------------------------------------------------------------------------

    def video_frames(self) -> AsyncIterator[VideoFrame]:
        if self._receiver is None:
            return super().video_frames()
        return self._receiver.frames()

    async def _end_at_vendor(self) -> None:
        self._closing = True
        await _shutdown(self._socket, self._incoming, self._receiver, self._reader)
