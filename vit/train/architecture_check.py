"""check_checkpoint_matches: resuming from a checkpoint of another architecture is an error naming the fields."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning import LightningModule


def check_checkpoint_matches(module: LightningModule, checkpoint: Mapping[str, Any], source: str) -> None:
    """Raise ``ValueError`` when ``checkpoint`` holds another architecture than ``module``, naming what differs.

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
    raise ValueError(
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
