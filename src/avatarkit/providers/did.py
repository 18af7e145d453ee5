"""D-ID Agents streams (v1): D-ID's face over a peer-to-peer WebRTC stream, our audio.
(``transport = "livekit"``, D-ID's avatar in your own LiveKit room, is in ``_did_livekit``.)

Wire contract (``shared/research/vendor-contracts.md`` §5): ``POST /agents/{agent_id}/streams``
(``Authorization: Basic <api key>``) creates a stream and **starts billing**; D-ID answers with
an SDP offer, ICE servers and an opaque ``session_id`` that every later call echoes. We answer
with aiortc (``POST .../sdp``), trickle our candidates (``POST .../ice``, then an
end-of-candidates post), and receive the face as video in this process
(``AvatarSession.video()``). ``DELETE /agents/{agent_id}/streams/{stream_id}`` ends it.

v1 streams take no raw PCM: a script is text or an audio URL. Audio therefore goes per clip:
the utterance's PCM16 16 kHz mono is buffered, cut into clips of at most ``max_clip_s`` seconds
(so a long utterance starts playing before it ends), each encoded as WAV, uploaded with ``POST
/audios`` (multipart) and spoken with ``{"type": "audio", "audio_url"}``, one clip at a time and
in order. Playback events arrive on the offer's data channel: ``stream/started`` and
``stream/done`` per clip (``{"metadata": {"videoId"}}``), ``stream/ready`` after a warm-up.
Only fluent streams can be interrupted: ``{"type": "stream/interrupt", "videoId", "timestamp"}``
on the data channel, as D-ID's client SDK sends it.

A non-fluent stream cannot be stopped mid-clip: ``interrupt()`` drops what was not sent yet
and raises ``CapabilityError`` when D-ID already has clips (they play out); the profile says
``interrupt=False`` unless ``fluent = true``.

Errors are D-ID's ``{kind, description}`` bodies, typed by status: 401 ``AuthenticationError``,
402 ``BillingError`` (``InsufficientCreditsError``), 404 ``NotFoundError``, 409 ``NotReadyError``
(an ``InvalidRequestError`` that is retried), 451 moderation (an ``InvalidRequestError``,
permanent), 5xx ``ServerError``. A WebRTC connection that fails or closes while the session
is live is ``VendorSessionEnded(billing_stopped=False)``: D-ID may still bill the stream, and
the close path deletes it. The vendor session id is ``"<agent id>/<stream id>"``;
``end_session`` (the reaper) deletes without the ``session_id`` it never saw, which D-ID's spec
allows but may refuse: that is a ``CapabilityError`` (the stream then ends after
``session_timeout`` seconds without messages).

Latency: D-ID's own start-of-speech latency is quoted at 0.5-2 s by a third party; on top of
it, a clip is uploaded only once ``max_clip_s`` seconds of it are buffered (or the utterance
ends), so speech starts up to ``max_clip_s`` later than the audio began.

Why one module: the D-ID adapter is one vendor contract, the streams API, whose calls are
ordered by the vendor (create, SDP answer, ICE, clips, delete) and share one session
record; its LiveKit mode already lives in ``_did_livekit.py``. Splitting the streams
lifecycle across modules would scatter one wire protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import time
import wave
from collections import deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import httpx
from pydantic import Field, SecretStr

from ..contract import (
    Capabilities,
    MaxDurationTimer,
    PlaybackFinished,
    PlaybackStarted,
    Provider,
    ProviderProfile,
    ProviderSession,
    ProviderSettings,
    SessionRequest,
    VendorSessionEnded,
    wait_unless_lost,
)
from ..errors import (
    AuthenticationError,
    BillingError,
    CapabilityError,
    ConfigError,
    InvalidRequestError,
    MediaFormatError,
    NotFoundError,
    ProviderConnectionError,
    ProviderError,
    ProviderTimeoutError,
    ServerError,
)
from ..join import JoinInfo
from ..media import AudioChunk, AudioFormat, VideoFrame
from ..transport.livekit import http_url
from ..transport.receiver import WebRTCReceiver, ice_servers_from
from ..vendor_http import VendorHttp
from ._did_livekit import (
    ROOM_PREFIX,
    DIDLiveKitSession,
    end_room_session,
    find_room_session,
    start_room_session,
)

__all__ = ["DIDLiveKitSession", "DIDProvider", "DIDSession", "DIDSettings"]

logger = logging.getLogger("avatarkit.providers.did")

_SAMPLE_RATE = 16_000
_BYTES_PER_SECOND = _SAMPLE_RATE * 2
_MAX_SESSION_TIMEOUT = 300


class DIDSettings(ProviderSettings):
    """``[providers.did]``. The avatar mapping names the D-ID agent: ``[avatars.amelia] did =
    "<agent id>"``."""

    base_url: str | None = "https://api.d-id.com"
    fluent: bool = Field(
        default=False, description="Request a fluent stream: the only kind D-ID lets you "
        "interrupt (interrupt capability follows this).")
    stream_warmup: bool = Field(
        default=False, description="D-ID streams warm-up video first; start() waits for its "
        "stream/ready message.")
    session_timeout_s: int | None = Field(
        default=None, ge=1, le=_MAX_SESSION_TIMEOUT, description="Seconds without a message "
        "before D-ID ends the stream (D-ID's default when unset; needs a permission at D-ID).")
    compatibility_mode: Literal["on", "off", "auto"] | None = Field(
        default=None, description="Video codec: on = VP8, off = H264, auto = by the client.")
    interrupt_message: dict[str, str] = Field(
        default_factory=lambda: {"type": "stream/interrupt"},
        description="The data-channel interrupt (fluent streams); videoId and timestamp are "
        "added.")
    max_clip_s: float = Field(
        default=8.0, ge=0.2, le=60.0, description="Longest clip uploaded at once: a longer "
        "utterance is spoken in pieces, so it starts playing before it ends.")
    connect_timeout_s: float = Field(
        default=10.0, gt=0, le=120, description="How long start() waits for the WebRTC "
        "connection, its data channel and (with stream_warmup) stream/ready.")
    trickle_ice: bool = Field(
        default=True, description="Also post each local candidate to .../ice (the answer SDP "
        "already holds them), then an end-of-candidates marker.")
    interrupt_clears_queue: bool = Field(
        default=True, description="D-ID drops the clips queued behind the one an interrupt "
        "stops (unverified). When false, each such clip is interrupted as it starts.")
    transport: Literal["streams", "livekit"] = Field(
        default="streams", description="'streams': Agents streams v1 (D-ID's WebRTC offer, "
        "frames in this process). 'livekit': sessions/join, D-ID's avatar joins a room on "
        "your LiveKit server (livekit_* settings) and viewers join that room.")
    livekit_url: str | None = Field(
        default=None, description="Your LiveKit server (wss://...), for transport = "
        "\"livekit\".")
    livekit_api_key: SecretStr | None = None
    livekit_api_secret: SecretStr | None = None
    livekit_room: str | None = Field(
        default=None, description="One fixed room for every session (then one session at a "
        "time). By default each session gets its own room, named after its start attempt.")
    livekit_sample_rate: Literal[16000, 24000, 48000] = Field(
        default=24_000, description="The rate D-ID's avatar takes audio at (audio_config).")
    agent_identity: str = Field(default="avatarkit-agent", min_length=1,
                                description="Our participant's identity in the room.")
    avatar_identity: str = Field(default="d-id-avatar-agent", min_length=1,
                                 description="The identity D-ID's avatar joins with.")
    viewer_token_ttl_s: float = Field(
        default=3600.0, gt=0, le=86_400, description="Lifetime of the viewers' room token "
        "(JoinInfo.token): how long after the start a viewer may still join.")


@dataclass(eq=False)
class _Clip:
    """One piece of an utterance on its way to D-ID, and then playing there."""

    utterance_id: str
    pcm: bytes | None = None
    text: str | None = None
    last: bool = False
    cancelled: bool = False
    spoken: bool = False
    started: bool = False
    video_id: str | None = None
    handled: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def seconds(self) -> float:
        return len(self.pcm) / _BYTES_PER_SECOND if self.pcm is not None else 0.0


def _wav(pcm: bytes) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(_SAMPLE_RATE)
        wav.writeframes(pcm)
    return out.getvalue()


def _video_id(payload: Mapping[str, Any]) -> str | None:
    metadata = payload.get("metadata")
    found = metadata.get("videoId") if isinstance(metadata, Mapping) else None
    found = found or payload.get("videoId")
    return found if isinstance(found, str) and found else None


class DIDProvider(Provider):
    """D-ID Agents streams v1 (WebRTC offer from D-ID; audio as uploaded clips)."""

    name = "did"
    settings_model = DIDSettings
    wire = ("`POST /agents/{agent_id}/streams` (Basic auth) starts billing and returns D-ID's "
            "SDP offer, ICE servers and a `session_id` echoed in every call; aiortc answers "
            "(`.../sdp`, candidates trickled to `.../ice`) and receives the video here. Audio: "
            "PCM16 16 kHz mono cut into clips of `max_clip_s`, each a WAV uploaded to "
            "`POST /audios` and spoken with `{type: audio, audio_url}`; text with "
            "`{type: text}`. Events `stream/started|done|ready` on the data channel; fluent "
            "streams interrupt with `stream/interrupt`. `DELETE .../streams/{id}` on every "
            "exit. Health probe: `GET /credits`. With `transport = \"livekit\"`: "
            "`POST /v2/agents/{agent_id}/sessions/join` sends D-ID's avatar into a room on your "
            "LiveKit server with a token we mint; audio as `lk.audio_stream` byte streams, "
            "text on `did.speak`, interrupts by the `lk.clear_buffer` RPC, "
            "`lk.playback_started|finished` back; ended by removing the avatar from the room "
            "(RoomService).")
    unverified = (
        "The fluent interrupt message and its acknowledgement (taken from D-ID's client SDK: "
        "`{type: stream/interrupt, videoId}`; the ack is read as the clip's `stream/done`).",
        "That an interrupt also drops the clips queued behind the one playing "
        "(`interrupt_clears_queue`).",
        "How D-ID signals a stream it ended itself (timeout): only the connection closing is "
        "seen, so billing is assumed to continue until the DELETE.",
        "Whether DELETE works without the stream's `session_id` (the reaper has none).",
        "Price, rate limits (no 429 in the spec), concurrency limits, regions, latency.",
        "sessions/join: the answer beyond `{id}`; that removing the avatar from the room ends "
        "D-ID's billing (there is no end call); playback events for `did.speak` text.",
    )
    documented_variants: ClassVar[dict[str, dict[str, object]]] = {
        "": {}, "fluent": {"fluent": True},
        "livekit": {"transport": "livekit", "livekit_url": "wss://livekit.example.com",
                    "livekit_api_key": "placeholder", "livekit_api_secret": "placeholder"}}
    # A create whose answer is lost leaves a billed stream we have no id for, and D-ID cannot
    # list streams (find_session cannot help): it ends after session_timeout without messages.
    # Failures after the create are not uncertain: the stream is deleted and they are raised
    # as ServerError, so the kit does not go looking for it.
    uncertain_creates = True

    def __init__(self, settings: ProviderSettings, *, http: httpx.AsyncClient,
                 instance_name: str | None = None) -> None:
        super().__init__(settings, http=http, instance_name=instance_name)
        assert isinstance(settings, DIDSettings)
        self.settings: DIDSettings = settings
        section = f"providers.{self.instance_name}"
        livekit = settings.transport == "livekit"
        if livekit:
            for key in ("livekit_url", "livekit_api_key", "livekit_api_secret"):
                if getattr(settings, key) is None:
                    raise ConfigError("required with transport = \"livekit\" (your LiveKit "
                                      "server and its API key and secret)",
                                      field=f"{section}.{key}")
            assert settings.livekit_url is not None
            try:
                http_url(settings.livekit_url)
            except ValueError as exc:
                raise ConfigError(str(exc), field=f"{section}.livekit_url") from None
        elif not WebRTCReceiver.available():
            raise ConfigError("D-ID streams need aiortc: pip install 'avatarkit[webrtc]'",
                              field=section)
        api_key = settings.api_key
        if api_key is None:
            raise ConfigError("required (e.g. api_key = \"env:DID_API_KEY\")",
                              field=f"providers.{self.instance_name}.api_key")
        assert settings.base_url is not None
        self._api_key = api_key
        self.api = VendorHttp(
            provider=self.instance_name,
            client=http,
            base_url=settings.base_url,
            auth_headers=self._auth_headers,
            retry=settings.retry,
            timeout=settings.timeout,
        )
        self._profile = self._build_profile(
            capabilities=Capabilities(
                audio_input=True, text_input=True, interrupt=livekit or settings.fluent,
                playback_events=True, frames_in_process=not livekit,
                join_kinds=frozenset({"livekit" if livekit else "webrtc"})),
            audio_format=AudioFormat(settings.livekit_sample_rate if livekit else _SAMPLE_RATE,
                                     1),
            # [3p] 0.5-2 s; speech also waits for a clip to fill (up to max_clip_s).
            first_frame_latency_ms=2000.0,
        )

    def _auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Basic {self._api_key.get_secret_value()}"}

    @property
    def profile(self) -> ProviderProfile:
        return self._profile

    def _create_body(self) -> dict[str, Any]:
        s = self.settings
        body: dict[str, Any] = {"fluent": s.fluent, "stream_warmup": s.stream_warmup}
        if s.session_timeout_s is not None:
            body["session_timeout"] = s.session_timeout_s
        if s.compatibility_mode is not None:
            body["compatibility_mode"] = s.compatibility_mode
        return body

    async def start(self, request: SessionRequest) -> DIDSession | DIDLiveKitSession:
        if self.settings.transport == "livekit":
            return await start_room_session(self, request)
        agent_id = request.avatar_id
        data = await self.api.request_json(
            "POST", f"/agents/{agent_id}/streams", json=self._create_body(),
            idempotency_key=request.idempotency_key)
        stream_id = data.get("id")
        if not isinstance(stream_id, str) or not stream_id:
            raise ProviderError("stream create returned no stream id",
                                provider=self.instance_name, retryable=False)
        cookie = data.get("session_id")
        session = DIDSession(
            self, agent_id=agent_id, stream_id=stream_id,
            cookie=cookie if isinstance(cookie, str) and cookie else None,
            join=JoinInfo(kind="webrtc", disclosure=request.disclosure),
            ice_servers=ice_servers_from(data.get("ice_servers")),
            max_duration_s=request.max_duration_s)
        # Billing runs from here: every failure below must delete the stream.
        try:
            jsep = data.get("jsep")
            offer = jsep.get("sdp") if isinstance(jsep, dict) and jsep.get("type") == "offer" \
                else None
            if not isinstance(offer, str) or not offer:
                raise ProviderError(f"stream {stream_id} was created without an SDP offer",
                                    provider=self.instance_name, retryable=False)
            await session._connect(offer)
        except BaseException as exc:
            deleted = await asyncio.shield(session._abandon())
            if deleted and isinstance(exc, ProviderConnectionError | ProviderTimeoutError):
                # Not an uncertain create: the stream existed and is deleted. Say so with a
                # category that does not send the kit looking for it.
                raise ServerError(f"{exc.message} (the stream was deleted)",
                                  provider=self.instance_name, retryable=True) from exc
            raise
        return session

    async def probe(self) -> None:
        # The credit balance is authenticated, unbilled and cheap.
        await self.api.request_json("GET", "/credits")

    async def end_session(self, vendor_session_id: str) -> None:
        if vendor_session_id.startswith(ROOM_PREFIX):
            if self.settings.transport != "livekit":
                raise CapabilityError(f"{self.instance_name}: {vendor_session_id!r} is a "
                                      "LiveKit room session; ending it needs the livekit_* "
                                      "settings it was started with")
            await end_room_session(self, vendor_session_id)
            return
        agent_id, sep, stream_id = vendor_session_id.rpartition("/")
        if not sep or not agent_id or not stream_id:
            raise InvalidRequestError(
                f"{vendor_session_id!r} is not a D-ID vendor session id (agent id/stream id)",
                provider=self.instance_name)
        try:
            await self._delete_stream(agent_id, stream_id, None)
        except InvalidRequestError as exc:
            raise CapabilityError(
                f"{self.instance_name}: D-ID refused to delete stream {stream_id} without its "
                f"session_id, which only the process that created it had ({exc.message}); "
                "D-ID ends it after session_timeout seconds without messages") from exc

    async def find_session(self, *, session_id: str, idempotency_key: str) -> str | None:
        if self.settings.transport != "livekit":
            # D-ID cannot list streams: a stream whose create answer was lost ends after
            # session_timeout seconds without messages.
            return await super().find_session(session_id=session_id,
                                              idempotency_key=idempotency_key)
        return await find_room_session(self, idempotency_key)

    async def _delete_stream(self, agent_id: str, stream_id: str, cookie: str | None) -> None:
        body = {"session_id": cookie} if cookie is not None else {}
        try:
            await self.api.request("DELETE", f"/agents/{agent_id}/streams/{stream_id}",
                                   json=body)
        except NotFoundError:
            logger.info("%s: stream %s was already gone", self.instance_name, stream_id)

    async def _speak(self, agent_id: str, stream_id: str, cookie: str | None,
                     script: dict[str, str]) -> None:
        body: dict[str, Any] = {"script": script}
        if cookie is not None:
            body["session_id"] = cookie
        await self.api.request_json("POST", f"/agents/{agent_id}/streams/{stream_id}",
                                    json=body)

    async def _upload_wav(self, wav: bytes) -> str:
        """``POST /audios`` (multipart ``audio``): the uploaded file's URL."""
        body = await self.api.request_json(
            "POST", "/audios", files={"audio": ("audio.wav", wav, "audio/wav")})
        url = body.get("url")
        if not isinstance(url, str) or not url:
            raise ServerError("POST /audios answered without an audio url",
                              provider=self.instance_name, retryable=False)
        return url


class DIDSession(ProviderSession):
    """One D-ID Agents stream: WebRTC media in, clips out."""

    def __init__(self, provider: DIDProvider, *, agent_id: str, stream_id: str,
                 cookie: str | None, join: JoinInfo, ice_servers: list[dict[str, Any]],
                 max_duration_s: float | None) -> None:
        super().__init__(provider=provider.instance_name,
                         vendor_session_id=f"{agent_id}/{stream_id}", join=join)
        self._provider = provider
        self._settings = provider.settings
        self.agent_id = agent_id
        self.stream_id = stream_id
        self._cookie = cookie
        self._max_duration = MaxDurationTimer(max_duration_s, self._signal_end)
        self._fluent = provider.settings.fluent
        self._clip_bytes = int(provider.settings.max_clip_s * _SAMPLE_RATE) * 2
        self._receiver = WebRTCReceiver(
            provider=provider.instance_name, ice_servers=ice_servers,
            on_message=self._on_data, on_closed=self._on_connection_lost)
        self._buffer = bytearray()
        self._buffer_utterance: str | None = None
        self._queue: asyncio.Queue[_Clip] = asyncio.Queue()
        self._pending: list[_Clip] = []  # queued here, not yet spoken
        self._spoken: deque[_Clip] = deque()  # accepted by D-ID (or being), not done
        self._speak_lock = asyncio.Lock()
        self._uploader: asyncio.Task[None] | None = None
        self._failure: ProviderError | None = None  # a background error not yet raised
        self._lost: ProviderError | None = None  # the connection died
        self._lost_event = asyncio.Event()
        self._ready = asyncio.Event()
        self._started_utterances: set[str] = set()
        self._played: dict[str, float] = {}  # seconds played per utterance
        self._last_utterance: str | None = None
        self._ack_target: str | None = None  # utterance whose interrupt awaits the ack
        self._ack_video: str | None = None  # the clip whose end is that ack
        self._stale_videos: set[str] = set()  # interrupted clips: their messages are ignored
        self._closing = False
        self._end_signalled = False

    # -- setup ------------------------------------------------------------------------------

    async def _connect(self, offer: str) -> None:
        """Answer D-ID's offer, trickle our candidates and wait until the stream can speak."""
        s = self._settings
        answer = await self._receiver.answer(offer)
        await self._provider.api.request_json("POST", self._path("/sdp"), json=self._with_cookie(
            {"answer": {"type": "answer", "sdp": answer}}))
        # The answer already holds every candidate, so the connection comes up meanwhile.
        trickle = asyncio.ensure_future(self._trickle()) if s.trickle_ice else None
        try:
            await self._wait_usable()
            if trickle is not None:
                await trickle
        finally:
            if trickle is not None and not trickle.done():
                trickle.cancel()
                await asyncio.gather(trickle, return_exceptions=True)
        self._uploader = asyncio.create_task(self._upload_loop(),
                                             name=f"did-{self.stream_id}-uploader")
        self._max_duration.arm()

    def _path(self, tail: str = "") -> str:
        return f"/agents/{self.agent_id}/streams/{self.stream_id}{tail}"

    async def _trickle(self) -> None:
        """Post our candidates to ``.../ice`` (concurrently, as a browser trickles them),
        then the end-of-candidates marker (a body without a candidate)."""
        api = self._provider.api
        await asyncio.gather(*(
            api.request_json("POST", self._path("/ice"), json=self._with_cookie({
                "candidate": candidate.candidate, "sdpMid": candidate.sdp_mid,
                "sdpMLineIndex": candidate.sdp_mline_index}))
            for candidate in self._receiver.local_candidates()))
        await api.request_json("POST", self._path("/ice"), json=self._with_cookie({}))

    async def _wait_usable(self) -> None:
        """Wait (at most ``connect_timeout_s``) until the stream can speak, or fail fast when
        the connection dies first."""
        s = self._settings
        if await wait_unless_lost(self._usable(), self._lost_event, within=s.connect_timeout_s):
            return
        if self._lost is not None:
            raise self._lost
        what = "stream/ready" if s.stream_warmup else "the WebRTC connection"
        raise ProviderTimeoutError(
            f"stream {self.stream_id}: {what} did not come within {s.connect_timeout_s:g} s",
            provider=self.provider)

    async def _usable(self) -> None:
        await self._receiver.connected.wait()
        await self._receiver.data_channel_open.wait()
        if self._settings.stream_warmup:
            await self._ready.wait()

    def _with_cookie(self, body: dict[str, Any]) -> dict[str, Any]:
        if self._cookie is not None:
            body["session_id"] = self._cookie
        return body

    async def _abandon(self) -> bool:
        """Delete the stream and close the media after a failed start. True when D-ID
        confirmed the delete (or had no such stream any more)."""
        self._closing = True
        try:
            await self._stop_uploader()
            await self._provider._delete_stream(self.agent_id, self.stream_id, self._cookie)
        except ProviderError as exc:
            logger.error("%s: could not delete stream %s after a failed start: %s",
                         self.provider, self.stream_id, exc)
            return False
        finally:
            await self._receiver.aclose()
        return True

    # -- speaking -----------------------------------------------------------------------------

    async def send_audio(self, chunk: AudioChunk, *, utterance_id: str) -> None:
        self._raise_failure()
        if self._buffer_utterance not in (None, utterance_id) and self._buffer:
            self._enqueue(_Clip(self._buffer_utterance, pcm=bytes(self._buffer), last=True))
            self._buffer.clear()
        self._buffer_utterance = utterance_id
        self._last_utterance = utterance_id
        self._buffer += chunk.to_pcm16()
        # Strictly more than one clip: a non-empty rest stays for end_utterance's last clip.
        while len(self._buffer) > self._clip_bytes:
            piece = bytes(self._buffer[:self._clip_bytes])
            del self._buffer[:self._clip_bytes]
            self._enqueue(_Clip(utterance_id, pcm=piece))

    async def end_utterance(self, *, utterance_id: str) -> None:
        """Send the rest of the utterance; returns once D-ID accepted every clip of it, and
        raises the first error any clip met since the last call."""
        if self._lost is not None:
            raise self._lost
        if self._buffer_utterance != utterance_id or not self._buffer:
            # No audio held back: the utterance had none (nothing to speak).
            self._buffer_utterance = None
            self._emit(PlaybackFinished(utterance_id=utterance_id, duration=0.0,
                                        interrupted=False))
            self._raise_failure()
            return
        clip = self._enqueue(_Clip(utterance_id, pcm=bytes(self._buffer), last=True))
        self._buffer.clear()
        self._buffer_utterance = None
        await clip.handled.wait()
        self._raise_failure()

    async def say(self, text: str, *, utterance_id: str) -> None:
        """Speak ``text`` in the agent's own voice (D-ID's text script, 3 to 40000
        characters). Returns once D-ID accepted it; playback events follow as for audio."""
        if not isinstance(text, str) or not 3 <= len(text) <= 40_000:
            raise MediaFormatError(f"got {len(text) if isinstance(text, str) else text!r}",
                                   field="text", expected="a string of 3 to 40000 characters")
        self._raise_failure()
        self._last_utterance = utterance_id
        clip = self._enqueue(_Clip(utterance_id, text=text, last=True))
        await clip.handled.wait()
        self._raise_failure()

    def _enqueue(self, clip: _Clip) -> _Clip:
        self._pending.append(clip)
        self._queue.put_nowait(clip)
        return clip

    def _raise_failure(self) -> None:
        if self._lost is not None:
            raise self._lost
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure

    async def _upload_loop(self) -> None:
        """Upload and speak queued clips, one at a time, in order."""
        while True:
            clip = await self._queue.get()
            try:
                if clip.cancelled:
                    continue
                script: dict[str, str]
                if clip.pcm is not None:
                    url = await self._provider._upload_wav(_wav(clip.pcm))
                    script = {"type": "audio", "audio_url": url}
                else:
                    script = {"type": "text", "input": clip.text or ""}
                async with self._speak_lock:
                    if clip.cancelled:
                        continue
                    self._remove_pending(clip)
                    # Listed before the call: stream/started may beat the response.
                    clip.spoken = True
                    self._spoken.append(clip)
                    try:
                        await self._provider._speak(self.agent_id, self.stream_id,
                                                    self._cookie, script)
                    except BaseException:
                        if not clip.started and clip in self._spoken:
                            self._spoken.remove(clip)
                        clip.spoken = False
                        raise
            except ProviderError as exc:
                self._clip_failed(clip, exc)
            except Exception as exc:  # a bug here must not leave end_utterance() waiting
                logger.exception("%s: sending a clip failed", self.provider)
                self._clip_failed(clip, ProviderError(
                    f"sending a clip failed: {type(exc).__name__}: {exc}",
                    provider=self.provider, retryable=False))
            finally:
                self._remove_pending(clip)
                clip.handled.set()

    def _remove_pending(self, clip: _Clip) -> None:
        with contextlib.suppress(ValueError):
            self._pending.remove(clip)

    def _clip_failed(self, clip: _Clip, error: ProviderError) -> None:
        logger.warning("%s: a clip of utterance %s failed: %s", self.provider,
                       clip.utterance_id, error)
        if self._failure is None:
            self._failure = error
        if clip.last:
            self._close_utterance_early(clip.utterance_id)
        if isinstance(error, NotFoundError):
            # The stream is gone at D-ID (it ended it, e.g. a timeout): billing stopped.
            self._vendor_stopped_billing()
            self._signal_end(VendorSessionEnded(
                reason=f"D-ID stream {self.stream_id} no longer exists", billing_stopped=True,
                error=error, recoverable=False))
        elif isinstance(error, AuthenticationError | BillingError):
            self._signal_end(VendorSessionEnded(
                reason=f"D-ID refused to speak: {error.message}", billing_stopped=False,
                error=error))

    def _close_utterance_early(self, utterance_id: str) -> None:
        """The utterance's last clip will not play: end it on its last clip that does."""
        for clip in reversed(self._spoken):
            if clip.utterance_id == utterance_id:
                clip.last = True
                return
        self._finish_utterance(utterance_id, interrupted=False)

    def _finish_utterance(self, utterance_id: str, *, interrupted: bool,
                          extra: float = 0.0) -> None:
        played = self._played.pop(utterance_id, 0.0) + extra
        self._started_utterances.discard(utterance_id)
        self._emit(PlaybackFinished(utterance_id=utterance_id, duration=played,
                                    interrupted=interrupted))

    # -- interrupting ---------------------------------------------------------------------------

    async def interrupt(self) -> None:
        """Drop what is not spoken yet and stop the clip playing.

        Fluent streams get D-ID's data-channel interrupt; the acknowledgement is the clip's end
        message. With nothing at D-ID, the interrupt is acknowledged at once. A non-fluent
        stream cannot be interrupted (its profile says so, and ``AvatarSession`` never asks):
        ``CapabilityError``, with nothing changed.
        """
        if not self._fluent:
            raise CapabilityError(f"{self.provider}: a non-fluent D-ID stream cannot be "
                                  "interrupted (set fluent = true)")
        target = self._interrupt_target()
        self._buffer.clear()
        self._buffer_utterance = None
        for clip in self._pending:
            clip.cancelled = True
            clip.handled.set()
        self._pending.clear()
        if not self._speak_lock.locked():
            await self._restart_uploader()  # an upload in progress is not worth finishing
        async with self._speak_lock:  # a speak in flight reaches D-ID before the interrupt
            pass
        if not self._spoken:
            self._ack_now(target)
            return
        for clip in self._spoken:
            clip.cancelled = True
        self._ack_target = target
        playing = next((clip for clip in self._spoken if clip.started), None)
        if playing is not None:
            self._send_interrupt(playing)
        # else: D-ID has the clips but none started yet; the first to start is stopped then.

    def _interrupt_target(self) -> str | None:
        for clip in self._spoken:
            if not clip.cancelled:
                return clip.utterance_id
        return self._buffer_utterance or next(
            (clip.utterance_id for clip in self._pending), None) or self._last_utterance

    def _ack_now(self, target: str | None) -> None:
        """Nothing of ``target`` is at D-ID: the interrupt is done as soon as it is asked."""
        self._ack_target = self._ack_video = None
        if target is not None:
            self._finish_utterance(target, interrupted=True)
        else:
            self._emit(PlaybackFinished(utterance_id=None, duration=0.0, interrupted=True))

    def _send_interrupt(self, clip: _Clip) -> None:
        message: dict[str, Any] = dict(self._settings.interrupt_message)
        if clip.video_id is not None:
            message["videoId"] = clip.video_id
            self._stale_videos.add(clip.video_id)
        message["timestamp"] = int(time.time() * 1000)
        if self._ack_target is not None and self._ack_video is None:
            self._ack_video = clip.video_id  # this clip's end acknowledges the interrupt
        with contextlib.suppress(ValueError):
            self._spoken.remove(clip)
        if self._settings.interrupt_clears_queue:
            # D-ID drops its queue with the clip: nothing else spoken so far will play (a
            # clip of a later utterance spoken meanwhile included: that utterance is over).
            dropped = {c.utterance_id for c in self._spoken if not c.cancelled}
            self._spoken.clear()
            for utterance_id in dropped:
                self._finish_utterance(utterance_id, interrupted=True)
        try:
            self._receiver.send_data(json.dumps(message, separators=(",", ":")))
        except ProviderConnectionError as exc:
            logger.warning("%s: interrupt not sent: %s", self.provider, exc)

    async def _restart_uploader(self) -> None:
        await self._stop_uploader()
        self._queue = asyncio.Queue()
        if not self._closing:
            self._uploader = asyncio.create_task(self._upload_loop(),
                                                 name=f"did-{self.stream_id}-uploader")

    async def _stop_uploader(self) -> None:
        task, self._uploader = self._uploader, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for clip in self._pending:
            clip.cancelled = True
            clip.handled.set()
        self._pending.clear()

    # -- the data channel -----------------------------------------------------------------------

    def _on_data(self, text: str) -> None:
        if self._closing:
            return
        event, _, raw = text.partition(":")
        payload: dict[str, Any] = {}
        if raw.strip().startswith("{"):
            with contextlib.suppress(ValueError):
                parsed = json.loads(raw)
                payload = parsed if isinstance(parsed, dict) else {}
        video_id = _video_id(payload)
        if event == "stream/ready":
            self._ready.set()
        elif event == "stream/started":
            self._on_clip_started(video_id)
        elif event in ("stream/done", "stream/interrupted", "stream/error"):
            self._on_clip_ended(event, video_id, payload)
        else:
            logger.debug("%s: data-channel message %r ignored", self.provider, event)

    def _on_clip_started(self, video_id: str | None) -> None:
        if video_id is not None and video_id in self._stale_videos:
            return
        clip = next((c for c in self._spoken if not c.started), None)
        if clip is None:
            logger.debug("%s: stream/started for a clip not sent by us", self.provider)
            return
        clip.started = True
        clip.video_id = video_id
        if clip.cancelled:
            if self._fluent:
                self._send_interrupt(clip)  # spoken before the interrupt, started after it
            return
        if self._ack_target is not None and self._ack_video is not None:
            self._ack_target = self._ack_video = None  # that ack never came (a mute vendor)
        if clip.utterance_id not in self._started_utterances:
            self._started_utterances.add(clip.utterance_id)
            self._emit(PlaybackStarted(utterance_id=clip.utterance_id))

    def _on_clip_ended(self, event: str, video_id: str | None,
                       payload: Mapping[str, Any]) -> None:
        played = payload.get("played")
        if self._ack_target is not None and (
                (video_id is not None and video_id == self._ack_video)
                or (video_id is None and self._ack_video is None and not self._spoken)):
            target, self._ack_target, self._ack_video = self._ack_target, None, None
            self._finish_utterance(target, interrupted=True,
                                   extra=float(played) if isinstance(played, int | float) else 0)
            return
        if video_id is not None and video_id in self._stale_videos:
            return
        clip = next((c for c in self._spoken if c.started and c.video_id == video_id), None) \
            or next((c for c in self._spoken if c.started), None)
        if clip is None:
            return
        self._spoken.remove(clip)
        seconds = float(played) if isinstance(played, int | float) else clip.seconds
        self._played[clip.utterance_id] = self._played.get(clip.utterance_id, 0.0) + seconds
        if event == "stream/error" and self._failure is None:
            self._failure = ServerError(f"D-ID reported stream/error for a clip of utterance "
                                        f"{clip.utterance_id}", provider=self.provider)
        if clip.cancelled:  # a non-fluent interrupt: the clips D-ID had are playing out
            if self._ack_target is not None and not any(c.cancelled for c in self._spoken):
                target, self._ack_target = self._ack_target, None
                self._finish_utterance(target, interrupted=True)
            return
        if clip.last:
            self._finish_utterance(clip.utterance_id, interrupted=False)

    # -- media and lifecycle --------------------------------------------------------------------

    def video_frames(self) -> AsyncIterator[VideoFrame]:
        """The stream's video, decoded, until the connection ends."""
        return self._receiver.frames()

    def _on_connection_lost(self, reason: str) -> None:
        if self._closing:
            return
        self._lost = ProviderConnectionError(f"stream {self.stream_id}: {reason}",
                                             provider=self.provider)
        self._lost_event.set()
        for clip in self._pending:  # nothing more will play: release end_utterance() waiters
            clip.cancelled = True
            clip.handled.set()
        self._pending.clear()
        # The stream may still be open (and billed) at D-ID: the close path deletes it.
        self._signal_end(VendorSessionEnded(reason=reason, billing_stopped=False,
                                            error=self._lost))


    def _signal_end(self, signal: VendorSessionEnded) -> None:
        if self._end_signalled or self._closing:
            return
        self._end_signalled = True
        self._emit(signal)

    async def _end_at_vendor(self) -> None:
        self._closing = True
        self._max_duration.cancel()
        await self._stop_uploader()
        try:
            await self._provider._delete_stream(self.agent_id, self.stream_id, self._cookie)
        finally:
            await self._receiver.aclose()
