"""Which engine renders: ``build_engine("lite", "amelia.jpg")`` prepares the avatar (cached)
and returns the engine, ready for an :class:`~avatarkit.local_engine.runner.AvatarRunner`.

Engines by name (``engine = "..."`` in ``[providers.local]``, ``--engine`` on the CLI):

* ``lite``: the weightless CPU engine (:mod:`avatarkit.local_engine.lite`), always available;
* ``musetalk``: the MuseTalk engine (:mod:`avatarkit.local_engine.musetalk`), which needs
  MuseTalk's released weights (``weights = DIR``, the official folder layout) and torch,
  diffusers and transformers (``pip install avatarkit[musetalk]``); a CUDA GPU for real time.

:func:`choose_engine` is the ``auto`` rule the demo and the default config use: MuseTalk when
weights are configured and the engine is available, else lite, with the reason.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, get_args

from pydantic import BaseModel, ValidationError

from ..errors import ConfigError
from .engine import LipSyncEngine

if TYPE_CHECKING:
    from .avatar import PreparedAvatar

__all__ = [
    "ENGINES",
    "EngineChoice",
    "EngineName",
    "available_engines",
    "build_engine",
    "choose_engine",
]

EngineName = Literal["lite", "musetalk"]
ENGINES: tuple[str, ...] = get_args(EngineName)
#: the modules the MuseTalk engine needs (the ``musetalk`` extra)
_MUSETALK_MODULES = ("torch", "diffusers", "transformers")


def available_engines() -> frozenset[str]:
    """The engines this installation can run: lite always, MuseTalk when torch, diffusers
    and transformers are installed."""
    if all(importlib.util.find_spec(m) is not None for m in _MUSETALK_MODULES):
        return frozenset({"lite", "musetalk"})
    return frozenset({"lite"})


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
        if "musetalk" in available_engines():
            return EngineChoice("musetalk", f"MuseTalk weights configured at {weights}")
        return EngineChoice("lite", "MuseTalk weights are configured but torch, diffusers or "
                                    "transformers is missing (pip install avatarkit[musetalk])"
                                    ": the weightless CPU engine renders")
    _check_name(requested)
    return EngineChoice(requested, "requested")  # type: ignore[arg-type]


def _check_name(name: str) -> None:
    if name not in ENGINES:
        raise ConfigError(f"unknown engine {name!r}; expected one of "
                          f"{', '.join(ENGINES)} or auto", field="engine")
    if name not in available_engines():
        raise ConfigError(f"the {name!r} engine needs torch, diffusers and transformers: pip "
                          "install avatarkit[musetalk], or use engine = \"lite\" (the "
                          "weightless CPU engine)", field="engine")


def build_engine(name: str, avatar: str | os.PathLike[str] | PreparedAvatar, *,
                 fps: float | None = None,
                 sample_rate: int = 16_000, cache_dir: str | os.PathLike[str] | None = None,
                 weights: str | os.PathLike[str] | None = None,
                 musetalk: Mapping[str, Any] | None = None,
                 lite: Mapping[str, Any] | None = None,
                 progress: bool = False) -> LipSyncEngine:
    """Prepare ``avatar`` (an image or a video; cached on disk; or an avatar already
    prepared) and build engine ``name``.

    ``weights`` is MuseTalk's weights folder (required for ``musetalk``); ``musetalk`` holds
    its :class:`~avatarkit.local_engine.musetalk.options.MuseTalkOptions` (device, precision,
    backend, batch size...); ``lite`` the lite engine's
    :class:`~avatarkit.local_engine.lite.LiteOptions` (``max_side``...).

    Blocking and CPU-heavy on a cache miss (face analysis, and for MuseTalk loading the
    weights and encoding the avatar's latents): call it in a worker thread from async code.
    Raises :class:`~avatarkit.errors.ConfigError` for an unknown or unavailable engine or bad
    options, :class:`~avatarkit.errors.WeightsError` for an unusable weights folder, and the
    avatar preparation errors (``MediaReadError``, ``NoFaceError``, ``FaceTooSmallError``)
    for unusable media.
    """
    _check_name(name)
    if name == "musetalk":
        if lite:
            raise ConfigError("lite options are for the lite engine", field="lite")
        return _build_musetalk(avatar, fps=fps, sample_rate=sample_rate, cache_dir=cache_dir,
                               weights=weights, options=musetalk, progress=progress)
    from .lite import LiteEngine, LiteOptions

    opts = _options(LiteOptions, lite, "lite")
    prepared = _prepared(avatar, cache_dir=cache_dir, progress=progress)
    engine = LiteEngine(prepared, fps=fps, sample_rate=sample_rate, options=opts)
    engine.warm_up()
    return engine


_Options = TypeVar("_Options", bound=BaseModel)


def _options(model: type[_Options], given: Mapping[str, Any] | None, field: str) -> _Options:
    """``model`` validated from ``given``; a bad value is a ConfigError naming it."""
    try:
        return model.model_validate(dict(given or {}))
    except ValidationError as exc:
        first = exc.errors(include_input=False, include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(first["msg"], field=f"{field}.{where}") from None


def _prepared(avatar: str | os.PathLike[str] | PreparedAvatar, *,
              cache_dir: str | os.PathLike[str] | None, progress: bool) -> PreparedAvatar:
    from .avatar import PreparedAvatar, prepare_avatar

    if isinstance(avatar, PreparedAvatar):
        return avatar
    return prepare_avatar(Path(avatar), cache_dir=cache_dir, progress=progress)


def _build_musetalk(avatar: str | os.PathLike[str] | PreparedAvatar, *, fps: float | None,
                    sample_rate: int,
                    cache_dir: str | os.PathLike[str] | None,
                    weights: str | os.PathLike[str] | None,
                    options: Mapping[str, Any] | None, progress: bool) -> LipSyncEngine:
    from .musetalk.options import MuseTalkOptions

    if weights is None:
        raise ConfigError("the MuseTalk engine needs its weights folder (weights = DIR, "
                          "--weights DIR)", field="weights")
    opts = _options(MuseTalkOptions, options, "musetalk")
    from .musetalk.engine import MuseTalkEngine, resolve_placement
    from .musetalk.weights import load_networks

    device, _ = resolve_placement(opts)  # fails early when the device is not there
    # fp32 on the device: the avatar's latents are encoded at full precision; the engine
    # converts the networks to its precision afterwards
    networks = load_networks(weights, version=opts.version, device=device)
    prepared = _prepared(avatar, cache_dir=cache_dir, progress=progress)
    return MuseTalkEngine(prepared, networks, options=opts, fps=fps, sample_rate=sample_rate,
                          cache_dir=cache_dir)
