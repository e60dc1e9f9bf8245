"""A resume from a checkpoint of another LightningModule or another architecture is an error naming what differs."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any

from lightning import LightningModule

from vit.errors import BadInputError

CLASS_PATH_KEY = "_class_path"  # where LightningCLI records the module's class in a checkpoint's hyper_parameters


class CheckpointMismatchError(BadInputError):
    """A checkpoint of another LightningModule or architecture than the config builds."""


def check_module_class(checkpoint: Mapping[str, Any], class_path: str | None, source: str) -> None:
    """Raise ``CheckpointMismatchError`` when ``checkpoint`` was saved by another LightningModule class than
    ``class_path`` (what the config builds); a checkpoint that records no class passes."""
    theirs = (checkpoint.get("hyper_parameters") or {}).get(CLASS_PATH_KEY)
    if not theirs or not class_path or _load(theirs) is _load(class_path):
        return
    ours, hint = _load(class_path), ""
    if isinstance(ours, type) and "init_from" in inspect.signature(ours).parameters:
        hint = f"; to start this {class_path.rsplit('.', 1)[-1]} from its weights, use --model.init_args.init_from"
    raise CheckpointMismatchError(f"{source} is a checkpoint of {theirs}, but this config trains {class_path}"
                                  + hint)


def check_checkpoint_matches(module: LightningModule, checkpoint: Mapping[str, Any], source: str) -> None:
    """Raise ``CheckpointMismatchError`` when ``checkpoint`` holds another architecture than ``module``, naming
    what differs.

    Compares parameter names and shapes; the message lists the hyperparameters that differ (e.g.
    ``model_kwargs.embed_dim: checkpoint 128, config 64``) and a few conflicting tensors.
    """
    theirs = checkpoint.get("state_dict") or {}
    ours = module.state_dict()
    missing = sorted(ours.keys() - theirs.keys())
    unexpected = sorted(theirs.keys() - ours.keys())
    shapes = sorted(k for k in ours.keys() & theirs.keys() if tuple(ours[k].shape) != tuple(theirs[k].shape))
    if not (missing or unexpected or shapes):
        return
    fields = _flatten(checkpoint.get("hyper_parameters") or {})
    config = _flatten(dict(getattr(module, "hparams", {})))
    diffs = [f"model.{k}: checkpoint {fields.get(k)!r}, config {config.get(k)!r}"
             for k in sorted(fields.keys() | config.keys()) if fields.get(k) != config.get(k)]
    tensors = [f"{k} {tuple(theirs[k].shape)} vs {tuple(ours[k].shape)}" for k in shapes[:3]]
    raise CheckpointMismatchError(
        f"checkpoint {source} holds another architecture than this config"
        + (f"; fields that differ: {'; '.join(diffs)}" if diffs else "")
        + f". {len(shapes)} shape conflicts ({', '.join(tensors) or 'none'}), {len(missing)} missing and "
        f"{len(unexpected)} unexpected tensors. Resume with the checkpoint's own config, or start a new run."
    )


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def _load(class_path: str) -> Any:
    """The class at ``class_path``, or None when it cannot be imported (then the paths are compared as text)."""
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return class_path
