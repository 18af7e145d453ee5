"""D-ID ``sessions/join``: D-ID's worker renders into *your* LiveKit room (``transport =
"livekit"`` in ``[providers.did]``).

Wire contract (``shared/research/vendor-contracts.md`` §5.3 and §6.2): we join the room as the
agent (identity ``agent_identity``, kind ``agent``), mint the avatar's token (identity
``avatar_identity``, kind ``agent``, attribute ``lk.publish_on_behalf`` = our identity) and
``POST /v2/agents/{agent_id}/sessions/join`` ``{transport: {provider: "livekit", server_url,
token, room_name}, audio_config: {sample_rate}}``, which **starts billing**. Once the avatar
is in the room, audio goes to it as ``lk.audio_stream`` byte streams (one per utterance, PCM16
mono at ``livekit_sample_rate``), text as ``did.speak`` ``{"script": {"type": "text",
"input"}}``, interrupts as the RPC ``lk.clear_buffer``; its ``lk.playback_started`` /
``lk.playback_finished`` RPCs become the session's speech events. Viewers join the same room
with their own subscribe-only token (``JoinInfo(kind="livekit")``); the avatar's token is never
handed out.

There is no end call for these sessions: like LiveKit's own plugins we remove the avatar from
the room through the RoomService (``RemoveParticipant``), which ends D-ID's worker, then
leave. The room is ours, so the reaper can do the same from another process
(``end_session("room:<room>")``), and a start whose answer was lost is found by listing the
room (``find_session``): by default each session gets its own room, named after the start
attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections import deque
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Literal

from pydantic import SecretStr

from ..contract import (
    MaxDurationTimer,
    PlaybackFinished,
    PlaybackStarted,
    ProviderSession,
    SessionRequest,
    VendorSessionEnded,
    wait_unless_lost,
)
from ..errors import (
    InvalidRequestError,
    MediaFormatError,
    ProviderConnectionError,
    ProviderError,
    ProviderTimeoutError,
    ServerError,
)
from ..join import JoinInfo
from ..media import AudioChunk
from ..transport.livekit import (
    AvatarWorkerChannel,
    RoomLink,
    RoomRpcError,
    RoomService,
    connect_room,
    mint_token,
    ws_url,
)

if TYPE_CHECKING:
    from .did import DIDProvider

__all__ = [
    "ROOM_PREFIX",
    "DIDLiveKitSession",
    "end_room_session",
    "find_room_session",
    "room_for_attempt",
    "start_room_session",
]

logger = logging.getLogger("avatarkit.providers.did")

ROOM_PREFIX = "room:"
#: The avatar's token outlives the wait for it by this much: a D-ID worker that turns up after
#: we gave up is refused by the LiveKit server (beyond its clock leeway), so nothing is left
#: billing in a room we left.
_AVATAR_JOIN_GRACE_S = 2.0
_CLEAR_BUFFER_TIMEOUT = 2.0


def room_for_attempt(idempotency_key: str) -> str:
    """The room a start attempt uses when no fixed ``livekit_room`` is configured."""
    return "avk-" + hashlib.sha256(idempotency_key.encode()).hexdigest()[:24]


def _room_service(provider: DIDProvider) -> RoomService:
    s = provider.settings
    assert s.livekit_url and s.livekit_api_key and s.livekit_api_secret
    return RoomService(provider=provider.instance_name, client=provider._http_client,
                       url=s.livekit_url, api_key=s.livekit_api_key,
                       api_secret=s.livekit_api_secret, retry=s.retry, timeout=s.timeout)


def _token(provider: DIDProvider, *, identity: str, room: str, ttl_s: float,
           kind: Literal["standard", "agent"] = "standard", name: str | None = None,
           attributes: dict[str, str] | None = None, can_publish: bool = True,
           can_publish_data: bool = True) -> str:
    s = provider.settings
    assert s.livekit_api_key and s.livekit_api_secret
    return mint_token(api_key=s.livekit_api_key.get_secret_value(),
                      api_secret=s.livekit_api_secret.get_secret_value(), identity=identity,
                      room=room, ttl_s=ttl_s, kind=kind, name=name, attributes=attributes,
                      can_publish=can_publish, can_publish_data=can_publish_data)


async def start_room_session(provider: DIDProvider,
                             request: SessionRequest) -> DIDLiveKitSession:
    """Join the room, ask D-ID to join it, wait for the avatar. Whatever was created is ended
    before an error is raised."""
    s = provider.settings
    assert s.livekit_url is not None
    room = s.livekit_room or room_for_attempt(request.idempotency_key)
    agent_token = _token(provider, identity=s.agent_identity, room=room,
                         ttl_s=s.connect_timeout_s + _AVATAR_JOIN_GRACE_S,
                         kind="agent", name="avatarkit")
    link = await connect_room(s.livekit_url, agent_token, provider=provider.instance_name,
                              join_timeout=s.connect_timeout_s)
    viewer = _token(provider, identity=f"viewer-{request.session_id[:12]}", room=room,
                    ttl_s=s.viewer_token_ttl_s, can_publish=False, can_publish_data=False)
    session = DIDLiveKitSession(
        provider, link=link, room=room,
        join=JoinInfo(kind="livekit", url=ws_url(s.livekit_url), token=SecretStr(viewer),
                      disclosure=request.disclosure),
        max_duration_s=request.max_duration_s)
    try:
        avatar_token = _token(provider, identity=s.avatar_identity, room=room,
                              ttl_s=s.connect_timeout_s + _AVATAR_JOIN_GRACE_S,
                              kind="agent", name="D-ID avatar",
                              attributes={"lk.publish_on_behalf": s.agent_identity})
        body = {"transport": {"provider": "livekit", "server_url": s.livekit_url,
                              "token": avatar_token, "room_name": room},
                "audio_config": {"sample_rate": s.livekit_sample_rate}}
        data = await provider.api.request_json(
            "POST", f"/v2/agents/{request.avatar_id}/sessions/join", json=body,
            idempotency_key=request.idempotency_key)
        did_id = data.get("id")
        session.did_session_id = did_id if isinstance(did_id, str) and did_id else None
        await session._wait_for_avatar()
    except BaseException as exc:
        removed = await asyncio.shield(session._abandon())
        if removed and isinstance(exc, ProviderConnectionError | ProviderTimeoutError):
            raise ServerError(f"{exc.message} (the avatar was sent away)",
                              provider=provider.instance_name, retryable=True) from exc
        raise
    return session


class DIDLiveKitSession(ProviderSession):
    """One D-ID avatar in our LiveKit room."""

    def __init__(self, provider: DIDProvider, *, link: RoomLink, room: str, join: JoinInfo,
                 max_duration_s: float | None) -> None:
        super().__init__(provider=provider.instance_name,
                         vendor_session_id=f"{ROOM_PREFIX}{room}", join=join)
        s = provider.settings
        self._provider = provider
        self._settings = s
        self.room = room
        #: D-ID's own id for the session (from the join answer), for support requests
        self.did_session_id: str | None = None
        self._link = link
        self._avatar = s.avatar_identity
        self._channel = AvatarWorkerChannel(
            link, avatar_identity=s.avatar_identity, sample_rate=s.livekit_sample_rate,
            provider=provider.instance_name, on_started=self._on_started,
            on_finished=self._on_finished)
        link.on_participant_left = self._on_participant_left
        link.on_disconnected = self._on_disconnected
        self._write_lock = asyncio.Lock()
        self._writing: str | None = None  # the utterance whose byte stream is open
        self._pending: deque[str] = deque()  # at the avatar, not finished, in order
        self._started: set[str] = set()
        self._interrupting: deque[str] = deque()  # cleared by the interrupt awaiting its ack
        self._dropped: set[str] = set()  # interrupted: later audio for them is ignored
        self._lost: ProviderError | None = None
        self._lost_event = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self._end_signalled = False
        self._max_duration = MaxDurationTimer(max_duration_s, self._signal_end)

    # -- setup ------------------------------------------------------------------------------

    async def _wait_for_avatar(self) -> None:
        timeout = self._settings.connect_timeout_s
        if not await wait_unless_lost(self._link.wait_for_participant(self._avatar),
                                      self._lost_event, within=timeout):
            if self._lost is not None:
                raise self._lost
            raise ProviderTimeoutError(f"D-ID's avatar did not join room {self.room} within "
                                       f"{timeout:g} s", provider=self.provider)
        self._max_duration.arm()

    async def _abandon(self) -> bool:
        """Send the avatar away and leave after a failed start; True when confirmed."""
        self._closing = True
        try:
            await self._remove_avatar()
        except ProviderError as exc:
            logger.error("%s: could not remove the avatar from room %s after a failed start: "
                         "%s", self.provider, self.room, exc)
            return False
        finally:
            await self._close_link()
        return True

    # -- speaking ---------------------------------------------------------------------------

    def _raise_lost(self) -> None:
        if self._lost is not None:
            raise self._lost

    async def send_audio(self, chunk: AudioChunk, *, utterance_id: str) -> None:
        self._raise_lost()
        if utterance_id in self._dropped:
            return
        async with self._write_lock:
            try:
                if self._writing not in (None, utterance_id):
                    await self._channel.end_segment()
                    self._writing = None
                if self._writing is None:
                    self._writing = utterance_id
                    self._pending.append(utterance_id)
                await self._channel.write(chunk.to_pcm16())
            except (ConnectionError, RoomRpcError, RuntimeError) as exc:
                raise self._link_error(exc) from None

    async def end_utterance(self, *, utterance_id: str) -> None:
        self._raise_lost()
        async with self._write_lock:
            if self._writing == utterance_id:
                self._writing = None
                try:
                    await self._channel.end_segment()
                except (ConnectionError, RuntimeError) as exc:
                    raise self._link_error(exc) from None
                return
        if utterance_id not in self._pending and utterance_id not in self._dropped:
            # No audio was sent for it: nothing to speak.
            self._emit(PlaybackFinished(utterance_id=utterance_id, duration=0.0,
                                        interrupted=False))

    async def say(self, text: str, *, utterance_id: str) -> None:
        """Speak ``text`` in the agent's own voice (``did.speak``, 3 to 40000 characters);
        playback events follow as for audio."""
        if not isinstance(text, str) or not 3 <= len(text) <= 40_000:
            raise MediaFormatError(f"got {len(text) if isinstance(text, str) else text!r}",
                                   field="text", expected="a string of 3 to 40000 characters")
        self._raise_lost()
        async with self._write_lock:
            if self._writing is not None:  # an open audio segment plays first
                await self._channel.end_segment()
                self._writing = None
            self._pending.append(utterance_id)
            try:
                await self._link.send_text(
                    json.dumps({"script": {"type": "text", "input": text}}),
                    topic="did.speak", destination=self._avatar)
            except (ConnectionError, RuntimeError) as exc:
                self._pending.remove(utterance_id)
                raise self._link_error(exc) from None

    # -- interrupting -------------------------------------------------------------------------

    async def interrupt(self) -> None:
        """``lk.clear_buffer``: the avatar stops and drops its queue; its interrupted
        ``playback_finished`` is the acknowledgement. With nothing at the avatar the interrupt
        is acknowledged at once."""
        async with self._write_lock:
            if self._writing is not None:
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await self._channel.end_segment()
                self._writing = None
            cleared = list(self._pending)
            self._pending.clear()
            self._dropped.update(cleared)
        if not cleared:
            self._emit(PlaybackFinished(utterance_id=None, duration=0.0, interrupted=True))
            return
        self._interrupting = deque(cleared)
        self._spawn(self._clear_buffer())

    async def _clear_buffer(self) -> None:
        try:
            await self._channel.clear_buffer(response_timeout=_CLEAR_BUFFER_TIMEOUT)
        except ProviderError as exc:
            # The session's acknowledgement timeout covers a worker that never answers.
            logger.warning("%s: %s", self.provider, exc.message)

    # -- the avatar's reports -----------------------------------------------------------------

    def _on_started(self) -> None:
        head = next((u for u in self._pending if u not in self._started), None)
        if head is not None:
            self._started.add(head)
            self._emit(PlaybackStarted(utterance_id=head))

    def _on_finished(self, position: float | None, interrupted: bool) -> None:
        if self._interrupting:
            utterance = self._interrupting[0]
            if interrupted:
                self._interrupting.clear()
            else:  # it had played out before the interrupt reached the avatar
                self._interrupting.popleft()
        elif self._pending:
            utterance = self._pending.popleft()
            if interrupted:  # the avatar cleared its queue on its own (did.interrupt)
                self._dropped.update(self._pending)
                self._pending.clear()
        else:
            return  # stale: nothing of ours was playing
        self._started.discard(utterance)
        self._emit(PlaybackFinished(utterance_id=utterance, duration=position,
                                    interrupted=interrupted))

    # -- lifecycle ----------------------------------------------------------------------------

    def _link_error(self, exc: BaseException) -> ProviderError:
        if self._lost is not None:
            return self._lost
        return ProviderConnectionError(f"room {self.room}: {exc}", provider=self.provider)

    def _on_participant_left(self, identity: str) -> None:
        if identity != self._avatar or self._closing:
            return
        self._lose(ProviderConnectionError(f"D-ID's avatar left room {self.room}",
                                           provider=self.provider), billing_stopped=True)

    def _on_disconnected(self, reason: str) -> None:
        if self._closing:
            return
        # The avatar may still be in the room (and billed): the close path removes it.
        self._lose(ProviderConnectionError(f"disconnected from room {self.room} ({reason})",
                                           provider=self.provider), billing_stopped=False)

    def _lose(self, error: ProviderError, *, billing_stopped: bool) -> None:
        if self._lost is not None:
            return
        self._lost = error
        self._lost_event.set()
        if billing_stopped:
            self._vendor_stopped_billing()
        self._signal_end(VendorSessionEnded(reason=error.message,
                                            billing_stopped=billing_stopped, error=error))


    def _signal_end(self, signal: VendorSessionEnded) -> None:
        if self._end_signalled or self._closing:
            return
        self._end_signalled = True
        self._emit(signal)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _remove_avatar(self) -> None:
        removed = await _room_service(self._provider).remove_participant(self.room, self._avatar)
        if not removed:
            logger.info("%s: D-ID's avatar had already left room %s", self.provider, self.room)

    async def _close_link(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._link.aclose()

    async def _end_at_vendor(self) -> None:
        self._closing = True
        self._max_duration.cancel()
        try:
            await self._remove_avatar()
        finally:
            await self._close_link()


async def end_room_session(provider: DIDProvider, vendor_session_id: str) -> None:
    """The reaper's end: remove D-ID's avatar from the session's room."""
    room = vendor_session_id.removeprefix(ROOM_PREFIX)
    if not room:
        raise InvalidRequestError(f"{vendor_session_id!r} is not a D-ID room session id",
                                  provider=provider.instance_name)
    await _room_service(provider).remove_participant(room, provider.settings.avatar_identity)


async def find_room_session(provider: DIDProvider, idempotency_key: str) -> str | None:
    """The session a start attempt left in its room (its avatar is still there), if any."""
    room = provider.settings.livekit_room or room_for_attempt(idempotency_key)
    identities = await _room_service(provider).list_participants(room)
    return f"{ROOM_PREFIX}{room}" if provider.settings.avatar_identity in identities else None
