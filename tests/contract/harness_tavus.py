"""Tavus under the contract suite."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from avatarkit.emulators import TavusEmulator
from avatarkit.emulators._base import EmulatorServer

from ..conftest import API_KEY, ECHO_PAL, FACE
from .harness import FAST_RETRY, VendorHarness


class TavusHarness(VendorHarness):
    name = "tavus"
    join_kind = "daily"

    async def serve(self) -> AsyncIterator[EmulatorServer]:
        emulator = TavusEmulator(api_keys=[API_KEY], faces=[FACE, "r_bob"])
        emulator.add_pal(ECHO_PAL, FACE)
        emulator.add_pal("p_echo_bob", "r_bob")
        async with emulator:
            yield emulator

    def provider_settings(self, emulator: EmulatorServer) -> dict[str, Any]:
        return {"api_key": API_KEY, "base_url": emulator.url, "channel": "websocket",
                "price_per_minute": "0.30", "retry": FAST_RETRY}

    def avatar_ids(self) -> dict[str, str]:
        return {"amelia": FACE, "bob": "r_bob"}

    def received_audio_seconds(self, emulator: EmulatorServer) -> float:
        assert isinstance(emulator, TavusEmulator)
        return sum(c.audio_seconds_received for c in emulator.conversations.values())

    def check_wire_format(self, emulator: EmulatorServer) -> None:
        assert isinstance(emulator, TavusEmulator)
        conversations = list(emulator.conversations.values())
        assert conversations and all(c.protocol_errors == [] for c in conversations)

    def is_create(self, method: str, path: str) -> bool:
        return method == "POST" and path == "/v2/conversations"
