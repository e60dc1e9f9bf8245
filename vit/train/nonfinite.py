"""NonFiniteGuard: a non-finite loss or gradient stops the run, or skips the update, before it reaches the weights."""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only

from vit.errors import RunFaultError

log = logging.getLogger(__name__)


class NonFiniteError(RunFaultError, FloatingPointError):
    """The run stopped at a non-finite loss or gradient; ``vit`` prints the message in one line, exit status 1."""


class NonFiniteGuard(Callback):
    """Stops the run, or skips the update, when the loss or the gradients are not finite.

    The check runs after backward and before the optimizer step, so a NaN never reaches the weights and the last
    checkpoint stays the last good one. A skipped step drops every gradient: AdamW then leaves each weight and
    moment as it was (the lr schedule still advances). Under DDP/FSDP all ranks take the same decision.
    With fp16 the GradScaler already skips overflowing steps, so only the loss is checked there.

    Args:
        action: ``stop`` raises ``NonFiniteError`` (a ``FloatingPointError``) naming the step; ``skip`` drops the
            update and goes on.
        max_consecutive_skips: with ``skip``, the run stops when more steps than this fail in a row.
    """

    def __init__(self, action: Literal["stop", "skip"] = "stop", max_consecutive_skips: int = 10) -> None:
        if action not in ("stop", "skip"):
            raise ValueError(f"NonFiniteGuard action must be 'stop' or 'skip', got {action!r}")
        if max_consecutive_skips < 0:
            raise ValueError(f"NonFiniteGuard max_consecutive_skips must be >= 0, got {max_consecutive_skips}")
        self.action = action
        self.max_consecutive_skips = max_consecutive_skips
        self.skipped = 0
        self.consecutive = 0
        self._bad_loss: torch.Tensor | None = None
        self._loss: torch.Tensor | None = None

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        bad = ~torch.isfinite(loss.detach()).all()  # stays on the device: no sync per micro-batch
        self._bad_loss = bad if self._bad_loss is None else self._bad_loss | bad
        self._loss = loss.detach()

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        scaled = getattr(trainer.precision_plugin, "scaler", None) is not None
        norm = torch.nn.utils.get_total_norm(grads) if grads and not scaled else None
        bad = self._bad_loss if self._bad_loss is not None else torch.tensor(False)
        if norm is not None:
            bad = bad.to(norm.device) | ~torch.isfinite(norm)
        loss, self._bad_loss, self._loss = self._loss, None, None
        if not trainer.strategy.reduce_boolean_decision(bool(bad), all=False):
            self.consecutive = 0
            return
        where = (f"global step {trainer.global_step} (epoch {trainer.current_epoch}, "
                 f"batch {trainer.fit_loop.epoch_loop.batch_idx})")
        values = f"loss {_item(loss)}, gradient norm {_item(norm)} on rank {trainer.global_rank}"
        self.consecutive += 1
        if self.action == "skip" and self.consecutive <= self.max_consecutive_skips:
            for p in (p for g in optimizer.param_groups for p in g["params"]):
                p.grad = None  # AdamW skips parameters without a gradient: weights and moments stay as they were
            self.skipped += 1
            _warn(f"non-finite values at {where}: {values}; skipped this update ({self.skipped} so far)")
            return
        last = _last_checkpoint(trainer)
        streak = f"{self.consecutive} steps in a row; " if self.action == "skip" else ""
        raise NonFiniteError(
            f"non-finite values at {where}: {values}; {streak}stopped before the update, so the weights and "
            f"checkpoints hold no NaN. Last checkpoint: {last or 'none yet'}. Lower the learning rate, keep "
            f"gradient clipping on, use bf16 rather than fp16, or set NonFiniteGuard(action='skip')."
        )

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if self.skipped:
            pl_module.log("train/nonfinite_skipped", float(self.skipped), on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))


def _item(x: torch.Tensor | None) -> str:
    return "n/a" if x is None else f"{x.float().item():.4g}"


def _last_checkpoint(trainer: Trainer) -> str | None:
    paths = [cb.last_model_path for cb in trainer.checkpoint_callbacks
             if isinstance(cb, ModelCheckpoint) and cb.last_model_path]
    return paths[0] if paths else None


@rank_zero_only
def _warn(message: str) -> None:
    log.warning(message)
