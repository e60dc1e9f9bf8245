"""vit.data: transforms, image decoding, ImageFolder data sets, sampler, built-in digits, datamodule."""

import json
import logging
import os
import threading
from pathlib import Path
from typing import get_args

import albumentations as A
import lightning as L
import numpy as np
import pytest
import torch
from jsonargparse import ArgumentError, ArgumentParser
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader
from torchvision.datasets.folder import IMG_EXTENSIONS as TORCHVISION_EXTENSIONS

from vit.data import (
    IMG_EXTENSIONS,
    TRAIN_PRESETS,
    BadImageError,
    EpochSeededSampler,
    ImageDataModule,
    ImageFolderDataset,
    PredictDataset,
    apply_transform,
    build_eval_transform,
    build_pretrain_transform,
    build_train_transform,
    prepare_digits,
    read_rgb,
    scan,
    stratified_split,
)
from vit.data.builtin import MANIFEST
from vit.data.transforms import TrainPreset

# torchdata 0.11 calls torch.set_vital, deprecated in this torch; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated:UserWarning")

SIZES = [16, (12, 20)]


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _tree(root: Path, classes: dict[str, int], size: tuple[int, int] = (10, 12)) -> Path:
    """root/<class>/<i>.png with `classes[name]` random RGB images each."""
    for c, (name, n) in enumerate(classes.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(_rgb(*size, seed=100 * c + i)).save(root / name / f"{i}.png")
    return root


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture(scope="module")
def digits8(tmp_path_factory) -> Path:
    """The digits tree at 8x8 (the native size: fastest to write), shared by this module's tests."""
    return prepare_digits(8, tmp_path_factory.mktemp("cache"))


# --- transforms -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES, ids=str)
@pytest.mark.parametrize(
    "build",
    [
        build_pretrain_transform,
        build_eval_transform,
        lambda s: build_eval_transform(s, crop_pct=1.0),
        *[lambda s, p=p: build_train_transform(s, preset=p) for p in TRAIN_PRESETS],
    ],
    ids=["pretrain", "eval", "eval_crop1", *[f"train_{p}" for p in TRAIN_PRESETS]],
)
def test_transform_output(build, size) -> None:
    h, w = (size, size) if isinstance(size, int) else size
    t = build(size)
    for image in (_rgb(30, 50), _rgb(50, 30), _rgb(1, 1)):
        out = apply_transform(t, image, seed=0)
        assert out.shape == (3, h, w) and out.dtype == torch.float32
        assert torch.isfinite(out).all()


def test_eval_transform_center_crop_is_normalised() -> None:
    # A flat grey image stays flat: the crop is inside the resized image (no padding).
    image = np.full((40, 60, 3), 128, np.uint8)
    out = build_eval_transform(16, mean=(0.5,) * 3, std=(0.5,) * 3)(image=image)["image"]
    assert torch.allclose(out, torch.full_like(out, 128 / 255 * 2 - 1), atol=1e-6)


def test_unknown_preset_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match="light"):
        build_train_transform(16, preset="strongest")


def test_preset_literal_lists_every_preset() -> None:
    # the Literal is what the CLI offers and checks; it must name exactly the presets there are
    assert set(get_args(TrainPreset)) == set(TRAIN_PRESETS)


def test_seeded_transform_is_deterministic() -> None:
    t = build_train_transform(16, preset="randaug")
    image = _rgb(24, 24)
    a, b, c = (apply_transform(t, image, seed=s) for s in (7, 7, 8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_seeded_ops_draw_independently() -> None:
    # Compose.set_random_seed gives every op its own generator with the same seed, so flip (p=.5) and
    # erasing (p=.25) would always fire together; apply_transform must let all four combinations occur.
    ramp = np.repeat(np.arange(16, dtype=np.uint8)[None, :, None] * 10, 16, 0).repeat(3, 2)  # [16, 16, 3]
    t = A.Compose([A.HorizontalFlip(p=0.5), A.Erasing(scale=(0.02, 0.05), fill=255, p=0.25)])
    combos = set()
    for seed in range(200):
        out = apply_transform(t, ramp, seed=seed)
        erased = bool((out == 255).any())
        row = next(r for r in out[:, :, 0] if not (r == 255).any())  # erasing covers <= 13 of 256 pixels
        combos.add((bool(row[0] > row[-1]), erased))
    assert combos == {(False, False), (False, True), (True, False), (True, True)}


# --- image decoding ---------------------------------------------------------------------------------------


def _save_mode(path: Path, mode: str) -> np.ndarray:
    """Save a 2x3 image of `mode`; return the RGB array it must decode to."""
    if mode == "L":
        Image.fromarray(np.array([[0, 100, 255], [7, 8, 9]], np.uint8)).save(path)
        return np.repeat(np.array([[0, 100, 255], [7, 8, 9]], np.uint8)[..., None], 3, 2)
    if mode == "1":
        Image.fromarray(np.array([[0, 1, 1], [1, 0, 0]], bool)).save(path)
        return np.repeat(np.array([[0, 255, 255], [255, 0, 0]], np.uint8)[..., None], 3, 2)
    if mode == "I;16":
        values = np.array([[0, 257, 32768], [65535, 1000, 65280]], np.uint16)
        Image.fromarray(values).save(path)
        grey = np.array([[0, 1, 128], [255, 4, 254]], np.uint8)  # round(v * 255 / 65535), not clipped
        return np.repeat(grey[..., None], 3, 2)
    if mode == "RGBA":
        rgba = np.array([[[255, 0, 0, 255], [0, 255, 0, 0], [10, 20, 30, 128]]] * 2, np.uint8)
        Image.fromarray(rgba).save(path)
        return np.array([[[255, 0, 0], [0, 0, 0], [5, 10, 15]]] * 2, np.uint8)  # composited on black
    if mode == "LA":
        Image.fromarray(np.array([[[200, 255], [200, 0], [200, 128]]] * 2, np.uint8)).save(path)
        return np.repeat(np.array([[200, 0, 100]] * 2, np.uint8)[..., None], 3, 2)
    if mode == "P":
        img = Image.new("P", (3, 2))
        img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
        img.putdata([0, 1, 0, 1, 0, 1])
        img.save(path)
        red, blue = [255, 0, 0], [0, 0, 255]
        return np.array([[red, blue, red], [blue, red, blue]], np.uint8)
    if mode == "P_transparent":
        img = Image.new("P", (3, 2))
        img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
        img.putdata([0, 1, 0, 1, 0, 1])
        img.save(path, transparency=1)
        red, clear = [255, 0, 0], [0, 0, 0]
        return np.array([[red, clear, red], [clear, red, clear]], np.uint8)
    if mode == "CMYK":
        Image.new("CMYK", (3, 2), (0, 255, 255, 0)).save(path, quality=100)
        return np.array([[[255, 0, 0]] * 3] * 2, np.uint8)
    raise AssertionError(mode)


@pytest.mark.parametrize("mode", ["L", "1", "I;16", "RGBA", "LA", "P", "P_transparent", "CMYK"])
def test_read_rgb_modes(tmp_path, mode) -> None:
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    expected = _save_mode(path, mode)
    out = read_rgb(path)
    assert out.dtype == np.uint8 and out.shape == (2, 3, 3)
    atol = 2 if mode == "CMYK" else 0  # JPEG is lossy even at quality 100
    np.testing.assert_allclose(out.astype(int), expected.astype(int), atol=atol)


def test_read_rgb_applies_exif_orientation(tmp_path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    Image.new("RGB", (6, 4)).save(tmp_path / "o.jpg", exif=exif)
    assert read_rgb(tmp_path / "o.jpg").shape == (6, 4, 3)


@pytest.mark.parametrize("damage", ["truncated", "zero_byte", "not_an_image"])
def test_bad_image_error_names_path(tmp_path, damage) -> None:
    root = _tree(tmp_path / "data", {"a": 2}, size=(64, 64))
    bad = root / "a" / "1.png"
    if damage == "truncated":
        _truncate(bad)
    elif damage == "zero_byte":
        bad.write_bytes(b"")
    else:
        bad.write_text("hello")
    ds = ImageFolderDataset(root, build_eval_transform(8, crop_pct=1.0))
    ds[0]
    with pytest.raises(BadImageError, match=r"1\.png") as err:
        ds[1]
    assert isinstance(err.value, OSError)


def test_skip_bad_image_warns_counts_and_fills_batch(tmp_path, caplog) -> None:
    root = _tree(tmp_path / "data", {"a": 3, "b": 3}, size=(64, 64))
    _truncate(root / "a" / "1.png")
    (root / "b" / "0.png").write_bytes(b"")
    ds = ImageFolderDataset(root, build_eval_transform(8, crop_pct=1.0), on_bad_image="skip")
    with caplog.at_level(logging.WARNING, logger="vit.data.datasets"):
        x, y = next(iter(DataLoader(ds, batch_size=6)))
    assert x.shape == (6, 3, 8, 8) and y.dtype == torch.int64
    assert ds.num_skipped == 2
    assert set(ds.skipped_paths) == {root / "a" / "1.png", root / "b" / "0.png"}
    assert "1.png" in caplog.text and "0.png" in caplog.text
    # A substitute keeps its own label: the bad "a/1.png" (index 1) becomes "a/2.png", label 0.
    assert y.tolist() == [0, 0, 0, 1, 1, 1]


def test_scan_reports_bad_files(tmp_path) -> None:
    root = _tree(tmp_path / "data", {"a": 2, "b": 2}, size=(64, 64))
    _truncate(root / "a" / "0.png")
    (root / "b" / "1.png").write_bytes(b"")
    bad = scan(root)
    assert [p for p, _ in bad] == [root / "a" / "0.png", root / "b" / "1.png"]
    assert all(reason for _, reason in bad)


# --- ImageFolderDataset / PredictDataset ------------------------------------------------------------------


def test_dataset_items_and_ignored_files(tmp_path) -> None:
    root = _tree(tmp_path / "data", {"cat": 2, "dog": 3})
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "cat" / "._0.png").write_bytes(b"macOS resource fork")
    (root / ".ipynb_checkpoints").mkdir()
    (root / "dog" / "sub").mkdir()
    Image.fromarray(_rgb(5, 5)).save(root / "dog" / "sub" / "deep.PNG")
    ds = ImageFolderDataset(root, build_eval_transform(8, crop_pct=1.0))
    assert ds.class_names == ["cat", "dog"]
    assert len(ds) == 6 and ds.targets == [0, 0, 1, 1, 1, 1]
    x, y = ds[3]
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and y == 1


def test_extensions_extend_torchvision(tmp_path) -> None:
    assert IMG_EXTENSIONS[: len(TORCHVISION_EXTENSIONS)] == TORCHVISION_EXTENSIONS
    (tmp_path / "d" / "a").mkdir(parents=True)
    Image.fromarray(_rgb(4, 4)).save(tmp_path / "d" / "a" / "x.gif")  # beyond torchvision's list
    Image.fromarray(_rgb(4, 4)).convert("1").save(tmp_path / "d" / "a" / "y.pbm")
    assert [p.name for p, _ in ImageFolderDataset(tmp_path / "d").samples] == ["x.gif", "y.pbm"]


def test_unicode_and_spaces_in_names(tmp_path) -> None:
    folder = tmp_path / "data" / "chat noir é"
    folder.mkdir(parents=True)
    Image.fromarray(_rgb(6, 6)).save(folder / "photo 1 ünï 日本.png")
    ds = ImageFolderDataset(tmp_path / "data", build_eval_transform(8, crop_pct=1.0))
    assert ds.class_names == ["chat noir é"] and ds[0][0].shape == (3, 8, 8)


def test_empty_class_folder_raises_naming_it(tmp_path) -> None:
    root = _tree(tmp_path / "data", {"a": 1})
    (root / "empty").mkdir()
    (root / "empty" / "readme.txt").write_text("no images")
    with pytest.raises(ValueError, match="empty"):
        ImageFolderDataset(root)


def test_empty_dataset_raises_naming_root(tmp_path) -> None:
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="nothing"):
        ImageFolderDataset(tmp_path / "nothing")
    with pytest.raises(ValueError, match="missing"):
        ImageFolderDataset(tmp_path / "missing")


def test_class_names_fix_labels(tmp_path) -> None:
    root = _tree(tmp_path / "data", {"a": 1, "b": 1})
    assert ImageFolderDataset(root, class_names=["b", "a"]).targets == [0, 1]
    with pytest.raises(ValueError, match="'b'"):
        ImageFolderDataset(root, class_names=["a"])


@pytest.mark.parametrize("hw", [(2000, 3000), (1, 1)], ids=["3000x2000", "1x1"])
def test_very_large_and_small_images(tmp_path, hw) -> None:
    (tmp_path / "d" / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((*hw, 3), np.uint8)).save(tmp_path / "d" / "a" / "x.jpg")
    ds = ImageFolderDataset(tmp_path / "d", build_train_transform((16, 24), preset="light"))
    assert ds[(0, 1)][0].shape == (3, 16, 24)


def test_same_sample_seed_same_augmentation(tmp_path) -> None:
    root = _tree(tmp_path / "data", {"a": 2}, size=(40, 40))
    ds = ImageFolderDataset(root, build_train_transform(16, preset="randaug"))
    assert torch.equal(ds[(1, 123)][0], ds[(1, 123)][0])
    assert not torch.equal(ds[(1, 123)][0], ds[(1, 124)][0])


def test_unseeded_workers_do_not_repeat_augmentations(tmp_path) -> None:
    # A random pipeline copied into forked workers replays one stream unless each item draws its own seed.
    (tmp_path / "d" / "a").mkdir(parents=True)
    for i in range(4):
        Image.fromarray(_rgb(24, 24)).save(tmp_path / "d" / "a" / f"{i}.png")  # four identical images
    ds = ImageFolderDataset(tmp_path / "d", build_pretrain_transform(8))
    xs = [x for x, _ in DataLoader(ds, batch_size=1, num_workers=2)]  # worker 0: items 0, 2; 1: 1, 3
    assert not torch.equal(xs[0], xs[1])


def test_predict_dataset(tmp_path) -> None:
    root = _tree(tmp_path / "data", {"b": 2, "a": 1})
    ds = PredictDataset(root, build_eval_transform(8, crop_pct=1.0))
    assert ds.paths == [root / "a" / "0.png", root / "b" / "0.png", root / "b" / "1.png"]
    x, i = ds[2]
    assert x.shape == (3, 8, 8) and i == 2
    assert PredictDataset([str(root / "b" / "1.png")]).paths == [root / "b" / "1.png"]
    with pytest.raises(ValueError, match="nope"):
        PredictDataset([root / "nope.png"])


# --- split and sampler ------------------------------------------------------------------------------------


def test_stratified_split() -> None:
    labels = [0] * 10 + [1] * 5 + [2]
    train, val = stratified_split(labels, 0.2, seed=0)
    assert sorted(train + val) == list(range(16))
    assert train == sorted(train) and val == sorted(val)
    assert [labels[i] for i in val].count(0) == 2 and [labels[i] for i in val].count(1) == 1
    assert 15 in train  # a class with one image keeps it for training
    assert stratified_split(labels, 0.2, seed=0) == (train, val)
    assert stratified_split(labels, 0.0) == (list(range(16)), [])


def test_stratified_split_depends_on_the_seed() -> None:
    labels = [i % 3 for i in range(60)]
    splits = {tuple(stratified_split(labels, 0.25, seed=s)[1]) for s in range(4)}
    assert len(splits) == 4
    assert all([labels[i] for i in val].count(c) == 5 for val in splits for c in range(3))


@pytest.mark.parametrize(
    "labels, fraction, match",
    [
        ([0] * 2 + [1] * 20 + [2] * 20, 0.9, r"val_fraction=0\.9 leaves class\(es\) \[0\] without a training"),
        ([0] * 3 + [1] * 3, 0.1, r"val_fraction=0\.1 of 6 samples in 2 classes"),  # 1 val image for 2 classes
        ([0, 1], 1.0, r"val_fraction must be in \[0, 1\)"),
    ],
    ids=["class_left_without_train", "too_few_val", "fraction"],
)
def test_stratified_split_errors_name_the_problem(labels, fraction, match) -> None:
    with pytest.raises(ValueError, match=match):
        stratified_split(labels, fraction)


def test_sampler_is_a_function_of_seed_and_epoch() -> None:
    def draw(seed: int, epoch: int) -> list:
        s = EpochSeededSampler(50, shuffle=True, seed=seed)
        s.set_epoch(epoch)
        return list(s)

    a = draw(0, 3)
    assert a == draw(0, 3)
    assert sorted(i for i, _ in a) == list(range(50))
    assert a != draw(0, 4) and a != draw(1, 3)
    assert [i for i, _ in draw(0, 4)] != [i for i, _ in a]
    # A sample's seed does not depend on its position; it does depend on the epoch.
    assert dict(a) == dict(draw(0, 3)) and dict(a) != dict(draw(0, 4))
    ordered = EpochSeededSampler(5, shuffle=False)
    assert [i for i, _ in ordered] == [0, 1, 2, 3, 4]


def test_sampler_under_lightning_ddp_wrapper() -> None:
    # Lightning wraps a custom sampler like this under DDP and forwards set_epoch to it.
    inner = EpochSeededSampler(10, seed=0)
    ranks = [DistributedSamplerWrapper(inner, num_replicas=2, rank=r, shuffle=True, seed=0) for r in (0, 1)]
    for w in ranks:
        w.set_epoch(5)
    assert inner.epoch == 5
    shards = [list(w) for w in ranks]
    assert sorted(i for shard in shards for i, _ in shard) == list(range(10))
    inner.set_epoch(5)
    assert dict(p for shard in shards for p in shard) == dict(inner)


# --- built-in digits --------------------------------------------------------------------------------------


def test_digits_materialised_once(digits8) -> None:
    manifest = json.loads((digits8 / "manifest.json").read_text())
    files = sorted(digits8.rglob("*.png"))
    assert len(files) == manifest["num_images"] == 1797
    assert sorted(p.name for p in (digits8 / "train").iterdir()) == [str(i) for i in range(10)]
    assert sum(sum(c.values()) for c in manifest["counts"].values()) == 1797
    assert [sum(manifest["counts"][split].values()) for split in ("train", "val")] == [1437, 360]
    assert read_rgb(files[0]).shape == (8, 8, 3)
    mtimes = [os.stat(p).st_mtime_ns for p in (digits8 / "manifest.json", files[0])]
    assert prepare_digits(8, digits8.parent) == digits8
    assert [os.stat(p).st_mtime_ns for p in (digits8 / "manifest.json", files[0])] == mtimes


def test_digits_concurrent_writers_and_leftovers(tmp_path) -> None:
    # A half tree without a manifest (a killed run writing by hand) is replaced, not trusted.
    (tmp_path / "digits-8" / "train" / "0").mkdir(parents=True)
    results = []
    threads = [threading.Thread(target=lambda: results.append(prepare_digits(8, tmp_path))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [tmp_path / "digits-8"] * 2
    assert len(list((tmp_path / "digits-8").rglob("*.png"))) == 1797
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits-8"]  # no temporary folders left


def test_digits_tree_of_an_older_format_is_rewritten(tmp_path) -> None:
    (tmp_path / "digits-8" / "train" / "0").mkdir(parents=True)
    (tmp_path / "digits-8" / MANIFEST).write_text(json.dumps({"version": 1, "img_size": [8, 8]}))
    root = prepare_digits(8, tmp_path)
    assert json.loads((root / MANIFEST).read_text())["version"] > 1
    assert len(list(root.rglob("*.png"))) == 1797


# --- ImageDataModule --------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["classify", "pretrain"])
def test_datamodule_digits_end_to_end(digits8, task) -> None:
    dm = ImageDataModule(img_size=8, batch_size=32, task=task, cache_dir=str(digits8.parent))
    assert dm.num_classes == 10 and dm.class_names == [str(i) for i in range(10)]
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_dataset) + len(dm.val_dataset) == 1797
    for loader, n in ((dm.train_dataloader(), 32), (dm.val_dataloader(), 32)):
        x, y = next(iter(loader))
        assert x.shape == (n, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert len(dm.train_dataloader()) == len(dm.train_dataset) // 32  # drop_last


def test_datamodule_own_folder_with_val_split_and_predict(tmp_path) -> None:
    root = _tree(tmp_path / "data", {"x": 10, "y": 10})
    dm = ImageDataModule(root=str(root), img_size=(8, 12), batch_size=4, val_split=0.2, aug="randaug")
    assert dm.num_classes == 2 and dm.class_names == ["x", "y"]
    dm.setup("fit")
    assert (len(dm.train_dataset), len(dm.val_dataset)) == (16, 4)
    assert next(iter(dm.train_dataloader()))[0].shape == (4, 3, 8, 12)
    assert next(iter(dm.test_dataloader()))[0].shape == (4, 3, 8, 12)
    dm.setup("predict")
    x, idx = next(iter(dm.predict_dataloader()))
    assert x.shape == (4, 3, 8, 12) and idx.tolist() == [0, 1, 2, 3]
    pm = ImageDataModule(root=str(root), img_size=8, batch_size=4, predict_paths=str(root / "y"))
    pm.setup("predict")
    assert len(pm.predict_dataset) == 10 and pm.train_dataset is None


def test_datamodule_train_val_layout(tmp_path) -> None:
    _tree(tmp_path / "data" / "train", {"a": 4, "b": 4})
    _tree(tmp_path / "data" / "val", {"a": 1, "b": 1})
    dm = ImageDataModule(root=str(tmp_path / "data"), img_size=8, batch_size=2)
    assert dm.class_names == ["a", "b"]
    dm.setup("fit")
    assert (len(dm.train_dataset), len(dm.val_dataset)) == (8, 2)


def test_datamodule_scan_lists_every_bad_file(tmp_path) -> None:
    root = _tree(tmp_path / "data", {"a": 3, "b": 3})
    (root / "a" / "0.png").write_bytes(b"")
    (root / "b" / "2.png").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"(?s)a/0\.png.*b/2\.png"):
        ImageDataModule(root=str(root), img_size=8, batch_size=2, scan=True).setup("fit")


@pytest.mark.parametrize(
    "field, value",
    [
        ("batch_size", 0),
        ("num_workers", -1),
        ("img_size", 0),
        ("img_size", (8, 0)),
        ("img_size", (8, 8, 8)),
        ("train_dir", ".."),
        ("val_split", 1.0),
        ("val_split", -0.1),
        ("std", (0.5, 0.0, 0.5)),
        ("seed", -1),
        ("crop_pct", 0.0),
        ("root", "/does/not/exist"),
        ("predict_paths", ["/does/not/exist.png"]),
    ],
)
def test_datamodule_invalid_args_name_the_field(field, value) -> None:
    with pytest.raises(ValueError, match=field):
        ImageDataModule(**{field: value})


@pytest.mark.parametrize(
    "field, value",
    [
        ("img_size", "[8, 8, 8]"),
        ("task", "detect"),
        ("aug", "heavy"),
        ("mean", "[0.5, 0.5]"),
        ("on_bad_image", "ignore"),
        ("drop_last", "maybe"),
    ],
)
def test_cli_types_reject_invalid_args_naming_the_field(field, value) -> None:
    # Types and choices are the constructor's hints; jsonargparse (under LightningCLI) enforces them.
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(ImageDataModule, "data")
    assert parser.parse_args([]).data.aug == "light"
    with pytest.raises(ArgumentError, match=f"data\\.{field}"):
        parser.parse_args([f"--data.{field}={value}"])


def test_datamodule_preprocessing_records_what_the_model_expects() -> None:
    dm = ImageDataModule(img_size=[8, 12], crop_pct=0.9)
    assert dm.preprocessing == {
        "img_size": [8, 12],
        "mean": list(IMAGENET_DEFAULT_MEAN),
        "std": list(IMAGENET_DEFAULT_STD),
        "crop_pct": 0.9,
        "interpolation": "bicubic",
    }
    own = ImageDataModule(img_size=16, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.1)).preprocessing
    assert own["img_size"] == [16, 16] and own["mean"] == [0.5, 0.4, 0.3] and own["std"] == [0.2, 0.2, 0.1]
    assert json.loads(json.dumps(own)) == own  # plain values, as a checkpoint stores them


def test_datamodule_batch_larger_than_data_fails_early(tmp_path) -> None:
    root = _tree(tmp_path / "data", {"a": 2})
    with pytest.raises(ValueError, match="batch_size"):
        ImageDataModule(root=str(root), img_size=8, batch_size=64).setup("fit")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_stateful_loader_resumes_mid_epoch(tmp_path, num_workers) -> None:
    # What exact resume needs: the loader restored from a mid-epoch state_dict yields the remaining batches.
    root = _tree(tmp_path / "data", {"a": 20, "b": 20}, size=(12, 12))
    dm = ImageDataModule(root=str(root), img_size=8, batch_size=4, num_workers=num_workers, aug="randaug")
    dm.setup("fit")

    def loader():
        dl = dm.train_dataloader()
        dl.sampler.set_epoch(2)
        return dl

    uninterrupted = [x for x, _ in loader()]
    dl = loader()
    it = iter(dl)
    seen = [next(it)[0] for _ in range(3)]
    state = dl.state_dict()
    del it, dl
    resumed = loader()
    resumed.load_state_dict(state)
    rest = [x for x, _ in resumed]
    assert len(uninterrupted) == 10
    assert all(torch.equal(a, b) for a, b in zip(seen + rest, uninterrupted, strict=True))


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader` but have no `validation_step`")
@pytest.mark.filterwarnings("ignore:.*LeafSpec.*is deprecated")  # Lightning 2.6 on this torch
def test_lightning_sets_the_sampler_epoch(digits8) -> None:
    class Probe(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(3 * 8 * 8, 10)
            self.epochs: list[tuple[int, int]] = []

        def training_step(self, batch, batch_idx):
            if batch_idx == 0:
                self.epochs.append((self.current_epoch, self.trainer.train_dataloader.sampler.epoch))
            x, y = batch
            return torch.nn.functional.cross_entropy(self.lin(x.flatten(1)), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    probe = Probe()
    trainer = L.Trainer(
        max_epochs=3,
        limit_train_batches=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(probe, ImageDataModule(img_size=8, batch_size=16, cache_dir=str(digits8.parent)))
    assert probe.epochs == [(0, 0), (1, 1), (2, 2)]
