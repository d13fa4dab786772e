"""The training mix: probe rows in the batches, a function of (seed, step) alone, in the share asked for."""

import json

import numpy as np
import pytest
import torch

from lenx.cli import main
from lenx.config import TrainConfig
from lenx.data import get_tokenizer
from lenx.errors import LenxError
from lenx.mix import Mix, parse_mix
from lenx.train import get_batch

from .test_training import TINY, stop_training_at


def _mix(shares, L=64):
    tok = get_tokenizer("byte")
    text = ("The quick brown fox jumps over the lazy dog. " * 400).encode()
    stream = np.frombuffer(text, dtype=np.uint8).astype(np.uint16)
    return Mix.of(shares, tok, stream, L), stream


def test_mix_is_parsed_from_a_flag_or_a_mapping_and_bad_ones_are_one_line():
    assert parse_mix("passkey:0.1, mqar:0.05") == {"passkey": 0.1, "mqar": 0.05}
    assert parse_mix({"repeat": 1}) == {"repeat": 1.0} and parse_mix("") == {} and parse_mix({}) == {}
    for bad, msg in [("passkey", "has no share"), ("foo:0.1", "unknown probe 'foo'; known: passkey, mqar, repeat"),
                     ("passkey:x", "must be a number"), ("passkey:0", r"must lie in \(0, 1\]"),
                     ("passkey:0.6,mqar:0.6", "add up to 1.2"), ("passkey:0.1,passkey:0.2", "twice")]:
        with pytest.raises(LenxError, match=msg):
            parse_mix(bad)


def test_batches_are_a_function_of_seed_and_step_and_the_share_is_what_was_asked():
    mix, stream = _mix({"passkey": 0.2, "mqar": 0.1})
    cfg = TrainConfig(train_len=64, seed=3)
    a = mix.apply(get_batch(stream, cfg, 7, 16), 3, 7)
    b = mix.apply(get_batch(stream, cfg, 7, 16), 3, 7)
    assert torch.equal(a, b)  # the same (seed, step): the same batch, whatever came before
    assert not torch.equal(a, mix.apply(get_batch(stream, cfg, 8, 16), 3, 8))
    kinds = [k for step in range(300) for k in mix.kinds(16, 3, step)]
    n = len(kinds)
    for probe, share in (("passkey", 0.2), ("mqar", 0.1)):
        got = kinds.count(probe) / n  # binomial: within 4 standard errors
        assert abs(got - share) < 4 * (share * (1 - share) / n) ** 0.5, (probe, got)
    text_rows = [r for r, k in enumerate(mix.kinds(16, 3, 7)) if k == ""]
    plain = get_batch(stream, cfg, 7, 16)
    assert torch.equal(a[text_rows], plain[text_rows])  # the text rows are get_batch's own
    for r, k in enumerate(mix.kinds(16, 3, 7)):
        if k == "passkey":
            assert b"The pass key is" in bytes(a[r].tolist())
    assert a.shape == (16, 65)


def test_a_mix_that_cannot_fit_the_training_length_is_refused():
    with pytest.raises(LenxError, match="--mix passkey: .*raise --train-len"):
        _mix({"passkey": 0.1}, L=16)


def test_training_with_a_mix_records_it_and_resumes_bit_exact(tmp_path, text_dataset, monkeypatch):
    """run.json records the mix and config_id tells it apart from the same run without it; a run stopped after its
    checkpoint and resumed ends bit-identical to one never stopped."""
    from safetensors.torch import load_file

    from lenx.ids import config_id

    args = ["train", "--pe", "rope", *TINY[:-4], "--train-len", "64", "--steps", "6", "--save-every", "3",
            "--precision", "fp32", "--dataset", str(text_dataset)]
    assert main([*args, "--mix", "passkey:0.5", "--out", str(tmp_path / "ref")]) == 0
    assert main([*args, "--out", str(tmp_path / "plain")]) == 0
    ref, plain = (json.loads((tmp_path / d / "run.json").read_text()) for d in ("ref", "plain"))
    assert ref["config"]["mix"] == {"passkey": 0.5} and plain["config"]["mix"] == {}
    assert config_id(ref) != config_id(plain)
    old = {**plain, "config": {k: v for k, v in plain["config"].items() if k != "mix"}}
    assert config_id(old) == config_id(plain)  # a run from before --mix keeps its id

    stop_training_at(monkeypatch, 4)
    assert main([*args, "--mix", "passkey:0.5", "--out", str(tmp_path / "cut")]) != 0
    monkeypatch.undo()
    assert main([*args, "--mix", "passkey:0.5", "--out", str(tmp_path / "cut")]) == 0
    a, b = load_file(tmp_path / "ref" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = load_file(tmp_path / "plain" / "model.safetensors")
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the mix changed what it trained on


def test_byte_key_passkeys_put_one_reserved_byte_where_the_key_goes():
    """The byte-key wording: the key is one byte of 128-137, twice in the needle and once as the window's last token
    (the answer), which text never holds alone; other tokenizers are refused with the fix."""
    from lenx.probes.documents import FORMATS, passkey, passkey_overhead

    tok = get_tokenizer("byte")
    hay = np.frombuffer(b"def f(x):\n    return x + 1\n" * 50, dtype=np.uint8).astype(np.int64)
    fmt = FORMATS["byte-key"]
    for seed in range(20):
        d = passkey(tok, hay, 129, seed / 19, seed, fmt)
        key = int(d.key)
        assert 128 <= key <= 137 and len(d.tokens) == 129 and list(d.answer) == [128]
        assert d.tokens[-1] == key and (d.tokens == key).sum() == 3
        assert bytes(d.tokens[-40:-1].tolist()).endswith(b" What is the pass key? The pass key is ")
    needle, question = fmt.needle.replace("{key}", "k"), fmt.question + " k"
    assert passkey_overhead(tok, fmt) == len(needle.encode()) + len(question.encode())  # the rest is haystack

    class Other:
        vocab_size = 1000

    with pytest.raises(LenxError, match="byte tokenizer; use --passkey-format short"):
        passkey(Other(), hay, 129, 0.5, 0, fmt)


def test_a_run_trained_on_byte_key_passkeys_is_probed_in_that_wording(tmp_path, text_dataset):
    """--passkey-format of lenx train sets the mix's wording, run.json records it, and eval's auto wording follows it."""
    from lenx.subject import LenxRun

    out = tmp_path / "run"
    assert main(["train", "--pe", "alibi", *TINY[:-4], "--train-len", "128", "--steps", "2", "--mix", "passkey:0.5",
                 "--passkey-format", "byte-key", "--dataset", str(text_dataset), "--out", str(out)]) == 0
    assert json.loads((out / "run.json").read_text())["config"]["passkey_format"] == "byte-key"
    assert LenxRun(out).passkey_format == "byte-key"
    assert main(["eval", str(out), "--lengths", "128", "--probe", "passkey", "--probe-trials", "2",
                 "--probe-depths", "0.5", "--no-perplexity", "--out", str(tmp_path / "res")]) == 0
    import pandas as pd

    rows = pd.read_csv(tmp_path / "res" / "probes.csv")
    assert list(rows["format"]) == ["byte-key"] and rows["answers"].iloc[0] == 2  # one key token per trial
