"""One WebSocket to a vendor, with the SDK's error mapping (every WebSocket adapter uses it).

``VendorSocket`` opens the socket, maps a refused handshake to the same typed errors as an HTTP
call (401 -> ``AuthenticationError``, 402 -> ``BillingError``, 429 -> ``RateLimitError``...,
through :func:`error_from_response`), sends text, bytes or JSON, and yields what arrives until
the socket closes: an orderly close ends the iteration, a dropped one raises
``ProviderConnectionError`` with the close code. Query strings (session tokens) never reach a
log line or an error message.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import (
    ConnectionClosed,
    ConnectionClosedOK,
    InvalidStatus,
    WebSocketException,
)

from ..errors import ProviderConnectionError, ProviderError
from ..vendor_http import error_from_response

__all__ = ["VendorSocket", "to_ws_url"]

_QUERY_STRING = re.compile(r"\?\S*")


class _RedactQueryStrings(logging.Filter):
    """websockets logs the handshake's request line at DEBUG, query string (a session token)
    included: mask it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_QUERY_STRING.sub("?***", arg) if isinstance(arg, str) else arg
                                for arg in record.args)
        return True


#: the logger websockets uses for our sockets (instead of "websockets.client")
_WS_LOGGER = logging.getLogger("avatarkit.ws")
_WS_LOGGER.addFilter(_RedactQueryStrings())


def to_ws_url(url: str) -> str:
    """``http(s)://`` -> ``ws(s)://``; a ws URL is returned as it is."""
    if url.startswith("https://"):
        return "wss://" + url.removeprefix("https://")
    if url.startswith("http://"):
        return "ws://" + url.removeprefix("http://")
    return url


class VendorSocket:
    """A connected WebSocket to one vendor session."""

    def __init__(self, *, provider: str, what: str = "WebSocket", open_timeout: float = 10.0,
                 max_size: int = 2**22) -> None:
        self.provider = provider
        self.what = what
        self._open_timeout = open_timeout
        self._max_size = max_size
        self._ws: ClientConnection | None = None
        #: the close code and reason, once the socket closed (None while open)
        self.close_code: int | None = None
        self.close_reason: str = ""

    @property
    def connected(self) -> bool:
        return self._ws is not None

    async def connect(self, url: str, *, headers: Mapping[str, str] | None = None,
                      secrets: Sequence[str] = ()) -> None:
        """Open the socket. ``secrets`` are masked in any error (query strings always are)."""
        safe_url = to_ws_url(url).split("?", 1)[0]
        try:
            self._ws = await connect(to_ws_url(url), open_timeout=self._open_timeout,
                                     max_size=self._max_size, compression=None,
                                     additional_headers=dict(headers or {}),
                                     logger=_WS_LOGGER)
        except InvalidStatus as exc:
            raise self._refused(exc, safe_url, secrets) from None
        except (OSError, TimeoutError, WebSocketException) as exc:
            raise ProviderConnectionError(
                f"could not open the {self.what} at {safe_url}: {type(exc).__name__}",
                provider=self.provider) from None

    def _refused(self, exc: InvalidStatus, safe_url: str,
                 secrets: Sequence[str]) -> ProviderError:
        response = exc.response
        fake = httpx.Response(response.status_code, headers=list(response.headers.raw_items()),
                              content=bytes(response.body or b""))
        error = error_from_response(self.provider, fake, secrets=secrets)
        error.message = f"{self.what} refused at {safe_url}: {error.message}"
        error.args = (error.message,)
        return error

    async def send_text(self, data: str | bytes) -> None:
        """Send a text frame (``bytes`` must be UTF-8)."""
        await self._send(data, text=True)

    async def send_bytes(self, data: bytes) -> None:
        """Send a binary frame."""
        await self._send(data, text=False)

    async def send_json(self, message: Mapping[str, Any]) -> None:
        await self._send(json.dumps(message, separators=(",", ":")).encode(), text=True)

    async def _send(self, data: str | bytes, *, text: bool) -> None:
        ws = self._ws
        if ws is None:
            raise ProviderConnectionError(f"{self.what} is not connected",
                                          provider=self.provider)
        try:
            await ws.send(data, text=text)
        except ConnectionClosed as exc:
            self._closed(exc)
            raise ProviderConnectionError(
                f"{self.what} closed (code {self.close_code})", provider=self.provider
            ) from None

    async def messages(self) -> AsyncIterator[str | bytes]:
        """Frames as they arrive (text as ``str``, binary as ``bytes``) until the socket closes."""
        ws = self._ws
        if ws is None:
            return
        try:
            async for frame in ws:
                yield frame
        except ConnectionClosedOK as exc:
            self._closed(exc)
            return
        except ConnectionClosed as exc:
            self._closed(exc)
            raise ProviderConnectionError(f"{self.what} dropped (code {self.close_code})",
                                          provider=self.provider) from None
        # iteration ends without an exception on a normal close
        if ws.close_code is not None:
            self.close_code, self.close_reason = ws.close_code, ws.close_reason or ""

    async def json_messages(self) -> AsyncIterator[dict[str, Any]]:
        """The JSON-object text frames; anything else is skipped."""
        async for frame in self.messages():
            if isinstance(frame, bytes):
                continue
            try:
                message = json.loads(frame)
            except ValueError:
                continue
            if isinstance(message, dict):
                yield message

    def _closed(self, exc: ConnectionClosed) -> None:
        frame = exc.rcvd
        self.close_code = frame.code if frame is not None else 1006
        self.close_reason = frame.reason if frame is not None else ""

    async def aclose(self) -> None:
        """Close the socket. Idempotent."""
        ws, self._ws = self._ws, None
        if ws is not None:
            await ws.close()
