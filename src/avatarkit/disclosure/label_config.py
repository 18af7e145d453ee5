"""``LabelConfig``: how the burned-in "AI GENERATED" label looks (``[disclosure.burned_label]``).

Kept apart from :mod:`avatarkit.disclosure.label`, which draws it with Pillow, so the kit's
config can hold it without importing an imaging library.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["LabelConfig", "LabelPosition"]

LabelPosition = Literal["top-right", "top-left", "bottom-right", "bottom-left"]


class LabelConfig(BaseModel):
    """How the burned-in label looks. Invalid values raise pydantic's ``ValidationError``,
    whose ``loc`` names the field.

    ``size`` is the label height as a fraction of the frame height (so the label keeps its
    proportions across resolutions); ``margin`` is the gap to the frame edges, also as a
    fraction of the frame height; ``opacity`` is that of the dark backing box (the letters
    are always fully opaque). ``enabled=False`` exists for media that is labelled elsewhere;
    turning it off is recorded in the generation log.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    text: str = Field(default="AI GENERATED", min_length=1, max_length=40)
    position: LabelPosition = "top-right"
    size: float = Field(default=0.06, ge=0.03, le=0.25)
    margin: float = Field(default=0.02, ge=0.0, le=0.1)
    opacity: float = Field(default=0.75, ge=0.4, le=1.0)
    enabled: bool = True

    @field_validator("text")
    @classmethod
    def _printable(cls, value: str) -> str:
        if value != value.strip() or not value.isprintable():
            raise ValueError("must be printable, single-line, without surrounding spaces")
        return value
