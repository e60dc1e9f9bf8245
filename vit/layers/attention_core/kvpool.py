"""kvpool:S by restructuring: keys and values average-pooled S×S on the grid, then one fused SDPA call.

Patch queries keep full resolution and see the prefix keys plus the pooled cells; cells the grid does not fill
(``ceil_mode``) average only the patches they hold.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vit.layers.patterns import Pattern


def kvpool_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, grid: tuple[int, int], P: int,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """The patch queries' rows [B, H, N, d] of q, k, v [B, H, P + N, d]: prefix and pooled keys."""
    keys = torch.cat([k[:, :, :P], _pool(k[:, :, P:], grid, pattern.size)], dim=2)
    values = torch.cat([v[:, :, :P], _pool(v[:, :, P:], grid, pattern.size)], dim=2)
    return F.scaled_dot_product_attention(q[:, :, P:], keys, values, dropout_p=dropout_p)


def _pool(x: torch.Tensor, grid: tuple[int, int], S: int) -> torch.Tensor:
    """Patch keys or values [B, H, h·w, d] → the means of their S×S cells [B, H, M, d]."""
    B, H, _, d = x.shape
    x = x.transpose(2, 3).reshape(B * H, d, *grid)  # (B·H, d, h, w)
    x = F.avg_pool2d(x, S, S, ceil_mode=True, count_include_pad=False)
    return x.reshape(B, H, d, -1).transpose(2, 3)
