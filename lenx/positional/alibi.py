import math

import torch
from torch import Tensor

from . import register
from .base import LinearBias, PositionalScheme


def alibi_slopes(n: int) -> list[float]:
    """Head slopes exactly as the ALiBi paper's code (ofirpress/attention_with_linear_biases)."""

    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + alibi_slopes(2 * closest)[0::2][: n - closest]


@register
class ALiBi(PositionalScheme):
    name = "alibi"
    acts = ("bias",)
    relative = True
    moved_positions = "distance"  # its bias is a table over distances (lenx.extend reads it at moved ones)
    formula = "score_ij = q_i.k_j/sqrt(d) - m_h*(i - j); fixed slopes m_h = 2^(-8h/H)"
    paper = "Press et al. 2022, 'Train short, test long: attention with linear biases' (ICLR)"
    used_by = "BLOOM, MPT, Baichuan-13B, some Falcon variants"
    details = (
        "No position vector anywhere. Each head adds a fixed linear penalty -m_h*(i - j) to its\n"
        "attention scores; nothing is learned, projected or multiplied. Slopes form a geometric\n"
        "sequence starting at 2^(-8/H); for H not a power of two, the paper's code takes the\n"
        "closest lower power of two, then every other slope of twice that many heads."
    )

    def __init__(self, config):
        super().__init__(config)
        self.slopes = alibi_slopes(self.n_head)

    def bias(self, layer: int, p, x=None, q=None, k=None) -> LinearBias:
        pos = self.positions(p).pos
        # a TableBias over distances, -m_h * (i - j), that also declares itself separable
        return LinearBias(torch.tensor(self.slopes, dtype=torch.float32), pos)
