"""PNG figures a person looks at: MAE reconstructions, learning curves, confusion matrices, attention maps."""

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
    return _save(fig, path)


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
    return _save(fig, path)


def save_confusion_matrix(
    matrix: torch.Tensor, class_names: Sequence[str], path: str | Path, title: str = ""
) -> Path:
    """Save a confusion matrix (rows: true class, columns: predicted) as a PNG, coloured by row fraction.

    Counts are written in the cells and class names on the axes for up to 20 classes.
    """
    counts = matrix.detach().cpu().double()
    frac = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
    n = counts.shape[0]
    side = min(max(4.0, 0.45 * n + 2.0), 24.0)
    fig, ax = plt.subplots(figsize=(side, side))
    im = ax.imshow(frac.numpy(), cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if n <= 20:
        ticks = np.arange(n)
        ax.set_xticks(ticks, labels=list(class_names), rotation=90 if max(map(len, class_names)) > 3 else 0)
        ax.set_yticks(ticks, labels=list(class_names))
        for i in range(n):
            for j in range(n):
                if counts[i, j] > 0:
                    ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=8,
                            color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    acc = counts.diag().sum() / counts.sum().clamp_min(1)
    ax.set_title(f"{title + ': ' if title else ''}top-1 {100 * acc:.2f}% of {int(counts.sum())} images", fontsize=10)
    return _save(fig, path)


def save_attention_overlay(
    image: torch.Tensor, maps: dict[str, torch.Tensor], path: str | Path, title: str = ""
) -> Path:
    """Save an image ([3, H, W] in [0, 1]) beside each attention map ([h, w] patch grid) laid over it.

    Each map is scaled to [0, 1] on its own and upsampled bilinearly to the image size.
    """
    img = image.detach().float().clamp(0, 1).cpu()
    H, W = img.shape[-2:]
    fig, axes = plt.subplots(1, 1 + len(maps), figsize=(2.6 * (1 + len(maps)), 2.8), squeeze=False)
    panels = [("image", None), *maps.items()]
    for ax, (name, amap) in zip(axes[0], panels, strict=True):
        ax.imshow(img.permute(1, 2, 0).numpy(), interpolation="nearest")
        if amap is not None:
            a = amap.detach().float().cpu()
            a = (a - a.min()) / (a.max() - a.min()).clamp_min(1e-12)
            a = torch.nn.functional.interpolate(a[None, None], size=(H, W), mode="bilinear", align_corners=False)
            ax.imshow(a[0, 0].numpy(), cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def _save(fig: plt.Figure, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
