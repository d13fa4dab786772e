import torch
from torch import Tensor, nn

from . import register
from .base import Bias, PositionalScheme, contiguous_positions, is_integer, is_number


class FireBias(Bias):
    """b[h, i, j] = f(psi(i - j) / psi(max(L, i))) for one layer, built a block of query rows at a time.

    Contiguous positions (pos = p0 + arange) take two exact shortcuts, both differentiable:

    - every position below the threshold L: the normaliser is psi(L) for all rows, so the bias is relative and
      ``toeplitz_table`` gives it from one MLP call over distances;
    - otherwise ``block`` uses that f is piecewise linear (ReLU): see ``_fast_block``.

    Other positions run the MLP on every (query, key) pair (``direct_block``).
    """

    max_block_rows = 256  # a block's buffer is H x rows x (keys + rows) floats
    rows = 64  # query rows per MLP call in direct_block: its hidden layer (rows x keys x width) is the memory peak
    correction_elements = 1 << 20  # (unit, row, column) triples per correction chunk in _fast_block

    def __init__(self, scheme: "FIRE", pos: Tensor):
        self.scheme, self.pos = scheme, pos
        self.contiguous = contiguous_positions(pos)
        self.masks_future = self.contiguous  # _fast_block's layout puts -inf on future keys; direct_block leaves them
        self._parts = None  # per-layer pieces of _fast_block, built on its first call
        self._buffer = None  # inference: the storage that every block of this layer reuses

    def direct_block(self, q0: int, q1: int) -> Tensor:
        """The MLP on every (query, key) pair, future keys included: the reference for ``block``."""
        parts = []
        for r0 in range(q0, q1, self.rows):
            x = self.scheme.normalized_distance(self.pos[r0 : min(r0 + self.rows, q1)], self.pos[:q1])
            parts.append(self.scheme.f(x))
        return torch.cat(parts).permute(2, 0, 1).unsqueeze(0)

    def block(self, q0: int, q1: int, q: Tensor | None = None) -> Tensor:
        # fp32 under bf16 autocast too: the MLP's bias enters the scores as a float32 mask, and its running sums and
        # corrections would mix dtypes (and lose the bias's precision) if autocast ran its matmuls in bf16
        with torch.autocast(self.pos.device.type, enabled=False):
            return self._fast_block(q0, q1) if self.contiguous else self.direct_block(q0, q1)

    def toeplitz_table(self) -> Tensor | None:
        s, T = self.scheme, self.pos.numel()
        # Strictly below L: at a position equal to L, max(L, i) would share its gradient between L and i.
        if not self.contiguous or T == 0 or self.pos.max().item() >= s.threshold().item():
            return None
        dist = torch.arange(T, device=self.pos.device, dtype=torch.float32)
        with torch.autocast(self.pos.device.type, enabled=False):  # as `block`: the table in fp32
            return s.f((s.psi(dist) / (s.psi(s.threshold()) + s.options["eps"]))[:, None]).T

    def _fast_block(self, q0: int, q1: int) -> Tensor:
        """The block as a strided view of a buffer G (H, n, S) laid out by distance, n = q1 - q0, S = q1 + n - 1:
        G[h, r, m'] is the bias of query row r = i - q0 at distance m = q1 - 1 - m' (m' < q1), -inf for m' >= q1.
        Element [r, j] of the view reads m' = n - 1 - r + j, i.e. distance i - j, and -inf for j > i.

        With pre_k = w1_k x + b1_k and a_k = [pre_k > 0], f_h(x) = x C_h + D_h where C_h = sum_k W2_hk w1_k a_k and
        D_h = b2_h + sum_k W2_hk b1_k a_k. Here x = psi(m) rinv_r, rinv_r = 1 / (psi(max(L, pos_r)) + eps), which at
        a fixed m is monotone in r, and so is each pre_k: a unit has the same activity in every row of a column
        where its first and last rows agree. One broadcast pass writes the block with the first row's activities;
        the columns where some unit switches within the block (for each unit one range, as pre_k is monotone in m
        too) then get the exact correction sum_k W2_hk pre_k ([pre_k > 0] - a_k).
        In inference the buffer is reused from block to block: a block is valid until the next call.
        """
        s = self.scheme
        W2, b2 = s.f[2].weight, s.f[2].bias
        if self._parts is None:
            T, eps = self.pos.numel(), s.options["eps"]
            w1, b1 = s.f[0].weight[:, 0], s.f[0].bias
            psi = s.psi(torch.arange(T, device=self.pos.device, dtype=torch.float32))  # by distance, non-decreasing
            rinv = 1 / (s.psi(torch.maximum(self.pos.float(), s.threshold())) + eps)  # (T,), non-increasing
            self._parts = psi, psi.flip(0), rinv, w1, b1, torch.cat([W2 * w1, W2 * b1]).T  # last: (W, 2H)
        psi_up, psi_all, rinv_all, w1, b1, M = self._parts
        T, H, n, dev = rinv_all.numel(), W2.shape[0], q1 - q0, rinv_all.device
        S = q1 + n - 1
        psi, rinv = psi_all[T - q1 :], rinv_all[q0:q1]  # (q1,) by column m' (distance q1 - 1 - m'); (n,) by row

        # Unit k is active where w1_k psi(m) rinv_r + b1_k > 0: on one side of psi(m) = tau_k,r = -b1_k / (w1_k rinv_r),
        # i.e. on columns [0, e) (w1 > 0: large distances) or [e, q1) (w1 < 0) with e from a binary search.
        with torch.no_grad():
            tau = -b1[:, None] / (w1[:, None] * rinv[[0, -1]])  # (W, 2); w1 = 0: +-inf or nan
            e = torch.where(w1[:, None] > 0, q1 - torch.searchsorted(psi_up[:q1], tau, right=True),
                            torch.searchsorted(psi_up[:q1], tau, right=False).neg_().add_(q1))
            e = torch.where(w1[:, None] == 0, torch.where(b1[:, None] > 0, q1, 0), e).tolist()  # all or no columns
        lo = [0 if wk > 0 else ek[0] for wk, ek in zip(w1.tolist(), e)]  # the first row's active columns [lo, hi)
        hi = [ek[0] if wk > 0 else q1 for wk, ek in zip(w1.tolist(), e)]
        # C and D (2H, q1) from the first row's activities: a running sum over columns of each unit's entry and exit
        step = torch.zeros(q1 + 1, 2 * H, device=dev, dtype=M.dtype)
        step.index_add_(0, torch.tensor(lo + hi, device=dev), torch.cat([M, -M]))
        CD = step[:q1].cumsum(0).T
        C, D = CD[:H], CD[H:] + b2[:, None]
        windows = sorted((max(min(ek) - 1, 0), min(max(ek) + 1, q1), k) for k, ek in enumerate(e) if ek[0] != ek[1])

        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (CD, psi, rinv))
        if grad:  # autograd may keep the block: a fresh buffer, and no out= (it does not take autograd)
            G = torch.empty(H, n, S, device=dev, dtype=C.dtype)
            G[:, :, :q1] = torch.addcmul(D[:, None, :], rinv[None, :, None], (psi * C)[:, None, :])
        else:
            if self._buffer is None or self._buffer.numel() < H * n * S:
                self._buffer = torch.empty(H * n * (T + n - 1), device=dev, dtype=C.dtype)
            G = self._buffer[: H * n * S].view(H, n, S)
            torch.addcmul(D[:, None, :], rinv[None, :, None], (psi * C)[:, None, :], out=G[:, :, :q1])
        G[:, :, q1:] = float("-inf")

        if windows:
            units = sorted({k for _, _, k in windows})
            cols, end = [], -1  # the union of the windows
            for c0, c1, _ in windows:
                cols.extend(range(max(c0, end), c1))
                end = max(end, c1)
            cols, first = torch.tensor(cols, device=dev), torch.tensor([[lo[k], hi[k]] for k in units], device=dev)
            units = torch.tensor(units, device=dev)
            # every listed unit is corrected on every union column: outside its own window the correction is zero
            chunk = max(1, self.correction_elements // (len(units) * n))
            for i in range(0, len(cols), chunk):
                c = cols[i : i + chunk]
                ref = ((c >= first[:, :1]) & (c < first[:, 1:])).to(psi.dtype)[:, None, :]  # (U, 1, c)
                pre = w1[units, None, None] * (psi[c] * rinv[:, None])[None] + b1[units, None, None]  # (U, n, c)
                corr = pre * ((pre > 0).to(pre.dtype) - ref)
                G.index_add_(2, c, (W2[:, units] @ corr.flatten(1)).view(H, n, len(c)))
        return G.as_strided((1, H, n, q1), (0, n * S, S - 1, 1), G.storage_offset() + n - 1)


@register
class FIRE(PositionalScheme):
    name = "fire"
    acts = ("bias",)
    learned = True
    formula = "score_ij += f(psi(i - j) / psi(max(L, i))), psi(x) = log(c*x + 1); f an MLP 1 -> 32 -> H; c, L learned"
    paper = ("Li et al. 2024, 'Functional interpolation for relative positions improves long context transformers' "
             "(ICLR)")
    used_by = "no widely released LLM (research models)"
    defaults = {"mlp_width": 32, "init_c": 0.1, "eps": 1e-6}
    details = (
        "A learned function of the distance, normalised by the query's position ('progressive\n"
        "interpolation'): the MLP's input psi(i - j)/psi(max(L, i)) stays in [0, 1], the range seen\n"
        "in training, at every length; psi(x) = log(|c*x| + 1) spreads out the local distances. Not\n"
        "relative: above the threshold L the normaliser grows with the query position i.\n"
        "\nAs the paper's reference listing: |c| and L = |m * L0| with m learned (init 1) and L0 the\n"
        "training length; init_c = 0.1; eps = 1e-6 added to the denominator; PyTorch's default init\n"
        "for the MLP. One f, c and m for all layers (believed to be the paper's choice; not verified\n"
        "against its text)."
    )

    def __init__(self, config):
        super().__init__(config)
        width = self.options["mlp_width"]
        self.f = nn.Sequential(nn.Linear(1, width), nn.ReLU(), nn.Linear(width, self.n_head))
        self.c = nn.Parameter(torch.empty(()))
        self.L_mult = nn.Parameter(torch.empty(()))
        self.reset_parameters()

    def check_options(self) -> None:
        self.check_option("mlp_width", lambda v: is_integer(v) and v >= 1, "an integer >= 1")
        # psi(x) = log(|c x| + 1): c = 0 makes psi zero with no gradient to leave it (|c| has none at 0), and the
        # reference listing starts c positive (0.1); eps keeps psi(max(L, i)) + eps away from zero
        self.check_option("init_c", lambda v: is_number(v) and v > 0, "a positive number")
        self.check_option("eps", lambda v: is_number(v) and v > 0, "a positive number")

    def reset_parameters(self) -> None:
        for layer in (self.f[0], self.f[2]):
            layer.reset_parameters()
        nn.init.constant_(self.c, self.options["init_c"])
        nn.init.ones_(self.L_mult)

    def psi(self, x: Tensor) -> Tensor:
        return torch.log((self.c * x).abs() + 1)

    def threshold(self) -> Tensor:
        return (self.L_mult * self.train_len).abs()

    def normalized_distance(self, qpos: Tensor, kpos: Tensor) -> Tensor:
        """(nq, nk, 1) inputs of f for query positions qpos and key positions kpos."""
        qpos, kpos = qpos.float(), kpos.float()
        normaliser = self.psi(torch.maximum(qpos, self.threshold()))[:, None] + self.options["eps"]
        return (self.psi(qpos[:, None] - kpos[None, :]) / normaliser)[..., None]

    def bias(self, layer: int, p, x=None, q=None, k=None) -> Bias:
        pos = self.positions(p).pos
        return FireBias(self, pos)
