"""The burned-in "AI GENERATED" label: where it lands, that it is legible, that it touches
nothing else, and that bad frames are refused rather than passed through unlabelled."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.typing import NDArray
from pydantic import ValidationError

from avatarkit.disclosure.label import FrameLabeler, LabelConfig, LabelPosition
from avatarkit.errors import MediaFormatError

SIZES = [(512, 512), (360, 640), (1080, 1920)]
POSITIONS: list[LabelPosition] = ["top-right", "top-left", "bottom-right", "bottom-left"]


def _noise(height: int, width: int, seed: int = 0) -> NDArray[np.uint8]:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _luminance(pixels: NDArray[np.uint8]) -> NDArray[np.float64]:
    """WCAG relative luminance of sRGB pixels."""
    c = pixels.astype(np.float64) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    return np.asarray(lin @ np.array([0.2126, 0.7152, 0.0722]))


@pytest.mark.parametrize(("height", "width"), SIZES)
def test_only_pixels_inside_region_change(height: int, width: int) -> None:
    frame = _noise(height, width)
    labeler = FrameLabeler(LabelConfig())
    out = labeler.apply(frame)
    y0, y1, x0, x1 = labeler.region(frame.shape)
    changed = np.any(out != frame, axis=2)
    assert changed.any()
    outside = changed.copy()
    outside[y0:y1, x0:x1] = False
    assert not outside.any()
    # Most of the region is actually covered (it is the label's box, not a loose bound).
    assert changed[y0:y1, x0:x1].mean() > 0.8
    assert out.dtype == np.uint8 and out.shape == frame.shape


def test_apply_returns_a_copy_and_apply_inplace_matches() -> None:
    frame = _noise(256, 256)
    original = frame.copy()
    labeler = FrameLabeler()
    out = labeler.apply(frame)
    np.testing.assert_array_equal(frame, original)
    assert not np.shares_memory(out, frame)
    labeler.apply_inplace(frame)
    np.testing.assert_array_equal(frame, out)


def test_default_is_top_right() -> None:
    height, width = 360, 640
    y0, y1, x0, x1 = FrameLabeler().region((height, width, 3))
    assert y0 < height * 0.1 and y1 < height / 2
    assert x1 > width * 0.9 and x0 > width / 2


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize(("height", "width"), SIZES)
def test_each_position_lands_in_its_corner(position: LabelPosition, height: int,
                                           width: int) -> None:
    labeler = FrameLabeler(LabelConfig(position=position))
    y0, y1, x0, x1 = labeler.region((height, width))
    margin = round(0.02 * height)
    vertical, horizontal = position.split("-")
    if vertical == "top":
        assert y0 == margin
    else:
        assert y1 == height - margin
    if horizontal == "left":
        assert x0 == margin
    else:
        assert x1 == width - margin
    # And the pixels really change there.
    frame = np.full((height, width, 3), 128, np.uint8)
    out = labeler.apply(frame)
    assert np.any(out[y0:y1, x0:x1] != 128)


@pytest.mark.parametrize("background", [0, 128, 255, "noise"])
def test_label_is_high_contrast_on_any_background(background: int | str) -> None:
    frame = (_noise(512, 512) if background == "noise"
             else np.full((512, 512, 3), background, np.uint8))
    labeler = FrameLabeler()
    y0, y1, x0, x1 = labeler.region(frame.shape)
    lum = _luminance(labeler.apply(frame)[y0:y1, x0:x1].reshape(-1, 3))
    light, dark = np.percentile(lum, 99), np.percentile(lum, 5)
    assert light > 0.85  # near-white letters are there...
    assert dark < 0.08  # ...on a dark box...
    assert (light + 0.05) / (dark + 0.05) >= 7.0  # WCAG AAA contrast between them


def test_text_is_drawn_not_just_a_box() -> None:
    # A different text yields a different label: the pixels depend on the letters.
    frame = np.full((512, 512, 3), 128, np.uint8)
    a = FrameLabeler(LabelConfig(text="AI GENERATED")).apply(frame)
    b = FrameLabeler(LabelConfig(text="AI MODIFIED")).apply(frame)
    assert np.any(a != b)
    ai_only = FrameLabeler(LabelConfig(text="AI")).region(frame.shape)
    full = FrameLabeler().region(frame.shape)
    assert ai_only[3] - ai_only[2] < (full[3] - full[2]) / 2  # the bare mark is just the badge


@pytest.mark.parametrize(("height", "width"), SIZES)
def test_size_scales_with_frame_height(height: int, width: int) -> None:
    small = FrameLabeler(LabelConfig(size=0.05)).region((height, width))
    large = FrameLabeler(LabelConfig(size=0.10)).region((height, width))
    assert small[1] - small[0] == pytest.approx(0.05 * height, abs=1)
    assert large[1] - large[0] == pytest.approx(0.10 * height, abs=1)
    assert large[3] - large[2] > small[3] - small[2]


def test_label_keeps_its_proportion_across_resolutions() -> None:
    labeler = FrameLabeler()
    h360 = labeler.region((360, 640))
    h1080 = labeler.region((1080, 1920))
    assert (h1080[1] - h1080[0]) == pytest.approx(3 * (h360[1] - h360[0]), abs=3)


def test_narrow_frame_shrinks_the_label_instead_of_cutting_it() -> None:
    height, width = 640, 200
    labeler = FrameLabeler(LabelConfig(size=0.25))
    y0, y1, x0, x1 = labeler.region((height, width))
    assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
    assert np.any(labeler.apply(_noise(height, width)) != _noise(height, width))


def test_disabled_returns_frame_unchanged() -> None:
    frame = _noise(360, 640)
    labeler = FrameLabeler(LabelConfig(enabled=False))
    out = labeler.apply(frame)
    np.testing.assert_array_equal(out, frame)
    assert not np.shares_memory(out, frame)
    inplace = frame.copy()
    labeler.apply_inplace(inplace)
    np.testing.assert_array_equal(inplace, frame)
    assert labeler.region(frame.shape) == (0, 0, 0, 0)


def test_non_contiguous_frames_are_labelled() -> None:
    big = _noise(720, 1280)
    view = big[::2, ::2]  # 360x640, strided
    out = FrameLabeler().apply(view)
    reference = FrameLabeler().apply(np.ascontiguousarray(view))
    np.testing.assert_array_equal(out, reference)


@pytest.mark.parametrize(
    "frame",
    [
        np.zeros((64, 64), np.uint8),
        np.zeros((64, 64, 4), np.uint8),
        np.zeros((64, 64, 3), np.float32),
        np.zeros((16, 64, 3), np.uint8),
        [[0, 0, 0]],
    ],
    ids=["gray", "rgba", "float", "tiny", "list"],
)
def test_bad_frames_raise_media_format_error(frame: object) -> None:
    labeler = FrameLabeler()
    with pytest.raises(MediaFormatError) as info:
        labeler.apply(frame)  # type: ignore[arg-type]
    assert info.value.field == "frame"
    with pytest.raises(MediaFormatError):
        labeler.apply_inplace(frame)  # type: ignore[arg-type]


def test_read_only_frame_cannot_be_labelled_in_place() -> None:
    frame = np.zeros((64, 64, 3), np.uint8)
    frame.setflags(write=False)
    with pytest.raises(MediaFormatError):
        FrameLabeler().apply_inplace(frame)
    assert FrameLabeler().apply(frame).flags.writeable


def test_bad_region_shape() -> None:
    with pytest.raises(MediaFormatError):
        FrameLabeler().region((64,))


@pytest.mark.parametrize(
    ("field", "value"),
    [("size", 0.01), ("size", 0.5), ("margin", -0.1), ("opacity", 0.1), ("opacity", 1.5),
     ("position", "center"), ("text", ""), ("text", "AI\nGENERATED"), ("text", "x" * 41)],
)
def test_config_validation_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as info:
        LabelConfig.model_validate({field: value})
    assert info.value.errors()[0]["loc"] == (field,)


def test_config_is_frozen() -> None:
    config = LabelConfig()
    with pytest.raises(ValidationError):
        config.size = 0.1  # type: ignore[misc]
