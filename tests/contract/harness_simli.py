"""Simli under the contract suite (peer-to-peer WebRTC transport: frames reach this process)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from avatarkit.emulators._base import EmulatorServer
from avatarkit.emulators.simli import FRAME_BYTES, TOKEN_PATH, SimliEmulator

from .harness import FAST_RETRY, VendorHarness

API_KEY = "smli-test-key-4b2e"
AMELIA = "face-amelia"
BOB = "face-bob"


class SimliHarness(VendorHarness):
    name = "simli"
    join_kind = "webrtc"
    frames_in_process = True

    async def serve(self) -> AsyncIterator[EmulatorServer]:
        async with SimliEmulator(api_keys=[API_KEY], faces=[AMELIA, BOB]) as emulator:
            yield emulator

    def provider_settings(self, emulator: EmulatorServer) -> dict[str, Any]:
        return {"api_key": API_KEY, "base_url": emulator.url, "transport": "p2p",
                "price_per_minute": "0.20", "retry": FAST_RETRY}

    def avatar_ids(self) -> dict[str, str]:
        return {"amelia": AMELIA, "bob": BOB}

    def received_audio_seconds(self, emulator: EmulatorServer) -> float:
        assert isinstance(emulator, SimliEmulator)
        return sum(s.audio_seconds_received for s in emulator.sessions.values())

    def check_wire_format(self, emulator: EmulatorServer) -> None:
        assert isinstance(emulator, SimliEmulator)
        sessions = [s for s in emulator.sessions.values() if s.frame_sizes]
        assert sessions, "no audio reached the emulator"
        for session in sessions:
            assert session.protocol_errors == []
            # binary PCM16 16 kHz mono in 6000-byte frames; only an utterance's last is shorter
            assert all(size % 2 == 0 and 0 < size <= FRAME_BYTES for size in session.frame_sizes)
            assert session.audio_frames == 1 or FRAME_BYTES in session.frame_sizes

    def is_create(self, method: str, path: str) -> bool:
        return method == "POST" and path == TOKEN_PATH
