"""Optimizer and learning-rate schedule shared by the warm-up and the training stages."""

from __future__ import annotations

import math

import torch


def make_optimizer(model, lr: float, weight_decay: float) -> torch.optim.AdamW:
    # no weight decay on norms and biases (1-D tensors), as usual for transformers
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # on CUDA the fused kernel (a few launches instead of several per parameter tensor, as TRL uses),
    # where the model's variant allows it (sharded DTensor parameters keep the default implementation)
    from .variants import variant_of

    params = decay + no_decay
    fused = bool(params) and all(p.device.type == "cuda" for p in params) and variant_of(model).fused_optimizer(model)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99), eps=1e-8, fused=fused or None)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0 - 0.9 * progress  # linear to 10%


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
