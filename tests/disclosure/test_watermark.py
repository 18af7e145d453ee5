"""Frame watermark: round trips, imperceptibility, robustness, false positives, ECC limits.

The portrait is scikit-image's astronaut (a real photograph shipped inside the package, no
download), resized and cropped to the sizes a session produces.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
from collections.abc import Callable
from functools import cache

import av
import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image
from skimage import data

from avatarkit.disclosure.watermark import (
    BCH_N,
    BCH_T,
    CHECK_THRESHOLD,
    SYNC_THRESHOLD,
    FrameWatermarker,
    WatermarkDetector,
    _code_word,
    _layout,
    bch_decode,
    bch_encode,
    payload_for,
)
from avatarkit.errors import MediaFormatError

Frame = npt.NDArray[np.uint8]
PAYLOAD = payload_for("gen-2026-11-21-0001")
OTHER = payload_for("gen-2026-11-21-0002")
SIZES = ["512x512", "640x360", "457x301"]


def _resize(img: Frame, width: int, height: int) -> Frame:
    return np.asarray(Image.fromarray(img).resize((width, height), Image.Resampling.LANCZOS))


@cache
def _photo(name: str) -> Frame:
    """An RGB photograph bundled with scikit-image ("astronaut", "coffee", ...)."""
    return np.asarray(getattr(data, name)(), dtype=np.uint8)


def _astronaut() -> Frame:
    return _photo("astronaut")


@cache
def portrait(size: str) -> Frame:
    """The astronaut at a session size (odd sizes included), read-only so tests cannot
    alter it for each other."""
    base = _astronaut()
    if size == "512x512":
        out = base.copy()
    elif size == "640x360":
        out = np.ascontiguousarray(_resize(base, 640, 640)[140:500])
    elif size == "457x301":
        out = np.ascontiguousarray(_resize(base, 457, 457)[60:361])
    else:
        raise AssertionError(size)
    out.flags.writeable = False
    return out


def psnr(a: Frame, b: Frame) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float(10 * np.log10(255.0**2 / mse))


def jpeg(frame: Frame, quality: int) -> Frame:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, "JPEG", quality=quality)
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))


def h264_round_trip(frames: list[Frame], crf: int) -> list[Frame]:
    """Encode to an in-memory MP4 with libx264 (yuv420p) and decode it again."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height = frames[0].shape[1], frames[0].shape[0]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": "fast"}
        for frame in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode(None))
    buf.seek(0)
    with av.open(buf, mode="r") as src:
        return [np.asarray(f.to_ndarray(format="rgb24"), dtype=np.uint8)
                for f in src.decode(video=0)]


def test_payload_is_the_sha256_prefix_of_the_generation_id() -> None:
    assert hashlib.sha256(b"gen-2026-11-21-0001").digest()[:8] == PAYLOAD
    assert len(PAYLOAD) == 8 and PAYLOAD != OTHER


@pytest.mark.parametrize("size", SIZES)
def test_clean_round_trip(size: str) -> None:
    frame = portrait(size)
    marked = FrameWatermarker(PAYLOAD).embed(frame)
    assert marked.shape == frame.shape and marked.dtype == np.uint8
    assert not np.array_equal(marked, frame)
    reading = WatermarkDetector().read(marked)
    assert reading.payload == PAYLOAD
    assert reading.sync_score >= SYNC_THRESHOLD
    assert reading.check_score is not None and reading.check_score >= CHECK_THRESHOLD
    assert reading.soft_bits.shape == (175,)
    assert WatermarkDetector().read(frame).payload is None


@pytest.mark.parametrize("size", SIZES)
def test_psnr_at_least_40_db(size: str) -> None:
    frame = portrait(size)
    assert psnr(frame, FrameWatermarker(PAYLOAD).embed(frame)) >= 40.0


def test_odd_sizes_mark_the_8_aligned_region_and_leave_the_rest() -> None:
    frame = portrait("457x301")  # 57x37 blocks: rows >= 296 and columns >= 456 stay
    marked = FrameWatermarker(PAYLOAD).embed(frame)
    assert np.array_equal(marked[296:], frame[296:])
    assert np.array_equal(marked[:, 456:], frame[:, 456:])
    assert not np.array_equal(marked[:296, :456], frame[:296, :456])


def test_embed_into_marks_a_strided_view_in_place() -> None:
    canvas = np.zeros((600, 700, 3), dtype=np.uint8)
    canvas[10:522, 20:532] = portrait("512x512")
    view = canvas[10:522, 20:532]
    FrameWatermarker(PAYLOAD).embed_into(view)
    assert WatermarkDetector().read(np.ascontiguousarray(view)).payload == PAYLOAD
    assert not canvas[:10].any() and not canvas[:, :20].any() and not canvas[522:].any()
    with pytest.raises(MediaFormatError) as err:
        FrameWatermarker(PAYLOAD).embed_into(portrait("512x512"))  # read-only
    assert err.value.field == "frame"


@pytest.mark.parametrize("size", ["512x512", "640x360"])
def test_single_frame_survives_jpeg_75(size: str) -> None:
    marked = FrameWatermarker(PAYLOAD).embed(portrait(size))
    reading = WatermarkDetector().read(jpeg(marked, 75))
    assert reading.payload == PAYLOAD


def test_brightness_change_does_not_touch_a_chroma_mark() -> None:
    marked = FrameWatermarker(PAYLOAD).embed(portrait("512x512"))
    brighter = np.clip(marked.astype(np.int16) + 20, 0, 255).astype(np.uint8)
    assert WatermarkDetector().read(brighter).payload == PAYLOAD


def test_h264_crf_28_with_motion_survives_by_voting() -> None:
    """30 frames of a 2 px/frame pan (motion makes x264 re-code the mark), each marked."""
    wide = _resize(_astronaut(), 600, 600)
    marker = FrameWatermarker(PAYLOAD)
    frames = [marker.embed(np.ascontiguousarray(wide[40:552, 2 * i:2 * i + 512]))
              for i in range(30)]
    decoded = h264_round_trip(frames, crf=28)
    assert len(decoded) == 30
    detector = WatermarkDetector(expected=PAYLOAD)
    result = detector.detect(iter(decoded))
    assert result.payload == PAYLOAD and result.matched and result.frames_used == 30
    assert result.sync_score >= SYNC_THRESHOLD
    # Frames that fail alone must fail as "no payload", never as another payload.
    assert {detector.read(f).payload for f in decoded} <= {PAYLOAD, None}


def test_voting_recovers_what_no_single_frame_can() -> None:
    marked = FrameWatermarker(PAYLOAD).embed(portrait("512x512"))
    rng = np.random.default_rng(7)
    noisy = [np.clip(marked + rng.normal(0, 40, marked.shape), 0, 255).astype(np.uint8)
             for _ in range(30)]
    detector = WatermarkDetector()
    assert all(detector.read(f).payload is None for f in noisy)
    result = detector.detect(noisy)
    assert result.payload == PAYLOAD and result.frames_used == 30


def _unmarked_frames(n: int, seed: int) -> list[tuple[str, Frame]]:
    rng = np.random.default_rng(seed)
    photos = [_photo(name) for name in ("astronaut", "coffee", "chelsea", "rocket")]
    out: list[tuple[str, Frame]] = []
    for i in range(n):
        kind = ("natural", "flat", "noise", "smooth")[i % 4]
        h, w = (int(v) for v in rng.integers(128, 300, 2))
        if kind == "natural":
            photo = photos[i // 4 % len(photos)]
            y, x = rng.integers(0, photo.shape[0] - h + 1), rng.integers(0, photo.shape[1] - w + 1)
            frame = np.ascontiguousarray(photo[y:y + h, x:x + w])
        elif kind == "flat":
            frame = np.full((h, w, 3), rng.integers(0, 256, 3), dtype=np.uint8)
        elif kind == "noise":
            frame = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        else:
            small = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
            frame = _resize(small, w, h)
        out.append((kind, frame))
    return out


def test_unmarked_content_never_yields_a_payload() -> None:
    detector = WatermarkDetector()
    scores = []
    for kind, frame in _unmarked_frames(800, seed=1):
        reading = detector.read(frame)
        assert reading.payload is None, kind
        if kind != "flat":
            scores.append(reading.sync_score)
    # The false-positive estimate rests on the sync score being ~N(0, 1) without a mark.
    assert abs(float(np.mean(scores))) < 0.15
    assert 0.85 < float(np.std(scores)) < 1.15
    grey = np.full((512, 512, 3), 128, dtype=np.uint8)
    assert detector.detect([grey] * 10).payload is None
    natural = [f for kind, f in _unmarked_frames(40, seed=2) if kind == "natural"]
    crops = [np.ascontiguousarray(_astronaut()[i * 20:i * 20 + 256, :256]) for i in range(10)]
    for batch in (crops, [natural[0][:128, :128]] * 5):
        result = detector.detect(batch)
        assert result.payload is None and not result.matched
        assert result.frames_used == len(batch)


def test_two_payloads_are_told_apart() -> None:
    frame = portrait("640x360")
    marked_a = FrameWatermarker(PAYLOAD).embed(frame)
    marked_b = FrameWatermarker(OTHER).embed(frame)
    assert WatermarkDetector().read(marked_a).payload == PAYLOAD
    assert WatermarkDetector().read(marked_b).payload == OTHER
    expecting_a = WatermarkDetector(expected=PAYLOAD)
    assert expecting_a.detect([marked_a]).matched
    other = expecting_a.detect([marked_b])
    assert other.payload == OTHER and not other.matched


def test_a_private_key_hides_the_mark_from_the_public_detector() -> None:
    marked = FrameWatermarker(PAYLOAD, key=b"deployment-secret").embed(portrait("512x512"))
    assert WatermarkDetector().read(marked).payload is None
    assert WatermarkDetector(key=b"deployment-secret").read(marked).payload == PAYLOAD


def test_results_are_frozen_and_an_empty_run_finds_nothing() -> None:
    result = WatermarkDetector().detect([])
    assert (result.payload, result.frames_used, result.matched) == (None, 0, False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.payload = PAYLOAD  # type: ignore[misc]
    reading = WatermarkDetector().read(portrait("512x512"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        reading.payload = PAYLOAD  # type: ignore[misc]


BAD_FRAMES: list[tuple[str, object, str]] = [
    ("float", np.zeros((256, 256, 3), dtype=np.float32), "frame.dtype"),
    ("gray", np.zeros((256, 256), dtype=np.uint8), "frame.shape"),
    ("rgba", np.zeros((256, 256, 4), dtype=np.uint8), "frame.shape"),
    ("short", np.zeros((127, 512, 3), dtype=np.uint8), "frame.shape"),
    ("narrow", np.zeros((512, 100, 3), dtype=np.uint8), "frame.shape"),
    ("list", [[[0, 0, 0]] * 256] * 256, "frame"),
]


@pytest.mark.parametrize(("name", "frame", "field"), BAD_FRAMES, ids=[b[0] for b in BAD_FRAMES])
def test_bad_frames_are_refused_with_the_field(name: str, frame: object, field: str) -> None:
    calls: list[Callable[[Frame], object]] = [
        FrameWatermarker(PAYLOAD).embed, FrameWatermarker(PAYLOAD).embed_into,
        WatermarkDetector().read, lambda f: WatermarkDetector().detect([f])]
    for call in calls:
        with pytest.raises(MediaFormatError) as err:
            call(frame)  # type: ignore[arg-type]
        assert err.value.field == field
    if name in ("short", "narrow"):
        assert "128" in err.value.expected


@pytest.mark.parametrize("payload", [b"", b"1234567", b"123456789", "12345678"])
def test_payload_must_be_8_bytes(payload: object) -> None:
    with pytest.raises(MediaFormatError) as err:
        FrameWatermarker(payload)  # type: ignore[arg-type]
    assert err.value.field == "payload" and "8 bytes" in err.value.expected
    with pytest.raises(MediaFormatError) as err:
        WatermarkDetector(expected=b"1234567")
    assert err.value.field == "expected"


@pytest.mark.parametrize("strength", [0.0, -0.5, 1.5, float("nan")])
def test_strength_must_be_a_fraction(strength: float) -> None:
    with pytest.raises(MediaFormatError) as err:
        FrameWatermarker(PAYLOAD, strength=strength)
    assert err.value.field == "strength"


def test_detect_refuses_frames_of_different_sizes() -> None:
    with pytest.raises(MediaFormatError) as err:
        WatermarkDetector().detect([portrait("512x512"), portrait("640x360")])
    assert err.value.field == "frames"


def test_bch_code_is_systematic_and_linear() -> None:
    word = bch_encode(PAYLOAD)
    assert word.shape == (BCH_N,) and set(np.unique(word)) <= {0, 1}
    assert np.array_equal(word[63:], np.unpackbits(np.frombuffer(PAYLOAD, dtype=np.uint8)))
    xor = bytes(a ^ b for a, b in zip(PAYLOAD, OTHER, strict=True))
    assert np.array_equal(bch_encode(PAYLOAD) ^ bch_encode(OTHER), bch_encode(xor))
    assert not bch_encode(bytes(8)).any()
    assert bch_decode(word) == (PAYLOAD, 0)
    with pytest.raises(MediaFormatError):
        bch_decode(word[:100])


def test_bch_corrects_every_pattern_up_to_its_design_limit() -> None:
    rng = np.random.default_rng(11)
    for trial in range(220):
        payload = rng.bytes(8)
        errors = trial % (BCH_T + 1)
        word = bch_encode(payload)
        word[rng.choice(BCH_N, errors, replace=False)] ^= 1
        assert bch_decode(word) == (payload, errors)


def test_bch_reports_none_not_a_wrong_payload_beyond_its_limit() -> None:
    rng = np.random.default_rng(12)
    for trial in range(300):
        payload = rng.bytes(8)
        errors = BCH_T + 1 + trial % 30  # 11..40 flipped bits
        word = bch_encode(payload)
        word[rng.choice(BCH_N, errors, replace=False)] ^= 1
        assert bch_decode(word) is None, errors


def test_check_bits_reject_a_payload_the_bch_layer_got_wrong() -> None:
    """A damaged mark whose BCH word lands on another codeword (a miscorrection) must not be
    reported: the check bits carry a keyed hash of the payload that was really embedded."""
    detector = WatermarkDetector()
    layout = _layout(detector._key, 64, 64)
    true_word = _code_word(detector._key, PAYLOAD)
    spliced = true_word.copy()
    spliced[48:] = bch_encode(OTHER)  # sync and check of PAYLOAD, BCH bits of OTHER

    def blocks(word: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        return (2.0 * word[layout.bit_of_block] - 1.0).astype(np.float32)

    _, payload, sync, check, _ = detector._decide(blocks(true_word), layout)
    assert payload == PAYLOAD and check is not None and check >= CHECK_THRESHOLD
    _, payload, sync, check, corrected = detector._decide(blocks(spliced), layout)
    assert sync >= SYNC_THRESHOLD  # the mark is plainly there...
    assert check is not None and check < CHECK_THRESHOLD  # ...but not with this payload
    assert payload is None and corrected is None
