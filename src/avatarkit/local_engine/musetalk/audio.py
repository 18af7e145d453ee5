"""MuseTalk's audio conditioning: 16 kHz speech -> per-video-frame audio tokens ``[50, d]``.

The chain, as MuseTalk runs it (``shared/research/musetalk-internals.md`` §1.5, §1.6):

1. :func:`log_mel`: the audio is cut into 30 s windows (the last one zero padded) and each
   window becomes Whisper's log-mel spectrogram ``[80, 3000]``, computed exactly as
   transformers' ``WhisperFeatureExtractor`` does for that window (own code; transformers is
   not imported here). :func:`mel_filters` is the slaney mel filterbank it uses.
2. :class:`WhisperFeatures.encode`: a Whisper encoder turns each window into 1500 steps of
   20 ms; the five hidden states of every step (the embeddings, the outputs of layers 1-3 and
   the final post-LayerNorm output) are stacked, the windows concatenated and the sequence
   trimmed to the audio's length: ``[S, 5, d]``, ``S = floor(samples * 50 / 16000)``.
3. :class:`WhisperFeatures.frame_tokens`: video frame ``i`` takes 10 consecutive steps
   (:func:`frame_window_starts`; at 25 fps steps ``[2i - 4, 2i + 6)``, zeros outside the
   audio), flattened time-major / layer-minor to ``[50, d]``, plus the fixed sinusoidal
   :func:`positional_encoding`. These are the UNet's ``encoder_hidden_states``.

:class:`StreamingFeatures` computes the same tokens for audio that arrives in pieces, with
one encoder forward per piece; its docstring says when the result equals the offline one.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from numpy.typing import NDArray
from torch.nn import functional

from ...errors import ConfigError, MediaFormatError

if TYPE_CHECKING:
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

__all__ = [
    "HIDDEN_STATES",
    "HOP_LENGTH",
    "MEL_FRAMES",
    "N_FFT",
    "N_MELS",
    "SAMPLES_PER_STEP",
    "SAMPLE_RATE",
    "STEPS_PER_SECOND",
    "WINDOW_SAMPLES",
    "WINDOW_STEPS",
    "StreamingFeatures",
    "WhisperFeatures",
    "frame_window_starts",
    "log_mel",
    "mel_filters",
    "positional_encoding",
]

#: the audio rate Whisper works at (Hz)
SAMPLE_RATE = 16_000
#: STFT size and hop (samples): 25 ms windows every 10 ms
N_FFT = 400
HOP_LENGTH = 160
#: mel bins of Whisper-tiny
N_MELS = 80
#: one encoder window: 30 s of audio, 3000 mel frames, 1500 encoder steps
WINDOW_SAMPLES = 480_000
MEL_FRAMES = 3000
#: encoder steps per second (one step = 20 ms = 320 samples)
STEPS_PER_SECOND = 50
SAMPLES_PER_STEP = 320
#: encoder steps in one video frame's window
WINDOW_STEPS = 10
#: hidden states stacked per step (embeddings + 4 layers, the last one post-LayerNorm)
HIDDEN_STATES = 5

#: audio tokens per video frame (WINDOW_STEPS x HIDDEN_STATES)
_TOKENS = WINDOW_STEPS * HIDDEN_STATES
_ENCODER_STEPS = WINDOW_SAMPLES // SAMPLES_PER_STEP  # 1500
_INT16_SCALE = 1.0 / 32768.0

_Audio = NDArray[np.int16] | NDArray[np.float32] | torch.Tensor
_Device = torch.device | str


# --------------------------------------------------------------------------- log-mel


def _hz_to_mel(hz: NDArray[np.float64]) -> NDArray[np.float64]:
    """Slaney's mel scale: linear (3 mels per 200 Hz) below 1 kHz, logarithmic above."""
    linear = hz * (3.0 / 200.0)
    log_part = 15.0 + np.log(np.maximum(hz, 1e-300) / 1000.0) * (27.0 / np.log(6.4))
    return np.where(hz >= 1000.0, log_part, linear)


def _mel_to_hz(mel: NDArray[np.float64]) -> NDArray[np.float64]:
    """Inverse of :func:`_hz_to_mel`."""
    linear = mel * (200.0 / 3.0)
    log_part = 1000.0 * np.exp((mel - 15.0) * (np.log(6.4) / 27.0))
    return np.where(mel >= 15.0, log_part, linear)


@functools.lru_cache(maxsize=8)
def _mel_filters64(n_mels: int) -> NDArray[np.float64]:
    n_freqs = N_FFT // 2 + 1
    fft_hz = np.linspace(0.0, SAMPLE_RATE / 2, n_freqs)
    edges_mel = np.linspace(_hz_to_mel(np.array(0.0)), _hz_to_mel(np.array(SAMPLE_RATE / 2)),
                            n_mels + 2)
    edges_hz = _mel_to_hz(edges_mel)
    lower, centre, upper = edges_hz[:-2, None], edges_hz[1:-1, None], edges_hz[2:, None]
    rising = (fft_hz[None, :] - lower) / (centre - lower)
    falling = (upper - fft_hz[None, :]) / (upper - centre)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    # slaney normalisation: every triangle has unit area on the Hz axis
    weights *= 2.0 / (upper - lower)
    weights.flags.writeable = False
    return weights


def mel_filters(n_mels: int = N_MELS) -> NDArray[np.float32]:
    """Whisper's mel filterbank ``[n_mels, N_FFT // 2 + 1]``: ``n_mels`` triangles evenly
    spaced on slaney's mel scale over 0-8000 Hz, each normalised to unit area (slaney
    normalisation). Computed in float64, returned as float32 (a new array each call)."""
    if n_mels < 1:
        raise ValueError(f"n_mels: expected a positive number of mel bins, got {n_mels}")
    return _mel_filters64(int(n_mels)).astype(np.float32)


def _waveform(audio: _Audio, device: _Device | None, *, field: str = "audio",
              allow_empty: bool = False) -> torch.Tensor:
    """``audio`` as a 1-D float32 tensor in ``[-1, 1]`` on ``device`` (int16 is scaled by
    1/32768 after the transfer, so only 2 bytes per sample cross to the device)."""
    expected_kind = "1-D mono samples, int16 or float in [-1, 1]"
    if isinstance(audio, np.ndarray):
        if audio.dtype.kind == "i" and audio.dtype.itemsize == 2:
            tensor = torch.from_numpy(np.require(audio, np.int16, ("C", "A", "W")))
        elif audio.dtype.kind == "f":
            tensor = torch.from_numpy(np.require(audio, np.float32, ("C", "A", "W")))
        else:
            raise MediaFormatError(f"unsupported sample type {audio.dtype}", field=field,
                                   expected=expected_kind)
    elif isinstance(audio, torch.Tensor):
        tensor = audio
        if tensor.dtype != torch.int16 and not tensor.is_floating_point():
            raise MediaFormatError(f"unsupported sample type {tensor.dtype}", field=field,
                                   expected=expected_kind)
    else:
        raise MediaFormatError(f"unsupported audio object {type(audio).__name__}", field=field,
                               expected=expected_kind)
    if tensor.dim() != 1:
        raise MediaFormatError(f"got an array of shape {tuple(tensor.shape)}", field=field,
                               expected=expected_kind)
    if tensor.numel() == 0 and not allow_empty:
        raise MediaFormatError("no samples", field=field, expected="at least one sample")
    target = tensor.device if device is None else torch.device(device)
    if tensor.dtype == torch.int16:
        return tensor.to(target).to(torch.float32) * _INT16_SCALE
    return tensor.to(target, torch.float32)


def _log_mel_windows(waveform: torch.Tensor) -> torch.Tensor:
    """1-D float32 samples -> ``[W, 80, 3000]`` (see :func:`log_mel`)."""
    n = waveform.numel()
    windows = -(-n // WINDOW_SAMPLES)
    padded = functional.pad(waveform, (0, windows * WINDOW_SAMPLES - n))
    padded = padded.reshape(windows, WINDOW_SAMPLES)
    device = waveform.device
    hann = torch.hann_window(N_FFT, periodic=True, device=device, dtype=torch.float32)
    spectrum = torch.stft(padded, N_FFT, HOP_LENGTH, window=hann, center=True,
                          pad_mode="reflect", return_complex=True)
    # 3001 frames per window: Whisper drops the last one
    power = spectrum[..., :-1].abs() ** 2
    filters = torch.from_numpy(mel_filters()).to(device)
    mel = torch.matmul(filters, power)
    log_spec = torch.clamp(mel, min=1e-10).log10()
    floor = log_spec.amax(dim=(1, 2), keepdim=True) - 8.0
    return (torch.maximum(log_spec, floor) + 4.0) / 4.0


def log_mel(audio: _Audio, *, device: _Device | None = None) -> torch.Tensor:
    """Whisper's log-mel spectrogram of ``audio``: float32 ``[W, 80, 3000]``.

    ``audio`` is 16 kHz mono: int16 (scaled by 1/32768) or float samples in ``[-1, 1]``, a
    numpy array or a tensor. It is split into ``W = ceil(samples / 480000)`` windows of 30 s,
    the last one zero padded to 30 s, and every window gets what transformers'
    ``WhisperFeatureExtractor`` computes for it alone: a periodic Hann window of 400 samples,
    ``torch.stft`` every 160 samples with ``center=True`` (reflect padding), the power
    spectrum, the slaney mel filterbank, ``log10(max(x, 1e-10))``, values below the window's
    maximum minus 8 raised to it, ``(x + 4) / 4``, and the last of the 3001 frames dropped. All
    windows go through one batched STFT on ``device`` (default: the tensor's own device, or
    the CPU for numpy input).

    Raises :class:`~avatarkit.errors.MediaFormatError` (``field="audio"``) for empty,
    multi-channel or non-numeric input.
    """
    return _log_mel_windows(_waveform(audio, device))


# --------------------------------------------------------------------------- windows


def positional_encoding(length: int, d_model: int) -> torch.Tensor:
    """The fixed sinusoidal table MuseTalk adds to the audio tokens: float32
    ``[length, d_model]`` with ``pe[p, 2i] = sin(p * 10000^(-2i/d))`` and
    ``pe[p, 2i + 1] = cos(p * 10000^(-2i/d))`` (computed in float64)."""
    if length < 0:
        raise ValueError(f"length: expected a number of positions >= 0, got {length}")
    if d_model < 1:
        raise ValueError(f"d_model: expected a positive width, got {d_model}")
    position = torch.arange(length, dtype=torch.float64)[:, None]
    even = torch.arange(0, d_model, 2, dtype=torch.float64)
    angle = position * torch.pow(10000.0, -even / d_model)
    table = torch.zeros(length, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angle)
    table[:, 1::2] = torch.cos(angle[:, : d_model // 2])
    return table.to(torch.float32)


def _check_fps(fps: float) -> float:
    value = float(fps)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"fps: expected a positive frame rate, got {fps}")
    return value


def _window_starts(first: int, count: int, fps: float) -> NDArray[np.int64]:
    """Original step index of the first step of frames ``first .. first + count - 1``."""
    multiplier = STEPS_PER_SECOND / fps
    left_pad = math.ceil(multiplier) * 2
    frames = np.arange(first, first + count, dtype=np.float64)
    # float64 multiply then floor: bit-for-bit MuseTalk's int(frame_index * multiplier)
    return np.floor(frames * multiplier).astype(np.int64) - left_pad


def frame_window_starts(n_frames: int, fps: float) -> NDArray[np.int64]:
    """The first encoder step of each video frame's 10-step window (MuseTalk's rule).

    With ``mult = 50 / fps`` and ``left_pad = 2 * ceil(mult)``, frame ``i`` takes the
    original encoder steps ``[floor(i * mult) - left_pad, floor(i * mult) - left_pad + 10)``;
    steps outside the audio are zeros. At 25 fps that is ``[2i - 4, 2i + 6)``: the frame's
    own two 20 ms steps, 80 ms before and 120 ms after. Returns ``int64 [n_frames]`` (the
    starts may be negative).
    """
    if n_frames < 0:
        raise ValueError(f"n_frames: expected a number of frames >= 0, got {n_frames}")
    return _window_starts(0, n_frames, _check_fps(fps))


def _frames_in(samples: int, fps: float) -> int:
    """Video frames MuseTalk generates for ``samples`` of audio: ``floor(duration * fps)``."""
    return math.floor(samples * fps / SAMPLE_RATE)


def _frame_start_sample(frame: int, fps: float) -> int:
    """The fewest samples for which :func:`_frames_in` reaches ``frame``: where frame
    ``frame`` starts (``frame * 16000 / fps`` rounded up)."""
    sample = math.ceil(frame * SAMPLE_RATE / fps)
    while sample > 0 and _frames_in(sample - 1, fps) >= frame:
        sample -= 1
    while _frames_in(sample, fps) < frame:
        sample += 1
    return sample


def _gather_tokens(steps: torch.Tensor, starts: NDArray[np.int64],
                   pe: torch.Tensor) -> torch.Tensor:
    """``steps [S, 5, d]``, window starts (indices into ``steps``) -> ``[n, 50, d]`` tokens."""
    count = int(starts.shape[0])
    total, layers, width = steps.shape
    if count == 0 or total == 0:
        windows = steps.new_zeros(count, WINDOW_STEPS, layers, width)
    else:
        index = (torch.from_numpy(starts).to(steps.device)[:, None]
                 + torch.arange(WINDOW_STEPS, device=steps.device)[None, :])
        inside = (index >= 0) & (index < total)
        windows = steps[index.clamp(0, total - 1)]
        windows = torch.where(inside[:, :, None, None], windows, windows.new_zeros(()))
    tokens = windows.reshape(count, WINDOW_STEPS * layers, width)
    return tokens + pe.to(device=steps.device, dtype=steps.dtype)


# --------------------------------------------------------------------------- encoder


class WhisperFeatures:
    """Audio -> MuseTalk's per-frame audio tokens ``[n, 50, d]`` with a transformers
    ``WhisperEncoder`` (in eval mode; its weights decide the device and dtype everything
    runs in).

    ``encoder_calls`` counts encoder forwards (one forward may hold several 30 s windows).
    """

    def __init__(self, encoder: WhisperEncoder, *, fps: float = 25.0) -> None:
        config = encoder.config
        expected = {"encoder_layers": HIDDEN_STATES - 1, "num_mel_bins": N_MELS,
                    "max_source_positions": _ENCODER_STEPS}
        for key, value in expected.items():
            actual = int(getattr(config, key))
            if actual != value:
                raise ConfigError(f"expected {value} (MuseTalk's Whisper-tiny layout), got "
                                  f"{actual}", field=f"whisper.{key}")
        parameter = next(encoder.parameters())
        if parameter.is_meta:
            raise ValueError("encoder: expected real weights, got a model on the meta device")
        self.encoder = encoder
        self.fps: float = _check_fps(fps)
        self.d_model: int = int(config.d_model)
        self.device: torch.device = parameter.device
        self.dtype: torch.dtype = parameter.dtype
        self.encoder_calls: int = 0
        self._pe = positional_encoding(_TOKENS, self.d_model).to(self.device, self.dtype)

    def _steps(self, mel: torch.Tensor) -> torch.Tensor:
        """One encoder forward over ``mel [W, 80, 3000]`` -> ``[W * 1500, 5, d]``."""
        output = self.encoder(mel.to(self.dtype), output_hidden_states=True)
        hidden: tuple[torch.Tensor, ...] | None = output.hidden_states
        if hidden is None or len(hidden) != HIDDEN_STATES:
            got = 0 if hidden is None else len(hidden)
            raise RuntimeError(f"the Whisper encoder returned {got} hidden states; expected "
                               f"{HIDDEN_STATES}")
        # transformers ties hidden_states[-1] to last_hidden_state (after the final LayerNorm);
        # taking last_hidden_state directly keeps that true under any config
        last: torch.Tensor = output.last_hidden_state
        self.encoder_calls += 1
        return torch.stack((*hidden[:-1], last), dim=2).reshape(-1, HIDDEN_STATES, self.d_model)

    def _encode_waveform(self, waveform: torch.Tensor) -> torch.Tensor:
        steps = self._steps(_log_mel_windows(waveform))
        return steps[: waveform.numel() * STEPS_PER_SECOND // SAMPLE_RATE]

    def encode(self, audio: _Audio) -> torch.Tensor:
        """Encoder steps ``[S, 5, d]`` of ``audio`` (16 kHz mono, see :func:`log_mel`) on the
        encoder's device and dtype, ``S = floor(samples * 50 / 16000)``.

        The log-mel windows run through the encoder in one forward; per step the five hidden
        states (the embeddings, the outputs of layers 1-3, and the encoder's final output after
        its LayerNorm) are stacked on dim 1 and the windows concatenated in time.
        """
        with torch.inference_mode():
            return self._encode_waveform(_waveform(audio, self.device))

    def frame_tokens(self, steps: torch.Tensor, n_frames: int, *,
                     first_frame: int = 0) -> torch.Tensor:
        """Audio tokens ``[n_frames, 50, d]`` of frames ``first_frame ..
        first_frame + n_frames - 1``.

        ``steps [S, 5, d]`` is a step sequence from :meth:`encode` (step 0 = the audio's
        start). Each frame's 10-step window (:func:`frame_window_starts`; steps outside
        ``[0, S)`` are zeros) is flattened time-major / layer-minor, token ``5 * t + l`` being
        ``steps[start + t, l]``, and the positional encoding of positions 0..49 is added.
        """
        if steps.dim() != 3 or steps.shape[1] != HIDDEN_STATES or steps.shape[2] != self.d_model:
            raise ValueError(f"steps: expected [S, {HIDDEN_STATES}, {self.d_model}], got "
                             f"{list(steps.shape)}")
        if n_frames < 0 or first_frame < 0:
            raise ValueError(f"n_frames and first_frame: expected >= 0, got {n_frames} and "
                             f"{first_frame}")
        starts = _window_starts(first_frame, n_frames, self.fps)
        with torch.inference_mode():
            return _gather_tokens(steps, starts, self._pe)

    def offline(self, audio: _Audio) -> torch.Tensor:
        """What MuseTalk computes for a whole clip: the tokens of its
        ``floor(duration * fps)`` frames, ``[n, 50, d]``."""
        with torch.inference_mode():
            waveform = _waveform(audio, self.device)
            steps = self._encode_waveform(waveform)
            starts = _window_starts(0, _frames_in(waveform.numel(), self.fps), self.fps)
            return _gather_tokens(steps, starts, self._pe)

    def stream(self, *, max_context_s: float = 20.0) -> StreamingFeatures:
        """A :class:`StreamingFeatures` for one utterance at a time (see there)."""
        return StreamingFeatures(self, max_context_s=max_context_s)


class StreamingFeatures:
    """Per-frame tokens for audio that arrives in pieces (the runner's batches of frames).

    Each :meth:`push` gives the audio of the next ``k`` video frames (``k *
    samples_per_frame`` samples) and, optionally, ``lookahead``: audio that follows and is
    already known. It runs ONE encoder forward over a single 30 s window that starts at the
    stream's *anchor* and holds every known sample (history + audio + lookahead), zero padded;
    the steps are trimmed to the known audio, so the unknown future is zero steps, exactly as
    :meth:`WhisperFeatures.offline` zero-pads after a clip's end. Lookahead is not consumed:
    the next push's audio starts where this push's audio ended.

    Consequences:

    * While the utterance's audio before a push is at most ``max_context_s`` the anchor is
      the utterance start, and frame ``j`` of the push equals frame ``j`` of ``offline(known
      audio)`` exactly (same window start, same padding, same encoder input). So every push
      made once the end of the utterance is known (its last push, or lookahead that reaches
      the end) returns exactly ``offline(utterance)``'s frames; earlier pushes saw less audio.
    * A frame's window reaches :attr:`lookahead_samples` past the frame's end (80 ms at
      25 fps). Without that much lookahead the last frames of a push see zeros where offline
      sees speech, and every step differs slightly because Whisper's attention is global and
      the log-mel floor is relative to the window's maximum.
    * When the history grows past ``max_context_s``, the anchor moves forward to the latest
      encoder-step boundary (a multiple of 320 samples from the utterance start) that keeps
      at most ``max_context_s`` of history, never past the first step the push's first frame
      needs; window indices stay exact, only the left context is cut. Memory is bounded by
      ``max_context_s`` plus one push.
    * Lookahead that would not fit in the 30 s window is cut; a push whose own audio (plus
      the frames' left context) does not fit raises ``ValueError``.

    ``samples_per_frame`` is ``round(16000 / fps)``. When ``16000 / fps`` is not an integer
    (30 fps), frame ``n`` starts at sample ``ceil(n * 16000 / fps)``, and a push of ``k``
    frames after ``n`` pushed ones must hold the samples between those boundaries (no drift).
    """

    def __init__(self, features: WhisperFeatures, *, max_context_s: float = 20.0) -> None:
        context = float(max_context_s)
        if not 0.0 <= context < WINDOW_SAMPLES / SAMPLE_RATE:
            raise ValueError(f"max_context_s: expected 0 <= seconds < 30 (one Whisper window), "
                             f"got {max_context_s}")
        self._features = features
        self.fps: float = features.fps
        self.max_context_s: float = context
        self._max_history = round(context * SAMPLE_RATE)
        self.samples_per_frame: int = round(SAMPLE_RATE / self.fps)
        self.lookahead_samples: int = self._lookahead()
        self.encoder_calls: int = 0
        self._history = torch.zeros(0, device=features.device)
        self._anchor_step = 0
        self._frames = 0

    def _lookahead(self) -> int:
        """How far past a frame's end its window reaches, maximised over a span of frames
        long enough to cover the window pattern's period (at most 1000 frames)."""
        count = 1000
        starts = _window_starts(0, count, self.fps)
        reach = 0
        for frame in range(count):
            window_end = (int(starts[frame]) + WINDOW_STEPS) * SAMPLES_PER_STEP
            reach = max(reach, window_end - _frame_start_sample(frame + 1, self.fps))
        return reach

    @property
    def frames(self) -> int:
        """Frames of the current utterance returned so far."""
        return self._frames

    def reset(self) -> None:
        """Start a new utterance: the history is dropped and the frame counter is 0."""
        self._history = self._history.new_zeros(0)
        self._anchor_step = 0
        self._frames = 0

    def _push_frames(self, samples: int) -> int:
        start = _frame_start_sample(self._frames, self.fps)
        count = _frames_in(start + samples, self.fps) - self._frames
        if count <= 0 or _frame_start_sample(self._frames + count, self.fps) != start + samples:
            if self.samples_per_frame * self.fps == SAMPLE_RATE:
                expected = f"a positive multiple of {self.samples_per_frame} samples"
            else:
                first = _frame_start_sample(self._frames + 1, self.fps) - start
                expected = (f"the samples of whole frames at {self.fps:g} fps (frame n starts "
                            f"at ceil(n * 16000 / fps); {first} for the next frame)")
            raise MediaFormatError(f"got {samples} samples after {self._frames} frames",
                                   field="audio", expected=expected)
        return count

    def _advance_anchor(self, push_samples: int) -> None:
        """Move the anchor so the history before this push is at most the context (and the
        push still fits in one window), never past the first step the push needs."""
        consumed = _frame_start_sample(self._frames, self.fps)
        needed = max(int(_window_starts(self._frames, 1, self.fps)[0]), 0)
        budget = min(self._max_history, WINDOW_SAMPLES - push_samples)
        history = consumed - self._anchor_step * SAMPLES_PER_STEP
        if history > budget:
            target = -(-(consumed - budget) // SAMPLES_PER_STEP)
            step = min(target, needed)
            if step > self._anchor_step:
                drop = (step - self._anchor_step) * SAMPLES_PER_STEP
                self._history = self._history[drop:]
                self._anchor_step = step
        if self._history.numel() + push_samples > WINDOW_SAMPLES:
            raise MediaFormatError(
                f"{push_samples} samples plus the {self._history.numel()} samples of left context "
                "the frames need do not fit in one Whisper window", field="audio",
                expected=f"at most {WINDOW_SAMPLES - self._history.numel()} samples per push")

    def push(self, audio: _Audio, *, lookahead: _Audio | None = None) -> torch.Tensor:
        """Tokens ``[k, 50, d]`` of the next ``k`` frames, whose audio is ``audio``
        (``k * samples_per_frame`` samples, 16 kHz mono, int16 or float); ``lookahead`` is
        known audio that follows (any length, or ``None``). One encoder forward.

        Raises :class:`~avatarkit.errors.MediaFormatError` (a ``ValueError``) when the audio
        is not a whole number of frames.
        """
        features = self._features
        with torch.inference_mode():
            waveform = _waveform(audio, features.device, allow_empty=True)
            count = self._push_frames(waveform.numel())
            self._advance_anchor(waveform.numel())
            pieces = [self._history, waveform]
            if lookahead is not None:
                ahead = _waveform(lookahead, features.device, field="lookahead",
                                  allow_empty=True)
                room = WINDOW_SAMPLES - self._history.numel() - waveform.numel()
                pieces.append(ahead[:room])
            window = torch.cat(pieces)
            steps = features._encode_waveform(window)
            self.encoder_calls += 1
            starts = _window_starts(self._frames, count, self.fps) - self._anchor_step
            tokens = _gather_tokens(steps, starts, features._pe)
            self._history = torch.cat((self._history, waveform))
            self._frames += count
        return tokens
