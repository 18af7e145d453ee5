"""Mid-session failover against two Tavus emulators: the live vendor session dies, the session
moves to the next allowed provider, replays the unplayed audio and says so."""

from __future__ import annotations

import asyncio

import pytest

from avatarkit import (
    AudioChunk,
    Closed,
    InvalidRequestError,
    ProviderConnectionError,
    ProviderSwitched,
)
from avatarkit.consent.authority import ConsentAuthority
from avatarkit.emulators import TavusEmulator

from ..conftest import (
    AUDIENCE,
    CONSENT,
    CONSENT_GRANT,
    KitFactory,
    creates,
    eventually,
    grant_fields,
    next_event,
    send_speech,
    speech,
)


async def test_dropped_channel_fails_over_and_replays_the_utterance(
        make_pair_kit: KitFactory, tavus_emulator: TavusEmulator,
        tavus_b: TavusEmulator) -> None:
    tavus_emulator.faults.drop_channel_after(0.5)
    async with make_pair_kit() as kit:
        async with kit.session("amelia", consent=CONSENT, purpose="support") as s:
            events = s.events()
            generation, consent_id = s.generation_id, s.disclosure.consent_id
            first_join = s.join
            await send_speech(s, 1.0)  # the channel drops half-way through
            await s.end_utterance()
            switched = await next_event(events, "provider_switched")
            assert isinstance(switched, ProviderSwitched)
            assert (switched.from_provider, switched.to_provider) == ("tavus", "tavus-b")
            assert "channel" in switched.reason
            assert switched.replayed_seconds > 0.4
            assert s.provider == "tavus-b" and s.providers_used == ["tavus", "tavus-b"]
            # same session, generation and consent; new join (with a new signed notice)
            assert s.generation_id == generation
            assert s.disclosure.consent_id == consent_id
            assert s.disclosure.provider == "tavus-b"
            assert switched.join.url != first_join.url
            assert switched.join.disclosure_notice == s.join.disclosure_notice
            assert switched.vendor_session_id == s.vendor_session_id

            (conv_a,) = tavus_emulator.conversations.values()
            (conv_b,) = tavus_b.conversations.values()
            # the old session was ended at its vendor (a dropped channel keeps it billed)
            assert conv_a.status == "ended"
            # the second vendor got the replayed part and the rest, under the same utterance
            (utterance,) = conv_a.audio_seconds_by_inference
            assert list(conv_b.audio_seconds_by_inference) == [utterance]
            assert conv_b.audio_seconds_received >= 0.9
            assert conv_b.done_inferences == [utterance]
        rows = await kit.ledger.rows(session_id=s.session_id)
        assert [(r.provider, r.state) for r in rows] == [("tavus", "ended"), ("tavus-b", "ended")]
        assert (rows[0].end_reason or "").startswith("failover")
        log = await kit.consent_store.generation(generation)
        assert "provider_switched" in [r.kind for r in log]


async def test_the_session_survives_and_keeps_speaking_after_the_switch(
        make_pair_kit: KitFactory, tavus_emulator: TavusEmulator,
        tavus_b: TavusEmulator) -> None:
    tavus_emulator.faults.drop_channel_after(0.2)
    async with make_pair_kit() as kit:
        async with kit.session("amelia", consent=CONSENT, purpose="support") as s:
            events = s.events()
            await send_speech(s, 0.4)
            await s.end_utterance()
            await next_event(events, "provider_switched")
            await send_speech(s, 0.3)  # a new utterance goes to the new provider
            await s.end_utterance()
            (conv_b,) = tavus_b.conversations.values()
            await eventually(lambda: len(conv_b.done_inferences) >= 2, within=2)
            billed = s.billed_seconds
        closed = [e async for e in s.events() if isinstance(e, Closed)]
        assert closed[0].reason == "closed" and closed[0].vendor_ended
        assert billed > 0


async def test_vendor_end_for_a_fixable_reason_fails_over(
        make_pair_kit: KitFactory, tavus_emulator: TavusEmulator,
        tavus_b: TavusEmulator) -> None:
    async with (make_pair_kit() as kit,
                kit.session("amelia", consent=CONSENT, purpose="support") as s):
        events = s.events()
        tavus_emulator.end_conversation(s.vendor_session_id or "", reason="internal_error")
        switched = await next_event(events, "provider_switched")
        assert isinstance(switched, ProviderSwitched)
        assert switched.reason == "internal_error" and switched.replayed_seconds == 0
        assert tavus_b.open_sessions == 1


async def test_a_lone_provider_fails_over_to_a_new_session_at_the_same_vendor(
        make_kit: KitFactory, tavus_emulator: TavusEmulator) -> None:
    async with make_kit() as kit, kit.session("amelia", consent=CONSENT,
                                              purpose="support") as s:
        events = s.events()
        first = s.vendor_session_id
        tavus_emulator.end_conversation(first or "", reason="internal_error")
        switched = await next_event(events, "provider_switched")
        assert isinstance(switched, ProviderSwitched)
        assert (switched.from_provider, switched.to_provider) == ("tavus", "tavus")
        assert switched.vendor_session_id != first == tavus_emulator.conversations[
            first or ""].conversation_id
        await send_speech(s, 0.2)
        await s.end_utterance()
        assert s.providers_used == ["tavus", "tavus"]


async def test_deliberate_vendor_end_does_not_fail_over(
        make_pair_kit: KitFactory, tavus_emulator: TavusEmulator,
        tavus_b: TavusEmulator) -> None:
    async with (make_pair_kit() as kit,
                kit.session("amelia", consent=CONSENT, purpose="support") as s):
        events = s.events()
        tavus_emulator.end_conversation(s.vendor_session_id or "",
                                        reason="max_call_duration")
        closed = await next_event(events, "closed")
        assert isinstance(closed, Closed) and "max_call_duration" in closed.reason
    assert creates(tavus_b) == 0


async def test_policy_without_failover_closes_the_session(
        make_pair_kit: KitFactory, tavus_emulator: TavusEmulator,
        tavus_b: TavusEmulator) -> None:
    tavus_emulator.faults.drop_channel_after(0.1)
    kit = make_pair_kit(policies={"pinned": {"objective": "config-order", "failover": False}})
    async with kit:
        session = kit.session("amelia", consent=CONSENT, purpose="support", policy="pinned")
        async with session as s:
            events = s.events()
            await send_speech(s, 0.3)
            closed = await next_event(events, "closed")
            assert isinstance(closed, Closed) and closed.reason.startswith("vendor:")
    assert creates(tavus_b) == 0
    assert tavus_emulator.open_sessions == 0


async def test_failover_never_moves_to_a_provider_the_consent_excludes(
        make_pair_kit: KitFactory, tavus_emulator: TavusEmulator, tavus_b: TavusEmulator,
        consent_authority: ConsentAuthority) -> None:
    _, eu_only = await consent_authority.grant(audience=AUDIENCE,
                                               **grant_fields(regions=["eu"]))
    tavus_emulator.faults.drop_channel_after(0.1)
    async with (make_pair_kit(a={"regions": ["eu"]}, b={"regions": ["us"]}) as kit,
                kit.session("amelia", consent=eu_only, purpose="support") as s):
        events = s.events()
        await send_speech(s, 0.3)
        closed = await next_event(events, "closed")
        assert isinstance(closed, Closed) and "failover failed" in closed.reason
        # new sessions at the same vendor, until health cooled it down; never tavus-b
        switches = [e async for e in s.events() if isinstance(e, ProviderSwitched)]
        assert all(e.to_provider == "tavus" for e in switches)
    assert creates(tavus_b) == 0


async def test_failover_never_moves_to_a_provider_the_policy_excludes(
        make_pair_kit: KitFactory, tavus_emulator: TavusEmulator,
        tavus_b: TavusEmulator) -> None:
    tavus_emulator.faults.drop_channel_after(0.1)
    kit = make_pair_kit(a={"regions": ["eu"]}, b={"regions": ["us"]},
                        policies={"eu": {"residency": ["eu"]}})
    async with kit, kit.session("amelia", consent=CONSENT, purpose="support", policy="eu") as s:
        events = s.events()
        await send_speech(s, 0.3)
        closed = await next_event(events, "closed")
        assert isinstance(closed, Closed) and "failover failed" in closed.reason
    assert creates(tavus_b) == 0


async def test_repeated_send_failures_fail_over_without_losing_audio(
        make_pair_kit: KitFactory, tavus_emulator: TavusEmulator, tavus_b: TavusEmulator,
        monkeypatch: pytest.MonkeyPatch) -> None:
    async with (make_pair_kit(session={"failover_after_send_failures": 3}) as kit,
                kit.session("amelia", consent=CONSENT, purpose="support") as s):
        events = s.events()
        await send_speech(s, 0.2)
        vendor = s._vendor
        assert vendor is not None

        async def broken(*args: object, **kwargs: object) -> None:
            raise ProviderConnectionError("send failed", provider="tavus")

        # the channel stays up (no vendor signal); only sends fail
        monkeypatch.setattr(vendor, "send_audio", broken)
        # (100 ms chunks: a 20 ms one may stay inside the resampler and send nothing)
        for _ in range(2):  # below the threshold: the caller sees the error
            with pytest.raises(ProviderConnectionError):
                await s.send_audio(chunk_of(0.1))
        await s.send_audio(chunk_of(0.1))  # the third: fails over, replayed, no error
        switched = await next_event(events, "provider_switched")
        assert isinstance(switched, ProviderSwitched)
        assert switched.reason == "3 consecutive send failures"
        # what was sent before plus the chunk that triggered the switch; the two
        # chunks whose errors the caller saw are not replayed (the caller owns them)
        assert 0.15 <= switched.replayed_seconds <= 0.301
        await s.end_utterance()
        (conv_b,) = tavus_b.conversations.values()
        await eventually(lambda: len(conv_b.done_inferences) == 1)
    assert tavus_emulator.open_sessions == 0


def chunk_of(seconds: float) -> AudioChunk:
    return AudioChunk.from_float(speech(seconds), sample_rate=48_000)


async def test_failover_rechecks_consent_first(
        make_pair_kit: KitFactory, tavus_emulator: TavusEmulator, tavus_b: TavusEmulator,
        consent_authority: ConsentAuthority) -> None:
    async with make_pair_kit(consent={"recheck_interval_s": 3600}) as kit, \
            kit.session("amelia", consent=CONSENT, purpose="support") as s:
        events = s.events()
        await consent_authority.revoke(CONSENT_GRANT.consent_id, reason="withdrawn")
        tavus_emulator.end_conversation(s.vendor_session_id or "", reason="internal_error")
        closed = await next_event(events, "closed")
        assert isinstance(closed, Closed) and "failover failed" in closed.reason
        kinds = [e.type async for e in s.events()]
        assert "consent_revoked" in kinds and "provider_switched" not in kinds
    assert creates(tavus_b) == 0


async def test_failover_keeps_the_session_duration_cap(
        make_pair_kit: KitFactory, tavus_emulator: TavusEmulator,
        tavus_b: TavusEmulator) -> None:
    async with make_pair_kit() as kit, kit.session("amelia", consent=CONSENT,
                                                   purpose="support", max_duration_s=60) as s:
        events = s.events()
        await asyncio.sleep(1.2)
        tavus_emulator.end_conversation(s.vendor_session_id or "", reason="internal_error")
        await next_event(events, "provider_switched")
        (conv_b,) = tavus_b.conversations.values()
        assert conv_b.properties["max_call_duration"] <= 58


async def test_close_during_a_failover_create_leaves_nothing_open(
        make_pair_kit: KitFactory, tavus_emulator: TavusEmulator,
        tavus_b: TavusEmulator) -> None:
    tavus_b.faults.slow_next(1, 0.5, route="create")
    async with make_pair_kit() as kit:
        s = kit.session("amelia", consent=CONSENT, purpose="support")
        await s.start()
        tavus_emulator.end_conversation(s.vendor_session_id or "", reason="internal_error")
        await eventually(lambda: creates(tavus_b) == 1)  # the failover's create is in flight
        await s.aclose()
        # the start runs on after we gave up on it, and what it created is ended
        await eventually(lambda: tavus_b.conversations != {} and all(
            c.status == "ended" for c in tavus_b.conversations.values()), within=5)
        for _ in range(100):
            (row,) = await kit.ledger.rows(session_id=s.session_id, provider="tavus-b")
            if row.terminal:
                break
            await asyncio.sleep(0.05)
        assert row.state == "ended" and "start cancelled" in (row.end_reason or "")


async def test_aclose_during_a_failing_start_reports_the_start_error(
        make_kit: KitFactory, tavus_emulator: TavusEmulator) -> None:
    tavus_emulator.faults.slow_next(1, 0.3, route="create")
    tavus_emulator.faults.fail_next_creates(1, status=400)
    async with make_kit() as kit:
        session = kit.session("amelia", consent=CONSENT, purpose="support")
        start = asyncio.create_task(session.start())
        await eventually(lambda: creates(tavus_emulator) == 1)
        await session.aclose()
        with pytest.raises(InvalidRequestError):
            await start
        assert session.state == "closed"
