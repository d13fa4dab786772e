"""`lenx report`: Markdown, self-contained HTML, figures and an lm-eval-style JSON from a results directory.

Tables give the geometric mean over seeds (the exp of the mean log-perplexity, i.e. of the seeds' mean loss) with
a 95% confidence interval from Student's t on log-perplexity (so it is never negative), perplexity relative to 1x,
and, where the sweep config names published numbers, the paper's figures side by side. The numbers come from
`stats`, the figures from `plots`, the text from `render`, the JSON from `lmeval`; this module reads the results
and writes the files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from . import render
from .errors import LenxError
from .io import write_json, write_text
from .lmeval import lm_eval_json
from .plots import (plot_context_gain, plot_loss_by_position, plot_passkey, plot_ppl_vs_length, plot_repeat_gain,
                    plot_retrieval_vs_length, plot_training_curves)
from .render import Section
from .schema import ID_COLUMNS, check_numeric
from .store import sync
from .stats import ProbeTables, labels_together, summarise

# Columns a results table from an older lenx (or another tool) may lack, and what they mean when absent.
_OPTIONAL = {"run_dir": None, "lenx_version": "unknown", "device": "unknown", "dataset_fingerprint": "unknown",
             "stride": float("nan"), "tokenizer": "byte", "note": "", "bpb": float("nan"), "config_id": ""}

# Columns every lenx results table has had, and the report needs.
REQUIRED = ["run", "pe", "seed", "train_len", "eval_len", "protocol", "rope_scaling", "rope_factor", "dataset", "ppl"]


def read_results(results_dir: Path, probes: bool = False) -> pd.DataFrame | None:
    """The results table; with `probes` (a probes table is there), None where there is none."""
    sync(results_dir)  # an evaluation killed between two rebuilds of the tables left them behind its store
    for name in ("results.parquet", "results.csv"):
        path = results_dir / name
        if path.exists():
            try:
                df = (pd.read_parquet(path) if name.endswith("parquet")
                      else pd.read_csv(path, dtype={c: str for c in ID_COLUMNS}))
            except Exception:
                raise LenxError(f"{path} is unreadable; rerun `lenx eval` to rebuild it") from None
            if df.empty:
                break
            missing = [c for c in REQUIRED if c not in df]
            if missing:
                raise LenxError(f"{path} is not a lenx results table (no column {missing[0]}); name the directory "
                                "`lenx eval --out` wrote")
            check_numeric(df, path, "move it away and rerun `lenx eval`")
            return df.assign(**{k: v for k, v in _OPTIONAL.items() if k not in df})
    if probes:
        return None
    raise LenxError(f"no results in {results_dir}/; run `lenx eval` first")


# Columns of the probes table (`lenx.probes.cell`) the report needs, and the optional ones with their meaning absent.
PROBE_REQUIRED = ["run", "pe", "seed", "train_len", "eval_len", "probe", "trials", "answers", "accuracy"]
_PROBE_OPTIONAL = {**_OPTIONAL, "rope_scaling": "none", "rope_factor": float("nan"), "dataset": "unknown",
                   "depth": float("nan"), "distance": float("nan"), "exact_match": float("nan"),
                   "key_nll": float("nan"), "gain": float("nan"), "gain_low": float("nan"), "gain_high": float("nan"),
                   "pairs": float("nan")}


def read_probes(results_dir: Path) -> pd.DataFrame | None:
    """The probes table (`lenx eval --probe`), or None where there is none (or it is empty)."""
    sync(results_dir)
    for name in ("probes.parquet", "probes.csv"):
        path = results_dir / name
        if path.exists():
            try:
                df = (pd.read_parquet(path) if name.endswith("parquet")
                      else pd.read_csv(path, dtype={c: str for c in ID_COLUMNS}))
            except Exception:
                raise LenxError(f"{path} is unreadable; rerun `lenx eval --probe` to rebuild it") from None
            if df.empty:
                return None
            missing = [c for c in PROBE_REQUIRED if c not in df]
            if missing:
                raise LenxError(f"{path} is not a lenx probes table (no column {missing[0]}); move it away or "
                                "rerun `lenx eval --probe`")
            check_numeric(df, path, "move it away and rerun `lenx eval --probe`")
            for col in ("accuracy", "exact_match"):  # shares: a value outside [0, 1] is not lenx's
                bad = df[col][(df[col] < 0) | (df[col] > 1)] if col in df else []
                if len(bad):
                    raise LenxError(f"{path}: column {col} holds {bad.iloc[0]:g}, not a share in [0, 1]; move it "
                                    "away and rerun `lenx eval --probe`")
            return df.assign(**{k: v for k, v in _PROBE_OPTIONAL.items() if k not in df})
    return None


def read_by_position(results_dir: Path) -> pd.DataFrame | None:
    sync(results_dir)
    path = results_dir / "results_by_position.parquet"
    if not path.exists():
        return None
    try:
        df = pd.read_parquet(path)
    except Exception:
        raise LenxError(f"{path} is unreadable; rerun `lenx eval` to rebuild it") from None
    return None if df.empty else df


SAVED_CONFIG, SAVED_PUBLISHED = "sweep_config.yaml", "published.csv"  # what `lenx sweep` copies beside its results


@dataclass
class SavedSweep:
    path: Path
    name: str
    published: Path | None
    raw: dict


def saved_sweep(results_dir: Path) -> SavedSweep | None:
    """The sweep config that `lenx sweep` copied beside its results, for the title, the published numbers and
    the provenance. Read, not checked again: the sweep checked it, and checking builds every scheme (torch).
    Its published table is the copy beside it, since the config's own path was relative to where it was."""
    from .config import read_yaml

    path = results_dir / SAVED_CONFIG
    if not path.exists():
        return None
    raw = read_yaml(path)
    published = None
    if raw.get("published") is not None:
        published = results_dir / SAVED_PUBLISHED
        if not published.exists():
            raise LenxError(f"{path} names published numbers, but their copy {published} is missing; rerun "
                            f"`lenx sweep`, or copy the file named by 'published:' there")
    return SavedSweep(path, str(raw.get("name", results_dir.name)), published, raw)


def provenance(df: pd.DataFrame) -> dict:
    """Versions, devices, data and the first run's recorded environment, from the rows of `df` (results, or
    probes where there are no results)."""
    info = {}
    for run_dir in df["run_dir"].dropna().unique():
        path = Path(run_dir) / "run.json"
        if path.exists():
            try:
                info = json.loads(path.read_text())
                break
            except ValueError:
                continue
    return {
        "lenx_version": sorted(df["lenx_version"].astype(str).unique()),
        "torch_version": info.get("torch_version"),
        "git_commit": info.get("git_commit"),
        "device": sorted(df["device"].astype(str).unique()),
        "device_name": info.get("device_name"),
        "dataset": sorted(df["dataset"].astype(str).unique()),
        "dataset_fingerprint": sorted(df["dataset_fingerprint"].astype(str).unique()),
        **({"protocol": sorted(df["protocol"].astype(str).unique())} if "protocol" in df else {}),
        "runs": int(df["run"].nunique()),
        "training_config": info.get("config"),
    }


def locate_runs(run_dirs: pd.Series, results_dir: Path) -> pd.Series:
    """Run directories as the report can open them. `lenx eval` stores them as it was given them, often relative
    to where it ran (runs/alibi); a relative one not found from here is looked for beside the results directory
    and above it (a report of /proj/results run from elsewhere finds /proj/runs/alibi). Unfound: kept as stored."""
    bases = [results_dir.resolve().parent, *results_dir.resolve().parent.parents][:3]

    def find(stored):
        if not isinstance(stored, str) or not stored or Path(stored).is_absolute() or Path(stored).exists():
            return stored
        return next((str(b / stored) for b in bases if (b / stored / "run.json").exists()), stored)

    found = {d: find(d) for d in run_dirs.dropna().unique()}
    return run_dirs.map(lambda d: found.get(d, d))


def report(results_dir: str | Path = "results", out: str | Path | None = None, config=None, echo: bool = False) -> Path:
    """Write the report of the results in `results_dir` into `out`; `echo`: also print its summary on the terminal."""
    results_dir = Path(results_dir)
    out = Path(out) if out else results_dir
    probes = read_probes(results_dir)
    df = read_results(results_dir, probes=probes is not None)
    if df is not None:  # for their logs and run.json only: writes nothing
        df = df.assign(run_dir=locate_runs(df["run_dir"], results_dir))
    if probes is not None:
        probes = probes.assign(run_dir=locate_runs(probes["run_dir"], results_dir))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LenxError(f"cannot create {out}: {e.strerror}; choose another --out") from None
    if config is None:
        config = saved_sweep(results_dir)
    results_labels, probe_labels = labels_together(df, probes)  # one scheme, one name in both tables
    summary = summarise(df, scheme=results_labels) if df is not None else None
    probe_tables = ProbeTables.of(probes, scheme=probe_labels) if probes is not None else None
    figures = draw_figures(summary, df, results_dir, out, probe_tables, probes)
    found = render.headline(summary, probe_tables)
    if found is not None and echo:
        render.print_headline(found)
    prov = provenance(df if df is not None else probes)
    sections = report_sections(summary, df if df is not None else probes, found, figures, config, prov, results_dir,
                               probe_tables)
    title = f"lenx report{': ' + config.name if config is not None else ''}"
    write_text(out / "report.md", render.render_markdown(title, sections))
    write_text(out / "report.html", render.render_html(title, sections, out))
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H-%M-%S")
    write_json(out / f"results_{stamp}.json", lm_eval_json(summary, prov, config, probe_tables))
    return out / "report.md"


def draw_figures(summary: pd.DataFrame | None, df: pd.DataFrame | None, results_dir: Path, out: Path,
                 probe_tables: ProbeTables | None = None, probes: pd.DataFrame | None = None) -> set[str]:
    """The figures into `out`: perplexity vs length where there are perplexity results; loss by position and
    training loss where their data is at hand; the probes' where there are probes. The names of those drawn."""
    drawn = set()
    if probe_tables is not None:
        drawn |= {name for name, drew in (
            ("passkey.png", plot_passkey(probe_tables.cells, out / "passkey.png")),
            ("retrieval_vs_length.png", plot_retrieval_vs_length(probe_tables.pooled, out / "retrieval_vs_length.png",
                                                                 probes)),
            ("repeat_gain.png", plot_repeat_gain(probe_tables.cells, out / "repeat_gain.png"))) if drew}
    if summary is None:
        if plot_training_curves(probes, out / "training_loss.png"):
            drawn.add("training_loss.png")
        return drawn
    plot_ppl_vs_length(summary, out / "ppl_vs_length.png")
    drawn.add("ppl_vs_length.png")
    by_position = read_by_position(results_dir)
    if by_position is not None:
        plot_loss_by_position(by_position, out / "loss_by_position.png")
        drawn.add("loss_by_position.png")
        if plot_context_gain(by_position, out / "context_gain.png"):
            drawn.add("context_gain.png")
    if plot_training_curves(df, out / "training_loss.png"):
        drawn.add("training_loss.png")
    return drawn


def report_sections(summary, df, found, figures, config, prov, results_dir, probes=None) -> list[Section]:
    """The report's sections in their order: the answer, each protocol's tables, the training variants, the
    figures, the retrieval probes, the published numbers, the notes and the provenance. `summary` None: probes
    only (their tables and figures, the training curves, the provenance)."""
    sections = [Section("Summary", found.text, found.markdown())] if found is not None else []
    if summary is None:
        return (sections + render.probe_sections(probes, figures) + render.variants_section(df)
                + render.figure_sections(figures, perplexity=False)
                + [render.provenance_section(prov, df, config, results_dir)])
    names = render.column_names(summary)
    for protocol, part in summary.groupby("protocol", sort=False):
        sections += render.perplexity_sections(part, protocol, df, names)
    sections += render.variants_section(df) + render.figure_sections(figures)
    if probes is not None:
        sections += render.probe_sections(probes, figures)
    if config is not None and config.published is not None:
        sections.append(Section("Published numbers", table=render.published_table(summary, config.published, df)))
    return sections + render.notes_section(summary, df) + [render.provenance_section(prov, df, config, results_dir)]
