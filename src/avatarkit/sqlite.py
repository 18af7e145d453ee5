"""One SQLite database used from asyncio: what the embedded stores (the consent store, the
session ledger) share.

* Every call runs in a worker thread (:func:`asyncio.to_thread`) so that disk I/O never stalls
  a live session; one connection, guarded by a lock, serialises the calls.
* Writes run inside ``BEGIN IMMEDIATE`` (:func:`transaction`), so a read-check-write cannot
  interleave with another writer, not even in another process sharing the file.
* Files use WAL journaling (readers do not block the writer), ``busy_timeout`` 5 s and
  ``synchronous=FULL``: a write that returned survives a power cut.
* The connection opens lazily, in a worker thread, on first use or on :meth:`open`; the schema
  is created then, and a file written by another schema version is refused.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

from .errors import ConfigError, SessionStateError

__all__ = ["SQLiteDatabase", "transaction"]

_T = TypeVar("_T")


def transaction(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], _T], *,
                begin: str = "BEGIN IMMEDIATE") -> _T:
    """Run ``fn`` in a transaction: committed when it returns, rolled back when it raises."""
    conn.execute(begin)
    try:
        result = fn(conn)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return result


class SQLiteDatabase:
    """A SQLite file (or ``":memory:"``) with a versioned schema.

    ``name`` says what it is in errors ("the consent store"); ``schema`` lists the
    ``CREATE ... IF NOT EXISTS`` statements, including ``version_table`` (one ``version``
    column), which records ``version``.
    """

    def __init__(self, path: str | Path, *, name: str, version_table: str, version: int,
                 schema: Callable[[], Iterable[str]], pragmas: Sequence[str] = ()) -> None:
        self.path = str(path)
        self.name = name
        self._version_table = version_table
        self._version = version
        self._schema = schema
        self._pragmas = tuple(pragmas)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    async def open(self) -> None:
        """Open the connection and create the schema now rather than on first use."""
        await self.call(lambda conn: None)

    async def aclose(self) -> None:
        """Close the connection (waiting for a call in flight). Idempotent."""
        if self._closed and self._conn is None:
            return
        self._closed = True  # new calls fail fast
        await asyncio.to_thread(self._close_connection)

    async def call(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``fn`` with the connection in the worker thread (no transaction of its own)."""
        if self._closed:
            raise SessionStateError(f"{self.name} is closed")
        return await asyncio.to_thread(self._locked, fn)

    async def write(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``fn`` inside ``BEGIN IMMEDIATE``."""
        return await self.call(lambda conn: transaction(conn, fn))

    def _close_connection(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _locked(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        with self._lock:
            if self._closed:
                raise SessionStateError(f"{self.name} is closed")
            return fn(self._connect())

    def _connect(self) -> sqlite3.Connection:
        if self._conn is not None:
            return self._conn
        try:
            conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        except sqlite3.Error as exc:
            raise ConfigError(f"cannot open {self.name} {self.path!r}: {exc}",
                              field="path") from exc
        try:
            conn.execute("PRAGMA busy_timeout = 5000")
            for pragma in self._pragmas:
                conn.execute(pragma)
            if self.path != ":memory:" and not self.path.startswith("file::memory:"):
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise ConfigError(f"cannot use WAL journaling on {self.path!r} "
                                      f"(got {mode!r})", field="path")
                conn.execute("PRAGMA synchronous = FULL")
            transaction(conn, self._create_schema)
        except sqlite3.Error as exc:
            conn.close()
            raise ConfigError(f"cannot open {self.name} {self.path!r}: {exc}",
                              field="path") from exc
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    def _create_schema(self, conn: sqlite3.Connection) -> None:
        table = self._version_table
        exists = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                              (table,)).fetchone()
        if exists:
            found = conn.execute(f"SELECT MAX(version) FROM {table}").fetchone()[0]
            if found is not None and found != self._version:
                raise ConfigError(f"{self.path!r} holds {self.name} schema version {found}; "
                                  f"this avatarkit reads version {self._version}",
                                  field="path")
        for statement in self._schema():
            conn.execute(statement)
        if conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] == 0:
            conn.execute(f"INSERT INTO {table} (version) VALUES (?)", (self._version,))
