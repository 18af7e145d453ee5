"""``DisclosureStamp``: the visible label and the invisible watermark, applied to one frame.

Every frame the SDK itself draws (the local engine's live stream, an offline render, an MP4
recording) gets both marks, in this order: the label first, then the watermark, so that the
watermark also covers the label's pixels and the frame that leaves is exactly the one the
mark was computed on. Both run in place on a frame the caller owns (about 3 ms together at
512x512), on whatever worker thread already holds the frame.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from .label import FrameLabeler
from .label_config import LabelConfig
from .metadata import DisclosureMetadata
from .watermark import FrameWatermarker, payload_for

__all__ = ["DisclosureStamp"]


class DisclosureStamp:
    """Label and watermark frames in place: ``stamp(frame)``.

    ``label=None`` or a disabled label skips the label; ``payload=None`` skips the watermark.
    Thread-safe (the labeler caches per size under a lock; the watermarker only reads).
    """

    def __init__(self, *, label: LabelConfig | None, payload: bytes | None) -> None:
        self.label = label if label is not None and label.enabled else None
        self.payload = bytes(payload) if payload is not None else None
        self._labeler = FrameLabeler(self.label) if self.label is not None else None
        self._watermarker = FrameWatermarker(self.payload) if self.payload is not None else None

    @classmethod
    def for_disclosure(cls, disclosure: DisclosureMetadata, *, label: LabelConfig | None = None,
                       watermark: bool = True) -> DisclosureStamp:
        """The stamp for one generation: the default label unless ``label`` says otherwise,
        and the watermark carrying ``payload_for(disclosure.generation_id)``."""
        return cls(label=label if label is not None else LabelConfig(),
                   payload=payload_for(disclosure.generation_id) if watermark else None)

    @property
    def labelled(self) -> bool:
        return self._labeler is not None

    def __call__(self, frame: NDArray[np.uint8]) -> None:
        if self._labeler is not None:
            self._labeler.apply_inplace(frame)
        if self._watermarker is not None:
            self._watermarker.embed_into(frame)

    def __repr__(self) -> str:
        payload = self.payload.hex() if self.payload is not None else None
        return f"<DisclosureStamp label={self.labelled} watermark={payload}>"
