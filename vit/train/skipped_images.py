"""A callback that logs how many unreadable images the data module skipped, each file counted once."""

from __future__ import annotations

import numpy as np
import torch
from lightning import Callback, LightningModule, Trainer


class SkippedImages(Callback):
    """Logs ``data/skipped_images``, the distinct unreadable files the data module skipped, at each epoch end.

    A data module with ``skipped_flags()`` (one 0/1 mark per sample, shared by its DataLoader workers) is counted
    exactly: the marks of every rank are OR-ed, so a file met by two workers or two ranks counts once. Others are
    asked for ``num_skipped``, taking the largest over ranks.
    """

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._log(trainer, pl_module)

    def _log(self, trainer: Trainer, pl_module: LightningModule) -> None:
        dm = trainer.datamodule
        if getattr(getattr(dm, "hparams", {}), "get", lambda *_: None)("on_bad_image") != "skip":
            return
        if hasattr(dm, "skipped_flags"):
            count = distinct_skips(trainer, dm.skipped_flags())  # the same on every rank
            pl_module.log("data/skipped_images", float(count), reduce_fx="max", sync_dist=True)
        else:
            pl_module.log("data/skipped_images", float(dm.num_skipped), reduce_fx="max", sync_dist=True)


def distinct_skips(trainer: Trainer, flags: np.ndarray) -> int:
    """Files marked in ``flags`` (0/1 per sample, the same samples on every rank) on any rank, each counted once."""
    marks = torch.as_tensor(flags, dtype=torch.int32)
    if trainer.world_size > 1:
        marks = trainer.strategy.reduce(marks.to(trainer.strategy.root_device), reduce_op="max")
    return int(marks.sum())
