"""The ``avatarkit`` command and the runnable example, as a user runs them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]


def avatarkit(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "avatarkit.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture
def emulate() -> Iterator[str]:
    proc = subprocess.Popen([sys.executable, "-m", "avatarkit.cli", "emulate", "tavus",
                             "--api-key", "cli-key"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.search(r"tavus\s+(http://127\.0\.0\.1:\d+)", line)
    try:
        assert match, f"unexpected first line: {line!r}"
        yield match.group(1)
    finally:
        proc.terminate()
        assert proc.wait(10) == 0  # SIGTERM is a clean shutdown
        proc.stdout.close()


def test_emulate_tavus_serves_and_checks_the_key(emulate: str) -> None:
    with httpx.Client(base_url=emulate) as client:
        assert client.post("/v2/conversations", json={}).status_code == 401
        bad = client.post("/v2/conversations", json={"face_id": "r1"},
                          headers={"x-api-key": "cli-key"})
        assert bad.status_code == 400 and "pal" in bad.text.lower()
        state = client.get("/_emulator/state").json()
        assert state["open_sessions"] == 0


def test_emulate_rejects_unknown_vendor() -> None:
    result = avatarkit("emulate", "hedra")
    assert result.returncode == 2
    assert "hedra" in result.stderr and "tavus" in result.stderr


def test_route_dry_run(tmp_path: Path) -> None:
    config = tmp_path / "avatarkit.toml"
    config.write_text('[providers.tavus]\napi_key = "k"\nchannel = "websocket"\n'
                      '[avatars.amelia]\ntavus = "r_amelia"\n[avatars.bob]\n')
    text = avatarkit("route", "--config", str(config), "--avatar", "amelia", "--purpose", "p")
    assert text.returncode == 0, text.stderr
    assert "-> tavus: eligible, rank 1" in text.stdout
    decision = json.loads(avatarkit("route", "--config", str(config), "--avatar", "amelia",
                                    "--json").stdout)
    assert decision["chosen"] == "tavus"
    nowhere = avatarkit("route", "--config", str(config), "--avatar", "bob")
    assert nowhere.returncode == 2
    assert "excluded by avatar_present" in nowhere.stderr
    policy = avatarkit("route", "--config", str(config), "--avatar", "amelia",
                       "--policy", "eu-strict")
    assert policy.returncode == 2 and "unknown policy" in policy.stderr


def test_route_json_names_every_provider_with_its_reason(tmp_path: Path) -> None:
    config = tmp_path / "avatarkit.toml"
    config.write_text("""
[providers.tavus]
api_key = "k"
channel = "websocket"
price_per_minute = "0.30"
regions = ["us"]
[providers.tavus-eu]
kind = "tavus"
api_key = "k"
channel = "websocket"
regions = ["eu"]
price_per_minute = "0.45"
[providers.tavus-unknown]
kind = "tavus"
api_key = "k"
channel = "websocket"
[avatars.amelia]
tavus = "r_1"
tavus-eu = "r_2"
tavus-unknown = "r_3"
[policies.eu-strict]
version = 3
residency = ["eu"]
max_price_per_minute = "0.50"
""")
    result = avatarkit("route", "--config", str(config), "--avatar", "amelia",
                       "--purpose", "support", "--policy", "eu-strict", "--json")
    assert result.returncode == 0, result.stderr
    decision = json.loads(result.stdout)
    assert (decision["policy"], decision["policy_version"]) == ("eu-strict", 3)
    by_name = {c["provider"]: c for c in decision["candidates"]}
    assert set(by_name) == {"tavus", "tavus-eu", "tavus-unknown"}
    assert by_name["tavus"]["excluded_by"] == "residency"
    assert "us" in by_name["tavus"]["reason"]
    assert by_name["tavus-unknown"]["excluded_by"] == "residency"
    assert "unknown" in by_name["tavus-unknown"]["reason"]
    assert by_name["tavus-eu"]["eligible"] and by_name["tavus-eu"]["rank"] == 1
    assert by_name["tavus-eu"]["inputs"]["price_per_minute"] == "0.45"
    assert decision["chosen"] == "tavus-eu"
    # nothing eligible: the JSON record is still printed, with a failing exit status
    config.write_text(config.read_text().replace('regions = ["eu"]', 'regions = ["us"]'))
    none = avatarkit("route", "--config", str(config), "--avatar", "amelia",
                     "--policy", "eu-strict", "--json")
    assert none.returncode == 2
    assert json.loads(none.stdout)["chosen"] is None


def test_the_demo_renders_a_verified_video_on_a_fresh_machine(tmp_path: Path) -> None:
    # a fresh machine: an empty state directory (no cached avatar, no demo signer yet)
    env = {**os.environ, "AVATARKIT_STATE_DIR": str(tmp_path / "state")}
    out = tmp_path / "demo.mp4"
    result = subprocess.run([sys.executable, "-m", "avatarkit.cli", "demo", "--out", str(out)],
                            capture_output=True, text=True, timeout=180, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    text = result.stdout
    for expected in ("-> local: eligible, rank 1", "chosen: local",
                     "engine     lite: no MuseTalk weights configured",
                     "verdict: AI-GENERATED (signals: c2pa, watermark, generation-log)",
                     "trusted signer; says AI-generated", "the signals present agree"):
        assert expected in text, expected
    latency = re.search(r"first frame (\d+) ms after the first audio chunk; ([\d.]+) fps", text)
    assert latency and 0 < int(latency.group(1)) < 2000 and float(latency.group(2)) > 10
    assert out.is_file()
    # the printed command verifies it again, from the files the demo left
    again = re.search(r"again\s+avatarkit (verify .+)", text)
    assert again
    check = subprocess.run([sys.executable, "-m", "avatarkit.cli", *again.group(1).split()],
                           capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert check.returncode == 0 and "signals: c2pa, watermark, generation-log" in check.stdout


def test_the_live_demo_serves_the_viewer_page(tmp_path: Path) -> None:
    env = {**os.environ, "AVATARKIT_STATE_DIR": str(tmp_path / "state")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "avatarkit.cli", "demo", "--out", str(tmp_path / "demo.mp4"),
         "--live", "--port", "0", "--live-seconds", "6"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=tmp_path, env=env)
    assert proc.stdout is not None
    try:
        viewer = None
        for line in proc.stdout:
            found = re.search(r"open (http://127\.0\.0\.1:\d+/viewer/\S+) in a browser", line)
            if found:
                viewer = found.group(1)
                break
        assert viewer, "the live demo printed no viewer URL"
        page = httpx.get(viewer, timeout=10)
        assert page.status_code == 200 and "avatarkitViewer" in page.text
        config = httpx.get(viewer + "/config.json", timeout=10).json()
        assert config["whep_url"].startswith("/whep/") and config["disclosure_notice"].count(
            ".") == 2
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def test_vendor_emulator_demo_runs_end_to_end() -> None:
    result = avatarkit("demo", "--vendor-emulator")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for expected in ("consent    cns_", "-> tavus", "signed notice verified", "session_started",
                     "speech_started", "speech_ended", "interrupted", "consent_revoked",
                     "reason=consent_revoked", "refused    a new session with the same token: "
                     "revoked", "session_started", "status_check", "closed", "billed",
                     "0 open sessions"):
        assert expected in out, expected
    billed = re.search(r"billed\s+([\d.]+) s", out)
    assert billed and float(billed.group(1)) > 1.0


def test_quickstart_example_runs() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "speech_ended" in result.stdout
    assert "emulator open sessions: 0" in result.stdout
