"""The schemes added on the common interface (t5, shaw, kerple-*, fire, xpos) and the RoPE extensions,
each against its paper's formula or its reference implementation."""

import math

import pytest
import torch

from lenx.attention import causal_attention
from lenx.errors import LenxError
from lenx.positional import REGISTRY
from lenx.positional.alibi import alibi_slopes
from lenx.positional.rope_scaling import frequencies as rope_frequencies
from lenx.positional.rope_scaling import rope_inv_freq
from lenx.positional.t5 import t5_bucket

from .conftest import tiny_config, tiny_model

# ------------------------------------------------------------------------------------------ T5


@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (16, 64), (64, 512)])
def test_t5_buckets_match_transformers(num_buckets, max_distance):
    from transformers.models.t5.modeling_t5 import T5Attention

    dist = torch.arange(4097)  # i - j; transformers takes memory - query = j - i
    ours = t5_bucket(dist, num_buckets, max_distance)
    theirs = T5Attention._relative_position_bucket(-dist, bidirectional=False, num_buckets=num_buckets,
                                                   max_distance=max_distance)
    assert torch.equal(ours, theirs)
    assert ours[: num_buckets // 2].tolist() == list(range(num_buckets // 2))  # exact buckets
    assert (ours[max_distance:] == num_buckets - 1).all()  # everything far shares the last bucket


def test_t5_default_last_bucket_starts_at_113():
    """What `lenx schemes t5` states: with 32 buckets and max_distance 128 the bias is constant from distance 113 on."""
    b = t5_bucket(torch.arange(400), 32, 128)
    assert b[112] == 30 and (b[113:] == 31).all() and b.unique().numel() == 32
    assert "every distance from 113 on" in " ".join(REGISTRY["t5"].details.split())


def test_t5_bias_reads_the_table_by_bucket():
    model = tiny_model("t5", n_head=2, d_model=16)
    pos = torch.arange(200)
    b = model.pe.bias(0, pos).block(0, 200)[0]  # (H, 200, 200)
    table = model.pe.table[0]  # (buckets, H)
    for i, j in [(0, 0), (5, 3), (40, 1), (199, 0), (150, 149)]:
        torch.testing.assert_close(b[:, i, j], table[t5_bucket(torch.tensor(i - j))])


def test_t5_shared_is_the_default_and_per_layer_is_an_option():
    shared = tiny_model("t5", n_layer=3)
    assert REGISTRY["t5"].defaults["shared"] is True and shared.pe.table.shape[0] == 1
    pos = torch.arange(20)
    torch.testing.assert_close(shared.pe.bias(0, pos).block(0, 20), shared.pe.bias(2, pos).block(0, 20))
    per_layer = tiny_model("t5", n_layer=3, pe_options={"shared": False})
    assert per_layer.pe.table.shape[0] == 3
    assert not torch.allclose(per_layer.pe.bias(0, pos).block(0, 20), per_layer.pe.bias(2, pos).block(0, 20))


def test_t5_init_follows_hf_and_zero_is_available():
    model = LenxModel("t5", d_model=64, n_head=4)
    std = model.pe.table.std().item()
    assert 0.5 * 64**-0.5 < std < 1.5 * 64**-0.5
    assert LenxModel("t5", pe_options={"init": "zero"}).pe.table.abs().max() == 0
    with pytest.raises(LenxError, match="init"):
        LenxModel("t5", pe_options={"init": "uniform"})


def LenxModel(pe, **kw):
    """A freshly initialised model (tiny_model perturbs scheme parameters)."""
    from lenx.model import LenxForCausalLM

    torch.manual_seed(0)
    return LenxForCausalLM(tiny_config(pe, **kw))


# ---------------------------------------------------------------------------------------- Shaw


def shaw_loop(q, k, v, a_k, a_v, clip):
    """Shaw et al. eqs. (3)-(4) written out, causal: e_ij = q_i.(k_j + a^K_ij)/sqrt(d), z_i = sum_j a_ij (v_j + a^V_ij),
    with a^*_ij = w^*_clip(j - i, -k, k). a_k[r], a_v[r] hold w_{-r} (a causal decoder only sees j - i <= 0)."""
    B, H, T, d = q.shape
    out = torch.zeros_like(q, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                r = [-max(-clip, j - i) for j in range(i + 1)]  # index of w_clip(j - i)
                e = torch.stack([q[b, h, i] @ (k[b, h, j] + a_k[r[j]]) for j in range(i + 1)]) / math.sqrt(d)
                alpha = e.softmax(0)
                out[b, h, i] = sum(alpha[j] * (v[b, h, j] + a_v[r[j]]) for j in range(i + 1))
    return out


@pytest.mark.parametrize("backend, block", [("sdpa", 4), ("sdpa", 512), ("materialized", 512)])
def test_shaw_matches_the_papers_equations(backend, block):
    model = tiny_model("shaw", d_model=16, n_head=2, pe_options={"k": 3})  # clip well below the length
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 2, 11, 8) for _ in range(3))
    layer = 1
    with torch.no_grad():
        got = causal_attention(q, k, v, model.pe.bias(layer, torch.arange(11)), backend, block)
    a_k, a_v = model.pe.a_k[layer].detach().double(), model.pe.a_v[layer].detach().double()
    want = shaw_loop(q.double(), k.double(), v.double(), a_k, a_v, clip=3)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_shaw_memory_is_per_block():
    """The score term gathers (B, H, rows, keys) from q @ A_K^T; no (rows, keys, d) tensor is built."""
    model = tiny_model("shaw", d_model=16, n_head=2)
    q = torch.randn(1, 2, 4, 8)
    b = model.pe.bias(0, torch.arange(100)).block(96, 100, q)
    assert b.shape == (1, 2, 4, 100)


# -------------------------------------------------------------------------------------- KERPLE


def test_kerple_log_closed_form_and_reference_init():
    model = LenxModel("kerple-log", n_head=4)
    r1, r2 = model.pe.r1.detach(), model.pe.r2.detach()
    assert (0 <= r1).all() and (r1 <= 2).all() and (0 <= r2).all() and (r2 <= 1).all()
    b = model.pe.bias(0, torch.arange(30)).block(0, 30)[0]
    i, j = torch.arange(30)[:, None], torch.arange(30)[None, :]
    for h in range(4):
        want = -r1[h].clamp(min=0.01) * torch.log(1 + r2[h].clamp(min=0.01) * (i - j).abs())
        torch.testing.assert_close(b[h].tril(), want.tril())


def test_kerple_power_closed_form_and_clamps():
    model = LenxModel("kerple-power", n_head=4)
    with torch.no_grad():
        model.pe.r1.copy_(torch.tensor([-1.0, 0.005, 0.5, 3.0]))
        model.pe.r2.copy_(torch.tensor([0.5, -2.0, 1.0, 7.0]))  # out of range: projected as the reference does
    b = model.pe.bias(1, torch.arange(30)).block(0, 30)[0]
    r1, r2 = torch.tensor([0.01, 0.01, 0.5, 3.0]), torch.tensor([0.5, 0.01, 1.0, 2.0])
    d = (torch.arange(30)[:, None] - torch.arange(30)[None, :]).clamp(min=0).float()
    torch.testing.assert_close(b, -r1[:, None, None] * d ** r2[:, None, None])
    torch.testing.assert_close(model.pe.r2.detach(), r2)
    # kernel = ALiBi with a learned slope at r2 = 1
    torch.testing.assert_close(b[2], -0.5 * d)


def test_kerple_is_shared_across_layers_and_gradients_are_finite():
    model = tiny_model("kerple-power").train()
    pos = torch.arange(12)
    torch.testing.assert_close(model.pe.bias(0, pos).block(0, 12), model.pe.bias(1, pos).block(0, 12))
    x = torch.randint(0, 60, (2, 12))
    model(x, labels=x).loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
               for p in model.pe.parameters())


def test_alibi_bias_closed_form_at_shifted_positions():
    model = tiny_model("alibi", n_head=4)
    pos = torch.arange(1000, 1025)
    b = model.pe.bias(0, pos).block(0, 25)[0]
    d = (pos[:, None] - pos[None, :]).clamp(min=0).float()
    torch.testing.assert_close(b, -torch.tensor(alibi_slopes(4))[:, None, None] * d)


# ---------------------------------------------------------------------------------------- FIRE


def test_fire_input_stays_in_unit_interval_up_to_16x():
    model = tiny_model("fire", train_len=16)  # c and L perturbed away from their init
    with torch.no_grad():
        for c, mult in [(0.1, 1.0), (-0.7, 0.3), (5.0, -2.0)]:
            model.pe.c.fill_(c)
            model.pe.L_mult.fill_(mult)
            pos = torch.arange(16 * 16)
            x = model.pe.normalized_distance(pos, pos).squeeze(-1)
            causal = x[torch.ones(len(pos), len(pos), dtype=torch.bool).tril()]
            assert causal.min() >= 0 and causal.max() <= 1
            assert causal.max() > 0.9  # the far end of the range is used: i - j = i past the threshold


def test_fire_bias_is_the_mlp_of_the_papers_normalised_distance():
    model = tiny_model("fire", n_head=2, d_model=16, train_len=8)
    pe = model.pe
    pos = torch.arange(20)
    b = pe.bias(0, pos).block(5, 20)[0]  # rows 5..19
    c, L = pe.c.item(), abs(pe.L_mult.item() * 8)
    psi = lambda x: math.log(abs(c * x) + 1)  # noqa: E731
    for i, j in [(5, 0), (7, 7), (12, 3), (19, 0), (19, 18)]:
        x = psi(i - j) / (psi(max(L, i)) + 1e-6)
        torch.testing.assert_close(b[:, i - 5, j], pe.f(torch.tensor([[x]]))[0], atol=1e-6, rtol=1e-5)


def fire_with_breakpoints_in_unit_interval(train_len=16, c=0.37, L_mult=0.4, n_head=4, seed=0):
    """A FIRE scheme whose ReLU units switch inside the MLP's input range [0, 1], with rows past the threshold."""
    pe = tiny_model("fire", n_head=n_head, d_model=8 * n_head, train_len=train_len, seed=seed).pe
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w1 = torch.randn(pe.f[0].weight.shape[0], generator=g)
        pe.f[0].weight[:, 0] = w1
        pe.f[0].bias.copy_(-w1 * torch.rand(w1.shape, generator=g))
        pe.f[2].weight.normal_(generator=g)
        pe.c.fill_(c)
        pe.L_mult.fill_(L_mult)
    return pe


def fire_blocks(T, block):
    return [(q0, min(q0 + block, T)) for q0 in range(0, T, block)]


@pytest.mark.parametrize("T, p0, block, c", [(256, 0, 32, 0.37), (250, 0, 32, 0.37), (256, 0, 7, -2.0),
                                             (200, 45, 64, 0.37), (256, 0, 256, 5.0)])
def test_fire_fast_bias_equals_the_mlp_past_the_threshold(T, p0, block, c):
    """block() (piecewise-linear f, one strided buffer per block) equals the MLP on every pair, up to 16x the
    training length, future keys -inf; the blocks do contain units that switch between their rows."""
    pe = fire_with_breakpoints_in_unit_interval(c=c)
    bias = pe.bias(0, torch.arange(T) + p0)
    assert bias.masks_future and bias.toeplitz_table() is None
    switching = 0
    with torch.no_grad():
        w1, b1 = pe.f[0].weight[:, 0], pe.f[0].bias
        for q0, q1 in fire_blocks(T, block):
            fast, ref = bias.block(q0, q1)[0], bias.direct_block(q0, q1)[0]
            assert fast.shape == ref.shape == (4, q1 - q0, q1)
            future = torch.arange(q1)[None, :] > torch.arange(q0, q1)[:, None]
            assert torch.isneginf(fast[:, future]).all()
            torch.testing.assert_close(fast[:, ~future], ref[:, ~future], atol=1e-5, rtol=1e-5)
            # (unit, key) pairs where the unit is on for some of the block's rows and off for others
            x = pe.normalized_distance(torch.arange(q0, q1) + p0, torch.arange(q1) + p0)[..., 0]
            on = w1[:, None, None] * x + b1[:, None, None] > 0  # (W, rows, keys)
            switching += int(((on & ~future).any(1) & (~on & ~future).any(1)).sum())
    assert switching > 0


def test_fire_fast_bias_gradients_equal_the_mlps():
    pe = fire_with_breakpoints_in_unit_interval()
    T = 256
    g = torch.Generator().manual_seed(5)
    for q0, q1 in [(0, T), (40, 136), (224, 256)]:
        future = torch.arange(q1)[None, :] > torch.arange(q0, q1)[:, None]
        weight = torch.randn(4, q1 - q0, q1, generator=g)
        grads = []
        for fast in (True, False):
            pe.zero_grad()
            bias = pe.bias(0, torch.arange(T) + 3)  # one backward per bias: its blocks share per-layer pieces
            b = bias.block(q0, q1) if fast else bias.direct_block(q0, q1)
            (b[0].masked_fill(future, 0) * weight).sum().backward()
            grads.append([p.grad.clone() for p in pe.parameters()])
        for fast, ref in zip(*grads):
            torch.testing.assert_close(fast, ref, atol=1e-4, rtol=1e-4)


def test_fire_uses_a_distance_table_below_the_threshold():
    from lenx.positional.fire import FireBias

    pe = fire_with_breakpoints_in_unit_interval(L_mult=1.0)  # threshold 16: positions 0..15 lie below it
    bias = pe.bias(0, torch.arange(16))
    table = bias.toeplitz_table()
    d = (torch.arange(16)[:, None] - torch.arange(16)[None, :]).clamp(min=0)
    with torch.no_grad():
        causal = d.tril() == d
        ref = bias.direct_block(0, 16)[0]
        torch.testing.assert_close(table[:, d][:, causal.tril()], ref[:, causal.tril()], atol=1e-6, rtol=1e-5)
    assert table.requires_grad  # training takes the table route with gradients
    assert pe.bias(0, torch.arange(17)).toeplitz_table() is None  # position 16 reaches the threshold
    assert pe.bias(0, torch.arange(16) + 1).toeplitz_table() is None
    assert pe.bias(0, torch.arange(0, 16, 2)).toeplitz_table() is None  # not contiguous


def test_fire_training_at_the_training_length_never_builds_blocks(monkeypatch):
    from lenx.positional.fire import FireBias

    model = tiny_model("fire", train_len=16, attn_block_size=4)
    with torch.no_grad():
        model.pe.L_mult.fill_(1.0)
    x = torch.randint(0, 60, (2, 16))
    ref = tiny_model("fire", train_len=16, attn_backend="materialized")
    ref.load_state_dict(model.state_dict())
    ref(x, labels=x).loss.backward()
    monkeypatch.setattr(FireBias, "block", lambda *a: pytest.fail("block() called below the threshold"))
    model.train()(x, labels=x).loss.backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("backend", ["sdpa", "materialized"])
def test_fire_attention_with_the_fast_bias_equals_the_mlp(monkeypatch, backend):
    """Logits and gradients at 16x the training length, the fast bias against the MLP on every pair."""
    from lenx.positional.fire import FireBias

    x = torch.randint(0, 60, (1, 256), generator=torch.Generator().manual_seed(3))
    out = {}
    for name in ("fast", "direct"):
        model = tiny_model("fire", train_len=16, attn_block_size=48, attn_backend=backend)
        model.pe.load_state_dict(fire_with_breakpoints_in_unit_interval().state_dict())
        if name == "direct":
            future = lambda q0, q1: torch.arange(q1)[None, :] > torch.arange(q0, q1)[:, None]  # noqa: E731
            monkeypatch.setattr(FireBias, "block",
                                lambda self, q0, q1, q=None: self.direct_block(q0, q1).masked_fill(future(q0, q1), -math.inf))
        loss = model(x, labels=x).loss
        loss.backward()
        out[name] = loss.detach(), [p.grad for p in model.parameters()]
    torch.testing.assert_close(out["fast"][0], out["direct"][0], atol=1e-5, rtol=1e-5)
    for fast, ref in zip(out["fast"][1], out["direct"][1]):
        torch.testing.assert_close(fast, ref, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------- relative schemes: shift


def scores(model, pos, q, k):
    """The attention scores of layer 0 as the model builds them: q.k/sqrt(d) after the rotate hook, plus the bias."""
    pe = model.pe
    q, k = pe.rotate(q, k, pos)
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    bias = pe.bias(0, pos)
    if bias is not None:
        s = s + bias.block(0, len(pos), q)
    return s.tril()  # the causal part; above the diagonal is masked


RELATIVE = {"t5", "shaw", "kerple-log", "kerple-power", "alibi", "rope", "xpos", "pope", "sandwich", "dpb"}


def test_relative_flag_is_set_for_exactly_the_relative_papers():
    assert {name for name, cls in REGISTRY.items() if cls.relative} == RELATIVE


@pytest.mark.parametrize("pe", sorted(RELATIVE))
def test_shifting_positions_leaves_scores_unchanged(pe):
    model = tiny_model(pe, d_model=32, n_head=2)
    torch.manual_seed(4)
    q, k = torch.randn(1, 2, 24, 16), torch.randn(1, 2, 24, 16)
    x = torch.randn(1, 24, 32)
    pos = torch.arange(24)
    with torch.no_grad():
        torch.testing.assert_close(scores(model, pos + 777, q, k), scores(model, pos, q, k), atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(model.pe.embed(x, pos + 777), model.pe.embed(x, pos))


def test_fire_scores_do_depend_on_absolute_position():
    """The negative control: FIRE normalises by the query position, so a shift past L changes the scores."""
    model = tiny_model("fire", d_model=32, n_head=2, train_len=16)
    q, k = torch.randn(1, 2, 24, 16), torch.randn(1, 2, 24, 16)
    pos = torch.arange(24)
    with torch.no_grad():
        assert not torch.allclose(scores(model, pos + 777, q, k), scores(model, pos, q, k), atol=1e-3)


# ---------------------------------------------------------------------------------------- xPos


def test_xpos_score_is_rope_score_times_decay_of_the_offset():
    xpos, rope = tiny_model("xpos", d_model=32, n_head=2).pe, tiny_model("rope", d_model=32, n_head=2).pe
    d, g = 16, 512.0
    pos = torch.arange(0, 3000, 97)
    for pair in (0, 3, 7):
        q, k = torch.zeros(1, 1, len(pos), d), torch.zeros(1, 1, len(pos), d)
        q[..., 2 * pair], q[..., 2 * pair + 1] = 1.0, -0.5
        k[..., 2 * pair], k[..., 2 * pair + 1] = 0.3, 0.8
        xq, xk = xpos.rotate(q, k, pos)
        rq, rk = rope.rotate(q, k, pos)
        zeta = (2 * pair + 0.4 * d) / (1.4 * d)
        decay = zeta ** ((pos[:, None] - pos[None, :]).double() / g)
        want = (rq @ rk.transpose(-1, -2))[0, 0].double() * decay
        assert want.abs().max() > 0.1
        torch.testing.assert_close((xq @ xk.transpose(-1, -2))[0, 0].double(), want, atol=1e-4, rtol=1e-4)


def test_a_scheme_built_on_its_own_holds_its_papers_init():
    """Not torch.empty's leftovers: each learned scheme initialises itself in its constructor, as torch modules do."""
    torch.manual_seed(0)
    built = {name: REGISTRY[name](tiny_config(name, d_model=64, n_head=4, n_layer=3)) for name in REGISTRY}
    for name, scheme in built.items():
        for p in scheme.parameters():
            assert torch.isfinite(p).all(), name
    assert built["fire"].c.item() == pytest.approx(0.1) and built["fire"].L_mult.item() == 1.0
    for name, (r1_max, r2_max) in (("kerple-log", (2, 1)), ("kerple-power", (1, 2))):
        r1, r2 = built[name].r1, built[name].r2
        assert 0 <= r1.min() < r1.max() <= r1_max and 0 <= r2.min() < r2.max() <= r2_max, name
    assert 0.01 < built["shaw"].a_k.std() < 0.03 and 0.01 < built["shaw"].a_v.std() < 0.03
    assert 0.6 * 64**-0.5 < built["t5"].table.std() < 1.4 * 64**-0.5  # HF T5's N(0, d_model^-0.5)
    assert 0.017 < built["learned"].table.std() < 0.023  # N(0, 0.02), not GPT-2's released N(0, 0.01)
    assert "Init N(0, 0.02)" in " ".join(REGISTRY["learned"].details.split())


def test_xpos_refuses_windows_past_float32_range_instead_of_nan():
    """zeta^(+-n/g) with zeta down to 0.4/1.4 overflows float32 in a long enough window (NaN scores, torchscale too).
    With scale_base 8 the bound is 882 positions; at 1200 the unchecked model gave NaN logits."""
    from lenx.errors import LengthNotSupported

    model = tiny_model("xpos", pe_options={"scale_base": 8.0})
    assert model.pe.max_span() == model.pe.max_len == 882
    assert tiny_model("xpos").pe.max_span() == 56463  # the default scale_base 512
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.randint(0, 60, (1, 882))).logits).all()
        for T in (883, 1200):
            with pytest.raises(LengthNotSupported, match=f"window of {T} positions \\(at most 882\\)"):
                model(input_ids=torch.randint(0, 60, (1, T)))
        # positions that do not start at 0 count by their span, not their values
        assert torch.isfinite(model(input_ids=torch.randint(0, 60, (1, 800)),
                                    position_ids=torch.arange(5000, 5800)[None]).logits).all()


def test_xpos_refuses_a_training_length_past_its_range():
    with pytest.raises(LenxError, match=r"xpos cannot train on 900-token windows at scale_base 8: .* scale_base >= 9"):
        tiny_model("xpos", train_len=900, pe_options={"scale_base": 8.0})
    assert tiny_model("xpos", train_len=900, pe_options={"scale_base": 9.0}).pe.max_span() >= 900


# --------------------------------------------------------------------- against reference libraries


@pytest.mark.parametrize("head_dim, base", [(8, 10000.0), (64, 10000.0), (128, 500000.0)])
def test_rope_inv_freq_matches_transformers_default(head_dim, base):
    """theta_k = base^(-2k/d) (Su et al. 2021, eq. 15), as transformers' default RoPE (LlamaRotaryEmbedding)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hf_inv, attn = LlamaRotaryEmbedding.compute_default_rope_parameters(hf_config("default", head_dim, base, 1.0, 16))
    torch.testing.assert_close(rope_inv_freq(head_dim, base), hf_inv.double(), atol=1e-7, rtol=1e-6)
    assert rope_frequencies(head_dim, base)[1] == attn == 1.0


def test_rope_rotation_matches_transformers_up_to_the_pair_layout():
    """lenx rotates pairs (2k, 2k+1) as RoFormer's eq. 34; transformers' rotate_half pairs (k, k + d/2). The same
    rotation after that permutation of the head dimensions, hence the same scores for projections permuted alike."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    d, T = 16, 40
    rope = REGISTRY["rope"](tiny_config("rope", d_model=2 * d, n_head=2))
    hf = LlamaRotaryEmbedding(hf_config("default", d, 10000.0, 1.0, 16))
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, T, d), torch.randn(1, 2, T, d)
    pos = torch.arange(100, 100 + T)
    perm = torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])  # lenx pair k -> transformers' (k, k + d/2)
    cos, sin = hf(q, pos[None])
    hq, hk = apply_rotary_pos_emb(q[..., perm], k[..., perm], cos, sin)
    lq, lk = rope.rotate(q, k, pos)
    torch.testing.assert_close(lq[..., perm], hq, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lk[..., perm], hk, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n_head", list(range(1, 33)) + [40, 48, 64])
def test_alibi_slopes_match_transformers_bloom(n_head):
    """BLOOM's build_alibi_tensor follows the ALiBi paper's get_slopes, non-powers of two included (MPT does not)."""
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    alibi = build_alibi_tensor(torch.ones(1, 3), n_head, torch.float64)  # (H, 1, T): slope_h * j
    torch.testing.assert_close(torch.tensor(alibi_slopes(n_head), dtype=torch.float64), alibi[:, 0, 1])


def test_sinusoid_matches_transformers_table():
    """Vaswani et al. 2017 section 3.5, as transformers builds it (DistilBERT's sinusoidal_pos_embds)."""
    from transformers.models.distilbert.modeling_distilbert import _create_sinusoidal_embeddings

    from lenx.positional.sinusoidal import sinusoid_table

    theirs = _create_sinusoidal_embeddings(300, 64, torch.empty(300, 64))
    torch.testing.assert_close(sinusoid_table(torch.arange(300), 64), theirs, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- RoPE extensions


def hf_config(rope_type, head_dim, base, factor, train_len):
    from transformers import LlamaConfig

    params = {"rope_type": rope_type, "rope_theta": base, "factor": factor}
    if rope_type == "yarn":
        params["original_max_position_embeddings"] = train_len
    return LlamaConfig(hidden_size=2 * head_dim, num_attention_heads=2, head_dim=head_dim,
                       max_position_embeddings=train_len, rope_parameters=params)


CASES = [(32, 10000.0, 4.0, 16), (64, 10000.0, 8.0, 2048), (128, 500000.0, 2.5, 4096)]


@pytest.mark.parametrize("head_dim, base, factor, train_len", CASES)
def test_pi_and_yarn_match_transformers(head_dim, base, factor, train_len):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for ours, theirs in [("pi", "linear"), ("yarn", "yarn")]:
        inv, attn = rope_frequencies(head_dim, base, ours, factor, train_len)
        hf_inv, hf_attn = ROPE_INIT_FUNCTIONS[theirs](hf_config(theirs, head_dim, base, factor, train_len), "cpu")
        torch.testing.assert_close(inv, hf_inv.double(), atol=1e-6, rtol=1e-6)
        assert attn == pytest.approx(hf_attn, abs=1e-6)
    # YaRN is neither pure interpolation nor none: its ramp is used (at realistic lengths, interior values too)
    theta = rope_inv_freq(head_dim, base)
    ratio = rope_frequencies(head_dim, base, "yarn", factor, train_len)[0] / theta
    assert ratio[0] == 1 and ratio[-1] == pytest.approx(1 / factor)


def test_yarn_attention_factor_for_s4():
    assert rope_frequencies(64, 10000.0, "yarn", 4.0, 128)[1] == pytest.approx(1.1386, abs=1e-4)


@pytest.mark.parametrize("head_dim, base, factor, train_len", CASES)
@pytest.mark.parametrize("seq_mult", [0.5, 1.0, 3.0, 16.0])
def test_dynamic_ntk_matches_transformers(head_dim, base, factor, train_len, seq_mult):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    seq_len = int(seq_mult * train_len)
    for f in (None, factor):  # lenx's default factor is transformers' 1
        cfg = hf_config("dynamic", head_dim, base, f or 1.0, train_len)
        hf_inv, _ = ROPE_INIT_FUNCTIONS["dynamic"](cfg, "cpu", seq_len=seq_len)
        inv, attn = rope_frequencies(head_dim, base, "dynamic-ntk", f, train_len, seq_len)
        torch.testing.assert_close(inv, hf_inv.double(), atol=1e-6, rtol=1e-6)
        assert attn == 1.0


def test_ntk_base_formula():
    """NTK-aware scaling has no transformers rope type to compare with: its formula, and the text says so."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    assert not {"ntk", "ntk-aware"} & set(ROPE_INIT_FUNCTIONS)
    assert "ntk, which transformers lacks" in " ".join(REGISTRY["rope"].details.split())
    d, base, s = 64, 10000.0, 8.0
    inv, _ = rope_frequencies(d, base, "ntk", s, 128)
    new_base = base * s ** (d / (d - 2))
    torch.testing.assert_close(inv, new_base ** -(torch.arange(0, d, 2, dtype=torch.float64) / d))
    # static NTK at s equals dynamic NTK (factor 1) on a sequence s times the training length
    torch.testing.assert_close(inv, rope_frequencies(d, base, "dynamic-ntk", None, 128, int(s * 128))[0])


@pytest.mark.parametrize("pe", ["rope", "xpos"])
def test_scalings_act_in_rotate(pe):
    model = tiny_model(pe, d_model=32, n_head=2, train_len=16)
    q, k = torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16)
    pos = torch.arange(64)
    base = scores(model, pos, q, k)
    # PI with s = 2 at positions 2m gives RoPE's angles at m (xPos: its decay keeps the raw positions)
    model.pe.set_eval_scaling("pi", 2.0)
    if pe == "rope":
        q2, k2 = model.pe.rotate(q, k, 2 * pos)
        model.pe.set_eval_scaling("none")
        torch.testing.assert_close(torch.stack(model.pe.rotate(q, k, pos)), torch.stack((q2, k2)), atol=1e-5, rtol=1e-5)
    # YaRN at position 0 (no rotation) multiplies q.k by the attention factor squared
    model.pe.set_eval_scaling("yarn", 4.0)
    yq, yk = model.pe.rotate(q, k, pos)
    a = 0.1 * math.log(4.0) + 1
    model.pe.set_eval_scaling("none")
    nq, nk = model.pe.rotate(q, k, pos)
    torch.testing.assert_close((yq[..., 0, :] * yk[..., 0, :]).sum(-1), a * a * (nq[..., 0, :] * nk[..., 0, :]).sum(-1))
    # dynamic NTK leaves sequences up to the training length alone and changes longer ones
    model.pe.set_eval_scaling("dynamic-ntk")
    torch.testing.assert_close(scores(model, pos[:16], q[..., :16, :], k[..., :16, :]), base[..., :16, :16])
    assert not torch.allclose(scores(model, pos, q, k), base, atol=1e-3)


@pytest.mark.parametrize("pe", sorted(set(REGISTRY) - {"rope", "xpos"}))
def test_non_rope_schemes_refuse_rope_scaling(pe):
    scheme = tiny_model(pe).pe
    scheme.set_eval_scaling("none")
    with pytest.raises(LenxError, match="applies to rope, xpos runs"):
        scheme.set_eval_scaling("yarn", 4.0)


def test_fire_bias_built_in_row_chunks_equals_one_piece(monkeypatch):
    from lenx.positional.fire import FireBias

    from .conftest import tiny_model

    bias = tiny_model("fire").pe.bias(0, torch.arange(20))
    whole, tail = bias.direct_block(0, 20), bias.direct_block(5, 20)
    monkeypatch.setattr(FireBias, "rows", 3)
    torch.testing.assert_close(bias.direct_block(0, 20), whole)
    torch.testing.assert_close(bias.direct_block(5, 20), tail)


def test_blocked_attention_honours_max_block_rows(monkeypatch):
    from lenx.positional.fire import FireBias

    sizes, block = [], FireBias.block
    monkeypatch.setattr(FireBias, "max_block_rows", 16)
    monkeypatch.setattr(FireBias, "block", lambda self, q0, q1, q=None: sizes.append(q1 - q0) or block(self, q0, q1))
    x = torch.randint(0, 60, (1, 100), generator=torch.Generator().manual_seed(3))
    model = tiny_model("fire", train_len=16, attn_block_size=48)
    ref = tiny_model("fire", train_len=16, attn_backend="materialized")
    with torch.no_grad():
        fast = model(x).logits
        assert sizes == ([16] * 6 + [4]) * 2  # two layers
        torch.testing.assert_close(fast, ref(x).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fraction, head_dim", [(0.25, 64), (0.5, 16), (1.0, 16), (0.0, 16)])
def test_rotary_fraction_is_transformers_proportional_rope(fraction, head_dim):
    """p-RoPE: the first int(p * d/2) pairs (the fastest) keep their frequencies, the rest are zero (no rotation),
    exactly as transformers' rope type `proportional` computes them."""
    from transformers import PretrainedConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = PretrainedConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim,
                           rope_parameters={"rope_type": "proportional", "rope_theta": 10000.0,
                                            "partial_rotary_factor": fraction})
    want, _ = ROPE_INIT_FUNCTIONS["proportional"](cfg, "cpu")
    rope = REGISTRY["rope"](tiny_config("rope", d_model=head_dim * 2, n_head=2, pe_options={"rotary_fraction": fraction}))
    got, _ = rope.inv_freq(16)
    torch.testing.assert_close(got.float(), want.float())
    # unrotated pairs pass through rotate unchanged at every position
    q = torch.randn(1, 2, 30, head_dim)
    rq, _ = rope.rotate(q, q, torch.arange(30) + 5)
    n = int(fraction * head_dim // 2)
    torch.testing.assert_close(rq[..., 2 * n :], q[..., 2 * n :])
    assert n == 0 or not torch.allclose(rq[..., : 2 * n], q[..., : 2 * n])


def test_nope_every_follows_llama4s_no_rope_layers():
    """Llama 4 builds no_rope_layers as int((l + 1) % interval != 0): 1 = RoPE. nope_every k leaves those layers
    unrotated, and the model passes each layer its index."""
    from transformers import Llama4TextConfig

    hf = Llama4TextConfig(num_hidden_layers=8, no_rope_layer_interval=4)
    model = tiny_model("rope", n_layer=8, pe_options={"nope_every": 4})
    assert [int(model.pe.rotates(layer)) for layer in range(8)] == hf.no_rope_layers
    q = torch.randn(1, 4, 10, 8)
    assert torch.equal(model.pe.rotate(q, q, torch.arange(10), layer=3)[0], q)
    assert not torch.equal(model.pe.rotate(q, q, torch.arange(10), layer=2)[0], q)
    seen = []
    original = model.pe.rotate
    model.pe.rotate = lambda q, k, p, layer: seen.append(layer) or original(q, k, p, layer)
    model(torch.randint(0, 60, (1, 12)))
    assert seen == list(range(8))
    plain = tiny_model("rope", n_layer=8)
    assert all(plain.pe.rotates(layer) for layer in range(8))
