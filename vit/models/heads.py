"""Pooling heads: class token, global average, and multihead attention pooling (MAP)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from vit.layers import Attention, Mlp

GlobalPool = Literal["token", "avg", "map"]
GLOBAL_POOLS: tuple[str, ...] = ("token", "avg", "map")


class MAPHead(nn.Module):
    """Multihead attention pooling: learned probe tokens cross-attend to the sequence, then an Mlp residual.

    The probe attends through the same ``Attention`` module the blocks use (as big_vision's MAPHead);
    the output is the mean over probes (one probe by default) → [B, C].

    Args:
        dim: token width.
        num_heads: attention heads.
        mlp_ratio: Mlp hidden width over ``dim``.
        qkv_bias: bias on the projections.
        qk_norm: normalise queries and keys.
        num_probes: number of learned probe (latent) tokens.
        norm_eps: LayerNorm epsilon.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        num_probes: int = 1,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.latent = nn.Parameter(torch.zeros(1, num_probes, dim))
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm, norm_layer=norm_layer)
        self.norm = norm_layer(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer)
        nn.init.trunc_normal_(self.latent, std=dim**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens [B, N, C] → pooled [B, C]."""
        probe = self.latent.expand(x.shape[0], -1, -1)
        x = self.attn(probe, context=x)  # (B, num_probes, C)
        x = x + self.mlp(self.norm(x))
        return x.mean(dim=1)

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """The probes' attention over the tokens [B, heads, num_probes, N]."""
        return self.attn.attention_weights(self.latent.expand(x.shape[0], -1, -1), context=x)


def pool_tokens(x: torch.Tensor, global_pool: str, num_prefix_tokens: int) -> torch.Tensor:
    """Token or average pooling of [B, prefix + N, C] → [B, C] (the average skips the first ``num_prefix_tokens``)."""
    if global_pool == "token":
        return x[:, 0]
    if global_pool == "avg":
        return x[:, num_prefix_tokens:].mean(dim=1)
    raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}, got {global_pool!r}")
