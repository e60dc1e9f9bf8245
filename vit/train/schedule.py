"""The run's numbers, computed once for training and for ``vit plan``: effective batch, lr, steps, warmup.

The pure functions take plain numbers, so ``vit plan`` (no Trainer, data possibly unread) and the
LightningModules (through ``run_schedule``) share one definition of each rule.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

RUN_LENGTH_KEY = "run_length"  # where a checkpoint records the length of the run that wrote it


def effective_batch_size(world_size: int, batch_size: int, accumulate: int) -> int:
    """devices × nodes × per-device batch × gradient accumulation."""
    return int(world_size * batch_size * accumulate)


def scaled_lr(base_lr: float, effective_batch: int) -> float:
    """The linear scaling rule of the MAE / DeiT recipes: lr = base_lr × effective batch / 256."""
    return base_lr * effective_batch / 256


def optimizer_steps_per_epoch(batches_per_epoch: int, accumulate: int) -> int:
    """Optimizer steps in an epoch of ``batches_per_epoch`` batches (a last partial accumulation still steps)."""
    return max(1, math.ceil(batches_per_epoch / accumulate))


def warmup_steps(warmup_epochs: float, steps_per_epoch: int, total_steps: float) -> int:
    """Warmup in optimizer steps: ``warmup_epochs`` epochs rounded to a step, at most the whole run."""
    steps = round(warmup_epochs * steps_per_epoch)
    return int(min(steps, total_steps)) if math.isfinite(total_steps) else int(steps)


@dataclass(frozen=True)
class RunSchedule:
    """What a recipe's numbers come to for one run; logged as hyperparameters at fit start."""

    effective_batch_size: int
    peak_lr: float
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int

    def as_dict(self) -> dict[str, float]:
        """The fields as a flat dict (for ``logger.log_hyperparams``)."""
        return asdict(self)


def run_schedule(trainer: Trainer, base_lr: float, lr: float | None, warmup_epochs: float) -> RunSchedule:
    """The schedule of a fit about to start; call from ``configure_optimizers`` (it sets up the train loader)."""
    total = int(trainer.estimated_stepping_batches)  # first: it sets up the train loader
    batches = trainer.num_training_batches
    if not math.isfinite(batches) or batches == 0:
        trainer.fit_loop.setup_data()  # with only max_steps set, the estimate above did not load the data
        batches = trainer.num_training_batches
    if not math.isfinite(batches):
        raise ValueError("warmup in epochs needs a sized training loader; set the warmup in steps instead")
    accumulate = trainer.accumulate_grad_batches
    eff = effective_batch_size(trainer.world_size, loader_batch_size(trainer), accumulate)
    per_epoch = optimizer_steps_per_epoch(int(batches), accumulate)
    asked = round(warmup_epochs * per_epoch)
    if asked > total:
        rank_zero_warn(f"warmup_epochs {warmup_epochs:g} is {asked} warmup steps, but the run has only {total} "
                       f"optimizer steps: the lr never reaches its peak (lower warmup_epochs or train longer)")
    return RunSchedule(
        effective_batch_size=eff,
        peak_lr=lr if lr is not None else scaled_lr(base_lr, eff),
        steps_per_epoch=per_epoch,
        total_steps=total,
        warmup_steps=warmup_steps(warmup_epochs, per_epoch, total),
    )


def loader_batch_size(trainer: Trainer) -> int:
    """The per-device batch size of the run: the data module's ``batch_size``, else the train loader's."""
    batch = getattr(trainer.datamodule, "hparams", {}).get("batch_size")
    if batch is None:
        batch = trainer.train_dataloader.batch_size if trainer.train_dataloader is not None else 1
    return int(batch)


class RunLength(Callback):
    """Records the run's length in checkpoints; a resume that changes it warns, naming the old and new values.

    The warmup + cosine schedule spans the whole run, so a resume with another ``max_epochs`` / ``max_steps``
    stretches or shrinks it from the step it is at: the lr jumps to where the new schedule is at that step.
    """

    def __init__(self) -> None:
        self.saved: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[RUN_LENGTH_KEY] = _run_length(trainer, pl_module)

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self.saved = checkpoint.get(RUN_LENGTH_KEY)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        old, self.saved = self.saved, None
        new = _run_length(trainer, pl_module)
        if not old or old.get("total_steps") == new["total_steps"]:
            return
        changed = [f"{k} {old.get(k)} -> {new[k]}" for k in ("max_epochs", "max_steps") if old.get(k) != new[k]]
        warmup = (f"; warmup {old.get('warmup_steps')} -> {new['warmup_steps']} steps"
                  if old.get("warmup_steps") != new["warmup_steps"] else "")
        rank_zero_warn(f"this resume changes the run's length ({', '.join(changed) or 'same limits'}): "
                       f"{old.get('total_steps')} -> {new['total_steps']} optimizer steps{warmup}; the lr schedule "
                       f"is rescaled to the new length from step {trainer.global_step}")


def _run_length(trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
    schedule = getattr(pl_module, "schedule", None)
    return {"max_epochs": trainer.max_epochs, "max_steps": trainer.max_steps,
            "total_steps": getattr(schedule, "total_steps", None),
            "warmup_steps": getattr(schedule, "warmup_steps", None)}
