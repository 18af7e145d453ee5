"""The consent store: ledger, status lists, generation log, replay guard, tamper evidence."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sqlite3
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from avatarkit.consent.grant import (
    ConsentEvidence,
    ConsentGrant,
    Grantor,
    LikenessSubject,
    StatusReference,
    new_consent_id,
)
from avatarkit.consent.status import StatusList, TokenStatus
from avatarkit.consent.store import (
    GENESIS_HASH,
    ChainReport,
    GenerationRecord,
    LedgerEntry,
    SQLiteConsentStore,
    chain_hash,
)
from avatarkit.errors import (
    AvatarKitError,
    ConfigError,
    ConsentCheck,
    ConsentWithdrawn,
    SessionStateError,
)

URI = "https://registry.example/status/1"
OTHER_URI = "https://registry.example/status/2"
CAPACITY = 64


def make_grant(ref: StatusReference | None, *, consent_id: str | None = None,
               name: str = "Amelia") -> ConsentGrant:
    now = datetime.now(UTC)
    return ConsentGrant(
        consent_id=consent_id or new_consent_id(),
        subject=LikenessSubject(subject_ref="subj-amelia", display_name=name),
        grantor=Grantor(grantor_ref="subj-amelia"),
        avatars=["amelia"],
        purposes=["customer_support_live"],
        valid_from=now - timedelta(days=1),
        expires_at=now + timedelta(days=365),
        evidence=ConsentEvidence(recording_sha256="ab" * 32,
                                 storage_ref="s3://consent-evidence/amelia.mp4",
                                 challenge_phrase="purple otter seventeen"),
        issuer="https://registry.example",
        status=ref,
    )


async def grant_in(store: SQLiteConsentStore, uri: str = URI) -> ConsentGrant:
    grant = make_grant(await store.allocate_status_index(uri))
    await store.record_grant(grant)
    return grant


def sha(n: int) -> str:
    return f"{n:064x}"


def record(generation_id: str, kind: str, consent_id: str | None, *,
           outputs: list[str] | None = None, watermark: str | None = None) -> GenerationRecord:
    return GenerationRecord.model_validate({
        "generation_id": generation_id, "kind": kind, "consent_id": consent_id,
        "output_sha256": outputs or [], "watermark_payload": watermark,
        "purpose": "customer_support_live", "channel": "live", "provider": "tavus",
        "avatar": "amelia", "label": True,
    })


@pytest.fixture
async def store() -> AsyncIterator[SQLiteConsentStore]:
    async with SQLiteConsentStore(":memory:", status_list_capacity=CAPACITY) as s:
        yield s


# -- grants ---------------------------------------------------------------------------------


async def test_allocate_record_get_round_trip(store: SQLiteConsentStore) -> None:
    ref = await store.allocate_status_index(URI)
    assert ref == StatusReference(uri=URI, idx=0)
    grant = make_grant(ref)
    entry = await store.record_grant(grant)

    assert entry.kind == "granted"
    assert entry.seq == 1
    assert entry.consent_id == grant.consent_id
    assert entry.status is TokenStatus.VALID
    assert entry.record_hash == grant.record_hash()
    assert entry.prev_hash == GENESIS_HASH
    assert entry.entry_hash == chain_hash(GENESIS_HASH, entry.chained_content())
    assert entry.at.tzinfo is not None

    back = await store.get_grant(grant.consent_id)
    assert back == grant
    assert back is not None and back.record_hash() == entry.record_hash
    assert back.canonical_json() == grant.canonical_json()
    assert await store.get_grant("cns_unknown") is None
    assert await store.status_of(grant.consent_id) is TokenStatus.VALID
    assert await store.ledger(grant.consent_id) == [entry]


async def test_indices_are_sequential_per_list(store: SQLiteConsentStore) -> None:
    first = [(await store.allocate_status_index(URI)).idx for _ in range(3)]
    other = await store.allocate_status_index(OTHER_URI)
    assert first == [0, 1, 2]
    assert other == StatusReference(uri=OTHER_URI, idx=0)
    assert (await store.allocate_status_index(URI)).idx == 3


async def test_concurrent_allocations_never_share_an_index(store: SQLiteConsentStore) -> None:
    refs = await asyncio.gather(*(store.allocate_status_index(URI) for _ in range(40)))
    assert sorted(ref.idx for ref in refs) == list(range(40))


async def test_full_status_list_is_refused() -> None:
    async with SQLiteConsentStore(":memory:", status_list_capacity=2) as store:
        await store.allocate_status_index(URI)
        await store.allocate_status_index(URI)
        with pytest.raises(ConfigError, match="full") as info:
            await store.allocate_status_index(URI)
        assert info.value.field == "uri"
        # another list has its own capacity
        assert (await store.allocate_status_index(OTHER_URI)).idx == 0


def test_bad_constructor_arguments_name_the_field() -> None:
    with pytest.raises(ConfigError) as info:
        SQLiteConsentStore(":memory:", status_list_capacity=0)
    assert info.value.field == "status_list_capacity"
    with pytest.raises(ConfigError) as info:
        SQLiteConsentStore(":memory:", replay_leeway_s=-1)
    assert info.value.field == "replay_leeway_s"


async def test_duplicate_consent_id_is_refused(store: SQLiteConsentStore) -> None:
    grant = await grant_in(store)
    with pytest.raises(ConfigError, match="already recorded") as info:
        await store.record_grant(grant)
    assert info.value.field == "consent_id"
    # same id, different record and index: still refused
    twin = make_grant(await store.allocate_status_index(URI), consent_id=grant.consent_id,
                      name="Someone else")
    with pytest.raises(ConfigError) as info:
        await store.record_grant(twin)
    assert info.value.field == "consent_id"
    assert len(await store.ledger()) == 1


async def test_grant_needs_an_index_this_store_allocated(store: SQLiteConsentStore) -> None:
    with pytest.raises(ConfigError, match="not allocated") as info:
        await store.record_grant(make_grant(StatusReference(uri=URI, idx=5)))
    assert info.value.field == "status.idx"

    on_other = await store.allocate_status_index(OTHER_URI)
    with pytest.raises(ConfigError) as info:  # allocated, but on another list
        await store.record_grant(make_grant(StatusReference(uri=URI, idx=on_other.idx)))
    assert info.value.field == "status.idx"

    with pytest.raises(ConfigError) as info:
        await store.record_grant(make_grant(None))
    assert info.value.field == "status"

    first = await grant_in(store)
    assert first.status is not None
    with pytest.raises(ConfigError, match="already belongs") as info:
        await store.record_grant(make_grant(first.status))
    assert info.value.field == "status.idx"
    assert [e.consent_id for e in await store.ledger()] == [first.consent_id]


# -- status changes -------------------------------------------------------------------------


async def test_revocation_is_final(store: SQLiteConsentStore) -> None:
    grant = await grant_in(store)
    cid = grant.consent_id
    revoked = await store.set_status(cid, TokenStatus.INVALID, reason="subject withdrew",
                                     actor="ops@example")
    assert revoked.kind == "revoked"
    assert revoked.status is TokenStatus.INVALID
    assert revoked.reason == "subject withdrew"
    assert revoked.actor == "ops@example"
    assert revoked.record_hash == grant.record_hash()
    assert await store.status_of(cid) is TokenStatus.INVALID

    for status in (TokenStatus.VALID, TokenStatus.SUSPENDED, TokenStatus.INVALID):
        with pytest.raises(ConsentWithdrawn, match="revocation is final") as info:
            await store.set_status(cid, status, reason="try to undo")
        assert info.value.check is ConsentCheck.REVOKED
        assert info.value.consent_id == cid
    assert await store.status_of(cid) is TokenStatus.INVALID
    assert [e.kind for e in await store.ledger(cid)] == ["granted", "revoked"]


async def test_suspend_then_reinstate(store: SQLiteConsentStore) -> None:
    grant = await grant_in(store)
    cid = grant.consent_id
    suspended = await store.set_status(cid, TokenStatus.SUSPENDED, reason="dispute opened")
    assert suspended.kind == "suspended"
    assert await store.status_of(cid) is TokenStatus.SUSPENDED
    reinstated = await store.set_status(cid, TokenStatus.VALID, reason="dispute resolved")
    assert reinstated.kind == "reinstated"
    assert await store.status_of(cid) is TokenStatus.VALID

    entries = await store.ledger(cid)
    assert [e.kind for e in entries] == ["granted", "suspended", "reinstated"]
    assert {e.record_hash for e in entries} == {grant.record_hash()}
    assert [e.prev_hash for e in entries[1:]] == [e.entry_hash for e in entries[:-1]]
    # a suspended consent can still be revoked
    await store.set_status(cid, TokenStatus.SUSPENDED, reason="again")
    await store.set_status(cid, TokenStatus.INVALID, reason="withdrawn")
    assert await store.status_of(cid) is TokenStatus.INVALID


async def test_bad_status_changes_name_the_field(store: SQLiteConsentStore) -> None:
    cid = (await grant_in(store)).consent_id
    cases: list[tuple[str, TokenStatus, str, str]] = [
        ("cns_nobody", TokenStatus.INVALID, "x", "consent_id"),
        (cid, TokenStatus.INVALID, "  ", "reason"),
        (cid, TokenStatus.APPLICATION_SPECIFIC, "x", "status"),
        (cid, TokenStatus.VALID, "already valid", "status"),
    ]
    for consent_id, status, reason, field in cases:
        with pytest.raises(ConfigError) as info:
            await store.set_status(consent_id, status, reason=reason)
        assert info.value.field == field
    with pytest.raises(ConfigError) as info:
        await store.status_of("cns_nobody")
    assert info.value.field == "consent_id"
    assert len(await store.ledger()) == 1


async def test_status_list_reflects_current_statuses(store: SQLiteConsentStore) -> None:
    grants = [await grant_in(store) for _ in range(5)]
    stranger = await grant_in(store, OTHER_URI)
    await store.set_status(grants[1].consent_id, TokenStatus.INVALID, reason="r")
    await store.set_status(grants[2].consent_id, TokenStatus.SUSPENDED, reason="r")
    await store.set_status(grants[3].consent_id, TokenStatus.SUSPENDED, reason="r")
    await store.set_status(grants[3].consent_id, TokenStatus.VALID, reason="r")
    await store.set_status(stranger.consent_id, TokenStatus.INVALID, reason="r")
    await store.allocate_status_index(URI)  # allocated, never bound: reads VALID

    lst = await store.status_list(URI)
    assert lst.bits == 2
    assert len(lst) == CAPACITY
    expected = [TokenStatus.VALID, TokenStatus.INVALID, TokenStatus.SUSPENDED,
                TokenStatus.VALID, TokenStatus.VALID, TokenStatus.VALID]
    assert [lst[i] for i in range(6)] == expected
    assert all(lst[i] == 0 for i in range(6, CAPACITY))

    decoded = StatusList.decode(lst.encode(), bits=2)
    assert len(decoded) == CAPACITY
    assert [decoded[i] for i in range(CAPACITY)] == [lst[i] for i in range(CAPACITY)]

    other = await store.status_list(OTHER_URI)
    assert other[0] == TokenStatus.INVALID
    assert all(other[i] == 0 for i in range(1, CAPACITY))
    with pytest.raises(ConfigError) as info:
        await store.status_list("https://registry.example/status/none")
    assert info.value.field == "uri"


_CHANGES = st.lists(st.sampled_from([TokenStatus.VALID, TokenStatus.INVALID,
                                     TokenStatus.SUSPENDED]), max_size=8)


async def _apply_changes(changes: list[TokenStatus]) -> None:
    async with SQLiteConsentStore(":memory:", status_list_capacity=8) as store:
        grant = await grant_in(store)
        cid = grant.consent_id
        current, kinds = TokenStatus.VALID, ["granted"]
        for target in changes:
            if current is TokenStatus.INVALID:
                with pytest.raises(ConsentWithdrawn):
                    await store.set_status(cid, target, reason="r")
            elif target is current:
                with pytest.raises(ConfigError):
                    await store.set_status(cid, target, reason="r")
            else:
                entry = await store.set_status(cid, target, reason="r")
                current = target
                kinds.append(entry.kind)
        assert await store.status_of(cid) is current
        assert [e.kind for e in await store.ledger(cid)] == kinds
        assert (await store.status_list(URI))[0] == current
        report = await store.verify_chain()
        assert report.ok and report.entries == len(kinds)


@settings(max_examples=40, deadline=None)
@given(_CHANGES)
def test_any_sequence_of_status_changes_follows_the_rules(changes: list[TokenStatus]) -> None:
    asyncio.run(_apply_changes(changes))


# -- generation log -------------------------------------------------------------------------


async def test_generations_answer_a_takedown_request(store: SQLiteConsentStore) -> None:
    a = (await grant_in(store)).consent_id
    b = (await grant_in(store)).consent_id
    n = 0
    made: dict[str, list[str]] = {a: [], b: []}
    for consent_id, session in ((a, "gen_a1"), (b, "gen_b1"), (a, "gen_a2")):
        await store.log_generation(record(session, "session_started", consent_id))
        await store.log_generation(record(session, "status_check", consent_id))
        for _ in range(2):
            outputs = [sha(n), sha(n + 1)]
            n += 2
            made[consent_id] += outputs
            await store.log_generation(record(session, "output", consent_id, outputs=outputs,
                                              watermark=f"{n:016x}"))
        await store.log_generation(record(session, "session_ended", consent_id))

    under_a = await store.generations(a)
    assert len(under_a) == 10
    assert {r.generation_id for r in under_a} == {"gen_a1", "gen_a2"}
    assert {r.consent_id for r in under_a} == {a}
    assert sorted(h for r in under_a for h in r.output_sha256) == sorted(made[a])
    seqs = [r.seq or 0 for r in under_a]
    assert seqs == sorted(seqs) and 0 not in seqs
    assert not set(made[b]) & {h for r in under_a for h in r.output_sha256}
    assert await store.generations("cns_nobody") == []

    of_b = await store.generation("gen_b1")
    assert [r.kind for r in of_b] == ["session_started", "status_check", "output", "output",
                                      "session_ended"]
    assert all(r.consent_id == b for r in of_b)


async def test_find_by_watermark_and_output_hash(store: SQLiteConsentStore) -> None:
    cid = (await grant_in(store)).consent_id
    logged = await store.log_generation(record("gen_1", "output", cid,
                                               outputs=[sha(1), sha(2)], watermark="00C0FFEE"))
    await store.log_generation(record("gen_2", "output", cid, outputs=[sha(3)],
                                      watermark="00000001"))
    assert logged.watermark_payload == "00c0ffee"
    assert await store.find_by_watermark("00C0FFEE") == [logged]
    assert await store.find_by_watermark("00c0ffee") == [logged]
    assert await store.find_by_output_hash(sha(2)) == [logged]
    assert await store.find_by_output_hash(sha(2).upper()) == [logged]
    assert await store.find_by_watermark("deadbeef") == []
    assert await store.find_by_output_hash(sha(99)) == []


async def test_logged_record_comes_back_with_its_chain_fields(
        store: SQLiteConsentStore) -> None:
    draft = GenerationRecord(generation_id="gen_1", kind="consent_refused",
                             consent_id="cns_x", status_check="revoked",
                             token_sha256=sha(7),
                             details={"check": "revoked", "attempt": 2, "score": 0.5,
                                      "final": True, "note": None})
    assert draft.seq is None and draft.entry_hash is None
    logged = await store.log_generation(draft)
    assert logged.seq == 1
    assert logged.prev_hash == GENESIS_HASH
    assert logged.entry_hash == chain_hash(GENESIS_HASH, logged.chained_content())
    assert logged.model_copy(update={"seq": None, "prev_hash": None,
                                     "entry_hash": None}) == draft
    assert await store.generation("gen_1") == [logged]
    with pytest.raises(ConfigError) as info:
        await store.log_generation(logged)
    assert info.value.field == "seq"


def test_generation_record_refuses_what_the_chain_cannot_hash() -> None:
    with pytest.raises(ValidationError):
        GenerationRecord(generation_id="g", kind="output", details={"x": float("nan")})
    with pytest.raises(ValidationError):
        GenerationRecord(generation_id="g", kind="output", details={"x": 2**60})
    with pytest.raises(ValidationError):
        GenerationRecord(generation_id="g", kind="output", watermark_payload="not-hex")
    with pytest.raises(ValidationError):
        GenerationRecord(generation_id="g", kind="output", output_sha256=[sha(1), sha(1)])
    with pytest.raises(ValidationError):
        GenerationRecord(generation_id="g", kind="output", at=datetime(2026, 1, 1))


def test_ledger_entry_status_must_match_kind() -> None:
    with pytest.raises(ValidationError):
        LedgerEntry(seq=1, kind="revoked", consent_id="cns_x", at=datetime.now(UTC),
                    record_hash=sha(1), status=TokenStatus.VALID, prev_hash=GENESIS_HASH,
                    entry_hash=sha(2))


# -- replay guard ---------------------------------------------------------------------------


async def test_claim_is_single_use_until_expiry_plus_leeway() -> None:
    now = [1_000_000.0]
    async with SQLiteConsentStore(":memory:", replay_leeway_s=60,
                                  clock=lambda: now[0]) as store:
        assert await store.claim("jti-1", expires_at=now[0] + 300) is True
        assert await store.claim("jti-1", expires_at=now[0] + 300) is False
        assert await store.claim("jti-2", expires_at=now[0] + 300) is True

        now[0] += 300 + 59  # expired, but within the verifier's leeway: still remembered
        assert await store.claim("jti-1", expires_at=1_000_300.0) is False

        now[0] += 2  # past expiry + leeway: purged on the next claim
        assert await store.claim("jti-3", expires_at=now[0] + 10) is True
        assert await store.claim("jti-1", expires_at=1_000_300.0) is True

        # a jti that arrives already expired is still single-use
        assert await store.claim("jti-old", expires_at=0.0) is True
        assert await store.claim("jti-old", expires_at=0.0) is False

        with pytest.raises(ConfigError) as info:
            await store.claim("", expires_at=now[0])
        assert info.value.field == "jti"


async def test_concurrent_claims_let_exactly_one_through(store: SQLiteConsentStore) -> None:
    results = await asyncio.gather(*(store.claim("jti-race", 9e9) for _ in range(30)))
    assert results.count(True) == 1


# -- append-only and tamper evidence --------------------------------------------------------


@dataclass
class Scenario:
    """seq 1 grant A, 2 session start (A), 3 output (A), 4 grant B, 5 revoke A, 6 end (A)."""

    path: Path
    a: ConsentGrant
    b: ConsentGrant


@pytest.fixture
async def scenario(tmp_path: Path) -> Scenario:
    path = tmp_path / "consent.db"
    async with SQLiteConsentStore(path, status_list_capacity=CAPACITY) as store:
        a = await grant_in(store)
        await store.log_generation(record("gen_1", "session_started", a.consent_id))
        await store.log_generation(record("gen_1", "output", a.consent_id,
                                          outputs=[sha(1), sha(2)], watermark="0a0b"))
        b = await grant_in(store)
        await store.set_status(a.consent_id, TokenStatus.INVALID, reason="withdrawn")
        await store.log_generation(record("gen_1", "session_ended", a.consent_id))
        report = await store.verify_chain()
    assert report == ChainReport(ok=True, entries=6)
    return Scenario(path, a, b)


def raw_tamper(path: Path, edit: Callable[[sqlite3.Connection], object]) -> None:
    """Edit the file as an attacker with file access would: drop the triggers, then write."""
    conn = sqlite3.connect(path)
    try:
        triggers = conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")
        for (name,) in triggers.fetchall():
            conn.execute(f'DROP TRIGGER "{name}"')
        edit(conn)
        conn.commit()
    finally:
        conn.close()


async def verify(path: Path) -> ChainReport:
    async with SQLiteConsentStore(path) as store:
        return await store.verify_chain()


@pytest.mark.parametrize("statement", [
    "UPDATE ledger SET reason = 'nothing happened' WHERE seq = 5",
    "DELETE FROM ledger WHERE seq = 5",
    "UPDATE generations SET consent_id = NULL WHERE seq = 3",
    "DELETE FROM generations WHERE seq = 6",
    "DELETE FROM generation_outputs WHERE seq = 3",
    "DELETE FROM status_allocations",
])
async def test_triggers_refuse_rewriting_history(scenario: Scenario, statement: str) -> None:
    conn = sqlite3.connect(scenario.path)
    try:
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute(statement)
    finally:
        conn.close()
    assert (await verify(scenario.path)).ok


def _swap_ledger_rows(conn: sqlite3.Connection, first: int, second: int) -> None:
    cols = ("kind", "consent_id", "at", "record_hash", "status", "reason", "actor",
            "grant_json", "prev_hash", "entry_hash")
    select = f"SELECT {', '.join(cols)} FROM ledger WHERE seq = ?"
    row1 = conn.execute(select, (first,)).fetchone()
    row2 = conn.execute(select, (second,)).fetchone()
    update = f"UPDATE ledger SET {', '.join(f'{c} = ?' for c in cols)} WHERE seq = ?"
    conn.execute(update, (*row2, first))
    conn.execute(update, (*row1, second))


def _head_hash(conn: sqlite3.Connection) -> str:
    return str(conn.execute("SELECT entry_hash FROM journal_head").fetchone()[0])


def _append_forged_hash(conn: sqlite3.Connection) -> None:
    forged = GenerationRecord(generation_id="gen_forged", kind="output", seq=7)
    conn.execute("INSERT INTO generations (seq, generation_id, kind, content, prev_hash, "
                 "entry_hash) VALUES (7, 'gen_forged', 'output', ?, ?, ?)",
                 (str(forged.chained_content()), _head_hash(conn), "f" * 64))


def _append_well_formed(conn: sqlite3.Connection) -> None:
    # Someone who knows the algorithm appends a correctly chained row behind the store's back.
    forged = GenerationRecord(generation_id="gen_forged", kind="output", seq=7)
    canonical = rfc8785.dumps(forged.chained_content())
    prev = _head_hash(conn)
    conn.execute("INSERT INTO generations (seq, generation_id, kind, content, prev_hash, "
                 "entry_hash) VALUES (7, 'gen_forged', 'output', ?, ?, ?)",
                 (canonical.decode(), prev, chain_hash(prev, forged.chained_content())))


Tamper = Callable[[sqlite3.Connection, Scenario], object]

TAMPERING: list[tuple[str, Tamper, int | None]] = [
    ("edit ledger reason",
     lambda c, s: c.execute("UPDATE ledger SET reason = 'typo' WHERE seq = 5"), 5),
    ("turn a revocation into a reinstatement",
     lambda c, s: c.execute("UPDATE ledger SET kind = 'reinstated', status = 0 "
                            "WHERE seq = 5"), 5),
    ("edit stored grant",
     lambda c, s: c.execute("UPDATE ledger SET grant_json = replace(grant_json, 'Amelia', "
                            "'Mallory') WHERE seq = 4"), 4),
    ("edit generation content",
     lambda c, s: c.execute("UPDATE generations SET content = replace(content, "
                            "'\"customer_support_live\"', '\"political\"') WHERE seq = 3"), 3),
    ("edit generation index column",
     lambda c, s: c.execute("UPDATE generations SET consent_id = ? WHERE seq = 2",
                            (s.b.consent_id,)), 2),
    ("delete first row", lambda c, s: c.execute("DELETE FROM ledger WHERE seq = 1"), 1),
    ("delete middle ledger row",
     lambda c, s: c.execute("DELETE FROM ledger WHERE seq = 4"), 4),
    ("delete middle generation row",
     lambda c, s: c.executescript("DELETE FROM generations WHERE seq = 3; "
                                  "DELETE FROM generation_outputs WHERE seq = 3;"), 3),
    ("delete last row", lambda c, s: c.execute("DELETE FROM generations WHERE seq = 6"), 6),
    ("swap two rows' content", lambda c, s: _swap_ledger_rows(c, 4, 5), 4),
    ("move a row to the end",
     lambda c, s: c.execute("UPDATE generations SET seq = 7 WHERE seq = 2"), 2),
    ("append a row with a made-up hash", lambda c, s: _append_forged_hash(c), 7),
    ("append a correctly chained row outside the store",
     lambda c, s: _append_well_formed(c), 7),
    ("un-revoke in the current-status table",
     lambda c, s: c.execute("UPDATE consent_status SET status = 0 WHERE consent_id = ?",
                            (s.a.consent_id,)), 5),
    ("drop an output from the hash index",
     lambda c, s: c.execute("DELETE FROM generation_outputs WHERE sha256 = ?", (sha(2),)), 3),
    ("attribute a foreign output",
     lambda c, s: c.execute("INSERT INTO generation_outputs (sha256, seq) VALUES (?, 2)",
                            (sha(9),)), 2),
]


@pytest.mark.parametrize(("edit", "first_bad"), [(t[1], t[2]) for t in TAMPERING],
                         ids=[t[0] for t in TAMPERING])
async def test_tampering_is_detected(scenario: Scenario, edit: Tamper,
                                     first_bad: int | None) -> None:
    raw_tamper(scenario.path, lambda conn: edit(conn, scenario))
    report = await verify(scenario.path)
    assert not report.ok
    assert report.first_bad_seq == first_bad, report.problem
    assert report.problem


async def test_tampered_grant_is_not_handed_out(scenario: Scenario) -> None:
    raw_tamper(scenario.path, lambda c: c.execute(
        "UPDATE ledger SET grant_json = replace(grant_json, 'Amelia', 'Mallory') WHERE seq = 4"))
    async with SQLiteConsentStore(scenario.path) as store:
        with pytest.raises(AvatarKitError, match="tampered"):
            await store.get_grant(scenario.b.consent_id)
        assert await store.get_grant(scenario.a.consent_id) == scenario.a


async def test_reopening_restores_the_triggers(scenario: Scenario) -> None:
    raw_tamper(scenario.path, lambda conn: None)
    async with SQLiteConsentStore(scenario.path) as store:
        assert (await store.verify_chain()).ok
    conn = sqlite3.connect(scenario.path)
    try:
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute("DELETE FROM ledger")
    finally:
        conn.close()


@pytest.mark.parametrize("on_disk", [False, True], ids=["memory", "file"])
async def test_concurrent_appends_keep_one_chain(tmp_path: Path, on_disk: bool) -> None:
    path = tmp_path / "consent.db" if on_disk else ":memory:"
    async with SQLiteConsentStore(path, status_list_capacity=CAPACITY) as store:
        await _hundred_concurrent_appends(store)


async def _hundred_concurrent_appends(store: SQLiteConsentStore) -> None:
    grants = [await grant_in(store) for _ in range(10)]
    appends = [store.log_generation(record(f"gen_{i}", "output", grants[i % 10].consent_id,
                                           outputs=[sha(i)]))
               for i in range(90)]
    changes = [store.set_status(g.consent_id, TokenStatus.SUSPENDED, reason="audit")
               for g in grants]
    logged, changed = await asyncio.gather(asyncio.gather(*appends), asyncio.gather(*changes))
    seqs = sorted([r.seq or 0 for r in logged] + [e.seq for e in changed])
    assert seqs == list(range(11, 111))
    journal: list[GenerationRecord | LedgerEntry] = [*await store.ledger()]
    for g in grants:
        journal += await store.generations(g.consent_id)
    journal.sort(key=lambda e: e.seq or 0)
    assert [e.seq for e in journal] == list(range(1, 111))
    assert journal[0].prev_hash == GENESIS_HASH
    for before, after in itertools.pairwise(journal):
        assert after.prev_hash == before.entry_hash
    assert await store.verify_chain() == ChainReport(ok=True, entries=110)


async def test_event_loop_keeps_running_during_appends(store: SQLiteConsentStore) -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    try:
        # Awaited one by one: a store that did its I/O on the loop would never yield here,
        # so the ticker could not run before the loop below finishes.
        for i in range(30):
            await store.log_generation(record("gen_busy", "output", None, outputs=[sha(i)]))
        ticked_during_appends = ticks
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert ticked_during_appends >= 1


# -- lifecycle ------------------------------------------------------------------------------


async def test_data_persists_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "consent.db"
    async with SQLiteConsentStore(path, status_list_capacity=CAPACITY) as store:
        grant = await grant_in(store)
        await store.set_status(grant.consent_id, TokenStatus.INVALID, reason="withdrawn")
        logged = await store.log_generation(record("gen_1", "output", grant.consent_id,
                                                   outputs=[sha(1)], watermark="beef"))
        entries = await store.ledger()
        assert await store.claim("jti-1", 9e9)

    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()

    async with SQLiteConsentStore(path) as again:
        assert await again.get_grant(grant.consent_id) == grant
        assert await again.status_of(grant.consent_id) is TokenStatus.INVALID
        assert await again.ledger() == entries
        assert await again.generations(grant.consent_id) == [logged]
        assert await again.find_by_watermark("beef") == [logged]
        assert await again.claim("jti-1", 9e9) is False
        assert (await again.status_list(URI))[0] == TokenStatus.INVALID
        # indices are never reused, and the chain continues where it stopped
        assert (await again.allocate_status_index(URI)).idx == 1
        nxt = await again.log_generation(record("gen_2", "session_ended", grant.consent_id))
        assert nxt.seq == 4 and nxt.prev_hash == logged.entry_hash
        assert (await again.verify_chain()).ok


async def test_newer_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "consent.db"
    async with SQLiteConsentStore(path):
        pass
    conn = sqlite3.connect(path)
    conn.execute("UPDATE schema_version SET version = 99")
    conn.commit()
    conn.close()
    with pytest.raises(ConfigError, match="schema version 99") as info:
        async with SQLiteConsentStore(path):
            pass
    assert info.value.field == "path"


async def test_unopenable_path_names_the_field(tmp_path: Path) -> None:
    store = SQLiteConsentStore(tmp_path / "missing-dir" / "consent.db")
    with pytest.raises(ConfigError) as info:
        await store.status_of("cns_x")
    assert info.value.field == "path"
    await store.aclose()


async def test_aclose_is_idempotent_and_later_calls_fail_clearly() -> None:
    store = SQLiteConsentStore(":memory:")
    grant = await grant_in(store)
    await store.aclose()
    await store.aclose()
    calls: list[Callable[[], object]] = [
        lambda: store.get_grant(grant.consent_id),
        lambda: store.status_of(grant.consent_id),
        lambda: store.allocate_status_index(URI),
        lambda: store.log_generation(record("g", "output", None)),
        lambda: store.claim("jti", 9e9),
        lambda: store.verify_chain(),
    ]
    for call in calls:
        coro = call()
        assert asyncio.iscoroutine(coro)
        with pytest.raises(SessionStateError, match="closed"):
            await coro
    never_opened = SQLiteConsentStore(":memory:")
    await never_opened.aclose()
    await never_opened.aclose()
