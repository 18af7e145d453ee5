"""prepare_avatar(): real images and videos through mediapipe, errors, the on-disk cache."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from avatarkit import AvatarKitError
from avatarkit.errors import (
    AvatarPreparationError,
    FaceTooSmallError,
    MediaReadError,
    NoFaceError,
)
from avatarkit.local_engine import face
from avatarkit.local_engine.avatar import (
    PREPARATION_VERSION,
    PreparedAvatar,
    PrepareOptions,
    default_cache_dir,
    prepare_avatar,
)

from . import astronaut, shifted, write_video

LOGGER = "avatarkit.local_engine.avatar"


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="module")
def astronaut_png(media_dir: Path) -> Path:
    path = media_dir / "astronaut.png"
    Image.fromarray(astronaut()).save(path)
    return path


@pytest.fixture(scope="module")
def still(astronaut_png: Path, tmp_path_factory: pytest.TempPathFactory) -> PreparedAvatar:
    return prepare_avatar(astronaut_png, cache_dir=tmp_path_factory.mktemp("cache"),
                          progress=False)


@pytest.fixture(scope="module")
def gap_video(media_dir: Path) -> Path:
    """12 frames of the astronaut drifting right 1 px per frame; frame 7 is black."""
    frames = [shifted(astronaut(), float(i), 0.0) for i in range(12)]
    frames[7] = np.zeros_like(frames[7])
    return write_video(media_dir / "gap.mp4", frames)


def _mask_value(avatar: PreparedAvatar, frame: int, index: int) -> int:
    crop = avatar.crop_boxes[frame]
    size = avatar.masks.shape[1]
    x, y = (avatar.landmarks[frame, index] - crop[:2]) * size / float(crop[2] - crop[0])
    return int(avatar.masks[frame, int(y), int(x)])


def _counting_factory(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count how often prepare_avatar opens mediapipe (the real analyzer still runs)."""
    calls: list[int] = []
    real = face.open_face_analyzer

    def counted(**kwargs: Any) -> face.FaceAnalyzer:
        calls.append(1)
        return real(**kwargs)

    monkeypatch.setattr(face, "open_face_analyzer", counted)
    return calls


# ----------------------------------------------------------------------------- still images


def test_image_gives_one_prepared_frame(still: PreparedAvatar, astronaut_png: Path) -> None:
    assert len(still) == 1 and still.is_still and still.fps == 25.0
    assert still.source == str(astronaut_png) and not still.from_cache
    assert still.engine_version == PREPARATION_VERSION
    assert still.frames.shape == (1, 512, 512, 3) and still.frames.dtype == np.uint8
    assert np.array_equal(still.frames[0], astronaut())
    assert still.landmarks.shape == still.raw_landmarks.shape == (1, 468, 2)
    assert still.landmarks.dtype == still.raw_landmarks.dtype == np.float32
    assert still.boxes.shape == (1, 4) and still.boxes.dtype == np.float32
    assert still.crop_boxes.dtype == np.int32 and still.masks.shape == (1, 256, 256)
    assert still.multiple_faces_frames == still.interpolated_frames == ()
    assert still.clipped_crop_frames == ()
    # One frame: nothing to smooth.
    assert np.array_equal(still.landmarks, still.raw_landmarks)
    lm = still.landmarks[0]
    x0, y0, x1, y1 = still.boxes[0]
    assert ((lm >= [x0, y0]) & (lm <= [x1, y1])).all()
    assert 85 < max(x1 - x0, y1 - y0) < 125
    with pytest.raises(ValueError, match="read-only"):
        still.frames[0, 0, 0, 0] = 1


def test_crop_box_is_square_and_contains_the_face(still: PreparedAvatar) -> None:
    cx0, cy0, cx1, cy1 = still.crop_boxes[0].tolist()
    x0, y0, x1, y1 = still.boxes[0].tolist()
    assert cx1 - cx0 == cy1 - cy0 == round(1.5 * max(x1 - x0, y1 - y0))
    assert cx0 <= x0 and cy0 <= y0 and cx1 >= x1 and cy1 >= y1
    assert abs((cx0 + cx1) / 2 - (x0 + x1) / 2) <= 1 and abs((cy0 + cy1) / 2 - (y0 + y1) / 2) <= 1


def test_mask_covers_the_mouth_and_is_feathered(still: PreparedAvatar) -> None:
    mask = still.masks[0]
    assert _mask_value(still, 0, 13) > 200 and _mask_value(still, 0, 14) > 200  # mouth
    assert _mask_value(still, 0, 152) > 0                                        # chin
    assert _mask_value(still, 0, 10) == 0                                        # forehead
    assert ((mask > 0) & (mask < 255)).sum() > 500                               # soft edge
    assert (mask == 255).sum() > 0.05 * mask.size


def test_array_source_matches_the_file(still: PreparedAvatar, tmp_path: Path) -> None:
    avatar = prepare_avatar(astronaut(), cache_dir=tmp_path, progress=False)
    assert avatar.source == "<array>" and len(avatar) == 1
    assert np.allclose(avatar.landmarks, still.landmarks)
    assert avatar.content_hash != still.content_hash       # array bytes + shape, not PNG bytes
    with pytest.raises(MediaReadError, match=r"<array>.*RGB uint8"):
        prepare_avatar(astronaut().astype(np.float32), cache_dir=tmp_path, progress=False)
    with pytest.raises(MediaReadError, match="RGB uint8"):
        prepare_avatar(astronaut()[..., 0], cache_dir=tmp_path, progress=False)


def test_crop_that_cannot_fit_is_shrunk_and_flagged(tmp_path: Path) -> None:
    close_up = cv2.resize(astronaut()[40:220, 140:320], (320, 320), interpolation=cv2.INTER_CUBIC)
    avatar = prepare_avatar(np.asarray(close_up), cache_dir=tmp_path, progress=False,
                            options=PrepareOptions(crop_scale=2.0))
    assert avatar.clipped_crop_frames == (0,)
    assert avatar.crop_boxes[0].tolist() == [0, 0, 320, 320]
    assert _mask_value(avatar, 0, 13) > 200


# ----------------------------------------------------------------------------- video


def test_video_fps_and_frame_limits(media_dir: Path, tmp_path: Path) -> None:
    path = write_video(media_dir / "thirty.mp4", [astronaut()] * 10, fps=30, codec="mpeg4")
    avatar = prepare_avatar(path, cache_dir=tmp_path, progress=False)
    assert avatar.fps == 30.0 and len(avatar) == 10 and not avatar.is_still
    assert avatar.frames.shape == (10, 512, 512, 3)
    limited = prepare_avatar(path, cache_dir=tmp_path, progress=False,
                             options=PrepareOptions(max_frames=4))
    assert len(limited) == 4
    by_time = prepare_avatar(path, cache_dir=tmp_path, progress=False,
                             options=PrepareOptions(max_seconds=0.2))
    assert len(by_time) == 6            # floor(0.2 s x 30 fps)


def test_smoothing_removes_jitter_but_follows_a_steady_shift(media_dir: Path,
                                                             tmp_path: Path) -> None:
    # A real translation of 1.5 px/frame right and 0.5 px/frame down, plus +-2 px of random
    # per-frame shake and pixel noise.
    rng = np.random.default_rng(7)
    count = 30
    steady = np.array([[1.5 * i, 0.5 * i] for i in range(count)])
    shake = rng.uniform(-2.0, 2.0, (count, 2))
    frames = []
    for i in range(count):
        frame = shifted(astronaut(), *(steady[i] + shake[i] - [20.0, 7.0]))
        noise = rng.normal(0.0, 3.0, frame.shape)
        frames.append(np.clip(frame + noise, 0, 255).astype(np.uint8))
    path = write_video(media_dir / "shaky.mp4", frames)
    avatar = prepare_avatar(path, cache_dir=tmp_path, progress=False)
    assert avatar.fps == 25.0 and len(avatar) == count

    raw = avatar.raw_landmarks.astype(np.float64).mean(axis=1)      # (N, 2) face position
    smooth = avatar.landmarks.astype(np.float64).mean(axis=1)
    offset = (raw - steady).mean(axis=0)
    # mediapipe follows the shaken frames closely ...
    assert np.abs(raw - (steady + shake) - offset).mean() < 0.5
    # ... the smoothed track has much less frame-to-frame jitter ...
    jitter_raw = np.abs(np.diff(raw, n=2, axis=0)).mean()
    jitter_smooth = np.abs(np.diff(smooth, n=2, axis=0)).mean()
    assert jitter_smooth < 0.25 * jitter_raw
    # ... and follows the steady shift without lagging: a filter lagging one frame would be
    # 1.5 px behind along x.
    error = smooth - steady - offset
    assert np.abs(error).mean() < 1.0
    assert abs(error[:, 0].mean()) < 0.5 and abs(error[:, 1].mean()) < 0.5
    assert abs(error[5:-5, 0].mean()) < 0.5
    # Boxes, crops and masks follow the smoothed track.
    assert np.allclose(avatar.boxes, face.face_box(avatar.landmarks))
    assert np.abs(np.diff(avatar.crop_boxes[:, 0].astype(float), n=2)).max() <= 2
    unsmoothed = prepare_avatar(path, cache_dir=tmp_path, progress=False,
                                options=PrepareOptions(smoothing=0))
    assert np.array_equal(unsmoothed.landmarks, unsmoothed.raw_landmarks)
    assert np.array_equal(unsmoothed.raw_landmarks, avatar.raw_landmarks)  # deterministic


def test_frame_without_a_face_is_named(gap_video: Path, tmp_path: Path) -> None:
    with pytest.raises(NoFaceError, match=r"frame 7 of .*gap\.mp4") as caught:
        prepare_avatar(gap_video, cache_dir=tmp_path, progress=False)
    assert caught.value.frame_index == 7
    assert caught.value.source == str(gap_video)
    assert "missing_face='interpolate'" in str(caught.value)
    assert not list(tmp_path.glob("*.npz"))     # nothing cached for a failed preparation


def test_frame_without_a_face_interpolated_in_place(gap_video: Path, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        avatar = prepare_avatar(gap_video, cache_dir=tmp_path, progress=False,
                                options=PrepareOptions(missing_face="interpolate"))
    assert len(avatar) == 12 and avatar.interpolated_frames == (7,)
    assert avatar.frames[7].max() < 40                          # the black frame kept its place
    assert avatar.frames[8].mean() > 60
    raw = avatar.raw_landmarks
    assert np.allclose(raw[7], (raw[6] + raw[8]) / 2, atol=1e-3)
    # The neighbours' faces moved 1 px per frame, so the interpolated one sits between them.
    assert raw[8, :, 0].mean() - raw[6, :, 0].mean() == pytest.approx(2.0, abs=0.5)
    assert any("interpolated" in r.getMessage() and "frame 7" in r.getMessage()
               for r in caplog.records)


def test_no_face_anywhere_is_an_error_even_when_interpolating(tmp_path: Path) -> None:
    black = np.zeros((256, 256, 3), dtype=np.uint8)
    with pytest.raises(NoFaceError, match="no face found in any of the 1 frame") as caught:
        prepare_avatar(black, cache_dir=tmp_path, progress=False,
                       options=PrepareOptions(missing_face="interpolate"))
    assert caught.value.frame_index == 0 and caught.value.frames_checked == 1
    with pytest.raises(NoFaceError, match="no face found in '<array>'") as caught:
        prepare_avatar(black, cache_dir=tmp_path, progress=False)
    assert caught.value.frame_index == 0


def test_tiny_face_is_refused_with_its_size(tmp_path: Path) -> None:
    small = cv2.resize(astronaut(), (205, 205), interpolation=cv2.INTER_AREA)
    canvas = np.zeros((512, 512, 3), dtype=np.uint8)
    canvas[100:305, 100:305] = small                     # a face of about 40 px
    with pytest.raises(FaceTooSmallError) as caught:
        prepare_avatar(canvas, cache_dir=tmp_path, progress=False)
    error = caught.value
    assert error.frame_index == 0 and error.min_size == 64
    assert 30 < error.size < 55
    assert f"{error.size:.0f} px" in str(error) and "at least 64 px" in str(error)
    # A lower minimum accepts the same face: it was found, only too small.
    avatar = prepare_avatar(canvas, cache_dir=tmp_path, progress=False,
                            options=PrepareOptions(min_face_size=30))
    x0, y0, x1, y1 = avatar.boxes[0]
    assert max(x1 - x0, y1 - y0) == pytest.approx(error.size, abs=1.0)


def test_two_faces_use_the_largest_and_warn(tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    canvas = np.zeros((512, 800, 3), dtype=np.uint8)
    canvas[:, :512] = astronaut()
    canvas[128:384, 530:786] = cv2.resize(astronaut(), (256, 256), interpolation=cv2.INTER_AREA)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        avatar = prepare_avatar(canvas, cache_dir=tmp_path, progress=False)
    assert avatar.multiple_faces_frames == (0,)
    x0, _, x1, _ = avatar.boxes[0]
    assert x1 < 512 and x1 - x0 > 80                       # the full-size face on the left
    warnings = [r for r in caplog.records if "more than one face" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING


# ----------------------------------------------------------------------------- bad media


def test_missing_empty_and_unreadable_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.mp4"
    with pytest.raises(MediaReadError, match=r"nope\.mp4.*does not exist") as caught:
        prepare_avatar(missing, cache_dir=tmp_path, progress=False)
    assert caught.value.source == str(missing)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(MediaReadError, match=r"empty\.png.*empty"):
        prepare_avatar(empty, cache_dir=tmp_path, progress=False)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"this is not a video\n" * 50)
    with pytest.raises(MediaReadError, match=r"junk\.mp4.*neither an image nor a readable video"):
        prepare_avatar(junk, cache_dir=tmp_path, progress=False)
    png = tmp_path / "cut.png"
    Image.fromarray(astronaut()).save(png)
    png.write_bytes(png.read_bytes()[:4000])
    with pytest.raises(MediaReadError, match=r"cut\.png.*cannot decode the image"):
        prepare_avatar(png, cache_dir=tmp_path, progress=False)
    with pytest.raises(MediaReadError, match="not a regular file"):
        prepare_avatar(tmp_path, cache_dir=tmp_path / "c", progress=False)
    assert issubclass(MediaReadError, AvatarPreparationError)
    assert issubclass(AvatarPreparationError, AvatarKitError)


# ----------------------------------------------------------------------------- cache


def test_cache_hit_does_not_run_mediapipe(astronaut_png: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    first = prepare_avatar(astronaut_png, cache_dir=tmp_path, progress=False)
    assert not first.from_cache
    npz = tmp_path / f"{first.cache_key}.npz"
    sidecar = json.loads((tmp_path / f"{first.cache_key}.json").read_text())
    assert sidecar["content_hash"] == first.content_hash and sidecar["frames"] == 1
    assert sidecar["options"] == PrepareOptions().model_dump(mode="json")
    with np.load(npz, allow_pickle=False) as stored:                   # no pickled objects
        assert stored["landmarks"].shape == (1, 468, 2)
    assert not list(tmp_path.glob("*.tmp"))

    def unavailable(**kwargs: Any) -> face.FaceAnalyzer:
        raise AssertionError("mediapipe must not run on a cache hit")

    monkeypatch.setattr(face, "open_face_analyzer", unavailable)
    second = prepare_avatar(astronaut_png, cache_dir=tmp_path, progress=False)
    assert second.from_cache and second.cache_key == first.cache_key
    for name in ("frames", "landmarks", "raw_landmarks", "boxes", "crop_boxes", "masks"):
        assert np.array_equal(getattr(second, name), getattr(first, name)), name
    assert second.fps == first.fps and second.source == first.source
    # Same bytes under another name: still a hit (the key is the content, not the path).
    copy = tmp_path / "copy.png"
    copy.write_bytes(astronaut_png.read_bytes())
    third = prepare_avatar(copy, cache_dir=tmp_path, progress=False)
    assert third.from_cache and third.source == str(copy)


def test_cache_key_changes_with_options_and_engine_version(astronaut_png: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    calls = _counting_factory(monkeypatch)
    base = prepare_avatar(astronaut_png, cache_dir=tmp_path, progress=False)
    assert len(calls) == 1
    assert prepare_avatar(astronaut_png, cache_dir=tmp_path, progress=False).from_cache
    assert len(calls) == 1
    other = prepare_avatar(astronaut_png, cache_dir=tmp_path, progress=False,
                           options=PrepareOptions(mask_size=128))
    assert not other.from_cache and other.masks.shape == (1, 128, 128) and len(calls) == 2
    newer = prepare_avatar(astronaut_png, cache_dir=tmp_path, progress=False,
                           engine_version="musetalk-1.5+2")
    assert not newer.from_cache and newer.engine_version == "musetalk-1.5+2"
    assert len(calls) == 3
    assert len({base.cache_key, other.cache_key, newer.cache_key}) == 3
    assert prepare_avatar(astronaut_png, cache_dir=tmp_path, progress=False,
                          engine_version="musetalk-1.5+2").from_cache
    assert not prepare_avatar(astronaut_png, cache_dir=tmp_path, progress=False,
                              use_cache=False).from_cache
    assert len(calls) == 4


def test_corrupt_cache_file_is_ignored_and_rebuilt(astronaut_png: Path, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    first = prepare_avatar(astronaut_png, cache_dir=tmp_path, progress=False)
    npz = tmp_path / f"{first.cache_key}.npz"
    for damage in (b"garbage" * 100, npz.read_bytes()[:5000]):
        npz.write_bytes(damage)
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            rebuilt = prepare_avatar(astronaut_png, cache_dir=tmp_path, progress=False)
        assert not rebuilt.from_cache
        assert np.array_equal(rebuilt.landmarks, first.landmarks)
        assert any("ignoring unreadable avatar cache file" in r.getMessage()
                   for r in caplog.records)
        caplog.clear()
        assert prepare_avatar(astronaut_png, cache_dir=tmp_path, progress=False).from_cache


def test_default_cache_dir_follows_the_environment(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AVATARKIT_CACHE_DIR", str(tmp_path / "avk"))
    assert default_cache_dir() == tmp_path / "avk" / "avatars"
    avatar = prepare_avatar(astronaut(), progress=False)
    assert (tmp_path / "avk" / "avatars" / f"{avatar.cache_key}.npz").is_file()
    monkeypatch.delenv("AVATARKIT_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "avatarkit" / "avatars"


# ----------------------------------------------------------------------------- progress


def test_progress_callback_and_bar(gap_video: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    seen: list[tuple[int, int]] = []
    prepare_avatar(gap_video, cache_dir=tmp_path, progress=False, use_cache=False,
                   on_progress=lambda done, total: seen.append((done, total)),
                   options=PrepareOptions(max_frames=5))
    assert seen == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]
    assert capsys.readouterr().err == ""
    seen.clear()
    prepare_avatar(gap_video, cache_dir=tmp_path, progress="always", use_cache=False,
                   on_progress=lambda done, total: seen.append((done, total)),
                   options=PrepareOptions(max_frames=3))
    assert seen[-1] == (3, 3)
    err = capsys.readouterr().err
    assert "preparing avatar" in err and "gap.mp4" in err


# ----------------------------------------------------------------------------- API details


def _dummy(count: int) -> PreparedAvatar:
    return PreparedAvatar(
        frames=np.zeros((count, 8, 8, 3), np.uint8), fps=25.0,
        landmarks=np.zeros((count, 468, 2), np.float32),
        raw_landmarks=np.zeros((count, 468, 2), np.float32),
        boxes=np.zeros((count, 4), np.float32), crop_boxes=np.zeros((count, 4), np.int32),
        masks=np.zeros((count, 16, 16), np.uint8), multiple_faces_frames=(),
        interpolated_frames=(), clipped_crop_frames=(), source="<array>", content_hash="x",
        engine_version="1", cache_key="k", from_cache=False)


def test_ping_pong_index() -> None:
    assert [_dummy(4).ping_pong_index(i) for i in range(13)] == \
        [0, 1, 2, 3, 2, 1, 0, 1, 2, 3, 2, 1, 0]
    assert [_dummy(2).ping_pong_index(i) for i in range(5)] == [0, 1, 0, 1, 0]
    assert [_dummy(1).ping_pong_index(i) for i in range(3)] == [0, 0, 0]
    assert _dummy(1).is_still and not _dummy(2).is_still and len(_dummy(3)) == 3
    with pytest.raises(ValueError, match="i: expected"):
        _dummy(3).ping_pong_index(-1)


def test_prepared_avatar_checks_its_arrays() -> None:
    good = _dummy(2)
    with pytest.raises(ValueError, match="landmarks: expected float32"):
        PreparedAvatar(**{**good.__dict__, "landmarks": np.zeros((3, 468, 2), np.float32)})
    with pytest.raises(ValueError, match="interpolated_frames"):
        PreparedAvatar(**{**good.__dict__, "interpolated_frames": (2,)})


@pytest.mark.parametrize(("field", "value"), [
    ("min_face_size", 0), ("missing_face", "skip"), ("smoothing", -0.5),
    ("smoothing", float("nan")), ("crop_scale", 0.9), ("mask_size", 8), ("feather", 0.9),
    ("max_frames", 0), ("max_seconds", 0.0), ("colour", "red"),
])
def test_prepare_options_validation(field: str, value: object) -> None:
    with pytest.raises(ValidationError, match=field):
        PrepareOptions.model_validate({field: value})


def test_prepare_options_are_frozen() -> None:
    options = PrepareOptions(smoothing=2)
    assert options.smoothing == 2.0
    with pytest.raises(ValidationError):
        options.smoothing = 3.0  # type: ignore[misc]


def test_import_avatarkit_stays_light() -> None:
    code = ("import sys, avatarkit, avatarkit.local_engine, avatarkit.errors; "
            "heavy = {'mediapipe', 'cv2', 'torch', 'av'} & "
            "{m.split('.')[0] for m in sys.modules}; print(sorted(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
    code = ("import sys, avatarkit.local_engine.avatar; "
            "print('mediapipe' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"     # mediapipe loads only when a face is analysed
