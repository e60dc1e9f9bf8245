"""Building blocks of a Vision Transformer; they import only torch (and timm's DropPath)."""

from timm.layers import to_2tuple

from vit.layers.attention import Attention
from vit.layers.attention_core import BACKENDS, use_backend
from vit.layers.layer_scale import DropPath, LayerScale
from vit.layers.mlp import Mlp
from vit.layers.patch_embed import PatchEmbed
from vit.layers.pattern_masks import density, pattern_mask, visible, visible_counts
from vit.layers.patterns import KINDS, SPATIAL, AttentionSpec, Pattern, attention_schedule, parse_pattern
from vit.layers.pos_embed import resample_pos_embed, sincos_2d_pos_embed

__all__ = [
    "BACKENDS",
    "KINDS",
    "SPATIAL",
    "Attention",
    "AttentionSpec",
    "DropPath",
    "LayerScale",
    "Mlp",
    "PatchEmbed",
    "Pattern",
    "attention_schedule",
    "density",
    "parse_pattern",
    "pattern_mask",
    "resample_pos_embed",
    "sincos_2d_pos_embed",
    "to_2tuple",
    "use_backend",
    "visible",
    "visible_counts",
]
