"""Attention-level extensions (`lenx.extend`) for Hugging Face models, through transformers' attention-function
registry: `lenx_extend` is registered in `AttentionInterface` (its mask in `AttentionMaskInterface` is sdpa's)
and a model's config is switched to it; each attention module carries the extension (`attach`).

transformers hands the function queries and keys already rotated at their true positions i (rotate_half pairs,
times the rope type's attention scaling). The function turns them back by -i theta (the scaling stays, as it
would on the unrotated ones) and gives them to `lenx.extend.attend` with a rotation of the same convention at any
position, so every method runs the same code as for lenx runs. The architectures it serves (`ARCHITECTURES`)
are those whose attention module calls the registry with full-width rotate_half RoPE, no sliding window and no
logit soft-capping; others are refused with one line.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .errors import LenxError
from .extend import attend
from .positional.base import Positions

NAME = "lenx_extend"
ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


def refusal(config, name: str, method: str) -> str | None:
    """Why an HF model (its config) cannot take an attention-level method, or None."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        return (f"--rope-scaling {method} reaches an HF model through transformers' attention registry, which lenx "
                f"serves for {', '.join(ARCHITECTURES)} models; {name} is {model_type} (lenx runs take every method)")
    rp = getattr(config, "rope_parameters", None) or {}
    if float(rp.get("partial_rotary_factor", 1.0)) != 1.0:
        return f"--rope-scaling {method} needs full-width RoPE; {name} rotates part of each head"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return f"--rope-scaling {method} replaces the whole attention mask; {name} attends in a sliding window"
    return None


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def attach(model, extension, block_size: int = 512) -> None:
    """Set the extension on every attention module of a loaded model and switch it to `lenx_extend`."""
    register()
    rotary = next((m for m in model.modules() if hasattr(m, "inv_freq") and hasattr(m, "attention_scaling")), None)
    if rotary is None:
        raise LenxError(f"{type(model).__name__} has no rotary embedding module; it cannot take --rope-scaling "
                        f"{extension.text}")
    for m in model.modules():
        if hasattr(m, "layer_idx") and hasattr(m, "q_proj"):
            m.lenx_extension, m.lenx_rotary, m.lenx_block = extension, rotary, block_size
    model.config._attn_implementation = NAME
    for sub in model.modules():  # sub-configs (a text config inside) read the same key
        cfg = getattr(sub, "config", None)
        if cfg is not None and cfg is not model.config and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = NAME


class HalfRotation:
    """What `lenx.extend.attend` asks of a scheme, in transformers' rotate_half convention with the model's inverse
    frequencies: `rotate` at the true positions, `rotate_at` at moved ones; no bias."""

    moved_positions = "rotation"

    def __init__(self, inv_freq: Tensor):
        self.inv_freq = inv_freq.double()

    def _turn(self, x: Tensor, at: Tensor) -> Tensor:
        angle = at.double()[:, None] * self.inv_freq.to(at.device)[None, :]
        cos, sin = torch.cat((angle.cos(), angle.cos()), -1), torch.cat((angle.sin(), angle.sin()), -1)
        x1, x2 = x.float().chunk(2, dim=-1)
        half = torch.cat((-x2, x1), -1)
        return (x.float() * cos.float() + half * sin.float()).to(x.dtype)

    def rotate(self, q: Tensor, k: Tensor, p: Positions, layer: int = 0) -> tuple[Tensor, Tensor]:
        return self._turn(q, p.pos), self._turn(k, p.pos)

    def rotate_at(self, x: Tensor, at: Tensor, layer: int, seq_len: int, query: bool) -> Tensor:
        return self._turn(x, at)

    def bias(self, layer, p, x=None, q=None, k=None):
        return None


def attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, scaling: float | None = None,
              dropout: float = 0.0, **kwargs):
    """transformers' attention-function signature: (B, H, T, hd) rotated queries, (B, H_kv, T, hd) keys and
    values; returns the (B, T, H, hd) output and no weights."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ext = module.lenx_extension
    B, H, T, hd = query.shape
    if not ext.active(T):  # inside its window: the model's own attention, bit for bit
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, scaling=scaling,
                                               dropout=dropout, **kwargs)
    if ext.only_scales:  # a frequency method's logn: transformers' sdpa on the scaled (rotated) queries
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, ext.scaled(query), key, value, attention_mask,
                                               scaling=scaling, dropout=dropout, **kwargs)
    pos = kwargs.get("position_ids")
    if pos is not None and not torch.equal(pos.reshape(-1, pos.shape[-1])[0].cpu(), torch.arange(pos.shape[-1])):
        raise LenxError(f"--rope-scaling {ext.text} scores windows from position 0 (got other position ids)")
    if key.shape[-2] != T:
        raise LenxError(f"--rope-scaling {ext.text} scores whole windows without a KV cache")
    groups = H // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    if scaling is not None and not math.isclose(scaling, hd ** -0.5):
        query = query * (scaling * math.sqrt(hd))  # attend scales by hd^-0.5: the model's own scale, exactly
    rot = HalfRotation(module.lenx_rotary.inv_freq)
    p = Positions(torch.arange(T, device=query.device))
    q0, k0 = rot._turn(query, -p.pos), rot._turn(key, -p.pos)  # back to their unrotated directions
    out = attend(ext, q0, k0, value, None, module.layer_idx, p, rot, module.lenx_block)
    return out.transpose(1, 2).contiguous(), None
