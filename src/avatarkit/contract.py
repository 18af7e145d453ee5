"""The provider contract: ``Provider`` starts vendor sessions, ``ProviderSession`` is one of them.

An adapter receives audio already converted to the format its profile declares
(``ProviderProfile.audio_format``); it moves it over the vendor's wire, turns the vendor's
messages into ``ProviderSignal`` values, and ends the session at the vendor when asked.
Everything else (state machine, resampling, interrupt timeouts, events, metering) lives in
``AvatarSession`` so every adapter behaves alike.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from decimal import Decimal
from types import TracebackType
from typing import Any, ClassVar, Self

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from .disclosure.label_config import LabelConfig
from .disclosure.metadata import DisclosureMetadata
from .errors import CapabilityError, ErrorCategory, ProviderConnectionError, ProviderError
from .join import JoinInfo, JoinKind
from .media import AudioChunk, AudioFormat, VideoFrame
from .vendor_http import RetryPolicy

__all__ = [
    "Capabilities",
    "MaxDurationTimer",
    "PlaybackFinished",
    "PlaybackStarted",
    "Provider",
    "ProviderProfile",
    "ProviderSession",
    "ProviderSettings",
    "ProviderSignal",
    "SessionRequest",
    "VendorSessionEnded",
    "wait_unless_lost",
]


class ProviderSettings(BaseModel):
    """Settings every provider accepts (``[providers.NAME]`` in the config file).

    Vendor adapters subclass this with their own fields. Unknown keys are errors, so a typo
    is reported with its field path instead of being ignored.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str | None = Field(
        default=None, description="The adapter, when the section's name is not one: "
        "[providers.tavus-eu] kind = \"tavus\" configures a second Tavus account or plan.")
    enabled: bool = True
    plan: str | None = Field(default=None, description="Your plan at the vendor, recorded "
                             "with usage (price_per_minute is that plan's price).")
    api_key: SecretStr | None = None
    base_url: str | None = None
    price_per_minute: Decimal | None = Field(
        default=None, ge=0, description="Your negotiated price; unknown stays unknown (None)."
    )
    currency: str = "USD"
    regions: frozenset[str] | None = Field(
        default=None, description="Where the vendor renders; None means unknown, never anywhere."
    )
    first_frame_latency_ms: float | None = Field(default=None, gt=0)
    timeout: float = Field(default=15.0, gt=0, description="Per HTTP request, seconds.")
    retry: RetryPolicy = Field(default_factory=RetryPolicy)


class Capabilities(BaseModel):
    """What a provider can do; routing filters on these."""

    model_config = ConfigDict(frozen=True)

    audio_input: bool = True
    text_input: bool = False
    interrupt: bool = True
    playback_events: bool = Field(
        default=True, description="The vendor reports when speech starts and ends."
    )
    frames_in_process: bool = Field(
        default=False, description="Video frames reach this process (AvatarSession.video())."
    )
    join_kinds: frozenset[JoinKind] = frozenset()


class ProviderProfile(BaseModel):
    """A provider's facts as routing sees them.

    ``price_per_minute`` and ``regions`` are ``None`` when unknown: a constraint on an unknown
    value fails closed; they never read as 0 or "anywhere".
    """

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    name: str
    vendor: str | None = Field(
        default=None, description="The adapter (vendor) behind the name: 'tavus' for a "
        "[providers.tavus-eu] section of kind tavus. None means the same as name.")
    capabilities: Capabilities
    audio_format: AudioFormat
    price_per_minute: Decimal | None = None
    currency: str = "USD"
    regions: frozenset[str] | None = None
    self_hosted: bool = False
    first_frame_latency_ms: float | None = Field(
        default=None, description="Declared (not observed) time to first frame."
    )


@dataclass(frozen=True, slots=True)
class SessionRequest:
    """What AvatarSession asks a provider to start."""

    session_id: str
    avatar: str
    avatar_id: str
    idempotency_key: str
    disclosure: DisclosureMetadata
    purpose: str | None = None
    max_duration_s: float | None = None
    #: the caller's consent token, for a self-hosted engine server that verifies it itself
    #: (vendor adapters never send it anywhere)
    consent_token: SecretStr | None = None
    #: how a provider that draws the frames itself (self-hosted) burns the label in; None for
    #: vendors, and when the label is disabled
    burned_label: LabelConfig | None = None


@dataclass(frozen=True, slots=True)
class PlaybackStarted:
    """The renderer started speaking ``utterance_id``."""

    utterance_id: str


@dataclass(frozen=True, slots=True)
class PlaybackFinished:
    """The renderer stopped speaking ``utterance_id``.

    ``interrupted`` is True when it stopped because of an interrupt (this is the interrupt's
    acknowledgement); ``duration`` is the seconds spoken, when the vendor said.
    """

    utterance_id: str | None
    duration: float | None
    interrupted: bool


@dataclass(frozen=True, slots=True)
class VendorSessionEnded:
    """The vendor ended the session or the channel to it died.

    ``billing_stopped`` tells whether the vendor stopped billing (a vendor-side end) or the
    session may still be open and billed there (a dropped channel). ``recoverable`` is False
    when the vendor ended it on purpose (its max duration, an idle or no-show timeout):
    failing over to another provider would only restart the meter.
    """

    reason: str
    billing_stopped: bool
    error: ProviderError | None = None
    recoverable: bool = True


ProviderSignal = PlaybackStarted | PlaybackFinished | VendorSessionEnded


async def wait_unless_lost(ready: Coroutine[Any, Any, object], lost: asyncio.Event, *,
                           within: float) -> bool:
    """Wait for ``ready`` for at most ``within`` seconds, giving up as soon as ``lost`` is set
    (the channel died while a start waited for it). True when ``ready`` finished."""
    waiting = asyncio.ensure_future(ready)
    dead = asyncio.ensure_future(lost.wait())
    try:
        done, _ = await asyncio.wait({waiting, dead}, timeout=within,
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (waiting, dead):
            task.cancel()
        await asyncio.gather(waiting, dead, return_exceptions=True)
    return waiting in done


class MaxDurationTimer:
    """The session's ``max_duration_s``, enforced here for a vendor whose create takes no
    such limit: when it expires, ``on_expiry`` gets a non-recoverable ``VendorSessionEnded``
    (billing not stopped: the close path ends the vendor session)."""

    def __init__(self, seconds: float | None,
                 on_expiry: Callable[[VendorSessionEnded], None]) -> None:
        self.seconds = seconds
        self._on_expiry = on_expiry
        self._handle: asyncio.TimerHandle | None = None

    def arm(self) -> None:
        """Start counting (once the session is live)."""
        if self.seconds is not None and self._handle is None:
            self._handle = asyncio.get_running_loop().call_later(self.seconds, self._expire)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _expire(self) -> None:
        self._handle = None
        assert self.seconds is not None
        self._on_expiry(VendorSessionEnded(reason=f"max_duration_s ({self.seconds:g} s) reached",
                                           billing_stopped=False, recoverable=False))


class ProviderSession(ABC):
    """One live session at a vendor.

    Adapters implement the four ``_``-free abstract methods plus ``_end_at_vendor``; they call
    ``_emit`` for every vendor event worth reporting and ``_vendor_stopped_billing`` when the
    vendor says it ended the session on its own.
    """

    def __init__(self, *, provider: str, vendor_session_id: str, join: JoinInfo) -> None:
        self.provider = provider
        self.vendor_session_id = vendor_session_id
        self.join = join
        #: monotonic time the vendor started billing (session create, not viewer join)
        self.billing_started_at = time.monotonic()
        #: monotonic time billing stopped (vendor-side end or our confirmed end)
        self.billing_ended_at: float | None = None
        self._signals: asyncio.Queue[ProviderSignal | None] = asyncio.Queue()
        self._end_lock = asyncio.Lock()
        self._ended = False

    # -- what adapters implement ----------------------------------------------------------

    @abstractmethod
    async def send_audio(self, chunk: AudioChunk, *, utterance_id: str) -> None:
        """Send audio of utterance ``utterance_id`` (already in the profile's format)."""

    @abstractmethod
    async def end_utterance(self, *, utterance_id: str) -> None:
        """Mark the end of utterance ``utterance_id`` (flush what is buffered)."""

    @abstractmethod
    async def interrupt(self) -> None:
        """Ask the vendor to stop speaking now and drop what it has queued.

        Returns once the request is sent; the acknowledgement arrives as a
        ``PlaybackFinished(interrupted=True)`` signal (or never, with a mute vendor).
        """

    @abstractmethod
    async def _end_at_vendor(self) -> None:
        """End the session at the vendor and close channels. Raise ``ProviderError`` when the
        vendor could not confirm; ``end()`` is called again to retry."""

    def video_frames(self) -> AsyncIterator[VideoFrame]:
        """Video frames, for providers whose frames reach this process."""
        raise CapabilityError(
            f"{self.provider} does not deliver video frames to this process; "
            f"viewers join through {self.join.kind!r}"
        )

    # -- shared behaviour -----------------------------------------------------------------

    @property
    def ended(self) -> bool:
        """True once the vendor confirmed the end."""
        return self._ended

    @property
    def billed_seconds(self) -> float:
        """Seconds the vendor bills for: from create until its end (or now, if still open)."""
        end = self.billing_ended_at if self.billing_ended_at is not None else time.monotonic()
        return max(0.0, end - self.billing_started_at)

    async def end(self) -> None:
        """End the session at the vendor. Idempotent; after a failure, calling again retries."""
        async with self._end_lock:
            if self._ended:
                return
            await self._end_at_vendor()
            self._ended = True
            if self.billing_ended_at is None:
                self.billing_ended_at = time.monotonic()
            self._signals.put_nowait(None)

    async def signals(self) -> AsyncIterator[ProviderSignal]:
        """The vendor's events, normalised, until the session is ended."""
        while (signal := await self._signals.get()) is not None:
            yield signal

    def _emit(self, signal: ProviderSignal) -> None:
        self._signals.put_nowait(signal)

    def _channel_lost(self, what: str, error: ProviderConnectionError | None = None) -> None:
        """Report that the realtime channel ``what`` died (``error``) or closed without the
        vendor ending the session (``None``; nothing is reported after a vendor-side end).
        Billing may still run at the vendor: the close path ends the session there."""
        if error is None:
            if self.billing_ended_at is not None:
                return
            error = ProviderConnectionError(f"{what} closed", provider=self.provider)
            reason = f"{what} closed"
        else:
            reason = f"{what} dropped"
        self._emit(VendorSessionEnded(reason=reason, billing_stopped=False, error=error))

    def _vendor_stopped_billing(self) -> None:
        if self.billing_ended_at is None:
            self.billing_ended_at = time.monotonic()


class Provider(ABC):
    """A rendering provider: holds its settings and starts sessions.

    Subclasses set ``name`` (the registry key: the adapter), optionally ``aliases`` and
    ``settings_model``. ``instance_name`` is the name it is configured under, which differs
    from ``name`` when one adapter serves several sections (``[providers.tavus-eu] kind =
    "tavus"``); events, errors, routing and usage use ``instance_name``.
    """

    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    settings_model: ClassVar[type[ProviderSettings]] = ProviderSettings
    #: How the adapter talks to the vendor, in a line (the support matrix shows it).
    wire: ClassVar[str] = ""
    #: Contract points the adapter relies on that are not confirmed by the vendor.
    unverified: ClassVar[tuple[str, ...]] = ()
    #: Whether a start that fails on a timeout or a lost connection may have left a billed
    #: session the adapter could not end (its create reached the vendor, the answer did not
    #: come back). The kit then searches for it (``find_session``). An adapter that can always
    #: end what it began (it holds a handle before anything bills) sets this False.
    uncertain_creates: ClassVar[bool] = True
    #: Settings variants worth a row of their own in the support matrix (by label).
    documented_variants: ClassVar[dict[str, dict[str, object]]] = {}

    def __init__(self, settings: ProviderSettings, *, http: httpx.AsyncClient,
                 instance_name: str | None = None) -> None:
        self.settings = settings
        self._http_client = http
        self.instance_name = instance_name or self.name

    @property
    @abstractmethod
    def profile(self) -> ProviderProfile:
        """The provider's capabilities, price, regions and audio format."""

    @abstractmethod
    async def start(self, request: SessionRequest) -> ProviderSession:
        """Start a vendor session. On any failure after the vendor created something, the
        adapter ends it before raising: no half-created sessions."""

    def may_have_created(self, error: ProviderError) -> bool:
        """Whether a start that failed with ``error`` may have left a billed session this
        adapter could not end: the create's answer was lost (a timeout, a dropped connection)
        and the adapter cannot rule it out (``uncertain_creates``). The kit then searches for
        the session and ends it."""
        return self.uncertain_creates and error.category in (ErrorCategory.TIMEOUT,
                                                             ErrorCategory.CONNECTIVITY)

    async def probe(self) -> None:  # noqa: B027  (optional hook, not abstract)
        """A cheap, unbilled, authenticated call that says the vendor answers (health recovery
        probes). Raise ``ProviderError`` when it does not. The default does nothing: a
        provider without a probe is retried by traffic once its cooldown ends."""

    async def end_session(self, vendor_session_id: str) -> None:
        """End a vendor session by its id, from any process (the reaper ends sessions whose
        owner died). Ending one that is already over is not an error."""
        raise CapabilityError(f"{self.instance_name} cannot end sessions by id")

    async def find_session(self, *, session_id: str, idempotency_key: str) -> str | None:
        """The vendor id of a still-open session created by the attempt ``idempotency_key``
        (of ``session_id``); None when the vendor says there is none. The reaper and the
        late-create search use it when the create's answer was never recorded. Raises
        ``CapabilityError`` when the vendor cannot be asked: the row then stays open for a
        human, never marked as nothing-created."""
        raise CapabilityError(f"{self.instance_name} cannot look up sessions by name")

    def _build_profile(
        self,
        *,
        capabilities: Capabilities,
        audio_format: AudioFormat,
        regions: frozenset[str] | None = None,
        first_frame_latency_ms: float | None = None,
        self_hosted: bool = False,
    ) -> ProviderProfile:
        """Profile from the adapter's facts, with the operator's settings taking precedence."""
        s = self.settings
        return ProviderProfile(
            name=self.instance_name,
            vendor=self.name,
            capabilities=capabilities,
            audio_format=audio_format,
            price_per_minute=s.price_per_minute,
            currency=s.currency,
            regions=s.regions if s.regions is not None else regions,
            self_hosted=self_hosted,
            first_frame_latency_ms=s.first_frame_latency_ms or first_frame_latency_ms,
        )

    async def aclose(self) -> None:  # noqa: B027  (optional hook, not abstract)
        """Release what the provider holds (not the kit's shared HTTP client)."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.instance_name!r}>"
