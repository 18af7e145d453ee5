"""Shared fixtures: a Tavus emulator on a free loopback port, and kits configured for it.

Every test that uses the emulator fails if it leaves a vendor session open (billing leak).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import pytest

from avatarkit import AudioChunk, AvatarKit, AvatarSession, KitConfig, SessionEvent
from avatarkit.emulators import TavusEmulator

API_KEY = "tvs-test-key-7d1c9e"
FACE = "r_amelia"
ECHO_PAL = "p_echo_amelia"
FAST_RETRY = {"max_retries": 3, "initial_backoff": 0.01, "max_backoff": 0.05}


@pytest.fixture
async def tavus_emulator() -> AsyncIterator[TavusEmulator]:
    emulator = TavusEmulator(api_keys=[API_KEY], faces=[FACE, "r_bob"])
    emulator.add_pal(ECHO_PAL, FACE)
    async with emulator:
        yield emulator
        leaked = emulator.open_sessions
        assert leaked == 0, f"the test left {leaked} vendor session(s) open at the emulator"


KitFactory = Callable[..., AvatarKit]


@pytest.fixture
def make_kit(tavus_emulator: TavusEmulator) -> KitFactory:
    """Build a kit for the emulator; keyword arguments override ``[providers.tavus]`` keys."""

    def factory(**tavus: Any) -> AvatarKit:
        session = tavus.pop("session", {})
        settings: dict[str, Any] = {
            "api_key": API_KEY,
            "base_url": tavus_emulator.url,
            "channel": "websocket",
            "pal_id": ECHO_PAL,
            "price_per_minute": "0.30",
            "retry": FAST_RETRY,
        }
        settings.update(tavus)
        settings = {k: v for k, v in settings.items() if v is not None}
        return AvatarKit(KitConfig(providers={"tavus": settings},
                                   avatars={"amelia": {"tavus": FACE}, "bob": {"tavus": "r_bob"}},
                                   session=session))

    return factory


def speech(seconds: float, rate: int = 48_000, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    mono = (0.4 * np.sin(2 * np.pi * 180 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t)))
    mono = mono.astype(np.float32)
    return np.stack([mono] * channels, axis=1) if channels > 1 else mono


async def send_speech(session: AvatarSession, seconds: float, *, rate: int = 48_000,
                      channels: int = 1, chunk_ms: int = 20) -> None:
    """Send ``seconds`` of audio in ``chunk_ms`` chunks as fast as the session takes them."""
    audio = speech(seconds, rate, channels)
    step = rate * chunk_ms // 1000
    for offset in range(0, len(audio), step):
        await session.send_audio(
            AudioChunk.from_float(audio[offset:offset + step], sample_rate=rate,
                                  channels=channels))


async def next_event(events: AsyncIterator[SessionEvent], kind: str,
                     within: float = 5.0) -> SessionEvent:
    """The next event of type ``kind`` from an ``events()`` stream (waits ``within`` seconds)."""
    async with asyncio.timeout(within):
        async for event in events:
            if event.type == kind:
                return event
    raise AssertionError(f"the event stream ended without a {kind!r} event")


def sdk_tasks(before: set[asyncio.Task[Any]]) -> list[asyncio.Task[Any]]:
    """Tasks started since ``before`` that belong to the SDK (not the emulator's server)."""
    leftover = []
    for task in asyncio.all_tasks() - before:
        if task.done() or task is asyncio.current_task():
            continue
        code = getattr(task.get_coro(), "cr_code", None)
        filename = code.co_filename if code else ""
        if "/aiohttp/" in filename or "/emulators/" in filename:
            continue
        leftover.append(task)
    return leftover
