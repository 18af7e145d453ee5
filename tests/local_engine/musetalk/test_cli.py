"""The command line with MuseTalk: `avatarkit render --engine musetalk --weights DIR`, the demo
picking MuseTalk when weights are given, and `avatarkit weights check` on the same folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from avatarkit.cli import main

from .. import portrait_file, write_wav
from .weights_folder import write_tiny_weights


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("weights")
    write_tiny_weights(root, version="v1.5", seed=11)
    return root


def test_render_with_musetalk_writes_a_verified_video(
        weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AVATARKIT_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("AVATARKIT_CACHE_DIR", str(tmp_path / "cache"))
    portrait = portrait_file(tmp_path)
    speech = write_wav(tmp_path / "speech.wav", 1.2, rate=22_050)
    out = tmp_path / "musetalk.mp4"
    assert main(["weights", "check", str(weights)]) == 0
    capsys.readouterr()
    assert main(["render", "--avatar", str(portrait), "--audio", str(speech), "--out",
                 str(out), "--engine", "musetalk", "--weights", str(weights),
                 "--batch-size", "6", "--demo-consent", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["engine"] == "musetalk" and result["frames"] == 30 and result["signed"]
    assert (result["width"], result["height"]) == (512, 512)
    verify = result["verify"].split()
    assert main([*verify[1:], "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["signals"] == ["c2pa", "watermark", "generation-log"]
    # the prepared MuseTalk material was cached next to the avatar cache
    assert list((tmp_path / "cache" / "avatars" / "musetalk").glob("*.npz"))


def test_render_refuses_a_broken_weights_folder_before_writing(
        weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AVATARKIT_STATE_DIR", str(tmp_path / "state"))
    broken = tmp_path / "broken"
    broken.mkdir()
    for child in weights.iterdir():
        if child.name != "whisper":
            (broken / child.name).symlink_to(child)
    out = tmp_path / "x.mp4"
    code = main(["render", "--avatar", str(portrait_file(tmp_path)), "--audio",
                 str(write_wav(tmp_path / "s.wav", 0.5)), "--out", str(out), "--engine",
                 "musetalk", "--weights", str(broken), "--demo-consent"])
    assert code == 2
    assert "whisper" in capsys.readouterr().err
    assert not out.exists()


def test_the_demo_picks_musetalk_when_weights_are_given(weights: Path, tmp_path: Path) -> None:
    env = {**os.environ, "AVATARKIT_STATE_DIR": str(tmp_path / "state")}
    out = tmp_path / "demo.mp4"
    result = subprocess.run(
        [sys.executable, "-m", "avatarkit.cli", "demo", "--out", str(out), "--weights",
         str(weights)], capture_output=True, text=True, timeout=400, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"engine     musetalk: MuseTalk weights configured at {weights}" in result.stdout
    assert "verdict: AI-GENERATED (signals: c2pa, watermark, generation-log)" in result.stdout
    assert out.is_file()
