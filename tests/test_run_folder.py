"""One folder per run: a second run never writes into a run's checkpoint folder, and a run moved elsewhere resumes
there, its metrics and learning curves continuing in the same version folder."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import pytest

from vit.cli import main
from vit.train.figures import learning_curves_figure

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "mae" / "vit_tiny_digits.yaml"
NET = dict(patch_size=4, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16, decoder_depth=1,
           decoder_num_heads=2)
TINY = ["--config", str(RECIPE), "--model.init_args.model_kwargs", json.dumps(NET), "--data.batch_size", "16",
        "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1",
        "--trainer.enable_model_summary", "false"]


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_a_second_run_is_refused_and_a_moved_run_resumes_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["fit", *TINY, "--trainer.max_epochs", "1", "--trainer.default_root_dir", "first"]) == 0
    before = _files(tmp_path / "first")
    assert "checkpoints/last.ckpt" in before and "version_0/metrics.csv" in before

    # another run (here other data settings) into the same folder: one line, exit 2, nothing written
    caplog.set_level(logging.ERROR, logger="vit")
    assert main(["fit", *TINY, "--data.img_size", "16", "--trainer.default_root_dir", "first"]) == 2
    assert "first/checkpoints already holds another run's checkpoints (best-epoch=000.ckpt, last.ckpt)" in caplog.text
    assert "--ckpt_path last" in caplog.text and "--trainer.default_root_dir" in caplog.text
    assert _files(tmp_path / "first") == before

    # the run folder moved elsewhere resumes there: same version folder, old rows kept, one last and one best
    moved = tmp_path / "elsewhere" / "run"
    shutil.move(tmp_path / "first", moved)
    assert main(["fit", *TINY, "--trainer.max_epochs", "2", "--trainer.default_root_dir", str(moved),
                 "--ckpt_path", "last"]) == 0
    assert sorted(p.name for p in moved.glob("version_*")) == ["version_0"]
    assert sorted(p.name for p in (moved / "checkpoints").iterdir()) == ["best-epoch=001.ckpt", "last.ckpt"]
    rows = list(csv.DictReader((moved / "version_0" / "metrics.csv").open()))
    assert [r["epoch"] for r in rows if r.get("val/loss")] == ["0", "1"]
    assert [r["epoch"] for r in rows if r.get("train/loss_epoch")] == ["0", "1"]
    curves = learning_curves_figure(moved / "version_0" / "metrics.csv")
    [loss] = [ax for ax in curves.axes if ax.get_ylabel() == "loss"]
    assert {line.get_label(): line.get_xdata().tolist() for line in loss.get_lines()} == {
        "train": [0.0, 1.0], "val": [0.0, 1.0]}
    assert not (tmp_path / "first").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere"]
