"""PNG figures a person looks at: MAE reconstructions and learning curves (matplotlib, no display needed)."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

RECONSTRUCTION_COLUMNS = ("original", "masked", "reconstruction", "reconstruction + visible")


def save_image_grid(
    rows: Sequence[Sequence[torch.Tensor]], path: str | Path, titles: Sequence[str] = RECONSTRUCTION_COLUMNS
) -> Path:
    """Save rows of images ([3, H, W] in [0, 1]) as one PNG with a title over each column."""
    n_rows, n_cols = len(rows), len(rows[0])
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(2.0 * n_cols, 2.0 * n_rows), squeeze=False)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            ax = axes[r][c]
            ax.imshow(img.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_learning_curves(metrics_csv: str | Path, path: str | Path) -> Path | None:
    """Plot every ``train/*`` epoch metric and ``val/*`` metric of a Lightning CSV log against the epoch."""
    with open(metrics_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    series: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        for key, value in row.items():
            if not value or key in ("epoch", "step") or not key.startswith(("train/", "val/")):
                continue
            if key.startswith("train/") and not key.endswith("_epoch"):
                continue
            series.setdefault(key, []).append((float(row.get("epoch") or 0), float(value)))
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, points in sorted(series.items()):
        xs, ys = np.array(points).T
        ax.plot(xs, ys, marker="o", markersize=3, label=key)
    ax.set_xlabel("epoch")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
