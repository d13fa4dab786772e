"""Properties of the schemes, from their papers."""

import math

import pytest
import torch

from lenx.attention import BACKENDS
from lenx.positional import REGISTRY
from lenx.positional.alibi import alibi_slopes
from lenx.positional.rope import RoPE
from lenx.positional.sinusoidal import sinusoid_table

from .conftest import ALL_SCHEMES, tiny_config, tiny_model


def test_rope_scores_depend_only_on_offset():
    scheme = RoPE(tiny_config("rope", d_model=64, n_head=2))
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 50, 32), torch.randn(1, 2, 50, 32)
    pos = torch.arange(50)
    rq, rk = scheme.rotate(q, k, pos)
    sq, sk = scheme.rotate(q, k, pos + 1000)
    torch.testing.assert_close(rq @ rk.transpose(-1, -2), sq @ sk.transpose(-1, -2), atol=2e-4, rtol=1e-4)
    # ...and rotation is not the identity: absolute positions do change q and k themselves.
    assert not torch.allclose(rq, sq, atol=1e-3)


def test_rope_rotates_pairs_by_position_times_theta():
    scheme = RoPE(tiny_config("rope", d_model=16, n_head=2))  # head dim 8: 4 pairs
    q = torch.zeros(1, 1, 4, 8)
    q[..., 2] = 1.0  # pair k = 1, first component
    out, _ = scheme.rotate(q, q.clone(), torch.arange(4))
    theta1 = 10000 ** (-2 * 1 / 8)
    for m in range(4):
        assert out[0, 0, m, 2].item() == pytest.approx(math.cos(m * theta1), abs=1e-6)
        assert out[0, 0, m, 3].item() == pytest.approx(math.sin(m * theta1), abs=1e-6)


def test_alibi_slopes_8_heads():
    assert alibi_slopes(8) == [2.0**-i for i in range(1, 9)]


def test_alibi_slopes_12_heads_follow_paper_code():
    # get_slopes(12): the 8 slopes of the closest lower power of two, then every other slope of 16 heads
    sixteen = [2.0 ** (-0.5 * i) for i in range(1, 17)]
    assert alibi_slopes(16) == pytest.approx(sixteen)
    expected = [2.0**-i for i in range(1, 9)] + sixteen[0::2][:4]
    assert alibi_slopes(12) == pytest.approx(expected, rel=1e-12)


def test_alibi_bias_is_fixed_linear_penalty():
    model = tiny_model("alibi", n_head=8, d_model=64)
    assert not list(model.pe.parameters())  # nothing learned
    bias = model.pe.bias(0, torch.arange(10)).block(0, 10)[0]
    m = torch.tensor(alibi_slopes(8))
    i, j = torch.arange(10)[:, None], torch.arange(10)[None, :]
    expected = -m[:, None, None] * (i - j).clamp(min=0)
    torch.testing.assert_close(bias, expected)


def test_sinusoidal_matches_vaswani_formula():
    d = 16
    pos = torch.arange(40)
    table = sinusoid_table(pos, d)
    for p in (0, 1, 7, 39):
        for i in range(d // 2):
            assert table[p, 2 * i].item() == pytest.approx(math.sin(p / 10000 ** (2 * i / d)), abs=1e-6)
            assert table[p, 2 * i + 1].item() == pytest.approx(math.cos(p / 10000 ** (2 * i / d)), abs=1e-6)


def test_sinusoid_layout_is_the_papers_and_the_fairseq_difference_is_stated():
    """lenx interleaves sin/cos at frequencies 10000^(-2k/d) (Vaswani et al. 3.5). fairseq's table (the ALiBi
    baseline; tensor2tensor's too) puts all sines first and spaces frequencies as 10000^(-k/(d/2 - 1)): the layout
    is a permutation of lenx's, the frequencies are not, and `lenx schemes sinusoidal` says so."""
    d, pos = 16, torch.arange(50, dtype=torch.float64)
    ours = sinusoid_table(pos, d).double()
    halves = torch.cat([ours[:, 0::2], ours[:, 1::2]], 1)  # lenx's table in fairseq's layout
    k = torch.arange(d // 2, dtype=torch.float64)
    paper = pos[:, None] * 10000 ** (-2 * k / d)
    fairseq = pos[:, None] * 10000 ** (-k / (d // 2 - 1))
    torch.testing.assert_close(halves, torch.cat([paper.sin(), paper.cos()], 1), atol=1e-6, rtol=0)
    assert not torch.allclose(halves, torch.cat([fairseq.sin(), fairseq.cos()], 1), atol=1e-2)
    details = " ".join(REGISTRY["sinusoidal"].details.split())
    assert "interleaved" in details and "10000^(-k/(d/2 - 1))" in details and "fairseq" in details


# (batch, length, t): within the training length (16), and at 10x it, where other routes run: FIRE's normaliser past
# its threshold, Shaw's keys past the clip, T5's last bucket (distances >= 113), the blocked and separable kernels
CAUSALITY_CASES = [(pe, 2, 16, 9) for pe in ALL_SCHEMES] + [
    (pe, 1, 160, 140) for pe in ALL_SCHEMES if pe != "learned"]  # learned: no vector past its table


@pytest.mark.parametrize("pe,batch,T,t", CAUSALITY_CASES)
def test_causality(pe, batch, T, t):
    """Changing tokens after position t leaves the logits at positions <= t unchanged."""
    model = tiny_model(pe, attn_block_size=32)
    torch.manual_seed(1)
    x = torch.randint(0, 60, (batch, T))
    y = x.clone()
    y[:, t + 1 :] = torch.randint(0, 60, (batch, T - t - 1))
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])


@pytest.mark.parametrize("pe", ALL_SCHEMES)
def test_learned_flag_matches_parameters(pe):
    model = tiny_model(pe)
    assert REGISTRY[pe].learned == any(True for _ in model.pe.parameters())


CPU_BACKENDS = [b for b in BACKENDS if b != "materialized"]  # flex runs its fallback route on CPU


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("pe", ALL_SCHEMES)
@pytest.mark.parametrize("T", [13, 37])
def test_backends_agree(pe, T, backend):
    """Every attention route equals the materialised reference, at lengths that are not block multiples."""
    torch.manual_seed(2)
    x = torch.randint(0, 60, (2, T))
    fast = tiny_model(pe, train_len=64, attn_block_size=8, attn_backend=backend)
    ref = tiny_model(pe, train_len=64, attn_backend="materialized")
    ref.load_state_dict(fast.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fast(x).logits, ref(x).logits, atol=1e-5, rtol=1e-5)


def test_learned_positions_end_at_table():
    from lenx.errors import LengthNotSupported

    model = tiny_model("learned")
    with pytest.raises(LengthNotSupported):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_unknown_scheme_lists_known():
    from lenx.errors import LenxError
    from lenx.positional import get_scheme

    with pytest.raises(LenxError, match="known schemes: .*alibi"):
        get_scheme("nosuch")


def test_mistyped_names_get_the_closest_known_one():
    from lenx.errors import LenxError, did_you_mean
    from lenx.positional import get_scheme

    with pytest.raises(LenxError, match=r"'ALiBi' \(did you mean 'alibi'\?\); known schemes"):
        get_scheme("ALiBi")
    assert did_you_mean("kerple-pwr", ["kerple-log", "kerple-power"]) == " (did you mean 'kerple-power'?)"
    assert did_you_mean("nosuch", ["rope", "alibi"]) == ""
    assert did_you_mean("rope", ["rope"]) == ""  # a known name is not a typo of itself


def test_scheme_names_are_data_and_each_module_loads_on_first_use():
    """The names and their order need no torch (the report orders its tables by them); a scheme's module is
    imported when it is first asked for, and the registry holds exactly the listed names, in their order."""
    import subprocess
    import sys

    from lenx.positional import SCHEMES

    code = ("import sys\nimport lenx.positional as P\nnames = list(P.SCHEMES)\nprint('torch' in sys.modules)\n"
            "P.get_scheme('alibi')\nprint(sorted(m for m in sys.modules if m.startswith('lenx.positional.')))\n"
            "print(list(P.REGISTRY) == names)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.splitlines() == ["False", "['lenx.positional.alibi', 'lenx.positional.base']", "True"], proc.stderr
    assert list(REGISTRY) == list(SCHEMES) and all(cls.name == name for name, cls in REGISTRY.items())


def test_a_scheme_missing_from_the_list_is_refused_at_registration():
    from lenx.positional import PositionalScheme, register

    class Unlisted(PositionalScheme):
        name = "unlisted"

    with pytest.raises(AssertionError, match="add 'unlisted'.*SCHEMES"):
        register(Unlisted)


@pytest.mark.parametrize("chunk", [4, 64])
@pytest.mark.parametrize("K", [1, 3, 16])
@pytest.mark.parametrize("T", [1, 4, 23, 70])
def test_clipped_relative_route_equals_the_reference_with_gradients(K, T, chunk):
    """Shaw's route (fused kernel past the clip, a band of K explicit scores, joined by log-sum-exp) gives the
    materialised reference's outputs and gradients, on either side of T = K."""
    from lenx.attention import causal_attention
    from lenx.attention_cpu import clipped as _clipped
    from lenx.positional.shaw import ShawBias

    torch.manual_seed(K * 100 + T)
    q, k, v = (torch.randn(2, 3, T, 8, requires_grad=True) for _ in range(3))
    a_k, a_v = (torch.randn(K + 1, 8, requires_grad=True) for _ in range(2))
    leaves = (q, k, v, a_k, a_v)
    g = torch.randn(2, 3, T, 8)
    bias = ShawBias(a_k, a_v, torch.arange(T) + 5)
    outs = {}
    for name, fn in {"clipped": lambda: _clipped(q, k, v, a_k, a_v, chunk),
                     "reference": lambda: causal_attention(q, k, v, bias, "materialized")}.items():
        out = fn()
        grads = torch.autograd.grad((out * g).sum(), leaves)
        outs[name] = (out, *grads)
    for a, b in zip(outs["clipped"], outs["reference"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("K, T", [(3, 2), (16, 70), (16, 200)])
def test_clipped_route_in_bf16_stays_within_bf16_rounding_of_the_fp32_reference(K, T):
    """Under bf16 autocast Shaw trains by the same route: the fused kernel in bf16, the band and the joining
    log-sum-exps in fp32. Outputs and gradients within bf16's rounding of the fp32 reference on the same inputs."""
    from lenx.attention import causal_attention
    from lenx.attention_cpu import clipped as _clipped
    from lenx.positional.shaw import ShawBias

    torch.manual_seed(K + T)
    leaves32 = [torch.randn(1, 2, T, 16) for _ in range(3)] + [torch.randn(K + 1, 16) * 0.5 for _ in range(2)]
    leaves32 = [x.bfloat16().float().requires_grad_() for x in leaves32]  # the same values in both precisions
    leaves16 = [x.detach().bfloat16().requires_grad_() if i < 3 else x.detach().clone().requires_grad_()
                for i, x in enumerate(leaves32)]
    g = torch.randn(1, 2, T, 16)
    q, k, v, a_k, a_v = leaves32
    ref = causal_attention(q, k, v, ShawBias(a_k, a_v, torch.arange(T)), "materialized")
    ref_grads = torch.autograd.grad((ref * g).sum(), leaves32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _clipped(*leaves16)
    assert out.dtype == torch.bfloat16
    grads = torch.autograd.grad((out.float() * g).sum(), leaves16)
    for a, b in zip((out, *grads), (ref, *ref_grads)):
        err = (a.float() - b).abs().max() / b.abs().max()
        assert err < 2e-2, err


def test_flash_lse_gradients_of_both_outputs():
    """The kernel's log-sum-exp is differentiable through _FlashLSE (torch's own op treats it as a constant)."""
    from lenx.attention_cpu import _FlashLSE

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 4, requires_grad=True) for _ in range(3))
    go, gl = torch.randn(1, 2, 9, 4), torch.randn(1, 2, 9)
    o, lse = _FlashLSE.apply(q, k, v, 0.5)
    fast = torch.autograd.grad((o * go).sum() + (lse * gl).sum(), (q, k, v))
    s = (q @ k.transpose(-1, -2) * 0.5).masked_fill(torch.ones(9, 9).triu(1).bool(), float("-inf"))
    o_ref, lse_ref = s.softmax(-1) @ v, s.logsumexp(-1)
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, lse_ref, atol=1e-5, rtol=1e-5)
    ref = torch.autograd.grad((o_ref * go).sum() + (lse_ref * gl).sum(), (q, k, v))
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
