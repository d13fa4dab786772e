"""Sandwich (Chi et al. 2023, as NeMo) and the dynamic position bias (x-transformers' DynamicPositionBias): each bias
against its closed form written out here, attention and gradients on every route against the materialised
reference and an explicit softmax, at 1x and 16x the training length; sandwich has no parameters, dpb's train."""

import math

import pytest
import torch
import torch.nn.functional as F

from lenx.attention import BACKENDS, causal_attention, recording
from lenx.errors import LenxError

from .conftest import tiny_config, tiny_model

TRAIN_LEN = 16


# ------------------------------------------------------------------------------------- closed forms, by loops


def sandwich_closed_form(i: int, j: int, h: int, d: int, H: int) -> float:
    """Head h = 1..H: (sum_{k=1..d/2} cos((i - j)/10000^(2k/d)) - d/2) / (8h/H)."""
    s = sum(math.cos((i - j) / 10000 ** (2 * k / d)) for k in range(1, d // 2 + 1))
    return (s - d / 2) / (h * 8 / H)


def dpb_by_hand(mlp, m: float, log_distance: bool):
    """The MLP of x-transformers applied to one signed distance m = i - j, layer by layer, in float64 (keeps the
    graph to the parameters). Linear, [LayerNorm], SiLU per hidden stage; the last Linear gives the H biases."""
    x = torch.tensor([math.copysign(math.log(abs(m) + 1), m) if log_distance else float(m)], dtype=torch.float64)
    for mod in mlp:
        if isinstance(mod, torch.nn.Linear):
            x = mod.weight.double() @ x + mod.bias.double()
        elif isinstance(mod, torch.nn.LayerNorm):
            mu, var = x.mean(), ((x - x.mean()) ** 2).mean()
            x = (x - mu) / torch.sqrt(var + mod.eps) * mod.weight.double()
            if mod.bias is not None:
                x = x + mod.bias.double()
        elif isinstance(mod, torch.nn.SiLU):
            x = x * torch.sigmoid(x)
        else:
            raise AssertionError(mod)
    return x  # (H,)


def slow_attention(q, k, v, bias_of):
    """softmax_j<=i (q_i.k_j/sqrt(d) + bias_of(i, j)) v_j by loops over queries, float64; bias_of gives (H,)."""
    B, H, T, hd = q.shape
    out = []
    for i in range(T):
        s = torch.stack([(q[:, :, i].double() * k[:, :, j].double()).sum(-1) / math.sqrt(hd) + bias_of(i, j)
                         for j in range(i + 1)], -1)  # (B, H, i + 1)
        out.append((s.softmax(-1)[..., None] * v[:, :, : i + 1].double()).sum(-2))
    return torch.stack(out, 2)


def _inputs(T, seed=0, B=2, H=4, hd=8, grad=False):
    g = torch.Generator().manual_seed(seed)
    ts = [torch.randn(B, H, T, hd, generator=g) for _ in range(3)]
    return [t.requires_grad_() for t in ts] if grad else ts


# ------------------------------------------------------------------------------------------------ sandwich


@pytest.mark.parametrize("d_model, n_head", [(32, 4), (64, 2), (96, 12)])
def test_sandwich_bias_is_the_sum_of_cosines_scaled_per_head(d_model, n_head):
    pe = tiny_model("sandwich", d_model=d_model, n_head=n_head).pe
    d, T = d_model // n_head, 40
    for pos in (torch.arange(T), torch.arange(T) * 3 + 11):  # any positions: the bias reads pos_i - pos_j
        b = pe.bias(1, pos).block(0, T)[0]
        want = torch.tensor([[[sandwich_closed_form(int(pos[i]), int(pos[j]), h, d, n_head) if j <= i else 0.0
                               for j in range(T)] for i in range(T)] for h in range(1, n_head + 1)])
        torch.testing.assert_close(b.tril(), want.float(), atol=1e-5, rtol=1e-6)
    table = pe.distance_bias(0, torch.arange(5000))
    assert table.dtype == torch.float32 and (table[:, 0] == 0).all() and (table <= 0).all()  # a penalty, 0 at 0
    assert (table >= -d * n_head / (8 * torch.arange(1, n_head + 1))[:, None]).all()  # bounded: it flattens out
    torch.testing.assert_close(table[:, 1:] * torch.arange(1, n_head + 1)[:, None],  # heads differ by 1/h only
                               table[:1, 1:].expand(n_head, -1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pe.distance_bias(1, torch.arange(50)), table[:, :50])  # one bias for all layers


def test_sandwich_has_no_parameters_and_needs_an_even_head_dimension():
    pe = tiny_model("sandwich").pe
    assert list(pe.parameters()) == [] and pe.param_groups() == [] and not pe.learned
    assert pe.bias(0, torch.arange(12)).toeplitz_table() is not None  # a distance table: the fast routes apply
    with pytest.raises(LenxError, match="even head dimension"):
        tiny_model("sandwich", d_model=36, n_head=4)


# ----------------------------------------------------------------------------------------------------- dpb


DPB_OPTIONS = [{}, {"log_distance": True}, {"norm": True}, {"depth": 3, "width": 5, "norm": True,
                                                              "log_distance": True}, {"depth": 1}]


@pytest.mark.parametrize("opts", DPB_OPTIONS)
def test_dpb_bias_is_the_mlp_applied_to_each_pair(opts):
    pe = tiny_model("dpb", pe_options=opts).pe
    T = 14
    for pos in (torch.arange(T), torch.arange(T) * 2 + 5):
        b = pe.bias(1, pos).block(0, T)[0]
        for i in range(T):
            for j in range(i + 1):
                want = dpb_by_hand(pe.mlps[0], int(pos[i] - pos[j]), opts.get("log_distance", False))
                torch.testing.assert_close(b[:, i, j].double(), want, atol=1e-5, rtol=1e-5)


def test_dpb_layout_defaults_and_init_are_x_transformers():
    from lenx.model import LenxForCausalLM

    torch.manual_seed(0)
    pe = LenxForCausalLM(tiny_config("dpb", d_model=32, n_head=4)).pe  # initialised as the model does, no noise
    assert pe.options == {"depth": 2, "width": None, "log_distance": False, "norm": False, "shared": True}
    assert len(pe.mlps) == 1  # one MLP for every layer (x-transformers: one rel_pos passed to each block)
    mlp = pe.mlps[0]
    assert [type(m).__name__ for m in mlp] == ["Linear", "SiLU", "Linear", "SiLU", "Linear"]
    assert [tuple(m.weight.shape) for m in mlp[::2]] == [(8, 1), (8, 8), (4, 8)]  # width d_model // 4
    for lin in mlp[::2]:  # PyTorch's default init: U(+-1/sqrt(fan_in)) for weight and bias
        bound = lin.in_features**-0.5
        assert lin.weight.abs().max() <= bound and lin.bias.abs().max() <= bound
        assert lin.weight.abs().max() > 0.5 * bound  # not the model's N(0, 0.02)
    normed = tiny_model("dpb", pe_options={"norm": True, "depth": 3}).pe.mlps[0]
    norms = [m for m in normed if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 3 and norms[0].bias is None and all(n.bias is not None for n in norms[1:])
    per_layer = tiny_model("dpb", n_layer=3, pe_options={"shared": False}).pe
    assert len(per_layer.mlps) == 3
    assert not torch.allclose(per_layer.distance_bias(0, torch.arange(9)), per_layer.distance_bias(2, torch.arange(9)))
    shared = tiny_model("dpb", n_layer=3).pe
    torch.testing.assert_close(shared.distance_bias(0, torch.arange(9)), shared.distance_bias(2, torch.arange(9)))


@pytest.mark.parametrize("opts, message", [({"depth": 0}, "depth must be an integer >= 1"),
                                           ({"width": 0}, "width must be null"), ({"norm": 1}, "norm must be true"),
                                           ({"log_distance": "yes"}, "log_distance must be"), ({"dim": 4}, "unknown")])
def test_dpb_options_are_checked(opts, message):
    with pytest.raises(LenxError, match=message):
        tiny_model("dpb", pe_options=opts)


def test_dpb_mlp_runs_once_per_layer_on_the_causal_distances_only():
    model = tiny_model("dpb", n_layer=3)
    seen = []
    model.pe.mlps[0][0].register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    with torch.no_grad():
        model(torch.randint(0, 60, (2, 200)))
    assert seen == [(200, 1)] * 3  # D = T distances, never T x T pairs


def test_dpb_parameters_train_at_the_models_rate_without_decay_and_get_gradients():
    model = tiny_model("dpb")
    groups = model.pe.param_groups()
    assert groups == [{"params": list(model.pe.parameters()), "weight_decay": False, "lr_mult": 1.0}]
    x = torch.randint(0, 60, (2, 20))
    logits = model(x).logits
    F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.pe.parameters())


# ------------------------------------------------------------------------------ attention on every route


def _bias_of(name, pe, pos, layer):
    """(i, j) -> (H,) float64: the closed form of the scheme's bias (the graph kept to dpb's parameters)."""
    if name == "sandwich":
        H, d = pe.n_head, pe.head_dim
        return lambda i, j: torch.tensor([sandwich_closed_form(int(pos[i]), int(pos[j]), h, d, H)
                                          for h in range(1, H + 1)], dtype=torch.float64)
    cache = {}

    def dpb(i, j):
        m = int(pos[i] - pos[j])
        if m not in cache:
            cache[m] = dpb_by_hand(pe.mlp(layer), m, pe.options["log_distance"])
        return cache[m]

    return dpb


SCHEMES = [("sandwich", {}), ("dpb", {}), ("dpb", {"log_distance": True, "norm": True})]


@pytest.mark.parametrize("T", [TRAIN_LEN, 16 * TRAIN_LEN])  # 1x and 16x the training length
@pytest.mark.parametrize("backend, block", [(b, 512) for b in BACKENDS] + [("blocked", 7), ("sdpa", 24)])
@pytest.mark.parametrize("name, opts", SCHEMES)
def test_attention_equals_the_explicit_softmax_on_every_route(name, opts, T, backend, block):
    pe = tiny_model(name, train_len=TRAIN_LEN, pe_options=opts).pe
    q, k, v = _inputs(T)
    pos = torch.arange(T)
    with torch.no_grad():
        ref = causal_attention(q, k, v, pe.bias(1, pos), "materialized")
        if T == TRAIN_LEN:
            torch.testing.assert_close(ref.double(), slow_attention(q, k, v, _bias_of(name, pe, pos, 1)),
                                       atol=1e-5, rtol=1e-5)
        with recording() as routes:
            got = causal_attention(q, k, v, pe.bias(1, pos), backend, block)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
    if backend in ("sdpa", "blocked") or (backend == "flex" and not torch.cuda.is_available()):
        assert routes == {"blocked"}  # inference on the CPU: the blocked Toeplitz route (a distance table)


@pytest.mark.parametrize("T", [TRAIN_LEN, 16 * TRAIN_LEN])
@pytest.mark.parametrize("backend, block", [("sdpa", 32), ("blocked", 32), ("blocked", 5), ("flex", 32)])
@pytest.mark.parametrize("name, opts", SCHEMES)
def test_gradients_equal_the_reference_on_every_route(name, opts, T, backend, block):
    grads = {}
    for route in ("materialized", backend, *(["slow"] if T == TRAIN_LEN and backend == "sdpa" else [])):
        pe = tiny_model(name, train_len=TRAIN_LEN, pe_options=opts).pe
        q, k, v = _inputs(T, seed=1, grad=True)
        pos = torch.arange(T)
        with recording() as routes:
            if route == "slow":
                out = slow_attention(q, k, v, _bias_of(name, pe, pos, 0))
            else:
                out = causal_attention(q, k, v, pe.bias(0, pos), route, block)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads[route] = [t.grad for t in (q, k, v)] + [p.grad for p in pe.parameters()]
        if route == "sdpa":
            assert routes == {"stored"}  # CPU fp32 training: the stored-probabilities route with the distance row
    assert len(grads[backend]) == {"sandwich": 3, "dpb": 12 if opts else 9}[name]  # q, k, v and the MLP's parameters
    for route in grads:
        for got, want in zip(grads[route], grads["materialized"]):
            assert got is not None
            torch.testing.assert_close(got.float(), want, atol=1e-5 * T**0.5, rtol=1e-4)
