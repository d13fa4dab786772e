"""An attention-level extension's settings and geometry (which keys a query sees, the regions of pairs and
their moved positions, the log-length query scale): the part a scheme holds (`PositionalScheme.extension`).
The attention it computes is `lenx.extend`'s."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .rope_scaling import is_attention, method_of, resolve

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
