"""Utterance bookkeeping: what was sent, when it started playing, and the audio kept for a
failover's replay."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ..media import AudioChunk

__all__ = ["Utterance"]


@dataclass(slots=True)
class Utterance:
    """One utterance: what was sent, when it started playing, and (for failover) the audio
    itself as the caller gave it, so the unplayed part can be sent to another provider."""

    id: str
    sent_seconds: float = 0.0          # sent to the current provider
    first_sent_at: float | None = None  # monotonic
    playback_started_at: float | None = None  # monotonic, from the vendor's event
    send_finished: bool = False
    offset: float = 0.0                # seconds played at providers before the current one
    audio: deque[AudioChunk] = field(default_factory=deque)
    buffered_seconds: float = 0.0      # duration of ``audio``
    dropped_seconds: float = 0.0       # audio dropped from the front (replay buffer cap)

    def estimated_position(self, now: float) -> float:
        """Seconds played so far: the time since playback began, capped by what was sent."""
        start = self.playback_started_at or self.first_sent_at
        if start is None:
            return self.offset
        return self.offset + max(0.0, min(self.sent_seconds, now - start))

    def keep(self, chunk: AudioChunk, limit_s: float) -> None:
        """Keep ``chunk`` for a replay, dropping the oldest audio beyond ``limit_s``."""
        self.audio.append(chunk)
        self.buffered_seconds += chunk.duration
        while self.buffered_seconds > limit_s and len(self.audio) > 1:
            dropped = self.audio.popleft()
            self.buffered_seconds -= dropped.duration
            self.dropped_seconds += dropped.duration

    def forget_last(self, chunk: AudioChunk) -> None:
        """``chunk`` was not delivered and will not be replayed: un-count it."""
        if self.audio and self.audio[-1] is chunk:
            self.audio.pop()
            self.buffered_seconds -= chunk.duration
        self.sent_seconds = max(0.0, self.sent_seconds - chunk.duration)

    def unplayed(self, position: float) -> list[AudioChunk]:
        """The kept audio from ``position`` seconds into the utterance on."""
        out: list[AudioChunk] = []
        at = self.dropped_seconds
        for chunk in self.audio:
            end = at + chunk.duration
            if end > position:
                skip = max(0, round((position - at) * chunk.sample_rate))
                if skip:
                    frames = chunk.samples.reshape(-1, chunk.channels)[skip:]
                    chunk = AudioChunk(frames.reshape(-1).copy(), chunk.sample_rate,
                                       chunk.channels)
                out.append(chunk)
            at = end
        return out
