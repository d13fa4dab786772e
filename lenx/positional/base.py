"""The interface between a positional scheme and the model.

A scheme may act in three places only, and the model calls all three for every scheme and layer:

  (a) ``embed(x, p)``                      -- the token embeddings, before the first block;
  (b) ``rotate(q, k, p, layer)``           -- queries and keys of a layer, before their dot product;
  (c) ``bias(layer, p, x=, q=, k=)``       -- an additive term on a layer's attention scores, from positions and,
                                              for data-dependent schemes, the layer's normed input ``x``
                                              (B, T, C), its queries or its (rotated) keys (B, H, T, hd).

``p`` is a ``Positions``: the forward's integer positions and the state the scheme prepared from them once
(``prepare``: RoPE's rotation table), handed to every layer rather than cached on the scheme. Every hook also
takes a bare position tensor and prepares it itself, for a one-off call.

Parameters: ``param_groups`` says how the scheme's own parameters train (weight decay or not, a learning-rate
multiplier), as its reference implementation trains them; the optimizer builds its groups from it.

The model and the attention code never look at a scheme's name. A scheme that does nothing in a
place leaves the default, which is the identity (and ``bias`` returns None, so attention runs on
the fused causal kernel with no mask at all).

Score biases are handed to attention as a ``Bias``: an object that builds the bias for one block of
query rows at a time, so no path ever needs a heads x L x L tensor. Relative schemes (bias a function
of i - j only) implement ``distance_bias`` and get a ``TableBias``: one per-head 1-D table over
distances per forward and layer, gathered per block (ALiBi overrides ``bias`` to return a ``LinearBias``, a
``TableBias`` that also declares itself separable).
"""

from __future__ import annotations

import math
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn


class Positions:
    """The positions of one forward, (T,) integers, and what the scheme prepared from them for every layer."""

    __slots__ = ("pos", "state")

    def __init__(self, pos: Tensor, state: Any = None):
        self.pos, self.state = pos, state


class Bias:
    """Additive attention-score term for one layer, built block by block.

    ``block(q0, q1, q)`` returns the bias for query rows q0..q1-1 against keys 0..q1-1, shaped
    (1 or B, H, q1 - q0, q1); entries above the diagonal are ignored (attention masks them).
    ``q`` is the (B, H, q1 - q0, hd) block of queries, for content-dependent schemes. A block may share
    memory with the next block() of the same bias (FIRE reuses one buffer in inference): use it first.
    A bias may also add to the attention output (Shaw's a^V): then ``needs_probs`` is True and
    ``value(q0, q1, probs)`` returns the extra (B, H, q1 - q0, hd) output given the block's
    attention probabilities.

    Capabilities (attention picks a faster exact route from these, never from a scheme's name;
    each returns None when the bias does not have the structure):

    - ``toeplitz_table()``: an (H, D) table with b[h, i, j] = table[h, i - j] for row and column
      *indices* j <= i < D (a relative bias over contiguous positions). Attention then reads each
      block's bias as a strided view of one per-layer buffer instead of gathering it.
    - ``key_term()``: (s, g), s of shape (H,) and g of shape (T,) or (B, H, T), with b[b, h, i, j] =
      s[h] * (g[.., j] - g[.., i]): a key term plus a per-row constant, which softmax ignores (ALiBi: -m (i - j) with
      g the positions; FoX: F_i - F_j with g = -F). Attention can then fold the bias into one extra query/key dimension and keep the fused kernel,
      or add it per key column (training on the CPU); g may carry gradients.
    - ``clipped_kv()``: (a_k, a_v), each (K + 1, hd), for Shaw et al.'s relative keys and values over
      contiguous positions: b[h, i, j] = q_i . a_k[min(i - j, K)] / sqrt(hd), and the output adds
      sum_j p_ij a_v[min(i - j, K)]. Attention then runs the fused kernel for keys past K and only a band
      of K explicit scores per query.
    - ``score_mod()``: a FlexAttention ``score_mod(score, b, h, q_idx, kv_idx)`` giving the same scores.
    """

    needs_probs: bool = False
    masks_future: bool = False  # block() already puts -inf on keys after the query (attention skips its own mask)
    max_block_rows: int | None = None  # at most this many query rows per block() (its own buffers' memory)

    def block(self, q0: int, q1: int, q: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def value(self, q0: int, q1: int, probs: Tensor) -> Tensor:
        raise NotImplementedError

    def toeplitz_table(self) -> Tensor | None:
        return None

    def key_term(self) -> tuple[Tensor, Tensor] | None:
        return None

    def clipped_kv(self) -> tuple[Tensor, Tensor] | None:
        return None

    def score_mod(self):
        return None


def distances(pos: Tensor) -> Tensor:
    """0, 1, ..., up to the largest distance between two of the positions `pos` (at least [0])."""
    n = int(pos.max().item() - pos.min().item()) + 1 if pos.numel() else 1
    return torch.arange(n, device=pos.device)


def contiguous_positions(pos: Tensor) -> bool:
    """Positions p0, p0 + 1, ...: then pos_i - pos_j = i - j, and a bias can be laid out by index."""
    T = pos.numel()
    return bool(T == 0 or torch.equal(pos - pos[0], torch.arange(T, device=pos.device)))


class TableBias(Bias):
    """Bias from a per-head table over causal distances: b[h, i, j] = table[h, pos_i - pos_j] for j <= i."""

    def __init__(self, table: Tensor, pos: Tensor):
        self.table = table  # (H, D) with D >= number of positions
        self.pos = pos  # (T,) integer positions
        self._contiguous: bool | None = None

    def block(self, q0: int, q1: int, q: Tensor | None = None) -> Tensor:
        dist = (self.pos[q0:q1, None] - self.pos[None, :q1]).clamp_(min=0)
        return self.table[:, dist].unsqueeze(0)

    def toeplitz_table(self) -> Tensor | None:
        if self._contiguous is None:
            self._contiguous = contiguous_positions(self.pos)
        return self.table if self._contiguous else None

    def score_mod(self):
        table, pos = self.table, self.pos

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + table[h, (pos[q_idx] - pos[kv_idx]).clamp(min=0)]

        return score_mod


class LinearBias(TableBias):
    """b[h, i, j] = -slope[h] * (pos_i - pos_j) (ALiBi): a distance table, and separable: it equals
    slope[h] * pos_j up to a per-row constant."""

    def __init__(self, slopes: Tensor, pos: Tensor):
        self.slopes = slopes.to(pos.device, torch.float32)
        super().__init__(-self.slopes[:, None] * distances(pos)[None, :].float(), pos)

    def key_term(self) -> tuple[Tensor, Tensor]:
        return self.slopes, self.pos


def is_integer(value) -> bool:
    """An int, not a bool (YAML's true is no count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A finite int or float, not a bool."""
    return is_integer(value) or (isinstance(value, float) and math.isfinite(value))


def show_option(value, exact: bool = False) -> str:
    """An option value as a user writes it in YAML: true/false, 'text', 10000 (exact: the float's own digits)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if exact else f"{value:g}"
    return repr(value)


class PositionalScheme(nn.Module):
    """Base class: the identity in all three places. Subclasses override what their paper changes."""

    name: ClassVar[str] = ""
    acts: ClassVar[tuple[str, ...]] = ()  # subset of ("embedding", "qk", "bias")
    formula: ClassVar[str] = ""  # one line, for `lenx schemes`
    paper: ClassVar[str] = ""
    code: ClassVar[str] = ""  # the reference implementation: repository and path
    used_by: ClassVar[str] = ""
    details: ClassVar[str] = ""  # longer text for `lenx schemes NAME`
    relative: ClassVar[bool] = False  # scores depend on positions only through i - j
    learned: ClassVar[bool] = False  # has trained parameters of its own
    defaults: ClassVar[dict] = {}  # scheme options and their paper defaults
    eval_scalings: ClassVar[tuple[str, ...]] = ("none",)  # evaluation-time frequency extensions it accepts (RoPE's)
    # How attention-level extensions that move positions (Self-Extend, ReRoPE, DCA; `lenx.extend`) reach it:
    # "rotation": `rotate_at` rotates queries or keys at any positions; "distance": its bias is a TableBias, read
    # at the moved distances; None: it takes only the masks (sinks, lambda), with its own positions.
    moved_positions: ClassVar[str | None] = None

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.n_layer = config.n_layer
        self.d_model = config.d_model
        self.head_dim = config.d_model // config.n_head
        self.train_len = config.train_len
        unknown = set(config.pe_options) - set(self.defaults)
        if unknown:
            from ..errors import LenxError

            known = ", ".join(sorted(self.defaults)) or "none"
            raise LenxError(
                f"unknown option(s) {', '.join(sorted(map(str, unknown)))} for scheme '{self.name}'; known: {known}"
            )
        self.options = {**self.defaults, **config.pe_options}
        self.check_options()

    def check_options(self) -> None:
        """Type and range of each option, before any tensor is made (schemes with options override this and
        call ``check_option`` for each)."""

    def check_option(self, key: str, ok: Callable[[Any], bool], accepted: str) -> None:
        """One line naming the scheme, the option, what it accepts, its default and the value given."""
        value = self.options[key]
        if not ok(value):
            from ..errors import LenxError

            raise LenxError(f"{self.name} option {key} must be {accepted} (default {show_option(self.defaults[key])}), "
                            f"got {show_option(value, exact=True)}")

    # The longest sequence the scheme can represent (None: any length).
    max_len: int | None = None

    def reset_parameters(self) -> None:
        """Initialise learned parameters as the scheme's paper does. Schemes with parameters call it from their
        constructor (as torch modules do), so a scheme built on its own is ready; the model calls it again in its
        own initialisation, and not for parameters loaded from a checkpoint."""

    def prepare(self, pos: Tensor) -> Any:
        """State computed once per forward from its positions (a rotation table) and passed to every layer's hooks
        in ``Positions.state``; None by default."""
        return None

    def positions(self, pos: "Tensor | Positions") -> Positions:
        return pos if isinstance(pos, Positions) else Positions(pos, self.prepare(pos))

    def token_embedding_std(self, std: float) -> float:
        """The init std of the token embeddings: the model's (GPT-2's 0.02) unless a scheme's paper pairs its
        embedding with another (fairseq's sinusoidal models draw them N(0, d^-0.5))."""
        return std

    # (a) embedding
    def embed(self, x: Tensor, p: "Tensor | Positions") -> Tensor:
        return x

    # (b) queries and keys, shaped (B, H, T, hd)
    def rotate(self, q: Tensor, k: Tensor, p: "Tensor | Positions", layer: int = 0) -> tuple[Tensor, Tensor]:
        return q, k

    # (c) attention scores
    def bias(self, layer: int, p: "Tensor | Positions", x: Tensor | None = None, q: Tensor | None = None,
             k: Tensor | None = None) -> Bias | None:
        if not self.relative or "bias" not in self.acts:
            return None
        pos = self.positions(p).pos
        return TableBias(self.distance_bias(layer, distances(pos)), pos)

    def distance_bias(self, layer: int, dist: Tensor) -> Tensor:
        """Relative schemes: the (H, D) bias for causal distances i - j = dist (>= 0)."""
        raise NotImplementedError

    # how the scheme's own parameters train
    def param_groups(self) -> list[dict]:
        """[{"params": [...], "weight_decay": bool, "lr_mult": float}] for the scheme's own parameters, as its
        reference implementation trains them. Default: the model's learning rate, weight decay on matrices only
        (the model's own rule: nanoGPT's, which decays GPT-2's position table). Schemes whose reference differs
        override ``decays``."""
        groups: dict[bool, list] = {True: [], False: []}
        for name, param in self.named_parameters():
            groups[self.decays(name, param)].append(param)
        return [{"params": ps, "weight_decay": wd, "lr_mult": 1.0} for wd, ps in groups.items() if ps]

    def decays(self, name: str, param: nn.Parameter) -> bool:
        return param.dim() >= 2

    def rotate_at(self, x: Tensor, at: Tensor, layer: int, seq_len: int, query: bool) -> Tensor:
        """Schemes with moved_positions "rotation": queries (query=True) or keys (B, H, n, hd) rotated as at
        positions `at` (n,), integer or fractional, in a window of seq_len positions."""
        raise NotImplementedError

    # Evaluation-time settings (RoPE extensions, attention-level extensions); schemes accept the frequency methods
    # they list in eval_scalings and the attention methods `rope_scaling.applies` allows them.
    extension = None  # the attention-level extension in force (`lenx.positional.extension.Extension`), None: plain attention

    def set_eval_scaling(self, method: str = "none", factor: float | None = None) -> None:
        from .rope_scaling import applies, extends_attention

        if not applies(method or "none", type(self)):
            raise scaling_not_supported(self.name, method)
        if extends_attention(method or "none"):  # an attention method, or a frequency method's logn
            from .extension import Extension

            self.extension = Extension(method, factor, self.train_len, self.moved_positions)
        else:
            self.extension = None


def scaling_not_supported(scheme: str, method: str, name: str = "--rope-scaling", where: str = ""):
    """The one-line error for a RoPE extension asked of a scheme that has no such thing. `name`: how the user
    asked for it (a flag, or a sweep file's key); `where`: a prefix (the file)."""
    from ..errors import LenxError
    from . import REGISTRY

    from .rope_scaling import applies

    takers = [n for n, c in REGISTRY.items() if applies(method, c)] or ["no"]
    return LenxError(
        f"{where}{name} {method} applies to {', '.join(takers)} runs, not to '{scheme}'; "
        f"use {name} none, or give several methods to evaluate such runs without one"
    )
