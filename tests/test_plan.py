"""``vit plan``: the parser and errors of ``vit fit``, numbers that match the model and the run, no side effects."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vit.data import ImageDataModule
from vit.flops import count_flops
from vit.plan import format_plan, main, make_plan
from vit.train import ImageClassifier, MAEPretrainer

ROOT = Path(__file__).resolve().parents[1]
MAE_TINY = ROOT / "configs" / "mae" / "vit_tiny_digits.yaml"
MAE_BASE = ROOT / "configs" / "mae" / "vit_base_in1k.yaml"
SUPERVISED = ROOT / "configs" / "supervised" / "vit_tiny_digits.yaml"
NET = {"patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2,
       "decoder_embed_dim": 16, "decoder_depth": 1, "decoder_num_heads": 2}
IN1K_IMAGES = 1_281_167


def test_plan_matches_the_model_and_writes_nothing(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    plan = make_plan(["--config", str(MAE_TINY), "--model.init_args.model_kwargs", json.dumps(NET),
                      "--trainer.devices", "2", "--data.batch_size", "32"])
    model = MAEPretrainer(model="mae_vit_tiny_patch16", model_kwargs=NET, img_size=32)
    assert plan["params_total"] == sum(p.numel() for p in model.parameters())
    assert plan["params_trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert (plan["patches"], plan["prefix_tokens"], plan["tokens_kept"]) == (64, 1, 16)
    x = torch.randn(1, 3, 32, 32)
    assert plan["flops_forward"] == count_flops(lambda: model.model(x, 0.75))  # meta device counts like CPU
    assert 2 * plan["flops_forward"] < plan["flops_train"] < 4 * plan["flops_forward"]
    assert plan["activation_bytes_per_device"] == 32 * plan["activation_bytes_per_image"] > 0
    assert plan["effective_batch"] == 64 and plan["lr"] == pytest.approx(4e-3 * 64 / 256)
    n_train = len(_digits(task="pretrain").train_dataloader().dataset)
    assert plan["train_images"] == n_train
    assert plan["steps_per_epoch"] == math.ceil(n_train / 2) // 32  # DistributedSampler pads each rank
    assert plan["warmup_steps"] == 4 * plan["steps_per_epoch"]  # the recipe's 4 warmup epochs
    assert plan["total_steps"] == 40 * plan["steps_per_epoch"]
    assert "nothing was trained or written" in format_plan(plan)
    assert list(tmp_path.iterdir()) == [], "plan writes no logs, configs or checkpoints"


def test_plan_of_the_imagenet_recipe_without_the_data(tmp_path) -> None:
    vit = str(Path(sys.executable).with_name("vit"))
    out = subprocess.run([vit, "plan", "--config", str(MAE_BASE), "--images", str(IN1K_IMAGES)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    for expected in ("111.91 M total", "49 + 1 kept", "8 devices x accumulate 4 = 4,096 effective",
                     "0.0024 = base_lr 0.00015 x 4,096 / 256", "313 per epoch", "250,400 in all",
                     "12,520 steps (40 epochs)", "precision bf16-mixed"):
        assert expected in out.stdout, (expected, out.stdout)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("overlay", "devices", "strategy", "accumulate"),
                         [("fsdp.yaml", 8, "FSDPStrategy", 4), ("multinode.yaml", 32, "DDPStrategy", 1)])
def test_scale_overlays_keep_the_recipe_batch(overlay, devices, strategy, accumulate) -> None:
    plan = make_plan(["--config", str(MAE_BASE), "--config", str(ROOT / "configs" / "scale" / overlay)],
                     images=IN1K_IMAGES)
    assert (plan["devices"], plan["strategy"], plan["accumulate"]) == (devices, strategy, accumulate)
    assert plan["effective_batch"] == 4096 and plan["lr"] == pytest.approx(2.4e-3)


def test_plan_sizes_a_classifier_from_its_data() -> None:
    plan = make_plan(["--config", str(SUPERVISED)])
    dm = _digits(batch_size=64)
    loader = dm.train_dataloader()
    recipe = {"model": "vit_tiny_patch16_224", "img_size": 32,
              "model_kwargs": {"patch_size": 4, "embed_dim": 128, "depth": 4, "num_heads": 4}}
    clf = ImageClassifier(**recipe, num_classes=dm.num_classes)  # the recipe's network, built for real
    assert plan["module"] == "ImageClassifier" and "tokens_kept" not in plan and plan["mask_ratio"] is None
    assert plan["params_total"] == sum(p.numel() for p in clf.parameters())
    assert plan["params_trainable"] == sum(p.numel() for p in clf.parameters() if p.requires_grad)
    assert plan["flops_forward"] == count_flops(lambda: clf.model(torch.randn(1, 3, 32, 32)))
    assert plan["train_images"] == len(loader.dataset) and plan["val_images"] == len(dm.val_dataloader().dataset)
    assert plan["batches_per_epoch"] == len(loader) == plan["steps_per_epoch"]  # one device, no accumulation


def _digits(**kwargs) -> ImageDataModule:
    dm = ImageDataModule(img_size=32, **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


@pytest.mark.parametrize(("args", "message"), [
    (["--model.init_args.mask_ratio", "1.2"], "mask_ratio must be in [0, 1), got 1.2"),
    (["--data.root", "/no/such/folder"], "root must be an existing folder"),
    (["--images", "0"], "--images must be positive"),
])
def test_plan_reports_bad_configs_by_name(tmp_path, monkeypatch, caplog, args, message) -> None:
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.ERROR)
    assert main(["--config", str(MAE_TINY), *args]) == 2
    assert message in caplog.text


def test_plan_help_shows_its_own_options_and_usage() -> None:
    """`vit plan --help`: its usage line and own options, without importing torch or Lightning to say so."""
    code = ("import sys; from vit.plan import main; assert main(['--config', 'x.yaml', '--help']) == 0; "
            "assert 'lightning' not in sys.modules and 'torch' not in sys.modules, 'imported for --help'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("usage: vit plan --config RECIPE [--images N] [--classes K]")
    own = [line.split()[0] for line in lines if line.startswith("  -")]
    assert own == ["-h,", "--images", "--classes"]
    assert "vit fit --help" in done.stdout
