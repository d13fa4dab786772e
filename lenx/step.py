"""One micro-batch's forward and backward: whole, or on the CPU in row shards that run side by side.

On a CPU, one step of a small model spends about a fifth of its time outside the matrix multiplies
(elementwise ops, the Python between ops), where intra-op threads wait for each other at every op. Split by rows
into one shard per thread, each shard running single-threaded on a core of its own, the same step ran about 5%
faster on this project's 2-core machines (lenx-rope, 4 layers, d 256, batch 8 x 512, paired rounds against the
whole batch at once). The trick is the trainer's, not the model's: transformers' Llama gained about 6% from it
(scripts/bench_train.py --shard-peers).

It stays exact: each shard's loss is the mean over its rows, weighted by its share of the rows, so the shards'
losses add up to the whole batch's mean and their gradients to its gradient. The gradients are summed in shard
order (not accumulated by autograd as each shard finishes), so a step gives the same numbers every time.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import Tensor

_POOL: tuple[int, ThreadPoolExecutor] | None = None  # (its size, the pool)


def cpu_shards(device: str, rows: int, distributed: bool = False, compiled: bool = False) -> int:
    """How many row shards of a micro-batch of `rows` rows run side by side: one per intra-op thread, at most one
    per row, on the CPU only. 1 (the whole batch at once) on CUDA, under torchrun (DDP's gradient hooks expect one
    backward per step) and for a compiled model."""
    if not device.startswith("cpu") or distributed or compiled:
        return 1
    return max(1, min(torch.get_num_threads(), rows))


def lm_loss(net, batch: Tensor, autocast) -> Tensor:
    """Next-token cross-entropy of a batch of token rows (inputs batch[:, :-1], targets batch[:, 1:])."""
    with autocast():
        logits = net(batch[:, :-1]).logits
    return F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())


def forward_backward(net, batch: Tensor, autocast, weight: float = 1.0, shards: int = 1) -> Tensor:
    """Backpropagate weight x the batch's mean loss into the parameters' .grad (adding to what is there) and
    return the loss, detached. `autocast`: a function returning the precision's context (thread-local, so each
    shard enters its own). `shards` > 1: rows split into that many shards, one thread each (see module doc)."""
    if shards <= 1:
        loss = lm_loss(net, batch, autocast)
        (loss * weight).backward()
        return loss.detach()
    parts = batch.tensor_split(min(shards, len(batch)))
    params = [p for p in net.parameters() if p.requires_grad]
    threads = max(1, torch.get_num_threads() // len(parts))

    def run(part: Tensor):
        torch.set_num_threads(threads)  # this worker thread's own setting; the caller's is left as it was
        share = len(part) / len(batch)
        loss = lm_loss(net, part, autocast)
        grads = torch.autograd.grad(loss * (weight * share), params, allow_unused=True)
        return loss.detach() * share, grads

    results = list(_pool(len(parts)).map(run, parts))
    for i, p in enumerate(params):
        grads = [g[i] for _, g in results if g[i] is not None]
        if not grads:
            continue
        total = grads[0]
        for g in grads[1:]:
            total.add_(g)
        if p.grad is None:
            p.grad = total
        else:
            p.grad.add_(total)
    return sum(loss for loss, _ in results)


def _pool(n: int) -> ThreadPoolExecutor:
    """A pool of at least n threads, kept from step to step (and grown when a step needs more)."""
    global _POOL
    if _POOL is None or _POOL[0] < n:
        if _POOL is not None:
            _POOL[1].shutdown(wait=False)
        _POOL = (n, ThreadPoolExecutor(n, thread_name_prefix="lenx-shard"))
    return _POOL[1]
