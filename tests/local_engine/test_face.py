"""face.py: mediapipe landmarks on real images, smoothing, interpolation, crops and masks."""

from __future__ import annotations

from collections.abc import Iterator

import cv2
import numpy as np
import pytest
from numpy.typing import NDArray

from avatarkit.local_engine import face
from avatarkit.local_engine.face import (
    FACE_OVAL,
    LIPS_OUTER,
    FaceAnalyzer,
    face_box,
    fill_missing,
    lower_face_mask,
    smooth_tracks,
    square_crop_box,
)

from . import astronaut


@pytest.fixture(scope="module")
def analyzer() -> Iterator[FaceAnalyzer]:
    with face.open_face_analyzer() as shared:
        yield shared


@pytest.fixture(scope="module")
def astronaut_landmarks(analyzer: FaceAnalyzer) -> NDArray[np.float32]:
    found = analyzer.analyze(astronaut())
    assert found.landmarks is not None
    return found.landmarks


def _loop_edges(loop: tuple[int, ...]) -> set[frozenset[int]]:
    return {frozenset((loop[i], loop[(i + 1) % len(loop)])) for i in range(len(loop))}


def test_polygon_index_lists_are_mediapipe_contours() -> None:
    import mediapipe as mp  # type: ignore[import-untyped]

    oval = {frozenset(edge) for edge in mp.solutions.face_mesh.FACEMESH_FACE_OVAL}
    lips = {frozenset(edge) for edge in mp.solutions.face_mesh.FACEMESH_LIPS}
    assert _loop_edges(FACE_OVAL) == oval            # the whole oval, in order
    assert _loop_edges(LIPS_OUTER) <= lips            # the outer lip contour, in order
    assert len(set(LIPS_OUTER)) == len(LIPS_OUTER) == 20


def test_astronaut_face_and_landmark_anatomy(analyzer: FaceAnalyzer,
                                             astronaut_landmarks: NDArray[np.float32]) -> None:
    found = analyzer.analyze(astronaut())
    assert found.face_count == 1
    assert found.method == "detector+mesh"
    assert found.landmarks is not None and found.box is not None
    lm = found.landmarks
    assert lm.shape == (468, 2) and lm.dtype == np.float32
    x0, y0, x1, y1 = found.box
    assert ((lm[:, 0] >= x0) & (lm[:, 0] <= x1) & (lm[:, 1] >= y0) & (lm[:, 1] <= y1)).all()
    # The astronaut's face is about 100 px, around (225, 125) in the 512 px image.
    assert 85 < found.size < 125
    assert 200 < (x0 + x1) / 2 < 250 and 100 < (y0 + y1) / 2 < 150
    # Top to bottom: forehead 10, nose tip 1, nose bottom 2, upper lip 0, mouth 13 / 14, chin.
    ys = [lm[i, 1] for i in (10, 1, 2, 0, 13, 14, 17, 152)]
    assert ys == sorted(ys)
    # Left to right: cheek 234, mouth corner 61, mouth centre 13, corner 291, cheek 454.
    xs = [lm[i, 0] for i in (234, 61, 13, 291, 454)]
    assert xs == sorted(xs)
    assert np.array_equal(lm, astronaut_landmarks)    # same input, same output


def test_small_face_found_through_the_full_range_detector(analyzer: FaceAnalyzer) -> None:
    # A 55 px face in a 512 px canvas: FaceMesh alone misses it, the two-stage path does not.
    small = cv2.resize(astronaut(), (256, 256), interpolation=cv2.INTER_AREA)
    canvas = np.zeros((512, 512, 3), dtype=np.uint8)
    canvas[200:456, 40:296] = small
    found = analyzer.analyze(canvas)
    assert found.landmarks is not None and found.method == "detector+mesh"
    assert 40 < found.size < 65
    # The landmarks land on the pasted face (at half scale, offset (40, 200)).
    expected = analyzer.analyze(astronaut()).landmarks
    assert expected is not None
    assert np.abs(found.landmarks - (expected / 2 + [40, 200])).mean() < 2.0



@pytest.mark.parametrize(("y", "x"), [(0, 0), (0, 1560), (720, 1560), (720, 0), (360, 780)],
                         ids=["top-left", "top-right", "bottom-right", "bottom-left", "centre"])
def test_a_small_face_in_a_1080p_frame_is_found_at_full_resolution(
        analyzer: FaceAnalyzer, y: int, x: int) -> None:
    """A 360 px portrait (a 74 px face) on a 1920x1080 canvas: the detector sees the frame
    shrunk to 192 px and misses it in most places; the tiles find it wherever it is."""
    portrait = np.asarray(cv2.resize(astronaut(), (360, 360), interpolation=cv2.INTER_AREA),
                          dtype=np.uint8)
    canvas = np.full((1080, 1920, 3), 40, dtype=np.uint8)
    canvas[y:y + 360, x:x + 360] = portrait
    found = analyzer.analyze(canvas)
    assert found.method == "detector+mesh" and found.face_count == 1
    assert found.landmarks is not None and 65 < found.size < 85
    expected = analyzer.analyze(portrait).landmarks
    assert expected is not None
    assert np.abs(found.landmarks - (expected + np.array([x, y]))).mean() < 2.0


def test_detection_tiles_cover_every_small_face() -> None:
    """Every square up to half a tile lies whole inside one tile, at every level; tiles stay
    inside the frame; a frame no larger than a tile has a single level at its shorter side."""
    for width, height in ((1920, 1080), (1081, 1919), (3840, 2160), (700, 641)):
        tiles = face.detection_tiles(width, height)
        assert all(x >= 0 and y >= 0 and x + side <= width and y + side <= height
                   for x, y, side in tiles)
        smallest = min(side for _, _, side in tiles)
        assert smallest == min(face.DETECT_TILE, width, height)
        half = smallest // 2
        rng = np.random.default_rng(width)
        for _ in range(300):
            fx, fy = int(rng.integers(0, width - half + 1)), int(rng.integers(0, height - half + 1))
            assert any(x <= fx and y <= fy and fx + half <= x + side and fy + half <= y + side
                       for x, y, side in tiles if side == smallest), (width, height, fx, fy)
        assert max(side for _, _, side in tiles) == min(width, height)


def test_several_faces_count_and_the_largest_is_chosen(analyzer: FaceAnalyzer) -> None:
    canvas = np.full((1080, 1920, 3), 40, dtype=np.uint8)
    canvas[100:612, 100:612] = astronaut()
    canvas[600:960, 1400:1760] = cv2.resize(astronaut(), (360, 360),
                                            interpolation=cv2.INTER_AREA)
    found = analyzer.analyze(canvas)
    assert found.face_count == 2 and found.box is not None
    assert 90 < found.size < 125 and found.box[0] < 612  # the big face, left

def test_nothing_found_in_black_or_noise(analyzer: FaceAnalyzer) -> None:
    rng = np.random.default_rng(3)
    for frame in (np.zeros((256, 320, 3), np.uint8),
                  rng.integers(0, 256, (256, 320, 3), dtype=np.uint8)):
        found = analyzer.analyze(frame)
        assert found.face_count == 0 and found.landmarks is None and found.box is None
        assert found.method == "none" and found.size == 0.0


def test_analyze_rejects_non_rgb(analyzer: FaceAnalyzer) -> None:
    with pytest.raises(ValueError, match="RGB uint8"):
        analyzer.analyze(np.zeros((64, 64), np.uint8))


def test_closed_analyzer_refuses_work() -> None:
    closing = face.open_face_analyzer()
    closing.close()
    closing.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        closing.analyze(astronaut())


def _track(values: list[float]) -> NDArray[np.float32]:
    """(N, 468, 2) landmarks all at (v, 2v) in frame i."""
    base = np.array(values, dtype=np.float32)[:, None, None]
    return np.broadcast_to(base * np.array([1.0, 2.0], np.float32), (len(values), 468, 2)).copy()


def test_fill_missing_interpolates_between_neighbours_and_copies_at_ends() -> None:
    tracks = _track([0, 99, 99, 30, 40, 99, 99])
    present = np.array([False, False, True, True, False, True, False])
    tracks[2, 0, 0] = 10.0
    tracks[5] = _track([70])[0]
    filled = fill_missing(tracks, present)
    assert filled[:, 1, 0].tolist() == pytest.approx([99, 99, 99, 30, 50, 70, 70])
    assert filled[0, 0, 0] == filled[1, 0, 0] == 10.0   # copied from frame 2 at the start
    assert np.array_equal(filled[present], tracks[present])
    with pytest.raises(ValueError, match="no frame"):
        fill_missing(tracks, np.zeros(7, dtype=bool))


def test_smoothing_is_zero_phase_and_keeps_steady_motion() -> None:
    ramp = _track([3.0 + 1.7 * i for i in range(40)])
    assert np.allclose(smooth_tracks(ramp, fps=25, strength=2.0), ramp, atol=1e-4)  # ends too
    rng = np.random.default_rng(0)
    noisy = ramp + rng.normal(0, 1.0, ramp.shape).astype(np.float32)
    smoothed = smooth_tracks(noisy, fps=25, strength=1.0)
    jitter_in = np.abs(np.diff(noisy, axis=0)).mean()
    jitter_out = np.abs(np.diff(smoothed, axis=0) - 1.7 * np.array([1, 2])).mean()
    assert jitter_out < 0.3 * jitter_in
    assert abs(float((smoothed - ramp).mean())) < 0.1      # no lag, no bias
    assert np.array_equal(smooth_tracks(noisy, fps=25, strength=0.0), noisy)
    assert np.array_equal(smooth_tracks(noisy[:2], fps=25, strength=1.0), noisy[:2])


def test_square_crop_box_centred_shifted_or_shrunk() -> None:
    box = np.array([100.0, 120.0, 180.0, 220.0])  # 80 x 100, centre (140, 170)
    crop, clipped = square_crop_box(box, width=512, height=512, scale=1.5)
    assert crop.tolist() == [65, 95, 215, 245] and not clipped
    assert crop.dtype == np.int32
    # Near the top-left corner: shifted inside, still 150 px square.
    crop, clipped = square_crop_box(box - 100, width=512, height=512, scale=1.5)
    assert crop.tolist() == [0, 0, 150, 150] and not clipped
    # Larger than the frame's shorter side: shrunk to it, flagged.
    crop, clipped = square_crop_box(box, width=300, height=140, scale=1.5)
    assert crop.tolist() == [70, 0, 210, 140] and clipped


def _mask_at(mask: NDArray[np.uint8], lm: NDArray[np.float32], crop: NDArray[np.int32],
             index: int) -> int:
    x, y = (lm[index] - crop[:2]) * mask.shape[0] / float(crop[2] - crop[0])
    return int(mask[int(y), int(x)])


def test_lower_face_mask_covers_mouth_not_forehead(
        astronaut_landmarks: NDArray[np.float32]) -> None:
    lm = astronaut_landmarks
    crop, _ = square_crop_box(face_box(lm), width=512, height=512, scale=1.5)
    hard = lower_face_mask(lm, crop, size=128, feather=0.0)
    assert set(np.unique(hard).tolist()) == {0, 255}
    soft = lower_face_mask(lm, crop, size=128, feather=0.08)
    assert soft.shape == (128, 128) and soft.dtype == np.uint8
    assert ((soft > 0) & (soft < 255)).any()
    for index in (13, 14, 0, 17, 61, 291):     # the mouth and lips
        assert _mask_at(soft, lm, crop, index) > 200, index
    for index in (10, 33, 263, 234, 454):      # forehead, eye corners, cheeks
        assert _mask_at(soft, lm, crop, index) == 0, index
    # The nose tip sits 3 px above the nose line: only the feathered edge reaches it.
    assert _mask_at(hard, lm, crop, 1) == 0
    assert _mask_at(soft, lm, crop, 1) < 100


def test_lower_face_mask_follows_head_roll(astronaut_landmarks: NDArray[np.float32]) -> None:
    # Roll the landmarks 25 degrees about the nose: the mask rolls with them.
    lm = astronaut_landmarks
    centre = lm[1]
    angle = np.deg2rad(25.0)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    rolled = ((lm - centre) @ rot.T + centre).astype(np.float32)
    crop, _ = square_crop_box(face_box(rolled), width=512, height=512, scale=1.5)
    mask = lower_face_mask(rolled, crop, size=256, feather=0.08)
    for index in (13, 14, 61, 291):
        assert _mask_at(mask, rolled, crop, index) > 200, index
    for index in (10, 33, 263, 234, 454):
        assert _mask_at(mask, rolled, crop, index) == 0, index
    assert _mask_at(mask, rolled, crop, 1) < 100
