"""The sample media bundled with the SDK, for demos, examples and benchmarks.

* :func:`sample_avatar_path`: a public-domain portrait (see ``avatarkit/assets/README.md``),
  registered by the demo as the avatar ``sample`` (:data:`SAMPLE_AVATAR`);
* :func:`sample_speech_path`: an eSpeak NG speech clip, 16 kHz mono WAV (read it with
  :func:`avatarkit.render.read_speech`);
* :func:`sample_config`: the demo's kit config: only the local provider, the sample avatar,
  and the self-hosted-only policy :data:`SAMPLE_POLICY`.

The files ship inside the wheel; these functions only locate them (nothing is read or
imported until you open them).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

from .config import KitConfig

__all__ = ["SAMPLE_AVATAR", "SAMPLE_POLICY", "sample_avatar_path", "sample_config",
           "sample_speech_path"]

#: the name the demo registers the sample portrait under
SAMPLE_AVATAR = "sample"
#: the demo's policy: self-hosted providers only, nothing leaves this machine
SAMPLE_POLICY = "private"


def sample_avatar_path() -> Path:
    """The bundled public-domain portrait (JPEG)."""
    return Path(str(files("avatarkit") / "assets" / "sample_avatar.jpg"))


def sample_speech_path() -> Path:
    """The bundled eSpeak NG speech clip (16 kHz mono WAV)."""
    return Path(str(files("avatarkit") / "assets" / "sample_speech.wav"))


def sample_config(consent: dict[str, Any], *, weights: Path | None, cache_dir: Path | None,
                  subject: str, **local: Any) -> KitConfig:
    """A kit config with only the local provider (``local`` holds more of its settings), the
    sample avatar (its consent subject ``subject``), the policy :data:`SAMPLE_POLICY`, the
    ``[consent]`` section ``consent`` and an in-memory session ledger."""
    return KitConfig(
        providers={"local": {"engine": "auto", "weights": weights, "cache_dir": cache_dir,
                             **local}},
        avatars={SAMPLE_AVATAR: {"display_name": "Sample (public-domain portrait)",
                                 "local": str(sample_avatar_path()),
                                 "consent_subject": subject}},
        policies={SAMPLE_POLICY: {"description": "self-hosted only: nothing leaves this machine",
                                  "self_hosted_only": True}},
        consent=consent,
        metering={"ledger": ":memory:"},
    )
