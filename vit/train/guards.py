"""Guards Lightning lacks: non-finite steps, per-step RNG seeds, an always-current last.ckpt, atomic files.

- ``NonFiniteGuard``: a non-finite loss or gradient stops the run (or skips the update) before it reaches the weights.
- ``ExactResume``: a run resumed mid-epoch ends with the same weights as an uninterrupted one. It seeds the global
  RNGs (masking noise, drop path, mixup) from (seed, rank, epoch, batch) before each training batch: Lightning
  stores no RNG state in checkpoints, and restoring one would not be enough, since the train loader draws its base
  seed from the torch RNG when its iterator is made, at another point of a resumed run. And it puts the saved
  data-loader position back, which Lightning 2.6 drops when ``configure_optimizers`` reads
  ``trainer.estimated_stepping_batches`` (Lightning issue #20550), after setting the sampler's epoch.
- ``LastCheckpoint``: ``last.ckpt`` every N steps, at each epoch end, at the end, and at the first batch boundary
  after SIGTERM, then a clean stop (exit status 143). ``ModelCheckpoint(save_last=True)`` only refreshes it when a
  top-k file is written, i.e. with a monitor only when the metric improves.
- ``AtomicCheckpointIO``: the file is written next to its target, fsynced and renamed into place. Lightning stages it
  in ``$TMPDIR`` and moves it; across filesystems that move is a copy into the target, which a kill can cut short.
- ``check_checkpoint_matches``: resuming from a checkpoint of another architecture is an error naming the fields.
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
import time
from collections.abc import Mapping
from contextlib import suppress
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning import Callback, LightningModule, Trainer
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.data import _set_sampler_epoch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)

SIGTERM_EXIT_CODE = 143  # 128 + SIGTERM: schedulers read the run as terminated, not completed


class NonFiniteGuard(Callback):
    """Stops the run, or skips the update, when the loss or the gradients are not finite.

    The check runs after backward and before the optimizer step, so a NaN never reaches the weights and the last
    checkpoint stays the last good one. A skipped step drops every gradient: AdamW then leaves each weight and
    moment as it was (the lr schedule still advances). Under DDP/FSDP all ranks take the same decision.
    With fp16 the GradScaler already skips overflowing steps, so only the loss is checked there.

    Args:
        action: ``stop`` raises ``FloatingPointError`` naming the step; ``skip`` drops the update and goes on.
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
        raise FloatingPointError(
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


class ExactResume(Callback):
    """Makes a resumed run replay the uninterrupted one: per-step RNG seeds and the data loader's saved position.

    Before every training batch, torch (CPU and CUDA), numpy and python RNGs are seeded from (seed, rank, epoch,
    batch), so masking noise, drop path and mixup depend only on where the batch is in training, never on what ran
    before it; ranks draw different masks. The seed is stored in checkpoints, so a resumed run keeps it even when
    ``seed_everything`` drew a new one.

    On a mid-epoch resume, the train loader's state from the checkpoint (a torchdata ``StatefulDataLoader``'s
    position) is loaded again at ``on_train_start``, after the sampler's epoch is set, and its iterator remade.
    Lightning 2.6 skips that load when the loader was built earlier, by ``trainer.estimated_stepping_batches`` in
    ``configure_optimizers`` (issue #20550), and makes the iterator before ``set_epoch``, so a stateless sampler
    would be fast-forwarded through epoch 0's order. And at each epoch start the sampler's epoch is set to
    ``current_epoch``: after a resume from an epoch-end checkpoint Lightning sets it one too high.

    Args:
        seed: base seed; None takes the one ``seed_everything`` set (``PL_GLOBAL_SEED``), else 0.
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self._loader_states: list[dict[str, Any]] | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.seed is None:
            self.seed = int(os.environ.get("PL_GLOBAL_SEED", 0))

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        loops = checkpoint.get("loops", {}).get("fit_loop", {})
        mid_epoch = not loops.get("epoch_loop.batch_progress", {}).get("is_last_batch", True)
        # saved after an epoch's last batch: the next epoch starts a fresh iterator, there is no position to restore
        self._loader_states = (loops.get("state_dict", {}).get("combined_loader") or None) if mid_epoch else None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        states, self._loader_states = self._loader_states, None
        fit_loop = trainer.fit_loop
        combined = fit_loop._combined_loader
        if not states or combined is None or fit_loop._data_fetcher is None:
            return
        self._set_epoch(trainer)
        combined._load_state_dicts(states)
        fit_loop._combined_loader_states_to_load = []  # Lightning must not load them a second time
        iter(fit_loop._data_fetcher)  # a fresh iterator starts from the loaded position

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Lightning sets the sampler's epoch from its epoch progress, one ahead of current_epoch after a resume from
        # an epoch-end checkpoint; samplers read it when iteration starts, which comes after this hook
        self._set_epoch(trainer)

    def _set_epoch(self, trainer: Trainer) -> None:
        combined = trainer.fit_loop._combined_loader
        for dl in combined.flattened if combined is not None else []:
            _set_sampler_epoch(dl, trainer.current_epoch)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        key = [self.seed or 0, trainer.global_rank, trainer.current_epoch, batch_idx]
        state = np.random.SeedSequence(key).generate_state(2, np.uint32)
        seed = int(state[0]) << 32 | int(state[1])
        torch.manual_seed(seed)  # seeds every CUDA device too
        np.random.seed(int(state[0]))
        random.seed(seed)

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seed = state_dict.get("seed", self.seed)


class LastCheckpoint(ModelCheckpoint):
    """A ``ModelCheckpoint`` that keeps ``last.ckpt`` current, and the one place pre-emption is handled.

    ``last.ckpt`` is written every ``every_n_train_steps`` optimizer steps, at each epoch end, when training ends, and
    at the first batch boundary after the process receives SIGTERM (Lightning's signal handler records it; SLURM
    sends it before a time limit or a pre-emption). After that save the run stops with exit status 143 on every
    rank. ``vit fit ... --ckpt_path last`` continues from it exactly (see ``ExactResume``).

    Args:
        dirpath: folder of ``last.ckpt``; None uses ``<log_dir>/checkpoints`` as ``ModelCheckpoint`` does.
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
        if self._saved_step() != trainer.global_step:
            self._save_last(trainer)
        _warn(f"SIGTERM: saved {self.last_model_path} at global step {trainer.global_step}; stopping. "
              f"Continue with --ckpt_path last")
        raise SIGTERMException(SIGTERM_EXIT_CODE)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._can_save(trainer):
            self._save_last(trainer)  # also after a step save: the epoch-end state (loops, best scores) is newer

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Nothing here: the epoch-end save follows validation in ``on_train_epoch_end``."""

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._can_save(trainer) and self._saved_step() != trainer.global_step:
            self._save_last(trainer)

    def _can_save(self, trainer: Trainer) -> bool:
        return not (trainer.fast_dev_run or trainer.sanity_checking or trainer.state.fn != "fit")

    def _saved_step(self) -> int | None:
        return getattr(self, "_last_global_step_saved", None)

    def _save_last(self, trainer: Trainer) -> None:
        # ModelCheckpoint's own routine: it tracks last_model_path, versions and save_last="link"
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file beside its target, fsyncs it and renames it into place.

    A reader, or a run restarted after a kill at any moment, sees the previous complete file or the new one,
    never a part. Lightning's ``TorchCheckpointIO`` stages the file in ``$TMPDIR``, so when that is another
    filesystem than the checkpoints (node-local /tmp, checkpoints on NFS or Lustre) its final move is a copy
    into the target. Remote URLs (s3://, gs://) go to Lightning's writer unchanged.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        if not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        start = time.time()
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            with suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(target.parent)
        _remove_leftovers(target, start)


def check_checkpoint_matches(module: LightningModule, checkpoint: Mapping[str, Any], source: str) -> None:
    """Raise ``ValueError`` when ``checkpoint`` holds another architecture than ``module``, naming what differs.

    Compares parameter names and shapes; the message lists the hyperparameters that differ (e.g.
    ``model_kwargs.embed_dim: checkpoint 128, config 64``) and a few conflicting tensors.
    """
    theirs = checkpoint.get("state_dict") or {}
    ours = module.state_dict()
    missing = sorted(ours.keys() - theirs.keys())
    unexpected = sorted(theirs.keys() - ours.keys())
    shapes = sorted(k for k in ours.keys() & theirs.keys() if tuple(ours[k].shape) != tuple(theirs[k].shape))
    if not (missing or unexpected or shapes):
        return
    fields = _flatten(checkpoint.get("hyper_parameters") or {})
    config = _flatten(dict(getattr(module, "hparams", {})))
    diffs = [f"model.{k}: checkpoint {fields.get(k)!r}, config {config.get(k)!r}"
             for k in sorted(fields.keys() | config.keys()) if fields.get(k) != config.get(k)]
    tensors = [f"{k} {tuple(theirs[k].shape)} vs {tuple(ours[k].shape)}" for k in shapes[:3]]
    raise ValueError(
        f"checkpoint {source} holds another architecture than this config"
        + (f"; fields that differ: {'; '.join(diffs)}" if diffs else "")
        + f". {len(shapes)} shape conflicts ({', '.join(tensors) or 'none'}), {len(missing)} missing and "
        f"{len(unexpected)} unexpected tensors. Resume with the checkpoint's own config, or start a new run."
    )


def _item(x: torch.Tensor | None) -> str:
    return "n/a" if x is None else f"{x.float().item():.4g}"


def _last_checkpoint(trainer: Trainer) -> str | None:
    paths = [cb.last_model_path for cb in trainer.checkpoint_callbacks
             if isinstance(cb, ModelCheckpoint) and cb.last_model_path]
    return paths[0] if paths else None


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (a crash after it must not bring back the old file)."""
    with suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove_leftovers(target: Path, before: float) -> None:
    """Remove temporary files of this target left by writers killed before this save began."""
    for old in target.parent.glob(f".{target.name}.*.tmp"):
        with suppress(OSError):
            if old.stat().st_mtime < before:
                old.unlink()
                log.info("removed %s, left by an interrupted checkpoint write", old)


@rank_zero_only
def _warn(message: str) -> None:
    log.warning(message)
