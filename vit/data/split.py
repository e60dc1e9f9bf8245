"""A fixed, stratified train/val split of labelled samples."""

from collections.abc import Sequence

import numpy as np


def stratified_split(
    labels: Sequence[int], val_fraction: float, seed: int = 0
) -> tuple[list[int], list[int]]:
    """Split indices so each class gives round(val_fraction * count) samples to val, at least one to train.

    The choice within a class is a permutation from `seed` alone; both lists come back sorted.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = min(round(val_fraction * len(idx)), len(idx) - 1)
        val += idx[:n_val].tolist()
        train += idx[n_val:].tolist()
    return sorted(train), sorted(val)
