"""The sample media bundled with the SDK, for demos, examples and benchmarks.

* :func:`sample_avatar_path`: a public-domain portrait (see ``avatarkit/assets/README.md``),
  registered by the demo as the avatar ``sample`` (:data:`SAMPLE_AVATAR`);
* :func:`sample_speech_path`: an eSpeak NG speech clip, 16 kHz mono WAV (read it with
  :func:`avatarkit.render.read_speech`).

The files ship inside the wheel; these functions only locate them (nothing is read or
imported until you open them).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

__all__ = ["SAMPLE_AVATAR", "sample_avatar_path", "sample_speech_path"]

#: the name the demo registers the sample portrait under
SAMPLE_AVATAR = "sample"


def sample_avatar_path() -> Path:
    """The bundled public-domain portrait (JPEG)."""
    return Path(str(files("avatarkit") / "assets" / "sample_avatar.jpg"))


def sample_speech_path() -> Path:
    """The bundled eSpeak NG speech clip (16 kHz mono WAV)."""
    return Path(str(files("avatarkit") / "assets" / "sample_speech.wav"))
