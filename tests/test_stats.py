"""lenx.stats on hand-made results: the numbers of the report, checked against values worked out by hand."""

import math

import pandas as pd
import pytest

from lenx.stats import KEPT, _rel_1x, label, protocol_label, ranking, summarise, t975


def row(pe: str, seed, eval_len: int, ppl: float, **fields) -> dict:
    """One results row (nonoverlap, byte tokenizer, stdlib, training length 16); `fields` override columns."""
    return {"run": f"{pe}-s{seed}", "pe": pe, "seed": seed, "train_len": 16, "eval_len": eval_len, "ppl": ppl,
            "bpb": 2.0, "note": "", "rope_scaling": "none", "rope_factor": float("nan"), "tokenizer": "byte",
            "protocol": "nonoverlap", "stride": eval_len, "dataset": "stdlib", "config_id": "c", **fields}


def test_t_quantiles_are_the_tables_and_normal_past_30():
    assert [t975(df) for df in (1, 2, 10, 30)] == [12.706, 4.303, 2.228, 2.042]
    assert t975(31) == t975(1000) == 1.960


def test_ratio_to_1x_is_paired_over_the_seeds_that_have_both():
    """2x: seeds 0, 1 at 10 and 9; 1x: seeds 0-2 at 5, 6, 20. Ratios 2 and 1.5 (seed 2 has no 2x): geometric
    mean sqrt(3) = 1.7321; se of the log ratios ln(4/3) / 2 = 0.1438; bounds sqrt(3) exp(-+12.706 se)."""
    log = pd.Series({0: math.log(10), 1: math.log(9)})
    base = pd.Series({0: math.log(5), 1: math.log(6), 2: math.log(20)})
    ratio, low, high, stderr = _rel_1x(log, base)
    assert ratio == pytest.approx(1.7320508)
    assert (low, high, stderr) == (pytest.approx(0.2784998), pytest.approx(10.772002), pytest.approx(0.2491400))
    one = _rel_1x(log[:1], base)  # one seed with both: the ratio, no interval
    assert one[0] == pytest.approx(2.0) and all(math.isnan(x) for x in one[1:])
    assert all(math.isnan(x) for x in _rel_1x(log, None))  # no 1x row at all
    assert all(math.isnan(x) for x in _rel_1x(log, pd.Series({5: 1.0})))  # no seed in common


def test_summary_cell_is_the_geometric_mean_with_a_t_interval_on_log_ppl():
    """Seeds at 4 and 9: geometric mean 6; se of log ppl ln(9/4) / 2 = 0.4055; bounds 6 exp(-+12.706 se) =
    0.0347 and 1036.49; stderr by the delta method 6 se = 2.4328. A seed evaluated twice counts once."""
    rows = [row("rope", 0, 16, 4.0), row("rope", 1, 16, 9.0), row("rope", 1, 16, 9.0)]
    r = next(summarise(pd.DataFrame(rows)).itertuples())
    assert (r.ppl, r.seeds, r.evaluated_seeds) == (pytest.approx(6.0), 2, 2)
    assert (r.ppl_low, r.ppl_high, r.ppl_stderr) == (pytest.approx(0.0347325, rel=1e-5),
                                                      pytest.approx(1036.494, rel=1e-5), pytest.approx(2.4327906))
    assert r.bpb == 2.0 and r.rel_1x == pytest.approx(1.0) and r.note == ""


def test_context_gain_summary_is_the_mean_over_seeds_with_a_t_interval():
    """Gains 0.10, 0.30, 0.20 nats at 4x over seeds 0-2 (seed 2 scored twice: counts once): mean 0.2, sd 0.1,
    half-width 4.303 x 0.1 / sqrt(3) = 0.24844; one seed: its gain, no interval; none at 1x."""
    rows = [row("alibi", s, 64, 5.0, context_gain=g) for s, g in ((0, 0.1), (1, 0.3), (2, 0.2), (2, 0.2))]
    rows += [row("alibi", s, 16, 5.0, context_gain=float("nan")) for s in (0, 1, 2)]
    rows += [row("rope", 0, 64, 9.0, context_gain=-0.5)]
    out = summarise(pd.DataFrame(rows)).set_index(["scheme", "eval_len"])
    a = out.loc[("alibi", 64)]
    assert a.context_gain == pytest.approx(0.2)
    half = 4.303 * 0.1 / math.sqrt(3)
    assert half == pytest.approx(0.248434, abs=1e-6)
    assert (a.context_gain_low, a.context_gain_high) == (pytest.approx(0.2 - half), pytest.approx(0.2 + half))
    r = out.loc[("rope", 64)]
    assert r.context_gain == -0.5 and math.isnan(r.context_gain_low) and math.isnan(r.context_gain_high)
    assert math.isnan(out.loc[("alibi", 16)].context_gain)


def test_a_seed_without_a_perplexity_is_left_out_and_named():
    rows = [row("rope", s, L, float("nan") if (s, L) == (1, 32) else 5.0 + s) for s in (0, 1) for L in (16, 32)]
    r = summarise(pd.DataFrame(rows)).set_index("eval_len").loc[32]
    assert (r.ppl, r.seeds, r.evaluated_seeds) == (5.0, 1, 2) and math.isnan(r.ppl_low)
    assert r.note == "mean over 1 of 2 seeds (no perplexity from seed 1)"


def test_rows_sort_by_registry_order_then_length():
    rows = [row(pe, 0, L, 5.0) for pe in ("alibi", "nope", "rope") for L in (32, 16)]
    out = summarise(pd.DataFrame(rows))
    assert list(zip(out["scheme"], out["eval_len"])) == [
        ("nope", 16), ("nope", 32), ("rope", 16), ("rope", 32), ("alibi", 16), ("alibi", 32)]


def test_labels_name_the_extension_the_given_factor_and_the_training_variant():
    rows = [row("rope", 0, 64, 5.0, rope_scaling="yarn", rope_factor=8.0),  # a factor given: not the default 4
            row("rope", 0, 64, 5.0, rope_scaling="yarn", rope_factor=4.0),  # the default factor at 4x: no tag
            row("alibi", 0, 64, 5.0), row("alibi", 0, 64, 5.0, train_len=32, run="alibi-L32-s0")]
    assert list(label(pd.DataFrame(rows))) == ["rope+yarn×8", "rope+yarn", "alibi (L16)", "alibi (L32)"]


def test_sliding_windows_at_half_the_length_read_as_l_over_2():
    df = pd.DataFrame([row("rope", 0, L, 5.0, protocol="sliding", stride=L // 2) for L in (16, 32)])
    assert set(protocol_label(df)) == {"sliding (stride L/2)"}
    df.loc[0, "stride"] = 4
    assert list(protocol_label(df)) == ["sliding (stride 4)", "sliding (stride 16)"]


def test_ranking_orders_by_ratio_to_1x_and_says_why_a_scheme_is_left_out():
    """At 4x: alibi 7 -> 7.6 (1.09: kept), rope 6 -> 12 (2.00), t5 no 1x, learned no ppl, nope not evaluated."""
    rows = [row("alibi", 0, 16, 7.0), row("alibi", 0, 64, 7.6), row("rope", 0, 16, 6.0), row("rope", 0, 64, 12.0),
            row("t5", 0, 64, 8.0), row("learned", 0, 16, 8.0),
            row("learned", 0, 64, float("nan"), note="learned positions end at 16"), row("nope", 0, 16, 9.0)]
    found = ranking(summarise(pd.DataFrame(rows)))
    assert found.multiple == 4.0 and found.lengths == [64]
    assert list(found.ranked.index) == ["alibi", "rope"]
    assert found.ranked["rel_1x"].tolist() == pytest.approx([7.6 / 7, 2.0])
    assert found.kept == ["alibi"] and KEPT == 1.10 and found.best == "alibi"
    assert found.base.to_dict() == {"nope": 9.0, "learned": 8.0, "rope": 6.0, "alibi": 7.0}
    assert found.unranked == {"nope": ("not evaluated", ""), "learned": ("note", "learned positions end at 16"),
                              "t5": ("no 1x", "")}


def test_no_ranking_without_a_length_past_1x():
    assert ranking(summarise(pd.DataFrame([row("rope", 0, 16, 5.0)]))) is None
    assert ranking(summarise(pd.DataFrame([row("rope", 0, 32, 5.0)]))) is None  # past 1x, but nothing to divide by
