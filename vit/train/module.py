"""VitModule: what both LightningModules share — the network record in checkpoints, the optimiser and schedule.

Subclasses hold their network as ``self.model`` and keep the recipe in ``hparams`` (``model``, ``base_lr``,
``lr``, ``weight_decay``, ``betas``, ``warmup_epochs``, ``min_lr_ratio``); they say which optimiser and layer
decay apply through ``optimizer_choice()``. Every fit logs its throughput (``vit.train.throughput``) and prints
Lightning's model summary with the network's FLOPs (``vit.train.model_summary``).
"""

from __future__ import annotations

from typing import Any

from lightning import Callback, LightningModule
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.utilities import rank_zero_info
from timm.scheduler.scheduler import Scheduler

from vit.flops import mae_forward_flops, vit_forward_flops
from vit.models import RECORD_KEY, MaskedAutoencoder, NetworkRecord
from vit.train.model_summary import count_model_flops
from vit.train.optim import OptimizerName, build_optimizer, build_scheduler
from vit.train.schedule import RunSchedule, run_schedule
from vit.train.throughput import DataWait, TrainThroughput, batch_images


class VitModule(LightningModule):
    """A LightningModule around ``self.model`` whose checkpoints say what built it (see ``NetworkRecord``)."""

    schedule: RunSchedule | None = None
    _batch_images = 0

    @property
    def flops_per_batch(self) -> int:
        """FLOPs of the current batch (read by ``ThroughputMonitor``): a training step, or a forward in evaluation."""
        per_image = self.train_flops_per_image() if self.training else self.forward_flops_per_image()
        return per_image * self._batch_images

    def forward_flops_per_image(self) -> int:
        """Forward FLOPs of one image at the network's image size (``vit.flops``' closed forms; MAE at its mask)."""
        if isinstance(self.model, MaskedAutoencoder):
            return mae_forward_flops(self.model, self.mask_ratio)
        return vit_forward_flops(self.model)

    def train_flops_per_image(self) -> int:
        """FLOPs of one image in a training step: forward + backward (twice the forward); a probe's frozen backbone
        runs forward only (its head is a rounding error)."""
        probe = self.hparams.get("mode") in ("linear_probe", "attentive_probe")
        return self.forward_flops_per_image() * (1 if probe else 3)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._batch_images = batch_images(batch)

    def on_validation_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._batch_images = batch_images(batch)

    on_test_batch_start = on_predict_batch_start = on_validation_batch_start

    def configure_callbacks(self) -> list[Callback]:
        """Throughput (img/s, TFLOP/s, MFU) and data wait in the logs, and the model summary with our FLOPs; a
        callback of the same kind in the trainer's list is kept instead."""
        trainer = self.trainer
        count_model_flops(trainer)
        callbacks: list[Callback] = []
        if trainer.state.fn == "fit":
            if not any(isinstance(cb, ThroughputMonitor) for cb in trainer.callbacks):
                callbacks.append(TrainThroughput(window_size=trainer.log_every_n_steps))
            if not any(isinstance(cb, DataWait) for cb in trainer.callbacks):
                callbacks.append(DataWait())
        return callbacks

    def optimizer_choice(self) -> tuple[OptimizerName, float | None]:
        """(optimizer name, layer decay or None) for this run."""
        return "adamw", None

    def attached_datamodule(self) -> Any:
        """The trainer's data module, or None when no trainer (or no data module) is attached."""
        try:
            return self.trainer.datamodule
        except RuntimeError:  # Lightning's answer when no trainer is attached
            return None

    def network_record(self) -> NetworkRecord:
        """The record of ``self.model`` with the data's preprocessing and the class names."""
        dm = self.attached_datamodule()
        return NetworkRecord.from_model(self.model, name=self.hparams.get("model"),
                                        preprocessing=getattr(dm, "preprocessing", None),
                                        class_names=getattr(self, "class_names", None))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        record = self.network_record()
        record.state_prefix = "model."  # the network is ``self.model``
        checkpoint[RECORD_KEY] = record.to_dict()

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        self.schedule = run_schedule(self.trainer, hp.base_lr, hp.lr, hp.warmup_epochs)
        name, layer_decay = self.optimizer_choice()
        optimizer = build_optimizer(self.model, name, self.schedule.peak_lr, hp.weight_decay, layer_decay,
                                    betas=hp.get("betas", (0.9, 0.999)), momentum=hp.get("momentum", 0.9))
        scheduler = build_scheduler(optimizer, self.schedule.warmup_steps, self.schedule.total_steps,
                                    hp.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def lr_scheduler_step(self, scheduler: Scheduler, metric: Any) -> None:
        """timm's schedulers are set by update count: the lr for the next step, computed from ``global_step``."""
        scheduler.step_update(num_updates=self.global_step)

    def describe_run(self) -> str:
        """One line on the schedule, for the log at fit start."""
        s = self.schedule
        return (f"effective batch {s.effective_batch_size} (devices x batch x accumulation) -> lr {s.peak_lr:.3g}"
                + (f" (base_lr {self.hparams.base_lr:g} x {s.effective_batch_size} / 256)"
                   if self.hparams.lr is None else " (set directly)")
                + f"; {s.warmup_steps} warmup steps of {s.total_steps}")

    def on_fit_start(self) -> None:
        rank_zero_info(self.describe_run())
        for logger in self.loggers:
            logger.log_hyperparams(self.schedule.as_dict())
