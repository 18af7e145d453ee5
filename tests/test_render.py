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
from avatarkit.errors import ConfigError, ConsentOutOfScope, MediaFormatError, NoFaceError
from avatarkit.render import read_speech, render_video

from .local_engine import astronaut, portrait_file, shifted, write_video, write_wav

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


@pytest.fixture(scope="module")
def two_faces(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1280x720 picture: the 512 px portrait (a ~105 px face) on the left, the portrait
    at 360 px (a ~74 px face) at the bottom right."""
    canvas = np.full((720, 1280, 3), 40, dtype=np.uint8)
    canvas[40:552, 40:552] = astronaut()
    canvas[360:720, 920:1280] = np.asarray(
        Image.fromarray(astronaut()).resize((360, 360), Image.Resampling.LANCZOS))
    path = tmp_path_factory.mktemp("media") / "two.png"
    Image.fromarray(canvas).save(path)
    return path


@pytest.fixture(scope="module")
def small_face(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 360 px portrait in the corner of a 1920x1080 canvas: found only at full resolution."""
    canvas = np.full((1080, 1920, 3), 40, dtype=np.uint8)
    canvas[720:1080, 0:360] = np.asarray(
        Image.fromarray(astronaut()).resize((360, 360), Image.Resampling.LANCZOS))
    path = tmp_path_factory.mktemp("media") / "corner.png"
    Image.fromarray(canvas).save(path)
    return path


async def test_a_small_face_in_1080p_media_renders_at_the_media_resolution(
        small_face: Path, speech_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "corner.mp4"
    async with DemoConsent("corner") as demo:
        result = await render_video(
            avatar=small_face, audio=speech_file, out=out, consent=demo.token,
            gate=demo.gate, purpose="demo", consent_subject=demo.subject_ref,
            credentials=None, cache_dir=tmp_path / "cache", progress=False)
    assert (result.width, result.height) == (1920, 1080)
    frames, _ = decoded(out)
    assert frames[0].shape == (1080, 1920, 3)
    x0, y0, x1, y1 = result.faces.box
    assert 0 <= x0 < x1 <= 360 and 720 <= y0 < y1 <= 1080 and 65 < result.faces.size < 85
    assert result.faces.found == 1 and result.faces.describe().startswith("1 face, ")
    # the mouth moves in the small face's region: the lips differ between frames
    mouth = slice(y0 + (y1 - y0) // 2, y1), slice(x0, x1)
    spread = np.stack([f[mouth].astype(np.int16) for f in frames]).std(axis=0).mean()
    assert spread > 1.0


async def test_max_side_scales_the_render_down_on_request(
        small_face: Path, speech_file: Path, tmp_path: Path) -> None:
    async with DemoConsent("corner") as demo:
        common = dict(audio=speech_file, consent=demo.token, gate=demo.gate, purpose="demo",
                      consent_subject=demo.subject_ref, credentials=None,
                      cache_dir=tmp_path / "cache", progress=False)
        result = await render_video(avatar=small_face, out=tmp_path / "small.mp4",
                                    max_side=960, **common)  # type: ignore[arg-type]
        assert (result.width, result.height) == (960, 540)
        assert decoded(tmp_path / "small.mp4")[0][0].shape == (540, 960, 3)
        with pytest.raises(ConfigError) as refused:
            await render_video(avatar=small_face, out=tmp_path / "m.mp4", max_side=960,
                               engine="musetalk", weights=tmp_path,
                               **common)  # type: ignore[arg-type]
    assert refused.value.field == "max_side" and not (tmp_path / "m.mp4").exists()


def test_the_cli_reports_which_of_several_faces_it_animates(
        two_faces: Path, speech_file: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AVATARKIT_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("AVATARKIT_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "two.mp4"
    assert main(["render", "--avatar", str(two_faces), "--audio", str(speech_file),
                 "--out", str(out), "--demo-consent"]) == 0
    printed = capsys.readouterr().out
    assert "(1280x720," in printed
    line = next(row for row in printed.splitlines() if row.startswith("face "))
    assert "2 faces found; the largest is animated: " in line and "in the 1280x720" in line
    assert main(["render", "--avatar", str(two_faces), "--audio", str(speech_file),
                 "--out", str(tmp_path / "two.json.mp4"), "--demo-consent", "--json"]) == 0
    faces = json.loads(capsys.readouterr().out)["faces"]
    assert faces["found"] == 2 and faces["frames_with_several"] == 1
    x0, y0, x1, y1 = faces["box"]
    assert x1 < 600 and 90 < max(x1 - x0, y1 - y0) < 125  # the big face on the left


def test_cli_errors_name_the_error_type(speech_file: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AVATARKIT_STATE_DIR", str(tmp_path / "state"))
    wall = tmp_path / "wall.png"
    Image.fromarray(np.full((256, 256, 3), 200, np.uint8)).save(wall)
    assert main(["render", "--avatar", str(wall), "--audio", str(speech_file), "--out",
                 str(tmp_path / "x.mp4"), "--demo-consent"]) == 2
    assert capsys.readouterr().err.startswith("avatarkit: error: NoFaceError: no face found")
    assert main(["render", "--avatar", str(tmp_path / "none.png"), "--audio",
                 str(speech_file), "--out", str(tmp_path / "x.mp4"), "--demo-consent"]) == 2
    assert capsys.readouterr().err.startswith("avatarkit: error: ConfigError: avatar: ")
