"""window:W[:shift] by gathering: each cell's tokens are one group of queries and keys; no mask anywhere.

A block's cells are the rectangles between the boundaries ``shift + k·W`` on each axis, clipped to the grid (the
pattern's definition; Swin computes the same visibility by rolling the grid and masking). Cells of one size (a
shifted block's border cells are W/2 wide, a grid the window does not divide ends in narrower cells) form one
part, one unmasked SDPA call over all of them, so no softmax ever spends work on a hidden key: a shifted block or
an undivided grid costs its pattern's density, not the padded windows'. (Cutting the windows with reshape and
permute instead of a gather measured the same: the SDPA calls are most of the time.)
"""

from __future__ import annotations

from collections import defaultdict

import torch

from vit.layers.attention_core.cache import cached
from vit.layers.attention_core.gathered import GatherTables, gathered_attention, make_parts
from vit.layers.patterns import Pattern


def window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, grid: tuple[int, int], P: int,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """The patch queries' rows [B, H, N, d] of q, k, v [B, H, P + N, d] under a window pattern."""
    return gathered_attention(q, k, v, window_tables(pattern, grid, P, q.device), dropout_p)


def window_tables(pattern: Pattern, grid: tuple[int, int], P: int, device: torch.device) -> GatherTables:
    """The gather tables of a window pattern on ``grid``: one part per cell size (built once per shape, device)."""

    def build() -> GatherTables:
        h, w = grid
        by_size: dict[int, list[torch.Tensor]] = defaultdict(list)
        for r0, r1 in _cells(h, pattern.size, pattern.shift):
            for c0, c1 in _cells(w, pattern.size, pattern.shift):
                tokens = (torch.arange(r0, r1)[:, None] * w + torch.arange(c0, c1)[None, :]).flatten()
                by_size[tokens.numel()].append(tokens)
        parts = [(torch.stack(cells), torch.stack(cells), None) for _, cells in sorted(by_size.items(), reverse=True)]
        return make_parts(parts, h * w, P, device)

    return cached(("window", pattern, grid, P, str(device)), build)


def _cells(n: int, W: int, shift: int) -> list[tuple[int, int]]:
    """The [start, stop) intervals an axis of n patches is cut into by the boundaries shift + k·W."""
    edges = sorted({0, n, *(e for e in range(shift, n, W) if e > 0)})
    return list(zip(edges[:-1], edges[1:], strict=True))
