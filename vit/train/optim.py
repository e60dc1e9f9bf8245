"""Optimiser recipe pieces: decay / no-decay groups, layer-wise lr decay (timm), lr scaling, warmup + cosine."""

from __future__ import annotations

import math
from typing import Any

import torch
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import nn
from torch.optim.lr_scheduler import LambdaLR


def param_groups(
    model: nn.Module, weight_decay: float, layer_decay: float | None = None
) -> list[dict[str, Any]]:
    """AdamW parameter groups: no decay on norms, biases, tokens and position embeddings.

    With ``layer_decay`` (e.g. 0.65 for ViT-B fine-tuning), block i's lr is scaled by
    ``layer_decay ** (num_layers - i)``: the head gets the full rate, the patch embedding the smallest.
    Groups carry ``lr_scale``; ``build_adamw`` applies it.
    """
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    if layer_decay is not None and layer_decay < 1.0:
        if layer_decay <= 0.0:
            raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
        return param_groups_layer_decay(model, weight_decay, no_weight_decay_list=skip, layer_decay=layer_decay)
    return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=skip)


def build_adamw(
    groups: list[dict[str, Any]], lr: float, betas: tuple[float, float] = (0.9, 0.999), fused: bool | None = None
) -> torch.optim.AdamW:
    """AdamW over ``groups`` with each group's lr = ``lr × lr_scale``; fused kernels by default.

    The fused step is ~7× faster than the default loop on CPU too (ViT-S: 7.5 vs 56 ms, ``vit bench``).
    """
    for g in groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    if fused is None:
        fused = all(p.device.type in ("cuda", "cpu") and p.is_floating_point() for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=fused or None)


def scaled_lr(base_lr: float, effective_batch: int) -> float:
    """The linear scaling rule of the MAE / DeiT recipes: lr = base_lr × effective batch / 256."""
    return base_lr * effective_batch / 256


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> LambdaLR:
    """Per-step linear warmup from 0 to each group's lr, then a half-cosine down to ``min_lr_ratio`` of it."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    warmup_steps = min(max(warmup_steps, 0), total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return LambdaLR(optimizer, factor)
