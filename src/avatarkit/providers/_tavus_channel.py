"""Channels that carry Tavus' Interactions Protocol (JSON app-messages) to a conversation.

In production the conversation is a Daily room and the messages are Daily app-messages
(:class:`DailyChannel`, needs the ``daily`` extra). The offline emulator serves the same
messages over a WebSocket next to the room URL (:class:`WebSocketChannel`). Both implement
:class:`AppMessageChannel`, so the adapter does not know which one it talks through.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any
from urllib.parse import urlencode

from ..errors import ProviderConnectionError
from ._ws import VendorSocket, to_ws_url

__all__ = [
    "PROVIDER",
    "AppMessageChannel",
    "DailyChannel",
    "WebSocketChannel",
]

PROVIDER = "tavus"


class AppMessageChannel(ABC):
    """A bidirectional stream of JSON objects between us and one conversation."""

    @abstractmethod
    async def connect(self, conversation_url: str, meeting_token: str | None) -> None:
        """Join the conversation. Raises ``ProviderError`` subclasses on failure."""

    @abstractmethod
    async def send(self, message: Mapping[str, Any]) -> None:
        """Send one message. Raises ``ProviderConnectionError`` when the channel is gone."""

    async def send_encoded(self, message: bytes) -> None:
        """Send one message that is already UTF-8 JSON (the audio hot path builds echo
        messages from a template). Channels that carry text send it as it is; the default
        decodes it and goes through :meth:`send`."""
        await self.send(json.loads(message))

    @abstractmethod
    def messages(self) -> AsyncIterator[dict[str, Any]]:
        """Messages from the conversation until the channel closes. An orderly close ends the
        iteration; a dropped channel raises ``ProviderConnectionError``."""

    @abstractmethod
    async def aclose(self) -> None:
        """Leave the conversation. Idempotent."""


class WebSocketChannel(AppMessageChannel):
    """App-messages over ``<conversation_url>/app-messages`` (the emulator's room channel)."""

    def __init__(self, *, open_timeout: float = 10.0) -> None:
        self._socket = VendorSocket(provider=PROVIDER, what="conversation room",
                                    open_timeout=open_timeout)

    @staticmethod
    def url_for(conversation_url: str, meeting_token: str | None) -> str:
        url = f"{to_ws_url(conversation_url.rstrip('/'))}/app-messages"
        return f"{url}?{urlencode({'t': meeting_token})}" if meeting_token else url

    async def connect(self, conversation_url: str, meeting_token: str | None) -> None:
        await self._socket.connect(self.url_for(conversation_url, meeting_token),
                                   secrets=[meeting_token] if meeting_token else ())

    async def send(self, message: Mapping[str, Any]) -> None:
        await self._socket.send_json(message)

    async def send_encoded(self, message: bytes) -> None:
        await self._socket.send_text(message)

    def messages(self) -> AsyncIterator[dict[str, Any]]:
        return self._socket.json_messages()

    async def aclose(self) -> None:
        await self._socket.aclose()


class DailyChannel(AppMessageChannel):
    """App-messages through a Daily room, with ``daily-python`` (``pip install avatarkit[daily]``).

    Daily calls back on its own threads; every callback is handed to the event loop with
    ``call_soon_threadsafe``.
    """

    _init_lock = threading.Lock()
    _initialised = False

    def __init__(
        self,
        *,
        user_name: str = "avatarkit",
        join_timeout: float = 20.0,
        call_client_factory: Callable[[Any], Any] | None = None,
    ) -> None:
        self._user_name = user_name
        self._join_timeout = join_timeout
        self._factory = call_client_factory
        self._client: Any = None
        self._queue: asyncio.Queue[dict[str, Any] | BaseException | None] = asyncio.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def available(cls) -> bool:
        try:
            import daily  # noqa: F401
        except ImportError:
            return False
        return True

    def _make_client(self) -> Any:
        if self._factory is not None:
            return self._factory(self)
        import daily

        with DailyChannel._init_lock:
            if not DailyChannel._initialised:
                daily.Daily.init()
                DailyChannel._initialised = True
        channel = self

        class _Handler(daily.EventHandler):
            def on_app_message(self, message: Any, sender: str) -> None:
                if message is not None:  # a null payload is not "left"
                    channel._from_thread(message)

            def on_call_state_updated(self, state: str) -> None:
                if state == "left":
                    channel._from_thread(None)

            def on_error(self, message: str) -> None:
                channel._from_thread(ProviderConnectionError(f"Daily error: {message}",
                                                             provider=PROVIDER))

        return daily.CallClient(event_handler=_Handler())

    def _from_thread(self, item: Any) -> None:
        """Called from Daily's threads: a message (dict or JSON text), None (left) or an error."""
        if isinstance(item, str):
            with contextlib.suppress(ValueError):
                item = json.loads(item)
            if item is None:  # JSON text "null" is a payload, not "left"
                return
        if item is not None and not isinstance(item, dict | BaseException):
            return
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed since the check
                self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def _completion(self) -> tuple[asyncio.Future[Any], Callable[..., None]]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()

        def done(*args: Any) -> None:
            error = args[-1] if args else None

            def settle() -> None:
                if future.done():
                    return
                if error:
                    future.set_exception(ProviderConnectionError(f"Daily: {error}",
                                                                 provider=PROVIDER))
                else:
                    future.set_result(args[0] if len(args) > 1 else None)

            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(settle)

        return future, done

    async def connect(self, conversation_url: str, meeting_token: str | None) -> None:
        self._loop = asyncio.get_running_loop()
        self._client = self._make_client()
        future, done = self._completion()
        self._client.join(conversation_url, meeting_token=meeting_token,
                          client_settings={"inputs": {"camera": False, "microphone": False}},
                          completion=done)
        try:
            async with asyncio.timeout(self._join_timeout):
                await future
        except TimeoutError:
            await self.aclose()
            raise ProviderConnectionError("timed out joining the Daily room",
                                          provider=PROVIDER) from None
        except BaseException:  # ProviderConnectionError, or cancelled: leave and release
            await self.aclose()
            raise

    async def send(self, message: Mapping[str, Any]) -> None:
        if self._client is None:
            raise ProviderConnectionError("Daily channel is not connected", provider=PROVIDER)
        future, done = self._completion()
        self._client.send_app_message(dict(message), completion=done)
        await future

    async def messages(self) -> AsyncIterator[dict[str, Any]]:
        while True:
            item = await self._queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        future, done = self._completion()
        client.leave(completion=done)
        with contextlib.suppress(ProviderConnectionError, TimeoutError):
            async with asyncio.timeout(5.0):
                await future
        client.release()
        self._queue.put_nowait(None)
