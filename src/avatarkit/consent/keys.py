"""Issuer signing keys and the pinned public key set that consent tokens are verified against.

Consent tokens and status lists are signed with Ed25519 (JWS ``alg: EdDSA``) only. A
verifier never learns keys from a token (no ``jku``/``jwk``/``x5u``): it holds a pinned
:class:`KeySet` shipped with the deployment and looks the signer up by ``kid``. Every ``kid`` is
the key's RFC 7638 JWK thumbprint, so a ``kid`` cannot be reused for a different key by
mistake, and rotation is simply several kids in the set.

A key is trusted *for an issuer*: :class:`TrustedIssuers` maps each trusted ``iss`` to the
key set pinned for it, and a token or status list of one issuer signed with another issuer's
key does not verify (a deployment that trusts registries A and B must not let B speak for A).

Parsing is strict: a header or payload with a member name twice, or with the non-JSON
constants ``NaN``/``Infinity``, is malformed (two parsers that keep different duplicates would
read different claims from the same signed bytes).

Private key material never appears in a ``repr``, a log line or an exception message.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from jwt import PyJWTError
from jwt.api_jws import PyJWS

from ..errors import ConfigError, ConsentCheck, InvalidConsentToken

__all__ = [
    "ALGORITHM",
    "MAX_JWS_LENGTH",
    "IssuerKey",
    "KeySet",
    "TrustedIssuers",
    "b64url",
    "jwk_thumbprint",
    "parse_compact",
    "signature_valid",
    "unb64url",
]

#: The only JWS algorithm avatarkit signs or accepts.
ALGORITHM = "EdDSA"

#: Longest compact JWS we parse at all; consent tokens are ~1 KB, status lists a few KB. A
#: bound stops an attacker from making the verifier base64-decode and JSON-parse megabytes.
MAX_JWS_LENGTH = 1 << 20

_B64URL = re.compile(r"[A-Za-z0-9_-]*")

#: PyJWT's JWS layer restricted to EdDSA: even if a caller's header checks were skipped, a
#: token whose header names another algorithm cannot verify here.
_JWS = PyJWS(algorithms=[ALGORITHM])


def b64url(data: bytes) -> str:
    """base64url without padding (RFC 7515 section 2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64url(text: str) -> bytes:
    """Strict inverse of :func:`b64url`: refuses characters outside the alphabet and padding
    (``base64.urlsafe_b64decode`` would silently drop them, letting two different strings
    decode to the same bytes)."""
    if not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError("not base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("not base64url") from None


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def jwk_thumbprint(x: str) -> str:
    """RFC 7638 thumbprint of an Ed25519 OKP key given its ``x`` (RFC 8037 section 2).

    The required members in lexicographic order, no whitespace, SHA-256, base64url.
    """
    canonical = json.dumps({"crv": "Ed25519", "kty": "OKP", "x": x},
                           separators=(",", ":"), sort_keys=True)
    return b64url(hashlib.sha256(canonical.encode("ascii")).digest())


class IssuerKey:
    """An Ed25519 signing key of a consent registry, identified by its JWK thumbprint."""

    __slots__ = ("_private", "_x", "kid")

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        if not isinstance(private_key, Ed25519PrivateKey):
            raise ConfigError("an issuer key must be an Ed25519 private key", field="key")
        self._private = private_key
        self._x = b64url(_raw_public(private_key.public_key()))
        self.kid = jwk_thumbprint(self._x)

    @classmethod
    def generate(cls) -> IssuerKey:
        """A fresh random key (from the OS CSPRNG, via cryptography)."""
        return cls(Ed25519PrivateKey.generate())

    @property
    def private_key(self) -> Ed25519PrivateKey:
        """The signing key object (for PyJWT); never serialise it anywhere but :meth:`save`."""
        return self._private

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._private.public_key()

    def public_jwk(self) -> dict[str, str]:
        """The public half as a JWK, ready for a JWKS."""
        return {"kty": "OKP", "crv": "Ed25519", "x": self._x, "kid": self.kid,
                "alg": ALGORITHM, "use": "sig"}

    def private_jwk(self) -> dict[str, str]:
        """The private JWK (adds ``d``). Handle as a secret."""
        raw = self._private.private_bytes(serialization.Encoding.Raw,
                                          serialization.PrivateFormat.Raw,
                                          serialization.NoEncryption())
        return {**self.public_jwk(), "d": b64url(raw)}

    @classmethod
    def from_jwk(cls, jwk: Mapping[str, Any], *, field: str = "key") -> IssuerKey:
        """Load a private OKP/Ed25519 JWK. A ``kid`` or ``x`` that does not belong to ``d``
        is refused: a file whose halves disagree is corrupt or tampered with."""
        if jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
            raise ConfigError("not an Ed25519 OKP key (kty OKP, crv Ed25519)", field=field)
        d = jwk.get("d")
        if not isinstance(d, str):
            raise ConfigError("the private key (d) is missing", field=f"{field}.d")
        try:
            raw = unb64url(d)
            private = Ed25519PrivateKey.from_private_bytes(raw)
        except ValueError:
            raise ConfigError("d is not a 32-byte base64url Ed25519 key",
                              field=f"{field}.d") from None
        key = cls(private)
        if "x" in jwk and jwk["x"] != key._x:
            raise ConfigError("x is not the public key of d", field=f"{field}.x")
        if "kid" in jwk and jwk["kid"] != key.kid:
            raise ConfigError("kid is not the key's RFC 7638 thumbprint", field=f"{field}.kid")
        return key

    def sign(self, claims: Mapping[str, Any], *, typ: str) -> str:
        """A compact JWS of ``claims`` (compact JSON) with header ``alg EdDSA``, ``typ``,
        ``kid``. Signing goes through PyJWT so the output is what any JOSE library reads."""
        payload = json.dumps(claims, separators=(",", ":"), ensure_ascii=True).encode("ascii")
        return _JWS.encode(payload, self._private, algorithm=ALGORITHM,
                           headers={"typ": typ, "kid": self.kid})

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the private JWK as JSON, readable by the owner only (mode 0600).

        Written to a temporary file created 0600 in the same directory and renamed over the
        target, so the key is never readable by others, not even briefly, and a crash
        leaves either the old file or the new one.
        """
        target = Path(path)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".avk-key-")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(self.private_jwk(), handle, indent=2)
                handle.write("\n")
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> IssuerKey:
        """Read a key written by :meth:`save` (or any private Ed25519 JWK)."""
        return cls.from_jwk(_read_json_object(path, "the key file"), field=str(path))

    def __repr__(self) -> str:
        return f"IssuerKey(kid={self.kid!r})"


class KeySet:
    """The pinned public keys of trusted issuers, by ``kid``.

    Built from a JWKS that ships with the deployment. Validation is strict because a key set
    is a trust anchor: only public OKP/Ed25519 keys, no private keys (``d``: a leaked signing
    key in a file meant to be distributed), no symmetric keys (``oct``: the HS256
    key-confusion attack), no duplicate kids, and each kid must be that key's thumbprint.
    """

    __slots__ = ("_keys", "_x")

    def __init__(self, keys: Mapping[str, Ed25519PublicKey]) -> None:
        self._keys: dict[str, Ed25519PublicKey] = {}
        self._x: dict[str, str] = {}
        for kid, key in keys.items():
            if not isinstance(key, Ed25519PublicKey):
                raise ConfigError("only Ed25519 public keys can be pinned", field=f"keys[{kid}]")
            x = b64url(_raw_public(key))
            if jwk_thumbprint(x) != kid:
                raise ConfigError("kid is not the key's RFC 7638 thumbprint",
                                  field=f"keys[{kid}]")
            self._keys[kid] = key
            self._x[kid] = x

    @classmethod
    def of(cls, *issuer_keys: IssuerKey) -> KeySet:
        """The public halves of some issuer keys (tests, single-process deployments)."""
        return cls({key.kid: key.public_key for key in issuer_keys})

    @classmethod
    def from_jwks(cls, jwks: Mapping[str, Any]) -> KeySet:
        """Parse ``{"keys": [JWK, ...]}``. A missing ``kid`` is derived (the thumbprint)."""
        entries = jwks.get("keys")
        if not isinstance(entries, list):
            raise ConfigError("a JWKS needs a 'keys' list", field="jwks.keys")
        keys: dict[str, Ed25519PublicKey] = {}
        for i, jwk in enumerate(entries):
            field = f"jwks[{i}]"
            if not isinstance(jwk, dict):
                raise ConfigError("each key must be a JSON object", field=field)
            kty = jwk.get("kty")
            if kty == "oct":
                raise ConfigError("symmetric keys (kty oct) are never trusted",
                                  field=f"{field}.kty")
            if kty != "OKP" or jwk.get("crv") != "Ed25519":
                raise ConfigError("only Ed25519 keys (kty OKP, crv Ed25519) are accepted",
                                  field=f"{field}.kty")
            if "d" in jwk:
                raise ConfigError("a private key (d) in a public key set: remove it and "
                                  "treat the key as compromised", field=f"{field}.d")
            if jwk.get("alg", ALGORITHM) != ALGORITHM:
                raise ConfigError("alg must be EdDSA", field=f"{field}.alg")
            if jwk.get("use", "sig") != "sig":
                raise ConfigError("use must be sig", field=f"{field}.use")
            x = jwk.get("x")
            try:
                if not isinstance(x, str):
                    raise ValueError
                public = Ed25519PublicKey.from_public_bytes(unb64url(x))
            except ValueError:
                raise ConfigError("x is not a 32-byte base64url Ed25519 public key",
                                  field=f"{field}.x") from None
            kid = jwk.get("kid", jwk_thumbprint(x))
            if not isinstance(kid, str) or kid != jwk_thumbprint(x):
                raise ConfigError("kid is not the key's RFC 7638 thumbprint",
                                  field=f"{field}.kid")
            if kid in keys:
                raise ConfigError(f"duplicate kid {kid!r}", field=f"{field}.kid")
            keys[kid] = public
        return cls(keys)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> KeySet:
        """Read a JWKS file."""
        return cls.from_jwks(_read_json_object(path, "the JWKS"))

    def to_jwks(self) -> dict[str, list[dict[str, str]]]:
        """The set as a JWKS (public members only)."""
        return {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid,
                          "alg": ALGORITHM, "use": "sig"} for kid, x in self._x.items()]}

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_jwks` as JSON (public data: ordinary file mode)."""
        Path(path).write_text(json.dumps(self.to_jwks(), indent=2) + "\n", encoding="utf-8")

    def with_key(self, key: IssuerKey | Ed25519PublicKey) -> KeySet:
        """A new set with one more key (rotation: old kids stay until removed)."""
        public = key.public_key if isinstance(key, IssuerKey) else key
        kid = jwk_thumbprint(b64url(_raw_public(public)))
        return KeySet({**self._keys, kid: public})

    def without(self, kid: str) -> KeySet:
        """A new set without ``kid`` (retiring a key refuses every token it signed)."""
        return KeySet({k: v for k, v in self._keys.items() if k != kid})

    def get(self, kid: str) -> Ed25519PublicKey:
        """The pinned key for ``kid``; :class:`InvalidConsentToken` (check KEY) if unknown."""
        try:
            return self._keys[kid]
        except (KeyError, TypeError):
            raise InvalidConsentToken("the signing key id is not in the pinned key set",
                                      check=ConsentCheck.KEY) from None

    @property
    def kids(self) -> tuple[str, ...]:
        return tuple(self._keys)

    def __contains__(self, kid: object) -> bool:
        return kid in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"KeySet(kids={list(self._keys)!r})"


class TrustedIssuers(Mapping[str, KeySet]):
    """The trusted consent issuers, each with the keys pinned for it: ``iss`` -> :class:`KeySet`.

    A token (or a status list) is verified with the keys of *its* issuer only. One key set
    shared by several issuers would let each of them sign tokens and status lists in the
    others' names, so the binding is explicit; the same key may still be pinned for two
    issuers on purpose by listing it in both sets.

        trusted = TrustedIssuers({"https://consent.acme.example": KeySet.load("acme.jwks"),
                                  "https://consent.partner.example": KeySet.load("p.jwks")})
    """

    __slots__ = ("_sets",)

    def __init__(self, issuers: Mapping[str, KeySet]) -> None:
        if not isinstance(issuers, Mapping) or not issuers:  # a bare KeySet is no mapping
            raise ConfigError("must map each trusted issuer (iss) to the KeySet pinned for it",
                              field="issuers")
        sets: dict[str, KeySet] = {}
        for issuer, keys in issuers.items():
            if not isinstance(issuer, str) or not issuer:
                raise ConfigError("issuer names must be non-empty strings", field="issuers")
            if not isinstance(keys, KeySet):
                raise ConfigError("expected a KeySet", field=f"issuers[{issuer}]")
            if not len(keys):
                raise ConfigError("pins no key: nothing this issuer signs could verify",
                                  field=f"issuers[{issuer}]")
            sets[issuer] = keys
        self._sets = sets

    @classmethod
    def bind(cls, keys: KeySet, issuers: Iterable[str]) -> TrustedIssuers:
        """``keys`` pinned for the one issuer in ``issuers``. Several issuers are refused: one
        set for all of them is exactly the cross-issuer trust this class exists to stop."""
        names = [issuers] if isinstance(issuers, str) else list(issuers)
        if len(names) != 1:
            raise ConfigError(
                f"one key set cannot be pinned for {len(names)} issuers (each could sign in "
                "the others' names); give each issuer its own: TrustedIssuers({issuer: "
                "KeySet}) or [consent.jwks] \"<issuer>\" = \"<jwks file>\"", field="jwks")
        return cls({names[0]: keys})

    def keys_for(self, issuer: object) -> KeySet:
        """The key set pinned for ``issuer``; :class:`InvalidConsentToken` (check ISSUER) if
        the issuer is not trusted."""
        found = self._sets.get(issuer) if isinstance(issuer, str) else None
        if found is None:
            raise InvalidConsentToken("the issuer is not trusted", check=ConsentCheck.ISSUER)
        return found

    def __getitem__(self, issuer: str) -> KeySet:
        return self._sets[issuer]

    def __iter__(self) -> Iterator[str]:
        return iter(self._sets)

    def __len__(self) -> int:
        return len(self._sets)

    def __repr__(self) -> str:
        return "TrustedIssuers({" + ", ".join(f"{iss!r}: {keys!r}"
                                              for iss, keys in self._sets.items()) + "})"


class _CompactJws(NamedTuple):
    """A compact JWS split and decoded, signature not yet checked."""

    header: dict[str, Any]
    payload: dict[str, Any]


def parse_compact(token: object) -> _CompactJws:
    """Split a compact JWS and decode its header and payload as JSON objects, without
    verifying anything. Raises :class:`ValueError` (with a message free of token text) for
    anything that is not three base64url segments of JSON objects.

    Verifiers run this first so that every later decision (algorithm, type, key) is made
    from a parsed header, and so that the ``jti`` is available for error reports.
    """
    if not isinstance(token, str):
        raise ValueError(f"the token is a {type(token).__name__}, not a str")
    if not token:
        raise ValueError("the token is empty")
    if len(token) > MAX_JWS_LENGTH:
        raise ValueError(f"the token is longer than {MAX_JWS_LENGTH} characters")
    parts = token.split(".")
    if len(parts) != 3:
        raise ValueError(f"a compact JWS has 3 dot-separated segments, this has {len(parts)}")
    decoded: list[dict[str, Any]] = []
    for name, part in zip(("header", "payload"), parts[:2], strict=True):
        try:
            value = json.loads(unb64url(part), object_pairs_hook=_unique_members,
                               parse_constant=_no_constant)
        except _DuplicateMember as exc:
            raise ValueError(f"the {name} has the member {exc} more than once") from None
        except (ValueError, RecursionError):
            raise ValueError(f"the {name} is not base64url JSON") from None
        if not isinstance(value, dict):
            raise ValueError(f"the {name} is not a JSON object")
        decoded.append(value)
    if not _B64URL.fullmatch(parts[2]) or len(parts[2]) % 4 == 1:
        raise ValueError("the signature is not base64url")
    return _CompactJws(decoded[0], decoded[1])


class _DuplicateMember(ValueError):
    """A JSON object names a member twice (its ``str`` is the name, shortened)."""


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` that refuses duplicate member names (RFC 7515 section 5.2:
    a JWS with duplicate header names must be rejected; the same reasoning holds for claims,
    where ``json.loads`` would silently keep the last value)."""
    out: dict[str, Any] = {}
    for name, value in pairs:
        if name in out:
            raise _DuplicateMember(repr(name[:32] + ("..." if len(name) > 32 else "")))
        out[name] = value
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def signature_valid(token: str, key: Ed25519PublicKey) -> bool:
    """Whether ``token``'s EdDSA signature verifies under ``key`` (PyJWT, EdDSA only).

    Any PyJWT error (bad signature, empty signature, undecodable segment, unsupported
    ``crit``) counts as "does not verify": callers have already classified malformed input
    and headers, so whatever is left is a signature failure.
    """
    try:
        _JWS.decode_complete(token, key, algorithms=[ALGORITHM])
    except PyJWTError:
        return False
    return True


def _read_json_object(path: str | os.PathLike[str], what: str) -> dict[str, Any]:
    """A JSON object from ``path``; any failure is a ConfigError naming the file (never its
    content: it may hold a private key)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {what}: {type(exc).__name__}", field=str(path)) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} is not a JSON object", field=str(path))
    return data
