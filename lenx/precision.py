"""How a device runs the model: the matmul precision (`--precision auto` resolved per device) and torch.compile."""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch

from .errors import LenxError

PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class Choice:
    precision: str  # "fp32" or "bf16"
    reason: str


def choose(precision: str, device: str, measure: Callable[[], dict[str, float]] | None = None, cpu=None) -> Choice:
    """The precision a run trains in, and why. `measure`: times a step in each precision (seconds per step by
    precision), called only on a CPU whose features are unknown and for which no answer is cached; without it
    that case is fp32. `cpu`: a lenx.hardware.CPU (default: this machine's)."""
    if precision not in PRECISIONS:
        raise LenxError(f"unknown precision '{precision}'; known: {', '.join(PRECISIONS)}")
    cuda = device.startswith("cuda")
    if precision != "auto":
        if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
            raise LenxError("this GPU has no bf16 support; use --precision fp32")
        return Choice(precision, "asked for")
    if cuda:
        if torch.cuda.is_bf16_supported():
            return Choice("bf16", "auto: the GPU supports bf16")
        return Choice("fp32", "auto: the GPU has no bf16 support")
    from .hardware import this_cpu

    cpu = cpu or this_cpu()
    if cpu.bf16_units is True:
        units = ", ".join(f for f in cpu.features if f in ("avx512_bf16", "amx_bf16", "bf16"))
        return Choice("bf16", f"auto: the CPU has bf16 matrix units ({units})")
    if cpu.bf16_units is False:
        return Choice("fp32", "auto: the CPU has no bf16 matrix units (bf16 would be emulated)")
    return _measured(cpu, measure)


def _measured(cpu, measure) -> Choice:
    """The unknown-features case: a cached answer for this machine, else a measurement (then cached)."""
    key = machine_key(cpu)
    cached = _read_cache().get(key)
    if cached in ("fp32", "bf16"):
        return Choice(cached, "auto: CPU features unknown; the faster precision measured earlier on this machine")
    if measure is None:
        return Choice("fp32", "auto: CPU features unknown and nothing measured")
    seconds = measure()
    best = min(("fp32", "bf16"), key=lambda p: seconds[p])
    _write_cache(key, best)
    return Choice(best, f"auto: CPU features unknown; measured a step at fp32 {seconds['fp32'] * 1e3:.1f} ms, "
                        f"bf16 {seconds['bf16'] * 1e3:.1f} ms")


def machine_key(cpu) -> str:
    return f"{cpu.name}|{cpu.arch}|{torch.__version__}|{torch.get_num_threads()}"


def _cache_path():
    from .data import cache_dir

    return cache_dir() / "precision.json"


def _read_cache() -> dict:
    try:
        data = json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(key: str, precision: str) -> None:
    from .io import write_json

    data = _read_cache()
    data[key] = precision
    try:
        _cache_path().parent.mkdir(parents=True, exist_ok=True)
        write_json(_cache_path(), data)
    except OSError:
        pass  # a read-only cache: the next run measures again


def time_steps(step: Callable[[str], None], repeats: int = 3) -> dict[str, float]:
    """Seconds per step in each precision: `step(precision)` runs one; after one warm-up step each, the fastest of
    `repeats` (alternating, so that drift hits both alike)."""
    best = {"fp32": float("inf"), "bf16": float("inf")}
    for p in best:
        step(p)
    for _ in range(repeats):
        for p in best:
            t0 = time.perf_counter()
            step(p)
            best[p] = min(best[p], time.perf_counter() - t0)
    return best


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
