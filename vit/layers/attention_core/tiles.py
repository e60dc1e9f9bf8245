"""neighborhood:K[:D] and sliding:N by gathering query tiles with the halo of keys they see.

Queries are cut into tiles (T×T in each dilation sub-grid, or runs of consecutive tokens for sliding); a tile's
halo is the smallest block of keys that holds every one of its queries' clamped windows. The work is the halo's,
a few times the visible keys, instead of every key.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vit.layers.attention_core.cache import cached
from vit.layers.attention_core.gathered import GatherTables, gathered_attention, make_tables
from vit.layers.pattern_masks import visible
from vit.layers.patterns import Pattern

# tile sides: T×T queries see a (T + K − 1)² halo; larger tiles gather fewer duplicate keys, smaller ones compute
# fewer hidden scores (at K = 7, T = 8: 3x the visible keys computed, 3x the keys gathered)
NEIGHBORHOOD_TILE = 8
SLIDING_TILE = 128  # queries per run; halo 128 + 2N


def tiles_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, grid: tuple[int, int], P: int,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """The patch queries' rows [B, H, N, d] of q, k, v [B, H, P + N, d] under a neighborhood or sliding pattern."""
    return gathered_attention(q, k, v, tile_tables(pattern, grid, P, q.device), dropout_p)


def tile_tables(pattern: Pattern, grid: tuple[int, int], P: int, device: torch.device) -> GatherTables:
    """The gather tables of ``pattern`` on ``grid`` (built once per shape and device)."""

    def build() -> GatherTables:
        queries, keys = tile_indices(pattern, grid)
        seen = visible(pattern, queries[:, :, None] + P, keys[:, None, :] + P, grid, P)
        return make_tables(queries, keys, seen, grid[0] * grid[1], P, device)

    return cached(("tiles", pattern, grid, P, str(device)), build)


def tile_indices(pattern: Pattern, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Query tiles [tiles, Tq] and their halos [tiles, Tk] as patch indices; −1 marks filler."""
    h, w = grid
    if pattern.kind == "sliding":
        return _axis(h * w, 2 * pattern.size + 1, SLIDING_TILE)
    if pattern.kind != "neighborhood":
        raise ValueError(f"the tiles backend computes neighborhood and sliding patterns, not {pattern}")
    K, D = pattern.size, pattern.dilation
    qs, ks = [], []
    for mr in range(min(D, h)):
        for mc in range(min(D, w)):
            qr, kr = _axis(math.ceil((h - mr) / D), K, NEIGHBORHOOD_TILE)
            qc, kc = _axis(math.ceil((w - mc) / D), K, NEIGHBORHOOD_TILE)
            # every (row tile, column tile) pair; sub-grid rows and columns back to patch indices
            qi = (qr * D + mr)[:, None, :, None] * w + (qc * D + mc)[None, :, None, :]
            qi = qi.where((qr >= 0)[:, None, :, None] & (qc >= 0)[None, :, None, :], -1)
            ki = (kr * D + mr)[:, None, :, None] * w + (kc * D + mc)[None, :, None, :]
            qs.append(qi.reshape(qr.shape[0] * qc.shape[0], -1))
            ks.append(ki.reshape(kr.shape[0] * kc.shape[0], -1))
    return _stack(qs), _stack(ks)


def _axis(n: int, K: int, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Along an axis of length n: the queries of each tile [tiles, T] (−1 past the end) and its halo [tiles, Th].

    A query's window is its clamped K-window (``pattern_masks._near``; a ±K//2 band cut at the ends for sliding);
    the halo of the tile starting at ``a`` starts at clamp(a − K//2, 0, n − Th) and holds all its queries' windows.
    """
    T = min(tile, n)
    Th = min(T + min(K, n) - 1, n)
    starts = torch.arange(0, n, T)
    queries = starts[:, None] + torch.arange(T)
    halo = (starts - K // 2).clamp(0, n - Th)[:, None] + torch.arange(Th)
    return queries.where(queries < n, -1), halo


def _stack(parts: list[torch.Tensor]) -> torch.Tensor:
    width = max(p.shape[1] for p in parts)
    return torch.cat([F.pad(p, (0, width - p.shape[1]), value=-1) for p in parts])
