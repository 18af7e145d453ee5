"""What the shared provider contract suite needs to know about one vendor.

Each vendor supplies a :class:`VendorHarness` (``harness_<vendor>.py``): how to serve its
emulator, the ``[providers.NAME]`` settings that point the SDK at it, the avatar ids it knows,
and how to read back from the emulator what arrived on its wire. ``test_provider_contract.py``
runs one parametrised suite over every harness in ``HARNESSES``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import numpy as np
from numpy.typing import NDArray

from avatarkit.emulators._base import EmulatorServer

__all__ = ["FAST_RETRY", "VendorHarness"]

FAST_RETRY = {"max_retries": 3, "initial_backoff": 0.01, "max_backoff": 0.05}


class VendorHarness(ABC):
    """One vendor under the contract suite."""

    #: the adapter's registered name (also the provider section name used by the suite)
    name: ClassVar[str]
    #: the JoinInfo kind sessions report with the settings from :meth:`provider_settings`
    join_kind: ClassVar[str]
    #: whether video frames reach this process (``AvatarSession.video()``)
    frames_in_process: ClassVar[bool] = False

    @abstractmethod
    def serve(self) -> AsyncIterator[EmulatorServer]:
        """An async generator yielding a started emulator that knows the faces of
        :meth:`avatar_ids` and the api key of :meth:`provider_settings`; it stops it after."""

    @abstractmethod
    def provider_settings(self, emulator: EmulatorServer) -> dict[str, Any]:
        """``[providers.NAME]`` keys pointing at ``emulator`` (api key, base url, a known
        ``price_per_minute``, ``retry = FAST_RETRY``...)."""

    @abstractmethod
    def avatar_ids(self) -> dict[str, str]:
        """The vendor's face id for each test avatar: ``{"amelia": ..., "bob": ...}``."""

    def bad_credentials(self) -> dict[str, Any]:
        """Settings overrides that make the vendor refuse us (401/403)."""
        return {"api_key": "not-the-right-key"}

    @abstractmethod
    def received_audio_seconds(self, emulator: EmulatorServer) -> float:
        """Seconds of audio the emulator accepted, over every session it served."""

    @abstractmethod
    def check_wire_format(self, emulator: EmulatorServer) -> None:
        """Assert that the audio arrived in the vendor's format (rate, encoding, message
        sizes), from what the emulator recorded. Called after a full session."""

    def drop_channel_after(self, emulator: EmulatorServer, audio_seconds: float) -> None:
        """Make the emulator drop the session's channel after that much audio."""
        emulator.faults.drop_channel_after(audio_seconds)

    def mute_interrupts(self, emulator: EmulatorServer) -> None:
        """Make the emulator stop acknowledging interrupts (it still stops speaking)."""
        emulator.faults.mute_interrupts = True

    def creates(self, emulator: EmulatorServer) -> int:
        """How many session creates reached the emulator (failed ones included)."""
        return sum(1 for r in emulator.requests if self.is_create(r.method, r.path))

    def mouth_opening(self, rgb: NDArray[np.uint8]) -> float:
        """How open the avatar's mouth is in a received frame (about 0 closed .. 1 open).
        The default reads the emulators' synthetic talking face; a real engine measures
        its own avatar."""
        from avatarkit.emulators._media import mouth_opening

        return mouth_opening(rgb)

    @abstractmethod
    def is_create(self, method: str, path: str) -> bool:
        """Whether a request is the vendor's billed session create."""
