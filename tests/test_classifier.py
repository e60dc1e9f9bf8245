"""ImageClassifier: layer decay, mixup, init_from of every source, probes, EMA checkpoints, and the CLI recipe."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import timm
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from PIL import Image

from vit.cli import VitCLI
from vit.data import ImageDataModule
from vit.export import WeightsMismatchError, export_model, read_weights, vit_to_mae_official
from vit.models import RECORD_KEY, MaskedAutoencoder
from vit.train import ImageClassifier, MAEPretrainer

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4)  # as conftest's tiny_args
TINY_MAE = dict(TINY, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4)
TINY_KW = {k: v for k, v in TINY.items() if k != "img_size"}
CLASSES = ["ant", "bee", "cat", "dog", "eel", "fox"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small ImageFolder tree (train/val, 6 classes) whose classes differ by brightness and colour."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 3)):
        for c, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 60, (32, 32, 3)) + np.array([40 * c, 20 * (c % 3), 0])
                Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / split / name / f"{i}.png")
    return root


def _datamodule(folder: Path, **kwargs) -> ImageDataModule:
    return ImageDataModule(root=str(folder), img_size=32, batch_size=kwargs.pop("batch_size", 8), aug="none", **kwargs)


def _trainer(tmp_path: Path, steps: int = 2, **kwargs) -> L.Trainer:
    defaults = dict(max_epochs=1, limit_train_batches=steps, limit_val_batches=1, logger=False,
                    enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                    num_sanity_val_steps=0)
    return L.Trainer(**{**defaults, **kwargs})


@pytest.fixture(scope="module")
def mae_ckpt(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Lightning checkpoint of a 2-step MAE pretraining run (our MAEPretrainer)."""
    out = tmp_path_factory.mktemp("mae")
    mae = MAEPretrainer("mae_vit_tiny_patch16", {k: v for k, v in TINY_MAE.items() if k != "img_size"}, img_size=32,
                        warmup_epochs=0)
    trainer = _trainer(out, limit_val_batches=0)
    trainer.fit(mae, _datamodule(folder, task="pretrain"))
    path = out / "mae.ckpt"
    trainer.save_checkpoint(path)
    return path


def _classifier(**kwargs) -> ImageClassifier:
    args = dict(model="vit_tiny_patch16_224", model_kwargs=dict(TINY_KW), img_size=32, num_classes=len(CLASSES),
                class_names=CLASSES, warmup_epochs=0)
    return ImageClassifier(**{**args, **kwargs})


@pytest.fixture
def lightning_log(caplog: pytest.LogCaptureFixture):
    """caplog for rank_zero_info, whose "lightning.pytorch" logger does not propagate to the root logger."""
    logger = logging.getLogger("lightning.pytorch")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


# ----------------------------------------------------------------------------------------------- recipe parts
def test_layer_decay_gives_head_full_rate_and_patch_embed_the_smallest(folder: Path, tmp_path: Path) -> None:
    clf = _classifier(layer_decay=0.5, lr=1e-3)
    trainer = _trainer(tmp_path, steps=1)
    trainer.fit(clf, _datamodule(folder))
    # timm's scheduler keeps the base lr per group and applies each group's lr_scale when it sets the lr
    initial = {id(p): g["initial_lr"] * g.get("lr_scale", 1.0) for g in trainer.optimizers[0].param_groups
               for p in g["params"]}
    lr_of = {n: initial[id(p)] for n, p in clf.model.named_parameters()}
    assert lr_of["head.weight"] == pytest.approx(1e-3)
    assert lr_of["patch_embed.proj.weight"] == pytest.approx(min(lr_of.values()))
    # depth 2: patch embedding 0.5^3, block 0 0.5^2, block 1 0.5, head 1
    assert lr_of["patch_embed.proj.weight"] == pytest.approx(1e-3 * 0.5**3)
    assert lr_of["blocks.1.mlp.fc1.weight"] == pytest.approx(1e-3 * 0.5)


def test_training_step_trains_on_the_mixed_batch_and_soft_targets() -> None:
    clf = _classifier(mixup=0.8, cutmix=1.0, label_smoothing=0.1, drop_path_rate=0.0)  # no RNG in the forward
    clf.log = lambda *a, **k: None  # no trainer attached
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % len(CLASSES)
    state = (torch.random.get_rng_state(), np.random.get_state())
    loss = clf.training_step((x.clone(), y), 0)
    torch.random.set_rng_state(state[0])
    np.random.set_state(state[1])  # timm's Mixup draws lambda and the cut box from numpy
    mixed, soft = clf.mixup_fn(x.clone(), y)
    assert soft.max() < 1.0  # smoothed and mixed targets, not one-hot
    expected = torch.sum(-soft * torch.log_softmax(clf.model(mixed), dim=-1), dim=-1).mean()
    torch.testing.assert_close(loss, expected)
    plain = _classifier(mixup=0.0, cutmix=0.0, label_smoothing=0.1, drop_path_rate=0.0)
    plain.log = clf.log
    plain.model.load_state_dict(clf.model.state_dict())
    torch.testing.assert_close(plain.training_step((x, y), 0),
                               torch.nn.functional.cross_entropy(clf.model(x), y, label_smoothing=0.1))


def test_mixup_needs_an_even_batch() -> None:
    clf = _classifier()
    with pytest.raises(ValueError, match="even batch size"):
        clf.training_step((torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2])), 0)


# ----------------------------------------------------------------------------------------------- init_from
def _mae_encoder(mae_ckpt: Path) -> dict[str, torch.Tensor]:
    state = read_weights(mae_ckpt).state
    return {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}


def _source(kind: str, mae_ckpt: Path, tmp_path: Path, num_classes: int = 10) -> tuple[Path, dict]:
    """A weights file of ``kind`` and the backbone tensors it holds (in our layout)."""
    if kind == "lightning_mae":
        return mae_ckpt, _mae_encoder(mae_ckpt)
    if kind == "export_dir":
        mae = MaskedAutoencoder(**TINY_MAE)
        mae.load_state_dict(read_weights(mae_ckpt).state)
        export_model(mae, "safetensors", tmp_path / "export")
        return tmp_path / "export", mae.encoder.state_dict()
    if kind == "timm":
        ref = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=num_classes, **TINY)
        torch.save(ref.state_dict(), tmp_path / "timm.pth")
        return tmp_path / "timm.pth", ref.state_dict()
    assert kind == "mae_official"
    mae = MaskedAutoencoder(**TINY_MAE)
    torch.save({"model": vit_to_mae_official(mae.state_dict())}, tmp_path / "mae_official.pth")
    return tmp_path / "mae_official.pth", {k.removeprefix("encoder."): v for k, v in mae.state_dict().items()
                                           if k.startswith("encoder.")}


@pytest.mark.parametrize("kind", ["lightning_mae", "export_dir", "timm", "mae_official"])
def test_init_from_each_source(kind: str, mae_ckpt: Path, tmp_path: Path, lightning_log: pytest.LogCaptureFixture
                               ) -> None:
    path, source = _source(kind, mae_ckpt, tmp_path)
    clf = _classifier(init_from=str(path))
    clf.configure_model()
    own = clf.model.state_dict()
    for key in ("patch_embed.proj.weight", "pos_embed", "cls_token", "blocks.1.attn.qkv.weight", "blocks.1.mlp.fc2.bias"
                ):
        torch.testing.assert_close(own[key], source[key], rtol=0, atol=0)
    # fresh head of MAE's fine-tuning init (std 2e-5), whatever the source: none has a 6-class head
    assert clf.model.head.weight.abs().max() < 1e-3 and not clf.model.head.bias.any()
    assert "init_from" in lightning_log.text and "head" in lightning_log.text
    if kind == "timm":
        assert "re-initialised the head" in lightning_log.text and "has 10 classes" in lightning_log.text


def test_init_from_keeps_a_head_of_the_same_class_count(mae_ckpt: Path, tmp_path: Path) -> None:
    path, source = _source("timm", mae_ckpt, tmp_path, num_classes=len(CLASSES))
    clf = _classifier(init_from=str(path), global_pool="token")
    clf.configure_model()
    torch.testing.assert_close(clf.model.head.weight, source["head.weight"], rtol=0, atol=0)
    torch.testing.assert_close(clf.model.norm.weight, source["norm.weight"], rtol=0, atol=0)


def test_init_from_resamples_positions_for_another_image_size(mae_ckpt: Path) -> None:
    clf = _classifier(init_from=str(mae_ckpt), img_size=48)
    clf.configure_model()
    assert clf.model.pos_embed.shape == (1, 1 + 12 * 12, 64)
    assert clf.model.pos_embed.requires_grad  # MAE's fixed sin-cos positions become trainable, as in its fine-tune


@pytest.fixture(scope="module")
def wide_ckpt(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-step MAE pretraining run at 32x48 (an 8x12 patch grid): not square."""
    out = tmp_path_factory.mktemp("wide")
    mae = MAEPretrainer("mae_vit_tiny_patch16", {k: v for k, v in TINY_MAE.items() if k != "img_size"},
                        img_size=(32, 48), warmup_epochs=0)
    trainer = _trainer(out, limit_val_batches=0)
    trainer.fit(mae, ImageDataModule(root=str(folder), img_size=(32, 48), batch_size=8, task="pretrain"))
    trainer.save_checkpoint(out / "wide.ckpt")
    return out / "wide.ckpt"


@pytest.mark.parametrize("img_size", [(32, 48), (48, 64)])
def test_init_from_a_non_square_checkpoint(wide_ckpt: Path, img_size: tuple[int, int]) -> None:
    record = torch.load(wide_ckpt, weights_only=True)[RECORD_KEY]
    assert record["img_size"] == [32, 48] and record["patch_size"] == [4, 4]
    clf = _classifier(init_from=str(wide_ckpt), img_size=img_size)
    clf.configure_model()
    source = _mae_encoder(wide_ckpt)["pos_embed"]
    grid = (img_size[0] // 4, img_size[1] // 4)
    assert clf.model.pos_embed.shape == (1, 1 + grid[0] * grid[1], 64)
    if img_size == (32, 48):
        torch.testing.assert_close(clf.model.pos_embed, source, rtol=0, atol=0)
    else:  # resampled from the recorded 8x12 grid (a square guess could not even start: 96 is no square)
        from vit.layers import resample_pos_embed

        torch.testing.assert_close(clf.model.pos_embed, resample_pos_embed(source, grid, (8, 12), 1))


@pytest.mark.parametrize(("override", "match"), [
    (dict(depth=3), r"blocks\.2\."),
    (dict(embed_dim=32), r"shape conflicts.*patch_embed\.proj\.weight"),
])
def test_init_from_wrong_architecture_names_file_and_keys(mae_ckpt: Path, override: dict, match: str) -> None:
    clf = _classifier(init_from=str(mae_ckpt), model_kwargs={**TINY_KW, **override})
    with pytest.raises(WeightsMismatchError, match=match) as err:
        clf.configure_model()
    assert str(mae_ckpt) in str(err.value)


# ----------------------------------------------------------------------------------------------- probes, EMA
@pytest.mark.parametrize(("mode", "trained"), [("linear_probe", ("head.",)),
                                               ("attentive_probe", ("head.", "attn_pool."))])
def test_probe_leaves_backbone_bit_identical(mode: str, trained: tuple, folder: Path, mae_ckpt: Path,
                                             tmp_path: Path) -> None:
    clf = _classifier(mode=mode, init_from=str(mae_ckpt), lr=0.05, weight_decay=0.05, mixup=0, cutmix=0)
    clf.configure_model()
    before = {k: v.clone() for k, v in clf.model.state_dict().items()}
    _trainer(tmp_path, steps=3).fit(clf, _datamodule(folder))
    after = clf.model.state_dict()
    backbone = [k for k in before if not k.startswith(trained)]
    assert backbone and all(torch.equal(before[k], after[k]) for k in backbone)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(trained))
    trainable = {n for n, p in clf.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(trained) for n in trainable)
    optimised = [p for g in _trainer_optimizer(clf).param_groups for p in g["params"]]
    assert sum(p.numel() for p in optimised) == sum(p.numel() for p in clf.parameters() if p.requires_grad)
    clf.train()
    assert not clf.model.blocks.training and clf.model.head.training  # drop path off in the frozen backbone
    if mode == "linear_probe":
        bn = clf.model.head[0]
        assert not bn.affine and bn.num_batches_tracked == 3


def test_ema_checkpoint_holds_the_ema_weights(folder: Path, tmp_path: Path) -> None:
    clf = _classifier(lr=1e-2)
    ema = EMAWeightAveraging(decay=0.5)
    trainer = _trainer(tmp_path, steps=3, callbacks=[ema])
    trainer.fit(clf, _datamodule(folder))
    ckpt_cb = trainer.checkpoint_callback
    saved = Path(ckpt_cb.best_model_path or ckpt_cb.last_model_path)
    ckpt = torch.load(saved, map_location="cpu", weights_only=True)  # plain data only
    average = ema._average_model.module.state_dict()
    current = ckpt["current_model_state"]
    keys = [k for k in ckpt["state_dict"] if k.startswith("model.") and ckpt["state_dict"][k].is_floating_point()]
    assert all(torch.equal(ckpt["state_dict"][k], average[k]) for k in keys)
    assert any(not torch.equal(ckpt["state_dict"][k], current[k]) for k in keys)
    # what export / load_weights read from the checkpoint is the EMA network, and so is the model after fit
    ema_net = read_weights(saved).state
    assert all(torch.equal(ema_net[k.removeprefix("model.")], average[k]) for k in keys)
    assert all(torch.equal(clf.state_dict()[k], average[k]) for k in keys)


def test_checkpoint_is_plain_data_and_describes_itself(folder: Path, tmp_path: Path) -> None:
    clf = ImageClassifier("vit_tiny_patch16_224", dict(TINY_KW), img_size=32, warmup_epochs=0)  # classes from data
    trainer = _trainer(tmp_path, steps=1)
    trainer.fit(clf, _datamodule(folder))
    path = tmp_path / "clf.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["num_classes"] == len(CLASSES)
    assert ckpt["hyper_parameters"]["class_names"] == CLASSES
    restored = ImageClassifier.load_from_checkpoint(path, weights_only=True)
    assert restored.class_names == CLASSES
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(restored.eval()(x), clf.eval()(x))


def test_class_names_come_from_the_data_when_not_given(folder: Path, tmp_path: Path) -> None:
    clf = _classifier(class_names=None)
    assert clf.class_names == [str(i) for i in range(len(CLASSES))]
    _trainer(tmp_path).validate(clf, _datamodule(folder))
    assert clf.class_names == CLASSES and clf.hparams.class_names == CLASSES


def test_evaluating_on_data_with_other_classes_fails_clearly(folder: Path, tmp_path: Path) -> None:
    clf = _classifier(num_classes=4, class_names=None)
    with pytest.raises(ValueError, match="data has 6 classes but the classifier 4"):
        _trainer(tmp_path).validate(clf, _datamodule(folder))


# ----------------------------------------------------------------------------------------------- CLI recipe
def test_cli_finetune_recipe_fit_validate_test(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture, lightning_log: pytest.LogCaptureFixture
                                               ) -> None:
    """The digits recipes as a user runs them: MAE pretraining, fine-tuning from it, then validate and test."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VIT_CACHE_DIR", str(tmp_path / "cache"))
    short = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2",
             "--data.batch_size", "16"]
    _cli("fit", "--config", str(ROOT / "configs/mae/vit_tiny_digits.yaml"), *short)
    assert (tmp_path / "runs/mae_tiny_digits/checkpoints/last.ckpt").is_file()
    finetune = str(ROOT / "configs/finetune/vit_tiny_digits.yaml")
    _cli("fit", "--config", finetune, *short)
    assert "init_from runs/mae_tiny_digits/checkpoints/last.ckpt (layout 'mae')" in lightning_log.text
    ckpt = tmp_path / "runs/finetune_tiny_digits/checkpoints/last.ckpt"
    assert ckpt.is_file()
    for verb, key in (("validate", "val"), ("test", "test")):
        capsys.readouterr()
        lightning_log.clear()
        _cli(verb, "--config", finetune, "--ckpt_path", str(ckpt), "--trainer.limit_val_batches", "2",
             "--trainer.limit_test_batches", "2", "--data.batch_size", "16")
        out = capsys.readouterr().out
        assert f"{key}/acc1" in out and f"{key}/acc5" in out  # Lightning's table
        assert f"per-class accuracy ({key}, 32 images)" in lightning_log.text  # ours
        assert "model.init_from (runs/mae_tiny_digits/checkpoints/last.ckpt) is not read" in lightning_log.text
        assert list(tmp_path.glob(f"runs/finetune_tiny_digits/**/confusion/{key}.png"))


def _trainer_optimizer(clf: ImageClassifier) -> torch.optim.Optimizer:
    return clf.trainer.optimizers[0]


def _cli(*args: str) -> None:
    VitCLI(L.LightningModule, ImageDataModule, subclass_mode_model=True, save_config_kwargs={"overwrite": True},
           args=list(args))
