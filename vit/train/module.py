"""VitModule: what both LightningModules share — the network record in checkpoints, the optimiser and schedule.

Subclasses hold their network as ``self.model`` and keep the recipe in ``hparams`` (``model``, ``base_lr``,
``lr``, ``weight_decay``, ``betas``, ``warmup_epochs``, ``min_lr_ratio``); they say which optimiser and layer
decay apply through ``optimizer_choice()``.
"""

from __future__ import annotations

from typing import Any

from lightning import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from timm.scheduler.scheduler import Scheduler

from vit.models import RECORD_KEY, NetworkRecord
from vit.train.optim import OptimizerName, build_optimizer, build_scheduler
from vit.train.schedule import RunSchedule, run_schedule


class VitModule(LightningModule):
    """A LightningModule around ``self.model`` whose checkpoints say what built it (see ``NetworkRecord``)."""

    schedule: RunSchedule | None = None

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
