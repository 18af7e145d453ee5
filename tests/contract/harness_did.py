"""D-ID Agents streams under the contract suite (WebRTC offer from D-ID: frames reach this
process; audio goes as uploaded WAV clips)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from avatarkit.emulators._base import EmulatorServer
from avatarkit.emulators.did import DIDEmulator

from .harness import FAST_RETRY, VendorHarness

API_KEY = "did-test-key-3f9a1c"
AMELIA = "agt_amelia_Q2h9"
BOB = "agt_bob_Zx71"
#: small clips: a long utterance starts playing (and the drop fault fires) within a second
MAX_CLIP_S = 0.5


class DIDHarness(VendorHarness):
    name = "did"
    join_kind = "webrtc"
    frames_in_process = True

    async def serve(self) -> AsyncIterator[EmulatorServer]:
        async with DIDEmulator(api_keys=[API_KEY], agents=[AMELIA, BOB]) as emulator:
            yield emulator

    def provider_settings(self, emulator: EmulatorServer) -> dict[str, Any]:
        # fluent: only fluent D-ID streams can be interrupted
        return {"api_key": API_KEY, "base_url": emulator.url, "fluent": True,
                "max_clip_s": MAX_CLIP_S, "price_per_minute": "0.25", "retry": FAST_RETRY,
                "connect_timeout_s": 5}

    def avatar_ids(self) -> dict[str, str]:
        return {"amelia": AMELIA, "bob": BOB}

    def received_audio_seconds(self, emulator: EmulatorServer) -> float:
        """Seconds of uploaded audio D-ID was asked to speak."""
        assert isinstance(emulator, DIDEmulator)
        return sum(s.audio_seconds_received for s in emulator.streams.values())

    def check_wire_format(self, emulator: EmulatorServer) -> None:
        """Every upload a 16 kHz mono PCM16 WAV of at most ``max_clip_s``; every clip spoken
        was an upload of this emulator; nothing the stream received was refused."""
        assert isinstance(emulator, DIDEmulator)
        audios = list(emulator.audios.values())
        assert audios, "no audio was uploaded"
        for audio in audios:
            assert (audio.sample_rate, audio.channels) == (16_000, 1)
            assert audio.content_type == "audio/wav"
            assert audio.duration <= MAX_CLIP_S + 1e-6
        streams = [s for s in emulator.streams.values() if s.clips]
        assert streams
        for stream in streams:
            assert stream.protocol_errors == []
            assert all(clip.kind == "audio" and clip.audio_id in emulator.audios
                       for clip in stream.clips)
            assert stream.ice_candidates and stream.end_of_candidates == 1
        # nothing spoken that was not uploaded (an interrupt may drop an upload unspoken)
        spoken = sum(s.audio_seconds_received for s in streams)
        assert spoken <= sum(a.duration for a in audios) + 1e-6

    def is_create(self, method: str, path: str) -> bool:
        parts = path.strip("/").split("/")
        return method == "POST" and len(parts) == 3 and parts[0] == "agents" \
            and parts[2] == "streams"
