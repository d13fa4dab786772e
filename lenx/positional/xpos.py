import math

import torch
from torch import Tensor

from ..errors import LengthNotSupported
from . import register
from .base import is_number
from .rope import RoPE, apply_rotation


@register
class XPos(RoPE):
    name = "xpos"
    formula = "RoPE, then pair k of q_n times zeta_k^(n/g) and of k_m times zeta_k^(-m/g); zeta_k = (2k+0.4d)/(1.4d)"
    paper = "Sun et al. 2023, 'A length-extrapolatable transformer' (ACL); code: microsoft/torchscale"
    used_by = "RetNet's retention decay builds on it; no widely released LLM uses xPos itself"
    defaults = {**RoPE.defaults, "scale_base": 512.0}
    details = (
        "RoPE with an exponential decay on top. Pair k of a query at position n is rotated as in RoPE\n"
        "and multiplied by zeta_k^(n/g); the same pair of a key at position m by zeta_k^(-m/g), with\n"
        "zeta_k = (2k + 0.4d)/(1.4d) in (0.29, 1) and g = scale_base = 512. The score of pair k then\n"
        "carries zeta_k^((n-m)/g): a function of n - m only, decaying with distance fastest for the\n"
        "high-frequency pairs, whose rotation alone extrapolates worst.\n"
        "\nAs in torchscale's xpos_relative_position.py (interleaved pairs, like lenx's RoPE),\n"
        "positions are centred on the middle of the window before the decay, so zeta^(+-n/g) stays\n"
        "within float range at long lengths; the shift cancels in every score. RoPE extensions\n"
        "(--rope-scaling) change the rotation frequencies only; the decay keeps the raw positions.\n"
        "\nEven centred, zeta^(+-n/g) leaves float32's range in a window of about 2g * 70 / ln(3.5)\n"
        "positions (56k at g = 512): past that the scores turn to inf * 0 = NaN (torchscale too), so\n"
        "lenx refuses such a window with a note in its row rather than report a NaN perplexity.\n"
        "\nThe paper's extrapolation results pair xPos with blockwise causal attention at inference (each\n"
        "query sees its own and the previous block of train_len keys); lenx evaluates every scheme with\n"
        "full causal attention over the window, so xPos rows measure the encoding alone."
    )
    # The largest decay factor zeta^(-n/g) allowed: scaled queries and keys, and their products, stay finite
    # and clear of float32's subnormals (about 1e-38) with room for the projections' own magnitudes.
    MAX_FACTOR = 1e30

    def check_options(self) -> None:
        super().check_options()  # base
        self.check_option("scale_base", lambda v: is_number(v) and v > 1, "a number above 1")
        if self.train_len > self.max_span():
            from ..errors import LenxError

            need = math.ceil(self.train_len * math.log(1.4 / 0.4) / (2 * math.log(self.MAX_FACTOR)))
            raise LenxError(f"xpos cannot train on {self.train_len}-token windows at scale_base "
                            f"{self.options['scale_base']:g}: its decay leaves float32's range past {self.max_span()} "
                            f"positions; give pe_options scale_base >= {need}")

    @property
    def max_len(self) -> int:
        return self.max_span()

    def max_span(self) -> int:
        """The longest window (last position - first + 1) whose decay stays within MAX_FACTOR: positions run
        from the centre by half the span, and the smallest zeta (pair 0) is 0.4 / 1.4."""
        return int(2 * self.options["scale_base"] * math.log(self.MAX_FACTOR) / math.log(1.4 / 0.4))

    def prepare(self, pos: Tensor) -> tuple[Tensor, Tensor]:
        """The rotation and the decay zeta^(n/g) of the forward's positions (T, d/2, 1), made once for every layer."""
        if not torch.compiler.is_compiling():
            span = int(pos.max() - pos.min()) + 1
            if span > self.max_span():
                raise LengthNotSupported(
                    f"xPos's decay zeta^(n/{self.options['scale_base']:g}) leaves float32's range in a window of "
                    f"{span} positions (at most {self.max_span()}); evaluate shorter windows"
                )
        centre = (pos.min() + pos.max() + 1).div(2, rounding_mode="floor")  # a tensor: no host sync
        return super().prepare(pos), self.decay(pos - centre)

    def decay(self, offset: Tensor) -> Tensor:
        """zeta^(n/g) at offsets n from the window's centre, (T, d/2, 1) float32."""
        d = self.head_dim
        zeta = (torch.arange(0, d, 2, dtype=torch.float64, device=offset.device) + 0.4 * d) / (1.4 * d)
        return (zeta[None, :] ** (offset.double()[:, None] / self.options["scale_base"])).float()[..., None]

    def rotate_at(self, x: Tensor, at: Tensor, layer: int, seq_len: int, query: bool) -> Tensor:
        """Rotation and decay both at the moved positions (the decay is relative too), centred as `prepare` centres
        a window of seq_len positions 0..seq_len-1."""
        if not self.rotates(layer):
            return x
        rot, scale = self.rotation_at(at, seq_len), self.decay(at - seq_len // 2)
        return apply_rotation(x, rot * scale if query else rot / scale)

    def rotate(self, q: Tensor, k: Tensor, p, layer: int = 0) -> tuple[Tensor, Tensor]:
        if not self.rotates(layer):
            return q, k
        rot, scale = self.positions(p).state
        return apply_rotation(q, rot * scale), apply_rotation(k, rot / scale)
