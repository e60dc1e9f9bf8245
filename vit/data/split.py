"""A fixed, stratified train/val split of labelled samples (scikit-learn's `train_test_split`)."""

from collections.abc import Sequence

import numpy as np


def stratified_split(labels: Sequence[int], val_fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Split indices so val holds about `val_fraction` of every class; both lists come back sorted.

    The split depends on `seed` alone. A class with a single sample keeps it for training; a split that
    would leave any other class without a training sample is a ValueError naming the class.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    alone = np.isin(labels, classes[counts == 1])
    train, pool = np.flatnonzero(alone).tolist(), np.flatnonzero(~alone)
    if val_fraction == 0.0 or len(pool) == 0:
        return sorted(train + pool.tolist()), []
    # scikit-learn pulls in scipy (~0.5 s): import it only when a split is asked for.
    from sklearn.model_selection import train_test_split

    try:
        more_train, val = train_test_split(pool, test_size=val_fraction, random_state=seed, stratify=labels[pool])
    except ValueError as e:
        raise ValueError(
            f"cannot hold out val_fraction={val_fraction} of {len(pool)} samples in {len(classes)} classes: {e}"
        ) from e
    train += more_train.tolist()
    if empty := sorted(set(classes.tolist()) - set(labels[train].tolist())):
        raise ValueError(
            f"val_fraction={val_fraction} leaves class(es) {empty} without a training sample; lower val_fraction"
        )
    return sorted(train), sorted(val.tolist())
