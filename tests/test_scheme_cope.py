"""CoPE (contextual position encoding): the bias is q_i . e[p_ij] / sqrt(d) with p_ij the sum of the query's gates
over keys j..i, interpolated between floor and ceil, as facebookresearch/RAM's ContextPosSelfAttn; on every attention
route, forward and gradients, at 1x and 16x the training length."""

import math

import pytest
import torch
import torch.nn.functional as F

from lenx.attention import BACKENDS, causal_attention, recording
from lenx.positional import REGISTRY
from lenx.positional.cope import CopeBias

from .conftest import tiny_config, tiny_model


def slow_cope_attention(q, k, v, e, npos, nodiv=False):
    """The paper's equations by loops over queries i and keys j <= i: g_il = sigmoid(q_i.k_l / sqrt(d)),
    p_ij = min(sum_{l=j..i} g_il, npos - 1), z(p) = q_i.e[floor p] (1 - w) + q_i.e[ceil p] w with w = p - floor p
    (indices without gradient), score_ij = (q_i.k_j + z(p_ij)) / sqrt(d) (nodiv: q_i.k_j / sqrt(d) + z(p_ij)),
    softmax over j <= i. Float64; differentiable in q, k, v and e."""
    B, H, T, hd = q.shape
    q, k, v, e = q.double(), k.double(), v.double(), e.double()
    out = []
    for i in range(T):
        z = q[:, :, i] @ e  # (B, H, npos): q_i . e[n] for every n
        scores = []
        for j in range(i + 1):
            p = sum(torch.sigmoid((q[:, :, i] * k[:, :, l]).sum(-1) / math.sqrt(hd)) for l in range(j, i + 1))
            p = p.clamp(max=npos - 1)
            fl, ce = p.detach().floor().long(), p.detach().ceil().long()
            w = p - fl
            zp = z.gather(-1, ce[..., None])[..., 0] * w + z.gather(-1, fl[..., None])[..., 0] * (1 - w)
            qk = (q[:, :, i] * k[:, :, j]).sum(-1)
            scores.append(qk / math.sqrt(hd) + zp if nodiv else (qk + zp) / math.sqrt(hd))
        probs = torch.stack(scores, -1).softmax(-1)  # (B, H, i + 1)
        out.append((probs[..., None] * v[:, :, : i + 1]).sum(-2))
    return torch.stack(out, 2)


def ram_attention(q, k, v, e, npos):
    """ContextPosSelfAttn.forward transcribed (its defaults; heads folded into the batch as its split_heads does),
    with the decoder's 0/1 causal mask: the whole L x L at once."""
    B, H, T, hd = q.shape
    query, key, val = (t.reshape(B * H, T, -1) for t in (q, k, v))
    attn_mask = torch.ones(T, T, dtype=q.dtype).tril().unsqueeze(0)
    gate_logits = torch.bmm(query, key.transpose(-1, -2))
    gates = torch.sigmoid(gate_logits / math.sqrt(hd))
    gates = gates * attn_mask
    positions = gates.flip(-1).cumsum(dim=-1).flip(-1)
    positions = positions.clamp(max=npos - 1)
    pos_logits_fixed = torch.matmul(query, e[None])
    positions_ceil = positions.ceil().long()
    positions_floor = positions.floor().long()
    pos_logits_ceil = pos_logits_fixed.gather(-1, positions_ceil)
    pos_logits_floor = pos_logits_fixed.gather(-1, positions_floor)
    pos_ceil_weight = positions - positions_floor
    pos_logits = pos_logits_ceil * pos_ceil_weight + pos_logits_floor * (1 - pos_ceil_weight)
    attn_logits = (gate_logits + pos_logits) / math.sqrt(hd)
    attn_logits = attn_logits + attn_mask.log()
    return (torch.softmax(attn_logits, dim=-1) @ val).view(B, H, T, -1)


def _inputs(T, seed=0, B=2, H=4, hd=8):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, T, hd, generator=g) for _ in range(3))


def _scheme(**opts):
    pe = tiny_model("cope", train_len=16, pe_options=opts).pe  # head_dim 8; the table gets random values
    with torch.no_grad():
        pe.pos_emb.mul_(10.0)  # an O(1) position term beside q.k
    return pe


@pytest.mark.parametrize("npos", [None, 3])  # 3: every count past 2 clamps, within the training length too
def test_cope_reference_transcription_equals_the_papers_loops(npos):
    pe = _scheme(**({} if npos is None else {"npos": npos}))
    q, k, v = (t[:1, :2, :12].double().requires_grad_() for t in _inputs(16))
    e = pe.pos_emb[1].detach().double().requires_grad_()
    want = slow_cope_attention(q, k, v, e, pe.npos)
    got = ram_attention(q, k, v, e, pe.npos)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    w = torch.linspace(-1, 1, want.numel(), dtype=torch.float64).view_as(want)
    g_want = torch.autograd.grad((want * w).sum(), (q, k, v, e))
    g_got = torch.autograd.grad((got * w).sum(), (q, k, v, e))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("npos", [None, 3])
@pytest.mark.parametrize("backend, block", [(b, 512) for b in BACKENDS] + [("blocked", 5), ("sdpa", 7)])
def test_cope_attention_and_gradients_equal_the_papers_loops(npos, backend, block):
    """1x the training length: every route against the loops, forward and the gradients of q, k, v and the table."""
    pe = _scheme(**({} if npos is None else {"npos": npos}))
    q, k, v = (t.requires_grad_() for t in _inputs(16, B=1, H=2))
    with recording() as routes:
        out = causal_attention(q, k, v, pe.bias(1, torch.arange(16), q=q, k=k), backend, block)
    assert routes == ({"materialized"} if backend == "materialized" else {"blocked"})  # no fused route exists
    w = torch.linspace(-1, 1, out.numel()).view_as(out)
    got = torch.autograd.grad((out * w).sum(), (q, k, v, pe.pos_emb))
    assert got[3][0].abs().sum() == 0 and got[3][1].abs().sum() > 0  # layer 1's table only
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    e = pe.pos_emb[1].detach().double().requires_grad_()
    want = slow_cope_attention(qd, kd, vd, e, pe.npos)
    torch.testing.assert_close(out.double(), want, atol=2e-6, rtol=1e-5)
    want_g = torch.autograd.grad((want * w.double()).sum(), (qd, kd, vd, e))
    for name, a, b in zip("qkve", (*got[:3], got[3][1]), want_g):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-4, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("backend, block", [(b, 512) for b in BACKENDS] + [("blocked", 24), ("sdpa", 100)])
def test_cope_at_16x_the_training_length_equals_the_reference_with_gradients(backend, block):
    """256 tokens (16x): counts run past npos - 1 = 16 and clamp; every route against RAM's code (float64)."""
    pe = _scheme()
    T = 256
    q, k, v = (t.requires_grad_() for t in _inputs(T, seed=1, H=2))
    out = causal_attention(q, k, v, pe.bias(0, torch.arange(T), q=q, k=k), backend, block)
    w = torch.linspace(-1, 1, out.numel()).view_as(out)
    got = torch.autograd.grad((out * w).sum(), (q, k, v, pe.pos_emb))
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    e = pe.pos_emb[0].detach().double().requires_grad_()
    want = ram_attention(qd, kd, vd, e, pe.npos)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-4)
    want_g = torch.autograd.grad((want * w.double()).sum(), (qd, kd, vd, e))
    for name, a, b in zip("qkve", (*got[:3], got[3][0]), want_g):
        torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4, msg=lambda m: f"d{name}: {m}")


def test_positions_past_npos_clamp_to_the_last_vector():
    """Gates at 1 (q.k / sqrt(d) = 50): p_ij = i - j + 1, and every count from npos - 1 on reads e[npos - 1]."""
    pe = _scheme(npos=5)
    T, hd = 12, 8
    g = torch.Generator().manual_seed(3)
    u = F.normalize(torch.randn(hd, generator=g), dim=0)
    q = (u * 50 * hd**0.5 / 2).expand(1, 1, T, hd).clone() + 0.0
    k = (u * 2).expand(1, 1, T, hd).clone()
    assert torch.sigmoid((q[0, 0, 0] @ k[0, 0, 0]) / hd**0.5) == 1.0
    with torch.no_grad():
        b = pe.bias(0, torch.arange(T), q=q, k=k).block(0, T, q)[0, 0]
    z = (q[0, 0] @ pe.pos_emb[0].detach()) / hd**0.5  # (T, npos)
    for i in range(T):
        for j in range(i + 1):
            assert b[i, j] == pytest.approx(z[i, min(i - j + 1, 4)].item(), rel=1e-6, abs=1e-6)
        assert (b[i, i + 1 :] == float("-inf")).all()  # the block masks future keys itself
    # and fractional counts past the table: the reference clamps the sum, not the index
    q2, k2, _ = _inputs(40, seed=4, B=1, H=1)
    with torch.no_grad():
        bias = pe.bias(0, torch.arange(40), q=q2, k=k2).block(0, 40, q2)
    torch.testing.assert_close(bias.double(), _ram_bias(q2, k2, pe.pos_emb[0].detach(), 5), atol=1e-6, rtol=1e-6)
    last = (q2[0, 0, 39] @ pe.pos_emb[0].detach())[4] / hd**0.5  # counts from keys 0..19 to query 39 exceed 4
    torch.testing.assert_close(bias[0, 0, 39, :20], last.expand(20))


def _ram_bias(q, k, e, npos):
    """RAM's pos_logits / sqrt(d) for one head, -inf above the diagonal (float64)."""
    q, k, e = q[0, 0].double(), k[0, 0].double(), e.double()
    T, hd = q.shape
    gates = torch.sigmoid(q @ k.T / math.sqrt(hd)) * torch.ones(T, T, dtype=q.dtype).tril()
    pos = gates.flip(-1).cumsum(-1).flip(-1).clamp(max=npos - 1)
    z = q @ e
    fl, ce = pos.floor().long(), pos.ceil().long()
    w = pos - fl
    b = (z.gather(-1, ce) * w + z.gather(-1, fl) * (1 - w)) / math.sqrt(hd)
    return b.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))[None, None]


def test_nodiv_option_adds_the_position_term_unscaled():
    pe = _scheme(nodiv=True)
    q, k, v = (t[:1, :2] for t in _inputs(10, seed=5))
    out = causal_attention(q, k, v, pe.bias(0, torch.arange(10), q=q, k=k), "blocked", 4)
    want = slow_cope_attention(q, k, v, pe.pos_emb[0].detach(), pe.npos, nodiv=True)
    torch.testing.assert_close(out.double(), want, atol=2e-6, rtol=1e-5)


def test_cope_blocks_stay_within_their_memory_and_no_fast_route_is_claimed(monkeypatch):
    pe = _scheme()
    q, k, _ = _inputs(200, B=2, H=4)
    bias = pe.bias(0, torch.arange(200), q=q, k=k)
    assert bias.max_block_rows == 256  # tiny: 2 x 4 x 200 floats per row
    assert bias.score_mod() is None and bias.toeplitz_table() is None and bias.key_term() is None
    assert bias.clipped_kv() is None and not bias.needs_probs
    monkeypatch.setattr(CopeBias, "block_elements", 2 * 4 * 200 * 40)
    small = pe.bias(0, torch.arange(200), q=q, k=k)
    assert small.max_block_rows == 40  # one B x H x rows x keys buffer within block_elements
    rows = []
    block = CopeBias.block
    monkeypatch.setattr(CopeBias, "block", lambda self, q0, q1, q=None: rows.append(q1 - q0) or block(self, q0, q1, q))
    v = torch.randn_like(q)
    with torch.no_grad():
        ref = causal_attention(q, k, v, bias, "materialized")
        rows.clear()
        out = causal_attention(q, k, v, small, "sdpa", 512)
    assert max(rows) == 40 and sum(rows) == 200
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_cope_model_under_bf16_autocast_computes_its_bias_in_fp32_with_gradients():
    torch.manual_seed(6)
    model = tiny_model("cope", train_len=16)
    with torch.no_grad():
        model.pe.pos_emb.mul_(10.0)
    x = torch.randint(0, 60, (2, 48))
    loss32 = F.cross_entropy(model(x).logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x).logits
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten())
    loss.backward()
    assert abs(loss.item() - loss32.item()) < 0.05
    g = model.pe.pos_emb.grad
    assert g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() and g.abs().sum() > 0
    # the bias of bf16 queries and keys, under autocast, is the fp32 computation on their values
    q, k, _ = (t.bfloat16() for t in _inputs(20, B=1, H=2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        b = model.pe.bias(0, torch.arange(20), q=q, k=k).block(4, 20, q[:, :, 4:])
    want = model.pe.bias(0, torch.arange(20), q=q.float(), k=k.float()).block(4, 20, q[:, :, 4:].float())
    assert b.dtype == torch.float32
    torch.testing.assert_close(b, want)


def test_cope_tables_are_per_layer_zero_initialised_and_undecayed():
    cls = REGISTRY["cope"]
    assert cls.learned and not cls.relative and cls.acts == ("bias",)
    pe = cls(tiny_config("cope", n_layer=3, train_len=16))
    assert pe.pos_emb.shape == (3, 8, 17) and (pe.pos_emb == 0).all()  # npos = train_len + 1, head_dim 8
    assert cls(tiny_config("cope", n_layer=3, pe_options={"shared": True, "npos": 40})).pos_emb.shape == (1, 8, 40)
    groups = pe.param_groups()
    assert groups == [{"params": [pe.pos_emb], "weight_decay": False, "lr_mult": 1.0}]
    # zero table: CoPE starts as NoPE (the bias is zero on every causal entry)
    q, k, v = _inputs(12)
    b = pe.bias(0, torch.arange(12), q=q, k=k).block(0, 12, q)
    assert (b.tril() == 0).all()


def test_cope_refuses_bad_options_in_one_line():
    from lenx.errors import LenxError

    for opts in ({"npos": 0}, {"npos": 2.5}, {"nodiv": 1}, {"shared": "yes"}, {"sep_key": True}):
        with pytest.raises(LenxError):
            REGISTRY["cope"](tiny_config("cope", pe_options=opts))


def test_cope_training_keeps_only_the_block_biases_for_the_backward():
    """The bias recomputes its gates in the backward: what autograd keeps is about one B x H x rows x keys tensor
    per block (the bias, as attention's mask), not the reference's ten or so."""
    pe = _scheme()
    T = 96
    q, k, v = (t.requires_grad_() for t in _inputs(T, B=1, H=2))
    kept = {}

    def pack(t):  # each storage once (attention's math path keeps the mask and a view of it)
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes() // t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = causal_attention(q, k, v, pe.bias(0, torch.arange(T), q=q, k=k), "blocked", 32)
    scores = sum(2 * 32 * q1 for q1 in (32, 64, 96))  # B x H x rows x keys over the three blocks
    inputs = 4 * 2 * T * 8  # q, k, v, the output
    assert sum(kept.values()) <= scores + 2 * inputs
    out.sum().backward()
    assert torch.isfinite(pe.pos_emb.grad).all() and torch.isfinite(k.grad).all()
