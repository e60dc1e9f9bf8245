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


def export_config(record: NetworkRecord, fmt: str, source: str | None = None, **extra: Any) -> dict[str, Any]:
    """The ``config.json`` of an export: the network record plus the format, its files and where it came from."""
    return {"format_version": CONFIG_FORMAT_VERSION, "format": fmt, **record.to_dict(),
            "vitkit_version": __version__, "source": source, **extra}


def normalisation(record: NetworkRecord) -> tuple[list[float], list[float], bool]:
    """(mean, std, recorded): the record's input statistics, else ImageNet's (timm's default) with ``False``."""
    if record.mean is not None and record.std is not None:
        return list(record.mean), list(record.std), True
    return list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD), False


def timm_config(model: VisionTransformer, record: NetworkRecord | None = None) -> dict[str, Any]:
    """How timm builds ``model``: ``timm.create_model(architecture, **model_args)``, plus a pretrained_cfg overlay.

    ``architecture`` is the timm name needing the fewest overrides; ``exact`` says whether it is the same named
    size (patch, width, depth, heads and mlp ratio as registered), the rest being ordinary overrides.
    """
    import timm

    mean, std, _ = normalisation(record or NetworkRecord.from_model(model))
    ours = _to_timm_args(model.model_args)
    best: tuple[tuple[int, int, str], str, dict[str, Any]] | None = None
    for name in list_models("vit_*"):
        if not timm.is_model(name):
            continue
        cls, registered = model_config(name)
        if cls is not VisionTransformer:
            continue
        reference = _to_timm_args({**_defaults(VisionTransformer), **registered})
        diff = {k: v for k, v in ours.items() if not _same_value(k, v, reference.get(k))}
        score = (sum(k in _STRUCTURAL for k in diff), len(diff), name)
        if best is None or score < best[0]:
            best = (score, name, diff)
    if best is None:
        raise RuntimeError("no registered ViT name is also a timm model")
    (n_structural, _, _), name, diff = best
    h, w = model.patch_embed.img_size
    return {
        "architecture": name,
        "model_args": _plain(diff),
        "exact": n_structural == 0,
        # timm's own pretrained_cfg for the name may point at other weights (npz loader, another head size)
        "pretrained_cfg": {"custom_load": False, "num_classes": model.num_classes, "input_size": [3, h, w],
                           "mean": mean, "std": std},
    }


def _to_timm_args(args: dict[str, Any]) -> dict[str, Any]:
    """Our constructor arguments as timm's ``VisionTransformer`` takes them (names already agree)."""
    out = {k: v for k, v in args.items() if k != "zero_head_init"}
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
