"""Weights in and out: layout conversion (ours ↔ timm ↔ official MAE), safe loading, exporters."""

from vit.export.formats import (
    FORMATS,
    Check,
    ExportCheckError,
    ExportReport,
    MissingExtraError,
    export_config,
    export_model,
    timm_config,
)
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
    find_checkpoint,
    load_backbone,
    load_weights,
    model_from_checkpoint,
    read_checkpoint,
    read_state_dict,
    resize_model,
)

__all__ = [
    "FORMATS",
    "Check",
    "ExportCheckError",
    "ExportReport",
    "LoadReport",
    "MissingExtraError",
    "UnsafeCheckpointError",
    "WeightsMismatchError",
    "detect_layout",
    "export_config",
    "export_model",
    "find_checkpoint",
    "load_backbone",
    "load_weights",
    "mae_official_to_vit",
    "model_from_checkpoint",
    "read_checkpoint",
    "read_state_dict",
    "resize_model",
    "timm_config",
    "timm_to_vit",
    "vit_to_mae_official",
    "vit_to_timm",
]
