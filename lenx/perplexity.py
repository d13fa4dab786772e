"""The perplexity cell: one subject at one evaluation length under one protocol, RoPE extension and factor.

Protocols (`--protocol`, several allowed; recorded in every row's `protocol` and `stride` columns):

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

Context gain (nonoverlap, lengths past 1x): every target is scored at every length, so each has an NLL with the
context of a 1x window and one with that of the cell's window. A row's `context_gain` is the mean, over the targets
at window positions >= the training length L, of NLL(1x window) - NLL(this window), in nats, paired token by token
(the same model, RoPE extension included, with its context cut to L): above 0 the model predicts better with the
longer context, 0 it ignores it, below 0 the longer window hurts. Its buckets carry the same difference over their
targets (0 up to L, where both windows hold the same context). The 1x NLLs are those of the run's 1x cell where
the model is the same (no extension, dynamic NTK), else scored once more at L.

A finished cell is never recomputed: a rerun into the same --out with another --tokens or --position-buckets (the
row's token_budget / bucket_width) is refused; write to another --out.
"""

from __future__ import annotations

import itertools
import math
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from . import store
from .cells import CellKind
from .data import DataSpec, document_tokens, load_corpus, text_changed, token_stream
from .errors import OOM_NOTE, LengthNotSupported, LenxError, is_oom, oom_note
from .positional.rope_scaling import PARAM_COLUMNS, is_static
from .store import Table, optional
from .subject import Subject
from .windows import PROTOCOLS, resolve_stride, score_windows, sliding_windows, truncated_windows

COLUMNS = [
    "run", "pe", "seed", "train_len", "eval_len", "ratio", "protocol", "stride", "rope_scaling", "rope_factor",
    "tokens", "windows", "documents", "nll", "ppl", "bpb", "bytes", "seconds", "note",
    "dataset", "dataset_fingerprint", "tokenizer", "run_dir", "device", "attn_backend", "lenx_version", "timestamp",
    "token_budget", "bucket_width", "config_id", "weights_id",  # appended, so that older tables still read
    "context_gain", "context_gain_tokens", "attn_route", *PARAM_COLUMNS,
]
KEY_COLUMNS = ["run", "eval_len", "protocol", "rope_scaling", "rope_factor"]  # in every lenx table, old ones too
BUCKET_FIELDS = ["bucket_start", "bucket_end", "tokens", "nll"]
BY_POSITION_COLUMNS = [
    "run", "pe", "seed", "train_len", "eval_len", "protocol", "stride", "rope_scaling", "rope_factor", "dataset",
    *BUCKET_FIELDS, "config_id", "context_gain",
]


def cell_key(row) -> tuple:
    """A cell's identity: (run, eval_len, protocol, stride, rope_scaling, rope_factor, dataset)."""
    return (row["run"], int(row["eval_len"]), row["protocol"], optional(row["stride"], int),
            optional(row["rope_scaling"], str) or "none", optional(row["rope_factor"], float), str(row["dataset"]))


def _upgrade(df):
    """Tables of lenx versions before --stride: nonoverlap rows have stride eval_len."""
    old = (df["protocol"] == "nonoverlap") & df["stride"].isna()
    return df.assign(stride=df["stride"].where(~old, df["eval_len"]))


RESULTS = Table("results", COLUMNS, cell_key, KEY_COLUMNS, _upgrade)
BY_POSITION = Table("results_by_position", BY_POSITION_COLUMNS, cell_key, KEY_COLUMNS, _upgrade)


def load_results(out: Path):
    return RESULTS.read(out)


def load_by_position(out: Path):
    return BY_POSITION.read(out)


SETTINGS = {"token_budget": "--tokens", "bucket_width": "--position-buckets"}  # not in a cell's key; change its numbers
check_settings = partial(store.check_settings, settings=SETTINGS)


def check_text(row, spec, fix: str) -> None:
    """Refuse a finished cell scored on other text than `spec` names now: another --test-file (all of them dataset
    'files'), a file edited since, `stdlib` of another Python (its text is the running interpreter's standard
    library), a hub dataset updated since. The name alone identifies none of them."""
    recorded = row.get("dataset_fingerprint")
    if not isinstance(recorded, str) or recorded == "unknown":
        return
    now = load_corpus(spec).fingerprint
    if recorded != now:
        raise LenxError(f"the results hold {row['run']} @{int(row['eval_len'])} scored on other text than dataset "
                        f"'{spec.dataset}' is now ({text_changed(spec.dataset)}: fingerprint {recorded}, now {now}); "
                        f"a finished cell is never recomputed: {fix}")


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
        if is_static(scaling) and factor is None:
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



def eval_cell(model, data: dict, eval_len: int, protocol: str, *, stride: int | None, n_tokens: int,
              width: int, batch_tokens: int, device: str, train_len: int | None = None,
              reference: Callable[[], torch.Tensor] | None = None, targets: bool = False) -> tuple[dict, list[dict]]:
    """One cell: the model as it is now (scheme, RoPE scaling already set) at one length under one protocol.
    `data`: {"stream": test token stream, "documents": test documents' tokens, "tokenizer": tokenizer}.
    Returns the row's metrics and its position buckets; the row's nll is the token-weighted mean of the
    buckets' (both come from the same per-position sums). Nonoverlap past `train_len`, with `reference` (the
    same targets' NLLs in 1x windows, in stream order): the context gain, row and buckets. `targets` (nonoverlap):
    the metrics also hold each target's NLL, in stream order ("target_nll", for other cells' `reference`)."""
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
        sc = score_windows(model, win.tokens, win.first, batch_tokens, device, data["tokenizer"],
                           per_target=protocol == "nonoverlap")
        gain = None
        if protocol == "nonoverlap" and train_len and eval_len > train_len and reference is not None:
            gain = reference() - sc.target_nll  # per target: NLL with a 1x context minus with this window's
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
    total, n = float(sc.nll.sum()), sc.tokens
    metrics.update(tokens=n, nll=total / n, ppl=math.exp(total / n), bpb=total / max(sc.bytes, 1) / math.log(2),
                   bytes=sc.bytes)
    if targets and sc.target_nll is not None:
        metrics["target_nll"] = sc.target_nll
    buckets = sc.buckets(width)
    if gain is not None:
        past = sc.target_pos >= train_len
        metrics.update(context_gain=float(gain[past].mean()) if past.any() else None,
                       context_gain_tokens=int(past.sum()))
        for b in buckets:
            inside = (sc.target_pos >= b["bucket_start"]) & (sc.target_pos < b["bucket_end"])
            b["context_gain"] = float(gain[inside].mean())
    return metrics, buckets


class Perplexity(CellKind):
    """Perplexity cells: one per (RoPE extension, factor, eval_len, protocol) of a subject, scored on the test
    split of `dataset` (default: the subject's own). Rows go to `results` (one per cell) and to
    `results_by_position` (its position buckets, written first: the results row marks the cell finished).
    `opts`: the checked options (`lenx.evaluate.check_eval_options`); `lengths(train_len)`: a subject's
    evaluation lengths."""

    tables = (BY_POSITION, RESULTS)
    settings = SETTINGS

    def __init__(self, opts: dict, lengths: Callable[[int], list[int]], dataset: DataSpec | str | None = None,
                 batch_tokens: int = 16384, device: str = "cpu"):
        self.opts, self.lengths, self.dataset = opts, lengths, dataset
        self.batch_tokens, self.device = batch_tokens, device
        self._one_x: dict[tuple, torch.Tensor] = {}  # the current subject's 1x per-target NLLs, by model setting

    def spec(self, subject: Subject) -> DataSpec:
        return DataSpec.of(self.dataset if self.dataset is not None else subject.default_data)

    def cells(self, subject: Subject) -> list[dict]:
        o = self.opts
        lens = subject.plan_lengths(self.lengths(subject.train_len))
        scalings = subject.scaling_plan(o["rope_scaling"], o["rope_factor"])
        cells = cell_keys(subject.name, subject.train_len, lens, scalings, o["protocols"], o["stride"], o["tokens"],
                          o["position_buckets"])
        dataset = self.spec(subject).dataset
        return [{**c, "dataset": dataset} for c in cells]

    def finished(self, out: Path) -> dict:
        # a cell is finished when its row is in results (written last) and its buckets are there too; a cell
        # that ran out of memory is tried again
        have_buckets = {cell_key(r) for r in BY_POSITION.read(out).to_dict("records")}
        return {cell_key(r): r for r in RESULTS.read(out).to_dict("records")
                if (cell_key(r) in have_buckets or not (r["tokens"] > 0)) and not str(r["note"]).startswith(OOM_NOTE)}

    def check_finished(self, row, cell: dict, subject: Subject, fix: str) -> None:
        super().check_finished(row, cell, subject, fix)
        check_text(row, self.spec(subject), fix)

    def load(self, subject: Subject, tok, cell: dict) -> dict:
        """The test split as one token stream and as documents; every cell of a subject scores the same budget."""
        spec = self.spec(subject)
        data = {"tokenizer": tok, "stream": token_stream(spec, tok, "test"),
                "documents": document_tokens(spec, tok, "test")}
        subject.check_tokens(data["stream"])
        n_tok = cell["token_budget"]
        if any(p != "truncate" for p in self.opts["protocols"]) and len(data["stream"]) < n_tok + 1:
            raise LenxError(
                f"the test split of '{spec.dataset}' has {len(data['stream'])} tokens; scoring {n_tok} "
                f"tokens needs {n_tok + 1}; lower --tokens or --max-len"
            )
        return {**data, "fingerprint": load_corpus(spec).fingerprint}

    def score(self, subject: Subject, model, data: dict, cell: dict) -> dict[str, list[dict]]:
        L, L1 = cell["eval_len"], subject.train_len
        # the model as prepared for this cell; with no extension (or dynamic NTK, which is none up to 1x) it is the
        # one the run's 1x cell scores, so that cell's per-target NLLs serve every length
        same_as_1x = cell["rope_scaling"] in ("none", "dynamic-ntk") and cell["rope_factor"] is None
        key = (subject.name, cell["rope_scaling"], cell["rope_factor"] if not same_as_1x else None,
               cell["token_budget"], cell["dataset"])
        if self._one_x and next(iter(self._one_x))[0] != subject.name:
            self._one_x.clear()  # another subject: its vectors are no use any more

        def reference() -> torch.Tensor:
            if key not in self._one_x:
                one, _ = eval_cell(model, data, L1, "nonoverlap", stride=L1, n_tokens=cell["token_budget"],
                                   width=cell["bucket_width"], batch_tokens=subject.batch_tokens(L1, self.batch_tokens),
                                   device=self.device, targets=True)
                self._one_x[key] = one["target_nll"]
            return self._one_x[key]

        metrics, buckets = eval_cell(model, data, L, cell["protocol"], stride=cell["stride"],
                                     n_tokens=cell["token_budget"], width=cell["bucket_width"],
                                     batch_tokens=subject.batch_tokens(L, self.batch_tokens), device=self.device,
                                     train_len=L1, reference=reference, targets=True)
        targets = metrics.pop("target_nll", None)
        if cell["protocol"] == "nonoverlap" and L == L1 and targets is not None:
            self._one_x[key] = targets
        row = {"ratio": L / L1, "dataset_fingerprint": data["fingerprint"], **metrics}
        return {BY_POSITION.stem: buckets, RESULTS.stem: [row]}

    def describe(self, subject: Subject, cell: dict) -> str:
        extra = "" if cell["rope_scaling"] == "none" else f" {cell['rope_scaling']}"
        return f"eval {subject.name} @ {cell['eval_len']} {cell['protocol']}{extra}"
