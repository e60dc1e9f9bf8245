"""``decode: device``: JPEG decode, crop, flip and normalisation on the batch's device (run here with device="cpu"),
against the albumentations CPU pipeline; seeded crops; non-JPEG files; refused settings; a `vit fit` run; CUDA."""

from __future__ import annotations

import argparse
import io
import logging
import math
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vit.cli import main
from vit.data import ImageDataModule, StreamingDataModule, optimize_folder, read_rgb
from vit.data.datasets import BadImageError
from vit.data.device_decode import (
    DEVICE_PRESETS,
    PRETRAIN_SCALE,
    RATIO,
    DeviceTransform,
    EncodedBatch,
    build_device_pipeline,
    decode_images,
    encoded_tensor,
)
from vit.data.shard_dataset import sample_seed
from vit.data.transforms import apply_transform, build_eval_transform, build_pretrain_transform, build_train_transform
from vit.train.reconstruction import _spread_images

ROOT = Path(__file__).resolve().parents[1]
MAE_CONFIG = ROOT / "configs" / "mae" / "vit_tiny_digits.yaml"
SUPERVISED_CONFIG = ROOT / "configs" / "supervised" / "vit_tiny_digits.yaml"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
STD_255 = torch.tensor(STD).view(3, 1, 1) * 255  # a normalised difference times this is in grey levels


def _scene(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth random photo-like [h, w, 3] uint8 image with a little grain (JPEG-friendly, not flat)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    return np.clip(np.asarray(coarse, dtype=np.float64) + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)


def _encode(pixels: np.ndarray, fmt: str = "JPEG", **save: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, **({"quality": 95} if fmt == "JPEG" else {}), **save)
    return buffer.getvalue()


def _write_tree(root: Path, n: int = 6, size: tuple[int, int] = (40, 52)) -> Path:
    """root/{train,val}/{a,b}/ with ``n`` JPEGs per class (quality 95)."""
    for split in ("train", "val"):
        for c, cls in enumerate("ab"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                (folder / f"{i}.jpg").write_bytes(_encode(_scene(*size, seed=100 * c + i + (split == "val"))))
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_tree(tmp_path_factory.mktemp("jpegs"))


# --- (a) evaluation against the albumentations CPU pipeline -------------------------------------------------------


@pytest.mark.parametrize(("h", "w", "crop_pct"), [(75, 100, 0.875), (300, 200, 1.0), (20, 28, 0.875), (24, 24, 1.0)],
                         ids=["shrink-crop", "shrink-resize", "enlarge-crop", "enlarge-resize"])
def test_eval_matches_the_cpu_pipeline(h: int, w: int, crop_pct: float) -> None:
    data = _encode(_scene(h, w, seed=h))
    cpu = apply_transform(build_eval_transform(32, MEAN, STD, crop_pct=crop_pct), read_rgb(io.BytesIO(data)))
    (decoded,) = decode_images([encoded_tensor(data)], ["x.jpg"], "cpu")
    # torchvision and PIL both decode with libjpeg-turbo's default (islow IDCT, fancy upsampling): same pixels
    assert torch.equal(decoded, torch.from_numpy(read_rgb(io.BytesIO(data))).permute(2, 0, 1))
    dev = DeviceTransform(32, MEAN, STD, crop_pct=crop_pct)([decoded])[0]
    assert dev.shape == cpu.shape == (3, 32, 32) and dev.dtype == cpu.dtype == torch.float32
    levels = ((dev - cpu) * STD_255).abs()  # grey levels, 0..255
    if h < 32 / crop_pct:
        # enlarging: torch's plain bicubic is OpenCV's INTER_CUBIC kernel (a = -0.75); only rounding may differ
        assert levels.max() <= 1.0 + 1e-3
    else:
        # shrinking: torch's antialiased bicubic stands in for OpenCV's INTER_AREA (a box filter); on these grainy
        # scenes they differ by under 1 grey level on average and a few at most (measured: mean 0.6, max 4)
        assert levels.mean() <= 1.0 and levels.max() <= 8.0


def test_geometry_constants_are_the_cpu_pipelines() -> None:
    """The device twin uses the CPU pipelines' RandomResizedCrop ranges and supports exactly the presets it can copy."""
    mae = build_pretrain_transform(32).transforms[0]
    assert tuple(mae.scale) == PRETRAIN_SCALE and tuple(mae.ratio) == pytest.approx(RATIO)
    light = build_train_transform(32, preset="light").transforms[0]
    assert build_device_pipeline(32, MEAN, STD, 0.875, "classify", "light").train.scale == tuple(light.scale)
    assert build_device_pipeline(32, MEAN, STD, 0.875, "classify", "none").train.scale is None
    assert DEVICE_PRESETS == ["none", "light"]


# --- (b) seeded crops -----------------------------------------------------------------------------------------------


def test_crops_are_a_function_of_seed_epoch_and_index() -> None:
    data = encoded_tensor(_encode(_scene(60, 80, seed=1)))
    train = build_device_pipeline(32, MEAN, STD, 0.875, "pretrain", "light").train

    def crop(seed: int, epoch: int, index: int) -> torch.Tensor:
        images = decode_images([data], ["x.jpg"], "cpu")
        return train(images, [sample_seed(seed, epoch, index)])[0]

    first = crop(0, 3, 7)
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(first, crop(0, 3, 7))
    for other in ((0, 3, 8), (0, 4, 7), (1, 3, 7)):
        assert not torch.equal(first, crop(*other)), other


def test_random_crop_boxes_keep_the_scale_and_ratio_ranges() -> None:
    """Every crop (before the resize) covers 20-100% of the image at aspect 3/4..4/3; about half are flipped."""
    base = np.tile(np.arange(90, dtype=np.uint8)[:, None, None], (1, 120, 3))  # rows numbered 0..89
    base[:, :, 1] = np.arange(120, dtype=np.uint8)[None, :]  # columns numbered 0..119
    image = torch.from_numpy(base).permute(2, 0, 1)
    train = DeviceTransform((90, 120), (0, 0, 0), (1 / 255,) * 3, scale=PRETRAIN_SCALE, flip=True)
    flips = 0
    for s in range(100):
        out = train([image], [s])[0]  # the crop enlarged back to 90x120: first and last row/column name its edges
        rows, cols = out[0, :, 60], out[1, 45, :]
        h, w = float(rows[-1] - rows[0]) + 1, abs(float(cols[-1] - cols[0])) + 1
        flips += bool(cols[0] > cols[-1])
        # the edges are read back within a pixel of 40..90 rows: 3% on the aspect, 5% on the area
        assert 0.2 * 0.95 <= h * w / (90 * 120) <= 1.0, s
        assert 3 / 4 * 0.97 <= w / h <= 4 / 3 / 0.97, s
    assert 30 <= flips <= 70  # 100 fair coin flips


# --- (c) grey JPEGs, PNGs and unreadable files ----------------------------------------------------------------------


def test_grey_jpeg_png_and_rotated_jpeg_decode_as_read_rgb_does(tmp_path: Path) -> None:
    rgb = _scene(30, 40, seed=2)
    rgba = np.concatenate([rgb, np.full((30, 40, 1), 128, np.uint8)], axis=2)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to view
    files = {
        "grey.jpg": _encode(rgb[:, :, 0]),
        "alpha.png": _encode(rgba, "PNG"),
        "rotated.jpg": _encode(rgb, exif=exif.tobytes()),
    }
    decoded = decode_images([encoded_tensor(b) for b in files.values()], list(files), "cpu")
    for (name, data), image in zip(files.items(), decoded, strict=True):
        expected = torch.from_numpy(read_rgb(io.BytesIO(data))).permute(2, 0, 1)
        assert image.dtype == torch.uint8 and torch.equal(image, expected), name
    assert decoded[0].shape == (3, 30, 40) and torch.equal(decoded[0][0], decoded[0][2])  # grey: three equal planes
    assert decoded[1].max() <= 129  # alpha 128 composited on black, as read_rgb does
    assert decoded[2].shape == (3, 40, 30)  # upright


def test_an_unreadable_file_is_named() -> None:
    good = encoded_tensor(_encode(_scene(20, 20, seed=3)))
    broken = encoded_tensor(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(BadImageError, match="cannot read image 'train/b/broken.jpg'"):
        decode_images([good, broken], ["train/a/good.jpg", "train/b/broken.jpg"], "cpu")


# --- (d) refused settings -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(aug="randaug"), "ImageDataModule: data.decode 'device' supports aug none|light, got 'randaug'"),
    (dict(on_bad_image="skip"), "ImageDataModule: data.decode 'device' needs data.on_bad_image 'error', got 'skip'"),
    (dict(decode="gpu"), "ImageDataModule: decode must be 'cpu' or 'device', got 'gpu'"),
])
def test_unsupported_settings_are_refused_in_one_line(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        ImageDataModule(**{"decode": "device", **kwargs})
    assert str(info.value) == message
    if "decode" not in kwargs:
        with pytest.raises(ValueError, match="^" + message.replace("ImageDataModule", "StreamingDataModule") + "$"):
            StreamingDataModule("unused", **{"decode": "device", **kwargs})


def test_pretraining_ignores_aug_and_the_cli_names_both_fields(tmp_path, monkeypatch, caplog) -> None:
    ImageDataModule(decode="device", task="pretrain", aug="randaug")  # MAE's pipeline: aug is not used
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.ERROR, logger="vit")
    code = main(["fit", "--config", str(SUPERVISED_CONFIG), "--data.init_args.decode", "device",
                 "--data.init_args.aug", "randaug"])
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("vit: error:")]
    assert code == 2 and lines == ["vit: error: ImageDataModule: data.decode 'device' supports aug none|light, got "
                                   "'randaug'"]
    assert not list(tmp_path.iterdir()), "refused before anything is written"


# --- data modules and (e) a `vit fit` run ---------------------------------------------------------------------------


def test_image_data_module_yields_encoded_batches_decoded_after_transfer(tree: Path) -> None:
    dm = ImageDataModule(root=str(tree), img_size=32, batch_size=4, task="pretrain", decode="device")
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, EncodedBatch) and batch.train and len(batch.encoded) == 4
    assert all(e.dtype == torch.uint8 and e.dim() == 1 for e in batch.encoded)
    moved = batch.to("cpu")  # what Lightning's transfer does: the bytes stay where decode_jpeg reads them
    images, labels = dm.on_after_batch_transfer(moved, 0)
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32 and torch.equal(labels, batch.labels)
    # the CPU module with the same settings evaluates the same files to nearly the same tensors
    cpu = ImageDataModule(root=str(tree), img_size=32, batch_size=4, task="pretrain")
    cpu.setup("fit")
    dev_val = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)[0]
    cpu_val = next(iter(cpu.val_dataloader()))[0]
    assert dev_val.shape == cpu_val.shape and ((dev_val - cpu_val) * STD_255).abs().mean() <= 1.0


def test_streaming_module_decodes_shards_like_the_folder_module(tree: Path, tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    optimize_folder(tree, shards, num_workers=1)
    stream = StreamingDataModule(str(shards), img_size=32, batch_size=4, task="pretrain", decode="device")
    folder = ImageDataModule(root=str(tree), img_size=32, batch_size=4, task="pretrain", decode="device")
    stream.setup("fit")
    folder.setup("fit")
    train = next(iter(stream.train_dataloader()))
    assert isinstance(train, EncodedBatch) and train.train
    epoch = stream.train_dataset.current_epoch  # litdata counts from 1 until Lightning sets it
    assert train.seeds == [sample_seed(0, epoch, int(i)) for i in train.indices]  # (seed, epoch, index), as on the CPU
    assert stream.on_after_batch_transfer(train, 0)[0].shape == (4, 3, 32, 32)
    by_name = {}
    for module in (stream, folder):
        for batch in module.val_dataloader():
            images = module.on_after_batch_transfer(batch, 0)[0]
            for name, image in zip(batch.names, images, strict=True):
                by_name.setdefault(name, []).append(image)
    assert len(by_name) == 12 and all(len(v) == 2 and torch.equal(*v) for v in by_name.values())


def test_vit_fit_trains_two_steps_with_device_decode(tree: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    net = '{"patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2, "decoder_embed_dim": 32, ' \
          '"decoder_depth": 1, "decoder_num_heads": 2}'
    code = main(["fit", "--config", str(MAE_CONFIG), "--model.init_args.model_kwargs", net,
                 "--data.init_args.root", str(tree), "--data.init_args.decode", "device",
                 "--data.init_args.batch_size", "4", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1",
                 "--trainer.enable_model_summary", "false"])
    assert code == 0
    ckpt = torch.load(tmp_path / "runs" / "mae_tiny_digits" / "checkpoints" / "last.ckpt", map_location="cpu",
                      weights_only=False)
    assert ckpt["global_step"] == 2 and ckpt["datamodule_hyper_parameters"]["decode"] == "device"


def test_reconstruction_figure_reads_encoded_val_images(tree: Path) -> None:
    dm = ImageDataModule(root=str(tree), img_size=32, batch_size=4, task="pretrain", decode="device")
    dm.setup("fit")

    class Trainer:  # what _spread_images reads of a Trainer
        datamodule = dm
        val_dataloaders = dm.val_dataloader()

    images = _spread_images(Trainer(), 3)
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.float32


def test_bench_times_device_decode(tree: Path) -> None:
    """``vit bench --data``'s device row: decode + MAE crop + flip + normalise on the device, labelled with it."""
    sys.path.insert(0, str(ROOT / "tools"))  # the harness is a tool in the checkout (as in test_bench.py)
    from bench.loader import _time_device_decode

    (row,) = _time_device_decode(argparse.Namespace(batch_size=4, repeats=2), tree, torch.device("cpu"))
    assert row["source"] == "device" and row["device"] == "cpu" and len(row["per_repeat"]) == 2
    assert row["img_per_s"] == statistics.median(row["per_repeat"]) > 0


# --- (f) CUDA --------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (nvjpeg decode)")
def test_cuda_matches_cpu() -> None:
    files = [_encode(_scene(60 + 7 * i, 80, seed=i)) for i in range(6)] + [_encode(_scene(50, 50, 9)[:, :, 0])]
    files.append(_encode(_scene(30, 40, seed=10), "PNG"))
    encoded, names = [encoded_tensor(b) for b in files], [f"{i}" for i in range(len(files))]
    seeds = [sample_seed(0, 0, i) for i in range(len(files))]
    pipeline = build_device_pipeline(32, MEAN, STD, 0.875, "pretrain", "light")
    for train in (True, False):
        out = {}
        for device in ("cpu", "cuda"):
            batch = EncodedBatch(encoded, torch.arange(len(files)), torch.arange(len(files)), seeds if train else None,
                                 names).to(device)
            images, labels = pipeline(batch)
            assert images.device.type == labels.device.type == device
            out[device] = images.cpu()
        # nvjpeg's IDCT and chroma upsampling are not libjpeg-turbo's: a few grey levels apart on these q95 JPEGs;
        # the crops (drawn on the CPU) are the same, so a wrong box or flip would differ by tens of levels
        levels = ((out["cuda"] - out["cpu"]) * STD_255).abs()
        assert levels.mean() <= 2.0 and levels.max() <= 40.0 and math.isfinite(float(levels.sum())), train
