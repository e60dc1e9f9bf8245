"""The digits recipe under Lightning's DDP on two CPU processes (gloo), exactly as a user would launch it.

Checks that both ranks end with identical weights (also after a NaN on one rank only, which both must skip), that
they read different shards, that the logged lr follows the doubled effective batch, and that ``vit plan`` predicted
the run's numbers.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning import Callback, Trainer

from vit.plan import make_plan

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "mae" / "vit_tiny_digits.yaml"
NET = {"patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2,
       "decoder_embed_dim": 16, "decoder_depth": 1, "decoder_num_heads": 2}
ARGS = ["--config", str(RECIPE), "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
        "--trainer.max_steps", "4", "--data.batch_size", "16", "--model.init_args.warmup_epochs", "0",
        "--model.init_args.model_kwargs", json.dumps(NET), "--trainer.limit_val_batches", "1",
        "--trainer.log_every_n_steps", "1", "--trainer.enable_model_summary", "false"]
OVERLAY = {"trainer": {"callbacks": [
    {"class_path": "vit.train.last_checkpoint.LastCheckpoint"},
    {"class_path": "vit.train.nonfinite.NonFiniteGuard", "init_args": {"action": "skip"}},
    {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor", "init_args": {"logging_interval": "step"}},
    {"class_path": "test_ddp.RankProbe", "init_args": {"nan_rank": 1, "nan_step": 2}},
]}}
BASE_LR = 4.0e-3  # the recipe's


class RankProbe(Callback):
    """Makes rank ``nan_rank``'s loss NaN at ``nan_step``; at the end each rank saves its weights and first batch."""

    def __init__(self, nan_rank: int, nan_step: int) -> None:
        self.nan_rank, self.nan_step = nan_rank, nan_step
        self.first_batch: torch.Tensor | None = None

    def on_train_batch_start(self, trainer: Trainer, pl_module, batch, batch_idx: int) -> None:
        if self.first_batch is None:
            self.first_batch = batch[0].detach().clone()

    def on_before_backward(self, trainer: Trainer, pl_module, loss: torch.Tensor) -> None:
        if trainer.global_rank == self.nan_rank and trainer.global_step == self.nan_step:
            loss.mul_(float("nan"))

    def on_train_end(self, trainer: Trainer, pl_module) -> None:
        torch.save({"state_dict": pl_module.state_dict(), "first_batch": self.first_batch,
                    "world_size": trainer.world_size}, f"rank{trainer.global_rank}.pt")


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("ddp")
    (cwd / "overlay.yaml").write_text(yaml.safe_dump(OVERLAY))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    vit = str(Path(sys.executable).with_name("vit"))
    out = subprocess.run([vit, "fit", *ARGS, "--config", "overlay.yaml"], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return cwd


@pytest.mark.ddp
def test_ranks_end_with_identical_weights_after_skipping_a_nan_on_one_rank(ddp_run) -> None:
    r0, r1 = (torch.load(ddp_run / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    assert not torch.equal(r0["first_batch"], r1["first_batch"]), "each rank reads its own shard"
    for k, v in r0["state_dict"].items():
        assert torch.equal(v, r1["state_dict"][k]), f"{k} differs between ranks"
        assert torch.isfinite(v).all(), k
    rows = _metrics(ddp_run)
    assert max(float(r["train/nonfinite_skipped"]) for r in rows if r.get("train/nonfinite_skipped")) == 1.0


@pytest.mark.ddp
def test_logged_lr_follows_the_doubled_effective_batch(ddp_run) -> None:
    hparams = yaml.safe_load(next((ddp_run / "runs").rglob("hparams.yaml")).read_text())
    assert hparams["effective_batch_size"] == 2 * 16
    # no warmup: the first logged lr is the peak, base_lr x 32 / 256 (exact up to the CSV's printing)
    assert _first_lr(ddp_run) == pytest.approx(BASE_LR * 32 / 256, rel=1e-6)


@pytest.mark.ddp
def test_plan_predicts_the_ddp_run(ddp_run) -> None:
    hparams = yaml.safe_load(next((ddp_run / "runs").rglob("hparams.yaml")).read_text())
    plan = make_plan(ARGS)
    assert plan["devices"] == 2
    assert plan["effective_batch"] == hparams["effective_batch_size"]
    assert plan["lr"] == pytest.approx(_first_lr(ddp_run), rel=1e-6)
    assert plan["total_steps"] == hparams["total_steps"] == 4
    assert plan["warmup_steps"] == hparams["warmup_steps"]
    assert plan["steps_per_epoch"] == 1438 // 2 // 16  # each rank reads half of the 1438 images


def _first_lr(cwd: Path) -> float:
    lrs = [float(v) for r in _metrics(cwd) for k, v in r.items() if k.startswith("lr-") and v]
    assert lrs, "LearningRateMonitor logged no lr"
    return lrs[0]


def _metrics(cwd: Path) -> list[dict[str, str]]:
    with open(next((cwd / "runs").rglob("metrics.csv"))) as f:
        return list(csv.DictReader(f))
