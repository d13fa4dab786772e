"""The report's numbers: scheme labels, the summary over seeds (geometric means, Student-t intervals on log
perplexity, the paired ratio to 1x) and the ranking that answers the benchmark's question. Pure functions of
results tables: no files, no text beyond the labels that name a table's rows.

Only seeds of one experiment are pooled: runs of a scheme trained differently (training length, `config_id`) get
labels, and so rows, of their own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

# Two-sided 95% Student t quantiles t_{0.975, df}, df = 1..30 (standard tables); normal beyond.
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t975(df: int) -> float:
    return _T975[df - 1] if 1 <= df <= len(_T975) else 1.960


Z975 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson(k: int, n: int, z: float = Z975) -> tuple[float, float]:
    """Wilson's score interval for k successes in n trials (95% by default): the p with |k/n - p| <= z
    sqrt(p (1 - p) / n), i.e. (k/n + z^2/2n -+ z sqrt(k/n (1 - k/n) / n + z^2/4n^2)) / (1 + z^2/n). Unlike the
    normal interval it stays inside [0, 1] and is not empty at 0 or n successes."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"wilson needs 0 <= k <= n and n > 0, got k={k}, n={n}")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def as_text(column: pd.Series, missing: str) -> pd.Series:
    """A text column as str, `missing` where empty. A column with no value at all reads back from CSV as float,
    and pandas is deprecating fillna with a string on a float column."""
    return column.astype(object).where(column.notna(), missing).astype(str)


def base_scheme(label: str) -> str:
    """The registered scheme of a report label: "alibi+yarn×4 [bpe:4096] on stdlib (L16)" -> alibi."""
    return label.split(" ")[0].split("+")[0]


def scheme_order(schemes) -> dict:
    """Sort key of each label: its scheme's place in the registry (unknown schemes last), then the label."""
    from .positional import SCHEMES

    names = list(SCHEMES)
    base = {s: base_scheme(s) for s in schemes}
    return {s: (names.index(base[s]) if base[s] in names else len(names), s) for s in schemes}


def tokenizers(df: pd.DataFrame) -> list[str]:
    return sorted(as_text(df["tokenizer"], "byte").unique()) if "tokenizer" in df else ["byte"]


def label(df: pd.DataFrame) -> pd.Series:
    """Scheme label: the scheme, plus the RoPE extension when one was used at evaluation, plus the
    tokenizer when the results mix tokenizers, plus ' on <dataset>' when they mix evaluation datasets (`lenx eval
    --dataset / --test-file`; 'files#<fingerprint>' where one name covers several texts), plus `variant` where
    runs of one label were trained differently.
    Rows that share a label are seeds of one experiment."""
    scaling = as_text(df["rope_scaling"], "none")
    lab = df["pe"].where(scaling == "none", df["pe"] + "+" + scaling) + factor_tag(df, scaling)
    if len(tokenizers(df)) > 1:
        lab = lab + " [" + as_text(df["tokenizer"], "byte") + "]"
    if "dataset" in df:
        name = df["dataset"].astype(str)
        # one name, several texts (`--test-file` of other files: all 'files'): each named by its fingerprint too
        fingerprint = df["dataset_fingerprint"] if "dataset_fingerprint" in df else pd.Series(None, index=df.index)
        several = (fingerprint.groupby(name).transform("nunique") > 1) & fingerprint.notna()
        name = name.where(~several, name + "#" + fingerprint.astype(str).str[:6])
        if name.nunique() > 1:
            lab = lab + " on " + name
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
    protocol = as_text(df["protocol"], "nonoverlap")
    stride = df["stride"] if "stride" in df else pd.Series(float("nan"), index=df.index)
    half = stride == df["eval_len"] // 2
    name = protocol.where(protocol != "sliding", "sliding (stride " + stride.astype("Int64").astype(str) + ")")
    return name.where(~((protocol == "sliding") & half.groupby(protocol).transform("all")), "sliding (stride L/2)")


def protocols(df: pd.DataFrame) -> list[str]:
    found = list(dict.fromkeys(protocol_label(df)))
    return sorted(found, key=lambda p: (next((i for i, o in enumerate(PROTOCOL_ORDER) if p.startswith(o)), 9), p))


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (protocol, scheme, eval_len), over seeds: ppl's geometric mean, its 95% confidence interval
    (ppl_low, ppl_high: Student t on log ppl) and standard error (delta method), the seed count, and bpb's mean;
    the ratio to the scheme's own perplexity at 1x with its interval (rel_1x, rel_1x_low, rel_1x_high,
    rel_1x_stderr: paired over seeds); the context gain's mean and interval over seeds (context_gain, _low, _high).

    Seeds differ in perplexity by factors (one run that breaks at 16x can be ten times another): on log ppl the
    interval is symmetric and stays positive, where an interval on ppl itself can reach below zero with few seeds."""
    df = df.assign(scheme=label(df), protocol_label=protocol_label(df))
    rows, logs = [], {}  # logs: each cell's log ppl by seed, for the paired ratio to 1x
    every = df.groupby(["protocol_label", "scheme"], sort=False)["seed"].unique()  # a scheme's seeds, any length
    for (protocol, scheme, L), g in df.groupby(["protocol_label", "scheme", "eval_len"], sort=False):
        ppl = g.groupby("seed", dropna=False)["ppl"].mean().dropna()  # a seed evaluated twice counts once
        logs[(protocol, scheme, int(L))] = ppl.map(math.log)
        rows.append({"protocol": protocol, "scheme": scheme, "eval_len": int(L),
                     "train_len": int(g["train_len"].iloc[0]), **_cell(g, ppl, every[(protocol, scheme)])})
    out = pd.DataFrame(rows)
    rel = [_rel_1x(logs[(r.protocol, r.scheme, r.eval_len)], logs.get((r.protocol, r.scheme, r.train_len)))
           for r in out.itertuples()]
    out[["rel_1x", "rel_1x_low", "rel_1x_high", "rel_1x_stderr"]] = pd.DataFrame(rel, index=out.index, dtype=float)
    order = scheme_order(out["scheme"].unique())
    proto_order = {p: i for i, p in enumerate(protocols(df))}
    return out.sort_values(["protocol", "scheme", "eval_len"],
                           key=lambda c: c.map(order) if c.name == "scheme" else c.map(proto_order)
                           if c.name == "protocol" else c)


def _cell(g: pd.DataFrame, ppl: pd.Series, seeds) -> dict:
    """One summary cell from its rows `g`, its perplexity by seed `ppl` and the seeds its scheme was evaluated
    with (at any length)."""
    lacking = [s for s in seeds if pd.notna(s) and s not in set(ppl.index)]  # no row here, or an empty ppl
    partial = [f"mean over {len(ppl)} of {len(seeds)} seeds (no perplexity from seed "
               + ", ".join(f"{s:g}" for s in lacking) + ")"] if len(ppl) and lacking else []
    n, log = len(ppl), ppl.map(math.log)
    mean = math.exp(log.mean()) if n > 1 else ppl.iloc[0] if n else float("nan")
    se = log.std(ddof=1) / math.sqrt(n) if n > 1 else float("nan")  # of log ppl
    return {
        "seeds": n,
        "evaluated_seeds": len(seeds),  # the scheme's, with or without a perplexity here
        "ppl": mean,
        "ppl_low": mean * math.exp(-t975(n - 1) * se) if n > 1 else float("nan"),
        "ppl_high": mean * math.exp(t975(n - 1) * se) if n > 1 else float("nan"),
        "ppl_stderr": mean * se,
        "bpb": g["bpb"].dropna().mean() if g["bpb"].notna().any() else float("nan"),
        **_gain(g),
        "note": "; ".join(sorted(set(as_text(g["note"], "")) - {""}) + partial),
    }


def _gain(g: pd.DataFrame) -> dict:
    """The context gain over seeds (nats; `lenx.perplexity`): its mean and, with two or more seeds, its 95% interval
    (Student t over the seeds' gains, each already paired token by token within its run)."""
    nan = float("nan")
    by_seed = g.groupby("seed", dropna=False)["context_gain"].mean().dropna() if "context_gain" in g else pd.Series()
    n = len(by_seed)
    if not n:
        return {"context_gain": nan, "context_gain_low": nan, "context_gain_high": nan, "context_gain_stderr": nan}
    mean = float(by_seed.mean())
    se = by_seed.std(ddof=1) / math.sqrt(n) if n > 1 else nan
    return {"context_gain": mean, "context_gain_low": mean - t975(n - 1) * se, "context_gain_high": mean + t975(n - 1) * se,
            "context_gain_stderr": se}


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


KEPT = 1.10  # "keeps working": perplexity at the longest length within 10% of the scheme's own at 1x


@dataclass
class Ranking:
    """The answer for one protocol's summary rows, in numbers: at `multiple`, the longest multiple of the training
    length with a perplexity, the schemes with a ratio to 1x ranked by it (then by perplexity), their perplexity
    at 1x, those within KEPT of 1x, the lowest perplexity there, and why each other scheme is not ranked."""
    multiple: float
    lengths: list[int]          # the evaluation lengths at that multiple
    ranked: pd.DataFrame        # summary rows at `multiple`, indexed by scheme, best first
    base: pd.Series             # ppl at 1x by scheme
    kept: list[str]
    best: str
    unranked: dict              # scheme -> (reason, note): "note", "no 1x" or "not evaluated"


def ranking(part: pd.DataFrame) -> Ranking | None:
    """The ranking of one protocol's summary rows; None when no scheme has a perplexity past 1x and at 1x."""
    multiple = part["eval_len"] / part["train_len"]
    M = multiple[part["ppl"].notna()].max()  # NaN where no cell has a perplexity
    if not M > 1:
        return None
    at = part[(multiple - M).abs() < 1e-9].set_index("scheme")
    ranked = at[at["rel_1x"].notna()].sort_values(["rel_1x", "ppl"])
    if ranked.empty:
        return None
    unranked = {}
    for s in dict.fromkeys(part["scheme"]):
        if s not in ranked.index:
            unranked[s] = (("note", at.loc[s, "note"]) if s in at.index and at.loc[s, "note"] else
                           ("no 1x", "") if s in at.index and pd.notna(at.loc[s, "ppl"]) else ("not evaluated", ""))
    return Ranking(float(M), sorted(int(L) for L in at["eval_len"].unique()), ranked,
                   part[multiple == 1].set_index("scheme")["ppl"], [s for s, r in ranked.iterrows() if r.rel_1x <= KEPT],
                   ranked["ppl"].idxmin(), unranked)
