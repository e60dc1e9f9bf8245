"""Callbacks Lightning lacks: the MAE reconstruction figure, and the count of skipped images in the logs."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from vit.train.figures import save_image_grid

log = logging.getLogger(__name__)


class ReconstructionPlotter(Callback):
    """Every ``every_n_epochs`` validation, save a PNG of original | masked | reconstruction | + visible patches.

    The same validation images (spread through the val set) and masks are used each time, so the figures
    show progress. With
    ``norm_pix_loss`` the prediction is de-normalised with each patch's own mean and variance before display.
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
            mask_img = model.unpatchify(mask.unsqueeze(-1).expand(-1, -1, ph * pw * model.in_chans))
        mean, std = _stats(trainer, imgs)
        show = [(x * std + mean).clamp(0, 1) for x in (imgs, recon)]
        original, reconstruction = show
        masked = original * (1 - mask_img) + 0.5 * mask_img
        pasted = original * (1 - mask_img) + reconstruction * mask_img
        rows = [[original[i], masked[i], reconstruction[i], pasted[i]] for i in range(imgs.shape[0])]
        folder = Path(trainer.log_dir or trainer.default_root_dir) / "reconstructions"
        path = save_image_grid(rows, folder / f"epoch_{trainer.current_epoch:04d}.png")
        if self.last_path is None:
            log.info("reconstruction figures go to %s", folder)
        self.last_path = path
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="val/reconstruction", images=[str(path)], step=trainer.global_step)


class SkippedImages(Callback):
    """Logs ``data/skipped_images``, the unreadable files the data module skipped, at each epoch end."""

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._log(trainer, pl_module)

    def _log(self, trainer: Trainer, pl_module: LightningModule) -> None:
        dm = trainer.datamodule
        if getattr(getattr(dm, "hparams", {}), "get", lambda *_: None)("on_bad_image") == "skip":
            pl_module.log("data/skipped_images", float(dm.num_skipped), reduce_fx="max", sync_dist=True)


def _spread_images(trainer: Trainer, n: int) -> torch.Tensor | None:
    """``n`` validation images evenly spaced through the data set (folders are sorted by class)."""
    loaders = trainer.val_dataloaders
    loader = loaders[0] if isinstance(loaders, list | tuple) else loaders
    dataset = getattr(loader, "dataset", None)
    if dataset is None or not hasattr(dataset, "__len__") or len(dataset) == 0:
        return None
    indices = torch.linspace(0, len(dataset) - 1, min(n, len(dataset))).round().long().tolist()
    items = [dataset[i] for i in indices]
    return torch.stack([item[0] if isinstance(item, list | tuple) else item for item in items])


def _stats(trainer: Trainer, imgs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    hp = getattr(trainer.datamodule, "hparams", {})
    mean, std = hp.get("mean") or (0.485, 0.456, 0.406), hp.get("std") or (0.229, 0.224, 0.225)
    shape = (1, -1, 1, 1)
    return (torch.tensor(mean, device=imgs.device).view(shape), torch.tensor(std, device=imgs.device).view(shape))
