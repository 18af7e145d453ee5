"""The ONNX Runtime backend: MuseTalk's UNet step and face decoder as ONNX Runtime sessions.

The engine runs two networks per frame, :class:`~.networks.UNetAtZero` and
:class:`~.networks.FaceDecoder`. :meth:`OnnxModels.build` exports both with torch's
TorchScript-based exporter (``dynamo=False``: the dynamo exporter needs ``onnxscript``) at a
fixed batch size (static shapes; the engine pads a partial batch) and opens them with
ONNX Runtime. :meth:`OnnxModels.unet` and :meth:`OnnxModels.decode` then take and return
torch tensors like the torch modules do.

Exports are cached under ``cache_dir/onnx/<key>/`` (``unet.onnx``, ``decoder.onnx``, their
``.data`` files when the weights are stored outside the protobuf, and ``export.json``); the
key is a SHA-256 over everything that changes the exported graphs (see :func:`export_key`).
An export is written into a temporary directory next to its final place and renamed into
place only once complete, so a crash never leaves a directory that looks finished; a
directory whose ``export.json`` is missing or does not match the files is exported anew.

_Precision ``"fp16"`` stores the weights and runs the graph in float16 with float32 inputs and
outputs (casts at the boundary). It is meant for the CUDA and TensorRT providers; the CPU
provider runs float32 only and is refused with :class:`~avatarkit.errors.ConfigError`.

Weights larger than ``external_data_threshold_bytes`` (1.5 GB by default; the fp32 UNet is
3.4 GB, over protobuf's 2 GB limit) are written to one ``<name>.onnx.data`` file beside the
graph, which needs the ``onnx`` package.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.jit._trace import TracerWarning

from ...errors import ConfigError
from .configs import FACE_SIZE, LATENT_CHANNELS, LATENT_SIZE
from .networks import FaceDecoder, UNetAtZero

__all__ = [
    "DEFAULT_EXTERNAL_DATA_THRESHOLD_BYTES",
    "EXPORT_VERSION",
    "OnnxModels",
    "available_providers",
    "export_key",
    "export_module",
]

#: bump when the export procedure changes what lands in the files (invalidates every cache)
EXPORT_VERSION = "1"

#: weights above this size are stored outside the ONNX protobuf (which cannot exceed 2 GB)
DEFAULT_EXTERNAL_DATA_THRESHOLD_BYTES = 1_500_000_000

#: the preference order of ``providers="auto"``
_AUTO_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
_GPU_PROVIDERS = frozenset({"TensorrtExecutionProvider", "CUDAExecutionProvider"})
_CPU_PROVIDER = "CPUExecutionProvider"
_MIN_OPSET = 14  # scaled_dot_product_attention has an ONNX symbolic from opset 14 on

_UNET_FILE = "unet.onnx"
_DECODER_FILE = "decoder.onnx"
_MANIFEST_FILE = "export.json"

_Precision = Literal["fp32", "fp16"]


def _onnxruntime() -> ModuleType:
    """The ``onnxruntime`` module, or a :class:`ConfigError` saying how to install it."""
    try:
        return importlib.import_module("onnxruntime")
    except ImportError as exc:
        raise ConfigError(
            "the ONNX backend needs onnxruntime, which is not installed: "
            "`pip install avatarkit[local]` (or onnxruntime-gpu for CUDA/TensorRT)",
            field="backend") from exc


def _onnx() -> ModuleType:
    """The ``onnx`` package (only needed to store weights as external data)."""
    try:
        return importlib.import_module("onnx")
    except ImportError as exc:
        raise ConfigError(
            "storing ONNX weights over the external-data threshold needs the onnx package, "
            "which is not installed: `pip install avatarkit[musetalk]`", field="backend"
        ) from exc


def available_providers() -> tuple[str, ...]:
    """The execution providers this onnxruntime build offers, in its own order.

    Raises :class:`ConfigError` (``field="backend"``) when onnxruntime is not installed.
    """
    names: list[str] = list(_onnxruntime().get_available_providers())
    return tuple(names)


def _resolve_providers(providers: Sequence[str] | Literal["auto"],
                       available: Sequence[str]) -> tuple[str, ...]:
    if isinstance(providers, str) and providers == "auto":
        chosen = tuple(name for name in _AUTO_ORDER if name in available)
        if not chosen:
            raise ConfigError(
                f"'auto' found none of {', '.join(_AUTO_ORDER)} among the available "
                f"providers ({', '.join(available) or 'none'})", field="onnx_providers")
        return chosen
    requested = (providers,) if isinstance(providers, str) else tuple(providers)
    if not requested:
        raise ConfigError("expected 'auto' or at least one provider name, got an empty list",
                          field="onnx_providers")
    missing = [name for name in requested if name not in available]
    if missing:
        raise ConfigError(
            f"{', '.join(missing)} not available in this onnxruntime build; available: "
            f"{', '.join(available) or 'none'} (the onnxruntime-gpu package provides "
            "CUDAExecutionProvider and TensorrtExecutionProvider)", field="onnx_providers")
    return requested


def export_key(*, fingerprint: str, batch_size: int, audio_dim: int, rows: int, first_row: int,
               precision: _Precision, opset: int) -> str:
    """The cache key of an export: SHA-256 (hex) over the weights' ``fingerprint``, the static
    shapes, the precision, the opset, the torch version and :data:`EXPORT_VERSION`."""
    payload = {
        "fingerprint": fingerprint,
        "batch_size": batch_size,
        "audio_dim": audio_dim,
        "decoder_rows": rows,
        "decoder_first_row": first_row,
        "precision": precision,
        "opset": opset,
        "torch": torch.__version__,
        "export_version": EXPORT_VERSION,
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


class _Fp16Boundary(nn.Module):
    """Runs a float16 module on float32 inputs and returns float32 (casts at both ends)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.inner(*(x.to(torch.float16) for x in inputs))
        return out.to(torch.float32)


def _half_copy(module: nn.Module) -> nn.Module:
    """A float16 copy of ``module`` that never holds a float32 copy of the weights (the
    floating parameters and buffers are converted before ``deepcopy`` sees them)."""
    memo: dict[int, Any] = {}
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.is_floating_point():
            half = tensor.detach().to(torch.float16)
            memo[id(tensor)] = (nn.Parameter(half, requires_grad=False)
                                if isinstance(tensor, nn.Parameter) else half)
    return copy.deepcopy(module, memo).to(torch.float16).eval()


def _weight_bytes(module: nn.Module, precision: _Precision) -> int:
    total = 0
    for tensor in (*module.parameters(), *module.buffers()):
        size = 2 if precision == "fp16" and tensor.is_floating_point() else tensor.element_size()
        total += tensor.numel() * size
    return total


@contextlib.contextmanager
def _quiet_legacy_exporter() -> Iterator[None]:
    """Silence the warnings the TorchScript exporter always emits (its own deprecation and
    the tracer's notes about shape checks turned into constants, harmless with static
    shapes). Scoped to the export call; ``warnings`` state is process-wide."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", TracerWarning)
        yield


def export_module(module: nn.Module, example_inputs: Mapping[str, torch.Tensor], path: Path, *,
                  output_name: str, precision: _Precision = "fp32", opset: int = 17,
                  external_data_threshold_bytes: int = DEFAULT_EXTERNAL_DATA_THRESHOLD_BYTES,
                  ) -> list[Path]:
    """Export ``module`` to ``path`` with static shapes taken from ``example_inputs`` (name ->
    float32 tensor, in the order of ``forward``'s arguments). Returns the files written.

    ``precision="fp16"`` exports a float16 copy of the module (the original is not changed)
    with float32 inputs and outputs. Weights over ``external_data_threshold_bytes`` go to
    ``<path>.data`` (one file, referenced relative to ``path``).
    """
    parameters = list(module.parameters())
    if any(p.is_meta for p in parameters):
        raise ValueError("cannot export a module on the meta device: load its weights first")
    device = parameters[0].device if parameters else torch.device("cpu")
    external = _weight_bytes(module, precision) > external_data_threshold_bytes
    target: nn.Module = module if precision == "fp32" else _Fp16Boundary(_half_copy(module))
    args = tuple(x.detach().to(device=device, dtype=torch.float32)
                 for x in example_inputs.values())
    # a private directory: for graphs over 2 GB the exporter writes one file per tensor
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=path.parent))
    try:
        staged = staging / path.name
        with torch.no_grad(), _quiet_legacy_exporter():
            torch.onnx.export(target.eval(), args, str(staged), dynamo=False,
                              input_names=list(example_inputs), output_names=[output_name],
                              opset_version=opset)
        spilled = any(p.name != path.name for p in staging.iterdir())
        if external or spilled:
            onnx = _onnx()
            model = onnx.load(str(staged))  # reads per-tensor files if the exporter wrote any
            data_name = f"{path.name}.data"
            onnx.save_model(model, str(path), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=data_name, size_threshold=0)
            del model
            return [path, path.with_name(data_name)]
        os.replace(staged, path)
        return [path]
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@dataclass(frozen=True)
class _Manifest:
    files: dict[str, int]

    @classmethod
    def read(cls, directory: Path) -> _Manifest | None:
        try:
            raw = json.loads((directory / _MANIFEST_FILE).read_text())
            files = {str(k): int(v) for k, v in raw["files"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        return cls(files)

    def complete(self, directory: Path) -> bool:
        """All files listed, present and of the recorded sizes, graphs included."""
        if _UNET_FILE not in self.files or _DECODER_FILE not in self.files:
            return False
        for name, size in self.files.items():
            try:
                if (directory / name).stat().st_size != size:
                    return False
            except OSError:
                return False
        return True


def _is_complete(directory: Path) -> bool:
    manifest = _Manifest.read(directory)
    return manifest is not None and manifest.complete(directory)


def _discard_if_incomplete(directory: Path) -> None:
    """Remove an incomplete export directory (checked again here: another process may have
    just renamed a complete one into place). It is renamed first, so no reader ever sees it
    half-deleted."""
    if not directory.exists() or _is_complete(directory):
        return
    doomed = directory.with_name(f".{directory.name}.discard-{os.getpid()}")
    try:
        os.rename(directory, doomed)
    except FileNotFoundError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


class OnnxModels:
    """The UNet step and the face decoder as ONNX Runtime sessions with a fixed batch size.

    Build with :meth:`build`. :meth:`unet` and :meth:`decode` take exactly ``batch_size``
    rows, on any device and in any floating dtype, and return tensors on the input's device
    in the input's dtype. CPU tensors go through numpy; CUDA tensors are bound in place
    (ONNX Runtime I/O binding) when the sessions run on the CUDA or TensorRT provider.
    Sessions are safe to call from several threads; :meth:`close` releases them.

    Attributes:
        batch_size: the rows every call takes.
        providers: the execution providers the sessions use, in priority order.
        precision: ``"fp32"`` or ``"fp16"`` (the graphs' internal precision).
        unet_path, decoder_path: the exported graphs.
        export_dir: their cache directory; ``key`` its name (see :func:`export_key`).
        exported: True when this build exported, False when it reused a cached export.
    """

    def __init__(self, *, unet_session: Any, decoder_session: Any, batch_size: int,
                 providers: tuple[str, ...], precision: _Precision, unet_path: Path,
                 decoder_path: Path, export_dir: Path, key: str, exported: bool,
                 device_id: int) -> None:
        self._unet_session: Any = unet_session
        self._decoder_session: Any = decoder_session
        self.batch_size = batch_size
        self.providers = providers
        self.precision: _Precision = precision
        self.unet_path = unet_path
        self.decoder_path = decoder_path
        self.export_dir = export_dir
        self.key = key
        self.exported = exported
        self.device_id = device_id
        self._on_gpu = bool(providers) and providers[0] in _GPU_PROVIDERS
        self._unet_inputs = _input_shapes(unet_session)
        self._unet_output = _output_shape(unet_session)
        self._decoder_inputs = _input_shapes(decoder_session)
        self._decoder_output = _output_shape(decoder_session)

    @classmethod
    def build(cls, unet: UNetAtZero, decoder: FaceDecoder, *, batch_size: int, audio_dim: int,
              cache_dir: str | os.PathLike[str], fingerprint: str,
              providers: Sequence[str] | Literal["auto"] = "auto",
              precision: _Precision = "fp32", opset: int = 17, device_id: int = 0,
              external_data_threshold_bytes: int = DEFAULT_EXTERNAL_DATA_THRESHOLD_BYTES,
              ) -> OnnxModels:
        """Export ``unet`` and ``decoder`` (or reuse a cached export) and open them.

        Args:
            unet, decoder: the torch modules, with their real weights (any device).
            batch_size: the fixed batch of every call (the graphs have static shapes).
            audio_dim: width of the audio tokens (the UNet's cross-attention dimension).
            cache_dir: exports go to ``cache_dir/onnx/<key>/``.
            fingerprint: identifies the weights (for example a hash of the weight files);
                exports of different weights must have different fingerprints.
            providers: ``"auto"`` (TensorRT, CUDA, CPU: those available) or provider names.
            precision: ``"fp32"``, or ``"fp16"`` for the CUDA/TensorRT providers.
            opset: the ONNX opset to export (14 or newer).
            device_id: the CUDA device of the CUDA/TensorRT providers.
            external_data_threshold_bytes: weights over this size are stored in a ``.data``
                file next to each graph.

        Raises:
            ConfigError: onnxruntime missing (``backend``), a provider not available
                (``onnx_providers``), fp16 without a GPU provider (``precision``), or a bad
                ``batch_size``/``audio_dim``/``opset``.
        """
        ort = _onnxruntime()
        if precision not in ("fp32", "fp16"):
            raise ConfigError(f"expected 'fp32' or 'fp16', got {precision!r}", field="precision")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"expected a positive integer, got {batch_size!r}",
                              field="batch_size")
        if opset < _MIN_OPSET:
            raise ConfigError(f"expected an ONNX opset >= {_MIN_OPSET}, got {opset}",
                              field="onnx_opset")
        if not fingerprint:
            raise ConfigError("expected a non-empty weights fingerprint", field="fingerprint")
        cross_dim = int(unet.unet.config.cross_attention_dim)  # type: ignore[attr-defined]
        if audio_dim != cross_dim:
            raise ConfigError(f"expected the UNet's cross_attention_dim ({cross_dim}), got "
                              f"{audio_dim}", field="audio_dim")
        chosen = _resolve_providers(providers, available_providers())
        if precision == "fp16" and chosen[0] not in _GPU_PROVIDERS:
            raise ConfigError(
                f"fp16 needs the CUDA or TensorRT provider; {chosen[0]} runs fp32: use "
                "precision='fp32' on CPU", field="precision")

        rows = _decoder_rows(decoder)
        key = export_key(fingerprint=fingerprint, batch_size=batch_size, audio_dim=audio_dim,
                         rows=rows, first_row=decoder.first_row, precision=precision,
                         opset=opset)
        root = Path(cache_dir) / "onnx"
        root.mkdir(parents=True, exist_ok=True)
        export_dir = root / key
        exported = False
        if not _is_complete(export_dir):
            _discard_if_incomplete(export_dir)
            _export_both(unet, decoder, export_dir, batch_size=batch_size, audio_dim=audio_dim,
                         rows=rows, precision=precision, opset=opset,
                         threshold=external_data_threshold_bytes)
            exported = True

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        provider_specs = _provider_specs(chosen, root / f"{key}.trt", precision, device_id)
        unet_path = export_dir / _UNET_FILE
        decoder_path = export_dir / _DECODER_FILE
        unet_session = ort.InferenceSession(str(unet_path), options, providers=provider_specs)
        decoder_session = ort.InferenceSession(str(decoder_path), options,
                                               providers=provider_specs)
        used: tuple[str, ...] = tuple(unet_session.get_providers())
        if precision == "fp16" and (not used or used[0] not in _GPU_PROVIDERS):
            raise ConfigError(
                f"fp16 needs the CUDA or TensorRT provider, but the session fell back to "
                f"{', '.join(used)} (check the CUDA/TensorRT installation)", field="precision")
        return cls(unet_session=unet_session, decoder_session=decoder_session,
                   batch_size=batch_size, providers=used, precision=precision,
                   unet_path=unet_path, decoder_path=decoder_path, export_dir=export_dir,
                   key=key, exported=exported, device_id=device_id)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._unet_session is None

    def unet(self, latents: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """``latents [B, 8, 32, 32]``, ``audio [B, 50, C]`` -> ``[B, 4, 32, 32]`` (``B`` =
        :attr:`batch_size`), like :meth:`UNetAtZero.forward`."""
        session = self._session(self._unet_session)
        return self._run(session, {"latents": latents, "audio": audio}, self._unet_inputs,
                         self._unet_output)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``latents [B, 4, 32, 32]`` -> faces ``[B, 3, rows, 256]`` in ``[0, 1]``, like
        :meth:`FaceDecoder.forward`."""
        session = self._session(self._decoder_session)
        return self._run(session, {"latents": latents}, self._decoder_inputs,
                         self._decoder_output)

    def close(self) -> None:
        """Release both sessions (their memory goes when nothing else holds them).
        Calling it again does nothing."""
        self._unet_session = None
        self._decoder_session = None

    def __enter__(self) -> OnnxModels:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _session(self, session: Any) -> Any:
        if session is None:
            raise RuntimeError("OnnxModels is closed")
        return session

    def _run(self, session: Any, inputs: dict[str, torch.Tensor],
             shapes: dict[str, tuple[int, ...]], out_shape: tuple[int, ...]) -> torch.Tensor:
        first = next(iter(inputs.values()))
        for name, tensor in inputs.items():
            expected = shapes[name]
            if tensor.ndim == 0 or tensor.shape[0] != self.batch_size:
                got = tensor.shape[0] if tensor.ndim else "a scalar"
                raise ValueError(f"{name}: expected exactly batch_size={self.batch_size} rows, "
                                 f"got {got} (pad a partial batch)")
            if tuple(tensor.shape) != expected:
                raise ValueError(f"{name}: expected shape {list(expected)}, got "
                                 f"{list(tensor.shape)}")
            if not tensor.is_floating_point():
                raise ValueError(f"{name}: expected a floating-point tensor, got {tensor.dtype}")
        if first.device.type == "cuda" and self._on_gpu:
            out = self._run_bound(session, inputs, out_shape)
        else:
            feeds = {name: t.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
                     for name, t in inputs.items()}
            result = session.run(None, feeds)[0]
            out = torch.from_numpy(np.ascontiguousarray(result, dtype=np.float32))
        return out.to(device=first.device, dtype=first.dtype)

    def _run_bound(self, session: Any, inputs: dict[str, torch.Tensor],
                   out_shape: tuple[int, ...]) -> torch.Tensor:
        """Run on CUDA tensors without a host round trip: inputs and the output are bound by
        pointer on the session's device (inputs on another GPU are copied there first)."""
        device = torch.device("cuda", self.device_id)
        bound = {name: t.detach().to(device=device, dtype=torch.float32).contiguous()
                 for name, t in inputs.items()}
        out = torch.empty(out_shape, dtype=torch.float32, device=device)
        binding = session.io_binding()
        for name, tensor in bound.items():
            binding.bind_input(name, "cuda", self.device_id, np.float32, tuple(tensor.shape),
                               tensor.data_ptr())
        output_name: str = session.get_outputs()[0].name
        binding.bind_output(output_name, "cuda", self.device_id, np.float32, out_shape,
                            out.data_ptr())
        # ONNX Runtime computes on its own stream: the inputs written on torch's current
        # stream must be ready first; run_with_iobinding synchronises its stream on return
        torch.cuda.current_stream(device).synchronize()
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        del bound  # the input buffers had to live until the run finished
        return out


def _decoder_rows(decoder: FaceDecoder) -> int:
    """Pixel rows the decoder produces (256 for ``rows="full"``)."""
    return (LATENT_SIZE - decoder.first_latent_row) * (FACE_SIZE // LATENT_SIZE)


def _input_shapes(session: Any) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for arg in session.get_inputs():
        shapes[str(arg.name)] = tuple(int(d) for d in arg.shape)
    return shapes


def _output_shape(session: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in session.get_outputs()[0].shape)


def _provider_specs(providers: tuple[str, ...], trt_cache: Path, precision: _Precision,
                    device_id: int) -> list[str | tuple[str, dict[str, Any]]]:
    """Provider names with their options: the CUDA device, and TensorRT's engine cache
    (building a TensorRT engine takes minutes) next to the export."""
    specs: list[str | tuple[str, dict[str, Any]]] = []
    for name in providers:
        if name == "TensorrtExecutionProvider":
            specs.append((name, {"device_id": device_id,
                                 "trt_fp16_enable": precision == "fp16",
                                 "trt_engine_cache_enable": True,
                                 "trt_engine_cache_path": str(trt_cache)}))
        elif name == "CUDAExecutionProvider":
            specs.append((name, {"device_id": device_id}))
        else:
            specs.append(name)
    return specs


def _export_both(unet: UNetAtZero, decoder: FaceDecoder, export_dir: Path, *, batch_size: int,
                 audio_dim: int, rows: int, precision: _Precision, opset: int,
                 threshold: int) -> None:
    """Export both graphs into a temporary sibling of ``export_dir``, write the manifest last
    and rename the directory into place. If another process finished the same export first,
    its directory is kept and ours is dropped."""
    work = Path(tempfile.mkdtemp(prefix=f".{export_dir.name}.tmp-", dir=export_dir.parent))
    try:
        latents = torch.zeros(batch_size, 2 * LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE)
        audio = torch.zeros(batch_size, 50, audio_dim)
        files = export_module(unet, {"latents": latents, "audio": audio}, work / _UNET_FILE,
                              output_name="latents_out", precision=precision, opset=opset,
                              external_data_threshold_bytes=threshold)
        files += export_module(decoder, {"latents": latents[:, :LATENT_CHANNELS]},
                               work / _DECODER_FILE, output_name="faces", precision=precision,
                               opset=opset, external_data_threshold_bytes=threshold)
        manifest = {
            "export_version": EXPORT_VERSION,
            "torch": torch.__version__,
            "batch_size": batch_size,
            "audio_dim": audio_dim,
            "decoder_rows": rows,
            "decoder_first_row": decoder.first_row,
            "precision": precision,
            "opset": opset,
            "files": {f.name: f.stat().st_size for f in files},
        }
        (work / _MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        try:
            os.rename(work, export_dir)
        except OSError:
            if not _is_complete(export_dir):
                raise
            # a concurrent build renamed its identical export first: use that one
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
