"""LastCheckpoint: an always-current ``last.ckpt``, and the one place pre-emption (SIGTERM) is handled."""

from __future__ import annotations

import logging

from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from vit.train.lightning_private import last_saved_step, save_last_now

log = logging.getLogger(__name__)

SIGTERM_EXIT_CODE = 143  # 128 + SIGTERM: schedulers read the run as terminated, not completed


class LastCheckpoint(ModelCheckpoint):
    """A ``ModelCheckpoint`` that keeps ``last.ckpt`` current, and the one place pre-emption is handled.

    ``last.ckpt`` is written every ``every_n_train_steps`` optimizer steps, at each epoch end, when training ends, and
    at the first batch boundary after the process receives SIGTERM (Lightning's signal handler records it; SLURM
    sends it before a time limit or a pre-emption). After that save the run stops with exit status 143 on every
    rank. ``vit fit ... --ckpt_path last`` continues from it exactly (see ``ExactResume``).
    ``ModelCheckpoint(save_last=True)`` alone refreshes it only when a top-k file is written, i.e. with a monitor
    only when the metric improves.

    Args:
        dirpath: folder of ``last.ckpt``; None: ``<trainer.default_root_dir>/checkpoints`` under ``vit``, else
            ``<log_dir>/checkpoints`` as ``ModelCheckpoint`` does.
        every_n_train_steps: optimizer steps between saves; 0 saves only at epoch ends, the end and SIGTERM.
    """

    def __init__(self, dirpath: str | None = None, every_n_train_steps: int = 0) -> None:
        if every_n_train_steps < 0:
            raise ValueError(f"LastCheckpoint every_n_train_steps must be >= 0, got {every_n_train_steps}")
        super().__init__(dirpath=dirpath, save_top_k=0, save_last=True,
                         every_n_train_steps=every_n_train_steps or None)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not trainer.strategy.reduce_boolean_decision(trainer.received_sigterm, all=False):
            return
        if last_saved_step(self) != trainer.global_step:
            save_last_now(self, trainer)
        _warn(f"SIGTERM: saved {self.last_model_path} at global step {trainer.global_step}; stopping. "
              f"Continue with --ckpt_path last")
        raise SIGTERMException(SIGTERM_EXIT_CODE)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._can_save(trainer):
            save_last_now(self, trainer)  # also after a step save: the epoch-end state (loops, best scores) is newer

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Nothing here: the epoch-end save follows validation in ``on_train_epoch_end``."""

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._can_save(trainer) and last_saved_step(self) != trainer.global_step:
            save_last_now(self, trainer)

    def _can_save(self, trainer: Trainer) -> bool:
        return not (trainer.fast_dev_run or trainer.sanity_checking or trainer.state.fn != "fit")


@rank_zero_only
def _warn(message: str) -> None:
    log.warning(message)
