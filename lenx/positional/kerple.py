import torch
from torch import Tensor, nn

from . import register
from .base import PositionalScheme

EPS = 0.01  # the reference's lower clamp on both parameters


class _Kerple(PositionalScheme):
    """One (r1, r2) per head, shared by all layers, as in the reference (chijames/KERPLE: one module
    passed to every layer). Parameters are projected onto their ranges before each use, in place, as the
    reference does (a projected gradient step), so a parameter pushed out of range comes straight back."""

    acts = ("bias",)
    relative = True
    moved_positions = "distance"  # its bias is a table over distances (lenx.extend reads it at moved ones)
    learned = True
    r2_max: float | None = None
    r1_init: tuple[float, float]  # U(low, high) bounds of the reference's initialisation
    r2_init: tuple[float, float]

    def __init__(self, config):
        super().__init__(config)
        self.r1 = nn.Parameter(torch.empty(self.n_head))
        self.r2 = nn.Parameter(torch.empty(self.n_head))
        self.reset_parameters()

    def params(self) -> tuple[Tensor, Tensor]:
        self.r1.data.clamp_(min=EPS)  # .data: a projection, invisible to autograd, as in the reference
        self.r2.data.clamp_(min=EPS, max=self.r2_max)
        return self.r1[:, None].float(), self.r2[:, None].float()

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.r1, *self.r1_init)
        nn.init.uniform_(self.r2, *self.r2_init)

    def distance_bias(self, layer: int, dist: Tensor) -> Tensor:
        r1, r2 = self.params()
        return self.kernel(r1, r2, dist[None, :].float())

    @staticmethod
    def kernel(r1: Tensor, r2: Tensor, dist: Tensor) -> Tensor:
        raise NotImplementedError


@register
class KerpleLog(_Kerple):
    name = "kerple-log"
    formula = "score_ij += -r1_h * log(1 + r2_h * |i - j|); r1, r2 >= 0.01 learned per head"
    paper = "Chi et al. 2022, 'KERPLE: kernelized relative positional embedding for length extrapolation' (NeurIPS)"
    used_by = "no widely released LLM (research models)"
    details = (
        "A conditionally positive definite kernel of the distance as a score bias: -r1*log(1 + r2*|i\n"
        "- j|), one (r1, r2) per head, shared across layers as in the reference code, both clamped >=\n"
        "0.01. Init as the reference: r1 ~ U(0, 2), r2 ~ U(0, 1). Logarithmic: distant tokens are\n"
        "penalised far less than by ALiBi's linear slope."
    )

    r1_init, r2_init = (0.0, 2.0), (0.0, 1.0)

    @staticmethod
    def kernel(r1: Tensor, r2: Tensor, dist: Tensor) -> Tensor:
        return -r1 * torch.log1p(r2 * dist)


@register
class KerplePower(_Kerple):
    name = "kerple-power"
    formula = "score_ij += -r1_h * |i - j|^r2_h; r1 >= 0.01, 0.01 <= r2 <= 2 learned per head"
    paper = KerpleLog.paper
    used_by = KerpleLog.used_by
    r2_max = 2.0
    details = (
        "The power kernel as a score bias: -r1*|i - j|^r2, one (r1, r2) per head, shared across\n"
        "layers as in the reference code; r1 >= 0.01, r2 in [0.01, 2]. Init as the reference: r1 ~\n"
        "U(0, 1), r2 ~ U(0, 2). With r2 = 1 it is ALiBi with a learned slope."
    )

    r1_init, r2_init = (0.0, 1.0), (0.0, 2.0)

    @staticmethod
    def kernel(r1: Tensor, r2: Tensor, dist: Tensor) -> Tensor:
        return -r1 * dist.pow(r2)
