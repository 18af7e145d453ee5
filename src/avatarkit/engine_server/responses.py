"""HTTP helpers of the engine server: auth checks and the JSON error and model bodies."""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from .protocol import Health, SessionEnded, SessionInfo

__all__ = ["bearer_token", "error_response", "is_loopback", "json_response", "secret_matches"]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def secret_matches(given: str | None, expected: str | None) -> bool:
    if given is None or expected is None:
        return False
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def bearer_token(request: web.Request) -> str | None:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    value = value.strip()
    return value if scheme.lower() == "bearer" and value else None


def error_response(status: int, type_: str, message: str, *,
           headers: Mapping[str, str] | None = None, **extra: Any) -> web.Response:
    body = {"error": {"type": type_, "message": message, **extra}}
    return web.json_response(body, status=status, headers=dict(headers or {}))


def json_response(model: SessionInfo | SessionEnded | Health, status: int = 200) -> web.Response:
    return web.Response(text=model.model_dump_json(), status=status,
                        content_type="application/json")
