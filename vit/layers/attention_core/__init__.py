"""The attention core softmax(q kᵀ/√d) v under a pattern, and the backend that computes it.

Every backend computes the same function (tests hold each to the oracle within 1e-5, outputs and gradients):
    sdpa      fused SDPA over every key: dense attention
    mask      SDPA with the pattern's boolean mask (kvpool: over prefix, patch and pooled keys): the oracle;
              any pattern, any device, training and inference, at dense cost
    window    windows reshaped into the batch (padding and Swin's cyclic shift masked): fused SDPA
    kvpool    keys and values average-pooled on the grid before one fused SDPA call
    tiles     query tiles with the halo of keys they see, one masked SDPA call (neighborhood, sliding)
    strided   band chunks and residue groups scored apart, one softmax over both (strided)
    flex      FlexAttention with a cached block mask (neighborhood, sliding, strided, window);
              CUDA: training and inference; CPU: compiled forward only
    counted   FLOP counting only: a stand-in with the pattern's FLOPs and meaningless values (``vit.flops``)

``auto`` picks: dense → sdpa, kvpool → kvpool everywhere; on CUDA window → window and the overlapping patterns →
flex (tiles / strided under export or attention dropout); on the CPU window → window, neighborhood and sliding →
tiles, strided → strided, except below ``SMALL`` tokens, where the masked SDPA call is faster than gathering.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F

from vit.layers.attention_core.counted import counted_attention
from vit.layers.attention_core.flex import flex_attention_core
from vit.layers.attention_core.kvpool import kvpool_attention
from vit.layers.attention_core.oracle import mask_attention, pattern_weights
from vit.layers.attention_core.prefix import with_global_prefix
from vit.layers.attention_core.strided import strided_attention
from vit.layers.attention_core.tiles import tiles_attention
from vit.layers.attention_core.window import window_attention
from vit.layers.patterns import Pattern

BACKENDS = ("auto", "sdpa", "mask", "window", "kvpool", "tiles", "strided", "flex", "counted")
# restructured backends: from q, k, v [B, H, P + N, d] they compute the patch queries' rows [B, H, N, d];
# the prefix queries' rows are dense, beside them
_PATCH_ROWS = {"window": window_attention, "kvpool": kvpool_attention, "tiles": tiles_attention,
               "strided": strided_attention}
_SUPPORTS = {"sdpa": ("dense",), "window": ("window",), "kvpool": ("kvpool",), "tiles": ("neighborhood", "sliding"),
             "strided": ("strided",), "flex": ("window", "neighborhood", "sliding", "strided")}
# tokens below which, on a CPU, the gathers of window / tiles / strided cost more than the attention they save
# (vit bench --attention, 2-core EPYC: at 256 tokens every gathering backend is slower than the mask, at 1,024
# faster), so ``auto`` computes the pattern with the masked SDPA call instead
SMALL = 512
_override: ContextVar[str | None] = ContextVar("vit_attention_backend", default=None)


@contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Compute every patterned attention core inside the ``with`` block with backend ``name`` (dense attention
    stays on sdpa)."""
    _check_backend(name)
    token = _override.set(name)
    try:
        yield
    finally:
        _override.reset(token)


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, grid: tuple[int, int] | None,
    dropout_p: float = 0.0, backend: str = "auto",
) -> torch.Tensor:
    """The pattern's attention of q, k, v [B, heads, T, d] → [B, heads, T, d] (T = prefix + h·w for a pattern)."""
    name = choose_backend(pattern, q, dropout_p, backend)
    if name == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    P = num_prefix(pattern, q.shape[-2], grid)
    if name == "mask":
        return mask_attention(q, k, v, pattern, grid, P, dropout_p)
    if name == "counted":
        return counted_attention(q, k, v, pattern, grid, P)
    if name == "flex":
        if dropout_p:
            raise ValueError(f"attention pattern {pattern}: FlexAttention has no attention dropout; use 'tiles', "
                             "'strided' or 'mask'")
        return flex_attention_core(q, k, v, pattern, grid, P)
    rows = _PATCH_ROWS[name](q, k, v, pattern, grid, P, dropout_p)
    return with_global_prefix(q, k, v, P, rows, dropout_p)


def attention_weights(q: torch.Tensor, k: torch.Tensor, pattern: Pattern, grid: tuple[int, int] | None,
                      scale: float) -> torch.Tensor:
    """Explicit softmax weights over the tokens [B, heads, T, T]; ``weights @ v`` is the pattern's output."""
    if pattern.is_dense:
        return ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    return pattern_weights(q, k, pattern, grid, num_prefix(pattern, q.shape[-2], grid), scale)


def choose_backend(pattern: Pattern, q: torch.Tensor, dropout_p: float = 0.0, backend: str = "auto") -> str:
    """The backend that computes ``pattern`` for queries ``q``: the override, else ``backend``, else auto."""
    name = _override.get() or backend
    _check_backend(name)
    if pattern.is_dense:
        return "sdpa"  # every backend of dense attention is this one
    if name == "auto":
        restructured = {"window": "window", "kvpool": "kvpool", "strided": "strided"}.get(pattern.kind, "tiles")
        if pattern.kind == "kvpool" or (q.device.type == "cuda" and pattern.kind == "window"):
            return restructured
        if q.device.type == "cuda":
            use_flex = dropout_p == 0.0 and not torch.compiler.is_exporting()
            return "flex" if use_flex else restructured
        return "mask" if q.shape[-2] < SMALL else restructured
    if name in _SUPPORTS and pattern.kind not in _SUPPORTS[name]:
        raise ValueError(f"attention backend {name!r} cannot compute pattern {pattern} (it computes "
                         f"{', '.join(_SUPPORTS[name])}); 'mask' computes every pattern")
    return name


def num_prefix(pattern: Pattern, T: int, grid: tuple[int, int] | None) -> int:
    """Prefix tokens in a sequence of T tokens over ``grid``: T − h·w; ValueError naming the shapes if negative."""
    if grid is None:
        raise ValueError(f"attention pattern {pattern} needs the patch grid: call the block with grid=(h, w)")
    P = T - grid[0] * grid[1]
    if P < 0:
        raise ValueError(f"attention pattern {pattern}: {T} tokens cannot hold a {grid[0]}x{grid[1]} patch grid")
    return P


def _check_backend(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "attend", "attention_weights", "choose_backend", "num_prefix", "use_backend"]
