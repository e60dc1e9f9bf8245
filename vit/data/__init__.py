"""Data: albumentations pipelines, ImageFolder data sets, the built-in digits, litdata shards and the DataModules.

``StreamingDataModule`` and ``optimize_folder`` import litdata, so they load on first use (PEP 562 ``__getattr__``):
``import vit.data`` stays as fast as before for everything else.
"""

from typing import Any

from vit.data.builtin import DIGITS_CLASSES, default_cache_dir, prepare_digits
from vit.data.datamodule import ImageDataModule
from vit.data.datasets import (
    IMG_EXTENSIONS,
    BadImageError,
    ImageFolderDataset,
    PredictDataset,
    find_classes,
    list_images,
    read_rgb,
    scan,
)
from vit.data.sampler import EpochSeededSampler
from vit.data.split import stratified_split
from vit.data.transforms import (
    TRAIN_PRESETS,
    TrainPreset,
    apply_transform,
    build_eval_transform,
    build_pretrain_transform,
    build_train_transform,
)

__all__ = [
    "DIGITS_CLASSES",
    "IMG_EXTENSIONS",
    "TRAIN_PRESETS",
    "BadImageError",
    "EpochSeededSampler",
    "ImageDataModule",
    "ImageFolderDataset",
    "PredictDataset",
    "StreamingDataModule",
    "TrainPreset",
    "apply_transform",
    "build_eval_transform",
    "build_pretrain_transform",
    "build_train_transform",
    "default_cache_dir",
    "find_classes",
    "list_images",
    "optimize_folder",
    "prepare_digits",
    "read_rgb",
    "scan",
    "stratified_split",
]

_LAZY = {"StreamingDataModule": "vit.data.streaming", "optimize_folder": "vit.data.optimize"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
