"""A standard LiveKit avatar worker, as vendors run it when they join *your* room (D-ID
``sessions/join``; Tavus and Simli have the same mode): the worker side of the contract in
``shared/research/vendor-contracts.md`` §6.2-6.3.

It joins with the token the client minted, takes the agent's audio from ``lk.audio_stream``
byte streams (one per segment; the stream's end is the segment's end), plays the segments one
after another in real time, and reports ``lk.playback_started`` (on a segment's first audio)
and ``lk.playback_finished`` ``{"playback_position", "interrupted"}`` (when it has played out)
to the agent by RPC, with up to 3 tries 0.1 s apart as LiveKit's ``DataStreamAudioReceiver``
does. The RPC ``lk.clear_buffer`` stops the segment playing, drops the queued ones and the
rest of their streams, and is acknowledged with ``playback_finished(interrupted=true)``.

The agent is the participant the token names in ``attributes["lk.publish_on_behalf"]`` (else
the alphabetically first other participant). Vendor-specific text topics are registered on the
worker's ``link`` (``register_text_handler``).

What is checked and recorded (``protocol_errors``): a stream's ``sample_rate`` attribute must
be the rate the vendor was configured with and ``num_channels`` must be ``"1"``; a stream with
an odd number of bytes is not PCM16. Streams from anyone but the agent are ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ..transport.livekit import (
    AUDIO_STREAM_TOPIC,
    RPC_CLEAR_BUFFER,
    RPC_PLAYBACK_FINISHED,
    RPC_PLAYBACK_STARTED,
    IncomingByteStream,
    RoomLink,
    RoomRpcError,
)
from ._media import PCM16_SAMPLE_WIDTH, pcm16_seconds

__all__ = ["LiveKitAvatarWorker", "WorkerSegment"]

_TICK = 0.02
_RPC_TRIES = 3


@dataclass(eq=False)
class WorkerSegment:
    """One segment: a byte stream of audio (or a vendor text command rendered as speech)."""

    name: str
    sample_rate: int
    kind: str = "audio"
    received_seconds: float = 0.0
    received_bytes: int = 0
    chunk_sizes: list[int] = field(default_factory=list)
    done: bool = False
    played: float = 0.0
    outcome: str = "queued"  # queued | playing | finished | interrupted | abandoned
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def feed(self, data: bytes) -> None:
        self.received_bytes += len(data)
        self.chunk_sizes.append(len(data))
        self.received_seconds += pcm16_seconds(len(data), self.sample_rate)
        self.changed.set()


class LiveKitAvatarWorker:
    """One worker in one room. ``on_audio(seconds)`` is called as audio arrives (the drop
    fault hooks there); ``on_gone(reason)`` once when the worker leaves the room for any
    reason but :meth:`leave`."""

    def __init__(self, link: RoomLink, *, sample_rate: int, agent_identity: str | None,
                 mute_interrupts: Callable[[], bool],
                 on_audio: Callable[[float], None] = lambda seconds: None,
                 on_activity: Callable[[], None] = lambda: None,
                 on_gone: Callable[[str], None] = lambda reason: None) -> None:
        self.link = link
        self.sample_rate = sample_rate
        self._agent_hint = agent_identity
        self._mute_interrupts = mute_interrupts
        self._on_audio = on_audio
        self._on_activity = on_activity
        self._on_gone = on_gone
        self.segments: list[WorkerSegment] = []
        self.protocol_errors: list[str] = []
        self.interrupts = 0
        self.rpc_failures: list[str] = []
        self._queue: deque[WorkerSegment] = deque()
        self._current: WorkerSegment | None = None
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._left = False
        self._player = asyncio.get_running_loop().create_task(self._play())
        link.register_byte_stream_handler(AUDIO_STREAM_TOPIC, self._on_stream)
        link.register_rpc(RPC_CLEAR_BUFFER, self._on_clear_buffer)
        link.on_disconnected = self._disconnected
        link.on_participant_left = self._participant_left

    # -- who is the agent -------------------------------------------------------------------

    @property
    def agent_identity(self) -> str | None:
        others = self.link.participants()
        if self._agent_hint is not None:
            return self._agent_hint
        return min(others) if others else None

    @property
    def speaking(self) -> bool:
        return self._current is not None

    @property
    def audio_seconds(self) -> float:
        return sum(s.received_seconds for s in self.segments if s.kind == "audio")

    # -- input ------------------------------------------------------------------------------

    async def _on_stream(self, stream: IncomingByteStream) -> None:
        if stream.sender != self.agent_identity:
            self.protocol_errors.append(f"audio stream from {stream.sender}, not the agent")
            return
        rate = stream.attributes.get("sample_rate")
        channels = stream.attributes.get("num_channels")
        if rate != str(self.sample_rate) or channels != "1":
            self.protocol_errors.append(
                f"stream {stream.name}: sample_rate={rate!r}, num_channels={channels!r}; "
                f"expected {self.sample_rate} and 1")
            return
        segment = WorkerSegment(name=stream.name, sample_rate=self.sample_rate)
        self._enqueue(segment)
        try:
            async for chunk in stream.chunks:
                if segment.outcome in ("interrupted", "abandoned"):
                    continue  # cleared: the rest of the stream is dropped
                segment.feed(chunk)
                self._on_activity()
                self._on_audio(pcm16_seconds(len(chunk), self.sample_rate))
        except ConnectionError:
            segment.outcome = "abandoned" if segment.outcome == "queued" else segment.outcome
        if segment.received_bytes % PCM16_SAMPLE_WIDTH:
            self.protocol_errors.append(f"stream {stream.name}: {segment.received_bytes} "
                                        "bytes is not whole PCM16 samples")
        segment.done = True
        segment.changed.set()

    def speak(self, seconds: float, *, name: str, kind: str = "text") -> WorkerSegment:
        """Queue speech the vendor renders itself (a text command), ``seconds`` long."""
        segment = WorkerSegment(name=name, sample_rate=self.sample_rate, kind=kind,
                                received_seconds=seconds, done=True)
        self._enqueue(segment)
        self._on_activity()
        return segment

    def _enqueue(self, segment: WorkerSegment) -> None:
        self.segments.append(segment)
        self._queue.append(segment)
        self._wake.set()

    # -- playback ---------------------------------------------------------------------------

    async def _play(self) -> None:
        while True:
            while not self._queue:
                self._wake.clear()
                await self._wake.wait()
            segment = self._queue[0]
            while True:
                if segment.outcome in ("interrupted", "abandoned"):
                    break
                available = segment.received_seconds - segment.played
                if available > 1e-9:
                    if self._current is None:
                        self._current = segment
                        segment.outcome = "playing"
                        self._notify(RPC_PLAYBACK_STARTED, "")
                        self._on_activity()  # playing: the idle timer stops
                    step = min(available, _TICK)
                    await asyncio.sleep(step)
                    segment.played += step
                elif segment.done:
                    break
                else:
                    segment.changed.clear()
                    await segment.changed.wait()
            if self._queue and self._queue[0] is segment:
                self._queue.popleft()
            if segment.outcome == "playing":
                segment.outcome = "finished"
                self._current = None
                self._notify(RPC_PLAYBACK_FINISHED, json.dumps(
                    {"playback_position": round(segment.played, 3), "interrupted": False}))
                self._on_activity()
            elif segment.outcome == "queued":  # an empty segment: nothing to play
                segment.outcome = "finished"

    async def _on_clear_buffer(self, caller: str, payload: str) -> str:
        self.clear_buffer()
        return "ok"

    def clear_buffer(self) -> None:
        """Stop now and drop the queue; acknowledged unless interrupts are muted."""
        self.interrupts += 1
        current = self._current
        self._current = None
        for segment in self._queue:
            if segment.outcome in ("queued", "playing"):
                segment.outcome = "interrupted"
            segment.changed.set()
        had_work = current is not None or bool(self._queue)
        self._queue.clear()
        self._on_activity()
        if had_work and not self._mute_interrupts():
            position = current.played if current is not None else 0.0
            self._notify(RPC_PLAYBACK_FINISHED, json.dumps(
                {"playback_position": round(position, 3), "interrupted": True}))

    def _notify(self, method: str, payload: str) -> None:
        agent = self.agent_identity
        if agent is None or self._left:
            return

        async def call() -> None:
            for attempt in range(_RPC_TRIES):
                try:
                    await self.link.perform_rpc(destination=agent, method=method,
                                                payload=payload, response_timeout=2.0)
                    return
                except (RoomRpcError, ConnectionError) as exc:
                    if attempt == _RPC_TRIES - 1:
                        self.rpc_failures.append(f"{method}: {exc}")
                    else:
                        await asyncio.sleep(0.1)

        task = asyncio.get_running_loop().create_task(call())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- leaving ----------------------------------------------------------------------------

    def _participant_left(self, identity: str) -> None:
        if identity == self._agent_hint or (self._agent_hint is None
                                            and not self.link.participants()):
            self._spawn_leave("agent_left")

    def _disconnected(self, reason: str) -> None:
        self._spawn_leave(f"disconnected: {reason}")

    def _spawn_leave(self, reason: str) -> None:
        if self._left:
            return
        task = asyncio.get_running_loop().create_task(self._leave(reason, report=True))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def leave(self, reason: str = "left") -> None:
        """Leave the room (the vendor ended the session); no ``on_gone`` callback."""
        await self._leave(reason, report=False)

    async def _leave(self, reason: str, *, report: bool) -> None:
        if self._left:
            return
        self._left = True
        for segment in self._queue:
            if segment.outcome in ("queued", "playing"):
                segment.outcome = "abandoned"
        self._queue.clear()
        self._current = None
        self._player.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._player
        if report:
            self._on_gone(reason)
        await self.link.aclose()
        current = asyncio.current_task()
        pending = [t for t in self._tasks if t is not current]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
