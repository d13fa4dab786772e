"""The probe cell: one subject, one probe (passkey, mqar, repeat), one evaluation length, one depth (passkey) or
distance (mqar, repeat), one RoPE extension and factor; `trials` windows built by `lenx.probes.documents`, each of
exactly the evaluation length, scored in one forward each (repeat: two, with and without the first copy).

Per cell, one row of `probes.csv` / `probes.parquet`:

- `accuracy`: the share of answer tokens (the key's, the values', the second copy's) that are the model's argmax
  given the true tokens before them (teacher-forced), pooled over trials, with a Wilson 95% interval
  (`accuracy_low`, `accuracy_high`; the tokens of one trial are counted as independent draws).
- `exact_match`: the share of trials whose answer greedy decoding reproduces, with its Wilson interval. For lenx
  runs (and mqar, repeat) it is read off the teacher-forced pass: greedy decoding of k tokens reproduces the answer
  exactly when each answer token is the argmax after the answer's true prefix (a causal model's logits at a
  position depend on the tokens up to it alone), so no decoding forward is needed (`match` tokens). For HF models'
  passkey, the paper's protocol: up to max(10, 2k) tokens generated greedily with the model's KV cache after the
  prompt, and the first integer of their text must be the key (`match` text).
- `key_nll`: the answer tokens' mean NLL (nats); repeat: with the first copy, `base_nll` without it, and `gain` =
  base_nll - key_nll, the mean over trials of each trial's paired difference, with a Student-t 95% interval over
  trials (`gain_low`, `gain_high`).

The windows of a cell are drawn from a numpy Generator seeded with `cell_seed`, a function of `probe_seed`
(--probe-seed), the probe, the length and the depth or distance alone: every subject of one tokenizer and test split
gets the same documents, whatever the order or sharding of the cells. A finished cell is never recomputed: a rerun
into the same --out with another --probe-trials, --probe-seed, --probe-pairs, --probe-segment or passkey wording is
refused.
"""

from __future__ import annotations

import hashlib
import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..cells import CellKind
from ..data import DataSpec, load_corpus, token_stream
from ..errors import OOM_NOTE, LengthNotSupported, LenxError, is_oom, oom_note
from ..perplexity import check_text
from ..positional.rope_scaling import PARAM_COLUMNS, is_static
from ..stats import t975, wilson
from ..store import Table, optional
from ..subject import Subject
from .documents import (FORMATS, PasskeyFormat, first_integer, garbage_stream, haystack_stream, mqar,
                        passkey, passkey_overhead, repeat)

COLUMNS = [
    "run", "pe", "seed", "train_len", "eval_len", "ratio", "probe", "depth", "distance", "rope_scaling",
    "rope_factor", "trials", "answers", "accuracy", "accuracy_low", "accuracy_high", "exact_match",
    "exact_match_low", "exact_match_high", "match", "key_nll", "base_nll", "gain", "gain_low", "gain_high",
    "probe_seed", "cell_seed", "format", "pairs", "segment", "seconds", "note",
    "dataset", "dataset_fingerprint", "tokenizer", "run_dir", "device", "attn_backend", "lenx_version", "timestamp",
    "config_id", "weights_id", "attn_route", *PARAM_COLUMNS,
]
SETTINGS = {"trials": "--probe-trials", "probe_seed": "--probe-seed", "pairs": "--probe-pairs",
            "segment": "--probe-segment"}  # not in a cell's key; change its numbers (and `format`, a name)
DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]  # passkey depths without --probe-depths
EMPTY = dict(answers=0, accuracy=None, accuracy_low=None, accuracy_high=None, exact_match=None,
             exact_match_low=None, exact_match_high=None, match=None, key_nll=None, base_nll=None, gain=None,
             gain_low=None, gain_high=None)


def cell_key(row) -> tuple:
    """A probe cell's identity: (run, probe, eval_len, depth, distance, rope_scaling, rope_factor, dataset)."""
    return (row["run"], row["probe"], int(row["eval_len"]), optional(row["depth"], float),
            optional(row["distance"], int), optional(row["rope_scaling"], str) or "none",
            optional(row["rope_factor"], float), str(row["dataset"]))


PROBES_TABLE = Table("probes", COLUMNS, cell_key, ["run", "probe", "eval_len"])


def load_probes(out):
    return PROBES_TABLE.read(out)


def cell_seed(probe_seed: int, probe: str, eval_len: int, at) -> int:
    """The seed of a cell's generator: a function of the probe seed and the cell's probe, length and depth or
    distance alone (48 bits: exact in any numeric column)."""
    text = f"{int(probe_seed)}/{probe}/{int(eval_len)}/{float(at)!r}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:6], "big")


def default_segment(train_len: int) -> int:
    return max(2, train_len // 4)


def distances(train_len: int, eval_len: int, span: int, multiples: list[float] | None = None) -> list[int]:
    """The distances a probe of `span` tokens (mqar: its pair block; repeat: its segment) is placed at in a window
    of eval_len: `multiples` of the training length, else train_len / 2, train_len, 2 train_len, ... and eval_len -
    span (the longest that fits: nearly the whole window); those from span to eval_len - span."""
    if multiples:
        ds = [round(m * train_len) for m in multiples]
    else:
        ds, d = [], max(1, train_len // 2)
        while d + span <= eval_len:
            ds.append(d)
            d *= 2
        ds.append(eval_len - span)
    return sorted({d for d in ds if span <= d <= eval_len - span})


# ---------------------------------------------------------------------------------------------------
# scoring


@torch.no_grad()
def answer_scores(model, windows: torch.Tensor, answers: list[np.ndarray], batch_tokens: int, device: str
                  ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each window's answer tokens, teacher-forced: (NLL in nats, whether it is the argmax) per answer position p,
    from the logits at p - 1. One forward per window over all its tokens, as many windows per forward as
    `batch_tokens` allows; only the answers' rows of the logits are turned into log-probabilities."""
    n, E = windows.shape
    per_batch = max(1, batch_tokens // E)
    out = []
    for i in range(0, n, per_batch):
        w = windows[i:i + per_batch]
        mine = answers[i:i + per_batch]
        row = torch.cat([torch.full((len(a),), j, dtype=torch.long) for j, a in enumerate(mine)])
        pos = torch.from_numpy(np.concatenate(mine).astype(np.int64))
        logits = model(w.to(device)).logits
        rows = logits[row.to(logits.device), (pos - 1).to(logits.device)].float()  # the answers' rows only
        del logits
        target = w[row, pos].to(rows.device)
        nll = F.cross_entropy(rows, target, reduction="none").double().cpu().numpy()
        hit = (rows.argmax(-1) == target).cpu().numpy()
        ends = np.cumsum([len(a) for a in mine])[:-1]
        out += list(zip(np.split(nll, ends), np.split(hit, ends)))
    return out


def proportion(k: int, n: int) -> tuple[float | None, float | None, float | None]:
    if n == 0:
        return None, None, None
    lo, hi = wilson(k, n)
    return k / n, lo, hi


def summarize(scored: list[tuple[np.ndarray, np.ndarray]], matches: list[bool]) -> dict:
    """A cell's accuracy (pooled over its answer tokens), exact match (over trials) and key NLL."""
    hits = sum(int(h.sum()) for _, h in scored)
    n = sum(len(h) for _, h in scored)
    acc, acc_lo, acc_hi = proportion(hits, n)
    em, em_lo, em_hi = proportion(int(sum(matches)), len(matches))
    return dict(answers=n, accuracy=acc, accuracy_low=acc_lo, accuracy_high=acc_hi, exact_match=em,
                exact_match_low=em_lo, exact_match_high=em_hi,
                key_nll=sum(float(x.sum()) for x, _ in scored) / n if n else None)


def mean_interval(x: np.ndarray) -> tuple[float, float | None, float | None]:
    """The mean of x and its Student-t 95% interval (none for a single value)."""
    m = float(np.mean(x))
    if len(x) < 2:
        return m, None, None
    half = t975(len(x) - 1) * float(np.std(x, ddof=1)) / math.sqrt(len(x))
    return m, m - half, m + half


# ---------------------------------------------------------------------------------------------------
# the cell kind


def probe_cells(name: str, T: int, lens: list[int], scalings: list[tuple[str, float | None]], probes: list[str],
                o: dict, dataset: str, fmt: str | None) -> list[dict]:
    """The probe cells of a subject `name` trained at T (`Probes.cells`; `lenx sweep`'s plan): one per (RoPE
    extension, factor, eval_len, probe, depth or distance). `o`: the checked options; `fmt`: the passkey wording's
    name."""
    segment = o["probe_segment"] or default_segment(T)
    cells = []
    for scaling, factor in scalings:
        for L in lens:
            if is_static(scaling) and factor is None:
                f = max(1.0, L / T)  # as perplexity: stretch the training length to L
            else:
                f = factor
            base = {"run": name, "eval_len": L, "rope_scaling": scaling, "rope_factor": f,
                    "dataset": dataset, "trials": o["probe_trials"], "probe_seed": o["probe_seed"],
                    "pairs": None, "segment": None, "format": None, "depth": None, "distance": None}
            for probe in probes:
                if probe == "passkey":
                    ats = [{"depth": float(d), "format": fmt} for d in o["probe_depths"] or DEPTHS]
                elif probe == "mqar":
                    ats = [{"distance": d, "pairs": o["probe_pairs"]}
                           for d in distances(T, L, 2 * o["probe_pairs"], o["probe_distances"])]
                else:
                    ats = [{"distance": d, "segment": segment}
                           for d in distances(T, L, segment, o["probe_distances"])]
                for at in ats:
                    where = at.get("depth", at.get("distance"))
                    cells.append({**base, "probe": probe, **at,
                                  "cell_seed": cell_seed(o["probe_seed"], probe, L, where)})
    return cells


class Probes(CellKind):
    """Probe cells: per subject, one per (RoPE extension, factor, eval_len, probe, depth or distance), scored on the
    test split of `dataset` (default: the subject's own). `opts`: the checked options
    (`lenx.eval_config.check_eval_options`): probe, probe_trials, probe_depths, probe_distances, probe_pairs,
    probe_segment, probe_seed, passkey_format, passkey_needle, passkey_question, rope_scaling, rope_factor;
    `lengths(train_len)`: a subject's evaluation lengths."""

    tables = (PROBES_TABLE,)
    settings = SETTINGS

    def __init__(self, opts: dict, lengths: Callable[[int], list[int]], dataset: DataSpec | str | None = None,
                 batch_tokens: int = 16384, device: str = "cpu"):
        self.opts, self.lengths, self.dataset = opts, lengths, dataset
        self.batch_tokens, self.device = batch_tokens, device
        self.formats: dict[str, PasskeyFormat] = {}

    def spec(self, subject: Subject) -> DataSpec:
        return DataSpec.of(self.dataset if self.dataset is not None else subject.default_data)

    def passkey_format(self, subject: Subject) -> PasskeyFormat:
        """--passkey-format (auto: the subject's own, `Subject.passkey_format`), with --passkey-needle /
        --passkey-question."""
        name = self.opts["passkey_format"]
        fmt = FORMATS[subject.passkey_format if name in (None, "auto") else name]
        fmt = fmt.with_wording(self.opts["passkey_needle"], self.opts["passkey_question"])
        self.formats[fmt.name] = fmt
        return fmt

    def probes_of(self, subject: Subject) -> list[str]:
        """The asked probes this subject takes; refused when it takes none of them."""
        asked = self.opts["probe"]
        mine = [p for p in asked if p in subject.probes]
        if asked and not mine:
            raise LenxError(f"--probe {','.join(asked)}: {subject.name} ({subject.pe}) takes "
                            f"{', '.join(subject.probes)}; mqar needs a model trained on its pairs (a lenx run)")
        return mine

    def cells(self, subject: Subject) -> list[dict]:
        probes = self.probes_of(subject)
        lens = subject.plan_lengths(self.lengths(subject.train_len))
        scalings = subject.scaling_plan(self.opts["rope_scaling"], self.opts["rope_factor"])
        fmt = self.passkey_format(subject).name if "passkey" in probes else None
        return probe_cells(subject.name, subject.train_len, lens, scalings, probes, self.opts,
                           self.spec(subject).dataset, fmt)

    def finished(self, out) -> dict:
        # a cell that ran out of memory is tried again
        return {cell_key(r): r for r in PROBES_TABLE.read(out).to_dict("records")
                if not str(r["note"]).startswith(OOM_NOTE)}

    def check_finished(self, row, cell: dict, subject: Subject, fix: str) -> None:
        super().check_finished(row, cell, subject, fix)
        recorded = row.get("format")
        if cell["format"] is not None and isinstance(recorded, str) and recorded != cell["format"]:
            raise LenxError(f"the results hold {row['run']} passkey @{int(row['eval_len'])} scored with the "
                            f"'{recorded}' wording, not '{cell['format']}'; a finished cell is never recomputed: {fix}")
        check_text(row, self.spec(subject), fix)

    def load(self, subject: Subject, tok, cell: dict) -> dict:
        """The test split's tokens without end-of-document tokens: the haystack of every cell of the subject."""
        spec = self.spec(subject)
        stream = token_stream(spec, tok, "test")
        subject.check_tokens(stream)
        return {"tokenizer": tok, "haystack": haystack_stream(stream, tok.eod_id), "garbage": {},
                "fingerprint": load_corpus(spec).fingerprint}

    def documents(self, data: dict, cell: dict) -> list:
        """The cell's trial windows, from its own generator."""
        rng = np.random.default_rng(cell["cell_seed"])
        tok, E, probe = data["tokenizer"], cell["eval_len"], cell["probe"]
        if probe == "passkey":
            fmt = self.formats[cell["format"]]
            hay = data["haystack"]
            if fmt.garbage is not None:
                hay = data["garbage"].get(fmt.name)
                if hay is None or len(hay) < E:
                    hay = data["garbage"][fmt.name] = garbage_stream(tok, fmt, 2 * E)
            return [passkey(tok, hay, E, cell["depth"], rng, fmt) for _ in range(cell["trials"])]
        if probe == "mqar":
            return [mqar(tok, E, cell["distance"], rng, cell["pairs"]) for _ in range(cell["trials"])]
        return [repeat(data["haystack"], E, cell["distance"], cell["segment"], rng) for _ in range(cell["trials"])]

    def score(self, subject: Subject, model, data: dict, cell: dict) -> dict[str, list[dict]]:
        E, probe, tok = cell["eval_len"], cell["probe"], data["tokenizer"]
        row = {"ratio": E / subject.train_len, "dataset_fingerprint": data["fingerprint"], "note": ""}
        if probe == "passkey":
            need = passkey_overhead(tok, self.formats[cell["format"]])
            if need > E:
                note = (f"the '{cell['format']}' passkey wording takes {need} tokens, more than the window's {E}; "
                        "use --passkey-format short or longer lengths")
                return {PROBES_TABLE.stem: [{**row, **EMPTY, "note": note}]}
        docs = self.documents(data, cell)
        windows = [d.tokens for d in docs] + ([d.control for d in docs] if probe == "repeat" else [])
        answers = [d.answer for d in docs] * (2 if probe == "repeat" else 1)
        batch = subject.batch_tokens(E, self.batch_tokens)
        try:
            scored = answer_scores(model, torch.from_numpy(np.stack(windows)), answers, batch, self.device)
            with_copy = scored[:len(docs)]
            if probe == "passkey" and getattr(model, "decodes", False):
                matches = [first_integer(tok.decode(model.greedy(d.tokens[:d.answer[0]], max(10, 2 * len(d.answer)))))
                           == d.key for d in docs]
                row["match"] = "text"
            else:
                matches = [bool(h.all()) for _, h in with_copy]
                row["match"] = "tokens"
        except LengthNotSupported as e:
            return {PROBES_TABLE.stem: [{**row, **EMPTY, "note": str(e)}]}
        except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
            if not is_oom(e):
                raise
            scored = None  # the failed batch's tensors are freed when this block ends
        if scored is None:
            if str(self.device).startswith("cuda"):
                torch.cuda.empty_cache()
            return {PROBES_TABLE.stem: [{**row, **EMPTY, "note": oom_note(E, self.device)}]}
        row.update(summarize(with_copy, matches))
        if probe == "repeat":
            without = scored[len(docs):]
            row["base_nll"] = sum(float(x.sum()) for x, _ in without) / row["answers"]
            gains = np.array([float(b.mean() - w.mean()) for (w, _), (b, _) in zip(with_copy, without)])
            row["gain"], row["gain_low"], row["gain_high"] = mean_interval(gains)
        return {PROBES_TABLE.stem: [row]}

    def describe(self, subject: Subject, cell: dict) -> str:
        at = f"depth {cell['depth']:g}" if cell["depth"] is not None else f"distance {cell['distance']}"
        extra = "" if cell["rope_scaling"] == "none" else f" {cell['rope_scaling']}"
        return f"{cell['probe']} {subject.name} @ {cell['eval_len']} {at}{extra}"

