"""The oracle: SDPA with the pattern's boolean mask over every key, and the explicit softmax weights it implies.

Every backend is tested against it. kvpool's oracle appends the pooled cells (averaged with an explicit matrix,
not the pooling op its fast path uses) to the keys, so that one mask says who sees what.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vit.layers.attention_core.cache import cached
from vit.layers.pattern_masks import kvpool_mask, pattern_mask, pool_matrix
from vit.layers.patterns import Pattern


def mask_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, grid: tuple[int, int], P: int,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """softmax(q kᵀ/√d + mask) v for q, k, v [B, H, T, d] → [B, H, T, d]."""
    if pattern.kind == "kvpool":
        k, v = _with_pooled(k, pattern, grid, P), _with_pooled(v, pattern, grid, P)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=oracle_mask(pattern, grid, P, q.device),
                                          dropout_p=dropout_p)


def pattern_weights(
    q: torch.Tensor, k: torch.Tensor, pattern: Pattern, grid: tuple[int, int], P: int, scale: float
) -> torch.Tensor:
    """Attention weights over the tokens [B, H, T, T]: ``weights @ v`` is the pattern's output.

    kvpool: a pooled cell's weight is shared evenly by the patches it averages, which reproduces its output.
    """
    T = q.shape[-2]
    keys = _with_pooled(k, pattern, grid, P) if pattern.kind == "kvpool" else k
    scores = (q * scale) @ keys.transpose(-2, -1)
    weights = scores.masked_fill(~oracle_mask(pattern, grid, P, q.device), float("-inf")).softmax(dim=-1)
    if pattern.kind != "kvpool":
        return weights
    spread = torch.cat([torch.zeros(pool_matrix(grid, pattern.size).shape[0], P), pool_matrix(grid, pattern.size)],
                       dim=1).to(weights)  # (M, T)
    return weights[..., :T] + weights[..., T:] @ spread


def oracle_mask(pattern: Pattern, grid: tuple[int, int], P: int, device: torch.device) -> torch.Tensor:
    """The boolean mask [T, T] (kvpool: [T, T + M]) on ``device``, built once per pattern and grid."""

    def build() -> torch.Tensor:
        if pattern.kind == "kvpool":
            return kvpool_mask(grid, P, pattern.size).to(device)
        return pattern_mask(pattern, grid, P).to(device)

    return cached(("oracle", pattern, grid, P, str(device)), build)


def _with_pooled(x: torch.Tensor, pattern: Pattern, grid: tuple[int, int], P: int) -> torch.Tensor:
    """Keys or values [B, H, T, d] followed by their S×S cell means [B, H, T + M, d]."""
    pool = cached(("pool", grid, pattern.size, str(x.device), x.dtype),
                  lambda: pool_matrix(grid, pattern.size).to(device=x.device, dtype=x.dtype))
    return torch.cat([x, pool @ x[:, :, P:]], dim=2)
