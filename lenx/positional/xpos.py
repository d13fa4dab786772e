import torch
from torch import Tensor

from . import register
from .base import is_number
from .rope import RoPE, apply_rotation


@register
class XPos(RoPE):
    name = "xpos"
    formula = "RoPE, then pair k of q_n times zeta_k^(n/g) and of k_m times zeta_k^(-m/g); zeta_k = (2k+0.4d)/(1.4d)"
    paper = "Sun et al. 2023, 'A length-extrapolatable transformer' (ACL); code: microsoft/torchscale"
    used_by = "RetNet's retention decay builds on it; no widely released LLM uses xPos itself"
    defaults = {"base": 10000.0, "scale_base": 512.0}
    details = (
        "RoPE with an exponential decay on top. Pair k of a query at position n is rotated as in RoPE\n"
        "and multiplied by zeta_k^(n/g); the same pair of a key at position m by zeta_k^(-m/g), with\n"
        "zeta_k = (2k + 0.4d)/(1.4d) in (0.29, 1) and g = scale_base = 512. The score of pair k then\n"
        "carries zeta_k^((n-m)/g): a function of n - m only, decaying with distance fastest for the\n"
        "high-frequency pairs, whose rotation alone extrapolates worst.\n"
        "As in torchscale's xpos_relative_position.py (interleaved pairs, like lenx's RoPE),\n"
        "positions are centred on the middle of the window before the decay, so zeta^(+-n/g) stays\n"
        "within float range at long lengths; the shift cancels in every score. RoPE extensions\n"
        "(--rope-scaling) change the rotation frequencies only; the decay keeps the raw positions."
    )

    def check_options(self) -> None:
        super().check_options()  # base
        self.check_option("scale_base", lambda v: is_number(v) and v > 1, "a number above 1")

    def rotate(self, q: Tensor, k: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        rot = self.rotation(pos)
        d = self.head_dim
        zeta = (torch.arange(0, d, 2, dtype=torch.float64, device=pos.device) + 0.4 * d) / (1.4 * d)
        centre = (pos.min() + pos.max() + 1).div(2, rounding_mode="floor")  # a tensor: no host sync
        scale = (zeta[None, :] ** ((pos - centre).double()[:, None] / self.options["scale_base"])).float()[..., None]
        return apply_rotation(q, rot * scale), apply_rotation(k, rot / scale)
