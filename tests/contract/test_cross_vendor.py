"""One session across two vendors: a Tavus session dies mid-utterance and the same session
carries on at Simli (another wire, another audio format), with the unplayed audio replayed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from avatarkit import AvatarKit, KitConfig, ProviderSwitched
from avatarkit.consent.authority import ConsentAuthority
from avatarkit.emulators._base import EmulatorServer

from ..conftest import CONSENT, consent_config, next_event, send_speech
from .harness_simli import SimliHarness
from .harness_tavus import TavusHarness

TAVUS, SIMLI = TavusHarness(), SimliHarness()


@pytest.fixture
async def tavus() -> AsyncIterator[EmulatorServer]:
    async for emulator in TAVUS.serve():
        yield emulator
        assert emulator.open_sessions == 0


@pytest.fixture
async def simli() -> AsyncIterator[EmulatorServer]:
    async for emulator in SIMLI.serve():
        yield emulator
        assert emulator.open_sessions == 0


async def test_failover_moves_the_session_to_another_vendor_and_format(
        tavus: EmulatorServer, simli: EmulatorServer,
        consent_authority: ConsentAuthority) -> None:
    TAVUS.drop_channel_after(tavus, 0.5)
    config = KitConfig(
        providers={"tavus": TAVUS.provider_settings(tavus),
                   "simli": SIMLI.provider_settings(simli)},
        avatars={"amelia": {"tavus": TAVUS.avatar_ids()["amelia"],
                            "simli": SIMLI.avatar_ids()["amelia"]}},
        policies={"ordered": {"objective": "config-order"}},
        consent=consent_config(), metering={"ledger": ":memory:"})
    async with AvatarKit(config, status_source=consent_authority.source,
                         consent_store=consent_authority.store) as kit:
        async with kit.session("amelia", consent=CONSENT, purpose="support",
                               policy="ordered") as s:
            events = s.events()
            assert s.provider == "tavus" and s.join.kind == "daily"
            await send_speech(s, 1.2)  # Tavus' channel drops part-way through
            await s.end_utterance()
            switched = await next_event(events, "provider_switched", within=10)
            assert isinstance(switched, ProviderSwitched)
            assert (switched.from_provider, switched.to_provider) == ("tavus", "simli")
            assert switched.join.kind == "webrtc" and switched.replayed_seconds > 0.5
            # the rest of the utterance plays at Simli, resampled to its 16 kHz frames
            await next_event(events, "speech_ended", within=10)
            assert SIMLI.received_audio_seconds(simli) >= switched.replayed_seconds - 0.05
            SIMLI.check_wire_format(simli)
            frames = s.video()
            async with asyncio.timeout(3):
                frame = await anext(aiter(frames))
            assert frame.width > 0
        rows = await kit.ledger.rows(session_id=s.session_id)
        assert [(r.provider, r.state) for r in rows] == [("tavus", "ended"), ("simli", "ended")]
