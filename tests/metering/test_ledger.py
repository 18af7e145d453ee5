"""The session ledger: lifecycle, transitions, orphans (real processes), usage and reports."""

from __future__ import annotations

import asyncio
import os
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from avatarkit.errors import AvatarKitError, ConfigError, SessionStateError
from avatarkit.metering.ledger import (
    ProcessIdentity,
    SessionRow,
    SQLiteSessionLedger,
    Usage,
)

T0 = 1_700_000_000.0
OTHER_HOST = "reaper-test-elsewhere.invalid"
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="needs /proc to tell zombies and pid reuse")


class Clock:
    """A settable clock: tests move time instead of sleeping."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def at(offset: float) -> datetime:
    return datetime.fromtimestamp(T0 + offset, UTC)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "ledger.db"


@pytest.fixture
async def ledger(db: Path, clock: Clock) -> AsyncIterator[SQLiteSessionLedger]:
    async with SQLiteSessionLedger(db, clock=clock) as opened:
        yield opened


async def begin(ledger: SQLiteSessionLedger, session_id: str, attempt: int = 1,
                **fields: Any) -> SessionRow:
    values: dict[str, Any] = {"provider": "tavus-main", "provider_kind": "tavus",
                              "idempotency_key": f"idem-{session_id}-{attempt}",
                              "avatar": "amelia", "price_per_minute": Decimal("0.60")}
    values.update(fields)
    return await ledger.begin(session_id=session_id, attempt=attempt, **values)


async def billed(ledger: SQLiteSessionLedger, clock: Clock, session_id: str, *,
                 start: float, end: float | None = None, billed_seconds: float | None = None,
                 cost: Decimal | None = None, **fields: Any) -> SessionRow:
    """A row created and opened at ``start`` (and ended at ``end`` when given)."""
    clock.now = T0 + start
    row = await begin(ledger, session_id, **fields)
    row = await ledger.mark_open(row.row_id, vendor_session_id=f"v-{session_id}",
                                 billing_started_at=at(start))
    if end is not None:
        row = await ledger.mark_ended(row.row_id, ended_at=at(end), cost=cost,
                                      billed_seconds=billed_seconds, reason="done")
    return row


# -- lifecycle ---------------------------------------------------------------------------------


async def test_lifecycle_round_trips_every_field(db: Path, clock: Clock) -> None:
    async with SQLiteSessionLedger(db, clock=clock) as ledger:
        created = await ledger.begin(
            session_id="sess-1", attempt=2, provider="tavus-eu", provider_kind="tavus",
            idempotency_key="idem-1", avatar="amelia", tenant="acme", purpose="support",
            plan="pro", price_per_minute=Decimal("0.3750"), currency="EUR")
        assert created.row_id == "sess-1#2"
        assert created.state == "creating" and not created.terminal
        assert created.owner == ProcessIdentity.current()
        assert created.created_at == created.heartbeat_at == at(0)
        assert created.vendor_session_id is None and created.billing_started_at is None
        assert created.billed_seconds_at(at(50)) == 0.0
        assert await ledger.get("sess-1#2") == created

        clock.advance(1.5)
        # a non-UTC offset is normalised to UTC, to the microsecond
        started = datetime(2023, 11, 14, 23, 13, 21, 123456, tzinfo=timezone(timedelta(hours=1)))
        opened = await ledger.mark_open("sess-1#2", vendor_session_id="c-123",
                                        billing_started_at=started)
        assert opened.state == "open"
        assert opened.billing_started_at == started
        assert opened.billing_started_at is not None
        assert opened.billing_started_at.tzinfo == UTC
        assert opened.heartbeat_at == at(1.5)
        assert opened.billed_seconds_at(started + timedelta(seconds=90)) == 90.0
        assert opened.cost_at(started + timedelta(seconds=90)) == Decimal("0.562500")

        ended_at = started + timedelta(minutes=10, microseconds=7)
        ended = await ledger.mark_ended("sess-1#2", ended_at=ended_at,
                                        billed_seconds=600.000007,
                                        cost=Decimal("3.75000004"), reason="user hung up")
        assert ended.state == "ended" and ended.terminal
        assert ended.cost_at(ended_at + timedelta(hours=1)) == Decimal("3.75000004")
        assert ended.billed_seconds_at(ended_at + timedelta(hours=1)) == 600.000007

    # a new ledger object on the same file reads back exactly the same row
    async with SQLiteSessionLedger(db, clock=clock) as again:
        stored = await again.get("sess-1#2")
    assert stored == ended
    assert str(stored.price_per_minute) == "0.3750"
    assert str(stored.cost) == "3.75000004"
    assert stored.ended_at == ended_at and stored.billing_started_at == started
    assert stored.billed_seconds == 600.000007
    assert stored.model_dump() == ended.model_dump()
    assert (stored.tenant, stored.purpose, stored.plan, stored.currency) == (
        "acme", "support", "pro", "EUR")
    assert stored.end_reason == "user hung up"


async def test_in_memory_ledger(clock: Clock) -> None:
    async with SQLiteSessionLedger(":memory:", clock=clock) as ledger:
        row = await begin(ledger, "mem")
        assert await ledger.get(row.row_id) == row
        assert [r.row_id for r in await ledger.rows()] == ["mem#1"]


async def test_failed_and_abandoned_bill_nothing(ledger: SQLiteSessionLedger,
                                                 clock: Clock) -> None:
    a = await begin(ledger, "a")
    b = await begin(ledger, "b", price_per_minute=None)
    clock.advance(5)
    failed = await ledger.mark_failed(a.row_id, reason="vendor said 402")
    abandoned = await ledger.mark_abandoned(b.row_id, reason="no vendor session found")
    for row, state in ((failed, "failed"), (abandoned, "abandoned")):
        assert row.state == state and row.terminal
        assert row.ended_at == at(5) and row.billed_seconds == 0.0
        assert row.cost_at(at(100)) == 0
    assert failed.end_reason == "vendor said 402"
    usage = await ledger.usage(since=at(-10))
    assert usage.sessions == 0 and usage.billed_seconds == 0 and usage.cost == 0


async def test_end_from_creating_records_the_vendor_session(ledger: SQLiteSessionLedger,
                                                            clock: Clock) -> None:
    row = await begin(ledger, "crashed")
    clock.advance(300)
    ended = await ledger.mark_ended(row.row_id, reason="reaped", vendor_session_id="c-found")
    assert ended.state == "ended" and ended.vendor_session_id == "c-found"
    assert ended.ended_at == at(300) and ended.billed_seconds == 0.0 and ended.cost is None


async def test_billed_seconds_default_to_the_billing_time(ledger: SQLiteSessionLedger,
                                                          clock: Clock) -> None:
    row = await billed(ledger, clock, "s", start=0)
    ended = await ledger.mark_ended(row.row_id, ended_at=at(90.25), reason="done")
    assert ended.billed_seconds == 90.25
    assert ended.cost_at(at(1000)) == Decimal("0.902500")  # no vendor cost: price x minutes


# -- transitions -------------------------------------------------------------------------------


async def test_duplicate_attempt_is_refused(ledger: SQLiteSessionLedger) -> None:
    await begin(ledger, "dup")
    with pytest.raises(SessionStateError, match="dup#1"):
        await begin(ledger, "dup")
    await begin(ledger, "dup", attempt=2)  # the failover attempt is a row of its own


async def test_illegal_transitions(ledger: SQLiteSessionLedger, clock: Clock) -> None:
    opened = await billed(ledger, clock, "o", start=0)
    with pytest.raises(SessionStateError, match="open"):
        await ledger.mark_failed(opened.row_id, reason="too late")
    with pytest.raises(SessionStateError):
        await ledger.mark_open(opened.row_id, vendor_session_id="again",
                               billing_started_at=at(1))
    with pytest.raises(SessionStateError):
        await ledger.mark_abandoned(opened.row_id, reason="it is billing")

    failed = await begin(ledger, "f")
    await ledger.mark_failed(failed.row_id, reason="500")
    for attempt in (
        ledger.mark_failed(failed.row_id, reason="again"),
        ledger.mark_ended(failed.row_id, reason="nothing to end"),
        ledger.mark_open(failed.row_id, vendor_session_id="c", billing_started_at=at(1)),
        ledger.mark_abandoned(failed.row_id, reason="x"),
    ):
        with pytest.raises(SessionStateError, match="failed"):
            await attempt

    abandoned = await begin(ledger, "ab")
    await ledger.mark_abandoned(abandoned.row_id, reason="gone")
    # a slow create confirmed after a reaper gave up: the caller must end it itself
    with pytest.raises(SessionStateError, match="abandoned"):
        await ledger.mark_open(abandoned.row_id, vendor_session_id="c",
                               billing_started_at=at(2))

    ended = await ledger.mark_ended(opened.row_id, reason="bye")
    with pytest.raises(SessionStateError, match="ended"):
        await ledger.mark_open(ended.row_id, vendor_session_id="c", billing_started_at=at(3))
    with pytest.raises(SessionStateError):
        await ledger.mark_failed(ended.row_id, reason="no")

    with pytest.raises(SessionStateError, match="nope#1"):
        await ledger.get("nope#1")
    with pytest.raises(SessionStateError, match="nope#1"):
        await ledger.mark_ended("nope#1", reason="x")


async def test_mark_ended_is_idempotent(ledger: SQLiteSessionLedger, clock: Clock) -> None:
    row = await billed(ledger, clock, "s", start=0)
    first = await ledger.mark_ended(row.row_id, ended_at=at(60), billed_seconds=60.0,
                                    cost=Decimal("0.60"), reason="closed by session")
    clock.advance(500)
    again = await ledger.mark_ended(row.row_id, ended_at=at(500), billed_seconds=999.0,
                                    cost=Decimal("9.99"), reason="reaper")
    assert again == first
    assert await ledger.get(row.row_id) == first


async def test_mark_ended_refuses_another_vendor_session(ledger: SQLiteSessionLedger,
                                                         clock: Clock) -> None:
    row = await billed(ledger, clock, "s", start=0)
    with pytest.raises(SessionStateError, match="v-s"):
        await ledger.mark_ended(row.row_id, reason="x", vendor_session_id="someone-else")
    assert (await ledger.get(row.row_id)).state == "open"


async def test_invalid_arguments_raise_config_errors(ledger: SQLiteSessionLedger) -> None:
    with pytest.raises(ConfigError) as attempt_error:
        await begin(ledger, "s", attempt=0)
    assert attempt_error.value.field == "attempt"
    with pytest.raises(ConfigError) as price_error:
        await begin(ledger, "s", price_per_minute=Decimal("NaN"))
    assert price_error.value.field == "price_per_minute"
    with pytest.raises(ConfigError):
        await begin(ledger, "s", price_per_minute=Decimal("-1"))
    with pytest.raises(ConfigError):
        await begin(ledger, "")
    row = await begin(ledger, "s")
    with pytest.raises(ConfigError) as naive:
        await ledger.mark_open(row.row_id, vendor_session_id="c",
                               billing_started_at=datetime(2024, 1, 1))
    assert naive.value.field == "billing_started_at"
    with pytest.raises(ConfigError):
        await ledger.mark_failed(row.row_id, reason=" ")
    with pytest.raises(ConfigError):
        await ledger.mark_ended(row.row_id, reason="x", billed_seconds=-1.0)
    with pytest.raises(ConfigError, match="states"):
        await ledger.rows(states=["opened"])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="group_by"):
        await ledger.report(since=at(0), group_by=["region"])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="until"):
        await ledger.usage(since=at(10), until=at(0))
    with pytest.raises(ConfigError):
        await ledger.orphans(stale_after_s=float("nan"))
    assert (await ledger.get(row.row_id)).state == "creating"


# -- heartbeat, sharing, closing ---------------------------------------------------------------


async def test_heartbeat_touches_only_the_owners_live_rows(ledger: SQLiteSessionLedger,
                                                           clock: Clock) -> None:
    other = ProcessIdentity(host=OTHER_HOST, pid=4242, started_at=12.5)
    mine_a = await begin(ledger, "a")
    mine_b = await begin(ledger, "b")
    done = await begin(ledger, "c")
    await ledger.mark_failed(done.row_id, reason="x")
    theirs = await begin(ledger, "d", owner=other)
    assert theirs.owner == other

    clock.advance(30)
    assert await ledger.heartbeat() == 2
    assert (await ledger.get(mine_a.row_id)).heartbeat_at == at(30)
    assert (await ledger.get(mine_b.row_id)).heartbeat_at == at(30)
    assert (await ledger.get(done.row_id)).heartbeat_at == at(0)
    assert (await ledger.get(theirs.row_id)).heartbeat_at == at(0)

    clock.advance(30)
    assert await ledger.heartbeat(other) == 1
    assert (await ledger.get(theirs.row_id)).heartbeat_at == at(60)
    assert await ledger.heartbeat(ProcessIdentity(host=OTHER_HOST, pid=1, started_at=0)) == 0


async def test_two_ledgers_share_one_file(db: Path, clock: Clock) -> None:
    async with SQLiteSessionLedger(db, clock=clock) as one, \
            SQLiteSessionLedger(db, clock=clock) as two:
        row = await begin(one, "shared")
        assert await two.get(row.row_id) == row
        await two.mark_open(row.row_id, vendor_session_id="c-1", billing_started_at=at(0))
        assert (await one.get(row.row_id)).state == "open"
        await begin(two, "other")
        assert [r.session_id for r in await one.rows()] == ["shared", "other"]
        # the one that did not make the change still cannot make a conflicting one
        with pytest.raises(SessionStateError):
            await one.mark_failed(row.row_id, reason="stale view")


async def test_close_is_idempotent_and_final(clock: Clock) -> None:
    ledger = SQLiteSessionLedger(":memory:", clock=clock)
    await begin(ledger, "s")  # opens lazily
    await ledger.aclose()
    await ledger.aclose()
    with pytest.raises(SessionStateError, match="closed"):
        await ledger.rows()
    assert "closed" in repr(ledger)


async def test_schema_version_mismatch_is_refused(db: Path, clock: Clock) -> None:
    async with SQLiteSessionLedger(db, clock=clock) as ledger:
        await begin(ledger, "s")
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE session_ledger_schema SET version = 99")
    conn.close()
    with pytest.raises(ConfigError, match="version 99"):
        async with SQLiteSessionLedger(db, clock=clock):
            pass


async def test_malformed_stored_row_is_reported(db: Path, clock: Clock) -> None:
    async with SQLiteSessionLedger(db, clock=clock) as ledger:
        row = await begin(ledger, "s")
        with sqlite3.connect(db) as conn:
            conn.execute("UPDATE sessions SET price_per_minute = 'lots'")
        conn.close()
        with pytest.raises(AvatarKitError, match="malformed"):
            await ledger.get(row.row_id)


# -- rows --------------------------------------------------------------------------------------


async def test_rows_filters_and_order(ledger: SQLiteSessionLedger, clock: Clock) -> None:
    await billed(ledger, clock, "s1", start=0, end=100, tenant="acme")
    await billed(ledger, clock, "s2", start=50, tenant="globex", provider="heygen")
    clock.now = T0 + 200
    await begin(ledger, "s3", tenant="acme")
    clock.now = T0 + 20  # created earlier than s2 although inserted last
    early = await begin(ledger, "s4")
    await ledger.mark_failed(early.row_id, reason="x")

    assert [r.session_id for r in await ledger.rows()] == ["s1", "s4", "s2", "s3"]
    assert [r.session_id for r in await ledger.rows(states=["open", "creating"])] == [
        "s2", "s3"]
    assert await ledger.rows(states=[]) == []
    assert [r.session_id for r in await ledger.rows(tenant="acme")] == ["s1", "s3"]
    assert [r.session_id for r in await ledger.rows(provider="heygen")] == ["s2"]
    assert [r.session_id for r in await ledger.rows(session_id="s3")] == ["s3"]
    # since: rows still billing at or after it (s4 failed at t=20, s1 ended at t=100)
    assert [r.session_id for r in await ledger.rows(since=at(100))] == ["s1", "s2", "s3"]
    assert [r.session_id for r in await ledger.rows(since=at(100.5))] == ["s2", "s3"]
    assert [r.session_id for r in await ledger.rows(since=at(100.5), tenant="acme",
                                                    states=["creating"])] == ["s3"]


# -- process identity and orphans --------------------------------------------------------------


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A real child process that would live a minute; killed and reaped at teardown."""
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as proc:
        try:
            yield proc
        finally:
            proc.kill()


def test_current_identity_is_cached_and_follows_fork(
        monkeypatch: pytest.MonkeyPatch, sleeper: subprocess.Popen[bytes]) -> None:
    me = ProcessIdentity.current()
    assert me is ProcessIdentity.current()
    assert (me.host, me.pid) == (socket.gethostname(), os.getpid())
    assert me.is_alive() is True
    # what a forked child sees: another pid, hence another identity
    monkeypatch.setattr(os, "getpid", lambda: sleeper.pid)
    forked = ProcessIdentity.current()
    assert forked.pid == sleeper.pid and forked != me
    assert forked == ProcessIdentity.of(sleeper.pid)
    monkeypatch.undo()
    assert ProcessIdentity.current() == me
    if sys.platform.startswith("linux"):
        assert me.started_at > 0


def test_identity_validation() -> None:
    for pid in (0, -1, True):
        with pytest.raises(ConfigError, match="pid"):
            ProcessIdentity(host="h", pid=pid, started_at=0.0)
    with pytest.raises(ConfigError, match="host"):
        ProcessIdentity(host="", pid=1, started_at=0.0)
    with pytest.raises(ConfigError, match="started_at"):
        ProcessIdentity(host="h", pid=1, started_at=float("inf"))


def test_other_host_cannot_be_probed() -> None:
    assert ProcessIdentity(host=OTHER_HOST, pid=os.getpid(), started_at=0.0).is_alive() is None


@linux_only
def test_reused_pid_counts_as_dead() -> None:
    me = ProcessIdentity.current()
    impostor = ProcessIdentity(host=me.host, pid=me.pid, started_at=me.started_at + 1.0)
    assert impostor.is_alive() is False


@linux_only
async def test_killed_child_is_an_orphan_even_before_it_is_reaped(
        ledger: SQLiteSessionLedger, sleeper: subprocess.Popen[bytes]) -> None:
    owner = ProcessIdentity.of(sleeper.pid)
    assert owner.started_at > 0 and owner.is_alive() is True
    row = await begin(ledger, "child", owner=owner)
    mine = await begin(ledger, "mine")
    assert await ledger.orphans() == []

    sleeper.kill()  # no wait(): the child stays a zombie until it is reaped
    found: list[SessionRow] = []
    deadline = time.monotonic() + 10
    while not found and time.monotonic() < deadline:
        found = await ledger.orphans()  # SIGKILL lands asynchronously: poll briefly
    assert [r.row_id for r in found] == [row.row_id]
    assert sleeper.returncode is None  # not reaped yet: it was a zombie that counted as dead
    assert mine.row_id not in {r.row_id for r in found}

    await asyncio.to_thread(sleeper.wait)
    # reaped: the pid is gone altogether (or reused, and then the start time differs)
    assert owner.is_alive() is False
    assert [r.row_id for r in await ledger.orphans()] == [row.row_id]
    await ledger.mark_ended(row.row_id, reason="reaped", vendor_session_id="c-child")
    assert await ledger.orphans() == []


@linux_only
def test_identity_of_a_missing_process() -> None:
    with subprocess.Popen([sys.executable, "-c", "pass"]) as proc:
        pass
    with pytest.raises(ConfigError, match="pid"):
        ProcessIdentity.of(proc.pid)


async def test_other_host_orphans_go_by_heartbeat(ledger: SQLiteSessionLedger,
                                                  clock: Clock) -> None:
    elsewhere = ProcessIdentity(host=OTHER_HOST, pid=777, started_at=3.25)
    row = await begin(ledger, "remote", owner=elsewhere)
    opened = await ledger.mark_open(row.row_id, vendor_session_id="c", billing_started_at=at(0))
    clock.advance(120)
    assert await ledger.orphans() == []  # exactly stale_after_s old is not yet stale
    clock.advance(1)
    assert [r.row_id for r in await ledger.orphans()] == [opened.row_id]
    assert await ledger.orphans(stale_after_s=300) == []
    await ledger.heartbeat(elsewhere)
    assert await ledger.orphans() == []
    clock.advance(500)
    assert [r.row_id for r in await ledger.orphans()] == [opened.row_id]
    await ledger.mark_ended(opened.row_id, reason="reaped")
    assert await ledger.orphans() == []


@linux_only
async def test_reused_pid_owner_is_an_orphan(ledger: SQLiteSessionLedger) -> None:
    me = ProcessIdentity.current()
    ghost = ProcessIdentity(host=me.host, pid=me.pid, started_at=me.started_at + 1.0)
    row = await begin(ledger, "ghost", owner=ghost)
    await begin(ledger, "alive")
    assert [r.row_id for r in await ledger.orphans()] == [row.row_id]


# -- usage -------------------------------------------------------------------------------------


async def test_usage_clips_to_the_window(ledger: SQLiteSessionLedger, clock: Clock) -> None:
    # 0..600 s, vendor-confirmed 600 s and a cost above price x minutes (a minimum charge)
    await billed(ledger, clock, "a", start=0, end=600, billed_seconds=600.0,
                 cost=Decimal("7.20"))
    await billed(ledger, clock, "b", start=800)  # still open
    await billed(ledger, clock, "c", start=100, end=200, billed_seconds=100.0)  # no cost
    await billed(ledger, clock, "d", start=1200, end=1300)  # after the window
    clock.now = T0 + 1000

    whole = await ledger.usage(since=at(0), until=at(1000))
    # a: stored cost as is; b: 200 s open at 0.60/min; c: 100 s at 0.60/min
    assert whole.sessions == 3 and whole.open_sessions == 1
    assert whole.billed_seconds == 900.0
    assert whole.cost == Decimal("7.20") + Decimal("2.00") + Decimal("1.00")
    assert whole.cost_known and whole.currency == "USD"
    assert whole.minutes == 15.0

    clipped = await ledger.usage(since=at(300), until=at(900))
    # a: half of it (300 of 600 s, half the stored cost); b: 800..900; c: outside
    assert clipped.sessions == 2 and clipped.open_sessions == 1
    assert clipped.billed_seconds == 400.0
    assert clipped.cost == Decimal("3.60") + Decimal("1.00")

    # until defaults to now, and an open row counts up to now
    assert (await ledger.usage(since=at(700))).billed_seconds == 200.0
    clock.advance(60)
    assert (await ledger.usage(since=at(700))).billed_seconds == 260.0
    # adjacent windows add up to the whole
    first = await ledger.usage(since=at(0), until=at(450))
    second = await ledger.usage(since=at(450), until=at(1060))
    assert first.billed_seconds + second.billed_seconds == 960.0
    assert first.cost is not None and second.cost is not None
    assert first.cost + second.cost == Decimal("7.20") + Decimal("2.60") + Decimal("1.00")

    empty = await ledger.usage(since=at(5000), until=at(6000))
    assert empty == Usage(sessions=0, billed_seconds=0.0, cost=Decimal(0),
                          unpriced_seconds=0.0, open_sessions=0, currency=None)


async def test_unknown_price_is_unpriced_not_free(ledger: SQLiteSessionLedger,
                                                  clock: Clock) -> None:
    await billed(ledger, clock, "u", start=0, end=120, billed_seconds=120.0,
                 price_per_minute=None)
    usage = await ledger.usage(since=at(0), until=at(1000))
    assert usage.sessions == 1 and usage.billed_seconds == 120.0
    assert usage.unpriced_seconds == 120.0
    assert usage.cost is None and not usage.cost_known
    row = (await ledger.rows())[0]
    assert row.price_per_minute is None and row.cost_at(at(1000)) is None

    # a vendor-confirmed cost prices a row even without a configured price
    await billed(ledger, clock, "v", start=0, end=60, billed_seconds=60.0,
                 price_per_minute=None, cost=Decimal("0.10"))
    usage = await ledger.usage(since=at(0), until=at(1000))
    assert usage.cost == Decimal("0.10") and usage.unpriced_seconds == 120.0


async def test_mixed_known_and_unknown_prices(ledger: SQLiteSessionLedger,
                                              clock: Clock) -> None:
    await billed(ledger, clock, "p", start=0, end=600, billed_seconds=600.0)
    await billed(ledger, clock, "u", start=0, end=192, billed_seconds=192.0,
                 price_per_minute=None)
    usage = await ledger.usage(since=at(0), until=at(1000))
    assert usage.sessions == 2 and usage.billed_seconds == 792.0
    assert usage.cost == Decimal("6.000000")
    assert usage.unpriced_seconds == 192.0 and not usage.cost_known


async def test_usage_filters_and_refuses_to_mix_currencies(ledger: SQLiteSessionLedger,
                                                           clock: Clock) -> None:
    await billed(ledger, clock, "usd", start=0, end=60, billed_seconds=60.0, tenant="acme")
    await billed(ledger, clock, "eur", start=0, end=120, billed_seconds=120.0, tenant="acme",
                 currency="EUR", price_per_minute=Decimal("0.50"), provider="simli")
    with pytest.raises(ConfigError, match="currency"):
        await ledger.usage(since=at(0), until=at(1000))
    eur = await ledger.usage(since=at(0), until=at(1000), currency="EUR")
    assert (eur.sessions, eur.cost, eur.currency) == (1, Decimal("1.000000"), "EUR")
    usd = await ledger.usage(since=at(0), until=at(1000), tenant="acme", provider="tavus-main")
    assert (usd.sessions, usd.cost, usd.currency) == (1, Decimal("0.600000"), "USD")
    assert (await ledger.usage(since=at(0), until=at(1000), tenant="nobody")).sessions == 0


# -- reports -----------------------------------------------------------------------------------


async def test_report_always_groups_by_currency(ledger: SQLiteSessionLedger,
                                                clock: Clock) -> None:
    await billed(ledger, clock, "a", start=0, end=600, billed_seconds=600.0)
    await billed(ledger, clock, "b", start=0, end=300, billed_seconds=300.0, currency="EUR",
                 price_per_minute=Decimal("1.00"))
    report = await ledger.report(since=at(0), until=at(1000))
    assert report.group_by == ("provider", "currency")
    assert [(r.key, r.usage.sessions, r.usage.cost) for r in report.rows] == [
        ({"provider": "tavus-main", "currency": "EUR"}, 1, Decimal("5.000000")),
        ({"provider": "tavus-main", "currency": "USD"}, 1, Decimal("6.000000")),
    ]
    assert report.since == at(0) and report.until == at(1000)
    assert report.generated_at == at(0)  # the clock's now


async def test_report_by_tenant_and_avatar(ledger: SQLiteSessionLedger, clock: Clock) -> None:
    await billed(ledger, clock, "a1", start=0, end=600, billed_seconds=600.0,
                 tenant="acme", avatar="amelia", cost=Decimal("12.50"))
    await billed(ledger, clock, "a2", start=0, end=192, billed_seconds=192.0,
                 tenant="acme", avatar="amelia", price_per_minute=None)
    await billed(ledger, clock, "g1", start=0, end=120, billed_seconds=120.0,
                 tenant="globex", avatar="bob", price_per_minute=None)
    await billed(ledger, clock, "n1", start=0, end=60, billed_seconds=60.0, avatar="bob")
    report = await ledger.report(since=at(0), until=at(1000), group_by=["tenant", "avatar"])
    assert report.group_by == ("tenant", "avatar", "currency")
    keys = [(r.key["tenant"], r.key["avatar"]) for r in report.rows]
    assert keys == [(None, "bob"), ("acme", "amelia"), ("globex", "bob")]
    acme = report.rows[1].usage
    assert acme.sessions == 2 and acme.minutes == 13.2
    assert acme.cost == Decimal("12.50") and acme.unpriced_seconds == 192.0

    text = report.to_text()
    lines = text.splitlines()
    assert lines[1].split() == ["tenant", "avatar", "currency", "sessions", "minutes", "cost"]
    assert lines[2].split() == ["-", "bob", "USD", "1", "1.00", "0.60"]
    assert lines[3].split()[:5] == ["acme", "amelia", "USD", "2", "13.20"]
    assert lines[3].endswith("12.50 + unknown for 3.2 min")
    assert lines[4].split() == ["globex", "bob", "USD", "1", "2.00", "unknown"]
    # aligned: every data line puts the sessions column at the same place
    column = lines[1].index("sessions") + len("sessions")
    assert all(line[column - 1] != " " and line[column] == " " for line in lines[2:5])


async def test_empty_report_text(ledger: SQLiteSessionLedger) -> None:
    report = await ledger.report(since=at(0), until=at(10), group_by=("plan", "currency"))
    assert report.group_by == ("plan", "currency") and report.rows == ()
    assert "(no sessions)" in report.to_text()
