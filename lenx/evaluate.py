"""`lenx eval`: perplexity of trained runs at multiples of their training length.

Non-overlapping protocol (the ALiBi paper's default): the test stream is cut into windows of the
evaluation length and every token in them is scored once. The same number of tokens (`--tokens`,
the same text) is scored at every length, so lengths are compared on equal footing.
Each finished cell is appended to the results table at once, atomically: an interrupted sweep
loses at most the cell in progress, and a rerun skips the cells already there.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .data import get_tokenizer, load_corpus, token_stream
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


def check_run_matches(run_dir: Path, model, cfg: dict) -> None:
    """The weights' config.json must agree with run.json and with the run's tokenizer."""
    tok = get_tokenizer(cfg["tokenizer"])
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
    return (row["run"], int(row["eval_len"]), row["protocol"], row["rope_scaling"], None if pd.isna(f) else float(f))


def append_row(out: Path, table: pd.DataFrame, row: dict) -> pd.DataFrame:
    new = pd.DataFrame([row], columns=COLUMNS)
    keep = table[[_key(r) != _key(row) for _, r in table.iterrows()]] if len(table) else table
    table = new if keep.empty else pd.concat([keep, new], ignore_index=True)
    write_table(table, out / "results")
    return table


STATIC_SCALINGS = ("pi", "ntk", "yarn")  # one factor per evaluation; dynamic-ntk derives its own per window


def scaling_plan(pe: str, scalings: list[str] | None, factors: list[float] | None) -> list[tuple[str, float | None]]:
    """The (RoPE extension, factor) cells for one run. Schemes without RoPE get only 'none' when several
    extensions are asked for, and an error when the one asked for does not apply to them. A factor of None:
    eval_len / train_len for the static extensions; for dynamic-ntk, transformers' default factor 1, i.e.
    s = max(1, window length / train_len) recomputed per window (recorded as an empty rope_factor)."""
    from .positional import get_scheme
    from .positional.base import scaling_not_supported

    scalings = scalings or ["none"]
    takes = [s for s in scalings if s in get_scheme(pe).eval_scalings]
    if not takes and len(scalings) == 1:
        raise scaling_not_supported(pe, scalings[0])
    return [(s, f) for s in takes or ["none"] for f in ([None] if s == "none" else factors or [None])]


def cell_keys(run: Path, cfg: dict, lens: list[int], scalings: list[tuple[str, float | None]]) -> list[dict]:
    """The evaluation cells of one run: one per (eval_len, RoPE extension, factor), keyed as in the results table."""
    cells = []
    for L, (scaling, factor) in itertools.product(lens, scalings):
        if scaling in STATIC_SCALINGS and factor is None:
            factor = max(1.0, L / cfg["train_len"])  # the default: stretch the training length to L
        cells.append({"run": run.name, "eval_len": L, "protocol": "nonoverlap", "rope_scaling": scaling,
                      "rope_factor": factor})
    return cells


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
    rope_scalings: list[str] | None = None,
    rope_factors: list[float] | None = None,
    bar=None,
    on_cell=None,
) -> pd.DataFrame:
    """Evaluate runs cell by cell. `bar`: a rich Progress to draw into; `on_cell(run_dir, eval_len)` after each cell."""
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
        plan.append((run, info, lens, scaling_plan(info["config"]["pe"], rope_scalings, rope_factors)))
    table = load_results(out)
    done = {_key(r) for _, r in table.iterrows()}

    from .progress import progress as make_progress

    cells = sum(len(lens) * len(scalings) for _, _, lens, scalings in plan)
    own = bar is None
    progress_cm = make_progress(disable=not progress) if own else nullcontext(bar)
    with progress_cm as bar:
        task = bar.add_task("eval", total=cells)
        for run, info, lens, scalings in plan:
            cfg = info["config"]
            model = None
            for base in cell_keys(run, cfg, lens, scalings):
                L, scaling, factor = base["eval_len"], base["rope_scaling"], base["rope_factor"]
                bar.update(task, description=f"eval {run.name} @ {L}" + ("" if scaling == "none" else f" {scaling}"))
                if _key(base) in done:
                    bar.advance(task)
                    continue
                if model is None:
                    model = load_model(run, device)
                    check_run_matches(run, model, cfg)
                    tok = get_tokenizer(cfg["tokenizer"])
                    stream = token_stream(cfg["dataset"], cfg["tokenizer"], "test")
                    fingerprint = load_corpus(cfg["dataset"]).fingerprint
                    n_tok = tokens or max(65536, max(lens))
                    n_tok = math.ceil(n_tok / max(lens)) * max(lens)  # a multiple of every length: same text at each
                    if len(stream) < n_tok + 1:
                        raise LenxError(
                            f"the test split of '{cfg['dataset']}' has {len(stream)} tokens; scoring {n_tok} tokens "
                            f"needs {n_tok + 1}; lower --tokens or --max-len"
                        )
                row = {
                    **base,
                    "pe": cfg["pe"], "seed": cfg["seed"], "train_len": cfg["train_len"], "ratio": L / cfg["train_len"],
                    "dataset": cfg["dataset"], "dataset_fingerprint": fingerprint, "tokenizer": cfg["tokenizer"],
                    "run_dir": str(run), "device": prov["device"], "lenx_version": prov["lenx_version"],
                    "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"), "note": "",
                }
                windows = nonoverlap_windows(stream, L, n_tok)
                model.pe.set_eval_scaling(scaling, factor)
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
                if on_cell:
                    on_cell(base)
        if not own:
            bar.remove_task(task)
    return table
