"""`lenx report`: Markdown, self-contained HTML, figures and an lm-eval-style JSON from a results directory.

Tables give the geometric mean over seeds (the exp of the mean log-perplexity, i.e. of the seeds' mean loss) with
a 95% confidence interval from Student's t on log-perplexity (so it is never negative), perplexity relative to 1x,
and, where the sweep config names published numbers, the paper's figures side by side. Only seeds of one
experiment are pooled: runs of a scheme trained differently (training length, `config_id`) get rows of their own.
"""

from __future__ import annotations

import base64
import html
import json
import math
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from .errors import LenxError
from .io import write_json, write_text
from .schema import ID_COLUMNS, check_numeric
from .plots import apart, base_scheme, finish, new_figure, readable_log_y, styles

# Two-sided 95% Student t quantiles t_{0.975, df}, df = 1..30 (standard tables); normal beyond.
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t975(df: int) -> float:
    return _T975[df - 1] if 1 <= df <= len(_T975) else 1.960


# Columns a results table from an older lenx (or another tool) may lack, and what they mean when absent.
_OPTIONAL = {"run_dir": None, "lenx_version": "unknown", "device": "unknown", "dataset_fingerprint": "unknown",
             "stride": float("nan"), "tokenizer": "byte", "note": "", "bpb": float("nan"), "config_id": ""}

# Columns every lenx results table has had, and the report needs.
REQUIRED = ["run", "pe", "seed", "train_len", "eval_len", "protocol", "rope_scaling", "rope_factor", "dataset", "ppl"]


def read_results(results_dir: Path) -> pd.DataFrame:
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
    raise LenxError(f"no results in {results_dir}/; run `lenx eval` first")


def _text(column: pd.Series, missing: str) -> pd.Series:
    """A text column as str, `missing` where empty. A column with no value at all reads back from CSV as float,
    and pandas is deprecating fillna with a string on a float column."""
    return column.astype(object).where(column.notna(), missing).astype(str)


def tokenizers(df: pd.DataFrame) -> list[str]:
    return sorted(_text(df["tokenizer"], "byte").unique()) if "tokenizer" in df else ["byte"]


def label(df: pd.DataFrame) -> pd.Series:
    """Scheme label: the scheme, plus the RoPE extension when one was used at evaluation, plus the
    tokenizer when the results mix tokenizers, plus ' on <dataset>' when they mix evaluation datasets (`lenx eval
    --dataset / --test-file`; 'files#<fingerprint>' where one name covers several texts), plus `variant` where
    runs of one label were trained differently.
    Rows that share a label are seeds of one experiment."""
    scaling = _text(df["rope_scaling"], "none")
    lab = df["pe"].where(scaling == "none", df["pe"] + "+" + scaling) + factor_tag(df, scaling)
    if len(tokenizers(df)) > 1:
        lab = lab + " [" + _text(df["tokenizer"], "byte") + "]"
    if "dataset" in df:
        text = df["dataset"].astype(str)
        # one name, several texts (`--test-file` of other files: all 'files'): each named by its fingerprint too
        fingerprint = df["dataset_fingerprint"] if "dataset_fingerprint" in df else pd.Series(None, index=df.index)
        several = (fingerprint.groupby(text).transform("nunique") > 1) & fingerprint.notna()
        text = text.where(~several, text + "#" + fingerprint.astype(str).str[:6])
        if text.nunique() > 1:
            lab = lab + " on " + text
    return lab + variant(df, lab)


def factor_tag(df: pd.DataFrame, scaling: pd.Series) -> pd.Series:
    """'×4' where a RoPE extension was evaluated with a factor given by the user (`--rope-factor`), so that factors
    are not pooled as seeds; '' for the default factor (eval_len / train_len at each length; none for dynamic-ntk).
    A factor counts as given when it is not the length's default, or when one run and extension used it at
    several lengths (a given factor equal to one length's default stays on its own curve there)."""
    factor = df["rope_factor"].astype(float) if "rope_factor" in df else pd.Series(float("nan"), index=df.index)
    default = (df["eval_len"] / df["train_len"]).clip(lower=1.0)
    run = df["run"].astype(str) if "run" in df else df["pe"].astype(str)
    lengths = df["eval_len"].groupby([run, scaling, factor.fillna(-1.0)]).transform("nunique")
    given = factor.notna() & (scaling != "none") & (((factor - default).abs() > 1e-9 * default) | (lengths > 1))
    return factor.map(lambda f: "" if pd.isna(f) else f"×{f:g}").where(given, "")


def variant(df: pd.DataFrame, lab: pd.Series) -> pd.Series:
    """' (L16)', ' (L32, 3f9a2c)': where rows of one label come from runs trained differently, the training length
    where that differs and the training config's fingerprint (`config_id`: all but the seed) where that does;
    '' elsewhere."""
    config = df["config_id"] if "config_id" in df else pd.Series("", index=df.index)
    config = config.astype(object).fillna("").astype(str)
    lens = df["train_len"].groupby(lab).transform("nunique") > 1
    configs = config.groupby([lab, df["train_len"]]).transform("nunique") > 1
    tag = ("L" + df["train_len"].astype("Int64").astype(str)).where(lens, "") + ", " + config.where(configs, "")
    tag = tag.str.strip(", ")
    return tag.where(tag == "", " (" + tag + ")")


PROTOCOL_ORDER = ("nonoverlap", "sliding", "truncate")


def protocol_label(df: pd.DataFrame) -> pd.Series:
    """'nonoverlap', 'sliding (stride 64)' / 'sliding (stride L/2)', 'truncate'."""
    protocol = _text(df["protocol"], "nonoverlap")
    stride = df["stride"] if "stride" in df else pd.Series(float("nan"), index=df.index)
    half = stride == df["eval_len"] // 2
    text = protocol.where(protocol != "sliding", "sliding (stride " + stride.astype("Int64").astype(str) + ")")
    return text.where(~((protocol == "sliding") & half.groupby(protocol).transform("all")), "sliding (stride L/2)")


def protocols(df: pd.DataFrame) -> list[str]:
    found = list(dict.fromkeys(protocol_label(df)))
    return sorted(found, key=lambda p: (next((i for i, o in enumerate(PROTOCOL_ORDER) if p.startswith(o)), 9), p))


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (protocol, scheme, eval_len), over seeds: ppl's geometric mean, its 95% confidence interval
    (ppl_low, ppl_high: Student t on log ppl) and standard error (delta method), the seed count, and bpb's mean.

    Seeds differ in perplexity by factors (one run that breaks at 16x can be ten times another): on log ppl the
    interval is symmetric and stays positive, where an interval on ppl itself can reach below zero with few seeds."""
    df = df.assign(scheme=label(df), protocol_label=protocol_label(df))
    rows, logs = [], {}  # logs: each cell's log ppl by seed, for the paired ratio to 1x
    every = df.groupby(["protocol_label", "scheme"], sort=False)["seed"].unique()  # a scheme's seeds, any length
    for (protocol, scheme, L), g in df.groupby(["protocol_label", "scheme", "eval_len"], sort=False):
        ppl = g.groupby("seed", dropna=False)["ppl"].mean().dropna()  # a seed evaluated twice counts once
        seeds = every[(protocol, scheme)]
        lacking = [s for s in seeds if pd.notna(s) and s not in set(ppl.index)]  # no row here, or an empty ppl
        partial = [f"mean over {len(ppl)} of {len(seeds)} seeds (no perplexity from seed "
                   + ", ".join(f"{s:g}" for s in lacking) + ")"] if len(ppl) and lacking else []
        n, log = len(ppl), ppl.map(math.log)
        logs[(protocol, scheme, int(L))] = log
        mean = math.exp(log.mean()) if n > 1 else ppl.iloc[0] if n else float("nan")
        se = log.std(ddof=1) / math.sqrt(n) if n > 1 else float("nan")  # of log ppl
        rows.append({
            "protocol": protocol, "scheme": scheme, "eval_len": int(L), "train_len": int(g["train_len"].iloc[0]), "seeds": n,
            "evaluated_seeds": len(seeds),  # the scheme's, with or without a perplexity here
            "ppl": mean,
            "ppl_low": mean * math.exp(-t975(n - 1) * se) if n > 1 else float("nan"),
            "ppl_high": mean * math.exp(t975(n - 1) * se) if n > 1 else float("nan"),
            "ppl_stderr": mean * se,
            "bpb": g["bpb"].dropna().mean() if g["bpb"].notna().any() else float("nan"),
            "note": "; ".join(sorted(set(_text(g["note"], "")) - {""}) + partial),
        })
    out = pd.DataFrame(rows)
    rel = [_rel_1x(logs[(r.protocol, r.scheme, r.eval_len)], logs.get((r.protocol, r.scheme, r.train_len)))
           for r in out.itertuples()]
    out[["rel_1x", "rel_1x_low", "rel_1x_high", "rel_1x_stderr"]] = pd.DataFrame(rel, index=out.index, dtype=float)
    order = _scheme_order(out["scheme"].unique())
    proto_order = {p: i for i, p in enumerate(protocols(df))}
    return out.sort_values(["protocol", "scheme", "eval_len"],
                           key=lambda c: c.map(order) if c.name == "scheme" else c.map(proto_order)
                           if c.name == "protocol" else c)


def _rel_1x(log: pd.Series, base: pd.Series | None) -> tuple[float, float, float, float]:
    """Perplexity relative to 1x over the seeds that have both (log ppl by seed): the geometric mean of each seed's
    ratio, which is the ratio of the two geometric means when every seed has both; with two or more such seeds its
    95% interval (Student t on the seeds' log ratios: paired, so what the seeds share cancels) and standard error
    (delta method). (ratio, low, high, stderr), NaN where not defined."""
    nan = float("nan")
    common = log.index.intersection(base.index) if base is not None else []
    if not len(common):
        return nan, nan, nan, nan
    diff = log[common] - base[common]
    ratio, n = math.exp(diff.mean()), len(diff)
    if n < 2:
        return ratio, nan, nan, nan
    se = diff.std(ddof=1) / math.sqrt(n)
    return ratio, ratio * math.exp(-t975(n - 1) * se), ratio * math.exp(t975(n - 1) * se), ratio * se


def rel_cell(r) -> str:
    return _fmt(r.rel_1x) + ("" if pd.isna(r.rel_1x_low) else f" [{_fmt(r.rel_1x_low)}–{_fmt(r.rel_1x_high)}]")


KEPT = 1.10  # "keeps working": perplexity at the longest length within 10% of the scheme's own at 1x


@dataclass
class Headline:
    """The report's answer for one protocol: a paragraph and a ranking table (header, rows of cells)."""
    text: str
    columns: list[str]
    rows: list[list[str]]

    def markdown(self) -> str:
        return "\n".join(["| " + " | ".join(self.columns) + " |", "|---" * len(self.columns) + "|",
                          *("| " + " | ".join(row) + " |" for row in self.rows)])


def answer(part: pd.DataFrame, protocol: str, seeds: str) -> Headline | None:
    """The report's headline for one protocol: at the longest multiple of the training length evaluated, every
    scheme ranked by its perplexity relative to its own at 1x, with the perplexities at both; which schemes stayed
    within `KEPT` of 1x, which was lowest there, and which have no perplexity there. None when no scheme has both
    numbers."""
    multiple = part["eval_len"] / part["train_len"]
    M = multiple[part["ppl"].notna()].max()  # NaN where no cell has a perplexity
    if not M > 1:
        return None
    at = part[(multiple - M).abs() < 1e-9].set_index("scheme")
    base = part[multiple == 1].set_index("scheme")["ppl"]
    ranked = at[at["rel_1x"].notna()].sort_values(["rel_1x", "ppl"])
    if ranked.empty:
        return None
    lens = sorted(at["eval_len"].unique())
    where = (f"{M:g}× the training length ({lens[0]:,} tokens)" if len(lens) == 1
             else f"{M:g}× each run's training length")
    rows = [[str(i), scheme, _fmt(base.get(scheme)), ppl_cell(r), rel_cell(r)]
            for i, (scheme, r) in enumerate(ranked.iterrows(), 1)]
    kept = [s for s, r in ranked.iterrows() if r.rel_1x <= KEPT]
    best = ranked["ppl"].idxmin()
    text = [f"At {where}, {protocol}, over {seeds}: every scheme's perplexity there divided by its own at 1× "
            "(1.00: the longer context costs nothing; below 1: it helps), best first"
            + (", with 95% intervals over seeds [low–high]." if ranked["rel_1x_low"].notna().any() else
               ". One seed: no intervals, and differences of a few percent may be seed-to-seed variation; "
               "train more seeds (`seeds:` in a sweep config) before reading them.")]
    text.append(f"Within {KEPT - 1:.0%} of their 1× perplexity at {M:g}×: " + (", ".join(kept) if kept else "none")
                + f". Lowest perplexity at {M:g}×: {best} ({_fmt(ranked.loc[best, 'ppl'])}).")
    lacking = [s for s in dict.fromkeys(part["scheme"]) if s not in ranked.index]
    if lacking:
        why = {s: at.loc[s, "note"] if s in at.index and at.loc[s, "note"] else
               "no 1× perplexity to divide by" if s in at.index and pd.notna(at.loc[s, "ppl"]) else
               f"not evaluated at {M:g}×" for s in lacking}
        text.append("Not ranked: " + "; ".join(f"{s} ({why[s]})" for s in lacking) + ".")
    return Headline(" ".join(text), ["rank", "scheme", "ppl at 1×", f"ppl at {M:g}×", f"{M:g}× ÷ 1×"], rows)


def headline(summary: pd.DataFrame) -> Headline | None:
    """The answer for the first protocol (nonoverlap, where it was evaluated: protocols sort it first)."""
    part = summary[summary["protocol"] == summary["protocol"].iloc[0]]
    return answer(part, part["protocol"].iloc[0], seeds_text(part))


def print_headline(found: Headline) -> None:
    """The report's answer on the terminal, as a rich table."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    # Text, not markup: "[low–high]" and a scheme's "[bpe:512]" are ours to show, not rich tags
    table = Table(title="Summary", caption=Text(found.text), caption_justify="left")
    for i, name in enumerate(found.columns):
        table.add_column(name, justify="left" if i == 1 else "right")
    for row in found.rows:
        table.add_row(*map(Text, row))
    Console().print(table)


def seeds_text(part: pd.DataFrame) -> str:
    """'3 seed(s)', or each scheme's count where they differ: the seeds evaluated, also where none has a perplexity
    (learned positions evaluated past their table only)."""
    per_scheme = part.groupby("scheme", sort=False)["evaluated_seeds"].max()
    if per_scheme.nunique() == 1:
        return f"{per_scheme.iloc[0]} seed(s)"
    return "each scheme's seeds (" + ", ".join(f"{s}: {n}" for s, n in per_scheme.items()) + ")"


def tokens_text(rows: pd.DataFrame) -> str:
    """How many scored tokens each perplexity is over (rows of one protocol): one count, or the range."""
    tokens = pd.to_numeric(rows["tokens"], errors="coerce").dropna() if "tokens" in rows else pd.Series(dtype=float)
    tokens = tokens[tokens > 0]
    if tokens.empty:
        return ""
    low, high = int(tokens.min()), int(tokens.max())
    return f" Each cell scores {low:,} tokens per seed." if low == high else \
        f" Each cell scores {low:,}–{high:,} tokens per seed (the `tokens` column has each cell's count)."


def _scheme_order(schemes) -> dict:
    from .positional import SCHEMES

    names = list(SCHEMES)
    base = {s: base_scheme(s) for s in schemes}
    return {s: (names.index(base[s]) if base[s] in names else len(names), s) for s in schemes}


def _fmt(x, digits=2) -> str:
    """A table's number: fixed decimals, or three significant digits far from that range (a diverged model's
    perplexity of 1e19 would take twenty digits; an interval bound of 1e-5 would read '0.00', a zero that a
    perplexity never reaches)."""
    if pd.isna(x):
        return "—"
    return f"{x:.{digits}f}" if x == 0 or 0.01 <= abs(x) < 1e6 else f"{x:.3g}"


def wide(summary: pd.DataFrame, cell) -> pd.DataFrame:
    """scheme x eval_len table of strings (one protocol), `cell(row)` per entry."""
    schemes = list(dict.fromkeys(summary["scheme"]))
    lengths = sorted(summary["eval_len"].unique())
    table = pd.DataFrame("", index=schemes, columns=lengths)
    for r in summary.itertuples():
        table.loc[r.scheme, r.eval_len] = cell(r)
    return table


def ppl_cell(r) -> str:
    return _fmt(r.ppl) + ("" if pd.isna(r.ppl_low) else f" [{_fmt(r.ppl_low)}–{_fmt(r.ppl_high)}]")


def column_names(summary: pd.DataFrame) -> dict:
    train_lens = summary["train_len"].unique()
    if len(train_lens) != 1:
        return {L: str(L) for L in summary["eval_len"].unique()}
    return {L: length_label(L, train_lens[0]) for L in summary["eval_len"].unique()}


def length_label(L: int, train_len: int) -> str:
    """'1012 (1.98×)': an evaluation length and its multiple of the training length, to three digits."""
    return f"{L} ({L / train_len:.3g}×)"


def to_markdown(table: pd.DataFrame, names: dict) -> str:
    cols = list(table.columns)
    lines = ["| scheme | " + " | ".join(names.get(c, str(c)) for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {idx} | " + " | ".join(str(v) for v in row) + " |" for idx, row in table.iterrows()]
    return "\n".join(lines)


# ---------------------------------------------------------------- figures


_DASHES = ["-", "--", ":", "-."]


def plot_ppl_vs_length(summary: pd.DataFrame, path: Path) -> None:
    fig, ax = new_figure()
    order = list(dict.fromkeys(summary["protocol"]))
    per_scheme = styles(dict.fromkeys(summary["scheme"]))
    # several protocols: each its dashes, in place of a variant's own, and the lines drawn apart again
    looks = apart({(p, s): per_scheme[s] if len(order) == 1 else
                   {**per_scheme[s], "linestyle": _DASHES[order.index(p) % len(_DASHES)]}
                   for p, s in dict.fromkeys(zip(summary["protocol"], summary["scheme"]))})
    for (protocol, scheme), g in summary.groupby(["protocol", "scheme"], sort=False):
        g = g.dropna(subset=["ppl"])
        if g.empty:
            continue
        st = looks[(protocol, scheme)]
        name = scheme if len(order) == 1 else f"{scheme}, {protocol}"
        ax.plot(g["eval_len"], g["ppl"], label=name, linewidth=2, markersize=6, **st)
        if g["ppl_low"].notna().any():
            low, high = g["ppl_low"].fillna(g["ppl"]), g["ppl_high"].fillna(g["ppl"])
            if len(g) > 1:
                ax.fill_between(g["eval_len"], low, high, color=st["color"], alpha=0.2, linewidth=0)
            else:  # one length (learned positions past their table elsewhere): a band with no width; a bar
                ax.vlines(g["eval_len"], low, high, color=st["color"], alpha=0.3, linewidth=8)
    _mark_train_len(ax, summary["train_len"].unique())
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    if summary["ppl"].notna().any():
        ax.set_ylim(*ppl_ylim(summary))
    readable_log_y(ax)
    ax.set_xlabel("evaluation length (tokens, log2 scale)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title("Perplexity vs evaluation length" + (" (geometric mean over seeds, 95% CI band)"
                                                      if summary["ppl_low"].notna().any() else ""))
    ax.set_xticks(sorted(summary["eval_len"].unique()))
    ax.get_xaxis().set_major_formatter(lambda x, _: f"{int(x):,}")
    ax.minorticks_off()
    finish(fig, ax, path, legend_title="scheme")


def ppl_ylim(summary: pd.DataFrame) -> tuple[float, float]:
    """The y range of ppl_vs_length: lines and bands, but a band reaches at most 3x past the lines (a few seeds'
    interval can span decades; it then runs off the edge rather than squash the lines)."""
    means = summary["ppl"].dropna()
    low = pd.concat([means, summary["ppl_low"].dropna()]).min()
    high = pd.concat([means, summary["ppl_high"].dropna()]).max()
    return max(low, means.min() / 3) / 1.08, min(high, means.max() * 3) * 1.08


def _mark_train_len(ax, train_lens) -> None:
    """A dotted line at each training length, labelled; several labels stacked downwards so they never overlap."""
    for k, L in enumerate(sorted(int(x) for x in train_lens)):
        ax.axvline(L, color="black", linestyle=":", linewidth=1)
        ax.annotate(f"train length {L}", (L, 1), xycoords=("data", "axes fraction"), xytext=(4, -14 - 13 * k),
                    textcoords="offset points", fontsize=9,
                    bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.8})


def plot_training_curves(df: pd.DataFrame, path: Path) -> bool:
    """Training loss vs step, mean over seeds per scheme (and training variant). False when no run's log is at hand."""
    df = df.assign(curve=df["pe"] + variant(df, df["pe"]))
    logs = []
    for run_dir, g in df.groupby("run_dir"):
        log = Path(run_dir) / "train_log.csv"
        if log.exists():
            try:
                logs.append(pd.read_csv(log)[["step", "loss"]].assign(pe=g["curve"].iloc[0], run=run_dir))
            except Exception as e:  # edited or truncated by hand: the figure goes on without it
                print(f"note: {log} is unreadable ({type(e).__name__}); its run has no training curve", file=sys.stderr)
    if not logs:
        return False
    logs = pd.concat(logs)
    fig, ax = new_figure()
    order = _scheme_order(logs["pe"].unique())
    looks = styles(sorted(logs["pe"].unique(), key=order.get))
    for pe, g in sorted(logs.groupby("pe", sort=False), key=lambda item: order[item[0]]):
        curve = g.groupby("step")["loss"].mean().rolling(5, min_periods=1).mean()
        # markers too: a training variant's dashes come from a hash of its tag, and two variants can share them
        ax.plot(curve.index, curve.values, label=pe, linewidth=1.8, markersize=5,
                markevery=max(1, len(curve) // 12), **looks[pe])  # at most about a dozen markers a line
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers, also on short runs
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss (nats/token, 5-point moving mean)")
    ax.set_title("Training loss")
    finish(fig, ax, path, legend_title="scheme")
    return True


def read_by_position(results_dir: Path) -> pd.DataFrame | None:
    path = results_dir / "results_by_position.parquet"
    if not path.exists():
        return None
    try:
        df = pd.read_parquet(path)
    except Exception:
        raise LenxError(f"{path} is unreadable; rerun `lenx eval` to rebuild it") from None
    return None if df.empty else df


def plot_loss_by_position(pos: pd.DataFrame, path: Path) -> None:
    """Mean NLL by position in the window, at each run's longest evaluation length: one panel per protocol,
    one line per scheme (token-weighted over seeds), the training length marked."""
    pos = pos.assign(_protocol=protocol_label(pos), scheme=label(pos))
    longest = pos.groupby("run")["eval_len"].transform("max")
    pos = pos[pos["eval_len"] == longest]
    order = protocols(pos)
    fig, axes = new_figure(width=6.0 * len(order) + 2, height=4.8, ncols=len(order), sharey=True)
    axes = axes if len(order) > 1 else [axes]
    rank = _scheme_order(pos["scheme"].unique())
    schemes = sorted(pos["scheme"].unique(), key=rank.get)  # the legend order of the other figures
    looks = styles(schemes)
    for ax, protocol in zip(axes, order):
        part = pos[pos["_protocol"] == protocol].assign(weighted=lambda d: d["nll"] * d["tokens"])
        agg = part.groupby(["scheme", "bucket_start", "bucket_end"], as_index=False)[["weighted", "tokens"]].sum()
        for scheme in [s for s in schemes if s in set(agg["scheme"])]:
            a = agg[agg["scheme"] == scheme].sort_values("bucket_start")
            centre = (a["bucket_start"] + a["bucket_end"]) / 2
            ax.plot(centre, a["weighted"] / a["tokens"], label=scheme, linewidth=2, markersize=5,
                    markevery=max(1, len(a) // 12), **looks[scheme])  # at most about a dozen markers a line
        _mark_train_len(ax, part["train_len"].unique())
        lens = sorted(part["eval_len"].unique())
        ax.set_xscale("log", base=2)
        ax.set_xlabel("position in the window (tokens, bucket centres, log2 scale)")
        ax.set_title(f"{protocol}, window {', '.join(f'{n:,}' for n in lens)}", fontsize=11)
        ax.get_xaxis().set_major_formatter(lambda x, _: f"{int(x):,}" if x >= 1 else f"{x:g}")
    axes[0].set_ylabel("mean NLL (nats per token)")
    fig.suptitle("Loss by position in the evaluation window (longest evaluated length)")
    finish(fig, axes[-1], path, legend_title="scheme")


# ---------------------------------------------------------------- published numbers, provenance


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


def published_table(summary: pd.DataFrame, published: Path, df: pd.DataFrame) -> str:
    """The paper's numbers beside ours, matched by scheme, training length and evaluation length (non-overlapping
    windows): 'lenx / paper' perplexity, then each side's ratio to its training length. What each side measured
    (the paper's `source`; our corpus, split, tokenizer) is said above the tables: perplexities of other
    tokenizations, splits or corpora are not comparable in value, their shapes are. A `note` column, where the
    file has one, stands in for a value the paper does not give (e.g. OOM)."""
    pub = pd.read_csv(published)
    pub = pub.assign(note=_text(pub["note"], "") if "note" in pub else "")
    ours = summary[summary["protocol"] == "nonoverlap"]
    indexed = ours.set_index(["scheme", "train_len", "eval_len"])
    ppl, rel = indexed["ppl"], indexed["rel_1x"]
    source = next((str(x) for x in pub["source"] if pd.notna(x) and str(x).strip()), "") if "source" in pub else ""
    rows = df[_text(df["protocol"], "nonoverlap") == "nonoverlap"]
    lines = [f"Paper: {source or published.name}. Ours: lenx, the test split of "
             f"{', '.join(sorted(rows['dataset'].astype(str).unique()))}, perplexity per token of tokenizer "
             f"{', '.join(tokenizers(rows))}, non-overlapping windows." + tokens_text(rows)]
    lines += ["", "Perplexities measured on other tokens (words vs subwords or bytes), splits or corpora differ in value "
              "for reasons other than position: compare the shapes, each scheme's ratio to its training length "
              "(the second table), more than the values."]
    matched = 0
    for train_len, part in pub.groupby("train_len", sort=True):
        train_len = int(train_len)
        lengths = sorted(int(L) for L in part["eval_len"].unique())
        head = ["| scheme | " + " | ".join(length_label(L, train_len) for L in lengths) + " |",
                "|---" * (len(lengths) + 1) + "|"]
        values, ratios = list(head), list(head)
        for pe, g in part.groupby("pe", sort=False):
            paper = g.assign(eval_len=g["eval_len"].astype(int)).set_index("eval_len")
            base = paper["ppl"].get(train_len, float("nan"))
            cells, rel_cells = [], []
            for L in lengths:
                mine = ppl.get((pe, train_len, L), float("nan"))
                matched += pd.notna(mine)
                theirs = paper["ppl"].get(L, float("nan"))
                missing = (paper["note"].get(L, "") or "—") if L in paper.index else "—"
                cells.append(f"{_fmt(mine)} / {missing if pd.isna(theirs) else _fmt(theirs)}")
                theirs_rel = theirs / base if pd.notna(theirs) and pd.notna(base) else float("nan")
                rel_cells.append(f"{_fmt(rel.get((pe, train_len, L), float('nan')))} / "
                                 f"{missing if pd.isna(theirs) else _fmt(theirs_rel)}")
            values.append(f"| {pe} | " + " | ".join(cells) + " |")
            ratios.append(f"| {pe} | " + " | ".join(rel_cells) + " |")
        lines += ["", f"Trained on {train_len} tokens: perplexity, lenx / paper.", ""] + values
        lines += ["", f"Relative to {train_len} (perplexity / perplexity at the training length), lenx / paper.",
                  ""] + ratios
    lines += ["", "'—': no value (lenx: not evaluated at that length or training length; the paper: not reported)."
              + (" Other text in a paper cell is the paper's note where it gives no number (OOM: out of memory)."
                 if (pub["note"] != "").any() else "")]
    if not matched:
        ours_lens = sorted(ours["eval_len"].unique())
        lines += ["", "No lenx result matches the paper's schemes, training length and evaluation lengths: ours are "
                  f"trained on {', '.join(map(str, sorted(ours['train_len'].unique())))} and evaluated at "
                  f"{', '.join(map(str, ours_lens))} (schemes {', '.join(dict.fromkeys(ours['scheme']))})."]
    return "\n".join(lines)


def provenance(df: pd.DataFrame) -> dict:
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
        "protocol": sorted(df["protocol"].astype(str).unique()),
        "runs": int(df["run"].nunique()),
        "training_config": info.get("config"),
    }


# ---------------------------------------------------------------- the report


@dataclass
class Section:
    title: str
    text: str = ""
    table: str = ""  # Markdown table
    image: str = ""  # file name beside the report


def note_lines(summary: pd.DataFrame) -> list[str]:
    """One line per scheme, protocol and distinct note, with the lengths it applies to (a scheme's notes can differ
    from length to length: fewer documents qualify, then none)."""
    rank = {scheme: i for i, scheme in enumerate(dict.fromkeys(summary["scheme"]))}  # the tables' order of schemes
    lines = []
    for (scheme, protocol, note), g in summary[summary["note"] != ""].groupby(["scheme", "protocol", "note"]):
        lengths = sorted(set(g["eval_len"].astype(int)))
        lines.append((rank[scheme], protocol, lengths[0], f"- {scheme}, {protocol}, at {', '.join(map(str, lengths))}: {note}"))
    return [line for *_, line in sorted(lines, key=lambda t: t[:3])]


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
    df = read_results(results_dir)
    df = df.assign(run_dir=locate_runs(df["run_dir"], results_dir))  # for their logs and run.json only: writes nothing
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LenxError(f"cannot create {out}: {e.strerror}; choose another --out") from None
    if config is None:
        config = saved_sweep(results_dir)
    summary = summarise(df)
    names = column_names(summary)

    plot_ppl_vs_length(summary, out / "ppl_vs_length.png")
    sections = []
    found = headline(summary)
    if found is not None:
        sections.append(Section("Summary", found.text, found.markdown()))
        if echo:
            print_headline(found)
    for protocol, part in summary.groupby("protocol", sort=False):
        no_1x = part["rel_1x"].isna() & part["ppl"].notna()  # a ppl but no 1x row to divide by
        sections += [
            Section(f"Perplexity ({protocol})", f"Test-split perplexity over {seeds_text(part)}" + (
                    ": the geometric mean (the exp of the seeds' mean loss) and its 95% confidence interval [low–high] "
                    "(Student t on log perplexity, so never below zero; none with one seed)."
                    if part["evaluated_seeds"].max() > 1 else ".") + tokens_text(df[protocol_label(df) == protocol])
                    + " Columns: evaluation length (multiple "
                    "of the training length). '—': the scheme cannot represent that length (or, for truncate, no "
                    "test document is that long).", to_markdown(wide(part, ppl_cell), names)),
            Section(f"Perplexity relative to 1× ({protocol})", "Perplexity divided by the same scheme's at its "
                    "training length, seed by seed (the geometric mean over the seeds that have both): 1.00 is "
                    "perfect extrapolation." + (" With several seeds, its 95% interval [low–high] (Student t on the "
                    "seeds' log ratios)." if part["rel_1x_low"].notna().any() else "") + (" Blank: the training length itself was not evaluated for these "
                    "seeds (add it to --lengths)." if no_1x.any() else ""),
                    to_markdown(wide(part, lambda r: "" if no_1x[r.Index] else rel_cell(r)), names)),
        ]
        if len(tokenizers(df)) > 1:
            sections.append(Section(f"Bits per byte ({protocol})", "Tokenizers differ between runs: bits per UTF-8 "
                                    "byte compares them fairly.", to_markdown(wide(part, lambda r: _fmt(r.bpb, 3)), names)))
    runs = df.assign(scheme=label(df)).groupby("scheme", sort=False)["run"].unique()
    tagged = [s for s in runs.index if s.endswith(")")]
    if tagged:
        sections.append(Section("Training variants", "Runs of one scheme trained differently are not pooled: "
                                "L<n> in the tag is the training length n, a hex tag the fingerprint of the training config "
                                "apart from the seed (results column config_id).\n"
                                + "\n".join(f"- {s}: {', '.join(map(str, runs[s]))}" for s in sorted(tagged))))
    sections.append(Section("Perplexity vs length", image="ppl_vs_length.png"))
    by_position = read_by_position(results_dir)
    if by_position is not None:
        plot_loss_by_position(by_position, out / "loss_by_position.png")
        sections.append(Section("Loss by position", "Mean NLL by position inside the window "
                                "(results_by_position.csv), at each run's longest evaluated length: where a scheme "
                                "breaks.", image="loss_by_position.png"))
    if plot_training_curves(df, out / "training_loss.png"):
        sections.append(Section("Training loss", image="training_loss.png"))
    if config is not None and config.published is not None:
        sections.append(Section("Published numbers", table=published_table(summary, config.published, df)))
    notes = note_lines(summary)
    if ((_text(df["rope_scaling"], "none") == "dynamic-ntk") & df["rope_factor"].isna()).any():
        notes.append("- dynamic-ntk: every scored window is as long as its evaluation length, so dynamic NTK (s = "
                     "window length / training length) is NTK-aware scaling at s = evaluation length / training "
                     "length, and its rows equal ntk's; the two differ only where a sequence grows token by token "
                     "(generation with a cache).")
    if notes:
        sections.append(Section("Notes", "\n".join(notes)))
    prov = provenance(df)
    prov_text = "\n".join(f"- {k}: {', '.join(map(str, v)) if isinstance(v, list) else v}"
                          for k, v in prov.items() if k != "training_config" and v is not None)
    if prov["training_config"] is not None:
        prov_text += "\n\nTraining config of the first run:\n\n```json\n" + json.dumps(prov["training_config"], indent=1) + "\n```"
    elif df["seed"].notna().any():  # lenx runs (an HF model's seed is empty) whose run_dir is not found from here
        where = ", ".join(map(str, df.loc[df["seed"].notna(), "run_dir"].dropna().unique()[:3]))
        prov_text += (f"\n\nNo run.json found (run_dir: {where}, from {Path.cwd()}): torch version, git commit, device "
                      "name, training config and training curves are in the run directories (looked for from here and "
                      f"beside {results_dir}); run `lenx report` where `lenx eval` ran.")
    if config is not None:
        prov_text += f"\n\nSweep config `{config.path}`:\n\n```yaml\n{config.path.read_text().strip()}\n```"
    sections.append(Section("Provenance", prov_text))

    title = f"lenx report{': ' + config.name if config is not None else ''}"
    write_text(out / "report.md", render_markdown(title, sections))
    write_text(out / "report.html", render_html(title, sections, out))
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H-%M-%S")
    write_json(out / f"results_{stamp}.json", lm_eval_json(summary, prov, config))
    return out / "report.md"


def render_markdown(title: str, sections: list[Section]) -> str:
    parts = [f"# {title}"]
    for s in sections:
        parts.append(f"## {s.title}")
        parts += [x for x in (s.text, s.table) if x]
        if s.image:
            parts.append(f"![{s.title}]({s.image})")
    return "\n\n".join(parts) + "\n"


def _md_table_to_html(md: str) -> str:
    """Markdown of paragraphs and pipe tables, in their order: each run of table lines one HTML table."""
    out, block = [], []

    def table(rows: list[str]) -> None:
        cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows if not set(r) <= set("|- ")]
        out.append("<table><thead><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cells[0]) + "</tr></thead><tbody>")
        out.extend("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in cells[1:])
        out.append("</tbody></table>")

    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            block.append(line)
            continue
        if block:
            table(block)
            block = []
        if line:
            out.append(f"<p>{html.escape(line)}</p>")
    return "\n".join(out)


def render_html(title: str, sections: list[Section], out: Path) -> str:
    """One self-contained file: styles inline, images embedded as base64."""
    body = [f"<h1>{html.escape(title)}</h1>"]
    for s in sections:
        body.append(f"<h2>{html.escape(s.title)}</h2>")
        if s.text:
            if "```" in s.text:
                body.append(f"<pre>{html.escape(s.text.replace('```json', '').replace('```yaml', '').replace('```', ''))}</pre>")
            else:
                body += [f"<p>{html.escape(p)}</p>" for p in s.text.split("\n") if p]
        if s.table:
            body.append(_md_table_to_html(s.table))
        if s.image:
            data = base64.b64encode((out / s.image).read_bytes()).decode()
            body.append(f'<img alt="{html.escape(s.title)}" src="data:image/png;base64,{data}">')
    css = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
           "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}"
           "th:first-child,td:first-child{text-align:left}img{max-width:100%}pre{background:#f6f6f6;padding:1em;"
           "overflow-x:auto}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{css}</style></head><body>{''.join(body)}</body></html>\n")


def lm_eval_json(summary: pd.DataFrame, prov: dict, config) -> dict:
    """In the shape of lm-evaluation-harness result files: results per task, with stderr; config; versions."""
    from . import __version__

    results = {}
    for r in summary.itertuples():
        results[f"{r.scheme}@{r.eval_len}" + ("" if r.protocol == "nonoverlap" else f"/{r.protocol}")] = {
            "alias": f"{r.scheme} at {r.eval_len} tokens, {r.protocol}",
            "token_perplexity,none": None if pd.isna(r.ppl) else float(r.ppl),
            "token_perplexity_stderr,none": None if pd.isna(r.ppl_stderr) else float(r.ppl_stderr),
            "bits_per_byte,none": None if pd.isna(r.bpb) else float(r.bpb),
            "ppl_relative_to_1x,none": None if pd.isna(r.rel_1x) else float(r.rel_1x),
            "ppl_relative_to_1x_stderr,none": None if pd.isna(r.rel_1x_stderr) else float(r.rel_1x_stderr),
            "seeds": int(r.seeds),
        }
    return {
        "results": results,
        "config": {"sweep": config.raw if config is not None else None, "training": prov.get("training_config")},
        "versions": {"lenx": __version__, "torch": prov.get("torch_version")},
        "git_hash": prov.get("git_commit"),
        "date": datetime.now(timezone.utc).timestamp(),
        "provenance": {k: v for k, v in prov.items() if k != "training_config"},
    }
