"""C2PA Content Credentials for the MP4s avatarkit produces: sign on the way out, read back.

The EU Code of Practice on AI-generated content (Measure 1.1.1) asks providers for *signed,
tamper-evident metadata* saying the content is AI-generated; in practice that is a C2PA
manifest. What :func:`sign_mp4` embeds (research notes ``consent-disclosure.md`` sections 2.2
and 6) is:

* ``c2pa.actions`` (v2) whose first action is ``c2pa.created`` with the IPTC digital source
  type ``trainedAlgorithmicMedia`` and our software agent: the machine-readable "this is
  fully AI-generated" that viewers such as Content Credentials Verify display;
* when a frame watermark was embedded, ``c2pa.watermarked.bound`` plus the ``c2pa.soft-binding``
  assertion carrying its algorithm and payload, so a copy whose metadata was stripped can be
  matched back to this manifest (c2pa-rs refuses a watermark action without the soft binding:
  ``assertion.action.softBindingMissing``);
* ``cawg.training-mining`` with every use ``notAllowed``: the person in the video consented to
  an avatar, not to models being trained on their likeness;
* ``com.avatarkit.generation`` and ``com.avatarkit.consent``: which render this is and which
  consent covered it (ids and hashes only, never personal data; Code Measure 1.3).

The hard binding (``c2pa.hash.bmff.v3``) makes any change to the media bytes detectable:
:func:`read_manifest` then reports ``state="invalid"`` with ``assertion.bmffHash.mismatch``.
Everything runs offline: no time-stamp authority, no OCSP, no remote manifests.

This module imports the native ``c2pa`` library, so ``import avatarkit`` never imports it;
only code that signs or verifies media does.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, NamedTuple

import c2pa as _c2pa  # type: ignore[import-untyped]  # c2pa-python ships no type information
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .. import __version__
from ..errors import AvatarKitError, ConfigError, MediaFormatError
from .certs import SigningCredentials

__all__ = [
    "CONSENT_LABEL",
    "GENERATION_LABEL",
    "TRAINED_ALGORITHMIC_MEDIA",
    "TRAINING_MINING_NOT_ALLOWED",
    "UNREADABLE_CODE",
    "ConsentAssertion",
    "ManifestReport",
    "ManifestState",
    "SignedManifest",
    "SoftBinding",
    "read_manifest",
    "sign_mp4",
]

TRAINED_ALGORITHMIC_MEDIA: Final = (
    "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia")
CONSENT_LABEL: Final = "com.avatarkit.consent"
GENERATION_LABEL: Final = "com.avatarkit.generation"
#: The CAWG Training and Data Mining entries, all refused.
TRAINING_MINING_NOT_ALLOWED: Final[dict[str, str]] = {
    "cawg.ai_training": "notAllowed",
    "cawg.ai_generative_training": "notAllowed",
    "cawg.data_mining": "notAllowed",
    "cawg.ai_inference": "notAllowed",
}
#: Reported in ``validation_codes`` when a manifest is present but cannot even be parsed.
UNREADABLE_CODE: Final = "avatarkit.manifest.unreadable"

_MIME = "video/mp4"
#: The ``uuid`` box type C2PA uses to embed a manifest store in ISO-BMFF.
_C2PA_BOX_UUID = bytes.fromhex("d8fec3d61b0e483c92975828877ec481")
#: Offline everywhere: no OCSP, no fetching of remote manifests (research notes 2.4).
_OFFLINE_VERIFY: Final[dict[str, bool]] = {"ocsp_fetch": False, "remote_manifest_fetch": False}
_ALGORITHMS: Final = {"ed25519": "ED25519", "es256": "ES256"}
_MAX_PAYLOAD = 1024

ManifestState = Literal["absent", "invalid", "valid", "trusted"]
_Sha256Hex = Field(pattern=r"^[0-9a-f]{64}$")


class ConsentAssertion(BaseModel):
    """The ``com.avatarkit.consent`` assertion: which consent covered this render.

    Only identifiers and hashes, so the manifest can travel with the media without carrying
    personal data: the token is represented by its SHA-256, the consent record by its hash
    (``ConsentGrant.record_hash()``), revocation by its status-list position. Anyone holding
    the records can link the media back to them; nobody else learns who the person is.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    consent_id: str = Field(min_length=1)
    issuer: str = Field(min_length=1)
    token_sha256: str = _Sha256Hex
    record_hash: str = _Sha256Hex
    status_uri: str | None = Field(default=None, min_length=1)
    status_idx: int | None = Field(default=None, ge=0)
    purpose: str = Field(min_length=1)
    channel: str = Field(min_length=1)
    generation_id: str = Field(min_length=1)

    @model_validator(mode="after")
    def _status_pair(self) -> ConsentAssertion:
        if (self.status_uri is None) != (self.status_idx is None):
            raise ValueError("status_uri and status_idx go together (both or neither)")
        return self


class SoftBinding(NamedTuple):
    """A ``c2pa.soft-binding``: the watermark algorithm and the payload it carries."""

    alg: str
    payload: bytes


@dataclass(frozen=True)
class SignedManifest:
    """What :func:`sign_mp4` wrote: the manifest's label (its ``urn:c2pa:`` id, for the
    generation log), the output file and the SHA-256 of its final bytes."""

    manifest_label: str
    path: Path
    sha256: str
    size: int


@dataclass(frozen=True)
class ManifestReport:
    """What :func:`read_manifest` found.

    ``state`` is ``"absent"`` (no Content Credentials), ``"invalid"`` (present but failing:
    tampered media, broken signature, unparseable manifest), ``"valid"`` (intact and signed,
    but by a certificate that does not chain to a trust anchor the reader was given; then
    ``validation_codes`` holds ``signingCredential.untrusted``) or ``"trusted"``.
    ``validation_codes`` lists the validator's failure codes. The remaining fields are read
    from the active manifest even when it is invalid, because a tampered file's claims are
    still evidence of where it came from; never act on them unless ``state`` is trusted.
    """

    present: bool
    state: ManifestState
    validation_codes: tuple[str, ...] = ()
    manifest_label: str | None = None
    software_agent: str | None = None
    digital_source_type: str | None = None
    generation_id: str | None = None
    provider: str | None = None
    avatar: str | None = None
    consent: ConsentAssertion | None = None
    soft_binding: SoftBinding | None = None
    training_mining: dict[str, str] | None = None
    error: str | None = None
    raw_json: str | None = None

    @property
    def trusted(self) -> bool:
        """Intact, and signed by a certificate chaining to a trust anchor given to the reader."""
        return self.state == "trusted"


def sign_mp4(
    src: Path,
    dst: Path,
    *,
    credentials: SigningCredentials,
    generation_id: str,
    provider: str,
    avatar: str,
    software_agent: str = f"avatarkit/{__version__}",
    watermark_alg: str | None,
    watermark_payload: bytes | None,
    consent: ConsentAssertion | None,
    title: str | None = None,
) -> SignedManifest:
    """Embed a signed C2PA manifest (see the module docstring for its contents) in an MP4.

    ``watermark_alg`` / ``watermark_payload`` describe the invisible frame watermark already
    in the video (both or neither); ``consent`` links the render to its consent. The output is
    written to a temporary file next to ``dst`` and renamed over it only once signing and
    c2pa-rs's own post-sign validation succeeded, so a failure never leaves a partial or
    unsigned ``dst`` behind; ``src`` may equal ``dst``.

    An input that already carries Content Credentials is refused: re-signing would replace
    its manifest and strip the provenance it records (Code of Practice Measure 1.2).

    Raises:
        MediaFormatError(field="src"): missing, not an MP4, truncated, or already signed.
        ConfigError(field="credentials"): the certificate chain or key is unusable or rejected
            by c2pa-rs (e.g. a leaf without an accepted extended key usage).
        ConfigError: another argument is invalid (the field names it).
    """
    src, dst = Path(src), Path(dst)
    for field, value in (("generation_id", generation_id), ("provider", provider),
                         ("avatar", avatar), ("software_agent", software_agent)):
        if not value.strip():
            raise ConfigError("must not be empty", field=field)
    soft_binding = _soft_binding(watermark_alg, watermark_payload)
    if consent is not None and consent.generation_id != generation_id:
        raise ConfigError(f"{consent.generation_id!r} is not the generation being signed "
                          f"({generation_id!r})", field="consent.generation_id")
    if _scan_bmff(src):
        raise MediaFormatError(
            f"{src} already carries Content Credentials; signing again would strip them",
            field="src", expected="an MP4 without a C2PA manifest")
    if not dst.parent.is_dir():
        raise ConfigError(f"{dst.parent} is not a directory", field="dst")
    chain_pem, key_pem = credentials.read_signer_material()

    label = f"urn:c2pa:{uuid.uuid4()}"
    manifest = _manifest(label=label, title=title or dst.name, generation_id=generation_id,
                         provider=provider, avatar=avatar, software_agent=software_agent,
                         soft_binding=soft_binding, consent=consent)

    fd, tmp_name = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".partial")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w+b") as out, src.open("rb") as source:
            # Same permissions as the input: mkstemp's 0600 would hide the published video.
            os.fchmod(out.fileno(), stat.S_IMODE(os.fstat(source.fileno()).st_mode))
            _sign_streams(manifest, credentials.algorithm, chain_pem, key_pem, source, out)
            out.flush()
            os.fsync(out.fileno())
        digest, size = _sha256(tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return SignedManifest(manifest_label=label, path=dst, sha256=digest, size=size)


def read_manifest(path: Path, *, trust_anchors_pem: str | None = None) -> ManifestReport:
    """Validate and read the Content Credentials of a media file, offline.

    ``trust_anchors_pem`` is the PEM root(s) to trust, e.g. ``root.pem`` from
    :func:`~avatarkit.disclosure.certs.generate_signing_credentials`; without it, a correctly
    signed file is ``"valid"`` but never ``"trusted"``. A file without a manifest is reported
    as ``present=False, state="absent"``, not raised: absence is an answer a detector must be
    able to give.

    Raises:
        MediaFormatError(field="path"): the file does not exist or is not a format c2pa reads.
        ConfigError(field="trust_anchors_pem"): the anchors are not PEM certificates.
    """
    path = Path(path)
    if not path.is_file():
        raise MediaFormatError(f"{path} does not exist", field="path",
                               expected="an existing media file")
    settings: dict[str, Any] = {"verify": {"verify_trust": True, **_OFFLINE_VERIFY}}
    if trust_anchors_pem is not None:
        if "-----BEGIN CERTIFICATE-----" not in trust_anchors_pem:
            raise ConfigError("no PEM certificate in it", field="trust_anchors_pem")
        settings["trust"] = {"trust_anchors": trust_anchors_pem}
    try:
        context = _c2pa.Context.from_dict(settings)
    except _c2pa.C2paError as exc:
        raise ConfigError(f"rejected by c2pa: {exc}", field="trust_anchors_pem") from exc
    try:
        fmt = _MIME if _looks_like_bmff(path) else None
        with path.open("rb") as stream:
            try:
                reader = _c2pa.Reader.try_create(fmt, stream, None, context)
            except (_c2pa.C2paError.Io, _c2pa.C2paError.NotSupported) as exc:
                raise MediaFormatError(f"c2pa cannot read {path}: {exc}", field="path",
                                       expected="a media file format C2PA supports") from exc
            except _c2pa.C2paError as exc:
                # The store is there but broken beyond parsing (e.g. corrupted JUMBF).
                return ManifestReport(present=True, state="invalid",
                                      validation_codes=(UNREADABLE_CODE,), error=str(exc))
            if reader is None:
                return ManifestReport(present=False, state="absent")
            try:
                raw = str(reader.json())
            finally:
                reader.close()
    finally:
        context.close()
    return _report(raw)


# -- signing -----------------------------------------------------------------------------


def _soft_binding(alg: str | None, payload: bytes | None) -> SoftBinding | None:
    if alg is None and payload is None:
        return None
    if alg is None or not alg.strip():
        raise ConfigError("required with watermark_payload", field="watermark_alg")
    if payload is None or not 0 < len(payload) <= _MAX_PAYLOAD:
        raise ConfigError(f"1..{_MAX_PAYLOAD} bytes required with watermark_alg",
                          field="watermark_payload")
    return SoftBinding(alg, bytes(payload))


def _agent(software_agent: str) -> dict[str, str]:
    """``name/version`` -> C2PA 2.x ``ClaimGeneratorInfo`` (actions v2 want an object)."""
    name, sep, version = software_agent.rpartition("/")
    return {"name": name, "version": version} if sep and name and version else {
        "name": software_agent}


def _manifest(
    *,
    label: str,
    title: str,
    generation_id: str,
    provider: str,
    avatar: str,
    software_agent: str,
    soft_binding: SoftBinding | None,
    consent: ConsentAssertion | None,
) -> dict[str, Any]:
    agent = _agent(software_agent)
    actions: list[dict[str, Any]] = [{
        "action": "c2pa.created",
        "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
        "softwareAgent": agent,
    }]
    assertions: list[dict[str, Any]] = [{"label": "c2pa.actions", "data": {"actions": actions}}]
    if soft_binding is not None:
        actions.append({"action": "c2pa.watermarked.bound", "softwareAgent": agent})
        assertions.append({"label": "c2pa.soft-binding", "data": {
            "alg": soft_binding.alg,
            # One block for the whole asset: the mark is on every frame.
            "blocks": [{"scope": {},
                        "value": base64.b64encode(soft_binding.payload).decode("ascii")}],
        }})
    assertions.append({"label": "cawg.training-mining", "data": {
        "entries": {entry: {"use": use} for entry, use in TRAINING_MINING_NOT_ALLOWED.items()},
    }})
    assertions.append({"label": GENERATION_LABEL, "data": {
        "generation_id": generation_id, "provider": provider, "avatar": avatar,
    }})
    if consent is not None:
        assertions.append({"label": CONSENT_LABEL,
                           "data": consent.model_dump(mode="json", exclude_none=True)})
    return {
        "label": label,
        "title": title,
        "format": _MIME,
        "claim_generator_info": [{"name": "avatarkit", "version": __version__}],
        "assertions": assertions,
    }


def _sign_streams(manifest: dict[str, Any], algorithm: str, chain_pem: bytes, key_pem: bytes,
                  source: Any, out: Any) -> None:
    # verify_after_sign: c2pa-rs validates what it just wrote, so a manifest it would call
    # invalid is never published. Trust is the reader's business, not the signer's.
    context = _c2pa.Context.from_dict(
        {"verify": {"verify_trust": False, "verify_after_sign": True, **_OFFLINE_VERIFY}})
    try:
        alg = getattr(_c2pa.C2paSigningAlg, _ALGORITHMS[algorithm])
        try:
            signer = _c2pa.Signer.from_info(_c2pa.C2paSignerInfo(alg, chain_pem, key_pem, None))
        except _c2pa.C2paError as exc:
            raise ConfigError(f"c2pa rejected the signing credentials: {exc}",
                              field="credentials") from exc
        try:
            _c2pa.Builder(manifest, context=context).sign(signer, _MIME, source, out)
        finally:
            signer.close()
    except _c2pa.C2paError.Signature as exc:
        raise ConfigError(
            f"c2pa refused to sign with these credentials: {exc} (a C2PA signing leaf needs "
            "KeyUsage digitalSignature, an extended key usage such as emailProtection, and "
            "an AuthorityKeyIdentifier)", field="credentials") from exc
    except _c2pa.C2paError.Verify as exc:
        if "signingCredential" in str(exc):
            raise ConfigError(f"the signed manifest fails validation because of its "
                              f"certificate: {exc}", field="credentials") from exc
        raise AvatarKitError(f"c2pa produced a manifest it does not validate: {exc}") from exc
    except _c2pa.C2paError as exc:
        raise AvatarKitError(f"c2pa signing failed: {exc}") from exc
    finally:
        context.close()


def _sha256(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


# -- ISO-BMFF sniffing -------------------------------------------------------------------


def _looks_like_bmff(path: Path) -> bool:
    with path.open("rb") as fh:
        head = fh.read(8)
    return len(head) == 8 and head[4:8] == b"ftyp"


def _scan_bmff(path: Path) -> bool:
    """Walk the top-level boxes: an MP4 starts with ``ftyp``, has ``moov`` and ``mdat``, and
    its boxes tile the file exactly. c2pa-rs happily "signs" a truncated or garbage file, so
    this is the check that keeps such files from receiving valid-looking credentials.
    Returns whether a C2PA manifest store box is already present."""
    expected = "an ISO-BMFF MP4 (ftyp, moov, mdat boxes)"
    if not path.is_file():
        raise MediaFormatError(f"{path} does not exist", field="src", expected=expected)
    size = path.stat().st_size
    seen: list[bytes] = []
    has_c2pa = False
    with path.open("rb") as fh:
        offset = 0
        while offset < size:
            header = fh.read(8)
            if len(header) < 8:
                raise MediaFormatError(f"{path} ends inside a box header", field="src",
                                       expected=expected)
            box_size, box_type = int.from_bytes(header[:4], "big"), header[4:8]
            header_len = 8
            if box_size == 1:
                large = fh.read(8)
                if len(large) < 8:
                    raise MediaFormatError(f"{path} ends inside a box header", field="src",
                                           expected=expected)
                box_size, header_len = int.from_bytes(large, "big"), 16
            elif box_size == 0:
                box_size = size - offset
            if box_size < header_len or offset + box_size > size:
                raise MediaFormatError(
                    f"{path}: box {box_type!r} at byte {offset} has an impossible size "
                    f"{box_size} (file is {size} bytes; truncated?)", field="src",
                    expected=expected)
            if box_type == b"uuid" and fh.read(16) == _C2PA_BOX_UUID:
                has_c2pa = True
            seen.append(box_type)
            offset += box_size
            fh.seek(offset)
    if not seen or seen[0] != b"ftyp" or b"moov" not in seen or b"mdat" not in seen:
        raise MediaFormatError(f"{path} is not an MP4 movie (top-level boxes: "
                               f"{[t.decode('latin-1') for t in seen[:8]]})", field="src",
                               expected=expected)
    return has_c2pa


# -- reading -----------------------------------------------------------------------------


_STATES: Final[dict[str, ManifestState]] = {
    "Invalid": "invalid", "Valid": "valid", "Trusted": "trusted"}


def _report(raw: str) -> ManifestReport:
    store = json.loads(raw)
    label = store.get("active_manifest")
    manifest: dict[str, Any] = store.get("manifests", {}).get(label) or {}
    results = store.get("validation_results") or {}
    failures = list((results.get("activeManifest") or {}).get("failure") or [])
    for delta in results.get("ingredientDeltas") or []:
        failures += (delta.get("validationDeltas") or {}).get("failure") or []
    codes = [str(item.get("code")) for item in failures if isinstance(item, dict)]
    state = _STATES.get(str(store.get("validation_state")), "invalid")

    assertions = _assertions(manifest)
    created = _created_action(assertions)
    generation = assertions.get(GENERATION_LABEL) or {}
    consent = _consent(assertions.get(CONSENT_LABEL))
    return ManifestReport(
        present=True,
        state=state,
        validation_codes=tuple(codes),
        manifest_label=label if isinstance(label, str) else None,
        software_agent=_agent_text(created.get("softwareAgent")),
        digital_source_type=_str_or_none(created.get("digitalSourceType")),
        generation_id=_str_or_none(generation.get("generation_id")) or (
            consent.generation_id if consent else None),
        provider=_str_or_none(generation.get("provider")),
        avatar=_str_or_none(generation.get("avatar")),
        consent=consent,
        soft_binding=_soft_binding_of(assertions.get("c2pa.soft-binding")),
        training_mining=_training_mining(assertions.get("cawg.training-mining")),
        raw_json=raw,
    )


def _assertions(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Assertion data by label, versions folded (``c2pa.actions.v2`` -> ``c2pa.actions``);
    the first instance of a label wins, as the active one."""
    found: dict[str, dict[str, Any]] = {}
    for item in manifest.get("assertions") or []:
        label, data = item.get("label"), item.get("data")
        if not isinstance(label, str) or not isinstance(data, dict):
            continue
        if label.startswith("c2pa.actions"):
            label = "c2pa.actions"
        found.setdefault(label, data)
    return found


def _created_action(assertions: dict[str, dict[str, Any]]) -> dict[str, Any]:
    for action in (assertions.get("c2pa.actions") or {}).get("actions") or []:
        if isinstance(action, dict) and action.get("action") == "c2pa.created":
            return action
    return {}


def _agent_text(agent: object) -> str | None:
    if isinstance(agent, str):
        return agent
    if isinstance(agent, dict) and isinstance(agent.get("name"), str):
        version = agent.get("version")
        return f"{agent['name']}/{version}" if isinstance(version, str) else agent["name"]
    return None


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _consent(data: dict[str, Any] | None) -> ConsentAssertion | None:
    if data is None:
        return None
    known = {k: v for k, v in data.items() if k in ConsentAssertion.model_fields}
    try:
        return ConsentAssertion.model_validate(known)
    except ValidationError:
        return None


def _soft_binding_of(data: dict[str, Any] | None) -> SoftBinding | None:
    if data is None:
        return None
    blocks = data.get("blocks") or []
    alg, value = data.get("alg"), blocks[0].get("value") if blocks else None
    if not isinstance(alg, str) or not isinstance(value, str):
        return None
    try:
        return SoftBinding(alg, base64.b64decode(value, validate=True))
    except ValueError:
        return None


def _training_mining(data: dict[str, Any] | None) -> dict[str, str] | None:
    if data is None:
        return None
    entries = data.get("entries") or {}
    return {str(k): str(v.get("use")) for k, v in entries.items() if isinstance(v, dict)}
