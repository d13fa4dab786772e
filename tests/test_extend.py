"""Attention-level context extensions (`lenx.extend`): each method against its formula written out here from its
reference code (the relative position of every pair and which keys a query sees), on lenx's own schemes; inside
its window every method is the model itself; the settings, the refusals and `lenx eval`'s rows."""

import math

import pandas as pd
import pytest
import torch

from lenx.cli import main
from lenx.extend import Extension, attend, fusable
from lenx.model import LenxConfig, LenxForCausalLM
from lenx.positional import get_scheme
from lenx.positional.rope_scaling import METHODS, applies, resolve

from .test_hf import gpt2_dir, hf_tokenizer, llama_dir, make_run, one_line_error  # noqa: F401 (fixtures)

L = 16  # the training length of these tests
# the route a RoPE model's rows record past the window in `lenx eval` (CPU, no gradient): the flash kernel where
# the method's regions are causal or full blocks, explicit scores where it gathers keys
ROUTE = {"self-extend": "extend-fused", "rerope": "extend-fused", "leaky-rerope": "extend-fused",
         "dca": "extend-fused", "sinks": "extend", "lambda": "extend"}


def formula(text: str, T: int, factor: float | None = None):
    """(relative position, visible) of every pair (i, j), j <= i, as the references define them (float64, bool)."""
    p = resolve(text, factor, L)
    i = torch.arange(T, dtype=torch.float64)[:, None].expand(T, T)
    j = torch.arange(T, dtype=torch.float64)[None, :].expand(T, T)
    d = i - j
    causal = j <= i
    name = text.split(":")[0]
    if name == "self-extend":  # LongLM: neighbour iff i - j < W, else i//G - j//G + W - W//G
        W, G = p["window"], p["group"]
        rel = torch.where(d < W, d, torch.floor(i / G) - torch.floor(j / G) + W - W // G)
        return rel, causal
    if name == "rerope":  # bojone/rerope: query at w, key unrotated past the window
        return torch.where(d < p["window"], d, torch.full_like(d, p["window"])), causal
    if name == "leaky-rerope":  # query at (i + w(k-1))/k, key at j/k, on frequencies theta / k... as positions
        w, k = p["window"], p["leak"]
        return torch.where(d < w, d, w + (d - w) / k), causal
    if name == "dca":  # ChunkLlama: k at j % cl; q at i % cl, min(i % cl + cl, cs), min(2cl - 1, cs)
        cs = p["chunk"]
        cl = cs - p["local"]
        ci, cj = torch.floor(i / cl), torch.floor(j / cl)
        succ = torch.clamp(i % cl + cl, max=cs) - j % cl
        inter = min(2 * cl - 1, cs) - j % cl
        return torch.where(ci == cj, i % cl - j % cl, torch.where(ci - cj == 1, succ, inter)), causal
    if name == "sinks":  # StreamingLLM, pos_shift: sinks j < S, the R keys before i; query at min(i, S + R)
        S, R = p["sinks"], p["window"]
        rel = torch.where(d <= R, d, torch.clamp(i, max=S + R) - j)
        return rel, causal & ((j < S) | (d <= R))
    if name == "lambda":  # LM-Infinite: local iff i - j < Lw; global j < G beyond it at distance min(cap, T - 1)
        G, Lw, cap = p["global"], p["window"], p["cap"]
        return torch.where(d < Lw, d, torch.full_like(d, min(cap, T - 1))), causal & ((d < Lw) | (j < G))
    raise AssertionError(text)


def rope_score(q, k, rel, base=10000.0, decay=None):
    """RoPE scores at relative positions rel (T, T): sum over pairs of Re(q_k conj(k_k) e^(i rel theta_k)),
    lenx's interleaved pairs; xPos's decay zeta_k^(rel/g) on top."""
    hd = q.shape[-1]
    theta = base ** -(torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    qc = torch.view_as_complex(q.double().unflatten(-1, (-1, 2)).contiguous())
    kc = torch.view_as_complex(k.double().unflatten(-1, (-1, 2)).contiguous())
    phase = torch.exp(1j * rel[..., None] * theta)  # (T, T, hd/2)
    if decay is not None:
        phase = phase * decay[None, None, :] ** (rel[..., None] / 512.0)
    prod = qc[..., :, None, :] * kc[..., None, :, :].conj()  # (B, H, T, T, hd/2)
    return (prod * phase).real.sum(-1) / math.sqrt(hd)


def attend_direct(scores, visible, v):
    scores = scores.masked_fill(~visible, float("-inf"))
    return scores.softmax(-1) @ v.double()


def scheme(pe: str, **opts):
    cfg = LenxConfig(pe=pe, train_len=L, d_model=32, n_head=2, n_layer=1, d_ff=64, pe_options=opts)
    torch.manual_seed(0)
    return get_scheme(pe)(cfg)


SETTINGS = ["self-extend", "self-extend:window=4:group=3", "rerope", "rerope:window=5:logn=0", "leaky-rerope",
            "leaky-rerope:window=3:leak=4", "dca", "dca:chunk=10:local=3", "sinks", "sinks:sinks=2:window=5",
            "lambda", "lambda:global=3:window=6:cap=9"]


def qkv(T, hd=16, H=2):
    g = torch.Generator().manual_seed(T)
    return [torch.randn(1, H, T, hd, generator=g) for _ in range(3)]


def logn(text, T):
    if not resolve(text, None, L).get("logn"):
        return torch.ones(T, 1, dtype=torch.float64)
    i = torch.arange(T, dtype=torch.float64)
    return ((i + 1).log() / math.log(L)).clamp(min=1)[:, None]


@pytest.mark.parametrize("T", [L, 16 * L])
@pytest.mark.parametrize("text, route", [(t, "explicit") for t in SETTINGS] +
                         [(t, "fused") for t in SETTINGS if ROUTE[t.split(":")[0]] == "extend-fused"])
@pytest.mark.parametrize("pe", ["rope", "xpos"])
def test_rotation_schemes_score_every_pair_at_the_methods_positions(pe, text, T, route):
    """RoPE and xPos under each method: the output is softmax over the scores at the formula's relative
    positions (RoPE's: a function of i - j alone), over the keys the formula lets each query see; 1x and 16x;
    both routes (the fused one where it serves the method: without a gradient, on the CPU)."""
    factor = T / L
    s = scheme(pe)
    s.set_eval_scaling(text, factor)
    q, k, v = qkv(T)
    block = 7  # blocks that do not divide the length
    with torch.no_grad() if route == "fused" else torch.enable_grad():
        assert fusable(s.extension, q, None) == (ROUTE[text.split(":")[0]] == "extend-fused")
        got = attend(s.extension, q, k, v, None, 0, s.positions(torch.arange(T)), s, block, route=route)
    rel, visible = formula(text, T, factor)
    zeta = (torch.arange(0, 16, 2, dtype=torch.float64) + 0.4 * 16) / (1.4 * 16) if pe == "xpos" else None
    want = attend_direct(rope_score(q * logn(text, T).float(), k, rel, decay=zeta), visible, v)
    assert torch.allclose(got.double(), want, atol=1e-5), float((got.double() - want).abs().max())


@pytest.mark.parametrize("T", [L, 16 * L])
@pytest.mark.parametrize("text", SETTINGS)
@pytest.mark.parametrize("pe", ["alibi", "t5"])
def test_distance_schemes_read_their_bias_at_the_methods_distances(pe, text, T):
    """ALiBi and T5 under each method: q.k / sqrt(d) plus the scheme's own bias at the formula's distance (leaky
    ReRoPE's fractional distances linearly between table entries)."""
    factor = T / L
    s = scheme(pe)
    s.set_eval_scaling(text, factor)
    q, k, v = qkv(T)
    got = attend(s.extension, q, k, v, None, 0, s.positions(torch.arange(T)), s, 7)
    rel, visible = formula(text, T, factor)
    table = s.bias(0, torch.arange(T)).table.double()  # (H, T): the bias at distances 0..T-1
    lo = rel.floor().long().clamp(0, T - 1)
    hi = (lo + 1).clamp(max=T - 1)
    bias = table[:, lo] + (rel - lo) * (table[:, hi] - table[:, lo])
    scores = (q.double() * logn(text, T)) @ k.double().transpose(-1, -2) / 4.0 + bias
    want = attend_direct(scores, visible, v)
    assert torch.allclose(got.double(), want, atol=1e-5), float((got.double() - want).abs().max())


@pytest.mark.parametrize("text", ["sinks:sinks=2:window=5", "lambda:global=3:window=6"])
@pytest.mark.parametrize("pe", ["fox", "shaw", "learned", "nope"])
def test_the_masks_apply_to_any_scheme_with_its_own_positions(pe, text):
    """Schemes that cannot move positions take sinks and lambda as masks: the unmodified model's scores (its own
    bias, Shaw's value term included) over the keys the method leaves each query."""
    T = L
    s = scheme(pe)
    s.set_eval_scaling(text, None)
    q, k, v = qkv(T)
    p = s.positions(torch.arange(T))
    x = torch.randn(1, T, 32)
    got = attend(s.extension, q, k, v, x, 0, p, s, 5)
    _, visible = formula(text, T)
    qr, kr = s.rotate(q, k, p, 0)
    bias = s.bias(0, p, x=x, q=qr, k=kr)
    scores = (qr @ kr.transpose(-1, -2)).double() / 4.0
    if bias is not None:
        scores = scores + bias.block(0, T, qr).double()
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    want = probs @ v.double()
    if bias is not None and bias.needs_probs:
        want = want + bias.value(0, T, probs.float()).double()
    assert torch.allclose(got.double(), want, atol=1e-5)
    assert resolve(text, None, L, None).get("shift", 0) == 0 and resolve(text, None, L, None).get("cap") is None


@pytest.mark.parametrize("text", ["self-extend:window=64", "rerope:window=64:logn=0", "leaky-rerope:window=64:logn=0",
                                  "dca:chunk=80:local=8", "sinks:window=64", "lambda:window=64",
                                  "self-extend:group=1:window=4"])
@pytest.mark.parametrize("pe", ["rope", "alibi", "t5"])
def test_inside_its_window_every_method_is_the_model_itself(pe, text):
    """Windows no longer than the method's window: the model's logits, bit for bit (the method does not act).
    ReRoPE's log-length query scale, on in its code, is a change of its own past L: off here."""
    torch.manual_seed(0)
    m = LenxForCausalLM(LenxConfig(pe=pe, train_len=L, d_model=32, n_head=2, n_layer=2, d_ff=64)).eval()
    x = torch.randint(0, 256, (2, 60))
    with torch.no_grad():
        base = m(x).logits
        m.pe.set_eval_scaling(text, 60 / L)
        assert not m.pe.extension.active(60)
        assert torch.equal(m(x).logits, base)


@pytest.mark.parametrize("pe", ["rope", "alibi"])
def test_the_extension_route_itself_equals_the_model_where_nothing_moves(pe, monkeypatch):
    """The explicit route, forced on where no pair moves (self-extend with groups of 1): the model's logits to
    float precision, so the route adds nothing of its own."""
    torch.manual_seed(0)
    m = LenxForCausalLM(LenxConfig(pe=pe, train_len=L, d_model=32, n_head=2, n_layer=2, d_ff=64,
                                   attn_block_size=16)).eval()
    x = torch.randint(0, 256, (2, 70))
    with torch.no_grad():
        base = m(x).logits
        m.pe.set_eval_scaling("self-extend:group=1:window=4", 1.0)
        monkeypatch.setattr(Extension, "active", lambda self, T: True)
        assert torch.allclose(m(x).logits, base, atol=1e-5)


def test_causal_under_every_method():
    """Logits at t do not change when tokens after t change."""
    torch.manual_seed(0)
    m = LenxForCausalLM(LenxConfig(pe="rope", train_len=L, d_model=32, n_head=2, n_layer=2, d_ff=64,
                                   attn_block_size=8)).eval()
    x = torch.randint(0, 256, (1, 80))
    y = x.clone()
    y[0, 50:] = torch.randint(0, 256, (30,))
    with torch.no_grad():
        for text in SETTINGS:
            m.pe.set_eval_scaling(text, 5.0)
            assert torch.allclose(m(x).logits[0, :50], m(y).logits[0, :50], atol=1e-6), text


def test_memory_stays_linear_the_masks_gather_only_their_keys():
    """sinks and lambda: each block of queries scores only the keys it sees (time and memory linear in length)."""
    e = Extension("sinks:sinks=4:window=20", None, L, "rotation")
    idx = e.keys(100, 110, "cpu")
    assert idx.tolist() == [0, 1, 2, 3, *range(80, 110)]
    assert Extension("lambda:global=2:window=8", None, L, "rotation").keys(50, 60, "cpu").tolist() == \
        [0, 1, *range(43, 60)]


def test_defaults_are_relative_to_the_training_length():
    assert resolve("self-extend", 16.0, 128) == {"window": 32, "group": 21, "logn": 0}
    # the smallest group keeping every distance below L: (L - W) * G + W >= 16 L
    assert (128 - 32) * 21 + 32 >= 16 * 128 > (128 - 32) * 20 + 32
    assert resolve("self-extend", 1.0, 128)["group"] == 1
    assert resolve("rerope", None, 128) == {"window": 16, "logn": 1}
    assert resolve("leaky-rerope", None, 128) == {"window": 16, "leak": 16.0, "logn": 1}
    assert resolve("dca", None, 128) == {"chunk": 96, "local": 16, "logn": 0}
    assert resolve("sinks", None, 128) == {"sinks": 4, "window": 123, "shift": 1, "logn": 0}
    assert resolve("lambda", None, 128) == {"global": 10, "window": 128, "cap": 128, "logn": 0}
    assert resolve("lambda:cap=50", None, 128)["cap"] == 50


def test_which_schemes_take_which_methods():
    for name in ("self-extend", "rerope", "leaky-rerope", "dca"):
        assert {pe for pe in ("rope", "xpos", "alibi", "t5", "dpb", "learned", "fox", "nope")
                if applies(name, get_scheme(pe))} == {"rope", "xpos", "alibi", "t5", "dpb"}
    for name in ("sinks", "lambda"):
        assert all(applies(name, get_scheme(pe)) for pe in ("rope", "learned", "fox", "cope", "shaw", "nope"))
    assert all(METHODS[m].kind == "attention" for m in ("self-extend", "rerope", "leaky-rerope", "dca", "sinks",
                                                       "lambda"))


def test_eval_runs_every_method_in_one_command_with_its_columns(tmp_path, text_dataset):
    """One `lenx eval` sweeps the methods; each row has its values, 1x rows equal the model's, and a scheme that
    cannot take a method gets none rather than an error when several are asked for."""
    runs = tmp_path / "runs"
    rope, learned = make_run(runs, "rope"), make_run(runs, "learned")
    out = tmp_path / "res"
    methods = "none,self-extend,rerope,leaky-rerope,dca,sinks,lambda,rerope:logn=0:window=4"
    assert main(["eval", str(rope), "--dataset", str(text_dataset), "--lengths", "16,64", "--tokens", "128",
                 "--rope-scaling", methods, "--out", str(out)]) == 0
    df = pd.read_parquet(out / "results.parquet")
    assert set(df.rope_scaling) == set(methods.split(","))
    nll = df.set_index(["rope_scaling", "eval_len"])["nll"]
    for text in methods.split(",")[1:]:
        if text in ("self-extend", "sinks", "lambda"):  # windows of L by default: 1x is the model, exactly
            assert nll[(text, 16)] == nll[("none", 16)], text
        else:  # ReRoPE's window L/8 and DCA's chunks of 5L/8 act inside L, as their references' defaults do
            assert nll[(text, 16)] != nll[("none", 16)], text
        assert nll[(text, 64)] != pytest.approx(nll[("none", 64)], abs=1e-7), text
    se = df[(df.rope_scaling == "self-extend") & (df.eval_len == 64)].iloc[0]
    train_len = int(se.train_len)
    assert se.rope_window == train_len // 4 and se.rope_group == resolve("self-extend", 64 / train_len,
                                                                         train_len)["group"]
    assert df[df.rope_scaling == "rerope:logn=0:window=4"].rope_window.eq(4).all()
    past = df[(df.eval_len == 64) & (df.rope_scaling != "none")]
    assert (past.attn_route == past.rope_scaling.str.split(":").str[0].map(ROUTE)).all()
    assert main(["report", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "rope+self-extend" in md and "rope+rerope:logn=0:window=4" in md
    out2 = tmp_path / "res2"
    assert main(["eval", str(learned), "--dataset", str(text_dataset), "--lengths", "16", "--tokens", "64",
                 "--rope-scaling", "sinks,dca", "--out", str(out2)]) == 0
    assert set(pd.read_parquet(out2 / "results.parquet").rope_scaling) == {"sinks"}


def test_a_method_the_scheme_cannot_take_is_one_line_and_writes_nothing(tmp_path, text_dataset, capsys):
    run = make_run(tmp_path / "runs", "learned")
    capsys.readouterr()
    code = main(["eval", str(run), "--dataset", str(text_dataset), "--rope-scaling", "self-extend",
                 "--out", str(tmp_path / "res")])
    one_line_error(capsys, code, "--rope-scaling self-extend applies to rope, alibi, xpos", "not to 'learned'")
    assert not (tmp_path / "res").exists()



# ---------------------------------------------------------------------------------------------------
# Hugging Face models, through transformers' attention registry (lenx.hf_extend)


def tiny_llama(max_len=L):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_len)
    return LlamaForCausalLM(cfg).eval()


def interleaved(x):
    """transformers' rotate_half layout (pair k: dims k and k + d/2) as lenx's (dims 2k, 2k+1)."""
    h = x.shape[-1] // 2
    return torch.stack((x[..., :h], x[..., h:]), -1).flatten(-2)


@pytest.mark.parametrize("T", [L, 16 * L])
@pytest.mark.parametrize("text", SETTINGS)
def test_a_transformers_llama_scores_every_pair_at_the_methods_positions(text, T):
    """The registered attention function on a tiny random Llama's attention module: given the queries and keys
    transformers rotated at their true positions (grouped keys included), the output is the formula's."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from lenx.hf_extend import attach, attention

    model = tiny_llama()
    attach(model, Extension(text, T / L, L, "rotation"), block_size=7)
    module = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(1, n, T, 8, generator=g) for n in (4, 2, 2))
    cos, sin = model.model.rotary_emb(q, torch.arange(T)[None])
    qr, kr = apply_rotary_pos_emb(q, k, cos, sin)
    got, _ = attention(module, qr, kr, v, None, scaling=module.scaling)
    rel, visible = formula(text, T, T / L)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    scores = rope_score(interleaved(q * logn(text, T).float()), interleaved(kk), rel)
    want = attend_direct(scores, visible, vv).transpose(1, 2)
    assert torch.allclose(got.double(), want, atol=1e-5), float((got.double() - want).abs().max())


def test_a_transformers_llama_inside_the_window_is_itself_and_the_route_adds_nothing(monkeypatch):
    from lenx.hf_extend import attach

    x = torch.randint(0, 100, (1, 70))
    with torch.no_grad():
        base = tiny_llama()(x).logits
        model = tiny_llama()
        attach(model, Extension("sinks:window=100", None, L, "rotation"))
        assert torch.equal(model(x).logits, base)  # not active: transformers' own sdpa, bit for bit
        model = tiny_llama()
        attach(model, Extension("self-extend:group=1:window=4", 1.0, L, "rotation"))
        monkeypatch.setattr(Extension, "active", lambda self, T: True)
        assert torch.allclose(model(x).logits, base, atol=1e-5)


def test_eval_of_an_hf_model_takes_the_methods_and_refuses_other_architectures(llama_dir, gpt2_dir, hf_tokenizer,
                                                                              text_dataset, tmp_path, capsys):
    out = tmp_path / "res"
    methods = "none,self-extend,sinks,lambda,rerope,dca"
    assert main(["eval", "--model", str(llama_dir), "--dataset", str(text_dataset), "--lengths", "32,128",
                 "--tokens", "128", "--rope-scaling", methods, "--out", str(out)]) == 0
    df = pd.read_parquet(out / "results.parquet")
    nll = df.set_index(["rope_scaling", "eval_len"])["nll"]
    for text in methods.split(",")[1:]:
        if text in ("self-extend", "sinks", "lambda"):
            assert nll[(text, 32)] == nll[("none", 32)], text
        assert nll[(text, 128)] != pytest.approx(nll[("none", 128)], abs=1e-7), text
    past = df[(df.eval_len == 128) & (df.rope_scaling != "none")]
    assert (past.attn_route == past.rope_scaling.map(ROUTE)).all()
    assert df[df.rope_scaling == "sinks"].rope_window.eq(32 - 4 - 1).all()
    capsys.readouterr()
    code = main(["eval", "--model", str(gpt2_dir), "--dataset", str(text_dataset), "--rope-scaling", "sinks",
                 "--out", str(tmp_path / "r2")])
    one_line_error(capsys, code, "sinks applies to RoPE models", "without RoPE")
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    neox = tmp_path / "neox"
    GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=len(hf_tokenizer), hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=4, intermediate_size=64,
                                     max_position_embeddings=32)).save_pretrained(neox)
    hf_tokenizer.save_pretrained(neox)
    code = main(["eval", "--model", str(neox), "--dataset", str(text_dataset), "--rope-scaling", "dca",
                 "--out", str(tmp_path / "r2")])
    one_line_error(capsys, code, "--rope-scaling dca reaches an HF model through transformers' attention registry",
                   "llama, mistral, qwen2, qwen3", "gpt_neox")
    assert not (tmp_path / "r2").exists()


@pytest.mark.parametrize("which", ["lenx", "hf"])
def test_perplexity_and_passkey_rows_come_from_the_same_cells(which, tmp_path, text_dataset, llama_dir):
    """Per method, both tables: perplexity rows and probe rows with the method and its values (an HF model's
    passkey answer read off the teacher-forced pass, lenx_extend having no KV cache)."""
    subject = [str(make_run(tmp_path / "runs", "rope"))] if which == "lenx" else ["--model", str(llama_dir)]
    out = tmp_path / "res"
    assert main(["eval", *subject, "--dataset", str(text_dataset), "--lengths", "64", "--tokens", "64",
                 "--probe", "passkey", "--passkey-format", "short", "--probe-trials", "2", "--probe-depths", "0,1",
                 "--rope-scaling", "none,sinks,self-extend", "--out", str(out)]) == 0
    ppl, probes = pd.read_parquet(out / "results.parquet"), pd.read_parquet(out / "probes.parquet")
    assert set(ppl.rope_scaling) == set(probes.rope_scaling) == {"none", "sinks", "self-extend"}
    sinks = probes[probes.rope_scaling == "sinks"]
    assert len(sinks) == 2 and sinks.rope_window.notna().all() and (sinks.trials == 2).all()
    assert probes.accuracy.notna().all() and (probes.note == "").all()
    extended = probes[probes.rope_scaling != "none"]
    assert (extended.attn_route == extended.rope_scaling.map(ROUTE)).all() and (extended.match == "tokens").all()
    if which == "hf":  # the untouched model decodes with its KV cache, as the paper's protocol does
        assert (probes[probes.rope_scaling == "none"].match == "text").all()


@pytest.mark.parametrize("pe", ["rope", "xpos"])
@pytest.mark.parametrize("text", ["yarn:logn=1", "pi:logn=1", "dynamic-ntk:logn=1"])
def test_log_length_query_scale_composes_with_a_frequency_method(pe, text):
    """A frequency method with logn=1: the layer's attention is the method's rotation of queries scaled by
    max(1, ln(i + 1) / ln L), on the model's own route; at 1x (no position past L) exactly the method alone."""
    torch.manual_seed(0)
    m = LenxForCausalLM(LenxConfig(pe=pe, train_len=L, d_model=32, n_head=2, n_layer=1, d_ff=64)).eval()
    attn, T = m.blocks[0].attn, 5 * L
    x = torch.randn(2, T, 32)
    with torch.no_grad():
        m.pe.set_eval_scaling(text, T / L)
        assert m.pe.extension.only_scales and m.pe.extension.active(T)
        p = m.pe.positions(torch.arange(T))
        got = attn(x, 0, p, m.pe)
        q, k, v = attn.qkv(x).view(2, T, 3, 2, 16).permute(2, 0, 3, 1, 4)
        m.pe.set_eval_scaling(text.split(":")[0], T / L)  # the same frequencies, no scale
        p = m.pe.positions(torch.arange(T))
        qr, kr = m.pe.rotate(q.double() * logn(text, T), k.double(), p, 0)
        scores = (qr @ kr.transpose(-1, -2)) / 4.0
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        want = attn.proj((scores.softmax(-1) @ v.double()).float().transpose(1, 2).reshape(2, T, 32))
        assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())
        short = torch.randn(1, L, 32)
        m.pe.set_eval_scaling(text, 1.0)
        with_scale = attn(short, 0, m.pe.positions(torch.arange(L)), m.pe)
        m.pe.set_eval_scaling(text.split(":")[0], 1.0)
        assert torch.equal(with_scale, attn(short, 0, m.pe.positions(torch.arange(L)), m.pe))


def test_a_transformers_llama_takes_a_frequency_method_with_logn():
    """yarn:logn=1 on an HF Llama: transformers' yarn frequencies (rope_parameters) and lenx_extend's query scale:
    the registered function equals sdpa on the scaled queries."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from lenx.hf_extend import attach, attention

    T = 4 * L
    model = tiny_llama()
    attach(model, Extension("yarn:logn=1", 4.0, L, "rotation"))
    module = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, n, T, 8, generator=g) for n in (4, 2, 2))
    got, _ = attention(module, q, k, v, None, scaling=module.scaling)
    want, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](module, q * logn("rerope", T).float(), k, v, None,
                                              scaling=module.scaling, is_causal=True)
    assert torch.allclose(got, want, atol=1e-6)
