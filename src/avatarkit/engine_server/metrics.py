"""The engine server's metrics, in Prometheus text format 0.0.4 (written by hand: no
client library)."""

from __future__ import annotations

import math
from collections.abc import Iterable

from ..local_engine.stream import EngineStream

__all__ = ["LATENCY_BUCKETS", "ServerMetrics"]

#: first-frame latency histogram buckets, seconds
LATENCY_BUCKETS: tuple[float, ...] = (0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)


class ServerMetrics:
    """Counters of one server: sessions started and refused (by reason), frames of ended
    sessions, and the first-frame latency histogram."""

    def __init__(self) -> None:
        self.started_total = 0
        self.refused: dict[str, int] = {}
        self.ended_frames = 0
        self.latency_buckets = [0] * len(LATENCY_BUCKETS)
        self.latency_sum = 0.0
        self.latency_count = 0

    def refuse(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1

    def observe_latency(self, seconds: float) -> None:
        self.latency_sum += seconds
        self.latency_count += 1
        for i, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                self.latency_buckets[i] += 1

    def text(self, *, sessions: int, max_sessions: int,
             live: Iterable[tuple[str, EngineStream]]) -> str:
        """The exposition ``GET /metrics`` serves; ``live`` is (session id, stream) of each
        live session."""
        live = list(live)
        lines: list[str] = []

        def family(name: str, kind: str, help_: str) -> None:
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} {kind}")

        family("avatarkit_sessions_active", "gauge", "Sessions rendering now.")
        lines.append(f"avatarkit_sessions_active {sessions}")
        family("avatarkit_sessions_max", "gauge", "Sessions this server renders at once.")
        lines.append(f"avatarkit_sessions_max {max_sessions}")
        family("avatarkit_sessions_started_total", "counter", "Sessions started.")
        lines.append(f"avatarkit_sessions_started_total {self.started_total}")
        family("avatarkit_sessions_refused_total", "counter",
               "Session creates refused, by reason.")
        for reason, count in sorted(self.refused.items()):
            lines.append(f'avatarkit_sessions_refused_total{{reason="{_label_value(reason)}"}} '
                         f"{count}")
        frames = self.ended_frames + sum(stream.frames_released for _, stream in live)
        family("avatarkit_frames_total", "counter", "Video frames released by the engines.")
        lines.append(f"avatarkit_frames_total {frames}")
        family("avatarkit_stream_fps", "gauge",
               "Frames per second each live session's engine stream releases.")
        for session_id, stream in live:
            fps = stream.fps
            if fps is not None:
                lines.append(f'avatarkit_stream_fps{{session="'
                             f'{_label_value(session_id)}"}} {fps:.3f}')
        name = "avatarkit_first_frame_latency_seconds"
        family(name, "histogram", "Seconds from an utterance's first audio to its first frame.")
        for bound, count in zip(LATENCY_BUCKETS, self.latency_buckets, strict=True):
            lines.append(f'{name}_bucket{{le="{_number(bound)}"}} {count}')
        lines.append(f'{name}_bucket{{le="+Inf"}} {self.latency_count}')
        lines.append(f"{name}_sum {self.latency_sum!r}")
        lines.append(f"{name}_count {self.latency_count}")
        return "\n".join(lines) + "\n"


def _label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))
