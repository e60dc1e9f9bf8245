"""LastCheckpoint: an always-current ``last.ckpt``, and the one place pre-emption (SIGTERM) is handled."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from types import FrameType
from typing import Any

from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from vit.train.lightning_private import last_saved_step, save_last_now

log = logging.getLogger(__name__)

SIGTERM_EXIT_CODE = 143  # 128 + SIGTERM: schedulers read the run as terminated, not completed
HARD_EXIT_S = 10.0  # after a forced end, how long the unwinding may take before the process exits outright


class LastCheckpoint(ModelCheckpoint):
    """A ``ModelCheckpoint`` that keeps ``last.ckpt`` current, and the one place pre-emption is handled.

    ``last.ckpt`` is written every ``every_n_train_steps`` optimizer steps, at each epoch end, when training ends, and
    at the first training batch boundary after the process receives SIGTERM (Lightning's signal handler records
    it; SLURM sends it before a time limit or a pre-emption). After that save the run stops with exit status 143 on
    every rank. ``vit fit ... --ckpt_path last`` continues from it exactly (see ``ExactResume``).
    ``ModelCheckpoint(save_last=True)`` alone refreshes it only when a top-k file is written, i.e. with a monitor
    only when the metric improves.

    A SIGTERM during validation stops the run at the next validation batch (exit 143) and keeps the previous
    ``last.ckpt``: a save in the middle of validation would not resume exactly. A run that is stuck (a loader
    waiting for a batch that never comes) still ends: a second SIGTERM, or ``sigterm_grace`` seconds after the
    first without a finished batch, ends it at once with exit status 143 and no new save (the loader is somewhere
    inside a fetch, so its state cannot be recorded faithfully); the previous ``last.ckpt`` stays the resume point.

    Args:
        dirpath: folder of ``last.ckpt``; None: ``<trainer.default_root_dir>/checkpoints`` under ``vit``, else
            ``<log_dir>/checkpoints`` as ``ModelCheckpoint`` does.
        every_n_train_steps: optimizer steps between saves; 0 saves only at epoch ends, the end and SIGTERM.
        sigterm_grace: seconds without a finished (train or validation) batch after a SIGTERM before the run is
            ended without a save; 0 waits for a batch boundary or a second SIGTERM only.
    """

    def __init__(self, dirpath: str | None = None, every_n_train_steps: int = 0, sigterm_grace: float = 30.0) -> None:
        if every_n_train_steps < 0:
            raise ValueError(f"LastCheckpoint every_n_train_steps must be >= 0, got {every_n_train_steps}")
        if not sigterm_grace >= 0:
            raise ValueError(f"LastCheckpoint sigterm_grace must be >= 0 seconds, got {sigterm_grace}")
        super().__init__(dirpath=dirpath, save_top_k=0, save_last=True,
                         every_n_train_steps=every_n_train_steps or None)
        self.sigterm_grace = float(sigterm_grace)
        self._stuck = _StuckRunGuard(self)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._stuck.install()  # after Lightning's own SIGTERM handler, which it calls first

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        self._stuck.progress()
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not trainer.strategy.reduce_boolean_decision(trainer.received_sigterm, all=False):
            return
        if last_saved_step(self) != trainer.global_step:
            save_last_now(self, trainer)
        _warn(f"SIGTERM: saved {self.last_model_path} at global step {trainer.global_step}; stopping. "
              f"Continue with --ckpt_path last")
        raise SIGTERMException(SIGTERM_EXIT_CODE)

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        self._stuck.progress()
        if trainer.state.fn == "fit" and trainer.received_sigterm:
            # Lightning would stop here too, with SIGTERMException() and exit status 0 ("completed")
            _warn(f"SIGTERM during validation: stopping without a save; --ckpt_path last continues from "
                  f"{self._resume_point()}")
            raise SIGTERMException(SIGTERM_EXIT_CODE)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._can_save(trainer):
            save_last_now(self, trainer)  # also after a step save: the epoch-end state (loops, best scores) is newer
            if trainer.received_sigterm and _more_to_do(trainer):  # Lightning would stop next, with exit status 0
                _warn(f"SIGTERM: saved {self.last_model_path} at the end of epoch {trainer.current_epoch}; "
                      f"stopping. Continue with --ckpt_path last")
                raise SIGTERMException(SIGTERM_EXIT_CODE)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Nothing here: the epoch-end save follows validation in ``on_train_epoch_end``."""

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._can_save(trainer) and last_saved_step(self) != trainer.global_step:
            save_last_now(self, trainer)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._stuck.uninstall()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._stuck.uninstall()
        super().teardown(trainer, pl_module, stage)

    def _can_save(self, trainer: Trainer) -> bool:
        return not (trainer.fast_dev_run or trainer.sanity_checking or trainer.state.fn != "fit")

    def _resume_point(self) -> str:
        if not self.last_model_path:
            return "the start (no last.ckpt was written yet)"
        return f"{self.last_model_path} (global step {last_saved_step(self)})"


def _more_to_do(trainer: Trainer) -> bool:
    """Whether steps or epochs remain after the current epoch."""
    steps_left = trainer.max_steps is None or trainer.max_steps < 0 or trainer.global_step < trainer.max_steps
    epochs = trainer.max_epochs
    return steps_left and (epochs is None or epochs < 0 or trainer.current_epoch + 1 < epochs)


@rank_zero_only
def _warn(message: str) -> None:
    log.warning(message)


class _StuckRunGuard:
    """Ends the run when SIGTERM's batch boundary never comes: at a second SIGTERM, or after the grace period.

    Installed as the SIGTERM handler over Lightning's (which it calls on the first signal, so the usual save at the
    next batch still happens). Ending means raising ``SIGTERMException(143)`` in the main thread, which interrupts a
    blocked wait and unwinds through Lightning's teardown; should even that not finish within ``HARD_EXIT_S``, the
    process exits with ``os._exit(143)``.
    """

    def __init__(self, owner: LastCheckpoint) -> None:
        self.owner = owner
        self._previous: Any = None
        self._installed = False
        self._sigterm_at: float | None = None
        self._last_progress = 0.0
        self._reason: str | None = None  # why the watchdog ends the run; None: a second SIGTERM from outside
        self._done = threading.Event()  # set when the run is over: the timers must not fire after it
        self._main = threading.main_thread().ident

    def __getstate__(self) -> dict:
        """Without the handler and the event (ddp_spawn pickles callbacks): a copy starts uninstalled."""
        state = dict(self.__dict__, _previous=None, _installed=False)
        del state["_done"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _done=threading.Event())

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        self._previous = signal.getsignal(signal.SIGTERM)
        self._sigterm_at, self._last_progress, self._reason = None, time.monotonic(), None
        self._done = threading.Event()
        signal.signal(signal.SIGTERM, self._handle)
        self._installed = True

    def uninstall(self) -> None:
        self._done.set()
        if self._installed and signal.getsignal(signal.SIGTERM) == self._handle:
            signal.signal(signal.SIGTERM, self._previous)
        self._installed = False

    def progress(self) -> None:
        self._last_progress = time.monotonic()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._sigterm_at is None:
            self._sigterm_at = time.monotonic()
            if callable(self._previous):
                self._previous(signum, frame)  # Lightning's: records the SIGTERM for the save at the next batch
            grace = self.owner.sigterm_grace
            _warn("SIGTERM: saving at the next batch boundary, then stopping; a second SIGTERM"
                  + (f", or {grace:g} s without a finished batch," if grace else "") + " ends the run without a save")
            if grace:
                threading.Thread(target=self._watch, args=(grace,), daemon=True, name="sigterm-grace").start()
            return
        self._end(self._reason or "a second SIGTERM")

    def _watch(self, grace: float) -> None:
        while not self._done.wait(timeout=min(1.0, grace)):
            idle = time.monotonic() - max(self._sigterm_at or 0.0, self._last_progress)
            if idle >= grace:
                self._reason = f"no batch finished for {grace:g} s after SIGTERM"
                signal.pthread_kill(self._main, signal.SIGTERM)  # runs _handle in the main thread, waking its wait
                return

    def _end(self, reason: str) -> None:
        _warn(f"{reason}: ending the run now without a save; --ckpt_path last continues from "
              f"{self.owner._resume_point()}")
        threading.Thread(target=self._hard_exit, daemon=True, name="sigterm-hard-exit").start()
        raise SIGTERMException(SIGTERM_EXIT_CODE)

    def _hard_exit(self) -> None:
        if not self._done.wait(timeout=HARD_EXIT_S):
            log.error("the run did not stop within %g s of being ended; exiting", HARD_EXIT_S)
            os._exit(SIGTERM_EXIT_CODE)
