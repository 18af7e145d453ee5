"""`import avatarkit` stays light: no torch, aiortc, mediapipe (nor the emulator's aiohttp)."""

from __future__ import annotations

import subprocess
import sys

import avatarkit


def test_core_import_pulls_no_heavy_modules() -> None:
    code = ("import avatarkit, sys; "
            "heavy = {'torch', 'aiortc', 'mediapipe', 'aiohttp', 'daily'} & "
            "{m.split('.')[0] for m in sys.modules}; print(sorted(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_public_names_are_exported_and_rooted() -> None:
    for name in avatarkit.__all__:
        assert hasattr(avatarkit, name), name
    assert avatarkit.AvatarSession.__module__ == "avatarkit"
    assert issubclass(avatarkit.ProviderError, avatarkit.AvatarKitError)
    assert issubclass(avatarkit.PolicyViolation, avatarkit.AvatarKitError)
    assert issubclass(avatarkit.ConfigError, avatarkit.AvatarKitError)
    assert not avatarkit.PolicyViolation.retryable
