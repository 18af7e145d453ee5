"""Routing cost per decision, and many concurrent sessions in one process.

1. **Decision**: ``kit.route(avatar, policy=...)`` with 10 configured providers (sections of
   kind tavus with different regions, prices and declared latencies, some unknown) and 3
   policies (residency + price cap + weighted objective; lexicographic; config order), with
   the health constraint and observed-latency EWMAs in play. Target: <= 100 us per decision.
2. **Concurrent sessions**: N sessions live at once in this process against the Tavus
   emulator running in another process (so its memory is not counted): each with its
   WebSocket channel, signal pump, consent watcher and meter task, its ledger row (SQLite
   file) and generation-log records. Reports resident memory per session (target: < 2 MB
   for 1000) and checks that closing them leaves no task behind and nothing open at the
   vendor.

    python benchmarks/route.py [--decisions 20000] [--sessions 1000] [--write]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import resource
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from _report import machine, percentile, write_section
from send_audio import API_KEY, start_emulator

from avatarkit import AvatarKit, KitConfig
from avatarkit.consent import ConsentAuthority, IssuerKey, SQLiteConsentStore

POLICIES: dict[str, dict[str, Any]] = {
    "eu-cheap": {"residency": ["eu", "self-hosted"], "max_price_per_minute": "0.50",
                 "require": ["interrupt"], "objective": "weighted",
                 "weights": {"latency": 1.0, "price": 2.0}},
    "fastest": {"objective": "lexicographic", "order": ["latency", "price"],
                "max_first_frame_latency_ms": 1500},
    "ordered": {"objective": "config-order", "providers_denied": ["tavus-9"]},
}


def providers(url: str, n: int) -> dict[str, dict[str, Any]]:
    regions = (["eu"], ["us"], ["eu", "us"], None)
    out: dict[str, dict[str, Any]] = {}
    for i in range(n):
        name = "tavus" if i == 0 else f"tavus-{i}"
        section: dict[str, Any] = {"api_key": API_KEY, "base_url": url, "channel": "websocket"}
        if i:
            section["kind"] = "tavus"
        if (region := regions[i % 4]) is not None:
            section["regions"] = region
        if i % 5 != 4:  # every fifth price unknown
            section["price_per_minute"] = f"0.{20 + 7 * i:02d}"
        section["first_frame_latency_ms"] = 300 + 97 * i
        out[name] = section
    return out


async def registry_and_token() -> tuple[ConsentAuthority, str]:
    registry = ConsentAuthority(IssuerKey.generate(), issuer="https://consent.bench",
                                store=SQLiteConsentStore(":memory:"))
    await registry.__aenter__()
    now = datetime.now(UTC)
    _, token = await registry.grant(
        audience="bench", avatars=["bench"], purposes=["benchmark"],
        subject={"subject_ref": "subj_bench"}, grantor={"grantor_ref": "subj_bench"},
        valid_from=now - timedelta(minutes=1), expires_at=now + timedelta(hours=2),
        evidence={"recording_sha256": "0" * 64, "storage_ref": "bench://none",
                  "challenge_phrase": "bench marks only"})
    return registry, token


def kit_for(url: str, registry: ConsentAuthority, ledger: str, *,
            n_providers: int) -> AvatarKit:
    names = list(providers(url, n_providers))
    config = KitConfig(
        providers=providers(url, n_providers),
        avatars={"bench": {name: "r_bench" for name in names}},
        policies=POLICIES if n_providers >= 10 else {},
        consent={"audience": "bench", "issuers": [registry.issuer], "jwks": registry.jwks()},
        metering={"ledger": ledger},
    )
    return AvatarKit(config, status_source=registry.source, consent_store=registry.store)


def decisions(url: str, registry: ConsentAuthority, n: int) -> dict[str, float]:
    kit = kit_for(url, registry, ":memory:", n_providers=10)
    for i, name in enumerate(kit.providers):  # observed latency for half of them
        if i % 2:
            kit._health.record_success(name, latency_ms=250.0 + 40 * i)
    policies = list(POLICIES)
    for i in range(500):  # warm-up
        kit.route("bench", policy=policies[i % 3])
    timings: list[float] = []
    for i in range(n):
        policy = policies[i % 3]
        start = time.perf_counter_ns()
        kit.route("bench", policy=policy)
        timings.append((time.perf_counter_ns() - start) / 1000)
    candidates = len(kit.route("bench", policy="eu-cheap").candidates)
    assert candidates == 10
    return {"n": n, "mean": statistics.fmean(timings), "p50": percentile(timings, 50),
            "p99": percentile(timings, 99)}


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def concurrent(url: str, n: int) -> dict[str, float]:
    registry, token = await registry_and_token()
    with tempfile.TemporaryDirectory() as tmp:
        kit = kit_for(url, registry, str(Path(tmp) / "sessions.db"), n_providers=1)
        async with kit:
            # one session first: imports, pools and caches are not per-session memory
            async with kit.session("bench", consent=token, purpose="benchmark"):
                pass
            gc.collect()
            tasks_before = len(asyncio.all_tasks())
            rss_before = rss_mib()
            gate = asyncio.Semaphore(64)
            sessions = [kit.session("bench", consent=token, purpose="benchmark")
                        for _ in range(n)]

            async def start(session: Any) -> None:
                async with gate:
                    await session.start()

            started = time.perf_counter()
            await asyncio.gather(*(start(s) for s in sessions))
            start_s = time.perf_counter() - started
            gc.collect()
            rss_live = rss_mib()
            tasks_live = len(asyncio.all_tasks())
            live = sum(1 for s in sessions if s.state == "live")
            closing = time.perf_counter()
            await asyncio.gather(*(s.aclose() for s in sessions))
            close_s = time.perf_counter() - closing
            await asyncio.sleep(0.2)
            tasks_after = len(asyncio.all_tasks())
            open_rows = len(await kit.ledger.rows(states=("creating", "open")))
        await registry.aclose()
    return {"n": n, "live": live, "start_s": start_s, "close_s": close_s,
            "per_session_mib": (rss_live - rss_before) / n, "rss_before": rss_before,
            "rss_live": rss_live, "tasks_per_session": (tasks_live - tasks_before) / n,
            "leaked_tasks": tasks_after - tasks_before, "open_rows": open_rows}


def write_report(d: dict[str, float], c: dict[str, float]) -> None:
    section = (
        "## Routing decisions and concurrent sessions\n\n"
        f"Measured {datetime.now(UTC):%Y-%m-%d} on {machine()} by "
        "`python benchmarks/route.py --write`.\n\n"
        "**Decision** (`kit.route`, 10 providers, 3 policies in rotation: residency + price "
        "cap + weighted; lexicographic with a latency cap; config order with a deny list; "
        "health constraint and observed-latency EWMAs on). Target: <= 100 us.\n\n"
        "| decisions | mean | p50 | p99 |\n| --- | --- | --- | --- |\n"
        f"| {int(d['n'])} | {d['mean']:.1f} us | {d['p50']:.1f} us | {d['p99']:.1f} us |\n\n"
        f"**{int(c['n'])} concurrent sessions in one process** against the Tavus emulator "
        "(separate process; each session: consent verified, ledger row in a SQLite file, "
        "WebSocket channel, pump, consent watcher and meter tasks). Target: < 2 MB each, "
        "no task left after close.\n\n"
        "| sessions live | resident memory per session | tasks per session | "
        "start all | close all | tasks left after close | ledger rows left open |\n"
        "| --- | --- | --- | --- | --- | --- | --- |\n"
        f"| {int(c['live'])} | {c['per_session_mib'] * 1024:.0f} KiB | "
        f"{c['tasks_per_session']:.1f} | {c['start_s']:.1f} s | {c['close_s']:.1f} s | "
        f"{int(c['leaked_tasks'])} | {int(c['open_rows'])} |\n\n"
        f"Resident memory went from {c['rss_before']:.0f} MiB to {c['rss_live']:.0f} MiB. "
        "Start-up is bound by this 2-core VM doing both ends' TLS-free HTTP + WebSocket "
        "handshakes, Ed25519 consent checks and fsync'd ledger writes.\n"
    )
    write_section("## Routing decisions", section)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decisions", type=int, default=20_000)
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--write", action="store_true", help="update docs/performance.md")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    proc, url = start_emulator(max_concurrent=args.sessions + 10)
    try:
        registry, _ = asyncio.run(registry_and_token())
        d = decisions(url, registry, args.decisions)
        print(f"route decision (10 providers, 3 policies) over {d['n']} decisions: "
              f"mean {d['mean']:.1f} us, p50 {d['p50']:.1f} us, p99 {d['p99']:.1f} us")
        c = asyncio.run(concurrent(url, args.sessions))
    finally:
        proc.terminate()
        proc.wait(30)
    print(f"concurrent sessions: {c['live']:.0f}/{c['n']:.0f} live, "
          f"{c['per_session_mib'] * 1024:.0f} KiB per session, "
          f"{c['tasks_per_session']:.1f} tasks per session, started in {c['start_s']:.1f} s, "
          f"closed in {c['close_s']:.1f} s, tasks left {c['leaked_tasks']:.0f}, "
          f"ledger rows open {c['open_rows']:.0f}")
    if c["leaked_tasks"] > 0 or c["open_rows"] or c["live"] != c["n"]:
        raise SystemExit("sessions leaked tasks or ledger rows, or did not all start")
    if args.write:
        write_report(d, c)
        print("written to docs/performance.md")


if __name__ == "__main__":
    main()
