"""Which engine renders: ``build_engine("lite", "amelia.jpg")`` prepares the avatar (cached)
and returns the engine, ready for an :class:`~avatarkit.local_engine.runner.AvatarRunner`.

Engines by name (``engine = "..."`` in ``[providers.local]``, ``--engine`` on the CLI):

* ``lite``: the weightless CPU engine (:mod:`avatarkit.local_engine.lite`), always available;
* ``musetalk``: the MuseTalk GPU engine, which needs its weights; not part of this release
  yet, so asking for it is a :class:`~avatarkit.errors.ConfigError` that says so.

:func:`choose_engine` is the ``auto`` rule the demo and the default config use: MuseTalk when
weights are configured and the engine is available, else lite, with the reason.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, get_args

from ..errors import ConfigError
from .engine import LipSyncEngine

__all__ = ["ENGINES", "EngineChoice", "EngineName", "build_engine", "choose_engine"]

EngineName = Literal["lite", "musetalk"]
ENGINES: tuple[str, ...] = get_args(EngineName)
#: engines this build can run
_AVAILABLE = frozenset({"lite"})


class EngineChoice:
    """The engine picked and why (printed by ``avatarkit demo``)."""

    def __init__(self, name: EngineName, reason: str) -> None:
        self.name = name
        self.reason = reason

    def __repr__(self) -> str:
        return f"EngineChoice({self.name!r}, {self.reason!r})"


def choose_engine(requested: str = "auto", *,
                  weights: str | os.PathLike[str] | None = None) -> EngineChoice:
    """Resolve ``auto`` (or check an explicit name): MuseTalk when ``weights`` are given and
    the engine is available, else lite."""
    if requested == "auto":
        if weights is None:
            return EngineChoice("lite", "no MuseTalk weights configured: the weightless CPU "
                                        "engine renders")
        if "musetalk" in _AVAILABLE:
            return EngineChoice("musetalk", f"MuseTalk weights configured at {weights}")
        return EngineChoice("lite", "MuseTalk weights are configured but this build has no "
                                    "MuseTalk engine yet: the weightless CPU engine renders")
    _check_name(requested)
    return EngineChoice(requested, "requested")  # type: ignore[arg-type]


def _check_name(name: str) -> None:
    if name not in ENGINES:
        raise ConfigError(f"unknown engine {name!r}; expected one of "
                          f"{', '.join(ENGINES)} or auto", field="engine")
    if name not in _AVAILABLE:
        raise ConfigError(f"the {name!r} engine is not available in this build of avatarkit; "
                          "use engine = \"lite\" (the weightless CPU engine)", field="engine")


def build_engine(name: str, avatar: str | os.PathLike[str], *, fps: float | None = None,
                 sample_rate: int = 16_000, cache_dir: str | os.PathLike[str] | None = None,
                 weights: str | os.PathLike[str] | None = None,
                 progress: bool = False) -> LipSyncEngine:
    """Prepare ``avatar`` (an image or a video; cached on disk) and build engine ``name``.

    Blocking and CPU-heavy on a cache miss (face analysis): call it in a worker thread from
    async code. Raises :class:`~avatarkit.errors.ConfigError` for an unknown or unavailable
    engine, and the avatar preparation errors (``MediaReadError``, ``NoFaceError``,
    ``FaceTooSmallError``) for unusable media.
    """
    _check_name(name)
    del weights  # read by the MuseTalk engine only
    from .avatar import prepare_avatar
    from .lite import LiteEngine

    prepared = prepare_avatar(Path(avatar), cache_dir=cache_dir, progress=progress)
    engine = LiteEngine(prepared, fps=fps, sample_rate=sample_rate)
    engine.warm_up()
    return engine
