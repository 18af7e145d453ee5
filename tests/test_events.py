"""Session events: one discriminated union that round-trips through JSON."""

from __future__ import annotations

from decimal import Decimal

import pytest
from pydantic import SecretStr, ValidationError

from avatarkit import (
    BudgetWarning,
    Closed,
    ConsentRevoked,
    DisclosureMetadata,
    Interrupted,
    JoinInfo,
    ProviderSwitched,
    SessionEvent,
    SpeechEnded,
    SpeechStarted,
    UsageUpdated,
    parse_event,
)

DISCLOSURE = DisclosureMetadata(generation_id="gen_1", provider="tavus", avatar="amelia")
JOIN = JoinInfo(kind="daily", url="https://tavus.daily.co/c1", token=SecretStr("viewer-tok"),
                disclosure=DISCLOSURE)

EVENTS = [
    SpeechStarted(session_id="s", utterance_id="u1", provider="tavus"),
    SpeechEnded(session_id="s", utterance_id="u1", provider="tavus", duration=1.2),
    Interrupted(session_id="s", utterance_id="u2", playback_position=0.4, acknowledged=False),
    ProviderSwitched(session_id="s", from_provider="tavus", to_provider="simli",
                     reason="channel dropped", join=JOIN, vendor_session_id="c2",
                     replayed_seconds=0.8),
    BudgetWarning(session_id="s", cap="budgets.session.max_cost", unit="cost",
                  used=Decimal("4.00"), limit=Decimal("5.00"), ends_in_s=55.0),
    UsageUpdated(session_id="s", provider="tavus", billed_seconds=61.5,
                 cost=Decimal("0.328000")),
    ConsentRevoked(session_id="s", consent_id="cns_1", status="revoked"),
    Closed(session_id="s", reason="closed", provider="tavus", billed_seconds=3.0),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: e.type)
def test_roundtrip_through_json(event: SessionEvent) -> None:
    assert hasattr(event, "model_dump_json")
    parsed = parse_event(event.model_dump_json())
    assert type(parsed) is type(event)
    if not isinstance(event, ProviderSwitched):  # secrets do not survive a dump, by design
        assert parsed == event


def test_dict_input_and_unknown_type() -> None:
    assert isinstance(parse_event({"type": "closed", "session_id": "s", "reason": "x"}), Closed)
    with pytest.raises(ValidationError):
        parse_event({"type": "exploded", "session_id": "s"})


def test_unknown_cost_stays_unknown() -> None:
    event = UsageUpdated(session_id="s", provider="tavus", billed_seconds=10)
    assert event.cost is None
    assert parse_event(event.model_dump_json()).cost is None  # type: ignore[union-attr]


def test_join_token_is_masked() -> None:
    assert "viewer-tok" not in repr(JOIN)
    assert "viewer-tok" not in JOIN.model_dump_json()
    assert JOIN.token is not None and JOIN.token.get_secret_value() == "viewer-tok"


def test_disclosure_marks_ai_generated() -> None:
    assert DISCLOSURE.ai_generated is True
    assert "AI" in DISCLOSURE.notice and DISCLOSURE.regulation.startswith("EU AI Act")
    with pytest.raises(ValidationError):
        DisclosureMetadata(ai_generated=False, generation_id="g", provider="p", avatar="a")
