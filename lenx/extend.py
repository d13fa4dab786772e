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
regions, as the references' eager paths do. The fused one (`Extension.fusable`: rotation schemes on the CPU, no
gradient; Self-Extend, ReRoPE, leaky ReRoPE, DCA): each region whose pairs share one causal or full block
structure goes to the CPU flash kernel with its queries and keys rotated at the region's positions, the near band
of exact positions is a band of explicit scores, and the parts are joined by their log-sum-exps (as
`attention_cpu.clipped` joins Shaw's). Where no pair at a window's length leaves the true positions and no key
is hidden (`Extension.active`), the model runs unchanged: inside its window every method is the unmodified
model, bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from . import attention_cpu as cpu
from .attention import _took
from .positional.base import Positions, TableBias
from .positional.rope_scaling import is_attention, method_of, resolve

Index = Callable[[Tensor], Tensor]


@dataclass
class Region:
    """Pairs (i, j), j <= i, where `where(i, j)` holds ((n, 1) and (1, m) index tensors); the query sits at
    q_at(i) and the key at k_at(j) (None: their true positions)."""

    where: Callable[[Tensor, Tensor], Tensor]
    q_at: Index | None = None
    k_at: Index | None = None


class Extension:
    """One method at one setting: its values (`resolve`) for a subject of training length L."""

    def __init__(self, text: str, factor: float | None, train_len: int, moves: str | None):
        self.text, self.name, self.L, self.moves = text, method_of(text), int(train_len), moves
        self.p = resolve(text, factor, train_len, moves)
        # a frequency method with logn on: the query scale alone, on the model's own attention route
        self.only_scales = not is_attention(text)

    # ----- the method: keys seen, regions, activity

    def regions(self, T: int) -> list[Region]:
        p, n = self.p, self.name
        if n == "self-extend":
            w, g = p["window"], p["group"]
            return [Region(lambda i, j: i - j < w),
                    Region(lambda i, j: i - j >= w, lambda i: i // g + w - w // g, lambda j: j // g)]
        if n == "rerope":
            w = p["window"]
            return [Region(lambda i, j: i - j < w),
                    Region(lambda i, j: i - j >= w, lambda i: torch.full_like(i, w), torch.zeros_like)]
        if n == "leaky-rerope":
            w, k = p["window"], p["leak"]
            return [Region(lambda i, j: i - j < w),
                    Region(lambda i, j: i - j >= w, lambda i: (i + w * (k - 1)) / k, lambda j: j / k)]
        if n == "dca":
            cs, cl = p["chunk"], p["chunk"] - p["local"]
            # intra-chunk pairs keep their true distance, which DCA's i % cl - j % cl equals
            return [Region(lambda i, j: i // cl == j // cl),
                    Region(lambda i, j: i // cl - j // cl == 1, lambda i: (i % cl + cl).clamp(max=cs),
                           lambda j: j % cl),
                    Region(lambda i, j: i // cl - j // cl >= 2, lambda i: torch.full_like(i, min(2 * cl - 1, cs)),
                           lambda j: j % cl)]
        if n == "sinks":
            s, r = p["sinks"], p["window"]
            recent = Region(lambda i, j: i - j <= r)
            if not p["shift"]:
                return [Region(lambda i, j: (i - j <= r) | (j < s))]
            # pos_shift: keys at their place in the cache of sinks + window keys, the query at its end
            return [recent, Region(lambda i, j: (i - j > r) & (j < s), lambda i: i.clamp(max=s + r), None)]
        if n == "lambda":
            g, w, cap = p["global"], p["window"], p["cap"]
            local = Region(lambda i, j: i - j < w)
            if cap is None:
                return [Region(lambda i, j: (i - j < w) | (j < g))]
            at = min(cap, T - 1)  # the reference's min(limit_distance, kv_seq_len - 1)
            return [local, Region(lambda i, j: (i - j >= w) & (j < g), lambda i: torch.full_like(i, at),
                                  torch.zeros_like)]
        raise ValueError(f"not an attention method: {self.text}")

    def keys(self, q0: int, q1: int, device) -> Tensor | None:
        """The key indices query rows q0..q1-1 see, sorted (None: all of 0..q1-1)."""
        if self.name == "sinks":
            first, start = self.p["sinks"], q0 - self.p["window"]
        elif self.name == "lambda":
            first, start = self.p["global"], q0 - self.p["window"] + 1
        else:
            return None
        if start <= first:
            return None
        return torch.cat([torch.arange(first, device=device), torch.arange(start, q1, device=device)])

    def active(self, T: int) -> bool:
        """Whether some pair of a T-token window leaves the true positions or is hidden, or a query is scaled."""
        p, n = self.p, self.name
        if p.get("logn") and T > self.L:
            return True
        if n == "self-extend":
            return T > p["window"] and p["group"] > 1
        if n in ("rerope", "leaky-rerope"):
            return T > p["window"]
        if n == "dca":
            return T > p["chunk"] - p["local"]
        if n == "sinks":
            return T > p["sinks"] + p["window"] + 1
        if n == "lambda":
            return T > p["window"]
        return False

    def scaled(self, q: Tensor) -> Tensor:
        """Queries (..., T, hd) times the log-length scale where it is on, else q itself."""
        scale = self.query_scale(q.shape[-2], q.device)
        return q if scale is None else q * scale.to(q.dtype)

    def query_scale(self, T: int, device) -> Tensor | None:
        """(T, 1) factors max(1, ln(i + 1) / ln L) on the queries (ReRoPE's log-length scale), or None."""
        if not self.p.get("logn") or T <= self.L:
            return None
        i = torch.arange(T, device=device, dtype=torch.float64)
        return ((i + 1).log() / math.log(self.L)).clamp(min=1).float()[:, None]

    # ----- attention

    def attend(self, q: Tensor, k: Tensor, v: Tensor, x: Tensor, layer: int, p: Positions, pe,
               block_size: int, route: str | None = None) -> Tensor:
        """The layer's attention under the method. q, k: the layer's unrotated queries and keys (B, H, T, hd), v its
        values; returns (B, H, T, hv) as `causal_attention` does. route: "explicit" or "fused" (None: fused where
        `fusable`)."""
        T = q.shape[-2]
        scale = self.query_scale(T, q.device)
        if scale is not None:
            q = q * scale.to(q.dtype)
        q_rot, k_rot = pe.rotate(q, k, p, layer)
        bias = pe.bias(layer, p, x=x, q=q_rot, k=k_rot)
        fuse = self.fusable(q, bias) if route is None else route == "fused"
        if fuse:
            n = int(p.pos.max()) + 1 if p.pos.numel() else 1
            out = (self._chunks if self.name == "dca" else self._band_far)(q, k, v, q_rot, k_rot, pe, layer, n,
                                                                          block_size)
            return _took("extend", out)
        table = bias.table if isinstance(bias, TableBias) and self.moves == "distance" else None
        regions = self.regions(T)
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        hd = q_rot.shape[-1]
        block_size = min(block_size, (bias.max_block_rows if bias is not None else None) or block_size)
        for q0 in range(0, T, block_size):
            q1 = min(q0 + block_size, T)
            idx = self.keys(q0, q1, q.device)
            cols = torch.arange(q1, device=q.device) if idx is None else idx
            i, j = torch.arange(q0, q1, device=q.device)[:, None], cols[None, :]
            true = (q_rot[:, :, q0:q1] @ _take(k_rot, idx, q1).transpose(-1, -2)).float() * hd ** -0.5
            if table is not None:
                true = true + table[:, (i - j).clamp(min=0)]
            elif bias is not None:
                b = bias.block(q0, q1, q_rot[:, :, q0:q1]).float()
                true = true + (b if idx is None else b[..., idx])
            scores = torch.full_like(true, float("-inf"))
            for n, region in enumerate(regions):
                where = region.where(i, j) & (j <= i)
                if n == 0 or (region.q_at is None and region.k_at is None):
                    s = true
                else:
                    s = self._moved(q, k, q0, q1, cols, idx, region, table, pe, p, layer, hd)
                scores = torch.where(where, s, scores)
            probs = scores.softmax(-1)
            ob = probs.to(v.dtype) @ _take(v, idx, q1)
            if bias is not None and bias.needs_probs:
                full = probs if idx is None else probs.new_zeros(*probs.shape[:-1], q1).index_copy_(-1, idx, probs)
                ob = ob + bias.value(q0, q1, full)
            out[:, :, q0:q1] = ob.to(out.dtype)
        return _took("extend", out)

    def fusable(self, q: Tensor, bias) -> bool:
        """Whether the fused route serves this call: a method whose regions are causal or full blocks, a scheme that
        rotates (no bias of its own), the CPU flash kernel, and no gradient (the kernel's log-sum-exp has none)."""
        return (self.name in ("self-extend", "rerope", "leaky-rerope", "dca") and self.moves == "rotation"
                and bias is None and cpu._CPU_FLASH is not None and q.device.type == "cpu"
                and q.dtype in (torch.float32, torch.bfloat16) and not (torch.is_grad_enabled() and q.requires_grad))

    def _band_far(self, q, k, v, q_rot, k_rot, pe, layer: int, n: int, block: int) -> Tensor:
        """Self-Extend, ReRoPE, leaky ReRoPE: the pairs i - j >= w are causal attention shifted by w, queries and
        keys rotated at the far region's positions (one flash call); the w nearest keys of each query keep their
        true positions (a band of explicit scores); joined by their log-sum-exps."""
        B, H, T, hd = q.shape
        w, far = self.p["window"], self.regions(T)[1]
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

    def _chunks(self, q, k, v, q_rot, k_rot, pe, layer: int, n: int, block: int) -> Tensor:
        """DCA, per chunk of cl = chunk - local queries: intra-chunk keys at their true positions (causal), the
        previous chunk's keys with the successive-chunk query positions and the earlier chunks' keys with the
        inter-chunk ones (full blocks), three flash calls joined by their log-sum-exps."""
        B, H, T, hd = q.shape
        _, succ, inter = self.regions(T)
        cl, scale = self.p["chunk"] - self.p["local"], hd ** -0.5
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

    def _moved(self, q, k, q0, q1, cols, idx, region: Region, table, pe, p: Positions, layer, hd) -> Tensor:
        """Scores of a region whose pairs sit at moved positions."""
        qi = torch.arange(q0, q1, device=q.device)
        qp = qi if region.q_at is None else region.q_at(qi)
        kp = cols if region.k_at is None else region.k_at(cols)
        if self.moves == "rotation":
            n = int(p.pos.max()) + 1 if p.pos.numel() else 1
            qr = pe.rotate_at(q[:, :, q0:q1], qp, layer, n, query=True)
            kr = pe.rotate_at(_take(k, idx, q1), kp, layer, n, query=False)
            return (qr @ kr.transpose(-1, -2)).float() * hd ** -0.5
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
