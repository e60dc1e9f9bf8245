"""The one attention module: self-attention in encoder and decoder blocks, cross-attention in MAP pooling."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vit.layers import attention_core as core
from vit.layers.patterns import Pattern, parse_pattern


class Attention(nn.Module):
    """Multi-head attention through ``F.scaled_dot_product_attention``.

    Self-attention when ``context`` is None; otherwise cross-attention with queries from ``x`` and keys and
    values from ``context``, using the same projection weights (so one module serves blocks and pooling).
    A ``pattern`` other than dense restricts which keys each query sees on the (h, w) patch grid passed to
    ``forward`` (``vit.layers.patterns``); it adds no parameters, so the weights are dense attention's.

    Args:
        dim: token width; must be divisible by ``num_heads``.
        num_heads: number of attention heads.
        qkv_bias: add a bias to the query/key/value projection.
        qk_norm: LayerNorm the queries and keys per head before the dot product (ViT-22B style).
        attn_drop: dropout on the attention weights (training only).
        proj_drop: dropout after the output projection.
        norm_layer: norm used for qk-norm.
        pattern: the attention pattern, e.g. ``"window:8"`` (self-attention only).
    """

    fused_attn: bool = True
    backend: str = "auto"  # which kernel computes a pattern (``vit.layers.attention_core``); set per module or class

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        pattern: str | Pattern = "dense",
    ) -> None:
        super().__init__()
        if num_heads <= 0 or dim % num_heads != 0:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        self.pattern = parse_pattern(pattern)
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, grid: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Attend from ``x`` [B, N, C] to itself or to ``context`` [B, M, C]; returns [B, N, C].

        ``grid`` is the (h, w) patch grid of ``x``'s last h·w tokens (the rest are prefix tokens); patterns need it.
        """
        q, k, v = self._qkv(x, context)
        if self.fused_attn:
            out = core.attend(q, k, v, self.pattern, grid, self.attn_drop.p if self.training else 0.0, self.backend)
        else:
            out = self.attn_drop(core.attention_weights(q, k, self.pattern, grid, self.scale)) @ v
        B, _, N, _ = out.shape
        out = out.transpose(1, 2).reshape(B, N, -1)  # (B, nh, N, hd) -> (B, N, C)
        return self.proj_drop(self.proj(out))

    def attention_weights(
        self, x: torch.Tensor, context: torch.Tensor | None = None, grid: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Softmax attention weights [B, heads, N, M], recomputed explicitly (for visualisation).

        Under a pattern, keys a query does not see weigh 0; kvpool spreads a cell's weight over its patches.
        """
        q, k, _ = self._qkv(x, context)
        return core.attention_weights(q, k, self.pattern, grid, self.scale)

    def _qkv(self, x: torch.Tensor, context: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        B, N, C = x.shape
        if context is not None and not self.pattern.is_dense:
            raise ValueError(f"attention pattern {self.pattern} is defined for self-attention; cross-attention "
                             "(context) attends densely")
        if context is None:
            qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)  # each (B, nh, N, hd)
        else:
            w_q, w_kv = self.qkv.weight.split([C, 2 * C])
            b_q, b_kv = self.qkv.bias.split([C, 2 * C]) if self.qkv.bias is not None else (None, None)
            M = context.shape[1]
            q = F.linear(x, w_q, b_q).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
            kv = F.linear(context, w_kv, b_kv).reshape(B, M, 2, self.num_heads, self.head_dim)
            k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, M, hd)
        return self.q_norm(q), self.k_norm(k), v
