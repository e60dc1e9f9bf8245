"""What each pattern means, stated once: the visible-key predicate, keys per query, density and the oracle masks.

Tokens are the ``P`` prefix tokens (class, registers) followed by the (h, w) patch grid in raster order; ``q``
and ``k`` below are token indices. Borders and grids the pattern does not divide:
- window: cells start at the top-left corner (shifted: at rows and columns ``shift + k·W``); border cells are
  partial, nothing is padded into them.
- neighborhood: the K×K window (in the query's D×D sub-grid) is clamped inside the grid, so every query sees
  K×K keys, as NATTEN does; a sub-grid axis shorter than K is seen whole.
- sliding, strided: the band is cut at the ends of the sequence.
- kvpool: the last row and column of S×S cells are partial and average only the patches they hold.
"""

from __future__ import annotations

import math

import torch

from vit.layers.patterns import Pattern


def visible(pattern: Pattern, q: torch.Tensor, k: torch.Tensor, grid: tuple[int, int], num_prefix: int) -> torch.Tensor:
    """Whether query token ``q`` sees key token ``k`` (broadcasting bool tensor; not defined for kvpool).

    Elementwise integer ops only, so the same function builds the oracle mask and serves as FlexAttention's
    ``mask_mod``.
    """
    P, (h, w) = num_prefix, grid
    glob = (q < P) | (k < P)
    pq, pk = q - P, k - P
    if pattern.kind == "dense":
        return glob | (pq == pq)
    if pattern.kind == "sliding":
        return glob | ((pq - pk).abs() <= pattern.size)
    if pattern.kind == "strided":
        d = pq - pk
        return glob | (d.abs() < pattern.size) | (d % pattern.size == 0)
    rq, cq, rk, ck = pq // w, pq % w, pk // w, pk % w
    if pattern.kind == "window":
        W, s = pattern.size, pattern.shift
        return glob | (((rq - s) // W == (rk - s) // W) & ((cq - s) // W == (ck - s) // W))
    if pattern.kind == "neighborhood":
        K, D = pattern.size, pattern.dilation
        return glob | (_near(rq, rk, h, K, D) & _near(cq, ck, w, K, D))
    raise ValueError(f"attention pattern {pattern} is not a mask over the tokens (kvpool makes new keys)")


def visible_counts(pattern: Pattern, grid: tuple[int, int], num_prefix: int) -> torch.Tensor:
    """Keys each query sees [P + h·w] (int64), in closed form per pattern (kvpool: pooled keys count as keys)."""
    P, (h, w) = num_prefix, grid
    N = h * w
    i = torch.arange(N)
    r, c = i // w, i % w
    if pattern.kind == "dense":
        core = torch.full((N,), N)
    elif pattern.kind == "window":
        core = _cell_sizes(h, pattern.size, pattern.shift)[r] * _cell_sizes(w, pattern.size, pattern.shift)[c]
    elif pattern.kind == "neighborhood":
        core = _window_lengths(h, pattern.size, pattern.dilation)[r] * _window_lengths(w, pattern.size,
                                                                                       pattern.dilation)[c]
    elif pattern.kind == "sliding":
        n = pattern.size
        core = (i + n).clamp(max=N - 1) - (i - n).clamp(min=0) + 1
    elif pattern.kind == "strided":
        S = pattern.size
        band = (i + S - 1).clamp(max=N - 1) - (i - S + 1).clamp(min=0) + 1
        core = band + (N - 1 - i % S) // S + 1 - 1  # the column, less the query itself (already in the band)
    elif pattern.kind == "kvpool":
        core = torch.full((N,), pooled_cells(grid, pattern.size)[1])
    else:
        raise ValueError(f"unknown attention pattern {pattern}")
    return torch.cat([torch.full((P,), P + N), core + P]).long()


def density(pattern: Pattern, grid: tuple[int, int], num_prefix: int) -> float:
    """Visible (query, key) pairs over dense attention's: the attention core's FLOPs relative to dense."""
    T = num_prefix + grid[0] * grid[1]
    return visible_counts(pattern, grid, num_prefix).sum().item() / (T * T)


def pattern_mask(pattern: Pattern, grid: tuple[int, int], num_prefix: int) -> torch.Tensor:
    """The oracle mask [T, T] (True = visible) on the CPU, for any pattern but kvpool (``kvpool_mask``)."""
    t = torch.arange(num_prefix + grid[0] * grid[1])
    return visible(pattern, t[:, None], t[None, :], grid, num_prefix)


def pooled_cells(grid: tuple[int, int], size: int) -> tuple[torch.Tensor, int]:
    """The S×S cell of every patch [h·w] (raster order of cells) and the number of cells."""
    h, w = grid
    i = torch.arange(h * w)
    cols = math.ceil(w / size)
    return (i // w // size) * cols + (i % w) // size, math.ceil(h / size) * cols


def pool_matrix(grid: tuple[int, int], size: int) -> torch.Tensor:
    """[M, h·w] averaging matrix: pooled = matrix @ patches, each cell the mean of the patches it holds."""
    cell, M = pooled_cells(grid, size)
    onehot = (cell[None, :] == torch.arange(M)[:, None]).float()
    return onehot / onehot.sum(dim=1, keepdim=True)


def kvpool_mask(grid: tuple[int, int], num_prefix: int, size: int) -> torch.Tensor:
    """The kvpool oracle's mask [T, T + M] over the keys (prefix, patches, pooled cells).

    Prefix queries see the prefix and every patch; patch queries see the prefix and the pooled cells.
    """
    P, N = num_prefix, grid[0] * grid[1]
    M = pooled_cells(grid, size)[1]
    mask = torch.zeros(P + N, P + N + M, dtype=torch.bool)
    mask[:P, : P + N] = True
    mask[P:, :P] = True
    mask[P:, P + N :] = True
    return mask


def _near(iq: torch.Tensor, ik: torch.Tensor, n: int, K: int, D: int) -> torch.Tensor:
    """Along one axis of length n: is ik in the clamped K-window of iq inside iq's dilation sub-grid?"""
    m = iq % D
    length = (n - m + D - 1) // D  # of the sub-grid that holds iq
    kk = length.clamp(max=K)
    start = torch.minimum(iq // D - K // 2, length - kk).clamp(min=0)
    b = ik // D
    return (ik % D == m) & (b >= start) & (b < start + kk)


def _cell_sizes(n: int, W: int, shift: int) -> torch.Tensor:
    """Per position of an axis of length n, the length of its window cell."""
    cell = (torch.arange(n) - shift).div(W, rounding_mode="floor")
    cell = cell - cell.min()
    return torch.bincount(cell)[cell]


def _window_lengths(n: int, K: int, D: int) -> torch.Tensor:
    """Per position of an axis of length n, how many positions its clamped, dilated window holds."""
    m = torch.arange(n) % D
    return ((n - m + D - 1) // D).clamp(max=K)
