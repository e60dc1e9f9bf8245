"""A stand-in core for FLOP counting: the pattern's FLOPs through plain SDPA, values meaningless.

Queries are grouped by how many keys they see; each group attends to that many keys in one SDPA call, so
``FlopCounterMode`` (forward and backward) counts exactly density × dense. It runs where no real backend can be
counted: flex attention raises in the counter, and restructured kernels also compute padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vit.layers.attention_core.cache import cached
from vit.layers.pattern_masks import visible_counts
from vit.layers.patterns import Pattern


def counted_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, grid: tuple[int, int], P: int,
) -> torch.Tensor:
    """[B, H, T, d] of the right shape and autograd graph; only its FLOPs mean anything."""
    order, groups = cached(("counted", pattern, grid, P), lambda: _groups(pattern, grid, P))
    outs, start = [], 0
    for keys, n in groups:
        idx = order[start : start + n].to(q.device)
        outs.append(F.scaled_dot_product_attention(q.index_select(2, idx), k[:, :, :keys], v[:, :, :keys]))
        start += n
    return torch.cat(outs, dim=2).index_select(2, torch.argsort(order).to(q.device))


def _groups(pattern: Pattern, grid: tuple[int, int], P: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    counts = visible_counts(pattern, grid, P)
    order = torch.argsort(counts, stable=True)
    keys, sizes = torch.unique_consecutive(counts[order], return_counts=True)
    return order, list(zip(keys.tolist(), sizes.tolist(), strict=True))
