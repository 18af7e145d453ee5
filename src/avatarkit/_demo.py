"""``avatarkit demo``: a scripted session against the offline Tavus emulator.

No keys, no network: it starts the emulator on loopback, configures a kit for it in code,
speaks two utterances (the second one interrupted) and prints the route, the events and the
billed time, then checks that the emulator has nothing left open.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import numpy as np

from ._config import KitConfig
from .events import Closed, SessionEvent
from .kit import AvatarKit
from .media import AudioChunk
from .session import AvatarSession

__all__ = ["run_demo", "speech_like"]

DEMO_KEY = "demo-key"
DEMO_FACE = "r_demo_amelia"
PRICE_PER_MINUTE = "0.32"  # illustrative; Tavus' list price is not published


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


async def run_demo(*, json_lines: bool = False) -> int:
    from .emulators import TavusEmulator

    print("avatarkit demo: a scripted session against the offline Tavus emulator")
    async with TavusEmulator(api_keys=[DEMO_KEY], faces=[DEMO_FACE]) as emulator:
        print(f"emulator   {emulator.url}")
        config = KitConfig(
            providers={"tavus": {"api_key": DEMO_KEY, "base_url": emulator.url,
                                 "channel": "websocket", "price_per_minute": PRICE_PER_MINUTE}},
            avatars={"amelia": {"display_name": "Amelia", "tavus": DEMO_FACE}},
        )
        t0 = time.monotonic()
        async with AvatarKit(config) as kit, kit.session("amelia", purpose="demo") as session:
            print("route      " + session.route.explain().replace("\n", "\n           "))
            join = session.join
            print(f"join       {join.kind} {join.url}")
            print(f"disclosure {join.disclosure.label}: {join.disclosure.notice}")
            printer = asyncio.create_task(_print_events(session.events(), t0, json_lines))

            first = speech_like(1.2)
            await _stream(session, first, sample_rate=48_000)
            await session.end_utterance()
            await asyncio.sleep(1.6)  # let it finish speaking

            second = speech_like(3.0, f0=120.0)
            await _stream(session, second, sample_rate=48_000, stop_after=1.5)
            position = await session.interrupt()
            print(f"interrupt  stopped at {position:.2f} s into the second utterance")
        await printer
        billed = session.billed_seconds
        print(f"billed     {billed:.2f} s on {session.provider} "
              f"(${float(PRICE_PER_MINUTE) * billed / 60:.4f} at ${PRICE_PER_MINUTE}/min)")
        print(f"vendor     {emulator.open_sessions} open sessions, "
              f"{emulator.billed_seconds:.2f} s billed by the emulator")
        return 0 if emulator.open_sessions == 0 else 1


async def _print_events(events: AsyncIterator[SessionEvent], t0: float,
                        json_lines: bool) -> None:
    async for event in events:
        if json_lines:
            print(event.model_dump_json())
        else:
            details = event.model_dump(exclude={"session_id", "at", "type", "join"},
                                       exclude_none=True)
            text = " ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in details.items())
            print(f"event      +{time.monotonic() - t0:5.2f}s {event.type:<15} {text}")
        if isinstance(event, Closed):
            return
