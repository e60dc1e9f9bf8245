"""Albumentations pipelines: numpy HWC uint8 RGB in, torch float32 CHW out.

Every pipeline ends in `_to_tensor` (Normalize + ToTensorV2), the one place where numpy becomes torch, and
`apply_transform` is the one place a pipeline is called. Resizes use bicubic for upscaling and INTER_AREA
for downscaling (`area_for_downscale`), so a 3000x2000 photo shrunk to 32x32 does not alias. The default
normalisation is timm's ImageNet mean and std.
"""

import math
import random
from collections.abc import Sequence
from typing import Any, Literal

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import to_2tuple

INTERPOLATION = "bicubic"  # timm's name for the cv2.INTER_CUBIC resizes below
TrainPreset = Literal["none", "light", "randaug"]

# Strength presets for classification fine-tuning (big_vision RANDAUG_DEF style).
#   rrc_scale: RandomResizedCrop area range, None = plain resize to img_size
#   randaug:   (num_ops, magnitude 0..10) of the RandAugment-like op set, None = off
#   color_jitter: brightness/contrast/saturation strength, 0 = off
#   erase_prob: random erasing probability (MAE fine-tuning uses reprob 0.25)
TRAIN_PRESETS: dict[TrainPreset, dict[str, Any]] = {
    "none": dict(rrc_scale=None, flip=False, randaug=None, color_jitter=0.0, erase_prob=0.0),
    "light": dict(rrc_scale=(0.08, 1.0), flip=True, randaug=None, color_jitter=0.0, erase_prob=0.0),
    "randaug": dict(rrc_scale=(0.08, 1.0), flip=True, randaug=(2, 9), color_jitter=0.4, erase_prob=0.25),
}


def preprocessing_record(
    img_size: tuple[int, int], mean: Sequence[float], std: Sequence[float], crop_pct: float
) -> dict:
    """What a model trained with these transforms expects of its input, as checkpoints and exports record it."""
    return {"img_size": list(img_size), "mean": [float(m) for m in mean], "std": [float(s) for s in std],
            "crop_pct": float(crop_pct), "interpolation": INTERPOLATION}


def build_pretrain_transform(
    img_size: int | Sequence[int],
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    scale: tuple[float, float] = (0.2, 1.0),
) -> A.Compose:
    """MAE pretraining augmentation: RandomResizedCrop(scale, bicubic) + horizontal flip."""
    h, w = to_2tuple(img_size)
    return A.Compose([_random_resized_crop(h, w, scale), A.HorizontalFlip(p=0.5), *_to_tensor(mean, std)])


def build_train_transform(
    img_size: int | Sequence[int],
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    preset: TrainPreset = "light",
) -> A.Compose:
    """Classification fine-tuning augmentation from a named strength preset in `TRAIN_PRESETS`."""
    if preset not in TRAIN_PRESETS:
        raise ValueError(f"aug preset {preset!r} is unknown; valid presets: {sorted(TRAIN_PRESETS)}")
    cfg = TRAIN_PRESETS[preset]
    h, w = to_2tuple(img_size)
    ops: list[A.BasicTransform | A.BaseCompose] = []
    if cfg["rrc_scale"] is None:
        ops.append(A.Resize(h, w, interpolation=cv2.INTER_CUBIC, area_for_downscale="image"))
    else:
        ops.append(_random_resized_crop(h, w, cfg["rrc_scale"]))
    if cfg["flip"]:
        ops.append(A.HorizontalFlip(p=0.5))
    if cfg["randaug"] is not None:
        ops.append(_randaug(*cfg["randaug"]))
    if cfg["color_jitter"] > 0:
        cj = cfg["color_jitter"]
        ops.append(A.ColorJitter(brightness=cj, contrast=cj, saturation=cj, hue=0.0, p=1.0))
    if cfg["erase_prob"] > 0:
        ops.append(A.Erasing(scale=(0.02, 1 / 3), ratio=(0.3, 3.3), fill="random", p=cfg["erase_prob"]))
    return A.Compose([*ops, *_to_tensor(mean, std)])


def build_eval_transform(
    img_size: int | Sequence[int],
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    crop_pct: float = 0.875,
) -> A.Compose:
    """ImageNet-style eval: resize the shorter side to img_size / crop_pct, then center crop.

    With crop_pct=1.0 the image is resized straight to img_size (aspect not kept; right for tiny images).
    """
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    h, w = to_2tuple(img_size)
    if crop_pct == 1.0:
        ops = [A.Resize(h, w, interpolation=cv2.INTER_CUBIC, area_for_downscale="image")]
    else:
        scaled = (math.floor(h / crop_pct), math.floor(w / crop_pct))
        ops = [
            A.SmallestMaxSize(max_size_hw=scaled, interpolation=cv2.INTER_CUBIC, area_for_downscale="image"),
            A.CenterCrop(h, w, pad_if_needed=True),
        ]
    return A.Compose([*ops, *_to_tensor(mean, std)])


def apply_transform(transform: A.Compose, image: np.ndarray, seed: int | None = None) -> torch.Tensor:
    """Run `transform` on an HWC uint8 RGB image; with `seed`, the draws depend on the seed alone.

    One numpy and one python generator are shared by every op. Compose.set_random_seed would instead give
    each op its own generator with the same seed, so all ops draw the same first number and their
    probabilities fire together (flip, jitter and erasing always co-occur).
    """
    if seed is not None:
        transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
    return transform(image=image)["image"]


def _random_resized_crop(h: int, w: int, scale: tuple[float, float]) -> A.RandomResizedCrop:
    return A.RandomResizedCrop(
        size=(h, w), scale=tuple(scale), interpolation=cv2.INTER_CUBIC, area_for_downscale="image"
    )


def _randaug(num_ops: int, magnitude: float) -> A.SomeOf:
    """RandAugment-like: `num_ops` ops drawn uniformly, each at strength magnitude/10 of its range."""
    m = magnitude / 10.0
    ops = [
        A.Affine(rotate=(-30 * m, 30 * m), p=1.0),
        A.Affine(shear={"x": (-17 * m, 17 * m), "y": (0, 0)}, p=1.0),
        A.Affine(shear={"x": (0, 0), "y": (-17 * m, 17 * m)}, p=1.0),
        A.Affine(translate_percent={"x": (-0.45 * m, 0.45 * m), "y": (0, 0)}, p=1.0),
        A.Affine(translate_percent={"x": (0, 0), "y": (-0.45 * m, 0.45 * m)}, p=1.0),
        A.AutoContrast(p=1.0),
        A.Equalize(p=1.0),
        A.Posterize(num_bits=(max(1, round(8 - 4 * m)), 8), p=1.0),
        A.Solarize(threshold_range=(1.0 - m, 1.0), p=1.0),
        A.RandomBrightnessContrast(brightness_limit=0.9 * m, contrast_limit=0.9 * m, p=1.0),
        A.Sharpen(alpha=(0.0, m), p=1.0),
    ]
    return A.SomeOf(ops, n=num_ops, replace=False, p=1.0)


def _to_tensor(mean: Sequence[float], std: Sequence[float]) -> list[A.BasicTransform]:
    return [A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0), ToTensorV2()]
