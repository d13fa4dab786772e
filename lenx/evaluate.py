"""`lenx eval`: perplexity of trained runs at multiples of their training length, and retrieval probes.

What is evaluated is a subject (`lenx.subject`): a lenx run directory (`LenxRun`) or any Hugging Face causal LM
(`lenx.hf`, `--model`); both go through the same cells, protocols and tables. A cell is (run, evaluation length,
protocol, stride, RoPE scaling, factor): `lenx.perplexity` says what each protocol scores and what the tables
hold; `lenx.cells` plans, scores and writes the cells. `--probe passkey,mqar,repeat` adds the retrieval probes'
cells (`lenx.probes.cell`, table probes) at the same lengths and RoPE extensions; `--no-perplexity` leaves out the
perplexity cells.

Resumable: each finished cell is written at once, atomically (its buckets first, then its results row, which
marks it finished); a killed sweep loses at most the cell in progress, and a rerun skips finished cells. A
finished cell is never recomputed: a rerun into the same --out with another --tokens or --position-buckets (the
row's token_budget / bucket_width) is refused; write to another --out.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from . import distributed
from .attention import BACKENDS
from .cells import plan, run_cells
from .data import DataSpec
from .errors import LenxError, did_you_mean
from .eval_config import check_eval_options, run_lengths
from .hf import model_subject
from .perplexity import Perplexity
from .probes.cell import Probes
from .subject import LenxRun, Subject, find_runs


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
    protocols: list[str] | None = None,
    stride: int | None = None,
    position_buckets: int = 1,
    attn_backend: str | None = None,
    rope_scalings: list[str] | None = None,
    rope_factors: list[float | str] | None = None,
    bar=None,
    on_cell=None,
    dataset: DataSpec | str | None = None,
    models: list[str] | None = None,
    train_len: int | None = None,
    dtype: str | None = None,
    probes: list[str] | None = None,
    perplexity: bool = True,
    probe_trials: int = 20,
    probe_depths: list[float] | None = None,
    probe_distances: list[float] | None = None,
    probe_pairs: int = 8,
    probe_segment: int | None = None,
    probe_seed: int = 0,
    passkey_format: str = "auto",
    passkey_needle: str | None = None,
    passkey_question: str | None = None,
) -> pd.DataFrame:
    """Evaluate runs cell by cell; each finished cell is written at once. `bar`: a rich Progress to draw into;
    `on_cell(cell)` is called after each cell. `dataset`: score every run on this corpus's test split instead
    of its own dataset's. `models`: Hugging Face causal LMs (directories or hub names) scored the same way, with
    their own tokenizers (`lenx.hf`); `train_len` (their 1x) and `dtype` apply to them. With `models` and no
    `run_dirs`, no lenx run is evaluated. The evaluation options get `check_eval_options` before anything else
    (list options also as comma-separated text, as `lenx eval` takes them). `probes`: retrieval probes scored
    after perplexity (`perplexity` False: instead of it), with the probe_* and passkey_* options
    (`lenx.probes.cell`). Returns the results table, or without perplexity the probes table."""
    opts = check_eval_options({
        "max_len": max_len, "lengths": lengths, "tokens": tokens, "rope_scaling": rope_scalings,
        "rope_factor": rope_factors, "protocols": protocols, "stride": stride, "position_buckets": position_buckets,
        "probe": probes, "perplexity": perplexity, "probe_trials": probe_trials, "probe_depths": probe_depths,
        "probe_distances": probe_distances, "probe_pairs": probe_pairs, "probe_segment": probe_segment,
        "probe_seed": probe_seed, "passkey_format": passkey_format, "passkey_needle": passkey_needle,
        "passkey_question": passkey_question})
    ctx = distributed.init()
    device = distributed.device_for(ctx, device)  # checked before anything is read or made
    subjects = open_subjects(run_dirs, models, runs_dir, attn_backend, train_len, dtype)
    kinds = []
    if opts["perplexity"]:
        kinds.append(Perplexity(opts, lambda n: run_lengths(n, opts), dataset, batch_tokens, device))
    if opts["probe"]:
        kinds.append(Probes(opts, lambda n: run_lengths(n, opts), dataset, batch_tokens, device))
    for kind in kinds:  # every kind's checks before the first cell is scored
        plan(kind, subjects)
    tables = [run_cells(kind, subjects, out, ctx=ctx, device=device, attn_backend=attn_backend, show=progress,
                        bar=bar, on_cell=on_cell) for kind in kinds]
    return tables[0]


def open_subjects(run_dirs: list[str | Path] | None, models: list[str] | None, runs_dir: str | Path,
                  attn_backend: str | None, train_len: int | None, dtype: str | None) -> list[Subject]:
    """The lenx runs (RUN_DIRs, else every finished run under runs_dir unless only models are given), then the HF
    models; the options that apply to one sort of subject refused without it."""
    if attn_backend is not None and attn_backend not in BACKENDS:
        raise LenxError(f"unknown attention backend '{attn_backend}'{did_you_mean(attn_backend, BACKENDS)}; "
                        f"known: {', '.join(BACKENDS)}")
    if not models and (train_len is not None or dtype is not None):
        raise LenxError("--train-len and --dtype apply to HF models; give --model PATH_OR_NAME")
    subjects: list[Subject] = [LenxRun(r) for r in ([Path(r) for r in run_dirs] if run_dirs else
                                                    [] if models else find_runs(runs_dir))]
    if models:
        if attn_backend is not None and not run_dirs:
            raise LenxError("--attn-backend applies to lenx runs; HF models use their own attention implementation")
        subjects += [model_subject(m, train_len, dtype) for m in models]
    return subjects
