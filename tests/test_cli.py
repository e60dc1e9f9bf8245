"""The `vit` command the way a user runs it: MAE pretraining on the digits, resume, and every shipped config."""

from __future__ import annotations

import csv
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vit.cli import main

ROOT = Path(__file__).resolve().parents[1]
MAE_CONFIG = ROOT / "configs" / "mae" / "vit_tiny_digits.yaml"
TINY_MAE_KWARGS = dict(patch_size=4, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
                       decoder_num_heads=2)


def _tiny_mae_config(tmp_path: Path, epochs: int) -> Path:
    """The shipped digits recipe with a tiny model, few batches, and a figure every epoch."""
    cfg = yaml.safe_load(MAE_CONFIG.read_text())
    cfg["trainer"].update(max_epochs=epochs, limit_train_batches=3, limit_val_batches=2, log_every_n_steps=1)
    cfg["model"]["init_args"]["model_kwargs"] = TINY_MAE_KWARGS
    cfg["data"]["batch_size"] = 16
    for cb in cfg["trainer"]["callbacks"]:
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
    import torch

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


@pytest.mark.parametrize("config", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml")))
def test_every_shipped_config_parses(config: str, capsys: pytest.CaptureFixture) -> None:
    """`vit fit --print_config` resolves every class and argument, so recipes never rot."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / config), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "class_path" in capsys.readouterr().out


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
