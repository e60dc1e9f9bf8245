"""Training throughput: Lightning's ``ThroughputMonitor`` for the logs, and the fraction of each step spent waiting
for data (``DataWait``), with img/s on the progress bar."""

from __future__ import annotations

import time
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.utilities import rank_zero_only

from vit.train.lightning_private import throughput_update


class DataWait(Callback):
    """Logs ``train/data_wait``: the gap between one batch's end and the next one's start over the whole step.

    The gap is the time the loop waits for the next batch (its loader, transfer and hooks); the step is that
    gap plus forward, backward and the optimizer. Near 0 the loader keeps up; near 1 the device waits for data
    (add ``num_workers`` or shards). The progress bar also shows ``img/s`` of this device from the same timing.
    On CUDA each step end synchronises (as ``ThroughputMonitor`` does), so the step time is the device's.
    """

    def __init__(self) -> None:
        self._end: float | None = None
        self._start = 0.0

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._end = time.perf_counter()  # the first batch's wait includes starting the loader workers

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        end = time.perf_counter()
        if self._end is not None and end > self._end:
            wait, step = self._start - self._end, end - self._end
            images = batch_images(batch)
            pl_module.log("train/data_wait", wait / step, on_step=True, on_epoch=False, prog_bar=True,
                          batch_size=images)
            pl_module.log("img/s", images / step, on_step=True, on_epoch=False, prog_bar=True, logger=False,
                          batch_size=images)
        self._end = end

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._end = time.perf_counter()  # validation in mid-epoch is not the loader's wait


class TrainThroughput(ThroughputMonitor):
    """``ThroughputMonitor`` counting images, with the module's ``flops_per_batch``, logged for training steps only.

    Logs ``train/device/samples_per_sec`` (img/s of one device), ``train/samples_per_sec`` (all devices, when
    there are several), ``train/device/flops_per_sec`` and ``train/device/mfu`` (against the peak Lightning knows
    for the GPU and precision; none on CPUs), each averaged over the last ``window_size`` steps. Validation time
    is left out of the training rate; validation rates are not logged, since they would go to the loggers at
    evaluation-batch steps, out of order with the training steps (wandb refuses steps that go back).
    """

    def __init__(self, window_size: int = 10) -> None:
        super().__init__(batch_images, window_size=max(2, window_size))

    @rank_zero_only
    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                                *args: Any, **kwargs: Any) -> None:
        if not trainer.sanity_checking:
            throughput_update(self, trainer, pl_module, batch)


def batch_images(batch: Any) -> int:
    """Images in a batch: an image tensor [B, C, H, W], or a tuple / list / dict whose first entry is one."""
    if isinstance(batch, dict):
        batch = next(iter(batch.values()))
    while isinstance(batch, list | tuple):
        batch = batch[0]
    return int(batch.shape[0])
