"""Prediction output: top-k labels with probabilities (CSV or JSON), and attention maps of a ViT classifier.

Attention maps are recomputed, not read out of the forward pass, so the fused SDPA kernels stay on: a
forward pre-hook captures each block's normed attention input (and patch grid), and ``Attention.attention_weights``
recomputes that block's softmax weights from it, under the block's attention pattern (keys it does not see weigh
0). Prefix tokens (class and register tokens) are dropped from every map.

- ``last``: the last block's attention (mean over heads) read out the way the model pools: the class token's
  row for ``token`` pooling; the mean of the patch tokens' rows for ``avg`` pooling (no single token carries
  the prediction, so the map is what the averaged tokens attend to); the MAP probe's attention for ``map``.
- ``rollout`` (Abnar & Zuidema, 2020): per block ``0.5·A + 0.5·I`` (the residual), multiplied over all blocks
  and all tokens, then read out as above (for ``map``: the probe's attention times the rolled-out matrix).
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from vit.errors import BadInputError
from vit.models import VisionTransformer

log = logging.getLogger(__name__)


@torch.no_grad()
def attention_maps(model: VisionTransformer, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Attention over the patch grid, {"last": [B, h, w], "rollout": [B, h, w]} (see the module docstring).

    Each map sums to at most 1 over the patches (prefix tokens take the rest).
    """
    inputs: list[tuple[torch.Tensor, tuple[int, int] | None]] = []  # each block's input and patch grid (patterns)
    pooled: list[torch.Tensor] = []
    hooks = [blk.attn.register_forward_pre_hook(lambda m, args, kwargs: inputs.append((args[0], kwargs.get("grid"))),
                                                with_kwargs=True) for blk in model.blocks]
    if model.attn_pool is not None:
        hooks.append(model.attn_pool.register_forward_pre_hook(lambda m, args: pooled.append(args[0])))
    try:
        model.pool(model.forward_features(images))
    finally:
        for h in hooks:
            h.remove()
    P = model.num_prefix_tokens
    attn = [blk.attn.attention_weights(x, grid=grid).mean(dim=1)
            for blk, (x, grid) in zip(model.blocks, inputs, strict=True)]
    B, N, _ = attn[0].shape  # (B, prefix + patches, prefix + patches), averaged over heads
    eye = torch.eye(N, device=images.device, dtype=attn[0].dtype)
    rollout = eye.expand(B, N, N)
    for a in attn:
        a = 0.5 * a + 0.5 * eye
        rollout = (a / a.sum(dim=-1, keepdim=True)) @ rollout
    if model.attn_pool is not None:
        probe = model.attn_pool.attention_weights(pooled[0]).mean(dim=(1, 2))  # (B, tokens the pool saw)
        if probe.shape[1] < N:  # the pool saw the patch tokens only
            probe = torch.cat([probe.new_zeros(B, N - probe.shape[1]), probe], dim=1)
        last, rolled = probe, (probe.unsqueeze(1) @ rollout).squeeze(1)
    elif model.global_pool == "token":
        last, rolled = attn[-1][:, 0], rollout[:, 0]
    else:
        last, rolled = attn[-1][:, P:].mean(dim=1), rollout[:, P:].mean(dim=1)
    gh, gw = model.patch_embed.grid_size_for(tuple(images.shape[-2:]))
    return {"last": last[:, P:].reshape(B, gh, gw), "rollout": rolled[:, P:].reshape(B, gh, gw)}


class PredictionWriter(BasePredictionWriter):
    """Writes the top-k classes and probabilities of every predicted image, and optionally attention overlays.

    Needs a ``predict_step`` returning ``{"probs": [B, C], "index": [B]}`` (``ImageClassifier`` does) and a
    data set with ``paths`` (``PredictDataset``); class names come from the module (stored in its checkpoint).

    Args:
        output: the CSV or JSON file; None writes ``<trainer.default_root_dir>/predictions.<format>``.
        top_k: classes per image (at most the number of classes).
        format: ``csv`` or ``json``; None takes it from ``output``'s suffix (csv otherwise).
        attention_maps: also save a PNG per image: the image, last-block (or MAP) attention and rollout. On the
            command line: ``--trainer.callbacks.attention_maps true`` (jsonargparse sets it on the last callback
            of the list, which is the writer in every shipped recipe); ``--trainer.callbacks+=PredictionWriter``
            would add a second writer of the same file, which is refused.
        attention_dir: where those PNGs go; None: ``<output's folder>/attention``.
    """

    def __init__(
        self,
        output: str | None = None,
        top_k: int = 5,
        format: Literal["csv", "json"] | None = None,
        attention_maps: bool = False,
        attention_dir: str | None = None,
    ) -> None:
        super().__init__(write_interval="batch")
        if top_k <= 0:
            raise ValueError(f"top_k must be positive, got {top_k}")
        if format not in (None, "csv", "json"):
            raise ValueError(f"format must be csv or json, got {format!r}")
        self.output = output
        self.top_k = top_k
        self.format = format
        self.attention_maps = attention_maps
        self.attention_dir = attention_dir
        self._rows: list[dict[str, Any]] = []
        self.last_path: Path | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        mine = self._output_path(trainer).resolve()
        for cb in trainer.callbacks:
            if cb is not self and isinstance(cb, PredictionWriter) and cb._output_path(trainer).resolve() == mine:
                raise BadInputError(
                    f"two PredictionWriter callbacks would both write {mine}: set the recipe's writer instead of "
                    f"adding one (attention maps: --trainer.callbacks.attention_maps true sets the last callback's)")

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._rows = []

    def write_on_batch_end(self, trainer: Trainer, pl_module: LightningModule, prediction: Any,
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        probs, index = prediction["probs"].float().cpu(), prediction["index"].cpu()
        names = list(getattr(pl_module, "class_names", None) or range(probs.shape[1]))
        top = probs.topk(min(self.top_k, probs.shape[1]), dim=1)
        paths = getattr(_dataset(trainer, dataloader_idx), "paths", None)
        for i, p, k in zip(index.tolist(), top.values.tolist(), top.indices.tolist(), strict=True):
            path = str(paths[i]) if paths is not None else str(i)
            self._rows.append({"index": i, "path": path,
                               "predictions": [{"label": str(names[c]), "prob": v} for c, v in zip(k, p, strict=True)]})
        if self.attention_maps:
            self._save_attention(trainer, pl_module, batch[0], index, paths, names, top.indices[:, 0])

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        rows = self._rows
        if dist.is_available() and dist.is_initialized() and trainer.world_size > 1:
            gathered: list[list[dict[str, Any]]] = [[] for _ in range(trainer.world_size)]
            dist.all_gather_object(gathered, rows)
            rows = [r for part in gathered for r in part]
        if not trainer.is_global_zero:
            return
        rows = list({r["index"]: r for r in rows}.values())  # a distributed sampler may repeat samples
        rows.sort(key=lambda r: r["index"])
        path = self._output_path(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        if self._format(path) == "json":
            path.write_text(json.dumps([{k: r[k] for k in ("path", "predictions")} for r in rows], indent=1))
        else:
            k = max((len(r["predictions"]) for r in rows), default=0)
            with open(path, "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["path"] + [f"{c}_{j}" for j in range(1, k + 1) for c in ("label", "prob")])
                for r in rows:
                    cells = [x for p in r["predictions"] for x in (p["label"], f"{p['prob']:.6f}")]
                    writer.writerow([r["path"], *cells])
        self.last_path = path
        extra = f"; attention maps in {self._attention_dir(trainer)}" if self.attention_maps else ""
        rank_zero_info(f"wrote top-{self.top_k} predictions of {len(rows)} image(s) to {path.resolve()}{extra}")

    def _save_attention(self, trainer: Trainer, pl_module: LightningModule, images: torch.Tensor,
                        index: torch.Tensor, paths: list | None, names: list, top1: torch.Tensor) -> None:
        from vit.train.figures import save_attention_overlay

        model = pl_module.model
        maps = attention_maps(model, images)
        mean, std = _stats(trainer, images)
        shown = (images.float() * std + mean).clamp(0, 1)
        folder = self._attention_dir(trainer)
        first = "MAP probe" if model.attn_pool is not None else "last block"
        for b, i in enumerate(index.tolist()):
            stem = Path(str(paths[i])).stem if paths is not None else "image"
            save_attention_overlay(
                shown[b], {first: maps["last"][b], "rollout": maps["rollout"][b]}, folder / f"{i:05d}_{stem}.png",
                title=f"predicted {names[int(top1[b])]}",
            )

    def _output_path(self, trainer: Trainer) -> Path:
        if self.output is not None:
            return Path(self.output)
        return Path(trainer.default_root_dir) / f"predictions.{self.format or 'csv'}"

    def _format(self, path: Path) -> str:
        return self.format or ("json" if path.suffix.lower() == ".json" else "csv")

    def _attention_dir(self, trainer: Trainer) -> Path:
        return Path(self.attention_dir) if self.attention_dir else self._output_path(trainer).parent / "attention"


def _dataset(trainer: Trainer, dataloader_idx: int) -> Any:
    loaders = trainer.predict_dataloaders
    loader = loaders[dataloader_idx] if isinstance(loaders, list | tuple) else loaders
    return getattr(loader, "dataset", None)


def _stats(trainer: Trainer, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The data's normalisation (to show the images as they were), else timm's ImageNet default."""
    pre = getattr(trainer.datamodule, "preprocessing", None) or {}
    mean, std = pre.get("mean") or IMAGENET_DEFAULT_MEAN, pre.get("std") or IMAGENET_DEFAULT_STD
    shape = (1, -1, 1, 1)
    return (torch.tensor(mean, device=images.device).view(shape), torch.tensor(std, device=images.device).view(shape))
