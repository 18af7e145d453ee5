"""MuseTalk's avatar material: face boxes, 256x256 crops, VAE latents and blend masks.

:func:`prepare_musetalk` derives everything MuseTalk needs per *source* frame from a
:class:`~avatarkit.local_engine.avatar.PreparedAvatar` (which already holds smoothed mediapipe
landmarks) and a VAE, and caches it on disk. The runner cycles the frames itself, so nothing is
stored twice (MuseTalk's own preparation stores a forward-backward copy of every frame).
``shared/research/musetalk-internals.md`` §1.3, §2.1 and §8 describe the rules followed here.

The face box (MuseTalk v1.5's rule on mediapipe landmarks)
----------------------------------------------------------
MuseTalk takes the box from 68 iBUG landmarks: ``x1``/``x2`` = min/max x, ``y2`` = max y (the
chin), ``yc`` = the y of point 29 (lower nose bridge) and ``y1 = max(0, yc - (y2 - yc))``, so
the box's vertical centre sits on the nose bridge and the UNet's masked lower half starts near
the nose. v1.5 then moves ``y2`` down by ``extra_margin`` (10 px) and clips it to the frame.
On mediapipe's 468 points (see the constants below for why these indices):

- ``x1``, ``x2``: min/max x over :data:`FACE_X_LANDMARKS` (the face oval);
- ``y2``: the larger of the chin (landmark 152) and the oval's lowest point;
- ``yc``: the mean y of landmarks 195 and 5.

Each value is rounded (half up) to an integer before ``y1`` is derived, so that without
clipping ``(y1 + y2) / 2 == yc`` exactly for v1.0. The box is clipped to the frame; ends are
exclusive (``frame[y1:y2, x1:x2]``).

The crop and the latents
------------------------
``frame[y1:y2, x1:x2]`` is resized to 256x256 with ``cv2.INTER_LANCZOS4`` (no aspect
preservation). Two latents per frame go through :func:`.networks.encode_latents` (posterior
mean x scaling factor): the crop with rows 128..255 set to black (the "masked" image) and
the full crop (the "reference"), stored as ``cat([masked, reference])`` ``[8, 32, 32]``.

The blend ROI and mask (MuseTalk's real-time blend with a landmark polygon)
---------------------------------------------------------------------------
MuseTalk pastes the generated face through a mask over a square centred on the face box:
half side ``s = int(max(w, h) // 2 * 1.5)`` around the integer box centre ``(cx, cy)``. Here
only the part of that square inside the frame is kept (the ROI the engine touches). MuseTalk
takes the mask from BiSeNet face parsing; here it is the lower-face polygon of
:func:`.face.lower_face_mask` (the face oval below the nose line, chin stretched by 10 %, plus
the outer lips), rasterised at 1:1 over the square, then, as MuseTalk does, zeroed outside the
face box and above the square's middle row (``upper_boundary_ratio`` 0.5: the rows above
``cy``), and blurred with a Gaussian of kernel ``int(0.1 * side // 2 * 2) + 1`` (``side = 2 s``;
the real-time script's softness). The blur runs over the whole square, so a mask touching the
frame's edge fades there exactly as MuseTalk's does; the stored mask is the ROI's part.

Note that the v1.5 box's centre row is ``yc + extra_margin // 2`` (the margin moves only
``y2``), as in MuseTalk, where the square and its middle row come from the updated box.

The cache
---------
``<cache_dir>/musetalk/<key>.npz`` (``cache_dir`` defaults to
:func:`~avatarkit.local_engine.avatar.default_cache_dir`), key = sha256 of the canonical JSON
of the avatar's cache key, the VAE fingerprint, the version, the effective margin and
:data:`MUSETALK_PREPARATION_VERSION`. Written with ``np.savez`` (no pickles; the masks, whose
sizes vary, as one flat array plus their shapes) to a temporary file moved into place with
``os.replace``; read with ``allow_pickle=False``. An unreadable or inconsistent file is logged
and rebuilt; a cache that cannot be written is logged and skipped. A hit never runs the VAE.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast, get_args

import cv2
import numpy as np
import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from numpy.typing import NDArray

from ...errors import ConfigError, FaceTooSmallError
from .. import face as _face
from ..avatar import PreparedAvatar, default_cache_dir, read_cache_npz, write_atomic
from .configs import FACE_SIZE, LATENT_CHANNELS, LATENT_SIZE
from .networks import encode_latents

__all__ = [
    "BLEND_BLUR_FRACTION",
    "BLEND_EXPAND",
    "BLEND_UPPER_BOUNDARY",
    "CHIN_LANDMARK",
    "EXTRA_MARGIN",
    "FACE_X_LANDMARKS",
    "MIN_FACE_BOX",
    "MUSETALK_PREPARATION_VERSION",
    "NOSE_BRIDGE_LANDMARKS",
    "MuseTalkAvatar",
    "MuseTalkVersion",
    "blend_kernel_size",
    "blend_mask",
    "blend_square",
    "crop_face",
    "encode_face_latents",
    "musetalk_cache_key",
    "musetalk_face_box",
    "prepare_musetalk",
]

#: Bumped whenever the output changes for the same avatar, VAE and options.
MUSETALK_PREPARATION_VERSION = "1"

MuseTalkVersion = Literal["v1.0", "v1.5"]
_VERSIONS: tuple[str, ...] = get_args(MuseTalkVersion)

#: Landmarks whose x extremes are the box's sides. iBUG's leftmost / rightmost points are the
#: jaw-line ends 0 / 16, which lie on the face contour; mediapipe's face oval is that contour.
FACE_X_LANDMARKS: tuple[int, ...] = _face.FACE_OVAL
#: The chin (mediapipe 152, the oval's bottom point; iBUG 8). The box bottom is the larger of
#: its y and the oval's lowest y, so a tilted head's lowest jaw point still counts.
CHIN_LANDMARK = 152
#: iBUG point 29 (0-based) stands in for these two. mediapipe's nose bridge runs 168 - 6 - 197
#: - 195 - 5 - 4 (tip); iBUG 27..30 span the bridge evenly from its top to the tip, so point 29
#: (two thirds of the way down) lies between 195 and 5: their mean.
NOSE_BRIDGE_LANDMARKS: tuple[int, int] = (195, 5)
#: v1.5's chin margin (px): the box bottom moves down by this much (mean of training's N(10, 10)).
EXTRA_MARGIN = 10
#: A face box narrower or shorter than this (px) cannot be cropped meaningfully.
MIN_FACE_BOX = 8
#: The blend square's half side is ``int(max(w, h) // 2 * BLEND_EXPAND)`` (v1.5 real-time).
BLEND_EXPAND = 1.5
#: Rows of the blend square above this fraction of its side are never blended.
BLEND_UPPER_BOUNDARY = 0.5
#: The mask blur kernel as a fraction of the blend square's side (real-time softness).
BLEND_BLUR_FRACTION = 0.1

logger = logging.getLogger("avatarkit.local_engine.musetalk.prepare")

_Box = tuple[int, int, int, int]

_CACHE_SUBDIR = "musetalk"
_STORED_ARRAYS = ("face_boxes", "crops", "latents", "roi_boxes", "mask_data", "mask_shapes")


# ----------------------------------------------------------------------------- geometry


def _round_half_up(value: float) -> int:
    return math.floor(value + 0.5)


def _check_version(version: str) -> None:
    if version not in _VERSIONS:
        raise ConfigError(f"expected one of {', '.join(_VERSIONS)}, got {version!r}",
                          field="version")


def musetalk_face_box(landmarks: NDArray[np.floating[Any]], *, width: int, height: int,
                      version: MuseTalkVersion = "v1.5", extra_margin: int = EXTRA_MARGIN) -> _Box:
    """MuseTalk's face box ``(x1, y1, x2, y2)`` (exclusive ends) from one frame's ``(468, 2)``
    mediapipe pixel landmarks, clipped to a ``width`` x ``height`` frame.

    ``extra_margin`` (px) is added below the chin for v1.5 and ignored for v1.0. The box may be
    degenerate (empty or tiny) when the landmarks lie mostly outside the frame; callers check.
    """
    _check_version(version)
    if extra_margin < 0:
        raise ConfigError(f"expected a margin >= 0 px, got {extra_margin}", field="extra_margin")
    pts = np.asarray(landmarks, dtype=np.float64)
    if pts.shape != (_face.NUM_LANDMARKS, 2):
        raise ValueError(f"landmarks: expected ({_face.NUM_LANDMARKS}, 2), got {pts.shape}")
    oval = pts[list(FACE_X_LANDMARKS)]
    x1 = _round_half_up(float(oval[:, 0].min()))
    x2 = _round_half_up(float(oval[:, 0].max()))
    chin = _round_half_up(max(float(pts[CHIN_LANDMARK, 1]), float(oval[:, 1].max())))
    centre = _round_half_up(float(pts[list(NOSE_BRIDGE_LANDMARKS), 1].mean()))
    y1 = max(0, centre - (chin - centre))
    y2 = chin + (extra_margin if version == "v1.5" else 0)
    return (min(max(x1, 0), width), min(max(y1, 0), height),
            min(max(x2, 0), width), min(max(y2, 0), height))


def blend_square(box: Sequence[int]) -> _Box:
    """MuseTalk's blend square ``(x0, y0, x1, y1)`` around a face box: centred on the box's
    integer centre, half side ``int(max(w, h) // 2 * BLEND_EXPAND)``. May leave the frame."""
    x1, y1, x2, y2 = (int(v) for v in box)
    cx, cy = (x1 + x2) // 2, (y1 + y2) // 2
    half = int(max(x2 - x1, y2 - y1) // 2 * BLEND_EXPAND)
    return cx - half, cy - half, cx + half, cy + half


def blend_kernel_size(side: int) -> int:
    """The (odd) Gaussian kernel MuseTalk's real-time blend uses for a square of ``side`` px:
    ``int(0.1 * side // 2 * 2) + 1``."""
    return int(BLEND_BLUR_FRACTION * side // 2 * 2) + 1


def blend_mask(landmarks: NDArray[np.floating[Any]], box: Sequence[int], *, width: int,
               height: int) -> tuple[_Box, NDArray[np.uint8]]:
    """The blend ROI (the blend square clipped to the frame) and its mask.

    Returns ``((x0, y0, x1, y1), mask)`` where ``mask`` is ``(y1 - y0, x1 - x0)`` uint8, 255 =
    take the model's face, 0 = keep the frame. See the module docstring for the rule.
    """
    sx0, sy0, sx1, sy1 = blend_square(box)
    side = sx1 - sx0
    if side <= 0:
        raise ValueError(f"box: expected a non-empty face box, got {tuple(box)}")
    square = np.array([sx0, sy0, sx1, sy1], dtype=np.int32)
    polygon = _face.lower_face_mask(landmarks, square, size=side, feather=0.0)
    fx0, fy0, fx1, fy1 = (int(v) for v in box)
    top = max(fy0 - sy0, int(side * BLEND_UPPER_BOUNDARY))
    canvas = np.zeros((side, side), dtype=np.uint8)
    canvas[top:fy1 - sy0, fx0 - sx0:fx1 - sx0] = polygon[top:fy1 - sy0, fx0 - sx0:fx1 - sx0]
    kernel = blend_kernel_size(side)
    if kernel > 1:
        canvas = np.asarray(cv2.GaussianBlur(canvas, (kernel, kernel), 0), dtype=np.uint8)
    rx0, ry0 = max(sx0, 0), max(sy0, 0)
    rx1, ry1 = min(sx1, width), min(sy1, height)
    mask = np.ascontiguousarray(canvas[ry0 - sy0:ry1 - sy0, rx0 - sx0:rx1 - sx0])
    return (rx0, ry0, rx1, ry1), mask


def crop_face(frame: NDArray[np.uint8], box: Sequence[int]) -> NDArray[np.uint8]:
    """``frame[y1:y2, x1:x2]`` resized to ``FACE_SIZE`` x ``FACE_SIZE`` (Lanczos-4, aspect
    not preserved), RGB uint8."""
    x1, y1, x2, y2 = (int(v) for v in box)
    resized = cv2.resize(np.ascontiguousarray(frame[y1:y2, x1:x2]), (FACE_SIZE, FACE_SIZE),
                         interpolation=cv2.INTER_LANCZOS4)
    return np.asarray(resized, dtype=np.uint8)


def encode_face_latents(vae: AutoencoderKL, crops: NDArray[np.uint8], *,
                        batch_size: int = 8) -> NDArray[np.float32]:
    """MuseTalk's UNet input latents for ``(N, 256, 256, 3)`` RGB crops: ``(N, 8, 32, 32)``
    float32 on the CPU, channels 0..3 the crop with its lower half (rows 128..255) black,
    channels 4..7 the full crop. Runs ``batch_size`` frames at a time on the VAE's device and
    dtype."""
    if batch_size < 1:
        raise ConfigError(f"expected at least 1 frame per batch, got {batch_size}",
                          field="batch_size")
    if crops.ndim != 4 or crops.shape[1:] != (FACE_SIZE, FACE_SIZE, 3) or crops.dtype != np.uint8:
        raise ValueError(f"crops: expected uint8 (N, {FACE_SIZE}, {FACE_SIZE}, 3), got "
                         f"{crops.dtype} {crops.shape}")
    # diffusers' top-level names are typed as placeholders; the VAE is an nn.Module
    module = cast(torch.nn.Module, vae)
    try:
        reference = next(module.parameters())
    except StopIteration:
        raise ConfigError("the VAE has no parameters", field="vae") from None
    if reference.is_meta:
        raise ConfigError("the VAE is on the meta device; load its weights first", field="vae")
    count = crops.shape[0]
    out = np.zeros((count, 2 * LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, count, batch_size):
            chunk = np.array(crops[start:start + batch_size])  # a writable copy for torch
            images = torch.from_numpy(chunk).to(reference.device).permute(0, 3, 1, 2)
            # contiguous NCHW: a permuted (channels-last) batch takes another convolution
            # path on the CPU whose float32 results differ from NCHW's by ~1e-4 relative
            images = images.to(torch.float32).div(255.0).to(reference.dtype).contiguous()
            masked = images.clone()
            masked[:, :, FACE_SIZE // 2:, :] = 0.0
            latents = encode_latents(vae, torch.cat([masked, images]))
            n = images.shape[0]
            both = torch.cat([latents[:n], latents[n:]], dim=1)
            out[start:start + n] = both.to(device="cpu", dtype=torch.float32).numpy()
    return out


# ----------------------------------------------------------------------------- result


@dataclass(frozen=True, eq=False)
class MuseTalkAvatar:
    """MuseTalk's material for a prepared avatar, per source frame. Arrays are read-only.

    Attributes:
        avatar: the runtime's prepared avatar (frames, landmarks...).
        version: the MuseTalk weights version the boxes were made for.
        face_boxes: ``(N, 4)`` int32 ``(x1, y1, x2, y2)`` face boxes in frame pixels,
            exclusive ends.
        crops: ``(N, 256, 256, 3)`` uint8 RGB, each face box resized.
        latents: ``(N, 8, 32, 32)`` float32: the masked crop's latent, then the full crop's.
        roi_boxes: ``(N, 4)`` int32 ``(x0, y0, x1, y1)``: the blend square inside the frame.
        masks: N uint8 masks, each ``(roi height, roi width)``; 255 = take the model's face.
        vae_fingerprint: identifies the VAE weights the latents were computed with.
        cache_key: the cache entry's key (sha256 hex).
        from_cache: True when loaded from the on-disk cache without running the VAE.
    """

    avatar: PreparedAvatar
    version: MuseTalkVersion
    face_boxes: NDArray[np.int32]
    crops: NDArray[np.uint8]
    latents: NDArray[np.float32]
    roi_boxes: NDArray[np.int32]
    masks: tuple[NDArray[np.uint8], ...]
    vae_fingerprint: str
    cache_key: str
    from_cache: bool

    def __post_init__(self) -> None:
        _check_version(self.version)
        n = len(self.avatar)
        height, width = self.avatar.frames.shape[1:3]
        expected: dict[str, tuple[tuple[int, ...], type]] = {
            "face_boxes": ((n, 4), np.int32),
            "crops": ((n, FACE_SIZE, FACE_SIZE, 3), np.uint8),
            "latents": ((n, 2 * LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE), np.float32),
            "roi_boxes": ((n, 4), np.int32),
        }
        for name, (shape, dtype) in expected.items():
            value = getattr(self, name)
            if not isinstance(value, np.ndarray) or value.dtype != dtype or value.shape != shape:
                got = (f"{value.dtype} {value.shape}" if isinstance(value, np.ndarray)
                       else type(value).__name__)
                raise ValueError(f"{name}: expected {np.dtype(dtype)} of shape {shape}, got "
                                 f"{got}")
            view = value.view()
            view.setflags(write=False)
            object.__setattr__(self, name, view)
        for name in ("face_boxes", "roi_boxes"):
            boxes = getattr(self, name)
            inside = ((boxes[:, 0] >= 0) & (boxes[:, 1] >= 0) & (boxes[:, 2] <= width)
                      & (boxes[:, 3] <= height) & (boxes[:, 2] > boxes[:, 0])
                      & (boxes[:, 3] > boxes[:, 1]))
            if not inside.all():
                bad = int(np.flatnonzero(~inside)[0])
                raise ValueError(f"{name}: frame {bad}'s box {tuple(boxes[bad])} is empty or "
                                 f"leaves the {width}x{height} frame")
        contained = ((self.face_boxes[:, :2] >= self.roi_boxes[:, :2]).all(axis=1)
                     & (self.face_boxes[:, 2:] <= self.roi_boxes[:, 2:]).all(axis=1))
        if not contained.all():
            bad = int(np.flatnonzero(~contained)[0])
            raise ValueError(f"roi_boxes: frame {bad}'s ROI {tuple(self.roi_boxes[bad])} does "
                             f"not contain its face box {tuple(self.face_boxes[bad])}")
        masks = tuple(self.masks)
        if len(masks) != n:
            raise ValueError(f"masks: expected {n} masks, got {len(masks)}")
        frozen: list[NDArray[np.uint8]] = []
        for i, mask in enumerate(masks):
            x0, y0, x1, y1 = (int(v) for v in self.roi_boxes[i])
            if not isinstance(mask, np.ndarray) or mask.dtype != np.uint8 or \
                    mask.shape != (y1 - y0, x1 - x0):
                got = (f"{mask.dtype} {mask.shape}" if isinstance(mask, np.ndarray)
                       else type(mask).__name__)
                raise ValueError(f"masks[{i}]: expected uint8 of the ROI's shape "
                                 f"{(y1 - y0, x1 - x0)}, got {got}")
            view = mask.view()
            view.setflags(write=False)
            frozen.append(view)
        object.__setattr__(self, "masks", tuple(frozen))

    def __len__(self) -> int:
        return int(self.face_boxes.shape[0])

    def __repr__(self) -> str:
        return (f"MuseTalkAvatar(source={self.avatar.source!r}, frames={len(self)}, "
                f"version={self.version!r}, from_cache={self.from_cache})")

    def face_in_roi(self, i: int) -> _Box:
        """Frame ``i``'s face box in its ROI's coordinates ``(x1, y1, x2, y2)``."""
        if not 0 <= i < len(self):
            raise IndexError(f"frame {i} out of range [0, {len(self)})")
        fx0, fy0, fx1, fy1 = (int(v) for v in self.face_boxes[i])
        rx0, ry0 = int(self.roi_boxes[i, 0]), int(self.roi_boxes[i, 1])
        return fx0 - rx0, fy0 - ry0, fx1 - rx0, fy1 - ry0


# ----------------------------------------------------------------------------- cache


def musetalk_cache_key(avatar_cache_key: str, *, vae_fingerprint: str, version: str,
                       extra_margin: int) -> str:
    """sha256 (hex) of the canonical JSON of what the material depends on."""
    payload = {
        "avatar": avatar_cache_key,
        "vae": vae_fingerprint,
        "version": version,
        "extra_margin": extra_margin,
        "preparation": MUSETALK_PREPARATION_VERSION,
    }
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def _load_cached(path: Path, key: str, avatar: PreparedAvatar, version: MuseTalkVersion,
                 vae_fingerprint: str) -> MuseTalkAvatar | None:
    if not path.exists():
        return None
    try:
        _, arrays = read_cache_npz(path, key, _STORED_ARRAYS)
        shapes = arrays["mask_shapes"]
        flat = arrays["mask_data"]
        if shapes.ndim != 2 or shapes.shape != (len(avatar), 2) or flat.ndim != 1 or \
                flat.dtype != np.uint8:
            raise ValueError(f"mask layout: shapes {shapes.shape}, data {flat.dtype} "
                             f"{flat.shape}")
        sizes = [int(h) * int(w) for h, w in shapes]
        if any(int(h) < 0 or int(w) < 0 for h, w in shapes) or sum(sizes) != flat.size:
            raise ValueError(f"mask data holds {flat.size} values, the shapes need {sum(sizes)}")
        offsets = np.cumsum([0, *sizes])
        masks = tuple(flat[offsets[i]:offsets[i + 1]].reshape(int(h), int(w))
                      for i, (h, w) in enumerate(shapes))
        return MuseTalkAvatar(
            avatar=avatar, version=version, face_boxes=arrays["face_boxes"],
            crops=arrays["crops"], latents=arrays["latents"], roi_boxes=arrays["roi_boxes"],
            masks=masks, vae_fingerprint=vae_fingerprint, cache_key=key, from_cache=True)
    except Exception as exc:  # any way a damaged file can fail: ignore it and rebuild
        logger.warning("ignoring unreadable MuseTalk cache file %s (%s: %s); preparing again",
                       path, type(exc).__name__, exc)
        return None


def _store(material: MuseTalkAvatar, directory: Path, extra_margin: int) -> None:
    meta = {
        "key": material.cache_key,
        "avatar_cache_key": material.avatar.cache_key,
        "source": material.avatar.source,
        "vae_fingerprint": material.vae_fingerprint,
        "version": material.version,
        "extra_margin": extra_margin,
        "preparation_version": MUSETALK_PREPARATION_VERSION,
        "frames": len(material),
    }
    arrays: dict[str, NDArray[Any]] = {
        "face_boxes": material.face_boxes,
        "crops": material.crops,
        "latents": material.latents,
        "roi_boxes": material.roi_boxes,
        "mask_data": np.concatenate([m.reshape(-1) for m in material.masks]),
        "mask_shapes": np.array([m.shape for m in material.masks], dtype=np.int64),
        "meta": np.array(json.dumps(meta, sort_keys=True)),
    }
    try:
        directory.mkdir(parents=True, exist_ok=True)
        write_atomic(directory / f"{material.cache_key}.npz",
                      lambda handle: np.savez(handle, allow_pickle=False, **arrays))
    except OSError as exc:
        logger.warning("could not write the MuseTalk cache in %s (%s); continuing without it",
                       directory, exc)


# ----------------------------------------------------------------------------- preparation


def prepare_musetalk(avatar: PreparedAvatar, vae: AutoencoderKL, *, vae_fingerprint: str,
                     version: MuseTalkVersion = "v1.5", extra_margin: int = EXTRA_MARGIN,
                     cache_dir: str | os.PathLike[str] | None = None, use_cache: bool = True,
                     batch_size: int = 8) -> MuseTalkAvatar:
    """MuseTalk's per-frame material for ``avatar`` (cached on disk).

    Args:
        avatar: the runtime's prepared avatar.
        vae: the VAE (``AutoencoderKL``, eval mode, real weights) the latents come from.
        vae_fingerprint: a string that identifies the VAE weights (e.g. a hash of the
            file); part of the cache key, so changing the weights never reuses old latents.
        version: ``"v1.5"`` (chin margin) or ``"v1.0"`` (no margin).
        extra_margin: v1.5's margin below the chin in pixels; ignored for v1.0.
        cache_dir: the cache root; entries go to its ``musetalk`` folder (default
            :func:`~avatarkit.local_engine.avatar.default_cache_dir`).
        use_cache: False neither reads nor writes the cache.
        batch_size: frames per VAE call.

    Raises:
        ConfigError: a bad ``version``, ``extra_margin``, ``batch_size``,
            ``vae_fingerprint`` or a VAE without real weights (``field`` names it).
        FaceTooSmallError: a frame's face box is narrower or shorter than
            :data:`MIN_FACE_BOX` px (``frame_index`` names the frame).
    """
    _check_version(version)
    if extra_margin < 0:
        raise ConfigError(f"expected a margin >= 0 px, got {extra_margin}", field="extra_margin")
    if batch_size < 1:
        raise ConfigError(f"expected at least 1 frame per batch, got {batch_size}",
                          field="batch_size")
    if not vae_fingerprint:
        raise ConfigError("expected a non-empty string identifying the VAE weights",
                          field="vae_fingerprint")
    margin = extra_margin if version == "v1.5" else 0
    key = musetalk_cache_key(avatar.cache_key, vae_fingerprint=vae_fingerprint,
                             version=version, extra_margin=margin)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    directory = root / _CACHE_SUBDIR
    cache_file = directory / f"{key}.npz"
    if use_cache:
        cached = _load_cached(cache_file, key, avatar, version, vae_fingerprint)
        if cached is not None:
            logger.debug("MuseTalk material of %s loaded from %s", avatar.source, cache_file)
            return cached

    count, height, width = avatar.frames.shape[:3]
    face_boxes = np.zeros((count, 4), dtype=np.int32)
    roi_boxes = np.zeros((count, 4), dtype=np.int32)
    crops = np.zeros((count, FACE_SIZE, FACE_SIZE, 3), dtype=np.uint8)
    masks: list[NDArray[np.uint8]] = []
    where = "" if count == 1 else "frame {} of "
    for i in range(count):
        box = musetalk_face_box(avatar.landmarks[i], width=width, height=height,
                                version=version, extra_margin=margin)
        box_w, box_h = box[2] - box[0], box[3] - box[1]
        if box_w < MIN_FACE_BOX or box_h < MIN_FACE_BOX:
            raise FaceTooSmallError(
                f"the MuseTalk face box {box} in {where.format(i)}{avatar.source!r} is "
                f"{max(box_w, 0)}x{max(box_h, 0)} px inside the {width}x{height} frame; both "
                f"sides must be at least {MIN_FACE_BOX} px",
                source=avatar.source, frame_index=i, size=float(max(min(box_w, box_h), 0)),
                min_size=MIN_FACE_BOX)
        face_boxes[i] = box
        crops[i] = crop_face(avatar.frames[i], box)
        roi, mask = blend_mask(avatar.landmarks[i], box, width=width, height=height)
        roi_boxes[i] = roi
        masks.append(mask)
    latents = encode_face_latents(vae, crops, batch_size=batch_size)

    material = MuseTalkAvatar(
        avatar=avatar, version=version, face_boxes=face_boxes, crops=crops, latents=latents,
        roi_boxes=roi_boxes, masks=tuple(masks), vae_fingerprint=vae_fingerprint,
        cache_key=key, from_cache=False)
    if use_cache:
        _store(material, directory, margin)
    return material
