from __future__ import annotations

import torch
from torch import Tensor

from . import get_scheme, register
from .base import PositionalScheme, is_integer, is_number, scaling_not_supported
from .rope_scaling import ROPE_SCALINGS, applies, help_text, is_attention
from .rope_scaling import frequencies as rope_frequencies


def scaling_plan(pe: str, scalings: list[str] | None, factors: list[float] | None, name: str = "--rope-scaling",
                 where: str = "") -> list[tuple[str, float | None]]:
    """The (RoPE extension, factor) cells for one run. Schemes without RoPE get only 'none' when several
    extensions are asked for, and an error when the one asked for does not apply to them. A factor of None:
    eval_len / train_len for the static extensions; for dynamic-ntk, transformers' default factor 1, i.e.
    s = max(1, window length / train_len) recomputed per window (recorded as an empty rope_factor). `name`,
    `where`: as in `lenx.evaluate.check_eval_options`."""
    scalings = scalings or ["none"]
    takes = [s for s in scalings if applies(s, get_scheme(pe))]
    if not takes and len(scalings) == 1:
        raise scaling_not_supported(pe, scalings[0], name, where)
    return [(s, f) for s in takes or ["none"] for f in ([None] if s == "none" else factors or [None])]


def apply_rotation(x: Tensor, rot: Tensor) -> Tensor:
    """Rotate each pair (2k, 2k+1) of the last dimension by rot[t, k] = (cos, sin) (T, d/2, 2, float32).
    Eager: the pair as the complex number x[2k] + i x[2k+1] times cos + i sin, one fused complex multiply,
    about 2x faster on CPU than the four real products. Under torch.compile: the real products, which
    inductor fuses (it has no complex kernels, and torch 2.13's compile cache mis-replays complex views)."""
    if torch.compiler.is_compiling():
        x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
        cos, sin = rot.unbind(-1)
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), -1).flatten(-2).to(x.dtype)
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * torch.view_as_complex(rot)).flatten(-2).to(x.dtype)


@register
class RoPE(PositionalScheme):
    name = "rope"
    acts = ("qk",)
    relative = True
    eval_scalings = ROPE_SCALINGS
    moved_positions = "rotation"
    formula = "rotate pair k of q_m by m*theta_k and of k_n by n*theta_k, theta_k = 10000^(-2k/d)"
    paper = "Su et al. 2021, 'RoFormer: enhanced transformer with rotary position embedding'"
    used_by = "LLaMA 1-3, PaLM, GPT-NeoX/Pythia, GPT-J, Qwen, Mistral, Falcon, Gemma"
    defaults = {"base": 10000.0, "rotary_fraction": 1.0, "nope_every": 0}
    details = (
        "Queries and keys are rotated, pair by pair, by an angle proportional to their position.\n"
        "Why the score depends only on the offset: write pair k of q as the complex number\n"
        "q_k = q[2k] + i*q[2k+1]. Rotation at position m multiplies it by e^(i*m*theta_k). The real\n"
        "dot product of two pairs is Re(q_k * conj(k_k)), so\n"
        "  <R_m q, R_n k> = sum_k Re(q_k e^(i m theta_k) * conj(k_k e^(i n theta_k)))\n"
        "                 = sum_k Re(q_k conj(k_k) e^(i (m - n) theta_k)),\n"
        "a function of q, k and m - n only: R_m^T R_n = R_(n-m), rotations compose by adding angles.\n"
        "\nAt evaluation, `lenx eval --rope-scaling METHOD[:PARAM=VALUE...]` changes the frequencies (pi .. longrope)\n"
        "or the attention (self-extend .. lambda: which keys a query sees and at which positions; lenx/extend.py)\n"
        "(s: the factor, --rope-factor, default eval length / L; L: the training length; logn=1 on any method:\n"
        "queries times max(1, ln(i + 1) / ln L); docs/extensions.md):\n\n"
        + help_text("  ") +
        "\n\nlenx/positional/rope_scaling.py computes pi, dynamic-ntk, yarn, llama3 and longrope exactly as\n"
        "transformers' rope types linear, dynamic, yarn, llama3 and longrope; ntk, which transformers lacks, as\n"
        "NTK-aware scaling, base * s^(d/(d-2)).\n"
        "\nrotary_fraction p (p-RoPE, proportional RoPE: Barbero et al. 2024, 'Round and round we go! What\n"
        "makes rotary positional encodings useful?'): only the first int(p * d/2) pairs, the fastest,\n"
        "rotate; the slowest frequencies are set to zero (no rotation) and the others keep theta_k =\n"
        "base^(-2k/d), as transformers' rope type `proportional` computes them. This is not GPT-NeoX-style\n"
        "partial rotary, which recomputes the frequencies over the rotated dimensions only.\n"
        "\nnope_every k > 0 leaves layer l (from 0) unrotated when (l + 1) % k == 0, the rule by which\n"
        "Llama 4 builds no_rope_layers from no_rope_layer_interval (4 there; SmolLM3 uses the same rule):\n"
        "those layers are NoPE layers, with the causal mask as their only positional information."
    )

    def __init__(self, config):
        super().__init__(config)
        self._cache: dict = {}
        self.scaling: tuple[str, float | None] = ("none", None)

    def check_options(self) -> None:
        self.check_option("base", lambda v: is_number(v) and v > 1, "a number above 1")
        self.check_option("rotary_fraction", lambda v: is_number(v) and 0 <= v <= 1, "a number in [0, 1]")
        self.check_option("nope_every", lambda v: is_integer(v) and v >= 0, "an integer >= 0 (0: RoPE on every layer)")

    def set_eval_scaling(self, method: str = "none", factor: float | None = None) -> None:
        super().set_eval_scaling(method, factor)  # rejects unknown methods; sets an attention method
        self.scaling = ("none", None) if is_attention(method or "none") else (method or "none", factor)
        self._cache = {}

    def rotated_pairs(self) -> int:
        """Pairs that rotate: the first (fastest) int(rotary_fraction * hd/2), as transformers' `proportional`."""
        return int(self.options["rotary_fraction"] * self.head_dim // 2)

    def rotates(self, layer: int) -> bool:
        """Llama 4's rule (`no_rope_layers` from `no_rope_layer_interval`): layer l (from 0) has no RoPE when
        (l + 1) % nope_every == 0."""
        k = self.options["nope_every"]
        return not (k and (layer + 1) % k == 0)

    def cos_sin(self, pos: Tensor) -> tuple[Tensor, Tensor]:
        """cos and sin of pos * theta, (T, d/2) in float32, times the extension's attention factor.
        Tables are cached per length (dynamic NTK's frequencies depend on it). Under torch.compile they are
        computed in the graph from pos itself (no host sync), the length taken as pos's own: compiled, lenx
        trains on positions 0..T-1, and only dynamic NTK's frequencies read the length."""
        if torch.compiler.is_compiling():
            return self._cos_sin_at(pos, pos.shape[-1])
        n = int(pos.max()) + 1
        key = (pos.device, n)
        table = self._cache.get(key)  # read once, replaced whole: row shards call this from threads at once
        if table is None:
            table = tuple(t.to(pos.device) for t in self._cos_sin_at(torch.arange(n), n))
            self._cache = {key: table}
        cos, sin = table
        return cos[pos], sin[pos]

    def inv_freq(self, seq_len: int) -> tuple[Tensor, float]:
        """The frequencies of this evaluation (extension included), zero past the rotated pairs; and the factor on
        cos and sin."""
        inv_freq, attn = rope_frequencies(self.head_dim, self.options["base"], *self.scaling,
                                          train_len=self.train_len, seq_len=seq_len)
        inv_freq = inv_freq.clone()
        inv_freq[self.rotated_pairs():] = 0.0
        return inv_freq, attn

    def _cos_sin_at(self, pos: Tensor, seq_len: int) -> tuple[Tensor, Tensor]:
        inv_freq, attn = self.inv_freq(seq_len)
        angle = pos.double()[:, None] * inv_freq.to(pos.device)[None, :]  # float64: exact angles at long lengths
        return (angle.cos() * attn).float(), (angle.sin() * attn).float()

    def prepare(self, pos: Tensor) -> Tensor:
        """(cos, sin) of pos * theta, (T, d/2, 2) float32: gathered once per forward, read by every layer."""
        return torch.stack(self.cos_sin(pos), -1)

    def rotate(self, q: Tensor, k: Tensor, p, layer: int = 0) -> tuple[Tensor, Tensor]:
        if not self.rotates(layer):
            return q, k
        rot = self.positions(p).state
        return apply_rotation(q, rot), apply_rotation(k, rot)

    def rotation_at(self, at: Tensor, seq_len: int) -> Tensor:
        """(cos, sin) at positions `at`, integer or fractional, (n, d/2, 2) float32, with this evaluation's
        frequencies for a window of seq_len positions (as `prepare`, which reads them from a per-length table)."""
        inv_freq, attn = self.inv_freq(seq_len)
        angle = at.double()[:, None] * inv_freq.to(at.device)[None, :]
        return torch.stack(((angle.cos() * attn).float(), (angle.sin() * attn).float()), -1)

    def rotate_at(self, x: Tensor, at: Tensor, layer: int, seq_len: int, query: bool) -> Tensor:
        return apply_rotation(x, self.rotation_at(at, seq_len)) if self.rotates(layer) else x
