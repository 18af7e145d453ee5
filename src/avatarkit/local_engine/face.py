"""Faces in avatar frames: mediapipe landmarks, temporal smoothing, square crops, lower-face masks.

Everything here works on RGB ``uint8`` frames of shape ``(H, W, 3)`` and on landmark arrays of
shape ``(468, 2)`` (one frame) or ``(N, 468, 2)`` (a track over N frames) holding ``(x, y)``
pixel coordinates as ``float32``. Pixel coordinates are continuous: pixel ``(i, j)`` covers
``[j, j + 1) x [i, i + 1)``, so a normalised mediapipe coordinate ``u`` maps to ``u * width``.

How a frame is analysed (:meth:`FaceAnalyzer.analyze`)
-----------------------------------------------------
mediapipe's FaceMesh finds faces with its own *short-range* detector, which misses faces that
fill less than roughly a fifth of the frame (the astronaut's 100 px face in a 512 px canvas is
found, a 55 px one or a 100 px one in a 1024x512 canvas is not). So the two mediapipe graphs are
combined:

1. ``FaceDetection(model_selection=1)`` (full-range model) finds every face in the full frame.
   Its boxes count the faces (``face_count``) and pick the chosen face: the largest box whose
   crop the mesh accepts (a box it rejects is taken for a false detection). The
   detector sees its input shrunk to 192 x 192, so in a large frame a small face shrinks to a
   few pixels (a 74 px face on a 1920x1080 canvas is missed in four of six positions). When
   the full frame gives nothing and the frame is larger than ``DETECT_TILE``, the detector
   runs again on square tiles of the frame at its own resolution: ``DETECT_TILE`` px with
   half-tile overlap (so every face up to half a tile lies whole inside one), then tiles
   twice that size, and so on up to the frame's shorter side. Overlapping finds of one face
   are merged (the most confident box is kept). ``analyze(frame, thorough=True)`` searches
   the tiles even when the whole frame shows a face, so that a small face beside a large one
   is counted (preparation does this for the first frame of the media).
2. FaceMesh (``static_image_mode=True``, ``max_num_faces=4``, no refined landmarks) runs on a
   square crop of side ``MESH_CROP_SCALE`` x the chosen detection box (zero-padded where it
   leaves the frame, upscaled to at least ``MESH_MIN_INPUT`` px); of the meshes found in the crop
   the one nearest the crop's centre is kept, and its 468 landmarks are mapped back to frame
   pixels.
3. When the detector finds nothing (or the mesh fails on the crop), FaceMesh runs on the full
   frame as a fallback (it catches some extreme close-ups the full-range detector misses); there
   the largest mesh is chosen and the meshes are counted.

The face box is always the landmark extent ``(min x, min y, max x, max y)``; the detector's box
is used only when no landmarks could be found (so that a face too small for the mesh is still
reported as too small rather than as missing). Every frame is analysed on its own (static image
mode): results do not depend on frame order and the same input always gives the same output.

Landmark indices used (mediapipe 468-point topology; checked on ``skimage.data.astronaut()``)
--------------------------------------------------------------------------------------------
- ``FACE_OVAL``: the 36 points of ``mediapipe.solutions.face_mesh.FACEMESH_FACE_OVAL`` as one
  ordered loop (10 = top of the forehead, 152 = chin, 234 / 454 = the outermost cheek points
  at eye level, image-left / image-right).
- ``LIPS_OUTER``: the 20 points of the outer lip contour (61 / 291 = mouth corners, 0 = top of
  the upper lip, 17 = bottom of the lower lip). 13 / 14 are the inner upper / lower lip centres.
- ``NOSE_BOTTOM = 2`` (subnasale, where the nose meets the upper lip). On the astronaut (512 px,
  face ~100 px) the nose tip 1 is at y = 131, 2 at y = 134, 94 at y = 133.6, 164 at y = 136
  (between nose and lip), the upper lip top 0 at y = 140, the mouth 13 / 14 at y = 143 / 150,
  the chin 152 at y = 175 and the forehead 10 at y = 72.

The lower-face mask (:func:`lower_face_mask`)
---------------------------------------------
The region the lip-sync model may repaint: the face oval cut by the *nose line* (the line through
landmark 2, parallel to the 234 -> 454 cheek axis, so it follows head roll), keeping the part on
the chin's side, united with the outer lips polygon. Points below the nose line are stretched
away from it by ``LOWER_FACE_STRETCH`` (10 %) of their distance, so a chin that drops when the
generated mouth opens stays inside the mask (MuseTalk v1.5 adds a 10 px chin margin for the same
reason). The polygon is rasterised with ``cv2.fillPoly`` (sub-pixel precision) directly at the
stored ``size`` in the crop's coordinates (the same result as rasterising at crop resolution and
resizing, for less work), then feathered with a Gaussian blur whose kernel is ``feather`` x the
side (odd, as MuseTalk's ``int(0.1 * side // 2 * 2) + 1``). The blur straddles the polygon's
edge, so the feathered band also reaches a few pixels above the nose line: on the astronaut the
nose tip (3 px above landmark 2) gets about 50/255 with the defaults, the forehead, eyes and
cheeks get 0.

Nothing here imports mediapipe until :func:`open_face_analyzer` is called.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

import cv2
import numpy as np
from numpy.typing import NDArray

__all__ = [
    "DETECT_TILE",
    "FACE_OVAL",
    "LIPS_OUTER",
    "LOWER_FACE_STRETCH",
    "MESH_CROP_SCALE",
    "MESH_MIN_INPUT",
    "NOSE_BOTTOM",
    "NUM_LANDMARKS",
    "SMOOTHING_SECONDS",
    "FaceAnalyzer",
    "FrameFaces",
    "detection_tiles",
    "face_box",
    "fill_missing",
    "lower_face_mask",
    "open_face_analyzer",
    "smooth_tracks",
    "square_crop_box",
]

NUM_LANDMARKS = 468

# mediapipe FACEMESH_FACE_OVAL as one ordered loop (clockwise on screen, from the forehead).
FACE_OVAL: tuple[int, ...] = (
    10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377,
    152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109,
)
# Outer contour of mediapipe FACEMESH_LIPS, as one ordered loop from the image-left corner.
LIPS_OUTER: tuple[int, ...] = (
    61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 409, 270, 269, 267, 0, 37, 39, 40, 185,
)
NOSE_BOTTOM = 2
_CHIN = 152
_CHEEK_LEFT = 234   # image-left end of the face's horizontal axis
_CHEEK_RIGHT = 454  # image-right end

#: Points below the nose line move away from it by this fraction of their distance to it.
LOWER_FACE_STRETCH = 0.1
#: The mesh runs on a square crop this many times the detector box's longer side.
MESH_CROP_SCALE = 2.0
#: Crops smaller than this (px) are upscaled before the mesh runs.
MESH_MIN_INPUT = 256
#: Side (px) of the smallest detection tiles for frames where the full frame finds no face.
DETECT_TILE = 640
#: Two boxes whose intersection covers this much of the smaller one are one face.
_SAME_FACE_OVERLAP = 0.5
#: Gaussian sigma of the temporal smoother, in seconds, at ``smoothing=1``.
SMOOTHING_SECONDS = 0.06

_FloatArray = NDArray[np.float32]

# mediapipe 0.10.14 calls a protobuf API that protobuf 4.25 deprecates, on every process().
_PROTOBUF_WARNING = r"SymbolDatabase\.GetPrototype\(\) is deprecated"


@dataclass(frozen=True, eq=False)
class FrameFaces:
    """What :meth:`FaceAnalyzer.analyze` found in one frame.

    Attributes:
        face_count: how many faces were found (detector boxes, or meshes in the fallback).
        landmarks: ``(468, 2)`` float32 pixel landmarks of the chosen (largest) face, or
            ``None`` when no landmarks could be found.
        box: ``(4,)`` float32 ``(x0, y0, x1, y1)``: the landmark extent, or the detector's box
            when only the detector saw the face, or ``None`` when there is no face.
        method: ``"detector+mesh"``, ``"mesh"`` (full-frame fallback), ``"detector"`` (a face was
            detected but no landmarks found) or ``"none"``.
    """

    face_count: int
    landmarks: _FloatArray | None
    box: _FloatArray | None
    method: Literal["detector+mesh", "mesh", "detector", "none"]

    @property
    def size(self) -> float:
        """The face box's longer side in pixels (0.0 without a face)."""
        if self.box is None:
            return 0.0
        return float(max(self.box[2] - self.box[0], self.box[3] - self.box[1]))


def _import_mediapipe() -> Any:
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_PROTOBUF_WARNING, category=UserWarning)
            import mediapipe as mp  # type: ignore[import-untyped]
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise ImportError(
            "avatar preparation needs mediapipe: pip install 'avatarkit[local]'") from exc
    return mp


class FaceAnalyzer:
    """One mediapipe FaceDetection + FaceMesh pair, reused for every frame of a preparation.

    Use it as a context manager (or call :meth:`close`): the mediapipe graphs hold native
    resources. Not thread-safe; use one analyzer per thread.
    """

    def __init__(self, *, max_num_faces: int = 4, min_detection_confidence: float = 0.5) -> None:
        mp = _import_mediapipe()
        self._closed = False
        self._detector: Any = mp.solutions.face_detection.FaceDetection(
            model_selection=1, min_detection_confidence=min_detection_confidence)
        try:
            self._mesh: Any = mp.solutions.face_mesh.FaceMesh(
                static_image_mode=True, max_num_faces=max_num_faces, refine_landmarks=False,
                min_detection_confidence=min_detection_confidence)
        except BaseException:
            self._detector.close()
            raise

    def __enter__(self) -> FaceAnalyzer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Release both mediapipe graphs (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._mesh.close()
        finally:
            self._detector.close()

    def analyze(self, rgb: NDArray[np.uint8], *, thorough: bool = False) -> FrameFaces:
        """Find the faces in one RGB frame and the landmarks of the largest one.

        ``thorough`` searches the tiles of a large frame even when the whole frame already
        shows a face, so that smaller faces beside it are counted too (``face_count``);
        about ``len(detection_tiles(...))`` more detector runs (18 for 1920x1080)."""
        if self._closed:
            raise RuntimeError("FaceAnalyzer is closed")
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"expected an RGB uint8 array (H, W, 3), got {rgb.dtype} "
                             f"{rgb.shape}")
        frame = np.ascontiguousarray(rgb)
        height, width = frame.shape[:2]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_PROTOBUF_WARNING, category=UserWarning)
            whole = self._detect_in(frame, 0, 0)
            large = max(width, height) > DETECT_TILE
            detections = _largest_first(
                _merge_same_faces(whole + self._detect_tiled(frame))
                if thorough and large else whole)
            found = self._mesh_first(frame, detections)
            if found is None and large and not thorough:
                # no face the mesh accepts at the detector's 192 px view: look closer
                tiled = _largest_first(_merge_same_faces(self._detect_tiled(frame)))
                found = self._mesh_first(frame, tiled)
                detections = detections or tiled
            if found is not None:
                return found
            meshes = self._mesh_faces(frame, 0.0, 0.0, float(width), float(height))
        if meshes:
            meshes.sort(key=_box_area, reverse=True)
            chosen = meshes[0]
            return FrameFaces(max(len(meshes), len(detections)), chosen, face_box(chosen),
                              "mesh")
        if detections:
            return FrameFaces(len(detections), None, detections[0], "detector")
        return FrameFaces(0, None, None, "none")

    def _mesh_first(self, frame: NDArray[np.uint8], boxes: list[_FloatArray]) -> FrameFaces | None:
        """The landmarks around the largest box the mesh accepts (a box it rejects is taken
        for a false detection), counting every box as a face; None when it accepts none."""
        for box in boxes:
            landmarks = self._mesh_around(frame, box)
            if landmarks is not None:
                return FrameFaces(len(boxes), landmarks, face_box(landmarks), "detector+mesh")
        return None

    def _detect_tiled(self, frame: NDArray[np.uint8]) -> list[tuple[_FloatArray, float]]:
        """Detections in each of the frame's :func:`detection_tiles`, at its own resolution
        (not merged)."""
        height, width = frame.shape[:2]
        found: list[tuple[_FloatArray, float]] = []
        for x0, y0, side in detection_tiles(width, height):
            found += self._detect_in(frame[y0:y0 + side, x0:x0 + side], x0, y0)
        return found

    def _detect_in(self, image: NDArray[np.uint8], x0: int, y0: int
                   ) -> list[tuple[_FloatArray, float]]:
        """``(box, score)`` of each face the detector finds in ``image``, which shows the
        frame from ``(x0, y0)``; boxes in frame pixels."""
        height, width = image.shape[:2]
        result = self._detector.process(np.ascontiguousarray(image))
        found: list[tuple[_FloatArray, float]] = []
        for det in result.detections or ():
            rel = det.location_data.relative_bounding_box
            bx, by = x0 + rel.xmin * width, y0 + rel.ymin * height
            box = np.array([bx, by, bx + rel.width * width, by + rel.height * height],
                           dtype=np.float32)
            found.append((box, float(det.score[0]) if det.score else 0.0))
        return found

    def _mesh_around(self, frame: NDArray[np.uint8], box: _FloatArray) -> _FloatArray | None:
        side = max(1, round(MESH_CROP_SCALE * float(max(box[2] - box[0], box[3] - box[1]))))
        cx, cy = (box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0
        x0, y0 = round(float(cx) - side / 2.0), round(float(cy) - side / 2.0)
        crop = _cut_padded(frame, x0, y0, side)
        if side < MESH_MIN_INPUT:
            crop = np.asarray(cv2.resize(crop, (MESH_MIN_INPUT, MESH_MIN_INPUT),
                                         interpolation=cv2.INTER_CUBIC), dtype=np.uint8)
        meshes = self._mesh_faces(crop, float(x0), float(y0), float(side), float(side))
        if not meshes:
            return None
        centre = np.array([x0 + side / 2.0, y0 + side / 2.0])
        return min(meshes, key=lambda lm: float(np.linalg.norm(_box_centre(lm) - centre)))

    def _mesh_faces(self, image: NDArray[np.uint8], x0: float, y0: float, width: float,
                    height: float) -> list[_FloatArray]:
        """Run the mesh on ``image``, which shows the frame region ``(x0, y0, width, height)``
        (possibly resized); return landmarks in frame pixels."""
        result = self._mesh.process(np.ascontiguousarray(image))
        faces: list[_FloatArray] = []
        for face in result.multi_face_landmarks or ():
            norm = np.array([(p.x, p.y) for p in face.landmark], dtype=np.float64)
            if norm.shape != (NUM_LANDMARKS, 2):
                continue
            pts = norm * np.array([width, height]) + np.array([x0, y0])
            faces.append(pts.astype(np.float32))
        return faces


def open_face_analyzer(*, max_num_faces: int = 4) -> FaceAnalyzer:
    """Create the :class:`FaceAnalyzer` used by ``prepare_avatar`` (the one place mediapipe is
    loaded; tests may replace this factory)."""
    return FaceAnalyzer(max_num_faces=max_num_faces)


def detection_tiles(width: int, height: int, *,
                    tile: int = DETECT_TILE) -> list[tuple[int, int, int]]:
    """``(x0, y0, side)`` of the square tiles a large frame is searched in: sides ``tile``,
    ``2 * tile``, ... below the frame's shorter side (and one level at that side), each level
    stepping half a side and ending flush with the right and bottom edges."""
    tiles: list[tuple[int, int, int]] = []
    shorter = min(width, height)
    side = tile
    while True:
        side = min(side, shorter)
        step = max(1, side // 2)
        xs = sorted({*range(0, width - side + 1, step), width - side})
        ys = sorted({*range(0, height - side + 1, step), height - side})
        tiles += [(x, y, side) for y in ys for x in xs]
        if side >= shorter:
            return tiles
        side *= 2


def _largest_first(found: list[tuple[_FloatArray, float]]) -> list[_FloatArray]:
    boxes = [box for box, _ in found]
    boxes.sort(key=_area, reverse=True)
    return boxes


def _merge_same_faces(found: list[tuple[_FloatArray, float]]
                      ) -> list[tuple[_FloatArray, float]]:
    """One box per face: of boxes whose intersection covers ``_SAME_FACE_OVERLAP`` of the
    smaller one, the most confident (then the larger) is kept."""
    ordered = sorted(found, key=lambda f: (f[1], _area(f[0])), reverse=True)
    kept: list[tuple[_FloatArray, float]] = []
    for box, score in ordered:
        if all(_overlap_of_smaller(box, other) < _SAME_FACE_OVERLAP for other, _ in kept):
            kept.append((box, score))
    return kept


def _overlap_of_smaller(a: _FloatArray, b: _FloatArray) -> float:
    w = min(float(a[2]), float(b[2])) - max(float(a[0]), float(b[0]))
    h = min(float(a[3]), float(b[3])) - max(float(a[1]), float(b[1]))
    if w <= 0 or h <= 0:
        return 0.0
    smaller = min(_area(a), _area(b))
    return w * h / smaller if smaller > 0 else 0.0


def _cut_padded(frame: NDArray[np.uint8], x0: int, y0: int, side: int) -> NDArray[np.uint8]:
    """The square ``[x0, x0 + side) x [y0, y0 + side)`` of ``frame``, black where outside."""
    height, width = frame.shape[:2]
    out = np.zeros((side, side, 3), dtype=np.uint8)
    sx0, sy0 = max(x0, 0), max(y0, 0)
    sx1, sy1 = min(x0 + side, width), min(y0 + side, height)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = frame[sy0:sy1, sx0:sx1]
    return out


def _area(box: _FloatArray) -> float:
    """The area of an ``(x0, y0, x1, y1)`` box."""
    return float((box[2] - box[0]) * (box[3] - box[1]))


def _box_area(landmarks: _FloatArray) -> float:
    return _area(face_box(landmarks))


def _box_centre(landmarks: _FloatArray) -> NDArray[np.float64]:
    box = face_box(landmarks).astype(np.float64)
    return np.array([(box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0])


def face_box(landmarks: NDArray[np.floating[Any]]) -> _FloatArray:
    """The landmark extent ``(x0, y0, x1, y1)`` of ``(468, 2)`` or ``(N, 468, 2)`` landmarks
    (shape ``(4,)`` or ``(N, 4)``)."""
    lo = landmarks.min(axis=-2)
    hi = landmarks.max(axis=-2)
    return np.concatenate([lo, hi], axis=-1).astype(np.float32)


def fill_missing(tracks: _FloatArray, present: NDArray[np.bool_]) -> _FloatArray:
    """Fill the frames where ``present`` is False with landmarks interpolated in time.

    Linear between the nearest earlier and later frames that have a face; before the first
    (after the last) such frame, a copy of it. ``tracks`` is ``(N, 468, 2)``; the values of
    missing frames are ignored. Raises ValueError when no frame is present.
    """
    have = np.flatnonzero(present)
    if have.size == 0:
        raise ValueError("no frame has landmarks to interpolate from")
    out = np.array(tracks, dtype=np.float32, copy=True)
    missing = np.flatnonzero(~present)
    if missing.size == 0:
        return out
    after = np.searchsorted(have, missing)
    prev = have[np.clip(after - 1, 0, have.size - 1)]
    nxt = have[np.clip(after, 0, have.size - 1)]
    span = (nxt - prev).astype(np.float64)
    weight = np.where(span > 0, (missing - prev) / np.where(span > 0, span, 1.0), 0.0)
    weight = weight[:, None, None]
    filled = (1.0 - weight) * out[prev].astype(np.float64) + weight * out[nxt].astype(np.float64)
    out[missing] = filled.astype(np.float32)
    return out


def smooth_tracks(tracks: _FloatArray, *, fps: float, strength: float) -> _FloatArray:
    """Zero-phase temporal smoothing of landmark tracks ``(N, 468, 2)``.

    A Gaussian over time with sigma ``strength * SMOOTHING_SECONDS * fps`` frames (1.5 frames at
    25 fps and strength 1), truncated at 3 sigma. The kernel is symmetric, so the output does not
    lag the input; the ends are extended by odd reflection (``2 x[0] - x[k]``), which continues a
    steady motion linearly, so a constant-speed translation passes through unchanged, ends
    included. ``strength == 0`` (or fewer than 3 frames) returns an unchanged copy.
    """
    count = tracks.shape[0]
    sigma = strength * SMOOTHING_SECONDS * fps
    if count < 3 or sigma <= 0.0:
        return np.array(tracks, dtype=np.float32, copy=True)
    radius = max(1, math.ceil(3.0 * sigma))
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    flat = tracks.reshape(count, -1).astype(np.float64)
    padded = np.pad(flat, ((radius, radius), (0, 0)), mode="reflect", reflect_type="odd")
    out = np.zeros_like(flat)
    for j, weight in enumerate(kernel):
        out += weight * padded[j:j + count]
    return out.reshape(tracks.shape).astype(np.float32)


def square_crop_box(box: NDArray[np.floating[Any]], *, width: int, height: int,
                    scale: float) -> tuple[NDArray[np.int32], bool]:
    """A square crop around a face box, kept inside a ``width`` x ``height`` frame.

    Centred on the box centre with side ``round(scale * max(box w, box h))``. A square that
    leaves the frame is shifted back inside; one larger than the frame's shorter side is
    shrunk to that side (still square) and the returned flag is True. Returns
    ``((x0, y0, x1, y1) int32, clipped)`` with ``x1 - x0 == y1 - y0``.
    """
    x0f, y0f, x1f, y1f = (float(v) for v in box)
    side = max(1, round(scale * max(x1f - x0f, y1f - y0f)))
    clipped = side > min(width, height)
    if clipped:
        side = min(width, height)
    cx, cy = (x0f + x1f) / 2.0, (y0f + y1f) / 2.0
    x0 = min(max(round(cx - side / 2.0), 0), width - side)
    y0 = min(max(round(cy - side / 2.0), 0), height - side)
    return np.array([x0, y0, x0 + side, y0 + side], dtype=np.int32), clipped


def _clip_below(polygon: NDArray[np.float64], anchor: NDArray[np.float64],
                normal: NDArray[np.float64]) -> NDArray[np.float64]:
    """Sutherland-Hodgman: the part of a closed polygon where ``(p - anchor) . normal >= 0``."""
    dist = (polygon - anchor) @ normal
    out: list[NDArray[np.float64]] = []
    count = len(polygon)
    for i in range(count):
        p, q = polygon[i], polygon[(i + 1) % count]
        dp, dq = dist[i], dist[(i + 1) % count]
        if dp >= 0:
            out.append(p)
        if (dp >= 0) != (dq >= 0):
            out.append(p + (q - p) * (dp / (dp - dq)))
    return np.array(out, dtype=np.float64).reshape(-1, 2)


def lower_face_mask(landmarks: NDArray[np.floating[Any]], crop_box: NDArray[np.integer[Any]],
                    *, size: int, feather: float) -> NDArray[np.uint8]:
    """The feathered lower-face mask of one frame, ``(size, size)`` uint8 in crop coordinates.

    255 where the model's output replaces the frame (below the nose, inside the jaw line, and
    the lips), 0 where the frame is kept, soft in between. ``crop_box`` is the square
    ``(x0, y0, x1, y1)`` from :func:`square_crop_box`; ``feather`` is the blur kernel as a
    fraction of the side (0 disables the blur).
    """
    pts = np.asarray(landmarks, dtype=np.float64)
    x0, y0, x1, _ = (int(v) for v in crop_box)
    scale = size / float(x1 - x0)
    pts = (pts - np.array([x0, y0], dtype=np.float64)) * scale

    axis = pts[_CHEEK_RIGHT] - pts[_CHEEK_LEFT]
    norm = float(np.linalg.norm(axis))
    axis = axis / norm if norm > 1e-6 else np.array([1.0, 0.0])
    normal = np.array([-axis[1], axis[0]])
    anchor = pts[NOSE_BOTTOM]
    if (pts[_CHIN] - anchor) @ normal < 0:
        normal = -normal

    oval = pts[list(FACE_OVAL)]
    below = np.maximum((oval - anchor) @ normal, 0.0)
    oval = oval + LOWER_FACE_STRETCH * below[:, None] * normal
    lower = _clip_below(oval, anchor, normal)

    mask = np.zeros((size, size), dtype=np.uint8)
    for polygon in (lower, pts[list(LIPS_OUTER)]):
        if len(polygon) >= 3:
            fixed = np.round(polygon * 16.0).astype(np.int32).reshape(-1, 1, 2)
            cv2.fillPoly(mask, [fixed], 255, lineType=cv2.LINE_8, shift=4)
    kernel = int(feather * size) // 2 * 2 + 1
    if feather > 0 and kernel >= 3:
        mask = np.asarray(cv2.GaussianBlur(mask, (kernel, kernel), 0), dtype=np.uint8)
    return mask
