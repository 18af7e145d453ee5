"""The disclosed recorder and the ``verify`` detector, end to end.

One 2-second 512x512 recording (astronaut portrait panning a few pixels a frame, 16 kHz audio
resampled to a 48 kHz AAC track) is made with real C2PA credentials and an in-memory consent
store, then put through what happens to media in the wild: read as is, re-encoded without its
metadata, and corrupted by one byte. Each time the detector must say which disclosure signals
survived. Smaller recordings cover the switches (label off, watermark off, unsigned) and the
cases that must publish nothing (no frames, an exception, a failed write).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import shutil
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import pytest_asyncio
from numpy.typing import NDArray
from skimage import data

from avatarkit.cli import disclosure as disclosure_command
from avatarkit.cli import main
from avatarkit.cli.disclosure import run_disclosure, run_verify
from avatarkit.consent.store import SQLiteConsentStore
from avatarkit.disclosure.c2pa import ConsentAssertion, read_manifest
from avatarkit.disclosure.certs import SigningCredentials, generate_signing_credentials
from avatarkit.disclosure.label import FrameLabeler, LabelConfig
from avatarkit.disclosure.metadata import DisclosureMetadata
from avatarkit.disclosure.verify import VerificationReport, verify_media
from avatarkit.disclosure.watermark import WATERMARK_ALG, FrameWatermarker, payload_for
from avatarkit.errors import ConfigError, MediaFormatError, SessionStateError
from avatarkit.media import AudioChunk, VideoFrame
from avatarkit.transport.recorder import DisclosedRecorder, RecordingResult

Frame = NDArray[np.uint8]

GEN = "gen_2026_11_21_rec_0001"
CONSENT_ID = "cns_01J9Z8Q4T7XYZ"
TOKEN_SHA = "a" * 64
ALL_SIGNALS = ["c2pa", "watermark", "generation-log"]
module_loop = pytest.mark.asyncio(loop_scope="module")


@cache
def photo(name: str) -> Frame:
    """An RGB photograph bundled with scikit-image ("astronaut", "coffee"), read-only."""
    image = np.asarray(getattr(data, name)(), dtype=np.uint8)
    image.flags.writeable = False
    return image


def astronaut(shift: int = 0, size: int = 512) -> Frame:
    """The portrait, moved ``shift`` px to the right (wrapping), so consecutive frames differ
    the way a slowly panning camera makes them."""
    image = photo("astronaut")[:size, :size]
    return np.ascontiguousarray(np.roll(image, shift, axis=1))


def disclosure(generation_id: str = GEN, **overrides: object) -> DisclosureMetadata:
    fields: dict[str, object] = {
        "generation_id": generation_id, "provider": "local", "avatar": "amelia",
        "consent_id": CONSENT_ID, "consent_token_sha256": TOKEN_SHA,
        "label_policy": "burned-in"}
    fields.update(overrides)
    return DisclosureMetadata.model_validate(fields)


def consent_for(generation_id: str = GEN) -> ConsentAssertion:
    return ConsentAssertion(
        consent_id=CONSENT_ID, issuer="https://consent.example.com", token_sha256=TOKEN_SHA,
        record_hash="b" * 64, status_uri="https://consent.example.com/status/1",
        status_idx=7, purpose="support", channel="recorded", generation_id=generation_id)


def tone(seconds: float, rate: int, start: int = 0) -> AudioChunk:
    t = np.arange(start, start + round(seconds * rate)) / rate
    return AudioChunk.from_float(0.2 * np.sin(2 * np.pi * 440 * t), sample_rate=rate)


def decoded_frames(path: Path) -> list[Frame]:
    with av.open(str(path)) as container:
        return [np.asarray(f.to_ndarray(format="rgb24"), dtype=np.uint8)
                for f in container.decode(video=0)]


def reencode(src: Path, dst: Path, *, crf: int = 28) -> Path:
    """Decode every frame and encode them afresh into a new container: what an upload
    pipeline does. Nothing but pixels is carried over (no metadata, no manifest)."""
    frames = decoded_frames(src)
    with av.open(str(dst), "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=25, options={"crf": str(crf)})
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], \
            "yuv420p"
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return dst


def plain_mp4(path: Path, *, frames: int = 25) -> Path:
    """An ordinary camera-like clip with no disclosure layer at all."""
    coffee = photo("coffee")  # 400 x 600
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=25, options={"crf": "23"})
        stream.width, stream.height, stream.pix_fmt = 600, 400, "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(np.roll(coffee, 2 * i, 1)),
                                               format="rgb24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


def flip_mdat_byte(path: Path) -> Path:
    """Invert the byte in the middle of the media data (``mdat``), in place."""
    raw = bytearray(path.read_bytes())
    start, end = mdat_range(bytes(raw))
    raw[(start + end) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    return path


def mdat_range(raw: bytes) -> tuple[int, int]:
    """(start, end) of the payload of the top-level ``mdat`` box."""
    offset = 0
    while offset < len(raw):
        size = int.from_bytes(raw[offset:offset + 4], "big")
        kind = raw[offset + 4:offset + 8]
        header = 8
        if size == 1:
            size, header = int.from_bytes(raw[offset + 8:offset + 16], "big"), 16
        if kind == b"mdat":
            return offset + header, offset + size
        offset += size
    raise AssertionError("no mdat box")


def region_error(frame: Frame, reference: Frame, region: tuple[int, int, int, int]) -> float:
    y0, y1, x0, x1 = region
    a = frame[y0:y1, x0:x1].astype(np.float64)
    b = reference[y0:y1, x0:x1].astype(np.float64)
    return float(np.abs(a - b).mean())


def files_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def verify_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="avatarkit")
    disclosure_command.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser


async def record(path: Path, *, frames: int = 10, size: int = 256,
                 generation_id: str = "gen_small", **kwargs: Any) -> RecordingResult | None:
    """A short recording with the given switches (defaults: labelled, watermarked)."""
    options: dict[str, Any] = {"disclosure": disclosure(generation_id), "credentials": None}
    options.update(kwargs)
    recorder = DisclosedRecorder(path, width=size, height=size, **options)
    async with recorder:
        for i in range(frames):
            await recorder.write_frame(astronaut(3 * i, size))
    return recorder.result


# -- the main recording ------------------------------------------------------------------------


@dataclass(frozen=True)
class Recorded:
    path: Path
    result: RecordingResult
    store: SQLiteConsentStore
    credentials: SigningCredentials
    root_pem: str
    workdir: Path


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def recorded(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Recorded]:
    workdir = tmp_path_factory.mktemp("recording")
    credentials = generate_signing_credentials(tmp_path_factory.mktemp("creds"))
    path = workdir / "amelia.mp4"
    async with SQLiteConsentStore(":memory:") as store:
        async with DisclosedRecorder(
                path, width=512, height=512, fps=25, audio_sample_rate=48_000,
                disclosure=disclosure(), credentials=credentials, consent=consent_for(),
                store=store) as recorder:
            for i in range(50):
                await recorder.write_frame(VideoFrame(astronaut(3 * i), i / 25))
            for k in range(20):  # 2 s of 16 kHz audio: converted to the 48 kHz track
                await recorder.write_audio(tone(0.1, 16_000, start=k * 1600))
        assert recorder.result is not None
        root = credentials.read_root_pem()
        assert root is not None
        yield Recorded(path, recorder.result, store, credentials, root, workdir)


@module_loop
async def test_recording_carries_all_three_signals(recorded: Recorded) -> None:
    report = await verify_media(recorded.path, trust_anchors_pem=recorded.root_pem,
                                store=recorded.store)
    expected_payload = payload_for(GEN).hex()

    assert report.manifest.state == "trusted"
    assert report.manifest.validation_codes == []
    assert report.manifest.generation_id == GEN
    assert report.manifest.consent_id == CONSENT_ID
    assert report.manifest.soft_binding_alg == WATERMARK_ALG
    assert report.manifest.soft_binding_payload == expected_payload
    assert report.manifest.digital_source_type is not None
    assert report.manifest.digital_source_type.endswith("/trainedAlgorithmicMedia")

    assert report.watermark.found and report.watermark.payload == expected_payload
    assert report.watermark.frames_used == 50
    assert report.watermark.sync_score >= 4.0

    assert report.log_match == "output-hash"
    assert [e.generation_id for e in report.log_entries] == [GEN]
    assert report.signals == ALL_SIGNALS
    assert report.ai_generated and report.consistent

    text = report.text()
    for needle in ("AI-GENERATED", "[c2pa]", "trusted signer", "[watermark]",
                   f"found: payload {expected_payload}", "[generation-log]",
                   "exact SHA-256", "agree"):
        assert needle in text, needle
    # The JSON is the same report, losslessly.
    assert VerificationReport.model_validate_json(report.model_dump_json()) == report


@module_loop
async def test_recording_result_and_log_entry_describe_the_published_file(
        recorded: Recorded) -> None:
    result = recorded.result
    digest = hashlib.sha256(recorded.path.read_bytes()).hexdigest()
    assert result.path == recorded.path
    assert result.sha256 == digest and result.size == recorded.path.stat().st_size
    assert result.frames == 50 and result.duration_s == pytest.approx(2.0, abs=0.05)
    assert result.label is True and result.watermark_payload == payload_for(GEN).hex()
    assert result.manifest is not None and result.manifest.path == recorded.path
    assert result.manifest.sha256 == digest
    # No temporary file is left next to the published one.
    assert files_in(recorded.workdir) == ["amelia.mp4"]

    entries = await recorded.store.generation(GEN)
    assert [e.kind for e in entries] == ["output"]
    entry = entries[0]
    assert entry == result.log_entries[0]
    assert entry.output_sha256 == [digest]
    assert entry.watermark_payload == payload_for(GEN).hex()
    assert entry.consent_id == CONSENT_ID and entry.token_sha256 == TOKEN_SHA
    assert (entry.provider, entry.avatar, entry.label) == ("local", "amelia", True)
    assert entry.details["frames"] == 50
    assert entry.details["c2pa_manifest"] == result.manifest.manifest_label
    assert (await recorded.store.verify_chain()).ok

    with av.open(str(recorded.path)) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        assert (video.codec_context.name, video.format.name) == ("h264", "yuv420p")
        assert (video.width, video.height, video.frames) == (512, 512, 50)
        assert audio.codec_context.name == "aac" and audio.sample_rate == 48_000
        assert audio.duration is not None and audio.time_base is not None
        assert float(audio.duration * audio.time_base) == pytest.approx(2.0, abs=0.05)


def test_label_is_burned_into_the_decoded_frames(recorded: Recorded) -> None:
    first = decoded_frames(recorded.path)[0]
    source = astronaut(0)
    labeler = FrameLabeler(LabelConfig())
    region = labeler.region(source.shape)
    labelled = labeler.apply(source)
    # The decoded label area looks like the labelled source, not like the bare portrait ...
    # (measured: about 100 against the bare portrait, under 3 against the labelled one)
    assert region_error(first, source, region) > 30
    assert region_error(first, labelled, region) < 8
    # ... and the rest of the frame is the portrait (H.264 at CRF 20 plus the watermark).
    assert region_error(first, source, (0, 512, 0, region[2])) < 8


@module_loop
async def test_reencoded_copy_loses_the_manifest_but_the_watermark_finds_the_log(
        recorded: Recorded, tmp_path: Path) -> None:
    copy = reencode(recorded.path, tmp_path / "uploaded.mp4", crf=28)
    report = await verify_media(copy, trust_anchors_pem=recorded.root_pem,
                                store=recorded.store)
    assert report.manifest.state == "absent"
    assert report.watermark.found and report.watermark.payload == payload_for(GEN).hex()
    assert report.log_match == "watermark"
    assert [e.generation_id for e in report.log_entries] == [GEN]
    assert report.signals == ["watermark", "generation-log"]
    assert report.ai_generated and report.consistent
    assert "no Content Credentials" in report.text()
    assert "watermark payload" in report.text()


@module_loop
async def test_one_flipped_media_byte_invalidates_the_manifest_not_the_watermark(
        recorded: Recorded, tmp_path: Path) -> None:
    copy = flip_mdat_byte(Path(shutil.copy(recorded.path, tmp_path / "tampered.mp4")))

    report = await verify_media(copy, trust_anchors_pem=recorded.root_pem,
                                store=recorded.store)
    assert report.manifest.state == "invalid"
    assert any("mismatch" in code for code in report.manifest.validation_codes), \
        report.manifest.validation_codes
    assert "c2pa" not in report.signals
    assert "INVALID manifest" in report.text()
    assert report.watermark.found and report.watermark.payload == payload_for(GEN).hex()
    # The bytes changed, so the log finds it by the watermark, not by the hash.
    assert report.log_match == "watermark"
    assert report.signals == ["watermark", "generation-log"]
    assert report.consistent  # the (invalid) manifest still names the same payload


def test_avatarkit_verify_command_on_the_file_and_on_a_crf28_reencode(
        recorded: Recorded) -> None:
    """The issue's acceptance, through the real ``avatarkit verify`` command."""
    def verify(path: Path, *extra: str) -> dict[str, Any]:
        proc = subprocess.run([sys.executable, "-m", "avatarkit.cli", "verify", str(path),
                               "--json", *extra], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        report: dict[str, Any] = json.loads(proc.stdout)
        return report

    payload = payload_for(GEN).hex()
    # No trust anchor given: intact but not trusted; still an AI signal.
    untrusted = verify(recorded.path)
    assert untrusted["manifest"]["state"] == "valid"
    assert untrusted["signals"] == ["c2pa", "watermark"]
    assert untrusted["log_checked"] is False

    anchor = recorded.workdir / "root.pem"
    anchor.write_text(recorded.root_pem)
    trusted = verify(recorded.path, "--trust-anchor", str(anchor))
    assert trusted["manifest"]["state"] == "trusted"
    assert trusted["watermark"]["payload"] == payload

    reencoded = reencode(recorded.path, recorded.workdir / "cli-crf28.mp4", crf=28)
    after = verify(reencoded, "--trust-anchor", str(anchor))
    assert after["manifest"]["state"] == "absent"
    assert after["watermark"]["found"] and after["watermark"]["payload"] == payload
    assert after["signals"] == ["watermark"]


# -- switches ----------------------------------------------------------------------------------


async def test_disabled_label_is_logged_and_absent_from_the_frames(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    gen = "gen_label_off"
    caplog.set_level(logging.WARNING, logger="avatarkit.transport.recorder")
    async with SQLiteConsentStore(":memory:") as store:
        result = await record(tmp_path / "nolabel.mp4", generation_id=gen,
                              disclosure=disclosure(gen, label_policy="disabled"),
                              label=LabelConfig(enabled=False), store=store)
        assert result is not None and result.label is False
        assert result.manifest is None  # credentials=None: unsigned, and said so
        assert "without C2PA credentials" in caplog.text

        entries = await store.generation(gen)
        assert [e.kind for e in entries] == ["label_disabled", "output"]
        assert entries[0].label is False and entries[1].label is False
        assert entries[1].details["c2pa_manifest"] == "unsigned"

        report = await verify_media(result.path, store=store)
        assert report.manifest.state == "absent"
        assert report.signals == ["watermark", "generation-log"]
        assert report.log_entries[0].label is False

    source = astronaut(0, 256)
    region = FrameLabeler(LabelConfig()).region(source.shape)
    assert region_error(decoded_frames(result.path)[0], source, region) < 8


def test_label_off_while_the_metadata_claims_burned_in_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        DisclosedRecorder(tmp_path / "x.mp4", width=256, height=256,
                          disclosure=disclosure(label_policy="burned-in"),
                          label=LabelConfig(enabled=False), credentials=None)
    assert err.value.field == "label.enabled"


async def test_watermark_off_leaves_no_payload_anywhere(tmp_path: Path) -> None:
    gen = "gen_no_mark"
    credentials = generate_signing_credentials(tmp_path / "creds")
    root = credentials.read_root_pem()
    async with SQLiteConsentStore(":memory:") as store:
        result = await record(tmp_path / "nomark.mp4", generation_id=gen, watermark=False,
                              credentials=credentials, consent=consent_for(gen), store=store)
        assert result is not None and result.watermark_payload is None

        manifest = read_manifest(result.path, trust_anchors_pem=root)
        assert manifest.state == "trusted" and manifest.soft_binding is None
        [entry] = await store.generation(gen)
        assert entry.watermark_payload is None

        report = await verify_media(result.path, trust_anchors_pem=root, store=store)
        assert not report.watermark.found and report.watermark.payload is None
        assert report.watermark.frames_used == 10
        assert report.signals == ["c2pa", "generation-log"]


async def test_frame_timestamps_place_frames_and_gaps_keep_their_time(tmp_path: Path) -> None:
    recorder = DisclosedRecorder(tmp_path / "gaps.mp4", width=256, height=256, fps=25,
                                 disclosure=disclosure("gen_gaps"), credentials=None)
    async with recorder:
        for t in (10.0, 10.04, 10.2, 10.24):  # two frames dropped after the second
            await recorder.write_frame(VideoFrame(astronaut(0, 256), t))
    assert recorder.result is not None
    assert recorder.result.frames == 4
    assert recorder.result.duration_s == pytest.approx(0.28)
    with av.open(str(recorder.result.path)) as container:
        stream = container.streams.video[0]
        pts = sorted(int(f.pts or 0) for f in container.decode(stream))
        assert stream.time_base is not None
        seconds = [round(float(p * stream.time_base), 2) for p in pts]
    assert seconds == [0.0, 0.04, 0.2, 0.24]


async def test_stereo_track_from_stereo_chunks_and_format_changes_refused(
        tmp_path: Path) -> None:
    recorder = DisclosedRecorder(tmp_path / "stereo.mp4", width=256, height=256,
                                 audio_sample_rate=48_000, audio_channels=2,
                                 disclosure=disclosure("gen_stereo"), credentials=None)
    left = tone(0.1, 24_000).samples
    stereo = AudioChunk(np.stack([left, left // 2], axis=1), 24_000, channels=2)
    async with recorder:
        for i in range(25):
            await recorder.write_frame(astronaut(i, 256))
        for _ in range(10):
            await recorder.write_audio(stereo)
        with pytest.raises(MediaFormatError) as err:
            await recorder.write_audio(tone(0.1, 16_000))
        assert err.value.field == "chunk.sample_rate"
    assert recorder.result is not None
    with av.open(str(recorder.result.path)) as container:
        audio = container.streams.audio[0]
        assert (audio.codec_context.name, audio.channels, audio.sample_rate) == ("aac", 2,
                                                                                 48_000)
        assert audio.duration is not None and audio.time_base is not None
        assert float(audio.duration * audio.time_base) == pytest.approx(1.0, abs=0.05)

    silent = DisclosedRecorder(tmp_path / "silent.mp4", width=256, height=256,
                               disclosure=disclosure("gen_silent"), credentials=None)
    with pytest.raises(ConfigError) as config_err:
        await silent.write_audio(stereo)
    assert config_err.value.field == "audio_sample_rate"
    await silent.aclose()


# -- publishing nothing ------------------------------------------------------------------------


async def test_no_frames_publishes_and_logs_nothing(tmp_path: Path) -> None:
    async with SQLiteConsentStore(":memory:") as store:
        recorder = DisclosedRecorder(tmp_path / "empty.mp4", width=256, height=256,
                                     audio_sample_rate=16_000, disclosure=disclosure("gen_e"),
                                     credentials=None, store=store)
        async with recorder:
            await recorder.write_audio(tone(0.5, 16_000))  # audio alone is not a recording
        assert recorder.result is None
        assert await recorder.aclose() is None  # idempotent
        assert files_in(tmp_path) == []
        assert await store.generation("gen_e") == []


async def test_exception_inside_the_block_publishes_and_logs_nothing(tmp_path: Path) -> None:
    async with SQLiteConsentStore(":memory:") as store:
        recorder = DisclosedRecorder(tmp_path / "failed.mp4", width=256, height=256,
                                     disclosure=disclosure("gen_x"), credentials=None,
                                     store=store)
        with pytest.raises(RuntimeError, match="renderer crashed"):
            async with recorder:
                for i in range(5):
                    await recorder.write_frame(astronaut(i, 256))
                raise RuntimeError("renderer crashed")
        assert recorder.result is None
        assert files_in(tmp_path) == []
        assert await store.generation("gen_x") == []
        with pytest.raises(SessionStateError):
            await recorder.write_frame(astronaut(0, 256))


async def test_a_failed_write_publishes_and_logs_nothing(tmp_path: Path) -> None:
    target = tmp_path / "gone"
    target.mkdir()
    async with SQLiteConsentStore(":memory:") as store:
        recorder = DisclosedRecorder(target / "clip.mp4", width=256, height=256,
                                     disclosure=disclosure("gen_fail"), credentials=None,
                                     store=store)
        target.rmdir()  # the encoder cannot create its file: the first write fails
        with pytest.raises(FileNotFoundError):
            await recorder.write_frame(astronaut(0, 256))
        with pytest.raises(SessionStateError, match="earlier write"):
            await recorder.write_frame(astronaut(1, 256))
        assert await recorder.aclose() is None
        assert await store.generation("gen_fail") == []


async def test_a_signing_failure_publishes_and_logs_nothing(tmp_path: Path) -> None:
    credentials = generate_signing_credentials(tmp_path / "creds")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    async with SQLiteConsentStore(":memory:") as store:
        recorder = DisclosedRecorder(out_dir / "clip.mp4", width=256, height=256,
                                     disclosure=disclosure("gen_sign"), credentials=credentials,
                                     store=store)
        await recorder.write_frame(astronaut(0, 256))
        credentials.key_path.unlink()  # the key vanishes before the recording is signed
        with pytest.raises(ConfigError) as err:
            await recorder.aclose()
        assert err.value.field == "credentials"
        # Not published unsigned as a fallback, not logged, no temporary files left.
        assert files_in(out_dir) == []
        assert await store.generation("gen_sign") == []
        assert recorder.result is None


async def test_frame_work_runs_on_one_worker_thread_in_call_order(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[int, int]] = []
    original = FrameWatermarker.embed_into

    def spy(self: FrameWatermarker, frame: Frame) -> None:
        # The red channel is untouched by the label here (bottom-left) and by the mark (Cb
        # moves only G and B), so the pixel still holds the frame's index.
        seen.append((threading.get_ident(), int(frame[-1, 0, 0])))
        original(self, frame)

    monkeypatch.setattr(FrameWatermarker, "embed_into", spy)
    frames = []
    for i in range(12):
        image = astronaut(i, 256)
        image[-1, 0, 0] = i
        frames.append(image)
    recorder = DisclosedRecorder(tmp_path / "order.mp4", width=256, height=256,
                                 disclosure=disclosure("gen_order"), credentials=None)
    async with recorder:
        # Concurrent writers: each write is queued when called, so call order is kept.
        await asyncio.gather(*(recorder.write_frame(f) for f in frames))
    assert [index for _, index in seen] == list(range(12))
    threads = {ident for ident, _ in seen}
    assert len(threads) == 1 and threading.get_ident() not in threads


async def test_bad_frames_are_refused_with_the_field(tmp_path: Path) -> None:
    recorder = DisclosedRecorder(tmp_path / "shape.mp4", width=256, height=256,
                                 disclosure=disclosure("gen_shape"), credentials=None)
    async with recorder:
        with pytest.raises(MediaFormatError) as err:
            await recorder.write_frame(np.zeros((256, 320, 3), np.uint8))
        assert err.value.field == "frame" and "256 x 256 x 3" in err.value.expected
        with pytest.raises(MediaFormatError) as err:
            await recorder.write_frame(VideoFrame(np.zeros((128, 128, 3), np.uint8), 0.0))
        assert err.value.field == "frame.data"
        with pytest.raises(MediaFormatError) as err:
            await recorder.write_frame(np.zeros((256, 256, 3), np.float32))
        assert err.value.field == "frame"
        await recorder.write_frame(astronaut(0, 256))  # still usable after a refusal
    assert recorder.result is not None and recorder.result.frames == 1
    assert await recorder.aclose() is recorder.result
    with pytest.raises(SessionStateError):
        await recorder.write_frame(astronaut(0, 256))


def test_bad_settings_are_refused_before_recording(tmp_path: Path) -> None:
    base: dict[str, Any] = {"disclosure": disclosure(), "credentials": None}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"width": 255, "height": 256}, "width"),  # odd: yuv420p
        ({"width": 256, "height": 64}, "height"),  # below the watermark's minimum
        ({"width": 256, "height": 256, "fps": 0}, "fps"),
        ({"width": 256, "height": 256, "audio_sample_rate": 12_345}, "audio_sample_rate"),
        ({"width": 256, "height": 256, "consent": consent_for("gen_other")},
         "consent.generation_id"),
    ]
    for overrides, field in cases:
        with pytest.raises(ConfigError) as err:
            DisclosedRecorder(tmp_path / "x.mp4", **{**base, **overrides})
        assert err.value.field == field
    (tmp_path / "exists.mp4").write_bytes(b"")
    with pytest.raises(ConfigError) as err:
        DisclosedRecorder(tmp_path / "exists.mp4", width=256, height=256, **base)
    assert err.value.field == "path"


# -- media without disclosure, and the CLI -----------------------------------------------------


async def test_unrelated_mp4_has_no_signal(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    clip = plain_mp4(tmp_path / "holiday.mp4")
    async with SQLiteConsentStore(":memory:") as store:
        report = await verify_media(clip, store=store)
    assert report.manifest.state == "absent"
    assert not report.watermark.found and report.watermark.frames_used == 25
    assert report.log_checked and report.log_entries == []
    assert report.signals == [] and not report.ai_generated and report.consistent
    assert "no AI-generation signal found" in report.text()

    status = await asyncio.to_thread(run_verify, verify_parser().parse_args(["verify",
                                                                           str(clip)]))
    assert status == 1
    assert "no AI-generation signal found" in capsys.readouterr().out


def test_cli_keygen_then_verify_json_round_trip(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    parser = verify_parser()
    creds_dir = tmp_path / "creds"
    assert run_disclosure(parser.parse_args(["disclosure", "keygen", "--out", str(creds_dir),
                                             "--algorithm", "es256", "--days", "30"])) == 0
    root = creds_dir / "root.pem"
    assert str(root) in capsys.readouterr().out
    # Refuses to replace the key without --force (exit 2, says why).
    assert run_disclosure(parser.parse_args(["disclosure", "keygen", "--out",
                                             str(creds_dir)])) == 2
    assert "already exists" in capsys.readouterr().err

    credentials = SigningCredentials.load(creds_dir)
    db = tmp_path / "consent.db"
    clip = tmp_path / "clip.mp4"

    async def produce() -> None:
        async with SQLiteConsentStore(db) as store:
            await record(clip, generation_id="gen_cli", credentials=credentials,
                         consent=consent_for("gen_cli"), store=store)

    asyncio.run(produce())
    status = run_verify(parser.parse_args(["verify", str(clip), "--trust-anchor", str(root),
                                           "--store", str(db), "--json"]))
    assert status == 0
    report = json.loads(capsys.readouterr().out)
    assert report["manifest"]["state"] == "trusted"
    assert report["signals"] == ALL_SIGNALS
    assert report["watermark"]["payload"] == payload_for("gen_cli").hex()
    assert report["log_entries"][0]["generation_id"] == "gen_cli"

    # Errors are exit 2 with a message, never a traceback or a silently empty store.
    assert run_verify(parser.parse_args(["verify", str(tmp_path / "missing.mp4")])) == 2
    assert "missing.mp4: no such file" in capsys.readouterr().err
    assert run_verify(parser.parse_args(["verify", str(clip), "--store",
                                         str(tmp_path / "nope.db")])) == 2
    assert "no such consent store" in capsys.readouterr().err
    assert not (tmp_path / "nope.db").exists()


def test_main_dispatches_both_commands(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    clip = plain_mp4(tmp_path / "plain.mp4", frames=5)
    assert main(["verify", str(clip), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["ai_generated"] is False
    assert main(["disclosure", "keygen", "--out", str(tmp_path / "k")]) == 0


def test_importing_the_sdk_or_the_cli_loads_no_media_libraries() -> None:
    code = ("import sys, avatarkit, avatarkit.transport, avatarkit.cli.disclosure; "
            "heavy = {'av', 'c2pa', 'PIL', 'pywt'} & {m.split('.')[0] for m in sys.modules}; "
            "print(sorted(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == "[]"

