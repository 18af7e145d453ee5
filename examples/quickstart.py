"""Quick start: one avatar session, offline, against the bundled Tavus emulator.

Run it with ``python examples/quickstart.py``. With a real Tavus account, drop the emulator,
set ``api_key = "env:TAVUS_API_KEY"`` and a real face id, and use ``channel = "daily"``.
"""

from __future__ import annotations

import asyncio

import numpy as np

from avatarkit import AudioChunk, AvatarKit, KitConfig
from avatarkit.emulators import TavusEmulator


async def main() -> None:
    async with TavusEmulator(api_keys=["demo"], faces=["r_amelia"]) as emulator:
        kit = AvatarKit(KitConfig(
            providers={"tavus": {"api_key": "demo", "base_url": emulator.url,
                                 "channel": "websocket"}},
            avatars={"amelia": {"tavus": "r_amelia"}},
        ))
        async with kit, kit.session("amelia", purpose="support") as session:
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
