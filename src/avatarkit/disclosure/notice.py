"""The signed disclosure notice: ``DisclosureMetadata`` as a short JWS a viewer app verifies.

A viewer app (or an SFU, or an auditor) receives it with the ``JoinInfo`` or the
``SessionStarted`` event, checks it against the deployment's published keys
(``AvatarKit.disclosure_jwks()``), and shows the AI notice it carries. EdDSA (Ed25519) only,
``typ`` ``avk-disclosure+jwt``; the payload is the metadata itself, so what the app shows is
exactly what was signed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jwt

from ..consent.keys import IssuerKey, KeySet
from ..errors import ConfigError, ConsentCheck, InvalidConsentToken
from .metadata import DisclosureMetadata

logger = logging.getLogger("avatarkit.disclosure")

__all__ = ["DISCLOSURE_NOTICE_TYPE", "load_notice_key", "sign_disclosure_notice",
           "verify_disclosure_notice"]

DISCLOSURE_NOTICE_TYPE = "avk-disclosure+jwt"


def load_notice_key(path: Path | None, *, generated_note: str | None = None) -> IssuerKey:
    """The key that signs disclosure notices: ``[disclosure] notice_key``, or one made now
    when none is configured (``generated_note`` is then logged, saying where viewers get its
    public key).

    Raises ``ConfigError(field="disclosure.notice_key")`` when the file does not exist.
    """
    if path is None:
        if generated_note is not None:
            logger.info("no [disclosure] notice_key: disclosure notices are signed with a key "
                        "made for this %s", generated_note)
        return IssuerKey.generate()
    try:
        return IssuerKey.load(path)
    except FileNotFoundError:
        raise ConfigError(f"notice key file not found: {path}",
                          field="disclosure.notice_key") from None


def sign_disclosure_notice(metadata: DisclosureMetadata, key: IssuerKey) -> str:
    """Compact JWS of ``metadata`` signed with ``key``."""
    payload: dict[str, Any] = metadata.model_dump(mode="json")
    payload["iat"] = int(metadata.started_at.timestamp())
    signing_key = jwt.PyJWK(key.private_jwk()).key
    return jwt.encode(payload, signing_key, algorithm="EdDSA",
                      headers={"typ": DISCLOSURE_NOTICE_TYPE, "kid": key.kid})


def verify_disclosure_notice(notice: str, keys: KeySet) -> DisclosureMetadata:
    """Verify a notice against pinned ``keys`` and return the metadata it carries.

    Raises ``InvalidConsentToken`` (with ``check`` naming what failed) on anything else
    than a well-formed notice signed by one of ``keys``.
    """
    try:
        header = jwt.get_unverified_header(notice)
    except jwt.PyJWTError:
        raise InvalidConsentToken("not a disclosure notice (malformed JWS)",
                                  check=ConsentCheck.MALFORMED) from None
    if header.get("alg") != "EdDSA":
        raise InvalidConsentToken("disclosure notices are signed with EdDSA only",
                                  check=ConsentCheck.ALGORITHM)
    if header.get("typ") != DISCLOSURE_NOTICE_TYPE:
        raise InvalidConsentToken(f"typ must be {DISCLOSURE_NOTICE_TYPE}",
                                  check=ConsentCheck.TYPE)
    kid = header.get("kid")
    public_key = keys.get(kid if isinstance(kid, str) else "")
    try:
        payload = jwt.decode(notice, public_key, algorithms=["EdDSA"],
                             options={"verify_aud": False, "verify_iat": False})
    except jwt.PyJWTError:
        raise InvalidConsentToken("the disclosure notice's signature does not verify",
                                  check=ConsentCheck.SIGNATURE) from None
    payload.pop("iat", None)
    return DisclosureMetadata.model_validate(payload)
