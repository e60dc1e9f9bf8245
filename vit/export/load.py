"""Weights into models: ``load_weights`` (any source into a given model), ``load_backbone`` (built from the record).

A source is read once (``read_weights``); what remains here is fitting its state to the target: an MAE's
encoder into a ViT (the decoder dropped) or a ViT into an MAE's encoder, position embeddings resampled from the
recorded patch grid (the way the source's library resamples them, when it recorded one: Hugging Face ViT and
DINOv2 without antialias), and the parts the caller expects to be new (a fresh head, a probe) left at their init.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vit.errors import BadInputError
from vit.export.folder import read_config
from vit.export.read import Weights, WeightsMismatchError, read_weights
from vit.layers import resample_pos_embed, to_2tuple
from vit.models import MaskedAutoencoder, NetworkRecord, VisionTransformer, create_model

log = logging.getLogger(__name__)

MAE_DECODER_PREFIXES = ("decoder_", "mask_token")
DEFAULT_RESAMPLE = {"mode": "bicubic", "antialias": True}  # timm's resample_abs_pos_embed
GRAPH_LOADERS = {"aoti": "torch._inductor.aoti_load_package('{file}')",
                 "torch-export": "torch.export.load('{file}').module()",
                 "onnx": "onnxruntime.InferenceSession('{file}')"}


@dataclass
class LoadReport:
    """What ``load_weights`` did: the source's layout, keys left out or kept fresh, tensors resampled (and how)."""

    layout: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    resampled: list[str] = field(default_factory=list)
    resample_mode: str | None = None
    fresh: list[str] = field(default_factory=list)
    dropped_decoder: bool = False


def load_weights(
    model: nn.Module,
    source: str | Path | dict[str, Any] | Weights,
    strict: bool = True,
    new: Sequence[str] = (),
    grid_size: tuple[int, int] | None = None,
    resample: Mapping[str, Any] | None = None,
) -> LoadReport:
    """Load weights of any supported source (ours, timm, official MAE, Lightning, export folder) into ``model``.

    ``new`` lists key prefixes the caller expects to be new (e.g. ``("head.",)`` for another class count): under
    them a key may be missing from the source or differ in shape (the model keeps its init; ``report.fresh``),
    and source keys the model lacks are dropped. Position embeddings are resampled from the source's patch grid:
    the recorded one, else ``grid_size``, else a square grid (the convention of timm and the official MAE,
    whose files record no grid), by ``resample`` (``{"mode": ..., "antialias": ...}``), else the way the record
    says the source's library does it, else bicubic with antialias (timm's); ``report.resample_mode`` says which.
    Raises ``WeightsMismatchError`` naming missing and unexpected keys (when ``strict``) and every shape
    conflict outside ``new`` (always).
    """
    weights = read_weights(source)
    state, dropped_decoder = _fit_to(model, weights.state)
    report = LoadReport(layout=weights.layout, dropped_decoder=dropped_decoder)
    record = weights.record
    grid = grid_size or (record.grid_size if record is not None else None)
    how = dict(resample or (record.pos_resample if record is not None else None) or DEFAULT_RESAMPLE)
    state = _resample_positions(model, state, report, grid, how)
    own = model.state_dict()
    new = tuple(new)
    for k in [k for k in state if k.startswith(new) and (k not in own or state[k].shape != own[k].shape)]:
        del state[k]
    report.fresh = sorted(k for k in own if k not in state and k.startswith(new))
    report.missing = sorted(k for k in own if k not in state and not k.startswith(new))
    report.unexpected = sorted(k for k in state if k not in own)
    shapes = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
              for k, v in state.items() if k in own and v.shape != own[k].shape]
    problems = []
    if strict and report.missing:
        problems.append(f"missing keys ({len(report.missing)}): {_short(report.missing)}")
    if strict and report.unexpected:
        problems.append(f"unexpected keys ({len(report.unexpected)}): {_short(report.unexpected)}")
    if shapes:
        problems.append(f"shape conflicts ({len(shapes)}): {_short(shapes)}")
    if problems:
        raise WeightsMismatchError(f"weights from {weights.source} (layout {weights.layout!r}) do not fit "
                                   f"{type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return report


def load_backbone(
    path: str | Path, *, num_classes: int | None = None, img_size: int | tuple[int, int] | None = None
) -> VisionTransformer:
    """Rebuild a ``VisionTransformer`` from what ``vit export`` writes, or a checkpoint or run folder, without YAML.

    The network is built from the record its source holds (an MAE gives its encoder). Returns it in eval mode.
    ``img_size`` resamples position embeddings for another input size; ``num_classes`` replaces the head with a
    fresh one (0 = no head) unless it already has that many.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: load_backbone needs an export folder "
                                f"(write one with `vit export ... --format safetensors`) or a checkpoint")
    _refuse_graph_export(path)
    weights = read_weights(path)
    model = build_network(weights, backbone=True)
    if img_size is not None and to_2tuple(img_size) != model.patch_embed.img_size:
        model = resize_model(model, img_size, weights.record.pos_resample if weights.record else None)
    if num_classes is not None and num_classes != model.num_classes:
        model.reset_classifier(num_classes)
    return model.eval()


def build_network(weights: Weights, backbone: bool = False, name: str | None = None,
                  model_args: dict[str, Any] | None = None) -> nn.Module:
    """The network ``weights`` came from, built from its record (or ``name`` + ``model_args``) and loaded strictly.

    ``backbone`` asks for a ``VisionTransformer`` (an MAE's encoder); ``name`` overrides the record's network.
    The network's ``pretrained_cfg`` (timm's data config) takes the record's preprocessing.
    """
    record = None
    if name is not None:
        net = create_model(name, **(model_args or {}))
    elif weights.record is not None:
        record = weights.record.encoder_record() if backbone else weights.record
        net = record.build(**(model_args or {}))
    else:
        raise ValueError(f"{weights.source} is a plain state dict without a record of its network (or a timm "
                         f"folder of an architecture vitkit has no name for); say which network it holds (vit "
                         f"export: --model NAME [--model-args JSON]; Python: vit.create_model(NAME) then "
                         f"vit.load_weights)")
    if backbone and isinstance(net, MaskedAutoencoder):
        net = net.encoder
    if not isinstance(net, VisionTransformer | MaskedAutoencoder):
        raise ValueError(f"{weights.source} does not hold a VisionTransformer (got {type(net).__name__})")
    try:
        load_weights(net, weights)
    except WeightsMismatchError as e:
        how = f"{name} with {model_args}" if name else "from its record"
        raise WeightsMismatchError(f"{e} (the network was built {how})") from None
    encoder = net.encoder if isinstance(net, MaskedAutoencoder) else net
    if record is not None:
        encoder.pretrained_cfg.update({k: v for k, v in _data_config(record).items() if v is not None})
    return net.eval()


def resize_model(model: VisionTransformer, img_size: int | tuple[int, int],
                 resample: Mapping[str, Any] | None = None) -> VisionTransformer:
    """A copy of ``model`` built for ``img_size``, position embeddings resampled to the new patch grid.

    ``resample`` (``{"mode": ..., "antialias": ...}``) defaults to bicubic with antialias (timm's).
    """
    resized = VisionTransformer(**{**model.model_args, "img_size": to_2tuple(img_size)})
    report = load_weights(resized, model.state_dict(), grid_size=model.grid_size, resample=resample)
    if report.resample_mode:
        log.info("resampled the position embeddings to %s (%s)", _fmt(resized.grid_size), report.resample_mode)
    resized.pretrained_cfg.update({k: v for k, v in model.pretrained_cfg.items() if k != "input_size"})
    return resized.train(model.training)


def record_of(weights: Weights, net: nn.Module) -> NetworkRecord:
    """The record of ``net`` as built from ``weights``: the source's preprocessing, class names, name and
    position resampling kept."""
    rec = weights.record
    same = rec is not None and rec.architecture == type(net).__name__  # an MAE's encoder is not the MAE's name
    record = NetworkRecord.from_model(net, name=rec.name if same else None,
                                      preprocessing=rec.preprocessing if rec else None,
                                      class_names=rec.class_names if rec else None)
    record.pos_resample = rec.pos_resample if rec else None
    return record


def _fit_to(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
    """``state`` (our ViT or MAE layout) keyed for ``model``: an MAE's encoder for a ViT, a ViT as an MAE encoder."""
    is_mae = any(k.startswith("encoder.") for k in state)
    if isinstance(model, MaskedAutoencoder) and not is_mae:
        return {f"encoder.{k}": v for k, v in state.items()}, False
    if isinstance(model, VisionTransformer) and is_mae:
        return {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}, True
    return dict(state), False


def _resample_positions(model: nn.Module, state: dict[str, torch.Tensor], report: LoadReport,
                        grid: tuple[int, int] | None, how: dict[str, Any]) -> dict[str, torch.Tensor]:
    own = model.state_dict()
    for key, module in (("pos_embed", model), ("encoder.pos_embed", getattr(model, "encoder", None))):
        if not isinstance(module, VisionTransformer) or key not in state or key not in own:
            continue
        if state[key].shape == own[key].shape or state[key].shape[-1] != own[key].shape[-1]:
            continue  # same grid, or another width: the shape check reports that
        prefix = 0 if module.no_embed_class else module.num_prefix_tokens
        n_old = state[key].shape[1] - prefix
        old_grid = tuple(grid) if grid else _square(n_old, key)
        if old_grid[0] * old_grid[1] != n_old:
            raise WeightsMismatchError(f"{key} holds {n_old} patch positions, not the {old_grid[0]}x{old_grid[1]} "
                                       f"grid the source records")
        state[key] = resample_pos_embed(state[key], module.grid_size, old_grid, prefix, how["mode"],
                                        bool(how["antialias"]))
        report.resampled.append(key)
        report.resample_mode = f"{how['mode']}, {'with' if how['antialias'] else 'without'} antialias"
        log.info("resampled %s from a %dx%d grid to %dx%d (%s)", key, *old_grid, *module.grid_size,
                 report.resample_mode)
    return state


def _refuse_graph_export(path: Path) -> None:
    """A compiled or traced export holds a graph, not a network to rebuild: say what runs it instead."""
    if path.is_dir():
        config = read_config(path) or {}
        files = config.get("files") if isinstance(config.get("files"), dict) else {}
        fmts, file = [config.get("format")], path / next(iter(files.values()), "")
    else:  # a bare .pt2 is an AOTInductor package or a torch.export program
        fmts, file = {".pt2": ["aoti", "torch-export"], ".onnx": ["onnx"]}.get(path.suffix, []), path
    how = [GRAPH_LOADERS[f].format(file=file) for f in fmts if f in GRAPH_LOADERS]
    if how:
        raise BadInputError(f"{path} is a {' or '.join(map(str, fmts))} export, a compiled or traced graph, not "
                            f"weights to build a VisionTransformer from: run it with {' or '.join(how)}, or "
                            f"export --format safetensors for load_backbone")


def _data_config(record: NetworkRecord) -> dict[str, Any]:
    """The record's preprocessing in timm's ``pretrained_cfg`` terms."""
    return {"mean": tuple(record.mean) if record.mean else None, "std": tuple(record.std) if record.std else None,
            "crop_pct": record.crop_pct, "interpolation": record.interpolation}


def _fmt(grid: tuple[int, int]) -> str:
    return f"{grid[0]}x{grid[1]}"


def _square(n: int, key: str) -> tuple[int, int]:
    side = round(n**0.5)
    if side * side != n:
        raise WeightsMismatchError(f"{key} holds {n} patch positions, not a square grid, and the source records "
                                   f"no grid: pass grid_size=(h, w)")
    return side, side


def _short(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f", ... (+{len(items) - n} more)" if len(items) > n else "")
