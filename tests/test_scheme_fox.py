"""FoX (Forgetting Transformer): the score bias is the log of the product of the forget gates between key and query,
on every attention route, forward and gradients, at 1x and 16x the training length."""

import math

import pytest
import torch
import torch.nn.functional as F

from lenx.attention import BACKENDS, causal_attention, recording

from .conftest import tiny_model


def slow_fox_attention(q, k, v, x, lin):
    """The paper's equations by loops: f_t = sigmoid(W x_t + b) per head, D_ij = log prod_{l=j+1..i} f_l, softmax
    over j <= i of q_i.k_j / sqrt(d) + D_ij."""
    B, H, T, hd = q.shape
    f = torch.sigmoid(lin(x).double())  # (B, T, H)
    out = torch.zeros(B, H, T, hd, dtype=torch.float64)
    for i in range(T):
        prod = torch.ones(B, H, dtype=torch.float64)
        scores = []
        for j in range(i, -1, -1):  # gates of l = j+1..i, multiplied in as j moves left
            if j < i:
                prod = prod * f[:, j + 1, :]
            scores.append((q[:, :, i].double() * k[:, :, j].double()).sum(-1) / math.sqrt(hd) + prod.log())
        s = torch.stack(scores[::-1], -1)  # (B, H, i + 1), keys 0..i
        out[:, :, i] = (s.softmax(-1)[..., None] * v[:, :, : i + 1].double()).sum(-2)
    return out


def _inputs(T, seed=0, B=2, H=4, hd=8, C=32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, T, hd, generator=g), torch.randn(B, H, T, hd, generator=g),
            torch.randn(B, H, T, hd, generator=g), torch.randn(B, T, C, generator=g))


@pytest.mark.parametrize("T", [16, 256])  # 1x and 16x the training length
@pytest.mark.parametrize("backend, block", [(b, 512) for b in BACKENDS] + [("blocked", 7), ("sdpa", 24)])
def test_fox_attention_is_the_papers_product_of_gates(T, backend, block):
    pe = tiny_model("fox", train_len=16).pe
    with torch.no_grad():
        pe.fgate[1].bias.fill_(2.0)  # gates near 0.9: the penalty reaches far into the sequence
    q, k, v, x = _inputs(T)
    want = slow_fox_attention(q, k, v, x, pe.fgate[1]) if T <= 16 else None
    ref = causal_attention(q, k, v, pe.bias(1, torch.arange(T), x=x), "materialized")
    if want is not None:
        torch.testing.assert_close(ref.double(), want, atol=1e-5, rtol=1e-5)
    with torch.no_grad(), recording() as routes:
        got = causal_attention(q, k, v, pe.bias(1, torch.arange(T), x=x), backend, block)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
    if backend == "sdpa":
        assert routes == {"separable"}  # the fused kernel, bias folded into one extra dimension


@pytest.mark.parametrize("T", [16, 256])
@pytest.mark.parametrize("backend", ["sdpa", "blocked", "flex"])
def test_fox_gradients_equal_the_reference(T, backend):
    grads = {}
    for name in ("materialized", backend):
        pe = tiny_model("fox", train_len=16).pe
        q, k, v, x = (t.requires_grad_() for t in _inputs(T, seed=1))
        with recording() as routes:
            out = causal_attention(q, k, v, pe.bias(0, torch.arange(T), x=x), name, 32)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads[name] = [t.grad for t in (q, k, v, x)] + [p.grad for p in pe.fgate[0].parameters()]
        if name == "sdpa" and T == 16:
            assert routes == {"stored"}  # CPU training: the key term added per column, probabilities kept
    for got, want in zip(grads[backend], grads["materialized"]):  # the gates' gradients sum over B x T tokens
        torch.testing.assert_close(got, want, atol=1e-5 * T**0.5, rtol=1e-4)


def test_fox_bias_is_f_i_minus_f_j_and_ignores_positions():
    pe = tiny_model("fox").pe
    _, _, _, x = _inputs(12)
    a = pe.bias(0, torch.arange(12), x=x).block(0, 12)
    b = pe.bias(0, torch.arange(12) * 3 + 100, x=x).block(0, 12)  # positions are not read at all
    torch.testing.assert_close(a, b)
    logf = F.logsigmoid(pe.fgate[0](x).double())  # (B, T, H)
    i, j = 7, 2
    torch.testing.assert_close(a[:, :, i, j].double(), logf[:, j + 1 : i + 1].sum(1), atol=1e-5, rtol=1e-5)
    assert (a[:, :, i, : i + 1] <= 1e-6).all()  # a penalty: gates are below one


def test_fox_gates_are_per_layer_and_trained_at_the_models_rate():
    model = tiny_model("fox", n_layer=3)
    assert len(model.pe.fgate) == 3 and model.pe.fgate[0].weight.shape == (4, 32)
    groups = model.pe.param_groups()
    decayed = {id(p) for g in groups if g["weight_decay"] for p in g["params"]}
    assert all(g["lr_mult"] == 1.0 for g in groups)
    assert decayed == {id(lin.weight) for lin in model.pe.fgate}  # matrices decay, gate biases do not
