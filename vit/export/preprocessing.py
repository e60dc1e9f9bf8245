"""The input preprocessing another library's folder records, in our record's terms (mean/std, crop, interpolation).

Hugging Face keeps it in ``preprocessor_config.json`` (an image processor's settings: ``image_mean``, ``size``,
``crop_size``, a PIL ``resample`` code), timm in its ``config.json``'s ``pretrained_cfg``. Both become
``{"img_size": [h, w] | None, "mean", "std", "crop_pct", "interpolation"}`` with None where the file is silent.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

HF_PREPROCESSOR_NAME = "preprocessor_config.json"
# PIL's resampling codes, as Hugging Face image processors store them, by timm's names
PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def hf_preprocessing(processor: Mapping[str, Any]) -> dict[str, Any]:
    """A Hugging Face image processor's settings → our preprocessing fields.

    A shortest-edge resize then a center crop gives ``crop_pct`` = crop / edge; a resize to (height, width)
    without a crop gives 1.0 (the image is resized straight to the input size).
    """
    size, crop = processor.get("size") or {}, processor.get("crop_size") or {}
    if isinstance(size, int):
        size = {"shortest_edge": size}
    if isinstance(crop, int):
        crop = {"height": crop, "width": crop}
    img_size, crop_pct = None, None
    if processor.get("do_center_crop") and crop.get("height") and size.get("shortest_edge"):
        img_size = [int(crop["height"]), int(crop["width"])]
        crop_pct = min(img_size) / float(size["shortest_edge"])
    elif size.get("height") and size.get("width"):
        img_size, crop_pct = [int(size["height"]), int(size["width"])], 1.0
    resample = processor.get("resample")
    normalise = processor.get("do_normalize", True)
    return {
        "img_size": img_size,
        "mean": _floats(processor.get("image_mean")) if normalise else [0.0, 0.0, 0.0],
        "std": _floats(processor.get("image_std")) if normalise else [1.0, 1.0, 1.0],
        "crop_pct": crop_pct,
        "interpolation": PIL_RESAMPLE.get(resample, resample if isinstance(resample, str) else None),
    }


def timm_preprocessing(pretrained_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A timm ``pretrained_cfg`` → our preprocessing fields (``input_size`` is [C, H, W])."""
    input_size = pretrained_cfg.get("input_size")
    return {
        "img_size": [int(v) for v in input_size[1:]] if input_size else None,
        "mean": _floats(pretrained_cfg.get("mean")),
        "std": _floats(pretrained_cfg.get("std")),
        "crop_pct": pretrained_cfg.get("crop_pct"),
        "interpolation": pretrained_cfg.get("interpolation"),
    }


def read_hf_preprocessing(folder: Path) -> dict[str, Any] | None:
    """The preprocessing of a Hugging Face folder's ``preprocessor_config.json``, or None without one."""
    path = Path(folder) / HF_PREPROCESSOR_NAME
    if not path.is_file():
        return None
    try:
        return hf_preprocessing(json.loads(path.read_text()))
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"{path} is not a readable image processor config: {e}") from e


def _floats(values: Any) -> list[float] | None:
    if values is None:
        return None
    return [float(v) for v in values] if isinstance(values, list | tuple) else [float(values)] * 3
