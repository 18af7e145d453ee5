"""The lite engine on the real astronaut portrait: silence, loudness, vowels, release, masks.

The avatar is prepared once per module with mediapipe; audio is synthesised: voiced sounds
as harmonics of a glottal pitch (-6 dB per octave) shaped by formant resonances, sibilants as
white noise above 3 kHz.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from itertools import pairwise

import numpy as np
import pytest
from numpy.typing import NDArray
from pydantic import ValidationError

from avatarkit.errors import MediaFormatError
from avatarkit.local_engine.avatar import PreparedAvatar, prepare_avatar
from avatarkit.local_engine.engine import LipSyncEngine
from avatarkit.local_engine.lite import (
    LITE_ENGINE_VERSION,
    LOWER_INNER,
    UPPER_INNER,
    LiteEngine,
    LiteOptions,
    MouthModel,
    MouthOptions,
    MouthShape,
)

from . import astronaut, shifted

RATE = 16_000
FPS = 25.0
SPF = 640  # samples per frame at 16 kHz, 25 fps
Audio = NDArray[np.int16]
Frame = NDArray[np.uint8]

AH = ((700.0, 90.0), (1200.0, 110.0), (2600.0, 160.0))
OO = ((300.0, 60.0), (870.0, 80.0))
EE = ((280.0, 60.0), (2250.0, 150.0), (2900.0, 200.0))


def voiced(formants: tuple[tuple[float, float], ...] | None, *, seconds: float, db: float,
           f0: float = 150.0) -> Audio:
    """Harmonics of ``f0`` up to 7 kHz at ``db`` dBFS RMS; ``formants`` (centre, bandwidth)
    shape them, None leaves a plain 1/k buzz."""
    t = np.arange(round(RATE * seconds)) / RATE
    x = np.zeros_like(t)
    for k in range(1, int(7000 / f0)):
        f = k * f0
        gain = 1.0 / k
        if formants is not None:
            gain *= sum(1.0 / (1.0 + ((f - c) / bw) ** 2) for c, bw in formants) + 0.02
        x += gain * np.sin(2 * np.pi * f * t + 0.7 * k)
    x *= 10 ** (db / 20) / np.sqrt(np.mean(x**2))
    return np.round(x * 32767).astype(np.int16)


def hiss(*, seconds: float, db: float, seed: int = 1) -> Audio:
    """White noise above 3 kHz ("s") at ``db`` dBFS RMS."""
    n = round(RATE * seconds)
    spectrum = np.fft.rfft(np.random.default_rng(seed).standard_normal(n))
    spectrum[np.fft.rfftfreq(n, 1 / RATE) < 3000] = 0
    x = np.fft.irfft(spectrum, n)
    x *= 10 ** (db / 20) / np.sqrt(np.mean(x**2))
    return np.round(x * 32767).astype(np.int16)


def frames_of(audio: Audio) -> list[Audio]:
    return [audio[i:i + SPF] for i in range(0, len(audio) - SPF + 1, SPF)]


SILENCE = np.zeros(SPF, dtype=np.int16)


@pytest.fixture(scope="module")
def avatar(tmp_path_factory: pytest.TempPathFactory) -> PreparedAvatar:
    return prepare_avatar(astronaut(), cache_dir=tmp_path_factory.mktemp("lite-cache"),
                          progress=False)


@pytest.fixture
def engine(avatar: PreparedAvatar) -> LiteEngine:
    return LiteEngine(avatar)


def mouth_box(avatar: PreparedAvatar, index: int = 0, pad: int = 8) -> tuple[slice, slice]:
    lips = avatar.landmarks[index, [61, 291, 0, 17]]
    x0, y0 = np.floor(lips.min(axis=0)).astype(int) - pad
    x1, y1 = np.ceil(lips.max(axis=0)).astype(int) + pad
    return slice(int(y0), int(y1)), slice(int(x0), int(x1))


def speak(engine: LiteEngine, audio: Audio, index: int = 0) -> list[Frame]:
    return [engine.render(a, source_index=index, speaking=True) for a in frames_of(audio)]


def dark_area(frame: Frame, box: tuple[slice, slice]) -> int:
    region = frame[box].astype(np.int32)
    return int(np.count_nonzero(region.sum(axis=2) < 200))


# ----------------------------------------------------------------------------- the contract


def test_engine_attributes(avatar: PreparedAvatar, engine: LiteEngine) -> None:
    assert isinstance(engine, LipSyncEngine)
    assert LiteEngine.name == "lite"
    assert LITE_ENGINE_VERSION
    assert (engine.width, engine.height) == (512, 512)
    assert engine.fps == avatar.fps == 25.0
    assert engine.sample_rate == RATE
    assert engine.samples_per_frame == SPF
    assert engine.source_frames == 1
    assert LiteEngine(avatar, fps=30.0).samples_per_frame == 533


def test_silence_returns_the_source_frame(avatar: PreparedAvatar, engine: LiteEngine) -> None:
    source = avatar.frames[0]
    for speaking in (True, False):
        frame = engine.render(SILENCE, source_index=0, speaking=speaking)
        assert frame.dtype == np.uint8 and frame.shape == source.shape
        assert frame.tobytes() == source.tobytes()
        assert frame.flags.writeable and not np.shares_memory(frame, source)
        assert engine.shape == MouthShape()
    # Quiet noise under the gate is silence too.
    noise = np.random.default_rng(0).integers(-40, 41, SPF).astype(np.int16)  # about -62 dBFS
    assert engine.render(noise, source_index=0, speaking=True).tobytes() == source.tobytes()
    assert engine.shape.openness == 0.0


def test_loud_vowel_opens_the_mouth_inside_the_mask_only(
        avatar: PreparedAvatar, engine: LiteEngine) -> None:
    source = avatar.frames[0]
    frames = speak(engine, voiced(AH, seconds=0.3, db=-16))
    openness = [0.0]
    engine.reset()
    for chunk in frames_of(voiced(AH, seconds=0.12, db=-16)):
        engine.render(chunk, source_index=0, speaking=True)
        openness.append(engine.shape.openness)
    assert openness[1] > 0.5 and openness[2] > 0.75   # rises within two frames
    assert openness[2] >= 0.95 * openness[3]

    box = mouth_box(avatar)
    changed = np.abs(frames[-1][box].astype(np.int16) - source[box].astype(np.int16))
    assert changed.mean() > 12.0
    weight = engine.blend_weight(0)
    outside = weight == 0
    assert outside.mean() > 0.9
    for frame in frames:
        assert np.array_equal(frame[outside], source[outside])
    # Above the nose (the mask's feather ends a few pixels above landmark 2) nothing changes.
    nose_row = int(avatar.landmarks[0, 2, 1]) - 8
    assert np.array_equal(frames[-1][:nose_row], source[:nose_row])


def test_louder_opens_wider(avatar: PreparedAvatar, engine: LiteEngine) -> None:
    box = mouth_box(avatar)
    openness, drops, dark = [], [], []
    for db in (-42.0, -34.0, -26.0, -18.0):
        engine.reset()
        frame = speak(engine, voiced(AH, seconds=0.2, db=db))[-1]
        openness.append(engine.shape.openness)
        moved = engine.displaced_landmarks(engine.shape)
        drops.append(float(moved[14, 1] - avatar.landmarks[0, 14, 1]))   # inner lower lip
        dark.append(dark_area(frame, box))
    assert all(a < b for a, b in pairwise(openness)), openness
    assert all(a < b for a, b in pairwise(drops)), drops
    assert all(a < b for a, b in pairwise(dark)), dark
    assert drops[-1] > 5.0


def test_hiss_spreads_and_oo_rounds(avatar: PreparedAvatar) -> None:
    model = MouthModel(RATE, fps=FPS)
    s = model.target(hiss(seconds=0.04, db=-26))
    oo = model.target(voiced(OO, seconds=0.04, db=-18))
    ee = model.target(voiced(EE, seconds=0.04, db=-18))
    ah = model.target(voiced(AH, seconds=0.04, db=-18))
    assert s.width > 0.9 and oo.width < 0.1 and ee.width > 0.9 and ah.width < 0.1
    assert oo.rounding > 0.8 and s.rounding < 0.1 and ee.rounding < 0.1 and ah.rounding < 0.1
    assert s.openness < ah.openness   # sibilants keep the teeth nearly together

    # And the pictures follow: corners further apart for the hiss than for "oo".
    engine = LiteEngine(avatar)

    def mouth_width(shape: MouthShape) -> float:
        moved = engine.displaced_landmarks(shape)
        return float(np.linalg.norm(moved[291] - moved[61]))

    rest = mouth_width(MouthShape())
    wide = mouth_width(MouthShape(openness=0.5, width=s.width, rounding=s.rounding))
    round_ = mouth_width(MouthShape(openness=0.5, width=oo.width, rounding=oo.rounding))
    assert wide > rest + 3.0 and round_ < rest - 2.0
    a = engine.draw(MouthShape(openness=0.5, width=1.0))
    b = engine.draw(MouthShape(openness=0.5, rounding=1.0))
    assert np.abs(a.astype(np.int16) - b.astype(np.int16)).max() > 40


def test_release_closes_fully_and_returns_the_source(
        avatar: PreparedAvatar, engine: LiteEngine) -> None:
    source = avatar.frames[0]
    speak(engine, voiced(AH, seconds=0.2, db=-12))
    assert engine.shape.openness > 0.95
    release = engine.mouth.options.release_s
    allowed = math.ceil(release * FPS) + 1
    history = []
    for _ in range(allowed):
        frame = engine.render(SILENCE, source_index=0, speaking=True)
        history.append(engine.shape.openness)
    assert history[-1] == 0.0 and engine.shape == MouthShape()
    assert all(a >= b for a, b in pairwise(history))
    assert history[0] > 0.0   # it does not snap shut
    assert frame.tobytes() == source.tobytes()


def test_idle_frames_are_closed_and_skip_the_model(
        avatar: PreparedAvatar, engine: LiteEngine) -> None:
    source = avatar.frames[0]
    speak(engine, voiced(AH, seconds=0.2, db=-16))
    before = engine.shape.openness
    loud = voiced(AH, seconds=0.04, db=-6)
    frame = engine.render(loud, source_index=0, speaking=False)
    assert frame.tobytes() == source.tobytes()
    assert engine.shape.openness < before          # released, not driven by the loud audio
    # Not even looked at: audio that render(speaking=True) rejects passes when idle.
    engine.render(np.zeros(3, dtype=np.float64), source_index=0,
                  speaking=False)
    with pytest.raises(MediaFormatError, match="audio"):
        engine.render(np.zeros(3, dtype=np.float64), source_index=0,
                      speaking=True)


def test_reset_returns_to_rest(avatar: PreparedAvatar, engine: LiteEngine) -> None:
    speak(engine, voiced(EE, seconds=0.2, db=-16))
    assert engine.shape.openness > 0.5 and engine.shape.width > 0.5
    engine.reset()
    assert engine.shape == MouthShape() and engine.mouth.shape == MouthShape()
    # The next frame starts from rest: one attack step, not the old opening.
    engine.render(voiced(AH, seconds=0.04, db=-40), source_index=0, speaking=True)
    assert 0.0 < engine.shape.openness < 0.3


def test_render_batch_equals_render_and_is_deterministic(avatar: PreparedAvatar) -> None:
    audio = np.concatenate([voiced(AH, seconds=0.16, db=-18), np.zeros(SPF * 2, np.int16),
                            hiss(seconds=0.08, db=-24), voiced(OO, seconds=0.12, db=-20)])
    chunks = frames_of(audio)
    speaking = [True] * len(chunks)
    speaking[5] = False
    one = LiteEngine(avatar)
    single = [one.render(a, source_index=0, speaking=s) for a, s in zip(chunks, speaking,
                                                                         strict=True)]
    batch = LiteEngine(avatar).render_batch(chunks, source_indices=[0] * len(chunks),
                                            speaking=speaking)
    again = LiteEngine(avatar).render_batch(chunks, source_indices=[0] * len(chunks),
                                            speaking=speaking)
    assert len(batch) == len(single)
    for a, b, c in zip(single, batch, again, strict=True):
        assert a.tobytes() == b.tobytes() == c.tobytes()
    assert len({f.tobytes() for f in single}) > 5


def _video(avatar: PreparedAvatar, count: int = 5) -> PreparedAvatar:
    """The still as a ``count``-frame video: frame i moved by (3i, i) px."""
    offsets = [(3 * i, i) for i in range(count)]
    frames = np.stack([shifted(avatar.frames[0], dx, dy) for dx, dy in offsets])
    shift = np.array(offsets, dtype=np.float32)[:, None, :]
    landmarks = avatar.landmarks[0][None] + shift
    boxes = avatar.boxes[0][None] + np.tile(shift[:, 0], 2)
    crops = avatar.crop_boxes[0][None] + np.tile(np.array(offsets, dtype=np.int32), 2)
    return PreparedAvatar(
        frames=frames, fps=25.0, landmarks=landmarks.astype(np.float32),
        raw_landmarks=landmarks.astype(np.float32), boxes=boxes.astype(np.float32),
        crop_boxes=crops.astype(np.int32), masks=np.repeat(avatar.masks, count, axis=0),
        multiple_faces_frames=(), interpolated_frames=(), clipped_crop_frames=(),
        source="<video>", content_hash="0" * 64, engine_version="1", cache_key="0" * 64,
        from_cache=False)


def test_video_avatar_uses_the_given_source_frame(avatar: PreparedAvatar) -> None:
    video = _video(avatar)
    engine = LiteEngine(video)
    assert engine.source_frames == 5
    loud = voiced(AH, seconds=0.04, db=-14)
    shape = MouthShape(openness=0.8)
    reference = engine.draw(shape, source_index=0)
    centres = []
    for index in range(5):
        idle = engine.render(loud, source_index=index, speaking=False)
        assert idle.tobytes() == video.frames[index].tobytes()
        drawn = engine.draw(shape, source_index=index)
        diff = np.abs(drawn.astype(np.int16) - video.frames[index].astype(np.int16)).sum(axis=2)
        ys, xs = np.nonzero(diff > 30)
        centres.append((xs.mean(), ys.mean()))
        # The same picture as frame 0's, moved with the frame (up to float32 rounding of the
        # moved landmarks).
        dx, dy = 3 * index, index
        here = drawn[120:200, 170 + dx:290].astype(np.int16)
        there = reference[120 - dy:200 - dy, 170:290 - dx].astype(np.int16)
        delta = np.abs(here - there)
        assert np.percentile(delta, 99.9) <= 2 and delta.mean() < 0.02, (index, delta.max())
    moved = np.array(centres) - centres[0]
    assert np.allclose(moved, [(3 * i, i) for i in range(5)], atol=0.25), moved
    with pytest.raises(MediaFormatError, match="source_index"):
        engine.render(loud, source_index=5, speaking=True)


def _closed_mouth(avatar: PreparedAvatar) -> PreparedAvatar:
    """The astronaut with its inner lip landmarks closed (lower inner lip = upper inner lip),
    as mediapipe reports a closed mouth."""
    landmarks = avatar.landmarks.copy()
    landmarks[:, list(LOWER_INNER)] = landmarks[:, list(UPPER_INNER)]
    return dataclasses.replace(avatar, landmarks=landmarks, raw_landmarks=landmarks)


def test_a_closed_source_mouth_gets_a_painted_inside(avatar: PreparedAvatar) -> None:
    closed = _closed_mouth(avatar)
    shape = MouthShape(openness=0.8)
    painted = LiteEngine(closed).draw(shape)
    bare = LiteEngine(closed, options=LiteOptions(teeth=0.0)).draw(shape)
    kept = LiteEngine(avatar).draw(shape)       # open source: its own teeth are kept
    box = mouth_box(avatar)
    moved = LiteEngine(closed).displaced_landmarks(shape)
    top, bottom = moved[13, 1], moved[14, 1]
    x = int(moved[13, 0])
    column = slice(int(top) + 1, int(bottom) - 1), slice(x - 3, x + 4)
    # Without teeth the opened mouth is dark all the way down; with them, the top is bright.
    assert bare[column].max() < 120
    assert painted[column].max() > 170
    assert np.abs(painted[box].astype(np.int16) - bare[box].astype(np.int16)).max() > 100
    # The source's own teeth stay where they were in the open source.
    teeth_row = slice(int(avatar.landmarks[0, 13, 1]) + 1, int(avatar.landmarks[0, 13, 1]) + 3)
    assert np.array_equal(kept[teeth_row, x - 3:x + 4], avatar.frames[0][teeth_row, x - 3:x + 4])


def test_large_avatars_are_downscaled(avatar: PreparedAvatar) -> None:
    engine = LiteEngine(avatar, options=LiteOptions(max_side=256))
    assert (engine.width, engine.height) == (256, 256)
    idle = engine.render(SILENCE, source_index=0, speaking=False)
    assert idle.shape == (256, 256, 3)
    talking = speak(engine, voiced(AH, seconds=0.12, db=-16))[-1]
    assert talking.shape == (256, 256, 3) and not np.array_equal(talking, idle)
    outside = engine.blend_weight(0) == 0
    assert np.array_equal(talking[outside], idle[outside])
    lips = engine.displaced_landmarks(MouthShape())[13]
    assert np.allclose(lips, avatar.landmarks[0, 13] / 2.0, atol=0.01)
    assert (LiteEngine(avatar, options=LiteOptions(max_side=None)).width,
            LiteEngine(avatar, options=LiteOptions(max_side=512)).width) == (512, 512)


def test_triangulation_without_scipy(avatar: PreparedAvatar,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    shape = MouthShape(openness=0.7, width=0.3)
    with_scipy = LiteEngine(avatar).draw(shape)
    monkeypatch.setitem(sys.modules, "scipy.spatial", None)   # import fails: OpenCV's Subdiv2D
    without = LiteEngine(avatar).draw(shape)
    diff = np.abs(with_scipy.astype(np.int16) - without.astype(np.int16))
    assert diff.mean() < 0.05 and np.percentile(diff, 99.9) < 40


def test_mouth_model_smoothing_and_gate() -> None:
    model = MouthModel(RATE, fps=FPS, options=MouthOptions(attack_s=0.025, release_s=0.12))
    tone = voiced(AH, seconds=0.04, db=-14)
    first = model.step(tone)
    assert first.openness == pytest.approx(1.0 - math.exp(-0.04 / 0.025), rel=0.05)
    for _ in range(5):
        model.step(tone)
    assert model.shape.openness > 0.99
    closing = [model.step(SILENCE).openness for _ in range(3)]
    assert closing == pytest.approx([1 - 1 / 3, 1 - 2 / 3, 0.0], abs=0.02)
    assert model.rest() == MouthShape()
    # Level mapping: the gate is closed, full_db fully open, linear in dB between.
    assert model.target(voiced(AH, seconds=0.04, db=-50)).openness == 0.0
    assert model.target(voiced(AH, seconds=0.04, db=-31)).openness == pytest.approx(
        0.5, abs=0.03)
    assert model.target(np.zeros(0, np.int16)) == MouthShape()
    short = model.target(voiced(AH, seconds=0.02, db=-18))   # a short last frame
    assert short.openness > 0.5


def test_invalid_inputs(avatar: PreparedAvatar) -> None:
    with pytest.raises(ValueError, match="openness"):
        MouthShape(openness=1.5)
    with pytest.raises(ValidationError, match="full_db"):
        MouthOptions(gate_db=-20.0, full_db=-30.0)
    with pytest.raises(ValidationError):
        LiteOptions(max_side=10)
    with pytest.raises(MediaFormatError, match="sample_rate"):
        MouthModel(100)
    with pytest.raises(MediaFormatError, match="fps"):
        LiteEngine(avatar, fps=0.0)
    model = MouthModel(RATE)
    with pytest.raises(MediaFormatError, match="audio"):
        model.step(np.zeros((2, SPF), dtype=np.int16))

