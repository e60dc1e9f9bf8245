"""Reading weights safely (safetensors or ``torch.load(weights_only=True)``) into our models, whatever the layout."""

from __future__ import annotations

import inspect
import json
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vit.export.interop import detect_layout, encoder_state, mae_official_to_vit, timm_to_vit
from vit.layers import resample_pos_embed, to_2tuple
from vit.models import MaskedAutoencoder, VisionTransformer, create_model, model_config

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MAE_WEIGHTS_NAME = "checkpoint.pth"
# The linear probe's head is ``Sequential(BatchNorm1d(affine=False, eps=1e-6), Linear)`` (vit/train/classifier.py,
# after MAE); a BatchNorm's eps is not in its state dict, so folding it needs the value.
PROBE_BN_EPS = 1e-6
# The normalisation every source falls back to (timm's and the MAE reference's default).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The whole object stored at ``path`` (a directory means its ``model.safetensors``), read as plain data.

    ``.safetensors`` files are read with safetensors; anything else with ``torch.load(weights_only=True)``.
    Raises ``FileNotFoundError``, ``UnsafeCheckpointError`` for pickles that would run code, and
    ``ValueError`` for files that are not checkpoints at all.
    """
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no weights at {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except SafetensorError as e:
            raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
    try:
        try:  # memory-mapped: a large checkpoint is not read whole to pick out the network
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # the legacy (non-zip) format
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it holds pickled objects that would run code when read "
            f"(only tensors and plain data are accepted; re-save the weights with safetensors or as a "
            f"plain state dict). Detail: {_unpickler_detail(e)}"
        ) from e
    except (RuntimeError, KeyError, EOFError, OSError) as e:
        raise ValueError(f"{path} is not a PyTorch checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict or state dict")
    return obj


def read_state_dict(source: str | Path | dict[str, Any]) -> dict[str, torch.Tensor]:
    """A flat state dict from a path or a checkpoint dict in any supported container.

    Accepts an export directory (``model.safetensors``), a ``.safetensors`` file, a Lightning ``.ckpt``
    (the network under ``model.``), an official MAE / timm ``.pth`` (``model`` / ``state_dict`` entries),
    or a dict already in memory. Pickles are read with ``weights_only=True``: code is never run.
    """
    obj = source if isinstance(source, dict) else read_checkpoint(source)
    return _unwrap(obj, _name(source))


def load_weights(
    model: nn.Module,
    source: str | Path | dict[str, Any],
    strict: bool = True,
    grid_size: tuple[int, int] | None = None,
) -> LoadReport:
    """Load weights of any supported layout (ours, timm, official MAE, Lightning) into ``model``.

    The layout is detected and converted; position embeddings are resampled when the patch grid differs
    (``grid_size`` names the checkpoint's (h, w) grid; a square grid is assumed when it is not given).
    Raises ``WeightsMismatchError`` naming missing and unexpected keys (when ``strict``) and every shape
    conflict (always).
    """
    return _load_state(model, read_state_dict(source), strict, grid_size, _name(source))


def resize_model(model: VisionTransformer, img_size: int | tuple[int, int]) -> VisionTransformer:
    """A copy of ``model`` built for ``img_size``, position embeddings resampled to the new patch grid."""
    img_size = to_2tuple(img_size)
    resized = VisionTransformer(**{**model.model_args, "img_size": img_size})
    load_weights(resized, model.state_dict(), grid_size=model.grid_size)
    return resized.train(model.training)


def load_backbone(
    path: str | Path, *, num_classes: int | None = None, img_size: int | tuple[int, int] | None = None
) -> VisionTransformer:
    """Rebuild a ``VisionTransformer`` from an export directory (``config.json`` + weights), with no YAML.

    ``path`` is what ``vit export`` writes (formats safetensors, timm and mae), or anything it reads: a
    Lightning ``.ckpt`` or run directory (an MAE gives its encoder). Returns the model in eval mode.
    ``img_size`` resamples position embeddings for another input size; ``num_classes`` replaces the head
    with a fresh one (0 = no head) unless it already has that many.
    """
    path = Path(path)
    config_path = path / CONFIG_NAME if path.is_dir() else path.with_name(CONFIG_NAME)
    if config_path.is_file():
        model = _backbone_from_export(config_path, path if path.is_file() else None)
    elif path.exists():
        model, _ = model_from_checkpoint(path)
        model = model.encoder if isinstance(model, MaskedAutoencoder) else model
    else:
        raise FileNotFoundError(f"{path} not found: load_backbone needs an export directory "
                                f"(write one with `vit export ... --format safetensors`) or a checkpoint")
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"{path} does not hold a VisionTransformer (got {type(model).__name__})")
    if img_size is not None and to_2tuple(img_size) != model.patch_embed.img_size:
        model = resize_model(model, img_size)
    if num_classes is not None and num_classes != model.num_classes:
        model.reset_classifier(num_classes)
    return model.eval()


def find_checkpoint(run_dir: str | Path) -> Path:
    """The checkpoint to take from a training run directory.

    Searched recursively for ``*.ckpt``: the checkpoint ``ModelCheckpoint`` recorded as best (in the newest
    checkpoint's callback state, when it monitored a metric and the file is still in the run directory),
    else the newest ``last*.ckpt``, else the newest ``*.ckpt``.
    """
    run_dir = Path(run_dir)
    found = sorted(run_dir.rglob("*.ckpt"), key=lambda p: (p.stat().st_mtime, str(p)))
    if not found:
        raise FileNotFoundError(f"no *.ckpt under the run directory {run_dir}")
    last = [p for p in found if p.name.startswith("last")]
    newest = (last or found)[-1]
    best = _best_recorded(read_checkpoint(newest), found)
    choice = best or newest
    log.info("run directory %s: using %s (%s)", run_dir, choice, "best recorded" if best else "newest")
    return choice


def model_from_checkpoint(
    path: str | Path, *, model: str | None = None, model_args: dict[str, Any] | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network a checkpoint holds, with its weights, plus what it says about its data.

    ``path`` is a Lightning ``.ckpt`` of our LightningModules (the network is rebuilt with
    ``vit.create_model(hyper_parameters["model"], **hyper_parameters["model_kwargs"])``, plus ``img_size``,
    ``num_classes`` ... where the module takes them), a run directory (see ``find_checkpoint``), an export
    directory, or a plain state dict (``.pth`` / ``.safetensors``), which needs ``model`` (a registered
    name) and optionally ``model_args``; for checkpoints these two override what the checkpoint says.
    Returns ``(network in eval mode, meta)`` with meta keys ``source``, ``class_names``, ``mean``, ``std``.
    """
    path = Path(path)
    if path.is_dir() and (path / CONFIG_NAME).is_file() and model is None:
        config = json.loads((path / CONFIG_NAME).read_text())
        if config.get("architecture") == "MaskedAutoencoder" and (path / MAE_WEIGHTS_NAME).is_file():
            net = MaskedAutoencoder(**config["model_args"])  # a `--format mae` export: the full MAE again
            load_weights(net, path / MAE_WEIGHTS_NAME)
        else:
            net = _backbone_from_export(path / CONFIG_NAME, None)
        meta = {k: config.get(k) for k in ("class_names", "mean", "std")}
        return net, _complete_meta(meta, path, net)
    if path.is_dir():
        path = find_checkpoint(path)
    ckpt = read_checkpoint(path)
    hparams = ckpt.get("hyper_parameters") or {}
    if not isinstance(hparams, dict):
        hparams = {}
    name = model or hparams.get("model") or hparams.get("model_name")
    if not isinstance(name, str):
        what = "a Lightning checkpoint without a model name in its hyper_parameters" if hparams else "a state dict"
        raise ValueError(f"{path} is {what}; say which network it holds with --model NAME [--model-args JSON] "
                         f"(a registered name, see vit.list_models())")
    cls, _ = model_config(name)
    accepted = inspect.signature(cls).parameters
    # as our LightningModules build it: model_kwargs, then the module's own arguments that the network takes
    overrides = dict(hparams.get("model_kwargs") or hparams.get("model_args") or {})
    overrides.update({k: v for k, v in hparams.items() if k in accepted and v is not None})
    overrides.update(model_args or {})
    unknown = sorted(set(overrides) - set(accepted))
    if unknown:
        raise ValueError(f"{path}: {cls.__name__} ({name}) takes no argument(s) {unknown}")
    state = _fold_probe_head(_unwrap(ckpt, str(path)))
    if cls is VisionTransformer and "global_pool" not in overrides:
        overrides.update(_pool_from_weights(state, hparams))
    net = create_model(name, **overrides)
    if isinstance(net, VisionTransformer) and detect_layout(state) == "mae":
        log.info("%s holds an MAE; taking its encoder", path)
    try:
        _load_state(net, state, True, None, str(path))
    except WeightsMismatchError as e:
        raise WeightsMismatchError(f"{e} (the network was built as {name} with {overrides})") from None
    meta = {"class_names": _find_entry(ckpt, "class_names", anywhere=True), "mean": _find_entry(ckpt, "mean"),
            "std": _find_entry(ckpt, "std")}
    return net.eval(), _complete_meta(meta, path, net)


def _unwrap(obj: dict[str, Any], name: str) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model", "state_dict_ema", "model_ema"):
        if key in obj and isinstance(obj[key], dict):
            inner = obj[key]
            if key == "state_dict" and "pytorch-lightning_version" in obj:
                # a Lightning checkpoint: our LightningModules hold the network as ``self.model``
                inner = {k.removeprefix("model."): v for k, v in obj[key].items() if k.startswith("model.")}
                if not inner:
                    prefixes = sorted({k.split(".")[0] for k in obj[key]})
                    raise WeightsMismatchError(
                        f"{name} is a Lightning checkpoint without a network under 'model.' "
                        f"(state_dict prefixes: {_short(prefixes)}); our LightningModules hold it as self.model"
                    )
            obj = inner
            break
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsMismatchError(f"{name} is not a state dict: entries {bad[:5]} are not tensors")
    return obj


def _load_state(
    model: nn.Module, state: dict[str, torch.Tensor], strict: bool, grid_size: tuple[int, int] | None, name: str
) -> LoadReport:
    layout = detect_layout(state)
    if isinstance(model, MaskedAutoencoder):
        if layout == "mae_official":
            state = mae_official_to_vit(state)
        elif layout in ("vit", "timm"):
            state = {f"encoder.{k}": v for k, v in timm_to_vit(state).items()}
    elif isinstance(model, VisionTransformer):
        state = encoder_state(state)
    report = LoadReport(layout=layout)
    state = _resample_positions(model, state, report, grid_size)
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
            f"weights from {name} (layout {layout!r}) do not fit {type(model).__name__}: "
            + "; ".join(problems)
        )
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return report


def _pool_from_weights(state: dict[str, torch.Tensor], hparams: dict[str, Any]) -> dict[str, Any]:
    """The pooling a checkpoint that does not record it was trained with, read from its weights."""
    if any(k.startswith("attn_pool.") for k in state):
        return {"global_pool": "map"}
    if "fc_norm.weight" in state or hparams.get("mode") is not None:
        return {"global_pool": "avg"}  # the classifier (it has a ``mode``) pools by average unless told
    return {}


def _fold_probe_head(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A linear probe's ``head.0`` (BatchNorm, no affine) folded into ``head.1`` (Linear): a plain ``head``."""
    if "head.0.running_var" not in state or "head.1.weight" not in state:
        return state
    mean, var = state["head.0.running_mean"], state["head.0.running_var"]
    weight = state["head.1.weight"] * (var + PROBE_BN_EPS).rsqrt()  # W' = W / sqrt(var + eps)
    bias = state["head.1.bias"] - weight @ mean  # b' = b - W' · mean
    out = {k: v for k, v in state.items() if not k.startswith(("head.0.", "head.1."))}
    return {**out, "head.weight": weight, "head.bias": bias}


def _backbone_from_export(config_path: Path, weights: Path | None) -> VisionTransformer:
    config = json.loads(config_path.read_text())
    # an MAE export records its encoder's arguments too, so its directory also gives a backbone
    args = config.get("encoder_args") or config.get("model_args")
    if not isinstance(args, dict):
        raise ValueError(f"{config_path} has no 'model_args' entry")
    if weights is None:
        names = (WEIGHTS_NAME, MAE_WEIGHTS_NAME)
        candidates = [config_path.parent / n for n in names if (config_path.parent / n).is_file()]
        if not candidates:
            fmt = config.get("format", "?")
            raise FileNotFoundError(f"{config_path.parent} (format {fmt!r}) holds none of {list(names)}: "
                                    f"load_backbone reads the safetensors, timm and mae export formats")
        weights = candidates[0]
    model = VisionTransformer(**args)
    load_weights(model, weights)
    return model


def _best_recorded(ckpt: dict[str, Any], found: list[Path]) -> Path | None:
    for key, state in (ckpt.get("callbacks") or {}).items():
        if not str(key).startswith("ModelCheckpoint") or not isinstance(state, dict) or not state.get("monitor"):
            continue
        best = Path(str(state.get("best_model_path") or ""))
        matches = [p for p in found if p == best or p.name == best.name]
        if best.name and matches:
            return matches[-1]
    return None


def _find_entry(ckpt: dict[str, Any], key: str, anywhere: bool = False) -> Any:
    # hyper_parameters first, then the datamodule's; with ``anywhere`` also any other section (Lightning
    # stores a datamodule's state_dict under its class name)
    sections = [ckpt.get("hyper_parameters"), ckpt.get("datamodule_hyper_parameters"), ckpt.get("datamodule")]
    if anywhere:
        sections += [v for v in ckpt.values() if isinstance(v, dict)]
    for section in sections:
        if isinstance(section, dict) and section.get(key) is not None:
            return section[key]
    return None


def _complete_meta(meta: dict[str, Any], path: Path, net: nn.Module) -> dict[str, Any]:
    names = meta.get("class_names")
    num_classes = getattr(net, "num_classes", 0)
    if names is not None and (not isinstance(names, list | tuple) or len(names) != num_classes):
        if num_classes:
            log.warning("%s: ignoring class_names that do not fit a %d-class head", path, num_classes)
        names = None
    in_chans = net.model_args.get("in_chans", 3) if hasattr(net, "model_args") else 3
    stats = {}
    for key, default in (("mean", IMAGENET_MEAN), ("std", IMAGENET_STD)):
        value = meta.get(key)
        ok = isinstance(value, list | tuple) and len(value) == in_chans and all(
            isinstance(v, int | float) for v in value)
        if value is not None and not ok:
            log.warning("%s: ignoring %s=%r (not %d numbers); using ImageNet's", path, key, value, in_chans)
        stats[key] = [float(v) for v in (value if ok else default)]
    return {"source": str(path), "class_names": list(names) if names else None, **stats}


def _unpickler_detail(e: Exception) -> str:
    text = str(e)
    start = max(text.find("WeightsUnpickler error:"), 0)
    detail = " ".join(text[start:].split()).split(" Check the documentation")[0].split(" Please use")[0]
    return detail if len(detail) <= 300 else detail[:297] + "..."


def _resample_positions(
    model: nn.Module, state: dict[str, torch.Tensor], report: LoadReport, grid_size: tuple[int, int] | None
) -> dict:
    own = model.state_dict()
    for key, module in (("pos_embed", model), ("encoder.pos_embed", getattr(model, "encoder", None))):
        if not isinstance(module, VisionTransformer) or key not in state or key not in own:
            continue
        if state[key].shape == own[key].shape:
            continue
        prefix = 0 if module.no_embed_class else module.num_prefix_tokens
        n_old = state[key].shape[1] - prefix
        side = int(round(n_old**0.5))
        old_grid = tuple(grid_size) if grid_size else (side, side)
        if old_grid[0] * old_grid[1] != n_old or state[key].shape[-1] != own[key].shape[-1]:
            continue  # not the grid we expected, or another width: left for the shape check to report
        state[key] = resample_pos_embed(state[key], module.grid_size, old_grid, prefix)
        report.resampled.append(key)
        log.info("resampled %s from a %dx%d grid to %dx%d", key, *old_grid, *module.grid_size)
    return state


def _short(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f", ... (+{len(items) - n} more)" if len(items) > n else "")


def _name(source: object) -> str:
    return str(source) if isinstance(source, str | Path) else "the given state dict"
