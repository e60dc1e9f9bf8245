"""FlexAttention for the overlapping patterns: the pattern's predicate as ``mask_mod``, one block mask per shape.

CUDA: training and inference. CPU (torch 2.14.1): compiled forward only, backward raises NotImplementedError;
``create_block_mask`` defaults to CUDA, so the device is always passed. Its speed follows the share of
non-empty 128×128 blocks, not of visible pairs (``strided`` touches every block).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from vit.layers.attention_core.cache import cached
from vit.layers.pattern_masks import visible
from vit.layers.patterns import Pattern

_compiled: list[Callable[..., Any]] = []


def flex_attention_core(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, grid: tuple[int, int], P: int,
) -> torch.Tensor:
    """softmax(q kᵀ/√d) v over the visible keys, q, k, v [B, H, T, d] → [B, H, T, d]."""
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise ValueError(f"attention pattern {pattern}: FlexAttention on the CPU runs forward only (its backward "
                         "raises in torch 2.14.1); train with the 'tiles', 'strided' or 'mask' backend")
    return _flex()(q, k, v, block_mask=block_mask(pattern, grid, P, q.shape[-2], q.device))


def block_mask(pattern: Pattern, grid: tuple[int, int], P: int, T: int, device: torch.device) -> Any:
    """The pattern's ``BlockMask`` for T tokens on ``device``, built once."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return visible(pattern, q_idx, kv_idx, grid, P)

    return cached(("flex", pattern, grid, P, T, str(device)),
                  lambda: create_block_mask(mask_mod, None, None, T, T, device=device))


def _flex() -> Callable[..., Any]:
    """flex_attention compiled once (uncompiled it materialises every score)."""
    if not _compiled:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled.append(torch.compile(flex_attention, dynamic=False))
    return _compiled[0]
