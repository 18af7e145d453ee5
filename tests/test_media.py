"""AudioChunk / AudioResampler / VideoFrame: validation, conversions, streaming resampling."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from avatarkit import AudioChunk, AudioFormat, AudioResampler, MediaFormatError, VideoFrame


def tone(seconds: float, rate: int, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


# -- validation ----------------------------------------------------------------------------


def test_odd_byte_count_names_the_field() -> None:
    with pytest.raises(MediaFormatError) as info:
        AudioChunk.from_pcm16(b"\x00\x01\x02", sample_rate=16_000)
    assert info.value.field == "data"
    assert "even number of bytes" in info.value.expected


@pytest.mark.parametrize("rate", [0, -16_000])
def test_non_positive_rate(rate: int) -> None:
    with pytest.raises(MediaFormatError) as info:
        AudioChunk.from_pcm16(b"\x00\x00", sample_rate=rate)
    assert info.value.field == "sample_rate"
    assert "positive" in info.value.expected


@pytest.mark.parametrize("rate", [12_345, 96_000, 4_000])
def test_unsupported_rate_lists_the_supported_ones(rate: int) -> None:
    with pytest.raises(MediaFormatError) as info:
        AudioChunk.from_pcm16(b"\x00\x00", sample_rate=rate)
    assert info.value.field == "sample_rate"
    assert "24000" in info.value.expected and "48000" in info.value.expected


def test_rate_of_wrong_type() -> None:
    with pytest.raises(MediaFormatError, match="sample_rate"):
        AudioChunk.from_pcm16(b"\x00\x00", sample_rate=16_000.0)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_rejected(bad: float) -> None:
    samples = np.zeros(100, dtype=np.float32)
    samples[37] = bad
    with pytest.raises(MediaFormatError) as info:
        AudioChunk.from_float(samples, sample_rate=16_000)
    assert info.value.field == "samples"
    assert "finite" in info.value.expected


def test_chunk_over_ten_seconds_rejected_and_exactly_ten_accepted() -> None:
    assert AudioChunk.silence(10.0, sample_rate=8_000).duration == pytest.approx(10.0)
    with pytest.raises(MediaFormatError, match="at most 10 s"):
        AudioChunk(np.zeros(8_000 * 10 + 1, dtype=np.int16), 8_000)


@pytest.mark.parametrize("dtype", [np.float32, np.int32, np.uint8, np.int64])
def test_wrong_dtype_for_pcm_constructor(dtype: type) -> None:
    with pytest.raises(MediaFormatError) as info:
        AudioChunk(np.zeros(10, dtype=dtype), 16_000)
    assert info.value.field == "samples"
    assert "int16" in info.value.expected


def test_from_float_rejects_int_arrays_and_lists() -> None:
    with pytest.raises(MediaFormatError, match="float"):
        AudioChunk.from_float(np.zeros(10, dtype=np.int16), sample_rate=16_000)
    with pytest.raises(MediaFormatError, match="float"):
        AudioChunk.from_float([0.0, 0.1], sample_rate=16_000)  # type: ignore[arg-type]


def test_from_pcm16_rejects_non_bytes() -> None:
    with pytest.raises(MediaFormatError) as info:
        AudioChunk.from_pcm16("abcd", sample_rate=16_000)  # type: ignore[arg-type]
    assert info.value.field == "data"


def test_channel_validation() -> None:
    with pytest.raises(MediaFormatError, match="channels"):
        AudioChunk.from_pcm16(b"\x00\x00" * 3, sample_rate=16_000, channels=2)
    with pytest.raises(MediaFormatError, match="channels"):
        AudioChunk.from_pcm16(b"", sample_rate=16_000, channels=0)
    with pytest.raises(MediaFormatError, match="channels"):
        AudioChunk(np.zeros((10, 3), dtype=np.int16), 16_000, channels=2)


def test_media_errors_are_value_errors_and_avatarkit_errors() -> None:
    import avatarkit

    with pytest.raises(avatarkit.AvatarKitError):
        AudioChunk.from_pcm16(b"\x00", sample_rate=16_000)
    with pytest.raises(ValueError):
        AudioChunk.from_pcm16(b"\x00", sample_rate=16_000)


# -- conversions ----------------------------------------------------------------------------


@given(st.binary(max_size=4000).filter(lambda b: len(b) % 4 == 0),
       st.sampled_from([8_000, 16_000, 24_000, 48_000]), st.sampled_from([1, 2]))
def test_pcm16_roundtrip(data: bytes, rate: int, channels: int) -> None:
    chunk = AudioChunk.from_pcm16(data, sample_rate=rate, channels=channels)
    assert chunk.to_pcm16() == data
    assert chunk.num_frames == len(data) // (2 * channels)
    assert chunk.duration == pytest.approx(chunk.num_frames / rate)


def test_from_float_scales_rounds_and_clips() -> None:
    chunk = AudioChunk.from_float(np.array([0.0, 0.5, -0.5, 1.0, -1.0, 3.0, -3.0]),
                                  sample_rate=16_000)
    assert chunk.samples.tolist() == [0, 16384, -16384, 32767, -32767, 32767, -32768]


def test_from_float_two_dimensional_is_interleaved() -> None:
    stereo = np.array([[0.5, -0.5], [0.25, -0.25]], dtype=np.float32)
    chunk = AudioChunk.from_float(stereo, sample_rate=48_000, channels=2)
    assert chunk.channels == 2 and chunk.num_frames == 2
    assert chunk.samples.tolist() == [16384, -16384, 8192, -8192]
    assert chunk.to_mono().samples.tolist() == [0, 0]


def test_to_float_inverts_from_float() -> None:
    audio = tone(0.05, 16_000)
    back = AudioChunk.from_float(audio, sample_rate=16_000).to_float()[:, 0]
    assert np.max(np.abs(back - audio)) < 1e-4


def test_one_shot_resample_keeps_duration_and_frequency() -> None:
    chunk = AudioChunk.from_float(tone(0.5, 48_000, 1000.0), sample_rate=48_000)
    out = chunk.resample(16_000)
    assert out.sample_rate == 16_000
    assert out.num_frames == 8_000
    spectrum = np.abs(np.fft.rfft(out.to_float()[:, 0]))
    peak_hz = np.argmax(spectrum) * 16_000 / out.num_frames
    assert peak_hz == pytest.approx(1000.0, abs=4)
    assert chunk.resample(48_000) is chunk


# -- streaming resampler ------------------------------------------------------------------------


def test_streaming_resampler_is_continuous_and_keeps_length() -> None:
    audio = tone(1.0, 48_000, 440.0)
    resampler = AudioResampler(AudioFormat(24_000))
    pieces = []
    for offset in range(0, audio.size, 960):  # 20 ms chunks
        chunk = AudioChunk.from_float(audio[offset:offset + 960], sample_rate=48_000)
        pieces.append(resampler.process(chunk).samples)
    pieces.append(resampler.flush().samples)
    streamed = np.concatenate(pieces).astype(np.float32) / 32768
    assert streamed.size == 24_000
    reference = AudioChunk.from_float(audio, sample_rate=48_000).resample(24_000)
    ref = reference.samples.astype(np.float32) / 32768
    # Same signal as a one-shot resample of the whole (no clicks at chunk boundaries).
    assert np.max(np.abs(streamed[100:-100] - ref[100:-100])) < 2e-3


def test_streaming_resampler_downmixes_stereo() -> None:
    left = tone(0.1, 48_000)
    stereo = np.stack([left, left], axis=1)
    resampler = AudioResampler(AudioFormat(24_000, 1))
    out = resampler.process(AudioChunk.from_float(stereo, sample_rate=48_000, channels=2))
    tail = resampler.flush()
    assert out.channels == 1 and tail.channels == 1
    assert out.num_frames + tail.num_frames == 2_400


def test_streaming_resampler_passthrough_when_rates_match() -> None:
    resampler = AudioResampler(AudioFormat(24_000))
    chunk = AudioChunk.from_float(tone(0.02, 24_000), sample_rate=24_000)
    assert resampler.process(chunk) is chunk
    assert resampler.flush().num_frames == 0


def test_streaming_resampler_rejects_format_change_until_reset() -> None:
    resampler = AudioResampler(AudioFormat(24_000))
    resampler.process(AudioChunk.silence(0.02, sample_rate=48_000))
    with pytest.raises(MediaFormatError, match="mid-stream"):
        resampler.process(AudioChunk.silence(0.02, sample_rate=16_000))
    resampler.reset()
    out = resampler.process(AudioChunk.silence(0.2, sample_rate=16_000))
    assert out.sample_rate == 24_000


def test_audio_format_validates() -> None:
    with pytest.raises(MediaFormatError):
        AudioFormat(44_000)
    assert AudioFormat(24_000).bytes_per_second() == 48_000


# -- video ----------------------------------------------------------------------------------------


def test_video_frame_validation() -> None:
    frame = VideoFrame(np.zeros((4, 6, 3), dtype=np.uint8), timestamp=0.04)
    assert (frame.width, frame.height) == (6, 4)
    with pytest.raises(MediaFormatError, match="uint8"):
        VideoFrame(np.zeros((4, 6, 3), dtype=np.float32), timestamp=0.0)
    with pytest.raises(MediaFormatError, match="RGB"):
        VideoFrame(np.zeros((4, 6, 4), dtype=np.uint8), timestamp=0.0)
    with pytest.raises(MediaFormatError, match="timestamp"):
        VideoFrame(np.zeros((4, 6, 3), dtype=np.uint8), timestamp=-1.0)
