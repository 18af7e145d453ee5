"""Metering against the emulators: billed time from the vendor's create to its confirmed end,
Decimal cost from the configured price (unknown stays unknown), UsageUpdated events, the
ledger and the usage report."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any, ClassVar

import pytest

from avatarkit import ConfigError, UsageUpdated
from avatarkit.emulators import TavusEmulator
from avatarkit.metering.ledger import SessionRow, SQLiteSessionLedger

from ..conftest import CONSENT, KitFactory, creates, tavus_toml


async def test_usage_updates_and_cost_follow_the_vendor_meter(
        make_pair_kit: KitFactory, tavus_emulator: TavusEmulator) -> None:
    async with make_pair_kit(a={"price_per_minute": "0.60"},
                             metering={"usage_interval_s": 0.1}) as kit:
        async with kit.session("amelia", consent=CONSENT, purpose="support") as s:
            await asyncio.sleep(0.45)
        usage = [e async for e in s.events() if isinstance(e, UsageUpdated)]
    assert len(usage) >= 4
    periodic, final = usage[:-1], usage[-1]
    assert not any(u.final for u in periodic) and final.final
    seconds = [u.billed_seconds for u in usage]
    assert seconds == sorted(seconds)
    (conversation,) = tavus_emulator.conversations.values()
    # counted from the create call, so never less than the vendor's own meter
    assert conversation.billed_seconds - 0.01 <= final.billed_seconds
    assert final.billed_seconds <= conversation.billed_seconds + 0.2
    expected = (Decimal(str(round(final.billed_seconds, 3))) / 60 * Decimal("0.60"))
    assert final.cost == expected.quantize(Decimal("0.000001"))
    assert final.unpriced_seconds == 0


async def test_unknown_price_stays_unknown(make_pair_kit: KitFactory) -> None:
    async with make_pair_kit(a={"price_per_minute": None}) as kit:
        async with kit.session("amelia", consent=CONSENT, purpose="support") as s:
            await asyncio.sleep(0.1)
        final = [e async for e in s.events() if isinstance(e, UsageUpdated)][-1]
        assert final.cost is None and s.cost is None
        assert final.unpriced_seconds == pytest.approx(final.billed_seconds)
        report = await kit.usage_report()
        (row,) = report.rows
        assert row.usage.cost is None and row.usage.unpriced_seconds > 0
        assert "unknown" in report.to_text()


async def test_usage_report_by_provider_tenant_and_avatar(make_pair_kit: KitFactory) -> None:
    async with make_pair_kit(a={"plan": "growth"}) as kit:
        for tenant in ("acme", "acme", "globex"):
            async with kit.session("amelia", consent=CONSENT, purpose="support",
                                   tenant=tenant):
                await asyncio.sleep(0.05)
        report = await kit.usage_report(group_by=("provider", "tenant", "avatar", "plan"))
    rows = {(r.key["tenant"], r.key["plan"]): r.usage for r in report.rows}
    assert set(rows) == {("acme", "growth"), ("globex", "growth")}
    assert rows["acme", "growth"].sessions == 2 and rows["globex", "growth"].sessions == 1
    assert all(r.key["provider"] == "tavus" and r.key["avatar"] == "amelia"
               for r in report.rows)
    assert all(u.cost is not None and u.cost > 0 for u in rows.values())
    text = report.to_text()
    assert "acme" in text and "globex" in text


async def test_the_ledger_row_exists_before_the_vendor_create(
        make_pair_kit: KitFactory, tavus_emulator: TavusEmulator) -> None:
    class Watching(SQLiteSessionLedger):
        """Notes how many creates had reached the vendor at each ledger write."""

        seen: ClassVar[list[tuple[str, int]]] = []

        async def begin(self, **fields: Any) -> SessionRow:
            Watching.seen.append(("begin", creates(tavus_emulator)))
            return await super().begin(**fields)

        async def mark_open(self, row_id: str, **fields: Any) -> SessionRow:
            Watching.seen.append(("open", creates(tavus_emulator)))
            return await super().mark_open(row_id, **fields)

    async with (Watching(":memory:") as ledger, make_pair_kit(ledger=ledger) as kit,
                kit.session("amelia", consent=CONSENT, purpose="support") as s):
        (row,) = await kit.ledger.rows(session_id=s.session_id)
        assert row.state == "open" and row.vendor_session_id == s.vendor_session_id
    assert Watching.seen == [("begin", 0), ("open", 1)]


def test_provider_sections_of_an_adapter_kind(tmp_path: Path) -> None:
    from avatarkit import KitConfig

    config = KitConfig(providers={
        "tavus": {"api_key": "k", "base_url": "http://127.0.0.1:1", "price_per_minute": "0.3"},
        "tavus-eu": {"kind": "tavus", "api_key": "k", "base_url": "http://127.0.0.1:2",
                     "plan": "enterprise", "regions": ["eu"]}})
    assert config.providers["tavus-eu"].kind == "tavus"
    with pytest.raises(ConfigError) as caught:
        KitConfig(providers={"tavus-eu": {"api_key": "k"}})
    assert caught.value.field == "providers.tavus-eu" and "kind" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        KitConfig(providers={"x": {"kind": "nope", "api_key": "k"}})
    assert caught.value.field == "providers.x.kind"


async def test_sessions_cli_lists_and_reports(tmp_path: Path,
                                              tavus_emulator: TavusEmulator) -> None:
    ledger = tmp_path / "sessions.db"
    config = tmp_path / "avatarkit.toml"
    config.write_text(tavus_toml(tavus_emulator) + """
[metering]
ledger = "sessions.db"
""")
    async with SQLiteSessionLedger(ledger) as book:
        row = await book.begin(session_id="ses_x", attempt=1, provider="tavus",
                               provider_kind="tavus", idempotency_key="avk-ses_x-1",
                               avatar="amelia", tenant="acme", price_per_minute=Decimal("0.3"))
        await book.mark_open(row.row_id, vendor_session_id="c_1",
                             billing_started_at=row.created_at)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "avatarkit.cli", "sessions", *args,
                               "--config", str(config)], capture_output=True, text=True,
                              check=False, timeout=60)

    listed = await asyncio.to_thread(cli, "list")
    assert listed.returncode == 0, listed.stderr
    assert "ses_x#1" in listed.stdout and "c_1" in listed.stdout
    usage = await asyncio.to_thread(cli, "usage", "--by", "provider,tenant")
    assert usage.returncode == 0, usage.stderr
    assert "acme" in usage.stdout and "tavus" in usage.stdout
    bad = await asyncio.to_thread(cli, "usage", "--by", "colour")
    assert bad.returncode == 2 and "--by" in bad.stderr
