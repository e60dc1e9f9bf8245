"""Per-channel residual scaling (CaiT); DropPath comes from timm."""

from __future__ import annotations

import torch
from timm.layers import DropPath
from torch import nn

__all__ = ["DropPath", "LayerScale"]


class LayerScale(nn.Module):
    """Multiply a residual branch by a learned per-channel vector initialised to ``init_values``.

    Args:
        dim: channel count.
        init_values: initial scale (small, e.g. 1e-5, lets deep models start close to identity).
    """

    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma
