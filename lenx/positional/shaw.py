import torch
from torch import Tensor, nn

from . import register
from .base import Bias, PositionalScheme, contiguous_positions, is_integer


class ShawBias(Bias):
    """Shaw et al.'s two terms for one layer, a block of query rows at a time.

    Score:  q_i . a^K_r / sqrt(d), r = clip(i - j) in 0..k: q @ A_K^T is (B, H, rows, k+1), gathered to
            (B, H, rows, keys), so memory is block x L, never L x L x d.
    Output: sum_j alpha_ij a^V_r = sum_r (sum_{j: r_ij = r} alpha_ij) a^V_r: probabilities summed per
            clipped distance, then times A_V.
    """

    needs_probs = True

    def __init__(self, a_k: Tensor, a_v: Tensor, pos: Tensor):
        self.a_k, self.a_v, self.pos = a_k, a_v, pos
        self.contiguous = contiguous_positions(pos)

    def rel(self, q0: int, q1: int) -> Tensor:
        return (self.pos[q0:q1, None] - self.pos[None, :q1]).clamp(0, len(self.a_k) - 1)

    def block(self, q0: int, q1: int, q: Tensor | None = None) -> Tensor:
        qa = (q.float() @ self.a_k.float().T) * q.shape[-1] ** -0.5
        return qa.gather(-1, self.rel(q0, q1).expand(*qa.shape[:-1], -1))

    def clipped_kv(self) -> tuple[Tensor, Tensor] | None:
        return (self.a_k, self.a_v) if self.contiguous else None

    def value(self, q0: int, q1: int, probs: Tensor) -> Tensor:
        idx = self.rel(q0, q1).expand_as(probs)
        w = probs.new_zeros(*probs.shape[:-1], len(self.a_v)).scatter_add_(-1, idx, probs)
        return w @ self.a_v.to(probs.dtype)


@register
class Shaw(PositionalScheme):
    name = "shaw"
    acts = ("bias",)
    relative = True
    learned = True
    formula = "e_ij = q_i.(k_j + a^K_r)/sqrt(d), z_i = sum_j alpha_ij (v_j + a^V_r), r = clip(j - i, -k, k); a learned"
    paper = "Shaw, Uszkoreit & Vaswani 2018, 'Self-attention with relative position representations' (NAACL)"
    used_by = "Music Transformer (a variant); no widely released LLM"
    defaults = {"k": 16}
    details = (
        "Learned relative position vectors added to the keys (a^K) and to the values (a^V), indexed\n"
        "by the clipped offset r = clip(j - i, -k, k); k = 16 by default (the paper's own value is not\n"
        "verified here: its ablation reports no gain past k >= 2; tensor2tensor uses 20). Per layer, shared across\n"
        "heads, each of size head_dim, as in the paper. A causal decoder only sees r = -k..0, so lenx\n"
        "keeps those k + 1 vectors per layer and kind; all distances beyond k share a^K_-k and\n"
        "a^V_-k.\n"
        "\nThe key term enters the scores as q_i.a^K/sqrt(d) (attention adds biases to q.k/sqrt(d)):\n"
        "content-dependent. Past the clip both terms are the same for every key (a per-row score\n"
        "constant and one value vector), so attention runs the fused kernel for keys at distance >= k\n"
        "and a band of k explicit scores for the nearest ones, joined by their log-sum-exp (CPU, fp32;\n"
        "elsewhere an explicit softmax per block of queries). Init: N(0, 0.02), like the token\n"
        "embeddings (the paper states none)."
    )

    def __init__(self, config):
        super().__init__(config)
        self.a_k = nn.Parameter(torch.empty(self.n_layer, self.options["k"] + 1, self.head_dim))
        self.a_v = nn.Parameter(torch.empty(self.n_layer, self.options["k"] + 1, self.head_dim))
        self.reset_parameters()

    def check_options(self) -> None:
        self.check_option("k", lambda v: is_integer(v) and v >= 1, "an integer >= 1")

    def reset_parameters(self) -> None:
        nn.init.normal_(self.a_k, std=0.02)
        nn.init.normal_(self.a_v, std=0.02)

    def decays(self, name: str, param) -> bool:
        return False  # tensor2tensor's transformer hparams (the paper's code base) train with weight_decay 0

    def bias(self, layer: int, p, x=None, q=None, k=None) -> Bias:
        pos = self.positions(p).pos
        return ShawBias(self.a_k[layer], self.a_v[layer], pos)
