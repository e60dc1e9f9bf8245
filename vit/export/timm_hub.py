"""timm's hub folder, both ways: the ``config.json`` timm, transformers' TimmWrapper and our loader read.

timm's ``create_model("local-dir:DIR", pretrained=True)`` builds ``architecture`` with ``model_args`` and the
top-level ``num_classes``, and loads ``model.safetensors``; ``pretrained_cfg`` says how inputs are prepared
(``timm.data.resolve_model_data_config``). TimmWrapper passes ``num_classes`` itself, so ``model_args`` must not
hold it. Our record rides along under ``"vitkit"``, a key both libraries ignore. A timm folder without it (timm's
own ``save_for_hf``) is read back as a record when its architecture is one of our registered names.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from typing import Any

import torch
from timm.data import DEFAULT_CROP_PCT

from vit.export.config import normalisation, timm_config
from vit.export.preprocessing import timm_preprocessing
from vit.models import NetworkRecord, VisionTransformer, list_models, model_config
from vit.version import __version__

log = logging.getLogger(__name__)

TAG = "vitkit"  # pretrained_cfg["tag"]: where the weights come from, in timm's name.tag sense
RECORD_FIELD = "vitkit"  # the config.json key holding our export config (record included)


def hub_config(model: VisionTransformer, record: NetworkRecord, vitkit: Mapping[str, Any]) -> dict[str, Any]:
    """timm's ``config.json`` for ``model`` (inputs prepared as ``record`` says), with ``vitkit`` under our key."""
    cfg = timm_config(model)
    mean, std, _ = normalisation(record)
    h, w = model.patch_embed.img_size
    out = {
        "architecture": cfg["architecture"],
        "num_classes": model.num_classes,
        "num_features": model.num_features,
        "global_pool": model.global_pool,
        "model_args": cfg["model_args"],
        "pretrained_cfg": {
            "tag": TAG, "custom_load": False, "input_size": [model.patch_embed.in_chans, h, w],
            "fixed_input_size": not model.dynamic_img_size,
            "interpolation": record.interpolation or "bicubic",  # our eval transform resizes bicubic
            "crop_pct": record.crop_pct if record.crop_pct is not None else DEFAULT_CROP_PCT, "crop_mode": "center",
            "mean": mean, "std": std, "num_classes": model.num_classes, "pool_size": None,
            "first_conv": "patch_embed.proj", "classifier": "head",
        },
    }
    if record.class_names:
        out["label_names"] = list(record.class_names)
    out[RECORD_FIELD] = dict(vitkit)
    return out


def hub_notes(model: VisionTransformer) -> list[str]:
    """What a timm folder of ``model`` cannot say exactly (a name with overrides, arguments timm lacks)."""
    cfg = timm_config(model)
    notes = []
    if not cfg["exact"]:
        notes.append(f"no timm model name has this architecture; config.json builds it as {cfg['architecture']} "
                     f"with overrides of {sorted(cfg['model_args'])}")
    for key, value in cfg["unsupported"].items():
        notes.append(f"timm has no {key} argument: its network uses its own default instead of {value!r} "
                     f"(the checks below measure what that changes; our loader reads the exact network from "
                     f"the '{RECORD_FIELD}' entry)")
    return notes


def timm_record(config: Mapping[str, Any], source: str) -> NetworkRecord | None:
    """The record of a timm hub folder's network when ``architecture`` is one of our names (else None, logged)."""
    name = config.get("architecture")
    pretrained_cfg = config.get("pretrained_cfg") or {}
    if name not in list_models() or model_config(name)[0] is not VisionTransformer:
        log.info("%s: timm architecture %r is not a vitkit model name; build the network and use load_weights",
                 source, name)
        return None
    args = {**model_config(name)[1], **(config.get("model_args") or {})}
    args["num_classes"] = int(config.get("num_classes", pretrained_cfg.get("num_classes", args.get("num_classes", 0))))
    ours = set(inspect.signature(VisionTransformer).parameters)
    if not set(args) <= ours:
        log.info("%s: timm model_args %s have no vitkit counterpart", source, sorted(set(args) - ours))
        return None
    with torch.device("meta"):  # the record of the network as built, without allocating it
        net = VisionTransformer(**args)
    labels = config.get("label_names") or pretrained_cfg.get("label_names")
    names = [str(v) for v in (labels.values() if isinstance(labels, Mapping) else labels or [])] or None
    return NetworkRecord.from_model(net, name=name, preprocessing=timm_preprocessing(pretrained_cfg),
                                    class_names=names)


def model_card(model: VisionTransformer, config: Mapping[str, Any], record: NetworkRecord) -> str:
    """A short ``README.md`` for the folder: what the network is, its inputs, and one line per library to load it."""
    pre = config["pretrained_cfg"]
    _, h, w = pre["input_size"]
    params = sum(p.numel() for p in model.parameters()) / 1e6
    classes = (f"{model.num_classes} ({', '.join(record.class_names[:10])}"
               f"{', ...' if len(record.class_names) > 10 else ''})" if record.class_names
               else str(model.num_classes) if model.num_classes else "none: a backbone (pooled features)")
    task = "image-classification" if model.num_classes else "image-feature-extraction"
    overrides = f" with model_args {config['model_args']}" if config["model_args"] else ""
    return "\n".join([
        "---", "tags:", f"- {task}", "- timm", "- vitkit", "library_name: timm", f"pipeline_tag: {task}", "---",
        f"# {record.name or config['architecture']} (vitkit export)", "",
        f"A Vision Transformer exported by vitkit {__version__} in timm's hub layout.", "",
        "## Model details",
        f"- **Architecture:** timm `{config['architecture']}`{overrides}",
        f"- **Parameters:** {params:.2f} M",
        f"- **Input:** {h}x{w}, mean {pre['mean']}, std {pre['std']}, crop_pct {pre['crop_pct']}, "
        f"{pre['interpolation']} resize",
        f"- **Classes:** {classes}", "",
        "## Use", "", "```python", "import timm", 'model = timm.create_model("local-dir:path/to/this/folder", '
        'pretrained=True).eval()', "", "from transformers import AutoModel  # TimmWrapper",
        'model = AutoModel.from_pretrained("path/to/this/folder")', "", "import vit",
        'model = vit.load_backbone("path/to/this/folder")', "```", "",
    ])
