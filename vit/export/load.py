"""Reading weights safely (safetensors or ``torch.load(weights_only=True)``) into our models, whatever the layout."""

from __future__ import annotations

import json
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vit.export.interop import detect_layout, encoder_state, mae_official_to_vit, timm_to_vit
from vit.layers import resample_pos_embed
from vit.models import MaskedAutoencoder, VisionTransformer

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint that would run code to unpickle (refused: weights are only ever read as plain data)."""


class WeightsMismatchError(ValueError):
    """Weights whose keys or shapes do not fit the model; the message lists every conflict."""


@dataclass
class LoadReport:
    """What ``load_weights`` did: the layout it detected, and keys it left out under ``strict=False``."""

    layout: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    resampled: list[str] = field(default_factory=list)


def read_state_dict(source: str | Path | dict[str, Any]) -> dict[str, torch.Tensor]:
    """A flat state dict from a path or a checkpoint dict in any supported container.

    Accepts an export directory (``model.safetensors``), a ``.safetensors`` file, a Lightning ``.ckpt``
    (the network under ``model.``), an official MAE / timm ``.pth`` (``model`` / ``state_dict`` entries),
    or a dict already in memory. Pickles are read with ``weights_only=True``: code is never run.
    """
    obj = source if isinstance(source, dict) else _read_file(Path(source))
    for key in ("state_dict", "model", "state_dict_ema", "model_ema"):
        if key in obj and isinstance(obj[key], dict):
            inner = obj[key]
            if key == "state_dict" and "pytorch-lightning_version" in obj:
                # a Lightning checkpoint: our LightningModules hold the network as ``self.model``
                inner = {k.removeprefix("model."): v for k, v in inner.items() if k.startswith("model.")}
            obj = inner
            break
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsMismatchError(f"{_name(source)} is not a state dict: entries {bad[:5]} are not tensors")
    return obj


def load_weights(
    model: nn.Module, source: str | Path | dict[str, Any], strict: bool = True
) -> LoadReport:
    """Load weights of any supported layout (ours, timm, official MAE, Lightning) into ``model``.

    The layout is detected and converted; position embeddings are resampled when the patch grid differs.
    Raises ``WeightsMismatchError`` naming missing and unexpected keys (when ``strict``) and every shape
    conflict (always).
    """
    state = read_state_dict(source)
    layout = detect_layout(state)
    if isinstance(model, MaskedAutoencoder):
        if layout == "mae_official":
            state = mae_official_to_vit(state)
        elif layout in ("vit", "timm"):
            state = {f"encoder.{k}": v for k, v in timm_to_vit(state).items()}
    elif isinstance(model, VisionTransformer):
        state = encoder_state(state)
    report = LoadReport(layout=layout)
    state = _resample_positions(model, state, report)
    own = model.state_dict()
    report.missing = sorted(k for k in own if k not in state)
    report.unexpected = sorted(k for k in state if k not in own)
    shapes = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    problems = []
    if strict and report.missing:
        problems.append(f"missing keys ({len(report.missing)}): {_short(report.missing)}")
    if strict and report.unexpected:
        problems.append(f"unexpected keys ({len(report.unexpected)}): {_short(report.unexpected)}")
    if shapes:
        problems.append(f"shape conflicts ({len(shapes)}): {_short(shapes)}")
    if problems:
        raise WeightsMismatchError(
            f"weights from {_name(source)} (layout {layout!r}) do not fit {type(model).__name__}: "
            + "; ".join(problems)
        )
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return report


def load_backbone(
    path: str | Path, *, num_classes: int | None = None, img_size: int | tuple[int, int] | None = None
) -> VisionTransformer:
    """Rebuild an exported ``VisionTransformer`` from its directory (``config.json`` + ``model.safetensors``).

    Returns the model in eval mode. ``img_size`` resamples position embeddings for another input size;
    ``num_classes`` replaces the head with a fresh one (0 = no head) unless it already has that many.
    """
    path = Path(path)
    config_path = path / CONFIG_NAME if path.is_dir() else path.with_name(CONFIG_NAME)
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: load_backbone needs an export directory "
                                f"(write one with `vit export ... --format safetensors`)")
    config = json.loads(config_path.read_text())
    try:
        model_args = dict(config["model_args"])
    except KeyError as e:
        raise ValueError(f"{config_path} has no 'model_args' entry") from e
    if img_size is not None:
        model_args["img_size"] = img_size
    model = VisionTransformer(**model_args)
    load_weights(model, path / WEIGHTS_NAME if path.is_dir() else path)
    if num_classes is not None and num_classes != model.num_classes:
        model.reset_classifier(num_classes)
    return model.eval()


def _read_file(path: Path) -> dict[str, Any]:
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no weights at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it holds pickled objects that would run code when read "
            f"(only tensors and plain data are accepted; re-save the weights with safetensors or as a "
            f"plain state dict). Detail: {str(e).splitlines()[0]}"
        ) from e


def _resample_positions(model: nn.Module, state: dict[str, torch.Tensor], report: LoadReport) -> dict:
    own = model.state_dict()
    for key, module in (("pos_embed", model), ("encoder.pos_embed", getattr(model, "encoder", None))):
        if not isinstance(module, VisionTransformer) or key not in state or key not in own:
            continue
        if state[key].shape == own[key].shape:
            continue
        prefix = 0 if module.no_embed_class else module.num_prefix_tokens
        n_old = state[key].shape[1] - prefix
        side = int(round(n_old**0.5))
        if side * side != n_old or state[key].shape[-1] != own[key].shape[-1]:
            continue  # not a square grid of the same width: left for the shape check to report
        state[key] = resample_pos_embed(state[key], module.grid_size, (side, side), prefix)
        report.resampled.append(key)
        log.info("resampled %s from a %dx%d grid to %dx%d", key, side, side, *module.grid_size)
    return state


def _short(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f", ... (+{len(items) - n} more)" if len(items) > n else "")


def _name(source: object) -> str:
    return str(source) if isinstance(source, str | Path) else "the given state dict"
