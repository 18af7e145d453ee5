"""The lite engine: weightless, real-time lip sync on one CPU core.

No model, no weights: the audio of each video frame drives three mouth parameters, and a
piecewise-affine warp of the avatar's lower face shows them.

_Audio -> mouth (:class:`MouthModel`)
------------------------------------
Per frame of int16 mono audio (``sample_rate / fps`` samples):

- **openness** from the RMS level in dBFS: 0 at or below ``gate_db`` (the noise gate: silence
  and hum below it are exactly closed), 1 at ``full_db``, linear in dB between. Sibilant
  frames (most energy above 2 kHz: "s", "sh", "f") are closed by up to half, since those sounds
  are made with the teeth nearly together.
- **width** from the energy between 2 and 8 kHz relative to 500 Hz - 2 kHz (one Hann-windowed
  ``rfft`` of the frame; 0 at -9 dB, 1 at +6 dB): front vowels ("ee", second formant above
  2 kHz) and sibilants spread the lips; "ah" (both formants in 500 Hz - 2 kHz) does not.
- **rounding** from the energy below 500 Hz relative to 500 Hz - 2 kHz (0 at 0 dB, 1 at
  +10 dB), only when almost nothing is above 2 kHz (high band 12-24 dB under the mid band):
  back rounded vowels ("oo", "oh") have both formants low and nothing high.

Relative band levels rather than shares of the total: the first formant carries most of the
energy of every vowel, so shares barely separate "ee" from "ah".

Each parameter is smoothed with an envelope follower: towards a larger value exponentially with
time constant ``attack_s`` (25 ms: at 25 fps 80 % of the way in one frame), towards a smaller
one linearly at ``1 / release_s`` per second (80 ms: a fully open mouth closes in exactly
``release_s``, so it reaches 0 and stays there, rather than approaching it forever). Frames the
runner marks as not speaking are never analysed: the engine shows them closed and the model
only releases towards rest.

Mouth -> pixels (:class:`LiteEngine`)
-------------------------------------
Once per source frame (lazily, cached): a face frame from the landmarks (the cheek axis
``234 -> 454`` and its normal towards the chin, the mouth centre between the inner lip centres
``13`` / ``14``, the face height from the nose bottom ``2`` to the chin ``152``, the mouth half
width from the corners ``61`` / ``291``); for every landmark a displacement at full openness,
full width and full rounding (the warp is linear in the three parameters, so a frame only mixes
three precomputed fields); the mesh: the lip contours (outer and inner), the skin around the
mouth, the lower face oval and the chin (``MESH_LANDMARKS``) plus fixed anchors around the crop
box, triangulated once (Delaunay via ``scipy.spatial`` when installed, else OpenCV's
``Subdiv2D``) in the *open* pose, where the inner lip contours are well apart, so the mouth's
inside gets its own triangles; the blend weight: the avatar's feathered lower-face mask resized
onto the crop box, and the rectangle where it is not zero (all work happens in that rectangle).

The displacement fields, in the face frame (``u`` across, in mouth half widths; ``v`` down):

- openness: the lower lip (inner and outer contours) drops by ``jaw_drop`` x face height at
  the centre, with an elliptical profile across the mouth (the corners drop a tenth of that,
  the upper and lower lips meet there); the skin below
  the lip line moves with the jaw (a profile that reaches about 12 % at the jaw angles, eased in
  over a quarter face height below the lip line, falling to ``chin_follow`` at the chin, so the
  chin stays inside the mask); the upper lip rises by ``upper_lip_raise`` x face height.
- width / rounding: a horizontal stretch / squeeze about the mouth centre by ``width_gain`` /
  ``round_gain`` of the half width: all of it on the lips, fading to nothing two half widths
  out, a fifth of a face height above and two fifths below the lip line.
- The row of points under the nose never moves. After triangulating, every pose of a
  3 x 3 x 3 grid over the parameters is checked for triangles that turn over (a fold); a field
  that folds is scaled down until none does (a broad smile puts the lip corners close to the
  nose: the astronaut keeps 61 % of the default rounding).

Per speaking frame: mix the three fields; for each triangle with a moving vertex, the affine
map from its displaced to its rest position; rasterise those triangles (``cv2.fillConvexPoly``
of the triangle number into an index map over the mask rectangle; everything else maps to
itself); gather each pixel's affine map and sample the source with ``cv2.remap`` (bilinear);
then paint the opened mouth: inside the displaced inner lip contour, the source where the
*source* mouth was already open (its own teeth stay; when its inner lips are more than 8 % of
the face height apart), elsewhere a dark cavity, darkest under the upper lip and lighter
towards the tongue, with a band of upper teeth when the source mouth is closed (inner lips
less than 3 % apart; in between, both fade); finally blend into the frame with the mask
(integer arithmetic: where the mask is 0 the pixel is the source pixel, byte for byte).

Choices and limits:

- The source is assumed to show a **closed mouth**: a silent frame, and every frame the runner
  marks as not speaking, is the source frame unchanged. An avatar with an open mouth works (its
  own inside is kept, stretched where the jaw opens further) but cannot close it.
- ``speaking=True`` with the mouth at rest (silence within an utterance, after the release)
  also returns the source frame unchanged: no warp at all, so a pause never shimmers.
- The chin drops at most ``chin_follow`` x ``jaw_drop`` x face height: with the defaults 12 %
  of the nose-to-chin height, about what the preparation's mask leaves below the chin (its
  10 % stretch, then the feather). Larger values can show a faint second chin in the mask's
  feathered edge.
- Large avatars are downscaled once to ``max_side`` (default 720 px) on their longer side; the
  engine's ``width`` / ``height`` are then the scaled size.
- One engine serves one stream: it is not thread-safe (the mouth model has state).

Nothing heavy is imported with this module: OpenCV (and SciPy, if present) load when the first
frame is rendered.

Why one module: the lite engine is one model (mouth shape from the audio envelope, a
warp rig built from the landmarks, and the per-frame composite), tuned together; its parts
have no users outside the engine and splitting them would split one numerical pipeline.
"""

from __future__ import annotations

import importlib
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field

from ..errors import MediaFormatError
from .engine import LipSyncEngine

if TYPE_CHECKING:
    from .avatar import PreparedAvatar

__all__ = [
    "LITE_ENGINE_VERSION",
    "LOWER_INNER",
    "LOWER_OUTER",
    "MESH_LANDMARKS",
    "UPPER_INNER",
    "UPPER_OUTER",
    "LiteEngine",
    "LiteOptions",
    "MouthModel",
    "MouthOptions",
    "MouthShape",
]

#: Bumped whenever the lite engine's output changes for the same input and options.
LITE_ENGINE_VERSION = "1"

_Frame = NDArray[np.uint8]
_Audio = NDArray[np.int16]
_F32 = NDArray[np.float32]
_F64 = NDArray[np.float64]

# ----------------------------------------------------------------------------- landmarks

# mediapipe 468-point topology (see face.py for the points this module shares with it).
UPPER_OUTER: tuple[int, ...] = (61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291)
LOWER_OUTER: tuple[int, ...] = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291)
UPPER_INNER: tuple[int, ...] = (78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308)
LOWER_INNER: tuple[int, ...] = (78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308)
_MOUTH_CORNERS: tuple[int, ...] = (61, 291, 78, 308)
# The skin around the mouth, the lower face oval and the chin (pairs mirror each other).
_SURROUND: tuple[int, ...] = (
    2, 164, 167, 393, 165, 391, 92, 322, 186, 410, 216, 436,          # nose bottom, philtrum
    57, 287, 212, 432, 214, 434, 43, 273, 202, 422, 138, 367,         # beside the mouth
    106, 335, 204, 424, 182, 406, 83, 313, 18, 210, 430, 211, 431,    # below the lower lip
    194, 418, 201, 421, 200, 32, 262, 199, 169, 394,                  # down to the chin
    58, 288, 172, 397, 136, 365, 150, 379, 149, 378, 176, 400, 148, 377, 152,  # jaw oval
)
#: The landmarks the warp mesh is built on (before the anchors around the crop box).
MESH_LANDMARKS: tuple[int, ...] = tuple(dict.fromkeys(
    UPPER_OUTER + LOWER_OUTER + UPPER_INNER + LOWER_INNER + _SURROUND))

_UPPER_LIP = frozenset(UPPER_OUTER + UPPER_INNER) - frozenset(_MOUTH_CORNERS)
_LOWER_LIP = frozenset(LOWER_OUTER + LOWER_INNER) - frozenset(_MOUTH_CORNERS)
_INNER = frozenset(UPPER_INNER + LOWER_INNER)
# The row under the nose never moves.
_STILL = frozenset((2, 167, 393, 165, 391, 216, 436))
_NOSE_BOTTOM, _CHIN, _CHEEK_LEFT, _CHEEK_RIGHT = 2, 152, 234, 454
_INNER_TOP, _INNER_BOTTOM, _LOWER_LIP_BOTTOM = 13, 14, 17
_CORNER_LEFT, _CORNER_RIGHT = 61, 291
_NUM_LANDMARKS = 468

# Spectral bands of the mouth model (Hz): low [60, 500), mid [500, 2000), high [2000, 8000].
_LOW_BAND = (60.0, 500.0)
_HIGH_BAND = (2000.0, 8000.0)
_BAND_TOP = 8000.0


# ----------------------------------------------------------------------------- the mouth


@dataclass(frozen=True, slots=True)
class MouthShape:
    """What the mouth does in one frame; each parameter in [0, 1], all 0 at rest.

    Attributes:
        openness: how far the jaw and lips are open (0 = closed, as in the source).
        width: how far the lips spread sideways ("ee", "s").
        rounding: how far the lips round and narrow ("oo").
    """

    openness: float = 0.0
    width: float = 0.0
    rounding: float = 0.0

    def __post_init__(self) -> None:
        for name in ("openness", "width", "rounding"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value)
                    and 0.0 <= value <= 1.0):
                raise ValueError(f"{name}: expected a number in [0, 1], got {value!r}")

    @property
    def is_rest(self) -> bool:
        """True for the closed, neutral mouth of the source frame."""
        return self.openness == 0.0 and self.width == 0.0 and self.rounding == 0.0


_REST = MouthShape()


class MouthOptions(BaseModel):
    """How :class:`MouthModel` turns audio into mouth shapes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    gate_db: float = Field(
        -48.0, le=0.0, allow_inf_nan=False,
        description="frames whose RMS level (dBFS) is at or below this are silence: the "
                    "mouth's target is exactly closed")
    full_db: float = Field(
        -14.0, le=0.0, allow_inf_nan=False,
        description="RMS level (dBFS) that opens the mouth fully; linear in dB from gate_db")
    attack_s: float = Field(
        0.025, gt=0.0, le=1.0, allow_inf_nan=False,
        description="time constant (s) of the exponential approach to a larger value")
    release_s: float = Field(
        0.08, gt=0.0, le=2.0, allow_inf_nan=False,
        description="time (s) a parameter takes to fall linearly from 1 to 0")
    sibilant_close: float = Field(
        0.5, ge=0.0, le=1.0, allow_inf_nan=False,
        description="how much a frame with nearly all its energy above 2 kHz closes the mouth "
                    "(0 = not at all)")

    def model_post_init(self, __context: Any) -> None:
        if self.full_db <= self.gate_db:
            raise ValueError(f"full_db: expected a level above gate_db ({self.gate_db} dBFS), "
                             f"got {self.full_db} dBFS")


def _smoothstep(x: float) -> float:
    x = min(1.0, max(0.0, x))
    return x * x * (3.0 - 2.0 * x)


class MouthModel:
    """_Audio frames in, smoothed :class:`MouthShape` out (one call per video frame).

    ``fps`` sets the frame duration the smoothing advances by on each call, whatever the
    number of samples (the last frame of a segment may be short). Not thread-safe.
    """

    def __init__(self, sample_rate: int = 16_000, *, fps: float = 25.0,
                 options: MouthOptions | None = None) -> None:
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or \
                sample_rate < 8000:
            raise MediaFormatError(f"got {sample_rate!r}", field="sample_rate",
                                   expected="an integer rate >= 8000 Hz")
        if not (isinstance(fps, int | float) and math.isfinite(fps) and fps > 0):
            raise MediaFormatError(f"got {fps!r}", field="fps", expected="a positive number")
        self.sample_rate = sample_rate
        self.fps = float(fps)
        self.options = options if options is not None else MouthOptions()
        dt = 1.0 / self.fps
        self._attack = 1.0 - math.exp(-dt / self.options.attack_s)
        self._release = dt / self.options.release_s
        self._windows: dict[int, tuple[_F32, NDArray[np.bool_], NDArray[np.bool_],
                                       NDArray[np.bool_]]] = {}
        self._state = _REST

    @property
    def shape(self) -> MouthShape:
        """The current (smoothed) shape."""
        return self._state

    def reset(self) -> None:
        """Back to rest: the next frame starts from a closed mouth."""
        self._state = _REST

    def target(self, audio: _Audio) -> MouthShape:
        """The shape one frame of audio asks for, before smoothing (stateless)."""
        samples = _check_audio(audio)
        count = samples.shape[0]
        if count == 0:
            return _REST
        x = samples.astype(np.float32)
        x *= np.float32(1.0 / 32768.0)
        power = float(np.dot(x, x)) / count
        opts = self.options
        if power <= 0.0:
            return _REST
        level_db = 10.0 * math.log10(power)
        if level_db <= opts.gate_db:
            return _REST
        loud = min(1.0, (level_db - opts.gate_db) / (opts.full_db - opts.gate_db))

        window, low, mid, high = self._bands(count)
        x *= window
        spectrum = np.fft.rfft(x)
        energy = spectrum.real * spectrum.real + spectrum.imag * spectrum.imag
        e_low, e_mid, e_high = (float(energy[band].sum()) for band in (low, mid, high))
        total = e_low + e_mid + e_high
        if total <= 0.0:
            return MouthShape(openness=loud)
        floor = total * 1e-9
        high_mid_db = 10.0 * math.log10((e_high + floor) / (e_mid + floor))
        low_mid_db = 10.0 * math.log10((e_low + floor) / (e_mid + floor))

        width = _smoothstep((high_mid_db + 9.0) / 15.0)
        rounding = _smoothstep(low_mid_db / 10.0) * _smoothstep((-high_mid_db - 12.0) / 12.0)
        hiss = _smoothstep((e_high / total - 0.5) / 0.4)
        openness = loud * (1.0 - opts.sibilant_close * hiss)
        return MouthShape(openness=openness, width=width, rounding=rounding)

    def step(self, audio: _Audio) -> MouthShape:
        """Advance one frame towards the shape ``audio`` asks for; the new smoothed shape."""
        return self._advance(self.target(audio))

    def rest(self) -> MouthShape:
        """Advance one frame towards rest without looking at any audio (idle frames)."""
        return self._advance(_REST)

    def _advance(self, target: MouthShape) -> MouthShape:
        state = self._state
        if state.is_rest and target.is_rest:
            return state
        values = []
        for now, goal in ((state.openness, target.openness), (state.width, target.width),
                          (state.rounding, target.rounding)):
            if goal > now:
                now += (goal - now) * self._attack
            else:
                now = max(goal, now - self._release)
            values.append(min(1.0, max(0.0, now)))
        self._state = MouthShape(*values)
        return self._state

    def _bands(self, count: int) -> tuple[_F32, NDArray[np.bool_], NDArray[np.bool_],
                                          NDArray[np.bool_]]:
        cached = self._windows.get(count)
        if cached is None:
            window = np.hanning(count).astype(np.float32) if count > 1 else \
                np.ones(count, dtype=np.float32)
            freqs = np.fft.rfftfreq(count, d=1.0 / self.sample_rate)
            top = min(_BAND_TOP, self.sample_rate / 2.0)
            low = (freqs >= _LOW_BAND[0]) & (freqs < _LOW_BAND[1])
            mid = (freqs >= _LOW_BAND[1]) & (freqs < _HIGH_BAND[0])
            high = (freqs >= _HIGH_BAND[0]) & (freqs <= top)
            cached = (window, low, mid, high)
            if len(self._windows) >= 8:
                self._windows.pop(next(iter(self._windows)))
            self._windows[count] = cached
        return cached


def _check_audio(audio: object) -> _Audio:
    expected = "a 1-D int16 array of mono PCM samples"
    if not isinstance(audio, np.ndarray):
        raise MediaFormatError(f"got {type(audio).__name__}", field="audio", expected=expected)
    if audio.dtype != np.int16 or audio.ndim != 1:
        raise MediaFormatError(f"got {audio.dtype} of shape {audio.shape}", field="audio",
                               expected=expected)
    return audio


# ----------------------------------------------------------------------------- options

_Channel = Annotated[int, Field(ge=0, le=255)]


class LiteOptions(BaseModel):
    """How :class:`LiteEngine` draws. Distances are fractions of the face height (nose
    bottom to chin) or of the mouth's half width."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mouth: MouthOptions = Field(default_factory=MouthOptions)
    max_side: int | None = Field(
        720, ge=64, description="downscale avatars whose longer side exceeds this (px), once at "
                                "construction; None keeps every size")
    jaw_drop: float = Field(
        0.26, ge=0.0, le=0.6, allow_inf_nan=False,
        description="how far the lower lip drops at full openness (x face height)")
    chin_follow: float = Field(
        0.45, ge=0.0, le=1.0, allow_inf_nan=False,
        description="the chin's share of the lower lip's drop")
    upper_lip_raise: float = Field(
        0.05, ge=0.0, le=0.3, allow_inf_nan=False,
        description="how far the upper lip rises at full openness (x face height)")
    width_gain: float = Field(
        0.14, ge=0.0, le=0.4, allow_inf_nan=False,
        description="how far each corner moves outwards at full width (x half width)")
    round_gain: float = Field(
        0.22, ge=0.0, le=0.4, allow_inf_nan=False,
        description="how far each corner moves inwards at full rounding (x half width)")
    teeth: float = Field(
        0.9, ge=0.0, le=1.0, allow_inf_nan=False,
        description="opacity of the painted upper teeth (painted only where the source "
                    "mouth is closed); 0 paints none")
    cavity_top: tuple[_Channel, _Channel, _Channel] = Field(
        (26, 9, 11), description="RGB of the mouth's inside under the upper lip")
    cavity_bottom: tuple[_Channel, _Channel, _Channel] = Field(
        (96, 40, 44), description="RGB of the mouth's inside at the lower lip (the tongue)")
    teeth_color: tuple[_Channel, _Channel, _Channel] = Field(
        (222, 216, 204), description="RGB of the painted teeth")


# ----------------------------------------------------------------------------- geometry


def _face_frame(lm: _F64) -> tuple[_F64, _F64, _F64, float, float]:
    """``(mouth centre, axis across, normal towards the chin, face height, half width)``."""
    axis = lm[_CHEEK_RIGHT] - lm[_CHEEK_LEFT]
    norm = float(np.linalg.norm(axis))
    axis = axis / norm if norm > 1e-6 else np.array([1.0, 0.0])
    normal = np.array([-axis[1], axis[0]])
    if (lm[_CHIN] - lm[_NOSE_BOTTOM]) @ normal < 0:
        normal = -normal
    centre = (lm[_INNER_TOP] + lm[_INNER_BOTTOM]) / 2.0
    height = max(float((lm[_CHIN] - lm[_NOSE_BOTTOM]) @ normal), 4.0)
    half_width = max(abs(float((lm[_CORNER_RIGHT] - lm[_CORNER_LEFT]) @ axis)) / 2.0, 2.0)
    return centre, axis, normal, height, half_width


def _basis(lm: _F64, opts: LiteOptions) -> _F64:
    """Displacements ``(3, 468, 2)`` of every landmark at full openness, width, rounding."""
    centre, axis, normal, height, hw = _face_frame(lm)
    rel = lm - centre
    u = (rel @ axis) / hw            # across, in half widths
    v = rel @ normal                  # down, in pixels

    # The lip line: the middle of the inner lips, per column, flat beyond the corners.
    upper_u = (lm[list(UPPER_INNER)] - centre) @ axis / hw
    upper_v = (lm[list(UPPER_INNER)] - centre) @ normal
    lower_v = (lm[list(LOWER_INNER)] - centre) @ normal
    order = np.argsort(upper_u)
    line = np.interp(u, upper_u[order], ((upper_v + lower_v) / 2.0)[order])
    below = v - line

    v_lip_bottom = float(v[_LOWER_LIP_BOTTOM])
    v_chin = max(float(v[_CHIN]), v_lip_bottom + 1.0)
    drop = opts.jaw_drop * height
    raise_ = opts.upper_lip_raise * height

    ellipse = np.sqrt(np.clip(1.0 - u * u, 0.0, 1.0))
    jaw = np.clip(1.0 - (u / 1.9) ** 2, 0.0, 1.0) ** 1.5
    ease = np.clip(below / (0.25 * height), 0.0, 1.0)
    ease = ease * ease * (3.0 - 2.0 * ease)
    towards_chin = np.clip((v - v_lip_bottom) / (v_chin - v_lip_bottom), 0.0, 1.0)
    follow = 1.0 - (1.0 - opts.chin_follow) * towards_chin

    open_v = drop * jaw * ease * follow                                   # skin
    lower = np.array(sorted(_LOWER_LIP))
    open_v[lower] = drop * jaw[lower] * ellipse[lower]
    for index in _UPPER_LIP:
        open_v[index] = -raise_ * float(ellipse[index]) * (1.0 if index in _INNER else 0.6)
    for index in _MOUTH_CORNERS:
        open_v[index] = 0.1 * drop

    # Sideways stretch about the mouth centre: all of it on the lips, fading outside (over a
    # fifth of the face height above the lip line, two fifths below).
    across = np.clip(2.0 - np.abs(u), 0.0, 1.0)
    reach = np.where(below < 0.0, 0.2 * height, 0.4 * height)
    along = np.clip(1.0 - np.abs(below) / reach, 0.0, 1.0)
    stretch = u * hw * across * along
    lips = list(_UPPER_LIP | _LOWER_LIP | frozenset(_MOUTH_CORNERS))
    stretch[lips] = u[lips] * hw

    still = list(_STILL)
    open_v[still] = 0.0
    stretch[still] = 0.0

    basis = np.zeros((3, lm.shape[0], 2), dtype=np.float64)
    basis[0] = open_v[:, None] * normal[None, :]
    basis[1] = (opts.width_gain * stretch)[:, None] * axis[None, :]
    basis[2] = (-opts.round_gain * stretch)[:, None] * axis[None, :]
    return basis


def _triangulate(points: _F64) -> NDArray[np.int32]:
    """Delaunay triangles ``(T, 3)`` of distinct 2-D points: SciPy's when installed, else
    OpenCV's ``Subdiv2D``."""
    try:
        spatial: Any = importlib.import_module("scipy.spatial")
    except ImportError:
        return _triangulate_cv(points)
    return np.asarray(spatial.Delaunay(points).simplices, dtype=np.int32)


def _triangulate_cv(points: _F64) -> NDArray[np.int32]:
    import cv2

    lo = np.floor(points.min(axis=0)) - 2.0
    hi = np.ceil(points.max(axis=0)) + 2.0
    subdiv = cv2.Subdiv2D((int(lo[0]), int(lo[1]), int(hi[0] - lo[0]) + 1,
                           int(hi[1] - lo[1]) + 1))
    for x, y in points:
        subdiv.insert((float(x), float(y)))
    found = np.asarray(subdiv.getTriangleList(), dtype=np.float64).reshape(-1, 3, 2)
    triangles = []
    for tri in found:
        dist = np.linalg.norm(points[None, :, :] - tri[:, None, :], axis=2)
        index = dist.argmin(axis=1)
        if np.all(dist[np.arange(3), index] < 1e-3) and len(set(index.tolist())) == 3:
            triangles.append(index)
    return np.asarray(triangles, dtype=np.int32).reshape(-1, 3)


def _signed_areas(points: _F64, triangles: NDArray[np.int32]) -> _F64:
    a = points[triangles[:, 1]] - points[triangles[:, 0]]
    b = points[triangles[:, 2]] - points[triangles[:, 0]]
    return np.asarray(a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0], dtype=np.float64)


def _fold_free_scale(rest: _F64, basis: _F64, triangles: NDArray[np.int32]) -> _F64:
    """Factors ``(3,)`` for the three displacement fields so that no triangle that is sound
    at rest turns over in any pose of a 3 x 3 x 3 grid over the parameter cube.

    A face whose landmarks crowd the mouth (a broad smile puts the lip corners near the nose)
    would otherwise fold. A failing pose of one field shrinks that field by 15 %; a failing
    mix shrinks its sideways fields (width, rounding), or openness when it has none.
    """
    reference = np.sign(_signed_areas(rest + basis[0], triangles))
    at_rest = _signed_areas(rest, triangles) * reference
    sound = at_rest > 1e-6
    scale = np.ones(3, dtype=np.float64)
    steps = (0.0, 0.5, 1.0)
    poses = [np.array((o, w, r)) for o in steps for w in steps for r in steps
             if (o, w, r) != (0.0, 0.0, 0.0)]
    for _ in range(16):
        shrink = np.zeros(3, dtype=bool)
        for pose in poses:
            moved = rest + np.tensordot(pose * scale, basis, axes=1)
            if np.any(_signed_areas(moved, triangles)[sound] * reference[sound] <= 0.0):
                used = pose > 0.0
                sideways = used & np.array([False, True, True])
                shrink |= sideways if used.sum() > 1 and sideways.any() else used
        if not shrink.any():
            break
        scale[shrink] *= 0.85
    return scale


@dataclass(eq=False)
class _Rig:
    """Everything about one source frame that does not depend on the mouth shape.

    Coordinates are *pixel-index* coordinates (pixel ``(i, j)`` at ``(j, i)``), the
    landmarks' continuous coordinates minus 0.5, which is what OpenCV's drawing and
    ``remap`` use. ``region`` is ``(y0, y1, x0, x1)``, where the blend weight is not zero.
    """

    frame: _Frame                 # (H, W, 3), read-only
    landmarks: _F64               # (468, 2) continuous pixel coordinates
    basis: _F64                   # (3, 468, 2)
    region: tuple[int, int, int, int]
    alpha: NDArray[np.uint16]    # (h, w, 1) blend weight 0..255 over the region
    keep: NDArray[np.uint16]     # (h, w, 3) source * (255 - alpha) + 127
    grid_x: _F32                  # (h, w) pixel-index x of each region pixel
    grid_y: _F32
    rest: _F64                    # (M, 2) mesh vertices, index coordinates
    vertex_basis: _F64            # (3, M, 2) the vertices' displacement fields
    triangles: NDArray[np.int32]  # (K, 3) the triangles with a moving vertex
    inner: NDArray[np.intp]      # mesh vertices of the inner lip loop (upper L->R, lower R->L)
    upper_inner: NDArray[np.intp]
    lower_inner: NDArray[np.intp]
    source_mouth: NDArray[np.float32]  # (h, w) 0..1: where the source mouth is open
    centre: _F64                  # mouth centre, index coordinates
    axis: _F64
    normal: _F64
    height: float
    half_width: float
    teeth: float                 # painted teeth opacity for this frame (0 when the source
                                 # already shows its own)

    @property
    def empty(self) -> bool:
        y0, y1, x0, x1 = self.region
        return y1 <= y0 or x1 <= x0


def _scaled_frame(avatar: PreparedAvatar, index: int,
                  size: tuple[int, int]) -> tuple[_Frame, _F64, _F64, NDArray[np.uint8]]:
    """The frame, landmarks, crop box (float) and mask of ``index`` at ``size`` (w, h)."""
    frame = avatar.frames[index]
    lm = avatar.landmarks[index].astype(np.float64)
    crop = avatar.crop_boxes[index].astype(np.float64)
    height, width = frame.shape[:2]
    if size != (width, height):
        import cv2

        sx, sy = size[0] / width, size[1] / height
        frame = np.asarray(cv2.resize(frame, size, interpolation=cv2.INTER_AREA),
                           dtype=np.uint8)
        frame.setflags(write=False)
        lm = lm * np.array([sx, sy])
        crop = crop * np.array([sx, sy, sx, sy])
    return frame, lm, crop, avatar.masks[index]


def _build_rig(frame: _Frame, lm: _F64, crop: _F64, mask: NDArray[np.uint8],
               opts: LiteOptions) -> _Rig:
    import cv2

    height, width = frame.shape[:2]
    basis = _basis(lm, opts)

    # Blend weight: the mask resized onto the crop box, clipped to the frame.
    cx0, cy0 = round(float(crop[0])), round(float(crop[1]))
    cx1, cy1 = max(round(float(crop[2])), cx0 + 1), max(round(float(crop[3])), cy0 + 1)
    resized = np.asarray(cv2.resize(mask, (cx1 - cx0, cy1 - cy0),
                                    interpolation=cv2.INTER_LINEAR), dtype=np.uint8)
    full = np.zeros((height, width), dtype=np.uint8)
    fy0, fy1, fx0, fx1 = max(cy0, 0), min(cy1, height), max(cx0, 0), min(cx1, width)
    if fy1 > fy0 and fx1 > fx0:
        full[fy0:fy1, fx0:fx1] = resized[fy0 - cy0:fy1 - cy0, fx0 - cx0:fx1 - cx0]
    rows = np.flatnonzero(full.any(axis=1))
    cols = np.flatnonzero(full.any(axis=0))
    if rows.size == 0:
        region = (0, 0, 0, 0)
    else:
        region = (int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1)
    y0, y1, x0, x1 = region
    alpha = full[y0:y1, x0:x1, None].astype(np.uint16)
    keep = frame[y0:y1, x0:x1].astype(np.uint16) * (255 - alpha) + 127
    gy, gx = np.mgrid[y0:y1, x0:x1].astype(np.float32)

    # The mesh: chosen landmarks plus anchors around everything that can move.
    ids = np.array(MESH_LANDMARKS)
    rest_lm = lm[ids] - 0.5
    vb = basis[:, ids]
    extreme = [rest_lm + a * vb[0] + b * vb[1] + c * vb[2]
               for a in (0, 1) for b in (0, 1) for c in (0, 1)]
    pts = np.concatenate([np.array([[cx0 - 0.5, cy0 - 0.5], [cx1 - 0.5, cy1 - 0.5]]),
                          *extreme])
    lo = pts.min(axis=0) - 3.0
    hi = pts.max(axis=0) + 3.0
    ts = np.linspace(0.0, 1.0, 5)
    border = np.concatenate([
        np.stack([lo[0] + ts * (hi[0] - lo[0]), np.full(5, lo[1])], axis=1),
        np.stack([lo[0] + ts * (hi[0] - lo[0]), np.full(5, hi[1])], axis=1),
        np.stack([np.full(3, lo[0]), lo[1] + ts[1:4] * (hi[1] - lo[1])], axis=1),
        np.stack([np.full(3, hi[0]), lo[1] + ts[1:4] * (hi[1] - lo[1])], axis=1),
    ])
    rest = np.concatenate([rest_lm, border])
    vertex_basis = np.concatenate([vb, np.zeros((3, border.shape[0], 2))], axis=1)
    # Triangulate the open pose (the inner lips far apart) after merging duplicates.
    open_pose = rest + vertex_basis[0]
    _, unique = np.unique(np.round(open_pose, 3), axis=0, return_index=True)
    unique = np.sort(unique)
    triangles = unique[_triangulate(open_pose[unique])].astype(np.int32)
    factors = _fold_free_scale(rest, vertex_basis, triangles)[:, None, None]
    vertex_basis *= factors
    basis *= factors
    moving = np.any(np.abs(vertex_basis) > 1e-9, axis=(0, 2))
    triangles = triangles[moving[triangles].any(axis=1)]

    position = {landmark: k for k, landmark in enumerate(MESH_LANDMARKS)}
    upper_inner = np.array([position[i] for i in UPPER_INNER], dtype=np.intp)
    lower_inner = np.array([position[i] for i in LOWER_INNER], dtype=np.intp)
    inner = np.concatenate([upper_inner, lower_inner[::-1][1:-1]])

    # Where the source's own mouth is open (its teeth are kept there).
    source_mouth = np.zeros((y1 - y0, x1 - x0), dtype=np.uint8)
    if not (y1 <= y0 or x1 <= x0):
        loop = np.round((rest[inner] - np.array([x0, y0])) * 16.0).astype(np.int32)
        cv2.fillPoly(source_mouth, [loop.reshape(-1, 1, 2)], 255, lineType=cv2.LINE_AA, shift=4)

    centre, axis, normal, face_height, half_width = _face_frame(lm)
    # A source mouth open by more than 8 % of the face height shows its own inside (kept);
    # one open by less than 3 % is closed (its lip line is painted over, teeth included).
    gap = float((lm[_INNER_BOTTOM] - lm[_INNER_TOP]) @ normal)
    own = min(1.0, max(0.0, (gap - 0.03 * face_height) / (0.05 * face_height)))
    teeth = opts.teeth * (1.0 - own)
    for array in (alpha, keep, gy, gx):
        array.setflags(write=False)
    return _Rig(
        frame=frame, landmarks=lm, basis=basis, region=region, alpha=alpha, keep=keep,
        grid_x=gx, grid_y=gy, rest=rest, vertex_basis=vertex_basis, triangles=triangles,
        inner=inner, upper_inner=upper_inner, lower_inner=lower_inner,
        source_mouth=source_mouth.astype(np.float32) * np.float32(own / 255.0),
        centre=centre - 0.5, axis=axis, normal=normal, height=face_height,
        half_width=half_width, teeth=teeth)


# ----------------------------------------------------------------------------- the engine


class LiteEngine(LipSyncEngine):
    """The weightless CPU engine (``engine = "lite"``): see the module docstring.

    Args:
        avatar: the prepared avatar (any number of frames).
        fps: output frame rate; default the avatar's (25 for a still image).
        sample_rate: the mono PCM16 rate :meth:`render` receives.
        options: see :class:`LiteOptions`.

    After each :meth:`render`, :attr:`shape` is the mouth shape drawn and
    :attr:`last_stage_ns` the time spent in each stage (``mouth``, ``warp``, ``shade_blend``).
    """

    name: ClassVar[str] = "lite"

    def __init__(self, avatar: PreparedAvatar, *, fps: float | None = None,
                 sample_rate: int = 16_000, options: LiteOptions | None = None) -> None:
        self.options = options if options is not None else LiteOptions()
        rate = avatar.fps if fps is None else fps
        if isinstance(rate, bool) or not isinstance(rate, int | float) or \
                not math.isfinite(rate) or rate <= 0:
            raise MediaFormatError(f"got {fps!r}", field="fps", expected="a positive number")
        self.avatar = avatar
        self.fps = float(rate)
        self.mouth = MouthModel(sample_rate, fps=self.fps, options=self.options.mouth)
        self.sample_rate = sample_rate
        self.source_frames = len(avatar)
        src_h, src_w = avatar.frames.shape[1:3]
        limit = self.options.max_side
        if limit is not None and max(src_w, src_h) > limit:
            scale = limit / max(src_w, src_h)
            self.width, self.height = max(1, round(src_w * scale)), max(1, round(src_h * scale))
        else:
            self.width, self.height = int(src_w), int(src_h)
        self._scaled = (self.width, self.height) != (src_w, src_h)
        self.shape: MouthShape = _REST
        self.last_stage_ns: dict[str, int] = {"mouth": 0, "warp": 0, "shade_blend": 0}
        self._rigs: dict[int, _Rig] = {}
        self._identity: dict[int, _F32] = {}

    def __repr__(self) -> str:
        return (f"LiteEngine(avatar={self.avatar!r}, size={self.width}x{self.height}, "
                f"fps={self.fps:g}, sample_rate={self.sample_rate})")

    # -- the contract

    def render(self, audio: _Audio, *, source_index: int, speaking: bool) -> _Frame:
        """One frame: see :meth:`LipSyncEngine.render`.

        ``speaking=False`` returns a copy of the source frame (the mouth closed) without
        looking at ``audio``, and moves the mouth model one frame towards rest. A speaking frame
        whose smoothed shape is at rest is also an unchanged copy of the source frame.
        """
        self._check_index(source_index)
        start = time.perf_counter_ns()
        if not speaking:
            self.shape = self.mouth.rest()
            mouth_ns = time.perf_counter_ns() - start
            frame = self._frame(source_index).copy()
            self.last_stage_ns = {"mouth": mouth_ns, "warp": 0,
                                  "shade_blend": time.perf_counter_ns() - start - mouth_ns}
            return frame
        self.shape = self.mouth.step(audio)
        mouth_ns = time.perf_counter_ns() - start
        frame = self._draw(self.shape, source_index)
        self.last_stage_ns["mouth"] = mouth_ns
        return frame

    def reset(self) -> None:
        """Back to a closed mouth (after an interrupt)."""
        self.mouth.reset()
        self.shape = _REST

    def warm_up(self, source_indices: Iterable[int] | None = None) -> None:
        """Build the per-source-frame data now instead of on first use: about 15 ms a frame,
        plus loading OpenCV and SciPy once, and draw one open-mouth frame. By default the
        first eight source frames (the rest are built as the cycle reaches them, well within
        a frame's time); pass ``range(engine.source_frames)`` for all of them."""
        indices = range(min(8, self.source_frames)) if source_indices is None \
            else source_indices
        for index in indices:
            self._check_index(index)
            self._rig(index)
        self._draw(MouthShape(openness=0.5, width=0.0, rounding=0.0), 0)

    # -- helpers for tools and tests

    def draw(self, shape: MouthShape, *, source_index: int = 0) -> _Frame:
        """The frame for a given mouth shape, leaving the mouth model alone."""
        self._check_index(source_index)
        return self._draw(shape, source_index)

    def displaced_landmarks(self, shape: MouthShape, *, source_index: int = 0) -> _F32:
        """The ``(468, 2)`` landmarks (continuous pixel coordinates of the engine's frames)
        moved as :meth:`draw` moves them for ``shape``."""
        self._check_index(source_index)
        rig = self._rig(source_index)
        weights = np.array([shape.openness, shape.width, shape.rounding])
        moved = rig.landmarks + np.tensordot(weights, rig.basis, axes=1)
        return np.asarray(moved, dtype=np.float32)

    def blend_weight(self, source_index: int = 0) -> NDArray[np.uint8]:
        """``(height, width)`` uint8: how much of each pixel the engine may repaint (0 = the
        source pixel is always returned unchanged)."""
        self._check_index(source_index)
        rig = self._rig(source_index)
        out = np.zeros((self.height, self.width), dtype=np.uint8)
        y0, y1, x0, x1 = rig.region
        out[y0:y1, x0:x1] = rig.alpha[..., 0]
        return out

    # -- internals

    def _check_index(self, source_index: int) -> None:
        if isinstance(source_index, bool) or not isinstance(source_index, int | np.integer) \
                or not 0 <= source_index < self.source_frames:
            raise MediaFormatError(f"got {source_index!r}", field="source_index",
                                   expected=f"a frame index in [0, {self.source_frames})")

    def _rig(self, index: int) -> _Rig:
        rig = self._rigs.get(int(index))
        if rig is None:
            frame, lm, crop, mask = _scaled_frame(self.avatar, int(index),
                                                  (self.width, self.height))
            rig = _build_rig(frame, lm, crop, mask, self.options)
            self._rigs[int(index)] = rig
        return rig

    def _frame(self, index: int) -> _Frame:
        return self._rig(index).frame if self._scaled else self.avatar.frames[index]

    def _draw(self, shape: MouthShape, index: int) -> _Frame:
        start = time.perf_counter_ns()
        rig = None if shape.is_rest else self._rig(index)
        if rig is None or rig.empty:
            frame = self._frame(index).copy()
            self.last_stage_ns = {"mouth": 0, "warp": 0,
                                  "shade_blend": time.perf_counter_ns() - start}
            return frame
        weights = np.array([shape.openness, shape.width, shape.rounding])
        moved = rig.rest + np.tensordot(weights, rig.vertex_basis, axes=1)
        warped = self._warp(rig, moved)
        warp_ns = time.perf_counter_ns()
        out = rig.frame.copy()
        self._shade_and_blend(rig, moved, warped, shape, out)
        end = time.perf_counter_ns()
        self.last_stage_ns = {"mouth": 0, "warp": warp_ns - start, "shade_blend": end - warp_ns}
        return out

    def _warp(self, rig: _Rig, moved: _F64) -> _Frame:
        """The region of the frame, warped from the rest mesh to ``moved``."""
        import cv2

        y0, y1, x0, x1 = rig.region
        tris = rig.triangles
        count = tris.shape[0]
        dst = moved[tris]                        # (K, 3, 2)
        src = rig.rest[tris]
        d1 = dst[:, 1] - dst[:, 0]
        d2 = dst[:, 2] - dst[:, 0]
        det = d1[:, 0] * d2[:, 1] - d2[:, 0] * d1[:, 1]
        ok = np.abs(det) > 1e-9
        inv_det = np.where(ok, 1.0 / np.where(ok, det, 1.0), 0.0)
        # inverse of [d1 d2] (columns), per triangle
        i00, i01 = d2[:, 1] * inv_det, -d2[:, 0] * inv_det
        i10, i11 = -d1[:, 1] * inv_det, d1[:, 0] * inv_det
        s1 = src[:, 1] - src[:, 0]
        s2 = src[:, 2] - src[:, 0]
        coef = np.empty((count + 1, 6), dtype=np.float64)
        a = s1[:, 0] * i00 + s2[:, 0] * i10
        b = s1[:, 0] * i01 + s2[:, 0] * i11
        c = s1[:, 1] * i00 + s2[:, 1] * i10
        d = s1[:, 1] * i01 + s2[:, 1] * i11
        coef[:count, 0], coef[:count, 1] = a, b
        coef[:count, 3], coef[:count, 4] = c, d
        coef[:count, 2] = src[:, 0, 0] - a * dst[:, 0, 0] - b * dst[:, 0, 1]
        coef[:count, 5] = src[:, 0, 1] - c * dst[:, 0, 0] - d * dst[:, 0, 1]
        # a degenerate displaced triangle: its pixels keep their place
        coef[:count][~ok] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
        coef[count] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)

        index = np.full((y1 - y0, x1 - x0), count, dtype=np.uint16)
        fixed = np.round((dst - np.array([x0, y0])) * 16.0).astype(np.int32)
        lo = fixed.min(axis=1)
        hi = fixed.max(axis=1)
        h16, w16 = (y1 - y0) * 16, (x1 - x0) * 16
        visible = (hi[:, 0] >= -16) & (hi[:, 1] >= -16) & (lo[:, 0] < w16) & (lo[:, 1] < h16)
        draw = np.flatnonzero(visible & ok)
        fill = cv2.fillConvexPoly
        for k, corners in zip(draw.tolist(), fixed[draw], strict=True):
            fill(index, corners, k, cv2.LINE_8, 4)
        table = coef.astype(np.float32)[index]   # (h, w, 6)
        map_x = table[..., 0] * rig.grid_x
        map_x += table[..., 1] * rig.grid_y
        map_x += table[..., 2]
        map_y = table[..., 3] * rig.grid_x
        map_y += table[..., 4] * rig.grid_y
        map_y += table[..., 5]
        return np.asarray(cv2.remap(rig.frame, map_x, map_y, interpolation=cv2.INTER_LINEAR,
                                    borderMode=cv2.BORDER_REPLICATE), dtype=np.uint8)

    def _shade_and_blend(self, rig: _Rig, moved: _F64, warped: _Frame, shape: MouthShape,
                         out: _Frame) -> None:
        import cv2

        y0, y1, x0, x1 = rig.region
        origin = np.array([x0, y0], dtype=np.float64)
        loop = moved[rig.inner] - origin
        bx0 = max(math.floor(float(loop[:, 0].min())) - 1, 0)
        by0 = max(math.floor(float(loop[:, 1].min())) - 1, 0)
        bx1 = min(math.ceil(float(loop[:, 0].max())) + 2, x1 - x0)
        by1 = min(math.ceil(float(loop[:, 1].max())) + 2, y1 - y0)
        if bx1 > bx0 and by1 > by0:
            cavity = np.zeros((by1 - by0, bx1 - bx0), dtype=np.uint8)
            fixed = np.round((loop - np.array([bx0, by0])) * 16.0).astype(np.int32)
            cv2.fillPoly(cavity, [fixed.reshape(-1, 1, 2)], 255, lineType=cv2.LINE_AA,
                         shift=4)
            if cavity.any():
                self._paint_mouth(rig, moved, warped, shape, cavity, (by0, by1, bx0, bx1))
        blended = warped.astype(np.uint16)
        blended *= rig.alpha
        blended += rig.keep
        blended //= 255
        out[y0:y1, x0:x1] = blended

    def _paint_mouth(self, rig: _Rig, moved: _F64, warped: _Frame, shape: MouthShape,
                     cavity: NDArray[np.uint8], box: tuple[int, int, int, int]) -> None:
        """Paint the opened mouth into ``warped`` where ``cavity`` (AA coverage) says."""
        by0, by1, bx0, bx1 = box
        y0, _, x0, _ = rig.region
        opts = self.options
        # Face-frame coordinates of the box's pixels.
        ys, xs = np.mgrid[by0 + y0:by1 + y0, bx0 + x0:bx1 + x0].astype(np.float64)
        dx, dy = xs - rig.centre[0], ys - rig.centre[1]
        u = dx * rig.axis[0] + dy * rig.axis[1]
        v = dx * rig.normal[0] + dy * rig.normal[1]

        def contour(vertices: NDArray[np.intp]) -> tuple[_F64, _F64]:
            rel = moved[vertices] - rig.centre
            cu, cv = rel @ rig.axis, rel @ rig.normal
            order = np.argsort(cu)
            return cu[order], cv[order]

        up_u, up_v = contour(rig.upper_inner)
        lo_u, lo_v = contour(rig.lower_inner)
        top = np.interp(u, up_u, up_v)
        bottom = np.interp(u, lo_u, lo_v)
        depth = v - top
        t = np.clip(depth / np.maximum(bottom - top, 1.0), 0.0, 1.0)

        dark = np.array(opts.cavity_top, dtype=np.float64)
        light = np.array(opts.cavity_bottom, dtype=np.float64)
        shade = dark + (light - dark) * (t ** 1.5)[..., None]
        if rig.teeth > 0.0:
            band = 0.09 * rig.height * min(1.0, 0.35 + shape.openness)
            fade_u = np.clip((0.85 - np.abs(u) / rig.half_width) / 0.3, 0.0, 1.0)
            fade_v = np.clip(band - depth, 0.0, 1.0) * np.clip(depth + 1.5, 0.0, 1.0)
            teeth = (rig.teeth * fade_u * fade_v)[..., None]
            # lit at the front, in shadow towards the corners and the biting edge
            light = (1.0 - 0.12 * np.clip(depth / max(band, 1.0), 0.0, 1.0)) * \
                (1.0 - 0.35 * np.clip(np.abs(u) / rig.half_width, 0.0, 1.0))
            tone = np.array(opts.teeth_color, dtype=np.float64) * light[..., None]
            shade = shade * (1.0 - teeth) + tone * teeth

        own = rig.source_mouth[by0:by1, bx0:bx1, None].astype(np.float64)
        source = rig.frame[by0 + y0:by1 + y0, bx0 + x0:bx1 + x0].astype(np.float64)
        inside = source * own + shade * (1.0 - own)
        cover = cavity[..., None].astype(np.float64) * (1.0 / 255.0)
        view = warped[by0:by1, bx0:bx1]
        painted = view.astype(np.float64) * (1.0 - cover) + inside * cover
        view[...] = np.clip(painted + 0.5, 0.0, 255.0).astype(np.uint8)
