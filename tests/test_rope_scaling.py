"""RoPE extensions with parameters (`lenx.positional.rope_scaling`): llama3, longrope and YaRN's knobs against
transformers' ROPE_INIT_FUNCTIONS, the settings' text, and their rows from `lenx eval` on a lenx run."""

import json

import pandas as pd
import pytest
import torch

from lenx.cli import main
from lenx.positional.rope_scaling import (METHODS, PARAM_COLUMNS, ScalingError, canonical, columns,
                                          default_long_factor, frequencies, rope_inv_freq)

from .test_hf import make_run, one_line_error

CASES = [(32, 10000.0, 4.0, 16), (64, 10000.0, 8.0, 2048), (128, 500000.0, 2.5, 4096), (64, 10000.0, 16.0, 128)]


def hf(params: dict, head_dim: int, base: float, train_len: int, seq_len=None):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = LlamaConfig(hidden_size=2 * head_dim, num_attention_heads=2, head_dim=head_dim,
                      max_position_embeddings=train_len,
                      rope_parameters={"rope_theta": base, "original_max_position_embeddings": train_len, **params})
    inv, attn = ROPE_INIT_FUNCTIONS[params["rope_type"]](cfg, "cpu", seq_len=seq_len)
    return inv.double(), attn


@pytest.mark.parametrize("head_dim, base, factor, train_len", CASES)
@pytest.mark.parametrize("low, high", [(1.0, 4.0), (2.0, 8.0), (0.5, 3.0)])
def test_llama3_matches_transformers(head_dim, base, factor, train_len, low, high):
    setting = canonical(f"llama3:low_freq_factor={low}:high_freq_factor={high}")
    inv, attn = frequencies(head_dim, base, setting, factor, train_len)
    theirs, their_attn = hf({"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                             "high_freq_factor": high}, head_dim, base, train_len)
    torch.testing.assert_close(inv, theirs, atol=1e-6, rtol=1e-6)
    assert attn == their_attn == 1.0


@pytest.mark.parametrize("head_dim, base, factor, train_len", CASES)
def test_longrope_matches_transformers_with_given_factors(head_dim, base, factor, train_len, tmp_path):
    g = torch.Generator().manual_seed(head_dim)
    long = (1 + (factor - 1) * torch.rand(head_dim // 2, generator=g)).tolist()
    short = (1 + 0.2 * torch.rand(head_dim // 2, generator=g)).tolist()
    path = tmp_path / "factors.json"
    path.write_text(json.dumps({"long_factor": long, "short_factor": short}))
    setting = canonical(f"longrope:factors={path}")
    for seq_len in (train_len // 2, train_len, train_len + 1, 16 * train_len):  # short up to L, long past it
        inv, attn = frequencies(head_dim, base, setting, factor, train_len, seq_len)
        theirs, their_attn = hf({"rope_type": "longrope", "factor": factor, "long_factor": long,
                                 "short_factor": short}, head_dim, base, train_len, seq_len)
        torch.testing.assert_close(inv, theirs, atol=1e-6, rtol=1e-6)
        assert attn == pytest.approx(their_attn, abs=1e-9)
    # a Phi-3 style config.json holds them under rope_scaling
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "phi3", "rope_scaling": {"type": "longrope", "long_factor": long,
                                                                       "short_factor": short}}))
    torch.testing.assert_close(frequencies(head_dim, base, f"longrope:factors={cfg}", factor, train_len,
                                           4 * train_len)[0],
                               frequencies(head_dim, base, setting, factor, train_len, 4 * train_len)[0])


@pytest.mark.parametrize("head_dim, base, factor, train_len", CASES)
def test_longrope_default_factors_are_yarns_frequencies_and_transformers_agrees(head_dim, base, factor, train_len):
    long = default_long_factor(head_dim, base, factor, train_len)
    yarn, _ = frequencies(head_dim, base, "yarn", factor, train_len)
    inv, attn = frequencies(head_dim, base, "longrope", factor, train_len, 2 * train_len)
    torch.testing.assert_close(inv, yarn, atol=1e-12, rtol=1e-12)
    theirs, their_attn = hf({"rope_type": "longrope", "factor": factor, "long_factor": long.tolist(),
                             "short_factor": [1.0] * (head_dim // 2)}, head_dim, base, train_len, 2 * train_len)
    torch.testing.assert_close(inv, theirs, atol=1e-6, rtol=1e-6)
    assert attn == pytest.approx(their_attn) and attn > 1
    # up to L: the short factors (1), the model's own frequencies
    torch.testing.assert_close(frequencies(head_dim, base, "longrope", factor, train_len, train_len)[0],
                               rope_inv_freq(head_dim, base))


@pytest.mark.parametrize("head_dim, base, factor, train_len", CASES)
@pytest.mark.parametrize("fast, slow, attn", [(32, 1, None), (16, 2, None), (64, 0.5, 1.0), (8, 1, 1.3)])
def test_yarn_knobs_match_transformers(head_dim, base, factor, train_len, fast, slow, attn):
    text = f"yarn:beta_fast={fast}:beta_slow={slow}" + (f":attention_factor={attn}" if attn else "")
    inv, ours_attn = frequencies(head_dim, base, canonical(text), factor, train_len)
    params = {"rope_type": "yarn", "factor": factor, "beta_fast": fast, "beta_slow": slow}
    if attn:
        params["attention_factor"] = attn
    theirs, their_attn = hf(params, head_dim, base, train_len)
    torch.testing.assert_close(inv, theirs, atol=1e-6, rtol=1e-6)
    assert ours_attn == pytest.approx(their_attn, abs=1e-6)


@pytest.mark.parametrize("setting", ["pi", "ntk", "yarn", "yarn:beta_fast=8", "llama3", "longrope",
                                     "llama3:low_freq_factor=2:high_freq_factor=3"])
def test_at_factor_1_every_static_method_is_the_model_itself(setting):
    """Inside the training length (s = 1) the frequencies and the factor on cos, sin are the unmodified ones,
    exactly."""
    d, base = 64, 10000.0
    inv, attn = frequencies(d, base, setting, 1.0, 128, 128)
    assert torch.equal(inv, rope_inv_freq(d, base)) and attn == 1.0


def test_the_settings_text_is_canonical():
    assert canonical("yarn") == canonical("yarn:beta_fast=32") == canonical("yarn:beta_slow=1.0") == "yarn"
    assert canonical("yarn:beta_slow=2:beta_fast=16") == canonical("yarn:beta_fast=16.0:beta_slow=2") == \
        "yarn:beta_fast=16:beta_slow=2"
    assert canonical("llama3:high_freq_factor=4.5") == "llama3:high_freq_factor=4.5"


@pytest.mark.parametrize("text, needle", [
    ("yarm", "unknown RoPE extension 'yarm' (did you mean 'yarn'?); known: none, pi, ntk"),
    ("yarn:beta_fats=16", "yarn has no parameter 'beta_fats' (did you mean 'beta_fast'?); its parameters: "
                          "beta_fast, beta_slow, attention_factor"),
    ("pi:factor=2", "pi has no parameter 'factor'; its parameters: logn"),
    ("yarn:beta_fast", "parameter beta_fast needs a value"),
    ("yarn:beta_fast=-1", "beta_fast must be a positive number, got '-1'"),
    ("yarn:beta_fast=1:beta_slow=2", "beta_fast (1) must exceed beta_slow (2)"),
    ("llama3:low_freq_factor=4", "high_freq_factor (4) must exceed low_freq_factor (4)"),
    ("longrope:factors=/nowhere.json", "longrope factors file /nowhere.json does not exist"),
    ("rerope:window=2.5", "window is a number of tokens, a whole number"),
    ("rerope:logn=2", "logn is 0 (off) or 1 (on)"),
    ("leaky-rerope:leak=0.5", "leak (0.5) must be at least 1"),
    ("dca:chunk=10:local=10", "local (10) must be below chunk (10)"),
    ("sinks:window=0", "window must be a positive number"),
    ("self-extnd", "did you mean 'self-extend'"),
])
def test_bad_settings_say_what_is_wrong(text, needle):
    with pytest.raises(ScalingError) as e:
        canonical(text)
    assert needle in str(e.value), str(e.value)


def test_every_method_and_parameter_has_its_column():
    assert set(PARAM_COLUMNS) == {"rope_" + p for m in METHODS.values() for p in m.params}
    row = columns("yarn:beta_fast=16", 4.0, 128)
    assert row["rope_beta_fast"] == 16 and row["rope_beta_slow"] == 1
    assert row["rope_attention_factor"] == pytest.approx(0.1 * torch.log(torch.tensor(4.0)).item() + 1)
    assert row["rope_low_freq_factor"] is None
    assert columns("longrope", 4.0, 128)["rope_factors"] == "default"
    assert all(v is None for v in columns("none", None, 128).values())


def test_eval_sweeps_settings_in_one_command_and_records_their_parameters(tmp_path, text_dataset):
    run = make_run(tmp_path / "runs", "rope")
    out = tmp_path / "res"
    args = ["eval", str(run), "--dataset", str(text_dataset), "--lengths", "16,64", "--tokens", "128",
            "--rope-scaling", "none,yarn,yarn:beta_fast=4:beta_slow=0.25,llama3,longrope", "--out", str(out)]
    assert main(args) == 0
    df = pd.read_parquet(out / "results.parquet")
    assert sorted(df.rope_scaling.unique()) == ["llama3", "longrope", "none", "yarn", "yarn:beta_fast=4:beta_slow=0.25"]
    knob = df[df.rope_scaling == "yarn:beta_fast=4:beta_slow=0.25"].set_index("eval_len")
    assert (knob.rope_beta_fast == 4).all() and (knob.rope_beta_slow == 0.25).all()
    assert knob.loc[64, "rope_attention_factor"] == pytest.approx(0.1 * torch.log(torch.tensor(4.0)).item() + 1)
    ll = df[df.rope_scaling == "llama3"]
    assert (ll.rope_low_freq_factor == 1).all() and (ll.rope_high_freq_factor == 4).all()
    nll = df.set_index(["rope_scaling", "eval_len"])["nll"]
    for s in ("yarn", "llama3", "longrope", "yarn:beta_fast=4:beta_slow=0.25"):
        assert nll[(s, 16)] == pytest.approx(nll[("none", 16)], abs=1e-6)  # 1x: s = 1, the model itself
        assert nll[(s, 64)] != pytest.approx(nll[("none", 64)], abs=1e-7)
    assert nll[("yarn", 64)] != pytest.approx(nll[("yarn:beta_fast=4:beta_slow=0.25", 64)], abs=1e-6)
    assert nll[("yarn", 64)] != pytest.approx(nll[("longrope", 64)], abs=1e-6)  # same frequencies, other factor
    # the same settings again, named otherwise: every cell is already there
    assert main(["report", str(out)]) == 0  # each setting its own row and line, beside the model as trained
    md = (out / "report.md").read_text()
    for lab in ("rope+yarn:beta_fast=4:beta_slow=0.25", "rope+llama3", "rope+longrope", "| rope |"):
        assert lab in md, lab
    again = list(args)
    again[args.index("--rope-scaling") + 1] = "none,yarn:beta_fast=32,yarn:beta_slow=0.25:beta_fast=4.0,llama3,longrope"
    before = pd.read_parquet(out / "results.parquet")["timestamp"].tolist()
    assert main(again) == 0
    assert pd.read_parquet(out / "results.parquet")["timestamp"].tolist() == before


def test_a_bad_setting_is_one_line_and_writes_nothing(tmp_path, text_dataset, capsys):
    run = make_run(tmp_path / "runs", "rope")
    capsys.readouterr()  # transformers' saving bar
    code = main(["eval", str(run), "--dataset", str(text_dataset), "--rope-scaling", "yarn:beta_fats=16",
                 "--out", str(tmp_path / "res")])
    one_line_error(capsys, code, "--rope-scaling 'yarn:beta_fats=16': yarn has no parameter", "did you mean 'beta_fast'")
    assert not (tmp_path / "res").exists()
    code = main(["eval", str(run), "--dataset", str(text_dataset), "--rope-scaling", "longrope:factors=x.json",
                 "--out", str(tmp_path / "res")])
    one_line_error(capsys, code, "x.json does not exist")
    assert not (tmp_path / "res").exists()
