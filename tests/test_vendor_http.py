"""Unit tests for ``avatarkit.vendor_http`` (respx; no network, no real sleeping)."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest
import respx
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from avatarkit.errors import (
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
from avatarkit.vendor_http import (
    RETRY_STATUSES,
    RetryPolicy,
    VendorHttp,
    error_from_response,
    new_http_client,
    parse_retry_after,
)

BASE = "https://api.vendor.test/v2"
SECRET = "sk_live_9f8e7d6c5b4a_TOPSECRET"
NO_JITTER = RetryPolicy(max_retries=3, initial_backoff=0.5, max_backoff=8.0, jitter=0.0)


class RecordingSleep:
    """Stands in for asyncio.sleep: records the delays, returns at once."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


@pytest.fixture
def sleep() -> RecordingSleep:
    return RecordingSleep()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with new_http_client() as http_client:
        yield http_client


@pytest.fixture
def router() -> Iterator[respx.MockRouter]:
    with respx.mock(base_url=BASE, assert_all_called=False) as mock_router:
        yield mock_router


def make_http(
    client: httpx.AsyncClient,
    sleep: RecordingSleep,
    *,
    retry: RetryPolicy = NO_JITTER,
    auth: dict[str, str] | None = None,
    base_url: str = BASE,
) -> VendorHttp:
    return VendorHttp(
        provider="tavus",
        client=client,
        base_url=base_url,
        auth_headers=auth if auth is not None else {"x-api-key": SECRET},
        retry=retry,
        sleep=sleep,
    )


def resp(status: int, **kwargs: Any) -> httpx.Response:
    return httpx.Response(status, **kwargs)


# --------------------------------------------------------------------------- retry matrix


@pytest.mark.parametrize(
    ("status", "exc_type", "category"),
    [
        (408, ProviderTimeoutError, ErrorCategory.TIMEOUT),
        (409, InvalidRequestError, ErrorCategory.INVALID_REQUEST),
        (429, RateLimitError, ErrorCategory.RATE_LIMIT),
        (500, ServerError, ErrorCategory.SERVER),
        (502, ServerError, ErrorCategory.SERVER),
        (503, ServerError, ErrorCategory.SERVER),
        (504, ServerError, ErrorCategory.SERVER),
    ],
)
async def test_retried_statuses(
    router: respx.MockRouter,
    client: httpx.AsyncClient,
    sleep: RecordingSleep,
    status: int,
    exc_type: type[ProviderError],
    category: ErrorCategory,
) -> None:
    route = router.post("/conversations").mock(return_value=resp(status, json={"message": "no"}))
    http = make_http(client, sleep)

    with pytest.raises(exc_type) as info:
        await http.request("POST", "/conversations", json={"a": 1})

    assert type(info.value) is exc_type
    assert route.call_count == NO_JITTER.max_retries + 1
    assert sleep.delays == [0.5, 1.0, 2.0]
    assert info.value.status == status
    assert info.value.category is category
    assert info.value.retryable is True
    assert info.value.provider == "tavus"
    assert status in RETRY_STATUSES


@pytest.mark.parametrize(
    ("status", "exc_type", "category"),
    [
        (400, InvalidRequestError, ErrorCategory.INVALID_REQUEST),
        (401, AuthenticationError, ErrorCategory.AUTHENTICATION),
        (402, BillingError, ErrorCategory.QUOTA),
        (403, AuthenticationError, ErrorCategory.AUTHORIZATION),
        (404, NotFoundError, ErrorCategory.NOT_FOUND),
        (422, InvalidRequestError, ErrorCategory.INVALID_REQUEST),
        (451, InvalidRequestError, ErrorCategory.INVALID_REQUEST),
    ],
)
async def test_not_retried_statuses(
    router: respx.MockRouter,
    client: httpx.AsyncClient,
    sleep: RecordingSleep,
    status: int,
    exc_type: type[ProviderError],
    category: ErrorCategory,
) -> None:
    route = router.get("/replicas/r1").mock(return_value=resp(status, json={"message": "no"}))
    http = make_http(client, sleep)

    with pytest.raises(exc_type) as info:
        await http.request("GET", "/replicas/r1")

    assert type(info.value) is exc_type
    assert route.call_count == 1
    assert sleep.delays == []
    assert info.value.status == status
    assert info.value.category is category
    assert info.value.retryable is False
    assert not getattr(info.value, "__notes__", [])


async def test_success_after_failures_returns_response(
    router: respx.MockRouter, client: httpx.AsyncClient, sleep: RecordingSleep
) -> None:
    route = router.post("/conversations").mock(
        side_effect=[resp(503), resp(502), resp(200, json={"conversation_id": "c1"})]
    )
    response = await make_http(client, sleep).request("POST", "/conversations")

    assert response.status_code == 200
    assert response.json() == {"conversation_id": "c1"}
    assert route.call_count == 3
    assert sleep.delays == [0.5, 1.0]


async def test_exhaustion_raises_last_attempts_error(
    router: respx.MockRouter, client: httpx.AsyncClient, sleep: RecordingSleep
) -> None:
    route = router.post("/x").mock(
        side_effect=[
            resp(500, json={"message": "first"}),
            resp(429, json={"message": "second"}),
            resp(503, json={"message": "third"}),
            resp(504, json={"message": "last"}, headers={"x-request-id": "req-4"}),
        ]
    )
    with pytest.raises(ServerError) as info:
        await make_http(client, sleep).request("POST", "/x")

    assert route.call_count == 4
    assert info.value.status == 504
    assert info.value.message == "last"
    assert info.value.request_id == "req-4"
    assert "gave up after 4 attempts" in info.value.__notes__


async def test_other_max_retries(
    router: respx.MockRouter, client: httpx.AsyncClient, sleep: RecordingSleep
) -> None:
    route = router.get("/x").mock(return_value=resp(500))
    http = make_http(client, sleep, retry=RetryPolicy(max_retries=1, jitter=0))
    with pytest.raises(ServerError):
        await http.request("GET", "/x")
    assert route.call_count == 2
    assert sleep.delays == [0.5]


async def test_non_retryable_after_retryable_stops_at_once(
    router: respx.MockRouter, client: httpx.AsyncClient, sleep: RecordingSleep
) -> None:
    route = router.get("/x").mock(side_effect=[resp(503), resp(404)])
    with pytest.raises(NotFoundError):
        await make_http(client, sleep).request("GET", "/x")
    assert route.call_count == 2
    assert sleep.delays == [0.5]


async def test_retry_false_makes_one_attempt(
    router: respx.MockRouter, client: httpx.AsyncClient, sleep: RecordingSleep
) -> None:
    route = router.delete("/conversations/c1").mock(return_value=resp(503))
    with pytest.raises(ServerError) as info:
        await make_http(client, sleep).request("DELETE", "/conversations/c1", retry=False)
    assert route.call_count == 1
    assert sleep.delays == []
    assert not getattr(info.value, "__notes__", [])


async def test_ok_statuses_are_returned(
    router: respx.MockRouter, client: httpx.AsyncClient, sleep: RecordingSleep
) -> None:
    route = router.delete("/conversations/c1").mock(return_value=resp(404))
    response = await make_http(client, sleep).request(
        "DELETE", "/conversations/c1", ok_statuses={404}
    )
    assert response.status_code == 404
    assert route.call_count == 1


# --------------------------------------------------------------------------- Retry-After


async def test_retry_after_seconds_is_waited_exactly(
    router: respx.MockRouter, client: httpx.AsyncClient, sleep: RecordingSleep
) -> None:
    # default policy has jitter: Retry-After must still be taken as is
    router.post("/x").mock(
        side_effect=[
            resp(429, headers={"Retry-After": "2"}),
            resp(503, headers={"Retry-After": "1.5"}),
            resp(200),
        ]
    )
    response = await make_http(client, sleep, retry=RetryPolicy()).request("POST", "/x")
    assert response.status_code == 200
    assert sleep.delays == [2.0, 1.5]


async def test_retry_after_ms_wins_over_retry_after(
    router: respx.MockRouter, client: httpx.AsyncClient, sleep: RecordingSleep
) -> None:
    router.post("/x").mock(
        side_effect=[resp(429, headers={"retry-after-ms": "250", "retry-after": "9"}), resp(200)]
    )
    await make_http(client, sleep).request("POST", "/x")
    assert sleep.delays == [0.25]


async def test_retry_after_http_date(
    router: respx.MockRouter, client: httpx.AsyncClient, sleep: RecordingSleep
) -> None:
    when = datetime.now(UTC) + timedelta(seconds=30)
    router.post("/x").mock(
        side_effect=[
            resp(503, headers={"Retry-After": format_datetime(when, usegmt=True)}),
            resp(200),
        ]
    )
    await make_http(client, sleep).request("POST", "/x")
    assert len(sleep.delays) == 1
    assert 28.0 <= sleep.delays[0] <= 30.0


async def test_unparseable_retry_after_falls_back_to_backoff(
    router: respx.MockRouter, client: httpx.AsyncClient, sleep: RecordingSleep
) -> None:
    router.post("/x").mock(side_effect=[resp(429, headers={"Retry-After": "soon"}), resp(200)])
    await make_http(client, sleep).request("POST", "/x")
    assert sleep.delays == [0.5]


async def test_retry_after_above_cap_raises_rate_limit_at_once(
    router: respx.MockRouter, client: httpx.AsyncClient, sleep: RecordingSleep
) -> None:
    route = router.post("/x").mock(
        return_value=resp(429, headers={"Retry-After": "120"}, json={"message": "slow down"})
    )
    http = make_http(client, sleep, retry=RetryPolicy(max_retry_after=60))
    with pytest.raises(RateLimitError) as info:
        await http.request("POST", "/x")
    assert route.call_count == 1
    assert sleep.delays == []
    assert info.value.retry_after == 120.0
    assert info.value.status == 429
    assert info.value.message == "slow down"


async def test_retry_after_above_cap_on_503_raises_server_error(
    router: respx.MockRouter, client: httpx.AsyncClient, sleep: RecordingSleep
) -> None:
    route = router.post("/x").mock(return_value=resp(503, headers={"Retry-After": "3600"}))
    with pytest.raises(ServerError):
        await make_http(client, sleep).request("POST", "/x")
    assert route.call_count == 1
    assert sleep.delays == []


def test_rate_limit_error_carries_retry_after() -> None:
    error = error_from_response("simli", resp(429, headers={"retry-after": "7"}))
    assert isinstance(error, RateLimitError)
    assert error.retry_after == 7.0
    no_header = error_from_response("simli", resp(429))
    assert isinstance(no_header, RateLimitError)
    assert no_header.retry_after is None


NOW = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"retry-after": "3"}, 3.0),
        ({"retry-after": " 2.5 "}, 2.5),
        ({"retry-after": "-4"}, 0.0),
        ({"retry-after": "0"}, 0.0),
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after-ms": "-10"}, 0.0),
        ({"retry-after-ms": "junk", "retry-after": "2"}, 2.0),
        ({"retry-after": "Wed, 01 Jan 2025 12:00:42 GMT"}, 42.0),
        ({"retry-after": "Wed, 01 Jan 2025 11:59:00 GMT"}, 0.0),
        ({"retry-after": "tomorrow-ish"}, None),
        ({"retry-after": ""}, None),
        ({"retry-after": "nan"}, None),
        ({"retry-after": "inf"}, None),
    ],
)
def test_parse_retry_after(headers: dict[str, str], expected: float | None) -> None:
    assert parse_retry_after(httpx.Headers(headers), now=NOW) == expected


def test_parse_retry_after_date_defaults_to_now() -> None:
    when = datetime.now(UTC) + timedelta(seconds=100)
    value = parse_retry_after(httpx.Headers({"retry-after": format_datetime(when, usegmt=True)}))
    assert value is not None
    assert 98.0 <= value <= 100.0


# --------------------------------------------------------------------------- x-should-retry


async def test_should_retry_false_on_503_stops(
    router: respx.MockRouter, client: httpx.AsyncClient, sleep: RecordingSleep
) -> None:
    route = router.post("/x").mock(return_value=resp(503, headers={"x-should-retry": "false"}))
    with pytest.raises(ServerError) as info:
        await make_http(client, sleep).request("POST", "/x")
    assert route.call_count == 1
    assert sleep.delays == []
    assert info.value.retryable is False


async def test_should_retry_true_on_400_retries(
    router: respx.MockRouter, client: httpx.AsyncClient, sleep: RecordingSleep
) -> None:
    route = router.post("/x").mock(return_value=resp(400, headers={"x-should-retry": "true"}))
    with pytest.raises(InvalidRequestError) as info:
        await make_http(client, sleep).request("POST", "/x")
    assert route.call_count == 4
    assert sleep.delays == [0.5, 1.0, 2.0]
    assert info.value.retryable is True


# --------------------------------------------------------------------------- transport errors


async def test_connection_errors_are_retried_then_raised(
    router: respx.MockRouter, client: httpx.AsyncClient, sleep: RecordingSleep
) -> None:
    route = router.post("/x").mock(side_effect=httpx.ConnectError("[Errno 111] Connection refused"))
    with pytest.raises(ProviderConnectionError) as info:
        await make_http(client, sleep).request("POST", "/x")
    error = info.value
    assert route.call_count == 4
    assert sleep.delays == [0.5, 1.0, 2.0]
    assert "could not connect to api.vendor.test" in error.message
    assert "Connection refused" in error.message
    assert error.status is None
    assert error.category is ErrorCategory.CONNECTIVITY
    assert error.retryable is True
    assert isinstance(error.__cause__, httpx.ConnectError)
    assert SECRET not in str(error)


async def test_connection_error_then_success(
    router: respx.MockRouter, client: httpx.AsyncClient, sleep: RecordingSleep
) -> None:
    route = router.get("/x").mock(
        side_effect=[httpx.RemoteProtocolError("Server disconnected"), resp(200, json={})]
    )
    response = await make_http(client, sleep).request("GET", "/x")
    assert response.status_code == 200
    assert route.call_count == 2


async def test_read_timeout_becomes_timeout_error(
    router: respx.MockRouter, client: httpx.AsyncClient, sleep: RecordingSleep
) -> None:
    route = router.get("/x").mock(side_effect=httpx.ReadTimeout("timed out"))
    with pytest.raises(ProviderTimeoutError) as info:
        await make_http(client, sleep).request("GET", "/x")
    assert route.call_count == 4
    assert "read timeout from api.vendor.test" in info.value.message
    assert info.value.category is ErrorCategory.TIMEOUT
    assert info.value.status is None
    assert info.value.retryable is True


async def test_connect_timeout_without_retry(
    router: respx.MockRouter, client: httpx.AsyncClient, sleep: RecordingSleep
) -> None:
    route = router.get("/x").mock(side_effect=httpx.ConnectTimeout(""))
    with pytest.raises(ProviderTimeoutError) as info:
        await make_http(client, sleep).request("GET", "/x", retry=False)
    assert route.call_count == 1
    assert info.value.message == "connect timeout to api.vendor.test"


async def test_unsupported_protocol_is_not_retried(
    router: respx.MockRouter, client: httpx.AsyncClient, sleep: RecordingSleep
) -> None:
    route = router.get("/x").mock(side_effect=httpx.UnsupportedProtocol("no"))
    with pytest.raises(ProviderConnectionError) as info:
        await make_http(client, sleep).request("GET", "/x")
    assert route.call_count == 1
    assert info.value.retryable is False


async def test_cancellation_is_not_swallowed(
    router: respx.MockRouter, client: httpx.AsyncClient
) -> None:
    async def cancelled_sleep(seconds: float) -> None:
        raise asyncio.CancelledError

    route = router.get("/x").mock(return_value=resp(503))
    http = VendorHttp(
        provider="tavus",
        client=client,
        base_url=BASE,
        auth_headers={},
        retry=NO_JITTER,
        sleep=cancelled_sleep,
    )
    with pytest.raises(asyncio.CancelledError):
        await http.request("GET", "/x")
    assert route.call_count == 1


# --------------------------------------------------------------------------- headers, URLs


async def test_idempotency_key_same_on_every_attempt(
    router: respx.MockRouter, client: httpx.AsyncClient, sleep: RecordingSleep
) -> None:
    route = router.post("/conversations").mock(side_effect=[resp(503), resp(500), resp(201)])
    response = await make_http(client, sleep).request(
        "POST", "/conversations", idempotency_key="idem-123"
    )
    assert response.status_code == 201
    keys = [call.request.headers.get("Idempotency-Key") for call in route.calls]
    assert keys == ["idem-123", "idem-123", "idem-123"]


async def test_no_idempotency_key_when_not_given(
    router: respx.MockRouter, client: httpx.AsyncClient, sleep: RecordingSleep
) -> None:
    route = router.post("/conversations").mock(side_effect=[resp(503), resp(200)])
    await make_http(client, sleep).request("POST", "/conversations")
    assert route.call_count == 2
    assert all("idempotency-key" not in call.request.headers for call in route.calls)


async def test_sends_auth_user_agent_json_and_params(
    router: respx.MockRouter, client: httpx.AsyncClient, sleep: RecordingSleep
) -> None:
    route = router.post("/x").mock(return_value=resp(200))
    await make_http(client, sleep).request(
        "post", "/x", json={"a": 1}, params={"q": "1"}, headers={"X-Extra": "yes"}
    )
    sent = route.calls.last.request
    assert sent.method == "POST"
    assert sent.headers["x-api-key"] == SECRET
    assert sent.headers["x-extra"] == "yes"
    assert sent.headers["user-agent"].startswith("avatarkit/")
    assert sent.url.params["q"] == "1"
    assert sent.content == b'{"a":1}'


async def test_auth_headers_callable_is_read_per_attempt(
    router: respx.MockRouter, client: httpx.AsyncClient, sleep: RecordingSleep
) -> None:
    keys = iter(["k1", "k2"])
    route = router.get("/x").mock(side_effect=[resp(503), resp(200)])
    http = VendorHttp(
        provider="simli",
        client=client,
        base_url=BASE,
        auth_headers=lambda: {"x-simli-api-key": next(keys)},
        retry=NO_JITTER,
        sleep=sleep,
    )
    await http.request("GET", "/x")
    assert [c.request.headers["x-simli-api-key"] for c in route.calls] == ["k1", "k2"]


@pytest.mark.parametrize(
    ("base_url", "path", "expected"),
    [
        ("https://api.d-id.com", "/agents/a1", "https://api.d-id.com/agents/a1"),
        ("https://api.d-id.com/", "agents/a1", "https://api.d-id.com/agents/a1"),
        ("https://tavusapi.com/v2", "/conversations", "https://tavusapi.com/v2/conversations"),
        ("https://tavusapi.com/v2/", "/conversations", "https://tavusapi.com/v2/conversations"),
        ("https://h.test/a/b", "c/d", "https://h.test/a/b/c/d"),
        ("http://127.0.0.1:8080/api", "/v1/x", "http://127.0.0.1:8080/api/v1/x"),
    ],
)
async def test_base_url_path_prefix_join(
    client: httpx.AsyncClient, sleep: RecordingSleep, base_url: str, path: str, expected: str
) -> None:
    with respx.mock() as mock_router:
        route = mock_router.get(expected).mock(return_value=resp(200))
        await make_http(client, sleep, base_url=base_url).request("GET", path)
        assert route.call_count == 1
        assert str(route.calls.last.request.url) == expected


@pytest.mark.parametrize("path", ["https://evil.test/x", "//evil.test/x", "/x?key=1"])
def test_path_must_stay_under_base_url(path: str) -> None:
    http = VendorHttp(provider="tavus", client=httpx.AsyncClient(), base_url=BASE, auth_headers={})
    with pytest.raises(ValueError):
        http.url_for(path)


@pytest.mark.parametrize("base_url", ["api.vendor.test", "ftp://x.test", "https://x.test/?a=1"])
def test_bad_base_url_rejected(base_url: str) -> None:
    with pytest.raises(ValueError):
        VendorHttp(provider="x", client=httpx.AsyncClient(), base_url=base_url, auth_headers={})


async def test_new_http_client_settings() -> None:
    async with new_http_client(timeout=12.0, connect_timeout=3.0) as http_client:
        assert http_client.headers["user-agent"].startswith("avatarkit/")
        assert http_client.timeout.read == 12.0
        assert http_client.timeout.connect == 3.0
        assert http_client.follow_redirects is False


async def test_per_vendor_timeout_is_passed(
    router: respx.MockRouter, client: httpx.AsyncClient, sleep: RecordingSleep
) -> None:
    route = router.get("/x").mock(return_value=resp(200))
    http = VendorHttp(
        provider="x", client=client, base_url=BASE, auth_headers={}, timeout=2.5, sleep=sleep
    )
    await http.request("GET", "/x")
    assert route.calls.last.request.extensions["timeout"]["read"] == 2.5
    await make_http(client, sleep).request("GET", "/x")
    assert route.calls.last.request.extensions["timeout"]["read"] == 15.0


# --------------------------------------------------------------------------- messages


# fmt: off
MESSAGE_CASES: list[tuple[int, object, type[ProviderError], str]] = [
    # Tavus {error, message}
    (400, {"error": "bad_request", "message": "Invalid replica_id"}, InvalidRequestError,
     "Invalid replica_id"),
    # LiveAvatar {code, message}
    (401, {"code": 40100, "message": "Invalid API key"}, AuthenticationError,
     "Invalid API key"),
    # LiveAvatar / FastAPI 422
    (422, {"detail": [
        {"loc": ["body", "avatar_id"], "msg": "Field required", "type": "missing"},
        {"loc": ["body", "video_settings", "quality"], "msg": "Input should be 'high'"},
    ]}, InvalidRequestError,
     "body.avatar_id: Field required; body.video_settings.quality: Input should be 'high'"),
    # Simli {detail}
    (400, {"session_token": "FAIL TOKEN", "detail": "Invalid faceId"}, InvalidRequestError,
     "Invalid faceId"),
    # Simli {error, code}
    (401, {"error": "INVALID_API_KEY", "code": 401}, AuthenticationError, "INVALID_API_KEY"),
    # D-ID {kind, description}
    (402, {"kind": "InsufficientCreditsError", "description": "not enough credits"},
     BillingError, "InsufficientCreditsError: not enough credits"),
    (404, {"kind": "NotFoundError"}, NotFoundError, "NotFoundError"),
    (500, {"kind": "InternalServerError", "description": "Stream Error"}, ServerError,
     "InternalServerError: Stream Error"),
    # nested {"error": {"message": ...}}
    (400, {"error": {"message": "nested message", "type": "x"}}, InvalidRequestError,
     "nested message"),
    (400, {"unrelated": 1}, InvalidRequestError, '{"unrelated":1}'),
    (400, "a json string", InvalidRequestError, "a json string"),
]
# fmt: on


@pytest.mark.parametrize(("status", "body", "exc_type", "expected"), MESSAGE_CASES)
def test_message_extraction(
    status: int, body: object, exc_type: type[ProviderError], expected: str
) -> None:
    error = error_from_response("vendor", resp(status, json=body))
    assert type(error) is exc_type
    assert error.message == expected
    assert error.status == status


def test_message_from_text_body_then_reason_phrase() -> None:
    text = error_from_response("simli", resp(502, text="upstream\n  connect error"))
    assert text.message == "upstream connect error"
    empty = error_from_response("simli", resp(503))
    assert empty.message == "Service Unavailable"
    no_phrase = error_from_response("simli", resp(599))
    assert no_phrase.message == "HTTP 599"


def test_message_is_truncated() -> None:
    error = error_from_response("tavus", resp(400, json={"message": "x" * 2000}))
    assert len(error.message) == 500
    assert error.message.endswith("…")
    short = error_from_response("tavus", resp(400, json={"message": "y" * 500}))
    assert short.message == "y" * 500


def test_secrets_masked_before_truncation() -> None:
    body = {"message": "a" * 490 + SECRET}
    error = error_from_response("tavus", resp(400, json=body), secrets=[SECRET, ""])
    assert SECRET[:8] not in error.message
    assert error.message.endswith("***")


def test_unexpected_status_is_not_retryable_server_error() -> None:
    error = error_from_response("tavus", resp(302, text="moved"))
    assert type(error) is ServerError
    assert error.retryable is False
    assert "unexpected HTTP status" in error.message


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"x-request-id": "a1"}, "a1"),
        ({"request-id": "b2"}, "b2"),
        ({"x-amzn-RequestId": "c3"}, "c3"),
        ({"cf-ray": "d4-AMS"}, "d4-AMS"),
        ({"cf-ray": "d4-AMS", "x-request-id": "a1"}, "a1"),
        ({"request-id": "b2", "x-amzn-requestid": "c3"}, "b2"),
        ({}, None),
    ],
)
def test_request_id_extraction(headers: dict[str, str], expected: str | None) -> None:
    error = error_from_response("tavus", resp(500, headers=headers))
    assert error.request_id == expected
    if expected:
        assert f"(request id {expected})" in str(error)


# --------------------------------------------------------------------------- secrets & logs


def _assert_secret_absent(caplog: pytest.LogCaptureFixture, *secrets: str) -> None:
    assert caplog.records, "expected log records"
    for record in caplog.records:
        text = record.getMessage() + repr(record.args) + str(record.msg)
        for secret in secrets:
            assert secret not in text


async def test_secrets_never_leak(
    router: respx.MockRouter,
    client: httpx.AsyncClient,
    sleep: RecordingSleep,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="avatarkit.http")
    router.post("/x").mock(
        side_effect=[
            resp(503, json={"message": f"backend saw key {SECRET}"}),
            resp(401, json={"message": f"invalid key {SECRET}", "detail": SECRET}),
        ]
    )
    http = make_http(client, sleep)
    with pytest.raises(AuthenticationError) as info:
        await http.request(
            "POST", "/x", json={"password": "body-secret"}, params={"token": "query-secret"}
        )
    error = info.value
    assert error.message == "invalid key ***"
    assert SECRET not in str(error)
    assert SECRET not in repr(error)
    assert SECRET not in repr(http)
    assert repr(http) == f"VendorHttp(provider='tavus', base_url='{BASE}')"
    assert any(r.levelno == logging.WARNING for r in caplog.records)
    _assert_secret_absent(caplog, SECRET, "body-secret", "query-secret", "token=")


async def test_bearer_token_masked_and_not_logged(
    router: respx.MockRouter,
    client: httpx.AsyncClient,
    sleep: RecordingSleep,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="avatarkit.http")
    router.post("/x").mock(side_effect=httpx.ConnectError(f"proxy said {SECRET}"))
    http = make_http(client, sleep, auth={"Authorization": f"Bearer {SECRET}"})
    with pytest.raises(ProviderConnectionError) as info:
        await http.request("POST", "/x", headers={"X-Session-Token": "per-call-token"})
    assert SECRET not in str(info.value)
    assert "***" in str(info.value)
    _assert_secret_absent(caplog, SECRET, "per-call-token")


async def test_base_url_credentials_not_in_repr_or_logs(
    client: httpx.AsyncClient, sleep: RecordingSleep, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="avatarkit.http")
    http = make_http(client, sleep, base_url="https://user:hunter2@api.vendor.test/v2")
    assert "hunter2" not in repr(http)
    with respx.mock() as mock_router:
        mock_router.get(f"{BASE}/x").mock(side_effect=[resp(500), resp(200)])
        await http.request("GET", "/x")
    _assert_secret_absent(caplog, "hunter2", "user:")


async def test_caller_secret_header_masked(
    router: respx.MockRouter, client: httpx.AsyncClient, sleep: RecordingSleep
) -> None:
    router.post("/sessions/start").mock(
        return_value=resp(401, json={"message": "bad token session-tok-XYZ"})
    )
    http = make_http(client, sleep)
    with pytest.raises(AuthenticationError) as info:
        await http.request(
            "POST", "/sessions/start", headers={"Authorization": "Bearer session-tok-XYZ"}
        )
    assert "session-tok-XYZ" not in str(info.value)


async def test_log_lines(
    router: respx.MockRouter,
    client: httpx.AsyncClient,
    sleep: RecordingSleep,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="avatarkit.http")
    router.post("/x").mock(side_effect=[resp(429, headers={"Retry-After": "2"}), resp(200)])
    await make_http(client, sleep).request("POST", "/x", params={"a": "b"})
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    debugs = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert warnings == [f"POST {BASE}/x -> 429, retrying in 2.0 s (attempt 2/4)"]
    assert len(debugs) == 2
    assert debugs[0].startswith(f"POST {BASE}/x -> 429 (attempt 1/4, ")
    assert debugs[1].startswith(f"POST {BASE}/x -> 200 (attempt 2/4, ")
    assert all(m.endswith(" ms)") for m in debugs)


# --------------------------------------------------------------------------- request_json


async def test_request_json_returns_object(
    router: respx.MockRouter, client: httpx.AsyncClient, sleep: RecordingSleep
) -> None:
    router.post("/x").mock(return_value=resp(201, json={"id": "s1", "n": 2}))
    assert await make_http(client, sleep).request_json("POST", "/x") == {"id": "s1", "n": 2}


@pytest.mark.parametrize("response", [resp(204), resp(200, content=b""), resp(202, text="  ")])
async def test_request_json_empty_body_is_empty_dict(
    router: respx.MockRouter,
    client: httpx.AsyncClient,
    sleep: RecordingSleep,
    response: httpx.Response,
) -> None:
    router.delete("/x").mock(return_value=response)
    assert await make_http(client, sleep).request_json("DELETE", "/x") == {}


@pytest.mark.parametrize(
    "response", [resp(200, json=[SECRET, 2]), resp(200, text=f"<html>{SECRET}</html>")]
)
async def test_request_json_unexpected_body(
    router: respx.MockRouter,
    client: httpx.AsyncClient,
    sleep: RecordingSleep,
    response: httpx.Response,
) -> None:
    route = router.get("/x").mock(return_value=response)
    with pytest.raises(ServerError) as info:
        await make_http(client, sleep).request_json("GET", "/x")
    assert route.call_count == 1
    assert info.value.retryable is False
    assert info.value.status == 200
    assert "unexpected response body" in info.value.message
    assert SECRET not in str(info.value)


async def test_request_json_raises_typed_errors(
    router: respx.MockRouter, client: httpx.AsyncClient, sleep: RecordingSleep
) -> None:
    router.get("/x").mock(return_value=resp(404, json={"message": "no such replica"}))
    with pytest.raises(NotFoundError, match="no such replica"):
        await make_http(client, sleep).request_json("GET", "/x")


# --------------------------------------------------------------------------- backoff


def test_backoff_doubles_and_caps_without_jitter() -> None:
    policy = RetryPolicy(initial_backoff=0.5, max_backoff=8.0, jitter=0.0)
    assert [policy.backoff(n) for n in range(7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert policy.backoff(10_000) == 8.0


@given(
    initial=st.floats(min_value=0.0, max_value=10.0),
    extra=st.floats(min_value=0.0, max_value=100.0),
    jitter=st.floats(min_value=0.0, max_value=1.0),
    retry=st.integers(min_value=0, max_value=100),
    rng=st.randoms(use_true_random=False),
)
def test_backoff_within_jitter_bounds_and_capped(
    initial: float, extra: float, jitter: float, retry: int, rng: random.Random
) -> None:
    policy = RetryPolicy(initial_backoff=initial, max_backoff=initial + extra, jitter=jitter)
    wait = policy.backoff(retry, rng=rng)
    base = initial * 2.0**retry
    assert 0.0 <= wait <= policy.max_backoff
    assert wait >= min(policy.max_backoff, base * (1 - jitter)) - 1e-9
    assert wait <= base * (1 + jitter) + 1e-9


async def test_jittered_waits_stay_in_bounds(
    router: respx.MockRouter, client: httpx.AsyncClient, sleep: RecordingSleep
) -> None:
    router.get("/x").mock(return_value=resp(500))
    policy = RetryPolicy(max_retries=6, initial_backoff=0.5, max_backoff=8.0, jitter=0.2)
    with pytest.raises(ServerError):
        await make_http(client, sleep, retry=policy).request("GET", "/x")
    assert len(sleep.delays) == 6
    for n, wait in enumerate(sleep.delays):
        base = 0.5 * 2**n
        assert min(8.0, base * 0.8) <= wait <= min(8.0, base * 1.2)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_retries": -1},
        {"max_retries": 1000},
        {"initial_backoff": -0.1},
        {"initial_backoff": float("inf")},
        {"jitter": 1.5},
        {"max_retry_after": -1},
        {"initial_backoff": 5.0, "max_backoff": 1.0},
        {"unknown": 1},
    ],
)
def test_retry_policy_validation(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        RetryPolicy(**kwargs)


def test_retry_policy_is_frozen() -> None:
    policy = RetryPolicy()
    assert (policy.max_retries, policy.initial_backoff, policy.max_backoff) == (3, 0.5, 8.0)
    assert (policy.max_retry_after, policy.jitter) == (60.0, 0.2)
    with pytest.raises(ValidationError):
        policy.max_retries = 5  # type: ignore[misc]
    with pytest.raises(ValueError):
        policy.backoff(-1)
