"""Media for the emulators: the PCM16 checks every emulator makes on received audio, and for
the peer-to-peer ones a synthetic talking face served over WebRTC.

Every vendor takes PCM16 (16-bit little-endian) mono: :func:`pcm16_seconds` is how long a
number of its bytes plays, :func:`base64_audio` decodes a JSON message's base64 audio,
:func:`require_whole_samples` refuses an odd byte count and :func:`whole_samples` drops the
odd byte of what a vendor still plays. Each raises or reports a
:class:`~avatarkit.emulators._base.ProtocolError` in the emulator's own words (``what``).

``TalkingPattern`` is a cartoon face whose mouth opening follows the level of the audio the
emulator received: each rendered frame "plays" ``1/fps`` seconds of the queued audio and opens
the mouth by its loudness (closed in silence). ``TalkingPatternTrack`` serves it as an aiortc
video track paced at the pattern's frame rate, so a client receives real, encoded video whose
content proves that its audio reached the renderer. :func:`mouth_opening` reads the opening back
from a received (decoded, lossy) frame.

aiortc is imported only when a track is made (the ``webrtc`` extra).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import fractions
import math
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from ._base import ProtocolError

if TYPE_CHECKING:
    from aiortc import MediaStreamTrack

__all__ = [
    "PCM16_SAMPLE_WIDTH",
    "TalkingPattern",
    "base64_audio",
    "mouth_opening",
    "pcm16_seconds",
    "require_whole_samples",
    "talking_pattern_track",
    "whole_samples",
]

#: Bytes per sample of PCM16 mono audio.
PCM16_SAMPLE_WIDTH = 2

_SKIN = np.array([225, 185, 150], dtype=np.uint8)
_BACKGROUND = np.array([40, 70, 110], dtype=np.uint8)
_FEATURE = np.array([30, 20, 25], dtype=np.uint8)
_MOUTH = np.array([70, 10, 20], dtype=np.uint8)
#: Mouth box as fractions of the frame: (top, bottom, left, right).
_MOUTH_BOX = (0.58, 0.84, 0.34, 0.66)
#: The mouth's full height as a fraction of the frame height (its width is fixed).
_MOUTH_MAX_HEIGHT = 0.22
#: Loudness mapped to the opening: -50 dBFS and quieter is closed, -10 dBFS and louder open.
_QUIET_DB, _LOUD_DB = -50.0, -10.0
_VIDEO_CLOCK_RATE = 90_000


# --------------------------------------------------------------------------------------------
# PCM16 checks
# --------------------------------------------------------------------------------------------


def pcm16_seconds(byte_count: int, sample_rate: int) -> float:
    """How long ``byte_count`` bytes of PCM16 mono at ``sample_rate`` play."""
    return byte_count / PCM16_SAMPLE_WIDTH / sample_rate


def base64_audio(audio: object, what: str) -> bytes:
    """The bytes of base64 ``audio``; ``ProtocolError`` naming ``what`` if it is not that."""
    if not isinstance(audio, str):
        raise ProtocolError(f"{what} must be a base64 string")
    try:
        return base64.b64decode(audio, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(f"{what} is not valid base64") from None


def require_whole_samples(pcm: bytes, what: str) -> None:
    """``ProtocolError`` naming ``what`` unless ``pcm`` is whole PCM16 samples."""
    if len(pcm) % PCM16_SAMPLE_WIDTH:
        raise ProtocolError(
            f"{what} has an odd byte count ({len(pcm)}); PCM16 needs 2 bytes a sample"
        )


def whole_samples(pcm: bytes) -> bytes:
    """``pcm`` without the odd last byte that is no PCM16 sample (as a renderer plays it)."""
    return pcm[:-1] if len(pcm) % PCM16_SAMPLE_WIDTH else pcm


# --------------------------------------------------------------------------------------------
# The talking face
# --------------------------------------------------------------------------------------------


class TalkingPattern:
    """A face whose mouth follows the audio it is fed (PCM16 mono at ``sample_rate``)."""

    def __init__(self, *, width: int = 256, height: int = 256, fps: int = 25,
                 sample_rate: int = 16_000, history: int = 1_000) -> None:
        if width < 64 or height < 64 or width % 2 or height % 2:
            raise ValueError("width and height must be even and at least 64")
        self.width, self.height, self.fps, self.sample_rate = width, height, fps, sample_rate
        self._samples_per_frame = sample_rate // fps
        self._queue: deque[NDArray[np.int16]] = deque()
        self._queued = 0
        self._base = self._draw_face()
        yy, xx = np.mgrid[0:height, 0:width]
        self._yy, self._xx = yy.astype(np.float32), xx.astype(np.float32)
        top, bottom, left, right = _MOUTH_BOX
        self._mouth_cy = (top + bottom) / 2 * height
        self._mouth_rx = (right - left) / 2 * width * 0.8
        self._mouth_cx = width / 2
        #: the opening (0..1) of every rendered frame, newest last
        self.openings: deque[float] = deque(maxlen=history)
        self.frames_rendered = 0
        #: seconds of received audio rendered so far (silence padding not counted)
        self.audio_seconds_rendered = 0.0

    def _draw_face(self) -> NDArray[np.uint8]:
        h, w = self.height, self.width
        image = np.empty((h, w, 3), dtype=np.uint8)
        image[:] = _BACKGROUND
        yy, xx = np.mgrid[0:h, 0:w]
        face = ((xx - w / 2) / (0.38 * w)) ** 2 + ((yy - h / 2) / (0.46 * h)) ** 2 <= 1.0
        image[face] = _SKIN
        for ex in (0.36, 0.64):
            eye = ((xx - ex * w) / (0.05 * w)) ** 2 + ((yy - 0.38 * h) / (0.035 * h)) ** 2 <= 1
            image[eye] = _FEATURE
        return image

    @property
    def queued_seconds(self) -> float:
        """Received audio not yet rendered."""
        return self._queued / self.sample_rate

    def feed(self, pcm16: bytes) -> None:
        """Queue received audio (PCM16 LE mono at ``sample_rate``) for the next frames."""
        pcm16 = whole_samples(pcm16)
        if pcm16:
            samples = np.frombuffer(pcm16, dtype="<i2").astype(np.int16)
            self._queue.append(samples)
            self._queued += samples.size

    def clear(self) -> None:
        """Drop the queued audio (an interrupt): the mouth closes on the next frame."""
        self._queue.clear()
        self._queued = 0

    def _take(self, count: int) -> NDArray[np.int16]:
        parts: list[NDArray[np.int16]] = []
        while count > 0 and self._queue:
            head = self._queue[0]
            if head.size <= count:
                parts.append(self._queue.popleft())
                count -= head.size
            else:
                parts.append(head[:count])
                self._queue[0] = head[count:]
                count = 0
        taken = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int16)
        self._queued -= taken.size
        return taken

    @staticmethod
    def opening_for(samples: NDArray[np.int16]) -> float:
        """The mouth opening (0..1) for one frame's worth of audio."""
        if samples.size == 0:
            return 0.0
        rms = float(np.sqrt(np.mean(np.square(samples.astype(np.float32))))) / 32768.0
        if rms <= 0.0:
            return 0.0
        db = 20.0 * math.log10(rms)
        return min(1.0, max(0.0, (db - _QUIET_DB) / (_LOUD_DB - _QUIET_DB)))

    def next_frame(self) -> NDArray[np.uint8]:
        """Render the next frame, consuming ``1/fps`` seconds of queued audio."""
        samples = self._take(self._samples_per_frame)
        self.audio_seconds_rendered += samples.size / self.sample_rate
        opening = self.opening_for(samples)
        self.openings.append(opening)
        self.frames_rendered += 1
        frame = self._base.copy()
        ry = max(0.012, opening * _MOUTH_MAX_HEIGHT / 2) * self.height
        mouth = (((self._xx - self._mouth_cx) / self._mouth_rx) ** 2
                 + ((self._yy - self._mouth_cy) / ry) ** 2) <= 1.0
        frame[mouth] = _MOUTH
        return frame


def mouth_opening(rgb: NDArray[np.uint8]) -> float:
    """Read the mouth opening (about 0 closed .. 1 open) back from a received frame.

    Counts the dark pixels in the mouth box, so it survives lossy video coding and scaling.
    """
    h, w = rgb.shape[:2]
    top, bottom, left, right = _MOUTH_BOX
    box = rgb[int(top * h):int(bottom * h), int(left * w):int(right * w)].astype(np.int32)
    dark = (box.sum(axis=2) < 300).mean()
    # a fully open mouth fills about pi/4 * 0.8 * (0.22 / 0.26) of the box
    full = math.pi / 4 * 0.8 * (_MOUTH_MAX_HEIGHT / (bottom - top))
    return float(min(1.0, dark / full))


def talking_pattern_track(pattern: TalkingPattern) -> MediaStreamTrack:
    """An aiortc video track that renders ``pattern`` in real time at its frame rate."""
    import av
    from aiortc import MediaStreamTrack

    class _Track(MediaStreamTrack):
        kind = "video"

        def __init__(self) -> None:
            super().__init__()
            self._started: float | None = None
            self._index = 0

        async def recv(self) -> Any:
            now = time.monotonic()
            if self._started is None:
                self._started = now
            due = self._started + self._index / pattern.fps
            if due > now:
                await asyncio.sleep(due - now)
            elif now - due > 1.0:  # fell far behind (a stalled loop): do not burst-catch-up
                self._started = now - self._index / pattern.fps
            frame = av.VideoFrame.from_ndarray(pattern.next_frame(), format="rgb24")
            frame.pts = self._index * _VIDEO_CLOCK_RATE // pattern.fps
            frame.time_base = fractions.Fraction(1, _VIDEO_CLOCK_RATE)
            self._index += 1
            return frame

    return _Track()
