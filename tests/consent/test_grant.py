"""The consent record: validation that names the field, and a canonical form whose hash is
the record's identity (RFC 8785: key order and whitespace never change it)."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from pydantic import ValidationError

from avatarkit.consent.grant import DEFAULT_PROHIBITED_PURPOSES, ConsentGrant, new_consent_id

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)


def fields(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "consent_id": "cns_01TESTRECORD",
        "subject": {"subject_ref": "subj_1", "display_name": "Amelia Example"},
        "grantor": {"grantor_ref": "subj_1"},
        "avatars": ["amelia"],
        "vendor_ids": {"tavus": ["r_amelia"]},
        "purposes": ["support"],
        "valid_from": NOW,
        "expires_at": NOW + timedelta(days=365),
        "evidence": {"recording_sha256": "ab" * 32, "storage_ref": "vault://c/1.mp4",
                     "challenge_phrase": "violet harbour seven"},
        "issuer": "https://consent.example",
        "status": {"uri": "https://consent.example/status/1", "idx": 3},
    }
    base.update(overrides)
    return base


def test_canonical_json_is_jcs_and_its_hash_is_the_identity() -> None:
    grant = ConsentGrant.model_validate(fields())
    canonical = grant.canonical_json()
    parsed = json.loads(canonical)
    assert canonical == json.dumps(parsed, sort_keys=True, separators=(",", ":"),
                                   ensure_ascii=False).encode()
    assert grant.record_hash() == hashlib.sha256(canonical).hexdigest()
    # The same record built in another key order / timezone spelling hashes the same.
    shuffled = dict(reversed(list(fields().items())))
    shuffled["valid_from"] = NOW.astimezone(timezone(timedelta(hours=2)))
    assert ConsentGrant.model_validate(shuffled).record_hash() == grant.record_hash()


@pytest.mark.parametrize(("change", "value"), [
    ("avatars", ["amelia", "bob"]), ("purposes", ["marketing"]), ("channels", ["live"]),
    ("modalities", ["voice"]), ("regions", ["eu"]), ("providers", ["tavus"]),
    ("expires_at", NOW + timedelta(days=30)), ("vendor_ids", {"tavus": ["r_other"]}),
])
def test_every_scope_change_changes_the_hash(change: str, value: Any) -> None:
    assert ConsentGrant.model_validate(fields(**{change: value})).record_hash() != \
        ConsentGrant.model_validate(fields()).record_hash()


@pytest.mark.parametrize(("overrides", "where"), [
    ({"valid_from": datetime(2026, 1, 1)}, "valid_from"),  # naive datetime
    ({"expires_at": NOW - timedelta(days=1)}, "expires_at must be after valid_from"),
    ({"avatars": []}, "avatars"),
    ({"purposes": ["support", "support"]}, "purposes"),
    ({"purposes_prohibited": ["support"]}, "both granted and prohibited"),
    ({"grantor": {"role": "guardian", "grantor_ref": "g_1"}}, "authority_evidence_sha256"),
    ({"evidence": {"recording_sha256": "xyz", "storage_ref": "s", "challenge_phrase":
                   "long enough phrase"}}, "recording_sha256"),
    ({"evidence": {"recording_sha256": "ab" * 32, "storage_ref": "s",
                   "challenge_phrase": "short"}}, "challenge_phrase"),
    ({"vendor_ids": {"tavus": []}}, "vendor_ids"),
    ({"unexpected": 1}, "unexpected"),
])
def test_invalid_records_name_the_problem(overrides: dict[str, Any], where: str) -> None:
    with pytest.raises(ValidationError) as info:
        ConsentGrant.model_validate(fields(**overrides))
    assert where in str(info.value)


def test_default_deny_purposes_unless_granted_explicitly() -> None:
    plain = ConsentGrant.model_validate(fields())
    assert set(DEFAULT_PROHIBITED_PURPOSES) <= plain.prohibited
    medical = ConsentGrant.model_validate(fields(purposes=["support", "medical-advice"]))
    assert "medical-advice" not in medical.prohibited
    assert "political" in medical.prohibited


def test_consent_ids_are_unique_sortable_ulids() -> None:
    ids = [new_consent_id() for _ in range(200)]
    assert len(set(ids)) == 200
    assert all(i.startswith("cns_") and len(i) == 30 for i in ids)
    assert ids[0][4:14] <= ids[-1][4:14]  # the time prefix never goes backwards
