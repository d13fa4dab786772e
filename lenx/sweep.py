"""`lenx sweep`: schemes x seeds from one YAML file: train what is missing, evaluate what is
missing, write the report. A rerun does only what is missing, and refuses run directories and results made with
other train: or eval: settings than the file now asks for."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .config import TRAIN_KEYS, check_values, read_yaml, resolve
from .errors import LenxError, did_you_mean
from .eval_config import EVAL_FLAGS, check_eval_options, eval_kwargs, run_lengths
from .options import file_keys, option
from .positional.rope import scaling_plan
from .positional.base import is_integer

EVAL_KEYS = set(EVAL_FLAGS)  # the options of `lenx eval`, keyed as in a sweep's eval: section
PATH_KEYS = {"runs_dir": "a directory path", "results_dir": "a directory path", "published": "a file path"}


@dataclass
class SweepSpec:
    """A sweep config as `load_sweep` read and checked it; the fields with a key are its top-level keys."""

    path: Path = option(help="The file read.", flag=None, key=None)
    schemes: list[str] = option(help="Positional schemes to train and evaluate (`lenx schemes` lists them).",
                                flag=None)
    runs_dir: Path = option(help="Where the runs are trained [default: runs/<name>].", flag=None)
    results_dir: Path = option(help="Where results and report go [default: results/<name>].", flag=None)
    name: str = option("", "The sweep's name [default: the file's name].", flag=None)
    description: str | None = option(None, "What the sweep is for (read by people only).", flag=None)
    seeds: list[int] = option([0], "Seeds of each scheme.", flag=None)
    train: dict = option({}, "Training settings of every run (`lenx train --config` keys, but pe and seed).",
                         flag=None)
    # as check_eval_options returns it: every key of EVAL_KEYS, checked, defaults filled in
    eval: dict = option({}, "Evaluation settings (`lenx eval` options: " + ", ".join(sorted(EVAL_KEYS)) + ").",
                        flag=None)
    published: Path | None = option(None, "A CSV of the paper's numbers to set beside ours.", flag=None)
    raw: dict = option({}, "The file as read.", flag=None, key=None)


TOP_KEYS = set(file_keys(SweepSpec))


def load_sweep(path: str | Path) -> SweepSpec:
    path = Path(path)
    raw = read_yaml(path)
    unknown = set(raw) - TOP_KEYS
    if unknown and "schemes" not in raw and set(raw) <= set(TRAIN_KEYS):
        raise LenxError(f"{path} is a training config; train one run with `lenx train --config {path}`, or sweep with "
                        "a file of schemes: [...], seeds: [...] and these settings under train:")
    if unknown:
        raise LenxError(f"{path}: unknown key '{sorted(unknown)[0]}'{did_you_mean(sorted(unknown)[0], TOP_KEYS)}; known keys: {', '.join(sorted(TOP_KEYS))}")
    name = str(raw.get("name", path.stem))
    schemes, seeds = _schemes_and_seeds(raw, path)
    train = raw.get("train") or {}
    evals = raw.get("eval") or {}
    for key, value in (("train", train), ("eval", evals)):
        if not isinstance(value, dict):
            raise LenxError(f"{path}: '{key}' must be a mapping")
    if set(train) & {"pe", "seed"}:
        raise LenxError(f"{path}: set 'pe' and 'seed' through 'schemes' and 'seeds', not under 'train'")
    check_values(train, f"{path}: train")
    evals, names = _eval_section(evals, path)
    for key, what in PATH_KEYS.items():
        if raw.get(key) is not None and not (isinstance(raw[key], str) and raw[key].strip()):
            raise LenxError(f"{path}: '{key}' must be {what} (text), got {raw[key]!r}")
    for s in schemes:
        cfg = resolve(None, lambda k: f"{path}: train.{k}" if k in train else "'schemes'" if k == "pe" else k,
                      pe=s, **train)  # validates scheme names and every training value now, not hours later
        run_lengths(cfg.train_len, evals, names, f"{path}: ")  # and the eval values that depend on the run
        scaling_plan(s, evals["rope_scaling"], evals["rope_factor"], names["rope_scaling"], f"{path}: ")
    published = raw.get("published")
    if published is not None:
        published = (path.parent / published).resolve()
        if not published.exists():
            raise LenxError(f"{path}: published numbers file {published} not found")
    return SweepSpec(
        path=path, name=name, description=raw.get("description"), schemes=schemes, seeds=seeds, train=train,
        eval=evals, runs_dir=Path(raw.get("runs_dir") or f"runs/{name}"),
        results_dir=Path(raw.get("results_dir") or f"results/{name}"), published=published, raw=raw,
    )


def _schemes_and_seeds(raw: dict, path: Path) -> tuple[list[str], list[int]]:
    schemes = raw.get("schemes")
    if not isinstance(schemes, list) or not schemes or not all(isinstance(s, str) for s in schemes):
        raise LenxError(f"{path}: 'schemes' must be a non-empty list of scheme names")
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(is_integer(s) and s >= 0 for s in seeds):
        raise LenxError(f"{path}: 'seeds' must be a non-empty list of integers >= 0")
    for key, values in (("schemes", schemes), ("seeds", seeds)):
        twice = next((v for i, v in enumerate(values) if v in values[:i]), None)
        if twice is not None:
            raise LenxError(f"{path}: '{key}' lists {twice} twice; list each once")
    return schemes, seeds


def _eval_section(evals: dict, path: Path) -> tuple[dict, dict]:
    """The eval: section with the checks `lenx eval` gives its flags, each named eval.<key> of this file; and
    those names."""
    bad = set(evals) - EVAL_KEYS - {"protocol"}
    if bad:
        raise LenxError(f"{path}: unknown key 'eval.{sorted(bad)[0]}'{did_you_mean(sorted(bad)[0], EVAL_KEYS)}; known: {', '.join(sorted(EVAL_KEYS))}")
    names = {k: f"eval.{k}" for k in EVAL_KEYS}
    if "protocol" in evals:  # as the flag spells it (--protocol)
        if "protocols" in evals:
            raise LenxError(f"{path}: eval.protocol and eval.protocols are one setting; keep one")
        evals = {("protocols" if k == "protocol" else k): v for k, v in evals.items()}
        names["protocols"] = "eval.protocol"
    return check_eval_options(evals, names, f"{path}: "), names


@dataclass
class Job:
    kind: str  # "train" or "eval"
    pe: str
    seed: int
    run_dir: Path
    what: str
    seconds: float
    done: bool
    note: str = ""  # an assumption behind the estimate, printed once under the plan


def plan(spec: SweepSpec, device: str) -> list[Job]:
    """Every training run and evaluation cell of the sweep, whether it is done, and an estimated time."""
    from .data import DataSpec
    from .perplexity import cell_key as _key, cell_keys, check_settings, load_results
    from .probes.cell import cell_key as _probe_key, load_probes, probe_cells
    from .perf import eval_flops_per_token, matmul_peak, train_flops_per_token
    from .precision import choose, precision_dtype
    from .train import check_run_dir

    efficiency = _efficiency(spec, device)
    table = load_results(spec.results_dir) if spec.results_dir.exists() else None
    done_cells = {_key(r): r for r in table.to_dict("records")} if table is not None else {}
    done_probes = ({_probe_key(r) for r in load_probes(spec.results_dir).to_dict("records")}
                   if spec.results_dir.exists() else set())
    world = int(os.environ.get("WORLD_SIZE", "1"))  # under torchrun, the runs train with this many processes
    jobs = []
    for pe in spec.schemes:
        for seed in spec.seeds:
            cfg = resolve(None, pe=pe, seed=seed, **spec.train)
            run_dir = spec.runs_dir / f"{pe}-L{cfg.train_len}-s{seed}"
            vocab = vocab_size(cfg, run_dir)
            note = "" if vocab is not None else (
                f"tokenizer {cfg.tokenizer} is in no run directory and not in the local HF cache: estimates assume "
                f"a vocabulary of {ASSUMED_VOCAB:,} (GPT-2's)")
            vocab = vocab or ASSUMED_VOCAB
            # the peak of the precision the run trains in (as recorded, or as `auto` chooses here), as its MFU is
            # measured; a CPU of unknown features is estimated at fp32 until a run has measured it
            precision = _recorded_precision(run_dir) or choose(cfg.precision, device).precision
            peak = matmul_peak(device, precision_dtype(precision)) * efficiency
            fpt = train_flops_per_token(cfg.d_model, cfg.layers, cfg.d_ff, vocab, cfg.train_len)
            state = check_run_dir(run_dir, cfg, world, f"delete it or set another runs_dir in {spec.path}")
            start = _checkpoint_step(run_dir) if state == "resume" else 0
            what = f"{cfg.steps} steps" if not start else f"{cfg.steps - start} of {cfg.steps} steps (resumes at {start})"
            jobs.append(Job("train", pe, seed, run_dir, what,
                            (cfg.steps - start) * cfg.batch_size * cfg.grad_accum * cfg.train_len * fpt / peak, state == "done", note))
            ev = spec.eval
            lengths = run_lengths(cfg.train_len, ev)
            scalings = scaling_plan(pe, ev["rope_scaling"], ev["rope_factor"])
            dataset = DataSpec.of(cfg).dataset
            cost = eval_flops_per_token(cfg.d_model, cfg.layers, cfg.d_ff, vocab, max(lengths)) / peak  # s per token
            for cell in probe_cells(run_dir.name, cfg.train_len, lengths, scalings, ev["probe"] or [], ev, dataset,
                                    "short" if ev["passkey_format"] in (None, "auto") else ev["passkey_format"]):
                # a window of eval_len per trial; repeat scores each window twice (with and without the first copy)
                seconds = cell["trials"] * cell["eval_len"] * cost * (2 if cell["probe"] == "repeat" else 1)
                jobs.append(Job("eval", pe, seed, run_dir, _cell_name(cell), seconds, _probe_key(cell) in done_probes))
            for cell in cell_keys(run_dir, cfg.train_len, lengths, scalings, ev["protocols"], ev["stride"], ev["tokens"],
                                  ev["position_buckets"]) if ev["perplexity"] else []:
                cell["dataset"] = dataset
                L, tokens = cell["eval_len"], cell["token_budget"]
                seconds = tokens * eval_flops_per_token(cfg.d_model, cfg.layers, cfg.d_ff, vocab, L) / peak
                if cell["protocol"] == "sliding":  # each window of L tokens scores its last `stride`
                    seconds *= L / cell["stride"]
                done = done_cells.get(_key(cell))
                if done is not None:
                    check_settings(done, cell, f"set another results_dir in {spec.path}")
                jobs.append(Job("eval", pe, seed, run_dir, _cell_name(cell), seconds, done is not None))
    return jobs


# A transformers tokenizer that is neither saved in its run directory nor in the local HF cache (a dry run before
# anything was downloaded): estimates assume GPT-2's vocabulary, and the plan says so.
ASSUMED_VOCAB = 50257


def vocab_size(cfg, run_dir: Path) -> int | None:
    """The vocabulary a run's output layer has, for time estimates, read without the network: its run.json where
    it has trained, else `byte` (257), `bpe:N` (N), or a transformers tokenizer from a local directory or the HF
    cache. None where that tokenizer is not at hand."""
    from .data import ByteTokenizer, parse_bpe

    try:
        saved = json.loads((run_dir / "run.json").read_text()).get("tokenizer") or {}
        if saved.get("vocab_size"):
            return int(saved["vocab_size"])
    except (OSError, ValueError, AttributeError):
        pass
    if cfg.tokenizer == "byte":
        return ByteTokenizer.vocab_size
    size = parse_bpe(cfg.tokenizer)
    if size is not None:
        return size
    from .data import HFTokenizer

    try:
        return HFTokenizer.load(cfg.tokenizer, local_only=True).vocab_size
    except LenxError:
        return None


def _cell_name(cell: dict) -> str:
    if "probe" in cell:  # a retrieval probe's cell (`lenx.probes.cell`)
        at = f"depth {cell['depth']:g}" if cell["depth"] is not None else f"distance {cell['distance']}"
        extra = "" if cell["rope_scaling"] == "none" else f" {cell['rope_scaling']}"
        return f"{cell['probe']} @{cell['eval_len']} {at}{extra}"
    extra = "" if cell["protocol"] == "nonoverlap" else f" {cell['protocol']}/{cell['stride']}"
    extra += "" if cell["rope_scaling"] == "none" else f" {cell['rope_scaling']}"
    return f"@{cell['eval_len']}{extra}" + ("" if cell["rope_factor"] is None else f" x{cell['rope_factor']:g}")


def _efficiency(spec: SweepSpec, device: str) -> float:
    """Fraction of the matmul peak that training reached in this sweep's finished runs (else a guess)."""
    seen = []
    for run_json in spec.runs_dir.glob("*/run.json"):
        try:
            info = json.loads(run_json.read_text())
        except (OSError, ValueError):
            continue
        same_kind = str(info.get("device")).split(":")[0] == device.split(":")[0]  # cuda:0 is cuda
        if info.get("mfu") and same_kind and not info.get("mfu_warning"):  # a warned MFU is no measurement
            seen.append(info["mfu"])
    return sorted(seen)[len(seen) // 2] if seen else 0.5


def _recorded_precision(run_dir: Path) -> str | None:
    try:
        precision = json.loads((run_dir / "run.json").read_text()).get("precision")
    except (OSError, ValueError, AttributeError):
        return None
    return precision if precision in ("fp32", "bf16") else None


def _fmt_seconds(s: float) -> str:
    if 0 < s < 0.5:
        return "<1s"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _checkpoint_step(run_dir: Path) -> int:
    """The step an interrupted run resumes at (its latest.json), 0 if unreadable."""
    try:
        return int(json.loads((run_dir / "latest.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def print_plan(spec: SweepSpec, jobs: list[Job], device: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"sweep {spec.name}: {spec.path}")
    for col in ("run", "train", "eval cells", "estimated"):
        table.add_column(col)
    runs = dict.fromkeys(j.run_dir for j in jobs)
    for run in runs:
        mine = [j for j in jobs if j.run_dir == run]
        tr = next(j for j in mine if j.kind == "train")
        ev = [j for j in mine if j.kind == "eval"]
        todo = sum(j.seconds for j in mine if not j.done)
        table.add_row(run.name, "done" if tr.done else tr.what, f"{sum(not j.done for j in ev)} of {len(ev)} to do",
                      _fmt_seconds(todo))
    console = Console()
    console.print(table)
    total = sum(j.seconds for j in jobs if not j.done)
    console.print(f"to do: {sum(not j.done for j in jobs if j.kind == 'train')} training runs, "
                  f"{sum(not j.done for j in jobs if j.kind == 'eval')} evaluation cells; "
                  f"estimated {_fmt_seconds(total)} on {device}")
    for note in dict.fromkeys(j.note for j in jobs if j.note and not j.done):
        console.print(f"note: {note}")


def run_sweep(config: str | Path, dry_run: bool = False, device: str | None = None) -> Path | None:
    from .distributed import check_device
    from .runinfo import default_device

    # "cuda", not device_for's "cuda:0": under torchrun each rank's "cuda" is its own device
    spec = load_sweep(config)
    device = check_device(device) if device else default_device()
    jobs = plan(spec, device)
    if dry_run:
        print_plan(spec, jobs, device)
        return None

    from .evaluate import evaluate
    from .io import check_writable, write_text
    from .report import SAVED_CONFIG, SAVED_PUBLISHED, report
    from .train import train

    for key in ("runs_dir", "results_dir"):  # before any work: the run directories' error would name --out
        try:
            check_writable(getattr(spec, key))
        except OSError as e:
            raise LenxError(f"{spec.path}: cannot write to {key} {getattr(spec, key)}: {e.strerror}; set another "
                            f"{key}") from None
    write_text(spec.results_dir / SAVED_CONFIG, spec.path.read_text())  # `lenx report` on the results reads these
    if spec.published is not None:
        write_text(spec.results_dir / SAVED_PUBLISHED, spec.published.read_text())
    from . import distributed
    from .progress import progress

    ctx = distributed.init()  # under torchrun: each run trains data-parallel, eval cells split across ranks
    with progress(disable=not ctx.main) as bar:
        total = sum(j.seconds for j in jobs if not j.done) or 1
        overall = bar.add_task(f"sweep {spec.name}", total=total)
        for job in jobs:
            if job.kind == "train" and not job.done:
                train(resolve(None, pe=job.pe, seed=job.seed, **spec.train), out=job.run_dir, device=device, bar=bar)
                bar.advance(overall, job.seconds)
        runs = list(dict.fromkeys(j.run_dir for j in jobs))
        seconds = {(j.run_dir.name, j.what): j.seconds for j in jobs if j.kind == "eval"}
        evaluate(runs, **eval_kwargs(spec.eval), out=spec.results_dir, device=device, bar=bar,
                 on_cell=lambda cell: bar.advance(overall, seconds.get((cell["run"], _cell_name(cell)), 0.0)))
        bar.update(overall, completed=total)  # done, whatever the estimates (and at 100% when nothing was left to do)
    return report(spec.results_dir, config=spec, echo=True) if ctx.main else None
