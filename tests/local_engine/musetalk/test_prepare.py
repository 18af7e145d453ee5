"""prepare_musetalk(): MuseTalk's face box, crops, latents, blend masks and their cache, on the
astronaut portrait (real mediapipe landmarks) with a tiny random VAE."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from numpy.typing import NDArray

from avatarkit.errors import ConfigError, FaceTooSmallError
from avatarkit.local_engine import face
from avatarkit.local_engine.avatar import PreparedAvatar, prepare_avatar
from avatarkit.local_engine.musetalk import networks
from avatarkit.local_engine.musetalk import prepare as prepare_module
from avatarkit.local_engine.musetalk.configs import MuseTalkConfigs
from avatarkit.local_engine.musetalk.prepare import (
    MUSETALK_PREPARATION_VERSION,
    MuseTalkAvatar,
    blend_kernel_size,
    blend_mask,
    blend_square,
    encode_face_latents,
    musetalk_cache_key,
    musetalk_face_box,
    prepare_musetalk,
)

from .. import astronaut

LOGGER = "avatarkit.local_engine.musetalk.prepare"
FINGERPRINT = "tiny-vae-seed-0"


def _round(value: float) -> int:
    return int(np.floor(value + 0.5))


@pytest.fixture(scope="module")
def still(tmp_path_factory: pytest.TempPathFactory) -> PreparedAvatar:
    return prepare_avatar(astronaut(), cache_dir=tmp_path_factory.mktemp("avatars"),
                          progress=False)


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return networks.build_vae(MuseTalkConfigs.tiny().vae)


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("musetalk-cache")


@pytest.fixture(scope="module")
def material(still: PreparedAvatar, vae: AutoencoderKL, cache_root: Path) -> MuseTalkAvatar:
    return prepare_musetalk(still, vae, vae_fingerprint=FINGERPRINT, cache_dir=cache_root)


@pytest.fixture
def no_vae(monkeypatch: pytest.MonkeyPatch) -> AutoencoderKL:
    """A tiny VAE whose encoder must not run."""
    model = networks.build_vae(MuseTalkConfigs.tiny().vae)

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the VAE ran")

    monkeypatch.setattr(model, "encode", boom)
    return model


@pytest.fixture
def fake_latents(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Replace the VAE encode by a cheap stand-in (for tests of the cache plumbing); returns
    the number of frames each call encoded."""
    calls: list[int] = []

    def fake(vae: AutoencoderKL, crops: NDArray[np.uint8], *,
             batch_size: int = 8) -> NDArray[np.float32]:
        calls.append(len(crops))
        means = crops.reshape(len(crops), -1).mean(axis=1).astype(np.float32)
        return np.ascontiguousarray(np.broadcast_to(means[:, None, None, None],
                                                    (len(crops), 8, 32, 32)))

    monkeypatch.setattr(prepare_module, "encode_face_latents", fake)
    return calls


def _translated(avatar: PreparedAvatar, shifts: list[tuple[int, int]]) -> PreparedAvatar:
    """A video avatar: ``avatar``'s first frame rolled by whole pixels per frame."""
    frames = np.stack([np.roll(avatar.frames[0], (dy, dx), axis=(0, 1)) for dx, dy in shifts])
    offsets = np.array(shifts, dtype=np.float32)[:, None, :]
    landmarks = (avatar.landmarks[0][None] + offsets).astype(np.float32)
    count = len(shifts)
    return dataclasses.replace(
        avatar, frames=frames, landmarks=landmarks, raw_landmarks=landmarks,
        boxes=face.face_box(landmarks), crop_boxes=np.repeat(avatar.crop_boxes[:1], count, 0),
        masks=np.repeat(avatar.masks[:1], count, 0), cache_key=f"shifted-{shifts}")


def _latents(model: AutoencoderKL, image: NDArray[np.uint8]) -> NDArray[np.float32]:
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255.0
    return networks.encode_latents(model, tensor)[0].numpy()


# ----------------------------------------------------------------------------- face box


def test_face_box_follows_the_documented_landmarks(still: PreparedAvatar,
                                                   material: MuseTalkAvatar) -> None:
    lm = still.landmarks[0].astype(np.float64)
    oval = lm[list(face.FACE_OVAL)]
    x1, x2 = _round(oval[:, 0].min()), _round(oval[:, 0].max())
    chin = _round(max(lm[152, 1], oval[:, 1].max()))
    yc = _round((lm[195, 1] + lm[5, 1]) / 2)
    y1 = max(0, yc - (chin - yc))
    assert tuple(material.face_boxes[0]) == (x1, y1, x2, chin + 10)
    # the astronaut's box: forehead above the brows to 10 px below the chin, nose in between
    assert (x1, y1, x2, chin + 10) == (179, 62, 272, 186)
    assert y1 < lm[105, 1] and lm[1, 1] > yc  # brow above the top, nose tip below the middle
    assert material.face_boxes.dtype == np.int32


def test_v10_and_v15_differ_by_the_chin_margin_only(still: PreparedAvatar) -> None:
    lm = still.landmarks[0]
    v10 = musetalk_face_box(lm, width=512, height=512, version="v1.0")
    v15 = musetalk_face_box(lm, width=512, height=512, version="v1.5")
    assert np.subtract(v15, v10).tolist() == [0, 0, 0, 10]
    assert musetalk_face_box(lm, width=512, height=512, extra_margin=3)[3] == v10[3] + 3
    # v1.0 ignores the margin; its box is centred on iBUG point 29 (mean of mediapipe 195 / 5)
    assert musetalk_face_box(lm, width=512, height=512, version="v1.0", extra_margin=30) == v10
    assert (v10[1] + v10[3]) / 2 == _round(float(lm[[195, 5], 1].mean()))


def test_face_box_is_clipped_to_the_frame(still: PreparedAvatar) -> None:
    lm = still.landmarks[0]
    yc = float(lm[[195, 5], 1].mean())
    # near the top edge: nose bridge at y = 20, chin ~57 px below -> y1 = 20 - 57 < 0 -> 0
    up = lm - np.array([0.0, yc - 20.0], dtype=np.float32)
    box = musetalk_face_box(up, width=512, height=512, version="v1.0")
    assert box[1] == 0
    assert box[3] == _round(float(up[152, 1]))
    # near the bottom / left edges: the margin is cut at the frame height, x1 at 0
    down = lm + np.array([-200.0, 512.0 - 8.0 - float(lm[152, 1])], dtype=np.float32)
    box = musetalk_face_box(down, width=512, height=512)
    assert box[0] == 0 and box[3] == 512
    assert box[2] == _round(float(down[list(face.FACE_OVAL), 0].max()))


def test_degenerate_face_box_names_the_frame(still: PreparedAvatar,
                                             vae: AutoencoderKL) -> None:
    lm = still.landmarks[0]
    centre = lm.mean(axis=0)
    tiny = (centre + (lm - centre) * 0.05).astype(np.float32)  # a ~5 px face
    landmarks = np.stack([lm, tiny])
    two = dataclasses.replace(
        still, frames=np.repeat(still.frames, 2, 0), landmarks=landmarks,
        raw_landmarks=landmarks, boxes=face.face_box(landmarks),
        crop_boxes=np.repeat(still.crop_boxes, 2, 0), masks=np.repeat(still.masks, 2, 0))
    with pytest.raises(FaceTooSmallError, match="frame 1 of") as info:
        prepare_musetalk(two, vae, vae_fingerprint=FINGERPRINT, use_cache=False)
    assert info.value.frame_index == 1
    assert info.value.min_size == 8 and info.value.size < 8


# ----------------------------------------------------------------------------- crops, latents


def test_crop_is_the_box_resized_with_lanczos(still: PreparedAvatar,
                                              material: MuseTalkAvatar) -> None:
    x1, y1, x2, y2 = (int(v) for v in material.face_boxes[0])
    expected = cv2.resize(still.frames[0][y1:y2, x1:x2], (256, 256),
                          interpolation=cv2.INTER_LANCZOS4)
    assert material.crops.shape == (1, 256, 256, 3) and material.crops.dtype == np.uint8
    np.testing.assert_array_equal(material.crops[0], expected)


def test_latents_are_masked_then_reference(material: MuseTalkAvatar,
                                           vae: AutoencoderKL) -> None:
    assert material.latents.shape == (1, 8, 32, 32) and material.latents.dtype == np.float32
    crop = material.crops[0]
    lower_black = crop.copy()
    lower_black[128:] = 0
    np.testing.assert_allclose(material.latents[0, 4:], _latents(vae, crop), atol=1e-5,
                               rtol=0)
    np.testing.assert_allclose(material.latents[0, :4], _latents(vae, lower_black), atol=1e-5,
                               rtol=0)
    masked, reference = material.latents[0, :4], material.latents[0, 4:]
    assert float(np.abs(masked - reference).max()) > 100 * 1e-5
    # the masked latent sees only the upper half: another lower half leaves it unchanged
    other = crop.copy()
    other[128:] = np.random.default_rng(0).integers(0, 256, other[128:].shape, dtype=np.uint8)
    changed = encode_face_latents(vae, other[None])[0]
    np.testing.assert_array_equal(changed[:4], masked)
    assert float(np.abs(changed[4:] - reference).max()) > 100 * 1e-5


# ----------------------------------------------------------------------------- blend masks


def test_blend_roi_and_mask_on_the_astronaut(still: PreparedAvatar,
                                             material: MuseTalkAvatar) -> None:
    fx1, fy1, fx2, fy2 = (int(v) for v in material.face_boxes[0])
    cx, cy = (fx1 + fx2) // 2, (fy1 + fy2) // 2
    half = int(max(fx2 - fx1, fy2 - fy1) // 2 * 1.5)
    assert blend_square((fx1, fy1, fx2, fy2)) == (cx - half, cy - half, cx + half, cy + half)
    roi = tuple(int(v) for v in material.roi_boxes[0])
    assert roi == (max(cx - half, 0), max(cy - half, 0), min(cx + half, 512),
                   min(cy + half, 512))
    assert roi == (132, 31, 318, 217)
    rx, ry = roi[:2]
    assert material.face_in_roi(0) == (fx1 - rx, fy1 - ry, fx2 - rx, fy2 - ry)

    mask = material.masks[0]
    assert mask.dtype == np.uint8 and mask.shape == (roi[3] - ry, roi[2] - rx)
    kernel = blend_kernel_size(2 * half)
    assert kernel == int(0.1 * (2 * half) // 2 * 2) + 1 == 19
    reach = kernel // 2
    assert not mask[:cy - reach - ry].any()              # above the centre row
    assert not mask[fy2 + reach - ry:].any()             # below the face box
    assert not mask[:, :fx1 - reach - rx].any()          # left of the face box
    assert not mask[:, fx2 + reach - rx:].any()          # right of the face box
    lm = still.landmarks[0]
    mouth = (lm[13] + lm[14]) / 2
    assert mask[int(mouth[1]) - ry, int(mouth[0]) - rx] == 255
    chin = lm[152]
    assert mask[int(chin[1]) - 4 - ry, int(chin[0]) - rx] == 255
    eye = lm[159]
    assert mask[int(eye[1]) - ry, int(eye[0]) - rx] == 0
    assert ((mask > 0) & (mask < 255)).sum() > 500  # feathered, not a hard edge


def test_mask_is_cut_at_the_box_centre_and_sides(still: PreparedAvatar) -> None:
    """With a box whose centre row is the mouth and whose sides cut the jaw, the polygon's
    parts above the centre and beside the box are removed (before the blur)."""
    lm = still.landmarks[0]
    full = musetalk_face_box(lm, width=512, height=512)
    narrow = (full[0] + 25, full[1] + 44, full[2] - 25, full[3])
    cy = (narrow[1] + narrow[3]) // 2
    assert cy == 146  # the mouth line: the polygon reaches up to the nose (y ~ 132)
    roi, mask = blend_mask(lm, narrow, width=512, height=512)
    square = blend_square(narrow)
    reach = blend_kernel_size(square[2] - square[0]) // 2
    rx, ry = roi[:2]
    assert not mask[:cy - reach - ry].any()
    assert not mask[:, :narrow[0] - reach - rx].any()
    assert not mask[:, narrow[2] + reach - rx:].any()
    # the uncut mask (the full box) covers those places
    roi_full, mask_full = blend_mask(lm, full, width=512, height=512)
    fx, fy = roi_full[:2]
    above, beside = cy - reach - 1, narrow[0] - reach - 2
    assert mask[above - ry, int(lm[2, 0]) - rx] == 0
    assert mask_full[above - fy, int(lm[2, 0]) - fx] > 200
    assert mask[160 - ry, beside - rx] == 0
    assert mask_full[160 - fy, beside - fx] > 200
    assert mask[160 - ry, (narrow[0] + narrow[2]) // 2 - rx] == 255


def test_roi_is_clipped_where_the_square_leaves_the_frame(still: PreparedAvatar,
                                                          vae: AutoencoderKL,
                                                          fake_latents: list[int]) -> None:
    near_edge = _translated(still, [(-150, 0)])  # the face 30 px from the left edge
    material = prepare_musetalk(near_edge, vae, vae_fingerprint=FINGERPRINT, use_cache=False)
    assert fake_latents == [1]
    box = material.face_boxes[0]
    square = blend_square(tuple(int(v) for v in box))
    roi = material.roi_boxes[0]
    assert square[0] < 0 and roi[0] == 0
    assert tuple(roi[1:]) == square[1:]
    assert material.masks[0].shape == (roi[3] - roi[1], roi[2] - roi[0])
    fx1, _, fx2, _ = material.face_in_roi(0)
    assert (fx1, fx2) == (int(box[0]), int(box[2]))


# ----------------------------------------------------------------------------- video


def test_video_boxes_follow_the_face(still: PreparedAvatar, vae: AutoencoderKL,
                                     material: MuseTalkAvatar) -> None:
    shifts = [(0, 0), (3, 2), (6, 4)]
    video = _translated(still, shifts)
    moved = prepare_musetalk(video, vae, vae_fingerprint=FINGERPRINT, use_cache=False,
                             batch_size=2)
    assert len(moved) == 3
    for i, (dx, dy) in enumerate(shifts):
        offset = np.array([dx, dy, dx, dy], dtype=np.int32)
        np.testing.assert_array_equal(moved.face_boxes[i], material.face_boxes[0] + offset)
        np.testing.assert_array_equal(moved.roi_boxes[i], material.roi_boxes[0] + offset)
        np.testing.assert_array_equal(moved.masks[i], material.masks[0])
        np.testing.assert_array_equal(moved.crops[i], material.crops[0])
        # batches of 2 frames (and a last batch of 1) give the same latents as one frame
        np.testing.assert_allclose(moved.latents[i], material.latents[0], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- cache


def _assert_same(a: MuseTalkAvatar, b: MuseTalkAvatar) -> None:
    for name in ("face_boxes", "crops", "latents", "roi_boxes"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)
    assert len(a.masks) == len(b.masks)
    for x, y in zip(a.masks, b.masks, strict=True):
        np.testing.assert_array_equal(x, y)


def test_cache_hit_skips_the_vae_and_round_trips(still: PreparedAvatar,
                                                 material: MuseTalkAvatar, cache_root: Path,
                                                 no_vae: AutoencoderKL) -> None:
    key = musetalk_cache_key(still.cache_key, vae_fingerprint=FINGERPRINT, version="v1.5",
                             extra_margin=10)
    assert material.cache_key == key and not material.from_cache
    assert (cache_root / "musetalk" / f"{key}.npz").is_file()
    again = prepare_musetalk(still, no_vae, vae_fingerprint=FINGERPRINT, cache_dir=cache_root)
    assert again.from_cache and again.cache_key == key and again.version == "v1.5"
    _assert_same(material, again)
    assert not again.latents.flags.writeable and not again.masks[0].flags.writeable
    # a different VAE, version or margin is a different entry: the VAE has to run
    for kwargs in ({"vae_fingerprint": "other"},
                   {"vae_fingerprint": FINGERPRINT, "version": "v1.0"},
                   {"vae_fingerprint": FINGERPRINT, "extra_margin": 12}):
        with pytest.raises(AssertionError, match="the VAE ran"):
            prepare_musetalk(still, no_vae, cache_dir=cache_root, **kwargs)


def test_cache_key_covers_every_input() -> None:
    key = musetalk_cache_key("avatar", vae_fingerprint="a", version="v1.5", extra_margin=10)
    assert len(key) == 64 and MUSETALK_PREPARATION_VERSION == "1"
    assert key == musetalk_cache_key("avatar", vae_fingerprint="a", version="v1.5",
                                     extra_margin=10)
    others = {
        musetalk_cache_key("other", vae_fingerprint="a", version="v1.5", extra_margin=10),
        musetalk_cache_key("avatar", vae_fingerprint="b", version="v1.5", extra_margin=10),
        musetalk_cache_key("avatar", vae_fingerprint="a", version="v1.0", extra_margin=10),
        musetalk_cache_key("avatar", vae_fingerprint="a", version="v1.5", extra_margin=11),
    }
    assert len(others) == 4 and key not in others


def test_corrupt_or_inconsistent_cache_is_rebuilt(still: PreparedAvatar, vae: AutoencoderKL,
                                                  tmp_path: Path, fake_latents: list[int],
                                                  caplog: pytest.LogCaptureFixture) -> None:
    first = prepare_musetalk(still, vae, vae_fingerprint=FINGERPRINT, cache_dir=tmp_path)
    path = tmp_path / "musetalk" / f"{first.cache_key}.npz"
    good = path.read_bytes()

    path.write_bytes(good[: len(good) // 2])  # truncated
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        rebuilt = prepare_musetalk(still, vae, vae_fingerprint=FINGERPRINT, cache_dir=tmp_path)
    assert not rebuilt.from_cache and fake_latents == [1, 1]
    assert any("unreadable MuseTalk cache" in r.getMessage() for r in caplog.records)
    _assert_same(rebuilt, first)
    assert path.read_bytes() == good
    assert prepare_musetalk(still, vae, vae_fingerprint=FINGERPRINT,
                            cache_dir=tmp_path).from_cache
    assert fake_latents == [1, 1]

    # a readable archive whose masks do not fit their ROIs
    with np.load(path, allow_pickle=False) as data:
        arrays: dict[str, NDArray[Any]] = {str(name): np.asarray(data[name])
                                           for name in data.files}
    arrays["mask_shapes"] = arrays["mask_shapes"] + 1
    with path.open("wb") as handle:
        np.savez(handle, allow_pickle=False, **arrays)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        rebuilt = prepare_musetalk(still, vae, vae_fingerprint=FINGERPRINT, cache_dir=tmp_path)
    assert not rebuilt.from_cache and fake_latents == [1, 1, 1]
    assert any("unreadable MuseTalk cache" in r.getMessage() for r in caplog.records)
    assert path.read_bytes() == good
    assert not list(path.parent.glob(".*.tmp"))


def test_unwritable_cache_is_skipped(still: PreparedAvatar, vae: AutoencoderKL, tmp_path: Path,
                                     fake_latents: list[int],
                                     caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache folder should be")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        result = prepare_musetalk(still, vae, vae_fingerprint=FINGERPRINT, cache_dir=blocker)
    assert not result.from_cache and len(result) == 1 and fake_latents == [1]
    assert any("could not write the MuseTalk cache" in r.getMessage() for r in caplog.records)


def test_default_cache_dir_and_use_cache_false(still: PreparedAvatar, vae: AutoencoderKL,
                                               tmp_path: Path, fake_latents: list[int],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AVATARKIT_CACHE_DIR", str(tmp_path / "env"))
    prepare_musetalk(still, vae, vae_fingerprint=FINGERPRINT, use_cache=False)
    assert not (tmp_path / "env").exists()
    result = prepare_musetalk(still, vae, vae_fingerprint=FINGERPRINT)
    assert (tmp_path / "env" / "avatars" / "musetalk" / f"{result.cache_key}.npz").is_file()
    assert prepare_musetalk(still, vae, vae_fingerprint=FINGERPRINT).from_cache
    assert fake_latents == [1, 1]


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"version": "v2"}, "version"),
    ({"extra_margin": -1}, "extra_margin"),
    ({"batch_size": 0}, "batch_size"),
    ({"vae_fingerprint": ""}, "vae_fingerprint"),
])
def test_bad_arguments_name_their_field(still: PreparedAvatar, no_vae: AutoencoderKL,
                                        kwargs: dict[str, Any], field: str) -> None:
    arguments: dict[str, Any] = {"vae_fingerprint": FINGERPRINT, "use_cache": False, **kwargs}
    with pytest.raises(ConfigError) as info:
        prepare_musetalk(still, no_vae, **arguments)
    assert info.value.field == field


def test_vae_without_weights_is_refused(still: PreparedAvatar) -> None:
    meta = networks.build_vae(MuseTalkConfigs.tiny().vae, device="meta")
    with pytest.raises(ConfigError, match="meta device") as info:
        prepare_musetalk(still, meta, vae_fingerprint=FINGERPRINT, use_cache=False)
    assert info.value.field == "vae"


def test_result_is_read_only_and_checked(material: MuseTalkAvatar) -> None:
    assert len(material) == 1 and "frames=1" in repr(material)
    for array in (material.face_boxes, material.crops, material.latents, material.roi_boxes,
                  material.masks[0]):
        assert not array.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            array.flat[0] = 0
    with pytest.raises(IndexError):
        material.face_in_roi(1)
    with pytest.raises(ValueError, match="latents"):
        dataclasses.replace(material, latents=np.zeros((1, 4, 32, 32), dtype=np.float32))
    with pytest.raises(ValueError, match=r"masks\[0\]"):
        dataclasses.replace(material, masks=(np.zeros((3, 3), dtype=np.uint8),))
    with pytest.raises(ValueError, match="roi_boxes"):
        dataclasses.replace(material, roi_boxes=material.face_boxes + np.int32(1))
