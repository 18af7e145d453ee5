"""The runner: audio in, A/V-synchronised frames out, for any :class:`LipSyncEngine`.

The shape is LiveKit's avatar contract (``AudioReceiver`` -> ``VideoGenerator`` ->
``AvatarRunner``), in one object: :meth:`AvatarRunner.push_audio` and
:meth:`~AvatarRunner.end_utterance` feed segments (one per utterance),
:meth:`~AvatarRunner.clear_buffer` interrupts, and :meth:`~AvatarRunner.frames` yields, in
order:

* :class:`RunnerFrame` — one video frame and exactly the audio it covers (``samples_per_frame``
  samples at the engine's rate), both stamped with the same stream time ``index / fps``: a
  transport that plays them by timestamp is in sync by construction;
* :class:`SegmentEnd` — after a segment's last frame (``interrupted=False``), or at once on
  :meth:`~AvatarRunner.clear_buffer` (``interrupted=True``, with the position reached).

Between segments the runner draws idle frames: the avatar's source frames cycled forward and
backward (a still image stays still), the mouth closed, and silent audio; an engine's model is
never run for them. A live segment whose audio arrives late (underrun) also gets idle frames
until enough audio is there: the stream never stalls.

Pacing: ``realtime=True`` (live sessions) releases frame ``i`` at ``start + i / fps``;
``realtime=False`` (offline renders) produces frames as fast as the engine draws them, never
an idle frame while input may still come, and ends once :meth:`~AvatarRunner.finish` was
called and everything was drawn.

Engines run on one worker thread (they are CPU- or GPU-bound), so the event loop stays free;
``post`` (the disclosure label and watermark) runs on the same thread, on each frame, in place.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

import numpy as np
from numpy.typing import NDArray

from ..errors import SessionStateError
from ..media import AudioChunk, AudioFormat, AudioResampler, VideoFrame
from .engine import LipSyncEngine

__all__ = ["AvatarRunner", "RunnerFrame", "RunnerOutput", "SegmentEnd"]

_Frame = NDArray[np.uint8]


@dataclass(frozen=True, slots=True)
class RunnerFrame:
    """One frame of output: the picture and the audio it covers, with one timestamp."""

    video: VideoFrame
    audio: AudioChunk
    #: the segment whose audio this frame plays; None for an idle frame
    segment_id: str | None
    index: int

    @property
    def speaking(self) -> bool:
        return self.segment_id is not None

    @property
    def timestamp(self) -> float:
        return self.video.timestamp


@dataclass(frozen=True, slots=True)
class SegmentEnd:
    """A segment finished (``interrupted=False``) or was cleared (``interrupted=True``);
    ``position`` is the seconds of it played."""

    segment_id: str
    position: float
    interrupted: bool


RunnerOutput = RunnerFrame | SegmentEnd


@dataclass(eq=False)
class _Segment:
    segment_id: str
    chunks: deque[NDArray[np.int16]] = field(default_factory=deque)
    buffered: int = 0  # samples in chunks
    played: int = 0  # samples drawn into frames
    ended: bool = False

    def peek(self, count: int) -> NDArray[np.int16]:
        """Up to ``count`` buffered samples, without taking them."""
        parts: list[NDArray[np.int16]] = []
        need = count
        for chunk in self.chunks:
            if need <= 0:
                break
            parts.append(chunk[:need])
            need -= len(parts[-1])
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int16)

    def take(self, count: int) -> NDArray[np.int16]:
        """Up to ``count`` samples, zero-padded to ``count``."""
        out = np.zeros(count, dtype=np.int16)
        filled = 0
        while filled < count and self.chunks:
            head = self.chunks[0]
            n = min(count - filled, len(head))
            out[filled:filled + n] = head[:n]
            filled += n
            if n == len(head):
                self.chunks.popleft()
            else:
                self.chunks[0] = head[n:]
        self.buffered -= filled
        self.played += filled
        return out


class AvatarRunner:
    """Drives one engine. ``async with AvatarRunner(engine) as runner:`` then feed it and
    iterate :meth:`frames` (one consumer)."""

    def __init__(self, engine: LipSyncEngine, *, realtime: bool = True, batch_size: int = 1,
                 post: Callable[[_Frame], None] | None = None,
                 max_buffered_s: float = 120.0) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.engine = engine
        self.realtime = realtime
        self.batch_size = batch_size
        self._post = post
        self._rate = engine.sample_rate
        self._spf = engine.samples_per_frame
        self._max_buffered = int(max_buffered_s * self._rate)
        self._segments: deque[_Segment] = deque()
        #: segments whose last frame was planned but whose end is not yielded yet
        self._draining: list[_Segment] = []
        self._resamplers: dict[tuple[int, int], AudioResampler] = {}
        self._outbox: deque[SegmentEnd] = deque()
        self._wake = asyncio.Event()
        self._epoch = 0  # bumped by clear_buffer: frames drawn before it are dropped
        self._index = 0
        self._started_at: float | None = None
        self._finished = False
        self._closed = False
        self._iterating = False
        self._next_segment = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="avatarkit-engine")

    # -- input ----------------------------------------------------------------------------

    async def push_audio(self, chunk: AudioChunk, *, segment_id: str | None = None) -> str:
        """Queue audio (any rate and channel count: converted to the engine's mono rate).

        Audio for a new ``segment_id`` ends the open segment first. Without one, the audio
        joins the open segment or starts a new one. Returns the segment's id.
        """
        self._check_open()
        if self._finished:
            raise SessionStateError("the runner was finished: no more audio")
        samples = self._to_engine_rate(chunk)
        segment = self._open_segment(segment_id)
        if sum(s.buffered for s in self._segments) + len(samples) > self._max_buffered:
            raise SessionStateError(f"more than {self._max_buffered / self._rate:g} s of audio "
                                    "is buffered: the consumer of frames() is not keeping up")
        if len(samples):
            segment.chunks.append(samples)
            segment.buffered += len(samples)
        self._wake.set()
        return segment.segment_id

    def end_utterance(self) -> str | None:
        """End the open segment: its last frame is drawn when its audio runs out, then its
        :class:`SegmentEnd`. Returns its id (None when no segment was open)."""
        self._check_open()
        segment = self._open()
        if segment is None:
            return None
        segment.ended = True
        self._flush_resamplers(segment)
        self._wake.set()
        return segment.segment_id

    def clear_buffer(self) -> float:
        """Interrupt: drop every queued segment; the one playing ends here. Returns the
        seconds of it played (0.0 when nothing was playing)."""
        self._check_open()
        position = 0.0
        # Segments whose last frame is being drawn or paced have left the queue, but their
        # end was not yielded yet: they are the ones playing.
        playing = [*self._draining, *self._segments]
        if playing:
            head = playing[0]
            position = head.played / self._rate
            self._outbox.append(SegmentEnd(head.segment_id, position, interrupted=True))
            for other in playing[1:]:
                self._outbox.append(SegmentEnd(other.segment_id, other.played / self._rate,
                                               interrupted=True))
        self._draining.clear()
        self._segments.clear()
        self._resamplers.clear()
        self._epoch += 1
        self.engine.reset()
        self._wake.set()
        return position

    def finish(self) -> None:
        """No more input: :meth:`frames` ends once everything queued was drawn (offline
        renders). The open segment is ended."""
        if self._open() is not None:
            self.end_utterance()
        self._finished = True
        self._wake.set()

    @property
    def speaking(self) -> bool:
        return bool(self._segments or self._draining)

    @property
    def open_segment(self) -> str | None:
        """The id of the segment audio still goes to (None when none is open)."""
        segment = self._open()
        return segment.segment_id if segment is not None else None

    @property
    def buffered_seconds(self) -> float:
        return sum(s.buffered for s in self._segments) / self._rate

    def _open(self) -> _Segment | None:
        tail = self._segments[-1] if self._segments else None
        return tail if tail is not None and not tail.ended else None

    def _open_segment(self, segment_id: str | None) -> _Segment:
        current = self._open()
        if current is not None and segment_id in (None, current.segment_id):
            return current
        if current is not None:
            current.ended = True
            self._flush_resamplers(current)
        if segment_id is None:
            self._next_segment += 1
            segment_id = f"seg_{self._next_segment}"
        segment = _Segment(segment_id)
        self._segments.append(segment)
        return segment

    def _to_engine_rate(self, chunk: AudioChunk) -> NDArray[np.int16]:
        if chunk.sample_rate == self._rate and chunk.channels == 1:
            return chunk.samples.astype(np.int16, copy=True).reshape(-1)
        key = (chunk.sample_rate, chunk.channels)
        resampler = self._resamplers.get(key)
        if resampler is None:
            resampler = self._resamplers[key] = AudioResampler(AudioFormat(self._rate, 1))
        return resampler.process(chunk).samples.reshape(-1)

    def _flush_resamplers(self, segment: _Segment) -> None:
        for resampler in self._resamplers.values():
            tail = resampler.flush().samples.reshape(-1)
            if len(tail):
                segment.chunks.append(tail)
                segment.buffered += len(tail)
        self._resamplers.clear()

    def _check_open(self) -> None:
        if self._closed:
            raise SessionStateError("the runner is closed")

    # -- output ---------------------------------------------------------------------------

    async def frames(self) -> AsyncGenerator[RunnerOutput, None]:
        """Frames and segment ends, in order, until :meth:`aclose` (or, after :meth:`finish`,
        until everything was drawn)."""
        if self._iterating:
            raise SessionStateError("frames() already has a consumer")
        self._iterating = True
        loop = asyncio.get_running_loop()
        try:
            while not self._closed:
                while self._outbox:
                    yield self._outbox.popleft()
                plan = self._plan()
                if plan is None:
                    if self._finished and not self._segments:
                        return
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                audio, segments, ends, lookahead = plan
                if not audio:
                    continue  # only segment ends: yielded at the top of the loop
                epoch = self._epoch
                indices = [self._source_index(self._index + k) for k in range(len(audio))]
                speaking = [s is not None for s in segments]
                pictures = await loop.run_in_executor(
                    self._executor, self._draw, audio, indices, speaking, segments, lookahead)
                if epoch != self._epoch:
                    continue  # cleared while drawing: these frames are stale
                for k, picture in enumerate(pictures):
                    index = self._index
                    self._index += 1
                    timestamp = index / self.engine.fps
                    if self.realtime:
                        await self._pace(timestamp)
                        if epoch != self._epoch:
                            break
                    yield RunnerFrame(
                        video=VideoFrame(picture, timestamp),
                        audio=AudioChunk(audio[k], self._rate),
                        segment_id=segments[k], index=index)
                    end = ends[k]
                    if end is not None:
                        self._draining = [d for d in self._draining
                                          if d.segment_id != end.segment_id]
                        yield end
        finally:
            self._iterating = False

    def _plan(self) -> tuple[list[NDArray[np.int16]], list[str | None],
                             list[SegmentEnd | None], NDArray[np.int16] | None] | None:
        """The next frames to draw (a batch of speaking frames, or one idle frame), or None
        when an offline runner must wait for input."""
        audio: list[NDArray[np.int16]] = []
        segments: list[str | None] = []
        ends: list[SegmentEnd | None] = []
        while len(audio) < self.batch_size and self._segments:
            head = self._segments[0]
            if head.buffered >= self._spf or (head.ended and head.buffered > 0):
                audio.append(head.take(self._spf))
                segments.append(head.segment_id)
                end = None
                if head.ended and head.buffered == 0:
                    self._segments.popleft()
                    self._draining.append(head)
                    end = SegmentEnd(head.segment_id, head.played / self._rate, False)
                ends.append(end)
            elif head.ended:  # ended with nothing left (its last frame was drawn already)
                self._segments.popleft()
                self._outbox.append(SegmentEnd(head.segment_id, head.played / self._rate,
                                               False))
            else:
                break  # waiting for more of the open segment
        if audio:
            return audio, segments, ends, self._lookahead(segments[-1])
        if self._outbox:
            return [], [], [], None
        if not self.realtime:
            return None
        return [np.zeros(self._spf, dtype=np.int16)], [None], [None], None

    def _lookahead(self, segment_id: str | None) -> NDArray[np.int16] | None:
        """The audio buffered after the planned frames in their last segment (what the
        engine may look ahead at); None when that segment has nothing more buffered."""
        want = self.engine.lookahead_samples
        if want <= 0 or not self._segments or self._segments[0].segment_id != segment_id:
            return None
        ahead = self._segments[0].peek(want)
        return ahead if len(ahead) else None

    def _draw(self, audio: list[NDArray[np.int16]], indices: list[int], speaking: list[bool],
              segments: list[str | None], lookahead: NDArray[np.int16] | None) -> list[_Frame]:
        pictures = self.engine.render_batch(audio, source_indices=indices, speaking=speaking,
                                            segment_ids=segments, lookahead=lookahead)
        if self._post is not None:
            for picture in pictures:
                self._post(picture)
        return pictures

    def _source_index(self, step: int) -> int:
        n = self.engine.source_frames
        if n <= 1:
            return 0
        period = 2 * n - 2
        j = step % period
        return j if j < n else period - j

    async def _pace(self, timestamp: float) -> None:
        now = time.monotonic()
        if self._started_at is None:
            self._started_at = now - timestamp
        delay = self._started_at + timestamp - now
        if delay > 0:
            await asyncio.sleep(delay)

    # -- lifecycle ------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Stop: :meth:`frames` ends, the worker thread is released. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._segments.clear()
        self._draining.clear()
        self._wake.set()
        with contextlib.suppress(RuntimeError):
            await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown,
                                                             True)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()
