"""ImageDataModule: an ImageFolder tree (or the built-in digits) to batches of [B, 3, H, W] float32.

Your own data: point `root` at a folder laid out as either

    root/train/<class>/<image>  and  root/val/<class>/<image>    (folder names set by train_dir / val_dir)
    root/<class>/<image>                                         (held-out val: val_split, e.g. 0.1)

For MAE pretraining (task "pretrain") a folder may also hold the images themselves, without class folders
(root/<image>, or root/train/<image> and root/val/<image>): one unlabelled set; classification needs classes.

Class names are the sorted sub-folder names of the train folder; every one needs at least one image.
With `root` unset the built-in digits are written once under the cache directory (see vit.data.builtin).
In YAML:

    data:
      root: /data/flowers
      img_size: 224
      batch_size: 128
      num_workers: 8
      aug: randaug

Starting from pretrained weights, `preprocessing_from: <weights folder>` normalises and crops as those weights
expect, read from the folder: our export's record, a timm hub folder's `pretrained_cfg`, or a Hugging Face
`preprocessor_config.json`.

With `decode: device` the loaders yield the encoded files and `on_after_batch_transfer` decodes and augments them
on the batch's device (nvjpeg on a GPU; see vit.data.device_decode); prediction stays on the CPU.

Training order and augmentation are a pure function of (seed, epoch) through EpochSeededSampler, and the
train loader is a StatefulDataLoader whose position Lightning stores in checkpoints, so a resumed run sees
the same remaining batches. Test uses the val set; predict uses `predict_paths` (files and folders) or,
when unset, the val images.
"""

import json
import logging
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import to_2tuple
from torch.utils.data import DataLoader, Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from vit.data.builtin import DIGITS_CLASSES, prepare_digits
from vit.data.datasets import ImageFolderDataset, PredictDataset, UnreadableImagesError, find_classes, scan
from vit.data.device_decode import EncodedBatch, EncodedImages, build_device_pipeline, collate_encoded, unsupported
from vit.data.sampler import EpochSeededSampler
from vit.data.split import stratified_split
from vit.data.transforms import (
    INTERPOLATION,
    TrainPreset,
    build_eval_transform,
    build_pretrain_transform,
    build_train_transform,
    preprocessing_record,
)

log = logging.getLogger(__name__)
_MAX_NAMED = 10  # unreadable files a scan error names; the warning before it lists all


class ImageDataModule(L.LightningDataModule):
    """Train / val / test / predict loaders over an ImageFolder tree or the built-in digits.

    Args:
        root: data folder (see module docstring); None uses the built-in digits.
        img_size: output size, an int or (h, w).
        batch_size: samples per batch for every loader.
        num_workers: DataLoader worker processes (persistent when > 0).
        pin_memory: pin batches in page-locked memory; None means "when CUDA is available".
        train_dir, val_dir: sub-folder names of the split layout.
        val_split: fraction of each class held out for val when root has no val folder (seeded by `seed`).
        task: "pretrain" uses the MAE crop/flip pipeline for training, "classify" the `aug` preset.
        aug: classification augmentation preset, a key of TRAIN_PRESETS.
        mean, std: per-channel normalisation (ImageNet by default).
        seed: seeds the train order, the per-sample augmentation and the val_split.
        on_bad_image: "error" stops at an unreadable file, naming it; "skip" logs it and uses the next one.
        scan: decode every file in setup and report all unreadable ones at once (an error with
            on_bad_image="error", a warning with "skip").
        cache_dir: where the built-in digits are written (default $VIT_CACHE_DIR or ~/.cache/vitkit).
        predict_paths: image files and/or folders for predict; None predicts the val images.
        drop_last: drop the last incomplete train batch.
        crop_pct: eval resize-then-center-crop ratio; 1.0 resizes straight to img_size.
        preprocessing_from: a weights folder whose preprocessing replaces mean, std and crop_pct: our export's
            config.json (or its "vitkit" entry in a timm hub folder), else timm's ``pretrained_cfg``, else a
            Hugging Face ``preprocessor_config.json``. Its input size is only reported: img_size stays the
            model's (the loader resamples positions for another one).
        decode: "cpu" decodes and augments in the loader workers; "device" decodes and augments each batch on its
            device after the transfer (for few CPU cores per GPU): task pretrain, aug none|light and evaluation,
            with on_bad_image "error".
    """

    def __init__(
        self,
        root: str | None = None,
        img_size: int | tuple[int, int] = 32,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        train_dir: str = "train",
        val_dir: str = "val",
        val_split: float = 0.0,
        task: Literal["pretrain", "classify"] = "classify",
        aug: TrainPreset = "light",
        mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN,
        std: tuple[float, float, float] = IMAGENET_DEFAULT_STD,
        seed: int = 0,
        on_bad_image: Literal["error", "skip"] = "error",
        scan: bool = False,
        cache_dir: str | None = None,
        predict_paths: list[str] | str | None = None,
        drop_last: bool = True,
        crop_pct: float = 0.875,
        preprocessing_from: str | None = None,
        decode: Literal["cpu", "device"] = "cpu",
    ) -> None:
        super().__init__()
        if isinstance(img_size, list):
            img_size = tuple(img_size)
        _check_args(locals())
        self.save_hyperparameters()
        self.img_size: tuple[int, int] = to_2tuple(img_size)
        if preprocessing_from is not None:
            self.hparams.update(_folder_preprocessing(preprocessing_from, self.img_size))
        self.train_root, self.val_root = _resolve_layout(root, train_dir, val_dir, val_split)
        flat = task == "pretrain"  # MAE needs no labels: a flat folder of images is one unlabelled set
        self._class_names = list(DIGITS_CLASSES) if root is None else find_classes(self.train_root, allow_flat=flat)
        self.train_dataset: ImageFolderDataset | None = None
        self.val_dataset: ImageFolderDataset | None = None
        self.predict_dataset: PredictDataset | None = None
        hp = self.hparams
        self.device_pipeline = None if decode == "cpu" else build_device_pipeline(
            self.img_size, hp.mean, hp.std, hp.crop_pct, task, aug)

    @property
    def class_names(self) -> list[str]:
        return list(self._class_names)

    @property
    def num_classes(self) -> int:
        return len(self._class_names)

    @property
    def preprocessing(self) -> dict:
        """What a model trained on this data expects of its input; checkpoints record it."""
        return preprocessing_record(self.img_size, self.hparams.mean, self.hparams.std, self.hparams.crop_pct)

    @property
    def num_skipped(self) -> int:
        """Unreadable images skipped so far (``on_bad_image: skip``), train and val together, all workers."""
        return sum(ds.num_skipped for ds in (self.train_dataset, self.val_dataset) if ds is not None)

    def skipped_flags(self) -> np.ndarray:
        """1 per skipped unreadable file, 0 per other, over train then val samples: ranks OR these to count once."""
        sets = [ds.skipped_flags() for ds in (self.train_dataset, self.val_dataset) if ds is not None]
        return np.concatenate(sets) if sets else np.zeros(0, np.uint8)

    def prepare_data(self) -> None:
        """Write the built-in digits once, or check an own folder: list its classes and files (and with ``scan``
        decode every one), so bad data stops the run before it writes anything. Lightning calls this on one process
        per node, before its loggers make their folders; ``setup`` reuses the data sets built here."""
        stage = self.trainer.state.fn if self.trainer is not None else None
        if self.hparams.root is None:
            prepare_digits(self.img_size, self.hparams.cache_dir)
        elif self.train_dataset is None and self._needs_folders(stage):
            self._build_folder_datasets(scan=self.hparams.scan)

    def setup(self, stage: str | None = None) -> None:
        """Build the data sets the stage needs; safe to call more than once and in every process."""
        if self.hparams.root is None and self.train_root is None:
            self.train_root = prepare_digits(self.img_size, self.hparams.cache_dir) / "train"
            self.val_root = self.train_root.parent / "val"
        if self.train_dataset is None and self._needs_folders(stage):
            # under a Trainer, prepare_data scanned an own folder already (once per node)
            self._build_folder_datasets(scan=self.hparams.scan and (self.trainer is None or self.hparams.root is None))
        if self.predict_dataset is None and stage in ("predict", None):
            self._build_predict_dataset()

    def train_dataloader(self) -> StatefulDataLoader:
        ds = self._need(self.train_dataset, "train")
        sampler = EpochSeededSampler(len(ds), shuffle=True, seed=self.hparams.seed)
        return StatefulDataLoader(
            self._maybe_encoded(ds, train=True),
            batch_size=self.hparams.batch_size,
            sampler=sampler,
            drop_last=self.hparams.drop_last,
            **self._loader_kwargs(encoded=True),
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.val_dataset is None:
            return []  # Lightning skips validation for an empty list
        ds = self._maybe_encoded(self.val_dataset, train=False)
        return DataLoader(ds, batch_size=self.hparams.batch_size, **self._loader_kwargs(encoded=True))

    def test_dataloader(self) -> DataLoader:
        ds = self._maybe_encoded(self._need(self.val_dataset, "val (used for test)"), train=False)
        return DataLoader(ds, batch_size=self.hparams.batch_size, **self._loader_kwargs(encoded=True))

    def predict_dataloader(self) -> DataLoader:
        ds = self._need(self.predict_dataset, "predict")
        return DataLoader(ds, batch_size=self.hparams.batch_size, **self._loader_kwargs())

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """With ``decode: device``: decode and augment the encoded batch on the device it was moved to."""
        return self.device_pipeline(batch) if isinstance(batch, EncodedBatch) else batch

    def _maybe_encoded(self, ds: ImageFolderDataset, train: bool) -> Dataset:
        return ds if self.device_pipeline is None else EncodedImages(ds.samples, train)

    def _needs_folders(self, stage: str | None) -> bool:
        return stage != "predict" or self.hparams.predict_paths is None

    def _build_folder_datasets(self, scan: bool) -> None:
        hp = self.hparams
        if scan:
            self._scan()
        if hp.task == "pretrain":
            train_tf = build_pretrain_transform(self.img_size, hp.mean, hp.std)
        elif hp.task != "classify":  # the CLI checks the Literal; a Python caller gets the same word
            raise ValueError(f"ImageDataModule: task must be 'pretrain' or 'classify', got {hp.task!r}")
        else:
            train_tf = build_train_transform(self.img_size, hp.mean, hp.std, preset=hp.aug)
        eval_tf = build_eval_transform(self.img_size, hp.mean, hp.std, crop_pct=hp.crop_pct)
        unlabelled = hp.task == "pretrain"
        full = ImageFolderDataset(self.train_root, None, self._class_names, hp.on_bad_image, unlabelled=unlabelled)
        if self.val_root is not None:
            self.train_dataset = full.select(range(len(full)), train_tf)
            self.val_dataset = ImageFolderDataset(self.val_root, eval_tf, self._class_names, hp.on_bad_image,
                                                  unlabelled=unlabelled)
        elif hp.val_split > 0:
            train_idx, val_idx = stratified_split(full.targets, hp.val_split, hp.seed)
            self.train_dataset = full.select(train_idx, train_tf)
            self.val_dataset = full.select(val_idx, eval_tf) if val_idx else None
        else:
            self.train_dataset = full.select(range(len(full)), train_tf)
        if hp.drop_last and len(self.train_dataset) < hp.batch_size:
            raise ValueError(
                f"batch_size={hp.batch_size} is larger than the {len(self.train_dataset)} training images in "
                f"{str(self.train_root)!r}: with drop_last=True there would be no batch; lower batch_size"
            )
        self._log_sizes()

    def _build_predict_dataset(self) -> None:
        hp = self.hparams
        eval_tf = build_eval_transform(self.img_size, hp.mean, hp.std, crop_pct=hp.crop_pct)
        if hp.predict_paths is not None:
            self.predict_dataset = PredictDataset(hp.predict_paths, eval_tf)
        else:
            ds = self.val_dataset if self.val_dataset is not None else self.train_dataset
            self.predict_dataset = PredictDataset([p for p, _ in ds.samples], eval_tf)

    def _scan(self) -> None:
        roots = [r for r in (self.train_root, self.val_root) if r is not None]
        bad = [item for r in roots for item in scan(r)]
        if not bad:
            return
        listing = "\n".join(f"  {p}: {reason}" for p, reason in bad)
        message = f"scan found {len(bad)} unreadable image(s):\n{listing}"
        if self.hparams.on_bad_image != "error":
            log.warning("%s\nthey will be skipped (on_bad_image='skip')", message)
            return
        log.warning("%s", message)  # every file with its reason; the error names them in one line
        names = ", ".join(repr(str(p)) for p, _ in bad[:_MAX_NAMED]) + (" ..." if len(bad) > _MAX_NAMED else "")
        raise UnreadableImagesError(f"scan found {len(bad)} unreadable image(s): {names}; fix or remove them, or "
                                    f"set --data.on_bad_image skip")

    def _loader_kwargs(self, encoded: bool = False) -> dict:
        hp = self.hparams
        pin = torch.cuda.is_available() if hp.pin_memory is None else hp.pin_memory
        collate = {"collate_fn": collate_encoded} if encoded and self.device_pipeline is not None else {}
        return dict(num_workers=hp.num_workers, pin_memory=pin, persistent_workers=hp.num_workers > 0, **collate)

    def _need(self, ds: Dataset | None, name: str) -> Dataset:
        if ds is None:
            raise RuntimeError(f"no {name} data set: call setup() first (Lightning's Trainer does)")
        return ds

    @rank_zero_only
    def _log_sizes(self) -> None:
        val = len(self.val_dataset) if self.val_dataset is not None else 0
        root = self.hparams.root or f"built-in digits at {self.train_root.parent}"
        log.info(
            "data %s: %d train / %d val images, %d classes",
            root,
            len(self.train_dataset),
            val,
            self.num_classes,
        )


def _check_args(args: dict) -> None:
    """Raise ValueError naming the first argument whose value its type hint cannot rule out.

    Types and enumerated choices are the constructor's hints, which jsonargparse checks on the command line.
    """

    def need(ok: bool, field: str, what: str) -> None:
        if not ok:
            raise ValueError(f"ImageDataModule: {field} must be {what}, got {args[field]!r}")

    hw = to_2tuple(args["img_size"])
    need(len(hw) == 2 and all(isinstance(s, int) and s > 0 for s in hw), "img_size", "a positive int or (h, w)")
    need(args["batch_size"] > 0, "batch_size", "positive")
    need(args["num_workers"] >= 0, "num_workers", ">= 0")
    for field in ("train_dir", "val_dir"):
        need(args[field] not in ("", ".", ".."), field, "a sub-folder name")
    need(0.0 <= args["val_split"] < 1.0, "val_split", "in [0, 1)")
    need(all(s > 0 for s in args["std"]), "std", "positive")
    need(args["seed"] >= 0, "seed", ">= 0")
    need(0.0 < args["crop_pct"] <= 1.0, "crop_pct", "in (0, 1]")
    need(args["decode"] in ("cpu", "device"), "decode", "'cpu' or 'device'")
    if args["decode"] == "device" and (why := unsupported(args["task"], args["aug"], args["on_bad_image"])):
        raise ValueError(f"ImageDataModule: {why}")
    if args["root"] is not None:
        need(Path(args["root"]).expanduser().is_dir(), "root", "an existing folder")
    if args["preprocessing_from"] is not None:
        need(Path(args["preprocessing_from"]).expanduser().is_dir(), "preprocessing_from", "an existing folder")
    paths = args["predict_paths"]
    for p in [paths] if isinstance(paths, str) else paths or []:
        if not Path(p).expanduser().exists():
            raise ValueError(f"ImageDataModule: predict_paths entry {p!r} does not exist")


def _resolve_layout(
    root: str | None, train_dir: str, val_dir: str, val_split: float
) -> tuple[Path | None, Path | None]:
    """(train folder, val folder or None); (None, None) for the digits, resolved in setup."""
    if root is None:
        if val_split > 0:
            raise ValueError("ImageDataModule: val_split is for a root without a val folder; digits have one")
        return None, None
    root_p = Path(root).expanduser()
    train_p, val_p = root_p / train_dir, root_p / val_dir
    if not train_p.is_dir():
        if val_p.is_dir():
            raise ValueError(f"ImageDataModule: root {root!r} has a {val_dir!r} but no {train_dir!r} folder")
        return root_p, None
    if not val_p.is_dir():
        return train_p, None
    if val_split > 0:
        raise ValueError(f"ImageDataModule: val_split={val_split} but root {root!r} has a {val_dir!r} folder")
    return train_p, val_p


def _folder_preprocessing(folder: str, img_size: tuple[int, int]) -> dict:
    """mean, std and crop_pct recorded in a weights folder (see ``preprocessing_from``); ValueError if it has none.

    The folder's interpolation and input size are reported when they differ from ours, not taken.
    """
    path = Path(folder).expanduser()
    config = _read_json(path / "config.json")
    record = config.get("vitkit", config)
    if record.get("architecture") in ("VisionTransformer", "MaskedAutoencoder"):
        found, what = dict(record), "config.json (vitkit record)"
    elif isinstance(config.get("pretrained_cfg"), dict):
        cfg = config["pretrained_cfg"]
        found, what = {**cfg, "img_size": (cfg.get("input_size") or [None])[1:] or None}, "config.json pretrained_cfg"
    elif (path / "preprocessor_config.json").is_file():
        found, what = _hf_processor(_read_json(path / "preprocessor_config.json")), "preprocessor_config.json"
    else:
        raise ValueError(f"ImageDataModule: preprocessing_from {folder!r} has no config.json record, timm "
                         f"pretrained_cfg or preprocessor_config.json")
    values = {k: found[k] for k in ("mean", "std", "crop_pct") if found.get(k) is not None}
    if not values:
        raise ValueError(f"ImageDataModule: preprocessing_from {folder!r}: {what} records no mean, std or crop_pct")
    if any(s <= 0 for s in values.get("std", [1.0])) or not 0.0 < values.get("crop_pct", 1.0) <= 1.0:
        raise ValueError(f"ImageDataModule: preprocessing_from {folder!r}: {what} holds std {values.get('std')} and "
                         f"crop_pct {values.get('crop_pct')} (std must be positive, crop_pct in (0, 1])")
    interpolation = found.get("interpolation")
    if interpolation and interpolation != INTERPOLATION:
        log.warning("%s of %s resizes %s; vitkit's transforms resize %s", what, folder, interpolation, INTERPOLATION)
    size = found.get("img_size")
    if size and tuple(int(v) for v in size) != img_size:
        log.info("the weights in %s expect %s inputs; data.img_size is %s", folder, "x".join(map(str, size)),
                 "x".join(map(str, img_size)))
    log.info("preprocessing from %s of %s: %s", what, folder, values)
    return values


def _hf_processor(processor: dict) -> dict:
    """A Hugging Face image processor's settings in our terms (a shortest-edge resize + crop gives crop_pct)."""
    size, crop = processor.get("size") or {}, processor.get("crop_size") or {}
    out = {"mean": processor.get("image_mean"), "std": processor.get("image_std"),
           "interpolation": {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}.get(processor.get("resample"))}
    if processor.get("do_center_crop") and crop.get("height") and size.get("shortest_edge"):
        out.update(img_size=[crop["height"], crop["width"]], crop_pct=min(crop["height"], crop["width"])
                   / size["shortest_edge"])
    elif size.get("height") and size.get("width"):
        out.update(img_size=[size["height"], size["width"]], crop_pct=1.0)
    return out


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"ImageDataModule: preprocessing_from: {path} is not readable JSON ({e})") from e
    return data if isinstance(data, dict) else {}
