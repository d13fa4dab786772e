import torch
from torch import Tensor

from . import register
from .base import PositionalScheme


def sandwich_table(dist: Tensor, d: int, n_head: int) -> Tensor:
    """(H, D) bias over causal distances `dist`, as NeMo's SandwichRelativePositionEmbedding:
    (sum_{k=1..d/2} cos(dist / 10000^(2k/d)) - d/2) / (8 h / H) for head h = 1..H; float64 sums, float32 result."""
    k = torch.arange(1, d // 2 + 1, dtype=torch.float64, device=dist.device)
    inv_freq = 1.0 / 10000 ** (2 * k / d)
    s = torch.cos(dist.to(torch.float64)[:, None] * inv_freq).sum(-1) - d / 2  # (D,), <= 0, 0 at distance 0
    h = torch.arange(1, n_head + 1, dtype=torch.float64, device=dist.device)
    return (s[None, :] / (h[:, None] * 8 / n_head)).float()


@register
class Sandwich(PositionalScheme):
    name = "sandwich"
    acts = ("bias",)
    relative = True
    moved_positions = "distance"  # its bias is a table over distances (lenx.extend reads it at moved ones)
    formula = ("score_ij += (sum_{k=1..d/2} cos((i - j)/10000^(2k/d)) - d/2) / (8h/H); d = head dim, h = 1..H; "
               "nothing learned")
    paper = ("Chi, Fan, Rudnicky & Ramadge 2023, 'Dissecting transformer length extrapolation via the lens of "
             "receptive field analysis' (ACL)")
    code = ("NVIDIA/NeMo: nemo/collections/nlp/modules/common/megatron/position_embedding/"
            "sandwich_relative_position_embedding.py")
    used_by = "no widely released LLM (research models; NeMo's position_embedding_type: sandwich, experimental)"
    details = (
        "The inner product of two sinusoidal position vectors, p_i . p_j = sum_k cos((i - j) w_k), is\n"
        "a function of i - j alone; Sandwich keeps only that term (no position vector is added to the\n"
        "embeddings or to q and k) as a fixed score bias, shifted to be 0 at distance 0 and scaled per\n"
        "head as ALiBi's slopes are. Parameter-free; one bias for all layers.\n"
        "\nFormula, exactly as the reference (NeMo, the only implementation found; the authors' code\n"
        "was not found): b_h(i - j) = (S(i - j) - d/2) / (8h/H) for heads h = 1..H, with\n"
        "S(m) = sum_{k=1..d/2} cos(m / 10000^(2k/d)). d is the head dimension (NeMo passes\n"
        "hidden_size // num_attention_heads, or kv_channels when set), not the model width. k runs\n"
        "from 1 to d/2 as in NeMo's arange(1, d/2 + 1): the frequencies are 10000^(-2/d) ..\n"
        "10000^(-1), one step lower than the embedding table's 10000^(-2k/d), k = 0 .. d/2 - 1 (the\n"
        "frequency 1 is absent). Sign: S(m) <= d/2, so b_h <= 0, a penalty, 0 at distance 0, bounded\n"
        "by -d H / (8h) and flattening out (log-like) with distance rather than growing as ALiBi's.\n"
        "Heads: divided by 8h/H, the paper's ALiBi notation (its figure 1: h = n 8/H, n = 1..H):\n"
        "head 1 gets the strongest bias, H/8 x the unscaled one. The bias is added to q.k/sqrt(d), as\n"
        "NeMo adds it to the scaled scores. Causal: NeMo builds |i - j| and, for causal attention,\n"
        "zeroes the future (tril) before the causal mask; here only distances i - j >= 0 are built.\n"
        "The table is summed in float64 from the integer distances, then float32.\n"
        "\nPaper vs. NeMo: the paper's section on Sandwich could not be read here (only its opening\n"
        "was reachable); REFERENCE.md states the same formula (sum_k cos((i - j)/10000^(2k/d)) - d/2,\n"
        "scaled per head), and no difference from NeMo is known. A relative distance table: every fast\n"
        "route (stored training route, blocked Toeplitz, flex) applies; memory linear in L."
    )

    def __init__(self, config):
        super().__init__(config)
        if self.head_dim % 2:
            from ..errors import LenxError

            raise LenxError("sandwich needs an even head dimension (sin/cos pairs), "
                            f"got d_model / n_head = {self.head_dim}")

    def distance_bias(self, layer: int, dist: Tensor) -> Tensor:
        return sandwich_table(dist, self.head_dim, self.n_head)
