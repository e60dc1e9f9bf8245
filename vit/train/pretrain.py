"""MAEPretrainer: the LightningModule that pretrains a MaskedAutoencoder (masking happens only here)."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info

from vit.models import MaskedAutoencoder, create_model, model_config
from vit.train.init_from import load_pretrained_mae
from vit.train.module import VitModule


class MAEPretrainer(VitModule):
    """Masked-autoencoder pretraining with the paper's recipe: AdamW (0.9, 0.95), lr scaled by batch, warmup + cosine.

    Args:
        model: a registered MAE name, e.g. ``mae_vit_base_patch16``.
        model_kwargs: constructor overrides of that model (e.g. ``{"patch_size": 4, "embed_dim": 128}``).
        img_size: input size (linked from ``data.img_size`` by the CLI).
        mask_ratio: fraction of patches removed per image, in [0, 1).
        norm_pix_loss: regress per-patch normalised pixels.
        base_lr: lr per 256 images; the lr is ``base_lr × effective batch / 256`` unless ``lr`` is given.
        lr: absolute lr (overrides the scaling rule).
        weight_decay: AdamW decay (none on norms, biases, tokens, positions).
        betas: AdamW betas.
        warmup_epochs: linear warmup length (per step), then cosine to ``min_lr_ratio × lr``.
        compile: compile the network in place (``nn.Module.compile``: checkpoints keep the plain key names).
        init_from: weights to continue pretraining from: an MAE checkpoint of ours, the official MAE, a Hugging
            Face ViTMAE folder (decoder included), or an encoder alone (the decoder starts fresh); read once in
            ``configure_model`` (weights restored from ``--ckpt_path`` replace them).
    """

    def __init__(
        self,
        model: str = "mae_vit_base_patch16",
        model_kwargs: dict[str, Any] | None = None,
        img_size: int | tuple[int, int] | None = None,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
        base_lr: float = 1.5e-4,
        lr: float | None = None,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_epochs: float = 40.0,
        min_lr_ratio: float = 0.0,
        compile: bool = False,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("base_lr", base_lr), ("lr", lr)):
            if value is not None and value <= 0:
                raise ValueError(f"model.{name} must be positive, got {value}")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"model.mask_ratio must be in [0, 1), got {mask_ratio}")
        if warmup_epochs < 0:
            raise ValueError(f"model.warmup_epochs must be >= 0, got {warmup_epochs}")
        self.save_hyperparameters()
        if not issubclass(model_config(model)[0], MaskedAutoencoder):
            raise ValueError(f"model.model {model!r} is not a masked autoencoder; pick one of vit.list_models('mae_*')")
        kwargs = dict(model_kwargs or {}, norm_pix_loss=norm_pix_loss)
        if img_size is not None:
            kwargs["img_size"] = img_size
        self.model: MaskedAutoencoder = create_model(model, **kwargs)
        self.mask_ratio = mask_ratio
        self.init_from = init_from
        self._weights_ready = False
        if compile:
            self.model.compile()

    def configure_model(self) -> None:
        """Load ``init_from`` once, before the optimiser is built."""
        if self.init_from and not self._weights_ready:
            self._weights_ready = True
            rank_zero_info(load_pretrained_mae(self.model, self.init_from))

    def forward(self, imgs: torch.Tensor, mask_ratio: float | None = None, noise: torch.Tensor | None = None):
        """(loss, pred, mask) of the MAE at this module's mask ratio (or the one given)."""
        return self.model(imgs, self.mask_ratio if mask_ratio is None else mask_ratio, noise)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss, _, _ = self(_images(batch))
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=_images(batch).shape[0])
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        imgs = _images(batch)
        # a fixed mask per batch index, so epochs are compared on the same masks
        gen = torch.Generator().manual_seed(batch_idx)
        noise = torch.rand(imgs.shape[0], self.model.encoder.patch_embed.num_patches, generator=gen)
        loss, _, _ = self(imgs, noise=noise.to(imgs.device))
        self.log("val/loss", loss, prog_bar=True, on_epoch=True, sync_dist=True, batch_size=imgs.shape[0])

    def describe_run(self) -> str:
        return f"{super().describe_run()}; mask ratio {self.mask_ratio}"


def _images(batch: Any) -> torch.Tensor:
    return batch[0] if isinstance(batch, list | tuple) else batch
