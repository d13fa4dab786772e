"""Attention-level context extensions, applied at evaluation: Self-Extend, ReRoPE, leaky ReRoPE, Dual Chunk
Attention, attention sinks (StreamingLLM) and LM-Infinite's Lambda mask, each with optional log-length query
scaling. Their names, parameters and defaults are in `lenx.positional.rope_scaling.METHODS`.

Every method is the same three things, read from its reference code (cited in METHODS and `lenx schemes rope`):

- which keys a query sees (sinks and lambda drop the middle: each query block gathers only the keys it sees, so
  their time and memory are linear in the length);
- regions of (query i, key j) pairs, each placing the query and the key at positions of its own (Self-Extend's
  grouped positions, ReRoPE's capped distance, DCA's chunk offsets); the first region keeps the true positions;
- optionally, queries scaled by max(1, ln(i + 1) / ln L) before their rotation (ReRoPE's code).

A scheme takes moved positions in one of two ways (`PositionalScheme.moved_positions`): "rotation" (RoPE, xPos)
rotates queries and keys at the moved positions (`rotate_at`), "distance" (ALiBi, T5, KERPLE, Sandwich, DPB) reads
its per-distance table at the moved distance (linearly between entries where leaky ReRoPE's distance is a
fraction). Any other scheme takes only the masks, with its own positions and bias.

Two routes compute the same attention. The explicit one (any scheme, any device, differentiable): scores per block
of query rows against the keys the block sees (block x keys per region, never L x L), one joint softmax over all
regions, as the references' eager paths do. The fused one (`fusable`: rotation schemes on the CPU, no
gradient; Self-Extend, ReRoPE, leaky ReRoPE, DCA): each region whose pairs share one causal or full block
structure goes to the CPU flash kernel with its queries and keys rotated at the region's positions, the near band
of exact positions is a band of explicit scores, and the parts are joined by their log-sum-exps (as
`attention_cpu.clipped` joins Shaw's). Where no pair at a window's length leaves the true positions and no key
is hidden (`Extension.active`), the model runs unchanged: inside its window every method is the unmodified
model, bit for bit.
"""


from __future__ import annotations

import torch
from torch import Tensor

from . import attention_cpu as cpu
from .attention import _took
from .positional.base import Positions, TableBias
from .positional.extension import Extension, Region

__all__ = ["Extension", "Region", "attend", "fusable"]


def attend(ext: Extension, q: Tensor, k: Tensor, v: Tensor, x: Tensor, layer: int, p: Positions, pe,
           block_size: int, route: str | None = None) -> Tensor:
    """The layer's attention under the method. q, k: the layer's unrotated queries and keys (B, H, T, hd), v its
    values; returns (B, H, T, hv) as `causal_attention` does. route: "explicit" or "fused" (None: fused where
    `fusable`)."""
    T = q.shape[-2]
    q = ext.scaled(q)
    q_rot, k_rot = pe.rotate(q, k, p, layer)
    bias = pe.bias(layer, p, x=x, q=q_rot, k=k_rot)
    n = int(p.pos.max()) + 1 if p.pos.numel() else 1  # the window's length, as the scheme's own tables see it
    fuse = fusable(ext, q, bias) if route is None else route == "fused"
    if fuse:
        out = (_chunks if ext.name == "dca" else _band_far)(ext, q, k, v, q_rot, k_rot, pe, layer, n, block_size)
        return _took("extend-fused", out)
    table = bias.table if isinstance(bias, TableBias) and ext.moves == "distance" else None
    regions = ext.regions(T)
    # rotation schemes: each moved region's keys rotated once, at its key positions (its queries per block)
    every = torch.arange(T, device=q.device)
    keys = {r: pe.rotate_at(k, every if region.k_at is None else region.k_at(every), layer, n, query=False)
            for r, region in enumerate(regions) if r and ext.moves == "rotation"
            and not (region.q_at is None and region.k_at is None)}
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    hd = q_rot.shape[-1]
    block_size = min(block_size, (bias.max_block_rows if bias is not None else None) or block_size)
    for q0 in range(0, T, block_size):
        q1 = min(q0 + block_size, T)
        idx = ext.keys(q0, q1, q.device)
        cols = torch.arange(q1, device=q.device) if idx is None else idx
        i, j = torch.arange(q0, q1, device=q.device)[:, None], cols[None, :]
        true = (q_rot[:, :, q0:q1] @ _take(k_rot, idx, q1).transpose(-1, -2)).float() * hd ** -0.5
        if table is not None:
            true = true + table[:, (i - j).clamp(min=0)]
        elif bias is not None:
            b = bias.block(q0, q1, q_rot[:, :, q0:q1]).float()
            true = true + (b if idx is None else b[..., idx])
        scores = torch.full_like(true, float("-inf"))
        for r, region in enumerate(regions):
            where = region.where(i, j) & (j <= i)
            if r == 0 or (region.q_at is None and region.k_at is None):
                s = true
            else:
                s = _moved(ext, q, k, keys.get(r), q0, q1, cols, idx, region, table, pe, layer, n, hd)
            scores = torch.where(where, s, scores)
        probs = scores.softmax(-1)
        ob = probs.to(v.dtype) @ _take(v, idx, q1)
        if bias is not None and bias.needs_probs:
            full = probs if idx is None else probs.new_zeros(*probs.shape[:-1], q1).index_copy_(-1, idx, probs)
            ob = ob + bias.value(q0, q1, full)
        out[:, :, q0:q1] = ob.to(out.dtype)
    return _took("extend", out)


def fusable(ext: Extension, q: Tensor, bias) -> bool:
    """Whether the fused route serves this call: a method whose regions are causal or full blocks, a scheme that
    rotates (no bias of its own), the CPU flash kernel, and no gradient (the kernel's log-sum-exp has none)."""
    return (ext.name in ("self-extend", "rerope", "leaky-rerope", "dca") and ext.moves == "rotation"
            and bias is None and cpu._CPU_FLASH is not None and q.device.type == "cpu"
            and q.dtype in (torch.float32, torch.bfloat16) and not (torch.is_grad_enabled() and q.requires_grad))


def _band_far(ext: Extension, q, k, v, q_rot, k_rot, pe, layer: int, n: int, block: int) -> Tensor:
    """Self-Extend, ReRoPE, leaky ReRoPE: the pairs i - j >= w are causal attention shifted by w, queries and
    keys rotated at the far region's positions (one flash call); the w nearest keys of each query keep their
    true positions (a band of explicit scores); joined by their log-sum-exps."""
    B, H, T, hd = q.shape
    w, far = ext.p["window"], ext.regions(T)[1]
    i = torch.arange(T, device=q.device)
    if T > w:
        qf = pe.rotate_at(q[:, :, w:], far.q_at(i[w:]), layer, n, query=True)
        kf = pe.rotate_at(k[:, :, :T - w], far.k_at(i[:T - w]), layer, n, query=False)
        o_far, lse_far = cpu._CPU_FLASH(qf, kf, v[:, :, :T - w], is_causal=True, scale=hd ** -0.5)
    out = q.new_empty(B, H, T, v.shape[-1])
    for q0 in range(0, T, block):
        q1 = min(q0 + block, T)
        a = max(0, q0 - w + 1)
        s = (q_rot[:, :, q0:q1] @ k_rot[:, :, a:q1].transpose(-1, -2)).float() * hd ** -0.5
        d = torch.arange(q0, q1, device=q.device)[:, None] - torch.arange(a, q1, device=q.device)[None, :]
        s = s.masked_fill((d < 0) | (d >= w), float("-inf"))
        lse = s.logsumexp(-1)
        o = (s - lse[..., None]).exp().to(v.dtype) @ v[:, :, a:q1]
        f0, f1 = max(q0, w), q1  # rows with far keys
        if f1 > f0:
            both = torch.logaddexp(lse[..., f0 - q0:], lse_far[..., f0 - w:f1 - w])
            near = (lse[..., f0 - q0:] - both).exp()[..., None]
            o[:, :, f0 - q0:] = (o[:, :, f0 - q0:].float() * near
                                 + o_far[:, :, f0 - w:f1 - w].float() * (1 - near)).to(o.dtype)
        out[:, :, q0:q1] = o
    return out


def _chunks(ext: Extension, q, k, v, q_rot, k_rot, pe, layer: int, n: int, block: int) -> Tensor:
    """DCA, per chunk of cl = chunk - local queries: intra-chunk keys at their true positions (causal), the
    previous chunk's keys with the successive-chunk query positions and the earlier chunks' keys with the
    inter-chunk ones (full blocks), three flash calls joined by their log-sum-exps."""
    B, H, T, hd = q.shape
    _, succ, inter = ext.regions(T)
    cl, scale = ext.p["chunk"] - ext.p["local"], hd ** -0.5
    i = torch.arange(T, device=q.device)
    k_mod = pe.rotate_at(k, succ.k_at(i), layer, n, query=False)
    q_succ = pe.rotate_at(q, succ.q_at(i), layer, n, query=True)
    q_inter = pe.rotate_at(q, inter.q_at(i), layer, n, query=True)
    out = q.new_empty(B, H, T, v.shape[-1])
    for c0 in range(0, T, cl):
        c1 = min(c0 + cl, T)
        parts = [cpu._CPU_FLASH(q_rot[:, :, c0:c1], k_rot[:, :, c0:c1], v[:, :, c0:c1], is_causal=True,
                                scale=scale)]
        if c0 >= cl:
            parts.append(cpu._CPU_FLASH(q_succ[:, :, c0:c1], k_mod[:, :, c0 - cl:c0], v[:, :, c0 - cl:c0],
                                        is_causal=False, scale=scale))
        if c0 >= 2 * cl:
            parts.append(cpu._CPU_FLASH(q_inter[:, :, c0:c1], k_mod[:, :, :c0 - cl], v[:, :, :c0 - cl],
                                        is_causal=False, scale=scale))
        lse = torch.stack([lp for _, lp in parts]).logsumexp(0)
        out[:, :, c0:c1] = sum(o.float() * (lp - lse).exp()[..., None] for o, lp in parts).to(out.dtype)
    return out


def _moved(ext: Extension, q, k, k_moved, q0, q1, cols, idx, region: Region, table, pe, layer: int, n: int,
           hd: int) -> Tensor:
    """Scores of a region whose pairs sit at moved positions; k_moved: rotation schemes' keys already rotated at
    the region's key positions (all T)."""
    qi = torch.arange(q0, q1, device=q.device)
    qp = qi if region.q_at is None else region.q_at(qi)
    if ext.moves == "rotation":
        qr = pe.rotate_at(q[:, :, q0:q1], qp, layer, n, query=True)
        return (qr @ _take(k_moved, idx, q1).transpose(-1, -2)).float() * hd ** -0.5
    kp = cols if region.k_at is None else region.k_at(cols)
    s = (q[:, :, q0:q1] @ _take(k, idx, q1).transpose(-1, -2)).float() * hd ** -0.5
    return s + _read(table, qp[:, None] - kp[None, :])


def _take(t: Tensor, idx: Tensor | None, q1: int) -> Tensor:
    """Rows 0..q1-1 of keys or values (B, H, T, d), or those of idx."""
    return t[:, :, :q1] if idx is None else t.index_select(-2, idx)


def _read(table: Tensor, dist: Tensor) -> Tensor:
    """table[:, dist] (H, n, m) for distances >= 0, clamped to the table; linear between entries for fractions."""
    top = table.shape[-1] - 1
    if not dist.is_floating_point():
        return table[:, dist.clamp(0, top)]
    dist = dist.clamp(0, top)
    lo = dist.floor().long()
    frac = (dist - lo).float()
    hi = (lo + 1).clamp(max=top)
    a = table[:, lo]
    return a + frac * (table[:, hi] - a)
