"""PNG figures a person looks at: MAE reconstructions, learning curves, attention maps.

Each figure is a `matplotlib.figure.Figure` on its own Agg canvas, never a pyplot figure, so drawing one leaves
the user's backend and open figures alone.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

RECONSTRUCTION_COLUMNS = ("original", "masked", "reconstruction", "reconstruction + visible")
DPI = 100


def save_image_grid(
    rows: Sequence[Sequence[torch.Tensor]], path: str | Path, titles: Sequence[str] = RECONSTRUCTION_COLUMNS,
    title: str = "",
) -> Path:
    """Save rows of images ([3, H, W] in [0, 1]) as one PNG with a title over each column (and ``title`` on top)."""
    n_rows, n_cols = len(rows), len(rows[0])
    fig = Figure(figsize=(2.0 * n_cols, 2.0 * n_rows))
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            ax = axes[r][c]
            ax.imshow(img.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def save_learning_curves(metrics_csv: str | Path, path: str | Path) -> Path | None:
    """Save `learning_curves_figure` of a Lightning CSV log as a PNG; None when the log has no epoch metrics."""
    fig = learning_curves_figure(metrics_csv)
    return None if fig is None else _save(fig, path)


def learning_curves_figure(metrics_csv: str | Path, max_cols: int = 3) -> Figure | None:
    """One panel per metric (loss, acc1, ...) against the epoch, with its train and val series.

    Series are the ``train/<metric>_epoch`` and ``val/<metric>`` columns; step-level columns are left out. An
    epoch logged twice (a run killed after logging it and resumed from an earlier checkpoint) keeps its last
    value. Each panel's title gives the last epoch's values.
    """
    panels = _epoch_series(metrics_csv)
    if not panels:
        return None
    n_cols = min(max_cols, len(panels))
    n_rows = math.ceil(len(panels) / n_cols)
    fig = Figure(figsize=(4.5 * n_cols, 3.5 * n_rows))
    for i, (metric, series) in enumerate(sorted(panels.items())):
        ax = fig.add_subplot(n_rows, n_cols, i + 1)
        last = []
        for split, points in sorted(series.items(), key=lambda kv: kv[0] != "train"):
            epochs, values = zip(*sorted(dict(points).items()), strict=True)
            ax.plot(epochs, values, marker="o", markersize=3, label=split)
            last.append(f"{split} {values[-1]:.4g}")
        ax.set_title(f"{metric}, epoch {max(e for p in series.values() for e, _ in p):g}: {', '.join(last)}",
                     fontsize=10)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def save_attention_overlay(
    image: torch.Tensor, maps: dict[str, torch.Tensor], path: str | Path, title: str = ""
) -> Path:
    """Save an image ([3, H, W] in [0, 1]) beside each attention map ([h, w] patch grid) laid over it.

    Each map is scaled to [0, 1] on its own and upsampled bilinearly to the image size.
    """
    img = image.detach().float().clamp(0, 1).cpu()
    H, W = img.shape[-2:]
    fig = Figure(figsize=(2.6 * (1 + len(maps)), 2.8))
    axes = fig.subplots(1, 1 + len(maps), squeeze=False)
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


def _epoch_series(metrics_csv: str | Path) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """{metric: {"train" | "val": [(epoch, value), ...]}} from the epoch-level columns of a Lightning CSV log."""
    with open(metrics_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    panels: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for row in rows:
        for key, value in row.items():
            split, _, metric = (key or "").partition("/")
            if not value or split not in ("train", "val") or (split == "train" and not metric.endswith("_epoch")):
                continue
            metric = metric.removesuffix("_epoch")
            panels.setdefault(metric, {}).setdefault(split, []).append((float(row.get("epoch") or 0), float(value)))
    return panels


def _save(fig: Figure, path: str | Path) -> Path:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path
