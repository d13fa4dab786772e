"""lenx.render: the report's cells, tables and answer as text, and report.html rendered from the Markdown."""

import base64
import re

import pandas as pd
import pytest

from lenx.render import (Section, _fmt, acc_cell, answer, markdown_table, markdown_to_html, probe_answer,
                         render_html, render_markdown, repeat_gain_cell, to_markdown)
from lenx.stats import ProbeTables, summarise, wilson


@pytest.mark.parametrize("x, text", [(42.4349, "42.43"), (0.0, "0.00"), (0.012, "0.01"), (2.5e19, "2.5e+19"),
                                     (4e-5, "4e-05"), (float("nan"), "—")])
def test_numbers_read_in_fixed_decimals_or_three_significant_digits(x, text):
    assert _fmt(x) == text


def test_tables_are_pipe_tables_with_the_scheme_column_first():
    assert markdown_table(["a", "b"], [["1", "2"]]) == "| a | b |\n|---|---|\n| 1 | 2 |"
    table = pd.DataFrame([["4.00", "5.00"]], index=["alibi"], columns=[16, 32])
    assert to_markdown(table, {16: "16 (1×)"}) == "| scheme | 16 (1×) | 32 |\n|---|---|---|\n| alibi | 4.00 | 5.00 |"


def test_html_tables_and_text_come_from_the_markdown_and_stay_text():
    """A pipe table becomes one HTML table; '<' in a label or a note is shown, never taken as a tag."""
    md = "A note on <b>x</b> [low–high].\n\n" + markdown_table(["scheme", "16"], [["a<i>", "1.00 [0.90–1.10]"]])
    html = markdown_to_html(md)
    assert html.count("<table>") == 1 and "<th>scheme</th>" in html and "<td>1.00 [0.90–1.10]</td>" in html
    assert "&lt;b&gt;x&lt;/b&gt;" in html and "<td>a&lt;i&gt;</td>" in html and "<b>" not in html


def test_html_report_is_one_file_with_its_figures_inside(tmp_path):
    png = b"\x89PNG\r\n\x1a\n not really an image"
    (tmp_path / "fig.png").write_bytes(png)
    sections = [Section("Summary", "First line.\n- a: 1\n- b: 2", markdown_table(["x"], [["1"]])),
                Section("Figure", image="fig.png"),
                Section("Provenance", 'Config:\n\n```json\n{"a": 1}\n```')]
    md = render_markdown("lenx report: t<1>", sections)
    assert "![Figure](fig.png)" in md and md.startswith("# lenx report: t<1>\n\n## Summary\n\nFirst line.")
    html = render_html("lenx report: t<1>", sections, tmp_path)
    assert "<title>lenx report: t&lt;1&gt;</title>" in html and "<h1>lenx report: t&lt;1&gt;</h1>" in html
    assert f'src="data:image/png;base64,{base64.b64encode(png).decode()}"' in html
    assert not re.search(r'src="(?!data:)', html)  # nothing the file would have to fetch
    assert "<li>a: 1</li>" in html and "<pre><code" in html and "&quot;a&quot;: 1" in html
    assert "<style>" in html and "border-collapse" in html


def test_answer_ranks_the_schemes_and_explains_the_rest():
    rows = [{"run": f"{pe}-s0", "pe": pe, "seed": 0, "train_len": 16, "eval_len": L, "ppl": p, "bpb": 2.0,
             "note": "", "rope_scaling": "none", "rope_factor": float("nan"), "tokenizer": "byte",
             "protocol": "nonoverlap", "stride": L, "dataset": "stdlib", "config_id": "c"}
            for pe, L, p in [("alibi", 16, 7.0), ("alibi", 64, 7.0), ("rope", 16, 6.0), ("rope", 64, 12.0),
                             ("t5", 64, 8.0)]]
    found = answer(summarise(pd.DataFrame(rows)), "nonoverlap", "1 seed(s)")
    assert found.columns == ["rank", "scheme", "ppl at 1×", "ppl at 4×", "4× ÷ 1×"]
    assert found.rows == [["1", "alibi", "7.00", "7.00", "1.00"], ["2", "rope", "6.00", "12.00", "2.00"]]
    assert found.text.startswith("At 4× the training length (64 tokens), nonoverlap, over 1 seed(s):")
    assert "One seed: no intervals" in found.text
    assert "Within 10% of their 1× perplexity at 4×: alibi. Lowest perplexity at 4×: alibi (7.00)." in found.text
    assert found.text.endswith("Not ranked: t5 (no 1× perplexity to divide by).")


# ---------------------------------------------------------------- the retrieval probes in the report


def _ppl_rows(ppl: dict, train_len=16) -> list[dict]:
    """Results rows: pe -> {eval_len: ppl}, seed 0."""
    return [{"run": f"{pe}-s0", "pe": pe, "seed": 0, "train_len": train_len, "eval_len": L, "ppl": p, "bpb": 2.0,
             "note": "", "rope_scaling": "none", "rope_factor": float("nan"), "tokenizer": "byte",
             "protocol": "nonoverlap", "stride": L, "dataset": "stdlib", "config_id": "c"}
            for pe, by_len in ppl.items() for L, p in by_len.items()]


def _probe_rows(acc: dict, gains: dict | None = None, seeds=(0,)) -> list[dict]:
    """Probes rows: passkey pe -> {eval_len: accuracy} at depths 0 and 1 (20 key tokens, 4 trials each); repeat
    pe -> {(eval_len, distance): gain}."""
    base = {"train_len": 16, "rope_scaling": "none", "rope_factor": float("nan"), "tokenizer": "byte",
            "dataset": "stdlib", "config_id": "c", "note": "", "gain": float("nan")}
    rows = [{**base, "run": f"{pe}-s{s}", "pe": pe, "seed": s, "eval_len": L, "probe": "passkey", "depth": d,
             "distance": float("nan"), "trials": 4, "answers": 20, "accuracy": a, "exact_match": 0.5, "key_nll": 1.0}
            for pe, by_len in acc.items() for L, a in by_len.items() for d in (0.0, 1.0) for s in seeds]
    rows += [{**base, "run": f"{pe}-s{s}", "pe": pe, "seed": s, "eval_len": L, "probe": "repeat", "depth": float("nan"),
              "distance": dist, "trials": 10, "answers": 40, "accuracy": 0.5, "exact_match": 0.0, "key_nll": 2.0,
              "gain": g, "gain_low": g - 0.1, "gain_high": g + 0.1}
             for pe, by in (gains or {}).items() for (L, dist), g in by.items() for s in seeds]
    return rows


def test_answer_shows_retrieval_beside_perplexity_and_says_who_stops_retrieving():
    """alibi is flat in perplexity (1.00) but its passkey accuracy falls from 0.90 to 0.30 (< half): named as
    flat but no longer retrieving; rope keeps 0.70 of 0.80; nope never retrieved (0.20 at 1x)."""
    summary = summarise(pd.DataFrame(_ppl_rows({"alibi": {16: 7.0, 64: 7.0}, "rope": {16: 6.0, 64: 12.0},
                                                "nope": {16: 9.0, 64: 9.5}})))
    probes = ProbeTables.of(pd.DataFrame(_probe_rows({"alibi": {16: 0.9, 64: 0.3}, "rope": {16: 0.8, 64: 0.7},
                                                      "nope": {16: 0.2, 64: 0.1}},
                                                     {"alibi": {(64, 8): 1.0, (64, 56): 0.05},
                                                      "rope": {(64, 56): 0.5}})))
    found = answer(summary, "nonoverlap", "1 seed(s)", probes)
    assert found.columns == ["rank", "scheme", "ppl at 1×", "ppl at 4×", "4× ÷ 1×", "passkey at 1×",
                             "passkey at 4×", "repeat gain at 4×"]
    lo, hi = wilson(36, 40)  # one seed: Wilson over the pooled key tokens, 18 + 18 of 20 + 20
    assert found.rows[0] == ["1", "alibi", "7.00", "7.00", "1.00", f"0.90 [{lo:.2f}–{hi:.2f}]",
                             "0.30 [{:.2f}–{:.2f}]".format(*wilson(12, 40)), "+0.050 [-0.050–+0.150]"]
    assert [r[1] for r in found.rows] == ["alibi", "nope", "rope"] and found.rows[2][-1] == "+0.500 [+0.400–+0.600]"
    text = found.text
    assert "Flat in perplexity but no longer retrieving at 4×: alibi (0.30 at 4× vs 0.90 at 1×)." in text
    assert "Still retrieving at 4×: rope (0.70 at 4× vs 0.80 at 1×)." in text
    assert "Not retrieving even at 1× (accuracy below 0.5" in text and "nope (0.20)" in text
    assert "at least 50% of its own at 1×" in text and "Wilson's over its key tokens" in text
    assert "the first copy 56 tokens back" in text
    assert text.index("Within 10%") < text.index("Passkey:")  # the perplexity paragraph first, unchanged
    # no probes: the headline as before
    plain = answer(summary, "nonoverlap", "1 seed(s)")
    assert plain.columns == ["rank", "scheme", "ppl at 1×", "ppl at 4×", "4× ÷ 1×"] and "Passkey" not in plain.text


def test_probe_cells_read_as_a_share_with_its_interval():
    from types import SimpleNamespace

    r = SimpleNamespace(accuracy=0.85, accuracy_low=0.784, accuracy_high=0.9, gain=0.4123, gain_low=0.3, gain_high=0.5)
    assert acc_cell(r) == "0.85 [0.78–0.90]" and repeat_gain_cell(r) == "+0.412 [+0.300–+0.500]"
    assert acc_cell(SimpleNamespace(accuracy=0.5, accuracy_low=float("nan"), accuracy_high=float("nan"))) == "0.50"
    assert acc_cell(SimpleNamespace(accuracy=float("nan"), accuracy_low=0, accuracy_high=0)) == "—"


def test_probes_without_perplexity_get_their_own_summary():
    probes = ProbeTables.of(pd.DataFrame(_probe_rows({"alibi": {32: 0.9, 64: 0.3}, "rope": {32: 0.8, 64: 0.7}})))
    found = probe_answer(probes)
    assert found.columns == ["scheme", "passkey at 2×", "passkey at 4×"]
    assert found.text.startswith("No perplexity results here (no results.csv)")
    assert "- No longer retrieving at 4×: alibi (0.30 at 4× vs 0.90 at 2×)." in found.text
    assert "(the shortest length with a passkey accuracy: none at 1×" in found.text
    assert "Flat in perplexity" not in found.text


def test_report_with_probes_has_their_tables_figures_and_lm_eval_tasks(tmp_path):
    import json

    from lenx.report import report

    pd.DataFrame(_ppl_rows({"alibi": {16: 7.0, 64: 7.0}, "rope": {16: 6.0, 64: 12.0}})).to_csv(
        tmp_path / "results.csv", index=False)
    pd.DataFrame(_probe_rows({"alibi": {16: 0.9, 64: 0.3}, "rope": {16: 0.8, 64: 0.7}},
                             {"alibi": {(16, 8): 1.0, (64, 8): 1.0, (64, 56): 0.05}}, seeds=(0, 1))).to_csv(
        tmp_path / "probes.csv", index=False)
    md = report(tmp_path).read_text()
    for name in ("passkey.png", "retrieval_vs_length.png", "repeat_gain.png", "ppl_vs_length.png"):
        assert (tmp_path / name).stat().st_size > 10_000 and f"({name})" in md
    assert "## Retrieval: passkey accuracy" in md and "## Retrieval: repeat gain" in md
    table = md.split("## Retrieval: passkey accuracy")[1].split("\n## ")[0]
    # two seeds with equal accuracies: an interval over seeds of width 0
    assert "| alibi | 0.90 [0.90–0.90] | 0.30 [0.30–0.30] |" in table and "95% interval over seeds" in table
    assert "Flat in perplexity but no longer retrieving at 4×: alibi" in md
    html = (tmp_path / "report.html").read_text()
    assert html.count("<img") == md.count("![") and not re.search(r'src="(?!data:)', html)
    assert "<li>Flat in perplexity but no longer retrieving" in html
    lm = json.loads(next(tmp_path.glob("results_*.json")).read_text())
    task = lm["results"]["alibi@64/passkey"]
    assert task["accuracy,none"] == pytest.approx(0.3) and task["accuracy_stderr,none"] == 0.0
    assert task["gain,none"] is None and task["gain_stderr,none"] == "N/A"
    assert lm["higher_is_better"]["alibi@64/passkey"] == {"accuracy": True, "exact_match": True, "key_nll": False,
                                                         "gain": True}
    assert lm["results"]["alibi@64/repeat"]["gain,none"] == pytest.approx((1.0 + 0.05) / 2)
    assert lm["higher_is_better"]["alibi@64"]["token_perplexity"] is False  # the perplexity tasks as before
    assert lm["configs"]["alibi@64/passkey"]["stderr_over"] == "seeds"


def test_report_of_probes_alone_and_of_perplexity_alone(tmp_path):
    from lenx.report import report

    probes_only, ppl_only = tmp_path / "p", tmp_path / "r"
    probes_only.mkdir()
    ppl_only.mkdir()
    pd.DataFrame(_probe_rows({"alibi": {16: 0.9, 64: 0.3}})).to_csv(probes_only / "probes.csv", index=False)
    md = report(probes_only).read_text()
    assert "No perplexity results here (no results.csv)" in md and "## Perplexity" not in md
    assert (probes_only / "passkey.png").exists() and not (probes_only / "ppl_vs_length.png").exists()
    assert "## Provenance" in md
    pd.DataFrame(_ppl_rows({"alibi": {16: 7.0, 64: 7.0}})).to_csv(ppl_only / "results.csv", index=False)
    md = report(ppl_only).read_text()
    assert "passkey" not in md and "Retrieval" not in md
    assert sorted(p.name for p in ppl_only.glob("*.png")) == ["ppl_vs_length.png"]


def test_report_refuses_a_probes_table_that_is_not_lenx_s(tmp_path):
    from lenx.errors import LenxError
    from lenx.report import report

    pd.DataFrame([{"run": "a", "probe": "passkey"}]).to_csv(tmp_path / "probes.csv", index=False)
    with pytest.raises(LenxError, match="probes.csv is not a lenx probes table"):
        report(tmp_path)
    pd.DataFrame(_probe_rows({"alibi": {16: 1.5}})).to_csv(tmp_path / "probes.csv", index=False)
    with pytest.raises(LenxError, match="column accuracy holds 1.5, not a share"):
        report(tmp_path)


def test_report_of_a_real_probe_evaluation(tmp_path, text_dataset, capsys):
    """`lenx eval --probe` on tiny runs, then `lenx report`: the probes' sections, figures and tasks."""
    import json

    from lenx.cli import main

    from .test_probes import make_run

    runs = [str(make_run(tmp_path / "runs", pe, text_dataset)) for pe in ("alibi", "rope")]
    out = tmp_path / "res"
    assert main(["eval", *runs, "--lengths", "32,64,128", "--tokens", "128", "--probe", "passkey,repeat",
                 "--probe-trials", "2", "--probe-depths", "0,1", "--out", str(out)]) == 0
    assert main(["report", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "passkey at 2×" in md and "passkey at 4×" in md  # 1x: the short wording does not fit 32 tokens
    assert "the 'short' passkey wording takes" in md  # the notes say why 1x has none
    assert all((out / n).exists() for n in ("passkey.png", "retrieval_vs_length.png", "repeat_gain.png"))
    lm = json.loads(next(out.glob("results_*.json")).read_text())
    assert {"alibi@128/passkey", "rope@64/repeat"} <= set(lm["results"])


def test_passkey_heatmaps_share_one_colour_scale_with_one_colourbar(tmp_path, monkeypatch):
    """20 schemes: 20 panels (five a row) titled by their labels, every image on the 0..1 scale, one colourbar."""
    from lenx import plots

    drawn = []
    monkeypatch.setattr(plots.plt, "close", drawn.append)
    pes = ["alibi", "rope", "t5", "nope"]
    rows = _probe_rows({pe: {16: 0.9, 32: 0.5 + 0.1 * i, 64: 0.1 * i} for i, pe in enumerate(pes)})
    rows = [{**r, "rope_scaling": sc} for r in rows for sc in ("none", "pi", "ntk", "yarn", "x")]  # 4 x 5 labels
    probes = ProbeTables.of(pd.DataFrame(rows))
    assert plots.plot_passkey(probes.cells, tmp_path / "passkey.png")
    fig = drawn[0]
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.images]
    assert len(panels) == 20 and len({ax.get_title() for ax in panels}) == 20
    assert all(ax.images[0].get_clim() == (0.0, 1.0) for ax in panels)
    assert len([ax for ax in fig.axes if ax.get_label() == "<colorbar>"]) == 1
    assert len({round(ax.get_position().x0, 3) for ax in panels}) == 5  # five columns
    assert not plots.plot_passkey(probes.cells[probes.cells["probe"] == "repeat"], tmp_path / "none.png")


def test_every_registered_scheme_has_a_look_of_its_own():
    """Colour and marker together tell every scheme apart (the palette has 12 colours; the registry more)."""
    from lenx.plots import style
    from lenx.positional import SCHEMES

    looks = {(style(s)["color"], style(s)["marker"]) for s in SCHEMES}
    assert len(looks) == len(SCHEMES)
