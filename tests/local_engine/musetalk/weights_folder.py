"""Test helper: tiny MuseTalk networks with random weights, and a weights folder in the
official layout written from them (what ``load_networks`` / ``check_weights`` read).

    from tests.local_engine.musetalk.weights_folder import tiny_networks, write_tiny_weights

    layout = write_tiny_weights(tmp_path / "models")              # v1.5, .bin files
    networks = load_networks(layout.root)                         # equal to tiny_networks(0)
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from avatarkit.local_engine.musetalk.configs import MuseTalkConfigs
from avatarkit.local_engine.musetalk.weights import (
    MuseTalkNetworks,
    MuseTalkVersion,
    WeightsLayout,
    random_networks,
    write_weights_folder,
)

__all__ = ["tiny_networks", "write_tiny_weights"]


def tiny_networks(seed: int = 0) -> MuseTalkNetworks:
    """Networks of :meth:`MuseTalkConfigs.tiny` with random weights; the same ``seed`` gives
    the same weights."""
    return random_networks(MuseTalkConfigs.tiny(), seed=seed)


def write_tiny_weights(root: Path, *, version: MuseTalkVersion = "v1.5", seed: int = 0,
                       vae_format: Literal["bin", "safetensors"] = "bin",
                       whisper_format: Literal["bin", "safetensors"] = "bin") -> WeightsLayout:
    """Write :func:`tiny_networks` (``seed``) into ``root`` in the official layout."""
    return write_weights_folder(root, tiny_networks(seed), version=version,
                                vae_format=vae_format, whisper_format=whisper_format)
