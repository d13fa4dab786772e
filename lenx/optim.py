"""The optimizer and its learning-rate schedule: AdamW with per-group lr multipliers, warm-up then cosine decay."""

from __future__ import annotations

import math

import torch

from .config import TrainConfig


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to lr * min_lr_ratio; a multiplier of the peak lr."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def build_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW. Weight decay on the model's matrices only. The scheme's own parameters train as the scheme declares
    (``PositionalScheme.param_groups``: its reference's rule), or, with ``pos_lr_mult`` set, all at lr * pos_lr_mult
    without decay."""
    pe_ids = {id(p) for p in model.pe.parameters()}
    decay, no_decay = [], []
    for p in model.parameters():
        if id(p) not in pe_ids:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "lr_mult": 1.0},
        {"params": no_decay, "weight_decay": 0.0, "lr_mult": 1.0},
    ]
    if cfg.pos_lr_mult is None:
        groups += [{"params": g["params"], "weight_decay": cfg.weight_decay if g["weight_decay"] else 0.0,
                    "lr_mult": g["lr_mult"]} for g in model.pe.param_groups()]
    else:
        groups.append({"params": list(model.pe.parameters()), "weight_decay": 0.0, "lr_mult": cfg.pos_lr_mult})
    groups = [g for g in groups if g["params"]]
    # The fused kernel (CPU and CUDA) makes one pass per tensor instead of about ten.
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16) for p in model.parameters())
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused or None)


def set_lr(opt: torch.optim.Optimizer, cfg: TrainConfig, step: int) -> float:
    """Set every group's lr for `step` (its lr_mult times the schedule); returns the peak group's lr."""
    mult = lr_at(cfg, step)
    for g in opt.param_groups:
        g["lr"] = cfg.lr * mult * g["lr_mult"]
    return cfg.lr * mult
