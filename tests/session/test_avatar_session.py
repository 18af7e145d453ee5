"""AvatarSession over the Tavus adapter, against the Tavus emulator over real sockets."""

from __future__ import annotations

import asyncio
import logging
import time
from decimal import Decimal

import pytest

from avatarkit import (
    AudioChunk,
    AuthenticationError,
    CapabilityError,
    Closed,
    ErrorCategory,
    Interrupted,
    NotFoundError,
    ProviderConnectionError,
    ServerError,
    SessionState,
    SessionStateError,
    SpeechEnded,
    SpeechStarted,
    UsageUpdated,
)
from avatarkit.consent.authority import ConsentAuthority
from avatarkit.emulators import TavusEmulator

from ..conftest import (
    API_KEY,
    AUDIENCE,
    CONSENT,
    ECHO_PAL,
    FACE,
    KitFactory,
    grant_fields,
    next_event,
    sdk_tasks,
    send_speech,
)


async def test_full_session(tavus_emulator: TavusEmulator, make_kit: KitFactory) -> None:
    async with make_kit() as kit, kit.session("amelia", consent=CONSENT, purpose="support") as s:
        assert s.state.value == "live"
        events = s.events()
        assert s.route.chosen == "tavus"
        assert s.join.kind == "daily"
        assert s.join.url is not None and s.join.url.startswith(tavus_emulator.url)
        assert s.join.disclosure.ai_generated
        assert s.join.disclosure.generation_id == s.generation_id
        assert s.join.disclosure.avatar == "amelia"

        await send_speech(s, 0.4)
        await s.end_utterance()
        started = await next_event(events, "speech_started")
        ended = await next_event(events, "speech_ended")
        assert isinstance(started, SpeechStarted) and isinstance(ended, SpeechEnded)
        assert started.utterance_id == ended.utterance_id and not ended.interrupted
        assert ended.duration == pytest.approx(0.4, abs=0.08)
        conversation = tavus_emulator.conversations[str(s.vendor_session_id)]
    assert conversation.status == "ended" and conversation.end_reason == "ended"
    assert conversation.face_id == FACE and conversation.pal_id == ECHO_PAL
    # 48 kHz in, 24 kHz on the wire, nothing lost: one inference, closed with done.
    assert list(conversation.audio_seconds_by_inference.values()) == [
        pytest.approx(0.4, abs=0.002)]
    assert conversation.done_inferences == [ended.utterance_id]
    assert conversation.protocol_errors == []
    assert s.state is SessionState.CLOSED
    history = [e async for e in s.events()]
    assert isinstance(history[-1], Closed) and history[-1].vendor_ended
    usage = [e for e in history if isinstance(e, UsageUpdated)][-1]
    assert usage.billed_seconds == pytest.approx(conversation.billed_seconds, abs=0.1)
    assert usage.cost == (Decimal(str(round(usage.billed_seconds, 3))) / 60
                          * Decimal("0.30")).quantize(Decimal("0.000001"))


async def test_each_utterance_has_its_own_inference_id(tavus_emulator: TavusEmulator,
                                                      make_kit: KitFactory) -> None:
    async with make_kit() as kit, kit.session("amelia", consent=CONSENT, purpose="support") as s:
        conversation_id = str(s.vendor_session_id)
        for _ in range(2):
            await send_speech(s, 0.2)
            await s.end_utterance()
        await s.end_utterance()  # nothing pending: a no-op, not an error
    conversation = tavus_emulator.conversations[conversation_id]
    assert len(conversation.audio_seconds_by_inference) == 2
    assert len(set(conversation.done_inferences)) == 2


async def test_any_input_format_is_converted(tavus_emulator: TavusEmulator,
                                            make_kit: KitFactory) -> None:
    async with make_kit() as kit, kit.session("amelia", consent=CONSENT, purpose="support") as s:
        conversation_id = str(s.vendor_session_id)
        await send_speech(s, 0.5, rate=16_000, channels=2)
        await s.end_utterance()
    conversation = tavus_emulator.conversations[conversation_id]
    assert conversation.audio_seconds_received == pytest.approx(0.5, abs=0.002)
    assert conversation.protocol_errors == []


async def test_interrupt_returns_the_acknowledged_position(tavus_emulator: TavusEmulator,
                                                           make_kit: KitFactory) -> None:
    async with make_kit() as kit, kit.session("amelia", consent=CONSENT, purpose="support") as s:
        events = s.events()
        await send_speech(s, 2.0)
        await next_event(events, "speech_started")
        await asyncio.sleep(0.5)
        t0 = time.monotonic()
        position = await s.interrupt()
        took = time.monotonic() - t0
        interrupted = await next_event(events, "interrupted")
        conversation = tavus_emulator.conversations[str(s.vendor_session_id)]
    assert isinstance(interrupted, Interrupted) and interrupted.acknowledged
    assert position == interrupted.playback_position
    assert 0.4 < position < 0.8
    assert took < 0.5  # the ack arrived; no timeout was needed
    assert conversation.interrupts == 1


async def test_interrupt_with_a_mute_vendor_returns_within_the_timeout(
        tavus_emulator: TavusEmulator, make_kit: KitFactory) -> None:
    tavus_emulator.faults.mute_interrupts = True
    async with make_kit(session={"interrupt_ack_timeout": 0.5}) as kit, \
            kit.session("amelia", consent=CONSENT, purpose="support") as s:
        events = s.events()
        await send_speech(s, 2.0)
        await next_event(events, "speech_started")
        await asyncio.sleep(0.3)
        t0 = time.monotonic()
        position = await s.interrupt()
        took = time.monotonic() - t0
        interrupted = await next_event(events, "interrupted")
    assert 0.5 <= took < 0.8
    assert isinstance(interrupted, Interrupted) and not interrupted.acknowledged
    assert 0.2 < position < 0.6  # our estimate: time since playback started, capped by audio


async def test_interrupt_when_silent_returns_zero_without_waiting(
        tavus_emulator: TavusEmulator, make_kit: KitFactory) -> None:
    async with make_kit() as kit, kit.session("amelia", consent=CONSENT, purpose="support") as s:
        t0 = time.monotonic()
        assert await s.interrupt() == 0.0
        assert time.monotonic() - t0 < 0.1


async def test_speaking_after_an_interrupt_starts_a_new_utterance(
        tavus_emulator: TavusEmulator, make_kit: KitFactory) -> None:
    async with make_kit() as kit, kit.session("amelia", consent=CONSENT, purpose="support") as s:
        events = s.events()
        await send_speech(s, 1.0)
        await next_event(events, "speech_started")
        await s.interrupt()
        await send_speech(s, 0.3)
        await s.end_utterance()
        second = await next_event(events, "speech_started")
        ended = await next_event(events, "speech_ended")
        assert ended.utterance_id == second.utterance_id  # type: ignore[union-attr]
        conversation = tavus_emulator.conversations[str(s.vendor_session_id)]
    assert len(conversation.audio_seconds_by_inference) == 2


async def test_close_ends_at_vendor_once_and_is_idempotent(tavus_emulator: TavusEmulator,
                                                          make_kit: KitFactory) -> None:
    async with make_kit() as kit:
        s = kit.session("amelia", consent=CONSENT, purpose="support")
        await s.start()
        conversation_id = str(s.vendor_session_id)
        assert tavus_emulator.open_sessions == 1
        await s.aclose()
        await s.aclose()
        assert tavus_emulator.open_sessions == 0
    ends = [r for r in tavus_emulator.requests if r.path.endswith(f"{conversation_id}/end")]
    assert len(ends) == 1
    assert tavus_emulator.conversations[conversation_id].status == "ended"


async def test_exception_in_body_still_ends_at_vendor_and_leaves_no_task(
        tavus_emulator: TavusEmulator, make_kit: KitFactory) -> None:
    before = asyncio.all_tasks()
    kit = make_kit()
    with pytest.raises(RuntimeError, match="app bug"):
        async with kit, kit.session("amelia", consent=CONSENT, purpose="support") as s:
            await send_speech(s, 0.3)
            raise RuntimeError("app bug")
    assert tavus_emulator.open_sessions == 0
    assert s.state is SessionState.CLOSED
    await asyncio.sleep(0)
    assert sdk_tasks(before) == []


async def test_no_task_left_after_a_normal_session(tavus_emulator: TavusEmulator,
                                                   make_kit: KitFactory) -> None:
    before = asyncio.all_tasks()
    async with make_kit() as kit, kit.session("amelia", consent=CONSENT, purpose="support") as s:
        events = s.events()
        await send_speech(s, 0.3)
        await s.end_utterance()
        await next_event(events, "speech_ended")
        assert sdk_tasks(before)  # the session does run tasks while live...
    await asyncio.sleep(0)
    assert sdk_tasks(before) == []  # ...and none after close


async def test_rate_limited_create_is_retried_with_one_idempotency_key(
        tavus_emulator: TavusEmulator, make_kit: KitFactory) -> None:
    tavus_emulator.faults.rate_limit_next(1, retry_after=0.3)
    t0 = time.monotonic()
    async with make_kit() as kit, kit.session("amelia", consent=CONSENT, purpose="support") as s:
        assert s.state is SessionState.LIVE
    assert time.monotonic() - t0 >= 0.3  # Retry-After was honoured
    creates = [r for r in tavus_emulator.requests if r.path == "/v2/conversations"]
    assert [r.status for r in creates] == [429, 200]
    keys = {r.headers.get("idempotency-key") for r in creates}
    assert len(keys) == 1 and None not in keys
    assert len(tavus_emulator.conversations) == 1


async def test_server_errors_on_create_are_retried(tavus_emulator: TavusEmulator,
                                                   make_kit: KitFactory) -> None:
    tavus_emulator.faults.fail_next_creates(2, status=503)
    async with make_kit() as kit, kit.session("amelia", consent=CONSENT, purpose="support"):
        pass
    creates = [r for r in tavus_emulator.requests if r.path == "/v2/conversations"]
    assert [r.status for r in creates] == [503, 503, 200]


async def test_bad_key_is_a_typed_error_and_nothing_is_left_open(
        tavus_emulator: TavusEmulator, make_kit: KitFactory) -> None:
    kit = make_kit(api_key="wrong-key")
    session = kit.session("amelia", consent=CONSENT, purpose="support")
    events = session.events()
    with pytest.raises(AuthenticationError) as info:
        async with kit, session:
            pytest.fail("the body must not run")
    error = info.value
    assert error.status == 401 and error.provider == "tavus"
    assert error.category is ErrorCategory.AUTHENTICATION and not error.retryable
    assert tavus_emulator.open_sessions == 0 and not tavus_emulator.conversations
    assert len([r for r in tavus_emulator.requests if r.path == "/v2/conversations"]) == 1
    assert session.state is SessionState.CLOSED
    closed = await next_event(events, "closed")
    assert isinstance(closed, Closed) and closed.reason == "start_failed"


async def test_unknown_face_is_permanent_and_not_retried(
        tavus_emulator: TavusEmulator, make_kit: KitFactory,
        consent_authority: ConsentAuthority) -> None:
    kit = make_kit()
    kit.catalog._avatars["ghost"] = kit.catalog.get("amelia").__class__(
        name="ghost", provider_ids={"tavus": "r_ghost"})
    _, token = await consent_authority.grant(audience=AUDIENCE,
                                             **grant_fields(avatars=["ghost"]))
    with pytest.raises(NotFoundError):
        async with kit, kit.session("ghost", consent=token, purpose="support"):
            pass
    creates = [r for r in tavus_emulator.requests if r.path == "/v2/conversations"]
    assert len(creates) == 1


async def test_channel_drop_mid_utterance_closes_and_ends_at_vendor(
        tavus_emulator: TavusEmulator, make_kit: KitFactory) -> None:
    tavus_emulator.faults.drop_channel_after(0.3)
    before = asyncio.all_tasks()
    async with make_kit() as kit, kit.session("amelia", consent=CONSENT, purpose="support") as s:
        events = s.events()
        conversation_id = str(s.vendor_session_id)
        with pytest.raises(ProviderConnectionError):
            for _ in range(50):  # the drop surfaces on a send or via the close below
                await send_speech(s, 0.1)
                await asyncio.sleep(0.02)
        closed = await next_event(events, "closed")
    assert isinstance(closed, Closed) and "dropped" in closed.reason
    conversation = tavus_emulator.conversations[conversation_id]
    assert conversation.channel_dropped
    assert conversation.status == "ended" and conversation.end_reason == "ended"  # we ended it
    await asyncio.sleep(0)
    assert sdk_tasks(before) == []


async def test_vendor_side_timeout_closes_the_session(tavus_emulator: TavusEmulator,
                                                      make_kit: KitFactory) -> None:
    async with make_kit() as kit:
        s = kit.session("amelia", consent=CONSENT, purpose="support", max_duration_s=1)
        async with s:
            events = s.events()
            closed = await next_event(events, "closed", within=4)
            assert s.state is SessionState.CLOSED
            with pytest.raises(ProviderConnectionError, match="max_call_duration"):
                await s.send_audio(AudioChunk.silence(0.02, sample_rate=24_000))
        conversation = next(iter(tavus_emulator.conversations.values()))
    assert conversation.properties["max_call_duration"] == 1
    assert conversation.end_reason == "max_call_duration"
    assert isinstance(closed, Closed) and closed.reason == "vendor: max_call_duration"
    assert closed.billed_seconds == pytest.approx(1.0, abs=0.2)


async def test_end_is_retried_on_server_errors(tavus_emulator: TavusEmulator,
                                               make_kit: KitFactory) -> None:
    tavus_emulator.faults.fail_next_ends(2, status=500)
    async with make_kit() as kit, kit.session("amelia", consent=CONSENT, purpose="support"):
        pass
    assert tavus_emulator.open_sessions == 0


async def test_unconfirmed_end_is_reported_and_retried_by_the_next_aclose(
        tavus_emulator: TavusEmulator, make_kit: KitFactory) -> None:
    tavus_emulator.faults.fail_next_ends(100, status=500)
    # Leaving the room would end it at Tavus (participant_left_timeout=0 by default); with a
    # long timeout the vendor keeps billing until /end succeeds.
    kit = make_kit(retry={"max_retries": 1, "initial_backoff": 0.01},
                   properties={"participant_left_timeout": 600})
    s = kit.session("amelia", consent=CONSENT, purpose="support")
    await s.start()
    with pytest.raises(ServerError):
        await s.aclose()
    ends = [r for r in tavus_emulator.requests if r.path.endswith("/end")]
    assert len(ends) == 2  # one attempt + one HTTP retry; not repeated within the same aclose
    assert s.state is SessionState.CLOSED
    closed = [e async for e in s.events()][-1]
    assert isinstance(closed, Closed) and not closed.vendor_ended
    assert tavus_emulator.open_sessions == 1  # still billed: the caller was told
    tavus_emulator.faults.clear()
    await s.aclose()  # retries the end
    assert tavus_emulator.open_sessions == 0
    await kit.aclose()


async def test_leaving_the_room_stops_billing_even_when_end_fails(
        tavus_emulator: TavusEmulator, make_kit: KitFactory) -> None:
    tavus_emulator.faults.fail_next_ends(100, status=500)
    kit = make_kit(retry={"max_retries": 0})
    s = kit.session("amelia", consent=CONSENT, purpose="support")
    await s.start()
    with pytest.raises(ServerError):
        await s.aclose()
    # participant_left_timeout defaults to 0: our leaving the room ended it at the vendor.
    await asyncio.sleep(0.2)
    assert tavus_emulator.open_sessions == 0
    tavus_emulator.faults.clear()
    await s.aclose()  # the retried end is idempotent at the vendor
    await kit.aclose()


async def test_kit_close_ends_sessions_left_open(tavus_emulator: TavusEmulator,
                                                 make_kit: KitFactory) -> None:
    kit = make_kit()
    async with kit:
        for avatar in ("amelia", "bob"):
            await kit.session(avatar, consent=CONSENT, purpose="support").start()
        assert tavus_emulator.open_sessions == 2
    assert tavus_emulator.open_sessions == 0
    with pytest.raises(SessionStateError):
        kit.session("amelia", consent=CONSENT, purpose="support")


async def test_state_machine_rejects_illegal_operations(tavus_emulator: TavusEmulator,
                                                        make_kit: KitFactory) -> None:
    async with make_kit() as kit:
        s = kit.session("amelia", consent=CONSENT, purpose="support")
        assert s.state is SessionState.CREATED
        with pytest.raises(SessionStateError):
            await s.send_audio(AudioChunk.silence(0.02, sample_rate=24_000))
        with pytest.raises(SessionStateError):
            _ = s.route
        await s.start()
        with pytest.raises(SessionStateError, match="live to starting"):
            await s.start()
        with pytest.raises(CapabilityError, match="daily"):
            s.video()
        await s.aclose()
        with pytest.raises(SessionStateError, match="closed"):
            await s.end_utterance()
        with pytest.raises(SessionStateError):
            await s.start()
        with pytest.raises(SessionStateError):
            await s.interrupt()


async def test_close_before_start_sends_nothing(tavus_emulator: TavusEmulator,
                                                make_kit: KitFactory) -> None:
    async with make_kit() as kit:
        s = kit.session("amelia", consent=CONSENT, purpose="support")
        await s.aclose()
        assert s.state is SessionState.CLOSED
    assert tavus_emulator.requests == []


async def test_echo_pal_is_created_once_per_face(tavus_emulator: TavusEmulator,
                                                 make_kit: KitFactory) -> None:
    async with make_kit(pal_id=None) as kit:
        for _ in range(2):
            async with kit.session("amelia", consent=CONSENT, purpose="support"):
                pass
    created = [p for p in tavus_emulator.pals.values() if p.pal_id != ECHO_PAL]
    assert len(created) == 1
    assert created[0].pipeline_mode == "echo" and created[0].default_face_id == FACE
    assert [c.pal_id for c in tavus_emulator.conversations.values()] == [created[0].pal_id] * 2


async def test_legacy_persona_vocabulary(tavus_emulator: TavusEmulator,
                                         make_kit: KitFactory) -> None:
    async with make_kit(pal_id=None, vocabulary="persona") as kit, \
            kit.session("amelia", consent=CONSENT, purpose="support"):
        pass
    paths = [r.path for r in tavus_emulator.requests]
    assert "/v2/personas" in paths and "/v2/pals" not in paths
    assert next(iter(tavus_emulator.conversations.values())).face_id == FACE


async def test_private_room_hands_out_a_masked_viewer_token(tavus_emulator: TavusEmulator,
                                                            make_kit: KitFactory) -> None:
    async with make_kit(require_auth=True) as kit, \
            kit.session("amelia", consent=CONSENT, purpose="support") as s:
        token = s.join.token
        assert token is not None and token.get_secret_value() not in repr(s.join)
        conversation = tavus_emulator.conversations[str(s.vendor_session_id)]
        assert token.get_secret_value() == conversation.meeting_token
        assert conversation.participants == 1  # our channel joined with the token


async def test_api_key_never_reaches_logs_or_errors(tavus_emulator: TavusEmulator,
                                                    make_kit: KitFactory,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    tavus_emulator.faults.rate_limit_next(1, retry_after=0.01)
    texts: list[str] = []
    async with make_kit() as kit, kit.session("amelia", consent=CONSENT, purpose="support") as s:
        texts += [repr(kit), repr(kit.providers["tavus"]), repr(kit.config), repr(s.join)]
        await send_speech(s, 0.2)
        await s.end_utterance()
    bad = make_kit(api_key=API_KEY + "-revoked")
    with pytest.raises(AuthenticationError) as info:
        async with bad, bad.session("amelia", consent=CONSENT, purpose="support"):
            pass
    texts += [str(info.value), repr(info.value)]
    texts += [record.getMessage() for record in caplog.records]
    assert any(r.name == "avatarkit.http" for r in caplog.records)  # logging did happen
    assert all(API_KEY not in text for text in texts)
