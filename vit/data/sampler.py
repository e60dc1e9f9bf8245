"""A sampler whose order and per-sample augmentation seeds are a pure function of (seed, epoch)."""

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler


class EpochSeededSampler(Sampler[tuple[int, int]]):
    """Yields `(index, sample_seed)` pairs; nothing depends on RNG history, so a resumed run replays exactly.

    Lightning calls `set_epoch` at every epoch start, also through its DistributedSamplerWrapper under DDP
    (which forwards the call and then shards the list, identical on every rank). A sample's seed depends on
    (seed, epoch, index), not on its position, so the same image gets the same augmentation whichever
    rank or position draws it.

    Args:
        data_source_len: number of samples in the data set.
        shuffle: permute the indices each epoch; False keeps 0..n-1 (seeds still vary by epoch).
        seed: base seed; the run's seed.
    """

    def __init__(self, data_source_len: int, shuffle: bool = True, seed: int = 0) -> None:
        if data_source_len < 0:
            raise ValueError(f"data_source_len must be >= 0, got {data_source_len}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.data_source_len = data_source_len
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and seeds the next iteration yields."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.data_source_len

    def __iter__(self) -> Iterator[tuple[int, int]]:
        n = self.data_source_len
        # Two independent streams from one SeedSequence([seed, epoch]): changing shuffle keeps the seeds.
        order_ss, seed_ss = np.random.SeedSequence([self.seed, self.epoch]).spawn(2)
        order = np.random.default_rng(order_ss).permutation(n) if self.shuffle else np.arange(n)
        seeds = np.random.default_rng(seed_ss).integers(0, 2**31 - 1, size=n)
        for i in order.tolist():
            yield i, int(seeds[i])
