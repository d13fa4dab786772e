"""Training paths: precisions, torch.compile, and gradients of the fast attention routes."""

import json

import pytest
import torch
import torch.nn.functional as F

from lenx.attention import BACKENDS, causal_attention
from lenx.cli import main

from .conftest import ALL_SCHEMES, tiny_config, tiny_model

TINY = ["--train-len", "16", "--batch-size", "8", "--layers", "1", "--d-model", "32", "--heads", "2", "--lr", "3e-3",
        "--steps", "30", "--save-every", "1000"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_reduces_the_loss(precision, tmp_path, text_dataset):
    out = tmp_path / "run"
    assert main(["train", "--pe", "rope", *TINY, "--precision", precision, "--dataset", str(text_dataset),
                 "--out", str(out)]) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["precision"] == precision and info["tokens_per_s"] > 0 and 0 < info["mfu"]
    log = [line.split(",") for line in (out / "train_log.csv").read_text().splitlines()[1:]]
    first, last = float(log[0][1]), float(log[-1][1])
    assert last < first - 0.5, (first, last)


@pytest.mark.parametrize("pe", ALL_SCHEMES)
def test_fast_path_gradients_equal_the_reference(pe):
    """Every backend that runs on this device, with gradients: the same grads as the materialised reference."""
    torch.manual_seed(3)
    x = torch.randint(0, 60, (2, 29))
    ref = tiny_model(pe, train_len=64, attn_backend="materialized")
    grads = {}
    for backend in [b for b in BACKENDS if b != "flex" or torch.cuda.is_available()]:
        model = tiny_model(pe, train_len=64, attn_backend=backend, attn_block_size=8)
        model.load_state_dict(ref.state_dict())
        logits = model(x).logits
        F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()).backward()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for backend, g in grads.items():
        assert g.keys() == grads["materialized"].keys()
        for name in g:
            torch.testing.assert_close(g[name], grads["materialized"][name], atol=1e-5, rtol=1e-4,
                                       msg=lambda m: f"{backend} {name}: {m}")


def _can_compile() -> str | None:
    from lenx.precision import compile_problem

    return compile_problem("cpu")


@pytest.mark.skipif(_can_compile() is not None, reason=str(_can_compile()))
@pytest.mark.parametrize("pe, fullgraph", [("rope", True), ("xpos", True), ("learned", True), ("alibi", False)])
def test_compiled_step_agrees_with_eager(pe, fullgraph):
    """Loss and gradients of a compiled step equal eager's. Schemes that act on the embedding or on q and k
    compile into one graph (fullgraph: no break, RoPE's rotation in real arithmetic); bias schemes compile
    with breaks where a bias reads its positions' range."""
    from lenx.precision import compile_model

    torch.manual_seed(4)
    x = torch.randint(0, 60, (2, 24))
    eager = tiny_model(pe, train_len=32)
    compiled_model = tiny_model(pe, train_len=32)
    compiled_model.load_state_dict(eager.state_dict())
    compiled = compile_model(compiled_model, fullgraph=fullgraph)

    def step(fwd, params):
        loss = F.cross_entropy(fwd(x).logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in params}

    le, ge = step(eager, eager.named_parameters())
    lc, gc = step(compiled, compiled_model.named_parameters())
    torch.testing.assert_close(lc, le, atol=1e-5, rtol=1e-5)
    for name in ge:
        torch.testing.assert_close(gc[name], ge[name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("T", [1, 29, 64, 100, 130])
@pytest.mark.parametrize("with_bias", [False, True])
def test_stored_probabilities_route_equals_the_reference_with_gradients(T, with_bias):
    """Training on the CPU in fp32 keeps each chunk's probabilities for the backward pass (_StoredProbs): outputs
    and the gradients of q, k, v and a learned distance table equal the materialised reference's, for lengths
    of one chunk, several, and not a multiple of the chunk."""
    from lenx import attention_cpu as attention
    from lenx.positional.base import TableBias

    torch.manual_seed(T)
    B, H, hd = 2, 3, 8
    qkv = torch.randn(B, T, 3, H, hd, requires_grad=True)  # q, k, v as strided views, as the model makes them
    table = torch.randn(H, T, requires_grad=True)
    leaves = (qkv, table) if with_bias else (qkv,)
    g = torch.randn(B, H, T, hd)
    outs = {}
    for backend in ("sdpa", "materialized"):
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        bias = TableBias(table, torch.arange(T) + 7) if with_bias else None
        if backend == "sdpa":
            assert attention.stored_supported(q, k, v)
        out = causal_attention(q, k, v, bias, backend)
        outs[backend] = (out, *torch.autograd.grad((out * g).sum(), leaves))
    for a, b in zip(outs["sdpa"], outs["materialized"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_stored_probabilities_route_is_for_cpu_fp32_training_within_its_memory_cap(monkeypatch):
    from lenx import attention_cpu as attention

    q = torch.randn(2, 4, 100, 8)
    trained = q.clone().requires_grad_()
    assert attention.stored_supported(trained, trained, trained)
    assert not attention.stored_supported(q, q, q)  # inference: the fused kernel, no probabilities kept
    with torch.no_grad():
        assert not attention.stored_supported(trained, trained, trained)
    bf = trained.detach().bfloat16().requires_grad_()
    assert not attention.stored_supported(bf, bf, bf)
    assert attention._stored_bytes(8, 100) == 4 * 8 * (64 * 64 + 36 * 100)
    monkeypatch.setattr(attention, "STORED_MAX_BYTES", attention._stored_bytes(8, 100) - 1)
    assert not attention.stored_supported(trained, trained, trained)  # over the cap: the fused kernel's backward


@pytest.mark.parametrize("pe", ["nope", "rope", "alibi", "t5", "kerple-log", "fire"])
def test_model_gradients_over_several_chunks_equal_the_reference(pe, monkeypatch):
    """The model's parameter gradients at a length of several stored chunks (and over the memory cap, on the
    fused kernel) equal the materialised reference's."""
    from lenx import attention_cpu as attention

    torch.manual_seed(5)
    x = torch.randint(0, 60, (2, 150))
    ref = tiny_model(pe, train_len=160, attn_backend="materialized")
    calls = []
    apply = attention._StoredProbs.apply
    monkeypatch.setattr(attention._StoredProbs, "apply", lambda *a: calls.append(a[3] is not None) or apply(*a))
    grads = {}
    for name, cap in (("stored", attention.STORED_MAX_BYTES), ("capped", 0), ("materialized", None)):
        monkeypatch.setattr(attention, "STORED_MAX_BYTES", cap or 0)
        model = tiny_model(pe, train_len=160, attn_backend="materialized" if cap is None else "sdpa")
        model.load_state_dict(ref.state_dict())
        F.cross_entropy(model(x).logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()).backward()
        grads[name] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        if name == "stored":  # every layer took the route, with its distance table where the scheme has a bias
            assert calls == [pe not in ("nope", "rope")] * model.config.n_layer
    for name in ("stored", "capped"):
        assert grads[name].keys() == grads["materialized"].keys()
        for n in grads[name]:
            torch.testing.assert_close(grads[name][n], grads["materialized"][n], atol=1e-5, rtol=1e-4,
                                       msg=lambda m: f"{name} {n}: {m}")


def test_train_compile_without_a_compiler_is_one_clear_line(tmp_path, text_dataset, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no compiler on it
    monkeypatch.delenv("CXX", raising=False)
    code = main(["train", "--pe", "rope", *TINY, "--compile", "--device", "cpu", "--dataset", str(text_dataset),
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "C++ compiler" in err and "without --compile" in err and "Traceback" not in err


@pytest.mark.skipif(_can_compile() is not None, reason=str(_can_compile()))
def test_train_compile_flag_gives_the_eager_run(tmp_path, text_dataset):
    """`lenx train --compile` trains the same run as eager (same batches, same losses within float noise),
    and records the setting in run.json."""
    losses = {}
    for flag in ("--no-compile", "--compile"):
        out = tmp_path / flag
        args = [*TINY[:-4], "--steps", "10", "--save-every", "1000"]
        assert main(["train", "--pe", "rope", *args, "--precision", "fp32", flag, "--dataset", str(text_dataset),
                     "--out", str(out)]) == 0
        info = json.loads((out / "run.json").read_text())
        assert info["config"]["compile"] is (flag == "--compile")
        losses[flag] = [float(line.split(",")[1]) for line in (out / "train_log.csv").read_text().splitlines()[1:]]
    assert losses["--compile"] == pytest.approx(losses["--no-compile"], rel=1e-4)


def test_training_benchmark_reports_paired_ratios():
    """scripts/bench_train.py at a tiny size: one JSON row per contender, each lenx ratio paired per round."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "scripts" / "bench_train.py"
    out = subprocess.run(
        [sys.executable, str(script), "--layers", "1", "--d-model", "32", "--heads", "2", "--d-ff", "64",
         "--vocab", "64", "--batch", "2", "--seq", "32", "--steps", "3", "--warmup", "1",
         "--schemes", "nope,rope", "--json", "--shard-peers"],
        capture_output=True, text=True, timeout=600, check=True,
    ).stdout
    result = json.loads(out)
    meta, rows = result["meta"], {r["model"]: r for r in result["rows"]}
    # lenx steps as lenx train does (a row shard per thread, here at most one per row), and so, asked, do the peers
    assert meta["lenx_cpu_shards"] == meta["peer_cpu_shards"] == min(meta["threads"], 2)
    assert set(rows) == {"lenx-nope", "lenx-rope", "hf-gpt2 (learned, sdpa)", "hf-llama (rope, sdpa)",
                         "hf-bloom (alibi, eager)"}
    rope = rows["lenx-rope"]
    assert rope["peer"] == "hf-llama (rope, sdpa)" and rope["vs_peer"] > 0
    low, mid, high = rope["vs_peer_quartiles"]
    assert low <= mid <= high and rows["lenx-nope"]["vs_nope"] == 1.0
    assert rows["hf-llama (rope, sdpa)"]["vs_peer"] is None and all(r["tokens_per_s"] > 0 for r in rows.values())
    assert meta["cpu"]["name"] and isinstance(meta["cpu"]["features"], list)  # the figures name their CPU


def test_eval_benchmark_reports_transformers_peers():
    """scripts/bench_eval.py at a tiny size: each lenx scheme with a peer is followed by the transformers model's
    row, the ratios are the rows' own peer / lenx figures, GPT-2 has no numbers past its position table (as
    lenx-learned has none), and a Bloom length whose eager scores exceed --mem-budget is skipped with a note."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "scripts" / "bench_eval.py"
    out = subprocess.run(
        [sys.executable, str(script), "--layers", "1", "--d-model", "32", "--heads", "2", "--train-len", "16",
         "--multiples", "1,2", "--schemes", "alibi,learned", "--mem-budget", "0.00001", "--json"],
        capture_output=True, text=True, timeout=600, check=True,
    ).stdout
    rows = {(r["scheme"], r["length"]): r for r in map(json.loads, out.splitlines())}
    assert all(r["cpu"] for r in rows.values())  # the figures name their CPU
    assert set(rows) == {(s, n) for s in ("nope (baseline)", "alibi", "hf-bloom (alibi, eager)", "learned",
                                          "hf-gpt2 (learned, sdpa)") for n in (16, 32)}
    for scheme, peer in (("alibi", "hf-bloom (alibi, eager)"), ("learned", "hf-gpt2 (learned, sdpa)")):
        lenx, hf = rows[(scheme, 16)], rows[(peer, 16)]
        assert lenx["peer"] == peer and hf["peer_of"] == scheme and hf["seconds"] > 0 and hf["note"] == ""
        assert lenx["vs_peer_seconds"] == pytest.approx(hf["seconds"] / lenx["seconds"])
        assert hf["peak_mb"] >= 0 and (lenx["vs_peer_peak_mb"] is None if not lenx["peak_mb"]
                                       else lenx["vs_peer_peak_mb"] == pytest.approx(hf["peak_mb"] / lenx["peak_mb"]))
    # 16 x 16 scores fit the budget (~7 KB), 32 x 32 (~28 KB) do not
    assert rows[("hf-bloom (alibi, eager)", 32)]["note"].startswith("skipped: eager attention needs")
    assert rows[("hf-gpt2 (learned, sdpa)", 32)]["note"] == "hf-gpt2 has 16 positions (max_position_embeddings)"
    assert rows[("learned", 32)]["note"] and rows[("learned", 32)]["seconds"] is None
    for scheme in ("alibi", "learned"):
        assert rows[(scheme, 32)]["vs_peer_seconds"] is None and rows[(scheme, 32)]["vs_peer_peak_mb"] is None
        assert rows[(scheme, 32)]["peer"]


def test_every_scheme_starts_from_the_same_shared_weights():
    """Schemes differ only in their positional part: with one seed, token embeddings, blocks and final norm start
    identical for every scheme (a scheme's own parameters draw from a stream of their own), so a comparison at one
    seed is not also a comparison of initialisations. The global RNG is left where a parameterless scheme leaves it."""
    from lenx.model import LenxForCausalLM

    shared, rng = {}, {}
    for pe in ALL_SCHEMES:
        torch.manual_seed(0)
        model = LenxForCausalLM(tiny_config(pe))
        rng[pe] = torch.get_rng_state()
        shared[pe] = {k: v for k, v in model.state_dict().items() if not k.startswith("pe.")}
    for pe in ALL_SCHEMES:
        assert shared[pe].keys() == shared["nope"].keys()
        for k in shared[pe]:
            if k in ("wte.weight", "lm_head.weight") and pe == "sinusoidal":
                # the paper's pairing (fairseq): the same draws at std d^-0.5 instead of 0.02
                torch.testing.assert_close(shared[pe][k] * 0.02, shared["nope"][k] * tiny_config(pe).d_model**-0.5)
                continue
            assert torch.equal(shared[pe][k], shared["nope"][k]), (pe, k)
        assert torch.equal(rng[pe], rng["nope"]), pe
    # the scheme's own parameters are still random, and follow the seed
    for pe in ("learned", "shaw", "fire"):
        a, b, c = (_pe_state(pe, seed) for seed in (0, 0, 1))
        assert all(torch.equal(a[k], b[k]) for k in a) and any(not torch.equal(a[k], c[k]) for k in a), pe
        assert any(v.numel() > 1 and v.std() > 0 for v in a.values()), pe


def _pe_state(pe, seed):
    from lenx.model import LenxForCausalLM

    torch.manual_seed(seed)
    return {k: v.clone() for k, v in LenxForCausalLM(tiny_config(pe)).pe.state_dict().items()}


def _cfg(**kw):
    from lenx.config import TrainConfig

    return TrainConfig(**{"steps": 100, "warmup": 10, "lr": 1e-3, "min_lr_ratio": 0.1, **kw})


def test_learning_rate_warms_up_linearly_then_decays_by_cosine_to_its_floor():
    import math

    from lenx.optim import lr_at

    cfg = _cfg()
    assert [lr_at(cfg, s) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])  # never 0
    assert lr_at(cfg, 10) == pytest.approx(1.0)  # cosine starts at the peak
    for s in range(10, 100):
        t = (s - 10) / 90
        assert lr_at(cfg, s) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))
    assert 0.1 < lr_at(cfg, 99) < 0.1 + 1e-3 and lr_at(cfg, 100) == pytest.approx(0.1)  # last step: at the floor
    decay = [lr_at(cfg, s) for s in range(10, 100)]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    short = _cfg(steps=5, warmup=10)  # warm-up not below steps: still rising at the end, never past the peak
    assert [lr_at(short, s) for s in range(5)] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    assert lr_at(_cfg(warmup=0), 0) == pytest.approx(1.0)


@pytest.mark.parametrize("pe", ALL_SCHEMES)
def test_optimizer_groups_decay_matrices_and_scale_only_the_schemes_own_parameters(pe):
    from lenx.model import LenxForCausalLM
    from lenx.optim import build_optimizer, lr_at, set_lr

    cfg = _cfg(pos_lr_mult=7.0, weight_decay=0.1, beta1=0.8, beta2=0.9)
    model = LenxForCausalLM(tiny_config(pe))
    opt = build_optimizer(model, cfg)
    assert model.lm_head.weight is model.wte.weight
    own = {id(p) for p in model.pe.parameters()}
    matrices = [p for p in model.parameters() if id(p) not in own and p.dim() >= 2]
    rest = [p for p in model.parameters() if id(p) not in own and p.dim() < 2]  # LayerNorm weights and biases
    by_mult = {}
    for g in opt.param_groups:
        by_mult.setdefault((g["lr_mult"], g["weight_decay"]), []).extend(map(id, g["params"]))
    assert sorted(by_mult.pop((1.0, 0.1))) == sorted(map(id, matrices))  # wte (= lm_head) once, block matrices
    assert sorted(by_mult.pop((1.0, 0.0))) == sorted(map(id, rest))
    assert sorted(by_mult.pop((7.0, 0.0), [])) == sorted(own)
    assert not by_mult and (len(own) > 0) == get_scheme(pe).learned
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    for step in (0, 5, 10, 60, 99):  # the multiplier scales the schedule, for the scheme's group only
        set_lr(opt, cfg, step)
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(cfg.lr * lr_at(cfg, step) * g["lr_mult"])
    assert all(g["betas"] == (0.8, 0.9) and g["fused"] for g in opt.param_groups)


@pytest.mark.parametrize("pe", ALL_SCHEMES)
def test_by_default_the_schemes_own_parameters_train_as_the_scheme_declares(pe):
    """pos_lr_mult null (the default): each parameter of the scheme in the group its ``param_groups`` names, at the
    model's rate unless it says otherwise, decayed exactly where it says so."""
    from lenx.model import LenxForCausalLM
    from lenx.optim import build_optimizer

    cfg = _cfg(weight_decay=0.1)
    assert cfg.pos_lr_mult is None
    model = LenxForCausalLM(tiny_config(pe))
    own = {id(p) for p in model.pe.parameters()}
    declared = sorted((id(p), g["weight_decay"], g["lr_mult"]) for g in model.pe.param_groups() for p in g["params"])
    got = sorted((id(p), g["weight_decay"] > 0, g["lr_mult"]) for g in build_optimizer(model, cfg).param_groups
                 for p in g["params"] if id(p) in own)
    assert got == declared and sorted(i for i, _, _ in got) == sorted(own)  # every parameter once
    decayed = {n for n, p in model.pe.named_parameters() if (id(p), True, 1.0) in got}
    assert decayed == REFERENCE_DECAY.get(pe, set())


# What each scheme's reference implementation decays (docs/schemes.md#how-a-schemes-parameters-train)
REFERENCE_DECAY = {"learned": {"table"}, "fire": {"f.0.weight", "f.2.weight"},  # t5, shaw, kerple, dpb, pope: none
                   "fox": {"fgate.0.weight", "fgate.1.weight"}}


def get_scheme(pe):
    from lenx.positional import get_scheme as get

    return get(pe)


def _record_training(monkeypatch, tmp_path, text_dataset, pe, *args, name=None):
    """Train and record each step's batch and its gradient norm before clipping."""
    from lenx import train as train_module

    batches, norms = [], []
    get_batch, clip = train_module.get_batch, torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(train_module, "get_batch", lambda *a: batches.append(get_batch(*a)) or batches[-1])
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: norms.append(clip(*a, **k)) or norms[-1])
    out = tmp_path / (name or pe)
    assert main(["train", "--pe", pe, *TINY[:-4], "--steps", "4", "--save-every", "1000", "--precision", "fp32",
                 "--dataset", str(text_dataset), "--out", str(out), *args]) == 0
    monkeypatch.undo()
    from safetensors.torch import load_file

    return batches, torch.stack(norms), load_file(out / "model.safetensors"), out


def test_every_scheme_sees_the_same_batches(monkeypatch, tmp_path, text_dataset):
    """The data order is a function of the seed alone: two schemes trained with one seed read the same windows."""
    seen = {pe: _record_training(monkeypatch, tmp_path, text_dataset, pe)[0] for pe in ("nope", "learned", "t5")}
    assert len(seen["nope"]) == 4
    for pe in seen:
        assert all(torch.equal(a, b) for a, b in zip(seen[pe], seen["nope"], strict=True)), pe
    assert not torch.equal(seen["nope"][0], seen["nope"][1])
    other = _record_training(monkeypatch, tmp_path, text_dataset, "nope", "--seed", "1", name="s1")[0]
    assert not torch.equal(other[0], seen["nope"][0])


def test_gradient_accumulation_equals_the_whole_batch(monkeypatch, tmp_path, text_dataset):
    """--batch-size 8 and --batch-size 4 --grad-accum 2 (and 2 x 4): the same gradient before clipping at every step
    (a mean over the global batch, not a sum over micro-batches) and the same weights after."""
    runs = {(b, k): _record_training(monkeypatch, tmp_path, text_dataset, "learned", "--batch-size", str(b),
                                     "--grad-accum", str(k), name=f"b{b}k{k}") for b, k in ((8, 1), (4, 2), (2, 4))}
    _, ref_norms, ref_weights, _ = runs[(8, 1)]
    for key, (_, norms, weights, _) in runs.items():
        torch.testing.assert_close(norms, ref_norms, rtol=1e-5, atol=0, msg=lambda m: f"{key}: {m}")
        for name in ref_weights:
            torch.testing.assert_close(weights[name], ref_weights[name], rtol=0, atol=1e-5)


def test_training_loss_is_next_token_cross_entropy_of_the_window(monkeypatch, tmp_path, text_dataset):
    """The first logged loss (before any update) is the mean next-token loss of the initial model on step 0's
    windows: inputs are tokens 0..T-1, targets tokens 1..T, every position counted once."""
    from lenx.model import LenxForCausalLM

    batches, _, _, out = _record_training(monkeypatch, tmp_path, text_dataset, "rope", "--steps", "1")
    logged = float((out / "train_log.csv").read_text().splitlines()[1].split(",")[1])
    config = json.loads((out / "config.json").read_text())
    torch.manual_seed(0)
    model = LenxForCausalLM(tiny_config("rope", **{k: config[k] for k in (
        "vocab_size", "n_layer", "d_model", "n_head", "d_ff", "train_len", "eod_token_id")}))
    window = batches[0]
    assert window.shape == (8, 17)
    with torch.no_grad():
        expected = model(window, labels=window).loss
    assert logged == pytest.approx(expected.item(), rel=1e-5)


def test_recorded_mfu_is_the_papers_flop_count_over_the_peak(monkeypatch, tmp_path, text_dataset):
    """run.json's mfu = tokens/s x (6 N + 12 L d T) / peak, N the matrices a token passes through (the tied
    embedding once), counted here from the model itself."""
    from safetensors.torch import load_file

    from lenx import perf

    monkeypatch.setattr(perf, "matmul_peak", lambda device, dtype, threads=None, workers=1: 1e9)
    out = tmp_path / "run"
    assert main(["train", "--pe", "nope", *TINY, "--steps", "20", "--precision", "fp32",
                 "--dataset", str(text_dataset), "--out", str(out)]) == 0
    info = json.loads((out / "run.json").read_text())
    weights = load_file(out / "model.safetensors")
    n = sum(w.numel() for k, w in weights.items() if w.dim() == 2 and k != "lm_head.weight")
    layers, d, T = info["config"]["layers"], info["config"]["d_model"], info["config"]["train_len"]
    flops = 6 * n + 12 * layers * d * T
    assert info["precision"] == "fp32" and info["mfu"] == pytest.approx(info["tokens_per_s"] * flops / 1e9, abs=2e-4)


@pytest.mark.parametrize("pe", ["learned", "kerple-log"])
def test_a_run_stopped_and_resumed_ends_with_the_weights_of_an_uninterrupted_one(pe, tmp_path, text_dataset,
                                                                                  monkeypatch):
    """Schemes with parameters of their own (their pos_lr_mult group, KERPLE's in-place projection): a run stopped
    after its checkpoint at step 3 and resumed ends bit-identical to one never stopped."""
    from safetensors.torch import load_file

    args = ["train", "--pe", pe, *TINY[:-4], "--steps", "6", "--save-every", "3", "--precision", "fp32",
            "--dataset", str(text_dataset)]
    assert main([*args, "--out", str(tmp_path / "ref")]) == 0
    stop_training_at(monkeypatch, 4)
    assert main([*args, "--out", str(tmp_path / "cut")]) != 0
    assert json.loads((tmp_path / "cut" / "latest.json").read_text())["step"] == 3
    monkeypatch.undo()
    assert main([*args, "--out", str(tmp_path / "cut")]) == 0
    a, b = load_file(tmp_path / "ref" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_run_directory_goes_new_resume_done_and_a_checkpoint_restores_every_state(tmp_path):
    """RunDir: a checkpoint restores the weights, the optimizer and the torch, Python and NumPy RNGs at its step,
    the state follows the files (new, then resume once a checkpoint is there, then done), and a finished run keeps
    its weights, log and run.json but no checkpoint."""
    import random

    import numpy as np

    from lenx.optim import build_optimizer
    from lenx.rundir import RunDir, check_run_dir

    cfg = _cfg(pe="learned")
    run = RunDir(tmp_path / "run")
    assert run.prepare(cfg, overwrite=False) == "new" and run.path.is_dir()
    run.write_info({"config": cfg.to_dict(), "world_size": 1, "status": "training"})
    assert check_run_dir(run.path, cfg) == "new"
    model = tiny_model("learned").train()
    opt = build_optimizer(model, cfg)
    model(torch.randint(0, 64, (2, 9)), labels=torch.randint(0, 64, (2, 9))).loss.backward()
    opt.step()
    log = [{"step": 3, "loss": 4.5, "lr": 1e-3, "tokens_per_s": 100.0}, {"step": 6, "loss": 4.0, "lr": 1e-3,
                                                                        "tokens_per_s": 90.0}]
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    run.save_checkpoint(model, opt, 6, log)
    draws = torch.rand(3), random.random(), np.random.rand()
    assert run.state(cfg) == "resume" and json.loads((run.path / "latest.json").read_text())["step"] == 6

    other = tiny_model("learned", seed=1).train()
    other_opt = build_optimizer(other, cfg)
    assert run.load_checkpoint(other, other_opt) == 6
    assert torch.equal(torch.rand(3), draws[0]) and random.random() == draws[1] and np.random.rand() == draws[2]
    assert all(torch.equal(other.state_dict()[k], v) for k, v in saved.items())
    restored, want = other_opt.state_dict()["state"], opt.state_dict()["state"]
    assert restored.keys() == want.keys() and want
    assert all(torch.equal(restored[i][k], want[i][k]) for i in want for k in want[i])
    assert run.read_log(3) == log[:1] and run.read_log(6) == log

    run.finish(other, log, {**run.info(), "status": "done"})
    assert run.state(cfg) == "done"
    assert sorted(p.name for p in run.path.iterdir()) == ["config.json", "generation_config.json",
                                                          "model.safetensors", "run.json", "train_log.csv"]


def _cpu(*features):
    from lenx.hardware import CPU

    return CPU("test CPU", "x86_64", tuple(features), known=True)


@pytest.mark.parametrize("features, chosen, reason", [
    (("avx2", "avx512f", "avx512_bf16", "amx_bf16"), "bf16", "avx512_bf16"),
    (("avx2", "fma"), "fp32", "no bf16 matrix units"),
])
def test_auto_precision_follows_the_cpus_features_and_run_json_says_why(features, chosen, reason, tmp_path,
                                                                        text_dataset, monkeypatch):
    from lenx import hardware

    monkeypatch.setattr(hardware, "this_cpu", lambda: _cpu(*features))
    out = tmp_path / "run"
    assert main(["train", "--pe", "nope", *TINY, "--steps", "2", "--dataset", str(text_dataset), "--out", str(out)]) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["config"]["precision"] == "auto" and info["precision"] == chosen and reason in info["precision_reason"]


def test_auto_precision_on_a_cpu_of_unknown_features_times_the_runs_own_step(tmp_path, text_dataset, monkeypatch):
    """Unknown features: one timed step of the run's model in each precision decides, cached for the machine."""
    from lenx import hardware
    from lenx.hardware import CPU

    monkeypatch.setenv("LENX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hardware, "this_cpu", lambda: CPU("mystery", "riscv64", (), known=False))
    out = tmp_path / "run"
    assert main(["train", "--pe", "rope", *TINY, "--steps", "2", "--dataset", str(text_dataset), "--out", str(out)]) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["precision"] in ("fp32", "bf16") and "measured a step at fp32" in info["precision_reason"]
    cached = json.loads((tmp_path / "cache" / "precision.json").read_text())
    assert list(cached.values()) == [info["precision"]]


def test_a_resumed_auto_run_keeps_the_precision_it_began_with(tmp_path, text_dataset, monkeypatch):
    """Begun where auto means bf16, resumed where it would mean fp32: it finishes in bf16, bit-identical to a run
    never stopped."""
    from safetensors.torch import load_file

    from lenx import hardware
    from lenx import train as train_module

    monkeypatch.setattr(hardware, "this_cpu", lambda: _cpu("avx512_bf16"))
    args = ["train", "--pe", "rope", *TINY[:-4], "--steps", "6", "--save-every", "3", "--dataset", str(text_dataset)]
    assert main([*args, "--out", str(tmp_path / "ref")]) == 0
    get_batch = stop_training_at(monkeypatch, 4)
    assert main([*args, "--out", str(tmp_path / "cut")]) != 0
    monkeypatch.setattr(train_module, "get_batch", get_batch)
    monkeypatch.setattr(hardware, "this_cpu", lambda: _cpu("avx2"))
    assert main([*args, "--out", str(tmp_path / "cut")]) == 0
    assert json.loads((tmp_path / "cut" / "run.json").read_text())["precision"] == "bf16"
    a, b = load_file(tmp_path / "ref" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_mfu_above_one_is_recorded_with_a_warning_and_the_peak_taken_at_the_steps_threads(
        tmp_path, text_dataset, monkeypatch, capsys):
    from lenx import perf

    asked = []
    monkeypatch.setattr(perf, "matmul_peak", lambda device, dtype, threads=None, workers=1: asked.append((threads, workers)) or 1.0)
    out = tmp_path / "run"
    assert main(["train", "--pe", "nope", *TINY, "--steps", "4", "--precision", "fp32",
                 "--dataset", str(text_dataset), "--out", str(out)]) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["mfu"] > 1 and "above 100%" in info["mfu_warning"] and "above 100%" in capsys.readouterr().err
    assert asked == [(torch.get_num_threads(), min(torch.get_num_threads(), 8))]  # as the steps run: in shards


@pytest.mark.parametrize("pe", ALL_SCHEMES)
def test_every_scheme_trains_under_bf16_autocast_on_the_cpu(pe):
    """`precision: auto` trains in bf16 on CPUs with bf16 units: every scheme's forward and backward run under CPU
    bf16 autocast, in row shards as `lenx train` runs them, and give the fp32 loss within bf16's rounding."""
    from lenx.precision import autocast
    from lenx.step import forward_backward

    model = tiny_model(pe, vocab_size=64, train_len=32).train()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("L_mult"):  # FIRE's threshold inside the window: its blocked route, not its table
                p.fill_(0.5)
    batch = torch.randint(0, 64, (4, 33), generator=torch.Generator().manual_seed(0))
    losses = {}
    for precision in ("fp32", "bf16"):
        model.zero_grad(set_to_none=True)
        losses[precision] = forward_backward(model, batch, lambda: autocast(precision, "cpu"), 1.0, shards=2).item()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), precision
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.02)


def stop_training_at(monkeypatch, stop: int):
    """`lenx train` interrupted (KeyboardInterrupt) when it asks for step `stop`'s batch; returns the real get_batch
    (for a test to put back)."""
    from lenx import train as train_module

    get_batch = train_module.get_batch

    def stopping(stream, cfg, step, rows):
        if step == stop:
            raise KeyboardInterrupt
        return get_batch(stream, cfg, step, rows)

    monkeypatch.setattr(train_module, "get_batch", stopping)
    return get_batch
