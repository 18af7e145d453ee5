"""The engine contract: what the runner asks of a lip-sync engine (lite, MuseTalk).

An engine turns the audio of one video frame's duration into that frame. The runner
(:mod:`avatarkit.local_engine.runner`) owns everything else: buffering, pacing, the idle
cycle, segment ends, interrupts, A/V sync, the disclosure label and watermark. So an engine is
small and stateless apart from the smoothing of its own mouth model, which :meth:`reset`
clears after an interrupt.

Frame indices: the runner passes the index of the avatar's *source* frame to draw on, already
cycled forward and backward through a video avatar (``PreparedAvatar.ping_pong_index``), so
engines never deal with cycling and a still image is always index 0.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "Audio",
    "Frame",
    "LipSyncEngine",
]

Frame = NDArray[np.uint8]
Audio = NDArray[np.int16]


class LipSyncEngine(ABC):
    """A lip-sync engine for one prepared avatar.

    Attributes every engine sets: ``sample_rate`` (the mono PCM16 rate it consumes), ``fps``
    (its output frame rate), ``width`` and ``height`` (of its frames), ``source_frames`` (how
    many frames the avatar has).
    """

    #: the name configs use (``engine = "lite"``)
    name: ClassVar[str]
    sample_rate: int
    fps: float
    width: int
    height: int
    source_frames: int

    @property
    def samples_per_frame(self) -> int:
        """Audio samples per video frame (the last frame of a segment may have fewer)."""
        return round(self.sample_rate / self.fps)

    @abstractmethod
    def render(self, audio: Audio, *, source_index: int, speaking: bool) -> Frame:
        """One output frame, (height, width, 3) RGB uint8, a new array the caller may modify.

        ``audio`` holds this frame's samples (``samples_per_frame``; zero-padded at a segment
        end). ``speaking`` is False for idle frames: the mouth must be closed (no movement in
        silence) and an engine should skip its model entirely.
        """

    #: frames per engine call the engine works best with (the runner's default batch size)
    preferred_batch_size: int = 1

    @property
    def lookahead_samples(self) -> int:
        """Audio after a frame's own samples that the engine wants to see to draw it (its
        model looks ahead); the runner passes what it has buffered as ``lookahead``."""
        return 0

    def render_batch(self, audio: Sequence[Audio], *, source_indices: Sequence[int],
                     speaking: Sequence[bool], segment_ids: Sequence[str | None] | None = None,
                     lookahead: Audio | None = None) -> list[Frame]:
        """Several consecutive frames at once; batched engines (MuseTalk) override this.

        ``segment_ids`` names each frame's utterance (None for idle frames): an engine with
        audio context starts afresh where it changes. ``lookahead`` is audio already buffered
        after the last frame, in that frame's utterance (up to :attr:`lookahead_samples`;
        shorter or None when no more is known yet).
        """
        del segment_ids, lookahead  # per-frame engines draw each frame from its own audio
        return [self.render(a, source_index=i, speaking=s)
                for a, i, s in zip(audio, source_indices, speaking, strict=True)]

    def warm_up(self) -> None:  # noqa: B027  (optional hook, not abstract)
        """Do one-time work (caches, lazy imports, kernels) now, so the first frame a viewer
        waits for is as fast as the rest. Called once when the engine is built."""

    def close(self) -> None:  # noqa: B027  (optional hook, not abstract)
        """Release what the engine holds beyond memory (runtime sessions). Idempotent; called
        by :class:`~avatarkit.local_engine.stream.EngineStream` once its runner stopped."""

    def reset(self) -> None:  # noqa: B027  (optional hook, not abstract)
        """Forget mouth-model state (after an interrupt the next frame starts from rest).

        Called from the event loop while a batch may be drawing in the runner's worker
        thread: an engine with state should only mark it stale here and drop it at the start
        of its next draw."""
