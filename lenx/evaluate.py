"""`lenx eval`: perplexity of trained runs at multiples of their training length.

What is evaluated is a subject: a lenx run directory (`LenxRun`) or any Hugging Face causal LM (`lenx.hf.HFModel`,
`--model`); both go through the same cells, protocols and tables.

A cell is (run, evaluation length, protocol, stride, RoPE scaling, factor). Protocols (`--protocol`, several
allowed; recorded in every row's `protocol` and `stride` columns):

- ``nonoverlap`` (the ALiBi paper's default; stride = eval_len): the test stream cut into windows of the
  evaluation length, every token scored once. `--tokens` N: the first N targets of the stream (rounded up to a
  multiple of the longest length), the same text at every length.
- ``sliding`` (PI / YaRN use stride 256; ALiBi's analysis stride 1): windows of eval_len advanced by `--stride`
  S (default eval_len // 2), the first window scoring all its targets, each later one only its S new ones.
  `--tokens` N: the same N scored targets as nonoverlap; the work is about N * eval_len / S tokens of forward.
- ``truncate`` (YaRN's eval/perplexity.py): every test document with at least eval_len + 1 tokens cut to its
  first eval_len + 1 (eval_len inputs, all eval_len targets scored). `--tokens` N: at most ceil(N / eval_len)
  documents, in split order. The `documents` column says how many were scored; a note says when none
  qualified or when --tokens left some out. The documents differ between lengths (longer lengths admit fewer).

Loss by position: every cell also writes its mean NLL per bucket of window positions (position p predicts
token p + 1 from tokens 0..p of the window) to `results_by_position.csv` / `.parquet`; bucket width is the
training length divided by `--position-buckets` (default 1: one bucket per training length). A row's tokens are
the sum of its buckets' tokens and its nll their token-weighted mean.

Resumable: each finished cell is written at once, atomically (its buckets first, then its results row, which
marks it finished); a killed sweep loses at most the cell in progress, and a rerun skips finished cells. A
finished cell is never recomputed: a rerun into the same --out with another --tokens or --position-buckets (the
row's token_budget / bucket_width) is refused; write to another --out.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .config import TRAIN_KEYS, TrainConfig, check_values
from .ids import config_id, weights_id
from .data import DataSpec, Tokenizer, document_tokens, load_corpus, load_run_tokenizer, token_stream
from .eval_config import check_eval_options, run_lengths
from .errors import OOM_NOTE, LengthNotSupported, LenxError, did_you_mean, is_oom, oom_note
from .io import write_table
from . import distributed
from .runinfo import provenance, quiet_hf
from .schema import NUMERIC, check_numeric

COLUMNS = [
    "run", "pe", "seed", "train_len", "eval_len", "ratio", "protocol", "stride", "rope_scaling", "rope_factor",
    "tokens", "windows", "documents", "nll", "ppl", "bpb", "bytes", "seconds", "note",
    "dataset", "dataset_fingerprint", "tokenizer", "run_dir", "device", "attn_backend", "lenx_version", "timestamp",
    "token_budget", "bucket_width", "config_id", "weights_id",  # (added later: appended, so older tables still read)
]
KEY_COLUMNS = ["run", "eval_len", "protocol", "rope_scaling", "rope_factor"]  # in every lenx table, old ones too
BUCKET_FIELDS = ["bucket_start", "bucket_end", "tokens", "nll"]
BY_POSITION_COLUMNS = [
    "run", "pe", "seed", "train_len", "eval_len", "protocol", "stride", "rope_scaling", "rope_factor", "dataset",
    *BUCKET_FIELDS, "config_id",
]


def find_runs(runs_dir: str | Path = "runs") -> list[Path]:
    """The finished runs under runs_dir; unfinished ones (training, or interrupted) are named on stderr and skipped."""
    root = Path(runs_dir)
    runs, unfinished = [], []
    for run in sorted(p.parent for p in root.glob("*/run.json")):
        try:
            done = json.loads((run / "run.json").read_text()).get("status") == "done"
        except (OSError, ValueError):
            done = False
        (runs if done and (run / "model.safetensors").exists() else unfinished).append(run)
    names = ", ".join(r.name for r in unfinished)
    if not runs:
        raise LenxError(f"no trained runs under {root}/" + (f" (unfinished: {names})" if unfinished else "")
                        + "; train one with `lenx train --pe NAME` (rerun its command to finish one) or name RUN_DIRs")
    if unfinished:
        print(f"note: skipping {len(unfinished)} unfinished run(s) under {root}/: {names} (rerun a run's `lenx train` "
              "command to finish it)", file=sys.stderr)
    return runs


def read_run(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    try:
        info = json.loads((run_dir / "run.json").read_text())
        # keys added to lenx since the run was made take their defaults (as ids.identity does); known keys are
        # checked for their types, so an edited file is refused here, not mid-evaluation
        info["config"] = {**TrainConfig().to_dict(), **info["config"]}
        check_values({k: v for k, v in info["config"].items() if k in TRAIN_KEYS}, f"{run_dir}/run.json")
    except FileNotFoundError:
        inside = sorted(p.parent for p in run_dir.glob("*/run.json"))
        if inside:  # `lenx eval runs`: the runs' parent named as a run
            raise LenxError(f"{run_dir} is a directory of lenx runs, not a run; name a run (e.g. {inside[0]}), or, "
                            f"for `lenx eval`, give --runs-dir {run_dir} to evaluate them all") from None
        raise LenxError(f"{run_dir} is not a lenx run (no run.json); train it with `lenx train`") from None
    except LenxError as e:
        raise LenxError(f"{e} (corrupt?); retrain with `lenx train --overwrite`") from None
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


def check_weights(row, subject, fix: str) -> None:
    """Refuse a finished cell computed from other weights than the run now holds (retrained since)."""
    recorded = row.get("weights_id")
    if subject.weights_id and isinstance(recorded, str) and recorded != subject.weights_id:
        raise LenxError(f"the results hold {row['run']} @{int(row['eval_len'])} computed from other weights than "
                        f"{subject.run_dir} holds now (retrained or saved again since?); a finished cell is never "
                        f"recomputed: {fix}")


def check_text(row, spec, fix: str) -> None:
    """Refuse a finished cell scored on other text than the local files `spec` names now (another --test-file,
    all of them dataset 'files', or a file edited since): for them the name alone does not identify the text."""
    from .data import HUB_DATASETS

    if spec.dataset == "stdlib" or spec.dataset in HUB_DATASETS or spec.dataset.startswith("hf:"):
        return
    recorded = row.get("dataset_fingerprint")
    if isinstance(recorded, str) and recorded != load_corpus(spec).fingerprint:
        raise LenxError(f"the results hold {row['run']} @{int(row['eval_len'])} scored on other text than dataset "
                        f"'{spec.dataset}' names now (another file, or edited since?); a finished cell is never "
                        f"recomputed: {fix}")


class LenxRun:
    """A lenx run directory as an evaluation subject. `evaluate` asks the same of an HF model (`lenx.hf.HFModel`):
    kind, name, pe, seed, train_len, config_id, weights_id, tokenizer_name, run_dir, default_data, scaling_plan(),
    open(), check_tokens(), prepare(), attn_backend, batch_tokens()."""

    kind = "lenx"

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir)
        self.info = read_run(self.path)
        self.cfg = cfg = self.info["config"]
        self.name, self.pe, self.seed, self.train_len = self.path.name, cfg["pe"], cfg["seed"], cfg["train_len"]
        self.tokenizer_name, self.run_dir, self.default_data = cfg["tokenizer"], str(self.path), cfg
        self.config_id = config_id(self.info)
        self.weights_id = weights_id(self.path)
        self.model = None

    def scaling_plan(self, scalings: list[str] | None, factors: list[float] | None) -> list[tuple[str, float | None]]:
        return scaling_plan(self.pe, scalings, factors)

    def open(self, device: str, attn_backend: str | None = None) -> Tokenizer:
        self.model = load_model(self.path, device)
        tok = run_tokenizer(self.path, self.info)
        check_run_matches(self.path, self.model, self.cfg, tok)
        if attn_backend is not None:
            self.model.set_attention(attn_backend)
        return tok

    def check_tokens(self, stream) -> None:
        pass  # check_run_matches: the run's vocabulary is its tokenizer's

    def prepare(self, scaling: str, factor: float | None):
        self.model.pe.set_eval_scaling(scaling, factor)
        return self.model

    @property
    def attn_backend(self) -> str:
        """The backend that ran: `flex` off CUDA runs the `sdpa` route (attention.py), and is recorded so."""
        backend = self.model.config.attn_backend
        return "sdpa" if backend == "flex" and self.model.device.type != "cuda" else backend

    def batch_tokens(self, eval_len: int, batch_tokens: int) -> int:
        return batch_tokens


# ---------------------------------------------------------------------------------------------------
# Protocols: which windows are fed to the model and which of their targets are scored

PROTOCOLS = ("nonoverlap", "sliding", "truncate")


@dataclass
class Windows:
    """Windows of eval_len + 1 tokens (inputs 0..L-1, targets 1..L); `first[w]`: targets at window positions
    >= first[w] are scored (position p predicts token p + 1 from tokens 0..p of the window)."""

    tokens: torch.Tensor  # (n, L + 1) int64
    first: torch.Tensor  # (n,) int64
    documents: int | None = None
    note: str = ""


def sliding_windows(stream: np.ndarray, eval_len: int, stride: int, n_tokens: int) -> Windows:
    """Targets 1..n_tokens of the stream, each scored once: the first window scores all its eval_len targets,
    each later window is advanced by `stride` and scores only its new targets (the last one may advance by
    less, to end exactly at target n_tokens). stride == eval_len is the non-overlapping protocol."""
    L = eval_len
    ends = list(range(L, n_tokens + 1, stride))  # end = index of a window's last target
    if ends[-1] != n_tokens:
        ends.append(n_tokens)
    ends = np.asarray(ends)
    starts = ends - L
    idx = starts[:, None] + np.arange(L + 1)[None, :]
    prev_end = np.concatenate([[0], ends[:-1]])
    first = np.where(np.arange(len(ends)) == 0, 0, L - (ends - prev_end))
    return Windows(torch.from_numpy(stream[idx].astype(np.int64)), torch.from_numpy(first.astype(np.int64)))


def truncated_windows(docs, eval_len: int, max_documents: int) -> Windows:
    """Document-truncated (YaRN's eval/perplexity.py): every test document with at least eval_len + 1 tokens
    (its end-of-document token included), cut to its first eval_len + 1 tokens: eval_len inputs, every one of
    the eval_len targets scored. (YaRN feeds the first eval_len tokens and scores eval_len - 1 of them; the one
    extra token makes every protocol score window positions 0..eval_len - 1.) At most `max_documents`, in
    split order."""
    qualified = [d for d in docs if len(d) >= eval_len + 1]
    used = qualified[:max_documents]
    note = ""
    if not qualified:
        note = f"no test document has {eval_len + 1} tokens; nothing to score at this length"
    elif len(used) < len(qualified):
        note = f"{len(qualified)} test documents qualify; the first {len(used)} scored (--tokens)"
    tokens = (
        torch.from_numpy(np.stack([d[: eval_len + 1] for d in used]).astype(np.int64))
        if used else torch.zeros(0, eval_len + 1, dtype=torch.int64)
    )
    return Windows(tokens, torch.zeros(len(used), dtype=torch.int64), documents=len(used), note=note)


# ---------------------------------------------------------------------------------------------------
# Scoring: NLL summed per window position, so the by-position table and the row come from the same sums


@dataclass
class Scores:
    nll: torch.Tensor  # (L,) float64: summed NLL of the scored targets at each window position
    count: torch.Tensor  # (L,) int64: scored targets at each window position
    bytes: int

    @property
    def tokens(self) -> int:
        return int(self.count.sum())

    def buckets(self, width: int) -> list[dict]:
        """Position buckets [start, end) of `width` positions: tokens and mean NLL (empty buckets left out)."""
        L = len(self.count)
        out = []
        for start in range(0, L, width):
            end = min(start + width, L)
            n = int(self.count[start:end].sum())
            if n:
                out.append({"bucket_start": start, "bucket_end": end, "tokens": n,
                            "nll": float(self.nll[start:end].sum()) / n})
        return out


CE_CHUNK = 1 << 27  # logits per float32 cross-entropy call (512 MiB)


@torch.no_grad()
def score_windows(model, windows: torch.Tensor, first: torch.Tensor | None, batch_tokens: int, device: str,
                  tok: Tokenizer | None = None) -> Scores:
    """Run the model on (n, L + 1) windows; sum the NLL (nats) of the targets at positions >= first[w], and
    (given the tokenizer) the UTF-8 bytes of those targets."""
    n, L1 = windows.shape
    L = L1 - 1
    first = torch.zeros(n, dtype=torch.int64) if first is None else first
    nll = torch.zeros(L, dtype=torch.float64)
    count = torch.zeros(L, dtype=torch.int64)
    n_bytes = 0
    pos = torch.arange(L)
    per_batch = max(1, batch_tokens // L)
    for i in range(0, n, per_batch):
        w = windows[i : i + per_batch]
        keep = pos[None, :] >= first[i : i + per_batch, None]  # (b, L)
        logits = model(w[:, :-1].to(device)).logits.flatten(0, 1)
        targets = w[:, 1:].flatten().to(device)
        # float32 cross-entropy in chunks of at most CE_CHUNK logits: a long window of a large vocabulary never
        # needs a second, float32 copy of all its logits (one chunk, i.e. one call, for small ones)
        step = max(1, CE_CHUNK // logits.shape[1])
        losses = torch.cat([F.cross_entropy(logits[j : j + step].float(), targets[j : j + step], reduction="none")
                            for j in range(0, len(logits), step)])
        del logits
        losses = losses.view(w.shape[0], L).cpu().double() * keep
        nll += losses.sum(0)
        count += keep.sum(0)
        if tok is not None:
            n_bytes += tok.token_bytes(w[:, 1:][keep].numpy())
    return Scores(nll, count, n_bytes)


def _read_table(path: Path, columns: list[str]) -> pd.DataFrame:
    if path.exists():
        try:
            df = pd.read_parquet(path)
        except Exception:
            raise LenxError(f"{path} is unreadable; move it away and rerun") from None
        missing = [c for c in KEY_COLUMNS if c not in df]
        if missing:  # another tool's table, or not a table of this kind
            raise LenxError(f"{path} is not a lenx results table (no column {missing[0]}); move it away or use "
                            "another --out")
        check_numeric(df, path, "move it away or use another --out")
        df = df.reindex(columns=columns)  # tables from older lenx versions: missing columns empty
        old = (df["protocol"] == "nonoverlap") & df["stride"].isna()
        return df.assign(stride=df["stride"].where(~old, df["eval_len"]))
    return pd.DataFrame(columns=columns)


def load_results(out: Path) -> pd.DataFrame:
    return _read_table(out / "results.parquet", COLUMNS)


def load_by_position(out: Path) -> pd.DataFrame:
    return _read_table(out / "results_by_position.parquet", BY_POSITION_COLUMNS)


def _opt(x, kind):
    return None if x is None or pd.isna(x) else kind(x)


def _key(row) -> tuple:
    """A cell's identity: (run, eval_len, protocol, stride, rope_scaling, rope_factor, dataset)."""
    return (row["run"], int(row["eval_len"]), row["protocol"], _opt(row["stride"], int),
            _opt(row["rope_scaling"], str) or "none", _opt(row["rope_factor"], float), str(row["dataset"]))


SETTINGS = {"token_budget": "--tokens", "bucket_width": "--position-buckets"}  # not in a cell's key; change its numbers


def check_settings(row, cell: dict, fix: str) -> None:
    """Refuse a finished cell (its results row) computed with other settings than `cell` asks for: it is never
    recomputed. Rows from lenx versions that did not record a setting pass."""
    diff = [f"{k} {int(row[k])}, not {cell[k]} ({flag})" for k, flag in SETTINGS.items()
            if not pd.isna(row[k]) and int(row[k]) != cell[k]]
    if diff:
        raise LenxError(f"the results hold {row['run']} @{int(row['eval_len'])} computed with {'; '.join(diff)}; "
                        f"a finished cell is never recomputed: {fix}")


def append_rows(stem: Path, rows: list[dict], cell: dict, columns: list[str]) -> pd.DataFrame:
    """Replace the cell's rows in the table at `stem` by `rows` and write it (csv + parquet, each atomically). The
    table is read afresh under a lock on its directory, so `lenx eval` processes writing into one --out at once
    (one per GPU) keep each other's rows."""
    with _locked(stem.parent):
        table = _read_table(stem.with_suffix(".parquet"), columns)
        key = _key(cell)
        keep = table[[_key(r) != key for _, r in table.iterrows()]] if len(table) else table
        new = pd.DataFrame(rows, columns=columns)
        parts = [t for t in (keep, new) if len(t)]
        table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)
        for col in NUMERIC:  # one dtype per column, whichever run wrote the rows (None -> NaN)
            if col in table:
                table[col] = pd.to_numeric(table[col], errors="coerce")
        write_table(table, stem)
    return table


@contextmanager
def _locked(directory: Path):
    """An exclusive flock on `directory` (POSIX; elsewhere, no lock) while the block runs."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


STATIC_SCALINGS = ("pi", "ntk", "yarn")  # one factor per evaluation; dynamic-ntk derives its own per window


def scaling_plan(pe: str, scalings: list[str] | None, factors: list[float] | None, name: str = "--rope-scaling",
                 where: str = "") -> list[tuple[str, float | None]]:
    """The (RoPE extension, factor) cells for one run. Schemes without RoPE get only 'none' when several
    extensions are asked for, and an error when the one asked for does not apply to them. A factor of None:
    eval_len / train_len for the static extensions; for dynamic-ntk, transformers' default factor 1, i.e.
    s = max(1, window length / train_len) recomputed per window (recorded as an empty rope_factor). `name`,
    `where`: as in `check_eval_options`."""
    from .positional import get_scheme
    from .positional.base import scaling_not_supported

    scalings = scalings or ["none"]
    takes = [s for s in scalings if s in get_scheme(pe).eval_scalings]
    if not takes and len(scalings) == 1:
        raise scaling_not_supported(pe, scalings[0], name, where)
    return [(s, f) for s in takes or ["none"] for f in ([None] if s == "none" else factors or [None])]


def token_budget(tokens: int | None, lens: list[int]) -> int:
    """The targets each cell scores: --tokens (default max(65536, longest length)), rounded up to a multiple of the
    longest length; every length scores the same text (nonoverlap and sliding: exactly these targets)."""
    n = tokens or max(65536, max(lens))
    return math.ceil(n / max(lens)) * max(lens)


def cell_keys(run: Path | str, train_len: int, lens: list[int], scalings: list[tuple[str, float | None]],
              protocols: list[str], stride: int | None, tokens: int | None = None,
              position_buckets: int = 1) -> list[dict]:
    """The evaluation cells of one run (a run directory, or the name of an HF model), keyed as in the results
    table: one per (RoPE extension, factor, eval_len, protocol), with the settings outside the key
    (token_budget, bucket_width) that its numbers depend on."""
    name = run if isinstance(run, str) else run.name
    settings = {"token_budget": token_budget(tokens, lens),
                "bucket_width": bucket_width(train_len, position_buckets)}
    cells = []
    for (scaling, factor), L, protocol in itertools.product(scalings, lens, protocols):
        if scaling in STATIC_SCALINGS and factor is None:
            factor = max(1.0, L / train_len)  # the default: stretch the training length to L
        cells.append({"run": name, "eval_len": L, "protocol": protocol,
                      "stride": resolve_stride(protocol, L, stride), "rope_scaling": scaling, "rope_factor": factor,
                      **settings})
    return cells


def bucket_width(train_len: int, position_buckets: int = 1) -> int:
    """Width of a position bucket: the training length split into `position_buckets` equal parts (1: one
    bucket per training length; 4: quarter training lengths), rounded down, at least 1 token."""
    if position_buckets <= 0:
        raise LenxError(f"--position-buckets must be a positive integer, got {position_buckets}")
    return max(1, train_len // position_buckets)


def resolve_stride(protocol: str, eval_len: int, stride: int | None, name: str = "--stride",
                   where: str = "") -> int | None:
    """The stride a cell runs with: eval_len for nonoverlap, --stride (default eval_len // 2) for sliding,
    none for truncate. `name`, `where`: as in `check_eval_options`."""
    if protocol == "nonoverlap":
        return eval_len
    if protocol == "truncate":
        return None
    if stride is None:
        return max(1, eval_len // 2)
    if not 1 <= stride <= eval_len:
        raise LenxError(f"{where}{name} {stride} must be between 1 and the evaluation length {eval_len}")
    return stride


def eval_cell(model, data: dict, eval_len: int, protocol: str, *, stride: int | None, n_tokens: int,
              width: int, batch_tokens: int, device: str) -> tuple[dict, list[dict]]:
    """One cell: the model as it is now (scheme, RoPE scaling already set) at one length under one protocol.
    `data`: {"stream": test token stream, "documents": test documents' tokens, "tokenizer": tokenizer}.
    Returns the row's metrics and its position buckets; the row's nll is the token-weighted mean of the
    buckets' (both come from the same per-position sums)."""
    tok = data["tokenizer"]
    if protocol == "nonoverlap":
        # stride = length: the same n_tokens targets at every length, also one that does not divide n_tokens (its
        # last window ends at target n_tokens and scores only the targets not yet scored, as sliding's does)
        win = sliding_windows(data["stream"], eval_len, eval_len, n_tokens)
    elif protocol == "sliding":
        win = sliding_windows(data["stream"], eval_len, stride, n_tokens)
    elif protocol == "truncate":
        win = truncated_windows(data["documents"], eval_len, max(1, math.ceil(n_tokens / eval_len)))
    else:
        raise LenxError(f"unknown protocol '{protocol}'; known: {', '.join(PROTOCOLS)}")
    metrics = {"stride": stride, "documents": win.documents, "windows": len(win.tokens), "note": win.note}
    empty = dict(tokens=0, nll=None, ppl=None, bpb=None, bytes=0)
    if len(win.tokens) == 0:
        return {**metrics, **empty}, []
    try:
        sc = score_windows(model, win.tokens, win.first, batch_tokens, device, tok)
    except LengthNotSupported as e:
        return {**metrics, **empty, "note": str(e)}, []
    except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError

        if not is_oom(e):
            raise
        sc = None  # the failed batch's tensors are freed when this block ends
    if sc is None:

        if str(device).startswith("cuda"):
            torch.cuda.empty_cache()
        return {**metrics, **empty, "note": oom_note(eval_len, device)}, []
    total = float(sc.nll.sum())
    n = sc.tokens
    metrics.update(tokens=n, nll=total / n, ppl=math.exp(total / n), bpb=total / max(sc.bytes, 1) / math.log(2),
                   bytes=sc.bytes)
    return metrics, sc.buckets(width)


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
    lengths, tokens, protocols = opts["lengths"], opts["tokens"], opts["protocols"]
    rope_scalings, rope_factors, position_buckets = opts["rope_scaling"], opts["rope_factor"], opts["position_buckets"]
    ctx = distributed.init()
    device = distributed.device_for(ctx, device)  # checked before anything is read or made
    if attn_backend is not None:
        from .attention import BACKENDS

        if attn_backend not in BACKENDS:
            raise LenxError(f"unknown attention backend '{attn_backend}'{did_you_mean(attn_backend, BACKENDS)}; "
                            f"known: {', '.join(BACKENDS)}")
    if not models and (train_len is not None or dtype is not None):
        raise LenxError("--train-len and --dtype apply to HF models; give --model PATH_OR_NAME")
    subjects: list = [LenxRun(r) for r in ([Path(r) for r in run_dirs] if run_dirs else
                                           [] if models else find_runs(runs_dir))]
    if models:
        from .hf import HFModel

        if attn_backend is not None and not run_dirs:
            raise LenxError("--attn-backend applies to lenx runs; HF models use their own attention implementation")
        subjects += [HFModel(m, train_len, dtype) for m in models]
    prov = provenance(device)

    plan = []
    for subj in subjects:
        L = subj.train_len
        lens = run_lengths(L, opts)
        if subj.kind == "hf":  # ascending: transformers' dynamic NTK keeps the frequencies of the longest length seen
            lens = sorted(set(lens))
            subj.longest = lens[-1]
        width = bucket_width(L, position_buckets)
        scalings = subj.scaling_plan(rope_scalings, rope_factors)
        plan.append((subj, lens, width, cell_keys(subj.name, L, lens, scalings, protocols, stride,
                                                  tokens, position_buckets)))
    out = Path(out)  # made once every option has passed its checks (bad input leaves nothing behind)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LenxError(f"cannot create output directory {out}: {e.strerror}; choose another --out") from None
    table = load_results(out)

    def unfinished() -> list[tuple[int, int]]:
        """(subject, cell) indices into `plan` of the cells still to do, each finished one checked against this
        command. Under torchrun rank 0 alone decides, from the tables it writes: another rank's view of --out (a
        node-local disk, a concurrent writer) would give it another list, and the ranks would take turns at
        different cells."""
        by_pos = load_by_position(out)
        have_buckets = {_key(r) for _, r in by_pos.iterrows()}
        # a cell is finished when its row is in results (written last) and its buckets are there too; a cell
        # that ran out of memory is tried again

        finished = {_key(r): r for _, r in table.iterrows()
                    if (_key(r) in have_buckets or not (r["tokens"] > 0)) and not str(r["note"]).startswith(OOM_NOTE)}
        ids = []
        for i, (subj, lens, width, cells) in enumerate(plan):
            spec = DataSpec.of(dataset if dataset is not None else subj.default_data)
            for j, c in enumerate({**c, "dataset": spec.dataset} for c in cells):
                if _key(c) in finished:
                    check_settings(finished[_key(c)], c, f"use another --out than {out}")
                    check_weights(finished[_key(c)], subj, f"use another --out than {out}")
                    check_text(finished[_key(c)], spec, f"use another --out than {out}")
                else:
                    ids.append((i, j))
        return ids

    todo = []  # the unfinished cells, in order: (subject, lens, width, data spec, cell key)
    for i, j in distributed.from_main(ctx, unfinished):
        subj, lens, width, cells = plan[i]
        spec = DataSpec.of(dataset if dataset is not None else subj.default_data)
        todo.append((subj, lens, width, spec, {**cells[j], "dataset": spec.dataset}))
    current: dict = {}  # the test data of the subject being evaluated (the subject holds its model)

    def compute(item) -> tuple[dict, list[dict]]:
        subj, lens, width, spec, base = item
        if current.get("subject") is not subj:
            current.clear()
            tok = subj.open(device, attn_backend if subj.kind == "lenx" else None)
            data = {"tokenizer": tok, "stream": token_stream(spec, tok, "test"),
                    "documents": document_tokens(spec, tok, "test")}
            subj.check_tokens(data["stream"])
            n_tok = token_budget(tokens, lens)
            if any(p != "truncate" for p in protocols) and len(data["stream"]) < n_tok + 1:
                raise LenxError(
                    f"the test split of '{spec.dataset}' has {len(data['stream'])} tokens; scoring {n_tok} "
                    f"tokens needs {n_tok + 1}; lower --tokens or --max-len"
                )
            current.update(subject=subj, data=data, n_tok=n_tok, fingerprint=load_corpus(spec).fingerprint)
        L = base["eval_len"]
        model = subj.prepare(base["rope_scaling"], base["rope_factor"])
        row = {
            **base,
            "pe": subj.pe, "seed": subj.seed, "train_len": subj.train_len, "ratio": L / subj.train_len,
            "dataset_fingerprint": current["fingerprint"], "tokenizer": subj.tokenizer_name,
            "run_dir": subj.run_dir, "device": prov["device"], "lenx_version": prov["lenx_version"],
            "attn_backend": subj.attn_backend, "config_id": subj.config_id,
            "weights_id": subj.weights_id,
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        t0 = time.perf_counter()
        metrics, buckets = eval_cell(model, current["data"], L, base["protocol"], stride=base["stride"],
                                     n_tokens=current["n_tok"], width=width,
                                     batch_tokens=subj.batch_tokens(L, batch_tokens), device=device)
        row.update(metrics, seconds=round(time.perf_counter() - t0, 3))
        return row, buckets

    from .progress import progress as make_progress

    n_cells = sum(len(cells) for *_, cells in plan)
    own = bar is None
    progress_cm = make_progress(disable=not (progress and ctx.main)) if own else nullcontext(bar)
    with progress_cm as bar:
        task = bar.add_task("eval", total=n_cells, completed=n_cells - len(todo))
        # Under torchrun, rank r takes cells r, r + world, ...; rank 0 alone writes the tables.
        for start in range(0, len(todo), ctx.world):
            batch = todo[start : start + ctx.world]
            mine = batch[ctx.rank] if ctx.rank < len(batch) else None
            if mine is not None:
                subj, base = mine[0], mine[-1]
                extra = "" if base["rope_scaling"] == "none" else f" {base['rope_scaling']}"
                bar.update(task, description=f"eval {subj.name} @ {base['eval_len']} {base['protocol']}{extra}")
            try:
                result = compute(mine) if mine is not None else None
            except LenxError as e:
                if not ctx.active:
                    raise
                result = e  # handed to every rank, so none waits forever
            results = distributed.gather(ctx, result)
            for r in results:
                if isinstance(r, LenxError):
                    raise r
            for item, (row, buckets) in zip(batch, results):
                if ctx.main:
                    ident = {k: row[k] for k in BY_POSITION_COLUMNS if k in row and k not in BUCKET_FIELDS}
                    # buckets first, the results row last: the row marks the cell finished
                    append_rows(out / "results_by_position", [{**ident, **b} for b in buckets], row, BY_POSITION_COLUMNS)
                    table = append_rows(out / "results", [row], row, COLUMNS)
                bar.advance(task)
                if on_cell:
                    on_cell(item[-1])
        if not own:
            bar.remove_task(task)
    return table
