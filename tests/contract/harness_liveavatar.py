"""HeyGen LiveAvatar (LITE) under the contract suite."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from avatarkit.emulators import LiveAvatarEmulator
from avatarkit.emulators._base import EmulatorServer
from avatarkit.emulators.liveavatar import MAX_MESSAGE_BYTES

from .harness import FAST_RETRY, VendorHarness

API_KEY = "la-test-key-5c2e81"
AMELIA = "7b4c9d6e-1f2a-4e3b-9c8d-5a6f7e8d9c01"
BOB = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"


class LiveAvatarHarness(VendorHarness):
    name = "liveavatar"
    join_kind = "livekit"

    async def serve(self) -> AsyncIterator[EmulatorServer]:
        async with LiveAvatarEmulator(api_keys=[API_KEY], faces=[AMELIA, BOB]) as emulator:
            yield emulator

    def provider_settings(self, emulator: EmulatorServer) -> dict[str, Any]:
        return {"api_key": API_KEY, "base_url": emulator.url, "price_per_minute": "0.10",
                "retry": FAST_RETRY, "connect_timeout_s": 5}

    def avatar_ids(self) -> dict[str, str]:
        return {"amelia": AMELIA, "bob": BOB}

    def received_audio_seconds(self, emulator: EmulatorServer) -> float:
        assert isinstance(emulator, LiveAvatarEmulator)
        return sum(s.audio_seconds_received for s in emulator.sessions.values())

    def check_wire_format(self, emulator: EmulatorServer) -> None:
        """Nothing dropped (before ``connected`` or otherwise), every message under 1 MB,
        one event id per utterance, ~0.6 s first then ~1 s chunks, ``agent.speak_end`` sent
        for every utterance that played to its end. Durations are measured by the emulator
        at 24 kHz, so a wrong sample rate shows up as wrong chunk lengths."""
        assert isinstance(emulator, LiveAvatarEmulator)
        sessions = [s for s in emulator.sessions.values() if s.speak_chunks]
        assert sessions
        for session in sessions:
            assert session.protocol_errors == []
            assert session.messages_before_connected == 0
            assert all(c.message_bytes <= MAX_MESSAGE_BYTES for c in session.speak_chunks)
            for utterance in session.utterances:
                assert len(utterance.event_ids) == 1
                first, *rest = utterance.chunk_seconds
                assert first == pytest.approx(0.6, abs=0.001) or not rest
                assert all(c == pytest.approx(1.0, abs=0.001) for c in rest[:-1])
                assert all(c <= 1.0 + 1e-6 for c in rest)
                if utterance.outcome == "finished":
                    assert utterance.done and utterance.end_event_id == utterance.event_ids[0]

    def is_create(self, method: str, path: str) -> bool:
        # A LiveAvatar create is two calls: the token (unbilled) then the start (billed). The
        # token call is counted: it begins every create attempt, exactly once, and it is the
        # call the emulator's "create" faults (fail, rate_limit, slow) reach first.
        return method == "POST" and path == "/v1/sessions/token"
