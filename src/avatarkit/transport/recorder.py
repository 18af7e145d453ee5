"""``DisclosedRecorder``: an MP4 that carries every AI-disclosure layer avatarkit has.

A recording of a synthetic avatar leaves the SDK's control the moment it is written: it is
uploaded, re-encoded, clipped and forwarded. The EU Code of Practice on marking AI-generated
content (Measures 1.1.1-1.1.3, research notes ``consent-disclosure.md`` section 6a) therefore
asks for several independent signals, so that losing one does not lose the disclosure:

1. the **visible label** burned into every frame (:mod:`avatarkit.disclosure.label`): what a
   viewer sees, surviving any re-encode;
2. the **invisible watermark** (:mod:`avatarkit.disclosure.watermark`) carrying
   ``payload_for(generation_id)`` in every frame: survives metadata stripping and
   re-compression, and leads back to the generation log;
3. the **signed C2PA manifest** (:func:`~avatarkit.disclosure.c2pa.sign_mp4`): machine-readable
   "trainedAlgorithmicMedia", the consent it was made under, and the watermark's soft binding;
4. the **generation log** entry (:class:`~avatarkit.consent.store.GenerationRecord`, kind
   ``"output"``) binding the final file's SHA-256 and the watermark payload to the consent.

The file appears at ``path`` only complete: frames are encoded into a hidden temporary file
in the same directory, signed into a second one, logged, and only then renamed into place.
A recording that fails, is aborted by an exception, or never received a frame leaves nothing
behind and logs nothing, so the log never names a file that does not exist and no half-made
or unsigned file is ever published by accident.

Labelling and watermarking (about 3 ms per 512x512 frame together) and H.264 encoding run on
one dedicated worker thread, never on the event loop: one worker because the PyAV container is
not thread-safe and frames must be encoded in the order they were written; each write awaits
its own work, which is the back-pressure that keeps a fast producer from queueing unbounded
frames.

This module imports PyAV, Pillow and the C2PA native library; ``import avatarkit`` does not
import it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Literal, Self, TypeVar

import av
import av.audio.stream
import av.container
import av.video.stream
import numpy as np
from numpy.typing import NDArray

from ..consent.store import ConsentStore, GenerationRecord
from ..disclosure.c2pa import ConsentAssertion, SignedManifest, sign_mp4
from ..disclosure.certs import SigningCredentials
from ..disclosure.label import MIN_FRAME_SIDE as LABEL_MIN_SIDE
from ..disclosure.label import LabelConfig
from ..disclosure.metadata import DisclosureMetadata
from ..disclosure.stamp import DisclosureStamp
from ..disclosure.watermark import MIN_FRAME_SIDE as WATERMARK_MIN_SIDE
from ..disclosure.watermark import WATERMARK_ALG, payload_for
from ..errors import ConfigError, MediaFormatError, SessionStateError
from ..media import SUPPORTED_SAMPLE_RATES, AudioChunk, VideoFrame

__all__ = ["DisclosedRecorder", "RecordingResult"]

logger = logging.getLogger("avatarkit.transport.recorder")

_T = TypeVar("_T")

#: Samples per AAC-LC frame; the encoder refuses other sizes except for the last frame.
_AAC_FRAME = 1024
#: x264's speed/size trade-offs, fastest first (same quality at a given crf, bigger files)
_X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow",
                 "slower", "veryslow")
_MAX_FPS = 240
#: BT.601 tags (ffmpeg's AVCOL_* values). swscale converts RGB with the BT.601 matrix into
#: limited range; saying so in the stream keeps players from assuming BT.709 for HD sizes
#: (a visible colour shift) and tells the watermark detector's decoder which matrix to undo.
_AVCOL_PRI_BT470BG = 5
_AVCOL_TRC_SMPTE170M = 6
_AVCOL_SPC_BT470BG = 5
_AVCOL_RANGE_MPEG = 1

#: The default look (immutable: LabelConfig is a frozen model, so one instance can be shared).
_DEFAULT_LABEL = LabelConfig()

_State = Literal["open", "closing", "closed", "discarded"]


@dataclass(frozen=True)
class RecordingResult:
    """What :meth:`DisclosedRecorder.aclose` published.

    ``sha256`` is that of the final bytes at ``path`` (after signing): the value logged as
    ``output_sha256``, so the file can be found in the generation log by hash.
    ``watermark_payload`` is the hex payload embedded in every frame (``None`` when the
    watermark was off); ``label`` whether the visible label was burned in; ``manifest`` the
    C2PA manifest written (``None`` when unsigned); ``log_entries`` the generation-log records
    written (``label_disabled`` first when applicable, then ``output``), empty without a store.
    """

    path: Path
    sha256: str
    size: int
    frames: int
    duration_s: float
    manifest: SignedManifest | None
    watermark_payload: str | None
    label: bool
    log_entries: tuple[GenerationRecord, ...] = ()


class DisclosedRecorder:
    """Records RGB frames (and optionally audio) to an H.264/AAC MP4 with every disclosure layer.

    Use as an async context manager, or call :meth:`aclose` (idempotent) yourself::

        async with DisclosedRecorder(path, width=512, height=512, disclosure=meta,
                                     credentials=creds, store=store) as rec:
            async for frame in frames:
                await rec.write_frame(frame)
        print(rec.result)

    ``credentials`` has no default on purpose: an unsigned recording must be a deliberate
    choice (``credentials=None``), and it is logged as a warning. ``label=LabelConfig(
    enabled=False)`` turns the visible label off (for media labelled elsewhere); that is
    recorded in the generation log as ``label_disabled``, and refused when ``disclosure``
    claims ``label_policy="burned-in"``. ``watermark=False`` leaves the frames unmarked; the
    manifest and log then carry no watermark payload.

    ``consent`` is the :class:`~avatarkit.disclosure.c2pa.ConsentAssertion` to embed; it must
    be for ``disclosure.generation_id`` (and ``disclosure.consent_id`` when that is set). With a
    ``store``, the output is logged there before the file is published. ``crf`` is x264's
    constant-rate factor (0-51, lower is better quality; 20 is visually near-lossless and
    leaves the watermark a wide margin); ``preset`` x264's speed preset (``"veryfast"``
    encodes about three times faster than ``"medium"`` for a somewhat larger file).
    ``audio_sample_rate`` adds an AAC track at that rate
    with ``audio_channels`` (1 or 2); chunks at other rates or channel counts are converted.
    An existing file at ``path`` is refused unless ``overwrite=True``.

    Frames are placed at a constant ``fps``: a :class:`~avatarkit.media.VideoFrame` at its
    timestamp (relative to the first frame, so a dropped frame leaves a gap rather than
    shifting the rest against the audio), a bare array at the next frame slot.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        width: int,
        height: int,
        fps: int = 25,
        audio_sample_rate: int | None = None,
        audio_channels: int = 1,
        disclosure: DisclosureMetadata,
        label: LabelConfig = _DEFAULT_LABEL,
        watermark: bool = True,
        credentials: SigningCredentials | None,
        consent: ConsentAssertion | None = None,
        store: ConsentStore | None = None,
        crf: int = 20,
        preset: str = "medium",
        overwrite: bool = False,
    ) -> None:
        self.path = Path(path)
        self._check_path(overwrite)
        self.width = _int_in(width, "width", 2, 16_384)
        self.height = _int_in(height, "height", 2, 16_384)
        min_side = max(LABEL_MIN_SIDE if label.enabled else 2,
                       WATERMARK_MIN_SIDE if watermark else 2)
        for field, side in (("width", self.width), ("height", self.height)):
            if side % 2 or side < min_side:
                raise ConfigError(f"got {side}; H.264 yuv420p needs an even size, and the "
                                  f"label and watermark need at least {min_side} pixels",
                                  field=field)
        self.fps = _int_in(fps, "fps", 1, _MAX_FPS)
        self.crf = _int_in(crf, "crf", 0, 51)
        if preset not in _X264_PRESETS:
            raise ConfigError(f"got {preset!r}; one of {', '.join(_X264_PRESETS)}",
                              field="preset")
        self.preset = preset
        if audio_sample_rate is not None and audio_sample_rate not in SUPPORTED_SAMPLE_RATES:
            raise ConfigError(f"{audio_sample_rate} Hz is not supported (one of "
                              f"{sorted(SUPPORTED_SAMPLE_RATES)})", field="audio_sample_rate")
        if audio_channels not in (1, 2):
            raise ConfigError(f"got {audio_channels}; 1 (mono) or 2 (stereo)",
                              field="audio_channels")
        self.audio_sample_rate = audio_sample_rate
        self.audio_channels = audio_channels
        if not isinstance(disclosure, DisclosureMetadata):
            raise ConfigError(f"got {type(disclosure).__name__}", field="disclosure")
        self.disclosure = disclosure
        if not label.enabled and disclosure.label_policy == "burned-in":
            raise ConfigError("the label is disabled but disclosure.label_policy says "
                              "'burned-in'; set label_policy to 'disabled' or 'viewer-ui' so "
                              "the metadata does not claim a label the frames lack",
                              field="label.enabled")
        self.label = label
        self._check_consent(consent)
        self.consent = consent
        if credentials is not None:
            # Fail now, not after the whole recording: an expired leaf, a key that is not
            # the chain's, unreadable files.
            credentials.read_signer_material()
        else:
            logger.warning("recording %s without C2PA credentials: the MP4 will carry the "
                           "label, watermark and log entry but no signed manifest",
                           self.path)
        self.credentials = credentials
        self.store = store
        self.watermark_payload = payload_for(disclosure.generation_id) if watermark else None

        self._stamp = DisclosureStamp(label=label, payload=self.watermark_payload)
        self._executor = ThreadPoolExecutor(max_workers=1,
                                            thread_name_prefix="avatarkit-recorder")
        self._state: _State = "open"
        self._close_lock = asyncio.Lock()
        self._result: RecordingResult | None = None
        self._failed: BaseException | None = None
        # Loop-side bookkeeping (assigned when a write is submitted, so order is call order).
        self._frames = 0
        self._last_pts = -1
        self._t0: float | None = None
        self._audio_format: tuple[int, int] | None = None
        # Worker-side state: touched only on the worker thread.
        self._tmp = self.path.parent / f".{self.path.name}.{uuid.uuid4().hex}.recording"
        self._signed_tmp = self.path.parent / f".{self.path.name}.{uuid.uuid4().hex}.signed"
        self._container: av.container.OutputContainer | None = None
        self._video: av.video.stream.VideoStream | None = None
        self._audio: av.audio.stream.AudioStream | None = None
        self._resampler: av.AudioResampler | None = None
        self._audio_in_samples = 0
        self._audio_out_samples = 0

    # -- public API ----------------------------------------------------------------------------

    @property
    def result(self) -> RecordingResult | None:
        """The published recording once :meth:`aclose` succeeded; ``None`` before, and when
        nothing was published (no frames, aborted, failed)."""
        return self._result

    @property
    def frames(self) -> int:
        """Frames written so far."""
        return self._frames

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None:
            # Whatever was recorded is incomplete: publish nothing, log nothing.
            await self.abort()
        else:
            await self.aclose()

    async def write_frame(self, frame: VideoFrame | NDArray[np.uint8]) -> None:
        """Label, watermark and encode one RGB frame (``height x width x 3`` uint8).

        Raises:
            MediaFormatError: wrong type, dtype or shape (``field`` names it).
            SessionStateError: the recorder is closed, or an earlier write failed.
            OSError, av.error.FFmpegError: the file or the encoder failed; the recording is
                then discarded when closed.
        """
        self._check_writable()
        if isinstance(frame, VideoFrame):
            data, timestamp, field = frame.data, frame.timestamp, "frame.data"
        else:
            data, timestamp, field = frame, None, "frame"
        expected = f"a {self.height} x {self.width} x 3 uint8 RGB array"
        if not isinstance(data, np.ndarray):
            raise MediaFormatError(f"got {type(data).__name__}", field=field, expected=expected)
        if data.dtype != np.uint8:
            raise MediaFormatError(f"dtype is {data.dtype}", field=field, expected=expected)
        if data.shape != (self.height, self.width, 3):
            raise MediaFormatError(f"shape is {data.shape}", field=field, expected=expected)
        pts = self._next_pts(timestamp)
        # Our own copy: labelled and marked in place on the worker, while the caller may reuse
        # its buffer as soon as this returns (or is cancelled).
        owned = np.array(data, dtype=np.uint8, order="C", copy=True)
        self._frames += 1
        await self._run(lambda: self._encode_frame(owned, pts))

    async def write_audio(self, chunk: AudioChunk) -> None:
        """Encode a chunk of PCM audio to the AAC track, converting rate and channels.

        Chunks are laid end to end from time zero. All chunks of a recording must share one
        rate and channel count (the converter is set up from the first one); more than two
        channels are mixed down to mono first.

        Raises:
            ConfigError(field="audio_sample_rate"): the recorder was made without audio.
            MediaFormatError: not an AudioChunk, or its format changed mid-recording.
            SessionStateError: the recorder is closed, or an earlier write failed.
        """
        self._check_writable()
        if self.audio_sample_rate is None:
            raise ConfigError("this recorder has no audio track; pass audio_sample_rate",
                              field="audio_sample_rate")
        if not isinstance(chunk, AudioChunk):
            raise MediaFormatError(f"got {type(chunk).__name__}", field="chunk",
                                   expected="an AudioChunk")
        if chunk.channels > 2:
            chunk = chunk.to_mono()
        fmt = (chunk.sample_rate, chunk.channels)
        if self._audio_format is None:
            self._audio_format = fmt
        elif fmt != self._audio_format:
            raise MediaFormatError(
                f"changed from {self._audio_format[0]} Hz/{self._audio_format[1]} ch to "
                f"{fmt[0]} Hz/{fmt[1]} ch mid-recording", field="chunk.sample_rate",
                expected="every chunk of a recording in one format")
        if chunk.num_frames == 0:
            return
        samples = np.array(chunk.samples, dtype=np.int16, copy=True)
        await self._run(lambda: self._encode_audio(samples, fmt[0], fmt[1]))

    async def aclose(self) -> RecordingResult | None:
        """Finish the file, sign it, log it, publish it; idempotent.

        Returns the :class:`RecordingResult` (also kept as :attr:`result`), or ``None`` when
        nothing was published: no frame was written, the recorder was aborted, or a write
        failed (a partly encoded file is never published). On an error while finishing,
        signing or logging, the temporary files are removed, nothing is published, and the
        error is raised.
        """
        async with self._close_lock:
            if self._state in ("closed", "discarded"):
                return self._result
            self._state = "closing"
            if self._frames == 0 or self._failed is not None:
                if self._failed is not None:
                    logger.warning("not publishing %s: a write failed (%s)", self.path,
                                   self._failed)
                await self._discard()
                return None
            try:
                manifest, digest, size = await self._run(self._finish_and_sign)
                records = await self._log(digest, manifest)
                await self._run(self._publish)
            except BaseException:
                await self._discard()
                raise
            self._result = RecordingResult(
                path=self.path, sha256=digest, size=size, frames=self._frames,
                duration_s=self._duration(),
                manifest=dataclasses.replace(manifest, path=self.path) if manifest else None,
                watermark_payload=self._payload_hex(), label=self.label.enabled,
                log_entries=records)
            self._state = "closed"
            self._executor.shutdown(wait=False)
            return self._result

    async def abort(self) -> None:
        """Drop the recording: remove the temporary file, publish and log nothing."""
        async with self._close_lock:
            if self._state in ("closed", "discarded"):
                return
            self._state = "closing"
            await self._discard()

    # -- loop side -----------------------------------------------------------------------------

    def _check_path(self, overwrite: bool) -> None:
        if not self.path.parent.is_dir():
            raise ConfigError(f"{self.path.parent} is not a directory", field="path")
        if self.path.is_dir():
            raise ConfigError(f"{self.path} is a directory", field="path")
        if self.path.exists() and not overwrite:
            raise ConfigError(f"{self.path} exists; pass overwrite=True to replace it",
                              field="path")

    def _check_consent(self, consent: ConsentAssertion | None) -> None:
        if consent is None:
            return
        if consent.generation_id != self.disclosure.generation_id:
            raise ConfigError(f"{consent.generation_id!r} is not this recording's generation "
                              f"{self.disclosure.generation_id!r}",
                              field="consent.generation_id")
        if self.disclosure.consent_id is not None and \
                consent.consent_id != self.disclosure.consent_id:
            raise ConfigError(f"{consent.consent_id!r} is not the disclosure's consent "
                              f"{self.disclosure.consent_id!r}", field="consent.consent_id")

    def _check_writable(self) -> None:
        if self._state != "open":
            raise SessionStateError(f"the recorder of {self.path} is {self._state}")
        if self._failed is not None:
            raise SessionStateError(f"an earlier write to {self.path} failed "
                                    f"({self._failed}); the recording will be discarded")

    def _next_pts(self, timestamp: float | None) -> int:
        if timestamp is None:
            pts = self._last_pts + 1
        else:
            if self._t0 is None:
                self._t0 = timestamp - (self._last_pts + 1) / self.fps
            pts = max(self._last_pts + 1, round((timestamp - self._t0) * self.fps))
        self._last_pts = pts
        return pts

    def _duration(self) -> float:
        video = (self._last_pts + 1) / self.fps
        audio = self._audio_out_samples / self.audio_sample_rate \
            if self.audio_sample_rate else 0.0
        return round(max(video, audio), 3)

    def _payload_hex(self) -> str | None:
        return self.watermark_payload.hex() if self.watermark_payload is not None else None

    async def _run(self, fn: Callable[[], _T]) -> _T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn)
        except BaseException as exc:
            if self._failed is None and not isinstance(exc, asyncio.CancelledError):
                self._failed = exc
            raise

    async def _discard(self) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._remove_all)
        finally:
            self._state = "discarded"
            self._executor.shutdown(wait=False)

    async def _log(self, digest: str,
                   manifest: SignedManifest | None) -> tuple[GenerationRecord, ...]:
        if self.store is None:
            return ()
        d, c = self.disclosure, self.consent
        common = {
            "generation_id": d.generation_id,
            "consent_id": d.consent_id or (c.consent_id if c else None),
            "token_sha256": d.consent_token_sha256 or (c.token_sha256 if c else None),
            "purpose": c.purpose if c else None,
            "channel": c.channel if c else None,
            "provider": d.provider,
            "avatar": d.avatar,
        }
        logged: list[GenerationRecord] = []
        if not self.label.enabled:
            logged.append(await self.store.log_generation(GenerationRecord(
                kind="label_disabled", label=False,
                details={"label_policy": d.label_policy, "file": self.path.name},
                **common)))
        logged.append(await self.store.log_generation(GenerationRecord(
            kind="output", output_sha256=[digest], watermark_payload=self._payload_hex(),
            label=self.label.enabled,
            details={
                "frames": self._frames,
                "duration_s": self._duration(),
                "width": self.width,
                "height": self.height,
                "fps": self.fps,
                "audio": self.audio_sample_rate is not None,
                "c2pa_manifest": manifest.manifest_label if manifest else "unsigned",
                "file": self.path.name,
            },
            **common)))
        return tuple(logged)

    # -- worker side (one thread, in submission order) -----------------------------------------

    def _open(self) -> av.container.OutputContainer:
        if self._container is not None:
            return self._container
        # faststart: the index goes first, so players can start before the whole file arrives.
        container = av.open(str(self._tmp), mode="w", format="mp4",
                            options={"movflags": "+faststart"})
        try:
            video = container.add_stream("libx264", rate=self.fps,
                                         options={"crf": str(self.crf), "preset": self.preset})
            video.width, video.height, video.pix_fmt = self.width, self.height, "yuv420p"
            ctx = video.codec_context
            ctx.color_primaries, ctx.color_trc = _AVCOL_PRI_BT470BG, _AVCOL_TRC_SMPTE170M
            ctx.colorspace, ctx.color_range = _AVCOL_SPC_BT470BG, _AVCOL_RANGE_MPEG
            if self.audio_sample_rate is not None:
                audio = container.add_stream("aac", rate=self.audio_sample_rate)
                audio.layout = "mono" if self.audio_channels == 1 else "stereo"
                self._audio = audio
            # Open the file and the encoders now, so an unwritable path or a codec problem
            # fails the first write instead of surfacing dozens of frames later (x264 buffers
            # its lookahead before the first packet reaches the file).
            container.start_encoding()
        except BaseException:
            container.close()
            raise
        self._container, self._video = container, video
        return container

    def _encode_frame(self, data: NDArray[np.uint8], pts: int) -> None:
        container = self._open()
        assert self._video is not None
        self._stamp(data)  # label, then watermark (which then covers the label too)
        frame = av.VideoFrame.from_ndarray(data, format="rgb24")
        frame.pts = pts
        container.mux(self._video.encode(frame))

    def _encode_audio(self, samples: NDArray[np.int16], rate: int, channels: int) -> None:
        self._open()
        if self._resampler is None:
            self._resampler = av.AudioResampler(
                format="fltp", layout="mono" if self.audio_channels == 1 else "stereo",
                rate=self.audio_sample_rate, frame_size=_AAC_FRAME)
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16",
                                           layout="mono" if channels == 1 else "stereo")
        frame.sample_rate = rate
        frame.time_base = Fraction(1, rate)
        frame.pts = self._audio_in_samples
        self._audio_in_samples += samples.size // channels
        self._encode_resampled(self._resampler.resample(frame))

    def _encode_resampled(self, frames: list[av.AudioFrame]) -> None:
        assert self._container is not None and self._audio is not None
        for frame in frames:
            # Our own clock: contiguous samples from zero, whatever the converter's rounding.
            frame.pts = self._audio_out_samples
            self._audio_out_samples += frame.samples
            self._container.mux(self._audio.encode(frame))

    def _finish_and_sign(self) -> tuple[SignedManifest | None, str, int]:
        container = self._container
        assert container is not None and self._video is not None
        if self._resampler is not None:
            self._encode_resampled(self._resampler.resample(None))
        if self._audio is not None:
            container.mux(self._audio.encode(None))
        container.mux(self._video.encode(None))
        container.close()
        self._container = None
        if self.credentials is None:
            digest, size = _sha256(self._tmp)
            return None, digest, size
        manifest = sign_mp4(
            self._tmp, self._signed_tmp, credentials=self.credentials,
            generation_id=self.disclosure.generation_id, provider=self.disclosure.provider,
            avatar=self.disclosure.avatar,
            watermark_alg=WATERMARK_ALG if self.watermark_payload is not None else None,
            watermark_payload=self.watermark_payload, consent=self.consent,
            title=self.path.name)
        self._tmp.unlink()
        return manifest, manifest.sha256, manifest.size

    def _publish(self) -> None:
        staged = self._signed_tmp if self.credentials is not None else self._tmp
        with staged.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(staged, self.path)
        _fsync_dir(self.path.parent)

    def _remove_all(self) -> None:
        if self._container is not None:
            try:
                self._container.close()
            except Exception as exc:  # closing a broken container must not mask the cause
                logger.debug("closing the discarded container failed: %s", exc)
            self._container = None
        self._tmp.unlink(missing_ok=True)
        self._signed_tmp.unlink(missing_ok=True)


def _int_in(value: object, field: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"got {value!r}; an integer from {low} to {high}", field=field)
    return value


def _sha256(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
