"""Weights in and out: reading any supported source once (ours, timm, official MAE, Hugging Face folders), key maps,
exporters (safetensors, timm's hub folder, official MAE, ONNX, torch.export)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vit.export.config import export_config, timm_config
    from vit.export.formats import FORMATS
    from vit.export.interop import detect_layout, mae_official_to_vit, timm_to_vit, vit_to_mae_official, vit_to_timm
    from vit.export.load import LoadReport, build_network, load_backbone, load_weights, record_of, resize_model
    from vit.export.read import (
        UnsafeCheckpointError,
        Weights,
        WeightsMismatchError,
        find_checkpoint,
        read_checkpoint,
        read_weights,
    )
    from vit.export.verify import Check, ExportCheckError, ExportReport
    from vit.export.writers import MissingExtraError, export_model

__all__ = [
    "FORMATS",
    "Check",
    "ExportCheckError",
    "ExportReport",
    "LoadReport",
    "MissingExtraError",
    "UnsafeCheckpointError",
    "Weights",
    "WeightsMismatchError",
    "build_network",
    "detect_layout",
    "export_config",
    "export_model",
    "find_checkpoint",
    "load_backbone",
    "load_weights",
    "mae_official_to_vit",
    "read_checkpoint",
    "read_weights",
    "record_of",
    "resize_model",
    "timm_config",
    "timm_to_vit",
    "vit_to_mae_official",
    "vit_to_timm",
]

# imported on first use, so that `vit export --help` reads its options without torch
_MODULES = {
    "vit.export.config": ("export_config", "timm_config"),
    "vit.export.formats": ("FORMATS",),
    "vit.export.interop": ("detect_layout", "mae_official_to_vit", "timm_to_vit", "vit_to_mae_official", "vit_to_timm"),
    "vit.export.load": ("LoadReport", "build_network", "load_backbone", "load_weights", "record_of", "resize_model"),
    "vit.export.read": ("UnsafeCheckpointError", "Weights", "WeightsMismatchError", "find_checkpoint",
                        "read_checkpoint", "read_weights"),
    "vit.export.verify": ("Check", "ExportCheckError", "ExportReport"),
    "vit.export.writers": ("MissingExtraError", "export_model"),
}
_LAZY = {name: module for module, names in _MODULES.items() for name in names}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'vit.export' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
