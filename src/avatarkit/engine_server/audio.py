"""One engine session as the server keeps it, and its audio WebSocket: the outgoing message
pump and what each incoming frame does (the rules are in :mod:`.server`'s docstring)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from aiohttp import WSCloseCode, web
from pydantic import ValidationError

from ..catalog import Avatar
from ..errors import MediaFormatError, SessionStateError
from ..local_engine.stream import EngineStream
from ..media import AudioChunk
from .protocol import (
    ClearBuffer,
    Cleared,
    EndUtterance,
    ErrorMessage,
    PlaybackFinishedMessage,
    PlaybackStartedMessage,
    SessionEnded,
    SessionEndedMessage,
    SessionInfo,
    Speak,
    client_message,
    validation_problem,
)

if TYPE_CHECKING:
    from ..consent import ConsentWatch
    from ..consent.tokens import VerifiedConsent
    from ..transport.webrtc import AvatarBroadcast

__all__ = [
    "CLEAR_WAIT_S",
    "WS_CLOSE_S",
    "AudioSocket",
    "ServedSession",
    "clear",
    "end_utterance",
    "on_audio",
    "on_text",
]

logger = logging.getLogger("avatarkit.engine_server.server")

#: how long ``clear_buffer`` waits for the engine to report the utterances it ended
CLEAR_WAIT_S = 1.0
#: how long closing an audio socket may take
WS_CLOSE_S = 2.0


@dataclass(frozen=True, slots=True)
class _Close:
    code: int
    reason: str


class AudioSocket:
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
            async with asyncio.timeout(WS_CLOSE_S):
                await asyncio.shield(self.task)
        except TimeoutError:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


@dataclass(eq=False)
class ServedSession:
    """A live session of the server: its engine stream, broadcast, consent and socket."""

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
    socket: AudioSocket | None = None
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


async def on_text(session: ServedSession, socket: AudioSocket, text: str) -> None:
    """A text frame: ``speak``, ``end_utterance`` or ``clear_buffer``."""
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
                end_utterance(session, socket)
            session.utterance = message.utterance_id
        elif isinstance(message, EndUtterance):
            end_utterance(session, socket)
        elif isinstance(message, ClearBuffer):
            await clear(session, socket)
    except SessionStateError as exc:
        if session.ending is None:
            socket.send(ErrorMessage(message=str(exc)))

def end_utterance(session: ServedSession, socket: AudioSocket) -> None:
    utterance, session.utterance = session.utterance, None
    ended = session.stream.end_utterance()
    if ended is None and utterance is not None and utterance not in session.spoken:
        # a speak with no audio: that utterance is over at once
        socket.send(PlaybackFinishedMessage(utterance_id=utterance, position_s=0.0,
                                            interrupted=False))

async def clear(session: ServedSession, socket: AudioSocket) -> None:
    """``clear_buffer``: every pending utterance's ``playback_finished`` (waited for up to
    :data:`CLEAR_WAIT_S`), then ``cleared``."""
    before = set(session.pending)
    session.utterance = None
    position = session.stream.clear_buffer()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CLEAR_WAIT_S
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

async def on_audio(session: ServedSession, socket: AudioSocket, data: bytes) -> None:
    """A binary frame: PCM16 mono at the session's rate, for the open utterance."""
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
