"""Microseconds per 20 ms chunk through ``AvatarSession.send_audio`` (48 kHz -> 24 kHz).

The Tavus emulator runs in a separate process (``avatarkit emulate tavus``) so this process
measures only the SDK's send path: validation, streaming resampling, re-chunking to ~100 ms,
base64 + JSON, and the WebSocket write.

Two pacings are reported. "back-to-back": the next chunk follows at once (one loop turn in
between, so socket I/O still runs): the SDK's own cost with warm caches. "paced": one chunk
every 5 ms (4x real time) with the loop idle in between: on this VM any code run that
sparsely pays a large cold-cache penalty (a control in docs/performance.md: the same 15 us
of resampling costs ~110 us p50 when called every 5 ms), so this is what a sparse caller
sees here, not what the SDK's code costs.

    python benchmarks/send_audio.py [--chunks 3000] [--write]

``--write`` records the result in docs/performance.md (machine and date included).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
from _report import machine, percentile, write_section

from avatarkit import AudioChunk, AudioFormat, AudioResampler, AvatarKit, KitConfig
from avatarkit.consent import ConsentAuthority, IssuerKey, SQLiteConsentStore

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "bench-key"


def start_emulator(max_concurrent: int = 10) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "avatarkit.cli", "emulate", "tavus", "--api-key", API_KEY,
         "--max-concurrent", str(max_concurrent)],
        stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.search(r"(http://\S+)", line)
    if not match:
        proc.kill()
        raise RuntimeError(f"emulator did not print its URL: {line!r}")
    return proc, match.group(1)




def chunks_48k(n: int) -> list[AudioChunk]:
    rate, step = 48_000, 960
    t = np.arange(n * step) / rate
    audio = (0.4 * np.sin(2 * np.pi * 200 * t)).astype(np.float32)
    return [AudioChunk.from_float(audio[i * step:(i + 1) * step], sample_rate=rate)
            for i in range(n)]


async def measure(url: str, n: int, interval: float) -> dict[str, float]:
    registry = ConsentAuthority(IssuerKey.generate(), issuer="https://consent.bench",
                                store=SQLiteConsentStore(":memory:"))
    now = datetime.now(UTC)
    async with registry:
        _, token = await registry.grant(
            audience="bench", avatars=["bench"], purposes=["benchmark"],
            subject={"subject_ref": "subj_bench"}, grantor={"grantor_ref": "subj_bench"},
            valid_from=now - timedelta(minutes=1), expires_at=now + timedelta(hours=1),
            evidence={"recording_sha256": "0" * 64, "storage_ref": "bench://none",
                      "challenge_phrase": "bench marks only"})
        config = KitConfig(
            providers={"tavus": {"api_key": API_KEY, "base_url": url, "channel": "websocket"}},
            avatars={"bench": {"tavus": "r_bench"}},
            consent={"audience": "bench", "issuers": [registry.issuer],
                     "jwks": registry.jwks()},
        )
        kit = AvatarKit(config, status_source=registry.source, consent_store=registry.store)
        return await _timed_session(kit, token, n, interval)


async def _timed_session(kit: AvatarKit, token: str, n: int,
                         interval: float) -> dict[str, float]:
    pcm = [c.to_pcm16() for c in chunks_48k(n)]
    timings: list[float] = []
    async with kit, kit.session("bench", consent=token, purpose="benchmark",
                                max_duration_s=600) as session:
        for warm in pcm[:50]:  # warm-up: first resampler/ws buffers
            await session.send_audio(AudioChunk.from_pcm16(warm, sample_rate=48_000))
        await session.end_utterance()
        next_at = time.perf_counter()
        for data in pcm:
            start = time.perf_counter_ns()
            await session.send_audio(AudioChunk.from_pcm16(data, sample_rate=48_000))
            timings.append((time.perf_counter_ns() - start) / 1000)
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        await session.end_utterance()
    return {"n": n, "mean": statistics.fmean(timings), "p50": percentile(timings, 50),
            "p95": percentile(timings, 95), "p99": percentile(timings, 99),
            "max": max(timings)}


def resample_only(n: int) -> dict[str, float]:
    resampler = AudioResampler(AudioFormat(24_000))
    chunks = chunks_48k(n)
    timings = []
    for chunk in chunks:
        start = time.perf_counter_ns()
        resampler.process(chunk)
        timings.append((time.perf_counter_ns() - start) / 1000)
    return {"p50": percentile(timings, 50), "p99": percentile(timings, 99)}




def row(label: str, r: dict[str, float]) -> str:
    return (f"| {label} | {int(r['n'])} | {r['mean']:.1f} us | {r['p50']:.1f} us | "
            f"{r['p95']:.1f} us | {r['p99']:.1f} us | {r['max']:.0f} us |\n")


def write_report(results: dict[str, dict[str, float]], resample: dict[str, float]) -> None:
    section = (
        "## send_audio: 20 ms chunk, 48 kHz -> 24 kHz, Tavus adapter\n\n"
        f"Measured {datetime.now(UTC):%Y-%m-%d} on {machine()} by "
        "`python benchmarks/send_audio.py --write` (emulator in a separate process, chunks "
        "back-to-back, then one every 5 ms). Target: p99 <= 200 us. \"back-to-back\" is the "
        "SDK's own cost with warm caches; \"paced\" adds this VM's cold-cache penalty for "
        "code that runs every few ms (see the control below).\n\n"
        "| pacing | chunks | mean | p50 | p95 | p99 | max |\n"
        "| --- | --- | --- | --- | --- | --- | --- |\n"
        + "".join(row(label, r) for label, r in results.items())
        + f"\nThe streaming resampler alone (48 -> 24 kHz, 20 ms): p50 {resample['p50']:.1f} us, "
        f"p99 {resample['p99']:.1f} us. Every fifth chunk completes a 100 ms Tavus "
        "message; its JSON is built from a per-utterance template with the base64 audio "
        "spliced in (a plain `json.dumps` of the message cost ~22 us more per send). Since "
        "failover, each chunk is also kept for replay (a reference in a bounded deque) and a "
        "send takes the session's switch lock: under 1 us together in isolation; A/B on the "
        "same VM run, p50 19.4 -> 23.2 us.\n"
    )
    write_section('## send_audio:', section)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=3000)
    parser.add_argument("--interval-ms", type=float, default=5.0)
    parser.add_argument("--write", action="store_true", help="update docs/performance.md")
    args = parser.parse_args()
    proc, url = start_emulator()
    results: dict[str, dict[str, float]] = {}
    try:
        for label, interval in (("back-to-back", 0.0), ("paced 5 ms", args.interval_ms / 1000)):
            results[label] = asyncio.run(measure(url, args.chunks, interval))
    finally:
        proc.terminate()
        proc.wait(10)
    resample = resample_only(args.chunks)
    for label, r in results.items():
        print(f"send_audio ({label}) over {int(r['n'])} chunks: mean {r['mean']:.1f} us, "
              f"p50 {r['p50']:.1f} us, p95 {r['p95']:.1f} us, "
              f"p99 {r['p99']:.1f} us, max {r['max']:.0f} us")
    print(f"resampler alone: p50 {resample['p50']:.1f} us, p99 {resample['p99']:.1f} us")
    if args.write:
        write_report(results, resample)
        print("written to docs/performance.md")


if __name__ == "__main__":
    main()
