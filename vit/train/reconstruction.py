"""A callback that draws the MAE reconstruction figure from fixed validation images."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from vit.train.figures import save_image_grid

log = logging.getLogger(__name__)

MASK_GREY = 0.5


class ReconstructionPlotter(Callback):
    """Every ``every_n_epochs`` validation, save a PNG of original | masked | reconstruction | + visible patches.

    The same validation images (spread through the val set) and masks are used each time, so the figures
    show progress. With ``norm_pix_loss`` the prediction is de-normalised with each patch's own mean and
    variance before display; images are de-normalised with the data module's ``preprocessing`` mean and std.
    The figure goes to ``<log_dir>/reconstructions/`` and to wandb when that logger is on.

    Args:
        every_n_epochs: how often to draw.
        num_images: rows in the figure.
    """

    def __init__(self, every_n_epochs: int = 1, num_images: int = 8) -> None:
        if every_n_epochs <= 0 or num_images <= 0:
            raise ValueError("every_n_epochs and num_images must be positive")
        self.every_n_epochs = every_n_epochs
        self.num_images = num_images
        self._batch: torch.Tensor | None = None
        self.last_path: Path | None = None

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        if self._batch is None:
            self._batch = _spread_images(trainer, self.num_images)
            if self._batch is None:
                return
        model = pl_module.model
        imgs = self._batch.to(pl_module.device)
        gen = torch.Generator().manual_seed(0)  # the same masks every time, so figures show progress
        noise = torch.rand(imgs.shape[0], model.encoder.patch_embed.num_patches, generator=gen)
        with torch.no_grad():
            _, pred, mask = pl_module(imgs, noise=noise.to(imgs.device))
            recon = model.reconstruct(imgs, pred)
            ph, pw = model.patch_size
            hidden = model.unpatchify(mask.unsqueeze(-1).expand(-1, -1, ph * pw * model.in_chans))[:, :1]
        # a data module without `preprocessing` (or plain dataloaders) gets the ImageDataModule default
        prep = getattr(trainer.datamodule, "preprocessing", None) or {}
        mean, std = prep.get("mean", IMAGENET_DEFAULT_MEAN), prep.get("std", IMAGENET_DEFAULT_STD)
        columns = reconstruction_columns(imgs, recon, hidden, mean, std)
        folder = Path(trainer.log_dir or trainer.default_root_dir) / "reconstructions"
        loss = trainer.callback_metrics.get("val/loss")
        title = f"epoch {trainer.current_epoch}" + (f", val/loss {float(loss):.4f}" if loss is not None else "")
        path = save_image_grid(list(zip(*columns, strict=True)), folder / f"epoch_{trainer.current_epoch:04d}.png",
                               title=title)
        if self.last_path is None:
            log.info("reconstruction figures go to %s", folder)
        self.last_path = path
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="val/reconstruction", images=[str(path)], step=trainer.global_step)


def reconstruction_columns(
    imgs: torch.Tensor, recon: torch.Tensor, hidden: torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> list[torch.Tensor]:
    """The figure's columns original | masked | reconstruction | reconstruction + visible, each [B, C, H, W] in [0, 1].

    `imgs` and `recon` [B, C, H, W] are normalised with `mean` / `std`; `hidden` [B, 1, H, W] is 1 on the pixels
    of masked patches. "masked" shows those as MASK_GREY; "reconstruction + visible" keeps the original elsewhere.
    """
    m = torch.as_tensor(mean, dtype=imgs.dtype, device=imgs.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=imgs.dtype, device=imgs.device).view(1, -1, 1, 1)
    original, reconstruction = ((x * s + m).clamp(0, 1) for x in (imgs, recon))
    visible = 1 - hidden
    masked = original * visible + MASK_GREY * hidden
    pasted = original * visible + reconstruction * hidden
    return [original, masked, reconstruction, pasted]


def _spread_images(trainer: Trainer, n: int) -> torch.Tensor | None:
    """``n`` validation images evenly spaced through the data set (folders are sorted by class)."""
    loaders = trainer.val_dataloaders
    loader = loaders[0] if isinstance(loaders, list | tuple) else loaders
    dataset = getattr(loader, "dataset", None)
    if dataset is None or not hasattr(dataset, "__len__") or len(dataset) == 0:
        return None
    indices = torch.linspace(0, len(dataset) - 1, min(n, len(dataset))).round().long().tolist()
    items = [dataset[i] for i in indices]
    pipeline = getattr(trainer.datamodule, "device_pipeline", None)
    if pipeline is not None:  # data.decode device: the data set yields encoded files, decoded batch by batch
        return pipeline(loader.collate_fn(items))[0]
    return torch.stack([item[0] if isinstance(item, list | tuple) else item for item in items])
