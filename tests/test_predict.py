"""Prediction: top-k CSV / JSON for a folder of mixed image modes, attention maps with fused attention on."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from vit.cli import VitCLI
from vit.data import ImageDataModule
from vit.errors import BadInputError
from vit.layers import Attention
from vit.models import VisionTransformer
from vit.train import ImageClassifier, PredictionWriter, attention_maps

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4)  # as conftest's tiny_args
MODES = ("RGB", "L", "RGBA", "P", "LA")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of images in every mode the data layer converts: RGB, grey, RGBA, palette, grey + alpha."""
    folder = tmp_path_factory.mktemp("predict")
    rng = np.random.default_rng(0)
    for i, mode in enumerate(MODES):
        rgba = rng.integers(0, 256, (20 + i, 24, 4), dtype=np.uint8)
        Image.fromarray(rgba, "RGBA").convert(mode).save(folder / f"img_{mode.lower()}.png")
    return folder


# ----------------------------------------------------------------------------------------------- attention maps
VARIANTS = {
    "token": dict(global_pool="token"),
    "avg": dict(global_pool="avg"),
    "avg_no_cls": dict(global_pool="avg", class_token=False),
    "token_registers": dict(global_pool="token", reg_tokens=2),
    "map": dict(global_pool="map"),
    "map_registers_no_cls": dict(global_pool="map", class_token=False, reg_tokens=2),
}


def _reference(model: VisionTransformer, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The maps by the manual attention path, block by block (the readable definition)."""
    for m in model.modules():
        if isinstance(m, Attention):
            m.fused_attn = False
    P = model.num_prefix_tokens
    tokens, rollout = model.prepare_tokens(x), None
    for blk in model.blocks:
        last = blk.attn.attention_weights(blk.norm1(tokens)).mean(dim=1)  # (B, N, N) over heads
        step = 0.5 * last + 0.5 * torch.eye(last.shape[-1])  # the residual connection
        step = step / step.sum(dim=-1, keepdim=True)
        rollout = step if rollout is None else step @ rollout
        tokens = blk(tokens)
    tokens = model.norm(tokens)
    if model.attn_pool is not None:
        probe = model.attn_pool.attention_weights(tokens[:, P:]).mean(dim=(1, 2))  # over the patch tokens
        out = {"last": probe, "rollout": (probe.unsqueeze(1) @ rollout[:, P:]).squeeze(1)[:, P:]}
    elif model.global_pool == "token":
        out = {"last": last[:, 0, P:], "rollout": rollout[:, 0, P:]}
    else:
        out = {"last": last[:, P:, P:].mean(dim=1), "rollout": rollout[:, P:, P:].mean(dim=1)}
    return {k: v.reshape(x.shape[0], *model.grid_size) for k, v in out.items()}


@pytest.mark.parametrize("variant", VARIANTS)
def test_attention_maps_with_fused_attention_match_the_manual_path(variant: str) -> None:
    model = VisionTransformer(**TINY, num_classes=3, **VARIANTS[variant]).eval()
    with torch.no_grad():
        for p in model.parameters():  # away from init, so the attention is not near uniform
            p.add_(torch.randn_like(p) * 0.2)
    x = torch.randn(2, 3, 32, 32)
    maps = attention_maps(model, x)
    assert all(m.fused_attn for m in model.modules() if isinstance(m, Attention))  # not switched globally
    with torch.no_grad():
        ref = _reference(model, x)
    for key in ("last", "rollout"):
        assert maps[key].shape == (2, 8, 8)
        # fp32, the same math; fused vs manual kernels differ in summation order only
        torch.testing.assert_close(maps[key], ref[key], rtol=0, atol=1e-5)
        assert (maps[key] >= 0).all() and (maps[key].sum(dim=(1, 2)) <= 1 + 1e-5).all()


# ----------------------------------------------------------------------------------------------- writer
def test_writer_json_top_k_and_attention_overlays(images: Path, tmp_path: Path) -> None:
    names = ["cat", "dog", "eel", "fox"]
    clf = ImageClassifier("vit_tiny_patch16_224", {k: v for k, v in TINY.items() if k != "img_size"}, img_size=32,
                          num_classes=4, class_names=names)
    out = tmp_path / "preds.json"
    writer = PredictionWriter(output=str(out), top_k=3, attention_maps=True)
    trainer = L.Trainer(callbacks=[writer], logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    dm = ImageDataModule(img_size=32, batch_size=2, predict_paths=str(images))
    trainer.predict(clf, datamodule=dm, return_predictions=False)
    rows = json.loads(out.read_text())
    assert [Path(r["path"]).name for r in rows] == sorted(f"img_{m.lower()}.png" for m in MODES)
    for r in rows:
        probs = [p["prob"] for p in r["predictions"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
        assert {p["label"] for p in r["predictions"]} <= set(names)
    pngs = sorted((tmp_path / "attention").glob("*.png"))
    assert len(pngs) == len(MODES) and all(p.stat().st_size > 0 for p in pngs)


def test_cli_predict_subprocess_writes_csv_with_training_class_names(images: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """`vit predict` as a user runs it, on a checkpoint of the digits fine-tune recipe (one training step)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VIT_CACHE_DIR", str(tmp_path / "cache"))
    recipe = str(ROOT / "configs/finetune/vit_tiny_digits.yaml")
    VitCLI(L.LightningModule, ImageDataModule, subclass_mode_model=True, save_config_kwargs={"overwrite": True},
           args=["fit", "--config", recipe, "--model.init_from", "null", "--trainer.max_epochs", "1",
                 "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1", "--data.batch_size", "16"])
    ckpt = tmp_path / "runs/finetune_tiny_digits/checkpoints/last.ckpt"
    env = {**os.environ, "WANDB_MODE": "offline"}
    vit = Path(sys.executable).with_name("vit")
    done = subprocess.run([str(vit), "predict", "--config", recipe, "--ckpt_path", str(ckpt), "--data.predict_paths",
                           str(images), "--trainer.callbacks.attention_maps", "true"],  # the README's switch
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    attention = sorted((tmp_path / "runs/finetune_tiny_digits/attention").glob("*.png"))
    assert len(attention) == len(MODES), attention
    out = tmp_path / "runs/finetune_tiny_digits/predictions.csv"
    assert "wrote top-3 predictions of 5 image(s)" in done.stderr + done.stdout
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "label_1", "prob_1", "label_2", "prob_2", "label_3", "prob_3"]
    assert sorted(Path(r["path"]).name for r in rows) == sorted(f"img_{m.lower()}.png" for m in MODES)
    assert all(r[f"label_{j}"] in [str(d) for d in range(10)] for r in rows for j in (1, 2, 3))
    assert all(float(r["prob_1"]) >= float(r["prob_2"]) >= float(r["prob_3"]) for r in rows)


def test_a_second_writer_of_the_same_file_is_refused(images: Path, tmp_path: Path) -> None:
    """Two writers (the recipe's and one added on the command line) would overwrite each other's predictions.csv."""
    clf = ImageClassifier("vit_tiny_patch16_224", {k: v for k, v in TINY.items() if k != "img_size"}, img_size=32,
                          num_classes=4)
    trainer = L.Trainer(callbacks=[PredictionWriter(), PredictionWriter(attention_maps=True)], logger=False,
                        enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(BadInputError, match="two PredictionWriter callbacks would both write .*predictions.csv"):
        trainer.predict(clf, datamodule=ImageDataModule(img_size=32, batch_size=2, predict_paths=str(images)))
    assert not (tmp_path / "predictions.csv").exists()
