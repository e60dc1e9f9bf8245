"""Key maps between our state dicts, timm's VisionTransformer and the official MAE checkpoints; layout detection.

Our encoder already uses timm's names; only the MAP head differs (timm: separate ``q`` and ``kv``
projections; ours: the one ``Attention`` with a fused ``qkv``). Our ``MaskedAutoencoder`` nests the encoder
under ``encoder.``; the official MAE keeps encoder keys at the top level beside the ``decoder_*`` keys.
Hugging Face's layout (``hf``) has its own map, in ``hf.py``.
"""

from __future__ import annotations

from typing import Literal

import torch

from vit.export.hf import is_hf_state

Layout = Literal["vit", "timm", "mae", "mae_official", "hf"]

MAE_DECODER_PREFIXES = ("decoder_", "mask_token")
_MAP_ATTN = ("q_norm", "k_norm", "proj")


def detect_layout(state_dict: dict[str, torch.Tensor]) -> Layout:
    """Name the layout of a state dict: our ViT, timm's ViT, our MAE, the official MAE (with decoder), or a
    Hugging Face ViT / ViTMAE / DINOv2 (whose ``encoder.layer.N`` keys are not our MAE's ``encoder.``)."""
    keys = state_dict.keys()
    if is_hf_state(state_dict):
        return "hf"
    if any(k.startswith("encoder.") for k in keys):
        return "mae"
    if any(k.startswith(MAE_DECODER_PREFIXES) for k in keys):
        return "mae_official"
    if "attn_pool.q.weight" in keys or "attn_pool.kv.weight" in keys:
        return "timm"
    return "vit"


def timm_to_vit(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm ViT → ours: fuse the MAP head's ``q`` and ``kv`` into one ``attn.qkv``; other keys are equal."""
    out = {}
    for k, v in state_dict.items():
        if k.startswith("attn_pool.kv."):
            continue
        if k.startswith("attn_pool.q."):
            suffix = k.removeprefix("attn_pool.q.")
            out[f"attn_pool.attn.qkv.{suffix}"] = torch.cat([v, state_dict[f"attn_pool.kv.{suffix}"]], dim=0)
        elif k.startswith(tuple(f"attn_pool.{n}." for n in _MAP_ATTN)):
            out["attn_pool.attn." + k.removeprefix("attn_pool.")] = v
        else:
            out[k] = v
    return out


def vit_to_timm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ours → timm ViT: split the MAP head's ``attn.qkv`` into ``q`` and ``kv``; other keys are equal."""
    out = {}
    for k, v in state_dict.items():
        if k.startswith("attn_pool.attn.qkv."):
            suffix = k.removeprefix("attn_pool.attn.qkv.")
            q, kv = v.split([v.shape[0] // 3, 2 * v.shape[0] // 3], dim=0)
            out[f"attn_pool.q.{suffix}"], out[f"attn_pool.kv.{suffix}"] = q, kv
        elif k.startswith("attn_pool.attn."):
            out["attn_pool." + k.removeprefix("attn_pool.attn.")] = v
        else:
            out[k] = v
    return out


def mae_official_to_vit(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official MAE (encoder at the top level, ``decoder_*`` beside it) → our ``MaskedAutoencoder``."""
    return {k if k.startswith(MAE_DECODER_PREFIXES) else f"encoder.{k}": v for k, v in state_dict.items()}


def vit_to_mae_official(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our ``MaskedAutoencoder`` (or a bare encoder) → the official MAE layout."""
    return {k.removeprefix("encoder."): v for k, v in state_dict.items()}
