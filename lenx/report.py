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


def tokenizers(df: pd.DataFrame) -> list[str]:
    return sorted(df["tokenizer"].fillna("byte").astype(str).unique()) if "tokenizer" in df else ["byte"]


def label(df: pd.DataFrame) -> pd.Series:
    """Scheme label: the scheme, plus the RoPE extension when one was used at evaluation, plus the
    tokenizer when the results mix tokenizers."""
    scaling = df["rope_scaling"].fillna("none").astype(str)
    lab = df["pe"].where(scaling == "none", df["pe"] + "+" + scaling)
    if len(tokenizers(df)) > 1:
        lab = lab + " [" + df["tokenizer"].fillna("byte").astype(str) + "]"
    return lab


def ppl_table(df: pd.DataFrame, values: str = "ppl") -> pd.DataFrame:
    """scheme x eval_len: mean ppl (or bpb) over seeds (empty where the scheme cannot represent the length)."""
    df = df.assign(scheme=label(df))
    return df.pivot_table(index="scheme", columns="eval_len", values=values, aggfunc="mean", dropna=False)


def _fmt(x, digits: int = 2) -> str:
    return "—" if pd.isna(x) else f"{x:.{digits}f}"


def markdown_table(table: pd.DataFrame, train_len: int | None, bpb: pd.DataFrame | None = None) -> str:
    """Perplexities; with `bpb`, each cell is 'ppl (bits per byte)'."""
    cols = list(table.columns)
    head = "| scheme | " + " | ".join(f"{c} ({c / train_len:g}×)" if train_len else str(c) for c in cols) + " |"
    lines = [head, "|---" * (len(cols) + 1) + "|"]
    for scheme, row in table.iterrows():
        cells = [_fmt(row[c]) + (f" ({_fmt(bpb.loc[scheme, c], 3)})" if bpb is not None and not pd.isna(row[c]) else "")
                 for c in cols]
        lines.append(f"| {scheme} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_ppl_vs_length(df: pd.DataFrame, path: Path) -> None:
    table = ppl_table(df)
    fig, ax = new_figure()
    for scheme, row in table.iterrows():
        row = row.dropna()
        if row.empty:
            continue
        ax.plot(row.index, row.values, label=scheme, linewidth=2, markersize=6, **style(scheme))
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


def report(results_dir: str | Path = "results", out: str | Path | None = None) -> Path:
    results_dir = Path(results_dir)
    out = Path(out) if out else results_dir
    df = read_results(results_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_lens = sorted(df["train_len"].unique())
    train_len = int(train_lens[0]) if len(train_lens) == 1 else None
    table = ppl_table(df)
    toks = tokenizers(df)
    bpb = ppl_table(df, "bpb") if len(toks) > 1 else None
    plot_ppl_vs_length(df, out / "ppl_vs_length.png")
    n_seeds = df.groupby("pe")["seed"].nunique().max()
    notes = df[df["note"].fillna("").astype(str) != ""][["run", "eval_len", "note"]].drop_duplicates("run")
    md = [
        "# lenx report",
        "",
        f"Perplexity on the test split ({', '.join(sorted(df['dataset'].astype(str).unique()))}), "
        f"protocol {', '.join(sorted(df['protocol'].unique()))}, mean over {n_seeds} seed(s). "
        "Columns: evaluation length (multiple of the training length). '—': the scheme cannot represent that length."
        + (f" The runs use different tokenizers ({', '.join(toks)}): perplexity per token does not compare across "
           "them, so each cell also gives bits per UTF-8 byte of the scored text in parentheses; compare those."
           if bpb is not None else ""),
        "",
        markdown_table(table, train_len, bpb),
        "",
        "![perplexity vs length](ppl_vs_length.png)",
    ]
    if len(notes):
        md += ["", "Notes:", ""] + [f"- {r.run} from {r.eval_len}: {r.note}" for r in notes.itertuples()]
    write_text(out / "report.md", "\n".join(md) + "\n")
    return out / "report.md"
