"""Session events: one pydantic discriminated union, ``SessionEvent``, keyed by ``type``.

Every event carries the avatarkit ``session_id`` and the time it happened (UTC). Serialise with
``event.model_dump_json()``; parse any event back with ``parse_event(data)``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from .disclosure.metadata import DisclosureMetadata
from .join import JoinInfo

__all__ = [
    "BudgetWarning",
    "Closed",
    "ConsentRevoked",
    "Interrupted",
    "ProviderSwitched",
    "SessionEvent",
    "SessionStarted",
    "SpeechEnded",
    "SpeechStarted",
    "UsageUpdated",
    "parse_event",
]


def _now() -> datetime:
    return datetime.now(UTC)


class _Event(BaseModel):
    model_config = ConfigDict(frozen=True)

    session_id: str
    at: datetime = Field(default_factory=_now)


class SessionStarted(_Event):
    """The session is live: who renders it, under which consent, and the AI disclosure
    (``disclosure_notice`` is the signed JWS of ``disclosure`` that viewer apps verify)."""

    type: Literal["session_started"] = "session_started"
    provider: str
    vendor_session_id: str
    consent_id: str
    disclosure: DisclosureMetadata
    disclosure_notice: str


class SpeechStarted(_Event):
    """The avatar started speaking an utterance (as reported by the renderer)."""

    type: Literal["speech_started"] = "speech_started"
    utterance_id: str
    provider: str


class SpeechEnded(_Event):
    """The avatar stopped speaking an utterance: finished, or cut short by an interrupt."""

    type: Literal["speech_ended"] = "speech_ended"
    utterance_id: str
    provider: str
    duration: float | None = Field(default=None, description="Seconds spoken, when known.")
    interrupted: bool = False


class Interrupted(_Event):
    """``interrupt()`` completed. ``acknowledged`` is False when the renderer never confirmed
    within the ack timeout; ``playback_position`` is then our own estimate."""

    type: Literal["interrupted"] = "interrupted"
    utterance_id: str | None
    playback_position: float
    acknowledged: bool


class ProviderSwitched(_Event):
    """The live vendor session died and the session moved to another provider (failover).

    Viewers must use the new ``join`` (it carries the new signed disclosure notice). The
    session keeps its ``session_id``, generation id and consent; ``replayed_seconds`` is the
    unplayed audio of the current utterance that was sent again to the new provider.
    """

    type: Literal["provider_switched"] = "provider_switched"
    from_provider: str
    to_provider: str
    reason: str
    join: JoinInfo
    vendor_session_id: str
    replayed_seconds: float = 0.0


class UsageUpdated(_Event):
    """Billed time of the session so far, over every provider it used (failover included),
    from each vendor's billing start (create) to its confirmed end.

    ``cost`` sums the parts whose price is known; ``unpriced_seconds`` is the billed time at
    providers whose price is unknown. ``cost`` is ``None`` only when nothing is priced: an
    unknown price is never counted as 0. ``final`` marks the last update, sent at close.
    """

    type: Literal["usage_updated"] = "usage_updated"
    provider: str
    billed_seconds: float
    cost: Decimal | None = None
    currency: str = "USD"
    unpriced_seconds: float = 0.0
    final: bool = False


class BudgetWarning(_Event):
    """A budget cap is close: ``used`` of ``limit`` (minutes or money, per ``unit``) is spent.

    Sent once per cap when it reaches the configured fraction (``[budgets] warn_at``). The
    session is ended before it crosses the cap, ``ends_in_s`` from now at the current rate.
    """

    type: Literal["budget_warning"] = "budget_warning"
    cap: str
    unit: Literal["minutes", "cost"]
    used: Decimal
    limit: Decimal
    ends_in_s: float


class ConsentRevoked(_Event):
    """The consent behind the session was revoked or suspended; the session is ending."""

    type: Literal["consent_revoked"] = "consent_revoked"
    consent_id: str
    status: Literal["revoked", "suspended"]


class Closed(_Event):
    """The session is closed; the last event of every session.

    ``vendor_ended`` is False only when the vendor session could not be confirmed ended.
    ``error`` is the error that ended the session (a dropped channel, a vendor error) or that
    kept it from being ended at the vendor; None for an orderly close.
    """

    type: Literal["closed"] = "closed"
    reason: str
    provider: str | None = None
    billed_seconds: float | None = None
    vendor_ended: bool = True
    error: str | None = None


SessionEvent = Annotated[
    SessionStarted
    | SpeechStarted
    | SpeechEnded
    | Interrupted
    | ProviderSwitched
    | UsageUpdated
    | BudgetWarning
    | ConsentRevoked
    | Closed,
    Field(discriminator="type"),
]

_ADAPTER: TypeAdapter[SessionEvent] = TypeAdapter(SessionEvent)


def parse_event(data: str | bytes | dict[str, Any]) -> SessionEvent:
    """Parse an event from JSON text or a dict (the inverse of ``model_dump``)."""
    if isinstance(data, dict):
        return _ADAPTER.validate_python(data)
    return _ADAPTER.validate_json(data)
