"""Tavus CVI in echo mode: our audio, Tavus' face.

Wire contract (``shared/research/vendor-contracts.md`` §2): ``POST /v2/conversations`` with an
echo-mode PAL (or legacy persona) and a face (or replica) starts billing; audio goes as base64
PCM16 24 kHz mono in ``conversation.echo`` app-messages of ~100 ms, one ``inference_id`` per
utterance and ``done: true`` on the last; ``conversation.interrupt`` stops speech;
``POST /v2/conversations/{id}/end`` ends it. Viewers join the Daily room
(``JoinInfo(kind="daily")``). Speech start/stop arrive as ``conversation.replica.*`` events and
``system.shutdown`` tells us Tavus ended the conversation itself.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import re
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field

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
from ..errors import ConfigError, NotFoundError, ProviderConnectionError, ProviderError
from ..join import JoinInfo
from ..media import AudioChunk, AudioFormat
from ..vendor_http import VendorHttp
from ._tavus_channel import AppMessageChannel, DailyChannel, WebSocketChannel

__all__ = ["TavusConversationProperties", "TavusProvider", "TavusSession", "TavusSettings"]

logger = logging.getLogger("avatarkit.providers.tavus")

_SAMPLE_RATE = 24_000
_BYTES_PER_MS = _SAMPLE_RATE * 2 // 1000
_MAX_CALL_DURATION = 3600


# Shutdown reasons that are Tavus doing what it was told (our max_call_duration, its
# participant timeouts): another provider would not help, so no failover.
_DELIBERATE_END = re.compile(r"max_call_duration|timeout|test_mode", re.IGNORECASE)


class TavusConversationProperties(BaseModel):
    """``properties`` sent on conversation create (seconds). Unknown keys pass through."""

    model_config = ConfigDict(extra="allow", frozen=True)

    participant_absent_timeout: int = Field(default=120, ge=0)
    participant_left_timeout: int = Field(default=0, ge=0)
    enable_recording: bool = False
    language: str | None = None


class TavusSettings(ProviderSettings):
    """``[providers.tavus]``."""

    base_url: str | None = "https://tavusapi.com"
    vocabulary: Literal["pal", "persona"] = Field(
        default="pal", description="Wire names: pal_id/face_id (2026) or persona_id/replica_id."
    )
    pal_id: str | None = Field(
        default=None,
        description="An echo-mode PAL (or persona). When unset, one is created per face and "
        "reused for the kit's lifetime.",
    )
    channel: Literal["daily", "websocket"] = Field(
        default="daily", description="How app-messages travel: a Daily room, or the emulator's "
        "WebSocket.",
    )
    chunk_ms: int = Field(default=100, ge=20, le=1000)
    conversation_name: str = "avatarkit"
    require_auth: bool = Field(default=False, description="Private room; viewers get a token.")
    properties: TavusConversationProperties = Field(
        default_factory=TavusConversationProperties
    )


class TavusProvider(Provider):
    """Tavus Conversational Video Interface, echo mode."""

    name = "tavus"
    settings_model = TavusSettings
    wire = ("`POST /v2/conversations` (echo-mode PAL + face; `x-api-key`, idempotency key) "
            "starts billing; audio as base64 PCM16 24 kHz mono `conversation.echo` "
            "app-messages of ~100 ms through the Daily room, one `inference_id` per utterance, "
            "`done: true` last; `conversation.interrupt`; speech events "
            "`conversation.replica.started/stopped_speaking`; `system.shutdown` when Tavus "
            "ends it; `POST /v2/conversations/{id}/end` on every exit. Viewers join the Daily "
            "room. Health probe: list ended conversations; lookup by conversation name.")
    unverified = (
        "Error body shape, and the status codes for the concurrency limit, out of credits "
        "and rate limits (all mapped by status class).",
        "The list price (about $0.32/min is third-party): set `price_per_minute`.",
        "Regions and compliance claims: set `regions` yourself.",
        "How long `persona_id`/`replica_id` keep working (`vocabulary = \"persona\"`).",
    )

    def __init__(self, settings: ProviderSettings, *, http: httpx.AsyncClient,
                 instance_name: str | None = None) -> None:
        super().__init__(settings, http=http, instance_name=instance_name)
        assert isinstance(settings, TavusSettings)
        self.settings: TavusSettings = settings
        if settings.channel == "daily" and not DailyChannel.available():
            raise ConfigError(
                "channel 'daily' needs daily-python: pip install 'avatarkit[daily]' "
                "(or set channel = \"websocket\" for the emulator)",
                field=f"providers.{self.instance_name}.channel",
            )
        api_key = settings.api_key
        if api_key is None:
            raise ConfigError("required (e.g. api_key = \"env:TAVUS_API_KEY\")",
                              field=f"providers.{self.instance_name}.api_key")
        assert settings.base_url is not None
        self.api = VendorHttp(
            provider=self.instance_name,
            client=http,
            base_url=settings.base_url,
            auth_headers=lambda: {"x-api-key": api_key.get_secret_value()},
            retry=settings.retry,
            timeout=settings.timeout,
        )
        self._echo_pals: dict[str, str] = {}
        self._pal_lock = asyncio.Lock()
        self._profile = self._build_profile(
            capabilities=Capabilities(audio_input=True, text_input=True, interrupt=True,
                                      playback_events=True, frames_in_process=False,
                                      join_kinds=frozenset({"daily"})),
            audio_format=AudioFormat(_SAMPLE_RATE, 1),
            # Tavus' docs quote ~600 ms response for the full pipeline; echo skips STT/LLM.
            first_frame_latency_ms=600.0,
        )

    @property
    def profile(self) -> ProviderProfile:
        return self._profile

    def _new_channel(self) -> AppMessageChannel:
        return DailyChannel() if self.settings.channel == "daily" else WebSocketChannel()

    async def _echo_pal(self, face_id: str) -> str:
        """The configured PAL, or an echo-mode PAL for ``face_id`` made once and reused."""
        if self.settings.pal_id:
            return self.settings.pal_id
        async with self._pal_lock:
            if face_id in self._echo_pals:
                return self._echo_pals[face_id]
            if self.settings.vocabulary == "pal":
                body = {"pal_name": f"avatarkit-echo-{face_id}", "default_face_id": face_id,
                        "pipeline_mode": "echo"}
                data = await self.api.request_json("POST", "/v2/pals", json=body)
                pal_id = data.get("pal_id")
            else:
                body = {"persona_name": f"avatarkit-echo-{face_id}",
                        "default_replica_id": face_id, "pipeline_mode": "echo"}
                data = await self.api.request_json("POST", "/v2/personas", json=body)
                pal_id = data.get("persona_id")
            if not isinstance(pal_id, str) or not pal_id:
                raise ProviderError("PAL create returned no id", provider=self.instance_name,
                                    retryable=False)
            self._echo_pals[face_id] = pal_id
            return pal_id

    def _create_body(self, request: SessionRequest, pal_id: str) -> dict[str, Any]:
        pal_key, face_key = (("pal_id", "face_id") if self.settings.vocabulary == "pal"
                             else ("persona_id", "replica_id"))
        properties = self.settings.properties.model_dump(exclude_none=True)
        max_duration = request.max_duration_s or _MAX_CALL_DURATION
        properties["max_call_duration"] = max(1, min(_MAX_CALL_DURATION, int(max_duration)))
        return {
            pal_key: pal_id,
            face_key: request.avatar_id,
            # one name per attempt: the reaper and the late-create search find exactly it
            "conversation_name": f"{self.settings.conversation_name} {request.idempotency_key}",
            "require_auth": self.settings.require_auth,
            "properties": properties,
        }

    async def start(self, request: SessionRequest) -> TavusSession:
        pal_id = await self._echo_pal(request.avatar_id)
        data = await self.api.request_json(
            "POST", "/v2/conversations", json=self._create_body(request, pal_id),
            idempotency_key=request.idempotency_key,
        )
        conversation_id = data.get("conversation_id")
        url = data.get("conversation_url")
        if not isinstance(conversation_id, str) or not isinstance(url, str):
            raise ProviderError("conversation create returned no conversation_id/url",
                                provider=self.instance_name, retryable=False)
        # Billing runs from here: every failure below must end the conversation.
        try:
            if data.get("status") == "ended":
                raise ProviderError(f"conversation {conversation_id} was created ended "
                                    "(test_mode?)", provider=self.instance_name, retryable=False)
            token = data.get("meeting_token")
            channel = self._new_channel()
            await channel.connect(url, token if isinstance(token, str) else None)
        except BaseException:
            await asyncio.shield(self._end_conversation(conversation_id))
            raise
        join = JoinInfo(kind="daily", url=url, token=token if isinstance(token, str) else None,
                        disclosure=request.disclosure)
        return TavusSession(self, conversation_id=conversation_id, join=join, channel=channel)

    async def probe(self) -> None:
        # Listing ended conversations is authenticated, unbilled and cheap.
        await self.api.request_json("GET", "/v2/conversations",
                                    params={"status": "ended", "limit": "1"})

    async def end_session(self, vendor_session_id: str) -> None:
        await self._end_conversation(vendor_session_id)

    async def find_session(self, *, session_id: str, idempotency_key: str) -> str | None:
        # The create call names the conversation after the attempt's idempotency key: find
        # it among the active ones (the process may have died before recording its id).
        name = f"{self.settings.conversation_name} {idempotency_key}"
        data = await self.api.request_json("GET", "/v2/conversations",
                                           params={"status": "active"})
        items = data.get("data")
        for item in items if isinstance(items, list) else []:
            if isinstance(item, dict) and item.get("conversation_name") == name:
                conversation_id = item.get("conversation_id")
                if isinstance(conversation_id, str):
                    return conversation_id
        return None

    async def _end_conversation(self, conversation_id: str) -> None:
        try:
            await self.api.request("POST", f"/v2/conversations/{conversation_id}/end")
        except NotFoundError:
            logger.info("tavus conversation %s was already gone", conversation_id)


class TavusSession(ProviderSession):
    """One Tavus conversation, driven over its app-message channel."""

    def __init__(
        self,
        provider: TavusProvider,
        *,
        conversation_id: str,
        join: JoinInfo,
        channel: AppMessageChannel,
    ) -> None:
        super().__init__(provider=provider.instance_name, vendor_session_id=conversation_id,
                         join=join)
        self._provider = provider
        self._channel = channel
        self._chunk_bytes = provider.settings.chunk_ms * _BYTES_PER_MS
        self._buffer = bytearray()
        self._interrupting = False
        self._closing = False
        self._echo_prefix = (
            '{"message_type":"conversation","event_type":"conversation.echo",'
            f'"conversation_id":{json.dumps(conversation_id)},'
            '"properties":{"modality":"audio","audio":"').encode()
        self._echo_suffix: dict[tuple[str, bool], bytes] = {}
        self._reader = asyncio.create_task(self._read(), name=f"tavus-{conversation_id}-reader")

    def _echo(self, audio: bytes, utterance_id: str, done: bool) -> bytes:
        """The ``conversation.echo`` message as UTF-8 JSON. Everything but the audio is
        encoded once per utterance; base64 needs no JSON escaping, so it is spliced in."""
        key = (utterance_id, done)
        suffix = self._echo_suffix.get(key)
        if suffix is None:
            if len(self._echo_suffix) > 64:
                self._echo_suffix.clear()
            suffix = self._echo_suffix[key] = (
                f'","inference_id":{json.dumps(utterance_id)},"sample_rate":{_SAMPLE_RATE},'
                f'"done":{json.dumps(done)}}}}}'.encode())
        return b"".join((self._echo_prefix, base64.b64encode(audio), suffix))

    async def send_audio(self, chunk: AudioChunk, *, utterance_id: str) -> None:
        self._buffer += chunk.to_pcm16()
        size = self._chunk_bytes
        # Strictly more than one chunk: the last piece is held back so that the closing
        # done=true message carries real audio instead of padding.
        while len(self._buffer) > size:
            piece = bytes(self._buffer[:size])
            del self._buffer[:size]
            await self._channel.send_encoded(self._echo(piece, utterance_id, done=False))

    async def end_utterance(self, *, utterance_id: str) -> None:
        # Tavus needs a final message with done=true; for an utterance with no audio at all,
        # that message carries 40 ms of silence (as Pipecat does).
        rest = bytes(self._buffer) or bytes(40 * _BYTES_PER_MS)
        self._buffer.clear()
        await self._channel.send_encoded(self._echo(rest, utterance_id, done=True))

    async def interrupt(self) -> None:
        self._buffer.clear()
        self._interrupting = True
        await self._channel.send({
            "message_type": "conversation",
            "event_type": "conversation.interrupt",
            "conversation_id": self.vendor_session_id,
        })

    async def _read(self) -> None:
        try:
            async for message in self._channel.messages():
                self._on_message(message)
        except ProviderConnectionError as exc:
            if not self._closing:
                self._channel_lost("app-message channel", exc)
            return
        if not self._closing:
            self._channel_lost("app-message channel")

    def _on_message(self, message: dict[str, Any]) -> None:
        event = message.get("event_type")
        inference_id = message.get("inference_id")
        properties = message.get("properties") or {}
        if not isinstance(properties, dict):
            properties = {}
        inference_id = inference_id or properties.get("inference_id")
        if event == "conversation.replica.started_speaking" and isinstance(inference_id, str):
            self._emit(PlaybackStarted(utterance_id=inference_id))
        elif event == "conversation.replica_interrupted":
            self._interrupting = True
        elif event == "conversation.replica.stopped_speaking":
            duration = properties.get("duration")
            self._emit(PlaybackFinished(
                utterance_id=inference_id if isinstance(inference_id, str) else None,
                duration=float(duration) if isinstance(duration, int | float) else None,
                interrupted=self._interrupting,
            ))
            self._interrupting = False
        elif event == "system.shutdown":
            self._vendor_stopped_billing()
            reason = str(properties.get("reason") or "ended by Tavus")
            self._emit(VendorSessionEnded(reason=reason, billing_stopped=True,
                                          recoverable=not _DELIBERATE_END.search(reason)))

    async def _end_at_vendor(self) -> None:
        self._closing = True
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        try:
            # End first: leaving the room first would let Tavus end it on its own timer.
            await self._provider._end_conversation(self.vendor_session_id)
        finally:
            await self._channel.aclose()
