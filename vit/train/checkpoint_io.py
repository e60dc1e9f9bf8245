"""AtomicCheckpointIO: a checkpoint file is written beside its target, fsynced and renamed into place.

Lightning's ``TorchCheckpointIO`` stages the file in ``$TMPDIR`` and moves it; across filesystems that move is a
copy into the target, which a kill can cut short.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file beside its target, fsyncs it and renames it into place.

    A reader, or a run restarted after a kill at any moment, sees the previous complete file or the new one,
    never a part. Lightning's ``TorchCheckpointIO`` stages the file in ``$TMPDIR``, so when that is another
    filesystem than the checkpoints (node-local /tmp, checkpoints on NFS or Lustre) its final move is a copy
    into the target. Remote URLs (s3://, gs://) go to Lightning's writer unchanged.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        if not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        start = time.time()
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            with suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(target.parent)
        _remove_leftovers(target, start)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (a crash after it must not bring back the old file)."""
    with suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove_leftovers(target: Path, before: float) -> None:
    """Remove temporary files of this target left by writers killed before this save began."""
    for old in target.parent.glob(f".{target.name}.*.tmp"):
        with suppress(OSError):
            if old.stat().st_mtime < before:
                old.unlink()
                log.info("removed %s, left by an interrupted checkpoint write", old)
