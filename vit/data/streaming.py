"""StreamingDataModule: litdata shards written by ``vit data optimize``, streamed as batches of [B, 3, H, W] float32.

    vit data optimize /data/imagenet --out /data/imagenet-shards --num-workers 16     (once)
    vit fit --config configs/mae/vit_base_in1k.yaml \\
        --data.class_path vit.data.StreamingDataModule --data.init_args.input_dir /data/imagenet-shards

``input_dir`` is a local folder or any URL litdata streams from (``s3://bucket/imagenet-shards``, ``gs://...``);
remote chunks are cached under ``cache_dir`` (litdata's default when unset) and evicted past ``max_cache_size``.
The constructor speaks ImageDataModule's vocabulary (img_size, batch_size, num_workers, task, aug, mean, std, seed,
on_bad_image, crop_pct, drop_last) and builds the same albumentations pipelines; class names and ``num_classes``
come from the shards' ``vitkit.json``.

litdata splits the chunks across ranks and workers (no DistributedSampler): every rank reads different samples,
and under DDP litdata drops a few so that all ranks get the same number of whole batches. Exact resume: the train
loader is litdata's StreamingDataLoader, whose position (samples yielded, epoch, next worker) Lightning saves in
checkpoints; the order is a function of (seed, epoch, world size, workers, batch size) and each sample's
augmentation of (seed, epoch, sample index), so a resumed run with the same settings replays the remaining
batches exactly. Train workers are not persistent: a persistent worker would keep its own epoch count, which
drifts from the loader's when an epoch is cut short (``limit_train_batches``, ``max_steps``).

With ``decode: device`` the loaders yield the stored bytes and ``on_after_batch_transfer`` decodes and augments them
on the batch's device, each sample seeded by (seed, epoch, sample index) as before (see vit.data.device_decode).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from litdata import StreamingDataLoader
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import to_2tuple

from vit.data.device_decode import (
    EncodedBatch,
    EncodedSample,
    build_device_pipeline,
    collate_encoded,
    encoded_tensor,
    unsupported,
)
from vit.data.shard_dataset import ImageShardDataset, collate_images, sample_seed
from vit.data.shards import is_url, read_meta, split_location
from vit.data.transforms import (
    TRAIN_PRESETS,
    TrainPreset,
    build_eval_transform,
    build_pretrain_transform,
    build_train_transform,
    preprocessing_record,
)

log = logging.getLogger(__name__)


class EpochStreamingDataLoader(StreamingDataLoader):
    """litdata's StreamingDataLoader that can be told which epoch its next iteration starts.

    litdata counts epochs itself, one per ``iter()`` from 1, and after ``load_state_dict`` replays the loaded
    position until an iteration runs to its end. Lightning stops at the loader's length and never reaches that end,
    so the epoch after a resumed one would replay the position (and yield nothing); and a run resumed from an
    epoch-end checkpoint whose loader state Lightning dropped (issue #20550) would count from 1 again. ExactResume
    calls ``set_epoch(trainer.current_epoch)`` at every epoch start, which settles both.
    """

    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration afresh as Lightning's ``epoch`` (litdata's ``epoch + 1``)."""
        self.restore = False
        self.current_epoch = epoch


class EncodedShardDataset(ImageShardDataset):
    """Shards whose items stay encoded (``decode: device``); training items carry their augmentation seed."""

    def __init__(self, *args: Any, train: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.train = train

    def decode(self, sample: dict[str, Any]) -> EncodedSample:
        index = int(sample["index"])
        seed = sample_seed(self.seed, self.current_epoch, index) if self.train else None
        return EncodedSample(encoded_tensor(sample["image"]), int(sample["label"]), index, seed,
                             bytes(sample["path"]).decode())


class StreamingDataModule(L.LightningDataModule):
    """Train / val / test loaders over litdata shards (a local folder or an object-store URL).

    Args:
        input_dir: shards folder or URL written by ``vit data optimize`` (holds vitkit.json, train/, val/).
        img_size: output size, an int or (h, w).
        batch_size: samples per batch, per device.
        num_workers: loader worker processes per device.
        pin_memory: pin batches in page-locked memory; None means "when CUDA is available".
        task: "pretrain" uses the MAE crop/flip pipeline for training, "classify" the `aug` preset.
        aug: classification augmentation preset, a key of TRAIN_PRESETS.
        mean, std: per-channel normalisation (ImageNet by default).
        seed: litdata's shuffle seed and the base of every sample's augmentation seed.
        on_bad_image: "error" stops at an unreadable image, naming its source file; "skip" logs it and gives its
            place in the batch to another image of that batch.
        crop_pct: eval resize-then-center-crop ratio; 1.0 resizes straight to img_size.
        drop_last: whole train batches only (litdata drops the remainder of each worker's share).
        cache_dir: where remote chunks are cached; None is litdata's default.
        max_cache_size: cache budget, e.g. "100GB"; None is litdata's default (most of the free disk).
        storage_options: credentials and endpoint for the object store, passed to litdata.
        decode: "cpu" decodes and augments in the loader workers; "device" decodes and augments each batch on its
            device after the transfer (for few CPU cores per GPU): task pretrain, aug none|light and evaluation,
            with on_bad_image "error".
    """

    def __init__(
        self,
        input_dir: str,
        img_size: int | tuple[int, int] = 32,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        task: Literal["pretrain", "classify"] = "classify",
        aug: TrainPreset = "light",
        mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN,
        std: tuple[float, float, float] = IMAGENET_DEFAULT_STD,
        seed: int = 0,
        on_bad_image: Literal["error", "skip"] = "error",
        crop_pct: float = 0.875,
        drop_last: bool = True,
        cache_dir: str | None = None,
        max_cache_size: str | None = None,
        storage_options: dict | None = None,
        decode: Literal["cpu", "device"] = "cpu",
    ) -> None:
        super().__init__()
        if isinstance(img_size, list):
            img_size = tuple(img_size)
        _check_args(locals())
        self.save_hyperparameters()
        self.img_size: tuple[int, int] = to_2tuple(img_size)
        self._meta: dict[str, Any] | None = None
        self.train_dataset: ImageShardDataset | None = None
        self.val_dataset: ImageShardDataset | None = None
        self.device_pipeline = None if decode == "cpu" else build_device_pipeline(
            self.img_size, mean, std, crop_pct, task, aug)

    @property
    def meta(self) -> dict[str, Any]:
        """The shards' vitkit.json record (read once)."""
        if self._meta is None:
            self._meta = read_meta(self.hparams.input_dir, self.hparams.storage_options)
        return self._meta

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def num_classes(self) -> int:
        return len(self.meta["classes"])

    @property
    def preprocessing(self) -> dict:
        """What a model trained on this data expects of its input; checkpoints record it."""
        return preprocessing_record(self.img_size, self.hparams.mean, self.hparams.std, self.hparams.crop_pct)

    @property
    def num_skipped(self) -> int:
        """Unreadable images skipped so far (``on_bad_image: skip``), train and val together, all workers."""
        return sum(ds.num_skipped for ds in (self.train_dataset, self.val_dataset) if ds is not None)

    def setup(self, stage: str | None = None) -> None:
        """Open the shards the stage needs; litdata reads the rank and world size here, after DDP starts."""
        hp = self.hparams
        if self.train_dataset is None and stage in ("fit", None):
            self.train_dataset = self._dataset("train", self._train_transform(), shuffle=True, drop_last=hp.drop_last)
        if self.val_dataset is None and "val" in self.meta["splits"] and stage in ("fit", "validate", "test", None):
            eval_tf = build_eval_transform(self.img_size, hp.mean, hp.std, crop_pct=hp.crop_pct)
            self.val_dataset = self._dataset("val", eval_tf, shuffle=False, drop_last=None)
        self._log_sizes()

    def train_dataloader(self) -> EpochStreamingDataLoader:
        ds = self._need(self.train_dataset, "train")
        return self._loader(ds, persistent=False)

    def val_dataloader(self) -> EpochStreamingDataLoader | list:
        if self.val_dataset is None:
            return []  # Lightning skips validation for an empty list
        return self._loader(self.val_dataset, persistent=self.hparams.num_workers > 0)

    def test_dataloader(self) -> EpochStreamingDataLoader:
        return self._loader(self._need(self.val_dataset, "val (used for test)"), persistent=False)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """With ``decode: device``: decode and augment the encoded batch on the device it was moved to."""
        return self.device_pipeline(batch) if isinstance(batch, EncodedBatch) else batch

    def _train_transform(self) -> Any:
        hp = self.hparams
        if hp.task == "pretrain":
            return build_pretrain_transform(self.img_size, hp.mean, hp.std)
        return build_train_transform(self.img_size, hp.mean, hp.std, preset=hp.aug)

    def _dataset(self, split: str, transform: Any, shuffle: bool, drop_last: bool | None) -> ImageShardDataset:
        hp = self.hparams
        location = split_location(hp.input_dir, split)
        kwargs = dict(seed=hp.seed, on_bad_image=hp.on_bad_image, shuffle=shuffle, drop_last=drop_last,
                      cache_dir=hp.cache_dir, max_cache_size=hp.max_cache_size, storage_options=hp.storage_options)
        if self.device_pipeline is not None:
            return EncodedShardDataset(location, transform, train=split == "train", **kwargs)
        return ImageShardDataset(location, transform, **kwargs)

    def _loader(self, ds: ImageShardDataset, persistent: bool) -> EpochStreamingDataLoader:
        hp = self.hparams
        pin = torch.cuda.is_available() if hp.pin_memory is None else hp.pin_memory
        collate = collate_images if self.device_pipeline is None else collate_encoded
        return EpochStreamingDataLoader(ds, batch_size=hp.batch_size, num_workers=hp.num_workers, pin_memory=pin,
                                        persistent_workers=persistent, collate_fn=collate)

    def _need(self, ds: ImageShardDataset | None, name: str) -> ImageShardDataset:
        if ds is None:
            raise RuntimeError(f"no {name} shards: call setup() first (Lightning's Trainer does), and check that "
                               f"{self.hparams.input_dir!r} has a {name.split()[0]} split")
        return ds

    @rank_zero_only
    def _log_sizes(self) -> None:
        splits = self.meta["splits"]
        log.info("data %s (shards): %s, %d classes", self.hparams.input_dir,
                 " / ".join(f"{v['images']} {k}" for k, v in splits.items()), self.num_classes)


def _check_args(args: dict) -> None:
    """Raise ValueError naming the first argument whose value its type hint cannot rule out."""

    def need(ok: bool, field: str, what: str) -> None:
        if not ok:
            raise ValueError(f"StreamingDataModule: {field} must be {what}, got {args[field]!r}")

    hw = to_2tuple(args["img_size"])
    need(len(hw) == 2 and all(isinstance(s, int) and s > 0 for s in hw), "img_size", "a positive int or (h, w)")
    need(args["batch_size"] > 0, "batch_size", "positive")
    need(args["num_workers"] >= 0, "num_workers", ">= 0")
    need(args["task"] in ("pretrain", "classify"), "task", "'pretrain' or 'classify'")
    need(args["aug"] in TRAIN_PRESETS, "aug", f"one of {sorted(TRAIN_PRESETS)}")
    need(args["on_bad_image"] in ("error", "skip"), "on_bad_image", "'error' or 'skip'")
    need(all(s > 0 for s in args["std"]), "std", "positive")
    need(args["seed"] >= 0, "seed", ">= 0")
    need(0.0 < args["crop_pct"] <= 1.0, "crop_pct", "in (0, 1]")
    need(args["decode"] in ("cpu", "device"), "decode", "'cpu' or 'device'")
    if args["decode"] == "device" and (why := unsupported(args["task"], args["aug"], args["on_bad_image"])):
        raise ValueError(f"StreamingDataModule: {why}")
    location = args["input_dir"]
    need(isinstance(location, str) and bool(location), "input_dir", "a shards folder or URL")
    if not is_url(location):
        need(Path(location.removeprefix("file://")).expanduser().is_dir(), "input_dir", "an existing folder")
