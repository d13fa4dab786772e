"""Long-context evaluation: attention routes against the reference, protocols, loss by position, resuming."""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import lenx.evaluate as ev
import lenx.perplexity as ppl
import lenx.windows as win
from lenx import attention_cpu as attention
from lenx.attention import BACKENDS, causal_attention
from lenx.cli import main
from lenx.data import document_tokens, get_tokenizer, token_stream
from lenx.errors import LenxError
from lenx.positional import Bias, LinearBias, TableBias
from lenx.positional.alibi import alibi_slopes

from .conftest import tiny_model

CPU_BACKENDS = [b for b in BACKENDS if b != "materialized"]


# ---------------------------------------------------------------------------------------------------
# attention routes


class DenseBias(Bias):
    """A bias with no structure at all (random per (h, i, j)): only the generic per-block route applies."""

    def __init__(self, full):
        self.full = full  # (H, T, T)

    def block(self, q0, q1, q=None):
        return self.full[:, q0:q1, :q1].unsqueeze(0)


class OutputBias(DenseBias):
    """A Shaw-like bias that also adds sum_j p_ij * u_j to the output (needs the probabilities)."""

    needs_probs = True

    def __init__(self, full, u):
        super().__init__(full)
        self.u = u  # (H, T, hd)

    def value(self, q0, q1, probs):
        return probs @ self.u[:, :q1]


def _biases(H, T, hd):
    g = torch.Generator().manual_seed(3)
    pos = torch.arange(T)
    return {
        "linear (alibi)": LinearBias(torch.tensor(alibi_slopes(H)), pos),
        "linear, offset positions": LinearBias(torch.tensor(alibi_slopes(H)), pos + 1000),
        "table": TableBias(torch.randn(H, T, generator=g), pos),
        "table, gapped positions": TableBias(torch.randn(H, 3 * T, generator=g), pos * 3),
        "dense": DenseBias(torch.randn(H, T, T, generator=g)),
        "needs probs": OutputBias(torch.randn(H, T, T, generator=g), torch.randn(H, T, hd, generator=g)),
    }


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", list(_biases(2, 4, 2)))
@pytest.mark.parametrize("T", [1, 29, 45])
def test_every_route_matches_reference(backend, kind, T):
    """Every backend, for every kind of bias (so every route: separable, strided table, gather, dense,
    output term), equals the materialised reference at lengths that are not block multiples."""
    B, H, hd = 2, 4, 8
    torch.manual_seed(T)
    q, k, v = (torch.randn(B, H, T, hd) for _ in range(3))
    bias = _biases(H, T, hd)[kind]
    ref = causal_attention(q, k, v, bias, "materialized")
    for block in (8, 16, 64):
        out = causal_attention(q, k, v, bias, backend, block_size=block)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_routes_are_chosen_by_capability():
    H, T = 4, 10
    pos = torch.arange(T)
    q = torch.randn(1, H, T, 8)
    alibi = tiny_model("alibi").pe.bias(0, pos)
    assert alibi.key_term() is not None and alibi.toeplitz_table() is not None
    assert attention.separable_supported(q, q, alibi)
    assert not attention.separable_supported(q.bfloat16(), q.bfloat16(), alibi)  # fp32 only
    trained = q.clone().requires_grad_()
    assert not attention.separable_supported(trained, trained, alibi)  # inference only: training takes the stored route
    gapped = TableBias(torch.randn(H, 3 * T), pos * 3)
    assert gapped.toeplitz_table() is None  # not contiguous: gathered per block instead
    assert DenseBias(torch.zeros(H, T, T)).key_term() is None


def _rows_reference(q, k, v, table, rows):
    """fp64 attention for query rows `rows` with b[h, i, j] = table[h, i - j]."""
    q, k, v, table = q.double(), k.double(), v.double(), table.double()
    i = rows[:, None]
    j = torch.arange(k.shape[-2])[None, :]
    scores = q[:, :, rows] @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores + table[:, (i - j).clamp(min=0)] .unsqueeze(0)
    scores = scores.masked_fill(j > i, float("-inf"))
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("backend", ["sdpa", "blocked"])
def test_long_sequence_precision(backend):
    """At 4,096 tokens, the separable route (whose extra key column grows with position) and the strided-table
    route stay within 1e-5 of an fp64 reference on the last rows, where ALiBi's m*j is largest."""
    B, H, T, hd = 1, 4, 4096, 16
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, T, hd) for _ in range(3))
    bias = LinearBias(torch.tensor([2.0, 0.5, 2.0**-4, 2.0**-8]), torch.arange(T))
    out = causal_attention(q, k, v, bias, backend, block_size=1024)
    rows = torch.cat([torch.arange(1024, 1100), torch.arange(T - 200, T)])
    ref = _rows_reference(q, k, v, bias.table, rows)
    torch.testing.assert_close(out[:, :, rows].double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("pe", ["nope", "alibi", "rope"])
def test_flex_matches_reference_on_cuda(pe):
    torch.manual_seed(2)
    x = torch.randint(0, 60, (2, 300), device="cuda")
    fast = tiny_model(pe, train_len=512, attn_backend="flex").cuda()
    ref = tiny_model(pe, train_len=512, attn_backend="materialized").cuda()
    ref.load_state_dict(fast.state_dict())
    bias = fast.pe.bias(0, torch.arange(300, device="cuda"))
    if bias is not None:
        assert attention.flex_supported(torch.zeros(1, device="cuda"), bias)
    with torch.no_grad():
        torch.testing.assert_close(fast(x).logits, ref(x).logits, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------
# protocols


@pytest.fixture
def stream():
    return np.random.default_rng(0).integers(0, 256, 400).astype(np.uint16)


def _model():
    return tiny_model("alibi", vocab_size=257, eod_token_id=256, train_len=16)


def _cell(model, data, L, protocol, stride=None, n_tokens=96, width=4):
    return ppl.eval_cell(model, data, L, protocol, stride=win.resolve_stride(protocol, L, stride), n_tokens=n_tokens,
                        width=width, batch_tokens=64, device="cpu")


def _data(stream, docs=()):
    return {"stream": stream, "documents": tuple(docs), "tokenizer": get_tokenizer("byte")}


def test_sliding_with_stride_equal_to_window_is_nonoverlap(stream):
    model = _model()
    data = _data(stream)
    a, ab = _cell(model, data, 16, "nonoverlap")
    b, bb = _cell(model, data, 16, "sliding", stride=16)
    assert a["tokens"] == b["tokens"] == 96 and a["windows"] == b["windows"] == 6
    assert b["nll"] == pytest.approx(a["nll"], rel=1e-12) and b["bytes"] == a["bytes"]
    assert ab == bb


def test_nonoverlap_scores_the_same_tokens_at_a_length_that_does_not_divide_the_budget(stream):
    """--max-len 200 on a 32-token run: budget 2200 = 11 x 200, but 2200 / 32 = 68.75 windows; 32, 64 and 128 scored
    2176 tokens (68 windows), not the 2200 of 200. Now the last window ends at target 2200 and scores the rest."""
    model = _model()
    data = _data(np.random.default_rng(0).integers(0, 256, 2300).astype(np.uint16))
    for L in (32, 64, 128, 200):
        row, buckets = _cell(model, data, L, "nonoverlap", n_tokens=2200, width=16)
        assert row["tokens"] == sum(b["tokens"] for b in buckets) == 2200, L
    row, _ = _cell(model, data, 32, "nonoverlap", n_tokens=2200)
    assert row == _cell(model, data, 32, "sliding", stride=32, n_tokens=2200)[0]  # stride = length: the same cell


def test_sliding_stride_one_scores_each_token_with_its_full_window(stream):
    """Stride 1: target t is predicted from the (up to) L tokens before it, computed here one by one."""
    model = _model()
    L, n = 16, 40
    row, _ = _cell(model, _data(stream), L, "sliding", stride=1, n_tokens=n)
    assert row["tokens"] == n and row["windows"] == n - L + 1
    direct = 0.0
    with torch.no_grad():
        for t in range(1, n + 1):
            ctx = torch.from_numpy(stream[max(0, t - L) : t].astype(np.int64))[None]
            logp = F.log_softmax(model(ctx).logits[0, -1].double(), -1)
            direct -= logp[int(stream[t])].item()
    assert row["nll"] == pytest.approx(direct / n, rel=1e-6)
    # and it differs from non-overlapping windows (tokens there see shorter contexts)
    assert row["nll"] != pytest.approx(_cell(model, _data(stream), L, "nonoverlap", n_tokens=48)[0]["nll"], rel=1e-6)


def test_sliding_windows_score_every_target_once():
    stream = np.arange(200)
    for L, S, n in [(16, 5, 100), (16, 16, 96), (10, 3, 10), (8, 7, 50)]:
        w = win.sliding_windows(stream, L, S, n)
        targets = [int(t) for row, f in zip(w.tokens, w.first) for t in row[1:][int(f):]]
        assert targets == list(range(1, n + 1)), (L, S, n)
        assert (w.tokens[1:, 0] - w.tokens[:-1, 0] <= S).all()


def test_truncate_cuts_qualifying_documents():
    docs = [np.arange(10), np.arange(100, 140), np.arange(200, 217), np.arange(300, 330)]
    w = win.truncated_windows(docs, 16, max_documents=10)
    assert w.documents == 3 and w.note == ""
    assert w.tokens[:, 0].tolist() == [100, 200, 300] and w.tokens.shape == (3, 17)
    w = win.truncated_windows(docs, 16, max_documents=2)
    assert w.documents == 2 and "3 test documents qualify" in w.note
    w = win.truncated_windows(docs, 64, max_documents=10)
    assert w.documents == 0 and "no test document" in w.note


def test_truncate_row_scores_documents(stream):
    model = _model()
    docs = [stream[:50], stream[50:60], stream[60:200]]
    row, buckets = _cell(model, _data(stream, docs), 16, "truncate", n_tokens=96)
    assert row["documents"] == 2 and row["tokens"] == 32 and row["stride"] is None
    row, buckets = _cell(model, _data(stream, docs), 64, "truncate", n_tokens=96)
    assert row["documents"] == 1 and row["tokens"] == 64 and [b["bucket_start"] for b in buckets] == list(range(0, 64, 4))
    row, buckets = _cell(model, _data(stream, docs), 256, "truncate")
    assert row["tokens"] == 0 and row["nll"] is None and "no test document" in row["note"] and buckets == []


# An independent reference for the three protocols: plain Python over a token list, with a fake model whose loss
# at window position p for target token t is a known function of (p, t) (its logits depend on the position alone).


def _f(p: int, v: int) -> float:
    return ((7 * p + 3 * v) % 11) / 5 + (v == 256) * 0.25


def _ref_loss(p: int, t: int, V: int = 257) -> float:
    z = [_f(p, v) for v in range(V)]
    m = max(z)
    return m + math.log(sum(math.exp(x - m) for x in z)) - z[t]


class _PositionModel(torch.nn.Module):
    """logits[b, p, v] = _f(p, v): the loss of target t at window position p is _ref_loss(p, t), whatever came before."""

    def forward(self, x):
        b, L = x.shape
        p, v = torch.arange(L)[:, None], torch.arange(257)[None, :]
        logits = ((7 * p + 3 * v) % 11).double() / 5 + (v == 256).double() * 0.25
        return type("Out", (), {"logits": logits.float().expand(b, L, 257)})()


def _ref_cell(stream, docs, L, protocol, stride, n, width):
    """(tokens, total nll, bytes, windows, {bucket_start: [tokens, nll sum]}) as the protocols define them."""
    scored = []  # (window position, target token)
    windows = 0
    if protocol in ("nonoverlap", "sliding"):
        S = L if protocol == "nonoverlap" else stride
        done = 0  # targets 1..done of the stream are scored
        while done < n:
            end = L if done == 0 else min(done + S, n)  # index of the window's last target
            start = end - L  # window inputs stream[start : end], targets stream[start + 1 : end + 1]
            windows += 1
            for t in range(done + 1, end + 1):  # only targets not scored yet
                scored.append((t - start - 1, int(stream[t])))
            done = end
    else:  # truncate
        for d in [d for d in docs if len(d) >= L + 1][: max(1, math.ceil(n / L))]:
            windows += 1
            scored += [(p, int(d[p + 1])) for p in range(L)]
    buckets = {}
    for p, t in scored:
        b = buckets.setdefault(p // width * width, [0, 0.0])
        b[0] += 1
        b[1] += _ref_loss(p, t)
    nbytes = sum(1 for _, t in scored if t != 256)
    return len(scored), sum(_ref_loss(p, t) for p, t in scored), nbytes, windows, buckets


@pytest.mark.parametrize("protocol,L,stride", [
    ("nonoverlap", 8, None), ("nonoverlap", 12, None), ("nonoverlap", 48, None), ("sliding", 12, 5),
    ("sliding", 16, 1), ("sliding", 16, 16), ("sliding", 48, 7), ("truncate", 8, None), ("truncate", 16, None),
])
def test_protocols_match_an_independent_reference(protocol, L, stride):
    """Every protocol scores exactly the targets it claims, each at its own window position, once: tokens, nll,
    bytes (end-of-document 0), bpb, windows and every position bucket equal the plain-Python reference."""
    rng = np.random.default_rng(1)
    # documents of k text tokens and their end-of-document token (16 + 1: truncate's 16 counts the EOD)
    docs = [np.append(rng.integers(0, 256, k), 256).astype(np.uint16) for k in (5, 30, 9, 16, 60, 20, 3, 17, 40)]
    stream = np.concatenate(docs)
    n, width = 96, 4
    row, buckets = ppl.eval_cell(_PositionModel(), _data(stream, docs), L, protocol,
                                stride=win.resolve_stride(protocol, L, stride), n_tokens=n, width=width,
                                batch_tokens=40, device="cpu")
    tokens, nll, nbytes, windows, ref_buckets = _ref_cell(stream, docs, L, protocol, stride, n, width)
    if protocol != "truncate":
        assert tokens == n
    assert (row["tokens"], row["bytes"], row["windows"]) == (tokens, nbytes, windows)
    assert row["nll"] == pytest.approx(nll / tokens, rel=1e-6)
    assert row["bpb"] == pytest.approx(nll / math.log(2) / nbytes, rel=1e-6)
    assert {b["bucket_start"]: b["tokens"] for b in buckets} == {k: v[0] for k, v in ref_buckets.items()}
    for b in buckets:
        assert b["bucket_end"] == min(b["bucket_start"] + width, L)
        assert b["nll"] == pytest.approx(ref_buckets[b["bucket_start"]][1] / b["tokens"], rel=1e-6)


# ---------------------------------------------------------------------------------------------------
# sweeps: tables on disk, loss by position, resuming


def make_run(root: Path, pe: str, dataset: Path) -> Path:
    """A finished run directory (random weights: no training needed to test evaluation)."""
    run = root / f"{pe}-L16-s0"
    tiny_model(pe, vocab_size=257, eod_token_id=256, train_len=16).save_pretrained(run)
    config = {"pe": pe, "seed": 0, "train_len": 16, "dataset": str(dataset), "tokenizer": "byte"}
    (run / "run.json").write_text(json.dumps({"status": "done", "config": config}))
    return run


SWEEP = dict(lengths=[16, 32, 64], tokens=192, protocols=["nonoverlap", "sliding", "truncate"], progress=False,
             position_buckets=4)
VOLATILE = ["seconds", "timestamp"]


@pytest.fixture
def runs(tmp_path, text_dataset):
    return [make_run(tmp_path / "runs", pe, text_dataset) for pe in ("alibi", "rope")]


def _stable(df):
    return df.drop(columns=VOLATILE, errors="ignore").sort_values(["run", "eval_len", "protocol"] +
                                                                   (["bucket_start"] if "bucket_start" in df else []))


def test_by_position_table_adds_up(runs, tmp_path, text_dataset):
    out = tmp_path / "res"
    table = ev.evaluate(runs, out=out, **SWEEP)
    assert len(table) == 2 * 3 * 3
    assert set(table["protocol"]) == {"nonoverlap", "sliding", "truncate"}
    pos = pd.read_parquet(out / "results_by_position.parquet")
    assert len(pd.read_csv(out / "results_by_position.csv")) == len(pos)
    for r in table.itertuples():
        b = pos[(pos.run == r.run) & (pos.eval_len == r.eval_len) & (pos.protocol == r.protocol)]
        assert r.tokens > 0 and b["tokens"].sum() == r.tokens
        assert (b["tokens"] * b["nll"]).sum() / b["tokens"].sum() == pytest.approx(r.nll, rel=1e-9)
        assert (b["bucket_end"] - b["bucket_start"] <= 4).all() and b["bucket_end"].max() <= r.eval_len
    sliding = table[table.protocol == "sliding"].set_index(["run", "eval_len"])
    assert (sliding["stride"] == sliding.index.get_level_values("eval_len") // 2).all()
    trunc = table[table.protocol == "truncate"]
    docs = document_tokens(str(text_dataset), "byte", "test")
    for r in trunc.itertuples():
        qualified = sum(len(d) >= r.eval_len + 1 for d in docs)
        assert r.documents == min(qualified, math.ceil(192 / r.eval_len)) > 0
        assert r.tokens == r.documents * r.eval_len
    assert trunc["stride"].isna().all()
    assert (table[table.protocol == "nonoverlap"]["tokens"] == 192).all()


def test_killed_sweep_resumes_to_the_same_tables(runs, tmp_path, monkeypatch):
    full = ev.evaluate(runs, out=tmp_path / "full", **SWEEP)
    full_pos = pd.read_parquet(tmp_path / "full" / "results_by_position.parquet")

    calls = []
    real = ppl.eval_cell

    def dying(*args, **kw):
        if "train_len" not in kw:  # a 1x reference for a context gain (recomputed once after a resume), no cell
            return real(*args, **kw)
        if len(calls) == 5:
            raise KeyboardInterrupt  # the sweep is killed while computing its sixth cell
        calls.append(args[2:4])
        return real(*args, **kw)

    monkeypatch.setattr(ppl, "eval_cell", dying)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate(runs, out=out, **SWEEP)
    partial = pd.read_parquet(out / "results.parquet")
    assert len(partial) == 5 and len(pd.read_csv(out / "results.csv")) == 5
    assert not list(out.glob(".*.tmp"))  # no half-written file left behind
    first_rows = partial.set_index(["run", "eval_len", "protocol"])["timestamp"]

    calls.clear()
    monkeypatch.setattr(ppl, "eval_cell", lambda *a, **kw: ("train_len" in kw and calls.append(a[2:4]), real(*a, **kw))[1])
    resumed = ev.evaluate(runs, out=out, **SWEEP)
    assert len(calls) == len(full) - 5  # finished cells are not recomputed
    again = resumed.set_index(["run", "eval_len", "protocol"])
    assert (again.loc[first_rows.index, "timestamp"] == first_rows).all()
    pd.testing.assert_frame_equal(_stable(resumed).reset_index(drop=True), _stable(full).reset_index(drop=True),
                                  check_dtype=False)
    pos = pd.read_parquet(out / "results_by_position.parquet")
    pd.testing.assert_frame_equal(_stable(pos).reset_index(drop=True), _stable(full_pos).reset_index(drop=True),
                                  check_dtype=False)

    calls.clear()
    ev.evaluate(runs, out=out, **SWEEP)
    assert calls == []


def test_cell_without_its_buckets_is_recomputed(runs, tmp_path):
    """Killed between writing a cell's buckets and its row, or a results table without buckets: the cell is
    computed again rather than left without its by-position rows."""
    out = tmp_path / "res"
    kw = {**SWEEP, "lengths": [16], "protocols": ["nonoverlap"]}
    table = ev.evaluate(runs[:1], out=out, **kw)
    pos = pd.read_parquet(out / "results_by_position.parquet")
    from lenx.io import write_table

    write_table(pos.iloc[0:0], out / "results_by_position")
    ev.evaluate(runs[:1], out=out, **kw)
    pd.testing.assert_frame_equal(_stable(pd.read_parquet(out / "results_by_position.parquet")), _stable(pos))
    assert len(pd.read_parquet(out / "results.parquet")) == len(table)


def test_rerun_with_other_tokens_or_buckets_is_refused(runs, tmp_path):
    """A finished cell is never recomputed, so a rerun into the same --out whose --tokens or --position-buckets would
    change its numbers is refused rather than silently keeping the old rows; rows from before those columns pass."""
    out = tmp_path / "res"
    kw = {**SWEEP, "lengths": [16, 32], "protocols": ["nonoverlap"]}
    table = ev.evaluate(runs[:1], out=out, **kw)
    assert (table["token_budget"] == 192).all() and (table["bucket_width"] == 4).all()
    for change, needle in (({"tokens": 256}, "token_budget 192, not 256"),
                           ({"position_buckets": 2}, "bucket_width 4, not 8")):
        with pytest.raises(LenxError, match=f"alibi-L16-s0 @16 computed with {needle}.*another --out"):
            ev.evaluate(runs[:1], out=out, **{**kw, **change})
    pd.testing.assert_frame_equal(pd.read_parquet(out / "results.parquet"), table, check_dtype=False)
    from lenx.io import write_table

    for f in out.glob("cells.sqlite*"):  # an older lenx's --out: its tables alone, without those columns
        f.unlink()
    write_table(table.drop(columns=["token_budget", "bucket_width"]), out / "results")
    assert len(ev.evaluate(runs[:1], out=out, **{**kw, "tokens": 256})) == len(table)


def test_cli_protocols_and_report(runs, tmp_path, capsys):
    out = tmp_path / "res"
    code = main(["eval", *map(str, runs), "--lengths", "16,64", "--tokens", "128", "--protocol", "nonoverlap",
                 "--protocol", "sliding,truncate", "--stride", "8", "--position-buckets", "2", "--attn-backend",
                 "blocked", "--out", str(out)])
    assert code == 0
    df = pd.read_csv(out / "results.csv")
    assert len(df) == 2 * 2 * 3
    # the route that ran: ALiBi's bias in blocks; RoPE has no score bias, so the fused kernel ran for it
    assert (df[df.pe == "alibi"]["attn_backend"] == "blocked").all() and (df[df.pe == "alibi"]["attn_route"] == "blocked").all()
    assert (df[df.pe == "rope"]["attn_backend"] == "sdpa").all() and (df[df.pe == "rope"]["attn_route"] == "fused").all()
    assert (df[df.protocol == "sliding"]["stride"] == 8).all()
    pos = pd.read_csv(out / "results_by_position.csv")
    assert set(pos["bucket_end"] - pos["bucket_start"]) == {8}
    assert main(["report", str(out)]) == 0
    assert (out / "loss_by_position.png").stat().st_size > 10_000
    md = (out / "report.md").read_text()
    assert "sliding" in md and "truncate" in md and "loss_by_position.png" in md


def test_unfinished_runs_are_named_and_skipped(runs, tmp_path, capsys):
    root = runs[0].parent
    partial = root / "fire-L16-s0"
    partial.mkdir()
    (partial / "run.json").write_text(json.dumps({"status": "training", "config": {"pe": "fire"}}))
    out = tmp_path / "res"
    assert main(["eval", "--runs-dir", str(root), "--lengths", "16", "--tokens", "32", "--out", str(out)]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "skipping 1 unfinished run(s)" in err and "fire-L16-s0" in err, err
    assert sorted(pd.read_csv(out / "results.csv")["pe"]) == ["alibi", "rope"]
    only = tmp_path / "only"
    (only / "fire-L16-s0").mkdir(parents=True)
    (only / "fire-L16-s0" / "run.json").write_text("{}")
    assert main(["eval", "--runs-dir", str(only), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no trained runs" in err and "unfinished: fire-L16-s0" in err, err


def test_max_len_off_the_doubling_ladder_is_evaluated_too(runs, tmp_path):
    from lenx.eval_config import default_lengths

    assert default_lengths(64, 256) == [64, 128, 256]
    assert default_lengths(64, 100) == [64, 100] and default_lengths(64, 64) == [64]
    out = tmp_path / "res"
    assert main(["eval", str(runs[0]), "--max-len", "40", "--tokens", "80", "--out", str(out)]) == 0
    assert sorted(pd.read_csv(out / "results.csv")["eval_len"]) == [16, 32, 40]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what the CPU records for a CUDA-only backend")
def test_flex_on_the_cpu_is_recorded_as_the_route_that_ran(runs, tmp_path):
    out = tmp_path / "res"
    assert main(["eval", str(runs[0]), "--lengths", "16", "--tokens", "64", "--attn-backend", "flex", "--out", str(out)]) == 0
    assert (pd.read_csv(out / "results.csv")["attn_backend"] == "sdpa").all()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--protocol", "overlapping"], "unknown protocol 'overlapping'"),
        (["--protocol", "sliding", "--stride", "0"], "--stride"),
        (["--protocol", "sliding", "--stride", "100"], "--stride 100"),
        (["--stride", "8"], "--stride applies to the sliding protocol; add --protocol sliding"),  # nonoverlap only
        (["--position-buckets", "0"], "--position-buckets"),
        (["--attn-backend", "fast"], "unknown attention backend 'fast'"),
    ],
)
def test_bad_eval_options_are_one_line(runs, tmp_path, capsys, args, needle):
    code = main(["eval", str(runs[0]), "--lengths", "16,32", "--tokens", "64", "--out", str(tmp_path / "r"), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err


# ---------------------------------------------------------------------------------------------------
# cell kinds: the driver plans, runs, writes and resumes any kind


def test_a_second_cell_kind_runs_through_the_same_driver(runs, tmp_path, text_dataset):
    """A kind of its own (the share of test targets a run predicts greedily) gets its own table, resumes, refuses
    a finished cell computed with another setting, and leaves the perplexity tables alone."""
    from lenx import distributed
    from lenx.cells import CellKind, run_cells
    from lenx.data import DataSpec
    from lenx.store import Table, optional
    from lenx.subject import LenxRun

    def key(r):
        return r["run"], int(r["eval_len"]), optional(r["rope_scaling"], str) or "none"

    scored = []

    class Greedy(CellKind):
        tables = (Table("greedy", ["run", "pe", "eval_len", "rope_scaling", "rope_factor", "windows", "accuracy",
                                   "weights_id", "seconds"], key, ["run", "eval_len"]),)
        settings = {"windows": "--windows"}

        def __init__(self, windows):
            self.windows = windows

        def cells(self, subject):
            return [{"run": subject.name, "eval_len": L, "rope_scaling": "none", "rope_factor": None,
                     "windows": self.windows} for L in (16, 32)]

        def load(self, subject, tok, cell):
            return torch.from_numpy(token_stream(DataSpec(str(text_dataset)), tok, "test").astype(np.int64))

        def score(self, subject, model, data, cell):
            L = cell["eval_len"]
            w = data[: cell["windows"] * (L + 1)].view(cell["windows"], L + 1)
            with torch.no_grad():
                hits = model(w[:, :-1]).logits.argmax(-1) == w[:, 1:]
            scored.append((subject.name, L))
            return {"greedy": [{"accuracy": float(hits.float().mean())}]}

    ctx = distributed.init()
    subjects = [LenxRun(r) for r in runs]
    table = run_cells(Greedy(2), subjects, tmp_path, ctx=ctx, device="cpu", show=False)
    assert sorted(scored) == [(s.name, L) for s in subjects for L in (16, 32)]
    assert len(table) == 4 and table["accuracy"].between(0, 1).all() and set(table["pe"]) == {"alibi", "rope"}
    assert (table["weights_id"] == table["run"].map({s.name: s.weights_id for s in subjects})).all()
    assert sorted(p.name for p in tmp_path.glob("*.*") if not p.name.startswith("cells.sqlite")) == ["greedy.csv",
                                                                                                  "greedy.parquet"]

    scored.clear()
    again = run_cells(Greedy(2), subjects, tmp_path, ctx=ctx, device="cpu", show=False)
    assert scored == [] and len(again) == 4  # finished cells are not scored again
    with pytest.raises(LenxError, match=r"computed with windows 2, not 3 \(--windows\)"):
        run_cells(Greedy(3), subjects, tmp_path, ctx=ctx, device="cpu", show=False)


def test_context_gain_pairs_each_target_with_its_own_1x_score():
    """Nonoverlap at E = 4 L: a target at window position p >= L has NLL _ref_loss(p, t) there and
    _ref_loss(p mod L, t) in its 1x window; the row's gain is the mean of their differences over those targets,
    each bucket's over its own (0 below L), as computed here by hand."""
    stream = np.random.default_rng(3).integers(0, 256, 200).astype(np.uint16)
    L, E, n, width = 8, 32, 96, 8
    data = _data(stream)
    one, _ = ppl.eval_cell(_PositionModel(), data, L, "nonoverlap", stride=L, n_tokens=n, width=width,
                           batch_tokens=64, device="cpu", targets=True)
    row, buckets = ppl.eval_cell(_PositionModel(), data, E, "nonoverlap", stride=E, n_tokens=n, width=width,
                                 batch_tokens=64, device="cpu", train_len=L, reference=lambda: one["target_nll"])
    diffs = {}  # E-window position -> differences
    for t in range(1, n + 1):
        p = (t - 1) % E
        diffs.setdefault(p, []).append(_ref_loss(p % L, int(stream[t])) - _ref_loss(p, int(stream[t])))
    past = [d for p, ds in diffs.items() if p >= L for d in ds]
    assert row["context_gain_tokens"] == len(past) == n - 3 * L
    assert row["context_gain"] == pytest.approx(sum(past) / len(past), rel=1e-6)
    for b in buckets:
        ds = [d for p in range(b["bucket_start"], b["bucket_end"]) for d in diffs[p]]
        assert b["context_gain"] == pytest.approx(sum(ds) / len(ds), abs=1e-6)
    assert [b["context_gain"] for b in buckets if b["bucket_end"] <= L] == [0.0]
    at_1x, _ = ppl.eval_cell(_PositionModel(), data, L, "nonoverlap", stride=L, n_tokens=n, width=width,
                             batch_tokens=64, device="cpu", train_len=L, reference=lambda: one["target_nll"])
    assert "context_gain" not in at_1x  # nothing past 1x at 1x


def test_the_perplexity_kind_records_context_gain_past_1x_and_reuses_the_1x_cell(tmp_path, text_dataset, monkeypatch):
    """Through the cell driver: nonoverlap rows past 1x get a context gain, 1x and sliding rows none; the 1x
    targets are scored once (by the 1x cell) for a run without a RoPE extension."""
    from lenx import perplexity as P
    from lenx.evaluate import evaluate

    calls = []
    real = P.eval_cell
    monkeypatch.setattr(P, "eval_cell", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    run = make_run(tmp_path / "runs", "alibi", text_dataset)
    evaluate([run], out=tmp_path / "out", lengths=[16, 32, 64], protocols=["nonoverlap", "sliding"], tokens=128,
             progress=False)
    df = P.load_results(tmp_path / "out").set_index(["protocol", "eval_len"])
    assert df.loc[("nonoverlap", 16), "context_gain"] != df.loc[("nonoverlap", 16), "context_gain"]  # NaN
    assert np.isfinite(df.loc[("nonoverlap", 32), "context_gain"]) and np.isfinite(df.loc[("nonoverlap", 64), "context_gain"])
    assert df.loc[("nonoverlap", 64), "context_gain_tokens"] == 128 - 128 // 64 * 16
    assert df.xs("sliding")["context_gain"].isna().all()
    assert sorted(calls) == [16, 16, 32, 32, 64, 64]  # one call per cell: the 1x targets came from the 1x cell
    calls.clear()
    evaluate([run], out=tmp_path / "again", lengths=[32], protocols=["nonoverlap"], tokens=128, progress=False)
    assert calls == [32, 16]  # no 1x cell in this evaluation: its targets scored once more, at 16
    by_pos = P.load_by_position(tmp_path / "out")
    assert by_pos[(by_pos["protocol"] == "nonoverlap") & (by_pos["eval_len"] == 64)]["context_gain"].notna().all()
