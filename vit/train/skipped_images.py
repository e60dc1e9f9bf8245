"""A callback that logs how many unreadable images the data module skipped."""

from __future__ import annotations

from lightning import Callback, LightningModule, Trainer


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
