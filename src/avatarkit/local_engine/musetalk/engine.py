"""The MuseTalk engine: the runner's :class:`~avatarkit.local_engine.engine.LipSyncEngine`
for MuseTalk's released weights.

Per batch of frames (the runner hands over up to :attr:`MuseTalkOptions.batch_size` frames of
audio at a time):

1. **Audio tokens.** The frames' audio goes into a :class:`~.audio.StreamingFeatures` (one
   Whisper encoder pass per batch over the utterance so far plus the runner's lookahead), which
   returns each frame's ``[50, d]`` tokens with the positional encoding added. A new utterance
   (segment id) or an interrupt starts the stream afresh.
2. **Silence.** Idle frames, and speaking frames whose audio window (the 200 ms the tokens
   cover) is quieter than ``silence_db``, are the avatar's own frame: the mouth stays closed
   and the networks do not run (MuseTalk's mouth otherwise keeps moving in pauses).
3. **Networks.** The others run as one batch: the avatar frame's cached masked + reference
   latents and the tokens through :class:`~.networks.UNetAtZero` (timestep 0 folded in), then
   :class:`~.networks.FaceDecoder`. The backend is torch (eager, optionally ``torch.compile``
   or CUDA graphs) or ONNX Runtime (:mod:`.onnx`); static-shape backends get batches padded to
   ``batch_size``.
4. **Blend on the device.** Each face is resized to its face box, pasted into the blend
   region (ROI) of the source frame and alpha-blended with the avatar's feathered mask, all on
   the GPU (or CPU); only the ROIs (one stacked tensor) are copied to the host, where they
   are written into copies of the source frames.

Precision: fp16 on CUDA by default (what MuseTalk runs), bf16 on request, fp32 on CPU (half
precision on a CPU is refused: slow and not what the tests check). ``clear_buffer`` (the
runner's interrupt) drops queued audio at once; a batch already drawing is discarded by the
runner, and :meth:`reset` only marks the audio stream stale so the worker thread never sees
it change mid-batch.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

from ...errors import ConfigError
from ..avatar import PreparedAvatar
from ..engine import Audio, Frame, LipSyncEngine
from .audio import SAMPLE_RATE, SAMPLES_PER_STEP, WINDOW_STEPS, StreamingFeatures, WhisperFeatures
from .networks import FaceDecoder, UNetAtZero
from .options import MuseTalkOptions, Precision
from .prepare import MuseTalkAvatar, prepare_musetalk
from .weights import MuseTalkNetworks

__all__ = ["MuseTalkEngine", "MuseTalkOptions", "StageTimes", "resolve_placement"]

logger = logging.getLogger("avatarkit.local_engine.musetalk")

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class StageTimes:
    """Seconds spent per stage since the engine was built (``profile=True`` makes them
    exact on a GPU by synchronising between stages)."""

    features: float = 0.0
    unet: float = 0.0
    decode: float = 0.0
    blend: float = 0.0
    copy_out: float = 0.0
    frames: int = 0  # frames that ran the networks
    skipped: int = 0  # speaking frames shown closed (silence)
    batches: int = 0

    def per_frame_ms(self) -> dict[str, float]:
        """Milliseconds per network frame for each stage."""
        n = max(self.frames, 1)
        return {name: 1000.0 * getattr(self, name) / n
                for name in ("features", "unet", "decode", "blend", "copy_out")}


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was asked for but torch sees no CUDA GPU "
                          "(use device = \"cpu\" or \"auto\")", field="device")
    return device


def _resolve_dtype(precision: Precision, device: torch.device) -> torch.dtype:
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if device.type == "cpu" and precision != "fp32":
        raise ConfigError(f"precision {precision!r} is for CUDA; on the CPU the engine runs "
                          "fp32", field="precision")
    return _DTYPES[precision]


_M = TypeVar("_M", bound=torch.nn.Module)


def _place(module: _M, device: torch.device, dtype: torch.dtype) -> _M:
    """``module`` on ``device`` in ``dtype`` (plain ``nn.Module.to``: diffusers' override
    warns about fp32 modules that these networks do not have)."""
    torch.nn.Module.to(module, device=device, dtype=dtype)
    return module


def resolve_placement(options: MuseTalkOptions) -> tuple[torch.device, torch.dtype]:
    """The device and dtype ``options`` ask for (``auto`` resolved); ConfigError when this
    machine cannot honour them."""
    device = _resolve_device(options.device)
    return device, _resolve_dtype(options.precision, device)


class _Networks(ABC):
    """The UNet step and the decoder behind one interface (torch or ONNX Runtime)."""

    #: the one batch size the backend accepts (None: any)
    static_batch: int | None = None

    @abstractmethod
    def run(self, latents: torch.Tensor, tokens: torch.Tensor,
            times: StageTimes | None) -> torch.Tensor:
        """Faces ``[B, 3, rows, 256]`` for latents ``[B, 8, 32, 32]`` and tokens
        ``[B, 50, d]``; adds to ``times.unet`` / ``times.decode`` when given."""

    def close(self) -> None:  # noqa: B027  (optional hook, not abstract)
        """Release what the backend holds."""


class _TorchNetworks(_Networks):
    def __init__(self, unet: UNetAtZero, decoder: FaceDecoder, *, device: torch.device,
                 compile_: bool, cuda_graphs: bool, batch_size: int,
                 sync: Callable[[], None]) -> None:
        self._unet: Callable[..., torch.Tensor] = unet
        self._decoder: Callable[..., torch.Tensor] = decoder
        self._sync = sync
        if compile_:
            self._unet = torch.compile(unet, dynamic=False, fullgraph=False)
            self._decoder = torch.compile(decoder, dynamic=False, fullgraph=False)
            self.static_batch = batch_size
        self._graph: torch.cuda.CUDAGraph | None = None
        self._cuda_graphs = cuda_graphs
        self._device = device
        if cuda_graphs:
            self.static_batch = batch_size

    def _capture(self, latents: torch.Tensor, tokens: torch.Tensor) -> None:
        self._in_latents = latents.clone()
        self._in_tokens = tokens.clone()
        side = torch.cuda.Stream(device=self._device)  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up outside the graph (allocations, autotuning)
                self._decoder(self._unet(self._in_latents, self._in_tokens))
        torch.cuda.current_stream(self._device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._out = self._decoder(self._unet(self._in_latents, self._in_tokens))
        self._graph = graph

    def run(self, latents: torch.Tensor, tokens: torch.Tensor,
            times: StageTimes | None) -> torch.Tensor:
        if self._cuda_graphs:
            if self._graph is None:
                self._capture(latents, tokens)
            assert self._graph is not None
            start = time.perf_counter()
            self._in_latents.copy_(latents)
            self._in_tokens.copy_(tokens)
            self._graph.replay()
            out = self._out.clone()
            if times is not None:
                self._sync()
                times.unet += time.perf_counter() - start  # one graph: unet and decode
            return out
        start = time.perf_counter()
        predicted = self._unet(latents, tokens)
        if times is not None:
            self._sync()
            middle = time.perf_counter()
            times.unet += middle - start
        faces = self._decoder(predicted)
        if times is not None:
            self._sync()
            times.decode += time.perf_counter() - middle
        return faces


class _OnnxNetworks(_Networks):
    def __init__(self, models: Any) -> None:
        self._models = models
        self.static_batch = int(models.batch_size)

    def run(self, latents: torch.Tensor, tokens: torch.Tensor,
            times: StageTimes | None) -> torch.Tensor:
        start = time.perf_counter()
        predicted: torch.Tensor = self._models.unet(latents, tokens)
        middle = time.perf_counter()
        faces: torch.Tensor = self._models.decode(predicted)
        if times is not None:
            times.unet += middle - start
            times.decode += time.perf_counter() - middle
        return faces

    def close(self) -> None:
        self._models.close()


class MuseTalkEngine(LipSyncEngine):
    """MuseTalk lip sync for one prepared avatar (see the module docstring).

    ``networks`` are loaded weights (:func:`~.weights.load_networks`) or random ones (tests,
    benchmarks); the engine moves them to its device and precision and takes ownership (the
    UNet's time embedding is folded in place). Building prepares the avatar's MuseTalk
    material (cached on disk next to the avatar cache) and warms the networks up.
    """

    name = "musetalk"

    def __init__(self, avatar: PreparedAvatar, networks: MuseTalkNetworks, *,
                 options: MuseTalkOptions | None = None, fps: float | None = None,
                 sample_rate: int = SAMPLE_RATE,
                 cache_dir: str | os.PathLike[str] | None = None) -> None:
        self.options = opts = options if options is not None else MuseTalkOptions()
        if sample_rate != SAMPLE_RATE:
            raise ConfigError(f"MuseTalk listens at {SAMPLE_RATE} Hz (Whisper); got "
                              f"{sample_rate}", field="sample_rate")
        if fps is not None and not (math.isfinite(fps) and 1.0 <= fps <= 60.0):
            raise ConfigError(f"expected a frame rate between 1 and 60, got {fps}", field="fps")
        self.device, self.dtype = resolve_placement(opts)
        if opts.backend == "onnx" and (opts.compile or opts.cuda_graphs):
            raise ConfigError("compile and cuda_graphs apply to the torch backend; the ONNX "
                              "backend optimises its own graph", field="backend")
        if opts.cuda_graphs and self.device.type != "cuda":
            raise ConfigError("CUDA graphs need a CUDA device", field="cuda_graphs")
        if opts.backend == "onnx" and self.dtype == torch.bfloat16:
            raise ConfigError("the ONNX backend runs fp32 or fp16, not bf16",
                              field="precision")
        self.avatar = avatar
        self.sample_rate = SAMPLE_RATE
        self.fps = float(fps if fps is not None else avatar.fps)
        self.height, self.width = (int(v) for v in avatar.frames.shape[1:3])
        self.source_frames = len(avatar)
        self.preferred_batch_size = opts.batch_size
        self.version = networks.version
        self.times = StageTimes()
        self._times = self.times if opts.profile else None
        self._reset_pending = threading.Event()

        configs = networks.configs
        configs.check()
        # the ONNX export cache is keyed by the weights; taken before the UNet is folded in
        # place (random weights are fingerprinted by content)
        fingerprint = (networks.fingerprint("unet") + networks.fingerprint("vae")
                       if opts.backend == "onnx" else "")
        # the avatar's latents are encoded once, at full precision (cached on disk)
        vae = _place(networks.vae, self.device, torch.float32)
        self.material: MuseTalkAvatar = prepare_musetalk(
            avatar, vae, vae_fingerprint=networks.fingerprint("vae"),
            version=networks.version or "v1.5", cache_dir=cache_dir,
            batch_size=opts.batch_size)
        vae = _place(vae, self.device, self.dtype)
        unet = UNetAtZero(_place(networks.unet, self.device, self.dtype))
        decoder = FaceDecoder(vae, rows=opts.decode_rows)
        self.first_row = decoder.first_row
        self.features = WhisperFeatures(
            _place(networks.whisper, self.device, self.dtype), fps=self.fps)
        self._stream: StreamingFeatures = self.features.stream(max_context_s=opts.max_context_s)
        self._segment: str | None = None
        #: the last samples of the utterance (the silence gate looks back as far as the
        #: tokens' window does)
        self._recent = np.zeros(0, dtype=np.int16)
        self._networks = self._build_networks(unet, decoder, networks.configs.audio_dim,
                                              fingerprint, cache_dir)
        self._cache_device_material()
        self.warm_up()

    # -- setup ----------------------------------------------------------------------------

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _build_networks(self, unet: UNetAtZero, decoder: FaceDecoder, audio_dim: int,
                        fingerprint: str,
                        cache_dir: str | os.PathLike[str] | None) -> _Networks:
        opts = self.options
        if opts.backend == "onnx":
            from ..avatar import default_cache_dir
            from .onnx import OnnxModels

            # exports live beside the prepared avatars (``<cache>/onnx/<key>/``)
            models = OnnxModels.build(
                unet, decoder, batch_size=opts.batch_size, audio_dim=audio_dim,
                cache_dir=cache_dir if cache_dir is not None else default_cache_dir(),
                fingerprint=fingerprint,
                providers=opts.onnx_providers,
                precision="fp32" if self.dtype == torch.float32 else "fp16")
            return _OnnxNetworks(models)
        return _TorchNetworks(unet, decoder, device=self.device,
                              compile_=opts.compile, cuda_graphs=opts.cuda_graphs,
                              batch_size=opts.batch_size, sync=self._sync)

    def _cache_device_material(self) -> None:
        """What every frame's blend needs, on the device: latents, source crops (for the rows
        a lower-rows decode skips), ROIs of the source frames and their alpha masks."""
        m = self.material
        device, dtype = self.device, self.dtype
        self._latents = torch.from_numpy(np.array(m.latents)).to(device, dtype)
        self._crops = (torch.from_numpy(np.array(m.crops)).to(device)
                       .permute(0, 3, 1, 2).to(dtype).div_(255.0))
        self._rois: list[torch.Tensor] = []
        self._alphas: list[torch.Tensor] = []
        self._roi_boxes = [tuple(int(v) for v in box) for box in m.roi_boxes]
        self._face_boxes = [m.face_in_roi(i) for i in range(len(m))]
        for i, (x0, y0, x1, y1) in enumerate(self._roi_boxes):
            roi = np.array(self.avatar.frames[i, y0:y1, x0:x1])
            self._rois.append(torch.from_numpy(roi).to(device).permute(2, 0, 1).to(dtype))
            self._alphas.append(torch.from_numpy(np.array(m.masks[i])).to(device)
                                .to(dtype).div_(255.0)[None])
        self._roi_h = max(y1 - y0 for _, y0, _, y1 in self._roi_boxes)
        self._roi_w = max(x1 - x0 for x0, _, x1, _ in self._roi_boxes)

    def warm_up(self) -> None:
        """Run the networks once at the batch size (kernels, allocations, compilation, CUDA
        graph capture) so the first real frame is as fast as the rest."""
        n = self._networks.static_batch or self.options.batch_size
        latents = self._latents[[0] * n]
        tokens = torch.zeros((n, 50, self.features.d_model), device=self.device,
                             dtype=self.dtype)
        with torch.inference_mode():
            self._networks.run(latents, tokens, None)
        self._sync()

    @property
    def profiling(self) -> bool:
        """Whether stages are timed exactly (the device is synchronised between them)."""
        return self._times is not None

    @profiling.setter
    def profiling(self, on: bool) -> None:
        self._times = self.times if on else None

    # -- the engine contract ---------------------------------------------------------------

    @property
    def lookahead_samples(self) -> int:
        return self._stream.lookahead_samples

    def reset(self) -> None:
        self._reset_pending.set()

    def render(self, audio: Audio, *, source_index: int, speaking: bool) -> Frame:
        return self.render_batch([audio], source_indices=[source_index],
                                 speaking=[speaking])[0]

    def render_batch(self, audio: Sequence[Audio], *, source_indices: Sequence[int],
                     speaking: Sequence[bool], segment_ids: Sequence[str | None] | None = None,
                     lookahead: Audio | None = None) -> list[Frame]:
        count = len(audio)
        if len(source_indices) != count or len(speaking) != count:
            raise ValueError("audio, source_indices and speaking must have the same length")
        if segment_ids is None:  # a caller without utterances: speaking frames are one
            segment_ids = ["speech" if s else None for s in speaking]
        elif len(segment_ids) != count:
            raise ValueError("segment_ids must have one id per frame")
        if self._reset_pending.is_set():
            self._reset_pending.clear()
            self._restart(None)
        with torch.inference_mode():
            start = time.perf_counter()
            tokens, active = self._tokens(audio, speaking, segment_ids, lookahead)
            if self._times is not None:
                self._sync()
                self._times.features += time.perf_counter() - start
            pictures: list[Frame | None] = [None] * count
            if active:
                faces = self._faces([source_indices[k] for k in active], tokens)
                rois = self._blend([source_indices[k] for k in active], faces)
                for k, roi in zip(active, rois, strict=True):
                    index = source_indices[k]
                    x0, y0, x1, y1 = self._roi_boxes[index]
                    frame = self.avatar.frames[index].copy()
                    frame[y0:y1, x0:x1] = roi
                    pictures[k] = frame
            self.times.batches += 1
        return [p if p is not None else self.avatar.frames[source_indices[k]].copy()
                for k, p in enumerate(pictures)]

    def close(self) -> None:
        """Release the backend (ONNX Runtime sessions); the engine cannot draw afterwards.
        Idempotent."""
        self._networks.close()

    # -- stages ---------------------------------------------------------------------------

    def _restart(self, segment: str | None) -> None:
        self._stream.reset()
        self._segment = segment
        self._recent = np.zeros(0, dtype=np.int16)

    def _tokens(self, audio: Sequence[Audio], speaking: Sequence[bool],
                segment_ids: Sequence[str | None],
                lookahead: Audio | None) -> tuple[torch.Tensor | None, list[int]]:
        """Audio tokens of the frames that run the networks, and those frames' positions."""
        spf = self._stream.samples_per_frame
        keep_back = WINDOW_STEPS * SAMPLES_PER_STEP
        parts: list[torch.Tensor] = []
        active: list[int] = []
        k = 0
        while k < len(audio):
            segment = segment_ids[k] if speaking[k] else None
            if segment is None:
                if self._segment is not None:
                    self._restart(None)
                k += 1
                continue
            if segment != self._segment:
                self._restart(segment)
            end = k
            while end < len(audio) and speaking[end] and segment_ids[end] == segment:
                end += 1
            run = np.concatenate([np.asarray(a, dtype=np.int16).reshape(-1)[:spf]
                                  for a in audio[k:end]])
            if len(run) != (end - k) * spf:
                raise ValueError(f"each frame's audio must hold {spf} samples")
            ahead = lookahead if end == len(audio) and lookahead is not None else None
            tokens = self._stream.push(run, lookahead=ahead)
            quiet = self._quiet(run, ahead, end - k)
            self._recent = np.concatenate([self._recent, run])[-keep_back:]
            for j in range(end - k):
                if not quiet[j]:
                    active.append(k + j)
                    parts.append(tokens[j])
            self.times.skipped += int(sum(quiet))
            k = end
        if not parts:
            return None, []
        return torch.stack(parts), active

    def _quiet(self, run: NDArray[np.int16], ahead: Audio | None, frames: int) -> list[bool]:
        """Which frames' token windows (80 ms before to 120 ms after at 25 fps) are quieter
        than the silence threshold."""
        spf = self._stream.samples_per_frame
        after = self._stream.lookahead_samples
        before = max(0, WINDOW_STEPS * SAMPLES_PER_STEP - spf - after)
        known = np.concatenate([self._recent[-before:] if before else self._recent[:0], run,
                                ahead if ahead is not None else run[:0]]).astype(np.float64)
        offset = min(len(self._recent), before)
        threshold = (10.0 ** (self.options.silence_db / 20.0) * 32768.0) ** 2
        quiet = []
        for j in range(frames):
            lo = max(0, offset + j * spf - before)
            hi = offset + (j + 1) * spf + after
            window = known[lo:hi]
            power = float(np.mean(window * window)) if len(window) else 0.0
            quiet.append(power < threshold)
        return quiet

    def _faces(self, indices: list[int], tokens: torch.Tensor | None) -> torch.Tensor:
        """Decoded faces ``[n, 3, 256, 256]`` in [0, 1] for the active frames."""
        assert tokens is not None
        n = len(indices)
        latents = self._latents[indices]
        tokens = tokens.to(self.dtype)
        static = self._networks.static_batch
        times = self._times
        if static is None:
            outs = [self._networks.run(latents, tokens, times)]
        else:
            outs = []
            for lo in range(0, n, static):
                chunk_l, chunk_t = latents[lo:lo + static], tokens[lo:lo + static]
                short = static - len(chunk_l)
                if short:
                    chunk_l = torch.cat([chunk_l, chunk_l[-1:].expand(short, -1, -1, -1)])
                    chunk_t = torch.cat([chunk_t, chunk_t[-1:].expand(short, -1, -1)])
                outs.append(self._networks.run(chunk_l, chunk_t, times)[:static - short])
        decoded = torch.cat(outs) if len(outs) > 1 else outs[0]
        self.times.frames += n
        if self.first_row == 0:
            return decoded
        faces = self._crops[indices].clone()
        faces[:, :, self.first_row:] = decoded.to(faces.dtype)
        return faces

    def _blend(self, indices: list[int], faces: torch.Tensor) -> list[NDArray[np.uint8]]:
        """Paste each face into its ROI with the alpha mask; the ROIs come back as uint8."""
        start = time.perf_counter()
        out = torch.zeros((len(indices), self._roi_h, self._roi_w, 3), dtype=torch.uint8,
                          device=self.device)
        for k, index in enumerate(indices):
            fx0, fy0, fx1, fy1 = self._face_boxes[index]
            roi = self._rois[index]
            alpha = self._alphas[index]
            face = F.interpolate(faces[k:k + 1].to(roi.dtype), size=(fy1 - fy0, fx1 - fx0),
                                 mode="bilinear", align_corners=False)[0].mul_(255.0)
            pasted = roi.clone()
            pasted[:, fy0:fy1, fx0:fx1] = face
            blended = torch.lerp(roi, pasted, alpha)
            h, w = roi.shape[1:]
            out[k, :h, :w] = blended.round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0)
        if self._times is not None:
            self._sync()
            middle = time.perf_counter()
            self._times.blend += middle - start
        host = out.cpu().numpy()
        if self._times is not None:
            self._times.copy_out += time.perf_counter() - middle
        result = []
        for k, index in enumerate(indices):
            x0, y0, x1, y1 = self._roi_boxes[index]
            result.append(host[k, :y1 - y0, :x1 - x0])
        return result

