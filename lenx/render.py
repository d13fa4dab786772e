"""The report as text: the Markdown tables and sections of report.md, the self-contained report.html rendered
from that Markdown (by markdown-it-py, figures embedded), and the summary on the terminal (rich)."""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .stats import (KEEPS, KEPT, RETRIEVES, ProbeTables, as_text, farthest_gain, label, protocol_label, ranking,
                    retrieval, tokenizers)

# ---------------------------------------------------------------- cells and tables


def _fmt(x, digits=2) -> str:
    """A table's number: fixed decimals, or three significant digits far from that range (a diverged model's
    perplexity of 1e19 would take twenty digits; an interval bound of 1e-5 would read '0.00', a zero that a
    perplexity never reaches)."""
    if pd.isna(x):
        return "—"
    return f"{x:.{digits}f}" if x == 0 or 0.01 <= abs(x) < 1e6 else f"{x:.3g}"


def ppl_cell(r) -> str:
    return _fmt(r.ppl) + ("" if pd.isna(r.ppl_low) else f" [{_fmt(r.ppl_low)}–{_fmt(r.ppl_high)}]")


GAIN_USED = 0.01  # nats per token: a context gain above it is read as the model using the longer context


def gain_cell(r) -> str:
    """'+0.012' or '+0.012 [-0.004–0.028]' (nats), '–' where not measured."""
    if pd.isna(r.context_gain):
        return "–"
    out = f"{r.context_gain:+.3f}"
    return out + (f" [{r.context_gain_low:+.3f}–{r.context_gain_high:+.3f}]" if pd.notna(r.context_gain_low) else "")


def acc_cell(r, metric: str = "accuracy") -> str:
    """'0.85 [0.78–0.90]' (a share: accuracy, exact_match), '0.85' without an interval, '—' where not measured."""
    x, low, high = (getattr(r, metric), getattr(r, f"{metric}_low"), getattr(r, f"{metric}_high"))
    if pd.isna(x):
        return "—"
    return f"{x:.2f}" + ("" if pd.isna(low) else f" [{low:.2f}–{high:.2f}]")


def repeat_gain_cell(r) -> str:
    """A repeat gain (nats) and its interval: '+0.412 [0.301–0.523]', '—' where not measured."""
    if pd.isna(r.gain):
        return "—"
    return f"{r.gain:+.3f}" + ("" if pd.isna(r.gain_low) else f" [{r.gain_low:+.3f}–{r.gain_high:+.3f}]")


def rel_cell(r) -> str:
    return _fmt(r.rel_1x) + ("" if pd.isna(r.rel_1x_low) else f" [{_fmt(r.rel_1x_low)}–{_fmt(r.rel_1x_high)}]")


def wide(summary: pd.DataFrame, cell) -> pd.DataFrame:
    """scheme x eval_len table of strings (one protocol), `cell(row)` per entry."""
    schemes = list(dict.fromkeys(summary["scheme"]))
    lengths = sorted(summary["eval_len"].unique())
    table = pd.DataFrame("", index=schemes, columns=lengths)
    for r in summary.itertuples():
        table.loc[r.scheme, r.eval_len] = cell(r)
    return table


def column_names(summary: pd.DataFrame) -> dict:
    train_lens = summary["train_len"].unique()
    if len(train_lens) != 1:
        return {L: str(L) for L in summary["eval_len"].unique()}
    return {L: length_label(L, train_lens[0]) for L in summary["eval_len"].unique()}


def length_label(L: int, train_len: int) -> str:
    """'1012 (1.98×)': an evaluation length and its multiple of the training length, to three digits."""
    return f"{L} ({L / train_len:.3g}×)"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|---" * len(header) + "|",
                      *("| " + " | ".join(row) + " |" for row in rows)])


def to_markdown(table: pd.DataFrame, names: dict) -> str:
    return markdown_table(["scheme", *(names.get(c, str(c)) for c in table.columns)],
                          [[str(idx), *map(str, row)] for idx, row in table.iterrows()])


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


# ---------------------------------------------------------------- the answer


@dataclass
class Headline:
    """The report's answer for one protocol: a paragraph and a ranking table (header, rows of cells)."""
    text: str
    columns: list[str]
    rows: list[list[str]]

    def markdown(self) -> str:
        return markdown_table(self.columns, self.rows)


def answer(part: pd.DataFrame, protocol: str, seeds: str, probes: ProbeTables | None = None) -> Headline | None:
    """The report's headline for one protocol: at the longest multiple of the training length evaluated, every
    scheme ranked by its perplexity relative to its own at 1x, with the perplexities at both; which schemes stayed
    within `KEPT` of 1x, which was lowest there, and which have no perplexity there. With `probes`, beside it the
    passkey accuracy at 1x and at the longest length probed and the repeat gain there (`probe_columns`), and which
    schemes flat in perplexity stop retrieving. None when no scheme has both numbers."""
    found = ranking(part)
    if found is None:
        return None
    M, ranked, lens = found.multiple, found.ranked, found.lengths
    where = (f"{M:g}× the training length ({lens[0]:,} tokens)" if len(lens) == 1
             else f"{M:g}× each run's training length")
    gain = "context_gain" in ranked and ranked["context_gain"].notna().any()
    rows = [[str(i), scheme, _fmt(found.base.get(scheme)), ppl_cell(r), rel_cell(r)] + ([gain_cell(r)] if gain else [])
            for i, (scheme, r) in enumerate(ranked.iterrows(), 1)]
    lines = [f"At {where}, {protocol}, over {seeds}: every scheme's perplexity there divided by its own at 1× "
             "(1.00: the longer context costs nothing; below 1: it helps), best first"
             + (", with 95% intervals over seeds [low–high]." if ranked["rel_1x_low"].notna().any() else
                ". One seed: no intervals, and differences of a few percent may be seed-to-seed variation; "
                "train more seeds (`seeds:` in a sweep config) before reading them.")]
    lines.append(f"Within {KEPT - 1:.0%} of their 1× perplexity at {M:g}×: "
                 + (", ".join(found.kept) if found.kept else "none")
                 + f". Lowest perplexity at {M:g}×: {found.best} ({_fmt(ranked.loc[found.best, 'ppl'])}).")
    if gain:
        lines.append(f"Context gain: over the tokens past each window's first training length, their mean NLL with "
                     f"only a 1× context minus with the whole {M:g}× window, paired token by token (nats; above 0 the "
                     "model uses the longer context, 0 it ignores it, below 0 it is hurt by it).")
        flat = [s for s in found.kept if not ranked.loc[s, "context_gain"] > GAIN_USED]
        if flat:
            lines.append(f"Flat in perplexity but gaining at most {GAIN_USED} nats from the longer context: "
                         + ", ".join(flat) + ".")
    extra, cells, blocks = probe_columns(probes, list(ranked.index), found.kept)
    rows = [row + cells[scheme] for row, scheme in zip(rows, ranked.index)]
    if found.unranked:
        why = {"no 1x": "no 1× perplexity to divide by", "not evaluated": f"not evaluated at {M:g}×"}
        lines.append("Not ranked: " + "; ".join(f"{s} ({note or why[reason]})"
                                                for s, (reason, note) in found.unranked.items()) + ".")
    return Headline("\n\n".join([" ".join(lines), *blocks]),
                    ["rank", "scheme", "ppl at 1×", f"ppl at {M:g}×", f"{M:g}× ÷ 1×"]
                    + ([f"context gain at {M:g}×"] if gain else []) + extra, rows)


def _multiple_text(multiples) -> str:
    found = sorted(set(round(float(m), 9) for m in multiples))
    return f"{found[0]:g}×" if len(found) == 1 else "its shortest length probed"


INTERVALS = ("[low–high]: 95% interval over seeds (Student t); where a scheme has one seed, Wilson's over its key "
             "tokens (which counts the tokens of one trial as independent draws, so it is narrower than one over "
             "trials would be)")


OVER_SEEDS = "[low–high]: 95% interval over seeds (Student t)"


def probe_columns(probes: ProbeTables | None, schemes: list[str], kept: list[str] | None
                  ) -> tuple[list[str], dict, list[str]]:
    """The headline's probe columns for `schemes` (header, scheme -> cells, Markdown blocks of text): the passkey
    accuracy at 1x (or the shortest length probed) and at the longest length probed, with their intervals; the
    repeat gain at the longest length at its farthest distance. `kept`: the schemes flat in perplexity (None: no
    perplexity results). Nothing where no probe has a number."""
    header, cells, lines = [], {s: [] for s in schemes}, []
    if probes is None:
        return header, cells, lines
    found = retrieval(probes.pooled)
    if found is not None:
        M, refs = found.multiple, [r.multiple for r in found.ref.values()]
        ref = _multiple_text(refs) if refs else "1×"
        no_1x = " (the shortest length with a passkey accuracy: none at 1×, see the notes)" if ref != "1×" else ""
        header += [f"passkey at {ref}", f"passkey at {M:g}×"]
        for s in schemes:
            cells[s] += [acc_cell(found.ref[s]) if s in found.ref else "—",
                         acc_cell(found.at[s]) if s in found.at else "—"]
        one = (probes.pooled.loc[probes.pooled["probe"] == "passkey", "interval"] == "one seed").any()
        rule, *verdicts = retrieval_lines(found, ref, kept, no_1x, INTERVALS if one else OVER_SEEDS)
        lines.append(rule + "\n\n" + "\n".join(f"- {v}" for v in verdicts))
    gains = farthest_gain(probes.cells)
    if gains is not None:
        Mg, at = gains
        header.append(f"repeat gain at {Mg:g}×")
        for s in schemes:
            cells[s].append(repeat_gain_cell(at[s]) if s in at else "—")
        d = sorted({int(r["at"]) for r in at.values()})
        lines.append(f"Repeat gain at {Mg:g}×: a segment's NLL at its second copy without the first copy minus with "
                     f"it, the first copy {', '.join(map(str, d))} tokens back (the farthest distance probed: nearly "
                     "the whole window), nats; above 0 the model copies from that far back, 0 it does not.")
    return header, cells, lines


def retrieval_lines(found, ref: str, kept: list[str] | None, why_ref: str = "", intervals: str = INTERVALS
                    ) -> list[str]:
    """The paragraph's lines on passkey retrieval: the rule, then which schemes (flat in perplexity or not) stop
    retrieving, which keep retrieving, and which never retrieved at all."""
    M = found.multiple
    by = {v: [s for s, w in found.verdict.items() if w == v] for v in ("keeps", "stops", "never", "unmeasured")}

    def named(schemes):
        return ", ".join(f"{s} ({found.at[s].accuracy:.2f} at {M:g}× vs {found.ref[s].accuracy:.2f} at "
                         f"{found.ref[s].multiple:g}×)" for s in schemes)

    lines = [f"Passkey: the share of the key's tokens that are the model's argmax (teacher-forced), pooled over "
             f"depths; {intervals}. Rule: a scheme keeps retrieving at {M:g}× when its accuracy there is at least "
             f"{KEEPS:.0%} of its own at {ref}{why_ref}, and it counts as retrieving at all only with at least "
             f"{RETRIEVES:g} at {ref}."]
    if kept is not None:
        flat = [s for s in by["stops"] if s in kept]
        rest = [s for s in by["stops"] if s not in kept]
        if flat:
            lines.append(f"Flat in perplexity but no longer retrieving at {M:g}×: {named(flat)}.")
        elif any(s in kept for s in by["keeps"]):
            lines.append(f"No scheme flat in perplexity stops retrieving at {M:g}×.")
        if rest:
            lines.append(f"No longer retrieving at {M:g}×, nor flat in perplexity: {named(rest)}.")
    elif by["stops"]:
        lines.append(f"No longer retrieving at {M:g}×: {named(by['stops'])}.")
    if by["keeps"] or by["stops"]:
        lines.append(f"Still retrieving at {M:g}×: {named(by['keeps']) if by['keeps'] else 'none'}.")
    if by["never"]:
        lines.append(f"Not retrieving even at {ref} (accuracy below {RETRIEVES:g}; their passkey numbers say nothing "
                     "about length): " + ", ".join(f"{s} ({found.ref[s].accuracy:.2f})" for s in by["never"]) + ".")
    if by["unmeasured"]:
        lines.append(f"No passkey verdict (no accuracy at {M:g}×, or none shorter to compare with): "
                     + ", ".join(f"{s} ({found.notes[s]})" if s in found.notes else s for s in by["unmeasured"]) + ".")
    return lines


def probe_answer(probes: ProbeTables) -> Headline | None:
    """The headline of a results directory with probes but no perplexity results: each scheme's passkey accuracy
    and repeat gain (`probe_columns`), in the tables' order. None where no probe has a number."""
    schemes = list(dict.fromkeys(probes.pooled["scheme"]))
    header, cells, lines = probe_columns(probes, schemes, None)
    if not header:
        return None
    text = "\n\n".join(["No perplexity results here (no results.csv): the retrieval probes alone; `lenx eval` "
                        "without --no-perplexity adds the perplexity ranking.", *lines])
    return Headline(text, ["scheme"] + header, [[s] + cells[s] for s in schemes])


def headline(summary: pd.DataFrame | None, probes: ProbeTables | None = None) -> Headline | None:
    """The answer for the first protocol (nonoverlap, where it was evaluated: protocols sort it first), with the
    probes beside it; the probes' alone where there is no perplexity summary."""
    if summary is None:
        return probe_answer(probes) if probes is not None else None
    part = summary[summary["protocol"] == summary["protocol"].iloc[0]]
    return answer(part, part["protocol"].iloc[0], seeds_text(part), probes)


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


# ---------------------------------------------------------------- sections


@dataclass
class Section:
    title: str
    text: str = ""
    table: str = ""  # Markdown table
    image: str = ""  # file name beside the report


def perplexity_sections(part: pd.DataFrame, protocol: str, df: pd.DataFrame, names: dict) -> list[Section]:
    """One protocol's tables: perplexity, its ratio to 1x, and bits per byte where tokenizers differ."""
    no_1x = part["rel_1x"].isna() & part["ppl"].notna()  # a ppl but no 1x row to divide by
    sections = [
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
                "seeds' log ratios)." if part["rel_1x_low"].notna().any() else "") + (" Blank: the training length "
                "itself was not evaluated for these seeds (add it to --lengths)." if no_1x.any() else ""),
                to_markdown(wide(part, lambda r: "" if no_1x[r.Index] else rel_cell(r)), names)),
    ]
    if len(tokenizers(df)) > 1:
        sections.append(Section(f"Bits per byte ({protocol})", "Tokenizers differ between runs: bits per UTF-8 "
                                "byte compares them fairly.", to_markdown(wide(part, lambda r: _fmt(r.bpb, 3)), names)))
    return sections


def variants_section(df: pd.DataFrame) -> list[Section]:
    """Which runs each tagged label pools, where runs of one scheme were trained differently."""
    runs = df.assign(scheme=label(df)).groupby("scheme", sort=False)["run"].unique()
    tagged = [s for s in runs.index if s.endswith(")")]
    if not tagged:
        return []
    return [Section("Training variants", "Runs of one scheme trained differently are not pooled: "
                    "L<n> in the tag is the training length n, a hex tag the fingerprint of the training config "
                    "apart from the seed (results column config_id).\n"
                    + "\n".join(f"- {s}: {', '.join(map(str, runs[s]))}" for s in sorted(tagged)))]


def figure_sections(figures: set[str], perplexity: bool = True) -> list[Section]:
    """The figures drawn (file names beside the report), each under its heading; `perplexity` False: only the
    training loss (a report of probes alone)."""
    sections = [Section("Perplexity vs length", image="ppl_vs_length.png")] if perplexity else []
    if "loss_by_position.png" in figures:
        sections.append(Section("Loss by position", "Mean NLL by position inside the window "
                                "(results_by_position.csv), at each run's longest evaluated length: where a scheme "
                                "breaks.", image="loss_by_position.png"))
    if "context_gain.png" in figures:
        sections.append(Section("Context gain by position", "For each position bucket of the longest nonoverlap "
                                "window, its tokens' NLL with only a 1× context minus with the whole window, paired "
                                "token by token (results_by_position.csv, column context_gain): where the tokens "
                                "past the training length gain from the longer context (above 0) or lose (below 0).",
                                image="context_gain.png"))
    if "training_loss.png" in figures:
        sections.append(Section("Training loss", image="training_loss.png"))
    return sections


def notes_section(summary: pd.DataFrame, df: pd.DataFrame) -> list[Section]:
    notes = note_lines(summary)
    if ((as_text(df["rope_scaling"], "none") == "dynamic-ntk") & df["rope_factor"].isna()).any():
        notes.append("- dynamic-ntk: every scored window is as long as its evaluation length, so dynamic NTK (s = "
                     "window length / training length) is NTK-aware scaling at s = evaluation length / training "
                     "length, and its rows equal ntk's; the two differ only where a sequence grows token by token "
                     "(generation with a cache).")
    return [Section("Notes", "\n".join(notes))] if notes else []


def provenance_section(prov: dict, df: pd.DataFrame, config, results_dir: Path) -> Section:
    """Versions, commit, device and data of the results; the first run's training config, or where its run.json
    was looked for; the sweep config the results came from."""
    lines = "\n".join(f"- {k}: {', '.join(map(str, v)) if isinstance(v, list) else v}"
                      for k, v in prov.items() if k != "training_config" and v is not None)
    if prov["training_config"] is not None:
        lines += ("\n\nTraining config of the first run:\n\n```json\n" + json.dumps(prov["training_config"], indent=1)
                  + "\n```")
    elif df["seed"].notna().any():  # lenx runs (an HF model's seed is empty) whose run_dir is not found from here
        where = ", ".join(map(str, df.loc[df["seed"].notna(), "run_dir"].dropna().unique()[:3]))
        lines += (f"\n\nNo run.json found (run_dir: {where}, from {Path.cwd()}): torch version, git commit, device "
                  "name, training config and training curves are in the run directories (looked for from here and "
                  f"beside {results_dir}); run `lenx report` where `lenx eval` ran.")
    if config is not None:
        lines += f"\n\nSweep config `{config.path}`:\n\n```yaml\n{config.path.read_text().strip()}\n```"
    return Section("Provenance", lines)


# ---------------------------------------------------------------- Markdown and HTML


def render_markdown(title: str, sections: list[Section], image_src=str) -> str:
    """report.md; `image_src(file name)` is where each figure's image link points."""
    parts = [f"# {title}"]
    for s in sections:
        parts.append(f"## {s.title}")
        parts += [x for x in (s.text, s.table) if x]
        if s.image:
            parts.append(f"![{s.title}]({image_src(s.image)})")
    return "\n\n".join(parts) + "\n"


def markdown_to_html(md: str) -> str:
    """CommonMark with pipe tables; raw HTML off, so a scheme label or a note with '<' stays text."""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False}).enable("table").render(md)


_CSS = ("body{font-family:system-ui,sans-serif;max-width:1280px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "th:first-child,td:first-child{text-align:left}td{white-space:nowrap}"
        "table{display:block;overflow-x:auto;max-width:100%}img{max-width:100%}pre{background:#f6f6f6;padding:1em;"
        "overflow-x:auto}")


def render_html(title: str, sections: list[Section], out: Path) -> str:
    """One self-contained file: the report's Markdown as HTML, styles inline, figures embedded as base64."""
    def embedded(name: str) -> str:
        return "data:image/png;base64," + base64.b64encode((out / name).read_bytes()).decode()

    body = markdown_to_html(render_markdown(title, sections, image_src=embedded))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>\n{body}</body></html>\n")


# ---------------------------------------------------------------- published numbers and notes


def published_table(summary: pd.DataFrame, published: Path, df: pd.DataFrame) -> str:
    """The paper's numbers beside ours, matched by scheme, training length and evaluation length (non-overlapping
    windows): 'lenx / paper' perplexity, then each side's ratio to its training length. What each side measured
    (the paper's `source`; our corpus, split, tokenizer) is said above the tables: perplexities of other
    tokenizations, splits or corpora are not comparable in value, their shapes are. A `note` column, where the
    file has one, stands in for a value the paper does not give (e.g. OOM)."""
    pub = pd.read_csv(published)
    pub = pub.assign(note=as_text(pub["note"], "") if "note" in pub else "")
    ours = summary[summary["protocol"] == "nonoverlap"]
    indexed = ours.set_index(["scheme", "train_len", "eval_len"])
    ppl, rel = indexed["ppl"], indexed["rel_1x"]
    source = next((str(x) for x in pub["source"] if pd.notna(x) and str(x).strip()), "") if "source" in pub else ""
    rows = df[as_text(df["protocol"], "nonoverlap") == "nonoverlap"]
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


def note_lines(summary: pd.DataFrame) -> list[str]:
    """One line per scheme, protocol and distinct note, with the lengths it applies to (a scheme's notes can differ
    from length to length: fewer documents qualify, then none)."""
    rank = {scheme: i for i, scheme in enumerate(dict.fromkeys(summary["scheme"]))}  # the tables' order of schemes
    lines = []
    for (scheme, protocol, note), g in summary[summary["note"] != ""].groupby(["scheme", "protocol", "note"]):
        lengths = sorted(set(g["eval_len"].astype(int)))
        lines.append((rank[scheme], protocol, lengths[0], f"- {scheme}, {protocol}, at {', '.join(map(str, lengths))}: {note}"))
    return [line for *_, line in sorted(lines, key=lambda t: t[:3])]


# ---------------------------------------------------------------- retrieval probes

_PROBE_TEXT = {
    "passkey": "Passkey retrieval (probes.csv): the share of the key's tokens that are the model's argmax given the "
               "true tokens before them (teacher-forced), pooled over the needle's depths",
    "mqar": "Multi-query associative recall (probes.csv): the share of queried values that are the model's argmax "
            "(teacher-forced), pooled over the distances from the pairs to the queries",
    "repeat": "Repetition (probes.csv): the share of a repeated segment's second-copy tokens that are the model's "
              "argmax (teacher-forced), pooled over the distances to the first copy",
}


def _probe_wide(part: pd.DataFrame, cell) -> pd.DataFrame:
    """wide(), with '—' also where a scheme has no row at a length (not probed there)."""
    return wide(part, cell).replace("", "—")


def probe_sections(probes: ProbeTables, figures: set[str]) -> list[Section]:
    """The probes' tables (scheme x length, pooled over depths or distances: accuracy for each probe, exact match
    for passkey, the gain for repeat), their notes and their figures."""
    pooled = probes.pooled
    names = column_names(pooled)
    one = INTERVALS + "; exact match: Wilson's over its trials" if (pooled["interval"] == "one seed").any() else \
        OVER_SEEDS
    sections = []
    for probe, part in pooled.groupby("probe", sort=False):
        seeds = seeds_text(part)
        sections.append(Section(f"Retrieval: {probe} accuracy", f"{_PROBE_TEXT.get(probe, probe)}, over {seeds}; "
                                f"{one}. Columns: evaluation length (multiple of the training length). '—': not "
                                "measured (see the notes below).", to_markdown(_probe_wide(part, acc_cell), names)))
        if probe == "passkey":
            sections.append(Section("Retrieval: passkey exact match", "The share of trials whose whole key greedy "
                                    "decoding reproduces (what papers report for pretrained models), pooled over "
                                    f"depths, over {seeds}.",
                                    to_markdown(_probe_wide(part, lambda r: acc_cell(r, "exact_match")), names)))
        if probe == "repeat":
            sections.append(Section("Retrieval: repeat gain", "The second copy's mean NLL without the first copy "
                                    "minus with it (nats, paired trial by trial), pooled over the distances to the "
                                    "first copy; above 0 the model copies. [low–high]: over seeds (Student t); with "
                                    "one seed, Student t over its trials.",
                                    to_markdown(_probe_wide(part, repeat_gain_cell), names)))
    notes = probe_note_lines(pooled)
    if notes:
        sections.append(Section("Retrieval: notes", "\n".join(notes)))
    if "passkey.png" in figures:
        sections.append(Section("Passkey accuracy by length and depth", "Teacher-forced accuracy per (evaluation "
                                "length, needle depth) cell, mean over seeds, one panel per scheme, one colour scale "
                                "for all (0 to 1); grey: not measured. Depth 0: the needle right after the task "
                                "line; 1: right before the question.", image="passkey.png"))
    if "retrieval_vs_length.png" in figures:
        sections.append(Section("Retrieval accuracy vs length", "Teacher-forced accuracy per probe, pooled over "
                                "depths or distances, mean over seeds (its 95% interval a band where at most six "
                                "schemes share a panel); the training "
                                "length and, where one is defined, chance (passkey with a byte tokenizer: one digit "
                                "in ten; mqar: one of the window's values) marked.", image="retrieval_vs_length.png"))
    if "repeat_gain.png" in figures:
        sections.append(Section("Repeat gain vs distance", "The repeat gain (nats) by the distance from the first "
                                "copy to the second, one panel per evaluation length, mean over seeds (its 95% "
                                "interval a band where at most six schemes share a panel); the training length "
                                "marked.", image="repeat_gain.png"))
    return sections


def probe_note_lines(pooled: pd.DataFrame) -> list[str]:
    """One line per scheme, probe and distinct note of an unmeasured cell, with its lengths."""
    lines = []
    for (scheme, probe, note), g in pooled[pooled["note"] != ""].groupby(["scheme", "probe", "note"], sort=False):
        lengths = sorted(set(g["eval_len"].astype(int)))
        lines.append(f"- {scheme}, {probe}, at {', '.join(map(str, lengths))}: {note}")
    return lines
