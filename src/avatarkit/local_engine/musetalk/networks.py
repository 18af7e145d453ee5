"""The three networks, built from their configurations, and the two inference-time modules
the engine runs: :class:`UNetAtZero` and :class:`FaceDecoder`.

* :func:`build_unet` / :func:`build_vae` / :func:`build_whisper_encoder` create diffusers'
  ``UNet2DConditionModel`` and ``AutoencoderKL`` and transformers' ``WhisperEncoder`` with
  random weights (``device="meta"`` allocates nothing: the layout checks use that).
* :class:`UNetAtZero` is MuseTalk's single UNet step. MuseTalk always calls the UNet at
  timestep 0, so the time embedding is a constant: it is computed once and folded into the
  first convolution's bias of every ResNet block (``conv1(x) + proj(emb)`` is
  ``conv1`` with bias ``b + proj(emb)``), after which the time MLP is never run.
* :class:`FaceDecoder` turns UNet latents into face crops in ``[0, 1]``: divide by the
  scaling factor, ``post_quant_conv``, the VAE decoder. With ``rows="lower"`` it decodes only
  the lower part of the face (what MuseTalk's blend keeps) after the decoder's middle block;
  see the class for what that costs in accuracy.
* :func:`encode_latents` is the preparation side: the VAE posterior *mean* (what training
  used; MuseTalk's inference script sampled, which is not reproducible) times the scaling
  factor.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from torch import nn
from transformers import WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from .configs import FACE_SIZE, LATENT_SIZE, SCALING_FACTOR, network_kwargs

__all__ = [
    "FaceDecoder",
    "UNetAtZero",
    "build_unet",
    "build_vae",
    "build_whisper_encoder",
    "encode_latents",
    "whisper_config",
]

_Device = str | torch.device


def build_unet(config: dict[str, Any], *, device: _Device = "cpu",
               dtype: torch.dtype = torch.float32) -> UNet2DConditionModel:
    """A randomly initialised UNet (eval mode) from a ``musetalk.json``-style dict."""
    with torch.device(device):
        unet: UNet2DConditionModel = UNet2DConditionModel(**network_kwargs(config))
    nn.Module.to(unet, dtype=dtype)  # diffusers' own .to() logs a warning here
    unet.eval().requires_grad_(False)
    return unet


def build_vae(config: dict[str, Any], *, device: _Device = "cpu",
              dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    """A randomly initialised ``AutoencoderKL`` (eval mode); the scaling factor is always
    sd-vae-ft-mse's 0.18215 unless the config sets another."""
    kwargs = network_kwargs(config)
    kwargs.setdefault("scaling_factor", SCALING_FACTOR)
    with torch.device(device):
        vae: AutoencoderKL = AutoencoderKL(**kwargs)
    nn.Module.to(vae, dtype=dtype)  # diffusers' own .to() logs a warning here
    vae.eval().requires_grad_(False)
    return vae


def whisper_config(config: dict[str, Any]) -> WhisperConfig:
    """A transformers ``WhisperConfig`` from a ``config.json``-style dict."""
    return WhisperConfig(**network_kwargs(config))


def build_whisper_encoder(config: dict[str, Any], *, device: _Device = "cpu",
                          dtype: torch.dtype = torch.float32) -> WhisperEncoder:
    """A randomly initialised Whisper *encoder* (the decoder is never needed)."""
    with torch.device(device):
        encoder = WhisperEncoder(whisper_config(config))
    nn.Module.to(encoder, dtype=dtype)
    nn.Module.eval(encoder).requires_grad_(False)
    return encoder


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """``images`` ``[B, 3, H, W]`` in ``[0, 1]`` -> scaled posterior-mean latents
    ``[B, 4, H/8, W/8]``."""
    posterior = vae.encode(images * 2.0 - 1.0).latent_dist
    mean: torch.Tensor = posterior.mean
    return mean * float(vae.config["scaling_factor"])


class UNetAtZero(nn.Module):
    """MuseTalk's one UNet step: ``forward(latents [B, 8, 32, 32], audio [B, 50, C])`` ->
    ``[B, 4, 32, 32]``, equal to ``unet(latents, 0, encoder_hidden_states=audio).sample``.

    Takes ownership of ``unet``: its ResNet blocks are changed in place (time embedding
    folded into ``conv1.bias``; ``time_emb_proj`` removed), so load weights *before* wrapping.
    """

    def __init__(self, unet: UNet2DConditionModel) -> None:
        super().__init__()
        self.unet = unet
        self._fold_time_embedding()

    @torch.no_grad()
    def _fold_time_embedding(self) -> None:
        unet = self.unet
        if unet.time_embedding is None:
            raise ValueError("this UNet's time embedding was folded already (it belongs to "
                             "another UNetAtZero)")
        reference = unet.conv_in.weight
        if reference.is_meta:
            raise ValueError("UNetAtZero needs a UNet with real weights (not on the meta device)")
        timestep = torch.zeros(1, device=reference.device)
        projected = unet.time_proj(timestep).to(dtype=reference.dtype)
        emb = unet.time_embedding(projected)
        for module in unet.modules():
            if isinstance(module, ResnetBlock2D) and module.time_emb_proj is not None:
                temb = module.time_emb_proj(module.nonlinearity(emb))[0]
                if module.conv1.bias is None:
                    raise ValueError("a ResNet block without conv1 bias cannot take the time "
                                     "embedding")
                module.conv1.bias.add_(temb.to(module.conv1.bias.dtype))
                module.time_emb_proj = None  # type: ignore[assignment]
        # the time MLP is never called again; dropping it keeps it out of exports and memory
        unet.time_embedding = None  # type: ignore[assignment]

    def forward(self, latents: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        unet = self.unet
        hidden = unet.conv_in(latents)
        skips: tuple[torch.Tensor, ...] = (hidden,)
        for block in unet.down_blocks:
            if getattr(block, "has_cross_attention", False):
                hidden, residuals = block(hidden, temb=None, encoder_hidden_states=audio)
            else:
                hidden, residuals = block(hidden, temb=None)
            skips += residuals
        hidden = unet.mid_block(hidden, None, encoder_hidden_states=audio)
        for block in unet.up_blocks:
            count = len(block.resnets)  # type: ignore[arg-type]
            residuals, skips = skips[-count:], skips[:-count]
            if getattr(block, "has_cross_attention", False):
                hidden = block(hidden, res_hidden_states_tuple=residuals, temb=None,
                               encoder_hidden_states=audio)
            else:
                hidden = block(hidden, res_hidden_states_tuple=residuals, temb=None)
        hidden = unet.conv_norm_out(hidden)
        hidden = unet.conv_act(hidden)
        out: torch.Tensor = unet.conv_out(hidden)
        return out


class FaceDecoder(nn.Module):
    """UNet latents ``[B, 4, 32, 32]`` -> face crops ``[B, 3, rows, 256]`` in ``[0, 1]``.

    ``rows="full"`` decodes the whole 256x256 crop (``rows`` = 256), exactly as
    ``vae.decode(latents / scaling_factor)`` followed by MuseTalk's ``x / 2 + 0.5`` clamp.

    ``rows="lower"`` decodes from pixel row :attr:`first_row` down (the default
    ``halo=4`` latent rows above the middle: pixel rows 96..255). MuseTalk's blend keeps only
    the lower half of the face plus a feather, so the rows above are never shown. The decoder's
    middle block (the only global attention) still runs on the whole 32x32 latent; the up
    blocks, about 88 % of the decoder's FLOPs, see only the lower rows, which saves ~35-40 % of
    the decode. It is not bit-exact: every GroupNorm of the up blocks takes its statistics over
    the rows it sees, and convolutions near the cut see zero padding instead of the rows
    above. ``tests/local_engine/musetalk`` measures the difference against the full decode.
    """

    def __init__(self, vae: AutoencoderKL, *, rows: Literal["full", "lower"] = "full",
                 halo: int = 4) -> None:
        super().__init__()
        if rows not in ("full", "lower"):
            raise ValueError(f"rows: expected 'full' or 'lower', got {rows!r}")
        if not 0 <= halo <= LATENT_SIZE // 2:
            raise ValueError(f"halo: expected 0..{LATENT_SIZE // 2} latent rows, got {halo}")
        self.post_quant_conv = vae.post_quant_conv
        self.decoder = vae.decoder
        self.scaling = float(vae.config["scaling_factor"])
        self.rows = rows
        self.first_latent_row = 0 if rows == "full" else LATENT_SIZE // 2 - halo
        self.first_row = self.first_latent_row * (FACE_SIZE // LATENT_SIZE)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        decoder = self.decoder
        z = latents / self.scaling
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        sample = decoder.conv_in(z)
        sample = decoder.mid_block(sample, None)
        if self.first_latent_row:
            sample = sample[:, :, self.first_latent_row:, :]
        for block in decoder.up_blocks:
            sample = block(sample, None)
        sample = decoder.conv_norm_out(sample)
        sample = decoder.conv_act(sample)
        sample = decoder.conv_out(sample)
        faces: torch.Tensor = (sample / 2 + 0.5).clamp(0.0, 1.0)
        return faces
