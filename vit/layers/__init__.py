"""Building blocks of a Vision Transformer; they import only torch (and timm's DropPath)."""

from timm.layers import to_2tuple

from vit.layers.attention import Attention
from vit.layers.layer_scale import DropPath, LayerScale
from vit.layers.mlp import Mlp
from vit.layers.patch_embed import PatchEmbed
from vit.layers.pos_embed import resample_pos_embed, sincos_2d_pos_embed

__all__ = [
    "Attention",
    "DropPath",
    "LayerScale",
    "Mlp",
    "PatchEmbed",
    "resample_pos_embed",
    "sincos_2d_pos_embed",
    "to_2tuple",
]
