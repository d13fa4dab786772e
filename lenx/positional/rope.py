import torch
from torch import Tensor

from . import register
from .base import PositionalScheme


def rope_inv_freq(head_dim: int, base: float = 10000.0) -> Tensor:
    """theta_k = base^(-2k/d), k = 0 .. d/2 - 1 (float64 for exactness, cast by the caller)."""
    # explicit device: schemes may be built under transformers' meta-device context
    return base ** -(torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim)


def apply_rotation(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each pair (2k, 2k+1) of the last dimension by the angle whose cos/sin are given (T, d/2)."""
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
    return out.to(x.dtype)


@register
class RoPE(PositionalScheme):
    name = "rope"
    acts = ("qk",)
    relative = True
    formula = "rotate pair k of q_m by m*theta_k and of k_n by n*theta_k, theta_k = 10000^(-2k/d)"
    paper = "Su et al. 2021, 'RoFormer: enhanced transformer with rotary position embedding'"
    used_by = "LLaMA 1-3, PaLM, GPT-NeoX/Pythia, GPT-J, Qwen, Mistral, Falcon, Gemma"
    defaults = {"base": 10000.0}
    details = (
        "Queries and keys are rotated, pair by pair, by an angle proportional to their position.\n"
        "Why the score depends only on the offset: write pair k of q as the complex number\n"
        "q_k = q[2k] + i*q[2k+1]. Rotation at position m multiplies it by e^(i*m*theta_k). The real\n"
        "dot product of two pairs is Re(q_k * conj(k_k)), so\n"
        "  <R_m q, R_n k> = sum_k Re(q_k e^(i m theta_k) * conj(k_k e^(i n theta_k)))\n"
        "                 = sum_k Re(q_k conj(k_k) e^(i (m - n) theta_k)),\n"
        "a function of q, k and m - n only: R_m^T R_n = R_(n-m), rotations compose by adding angles."
    )

    def __init__(self, config):
        super().__init__(config)
        self._cache: dict = {}
        self.set_eval_scaling("none")

    def set_eval_scaling(self, method: str = "none", factor: float | None = None) -> None:
        if method not in ("none", None):
            super().set_eval_scaling(method, factor)
        self.inv_freq = rope_inv_freq(self.head_dim, self.options["base"])
        self._cache.clear()

    def cos_sin(self, pos: Tensor) -> tuple[Tensor, Tensor]:
        """cos and sin of pos * theta, (T, d/2) in float32; tables are cached across steps."""
        n = int(pos.max()) + 1
        key = (pos.device, n)
        if key not in self._cache:
            self._cache.clear()
            angle = torch.arange(n, dtype=torch.float64, device="cpu")[:, None] * self.inv_freq[None, :]
            self._cache[key] = (angle.cos().float().to(pos.device), angle.sin().float().to(pos.device))
        cos, sin = self._cache[key]
        return cos[pos], sin[pos]

    def rotate(self, q: Tensor, k: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        cos, sin = self.cos_sin(pos)
        return apply_rotation(q, cos, sin), apply_rotation(k, cos, sin)
