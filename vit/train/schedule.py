"""What the trainer's configuration implies for the recipe: effective batch and steps per epoch."""

from __future__ import annotations

import math

from lightning import Trainer


def effective_batch_size(trainer: Trainer) -> int:
    """devices × nodes × per-device batch × gradient accumulation."""
    batch = getattr(trainer.datamodule, "hparams", {}).get("batch_size")
    if batch is None:
        batch = trainer.train_dataloader.batch_size if trainer.train_dataloader is not None else 1
    return int(trainer.world_size * batch * trainer.accumulate_grad_batches)


def steps_per_epoch(trainer: Trainer) -> int:
    """Optimizer steps per epoch (call after ``trainer.estimated_stepping_batches``, which sets up the data)."""
    batches = trainer.num_training_batches
    if not math.isfinite(batches) or batches == 0:
        trainer.fit_loop.setup_data()  # with only max_steps set, the estimate above did not load the data
        batches = trainer.num_training_batches
    if not math.isfinite(batches):
        raise ValueError("warmup in epochs needs a sized training loader; set the warmup in steps instead")
    return max(1, math.ceil(batches / trainer.accumulate_grad_batches))
