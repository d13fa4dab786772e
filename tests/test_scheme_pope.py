"""PoPE (polar coordinate position embedding): the score is
sum_c softplus(q_c) softplus(k_c) cos((m - n) theta_c - delta_c) / sqrt(d) on every attention route, forward and
gradients (q, k, v, delta), at 1x and 16x the training length; and the attention routes take queries and keys wider
than the values (PoPE doubles them)."""

import math

import pytest
import torch
import torch.nn.functional as F

from lenx.attention import BACKENDS, causal_attention, recording
from lenx.positional.base import LinearBias, TableBias

from .conftest import tiny_config, tiny_model

H, D = 4, 8  # tiny_model: d_model 32, 4 heads


def slow_pope_scores(q, k, pos, delta, base=10000.0):
    """The paper's score by its formula, an explicit sum over the d channels c:
    s[h, m, n] = sum_c softplus(q[m, c]) softplus(k[n, c]) cos((pos_m - pos_n) theta_c - delta[h, c]) / sqrt(d),
    theta_c = base^(-c/d), delta clamped to [-2pi, 0]. float64."""
    d = q.shape[-1]
    sq, sk = F.softplus(q.double()), F.softplus(k.double())
    delta = delta.double().clamp(-2 * math.pi, 0.0)
    rel = (pos[:, None] - pos[None, :]).double()  # m - n
    s = 0
    for c in range(d):
        theta = base ** (-c / d)
        phase = torch.cos(rel * theta - delta[:, c, None, None])  # (H, T, T)
        s = s + sq[..., :, None, c] * sk[..., None, :, c] * phase
    return s / math.sqrt(d)


def slow_pope_attention(q, k, v, pos, delta, base=10000.0):
    s = slow_pope_scores(q, k, pos, delta, base)
    T = q.shape[-2]
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return s.softmax(-1) @ v.double()


def _pope(seed=0, **kw):
    pe = tiny_model("pope", train_len=16, **kw).pe
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # phases well inside (-2pi, 0): the clamp passes them and their gradients
        pe.delta.copy_(torch.rand(pe.delta.shape, generator=g) * (-2 * math.pi + 0.2) - 0.1)
    return pe


def _inputs(T, seed=0, B=2):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, T, D, generator=g) for _ in range(3))


@pytest.mark.parametrize("T", [16, 256])  # 1x and 16x the training length
@pytest.mark.parametrize("backend, block", [(b, 512) for b in BACKENDS] + [("blocked", 7), ("sdpa", 24)])
def test_pope_attention_is_the_papers_score(T, backend, block):
    pe = _pope()
    q, k, v = _inputs(T)
    pos = torch.arange(T)
    q2, k2 = pe.rotate(q, k, pos, 1)
    assert q2.shape == k2.shape == (2, H, T, 2 * D)
    with torch.no_grad(), recording() as routes:
        got = causal_attention(q2, k2, v, pe.bias(1, pos), backend, block)
    assert got.shape == v.shape
    torch.testing.assert_close(got.double(), slow_pope_attention(q, k, v, pos, pe.delta[0]), atol=2e-5, rtol=1e-4)
    assert routes == ({"materialized"} if backend == "materialized" else {"fused"})  # no bias: the fused kernel


@pytest.mark.parametrize("T", [16, 256])
@pytest.mark.parametrize("backend", BACKENDS)
def test_pope_gradients_equal_the_formulas(T, backend):
    pe = _pope(seed=1)
    q, k, v = (t.requires_grad_() for t in _inputs(T, seed=1))
    pos = torch.arange(T)
    with recording() as routes:
        out = causal_attention(*pe.rotate(q, k, pos, 0), v, None, backend, 32)
    w = torch.linspace(-1, 1, out.numel()).view_as(out)
    (out * w).sum().backward()
    got = [t.grad for t in (q, k, v, pe.delta)]
    assert routes == {"stored" if backend in ("sdpa", "flex") else "materialized" if backend == "materialized"
                      else "fused"}  # CPU fp32 training: the stored route, on values narrower than q and k
    q0, k0, v0 = (t.detach().double().requires_grad_() for t in (q, k, v))
    d0 = pe.delta.detach().double().requires_grad_()
    (slow_pope_attention(q0, k0, v0, pos, d0[0]) * w.double()).sum().backward()
    for g, want in zip(got, (q0.grad, k0.grad, v0.grad, d0.grad)):  # delta's gradient sums over B x T x T
        torch.testing.assert_close(g.double(), want, atol=2e-5 * T**0.5, rtol=1e-4)
    assert pe.delta.grad.abs().min() > 0


def test_pope_model_layers_read_their_own_phase_when_not_shared():
    shared, per_layer = tiny_model("pope").pe, tiny_model("pope", pe_options={"shared": False}).pe
    assert shared.delta.shape == (1, H, D) and per_layer.delta.shape == (2, H, D)
    q, k, _ = _inputs(12)
    pos = torch.arange(12)
    with torch.no_grad():
        for layer in (0, 1):
            q2, k2 = per_layer.rotate(q, k, pos, layer)
            want = slow_pope_scores(q, k, pos, per_layer.delta[layer])
            torch.testing.assert_close((q2 @ k2.transpose(-1, -2) / math.sqrt(2 * D)).double(), want, atol=1e-5,
                                       rtol=1e-5)
        assert not torch.allclose(per_layer.rotate(q, k, pos, 0)[1], per_layer.rotate(q, k, pos, 1)[1])
        torch.testing.assert_close(shared.rotate(q, k, pos, 0)[1], shared.rotate(q, k, pos, 1)[1])


def test_pope_init_frequencies_and_training_are_the_references():
    from lenx.positional import REGISTRY

    torch.manual_seed(0)
    pe = REGISTRY["pope"](tiny_config("pope", d_model=64, n_head=4))
    assert pe.delta.shape == (1, 4, 16) and torch.equal(pe.delta, torch.zeros(1, 4, 16))  # both references: zeros
    theta = pe.frequencies()
    assert len(theta) == 16  # one frequency per channel, not per pair
    torch.testing.assert_close(theta, 10000.0 ** -(torch.arange(16, dtype=torch.float64) / 16))
    uniform = REGISTRY["pope"](tiny_config("pope", d_model=64, n_head=4, pe_options={"delta_init": "uniform"}))
    assert -2 * math.pi <= uniform.delta.min() < uniform.delta.max() <= 0  # bias_uniform_init: U(-2pi, 0)
    assert [g["weight_decay"] for g in pe.param_groups()] == [False] and pe.param_groups()[0]["lr_mult"] == 1.0


def test_pope_phase_is_clamped_and_the_zero_init_still_trains():
    pe = tiny_model("pope").pe
    q, k, v = (t.requires_grad_() for t in _inputs(10))
    pos = torch.arange(10)
    with torch.no_grad():
        pe.delta.zero_()
        pe.delta[0, 0, :3] = torch.tensor([0.5, -7.0, -2 * math.pi])  # above, below, at the bound
    out = causal_attention(*pe.rotate(q, k, pos), v, None, "materialized")
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grad = pe.delta.grad[0]
    assert grad[0, 0] == 0 and grad[0, 1] == 0  # past a bound: the bound, no gradient
    assert (grad[0, 2:] != 0).all() and (grad[1:] != 0).all()  # at the bounds (zeros included): a gradient
    clamped = pe.delta.detach()[0].clamp(-2 * math.pi, 0)
    with torch.no_grad():
        q2, k2 = pe.rotate(q, k, pos)
        torch.testing.assert_close((q2 @ k2.transpose(-1, -2) / math.sqrt(2 * D)).double(),
                                   slow_pope_scores(q, k, pos, clamped), atol=1e-5, rtol=1e-5)


def test_pope_scores_are_exact_at_long_positions_and_keep_the_models_dtype():
    pe = _pope()
    q, k, _ = _inputs(6)
    pos = torch.arange(6) * 997 + 200_000  # float32 angles would be off by ~1e-2 here
    with torch.no_grad():
        q2, k2 = pe.rotate(q, k, pos)
        torch.testing.assert_close((q2 @ k2.transpose(-1, -2) / math.sqrt(2 * D)).double(),
                                   slow_pope_scores(q, k, pos, pe.delta[0]), atol=1e-5, rtol=1e-5)
        qb, kb = pe.rotate(q.bfloat16(), k.bfloat16(), pos)
    assert qb.dtype == kb.dtype == torch.bfloat16


@pytest.mark.parametrize("bias", ["none", "table", "gathered", "linear"])
@pytest.mark.parametrize("backend, block", [("sdpa", 512), ("blocked", 5), ("blocked", 512), ("flex", 512)])
def test_attention_routes_take_values_narrower_than_queries_and_keys(bias, backend, block):
    """Shared attention code: q, k of width 2d and v of width d on every CPU route (the stored route in training, the
    fused kernel with zero-padded values, the blocked and Toeplitz routes, the separable and clipped routes decline),
    forward and gradients, against the materialised reference."""
    T = 21
    g = torch.Generator().manual_seed(3)
    q, k = (torch.randn(2, H, T, 2 * D, generator=g) for _ in range(2))
    v = torch.randn(2, H, T, D, generator=g)
    table = torch.randn(H, 2 * T, generator=g)
    b = {"none": None, "table": TableBias(table, torch.arange(T)),
         "gathered": TableBias(table, torch.arange(T) * 2),  # positions not contiguous: each block gathered
         "linear": LinearBias(torch.rand(H, generator=g), torch.arange(T))}[bias]
    with torch.no_grad(), recording() as routes:
        want = causal_attention(q, k, v, b, "materialized")
        torch.testing.assert_close(causal_attention(q, k, v, b, backend, block), want, atol=1e-5, rtol=1e-5)
    assert routes - {"materialized"} == {"fused" if bias == "none" else "blocked"}  # separable declines
    grads = {}
    for name in ("materialized", backend):
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        with recording() as routes:
            out = causal_attention(*x, b, name, block)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads[name] = [t.grad for t in x]
    if backend != "blocked":
        assert routes == ({"blocked"} if bias == "gathered" else {"stored"})  # gathered: no table for stored
    for got, ref in zip(grads[backend], grads["materialized"]):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
