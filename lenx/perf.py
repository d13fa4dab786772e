"""Model FLOPs and a measured matrix-multiply peak: for MFU figures and sweep time estimates."""

from __future__ import annotations

import time
from functools import lru_cache

import torch


def n_params(d_model: int, layers: int, d_ff: int, vocab: int) -> int:
    """Matrix parameters that each token passes through (embeddings tied: counted once, as the output head)."""
    per_layer = 4 * d_model * d_model + 2 * d_model * d_ff
    return layers * per_layer + d_model * vocab


def train_flops_per_token(d_model: int, layers: int, d_ff: int, vocab: int, seq_len: int) -> float:
    """PaLM's estimate (Chowdhery et al. 2022, appendix B): 6N + 12 * layers * d_model * seq_len."""
    return 6 * n_params(d_model, layers, d_ff, vocab) + 12 * layers * d_model * seq_len


def eval_flops_per_token(d_model: int, layers: int, d_ff: int, vocab: int, seq_len: int) -> float:
    """Forward only: a third of the training estimate."""
    return train_flops_per_token(d_model, layers, d_ff, vocab, seq_len) / 3


def measure_matmul_peak(device: str = "cpu", dtype: torch.dtype = torch.float32, n: int = 1024,
                        seconds: float = 0.5) -> float:
    """Sustained FLOP/s of an n x n matrix multiply on this device and dtype, measured now."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    sync()
    return 2 * n**3 * reps / (time.perf_counter() - t0)


@lru_cache(maxsize=4)
def matmul_peak(device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """`measure_matmul_peak`, once per process for each device and dtype (a run's MFU, a sweep's estimates)."""
    return measure_matmul_peak(device, dtype)
