"""The provider contract, once for every vendor: the same AvatarSession behaviour over each
adapter, against each vendor's emulator, over real sockets.

A vendor joins by adding its :class:`~tests.contract.harness.VendorHarness` to ``HARNESSES``.
Every test ends with the emulator's open-session counter at 0 (the ``emulator`` fixture
checks it), fault-injection tests included.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import pytest

from avatarkit import (
    AuthenticationError,
    AvatarKit,
    AvatarSession,
    CapabilityError,
    Closed,
    Interrupted,
    KitConfig,
    ProviderConnectionError,
    ProviderSwitched,
    SessionStateError,
    SpeechEnded,
    SpeechStarted,
    UsageUpdated,
)
from avatarkit.consent.authority import ConsentAuthority
from avatarkit.emulators._base import EmulatorServer

from ..conftest import CONSENT, consent_config, eventually, next_event, sdk_tasks, send_speech
from .harness import VendorHarness
from .harness_did import DIDHarness
from .harness_did_livekit import DIDLiveKitHarness
from .harness_liveavatar import LiveAvatarHarness
from .harness_local import LocalEngineHarness
from .harness_simli import SimliHarness
from .harness_tavus import TavusHarness

HARNESSES: list[VendorHarness] = [TavusHarness(), LiveAvatarHarness(), SimliHarness(),
                                  DIDHarness(), DIDLiveKitHarness(), LocalEngineHarness()]

KitMaker = Callable[..., AvatarKit]


@pytest.fixture(params=HARNESSES, ids=lambda h: h.name)
def harness(request: pytest.FixtureRequest) -> VendorHarness:
    assert isinstance(request.param, VendorHarness)
    return request.param


async def _serve(harness: VendorHarness, label: str) -> AsyncIterator[EmulatorServer]:
    async for emulator in harness.serve():
        yield emulator
        leaked = emulator.open_sessions
        assert leaked == 0, f"{harness.name}: the test left {leaked} session(s) open at {label}"


@pytest.fixture
async def emulator(harness: VendorHarness) -> AsyncIterator[EmulatorServer]:
    async for served in _serve(harness, "the emulator"):
        yield served


@pytest.fixture
async def second_emulator(harness: VendorHarness) -> AsyncIterator[EmulatorServer]:
    """The same vendor again (a second account or region), configured as ``<name>-b``."""
    async for served in _serve(harness, "the second emulator"):
        yield served


@pytest.fixture
def contract_kit(harness: VendorHarness, emulator: EmulatorServer,
                 consent_authority: ConsentAuthority) -> KitMaker:
    """A kit for the vendor's emulator. ``settings=`` overrides provider keys, ``second=``
    adds ``<name>-b`` on another emulator; other keywords are config sections."""

    def factory(*, settings: dict[str, Any] | None = None,
                second: EmulatorServer | None = None, **sections: Any) -> AvatarKit:
        name = harness.name
        providers = {name: {**harness.provider_settings(emulator), **(settings or {})}}
        avatars = {avatar: {name: face} for avatar, face in harness.avatar_ids().items()}
        if second is not None:
            providers[f"{name}-b"] = {"kind": name, **harness.provider_settings(second)}
            for avatar, face in harness.avatar_ids().items():
                avatars[avatar][f"{name}-b"] = face
        sections.setdefault("session", {})
        sections["metering"] = {"ledger": ":memory:", **sections.get("metering", {})}
        config = KitConfig(providers=providers, avatars=avatars, consent=consent_config(),
                           **sections)
        return AvatarKit(config, status_source=consent_authority.source,
                         consent_store=consent_authority.store)

    return factory


def _open(kit: AvatarKit) -> AvatarSession:
    return kit.session("amelia", consent=CONSENT, purpose="support")


async def _speak_until_closed(s: AvatarSession, events: AsyncIterator[Any]) -> Closed:
    """Keep speaking until the session closes (a fault ends it); return the Closed event."""
    closed: asyncio.Task[Any] = asyncio.create_task(next_event(events, "closed", within=10))
    try:
        for _ in range(200):
            if closed.done():
                break
            with contextlib.suppress(ProviderConnectionError, SessionStateError):
                await send_speech(s, 0.1)
            await asyncio.sleep(0.05)
        event = await closed
    finally:
        closed.cancel()
    assert isinstance(event, Closed)
    return event


async def test_full_session(harness: VendorHarness, emulator: EmulatorServer,
                            contract_kit: KitMaker) -> None:
    before = asyncio.all_tasks()
    async with contract_kit() as kit:
        async with _open(kit) as s:
            events = s.events()
            assert s.provider == harness.name
            assert s.join.kind == harness.join_kind
            assert s.join.disclosure.ai_generated and s.join.disclosure_notice
            await send_speech(s, 0.8)
            await s.end_utterance()
            started = await next_event(events, "speech_started", within=5)
            ended = await next_event(events, "speech_ended", within=8)
            assert isinstance(started, SpeechStarted) and isinstance(ended, SpeechEnded)
            assert started.utterance_id == ended.utterance_id and not ended.interrupted
            assert started.provider == harness.name
        closed = await next_event(events, "closed")
        assert isinstance(closed, Closed) and closed.vendor_ended
        assert closed.billed_seconds is not None and closed.billed_seconds > 0
        # the audio arrived whole, in the vendor's own format
        assert harness.received_audio_seconds(emulator) == pytest.approx(0.8, abs=0.1)
        harness.check_wire_format(emulator)
        assert emulator.open_sessions == 0 and emulator.billed_seconds > 0
        rows = await kit.ledger.rows(session_id=s.session_id)
        assert [r.state for r in rows] == ["ended"]
    await asyncio.sleep(0)
    assert sdk_tasks(before) == []


async def test_usage_is_reported_with_a_final_figure(contract_kit: KitMaker) -> None:
    async with contract_kit() as kit:
        async with _open(kit) as s:
            events = s.events()
            await asyncio.sleep(0.2)
        final = None
        async for event in events:
            if isinstance(event, UsageUpdated) and event.final:
                final = event
        assert final is not None and final.billed_seconds > 0
        assert final.cost is not None and final.cost > 0


async def test_interrupt_is_acknowledged_with_a_position(harness: VendorHarness,
                                                         contract_kit: KitMaker) -> None:
    async with contract_kit() as kit, _open(kit) as s:
        events = s.events()
        await send_speech(s, 3.0)
        await s.end_utterance()
        await next_event(events, "speech_started", within=5)
        await asyncio.sleep(0.3)
        began = time.monotonic()
        position = await s.interrupt()
        assert time.monotonic() - began < 2.0
        interrupted = await next_event(events, "interrupted")
        assert isinstance(interrupted, Interrupted) and interrupted.acknowledged
        assert 0.0 < position < 3.0
        # the session keeps working after an interrupt
        await send_speech(s, 0.4)
        await s.end_utterance()
        await next_event(events, "speech_started", within=5)


async def test_a_mute_vendor_does_not_hang_an_interrupt(harness: VendorHarness,
                                                        emulator: EmulatorServer,
                                                        contract_kit: KitMaker) -> None:
    harness.mute_interrupts(emulator)
    async with contract_kit(session={"interrupt_ack_timeout": 0.4}) as kit, _open(kit) as s:
        events = s.events()
        await send_speech(s, 3.0)
        await s.end_utterance()
        await next_event(events, "speech_started", within=5)
        began = time.monotonic()
        position = await s.interrupt()
        assert time.monotonic() - began < 1.5
        interrupted = await next_event(events, "interrupted")
        assert isinstance(interrupted, Interrupted) and not interrupted.acknowledged
        assert position >= 0.0


async def test_a_dropped_channel_mid_utterance_is_a_typed_error(
        harness: VendorHarness, emulator: EmulatorServer, contract_kit: KitMaker) -> None:
    harness.drop_channel_after(emulator, 0.3)
    pinned = {"pinned": {"objective": "config-order", "failover": False}}
    async with contract_kit(policies=pinned) as kit, kit.session(
            "amelia", consent=CONSENT, purpose="support", policy="pinned") as s:
        events = s.events()
        closed = await _speak_until_closed(s, events)
        assert closed.error is not None and closed.reason.startswith("vendor:")
    # the vendor session, still billed after a drop, was ended by us (fixture checks 0 open)
    assert emulator.open_sessions == 0


async def test_a_dropped_channel_fails_over_to_the_same_vendor_elsewhere(
        harness: VendorHarness, emulator: EmulatorServer, second_emulator: EmulatorServer,
        contract_kit: KitMaker) -> None:
    harness.drop_channel_after(emulator, 0.3)
    async with contract_kit(second=second_emulator) as kit, _open(kit) as s:
        events = s.events()
        switched_task = asyncio.create_task(next_event(events, "provider_switched", within=10))
        for _ in range(100):
            if switched_task.done():
                break
            with contextlib.suppress(ProviderConnectionError):
                await send_speech(s, 0.1)
            await asyncio.sleep(0.05)
        switched = await switched_task
        assert isinstance(switched, ProviderSwitched)
        assert (switched.from_provider, switched.to_provider) == (harness.name,
                                                                 f"{harness.name}-b")
        assert emulator.open_sessions == 0  # the dead session was ended at its vendor
        await send_speech(s, 0.3)
        await s.end_utterance()
        await next_event(events, "speech_ended", within=8)
        assert harness.received_audio_seconds(second_emulator) >= 0.29


async def test_an_error_inside_the_session_block_ends_the_vendor_session(
        emulator: EmulatorServer, contract_kit: KitMaker) -> None:
    async with contract_kit() as kit:
        with pytest.raises(RuntimeError, match="app failure"):
            async with _open(kit) as s:
                await send_speech(s, 0.2)
                assert emulator.open_sessions == 1
                raise RuntimeError("app failure")
        assert emulator.open_sessions == 0
        await s.aclose()  # idempotent


async def test_cancelling_a_start_leaves_nothing_open(harness: VendorHarness,
                                                      emulator: EmulatorServer,
                                                      contract_kit: KitMaker) -> None:
    # the vendor acts on the create while its answer is slow: the caller gives up meanwhile
    emulator.faults.slow_next(1, 0.5, route="create")
    async with contract_kit() as kit:
        s = _open(kit)
        start = asyncio.create_task(s.start())
        await eventually(lambda: harness.creates(emulator) >= 1)
        start.cancel()
        with pytest.raises(asyncio.CancelledError):
            await start
        # the start ran on in the background and what it created was ended
        await eventually(lambda: emulator.billed_seconds > 0 and emulator.open_sessions == 0,
                         within=10)
        for _ in range(100):
            (row,) = await kit.ledger.rows(session_id=s.session_id)
            if row.terminal:
                break
            await asyncio.sleep(0.05)
        assert row.state == "ended" and "cancelled" in (row.end_reason or "")


async def test_bad_credentials_are_a_typed_error_and_leave_nothing_open(
        harness: VendorHarness, emulator: EmulatorServer, contract_kit: KitMaker) -> None:
    async with contract_kit(settings=harness.bad_credentials()) as kit:
        with pytest.raises(AuthenticationError) as raised:
            await _open(kit).start()
        assert raised.value.provider == harness.name
        assert "not-the-right-key" not in str(raised.value)
    assert emulator.open_sessions == 0 and emulator.billed_seconds == 0


async def test_frames_reach_the_process_soon_after_the_first_audio(
        harness: VendorHarness, contract_kit: KitMaker) -> None:
    if not harness.frames_in_process:
        async with contract_kit() as kit, _open(kit) as s:
            with pytest.raises(CapabilityError, match="video frames"):
                s.video()
        return
    async with contract_kit() as kit, _open(kit) as s:
        frames = s.video()
        first_audio = time.monotonic()
        await send_speech(s, 2.0)
        await s.end_utterance()
        openings: list[float] = []
        async with asyncio.timeout(3.0):
            async for frame in frames:
                openings.append(harness.mouth_opening(frame.data))
                if len(openings) >= 25:
                    break
        assert time.monotonic() - first_audio < 3.0
        # the audio reached the renderer: the mouth opened for it
        assert max(openings) > 0.5 and float(np.median(openings[:3])) < max(openings)
