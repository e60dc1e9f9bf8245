"""window:W[:shift] by gathering: each window's tokens are one group of queries and keys, one fused SDPA call.

The grid is padded at the bottom and right to whole windows and, for shifted blocks, rolled by −shift as Swin
does, so a shifted block still has ceil(h/W)·ceil(w/W) windows; a mask is needed only where windows hold padding
or, after the roll, tokens of different cells. Without either (W divides the grid, no shift) there is none and
SDPA runs its unmasked kernel.
"""

from __future__ import annotations

import math

import torch

from vit.layers.attention_core.cache import cached
from vit.layers.attention_core.gathered import GatherTables, gathered_attention, make_tables
from vit.layers.patterns import Pattern


def window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, grid: tuple[int, int], P: int,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """The patch queries' rows [B, H, N, d] of q, k, v [B, H, P + N, d] under a window pattern."""
    return gathered_attention(q, k, v, window_tables(pattern, grid, P, q.shape[1], q.device), dropout_p)


def window_tables(pattern: Pattern, grid: tuple[int, int], P: int, heads: int, device: torch.device) -> GatherTables:
    """The gather tables of a window pattern on ``grid`` (built once per shape and device)."""

    def build() -> GatherTables:
        W, s = pattern.size, pattern.shift
        rows, row_cell = _axis(grid[0], W, s)
        cols, col_cell = _axis(grid[1], W, s)
        nh, nw = rows.shape[0], cols.shape[0]
        real = (rows >= 0)[:, None, :, None] & (cols >= 0)[None, :, None, :]  # (nh, nw, W, W)
        tokens = (rows[:, None, :, None] * grid[1] + cols[None, :, None, :]).where(real, -1).reshape(nh * nw, -1)
        seen = None
        if s or grid[0] % W or grid[1] % W:
            r = row_cell[:, None, :, None].expand(nh, nw, W, W).reshape(nh * nw, -1)
            c = col_cell[None, :, None, :].expand(nh, nw, W, W).reshape(nh * nw, -1)
            seen = (r[:, :, None] == r[:, None, :]) & (c[:, :, None] == c[:, None, :])
        return make_tables(tokens, tokens, seen, grid[0] * grid[1], P, heads, device)

    return cached(("window", pattern, grid, P, heads, str(device)), build)


def _axis(n: int, W: int, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per window along an axis [windows, W]: the original position at each padded, rolled place (−1 = padding)
    and its cell (i − s) // W."""
    padded = math.ceil(n / W) * W
    i = (torch.arange(padded) + s) % padded  # torch.roll(x, −s) puts position i + s at place i
    cell = (i - s).div(W, rounding_mode="floor")
    return i.where(i < n, -1).reshape(-1, W), cell.reshape(-1, W)
