"""Offline renders: consent first, a still or a video avatar, a disclosed MP4 that
``avatarkit verify`` reports as labelled, watermarked, C2PA-signed and logged."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from avatarkit.cli import main
from avatarkit.consent.demo import DemoConsent
from avatarkit.consent.store import SQLiteConsentStore
from avatarkit.disclosure.certs import generate_signing_credentials
from avatarkit.disclosure.label import FrameLabeler
from avatarkit.disclosure.verify import verify_media
from avatarkit.errors import ConsentOutOfScope, MediaFormatError, NoFaceError
from avatarkit.local_engine.render import read_speech, render_video

from . import astronaut, portrait_file, shifted, write_video, write_wav

RATE = 16_000


@pytest.fixture(scope="module")
def portrait(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return portrait_file(tmp_path_factory.mktemp("media"))


@pytest.fixture(scope="module")
def speech_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_wav(tmp_path_factory.mktemp("speech") / "speech.wav", 2.0, rate=22_050)


@pytest.fixture(scope="module")
def signer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("signer")
    generate_signing_credentials(directory)
    return directory


def decoded(path: Path) -> tuple[list[np.ndarray], float]:
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    with av.open(str(path)) as container:
        audio = container.streams.audio[0]
        assert audio.duration is not None and audio.time_base is not None
        seconds = float(audio.duration * audio.time_base)
    return frames, seconds


def test_read_speech_converts_any_rate_to_mono_16k(speech_file: Path, tmp_path: Path) -> None:
    chunks = read_speech(speech_file)
    assert all(c.sample_rate == RATE and c.channels == 1 for c in chunks)
    assert sum(c.num_frames for c in chunks) == pytest.approx(2.0 * RATE, abs=40)
    with pytest.raises(MediaFormatError) as missing:
        read_speech(tmp_path / "nope.wav")
    assert missing.value.field == "audio"
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"RIFF not really")
    with pytest.raises(MediaFormatError):
        read_speech(garbage)


async def test_a_still_avatar_renders_to_a_fully_disclosed_mp4(
        portrait: Path, speech_file: Path, signer: Path, tmp_path: Path) -> None:
    from avatarkit.disclosure.certs import SigningCredentials

    out = tmp_path / "still.mp4"
    async with DemoConsent("amelia") as demo:
        result = await render_video(
            avatar=portrait, audio=speech_file, out=out, consent=demo.token, gate=demo.gate,
            purpose="demo", avatar_name="amelia", consent_subject=demo.subject_ref,
            credentials=SigningCredentials.load(signer), cache_dir=tmp_path / "cache",
            progress=False)
        report = await verify_media(out, trust_anchors_pem=(signer / "root.pem").read_text(),
                                    store=demo.authority.store)
    assert result.frames == 50 and result.fps == 25 and (result.width, result.height) == (512,
                                                                                           512)
    assert result.engine.name == "lite" and result.signed
    assert report.signals == ["c2pa", "watermark", "generation-log"] and report.consistent
    assert report.manifest.state == "trusted"
    assert report.manifest.consent_id == demo.consent_id
    assert report.watermark.payload == result.watermark_payload
    frames, audio_seconds = decoded(out)
    assert len(frames) == 50
    assert audio_seconds == pytest.approx(2.0, abs=0.1)
    # the label is burned in, and the mouth moves with the speech
    y0, y1, x0, x1 = FrameLabeler().region(frames[0].shape)
    source = astronaut()
    assert np.abs(frames[0][y0:y1, x0:x1].astype(int) - source[y0:y1, x0:x1]).mean() > 20
    motion = [np.abs(f.astype(int) - frames[0].astype(int)).max() for f in frames]
    assert max(motion) > 60


async def test_a_video_avatar_renders_with_its_motion(
        speech_file: Path, signer: Path, tmp_path: Path) -> None:
    from avatarkit.disclosure.certs import SigningCredentials

    base = astronaut()
    clip = write_video(tmp_path / "sway.mp4",
                       [shifted(base, 3 * np.sin(i / 4), 2 * np.cos(i / 5)) for i in range(30)])
    out = tmp_path / "video.mp4"
    async with DemoConsent("sway") as demo:
        result = await render_video(
            avatar=clip, audio=speech_file, out=out, consent=demo.token, gate=demo.gate,
            purpose="demo", consent_subject=demo.subject_ref,
            credentials=SigningCredentials.load(signer), cache_dir=tmp_path / "cache",
            progress=False)
    assert result.frames == 50
    frames, _ = decoded(out)
    # source frames cycle forward then back: frame 29 and 31 are the same source frame
    assert np.abs(frames[0].astype(int) - frames[10].astype(int)).mean() > 1
    assert np.abs(frames[27].astype(int) - frames[31].astype(int))[:100].mean() < 2


async def test_consent_is_checked_before_anything_is_rendered(
        portrait: Path, speech_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "refused.mp4"
    async with DemoConsent("someone-else") as demo:
        with pytest.raises(ConsentOutOfScope):
            await render_video(avatar=portrait, audio=speech_file, out=out, consent=demo.token,
                               gate=demo.gate, purpose="demo", avatar_name="amelia",
                               credentials=None, progress=False)
        outputs = [r for r in await demo.authority.store.generations(demo.consent_id)
                   if r.kind == "output"]
    assert not out.exists() and outputs == []


async def test_media_without_a_face_is_a_typed_error_and_writes_nothing(
        speech_file: Path, tmp_path: Path) -> None:
    wall = tmp_path / "wall.png"
    Image.fromarray(np.full((256, 256, 3), 200, np.uint8)).save(wall)
    out = tmp_path / "wall.mp4"
    async with DemoConsent("wall") as demo:
        with pytest.raises(NoFaceError):
            await render_video(avatar=wall, audio=speech_file, out=out, consent=demo.token,
                               gate=demo.gate, purpose="demo", consent_subject=demo.subject_ref,
                               credentials=None, cache_dir=tmp_path / "cache", progress=False)
    assert not out.exists()


def test_the_cli_renders_with_a_demo_consent_and_verify_agrees(
        portrait: Path, speech_file: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AVATARKIT_STATE_DIR", str(tmp_path / "state"))
    out = tmp_path / "cli.mp4"
    assert main(["render", "--avatar", str(portrait), "--audio", str(speech_file),
                 "--out", str(out), "--demo-consent", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["frames"] == 50 and result["signed"] and result["engine"] == "lite"
    verify = result["verify"].split()
    assert verify[:3] == ["avatarkit", "verify", str(out)]
    assert main([*verify[1:], "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["signals"] == ["c2pa", "watermark", "generation-log"]
    assert report["manifest"]["state"] == "trusted"
    # an existing output is refused without --overwrite
    assert main(["render", "--avatar", str(portrait), "--audio", str(speech_file),
                 "--out", str(out), "--demo-consent"]) == 2
    assert "exists" in capsys.readouterr().err


@pytest.mark.parametrize(("extra", "message"), [
    (["--consent", "a.b.c"], "--config"),
    (["--consent", "env:AVATARKIT_TEST_NO_SUCH_VAR", "--config", "{config}",
      "--purpose", "x"], "AVATARKIT_TEST_NO_SUCH_VAR"),
    (["--demo-consent", "--engine", "musetalk"], "--weights"),
])
def test_cli_errors_are_clear(portrait: Path, speech_file: Path, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str], extra: list[str],
                              message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AVATARKIT_STATE_DIR", str(tmp_path / "state"))
    config = tmp_path / "avatarkit.toml"
    config.write_text('[consent]\naudience = "a"\nissuers = ["https://i"]\n'
                      'jwks = { keys = [] }\n')
    args = [a.replace("{config}", str(config)) for a in extra]
    code = main(["render", "--avatar", str(portrait), "--audio", str(speech_file), "--out",
                 str(tmp_path / "x.mp4"), "--unsigned", *args])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.mp4").exists()


async def test_the_generation_log_records_the_output(portrait: Path, speech_file: Path,
                                                     tmp_path: Path) -> None:
    store = SQLiteConsentStore(tmp_path / "consent.db")
    async with DemoConsent("amelia", store=store) as demo:
        result = await render_video(
            avatar=portrait, audio=speech_file, out=tmp_path / "logged.mp4",
            consent=demo.token, gate=demo.gate, purpose="demo", avatar_name="amelia",
            consent_subject=demo.subject_ref, credentials=None, cache_dir=tmp_path / "cache",
            progress=False)
        records = await store.generations(demo.consent_id)
    kinds = [r.kind for r in records if r.generation_id == result.generation_id]
    assert "output" in kinds
    output = next(r for r in records if r.kind == "output")
    assert output.output_sha256 == [result.sha256]
