import torch
from torch import Tensor, nn

from ..errors import LengthNotSupported
from . import register
from .base import PositionalScheme


@register
class LearnedAbsolute(PositionalScheme):
    name = "learned"
    acts = ("embedding",)
    learned = True
    formula = "x = E[tok] + P[pos], P a trained (L x d) table; no vector exists past L"
    paper = "Gehring et al. 2017 (ConvS2S); Radford et al. 2018/2019 (GPT, GPT-2); Devlin et al. 2019 (BERT)"
    used_by = "GPT-2, GPT-3, OPT, BERT"
    details = (
        "A table of train_len learned vectors, one per position, added to the token embeddings.\n"
        "It has nothing to say about positions >= train_len: evaluating there is reported as\n"
        "'not representable', never clamped. Trained with random positions (`lenx train\n"
        "--random-positions N`, Ruoss et al. 2023's NOISY_LEARNT) the table has N rows, one per\n"
        "position training can draw, and evaluation reaches N.\n"
        "\nInit N(0, 0.02), like the token embeddings: GPT-1's and BERT's (truncated) position tables and\n"
        "transformers' GPT-2 (OpenAI's released GPT-2 code draws its wpe from N(0, 0.01))."
    )

    def __init__(self, config):
        super().__init__(config)
        # random positions: a row for every position of [0, N) that training draws (config.train_positions)
        self.max_len = getattr(config, "train_positions", None) or config.train_len
        self.table = nn.Parameter(torch.empty(self.max_len, config.d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.table, std=0.02)

    def embed(self, x: Tensor, p) -> Tensor:
        pos = self.positions(p).pos
        if not torch.compiler.is_compiling() and int(pos.max()) >= self.max_len:  # compiled: indexing checks it
            raise LengthNotSupported(f"learned positions end at {self.max_len}; position {int(pos.max())} has no vector")
        return x + self.table[pos].to(x.dtype)
