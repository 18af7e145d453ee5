"""Tests of the local engine's avatar preparation; shared media helpers.

Media are built in the tests from ``skimage.data.astronaut()`` (public domain, 512x512 RGB,
one face of about 100 px) and encoded with PyAV.
"""

from __future__ import annotations

import wave
from collections.abc import Sequence
from pathlib import Path

import av
import cv2
import numpy as np
from numpy.typing import NDArray
from skimage import data


def astronaut() -> NDArray[np.uint8]:
    """The 512x512 RGB astronaut portrait."""
    return np.ascontiguousarray(data.astronaut(),  # type: ignore[no-untyped-call]
                                dtype=np.uint8)


def portrait_file(directory: Path, name: str = "amelia.png") -> Path:
    """The astronaut portrait saved as an avatar image file in ``directory``."""
    from PIL import Image

    path = directory / name
    Image.fromarray(astronaut()).save(path)
    return path


def shifted(image: NDArray[np.uint8], dx: float, dy: float) -> NDArray[np.uint8]:
    """``image`` translated by a sub-pixel ``(dx, dy)``, borders reflected."""
    matrix = np.array([[1.0, 0.0, dx], [0.0, 1.0, dy]], dtype=np.float32)
    out = cv2.warpAffine(image, matrix, (image.shape[1], image.shape[0]),
                         flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    return np.asarray(out, dtype=np.uint8)


def write_video(path: Path, frames: Sequence[NDArray[np.uint8]], *, fps: int = 25,
                codec: str = "libx264") -> Path:
    """Encode RGB frames as a yuv420p video at ``fps``."""
    height, width = frames[0].shape[:2]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        assert isinstance(stream, av.VideoStream)
        stream.width = width
        stream.height = height
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "16", "preset": "ultrafast"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_wav(path: Path, seconds: float, *, rate: int = 16_000) -> Path:
    """Syllable-like speech (a buzzy 160 Hz voice, 3 bursts a second) as a mono PCM16 WAV."""
    t = np.arange(round(seconds * rate)) / rate
    envelope = np.clip(np.sin(2 * np.pi * 3 * t), 0, None)
    tone = 0.5 * envelope * np.sin(2 * np.pi * 160 * t) * (1 + 0.5 * np.sin(2 * np.pi * 900 * t))
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes((tone * 32767).astype(np.int16).tobytes())
    return path
