"""The ``local`` provider: the bundled lip-sync engine, in this process or on your GPU box.

Two modes, chosen by config, never by code::

    [providers.local]              # in this process: frames reach session.video()
    engine = "auto"                # "lite" | "musetalk" | "auto" (MuseTalk when weights are set)
    regions = ["self-hosted"]      # the region label routing and consent see (default)
    price_per_minute = "0"         # your GPU's cost; 0 is a known price (the default)
    weights = "/models/musetalk"   # MuseTalk's released weights (official folder layout)

    [providers.local.musetalk]     # the MuseTalk engine (see MuseTalkOptions)
    device = "cuda"                # auto | cpu | cuda | cuda:N
    precision = "fp16"             # auto | fp32 | fp16 | bf16
    batch_size = 8

    [providers.gpu-box]            # a remote engine: `avatarkit serve` on another machine
    kind = "local"
    url = "http://gpu-box:8080"
    api_key = "env:GPU_BOX_KEY"
    regions = ["eu-onprem"]

An avatar's media is its ``local`` entry (``[avatars.amelia] local = "assets/amelia.mp4"``,
relative paths under ``assets_dir``). A remote server lists avatars in its own config and
knows them by name: the avatar's own name by default, or the one given as
``[avatars.amelia] gpu-box = "amelia-v2"``.

In process, the engine runs on a worker thread behind an
:class:`~avatarkit.local_engine.stream.EngineStream`; every frame carries the burned-in label
and the watermark of the session's generation. Nothing is billed and nothing outlives the
process, so a failed start leaves nothing to end.

Remote, the server verifies the consent token itself (the kit forwards it; vendors never see
tokens), and the session is driven over the protocol in
:mod:`avatarkit.engine_server.protocol`: audio over a WebSocket, media out over WHEP (viewers
get ``JoinInfo(kind="whep")`` with a viewer-only token; :meth:`video` pulls frames with a
WHEP client on first use). Sessions are named by the attempt's idempotency key, so the
reaper can find and end them from another process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, ValidationError, field_validator

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
)
from ..errors import (
    ConfigError,
    ErrorCategory,
    NotFoundError,
    ProviderConnectionError,
    ProviderError,
)
from ..join import JoinInfo
from ..local_engine.musetalk.options import MuseTalkOptions
from ..media import AudioChunk, AudioFormat, VideoFrame
from ..vendor_http import VendorHttp
from ._ws import VendorSocket

if TYPE_CHECKING:
    from ..engine_server.protocol import SessionInfo
    from ..local_engine.stream import EngineStream, StreamEvent
    from ..transport.webrtc import WhepClient

__all__ = ["LocalProvider", "LocalSettings"]

logger = logging.getLogger("avatarkit.providers.local")

_SAMPLE_RATE = 16_000
_DEFAULT_REGIONS = frozenset({"self-hosted"})


class LocalSettings(ProviderSettings):
    """``[providers.local]``; see the module docstring."""

    engine: Literal["auto", "lite", "musetalk"] = "auto"
    weights: Path | None = Field(default=None, description="MuseTalk weights (official layout).")
    url: str | None = Field(default=None, description="A remote `avatarkit serve`; None renders "
                            "in this process.")
    assets_dir: Path | None = Field(default=None, description="Where relative avatar media "
                                    "paths are found (default: the working directory).")
    cache_dir: Path | None = Field(default=None, description="Prepared-avatar cache.")
    fps: float | None = Field(default=None, gt=0, le=120,
                              description="Output frame rate; default the avatar's (25 for "
                              "an image).")
    batch_size: int | None = Field(default=None, ge=1, le=64,
                                   description="Frames per engine call; default the "
                                   "engine's (lite 1, MuseTalk its musetalk.batch_size).")
    musetalk: MuseTalkOptions = Field(default_factory=MuseTalkOptions,
                                      description="The MuseTalk engine's options.")
    price_per_minute: Decimal | None = Field(default=Decimal(0), ge=0)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("expected an http(s) URL of an `avatarkit serve` server")
        return value.rstrip("/") if value is not None else None


class LocalProvider(Provider):
    """The bundled engine, in process or on a remote ``avatarkit serve``."""

    name: ClassVar[str] = "local"
    settings_model: ClassVar[type[ProviderSettings]] = LocalSettings
    wire: ClassVar[str] = ("in process: engine thread, frames in process; remote: REST + "
                           "PCM16 16 kHz over WebSocket, media over WHEP")
    uncertain_creates: ClassVar[bool] = True
    documented_variants: ClassVar[dict[str, dict[str, object]]] = {
        "in process": {}, "remote": {"url": "http://gpu-box:8080"}}

    settings: LocalSettings

    def __init__(self, settings: ProviderSettings, **kwargs: Any) -> None:
        super().__init__(settings, **kwargs)
        assert isinstance(settings, LocalSettings)
        self.api: VendorHttp | None = None
        if settings.url is not None:
            self.api = VendorHttp(provider=self.instance_name, client=self._http_client,
                                  base_url=settings.url, auth_headers=self.auth_headers,
                                  retry=settings.retry, timeout=settings.timeout)

    def auth_headers(self) -> dict[str, str]:
        """The remote server's bearer header (empty when it has no key)."""
        key = self.settings.api_key
        return {"Authorization": f"Bearer {key.get_secret_value()}"} if key else {}

    @property
    def remote(self) -> bool:
        return self.api is not None

    @property
    def profile(self) -> ProviderProfile:
        join: frozenset[Literal["whep", "none"]] = \
            frozenset({"whep"}) if self.remote else frozenset({"none"})
        return self._build_profile(
            capabilities=Capabilities(audio_input=True, interrupt=True, playback_events=True,
                                      frames_in_process=True, join_kinds=join),
            audio_format=AudioFormat(_SAMPLE_RATE, 1),
            regions=_DEFAULT_REGIONS,
            self_hosted=True,
        )

    def may_have_created(self, error: ProviderError) -> bool:
        # In process nothing can be left behind; remote, a lost create answer may have
        # started an engine on the server.
        return self.remote and super().may_have_created(error)

    async def start(self, request: SessionRequest) -> ProviderSession:
        if self.api is not None:
            return await self._start_remote(self.api, request)
        return await self._start_in_process(request)

    # -- in process -----------------------------------------------------------------------

    def _media_path(self, avatar_id: str) -> Path:
        path = Path(avatar_id).expanduser()
        if not path.is_absolute() and self.settings.assets_dir is not None:
            path = self.settings.assets_dir / path
        return path

    async def _start_in_process(self, request: SessionRequest) -> _LocalSession:
        from ..disclosure.stamp import DisclosureStamp
        from ..disclosure.watermark import payload_for
        from ..local_engine.engines import build_engine, choose_engine
        from ..local_engine.stream import EngineStream

        choice = choose_engine(self.settings.engine, weights=self.settings.weights)
        engine = await asyncio.to_thread(
            build_engine, choice.name, self._media_path(request.avatar_id),
            fps=self.settings.fps, sample_rate=_SAMPLE_RATE, cache_dir=self.settings.cache_dir,
            weights=self.settings.weights,
            musetalk=self.settings.musetalk.model_dump(exclude_unset=True))
        # the watermark always; the label unless the kit's config turned it off (the
        # disclosure metadata then says label_policy "disabled")
        stamp = DisclosureStamp(label=request.burned_label,
                                payload=payload_for(request.disclosure.generation_id))
        session = _LocalSession(self, request=request, engine_name=choice.name)
        stream = EngineStream(engine, post=stamp, realtime=True,
                              batch_size=self.settings.batch_size or engine.preferred_batch_size,
                              on_event=session.on_event)
        session.attach(stream)
        stream.start()
        logger.info("local session %s: %s engine, %dx%d at %g fps", session.vendor_session_id,
                    choice.name, engine.width, engine.height, engine.fps)
        return session

    # -- remote ---------------------------------------------------------------------------

    async def _start_remote(self, api: VendorHttp, request: SessionRequest) -> _RemoteSession:
        from ..engine_server.protocol import CreateSession, SessionInfo

        if request.consent_token is None:
            raise ConfigError("a remote engine verifies consent itself: the session must "
                              "forward its consent token", field="consent_token")
        body = CreateSession(avatar=request.avatar_id, consent_token=request.consent_token,
                             purpose=request.purpose or "unspecified",
                             disclosure=request.disclosure,
                             idempotency_key=request.idempotency_key,
                             max_duration_s=request.max_duration_s, sample_rate=_SAMPLE_RATE)
        payload = body.model_dump(mode="json")
        payload["consent_token"] = request.consent_token.get_secret_value()
        data = await api.request_json("POST", "/v1/sessions", json=payload,
                                      idempotency_key=request.idempotency_key)
        try:
            info = SessionInfo.model_validate(data)
        except ValidationError:
            session_id = data.get("session_id")
            if isinstance(session_id, str):
                await asyncio.shield(self._delete(api, session_id))
            raise ProviderError("the engine server's session answer is malformed",
                                provider=self.instance_name, retryable=False) from None
        # The server renders from here: every failure below must end the session there.
        try:
            session = _RemoteSession(self, api=api, info=info, request=request)
            await session.connect()
        except BaseException:
            await asyncio.shield(self._delete(api, info.session_id))
            raise
        return session

    async def _delete(self, api: VendorHttp, session_id: str) -> None:
        try:
            await api.request("DELETE", f"/v1/sessions/{session_id}")
        except NotFoundError:
            logger.info("engine session %s was already gone", session_id)

    def _absolute(self, path: str) -> str:
        assert self.settings.url is not None
        return path if "://" in path else self.settings.url + "/" + path.lstrip("/")

    async def probe(self) -> None:
        if self.api is not None:
            await self.api.request_json("GET", "/health")

    async def end_session(self, vendor_session_id: str) -> None:
        if self.api is None:
            return  # an in-process engine died with the process that ran it
        await self._delete(self.api, vendor_session_id)

    async def find_session(self, *, session_id: str, idempotency_key: str) -> str | None:
        if self.api is None:
            return None
        data = await self.api.request_json("GET", "/v1/sessions",
                                           params={"idempotency_key": idempotency_key})
        for item in data.get("sessions") or []:
            if isinstance(item, dict) and item.get("idempotency_key") == idempotency_key:
                found = item.get("session_id")
                if isinstance(found, str):
                    return found
        return None


class _LocalSession(ProviderSession):
    """An engine in this process."""

    def __init__(self, provider: LocalProvider, *, request: SessionRequest,
                 engine_name: str) -> None:
        super().__init__(provider=provider.instance_name,
                         vendor_session_id=f"local-{request.idempotency_key}",
                         join=JoinInfo(kind="none", disclosure=request.disclosure))
        self.engine_name = engine_name
        self._stream: EngineStream | None = None
        self._spoken: set[str] = set()
        self._timer = MaxDurationTimer(request.max_duration_s, self._emit)
        self._timer.arm()

    def attach(self, stream: EngineStream) -> None:
        self._stream = stream

    @property
    def stream(self) -> EngineStream:
        assert self._stream is not None, "attach() comes first"
        return self._stream

    def on_event(self, event: StreamEvent) -> None:
        from ..local_engine.runner import SegmentEnd
        from ..local_engine.stream import PlaybackStart

        if isinstance(event, PlaybackStart):
            self._emit(PlaybackStarted(utterance_id=event.utterance_id))
        elif isinstance(event, SegmentEnd):
            self._emit(PlaybackFinished(utterance_id=event.segment_id, duration=event.position,
                                        interrupted=event.interrupted))

    async def send_audio(self, chunk: AudioChunk, *, utterance_id: str) -> None:
        self._spoken.add(utterance_id)
        await self.stream.push_audio(chunk, utterance_id=utterance_id)

    async def end_utterance(self, *, utterance_id: str) -> None:
        if utterance_id not in self._spoken:
            # no audio was sent for it: an empty utterance is over at once
            self._emit(PlaybackFinished(utterance_id=utterance_id, duration=0.0,
                                        interrupted=False))
        elif self.stream.runner.open_segment == utterance_id:
            self.stream.end_utterance()
        # else: it was interrupted (its end was reported then)

    async def interrupt(self) -> None:
        if not self.stream.speaking:
            # nothing queued or playing: acknowledge at once
            self._emit(PlaybackFinished(utterance_id=None, duration=0.0, interrupted=True))
        self.stream.clear_buffer()

    def video_frames(self) -> AsyncIterator[VideoFrame]:
        frames: AsyncIterator[VideoFrame] = self.stream.video_frames()
        return frames

    async def _end_at_vendor(self) -> None:
        self._timer.cancel()
        await self.stream.aclose()


class _RemoteSession(ProviderSession):
    """A session on a remote ``avatarkit serve``."""

    def __init__(self, provider: LocalProvider, *, api: VendorHttp, info: SessionInfo,
                 request: SessionRequest) -> None:
        from pydantic import SecretStr

        join = JoinInfo(kind="whep", url=provider._absolute(info.whep_url),
                        token=SecretStr(info.viewer_token) if info.viewer_token else None,
                        disclosure=request.disclosure)
        super().__init__(provider=provider.instance_name, vendor_session_id=info.session_id,
                         join=join)
        self.info = info
        self.viewer_url = provider._absolute(info.viewer_url)
        self._provider = provider
        self._api = api
        self._socket = VendorSocket(provider=provider.instance_name, what="engine audio socket")
        self._reader: asyncio.Task[None] | None = None
        self._closing = False
        self._utterance: str | None = None
        self._spoken: set[str] = set()
        #: WHEP viewers opened by :meth:`video_frames`, closed when the session ends
        self._viewers: set[WhepClient] = set()

    async def connect(self) -> None:
        key = self._provider.settings.api_key
        url = self._provider._absolute(self.info.audio_url)
        await self._socket.connect(url, headers=self._provider.auth_headers(),
                                   secrets=[key.get_secret_value()] if key else [])
        self._reader = asyncio.create_task(self._read(), name=f"local-{self.info.session_id}")

    async def send_audio(self, chunk: AudioChunk, *, utterance_id: str) -> None:
        if utterance_id != self._utterance:
            self._utterance = utterance_id
            self._spoken.add(utterance_id)
            await self._socket.send_json({"type": "speak", "utterance_id": utterance_id})
        await self._socket.send_bytes(chunk.to_pcm16())

    async def end_utterance(self, *, utterance_id: str) -> None:
        if utterance_id not in self._spoken:
            # no audio was sent for it: an empty utterance is over at once
            self._emit(PlaybackFinished(utterance_id=utterance_id, duration=0.0,
                                        interrupted=False))
        elif utterance_id == self._utterance:
            self._utterance = None
            await self._socket.send_json({"type": "end_utterance"})
        # else: it was interrupted (its end was reported then)

    async def interrupt(self) -> None:
        self._utterance = None
        await self._socket.send_json({"type": "clear_buffer"})

    async def _read(self) -> None:
        from ..engine_server.protocol import (
            Cleared,
            PlaybackFinishedMessage,
            PlaybackStartedMessage,
            SessionEndedMessage,
            server_message,
        )

        cleared_pending = False
        try:
            async for frame in self._socket.messages():
                if isinstance(frame, bytes):
                    continue
                try:
                    message = server_message(frame)
                except ValidationError:
                    logger.warning("engine server sent an unknown message; ignored")
                    continue
                if isinstance(message, PlaybackStartedMessage):
                    self._emit(PlaybackStarted(utterance_id=message.utterance_id))
                elif isinstance(message, PlaybackFinishedMessage):
                    cleared_pending = cleared_pending or message.interrupted
                    self._emit(PlaybackFinished(utterance_id=message.utterance_id,
                                                duration=message.position_s,
                                                interrupted=message.interrupted))
                elif isinstance(message, Cleared):
                    if not cleared_pending:  # nothing was playing: still an acknowledgement
                        self._emit(PlaybackFinished(utterance_id=None,
                                                    duration=message.position_s,
                                                    interrupted=True))
                    cleared_pending = False
                elif isinstance(message, SessionEndedMessage):
                    self._vendor_stopped_billing()
                    self._emit(VendorSessionEnded(reason=message.reason, billing_stopped=True,
                                                  recoverable=message.recoverable))
                    return
        except ProviderConnectionError as exc:
            if not self._closing:
                self._channel_lost("engine audio socket", exc)
            return
        if not self._closing:
            self._channel_lost("engine audio socket")

    async def video_frames(self) -> AsyncIterator[VideoFrame]:
        from ..transport.webrtc import WhepClient

        token = self.join.token
        client = WhepClient(self.join.url or "", token=token,
                            timeout=self._provider.settings.timeout)
        self._viewers.add(client)
        try:
            async with client:
                async for frame in client.video_frames():
                    yield frame
        finally:
            self._viewers.discard(client)

    async def _close_viewers(self) -> None:
        """Release every WHEP viewer (peer connection and server resource). An app that
        stopped iterating :meth:`video_frames` without closing it would otherwise keep the
        peer and its tasks running after the session ended. Done before the session's
        ``DELETE``: afterwards the server no longer accepts the viewer token."""
        viewers, self._viewers = list(self._viewers), set()
        for viewer in viewers:
            try:
                await viewer.aclose()
            except Exception as exc:  # best effort: the session's end must still happen
                logger.warning("closing a WHEP viewer of engine session %s failed: %s",
                               self.vendor_session_id, type(exc).__name__)

    async def _end_at_vendor(self) -> None:
        self._closing = True
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        try:
            await self._close_viewers()
            await self._provider._delete(self._api, self.vendor_session_id)
        except ProviderError as exc:
            if exc.category is ErrorCategory.NOT_FOUND:
                return
            raise
        finally:
            await self._socket.aclose()
