"""The ONNX Runtime backend (``musetalk.onnx``) on tiny random networks, CPU provider.

Exports take a few seconds each on two cores, so the built models are module-scoped and
shared; each test that needs a fresh export says why.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

from avatarkit.errors import ConfigError
from avatarkit.local_engine.musetalk import onnx as ort_backend
from avatarkit.local_engine.musetalk.configs import MuseTalkConfigs
from avatarkit.local_engine.musetalk.networks import (
    FaceDecoder,
    UNetAtZero,
    build_unet,
    build_vae,
)
from avatarkit.local_engine.musetalk.onnx import (
    DEFAULT_EXTERNAL_DATA_THRESHOLD_BYTES,
    EXPORT_VERSION,
    OnnxModels,
    available_providers,
    export_key,
    export_module,
)

CONFIGS = MuseTalkConfigs.tiny()
AUDIO_DIM = CONFIGS.audio_dim
BATCH = 2
FINGERPRINT = "tiny-seed-0"
CPU = "CPUExecutionProvider"


@dataclass
class Nets:
    unet: UNetAtZero
    vae: AutoencoderKL


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


def _inputs(batch: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 8, 32, 32, generator=generator)
    audio = torch.randn(batch, 50, AUDIO_DIM, generator=generator)
    return latents, audio


@pytest.fixture(scope="module")
def nets() -> Nets:
    torch.manual_seed(0)
    unet = UNetAtZero(build_unet(CONFIGS.unet))
    return Nets(unet, build_vae(CONFIGS.vae))


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx-cache")


def _build(nets: Nets, cache: Path, *, rows: Literal["full", "lower"] = "full",
           batch: int = BATCH, fingerprint: str = FINGERPRINT,
           external_data_threshold_bytes: int = DEFAULT_EXTERNAL_DATA_THRESHOLD_BYTES,
           ) -> OnnxModels:
    return OnnxModels.build(nets.unet, FaceDecoder(nets.vae, rows=rows), batch_size=batch,
                            audio_dim=AUDIO_DIM, cache_dir=cache, fingerprint=fingerprint,
                            providers=[CPU],
                            external_data_threshold_bytes=external_data_threshold_bytes)


@dataclass
class Built:
    models: OnnxModels
    seconds: float


@pytest.fixture(scope="module")
def full_build(nets: Nets, cache_root: Path) -> Iterator[Built]:
    start = time.perf_counter()
    models = _build(nets, cache_root)
    yield Built(models, time.perf_counter() - start)
    models.close()


@pytest.fixture(scope="module")
def full_models(full_build: Built) -> OnnxModels:
    return full_build.models


@pytest.fixture(scope="module")
def lower_models(nets: Nets, cache_root: Path) -> Iterator[OnnxModels]:
    models = _build(nets, cache_root, rows="lower")
    yield models
    models.close()


def _file_stats(directory: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in directory.iterdir()}


# ----------------------------------------------------------------------------- parity


def test_unet_matches_torch(nets: Nets, full_models: OnnxModels) -> None:
    latents, audio = _inputs(BATCH)
    with torch.no_grad():
        want = nets.unet(latents, audio)
    got = full_models.unet(latents, audio)
    assert got.shape == (BATCH, 4, 32, 32) and got.dtype == torch.float32
    assert _relative_error(got, want) <= 1e-3
    assert full_models.providers == (CPU,)
    assert full_models.exported and full_models.batch_size == BATCH


@pytest.mark.parametrize("rows", ["full", "lower"])
def test_decoder_matches_torch(nets: Nets, request: pytest.FixtureRequest,
                               rows: Literal["full", "lower"]) -> None:
    models: OnnxModels = request.getfixturevalue(f"{rows}_models")
    decoder = FaceDecoder(nets.vae, rows=rows)
    latents = _inputs(BATCH, seed=2)[0][:, :4]
    with torch.no_grad():
        want = decoder(latents)
    got = models.decode(latents)
    assert got.shape == (BATCH, 3, 256 if rows == "full" else 160, 256)
    assert float(want.std()) > 1e-3  # the reference is not a flat image
    assert _relative_error(got, want) <= 1e-3
    assert float(got.min()) >= 0.0 and float(got.max()) <= 1.0


def test_lower_and_full_exports_are_separate(full_models: OnnxModels,
                                             lower_models: OnnxModels) -> None:
    assert full_models.export_dir != lower_models.export_dir
    assert full_models.export_dir.parent == lower_models.export_dir.parent


def test_other_dtypes_come_back_in_their_dtype(nets: Nets, full_models: OnnxModels) -> None:
    latents, audio = _inputs(BATCH)
    with torch.no_grad():
        want = nets.unet(latents, audio)
    got = full_models.unet(latents.double(), audio.double())
    assert got.dtype == torch.float64 and got.device == latents.device
    assert _relative_error(got.float(), want) <= 1e-3
    half = full_models.decode(latents[:, :4].half())
    assert half.dtype == torch.float16 and half.shape == (BATCH, 3, 256, 256)


# ----------------------------------------------------------------------------- cache


def test_second_build_reuses_the_export(nets: Nets, full_build: Built, cache_root: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    full_models = full_build.models
    before = _file_stats(full_models.export_dir)
    assert set(before) == {"unet.onnx", "decoder.onnx", "export.json"}

    def no_export(*args: object, **kwargs: object) -> list[Path]:
        raise AssertionError("a cached export was exported again")

    monkeypatch.setattr(ort_backend, "export_module", no_export)
    start = time.perf_counter()
    again = _build(nets, cache_root)
    elapsed = time.perf_counter() - start
    try:
        assert not again.exported
        assert again.export_dir == full_models.export_dir
        assert again.unet_path == full_models.unet_path
        assert _file_stats(full_models.export_dir) == before
        # two session loads and no export: a fraction of the first build (about 1/8 on an
        # idle machine; both scale alike on a busy one)
        assert elapsed < 0.5 * full_build.seconds
        latents, audio = _inputs(BATCH, seed=5)
        assert torch.equal(again.unet(latents, audio), full_models.unet(latents, audio))
    finally:
        again.close()


def test_other_batch_size_exports_anew_replacing_a_half_written_dir(
        nets: Nets, full_models: OnnxModels, cache_root: Path) -> None:
    # what a crash could leave at the batch-1 key: the directory, decoder.onnx missing
    key = export_key(fingerprint=FINGERPRINT, batch_size=1, audio_dim=AUDIO_DIM, rows=256,
                     first_row=0, precision="fp32", opset=17)
    broken = cache_root / "onnx" / key
    shutil.copytree(full_models.export_dir, broken)
    (broken / "decoder.onnx").unlink()
    stale_unet = (broken / "unet.onnx").stat().st_ino

    single = _build(nets, cache_root, batch=1)
    try:
        assert single.exported and single.batch_size == 1
        assert single.export_dir == broken != full_models.export_dir
        assert (broken / "decoder.onnx").is_file()
        assert (broken / "unet.onnx").stat().st_ino != stale_unet  # nothing kept from it
        manifest = json.loads((broken / "export.json").read_text())
        assert manifest["batch_size"] == 1 and manifest["export_version"] == EXPORT_VERSION
        latents, audio = _inputs(1, seed=3)
        with torch.no_grad():
            want_unet = nets.unet(latents, audio)
            want_faces = FaceDecoder(nets.vae)(latents[:, :4])
        assert _relative_error(single.unet(latents, audio), want_unet) <= 1e-3
        assert _relative_error(single.decode(latents[:, :4]), want_faces) <= 1e-3
        with pytest.raises(ValueError, match="batch_size=1 rows, got 2"):
            single.unet(*_inputs(BATCH))
        # no temporary or discarded directories are left behind
        assert [p.name for p in broken.parent.iterdir() if p.name.startswith(".")] == []
    finally:
        single.close()


def test_export_key_covers_every_input() -> None:
    base: dict[str, object] = dict(fingerprint="w", batch_size=4, audio_dim=384, rows=256,
                                   first_row=0, precision="fp32", opset=17)
    reference = export_key(**base)  # type: ignore[arg-type]
    assert reference == export_key(**base)  # type: ignore[arg-type]
    assert len(reference) == 64 and int(reference, 16) >= 0
    changes: dict[str, object] = dict(fingerprint="v", batch_size=8, audio_dim=48, rows=160,
                                      first_row=96, precision="fp16", opset=18)
    keys = {export_key(**{**base, name: value})  # type: ignore[arg-type]
            for name, value in changes.items()}
    assert len(keys) == len(changes) and reference not in keys


# ----------------------------------------------------------------------------- external data


@pytest.fixture(scope="module")
def external_models(nets: Nets, cache_root: Path) -> Iterator[OnnxModels]:
    # a threshold of 0 bytes forces what the 3.4 GB fp32 UNet needs
    models = _build(nets, cache_root, fingerprint="external", external_data_threshold_bytes=0)
    yield models
    models.close()


def test_other_fingerprint_exports_anew_with_external_data(nets: Nets, full_models: OnnxModels,
                                            external_models: OnnxModels) -> None:
    directory = external_models.export_dir
    assert external_models.exported and directory != full_models.export_dir
    assert sorted(p.name for p in directory.iterdir()) == [
        "decoder.onnx", "decoder.onnx.data", "export.json", "unet.onnx", "unet.onnx.data"]
    # the weights left the graph file: it is now far smaller than the inline export
    inline = full_models.unet_path.stat().st_size
    assert external_models.unet_path.stat().st_size < inline / 10
    assert (directory / "unet.onnx.data").stat().st_size > inline * 0.9
    manifest = json.loads((directory / "export.json").read_text())
    assert set(manifest["files"]) == {"unet.onnx", "unet.onnx.data", "decoder.onnx",
                                      "decoder.onnx.data"}

    latents, audio = _inputs(BATCH, seed=6)
    with torch.no_grad():
        want_unet = nets.unet(latents, audio)
        want_faces = FaceDecoder(nets.vae)(latents[:, :4])
    assert _relative_error(external_models.unet(latents, audio), want_unet) <= 1e-3
    assert _relative_error(external_models.decode(latents[:, :4]), want_faces) <= 1e-3


def test_missing_data_file_means_incomplete(nets: Nets, external_models: OnnxModels,
                                            cache_root: Path) -> None:
    fingerprint = "external-truncated"
    key = export_key(fingerprint=fingerprint, batch_size=BATCH, audio_dim=AUDIO_DIM, rows=256,
                     first_row=0, precision="fp32", opset=17)
    broken = cache_root / "onnx" / key
    shutil.copytree(external_models.export_dir, broken)
    with (broken / "unet.onnx.data").open("r+b") as handle:
        handle.truncate(100)
    assert not ort_backend._is_complete(broken)
    assert ort_backend._is_complete(external_models.export_dir)


# ----------------------------------------------------------------------------- fp16


def test_fp16_export_keeps_fp32_io(nets: Nets, tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    decoder = FaceDecoder(nets.vae, rows="lower")
    latents = _inputs(BATCH, seed=7)[0][:, :4]
    path = tmp_path / "decoder16.onnx"
    files = export_module(decoder, {"latents": latents}, path, output_name="faces",
                          precision="fp16")
    assert files == [path]
    model = onnx.load(str(path))
    float32, float16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [float32]
    assert [o.type.tensor_type.elem_type for o in model.graph.output] == [float32]
    weights = [t for t in model.graph.initializer if len(t.dims) > 1]
    assert weights and all(t.data_type == float16 for t in weights)
    # the torch module itself stays float32
    assert all(p.dtype == torch.float32 for p in decoder.parameters())

    # ONNX Runtime's CPU provider happens to run this graph: it is half-precision accurate
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=[CPU])
    got = torch.from_numpy(session.run(None, {"latents": latents.numpy()})[0])
    with torch.no_grad():
        want = decoder(latents)
    assert got.dtype == torch.float32
    assert 1e-6 < _relative_error(got, want) <= 2e-2


def test_fp16_on_cpu_is_refused(nets: Nets, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        OnnxModels.build(nets.unet, FaceDecoder(nets.vae), batch_size=BATCH,
                         audio_dim=AUDIO_DIM, cache_dir=tmp_path, fingerprint=FINGERPRINT,
                         providers=[CPU], precision="fp16")
    assert info.value.field == "precision"
    assert "fp32" in str(info.value) and CPU in str(info.value)
    assert not (tmp_path / "onnx").exists() or not any((tmp_path / "onnx").iterdir())


# ----------------------------------------------------------------------------- errors


def test_wrong_batch_is_a_value_error(full_models: OnnxModels) -> None:
    latents, audio = _inputs(3)
    with pytest.raises(ValueError, match=r"batch_size=2 rows, got 3"):
        full_models.unet(latents, audio)
    with pytest.raises(ValueError, match=r"batch_size=2 rows, got 3"):
        full_models.decode(latents[:, :4])
    latents, audio = _inputs(BATCH)
    with pytest.raises(ValueError, match=r"audio: expected shape \[2, 50, 48\], got"):
        full_models.unet(latents, audio[:, :40])
    with pytest.raises(ValueError, match="floating-point"):
        full_models.decode(latents[:, :4].to(torch.int32))


def test_unavailable_provider_names_field_and_choices(nets: Nets, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        OnnxModels.build(nets.unet, FaceDecoder(nets.vae), batch_size=BATCH,
                         audio_dim=AUDIO_DIM, cache_dir=tmp_path, fingerprint=FINGERPRINT,
                         providers=["CUDAExecutionProvider", CPU])
    message = str(info.value)
    assert info.value.field == "onnx_providers"
    assert message.startswith("onnx_providers: CUDAExecutionProvider not available")
    for name in available_providers():
        assert name in message.split("available:")[1]
    assert "onnxruntime-gpu" in message
    assert not (tmp_path / "onnx").exists() or not any((tmp_path / "onnx").iterdir())


def test_auto_prefers_tensorrt_then_cuda_then_cpu() -> None:
    resolve = ort_backend._resolve_providers
    everything = [CPU, "AzureExecutionProvider", "CUDAExecutionProvider",
                  "TensorrtExecutionProvider"]
    assert resolve("auto", everything) == ("TensorrtExecutionProvider",
                                           "CUDAExecutionProvider", CPU)
    assert resolve("auto", ["AzureExecutionProvider", CPU]) == (CPU,)
    assert resolve(CPU, everything) == (CPU,)  # a single name is not split into letters
    with pytest.raises(ConfigError, match="onnx_providers: 'auto' found none"):
        resolve("auto", ["AzureExecutionProvider"])
    with pytest.raises(ConfigError, match="at least one provider"):
        resolve([], everything)


def test_bad_arguments_are_config_errors(nets: Nets, tmp_path: Path) -> None:
    cases: list[tuple[dict[str, object], str]] = [
        ({"audio_dim": AUDIO_DIM + 1}, "audio_dim"),
        ({"batch_size": 0}, "batch_size"),
        ({"opset": 11}, "onnx_opset"),
        ({"fingerprint": ""}, "fingerprint"),
    ]
    for override, field in cases:
        kwargs: dict[str, object] = dict(batch_size=BATCH, audio_dim=AUDIO_DIM,
                                         cache_dir=tmp_path, fingerprint=FINGERPRINT,
                                         providers=[CPU])
        kwargs.update(override)
        with pytest.raises(ConfigError) as info:
            OnnxModels.build(nets.unet, FaceDecoder(nets.vae), **kwargs)  # type: ignore[arg-type]
        assert info.value.field == field


def test_missing_onnxruntime_says_how_to_install(nets: Nets, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes the import fail
    with pytest.raises(ConfigError) as info:
        available_providers()
    assert info.value.field == "backend" and "pip install avatarkit[local]" in str(info.value)
    with pytest.raises(ConfigError) as info:
        OnnxModels.build(nets.unet, FaceDecoder(nets.vae), batch_size=BATCH,
                         audio_dim=AUDIO_DIM, cache_dir=tmp_path, fingerprint=FINGERPRINT)
    assert info.value.field == "backend"


def test_close_is_idempotent(nets: Nets, full_models: OnnxModels, cache_root: Path) -> None:
    models = _build(nets, cache_root)  # reuses the cached export
    assert not models.exported and not models.closed
    latents = _inputs(BATCH)[0][:, :4]
    assert models.decode(latents).shape == (BATCH, 3, 256, 256)
    models.close()
    models.close()
    assert models.closed
    with pytest.raises(RuntimeError, match="closed"):
        models.decode(latents)
    # the shared instance is unaffected
    assert np.isfinite(full_models.decode(latents).numpy()).all()
