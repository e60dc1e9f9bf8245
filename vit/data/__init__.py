"""Data: albumentations pipelines, ImageFolder data sets, the built-in digits and the LightningDataModule."""

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
    "TrainPreset",
    "apply_transform",
    "build_eval_transform",
    "build_pretrain_transform",
    "build_train_transform",
    "default_cache_dir",
    "find_classes",
    "list_images",
    "prepare_digits",
    "read_rgb",
    "scan",
    "stratified_split",
]
