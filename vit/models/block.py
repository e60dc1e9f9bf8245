"""The pre-norm transformer block shared by the encoder and the MAE decoder."""

from __future__ import annotations

import torch
from torch import nn

from vit.layers import Attention, DropPath, LayerScale, Mlp, Pattern


class Block(nn.Module):
    """x + DropPath(LayerScale(Attention(norm1(x)))), then the same with the Mlp.

    Args:
        dim: token width.
        num_heads: attention heads.
        mlp_ratio: Mlp hidden width over ``dim``.
        qkv_bias: bias on the qkv projection.
        qk_norm: normalise queries and keys.
        init_values: LayerScale init; None disables LayerScale.
        drop_path: stochastic-depth rate of both residual branches.
        proj_drop: dropout after the attention projection and in the Mlp.
        attn_drop: dropout on the attention weights.
        norm_eps: LayerNorm epsilon (timm and MAE: 1e-6; Hugging Face ViT / ViTMAE: 1e-12).
        pattern: the attention pattern of this block (``vit.layers.patterns``; no parameters of its own).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        init_values: float | None = None,
        drop_path: float = 0.0,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        norm_eps: float = 1e-6,
        pattern: str | Pattern = "dense",
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias, qk_norm, attn_drop, proj_drop, norm_layer, pattern)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Tokens [B, N, C] → [B, N, C]; ``grid`` is the (h, w) patch grid of the last h·w tokens (for patterns)."""
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), grid=grid)))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x
