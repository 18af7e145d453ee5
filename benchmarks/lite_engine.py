"""The lite engine on one core: frames per second and per-stage cost, label and watermark included.

The 512x512 astronaut portrait is prepared once (mediapipe, in a temporary cache); then
``--frames`` frames (default 500, 20 s at 25 fps) of speech-like audio are rendered back to
back, each followed by the disclosure steps the runner and recorder apply to every frame
(``FrameLabeler.apply_inplace`` with the default label, ``FrameWatermarker.embed_into``), in
one thread: ``OMP_NUM_THREADS`` / ``OPENBLAS_NUM_THREADS`` / ``MKL_NUM_THREADS`` /
``NUMEXPR_NUM_THREADS`` are set to 1 before numpy is imported, and ``cv2.setNumThreads(1)``.

The audio: phrases of 10 syllables at 4.5 per second with 0.5 s pauses between them; each
syllable a vowel ("ah", "ee", "oo", "eh", "oh" in turn: harmonics of a 120-180 Hz pitch shaped
by formant resonances) under a raised-cosine envelope, every third one led by 60 ms of "s"
(noise above 3 kHz); -18 dBFS RMS while voiced. The same number of idle frames
(``speaking=False``) is measured separately, and a paced run renders speaking frames at the
real 25 fps (this VM's cold-cache penalty for sparse calls, see the control section of
docs/performance.md).

    python benchmarks/lite_engine.py [--frames 500] [--paced-frames 250] [--write]

``--write`` records the result in docs/performance.md (machine and date included).
"""

from __future__ import annotations

import os

# Single-threaded, before numpy is imported: the target is per core.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from datetime import UTC, datetime  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import numpy.typing as npt  # noqa: E402
from _report import machine, percentile, write_section  # noqa: E402
from skimage import data  # noqa: E402

from avatarkit.disclosure.label import FrameLabeler, LabelConfig  # noqa: E402
from avatarkit.disclosure.watermark import FrameWatermarker, payload_for  # noqa: E402
from avatarkit.local_engine.avatar import prepare_avatar  # noqa: E402
from avatarkit.local_engine.lite import LiteEngine  # noqa: E402

RATE = 16_000
FPS = 25.0
SPF = 640
VOWELS: tuple[tuple[tuple[float, float], ...], ...] = (
    ((700.0, 90.0), (1200.0, 110.0), (2600.0, 160.0)),   # ah
    ((280.0, 60.0), (2250.0, 150.0), (2900.0, 200.0)),   # ee
    ((300.0, 60.0), (870.0, 80.0)),                      # oo
    ((550.0, 70.0), (1800.0, 100.0), (2500.0, 150.0)),   # eh
    ((450.0, 70.0), (800.0, 80.0)),                      # oh
)
STAGES = ("mouth", "warp", "shade_blend", "label", "watermark", "total")
STAGE_NAMES = {
    "mouth": "mouth model (RMS, rfft, smoothing)",
    "warp": "warp (mesh, rasterise, remap)",
    "shade_blend": "shade + blend (frame copy, mouth inside, mask blend)",
    "label": "`FrameLabeler.apply_inplace`",
    "watermark": "`FrameWatermarker.embed_into`",
    "total": "whole frame",
}

Audio = npt.NDArray[np.int16]


def speech(frames: int, seed: int = 7) -> Audio:
    """Speech-like audio for ``frames`` video frames (see the module docstring)."""
    rng = np.random.default_rng(seed)
    total = frames * SPF
    out = np.zeros(total, dtype=np.float64)
    syllable = round(RATE / 4.5)
    pos, count = 0, 0
    level = 10 ** (-18 / 20)
    while pos < total:
        if count and count % 10 == 0:
            pos += RATE // 2          # a pause between phrases
        start = pos
        if count % 3 == 0:            # an "s" before the vowel
            n = round(0.06 * RATE)
            noise = np.fft.rfft(rng.standard_normal(n))
            noise[np.fft.rfftfreq(n, 1 / RATE) < 3000] = 0
            hiss = np.fft.irfft(noise, n)
            hiss *= 0.5 * level / np.sqrt(np.mean(hiss**2))
            end = min(start + n, total)
            out[start:end] += hiss[:end - start]
            start += n
        n = syllable - round(0.03 * RATE)
        t = np.arange(n) / RATE
        f0 = 120.0 + 60.0 * rng.random()
        formants = VOWELS[count % len(VOWELS)]
        voiced = np.zeros(n)
        for k in range(1, int(7000 / f0)):
            f = k * f0
            gain = (sum(1.0 / (1.0 + ((f - c) / bw) ** 2) for c, bw in formants) + 0.02) / k
            voiced += gain * np.sin(2 * np.pi * f * t + 0.7 * k)
        voiced *= level / np.sqrt(np.mean(voiced**2))
        voiced *= np.sin(np.pi * np.arange(n) / n) ** 0.8       # the syllable's envelope
        end = min(start + n, total)
        if start < total:
            out[start:end] += voiced[:end - start]
        pos = start + syllable
        count += 1
    return np.round(np.clip(out, -1.0, 1.0) * 32767).astype(np.int16)


@dataclass
class Run:
    ms: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in STAGES})
    wall_s: float = 0.0
    warped: int = 0

    def stat(self, stage: str, q: float) -> float:
        values = self.ms[stage]
        return percentile(values, q) if values else 0.0

    @property
    def fps(self) -> float:
        return len(self.ms["total"]) / self.wall_s if self.wall_s > 0 else 0.0


def run(engine: LiteEngine, labeler: FrameLabeler, marker: FrameWatermarker,
        chunks: list[Audio], *, speaking: bool, pace: float | None = None) -> Run:
    result = Run()
    started = time.perf_counter()
    deadline = started
    for chunk in chunks:
        if pace is not None:
            deadline += pace
            while time.perf_counter() < deadline:
                time.sleep(max(0.0, deadline - time.perf_counter() - 0.001))
        t0 = time.perf_counter_ns()
        frame = engine.render(chunk, source_index=0, speaking=speaking)
        t1 = time.perf_counter_ns()
        labeler.apply_inplace(frame)
        t2 = time.perf_counter_ns()
        marker.embed_into(frame)
        t3 = time.perf_counter_ns()
        stages = engine.last_stage_ns
        result.ms["mouth"].append(stages["mouth"] / 1e6)
        result.ms["warp"].append(stages["warp"] / 1e6)
        result.ms["shade_blend"].append(stages["shade_blend"] / 1e6)
        result.ms["label"].append((t2 - t1) / 1e6)
        result.ms["watermark"].append((t3 - t2) / 1e6)
        result.ms["total"].append((t3 - t0) / 1e6)
        result.warped += int(stages["warp"] > 0)
    result.wall_s = time.perf_counter() - started
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--frames", type=int, default=500)
    parser.add_argument("--paced-frames", type=int, default=250)
    parser.add_argument("--write", action="store_true", help="update docs/performance.md")
    args = parser.parse_args()
    cv2.setNumThreads(1)

    portrait = np.ascontiguousarray(data.astronaut(),  # type: ignore[no-untyped-call]
                                    dtype=np.uint8)
    with tempfile.TemporaryDirectory() as cache:
        avatar = prepare_avatar(portrait, cache_dir=cache, progress=False)
    engine = LiteEngine(avatar)
    labeler = FrameLabeler(LabelConfig())
    marker = FrameWatermarker(payload_for("benchmark-generation-id"))
    audio = speech(args.frames)
    chunks = [audio[i * SPF:(i + 1) * SPF] for i in range(args.frames)]

    # One-off per source frame: the mesh, triangulation, fold check and blend weight; the
    # first time also loads OpenCV's and SciPy's modules.
    start = time.perf_counter()
    engine.warm_up()
    first_ms = (time.perf_counter() - start) * 1e3
    start = time.perf_counter()
    LiteEngine(avatar).warm_up()
    rig_ms = (time.perf_counter() - start) * 1e3
    weight = engine.blend_weight(0)
    rows, cols = np.flatnonzero(weight.any(axis=1)), np.flatnonzero(weight.any(axis=0))
    triangles = engine._rig(0).triangles.shape[0]   # internal, for the record only

    run(engine, labeler, marker, chunks[:50], speaking=True)        # warm-up
    engine.reset()
    speaking = run(engine, labeler, marker, chunks, speaking=True)
    engine.reset()
    idle = run(engine, labeler, marker, chunks, speaking=False)
    engine.reset()
    paced = run(engine, labeler, marker, chunks[:args.paced_frames], speaking=True,
                pace=1.0 / FPS) if args.paced_frames > 0 else Run()

    facts = (f"the mask's rectangle is {cols[-1] - cols[0] + 1}x{rows[-1] - rows[0] + 1} px; "
             f"up to {triangles} mesh triangles are rasterised per warped frame; "
             f"`LiteEngine.warm_up()` (per source frame, once) took {rig_ms:.1f} ms "
             f"({first_ms:.0f} ms the first time in the process, loading SciPy)")
    print(facts)
    print(f"speaking: {speaking.fps:.0f} fps over {args.frames} frames "
          f"({speaking.warped} warped), idle: {idle.fps:.0f} fps")
    for stage in STAGES:
        print(f"{stage:12s} speaking p50 {speaking.stat(stage, 50):6.3f} ms "
              f"p95 {speaking.stat(stage, 95):6.3f} ms | idle p50 {idle.stat(stage, 50):6.3f} "
              f"ms p95 {idle.stat(stage, 95):6.3f} ms | paced p50 "
              f"{paced.stat(stage, 50):6.3f} p95 {paced.stat(stage, 95):6.3f}")
    if args.write:
        write_report(args.frames, args.paced_frames, speaking, idle, paced, facts)
        print("written to docs/performance.md")


def write_report(frames: int, paced_frames: int, speaking: Run, idle: Run, paced: Run,
                 facts: str) -> None:
    def cell(r: Run, stage: str) -> str:
        return f"{r.stat(stage, 50):.3f} / {r.stat(stage, 95):.3f} ms"

    rows = "".join(
        f"| {STAGE_NAMES[s]} | {cell(speaking, s)} | {cell(idle, s)} | {cell(paced, s)} |\n"
        for s in STAGES)
    section = (
        "## Lite engine (weightless CPU lip sync)\n\n"
        f"Measured {datetime.now(UTC):%Y-%m-%d} on {machine()} by "
        "`python benchmarks/lite_engine.py --write`: the 512x512 astronaut portrait, one "
        "thread (OMP / OpenBLAS / MKL / numexpr threads set to 1 before numpy is imported, "
        "`cv2.setNumThreads(1)`), every frame `LiteEngine.render` + "
        "`FrameLabeler.apply_inplace` (default label) + `FrameWatermarker.embed_into`, as the "
        f"runner and recorder apply them. Audio: {frames} frames (25 fps, 16 kHz) of "
        "speech-like sound: 10-syllable phrases at 4.5 syllables/s with 0.5 s pauses, vowels "
        "as formant-shaped harmonics of a 120-180 Hz pitch, every third syllable led by an "
        "\"s\", -18 dBFS while voiced. Target: >= 60 fps at 512x512 on one core, label and "
        "watermark included.\n\n"
        "| run | frames | frames drawn with an open mouth | throughput (all stages) |\n"
        "| --- | --- | --- | --- |\n"
        f"| speaking, back to back | {frames} | {speaking.warped} | "
        f"{speaking.fps:.0f} fps |\n"
        f"| idle (`speaking=False`), back to back | {frames} | 0 | {idle.fps:.0f} fps |\n"
        f"| speaking, paced at 25 fps | {paced_frames} | {paced.warped} | "
        f"(real time) |\n\n"
        "Per stage, p50 / p95 over the run's frames (a speaking frame whose smoothed mouth is "
        "at rest, in pauses, skips warp and shading):\n\n"
        "| stage | speaking | idle | speaking, paced 25 fps |\n"
        "| --- | --- | --- | --- |\n"
        + rows
        + f"\nFacts: {facts}. The paced column pays this VM's cold-cache penalty for code "
        "that runs every 40 ms (see the control section above).\n"
    )
    write_section("## Lite engine (weightless CPU lip sync)", section)


if __name__ == "__main__":
    main()
