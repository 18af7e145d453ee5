"""``ConsentGrant``: the documented, specific, revocable consent of the person an avatar shows.

The record follows the structure of ISO/IEC TS 27560 consent records in our own naming: who
the likeness belongs to, who granted it, exactly what it covers (avatars and vendor-side ids,
modalities, purposes, channels, languages, providers, regions), when it is valid, the evidence
it was given (hash + storage reference of the consent recording and the random challenge
phrase read in it), who issued it and where its revocation status lives.

Its identity is the SHA-256 of its canonical JSON (RFC 8785, JCS): tokens carry that hash as
``rec``, the ledger chains it, generated assets link to it. Personal data (the display name)
stays in the record and never goes into tokens, logs or media metadata.
"""

from __future__ import annotations

import hashlib
import os
import time
from datetime import UTC, datetime
from typing import Annotated, Literal

import rfc8785
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "ANY",
    "DEFAULT_PROHIBITED_PURPOSES",
    "AwareDatetime",
    "Channel",
    "ConsentEvidence",
    "ConsentGrant",
    "Grantor",
    "GrantorRole",
    "LikenessSubject",
    "Modality",
    "Sha256Hex",
    "StatusReference",
    "new_consent_id",
]

#: Wildcard for ``languages`` ("any language").
ANY = "*"

Modality = Literal["face_video", "voice"]
Channel = Literal["live", "recorded"]
GrantorRole = Literal["self", "guardian", "estate", "authorised_agent"]

#: Purposes refused unless a grant lists them explicitly (default-deny list of the research
#: notes, section 4.3).
DEFAULT_PROHIBITED_PURPOSES: tuple[str, ...] = (
    "political", "sexual", "endorsement", "news-impersonation", "financial-advice",
    "medical-advice", "content-about-minors",
)

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_consent_id() -> str:
    """A ULID (48-bit millisecond time + 80 random bits, Crockford base32): sortable by
    creation time, unguessable. Prefixed ``cns_`` so it reads as what it is."""
    value = (int(time.time() * 1000) << 80) | int.from_bytes(os.urandom(10), "big")
    chars = [_CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5)]
    return "cns_" + "".join(chars)


def _aware(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("must be timezone-aware (e.g. datetime.now(UTC))")
    return value.astimezone(UTC)


def _sha256_hex(value: str) -> str:
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise ValueError("must be a lowercase hex SHA-256 (64 characters)")
    return value


def _distinct(values: list[str]) -> list[str]:
    if any(not v or v != v.strip() for v in values):
        raise ValueError("entries must be non-empty strings without surrounding spaces")
    if len(set(values)) != len(values):
        raise ValueError("entries must be distinct")
    return values


AwareDatetime = Annotated[datetime, AfterValidator(_aware)]
Sha256Hex = Annotated[str, AfterValidator(_sha256_hex)]
_NonEmptyList = Annotated[list[str], Field(min_length=1), AfterValidator(_distinct)]
_OptionalList = Annotated[list[str], AfterValidator(_distinct)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LikenessSubject(_Frozen):
    """The person whose face and voice are shown. ``subject_ref`` is pseudonymous; the
    display name is kept in the record only (never in tokens or media)."""

    subject_ref: str = Field(min_length=1)
    display_name: str | None = None
    is_minor: bool = False


class Grantor(_Frozen):
    """Who gave the consent: the subject, or someone with authority for them."""

    role: GrantorRole = "self"
    grantor_ref: str = Field(min_length=1)
    #: SHA-256 of the document giving the authority (guardianship, letters testamentary,
    #: agency contract); required unless the subject granted it themselves.
    authority_evidence_sha256: Sha256Hex | None = None

    @model_validator(mode="after")
    def _authority_needed(self) -> Grantor:
        if self.role != "self" and self.authority_evidence_sha256 is None:
            raise ValueError(f"a grant by a {self.role} needs authority_evidence_sha256")
        return self


class ConsentEvidence(_Frozen):
    """Proof the consent was given: the recording's hash and where it is stored, and the
    random challenge phrase it was read against (binds the recording to this grant)."""

    recording_sha256: Sha256Hex
    storage_ref: str = Field(min_length=1)
    challenge_phrase: str = Field(min_length=8)
    consent_text_sha256: Sha256Hex | None = None
    recorded_at: AwareDatetime | None = None


class StatusReference(_Frozen):
    """Where the grant's revocation status lives: an index into an IETF Token Status List."""

    uri: str = Field(min_length=1)
    idx: int = Field(ge=0)


class ConsentGrant(_Frozen):
    """One consent. Canonical form: :meth:`canonical_json`; identity: :meth:`record_hash`."""

    schema_version: Literal[1] = 1
    consent_id: str = Field(default_factory=new_consent_id, min_length=1)
    subject: LikenessSubject
    grantor: Grantor
    #: logical avatar names (``[avatars.X]`` in the kit config) this consent covers
    avatars: _NonEmptyList
    #: provider -> vendor-side ids (face, replica, avatar uuid) the consent allows there
    vendor_ids: dict[str, _NonEmptyList] = Field(default_factory=dict)
    modalities: Annotated[list[Modality], Field(min_length=1)] = ["face_video", "voice"]
    purposes: _NonEmptyList
    #: purposes never allowed under this grant, even if a caller asks; defaults to the
    #: research notes' default-deny list minus anything explicitly granted
    purposes_prohibited: _OptionalList = Field(default_factory=list)
    channels: Annotated[list[Channel], Field(min_length=1)] = ["live", "recorded"]
    #: BCP-47 tags, or ``["*"]`` for any language
    languages: _NonEmptyList = [ANY]
    #: allowed provider names; None means any provider
    providers: _OptionalList | None = None
    #: allowed regions (e.g. ``eu``, ``us``, ``self-hosted``); None means any region
    regions: _OptionalList | None = None
    valid_from: AwareDatetime
    expires_at: AwareDatetime
    evidence: ConsentEvidence
    #: the registry that issued the grant (the token's ``iss``)
    issuer: str = Field(min_length=1)
    status: StatusReference | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ConsentGrant:
        if self.expires_at <= self.valid_from:
            raise ValueError("expires_at must be after valid_from")
        clash = set(self.purposes) & set(self.purposes_prohibited)
        if clash:
            raise ValueError(f"purposes both granted and prohibited: {sorted(clash)}")
        if len(set(self.modalities)) != len(self.modalities) or \
                len(set(self.channels)) != len(self.channels):
            raise ValueError("modalities and channels must be distinct")
        return self

    @property
    def prohibited(self) -> frozenset[str]:
        """Purposes refused under this grant: the explicit list plus the default-deny list,
        minus what the grant allows explicitly."""
        return (frozenset(self.purposes_prohibited) | frozenset(DEFAULT_PROHIBITED_PURPOSES)) \
            - frozenset(self.purposes)

    def canonical_json(self) -> bytes:
        """RFC 8785 (JCS) canonical JSON of the record: the bytes that are hashed."""
        return rfc8785.dumps(self.model_dump(mode="json"))

    def record_hash(self) -> str:
        """Lowercase hex SHA-256 of :meth:`canonical_json` (the token's ``rec`` claim)."""
        return hashlib.sha256(self.canonical_json()).hexdigest()
