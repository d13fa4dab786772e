"""Model FLOPs and a measured matrix-multiply peak: for MFU figures and sweep time estimates."""

from __future__ import annotations

import time

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
                        seconds: float = 0.5, threads: int | None = None, repeats: int = 5, workers: int = 1) -> float:
    """Sustained FLOP/s of an n x n matrix multiply on this device and dtype, measured now: the median of `repeats`
    timings of `seconds` / `repeats` each, after a warm-up as long as one of them (a CPU's clock and caches, a GPU's
    kernels, settle first). `threads`: the intra-op threads the measured work uses (default: this thread's
    setting); the peak must be taken at the thread count of the step it is compared with. `workers` > 1 (CPU):
    that many multiplies side by side, `threads` split among them, their rates added, as lenx's row shards run
    (`lenx.step`): on a shared machine a multiply spread over every core stalls whenever one core is taken, and would
    understate what shards, one core each, reach."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    before = torch.get_num_threads()
    total = threads if threads is not None else before
    workers = 1 if device.startswith("cuda") else max(1, min(workers, total))
    each = seconds / repeats

    def one(_) -> float:
        torch.set_num_threads(max(1, total // workers))  # this thread's own setting
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        return _time_matmuls(a, b, each, sync)

    try:
        if workers == 1:
            if threads is not None and not device.startswith("cuda"):
                torch.set_num_threads(threads)
            a = torch.randn(n, n, device=device, dtype=dtype)
            b = torch.randn(n, n, device=device, dtype=dtype)
            _time_matmuls(a, b, each, sync)  # warm-up
            rates = sorted(_time_matmuls(a, b, each, sync) for _ in range(repeats))
        else:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(workers) as pool:
                rounds = [sum(pool.map(one, range(workers))) for _ in range(repeats + 1)]
            rates = sorted(rounds[1:])  # the first round is the warm-up
    finally:
        torch.set_num_threads(before)
    return 2 * n**3 * rates[len(rates) // 2]


def _time_matmuls(a, b, seconds: float, sync) -> float:
    """Multiplies per second, over at least `seconds` and at least 2 multiplies."""
    sync()
    reps, t0 = 0, time.perf_counter()
    while reps < 2 or time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    sync()
    return reps / (time.perf_counter() - t0)


_PEAKS: dict[tuple, tuple[float, float]] = {}  # (device, dtype, threads, workers) -> (peak, when measured)
PEAK_MAX_AGE = 60.0  # seconds: a shared machine's load changes between runs of one sweep


def matmul_peak(device: str = "cpu", dtype: torch.dtype = torch.float32, threads: int | None = None,
                workers: int = 1) -> float:
    """`measure_matmul_peak` for this device, dtype, thread count and workers, measured again when the last
    measurement is older than PEAK_MAX_AGE: a run's MFU is divided by a peak of about its own time, a sweep's many
    short runs do not each pay for one."""
    key = (device, dtype, threads, workers)
    now = time.monotonic()
    if key not in _PEAKS or now - _PEAKS[key][1] > PEAK_MAX_AGE:
        _PEAKS[key] = (measure_matmul_peak(device, dtype, threads=threads, workers=workers), now)
    return _PEAKS[key][0]


def utilisation(flops_per_s: float, peak: float) -> tuple[float, str | None]:
    """MFU, and a warning when it exceeds 1: a step cannot outrun the matmul peak, so the peak was measured low
    (another process took the cores then, or the clock was still ramping). The figure is kept as computed, with
    the warning beside it, rather than clipped to a number that was never measured."""
    mfu = flops_per_s / peak
    if mfu <= 1.0:
        return mfu, None
    return mfu, (f"MFU {mfu:.0%} is above 100%: the matmul peak ({peak / 1e9:.0f} GFLOP/s) was measured low, "
                 "disturbed by other work on the machine; treat this run's MFU as unknown")
