"""`lenx eval`: perplexity of trained runs at multiples of their training length.

What is evaluated is a subject (`lenx.subject`): a lenx run directory (`LenxRun`) or any Hugging Face causal LM
(`lenx.hf`, `--model`); both go through the same cells, protocols and tables. A cell is (run, evaluation length,
protocol, stride, RoPE scaling, factor): `lenx.perplexity` says what each protocol scores and what the tables
hold; `lenx.cells` plans, scores and writes the cells.

Resumable: each finished cell is written at once, atomically (its buckets first, then its results row, which
marks it finished); a killed sweep loses at most the cell in progress, and a rerun skips finished cells. A
finished cell is never recomputed: a rerun into the same --out with another --tokens or --position-buckets (the
row's token_budget / bucket_width) is refused; write to another --out.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from . import distributed
from .attention import BACKENDS
from .cells import run_cells
from .data import DataSpec
from .errors import LenxError, did_you_mean
from .hf import model_subject
from .perplexity import Perplexity
from .subject import LenxRun, Subject, find_runs
from .windows import PROTOCOLS, resolve_stride


def default_lengths(train_len: int, max_len: int) -> list[int]:
    """1x, 2x, 4x, ... of the training length up to max_len, and max_len itself when it is not on that ladder
    (it was asked for)."""
    lengths, n = [], train_len
    while n <= max_len:
        lengths.append(n)
        n *= 2
    return lengths + ([max_len] if lengths[-1] != max_len else [])


# How `lenx eval` names each evaluation option (its flag); `lenx sweep` names them eval.<key> of its YAML file.
EVAL_FLAGS = {"max_len": "--max-len", "lengths": "--lengths", "tokens": "--tokens", "rope_scaling": "--rope-scaling",
              "rope_factor": "--rope-factor", "protocols": "--protocol", "stride": "--stride",
              "position_buckets": "--position-buckets"}


def _items(value) -> list:
    """A list of values from None (none), one value, or a list; text items split at commas, as `lenx eval`
    takes repeated or comma-separated flags."""
    items = [] if value is None else value if isinstance(value, list) else [value]
    return [p for x in items for p in (x.replace(" ", "").split(",") if isinstance(x, str) else [x]) if p != ""]


def _shown(value) -> str:
    return f"'{value}'" if isinstance(value, str) else repr(value)


def check_eval_options(opts: dict, names: dict = EVAL_FLAGS, where: str = "") -> dict:
    """The checks of every evaluation option that hold whatever the run: `evaluate` (so `lenx eval`) applies them
    to its arguments and `lenx sweep` to a config's eval: section when it reads the file. `opts`: values keyed as
    EVAL_FLAGS (missing: default), as given (a YAML value may be anything); `names`: how the user set each key;
    `where`: prefix of every error (e.g. the file). Returns the values in the form `evaluate` uses: lists for
    lengths, rope_scaling, rope_factor (floats) and protocols (default nonoverlap, each once), None where not
    given, position_buckets 1 by default. The checks that need a run's training length are `run_lengths`'."""
    from .positional.base import is_integer
    from .positional.rope import ROPE_SCALINGS

    def fail(message: str) -> LenxError:
        return LenxError(where + message)

    out = {key: opts.get(key) for key in EVAL_FLAGS}
    out["position_buckets"] = 1 if out["position_buckets"] is None else out["position_buckets"]
    for key in ("max_len", "tokens", "stride", "position_buckets"):
        if out[key] is not None and not (is_integer(out[key]) and out[key] > 0):
            raise fail(f"{names[key]} must be a positive integer, got {_shown(out[key])}")
    lengths = _items(out["lengths"])
    bad = [n for n in lengths if not (is_integer(n) and n > 0)]
    if bad:
        raise fail(f"{names['lengths']} must be positive integers, got {_shown(bad[0])}")
    out["lengths"] = lengths or None
    scalings = _items(out["rope_scaling"])
    bad = [x for x in scalings if x not in ROPE_SCALINGS]
    if bad:
        raise fail(f"unknown {names['rope_scaling']} {_shown(bad[0])}{did_you_mean(bad[0], ROPE_SCALINGS)}; known: {', '.join(ROPE_SCALINGS)}")
    out["rope_scaling"] = scalings or None
    factors = []
    for x in _items(out["rope_factor"]):
        try:
            if isinstance(x, bool) or not isinstance(x, (int, float, str)):
                raise ValueError
            factors.append(float(x))
        except ValueError:
            raise fail(f"{names['rope_factor']} expects numbers, got {_shown(x)}") from None
    bad = [f for f in factors if not (math.isfinite(f) and f >= 1)]
    if bad:
        raise fail(f"{names['rope_factor']} needs finite factors >= 1, got {bad[0]:g}")
    if factors and set(scalings or ["none"]) == {"none"}:
        raise fail(f"{names['rope_factor']} needs {names['rope_scaling']} other than none")
    out["rope_factor"] = factors or None
    protocols = _items(out["protocols"])
    bad = [p for p in protocols if p not in PROTOCOLS]
    if bad:
        raise fail(f"unknown protocol {_shown(bad[0])}{did_you_mean(bad[0], PROTOCOLS)} in {names['protocols']}; known: {', '.join(PROTOCOLS)}")
    out["protocols"] = list(dict.fromkeys(protocols)) or ["nonoverlap"]
    if out["stride"] is not None and "sliding" not in out["protocols"]:
        raise fail(f"{names['stride']} applies to the sliding protocol; add {names['protocols']} sliding "
                   f"(or drop {names['stride']})")
    return out


def run_lengths(train_len: int, opts: dict, names: dict = EVAL_FLAGS, where: str = "") -> list[int]:
    """The evaluation lengths of a run with this training length, from options checked by `check_eval_options`:
    `lengths`, else 1x, 2x, 4x ... up to `max_len` (default 16x). Refuses a max_len below the training length and
    a sliding stride longer than a length."""
    max_len = opts["max_len"]
    if max_len is not None and max_len < train_len:
        raise LenxError(f"{where}{names['max_len']} {max_len} is below the training length {train_len}; "
                        f"give {names['max_len']} >= {train_len}")
    lens = opts["lengths"] or default_lengths(train_len, max_len or 16 * train_len)
    for protocol in opts["protocols"]:
        for L in lens:
            resolve_stride(protocol, L, opts["stride"], names["stride"], where)
    return lens


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
) -> pd.DataFrame:
    """Evaluate runs cell by cell; each finished cell is written at once. `bar`: a rich Progress to draw into;
    `on_cell(cell)` is called after each cell. `dataset`: score every run on this corpus's test split instead
    of its own dataset's. `models`: Hugging Face causal LMs (directories or hub names) scored the same way, with
    their own tokenizers (`lenx.hf`); `train_len` (their 1x) and `dtype` apply to them. With `models` and no
    `run_dirs`, no lenx run is evaluated. The evaluation options get `check_eval_options` before anything else
    (list options also as comma-separated text, as `lenx eval` takes them)."""
    opts = check_eval_options({"max_len": max_len, "lengths": lengths, "tokens": tokens, "rope_scaling": rope_scalings,
                               "rope_factor": rope_factors, "protocols": protocols, "stride": stride,
                               "position_buckets": position_buckets})
    ctx = distributed.init()
    device = distributed.device_for(ctx, device)  # checked before anything is read or made
    subjects = open_subjects(run_dirs, models, runs_dir, attn_backend, train_len, dtype)
    kind = Perplexity(opts, lambda n: run_lengths(n, opts), dataset, batch_tokens, device)
    return run_cells(kind, subjects, out, ctx=ctx, device=device, attn_backend=attn_backend, show=progress, bar=bar,
                     on_cell=on_cell)


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
