"""The one place vendor REST calls go through: base URL, auth headers, retries, typed errors.

Retry policy (after the Stainless SDKs): a call is tried once plus ``RetryPolicy.max_retries``
times. It is retried on HTTP 408, 409, 429 and 5xx and on transport failures (connect, read,
write and pool timeouts, refused or dropped connections, protocol errors), never on any other
4xx. A vendor's ``x-should-retry: true|false`` header overrides the status rule. The wait is
the vendor's ``retry-after-ms`` / ``Retry-After`` (seconds or HTTP date) when it sent one,
taken exactly; a wait above ``max_retry_after`` is not waited for, the error is raised at
once. Otherwise the wait is ``initial_backoff * 2**n`` with +-``jitter`` capped at
``max_backoff``. An ``Idempotency-Key`` is sent unchanged on every attempt. When retries run
out, the typed :class:`~avatarkit.errors.ProviderError` of the last attempt is raised.

Nothing here logs or puts into an exception a header, a body, a query string or a secret.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import json as _json
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Container, Mapping, Sequence
from datetime import UTC, datetime
from importlib import metadata
from typing import Any, Self

import httpx
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt

from .errors import (
    AuthenticationError,
    BillingError,
    ErrorCategory,
    InvalidRequestError,
    NotFoundError,
    ProviderConnectionError,
    ProviderError,
    ProviderTimeoutError,
    RateLimitError,
    ServerError,
)

__all__ = [
    "RETRY_STATUSES",
    "RetryPolicy",
    "VendorHttp",
    "error_from_response",
    "new_http_client",
    "parse_retry_after",
]

logger = logging.getLogger("avatarkit.http")

RETRY_STATUSES: frozenset[int] = frozenset({408, 409, 429} | set(range(500, 600)))
"""HTTP statuses retried unless the vendor says ``x-should-retry: false``."""

_MAX_MESSAGE = 500
_REDACTED = "***"
_REQUEST_ID_HEADERS = ("x-request-id", "request-id", "x-amzn-requestid", "cf-ray")
_SENSITIVE_HEADER_PARTS = ("auth", "key", "token", "secret", "cookie", "signature")


class RetryPolicy(BaseModel):
    """How a vendor call is retried. See the module docstring for the rules."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_retries: int = Field(default=3, ge=0, le=10, description="Retries after the first try.")
    initial_backoff: float = Field(
        default=0.5, ge=0, le=60, allow_inf_nan=False, description="Seconds; doubles per retry."
    )
    max_backoff: float = Field(default=8.0, ge=0, le=300, allow_inf_nan=False)
    max_retry_after: float = Field(
        default=60.0,
        ge=0,
        le=3600,
        allow_inf_nan=False,
        description="A vendor-requested wait above this is not waited for: the error is raised.",
    )
    jitter: float = Field(
        default=0.2, ge=0, le=1, allow_inf_nan=False, description="+- fraction of the backoff."
    )

    @model_validator(mode="after")
    def _check_backoff_order(self) -> Self:
        if self.max_backoff < self.initial_backoff:
            raise ValueError("max_backoff must be >= initial_backoff")
        return self

    def backoff(self, retry: int, *, rng: random.Random | None = None) -> float:
        """The wait in seconds before retry number ``retry`` (0 for the first retry).

        ``initial_backoff * 2**retry``, times ``1 +- jitter``, never above ``max_backoff``.
        """
        if retry < 0:
            raise ValueError("retry must be >= 0")
        base = self.initial_backoff * 2.0 ** min(retry, 1000)  # capped: no float overflow
        spread = (rng or random).uniform(-self.jitter, self.jitter) if self.jitter else 0.0
        return max(0.0, min(self.max_backoff, base * (1.0 + spread)))


_DEFAULT_RETRY = RetryPolicy()


@functools.cache
def _user_agent() -> str:
    try:
        version = metadata.version("avatarkit")
    except metadata.PackageNotFoundError:
        version = "0"
    return f"avatarkit/{version}"


def new_http_client(*, timeout: float = 15.0, connect_timeout: float = 5.0) -> httpx.AsyncClient:
    """The kit's shared HTTP client. Make one, pass it to every provider, close it once.

    Redirects are not followed: a vendor API that redirects is reported as an error rather
    than having the auth headers replayed somewhere else.
    """
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout, connect=connect_timeout),
        headers={"User-Agent": _user_agent()},
        follow_redirects=False,
    )


def parse_retry_after(headers: httpx.Headers, *, now: datetime | None = None) -> float | None:
    """Seconds the vendor asked to wait, from ``retry-after-ms`` or ``Retry-After``.

    ``Retry-After`` may be seconds (int or float) or an HTTP date (relative to ``now``,
    default the current time). Negative values give 0; missing or unparseable values None.
    """
    raw_ms = headers.get("retry-after-ms")
    if raw_ms is not None:
        ms = _parse_number(raw_ms)
        if ms is not None:
            return max(0.0, ms / 1000.0)
    raw = headers.get("retry-after")
    if raw is None:
        return None
    seconds = _parse_number(raw)
    if seconds is not None:
        return max(0.0, seconds)
    try:
        when = email.utils.parsedate_to_datetime(raw.strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    delta = (when - (now or datetime.now(UTC))).total_seconds()
    return max(0.0, delta)


def _parse_number(raw: str) -> float | None:
    try:
        value = float(raw.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def error_from_response(
    provider: str, response: httpx.Response, *, secrets: Sequence[str] = ()
) -> ProviderError:
    """The typed error for a vendor's error response.

    The message comes from the body (``message``, ``description`` — prefixed with ``kind``
    when both are present — ``detail``, ``error``, ``kind``), else the text body, else the
    reason phrase; it is cut to 500 characters and every string in ``secrets`` is masked.
    An ``x-should-retry`` header decides ``retryable`` when present.
    """
    status = response.status_code
    message = _redact_and_cut(_extract_message(response), secrets)
    request_id = _request_id(response.headers)
    error: ProviderError
    if status == 429:
        retry_after = parse_retry_after(response.headers)
        error = RateLimitError(
            message, provider=provider, request_id=request_id, retry_after=retry_after
        )
    else:
        cls, category, retryable = _classify(status)
        if cls is ServerError and not 500 <= status < 600:  # 1xx/3xx, or an unexpected 2xx
            message = f"unexpected HTTP status: {message}"
        error = cls(
            message,
            provider=provider,
            status=status,
            request_id=request_id,
            category=category,
            retryable=retryable,
        )
    should_retry = _should_retry_header(response.headers)
    if should_retry is not None:
        error.retryable = should_retry
    return error


def _classify(status: int) -> tuple[type[ProviderError], ErrorCategory | None, bool | None]:
    """Error class, category and retryable flag for a non-429 status (None: class default)."""
    if status == 401:
        return AuthenticationError, None, None
    if status == 403:
        return AuthenticationError, ErrorCategory.AUTHORIZATION, None
    if status == 402:
        return BillingError, None, None
    if status == 404:
        return NotFoundError, None, None
    if status == 408:
        return ProviderTimeoutError, None, None
    if status == 409:
        return InvalidRequestError, None, True
    if 400 <= status < 500:
        return InvalidRequestError, None, None
    if 500 <= status < 600:
        return ServerError, None, None
    return ServerError, None, False


def _request_id(headers: httpx.Headers) -> str | None:
    for name in _REQUEST_ID_HEADERS:
        value: str | None = headers.get(name)
        if value:
            return value
    return None


def _should_retry_header(headers: httpx.Headers) -> bool | None:
    value = headers.get("x-should-retry", "").strip().lower()
    if value == "true":
        return True
    if value == "false":
        return False
    return None


def _extract_message(response: httpx.Response) -> str:
    try:
        text = response.text
    except httpx.ResponseNotRead:  # a streamed response nobody read: no body to show
        text = ""
    if text.strip():
        try:
            body = _json.loads(text)
        except ValueError:
            body = None
        found = _message_from_json(body)
        if found:
            return found
        return " ".join(text.split())
    return response.reason_phrase or f"HTTP {response.status_code}"


def _message_from_json(body: object, depth: int = 0) -> str | None:
    if isinstance(body, str):
        return " ".join(body.split()) or None
    if not isinstance(body, dict) or depth > 3:
        return None
    kind = body.get("kind")
    for key in ("message", "description", "detail", "error", "kind"):
        value = body.get(key)
        rendered = _render_value(value, depth)
        if not rendered:
            continue
        if key == "description" and isinstance(kind, str) and kind.strip():
            return f"{kind.strip()}: {rendered}"
        return rendered
    msg = body.get("msg")  # Twirp (LiveKit's server API): {"code", "msg"}
    if isinstance(msg, str) and msg.strip():
        code = body.get("code")
        return f"{code}: {msg.strip()}" if isinstance(code, str) and code else msg.strip()
    return None


def _render_value(value: object, depth: int) -> str | None:
    if isinstance(value, str):
        return " ".join(value.split()) or None
    if isinstance(value, list):
        parts = [p for p in (_render_list_item(item) for item in value) if p]
        return "; ".join(parts) or None
    if isinstance(value, dict):  # e.g. {"error": {"message": ..., "type": ...}}
        return _message_from_json(value, depth + 1) or (
            _render_list_item(value) if "msg" in value else None
        )
    return None


def _render_list_item(item: object) -> str | None:
    """One FastAPI validation error ``{"loc": [...], "msg": ...}`` as ``loc.path: msg``."""
    if isinstance(item, str):
        return " ".join(item.split()) or None
    if not isinstance(item, dict):
        return None
    msg: object = item.get("msg") or item.get("message")
    if not isinstance(msg, str) or not msg.strip():
        return None
    loc = item.get("loc")
    if isinstance(loc, list) and loc:
        return f"{'.'.join(str(part) for part in loc)}: {msg.strip()}"
    return msg.strip()


def _redact_and_cut(message: str, secrets: Sequence[str]) -> str:
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        message = message.replace(secret, _REDACTED)
    if len(message) > _MAX_MESSAGE:
        message = message[: _MAX_MESSAGE - 1] + "…"
    return message


def _secrets_of(headers: Mapping[str, str], *, all_values: bool) -> list[str]:
    """Header values to mask in messages (with a ``Bearer``/``Basic`` scheme, the token too)."""
    found: list[str] = []
    for name, value in headers.items():
        lowered = name.lower()
        if not value or not (
            all_values or any(part in lowered for part in _SENSITIVE_HEADER_PARTS)
        ):
            continue
        found.append(value)
        scheme, _, token = value.partition(" ")
        if token.strip() and scheme.isalpha():
            found.append(token.strip())
    return found


def _safe_url(url: httpx.URL) -> str:
    """Scheme, host, port and path: no credentials, query string or fragment."""
    port = f":{url.port}" if url.port is not None else ""
    return f"{url.scheme}://{url.host}{port}{url.path}"


# Most specific first: the timeouts are TimeoutException subclasses.
_TRANSPORT_ERROR_TEXT: tuple[tuple[type[httpx.TransportError], str], ...] = (
    (httpx.ConnectTimeout, "connect timeout to {host}"),
    (httpx.ReadTimeout, "read timeout from {host}"),
    (httpx.WriteTimeout, "write timeout to {host}"),
    (httpx.PoolTimeout, "timed out waiting for a free connection to {host}"),
    (httpx.TimeoutException, "timeout talking to {host}"),
    (httpx.ConnectError, "could not connect to {host}"),
    (httpx.ReadError, "connection to {host} broke while reading the response"),
    (httpx.WriteError, "connection to {host} broke while sending the request"),
    (httpx.RemoteProtocolError, "protocol error from {host}"),
    (httpx.ProxyError, "proxy error reaching {host}"),
)


def _describe_transport_error(exc: httpx.TransportError, host: str) -> str:
    template = next((text for kind, text in _TRANSPORT_ERROR_TEXT if isinstance(exc, kind)),
                    f"{type(exc).__name__} talking to {{host}}")
    what = template.format(host=host)
    detail = " ".join(str(exc).split())
    return f"{what}: {detail}" if detail else what


def _is_retryable_transport_error(exc: httpx.TransportError) -> bool:
    # UnsupportedProtocol and LocalProtocolError are mistakes on our side: retrying repeats them.
    return not isinstance(exc, httpx.UnsupportedProtocol | httpx.LocalProtocolError)


class _Retry(Exception):
    """Internal: this attempt failed and may be retried (after ``delay`` s if the vendor said)."""

    def __init__(self, error: ProviderError, outcome: str, delay: float | None = None) -> None:
        super().__init__(outcome)
        self.error = error
        self.outcome = outcome  # "429", "ConnectError"...: what the retry log line says
        self.delay = delay


class VendorHttp:
    """One vendor's REST API over the kit's shared httpx client: base URL, auth headers,
    retries, typed errors."""

    def __init__(
        self,
        *,
        provider: str,
        client: httpx.AsyncClient,
        base_url: str,
        auth_headers: Mapping[str, str] | Callable[[], Mapping[str, str]],
        retry: RetryPolicy = _DEFAULT_RETRY,
        timeout: float | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        url = httpx.URL(base_url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"base_url must be an absolute http(s) URL, got {_safe_url(url)!r}")
        if url.query or url.fragment:
            raise ValueError("base_url must not have a query string or fragment")
        self.provider = provider
        self.base_url = str(url.copy_with(path=url.path.rstrip("/") or "/"))
        self.retry_policy = retry
        self._client = client
        self._auth_headers = auth_headers
        self._timeout = timeout
        self._sleep = sleep

    def __repr__(self) -> str:
        base_url = _safe_url(httpx.URL(self.base_url))
        return f"VendorHttp(provider={self.provider!r}, base_url={base_url!r})"

    def url_for(self, path: str) -> httpx.URL:
        """``path`` under ``base_url``, keeping the base URL's own path prefix."""
        if "://" in path or path.startswith("//"):
            raise ValueError("path must be a path under base_url, not a URL")
        if "?" in path or "#" in path:
            raise ValueError("pass query parameters with params=, not in the path")
        return httpx.URL(self.base_url.rstrip("/") + "/" + path.lstrip("/"))

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: object = None,
        files: Mapping[str, tuple[str, bytes, str]] | None = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        retry: bool = True,
        ok_statuses: Container[int] | None = None,
    ) -> httpx.Response:
        """Send one call, retrying as the policy says; return the 2xx (or ``ok_statuses``) response.

        ``files`` sends a multipart form instead of JSON (``{field: (filename, bytes, type)}``).

        Raises the typed :class:`~avatarkit.errors.ProviderError` of the last attempt.
        """
        method = method.upper()
        url = self.url_for(path)
        attempts = 1 + (self.retry_policy.max_retries if retry else 0)
        extra_headers = dict(headers or {})
        if idempotency_key is not None:
            extra_headers["Idempotency-Key"] = idempotency_key

        tries = 0

        async def attempt() -> httpx.Response:
            nonlocal tries
            tries += 1
            return await self._attempt(
                method,
                url,
                json=json,
                files=files,
                params=params,
                extra_headers=extra_headers,
                attempt=f"{tries}/{attempts}",
                ok_statuses=ok_statuses,
            )

        retrying = AsyncRetrying(
            sleep=self._sleep,
            stop=stop_after_attempt(attempts),
            wait=self._wait,
            retry=retry_if_exception_type(_Retry),
            before_sleep=functools.partial(self._log_retry, method, url, attempts),
            reraise=True,
        )
        try:
            response: httpx.Response = await retrying(attempt)
        except _Retry as failed:
            error = failed.error
            if attempts > 1:
                error.add_note(f"gave up after {attempts} attempts")
            raise error from error.__cause__
        return response

    async def request_json(
        self,
        method: str,
        path: str,
        *,
        json: object = None,
        files: Mapping[str, tuple[str, bytes, str]] | None = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        retry: bool = True,
        ok_statuses: Container[int] | None = None,
    ) -> dict[str, Any]:
        """As :meth:`request`, returning the response's JSON object (``{}`` for an empty body)."""
        response = await self.request(
            method,
            path,
            json=json,
            files=files,
            params=params,
            headers=headers,
            idempotency_key=idempotency_key,
            retry=retry,
            ok_statuses=ok_statuses,
        )
        if response.status_code == 204 or not response.content.strip():
            return {}
        try:
            body = _json.loads(response.content)
        except ValueError:
            raise self._unexpected_body(response, "not valid JSON") from None
        if not isinstance(body, dict):
            raise self._unexpected_body(response, f"a JSON {type(body).__name__}, not an object")
        return body

    def _unexpected_body(self, response: httpx.Response, what: str) -> ServerError:
        # The body itself is left out: a 2xx body may hold session tokens.
        return ServerError(
            f"unexpected response body from {response.request.method} "
            f"{_safe_url(response.request.url)}: {what}",
            provider=self.provider,
            status=response.status_code,
            request_id=_request_id(response.headers),
            retryable=False,
        )

    def _current_auth_headers(self) -> Mapping[str, str]:
        auth = self._auth_headers
        return auth() if callable(auth) else auth

    async def _attempt(
        self,
        method: str,
        url: httpx.URL,
        *,
        json: object,
        files: Mapping[str, tuple[str, bytes, str]] | None,
        params: Mapping[str, str] | None,
        extra_headers: Mapping[str, str],
        attempt: str,
        ok_statuses: Container[int] | None,
    ) -> httpx.Response:
        auth = self._current_auth_headers()
        secrets = [
            *_secrets_of(auth, all_values=True),
            *_secrets_of(extra_headers, all_values=False),
        ]
        started = time.perf_counter()
        try:
            response = await self._client.request(
                method,
                url,
                json=json,
                files=files,
                params=params,
                headers={**auth, **extra_headers},
                timeout=httpx.USE_CLIENT_DEFAULT if self._timeout is None else self._timeout,
            )
        except httpx.TransportError as exc:
            elapsed = (time.perf_counter() - started) * 1000
            outcome = type(exc).__name__
            logger.debug(
                "%s %s -> %s (attempt %s, %.0f ms)",
                method,
                _safe_url(url),
                outcome,
                attempt,
                elapsed,
            )
            message = _redact_and_cut(_describe_transport_error(exc, url.host), secrets)
            error: ProviderError
            if isinstance(exc, httpx.TimeoutException):
                error = ProviderTimeoutError(message, provider=self.provider)
            else:
                error = ProviderConnectionError(message, provider=self.provider)
            error.__cause__ = exc
            if not _is_retryable_transport_error(exc):
                error.retryable = False
                raise error from exc
            raise _Retry(error, outcome) from exc
        elapsed = (time.perf_counter() - started) * 1000
        status = response.status_code
        logger.debug(
            "%s %s -> %d (attempt %s, %.0f ms)", method, _safe_url(url), status, attempt, elapsed
        )
        if 200 <= status < 300 or (ok_statuses is not None and status in ok_statuses):
            return response
        error = error_from_response(self.provider, response, secrets=secrets)
        should_retry = _should_retry_header(response.headers)
        if should_retry is False or (should_retry is None and status not in RETRY_STATUSES):
            raise error
        delay = parse_retry_after(response.headers)
        if delay is not None and delay > self.retry_policy.max_retry_after:
            logger.warning(
                "%s %s -> %d, vendor asks to wait %.1f s (over max_retry_after %.1f s); "
                "not retrying",
                method,
                _safe_url(url),
                status,
                delay,
                self.retry_policy.max_retry_after,
            )
            raise error
        raise _Retry(error, str(status), delay)

    def _wait(self, state: RetryCallState) -> float:
        failed = state.outcome.exception() if state.outcome is not None else None
        if isinstance(failed, _Retry) and failed.delay is not None:
            return failed.delay
        return self.retry_policy.backoff(state.attempt_number - 1)

    def _log_retry(self, method: str, url: httpx.URL, attempts: int, state: RetryCallState) -> None:
        failed = state.outcome.exception() if state.outcome is not None else None
        outcome = failed.outcome if isinstance(failed, _Retry) else "error"
        logger.warning(
            "%s %s -> %s, retrying in %.1f s (attempt %d/%d)",
            method,
            _safe_url(url),
            outcome,
            state.upcoming_sleep,
            state.attempt_number + 1,
            attempts,
        )
