"""The session ledger and reaper: a process killed with SIGKILL mid-session leaves a ledger row;
``avatarkit sessions reap`` ends its vendor session and the emulator's open count returns to 0."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import httpx

from avatarkit.consent.authority import ConsentAuthority
from avatarkit.emulators import TavusEmulator
from avatarkit.metering.ledger import ProcessIdentity, SQLiteSessionLedger

from ..conftest import API_KEY, AUDIENCE, CONSENT, ECHO_PAL, FACE, ISSUER, KitFactory, tavus_toml

SESSION_SCRIPT = """
import asyncio, sys
from avatarkit import AvatarKit

async def main() -> None:
    async with AvatarKit.from_config(sys.argv[1]) as kit:
        session = kit.session("amelia", consent=sys.argv[2], purpose="support")
        await session.start()
        print("LIVE", session.vendor_session_id, flush=True)
        await asyncio.sleep(3600)

asyncio.run(main())
"""


async def write_config(tmp_path: Path, emulator: TavusEmulator,
                       authority: ConsentAuthority) -> Path:
    (tmp_path / "jwks.json").write_text(json.dumps(authority.jwks()))
    (tmp_path / "status.jwt").write_text(await authority.publish())
    config = tmp_path / "avatarkit.toml"
    config.write_text(tavus_toml(
        # a viewer may reconnect: the conversation outlives our channel (and keeps billing)
        emulator, "properties = { participant_left_timeout = 600 }") + f"""
[consent]
audience = "{AUDIENCE}"
issuers = ["{ISSUER}"]
jwks = "jwks.json"
status_lists = {{ "{authority.status_uri}" = "status.jwt" }}

[metering]
ledger = "sessions.db"
""")
    return config


async def test_reap_ends_the_session_of_a_process_killed_with_sigkill(
        tmp_path: Path, tavus_emulator: TavusEmulator,
        consent_authority: ConsentAuthority) -> None:
    config = await write_config(tmp_path, tavus_emulator, consent_authority)
    script = tmp_path / "session.py"
    script.write_text(SESSION_SCRIPT)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), str(config), CONSENT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=30)
        if not line.startswith(b"LIVE"):
            _, err = await proc.communicate()
            raise AssertionError(f"the session process failed: {line!r} {err.decode()}")
        conversation_id = line.split()[1].decode()
        assert tavus_emulator.open_sessions == 1
        proc.kill()  # SIGKILL: no cleanup of any kind runs in the child
        await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert tavus_emulator.open_sessions == 1  # still billed at the vendor

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "avatarkit.cli", "sessions", *args,
                               "--config", str(config), "--json"],
                              capture_output=True, text=True, check=False, timeout=60)

    listed = await asyncio.to_thread(cli, "list")
    assert listed.returncode == 0, listed.stderr
    (row,) = json.loads(listed.stdout)
    assert row["state"] == "open" and row["vendor_session_id"] == conversation_id

    reaped = await asyncio.to_thread(cli, "reap")
    assert reaped.returncode == 0, reaped.stderr
    (outcome,) = json.loads(reaped.stdout)
    assert outcome["action"] == "ended" and outcome["vendor_session_id"] == conversation_id
    assert tavus_emulator.open_sessions == 0
    assert tavus_emulator.conversations[conversation_id].status == "ended"

    async with SQLiteSessionLedger(tmp_path / "sessions.db") as ledger:
        (ended,) = await ledger.rows()
    assert ended.state == "ended" and (ended.end_reason or "").startswith("reaped")
    assert ended.billed_seconds is not None and ended.billed_seconds > 0

    again = await asyncio.to_thread(cli, "reap")  # nothing left: idempotent
    assert json.loads(again.stdout) == []


async def test_reap_finds_a_session_created_just_before_the_owner_died(
        make_kit: KitFactory, tavus_emulator: TavusEmulator) -> None:
    dead = await dead_process()
    kit = make_kit()
    async with kit:
        ledger = kit.ledger
        # the owner wrote its row, sent the create and died before recording the answer
        found = await ledger.begin(session_id="ses_found", attempt=1, provider="tavus",
                                   provider_kind="tavus", idempotency_key="avk-ses_found-1",
                                   avatar="amelia", owner=dead)
        async with httpx.AsyncClient(base_url=tavus_emulator.url,
                                     headers={"x-api-key": API_KEY}) as http:
            created = (await http.post("/v2/conversations", json={
                "pal_id": ECHO_PAL, "face_id": FACE,
                "conversation_name": "avatarkit avk-ses_found-1"})).json()
        # this one died before the create reached the vendor
        never = await ledger.begin(session_id="ses_never", attempt=1, provider="tavus",
                                   provider_kind="tavus", idempotency_key="avk-ses_never-1",
                                   avatar="amelia", owner=dead)
        # and a live process's row is none of the reaper's business
        mine = await ledger.begin(session_id="ses_mine", attempt=1, provider="tavus",
                                  provider_kind="tavus", idempotency_key="avk-ses_mine-1",
                                  avatar="amelia")
        outcomes = {o.row.row_id: o for o in await kit.reap()}
        assert set(outcomes) == {found.row_id, never.row_id}
        assert outcomes[found.row_id].action == "ended"
        assert outcomes[found.row_id].vendor_session_id == created["conversation_id"]
        assert outcomes[never.row_id].action == "abandoned"
        assert (await ledger.get(never.row_id)).state == "abandoned"
        assert (await ledger.get(mine.row_id)).state == "creating"
        await ledger.mark_failed(mine.row_id, reason="test cleanup")
    assert tavus_emulator.open_sessions == 0


async def dead_process() -> ProcessIdentity:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c",
                                                "import time; time.sleep(60)")
    identity = ProcessIdentity.of(proc.pid)
    proc.kill()
    await proc.wait()
    return identity
