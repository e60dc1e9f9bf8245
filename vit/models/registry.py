"""Named model sizes: one table of published widths, depths and heads, and the registry generated from it."""

from __future__ import annotations

import difflib
import fnmatch
from typing import Any

from torch import nn

# name: (embed_dim, depth, num_heads, mlp_ratio). Parameter counts of vit_<name>_patch16_224 with a
# 1000-class head, equal to timm's models of the same name (checked in tests/test_models.py):
SIZES: dict[str, tuple[int, int, int, float]] = {
    "tiny": (192, 12, 3, 4.0),  # 5,717,416
    "small": (384, 12, 6, 4.0),  # 22,050,664
    "base": (768, 12, 12, 4.0),  # 86,567,656
    "large": (1024, 24, 16, 4.0),  # 304,326,632
    "huge": (1280, 32, 16, 4.0),  # 632,199,400; vit_huge_patch14_224: 632,045,800
}
# Resolutions each patch size is registered at (a resolution must be a multiple of the patch).
RESOLUTIONS: dict[int, tuple[int, ...]] = {16: (224, 384), 32: (224, 384), 14: (224, 518)}
# The MAE decoder of the paper (512 wide, 8 deep, 16 heads) for base and up. For tiny and small encoders
# that decoder would cost more than the encoder, so they get a light one (ours, not published).
MAE_DECODERS: dict[str, tuple[int, int, int]] = {
    "tiny": (128, 4, 4),
    "small": (128, 4, 4),
    "base": (512, 8, 16),
    "large": (512, 8, 16),
    "huge": (512, 8, 16),
}

_REGISTRY: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {}


def register_model(name: str, cls: type[nn.Module], **kwargs: Any) -> None:
    """Register ``name`` as ``cls(**kwargs)``; a later ``create_model(name, **overrides)`` builds it."""
    if name in _REGISTRY:
        raise ValueError(f"model name {name!r} is already registered")
    _REGISTRY[name] = (cls, kwargs)


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style ``pattern`` (e.g. ``"vit_small_*"``), sorted."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def model_config(name: str) -> tuple[type[nn.Module], dict[str, Any]]:
    """The class and constructor arguments registered under ``name``; ValueError suggests close names."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see vit.list_models()"
        raise ValueError(f"unknown model name {name!r}{hint}")
    cls, kwargs = _REGISTRY[name]
    return cls, dict(kwargs)


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build the named model; any constructor argument can be overridden (e.g. ``num_classes=10``)."""
    cls, kwargs = model_config(name)
    kwargs.update(overrides)
    return cls(**kwargs)


def _register_defaults() -> None:
    from vit.models.mae import MaskedAutoencoder
    from vit.models.vision_transformer import VisionTransformer

    for size, (dim, depth, heads, mlp_ratio) in SIZES.items():
        arch = dict(embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=mlp_ratio)
        for patch, resolutions in RESOLUTIONS.items():
            for res in resolutions:
                register_model(f"vit_{size}_patch{patch}_{res}", VisionTransformer, img_size=res, patch_size=patch,
                               **arch)
        dec_dim, dec_depth, dec_heads = MAE_DECODERS[size]
        for patch in (14, 16):
            register_model(
                f"mae_vit_{size}_patch{patch}", MaskedAutoencoder, img_size=224, patch_size=patch, **arch,
                decoder_embed_dim=dec_dim, decoder_depth=dec_depth, decoder_num_heads=dec_heads,
            )


_register_defaults()
