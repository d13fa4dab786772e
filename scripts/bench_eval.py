"""Evaluation time and peak memory of every registered scheme, next to NoPE and to transformers peers.

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

Peers (skip them with --no-hf): lenx-rope, lenx-alibi and lenx-learned are each followed by a `transformers`
model of the same size with the same positional scheme, built by bench_train.hf_models (random weights):
Llama (sdpa), Bloom (eager, the only attention transformers offers for Bloom) and GPT-2 (sdpa). A peer is
measured like the lenx models (own subprocess, same dtype, same window, the same scoring function: logits of
every position and their NLL, no grad, eval mode, no KV cache), and its lenx row gains peer time / lenx time and
peer peak / lenx peak (> 1: lenx is faster / smaller). Llama's max_position_embeddings is set to the longest
length (declared only: its rotary embedding has no table); GPT-2's position table has --train-len entries, so
past it GPT-2 has no row of numbers, as lenx-learned has none. Bloom's eager attention materialises the
heads x L x L scores (with the mask added, as a float32 softmax, and the float mask itself): a length whose
estimate exceeds --mem-budget is skipped with a note instead of being run.

    PYTHONPATH=$PWD python scripts/bench_eval.py               # table
    PYTHONPATH=$PWD python scripts/bench_eval.py --json        # one JSON object per measurement
    PYTHONPATH=$PWD python scripts/bench_eval.py --schemes alibi --multiples 16 --backend blocked
    PYTHONPATH=$PWD python scripts/bench_eval.py --schemes rope --rope-scaling yarn,llama3,longrope --multiples 16
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


# the transformers model measured next to each lenx scheme (names as bench_train.hf_models gives them)
PEERS = {"rope": "hf-llama (rope, sdpa)", "alibi": "hf-bloom (alibi, eager)", "learned": "hf-gpt2 (learned, sdpa)"}


def eager_scores_bytes(heads: int, length: int, dtype) -> int:
    """Peak of transformers' eager attention in one layer (batch 1): the heads x L x L scores, the scores plus
    the mask (a new tensor), their float32 softmax (and its cast back, unless float32), and the L x L float mask.
    Scores only: at 4 layers, d 256, 4 heads, fp32 on CPU, 13 GiB at 16,384 tokens; Bloom's measured peak was
    17.2 GiB."""
    import torch

    size = torch.finfo(dtype).bits // 8
    per_score = 2 * size + 4 + (size if dtype != torch.float32 else 0)
    return heads * length**2 * per_score + length**2 * size


def build_peer(args, cfg, dtype):
    """The transformers peer args.peer, of cfg's size, and a note saying why it is not run at args.length (or "")."""
    from types import SimpleNamespace

    import torch
    from bench_train import hf_models  # this script's directory is on sys.path

    dims = SimpleNamespace(vocab=cfg.vocab_size, d_model=cfg.d_model, layers=cfg.n_layer, heads=cfg.n_head,
                           d_ff=cfg.d_ff, seq=cfg.train_len)
    torch.manual_seed(0)
    model = hf_models(dims, max_len=args.max_len)[args.peer]()
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and args.length > limit:
        return model, f"{args.peer.split(' ')[0]} has {limit} positions (max_position_embeddings)"
    if model.config._attn_implementation == "eager":
        need = eager_scores_bytes(cfg.n_head, args.length, dtype) / 2**30
        if need > args.mem_budget:
            return model, (f"skipped: eager attention needs ~{need:.3g} GiB of scores > --mem-budget "
                          f"{args.mem_budget:.3g} GiB")
    return model, ""


def worker(args) -> dict:
    """One measurement, in this (fresh) process."""
    import resource
    import time

    import torch

    sys.path.insert(0, str(ROOT))
    from lenx.errors import LengthNotSupported
    from lenx.windows import score_windows
    from lenx.model import LenxConfig, LenxForCausalLM

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    block = {"attn_block_size": args.block_size} if args.block_size else {}
    pe, _, scaling = args.scheme.partition("+")  # "rope+yarn:beta_fast=16": a RoPE extension at evaluation
    cfg = LenxConfig(n_layer=args.layers, d_model=args.d_model, n_head=args.heads, d_ff=4 * args.d_model,
                     train_len=args.train_len, pe=pe, attn_backend=args.backend, **block)
    result = {"block_size": cfg.attn_block_size, "scheme": args.peer or args.scheme, "length": args.length,
              "dtype": args.dtype, "backend": args.backend, "device": args.device, "threads": torch.get_num_threads()}
    if args.peer:
        model, note = build_peer(args, cfg, dtype)
        result.update(peer_of=args.scheme, backend=model.config._attn_implementation)
        if note:
            return {**result, "seconds": None, "peak_mb": None, "note": note}
    else:
        torch.manual_seed(0)
        model = LenxForCausalLM(cfg)
        if scaling:
            from lenx.positional.rope_scaling import is_static

            model.pe.set_eval_scaling(scaling, max(1.0, args.length / args.train_len) if is_static(scaling) else None)
    model = model.to(args.device, dtype).eval()
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
    except (torch.OutOfMemoryError, RuntimeError) as e:  # CPU: RuntimeError "...can't allocate memory..."
        if "memory" not in str(e):
            raise
        return {**result, "seconds": None, "peak_mb": None, "note": f"out of memory: {str(e).splitlines()[0][-120:]}"}
    return {**result, "seconds": min(times), "peak_mb": max(peak, 0) / 2**20, "note": ""}


def measure(args, scheme: str, length: int, dtype: str, backend: str, peer: str | None = None) -> dict:
    """One measurement in a fresh subprocess: lenx with this scheme, or (given peer) its transformers peer."""
    cmd = [sys.executable, __file__, "--worker", "--scheme", scheme, "--length", str(length), "--dtype", dtype,
           "--backend", backend, "--device", args.device, "--layers", str(args.layers), "--d-model",
           str(args.d_model), "--heads", str(args.heads), "--train-len", str(args.train_len),
           "--repeat", str(args.repeat), "--threads", str(args.threads)]
    if args.block_size:
        cmd += ["--block-size", str(args.block_size)]
    if peer:
        cmd += ["--peer", peer, "--max-len", str(args.max_len), "--mem-budget", str(args.mem_budget)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or [f"killed by signal {-proc.returncode}" if proc.returncode < 0
                                                         else f"exit status {proc.returncode}"]
        return {"scheme": peer or scheme, "length": length, "dtype": dtype, "backend": backend, "seconds": None,
                "peak_mb": None, "note": f"failed: {tail[0]}", **({"peer_of": scheme} if peer else {})}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ratio(num, den):
    return num / den if num is not None and den else None


def mem_available() -> int:
    """Bytes the kernel reports available for new allocations (MemAvailable)."""
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--schemes", help="comma-separated [default: every registered scheme]")
    ap.add_argument("--multiples", default="1,4,16", help="lengths as multiples of --train-len")
    ap.add_argument("--rope-scaling", default="",
                    help="comma-separated RoPE extensions (settings as in `lenx eval`), each a row rope+SETTING "
                         "after rope's, factor length / train length")
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
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers peers")
    ap.add_argument("--mem-budget", type=float, default=None,
                    help="GiB a peer's eager attention scores may take, else the length is skipped "
                         "[default: half the memory available at the start]")
    ap.add_argument("--json", action="store_true", help="print one JSON object per measurement instead")
    # worker mode (one measurement in a fresh process)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--scheme", help=argparse.SUPPRESS)
    ap.add_argument("--length", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--peer", help=argparse.SUPPRESS)
    ap.add_argument("--max-len", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    sys.path.insert(0, str(ROOT))
    import torch

    from lenx.positional import SCHEMES

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    schemes = args.schemes.split(",") if args.schemes else list(SCHEMES)
    if args.rope_scaling:  # each extension right after rope (or at the end, when rope is not measured)
        extra = [f"rope+{x}" for x in args.rope_scaling.split(",") if x]
        at = schemes.index("rope") + 1 if "rope" in schemes else len(schemes)
        schemes[at:at] = extra
    dtypes = args.dtypes.split(",") if args.dtypes else (["fp32", "bf16"] if args.device.startswith("cuda") else ["fp32"])
    lengths = [int(m) * args.train_len for m in args.multiples.split(",")]
    args.max_len = max(lengths)
    if args.mem_budget is None:  # GiB, passed on to the peers' workers
        free = torch.cuda.mem_get_info(args.device)[0] if args.device.startswith("cuda") else mem_available()
        args.mem_budget = free / 2 / 2**30
    rows = []

    from lenx.hardware import this_cpu

    def emit(r):
        r["cpu"] = this_cpu().describe() if args.device.startswith("cpu") else torch.cuda.get_device_name(args.device)
        rows.append(r)
        if args.json:
            print(json.dumps(r), flush=True)
        else:
            print(f"  measured {r['scheme']} @ {r['length']} {r['dtype']}", file=sys.stderr, flush=True)

    for dtype in dtypes:
        for length in lengths:
            base = measure(args, "nope", length, dtype, "sdpa")  # NoPE: no bias, plain causal kernel
            base["scheme"] = "nope (baseline)"
            emit(base)
            for scheme in schemes:
                r = measure(args, scheme, length, dtype, args.backend)
                for k, b in (("seconds", base["seconds"]), ("peak_mb", base["peak_mb"])):
                    r[f"{k}_ratio"] = ratio(r[k], b)
                peer = None if args.no_hf else PEERS.get(scheme)
                if peer:  # measured right after its lenx row; the ratios are peer / lenx (> 1: lenx faster, smaller)
                    p = measure(args, scheme, length, dtype, args.backend, peer=peer)
                    r.update(peer=peer, vs_peer_seconds=ratio(p["seconds"], r["seconds"]),
                             vs_peer_peak_mb=ratio(p["peak_mb"], r["peak_mb"]))
                emit(r)
                if peer:
                    emit(p)
    if args.json:
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"lenx eval cost: {args.layers} layers, d_model {args.d_model}, {args.heads} heads, batch 1, "
                    f"device {args.device}, backend {args.backend} (NoPE: plain causal SDPA), train length "
                    f"{args.train_len}; {rows[0]['cpu'] if rows else ''}",
              caption="× NoPE: scheme / NoPE baseline. peer ÷ lenx: the transformers peer's time (peak memory) "
                      "divided by lenx's, > 1 is lenx faster (smaller).")
    for col in ("scheme", "tokens", "dtype", "seconds", "× NoPE", "peak MB", "× NoPE ", "peer ÷ lenx time",
                "peer ÷ lenx memory", "note"):
        t.add_column(col, justify="left" if col in ("scheme", "note") else "right")

    def f(x, fmt):
        return format(x, fmt) if x is not None else "—"

    for r in rows:
        name = f" └ {r['scheme']}" if "peer_of" in r else r["scheme"]
        t.add_row(name, f"{r['length']:,}", r["dtype"], f(r["seconds"], ".2f"), f(r.get("seconds_ratio"), ".2f"),
                  f(r["peak_mb"], ".0f"), f(r.get("peak_mb_ratio"), ".2f"),
                  f(r.get("vs_peer_seconds"), ".2f") if "peer" in r else "",
                  f(r.get("vs_peer_peak_mb"), ".2f") if "peer" in r else "", r.get("note") or "")
    console = Console()
    if not console.is_terminal:  # piped: rich's default of 80 columns would fold every cell
        console.width = 160
    console.print(t)


if __name__ == "__main__":
    main()
