"""The MuseTalk engine end to end with tiny random networks written in the official layout.

The reference each frame is checked against is computed independently of the engine's code
paths: diffusers' own ``UNet2DConditionModel.forward`` at timestep 0 (not the folded
``UNetAtZero``), ``AutoencoderKL.decode``, and an OpenCV/numpy blend.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from numpy.typing import NDArray

from avatarkit.errors import ConfigError, WeightsError
from avatarkit.local_engine.avatar import PreparedAvatar, prepare_avatar
from avatarkit.local_engine.engines import available_engines, build_engine, choose_engine
from avatarkit.local_engine.musetalk.audio import WhisperFeatures
from avatarkit.local_engine.musetalk.engine import MuseTalkEngine
from avatarkit.local_engine.musetalk.options import MuseTalkOptions
from avatarkit.local_engine.musetalk.weights import MuseTalkNetworks, load_networks
from avatarkit.local_engine.runner import AvatarRunner, RunnerFrame
from avatarkit.media import AudioChunk

from .. import astronaut
from .weights_folder import write_tiny_weights

RATE = 16_000
SPF = 640


def speech(seconds: float, *, seed: int = 0, level: float = 6000.0) -> NDArray[np.int16]:
    """Voiced-sounding audio: a few harmonics under a syllable envelope, plus noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * RATE)) / RATE
    pitch = 140.0 + 20.0 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / RATE
    voiced = sum(np.sin(k * phase) / k for k in range(1, 6))
    envelope = 0.55 + 0.45 * np.sin(2 * np.pi * 4.0 * t)
    wave = level * envelope * voiced + 300.0 * rng.standard_normal(len(t))
    return np.clip(wave, -32768, 32767).astype(np.int16)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("weights")
    write_tiny_weights(root, version="v1.5", seed=3)
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def portrait(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("avatar") / "astronaut.png"
    cv2.imwrite(str(path), cv2.cvtColor(astronaut(), cv2.COLOR_RGB2BGR))
    return path


@pytest.fixture(scope="module")
def avatar(portrait: Path, cache: Path) -> PreparedAvatar:
    return prepare_avatar(portrait, cache_dir=cache, progress=False)


def engine_for(avatar: PreparedAvatar, weights: Path, cache: Path,
               **options: object) -> MuseTalkEngine:
    return MuseTalkEngine(avatar, load_networks(weights),
                          options=MuseTalkOptions.model_validate(options), cache_dir=cache)


@pytest.fixture(scope="module")
def engine(avatar: PreparedAvatar, weights: Path, cache: Path) -> Iterator[MuseTalkEngine]:
    built = engine_for(avatar, weights, cache)
    yield built
    built.close()


def frames_of(audio: NDArray[np.int16]) -> list[NDArray[np.int16]]:
    return [audio[k:k + SPF] for k in range(0, len(audio) - SPF + 1, SPF)]


def reference_frames(networks: MuseTalkNetworks, engine: MuseTalkEngine,
                     audio: NDArray[np.int16]) -> list[NDArray[np.uint8]]:
    """What MuseTalk computes for a clip, frame by frame, with diffusers' own forward passes
    and a numpy blend."""
    tokens = WhisperFeatures(networks.whisper).offline(audio)
    material = engine.material
    latents = torch.from_numpy(np.ascontiguousarray(material.latents[[0] * len(tokens)]))
    with torch.inference_mode():
        predicted = networks.unet(latents, torch.tensor([0]),
                                  encoder_hidden_states=tokens).sample
        decoded = networks.vae.decode(predicted / networks.vae.config["scaling_factor"]).sample
    faces = ((decoded / 2 + 0.5).clamp(0, 1) * 255.0).permute(0, 2, 3, 1).numpy()
    x0, y0, x1, y1 = (int(v) for v in material.roi_boxes[0])
    fx0, fy0, fx1, fy1 = material.face_in_roi(0)
    alpha = material.masks[0].astype(np.float64)[..., None] / 255.0
    out = []
    for face in faces:
        frame = engine.avatar.frames[0].copy()
        roi = frame[y0:y1, x0:x1].astype(np.float64)
        pasted = roi.copy()
        pasted[fy0:fy1, fx0:fx1] = cv2.resize(face.astype(np.float32), (fx1 - fx0, fy1 - fy0),
                                              interpolation=cv2.INTER_LINEAR)
        frame[y0:y1, x0:x1] = np.clip(np.round(roi + (pasted - roi) * alpha), 0, 255)
        out.append(frame)
    return out


def test_musetalk_is_available_and_chosen_when_weights_are_configured(weights: Path) -> None:
    assert "musetalk" in available_engines()
    assert choose_engine("auto", weights=weights).name == "musetalk"
    assert choose_engine("auto").name == "lite"


def test_frames_equal_musetalks_computation_frame_by_frame(
        engine: MuseTalkEngine, weights: Path) -> None:
    audio = speech(0.4, seed=1)  # 10 frames, one utterance drawn in one batch
    pictures = engine.render_batch(frames_of(audio), source_indices=[0] * 10,
                                   speaking=[True] * 10, segment_ids=["a"] * 10)
    expected = reference_frames(load_networks(weights), engine, audio)
    x0, y0, x1, y1 = (int(v) for v in engine.material.roi_boxes[0])
    source = engine.avatar.frames[0]
    for got, want in zip(pictures, expected, strict=True):
        assert got.shape == source.shape and got.dtype == np.uint8
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 2
        outside = np.ones(source.shape[:2], bool)
        outside[y0:y1, x0:x1] = False
        assert np.array_equal(got[outside], source[outside])  # only the ROI is touched
        assert np.abs(got.astype(int) - source.astype(int)).max() > 20  # the mouth moved
    # different audio, different faces
    assert np.abs(pictures[0].astype(int) - pictures[5].astype(int)).sum() > 0


def test_silence_and_idle_frames_are_the_source_frame_without_running_the_networks(
        engine: MuseTalkEngine) -> None:
    before = engine.times.frames
    skipped = engine.times.skipped
    quiet = np.zeros(SPF, np.int16)
    pictures = engine.render_batch([quiet] * 3 + [speech(0.04)], source_indices=[0] * 4,
                                   speaking=[True, True, True, False],
                                   segment_ids=["q", "q", "q", None])
    for picture in pictures:
        assert np.array_equal(picture, engine.avatar.frames[0])
    assert engine.times.frames == before
    assert engine.times.skipped == skipped + 3


def test_a_pause_inside_speech_closes_the_mouth_only_where_the_window_is_silent(
        engine: MuseTalkEngine) -> None:
    audio = np.concatenate([speech(0.2, seed=4), np.zeros(10 * SPF, np.int16),
                            speech(0.2, seed=5)])  # 5 frames, 10 silent, 5 frames
    pictures = engine.render_batch(frames_of(audio), source_indices=[0] * 20,
                                   speaking=[True] * 20, segment_ids=["p"] * 20)
    same = [np.array_equal(p, engine.avatar.frames[0]) for p in pictures]
    # the window reaches 80 ms back and 120 ms ahead: the two frames after speech and the
    # two before it still see some of it
    assert same == [False] * 7 + [True] * 6 + [False] * 7


def test_reset_and_a_new_segment_start_the_audio_context_afresh(
        avatar: PreparedAvatar, weights: Path, cache: Path) -> None:
    first, second = frames_of(speech(0.16, seed=6)), frames_of(speech(0.16, seed=7))
    fresh = engine_for(avatar, weights, cache)
    expected = fresh.render_batch(second, source_indices=[0] * 4, speaking=[True] * 4,
                                  segment_ids=["b"] * 4)
    used = engine_for(avatar, weights, cache)
    used.render_batch(first, source_indices=[0] * 4, speaking=[True] * 4,
                      segment_ids=["a"] * 4)
    continued = used.render_batch(second, source_indices=[0] * 4, speaking=[True] * 4,
                                  segment_ids=["a"] * 4)
    assert any(not np.array_equal(c, e) for c, e in zip(continued, expected, strict=True))
    used.reset()  # what the runner's clear_buffer calls
    after_reset = used.render_batch(second, source_indices=[0] * 4, speaking=[True] * 4,
                                    segment_ids=["a"] * 4)
    new_segment = used.render_batch(second, source_indices=[0] * 4, speaking=[True] * 4,
                                    segment_ids=["c"] * 4)
    for got in (after_reset, new_segment):
        for g, e in zip(got, expected, strict=True):
            assert np.array_equal(g, e)


async def test_the_runner_streams_musetalk_frames_in_batches(engine: MuseTalkEngine) -> None:
    audio = speech(0.6, seed=8)  # 15 frames
    calls_before = engine.features.encoder_calls
    async with AvatarRunner(engine, realtime=False,
                            batch_size=engine.preferred_batch_size) as runner:
        await runner.push_audio(AudioChunk(audio, RATE), segment_id="s")
        runner.finish()
        outputs = [item async for item in runner.frames()]
    frames = [o for o in outputs if isinstance(o, RunnerFrame)]
    assert len(frames) == 15
    # one Whisper pass per batch of 8 (two batches), not one per frame
    assert engine.features.encoder_calls - calls_before == 2
    moved = [not np.array_equal(f.video.data, engine.avatar.frames[0]) for f in frames]
    assert sum(moved) >= 13


def test_lower_rows_decode_keeps_the_upper_face_and_stays_close_below(
        avatar: PreparedAvatar, weights: Path, cache: Path) -> None:
    full = engine_for(avatar, weights, cache)
    lower = engine_for(avatar, weights, cache, decode_rows="lower")
    assert lower.first_row == 96
    audio = frames_of(speech(0.16, seed=9))
    a = full.render_batch(audio, source_indices=[0] * 4, speaking=[True] * 4,
                          segment_ids=["l"] * 4)
    b = lower.render_batch(audio, source_indices=[0] * 4, speaking=[True] * 4,
                           segment_ids=["l"] * 4)
    material = full.material
    x0, y0, x1, y1 = (int(v) for v in material.roi_boxes[0])
    diffs = [np.abs(p.astype(int) - q.astype(int))[y0:y1, x0:x1] for p, q in zip(a, b,
                                                                                   strict=True)]
    mask = material.masks[0] > 0
    mean = float(np.mean([d[mask].mean() for d in diffs]))
    # random weights are the worst case for the per-crop GroupNorm statistics (measured
    # mean 6-8 levels in the blended region); the full decode stays the default
    assert mean < 16.0
    assert any(d.max() > 0 for d in diffs)  # it really decoded differently


def test_configuration_errors_are_typed(avatar: PreparedAvatar, weights: Path,
                                        cache: Path, tmp_path: Path) -> None:
    networks = load_networks(weights)
    for options, field in ((dict(precision="fp16"), "precision"),
                           (dict(device="cuda"), "device"),
                           (dict(backend="onnx", compile=True), "backend"),
                           (dict(backend="onnx", precision="bf16"), "precision"),
                           (dict(cuda_graphs=True), "cuda_graphs")):
        if field in ("device", "cuda_graphs") and torch.cuda.is_available():
            continue
        with pytest.raises(ConfigError) as caught:
            MuseTalkEngine(avatar, networks, options=MuseTalkOptions.model_validate(options),
                           cache_dir=cache)
        assert caught.value.field == field
    with pytest.raises(ConfigError) as caught:
        MuseTalkEngine(avatar, networks, sample_rate=48_000, cache_dir=cache)
    assert caught.value.field == "sample_rate"
    with pytest.raises(ConfigError) as caught:
        build_engine("musetalk", avatar.source, cache_dir=cache)
    assert caught.value.field == "weights"
    with pytest.raises(ConfigError) as caught:
        build_engine("musetalk", avatar.source, cache_dir=cache, weights=weights,
                     musetalk={"batch_size": 0})
    assert caught.value.field == "musetalk.batch_size"
    with pytest.raises(WeightsError):
        build_engine("musetalk", avatar.source, cache_dir=cache, weights=tmp_path)


def test_build_engine_loads_the_official_layout(portrait: Path, weights: Path,
                                                cache: Path) -> None:
    built = build_engine("musetalk", portrait, cache_dir=cache, weights=weights,
                         musetalk={"batch_size": 4})
    assert isinstance(built, MuseTalkEngine)
    assert built.version == "v1.5" and built.preferred_batch_size == 4
    assert built.material.from_cache  # the module's engines prepared it already
    assert (built.width, built.height, built.fps) == (512, 512, 25.0)


def test_the_onnx_backend_draws_the_same_frames(avatar: PreparedAvatar, weights: Path,
                                                cache: Path) -> None:
    audio = frames_of(speech(0.2, seed=10))
    torch_frames = engine_for(avatar, weights, cache).render_batch(
        audio, source_indices=[0] * 5, speaking=[True] * 5, segment_ids=["o"] * 5)
    onnx_engine = engine_for(avatar, weights, cache, backend="onnx", batch_size=4)
    onnx_frames = onnx_engine.render_batch(audio, source_indices=[0] * 5,
                                           speaking=[True] * 5, segment_ids=["o"] * 5)
    onnx_engine.close()
    onnx_engine.close()  # idempotent
    assert len(list((cache / "onnx").glob("*/unet.onnx"))) == 1  # beside the avatars
    for t, o in zip(torch_frames, onnx_frames, strict=True):
        assert np.abs(t.astype(int) - o.astype(int)).max() <= 2


@pytest.mark.skipif(not os.environ.get("AVATARKIT_COMPILE_TESTS"),
                    reason="torch.compile takes minutes on a 2-core CPU; set "
                           "AVATARKIT_COMPILE_TESTS=1 to run it")
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_torch_compile_draws_the_same_frames(avatar: PreparedAvatar, weights: Path,
                                             cache: Path) -> None:
    audio = frames_of(speech(0.12, seed=12))
    eager = engine_for(avatar, weights, cache, batch_size=2).render_batch(
        audio, source_indices=[0] * 3, speaking=[True] * 3, segment_ids=["c"] * 3)
    compiled = engine_for(avatar, weights, cache, batch_size=2, compile=True).render_batch(
        audio, source_indices=[0] * 3, speaking=[True] * 3, segment_ids=["c"] * 3)
    for e, c in zip(eager, compiled, strict=True):
        assert np.abs(e.astype(int) - c.astype(int)).max() <= 2
