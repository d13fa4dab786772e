"""Seconds and peak memory of one probe cell (passkey, mqar, repeat) next to one perplexity cell of the same length.

For each scheme (default: alibi, rope), a lenx run of the CPU study's shape (default: 4 layers, d_model 128, 4
heads, byte-level, training length 128, random weights: the cost does not depend on the values) is saved to a
temporary directory and scored on the embedded stdlib corpus through the cell kinds `lenx eval` uses, at 1x, 4x and
16x its training length:

- `perplexity`: one nonoverlap cell (`--tokens` scored targets, default 65,536, as `lenx eval`);
- `passkey`: one cell at depth 0.5, `--trials` windows (default 20, as `lenx eval --probe`);
- `mqar`, `repeat`: one cell at the longest distance that fits, `--trials` windows (repeat: twice as many
  forwards, with and without the first copy).

Each measurement runs in a fresh subprocess: seconds = wall-clock of the kind's `score` (the text is loaded and the
model warmed up first), peak = ru_maxrss after it minus the resident set just before it (CPU), or
torch.cuda.max_memory_allocated over the allocation before it (CUDA).

    PYTHONPATH=$PWD python scripts/bench_probes.py                 # table
    PYTHONPATH=$PWD python scripts/bench_probes.py --json          # one JSON object per measurement
    PYTHONPATH=$PWD python scripts/bench_probes.py --schemes alibi --multiples 16 --trials 5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHAT = ("perplexity", "passkey", "mqar", "repeat")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_run(root: Path, args) -> Path:
    """A finished lenx run directory with random weights, byte-level, trained (nominally) on stdlib."""
    import torch

    from lenx.model import LenxConfig, LenxForCausalLM

    run = root / f"{args.scheme}-L{args.train_len}-s0"
    torch.manual_seed(0)
    cfg = LenxConfig(vocab_size=257, eod_token_id=256, n_layer=args.layers, d_model=args.d_model, n_head=args.heads,
                     d_ff=4 * args.d_model, train_len=args.train_len, pe=args.scheme)
    LenxForCausalLM(cfg).save_pretrained(run)
    config = {"pe": args.scheme, "seed": 0, "train_len": args.train_len, "dataset": "stdlib", "tokenizer": "byte"}
    (run / "run.json").write_text(json.dumps({"status": "done", "config": config}))
    return run


def worker(args) -> dict:
    """One measurement, in this (fresh) process."""
    import resource
    import time

    import torch

    sys.path.insert(0, str(ROOT))
    from lenx.eval_config import check_eval_options
    from lenx.perplexity import Perplexity
    from lenx.probes.cell import Probes
    from lenx.subject import LenxRun

    if args.threads:
        torch.set_num_threads(args.threads)
    L = args.length
    result = {"scheme": args.scheme, "what": args.what, "length": L, "device": args.device,
              "threads": torch.get_num_threads(), "trials": args.trials if args.what != "perplexity" else None,
              "tokens": args.tokens if args.what == "perplexity" else None}
    with tempfile.TemporaryDirectory() as tmp:
        subject = LenxRun(make_run(Path(tmp), args))
        probe = [] if args.what == "perplexity" else [args.what]
        opts = check_eval_options({"tokens": args.tokens, "probe": probe, "probe_trials": args.trials,
                                   "probe_depths": [0.5] if probe == ["passkey"] else None})
        kind_of = Perplexity if args.what == "perplexity" else Probes
        kind = kind_of(opts, lambda n: [L], None, 16384, args.device)
        cells = kind.cells(subject)
        cell = cells[-1]  # passkey: depth 0.5; mqar, repeat: the longest distance
        tok = subject.open(args.device)
        data = kind.load(subject, tok, cell)
        model = subject.prepare(cell["rope_scaling"], cell["rope_factor"])
        cuda = args.device.startswith("cuda")
        with torch.no_grad():  # warm-up: kernels, lazy tables
            model(torch.zeros(1, min(64, L), dtype=torch.long, device=args.device))
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            before = _rss_bytes()
        t0 = time.perf_counter()
        rows = kind.score(subject, model, data, cell)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        peak = (torch.cuda.max_memory_allocated() if cuda else
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) - before
    row = rows[kind.table.stem][0]
    at = {"depth": cell.get("depth"), "distance": cell.get("distance")}
    forwards = row["windows"] if args.what == "perplexity" else args.trials * (2 if args.what == "repeat" else 1)
    return {**result, **at, "seconds": seconds, "windows": forwards, "seconds_per_window": seconds / forwards,
            "peak_mb": max(peak, 0) / 2**20, "note": row.get("note") or ""}


def measure(args, scheme: str, length: int, what: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--scheme", scheme, "--length", str(length), "--what", what,
           "--device", args.device, "--layers", str(args.layers), "--d-model", str(args.d_model), "--heads",
           str(args.heads), "--train-len", str(args.train_len), "--trials", str(args.trials), "--tokens",
           str(args.tokens), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        return {"scheme": scheme, "what": what, "length": length, "seconds": None, "peak_mb": None,
                "note": f"failed: {tail[0]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--schemes", default="alibi,rope", help="comma-separated")
    ap.add_argument("--multiples", default="1,4,16", help="lengths as multiples of --train-len")
    ap.add_argument("--train-len", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--trials", type=int, default=20, help="windows per probe cell (as --probe-trials)")
    ap.add_argument("--tokens", type=int, default=65536, help="targets of the perplexity cell (as --tokens)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", action="store_true", help="print one JSON object per measurement instead")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--scheme", help=argparse.SUPPRESS)
    ap.add_argument("--length", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--what", choices=WHAT, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    sys.path.insert(0, str(ROOT))
    import torch

    from lenx.hardware import this_cpu

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    where = this_cpu().describe() if args.device.startswith("cpu") else torch.cuda.get_device_name(args.device)
    rows = []
    for scheme in args.schemes.split(","):
        for m in args.multiples.split(","):
            for what in WHAT:
                r = measure(args, scheme, int(m) * args.train_len, what)
                r["cpu"] = where
                rows.append(r)
                if args.json:
                    print(json.dumps(r), flush=True)
                else:
                    print(f"  measured {scheme} {what} @ {r['length']}", file=sys.stderr, flush=True)
    if args.json:
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"one eval cell: {args.layers} layers, d_model {args.d_model}, {args.heads} heads, byte-level, "
                    f"train length {args.train_len}, device {args.device}; {where}",
              caption=f"perplexity: {args.tokens:,} targets (nonoverlap); probes: {args.trials} windows (repeat: "
                      "x2, with and without the first copy). × ppl: the cell's seconds / the perplexity cell's.")
    for col in ("scheme", "length", "cell", "at", "windows", "seconds", "× ppl", "s / window", "peak MB", "note"):
        t.add_column(col, justify="left" if col in ("scheme", "cell", "at", "note") else "right")

    def f(x, fmt):
        return format(x, fmt) if x is not None else "—"

    ppl = {(r["scheme"], r["length"]): r["seconds"] for r in rows if r["what"] == "perplexity"}
    for r in rows:
        base = ppl.get((r["scheme"], r["length"]))
        at = (f"depth {r['depth']:g}" if r.get("depth") is not None else
              f"distance {r['distance']}" if r.get("distance") is not None else "")
        t.add_row(r["scheme"], f"{r['length']:,}", r["what"], at, f(r.get("windows"), ","), f(r["seconds"], ".2f"),
                  f(r["seconds"] / base if r["seconds"] is not None and base else None, ".3f"),
                  f(r.get("seconds_per_window"), ".3f"), f(r["peak_mb"], ".0f"), r.get("note") or "")
    console = Console()
    if not console.is_terminal:
        console.width = 160
    console.print(t)


if __name__ == "__main__":
    main()
