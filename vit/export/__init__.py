"""Weights in and out: reading any supported source once (ours, timm, official MAE, Hugging Face folders), key maps,
exporters (safetensors, timm's hub folder, official MAE, ONNX, torch.export)."""

from vit.export.config import export_config, timm_config
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
from vit.export.writers import FORMATS, MissingExtraError, export_model

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
