"""MovedRun: a run folder moved or copied elsewhere resumes there as if it had never moved."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning import Callback, LightningModule, Trainer


class MovedRun(Callback):
    """Rebases each ``ModelCheckpoint``'s saved paths (last, best, top-k) onto the folder it writes to now.

    ``ModelCheckpoint`` records absolute paths, and when its folder differs from the recorded one it drops them
    (with a warning): a moved run then writes ``last-v1.ckpt`` beside ``last.ckpt`` and never deletes the old
    best, so the folder holds two "last" checkpoints. Only a checkpoint callback whose folder holds the file
    being resumed is rebased; a run started from another run's checkpoint is left to Lightning's rule.
    """

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        resumed = Path(trainer.ckpt_path).resolve().parent if trainer.ckpt_path else None
        states = checkpoint.get("callbacks") or {}
        for cb in trainer.checkpoint_callbacks:
            state = states.get(getattr(cb, "state_key", None))
            old, new = (state or {}).get("dirpath"), getattr(cb, "dirpath", None)
            if not old or not new or old == new or resumed != Path(new).resolve():
                continue
            state["dirpath"] = new
            for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
                state[key] = _rebase(state.get(key), old, new)
            state["best_k_models"] = {_rebase(p, old, new): v for p, v in (state.get("best_k_models") or {}).items()}


def _rebase(path: str | None, old: str, new: str) -> str | None:
    """``path`` under ``old`` moved under ``new``; other paths unchanged."""
    if not path:
        return path
    rel = os.path.relpath(path, old)
    return path if rel.startswith("..") else os.path.join(new, rel)
