"""Evaluation time and peak memory of every registered scheme, next to NoPE on the plain causal kernel.

For each scheme in the registry (so schemes added later are included without editing this file), a model of
the benchmark shape (default: 4 layers, d_model 256, 4 heads, training length 1024, random weights: the cost
does not depend on the values) scores one window of 1x, 4x and 16x the training length with batch 1, through
the same scoring function as `lenx eval`. Every measurement runs in a fresh subprocess:

- CPU: peak memory = ru_maxrss (peak resident set) after the window minus the resident set just before it
  (the model is built and warmed up on a tiny window first, so the earlier peak stays below);
  tracemalloc would miss torch's allocations.
- CUDA: torch.cuda.max_memory_allocated after the window minus the allocation before it.

Time is wall-clock for the window (min over --repeat runs; memory from the first). On CPU the default dtype is
fp32 (bf16 is many times slower on CPUs without native bf16; --dtypes fp32,bf16 to measure it anyway); on CUDA
both fp32 and bf16.

    PYTHONPATH=$PWD python scripts/bench_eval.py               # table
    PYTHONPATH=$PWD python scripts/bench_eval.py --json        # one JSON object per measurement
    PYTHONPATH=$PWD python scripts/bench_eval.py --schemes alibi --multiples 16 --backend blocked
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(args) -> dict:
    """One measurement, in this (fresh) process."""
    import resource
    import time

    import torch

    sys.path.insert(0, str(ROOT))
    from lenx.errors import LengthNotSupported
    from lenx.evaluate import score_windows
    from lenx.model import LenxConfig, LenxForCausalLM

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    block = {"attn_block_size": args.block_size} if args.block_size else {}
    cfg = LenxConfig(n_layer=args.layers, d_model=args.d_model, n_head=args.heads, d_ff=4 * args.d_model,
                     train_len=args.train_len, pe=args.scheme, attn_backend=args.backend, **block)
    torch.manual_seed(0)
    model = LenxForCausalLM(cfg).to(args.device, dtype).eval()
    g = torch.Generator().manual_seed(1)
    cuda = args.device.startswith("cuda")

    def run(n):
        window = torch.randint(0, 256, (1, n + 1), generator=g)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        score_windows(model, window, None, n, args.device)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    result = {"block_size": cfg.attn_block_size, "scheme": args.scheme, "length": args.length, "dtype": args.dtype, "backend": args.backend,
              "device": args.device, "threads": torch.get_num_threads()}
    try:
        run(min(64, args.length))  # warm-up: kernels, lazy tables
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            before = _rss_bytes()
        times = [run(args.length)]
        if cuda:
            peak = torch.cuda.max_memory_allocated() - before
        else:  # ru_maxrss is in KiB on Linux
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
        times += [run(args.length) for _ in range(args.repeat - 1)]
    except LengthNotSupported as e:
        return {**result, "seconds": None, "peak_mb": None, "note": str(e)}
    return {**result, "seconds": min(times), "peak_mb": max(peak, 0) / 2**20, "note": ""}


def measure(args, scheme: str, length: int, dtype: str, backend: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--scheme", scheme, "--length", str(length), "--dtype", dtype,
           "--backend", backend, "--device", args.device, "--layers", str(args.layers), "--d-model",
           str(args.d_model), "--heads", str(args.heads), "--train-len", str(args.train_len),
           "--repeat", str(args.repeat), "--threads", str(args.threads)]
    if args.block_size:
        cmd += ["--block-size", str(args.block_size)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["?"]
        return {"scheme": scheme, "length": length, "dtype": dtype, "backend": backend, "seconds": None,
                "peak_mb": None, "note": f"failed: {tail[0]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--schemes", help="comma-separated [default: every registered scheme]")
    ap.add_argument("--multiples", default="1,4,16", help="lengths as multiples of --train-len")
    ap.add_argument("--train-len", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--backend", default="sdpa", help="attention backend for the schemes (NoPE: plain causal)")
    ap.add_argument("--block-size", type=int, default=None,
                    help="query rows per block for biased attention [default: lenx's default, as eval uses]")
    ap.add_argument("--dtypes", help="comma-separated fp32,bf16 [default: fp32 on CPU, fp32,bf16 on CUDA]")
    ap.add_argument("--device", default=None)
    ap.add_argument("--repeat", type=int, default=1, help="timed runs per measurement (min is reported)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", action="store_true", help="print one JSON object per measurement instead")
    # worker mode (one measurement in a fresh process)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--scheme", help=argparse.SUPPRESS)
    ap.add_argument("--length", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    sys.path.insert(0, str(ROOT))
    import torch

    from lenx.positional import SCHEMES

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    schemes = args.schemes.split(",") if args.schemes else list(SCHEMES)
    dtypes = args.dtypes.split(",") if args.dtypes else (["fp32", "bf16"] if args.device.startswith("cuda") else ["fp32"])
    lengths = [int(m) * args.train_len for m in args.multiples.split(",")]
    rows = []
    for dtype in dtypes:
        for length in lengths:
            base = measure(args, "nope", length, dtype, "sdpa")  # NoPE: no bias, plain causal kernel
            base["scheme"] = "nope (baseline)"
            rows.append(base)
            for scheme in schemes:
                r = measure(args, scheme, length, dtype, args.backend)
                for k, b in (("seconds", base["seconds"]), ("peak_mb", base["peak_mb"])):
                    r[f"{k}_ratio"] = r[k] / b if r[k] is not None and b else None
                rows.append(r)
                if args.json:
                    print(json.dumps(r), flush=True)
                else:
                    print(f"  measured {scheme} @ {length} {dtype}", file=sys.stderr, flush=True)
    if args.json:
        return
    print(f"\nlenx eval cost: {args.layers} layers, d_model {args.d_model}, {args.heads} heads, batch 1, device "
          f"{args.device}, backend {args.backend} (NoPE: plain causal SDPA), train length {args.train_len}\n")
    head = f"{'scheme':<16} {'tokens':>7} {'dtype':>5} {'seconds':>8} {'x NoPE':>7} {'peak MB':>8} {'x NoPE':>7}  note"
    print(head)
    print("-" * len(head))

    def f(x, fmt):
        return format(x, fmt) if x is not None else "—".rjust(int(fmt.split(".")[0]))

    for r in rows:
        print(f"{r['scheme']:<16} {r['length']:>7} {r['dtype']:>5} {f(r['seconds'], '8.2f')} "
              f"{f(r.get('seconds_ratio'), '7.2f')} {f(r['peak_mb'], '8.0f')} {f(r.get('peak_mb_ratio'), '7.2f')}  "
              f"{(r.get('note') or '')[:60]}")


if __name__ == "__main__":
    main()
