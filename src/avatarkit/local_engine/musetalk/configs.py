"""The three networks' configurations: the official MuseTalk values and a tiny variant.

The official values are those of the released weights (``musetalk.json`` of v1.0 and v1.5,
``sd-vae/config.json`` of ``stabilityai/sd-vae-ft-mse`` and ``whisper/config.json`` of
``openai/whisper-tiny``); ``shared/research/musetalk-internals.md`` §1 lists where each one
comes from. A weights folder carries its own JSON files and those win; these are the fallback
when a file is missing and the reference the tests check the layout against.

:func:`MuseTalkConfigs.tiny` keeps every architectural choice (block types, four down and up
levels, eight heads, GEGLU, the 8-channel input, five Whisper hidden states, the 8x VAE
downsampling from 256x256 to 32x32) and shrinks only the widths, so the whole pipeline runs
in tests on a CPU in milliseconds per frame.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "FACE_SIZE",
    "LATENT_CHANNELS",
    "LATENT_SIZE",
    "SCALING_FACTOR",
    "UNET_CONFIG",
    "VAE_CONFIG",
    "WHISPER_CONFIG",
    "MuseTalkConfigs",
    "network_kwargs",
]

#: the face crop the networks see (pixels, square)
FACE_SIZE = 256
#: the latent the UNet works on (FACE_SIZE / 8)
LATENT_SIZE = 32
LATENT_CHANNELS = 4
#: sd-vae-ft-mse's latent scaling (diffusers' default; not in its config.json)
SCALING_FACTOR = 0.18215

UNET_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,  # diffusers reads this as the number of heads
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 384,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 8,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"],
}

VAE_CONFIG: dict[str, Any] = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 256,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

WHISPER_CONFIG: dict[str, Any] = {
    "model_type": "whisper",
    "d_model": 384,
    "encoder_layers": 4,
    "encoder_attention_heads": 6,
    "encoder_ffn_dim": 1536,
    "decoder_layers": 4,
    "decoder_attention_heads": 6,
    "decoder_ffn_dim": 1536,
    "num_mel_bins": 80,
    "max_source_positions": 1500,
    "max_target_positions": 448,
    "vocab_size": 51865,
    "activation_function": "gelu",
    "scale_embedding": False,
}

#: keys of a config file that describe the file, not the network
_META_KEYS = frozenset({"_class_name", "_diffusers_version", "_name_or_path", "architectures",
                        "model_type", "transformers_version", "torch_dtype", "dtype"})


def network_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` without the bookkeeping keys (``_class_name``, versions...)."""
    return {k: v for k, v in config.items() if k not in _META_KEYS}


@dataclass(frozen=True)
class MuseTalkConfigs:
    """The configurations of the UNet, the VAE and the Whisper encoder (plain dicts, as in the
    JSON files; copies, so callers may not change the module constants through them)."""

    unet: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(UNET_CONFIG))
    vae: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(VAE_CONFIG))
    whisper: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(WHISPER_CONFIG))

    @classmethod
    def official(cls) -> MuseTalkConfigs:
        """The released weights' configuration (849.9 M UNet parameters)."""
        return cls()

    @classmethod
    def tiny(cls, *, width: int = 32, audio_dim: int = 48) -> MuseTalkConfigs:
        """The same architecture with narrow layers: UNet channels ``width x [1, 2, 2, 2]``,
        VAE channels ``[16, 16, 32, 32]``, a 4-layer Whisper encoder of ``audio_dim``."""
        unet = copy.deepcopy(UNET_CONFIG)
        unet.update(block_out_channels=[width, 2 * width, 2 * width, 2 * width],
                    cross_attention_dim=audio_dim, norm_num_groups=8, sample_size=32)
        vae = copy.deepcopy(VAE_CONFIG)
        vae.update(block_out_channels=[16, 16, 32, 32], norm_num_groups=8)
        whisper = copy.deepcopy(WHISPER_CONFIG)
        whisper.update(d_model=audio_dim, encoder_attention_heads=2, encoder_ffn_dim=2 * audio_dim,
                       decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=2 * audio_dim,
                       vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                       decoder_start_token_id=3)
        return cls(unet=unet, vae=vae, whisper=whisper)

    @property
    def audio_dim(self) -> int:
        """Width of the audio tokens (Whisper's ``d_model`` = the UNet's cross-attention)."""
        return int(self.whisper["d_model"])

    def check(self) -> None:
        """Raise ``ValueError`` when the three do not fit together."""
        if int(self.unet["cross_attention_dim"]) != self.audio_dim:
            raise ValueError(f"unet.cross_attention_dim ({self.unet['cross_attention_dim']}) "
                             f"must equal whisper.d_model ({self.audio_dim})")
        if int(self.unet["in_channels"]) != 2 * int(self.vae["latent_channels"]):
            raise ValueError("unet.in_channels must be twice vae.latent_channels (masked + "
                             "reference latents)")
        if int(self.whisper["encoder_layers"]) != 4:
            raise ValueError("whisper.encoder_layers must be 4: MuseTalk's audio tokens are "
                             "the 5 hidden states of a 4-layer encoder")
        if len(self.vae["block_out_channels"]) != 4:
            raise ValueError("vae.block_out_channels must have 4 levels (256 -> 32 pixels)")
