"""MuseTalk engine throughput: frames per second by batch size, per-stage cost, first-frame
latency and memory, side by side with a re-creation of MuseTalk's official real-time loop.

Networks are built from the configs with random weights (speed does not depend on weight
values): ``--size full`` is the released model (849.9 M UNet parameters, sd-vae-ft-mse,
Whisper-tiny), ``--size ci`` the tiny test configuration, which exercises the same code in
seconds on a CPU (its figures say nothing about a GPU). The avatar is the 512x512 astronaut
portrait (``skimage.data.astronaut``), prepared once in a temporary cache.

**Ours** (:class:`~avatarkit.local_engine.musetalk.engine.MuseTalkEngine`): each batch size
gets a fresh engine; ``--frames`` frames of the bundled speech clip (looped) are drawn in
batches through ``render_batch`` as the runner calls it (one utterance, 80 ms lookahead),
frames returned as full RGB images; the silence gate is off so that every frame runs the
networks. fps counts after one warm-up batch. A second, profiled pass (device synchronised
between stages) gives milliseconds per frame for audio features (log-mel + Whisper encoder +
windows), UNet, VAE decode, blend (resize + paste + alpha on the device) and copy-out (device
to host of the ROIs, written into the frame). First-frame latency: a new utterance's first
frame (one frame of audio plus its lookahead) from call to picture, p50 of 10, at the
smallest batch size. Memory: peak device memory while the engine ran.

**Baseline** (a faithful re-creation of ``scripts/realtime_inference.py``, as described in
``shared/research/musetalk-internals.md`` §2.2; not MuseTalk's code): Whisper features for the
whole clip computed first and excluded from the timing (as the official figure does); then per
batch of ``--baseline-batch`` (20, the official default) frames: positional encoding added,
diffusers' ``UNet2DConditionModel`` called with ``timestep=0`` (time embedding every call),
``vae.decode(latents / 0.18215)``, ``.cpu()``, float to uint8, RGB to BGR, then a single
blending thread fed by a queue does, per frame, a deep copy of the full frame, ``cv2.resize``
of the face to its box, and Pillow crop / paste / paste-with-mask of the square region, back to
numpy BGR. Eager fp16 on CUDA (fp32 on a CPU). The timer runs from the first batch until the
blending thread has finished every frame.

    python benchmarks/musetalk_throughput.py [--size full|ci] [--device auto] [--precision auto]
        [--batches 1,4,8,16] [--frames 96] [--baseline-batch 20] [--baseline-frames 100]
        [--decode-rows full|lower] [--compile] [--cuda-graphs] [--backend torch|onnx] [--write]

``--write`` records the result in docs/performance.md (device, machine and date included).
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import queue
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np
import torch
from _report import machine, percentile, write_section
from numpy.typing import NDArray
from PIL import Image
from skimage import data

from avatarkit.local_engine.avatar import PreparedAvatar, prepare_avatar
from avatarkit.local_engine.musetalk.audio import WhisperFeatures, positional_encoding
from avatarkit.local_engine.musetalk.configs import MuseTalkConfigs
from avatarkit.local_engine.musetalk.engine import MuseTalkEngine, StageTimes, resolve_placement
from avatarkit.local_engine.musetalk.options import MuseTalkOptions
from avatarkit.local_engine.musetalk.prepare import prepare_musetalk
from avatarkit.local_engine.musetalk.weights import random_networks
from avatarkit.render import read_speech
from avatarkit.samples import sample_speech_path

RATE = 16_000
FPS = 25.0
SPF = 640
HEADING = "## MuseTalk engine throughput"  # + " (SIZE size, DEVICE TYPE)"


def speech(seconds: float) -> NDArray[np.int16]:
    """The bundled eSpeak NG clip, looped to ``seconds`` (16 kHz mono)."""
    clip = np.concatenate([c.samples.reshape(-1) for c in read_speech(sample_speech_path())])
    return np.resize(clip, round(seconds * RATE)).astype(np.int16)


@dataclass
class OursResult:
    batch: int
    fps: float
    stages_ms: dict[str, float]
    first_frame_ms: float | None
    peak_mem_gb: float | None


@dataclass
class BaselineResult:
    batch: int
    fps: float
    frames: int


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _mem_reset(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _mem_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def measure_ours(avatar: PreparedAvatar, configs: MuseTalkConfigs, options: MuseTalkOptions,
                 *, frames: int, cache: Path, first_frame: bool) -> OursResult:
    device, _ = resolve_placement(options)
    _mem_reset(device)
    networks = random_networks(configs, seed=0, device=device)
    engine = MuseTalkEngine(avatar, networks, options=options, cache_dir=cache)
    batch = options.batch_size
    total = max(frames, 2 * batch)
    audio = speech(total / FPS + 1.0)

    def run(count: int) -> float:
        start = time.perf_counter()
        for lo in range(0, count, batch):
            n = min(batch, count - lo)
            chunk = [audio[(lo + k) * SPF:(lo + k + 1) * SPF] for k in range(n)]
            ahead = audio[(lo + n) * SPF:(lo + n) * SPF + engine.lookahead_samples]
            engine.render_batch(chunk, source_indices=[0] * n, speaking=[True] * n,
                                segment_ids=["bench"] * n, lookahead=ahead)
        _sync(device)
        return time.perf_counter() - start

    run(batch)  # warm-up batch (the engine warmed its networks up already)
    engine.reset()
    elapsed = run(total)
    fps = total / elapsed
    engine.reset()
    engine.times = StageTimes()
    engine.profiling = True
    run(total)
    stages = engine.times.per_frame_ms()
    engine.profiling = False
    first_ms: float | None = None
    if first_frame:
        trials = []
        for trial in range(10):
            engine.reset()
            one = audio[trial * SPF:(trial + 1) * SPF]
            ahead = audio[(trial + 1) * SPF:(trial + 1) * SPF + engine.lookahead_samples]
            start = time.perf_counter()
            engine.render_batch([one], source_indices=[0], speaking=[True],
                                segment_ids=[f"first{trial}"], lookahead=ahead)
            _sync(device)
            trials.append((time.perf_counter() - start) * 1000)
        first_ms = percentile(trials, 50)
    peak = _mem_peak(device)
    engine.close()
    return OursResult(batch, fps, stages, first_ms, peak)


def _pil_blend(frame_bgr: NDArray[np.uint8], face_bgr: NDArray[np.uint8],
               box: tuple[int, int, int, int], mask: NDArray[np.uint8],
               square: tuple[int, int, int, int]) -> NDArray[np.uint8]:
    """The official loop's per-frame blend: Pillow crop of the square, paste of the face at
    its box, paste of the square back through the mask; numpy BGR in and out."""
    x, y, x1, y1 = box
    body = Image.fromarray(frame_bgr[:, :, ::-1])
    face = Image.fromarray(face_bgr[:, :, ::-1])
    x_s, y_s = square[:2]
    large = body.crop(square)
    large.paste(face, (x - x_s, y - y_s, x1 - x_s, y1 - y_s))
    body.paste(large, square[:2], Image.fromarray(mask).convert("L"))
    return np.asarray(body)[:, :, ::-1]


def measure_baseline(avatar: PreparedAvatar, configs: MuseTalkConfigs, device: torch.device,
                     *, batch: int, frames: int, cache: Path) -> BaselineResult:
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    _mem_reset(device)
    networks = random_networks(configs, seed=0, device=device)
    # the geometry and latents of the avatar, prepared as the engine prepares them
    material = prepare_musetalk(avatar, networks.vae, vae_fingerprint=networks.fingerprint("vae"),
                                cache_dir=cache)
    unet, vae, encoder = networks.unet, networks.vae, networks.whisper
    for module in (unet, vae, encoder):
        torch.nn.Module.to(module, dtype=dtype)  # eager fp16 on CUDA, as the official loop
    whisper = WhisperFeatures(encoder, fps=FPS)
    audio = speech(frames / FPS + 0.5)
    # features up front, outside the timing (the official figure excludes them); the PE is
    # added per batch inside the loop, as the official script does
    pe = positional_encoding(50, configs.audio_dim).to(device, dtype)
    chunks = whisper.offline(audio)[:frames] - pe
    latents = torch.from_numpy(np.array(material.latents[0:1])).to(device, dtype)
    frame_bgr = np.ascontiguousarray(avatar.frames[0][:, :, ::-1])
    fx0, fy0, fx1, fy1 = (int(v) for v in material.face_boxes[0])
    rx0, ry0, rx1, ry1 = (int(v) for v in material.roi_boxes[0])
    mask = np.array(material.masks[0])
    timestep = torch.tensor([0], device=device)
    done: queue.Queue[NDArray[np.uint8] | None] = queue.Queue()
    blended = [0]

    def blend_worker() -> None:
        while (face := done.get()) is not None:
            original = copy.deepcopy(frame_bgr)
            resized = np.asarray(cv2.resize(face, (fx1 - fx0, fy1 - fy0)), dtype=np.uint8)
            _pil_blend(original, resized, (fx0, fy0, fx1, fy1), mask, (rx0, ry0, rx1, ry1))
            blended[0] += 1

    def batches() -> int:
        count = 0
        with torch.no_grad():
            for lo in range(0, frames, batch):
                tokens = chunks[lo:lo + batch] + pe
                x = latents.expand(len(tokens), -1, -1, -1)
                predicted = unet(x, timestep, encoder_hidden_states=tokens).sample
                image = vae.decode(predicted / vae.config["scaling_factor"]).sample
                image = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
                faces = (image.cpu().float().numpy() * 255).round().astype(np.uint8)
                for face in faces:
                    done.put(np.ascontiguousarray(face[:, :, ::-1]))
                    count += 1
        return count

    # warm-up: one batch through the networks (the official script has no warm-up; leaving
    # it out would only make the baseline slower)
    with torch.no_grad():
        unet(latents.expand(batch, -1, -1, -1), timestep,
             encoder_hidden_states=chunks[:1].expand(batch, -1, -1) + pe)
    _sync(device)
    worker = threading.Thread(target=blend_worker, name="baseline-blend")
    start = time.perf_counter()
    worker.start()
    count = batches()
    done.put(None)
    worker.join()
    elapsed = time.perf_counter() - start
    return BaselineResult(batch, count / elapsed, count)


def _fps(value: float) -> str:
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("full", "ci"), default="full")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "fp16", "bf16"))
    parser.add_argument("--batches", default="1,4,8,16")
    parser.add_argument("--frames", type=int, default=96)
    parser.add_argument("--baseline-batch", type=int, default=20)
    parser.add_argument("--baseline-frames", type=int, default=100)
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--decode-rows", default="full", choices=("full", "lower"))
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--cuda-graphs", action="store_true")
    parser.add_argument("--backend", default="torch", choices=("torch", "onnx"))
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--write", action="store_true", help="record in docs/performance.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = MuseTalkConfigs.official() if args.size == "full" else MuseTalkConfigs.tiny()
    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)
        portrait = np.asarray(data.astronaut(), dtype=np.uint8)  # type: ignore[no-untyped-call]
        avatar = prepare_avatar(portrait, cache_dir=cache, progress=False)
        ours: list[OursResult] = []
        device = torch.device("cpu")
        for batch in batches:
            # every frame runs the networks: the clip's pauses would otherwise be skipped
            options = MuseTalkOptions(device=args.device, precision=args.precision,
                                      silence_db=-400.0,
                                      batch_size=batch, decode_rows=args.decode_rows,
                                      compile=args.compile, cuda_graphs=args.cuda_graphs,
                                      backend=args.backend)
            device, dtype = resolve_placement(options)
            result = measure_ours(avatar, configs, options, frames=args.frames, cache=cache,
                                  first_frame=batch == batches[0])
            ours.append(result)
            stages = ", ".join(f"{k} {v:.2f}" for k, v in result.stages_ms.items())
            print(f"ours batch {batch}: {_fps(result.fps)} frames/s; per frame ms: {stages}"
                  + (f"; first frame p50 {result.first_frame_ms:.1f} ms"
                     if result.first_frame_ms is not None else "")
                  + (f"; peak memory {result.peak_mem_gb:.2f} GiB"
                     if result.peak_mem_gb is not None else ""), flush=True)
        baseline: BaselineResult | None = None
        if not args.no_baseline:
            baseline = measure_baseline(avatar, configs, device, batch=args.baseline_batch,
                                        frames=args.baseline_frames, cache=cache)
            print(f"baseline (official loop re-created, batch {baseline.batch}): "
                  f"{_fps(baseline.fps)} frames/s over {baseline.frames} frames", flush=True)
    best = max(ours, key=lambda r: r.fps)
    ratio = best.fps / baseline.fps if baseline is not None else math.nan
    name = device_name(device)
    print(f"musetalk throughput on {name} ({args.size} size, {dtype}): best {_fps(best.fps)} "
          f"frames/s at batch {best.batch}"
          + (f", {ratio:.1f}x the baseline" if baseline is not None else ""))
    if args.write:
        heading = f"{HEADING} ({args.size} size, {device.type.upper()})"
        write_section(heading, report(heading, args, name, dtype, ours, baseline))


def report(heading: str, args: argparse.Namespace, name: str, dtype: torch.dtype,
           ours: list[OursResult], baseline: BaselineResult | None) -> str:
    options = [("size", args.size), ("batches", args.batches), ("frames", args.frames),
               ("baseline-batch", args.baseline_batch),
               ("baseline-frames", args.baseline_frames), ("decode-rows", args.decode_rows),
               ("backend", args.backend)]
    words = [f"--{key} {value}" for key, value in options]
    words += [flag for flag, on in (("--compile", args.compile),
                                    ("--cuda-graphs", args.cuda_graphs)) if on]
    command = " ".join(["python benchmarks/musetalk_throughput.py", *words, "--write"])
    first = next((r.first_frame_ms for r in ours if r.first_frame_ms is not None), None)
    on_cpu = name == "CPU"
    lines = [
        heading,
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d} on **{name}** ({machine()}), "
        f"{str(dtype).removeprefix('torch.')}, by `{command}`. Random weights of the "
        f"{'released (full-size)' if args.size == 'full' else 'tiny test'} configuration; "
        "the 512x512 astronaut avatar; frames returned as full RGB images. "
        "Targets on one H100: >= 500 frames/s aggregate, >= 8x the baseline, first frame "
        "<= 50 ms." + (" On a CPU the networks dominate and these figures only show the "
                       "pipeline runs; the GPU figures need a CUDA run of the same script "
                       "(none was available when these were taken)." if on_cpu else ""),
        "",
        "| batch | frames/s | features | UNet | decode | blend | copy-out | "
        "peak memory |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in ours:
        s = r.stages_ms
        mem = f"{r.peak_mem_gb:.2f} GiB" if r.peak_mem_gb is not None else "n/a (CPU)"
        lines.append(f"| {r.batch} | {_fps(r.fps)} | {s['features']:.2f} ms | "
                     f"{s['unet']:.2f} ms | {s['decode']:.2f} ms | {s['blend']:.2f} ms | "
                     f"{s['copy_out']:.2f} ms | {mem} |")
    lines.append("")
    if first is not None:
        lines.append(f"First frame of an utterance (batch {ours[0].batch}): p50 "
                     f"{first:.1f} ms.")
    if baseline is not None:
        best = max(ours, key=lambda r: r.fps)
        lines.append(f"Baseline (the official real-time loop re-created, batch "
                     f"{baseline.batch}, {baseline.frames} frames): {_fps(baseline.fps)} "
                     f"frames/s; ours at batch {best.batch} is {best.fps / baseline.fps:.2f}x "
                     "that.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
