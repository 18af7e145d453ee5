"""Audio and video values that cross the SDK boundary, their checks, and resampling.

``AudioChunk`` is int16 PCM (interleaved when multi-channel) with its sample rate and channel
count. It is validated once, when it is made, so the send path can trust it. ``AudioResampler``
converts a stream of chunks between rates with soxr, keeping filter state across chunks (a
chunk-by-chunk one-shot resample clicks at every boundary).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import soxr
from numpy.typing import NDArray

from .errors import MediaFormatError

__all__ = [
    "MAX_CHUNK_SECONDS",
    "SUPPORTED_SAMPLE_RATES",
    "AudioChunk",
    "AudioFormat",
    "AudioResampler",
    "AudioVideoFrame",
    "VideoFrame",
]

#: Sample rates accepted anywhere in the SDK (the common telephony, speech and media rates).
SUPPORTED_SAMPLE_RATES: frozenset[int] = frozenset(
    {8_000, 11_025, 12_000, 16_000, 22_050, 24_000, 32_000, 44_100, 48_000}
)
#: Longest single chunk accepted; send longer audio as a stream of chunks.
MAX_CHUNK_SECONDS = 10.0
_MAX_CHANNELS = 8

_RATES_TEXT = ", ".join(str(r) for r in sorted(SUPPORTED_SAMPLE_RATES))


def _check_rate(sample_rate: object) -> int:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int | np.integer):
        raise MediaFormatError(
            f"got {type(sample_rate).__name__}", field="sample_rate", expected="an int in Hz"
        )
    rate = int(sample_rate)
    if rate <= 0:
        raise MediaFormatError(
            f"got {rate}", field="sample_rate", expected="a positive rate in Hz"
        )
    if rate not in SUPPORTED_SAMPLE_RATES:
        raise MediaFormatError(f"{rate} Hz is not supported", field="sample_rate",
                               expected=f"one of {_RATES_TEXT}")
    return rate


def _check_channels(channels: object) -> int:
    if isinstance(channels, bool) or not isinstance(channels, int | np.integer):
        raise MediaFormatError(
            f"got {type(channels).__name__}", field="channels", expected="an int"
        )
    if not 1 <= int(channels) <= _MAX_CHANNELS:
        raise MediaFormatError(
            f"got {channels}", field="channels", expected=f"1 to {_MAX_CHANNELS}"
        )
    return int(channels)


@dataclass(frozen=True, slots=True)
class AudioFormat:
    """The audio a consumer wants: signed 16-bit little-endian PCM at a rate and channel count."""

    sample_rate: int
    channels: int = 1
    encoding: Literal["pcm16"] = "pcm16"

    def __post_init__(self) -> None:
        _check_rate(self.sample_rate)
        _check_channels(self.channels)

    def bytes_per_second(self) -> int:
        return self.sample_rate * self.channels * 2


class AudioChunk:
    """A piece of int16 PCM audio: samples (interleaved), sample rate, channel count.

    Make one with :meth:`from_pcm16` (bytes) or :meth:`from_float` (floats in [-1, 1]).
    Every constructor validates: a bad chunk raises :class:`~avatarkit.MediaFormatError`
    naming the field and what was expected.
    """

    __slots__ = ("_samples", "channels", "sample_rate")

    def __init__(self, samples: NDArray[np.int16], sample_rate: int, channels: int = 1) -> None:
        self.sample_rate = _check_rate(sample_rate)
        self.channels = _check_channels(channels)
        if not isinstance(samples, np.ndarray):
            raise MediaFormatError(
                f"got {type(samples).__name__}", field="samples", expected="a numpy int16 array"
            )
        if samples.dtype != np.int16:
            raise MediaFormatError(
                f"dtype is {samples.dtype}", field="samples",
                expected="int16 (use AudioChunk.from_float for float audio)",
            )
        if samples.ndim == 2:
            if samples.shape[1] != self.channels:
                raise MediaFormatError(
                    f"shape {samples.shape} has {samples.shape[1]} channels but channels="
                    f"{self.channels}", field="samples", expected="shape (frames, channels)",
                )
            samples = samples.reshape(-1)
        elif samples.ndim != 1:
            raise MediaFormatError(
                f"{samples.ndim}-d array", field="samples",
                expected="1-d interleaved or 2-d (frames, channels)",
            )
        if samples.size % self.channels:
            raise MediaFormatError(
                f"{samples.size} samples do not split into {self.channels} channels",
                field="samples", expected=f"a multiple of {self.channels} samples",
            )
        frames = samples.size // self.channels
        if frames > MAX_CHUNK_SECONDS * self.sample_rate:
            raise MediaFormatError(
                f"chunk lasts {frames / self.sample_rate:.2f} s", field="samples",
                expected=f"at most {MAX_CHUNK_SECONDS:g} s per chunk; send a stream of chunks",
            )
        self._samples = samples

    # -- constructors -------------------------------------------------------------------

    @classmethod
    def from_pcm16(
        cls, data: bytes | bytearray | memoryview, *, sample_rate: int, channels: int = 1
    ) -> AudioChunk:
        """Wrap signed 16-bit little-endian PCM bytes (interleaved if multi-channel)."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise MediaFormatError(
                f"got {type(data).__name__}", field="data", expected="bytes of PCM16 audio"
            )
        nbytes = len(data) if not isinstance(data, memoryview) else data.nbytes
        if nbytes % 2:
            raise MediaFormatError(
                f"{nbytes} bytes is an odd count", field="data",
                expected="an even number of bytes (2 per PCM16 sample)",
            )
        samples = np.frombuffer(data, dtype="<i2")
        if samples.dtype != np.int16:  # big-endian host: make it native
            samples = samples.astype(np.int16)
        return cls(samples, sample_rate, channels)

    @classmethod
    def from_float(
        cls, samples: NDArray[np.floating[Any]], *, sample_rate: int, channels: int = 1
    ) -> AudioChunk:
        """Convert float audio in [-1.0, 1.0] (values beyond are clipped) to PCM16.

        ``samples`` is 1-d (interleaved) or 2-d ``(frames, channels)``.
        """
        if not isinstance(samples, np.ndarray) or not np.issubdtype(samples.dtype, np.floating):
            got = samples.dtype if isinstance(samples, np.ndarray) else type(samples).__name__
            raise MediaFormatError(
                f"got {got}", field="samples", expected="a numpy float array in [-1, 1]"
            )
        if not np.isfinite(samples).all():
            raise MediaFormatError(
                "contains NaN or infinity", field="samples", expected="finite values in [-1, 1]"
            )
        pcm = np.clip(np.rint(samples * 32767.0), -32768, 32767).astype(np.int16)
        return cls(pcm, sample_rate, channels)

    @classmethod
    def silence(cls, seconds: float, *, sample_rate: int, channels: int = 1) -> AudioChunk:
        frames = round(seconds * _check_rate(sample_rate))
        return cls(np.zeros(frames * _check_channels(channels), dtype=np.int16),
                   sample_rate, channels)

    # -- views ----------------------------------------------------------------------------

    @property
    def samples(self) -> NDArray[np.int16]:
        """The interleaved int16 samples (read-only when the chunk wraps bytes)."""
        return self._samples

    @property
    def num_frames(self) -> int:
        return self._samples.size // self.channels

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return self.num_frames / self.sample_rate

    @property
    def format(self) -> AudioFormat:
        return AudioFormat(self.sample_rate, self.channels)

    def to_pcm16(self) -> bytes:
        """Little-endian PCM16 bytes, interleaved."""
        return self._samples.astype("<i2", copy=False).tobytes()

    def to_float(self) -> NDArray[np.float32]:
        """Float32 samples in [-1, 1], shape ``(frames, channels)``."""
        return (self._samples.reshape(-1, self.channels) / np.float32(32768.0)).astype(
            np.float32
        )

    def to_mono(self) -> AudioChunk:
        """Average the channels (returns ``self`` when already mono)."""
        if self.channels == 1:
            return self
        mixed = self._samples.reshape(-1, self.channels).mean(axis=1)
        return AudioChunk(np.rint(mixed).astype(np.int16), self.sample_rate, 1)

    def resample(self, sample_rate: int) -> AudioChunk:
        """One-shot conversion of this chunk alone. For a stream use :class:`AudioResampler`."""
        rate = _check_rate(sample_rate)
        if rate == self.sample_rate:
            return self
        out = soxr.resample(self._samples.reshape(-1, self.channels), self.sample_rate, rate)
        return AudioChunk(np.asarray(out, dtype=np.int16), rate, self.channels)

    def __len__(self) -> int:
        return self.num_frames

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AudioChunk):
            return NotImplemented
        return (
            self.sample_rate == other.sample_rate
            and self.channels == other.channels
            and np.array_equal(self._samples, other._samples)
        )

    __hash__ = None  # type: ignore[assignment]  # mutable payload

    def __repr__(self) -> str:
        return (
            f"AudioChunk({self.duration * 1000:.1f} ms, {self.sample_rate} Hz, "
            f"{self.channels} ch)"
        )


class AudioResampler:
    """Streaming rate and channel conversion for a sequence of chunks.

    Keeps soxr's filter state between chunks, so the output is continuous. Input chunks must
    all have the rate and channel count of the first one. The output is always mono when
    ``channels`` is 1 (multi-channel input is averaged first).
    """

    __slots__ = ("_in_channels", "_in_rate", "_out", "_stream")

    def __init__(self, out: AudioFormat) -> None:
        self._out = out
        self._in_rate: int | None = None
        self._in_channels: int | None = None
        self._stream: Any = None

    @property
    def output_format(self) -> AudioFormat:
        return self._out

    def process(self, chunk: AudioChunk) -> AudioChunk:
        """Convert the next chunk. The first calls may return less audio (filter delay)."""
        if self._in_rate is None:
            self._in_rate, self._in_channels = chunk.sample_rate, chunk.channels
            if chunk.sample_rate != self._out.sample_rate:
                self._stream = soxr.ResampleStream(
                    chunk.sample_rate, self._out.sample_rate, self._out.channels,
                    dtype="int16", quality="HQ",
                )
        elif chunk.sample_rate != self._in_rate or chunk.channels != self._in_channels:
            raise MediaFormatError(
                f"stream changed from {self._in_rate} Hz/{self._in_channels} ch to "
                f"{chunk.sample_rate} Hz/{chunk.channels} ch mid-stream",
                field="sample_rate",
                expected="every chunk of a session in one format (call reset() between streams)",
            )
        if chunk.channels != self._out.channels:
            if self._out.channels != 1:
                raise MediaFormatError(
                    f"cannot map {chunk.channels} channels to {self._out.channels}",
                    field="channels", expected=f"1 or {self._out.channels}",
                )
            chunk = chunk.to_mono()
        if self._stream is None:
            return chunk
        samples = chunk.samples.reshape(-1, self._out.channels) if self._out.channels > 1 \
            else chunk.samples
        out = self._stream.resample_chunk(samples, last=False)
        return AudioChunk(out.reshape(-1), self._out.sample_rate, self._out.channels)

    def flush(self) -> AudioChunk:
        """Drain the filter's tail (call at the end of an utterance) and get ready for more."""
        if self._stream is None:
            return AudioChunk(np.zeros(0, np.int16), self._out.sample_rate, self._out.channels)
        empty = np.zeros((0, self._out.channels) if self._out.channels > 1 else 0, np.int16)
        tail = self._stream.resample_chunk(empty, last=True)
        self._stream.clear()
        return AudioChunk(tail.reshape(-1), self._out.sample_rate, self._out.channels)

    def reset(self) -> None:
        """Drop buffered audio (after an interrupt) and accept a new input format."""
        if self._stream is not None:
            self._stream.clear()
        self._stream = None
        self._in_rate = self._in_channels = None


@dataclass(frozen=True, slots=True, eq=False)
class VideoFrame:
    """One RGB video frame with its presentation time in seconds from the stream start."""

    data: NDArray[np.uint8]
    timestamp: float
    format: Literal["rgb24"] = "rgb24"

    def __post_init__(self) -> None:
        d = self.data
        if not isinstance(d, np.ndarray) or d.dtype != np.uint8:
            got = d.dtype if isinstance(d, np.ndarray) else type(d).__name__
            raise MediaFormatError(f"got {got}", field="data", expected="a uint8 numpy array")
        if d.ndim != 3 or d.shape[2] != 3 or d.shape[0] == 0 or d.shape[1] == 0:
            raise MediaFormatError(
                f"shape {d.shape}", field="data", expected="(height, width, 3) RGB"
            )
        if not np.isfinite(self.timestamp) or self.timestamp < 0:
            raise MediaFormatError(
                f"got {self.timestamp}", field="timestamp", expected="seconds >= 0"
            )

    @property
    def width(self) -> int:
        return int(self.data.shape[1])

    @property
    def height(self) -> int:
        return int(self.data.shape[0])

    def __repr__(self) -> str:
        return f"VideoFrame({self.width}x{self.height} {self.format} @ {self.timestamp:.3f}s)"


class AudioVideoFrame(Protocol):
    """One picture and exactly the audio it plays, under one timestamp: what a lip-sync
    engine's runner yields (:class:`avatarkit.local_engine.runner.RunnerFrame`) and what
    transports (WebRTC tracks, MP4 recorders) consume, so neither side imports the other."""

    @property
    def video(self) -> VideoFrame: ...

    @property
    def audio(self) -> AudioChunk: ...

    @property
    def timestamp(self) -> float: ...
