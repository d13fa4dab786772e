import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import register
from .base import PositionalScheme, is_number

TWO_PI = 2.0 * math.pi


@register
class PoPE(PositionalScheme):
    name = "pope"
    acts = ("qk",)
    relative = True
    learned = True
    formula = ("score = sum_c softplus(q_c) softplus(k_c) cos((m - n) theta_c - delta_c) / sqrt(d); "
               "theta_c = 10000^(-c/d), c < d; delta in [-2pi, 0] learned")
    paper = ("Gopalakrishnan, Csordas, Schmidhuber & Mozer 2025, 'Decoupling the \"What\" and \"Where\" with polar "
             "coordinate positional embeddings' (arXiv 2509.10534)")
    code = ("lucidrains/x-transformers: x_transformers/x_transformers.py (PolarEmbedding, apply_polar_pos_emb); "
            "lucidrains/PoPE-pytorch: PoPE_pytorch/pope.py")
    used_by = "no widely released LLM (research models; x-transformers' polar_pos_emb, lucidrains' PoPE-pytorch)"
    defaults = {"base": 10000.0, "delta_init": "zero", "shared": True}
    details = (
        "Polar coordinates for queries and keys: each of the d channels of a head is one complex number\n"
        "whose magnitude is softplus of the channel (the 'what', never negative, so content cannot turn\n"
        "the phase) and whose phase is position times a frequency (the 'where'): query channel c at\n"
        "position m is softplus(q_c) e^(i m theta_c), key channel c at position n is\n"
        "softplus(k_c) e^(i (n theta_c + delta_c)), and the score is the real part of their Hermitian\n"
        "product, sum_c softplus(q_c) softplus(k_c) cos((m - n) theta_c - delta_c), over sqrt(d): a\n"
        "function of m - n only. d frequencies, one per channel (RoPE has d/2, one per pair):\n"
        "theta_c = base^(-c/d), c = 0 .. d - 1, base = 10000. delta: a learned phase on the keys, one\n"
        "per head and channel, clamped to [-2pi, 0] where it is used (a clamp, as the references: a\n"
        "value pushed past a bound gets no gradient and acts as the bound).\n"
        "\nComputation (as the references): q' = [softplus(q) cos(m theta), softplus(q) sin(m theta)] and\n"
        "k' = [softplus(k) cos(n theta + delta), softplus(k) sin(n theta + delta)], so that q'.k' is the\n"
        "score and every attention route serves it unchanged; q and k are 2d wide, values keep d. The\n"
        "references scale by 1/sqrt(d) of the head, not of the doubled width (PoPE-pytorch's\n"
        "softmax_scale from q before doubling; x-transformers passes dim_head^-0.5 to Attend): lenx's\n"
        "attention divides by sqrt(q'.shape[-1]) = sqrt(2d), so q' carries a factor sqrt(2). cos and\n"
        "sin of m theta come from float64 angles once per forward; the key's phase adds delta by the\n"
        "angle-sum identity. Softplus and the products in float32, cast back to the model's dtype.\n"
        "Cost: scores over 2d channels (twice RoPE's q.k work).\n"
        "\nOptions: shared: true (the default, as x-transformers, which builds one PolarEmbedding for all\n"
        "layers): one delta (H, d) for the whole model; false: one per layer (PoPE-pytorch's module is\n"
        "one (heads, dim) delta, placed by its user). delta_init: zero (the default of both references)\n"
        "or uniform, U(-2pi, 0) (their bias_uniform_init). base: the frequencies' base.\n"
        "\ndelta trains at the model's learning rate without weight decay: a phase, not a matrix (the\n"
        "references' training scripts use Adam without decay on anything).\n"
        "Official code: not found (searched stored pages, docs and code; a third-party note names\n"
        "agopal42/pope, which no search or fetch here could reach); the two lucidrains implementations,\n"
        "which agree on every point above, are the reference."
    )

    def __init__(self, config):
        super().__init__(config)
        deltas = 1 if self.options["shared"] else self.n_layer
        self.delta = nn.Parameter(torch.empty(deltas, self.n_head, self.head_dim))
        self.reset_parameters()

    def check_options(self) -> None:
        self.check_option("base", lambda v: is_number(v) and v > 1, "a number above 1")
        self.check_option("delta_init", lambda v: isinstance(v, str) and v in ("zero", "uniform"),
                          "'zero' or 'uniform'")
        self.check_option("shared", lambda v: isinstance(v, bool), "true or false")

    def reset_parameters(self) -> None:
        if self.options["delta_init"] == "uniform":
            nn.init.uniform_(self.delta, -TWO_PI, 0.0)
        else:
            nn.init.zeros_(self.delta)

    def decays(self, name: str, param: nn.Parameter) -> bool:
        return False

    def frequencies(self, device=None) -> Tensor:
        """theta_c = base^(-c/d), c = 0 .. d - 1 (float64)."""
        d = self.head_dim
        return self.options["base"] ** -(torch.arange(d, dtype=torch.float64, device=device) / d)

    def prepare(self, pos: Tensor) -> tuple[Tensor, Tensor]:
        """cos and sin of pos * theta, (T, d) float32 each, from float64 angles (exact at long positions)."""
        angle = pos.double()[:, None] * self.frequencies(pos.device)[None, :]
        return angle.cos().float(), angle.sin().float()

    def phase(self, layer: int) -> Tensor:
        """delta of this layer, clamped to [-2pi, 0] as the references do in their forward: (H, d) float32."""
        return self.delta[layer if len(self.delta) > 1 else 0].float().clamp(-TWO_PI, 0.0)

    def rotate(self, q: Tensor, k: Tensor, p, layer: int = 0) -> tuple[Tensor, Tensor]:
        cos, sin = self.positions(p).state  # (T, d)
        delta = self.phase(layer)
        cd, sd = delta.cos()[:, None, :], delta.sin()[:, None, :]  # (H, 1, d)
        mq = F.softplus(q.float()) * math.sqrt(2.0)  # the sqrt(2): attention divides by sqrt(2d), the papers by sqrt(d)
        mk = F.softplus(k.float())
        q2 = torch.cat((mq * cos, mq * sin), -1)
        # cos and sin of n theta + delta, by the angle-sum identity (no float32 angle at large n)
        k2 = torch.cat((mk * (cos * cd - sin * sd), mk * (sin * cd + cos * sd)), -1)
        return q2.to(q.dtype), k2.to(k.dtype)
