"""avatarkit: one typed AvatarSession for real-time talking-avatar video.

    kit = AvatarKit.from_config("avatarkit.toml")
    async with kit, kit.session("amelia", consent=token, purpose="support") as s:
        await s.send_audio(AudioChunk.from_pcm16(pcm, sample_rate=24_000))
        await s.end_utterance()
"""

from .catalog import Avatar
from .config import (
    AvatarConfig,
    ConsentConfig,
    DisclosureConfig,
    KitConfig,
    SessionDefaults,
)
from .contract import Capabilities, ProviderProfile
from .disclosure.label_config import LabelConfig
from .disclosure.metadata import DisclosureMetadata
from .errors import (
    AllProvidersFailed,
    AuthenticationError,
    AvatarKitError,
    AvatarPreparationError,
    BillingError,
    BudgetExceeded,
    CapabilityError,
    ConfigError,
    ConsentCheck,
    ConsentExpired,
    ConsentOutOfScope,
    ConsentReplayed,
    ConsentRequired,
    ConsentStatusUnavailable,
    ConsentViolation,
    ConsentWithdrawn,
    ErrorCategory,
    FaceTooSmallError,
    InvalidConsentToken,
    InvalidRequestError,
    MediaFormatError,
    MediaReadError,
    NoFaceError,
    NoRouteError,
    NotFoundError,
    PolicyViolation,
    ProviderConnectionError,
    ProviderError,
    ProviderTimeoutError,
    RateLimitError,
    ResidencyViolation,
    ServerError,
    SessionStateError,
    WeightsError,
)
from .events import (
    BudgetWarning,
    Closed,
    ConsentRevoked,
    Interrupted,
    ProviderSwitched,
    SessionEvent,
    SessionStarted,
    SpeechEnded,
    SpeechStarted,
    UsageUpdated,
    parse_event,
)
from .join import JoinInfo, JoinKind
from .kit import AvatarKit
from .media import SUPPORTED_SAMPLE_RATES, AudioChunk, AudioFormat, AudioResampler, VideoFrame
from .routing.policy import RoutingPolicy
from .routing.router import RouteCandidate, RouteDecision
from .session import AvatarSession, SessionState

__version__ = "0.1.0"

__all__ = [
    "SUPPORTED_SAMPLE_RATES",
    "AllProvidersFailed",
    "AudioChunk",
    "AudioFormat",
    "AudioResampler",
    "AuthenticationError",
    "Avatar",
    "AvatarConfig",
    "AvatarKit",
    "AvatarKitError",
    "AvatarPreparationError",
    "AvatarSession",
    "BillingError",
    "BudgetExceeded",
    "BudgetWarning",
    "Capabilities",
    "CapabilityError",
    "Closed",
    "ConfigError",
    "ConsentCheck",
    "ConsentConfig",
    "ConsentExpired",
    "ConsentOutOfScope",
    "ConsentReplayed",
    "ConsentRequired",
    "ConsentRevoked",
    "ConsentStatusUnavailable",
    "ConsentViolation",
    "ConsentWithdrawn",
    "DisclosureConfig",
    "DisclosureMetadata",
    "ErrorCategory",
    "FaceTooSmallError",
    "Interrupted",
    "InvalidConsentToken",
    "InvalidRequestError",
    "JoinInfo",
    "JoinKind",
    "KitConfig",
    "LabelConfig",
    "MediaFormatError",
    "MediaReadError",
    "NoFaceError",
    "NoRouteError",
    "NotFoundError",
    "PolicyViolation",
    "ProviderConnectionError",
    "ProviderError",
    "ProviderProfile",
    "ProviderSwitched",
    "ProviderTimeoutError",
    "RateLimitError",
    "ResidencyViolation",
    "RouteCandidate",
    "RouteDecision",
    "RoutingPolicy",
    "ServerError",
    "SessionDefaults",
    "SessionEvent",
    "SessionStarted",
    "SessionState",
    "SessionStateError",
    "SpeechEnded",
    "SpeechStarted",
    "UsageUpdated",
    "VideoFrame",
    "WeightsError",
    "__version__",
    "parse_event",
]

# Show the public path in reprs, tracebacks and docs (as httpx does).
for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type) and _obj.__module__.startswith("avatarkit."):
        _obj.__module__ = "avatarkit"
del _name, _obj
