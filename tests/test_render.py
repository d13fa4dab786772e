"""lenx.render: the report's cells, tables and answer as text, and report.html rendered from the Markdown."""

import base64
import re

import pandas as pd
import pytest

from lenx.render import (Section, _fmt, answer, markdown_table, markdown_to_html, render_html, render_markdown,
                         to_markdown)
from lenx.stats import summarise


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
