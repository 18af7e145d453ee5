"""Avatar preparation for the local engine: media in, a cached :class:`PreparedAvatar` out.

``prepare_avatar(source)`` reads an image (PNG/JPEG/WebP/... via Pillow, EXIF orientation
applied, first frame of an animation), a video (PyAV; every frame decoded to RGB, the display
rotation applied, the stream's average frame rate read) or an RGB ``uint8`` array ``(H, W, 3)``;
finds the face and its 468 mediapipe landmarks in every frame (:mod:`.face`); smooths the
landmark tracks over time; and derives per frame the face box, a square crop box and a feathered
lower-face mask. The result is cached on disk, keyed by the media's bytes, the options and the
versions, so preparing the same avatar again costs one file read and never loads mediapipe.

Choices made here (MuseTalk's ``prepare_material`` for comparison, see
``shared/research/musetalk-internals.md`` §2.1):

- Frame indices never shift. A frame without a face raises :class:`NoFaceError` naming it, or
  with ``missing_face="interpolate"`` keeps its index and gets landmarks interpolated linearly
  between the nearest frames that have a face (copied at the ends), and is listed in
  ``interpolated_frames`` (MuseTalk skipped such frames for latents only, misaligning the rest).
- Several faces in a frame: the largest (by detector box) is used, the frame is listed in
  ``multiple_faces_frames``, ``faces_found`` is the most faces seen in one frame, and one
  warning is logged per preparation (``avatarkit render`` reports the choice). The first
  frame is searched thoroughly (every tile of a large frame), so a small second face is
  counted there; later frames are searched only until a face is found.
- Faces are found at the media's own resolution (see :mod:`.face`: a small face in a large
  frame is searched for in tiles), and the prepared frames keep that resolution.
- ``raw_landmarks`` are the per-frame mediapipe results (interpolated where listed);
  ``landmarks`` are the temporally smoothed tracks (zero-phase Gaussian, see
  :func:`.face.smooth_tracks`); ``boxes``, ``crop_boxes`` and ``masks`` derive from the smoothed
  ones, so they do not jitter.
- Crop boxes are always square and inside the frame: shifted back in when they leave it, shrunk
  to the frame's shorter side when they cannot fit (listed in ``clipped_crop_frames``).
- The cache is one ``<key>.npz`` (``np.savez``, no pickled objects; loaded with
  ``allow_pickle=False``) plus a ``<key>.json`` sidecar for people and tools, both written to a
  temporary file and moved into place with ``os.replace``. An unreadable or inconsistent cache
  file is logged and rebuilt; a cache that cannot be written is logged and skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field

from ..errors import FaceTooSmallError, MediaReadError, NoFaceError
from . import face as _face

__all__ = [
    "PREPARATION_VERSION",
    "STILL_IMAGE_FPS",
    "PrepareOptions",
    "PreparedAvatar",
    "ProgressCallback",
    "cache_key",
    "default_cache_dir",
    "prepare_avatar",
    "read_cache_npz",
    "write_atomic",
]

#: Bumped whenever preparation output changes for the same input and options.
PREPARATION_VERSION = "2"
#: The frame rate reported for a still image.
STILL_IMAGE_FPS = 25.0

logger = logging.getLogger("avatarkit.local_engine.avatar")

ProgressCallback = Callable[[int, int], None]


class PrepareOptions(BaseModel):
    """How :func:`prepare_avatar` prepares an avatar. Part of the cache key."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_face_size: int = Field(
        64, ge=1, description="smallest accepted face box (longer side, px); smaller faces "
                              "raise FaceTooSmallError")
    missing_face: Literal["error", "interpolate"] = Field(
        "error", description="a frame without a face: raise NoFaceError, or interpolate its "
                             "landmarks from the nearest frames with a face")
    smoothing: float = Field(
        1.0, ge=0.0, le=10.0, allow_inf_nan=False,
        description="temporal smoothing strength (Gaussian sigma = 0.06 s x smoothing); "
                    "0 disables")
    crop_scale: float = Field(
        1.5, ge=1.0, le=4.0, allow_inf_nan=False,
        description="side of the square crop as a multiple of the face box's longer side")
    mask_size: int = Field(256, ge=16, le=2048, description="side of the stored masks (px)")
    feather: float = Field(
        0.08, ge=0.0, le=0.5, allow_inf_nan=False,
        description="mask blur kernel as a fraction of the mask side; 0 gives a hard mask")
    max_frames: int | None = Field(
        None, ge=1, description="read at most this many video frames")
    max_seconds: float | None = Field(
        None, gt=0.0, allow_inf_nan=False,
        description="read at most this many seconds of video (floor(seconds x fps) frames, "
                    "at least one)")


_ARRAY_FIELDS = ("frames", "landmarks", "raw_landmarks", "boxes", "crop_boxes", "masks")
_INDEX_FIELDS = ("multiple_faces_frames", "interpolated_frames", "clipped_crop_frames")


@dataclass(frozen=True, eq=False)
class PreparedAvatar:
    """An avatar ready for the local engine. Arrays are read-only; N is the frame count.

    Attributes:
        frames: ``(N, H, W, 3)`` uint8 RGB (N = 1 for a still image).
        fps: the video's frame rate (``STILL_IMAGE_FPS`` for a still image).
        landmarks: ``(N, 468, 2)`` float32 pixel landmarks, temporally smoothed.
        raw_landmarks: ``(N, 468, 2)`` float32, as mediapipe found them (interpolated for the
            frames in ``interpolated_frames``).
        boxes: ``(N, 4)`` float32 face boxes ``(x0, y0, x1, y1)``, the smoothed landmark extent.
        crop_boxes: ``(N, 4)`` int32 square crops ``(x0, y0, x1, y1)``, inside the frame.
        masks: ``(N, mask_size, mask_size)`` uint8 lower-face masks in crop coordinates
            (255 = replace with the model's output, 0 = keep the frame).
        multiple_faces_frames: frames where more than one face was found (largest used).
        interpolated_frames: frames without a face whose landmarks were interpolated.
        clipped_crop_frames: frames whose crop had to shrink to fit inside the frame.
        faces_found: the most faces found in one frame (1 unless several were seen).
        source: the media path, or ``"<array>"``.
        content_hash: sha256 (hex) of the media bytes (or of the array's shape, dtype, bytes).
        engine_version: the engine version the preparation was made for.
        cache_key: the cache entry's key (sha256 hex).
        from_cache: True when this came from the on-disk cache without running mediapipe.
    """

    frames: NDArray[np.uint8]
    fps: float
    landmarks: NDArray[np.float32]
    raw_landmarks: NDArray[np.float32]
    boxes: NDArray[np.float32]
    crop_boxes: NDArray[np.int32]
    masks: NDArray[np.uint8]
    multiple_faces_frames: tuple[int, ...]
    interpolated_frames: tuple[int, ...]
    clipped_crop_frames: tuple[int, ...]
    source: str
    content_hash: str
    engine_version: str
    cache_key: str
    from_cache: bool
    faces_found: int = 1

    def __post_init__(self) -> None:
        n = self.frames.shape[0] if self.frames.ndim == 4 else -1
        expected: dict[str, tuple[tuple[int | None, ...], type]] = {
            "frames": ((n, None, None, 3), np.uint8),
            "landmarks": ((n, _face.NUM_LANDMARKS, 2), np.float32),
            "raw_landmarks": ((n, _face.NUM_LANDMARKS, 2), np.float32),
            "boxes": ((n, 4), np.float32),
            "crop_boxes": ((n, 4), np.int32),
            "masks": ((n, None, None), np.uint8),
        }
        if n < 1:
            raise ValueError(f"frames: expected (N >= 1, H, W, 3) uint8, got "
                             f"{self.frames.dtype} {self.frames.shape}")
        for name, (shape, dtype) in expected.items():
            value = getattr(self, name)
            if not isinstance(value, np.ndarray) or value.dtype != dtype or \
                    value.ndim != len(shape) or any(
                        want is not None and got != want
                        for got, want in zip(value.shape, shape, strict=True)):
                got = (f"{value.dtype} {value.shape}" if isinstance(value, np.ndarray)
                       else type(value).__name__)
                raise ValueError(f"{name}: expected {np.dtype(dtype)} of shape {shape} "
                                 f"(None = any), got {got}")
            view = value.view()
            view.setflags(write=False)
            object.__setattr__(self, name, view)
        if self.masks.shape[1] != self.masks.shape[2]:
            raise ValueError(f"masks: expected square masks, got {self.masks.shape}")
        if not (math.isfinite(self.fps) and self.fps > 0):
            raise ValueError(f"fps: expected a positive number, got {self.fps}")
        if self.faces_found < 1:
            raise ValueError(f"faces_found: expected >= 1, got {self.faces_found}")
        for name in _INDEX_FIELDS:
            indices = tuple(int(i) for i in getattr(self, name))
            if any(not 0 <= i < n for i in indices):
                raise ValueError(f"{name}: frame indices must lie in [0, {n}), got {indices}")
            object.__setattr__(self, name, indices)

    def __len__(self) -> int:
        return int(self.frames.shape[0])

    def __repr__(self) -> str:
        height, width = self.frames.shape[1:3]
        return (f"PreparedAvatar(source={self.source!r}, frames={len(self)}, size={width}x"
                f"{height}, fps={self.fps:g}, from_cache={self.from_cache})")

    @property
    def is_still(self) -> bool:
        """True for a single frame (a still image, or a one-frame video)."""
        return len(self) == 1

    def ping_pong_index(self, i: int) -> int:
        """The frame to show at step ``i`` of an idle loop that plays forward then backward.

        ``0, 1, ..., N-1, N-2, ..., 1, 0, 1, ...`` (period ``2N - 2``; the end frames are not
        repeated at the turns). Always 0 for a single frame.
        """
        if i < 0:
            raise ValueError(f"i: expected a step >= 0, got {i}")
        n = len(self)
        if n == 1:
            return 0
        period = 2 * n - 2
        j = i % period
        return j if j < n else period - j


# ----------------------------------------------------------------------------- the cache


def default_cache_dir() -> Path:
    """``$AVATARKIT_CACHE_DIR/avatars`` when that variable is set, else
    ``~/.cache/avatarkit/avatars``."""
    env = os.environ.get("AVATARKIT_CACHE_DIR")
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "avatarkit"
    return base / "avatars"


def cache_key(content_hash: str, options: PrepareOptions, engine_version: str) -> str:
    """The cache key: sha256 (hex) of the canonical JSON of the media hash, the preparation
    version, the options and the engine version."""
    payload = {
        "content": content_hash,
        "preparation": PREPARATION_VERSION,
        "options": options.model_dump(mode="json"),
        "engine": engine_version,
    }
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def read_cache_npz(path: Path, key: str,
                   names: Sequence[str]) -> tuple[dict[str, Any], dict[str, NDArray[Any]]]:
    """The JSON ``meta`` entry and the arrays ``names`` of a cache archive written by this
    package (``np.load`` without pickles); ValueError when it is not one or its key is not
    ``key``."""
    with path.open("rb") as handle:
        loaded = np.load(handle, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError("not an .npz archive")
        with loaded as data:
            meta = json.loads(str(data["meta"][()]))
            if not isinstance(meta, dict) or meta.get("key") != key:
                raise ValueError("the file's key does not match its name")
            return meta, {name: np.asarray(data[name]) for name in names}


def _load_cached(path: Path, key: str, source: str) -> PreparedAvatar | None:
    if not path.exists():
        return None
    try:
        meta, arrays = read_cache_npz(path, key, (*_ARRAY_FIELDS, *_INDEX_FIELDS))
        indices = {name: tuple(int(i) for i in arrays[name]) for name in _INDEX_FIELDS}
        return PreparedAvatar(
            frames=arrays["frames"], fps=float(meta["fps"]), landmarks=arrays["landmarks"],
            raw_landmarks=arrays["raw_landmarks"], boxes=arrays["boxes"],
            crop_boxes=arrays["crop_boxes"], masks=arrays["masks"],
            multiple_faces_frames=indices["multiple_faces_frames"],
            interpolated_frames=indices["interpolated_frames"],
            clipped_crop_frames=indices["clipped_crop_frames"], source=source,
            content_hash=str(meta["content_hash"]), engine_version=str(meta["engine_version"]),
            cache_key=key, from_cache=True, faces_found=int(meta["faces_found"]))
    except Exception as exc:  # any way a damaged file can fail: ignore it and rebuild
        logger.warning("ignoring unreadable avatar cache file %s (%s: %s); preparing again",
                       path, type(exc).__name__, exc)
        return None


def write_atomic(path: Path, write: Callable[[Any], None]) -> None:
    """Write ``path`` through ``write(handle)`` into a temporary file beside it, fsync, then
    move it into place: readers see the old file or the whole new one, never a part."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise


def _store(avatar: PreparedAvatar, directory: Path, options: PrepareOptions) -> None:
    height, width = avatar.frames.shape[1:3]
    meta = {
        "key": avatar.cache_key,
        "source": avatar.source,
        "content_hash": avatar.content_hash,
        "preparation_version": PREPARATION_VERSION,
        "engine_version": avatar.engine_version,
        "options": options.model_dump(mode="json"),
        "frames": len(avatar),
        "width": int(width),
        "height": int(height),
        "fps": avatar.fps,
        "multiple_faces_frames": list(avatar.multiple_faces_frames),
        "faces_found": avatar.faces_found,
        "interpolated_frames": list(avatar.interpolated_frames),
        "clipped_crop_frames": list(avatar.clipped_crop_frames),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    arrays: dict[str, NDArray[Any]] = {name: getattr(avatar, name) for name in _ARRAY_FIELDS}
    for name in _INDEX_FIELDS:
        arrays[name] = np.asarray(getattr(avatar, name), dtype=np.int64)
    arrays["meta"] = np.array(json.dumps(meta, sort_keys=True))
    try:
        directory.mkdir(parents=True, exist_ok=True)
        write_atomic(directory / f"{avatar.cache_key}.npz",
                      lambda handle: np.savez(handle, allow_pickle=False, **arrays))
        text = json.dumps(meta, indent=2, sort_keys=True).encode("utf-8")
        write_atomic(directory / f"{avatar.cache_key}.json", lambda handle: handle.write(text))
    except OSError as exc:
        logger.warning("could not write the avatar cache in %s (%s); continuing without it",
                       directory, exc)


# ----------------------------------------------------------------------------- reading media


def _hash_file(path: Path, label: str) -> str:
    if not path.exists():
        raise MediaReadError(label, "the file does not exist")
    if not path.is_file():
        raise MediaReadError(label, "not a regular file")
    digest = hashlib.sha256()
    try:
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        size = path.stat().st_size
    except OSError as exc:
        raise MediaReadError(label, f"cannot read the file ({exc.strerror or exc})") from exc
    if size == 0:
        raise MediaReadError(label, "the file is empty")
    return digest.hexdigest()


def _hash_array(array: NDArray[Any]) -> str:
    digest = hashlib.sha256(f"array:{array.shape}:{array.dtype.str}:".encode("ascii"))
    digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _read_image(path: Path, label: str) -> NDArray[np.uint8] | None:
    """The image's RGB pixels, or None when Pillow does not recognise the file as an image."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            upright = ImageOps.exif_transpose(image)
            rgb = np.asarray(upright.convert("RGB"), dtype=np.uint8)
    except UnidentifiedImageError:
        return None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise MediaReadError(label, f"cannot decode the image ({exc})") from exc
    if rgb.ndim != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise MediaReadError(label, f"the image has no pixels (shape {rgb.shape})")
    return np.ascontiguousarray(rgb)


def _frame_limit(options: PrepareOptions, fps: float) -> int | None:
    limits = []
    if options.max_frames is not None:
        limits.append(options.max_frames)
    if options.max_seconds is not None:
        limits.append(max(1, math.floor(options.max_seconds * fps + 1e-9)))
    return min(limits) if limits else None


def _read_video(path: Path, label: str,
                options: PrepareOptions) -> tuple[NDArray[np.uint8], float]:
    import av

    try:
        container = av.open(str(path), mode="r")
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise MediaReadError(label, f"neither an image nor a readable video ({exc})") from exc
    frames: list[NDArray[np.uint8]] = []
    with container:
        if not container.streams.video:
            raise MediaReadError(label, "the file has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate is not None and rate > 0 else STILL_IMAGE_FPS
        limit = _frame_limit(options, fps)
        try:
            for frame in container.decode(stream):
                rgb = frame.to_ndarray(format="rgb24")
                turns = round(frame.rotation / 90) % 4 if frame.rotation else 0
                if turns:
                    rgb = np.rot90(rgb, k=turns)
                if frames and rgb.shape != frames[0].shape:
                    raise MediaReadError(label, f"frame {len(frames)} is {rgb.shape[1]}x"
                                                f"{rgb.shape[0]}, frame 0 is {frames[0].shape[1]}"
                                                f"x{frames[0].shape[0]}")
                frames.append(np.ascontiguousarray(rgb, dtype=np.uint8))
                if limit is not None and len(frames) >= limit:
                    break
        except (av.FFmpegError, OSError, ValueError) as exc:
            raise MediaReadError(label, f"decoding failed at frame {len(frames)} ({exc})") from exc
    if not frames:
        raise MediaReadError(label, "the video has no frames")
    return np.stack(frames), fps


def _read_media(source: str | os.PathLike[str] | NDArray[Any], label: str,
                options: PrepareOptions) -> tuple[NDArray[np.uint8], float]:
    if isinstance(source, np.ndarray):
        return source[None].copy(), STILL_IMAGE_FPS
    path = Path(os.fspath(source)).expanduser()
    image = _read_image(path, label)
    if image is not None:
        return image[None], STILL_IMAGE_FPS
    return _read_video(path, label, options)


# ----------------------------------------------------------------------------- progress


@contextmanager
def _progress(mode: bool | Literal["always"], total: int, label: str,
              on_progress: ProgressCallback | None) -> Iterator[Callable[[int], None]]:
    show = mode == "always" or (mode is True and sys.stderr.isatty())
    if not show:
        def report(done: int) -> None:
            if on_progress is not None:
                on_progress(done, total)
        yield report
        return

    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True, force_terminal=True if mode == "always" else None)
    name = Path(label).name if label != "<array>" else label
    with Progress(TextColumn("[bold]preparing avatar[/] {task.description}"), BarColumn(),
                  MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task(name, total=total)

        def advance(done: int) -> None:
            bar.update(task, completed=done)
            if on_progress is not None:
                on_progress(done, total)
        yield advance


# ----------------------------------------------------------------------------- preparation


def _analyse(frames: NDArray[np.uint8], label: str, options: PrepareOptions,
             report: Callable[[int], None]) -> tuple[NDArray[np.float32], NDArray[np.bool_],
                                                     list[int], int]:
    """Landmarks per frame, which frames have a face, the frames with several faces, and
    the most faces seen in one frame."""
    count = frames.shape[0]
    still = count == 1
    raw = np.zeros((count, _face.NUM_LANDMARKS, 2), dtype=np.float32)
    present = np.zeros(count, dtype=bool)
    multiple: list[int] = []
    most = 1
    where = "" if still else "frame {} of "
    with _face.open_face_analyzer(max_num_faces=4) as analyzer:
        for i in range(count):
            # the first frame is searched thoroughly, so that every face in the media is
            # counted (and the choice reported); later ones only as far as finding one needs
            found = analyzer.analyze(frames[i], thorough=i == 0)
            if found.face_count > 1:
                multiple.append(i)
                most = max(most, found.face_count)
            if found.box is not None and found.size < options.min_face_size:
                raise FaceTooSmallError(
                    f"the face in {where.format(i)}{label!r} is {found.size:.0f} px (longer side "
                    f"of its box); at least {options.min_face_size} px is needed "
                    f"(PrepareOptions.min_face_size)",
                    source=label, frame_index=i, size=found.size,
                    min_size=options.min_face_size)
            if found.landmarks is not None:
                raw[i] = found.landmarks
                present[i] = True
            elif options.missing_face == "error":
                detail = (" (a face was detected but its landmarks could not be found)"
                          if found.method == "detector" else "")
                hint = "" if still else ("; PrepareOptions(missing_face='interpolate') fills "
                                         "such frames from their neighbours")
                raise NoFaceError(f"no face found in {where.format(i)}{label!r}{detail}{hint}",
                                  source=label, frame_index=i, frames_checked=i + 1)
            report(i + 1)
    if not present.any():
        raise NoFaceError(f"no face found in any of the {count} frame(s) of {label!r}",
                          source=label, frame_index=0, frames_checked=count)
    return raw, present, multiple, most


def prepare_avatar(
    source: str | os.PathLike[str] | NDArray[Any],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    options: PrepareOptions | None = None,
    progress: bool | Literal["always"] = True,
    on_progress: ProgressCallback | None = None,
    use_cache: bool = True,
    engine_version: str = PREPARATION_VERSION,
) -> PreparedAvatar:
    """Prepare an avatar image or video for the local engine (cached on disk).

    Args:
        source: a path to an image or a video, or an RGB uint8 array ``(H, W, 3)``.
        cache_dir: where prepared avatars are cached (default :func:`default_cache_dir`).
        options: see :class:`PrepareOptions` (defaults when None).
        progress: True shows a transient rich progress bar on stderr when stderr is a
            terminal, ``"always"`` shows it anyway, False shows nothing.
        on_progress: called as ``on_progress(done, total)`` after each analysed frame.
        use_cache: False neither reads nor writes the cache.
        engine_version: the engine's version; part of the cache key.

    Raises:
        MediaReadError: the media is missing, empty or cannot be decoded.
        NoFaceError: a frame has no face (``frame_index``), or no frame has one.
        FaceTooSmallError: a face is smaller than ``options.min_face_size``.
    """
    opts = options if options is not None else PrepareOptions()
    if isinstance(source, np.ndarray):
        label = "<array>"
        if source.ndim != 3 or source.shape[2] != 3 or source.dtype != np.uint8 or \
                source.shape[0] == 0 or source.shape[1] == 0:
            raise MediaReadError(label, f"expected an RGB uint8 array (H, W, 3), got "
                                        f"{source.dtype} {source.shape}")
        content_hash = _hash_array(source)
    else:
        label = os.fspath(source)
        content_hash = _hash_file(Path(label).expanduser(), label)

    key = cache_key(content_hash, opts, engine_version)
    directory = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache_file = directory / f"{key}.npz"
    if use_cache:
        cached = _load_cached(cache_file, key, label)
        if cached is not None:
            logger.debug("avatar %s loaded from cache %s", label, cache_file)
            return cached

    frames, fps = _read_media(source, label, opts)
    count, height, width = frames.shape[:3]
    with _progress(progress, count, label, on_progress) as report:
        raw, present, multiple, most = _analyse(frames, label, opts, report)

    interpolated = tuple(int(i) for i in np.flatnonzero(~present))
    if interpolated:
        raw = _face.fill_missing(raw, present)
        logger.warning("%s: no face in %d of %d frames (first: frame %d); their landmarks "
                       "were interpolated from the neighbouring frames", label,
                       len(interpolated), count, interpolated[0])
    if multiple:
        logger.warning("%s: more than one face in %d of %d frames (first: frame %d); the "
                       "largest face is used", label, len(multiple), count, multiple[0])

    landmarks = _face.smooth_tracks(raw, fps=fps, strength=opts.smoothing)
    boxes = _face.face_box(landmarks)
    crop_boxes = np.zeros((count, 4), dtype=np.int32)
    masks = np.zeros((count, opts.mask_size, opts.mask_size), dtype=np.uint8)
    clipped: list[int] = []
    for i in range(count):
        crop_boxes[i], was_clipped = _face.square_crop_box(
            boxes[i], width=width, height=height, scale=opts.crop_scale)
        if was_clipped:
            clipped.append(i)
        masks[i] = _face.lower_face_mask(landmarks[i], crop_boxes[i], size=opts.mask_size,
                                         feather=opts.feather)
    if clipped:
        logger.warning("%s: the %.2gx face crop does not fit inside the %dx%d frame in %d "
                       "frame(s); those crops were shrunk to %d px", label, opts.crop_scale,
                       width, height, len(clipped), min(width, height))

    avatar = PreparedAvatar(
        frames=frames, fps=fps, landmarks=landmarks, raw_landmarks=raw, boxes=boxes,
        crop_boxes=crop_boxes, masks=masks, multiple_faces_frames=tuple(multiple),
        interpolated_frames=interpolated, clipped_crop_frames=tuple(clipped), source=label,
        content_hash=content_hash, engine_version=engine_version, cache_key=key,
        from_cache=False, faces_found=most)
    if use_cache:
        _store(avatar, directory, opts)
    return avatar
