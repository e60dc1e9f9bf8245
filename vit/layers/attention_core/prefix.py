"""Class and register tokens are global: their queries see every key, in one SDPA call beside any pattern."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def with_global_prefix(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, P: int, patch_rows: torch.Tensor, dropout_p: float
) -> torch.Tensor:
    """The prefix queries' rows (dense over every key) stacked on ``patch_rows`` [B, H, N, d] → [B, H, P + N, d]."""
    if P == 0:
        return patch_rows
    prefix_rows = F.scaled_dot_product_attention(q[:, :, :P], k, v, dropout_p=dropout_p)
    return torch.cat([prefix_rows, patch_rows], dim=2)


def prefix_keys(x: torch.Tensor, P: int, groups: int) -> torch.Tensor:
    """The prefix keys (or values) [B, H, P, d] repeated for ``groups`` groups of each head → [B, H·groups, P, d]."""
    B, H, _, d = x.shape
    return x[:, :, None, :P].expand(B, H, groups, P, d).reshape(B, H * groups, P, d)
