import torch
from torch import Tensor, nn

from . import register
from .base import PositionalScheme, is_integer


def dpb_mlp(width: int, heads: int, depth: int, norm: bool) -> nn.Sequential:
    """x-transformers' DynamicPositionBias MLP: Linear(1, w) [LayerNorm] SiLU, then depth - 1 times
    Linear(w, w) [LayerNorm] SiLU, then Linear(w, heads). Its first norm is x-transformers' own LayerNorm (no bias,
    a gain starting at 1: nn.LayerNorm without bias), the later ones nn.LayerNorm (gain and bias)."""
    layers: list[nn.Module] = [nn.Linear(1, width)]
    if norm:
        layers.append(nn.LayerNorm(width, bias=False))
    layers.append(nn.SiLU())
    for _ in range(depth - 1):
        layers.append(nn.Linear(width, width))
        if norm:
            layers.append(nn.LayerNorm(width))
        layers.append(nn.SiLU())
    layers.append(nn.Linear(width, heads))
    return nn.Sequential(*layers)


@register
class DynamicPositionBias(PositionalScheme):
    name = "dpb"
    acts = ("bias",)
    relative = True
    moved_positions = "distance"  # its bias is a table over distances (lenx.extend reads it at moved ones)
    learned = True
    formula = ("score_ij += MLP(i - j)_h; MLP 1 -> w -> w -> H, SiLU, w = d_model/4 (depth 2); input optionally "
               "log(1 + i - j); one MLP for all layers, learned")
    paper = ("Wang et al. 2021, 'CrossFormer: a versatile vision transformer hinging on cross-scale attention' "
             "(arXiv 2108.00154, ICLR 2022): the dynamic position bias; as a causal LM bias, x-transformers")
    code = "lucidrains/x-transformers: x_transformers/x_transformers.py (DynamicPositionBias; dynamic_pos_bias=True)"
    used_by = ("no widely released LLM (x-transformers' dynamic_pos_bias; CrossFormer and Swin V2's continuous "
               "position bias in vision)")
    defaults = {"depth": 2, "width": None, "log_distance": False, "norm": False, "shared": True}
    details = (
        "A small MLP maps the distance i - j (a float) to one score bias per head: a learned,\n"
        "continuous function of the distance that can be evaluated at distances never seen in training.\n"
        "As x-transformers' DynamicPositionBias with dynamic_pos_bias=True (its defaults):\n"
        "Linear(1, w), SiLU, then depth - 1 = 1 x [Linear(w, w), SiLU], then Linear(w, H): three\n"
        "linear layers, width w = d_model // 4 (AttentionLayers passes dim = dim // 4). norm: true puts\n"
        "a LayerNorm after each hidden Linear (the first without a bias, as x-transformers' own\n"
        "LayerNorm; the others nn.LayerNorm). log_distance: true feeds sign(m) log(|m| + 1) =\n"
        "log(1 + i - j) instead of i - j (SwinV2's log-spaced coordinates; the x-transformers README\n"
        "reports linear distances better for language). Init: PyTorch's defaults, as x-transformers\n"
        "(nothing re-initialised). shared: true (the default, as x-transformers, whose AttentionLayers\n"
        "builds one rel_pos module and passes it to every layer): one MLP for all layers; false: one\n"
        "per layer. The bias is added to q.k/sqrt(d), as x-transformers' Attend adds attn_bias to the\n"
        "scaled scores.\n"
        "\nOptions: depth (hidden Linear+SiLU stages, >= 1; default 2), width (null = d_model // 4),\n"
        "log_distance, norm (both false), shared (true).\n"
        "\nComputation: x-transformers runs the MLP on all 2L - 1 signed distances and gathers an L x L\n"
        "x H bias; causally only distances 0 .. D - 1 are used, so here the MLP runs once per layer\n"
        "and forward on those D distances, in float32 (autocast off, the bias enters the scores as a\n"
        "float32 mask), giving an (H, D) table: every fast route applies (stored training route,\n"
        "blocked Toeplitz, flex); memory linear in L.\n"
        "\nTraining: the MLP trains at the model's learning rate without weight decay (x-transformers'\n"
        "training scripts use Adam without decay on anything).\n"
        "\nOrigin: CrossFormer's DPB is an MLP on the 2-D offset (dx, dy), width D/4: Linear(2, D/4),\n"
        "then three [LayerNorm, ReLU, Linear] stages, the last to the heads (optionally residual);\n"
        "x-transformers' 1-D version puts SiLU after each Linear, no norm by default and no residual.\n"
        "Published anchors at train length 128: see REFERENCE.md\n"
        "(DPB-linear keeps its perplexity to 1024-2048 tokens; bob80333/investigating_extrapolation)."
    )

    def __init__(self, config):
        super().__init__(config)
        o = self.options
        self.width = o["width"] if o["width"] is not None else max(1, self.d_model // 4)
        n = 1 if o["shared"] else self.n_layer
        self.mlps = nn.ModuleList(dpb_mlp(self.width, self.n_head, o["depth"], o["norm"]) for _ in range(n))
        self.reset_parameters()

    def check_options(self) -> None:
        self.check_option("depth", lambda v: is_integer(v) and v >= 1, "an integer >= 1")
        self.check_option("width", lambda v: v is None or (is_integer(v) and v >= 1), "null (d_model // 4) or an "
                          "integer >= 1")
        for key in ("log_distance", "norm", "shared"):
            self.check_option(key, lambda v: isinstance(v, bool), "true or false")

    def reset_parameters(self) -> None:
        for m in self.mlps.modules():
            if isinstance(m, (nn.Linear, nn.LayerNorm)):
                m.reset_parameters()

    def mlp(self, layer: int) -> nn.Sequential:
        return self.mlps[layer if len(self.mlps) > 1 else 0]

    def mlp_input(self, dist: Tensor) -> Tensor:
        """(D, 1) inputs of the MLP for signed distances i - j (x-transformers' sign(m) log(|m| + 1) when log)."""
        x = dist.float()[:, None]
        return torch.sign(x) * torch.log(x.abs() + 1) if self.options["log_distance"] else x

    def distance_bias(self, layer: int, dist: Tensor) -> Tensor:
        mlp = self.mlp(layer)
        with torch.autocast(dist.device.type, enabled=False):
            return mlp(self.mlp_input(dist).to(mlp[0].weight.dtype)).T.float()

    def decays(self, name: str, param: nn.Parameter) -> bool:
        return False
