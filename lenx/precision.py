"""How a device runs the model: the matmul precision (`--precision auto` resolved per device) and torch.compile."""

from __future__ import annotations

import os
import shutil
from contextlib import nullcontext

import torch

from .errors import LenxError


def resolve_precision(precision: str, device: str) -> str:
    if precision != "auto":
        if precision == "bf16" and device.startswith("cuda") and not torch.cuda.is_bf16_supported():
            raise LenxError("this GPU has no bf16 support; use --precision fp32")
        return precision
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    # CPUs without native bf16 matrix units (AVX2, e.g. this project's CI machines) run bf16
    # autocast many times slower than fp32; only AMX / AVX512-BF16 parts gain from it.
    return "bf16" if _cpu_has_native_bf16() else "fp32"


def _cpu_has_native_bf16() -> bool:
    return torch.backends.cpu.get_cpu_capability() in ("AVX512_BF16", "AMX")


def precision_dtype(precision: str) -> torch.dtype:
    """The matmul dtype of a resolved precision ("fp32" or "bf16")."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def autocast(precision: str, device: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
    return nullcontext()


def compile_problem(device: str) -> str | None:
    """Why torch.compile cannot run here, or None: inductor builds CPU kernels with a C++ compiler."""
    if device.startswith("cpu") and not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++")):
        return "torch.compile on the CPU needs a C++ compiler (g++ or clang++), and none is on PATH"
    return None


def compile_model(model, **options):
    """torch.compile, from scratch: torch 2.13's inductor cache, when warm, replays views of a graph's outputs
    with garbage shapes ("shape '[94090752410837, ...]' is invalid") wherever a graph breaks between them."""
    import warnings

    import torch._inductor.config as inductor_config

    inductor_config.force_disable_caches = True
    warnings.filterwarnings("ignore", message="dynamo_pgo force disabled")  # the expected effect of the line above
    return torch.compile(model, **options)
