"""Consent: no likeness is shown without the documented, revocable consent of its person.

- :class:`ConsentGrant` is the record (canonical JSON, SHA-256 identity).
- :func:`issue_consent_token` / :class:`ConsentVerifier` sign and check Ed25519 JWTs
  (``typ`` ``avk-consent+jwt``) against the keys pinned for their issuer
  (:class:`TrustedIssuers`: issuer -> :class:`KeySet`).
- Revocation is an IETF Token Status List (:class:`StatusList`, :class:`StatusChecker`),
  2 bits per consent: valid, revoked, suspended.
- :class:`SQLiteConsentStore` is the append-only, hash-chained consent ledger and
  generation log; :class:`ConsentStore` is the interface for other backends.
- :class:`ConsentAuthority` is a registry in a box: key + store + published status list.
- :class:`ConsentWatch` re-checks a live use of a consent until it lapses
  (:class:`ConsentLapse`, with one of the :class:`ConsentEndReason` values).

``AvatarKit`` enforces all of it in ``kit.session(...)``; see docs/responsible-use.md.
"""

from .authority import ConsentAuthority
from .grant import ConsentEvidence, ConsentGrant, Grantor, LikenessSubject, StatusReference
from .keys import IssuerKey, KeySet, TrustedIssuers
from .status import (
    FileStatusListSource,
    HttpStatusListSource,
    StaticStatusListSource,
    StatusChecker,
    StatusList,
    StatusListSource,
    TokenStatus,
    issue_status_list_token,
)
from .store import ChainReport, ConsentStore, GenerationRecord, LedgerEntry, SQLiteConsentStore
from .tokens import (
    ConsentRequest,
    ConsentScope,
    ConsentVerifier,
    MemoryReplayGuard,
    ReplayGuard,
    VerifiedConsent,
    issue_consent_token,
)
from .watch import ConsentEndReason, ConsentLapse, ConsentWatch

__all__ = [
    "ChainReport",
    "ConsentAuthority",
    "ConsentEndReason",
    "ConsentEvidence",
    "ConsentGrant",
    "ConsentLapse",
    "ConsentRequest",
    "ConsentScope",
    "ConsentStore",
    "ConsentVerifier",
    "ConsentWatch",
    "FileStatusListSource",
    "GenerationRecord",
    "Grantor",
    "HttpStatusListSource",
    "IssuerKey",
    "KeySet",
    "LedgerEntry",
    "LikenessSubject",
    "MemoryReplayGuard",
    "ReplayGuard",
    "SQLiteConsentStore",
    "StaticStatusListSource",
    "StatusChecker",
    "StatusList",
    "StatusListSource",
    "StatusReference",
    "TokenStatus",
    "TrustedIssuers",
    "VerifiedConsent",
    "issue_consent_token",
    "issue_status_list_token",
]
