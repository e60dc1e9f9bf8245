"""Weights in and out: layout conversion (ours ↔ timm ↔ official MAE), safe loading, exporters."""

from vit.export.interop import (
    detect_layout,
    mae_official_to_vit,
    timm_to_vit,
    vit_to_mae_official,
    vit_to_timm,
)
from vit.export.load import (
    LoadReport,
    UnsafeCheckpointError,
    WeightsMismatchError,
    load_backbone,
    load_weights,
    read_state_dict,
)

__all__ = [
    "LoadReport",
    "UnsafeCheckpointError",
    "WeightsMismatchError",
    "detect_layout",
    "load_backbone",
    "load_weights",
    "mae_official_to_vit",
    "read_state_dict",
    "timm_to_vit",
    "vit_to_mae_official",
    "vit_to_timm",
]
