"""Offline C2PA signing credentials: a private root CA, an intermediate and a signing leaf.

C2PA validators (c2pa-rs, which c2pa-python wraps) refuse to sign with, or validate, a
certificate that does not follow the C2PA certificate profile. The profile that worked in the
research notes (``consent-disclosure.md`` section 2.4) and that this module reproduces is:

* root: self-signed, ``BasicConstraints(CA=true, pathlen=1)`` critical, ``KeyUsage``
  keyCertSign + cRLSign critical, ``SubjectKeyIdentifier``;
* intermediate: as the root but ``pathlen=0``, signed by the root, with an
  ``AuthorityKeyIdentifier``;
* leaf: ``CA=false`` critical, ``KeyUsage`` digitalSignature critical, ``ExtendedKeyUsage``
  emailProtection + documentSigning (a leaf without a C2PA-accepted EKU is rejected at sign
  time with "the certificate is invalid"), SKI **and** AKI.

The signer is handed ``chain.pem`` (leaf first, then the intermediate, root excluded) and
verifiers pin ``root.pem`` as their trust anchor. Without that anchor a manifest is still
cryptographically *valid* but reported ``signingCredential.untrusted``; public viewers only
trust CAs on the official C2PA Trust List, so production deployments buy a leaf from such a CA
and use :meth:`SigningCredentials.load` on its files instead.

The CA private keys are deliberately not written anywhere: nobody (including a thief of the
credentials directory) can mint further leaves under this root. Generate a new directory when
the leaf expires and re-distribute its ``root.pem``.
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..errors import ConfigError

__all__ = [
    "CHAIN_FILE",
    "KEY_FILE",
    "ROOT_FILE",
    "SigningAlgorithm",
    "SigningCredentials",
    "demo_signing_credentials",
    "generate_signing_credentials",
]

SigningAlgorithm = Literal["ed25519", "es256"]

#: File names inside a credentials directory (``avatarkit disclosure keygen`` output).
ROOT_FILE = "root.pem"
CHAIN_FILE = "chain.pem"
KEY_FILE = "signer.key"

#: ``id-kp-documentSigning`` (RFC 9336). Added next to emailProtection because it names the
#: purpose; on its own c2pa-rs 0.91.3 rejects the leaf, so emailProtection must stay.
_DOCUMENT_SIGNING = x509.ObjectIdentifier("1.3.6.1.5.5.7.3.36")

_CAPrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class SigningCredentials:
    """Where a C2PA signer's certificate chain and private key live.

    Only paths are held, never key material, so the object can be logged, put in configs and
    shown in reprs without leaking the key; :func:`~avatarkit.disclosure.c2pa.sign_mp4` reads
    the key at signing time. ``root_pem_path`` is the trust anchor verifiers pin (``None`` for
    a chain bought from a public CA, where verifiers use the C2PA Trust List instead).
    """

    chain_pem_path: Path
    key_path: Path
    root_pem_path: Path | None
    algorithm: SigningAlgorithm

    @classmethod
    def load(cls, out_dir: Path) -> SigningCredentials:
        """Open a directory written by :func:`generate_signing_credentials` (or laid out the
        same way). The algorithm is read from the key itself, so a directory cannot claim one
        algorithm and hold a key of another.

        Raises:
            ConfigError(field="credentials"): a file is missing or the key is not an Ed25519
                or P-256 PKCS#8 PEM key.
        """
        out_dir = Path(out_dir)
        chain = out_dir / CHAIN_FILE
        key = out_dir / KEY_FILE
        root = out_dir / ROOT_FILE
        for required in (chain, key):
            if not required.is_file():
                raise ConfigError(f"{required} does not exist (run `avatarkit disclosure "
                                  "keygen` to create signing credentials)", field="credentials")
        algorithm = _algorithm_of(_read_private_key(key))
        return cls(chain_pem_path=chain, key_path=key,
                   root_pem_path=root if root.is_file() else None, algorithm=algorithm)

    def read_chain_pem(self) -> bytes:
        """The PEM chain (leaf first) exactly as the signer needs it."""
        try:
            return self.chain_pem_path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read {self.chain_pem_path}: {exc}",
                              field="credentials") from exc

    def read_signer_material(self) -> tuple[bytes, bytes]:
        """The ``(chain_pem, key_pem)`` pair a C2PA signer needs, checked first.

        c2pa-rs reports a mismatched key only as "the signature does not match" after doing
        the work, and an expired leaf not at all until validation; checking here turns both
        into a :class:`ConfigError` that says what to fix. The certificate *profile* (EKU,
        key usage, AKI) is left to c2pa-rs, which is the authority on what it accepts.

        Raises:
            ConfigError(field="credentials"): unreadable files, no certificate, a key of
                another algorithm than ``algorithm``, a key that is not the leaf's, or a leaf
                outside its validity period.
        """
        chain_pem = self.read_chain_pem()
        try:
            chain = x509.load_pem_x509_certificates(chain_pem)
        except ValueError as exc:
            raise ConfigError(f"{self.chain_pem_path} is not a PEM certificate chain",
                              field="credentials") from exc
        key = _read_private_key(self.key_path)
        if _algorithm_of(key) != self.algorithm:
            raise ConfigError(f"{self.key_path} is an {_algorithm_of(key)} key but the "
                              f"credentials say {self.algorithm}", field="credentials")
        leaf = chain[0]
        raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        if leaf.public_key().public_bytes(*raw) != key.public_key().public_bytes(*raw):
            raise ConfigError(f"{self.key_path} is not the private key of the first "
                              f"certificate in {self.chain_pem_path} (the chain must start "
                              "with the signing leaf)", field="credentials")
        now = dt.datetime.now(dt.UTC)
        if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
            raise ConfigError(
                f"the signing certificate is valid from {leaf.not_valid_before_utc:%Y-%m-%d} "
                f"to {leaf.not_valid_after_utc:%Y-%m-%d}, not now; generate new credentials",
                field="credentials")
        return chain_pem, key.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption())

    def read_root_pem(self) -> str | None:
        """The trust-anchor PEM, for :func:`~avatarkit.disclosure.c2pa.read_manifest`."""
        if self.root_pem_path is None:
            return None
        try:
            return self.root_pem_path.read_text("ascii")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read {self.root_pem_path}: {exc}",
                              field="credentials") from exc


def generate_signing_credentials(
    out_dir: Path,
    *,
    common_name: str = "avatarkit test signer",
    algorithm: SigningAlgorithm = "ed25519",
    days: int = 365,
    overwrite: bool = False,
) -> SigningCredentials:
    """Create a root CA, an intermediate and a C2PA signing leaf in ``out_dir``, offline.

    Writes ``root.pem`` (the trust anchor to give verifiers), ``chain.pem`` (leaf then
    intermediate: what the signer embeds in every manifest) and ``signer.key`` (the leaf's
    PKCS#8 PEM private key, mode ``0o600``). ``days`` is the validity of every certificate;
    without an RFC 3161 time-stamp a manifest stops validating once the leaf expires, so keep
    it short and re-sign/rotate rather than issuing decade-long leaves.

    An existing ``signer.key`` is never replaced unless ``overwrite=True``: silently swapping
    the key would orphan every manifest verifiers already anchored on the old root.

    Raises:
        ConfigError: ``field="days"`` outside 1..3650, ``"common_name"`` empty,
            ``"algorithm"`` unknown, ``"out_dir"`` when credentials already exist there.
    """
    if algorithm not in ("ed25519", "es256"):
        raise ConfigError(f"unsupported algorithm {algorithm!r} (ed25519 or es256)",
                          field="algorithm")
    if not 1 <= days <= 3650:
        raise ConfigError(f"must be between 1 and 3650, got {days}", field="days")
    if not common_name.strip():
        raise ConfigError("must not be empty", field="common_name")
    out_dir = Path(out_dir)
    if (out_dir / KEY_FILE).exists() and not overwrite:
        raise ConfigError(f"{out_dir / KEY_FILE} already exists (pass overwrite=True to "
                          "replace it and invalidate the old trust anchor)", field="out_dir")
    out_dir.mkdir(parents=True, exist_ok=True)

    # Back-date a little so a verifier whose clock lags ours does not see "not yet valid".
    not_before = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    not_after = not_before + dt.timedelta(days=days)

    root_key = _new_key(algorithm)
    root_name = _name(f"{common_name} root CA")
    root_cert = _ca_certificate(root_name, root_key, root_name, root_key, path_length=1,
                                not_before=not_before, not_after=not_after)

    inter_key = _new_key(algorithm)
    inter_name = _name(f"{common_name} intermediate CA")
    inter_cert = _ca_certificate(inter_name, inter_key, root_name, root_key, path_length=0,
                                 not_before=not_before, not_after=not_after,
                                 issuer_cert=root_cert)

    leaf_key = _new_key(algorithm)
    leaf_cert = _leaf_certificate(_name(common_name), leaf_key, inter_cert, inter_key,
                                  not_before=not_before, not_after=not_after)

    pem = serialization.Encoding.PEM
    _atomic_write(out_dir / KEY_FILE, leaf_key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), mode=0o600)
    _atomic_write(out_dir / CHAIN_FILE,
                  leaf_cert.public_bytes(pem) + inter_cert.public_bytes(pem), mode=0o644)
    _atomic_write(out_dir / ROOT_FILE, root_cert.public_bytes(pem), mode=0o644)
    return SigningCredentials(chain_pem_path=out_dir / CHAIN_FILE, key_path=out_dir / KEY_FILE,
                              root_pem_path=out_dir / ROOT_FILE, algorithm=algorithm)


def _new_key(algorithm: SigningAlgorithm) -> _CAPrivateKey:
    if algorithm == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    return ec.generate_private_key(ec.SECP256R1())


def _hash_for(key: _CAPrivateKey) -> hashes.SHA256 | None:
    # Ed25519 signs the message itself; passing a digest is an error in cryptography.
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def _name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "avatarkit"),
    ])


def _ca_certificate(
    subject: x509.Name,
    subject_key: _CAPrivateKey,
    issuer: x509.Name,
    issuer_key: _CAPrivateKey,
    *,
    path_length: int,
    not_before: dt.datetime,
    not_after: dt.datetime,
    issuer_cert: x509.Certificate | None = None,
) -> x509.Certificate:
    public = subject_key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
    )
    if issuer_cert is not None:
        builder = builder.add_extension(_aki(issuer_cert), critical=False)
    return builder.sign(issuer_key, _hash_for(issuer_key))


def _leaf_certificate(
    subject: x509.Name,
    leaf_key: _CAPrivateKey,
    issuer_cert: x509.Certificate,
    issuer_key: _CAPrivateKey,
    *,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.Certificate:
    public = leaf_key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION,
                                              _DOCUMENT_SIGNING]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(_aki(issuer_cert), critical=False)
        .sign(issuer_key, _hash_for(issuer_key))
    )


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign,
        crl_sign=cert_sign, encipher_only=False, decipher_only=False)


def _aki(issuer_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _atomic_write(path: Path, data: bytes, *, mode: int) -> None:
    """Write through a temp file created with ``mode`` from the start (so the key is never
    world-readable, not even for an instant or under a permissive umask), then rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_private_key(path: Path) -> _CAPrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        # The exception text never includes key bytes; keep it for the operator.
        raise ConfigError(f"{path} is not a readable unencrypted PEM private key "
                          f"({type(exc).__name__})", field="credentials") from exc
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    raise ConfigError(f"{path} holds a {type(key).__name__}; only Ed25519 and P-256 (ES256) "
                      "keys are supported", field="credentials")


def _algorithm_of(key: _CAPrivateKey) -> SigningAlgorithm:
    return "ed25519" if isinstance(key, ed25519.Ed25519PrivateKey) else "es256"


def demo_signing_credentials(directory: Path | None = None) -> SigningCredentials:
    """Offline test-CA signing credentials for demos (``avatarkit demo``, ``render
    --demo-consent``): made once in ``directory`` (default ``demo-signer`` in the state
    directory) and reused while valid, so a verifier can keep pinning the same ``root.pem``.
    Never use them for media that leaves your machine: anyone can make such a CA."""
    from ..config import default_state_dir

    where = Path(directory) if directory is not None else default_state_dir() / "demo-signer"
    try:
        credentials = SigningCredentials.load(where)
        credentials.read_signer_material()  # still valid
        return credentials
    except ConfigError:
        return generate_signing_credentials(where, common_name="avatarkit demo signer",
                                            days=30, overwrite=True)
