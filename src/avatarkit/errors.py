"""The avatarkit exception tree.

Every error the SDK raises derives from :class:`AvatarKitError`::

    AvatarKitError
    ├── ConfigError                 bad or missing configuration (names the field)
    │   └── WeightsError            unusable model weights (``file``, ``missing``,
    │                               ``unexpected``, ``mismatched`` keys)
    ├── MediaFormatError            audio/video input that cannot be used (names the field)
    ├── SessionStateError           an operation not allowed in the session's current state
    ├── CapabilityError             the chosen provider cannot do this (e.g. no in-process video)
    ├── AvatarPreparationError      preparing a local-engine avatar failed (``source``)
    │   ├── MediaReadError          missing, empty or undecodable image/video (``reason``)
    │   ├── NoFaceError             no face in a frame (``frame_index``)
    │   └── FaceTooSmallError       face box below ``min_face_size`` (``size``, ``min_size``)
    ├── NoRouteError                no configured provider can serve the request (carries the
    │                               RouteDecision that says why each was excluded)
    ├── AllProvidersFailed          every provider tried at start failed (an ExceptionGroup of
    │                               each one's ProviderError)
    ├── ProviderError               a vendor call failed (provider, status, request id, category)
    │   ├── AuthenticationError     401/403: the key is wrong or lacks permission
    │   ├── BillingError            402 / quota: out of credits, concurrency slots exhausted
    │   ├── RateLimitError          429: carries ``retry_after`` (seconds) when the vendor says
    │   ├── InvalidRequestError     other 4xx: the request itself is wrong
    │   ├── NotFoundError           404: the avatar, session or resource does not exist
    │   ├── ServerError             5xx: the vendor failed
    │   ├── ProviderConnectionError the request never completed (DNS, refused, reset, dropped WS)
    │   └── ProviderTimeoutError    the vendor did not answer in time
    └── PolicyViolation             never retried, never failed over
        ├── ConsentViolation        no valid consent for this likeness/purpose (``check``
        │   │                       names the failed check, a ``ConsentCheck``)
        │   ├── ConsentRequired     no token was presented
        │   ├── InvalidConsentToken malformed, wrong algorithm/type/key/issuer/audience,
        │   │                       bad signature, missing claims
        │   ├── ConsentExpired      outside the token's validity window
        │   ├── ConsentOutOfScope   avatar, purpose, channel, provider, region, ... not granted
        │   ├── ConsentWithdrawn    revoked or suspended on the status list
        │   ├── ConsentStatusUnavailable  the status list is stale, unreachable or invalid
        │   └── ConsentReplayed     a single-use token was presented again
        ├── ResidencyViolation      the data may not go where the provider renders
        └── BudgetExceeded          a minute or money cap would be crossed

Split as httpx does: "the request never completed" (connection, timeout) versus "the vendor
answered with an error" (status subclasses). ``ErrorCategory`` (after Pipecat's) tells the
router whether a failure is worth trying elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from typing import Self

__all__ = [
    "AllProvidersFailed",
    "AuthenticationError",
    "AvatarKitError",
    "AvatarPreparationError",
    "BillingError",
    "BudgetExceeded",
    "CapabilityError",
    "ConfigError",
    "ConsentCheck",
    "ConsentExpired",
    "ConsentOutOfScope",
    "ConsentReplayed",
    "ConsentRequired",
    "ConsentStatusUnavailable",
    "ConsentViolation",
    "ConsentWithdrawn",
    "ErrorCategory",
    "FaceTooSmallError",
    "InvalidConsentToken",
    "InvalidRequestError",
    "MediaFormatError",
    "MediaReadError",
    "NoFaceError",
    "NoRouteError",
    "NotFoundError",
    "PolicyViolation",
    "ProviderConnectionError",
    "ProviderError",
    "ProviderTimeoutError",
    "RateLimitError",
    "ResidencyViolation",
    "ServerError",
    "SessionStateError",
    "WeightsError",
    "describe_error",
]


class ErrorCategory(StrEnum):
    """Why something failed, in the terms routing and retry decisions need."""

    AUTHENTICATION = "authentication"
    AUTHORIZATION = "authorization"
    INVALID_REQUEST = "invalid_request"
    NOT_FOUND = "not_found"
    RATE_LIMIT = "rate_limit"
    QUOTA = "quota"
    CONNECTIVITY = "connectivity"
    TIMEOUT = "timeout"
    SERVER = "server"
    POLICY = "policy"

    @property
    def is_permanent(self) -> bool:
        """True when trying again (here or with the same request) cannot help."""
        return self in _PERMANENT


_PERMANENT = frozenset(
    {
        ErrorCategory.AUTHENTICATION,
        ErrorCategory.AUTHORIZATION,
        ErrorCategory.INVALID_REQUEST,
        ErrorCategory.NOT_FOUND,
        ErrorCategory.QUOTA,
        ErrorCategory.POLICY,
    }
)


class AvatarKitError(Exception):
    """Root of every error raised by avatarkit."""


def describe_error(exc: BaseException) -> str:
    """``Type: message``: how the command line reports an error, so the reader can look the
    type up (``NoFaceError: no face found in ...``) and scripts can tell errors apart."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class ConfigError(AvatarKitError, ValueError):
    """Configuration is missing or invalid. ``field`` is the dotted path of the culprit."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)


class MediaFormatError(AvatarKitError, ValueError):
    """Audio or video input that cannot be used as given.

    ``field`` names what is wrong (``"data"``, ``"sample_rate"``, ``"samples"``...) and
    ``expected`` says what would have been accepted.
    """

    def __init__(self, message: str, *, field: str, expected: str) -> None:
        self.field = field
        self.expected = expected
        super().__init__(f"{field}: {message} (expected {expected})")


class SessionStateError(AvatarKitError, RuntimeError):
    """An operation that the session's current state does not allow."""


class CapabilityError(AvatarKitError):
    """The session's provider cannot do what was asked (say so, instead of silently not)."""


class NoRouteError(AvatarKitError):
    """No provider passed the route's constraints. ``decision`` explains each exclusion."""

    def __init__(self, message: str, *, decision: object) -> None:
        self.decision = decision
        super().__init__(message)


class ProviderError(AvatarKitError):
    """A call to a rendering provider failed.

    Attributes:
        provider: the provider's registered name (``"tavus"``...).
        status: the HTTP status, or ``None`` when no response came back.
        request_id: the vendor's request id when it sent one.
        category: why it failed (see :class:`ErrorCategory`).
        retryable: whether retrying the same call may succeed.
    """

    default_category: ErrorCategory = ErrorCategory.SERVER
    default_retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        provider: str,
        status: int | None = None,
        request_id: str | None = None,
        category: ErrorCategory | None = None,
        retryable: bool | None = None,
    ) -> None:
        self.provider = provider
        self.status = status
        self.request_id = request_id
        self.category = category if category is not None else self.default_category
        self.retryable = self.default_retryable if retryable is None else retryable
        self.message = message
        super().__init__(message)

    def __str__(self) -> str:
        parts = [f"[{self.provider}]"]
        if self.status is not None:
            parts.append(str(self.status))
        parts.append(self.message)
        if self.request_id:
            parts.append(f"(request id {self.request_id})")
        return " ".join(parts)


class AuthenticationError(ProviderError):
    default_category = ErrorCategory.AUTHENTICATION


class BillingError(ProviderError):
    default_category = ErrorCategory.QUOTA


class RateLimitError(ProviderError):
    default_category = ErrorCategory.RATE_LIMIT
    default_retryable = True

    def __init__(
        self,
        message: str,
        *,
        provider: str,
        status: int | None = 429,
        request_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.retry_after = retry_after
        super().__init__(message, provider=provider, status=status, request_id=request_id)


class InvalidRequestError(ProviderError):
    default_category = ErrorCategory.INVALID_REQUEST


class NotFoundError(ProviderError):
    default_category = ErrorCategory.NOT_FOUND


class ServerError(ProviderError):
    default_category = ErrorCategory.SERVER
    default_retryable = True


class ProviderConnectionError(ProviderError):
    default_category = ErrorCategory.CONNECTIVITY
    default_retryable = True


class ProviderTimeoutError(ProviderError):
    default_category = ErrorCategory.TIMEOUT
    default_retryable = True


class AllProvidersFailed(ExceptionGroup[ProviderError], AvatarKitError):
    """Every provider tried for a session start failed with a retryable error.

    An ``ExceptionGroup`` of each attempt's :class:`ProviderError`, in the order tried, so
    ``except* ServerError`` works; ``providers`` names them in the same order. Raised only when
    start fallback tried more than one provider; a single failed provider raises its own error.
    """

    def __new__(cls, message: str, errors: Sequence[ProviderError]) -> Self:
        return super().__new__(cls, message, list(errors))

    def __init__(self, message: str, errors: Sequence[ProviderError]) -> None:
        super().__init__(message, list(errors))

    @property
    def providers(self) -> list[str]:
        return [e.provider for e in self.exceptions if isinstance(e, ProviderError)]

    def derive(self, excs: Sequence[ProviderError]) -> AllProvidersFailed:  # type: ignore[override]
        return AllProvidersFailed(self.message, excs)

    def __str__(self) -> str:
        causes = "; ".join(str(e) for e in self.exceptions)
        return f"{self.message}: {causes}"


class PolicyViolation(AvatarKitError):
    """A request that policy forbids. Never retried and never failed over to another provider."""

    category = ErrorCategory.POLICY
    retryable = False


class ConsentCheck(StrEnum):
    """The consent check that refused a request (``ConsentViolation.check``)."""

    MISSING = "missing"                # no token presented
    MALFORMED = "malformed"            # not a compact JWS / undecodable
    ALGORITHM = "algorithm"            # alg is not EdDSA
    TYPE = "type"                      # typ is not avk-consent+jwt
    KEY = "key"                        # kid unknown to the pinned key set
    SIGNATURE = "signature"            # signature does not verify
    ISSUER = "issuer"                  # iss is not a trusted issuer
    AUDIENCE = "audience"              # aud does not name this deployment
    CLAIMS = "claims"                  # a required claim is missing or has the wrong type
    ISSUED_AT = "issued_at"            # iat ahead of this clock by more than the leeway
    RECORD = "record"                  # rec does not match the consent record presented
    EXPIRED = "expired"                # now >= exp
    NOT_YET_VALID = "not_yet_valid"    # now < nbf
    AVATAR = "avatar"
    PURPOSE = "purpose"
    CHANNEL = "channel"
    MODALITY = "modality"
    LANGUAGE = "language"
    PROVIDER = "provider"
    REGION = "region"
    REVOKED = "revoked"
    SUSPENDED = "suspended"
    STATUS_STALE = "status_stale"              # cached list older than max_age, no fresh one
    STATUS_UNAVAILABLE = "status_unavailable"  # list missing, unreachable, badly signed
    REPLAY = "replay"                  # single-use jti seen before


class ConsentViolation(PolicyViolation):
    """No valid consent covers this likeness, purpose or provider. ``check`` names the
    check that failed; ``consent_id`` is the token's ``jti`` when it could be read."""

    def __init__(self, message: str, *, check: ConsentCheck,
                 consent_id: str | None = None) -> None:
        super().__init__(message)
        self.check = check
        self.consent_id = consent_id


class ConsentRequired(ConsentViolation):
    """The request needs a consent token and none was given."""


class InvalidConsentToken(ConsentViolation):
    """The token is not a valid consent token from a trusted issuer for this deployment."""


class ConsentExpired(ConsentViolation):
    """The token is outside its validity window (``exp`` passed or ``nbf`` not reached)."""


class ConsentOutOfScope(ConsentViolation):
    """The consent does not cover what was asked: avatar, purpose, channel, modality,
    language, provider or region."""


class ConsentWithdrawn(ConsentViolation):
    """The consent was revoked or suspended (status list)."""


class ConsentStatusUnavailable(ConsentViolation):
    """The revocation status could not be established: fails closed."""


class ConsentReplayed(ConsentViolation):
    """A single-use token was presented a second time."""


class ResidencyViolation(PolicyViolation):
    """The data may not leave the allowed regions, or the provider's region is unknown."""


class BudgetExceeded(PolicyViolation):
    """A configured minute or cost cap would be crossed. ``cap`` names it in config terms
    (``"budgets.session.max_cost"``, ``"budgets.tenants.acme.max_minutes"``...)."""

    def __init__(self, message: str, *, cap: str | None = None) -> None:
        super().__init__(message)
        self.cap = cap


class AvatarPreparationError(AvatarKitError):
    """Preparing an avatar for the local engine failed (``avatarkit.local_engine.avatar``).

    ``source`` names the avatar's media: a file path, or ``"<array>"`` for an in-memory image.
    """

    def __init__(self, message: str, *, source: str) -> None:
        self.source = source
        super().__init__(message)


class MediaReadError(AvatarPreparationError):
    """The avatar's image or video is missing, empty or cannot be decoded.

    ``reason`` says what went wrong; the message names the path and the reason.
    """

    def __init__(self, source: str, reason: str) -> None:
        self.reason = reason
        super().__init__(f"cannot read avatar media {source!r}: {reason}", source=source)


class NoFaceError(AvatarPreparationError):
    """No usable face in a frame of the avatar media (``frame_index``, 0-based).

    With ``missing_face="interpolate"`` only raised when no frame at all has a face; then
    ``frame_index`` is 0 and ``frames_checked`` says how many frames were looked at.
    """

    def __init__(self, message: str, *, source: str, frame_index: int,
                 frames_checked: int = 1) -> None:
        self.frame_index = frame_index
        self.frames_checked = frames_checked
        super().__init__(message, source=source)


class FaceTooSmallError(AvatarPreparationError):
    """The face in a frame is smaller than the configured minimum.

    ``size`` is the face box's longer side in pixels, ``min_size`` the required minimum.
    """

    def __init__(self, message: str, *, source: str, frame_index: int, size: float,
                 min_size: int) -> None:
        self.frame_index = frame_index
        self.size = size
        self.min_size = min_size
        super().__init__(message, source=source)


class WeightsError(ConfigError):
    """A model weights folder or file cannot be used (``avatarkit weights check DIR``).

    ``file`` is the offending path (the folder itself when a file is missing). For a checkpoint
    that does not fit the network: ``missing`` (keys the network needs that the file lacks),
    ``unexpected`` (keys the file has that the network does not know) and ``mismatched``
    (``"key: expected [..], got [..]"``), each sorted; empty when not the problem.
    """

    def __init__(self, message: str, *, file: str, missing: Sequence[str] = (),
                 unexpected: Sequence[str] = (), mismatched: Sequence[str] = (),
                 field: str | None = "weights") -> None:
        self.file = file
        self.missing = tuple(missing)
        self.unexpected = tuple(unexpected)
        self.mismatched = tuple(mismatched)
        super().__init__(message, field=field)
