"""``avatarkit demo --vendor-emulator``: a scripted session against the offline Tavus emulator.

No keys, no network: it starts the emulator on loopback and an in-process consent registry,
records Amelia's consent and issues a token for it, configures a kit for both in code, speaks
two utterances (the second one interrupted), then revokes the consent while the session is
live: the session ends with ``consent_revoked``, and the same token is refused afterwards. It
prints the route, the disclosure, the events, the billed time and the generation log, then
checks that the emulator has nothing left open.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import numpy as np

from ..config import KitConfig
from ..errors import ConsentViolation
from ..events import Closed, SessionEvent
from ..kit import AvatarKit
from ..media import AudioChunk
from ..session import AvatarSession

if TYPE_CHECKING:
    from ..consent.authority import ConsentAuthority

__all__ = ["run_vendor_demo", "speech_like"]

_DEMO_KEY = "demo-key"
_DEMO_ISSUER = "https://consent.demo.invalid"
_DEMO_AUDIENCE = "avatarkit-demo"
_DEMO_FACE = "r_demo_amelia"
_PRICE_PER_MINUTE = "0.32"  # illustrative; Tavus' list price is not published


def speech_like(seconds: float, *, sample_rate: int = 48_000, f0: float = 140.0) -> np.ndarray:
    """Float audio that sounds like voiced speech: a harmonic source, two formants, syllables."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    pitch = f0 * (1 + 0.05 * np.sin(2 * np.pi * 0.7 * t))
    phase = 2 * np.pi * np.cumsum(pitch) / sample_rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 12))
    formants = 1 + 0.6 * np.sin(2 * np.pi * 3.5 * t) * np.sin(phase * 5)
    syllables = np.clip(np.sin(2 * np.pi * 4.0 * t), 0, None) ** 0.6
    audio = 0.25 * voice * formants * syllables
    return np.asarray(audio / max(1e-9, float(np.abs(audio).max())) * 0.6, dtype=np.float32)


async def _stream(session: AvatarSession, audio: np.ndarray, *, sample_rate: int,
                  stop_after: float | None = None) -> None:
    """Send ``audio`` in 20 ms chunks at real-time pace (as a TTS stream would)."""
    step = sample_rate // 50
    started = time.monotonic()
    for i, offset in enumerate(range(0, audio.size, step)):
        if stop_after is not None and offset / sample_rate >= stop_after:
            return
        chunk = AudioChunk.from_float(audio[offset:offset + step], sample_rate=sample_rate)
        await session.send_audio(chunk)
        await asyncio.sleep(max(0.0, started + (i + 1) * 0.02 - time.monotonic()))


async def _demo_consent(authority: ConsentAuthority) -> tuple[str, str]:
    """Amelia's recorded consent: her avatar, for demos, on Tavus, for a day."""
    now = datetime.now(UTC)
    grant, token = await authority.grant(
        audience=_DEMO_AUDIENCE,
        subject={"subject_ref": "subj_amelia_demo", "display_name": "Amelia (demo)"},
        grantor={"role": "self", "grantor_ref": "subj_amelia_demo"},
        avatars=["amelia"], vendor_ids={"tavus": [_DEMO_FACE]}, purposes=["demo"],
        channels=["live"], providers=["tavus"],
        valid_from=now - timedelta(minutes=1), expires_at=now + timedelta(days=1),
        evidence={"recording_sha256": "0" * 64, "storage_ref": "demo://consent/amelia.mp4",
                  "challenge_phrase": "copper heron twelve"},
    )
    return grant.consent_id, token


async def run_vendor_demo(*, json_lines: bool = False) -> int:
    from ..consent.authority import ConsentAuthority
    from ..consent.keys import IssuerKey
    from ..consent.store import SQLiteConsentStore
    from ..disclosure.notice import verify_disclosure_notice
    from ..emulators import TavusEmulator

    print("avatarkit demo: a scripted session against the offline Tavus emulator")
    authority = ConsentAuthority(IssuerKey.generate(), issuer=_DEMO_ISSUER,
                                 store=SQLiteConsentStore(":memory:"), status_ttl_s=1)
    async with authority, TavusEmulator(api_keys=[_DEMO_KEY], faces=[_DEMO_FACE]) as emulator:
        print(f"emulator   {emulator.url}")
        consent_id, token = await _demo_consent(authority)
        print(f"consent    {consent_id} recorded; token issued by {_DEMO_ISSUER}")
        config = KitConfig(
            providers={"tavus": {"api_key": _DEMO_KEY, "base_url": emulator.url,
                                 "channel": "websocket", "price_per_minute": _PRICE_PER_MINUTE}},
            avatars={"amelia": {"display_name": "Amelia", "tavus": _DEMO_FACE,
                                "consent_subject": "subj_amelia_demo"}},
            consent={"audience": _DEMO_AUDIENCE, "issuers": [_DEMO_ISSUER],
                     "jwks": authority.jwks(), "recheck_interval_s": 0.5},
            # the demo's emulator dies with it: nothing for a reaper to find later
            metering={"ledger": ":memory:"},
        )
        t0 = time.monotonic()
        kit = AvatarKit(config, status_source=authority.source, consent_store=authority.store)
        async with kit:
            async with kit.session("amelia", consent=token, purpose="demo") as session:
                route = session.route.explain().replace("\n", "\n           ")
                print(f"route      {route}")
                join = session.join
                print(f"join       {join.kind} {join.url}")
                assert join.disclosure_notice is not None
                shown = verify_disclosure_notice(join.disclosure_notice, kit.disclosure_keys())
                print(f"disclosure {shown.label}: {shown.notice} (signed notice verified; "
                      f"consent {shown.consent_id}, generation {shown.generation_id})")
                printer = asyncio.create_task(_print_events(session.events(), t0, json_lines))

                first = speech_like(1.2)
                await _stream(session, first, sample_rate=48_000)
                await session.end_utterance()
                await asyncio.sleep(1.6)  # let it finish speaking

                second = speech_like(3.0, f0=120.0)
                await _stream(session, second, sample_rate=48_000, stop_after=1.5)
                position = await session.interrupt()
                print(f"interrupt  stopped at {position:.2f} s into the second utterance")

                await authority.revoke(consent_id, reason="subject withdrew consent (demo)")
                print("revoke     consent revoked at the registry; the session must end")
                await printer
            try:
                async with kit.session("amelia", consent=token, purpose="demo"):
                    pass
            except ConsentViolation as exc:
                print(f"refused    a new session with the same token: {exc.check} ({exc})")
        log = await authority.store.generations(consent_id)
        print(f"log        {len(log)} generation-log entries under {consent_id}: "
              + ", ".join(sorted({r.kind for r in log})))
        billed = session.billed_seconds
        print(f"billed     {billed:.2f} s on {session.provider} "
              f"(${float(_PRICE_PER_MINUTE) * billed / 60:.4f} at ${_PRICE_PER_MINUTE}/min)")
        print(f"vendor     {emulator.open_sessions} open sessions, "
              f"{emulator.billed_seconds:.2f} s billed by the emulator")
        return 0 if emulator.open_sessions == 0 else 1


async def _print_events(events: AsyncIterator[SessionEvent], t0: float,
                        json_lines: bool) -> None:
    async for event in events:
        if json_lines:
            print(event.model_dump_json())
        else:
            details = event.model_dump(
                exclude={"session_id", "at", "type", "join", "disclosure", "disclosure_notice"},
                exclude_none=True)
            text = " ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in details.items())
            print(f"event      +{time.monotonic() - t0:5.2f}s {event.type:<15} {text}")
        if isinstance(event, Closed):
            return
