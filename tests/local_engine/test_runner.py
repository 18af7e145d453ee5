"""The runner contract: segments in, A/V-synchronised frames and segment ends out, idle
frames between, interrupts with the position reached, real-time and offline pacing."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import numpy as np
import pytest
from numpy.typing import NDArray

from avatarkit import AudioChunk, SessionStateError
from avatarkit.local_engine.engine import LipSyncEngine
from avatarkit.local_engine.runner import AvatarRunner, RunnerFrame, RunnerOutput, SegmentEnd

RATE = 16_000
FPS = 25.0
SPF = 640


class LevelEngine(LipSyncEngine):
    """A test engine whose frames show what it was given: the red channel is the source
    index, green is 255 while speaking, blue the audio level (peak / 128)."""

    name = "level"

    def __init__(self, *, source_frames: int = 1) -> None:
        self.sample_rate = RATE
        self.fps = FPS
        self.width = 8
        self.height = 6
        self.source_frames = source_frames
        self.calls: list[tuple[int, bool, int]] = []  # (source index, speaking, batch size)
        self.resets = 0
        self.lookahead_wanted = 0
        #: (segment ids, lookahead) per call
        self.lookaheads: list[tuple[list[str | None], NDArray[np.int16] | None]] = []

    def render(self, audio: NDArray[np.int16], *, source_index: int,
               speaking: bool) -> NDArray[np.uint8]:
        return self.render_batch([audio], source_indices=[source_index], speaking=[speaking])[0]

    @property
    def lookahead_samples(self) -> int:
        return self.lookahead_wanted

    def render_batch(self, audio: Sequence[NDArray[np.int16]], *,
                     source_indices: Sequence[int], speaking: Sequence[bool],
                     segment_ids: Sequence[str | None] | None = None,
                     lookahead: NDArray[np.int16] | None = None) -> list[NDArray[np.uint8]]:
        assert segment_ids is not None and len(segment_ids) == len(audio)
        assert [s is not None for s in segment_ids] == list(speaking)
        self.lookaheads.append((list(segment_ids), lookahead))
        out = []
        for a, index, talking in zip(audio, source_indices, speaking, strict=True):
            assert len(a) == SPF and a.dtype == np.int16
            if not talking:
                assert not a.any(), "idle frames get silence"
            self.calls.append((index, talking, len(audio)))
            frame = np.zeros((self.height, self.width, 3), np.uint8)
            frame[..., 0] = index
            frame[..., 1] = 255 if talking else 0
            frame[..., 2] = min(255, int(np.abs(a.astype(np.int32)).max()) // 128)
            out.append(frame)
        return out

    def reset(self) -> None:
        self.resets += 1


def tone(seconds: float, rate: int = RATE, amplitude: int = 8000) -> AudioChunk:
    n = round(seconds * rate)
    t = np.arange(n) / rate
    samples = (amplitude * np.sin(2 * np.pi * 220 * t)).astype(np.int16)
    return AudioChunk(samples, rate)


async def collect(runner: AvatarRunner, *, until: int | None = None) -> list[RunnerOutput]:
    out: list[RunnerOutput] = []
    async for item in runner.frames():
        out.append(item)
        if until is not None and sum(isinstance(x, RunnerFrame) for x in out) >= until:
            break
    return out


def frames_of(items: list[RunnerOutput]) -> list[RunnerFrame]:
    return [x for x in items if isinstance(x, RunnerFrame)]


async def test_offline_render_plays_every_sample_once_in_sync() -> None:
    engine = LevelEngine()
    audio = tone(1.0)
    async with AvatarRunner(engine, realtime=False) as runner:
        await runner.push_audio(audio, segment_id="u1")
        runner.finish()
        items = await collect(runner)
    frames = frames_of(items)
    assert len(frames) == 25 and items[-1] == SegmentEnd("u1", 1.0, False)
    assert [f.index for f in frames] == list(range(25))
    assert [f.timestamp for f in frames] == pytest.approx([i / FPS for i in range(25)])
    played = np.concatenate([f.audio.samples for f in frames])
    assert np.array_equal(played, audio.samples)  # bit-exact: no sample lost or repeated
    assert all(f.speaking and f.segment_id == "u1" for f in frames)
    assert all(f.video.data[0, 0, 1] == 255 for f in frames)


async def test_a_partial_last_frame_is_padded_and_the_position_is_exact() -> None:
    engine = LevelEngine()
    async with AvatarRunner(engine, realtime=False) as runner:
        await runner.push_audio(AudioChunk(np.full(SPF * 3 + 100, 1000, np.int16), RATE))
        runner.finish()
        items = await collect(runner)
    frames = frames_of(items)
    assert len(frames) == 4
    last = frames[-1].audio.samples
    assert (last[:100] == 1000).all() and not last[100:].any()
    end = items[-1]
    assert isinstance(end, SegmentEnd) and end.position == pytest.approx((SPF * 3 + 100) / RATE)


async def test_idle_frames_cycle_the_source_forward_and_back_with_the_mouth_closed() -> None:
    engine = LevelEngine(source_frames=4)
    async with AvatarRunner(engine) as runner:
        started = time.monotonic()
        frames = frames_of(await collect(runner, until=9))
        elapsed = time.monotonic() - started
    assert [f.video.data[0, 0, 0] for f in frames] == [0, 1, 2, 3, 2, 1, 0, 1, 2]
    assert not any(f.speaking for f in frames)
    assert all(not f.audio.samples.any() and len(f.audio.samples) == SPF for f in frames)
    assert elapsed == pytest.approx(8 / FPS, abs=0.15)  # paced: frame i at i / fps


async def test_speech_starts_between_idle_frames_without_a_gap_in_time() -> None:
    engine = LevelEngine()
    async with AvatarRunner(engine) as runner:
        items: list[RunnerOutput] = []
        async for item in runner.frames():
            items.append(item)
            if len(items) == 3:
                await runner.push_audio(tone(0.2), segment_id="hello")
                runner.end_utterance()
            if isinstance(item, SegmentEnd):
                break
    frames = frames_of(items)
    assert [f.index for f in frames] == list(range(len(frames)))
    speaking = [f for f in frames if f.speaking]
    assert len(speaking) == 5 and not frames[0].speaking
    end = items[-1]
    assert isinstance(end, SegmentEnd) and (end.segment_id, end.interrupted) == ("hello", False)
    assert end.position == pytest.approx(0.2)


async def test_an_underrun_shows_idle_frames_until_audio_arrives() -> None:
    engine = LevelEngine()
    async with AvatarRunner(engine) as runner:
        await runner.push_audio(AudioChunk(np.full(SPF, 5000, np.int16), RATE), segment_id="u")
        items: list[RunnerOutput] = []
        async for item in runner.frames():
            items.append(item)
            if len(items) == 4:  # the source is late: more audio only now
                await runner.push_audio(AudioChunk(np.full(SPF, 5000, np.int16), RATE))
                runner.end_utterance()
            if isinstance(item, SegmentEnd):
                break
    flags = [f.speaking for f in frames_of(items)]
    assert flags[0] and not flags[1] and flags[-1] and sum(flags) == 2


async def test_clear_buffer_ends_the_segment_at_the_position_reached() -> None:
    engine = LevelEngine()
    async with AvatarRunner(engine) as runner:
        await runner.push_audio(tone(2.0), segment_id="long")
        runner.end_utterance()
        await runner.push_audio(tone(1.0), segment_id="queued")
        items: list[RunnerOutput] = []
        position = None
        async for item in runner.frames():
            items.append(item)
            if len(frames_of(items)) == 5 and position is None:
                position = runner.clear_buffer()
            if len(frames_of(items)) == 8:
                break
    assert position == pytest.approx(5 * SPF / RATE)
    ends = [x for x in items if isinstance(x, SegmentEnd)]
    assert [(e.segment_id, e.interrupted) for e in ends] == [("long", True), ("queued", True)]
    assert [e.position for e in ends] == pytest.approx([0.2, 0.0])
    after = frames_of(items)[5:]
    assert not any(f.speaking for f in after)  # idle at once, nothing of the queue played
    assert engine.resets == 1 and not runner.speaking


async def test_clear_buffer_while_the_last_frame_is_drawn_still_ends_that_segment() -> None:
    """The segment's last frame is planned (the segment left the queue) but not yet yielded
    when the interrupt comes: its end must still be reported, as interrupted."""
    drawing = threading.Event()
    release = threading.Event()

    class SlowEngine(LevelEngine):
        def render_batch(self, audio: Sequence[NDArray[np.int16]], *,
                         source_indices: Sequence[int], speaking: Sequence[bool],
                         segment_ids: Sequence[str | None] | None = None,
                         lookahead: NDArray[np.int16] | None = None,
                         ) -> list[NDArray[np.uint8]]:
            if any(speaking):
                drawing.set()
                release.wait(5)
            return super().render_batch(audio, source_indices=source_indices,
                                        speaking=speaking, segment_ids=segment_ids,
                                        lookahead=lookahead)

    async with AvatarRunner(SlowEngine()) as runner:
        await runner.push_audio(tone(SPF / RATE), segment_id="short")  # exactly one frame
        runner.end_utterance()
        items: list[RunnerOutput] = []

        async def consume() -> None:
            async for item in runner.frames():
                items.append(item)
                if isinstance(item, SegmentEnd):
                    return

        consumer = asyncio.create_task(consume())
        await asyncio.to_thread(drawing.wait, 5)
        assert runner.speaking
        position = runner.clear_buffer()
        release.set()
        async with asyncio.timeout(5):
            await consumer
    ends = [x for x in items if isinstance(x, SegmentEnd)]
    assert [(e.segment_id, e.interrupted) for e in ends] == [("short", True)]
    assert position == pytest.approx(SPF / RATE)  # its audio was taken for the frame
    assert not any(isinstance(x, RunnerFrame) and x.speaking for x in items)


async def test_audio_for_a_new_segment_ends_the_open_one() -> None:
    engine = LevelEngine()
    async with AvatarRunner(engine, realtime=False) as runner:
        await runner.push_audio(tone(0.12), segment_id="a")
        await runner.push_audio(tone(0.08), segment_id="b")
        runner.finish()
        items = await collect(runner)
    kinds = [(x.segment_id, "end") if isinstance(x, SegmentEnd) else (x.segment_id, "frame")
             for x in items]
    assert kinds == [("a", "frame")] * 3 + [("a", "end")] + [("b", "frame")] * 2 + \
        [("b", "end")]


async def test_other_rates_and_channels_are_converted_to_the_engines_format() -> None:
    engine = LevelEngine()
    stereo = np.repeat(tone(0.5, rate=48_000).samples[:, None], 2, axis=1)
    async with AvatarRunner(engine, realtime=False) as runner:
        await runner.push_audio(AudioChunk(stereo, 48_000, channels=2))
        runner.finish()
        items = await collect(runner)
    frames = frames_of(items)
    end = items[-1]
    assert isinstance(end, SegmentEnd) and end.position == pytest.approx(0.5, abs=0.002)
    assert all(f.audio.sample_rate == RATE and f.audio.channels == 1 for f in frames)
    assert len(frames) == 13


async def test_batches_give_the_same_frames_and_post_runs_on_each() -> None:
    async def render(batch: int) -> tuple[list[RunnerOutput], LevelEngine]:
        engine = LevelEngine(source_frames=3)
        marked: list[int] = []

        def post(frame: NDArray[np.uint8]) -> None:
            frame[0, 0, :] = 7
            marked.append(1)

        async with AvatarRunner(engine, realtime=False, batch_size=batch,
                                post=post) as runner:
            await runner.push_audio(tone(0.5), segment_id="u")
            runner.finish()
            items = await collect(runner)
        assert len(marked) == 13
        return items, engine

    one, engine_one = await render(1)
    four, engine_four = await render(4)
    assert max(size for _, _, size in engine_four.calls) == 4
    assert max(size for _, _, size in engine_one.calls) == 1
    assert len(one) == len(four)
    for a, b in zip(one, four, strict=True):
        if isinstance(a, RunnerFrame):
            assert isinstance(b, RunnerFrame) and np.array_equal(a.video.data, b.video.data)
            assert a.video.data[0, 0, 0] == 7
        else:
            assert a == b


async def test_a_looking_ahead_engine_gets_the_audio_buffered_after_each_batch() -> None:
    engine = LevelEngine()
    engine.lookahead_wanted = 2 * SPF
    speech = tone(0.5).samples  # 12.5 frames
    async with AvatarRunner(engine, realtime=False, batch_size=4) as runner:
        await runner.push_audio(AudioChunk(speech, RATE), segment_id="u")
        await runner.push_audio(tone(0.1), segment_id="v")  # ends "u"
        runner.finish()
        await collect(runner)
    calls = engine.lookaheads
    assert [ids for ids, _ in calls] == [["u"] * 4, ["u"] * 4, ["u"] * 4, ["u", "v", "v", "v"]]
    # after the first two batches of "u": exactly the next two frames' samples, unconsumed
    for k in (0, 1):
        ahead = calls[k][1]
        assert ahead is not None
        start = (k + 1) * 4 * SPF
        assert np.array_equal(ahead, speech[start:start + 2 * SPF])
    # then only half a frame of "u" is left; the last batch's "v" has nothing after it
    tail = calls[2][1]
    assert tail is not None and np.array_equal(tail, speech[12 * SPF:])
    assert calls[3][1] is None


async def test_close_stops_frames_and_releases_the_worker_thread() -> None:
    engine = LevelEngine()
    runner = AvatarRunner(engine)
    consumer = asyncio.create_task(collect(runner))
    await asyncio.sleep(0.1)
    await runner.aclose()
    await asyncio.wait_for(consumer, 2)
    await runner.aclose()  # idempotent
    assert not any(t.name.startswith("avatarkit-engine") for t in threading.enumerate())
    with pytest.raises(SessionStateError, match="closed"):
        await runner.push_audio(tone(0.1))


async def test_too_much_buffered_audio_is_refused_not_hoarded() -> None:
    async with AvatarRunner(LevelEngine(), max_buffered_s=1.0) as runner:
        await runner.push_audio(tone(0.9))
        with pytest.raises(SessionStateError, match="not keeping up"):
            await runner.push_audio(tone(0.2))
        assert runner.buffered_seconds == pytest.approx(0.9)


async def test_one_consumer_only_and_no_audio_after_finish() -> None:
    async with AvatarRunner(LevelEngine(), realtime=False) as runner:
        first = runner.frames()
        await runner.push_audio(tone(0.04))
        runner.finish()
        assert isinstance(await anext(first), RunnerFrame)
        with pytest.raises(SessionStateError, match="consumer"):
            await anext(runner.frames())
        with pytest.raises(SessionStateError, match="finished"):
            await runner.push_audio(tone(0.04))
        await first.aclose()
