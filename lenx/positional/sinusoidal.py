import math

import torch
from torch import Tensor

from . import register
from .base import PositionalScheme, is_number


def sinusoid_table(pos: Tensor, d_model: int, base: float = 10000.0) -> Tensor:
    """PE(pos, 2k) = sin(pos / base^(2k/d)), PE(pos, 2k+1) = cos(pos / base^(2k/d)); shape (T, d)."""
    k2 = torch.arange(0, d_model, 2, dtype=torch.float64, device=pos.device)
    angle = pos.to(torch.float64)[:, None] / base ** (k2 / d_model)
    pe = torch.empty(len(pos), d_model, dtype=torch.float64, device=pos.device)
    pe[:, 0::2] = torch.sin(angle)
    pe[:, 1::2] = torch.cos(angle[:, : d_model // 2])
    return pe.float()


@register
class Sinusoidal(PositionalScheme):
    name = "sinusoidal"
    acts = ("embedding",)
    formula = "x = sqrt(d)*E[tok] + PE(pos), E ~ N(0, 1/d); PE(pos,2k) = sin(pos/10000^(2k/d)), PE(pos,2k+1) = cos(...)"
    paper = "Vaswani et al. 2017, 'Attention is all you need' (section 3.5)"
    used_by = "the original Transformer, fairseq transformer_lm (the ALiBi paper's baseline)"
    defaults = {"base": 10000.0, "embed_init": "fairseq"}
    details = (
        "A fixed vector per position, added to the token embeddings. As in Vaswani et al. and fairseq\n"
        "(the ALiBi paper's sinusoidal baseline), token embeddings are drawn N(0, d^-0.5) and multiplied\n"
        "by sqrt(d_model) before the code is added, so tokens and positions have one scale (embed_init:\n"
        "fairseq, the default); embed_init: model keeps the model's N(0, 0.02) for the (tied) token\n"
        "embeddings, where the sinusoid outweighs the tokens. Measured (configs/quick.yaml's model, two\n"
        "seeds): fairseq's init gives ppl 9.99 and 9.79 at 1x and 1.35, 1.74 times that at 16x; the model's\n"
        "gives 10.23 and 9.99, and 2.32, 3.47 (docs/schemes.md).\n"
        "\nThe table is the paper's (section 3.5): sin and cos interleaved (dimensions 2k, 2k+1),\n"
        "frequencies 10000^(-2k/d), positions from 0. fairseq's SinusoidalPositionalEmbedding (the\n"
        "ALiBi paper's baseline) and tensor2tensor differ slightly, as fairseq's docstring says: all\n"
        "sines, then all cosines (a fixed permutation of the dimensions, which learned projections\n"
        "absorb), frequencies 10000^(-k/(d/2 - 1)), and fairseq counts positions from padding_idx + 1."
    )

    def check_options(self) -> None:
        self.check_option("base", lambda v: is_number(v) and v > 1, "a number above 1")
        self.check_option("embed_init", lambda v: v in ("model", "fairseq"), "'model' or 'fairseq'")

    def token_embedding_std(self, std: float) -> float:
        return self.d_model**-0.5 if self.options["embed_init"] == "fairseq" else std

    def embed(self, x: Tensor, p) -> Tensor:
        pos = self.positions(p).pos
        pe = sinusoid_table(pos, self.d_model, self.options["base"]).to(x.dtype)
        return x * math.sqrt(self.d_model) + pe
