"""A weights folder: which weights file it holds, and which library's ``config.json`` says what network they are.

Three kinds of ``config.json`` are told apart by their fields: ours (the record: ``architecture`` is one of our
classes; a timm hub folder we wrote keeps it under ``"vitkit"``), timm's hub config (``pretrained_cfg``) and
Hugging Face's (``model_type``). Weights are ``model.safetensors`` (or its sharded index), the official MAE's
``checkpoint.pth``, or a ``pytorch_model.bin`` (read with ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from vit.export.hf import hf_record
from vit.export.preprocessing import read_hf_preprocessing
from vit.export.timm_hub import RECORD_FIELD, timm_record
from vit.models import NetworkRecord
from vit.models.record import ARCHITECTURES

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MAE_WEIGHTS_NAME = "checkpoint.pth"
WEIGHT_FILES = (WEIGHTS_NAME, "model.safetensors.index.json", MAE_WEIGHTS_NAME, "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def weights_file(folder: Path) -> Path:
    """The folder's weights file (a sharded checkpoint's index), by the order of ``WEIGHT_FILES``."""
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder} has a {CONFIG_NAME} but none of {list(WEIGHT_FILES)}")


def shard_files(index: Path) -> list[Path]:
    """The shards a ``*.index.json`` lists (``weight_map``: tensor name → file), in order of appearance."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{index} is not a readable sharded-checkpoint index: {e}") from e
    return [index.with_name(name) for name in dict.fromkeys(weight_map.values())]


def read_config(folder: Path) -> dict[str, Any] | None:
    """The folder's ``config.json`` as a dict, or None when there is none."""
    path = folder / CONFIG_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not readable JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, not a JSON object")
    return data


def own_record(config: Mapping[str, Any] | None, source: str) -> NetworkRecord | None:
    """Our record in a ``config.json`` (at its top level, or under ``"vitkit"`` in a timm folder), else None."""
    if config is not None and isinstance(config.get(RECORD_FIELD), Mapping):
        config = config[RECORD_FIELD]
    if config is None or config.get("architecture") not in ARCHITECTURES:
        return None
    return NetworkRecord.from_dict(config, source)


def library_record(config: Mapping[str, Any], state: Mapping[str, torch.Tensor], layout: str, folder: Path,
                   source: str) -> NetworkRecord | None:
    """The record a timm or Hugging Face ``config.json`` gives for ``state`` (already in our keys), or None.

    ``layout`` is the one the weights came in: a config describes them only when the two agree.
    """
    if "model_type" in config and layout == "hf":
        return hf_record(config, state, read_hf_preprocessing(folder), source)
    if "pretrained_cfg" in config and layout in ("vit", "timm"):
        return timm_record(config, source)
    return None
