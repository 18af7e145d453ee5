"""Offline renders (the lip-sync "dubbing" job): an avatar and a speech file in, a disclosed
MP4 out.

:func:`render_video` verifies the consent token for the avatar first (nothing is rendered
without it), prepares the avatar (cached), drives the engine as fast as it draws through an
:class:`~avatarkit.local_engine.runner.AvatarRunner` (``realtime=False``: every frame with
exactly its audio), and writes the result with
:class:`~avatarkit.transport.recorder.DisclosedRecorder`: the burned-in label, the watermark
of the generation, the C2PA manifest naming the consent, and the generation-log entry. The
file appears only complete; a failure leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .catalog import Avatar
from .consent.enforce import ConsentGate
from .consent.store import ConsentStore
from .consent.tokens import VerifiedConsent
from .disclosure.c2pa import ConsentAssertion
from .disclosure.certs import SigningCredentials
from .disclosure.label_config import LabelConfig
from .disclosure.metadata import DisclosureMetadata
from .errors import ConfigError, MediaFormatError
from .local_engine.avatar import PreparedAvatar, prepare_avatar
from .local_engine.engines import EngineChoice, build_engine, choose_engine
from .local_engine.runner import AvatarRunner, RunnerFrame
from .media import AudioChunk

__all__ = [
    "FaceChoice",
    "ProgressCallback",
    "RenderResult",
    "read_speech",
    "render_video",
]

#: the region label an offline render on this machine carries (consent scopes may name it)
_SELF_HOSTED = "self-hosted"
ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class RenderResult:
    """What :func:`render_video` wrote and how fast.

    ``first_frame_s`` is the time from the first audio handed to the engine to its first
    frame; ``render_fps`` the frames drawn and encoded per second of wall time. ``faces``
    says which face was animated (several may be in the media).
    """

    path: Path
    sha256: str
    frames: int
    duration_s: float
    fps: float
    width: int
    height: int
    engine: EngineChoice
    generation_id: str
    consent_id: str
    watermark_payload: str | None
    signed: bool
    elapsed_s: float
    first_frame_s: float
    faces: FaceChoice

    @property
    def render_fps(self) -> float:
        return self.frames / self.elapsed_s if self.elapsed_s > 0 else math.inf


@dataclass(frozen=True, slots=True)
class FaceChoice:
    """The face a render animates: ``found`` is the most faces seen in one frame (the
    largest is animated), ``frames_with_several`` how many frames showed more than one, and
    ``box`` the animated face in the first frame, ``(x0, y0, x1, y1)`` in media pixels."""

    found: int
    frames_with_several: int
    frames: int
    box: tuple[int, int, int, int]
    media_size: tuple[int, int]

    @classmethod
    def of(cls, avatar: PreparedAvatar) -> FaceChoice:
        x0, y0, x1, y1 = (round(float(v)) for v in avatar.boxes[0])
        height, width = avatar.frames.shape[1:3]
        return cls(found=avatar.faces_found,
                   frames_with_several=len(avatar.multiple_faces_frames),
                   frames=len(avatar), box=(x0, y0, x1, y1), media_size=(width, height))

    @property
    def size(self) -> int:
        """The animated face's longer side (px)."""
        return max(self.box[2] - self.box[0], self.box[3] - self.box[1])

    def describe(self) -> str:
        """One line: how many faces, and which one is animated."""
        where = f"{self.size} px at ({self.box[0]}, {self.box[1]}) in the " \
                f"{self.media_size[0]}x{self.media_size[1]} media"
        if self.found <= 1:
            return f"1 face, {where}"
        frames = "" if self.frames == 1 else \
            f" (in {self.frames_with_several} of {self.frames} frames)"
        return f"{self.found} faces found{frames}; the largest is animated: {where}"


def read_speech(path: str | os.PathLike[str], *,
                sample_rate: int = 16_000) -> list[AudioChunk]:
    """Decode any audio file PyAV reads (WAV, FLAC, MP3...) to mono PCM16 at ``sample_rate``,
    as one-second chunks.

    Raises ``MediaFormatError(field="audio")`` for a missing, unreadable or empty file.
    """
    import av

    source = Path(path)
    if not source.is_file():
        raise MediaFormatError(f"{source} does not exist", field="audio",
                               expected="a speech file (WAV, FLAC, MP3...)")
    pieces: list[NDArray[np.int16]] = []
    try:
        with av.open(str(source)) as container:
            if not container.streams.audio:
                raise MediaFormatError(f"{source} has no audio track", field="audio",
                                       expected="a file with an audio track")
            resampler = av.AudioResampler(format="s16", layout="mono", rate=sample_rate)
            for frame in container.decode(audio=0):
                for out in resampler.resample(frame):
                    pieces.append(out.to_ndarray().reshape(-1).astype(np.int16))
            for out in resampler.resample(None):
                pieces.append(out.to_ndarray().reshape(-1).astype(np.int16))
    except av.error.FFmpegError as exc:
        raise MediaFormatError(f"{source} cannot be decoded ({type(exc).__name__})",
                               field="audio", expected="a speech file (WAV, FLAC, MP3...)"
                               ) from None
    samples = np.concatenate(pieces) if pieces else np.zeros(0, np.int16)
    if samples.size == 0:
        raise MediaFormatError(f"{source} holds no audio", field="audio",
                               expected="at least one sample")
    return [AudioChunk(samples[i:i + sample_rate], sample_rate)
            for i in range(0, samples.size, sample_rate)]


def _consent_assertion(verified: VerifiedConsent, *, purpose: str,
                      generation_id: str) -> ConsentAssertion:
    """The C2PA consent assertion for a recorded generation under ``verified``."""
    status = verified.status_ref
    return ConsentAssertion(
        consent_id=verified.consent_id, issuer=verified.issuer,
        token_sha256=verified.token_sha256, record_hash=verified.record_hash,
        status_uri=status.uri if status is not None else None,
        status_idx=status.idx if status is not None else None,
        purpose=purpose, channel="recorded", generation_id=generation_id)


async def render_video(
    *,
    avatar: str | os.PathLike[str],
    audio: str | os.PathLike[str] | Sequence[AudioChunk],
    out: str | os.PathLike[str],
    consent: str,
    gate: ConsentGate,
    purpose: str,
    avatar_name: str | None = None,
    consent_subject: str | None = None,
    engine: str = "auto",
    weights: str | os.PathLike[str] | None = None,
    musetalk: Mapping[str, Any] | None = None,
    credentials: SigningCredentials | None,
    store: ConsentStore | None = None,
    label: LabelConfig | None = None,
    fps: float | None = None,
    max_side: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    preset: str = "veryfast",
    progress: bool = True,
    on_progress: ProgressCallback | None = None,
    generation_id: str | None = None,
) -> RenderResult:
    """Render ``avatar`` (an image or a video) speaking ``audio`` into the MP4 ``out``.

    ``consent`` is verified by ``gate`` for ``avatar_name`` (default: the media file's stem)
    and ``purpose`` on the ``recorded`` channel, with provider ``local`` in region
    ``self-hosted``; a refusal raises the :class:`~avatarkit.errors.ConsentViolation`
    subclass before anything is rendered. ``credentials`` signs the C2PA manifest (``None``
    writes an unsigned file, with a warning). ``store`` receives the generation-log entry
    (default: the gate's consent store). ``engine``, ``weights`` and ``musetalk`` (the
    MuseTalk engine's options) choose the engine as :func:`.engines.build_engine` does.
    The video keeps the avatar media's resolution; ``max_side`` scales it down so that its
    longer side is at most that many pixels (the lite engine; MuseTalk renders at the
    media's size). Faces are found at the media's resolution either way.

    Raises:
        ConsentViolation: the token is invalid, revoked, or does not cover this render.
        ConfigError: an unknown or unavailable engine, an existing ``out`` without
            ``overwrite``, ``max_side`` with MuseTalk.
        WeightsError: an unusable MuseTalk weights folder.
        MediaReadError, NoFaceError, FaceTooSmallError: unusable avatar media.
        MediaFormatError: unusable audio.
    """
    media = Path(avatar)
    name = avatar_name or media.stem
    generation = generation_id or f"gen_{uuid.uuid4().hex}"
    speech = read_speech(audio) if isinstance(audio, str | os.PathLike) else list(audio)
    seconds = sum(chunk.num_frames / chunk.sample_rate for chunk in speech)
    if seconds <= 0:
        raise MediaFormatError("the speech is empty", field="audio", expected="some audio")
    verified = await gate.admit(
        consent, avatar=Avatar(name=name, consent_subject=consent_subject, local=str(media)),
        purpose=purpose, generation_id=generation, channel="recorded")
    verified.check_route("local", _SELF_HOSTED)

    choice = choose_engine(engine, weights=weights)
    if max_side is not None and choice.name != "lite":
        raise ConfigError("MuseTalk renders at the avatar media's resolution; scale the "
                          "media itself, or use the lite engine", field="max_side")
    prepared = await asyncio.to_thread(prepare_avatar, media, cache_dir=cache_dir,
                                       progress=progress)
    lite = {"max_side": max_side} if choice.name == "lite" else None
    lip_sync = await asyncio.to_thread(build_engine, choice.name, prepared, fps=fps,
                                       weights=weights, musetalk=musetalk, lite=lite,
                                       cache_dir=cache_dir)
    if not float(lip_sync.fps).is_integer():  # an MP4 at 29.97: round to whole frames
        lip_sync = await asyncio.to_thread(build_engine, choice.name, prepared,
                                           fps=round(lip_sync.fps), cache_dir=cache_dir,
                                           weights=weights, musetalk=musetalk, lite=lite)
    label = label if label is not None else LabelConfig()
    disclosure = DisclosureMetadata(
        generation_id=generation, provider="local", model=f"avatarkit-{choice.name}",
        avatar=name, consent_id=verified.consent_id,
        consent_token_sha256=verified.token_sha256,
        label_policy="burned-in" if label.enabled else "disabled")

    from .transport.recorder import DisclosedRecorder

    width, height = lip_sync.width - lip_sync.width % 2, lip_sync.height - lip_sync.height % 2
    total = max(1, math.ceil(seconds * lip_sync.fps))
    runner = AvatarRunner(lip_sync, realtime=False, max_buffered_s=seconds + 5,
                          batch_size=lip_sync.preferred_batch_size)
    recorder = DisclosedRecorder(
        out, width=width, height=height, fps=round(lip_sync.fps),
        audio_sample_rate=lip_sync.sample_rate, disclosure=disclosure, label=label,
        credentials=credentials,
        consent=_consent_assertion(verified, purpose=purpose, generation_id=generation),
        store=store if store is not None else gate.store, preset=preset, overwrite=overwrite)
    bar = _Progress(total, enabled=progress, callback=on_progress)
    started = time.perf_counter()
    first_frame: float | None = None
    frames = 0
    # The engine (runner thread) and the encoder (recorder thread) overlap: frames wait in
    # a short queue between them.
    queue: asyncio.Queue[RunnerFrame | None] = asyncio.Queue(maxsize=8)

    async def draw() -> None:
        nonlocal first_frame
        try:
            async for output in runner.frames():
                if isinstance(output, RunnerFrame):
                    if first_frame is None:
                        first_frame = time.perf_counter() - started
                    await queue.put(output)
        finally:
            await queue.put(None)

    try:
        async with runner:
            for chunk in speech:
                await runner.push_audio(chunk)
            runner.finish()
            drawing = asyncio.create_task(draw(), name="avatarkit-render-draw")
            try:
                while (frame := await queue.get()) is not None:
                    await recorder.write_frame(frame.video.data[:height, :width])
                    await recorder.write_audio(frame.audio)
                    frames += 1
                    bar.advance(frames)
                await drawing  # re-raises an engine failure
            finally:
                drawing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await drawing
        result = await recorder.aclose()
    except BaseException:
        await recorder.abort()
        raise
    finally:
        bar.close()
    elapsed = time.perf_counter() - started
    assert result is not None  # at least one frame was written
    return RenderResult(
        path=result.path, sha256=result.sha256, frames=result.frames,
        duration_s=result.duration_s, fps=float(round(lip_sync.fps)), width=width,
        height=height, engine=choice, generation_id=generation,
        consent_id=verified.consent_id, watermark_payload=result.watermark_payload,
        signed=result.manifest is not None, elapsed_s=elapsed,
        first_frame_s=first_frame if first_frame is not None else elapsed,
        faces=FaceChoice.of(prepared))


class _Progress:
    """A rich progress bar on a terminal (or always, with ``enabled="always"``), plus the
    callback."""

    def __init__(self, total: int, *, enabled: bool, callback: ProgressCallback | None) -> None:
        import sys

        self.total = total
        self._callback = callback
        self._bar = None
        if enabled and sys.stderr.isatty():
            from rich.progress import Progress

            self._bar = Progress(transient=True)
            self._task = self._bar.add_task("rendering", total=total)
            self._bar.start()

    def advance(self, done: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=done)
        if self._callback is not None:
            self._callback(done, self.total)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
