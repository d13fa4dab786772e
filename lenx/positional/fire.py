import torch
from torch import Tensor, nn

from . import register
from .base import Bias, PositionalScheme


class FireBias(Bias):
    """b[h, i, j] = f(psi(i - j) / psi(max(L, i))), built for one block of query rows at a time."""

    def __init__(self, scheme: "FIRE", pos: Tensor):
        self.scheme, self.pos = scheme, pos

    rows = 64  # query rows per MLP call: its hidden layer (rows x keys x width) is the memory peak

    def block(self, q0: int, q1: int, q: Tensor | None = None) -> Tensor:
        parts = []
        for r0 in range(q0, q1, self.rows):
            x = self.scheme.normalized_distance(self.pos[r0 : min(r0 + self.rows, q1)], self.pos[:q1])
            parts.append(self.scheme.f(x))
        return torch.cat(parts).permute(2, 0, 1).unsqueeze(0)


@register
class FIRE(PositionalScheme):
    name = "fire"
    acts = ("bias",)
    learned = True
    formula = "score_ij += f(psi(i - j) / psi(max(L, i))), psi(x) = log(c*x + 1); f an MLP 1 -> 32 -> H; c, L learned"
    paper = ("Li et al. 2024, 'Functional interpolation for relative positions improves long context transformers' "
             "(ICLR)")
    used_by = "no widely released LLM (research models)"
    defaults = {"mlp_width": 32, "init_c": 0.1, "eps": 1e-6}
    details = (
        "A learned function of the distance, normalised by the query's position ('progressive\n"
        "interpolation'): the MLP's input psi(i - j)/psi(max(L, i)) stays in [0, 1], the range seen\n"
        "in training, at every length; psi(x) = log(|c*x| + 1) spreads out the local distances. Not\n"
        "relative: above the threshold L the normaliser grows with the query position i.\n"
        "As the paper's reference listing: |c| and L = |m * L0| with m learned (init 1) and L0 the\n"
        "training length; init_c = 0.1; eps = 1e-6 added to the denominator; PyTorch's default init\n"
        "for the MLP. One f, c and m for all layers (believed to be the paper's choice; not verified\n"
        "against its text)."
    )

    def __init__(self, config):
        super().__init__(config)
        width = self.options["mlp_width"]
        self.f = nn.Sequential(nn.Linear(1, width), nn.ReLU(), nn.Linear(width, self.n_head))
        self.c = nn.Parameter(torch.empty(()))
        self.L_mult = nn.Parameter(torch.empty(()))

    def reset_parameters(self) -> None:
        for layer in (self.f[0], self.f[2]):
            layer.reset_parameters()
        nn.init.constant_(self.c, self.options["init_c"])
        nn.init.ones_(self.L_mult)

    def normalized_distance(self, qpos: Tensor, kpos: Tensor) -> Tensor:
        """(nq, nk, 1) inputs of f for query positions qpos and key positions kpos."""
        qpos, kpos = qpos.float(), kpos.float()
        threshold = (self.L_mult * self.train_len).abs()
        psi = lambda x: torch.log((self.c * x).abs() + 1)  # noqa: E731
        normaliser = psi(torch.maximum(qpos, threshold))[:, None] + self.options["eps"]
        return (psi(qpos[:, None] - kpos[None, :]) / normaliser)[..., None]

    def bias(self, layer: int, pos: Tensor) -> Bias:
        return FireBias(self, pos)
