"""Retrieval probes: the documents (exact windows, the needle where asked, answers on the key's own tokens, for byte,
BPE and transformers tokenizers), their scores (a model that retrieves scores 1, a guesser chance, Wilson intervals
as computed by hand, repeat's paired gain as computed from the documents), and the cells (own table, resume,
settings, HF models built here).

Every model and tokenizer is built in the test; nothing touches the network.
"""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from lenx import distributed
from lenx.cells import run_cells
from lenx.cli import main
from lenx.data import EOD_TOKEN, ByteTokenizer, DataSpec, HFTokenizer, get_tokenizer, token_stream
from lenx.errors import LenxError
from lenx.eval_config import check_eval_options
from lenx.evaluate import evaluate
from lenx.probes import FORMATS, haystack_stream, mqar, passkey, passkey_overhead, repeat, sample, token_pools
from lenx.probes import cell as pc
from lenx.stats import wilson
from lenx.subject import Subject

from .conftest import tiny_model

DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]
DIGITS = list(range(ord("0"), ord("9") + 1))  # byte tokens


# ---------------------------------------------------------------------------------------------------
# tokenizers: byte, lenx's BPE, transformers (byte-level BPE and a sentencepiece-like Metaspace one)


def _hf(pre, dec, texts, size) -> HFTokenizer:
    from tokenizers import Tokenizer, models, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer, tk.decoder = pre, dec
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=size, special_tokens=[EOD_TOKEN, "<unk>"],
                                                      show_progress=False,
                                                      initial_alphabet=sorted(set("".join(texts)))))
    return HFTokenizer(PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=EOD_TOKEN, unk_token="<unk>"), "local")


@pytest.fixture(params=["byte", "bpe", "hf-bytelevel", "hf-metaspace"])
def tokenizer(request, text_dataset):
    from tokenizers import decoders, pre_tokenizers

    texts = [p.read_text() + " The pass key is 0123456789. What? Remember it." for p in sorted(text_dataset.iterdir())]
    if request.param == "byte":
        return ByteTokenizer()
    if request.param == "bpe":
        return get_tokenizer("bpe:300", str(text_dataset))
    if request.param == "hf-bytelevel":
        return _hf(pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel(), texts, 300)
    return _hf(pre_tokenizers.Metaspace(), decoders.Metaspace(), texts, 200)


def _haystack(tok, text_dataset) -> np.ndarray:
    return haystack_stream(token_stream(DataSpec(str(text_dataset)), tok, "train"), tok.eod_id)


# ---------------------------------------------------------------------------------------------------
# documents


@pytest.mark.parametrize("fmt", ["short", "landmark"])
def test_passkey_window_needle_and_key(tokenizer, text_dataset, fmt):
    """The window is exactly the asked length in the tokenizer's own tokens; the needle starts where the depth puts
    it; the answer is the key's own tokens at the window's end (no whitespace token); the rest is one contiguous
    piece of the haystack, split at the needle."""
    tok, f = tokenizer, FORMATS[fmt]
    hay = _haystack(tok, text_dataset)
    n_task = len(tok.encode(f.task)) if f.task else 0
    rng = np.random.default_rng(0)
    need = passkey_overhead(tok, f)
    for length in (need, need + 57, need + 190):
        for depth in DEPTHS:
            doc = passkey(tok, hay, length, depth, rng, f)
            assert doc.tokens.dtype == np.int64 and len(doc.tokens) == length
            assert tok.decode(doc.tokens[doc.answer]).strip() == doc.key and doc.key.isdigit()
            assert list(doc.answer) == list(range(length - len(doc.answer), length))
            assert all(tok.decode(doc.tokens[p:p + 1]).strip() for p in doc.answer)  # no whitespace-only token
            needle = np.asarray(tok.encode(f.needle.format(key=doc.key)))
            assert (doc.tokens[doc.at:doc.at + len(needle)] == needle).all()
            n_hay = length - passkey_overhead(tok, f, int(doc.key))
            assert doc.at - n_task == round(depth * n_hay)
            question = len(tok.encode(f.question)) + len(tok.encode(f.answer.format(key=doc.key)))
            piece = np.concatenate([doc.tokens[n_task:doc.at], doc.tokens[doc.at + len(needle):length - question]])
            assert len(piece) == n_hay
            if n_hay:
                starts = np.flatnonzero(hay[:len(hay) - n_hay + 1] == piece[0])
                assert any((hay[s:s + n_hay] == piece).all() for s in starts)


def test_passkey_too_short_a_window_is_refused(text_dataset):
    tok = ByteTokenizer()
    need = passkey_overhead(tok, FORMATS["landmark"])
    with pytest.raises(LenxError, match="cannot hold the 'landmark' wording"):
        passkey(tok, _haystack(tok, text_dataset), need - 1, 0.5, 0, FORMATS["landmark"])


def test_mqar_pairs_queries_and_distances(tokenizer):
    tok = tokenizer
    keys_pool, values_pool = token_pools(tok)
    assert len(set(keys_pool) & set(values_pool)) == 0 and tok.eod_id not in set(keys_pool) | set(values_pool)
    for length, distance in ((64, 16), (64, 48), (200, 100)):
        doc = mqar(tok, length, distance, np.random.default_rng(length + distance), pairs=8)
        t = doc.tokens
        assert len(t) == length and doc.distance == distance and len(doc.answer) == 8
        keys, values = t[doc.at:doc.at + 16:2], t[doc.at + 1:doc.at + 16:2]
        assert set(keys) <= set(keys_pool) and set(values) <= set(values_pool)
        pair = dict(zip(keys, values))
        queries = t[doc.answer - 1]
        assert sorted(queries) == sorted(keys) and [pair[k] for k in queries] == list(t[doc.answer])
        for k in keys:
            assert (t == k).sum() == 2  # its pair and its query, nowhere else
        gaps = [int(q) - int(np.flatnonzero(t == k)[0]) for k, q in zip(queries, doc.answer - 1)]
        assert np.mean(gaps) == distance


def test_repeat_copies_the_segment_and_its_control_is_plain_text(text_dataset):
    tok = ByteTokenizer()
    hay = _haystack(tok, text_dataset)
    doc = repeat(hay, 128, 40, 16, np.random.default_rng(0))
    t, c = doc.tokens, doc.control
    assert len(t) == len(c) == 128 and doc.at == 128 - 16 - 40
    assert (t[doc.at:doc.at + 16] == t[-16:]).all() and (c[-16:] == t[-16:]).all()
    differ = np.flatnonzero(t != c)
    assert differ.min() >= doc.at and differ.max() < doc.at + 16  # only the first copy's place differs
    assert list(doc.answer) == list(range(113, 128))  # the second copy after its first token
    assert any((hay[s:s + 128] == c).all() for s in np.flatnonzero(hay == c[0]))


def test_documents_are_functions_of_the_seed_and_take_torch_generators(text_dataset):
    tok = ByteTokenizer()
    hay = _haystack(tok, text_dataset)
    for build in (lambda r: passkey(tok, hay, 100, 0.5, r), lambda r: mqar(tok, 100, 40, r),
                  lambda r: repeat(hay, 100, 40, 16, r)):
        assert (build(np.random.default_rng(7)).tokens == build(np.random.default_rng(7)).tokens).all()
        assert (build(7).tokens == build(np.random.default_rng(7)).tokens).all()
        a, b = build(torch.Generator().manual_seed(3)), build(torch.Generator().manual_seed(3))
        assert (a.tokens == b.tokens).all() and len(a.tokens) == 100
        assert not (build(np.random.default_rng(8)).tokens == build(np.random.default_rng(7)).tokens).all()
    for name in ("passkey", "mqar", "repeat"):  # a training mix: the depth or distance drawn too
        docs = [sample(name, tok, hay, 129, torch.Generator().manual_seed(s)) for s in range(5)]
        assert all(len(d.tokens) == 129 and len(d.answer) for d in docs)
        assert len({d.tokens.tobytes() for d in docs}) == 5


def test_the_first_integer_of_an_answer_is_read_as_yarn_does():
    assert pc.first_integer(" 48213. Remember") == "48213" and pc.first_integer("key: 7 or 8") == "7"
    assert pc.first_integer(" no digits") is None


def test_wilson_intervals_equal_hand_computed_ones():
    # z = 1.96: 8/10: centre (0.8 + z^2/20) / (1 + z^2/10) = 0.71674, half 1.96 sqrt(0.016 + 0.0096) / 1.38415 = 0.22656
    for (k, n), (lo, hi) in {(8, 10): (0.490162, 0.943318), (0, 20): (0.0, 0.161125), (20, 20): (0.838875, 1.0),
                             (1, 3): (0.061492, 0.792340)}.items():
        assert wilson(k, n) == pytest.approx((lo, hi), abs=1e-6)


# ---------------------------------------------------------------------------------------------------
# scores: subjects built here


class ToySubject(Subject):
    """A byte-level subject whose logits come from `forward(ids)`: no weights, no training."""

    kind, seed, config_id, weights_id, tokenizer_name, run_dir = "lenx", 0, "toy", None, "byte", "toy"

    def __init__(self, name, forward, dataset, train_len=32):
        self.name = self.pe = name
        self.forward, self.train_len, self.default_data = forward, train_len, str(dataset)

    def scaling_plan(self, scalings, factors):
        return [("none", None)]

    def open(self, device, attn_backend=None):
        return ByteTokenizer()

    def check_tokens(self, stream):
        pass

    def prepare(self, scaling, factor):
        return lambda ids: SimpleNamespace(logits=self.forward(ids))

    @property
    def attn_backend(self):
        return None

    def batch_tokens(self, eval_len, batch_tokens):
        return batch_tokens


V = ByteTokenizer.vocab_size


def retriever(ids):
    """A model that retrieves: at each position it predicts the token that followed the longest earlier match of
    the text up to there (latest on ties), else nothing (uniform). It reads only the past."""
    out = torch.zeros(*ids.shape, V)
    for r, x in enumerate(ids.numpy()):
        E = len(x)
        run = np.zeros(E, dtype=np.int64)  # run[q], q < p: length of the common suffix of x[..p] and x[..q]
        for p in range(1, E):
            before = np.concatenate([[0], run[:p - 1]])  # the common suffix of x[..p-1] and x[..q-1]
            run = np.zeros(E, dtype=np.int64)
            run[:p] = np.where(x[:p] == x[p], before + 1, 0)
            if run[:p].max() > 0:
                q = p - 1 - int(np.argmax(run[:p][::-1]))
                out[r, p, x[q + 1]] = 30.0
    return out


def digit_guesser(ids):
    """Knows the answer is a digit, not which: a random digit at every position."""
    g = torch.Generator().manual_seed(int(ids.sum()))
    out = torch.full((*ids.shape, V), -30.0)
    out[..., DIGITS] = torch.randn(*ids.shape, len(DIGITS), generator=g)
    return out


def uniform(ids):
    return torch.zeros(*ids.shape, V)


@pytest.fixture
def letters_dataset(tmp_path: Path) -> Path:
    """30 documents of random lowercase words: text with few long repeats of its own, so that a copy is the only
    long match a segment has."""
    rng = np.random.default_rng(0)
    root = tmp_path / "letters"
    root.mkdir()
    for i in range(30):
        words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(2, 9))) for _ in range(300)]
        (root / f"doc{i:02d}.txt").write_text(" ".join(words))
    return root


def _opts(**kw):
    return check_eval_options({"probe": ["passkey", "mqar", "repeat"], "probe_trials": 10, **kw})


def _run(subjects, out, lengths=(64, 128), **kw):
    opts = _opts(**kw)
    kind = pc.Probes(opts, lambda n: list(lengths))
    return run_cells(kind, subjects, out, ctx=distributed.init(), device="cpu", show=False)


def test_a_model_that_retrieves_scores_one_and_a_guesser_chance(letters_dataset, tmp_path):
    subjects = [ToySubject(n, f, letters_dataset) for n, f in
                (("retriever", retriever), ("guesser", digit_guesser), ("uniform", uniform))]
    table = _run(subjects, tmp_path, probe_depths=[0, 0.5, 1])
    by = {n: table[table.run == n] for n in ("retriever", "guesser", "uniform")}
    r = by["retriever"]
    got = r[r.probe != "repeat"]
    assert len(got) and (got["accuracy"] == 1).all() and (got["exact_match"] == 1).all()
    assert (got["key_nll"] < 1e-6).all() and (got["match"] == "tokens").all()
    rep = r[r.probe == "repeat"]
    assert (rep["gain"] > 3).all() and (rep["gain_low"] > 0).all()  # it copies the segment from its first copy
    pk = by["guesser"][by["guesser"].probe == "passkey"]
    k, n = int((pk["accuracy"] * pk["answers"]).round().sum()), int(pk["answers"].sum())
    lo, hi = wilson(k, n)
    assert lo < 0.1 < hi and n > 250  # chance: one digit in ten
    assert (pk["exact_match"] < 0.1).all()
    u = by["uniform"]
    assert u["key_nll"].to_numpy() == pytest.approx(math.log(V), rel=1e-9)
    assert (u.loc[u.probe == "repeat", "gain"].abs() < 1e-9).all()
    # every subject got the same documents: one cell seed per cell, whatever the subject
    seeds = table.groupby(["probe", "eval_len", "depth", "distance"], dropna=False)["cell_seed"].nunique()
    assert (seeds == 1).all()


def test_the_key_is_scored_on_its_own_tokens_only(text_dataset, tmp_path):
    """A model right exactly at the digits scores 1, one right everywhere but at the digits 0: the needle's digits,
    the whitespace before the key and the haystack are never scored."""
    def peek(ids, at_digits: bool):  # reads the next token: right where `at_digits` says, wrong elsewhere
        nxt = torch.cat([ids[:, 1:], ids[:, :1]], 1)
        digit = (nxt >= ord("0")) & (nxt <= ord("9"))
        right = digit if at_digits else ~digit
        out = torch.zeros(*ids.shape, V)
        out.scatter_(2, torch.where(right, nxt, (nxt + 1) % 256)[..., None], 30.0)
        return out

    subjects = [ToySubject("digits", lambda x: peek(x, True), text_dataset),
                ToySubject("text", lambda x: peek(x, False), text_dataset)]
    table = _run(subjects, tmp_path, probe=["passkey"])
    assert (table.loc[table.run == "digits", "accuracy"] == 1).all()
    assert (table.loc[table.run == "text", "accuracy"] == 0).all()
    # the answers are the keys' digits: trials x their digits
    for _, row in table.iterrows():
        assert 10 <= row["answers"] <= 10 * 5


def test_repeat_gain_is_the_paired_difference_of_the_documents(letters_dataset, tmp_path):
    """The row's numbers, recomputed from the cell's own documents (rebuilt from its recorded seed) and the
    model's log-probabilities."""
    text_dataset = letters_dataset
    s = ToySubject("retriever", retriever, text_dataset)
    table = _run([s], tmp_path, probe=["repeat"], lengths=(64,))
    tok = ByteTokenizer()
    hay = haystack_stream(token_stream(DataSpec(str(text_dataset)), tok, "test"), tok.eod_id)
    for _, row in table.iterrows():
        rng = np.random.default_rng(int(row["cell_seed"]))
        docs = [repeat(hay, 64, int(row["distance"]), int(row["segment"]), rng) for _ in range(int(row["trials"]))]

        def nll(windows):
            lp = torch.log_softmax(retriever(torch.from_numpy(np.stack(windows))), -1)
            return [(-lp[i, d.answer - 1, torch.from_numpy(w[d.answer])]).numpy() for i, (w, d) in
                    enumerate(zip(windows, docs))]

        with_copy, without = nll([d.tokens for d in docs]), nll([d.control for d in docs])
        gains = np.array([b.mean() - w.mean() for w, b in zip(with_copy, without)])
        half = 2.262 * gains.std(ddof=1) / math.sqrt(len(gains))  # t_{0.975, 9}
        assert row["gain"] == pytest.approx(gains.mean(), rel=1e-6)
        assert (row["gain_low"], row["gain_high"]) == pytest.approx((gains.mean() - half, gains.mean() + half), rel=1e-6)
        assert row["key_nll"] == pytest.approx(np.concatenate(with_copy).mean(), rel=1e-6)
        assert row["base_nll"] == pytest.approx(np.concatenate(without).mean(), rel=1e-6)
    assert sorted(table["distance"]) == [16, 32, 56]  # train_len / 2, train_len, and the window less the segment (8)


# ---------------------------------------------------------------------------------------------------
# cells of lenx runs through `lenx eval`


def make_run(root: Path, pe: str, dataset: Path, train_len: int = 32) -> Path:
    run = root / f"{pe}-L{train_len}-s0"
    tiny_model(pe, vocab_size=257, eod_token_id=256, train_len=train_len).save_pretrained(run)
    config = {"pe": pe, "seed": 0, "train_len": train_len, "dataset": str(dataset), "tokenizer": "byte"}
    (run / "run.json").write_text(json.dumps({"status": "done", "config": config}))
    return run


PROBE_EVAL = dict(lengths=[64], probes=["passkey", "mqar", "repeat"], perplexity=False, probe_trials=3,
                  probe_depths=[0, 0.5, 1], progress=False)
VOLATILE = ["seconds", "timestamp"]


def _stable(df):
    return (df.drop(columns=VOLATILE).sort_values(["run", "probe", "eval_len", "depth", "distance"])
            .reset_index(drop=True))


def test_a_killed_probe_evaluation_resumes_without_recomputing_finished_cells(tmp_path, text_dataset, monkeypatch):
    runs = [make_run(tmp_path / "runs", pe, text_dataset) for pe in ("alibi", "rope")]
    full = evaluate(runs, out=tmp_path / "full", **PROBE_EVAL)
    # runs x (3 depths + mqar's distances 16, 32, 48 + repeat's 16, 32, 56)
    assert len(full) == 2 * (3 + 3 + 3)
    tables = sorted(p.name for p in (tmp_path / "full").iterdir() if not p.name.startswith("cells.sqlite"))
    assert tables == ["probes.csv", "probes.parquet"]

    real, calls = pc.answer_scores, []

    def dying(*args, **kw):
        if len(calls) == 5:
            raise KeyboardInterrupt  # killed while scoring its sixth cell
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(pc, "answer_scores", dying)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        evaluate(runs, out=out, **PROBE_EVAL)
    partial = pd.read_parquet(out / "probes.parquet")
    assert len(partial) == 5 and len(pd.read_csv(out / "probes.csv")) == 5
    assert not list(out.glob(".*.tmp"))
    calls.clear()
    monkeypatch.setattr(pc, "answer_scores", lambda *a, **kw: (calls.append(1), real(*a, **kw))[1])
    resumed = evaluate(runs, out=out, **PROBE_EVAL)
    assert len(calls) == len(full) - 5  # the finished cells are not scored again
    pd.testing.assert_frame_equal(_stable(resumed), _stable(full), check_dtype=False)
    calls.clear()
    evaluate(runs, out=out, **PROBE_EVAL)
    assert calls == []
    for change, needle in (({"probe_trials": 4}, r"trials 3, not 4 \(--probe-trials\)"),
                           ({"probe_seed": 1}, r"probe_seed 0, not 1 \(--probe-seed\)"),
                           ({"passkey_question": " Key:"}, "scored with the 'short' wording, not 'short")):
        with pytest.raises(LenxError, match=needle):
            evaluate(runs, out=out, **{**PROBE_EVAL, **change})


def test_cli_probes_add_to_perplexity(tmp_path, text_dataset, capsys):
    run = make_run(tmp_path / "runs", "alibi", text_dataset)
    out = tmp_path / "res"
    assert main(["eval", str(run), "--lengths", "64", "--tokens", "64", "--probe", "passkey", "--probe", "repeat",
                 "--probe-trials", "2", "--probe-depths", "0,1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "1 rows in" in printed and "results.csv" in printed and "5 rows in" in printed and "probes.csv" in printed
    df = pd.read_csv(out / "probes.csv")
    assert sorted(df["probe"]) == ["passkey"] * 2 + ["repeat"] * 3
    assert set(df.columns) >= {"run", "pe", "seed", "probe", "train_len", "eval_len", "depth", "distance", "gain",
                               "trials", "accuracy", "accuracy_low", "accuracy_high", "exact_match", "key_nll",
                               "probe_seed", "cell_seed"}
    assert (df["trials"] == 2).all() and (df["format"].dropna() == "short").all()
    assert len(pd.read_csv(out / "results.csv")) == 1


@pytest.mark.parametrize("args, needle", [
    (["--probe", "needle"], "unknown probe 'needle'"),
    (["--probe", "passkey,mqarr"], "did you mean 'mqar'"),
    (["--no-perplexity"], "nothing to score"),
    (["--probe", "repeat", "--probe-depths", "0.5"], "--probe-depths applies to the passkey probe"),
    (["--probe", "passkey", "--probe-depths", "1.5"], "--probe-depths must lie in [0, 1]"),
    (["--probe", "passkey", "--probe-trials", "0"], "--probe-trials must be a positive integer"),
    (["--probe", "passkey", "--passkey-format", "yarn"], "unknown passkey format 'yarn'"),
    (["--probe", "passkey", "--passkey-needle", "no key here"], "--passkey-needle must contain {key}"),
    (["--probe", "mqar", "--probe-segment", "8"], "--probe-segment applies to the repeat probe"),
    (["--probe", "passkey", "--probe-distances", "2"], "--probe-distances applies to the mqar and repeat"),
])
def test_bad_probe_options_are_one_line(tmp_path, text_dataset, capsys, args, needle):
    run = make_run(tmp_path / "runs", "alibi", text_dataset)
    code = main(["eval", str(run), "--lengths", "64", "--out", str(tmp_path / "r"), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert "known: passkey, mqar, repeat" in err if "unknown probe" in needle else True
    assert not (tmp_path / "r" / "probes.csv").exists()


# ---------------------------------------------------------------------------------------------------
# HF models built here


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu The pass key is".split()
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, 40)) + " 0123456789." for _ in range(200)]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=[EOD_TOKEN], show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=EOD_TOKEN)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      initializer_range=0.3, eos_token_id=tok.eos_token_id, bos_token_id=None)
    path = tmp_path_factory.mktemp("hf") / "tiny-llama"
    LlamaForCausalLM(cfg).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_hf_model_passkey_is_decoded_greedily_and_repeat_scored(llama_dir, text_dataset, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from lenx.hf import model_subject

    out = tmp_path / "res"
    assert main(["eval", "--model", str(llama_dir), "--dataset", str(text_dataset), "--lengths", "64",
                 "--probe", "passkey,repeat", "--no-perplexity", "--probe-trials", "2", "--probe-depths", "0,1",
                 "--passkey-format", "short", "--rope-scaling", "none,pi", "--out", str(out)]) == 0
    df = pd.read_csv(out / "probes.csv")
    assert set(df["rope_scaling"]) == {"none", "pi"} and not (out / "results.csv").exists()
    pk = df[df.probe == "passkey"]
    assert (pk["match"] == "text").all() and (df.loc[df.probe == "repeat", "match"] == "tokens").all()
    assert df["gain"].notna().sum() == (df.probe == "repeat").sum() and pk["accuracy"].between(0, 1).all()
    # the exact matches, recomputed with transformers' own greedy generate on the cell's documents
    tok = HFTokenizer.load(str(llama_dir), local_only=True)
    hay = haystack_stream(token_stream(DataSpec(str(text_dataset)), tok, "test"), tok.eod_id)
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    subject = model_subject(str(llama_dir))
    subject.open("cpu")
    forward = subject.prepare("none", None)
    assert forward.decodes
    for _, row in pk[pk.rope_scaling == "none"].iterrows():
        rng = np.random.default_rng(int(row["cell_seed"]))
        hits = 0
        for _ in range(2):
            d = passkey(tok, hay, int(row["eval_len"]), float(row["depth"]), rng, FORMATS["short"])
            prompt = torch.from_numpy(d.tokens[:d.answer[0]])[None]
            gen = model.generate(prompt, max_new_tokens=max(10, 2 * len(d.answer)), do_sample=False,
                                 pad_token_id=tok.eod_id)
            new = gen[0, prompt.shape[1]:].numpy()
            assert (forward.greedy(d.tokens[:d.answer[0]], max(10, 2 * len(d.answer))) == new).all()
            text = tok.decode(new)
            hits += (pc.first_integer(text) == d.key)
        assert row["exact_match"] == pytest.approx(hits / 2)
    # the papers' wording by default: too long for a 64-token window of this tokenizer, a note says so
    out2 = tmp_path / "res2"
    assert main(["eval", "--model", str(llama_dir), "--dataset", str(text_dataset), "--lengths", "64",
                 "--probe", "passkey", "--no-perplexity", "--probe-trials", "2", "--out", str(out2)]) == 0
    notes = pd.read_csv(out2 / "probes.csv")
    assert (notes["format"] == "landmark").all() and notes["accuracy"].isna().all()
    assert notes["note"].str.contains("'landmark' passkey wording takes").all()
    capsys.readouterr()
    code = main(["eval", "--model", str(llama_dir), "--dataset", str(text_dataset), "--lengths", "64",
                 "--probe", "mqar", "--no-perplexity", "--out", str(tmp_path / "r3")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "takes passkey, repeat" in err, err
