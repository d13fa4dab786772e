"""One training step: TrainStep takes an optimizer step over a process's rows of the global batch, one
micro-batch at a time; `forward_backward` runs a micro-batch's forward and backward, whole, or on the CPU in row
shards that run side by side.

Row shards: on a CPU, a small model's step spends a share of its time outside the matrix multiplies (elementwise
ops, the Python between ops), where intra-op threads wait for each other at every op. Split by rows into one shard
per thread, each shard running single-threaded on a core of its own, the step runs faster
(scripts/bench_train.py measures it; --shard-peers for transformers' Llama, which gains from it too).

It stays exact: each shard's loss is the mean over its rows, weighted by its share of the rows, so the shards'
losses add up to the whole batch's mean and their gradients to its gradient. The gradients are summed in shard
order (not accumulated by autograd as each shard finishes), so a step gives the same numbers every time.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor

from . import distributed
from .config import TrainConfig
from .errors import LenxError, is_oom
from .optim import set_lr

_POOL: tuple[tuple[int, int], ThreadPoolExecutor] | None = None  # ((threads, intra-op threads each), the pool)


def cpu_shards(device: str, rows: int, distributed: bool = False, compiled: bool = False) -> int:
    """How many row shards of a micro-batch of `rows` rows run side by side: one per intra-op thread, at most one
    per row, on the CPU only. 1 (the whole batch at once) on CUDA, under torchrun (DDP's gradient hooks expect one
    backward per step) and for a compiled model."""
    if not device.startswith("cpu") or distributed or compiled:
        return 1
    return max(1, min(torch.get_num_threads(), rows))


def lm_loss(net, batch: Tensor, autocast, positions: Tensor | None = None) -> Tensor:
    """Next-token cross-entropy of a batch of token rows (inputs batch[:, :-1], targets batch[:, 1:]); `positions`:
    the (T,) positions of every row's tokens (random positions), None for 0..T-1."""
    with autocast():
        if positions is None:
            logits = net(batch[:, :-1]).logits
        else:
            logits = net(batch[:, :-1], position_ids=positions.to(batch.device)[None]).logits
    return F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())


def shard_threads(shards: int) -> int:
    """Intra-op threads of each of `shards` row shards: this thread's count split among them."""
    return max(1, torch.get_num_threads() // max(1, shards))


def forward_backward(net, batch: Tensor, autocast, weight: float = 1.0, shards: int = 1,
                     threads: int | None = None, positions: Tensor | None = None) -> Tensor:
    """Backpropagate weight x the batch's mean loss into the parameters' .grad (adding to what is there) and
    return the loss, detached. `autocast`: a function returning the precision's context (thread-local, so each
    shard enters its own). `shards` > 1: rows split into that many shards, run side by side on a pool of as many
    threads, each with `threads` intra-op threads (default `shard_threads(shards)`; see module doc). `positions`:
    the step's (T,) positions (random positions), the same for every row and so for every shard; None: 0..T-1."""
    if shards <= 1:
        loss = lm_loss(net, batch, autocast, positions)
        (loss * weight).backward()
        return loss.detach()
    parts = batch.tensor_split(min(shards, len(batch)))
    params = [p for p in net.parameters() if p.requires_grad]

    def run(part: Tensor):
        share = len(part) / len(batch)
        loss = lm_loss(net, part, autocast, positions)
        grads = torch.autograd.grad(loss * (weight * share), params, allow_unused=True)
        return loss.detach() * share, grads

    results = list(_pool(len(parts), threads or shard_threads(shards)).map(run, parts))
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


def _pool(n: int, threads: int) -> ThreadPoolExecutor:
    """A pool of n threads with `threads` intra-op threads each, kept from step to step (a new one when a step
    needs another). Each thread sets its count once, all of them before the pool's first task, and never again:
    torch.set_num_threads is not a thread's own business (it also sets the process's default, which a thread
    adopts at its first parallel op, and clears oneDNN's primitive cache), so a count set while another shard
    computes could change what that shard computes with."""
    global _POOL
    if _POOL is None or _POOL[0] != (n, threads):
        if _POOL is not None:
            _POOL[1].shutdown(wait=True)
        pool = ThreadPoolExecutor(n, thread_name_prefix="lenx-shard")
        ready = threading.Barrier(n)

        def init(_):
            torch.set_num_threads(threads)
            torch.get_num_threads()  # the thread's lazy OpenMP set-up, now, from the count just set
            ready.wait()  # every thread of the pool holds one of these tasks: each is set before any shard runs

        list(pool.map(init, range(n)))
        main = torch.get_num_threads()
        torch.set_num_threads(main)  # the process default back to this thread's count, as before the pool
        _POOL = ((n, threads), pool)
    return _POOL[1]


class TrainStep:
    """One optimizer step: the step's lr, this process's rows in micro-batches of --batch-size (their gradients
    averaged, and synchronised across processes at the last one only), the loss averaged across processes and
    checked, gradient clipping, the update. `net`: the model as it runs forward (DDP-wrapped, compiled);
    `cast`: a function returning the precision's autocast context."""

    def __init__(self, net, model, opt: torch.optim.Optimizer, cfg: TrainConfig, ctx: distributed.Context,
                 device: str, cast, shards: int = 1, threads: int | None = None):
        self.net, self.model, self.opt, self.cfg, self.ctx = net, model, opt, cfg, ctx
        self.device, self.cast, self.shards = device, cast, shards
        self.threads = threads or shard_threads(shards)

    def __call__(self, step: int, rows: Tensor, positions: Tensor | None = None) -> tuple[Tensor, float]:
        """Step `step` on `rows` (this process's share of the step's batch) at `positions` (the step's random
        positions, `train.get_positions`; None: 0..T-1); returns (the loss, the lr)."""
        lr = set_lr(self.opt, self.cfg, step)
        self.opt.zero_grad(set_to_none=True)
        loss = distributed.mean(self.ctx, self._backward(step, rows, positions))
        if not torch.isfinite(loss):
            raise LenxError(f"loss became {loss.item()} at step {step}; lower --lr (now {self.cfg.lr:g}) and rerun "
                            "(the last good checkpoint is kept)")
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        return loss, lr

    def _backward(self, step: int, rows: Tensor, positions: Tensor | None = None) -> Tensor:
        """The micro-batches' gradients into .grad; returns their mean loss. Out of memory is the user's to fix."""
        cfg, loss = self.cfg, torch.zeros((), device=self.device)
        try:
            for micro, batch in enumerate(rows.to(self.device).split(cfg.batch_size)):
                last = micro == cfg.grad_accum - 1
                with self.net.no_sync() if self.ctx.active and not last else nullcontext():
                    micro_loss = forward_backward(self.net, batch, self.cast, 1 / cfg.grad_accum, self.shards,
                                                  self.threads, positions)
                loss += micro_loss / cfg.grad_accum
        except (RuntimeError, MemoryError) as e:
            if not is_oom(e):
                raise
            raise LenxError(f"out of memory at step {step} on {self.device} ({cfg.batch_size} x {cfg.train_len} "
                            "tokens a micro-batch); lower --batch-size and raise --grad-accum to keep the global batch "
                            "(the last checkpoint is kept)") from None
        return loss
