"""``EngineStream``: one live stream of the local engine, shared by the in-process ``local``
provider and the self-hosted server.

It owns an :class:`~avatarkit.local_engine.runner.AvatarRunner` and the one task that drains
its frames, and hands each frame to every *sink* (a WHEP broadcast, an in-process frame
queue, a recorder) and each playback change to the ``on_event`` callback:

* :class:`PlaybackStart` when the first frame of an utterance is released (the moment a viewer
  sees the mouth move), with the latency since that utterance's first audio chunk arrived;
* :class:`~avatarkit.local_engine.runner.SegmentEnd` when its last frame was released, or at
  once on :meth:`clear_buffer` with the position reached.

Utterance ids are the runner's segment ids, so the caller's id travels with its audio. The
stream also keeps the figures the server's metrics and the benchmarks report: frames
released, the measured frame rate, and first-frame latencies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Self

import numpy as np
from numpy.typing import NDArray

from ..errors import SessionStateError
from ..media import AudioChunk, VideoFrame
from .engine import LipSyncEngine
from .runner import AvatarRunner, RunnerFrame, SegmentEnd

__all__ = ["EngineStream", "PlaybackStart", "StreamEvent"]

logger = logging.getLogger("avatarkit.local_engine.stream")

_Frame = NDArray[np.uint8]


@dataclass(frozen=True, slots=True)
class PlaybackStart:
    """Utterance ``utterance_id`` started playing; ``latency`` is the seconds from its first
    audio chunk to its first released frame."""

    utterance_id: str
    latency: float


StreamEvent = PlaybackStart | SegmentEnd
_Sink = Callable[[RunnerFrame], None]


class EngineStream:
    """Drives one engine for one session. ``async with EngineStream(engine) as stream:``.

    Args:
        engine: the lip-sync engine, already built for the avatar.
        post: run on each frame in place on the engine's thread (the disclosure stamp).
        realtime: pace frames at the engine's fps (live) or release them as fast as they are
            drawn (offline renders; call :meth:`finish` and await :meth:`wait_finished`).
        on_event: playback starts and segment ends, on the event loop.
        batch_size: frames drawn per engine call.
    """

    def __init__(self, engine: LipSyncEngine, *, post: Callable[[_Frame], None] | None = None,
                 realtime: bool = True, on_event: Callable[[StreamEvent], None] | None = None,
                 batch_size: int = 1) -> None:
        self.engine = engine
        self.runner = AvatarRunner(engine, realtime=realtime, post=post, batch_size=batch_size)
        self._on_event = on_event
        self._sinks: list[_Sink] = []
        self._first_audio_at: dict[str, float] = {}
        self._started: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self._done = asyncio.Event()
        self._error: BaseException | None = None
        self._closed = False
        self.frames_released = 0
        self.speaking_frames = 0
        #: first-frame latency of each utterance, in seconds, oldest first (the last 256)
        self.first_frame_latencies: deque[float] = deque(maxlen=256)
        self._rate_window: deque[float] = deque(maxlen=64)

    # -- setup ------------------------------------------------------------------------------

    def add_sink(self, sink: _Sink) -> None:
        """Call ``sink(frame)`` for every frame released from now on (sync, must not block)."""
        self._sinks.append(sink)

    def remove_sink(self, sink: _Sink) -> None:
        with contextlib.suppress(ValueError):
            self._sinks.remove(sink)

    def start(self) -> None:
        """Start drawing frames (idle ones until audio arrives, in real time)."""
        if self._closed:
            raise SessionStateError("the engine stream is closed")
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._drain(), name="avatarkit-engine-stream")

    # -- input ------------------------------------------------------------------------------

    async def push_audio(self, chunk: AudioChunk, *, utterance_id: str | None = None) -> str:
        """Queue audio of ``utterance_id`` (a new id ends the open utterance). Returns the id."""
        self._check()
        segment = await self.runner.push_audio(chunk, segment_id=utterance_id)
        self._first_audio_at.setdefault(segment, time.monotonic())
        return segment

    def end_utterance(self) -> str | None:
        self._check()
        return self.runner.end_utterance()

    def clear_buffer(self) -> float:
        """Interrupt: returns the seconds played of the utterance that was playing."""
        self._check()
        return self.runner.clear_buffer()

    def finish(self) -> None:
        """No more audio (offline renders): the stream ends once everything was drawn."""
        self.runner.finish()

    async def wait_finished(self) -> None:
        """Until the drain task ended (after :meth:`finish`); re-raises an engine failure."""
        await self._done.wait()
        if self._error is not None:
            raise self._error

    @property
    def speaking(self) -> bool:
        return self.runner.speaking

    @property
    def fps(self) -> float | None:
        """Frames per second released over the last 64 frames (None before two)."""
        if len(self._rate_window) < 2:
            return None
        span = self._rate_window[-1] - self._rate_window[0]
        return (len(self._rate_window) - 1) / span if span > 0 else None

    def _check(self) -> None:
        if self._closed:
            raise SessionStateError("the engine stream is closed")
        if self._error is not None:
            raise SessionStateError(f"the engine failed: {self._error}")

    # -- output -----------------------------------------------------------------------------

    async def video_frames(self, *, max_queue: int = 8) -> AsyncIterator[VideoFrame]:
        """This process's view of the stream: video frames as released (a slow reader loses
        the oldest, never memory), until the stream ends."""
        queue: deque[VideoFrame] = deque(maxlen=max_queue)
        wake = asyncio.Event()

        def sink(frame: RunnerFrame) -> None:
            queue.append(frame.video)
            wake.set()

        self.add_sink(sink)
        try:
            while True:
                while queue:
                    yield queue.popleft()
                if self._done.is_set() or self._closed:
                    return
                wake.clear()
                done = asyncio.ensure_future(self._done.wait())
                woken = asyncio.ensure_future(wake.wait())
                try:
                    await asyncio.wait({done, woken}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    done.cancel()
                    woken.cancel()
        finally:
            self.remove_sink(sink)

    async def _drain(self) -> None:
        try:
            async for output in self.runner.frames():
                if isinstance(output, SegmentEnd):
                    self._first_audio_at.pop(output.segment_id, None)
                    self._started.discard(output.segment_id)
                    self._emit(output)
                    continue
                self._release(output)
        except Exception as exc:  # an engine failure ends the stream; the owner is told
            logger.exception("the local engine failed")
            self._error = exc
        finally:
            self._done.set()

    def _release(self, frame: RunnerFrame) -> None:
        now = time.monotonic()
        self.frames_released += 1
        self._rate_window.append(now)
        segment = frame.segment_id
        if segment is not None:
            self.speaking_frames += 1
            if segment not in self._started:
                self._started.add(segment)
                first = self._first_audio_at.get(segment, now)
                latency = now - first
                self.first_frame_latencies.append(latency)
                self._emit(PlaybackStart(segment, latency))
        for sink in list(self._sinks):
            try:
                sink(frame)
            except Exception:  # one broken consumer must not stop the others
                logger.exception("a frame sink failed; it is removed")
                self.remove_sink(sink)

    def _emit(self, event: StreamEvent) -> None:
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:
                logger.exception("the engine stream's event callback failed")

    # -- lifecycle --------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Stop the engine and the drain task. Idempotent."""
        if self._closed:
            return
        self._closed = True
        await self.runner.aclose()
        self.runner.engine.close()  # the runner's worker thread has stopped drawing
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._done.set()
        self._sinks.clear()

    async def __aenter__(self) -> Self:
        self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()
