"""The MuseTalk engine's options (torch-free, so configs can validate them without torch)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["MuseTalkOptions", "Precision"]

Precision = Literal["auto", "fp32", "fp16", "bf16"]


class MuseTalkOptions(BaseModel):
    """How the MuseTalk engine runs (``[providers.local.musetalk]`` in a config)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    device: str = Field("auto", description="auto (CUDA when available, else CPU), cpu, "
                                            "cuda or cuda:N")
    precision: Precision = Field("auto", description="auto (fp16 on CUDA, fp32 on CPU), "
                                                     "fp32, fp16, bf16")
    backend: Literal["torch", "onnx"] = Field("torch", description="torch, or ONNX Runtime")
    batch_size: int = Field(8, ge=1, le=64, description="frames per network call")
    decode_rows: Literal["full", "lower"] = Field(
        "full", description="decode the whole face, or only its lower rows (faster, "
                            "approximate: see FaceDecoder)")
    compile: bool = Field(False, description="torch.compile the networks (torch backend)")
    cuda_graphs: bool = Field(False, description="replay the networks as one CUDA graph "
                                                 "(torch backend on CUDA)")
    onnx_providers: tuple[str, ...] | Literal["auto"] = Field(
        "auto", description="ONNX Runtime execution providers (auto: TensorRT, CUDA, CPU)")
    silence_db: float = Field(-50.0, le=0.0, allow_inf_nan=False,
                              description="audio windows quieter than this (dBFS RMS) "
                                          "show the closed-mouth source frame")
    max_context_s: float = Field(20.0, gt=1.0, le=29.0, allow_inf_nan=False,
                                 description="audio history the Whisper window keeps (s)")
    version: Literal["auto", "v1.0", "v1.5"] = Field(
        "auto", description="which UNet weights of the folder (auto: v1.5 when present)")
    profile: bool = Field(False, description="synchronise the device between stages and "
                                             "record per-stage times (benchmarks)")

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:")
                                                 and value[5:].isdigit()):
            return value
        raise ValueError(f"expected auto, cpu, cuda or cuda:N, got {value!r}")
