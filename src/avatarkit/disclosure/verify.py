"""``avatarkit verify``: which AI-disclosure signals does a media file carry?

The EU Code of Practice (Commitment 2) asks providers who mark content to also offer a way to
*detect* the marks. avatarkit marks its output three ways, each surviving different
treatment, so the detector reads all three and says which one answered:

* ``"c2pa"``: a C2PA manifest whose creation action says the media is AI-generated, intact
  (``valid``, or ``trusted`` when its signer chains to a trust anchor the caller pinned).
  Lost to any re-encode or metadata stripping; an *invalid* manifest (tampered bytes) is
  reported with its failure codes but not counted, since its claims can no longer be
  attributed to the signer.
* ``"watermark"``: the invisible frame watermark decoded with its bounded false-positive rate
  (:class:`~avatarkit.disclosure.watermark.WatermarkDetector`, at most 5e-13 per call).
  Survives re-encoding and metadata stripping; lost to crops and rescales.
* ``"generation-log"``: the consent store's generation log knows the file, by the exact
  SHA-256 of its bytes, else by the decoded watermark payload. Needs the store, i.e. it is the
  producer's own check (answering a takedown or deletion request).

The report also cross-checks the signals: the manifest's soft binding, the decoded watermark
and the log must name the same payload and generation (``consistent``). A mismatch means the
parts of the file did not come from one recording (e.g. a manifest spliced onto other frames).

Finding no signal is not proof of authenticity: metadata is easily stripped and geometric edits
defeat the watermark; :meth:`VerificationReport.text` says so.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import av
import av.container
import av.error
import av.video.stream
import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..consent.store import ConsentStore, GenerationRecord
from ..errors import MediaFormatError
from .c2pa import ManifestReport, ManifestState, read_manifest
from .watermark import (
    MIN_FRAME_SIDE,
    SYNC_THRESHOLD,
    WATERMARK_ALG,
    WatermarkDetector,
)

__all__ = [
    "AI_SOURCE_TYPES",
    "LogMatch",
    "ManifestSummary",
    "Signal",
    "VerificationReport",
    "WatermarkSummary",
    "verify_media",
]

Signal = Literal["c2pa", "watermark", "generation-log"]
LogMatch = Literal["output-hash", "watermark"]

#: IPTC digital source types (last path segment) that declare AI generation.
AI_SOURCE_TYPES = frozenset({
    "trainedAlgorithmicMedia",
    "compositeWithTrainedAlgorithmicMedia",
    "algorithmicMedia",
})

_Sha256 = Field(pattern=r"^[0-9a-f]{64}$")


class ManifestSummary(BaseModel):
    """The C2PA manifest, as far as a detector needs it.

    ``state``: ``absent``, ``invalid`` (present but failing; ``validation_codes`` say why),
    ``valid`` (intact, signer not among the trust anchors) or ``trusted``. The other fields
    are what the active manifest claims; for an invalid manifest they are shown as evidence,
    not as fact. ``soft_binding_payload`` is hex. ``error`` explains an unreadable file or
    manifest.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    state: ManifestState
    validation_codes: list[str] = Field(default_factory=list)
    manifest_label: str | None = None
    digital_source_type: str | None = None
    software_agent: str | None = None
    generation_id: str | None = None
    provider: str | None = None
    avatar: str | None = None
    consent_id: str | None = None
    soft_binding_alg: str | None = None
    soft_binding_payload: str | None = None
    error: str | None = None

    @property
    def says_ai_generated(self) -> bool:
        """Intact, and its creation action declares an AI digital source type."""
        source = (self.digital_source_type or "").rstrip("/").rsplit("/", 1)[-1]
        return self.state in ("valid", "trusted") and source in AI_SOURCE_TYPES

    @classmethod
    def of(cls, report: ManifestReport) -> ManifestSummary:
        binding = report.soft_binding
        return cls(
            state=report.state, validation_codes=list(report.validation_codes),
            manifest_label=report.manifest_label,
            digital_source_type=report.digital_source_type,
            software_agent=report.software_agent, generation_id=report.generation_id,
            provider=report.provider, avatar=report.avatar,
            consent_id=report.consent.consent_id if report.consent else None,
            soft_binding_alg=binding.alg if binding else None,
            soft_binding_payload=binding.payload.hex() if binding else None,
            error=report.error)


class WatermarkSummary(BaseModel):
    """The frame watermark: ``found`` with its hex ``payload``, the number of frames voted
    over, and the sync score (about standard normal without a mark; >= 4 needed).
    ``error`` says why nothing could be read (no video stream, frames too small...)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    found: bool
    payload: str | None = None
    frames_used: int = Field(default=0, ge=0)
    sync_score: float = 0.0
    corrected_errors: int | None = None
    error: str | None = None


class VerificationReport(BaseModel):
    """What :func:`verify_media` found. JSON via ``model_dump_json()``, prose via :meth:`text`.

    ``signals`` lists, in a fixed order, the signals that say the media is AI-generated;
    ``ai_generated`` is true when any did. ``log_checked`` is whether a store was consulted,
    ``log_match`` how its entries were found. ``consistent`` is false when two signals name
    different payloads or generations (``inconsistencies`` says which); a signal that is
    absent never makes the report inconsistent.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: Path
    sha256: str = _Sha256
    size: int = Field(ge=0)
    manifest: ManifestSummary
    watermark: WatermarkSummary
    log_checked: bool
    log_match: LogMatch | None = None
    log_entries: list[GenerationRecord] = Field(default_factory=list)
    signals: list[Signal]
    ai_generated: bool
    consistent: bool
    inconsistencies: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _verdict_follows_evidence(self) -> VerificationReport:
        if self.ai_generated != bool(self.signals):
            raise ValueError("ai_generated must be true exactly when a signal was found")
        if self.consistent == bool(self.inconsistencies):
            raise ValueError("consistent must be true exactly when nothing disagrees")
        return self

    def text(self) -> str:
        """A human-readable report naming each signal and what it found."""
        lines = [f"{self.path}", f"  sha256 {self.sha256} ({self.size} bytes)"]
        if self.ai_generated:
            lines.append(f"  verdict: AI-GENERATED (signals: {', '.join(self.signals)})")
        else:
            lines.append("  verdict: no AI-generation signal found")
        lines.append(f"  [c2pa]           {self._manifest_text()}")
        lines.append(f"  [watermark]      {self._watermark_text()}")
        lines.append(f"  [generation-log] {self._log_text()}")
        if self.consistent:
            lines.append("  consistency: the signals present agree")
        else:
            lines.append("  consistency: SIGNALS DISAGREE")
            lines.extend(f"    - {problem}" for problem in self.inconsistencies)
        if not self.ai_generated:
            lines.append("  note: no signal is not proof of authenticity; metadata can be "
                         "stripped and cropping or rescaling defeats the watermark.")
        return "\n".join(lines)

    def _manifest_text(self) -> str:
        m = self.manifest
        if m.state == "absent":
            return "no Content Credentials" + (f" ({m.error})" if m.error else "")
        claims = []
        if m.digital_source_type:
            claims.append(f"source type {m.digital_source_type.rsplit('/', 1)[-1]}")
        if m.generation_id:
            claims.append(f"generation {m.generation_id}")
        if m.provider or m.avatar:
            claims.append(f"provider {m.provider}, avatar {m.avatar}")
        if m.consent_id:
            claims.append(f"consent {m.consent_id}")
        if m.soft_binding_alg:
            claims.append(f"soft binding {m.soft_binding_alg} {m.soft_binding_payload}")
        said = "; ".join(claims) or "no avatarkit claims"
        if m.state == "invalid":
            codes = ", ".join(m.validation_codes) or m.error or "unknown failure"
            return (f"INVALID manifest ({codes}): the file was altered after signing or the "
                    f"signature is broken; its claims cannot be relied on ({said})")
        trust = "trusted signer" if m.state == "trusted" else \
            "valid, but the signer is not among the given trust anchors"
        verdict = "says AI-generated" if m.says_ai_generated else \
            "does not declare AI generation"
        return f"{trust}; {verdict}: {said} [{m.manifest_label}]"

    def _watermark_text(self) -> str:
        w = self.watermark
        if w.error:
            return f"not read: {w.error}"
        if w.found:
            return (f"found: payload {w.payload} ({WATERMARK_ALG}), voted over {w.frames_used}"
                    f" frames, sync score {w.sync_score:.1f} (>= {SYNC_THRESHOLD:g} needed), "
                    f"{w.corrected_errors} bit(s) corrected")
        return (f"not found in {w.frames_used} frames (sync score {w.sync_score:.1f}, "
                f">= {SYNC_THRESHOLD:g} needed)")

    def _log_text(self) -> str:
        if not self.log_checked:
            return "not checked (no consent store given)"
        if not self.log_entries:
            return "no entry for this file's hash or watermark"
        how = "its exact SHA-256" if self.log_match == "output-hash" else \
            "its watermark payload (the file was re-encoded or altered)"
        parts = [f"{len(self.log_entries)} entr{'y' if len(self.log_entries) == 1 else 'ies'}"
                 f" found by {how}:"]
        for e in self.log_entries:
            parts.append(f"{e.kind} of generation {e.generation_id} (seq {e.seq}, "
                         f"{e.at:%Y-%m-%d %H:%M:%S %Z}, consent {e.consent_id}, "
                         f"label {'on' if e.label else 'off' if e.label is False else '?'})")
        return " ".join(parts)


async def verify_media(
    path: str | Path,
    *,
    trust_anchors_pem: str | None = None,
    store: ConsentStore | None = None,
    max_frames: int = 250,
) -> VerificationReport:
    """Read the C2PA manifest, the frame watermark and (with a ``store``) the generation log
    of a media file, and report which of them say it is AI-generated.

    ``trust_anchors_pem``: PEM root(s) whose signers are trusted (e.g. ``root.pem`` from
    ``avatarkit disclosure keygen``). ``max_frames``: how many frames to vote the watermark
    over, spread evenly across longer videos (every frame must still be decoded, but only
    these are converted and read). File reading and decoding run in a worker thread.

    Raises:
        MediaFormatError(field="path"): the file does not exist, or neither C2PA nor the
            video decoder can read it.
        ConfigError(field="trust_anchors_pem"): the anchors are not PEM certificates.
    """
    path = Path(path)
    if not path.is_file():
        raise MediaFormatError(f"{path} does not exist", field="path",
                               expected="an existing media file")
    if max_frames < 1:
        raise MediaFormatError(f"got {max_frames}", field="max_frames", expected=">= 1")
    digest, size = await asyncio.to_thread(_sha256, path)
    manifest, manifest_unreadable = await asyncio.to_thread(_manifest, path, trust_anchors_pem)
    watermark, undecodable = await asyncio.to_thread(_watermark, path, max_frames)
    if manifest_unreadable and undecodable:
        raise MediaFormatError(f"{path} is not a media file C2PA or the video decoder can "
                               f"read ({manifest.error}; {watermark.error})", field="path",
                               expected="a video file such as an MP4")

    entries: list[GenerationRecord] = []
    match: LogMatch | None = None
    if store is not None:
        entries = await store.find_by_output_hash(digest)
        if entries:
            match = "output-hash"
        elif watermark.payload is not None:
            entries = await store.find_by_watermark(watermark.payload)
            match = "watermark" if entries else None

    signals: list[Signal] = []
    if manifest.says_ai_generated:
        signals.append("c2pa")
    if watermark.found:
        signals.append("watermark")
    if entries:
        signals.append("generation-log")
    problems = _inconsistencies(manifest, watermark, entries)
    return VerificationReport(
        path=path, sha256=digest, size=size, manifest=manifest, watermark=watermark,
        log_checked=store is not None, log_match=match, log_entries=entries, signals=signals,
        ai_generated=bool(signals), consistent=not problems, inconsistencies=problems)


def _inconsistencies(manifest: ManifestSummary, watermark: WatermarkSummary,
                     entries: list[GenerationRecord]) -> list[str]:
    """Pairwise disagreements between the payloads and generation ids the signals name."""
    payloads: list[tuple[str, str]] = []
    if manifest.soft_binding_payload is not None and manifest.soft_binding_alg == WATERMARK_ALG:
        payloads.append(("the manifest's soft binding", manifest.soft_binding_payload))
    if watermark.payload is not None:
        payloads.append(("the frame watermark", watermark.payload))
    for entry in entries:
        if entry.watermark_payload is not None:
            payloads.append((f"log entry {entry.seq}", entry.watermark_payload))
    generations: list[tuple[str, str]] = []
    if manifest.generation_id is not None:
        generations.append(("the manifest", manifest.generation_id))
    generations.extend((f"log entry {e.seq}", e.generation_id) for e in entries)

    problems = []
    for what, named in (("watermark payload", payloads), ("generation", generations)):
        if len({value for _, value in named}) > 1:
            problems.append(f"{what} differs: " + ", ".join(
                f"{source} says {value}" for source, value in named))
    return problems


# -- worker-thread helpers ---------------------------------------------------------------------


def _sha256(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _manifest(path: Path, anchors: str | None) -> tuple[ManifestSummary, bool]:
    """The manifest summary, and whether C2PA could not read the file format at all."""
    try:
        return ManifestSummary.of(read_manifest(path, trust_anchors_pem=anchors)), False
    except MediaFormatError as exc:
        return ManifestSummary(state="absent", error=f"C2PA cannot read this format: {exc}"), \
            True


def _watermark(path: Path, max_frames: int) -> tuple[WatermarkSummary, bool]:
    """The watermark verdict over up to ``max_frames`` evenly spread frames, and whether the
    file could not be opened as video at all."""
    try:
        container = av.open(str(path), mode="r")
    except (av.error.FFmpegError, ValueError) as exc:
        return WatermarkSummary(found=False, error=f"not decodable as video: {exc}"), True
    with container:
        if not container.streams.video:
            return WatermarkSummary(found=False, error="the file has no video stream"), False
        stream = container.streams.video[0]
        if min(stream.width, stream.height) < MIN_FRAME_SIDE:
            return WatermarkSummary(found=False, error=(
                f"frames are {stream.width}x{stream.height}, smaller than the watermark's "
                f"{MIN_FRAME_SIDE}x{MIN_FRAME_SIDE} minimum")), False
        stream.thread_type = "AUTO"
        total = _frame_count(stream)
        wanted: set[int] | None = None
        if total is not None and total > max_frames:
            wanted = {int(i) for i in np.linspace(0, total - 1, max_frames).round()}
        frames = _decoded(container, stream, wanted, max_frames)
        try:
            result = WatermarkDetector().detect(frames)
        except MediaFormatError as exc:  # e.g. the frame size changes mid-stream
            return WatermarkSummary(found=False, error=str(exc)), False
    return WatermarkSummary(
        found=result.payload is not None,
        payload=result.payload.hex() if result.payload is not None else None,
        frames_used=result.frames_used, sync_score=round(result.sync_score, 3),
        corrected_errors=result.corrected_errors), False


def _frame_count(stream: av.video.stream.VideoStream) -> int | None:
    if stream.frames:
        return int(stream.frames)
    if stream.duration and stream.time_base and stream.average_rate:
        return max(1, round(float(stream.duration * stream.time_base * stream.average_rate)))
    return None


def _decoded(container: av.container.InputContainer, stream: av.video.stream.VideoStream,
             wanted: set[int] | None, max_frames: int) -> Iterator[NDArray[np.uint8]]:
    """RGB frames in presentation order: those whose index is in ``wanted``, or the first
    ``max_frames``. A packet the decoder rejects (damaged bytes) is skipped, not fatal: the
    watermark votes over whatever frames survive."""
    last = max(wanted) if wanted is not None else max_frames - 1
    index = 0
    packets = container.demux(stream)
    while True:
        try:
            packet = next(packets)
        except StopIteration:
            return
        except av.error.FFmpegError:
            return  # the container itself is damaged past this point
        try:
            decoded = packet.decode()
        except av.error.FFmpegError:
            continue
        for frame in decoded:
            if wanted is None or index in wanted:
                yield np.asarray(frame.to_ndarray(format="rgb24"), dtype=np.uint8)
            index += 1
            if index > last:
                return
