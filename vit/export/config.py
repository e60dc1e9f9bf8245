"""What an export folder says about its network: our ``config.json`` (the record), and how timm builds it."""

from __future__ import annotations

import inspect
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from vit.layers import to_2tuple
from vit.models import NetworkRecord, VisionTransformer, list_models, model_config
from vit.version import __version__

CONFIG_FORMAT_VERSION = 1
# Arguments that make a named size (timm's name is only "exact" when these match the registered ones).
_STRUCTURAL = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")
# Our arguments that change how a network is initialised or run, not what it computes (timm needs neither).
_NOT_STRUCTURE = ("zero_head_init", "grad_checkpointing")


def export_config(record: NetworkRecord, fmt: str, source: str | None = None, **extra: Any) -> dict[str, Any]:
    """The ``config.json`` of an export: the network record plus the format, its files and where it came from."""
    return {"format_version": CONFIG_FORMAT_VERSION, "format": fmt, **record.to_dict(),
            "vitkit_version": __version__, "source": source, **extra}


def normalisation(record: NetworkRecord) -> tuple[list[float], list[float], bool]:
    """(mean, std, recorded): the record's input statistics, else ImageNet's (timm's default) with ``False``."""
    if record.mean is not None and record.std is not None:
        return list(record.mean), list(record.std), True
    return list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD), False


def timm_config(model: VisionTransformer) -> dict[str, Any]:
    """How timm builds ``model``: ``timm.create_model(architecture, num_classes=..., **model_args)``.

    ``architecture`` is the timm name needing the fewest overrides; ``exact`` says whether it is the same named
    size (patch, width, depth, heads and mlp ratio as registered), the rest being ordinary overrides.
    ``model_args`` leaves ``num_classes`` out (a hub folder states it once, at its top level).
    ``unsupported`` holds our arguments timm has no counterpart for, at a value that is not timm's behaviour
    (``norm_eps``: timm builds every LayerNorm with 1e-6): timm then builds a slightly different network.
    """
    import timm
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    timm_params = set(inspect.signature(TimmViT).parameters)
    ours = _to_timm_args(model.model_args, timm_params)
    best: tuple[tuple[int, int, str], str, dict[str, Any]] | None = None
    for name in list_models("vit_*"):
        if not timm.is_model(name):
            continue
        cls, registered = model_config(name)
        if cls is not VisionTransformer:
            continue
        reference = _to_timm_args({**_defaults(VisionTransformer), **registered}, timm_params)
        diff = {k: v for k, v in ours.items() if not _same_value(k, v, reference.get(k))}
        score = (sum(k in _STRUCTURAL for k in diff), len(diff), name)
        if best is None or score < best[0]:
            best = (score, name, diff)
    if best is None:
        raise RuntimeError("no registered ViT name is also a timm model")
    (n_structural, _, _), name, diff = best
    defaults = _defaults(VisionTransformer)
    unsupported = {k: v for k, v in model.model_args.items()
                   if k not in timm_params and k not in _NOT_STRUCTURE and v != defaults.get(k)}
    return {"architecture": name, "model_args": _plain(diff), "exact": n_structural == 0,
            "unsupported": _plain(unsupported)}


def _to_timm_args(args: dict[str, Any], timm_params: set[str]) -> dict[str, Any]:
    """Our constructor arguments that timm's ``VisionTransformer`` takes too (same names), ``num_classes`` aside."""
    out = {k: v for k, v in args.items() if k in timm_params and k != "num_classes"}
    if out.get("pos_embed") == "sincos":
        out["pos_embed"] = "learn"  # the fixed table is stored in the weights; timm only needs the slot
    return out


def _same_value(key: str, a: Any, b: Any) -> bool:
    if key in ("img_size", "patch_size"):
        return to_2tuple(a) == to_2tuple(b)
    return a == b


def _defaults(cls: type) -> dict[str, Any]:
    return {k: p.default for k, p in inspect.signature(cls).parameters.items() if p.default is not p.empty}


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return [_plain(v) for v in obj]
    return obj
