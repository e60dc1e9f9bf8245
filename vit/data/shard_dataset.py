"""ImageShardDataset: litdata shards (see vit.data.shards) streamed as (image [3, H, W] float32, label) samples.

litdata assigns chunks to ranks and workers and orders them, seeded by (seed, epoch); the augmentation of a sample
is seeded by (seed, epoch, the sample's ``index``) alone, so it does not depend on which worker or rank reads it,
on what that worker read before, or on where a resumed run picks up.

Unreadable images follow ``on_bad_image``: "error" raises BadImageError naming the source file; "skip" logs it,
counts it in ``num_skipped`` and yields ``(None, label)``, which ``collate_images`` replaces with another image of
the same batch. The sample is still consumed, so batch sizes, litdata's resume position and every later batch
stay what they would have been.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
from typing import Any, Literal

import albumentations as A
import numpy as np
import torch
from litdata import StreamingDataset
from torch.utils.data import default_collate

from vit.data.datasets import BadImageError
from vit.data.shards import decode_image
from vit.data.transforms import apply_transform

log = logging.getLogger(__name__)

Sample = tuple[torch.Tensor | None, int]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of sample ``index`` in ``epoch``: a pure function of the three."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class ImageShardDataset(StreamingDataset):
    """One split's shards as ``(image, label)`` items, decoded and augmented in the process that reads them.

    Args:
        input_dir: the split's shards folder or URL (``DIR/train``).
        transform: albumentations pipeline from vit.data.transforms (numpy in, tensor out).
        seed: litdata's shuffle seed and the base of every augmentation seed.
        on_bad_image: "error" or "skip" (see module docstring).
        shuffle: shuffle chunks and samples each epoch (train).
        drop_last: litdata's: equal, whole batches on every rank and worker (forced on under DDP by litdata).
        **litdata_kwargs: cache_dir, max_cache_size, storage_options, ... passed to ``StreamingDataset``.
    """

    def __init__(
        self,
        input_dir: str,
        transform: A.Compose,
        seed: int = 0,
        on_bad_image: Literal["error", "skip"] = "error",
        shuffle: bool = False,
        drop_last: bool | None = None,
        **litdata_kwargs: Any,
    ) -> None:
        if on_bad_image not in ("error", "skip"):
            raise ValueError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
        super().__init__(input_dir, shuffle=shuffle, drop_last=drop_last, seed=seed, **litdata_kwargs)
        self.image_transform = transform
        self.on_bad_image = on_bad_image
        # shared memory: DataLoader workers inherit it, so the main process sees their skips
        self._skip_count = mp.Value("i", 0)

    @property
    def num_skipped(self) -> int:
        """Unreadable images met so far, over all worker processes (each read counts once)."""
        return int(self._skip_count.value)

    def __getitem__(self, index: Any) -> Sample:
        sample = super().__getitem__(index)
        if not isinstance(sample, dict):
            raise TypeError(f"ImageShardDataset reads one sample at a time, got index {index!r}")
        return self.decode(sample)

    def decode(self, sample: dict[str, Any]) -> Sample:
        """A stored sample to ``(image, label)``; ``(None, label)`` for an unreadable image under "skip"."""
        label = int(sample["label"])
        path = bytes(sample["path"]).decode()
        try:
            image = decode_image(sample["image"], path)
        except BadImageError as e:
            if self.on_bad_image == "error":
                raise
            with self._skip_count.get_lock():
                self._skip_count.value += 1
            log.warning("skipping unreadable image (%d skipped so far): %s", self.num_skipped, e)
            return None, label
        seed = sample_seed(self.seed, self.current_epoch, int(sample["index"]))
        return apply_transform(self.image_transform, image, seed), label


def collate_images(items: list[Sample]) -> list[torch.Tensor]:
    """``[images [B, 3, H, W], labels [B]]``; an unreadable image's place goes to a readable one of the same batch."""
    good = [item for item in items if item[0] is not None]
    if not good:
        raise BadImageError(f"all {len(items)} images of a batch are unreadable (on_bad_image='skip' needs one "
                            "readable image per batch to stand in); see the warnings naming them")
    filled = [item if item[0] is not None else good[i % len(good)] for i, item in enumerate(items)]
    return default_collate(filled)
