"""`lenx report`: the comparison table and figures from a results directory."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .errors import LenxError
from .io import write_text
from .plots import finish, new_figure, style


def read_results(results_dir: Path) -> pd.DataFrame:
    for name in ("results.parquet", "results.csv"):
        path = results_dir / name
        if path.exists():
            try:
                df = pd.read_parquet(path) if name.endswith("parquet") else pd.read_csv(path)
            except Exception:
                raise LenxError(f"{path} is unreadable; rerun `lenx eval` to rebuild it") from None
            if df.empty:
                break
            return df
    raise LenxError(f"no results in {results_dir}/; run `lenx eval` first")


def label(df: pd.DataFrame) -> pd.Series:
    """Scheme label: the scheme, plus the RoPE extension when one was used at evaluation."""
    scaling = df["rope_scaling"].fillna("none").astype(str)
    return df["pe"].where(scaling == "none", df["pe"] + "+" + scaling)


PROTOCOL_ORDER = ("nonoverlap", "sliding", "truncate")


def protocol_label(df: pd.DataFrame) -> pd.Series:
    """'nonoverlap', 'sliding (stride 64)' / 'sliding (stride L/2)', 'truncate'."""
    protocol = df["protocol"].fillna("nonoverlap").astype(str)
    stride = df["stride"] if "stride" in df else pd.Series(float("nan"), index=df.index)
    half = stride == df["eval_len"] // 2
    text = protocol.where(protocol != "sliding", "sliding (stride " + stride.astype("Int64").astype(str) + ")")
    return text.where(~((protocol == "sliding") & half.groupby(protocol).transform("all")), "sliding (stride L/2)")


def protocols(df: pd.DataFrame) -> list[str]:
    found = list(dict.fromkeys(protocol_label(df)))
    return sorted(found, key=lambda p: (next((i for i, o in enumerate(PROTOCOL_ORDER) if p.startswith(o)), 9), p))


def ppl_table(df: pd.DataFrame) -> pd.DataFrame:
    """scheme x eval_len: mean ppl over seeds (empty where the scheme cannot represent the length)."""
    df = df.assign(scheme=label(df))
    return df.pivot_table(index="scheme", columns="eval_len", values="ppl", aggfunc="mean", dropna=False)


def _fmt(x) -> str:
    return "—" if pd.isna(x) else f"{x:.2f}"


def markdown_table(table: pd.DataFrame, train_len: int | None) -> str:
    cols = list(table.columns)
    head = "| scheme | " + " | ".join(f"{c} ({c / train_len:g}×)" if train_len else str(c) for c in cols) + " |"
    lines = [head, "|---" * (len(cols) + 1) + "|"]
    for scheme, row in table.iterrows():
        lines.append(f"| {scheme} | " + " | ".join(_fmt(row[c]) for c in cols) + " |")
    return "\n".join(lines)


_DASHES = ["-", "--", ":", "-."]


def plot_ppl_vs_length(df: pd.DataFrame, path: Path) -> None:
    fig, ax = new_figure()
    df = df.assign(_protocol=protocol_label(df))
    order = protocols(df)
    for n, protocol in enumerate(order):
        for scheme, row in ppl_table(df[df["_protocol"] == protocol]).iterrows():
            row = row.dropna()
            if row.empty:
                continue
            st = style(scheme)
            if len(order) > 1:
                st["linestyle"] = _DASHES[n % len(_DASHES)]
            name = scheme if len(order) == 1 else f"{scheme}, {protocol}"
            ax.plot(row.index, row.values, label=name, linewidth=2, markersize=6, **st)
    for L in sorted(df["train_len"].unique()):
        ax.axvline(L, color="black", linestyle=":", linewidth=1)
        ax.annotate(f"train length {L}", (L, 1), xycoords=("data", "axes fraction"), xytext=(4, -14),
                    textcoords="offset points", fontsize=9)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("evaluation length (tokens, log2 scale)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title("Perplexity vs evaluation length")
    ax.set_xticks(sorted(df["eval_len"].unique()))
    ax.get_xaxis().set_major_formatter(lambda x, _: f"{int(x):,}")
    finish(fig, ax, path, legend_title="scheme")


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
    schemes = list(dict.fromkeys(pos["scheme"]))
    for ax, protocol in zip(axes, order):
        part = pos[pos["_protocol"] == protocol].assign(weighted=lambda d: d["nll"] * d["tokens"])
        agg = part.groupby(["scheme", "bucket_start", "bucket_end"], as_index=False)[["weighted", "tokens"]].sum()
        for scheme in [s for s in schemes if s in set(agg["scheme"])]:
            a = agg[agg["scheme"] == scheme].sort_values("bucket_start")
            centre = (a["bucket_start"] + a["bucket_end"]) / 2
            ax.plot(centre, a["weighted"] / a["tokens"], label=scheme, linewidth=2, markersize=5, **style(scheme))
        for L in sorted(part["train_len"].unique()):
            ax.axvline(L, color="black", linestyle=":", linewidth=1)
            ax.annotate(f"train length {L}", (L, 1), xycoords=("data", "axes fraction"), xytext=(4, -14),
                        textcoords="offset points", fontsize=9)
        lens = sorted(part["eval_len"].unique())
        ax.set_xscale("log", base=2)
        ax.set_xlabel("position in the window (tokens, bucket centres, log2 scale)")
        ax.set_title(f"{protocol}, window {', '.join(f'{n:,}' for n in lens)}", fontsize=11)
        ax.get_xaxis().set_major_formatter(lambda x, _: f"{int(x):,}" if x >= 1 else f"{x:g}")
    axes[0].set_ylabel("mean NLL (nats per token)")
    fig.suptitle("Loss by position in the evaluation window (longest evaluated length)")
    finish(fig, axes[-1], path, legend_title="scheme")


def report(results_dir: str | Path = "results", out: str | Path | None = None) -> Path:
    results_dir = Path(results_dir)
    out = Path(out) if out else results_dir
    df = read_results(results_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_lens = sorted(df["train_len"].unique())
    train_len = int(train_lens[0]) if len(train_lens) == 1 else None
    plot_ppl_vs_length(df, out / "ppl_vs_length.png")
    by_position = read_by_position(results_dir)
    if by_position is not None:
        plot_loss_by_position(by_position, out / "loss_by_position.png")
    n_seeds = df.groupby("pe")["seed"].nunique().max()
    df = df.assign(_protocol=protocol_label(df))
    order = protocols(df)
    notes = df[df["note"].fillna("").astype(str) != ""][["run", "eval_len", "protocol", "note"]]
    notes = notes.drop_duplicates(["run", "protocol"])
    md = [
        "# lenx report",
        "",
        f"Perplexity on the test split ({', '.join(sorted(df['dataset'].astype(str).unique()))}), "
        f"mean over {n_seeds} seed(s). Columns: evaluation length (multiple of the training length). "
        "'—': the scheme cannot represent that length (or no test document is that long, for truncate).",
    ]
    for protocol in order:
        md += ["", f"Protocol: {protocol}", "", markdown_table(ppl_table(df[df["_protocol"] == protocol]), train_len)]
    md += ["", "![perplexity vs length](ppl_vs_length.png)"]
    if by_position is not None:
        md += ["", "Loss by position in the window (results_by_position.csv), at the longest length:", "",
               "![loss by position](loss_by_position.png)"]
    if len(notes):
        md += ["", "Notes:", ""] + [f"- {r.run}, {r.protocol}, from {r.eval_len}: {r.note}" for r in notes.itertuples()]
    write_text(out / "report.md", "\n".join(md) + "\n")
    return out / "report.md"
