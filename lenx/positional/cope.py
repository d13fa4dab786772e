import torch
from torch import Tensor, nn

from . import register
from .base import Bias, PositionalScheme, is_integer


def _upper(n: int, device) -> Tensor:
    """(n, n) True above the diagonal: in a block of query rows q0..q1-1 (n = q1 - q0) against keys 0..q1-1, the
    future keys are these entries of the last n columns (earlier columns precede every row)."""
    return torch.ones(n, n, dtype=torch.bool, device=device).triu_(1)


def _positions(qb: Tensor, kb: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
    """The reference's gates and contextual positions for a block of query rows, before the clamp:
    g = sigmoid(q.k / sqrt(d)) with future keys' gates zeroed (the reference multiplies by its 0/1 causal mask),
    p_ij = sum_{l = j..i} g_il (its flip, cumsum, flip). Returns (g, p)."""
    n = qb.shape[-2]
    g = torch.matmul(qb, kb.transpose(-1, -2)).mul_(qb.shape[-1] ** -0.5).sigmoid_()
    g[..., g.shape[-1] - n :].masked_fill_(upper, 0.0)
    return g, g.flip(-1).cumsum_(-1).flip(-1)


def _steps(qb: Tensor, e: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """z = scale * q . e (B, H, n, npos), the position term at every whole position, and its steps
    z[m + 1] - z[m] (0 at the last position, which nothing passes)."""
    z = torch.matmul(qb, e)
    if scale != 1.0:
        z.mul_(scale)
    return z, torch.diff(z, dim=-1, append=z.new_zeros(*z.shape[:-1], 1))


class _CopeBlock(torch.autograd.Function):
    """bias[b, h, r, j] = scale * (w z[ce] + (1 - w) z[fl]) for query i = q0 + r and key j <= i, -inf for j > i;
    z = q_i . e (npos values per query), p clamped to npos - 1, fl = floor(p), ce = ceil(p), w = p - fl.

    Computed as z[fl] + w (z[fl + 1] - z[fl]): one index tensor (fl = p truncated, p >= 0) for both gathers; where
    p is whole, w = 0 and ce = fl, the same value. The forward sums the gates over keys in reverse order directly
    (q . k against the keys reversed), one flip of the result instead of two. Saves only its inputs (the block's
    queries, its keys, the table): the backward recomputes the gates, so that training keeps no per-block buffers
    beyond the bias itself (the reference's autograd would keep about ten B x H x rows x keys tensors per block).
    The gradient is the reference's: none through floor and ceil; through w = p - floor(p) it is z[ce] - z[fl],
    zero where p is whole (so also where the clamp holds p at npos - 1, which passes no gradient there either); the
    reversed cumulative sum's transpose (a cumulative sum); the sigmoid's."""

    @staticmethod
    def forward(ctx, qb: Tensor, kb: Tensor, e: Tensor, scale: float) -> Tensor:
        npos, n = e.shape[-1], qb.shape[-2]
        upper = _upper(n, qb.device)
        # column c is key q1 - 1 - c; future keys are the first n columns' upper-left triangle
        p = torch.matmul(qb, kb.flip(-2).transpose(-1, -2)).mul_(qb.shape[-1] ** -0.5).sigmoid_()
        p[..., :n].masked_fill_(upper.flip(-1), 0.0)
        fl = p.cumsum_(-1).clamp_(max=npos - 1).long()  # floor: p >= 0
        w = p.frac_()
        z, dz = _steps(qb, e, scale)
        out = dz.gather(-1, fl).mul_(w).add_(z.gather(-1, fl)).flip(-1)
        out[..., out.shape[-1] - n :].masked_fill_(upper, float("-inf"))
        ctx.save_for_backward(qb, kb, e)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        qb, kb, e = ctx.saved_tensors
        npos, n, L, hd = e.shape[-1], qb.shape[-2], kb.shape[-2], qb.shape[-1]
        with torch.autocast(qb.device.type, enabled=False):
            upper = _upper(n, qb.device)
            g, p = _positions(qb, kb, upper)
            grad = grad.to(qb.dtype)
            fl = p.clamp_(max=npos - 1).long()
            w = p.frac_()  # 0 on future keys (no gates there): gw and dp below vanish there
            z, dz = _steps(qb, e, ctx.scale)
            # d_z[m] = sum of grad (1 - w) over entries at fl = m, plus sum of grad w over entries at fl + 1 = m
            gw = grad * w
            d_z = torch.zeros_like(z).scatter_add_(-1, fl[..., : L - n], grad[..., : L - n])
            d_z.scatter_add_(-1, fl[..., L - n :], grad[..., L - n :].masked_fill(upper, 0.0))  # future: no gradient
            b = torch.zeros_like(z).scatter_add_(-1, fl, gw)
            d_z.sub_(b)[..., 1:] += b[..., :-1]
            del gw, b
            dp = dz.gather(-1, fl).mul_(grad).masked_fill_(w == 0, 0.0)  # d/dw = z[ce] - z[fl]
            del fl, w
            dg = dp.cumsum_(-1)  # p_j = sum_{l >= j} g_l: dg_l = sum_{j <= l} dp_j
            dg[..., L - n :].masked_fill_(upper, 0.0)
            ds = dg.mul_(g).mul_(g.neg_().add_(1.0)).mul_(hd**-0.5)  # sigmoid'(s / sqrt(d)) / sqrt(d)
            del g
            d_z.mul_(ctx.scale)
            dq = torch.matmul(ds, kb).add_(torch.matmul(d_z, e.transpose(-1, -2)))
            dk = torch.matmul(ds.transpose(-1, -2), qb)
            de = torch.einsum("bhnd,bhnp->dp", qb, d_z)
        return dq, dk, de, None


class CopeBias(Bias):
    """CoPE's score term for one layer, a block of query rows at a time, exact. Each block needs its rows' q.k
    against all keys up to the block's last row (the positions are sums of gates over keys j..i), so a block's
    buffers are B x H x rows x keys; ``max_block_rows`` keeps one of them near ``block_elements`` floats."""

    masks_future = True  # block() puts -inf on future keys itself
    block_elements = 1 << 24  # floats in one B x H x rows x keys buffer of a block (64 MiB in fp32)

    def __init__(self, k: Tensor, table: Tensor, scale: float):
        self.k, self.table, self.scale = k, table, scale  # (B, H, T, hd); (hd, npos)
        B, H, T, _ = k.shape
        self.max_block_rows = max(16, min(256, self.block_elements // max(1, B * H * T)))

    def block(self, q0: int, q1: int, q: Tensor | None = None) -> Tensor:
        if q is None:
            raise ValueError("cope computes its bias from the queries: call block(q0, q1, q)")
        # fp32 under bf16 autocast too, as the reference's (fp32) positions: gate sums over thousands of keys and
        # their fractional parts would lose their precision in bf16
        with torch.autocast(self.k.device.type, enabled=False):
            return _CopeBlock.apply(q.float(), self.k[:, :, :q1].float(), self.table.float(), self.scale)


@register
class CoPE(PositionalScheme):
    name = "cope"
    acts = ("bias",)
    learned = True
    formula = ("score_ij += q_i . e[p_ij] / sqrt(d), p_ij = sum_{l=j..i} sigmoid(q_i.k_l / sqrt(d)) clamped to "
               "npos - 1, e linearly interpolated between floor and ceil; e (d x npos) learned per layer")
    paper = ("Golovneva, Wang, Weston & Sukhbaatar 2024, 'Contextual position encoding: learning to count what's "
             "important' (arXiv 2405.18719)")
    code = ("facebookresearch/RAM: projects/cope/src/cope/context_position.py (ContextPosSelfAttn), called from "
            "projects/cope/src/models/transformer.py (MultiHeadAttn)")
    used_by = "no widely released LLM (research models; x-transformers has a CoPE module)"
    defaults = {"npos": None, "nodiv": False, "shared": False}
    details = (
        "Contextual positions: a query counts the keys that matter to it. Each head gates every key\n"
        "by its own query, g_ij = sigmoid(q_i.k_j / sqrt(d)), and the position of key j for query i is\n"
        "the sum of the gates from j to i, p_ij = sum_{l=j..i} g_il (so p_ii = g_ii, in (0, 1)); a\n"
        "learned table e of npos vectors (head_dim each) turns a position into a score term\n"
        "q_i.e[p], linearly interpolated between e[floor p] and e[ceil p] (the weight p - floor p\n"
        "carries the gradient, the indices none). No other position information (no RoPE, no\n"
        "embedding), as the reference's pos_emb cope.\n"
        "\nAs the reference (ContextPosSelfAttn, its defaults): gates from the layer's own q and k (no\n"
        "separate key projection), computed on the unmasked q.k / sqrt(d), future keys' gates zeroed by\n"
        "the causal 0/1 mask before the reversed cumulative sum; positions clamped to npos - 1;\n"
        "npos = training length + 1 (the reference's block_size + 1: position 0 is possible), so\n"
        "beyond the training length every count past it reads the last vector. The score is\n"
        "(q.k + q.e[p]) / sqrt(d): the reference adds q.e[p] to the raw q.k and divides both, so the\n"
        "bias added to lenx's q.k/sqrt(d) is q.e[p]/sqrt(d). One table per layer, shared across the\n"
        "layer's heads (the reference's (1, head_dim, npos) parameter broadcast over batch x heads),\n"
        "zero-initialised (CoPE starts as NoPE).\n"
        "\nOptions: npos (null = train_len + 1; else the table's size), nodiv (false; true: the\n"
        "reference's --cope-nodiv, q.k/sqrt(d) + q.e[p], the bias not divided), shared (false; true:\n"
        "the reference's --cope-shared, one table for all layers). Not provided: --cope-sep-key (an\n"
        "extra key projection, an architecture change) and --cope-val-gates (gates from the values,\n"
        "which the bias hook does not receive).\n"
        "\nComputation: exact, per block of query rows: the block's q.k against every key up to its last\n"
        "row, gates, reversed cumulative sum, the two gathers from q @ e (B x H x rows x npos) and the\n"
        "interpolation, in float32 (autocast off). Memory per block B x H x rows x keys (rows chosen so\n"
        "one such buffer is about 2^24 floats, 16 to 256 rows), never L x L x H at once in inference;\n"
        "the backward recomputes a block's gates rather than keeping them. No fused route: the\n"
        "positions depend on every key between j and i, so there is no score_mod, distance table or\n"
        "key term, and attention takes the blocked route (an explicit mask per block) on every backend.\n"
        "\nTraining: the table trains at the model's learning rate without weight decay (the\n"
        "reference's default optimizer is Adam without decay; its AdamW option decays everything)."
    )

    def __init__(self, config):
        super().__init__(config)
        o = self.options
        self.npos = o["npos"] if o["npos"] is not None else self.train_len + 1
        tables = 1 if o["shared"] else self.n_layer
        self.pos_emb = nn.Parameter(torch.empty(tables, self.head_dim, self.npos))
        self.reset_parameters()

    def check_options(self) -> None:
        self.check_option("npos", lambda v: v is None or (is_integer(v) and v >= 1),
                          "null (train_len + 1) or an integer >= 1")
        for key in ("nodiv", "shared"):
            self.check_option(key, lambda v: isinstance(v, bool), "true or false")

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.pos_emb)

    def decays(self, name: str, param: nn.Parameter) -> bool:
        return False

    def bias(self, layer: int, p, x: Tensor | None = None, q: Tensor | None = None, k: Tensor | None = None) -> Bias:
        if k is None:
            raise ValueError("cope computes its bias from the layer's keys: call bias(layer, p, q=..., k=...)")
        table = self.pos_emb[layer if self.pos_emb.shape[0] > 1 else 0]
        return CopeBias(k, table, 1.0 if self.options["nodiv"] else self.head_dim**-0.5)
