"""MuseTalk weights: the official layout and sizes, strict loading, typed errors, the check
and the ``avatarkit weights check`` command.

Full-size networks are only built on the meta device (nothing allocated); everything that
reads or writes files uses the tiny configs.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import pytest
import torch

from avatarkit.cli import main
from avatarkit.errors import ConfigError, WeightsError
from avatarkit.local_engine.musetalk.configs import MuseTalkConfigs
from avatarkit.local_engine.musetalk.networks import (
    UNetAtZero,
    build_unet,
    build_vae,
    build_whisper_encoder,
)
from avatarkit.local_engine.musetalk.weights import (
    MuseTalkNetworks,
    WeightsLayout,
    check_weights,
    find_layout,
    load_networks,
    random_networks,
    rename_vae_keys,
    write_weights_folder,
)

from .weights_folder import tiny_networks, write_tiny_weights

COMPONENTS: tuple[Literal["unet", "vae", "whisper"], ...] = ("unet", "vae", "whisper")


@pytest.fixture(scope="module")
def networks() -> MuseTalkNetworks:
    return tiny_networks(0)


@pytest.fixture(scope="module")
def folder(networks: MuseTalkNetworks, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A v1.5 tiny weights folder (.bin files); tests that change it work on a copy."""
    root = tmp_path_factory.mktemp("weights") / "models"
    write_weights_folder(root, networks)
    return root


@pytest.fixture
def copy(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / "models"
    shutil.copytree(folder, target)
    return target


def _module(value: object) -> torch.nn.Module:
    assert isinstance(value, torch.nn.Module)
    return value


def _state(module: object) -> dict[str, torch.Tensor]:
    return _module(module).state_dict()


def _assert_same_weights(a: MuseTalkNetworks, b: MuseTalkNetworks,
                         dtype: torch.dtype | None = None) -> None:
    for component in COMPONENTS:
        first, second = _state(getattr(a, component)), _state(getattr(b, component))
        assert list(first) == list(second), component
        for key, tensor in first.items():
            expected = tensor if dtype is None else tensor.to(dtype)
            assert second[key].dtype == expected.dtype, key
            assert torch.equal(second[key], expected), f"{component}: {key}"


def _rewrite(path: Path, change: Callable[[dict[str, torch.Tensor]], object]) -> None:
    """Rewrite a torch weights file with ``change(state)`` (a new dict) in its place."""
    torch.save(change(torch.load(path, weights_only=True)), path)


def _without(key: str) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    return lambda state: {k: v for k, v in state.items() if k != key}


# --------------------------------------------------------------------------- official sizes


def test_official_unet_on_meta_has_the_released_layout() -> None:
    unet = build_unet(MuseTalkConfigs.official().unet, device="meta")
    state = _state(unet)
    assert len(state) == 686
    assert sum(t.numel() for t in state.values()) == 849_947_844
    shapes = {key: list(t.shape) for key, t in state.items()}
    assert shapes["conv_in.weight"] == [320, 8, 3, 3]
    assert shapes["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"] == [320,
                                                                                          384]
    assert shapes["time_embedding.linear_1.weight"] == [1280, 320]
    assert shapes["conv_out.weight"] == [4, 320, 3, 3]
    assert shapes["down_blocks.2.attentions.0.transformer_blocks.0.ff.net.0.proj.weight"] == [
        10240, 1280]


def test_official_vae_and_whisper_parameter_counts() -> None:
    configs = MuseTalkConfigs.official()
    vae = _state(build_vae(configs.vae, device="meta"))

    def millions(*prefixes: str) -> float:
        return sum(t.numel() for k, t in vae.items() if k.startswith(prefixes)) / 1e6

    assert millions("") == pytest.approx(83.65, abs=0.01)
    assert millions("encoder.", "quant_conv.") == pytest.approx(34.16, abs=0.01)
    assert millions("decoder.", "post_quant_conv.") == pytest.approx(49.49, abs=0.01)
    whisper = _state(build_whisper_encoder(configs.whisper, device="meta"))
    assert sum(t.numel() for t in whisper.values()) / 1e6 == pytest.approx(8.21, abs=0.01)
    assert list(whisper["embed_positions.weight"].shape) == [1500, 384]


def _resnet(prefix: str, channels: int, temb: int) -> dict[str, list[int]]:
    return {
        f"{prefix}.norm1.weight": [channels], f"{prefix}.norm1.bias": [channels],
        f"{prefix}.conv1.weight": [channels, channels, 3, 3], f"{prefix}.conv1.bias": [channels],
        f"{prefix}.time_emb_proj.weight": [channels, temb],
        f"{prefix}.time_emb_proj.bias": [channels],
        f"{prefix}.norm2.weight": [channels], f"{prefix}.norm2.bias": [channels],
        f"{prefix}.conv2.weight": [channels, channels, 3, 3], f"{prefix}.conv2.bias": [channels],
    }


def _transformer(prefix: str, channels: int, context: int) -> dict[str, list[int]]:
    keys = {f"{prefix}.norm.weight": [channels], f"{prefix}.norm.bias": [channels],
            f"{prefix}.proj_in.weight": [channels, channels, 1, 1],
            f"{prefix}.proj_in.bias": [channels],
            f"{prefix}.proj_out.weight": [channels, channels, 1, 1],
            f"{prefix}.proj_out.bias": [channels]}
    block = f"{prefix}.transformer_blocks.0"
    for norm in ("norm1", "norm2", "norm3"):
        keys[f"{block}.{norm}.weight"] = keys[f"{block}.{norm}.bias"] = [channels]
    for attn, kv in (("attn1", channels), ("attn2", context)):
        keys[f"{block}.{attn}.to_q.weight"] = [channels, channels]
        keys[f"{block}.{attn}.to_k.weight"] = [channels, kv]
        keys[f"{block}.{attn}.to_v.weight"] = [channels, kv]
        keys[f"{block}.{attn}.to_out.0.weight"] = [channels, channels]
        keys[f"{block}.{attn}.to_out.0.bias"] = [channels]
    keys[f"{block}.ff.net.0.proj.weight"] = [8 * channels, channels]  # GEGLU: 2 x 4C
    keys[f"{block}.ff.net.0.proj.bias"] = [8 * channels]
    keys[f"{block}.ff.net.2.weight"] = [channels, 4 * channels]
    keys[f"{block}.ff.net.2.bias"] = [channels]
    return keys


def test_official_unet_key_inventory_of_mid_block_and_convs() -> None:
    """The names and shapes of the middle block, the outer convolutions and the time MLP,
    written out from diffusers' SD-1.x layout (research note §1.2), as the released file
    has them."""
    state = _state(build_unet(MuseTalkConfigs.official().unet, device="meta"))
    shapes = {key: list(t.shape) for key, t in state.items()}
    expected = {**_resnet("mid_block.resnets.0", 1280, 1280),
                **_transformer("mid_block.attentions.0", 1280, 384),
                **_resnet("mid_block.resnets.1", 1280, 1280)}
    assert {k: v for k, v in shapes.items() if k.startswith("mid_block.")} == expected
    outer = {"conv_in.weight": [320, 8, 3, 3], "conv_in.bias": [320],
             "conv_norm_out.weight": [320], "conv_norm_out.bias": [320],
             "conv_out.weight": [4, 320, 3, 3], "conv_out.bias": [4],
             "time_embedding.linear_1.weight": [1280, 320],
             "time_embedding.linear_1.bias": [1280],
             "time_embedding.linear_2.weight": [1280, 1280],
             "time_embedding.linear_2.bias": [1280]}
    assert {k: v for k, v in shapes.items() if not k.startswith(("down_", "mid_", "up_"))} == outer
    # level 0 of the down path: the first cross-attention takes the 384-wide audio tokens
    level0 = _transformer("down_blocks.0.attentions.0", 320, 384)
    assert {k: shapes[k] for k in level0} == level0


# --------------------------------------------------------------------------- round trips


def test_write_then_load_gives_the_same_weights(networks: MuseTalkNetworks,
                                                folder: Path) -> None:
    loaded = load_networks(folder)
    _assert_same_weights(networks, loaded)
    assert loaded.version == "v1.5"
    assert loaded.layout is not None and loaded.layout.root == folder
    assert loaded.configs.unet["block_out_channels"] == networks.configs.unet[
        "block_out_channels"]
    assert not any(p.requires_grad for p in _module(loaded.unet).parameters())


def test_v10_with_safetensors_round_trip(networks: MuseTalkNetworks, tmp_path: Path) -> None:
    layout = write_weights_folder(tmp_path, networks, version="v1.0",
                                  vae_format="safetensors", whisper_format="safetensors")
    assert layout.unet_file == tmp_path / "musetalk" / "pytorch_model.bin"
    assert layout.vae_file.name == "diffusion_pytorch_model.safetensors"
    assert layout.whisper_file.name == "model.safetensors"
    loaded = load_networks(tmp_path, version="v1.0")
    assert loaded.version == "v1.0"
    _assert_same_weights(networks, loaded)
    report = check_weights(tmp_path)
    assert report.ok and report.layout.version == "v1.0"


def test_written_files_have_the_official_key_names(networks: MuseTalkNetworks,
                                                   folder: Path) -> None:
    vae = torch.load(folder / "sd-vae" / "diffusion_pytorch_model.bin", weights_only=True)
    channels = int(networks.configs.vae["block_out_channels"][-1])
    for old in ("query", "key", "value", "proj_attn"):
        assert list(vae[f"encoder.mid_block.attentions.0.{old}.weight"].shape) == [channels,
                                                                                  channels]
        assert f"decoder.mid_block.attentions.0.{old}.bias" in vae
    assert not any(".to_q." in key or ".to_out." in key for key in vae)
    whisper = torch.load(folder / "whisper" / "pytorch_model.bin", weights_only=True)
    assert "proj_out.weight" in whisper
    assert any(key.startswith("model.decoder.layers.0.") for key in whisper)
    encoder = {k.removeprefix("model.encoder."): v for k, v in whisper.items()
               if k.startswith("model.encoder.")}
    assert encoder.keys() == _state(networks.whisper).keys()
    config = json.loads((folder / "musetalkV15" / "musetalk.json").read_text())
    assert config["_class_name"] == "UNet2DConditionModel" and "_diffusers_version" in config
    assert config["in_channels"] == 8


def test_rename_vae_keys() -> None:
    linear = torch.randn(4, 4)
    conv = torch.randn(4, 4, 1, 1)
    bias = torch.randn(4)
    renamed = rename_vae_keys({
        "encoder.mid_block.attentions.0.query.weight": linear,
        "encoder.mid_block.attentions.0.key.weight": conv,
        "encoder.mid_block.attentions.0.value.bias": bias,
        "decoder.mid_block.attentions.0.proj_attn.weight": conv,
        "decoder.mid_block.attentions.0.to_q.weight": linear,
        "decoder.mid_block.attentions.0.group_norm.weight": bias,
        "encoder.conv_in.weight": conv,   # not an attention: untouched, kept 4-D
        "encoder.mid_block.resnets.0.key.weight": conv,  # "key" outside attentions: untouched
    })
    assert torch.equal(renamed["encoder.mid_block.attentions.0.to_q.weight"], linear)
    assert torch.equal(renamed["encoder.mid_block.attentions.0.to_k.weight"], conv[:, :, 0, 0])
    assert torch.equal(renamed["encoder.mid_block.attentions.0.to_v.bias"], bias)
    assert torch.equal(renamed["decoder.mid_block.attentions.0.to_out.0.weight"],
                       conv[:, :, 0, 0])
    assert renamed["decoder.mid_block.attentions.0.to_q.weight"] is linear
    assert renamed["decoder.mid_block.attentions.0.group_norm.weight"] is bias
    assert renamed["encoder.conv_in.weight"].shape == (4, 4, 1, 1)
    assert renamed["encoder.mid_block.resnets.0.key.weight"] is conv
    assert len(renamed) == 8


def test_loads_training_checkpoints_old_vae_kernels_and_whisper_model_files(
        networks: MuseTalkNetworks, copy: Path) -> None:
    """A UNet wrapped under "state_dict" with DataParallel's "module." prefix, a VAE with the
    attention weights as 1x1 conv kernels, a WhisperModel file (``encoder.*``)."""
    unet_file = copy / "musetalkV15" / "unet.pth"
    _rewrite(unet_file, lambda s: {"state_dict": {f"module.{k}": v for k, v in s.items()},
                                   "epoch": 7})
    vae_file = copy / "sd-vae" / "diffusion_pytorch_model.bin"
    _rewrite(vae_file, lambda s: {
        k: v[:, :, None, None] if k.endswith(("query.weight", "proj_attn.weight")) else v
        for k, v in s.items()})
    whisper_file = copy / "whisper" / "pytorch_model.bin"
    _rewrite(whisper_file, lambda s: {k.removeprefix("model."): v for k, v in s.items()
                                      if k.startswith("model.")})
    assert any(v.ndim == 4 and "query" in k
               for k, v in torch.load(vae_file, weights_only=True).items())
    assert check_weights(copy).ok
    _assert_same_weights(networks, load_networks(copy))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_loads_in_half_precision(networks: MuseTalkNetworks, folder: Path,
                                 dtype: torch.dtype) -> None:
    loaded = load_networks(folder, dtype=dtype)
    _assert_same_weights(networks, loaded, dtype=dtype)


def test_half_precision_files_are_accepted(networks: MuseTalkNetworks, copy: Path) -> None:
    _rewrite(copy / "musetalkV15" / "unet.pth", lambda s: {k: v.half() for k, v in s.items()})
    report = check_weights(copy)
    assert report.ok and report.components[0].dtype == "float16"
    loaded = _state(load_networks(copy).unet)  # float32 by default: widened from fp16
    for key, tensor in _state(networks.unet).items():
        assert loaded[key].dtype == torch.float32
        assert torch.equal(loaded[key], tensor.half().float()), key


# --------------------------------------------------------------------------- errors


def test_missing_key_is_named(copy: Path) -> None:
    path = copy / "musetalkV15" / "unet.pth"
    _rewrite(path, _without("conv_out.bias"))
    with pytest.raises(WeightsError) as caught:
        load_networks(copy)
    error = caught.value
    assert error.missing == ("conv_out.bias",)
    assert error.unexpected == () and error.mismatched == ()
    assert error.file == str(path)
    assert str(path) in str(error) and "UNet v1.5" in str(error)
    assert "1 missing" in str(error) and "conv_out.bias" in str(error)


def test_unexpected_and_mismatched_keys(copy: Path) -> None:
    path = copy / "musetalkV15" / "unet.pth"

    def change(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        state["extra.weight"] = torch.zeros(3)
        state["conv_in.weight"] = torch.zeros(7, 8, 3, 3)
        return state

    _rewrite(path, change)
    with pytest.raises(WeightsError) as caught:
        load_networks(copy)
    error = caught.value
    assert error.unexpected == ("extra.weight",)
    width = int(MuseTalkConfigs.tiny().unet["block_out_channels"][0])
    assert error.mismatched == (f"conv_in.weight: expected [{width}, 8, 3, 3], got [7, 8, 3, 3]",)
    assert error.missing == ()



def test_errors_name_keys_as_the_file_spells_them(copy: Path) -> None:
    """Old VAE attention names, a ``module.`` prefix, Whisper's ``model.encoder.``: the
    error lists the keys the user can find in (or add to) the file, not the network's."""
    vae_file = copy / "sd-vae" / "diffusion_pytorch_model.bin"
    vae = torch.load(vae_file, weights_only=True)
    old = sorted(k for k in vae if k.endswith("attentions.0.query.weight"))[0]
    bias = old.replace("query.weight", "key.bias")
    assert bias in vae
    vae.pop(old)
    vae[bias] = torch.zeros(3)
    torch.save(vae, vae_file)
    unet_file = copy / "musetalkV15" / "unet.pth"
    _rewrite(unet_file, lambda s: {f"module.{k}": v for k, v in s.items()
                                   if k != "conv_out.bias"})
    whisper_file = copy / "whisper" / "pytorch_model.bin"
    whisper = torch.load(whisper_file, weights_only=True)
    gone = "model.encoder.layer_norm.bias"
    assert gone in whisper
    whisper.pop(gone)
    torch.save(whisper, whisper_file)

    report = {c.component: c for c in check_weights(copy).components}
    vae_error = report["vae"].error
    assert vae_error is not None
    assert vae_error.missing == (old,)  # not ...attentions.0.to_q.weight
    [mismatched] = vae_error.mismatched
    assert mismatched.startswith(f"{bias}: expected [") and mismatched.endswith(", got [3]")
    unet_error = report["unet"].error
    assert unet_error is not None and unet_error.missing == ("module.conv_out.bias",)
    whisper_error = report["whisper"].error
    assert whisper_error is not None and whisper_error.missing == (gone,)
    with pytest.raises(WeightsError) as caught:
        load_networks(copy)
    assert "module.conv_out.bias" in str(caught.value)

def test_non_float_tensors_are_refused(copy: Path) -> None:
    _rewrite(copy / "musetalkV15" / "unet.pth",
             lambda s: {k: v.double() if k == "conv_out.bias" else v for k, v in s.items()})
    with pytest.raises(WeightsError) as caught:
        load_networks(copy)
    assert caught.value.mismatched == (
        "conv_out.bias: expected a float32, float16 or bfloat16 tensor, got float64",)


UNPICKLED: list[str] = []


def _record_unpickling(tag: str) -> str:
    UNPICKLED.append(tag)
    return tag


class _Trap:
    """Unpickling this calls :func:`_record_unpickling`: proof that code ran."""

    def __reduce__(self) -> tuple[Callable[[str], str], tuple[str]]:
        return (_record_unpickling, ("trap",))


def test_pickled_objects_are_refused_without_unpickling(copy: Path, tmp_path: Path) -> None:
    path = copy / "musetalkV15" / "unet.pth"
    _rewrite(path, lambda s: {**s, "config": _Trap()})
    probe = tmp_path / "probe.pth"
    torch.save({"x": _Trap()}, probe)
    torch.load(probe, weights_only=False)  # the trap works: a full unpickling calls it
    assert UNPICKLED == ["trap"]
    UNPICKLED.clear()
    with pytest.raises(WeightsError) as caught:
        load_networks(copy)
    assert UNPICKLED == []
    assert caught.value.file == str(path)
    assert "not a plain state dict" in str(caught.value)
    assert "never unpickles" in str(caught.value)
    report = check_weights(copy)
    assert not report.components[0].ok and UNPICKLED == []


@pytest.mark.parametrize("component", ["unet", "whisper"])
def test_truncated_file(copy: Path, component: str) -> None:
    layout = find_layout(copy)
    path = layout.file("unet" if component == "unet" else "whisper")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError) as caught:
        load_networks(copy)
    assert caught.value.file == str(path)
    assert "corrupt or truncated" in str(caught.value)


def test_truncated_safetensors(networks: MuseTalkNetworks, tmp_path: Path) -> None:
    layout = write_weights_folder(tmp_path, networks, vae_format="safetensors")
    data = layout.vae_file.read_bytes()
    layout.vae_file.write_bytes(data[:-100])
    report = check_weights(tmp_path)
    assert [c.ok for c in report.components] == [True, False, True]
    error = report.components[1].error
    assert error is not None and error.file == str(layout.vae_file)
    assert "corrupt or truncated" in str(error)


def test_missing_whisper_folder_is_named(copy: Path) -> None:
    shutil.rmtree(copy / "whisper")
    for call in (find_layout, load_networks, check_weights):
        with pytest.raises(WeightsError) as caught:
            call(copy)
        assert caught.value.file == str(copy / "whisper")
        assert f"{copy / 'whisper'} does not exist" in str(caught.value)
        assert "sd-vae/diffusion_pytorch_model.bin" in str(caught.value)  # the expected tree


def test_missing_file_and_missing_root(copy: Path, tmp_path: Path) -> None:
    (copy / "sd-vae" / "diffusion_pytorch_model.bin").unlink()
    with pytest.raises(WeightsError) as caught:
        find_layout(copy)
    assert caught.value.file == str(copy / "sd-vae" / "diffusion_pytorch_model.bin")
    with pytest.raises(WeightsError) as caught:
        find_layout(tmp_path / "nowhere")
    assert caught.value.file == str(tmp_path / "nowhere")
    assert "does not exist" in str(caught.value)


def test_bad_json_config_is_named(copy: Path) -> None:
    config = copy / "musetalkV15" / "musetalk.json"
    config.write_text('{"in_channels": 8,')
    with pytest.raises(WeightsError) as caught:
        find_layout(copy).configs()
    assert caught.value.file == str(config)
    assert str(config) in str(caught.value) and "not valid JSON" in str(caught.value)
    with pytest.raises(WeightsError):
        load_networks(copy)
    report = check_weights(copy)
    unet, vae, whisper = report.components
    assert not unet.ok and unet.error is not None and unet.error.file == str(config)
    assert vae.ok and whisper.ok


def test_config_of_another_model_is_refused(copy: Path) -> None:
    config = copy / "sd-vae" / "config.json"
    config.write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(WeightsError, match="expected 'AutoencoderKL'") as caught:
        find_layout(copy).configs()
    assert caught.value.file == str(config)


def test_missing_configs_fall_back_to_the_official_ones(copy: Path) -> None:
    (copy / "whisper" / "config.json").unlink()
    layout = find_layout(copy)
    assert layout.whisper_config_file is None
    assert layout.config("whisper") == MuseTalkConfigs.official().whisper
    # the tiny UNet config no longer fits the official Whisper width
    with pytest.raises(WeightsError, match="cross_attention_dim"):
        layout.configs()


def test_unknown_version_is_a_config_error(folder: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        find_layout(folder, version="v2")  # type: ignore[arg-type]
    assert caught.value.field == "version" and not isinstance(caught.value, WeightsError)


def test_write_refuses_a_unet_with_a_folded_time_embedding(tmp_path: Path) -> None:
    networks = tiny_networks(3)
    UNetAtZero(networks.unet)  # folds the time embedding into the UNet in place
    with pytest.raises(WeightsError) as caught:
        write_weights_folder(tmp_path, networks)
    assert "time_embedding.linear_1.weight" in caught.value.missing


# --------------------------------------------------------------------------- version rule


def test_version_auto_rule(networks: MuseTalkNetworks, tmp_path: Path) -> None:
    only_v10 = write_weights_folder(tmp_path, networks, version="v1.0")
    assert find_layout(tmp_path).version == "v1.0"
    assert only_v10.unet_config_file == tmp_path / "musetalk" / "musetalk.json"
    with pytest.raises(WeightsError) as caught:
        find_layout(tmp_path, version="v1.5")
    assert caught.value.file == str(tmp_path / "musetalkV15")
    write_weights_folder(tmp_path, networks, version="v1.5")
    both = find_layout(tmp_path)
    assert both.version == "v1.5" and both.unet_file == tmp_path / "musetalkV15" / "unet.pth"
    assert find_layout(tmp_path, version="v1.0").unet_file == only_v10.unet_file
    (tmp_path / "musetalk" / "pytorch_model.bin").unlink()
    (tmp_path / "musetalkV15" / "unet.pth").unlink()
    with pytest.raises(WeightsError, match=r"neither musetalkV15/unet\.pth"):
        find_layout(tmp_path)


# --------------------------------------------------------------------------- check


def test_check_weights_good_folder(networks: MuseTalkNetworks, folder: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, object]] = []
    real_load = torch.load

    def spy(*args: object, **kwargs: object) -> object:
        calls.append(kwargs)
        return real_load(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch, "load", spy)
    report = check_weights(folder)
    monkeypatch.undo()
    # every file memory-mapped, nothing unpickled beyond tensors
    assert [(c["mmap"], c["weights_only"]) for c in calls] == [(True, True)] * 3
    assert report.ok
    assert [c.component for c in report.components] == list(COMPONENTS)
    for component in report.components:
        state = _state(getattr(networks, component.component))
        assert component.ok and component.error is None
        assert component.tensors == len(state)
        assert component.parameters == sum(t.numel() for t in state.values())
        assert component.dtype == "float32"
    data = report.to_json()
    assert data["ok"] is True and data["version"] == "v1.5"
    assert json.loads(json.dumps(data)) == data


def test_check_weights_broken_component(copy: Path) -> None:
    _rewrite(copy / "sd-vae" / "diffusion_pytorch_model.bin",
             _without("decoder.conv_out.weight"))
    report = check_weights(copy)
    assert not report.ok
    unet, vae, whisper = report.components
    assert unet.ok and whisper.ok and not vae.ok
    assert vae.error is not None and vae.error.missing == ("decoder.conv_out.weight",)
    entry = report.to_json()["components"]
    assert isinstance(entry, list) and entry[1]["missing"] == ["decoder.conv_out.weight"]


# --------------------------------------------------------------------------- fingerprints


def test_random_networks_are_reproducible() -> None:
    configs = MuseTalkConfigs.tiny()
    torch.manual_seed(123)
    before = torch.rand(1)
    first, second = random_networks(configs, seed=5), random_networks(configs, seed=5)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), before)  # the global RNG is left alone
    _assert_same_weights(first, second)
    other = random_networks(configs, seed=6)
    for component in COMPONENTS:
        assert first.fingerprint(component) == second.fingerprint(component)
        assert first.fingerprint(component) != other.fingerprint(component)
    assert first.version is None and first.layout is None


def test_loaded_fingerprint_is_the_file_hash_and_cached(copy: Path) -> None:
    loaded = load_networks(copy)
    assert loaded.layout is not None
    layout: WeightsLayout = loaded.layout
    for component in COMPONENTS:
        digest = hashlib.sha256(layout.file(component).read_bytes()).hexdigest()
        assert loaded.fingerprint(component) == digest
    first = loaded.fingerprint("vae")
    layout.vae_file.unlink()
    assert loaded.fingerprint("vae") == first  # cached: the file is not read again


# --------------------------------------------------------------------------- CLI


def test_cli_check_ok(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["weights", "check", str(folder)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["component", "file", "tensors"]
    assert lines[1].split()[:2] == ["unet", "musetalkV15/unet.pth"]
    assert lines[2].split()[:2] == ["vae", "sd-vae/diffusion_pytorch_model.bin"]
    assert lines[3].split()[:2] == ["whisper", "whisper/pytorch_model.bin"]
    assert all(line.endswith("OK") for line in lines[1:4])
    assert lines[4].startswith("all 3 components OK")


def test_cli_check_broken_and_json(copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _rewrite(copy / "whisper" / "pytorch_model.bin",
             _without("model.encoder.layer_norm.weight"))
    assert main(["weights", "check", str(copy)]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "layer_norm.weight" in out and "1 of 3 components failed" in out
    assert main(["weights", "check", str(copy), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is False
    assert [c["ok"] for c in data["components"]] == [True, True, False]


def test_cli_json_ok(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["weights", "check", str(folder), "--json", "--version", "v1.5"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is True and len(data["components"]) == 3


def test_cli_missing_folder_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["weights", "check", str(tmp_path / "nowhere")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "avatarkit: error:" in captured.err and str(tmp_path / "nowhere") in captured.err


def test_write_tiny_weights_helper(tmp_path: Path) -> None:
    layout = write_tiny_weights(tmp_path, version="v1.0", seed=2, whisper_format="safetensors")
    assert layout.version == "v1.0" and layout.whisper_file.suffix == ".safetensors"
    assert not (tmp_path / "whisper" / "pytorch_model.bin").exists()
    _assert_same_weights(tiny_networks(2), load_networks(tmp_path))
