"""`lenx eval`: perplexity of trained runs at multiples of their training length.

Non-overlapping protocol (the ALiBi paper's default): the test stream is cut into windows of the
evaluation length and every token in them is scored once. The same number of tokens (`--tokens`,
the same text) is scored at every length, so lengths are compared on equal footing.
Each finished cell is appended to the results table at once, atomically: an interrupted sweep
loses at most the cell in progress, and a rerun skips the cells already there.
"""

from __future__ import annotations

import json
import math
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .data import DataSpec, Tokenizer, load_corpus, load_run_tokenizer, token_stream
from .errors import LengthNotSupported, LenxError
from .io import write_table
from .runinfo import default_device, provenance, quiet_hf

KEY = ["run", "eval_len", "protocol", "rope_scaling", "rope_factor"]
COLUMNS = [
    "run", "pe", "seed", "train_len", "eval_len", "ratio", "protocol", "rope_scaling", "rope_factor",
    "tokens", "windows", "nll", "ppl", "bpb", "bytes", "seconds", "note",
    "dataset", "dataset_fingerprint", "tokenizer", "run_dir", "device", "lenx_version", "timestamp",
]


def find_runs(runs_dir: str | Path = "runs") -> list[Path]:
    root = Path(runs_dir)
    runs = sorted(p.parent for p in root.glob("*/run.json") if (p.parent / "model.safetensors").exists())
    if not runs:
        raise LenxError(f"no trained runs under {root}/; train one with `lenx train --pe NAME` or name RUN_DIRs")
    return runs


def read_run(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    try:
        info = json.loads((run_dir / "run.json").read_text())
        info["config"]["train_len"]
    except FileNotFoundError:
        raise LenxError(f"{run_dir} is not a lenx run (no run.json); train it with `lenx train`") from None
    except (ValueError, KeyError, TypeError):
        raise LenxError(f"{run_dir}/run.json is corrupt; retrain with `lenx train --overwrite`") from None
    if info.get("status") != "done" or not (run_dir / "model.safetensors").exists():
        raise LenxError(f"{run_dir} has not finished training; rerun its `lenx train` command to resume it")
    return info


def load_model(run_dir: Path, device: str):
    from .model import LenxForCausalLM

    quiet_hf()
    try:
        # safetensors only: a pickle planted beside the weights is never read
        model = LenxForCausalLM.from_pretrained(run_dir, use_safetensors=True)
    except LenxError:
        raise
    except Exception as e:
        raise LenxError(f"cannot load the model in {run_dir} ({type(e).__name__}); retrain it with --overwrite") from None
    return model.to(device).eval()


def run_tokenizer(run_dir: Path, info: dict) -> Tokenizer:
    """The tokenizer the run was trained with, read from its directory."""
    return load_run_tokenizer(run_dir, info["config"]["tokenizer"], (info.get("tokenizer") or {}).get("fingerprint"))


def check_run_matches(run_dir: Path, model, cfg: dict, tok: Tokenizer) -> None:
    """The weights' config.json must agree with run.json and with the run's tokenizer."""
    mc = model.config
    pairs = [("pe", mc.pe, cfg["pe"]), ("train_len", mc.train_len, cfg["train_len"]),
             ("vocab_size", mc.vocab_size, tok.vocab_size)]
    for key, got, want in pairs:
        if got != want:
            raise LenxError(
                f"{run_dir}: config.json has {key}={got} but run.json / its tokenizer expect {want}; "
                "the directory mixes two runs, retrain it with --overwrite"
            )


def default_lengths(train_len: int, max_len: int) -> list[int]:
    lengths, n = [], train_len
    while n <= max_len:
        lengths.append(n)
        n *= 2
    return lengths


def check_lengths(lengths: list[int], train_len: int, max_len: int | None) -> None:
    bad = [n for n in lengths if n <= 0]
    if bad:
        raise LenxError(f"evaluation lengths must be positive integers, got {bad[0]}")
    if max_len is not None and max_len < train_len:
        raise LenxError(
            f"--max-len {max_len} is below the training length {train_len}; give --max-len >= {train_len}"
        )


@torch.no_grad()
def score_windows(model, windows: torch.Tensor, batch_tokens: int, device: str) -> float:
    """Sum of NLL (nats) over every target of every window. windows: (n, L + 1)."""
    L = windows.shape[1] - 1
    per_batch = max(1, batch_tokens // L)
    total = 0.0
    for i in range(0, len(windows), per_batch):
        w = windows[i : i + per_batch].to(device)
        logits = model(w[:, :-1]).logits
        total += F.cross_entropy(logits.float().flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()
    return total


def nonoverlap_windows(stream: np.ndarray, eval_len: int, n_tokens: int) -> torch.Tensor:
    n = n_tokens // eval_len
    idx = np.arange(n)[:, None] * eval_len + np.arange(eval_len + 1)[None, :]
    return torch.from_numpy(stream[idx].astype(np.int64))


def load_results(out: Path) -> pd.DataFrame:
    path = out / "results.parquet"
    if path.exists():
        try:
            return pd.read_parquet(path)
        except Exception:
            raise LenxError(f"{path} is unreadable; move it away and rerun") from None
    return pd.DataFrame(columns=COLUMNS)


def _key(row) -> tuple:
    f = row["rope_factor"]
    return (row["run"], int(row["eval_len"]), row["protocol"], row["rope_scaling"], None if pd.isna(f) else float(f),
            str(row["dataset"]))


def append_row(out: Path, table: pd.DataFrame, row: dict) -> pd.DataFrame:
    new = pd.DataFrame([row], columns=COLUMNS)
    keep = table[[_key(r) != _key(row) for _, r in table.iterrows()]] if len(table) else table
    table = new if keep.empty else pd.concat([keep, new], ignore_index=True)
    write_table(table, out / "results")
    return table


def evaluate(
    run_dirs: list[str | Path] | None = None,
    max_len: int | None = None,
    lengths: list[int] | None = None,
    tokens: int | None = None,
    out: str | Path = "results",
    runs_dir: str | Path = "runs",
    device: str | None = None,
    batch_tokens: int = 16384,
    progress: bool = True,
    dataset: DataSpec | str | None = None,
) -> pd.DataFrame:
    """`dataset`: score every run on this corpus's test split instead of its own dataset's."""
    runs = [Path(r) for r in run_dirs] if run_dirs else find_runs(runs_dir)
    infos = [read_run(r) for r in runs]
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LenxError(f"cannot create output directory {out}: {e.strerror}; choose another --out") from None
    device = device or default_device()
    prov = provenance(device)

    plan = []
    for run, info in zip(runs, infos):
        L = info["config"]["train_len"]
        check_lengths(lengths or [], L, max_len)
        lens = lengths or default_lengths(L, max_len or 16 * L)
        plan.append((run, info, lens))
    table = load_results(out)
    done = {_key(r) for _, r in table.iterrows()}

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    cells = sum(len(lens) for _, _, lens in plan)
    with Progress(TextColumn("eval {task.fields[cell]}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  disable=not progress) as bar:
        task = bar.add_task("eval", total=cells, cell="")
        for run, info, lens in plan:
            cfg = info["config"]
            spec = DataSpec.of(dataset if dataset is not None else cfg)
            model = None
            for L in lens:
                base = {"run": run.name, "eval_len": L, "protocol": "nonoverlap", "rope_scaling": "none",
                        "rope_factor": None, "dataset": spec.dataset}
                bar.update(task, cell=f"{run.name} @ {L}")
                if _key(base) in done:
                    bar.advance(task)
                    continue
                if model is None:
                    model = load_model(run, device)
                    tok = run_tokenizer(run, info)
                    check_run_matches(run, model, cfg, tok)
                    stream = token_stream(spec, tok, "test")
                    fingerprint = load_corpus(spec).fingerprint
                    n_tok = tokens or max(65536, max(lens))
                    n_tok = math.ceil(n_tok / max(lens)) * max(lens)  # a multiple of every length: same text at each
                    if len(stream) < n_tok + 1:
                        raise LenxError(
                            f"the test split of '{spec.dataset}' has {len(stream)} tokens; scoring {n_tok} tokens "
                            f"needs {n_tok + 1}; lower --tokens or --max-len"
                        )
                row = {
                    **base,
                    "pe": cfg["pe"], "seed": cfg["seed"], "train_len": cfg["train_len"], "ratio": L / cfg["train_len"],
                    "dataset_fingerprint": fingerprint, "tokenizer": cfg["tokenizer"],
                    "run_dir": str(run), "device": prov["device"], "lenx_version": prov["lenx_version"],
                    "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"), "note": "",
                }
                windows = nonoverlap_windows(stream, L, n_tok)
                t0 = time.perf_counter()
                try:
                    nll_sum = score_windows(model, windows, batch_tokens, device)
                except LengthNotSupported as e:
                    row.update(tokens=0, windows=0, nll=None, ppl=None, bpb=None, bytes=0, note=str(e))
                else:
                    n = windows.shape[0] * L
                    n_bytes = tok.token_bytes(windows[:, 1:].numpy())
                    row.update(
                        tokens=n, windows=windows.shape[0], nll=nll_sum / n, ppl=math.exp(nll_sum / n),
                        bpb=nll_sum / max(n_bytes, 1) / math.log(2), bytes=n_bytes,
                    )
                row["seconds"] = round(time.perf_counter() - t0, 3)
                table = append_row(out, table, row)
                done.add(_key(row))
                bar.advance(task)
    return table
