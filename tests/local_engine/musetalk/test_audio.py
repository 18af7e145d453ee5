"""MuseTalk audio features: log-mel against transformers' WhisperFeatureExtractor, encoder
states against transformers' WhisperEncoder, window indexing against MuseTalk's padding rule,
and streaming against the offline computation."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from numpy.typing import NDArray
from transformers import WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from avatarkit.errors import ConfigError, MediaFormatError
from avatarkit.local_engine.musetalk.audio import (
    HIDDEN_STATES,
    MEL_FRAMES,
    N_MELS,
    SAMPLE_RATE,
    WINDOW_SAMPLES,
    WhisperFeatures,
    frame_window_starts,
    log_mel,
    mel_filters,
    positional_encoding,
)
from avatarkit.local_engine.musetalk.configs import MuseTalkConfigs
from avatarkit.local_engine.musetalk.networks import build_whisper_encoder

D_MODEL = MuseTalkConfigs.tiny().audio_dim


def speech(seconds: float, *, seed: int = 0, amplitude: float = 0.3) -> NDArray[np.float32]:
    """Speech-like float audio: a few harmonics of a gliding pitch under a syllable-rate
    envelope, plus noise (seeded)."""
    rng = np.random.default_rng(seed)
    t: NDArray[np.float64] = np.arange(round(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    pitch = 120.0 + 30.0 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / SAMPLE_RATE
    voiced = np.zeros_like(t)
    for harmonic in range(1, 8):
        voiced += np.sin(harmonic * phase + rng.uniform(0, 2 * np.pi)) / harmonic
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4.0 * t + rng.uniform(0, 2 * np.pi))
    signal: NDArray[np.float64] = voiced * envelope * 0.3 + 0.05 * rng.standard_normal(t.size)
    signal *= amplitude / np.abs(signal).max()
    return signal.astype(np.float32)


def to_int16(audio: NDArray[np.float32]) -> NDArray[np.int16]:
    return np.round(audio * 32767).astype(np.int16)


@pytest.fixture(scope="module")
def extractor() -> WhisperFeatureExtractor:
    return WhisperFeatureExtractor(  # type: ignore[no-untyped-call]
        feature_size=80, sampling_rate=16000, hop_length=160, chunk_length=30, n_fft=400)


def reference_mel(extractor: WhisperFeatureExtractor, audio: NDArray[np.float32]) -> NDArray[
        np.float32]:
    """The extractor on each 30 s segment, as MuseTalk calls it: ``[W, 80, 3000]``."""
    segments = [audio[i:i + WINDOW_SAMPLES] for i in range(0, audio.size, WINDOW_SAMPLES)]
    features = [extractor(s, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features
                for s in segments]
    return np.concatenate(features).astype(np.float32)


@pytest.fixture(scope="module")
def encoder() -> WhisperEncoder:
    torch.manual_seed(0)
    return build_whisper_encoder(MuseTalkConfigs.tiny().whisper)


@pytest.fixture
def features(encoder: WhisperEncoder) -> WhisperFeatures:
    return WhisperFeatures(encoder, fps=25.0)


# ------------------------------------------------------------------------------ log-mel


def test_mel_filters_equal_the_extractors(extractor: WhisperFeatureExtractor) -> None:
    filters = mel_filters()
    assert filters.shape == (N_MELS, 201)
    assert filters.dtype == np.float32
    assert np.abs(filters - extractor.mel_filters.T).max() < 1e-6
    # slaney normalisation: each triangle has area 1 on the Hz axis (40 Hz bins)
    assert np.allclose(filters.sum(axis=1) * 40.0, 1.0, atol=0.1)


@pytest.mark.parametrize("case", ["speech_1.3s", "exactly_30s", "two_windows_31.5s"])
def test_log_mel_equals_the_extractor(extractor: WhisperFeatureExtractor, case: str) -> None:
    seconds = {"speech_1.3s": 1.3, "exactly_30s": 30.0, "two_windows_31.5s": 31.5}[case]
    audio = speech(seconds, seed=1)
    ours = log_mel(audio)
    reference = reference_mel(extractor, audio)
    assert ours.dtype == torch.float32
    assert ours.shape == (math.ceil(audio.size / WINDOW_SAMPLES), N_MELS, MEL_FRAMES)
    assert reference.shape == tuple(ours.shape)
    assert np.abs(ours.numpy() - reference).max() < 1e-4
    # in a zero-padded window the floor rule decides the padding: it sits at the window's
    # max - 8 (in log10 units; (x + 4) / 4 makes that max - 2)
    for index, window in enumerate(ours.numpy()):
        if (index + 1) * WINDOW_SAMPLES > audio.size:
            assert window.min() == pytest.approx(window.max() - 2.0, abs=1e-6)
        else:
            assert window.min() > window.max() - 2.0


def test_log_mel_int16_and_tensor_input(extractor: WhisperFeatureExtractor) -> None:
    samples = to_int16(speech(1.3, seed=2))
    reference = reference_mel(extractor, samples.astype(np.float32) / 32768.0)
    from_int16 = log_mel(samples)
    assert np.abs(from_int16.numpy() - reference).max() < 1e-4
    # the same samples as an int16 tensor and as float64 numpy give the same features
    assert torch.equal(log_mel(torch.from_numpy(samples)), from_int16)
    as_float64 = samples.astype(np.float64) / 32768.0
    assert torch.equal(log_mel(as_float64), from_int16)  # type: ignore[arg-type]


def test_log_mel_very_quiet_input(extractor: WhisperFeatureExtractor) -> None:
    audio = speech(2.0, seed=3, amplitude=1e-4)
    ours = log_mel(audio).numpy()
    reference = reference_mel(extractor, audio)
    assert np.abs(ours - reference).max() < 1e-4
    # here the window max is below -2, so the 1e-10 clamp (log -10 -> -1.5) decides the
    # padding, not the max - 8 floor
    assert reference.max() < (-2.0 + 4.0) / 4.0
    assert ours.min() == pytest.approx((-10.0 + 4.0) / 4.0, abs=1e-6)


def test_log_mel_rejects_unusable_input() -> None:
    with pytest.raises(MediaFormatError) as empty:
        log_mel(np.zeros(0, np.int16))
    assert empty.value.field == "audio"
    assert empty.value.expected == "at least one sample"
    with pytest.raises(MediaFormatError, match=r"shape \(2, 100\)"):
        log_mel(np.zeros((2, 100), np.float32))
    with pytest.raises(MediaFormatError, match="int32"):
        log_mel(np.zeros(100, np.int32))  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ windows


def test_positional_encoding_values() -> None:
    pe = positional_encoding(50, 384)
    assert pe.shape == (50, 384)
    assert pe.dtype == torch.float32
    assert torch.equal(pe[0, 0::2], torch.zeros(192))
    assert torch.equal(pe[0, 1::2], torch.ones(192))
    by_hand = {
        (1, 0): math.sin(1.0),
        (1, 1): math.cos(1.0),
        (7, 10): math.sin(7 / 10000 ** (10 / 384)),
        (7, 11): math.cos(7 / 10000 ** (10 / 384)),
        (49, 382): math.sin(49 / 10000 ** (382 / 384)),
        (49, 383): math.cos(49 / 10000 ** (382 / 384)),
        (23, 100): math.sin(23 / 10000 ** (100 / 384)),
    }
    for (position, dim), value in by_hand.items():
        assert pe[position, dim].item() == pytest.approx(value, abs=1e-7)
    odd = positional_encoding(3, 5)
    assert odd[2, 4].item() == pytest.approx(math.sin(2 / 10000 ** (4 / 5)), abs=1e-7)
    assert odd[2, 3].item() == pytest.approx(math.cos(2 / 10000 ** (2 / 5)), abs=1e-7)


def test_frame_window_starts_at_25_fps() -> None:
    starts = frame_window_starts(200, 25.0)
    assert starts.dtype == np.int64
    assert np.array_equal(starts, 2 * np.arange(200) - 4)


def musetalk_windows(n_steps: int, n_frames: int, fps: float) -> list[list[int]]:
    """MuseTalk's chunking written out: pad the step sequence (ids, -1 = zero step) with
    2 * ceil(mult) zeros on the left and 6 * ceil(mult) on the right, slice 10 at int(i * mult)."""
    multiplier = 50.0 / fps
    pad = math.ceil(multiplier)
    padded = [-1] * (pad * 2) + list(range(n_steps)) + [-1] * (pad * 3 * 2)
    windows = []
    for i in range(n_frames):
        start = int(i * multiplier)
        window = padded[start:start + 10]
        assert len(window) == 10
        windows.append(window)
    return windows


@pytest.mark.parametrize("fps", [30.0, 20.0, 25.0, 24.0])
def test_frame_window_starts_follow_musetalks_padding(fps: float) -> None:
    seconds = 7.3
    n_steps, n_frames = math.floor(seconds * 50), math.floor(seconds * fps)
    starts = frame_window_starts(n_frames, fps)
    ours = [[s + t if 0 <= s + t < n_steps else -1 for t in range(10)] for s in starts.tolist()]
    assert ours == musetalk_windows(n_steps, n_frames, fps)


def test_frame_window_starts_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="fps"):
        frame_window_starts(3, 0.0)
    with pytest.raises(ValueError, match="n_frames"):
        frame_window_starts(-1, 25.0)


# ------------------------------------------------------------------------------ encoder


def reference_states(encoder: WhisperEncoder, extractor: WhisperFeatureExtractor,
                     audio: NDArray[np.float32]) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers alone: the extractor's features through the encoder, hidden states stacked
    as MuseTalk does; returns ([S, 5, d], last_hidden_state [S, d])."""
    mel = torch.from_numpy(reference_mel(extractor, audio))
    with torch.inference_mode():
        output = encoder(mel, output_hidden_states=True)
    states = torch.stack(output.hidden_states, dim=2).reshape(-1, HIDDEN_STATES, D_MODEL)
    steps = audio.size * 50 // SAMPLE_RATE
    return states[:steps], output.last_hidden_state.reshape(-1, D_MODEL)[:steps]


def test_encode_equals_transformers_on_two_windows(
        encoder: WhisperEncoder, extractor: WhisperFeatureExtractor,
        features: WhisperFeatures) -> None:
    audio = speech(31.5, seed=4)
    steps = features.encode(audio)
    assert features.encoder_calls == 1  # both 30 s windows in one forward
    assert steps.shape == (math.floor(31.5 * 50), HIDDEN_STATES, D_MODEL)
    assert steps.dtype == torch.float32
    states, last = reference_states(encoder, extractor, audio)
    assert (steps - states).abs().max().item() < 1e-5
    assert (steps[:, -1] - last).abs().max().item() < 1e-5
    # the five states are distinct (not one state repeated)
    for layer in range(HIDDEN_STATES - 1):
        assert (steps[:, layer] - steps[:, layer + 1]).abs().max().item() > 1e-2


@pytest.mark.parametrize("samples", [20_001, 20_800, 319, 320])
def test_encode_trims_to_floor_duration_times_50(features: WhisperFeatures, samples: int) -> None:
    audio = speech(samples / SAMPLE_RATE, seed=5)
    assert audio.size == samples
    assert features.encode(audio).shape[0] == samples * 50 // SAMPLE_RATE


def test_encode_in_bfloat16_follows_the_encoder() -> None:
    torch.manual_seed(0)
    encoder = build_whisper_encoder(MuseTalkConfigs.tiny().whisper)
    audio = speech(1.3, seed=6)
    reference = WhisperFeatures(encoder).offline(audio)
    torch.manual_seed(0)  # the same weights, cast to bfloat16
    half = WhisperFeatures(build_whisper_encoder(MuseTalkConfigs.tiny().whisper,
                                                 dtype=torch.bfloat16))
    tokens = half.offline(audio)
    assert tokens.dtype == torch.bfloat16
    assert tokens.shape == reference.shape
    assert (tokens.float() - reference).abs().max().item() < 0.15


def test_features_reject_an_unusable_encoder() -> None:
    config = MuseTalkConfigs.tiny().whisper
    config["encoder_layers"] = 2
    with pytest.raises(ConfigError) as wrong:
        WhisperFeatures(build_whisper_encoder(config))
    assert wrong.value.field == "whisper.encoder_layers"
    on_meta = build_whisper_encoder(MuseTalkConfigs.official().whisper, device="meta")
    with pytest.raises(ValueError, match="meta"):
        WhisperFeatures(on_meta)
    with pytest.raises(ValueError, match="fps"):
        WhisperFeatures(build_whisper_encoder(MuseTalkConfigs.tiny().whisper), fps=-1.0)


def test_frame_tokens_layout(features: WhisperFeatures) -> None:
    n_steps = 12
    index = torch.arange(n_steps)[:, None, None] * 1000.0
    layer = torch.arange(HIDDEN_STATES)[None, :, None] * 100.0
    channel = torch.arange(D_MODEL)[None, None, :] * 1.0
    steps = index + layer + channel + 1.0  # distinct and never 0
    pe = positional_encoding(50, D_MODEL)
    for first_frame, n_frames in [(0, 9), (3, 4)]:
        tokens = features.frame_tokens(steps, n_frames, first_frame=first_frame)
        assert tokens.shape == (n_frames, 50, D_MODEL)
        for row in range(n_frames):
            start = 2 * (first_frame + row) - 4
            for t in range(10):
                for lay in range(HIDDEN_STATES):
                    source = start + t
                    value = steps[source, lay] if 0 <= source < n_steps else torch.zeros(D_MODEL)
                    assert torch.equal(tokens[row, 5 * t + lay], value + pe[5 * t + lay])
    tokens = features.frame_tokens(steps, 9)
    assert torch.equal(tokens[0, :20], pe[:20])  # steps -4..-1: zeros + PE
    assert torch.equal(tokens[8, 10:], pe[10:].expand(1, -1, -1)[0])  # steps 14..19: beyond S
    assert features.frame_tokens(steps[:0], 2).shape == (2, 50, D_MODEL)
    with pytest.raises(ValueError, match="steps"):
        features.frame_tokens(steps[:, :4], 2)


def test_offline_is_frame_tokens_of_encode(features: WhisperFeatures) -> None:
    audio = speech(1.3, seed=7)
    tokens = features.offline(audio)
    assert tokens.shape == (math.floor(1.3 * 25), 50, D_MODEL)
    assert torch.equal(tokens, features.frame_tokens(features.encode(audio), 32))
    assert bool(torch.isfinite(tokens).all())


# ------------------------------------------------------------------------------ streaming


def pushes(n_frames: int, per_push: int) -> Iterator[tuple[int, int]]:
    for first in range(0, n_frames, per_push):
        yield first, min(per_push, n_frames - first)


def test_streaming_with_lookahead_equals_offline_of_known_audio(
        features: WhisperFeatures) -> None:
    audio = to_int16(speech(3.0, seed=8))
    stream = features.stream()
    spf = stream.samples_per_frame
    assert spf == 640
    assert stream.lookahead_samples == 1280
    n_frames = audio.size // spf
    outputs = []
    calls_before = features.encoder_calls
    for count, (first, k) in enumerate(pushes(n_frames, 4), start=1):
        end = (first + k) * spf
        ahead = audio[end:end + stream.lookahead_samples]
        tokens = stream.push(audio[first * spf:end], lookahead=ahead if ahead.size else None)
        assert tokens.shape == (k, 50, D_MODEL)
        known = audio[:end + ahead.size]
        reference = features.offline(known)[first:first + k]
        assert (tokens - reference).abs().max().item() <= 1e-5
        assert stream.encoder_calls == count
        outputs.append(tokens)
    assert stream.encoder_calls == len(outputs) == math.ceil(75 / 4)
    assert stream.frames == n_frames
    assert features.encoder_calls - calls_before == 2 * len(outputs)  # pushes + references
    whole = features.offline(audio)
    streamed = torch.cat(outputs)
    # once the lookahead reaches the clip's end (the last push), streaming is offline(clip)
    assert (outputs[-1] - whole[-3:]).abs().max().item() <= 1e-5
    print(f"\nstreaming with 80 ms lookahead vs offline(whole 3 s clip): max abs diff "
          f"{(streamed - whole).abs().max().item():.3e}, mean "
          f"{(streamed - whole).abs().mean().item():.3e}, token scale "
          f"{whole.abs().mean().item():.3e}")

    stream.reset()
    assert stream.frames == 0
    again = stream.push(audio[:4 * spf], lookahead=audio[4 * spf:4 * spf + 1280])
    assert torch.equal(again, outputs[0])


def test_streaming_without_lookahead(features: WhisperFeatures) -> None:
    audio = to_int16(speech(3.0, seed=8))
    stream = features.stream()
    spf = stream.samples_per_frame
    outputs = []
    for index, (first, k) in enumerate(pushes(audio.size // spf, 4)):
        end = (first + k) * spf
        tokens = stream.push(audio[first * spf:end])
        if index % 4 == 0:  # still offline(known audio), spot-checked
            reference = features.offline(audio[:end])[first:first + k]
            assert (tokens - reference).abs().max().item() <= 1e-5
        outputs.append(tokens)
    streamed = torch.cat(outputs)
    whole = features.offline(audio)
    difference = (streamed - whole).abs()
    assert difference.shape == whole.shape
    # the last push knows the whole clip, so its frames are offline's
    assert difference[-3:].max().item() <= 1e-5
    assert difference.max().item() > 1e-3  # the missing 80 ms does change the tokens
    per_frame = difference.amax(dim=(1, 2))
    last_in_push = per_frame[3:-3:4]  # frames whose window runs 80 ms past the known audio
    first_in_push = per_frame[0:-3:4]
    print(f"\nstreaming without lookahead vs offline(whole 3 s clip): max abs diff "
          f"{difference.max().item():.3e}, mean {difference.mean().item():.3e}; per push, "
          f"first frame max {first_in_push.max().item():.3e}, last frame max "
          f"{last_in_push.max().item():.3e}; token scale {whole.abs().mean().item():.3e}")


def test_streaming_at_30_fps_follows_the_frame_boundaries(encoder: WhisperEncoder) -> None:
    features = WhisperFeatures(encoder, fps=30.0)
    stream = features.stream()
    assert stream.samples_per_frame == 533
    assert stream.lookahead_samples == 1386  # frame 0: window ends at 1920, frame at 534
    audio = to_int16(speech(1.0, seed=9))
    boundaries = [math.ceil(i * 16000 / 30) for i in range(31)]
    for first, k in pushes(30, 4):
        begin, end = boundaries[first], boundaries[first + k]
        tokens = stream.push(audio[begin:end], lookahead=audio[end:end + 1386])
        known = audio[:min(end + 1386, audio.size)]
        reference = features.offline(known)[first:first + k]
        assert (tokens - reference).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="533"):
        stream.push(audio[:533])  # frame 30 starts at 16000, frame 31 at 16534: 534 samples


def test_long_stream_keeps_bounded_history(features: WhisperFeatures) -> None:
    audio = to_int16(speech(4.8, seed=10))
    stream = features.stream(max_context_s=2.0)
    spf, per_push = stream.samples_per_frame, 10
    look = stream.lookahead_samples
    moved = 0
    for first, k in pushes(audio.size // spf, per_push):
        end = (first + k) * spf
        ahead = audio[end:end + look]
        tokens = stream.push(audio[first * spf:end], lookahead=ahead if ahead.size else None)
        assert bool(torch.isfinite(tokens).all())
        history = stream._history.numel()
        assert history <= 2 * SAMPLE_RATE + per_push * spf
        anchor = stream._anchor_step * 320
        assert anchor + history == end  # the history is exactly the audio since the anchor
        if anchor:
            moved += 1
            # the window starts at the anchor: encoding audio[anchor:known] and placing it at
            # its original step index gives the same frames (nothing before the anchor is read)
            encoded = features.encode(audio[anchor:end + ahead.size])
            padded = torch.cat([encoded.new_zeros(stream._anchor_step, HIDDEN_STATES, D_MODEL),
                                encoded])
            reference = features.frame_tokens(padded, k, first_frame=first)
            assert (tokens - reference).abs().max().item() <= 1e-5
    assert moved >= 5
    with pytest.raises(ValueError, match="641 samples"):
        stream.push(audio[:641])
    with pytest.raises(ValueError, match="multiple of 640"):
        stream.push(audio[:0])
    with pytest.raises(ValueError, match="max_context_s"):
        features.stream(max_context_s=30.0)
