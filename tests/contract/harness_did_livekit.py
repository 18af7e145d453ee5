"""D-ID ``sessions/join`` under the contract suite: D-ID's avatar joins a room on our LiveKit
server (the in-process :class:`~avatarkit.emulators.livekit.LiveKitServerEmulator`); audio goes
as ``lk.audio_stream`` byte streams, interrupts as ``lk.clear_buffer``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from avatarkit.emulators._base import EmulatorServer
from avatarkit.emulators.did import DIDEmulator
from avatarkit.emulators.livekit import LiveKitServerEmulator

from .harness import FAST_RETRY, VendorHarness
from .harness_did import AMELIA, API_KEY, BOB

SAMPLE_RATE = 24_000


class DIDLiveKitHarness(VendorHarness):
    name = "did-livekit"
    join_kind = "livekit"
    frames_in_process = False

    def __init__(self) -> None:
        self._servers: dict[int, LiveKitServerEmulator] = {}

    async def serve(self) -> AsyncIterator[EmulatorServer]:
        async with LiveKitServerEmulator() as livekit, DIDEmulator(
                api_keys=[API_KEY], agents=[AMELIA, BOB]) as emulator:
            self._servers[id(emulator)] = livekit
            try:
                yield emulator
            finally:
                del self._servers[id(emulator)]

    def livekit(self, emulator: EmulatorServer) -> LiveKitServerEmulator:
        return self._servers[id(emulator)]

    def provider_settings(self, emulator: EmulatorServer) -> dict[str, Any]:
        livekit = self.livekit(emulator)
        return {"kind": "did", "transport": "livekit", "api_key": API_KEY,
                "base_url": emulator.url, "livekit_url": livekit.url,
                "livekit_api_key": livekit.api_key, "livekit_api_secret": livekit.api_secret,
                "livekit_sample_rate": SAMPLE_RATE, "price_per_minute": "0.25",
                "retry": FAST_RETRY, "connect_timeout_s": 5}

    def avatar_ids(self) -> dict[str, str]:
        return {"amelia": AMELIA, "bob": BOB}

    def received_audio_seconds(self, emulator: EmulatorServer) -> float:
        assert isinstance(emulator, DIDEmulator)
        return sum(s.audio_seconds_received
                   for s in emulator.room_sessions.sessions.values())

    def check_wire_format(self, emulator: EmulatorServer) -> None:
        """D-ID's avatar joined with the token we minted (kind agent, on behalf of our
        identity); audio came as 24 kHz mono PCM16 byte streams in SDK-sized chunks; nothing
        was refused."""
        assert isinstance(emulator, DIDEmulator)
        sessions = list(emulator.room_sessions.sessions.values())
        assert sessions, "no sessions/join reached the emulator"
        for session in sessions:
            assert session.sample_rate == SAMPLE_RATE
            claims = session.token_claims
            assert claims["sub"] == "d-id-avatar-agent" and claims["kind"] == "agent"
            assert claims["attributes"] == {"lk.publish_on_behalf": "avatarkit-agent"}
            assert claims["video"]["room"] == session.room and claims["video"]["roomJoin"]
            assert session.all_protocol_errors == []
            assert session.worker is not None
            for segment in session.worker.segments:
                assert segment.received_bytes % 2 == 0
                assert all(0 < size <= 15_000 for size in segment.chunk_sizes)

    def is_create(self, method: str, path: str) -> bool:
        return method == "POST" and path.startswith("/v2/agents/") \
            and path.endswith("/sessions/join")
