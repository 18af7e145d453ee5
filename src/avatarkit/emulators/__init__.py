"""Offline vendor emulators ("contract fakes") for tests and for ``avatarkit emulate``.

Each emulator is a stateful local HTTP + WebSocket server that speaks one vendor's wire contract,
meters what the vendor would bill, records what it was sent, and accepts injected faults through
Python (``emu.faults``) or its ``/_emulator/*`` control API::

    async with TavusEmulator(faces=["f1"], pals={"p1": "f1"}) as emu:
        ...  # point the SDK at emu.url with api key "test-key"

Vendors: ``tavus`` (:class:`TavusEmulator`), ``liveavatar`` (:class:`LiveAvatarEmulator`,
HeyGen LiveAvatar in LITE mode), ``simli`` (:class:`SimliEmulator`) and ``did``
(:class:`DIDEmulator`, D-ID Agents streams); the last two serve real WebRTC media, which needs
the ``webrtc`` extra.

Needs the ``emulators`` extra (aiohttp).
"""

from __future__ import annotations

import asyncio
import signal
from contextlib import AsyncExitStack
from typing import Protocol

from ._base import EmulatorFaults, EmulatorServer, RequestRecord
from .did import DIDAudio, DIDClip, DIDEmulator, DIDStream
from .liveavatar import (
    LiveAvatarEmulator,
    LiveAvatarSessionRecord,
    LiveAvatarUtterance,
    SpeakChunk,
)
from .simli import SimliEmulator, SimliSessionRecord
from .tavus import TavusConversation, TavusEmulator, TavusPal

__all__ = [
    "EMULATORS",
    "DIDAudio",
    "DIDClip",
    "DIDEmulator",
    "DIDStream",
    "EmulatorFactory",
    "EmulatorFaults",
    "EmulatorServer",
    "LiveAvatarEmulator",
    "LiveAvatarSessionRecord",
    "LiveAvatarUtterance",
    "RequestRecord",
    "SimliEmulator",
    "SimliSessionRecord",
    "SpeakChunk",
    "TavusConversation",
    "TavusEmulator",
    "TavusPal",
    "run_emulators",
]


class EmulatorFactory(Protocol):
    """Builds one emulator for ``run_emulators``."""

    def __call__(self, *, api_key: str, host: str, port: int,
                 max_concurrent: int) -> EmulatorServer: ...


def _tavus_for_cli(*, api_key: str, host: str, port: int, max_concurrent: int) -> EmulatorServer:
    # Command-line users cannot pre-register faces, so any face id exists.
    return TavusEmulator(api_keys=[api_key], host=host, port=port, accept_any_face=True,
                         max_concurrent=max_concurrent)


def _liveavatar_for_cli(
    *, api_key: str, host: str, port: int, max_concurrent: int
) -> EmulatorServer:
    # As for Tavus: command-line users cannot pre-register avatars, so any avatar id exists.
    return LiveAvatarEmulator(api_keys=[api_key], host=host, port=port, accept_any_face=True,
                              max_concurrent=max_concurrent)


def _simli_for_cli(*, api_key: str, host: str, port: int, max_concurrent: int) -> EmulatorServer:
    # As for Tavus: command-line users cannot pre-register faces, so any face id exists.
    return SimliEmulator(api_keys=[api_key], host=host, port=port, accept_any_face=True,
                         max_concurrent=max_concurrent)


def _did_for_cli(*, api_key: str, host: str, port: int, max_concurrent: int) -> EmulatorServer:
    # As for Tavus: command-line users cannot pre-register agents, so any agent id exists.
    return DIDEmulator(api_keys=[api_key], host=host, port=port, accept_any_agent=True,
                       max_concurrent=max_concurrent)


#: Emulators ``run_emulators`` can start, by vendor name (each emulator's ``name``, as its
#: ``/_emulator/state`` reports it). Error messages list them in this order.
EMULATORS: dict[str, EmulatorFactory] = {
    TavusEmulator.name: _tavus_for_cli,
    LiveAvatarEmulator.name: _liveavatar_for_cli,
    SimliEmulator.name: _simli_for_cli,
    DIDEmulator.name: _did_for_cli,
}


def run_emulators(
    names: list[str], *, host: str = "127.0.0.1", port: int = 0, api_key: str,
    max_concurrent: int = 10,
) -> None:
    """Serve the named emulators until SIGINT/SIGTERM, then close them cleanly (blocking).

    Prints one line per emulator (``tavus  http://127.0.0.1:PORT  (api key: ...)``). With a
    fixed ``port``, the n-th emulator listens on ``port + n``; ``port=0`` picks free ports.
    ``max_concurrent`` is each account's limit of open sessions (the vendor's plan limit).
    """
    valid = ", ".join(EMULATORS)
    if not names:
        raise ValueError(f"name at least one emulator; valid names: {valid}")
    if unknown := [name for name in names if name not in EMULATORS]:
        raise ValueError(f"unknown emulator(s) {unknown}; valid names: {valid}")
    if len(set(names)) != len(names):
        raise ValueError(f"each emulator may be named once, got {names}")
    if max_concurrent < 0:
        raise ValueError(f"max_concurrent must be >= 0, got {max_concurrent}")
    asyncio.run(_serve(names, host=host, port=port, api_key=api_key,
                       max_concurrent=max_concurrent))


async def _serve(names: list[str], *, host: str, port: int, api_key: str,
                 max_concurrent: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    try:
        async with AsyncExitStack() as stack:
            for offset, name in enumerate(names):
                emulator = EMULATORS[name](
                    api_key=api_key, host=host, port=port + offset if port else 0,
                    max_concurrent=max_concurrent,
                )
                await stack.enter_async_context(emulator)
                print(f"{name}  {emulator.url}  (api key: {api_key})", flush=True)
            await stop.wait()
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
