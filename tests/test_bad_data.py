"""Bad data that once trained silently wrong or hung: wide-sample TIFFs, FIFOs named like images, flat folders,
skipped files counted twice, and errors that came out as tracebacks instead of one named line."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from vit.data import ImageDataModule, ImageFolderDataset, build_eval_transform, list_images, read_rgb
from vit.data.datasets import BadImageError, DataFolderError, UnreadableImagesError, find_classes
from vit.errors import BadInputError
from vit.train.skipped_images import distinct_skips

pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated:UserWarning")


def _png(path: Path, seed: int = 0, size: int = 12) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)


def _tiff(path: Path, values: np.ndarray) -> Path:
    Image.fromarray(values).save(path)
    return path


# --- wide samples: converted by their real range, or refused naming the file ----------------------------------


def test_float_tiff_in_0_1_is_scaled_not_black(tmp_path) -> None:
    ramp = np.linspace(0.0, 1.0, 12, dtype=np.float32).reshape(3, 4)
    path = _tiff(tmp_path / "float.tif", ramp)
    assert Image.open(path).mode == "F"
    rgb = read_rgb(path)
    assert rgb.shape == (3, 4, 3) and rgb.dtype == np.uint8
    assert np.array_equal(rgb[:, :, 0], np.rint(ramp * 255).astype(np.uint8))
    assert rgb.max() == 255 and np.all(rgb[:, :, 0] == rgb[:, :, 2])


@pytest.mark.parametrize(("values", "found"), [
    (np.full((3, 4), 200.0, np.float32), "values 200..200"),
    (np.array([[-0.5, 0.5]], np.float32), "values -0.5..0.5"),
    (np.array([[np.nan, 0.5]], np.float32), "non-finite"),
], ids=["0..255 floats", "negative", "nan"])
def test_float_tiff_outside_0_1_is_refused_naming_file_and_range(tmp_path, values, found) -> None:
    path = _tiff(tmp_path / "odd float.tif", values)
    with pytest.raises(BadImageError, match="odd float.tif") as err:
        read_rgb(path)
    assert "mode 'F'" in str(err.value) and found in str(err.value)
    assert isinstance(err.value, BadInputError)


def test_int32_tiff_is_refused_not_read_as_16_bit(tmp_path) -> None:
    path = _tiff(tmp_path / "int32.tif", np.full((3, 4), 200, np.int32))
    assert Image.open(path).mode == "I"
    with pytest.raises(BadImageError, match="int32.tif") as err:
        read_rgb(path)
    assert "32-bit samples (PIL mode 'I', values 200..200)" in str(err.value)


def test_uint16_tiff_and_png_scale_by_16_bits(tmp_path) -> None:
    values = np.array([[0, 257, 32768, 65535]], np.uint16)
    for name in ("u16.tif", "u16.png"):
        rgb = read_rgb(_tiff(tmp_path / name, values))
        assert rgb[0, :, 1].tolist() == [0, 1, 128, 255], name


# --- entries that are not regular files ----------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_fifo_named_like_an_image_is_left_out_with_a_warning(tmp_path, caplog) -> None:
    root = tmp_path / "data"
    _png(root / "cat" / "a.png")
    _png(root / "dog" / "b.png")
    os.mkfifo(root / "cat" / "x.png")
    with caplog.at_level(logging.WARNING, logger="vit.data.datasets"):
        ds = ImageFolderDataset(root)
    assert [p.name for p, _ in ds.samples] == ["a.png", "b.png"]
    assert "not regular files" in caplog.text and "x.png" in caplog.text
    assert list_images(root / "cat") == [root / "cat" / "a.png"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_reading_a_fifo_is_refused_at_once(tmp_path) -> None:
    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    outcome: list[BaseException] = []

    def read() -> None:
        try:
            read_rgb(fifo)
        except BaseException as e:  # the test inspects whatever came out
            outcome.append(e)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=5)
    if reader.is_alive():  # it blocked in open(): release it by opening the other end, then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("read_rgb blocked on a FIFO")
    assert isinstance(outcome[0], BadImageError) and "not a regular file" in str(outcome[0])


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_shard_writer_lists_a_fifo_as_skipped_not_read(tmp_path) -> None:
    from vit.data.optimize import _list_split

    _png(tmp_path / "cat" / "a.png")
    os.mkfifo(tmp_path / "cat" / "x.png")
    listing = _list_split(tmp_path, ["cat"], is_val=False)
    assert [p for _, p, _ in listing.items] == [str(tmp_path / "cat" / "a.png")]
    assert (str(tmp_path / "cat" / "x.png"), "not a regular file") in listing.ignored


# --- skipped files are counted once -------------------------------------------------------------------------


def test_skips_are_counted_once_across_workers(tmp_path) -> None:
    """Batches of 2 over 2 workers: worker 0 meets bad file 1 and takes its neighbour 2 (bad as well), worker 1
    meets file 2 in its own batch. Per-worker lists counted file 2 twice."""
    root = tmp_path / "data"
    for i in range(8):
        _png(root / "a" / f"{i}.png", seed=i)
    bad = [root / "a" / f"{i}.png" for i in (1, 2, 5)]
    for path in bad:
        path.write_bytes(b"not an image")
    ds = ImageFolderDataset(root, build_eval_transform(8, crop_pct=1.0), on_bad_image="skip")
    batches = list(DataLoader(ds, batch_size=2, num_workers=2))
    assert sum(len(x) for x, _ in batches) == 8, "every bad file is replaced by a readable one"
    assert ds.num_skipped == 3
    assert ds.skipped_paths == bad
    assert ds.skipped_flags().tolist() == [0, 1, 1, 0, 0, 1, 0, 0]


# --- named, one-line errors ---------------------------------------------------------------------------------


def test_error_from_a_worker_is_one_line_naming_the_file(tmp_path) -> None:
    root = tmp_path / "data"
    _png(root / "a" / "good.png")
    (root / "a" / "broken.png").write_bytes(b"")
    ds = ImageFolderDataset(root, build_eval_transform(8, crop_pct=1.0))
    with pytest.raises(BadImageError) as err:
        list(DataLoader(ds, batch_size=2, num_workers=1))
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message, message
    assert message.startswith("cannot read image") and "broken.png" in message and "--data.scan true" in message


def test_scan_error_names_the_files_in_one_line(tmp_path) -> None:
    root = tmp_path / "data"
    for i in range(3):
        _png(root / "a" / f"{i}.png", seed=i)
    (root / "a" / "1.png").write_bytes(b"")
    with pytest.raises(UnreadableImagesError) as err:
        ImageDataModule(root=str(root), img_size=8, batch_size=1, scan=True).setup("fit")
    assert "\n" not in str(err.value) and "1.png" in str(err.value) and "scan found 1 unreadable" in str(err.value)
    assert isinstance(err.value, BadInputError)


@pytest.mark.parametrize("layout", ["empty class", "flat folder", "nothing"])
def test_folders_no_classifier_can_use_are_named_errors(tmp_path, layout) -> None:
    root = tmp_path / "data"
    root.mkdir()
    if layout == "empty class":
        _png(root / "cat" / "a.png")
        (root / "bird").mkdir()
    elif layout == "flat folder":
        _png(root / "a.png")
    with pytest.raises(DataFolderError) as err:
        ImageDataModule(root=str(root), img_size=8, batch_size=1).setup("fit")
    expected = {"empty class": "bird", "flat folder": "classification needs root/<class>/<image files>",
                "nothing": "no class folders"}[layout]
    assert expected in str(err.value) and isinstance(err.value, BadInputError)


@pytest.mark.parametrize("split", [False, True], ids=["root", "train+val"])
def test_flat_folder_is_one_unlabelled_set_for_pretraining(tmp_path, split) -> None:
    root = tmp_path / "data"
    for i in range(6):
        _png(root / "train" / f"{i}.png" if split else root / f"{i}.png", seed=i, size=16)
    if split:
        _png(root / "val" / "v.png", seed=9, size=16)
    dm = ImageDataModule(root=str(root), img_size=8, batch_size=2, task="pretrain")
    dm.setup("fit")
    assert len(dm.train_dataset) == 6 and dm.class_names == []
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 8, 8) and y.tolist() == [0, 0]
    assert (len(dm.val_dataset) if split else dm.val_dataset) == (1 if split else None)
    assert find_classes(root / "train" if split else root, allow_flat=True) == []


class _Ranks:
    """Just enough of a Trainer for ``distinct_skips``: its strategy reduces over the ranks' flag arrays."""

    def __init__(self, *flags: list[int]) -> None:
        self.world_size, self.ranks = len(flags), [torch.tensor(f, dtype=torch.int32) for f in flags]
        self.strategy = self

    root_device = torch.device("cpu")

    def reduce(self, tensor: torch.Tensor, reduce_op: str) -> torch.Tensor:
        assert reduce_op == "max", "an OR over ranks, not a sum"
        return torch.stack(self.ranks).amax(0)


def test_skip_marks_of_every_rank_count_each_file_once() -> None:
    assert distinct_skips(_Ranks([0, 1, 1, 0]), np.array([0, 1, 1, 0], np.uint8)) == 2
    assert distinct_skips(_Ranks([0, 1, 1, 0], [0, 0, 1, 1]), np.array([0, 1, 1, 0], np.uint8)) == 3
