#!/usr/bin/env python
"""Training speed: lenx with every scheme next to transformers' GPT-2, Llama and Bloom of the same size.

Each contender gets the same random batches; steps (forward + backward + AdamW) are timed round-robin,
one step per contender in turn, so that machine drift hits all alike. Tokens/s is the median over the
timed steps; MFU is against a matrix-multiply peak measured in every round of the same run (the
median), at the same precision.
lenx steps as `lenx train` does: on the CPU, a batch's rows in one shard per core, side by side (lenx/step.py);
the transformers models as transformers runs them, the whole batch at once (--shard-peers: in lenx's shards too;
--cpu-shards 1: lenx without them).
A ratio is paired: each round's two step times, divided, then the median over rounds (the JSON also
gives the quartiles), so that a slow round slows both sides of the ratio it enters.

  python scripts/bench_train.py                       # this issue's CPU size: 4 layers, d 256, 4 heads, 8 x 512
  python scripts/bench_train.py --precision bf16 --json
  python scripts/bench_train.py --schemes rope,alibi --steps 8 --compile
  python scripts/bench_train.py --cpu-shards 1             # lenx's step on the whole batch at once
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lenx.hardware import this_cpu  # noqa: E402
from lenx.model import LenxConfig, LenxForCausalLM  # noqa: E402
from lenx.perf import measure_matmul_peak, train_flops_per_token  # noqa: E402
from lenx.positional import SCHEMES  # noqa: E402
from lenx.step import cpu_shards, forward_backward  # noqa: E402
from lenx.train import autocast, compile_model, precision_dtype  # noqa: E402


def hf_models(a, max_len: int | None = None) -> dict:
    """Randomly initialised peers. Llama's SwiGLU has three FFN matrices, so its intermediate size is 2/3 of
    d_ff (LLaMA's own convention) to match the parameters and FLOPs of a two-matrix FFN of width d_ff.
    GPT-2's position table has a.seq entries; max_len (default a.seq) is Llama's max_position_embeddings
    (declared only: its default rotary embedding has no table). Bloom has no positional limit to set."""
    from transformers import BloomConfig, BloomForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    # No dropout anywhere (lenx has none; GPT-2's config defaults to 0.1 in three places), and no KV cache filled
    # while training or scoring a window (lenx has none; the config's default would make one every forward).
    common = dict(vocab_size=a.vocab, bos_token_id=a.vocab - 1, eos_token_id=a.vocab - 1, use_cache=False)
    return {
        "hf-gpt2 (learned, sdpa)": lambda: GPT2LMHeadModel(GPT2Config(
            n_embd=a.d_model, n_layer=a.layers, n_head=a.heads, n_inner=a.d_ff, n_positions=a.seq, attn_implementation="sdpa",
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)),
        "hf-llama (rope, sdpa)": lambda: LlamaForCausalLM(LlamaConfig(
            hidden_size=a.d_model, num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.heads,
            intermediate_size=2 * a.d_ff // 3, max_position_embeddings=max_len or a.seq, tie_word_embeddings=True,
            attn_implementation="sdpa", **common)),
        "hf-bloom (alibi, eager)": lambda: BloomForCausalLM(BloomConfig(
            hidden_size=a.d_model, n_layer=a.layers, n_head=a.heads, attn_implementation="eager", **common)),
    }


def lenx_model(a, pe: str):
    return lambda: LenxForCausalLM(LenxConfig(vocab_size=a.vocab, n_layer=a.layers, d_model=a.d_model, n_head=a.heads,
                                              d_ff=a.d_ff, train_len=a.seq, pe=pe,
                                              eod_token_id=a.vocab - 1))


def make_step(build, a, device, shards: int = 1):
    """One training step as `lenx train` takes it (forward_backward), for lenx and the peers alike; `shards`: the
    row shards it runs side by side on the CPU (lenx train's cpu_shards; 1 is the whole batch at once)."""
    torch.manual_seed(0)
    model = build().to(device).train()
    fwd = compile_model(model) if a.compile else model  # as `lenx train --compile` does
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # the same optimizer for every contender, as lenx trains
    cast = lambda: autocast(a.precision, device)  # noqa: E731  as `lenx train --precision` does

    def step(batch):
        opt.zero_grad(set_to_none=True)
        loss = forward_backward(fwd, batch, cast, shards=shards)
        opt.step()
        return loss

    n = sum(p.numel() for p in model.parameters())
    return step, n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--d-ff", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=10, help="timed steps per contender (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile every contender")
    p.add_argument("--schemes", default=",".join(SCHEMES), help="comma-separated lenx schemes")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers models")
    p.add_argument("--cpu-shards", type=int, default=None,
                   help="row shards of a step run side by side on the CPU's cores, for lenx [default: as lenx train "
                        "chooses; 1: the whole batch at once]")
    p.add_argument("--shard-peers", action="store_true",
                   help="run the transformers models' steps in the same row shards as lenx's (default: as transformers "
                        "runs them, the whole batch at once)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    a = p.parse_args()
    if a.steps < 2:
        p.error("--steps must be at least 2 (the ratios' quartiles need two rounds)")
    if a.cpu_shards is not None and a.cpu_shards < 1:
        p.error("--cpu-shards must be at least 1 (1: the whole batch at once)")
    device = a.device
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    builders = {f"lenx-{pe}": lenx_model(a, pe) for pe in a.schemes.split(",") if pe}
    if not a.no_hf:
        builders.update(hf_models(a))
    shards = cpu_shards(device, a.batch, compiled=a.compile) if a.cpu_shards is None else a.cpu_shards
    steps, times = {}, {name: [] for name in builders}
    for name, build in builders.items():
        steps[name] = make_step(build, a, device, shards if name.startswith("lenx") or a.shard_peers else 1)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, a.vocab, (a.batch, a.seq + 1), generator=g).to(device) for _ in range(a.warmup + a.steps)]
    peaks = []  # the matmul peak, measured in every round like a contender: one slow moment cannot skew MFU
    for i, batch in enumerate(batches):  # round robin: one step of each contender in turn
        for name, (step, _) in steps.items():
            sync()
            t0 = time.perf_counter()
            step(batch)
            sync()
            if i >= a.warmup:
                times[name].append(time.perf_counter() - t0)
        if i >= a.warmup:
            peaks.append(measure_matmul_peak(device, precision_dtype(a.precision), seconds=0.2,  # not cached: anew
                                             threads=torch.get_num_threads(), workers=shards))
    peak = statistics.median(peaks)
    flops = train_flops_per_token(a.d_model, a.layers, a.d_ff, a.vocab, a.seq)
    tokens = a.batch * a.seq
    rows = []
    for name, ts in times.items():
        tps = tokens / statistics.median(ts)
        rows.append({"model": name, "params": steps[name][1], "tokens_per_s": round(tps, 1),
                     "mfu": round(tps * flops / peak, 4)})
    peers = {"lenx-rope": "hf-llama (rope, sdpa)", "lenx-alibi": "hf-bloom (alibi, eager)",
             "lenx-learned": "hf-gpt2 (learned, sdpa)"}

    def paired(name: str, other: str) -> tuple[float, list[float]]:
        """Median and quartiles over rounds of other's step time / name's (speed of name relative to other)."""
        ratios = [o / t for t, o in zip(times[name], times[other])]
        return round(statistics.median(ratios), 3), [round(q, 3) for q in statistics.quantiles(ratios, n=4)]

    for r in rows:
        peer = peers.get(r["model"]) if peers.get(r["model"]) in times else None
        r["peer"] = peer
        r["vs_peer"], r["vs_peer_quartiles"] = paired(r["model"], peer) if peer else (None, None)
        lenx = r["model"].startswith("lenx") and "lenx-nope" in times
        r["vs_nope"], r["vs_nope_quartiles"] = paired(r["model"], "lenx-nope") if lenx else (None, None)
    meta = {"device": device, "precision": a.precision, "compile": a.compile, "batch": a.batch, "seq": a.seq,
            "layers": a.layers, "d_model": a.d_model, "heads": a.heads, "d_ff": a.d_ff, "vocab": a.vocab,
            "timed_steps": a.steps, "lenx_cpu_shards": shards, "peer_cpu_shards": shards if a.shard_peers else 1,
            "matmul_peak_gflops": round(peak / 1e9, 1), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": this_cpu().to_dict()}
    if a.json:
        print(json.dumps({"meta": meta, "rows": rows}, indent=1))
        return
    from rich.console import Console
    from rich.table import Table

    sharding = f"; {shards} row shards a step ({'lenx and peers' if a.shard_peers else 'lenx'})" if shards > 1 else ""
    t = Table(title=f"training tokens/s, {device} {a.precision}{' compiled' if a.compile else ''}, "
                    f"{a.layers}L d{a.d_model} h{a.heads} ffn{a.d_ff}, batch {a.batch}x{a.seq}; "
                    f"matmul peak {peak / 1e9:.0f} GFLOP/s{sharding}; CPU {this_cpu().describe()}")
    for col in ("model", "params", "tokens/s", "MFU", "vs HF peer [quartiles]", "vs lenx-nope"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        t.add_row(r["model"], f"{r['params'] / 1e6:.2f}M", f"{r['tokens_per_s']:,.0f}", f"{r['mfu']:.0%}",
                  f"{r['vs_peer']:.2f}x [{r['vs_peer_quartiles'][0]:.2f}-{r['vs_peer_quartiles'][2]:.2f}] "
                  f"({r['peer'].split(' ')[0]})" if r["vs_peer"] else "",
                  f"{r['vs_nope']:.2f}x" if r["vs_nope"] else "")
    Console().print(t)


if __name__ == "__main__":
    main()
