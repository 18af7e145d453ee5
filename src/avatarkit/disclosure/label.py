"""The visible "AI GENERATED" label burned into every frame avatarkit produces.

Why burned in: EU AI Act Art. 50(4) and the Commission's Code of Practice (section 2) want
deployers to label synthetic video so a viewer recognises it *immediately*, from the first
exposure, readable on any background, the top-right corner being the suggested spot. A label
drawn by the player UI disappears as soon as the stream is recorded, re-encoded or forwarded
by an SFU; pixels in the frame survive all of that. For live avatars there is no defined
"start" for late joiners, so the conservative reading is a persistent label on every frame.

The design follows the EU icon set: the capital letters "AI" are the main element (a white
badge with dark "AI", which doubles as the icon: user testing found text plus icon more
noticeable than either alone), followed by the label text in white with a dark outline, on a
dark semi-transparent box. White-on-dark with an outline keeps the contrast high over white,
black and busy backgrounds alike.

Cost: the label is rendered once per frame size with Pillow and cached as premultiplied
colour plus inverse alpha, so labelling a frame is one numpy blend of a small region (a few
hundredths of a millisecond on 512x512). :meth:`FrameLabeler.region` tells the invisible
watermark where the label is, so it can leave that area alone.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFont

from ..errors import AvatarKitError, MediaFormatError
from .label_config import LabelConfig, LabelPosition

__all__ = ["MIN_FRAME_SIDE", "FrameLabeler", "LabelConfig", "LabelPosition"]

#: Frames smaller than this cannot carry a legible label; they are refused, not left bare.
MIN_FRAME_SIDE = 32
#: Below this many pixels of height the letters stop being readable, whatever ``size`` says.
_MIN_LABEL_PX = 14
#: Supersampling factor for drawing: Pillow does not anti-alias shapes, so draw large and
#: downscale with a good filter.
_SS = 3
_CACHE_SIZE = 8


@dataclass(frozen=True)
class _Patch:
    """A label rendered for one frame size: where it goes and how to blend it."""

    y0: int
    y1: int
    x0: int
    x1: int
    premultiplied: NDArray[np.float32]  # RGB * alpha, h x w x 3, in 0..255
    inverse_alpha: NDArray[np.float32]  # 1 - alpha, h x w x 1


class FrameLabeler:
    """Burns the configured label into RGB frames (``H x W x 3`` ``uint8``).

    Thread-safe; one instance can serve several streams of different sizes (the rendered
    label is cached per size).
    """

    def __init__(self, config: LabelConfig | None = None) -> None:
        self.config = config if config is not None else LabelConfig()
        self._patches: dict[tuple[int, int], _Patch] = {}
        self._lock = threading.Lock()

    def apply(self, frame: NDArray[np.uint8]) -> NDArray[np.uint8]:
        """A labelled copy of ``frame`` (an unchanged copy when the label is disabled)."""
        _check_frame(frame)
        out = np.array(frame, dtype=np.uint8, copy=True, order="C")
        if self.config.enabled:
            self._blend(out)
        return out

    def apply_inplace(self, frame: NDArray[np.uint8]) -> None:
        """Label ``frame`` itself, for pipelines that own their frame buffers."""
        _check_frame(frame)
        if not frame.flags.writeable:
            raise MediaFormatError("is read-only", field="frame", expected="a writeable array")
        if self.config.enabled:
            self._blend(frame)

    def region(self, frame_shape: tuple[int, ...]) -> tuple[int, int, int, int]:
        """``(y0, y1, x0, x1)``: the rectangle the label covers in a frame of this shape
        (``(H, W)`` or ``(H, W, C)``); ``(0, 0, 0, 0)`` when the label is disabled. Pixels
        outside it are never modified."""
        if len(frame_shape) < 2:
            raise MediaFormatError(f"shape {frame_shape} has no height and width",
                                   field="frame_shape", expected="(H, W) or (H, W, 3)")
        if not self.config.enabled:
            return (0, 0, 0, 0)
        patch = self._patch(int(frame_shape[0]), int(frame_shape[1]))
        return (patch.y0, patch.y1, patch.x0, patch.x1)

    def _blend(self, frame: NDArray[np.uint8]) -> None:
        patch = self._patch(frame.shape[0], frame.shape[1])
        view = frame[patch.y0:patch.y1, patch.x0:patch.x1]
        blended = view * patch.inverse_alpha + patch.premultiplied
        np.add(blended, 0.5, out=blended)  # round to nearest on the cast below
        view[...] = blended.astype(np.uint8)

    def _patch(self, height: int, width: int) -> _Patch:
        key = (height, width)
        patch = self._patches.get(key)
        if patch is not None:
            return patch
        with self._lock:
            patch = self._patches.get(key)
            if patch is None:
                patch = _render(self.config, height, width)
                if len(self._patches) >= _CACHE_SIZE:
                    self._patches.pop(next(iter(self._patches)))
                self._patches[key] = patch
        return patch


def _check_frame(frame: object) -> None:
    expected = f"an H x W x 3 uint8 RGB array, H and W >= {MIN_FRAME_SIDE}"
    if not isinstance(frame, np.ndarray):
        raise MediaFormatError(f"got {type(frame).__name__}", field="frame", expected=expected)
    if frame.dtype != np.uint8:
        raise MediaFormatError(f"dtype is {frame.dtype}", field="frame", expected=expected)
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise MediaFormatError(f"shape is {frame.shape}", field="frame", expected=expected)
    if min(frame.shape[0], frame.shape[1]) < MIN_FRAME_SIDE:
        raise MediaFormatError(f"shape is {frame.shape}, too small for a legible label",
                               field="frame", expected=expected)


def _font(px: int) -> ImageFont.FreeTypeFont:
    font = ImageFont.load_default(size=px)
    if not isinstance(font, ImageFont.FreeTypeFont):  # Pillow built without FreeType
        raise AvatarKitError("the visible label needs Pillow with FreeType support")
    return font


def _draw_label(config: LabelConfig, label_h: int) -> Image.Image:
    """The label at ``label_h`` pixels high (its natural width), RGBA, anti-aliased."""
    h = label_h * _SS
    pad = round(h * 0.18)
    radius = round(h * 0.2)
    font = _font(round(h * 0.62))
    stroke = max(1, round(h * 0.035))
    text = config.text
    show_badge = text.upper() != "AI"  # a bare "AI" label is the badge itself

    badge_font = _font(round(h * 0.52))
    bl, bt, br, bb = badge_font.getbbox("AI")
    badge_h = h - 2 * round(h * 0.14)
    badge_w = max(badge_h, math.ceil(br - bl) + 2 * round(h * 0.16))
    tl, tt, tr, tb = font.getbbox(text, stroke_width=stroke)
    text_w = math.ceil(tr - tl)
    width = pad + badge_w + (round(h * 0.22) + text_w if show_badge else 0) + pad

    image = Image.new("RGBA", (width, h), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.rounded_rectangle((0, 0, width - 1, h - 1), radius=radius,
                           fill=(16, 16, 16, round(255 * config.opacity)))
    # The "AI" badge: white, opaque, dark letters; the element the EU icons centre on.
    by = (h - badge_h) // 2
    draw.rounded_rectangle((pad, by, pad + badge_w, by + badge_h), radius=round(radius * 0.7),
                           fill=(255, 255, 255, 255))
    draw.text((pad + (badge_w - (br - bl)) / 2 - bl, by + (badge_h - (bb - bt)) / 2 - bt), "AI",
              font=badge_font, fill=(16, 16, 16, 255), stroke_width=max(1, stroke // 2),
              stroke_fill=(16, 16, 16, 255))
    if show_badge:
        tx = pad + badge_w + round(h * 0.22)
        draw.text((tx - tl, (h - (tb - tt)) / 2 - tt), text, font=font,
                  fill=(255, 255, 255, 255), stroke_width=stroke, stroke_fill=(0, 0, 0, 255))
    return image.resize((max(1, round(width / _SS)), label_h), Image.Resampling.LANCZOS)


def _render(config: LabelConfig, height: int, width: int) -> _Patch:
    margin = round(config.margin * height)
    label_h = max(_MIN_LABEL_PX, round(config.size * height))
    image = _draw_label(config, label_h)
    room_w, room_h = width - 2 * margin, height - 2 * margin
    if min(room_w, room_h) < _MIN_LABEL_PX:
        raise MediaFormatError(f"a {width}x{height} frame leaves no room for the label within "
                               f"its margins", field="frame",
                               expected=f"room for a {_MIN_LABEL_PX} px label inside the margins")
    if image.width > room_w or image.height > room_h:
        # Narrow (portrait) frames: shrink the whole label rather than cut the text.
        scale = min(room_w / image.width, room_h / image.height)
        image = _draw_label(config, max(1, int(label_h * scale)))
        if image.width > room_w:
            image = image.resize((room_w, image.height), Image.Resampling.LANCZOS)
    rgba = np.asarray(image, dtype=np.float32)
    alpha = rgba[:, :, 3:4] / 255.0
    h, w = rgba.shape[:2]
    top = config.position.startswith("top")
    left = config.position.endswith("left")
    y0 = margin if top else height - margin - h
    x0 = margin if left else width - margin - w
    return _Patch(y0=y0, y1=y0 + h, x0=x0, x1=x0 + w,
                  premultiplied=np.ascontiguousarray(rgba[:, :, :3] * alpha),
                  inverse_alpha=np.ascontiguousarray(1.0 - alpha))
