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

from vit.errors import RunFaultError

log = logging.getLogger(__name__)


class CheckpointWriteError(RunFaultError):
    """A checkpoint that could not be written (a full disk, a folder made read-only during the run)."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file beside its target, fsyncs it and renames it into place.

    A reader, or a run restarted after a kill at any moment, sees the previous complete file or the new one,
    never a part; a write that fails (a full disk) is a ``CheckpointWriteError`` naming the file. Lightning's
    ``TorchCheckpointIO`` stages the file in ``$TMPDIR``, so when that is another filesystem than the
    checkpoints (node-local /tmp, checkpoints on NFS or Lustre) its final move is a copy into the target.
    Remote URLs (s3://, gs://) go to Lightning's writer unchanged.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        if not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        target = Path(path)
        start = time.time()
        tmp = None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException as e:
            if tmp is not None:
                with suppress(OSError):
                    os.unlink(tmp)
            if isinstance(e, OSError) or isinstance(e.__cause__, OSError):  # torch.save wraps some in RuntimeError
                raise CheckpointWriteError(_write_failure(target, e)) from e
            raise
        _fsync_dir(target.parent)
        _remove_leftovers(target, start)


def _write_failure(target: Path, e: BaseException) -> str:
    cause = e if isinstance(e, OSError) else e.__cause__
    reason = getattr(cause, "strerror", None) or str(cause)
    others = sorted(p.name for p in target.parent.glob("*.ckpt") if p != target)
    if target.is_file():
        kept = f"the previous {target.name} is intact"
    elif others:
        kept = f"the checkpoints already there are intact ({', '.join(others[:3])})"
    else:
        kept = "no checkpoint was there before"
    return f"could not write checkpoint {target} ({reason}); {kept}"


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
