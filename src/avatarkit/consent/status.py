"""Revocation status: IETF Token Status List (draft-ietf-oauth-status-list).

A status list is a bit array, ``bits`` bits per token (we use 2: valid / revoked /
suspended), LSB-first within each byte, zlib-compressed and base64url-encoded without
padding (``lst``).

The list travels as a signed ``statuslist+jwt`` (claims ``sub`` = the list's URI, ``iat``,
``exp``, ``ttl``, ``status_list{bits, lst}``, and ``iss`` in the lists avatarkit signs).
:class:`StatusChecker` fetches it from a :class:`StatusListSource`, verifies it against the
keys pinned for the issuer of the token asking (:class:`~.keys.TrustedIssuers`: a list for
registry A's URI signed by registry B's key is refused, or B could un-revoke A's consents),
caches it for its ``ttl`` and fails closed once the newest valid copy is older than
``max_age_s``.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import time
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

import httpx

from ..errors import ConfigError, ConsentCheck, ConsentStatusUnavailable, InvalidConsentToken
from .grant import StatusReference
from .keys import (
    ALGORITHM,
    MAX_JWS_LENGTH,
    IssuerKey,
    KeySet,
    TrustedIssuers,
    parse_compact,
    signature_valid,
)

__all__ = [
    "STATUS_LIST_TYPE",
    "FileStatusListSource",
    "HttpStatusListSource",
    "StaticStatusListSource",
    "StatusChecker",
    "StatusList",
    "StatusListSource",
    "TokenStatus",
    "issue_status_list_token",
]

logger = logging.getLogger("avatarkit.consent.status")

#: JWS ``typ`` of a signed status list (draft-ietf-oauth-status-list section 5.1).
STATUS_LIST_TYPE = "statuslist+jwt"

#: How far ahead of this clock a list's ``iat`` may be (issuer clock skew).
_MAX_FUTURE_IAT_S = 300.0

#: Largest decompressed list accepted from the wire (128 Mi one-bit entries). ``lst`` is
#: zlib data, and a small compressed string can inflate a thousandfold: bound it.
_MAX_LIST_BYTES = 16 << 20


class TokenStatus(IntEnum):
    """Status values of the Token Status List (section 7.1 of the draft)."""

    VALID = 0
    INVALID = 1  # revoked, final
    SUSPENDED = 2
    APPLICATION_SPECIFIC = 3


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class StatusList:
    """A mutable status list of ``size`` entries, ``bits`` (1, 2, 4 or 8) bits each."""

    __slots__ = ("_data", "bits", "size")

    def __init__(self, size: int, *, bits: int = 2) -> None:
        if bits not in (1, 2, 4, 8):
            raise ValueError(f"bits must be 1, 2, 4 or 8, got {bits}")
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        self.bits = bits
        self.size = size
        self._data = bytearray((size * bits + 7) // 8)

    def _locate(self, idx: int) -> tuple[int, int]:
        if not 0 <= idx < self.size:
            raise IndexError(f"status index {idx} is outside the list (size {self.size})")
        bit = idx * self.bits
        return bit // 8, bit % 8

    def __getitem__(self, idx: int) -> int:
        byte, shift = self._locate(idx)
        return (self._data[byte] >> shift) & ((1 << self.bits) - 1)

    def __setitem__(self, idx: int, value: int) -> None:
        mask = (1 << self.bits) - 1
        if not 0 <= value <= mask:
            raise ValueError(f"value {value} does not fit in {self.bits} bits")
        byte, shift = self._locate(idx)
        self._data[byte] = (self._data[byte] & ~(mask << shift) & 0xFF) | (value << shift)

    def __len__(self) -> int:
        return self.size

    def encode(self) -> str:
        """``lst``: zlib (DEFLATE, best compression) then base64url without padding."""
        return _b64url(zlib.compress(bytes(self._data), 9))

    @classmethod
    def decode(cls, lst: str, *, bits: int) -> StatusList:
        """Parse ``lst``. The size is every entry the decompressed bytes hold."""
        try:
            raw = zlib.decompress(_unb64url(lst))
        except (ValueError, zlib.error) as exc:
            raise ValueError(f"status list is not base64url zlib data: {exc}") from None
        if not raw:
            raise ValueError("status list is empty")
        out = cls(len(raw) * 8 // bits, bits=bits)
        out._data[:] = raw
        return out


def issue_status_list_token(status_list: StatusList, key: IssuerKey, *, uri: str,
                            issued_at: float | None = None, ttl_s: int = 300,
                            expires_in_s: int = 86400, issuer: str | None = None) -> str:
    """Sign ``status_list`` as a ``statuslist+jwt`` for ``uri``.

    ``ttl`` tells checkers how long they may cache it before fetching again; ``exp`` is the
    hard end after which no checker uses it, so a publisher that stops publishing makes
    verifiers fail closed instead of trusting an old list forever. ``issuer`` (the ``iss`` of
    the tokens the list answers for) is written as ``iss``; checkers refuse a list whose
    ``iss`` names another issuer than the token's.
    """
    if not uri:
        raise ValueError("a status list needs its uri (the sub claim)")
    if ttl_s <= 0 or expires_in_s <= 0:
        raise ValueError("ttl_s and expires_in_s must be positive")
    if issuer is not None and not issuer:
        raise ValueError("issuer must not be empty")
    iat = int(time.time() if issued_at is None else issued_at)
    claims: dict[str, Any] = {"sub": uri, "iat": iat, "exp": iat + expires_in_s, "ttl": ttl_s,
                              "status_list": {"bits": status_list.bits,
                                              "lst": status_list.encode()}}
    if issuer is not None:
        claims["iss"] = issuer
    return key.sign(claims, typ=STATUS_LIST_TYPE)


class StatusListSource(ABC):
    """Where signed status lists come from. ``fetch`` returns the compact JWT as published;
    it is not trusted: :class:`StatusChecker` verifies whatever comes back. Any exception
    from ``fetch`` counts as "the list could not be fetched"."""

    @abstractmethod
    async def fetch(self, uri: str) -> str:
        """The ``statuslist+jwt`` currently published at ``uri``."""


class HttpStatusListSource(StatusListSource):
    """GET the list over HTTP(S) with the caller's client (its timeouts, proxies, TLS).

    Redirects are followed only if the client does; any non-2xx answer, transport error or
    a body over ``max_bytes`` raises.
    """

    def __init__(self, client: httpx.AsyncClient, *, max_bytes: int = MAX_JWS_LENGTH) -> None:
        self._client = client
        self._max_bytes = max_bytes

    async def fetch(self, uri: str) -> str:
        headers = {"Accept": "application/statuslist+jwt"}
        async with self._client.stream("GET", uri, headers=headers) as response:
            response.raise_for_status()
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > self._max_bytes:
                    raise ValueError(f"status list response over {self._max_bytes} bytes")
        try:
            return body.decode("ascii").strip()
        except UnicodeDecodeError:
            raise ValueError("status list response is not ASCII") from None


class FileStatusListSource(StatusListSource):
    """Lists read from local files, by URI (offline deployments, the CLI, air-gapped
    renderers that receive the published list by other means)."""

    def __init__(self, paths: Mapping[str, Path]) -> None:
        self._paths = {uri: Path(path) for uri, path in paths.items()}

    @classmethod
    def discover(cls, *locations: Path) -> FileStatusListSource:
        """Map each ``*.jwt`` file (or each file given directly) to the URI in its ``sub``.

        The ``sub`` is read without verification only to route the lookup: the checker
        verifies the signature and that ``sub`` equals the URI asked for.
        """
        paths: dict[str, Path] = {}
        for location in locations:
            files = sorted(location.glob("*.jwt")) if location.is_dir() else [location]
            for file in files:
                try:
                    sub = parse_compact(file.read_text(encoding="ascii").strip()).payload.get("sub")
                except (OSError, ValueError):
                    continue
                if isinstance(sub, str):
                    paths[sub] = file
        return cls(paths)

    @property
    def uris(self) -> tuple[str, ...]:
        return tuple(self._paths)

    async def fetch(self, uri: str) -> str:
        path = self._paths.get(uri)
        if path is None:
            raise LookupError("no status list file for this uri")
        text = await asyncio.to_thread(path.read_text, encoding="ascii")
        return text.strip()


class StaticStatusListSource(StatusListSource):
    """Lists held in memory: what an embedded registry publishes to its own verifiers, and
    what tests use."""

    def __init__(self) -> None:
        self._tokens: dict[str, str] = {}

    def publish(self, uri: str, token: str) -> None:
        """Replace the list served for ``uri``."""
        self._tokens[uri] = token

    async def fetch(self, uri: str) -> str:
        try:
            return self._tokens[uri]
        except KeyError:
            raise LookupError("no status list published for this uri") from None


class _InvalidList(Exception):
    """A fetched list that must not be used (signature, type, claims, expiry...)."""


#: a cached list is one issuer's statement about one URI (issuer None: a single-set checker)
_ListKey = tuple[str | None, str]


@dataclass(frozen=True, slots=True)
class _CachedList:
    status_list: StatusList
    iat: float
    exp: float | None
    ttl: float
    fetched_at: float


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and \
        math.isfinite(value)


def _bounded_inflate_ok(lst: str) -> bool:
    try:
        inflater = zlib.decompressobj()
        raw = inflater.decompress(_unb64url(lst), _MAX_LIST_BYTES)
    except (ValueError, zlib.error):
        return True  # let StatusList.decode report it
    return not inflater.unconsumed_tail and len(raw) <= _MAX_LIST_BYTES


class StatusChecker:
    """Answers "what is the status of this token?" from signed, cached status lists.

    * one verified list cached per URI, refetched once its ``ttl`` (else ``default_ttl_s``)
      has passed, and never used past its ``exp`` or more than ``max_age_s`` after its
      ``iat``;
    * every fetched list is verified: ``alg`` EdDSA, ``typ`` statuslist+jwt, a ``kid``
      pinned *for the issuer of the token asking* (with :class:`TrustedIssuers`; a plain
      :class:`KeySet` serves a single-issuer deployment), the signature, an ``iss`` (when the
      list has one) equal to that issuer, ``sub`` equal to the URI asked for (a validly
      signed list for another URI must not answer for this one), ``exp`` not passed,
      ``iat`` not ahead of this clock by more than ``_MAX_FUTURE_IAT_S``, ``bits`` in
      1/2/4/8; a list older than the newest one seen for the URI is refused (rollback to a
      pre-revocation list), even after :meth:`invalidate`;
    * if a refetch fails but the cached list is still within ``max_age_s`` (and before its
      ``exp``), the cache answers and a warning is logged; the source is then retried after
      ``retry_after_s`` rather than on every check;
    * otherwise :class:`ConsentStatusUnavailable`: ``STATUS_STALE`` when a cached list aged
      out, ``STATUS_UNAVAILABLE`` when there never was a valid list (or the index is not in
      it);
    * one fetch per URI at a time: concurrent checks wait for the fetch in flight.

    Lists are cached per (issuer, URI): a list verified for one issuer never answers for
    another.
    """

    def __init__(self, keys: TrustedIssuers | KeySet, source: StatusListSource, *,
                 max_age_s: float = 86400,
                 clock: Callable[[], float] = time.time, default_ttl_s: float = 300.0,
                 retry_after_s: float = 30.0) -> None:
        if max_age_s <= 0 or default_ttl_s <= 0 or retry_after_s < 0:
            raise ValueError("max_age_s and default_ttl_s must be positive, retry_after_s "
                             "not negative")
        self._trust = keys
        self._source = source
        self._max_age = max_age_s
        self._clock = clock
        self._default_ttl = default_ttl_s
        self._retry_after = retry_after_s
        self._cache: dict[_ListKey, _CachedList] = {}
        self._retry_at: dict[_ListKey, float] = {}
        self._newest_iat: dict[_ListKey, float] = {}
        self._locks: dict[_ListKey, asyncio.Lock] = {}

    @property
    def issuer_bound(self) -> bool:
        """Whether keys are pinned per issuer (:class:`TrustedIssuers`), not one shared set."""
        return isinstance(self._trust, TrustedIssuers)

    async def status(self, ref: StatusReference, *, issuer: str | None = None,
                     max_cache_age_s: float | None = None) -> TokenStatus:
        """The status at ``ref.idx`` of the list at ``ref.uri``, for a token of ``issuer``.

        ``issuer`` is required when keys are pinned per issuer: the list must be signed by a
        key of the token's own issuer (a list is a statement *by* that issuer).

        ``max_cache_age_s`` shortens the cache for this call: a list fetched longer ago than
        that is fetched again (live sessions re-checking every few minutes pass their
        interval, so a revocation is seen within it even when the list's ``ttl`` is longer).

        Values without a meaning in :class:`TokenStatus` (4- and 8-bit lists) come back as
        ``APPLICATION_SPECIFIC``: an unknown status never reads as valid.
        """
        entry = await self._current(ref.uri, issuer, max_cache_age_s)
        if ref.idx >= len(entry.status_list):
            raise ConsentStatusUnavailable(
                f"status index {ref.idx} is outside the list at {ref.uri} "
                f"({len(entry.status_list)} entries)", check=ConsentCheck.STATUS_UNAVAILABLE)
        value = entry.status_list[ref.idx]
        try:
            return TokenStatus(value)
        except ValueError:
            return TokenStatus.APPLICATION_SPECIFIC

    def invalidate(self, uri: str | None = None) -> None:
        """Forget the cached list for ``uri`` (all lists when None): the next check fetches.
        Use after a revocation this process made itself, so it takes effect at once. The
        newest ``iat`` seen is kept, so an invalidation cannot open a rollback window."""
        for key in [k for k in self._cache if uri is None or k[1] == uri]:
            del self._cache[key]
        for key in [k for k in self._retry_at if uri is None or k[1] == uri]:
            del self._retry_at[key]

    def _keys_for(self, issuer: str | None) -> KeySet:
        if isinstance(self._trust, KeySet):
            return self._trust
        if issuer is None:
            raise ConfigError("this checker pins keys per issuer: pass the token's issuer",
                              field="issuer")
        try:
            return self._trust.keys_for(issuer)
        except InvalidConsentToken:
            raise ConsentStatusUnavailable(
                "no keys are pinned for the issuer of this token's status list",
                check=ConsentCheck.STATUS_UNAVAILABLE) from None

    def _usable(self, entry: _CachedList, now: float) -> bool:
        return now - entry.iat <= self._max_age and (entry.exp is None or now < entry.exp)

    def _fresh(self, entry: _CachedList | None, now: float, key: _ListKey,
               max_cache_age: float | None) -> bool:
        if entry is None or not self._usable(entry, now):
            return False
        ttl = entry.ttl if max_cache_age is None else min(entry.ttl, max_cache_age)
        return now < entry.fetched_at + ttl or now < self._retry_at.get(key, -math.inf)

    async def _current(self, uri: str, issuer: str | None,
                       max_cache_age: float | None) -> _CachedList:
        keys = self._keys_for(issuer)
        key: _ListKey = (issuer if self.issuer_bound else None, uri)
        entry = self._cache.get(key)
        if entry is not None and self._fresh(entry, self._clock(), key, max_cache_age):
            return entry
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            # another check may have refreshed the list while this one waited for the lock
            entry = self._cache.get(key)
            now = self._clock()
            if entry is not None and self._fresh(entry, now, key, max_cache_age):
                return entry
            try:
                token = await self._source.fetch(uri)
                fetched = self._verify(token, uri, keys, issuer, self._clock())
                if fetched.iat < self._newest_iat.get(key, -math.inf):
                    raise _InvalidList("the fetched list is older than one already seen")
            except Exception as exc:
                reason = str(exc) if isinstance(exc, _InvalidList) else \
                    f"fetch failed ({type(exc).__name__})"
                now = self._clock()
                if entry is not None and self._usable(entry, now):
                    self._retry_at[key] = now + self._retry_after
                    logger.warning("status list %s: %s; using the cached list issued %.0f s "
                                   "ago", uri, reason, now - entry.iat)
                    return entry
                if entry is not None:
                    raise ConsentStatusUnavailable(
                        f"status list {uri} is stale (issued {now - entry.iat:.0f} s ago, "
                        f"max age {self._max_age:.0f} s) and {reason}",
                        check=ConsentCheck.STATUS_STALE) from None
                raise ConsentStatusUnavailable(f"status list {uri} unavailable: {reason}",
                                               check=ConsentCheck.STATUS_UNAVAILABLE) from None
            self._cache[key] = fetched
            self._newest_iat[key] = fetched.iat
            self._retry_at.pop(key, None)
            return fetched

    def _verify(self, token: str, uri: str, keys: KeySet, issuer: str | None,
                now: float) -> _CachedList:
        try:
            header, claims = parse_compact(token)
        except ValueError as exc:
            raise _InvalidList(f"malformed list: {exc}") from None
        if header.get("alg") != ALGORITHM:
            raise _InvalidList("list not signed with EdDSA")
        if header.get("typ") != STATUS_LIST_TYPE:
            raise _InvalidList(f"list typ is not {STATUS_LIST_TYPE}")
        kid = header.get("kid")
        if not isinstance(kid, str) or kid not in keys:
            raise _InvalidList("list signed by a key that is not pinned for the token's "
                               "issuer" if self.issuer_bound else
                               "list signed by a key that is not pinned")
        if not signature_valid(token, keys.get(kid)):
            raise _InvalidList("list signature does not verify")
        if "iss" in claims and (not isinstance(claims["iss"], str) or
                                (issuer is not None and claims["iss"] != issuer)):
            raise _InvalidList("list iss is not the token's issuer")
        if claims.get("sub") != uri:
            raise _InvalidList("list sub is not the uri it was fetched for")
        iat: Any = claims.get("iat")
        exp: Any = claims.get("exp")
        ttl: Any = claims.get("ttl")
        if not _number(iat) or (exp is not None and not _number(exp)) or \
                (ttl is not None and (not _number(ttl) or ttl <= 0)):
            raise _InvalidList("list iat/exp/ttl missing or not numbers")
        if exp is not None and now >= exp:
            raise _InvalidList("list expired (exp passed)")
        if iat > now + _MAX_FUTURE_IAT_S:
            # a list dated ahead would win every later rollback comparison and stay
            # "fresh" by max_age: accepting it could pin a pre-revocation list
            raise _InvalidList("list iat is in the future (issuer clock?)")
        body: Any = claims.get("status_list")
        if not isinstance(body, dict) or body.get("bits") not in (1, 2, 4, 8) or \
                isinstance(body.get("bits"), bool) or not isinstance(body.get("lst"), str):
            raise _InvalidList("list status_list claim needs bits in 1/2/4/8 and lst")
        if not _bounded_inflate_ok(body["lst"]):
            raise _InvalidList(f"list decompresses to more than {_MAX_LIST_BYTES} bytes")
        try:
            status_list = StatusList.decode(body["lst"], bits=body["bits"])
        except ValueError as exc:
            raise _InvalidList(f"list lst invalid: {exc}") from None
        cache_for = float(ttl) if ttl is not None else self._default_ttl
        return _CachedList(status_list=status_list, iat=float(iat),
                           exp=None if exp is None else float(exp),
                           ttl=min(cache_for, self._max_age), fetched_at=now)
