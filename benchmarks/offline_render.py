"""Offline render: seconds of wall time to lip-sync ``--seconds`` of speech into a disclosed MP4.

The whole ``avatarkit render`` path as a user runs it, minus the process start: consent
verification (a demo registry), avatar preparation from a warm cache, the lite engine drawing
as fast as it can, label + watermark + H.264 (x264 ``veryfast``) + AAC encoding, the C2PA
signature and the generation-log entry. The speech is the bundled eSpeak NG clip, looped to
``--seconds``; the avatar the bundled 512x512 portrait, or with ``--canvas 1920x1080`` that
portrait in the middle of a grey canvas of that size (renders keep the media's resolution, so
this is what a full-HD photo costs). ``--runs`` renders are timed (the first one after a
warm-up render). Target on this machine: 10 s of speech in <= 3 s (512x512).

    python benchmarks/offline_render.py [--seconds 10] [--runs 3] [--canvas WxH] [--write]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from _report import machine, percentile, write_section
from PIL import Image

from avatarkit.consent.demo import DemoConsent
from avatarkit.disclosure.certs import generate_signing_credentials
from avatarkit.media import AudioChunk
from avatarkit.render import RenderResult, read_speech, render_video
from avatarkit.samples import sample_avatar_path, sample_speech_path

RATE = 16_000


def looped_speech(seconds: float) -> list[AudioChunk]:
    clip = np.concatenate([c.samples.reshape(-1) for c in read_speech(sample_speech_path())])
    total = round(seconds * RATE)
    audio = np.resize(clip, total)
    return [AudioChunk(audio[i:i + RATE], RATE) for i in range(0, total, RATE)]


def canvas_avatar(directory: Path, width: int, height: int) -> Path:
    """The bundled portrait centred on a grey ``width`` x ``height`` canvas, as a PNG."""
    portrait = Image.open(sample_avatar_path()).convert("RGB")
    if portrait.width > width or portrait.height > height:
        raise SystemExit(f"--canvas {width}x{height} is smaller than the portrait")
    canvas = Image.new("RGB", (width, height), (96, 96, 96))
    canvas.paste(portrait, ((width - portrait.width) // 2, (height - portrait.height) // 2))
    path = directory / f"canvas-{width}x{height}.png"
    canvas.save(path)
    return path


async def measure(seconds: float, runs: int,
                  canvas: tuple[int, int] | None = None) -> list[RenderResult]:
    speech = looped_speech(seconds)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        credentials = generate_signing_credentials(work / "signer")
        avatar = sample_avatar_path() if canvas is None else canvas_avatar(work, *canvas)
        async with DemoConsent("sample") as demo:
            for run in range(runs + 1):
                result = await render_video(
                    avatar=avatar, audio=speech, out=work / f"run{run}.mp4",
                    consent=demo.token, gate=demo.gate, purpose="demo", avatar_name="sample",
                    consent_subject=demo.subject_ref, credentials=credentials,
                    cache_dir=work / "cache", progress=False)
                if run > 0:  # run 0 prepares the avatar and warms the caches
                    results.append(result)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--canvas", metavar="WxH", help="the portrait on a canvas this size")
    parser.add_argument("--write", action="store_true", help="record in docs/performance.md")
    args = parser.parse_args()
    canvas = None
    if args.canvas:
        w, _, h = args.canvas.partition("x")
        canvas = (int(w), int(h))
    results = asyncio.run(measure(args.seconds, args.runs, canvas))
    elapsed = [r.elapsed_s for r in results]
    first = [r.first_frame_s * 1000 for r in results]
    fps = [r.render_fps for r in results]
    last = results[-1]
    print(f"offline render of {args.seconds:g} s of speech ({last.frames} frames, "
          f"{last.width}x{last.height}, {last.engine.name} engine), {len(results)} runs: "
          f"wall p50 {percentile(elapsed, 50):.2f} s (max {max(elapsed):.2f} s), "
          f"{percentile(fps, 50):.0f} frames/s, first frame p50 {percentile(first, 50):.1f} ms")
    if args.write and canvas is not None:
        heading = f"## Offline render at {canvas[0]}x{canvas[1]}"
        write_section(heading, (
            f"{heading}\n\n"
            f"Measured {datetime.now(UTC):%Y-%m-%d} on {machine()} by "
            f"`python benchmarks/offline_render.py --seconds {args.seconds:g} --runs "
            f"{args.runs} --canvas {args.canvas} --write`: as above, with the 512x512 portrait "
            f"in the middle of a grey {canvas[0]}x{canvas[1]} canvas. Renders keep the media's "
            "resolution (`--max-side` scales down), so the label, the watermark and the "
            "encoder work on every pixel of the full frame; the engine only on the face.\n\n"
            "| speech | frames | size | wall time p50 (max) | frames/s | first frame p50 |\n"
            "| --- | --- | --- | --- | --- | --- |\n"
            f"| {args.seconds:g} s | {last.frames} | {last.width}x{last.height} | "
            f"{percentile(elapsed, 50):.2f} s ({max(elapsed):.2f} s) | "
            f"{percentile(fps, 50):.0f} | {percentile(first, 50):.1f} ms |\n"))
    elif args.write:
        section = (
            "## Offline render (`avatarkit render`)\n\n"
            f"Measured {datetime.now(UTC):%Y-%m-%d} on {machine()} by "
            f"`python benchmarks/offline_render.py --seconds {args.seconds:g} --runs "
            f"{args.runs} --write`: the bundled 512x512 portrait speaking the bundled eSpeak "
            "NG clip looped to the length, through `render_video` as `avatarkit render` runs "
            "it (consent verified by a demo registry, prepared avatar from a warm cache, lite "
            "engine, label + watermark, H.264 `veryfast` crf 20 + AAC, C2PA-signed, logged). "
            "The engine and the encoder run on their own threads (2 cores). Target: 10 s of "
            "speech in <= 3 s.\n\n"
            "| speech | frames | wall time p50 (max) | frames/s | first frame p50 |\n"
            "| --- | --- | --- | --- | --- |\n"
            f"| {args.seconds:g} s | {last.frames} | {percentile(elapsed, 50):.2f} s "
            f"({max(elapsed):.2f} s) | {percentile(fps, 50):.0f} | "
            f"{percentile(first, 50):.1f} ms |\n")
        write_section("## Offline render (`avatarkit render`)", section)


if __name__ == "__main__":
    main()
