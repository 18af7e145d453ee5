"""``DisclosureMetadata``: the machine-readable "this is AI-generated" record of a session.

Present in every :class:`~avatarkit.JoinInfo`. The consent fields (``consent_id``,
``consent_token_sha256``) are filled once consent verification is wired into the session path;
until a session has verified consent they are ``None``, never invented.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["DEFAULT_NOTICE", "DisclosureMetadata"]

DEFAULT_NOTICE = "You are talking to an AI-generated avatar. Its face and voice are synthetic."


class DisclosureMetadata(BaseModel):
    """What a viewer's UI shows and what downstream tools read to know the media is synthetic."""

    model_config = ConfigDict(frozen=True)

    ai_generated: Literal[True] = True
    label: str = "AI-generated"
    notice: str = DEFAULT_NOTICE
    regulation: str = "EU AI Act Art. 50"
    generation_id: str = Field(description="Links every output of the session to its records.")
    provider: str = Field(description="Who renders the avatar (registered provider name).")
    avatar: str = Field(description="The logical avatar (likeness) shown.")
    consent_id: str | None = None
    consent_token_sha256: str | None = None
    issued_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
