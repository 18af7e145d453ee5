"""``avatarkit consent``: keygen -> issue -> verify -> revoke -> publish -> verify refused.

Driven through ``avatarkit.cli.main`` (which mounts ``avatarkit.cli.consent.add_parser``), plus
one run as a separate process.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import stat
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from avatarkit.cli import consent as consent_command
from avatarkit.cli import main
from avatarkit.consent.grant import (
    ConsentEvidence,
    ConsentGrant,
    Grantor,
    LikenessSubject,
    StatusReference,
)
from avatarkit.consent.keys import IssuerKey, KeySet

ISSUER = "https://registry.example"
AUDIENCE = "deploy-eu-1"
URI = "https://registry.example/status/7"
DISPLAY_NAME = "Amelia Quartermaine-Example"


def write_grant(path: Path, *, idx: int = 3) -> ConsentGrant:
    now = datetime.now(UTC)
    grant = ConsentGrant(
        subject=LikenessSubject(subject_ref="subj_1", display_name=DISPLAY_NAME),
        grantor=Grantor(grantor_ref="subj_1"), avatars=["amelia"],
        purposes=["training_video"], valid_from=now - timedelta(days=1),
        expires_at=now + timedelta(days=30),
        evidence=ConsentEvidence(recording_sha256="cd" * 32, storage_ref="vault://r/1",
                                 challenge_phrase="amber falcon ninety"),
        issuer=ISSUER, status=StatusReference(uri=URI, idx=idx))
    path.write_text(grant.model_dump_json())
    return grant


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["consent", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def verify_args(tmp: Path, token: str, *extra: str) -> list[str]:
    return ["verify", "--jwks", str(tmp / "jwks.json"), "--issuer", ISSUER,
            "--audience", AUDIENCE, "--status-list", str(tmp / "list.jwt"), *extra, token]


def test_full_cycle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    t = tmp_path
    code, out, _ = run(capsys, "keygen", "--out", str(t / "key.json"),
                       "--jwks", str(t / "jwks.json"))
    assert code == 0
    kid = out.strip()
    assert stat.S_IMODE(os.stat(t / "key.json").st_mode) == 0o600
    assert KeySet.load(t / "jwks.json").kids == (kid,)
    private_d = IssuerKey.load(t / "key.json").private_jwk()["d"]
    assert private_d not in out and private_d not in (t / "jwks.json").read_text()

    assert run(capsys, "init-list", "--list", str(t / "list.json"), "--uri", URI,
               "--size", "64")[0] == 0
    assert run(capsys, "publish", "--list", str(t / "list.json"), "--key", str(t / "key.json"),
               "--out", str(t / "list.jwt"))[0] == 0

    grant = write_grant(t / "grant.json")
    code, out, err = run(capsys, "issue", "--key", str(t / "key.json"), "--grant",
                         str(t / "grant.json"), "--audience", AUDIENCE)
    assert code == 0, err
    token = out.strip()
    assert out == token + "\n" and token.count(".") == 2  # nothing else on stdout

    code, out, err = run(capsys, *verify_args(t, token, "--avatar", "amelia",
                                              "--purpose", "training_video"))
    assert code == 0, err
    verified = json.loads(out)
    assert verified["consent_id"] == grant.consent_id
    assert verified["status"] == "valid"
    assert verified["record_hash"] == grant.record_hash()
    assert token not in out and token.split(".")[1] not in out
    assert DISPLAY_NAME not in out

    code, out, _ = run(capsys, "revoke", "--list", str(t / "list.json"), "--idx", "3")
    assert code == 0 and "revoked" in out
    assert run(capsys, "status", "--list", str(t / "list.json"), "--idx", "3")[1] == \
        "3: revoked\n"

    # not yet published: verifiers still see the old signed list
    assert run(capsys, *verify_args(t, token))[0] == 0

    assert run(capsys, "publish", "--list", str(t / "list.json"), "--key", str(t / "key.json"),
               "--out", str(t / "list.jwt"))[0] == 0
    code, out, err = run(capsys, *verify_args(t, token))
    assert code == 3
    assert out == ""
    assert err.startswith("refused: revoked: ")
    assert token not in err

    code, _, err = run(capsys, "reinstate", "--list", str(t / "list.json"), "--idx", "3")
    assert code == 2 and "final" in err
    assert run(capsys, "status", "--list", str(t / "list.json"), "--idx", "3")[1] == \
        "3: revoked\n"


def test_suspend_and_reinstate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lst = str(tmp_path / "list.json")
    run(capsys, "init-list", "--list", lst, "--uri", URI, "--size", "8")
    assert run(capsys, "suspend", "--list", lst, "--idx", "5")[0] == 0
    assert run(capsys, "status", "--list", lst, "--idx", "5")[1] == "5: suspended\n"
    assert run(capsys, "reinstate", "--list", lst, "--idx", "5")[0] == 0
    code, out, _ = run(capsys, "status", "--list", lst)
    assert json.loads(out)["counts"] == {"valid": 8}
    code, _, err = run(capsys, "revoke", "--list", lst, "--idx", "8")
    assert code == 2 and "outside" in err
    code, _, err = run(capsys, "init-list", "--list", lst, "--uri", URI)
    assert code == 2 and "never re-initialised" in err


def test_rotation_refusals_and_stdin(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    t = tmp_path
    run(capsys, "keygen", "--out", str(t / "old.json"), "--jwks", str(t / "jwks.json"))
    code, _, err = run(capsys, "keygen", "--out", str(t / "old.json"))
    assert code == 2 and "--force" in err
    run(capsys, "keygen", "--out", str(t / "new.json"), "--jwks", str(t / "jwks.json"))
    assert len(KeySet.load(t / "jwks.json")) == 2  # rotation keeps the old kid
    run(capsys, "init-list", "--list", str(t / "list.json"), "--uri", URI, "--size", "16")
    run(capsys, "publish", "--list", str(t / "list.json"), "--key", str(t / "new.json"),
        "--out", str(t / "list.jwt"))
    write_grant(t / "grant.json")
    token = run(capsys, "issue", "--key", str(t / "old.json"), "--grant",
                str(t / "grant.json"), "--audience", AUDIENCE, "--single-use")[1].strip()

    monkeypatch.setattr(sys, "stdin", io.StringIO(token + "\n"))
    code, out, err = run(capsys, *verify_args(t, "-"))
    assert code == 3 and err.startswith("refused: replay: ")  # single use, no guard

    token = run(capsys, "issue", "--key", str(t / "old.json"), "--grant",
                str(t / "grant.json"), "--audience", AUDIENCE)[1].strip()
    assert run(capsys, *verify_args(t, token))[0] == 0
    code, _, err = run(capsys, *verify_args(t, token, "--avatar", "bob",
                                            "--purpose", "training_video"))
    assert code == 3 and err.startswith("refused: avatar: ")
    code, _, err = run(capsys, "verify", "--jwks", str(t / "jwks.json"), "--issuer", ISSUER,
                       "--audience", "someone-else", "--no-status", token)
    assert code == 3 and err.startswith("refused: audience: ")
    code, out, _ = run(capsys, "verify", "--jwks", str(t / "jwks.json"), "--issuer", ISSUER,
                       "--audience", AUDIENCE, "--no-status", token)
    assert code == 0 and json.loads(out)["status"] is None
    code, _, err = run(capsys, *verify_args(t, "not-a-token"))
    assert code == 3 and err.startswith("refused: malformed: ")

    code, _, err = run(capsys, "issue", "--key", str(t / "old.json"), "--grant",
                       str(t / "grant.json"), "--audience", AUDIENCE,
                       "--expires-at", "2099-01-01T00:00:00+00:00")
    assert code == 2 and "outlive" in err


def test_bad_grant_file_does_not_echo_personal_data(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "keygen", "--out", str(tmp_path / "key.json"))
    data = json.loads(write_grant(tmp_path / "grant.json").model_dump_json())
    data["avatars"] = []
    (tmp_path / "grant.json").write_text(json.dumps(data))
    code, out, err = run(capsys, "issue", "--key", str(tmp_path / "key.json"), "--grant",
                         str(tmp_path / "grant.json"), "--audience", AUDIENCE)
    assert code == 2 and out == ""
    assert "avatars" in err and DISPLAY_NAME not in err


def test_mounts_on_another_parser(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="avatarkit")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo")
    consent_command.add_parser(sub)
    args = parser.parse_args(["consent", "keygen", "--out", str(tmp_path / "k.json")])
    assert args.command == "consent"
    assert args.run is consent_command.run
    assert args.run(args) == 0
    assert IssuerKey.load(tmp_path / "k.json").kid == capsys.readouterr().out.strip()


def test_runs_as_the_avatarkit_command(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    result = subprocess.run(
        [sys.executable, "-m", "avatarkit.cli",
         "consent", "keygen", "--out", str(tmp_path / "k.json")],
        capture_output=True, text=True, env=env, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == IssuerKey.load(tmp_path / "k.json").kid


def test_verify_with_two_issuers_pins_a_key_set_for_each(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    t = tmp_path
    partner = "https://partner.example"
    for name in ("a", "b"):
        assert run(capsys, "keygen", "--out", str(t / f"{name}.json"),
                   "--jwks", str(t / f"{name}.jwks.json"))[0] == 0
    assert run(capsys, "init-list", "--list", str(t / "list.json"), "--uri", URI,
               "--size", "64")[0] == 0
    assert run(capsys, "publish", "--list", str(t / "list.json"), "--key", str(t / "a.json"),
               "--out", str(t / "list.jwt"), "--issuer", ISSUER)[0] == 0
    write_grant(t / "grant.json")
    token = {}
    for name in ("a", "b"):  # the same grant (iss = ISSUER) signed by each key
        code, out, err = run(capsys, "issue", "--key", str(t / f"{name}.json"), "--grant",
                             str(t / "grant.json"), "--audience", AUDIENCE)
        assert code == 0, err
        token[name] = out.strip()
    both = ["--issuer", ISSUER, "--issuer", partner,
            "--jwks", f"{ISSUER}={t / 'a.jwks.json'}", "--jwks", f"{partner}={t / 'b.jwks.json'}",
            "--audience", AUDIENCE, "--status-list", str(t / "list.jwt")]
    code, out, err = run(capsys, "verify", *both, token["a"])
    assert code == 0, err
    code, out, err = run(capsys, "verify", *both, token["b"])  # B's key, A's name
    assert code == 3 and err.startswith("refused: key: "), err
    # one plain JWKS for two issuers is refused outright
    code, _, err = run(capsys, "verify", "--issuer", ISSUER, "--issuer", partner, "--jwks",
                       str(t / "a.jwks.json"), "--audience", AUDIENCE, "--no-status", token["a"])
    assert code == 2 and "ISS=JWKS" in err
