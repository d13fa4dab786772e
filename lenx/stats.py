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


def labels_together(*tables: pd.DataFrame | None) -> list[pd.Series | None]:
    """`label` of each table's rows, labelled as one table (results and probes): a scheme gets one name in both,
    even where a tag (a dataset, a training variant) shows only in their union. None for a table that is None."""
    present = [t for t in tables if t is not None]
    cols = sorted(set.intersection(*(set(t.columns) for t in present))) if present else []
    both = label(pd.concat([t[cols] for t in present], ignore_index=True)) if present else None
    out, start = [], 0
    for t in tables:
        if t is None:
            out.append(None)
            continue
        out.append(pd.Series(both.iloc[start:start + len(t)].to_numpy(), index=t.index))
        start += len(t)
    return out


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


def summarise(df: pd.DataFrame, scheme: pd.Series | None = None) -> pd.DataFrame:
    """One row per (protocol, scheme, eval_len), over seeds: ppl's geometric mean, its 95% confidence interval
    (ppl_low, ppl_high: Student t on log ppl) and standard error (delta method), the seed count, and bpb's mean;
    the ratio to the scheme's own perplexity at 1x with its interval (rel_1x, rel_1x_low, rel_1x_high,
    rel_1x_stderr: paired over seeds); the context gain's mean and interval over seeds (context_gain, _low, _high).

    Seeds differ in perplexity by factors (one run that breaks at 16x can be ten times another): on log ppl the
    interval is symmetric and stays positive, where an interval on ppl itself can reach below zero with few seeds."""
    df = df.assign(scheme=label(df) if scheme is None else scheme, protocol_label=protocol_label(df))
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


# ---------------------------------------------------------------- retrieval probes (the `probes` table)

PROBE_ORDER = ("passkey", "mqar", "repeat")


def probe_at(probes: pd.DataFrame) -> pd.Series:
    """A probe row's place in its window: the depth (passkey) or the distance (mqar, repeat)."""
    depth = probes["depth"] if "depth" in probes else pd.Series(float("nan"), index=probes.index)
    distance = probes["distance"] if "distance" in probes else pd.Series(float("nan"), index=probes.index)
    return pd.to_numeric(depth, errors="coerce").where(probes["probe"] == "passkey",
                                                       pd.to_numeric(distance, errors="coerce"))


def probe_summary(probes: pd.DataFrame, pooled: bool = False, scheme: pd.Series | None = None) -> pd.DataFrame:
    """The probes over seeds: one row per (probe, scheme, eval_len, at) with `at` the depth or distance, or with
    `pooled` one per (probe, scheme, eval_len) over its depths or distances. `scheme`: the rows' labels (default
    `label(probes)`; `lenx.report` labels probes and perplexity rows together, so that one scheme has one name).

    Each seed's numbers pool its rows: accuracy = its key tokens' hits / their count (each row's accuracy ×
    answers), exact_match = trials matched / trials, key_nll = the answers' mean NLL, gain = the trials' mean gain.
    With two or more seeds: the mean over seeds, its 95% interval (Student t over the seeds) and standard error.
    With one seed: the interval of the pooled tokens or trials themselves, as the rows give them: Wilson's for
    accuracy (over answer tokens) and exact_match (over trials), with the standard error the harness gives a
    mean of 0/1 samples, sqrt(p (1 - p) / (n - 1)); for gain, Student t over trials, its standard error from the
    rows' intervals (cells independent: their own windows); key_nll then has none. `interval` says which
    ('seeds', or 'one seed': over its tokens and trials)."""
    df = probes.assign(scheme=label(probes) if scheme is None else scheme, at=probe_at(probes))
    keys = ["probe", "scheme", "eval_len"] + ([] if pooled else ["at"])
    rows = []
    for key, g in df.groupby(keys, sort=False, dropna=False):
        scored = g[g["accuracy"].notna() & (g["answers"] > 0)]
        per_seed = [_probe_seed(s) for _, s in scored.groupby("seed", dropna=False)]
        row = dict(zip(keys, key), train_len=int(g["train_len"].iloc[0]), seeds=len(per_seed),
                   evaluated_seeds=int(g["seed"].nunique(dropna=False)),
                   trials=int(scored["trials"].sum()), answers=int(scored["answers"].sum()),
                   interval="seeds" if len(per_seed) > 1 else "one seed" if per_seed else "",
                   note="" if len(per_seed) else "; ".join(sorted(set(as_text(g["note"], "")) - {""})))
        row["multiple"] = row["eval_len"] / row["train_len"]
        for metric in ("accuracy", "exact_match", "key_nll", "gain"):
            row.update(_over_seeds(metric, per_seed))
        rows.append(row)
    cols = ["accuracy", "exact_match", "key_nll", "gain"]
    out = pd.DataFrame(rows, columns=keys + ["train_len", "multiple", "seeds", "evaluated_seeds", "trials",
                                             "answers", "interval", "note"]
                       + [f"{m}{s}" for m in cols for s in ("", "_low", "_high", "_stderr")])
    if out.empty:
        return out
    order = scheme_order(out["scheme"].unique())
    rank = {p: i for i, p in enumerate(PROBE_ORDER)}
    return out.sort_values(keys, key=lambda c: c.map(order) if c.name == "scheme" else c.map(lambda p: rank.get(p, 9))
                           if c.name == "probe" else c).reset_index(drop=True)


def _probe_seed(g: pd.DataFrame) -> dict:
    """One seed's pooled numbers from its scored rows: each metric's value and, for one seed's interval, its
    (low, high, stderr) over the seed's own tokens or trials."""
    nan = float("nan")
    hits = int((g["accuracy"] * g["answers"]).round().sum())
    n = int(g["answers"].sum())
    out = {"accuracy": (hits / n, *wilson(hits, n), _binomial_se(hits, n))}
    em = g[g["exact_match"].notna()] if "exact_match" in g else g.iloc[:0]
    if len(em):
        k, t = int((em["exact_match"] * em["trials"]).round().sum()), int(em["trials"].sum())
        out["exact_match"] = (k / t, *wilson(k, t), _binomial_se(k, t))
    if "key_nll" in g and g["key_nll"].notna().any():
        nll = g[g["key_nll"].notna()]
        out["key_nll"] = (float((nll["key_nll"] * nll["answers"]).sum() / nll["answers"].sum()), nan, nan, nan)
    gain = g[g["gain"].notna()] if "gain" in g else g.iloc[:0]
    if len(gain):
        w = gain["trials"] / gain["trials"].sum()
        mean = float((w * gain["gain"]).sum())
        dof = int(gain["trials"].sum() - len(gain))  # the pooled variances' degrees of freedom: one less per cell
        # each cell's standard error from its interval over trials (Student t, trials - 1 degrees of freedom)
        se_cell = [(r.gain_high - r.gain_low) / (2 * t975(int(r.trials) - 1)) if pd.notna(r.gain_low) else nan
                   for r in gain.itertuples()]
        se = math.sqrt(sum((wi * s) ** 2 for wi, s in zip(w, se_cell)))
        half = t975(dof) * se if dof > 0 else nan
        out["gain"] = (mean, mean - half, mean + half, se)
    return out


def _binomial_se(k: int, n: int) -> float:
    """The standard error of a mean of n 0/1 samples with k ones (the sample standard deviation / sqrt n, as
    lm-evaluation-harness computes it for accuracy)."""
    p = k / n
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")


def _over_seeds(metric: str, per_seed: list[dict]) -> dict:
    """A metric's mean over seeds with a Student-t 95% interval and standard error (two or more seeds); one seed's
    own interval; NaN where no seed has it. Accuracies stay within [0, 1]."""
    nan = float("nan")
    values = [s[metric] for s in per_seed if metric in s]
    names = [metric, f"{metric}_low", f"{metric}_high", f"{metric}_stderr"]
    if not values:
        return dict.fromkeys(names, nan)
    if len(values) == 1:
        return dict(zip(names, values[0]))
    x = pd.Series([v[0] for v in values])
    mean, se = float(x.mean()), float(x.std(ddof=1) / math.sqrt(len(x)))
    low, high = mean - t975(len(x) - 1) * se, mean + t975(len(x) - 1) * se
    if metric in ("accuracy", "exact_match"):
        low, high = max(0.0, low), min(1.0, high)
    return dict(zip(names, (mean, low, high, se)))


RETRIEVES = 0.5  # passkey accuracy at 1x from which a scheme counts as retrieving at all
KEEPS = 0.5      # and it keeps retrieving at a length where it has at least this share of its 1x accuracy


@dataclass
class Retrieval:
    """The passkey verdict of each scheme (pooled summary rows of the passkey probe): at `multiple`, the longest
    multiple of the training length with a passkey accuracy, each scheme's row there and at its reference (1x, or
    its shortest length with an accuracy where 1x has none: a window too short for the wording), and its verdict:
    'keeps' (accuracy at `multiple` >= KEEPS x its reference accuracy), 'stops' (below), 'never' (reference accuracy
    below RETRIEVES: it does not retrieve at its own length, so length says nothing), 'unmeasured' (no accuracy at
    `multiple` or no shorter reference)."""
    multiple: float
    at: dict          # scheme -> summary row at `multiple` (absent where not measured)
    ref: dict         # scheme -> summary row at the reference length
    verdict: dict     # scheme -> 'keeps' | 'stops' | 'never' | 'unmeasured'
    notes: dict       # scheme -> why it has no accuracy at `multiple` (its row's note), where it has one


def retrieval(pooled: pd.DataFrame) -> Retrieval | None:
    """The passkey verdicts from `probe_summary(..., pooled=True)`; None where no passkey cell has an accuracy."""
    pk = pooled[(pooled["probe"] == "passkey") & pooled["accuracy"].notna()]
    if pk.empty:
        return None
    M = float(pk["multiple"].max())
    at, ref, verdict, notes = {}, {}, {}, {}
    empty = pooled[(pooled["probe"] == "passkey") & pooled["accuracy"].isna() & ((pooled["multiple"] - M).abs() < 1e-9)]
    for r in empty.itertuples():
        if r.note:
            notes[r.scheme] = r.note
    for scheme in dict.fromkeys(pooled.loc[pooled["probe"] == "passkey", "scheme"]):
        mine = pk[pk["scheme"] == scheme]
        top = mine[(mine["multiple"] - M).abs() < 1e-9]
        if len(top):
            at[scheme] = top.iloc[0]
        shorter = mine[mine["multiple"] < M - 1e-9].sort_values("multiple")
        if len(shorter):
            one = shorter[(shorter["multiple"] - 1).abs() < 1e-9]
            ref[scheme] = (one if len(one) else shorter).iloc[0]
        if scheme not in at or scheme not in ref:
            verdict[scheme] = "unmeasured"
        elif ref[scheme]["accuracy"] < RETRIEVES:
            verdict[scheme] = "never"
        else:
            verdict[scheme] = "keeps" if at[scheme]["accuracy"] >= KEEPS * ref[scheme]["accuracy"] else "stops"
    return Retrieval(M, at, ref, verdict, notes)


def farthest_gain(cells: pd.DataFrame) -> tuple[float, dict] | None:
    """The repeat gain at the longest multiple with a gain, at the farthest distance probed there (the window less
    the segment: the first copy nearly a whole window back), per scheme: (multiple, scheme -> summary row). From
    `probe_summary` per distance; None where no repeat cell has a gain."""
    rep = cells[(cells["probe"] == "repeat") & cells["gain"].notna()]
    if rep.empty:
        return None
    M = float(rep["multiple"].max())
    top = rep[(rep["multiple"] - M).abs() < 1e-9]
    return M, {s: g.sort_values("at").iloc[-1] for s, g in top.groupby("scheme", sort=False)}


@dataclass
class ProbeTables:
    """The probes table summarised over seeds, both ways (`probe_summary`): per depth or distance, and pooled."""
    cells: pd.DataFrame
    pooled: pd.DataFrame

    @classmethod
    def of(cls, probes: pd.DataFrame, scheme: pd.Series | None = None) -> "ProbeTables":
        return cls(probe_summary(probes, scheme=scheme), probe_summary(probes, pooled=True, scheme=scheme))
