"""The session ledger: one durable row per vendor session attempt.

Why it exists: a vendor bills a session from its create call until it is ended *at the
vendor*. If the process holding the session dies in between (OOM kill, deploy, power cut),
nothing in memory survives to end it, and it keeps billing until the vendor's idle timeout.
So the ledger row is written **before** the vendor create call (state ``creating``), moved to
``open`` once the vendor confirmed the create, and closed (``ended``) only when the vendor
confirmed the end. A row that is still ``creating`` or ``open`` while its owner process is
dead is an *orphan*: a reaper in another process finds it with :meth:`SessionLedger.orphans`,
looks it up at the vendor (by ``vendor_session_id`` or ``idempotency_key``) and ends it.

States (:data:`RowState`)::

    creating ──> open ──> ended
       │  │                 ^
       │  └─────────────────┘   (a reaper ended what the create had made)
       ├──> failed              the create failed; nothing exists at the vendor
       └──> abandoned           a reaper found no vendor session for the row

The same rows are the source of usage reports and budget queries (:meth:`SessionLedger.usage`,
:meth:`SessionLedger.report`): minutes and cost by provider, tenant, avatar and plan, across
every process sharing the ledger file.

Conventions, as in :mod:`avatarkit.consent.store`: :class:`SessionLedger` is the async
interface (so a PostgreSQL ledger can be added without touching callers) and
:class:`SQLiteSessionLedger` the embedded default. _Money is :class:`~decimal.Decimal` and
stored as TEXT (exact); an unknown price is ``None``, never ``0``, so that "free" and "we do
not know" cannot be confused in a budget check.

Why one module: the session ledger is one SQLite schema; the row states, their allowed
transitions, the heartbeat, the reaper's queries and the usage reports all read and write
the same table under the same rules (a row is closed only on the vendor's confirmed end).
"""

from __future__ import annotations

import asyncio
import math
import os
import socket
import sqlite3
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from types import TracebackType
from typing import Annotated, Any, Final, Literal, Self, TypeVar, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from ..errors import AvatarKitError, ConfigError, SessionStateError
from ..sqlite import SQLiteDatabase

__all__ = [
    "GroupKey",
    "Name",
    "ProcessIdentity",
    "RowState",
    "SQLiteSessionLedger",
    "SessionLedger",
    "SessionRow",
    "Usage",
    "UsageReport",
    "UsageRow",
    "cost_of",
]

RowState = Literal["creating", "open", "ended", "failed", "abandoned"]
GroupKey = Literal["provider", "tenant", "avatar", "plan", "currency"]

_STATES: Final[frozenset[str]] = frozenset(get_args(RowState))
_TERMINAL: Final[frozenset[str]] = frozenset({"ended", "failed", "abandoned"})
_LIVE: Final[tuple[RowState, RowState]] = ("creating", "open")
_GROUP_KEYS: Final[tuple[str, ...]] = get_args(GroupKey)

#: costs are kept to a millionth of the currency unit: below any vendor's granularity, and
#: fixed so that sums of many rows do not grow ever longer decimals
_MICRO: Final = Decimal("0.000001")
_ONE_US: Final = timedelta(microseconds=1)

_SCHEMA_VERSION = 1

_T = TypeVar("_T")


# --------------------------------------------------------------------------------------------
# process identity
# --------------------------------------------------------------------------------------------

_proc_usable: bool | None = None
_current: ProcessIdentity | None = None


def _has_proc() -> bool:
    """Whether ``/proc/<pid>/stat`` can be trusted here. Checked once: on a Linux box without
    /proc mounted, a missing file must not read as "that process is dead"."""
    global _proc_usable
    if _proc_usable is None:
        _proc_usable = sys.platform.startswith("linux") and os.path.exists("/proc/self/stat")
    return _proc_usable


def _proc_stat(pid: int) -> tuple[str, float] | None:
    """``(state, start time)`` of ``pid`` from ``/proc/<pid>/stat``, the start time being
    field 22 (clock ticks since boot) in seconds. None where there is no /proc to read (not
    Linux, or not permitted); raises :class:`ProcessLookupError` when /proc says the process
    does not exist."""
    if not _has_proc():
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessLookupError(pid) from None
    except OSError:
        return None
    # Field 2 (comm) is parenthesised and may itself contain spaces and ')': split after the
    # last ')'. What follows starts at field 3 (state), so field 22 is at index 19.
    try:
        rest = data[data.rindex(b")") + 2 :].split()
        state, ticks = rest[0].decode("ascii"), int(rest[19])
    except (ValueError, IndexError, UnicodeDecodeError):
        return None
    return state, ticks / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcessIdentity:
    """Which process owns a ledger row, precisely enough to tell later that it is gone.

    A pid alone is not enough: pids are reused, and a reaper that took a new process with
    the old pid for the owner would never end the orphan. ``started_at`` (on Linux the
    process start time from ``/proc/<pid>/stat``, in seconds since boot; 0.0 where it cannot
    be read) tells a reused pid from the original. ``host`` scopes both, since another
    machine's pids mean nothing here.
    """

    host: str
    pid: int
    started_at: float

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise ConfigError("must be a non-empty host name", field="host")
        # pid 0 and negative pids address process groups in kill(2): never probe those.
        if isinstance(self.pid, bool) or not isinstance(self.pid, int) or self.pid < 1:
            raise ConfigError(f"must be a positive integer, got {self.pid!r}", field="pid")
        if not math.isfinite(self.started_at) or self.started_at < 0:
            raise ConfigError(f"must be a finite number >= 0, got {self.started_at!r}",
                              field="started_at")

    @classmethod
    def current(cls) -> ProcessIdentity:
        """This process. Cached, but recomputed when ``os.getpid()`` changed: a forked child
        must not own rows under its parent's identity (the parent's death would then make
        the child's live sessions look orphaned, and vice versa)."""
        global _current
        pid = os.getpid()
        cached = _current
        if cached is None or cached.pid != pid:
            cached = cls.of(pid)
            _current = cached
        return cached

    @classmethod
    def of(cls, pid: int) -> ProcessIdentity:
        """The identity of a running process on this host (say, a worker this process
        spawned). Raises :class:`~avatarkit.errors.ConfigError` when /proc says there is no
        such process."""
        if isinstance(pid, bool) or not isinstance(pid, int) or pid < 1:
            raise ConfigError(f"must be a positive integer, got {pid!r}", field="pid")
        try:
            stat = _proc_stat(pid)
        except ProcessLookupError:
            raise ConfigError(f"there is no process {pid} on this host", field="pid") from None
        return cls(host=socket.gethostname(), pid=pid,
                   started_at=0.0 if stat is None else stat[1])

    def is_alive(self) -> bool | None:
        """True if the process still runs; False if it is gone; None if this host cannot tell.

        None when the owner ran on another host (the caller falls back on heartbeats), and on
        Windows, where ``os.kill(pid, 0)`` would send CTRL_C_EVENT instead of probing. False
        when the pid does not exist, when it now belongs to a process started at another
        time (pid reuse), and for a zombie: a SIGKILLed child that its parent has not reaped
        still has its pid, but it will never end its vendor sessions.
        """
        if self.host != socket.gethostname() or sys.platform == "win32":
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # it exists, under another user
        try:
            stat = _proc_stat(self.pid)
        except ProcessLookupError:
            return False
        if stat is None:
            return True
        state, started_at = stat
        if state in ("Z", "X", "x"):
            return False
        # 0.0 means "unknown when recorded": then the pid is all there is to go on.
        return not (self.started_at and started_at != self.started_at)


# --------------------------------------------------------------------------------------------
# rows and usage
# --------------------------------------------------------------------------------------------


def _aware(value: datetime) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("must be timezone-aware (e.g. datetime.now(UTC))")
    return value.astimezone(UTC)


def _money(value: Decimal) -> Decimal:
    if not value.is_finite() or value < 0:
        raise ValueError(f"must be a finite amount >= 0, got {value}")
    return value


_UtcDatetime = Annotated[datetime, AfterValidator(_aware)]
_Money = Annotated[Decimal, AfterValidator(_money)]
_Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Name = Annotated[str, Field(min_length=1)]


def _price_cost(price: Decimal, seconds: float) -> Decimal:
    """``price`` per minute times ``seconds`` (to the millisecond: no meter is finer, and
    0.1 s costs a tenth of a second, not 0.1000000000000000055), to a millionth."""
    return (price * Decimal(str(round(seconds, 3))) / 60).quantize(_MICRO,
                                                                 rounding=ROUND_HALF_EVEN)


def cost_of(seconds: float, price: Decimal | None) -> Decimal | None:
    """What ``seconds`` cost at ``price`` per minute; None when the price is unknown (an
    unknown price is never 0)."""
    return None if price is None else _price_cost(price, seconds)


class SessionRow(BaseModel):
    """One vendor session attempt as the ledger records it.

    ``row_id`` is ``f"{session_id}#{attempt}"``: one avatar session may take several attempts
    (retry, fallback to another provider, failover mid-session), each a vendor session of its
    own, billed and reaped on its own. ``provider`` is the configured provider name,
    ``provider_kind`` the adapter (``"tavus"``...), which is what a reaper needs to reach the
    vendor. ``price_per_minute`` is ``None`` when unknown (never 0). ``billed_seconds`` and
    ``cost`` are what the vendor confirmed at the end, when it said.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    row_id: Name
    session_id: Name
    attempt: int = Field(ge=1, strict=True)
    provider: Name
    provider_kind: Name
    vendor_session_id: Name | None = None
    idempotency_key: Name
    avatar: Name
    tenant: str | None = None
    purpose: str | None = None
    plan: str | None = None
    price_per_minute: _Money | None = None
    currency: Name
    state: RowState
    owner: ProcessIdentity
    created_at: _UtcDatetime
    billing_started_at: _UtcDatetime | None = None
    heartbeat_at: _UtcDatetime
    ended_at: _UtcDatetime | None = None
    billed_seconds: _Seconds | None = None
    cost: _Money | None = None
    end_reason: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> SessionRow:
        if self.row_id != f"{self.session_id}#{self.attempt}":
            raise ValueError(f"row_id must be {self.session_id}#{self.attempt}")
        if self.state == "open" and (self.vendor_session_id is None
                                     or self.billing_started_at is None):
            raise ValueError("an open row needs vendor_session_id and billing_started_at")
        if self.terminal and (self.ended_at is None or self.billed_seconds is None):
            raise ValueError(f"a {self.state} row needs ended_at and billed_seconds")
        return self

    @property
    def terminal(self) -> bool:
        """Ended, failed or abandoned: nothing left to end at the vendor."""
        return self.state in _TERMINAL

    def billed_seconds_at(self, now: datetime) -> float:
        """_Seconds billed as of ``now``: the recorded figure for a terminal row, else the time
        since billing started (0 before it did)."""
        if self.terminal:
            return self.billed_seconds or 0.0
        if self.billing_started_at is None:
            return 0.0
        return max(0.0, (_aware(now) - self.billing_started_at).total_seconds())

    def cost_at(self, now: datetime) -> Decimal | None:
        """Cost as of ``now``: the vendor-confirmed ``cost`` of a terminal row when recorded,
        else price times minutes (to a millionth); None when the price is unknown."""
        if self.terminal and self.cost is not None:
            return self.cost
        if self.price_per_minute is None:
            return None
        return _price_cost(self.price_per_minute, self.billed_seconds_at(now))


class Usage(BaseModel):
    """Totals over a time window.

    ``cost`` sums what is known; ``unpriced_seconds`` are the billed seconds whose price is
    unknown, so a budget check can tell "cost 0" from "cost unknown". ``cost`` is None only
    when there were such seconds and no known cost at all. ``currency`` is None when no
    session was counted.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    sessions: int = Field(ge=0)
    billed_seconds: _Seconds
    cost: Decimal | None
    unpriced_seconds: _Seconds
    open_sessions: int = Field(ge=0)
    currency: str | None

    @property
    def minutes(self) -> float:
        return self.billed_seconds / 60

    @property
    def cost_known(self) -> bool:
        """True when every billed second had a price (or a vendor-confirmed cost)."""
        return self.unpriced_seconds == 0


class UsageRow(BaseModel):
    """One group of a :class:`UsageReport`: the group's key values and its totals."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key: dict[str, str | None]
    usage: Usage


class UsageReport(BaseModel):
    """Usage over ``[since, until)`` grouped by ``group_by`` (which always ends with, or
    contains, ``"currency"``: amounts in different currencies are never added up)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    since: _UtcDatetime
    until: _UtcDatetime
    group_by: tuple[GroupKey, ...]
    rows: tuple[UsageRow, ...]
    generated_at: _UtcDatetime

    def to_text(self) -> str:
        """An aligned plain-text table, for a terminal or a log."""
        header = [*self.group_by, "sessions", "minutes", "cost"]
        body = [[*("-" if row.key.get(k) is None else str(row.key[k]) for k in self.group_by),
                 str(row.usage.sessions), f"{row.usage.minutes:.2f}", _cost_text(row.usage)]
                for row in self.rows]
        widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
        numeric = len(self.group_by)

        def fmt(line: list[str]) -> str:
            cells = [cell.rjust(w) if i >= numeric else cell.ljust(w)
                     for i, (cell, w) in enumerate(zip(line, widths, strict=True))]
            return "  ".join(cells).rstrip()

        title = (f"usage {self.since.isoformat(timespec='seconds')} .. "
                 f"{self.until.isoformat(timespec='seconds')}")
        lines = [title, fmt(header)]
        lines.extend(fmt(line) for line in body)
        if not body:
            lines.append("(no sessions)")
        return "\n".join(lines)


def _cost_text(usage: Usage) -> str:
    if usage.cost is None:
        return "unknown"
    known = f"{usage.cost:.2f}"
    if usage.unpriced_seconds > 0:
        return f"{known} + unknown for {usage.unpriced_seconds / 60:.1f} min"
    return known


@dataclass(frozen=True)
class _Share:
    """One row's contribution to a window: clipped seconds, and their cost (None: unpriced)."""

    row: SessionRow
    seconds: float
    cost: Decimal | None


def _share(row: SessionRow, since: datetime, until: datetime, now: datetime) -> _Share | None:
    """What ``row`` billed inside ``[since, until)``, or None if it billed nothing there.

    A row bills over ``[billing_started_at, ended_at)`` (``created_at`` standing in for a
    start the row never recorded; an open row bills up to ``now``). An ended row's
    vendor-confirmed seconds and cost are spread evenly over that interval, so a row cut by
    the window counts for its share, and adjacent windows add up to the row's total; a row
    wholly inside counts with its stored figures as they are.
    """
    start = row.billing_started_at or row.created_at
    if row.state == "open":
        end = max(start, now)
    elif row.state == "ended" and row.ended_at is not None:
        end = max(start, row.ended_at)
    else:
        return None  # creating, failed, abandoned: nothing billed that the ledger knows of
    if start == end:
        if not since <= start < until:
            return None
        lo, hi = start, end
    else:
        lo, hi = max(start, since), min(end, until)
        if hi <= lo:
            return None
    overlap_us = (hi - lo) // _ONE_US
    price = row.price_per_minute
    if row.state == "open":
        seconds = overlap_us / 1_000_000
        return _Share(row, seconds, None if price is None else _price_cost(price, seconds))
    billed = row.billed_seconds or 0.0
    if lo == start and hi == end:
        if row.cost is not None:
            return _Share(row, billed, row.cost)
        return _Share(row, billed, None if price is None else _price_cost(price, billed))
    duration_us = (end - start) // _ONE_US
    seconds = billed * overlap_us / duration_us
    if row.cost is not None:
        cost = (row.cost * overlap_us / duration_us).quantize(_MICRO, rounding=ROUND_HALF_EVEN)
        return _Share(row, seconds, cost)
    return _Share(row, seconds, None if price is None else _price_cost(price, seconds))


def _aggregate(shares: Sequence[_Share], *, currency: str | None = None) -> Usage:
    currencies = sorted({share.row.currency for share in shares})
    if len(currencies) > 1:
        raise ConfigError(f"the sessions counted are billed in {', '.join(currencies)}; "
                          "amounts in different currencies are never added up: pass "
                          "currency=..., or use report(), which groups by currency",
                          field="currency")
    known = [share.cost for share in shares if share.cost is not None]
    unpriced = sum(share.seconds for share in shares if share.cost is None)
    cost = (sum(known, Decimal(0)).quantize(_MICRO, rounding=ROUND_HALF_EVEN)
            if known or unpriced == 0 else None)
    return Usage(sessions=len(shares),
                 billed_seconds=sum(share.seconds for share in shares),
                 cost=cost,
                 unpriced_seconds=unpriced,
                 open_sessions=sum(1 for share in shares if share.row.state == "open"),
                 currency=currencies[0] if currencies else currency)


# --------------------------------------------------------------------------------------------
# the interface
# --------------------------------------------------------------------------------------------


class SessionLedger(ABC):
    """Where vendor session attempts are recorded, reaped and counted.

    Async throughout so that a server-backed ledger fits the same interface and the embedded
    one never blocks a live session's event loop. Use it as an async context manager or call
    :meth:`aclose`; calls after closing raise :class:`~avatarkit.errors.SessionStateError`,
    as do illegal state transitions and unknown row ids. Invalid arguments raise
    :class:`~avatarkit.errors.ConfigError` naming the field.
    """

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @abstractmethod
    async def aclose(self) -> None:
        """Release the ledger's resources. Idempotent."""

    @abstractmethod
    async def begin(
        self,
        *,
        session_id: str,
        attempt: int,
        provider: str,
        provider_kind: str,
        idempotency_key: str,
        avatar: str,
        tenant: str | None = None,
        purpose: str | None = None,
        plan: str | None = None,
        price_per_minute: Decimal | None = None,
        currency: str = "USD",
        owner: ProcessIdentity | None = None,
    ) -> SessionRow:
        """Record an attempt *before* calling the vendor's create: state ``creating``, owned
        by ``owner`` (default: this process), ``created_at = heartbeat_at = now``. Written
        first so that a crash during or after the create leaves a row a reaper can find.
        A second row with the same ``session_id`` and ``attempt`` raises SessionStateError."""

    @abstractmethod
    async def mark_open(
        self, row_id: str, *, vendor_session_id: str, billing_started_at: datetime
    ) -> SessionRow:
        """The vendor confirmed the create: billing runs from ``billing_started_at``. Only
        from ``creating``; a row a reaper has meanwhile abandoned raises SessionStateError,
        and the caller must then end the vendor session itself."""

    @abstractmethod
    async def mark_failed(self, row_id: str, *, reason: str) -> SessionRow:
        """The create failed and nothing exists at the vendor (billed 0). Only from
        ``creating``: once open, a session is billing and must be *ended*."""

    @abstractmethod
    async def mark_ended(
        self,
        row_id: str,
        *,
        ended_at: datetime | None = None,
        billed_seconds: float | None = None,
        cost: Decimal | None = None,
        reason: str,
        vendor_session_id: str | None = None,
    ) -> SessionRow:
        """The vendor confirmed the end. From ``creating`` (a reaper ended what a crashed
        create had made; it may pass the ``vendor_session_id`` it found) or ``open``.
        ``ended_at`` defaults to now; ``billed_seconds`` to the time since billing started
        (0 if it never did); ``cost`` is the vendor's figure if it gave one (None: reports use
        the price). Idempotent: ending an ended row returns it unchanged, so a session's own
        close and a reaper may race."""

    @abstractmethod
    async def mark_abandoned(self, row_id: str, *, reason: str) -> SessionRow:
        """A reaper found no vendor session for a ``creating`` row: nothing to end, billed 0.
        Only from ``creating``."""

    @abstractmethod
    async def heartbeat(self, owner: ProcessIdentity | None = None) -> int:
        """Set ``heartbeat_at = now`` on the owner's (default: this process's) non-terminal
        rows; returns how many. Heartbeats are how a reaper on another host, which cannot
        probe the owner's pid, tells a live owner from a dead one."""

    @abstractmethod
    async def get(self, row_id: str) -> SessionRow:
        """The row ``row_id``; SessionStateError naming it if there is none."""

    @abstractmethod
    async def rows(
        self,
        *,
        states: Iterable[RowState] | None = None,
        since: datetime | None = None,
        tenant: str | None = None,
        provider: str | None = None,
        session_id: str | None = None,
    ) -> list[SessionRow]:
        """Rows matching every filter given, oldest ``created_at`` first. ``since`` keeps rows
        that were billing at or after it: not ended, or ended at or after ``since``."""

    @abstractmethod
    async def orphans(self, *, stale_after_s: float = 120.0) -> list[SessionRow]:
        """Non-terminal rows whose owner is dead: :meth:`ProcessIdentity.is_alive` says False,
        or it cannot tell (another host) and the row's heartbeat is older than
        ``stale_after_s``. These are the sessions a reaper must end at the vendor."""

    @abstractmethod
    async def usage(
        self,
        *,
        since: datetime,
        until: datetime | None = None,
        tenant: str | None = None,
        provider: str | None = None,
        currency: str | None = None,
    ) -> Usage:
        """Totals over ``[since, until)`` (``until`` defaults to now) of the sessions that
        billed in it (open and ended rows), seconds clipped to the window. Sessions in more
        than one currency raise ConfigError unless ``currency`` picks one."""

    @abstractmethod
    async def report(
        self,
        *,
        since: datetime,
        until: datetime | None = None,
        group_by: Sequence[GroupKey] = ("provider",),
    ) -> UsageReport:
        """:meth:`usage` per group; ``currency`` is always one of the grouping keys."""


# --------------------------------------------------------------------------------------------
# SQLite implementation
# --------------------------------------------------------------------------------------------

_COLUMNS: Final = (
    "row_id", "session_id", "attempt", "provider", "provider_kind", "vendor_session_id",
    "idempotency_key", "avatar", "tenant", "purpose", "plan", "price_per_minute", "currency",
    "state", "owner_host", "owner_pid", "owner_started_at", "created_at",
    "billing_started_at", "heartbeat_at", "ended_at", "billed_seconds", "cost", "end_reason",
)
_SELECT: Final = ", ".join(_COLUMNS)
_DATETIMES: Final = frozenset({"created_at", "billing_started_at", "heartbeat_at", "ended_at"})
_DECIMALS: Final = frozenset({"price_per_minute", "cost"})
_OWNER: Final = ("owner_host", "owner_pid", "owner_started_at")


def _schema() -> Iterable[str]:
    states = ", ".join(f"'{state}'" for state in get_args(RowState))
    yield "CREATE TABLE IF NOT EXISTS session_ledger_schema (version INTEGER NOT NULL)"
    yield f"""CREATE TABLE IF NOT EXISTS sessions (
        row_id TEXT PRIMARY KEY,
        session_id TEXT NOT NULL,
        attempt INTEGER NOT NULL CHECK (attempt >= 1),
        provider TEXT NOT NULL,
        provider_kind TEXT NOT NULL,
        vendor_session_id TEXT,
        idempotency_key TEXT NOT NULL,
        avatar TEXT NOT NULL,
        tenant TEXT,
        purpose TEXT,
        plan TEXT,
        price_per_minute TEXT,
        currency TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ({states})),
        owner_host TEXT NOT NULL,
        owner_pid INTEGER NOT NULL,
        owner_started_at REAL NOT NULL,
        created_at TEXT NOT NULL,
        billing_started_at TEXT,
        heartbeat_at TEXT NOT NULL,
        ended_at TEXT,
        billed_seconds REAL,
        cost TEXT,
        end_reason TEXT,
        UNIQUE (session_id, attempt))"""
    yield "CREATE INDEX IF NOT EXISTS sessions_by_state ON sessions (state)"
    yield "CREATE INDEX IF NOT EXISTS sessions_by_tenant ON sessions (tenant, created_at)"
    yield "CREATE INDEX IF NOT EXISTS sessions_by_provider ON sessions (provider, created_at)"
    yield "CREATE INDEX IF NOT EXISTS sessions_by_created ON sessions (created_at)"
    yield "CREATE INDEX IF NOT EXISTS sessions_by_ended ON sessions (ended_at)"
    yield ("CREATE INDEX IF NOT EXISTS sessions_by_owner "
           "ON sessions (owner_host, owner_pid, owner_started_at)")


def _iso(value: datetime) -> str:
    """Fixed-width UTC ISO text (always with microseconds): exact round trip through
    :meth:`datetime.fromisoformat`, and text order is time order, so SQL can compare."""
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def _to_db(row: SessionRow) -> tuple[Any, ...]:
    values: dict[str, Any] = dict(row)
    owner = values.pop("owner")
    values.update(owner_host=owner.host, owner_pid=owner.pid,
                  owner_started_at=float(owner.started_at))
    for name in _DATETIMES:
        if values[name] is not None:
            values[name] = _iso(values[name])
    for name in _DECIMALS:
        if values[name] is not None:
            values[name] = str(values[name])
    return tuple(values[name] for name in _COLUMNS)


def _from_db(record: Sequence[Any]) -> SessionRow:
    values: dict[str, Any] = dict(zip(_COLUMNS, record, strict=True))
    try:
        values["owner"] = ProcessIdentity(*(values.pop(name) for name in _OWNER))
        for name in _DATETIMES:
            if values[name] is not None:
                values[name] = datetime.fromisoformat(values[name])
        for name in _DECIMALS:
            if values[name] is not None:
                values[name] = Decimal(values[name])
        return SessionRow.model_validate(values)
    except (ArithmeticError, ValueError, TypeError) as exc:
        # ConfigError and ValidationError are ValueErrors too: a row edited outside the
        # ledger is a data problem, not the caller's configuration.
        raise AvatarKitError(f"ledger row {values.get('row_id')!r} is malformed: {exc}") from exc


def _config_error(exc: ValidationError) -> ConfigError:
    err = exc.errors()[0]
    field = ".".join(str(part) for part in err["loc"]) or None
    return ConfigError(err["msg"], field=field)


def _updated(row: SessionRow, **changes: Any) -> SessionRow:
    try:
        return SessionRow.model_validate({**dict(row), **changes})
    except ValidationError as exc:
        raise _config_error(exc) from None


def _load(conn: sqlite3.Connection, row_id: str) -> SessionRow:
    record = conn.execute(f"SELECT {_SELECT} FROM sessions WHERE row_id = ?",
                          (row_id,)).fetchone()
    if record is None:
        raise SessionStateError(f"the session ledger has no row {row_id!r}")
    return _from_db(record)


def _store(conn: sqlite3.Connection, row: SessionRow) -> None:
    assignments = ", ".join(f"{name} = ?" for name in _COLUMNS[1:])
    values = _to_db(row)
    conn.execute(f"UPDATE sessions SET {assignments} WHERE row_id = ?", (*values[1:], values[0]))


def _require_text(value: str, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError("must be a non-empty string", field=field)
    return value


def _require_aware(value: datetime, field: str) -> datetime:
    try:
        return _aware(value)
    except (ValueError, AttributeError) as exc:
        raise ConfigError(str(exc), field=field) from None


def _check_states(states: Iterable[RowState]) -> tuple[str, ...]:
    chosen = tuple(dict.fromkeys(states))
    unknown = [state for state in chosen if state not in _STATES]
    if isinstance(states, str) or unknown:
        raise ConfigError(f"unknown state(s) {unknown or states!r}; expected some of "
                          f"{sorted(_STATES)}", field="states")
    return chosen


class SQLiteSessionLedger(SessionLedger):
    """The embedded session ledger: one SQLite file (or ``":memory:"``).

    * Every call runs in a worker thread (:func:`asyncio.to_thread`) so disk I/O never stalls
      a live session; one connection, guarded by a lock, serialises this object's calls.
    * Several processes may share the file: WAL journaling (readers do not block the
      writer), ``busy_timeout`` 5 s, and every state change is a read-check-write inside
      ``BEGIN IMMEDIATE``, so a session's own close and a reaper in another process cannot
      both move the same row. ``synchronous=FULL``: a row written before a vendor create
      must still be there after a power cut, or the session it stands for is lost.
    * The connection opens lazily, in a worker thread, on first use or on ``__aenter__``.

    ``clock`` (Unix seconds) stamps ``created_at``, heartbeats and default end times, and is
    "now" for orphan and usage queries; tests inject one.
    """

    def __init__(self, path: str | Path, *, clock: Callable[[], float] = time.time) -> None:
        self._db = SQLiteDatabase(path, name="the session ledger",
                                  version_table="session_ledger_schema",
                                  version=_SCHEMA_VERSION, schema=_schema)
        self._clock = clock

    def __repr__(self) -> str:
        state = "closed" if self._db.closed else "open"
        return f"SQLiteSessionLedger({self._db.path!r}, {state})"

    # -- plumbing --------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self._db.open()
        return self

    async def aclose(self) -> None:
        await self._db.aclose()

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), UTC)

    async def _transition(self, row_id: str, action: str, from_states: Iterable[str],
                          change: Callable[[SessionRow], SessionRow]) -> SessionRow:
        allowed = frozenset(from_states)

        def apply(conn: sqlite3.Connection) -> SessionRow:
            row = _load(conn, row_id)
            if row.state not in allowed:
                raise SessionStateError(f"cannot {action} ledger row {row_id!r}: it is "
                                        f"{row.state} (allowed from {', '.join(sorted(allowed))})")
            new = change(row)
            _store(conn, new)
            return new

        return await self._db.write(apply)

    # -- writes ----------------------------------------------------------------------------

    async def begin(
        self,
        *,
        session_id: str,
        attempt: int,
        provider: str,
        provider_kind: str,
        idempotency_key: str,
        avatar: str,
        tenant: str | None = None,
        purpose: str | None = None,
        plan: str | None = None,
        price_per_minute: Decimal | None = None,
        currency: str = "USD",
        owner: ProcessIdentity | None = None,
    ) -> SessionRow:
        now = self._now()
        try:
            row = SessionRow(
                row_id=f"{session_id}#{attempt}", session_id=session_id, attempt=attempt,
                provider=provider, provider_kind=provider_kind, vendor_session_id=None,
                idempotency_key=idempotency_key, avatar=avatar, tenant=tenant,
                purpose=purpose, plan=plan, price_per_minute=price_per_minute,
                currency=currency, state="creating",
                owner=owner if owner is not None else ProcessIdentity.current(),
                created_at=now, heartbeat_at=now)
        except ValidationError as exc:
            raise _config_error(exc) from None

        def insert(conn: sqlite3.Connection) -> SessionRow:
            found = conn.execute("SELECT state FROM sessions WHERE row_id = ?",
                                 (row.row_id,)).fetchone()
            if found is not None:
                raise SessionStateError(f"ledger row {row.row_id!r} already exists "
                                        f"({found[0]}); a new attempt needs a new number")
            placeholders = ", ".join("?" for _ in _COLUMNS)
            conn.execute(f"INSERT INTO sessions ({_SELECT}) VALUES ({placeholders})",
                         _to_db(row))
            return row

        return await self._db.write(insert)

    async def mark_open(
        self, row_id: str, *, vendor_session_id: str, billing_started_at: datetime
    ) -> SessionRow:
        _require_text(vendor_session_id, "vendor_session_id")
        started = _require_aware(billing_started_at, "billing_started_at")
        now = self._now()
        return await self._transition(
            row_id, "open", ("creating",),
            lambda row: _updated(row, state="open", vendor_session_id=vendor_session_id,
                                 billing_started_at=started, heartbeat_at=now))

    async def mark_failed(self, row_id: str, *, reason: str) -> SessionRow:
        _require_text(reason, "reason")
        now = self._now()
        return await self._transition(
            row_id, "mark failed", ("creating",),
            lambda row: _updated(row, state="failed", ended_at=now, billed_seconds=0.0,
                                 cost=Decimal(0), end_reason=reason))

    async def mark_abandoned(self, row_id: str, *, reason: str) -> SessionRow:
        _require_text(reason, "reason")
        now = self._now()
        return await self._transition(
            row_id, "abandon", ("creating",),
            lambda row: _updated(row, state="abandoned", ended_at=now, billed_seconds=0.0,
                                 cost=Decimal(0), end_reason=reason))

    async def mark_ended(
        self,
        row_id: str,
        *,
        ended_at: datetime | None = None,
        billed_seconds: float | None = None,
        cost: Decimal | None = None,
        reason: str,
        vendor_session_id: str | None = None,
    ) -> SessionRow:
        _require_text(reason, "reason")
        if vendor_session_id is not None:
            _require_text(vendor_session_id, "vendor_session_id")
        ended = self._now() if ended_at is None else _require_aware(ended_at, "ended_at")

        def end(row: SessionRow) -> SessionRow:
            vendor_id = row.vendor_session_id
            if vendor_session_id is not None:
                if vendor_id is not None and vendor_id != vendor_session_id:
                    raise SessionStateError(
                        f"ledger row {row_id!r} is vendor session {vendor_id!r}, not "
                        f"{vendor_session_id!r}")
                vendor_id = vendor_session_id
            seconds = billed_seconds
            if seconds is None:
                seconds = (0.0 if row.billing_started_at is None else
                           max(0.0, (ended - row.billing_started_at).total_seconds()))
            return _updated(row, state="ended", ended_at=ended, billed_seconds=seconds,
                            cost=cost, end_reason=reason, vendor_session_id=vendor_id)

        def apply(conn: sqlite3.Connection) -> SessionRow:
            row = _load(conn, row_id)
            if row.state == "ended":
                return row  # idempotent: the first confirmed end stands
            if row.state not in _LIVE:
                raise SessionStateError(f"cannot end ledger row {row_id!r}: it is "
                                        f"{row.state} (allowed from creating, open)")
            new = end(row)
            _store(conn, new)
            return new

        return await self._db.write(apply)

    async def heartbeat(self, owner: ProcessIdentity | None = None) -> int:
        who = owner if owner is not None else ProcessIdentity.current()
        at = _iso(self._now())

        def beat(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "UPDATE sessions SET heartbeat_at = ? WHERE owner_host = ? AND owner_pid = ? "
                "AND owner_started_at = ? AND state IN (?, ?)",
                (at, who.host, who.pid, float(who.started_at), *_LIVE))
            return cur.rowcount

        return await self._db.write(beat)

    # -- reads -----------------------------------------------------------------------------

    async def get(self, row_id: str) -> SessionRow:
        return await self._db.call(lambda conn: _load(conn, row_id))

    async def rows(
        self,
        *,
        states: Iterable[RowState] | None = None,
        since: datetime | None = None,
        tenant: str | None = None,
        provider: str | None = None,
        session_id: str | None = None,
    ) -> list[SessionRow]:
        where: list[str] = []
        params: list[Any] = []
        if states is not None:
            chosen = _check_states(states)
            if not chosen:
                return []
            where.append(f"state IN ({', '.join('?' for _ in chosen)})")
            params.extend(chosen)
        if since is not None:
            where.append("(ended_at IS NULL OR ended_at >= ?)")
            params.append(_iso(_require_aware(since, "since")))
        for column, value in (("tenant", tenant), ("provider", provider),
                              ("session_id", session_id)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        sql = f"SELECT {_SELECT} FROM sessions"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at, rowid"

        def read(conn: sqlite3.Connection) -> list[SessionRow]:
            return [_from_db(record) for record in conn.execute(sql, params)]

        return await self._db.call(read)

    async def orphans(self, *, stale_after_s: float = 120.0) -> list[SessionRow]:
        if isinstance(stale_after_s, bool) or not math.isfinite(stale_after_s) \
                or stale_after_s < 0:
            raise ConfigError(f"must be a finite number >= 0, got {stale_after_s!r}",
                              field="stale_after_s")
        live = await self.rows(states=_LIVE)
        if not live:
            return []
        owners = {row.owner for row in live}
        # /proc reads and kill(2) probes are blocking calls: keep them off the event loop.
        alive = await asyncio.to_thread(lambda: {owner: owner.is_alive() for owner in owners})
        cutoff = self._now() - timedelta(seconds=stale_after_s)
        return [row for row in live
                if alive[row.owner] is False
                or (alive[row.owner] is None and row.heartbeat_at < cutoff)]

    async def _shares(
        self,
        since: datetime,
        until: datetime | None,
        filters: Sequence[tuple[str, str | None]],
    ) -> tuple[datetime, datetime, datetime, list[_Share]]:
        now = self._now()
        start = _require_aware(since, "since")
        stop = now if until is None else _require_aware(until, "until")
        if stop < start:
            raise ConfigError(f"must not be before since ({_iso(start)}), got {_iso(stop)}",
                              field="until")
        # The SQL narrows to rows whose billing interval can touch the window; _share then
        # decides exactly (the same bounds, so nothing is lost between the two).
        sql = (f"SELECT {_SELECT} FROM sessions WHERE state IN ('open', 'ended') "
               "AND COALESCE(billing_started_at, created_at) < ? "
               "AND (ended_at IS NULL OR MAX(ended_at, COALESCE(billing_started_at, "
               "created_at)) >= ?)")
        params: list[Any] = [_iso(stop), _iso(start)]
        for column, value in filters:
            if value is not None:
                sql += f" AND {column} = ?"
                params.append(value)
        sql += " ORDER BY created_at, rowid"

        def read(conn: sqlite3.Connection) -> list[SessionRow]:
            return [_from_db(record) for record in conn.execute(sql, params)]

        rows = await self._db.call(read)
        shares = [share for row in rows
                  if (share := _share(row, start, stop, now)) is not None]
        return start, stop, now, shares

    async def usage(
        self,
        *,
        since: datetime,
        until: datetime | None = None,
        tenant: str | None = None,
        provider: str | None = None,
        currency: str | None = None,
    ) -> Usage:
        _, _, _, shares = await self._shares(
            since, until, (("tenant", tenant), ("provider", provider), ("currency", currency)))
        return _aggregate(shares, currency=currency)

    async def report(
        self,
        *,
        since: datetime,
        until: datetime | None = None,
        group_by: Sequence[GroupKey] = ("provider",),
    ) -> UsageReport:
        unknown = [key for key in group_by if key not in _GROUP_KEYS]
        if isinstance(group_by, str) or unknown:
            raise ConfigError(f"unknown grouping key(s) {unknown or group_by!r}; expected some "
                              f"of {list(_GROUP_KEYS)}", field="group_by")
        keys: tuple[GroupKey, ...] = tuple(dict.fromkeys([*group_by, "currency"]))
        start, stop, now, shares = await self._shares(since, until, ())
        groups: dict[tuple[str | None, ...], list[_Share]] = {}
        for share in shares:
            key = tuple(getattr(share.row, name) for name in keys)
            groups.setdefault(key, []).append(share)
        ordered = sorted(groups, key=lambda k: tuple((v is not None, v or "") for v in k))
        return UsageReport(
            since=start, until=stop, group_by=keys, generated_at=now,
            rows=tuple(UsageRow(key=dict(zip(keys, key, strict=True)),
                                usage=_aggregate(groups[key])) for key in ordered))
