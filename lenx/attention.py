"""Causal attention with an optional score bias, on several backends that give the same numbers.

The core routes, which serve every scheme (what a bias declares picks among them, never a scheme's name):

- ``blocked``: queries in blocks of ``block_size`` rows; each block's bias (causal mask included) is the
  fused kernel's mask, so memory grows with block_size x L rather than L x L. A relative bias over
  contiguous positions is read as a strided view of one per-layer buffer (no gather, no masked_fill,
  no per-block allocation); other biases are built by ``Bias.block``. A bias that also adds to the output
  (Shaw's a^V) gets each block's softmax written out (still block_size x L memory).
- ``fused``: no bias: the fused causal kernel with no mask at all.
- ``flex``: on CUDA, FlexAttention with the bias's ``score_mod`` and a causal block mask (compiled).
- ``materialized``: the plain reference: the full (H, L, L) scores, bias and mask, softmax written out.
  Tests compare every other route against it.

The CPU accelerators live in ``lenx/attention_cpu.py`` (stored probabilities for training, the separable fold,
Shaw's clipped band), each exact, each used only where its ``*_supported`` says so, and all of them off where the
private ATen kernels they call are missing or have changed their signatures.

Backends (``BACKENDS``), as a user asks for them (``--attn-backend``):

- ``sdpa`` (default): the fastest exact route this device and the bias allow: the CPU accelerators where they
  apply, else ``fused`` (no bias) or ``blocked``.
- ``blocked``, ``materialized``: that route (no bias: ``fused`` for ``blocked``).
- ``flex``: the ``flex`` route where it is available (CUDA, a bias with a ``score_mod`` and no need for the
  probabilities), else what ``sdpa`` would run. Rows record the route that ran (``recording``).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

from . import attention_cpu as cpu
from .attention_cpu import future_mask, reversed_table
from .positional.base import Bias

BACKENDS = ("sdpa", "blocked", "flex", "materialized")


def causal_attention(
    q: Tensor, k: Tensor, v: Tensor, bias: Bias | None, backend: str = "sdpa", block_size: int = 512
) -> Tensor:
    """q, k: (B, H, T, hd); v: (B, H, T, hv), hv = hd or narrower (PoPE doubles q and k). Returns (B, H, T, hv).
    Scores are scaled by hd^-0.5. The route taken is noted for `recording`."""
    if backend == "materialized":
        return _took("materialized", _reference(q, k, v, bias))
    fast = backend in ("sdpa", "flex")
    if fast and cpu.stored_supported(q, k, v):
        out = cpu.stored(q, k, v, bias)
        if out is not None:
            return _took("stored", out)
    if bias is None:
        return _took("fused", _fused(q, k, v))
    if backend == "flex" and flex_supported(q, bias):
        return _took("flex", _flex(q, k, v, bias))
    one_width = v.shape[-1] == q.shape[-1]  # the separable and clipped routes need it (PoPE's q, k are wider)
    if fast and one_width and cpu.separable_supported(q, k, bias):
        return _took("separable", cpu.separable(q, k, v, bias, block_size))
    if fast and one_width and cpu.clipped_supported(q, bias):
        return _took("clipped", cpu.clipped(q, k, v, *bias.clipped_kv()))
    return _took("blocked", _blocked(q, k, v, bias, block_size))


# The routes of `causal_attention`, by the backend whose route each is: what a row's attn_backend records.
ROUTE_BACKEND = {"materialized": "materialized", "flex": "flex", "blocked": "blocked", "stored": "sdpa",
                 "fused": "sdpa", "separable": "sdpa", "clipped": "sdpa",
                 # lenx.extend's attention-level extensions: explicit scores per query block, or the CPU flash kernel
                 "extend": "blocked", "extend-fused": "sdpa"}
_ROUTES: list[set[str]] = []  # the open `recording`s (row shards' threads add to them: set.add holds the GIL)


def _took(route: str, out: Tensor) -> Tensor:
    if torch.compiler.is_compiling():  # traced once: a compiled model's rows record the backend asked for
        return out
    for routes in _ROUTES:
        routes.add(route)
    return out


@contextmanager
def recording():
    """The set of attention routes taken while the block runs (every layer, every thread): what ran, which may
    not be what was asked for (flex falls back to the sdpa routes off CUDA and for biases without a score_mod)."""
    routes: set[str] = set()
    _ROUTES.append(routes)
    try:
        yield routes
    finally:
        _ROUTES.remove(routes)


def backend_taken(routes: set[str], asked: str | None) -> str | None:
    """The backend a row records: the one whose routes ran (`asked` where nothing was recorded, e.g. an HF
    model). A run of sdpa whose biases took the blocked fallback is sdpa's; flex that fell back is not flex."""
    if not routes:
        return asked
    backends = sorted({ROUTE_BACKEND[r] for r in routes})
    if backends == ["blocked", "sdpa"] or (backends == ["blocked"] and asked != "blocked"):
        return "sdpa"
    return "+".join(backends)


def _fused(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The fused causal kernel. Values narrower than queries and keys (PoPE doubles those) get zero columns up to
    their width, which the flash kernels require (else SDPA takes its math path, with L x L scores in memory), and
    the output is cut back: exact, the extra columns of the output are zero."""
    hv = v.shape[-1]
    if hv >= q.shape[-1]:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, F.pad(v, (0, q.shape[-1] - hv)), is_causal=True)[..., :hv]


# ---------------------------------------------------------------------------------------------------
# blocked: one fused call per query block, the block's bias as the mask


def _blocked(q: Tensor, k: Tensor, v: Tensor, bias: Bias, block_size: int) -> Tensor:
    T = q.shape[-2]
    table = None if bias.needs_probs else bias.toeplitz_table()
    if table is not None:
        return _blocked_toeplitz(q, k, v, table, block_size)
    out = q.new_empty(*q.shape[:-1], v.shape[-1])  # values may be narrower than queries and keys (PoPE)
    block_size = min(block_size, bias.max_block_rows or block_size)
    for q0 in range(0, T, block_size):
        q1 = min(q0 + block_size, T)
        out[:, :, q0:q1] = _block(q, k, v, bias, q0, q1)
    return out


def _block(q: Tensor, k: Tensor, v: Tensor, bias: Bias, q0: int, q1: int) -> Tensor:
    qb, kb, vb = q[:, :, q0:q1], k[:, :, :q1], v[:, :, :q1]
    b = bias.block(q0, q1, qb)
    if not bias.masks_future:
        b = b.masked_fill(future_mask(q0, q1, q.device), float("-inf"))
    if bias.needs_probs:
        scores = (qb @ kb.transpose(-1, -2)).float() * qb.shape[-1] ** -0.5 + b
        probs = scores.softmax(dim=-1)
        return (probs.to(vb.dtype) @ vb + bias.value(q0, q1, probs)).to(q.dtype)
    return F.scaled_dot_product_attention(qb, kb, vb, attn_mask=b.to(q.dtype))


def _blocked_toeplitz(q: Tensor, k: Tensor, v: Tensor, table: Tensor, block_size: int) -> Tensor:
    """b[h, i, j] = table[h, i - j], causal mask included, every block a view of one buffer.

    R[h, u] = table[h, T - 1 - u] for u < T and -inf for T <= u < T + block_size - 1 (negative
    distances, i.e. future keys). With a block's query rows taken in reverse order (r = q1 - 1 - i),
    b[h, i, j] = R[h, (T - q1) + r + j]: a view with strides (1, 1) over (r, j), no copy.
    """
    B, H, T, hd = q.shape
    bs = min(block_size, T)
    R = reversed_table(table, T, bs, q.dtype)
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    for q0 in range(0, T, bs):
        q1 = min(q0 + bs, T)
        mask = R.as_strided((1, H, q1 - q0, q1), (0, R.stride(0), 1, 1), R.storage_offset() + T - q1)
        qb = q[:, :, q0:q1].flip(-2)
        ob = F.scaled_dot_product_attention(qb, k[:, :, :q1], v[:, :, :q1], attn_mask=mask)
        out[:, :, q0:q1] = ob.flip(-2)
    return out


# ---------------------------------------------------------------------------------------------------
# flex: CUDA FlexAttention with the bias's score_mod


def flex_supported(q: Tensor, bias: Bias | None) -> bool:
    if q.device.type != "cuda" or (bias is not None and (bias.needs_probs or bias.score_mod() is None)):
        return False
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


_FLEX_COMPILED = None


def _flex(q: Tensor, k: Tensor, v: Tensor, bias: Bias) -> Tensor:
    global _FLEX_COMPILED
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if _FLEX_COMPILED is None:
        _FLEX_COMPILED = torch.compile(flex_attention, dynamic=False)
    T = q.shape[-2]

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    block_mask = create_block_mask(causal, B=None, H=None, Q_LEN=T, KV_LEN=T, device=q.device)
    return _FLEX_COMPILED(q, k, v, score_mod=bias.score_mod(), block_mask=block_mask, scale=q.shape[-1] ** -0.5)


# ---------------------------------------------------------------------------------------------------
# materialized: the reference


def _reference(q: Tensor, k: Tensor, v: Tensor, bias: Bias | None) -> Tensor:
    T = q.shape[-2]
    scores = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    if bias is not None:
        scores = scores + bias.block(0, T, q)
    scores = scores.masked_fill(future_mask(0, T, q.device), float("-inf"))
    probs = scores.softmax(dim=-1)
    out = probs.to(v.dtype) @ v
    if bias is not None and bias.needs_probs:
        out = out + bias.value(0, T, probs)
    return out.to(q.dtype)
