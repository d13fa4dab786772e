"""Benchmark of the results store (lenx/store.py): the cost of appending one cell as the table grows, against the
store it replaced (the whole table read, filtered row by row and rewritten as csv + parquet at every cell),
measured in the same run; and the time to rebuild the csv / parquet tables and to read the table back.

    python scripts/bench_results.py                       # 1,000 / 10,000 / 100,000 cells (about 2 minutes)
    python scripts/bench_results.py --sizes 1000,5000 --appends 20

Each cell is a perplexity cell as `lenx eval` writes it: one row of results and --buckets rows of
results_by_position, in one transaction. Prints milliseconds per appended cell (median of --appends appends at
each size) and the ratio to the old store where it was measured (at the sizes up to --old-max); `rebuild`: the
csv / parquet tables built whole from the store; `export`: the periodic export after the timed appends (their rows
appended to the last export's tables); `read`: the results table read back (what planning an evaluation does).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402

from lenx import store  # noqa: E402
from lenx.io import write_table  # noqa: E402
from lenx.perplexity import BY_POSITION, RESULTS, cell_key  # noqa: E402
from lenx.schema import NUMERIC  # noqa: E402


def row(i: int) -> dict:
    run = f"scheme{i % 20}-L128-s{i // 20 % 3}"
    return {"run": run, "pe": f"scheme{i % 20}", "seed": i // 20 % 3, "train_len": 128, "eval_len": 128 * (1 + i // 60),
            "ratio": 1.0 + i // 60, "protocol": "nonoverlap", "stride": 128, "rope_scaling": "none",
            "rope_factor": None, "tokens": 16384, "windows": 128, "documents": None, "nll": 1.2, "ppl": 3.3,
            "bpb": 1.7, "bytes": 16384, "seconds": 0.5, "note": "", "dataset": "stdlib",
            "dataset_fingerprint": "0e1234", "tokenizer": "byte", "run_dir": f"runs/{run}", "device": "cpu",
            "attn_backend": "sdpa", "lenx_version": "0.1", "timestamp": "2026-12-03T00:00:00+00:00",
            "token_budget": 16384, "bucket_width": 128, "config_id": "0123456789ab", "weights_id": "cafe",
            "context_gain": 0.01, "context_gain_tokens": 8192}


def cell(i: int, buckets: int):
    r = row(i)
    by_pos = [{**{c: r.get(c) for c in BY_POSITION.columns}, "bucket_start": 128 * b, "bucket_end": 128 * (b + 1),
               "tokens": 128, "nll": 1.2} for b in range(buckets)]
    return [(BY_POSITION, r, by_pos), (RESULTS, r, [r])]


def old_append(out: Path, parts) -> None:
    """The store lenx had before this one (lenx 2026-12-02: store.Table.replace, removed since), for the ratio."""
    for table, c, rows in parts:
        path = out / f"{table.stem}.parquet"
        df = pd.read_parquet(path) if path.exists() else pd.DataFrame(columns=table.columns)
        keep = df[[cell_key(r) != cell_key(c) for _, r in df.iterrows()]] if len(df) else df
        new = pd.DataFrame(rows, columns=table.columns)
        df = pd.concat([t for t in (keep, new) if len(t)], ignore_index=True)
        for col in NUMERIC:
            if col in df:
                df[col] = pd.to_numeric(df[col], errors="coerce")
        write_table(df, out / table.stem)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1000,10000,100000", help="cells in the table when the appends are timed")
    p.add_argument("--appends", type=int, default=50)
    p.add_argument("--buckets", type=int, default=16, help="results_by_position rows per cell (1x..16x buckets)")
    p.add_argument("--old-max", type=int, default=5000, help="largest size the old store is timed at")
    a = p.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    print(f"{'cells':>8} {'store ms/cell':>14} {'old ms/cell':>12} {'ratio':>7} {'rebuild s':>10} "
          f"{'export s':>9} {'read s':>7}")
    for n in sizes:
        with tempfile.TemporaryDirectory() as d:
            out = Path(d)
            store.write_cells(out, (cell(i, a.buckets) for i in range(n)))
            t0 = time.perf_counter()
            store.export(out, force=True)  # the tables built whole from the store
            rebuild = time.perf_counter() - t0
            times = []
            for j in range(a.appends):
                t0 = time.perf_counter()
                store.write_cell(out, cell(n + j, a.buckets))
                times.append(time.perf_counter() - t0)
            ms = 1e3 * statistics.median(times)
            t0 = time.perf_counter()
            store.export(out)  # the new cells appended to the last export's tables
            append_export = time.perf_counter() - t0
            t0 = time.perf_counter()
            assert len(RESULTS.read(out)) == n + a.appends
            read = time.perf_counter() - t0
        old = ratio = "-"
        if n <= a.old_max:
            with tempfile.TemporaryDirectory() as d:
                out = Path(d)
                for table in (RESULTS, BY_POSITION):
                    rows = [r for i in range(n) for t, _, rs in cell(i, a.buckets) if t is table for r in rs]
                    write_table(pd.DataFrame(rows, columns=table.columns), out / table.stem)
                old_times = []
                for j in range(min(a.appends, 5)):
                    t0 = time.perf_counter()
                    old_append(out, cell(n + j, a.buckets))
                    old_times.append(time.perf_counter() - t0)
            old_ms = 1e3 * statistics.median(old_times)
            old, ratio = f"{old_ms:.1f}", f"{old_ms / ms:.0f}x"
        print(f"{n:>8} {ms:>14.2f} {old:>12} {ratio:>7} {rebuild:>10.2f} {append_export:>9.2f} {read:>7.2f}",
              flush=True)


if __name__ == "__main__":
    main()
