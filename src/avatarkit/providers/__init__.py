"""Rendering providers: the contract every vendor adapter implements, and the registry.

Third-party packages add providers through the ``avatarkit.providers`` entry-point group
(``name = "package.module:ProviderClass"``) or by calling :func:`register` at import time.
"""

from ..contract import (
    Capabilities,
    PlaybackFinished,
    PlaybackStarted,
    Provider,
    ProviderProfile,
    ProviderSession,
    ProviderSettings,
    ProviderSignal,
    SessionRequest,
    VendorSessionEnded,
)
from .registry import available_providers, get_provider_class, register

__all__ = [
    "Capabilities",
    "PlaybackFinished",
    "PlaybackStarted",
    "Provider",
    "ProviderProfile",
    "ProviderSession",
    "ProviderSettings",
    "ProviderSignal",
    "SessionRequest",
    "VendorSessionEnded",
    "available_providers",
    "get_provider_class",
    "register",
]
