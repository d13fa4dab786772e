"""Any Hugging Face causal LM through `lenx eval --model`; lenx runs through plain transformers; `lenx export`.

Every model and tokenizer here is built locally (tiny, random weights; a BPE tokenizer trained on the test's own
text), saved with save_pretrained and loaded back from disk: nothing touches the network.
"""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import lenx  # noqa: F401  (registers the lenx model type with transformers)
from lenx.cli import main
from lenx.data import EOD_TOKEN, ByteTokenizer, DataSpec, get_tokenizer, load_run_tokenizer, token_stream
from lenx.subject import load_model

from .conftest import tiny_model

TRICKY = "naïve café — 日本語 🙂\ttab\r\nCRLF \x00 NUL <|endoftext|> \u2581 ##x \\u00e9 end"


def lenx_cli(*args) -> int:
    return main([str(a) for a in args])


def one_line_error(capsys, code: int, *needles: str) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("lenx: error: "), err
    for n in needles:
        assert n in err, err
    return err


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    """A byte-level BPE tokenizer (vocabulary 300, eos <|endoftext|>) as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, 40)) for _ in range(200)]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=[EOD_TOKEN], show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=EOD_TOKEN)


def _save(model, tok, path: Path) -> Path:
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, hf_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(hf_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      initializer_range=0.3, eos_token_id=hf_tokenizer.eos_token_id, bos_token_id=None)
    return _save(LlamaForCausalLM(cfg).eval(), hf_tokenizer, tmp_path_factory.mktemp("hf") / "tiny-llama")


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, hf_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(hf_tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=32,
                     bos_token_id=hf_tokenizer.eos_token_id, eos_token_id=hf_tokenizer.eos_token_id)
    return _save(GPT2LMHeadModel(cfg).eval(), hf_tokenizer, tmp_path_factory.mktemp("hf") / "tiny-gpt2")


def _own_loss(model_dir: Path, window: np.ndarray, limit: int = 10**9) -> float:
    """The mean loss the model itself returns for this window of L + 1 tokens (L targets): labels = input_ids;
    when L + 1 tokens do not fit its position table, the L inputs with transformers' `shift_labels` = the L targets."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.from_numpy(np.asarray(window, dtype=np.int64))[None]
    with torch.no_grad():
        if ids.shape[1] <= limit:
            return float(model(input_ids=ids, labels=ids, use_cache=False).loss)
        x = ids[:, :-1]
        return float(model(input_ids=x, labels=x, shift_labels=ids[:, 1:], use_cache=False).loss)


def _stream(model_dir: Path, dataset: Path) -> np.ndarray:
    from lenx.data import HFTokenizer

    return np.asarray(token_stream(DataSpec(str(dataset)), HFTokenizer.load(str(model_dir), local_only=True), "test"))


@pytest.mark.parametrize("which", ["llama_dir", "gpt2_dir"])
def test_nll_equals_the_models_own_loss(which, request, text_dataset, tmp_path):
    model_dir = request.getfixturevalue(which)
    res = tmp_path / "res"
    assert lenx_cli("eval", "--model", model_dir, "--dataset", text_dataset, "--lengths", "16,32", "--tokens", "32",
                    "--out", res) == 0
    df = pd.read_csv(res / "results.csv").set_index("eval_len")
    stream = _stream(model_dir, text_dataset)
    for L in (16, 32):
        windows = [stream[i * L: (i + 1) * L + 1] for i in range(32 // L)]
        want = np.mean([_own_loss(model_dir, w, limit=32) for w in windows])  # equal-sized windows: the mean of means
        assert df.loc[L, "nll"] == pytest.approx(want, abs=1e-5)
        assert df.loc[L, "tokens"] == 32 and df.loc[L, "bytes"] > 32  # byte-level BPE: exact bytes, > 1 per token
    row = df.loc[32]
    assert row["run"] == model_dir.name and pd.isna(row["seed"]) and row["train_len"] == 32 and row["ratio"] == 1
    assert row["pe"] == {"llama_dir": "llama/rope", "gpt2_dir": "gpt2/learned"}[which]
    assert row["tokenizer"] == str(model_dir) and row["attn_backend"] == "sdpa"
    pos = pd.read_parquet(res / "results_by_position.parquet")
    assert pos.groupby("eval_len")["tokens"].sum().to_dict() == {16: 32, 32: 32}


def test_dynamic_ntk_changes_only_past_1x(llama_dir, text_dataset, tmp_path):
    res = tmp_path / "res"
    assert lenx_cli("eval", "--model", llama_dir, "--dataset", text_dataset, "--lengths", "16,32,128", "--tokens",
                    "128", "--rope-scaling", "none,dynamic-ntk", "--out", res) == 0
    df = pd.read_csv(res / "results.csv")
    nll = df.set_index(["rope_scaling", "eval_len"])["nll"]
    assert nll["dynamic-ntk", 16] == nll["none", 16] and nll["dynamic-ntk", 32] == nll["none", 32]
    assert abs(nll["dynamic-ntk", 128] - nll["none", 128]) > 1e-4
    assert df[df.rope_scaling == "dynamic-ntk"]["rope_factor"].isna().all()


def test_pi_goes_through_transformers_linear_rope(llama_dir, text_dataset, tmp_path):
    """--rope-scaling pi at 2x: the NLL of the model loaded with rope_parameters linear, factor 2."""
    from transformers import AutoConfig, AutoModelForCausalLM

    res = tmp_path / "res"
    assert lenx_cli("eval", "--model", llama_dir, "--dataset", text_dataset, "--lengths", "64", "--tokens", "64",
                    "--rope-scaling", "pi", "--out", res) == 0
    row = pd.read_csv(res / "results.csv").iloc[0]
    assert row["rope_factor"] == 2.0
    cfg = AutoConfig.from_pretrained(llama_dir)
    cfg.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": cfg.rope_parameters["rope_theta"]}
    model = AutoModelForCausalLM.from_pretrained(llama_dir, config=cfg).eval()
    ids = torch.from_numpy(_stream(llama_dir, text_dataset)[:65].astype(np.int64))[None]
    with torch.no_grad():
        assert row["nll"] == pytest.approx(float(model(input_ids=ids, labels=ids).loss), abs=1e-5)
        assert row["nll"] != pytest.approx(_own_loss(llama_dir, ids[0].numpy()), abs=1e-5)


@pytest.mark.parametrize("setting, params", [
    ("llama3", {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0}),
    ("llama3:high_freq_factor=8:low_freq_factor=2", {"rope_type": "llama3", "low_freq_factor": 2.0,
                                                     "high_freq_factor": 8.0}),
    ("yarn:attention_factor=1.2:beta_fast=8:beta_slow=0.5", {"rope_type": "yarn", "beta_fast": 8.0,
                                                             "beta_slow": 0.5, "attention_factor": 1.2}),
    ("longrope", {"rope_type": "longrope"}),
])
def test_rope_types_with_parameters_go_through_transformers(setting, params, llama_dir, text_dataset, tmp_path):
    """At 2x (s = 2, original length 32): the NLL of the model loaded with those rope_parameters by hand, and its
    parameters in the row."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lenx.positional.rope_scaling import default_long_factor

    res = tmp_path / "res"
    assert lenx_cli("eval", "--model", llama_dir, "--dataset", text_dataset, "--lengths", "64", "--tokens", "64",
                    "--rope-scaling", setting, "--out", res) == 0
    row = pd.read_csv(res / "results.csv").iloc[0]
    assert row["rope_scaling"] == setting and row["rope_factor"] == 2.0
    for k, v in params.items():
        if k != "rope_type":
            assert row[f"rope_{k}"] == pytest.approx(v), k
    cfg = AutoConfig.from_pretrained(llama_dir)
    theta = cfg.rope_parameters["rope_theta"]
    params = {**params, "factor": 2.0, "rope_theta": theta, "original_max_position_embeddings": 32}
    if setting == "longrope":
        assert row["rope_factors"] == "default"
        long = default_long_factor(cfg.head_dim, theta, 2.0, 32).tolist()
        params.update(long_factor=long, short_factor=[1.0] * len(long))
    cfg.rope_parameters = params
    model = AutoModelForCausalLM.from_pretrained(llama_dir, config=cfg).eval()
    ids = torch.from_numpy(_stream(llama_dir, text_dataset)[:65].astype(np.int64))[None]
    with torch.no_grad():
        assert row["nll"] == pytest.approx(float(model(input_ids=ids, labels=ids).loss), abs=1e-5)
        assert row["nll"] != pytest.approx(_own_loss(llama_dir, ids[0].numpy()), abs=1e-6)


def test_longrope_factors_of_the_wrong_length_are_refused_before_anything_is_written(llama_dir, text_dataset,
                                                                                   tmp_path, capsys):
    path = tmp_path / "f.json"
    path.write_text(json.dumps({"long_factor": [1.0] * 3, "short_factor": [1.0] * 3}))
    code = lenx_cli("eval", "--model", llama_dir, "--dataset", text_dataset, "--rope-scaling",
                    f"longrope:factors={path}", "--out", tmp_path / "res")
    one_line_error(capsys, code, "has 3 factors per list", "rotates 4 pairs")
    assert not (tmp_path / "res").exists()


def test_gpt2_past_its_table_is_an_empty_row_with_a_note(gpt2_dir, text_dataset, tmp_path):
    res = tmp_path / "res"
    assert lenx_cli("eval", "--model", gpt2_dir, "--dataset", text_dataset, "--lengths", "32,64", "--tokens", "64",
                    "--protocol", "nonoverlap,truncate", "--out", res) == 0
    df = pd.read_csv(res / "results.csv").set_index(["eval_len", "protocol"])
    assert df.loc[(32, "nonoverlap"), "ppl"] > 0
    for protocol in ("nonoverlap", "truncate"):
        row = df.loc[(64, protocol)]
        assert pd.isna(row["ppl"]) and row["tokens"] == 0 and "learned positions" in row["note"], row["note"]


def test_scaling_needs_rope(gpt2_dir, llama_dir, text_dataset, tmp_path, capsys):
    code = lenx_cli("eval", "--model", gpt2_dir, "--dataset", text_dataset, "--rope-scaling", "pi", "--out", tmp_path)
    one_line_error(capsys, code, "gpt2/learned", "without RoPE")
    # static NTK: transformers has no such rope type
    code = lenx_cli("eval", "--model", llama_dir, "--dataset", text_dataset, "--rope-scaling", "ntk", "--out", tmp_path)
    one_line_error(capsys, code, "ntk", "transformers")
    assert not (tmp_path / "results.csv").exists()


def test_out_of_memory_is_a_row_and_the_sweep_goes_on(llama_dir, text_dataset, tmp_path, monkeypatch):
    """Fault injection: the model runs out of memory at 64 tokens (as a GPU would at a long length); that cell is
    a row with an empty ppl and a note, the next length still runs, and a rerun tries the failed cell again."""
    from lenx import hf

    real = hf.HFForward.__call__

    def limited(self, input_ids):
        if input_ids.shape[1] >= 64:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, input_ids)

    monkeypatch.setattr(hf.HFForward, "__call__", limited)
    res = tmp_path / "res"
    args = ["eval", "--model", llama_dir, "--dataset", text_dataset, "--lengths", "32,64,48", "--tokens", "192",
            "--out", res]
    assert lenx_cli(*args) == 0
    df = pd.read_csv(res / "results.csv").set_index("eval_len")
    assert pd.isna(df.loc[64, "ppl"]) and df.loc[64, "note"].startswith("out of memory")
    assert df.loc[32, "ppl"] > 0 and df.loc[48, "ppl"] > 0
    monkeypatch.setattr(hf.HFForward, "__call__", real)
    assert lenx_cli(*args) == 0
    df = pd.read_csv(res / "results.csv").set_index("eval_len")
    assert len(df) == 3 and df.loc[64, "ppl"] > 0


def test_a_model_directory_saved_again_is_not_reported_with_its_old_numbers(llama_dir, text_dataset, tmp_path, capsys):
    """A local --model directory is fingerprinted (config.json and safetensors), as a lenx run's weights are."""
    import shutil

    from safetensors.torch import load_file, save_file

    model_dir = tmp_path / "model"
    shutil.copytree(llama_dir, model_dir)
    cell = ["--model", model_dir, "--dataset", text_dataset, "--lengths", "16", "--tokens", "32", "--out", tmp_path / "res"]
    assert lenx_cli("eval", *cell) == 0
    assert lenx_cli("eval", *cell) == 0  # the same files: the finished cell stands
    weights = load_file(model_dir / "model.safetensors")
    save_file({k: v * 1.01 for k, v in weights.items()}, model_dir / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    one_line_error(capsys, lenx_cli("eval", *cell), "computed from other weights", "another --out")
    shutil.copy(llama_dir / "model.safetensors", model_dir / "model.safetensors")
    assert lenx_cli("eval", *cell) == 0  # the weights back as they were: the cell is theirs again
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "rope_theta": 500.0}))
    capsys.readouterr()
    one_line_error(capsys, lenx_cli("eval", *cell), "computed from other weights")


def test_one_model_directory_named_two_ways_is_one_experiment(llama_dir, text_dataset, tmp_path, monkeypatch):
    """The same local --model directory given by a relative and by an absolute path is one model: one config_id,
    one tokenizer, one report row (not two tagged rows and a bits-per-byte table for 'different tokenizers')."""
    import shutil

    from lenx.stats import summarise

    shutil.copytree(llama_dir, tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    res = tmp_path / "res"
    common = ["--dataset", text_dataset, "--tokens", "32", "--out", res]
    assert lenx_cli("eval", "--model", "model", "--lengths", "16", *common) == 0
    assert lenx_cli("eval", "--model", tmp_path / "model", "--lengths", "16,32", *common) == 0
    df = pd.read_csv(res / "results.csv")
    assert df["config_id"].nunique() == 1 and df["tokenizer"].nunique() == 1, df[["config_id", "tokenizer"]]
    assert list(summarise(df)["scheme"].unique()) == ["llama/rope"]


def test_model_errors_are_one_line(tmp_path, capsys, text_dataset):
    code = lenx_cli("eval", "--model", "no-such-org/no-such-model", "--out", tmp_path)
    one_line_error(capsys, code, "no-such-org/no-such-model", "--model DIR")
    code = lenx_cli("eval", "--model", tmp_path, "--out", tmp_path / "o")
    one_line_error(capsys, code, "config.json")
    code = lenx_cli("eval", "--dtype", "bfloat16", "--out", tmp_path / "o")
    one_line_error(capsys, code, "--model")
    for missing in (tmp_path / "gone", "gone/", "./gone"):  # a path that is not there, not a hub problem
        code = lenx_cli("eval", "--model", missing, "--out", tmp_path / "o")
        one_line_error(capsys, code, "no such directory")


# ------------------------------------------------------------------------------ lenx runs in transformers


def make_run(root: Path, pe: str, tok=None, name: str | None = None) -> Path:
    """A finished lenx run directory (random weights) with a byte tokenizer, or the given BPE tokenizer."""
    vocab, eod = (257, 256) if tok is None else (tok.vocab_size, tok.eod_id)
    run = root / (name or f"{pe}-L16-s0")
    tiny_model(pe, vocab_size=vocab, eod_token_id=eod, train_len=16).save_pretrained(run)
    config = {"pe": pe, "seed": 0, "train_len": 16, "dataset": "stdlib", "tokenizer": "byte" if tok is None else tok.name}
    info = {"status": "done", "config": config}
    if tok is not None:
        tok.save(run)
        info["tokenizer"] = tok.info()
    (run / "run.json").write_text(json.dumps(info))
    return run


@pytest.mark.parametrize("pe", ["rope", "alibi", "learned"])
def test_lenx_run_loads_and_generates_with_plain_transformers(pe, tmp_path):
    from transformers import AutoModelForCausalLM

    run = make_run(tmp_path, pe)
    ours = load_model(run, "cpu")
    theirs = AutoModelForCausalLM.from_pretrained(run).eval()
    assert type(theirs).__name__ == "LenxForCausalLM"
    ids = torch.tensor([list(b"def f(x)")])  # + 5 new tokens: within a 16-position table
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, theirs(ids).logits)
        out = theirs.generate(ids, max_new_tokens=5, do_sample=False)
        greedy = ids
        for _ in range(5):  # the same five tokens, one full forward per step
            greedy = torch.cat([greedy, ours(greedy).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert out.shape == (1, ids.shape[1] + 5) and torch.equal(out, greedy)


def test_import_lenx_registers_the_model_type_whichever_comes_first(tmp_path):
    """`import lenx` imports neither torch nor transformers (the CLI starts fast), and transformers' Auto classes
    still load a lenx run in a fresh process, whether transformers is imported after lenx or before it, also when
    something looked transformers up (importlib.util.find_spec) before importing it."""
    import subprocess
    import sys

    run = make_run(tmp_path, "alibi")
    load = "print(type(AutoModelForCausalLM.from_pretrained(sys.argv[1])).__name__)"
    for code in (
        "import sys, lenx; assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
        f"from transformers import AutoModelForCausalLM\n{load}",
        f"import sys\nfrom transformers import AutoModelForCausalLM\nimport lenx\n{load}",
        # an availability probe (accelerate's and peft's is_transformers_available) before the import
        "import sys, importlib.util, lenx; assert importlib.util.find_spec('transformers') is not None\n"
        f"from transformers import AutoModelForCausalLM\n{load}",
    ):
        done = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True)
        assert done.returncode == 0 and done.stdout.split()[-1] == "LenxForCausalLM", done.stderr[-2000:]


def test_padding_is_refused_not_scored_wrongly(tmp_path):
    """lenx attention has no padding mask: a mask of ones is accepted, any zero is a clear error."""
    model = load_model(make_run(tmp_path, "rope"), "cpu")
    ids = torch.tensor([list(b"def f(x)")] * 2)
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=torch.ones_like(ids)).logits, model(ids).logits)
        mask = torch.ones_like(ids)
        mask[1, :3] = 0  # the second row left-padded
        with pytest.raises(ValueError, match="no padding"):
            model(ids, attention_mask=mask)


def test_position_ids_that_differ_by_row_are_refused_not_read_from_row_0(tmp_path):
    """Every positional hook takes one (T,) set of positions: rows of position_ids that agree are served (the same
    logits as without them), rows that differ are a clear error rather than every row scored at row 0's positions."""
    model = load_model(make_run(tmp_path, "rope"), "cpu")
    ids = torch.tensor([list(b"def f(x)")] * 2)
    with torch.no_grad():
        same = torch.arange(8).expand(2, 8)
        assert torch.equal(model(ids, position_ids=same).logits, model(ids).logits)
        with pytest.raises(ValueError, match="rows of position_ids differ"):
            model(ids, position_ids=torch.stack([torch.arange(8), torch.arange(3, 11)]))


def test_generate_refuses_a_padded_batch_and_generates_an_unpadded_one(tmp_path):
    """generate() hands the attention mask on to forward: a left-padded batch is the same clear error, not
    generation that attends to the pad tokens."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(make_run(tmp_path, "rope")).eval()
    prompts = [list(b"import o"), list(b"def f(a)")]  # equal lengths: no padding
    ids = torch.tensor(prompts)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
        assert out.shape == (2, ids.shape[1] + 3) and torch.equal(out[:, : ids.shape[1]], ids)
        assert torch.equal(out, model.generate(ids, max_new_tokens=3, do_sample=False))  # no mask: the same
        padded = torch.tensor([[0, 0, 0] + list(b"impor"), prompts[1]])
        mask = torch.ones_like(padded)
        mask[0, :3] = 0  # the first row left-padded, as a tokenizer with padding=True gives
        with pytest.raises(ValueError, match="lenx models take no padding"):
            model.generate(padded, attention_mask=mask, max_new_tokens=3, do_sample=False)


def test_byte_tokenizer_export_encodes_like_lenx():
    from transformers import PreTrainedTokenizerFast

    from lenx.export import byte_tokenizer_json

    tok = PreTrainedTokenizerFast(tokenizer_object=byte_tokenizer_json(), eos_token=EOD_TOKEN)
    ours = ByteTokenizer()
    for text in (TRICKY, "", " leading and trailing ", "a\n\n\nb", "".join(chr(c) for c in range(1, 400))):
        ids = tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert ids == ours.encode(text).tolist()
        assert tok.decode(ids) == text
    assert tok.eos_token_id == ours.eod_id == 256 and len(tok) == 257


@pytest.mark.parametrize("kind", ["byte", "bpe", "hf"])
def test_export_loads_with_auto_classes(kind, tmp_path, text_dataset, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    tok = None if kind == "byte" else get_tokenizer("bpe:300", str(text_dataset), progress=False)
    if kind == "hf":  # a transformers tokenizer without an eos token: lenx added id 300 for end of document
        PreTrainedTokenizerFast(tokenizer_object=tok.tk).save_pretrained(tmp_path / "hf_tok")
        tok = get_tokenizer(str(tmp_path / "hf_tok"))
        assert tok.eod_id == 300
    run = make_run(tmp_path / "runs", "rope", tok)
    res = tmp_path / "results"
    assert lenx_cli("eval", run, "--dataset", text_dataset, "--lengths", "16,32", "--tokens", "32", "--out", res) == 0
    out = tmp_path / "export"
    assert lenx_cli("export", run, "--out", out, "--results", res) == 0
    for f in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "README.md"):
        assert (out / f).exists(), f
    assert not list(tmp_path.glob(".export.*"))  # no temporary directory left behind
    card = (out / "README.md").read_text()
    assert "| pe | rope |" in card and "| 32 |" in card
    assert 'from_pretrained("export")' in card  # the exported directory, not the run it came from

    lenx_tok = load_run_tokenizer(run, "byte" if tok is None else tok.name)
    auto_tok = AutoTokenizer.from_pretrained(out)
    text = "alpha beta gamma " + TRICKY.replace(EOD_TOKEN, "")
    ids = auto_tok(text, add_special_tokens=False)["input_ids"]
    assert ids == lenx_tok.encode(text).tolist() and auto_tok.eos_token_id == lenx_tok.eod_id
    if kind != "hf":  # no length limit for RoPE (an HF tokenizer keeps its own)
        assert auto_tok.model_max_length > 10**9
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    x = torch.tensor([ids[:16]])
    with torch.no_grad():
        assert torch.equal(model(x).logits, load_model(run, "cpu")(x).logits)

    # the exported directory, scored as an HF model, gives the run's own numbers
    assert lenx_cli("eval", "--model", out, "--dataset", text_dataset, "--lengths", "16,32", "--tokens", "32",
                    "--out", tmp_path / "as_hf") == 0
    a = pd.read_csv(res / "results.csv").set_index("eval_len")
    b = pd.read_csv(tmp_path / "as_hf" / "results.csv").set_index("eval_len")
    assert (b["pe"] == "lenx/rope").all() and (b["train_len"] == 16).all()
    np.testing.assert_allclose(b["nll"], a["nll"], rtol=1e-6)
    np.testing.assert_array_equal(b["bytes"], a["bytes"])

    # an existing non-empty --out is refused, and replaced with --overwrite
    capsys.readouterr()  # (make_run's save_pretrained may have drawn a progress bar)
    code = lenx_cli("export", run, "--out", out)
    one_line_error(capsys, code, "--overwrite")
    (out / "stale.txt").write_text("old")
    assert lenx_cli("export", run, "--out", out, "--overwrite") == 0
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").exists()


def test_export_of_learned_positions_limits_the_tokenizer_to_its_table(tmp_path):
    from transformers import AutoTokenizer

    assert lenx_cli("export", make_run(tmp_path / "runs", "learned"), "--out", tmp_path / "export") == 0
    assert AutoTokenizer.from_pretrained(tmp_path / "export").model_max_length == 16  # the table's 16 positions


def test_export_never_overwrites_the_directory_holding_the_run(tmp_path, capsys):
    """`--out runs --overwrite` replaced runs/ by the export: the run and every run beside it were deleted."""
    run = make_run(tmp_path / "runs", "alibi")
    other = make_run(tmp_path / "runs", "rope")
    capsys.readouterr()
    for out in (tmp_path / "runs", tmp_path):
        code = lenx_cli("export", run, "--out", out, "--overwrite")
        one_line_error(capsys, code, f"--out {out} holds the run directory")
    assert (run / "model.safetensors").exists() and (other / "model.safetensors").exists()


def test_export_to_the_current_directory_is_one_line(tmp_path, capsys, monkeypatch):
    """`--out .` (or an empty --out) with --overwrite was an OSError traceback ('.' cannot be renamed), leaving a
    stray '..*.old' directory beside it."""
    run = make_run(tmp_path / "runs", "alibi")
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    monkeypatch.chdir(work / "sub")
    capsys.readouterr()
    for out in ("", ".", ".."):
        one_line_error(capsys, lenx_cli("export", run, "--out", out, "--overwrite"), "holds the current directory")
    assert sorted(p.name for p in work.iterdir()) == ["sub"] and not any((work / "sub").iterdir())


def test_cross_entropy_in_chunks_is_exact(monkeypatch):
    """Long windows of large vocabularies are scored in chunks of logits; the sums are the same to the bit."""
    import lenx.windows as ev

    model = tiny_model("alibi")
    w = torch.randint(0, 63, (3, 41))
    whole = ev.score_windows(model, w, None, 10**6, "cpu")
    monkeypatch.setattr(ev, "CE_CHUNK", 64 * 7)  # 7 positions per chunk, the last chunk partial
    chunked = ev.score_windows(model, w, None, 10**6, "cpu")
    assert torch.equal(whole.nll, chunked.nll) and torch.equal(whole.count, chunked.count)


def test_scheme_table_follows_the_config():
    from transformers import BertConfig, BloomConfig, FalconConfig, GPTNeoXConfig, MptConfig

    from lenx.hf import max_positions, scheme_of

    assert scheme_of(FalconConfig(alibi=True)) == "alibi" and scheme_of(FalconConfig(alibi=False)) == "rope"
    assert scheme_of(MptConfig()) == "alibi"
    assert scheme_of(BloomConfig()) == "alibi" and scheme_of(GPTNeoXConfig()) == "rope"
    assert scheme_of(BertConfig()) == "unknown"  # not in the table: `bert/unknown`
    assert max_positions(MptConfig(max_seq_len=777)) == 777 and max_positions(BloomConfig()) is None


def test_alibi_model_without_a_position_count_needs_train_len(hf_tokenizer, text_dataset, tmp_path, capsys):
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(0)
    cfg = BloomConfig(vocab_size=len(hf_tokenizer), hidden_size=32, n_layer=2, n_head=4,
                      bos_token_id=hf_tokenizer.eos_token_id, eos_token_id=hf_tokenizer.eos_token_id)
    model_dir = _save(BloomForCausalLM(cfg).eval(), hf_tokenizer, tmp_path / "tiny-bloom")
    code = lenx_cli("eval", "--model", model_dir, "--dataset", text_dataset, "--out", tmp_path / "res")
    one_line_error(capsys, code, "bloom/alibi", "--train-len")
    assert lenx_cli("eval", "--model", model_dir, "--train-len", 16, "--dataset", text_dataset, "--lengths", "16,64",
                    "--tokens", "64", "--out", tmp_path / "res") == 0
    df = pd.read_csv(tmp_path / "res" / "results.csv").set_index("eval_len")
    assert (df["pe"] == "bloom/alibi").all() and df.loc[64, "ratio"] == 4 and df["ppl"].notna().all()
    stream = _stream(model_dir, text_dataset)
    assert df.loc[64, "nll"] == pytest.approx(_own_loss(model_dir, stream[:65]), abs=1e-5)


def test_model_card_results_name_the_sliding_stride(tmp_path):
    """Two sliding-window rows that differ only by --stride are told apart in the model card."""
    from lenx.export import model_card

    rows = pd.DataFrame({"eval_len": [32, 32], "ratio": [2.0, 2.0], "protocol": ["sliding"] * 2, "stride": [8, 16],
                         "rope_scaling": ["none"] * 2, "dataset": ["stdlib"] * 2, "tokens": [64] * 2,
                         "ppl": [20.0, 21.0]})
    card = model_card(tmp_path / "rope", {"config": {"pe": "rope", "train_len": 16}}, rows)
    assert "| eval_len | ratio | protocol | stride |" in card and "| sliding | 8 |" in card, card


def test_a_lenx_run_given_as_model_is_pointed_to_lenx_eval(tmp_path, capsys):
    """A lenx run directory passed to --model (it has config.json and weights, but its byte tokenizer is lenx's):
    the error names the two ways that work, not 'save the tokenizer'."""
    run = tmp_path / "run"
    assert lenx_cli("train", "--pe", "alibi", "--train-len", "16", "--batch-size", "2", "--layers", "1", "--d-model",
                    "16", "--heads", "2", "--d-ff", "32", "--steps", "1", "--out", run) == 0
    capsys.readouterr()
    code = lenx_cli("eval", "--model", run, "--lengths", "16", "--tokens", "16", "--out", tmp_path / "r")
    one_line_error(capsys, code, f"lenx eval {run}", "lenx export")


@pytest.mark.parametrize("model_type", ["mpt", "gptj", "codegen"])
def test_position_tables_built_from_the_config_extend_past_1x(model_type, hf_tokenizer, text_dataset, tmp_path):
    """transformers sizes MPT's ALiBi bias (max_seq_len) and GPT-J's / CodeGen's rotary sin/cos (n_positions) by a
    config attribute, with no weights in them: past it the model raised a shape or index error (a traceback). lenx
    builds them for its longest length: the numbers of transformers loaded with that attribute raised, and at 1x
    those of the model as saved."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=len(hf_tokenizer), bos_token_id=hf_tokenizer.eos_token_id,
                  eos_token_id=hf_tokenizer.eos_token_id)
    size = {"mpt": dict(d_model=32, n_heads=4, n_layers=2, max_seq_len=32, expansion_ratio=2),
            "gptj": dict(n_embd=32, n_layer=2, n_head=4, n_positions=32, rotary_dim=4),
            "codegen": dict(n_embd=32, n_layer=2, n_head=4, n_positions=32, n_ctx=32, rotary_dim=4)}[model_type]
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **common, **size)).eval()
    model_dir = _save(model, hf_tokenizer, tmp_path / f"tiny-{model_type}")
    res = tmp_path / "res"
    assert lenx_cli("eval", "--model", model_dir, "--dataset", text_dataset, "--lengths", "32,64", "--tokens", "64",
                    "--out", res) == 0
    df = pd.read_csv(res / "results.csv").set_index("eval_len")
    assert (df["train_len"] == 32).all() and df["ppl"].notna().all(), df["note"]
    stream = _stream(model_dir, text_dataset)
    attr = "max_seq_len" if model_type == "mpt" else "n_positions"
    raised = AutoModelForCausalLM.from_pretrained(model_dir, **{attr: 64}).eval()
    ids = torch.from_numpy(stream[:65].astype(np.int64))[None]
    with torch.no_grad():  # 64 inputs, their 64 targets
        logits = raised(input_ids=ids[:, :-1]).logits[0]
    assert df.loc[64, "nll"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, ids[0, 1:])), abs=1e-5)
    want = np.mean([_own_loss(model_dir, stream[i * 32: (i + 1) * 32 + 1], limit=32) for i in range(2)])
    assert df.loc[32, "nll"] == pytest.approx(want, abs=1e-5)


def test_mpt_without_alibi_is_refused_not_scored_as_learned(hf_tokenizer, text_dataset, tmp_path, capsys):
    """transformers' MptModel always adds ALiBi and has no position table: an MPT config with attn_config.alibi
    false was labelled `mpt/learned` and cut at max_seq_len, while transformers ran it with ALiBi (and would drop a
    learned table from its checkpoint). It is one line now, before any text is read."""
    from transformers import MptConfig, MptForCausalLM

    cfg = MptConfig(vocab_size=len(hf_tokenizer), d_model=32, n_heads=4, n_layers=2, max_seq_len=32,
                    expansion_ratio=2, attn_config={"alibi": False})
    model_dir = _save(MptForCausalLM(cfg).eval(), hf_tokenizer, tmp_path / "tiny-mpt")
    capsys.readouterr()
    code = lenx_cli("eval", "--model", model_dir, "--dataset", text_dataset, "--out", tmp_path / "res")
    one_line_error(capsys, code, "attn_config.alibi false", "always applies ALiBi")
    assert not (tmp_path / "res").exists()


def test_model_directory_problems_are_one_line_with_the_fix(llama_dir, hf_tokenizer, text_dataset, tmp_path, capsys):
    """Each was a line whose fix did not fit (pickled weights and a config without a causal LM class: 'it needs a
    model.safetensors'; remote code and an unknown model type: 'check the directory'), the weight problems only
    after the text was read. Now each names its problem and its fix, before anything is read or written; the
    model's own Python file is never run."""
    import shutil

    from transformers import AutoModelForCausalLM, T5Config, T5ForConditionalGeneration

    def variant(name: str, **config) -> Path:
        d = tmp_path / name
        shutil.copytree(llama_dir, d)
        if config:
            (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()), **config}))
        return d

    pickled = variant("pickled")
    torch.save(AutoModelForCausalLM.from_pretrained(llama_dir).state_dict(), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    (variant("empty") / "model.safetensors").unlink()
    remote = variant("remote", model_type="my_lm", auto_map={"AutoConfig": "my_lm.MyConfig",
                                                             "AutoModelForCausalLM": "my_lm.MyLM"})
    (remote / "my_lm.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w')\n")
    variant("unknown", model_type="no_such_type")
    t5 = T5Config(vocab_size=len(hf_tokenizer), d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8)
    _save(T5ForConditionalGeneration(t5), hf_tokenizer, tmp_path / "t5")
    capsys.readouterr()
    for name, needles in {"pickled": ("pytorch_model.bin", "never reads", "save_pretrained(DIR)"),
                          "empty": ("no weights", "save_pretrained"),
                          "remote": ("my_lm", "never runs remote code"),
                          "unknown": ("no_such_type", "upgrade transformers"),
                          "t5": ("t5", "no causal LM class")}.items():
        code = lenx_cli("eval", "--model", tmp_path / name, "--dataset", text_dataset, "--out", tmp_path / "res")
        one_line_error(capsys, code, *needles)
    assert not (tmp_path / "res").exists() and not (tmp_path / "ran").exists()


def test_an_exported_run_is_scored_as_its_run(tmp_path, text_dataset):
    """`--model` on a `lenx export` directory: lenx's own RoPE extensions (ntk, which transformers lacks and HF
    models refuse) and its learned scheme's own end of table apply, with the run's numbers and notes."""
    args = ["--dataset", text_dataset, "--lengths", "16,32", "--tokens", "32"]
    for pe, extra in (("rope", ["--rope-scaling", "none,ntk,yarn"]), ("learned", [])):
        run = make_run(tmp_path / "runs", pe)
        assert lenx_cli("export", run, "--out", tmp_path / f"export-{pe}") == 0
        assert lenx_cli("eval", run, *args, *extra, "--out", tmp_path / f"run-{pe}") == 0
        assert lenx_cli("eval", "--model", tmp_path / f"export-{pe}", *args, *extra, "--out", tmp_path / f"hf-{pe}") == 0
        a, b = (pd.read_csv(tmp_path / f"{d}-{pe}" / "results.csv").set_index(["eval_len", "rope_scaling"]).sort_index()
                for d in ("run", "hf"))
        assert (b["pe"] == f"lenx/{pe}").all() and list(b.index) == list(a.index)
        np.testing.assert_allclose(b["nll"], a["nll"], rtol=1e-6)
        pd.testing.assert_series_equal(b["rope_factor"], a["rope_factor"])
        pd.testing.assert_series_equal(b["note"], a["note"])
    assert b.loc[(32, "none"), "note"] == a.loc[(32, "none"), "note"] != "" and pd.isna(b.loc[(32, "none"), "ppl"])
