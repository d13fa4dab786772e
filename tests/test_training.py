"""Training paths: precisions, torch.compile, and gradients of the fast attention routes."""

import json

import pytest
import torch
import torch.nn.functional as F

from lenx.attention import BACKENDS
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
    from lenx.train import compile_problem

    return compile_problem("cpu")


@pytest.mark.skipif(_can_compile() is not None, reason=str(_can_compile()))
@pytest.mark.parametrize("pe, fullgraph", [("rope", True), ("xpos", True), ("learned", True), ("alibi", False)])
def test_compiled_step_agrees_with_eager(pe, fullgraph):
    """Loss and gradients of a compiled step equal eager's. Schemes that act on the embedding or on q and k
    compile into one graph (fullgraph: no break, RoPE's rotation in real arithmetic); bias schemes compile
    with breaks where a bias reads its positions' range."""
    from lenx.train import compile_model

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
    from lenx import attention
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
            assert attention._stored_supported(q, k, v)
        out = attention.causal_attention(q, k, v, bias, backend)
        outs[backend] = (out, *torch.autograd.grad((out * g).sum(), leaves))
    for a, b in zip(outs["sdpa"], outs["materialized"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_stored_probabilities_route_is_for_cpu_fp32_training_within_its_memory_cap(monkeypatch):
    from lenx import attention

    q = torch.randn(2, 4, 100, 8)
    trained = q.clone().requires_grad_()
    assert attention._stored_supported(trained, trained, trained)
    assert not attention._stored_supported(q, q, q)  # inference: the fused kernel, no probabilities kept
    with torch.no_grad():
        assert not attention._stored_supported(trained, trained, trained)
    bf = trained.detach().bfloat16().requires_grad_()
    assert not attention._stored_supported(bf, bf, bf)
    assert attention._stored_bytes(8, 100) == 4 * 8 * (64 * 64 + 36 * 100)
    monkeypatch.setattr(attention, "STORED_MAX_BYTES", attention._stored_bytes(8, 100) - 1)
    assert not attention._stored_supported(trained, trained, trained)  # over the cap: the fused kernel's backward


@pytest.mark.parametrize("pe", ["nope", "rope", "alibi", "t5", "kerple-log", "fire"])
def test_model_gradients_over_several_chunks_equal_the_reference(pe, monkeypatch):
    """The model's parameter gradients at a length of several stored chunks (and over the memory cap, on the
    fused kernel) equal the materialised reference's."""
    from lenx import attention

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
         "--schemes", "nope,rope", "--json"],
        capture_output=True, text=True, timeout=600, check=True,
    ).stdout
    rows = {r["model"]: r for r in json.loads(out)["rows"]}
    assert set(rows) == {"lenx-nope", "lenx-rope", "hf-gpt2 (learned, sdpa)", "hf-llama (rope, sdpa)",
                         "hf-bloom (alibi, eager)"}
    rope = rows["lenx-rope"]
    assert rope["peer"] == "hf-llama (rope, sdpa)" and rope["vs_peer"] > 0
    low, mid, high = rope["vs_peer_quartiles"]
    assert low <= mid <= high and rows["lenx-nope"]["vs_nope"] == 1.0
    assert rows["hf-llama (rope, sdpa)"]["vs_peer"] is None and all(r["tokens_per_s"] > 0 for r in rows.values())


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
