"""MuseTalk's released weights: finding them in a folder, checking and loading them strictly.

The folder is MuseTalk's ``models/`` directory as ``download_weights.sh`` fills it::

    DIR/
      musetalkV15/unet.pth            the v1.5 UNet (a plain state dict)
      musetalkV15/musetalk.json       its config (diffusers UNet2DConditionModel kwargs)
      musetalk/pytorch_model.bin      the v1.0 UNet
      musetalk/musetalk.json          its config
      sd-vae/config.json              sd-vae-ft-mse (diffusers AutoencoderKL)
      sd-vae/diffusion_pytorch_model.bin   or .safetensors
      whisper/config.json             openai/whisper-tiny (transformers WhisperConfig)
      whisper/pytorch_model.bin       or model.safetensors

Either UNet version may be present, or both; anything else in the folder (``dwpose/``,
``face-parse-bisent/``, ``syncnet/``...) is ignored. Where a file exists in both formats the
``.safetensors`` one is used. A missing JSON config falls back to the values in
:mod:`.configs` (logged at INFO).

Every problem is a :class:`~avatarkit.errors.WeightsError` naming the file:

* torch files are read with ``torch.load(weights_only=True)``: a file that needs Python
  objects unpickled is refused, never unpickled, and so is a corrupt or truncated one;
* a checkpoint must fit the network built from its config exactly: no missing key, no
  unexpected key, no shape difference, floating tensors in float32, float16 or bfloat16.

What is accepted beyond the plain state dict: a dict wrapping it under ``"state_dict"`` or
``"module"``; keys all prefixed ``"module."`` (``DataParallel``); the VAE's old attention
names (``query``/``key``/``value``/``proj_attn``, see :func:`rename_vae_keys`); a Whisper file
of ``WhisperForConditionalGeneration`` (``model.encoder.*``; decoder and ``proj_out`` ignored),
of ``WhisperModel`` (``encoder.*``) or of the bare encoder.

:func:`check_weights` runs the same checks without allocating the networks (``avatarkit
weights check DIR``); :func:`write_weights_folder` writes the layout from networks in memory
(tests, and operators converting their own fine-tunes).

Why one module: loading and checking MuseTalk weights is one mapping, from the files
MuseTalk ships (several layouts and versions, several key spellings) to our networks; the
loader and the ``avatarkit weights check`` report share every rule of that mapping.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple, get_args

import diffusers
import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import WhisperConfig, WhisperForConditionalGeneration
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from ...errors import ConfigError, WeightsError
from .configs import UNET_CONFIG, VAE_CONFIG, WHISPER_CONFIG, MuseTalkConfigs
from .networks import build_unet, build_vae, build_whisper_encoder, whisper_config

__all__ = [
    "ComponentReport",
    "MuseTalkNetworks",
    "MuseTalkVersion",
    "WeightsLayout",
    "WeightsReport",
    "check_weights",
    "find_layout",
    "load_networks",
    "random_networks",
    "rename_vae_keys",
    "write_weights_folder",
]

logger = logging.getLogger(__name__)

MuseTalkVersion = Literal["v1.0", "v1.5"]
_Component = Literal["unet", "vae", "whisper"]
_VersionChoice = Literal["auto", "v1.0", "v1.5"]
_Device = str | torch.device

_COMPONENTS: tuple[_Component, ...] = ("unet", "vae", "whisper")
_VERSIONS: tuple[MuseTalkVersion, ...] = get_args(MuseTalkVersion)

#: (weights file, config file) of each UNet version, relative to the folder
_UNET_FILES: dict[MuseTalkVersion, tuple[str, str]] = {
    "v1.5": ("musetalkV15/unet.pth", "musetalkV15/musetalk.json"),
    "v1.0": ("musetalk/pytorch_model.bin", "musetalk/musetalk.json"),
}
#: the VAE and Whisper weights, in order of preference
_VAE_FILES = ("sd-vae/diffusion_pytorch_model.safetensors", "sd-vae/diffusion_pytorch_model.bin")
_VAE_CONFIG_FILE = "sd-vae/config.json"
_WHISPER_FILES = ("whisper/model.safetensors", "whisper/pytorch_model.bin")
_WHISPER_CONFIG_FILE = "whisper/config.json"

_EXPECTED_TREE = """\
expected MuseTalk's models/ layout:
  {root}/
    musetalkV15/unet.pth, musetalkV15/musetalk.json      UNet v1.5 (this or v1.0, or both)
    musetalk/pytorch_model.bin, musetalk/musetalk.json   UNet v1.0
    sd-vae/diffusion_pytorch_model.bin (or .safetensors), sd-vae/config.json
    whisper/pytorch_model.bin (or model.safetensors), whisper/config.json"""

_LABELS: dict[_Component, str] = {"unet": "UNet", "vae": "VAE (sd-vae-ft-mse)",
                                  "whisper": "Whisper-tiny encoder"}
#: what a config file must say it is, when it says
_CLASS_NAMES: dict[_Component, tuple[str, str]] = {
    "unet": ("_class_name", "UNet2DConditionModel"),
    "vae": ("_class_name", "AutoencoderKL"),
    "whisper": ("model_type", "whisper"),
}
_FALLBACK_CONFIGS: dict[_Component, dict[str, Any]] = {
    "unet": UNET_CONFIG, "vae": VAE_CONFIG, "whisper": WHISPER_CONFIG}

_FLOAT_DTYPES = ("float32", "float16", "bfloat16")
_TORCH_FLOATS = {getattr(torch, name): name for name in _FLOAT_DTYPES}
#: safetensors' dtype codes -> torch's names
_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}
_HASH_BLOCK = 8 * 1024 * 1024

#: ``<prefix>attentions.<n>.<old>.<weight|bias>``, the VAE's attention before diffusers 0.14
_OLD_VAE_ATTENTION = re.compile(r"^(.*\battentions\.\d+\.)(query|key|value|proj_attn)\."
                                r"(weight|bias)$")
_NEW_VAE_ATTENTION = re.compile(r"^(.*\battentions\.\d+\.)(to_q|to_k|to_v|to_out\.0)\."
                                r"(weight|bias)$")
_OLD_TO_NEW = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_NEW_TO_OLD = {new: old for old, new in _OLD_TO_NEW.items()}

#: prefixes of a Whisper file's keys that are the decoder's or the LM head's (not needed)
_WHISPER_IGNORED = ("model.decoder.", "decoder.", "proj_out.")


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class WeightsLayout:
    """Where each file of a weights folder is. Built by :func:`find_layout`.

    A ``*_config_file`` of ``None`` means the folder has none and the official value from
    :mod:`.configs` is used.
    """

    root: Path
    version: MuseTalkVersion
    unet_file: Path
    unet_config_file: Path | None
    vae_file: Path
    vae_config_file: Path | None
    whisper_file: Path
    whisper_config_file: Path | None

    def file(self, component: _Component) -> Path:
        """The weights file of ``component`` (``"unet"``, ``"vae"`` or ``"whisper"``)."""
        return {"unet": self.unet_file, "vae": self.vae_file,
                "whisper": self.whisper_file}[_component(component)]

    def config_file(self, component: _Component) -> Path | None:
        """The JSON config of ``component``, or ``None`` when the built-in one is used."""
        return {"unet": self.unet_config_file, "vae": self.vae_config_file,
                "whisper": self.whisper_config_file}[_component(component)]

    def label(self, component: _Component) -> str:
        """How messages name ``component`` (``"UNet v1.5"``, ``"VAE (sd-vae-ft-mse)"``...)."""
        name = _LABELS[_component(component)]
        return f"{name} {self.version}" if component == "unet" else name

    def config(self, component: _Component) -> dict[str, Any]:
        """The config dict of one component, read from its JSON file (or the fallback).

        Raises :class:`WeightsError` (``file`` = the JSON) when the file is not a JSON object
        or says it describes another kind of model.
        """
        path = self.config_file(component)
        if path is None:
            logger.info("%s: no config file for the %s; using the official config",
                        self.root, self.label(component))
            return copy.deepcopy(_FALLBACK_CONFIGS[component])
        return _read_config(path, component)

    def configs(self) -> MuseTalkConfigs:
        """The three configs (JSON files, else the official fallbacks), checked to fit
        together (UNet cross-attention = Whisper width...)."""
        configs = MuseTalkConfigs(unet=self.config("unet"), vae=self.config("vae"),
                                  whisper=self.config("whisper"))
        _check_fit(configs, self)
        return configs


def find_layout(root: str | os.PathLike[str], *,
                version: _VersionChoice = "auto") -> WeightsLayout:
    """Locate the weights in ``root`` (MuseTalk's ``models/`` folder).

    ``version="auto"`` takes v1.5 when ``musetalkV15/unet.pth`` exists, else v1.0. A missing
    folder or weights file raises :class:`WeightsError` whose ``file`` is the first missing
    path (``DIR/whisper`` when the whole folder is missing) and whose message shows the
    expected layout; an unknown ``version`` raises :class:`ConfigError` (``field="version"``).
    """
    if version not in ("auto", *_VERSIONS):
        raise ConfigError(f"expected 'auto', 'v1.0' or 'v1.5', got {version!r}", field="version")
    base = Path(root)
    if not base.is_dir():
        what = "is not a folder" if base.exists() else "does not exist"
        raise WeightsError(f"the weights folder {base} {what}\n"
                           + _EXPECTED_TREE.format(root=base), file=str(base))
    chosen: MuseTalkVersion
    if version == "auto":
        chosen = "v1.5" if (base / _UNET_FILES["v1.5"][0]).is_file() else "v1.0"
        if not (base / _UNET_FILES[chosen][0]).is_file():
            v15, v10 = _UNET_FILES["v1.5"][0], _UNET_FILES["v1.0"][0]
            raise _missing(base, base / v15,
                           f"no MuseTalk UNet in {base}: neither {v15} (v1.5) nor {v10} (v1.0) "
                           "exists")
    else:
        chosen = version
    unet_rel, unet_config_rel = _UNET_FILES[chosen]
    return WeightsLayout(
        root=base, version=chosen,
        unet_file=_require(base, (unet_rel,), f"UNet {chosen} weights"),
        unet_config_file=_optional(base / unet_config_rel),
        vae_file=_require(base, _VAE_FILES, "VAE weights"),
        vae_config_file=_optional(base / _VAE_CONFIG_FILE),
        whisper_file=_require(base, _WHISPER_FILES, "Whisper weights"),
        whisper_config_file=_optional(base / _WHISPER_CONFIG_FILE),
    )


def _require(base: Path, candidates: tuple[str, ...], what: str) -> Path:
    for relative in candidates:
        if (base / relative).is_file():
            return base / relative
    names = " or ".join(candidates)
    raise _missing(base, base / candidates[-1], f"{what} not found: expected {names}")


def _missing(base: Path, path: Path, message: str) -> WeightsError:
    """An error for ``path`` not being there; ``file`` is its first missing part below
    ``base`` (the folder when a whole folder is missing)."""
    first = path
    for part in reversed(path.relative_to(base).parents):
        candidate = base / part
        if part != Path(".") and not candidate.exists():
            first = candidate
            break
    where = f"{first} does not exist" if not first.exists() else f"{first} is not a file"
    return WeightsError(f"{message} ({where})\n" + _EXPECTED_TREE.format(root=base),
                        file=str(first))


def _optional(path: Path) -> Path | None:
    return path if path.is_file() else None


def _component(component: str) -> _Component:
    for known in _COMPONENTS:
        if component == known:
            return known
    raise ConfigError(f"expected one of {', '.join(_COMPONENTS)}, got {component!r}",
                      field="component")


def _read_config(path: Path, component: _Component) -> dict[str, Any]:
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{path}: the {_LABELS[component]} config is not valid JSON "
                           f"({exc})", file=str(path)) from exc
    if not isinstance(loaded, dict):
        raise WeightsError(f"{path}: expected a JSON object (the {_LABELS[component]} config), "
                           f"found a JSON {type(loaded).__name__}", file=str(path))
    key, expected = _CLASS_NAMES[component]
    said = loaded.get(key)
    if said is not None and said != expected:
        raise WeightsError(f"{path}: {key} is {said!r}, expected {expected!r} (the "
                           f"{_LABELS[component]} config)", file=str(path))
    return loaded


def _check_fit(configs: MuseTalkConfigs, layout: WeightsLayout) -> None:
    try:
        configs.check()
    except ValueError as exc:
        culprit = layout.unet_config_file or layout.root
        raise WeightsError(f"{culprit}: the configs of {layout.root} do not fit together: {exc}",
                           file=str(culprit)) from exc


# --------------------------------------------------------------------------- networks


@dataclass
class MuseTalkNetworks:
    """The UNet, the VAE and the Whisper encoder, with their configs and where they came from
    (``version`` and ``layout`` are ``None`` for random weights)."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    whisper: WhisperEncoder
    configs: MuseTalkConfigs
    version: MuseTalkVersion | None = None
    layout: WeightsLayout | None = None
    _fingerprints: dict[str, str] = field(default_factory=dict, init=False, repr=False,
                                          compare=False)

    def fingerprint(self, component: _Component) -> str:
        """A sha256 (hex) identifying ``component``'s weights, for cache keys.

        Loaded from a folder: the hash of the weights file's bytes. Random weights: the hash
        of the state dict (each key, dtype, shape and the tensor's bytes on the CPU, in key
        order); take it before wrapping the UNet in ``UNetAtZero``, which changes the UNet in
        place. Computed once per instance and component, then cached.
        """
        component = _component(component)
        cached = self._fingerprints.get(component)
        if cached is None:
            if self.layout is not None:
                cached = _file_sha256(self.layout.file(component))
            else:
                cached = _state_sha256(_as_module(getattr(self, component)))
            self._fingerprints[component] = cached
        return cached


def random_networks(configs: MuseTalkConfigs | None = None, *, seed: int = 0,
                    device: _Device = "cpu",
                    dtype: torch.dtype = torch.float32) -> MuseTalkNetworks:
    """Randomly initialised networks (official configs by default). The same ``seed``,
    configs and device give identical weights; the global RNG state is left as it was."""
    configs = configs if configs is not None else MuseTalkConfigs.official()
    try:
        configs.check()
    except ValueError as exc:
        raise ConfigError(str(exc), field="configs") from exc
    target = torch.device(device)
    devices = [target.index or 0] if target.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        unet = build_unet(configs.unet, device=target, dtype=dtype)
        vae = build_vae(configs.vae, device=target, dtype=dtype)
        whisper = build_whisper_encoder(configs.whisper, device=target, dtype=dtype)
    return MuseTalkNetworks(unet=unet, vae=vae, whisper=whisper, configs=configs)


def load_networks(root: str | os.PathLike[str], *, version: _VersionChoice = "auto",
                  device: _Device = "cpu",
                  dtype: torch.dtype = torch.float32) -> MuseTalkNetworks:
    """Build the three networks from the folder's configs and load its weights strictly.

    Each network is built on the meta device (nothing allocated) and takes the file's tensors
    (``load_state_dict(strict=True, assign=True)``), converted one by one to ``device`` and
    ``dtype`` (float32, float16 or bfloat16) while the file's copy of each is released, so
    the weights are never held twice: for the CPU the file is read into memory and used as
    is when the dtype matches; for an accelerator it is memory-mapped and copied over. Any
    problem raises :class:`WeightsError` naming the file (see the module docstring).
    """
    if dtype not in _TORCH_FLOATS:
        raise ConfigError(f"expected torch.float32, torch.float16 or torch.bfloat16, got "
                          f"{dtype}", field="dtype")
    layout = find_layout(root, version=version)
    configs = layout.configs()
    target = torch.device(device)
    loaded = {component: _load_component(layout, component, getattr(configs, component),
                                         target, dtype)
              for component in _COMPONENTS}
    return MuseTalkNetworks(unet=loaded["unet"], vae=loaded["vae"], whisper=loaded["whisper"],
                            configs=configs, version=layout.version, layout=layout)


def _load_component(layout: WeightsLayout, component: _Component, config: dict[str, Any],
                    device: torch.device, dtype: torch.dtype) -> Any:
    built = _build(component, config, layout.config_file(component) or layout.root,
                   layout.label(component))
    module = _as_module(built)
    path = layout.file(component)
    # for the CPU a torch file is read into memory: the tensors are then the network's own,
    # not pages of a file that could change under them
    with _open_checkpoint(path, mmap=device.type != "cpu") as checkpoint:
        keys = _normalize(checkpoint.infos, component)
        error = _fit_error(path, layout.label(component), keys, _expected(module))
        if error is not None:
            raise error
        state: dict[str, torch.Tensor] = {}
        for key, entry in keys.entries.items():
            tensor = checkpoint.take(entry.source)  # released by the checkpoint
            if tuple(tensor.shape) != entry.shape:
                tensor = tensor.reshape(entry.shape)
            wanted = dtype if tensor.is_floating_point() else tensor.dtype
            state[key] = tensor.to(device=device, dtype=wanted)
            del tensor
    del checkpoint
    module.load_state_dict(state, strict=True, assign=True)
    del state
    module.eval().requires_grad_(False)
    return built


def _build(component: _Component, config: dict[str, Any], where: Path, label: str) -> Any:
    """``component`` built from ``config`` on the meta device; a config the library refuses
    raises :class:`WeightsError` with ``file=where``."""
    builders: dict[_Component, Callable[..., Any]] = {
        "unet": build_unet, "vae": build_vae, "whisper": build_whisper_encoder}
    try:
        return builders[component](config, device="meta")
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise WeightsError(f"{where}: the {label} cannot be built from its config: {exc}",
                           file=str(where)) from exc


def _as_module(value: object) -> nn.Module:
    if not isinstance(value, nn.Module):
        raise TypeError(f"expected a torch module, got {type(value).__name__}")
    return value


def _expected(module: nn.Module) -> dict[str, tuple[tuple[int, ...], str]]:
    return {key: (tuple(tensor.shape), _dtype_name(tensor.dtype))
            for key, tensor in module.state_dict().items()}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------- fingerprints


#: file hashes of this process, by (path, inode, size, mtime): a server that builds an engine
#: per session hashes the 3.4 GB UNet file once, not at every session start
_FILE_HASHES: dict[tuple[str, int, int, int], str] = {}


def _file_sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    known = _FILE_HASHES.get(key)
    if known is not None:
        return known
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while block := stream.read(_HASH_BLOCK):
            digest.update(block)
    _FILE_HASHES[key] = digest.hexdigest()
    return _FILE_HASHES[key]


def _state_sha256(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for key, tensor in module.state_dict().items():
        if tensor.is_meta:
            raise ConfigError("networks on the meta device have no weights to fingerprint",
                              field="device")
        digest.update(f"{key}|{_dtype_name(tensor.dtype)}|{list(tensor.shape)}|".encode())
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


# --------------------------------------------------------------------------- reading files


@dataclass(frozen=True)
class _Info:
    shape: tuple[int, ...]
    dtype: str  # torch's name: "float32", "int64"...


@dataclass(frozen=True)
class _Entry:
    """A tensor of the file under the network's key: where it is in the file and the shape
    the network gets (old 1x1 conv attention weights are squeezed)."""

    source: str
    shape: tuple[int, ...]
    dtype: str


class _Checkpoint:
    """An opened weights file: tensor metadata up front, tensors on demand."""

    def __init__(self, infos: dict[str, _Info], take: Callable[[str], torch.Tensor]) -> None:
        self.infos = infos
        self._take = take

    def take(self, key: str) -> torch.Tensor:
        """The tensor stored under ``key``; the checkpoint keeps no reference to it (each key
        is taken once), so memory is released as the caller converts tensors."""
        return self._take(key)


@contextlib.contextmanager
def _open_checkpoint(path: Path, *, mmap: bool = True) -> Iterator[_Checkpoint]:
    """``path`` as a :class:`_Checkpoint`; unreadable files raise :class:`WeightsError`.

    With ``mmap`` a torch file that is a zip archive (every ``torch.save`` since 1.6) is
    memory-mapped, so nothing is read until a tensor's data is used; without, it is read
    into memory. ``.safetensors`` go through ``safe_open`` (the header only until a tensor
    is taken).
    """
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise WeightsError(f"{path}: cannot read the file ({exc})", file=str(path)) from exc
    if size == 0:
        raise WeightsError(f"{path}: the file is empty (0 bytes); download it again",
                           file=str(path))
    if path.suffix == ".safetensors":
        yield _open_safetensors(path)
    else:
        yield _open_torch(path, mmap=mmap)


def _open_torch(path: Path, *, mmap: bool) -> _Checkpoint:
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True,
                            mmap=mmap and zipfile.is_zipfile(path))
    except MemoryError:
        raise
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" in str(exc):
            raise WeightsError(
                f"{path}: not a plain state dict of tensors: loading it would unpickle Python "
                f"objects ({_refusal(exc)}); avatarkit never unpickles code from a weights "
                "file (torch.load weights_only=True). Save the state dict alone: "
                "torch.save(model.state_dict(), path)", file=str(path)) from None
        raise _corrupt(path, exc) from exc
    except Exception as exc:  # torch.load's failures on bad files are not one type
        raise _corrupt(path, exc) from exc
    state = _unwrap(loaded, path)
    infos = {key: _Info(tuple(t.shape), _dtype_name(t.dtype)) for key, t in state.items()}
    return _Checkpoint(infos, state.pop)


def _open_safetensors(path: Path) -> _Checkpoint:
    try:
        handle = safe_open(str(path), framework="pt")
        infos: dict[str, _Info] = {}
        keys: list[str] = handle.keys()  # type: ignore[no-untyped-call]
        for key in keys:
            view = handle.get_slice(key)  # type: ignore[no-untyped-call]
            code = str(view.get_dtype())
            infos[key] = _Info(tuple(int(n) for n in view.get_shape()),
                               _SAFETENSORS_DTYPES.get(code, code))
    except MemoryError:
        raise
    except Exception as exc:  # SafetensorError, OSError...
        raise _corrupt(path, exc) from exc

    def read(key: str) -> torch.Tensor:
        tensor: torch.Tensor = handle.get_tensor(key)  # type: ignore[no-untyped-call]
        return tensor

    return _Checkpoint(infos, read)


def _corrupt(path: Path, exc: BaseException) -> WeightsError:
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    kind = "safetensors" if path.suffix == ".safetensors" else "torch"
    return WeightsError(f"{path}: cannot be read as a {kind} weights file; it is corrupt or "
                        f"truncated ({type(exc).__name__}: {first_line})", file=str(path))


def _refusal(exc: BaseException) -> str:
    match = re.search(r"WeightsUnpickler error: ([^\n]*)", str(exc))
    return match.group(1).strip() if match else "objects other than tensors"


def _unwrap(loaded: object, path: Path) -> dict[str, torch.Tensor]:
    """The state dict in what ``torch.load`` returned: the dict itself, or the one under
    ``"state_dict"`` / ``"module"`` of a training checkpoint."""
    for _ in range(3):
        if not isinstance(loaded, Mapping) or _all_tensors(loaded):
            break
        inner = next((loaded[name] for name in ("state_dict", "module")
                      if isinstance(loaded.get(name), Mapping)), None)
        if inner is None:
            break
        loaded = inner
    if not isinstance(loaded, Mapping):
        raise WeightsError(f"{path}: expected a state dict (a dict of tensors), found a "
                           f"{type(loaded).__name__}", file=str(path))
    bad = [str(key) for key, value in loaded.items()
           if not isinstance(key, str) or not isinstance(value, torch.Tensor)]
    if bad:
        raise WeightsError(f"{path}: not a plain state dict: {len(bad)} entries are not "
                           f"tensors (first: {', '.join(bad[:5])})", file=str(path))
    return {str(key): value for key, value in loaded.items()}


def _all_tensors(mapping: Mapping[Any, Any]) -> bool:
    return all(isinstance(value, torch.Tensor) for value in mapping.values())


# --------------------------------------------------------------------------- key names


def rename_vae_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """sd-vae-ft-mse's old attention names -> diffusers' current ones.

    In every ``...attentions.N.`` module: ``query`` -> ``to_q``, ``key`` -> ``to_k``,
    ``value`` -> ``to_v``, ``proj_attn`` -> ``to_out.0`` (weight and bias); renamed weights
    stored as 1x1 convolution kernels ``[C, C, 1, 1]`` are squeezed to ``[C, C]``. Every other
    key, new attention names included, passes through unchanged.
    """
    renamed: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        new = _new_vae_key(key)
        if new != key and _is_conv_kernel(tuple(tensor.shape)):
            tensor = tensor.reshape(tensor.shape[:2])
        renamed[new] = tensor
    return renamed


def _new_vae_key(key: str) -> str:
    match = _OLD_VAE_ATTENTION.match(key)
    if match is None:
        return key
    prefix, old, kind = match.groups()
    return f"{prefix}{_OLD_TO_NEW[old]}.{kind}"


def _old_vae_key(key: str) -> str:
    match = _NEW_VAE_ATTENTION.match(key)
    if match is None:
        return key
    prefix, new, kind = match.groups()
    return f"{prefix}{_NEW_TO_OLD[new]}.{kind}"


def _is_conv_kernel(shape: tuple[int, ...]) -> bool:
    return len(shape) == 4 and shape[2:] == (1, 1)


class _FileKeys(NamedTuple):
    """A checkpoint's tensors under the network's key names (``entries``), the file keys
    that have no place (``extra``: a second tensor for the same key, stray Whisper keys),
    and ``file_key``: a network key as this file would spell it (its ``module.`` or
    ``model.encoder.`` prefix, old VAE attention names), so that errors name keys as they
    appear in the file."""

    entries: dict[str, _Entry]
    extra: list[str]
    file_key: Callable[[str], str]


def _normalize(infos: Mapping[str, _Info], component: _Component) -> _FileKeys:
    """The file's tensors under the network's key names (see :class:`_FileKeys`)."""
    names = {key: key for key in infos}
    module_prefix = "module." if names and all(k.startswith("module.") for k in names) else ""
    if module_prefix:
        names = {key: key.removeprefix(module_prefix) for key in names}
    extra: list[str] = []
    entries: dict[str, _Entry] = {}
    prefix = _whisper_prefix(names.values()) if component == "whisper" else ""
    old_vae = component == "vae" and any(_OLD_VAE_ATTENTION.match(n) for n in names.values())
    for source, name in names.items():
        info = infos[source]
        shape = info.shape
        if component == "vae":
            new = _new_vae_key(name)
            if new != name and _is_conv_kernel(shape):
                shape = shape[:2]
            name = new
        elif component == "whisper" and prefix:
            if name.startswith(_WHISPER_IGNORED):
                continue
            if not name.startswith(prefix):
                extra.append(source)
                continue
            name = name.removeprefix(prefix)
        if name in entries:
            extra.append(source)
            continue
        entries[name] = _Entry(source, shape, info.dtype)

    def file_key(key: str) -> str:
        return module_prefix + prefix + (_old_vae_key(key) if old_vae else key)

    return _FileKeys(entries, extra, file_key)


def _whisper_prefix(names: Iterable[str]) -> str:
    keys = list(names)
    for prefix in ("model.encoder.", "encoder."):
        if any(key.startswith(prefix) for key in keys):
            return prefix
    return ""


def _fit_error(path: Path, label: str, keys: _FileKeys,
               expected: Mapping[str, tuple[tuple[int, ...], str]]) -> WeightsError | None:
    """A :class:`WeightsError` listing every difference between the file and the network,
    or ``None`` when they fit. Every key is named as the file spells it (a missing one as
    the file would)."""
    entries = keys.entries
    missing = sorted(keys.file_key(key) for key in set(expected) - set(entries))
    unexpected = sorted([entries[key].source for key in set(entries) - set(expected)]
                        + keys.extra)
    mismatched: list[str] = []
    for key in sorted(set(entries) & set(expected), key=lambda k: entries[k].source):
        entry = entries[key]
        shape, dtype = expected[key]
        if entry.shape != shape:
            mismatched.append(f"{entry.source}: expected {list(shape)}, got "
                              f"{list(entry.shape)}")
        elif dtype in _FLOAT_DTYPES and entry.dtype not in _FLOAT_DTYPES:
            mismatched.append(f"{entry.source}: expected a float32, float16 or bfloat16 "
                              f"tensor, got {entry.dtype}")
        elif dtype not in _FLOAT_DTYPES and entry.dtype != dtype:
            mismatched.append(f"{entry.source}: expected {dtype}, got {entry.dtype}")
    if not (missing or unexpected or mismatched):
        return None
    parts = [f"{path}: the {label} weights do not fit the network built from its config: "
             f"{len(missing)} missing, {len(unexpected)} unexpected, {len(mismatched)} "
             "mismatched"]
    for title, names in (("missing", missing), ("unexpected", unexpected),
                         ("mismatched", mismatched)):
        if names:
            more = f" (+{len(names) - 5} more)" if len(names) > 5 else ""
            parts.append(f"{title}: {', '.join(names[:5])}{more}")
    return WeightsError("; ".join(parts), file=str(path), missing=missing,
                        unexpected=unexpected, mismatched=mismatched)


# --------------------------------------------------------------------------- check


@dataclass(frozen=True)
class ComponentReport:
    """One component of :func:`check_weights`: the file, what it holds for the network
    (tensors and parameters, after key normalisation; 0 when unreadable), the floating
    dtype(s) (``"float16"``, ``"float16+float32"``, ``""`` when unknown), and the problem."""

    component: str
    file: Path
    tensors: int
    parameters: int
    dtype: str
    ok: bool
    error: WeightsError | None


@dataclass(frozen=True)
class WeightsReport:
    """What :func:`check_weights` found: one :class:`ComponentReport` per component."""

    layout: WeightsLayout
    components: tuple[ComponentReport, ...]

    @property
    def ok(self) -> bool:
        """True when every component passed."""
        return all(report.ok for report in self.components)

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict (``avatarkit weights check --json``)."""
        return {
            "root": str(self.layout.root),
            "version": self.layout.version,
            "ok": self.ok,
            "components": [{
                "component": report.component,
                "file": str(report.file),
                "tensors": report.tensors,
                "parameters": report.parameters,
                "dtype": report.dtype,
                "ok": report.ok,
                "error": str(report.error) if report.error is not None else None,
                "error_file": report.error.file if report.error is not None else None,
                "missing": list(report.error.missing) if report.error is not None else [],
                "unexpected": list(report.error.unexpected) if report.error is not None else [],
                "mismatched": list(report.error.mismatched) if report.error is not None else [],
            } for report in self.components],
        }


def check_weights(root: str | os.PathLike[str], *,
                  version: _VersionChoice = "auto") -> WeightsReport:
    """The checks of :func:`load_networks` without allocating any network.

    The networks are built on the meta device and the files read for their metadata only
    (memory-mapped torch files, safetensors headers). Every component is checked even when
    another fails; a missing file still raises :class:`WeightsError` (from
    :func:`find_layout`).
    """
    layout = find_layout(root, version=version)
    configs: dict[_Component, dict[str, Any]] = {}
    errors: dict[_Component, WeightsError] = {}
    for component in _COMPONENTS:
        try:
            configs[component] = layout.config(component)
        except WeightsError as exc:
            errors[component] = exc
    if not errors:
        try:
            _check_fit(MuseTalkConfigs(unet=configs["unet"], vae=configs["vae"],
                                       whisper=configs["whisper"]), layout)
        except WeightsError as exc:
            errors["unet"] = exc
    reports = []
    for component in _COMPONENTS:
        path = layout.file(component)
        entries: dict[str, _Entry] = {}
        error = errors.get(component)
        try:
            with _open_checkpoint(path) as checkpoint:
                keys = _normalize(checkpoint.infos, component)
            entries = keys.entries
            if error is None:
                module = _as_module(_build(component, configs[component],
                                           layout.config_file(component) or layout.root,
                                           layout.label(component)))
                error = _fit_error(path, layout.label(component), keys, _expected(module))
        except WeightsError as exc:
            error = error or exc
        reports.append(ComponentReport(
            component=component, file=path, tensors=len(entries),
            parameters=sum(math.prod(entry.shape) for entry in entries.values()),
            dtype="+".join(sorted({entry.dtype for entry in entries.values()
                                   if entry.dtype.startswith(("float", "bfloat"))})),
            ok=error is None, error=error))
    return WeightsReport(layout=layout, components=tuple(reports))


# --------------------------------------------------------------------------- write


def write_weights_folder(root: str | os.PathLike[str], networks: MuseTalkNetworks, *,
                         version: MuseTalkVersion = "v1.5",
                         vae_format: Literal["bin", "safetensors"] = "bin",
                         whisper_format: Literal["bin", "safetensors"] = "bin") -> WeightsLayout:
    """Write ``networks`` into ``root`` in the official layout; returns its layout.

    The UNet goes to ``musetalkV15/unet.pth`` (v1.5) or ``musetalk/pytorch_model.bin``
    (v1.0), the VAE with the old attention names (linear ``[C, C]`` weights, as
    sd-vae-ft-mse has them), Whisper as a ``WhisperForConditionalGeneration`` state dict:
    ``model.encoder.*`` from ``networks.whisper`` plus ``model.decoder.*`` and
    ``proj_out.weight`` of a decoder initialised with seed 0 (so the file has the real
    one's layout). Each config is written next to its weights. Files are written under a
    temporary name and renamed; the VAE or Whisper file of the other format is removed so the
    folder holds one. The UNet must not be wrapped in ``UNetAtZero`` yet (that removes its
    time embedding): a state dict that does not fit its config raises :class:`WeightsError`.
    """
    if version not in _VERSIONS:
        raise ConfigError(f"expected 'v1.0' or 'v1.5', got {version!r}", field="version")
    for name, value in (("vae_format", vae_format), ("whisper_format", whisper_format)):
        if value not in ("bin", "safetensors"):
            raise ConfigError(f"expected 'bin' or 'safetensors', got {value!r}", field=name)
    base = Path(root)
    configs = networks.configs
    unet_rel, unet_config_rel = _UNET_FILES[version]

    unet_state = _cpu_state(_as_module(networks.unet))
    _check_writable(base / unet_rel, f"UNet {version}", "unet", configs.unet, unet_state)
    _write_json(base / unet_config_rel, _diffusers_config(configs.unet, "UNet2DConditionModel"))
    _save(unet_state, base / unet_rel)
    del unet_state

    vae_state = _cpu_state(_as_module(networks.vae))
    vae_path = base / _VAE_FILES[0 if vae_format == "safetensors" else 1]
    _check_writable(vae_path, _LABELS["vae"], "vae", configs.vae, vae_state)
    _write_json(base / _VAE_CONFIG_FILE, _diffusers_config(configs.vae, "AutoencoderKL"))
    _save({_old_vae_key(key): tensor for key, tensor in vae_state.items()}, vae_path)
    _remove_other(base, _VAE_FILES, vae_path)
    del vae_state

    encoder_state = _cpu_state(_as_module(networks.whisper))
    whisper_path = base / _WHISPER_FILES[0 if whisper_format == "safetensors" else 1]
    _check_writable(whisper_path, _LABELS["whisper"], "whisper", configs.whisper,
                    encoder_state)
    whisper_state = _decoder_state(configs.whisper)
    whisper_state.update({f"model.encoder.{key}": tensor
                          for key, tensor in encoder_state.items()})
    _write_json(base / _WHISPER_CONFIG_FILE, dict(configs.whisper))
    _save(whisper_state, whisper_path)
    _remove_other(base, _WHISPER_FILES, whisper_path)
    return find_layout(base, version=version)


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the state dict; every tensor its own contiguous storage (safetensors
    refuses shared ones)."""
    return {key: tensor.detach().to("cpu", copy=True).contiguous()
            for key, tensor in module.state_dict().items()}


def _check_writable(path: Path, label: str, component: _Component, config: dict[str, Any],
                    state: Mapping[str, torch.Tensor]) -> None:
    expected = _expected(_as_module(_build(component, config, path, label)))
    entries = {key: _Entry(key, tuple(t.shape), _dtype_name(t.dtype)) for key, t in state.items()}
    error = _fit_error(path, label, _FileKeys(entries, [], str), expected)
    if error is not None:
        raise error


def _decoder_state(config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """``model.decoder.*`` and ``proj_out.weight`` of a seeded random Whisper model."""
    whisper = whisper_config(config)
    _fit_token_ids(whisper)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        full = WhisperForConditionalGeneration(whisper)
    state = _cpu_state(_as_module(full))
    return {key: tensor for key, tensor in state.items()
            if key.startswith(("model.decoder.", "proj_out."))}


def _fit_token_ids(config: WhisperConfig) -> None:
    """Keep the special token ids inside a small test vocabulary (the decoder's embedding
    has a padding index, which must exist)."""
    vocab = int(config.vocab_size)
    for name in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value >= vocab:
            setattr(config, name, vocab - 1)


def _diffusers_config(config: Mapping[str, Any], class_name: str) -> dict[str, Any]:
    written = dict(config)
    written.setdefault("_class_name", class_name)
    written.setdefault("_diffusers_version", diffusers.__version__)
    return written


def _write_json(path: Path, config: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".part")
    temporary.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def _save(state: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".part")
    if path.suffix == ".safetensors":
        save_file(state, str(temporary), metadata={"format": "pt"})
    else:
        torch.save(state, temporary)
    os.replace(temporary, path)


def _remove_other(base: Path, candidates: tuple[str, ...], kept: Path) -> None:
    for relative in candidates:
        if base / relative != kept:
            (base / relative).unlink(missing_ok=True)
