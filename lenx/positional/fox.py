import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import register
from .base import Bias, PositionalScheme


class ForgetBias(Bias):
    """b[b, h, i, j] = F[b, h, i] - F[b, h, j] = sum_{l = j+1..i} log f_l, F the cumulative sum of log forget gates.

    Separable (``key_term``: -F_j plus the row's constant F_i, which softmax ignores), so attention keeps the fused
    kernel for inference, adds -F_j per key column in CPU training, and FlexAttention reads it by index."""

    def __init__(self, cum: Tensor):
        self.cum = cum  # (B, H, T) float32

    def block(self, q0: int, q1: int, q: Tensor | None = None) -> Tensor:
        return self.cum[..., q0:q1, None] - self.cum[..., None, :q1]

    def key_term(self) -> tuple[Tensor, Tensor]:
        return torch.ones(self.cum.shape[1], device=self.cum.device), -self.cum

    def score_mod(self):
        cum = self.cum

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + cum[b, h, q_idx] - cum[b, h, kv_idx]

        return score_mod


@register
class ForgettingTransformer(PositionalScheme):
    name = "fox"
    acts = ("bias",)
    learned = True
    formula = "score_ij += sum_{l=j+1..i} log f_l,h; f_t,h = sigmoid(w_h . x_t + b_h) from the layer's input; no positions"
    paper = "Lin, Nikishin, He & Courville 2025, 'Forgetting Transformer: softmax attention with a forget gate' (ICLR)"
    code = "zhixuan-lin/forgetting-transformer: src/forgetting_transformer/model/forgetting_transformer/"
    used_by = "no widely released LLM (research models; x-transformers calls it data-dependent ALiBi)"
    details = (
        "A forget gate per head and token, computed from the attention layer's (normed) input by a\n"
        "linear map with a bias: f_t = sigmoid(w_h . x_t + b_h), one map per layer. The score of query i\n"
        "and key j <= i gets sum_{l=j+1..i} log f_l: a data-dependent, per-head, decaying penalty on the\n"
        "distance (ALiBi when every f is one fixed constant). No other positional information, as the\n"
        "reference's default (no RoPE).\n"
        "\nComputation: log f = logsigmoid(logit) in float32, F = cumulative sum over the sequence, bias\n"
        "F_i - F_j. It is separable (the query's F_i is a constant of its row, which softmax ignores), so\n"
        "attention keeps fused kernels: the key term -F_j folded into one extra q/k dimension (CPU\n"
        "inference), added per key column (CPU training), read by index under FlexAttention (CUDA).\n"
        "\nThe basic FoX only: the 'Pro' block's output gate, QK-norm and key shift are architecture changes\n"
        "beyond the position scheme and are left out, so FoX differs from the other schemes in its score\n"
        "bias alone. Init as the reference's model: weights N(0, 0.02), biases zero (f = 0.5 at the start)."
    )

    def __init__(self, config):
        super().__init__(config)
        self.fgate = nn.ModuleList(nn.Linear(self.d_model, self.n_head, bias=True) for _ in range(self.n_layer))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in self.fgate:
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)

    def bias(self, layer: int, p, x: Tensor | None = None, q: Tensor | None = None, k: Tensor | None = None) -> Bias:
        if x is None:
            raise ValueError("fox computes its bias from the layer's input: call bias(layer, p, x=...)")
        log_f = F.logsigmoid(self.fgate[layer](x).float())  # (B, T, H), float32 as the reference
        return ForgetBias(log_f.cumsum(1).transpose(1, 2))
