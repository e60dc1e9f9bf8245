"""ExactResume: a run resumed mid-epoch ends with the same weights as an uninterrupted one.

It seeds the global RNGs (masking noise, drop path, mixup) from (seed, rank, epoch, batch) before each training
batch: Lightning stores no RNG state in checkpoints, and restoring one would not be enough, since the train loader
draws its base seed from the torch RNG when its iterator is made, at another point of a resumed run. And it puts
the saved data-loader position back, which Lightning 2.6 drops when ``configure_optimizers`` reads
``trainer.estimated_stepping_batches`` (Lightning issue #20550), after setting the sampler's epoch.
"""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import CombinedLoader

from vit.train.lightning_private import restart_train_iterator


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
    ``current_epoch``: after a resume from an epoch-end checkpoint Lightning sets it one too high. A train loader
    that has a ``set_epoch`` of its own (litdata's counts epochs per ``iter()``) is told the epoch the same way.

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
        stateful = [dl for dl in _train_loaders(trainer) if _stateful(dl)]
        if not states or not stateful:
            return
        if len(stateful) != len(states):
            raise RuntimeError(f"the checkpoint holds {len(states)} train loader states for {len(stateful)} "
                               "stateful train loaders: resume with the data configuration it was saved with")
        self._set_epoch(trainer)
        for loader, state in zip(stateful, states, strict=True):
            loader.load_state_dict(state)
        restart_train_iterator(trainer)  # a fresh iterator starts from the loaded position

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Lightning sets the sampler's epoch from its epoch progress, one ahead of current_epoch after a resume from
        # an epoch-end checkpoint; samplers read it when iteration starts, which comes after this hook
        self._set_epoch(trainer)

    def _set_epoch(self, trainer: Trainer) -> None:
        for dl in _train_loaders(trainer):
            # a loader with its own set_epoch counts epochs itself (vit.data.streaming.EpochStreamingDataLoader)
            samplers = {id(s): s for s in (dl, getattr(dl, "sampler", None),
                                           getattr(getattr(dl, "batch_sampler", None), "sampler", None))}
            for sampler in samplers.values():
                if callable(getattr(sampler, "set_epoch", None)):
                    sampler.set_epoch(trainer.current_epoch)

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


def _train_loaders(trainer: Trainer) -> list[Any]:
    """The fit loop's train loaders (as Lightning processed them), flattened in the order its checkpoints use."""
    loaders = trainer.train_dataloader
    return [] if loaders is None else CombinedLoader(loaders).flattened


def _stateful(loader: Any) -> bool:
    """Whether Lightning saves this loader's state in checkpoints (its ``_Stateful`` test: both methods)."""
    return callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None))
