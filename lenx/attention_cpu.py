"""Exact attention routes that are faster on the CPU than the core routes of ``lenx/attention.py``.

- ``stored``: training on the CPU in fp32, with no bias, a relative bias over contiguous positions
  (``Bias.toeplitz_table``) or a key term (``Bias.key_term``: ALiBi, FoX): batched matmuls over chunks of
  query rows, each chunk's probabilities kept for the backward pass, up to ``STORED_MAX_BYTES`` per call
  (``_StoredProbs``); faster here than the fused kernel's backward, which recomputes them.
- ``separable``: inference on the CPU in fp32 with a separable bias (b = s_h * g_j + per-row constant: ALiBi,
  FoX): the bias folded into one extra query/key dimension, queries in blocks on the fused kernel with no mask.
- ``clipped``: Shaw's clipped relative keys and values (``Bias.clipped_kv``) on the CPU in fp32 or bf16: the
  fused kernel for keys past the clip and a band of K explicit scores for the nearest keys, joined by a
  differentiable log-sum-exp; training and inference.

``separable`` and ``clipped`` call private ATen kernels (the CPU flash kernel with its log-sum-exp, and its
backward). Their schemas are checked once, at import, against the signatures this module was written for; where
a kernel is missing or its schema differs, the route that needs it is off and attention takes a core route.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .positional.base import Bias


def _kernel(name: str, args: list[tuple[str, str]], returns: int):
    """torch.ops.aten.<name> if its schema starts with these (argument, type) pairs and returns this many tensors;
    None otherwise (the routes that call it are then off)."""
    op = getattr(torch.ops.aten, name, None)
    try:
        schema = op.default._schema
        have = [(a.name, str(a.type)) for a in schema.arguments]
    except (AttributeError, RuntimeError):
        return None
    return op if have[: len(args)] == args and len(schema.returns) == returns else None


_QKV = [("query", "Tensor"), ("key", "Tensor"), ("value", "Tensor")]
# The CPU flash kernel with its log-sum-exp (used to join attention over separate sets of keys), and its backward.
_CPU_FLASH = _kernel("_scaled_dot_product_flash_attention_for_cpu",
                     [*_QKV, ("dropout_p", "float"), ("is_causal", "bool"), ("attn_mask", "Optional[Tensor]"),
                      ("scale", "Optional[float]")], returns=2)
_CPU_FLASH_BACKWARD = _kernel("_scaled_dot_product_flash_attention_for_cpu_backward",
                              [("grad_out", "Tensor"), *_QKV, ("out", "Tensor"), ("logsumexp", "Tensor"),
                               ("dropout_p", "float"), ("is_causal", "bool"), ("attn_mask", "Optional[Tensor]"),
                               ("scale", "Optional[float]")], returns=3)


def future_mask(q0: int, q1: int, device) -> Tensor:
    """True where key j lies after query i, for query rows q0..q1-1 and keys 0..q1-1."""
    i = torch.arange(q0, q1, device=device)[:, None]
    j = torch.arange(q1, device=device)[None, :]
    return j > i


def reversed_table(table: Tensor, T: int, block_size: int, dtype) -> Tensor:
    """R[h, u] = table[h, T - 1 - u] for u < T, -inf for T <= u < T + block_size - 1 (future keys)."""
    R = torch.full((table.shape[0], T + min(block_size, T) - 1), float("-inf"), dtype=dtype, device=table.device)
    R[:, :T] = table[:, :T].flip(-1).to(dtype)
    return R




# ---------------------------------------------------------------------------------------------------
# stored: training on the CPU in fp32, the probabilities kept for the backward pass

STORED_CHUNK = 64  # query rows per matmul
STORED_MAX_BYTES = 128 * 2**20  # probabilities kept per attention call (layer); above this, the routes below


def _stored_bytes(BH: int, T: int, chunk: int = STORED_CHUNK) -> int:
    return 4 * BH * sum(min(chunk, T - q0) * min(q0 + chunk, T) for q0 in range(0, T, chunk))


def stored_supported(q: Tensor, k: Tensor, v: Tensor) -> bool:
    B, H, T, _ = q.shape
    return (
        q.device.type == "cpu"
        and q.dtype == torch.float32
        and torch.is_grad_enabled()
        and (q.requires_grad or k.requires_grad or v.requires_grad)
        and _stored_bytes(B * H, T) <= STORED_MAX_BYTES
        and not torch.compiler.is_compiling()  # compiled models keep the fused kernel, which inductor knows
    )


def stored(q: Tensor, k: Tensor, v: Tensor, bias: Bias | None) -> Tensor | None:
    """The stored route, or None where the bias has neither a distance table nor a key term (or needs the
    probabilities)."""
    if bias is None:
        return _StoredProbs.apply(q, k, v, None, None)
    if bias.needs_probs:
        return None
    table = bias.toeplitz_table()
    if table is not None:
        return _StoredProbs.apply(q, k, v, _distance_row(table, q.shape[-2]), None)
    term = bias.key_term()
    if term is None:
        return None
    B, H, T, _ = q.shape
    s, g = term
    g = g.view(1, 1, T) if g.dim() == 1 else g
    g = g if g.is_floating_point() else g.float()  # ALiBi's g is its integer positions: s cast to them would be 0
    return _StoredProbs.apply(q, k, v, None, (s.to(g.dtype)[:, None] * g).float().expand(B, H, T).reshape(B * H, T))


def _distance_row(table: Tensor, T: int) -> Tensor:
    """G (H, 2T - 1) with G[h, w] = table[h, w - (T - 1)] for w >= T - 1 and -inf below (future keys)."""
    return F.pad(table[:, :T].float(), (T - 1, 0), value=float("-inf"))


class _StoredProbs(torch.autograd.Function):
    """Exact causal attention, optionally with a relative bias b[h, i, j] = G[h, i - j + T - 1], for training
    on the CPU: plain batched matmuls over chunks of query rows, with each chunk's probabilities kept for the
    backward pass (2 matmuls forward, 4 backward, no recomputation). On a CPU that is faster than the fused
    flash kernel, whose backward recomputes the scores in small tiles (docs/performance.md); the price is memory,
    about B*H*T*T/2 floats per layer, which ``STORED_MAX_BYTES`` caps.

    With a bias, keys and values are kept in reverse order, so that a chunk's bias is a strided view of G
    (strides (1, 1), no gather): with k'_c = k_(T-1-c), query i and key column c read G[i + c], that is
    the bias at distance i - j for key j = T - 1 - c, and -inf for j > i. Chunk [q0, q1) then sees the
    last q1 reversed keys. The gradient of G sums each chunk's score gradient along its anti-diagonals.
    The output is laid out as (B, T, H, hd) in memory, so that the model's merge of the heads is a view.

    ``C`` (B*H, T): a key term added to every score of column j (b_ij = C_j plus a per-row constant, which
    softmax ignores), not reversed; differentiable.

    ``with_lse``: also return each row's log-sum-exp of scores (B, H, T), differentiable (a gradient g on it
    adds p_ij * g_i to the score gradient), for routes that join attention over separate sets of keys.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, G: Tensor | None, C: Tensor | None = None,
                with_lse: bool = False):
        B, H, T, hd = q.shape
        hv = v.shape[-1]  # values may be narrower than queries and keys (PoPE doubles those)
        rev = G is not None
        qs = torch.mul(q, hd**-0.5, out=q.new_empty(B, H, T, hd)).view(B * H, T, hd)
        kk, vv = (_keys_copy(x, rev).view(B * H, T, x.shape[-1]) for x in (k, v))
        o = q.new_empty(B, T, H, hv).transpose(1, 2)
        lse = q.new_empty(B * H, T, 1) if with_lse else None
        probs = []
        for q0, q1, keys in _stored_chunks(T, rev):
            n = q1 - q0
            s = torch.bmm(qs[:, q0:q1], kk[:, keys].transpose(1, 2))  # (BH, n, q1)
            if rev:
                s.view(B, H, n, q1).add_(G.as_strided((H, n, q1), (G.stride(0), 1, 1), G.storage_offset() + q0 + T - q1))
            else:
                if C is not None:  # the key term, centred on the chunk's first row (softmax drops the constant)
                    s.add_((C[:, :q1] - C[:, q0 : q0 + 1])[:, None, :])
                s[:, :, q0:].masked_fill_(future_mask(0, n, q.device), float("-inf"))  # the chunk's own square
            m = s.amax(-1, keepdim=True) if with_lse else None
            p = torch.softmax(s, -1)
            if with_lse:  # p is exp(s - lse), and its largest entry exp(m - lse): no second exp over s
                lse[:, q0:q1] = m - p.amax(-1, keepdim=True).log()
            o[:, :, q0:q1] = torch.bmm(p, vv[:, keys]).view(B, H, n, hv)
            probs.append(p)
        ctx.save_for_backward(qs, kk, vv, o, *probs)
        ctx.rev, ctx.key_term = rev, C is not None
        return (o, lse.view(B, H, T)) if with_lse else o

    @staticmethod
    def backward(ctx, g_o: Tensor | None, g_lse: Tensor | None = None):
        qs, kk, vv, o, *probs = ctx.saved_tensors
        B, H, T, hv = o.shape
        hd = qs.shape[-1]
        g_o = torch.zeros_like(o) if g_o is None else g_o
        neg_D = (g_o * o).sum(-1).neg_()  # -D_i = -dO_i . o_i, plus the log-sum-exp's gradient
        neg_D = (neg_D if g_lse is None else neg_D.add_(g_lse)).view(B * H, T, 1)
        do = g_o.contiguous().view(B * H, T, hv)
        dq, dkk, dvv = torch.empty_like(qs), None, None
        dG = qs.new_zeros(H, 2 * T - 1) if ctx.needs_input_grad[3] else None
        dC = qs.new_zeros(B * H, T) if ctx.key_term and ctx.needs_input_grad[4] else None
        # last chunk first: it sees every key, so its dK and dV start the sums (no zero fill)
        for (q0, q1, keys), p in reversed(list(zip(_stored_chunks(T, ctx.rev), probs))):
            n = q1 - q0
            do_c = do[:, q0:q1]
            dv_c = torch.bmm(p.transpose(1, 2), do_c)
            ds = torch.baddbmm(neg_D[:, q0:q1], do_c, vv[:, keys].transpose(1, 2)).mul_(p)  # P * (dO v^T - D)
            dq[:, q0:q1] = torch.bmm(ds, kk[:, keys])
            dk_c = torch.bmm(ds.transpose(1, 2), qs[:, q0:q1])
            if dkk is None:
                dkk, dvv = dk_c, dv_c
            else:
                dkk[:, keys] += dk_c
                dvv[:, keys] += dv_c
            if dC is not None:  # C_j entered every score of column j (the centring constant's gradient sums to 0)
                dC[:, :q1] += ds.sum(1)
            if dG is not None:  # G[q0 + T - q1 + r + c] received ds[r, c]: sum each anti-diagonal r + c = u
                z = ds.new_zeros(H, n * (q1 + n - 1))
                z.as_strided((H, n, q1), (z.stride(0), q1 + n, 1)).copy_(ds.view(B, H, n, q1).sum(0))
                dG[:, q0 + T - q1 : q0 + T + n - 1] += z.view(H, n, q1 + n - 1).sum(1)
        dk, dv = (_keys_copy(x.view(B, H, T, x.shape[-1]), ctx.rev) for x in (dkk, dvv))
        return dq.mul_(hd**-0.5).view(B, H, T, hd), dk, dv, dG, dC, None


def _stored_chunks(T: int, rev: bool):
    """(q0, q1, keys) per chunk of query rows: keys 0..q1-1, or in reversed order the last q1 rows."""
    for q0 in range(0, T, STORED_CHUNK):
        q1 = min(q0 + STORED_CHUNK, T)
        yield q0, q1, slice(T - q1, T) if rev else slice(0, q1)


def _keys_copy(x: Tensor, reverse: bool) -> Tensor:
    """x (B, H, T, hd) contiguous (copied only if it is not), its rows in reverse order if asked."""
    if reverse:
        out = x.new_empty(x.shape)
        return torch.index_select(x, 2, torch.arange(x.shape[2] - 1, -1, -1, device=x.device), out=out)
    return x.contiguous()


# ---------------------------------------------------------------------------------------------------
# separable: b = s_h * g_j + (per-row constant), folded into one extra q/k dimension


def separable_supported(q: Tensor, k: Tensor, bias: Bias) -> bool:
    # fp32 only: the extra dimension carries s_h * (g_j - c) through the kernel's own dot product, which
    # in bf16/fp16 would round it to 8/11 bits. CPU only: the route needs the CPU kernel's log-sum-exp.
    # Inference only: it rewrites one extra key column in place per block (training: `_StoredProbs`, `blocked`).
    return (
        _CPU_FLASH is not None
        and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad))
        and q.device.type == "cpu"
        and q.dtype == torch.float32
        and not bias.needs_probs
        and bias.key_term() is not None
    )


def separable(q: Tensor, k: Tensor, v: Tensor, bias: Bias, block_size: int) -> Tensor:
    """Exact for a bias s_h * g_j + c(h, i): softmax ignores c, and s_h * g_j is the product of one extra
    query column (s_h * sqrt(hd)) and one extra key column (g_j), scaled by 1/sqrt(hd) in the kernel.

    Each query block [q0, q1) is two fused calls joined by their log-sum-exp:
      * keys before the block, all visible: the unmasked kernel on the extended q/k (the bulk of the work);
      * the block's own square, causal: the kernel with the block's exact bias as its mask (block x block).
    Precision: s_h * g_j grows with j (ALiBi at 16k: thousands), and a score that large keeps only ~1e-3
    absolute precision in fp32. So the extra key column is centred on the block's first row, g_j - g_q0:
    the keys where that is large lie far before the block, where a strongly sloped head gives them no weight
    (exp(-s (i - j))), and a weakly sloped head keeps s_h * (g_j - g_q0) small. The square, where the heavy
    keys of a strong head lie, gets the exact bias.
    """
    B, H, T, hd = q.shape
    s, g = bias.key_term()
    scale = 1.0 / math.sqrt(hd)
    E = hd + 1
    # One buffer per tensor and layer; the extra key column is rewritten per block (q0 values per head).
    Qx = torch.empty(B, H, T, E, dtype=q.dtype, device=q.device)
    Qx[..., :hd] = q
    Qx[..., hd] = (s.to(q.dtype) * math.sqrt(hd))[None, :, None]
    Kx = torch.empty(B, H, T, E, dtype=k.dtype, device=k.device)
    Kx[..., :hd] = k
    Vx = torch.zeros(B, H, T, E, dtype=v.dtype, device=v.device)  # the kernel wants one head size
    Vx[..., :hd] = v
    g = g.to(q.device, torch.float64)
    g = g.view(1, 1, T) if g.dim() == 1 else g  # (1 or B, 1 or H, T)
    table = bias.toeplitz_table()
    R = reversed_table(table, T, block_size, q.dtype) if table is not None else None
    out = torch.empty_like(q)
    for q0 in range(0, T, block_size):
        q1 = min(q0 + block_size, T)
        n = q1 - q0
        # the square: rows reversed so the exact bias is a strided view (see _blocked_toeplitz)
        if R is not None:
            mask = R.as_strided((1, H, n, n), (0, R.stride(0), 1, 1), R.storage_offset() + T - n)
        else:
            gb = g[..., q0:q1]  # the square's exact bias s_h (g_j - g_i), from the key term: no block of n x q1
            sq = s.to(g.device, torch.float64)[:, None, None] * (gb[..., None, :] - gb[..., :, None])
            mask = sq.masked_fill(future_mask(0, n, q.device), float("-inf")).to(q.dtype).flip(-2)
        o2, l2 = _CPU_FLASH(q[:, :, q0:q1].flip(-2), k[:, :, q0:q1], v[:, :, q0:q1], attn_mask=mask, scale=scale)
        o2, l2 = o2.flip(-2), l2.flip(-1)
        if q0 == 0:
            out[:, :, q0:q1] = o2
            continue
        Kx[..., :q0, hd] = (g[..., :q0] - g[..., q0 : q0 + 1]).to(k.dtype)
        o1, l1 = _CPU_FLASH(Qx[:, :, q0:q1], Kx[:, :, :q0], Vx[:, :, :q0], scale=scale)
        # The two calls drop different per-row constants: the square has the exact bias, s_h (g_j - g_i),
        # the past part s_h (g_j - g_q0). Put the past part's log-sum-exp on the square's footing.
        l1 = l1.double() - s.double()[None, :, None] * (g[..., q0:q1] - g[..., q0 : q0 + 1])
        l2 = l2.double()
        m = torch.maximum(l1, l2)
        w1, w2 = (l1 - m).exp_(), (l2 - m).exp_()
        total = w1 + w2
        w1, w2 = (w1 / total).to(q.dtype)[..., None], (w2 / total).to(q.dtype)[..., None]
        out[:, :, q0:q1] = o1[..., :hd] * w1 + o2 * w2
    return out


# ---------------------------------------------------------------------------------------------------
# clipped relative key/value vectors (Shaw): a band of K distances plus the fused kernel for the rest


class _FlashLSE(torch.autograd.Function):
    """The CPU flash kernel's output and log-sum-exp, both differentiable (torch's own autograd treats the
    log-sum-exp as a constant).

    Backward: the kernel's backward forms dS = P * (dO.v_j - D_i) with D_i = dO_i.o_i. A gradient g on
    lse_i adds P * g_i to dS (d lse_i / d s_ij = p_ij), i.e. D_i - g_i: given to the kernel by one extra
    head column, zero in q, k and v, holding -g in the output and 1 in dO.
    """

    @staticmethod
    def forward(ctx, q, k, v, scale):
        o, lse = _CPU_FLASH(q, k, v, is_causal=True, scale=scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale = scale
        return o, lse

    @staticmethod
    def backward(ctx, g_o, g_lse):
        q, k, v, o, lse = ctx.saved_tensors
        hd = q.shape[-1]
        g_o = torch.zeros_like(o) if g_o is None else g_o
        if g_lse is not None:
            col = lambda t, x: torch.cat([t, torch.as_tensor(x, dtype=t.dtype).expand(*t.shape[:-1], 1)], -1)  # noqa: E731
            q, k, v, g_o = col(q, 0.0), col(k, 0.0), col(v, 0.0), col(g_o, 1.0)
            o = torch.cat([o, -g_lse.to(o.dtype)[..., None]], -1)
        dq, dk, dv = _CPU_FLASH_BACKWARD(g_o.contiguous(), q, k, v, o, lse, 0.0, True, scale=ctx.scale)
        return dq[..., :hd], dk[..., :hd], dv[..., :hd], None




def clipped_supported(q: Tensor, bias: Bias) -> bool:
    return (
        _CPU_FLASH_BACKWARD is not None
        and q.device.type == "cpu"
        and q.dtype in (torch.float32, torch.bfloat16)
        and bias.clipped_kv() is not None
    )


def clipped(q: Tensor, k: Tensor, v: Tensor, a_k: Tensor, a_v: Tensor, chunk: int = 64) -> Tensor:
    """Exact attention with s_ij = (q_i.k_j + q_i.a_k[r]) / sqrt(hd), out_i = sum_j p_ij (v_j + a_v[r]),
    r = min(i - j, K), K = len(a_k) - 1 (Shaw et al.'s relative keys and values, clipped at K).

    Past the clip every key shares a_k[K] and a_v[K]: q_i.a_k[K] is one constant per row, and a_v[K] one
    vector. So keys at distance >= K are plain causal attention shifted by K (the fused kernel, with its
    log-sum-exp), and the K nearest keys a band of K explicit scores per query; the two are joined by
    their log-sum-exp. Memory and time stay those of plain attention plus O(T x K); differentiable.

    bf16 (autocast): the fused kernel runs in bf16 as plain attention would; the band, the log-sum-exps that
    join the two halves and the probabilities stay fp32 (autocast off), as the kernel keeps its own softmax.
    """
    B, H, T, hd = q.shape
    K = a_k.shape[0] - 1
    chunk = max(chunk, K)
    scale = hd**-0.5
    far = q[:, :, K:], k[:, :, : T - K], v[:, :, : T - K]
    if T > K:
        o_far, lse_far = _StoredProbs.apply(*far, None, None, True) if stored_supported(*far) else _FlashLSE.apply(*far, scale)
    with torch.autocast("cpu", enabled=False):
        q, k, v, a_k, a_v, out_dtype = q.float(), k.float(), v.float(), a_k.float(), a_v.float(), q.dtype
        qa = (q @ a_k.T) * scale  # (B, H, T, K + 1)
        band = _band_scores(q, k, K, chunk) * scale + qa[..., :K].flip(-1)  # column u: distance K - 1 - u
        band = band.masked_fill(_band_before_start(T, K, q.device), float("-inf"))
        lse = torch.logsumexp(band, -1)
        if T <= K:
            p = (band - lse[..., None]).exp()
            return (_band_apply(p, v, K, chunk) + p @ a_v[:K].flip(0)).to(out_dtype)
        lse_far = F.pad(lse_far.float() + qa[:, :, K:, K], (K, 0), value=float("-inf"))  # rows i < K: no far keys
        lse = torch.logaddexp(lse, lse_far)
        # probabilities of the band's K distances and, last, the far keys' total (which all get a_v[K])
        p = (torch.cat([band, lse_far[..., None]], -1) - lse[..., None]).exp()
        out = _band_apply(p[..., :K], v, K, chunk) + p @ torch.cat([a_v[:K].flip(0), a_v[K:]])
        out = out.index_add(2, torch.arange(K, T, device=q.device), o_far.float() * p[:, :, K:, K:])
    return out.to(out_dtype)


def _chunked(x: Tensor, chunk: int) -> Tensor:
    """x (B, H, T, d) as (B, H, n, chunk, d), zero rows after row T - 1 filling the last chunk."""
    B, H, T, d = x.shape
    n = -(-T // chunk)
    return (F.pad(x, (0, 0, 0, n * chunk - T)) if n * chunk > T else x).reshape(B, H, n, chunk, d)


def _lead(K: int, chunk: int) -> int:
    """Rows of a window before its chunk: K - 1 are needed; a few more (up to chunk) round the window's length up
    to a multiple of 16, where the CPU matmuls of these small shapes run faster (docs/performance.md)."""
    lead = K - 1 + (-(chunk + K - 1)) % 16
    return lead if lead <= chunk else K - 1


def _diagonals(s: Tensor, K: int, lead: int) -> Tensor:
    """(B, H, n, chunk, K) view of a contiguous (B, H, n, chunk, chunk + lead): row c, columns c + e .. c + e + K - 1
    with e = lead - (K - 1), the window columns of distances K - 1 ... 0."""
    B, H, n, chunk, W = s.shape
    return s.as_strided((B, H, n, chunk, K), (s.stride(0), s.stride(1), s.stride(2), W + 1, 1),
                        s.storage_offset() + lead - (K - 1))


def _windows(x: Tensor, lead: int, chunk: int) -> Tensor:
    """Rows of x (B, H, T, d) in windows of chunk + lead rows, window c starting lead rows before row c * chunk
    (zeros before row 0 and after row T - 1): (B, H, n, chunk + lead, d). Built from two slices of the chunked
    rows (no overlapping view, whose gradient would need a scatter); lead <= chunk."""
    xc = _chunked(x, chunk)
    prev = F.pad(xc[:, :, :-1, chunk - lead :], (0, 0, 0, 0, 1, 0))  # the lead rows before each chunk
    return torch.cat([prev, xc], -2)


def _band_scores(q: Tensor, k: Tensor, K: int, chunk: int) -> Tensor:
    """(B, H, T, K): column u holds q_i . k_(i - (K - 1 - u)), i.e. distances K - 1 ... 0, by one matmul per
    chunk of query rows against its window of keys, then a strided view of each chunk's K diagonals."""
    B, H, T, _ = q.shape
    lead = _lead(K, chunk)
    s = _chunked(q, chunk) @ _windows(k, lead, chunk).transpose(-1, -2)  # (B, H, n, chunk, chunk + lead)
    return _diagonals(s, K, lead).reshape(B, H, -1, K)[:, :, :T]


def _band_apply(p: Tensor, v: Tensor, K: int, chunk: int) -> Tensor:
    """sum_u p[i, u] v_(i - (K - 1 - u)): each chunk's band of probabilities laid into a zero (chunk, window)
    matrix (the transpose of _band_scores's view) and multiplied by the chunk's window of values."""
    B, H, T, hd = v.shape
    lead = _lead(K, chunk)
    pc = _chunked(p, chunk)
    z = p.new_zeros(*pc.shape[:-1], chunk + lead)
    _diagonals(z, K, lead).copy_(pc)
    return (z @ _windows(v, lead, chunk)).reshape(B, H, -1, hd)[:, :, :T]


def _band_before_start(T: int, K: int, device) -> Tensor:
    """(T, K): True where band column u of row i points before the first key (i < K - 1 - u)."""
    i = torch.arange(T, device=device)[:, None]
    u = torch.arange(K, device=device)[None, :]
    return i < K - 1 - u


