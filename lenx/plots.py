"""The report's figures, and one look for every figure: a colour-blind-safe palette, the same colour and marker
for a scheme everywhere, readable axes, the legend outside the data."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import matplotlib
import pandas as pd

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .stats import base_scheme, label, protocol_label, protocols, scheme_order, variant  # noqa: E402

# Paul Tol's 'muted' palette (colour-blind safe), then greys and three of his 'vibrant' colours, in registry order
# (his pale grey left out: on white it hid its line); a scheme past them shares a colour, never a marker too.
_PALETTE = ["#CC6677", "#332288", "#DDCC77", "#117733", "#88CCEE", "#882255", "#44AA99", "#999933", "#AA4499",
            "#6699CC", "#555555", "#EE7733", "#000000", "#EE3377", "#BBBBBB", "#0077BB"]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "*", "h", "p"]


def style(scheme: str) -> dict:
    """Colour and marker of a scheme: fixed by its place in the registry (others hash to a slot)."""
    from .positional import SCHEMES

    names = list(SCHEMES)
    base = base_scheme(scheme)
    i = names.index(base) if base in names else sum(map(ord, base)) % len(_PALETTE)
    # past the palette's 12 colours the marker moves on by one per round: every scheme its own (colour, marker)
    s = {"color": _PALETTE[i % len(_PALETTE)], "marker": _MARKERS[(i + i // len(_PALETTE)) % len(_MARKERS)]}
    tags = scheme.split(" ", 1)[1] if " " in scheme else ""
    if tags:  # "alibi [bpe:4096] on files (L16)": a tokenizer, evaluation dataset or training variant among several
        k = sum(map(ord, tags))  # (lenx.stats.label): its own marker and dashes
        s["marker"] = _marker_apart(i, k)
        s["linestyle"] = _VARIANT_DASHES[k % len(_VARIANT_DASHES)]
    if "+" in scheme:  # a RoPE extension: the scheme's colour; its own dash pattern and hollow marker
        ext, _, factor = scheme.split(" ")[0].split("+", 1)[1].partition("×")
        s["linestyle"] = _EXTENSION_DASHES.get(ext.split(":")[0], "--")  # "yarn:beta_fast=16": yarn's dashes
        s["markerfacecolor"] = "white"
        if factor:  # a factor given at evaluation ("rope+yarn×4"): a marker of its own per factor
            s["marker"] = _marker_apart(i, sum(map(ord, factor)))
    return s


def styles(labels) -> dict:
    """style() of each label in one figure, in the given order; a label that would look exactly like an earlier
    one (tagged labels hash to their markers and dashes, and two can meet) takes the next marker still free."""
    return apart({lab: style(lab) for lab in labels})


def apart(looks: dict) -> dict:
    """The styles of one figure's lines (key -> style, in drawing order), each that looks exactly like an earlier
    one given the next marker still free: for a figure that changes styles() (e.g. sets each protocol's dashes)."""
    out, taken = {}, set()
    look = lambda s: (s["color"], s["marker"], str(s.get("linestyle", "-")), s.get("markerfacecolor"))  # noqa: E731
    for key, s in looks.items():
        s = dict(s)
        for _ in range(len(_MARKERS)):
            if look(s) not in taken:
                break
            s["marker"] = _MARKERS[(_MARKERS.index(s["marker"]) + 1) % len(_MARKERS)]
        taken.add(look(s))
        out[key] = s
    return out


def _marker_apart(i: int, k: int) -> str:
    """A marker other than scheme slot i's own, picked by k (a hash of the variant's tag)."""
    own = (i + i // len(_PALETTE)) % len(_MARKERS)
    return _MARKERS[(own + 1 + k % (len(_MARKERS) - 1)) % len(_MARKERS)]


_VARIANT_DASHES = ["-", "--", "-.", ":"]
_EXTENSION_DASHES = {"pi": ":", "ntk": "--", "dynamic-ntk": (0, (6, 2, 1, 2)), "yarn": "-.",
                     "llama3": (0, (3, 1, 1, 1, 1, 1)), "longrope": (0, (8, 3))}


def readable_log_y(ax) -> None:
    """Plain numbers (6, 8, 10, 20) on a log y axis instead of a lone 10^1; fewer of them the more decades it spans
    (call it once the limits are set)."""

    from matplotlib.ticker import LogLocator

    low, high = ax.get_ylim()
    decades = math.log10(high / low) if low > 0 else math.inf
    subs = ((1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0) if decades <= 0.5  # 65-110: 70, 80, 90, 100
            else (1.0, 1.5, 2.0, 3.0, 5.0, 7.0) if decades <= 2 else (1.0, 2.0, 5.0) if decades <= 4 else (1.0,))
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=subs))
    ax.yaxis.set_major_formatter(lambda x, _: f"{x:,.10g}")  # 7, 1.5, 150, 2,000: no trailing ".0"
    ax.yaxis.set_minor_formatter(lambda *_: "")


def new_figure(width: float = 8.0, height: float = 4.8, ncols: int = 1, sharey: bool = False):
    """(fig, ax), or (fig, [ax, ...]) for ncols > 1."""
    plt.rcParams.update({"font.size": 11, "axes.grid": True, "grid.alpha": 0.3})
    fig, ax = plt.subplots(1, ncols, figsize=(width, height), dpi=120, sharey=sharey, squeeze=False)
    return fig, (ax[0, 0] if ncols == 1 else list(ax[0]))


def finish(fig, ax, path, legend_title: str | None = None) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if handles:  # nothing drawn (every cell empty): no legend, and no matplotlib warning
        # a legend taller than the axes squeezes them (tight bbox): past 14 entries, more columns instead
        ncol = math.ceil(len(handles) / 14)
        ax.legend(title=legend_title, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, ncol=ncol)
        width, height = fig.get_size_inches()
        column = max(2.2, 0.075 * max(map(len, labels)) + 0.7)  # inches: long labels (extensions' settings)
        fig.set_size_inches(width + column * (ncol - 1), height)  # the axes keep their width
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


# ---------------------------------------------------------------- the report's figures


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
    order = scheme_order(logs["pe"].unique())
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


def plot_loss_by_position(pos: pd.DataFrame, path: Path) -> None:
    """Mean NLL by position in the window, at each run's longest evaluation length: one panel per protocol,
    one line per scheme (token-weighted over seeds), the training length marked."""
    pos = pos.assign(_protocol=protocol_label(pos), scheme=label(pos))
    longest = pos.groupby("run")["eval_len"].transform("max")
    pos = pos[pos["eval_len"] == longest]
    order = protocols(pos)
    fig, axes = new_figure(width=6.0 * len(order) + 2, height=4.8, ncols=len(order), sharey=True)
    axes = axes if len(order) > 1 else [axes]
    rank = scheme_order(pos["scheme"].unique())
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


def plot_context_gain(pos: pd.DataFrame, path: Path) -> bool:
    """Context gain by position in the window at each run's longest nonoverlap length (NLL with a 1x context minus
    with the whole window, per bucket, token-weighted over seeds), one line per scheme, 0 and the training length
    marked. False (nothing drawn) where no bucket has a gain."""
    if "context_gain" not in pos or pos["context_gain"].isna().all():
        return False
    pos = pos[pos["context_gain"].notna()].assign(scheme=label(pos[pos["context_gain"].notna()]))
    pos = pos[pos["eval_len"] == pos.groupby("run")["eval_len"].transform("max")]
    fig, ax = new_figure()
    schemes = sorted(pos["scheme"].unique(), key=scheme_order(pos["scheme"].unique()).get)
    looks = styles(schemes)
    agg = (pos.assign(weighted=pos["context_gain"] * pos["tokens"])
           .groupby(["scheme", "bucket_start", "bucket_end"], as_index=False)[["weighted", "tokens"]].sum())
    for scheme in schemes:
        a = agg[agg["scheme"] == scheme].sort_values("bucket_start")
        ax.plot((a["bucket_start"] + a["bucket_end"]) / 2, a["weighted"] / a["tokens"], label=scheme, linewidth=2,
                markersize=5, markevery=max(1, len(a) // 12), **looks[scheme])
    ax.axhline(0.0, color="0.4", linewidth=1)
    _mark_train_len(ax, pos["train_len"].unique())
    ax.set_xscale("log", base=2)
    ax.get_xaxis().set_major_formatter(lambda x, _: f"{int(x):,}" if x >= 1 else f"{x:g}")
    ax.set_xlabel("position in the window (tokens, bucket centres, log2 scale)")
    ax.set_ylabel("NLL(1× context) − NLL(whole window), nats")
    lens = sorted(pos["eval_len"].unique())
    ax.set_title(f"Context gain by position (nonoverlap, window {', '.join(f'{n:,}' for n in lens)}; "
                 "above 0: the longer context helps)", fontsize=11)
    finish(fig, ax, path, legend_title="scheme")
    return True


# ---------------------------------------------------------------- retrieval probes (`lenx.stats.probe_summary`)


BANDS_UP_TO = 6  # schemes in one panel up to which their intervals are drawn as bands (more: the bands are mud)


def _grid(n: int, ncols: int, width: float, height: float, **share):
    """A grid of n small panels, `ncols` a row at most; the unused ones hidden. (fig, flat list of n axes). At least
    8 inches wide, so that the titles and axis labels of a grid of one or two panels fit."""

    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    plt.rcParams.update({"font.size": 9, "axes.grid": False})
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(8.0, width * ncols + 1.2), height * nrows + 0.8), dpi=120,
                             squeeze=False, layout="constrained", **share)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def plot_passkey(cells: pd.DataFrame, path: Path) -> bool:
    """A length x depth heatmap of passkey accuracy per scheme (mean over seeds): one small panel per scheme, five
    a row, one colour scale (0 to 1) and one colourbar for all; grey where not measured. False where no passkey cell
    has an accuracy."""
    import numpy as np
    from matplotlib import colormaps

    pk = cells[cells["probe"] == "passkey"]
    if pk.empty or pk["accuracy"].isna().all():
        return False
    schemes = sorted(pk["scheme"].unique(), key=scheme_order(pk["scheme"].unique()).get)
    depths = sorted(pk["at"].dropna().unique())
    lengths = sorted(pk["eval_len"].unique())
    fig, axes = _grid(len(schemes), 5, 0.42 * len(lengths) + 1.0, 0.3 * len(depths) + 0.9)
    cmap = colormaps["viridis"].with_extremes(bad="#DDDDDD")
    annotate = len(lengths) <= 8 and len(depths) <= 8
    for ax, scheme in zip(axes, schemes):
        mine = pk[pk["scheme"] == scheme]
        grid = mine.pivot_table(index="at", columns="eval_len", values="accuracy", aggfunc="mean", dropna=False)
        grid = grid.reindex(index=depths, columns=lengths)
        values = np.ma.masked_invalid(grid.to_numpy(dtype=float))
        image = ax.imshow(values, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
        if annotate:
            for (i, j), v in np.ndenumerate(grid.to_numpy(dtype=float)):
                if not np.isnan(v):
                    ax.text(j, i, "1" if v >= 0.995 else f"{v:.2f}"[1:], ha="center", va="center", fontsize=7,
                            color="black" if v > 0.6 else "white")
        train_len = int(mine["train_len"].iloc[0])
        ax.set_xticks(range(len(lengths)), [f"{L / train_len:g}×" for L in lengths], fontsize=8)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=8)
        ax.set_title(scheme, fontsize=9)
    for ax in axes:
        ax.tick_params(length=2)
    fig.colorbar(image, ax=axes, shrink=0.8, label="passkey accuracy (teacher-forced)")
    train = sorted(int(x) for x in pk["train_len"].unique())
    fig.supxlabel(f"evaluation length, × training length ({', '.join(map(str, train))} tokens)", fontsize=10)
    fig.supylabel("needle depth (0: first, 1: last)", fontsize=10)
    fig.suptitle("Passkey accuracy by length and depth (mean over seeds; grey: not measured)", fontsize=11)
    fig.savefig(path)
    plt.close(fig)
    return True


def _chance(probe: str, rows: pd.DataFrame) -> float | None:
    """Chance accuracy where one is defined: passkey with a byte tokenizer (a key token is one of ten digits), mqar
    (a value among the window's `pairs` values); None elsewhere (BPE keys, repeat)."""
    if probe == "passkey" and "tokenizer" in rows and (rows["tokenizer"].astype(str) == "byte").all():
        return 0.1
    if probe == "mqar" and "pairs" in rows and rows["pairs"].nunique() == 1 and rows["pairs"].iloc[0] > 0:
        return 1.0 / float(rows["pairs"].iloc[0])
    return None


def plot_retrieval_vs_length(pooled: pd.DataFrame, path: Path, raw: pd.DataFrame | None = None) -> bool:
    """Teacher-forced accuracy vs evaluation length (log2 x), one panel per probe, one line per scheme (mean over
    seeds, its interval a band), the training length and chance (`_chance`, from the raw probes rows `raw`) marked.
    False where no cell has an accuracy."""
    pooled = pooled[pooled["accuracy"].notna()]
    if pooled.empty:
        return False
    from .stats import PROBE_ORDER

    probes = sorted(pooled["probe"].unique(), key=lambda p: PROBE_ORDER.index(p) if p in PROBE_ORDER else 9)
    schemes = sorted(pooled["scheme"].unique(), key=scheme_order(pooled["scheme"].unique()).get)
    fig, axes = new_figure(width=5.0 * len(probes) + 2.5, height=max(4.6, 0.22 * len(schemes) + 1.0),
                           ncols=len(probes), sharey=True)  # as tall as its legend
    axes = axes if len(probes) > 1 else [axes]
    looks = styles(schemes)
    bands = len(schemes) <= BANDS_UP_TO
    for ax, probe in zip(axes, probes):
        part = pooled[pooled["probe"] == probe]
        for scheme in [s for s in schemes if s in set(part["scheme"])]:
            g = part[part["scheme"] == scheme].sort_values("eval_len")
            st = looks[scheme]
            ax.plot(g["eval_len"], g["accuracy"], label=scheme, linewidth=1.8, markersize=5, **st)
            if bands and g["accuracy_low"].notna().any() and len(g) > 1:
                ax.fill_between(g["eval_len"], g["accuracy_low"].fillna(g["accuracy"]),
                                g["accuracy_high"].fillna(g["accuracy"]), color=st["color"], alpha=0.12, linewidth=0)
        chance = _chance(probe, raw[raw["probe"] == probe]) if raw is not None else None
        if chance is not None:
            ax.axhline(chance, color="0.3", linestyle="--", linewidth=1)
            ax.annotate(f"chance {chance:g}", (0, chance), xycoords=("axes fraction", "data"), xytext=(4, 3),
                        textcoords="offset points", fontsize=9, color="0.3")
        _mark_train_len(ax, part["train_len"].unique())
        ax.set_xscale("log", base=2)
        ticks = sorted(set(part["eval_len"].unique()) | set(part["train_len"].unique()))
        ax.set_xlim(ticks[0] / 1.15, ticks[-1] * 1.15)  # the training length inside, where 1x has no accuracy
        ax.set_xticks(ticks)
        ax.get_xaxis().set_major_formatter(lambda x, _: f"{int(x):,}")
        ax.minorticks_off()
        ax.set_ylim(-0.02, 1.05)
        ax.set_xlabel("evaluation length (tokens, log2 scale)")
        ax.set_title(probe)
    axes[0].set_ylabel("accuracy (teacher-forced, pooled over depths / distances)")
    fig.suptitle("Retrieval accuracy vs evaluation length (mean over seeds" + (", 95% interval band)" if bands else
                 f"; intervals in the tables: no bands for more than {BANDS_UP_TO} schemes)"))
    finish(fig, axes[-1], path, legend_title="scheme")
    return True


def plot_repeat_gain(cells: pd.DataFrame, path: Path) -> bool:
    """The repeat gain (nats) vs the distance to the first copy (log2 x), one panel per evaluation length (four a
    row), one line per scheme (mean over seeds, its interval a band), 0 and the training length marked. False
    where no repeat cell has a gain."""
    rep = cells[(cells["probe"] == "repeat") & cells["gain"].notna()]
    if rep.empty:
        return False
    lengths = sorted(rep["eval_len"].unique())
    rows = -(-len(lengths) // 4)  # four a row at most, the rows as even as they can be (5: 3 + 2)
    fig, axes = _grid(len(lengths), -(-len(lengths) // rows), 4.2, 3.4, sharex=True)
    plt.rcParams.update({"font.size": 10})
    schemes = sorted(rep["scheme"].unique(), key=scheme_order(rep["scheme"].unique()).get)
    looks = styles(schemes)
    bands = len(schemes) <= BANDS_UP_TO
    ticks = sorted(rep.loc[rep["eval_len"] == lengths[-1], "at"].unique())  # the longest window's distances
    low = pd.concat([rep["gain"], rep["gain_low"].dropna()]).min()  # one y range for every panel: bands included
    high = pd.concat([rep["gain"], rep["gain_high"].dropna()]).max()
    pad = 0.05 * max(high - low, 1e-3)
    for ax, L in zip(axes, lengths):
        part = rep[rep["eval_len"] == L]
        for scheme in [s for s in schemes if s in set(part["scheme"])]:
            g = part[part["scheme"] == scheme].sort_values("at")
            st = looks[scheme]
            ax.plot(g["at"], g["gain"], label=scheme, linewidth=1.6, markersize=4, **st)
            if bands and g["gain_low"].notna().any() and len(g) > 1:
                ax.fill_between(g["at"], g["gain_low"].fillna(g["gain"]), g["gain_high"].fillna(g["gain"]),
                                color=st["color"], alpha=0.12, linewidth=0)
        ax.axhline(0.0, color="0.4", linewidth=1)
        _mark_train_len(ax, part["train_len"].unique())
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks)
        ax.get_xaxis().set_major_formatter(lambda x, _: f"{int(x):,}")
        ax.tick_params(axis="x", labelrotation=45, labelbottom=True)
        ax.minorticks_off()
        ax.grid(True, alpha=0.3)
        ax.set_ylim(low - pad, high + pad)
        ax.set_title(f"window {int(L):,}", fontsize=10)
    fig.supxlabel("distance from the first copy to the second (tokens, log2 scale)", fontsize=10)
    fig.supylabel("repeat gain: NLL without − with the first copy (nats)", fontsize=10)
    fig.suptitle("Repeat gain vs distance (mean over seeds" + (", 95% interval band" if bands else
                 f"; intervals in the tables: no bands for more than {BANDS_UP_TO} schemes") + "; above 0: the model "
                 "copies)", fontsize=11)
    handles, names = axes[-1].get_legend_handles_labels()
    by = dict(zip(names, handles))
    for ax in axes:  # every scheme, also one missing from the last panel
        by.update(dict(zip(*ax.get_legend_handles_labels()[::-1])))
    fig.legend([by[s] for s in schemes if s in by], [s for s in schemes if s in by], title="scheme",
               loc="outside right upper", frameon=False)
    fig.savefig(path)
    plt.close(fig)
    return True
