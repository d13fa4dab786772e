"""Causal attention with an optional score bias, on several backends that give the same numbers.

- ``sdpa``: fused `scaled_dot_product_attention`. Without a bias, the causal kernel with no mask.
  With a bias, queries are processed in blocks of ``block_size`` rows; each block's bias is built
  from the scheme's hook and passed to the fused kernel as its mask, so memory grows with
  block_size x L rather than L x L.
- ``materialized``: the plain reference: the full (H, L, L) bias and mask, softmax written out.
  Tests compare every other backend against it.

A bias that also adds to the output (Shaw's a^V) needs the attention probabilities; for it the
blocked path computes each block's softmax explicitly (still block_size x L memory).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .positional.base import Bias

BACKENDS = ("sdpa", "materialized")


def causal_attention(
    q: Tensor, k: Tensor, v: Tensor, bias: Bias | None, backend: str = "sdpa", block_size: int = 512
) -> Tensor:
    """q, k, v: (B, H, T, hd). Returns (B, H, T, hd)."""
    T = q.shape[-2]
    if backend == "materialized":
        return _reference(q, k, v, bias)
    if bias is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    out = [_block(q, k, v, bias, q0, min(q0 + block_size, T)) for q0 in range(0, T, block_size)]
    return out[0] if len(out) == 1 else torch.cat(out, dim=-2)


def _future_mask(q0: int, q1: int, device) -> Tensor:
    """True where key j lies after query i, for query rows q0..q1-1 and keys 0..q1-1."""
    i = torch.arange(q0, q1, device=device)[:, None]
    j = torch.arange(q1, device=device)[None, :]
    return j > i


def _block(q: Tensor, k: Tensor, v: Tensor, bias: Bias, q0: int, q1: int) -> Tensor:
    qb, kb, vb = q[:, :, q0:q1], k[:, :, :q1], v[:, :, :q1]
    b = bias.block(q0, q1, qb).masked_fill(_future_mask(q0, q1, q.device), float("-inf"))
    if bias.needs_probs:
        scores = (qb @ kb.transpose(-1, -2)).float() * qb.shape[-1] ** -0.5 + b
        probs = scores.softmax(dim=-1)
        return (probs.to(vb.dtype) @ vb + bias.value(q0, q1, probs)).to(q.dtype)
    return F.scaled_dot_product_attention(qb, kb, vb, attn_mask=b.to(q.dtype))


def _reference(q: Tensor, k: Tensor, v: Tensor, bias: Bias | None) -> Tensor:
    T = q.shape[-2]
    scores = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    if bias is not None:
        scores = scores + bias.block(0, T, q)
    scores = scores.masked_fill(_future_mask(0, T, q.device), float("-inf"))
    probs = scores.softmax(dim=-1)
    out = probs.to(v.dtype) @ v
    if bias is not None and bias.needs_probs:
        out = out + bias.value(0, T, probs)
    return out.to(q.dtype)
