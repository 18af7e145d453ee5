"""Microseconds to issue and verify a consent token (Ed25519 JWS via PyJWT).

"verify" is the full :class:`ConsentVerifier` path for a session start: parse, header checks,
signature, claims, scope against a request, and a status-list lookup from a warm cache (an
in-memory source; the signed list was fetched and verified once before timing). "status
refetch" is the cold path a checker pays once per list ``ttl``: fetch (in memory), verify the
list's signature and claims, inflate a 131 072-entry 2-bit list.

    python benchmarks/consent_tokens.py [--iterations 2000] [--write]

``--write`` records the result in docs/performance.md (machine and date included), replacing
only its own ``## Consent tokens`` section.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from _report import machine, write_section

from avatarkit.consent.grant import (
    ConsentEvidence,
    ConsentGrant,
    Grantor,
    LikenessSubject,
    StatusReference,
)
from avatarkit.consent.keys import IssuerKey, KeySet
from avatarkit.consent.status import (
    StaticStatusListSource,
    StatusChecker,
    StatusList,
    TokenStatus,
    issue_status_list_token,
)
from avatarkit.consent.tokens import ConsentRequest, ConsentVerifier, issue_consent_token

ROOT = Path(__file__).resolve().parents[1]
URI = "https://registry.example/status/1"
ISSUER = "https://registry.example"
AUDIENCE = "deploy-eu-1"
LIST_SIZE = 131_072

Stats = dict[str, float]


def summarize(timings_us: list[float]) -> Stats:
    cuts = statistics.quantiles(timings_us, n=100, method="inclusive")
    return {"n": len(timings_us), "mean": statistics.fmean(timings_us), "p50": cuts[49],
            "p99": cuts[98]}


def make_grant() -> ConsentGrant:
    now = datetime.now(UTC)
    return ConsentGrant(
        subject=LikenessSubject(subject_ref="subj_8f3a2c", display_name="Bench Person"),
        grantor=Grantor(grantor_ref="subj_8f3a2c"),
        avatars=["amelia"], vendor_ids={"tavus": ["r_amelia"]},
        purposes=["training_video", "customer_support_live"], languages=["en", "de"],
        providers=["tavus", "selfhosted"], regions=["eu"],
        valid_from=now - timedelta(days=1), expires_at=now + timedelta(days=365),
        evidence=ConsentEvidence(recording_sha256="ab" * 32, storage_ref="vault://rec/1",
                                 challenge_phrase="amber falcon ninety"),
        issuer=ISSUER, status=StatusReference(uri=URI, idx=4242))


def time_sync(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter_ns()
        fn()
        out.append((time.perf_counter_ns() - start) / 1000)
    return out


async def time_async(fn: Callable[[], Awaitable[object]], n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter_ns()
        await fn()
        out.append((time.perf_counter_ns() - start) / 1000)
    return out


async def measure(n: int) -> tuple[dict[str, Stats], int]:
    key = IssuerKey.generate()
    keys = KeySet.of(key)
    grant = make_grant()
    entries = StatusList(LIST_SIZE)
    entries[17] = TokenStatus.INVALID
    source = StaticStatusListSource()
    source.publish(URI, issue_status_list_token(entries, key, uri=URI, ttl_s=3600))
    checker = StatusChecker(keys, source)
    verifier = ConsentVerifier(keys, issuers=[ISSUER], audience=AUDIENCE, status=checker)
    request = ConsentRequest(avatar="amelia", purpose="training_video", language="en-GB",
                             provider="tavus", region="eu")

    def issue() -> str:
        return issue_consent_token(grant, key, audience=AUDIENCE)

    token = issue()
    for _ in range(50):  # warm-up: imports, caches, the status list fetched once
        issue()
        await verifier.verify(token, request)

    ref = grant.status
    assert ref is not None

    async def refetch() -> TokenStatus:
        checker.invalidate(URI)
        return await checker.status(ref)

    results = {
        "issue": summarize(time_sync(issue, n)),
        "verify (warm status cache)": summarize(
            await time_async(lambda: verifier.verify(token, request), n)),
        "status refetch (131 072 entries)": summarize(await time_async(refetch, max(n // 10,
                                                                                    20))),
    }
    return results, len(token)




def row(label: str, r: Stats) -> str:
    return f"| {label} | {int(r['n'])} | {r['mean']:.1f} us | {r['p50']:.1f} us | " \
           f"{r['p99']:.1f} us |\n"


def write_report(results: dict[str, Stats], token_length: int) -> None:
    section = (
        "## Consent tokens\n\n"
        f"Measured {datetime.now(UTC):%Y-%m-%d} on {machine()} by "
        "`python benchmarks/consent_tokens.py --write`. Ed25519 (EdDSA) compact JWS via "
        "PyJWT + cryptography. \"verify\" is the whole session-start check (header, "
        "signature, claims, scope against a request, status lookup in a warm cache); "
        "\"status refetch\" is what a checker pays once per list `ttl`.\n\n"
        "| operation | runs | mean | p50 | p99 |\n"
        "| --- | --- | --- | --- | --- |\n"
        + "".join(row(label, r) for label, r in results.items())
        + f"\nToken length: {token_length} characters (scope with 2 purposes, 7 default "
        "prohibited purposes, 2 providers, 1 region, a status reference).\n"
    )
    write_section('## Consent tokens', section)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--write", action="store_true", help="update docs/performance.md")
    args = parser.parse_args()
    results, token_length = asyncio.run(measure(args.iterations))
    for label, r in results.items():
        print(f"{label} over {int(r['n'])} runs: mean {r['mean']:.1f} us, "
              f"p50 {r['p50']:.1f} us, p99 {r['p99']:.1f} us")
    print(f"token length: {token_length} characters")
    if args.write:
        write_report(results, token_length)
        print("written to docs/performance.md")


if __name__ == "__main__":
    main()
