"""The consent store: the ledger of grants and status changes, and the generation log.

Why a store at all: a consent token proves what was granted when it was signed, but
revocation, suspension and the question "what was made with my face?" need a record kept by
the registry. The research notes (sections 4.3, 4.5, 4.6) ask for three things, all here:

* an **append-only, hash-chained consent ledger** (``granted``, ``revoked``, ``suspended``,
  ``reinstated``), from which the IETF Token Status List is built;
* an **append-only, hash-chained generation log** binding every session, status check and
  output (hashes, watermark payload) to the consent it was made under, so a deletion or
  takedown request can be answered with a complete list;
* a **replay guard** for single-use tokens.

:class:`ConsentStore` is the async interface, so that a server-backed store (PostgreSQL) can
be added without touching callers; :class:`SQLiteConsentStore` is the embedded default.

One journal, two tables: ledger entries and generation records share a single sequence and a
single hash chain. Every event therefore has one unambiguous position (``seq``), one
:meth:`ConsentStore.verify_chain` pass orders all of them, and a deleted row of either kind
shows up as a gap. Each entry's ``entry_hash`` is the SHA-256 hex of ``prev_hash`` followed by
the RFC 8785 canonical JSON of the entry's content (:func:`chain_hash`); the first entry's
``prev_hash`` is :data:`GENESIS_HASH`. An unkeyed chain detects edits, deletions and
reordering by anyone who does not recompute every later hash; to resist a full rewrite, anchor
the newest ``entry_hash`` somewhere the store's writer cannot change.

Why one module: the consent ledger, the generation log and the replay guard are one SQLite
schema with one hash chain; the store's append-only rules, its verification and its
schema version must be read together to be trusted.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
import sqlite3
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Annotated, Any, Literal, Self, TypeVar

import rfc8785
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import (
    AvatarKitError,
    ConfigError,
    ConsentCheck,
    ConsentWithdrawn,
)
from ..sqlite import SQLiteDatabase, transaction
from .grant import AwareDatetime, ConsentGrant, Sha256Hex, StatusReference
from .status import StatusList, TokenStatus
from .tokens import ReplayGuard

__all__ = [
    "DEFAULT_STATUS_LIST_CAPACITY",
    "GENESIS_HASH",
    "ChainReport",
    "ConsentStore",
    "GenerationKind",
    "GenerationRecord",
    "LedgerEntry",
    "LedgerKind",
    "SQLiteConsentStore",
    "chain_hash",
]

#: ``prev_hash`` of the first journal entry.
GENESIS_HASH = "0" * 64

#: Entries per status list unless configured otherwise: the W3C Bitstring Status List's
#: minimum, so that one index hides among many (group privacy).
DEFAULT_STATUS_LIST_CAPACITY = 131_072

#: Bits per entry in the lists built here: valid / revoked / suspended need two.
_STATUS_BITS = 2

_SCHEMA_VERSION = 1

LedgerKind = Literal["granted", "revoked", "suspended", "reinstated"]
GenerationKind = Literal[
    "session_started", "status_check", "consent_refused", "output", "label_disabled",
    "session_ended", "provider_switched",
]

_STATUS_OF_KIND: dict[str, TokenStatus] = {
    "granted": TokenStatus.VALID,
    "revoked": TokenStatus.INVALID,
    "suspended": TokenStatus.SUSPENDED,
    "reinstated": TokenStatus.VALID,
}
_KIND_OF_STATUS: dict[TokenStatus, LedgerKind] = {
    TokenStatus.INVALID: "revoked",
    TokenStatus.SUSPENDED: "suspended",
    TokenStatus.VALID: "reinstated",
}

_T = TypeVar("_T")


def _chain_digest(prev_hash: str, canonical: bytes) -> str:
    return hashlib.sha256(prev_hash.encode("ascii") + canonical).hexdigest()


def chain_hash(prev_hash: str, content: Mapping[str, Any]) -> str:
    """The journal's link function: SHA-256 hex of ``prev_hash`` (ASCII) followed by the RFC
    8785 canonical JSON of ``content``. Public so that an auditor holding an export can
    recompute the chain without this SDK's storage code."""
    return _chain_digest(prev_hash, rfc8785.dumps(content))


def _hex_payload(value: str) -> str:
    if not value or any(c not in "0123456789abcdefABCDEF" for c in value):
        raise ValueError("must be a non-empty hex string")
    return value.lower()


def _distinct_hashes(values: list[str]) -> list[str]:
    if len(set(values)) != len(values):
        raise ValueError("output hashes must be distinct")
    return values


_HexPayload = Annotated[str, AfterValidator(_hex_payload)]


class LedgerEntry(BaseModel):
    """One append-only ledger entry: a grant, or a change of its status.

    ``record_hash`` is the grant's :meth:`~avatarkit.consent.grant.ConsentGrant.record_hash`,
    repeated on every entry so each one names exactly which record it changes. ``seq`` is the
    entry's position in the store's single journal (shared with the generation log), so the
    ``seq`` values of one consent's entries are increasing but not contiguous.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    seq: int = Field(ge=1)
    kind: LedgerKind
    consent_id: str = Field(min_length=1)
    at: AwareDatetime
    record_hash: Sha256Hex
    status: TokenStatus
    reason: str | None = None
    actor: str | None = None
    prev_hash: Sha256Hex
    entry_hash: Sha256Hex

    @model_validator(mode="after")
    def _status_matches_kind(self) -> LedgerEntry:
        expected = _STATUS_OF_KIND[self.kind]
        if expected is not self.status:
            raise ValueError(f"a {self.kind} entry must carry status {expected.name}")
        return self

    def chained_content(self) -> dict[str, Any]:
        """The fields ``entry_hash`` covers: everything but the two hashes, plus the name of
        the log, so an entry cannot be moved between the ledger and the generation log."""
        content = self.model_dump(mode="json", exclude={"prev_hash", "entry_hash"})
        content["log"] = "ledger"
        return content


class GenerationRecord(BaseModel):
    """One entry of the generation log (research notes 4.6).

    A session or render is one ``generation_id``; it logs ``session_started``, each
    ``status_check`` (with its result in ``status_check``), a ``consent_refused`` when the
    consent check said no, every ``output`` with its SHA-256(s) and watermark payload, a
    ``label_disabled`` if the visible AI label was switched off, ``provider_switched`` when a
    failover moved it to another provider, and ``session_ended``.
    ``seq``, ``prev_hash`` and ``entry_hash`` are set by the store; they are ``None`` on a
    record that has not been logged yet.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    generation_id: str = Field(min_length=1)
    kind: GenerationKind
    at: AwareDatetime = Field(default_factory=lambda: datetime.now(UTC))
    consent_id: str | None = None
    #: SHA-256 of the compact consent token presented (never the token itself)
    token_sha256: Sha256Hex | None = None
    #: result of a status check: ``"valid"``, ``"revoked"``, ``"suspended"``, ``"stale"``...
    status_check: str | None = None
    purpose: str | None = None
    channel: str | None = None
    language: str | None = None
    provider: str | None = None
    avatar: str | None = None
    output_sha256: Annotated[list[Sha256Hex], AfterValidator(_distinct_hashes)] = Field(
        default_factory=list
    )
    #: the invisible watermark's payload, hex (stored lowercase)
    watermark_payload: _HexPayload | None = None
    #: whether the visible AI label was on for this output
    label: bool | None = None
    details: dict[str, str | int | float | bool | None] = Field(default_factory=dict)
    seq: int | None = Field(default=None, ge=1)
    prev_hash: Sha256Hex | None = None
    entry_hash: Sha256Hex | None = None

    @model_validator(mode="after")
    def _canonicalisable(self) -> GenerationRecord:
        # Refuse at construction what the hash chain could not encode (NaN, integers beyond
        # 2**53, lone surrogates), instead of failing later inside the store.
        rfc8785.dumps(self.chained_content())
        return self

    def chained_content(self) -> dict[str, Any]:
        """The fields ``entry_hash`` covers: everything but the two hashes, plus the name of
        the log (see :meth:`LedgerEntry.chained_content`)."""
        content = self.model_dump(mode="json", exclude={"prev_hash", "entry_hash"})
        content["log"] = "generation"
        return content


class ChainReport(BaseModel):
    """Result of :meth:`ConsentStore.verify_chain`. ``first_bad_seq`` is the first journal
    position that failed (for a deleted row: the missing ``seq``); ``problem`` says what."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ok: bool
    entries: int
    first_bad_seq: int | None = None
    problem: str | None = None


class ConsentStore(ReplayGuard, ABC):
    """Where consents, their status and what was generated under them are kept.

    Async throughout so that a network-backed store fits the same interface and so that the
    embedded store never blocks the event loop of a live session. Use it as an async context
    manager or call :meth:`aclose`; calls after closing raise
    :class:`~avatarkit.errors.SessionStateError`.

    :meth:`claim` has the signature of the token verifier's replay guard, so a store can
    serve as that guard directly.
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
        """Release the store's resources. Idempotent."""

    # -- status lists -----------------------------------------------------------------------

    @abstractmethod
    async def allocate_status_index(self, uri: str) -> StatusReference:
        """Reserve the next free index on the status list ``uri`` for a new grant. Indices
        are never reused (a reused index would let an old revocation hit a new consent, or a
        new consent un-revoke an old token); a full list raises
        :class:`~avatarkit.errors.ConfigError` (``field="uri"``)."""

    @abstractmethod
    async def status_list(self, uri: str) -> StatusList:
        """The status list ``uri`` built from the ledger: 2 bits per entry, one entry per
        index of the list's capacity, every allocated index holding its consent's current
        status (unused indices read VALID, as the status-list draft expects)."""

    # -- ledger ----------------------------------------------------------------------------

    @abstractmethod
    async def record_grant(self, grant: ConsentGrant) -> LedgerEntry:
        """Append a ``granted`` entry holding the grant's canonical JSON and record hash.
        Refused (:class:`~avatarkit.errors.ConfigError`) for a duplicate ``consent_id``, a
        grant without a status reference, or one whose index this store did not allocate on
        that list or has already bound to another consent."""

    @abstractmethod
    async def get_grant(self, consent_id: str) -> ConsentGrant | None:
        """The grant as recorded, parsed from the stored canonical JSON; None if unknown."""

    @abstractmethod
    async def set_status(
        self, consent_id: str, status: TokenStatus, *, reason: str, actor: str | None = None
    ) -> LedgerEntry:
        """Revoke (INVALID), suspend (SUSPENDED) or reinstate (VALID) a consent, appending a
        ``revoked``/``suspended``/``reinstated`` entry. Revocation is final: any change to a
        revoked consent raises :class:`~avatarkit.errors.ConsentWithdrawn`. An unknown
        consent, a change to the status it already has, or an empty ``reason`` raise
        :class:`~avatarkit.errors.ConfigError`."""

    @abstractmethod
    async def status_of(self, consent_id: str) -> TokenStatus:
        """The consent's current status (unknown consent: ConfigError)."""

    @abstractmethod
    async def ledger(self, consent_id: str | None = None) -> list[LedgerEntry]:
        """Ledger entries in journal order: all of them, or one consent's."""

    @abstractmethod
    async def verify_chain(self) -> ChainReport:
        """Recompute the whole journal (ledger and generation log) and cross-check the
        derived tables (current status, output index, allocations) against it."""

    # -- generation log --------------------------------------------------------------------

    @abstractmethod
    async def log_generation(self, record: GenerationRecord) -> GenerationRecord:
        """Append ``record`` and return it with ``seq``, ``prev_hash`` and ``entry_hash``
        set. A record that already has a ``seq`` (was logged before) is refused."""

    @abstractmethod
    async def generations(self, consent_id: str) -> list[GenerationRecord]:
        """Every generation-log entry made under ``consent_id``, in order: with it every
        output hash and watermark payload, which is what a deletion or takedown request
        needs."""

    @abstractmethod
    async def generation(self, generation_id: str) -> list[GenerationRecord]:
        """The entries of one session or render, in order."""

    @abstractmethod
    async def find_by_watermark(self, payload_hex: str) -> list[GenerationRecord]:
        """Entries whose watermark payload equals ``payload_hex`` (case-insensitive): traces
        a clip whose metadata was stripped back to its generation and consent."""

    @abstractmethod
    async def find_by_output_hash(self, sha256_hex: str) -> list[GenerationRecord]:
        """Entries that produced the output with this SHA-256 (case-insensitive)."""

    # -- replay guard ----------------------------------------------------------------------

    @abstractmethod
    async def claim(self, jti: str, expires_at: float) -> bool:
        """Claim a single-use token id: True the first time, False every later time while
        the token could still be accepted. ``expires_at`` is the token's ``exp`` (Unix
        seconds); the entry may be purged once that has passed."""


# --------------------------------------------------------------------------------------------
# SQLite implementation
# --------------------------------------------------------------------------------------------

_APPEND_ONLY_TABLES = ("ledger", "generations", "generation_outputs", "status_lists",
                       "status_allocations")


def _schema() -> Iterator[str]:
    yield "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"
    yield """CREATE TABLE IF NOT EXISTS status_lists (
        uri TEXT PRIMARY KEY,
        capacity INTEGER NOT NULL CHECK (capacity > 0),
        created_at TEXT NOT NULL)"""
    yield """CREATE TABLE IF NOT EXISTS status_allocations (
        uri TEXT NOT NULL REFERENCES status_lists (uri),
        idx INTEGER NOT NULL CHECK (idx >= 0),
        allocated_at TEXT NOT NULL,
        PRIMARY KEY (uri, idx)) WITHOUT ROWID"""
    yield """CREATE TABLE IF NOT EXISTS ledger (
        seq INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,
        consent_id TEXT NOT NULL,
        at TEXT NOT NULL,
        record_hash TEXT NOT NULL,
        status INTEGER NOT NULL,
        reason TEXT,
        actor TEXT,
        grant_json TEXT,
        prev_hash TEXT NOT NULL,
        entry_hash TEXT NOT NULL)"""
    yield "CREATE INDEX IF NOT EXISTS ledger_by_consent ON ledger (consent_id, seq)"
    yield ("CREATE UNIQUE INDEX IF NOT EXISTS ledger_one_grant ON ledger (consent_id) "
           "WHERE kind = 'granted'")
    yield """CREATE TABLE IF NOT EXISTS generations (
        seq INTEGER PRIMARY KEY,
        generation_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        consent_id TEXT,
        watermark_payload TEXT,
        content TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        entry_hash TEXT NOT NULL)"""
    yield ("CREATE INDEX IF NOT EXISTS generations_by_consent "
           "ON generations (consent_id, seq)")
    yield ("CREATE INDEX IF NOT EXISTS generations_by_id "
           "ON generations (generation_id, seq)")
    yield ("CREATE INDEX IF NOT EXISTS generations_by_watermark "
           "ON generations (watermark_payload, seq)")
    yield """CREATE TABLE IF NOT EXISTS generation_outputs (
        sha256 TEXT NOT NULL,
        seq INTEGER NOT NULL REFERENCES generations (seq),
        PRIMARY KEY (sha256, seq)) WITHOUT ROWID"""
    # Derived, mutable: the current status per consent, so status checks are one lookup.
    # The ledger stays the source of truth; verify_chain replays it against this table.
    yield """CREATE TABLE IF NOT EXISTS consent_status (
        consent_id TEXT PRIMARY KEY,
        status INTEGER NOT NULL,
        status_uri TEXT NOT NULL,
        status_idx INTEGER NOT NULL,
        last_seq INTEGER NOT NULL,
        UNIQUE (status_uri, status_idx))"""
    # Derived, mutable: the newest journal position. New entries link to it (not to the
    # newest surviving row), so rows removed from the end stay visible as a gap.
    yield """CREATE TABLE IF NOT EXISTS journal_head (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        seq INTEGER NOT NULL,
        entry_hash TEXT NOT NULL)"""
    yield """CREATE TABLE IF NOT EXISTS replay (
        jti TEXT PRIMARY KEY,
        expires_at REAL NOT NULL)"""
    yield "CREATE INDEX IF NOT EXISTS replay_by_expiry ON replay (expires_at)"
    for table in _APPEND_ONLY_TABLES:
        for op in ("UPDATE", "DELETE"):
            yield (f"CREATE TRIGGER IF NOT EXISTS {table}_no_{op.lower()} BEFORE {op} ON {table} "
                   f"BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END")
    yield ("CREATE TRIGGER IF NOT EXISTS consent_status_no_delete BEFORE DELETE ON "
           "consent_status BEGIN SELECT RAISE(ABORT, 'consent_status rows are never "
           "deleted'); END")
    yield ("CREATE TRIGGER IF NOT EXISTS journal_head_no_delete BEFORE DELETE ON journal_head "
           "BEGIN SELECT RAISE(ABORT, 'journal_head is never deleted'); END")
    yield ("CREATE TRIGGER IF NOT EXISTS journal_head_forward BEFORE UPDATE ON journal_head "
           "WHEN NEW.seq <> OLD.seq + 1 "
           "BEGIN SELECT RAISE(ABORT, 'journal_head only moves forward by one'); END")


_LEDGER_COLUMNS = ("seq", "kind", "consent_id", "at", "record_hash", "status", "reason",
                   "actor", "prev_hash", "entry_hash")
_LEDGER_SELECT = ", ".join(_LEDGER_COLUMNS)
_GENERATION_SELECT = ("seq, generation_id, kind, consent_id, watermark_payload, content, "
                      "prev_hash, entry_hash")


def _ledger_entry(row: Iterable[Any]) -> LedgerEntry:
    return LedgerEntry.model_validate(dict(zip(_LEDGER_COLUMNS, row, strict=True)))


def _generation_record(row: tuple[Any, ...]) -> GenerationRecord:
    content = json.loads(row[5])
    if not isinstance(content, dict) or content.pop("log", None) != "generation":
        raise ValueError("content is not a generation-log object")
    return GenerationRecord.model_validate({**content, "prev_hash": row[6],
                                            "entry_hash": row[7]})


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(part) for part in err["loc"]) or "row"
    return f"{where}: {err['msg']}"


@dataclass
class _Replayed:
    """One consent's state as replayed from the ledger by verify_chain."""

    status: TokenStatus
    record_hash: str
    uri: str
    idx: int
    last_seq: int


class SQLiteConsentStore(ConsentStore):
    """The embedded consent store: one SQLite file (or ``":memory:"``).

    * Every call runs in a worker thread (:func:`asyncio.to_thread`) so that disk I/O never
      stalls a live session; one connection, guarded by a lock, serialises the calls, and each
      append runs in a ``BEGIN IMMEDIATE`` transaction so the chain cannot fork, not even
      between processes sharing the file.
    * Files use WAL journaling (readers do not block the writer) with ``synchronous=FULL``:
      a revocation that returned must survive a power cut.
    * The journal tables are append-only in the database itself: triggers abort any UPDATE or
      DELETE, so a bug or a careless SQL session cannot rewrite history. The triggers are
      (re)created on every open.
    * The connection opens lazily, in a worker thread, on first use or on ``__aenter__``.

    ``status_list_capacity`` applies to lists created by this store; a list keeps the
    capacity it was created with. ``replay_leeway_s`` is how long past ``expires_at`` a
    claimed ``jti`` is remembered: at least the token verifier's clock-skew leeway, or an
    expired-but-still-accepted token could be replayed. ``clock`` (Unix seconds) timestamps
    entries and drives replay purging; tests inject one.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        status_list_capacity: int = DEFAULT_STATUS_LIST_CAPACITY,
        replay_leeway_s: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if isinstance(status_list_capacity, bool) or status_list_capacity < 1:
            raise ConfigError(f"must be a positive integer, got {status_list_capacity!r}",
                              field="status_list_capacity")
        if not math.isfinite(replay_leeway_s) or replay_leeway_s < 0:
            raise ConfigError(f"must be a finite number >= 0, got {replay_leeway_s!r}",
                              field="replay_leeway_s")
        self._db = SQLiteDatabase(path, name="the consent store", version_table="schema_version",
                                  version=_SCHEMA_VERSION, schema=_schema,
                                  pragmas=("PRAGMA foreign_keys = ON",))
        self._capacity = status_list_capacity
        self._leeway = float(replay_leeway_s)
        self._clock = clock

    def __repr__(self) -> str:
        state = "closed" if self._db.closed else "open"
        return f"SQLiteConsentStore({self._db.path!r}, {state})"

    # -- plumbing --------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self._db.open()
        return self

    async def aclose(self) -> None:
        await self._db.aclose()

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), UTC)

    # -- status lists ----------------------------------------------------------------------

    async def allocate_status_index(self, uri: str) -> StatusReference:
        if not uri:
            raise ConfigError("must be a non-empty status list URI", field="uri")
        at = self._now().isoformat()

        def allocate(conn: sqlite3.Connection) -> StatusReference:
            row = conn.execute("SELECT capacity FROM status_lists WHERE uri = ?",
                               (uri,)).fetchone()
            if row is None:
                capacity = self._capacity
                conn.execute("INSERT INTO status_lists (uri, capacity, created_at) "
                             "VALUES (?, ?, ?)", (uri, capacity, at))
            else:
                capacity = row[0]
            nxt = conn.execute("SELECT COALESCE(MAX(idx) + 1, 0) FROM status_allocations "
                               "WHERE uri = ?", (uri,)).fetchone()[0]
            if nxt >= capacity:
                raise ConfigError(
                    f"status list {uri!r} is full: all {capacity} indices are allocated and "
                    "indices are never reused; allocate on a new list URI", field="uri")
            conn.execute("INSERT INTO status_allocations (uri, idx, allocated_at) "
                         "VALUES (?, ?, ?)", (uri, nxt, at))
            return StatusReference(uri=uri, idx=nxt)

        return await self._db.write(allocate)

    async def status_list(self, uri: str) -> StatusList:
        def build(conn: sqlite3.Connection) -> StatusList:
            row = conn.execute("SELECT capacity FROM status_lists WHERE uri = ?",
                               (uri,)).fetchone()
            if row is None:
                raise ConfigError(f"this store has no status list {uri!r}", field="uri")
            out = StatusList(row[0], bits=_STATUS_BITS)
            for status, idx in conn.execute(
                    "SELECT status, status_idx FROM consent_status WHERE status_uri = ?",
                    (uri,)):
                out[idx] = status
            return out

        return await self._db.call(build)

    # -- ledger ----------------------------------------------------------------------------

    async def record_grant(self, grant: ConsentGrant) -> LedgerEntry:
        ref = grant.status
        if ref is None:
            raise ConfigError("a grant needs a status reference from allocate_status_index(), "
                              "or it could never be revoked", field="status")
        try:
            canonical = grant.canonical_json()
        except ValueError as exc:
            raise ConfigError(f"cannot canonicalise the grant: {exc}", field="grant") from exc
        record_hash = hashlib.sha256(canonical).hexdigest()
        at = self._now()

        def record(conn: sqlite3.Connection) -> LedgerEntry:
            if conn.execute("SELECT 1 FROM ledger WHERE consent_id = ? AND kind = 'granted'",
                            (grant.consent_id,)).fetchone():
                raise ConfigError(f"consent {grant.consent_id!r} is already recorded",
                                  field="consent_id")
            if not conn.execute("SELECT 1 FROM status_allocations WHERE uri = ? AND idx = ?",
                                (ref.uri, ref.idx)).fetchone():
                raise ConfigError(f"index {ref.idx} on status list {ref.uri!r} was not "
                                  "allocated by this store (use allocate_status_index())",
                                  field="status.idx")
            holder = conn.execute("SELECT consent_id FROM consent_status WHERE status_uri = ? "
                                  "AND status_idx = ?", (ref.uri, ref.idx)).fetchone()
            if holder is not None:
                raise ConfigError(f"index {ref.idx} on status list {ref.uri!r} already "
                                  f"belongs to consent {holder[0]!r}", field="status.idx")
            entry = _append_ledger(conn, kind="granted", consent_id=grant.consent_id, at=at,
                                   record_hash=record_hash, status=TokenStatus.VALID,
                                   reason=None, actor=None,
                                   grant_json=canonical.decode("utf-8"))
            conn.execute("INSERT INTO consent_status (consent_id, status, status_uri, "
                         "status_idx, last_seq) VALUES (?, ?, ?, ?, ?)",
                         (grant.consent_id, int(TokenStatus.VALID), ref.uri, ref.idx,
                          entry.seq))
            return entry

        return await self._db.write(record)

    async def get_grant(self, consent_id: str) -> ConsentGrant | None:
        def get(conn: sqlite3.Connection) -> tuple[str, str] | None:
            row = conn.execute("SELECT grant_json, record_hash FROM ledger WHERE consent_id = ? "
                               "AND kind = 'granted'", (consent_id,)).fetchone()
            return None if row is None else (row[0], row[1])

        found = await self._db.call(get)
        if found is None:
            return None
        grant_json, record_hash = found
        # A grant is what enforcement trusts; refuse to hand out one whose bytes no longer
        # match the hash the ledger chained.
        if hashlib.sha256(grant_json.encode("utf-8")).hexdigest() != record_hash:
            raise AvatarKitError(f"the stored grant {consent_id!r} does not match its record "
                                 "hash: the store was tampered with (run verify_chain)")
        return ConsentGrant.model_validate_json(grant_json)

    async def set_status(
        self, consent_id: str, status: TokenStatus, *, reason: str, actor: str | None = None
    ) -> LedgerEntry:
        try:
            target = TokenStatus(status)
        except ValueError as exc:
            raise ConfigError(f"unknown status {status!r}", field="status") from exc
        if target not in _KIND_OF_STATUS:
            raise ConfigError("only VALID (reinstate), INVALID (revoke) and SUSPENDED "
                              f"(suspend) can be set, not {target.name}", field="status")
        if not reason or not reason.strip():
            raise ConfigError("a status change needs a reason (it goes into the ledger)",
                              field="reason")
        if actor is not None and not actor.strip():
            raise ConfigError("must be None or a non-empty string", field="actor")
        for name, text in (("reason", reason), ("actor", actor)):
            try:
                rfc8785.dumps(text)
            except ValueError as exc:  # lone surrogates cannot be hashed into the chain
                raise ConfigError(f"cannot be canonicalised: {exc}", field=name) from exc
        kind = _KIND_OF_STATUS[target]
        at = self._now()

        def change(conn: sqlite3.Connection) -> LedgerEntry:
            row = conn.execute("SELECT status, last_seq FROM consent_status WHERE "
                               "consent_id = ?", (consent_id,)).fetchone()
            if row is None:
                raise ConfigError(f"unknown consent {consent_id!r}", field="consent_id")
            current = TokenStatus(row[0])
            if current is TokenStatus.INVALID:
                raise ConsentWithdrawn(
                    f"consent {consent_id!r} was revoked (ledger seq {row[1]}); revocation "
                    f"is final, so it cannot be {kind} - record a new grant instead",
                    check=ConsentCheck.REVOKED, consent_id=consent_id)
            if current is target:
                raise ConfigError(f"consent {consent_id!r} is already {current.name}",
                                  field="status")
            record_hash = conn.execute("SELECT record_hash FROM ledger WHERE consent_id = ? "
                                       "AND kind = 'granted'", (consent_id,)).fetchone()[0]
            entry = _append_ledger(conn, kind=kind, consent_id=consent_id, at=at,
                                   record_hash=record_hash, status=target, reason=reason,
                                   actor=actor, grant_json=None)
            conn.execute("UPDATE consent_status SET status = ?, last_seq = ? "
                         "WHERE consent_id = ?", (int(target), entry.seq, consent_id))
            return entry

        return await self._db.write(change)

    async def status_of(self, consent_id: str) -> TokenStatus:
        def get(conn: sqlite3.Connection) -> TokenStatus:
            row = conn.execute("SELECT status FROM consent_status WHERE consent_id = ?",
                               (consent_id,)).fetchone()
            if row is None:
                raise ConfigError(f"unknown consent {consent_id!r}", field="consent_id")
            return TokenStatus(row[0])

        return await self._db.call(get)

    async def ledger(self, consent_id: str | None = None) -> list[LedgerEntry]:
        def read(conn: sqlite3.Connection) -> list[LedgerEntry]:
            if consent_id is None:
                rows = conn.execute(f"SELECT {_LEDGER_SELECT} FROM ledger ORDER BY seq")
            else:
                rows = conn.execute(f"SELECT {_LEDGER_SELECT} FROM ledger WHERE consent_id = ? "
                                    "ORDER BY seq", (consent_id,))
            return [_ledger_entry(row) for row in rows]

        return await self._db.call(read)

    async def verify_chain(self) -> ChainReport:
        return await self._db.call(lambda conn: transaction(conn, _verify, begin="BEGIN"))

    # -- generation log --------------------------------------------------------------------

    async def log_generation(self, record: GenerationRecord) -> GenerationRecord:
        if record.seq is not None or record.prev_hash is not None or \
                record.entry_hash is not None:
            raise ConfigError(f"record was already logged (seq {record.seq}); log a new "
                              "GenerationRecord instead", field="seq")

        def append(conn: sqlite3.Connection) -> GenerationRecord:
            seq, prev_hash = _next_link(conn)
            positioned = record.model_copy(update={"seq": seq})
            canonical = rfc8785.dumps(positioned.chained_content())
            entry_hash = _chain_digest(prev_hash, canonical)
            conn.execute(f"INSERT INTO generations ({_GENERATION_SELECT}) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                         (seq, record.generation_id, record.kind, record.consent_id,
                          record.watermark_payload, canonical.decode("utf-8"), prev_hash,
                          entry_hash))
            conn.executemany("INSERT INTO generation_outputs (sha256, seq) VALUES (?, ?)",
                             [(digest, seq) for digest in record.output_sha256])
            _advance_head(conn, seq, entry_hash)
            return positioned.model_copy(update={"prev_hash": prev_hash,
                                                 "entry_hash": entry_hash})

        return await self._db.write(append)

    async def _select_generations(self, where: str, value: str) -> list[GenerationRecord]:
        def read(conn: sqlite3.Connection) -> list[GenerationRecord]:
            rows = conn.execute(f"SELECT {_GENERATION_SELECT} FROM generations WHERE {where} "
                                "ORDER BY seq", (value,))
            return [_generation_record(row) for row in rows]

        return await self._db.call(read)

    async def generations(self, consent_id: str) -> list[GenerationRecord]:
        return await self._select_generations("consent_id = ?", consent_id)

    async def generation(self, generation_id: str) -> list[GenerationRecord]:
        return await self._select_generations("generation_id = ?", generation_id)

    async def find_by_watermark(self, payload_hex: str) -> list[GenerationRecord]:
        return await self._select_generations("watermark_payload = ?", payload_hex.lower())

    async def find_by_output_hash(self, sha256_hex: str) -> list[GenerationRecord]:
        return await self._select_generations(
            "seq IN (SELECT seq FROM generation_outputs WHERE sha256 = ?)", sha256_hex.lower())

    # -- replay guard ----------------------------------------------------------------------

    async def claim(self, jti: str, expires_at: float) -> bool:
        if not jti:
            raise ConfigError("must be a non-empty token id", field="jti")
        if not math.isfinite(expires_at):
            raise ConfigError(f"must be finite Unix seconds, got {expires_at!r}",
                              field="expires_at")

        def claim(conn: sqlite3.Connection) -> bool:
            now = self._clock()
            conn.execute("DELETE FROM replay WHERE expires_at < ?", (now - self._leeway,))
            # An already-expired jti is remembered from now on, so that asking before
            # checking ``exp`` still cannot succeed twice.
            cur = conn.execute("INSERT OR IGNORE INTO replay (jti, expires_at) VALUES (?, ?)",
                               (jti, max(float(expires_at), now)))
            return cur.rowcount == 1

        return await self._db.write(claim)


# --------------------------------------------------------------------------------------------
# helpers running inside the store's lock
# --------------------------------------------------------------------------------------------


def _next_link(conn: sqlite3.Connection) -> tuple[int, str]:
    """Position and ``prev_hash`` of the next journal entry."""
    row = conn.execute("SELECT seq, entry_hash FROM journal_head WHERE id = 1").fetchone()
    if row is None:
        return 1, GENESIS_HASH
    return row[0] + 1, row[1]


def _advance_head(conn: sqlite3.Connection, seq: int, entry_hash: str) -> None:
    if seq == 1:
        conn.execute("INSERT INTO journal_head (id, seq, entry_hash) VALUES (1, ?, ?)",
                     (seq, entry_hash))
    else:
        conn.execute("UPDATE journal_head SET seq = ?, entry_hash = ? WHERE id = 1",
                     (seq, entry_hash))


def _append_ledger(conn: sqlite3.Connection, *, kind: LedgerKind, consent_id: str,
                   at: datetime, record_hash: str, status: TokenStatus, reason: str | None,
                   actor: str | None, grant_json: str | None) -> LedgerEntry:
    seq, prev_hash = _next_link(conn)
    draft = {"seq": seq, "kind": kind, "consent_id": consent_id, "at": at,
             "record_hash": record_hash, "status": status, "reason": reason, "actor": actor,
             "prev_hash": prev_hash, "entry_hash": GENESIS_HASH}
    entry = LedgerEntry.model_validate(draft)
    entry = entry.model_copy(update={"entry_hash": chain_hash(prev_hash,
                                                              entry.chained_content())})
    stored = entry.model_dump(mode="json")
    conn.execute(f"INSERT INTO ledger ({_LEDGER_SELECT}, grant_json) "
                 "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                 (*(stored[name] for name in _LEDGER_COLUMNS), grant_json))
    _advance_head(conn, seq, entry.entry_hash)
    return entry


class _Tampered(Exception):
    """Internal: verification found a problem at ``seq``."""

    def __init__(self, seq: int | None, problem: str) -> None:
        super().__init__(problem)
        self.seq = seq
        self.problem = problem


def _verify(conn: sqlite3.Connection) -> ChainReport:
    entries = (conn.execute("SELECT COUNT(*) FROM ledger").fetchone()[0]
               + conn.execute("SELECT COUNT(*) FROM generations").fetchone()[0])
    try:
        _verify_journal(conn)
    except _Tampered as bad:
        return ChainReport(ok=False, entries=entries, first_bad_seq=bad.seq,
                           problem=bad.problem)
    return ChainReport(ok=True, entries=entries)


#: where ``prev_hash`` sits in the rows _verify_journal reads
_PREV_HASH_COLUMN = {"ledger": _LEDGER_COLUMNS.index("prev_hash"), "generation": 6}


def _verify_journal(conn: sqlite3.Connection) -> None:
    ledger_rows = conn.execute(f"SELECT {_LEDGER_SELECT}, grant_json FROM ledger ORDER BY seq")
    generation_rows = conn.execute(f"SELECT {_GENERATION_SELECT} FROM generations "
                                   "ORDER BY seq")
    merged: Iterator[tuple[str, tuple[Any, ...]]] = heapq.merge(
        (("ledger", row) for row in ledger_rows),
        (("generation", row) for row in generation_rows),
        key=lambda item: int(item[1][0]))
    consents: dict[str, _Replayed] = {}
    outputs: set[tuple[str, int]] = set()
    expected, prev_hash = 1, GENESIS_HASH
    for log, row in merged:
        seq = int(row[0])
        if seq > expected:
            raise _Tampered(expected, f"seq {expected} is missing: the journal jumps from "
                                      f"{expected - 1} to {seq} (a row was deleted)")
        if seq < expected:
            raise _Tampered(seq, f"seq {seq} appears more than once (a row was inserted)")
        if row[_PREV_HASH_COLUMN[log]] != prev_hash:
            raise _Tampered(seq, f"{log} entry {seq} does not link to entry {seq - 1} "
                                 "(a row was deleted, inserted or reordered)")
        if log == "ledger":
            prev_hash = _check_ledger_row(row, consents)
        else:
            prev_hash = _check_generation_row(row, outputs)
        expected += 1
    last = expected - 1

    head = conn.execute("SELECT seq, entry_hash FROM journal_head WHERE id = 1").fetchone()
    head_seq, head_hash = (0, GENESIS_HASH) if head is None else (head[0], head[1])
    if head_seq > last:
        raise _Tampered(last + 1, f"the journal ends at seq {last} but its head is at seq "
                                  f"{head_seq} (entries were removed from the end)")
    if head_seq < last:
        raise _Tampered(head_seq + 1, f"entries after the recorded head (seq {head_seq}) "
                                      "were added outside the store")
    if head_hash != prev_hash:
        raise _Tampered(last, f"entry {last} does not match the recorded head hash")

    indexed = {(row[0], row[1]) for row in
               conn.execute("SELECT sha256, seq FROM generation_outputs")}
    if indexed != outputs:
        seq = min(seq for _, seq in indexed ^ outputs)
        raise _Tampered(seq, f"the output-hash index disagrees with generation entry {seq}")

    _check_derived_status(conn, consents)


def _check_ledger_row(row: tuple[Any, ...], consents: dict[str, _Replayed]) -> str:
    seq, grant_json = int(row[0]), row[-1]
    try:
        entry = _ledger_entry(row[:-1])
    except ValidationError as exc:
        raise _Tampered(seq, f"ledger entry {seq} is malformed ({_first_error(exc)})") from None
    if chain_hash(entry.prev_hash, entry.chained_content()) != entry.entry_hash:
        raise _Tampered(seq, f"ledger entry {seq} does not match its entry_hash (edited)")
    known = consents.get(entry.consent_id)
    if entry.kind == "granted":
        if known is not None:
            raise _Tampered(seq, f"consent {entry.consent_id!r} is granted twice")
        if grant_json is None or \
                hashlib.sha256(str(grant_json).encode("utf-8")).hexdigest() != entry.record_hash:
            raise _Tampered(seq, f"the grant stored with ledger entry {seq} does not match "
                                 "its record hash (edited)")
        try:
            grant = ConsentGrant.model_validate_json(grant_json)
        except ValidationError as exc:
            raise _Tampered(seq, f"the grant of ledger entry {seq} does not parse "
                                 f"({_first_error(exc)})") from None
        if grant.consent_id != entry.consent_id or grant.status is None:
            raise _Tampered(seq, f"the grant of ledger entry {seq} is for another consent "
                                 "or has no status reference")
        consents[entry.consent_id] = _Replayed(entry.status, entry.record_hash,
                                               grant.status.uri, grant.status.idx, seq)
        return entry.entry_hash
    if known is None:
        raise _Tampered(seq, f"ledger entry {seq} changes consent {entry.consent_id!r}, "
                             "which was never granted")
    if grant_json is not None or entry.record_hash != known.record_hash:
        raise _Tampered(seq, f"ledger entry {seq} names another record than the grant")
    if known.status is TokenStatus.INVALID:
        raise _Tampered(seq, f"ledger entry {seq} changes a revoked consent")
    known.status, known.last_seq = entry.status, seq
    return entry.entry_hash


def _check_generation_row(row: tuple[Any, ...], outputs: set[tuple[str, int]]) -> str:
    seq, content, prev_hash, entry_hash = int(row[0]), str(row[5]), row[6], row[7]
    canonical = content.encode("utf-8")
    if _chain_digest(str(prev_hash), canonical) != entry_hash:
        raise _Tampered(seq, f"generation entry {seq} does not match its entry_hash (edited)")
    try:
        record = _generation_record(row)
    except (ValueError, ValidationError) as exc:
        raise _Tampered(seq, f"generation entry {seq} is malformed ({exc})") from None
    if rfc8785.dumps(record.chained_content()) != canonical:
        raise _Tampered(seq, f"generation entry {seq} is not in canonical form")
    columns = (record.seq, record.generation_id, record.kind, record.consent_id,
               record.watermark_payload)
    if columns != tuple(row[:5]):
        raise _Tampered(seq, f"the indexed columns of generation entry {seq} disagree with "
                             "its hashed content (edited)")
    outputs.update((digest, seq) for digest in record.output_sha256)
    return str(entry_hash)


def _check_derived_status(conn: sqlite3.Connection, consents: dict[str, _Replayed]) -> None:
    table = {row[0]: tuple(row[1:])
             for row in conn.execute("SELECT consent_id, status, status_uri, status_idx, "
                                     "last_seq FROM consent_status")}
    for consent_id, rep in sorted(consents.items(), key=lambda item: item[1].last_seq):
        want = (int(rep.status), rep.uri, rep.idx, rep.last_seq)
        have = table.pop(consent_id, None)
        if have is None:
            raise _Tampered(rep.last_seq, f"consent {consent_id!r} is missing from the "
                                          "current-status table")
        if have != want:
            raise _Tampered(rep.last_seq, f"the current-status table says (status, uri, idx, "
                                          f"last_seq) = {have!r} for consent {consent_id!r} "
                                          f"but the ledger says {want!r} (table edited)")
        if not conn.execute("SELECT 1 FROM status_allocations WHERE uri = ? AND idx = ?",
                            (rep.uri, rep.idx)).fetchone():
            raise _Tampered(rep.last_seq, f"the status index of consent {consent_id!r} is "
                                          "not among the allocations")
    if table:
        stray = sorted(table)[0]
        raise _Tampered(None, f"the current-status table lists consent {stray!r}, which "
                              "the ledger never granted")
