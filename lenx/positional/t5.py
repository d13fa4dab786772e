import math

import torch
from torch import Tensor, nn

from . import register
from .base import PositionalScheme, is_integer


def t5_bucket(dist: Tensor, num_buckets: int = 32, max_distance: int = 128) -> Tensor:
    """Causal T5 bucket of distance i - j >= 0 (HF `_relative_position_bucket`, bidirectional=False):
    half the buckets exact, the rest logarithmic up to max_distance, then all in the last bucket."""
    max_exact = num_buckets // 2
    # same float32 ops as transformers, so bucket edges agree exactly; clamp only avoids log(0) in discarded rows
    large = max_exact + (
        torch.log(dist.clamp(min=max_exact).float() / max_exact) / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).long()
    return torch.where(dist < max_exact, dist, large.clamp(max=num_buckets - 1))


@register
class T5Bias(PositionalScheme):
    name = "t5"
    acts = ("bias",)
    relative = True
    moved_positions = "distance"  # its bias is a table over distances (lenx.extend reads it at moved ones)
    learned = True
    formula = "score_ij += B[bucket(i - j), h]; 32 buckets: 16 exact, then log-spaced to 128, one learned scalar each"
    paper = ("Raffel et al. 2020, 'Exploring the limits of transfer learning with a unified text-to-text transformer' "
             "(JMLR)")
    used_by = "T5, mT5, Flan-T5, UL2"
    defaults = {"num_buckets": 32, "max_distance": 128, "shared": True, "init": "normal"}
    details = (
        "A learned scalar per (bucket of the distance i - j, head) added to the attention scores.\n"
        "Causal bucketing (HF bidirectional=False): distances 0..15 get a bucket each, larger ones\n"
        "16 log-spaced buckets up to max_distance = 128; the last bucket holds every distance from\n"
        "113 on (128 and beyond included), so the bias is constant past 112 at any evaluation length.\n"
        "\nshared: true (the default, as in HF T5, where the first layer computes the bias and every\n"
        "layer reuses it): one table for all layers; shared: false: one table per layer.\n"
        "\ninit: normal (the default, HF T5's N(0, d_model^-0.5)) or zero (the table starts as NoPE;\n"
        "REFERENCE.md notes how slowly it then moves). The table trains at the model's learning rate\n"
        "without weight decay, as in T5 (Adafactor, no decay) and transformers' Trainer (which exempts\n"
        "parameters named *bias*). The bias is a per-head table over distances: memory linear in L."
    )

    def __init__(self, config):
        super().__init__(config)
        tables = 1 if self.options["shared"] else self.n_layer
        self.table = nn.Parameter(torch.empty(tables, self.options["num_buckets"], self.n_head))
        self.reset_parameters()

    def check_options(self) -> None:
        # t5_bucket needs num_buckets // 2 >= 1 exact buckets and max_distance above them (a positive log of the ratio)
        self.check_option("num_buckets", lambda v: is_integer(v) and v >= 2, "an integer >= 2")
        exact = self.options["num_buckets"] // 2
        self.check_option("max_distance", lambda v: is_integer(v) and v > exact,
                          f"an integer above num_buckets // 2 = {exact}")
        self.check_option("shared", lambda v: isinstance(v, bool), "true or false")
        self.check_option("init", lambda v: isinstance(v, str) and v in ("normal", "zero"), "'normal' or 'zero'")

    def reset_parameters(self) -> None:
        if self.options["init"] == "zero":
            nn.init.zeros_(self.table)
        else:
            nn.init.normal_(self.table, std=self.d_model**-0.5)

    def decays(self, name: str, param) -> bool:
        # the original T5 trains with Adafactor and no weight decay; transformers' Trainer exempts every parameter
        # whose name contains "bias" (relative_attention_bias.weight included) from decay
        return False

    def distance_bias(self, layer: int, dist: Tensor) -> Tensor:
        buckets = t5_bucket(dist, self.options["num_buckets"], self.options["max_distance"])
        return self.table[layer if len(self.table) > 1 else 0][buckets].T.float()
