"""WHEP first frame: from the first 20 ms of speech to a decoded frame whose mouth moved.

On loopback, in one process: a real-time :class:`AvatarRunner` drives the lite engine on the
512x512 astronaut portrait (prepared once, in a temporary cache), with the disclosure label
burned into every frame; a task publishes its frames to an :class:`AvatarBroadcast` served by a
:class:`WhepEndpoint` on an aiohttp app; a :class:`WhepClient` is connected and receives the
idle stream. Each trial then pushes speech the way a streaming TTS does, 20 ms chunks in real
time (300 ms of a loud "ah": harmonics of 140 Hz under formant resonances), and measures from
the push of the *first* chunk to the first frame the client decodes whose mouth region
differs from the idle picture (mean absolute difference over the rectangle the engine changes
for an open mouth, above a threshold set between the decoded idle noise and the open-mouth
difference). The time at which the runner published the first speaking frame is recorded too,
which splits the latency into runner (waiting for a frame's audio, pacing, drawing) and
transport (VP8 encode, RTP over loopback, jitter buffer, decode). Between trials the stream
returns to idle. Target: p50 and p95 <= 150 ms.

    python benchmarks/whep_first_frame.py [--trials 20] [--write]

``--write`` records the result in docs/performance.md (machine and date included).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import numpy.typing as npt
from _report import machine, percentile, write_section
from aiohttp import web
from skimage import data

from avatarkit.disclosure.label import FrameLabeler
from avatarkit.local_engine.avatar import prepare_avatar
from avatarkit.local_engine.lite import LiteEngine
from avatarkit.local_engine.runner import AvatarRunner, RunnerFrame
from avatarkit.media import AudioChunk
from avatarkit.transport.webrtc import AvatarBroadcast, WhepClient, WhepEndpoint

HEADING = "## WHEP first frame (local engine egress)"
CHUNK_S = 0.020
SPEECH_S = 0.300
TARGET_MS = 150.0

Frame = npt.NDArray[np.uint8]


def vowel(seconds: float, rate: int) -> npt.NDArray[np.int16]:
    """A loud, steady "ah" (formants 700 / 1200 / 2600 Hz on a 140 Hz pitch), -12 dBFS RMS."""
    t = np.arange(round(seconds * rate)) / rate
    signal = np.zeros_like(t)
    for k in range(1, int(7000 / 140)):
        f = 140.0 * k
        gain = sum(1.0 / (1.0 + ((f - c) / bw) ** 2)
                   for c, bw in ((700.0, 90.0), (1200.0, 110.0), (2600.0, 160.0))) / k
        signal += gain * np.sin(2 * np.pi * f * t)
    signal *= 10 ** (-12 / 20) / np.sqrt(np.mean(signal**2))
    return np.round(np.clip(signal, -1, 1) * 32767).astype(np.int16)


@dataclass
class Probe:
    """Where the mouth is and what counts as 'moved' in a decoded frame."""

    box: tuple[int, int, int, int]  # y0, y1, x0, x1
    idle: npt.NDArray[np.float32] | None = None
    threshold: float = 0.0
    open_diff: float = 0.0
    idle_noise: float = 0.0

    def diff(self, frame: Frame) -> float:
        assert self.idle is not None
        y0, y1, x0, x1 = self.box
        return float(np.abs(frame[y0:y1, x0:x1].astype(np.float32) - self.idle).mean())


@dataclass
class Trials:
    first_frame_ms: list[float] = field(default_factory=list)
    runner_ms: list[float] = field(default_factory=list)
    connect_ms: float = 0.0


async def run(trials: int) -> tuple[Trials, Probe]:
    portrait = np.ascontiguousarray(data.astronaut(),  # type: ignore[no-untyped-call]
                                    dtype=np.uint8)
    with tempfile.TemporaryDirectory() as cache:
        avatar = prepare_avatar(portrait, cache_dir=cache, progress=False)
    engine = LiteEngine(avatar)
    engine.warm_up()
    rate, spf = engine.sample_rate, engine.samples_per_frame
    speech = vowel(SPEECH_S, rate)

    # the rectangle an open mouth changes, and how much it changes there
    offline = LiteEngine(avatar)
    idle_frame = offline.render(np.zeros(spf, np.int16), source_index=0, speaking=False)
    offline.render(speech[:spf], source_index=0, speaking=True)
    open_frame = offline.render(speech[spf:2 * spf], source_index=0, speaking=True)
    changed = np.abs(open_frame.astype(np.int16) - idle_frame).max(axis=2) > 12
    rows, cols = np.flatnonzero(changed.any(axis=1)), np.flatnonzero(changed.any(axis=0))
    probe = Probe((int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1))
    y0, y1, x0, x1 = probe.box
    probe.open_diff = float(np.abs(open_frame[y0:y1, x0:x1].astype(np.float32)
                                   - idle_frame[y0:y1, x0:x1]).mean())

    labeler = FrameLabeler()
    runner = AvatarRunner(engine, realtime=True, post=labeler.apply_inplace)
    cast = AvatarBroadcast(fps=engine.fps, sample_rate=rate, width=engine.width,
                           height=engine.height)
    endpoint = WhepEndpoint(lambda s: cast if s == "bench" else None)
    app = web.Application()
    endpoint.add_routes(app)
    speaking_published: list[float] = []

    async def drain() -> None:
        async for item in runner.frames():
            if isinstance(item, RunnerFrame):
                cast.publish(item)
                if item.speaking:
                    speaking_published.append(time.perf_counter())

    decoded: list[tuple[float, Frame]] = []
    arrived = asyncio.Event()

    async def receive(client: WhepClient) -> None:
        async for frame in client.video_frames():
            decoded.append((time.perf_counter(), frame.data))
            del decoded[:-50]
            arrived.set()

    async def next_frame() -> tuple[float, Frame]:
        arrived.clear()
        await asyncio.wait_for(arrived.wait(), 5)
        return decoded[-1]

    result = Trials()
    pump = asyncio.create_task(drain())
    app_runner = web.AppRunner(app)
    await app_runner.setup()
    site = web.TCPSite(app_runner, "127.0.0.1", 0)
    await site.start()
    host, port = app_runner.addresses[0][:2]
    client = WhepClient(f"http://{host}:{port}/whep/bench", timeout=10)
    try:
        started = time.perf_counter()
        await client.connect()
        result.connect_ms = (time.perf_counter() - started) * 1e3
        reader = asyncio.create_task(receive(client))
        for _ in range(25):  # 1 s of idle: the encoder settles on the still picture
            await next_frame()
        probe.idle = decoded[-1][1][y0:y1, x0:x1].astype(np.float32)
        noise = [probe.diff((await next_frame())[1]) for _ in range(10)]
        probe.idle_noise = max(noise)
        probe.threshold = max(probe.idle_noise * 2 + 1.0, 0.25 * probe.open_diff)

        for _ in range(trials):
            quiet = 0
            while quiet < 8:  # back to idle for 8 frames in a row
                quiet = quiet + 1 if probe.diff((await next_frame())[1]) < probe.threshold \
                    else 0
            t0 = time.perf_counter()
            n = round(CHUNK_S * rate)
            for k in range(0, len(speech), n):  # 20 ms chunks, in real time
                if k:
                    await asyncio.sleep(max(0.0, t0 + k / rate - time.perf_counter()))
                await runner.push_audio(AudioChunk(speech[k:k + n], rate))
                if any(t >= t0 and probe.diff(f) >= probe.threshold for t, f in decoded):
                    break
            runner.end_utterance()
            while True:
                seen = [t for t, f in decoded if t >= t0 and probe.diff(f) >= probe.threshold]
                if seen:
                    break
                await next_frame()
            result.first_frame_ms.append((seen[0] - t0) * 1e3)
            published = [t for t in speaking_published if t >= t0]
            result.runner_ms.append((published[0] - t0) * 1e3)
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
    finally:
        await client.aclose()
        await endpoint.aclose()
        await runner.aclose()
        await cast.aclose()
        pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pump
        await app_runner.cleanup()
    return result, probe


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--write", action="store_true", help="update docs/performance.md")
    args = parser.parse_args()
    result, probe = asyncio.run(run(args.trials))

    def stats(values: list[float]) -> str:
        return (f"p50 {percentile(values, 50):.0f} ms, p95 {percentile(values, 95):.0f} ms, "
                f"min {min(values):.0f}, max {max(values):.0f}")

    transport = [a - b for a, b in zip(result.first_frame_ms, result.runner_ms, strict=True)]
    print(f"connect (offer, POST, answer, ICE + DTLS): {result.connect_ms:.0f} ms")
    print(f"mouth probe: box {probe.box}, open-mouth diff {probe.open_diff:.1f}, decoded idle "
          f"noise {probe.idle_noise:.2f}, threshold {probe.threshold:.1f}")
    print(f"first frame after speech ({args.trials} trials): {stats(result.first_frame_ms)} "
          f"(target <= {TARGET_MS:.0f} ms)")
    print(f"  runner (first speaking frame published): {stats(result.runner_ms)}")
    print(f"  transport (encode, RTP, jitter buffer, decode): {stats(transport)}")
    if args.write:
        write_report(args.trials, result, transport, probe)
        print("written to docs/performance.md")


def write_report(trials: int, result: Trials, transport: list[float], probe: Probe) -> None:
    def row(name: str, values: list[float]) -> str:
        return (f"| {name} | {percentile(values, 50):.0f} ms | {percentile(values, 95):.0f} ms "
                f"| {min(values):.0f} ms | {max(values):.0f} ms |\n")

    section = (
        f"{HEADING}\n\n"
        f"Measured {datetime.now(UTC):%Y-%m-%d} on {machine()} by "
        "`python benchmarks/whep_first_frame.py --write`: on loopback in one process, a "
        "`WhepClient` receives a `WhepEndpoint` serving a real-time `AvatarRunner` (lite "
        "engine, 512x512 astronaut, label burned in, 25 fps) that is idle; each trial pushes "
        "speech as a streaming TTS would (20 ms chunks in real time, a loud \"ah\") and times "
        "from the first chunk to the first decoded frame whose mouth moved (mean absolute "
        "difference from the decoded idle picture over the mouth's rectangle "
        f"{probe.box[3] - probe.box[2]}x{probe.box[1] - probe.box[0]} px above "
        f"{probe.threshold:.1f}; idle noise {probe.idle_noise:.2f}, open mouth "
        f"{probe.open_diff:.1f}). Target: <= {TARGET_MS:.0f} ms.\n\n"
        f"| {trials} trials | p50 | p95 | min | max |\n"
        "| --- | --- | --- | --- | --- |\n"
        + row("first frame with the mouth moved", result.first_frame_ms)
        + row("runner: first speaking frame published", result.runner_ms)
        + row("transport: VP8 encode, RTP, jitter buffer, decode", transport)
        + f"\nConnecting (offer, POST, answer, ICE and DTLS on loopback) took "
        f"{result.connect_ms:.0f} ms. The runner's share includes waiting for a whole frame's "
        "audio (40 ms at 25 fps, two 20 ms chunks) and the real-time pacing slot of the "
        "next frame.\n"
    )
    write_section(HEADING, section)


if __name__ == "__main__":
    main()
