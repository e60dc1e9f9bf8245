"""ResumableCSVLogger: Lightning's CSV logger that continues a run's ``metrics.csv`` instead of replacing it.

Lightning's ``CSVLogger`` deletes ``metrics.csv`` when its version folder already has one, so a resumed run
that reuses its version would lose the first part of its history (and one that does not starts ``version_N+1``,
whose learning curves begin at the resumed epoch). ``vit fit --ckpt_path ...`` passes the checkpoint's version
(stored by ``vit.lightning_cli.LoggerVersions``), and this logger appends to the file it finds there.
"""

from __future__ import annotations

import csv
from typing import Any

from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` whose version folder, when it exists, is continued: old rows and columns kept, new rows
    appended. Rows are also flushed at every checkpoint save, so ``metrics.csv`` holds at least what
    ``last.ckpt`` does (a run killed later may log the steps after that checkpoint twice; the learning curves
    keep the last value of each epoch)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:  # CSVLogger's own property, over its _experiment (listed there too)
        if self._experiment is None:
            get_filesystem(self.root_dir).makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(log_dir=self.log_dir)
        return self._experiment

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        self.save()


class _ContinuingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:  # the writer's private hook (vit.train.lightning_private lists it)
        """An existing ``metrics.csv`` is kept: its header becomes the known columns, new rows go below."""
        fs = get_filesystem(self.metrics_file_path)
        if fs.isfile(self.metrics_file_path):
            with fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = next(csv.reader(f), [])
