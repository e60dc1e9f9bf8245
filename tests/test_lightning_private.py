"""The one adapter over private Lightning: each attribute it uses exists in the installed Lightning, and each
function still does what its callers rely on. A failure names the attribute and the version it was written for."""

from __future__ import annotations

import tempfile
from pathlib import Path

import lightning
import pytest
import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ModelSummary, ThroughputMonitor
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from torchdata.stateful_dataloader import StatefulDataLoader

from vit.train.lightning_private import (
    LIGHTNING_VERSION,
    PRIVATE_ATTRIBUTES,
    last_saved_step,
    restart_train_iterator,
    save_last_now,
)

OWNERS = {
    "trainer.fit_loop": lambda: Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False).fit_loop,
    "ModelCheckpoint": lambda: ModelCheckpoint(),
    "ThroughputMonitor": lambda: ThroughputMonitor(batch_size_fn=len),
    "ModelSummary": lambda: ModelSummary(),
    "CSVLogger": lambda: CSVLogger(tempfile.mkdtemp()),
    "ExperimentWriter": lambda: ExperimentWriter(tempfile.mkdtemp()),
}


@pytest.mark.parametrize(("owner", "name"), [(o, n) for o, names in PRIVATE_ATTRIBUTES.items() for n in names])
def test_installed_lightning_has_every_private_attribute_the_adapter_uses(owner: str, name: str) -> None:
    obj = OWNERS[owner]()
    assert hasattr(obj, name), (
        f"Lightning {lightning.__version__} has no {owner}.{name}; vit/train/lightning_private.py uses it (written "
        f"for Lightning {LIGHTNING_VERSION}): find its replacement there, or the public API that made it unneeded")


def test_every_owner_is_covered() -> None:
    assert set(OWNERS) == set(PRIVATE_ATTRIBUTES)


class _Counting(LightningModule):
    """One weight; each batch is a tensor of data set indices [B], so the tests can see where the loader is."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def train_dataloader(self) -> StatefulDataLoader:
        return StatefulDataLoader(torch.arange(40), batch_size=4)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return (self.w * batch.float()).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


class _Probe(Callback):
    """At train start moves the loader to batch 3 and restarts the iterator; at step 2 writes last.ckpt."""

    def __init__(self, checkpoint: ModelCheckpoint) -> None:
        self.checkpoint = checkpoint
        self.restarted: bool | None = None
        self.saved_at: list[int] = []
        self.first_batch: torch.Tensor | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        ahead = StatefulDataLoader(torch.arange(40), batch_size=4)
        batches = iter(ahead)
        for _ in range(3):
            next(batches)
        trainer.train_dataloader.load_state_dict(ahead.state_dict())
        self.restarted = restart_train_iterator(trainer)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        if self.first_batch is None:
            self.first_batch = batch.clone()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step == 2:
            save_last_now(self.checkpoint, trainer)
            self.saved_at.append(last_saved_step(self.checkpoint))


def test_the_adapter_restarts_the_iterator_and_saves_last_now(tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_top_k=0, save_last=True, every_n_epochs=0)
    probe = _Probe(checkpoint)
    trainer = Trainer(max_steps=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[checkpoint, probe])
    assert last_saved_step(checkpoint) == 0  # no save before any step
    trainer.fit(_Counting())
    assert probe.restarted is True
    # the iterator Lightning made before train start would begin at batch 0; the restarted one at the loaded state
    assert probe.first_batch.tolist() == [12, 13, 14, 15]
    assert probe.saved_at == [2]
    assert checkpoint.last_model_path == str(tmp_path / "last.ckpt")
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == 2


def test_restart_before_fit_says_so() -> None:
    assert restart_train_iterator(Trainer(logger=False, enable_checkpointing=False)) is False
