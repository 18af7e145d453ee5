"""Quick start: one avatar session, offline, against the bundled Tavus emulator.

Run it with ``python examples/quickstart.py``. Every session needs the consent token of the
person the avatar shows; here an in-process ``ConsentAuthority`` plays the consent registry.
With a real Tavus account, drop the emulator, set ``api_key = "env:TAVUS_API_KEY"`` and a real
face id, use ``channel = "daily"``, and point ``[consent]`` at your registry's keys.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import numpy as np

from avatarkit import AudioChunk, AvatarKit, KitConfig
from avatarkit.consent import ConsentAuthority, IssuerKey, SQLiteConsentStore
from avatarkit.emulators import TavusEmulator


async def main() -> None:
    registry = ConsentAuthority(IssuerKey.generate(), issuer="https://consent.example",
                                store=SQLiteConsentStore(":memory:"))
    async with registry, TavusEmulator(api_keys=["demo"], faces=["r_amelia"]) as emulator:
        now = datetime.now(UTC)
        _, token = await registry.grant(
            audience="quickstart", avatars=["amelia"], purposes=["support"],
            subject={"subject_ref": "subj_amelia"}, grantor={"grantor_ref": "subj_amelia"},
            valid_from=now, expires_at=now + timedelta(hours=1),
            evidence={"recording_sha256": "0" * 64, "storage_ref": "vault://amelia.mp4",
                      "challenge_phrase": "seven quiet herons"})
        kit = AvatarKit(KitConfig(
            providers={"tavus": {"api_key": "demo", "base_url": emulator.url,
                                 "channel": "websocket"}},
            avatars={"amelia": {"tavus": "r_amelia"}},
            consent={"audience": "quickstart", "issuers": [registry.issuer],
                     "jwks": registry.jwks()},
        ), status_source=registry.source, consent_store=registry.store)
        async with kit, kit.session("amelia", consent=token, purpose="support") as session:
            print(session.route.explain())
            print("viewers join:", session.join.kind, session.join.url)
            tone = (0.3 * np.sin(np.arange(24_000) / 24_000 * 2 * np.pi * 220)).astype(np.float32)
            for i in range(0, tone.size, 480):  # 20 ms chunks at 24 kHz
                await session.send_audio(AudioChunk.from_float(tone[i:i + 480],
                                                               sample_rate=24_000))
            await session.end_utterance()
            async for event in session.events():
                print(event.type, event.model_dump(exclude={"session_id", "at", "type"}))
                if event.type == "speech_ended":
                    break
        print(f"billed {session.billed_seconds:.2f} s; emulator open sessions: "
              f"{emulator.open_sessions}")


if __name__ == "__main__":
    asyncio.run(main())
