"""lenx.stats on hand-made results: the numbers of the report, checked against values worked out by hand."""

import math

import pandas as pd
import pytest

from lenx.stats import (KEEPS, KEPT, RETRIEVES, _rel_1x, farthest_gain, label, labels_together, probe_summary,
                        protocol_label, ranking, retrieval, summarise, t975, wilson)


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


# ---------------------------------------------------------------- the probes table


def probe_row(pe: str, seed, eval_len: int, probe: str = "passkey", at=0.5, accuracy=0.5, answers=10, trials=4,
              exact_match=0.25, key_nll=2.0, **fields) -> dict:
    """One probes row (training length 16); `at` is the depth (passkey) or the distance (mqar, repeat)."""
    return {"run": f"{pe}-s{seed}", "pe": pe, "seed": seed, "train_len": 16, "eval_len": eval_len, "probe": probe,
            "depth": at if probe == "passkey" else float("nan"), "distance": float("nan") if probe == "passkey" else at,
            "trials": trials, "answers": answers, "accuracy": accuracy, "exact_match": exact_match,
            "key_nll": key_nll, "gain": float("nan"), "gain_low": float("nan"), "gain_high": float("nan"),
            "rope_scaling": "none", "rope_factor": float("nan"), "tokenizer": "byte", "dataset": "stdlib",
            "config_id": "c", "note": "", **fields}


def test_probe_summary_over_seeds_is_the_mean_with_a_t_interval():
    """Accuracies 0.8, 0.6, 0.7 over seeds 0-2: mean 0.7, sd 0.1, half-width 4.303 x 0.1 / sqrt 3 = 0.248435;
    exact match 0.25, 0.5, 0.75: mean 0.5, sd 0.25, half 0.621087, clipped to [0, 1]; key NLL 1, 2, 3: mean 2."""
    rows = [probe_row("alibi", s, 64, accuracy=a, exact_match=e, key_nll=n)
            for s, a, e, n in ((0, 0.8, 0.25, 1.0), (1, 0.6, 0.5, 2.0), (2, 0.7, 0.75, 3.0))]
    r = probe_summary(pd.DataFrame(rows)).iloc[0]
    assert (r.probe, r.scheme, r.eval_len, r["at"], r.multiple, r.seeds, r.interval) == (
        "passkey", "alibi", 64, 0.5, 4.0, 3, "seeds")
    half = 4.303 * 0.1 / math.sqrt(3)
    assert (r.accuracy, r.accuracy_low, r.accuracy_high) == (pytest.approx(0.7), pytest.approx(0.7 - half),
                                                             pytest.approx(0.7 + half))
    assert r.accuracy_stderr == pytest.approx(0.1 / math.sqrt(3))
    assert (r.exact_match, r.exact_match_low, r.exact_match_high) == (pytest.approx(0.5), 0.0, pytest.approx(1.0))
    assert r.key_nll == pytest.approx(2.0) and r.key_nll_stderr == pytest.approx(1 / math.sqrt(3))
    assert (r.trials, r.answers) == (12, 30)


def test_one_seed_pooled_over_depths_has_wilson_intervals_of_its_tokens_and_trials():
    """One seed, two depths: 8 of 10 and 15 of 30 key tokens = 23 of 40; Wilson by hand: p 0.575, centre
    (p + z^2/80) / (1 + z^2/40) = 0.56843, half 1.96 sqrt(p(1-p)/40 + z^2/6400) / 1.09604 = 0.14648: [0.42195,
    0.71491]; standard
    error sqrt(p(1-p)/39) = 0.079158. Exact match 1 + 2 of 4 + 4 trials = 3 of 8. Key NLL over the 40 tokens
    (2 x 10 + 3 x 30) / 40 = 2.75, no interval."""
    rows = [probe_row("rope", 0, 64, at=0.0, accuracy=0.8, answers=10, exact_match=0.25, key_nll=2.0),
            probe_row("rope", 0, 64, at=1.0, accuracy=0.5, answers=30, exact_match=0.5, key_nll=3.0)]
    r = probe_summary(pd.DataFrame(rows), pooled=True).iloc[0]
    assert "at" not in r and r.interval == "one seed" and r.seeds == 1
    assert r.accuracy == pytest.approx(0.575)
    assert (r.accuracy_low, r.accuracy_high) == (pytest.approx(0.42195, abs=1e-5), pytest.approx(0.71491, abs=1e-5))
    assert r.accuracy_stderr == pytest.approx(0.079158, abs=1e-6)
    assert r.exact_match == pytest.approx(3 / 8) and (r.exact_match_low, r.exact_match_high) == wilson(3, 8)
    assert r.key_nll == pytest.approx(2.75) and math.isnan(r.key_nll_low) and math.isnan(r.key_nll_stderr)
    cells = probe_summary(pd.DataFrame(rows))  # per depth: each row's own tokens
    assert list(cells["at"]) == [0.0, 1.0] and cells["accuracy_low"].iloc[0] == pytest.approx(wilson(8, 10)[0])


def test_repeat_gain_pooled_from_each_distance_interval_over_trials():
    """One seed, distances 8 and 16, 10 trials each: gains 0.3 [0.1, 0.5] and 0.1 [0.0, 0.2]. Each cell's standard
    error is its half-width / t(0.975, 9) = 0.2 / 2.262 and 0.1 / 2.262; pooled: mean 0.2, se sqrt((0.5 x
    0.088417)^2 + (0.5 x 0.044209)^2) = 0.049427, half t(0.975, 18) se = 2.101 x 0.049427. Per distance: the
    row's own interval."""
    rows = [probe_row("alibi", 0, 64, probe="repeat", at=d, trials=10, gain=g, gain_low=lo, gain_high=hi)
            for d, g, lo, hi in ((8, 0.3, 0.1, 0.5), (16, 0.1, 0.0, 0.2))]
    pooled = probe_summary(pd.DataFrame(rows), pooled=True).iloc[0]
    assert pooled.gain == pytest.approx(0.2) and pooled.gain_stderr == pytest.approx(0.049427, abs=1e-6)
    assert (pooled.gain_low, pooled.gain_high) == (pytest.approx(0.2 - 2.101 * 0.0494268, abs=1e-6),
                                                   pytest.approx(0.2 + 2.101 * 0.0494268, abs=1e-6))
    one = probe_summary(pd.DataFrame(rows)).iloc[0]
    assert (one["at"], one.gain, one.gain_low, one.gain_high) == (8, pytest.approx(0.3), pytest.approx(0.1),
                                                                  pytest.approx(0.5))
    # two seeds: over the seeds' gains (0.3 and 0.5 at distance 8)
    two = probe_summary(pd.DataFrame(rows[:1] + [{**rows[0], "seed": 1, "run": "alibi-s1", "gain": 0.5}])).iloc[0]
    assert two.gain == pytest.approx(0.4) and two.gain_high == pytest.approx(0.4 + 12.706 * 0.1)


def test_an_unmeasured_probe_cell_keeps_its_note():
    rows = [probe_row("learned", 0, 64, accuracy=float("nan"), answers=0, exact_match=float("nan"),
                      key_nll=float("nan"), note="learned positions end at 16"),
            probe_row("learned", 0, 16)]
    out = probe_summary(pd.DataFrame(rows), pooled=True).set_index("eval_len")
    assert math.isnan(out.loc[64, "accuracy"]) and out.loc[64, "seeds"] == 0
    assert out.loc[64, "note"] == "learned positions end at 16" and out.loc[16, "note"] == ""


def test_retrieval_verdicts_follow_the_stated_rule():
    """keeps: accuracy at the longest multiple >= KEEPS x its own at 1x; stops: below; never: below RETRIEVES at
    1x; a scheme whose 1x window cannot hold the wording is compared with its shortest length probed."""
    acc = {"alibi": (0.9, 0.3), "rope": (0.8, 0.4), "nope": (0.3, 0.3), "t5": (None, 0.9), "fire": (0.9, None)}
    rows = []
    for pe, (one, top) in acc.items():
        for L, a in ((16, one), (32, 0.9), (64, top)):
            blank = {"accuracy": float("nan"), "answers": 0, "note": f"no {L}"} if a is None else {"accuracy": a}
            rows.append(probe_row(pe, 0, L, **blank))
    found = retrieval(probe_summary(pd.DataFrame(rows), pooled=True))
    assert KEEPS == 0.5 and RETRIEVES == 0.5 and found.multiple == 4.0
    assert found.verdict == {"nope": "never", "rope": "keeps", "alibi": "stops", "t5": "keeps", "fire": "unmeasured"}
    assert found.ref["t5"].multiple == 2.0 and found.ref["alibi"].multiple == 1.0
    assert found.notes == {"fire": "no 64"}
    assert retrieval(probe_summary(pd.DataFrame([probe_row("a", 0, 64, probe="repeat", at=8)]), pooled=True)) is None


def test_farthest_gain_is_at_the_longest_length_and_distance():
    rows = [probe_row("alibi", 0, L, probe="repeat", at=d, gain=g) for L, d, g in
            ((32, 8, 1.0), (64, 8, 0.9), (64, 48, 0.2), (64, 16, 0.5))]
    M, at = farthest_gain(probe_summary(pd.DataFrame(rows)))
    assert M == 4.0 and at["alibi"]["at"] == 48 and at["alibi"].gain == pytest.approx(0.2)


def test_results_and_probes_are_labelled_as_one_table():
    """A tag that only their union shows (two datasets, one in each table) names the scheme the same in both."""
    res = pd.DataFrame([row("alibi", 0, 16, 5.0)])
    pro = pd.DataFrame([probe_row("alibi", 0, 16, dataset="other")])
    a, b = labels_together(res, pro)
    assert list(a) == ["alibi on stdlib"] and list(b) == ["alibi on other"]
    assert labels_together(res, None)[1] is None and list(labels_together(res, None)[0]) == ["alibi"]


def test_an_hf_model_without_a_seed_is_one_seed():
    r = probe_summary(pd.DataFrame([probe_row("llama", float("nan"), 64, accuracy=0.8, answers=10)])).iloc[0]
    assert (r.seeds, r.evaluated_seeds, r.interval) == (1, 1, "one seed")
    assert (r.accuracy_low, r.accuracy_high) == wilson(8, 10)
