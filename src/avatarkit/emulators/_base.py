"""Shared plumbing for avatarkit's offline vendor emulators ("contract fakes").

Every vendor emulator (Tavus, HeyGen LiveAvatar, Simli, D-ID) is a stateful aiohttp
application served on a local port, in the spirit of moto's server mode. This module
holds what they all share and nothing vendor-specific:

* :class:`EmulatorServer` — the runner (127.0.0.1 and a free port by default), ``async with`` and
  an idempotent ``aclose()``; API-key check and fault injection around vendor routes; the request
  log; timers and channel tasks that ``aclose()`` cancels; the WebSockets it closes; and the
  ``/_emulator/*`` control API (no auth).
* :class:`BillingLedger` — the per-session meter (:class:`BillingEntry`): created/ended
  monotonic times and end reason.
* :class:`SessionRecord` — what every vendor's session record shares (its billing entry, end
  reason, timers and protocol errors); :class:`EmulatorServer` runs the shared part of a
  session's lifecycle on it: the capacity check, starting the meter, timers that end the
  session, ending it, and forgetting every session on reset.
* :class:`EmulatorFaults` — injected failures (5xx, 429, slow answers, a dropped realtime channel,
  interrupts the vendor never acknowledges), consumed in order of arrival.
* :class:`RequestRecord` — one logged request. The API key value is never stored, only whether
  one was sent.
* :class:`ChannelPeer` and :class:`Room` — server-side WebSockets with an ordered outbox, so
  events leave in the order the emulator's state machine produced them.
* :class:`SpeechPlayback` — a real-time model of an avatar playing queued speech.

Why one module: these are the parts of one server that every vendor emulator is built from,
and they work together: :class:`EmulatorServer` owns the ledger, the faults, the timer set and
the channel tasks, runs the session lifecycle on :class:`SessionRecord` values and tears all of
it down in ``aclose()``, so a vendor module takes its plumbing from one place. Media (the PCM16
checks, the talking face) is in ``_media``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal, Self, TypeVar, get_args

from aiohttp import WSCloseCode, web
from aiohttp.typedefs import Handler, Middleware

__all__ = [
    "BadRequest",
    "BillingEntry",
    "BillingLedger",
    "ChannelPeer",
    "EmulatorFaults",
    "EmulatorServer",
    "FastAPIValidationError",
    "FaultRoute",
    "Operation",
    "ProtocolError",
    "RequestFault",
    "RequestRecord",
    "Room",
    "SessionRecord",
    "SpeechPlayback",
    "TimerSet",
    "json_message",
    "now_iso",
    "read_json_object",
]

#: What a vendor route does, for fault matching: start a session, end one, or anything else.
Operation = Literal["create", "end", "other"]
#: Which requests a fault applies to ("any" = every authenticated vendor request).
FaultRoute = Literal["create", "end", "any"]

_FAULT_ROUTES: frozenset[str] = frozenset(get_args(FaultRoute))
_CONTROL_PREFIX = "/_emulator/"
#: Seconds a server-side WebSocket close waits for the client's closing handshake.
_WS_CLOSE_TIMEOUT = 2.0
#: Seconds ``aclose()`` lets in-flight HTTP handlers finish before aiohttp cancels them.
_SHUTDOWN_TIMEOUT = 1.0


def now_iso() -> str:
    """The vendors' timestamp format: ISO 8601 in UTC."""
    return datetime.now(UTC).isoformat()


class ProtocolError(Exception):
    """A channel message the vendor drops; its text goes into the session's
    ``protocol_errors`` so a test can see what the SDK got wrong."""


def json_message(raw: str) -> dict[str, Any]:
    """A text frame as the JSON object every vendor channel message must be."""
    try:
        message = json.loads(raw)
    except ValueError:
        raise ProtocolError("message is not valid JSON") from None
    if not isinstance(message, dict):
        raise ProtocolError("message is not a JSON object")
    return message


class FastAPIValidationError(Exception):
    """A request body a FastAPI vendor (LiveAvatar, Simli) rejects with 422 and ``detail[]``."""

    def __init__(self, field_name: str, message: str, kind: str, given: object = None) -> None:
        super().__init__(f"{field_name}: {message}")
        self.detail = {"type": kind, "loc": ["body", field_name], "msg": message, "input": given}

    def response(self) -> web.Response:
        return web.json_response({"detail": [self.detail]}, status=422)


class BadRequest(Exception):
    """A request an emulator refuses, answered in its vendor's error shape with ``status``."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """Parse the request body as a JSON object; ``ValueError`` (with the reason) otherwise."""
    try:
        raw = await request.text()
        body = json.loads(raw) if raw.strip() else {}
    except ValueError:
        raise ValueError("request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ValueError("request body must be a JSON object")
    return body


# --------------------------------------------------------------------------------------------
# Billing ledger
# --------------------------------------------------------------------------------------------


@dataclass
class BillingEntry:
    """The meter of one session, from creation (monotonic clock) until it ends."""

    session_id: str
    created_at: float
    ended_at: float | None = None
    end_reason: str | None = None

    @property
    def is_open(self) -> bool:
        return self.ended_at is None

    @property
    def billed_seconds(self) -> float:
        """Seconds billed so far; a running session counts up to now."""
        end = time.monotonic() if self.ended_at is None else self.ended_at
        return end - self.created_at


class BillingLedger:
    """What the vendor would bill: one entry per session, metered from create to end."""

    def __init__(self) -> None:
        self._entries: dict[str, BillingEntry] = {}

    def open(self, session_id: str) -> BillingEntry:
        entry = BillingEntry(session_id=session_id, created_at=time.monotonic())
        self._entries[session_id] = entry
        return entry

    def close(self, session_id: str, reason: str) -> bool:
        """Stop the meter of an open session; ``False`` when it was unknown or already ended."""
        entry = self._entries.get(session_id)
        if entry is None or not entry.is_open:
            return False
        entry.ended_at = time.monotonic()
        entry.end_reason = reason
        return True

    @property
    def entries(self) -> Mapping[str, BillingEntry]:
        return dict(self._entries)

    @property
    def open_sessions(self) -> int:
        return sum(1 for entry in self._entries.values() if entry.is_open)

    @property
    def billed_seconds(self) -> float:
        return sum(entry.billed_seconds for entry in self._entries.values())

    def clear(self) -> None:
        self._entries.clear()


# --------------------------------------------------------------------------------------------
# Session records
# --------------------------------------------------------------------------------------------


@dataclass(eq=False, kw_only=True)
class SessionRecord:
    """What every emulator keeps of one session beside its vendor's own fields.

    ``ledger_entry`` is the session's meter (None until it bills, or when it never does),
    ``end_reason`` why it ended, ``timers`` the timers that end it (by name) and
    ``protocol_errors`` what the emulator dropped of what the client sent. A vendor's record
    adds its fields and status names; :class:`EmulatorServer` runs the shared lifecycle on it.
    """

    ledger_entry: BillingEntry | None = None
    end_reason: str | None = None
    protocol_errors: list[str] = field(default_factory=list)
    timers: dict[str, asyncio.TimerHandle] = field(default_factory=dict, repr=False)

    @property
    def billed_seconds(self) -> float:
        return 0.0 if self.ledger_entry is None else self.ledger_entry.billed_seconds


_Record = TypeVar("_Record", bound=SessionRecord)


# --------------------------------------------------------------------------------------------
# Fault injection
# --------------------------------------------------------------------------------------------


@dataclass
class RequestFault:
    """One injected HTTP fault: fail, rate-limit or delay the next ``remaining`` matching calls."""

    kind: Literal["fail", "rate_limit", "slow"]
    route: FaultRoute
    remaining: int
    status: int = 0
    retry_after: float | None = None
    seconds: float = 0.0

    def matches(self, operation: Operation) -> bool:
        return self.route in ("any", operation)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "route": self.route,
            "remaining": self.remaining,
            "status": self.status,
            "retry_after": self.retry_after,
            "seconds": self.seconds,
        }


@dataclass(frozen=True)
class _FaultDecision:
    """What faults do to one request: wait ``delay`` seconds, then maybe answer ``failure``."""

    delay: float = 0.0
    failure: RequestFault | None = None


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer")
    return value


def _error_status(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 400 <= value <= 599:
        raise ValueError(f"{name} must be an HTTP error status between 400 and 599")
    return value


def _non_negative_seconds(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"{name} must be a number of seconds >= 0")
    return float(value)


def _fault_route(value: object, name: str) -> FaultRoute:
    if value not in _FAULT_ROUTES:
        raise ValueError(f"{name} must be one of {sorted(_FAULT_ROUTES)}")
    route: FaultRoute = value  # type: ignore[assignment]  # checked against the Literal above
    return route


class EmulatorFaults:
    """Faults injected into an emulator, from Python or ``POST /_emulator/faults``.

    HTTP faults queue up in order of arrival. For each authenticated vendor request the first
    matching ``slow`` fault delays it and the first matching ``fail``/``rate_limit`` fault answers
    it; each use decrements that fault's count and spent faults drop out. The API-key check
    happens before any fault. Channel faults (``drop_channel_after``, ``mute_interrupts``) stay
    in force until cleared.
    """

    def __init__(self) -> None:
        self._request_faults: list[RequestFault] = []
        #: Close a session's realtime channel (code 1011) once this much audio was received.
        self.drop_channel_after_audio_seconds: float | None = None
        #: Interrupts still stop playback, but the vendor never acknowledges them.
        self.mute_interrupts = False

    @property
    def pending(self) -> list[RequestFault]:
        return list(self._request_faults)

    def fail_next_creates(self, count: int, *, status: int = 503) -> None:
        self._queue("fail", "create", count, status=status)

    def fail_next_ends(self, count: int, *, status: int = 500) -> None:
        self._queue("fail", "end", count, status=status)

    def rate_limit_next(
        self, count: int, *, retry_after: float | None = 1.0, route: FaultRoute = "any"
    ) -> None:
        """Answer 429; ``retry_after=None`` sends no ``Retry-After`` header."""
        if retry_after is not None:
            retry_after = _non_negative_seconds(retry_after, "retry_after")
        self._queue("rate_limit", route, count, status=429, retry_after=retry_after)

    def slow_next(self, count: int, seconds: float, *, route: FaultRoute = "create") -> None:
        self._queue("slow", route, count, seconds=_non_negative_seconds(seconds, "seconds"))

    def drop_channel_after(self, audio_seconds: float | None) -> None:
        """Drop each session's channel once it has received ``audio_seconds`` (None: never)."""
        if audio_seconds is not None:
            audio_seconds = _non_negative_seconds(audio_seconds, "after_audio_seconds")
        self.drop_channel_after_audio_seconds = audio_seconds

    def channel_drop_due(self, audio_seconds: float) -> bool:
        """Whether a channel that has received ``audio_seconds`` must be dropped now."""
        threshold = self.drop_channel_after_audio_seconds
        return threshold is not None and audio_seconds >= threshold

    def clear(self) -> None:
        self._request_faults.clear()
        self.drop_channel_after_audio_seconds = None
        self.mute_interrupts = False

    def take(self, operation: Operation) -> _FaultDecision:
        """Consume the faults that apply to one request doing ``operation``."""
        slow = next(
            (f for f in self._request_faults if f.kind == "slow" and f.matches(operation)), None
        )
        failure = next(
            (f for f in self._request_faults if f.kind != "slow" and f.matches(operation)), None
        )
        for fault in (slow, failure):
            if fault is not None:
                fault.remaining -= 1
        self._request_faults = [f for f in self._request_faults if f.remaining > 0]
        return _FaultDecision(delay=slow.seconds if slow else 0.0, failure=failure)

    def configure(self, spec: Mapping[str, Any]) -> None:
        """Apply the JSON form used by ``POST /_emulator/faults``; ``ValueError`` if invalid.

        Keys: ``clear`` (true), ``fail_creates`` / ``fail_ends`` ``{count, status}``,
        ``rate_limit`` ``{count, retry_after, route}``, ``slow`` ``{count, seconds, route}``,
        ``drop_channel`` ``{after_audio_seconds}`` (or null), ``mute_interrupts`` (bool).
        Everything is validated before anything is applied.
        """
        known = {
            "clear",
            "fail_creates",
            "fail_ends",
            "rate_limit",
            "slow",
            "drop_channel",
            "mute_interrupts",
        }
        if unknown := sorted(set(spec) - known):
            raise ValueError(f"unknown fault(s) {unknown}; known: {sorted(known)}")
        if not isinstance(spec.get("clear", False), bool):
            raise ValueError("clear must be a boolean")
        staged = EmulatorFaults()
        if not spec.get("clear"):
            staged._request_faults = self.pending
            staged.drop_channel_after_audio_seconds = self.drop_channel_after_audio_seconds
            staged.mute_interrupts = self.mute_interrupts
        if "fail_creates" in spec:
            options = _options(spec, "fail_creates")
            staged.fail_next_creates(
                _positive_int(options.get("count", 1), "fail_creates.count"),
                status=_error_status(options.get("status", 503), "fail_creates.status"),
            )
        if "fail_ends" in spec:
            options = _options(spec, "fail_ends")
            staged.fail_next_ends(
                _positive_int(options.get("count", 1), "fail_ends.count"),
                status=_error_status(options.get("status", 500), "fail_ends.status"),
            )
        if "rate_limit" in spec:
            options = _options(spec, "rate_limit")
            retry_after = options.get("retry_after", 1.0)
            staged.rate_limit_next(
                _positive_int(options.get("count", 1), "rate_limit.count"),
                retry_after=None
                if retry_after is None
                else _non_negative_seconds(retry_after, "rate_limit.retry_after"),
                route=_fault_route(options.get("route", "any"), "rate_limit.route"),
            )
        if "slow" in spec:
            options = _options(spec, "slow")
            staged.slow_next(
                _positive_int(options.get("count", 1), "slow.count"),
                _non_negative_seconds(options.get("seconds"), "slow.seconds"),
                route=_fault_route(options.get("route", "create"), "slow.route"),
            )
        if "drop_channel" in spec:
            drop = spec["drop_channel"]
            staged.drop_channel_after(
                None
                if drop is None
                else _non_negative_seconds(
                    _options(spec, "drop_channel").get("after_audio_seconds"),
                    "drop_channel.after_audio_seconds",
                )
            )
        if "mute_interrupts" in spec:
            if not isinstance(spec["mute_interrupts"], bool):
                raise ValueError("mute_interrupts must be a boolean")
            staged.mute_interrupts = spec["mute_interrupts"]
        self._request_faults = staged._request_faults
        self.drop_channel_after_audio_seconds = staged.drop_channel_after_audio_seconds
        self.mute_interrupts = staged.mute_interrupts

    def describe(self) -> dict[str, Any]:
        return {
            "requests": [fault.describe() for fault in self._request_faults],
            "drop_channel_after_audio_seconds": self.drop_channel_after_audio_seconds,
            "mute_interrupts": self.mute_interrupts,
        }

    def _queue(
        self,
        kind: Literal["fail", "rate_limit", "slow"],
        route: FaultRoute,
        count: int,
        *,
        status: int = 0,
        retry_after: float | None = None,
        seconds: float = 0.0,
    ) -> None:
        if kind != "slow":
            _error_status(status, "status")
        self._request_faults.append(
            RequestFault(
                kind=kind,
                route=_fault_route(route, "route"),
                remaining=_positive_int(count, "count"),
                status=status,
                retry_after=retry_after,
                seconds=seconds,
            )
        )


def _options(spec: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    options = spec[key]
    if not isinstance(options, dict):
        raise ValueError(f"{key} must be a JSON object")
    return options


# --------------------------------------------------------------------------------------------
# Request log
# --------------------------------------------------------------------------------------------


@dataclass
class RequestRecord:
    """One request the emulator served (control API excluded).

    ``headers`` keeps only ``idempotency-key``; for the API key only its presence is kept.
    The query string is not kept (it can carry meeting tokens). ``status`` is ``None`` while the
    request is in flight; a WebSocket that was accepted reads 101.
    """

    method: str
    path: str
    headers: dict[str, str]
    api_key_present: bool
    status: int | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "path": self.path,
            "headers": dict(self.headers),
            "api_key_present": self.api_key_present,
            "status": self.status,
        }


# --------------------------------------------------------------------------------------------
# Timers and realtime channels
# --------------------------------------------------------------------------------------------


class TimerSet:
    """``loop.call_later`` handles that can all be cancelled at once (by ``aclose()``)."""

    def __init__(self) -> None:
        self._handles: set[asyncio.TimerHandle] = set()

    def call_later(self, delay: float, callback: Callable[[], None]) -> asyncio.TimerHandle:
        def fire() -> None:
            self._handles.discard(handle)
            callback()

        handle = asyncio.get_running_loop().call_later(max(0.0, delay), fire)
        self._handles.add(handle)
        return handle

    def cancel(self, handle: asyncio.TimerHandle | None) -> None:
        if handle is not None:
            handle.cancel()
            self._handles.discard(handle)

    def cancel_all(self) -> None:
        for handle in self._handles:
            handle.cancel()
        self._handles.clear()

    def rearm(self, slots: dict[str, asyncio.TimerHandle], key: str, delay: float,
              callback: Callable[[], None]) -> None:
        """(Re)start the timer a session keeps under ``key`` in ``slots``."""
        self.cancel(slots.pop(key, None))
        slots[key] = self.call_later(delay, callback)

    def disarm(self, slots: dict[str, asyncio.TimerHandle], key: str | None = None) -> None:
        """Cancel the timer under ``key``, or every timer in ``slots``."""
        if key is not None:
            self.cancel(slots.pop(key, None))
            return
        for handle in slots.values():
            self.cancel(handle)
        slots.clear()


@dataclass(frozen=True)
class _CloseRequest:
    code: int
    reason: str


class ChannelPeer:
    """A server-side WebSocket whose outgoing frames go through one ordered outbox.

    ``send_json`` and ``close`` only enqueue, so state-machine code stays synchronous and frames
    leave in the order they were produced; a pump task (owned by :class:`EmulatorServer`) writes
    them. After ``close`` nothing more is queued.
    """

    def __init__(self, ws: web.WebSocketResponse) -> None:
        self.ws = ws
        self.closed_by_emulator = False
        self._outbox: asyncio.Queue[str | _CloseRequest | None] = asyncio.Queue()

    def send_json(self, payload: Mapping[str, Any]) -> None:
        if not self.closed_by_emulator:
            self._outbox.put_nowait(json.dumps(payload))

    def send_text(self, text: str) -> None:
        """Queue a raw text frame (channels that speak plain lines, e.g. Simli's)."""
        if not self.closed_by_emulator:
            self._outbox.put_nowait(text)

    def close(self, code: int, reason: str = "") -> None:
        if not self.closed_by_emulator:
            self.closed_by_emulator = True
            self._outbox.put_nowait(_CloseRequest(code, reason))

    def finish(self) -> None:
        """Let the pump stop once it has written what is already queued."""
        self._outbox.put_nowait(None)

    async def pump(self) -> None:
        while (item := await self._outbox.get()) is not None:
            if self.ws.closed:
                return
            if isinstance(item, _CloseRequest):
                await self.ws.close(code=item.code, message=item.reason.encode())
                return
            try:
                await self.ws.send_str(item)
            except ConnectionResetError:
                return


class Room:
    """The peers connected to one session's realtime channel."""

    def __init__(self) -> None:
        self._peers: list[ChannelPeer] = []

    def add(self, peer: ChannelPeer) -> None:
        self._peers.append(peer)

    def remove(self, peer: ChannelPeer) -> None:
        if peer in self._peers:
            self._peers.remove(peer)

    def broadcast(self, payload: Mapping[str, Any]) -> None:
        for peer in self._peers:
            peer.send_json(payload)

    def close_all(self, code: int, reason: str = "") -> None:
        for peer in self._peers:
            peer.close(code, reason)

    def __len__(self) -> int:
        return len(self._peers)


# --------------------------------------------------------------------------------------------
# Speech playback
# --------------------------------------------------------------------------------------------


class SpeechPlayback:
    """Real-time model of an avatar playing utterances at 1x wall-clock speed.

    Audio is fed per utterance id with its duration. An idle avatar starts speaking on the first
    audio (``on_started``); it finishes (``on_stopped`` with the seconds played) once the
    utterance was marked done and everything queued has played. Audio for a different utterance
    supersedes the current one (stopped, then the new one starts). If the queue runs dry before
    done, the avatar keeps "speaking" and its clock pauses until more audio arrives. Audio for an
    utterance that already finished, was superseded or interrupted is ignored.
    """

    def __init__(
        self,
        timers: TimerSet,
        *,
        on_started: Callable[[str], None],
        on_stopped: Callable[[str, float], None],
    ) -> None:
        self._timers = timers
        self._on_started = on_started
        self._on_stopped = on_stopped
        self._closed_utterances: set[str] = set()
        self._finish_timer: asyncio.TimerHandle | None = None
        self.speaking_id: str | None = None
        self._clock_origin = 0.0
        self._queued_seconds = 0.0
        self._done = False

    @property
    def played_seconds(self) -> float:
        """Seconds of the current utterance played so far (never more than was received)."""
        if self.speaking_id is None:
            return 0.0
        return min(self._queued_seconds, time.monotonic() - self._clock_origin)

    def feed(self, utterance_id: str, seconds: float, *, done: bool) -> None:
        if utterance_id in self._closed_utterances:
            return
        if self.speaking_id is not None and self.speaking_id != utterance_id:
            superseded, played = self._stop()
            self._on_stopped(superseded, played)
        now = time.monotonic()
        if self.speaking_id is None:
            if seconds <= 0:
                if done:
                    self._closed_utterances.add(utterance_id)
                return
            self.speaking_id = utterance_id
            self._clock_origin = now
            self._queued_seconds = 0.0
            self._done = False
            self._on_started(utterance_id)
        elif now - self._clock_origin > self._queued_seconds:
            # Ran dry (underrun): playback resumes from where it stopped, not from "now".
            self._clock_origin = now - self._queued_seconds
        self._queued_seconds += seconds
        self._done = self._done or done
        if self._done:
            self._timers.cancel(self._finish_timer)
            remaining = self._clock_origin + self._queued_seconds - now
            self._finish_timer = self._timers.call_later(remaining, self._finish)

    def interrupt(self) -> tuple[str, float] | None:
        """Drop the queue; the interrupted utterance and seconds played, or None if idle."""
        if self.speaking_id is None:
            return None
        return self._stop()

    def stop_silently(self) -> None:
        """Go idle without any callback (the session is over)."""
        if self.speaking_id is not None:
            self._stop()

    def _finish(self) -> None:
        self._finish_timer = None
        if self.speaking_id is not None:
            finished, played = self._stop()
            self._on_stopped(finished, played)

    def _stop(self) -> tuple[str, float]:
        assert self.speaking_id is not None
        stopped, played = self.speaking_id, self.played_seconds
        self._timers.cancel(self._finish_timer)
        self._finish_timer = None
        self._closed_utterances.add(stopped)
        self.speaking_id = None
        return stopped, played


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------


class EmulatorServer(ABC):
    """Base of every vendor emulator: the aiohttp runner plus the shared machinery.

    Subclasses set ``name`` and ``auth_header`` and implement ``_add_vendor_routes``,
    ``_error_response``, ``_vendor_state`` and ``_reset_sessions``. Vendor routes registered with
    ``_add_api_route`` get the API-key check, then fault injection; everything is recorded in the
    request log except the control API.

    Every vendor's sessions (:class:`SessionRecord` subclasses) go through the same lifecycle
    here: ``check_capacity`` before a billed session is made, ``_bill`` to start its meter,
    ``_playback`` for its speech, ``_end_after`` for the timers that end it, ``_stop_session``
    when it ends (reason, meter, timers, playback) and ``_end_and_forget`` on a reset. The
    vendor keeps its status names and what it sends and closes when a session ends.
    """

    #: Short vendor name, as used by ``avatarkit emulate``.
    name: ClassVar[str]
    #: Request header that carries the API key.
    auth_header: ClassVar[str]

    def __init__(
        self,
        *,
        api_keys: Iterable[str],
        faces: Iterable[str],
        accept_any_face: bool,
        host: str,
        port: int,
        max_concurrent: int,
        concurrency_limit_status: int,
    ) -> None:
        if isinstance(max_concurrent, bool) or max_concurrent < 0:
            raise ValueError("max_concurrent must be an integer >= 0")
        if not 400 <= concurrency_limit_status <= 599:
            raise ValueError("concurrency_limit_status must be an HTTP error status")
        #: billed sessions the account may have open at once (the vendor's plan limit)
        self.max_concurrent = max_concurrent
        #: the status a create over that limit is refused with
        self.concurrency_limit_status = concurrency_limit_status
        keys = frozenset(api_keys)
        if not keys or any(not isinstance(key, str) or not key for key in keys):
            raise ValueError("api_keys must contain at least one non-empty string")
        self._api_keys = keys
        self._faces: set[str] = set(faces)
        self.accept_any_face = accept_any_face
        self.faults = EmulatorFaults()
        self.ledger = BillingLedger()
        self._host = host
        self._port = port
        self._url: str | None = None
        self._runner: web.AppRunner | None = None
        self._lifecycle: Literal["new", "running", "closed"] = "new"
        self._requests: list[RequestRecord] = []
        self._timers = TimerSet()
        self._channel_tasks: dict[ChannelPeer, asyncio.Task[None]] = {}

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:41234`` (available once started)."""
        if self._url is None:
            raise RuntimeError(f"{type(self).__name__} is not running; use start() or async with")
        return self._url

    async def start(self) -> None:
        if self._lifecycle != "new":
            raise RuntimeError(f"{type(self).__name__} can only be started once")
        self._lifecycle = "running"
        app = web.Application(middlewares=[self._request_log_middleware()])
        app.router.add_get(f"{_CONTROL_PREFIX}state", self._handle_state)
        app.router.add_post(f"{_CONTROL_PREFIX}faults", self._handle_faults)
        app.router.add_post(f"{_CONTROL_PREFIX}faces", self._handle_faces)
        app.router.add_post(f"{_CONTROL_PREFIX}reset", self._handle_reset)
        self._add_vendor_routes(app)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=_SHUTDOWN_TIMEOUT)
        await runner.setup()
        self._runner = runner
        try:
            await web.TCPSite(runner, self._host, self._port).start()
        except BaseException:
            await self.aclose()
            raise
        port = runner.addresses[0][1]
        host = f"[{self._host}]" if ":" in self._host else self._host
        self._url = f"http://{host}:{port}"

    async def aclose(self) -> None:
        """Stop serving: cancel timers and channel tasks, close WebSockets (1001). Idempotent."""
        if self._lifecycle == "closed":
            return
        self._lifecycle = "closed"
        self._timers.cancel_all()
        tasks = list(self._channel_tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(
            *(peer.ws.close(code=WSCloseCode.GOING_AWAY) for peer in list(self._channel_tasks)),
            return_exceptions=True,
        )
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- shared state ----------------------------------------------------------------------

    @property
    def open_sessions(self) -> int:
        return self.ledger.open_sessions

    @property
    def billed_seconds(self) -> float:
        return self.ledger.billed_seconds

    @property
    def requests(self) -> list[RequestRecord]:
        return list(self._requests)

    @property
    def faces(self) -> frozenset[str]:
        return frozenset(self._faces)

    def add_face(self, face_id: str) -> None:
        self._faces.add(face_id)

    def has_face(self, face_id: str) -> bool:
        return self.accept_any_face or face_id in self._faces

    @property
    def at_capacity(self) -> bool:
        """Whether ``max_concurrent`` billed sessions are open (one more is refused)."""
        return self.open_sessions >= self.max_concurrent

    def check_capacity(self, message: str) -> None:
        """Refuse one more billed session when ``max_concurrent`` are open."""
        if self.at_capacity:
            raise BadRequest(message, status=self.concurrency_limit_status)

    def state(self) -> dict[str, Any]:
        """Everything the control API's ``GET /_emulator/state`` returns."""
        return {
            "emulator": self.name,
            "open_sessions": self.open_sessions,
            "billed_seconds": self.billed_seconds,
            "faults": self.faults.describe(),
            "requests": [record.describe() for record in self._requests],
            **self._vendor_state(),
        }

    async def reset(self) -> None:
        """End every session (flushing its channel), then clear faults, logs and the ledger."""
        self._reset_sessions()
        closing = [task for peer, task in self._channel_tasks.items() if peer.closed_by_emulator]
        if closing:
            await asyncio.wait(closing, timeout=_WS_CLOSE_TIMEOUT)
        self.faults.clear()
        self._requests.clear()
        self.ledger.clear()

    # -- the session lifecycle every vendor shares ------------------------------------------

    def _bill(self, record: SessionRecord, session_id: str) -> None:
        """Start ``record``'s meter under ``session_id``: it bills and holds a concurrency slot
        until :meth:`_stop_session`."""
        record.ledger_entry = self.ledger.open(session_id)

    def _playback(
        self, *, on_started: Callable[[str], None], on_stopped: Callable[[str, float], None]
    ) -> SpeechPlayback:
        """A session's speech player, on the emulator's timers (``aclose()`` cancels them)."""
        return SpeechPlayback(self._timers, on_started=on_started, on_stopped=on_stopped)

    def _end_after(
        self,
        record: _Record,
        key: str,
        delay: float,
        end: Callable[[_Record, str], None],
        *,
        reason: str | None = None,
    ) -> None:
        """(Re)arm ``record``'s timer ``key``: ``delay`` seconds from now it calls
        ``end(record, reason)`` (the reason is the key unless given)."""
        because = key if reason is None else reason
        self._timers.rearm(record.timers, key, delay, lambda: end(record, because))

    def _stop_session(
        self, record: SessionRecord, reason: str, playback: SpeechPlayback | None = None
    ) -> None:
        """What ending a session means for every vendor: the reason is kept, the meter stops
        with it, the session's timers are cancelled and its ``playback`` goes quiet. The
        vendor sets its own status first and closes its channel after."""
        record.end_reason = reason
        if record.ledger_entry is not None:
            self.ledger.close(record.ledger_entry.session_id, reason)
        self._timers.disarm(record.timers)
        if playback is not None:
            playback.stop_silently()

    @staticmethod
    def _end_and_forget(
        records: dict[str, _Record], end: Callable[[_Record, str], None], reason: str
    ) -> None:
        """End every session in ``records`` with ``reason`` (on a reset), then forget them."""
        for record in list(records.values()):
            end(record, reason)
        records.clear()

    # -- helpers for vendor subclasses -----------------------------------------------------

    def _add_api_route(
        self,
        app: web.Application,
        method: str,
        path: str,
        handler: Handler,
        *,
        operation: Operation = "other",
    ) -> None:
        """Register a vendor route behind the API-key check and fault injection."""

        async def guarded(request: web.Request) -> web.StreamResponse:
            if not self._is_authorized(request):
                return self._error_response(401, "Invalid or missing API key")
            decision = self.faults.take(operation)
            if decision.delay:
                # A slow vendor has the request (body read) and acts on it even when the
                # client gives up waiting: a create that times out may still create.
                await request.read()
                await asyncio.sleep(decision.delay)
            if (failure := decision.failure) is not None:
                if failure.kind == "rate_limit":
                    headers = {}
                    if failure.retry_after is not None:
                        headers["Retry-After"] = f"{failure.retry_after:g}"
                    return self._error_response(429, "rate limit exceeded", headers=headers)
                return self._error_response(failure.status, "injected failure")
            return await handler(request)

        app.router.add_route(method, path, guarded)

    def _is_authorized(self, request: web.Request) -> bool:
        return request.headers.get(self.auth_header) in self._api_keys

    def _api_key_identity(self, request: web.Request) -> str:
        """A stable, non-reversible name for the caller's key (for per-key namespaces)."""
        key = request.headers.get(self.auth_header, "")
        return hashlib.sha256(key.encode()).hexdigest()

    @contextlib.asynccontextmanager
    async def _open_channel(self, request: web.Request) -> AsyncIterator[ChannelPeer]:
        """Accept a WebSocket, run its outbox pump, and release both on exit."""
        if self._lifecycle != "running":
            raise web.HTTPServiceUnavailable(text="emulator is shutting down")
        ws = web.WebSocketResponse(timeout=_WS_CLOSE_TIMEOUT)
        await ws.prepare(request)
        peer = ChannelPeer(ws)
        task = asyncio.create_task(peer.pump())
        self._channel_tasks[peer] = task
        try:
            yield peer
        finally:
            peer.finish()
            await asyncio.wait([task])
            self._channel_tasks.pop(peer, None)

    # -- vendor hooks ----------------------------------------------------------------------

    @abstractmethod
    def _add_vendor_routes(self, app: web.Application) -> None:
        """Register the vendor's API routes."""

    @abstractmethod
    def _error_response(
        self, status: int, message: str, *, headers: Mapping[str, str] | None = None
    ) -> web.Response:
        """An error in the vendor's own error body shape."""

    @abstractmethod
    def _vendor_state(self) -> dict[str, Any]:
        """The vendor-specific part of ``GET /_emulator/state``."""

    @abstractmethod
    def _reset_sessions(self) -> None:
        """End every session (sending the vendor's shutdown) and forget them
        (``_end_and_forget``)."""

    # -- control API (no auth) -------------------------------------------------------------

    def _request_log_middleware(self) -> Middleware:
        @web.middleware
        async def record_request(request: web.Request, handler: Handler) -> web.StreamResponse:
            if request.path.startswith(_CONTROL_PREFIX):
                return await handler(request)
            idempotency_key = request.headers.get("Idempotency-Key")
            record = RequestRecord(
                method=request.method,
                path=request.path,
                headers={} if idempotency_key is None else {"idempotency-key": idempotency_key},
                api_key_present=self.auth_header in request.headers,
            )
            self._requests.append(record)
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                record.status = exc.status
                raise
            record.status = response.status
            return response

        return record_request

    async def _handle_state(self, request: web.Request) -> web.Response:
        return web.json_response(self.state())

    async def _handle_faults(self, request: web.Request) -> web.Response:
        try:
            self.faults.configure(await read_json_object(request))
        except ValueError as exc:
            return web.json_response({"error": "invalid fault", "message": str(exc)}, status=400)
        return web.json_response(self.faults.describe())

    async def _handle_faces(self, request: web.Request) -> web.Response:
        try:
            body = await read_json_object(request)
        except ValueError as exc:
            return web.json_response({"error": "invalid body", "message": str(exc)}, status=400)
        face_ids = body.get("face_ids")
        if not isinstance(face_ids, list) or not all(
            isinstance(face_id, str) and face_id for face_id in face_ids
        ):
            message = "face_ids must be a list of non-empty strings"
            return web.json_response({"error": "invalid body", "message": message}, status=400)
        for face_id in face_ids:
            self.add_face(face_id)
        return web.json_response({"face_ids": sorted(self._faces)})

    async def _handle_reset(self, request: web.Request) -> web.Response:
        await self.reset()
        return web.json_response({"reset": True})
