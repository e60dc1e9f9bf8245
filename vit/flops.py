"""FLOP counting shared by ``vit plan`` and ``vit bench``: torch's counter plus fused attention, and closed forms.

Counts are model FLOPs (2 per multiply-add): the backward of attention counts its four gradient matmuls, not the
scores a fused kernel recomputes, so fused and manual attention count the same on every device. Under an attention
pattern the core counts as density × dense (the visible query-key pairs), whatever kernel computes it: torch's
counter raises on flex attention, and restructured kernels also compute padding and halos.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vit.layers import density, use_backend
from vit.models import MaskedAutoencoder, VisionTransformer

aten = torch.ops.aten

SDPA_KERNELS = (
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
)


def sdpa_flops(q_shape: Sequence[int], k_shape: Sequence[int], v_shape: Sequence[int]) -> int:
    """Forward FLOPs of softmax(q kᵀ) v for q [..., N, d], k [..., M, d], v [..., M, dv]: two batched matmuls.

    Heads are taken from the query, so grouped-query attention (fewer key/value heads) counts correctly.
    """
    *lead, N, d = q_shape
    M, dv = k_shape[-2], v_shape[-1]
    b = math.prod(lead)
    return 2 * b * N * M * d + 2 * b * N * M * dv


def sdpa_backward_flops(q_shape: Sequence[int], k_shape: Sequence[int], v_shape: Sequence[int]) -> int:
    """Backward model FLOPs: dV = Pᵀ·dO, dP = dO·Vᵀ, dQ = dS·K, dK = dSᵀ·Q, twice the forward.

    Kernels that recompute the scores do one more matmul; torch's own CUDA formulas count it, we do not, so
    fused and manual attention count the same and MFU means the same on every device.
    """
    return 2 * sdpa_flops(q_shape, k_shape, v_shape)


def sdpa_flop_mapping() -> dict[Any, Callable[..., int]]:
    """``custom_mapping`` for ``FlopCounterMode``: every fused SDPA kernel, forward and backward.

    The CPU flash kernel (``_scaled_dot_product_flash_attention_for_cpu``) has no formula in torch, so its
    attention would count as zero; the CUDA kernels are overridden too so the backward counts model FLOPs
    everywhere. All these ops take (q, k, v) [B, H, N, d] first, their backwards (grad_out, q, k, v).
    """
    mapping: dict[Any, Callable[..., int]] = {}
    for name in SDPA_KERNELS:
        if hasattr(aten, name):
            mapping[getattr(aten, name)] = _sdpa_forward_formula
        if hasattr(aten, f"{name}_backward"):
            mapping[getattr(aten, f"{name}_backward")] = _sdpa_backward_formula
    return mapping


def count_flops(fn: Callable[[], Any]) -> int:
    """Total FLOPs of everything ``fn()`` runs (matmuls, convolutions and attention; 2 FLOPs per MAC).

    Patterned attention cores run as the ``counted`` stand-in (``vit.layers.attention_core``), whose SDPA calls
    hold exactly the visible pairs: density × dense, forward and backward. Its values are meaningless, which a
    count does not read.
    """
    with FlopCounterMode(display=False, custom_mapping=sdpa_flop_mapping()) as counter, use_backend("counted"):
        fn()
    return counter.get_total_flops()


def attention_densities(model: VisionTransformer | MaskedAutoencoder) -> list[tuple[str, float]]:
    """(pattern, density) of every block at the model's grid: the encoder's, then an MAE decoder's.

    An MAE's encoder sees a random subset of the patches and is dense there (``MaskedAutoencoder``).
    """
    encoder = model.encoder if isinstance(model, MaskedAutoencoder) else model
    grid, P = encoder.grid_size, encoder.num_prefix_tokens
    blocks = list(encoder.blocks) + (list(model.decoder_blocks) if isinstance(model, MaskedAutoencoder) else [])
    return [(str(b.attn.pattern), density(b.attn.pattern, grid, P)) for b in blocks]


def vit_forward_flops(model: VisionTransformer) -> int:
    """Analytical forward FLOPs of one image at the model's ``img_size``: matmuls, attention, patch projection.

    Norms, activations, softmax and additions are not counted (nor by ``FlopCounterMode``); they are a few
    per mille of the total.
    """
    pe = model.patch_embed
    D, L = model.embed_dim, pe.num_patches
    T = model.num_prefix_tokens + L
    flops = 2 * L * pe.in_chans * pe.patch_size[0] * pe.patch_size[1] * D
    flops += sum(_block_flops(T, D, blk.mlp.fc1.out_features, rho)
                 for blk, (_, rho) in zip(model.blocks, attention_densities(model), strict=True))
    if model.attn_pool is not None:
        P = model.attn_pool.latent.shape[1]
        S = T if model.pool_include_prefix else L
        hidden = model.attn_pool.mlp.fc1.out_features
        flops += 2 * P * D * D + 2 * S * D * 2 * D + 2 * P * S * D * 2 + 2 * P * D * D + 2 * 2 * P * D * hidden
    if isinstance(model.head, nn.Linear):
        flops += 2 * D * model.head.out_features
    return flops


def mae_forward_flops(mae: MaskedAutoencoder, mask_ratio: float) -> int:
    """Analytical forward FLOPs of one image: the kept patches embedded and encoded, every one decoded.

    Kept patches are ``int(L·(1 − mask_ratio))``, as in ``random_masking``; the loss has no matmuls. Decoder
    patterns count their density (an encoder pattern runs only at mask ratio 0, over the whole grid).
    """
    enc, pe = mae.encoder, mae.encoder.patch_embed
    D, L, P = enc.embed_dim, pe.num_patches, enc.num_prefix_tokens
    T_keep, Dd = P + int(L * (1 - mask_ratio)), mae.decoder_embed.out_features
    rho = [r for _, r in attention_densities(mae)]
    flops = 2 * (T_keep - P) * pe.in_chans * pe.patch_size[0] * pe.patch_size[1] * D
    flops += sum(_block_flops(T_keep, D, blk.mlp.fc1.out_features, rho[i] if mask_ratio == 0 else 1.0)
                 for i, blk in enumerate(enc.blocks))
    flops += 2 * T_keep * D * Dd
    flops += sum(_block_flops(P + L, Dd, blk.mlp.fc1.out_features, r)
                 for blk, r in zip(mae.decoder_blocks, rho[len(enc.blocks):], strict=True))
    return flops + 2 * L * Dd * mae.decoder_pred.out_features


def _block_flops(T: int, D: int, hidden: int, rho: float = 1.0) -> int:
    """One pre-norm block on T tokens of width D: qkv, scores and weighted sum (``rho`` of dense's), projection,
    two MLP layers."""
    return 2 * T * D * 3 * D + round(rho * T * T) * 2 * D * 2 + 2 * T * D * D + 2 * 2 * T * D * hidden


def _sdpa_forward_formula(q: Sequence[int], k: Sequence[int], v: Sequence[int], *args: Any, **kwargs: Any) -> int:
    return sdpa_flops(q, k, v)


def _sdpa_backward_formula(
    grad_out: Sequence[int], q: Sequence[int], k: Sequence[int], v: Sequence[int], *args: Any, **kwargs: Any
) -> int:
    return sdpa_backward_flops(q, k, v)
