"""ConfusionReport: after each validation and test epoch, the confusion matrix as a PNG and per-class accuracy.

It reads the metrics the classifier updates (torchmetrics' ``MulticlassConfusionMatrix`` and per-class
``MulticlassAccuracy(average=None)``, synced over processes), draws the matrix with torchmetrics' own
``.plot()``, writes ``confusion/<stage>.png`` and ``confusion/<stage>_per_class.csv`` under the log folder,
and outside ``fit`` prints the per-class table.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

MAX_TABLE_ROWS = 40
MAX_LABELLED_CLASSES = 20


class ConfusionReport(Callback):
    """Confusion-matrix PNG, per-class CSV and table for an ``ImageClassifier`` (it installs this callback)."""

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._report(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._report(trainer, pl_module, "test")

    def _report(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        metrics = pl_module.val_metrics if stage == "val" else pl_module.test_metrics
        confusion, per_class = metrics["confusion"], metrics["per_class"]
        matrix, acc = confusion.compute().cpu(), per_class.compute().cpu()  # every rank: they sync
        if trainer.sanity_checking:
            confusion.reset()
            per_class.reset()
            return
        counts = matrix.sum(dim=1)
        rows = [(str(n), float(a) if c else math.nan, int(c))
                for n, a, c in zip(pl_module.class_names, acc, counts, strict=True)]
        pl_module.last_per_class = rows
        folder = Path(trainer.log_dir or trainer.default_root_dir) / "confusion"
        title = f"{stage}, epoch {trainer.current_epoch}" if trainer.state.fn == "fit" else stage
        self._save(confusion, matrix, pl_module.class_names, rows, folder, stage, title)
        confusion.reset()
        per_class.reset()
        if trainer.state.fn != "fit":
            rank_zero_info(f"{per_class_table(stage, rows)}\nconfusion matrix: {folder / f'{stage}.png'} "
                           f"(per class: {stage}_per_class.csv)")

    @rank_zero_only
    def _save(self, confusion, matrix: torch.Tensor, names: list[str], rows: list[tuple[str, float, int]],
              folder: Path, stage: str, title: str) -> None:
        from matplotlib.figure import Figure

        folder.mkdir(parents=True, exist_ok=True)
        n = len(names)
        side = min(max(4.0, 0.45 * n + 2.0), 24.0)
        fig = Figure(figsize=(side, side))
        ax = fig.add_subplot()
        labelled = n <= MAX_LABELLED_CLASSES
        confusion.plot(val=matrix, ax=ax, add_text=labelled, labels=list(names) if labelled else None)
        total = int(matrix.sum())
        top1 = float(matrix.diag().sum()) / max(total, 1)
        ax.set_title(f"{title}: top-1 {100 * top1:.2f}% of {total} images", fontsize=10)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        fig.tight_layout()
        fig.savefig(folder / f"{stage}.png", dpi=100)
        with open(folder / f"{stage}_per_class.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["class", "accuracy", "images"])
            writer.writerows([(name, f"{a:.4f}", c) for name, a, c in rows])


def per_class_table(stage: str, rows: list[tuple[str, float, int]]) -> str:
    """Per-class accuracy as text; with many classes the worst and best ``MAX_TABLE_ROWS / 2`` of each."""
    shown, note = rows, ""
    if len(rows) > MAX_TABLE_ROWS:
        ranked = sorted((r for r in rows if r[2]), key=lambda r: r[1])
        half = MAX_TABLE_ROWS // 2
        shown = ranked[:half] + ranked[-half:]
        note = f"  ({half} worst and {half} best of {len(rows)} classes; all in confusion/{stage}_per_class.csv)"
    width = max(5, *(len(n) for n, _, _ in shown))
    lines = [f"per-class accuracy ({stage}, {sum(c for _, _, c in rows)} images):", note,
             f"  {'class':<{width}}  {'acc1':>7}  {'images':>6}"]
    lines += [f"  {n:<{width}}  {'-' if not c else f'{100 * a:6.2f}%':>7}  {c:>6}" for n, a, c in shown]
    return "\n".join(line for line in lines if line)
