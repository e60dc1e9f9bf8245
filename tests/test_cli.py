"""The `vit` command the way a user runs it: MAE pretraining on the digits, resume, outputs under one root, wandb
re-attachment, and every shipped config parsed and instantiated."""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import wandb
import yaml

from vit.cli import main
from vit.lightning_cli import BASE_CONFIG
from vit.plan import make_plan

ROOT = Path(__file__).resolve().parents[1]
MAE_CONFIG = ROOT / "configs" / "mae" / "vit_tiny_digits.yaml"
TINY_MAE_KWARGS = dict(patch_size=4, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
                       decoder_num_heads=2)
CONFIGS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml"))
RECIPES = [c for c in CONFIGS if not c.startswith(("configs/base/", "configs/scale/"))]
OVERLAYS = [c for c in CONFIGS if c.startswith("configs/scale/")]
TINY_FIT = ["--model.init_args.model_kwargs", json.dumps(TINY_MAE_KWARGS), "--data.batch_size", "16",
            "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
            "--trainer.enable_model_summary", "false"]


def _tiny_mae_config(tmp_path: Path, epochs: int) -> Path:
    """The shipped digits recipe with a tiny model, few batches, and a figure every epoch."""
    cfg = yaml.safe_load(MAE_CONFIG.read_text())
    cfg["trainer"].update(max_epochs=epochs, limit_train_batches=3, limit_val_batches=2, log_every_n_steps=1)
    cfg["model"]["init_args"]["model_kwargs"] = TINY_MAE_KWARGS
    cfg["data"]["batch_size"] = 16
    for cb in cfg["trainer"]["callbacks+"]:  # the recipe's own callbacks, appended to the base's
        if cb["class_path"].endswith("ReconstructionPlotter"):
            cb["init_args"]["every_n_epochs"] = 1
    path = tmp_path / "mae.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _vit(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "vit.cli", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_mae_fit_then_resume_subprocess(tmp_path: Path) -> None:
    config = _tiny_mae_config(tmp_path, epochs=2)
    first = _vit(["fit", "--config", str(config)], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "runs" / "mae_tiny_digits"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert list((run / "checkpoints").glob("best-*.ckpt"))
    metrics = run / "version_0" / "metrics.csv"
    rows = list(csv.DictReader(metrics.open()))
    assert any(r.get("val/loss") for r in rows) and any(r.get("train/loss_step") for r in rows)
    assert sorted(p.name for p in (run / "version_0" / "reconstructions").glob("*.png")) == [
        "epoch_0000.png", "epoch_0001.png"]
    out = first.stdout + first.stderr
    assert "effective batch 16" in out and "lr 0.00025" in out  # 4e-3 x 16 / 256
    assert "last checkpoint:" in out

    config = _tiny_mae_config(tmp_path, epochs=3)
    second = _vit(["fit", "--config", str(config), "--ckpt_path", "last"], tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    out = second.stdout + second.stderr
    assert "resuming from" in out and "epoch 1, global step 6" in out
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 9 and ckpt["epoch"] == 2


def test_resume_with_nothing_to_resume_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    config = _tiny_mae_config(tmp_path, epochs=1)
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.INFO):
        main(["fit", "--config", str(config), "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
              "--ckpt_path", "last"])
    assert "--ckpt_path last: nothing to resume under" in caplog.text and "starting from scratch" in caplog.text
    assert (tmp_path / "runs" / "mae_tiny_digits" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize("config", CONFIGS)
def test_every_shipped_config_parses(config: str, capsys: pytest.CaptureFixture) -> None:
    """`vit fit --print_config` resolves every class and argument, so recipes never rot."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / config), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "class_path" in capsys.readouterr().out


@pytest.mark.parametrize("config", RECIPES + OVERLAYS)
def test_every_shipped_config_instantiates(config: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Model, data, callbacks and loggers are built (the model on the meta device; the data not read; no Trainer),
    so a constructor error in a recipe fails here; an overlay is built over the ViT-B MAE recipe it scales."""
    monkeypatch.chdir(tmp_path)
    args = ["--config", str(ROOT / config)]
    if config in OVERLAYS:
        args = ["--config", str(ROOT / "configs" / "mae" / "vit_base_in1k.yaml"), *args]
    plan = make_plan(args, images=1000)
    module = yaml.safe_load(Path(args[1]).read_text())["model"]["class_path"]  # the first --config has the model
    assert plan["module"] == module.rsplit(".", 1)[-1]
    assert plan["params_total"] > 0 and plan["flops_forward"] > 0
    assert list(tmp_path.iterdir()) == [], "building a config writes nothing"


def test_a_constructor_error_is_caught_where_print_config_is_not(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """An argument of the right type that the class rejects (here LastCheckpoint's) passes --print_config."""
    cfg = yaml.safe_load(MAE_CONFIG.read_text())
    cfg["trainer"]["callbacks+"].append({"class_path": "vit.train.last_checkpoint.LastCheckpoint",
                                         "init_args": {"every_n_train_steps": -1}})
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(broken), "--print_config"])
    assert "every_n_train_steps: -1" in capsys.readouterr().out
    with pytest.raises(ValueError, match="every_n_train_steps must be >= 0, got -1"):
        make_plan(["--config", str(broken)], images=1000)


def test_recipes_are_diffs_over_the_base() -> None:
    base = yaml.safe_load(BASE_CONFIG.read_text())
    for recipe in RECIPES:
        cfg = yaml.safe_load((ROOT / recipe).read_text())
        assert "logger" not in cfg["trainer"] and "seed_everything" not in cfg, recipe
        assert cfg["trainer"]["default_root_dir"].startswith("runs/"), recipe
        assert "runs/" not in yaml.safe_dump({k: v for k, v in cfg["trainer"].items() if k != "default_root_dir"}), (
            f"{recipe}: output paths come from trainer.default_root_dir alone")
        repeated = {k for k, v in cfg["trainer"].items() if base["trainer"].get(k) == v}
        assert not repeated, f"{recipe} repeats the base's {sorted(repeated)}"


def test_default_root_dir_moves_every_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", str(MAE_CONFIG), *TINY_FIT, "--trainer.default_root_dir", "elsewhere"]) == 0
    assert sorted(p.name for p in (tmp_path / "elsewhere" / "checkpoints").iterdir()) == [
        "best-epoch=000.ckpt", "last.ckpt"]
    assert (tmp_path / "elsewhere" / "version_0" / "metrics.csv").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere"], "nothing is written outside the root"
    with caplog.at_level(logging.INFO):
        assert main(["fit", "--config", str(MAE_CONFIG), *TINY_FIT, "--trainer.default_root_dir", "elsewhere",
                     "--trainer.max_epochs", "2", "--ckpt_path", "last"]) == 0
    assert "resuming from elsewhere/checkpoints/last.ckpt: epoch 0, global step 2" in caplog.text


def test_resumed_run_continues_the_same_wandb_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    wandb_logger = "--trainer.logger+=lightning.pytorch.loggers.WandbLogger"
    try:
        assert main(["fit", "--config", str(MAE_CONFIG), *TINY_FIT, wandb_logger]) == 0
        wandb.finish()  # as at the end of a process: a live run would be reused by any new WandbLogger
        root = tmp_path / "runs" / "mae_tiny_digits"
        run_id = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["wandb_run_id"]
        assert main(["fit", "--config", str(MAE_CONFIG), *TINY_FIT, wandb_logger, "--trainer.max_epochs", "2",
                     "--ckpt_path", "last"]) == 0
    finally:
        wandb.finish()
    runs = sorted(p.name for p in (root / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.endswith(f"-{run_id}") for r in runs), (run_id, runs)
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["wandb_run_id"] == run_id


def test_bad_config_value_is_named(tmp_path: Path) -> None:
    result = _vit(["fit", "--config", str(MAE_CONFIG), "--model.init_args.mask_ratio", "1.5"], tmp_path)
    assert result.returncode != 0
    assert "mask_ratio must be in [0, 1), got 1.5" in result.stderr


def test_unknown_model_suggests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", str(MAE_CONFIG), "--model.init_args.model", "mae_vit_tiny_patch61"]) == 2
    assert "unknown model name 'mae_vit_tiny_patch61'; did you mean mae_vit_tiny_patch16" in caplog.text
    assert not (tmp_path / "runs").exists()  # failed before any work was done
