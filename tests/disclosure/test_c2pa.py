"""C2PA signing of produced MP4s and the offline test CA behind it.

Every claim is checked against the real c2pa-rs validator (c2pa-python 0.38.1): a signed
clip reads back valid, trusted only with our root pinned, carries the AI-disclosure,
soft-binding, training-mining and consent assertions, and turns invalid when one media byte
changes. The MP4 inputs are made here with PyAV (H.264 + AAC), like the SDK's own output.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import av
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from avatarkit.disclosure.c2pa import (
    TRAINED_ALGORITHMIC_MEDIA,
    UNREADABLE_CODE,
    ConsentAssertion,
    SoftBinding,
    read_manifest,
    sign_mp4,
)
from avatarkit.disclosure.certs import (
    CHAIN_FILE,
    KEY_FILE,
    ROOT_FILE,
    SigningAlgorithm,
    SigningCredentials,
    generate_signing_credentials,
)
from avatarkit.errors import ConfigError, MediaFormatError

WATERMARK_ALG = "com.avatarkit.dwtqim.1"
PAYLOAD = bytes.fromhex("0123456789abcdef")
GEN_ID = "gen_01J9Z8Q4T7"
DOCUMENT_SIGNING = x509.ObjectIdentifier("1.3.6.1.5.5.7.3.36")


def make_mp4(path: Path, *, seconds: int = 2, size: int = 256, fps: int = 25) -> Path:
    """A short H.264 (yuv420p) + AAC MP4, the shape of what the SDK records."""
    with av.open(str(path), "w", format="mp4") as container:
        video = container.add_stream("libx264", rate=fps)
        video.width = size
        video.height = size
        video.pix_fmt = "yuv420p"
        audio = container.add_stream("aac", rate=48_000)
        audio.layout = "mono"
        for i in range(seconds * fps):
            image = np.zeros((size, size, 3), np.uint8)
            image[:, :, 0] = (i * 5) % 256
            image[i % size, :, 1] = 255
            for packet in video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for start in range(0, seconds * 48_000, 1024):
            tone = 0.1 * np.sin(np.arange(start, start + 1024) * 2 * np.pi * 440 / 48_000)
            frame = av.AudioFrame.from_ndarray(tone.astype(np.float32)[None, :],
                                               format="fltp", layout="mono")
            frame.sample_rate = 48_000
            frame.pts = start
            for packet in audio.encode(frame):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        for packet in audio.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_mp4(tmp_path_factory.mktemp("clip") / "clip.mp4")


@pytest.fixture(scope="module", params=["ed25519", "es256"])
def creds(request: pytest.FixtureRequest,
          tmp_path_factory: pytest.TempPathFactory) -> SigningCredentials:
    algorithm: SigningAlgorithm = request.param
    return generate_signing_credentials(tmp_path_factory.mktemp(f"creds-{algorithm}"),
                                        algorithm=algorithm, days=30)


@pytest.fixture(scope="module")
def ed_creds(tmp_path_factory: pytest.TempPathFactory) -> SigningCredentials:
    return generate_signing_credentials(tmp_path_factory.mktemp("creds-ed"))


@pytest.fixture
def src(clip: Path, tmp_path: Path) -> Path:
    return Path(shutil.copy(clip, tmp_path / "render.mp4"))


def consent() -> ConsentAssertion:
    return ConsentAssertion(
        consent_id="cns_01J9Z8Q4T7XYZ", issuer="https://consent.example.com",
        token_sha256="a" * 64, record_hash="b" * 64,
        status_uri="https://consent.example.com/status/1", status_idx=42,
        purpose="support", channel="recorded", generation_id=GEN_ID)


def sign(src: Path, dst: Path, creds: SigningCredentials, *,
         watermark: bool = True) -> tuple[Path, str]:
    signed = sign_mp4(src, dst, credentials=creds, generation_id=GEN_ID, provider="local",
                      avatar="amelia", watermark_alg=WATERMARK_ALG if watermark else None,
                      watermark_payload=PAYLOAD if watermark else None, consent=consent())
    return signed.path, signed.manifest_label


def root_pem(creds: SigningCredentials) -> str:
    pem = creds.read_root_pem()
    assert pem is not None
    return pem


# -- sign / read -------------------------------------------------------------------------


def test_signed_clip_is_trusted_with_our_root(src: Path, tmp_path: Path,
                                              creds: SigningCredentials) -> None:
    signed = sign_mp4(src, tmp_path / "out.mp4", credentials=creds, generation_id=GEN_ID,
                      provider="local", avatar="amelia", watermark_alg=WATERMARK_ALG,
                      watermark_payload=PAYLOAD, consent=consent())
    assert signed.path == tmp_path / "out.mp4"
    data = signed.path.read_bytes()
    assert signed.sha256 == hashlib.sha256(data).hexdigest()
    assert signed.size == len(data)
    assert signed.manifest_label.startswith("urn:c2pa:")

    report = read_manifest(signed.path, trust_anchors_pem=root_pem(creds))
    assert report.present and report.state == "trusted" and report.trusted
    assert report.validation_codes == ()
    assert report.manifest_label == signed.manifest_label


def test_without_anchor_it_is_valid_but_untrusted(src: Path, tmp_path: Path,
                                                  ed_creds: SigningCredentials) -> None:
    out, _ = sign(src, tmp_path / "out.mp4", ed_creds)
    report = read_manifest(out)
    assert report.present and report.state == "valid" and not report.trusted
    assert "signingCredential.untrusted" in report.validation_codes


def test_another_root_does_not_make_it_trusted(src: Path, tmp_path: Path,
                                               ed_creds: SigningCredentials) -> None:
    out, _ = sign(src, tmp_path / "out.mp4", ed_creds)
    stranger = generate_signing_credentials(tmp_path / "other")
    report = read_manifest(out, trust_anchors_pem=root_pem(stranger))
    assert report.state == "valid"
    assert "signingCredential.untrusted" in report.validation_codes


def test_assertions_round_trip(src: Path, tmp_path: Path, ed_creds: SigningCredentials) -> None:
    out, _ = sign(src, tmp_path / "out.mp4", ed_creds)
    report = read_manifest(out, trust_anchors_pem=root_pem(ed_creds))
    assert report.digital_source_type == TRAINED_ALGORITHMIC_MEDIA
    assert report.software_agent is not None and report.software_agent.startswith("avatarkit/")
    assert report.generation_id == GEN_ID
    assert (report.provider, report.avatar) == ("local", "amelia")
    assert report.consent == consent()
    assert report.soft_binding == SoftBinding(WATERMARK_ALG, PAYLOAD)
    assert report.training_mining == {
        "cawg.ai_training": "notAllowed", "cawg.ai_generative_training": "notAllowed",
        "cawg.data_mining": "notAllowed", "cawg.ai_inference": "notAllowed"}

    assert report.raw_json is not None
    store = json.loads(report.raw_json)
    manifest = store["manifests"][store["active_manifest"]]
    actions = next(a["data"]["actions"] for a in manifest["assertions"]
                   if a["label"] == "c2pa.actions.v2")
    assert actions[0]["action"] == "c2pa.created"
    assert actions[0]["digitalSourceType"] == TRAINED_ALGORITHMIC_MEDIA
    assert [a["action"] for a in actions] == ["c2pa.created", "c2pa.watermarked.bound"]
    consent_data = next(a["data"] for a in manifest["assertions"]
                        if a["label"] == "com.avatarkit.consent")
    assert set(consent_data) == set(ConsentAssertion.model_fields)  # ids only, nothing extra


def test_without_watermark_there_is_no_soft_binding(src: Path, tmp_path: Path,
                                                    ed_creds: SigningCredentials) -> None:
    out = sign_mp4(src, tmp_path / "out.mp4", credentials=ed_creds, generation_id=GEN_ID,
                   provider="tavus", avatar="amelia", software_agent="render-engine/2.1",
                   watermark_alg=None, watermark_payload=None, consent=None,
                   title="Demo").path
    report = read_manifest(out, trust_anchors_pem=root_pem(ed_creds))
    assert report.state == "trusted"
    assert report.soft_binding is None and report.consent is None
    assert report.generation_id == GEN_ID
    assert report.software_agent == "render-engine/2.1"
    assert report.raw_json is not None and "c2pa.watermarked" not in report.raw_json


def test_flipping_one_mdat_byte_invalidates(src: Path, tmp_path: Path,
                                            ed_creds: SigningCredentials) -> None:
    out, _ = sign(src, tmp_path / "out.mp4", ed_creds)
    data = bytearray(out.read_bytes())
    mdat = data.index(b"mdat")
    data[mdat + 200] ^= 0x01
    out.write_bytes(bytes(data))
    report = read_manifest(out, trust_anchors_pem=root_pem(ed_creds))
    assert report.present and report.state == "invalid" and not report.trusted
    assert "assertion.bmffHash.mismatch" in report.validation_codes
    assert report.generation_id == GEN_ID  # the claims are still readable as evidence


def test_corrupted_manifest_is_invalid_not_an_exception(src: Path, tmp_path: Path,
                                                        ed_creds: SigningCredentials) -> None:
    out, _ = sign(src, tmp_path / "out.mp4", ed_creds)
    data = bytearray(out.read_bytes())
    jumb = data.index(b"jumb")
    data[jumb + 20:jumb + 60] = b"\xff" * 40
    out.write_bytes(bytes(data))
    report = read_manifest(out)
    assert report.present and report.state == "invalid"
    assert report.validation_codes == (UNREADABLE_CODE,)
    assert report.error


def test_unsigned_file_reports_absent(clip: Path) -> None:
    report = read_manifest(clip)
    assert not report.present and report.state == "absent" and not report.trusted
    assert report.validation_codes == () and report.consent is None


def test_sign_in_place(src: Path, ed_creds: SigningCredentials) -> None:
    mode = stat.S_IMODE(src.stat().st_mode)
    out, _ = sign(src, src, ed_creds)
    assert out == src
    assert read_manifest(src, trust_anchors_pem=root_pem(ed_creds)).state == "trusted"
    assert stat.S_IMODE(src.stat().st_mode) == mode
    assert [p.name for p in src.parent.iterdir()] == [src.name]


def test_already_signed_input_is_refused(src: Path, tmp_path: Path,
                                         ed_creds: SigningCredentials) -> None:
    out, _ = sign(src, tmp_path / "once.mp4", ed_creds)
    with pytest.raises(MediaFormatError) as info:
        sign(out, tmp_path / "twice.mp4", ed_creds)
    assert info.value.field == "src"
    assert not (tmp_path / "twice.mp4").exists()


# -- bad input ---------------------------------------------------------------------------


def test_missing_and_non_mp4_sources(tmp_path: Path, clip: Path,
                                     ed_creds: SigningCredentials) -> None:
    text = tmp_path / "notes.mp4"
    text.write_text("not a video at all, just text long enough to have a header")
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(clip.read_bytes()[: clip.stat().st_size // 2])
    only_ftyp = tmp_path / "ftyp.mp4"
    only_ftyp.write_bytes(clip.read_bytes()[:32])
    for bad in (tmp_path / "missing.mp4", text, truncated, only_ftyp):
        with pytest.raises(MediaFormatError) as info:
            sign(bad, tmp_path / "out.mp4", ed_creds)
        assert info.value.field == "src", bad
    assert not (tmp_path / "out.mp4").exists()


def test_read_manifest_bad_input(tmp_path: Path, clip: Path) -> None:
    with pytest.raises(MediaFormatError) as info:
        read_manifest(tmp_path / "missing.mp4")
    assert info.value.field == "path"
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(MediaFormatError):
        read_manifest(text)
    with pytest.raises(ConfigError) as cfg:
        read_manifest(clip, trust_anchors_pem="not a certificate")
    assert cfg.value.field == "trust_anchors_pem"


def test_argument_validation(src: Path, tmp_path: Path, ed_creds: SigningCredentials) -> None:
    dst = tmp_path / "out.mp4"
    with pytest.raises(ConfigError) as info:
        sign_mp4(src, dst, credentials=ed_creds, generation_id=GEN_ID, provider="local",
                 avatar="amelia", watermark_alg=WATERMARK_ALG, watermark_payload=None,
                 consent=None)
    assert info.value.field == "watermark_payload"
    with pytest.raises(ConfigError) as info:
        sign_mp4(src, dst, credentials=ed_creds, generation_id=GEN_ID, provider="local",
                 avatar="amelia", watermark_alg=None, watermark_payload=PAYLOAD, consent=None)
    assert info.value.field == "watermark_alg"
    with pytest.raises(ConfigError) as info:
        sign_mp4(src, dst, credentials=ed_creds, generation_id="gen_other", provider="local",
                 avatar="amelia", watermark_alg=None, watermark_payload=None,
                 consent=consent())
    assert info.value.field == "consent.generation_id"
    with pytest.raises(ConfigError) as info:
        sign_mp4(src, dst, credentials=ed_creds, generation_id=" ", provider="local",
                 avatar="amelia", watermark_alg=None, watermark_payload=None, consent=None)
    assert info.value.field == "generation_id"
    with pytest.raises(ConfigError) as info:
        sign_mp4(src, tmp_path / "no" / "dir.mp4", credentials=ed_creds,
                 generation_id=GEN_ID, provider="local", avatar="amelia",
                 watermark_alg=None, watermark_payload=None, consent=None)
    assert info.value.field == "dst"
    assert not dst.exists()


def test_consent_assertion_validation() -> None:
    with pytest.raises(ValueError, match="status_uri and status_idx"):
        ConsentAssertion.model_validate({**consent().model_dump(), "status_idx": None})
    with pytest.raises(ValueError, match="token_sha256"):
        ConsentAssertion.model_validate({**consent().model_dump(), "token_sha256": "abc"})
    with pytest.raises(ValueError, match="display_name"):
        ConsentAssertion.model_validate({**consent().model_dump(), "display_name": "Amelia"})


# -- credentials -------------------------------------------------------------------------


def _ext(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> x509.Extension[
        x509.ExtensionType]:
    return cert.extensions.get_extension_for_class(kind)


def test_generated_chain_follows_the_c2pa_profile(creds: SigningCredentials) -> None:
    chain = x509.load_pem_x509_certificates(creds.chain_pem_path.read_bytes())
    assert creds.root_pem_path is not None
    (root,) = x509.load_pem_x509_certificates(creds.root_pem_path.read_bytes())
    assert len(chain) == 2  # leaf, intermediate; the root stays out of the chain
    leaf, inter = chain
    leaf.verify_directly_issued_by(inter)
    inter.verify_directly_issued_by(root)
    root.verify_directly_issued_by(root)

    for ca, pathlen in ((root, 1), (inter, 0)):
        bc = _ext(ca, x509.BasicConstraints)
        assert bc.critical and isinstance(bc.value, x509.BasicConstraints)
        assert bc.value.ca and bc.value.path_length == pathlen
        ku = _ext(ca, x509.KeyUsage)
        assert ku.critical and isinstance(ku.value, x509.KeyUsage)
        assert ku.value.key_cert_sign and ku.value.crl_sign and not ku.value.digital_signature
        _ext(ca, x509.SubjectKeyIdentifier)
    _ext(inter, x509.AuthorityKeyIdentifier)

    bc = _ext(leaf, x509.BasicConstraints)
    assert bc.critical and isinstance(bc.value, x509.BasicConstraints) and not bc.value.ca
    ku = _ext(leaf, x509.KeyUsage)
    assert ku.critical and isinstance(ku.value, x509.KeyUsage)
    assert ku.value.digital_signature and not ku.value.key_cert_sign
    eku = _ext(leaf, x509.ExtendedKeyUsage).value
    assert isinstance(eku, x509.ExtendedKeyUsage)
    assert ExtendedKeyUsageOID.EMAIL_PROTECTION in eku and DOCUMENT_SIGNING in eku
    ski = _ext(leaf, x509.SubjectKeyIdentifier).value
    aki = _ext(leaf, x509.AuthorityKeyIdentifier).value
    inter_ski = _ext(inter, x509.SubjectKeyIdentifier).value
    assert isinstance(ski, x509.SubjectKeyIdentifier)
    assert isinstance(aki, x509.AuthorityKeyIdentifier)
    assert isinstance(inter_ski, x509.SubjectKeyIdentifier)
    assert aki.key_identifier == inter_ski.digest
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc <= dt.timedelta(days=31)
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == (
        "avatarkit test signer")

    key = serialization.load_pem_private_key(creds.key_path.read_bytes(), password=None)
    expected = ed25519.Ed25519PrivateKey if creds.algorithm == "ed25519" else (
        ec.EllipticCurvePrivateKey)
    assert isinstance(key, expected)
    assert b"BEGIN PRIVATE KEY" in creds.key_path.read_bytes()  # PKCS#8
    assert stat.S_IMODE(creds.key_path.stat().st_mode) == 0o600


def test_credentials_load_and_repr(creds: SigningCredentials) -> None:
    loaded = SigningCredentials.load(creds.chain_pem_path.parent)
    assert loaded == creds
    key_text = creds.key_path.read_text()
    body = key_text.splitlines()[1]
    for text in (repr(loaded), str(loaded)):
        assert "PRIVATE" not in text and body not in text
    assert {p.name for p in creds.chain_pem_path.parent.iterdir()} == {
        ROOT_FILE, CHAIN_FILE, KEY_FILE}


def test_keygen_refuses_to_overwrite(tmp_path: Path) -> None:
    first = generate_signing_credentials(tmp_path)
    old_key = first.key_path.read_bytes()
    with pytest.raises(ConfigError) as info:
        generate_signing_credentials(tmp_path)
    assert info.value.field == "out_dir"
    assert first.key_path.read_bytes() == old_key
    second = generate_signing_credentials(tmp_path, overwrite=True, algorithm="es256")
    assert second.key_path.read_bytes() != old_key and second.algorithm == "es256"
    assert stat.S_IMODE(second.key_path.stat().st_mode) == 0o600


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"days": 0}, "days"), ({"days": 5000}, "days"), ({"common_name": " "}, "common_name"),
    ({"algorithm": "rsa"}, "algorithm")])
def test_keygen_argument_validation(tmp_path: Path, kwargs: dict[str, object],
                                    field: str) -> None:
    with pytest.raises(ConfigError) as info:
        generate_signing_credentials(tmp_path, **kwargs)  # type: ignore[arg-type]
    assert info.value.field == field


def test_load_missing_credentials(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        SigningCredentials.load(tmp_path)
    assert info.value.field == "credentials"


def _handmade_chain(directory: Path, *, with_eku: bool) -> SigningCredentials:
    """Root -> leaf built by hand, identical except for the leaf's extended key usage, so a
    test can show that EKU alone decides whether c2pa-rs accepts the leaf."""
    directory.mkdir()
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
    root_key, leaf_key = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
    root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "handmade root")])

    def usage(*, ca: bool) -> x509.KeyUsage:
        return x509.KeyUsage(digital_signature=not ca, content_commitment=False,
                             key_encipherment=False, data_encipherment=False,
                             key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                             encipher_only=False, decipher_only=False)

    root = (x509.CertificateBuilder().subject_name(root_name).issuer_name(root_name)
            .public_key(root_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(usage(ca=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()),
                           critical=False)
            .sign(root_key, None))
    leaf_builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "handmade leaf")]))
        .issuer_name(root_name).public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage(ca=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(leaf_key.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()),
                       critical=False))
    if with_eku:
        leaf_builder = leaf_builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
    leaf = leaf_builder.sign(root_key, None)
    pem = serialization.Encoding.PEM
    (directory / CHAIN_FILE).write_bytes(leaf.public_bytes(pem))
    (directory / ROOT_FILE).write_bytes(root.public_bytes(pem))
    (directory / KEY_FILE).write_bytes(leaf_key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return SigningCredentials.load(directory)


def test_leaf_without_eku_is_rejected_and_leaves_nothing(src: Path, tmp_path: Path) -> None:
    good = _handmade_chain(tmp_path / "good", with_eku=True)
    out, _ = sign(src, tmp_path / "good.mp4", good)
    assert read_manifest(out, trust_anchors_pem=root_pem(good)).state == "trusted"

    bad = _handmade_chain(tmp_path / "bad", with_eku=False)
    dst = tmp_path / "bad.mp4"
    with pytest.raises(ConfigError) as info:
        sign(src, dst, bad)
    assert info.value.field == "credentials"
    # Atomic: no output, no temp file left next to it.
    assert not dst.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    # An existing destination survives a failed sign untouched.
    dst.write_bytes(b"previous render")
    with pytest.raises(ConfigError):
        sign(src, dst, bad)
    assert dst.read_bytes() == b"previous render"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "bad", "bad.mp4", "good", "good.mp4", "render.mp4"]


def test_mismatched_key_is_a_credentials_error(src: Path, tmp_path: Path,
                                               ed_creds: SigningCredentials) -> None:
    other = generate_signing_credentials(tmp_path / "other")
    mixed = SigningCredentials(chain_pem_path=ed_creds.chain_pem_path,
                               key_path=other.key_path, root_pem_path=None,
                               algorithm="ed25519")
    with pytest.raises(ConfigError) as info:
        sign(src, tmp_path / "out.mp4", mixed)
    assert info.value.field == "credentials"
    wrong_alg = SigningCredentials(chain_pem_path=ed_creds.chain_pem_path,
                                   key_path=ed_creds.key_path, root_pem_path=None,
                                   algorithm="es256")
    with pytest.raises(ConfigError):
        sign(src, tmp_path / "out.mp4", wrong_alg)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    with pytest.raises(ConfigError):
        sign(src, tmp_path / "out.mp4", SigningCredentials(
            chain_pem_path=garbage, key_path=ed_creds.key_path, root_pem_path=None,
            algorithm="ed25519"))
    assert not (tmp_path / "out.mp4").exists()


def test_key_file_is_private_even_with_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        creds = generate_signing_credentials(tmp_path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(creds.key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(creds.chain_pem_path.stat().st_mode) == 0o644
