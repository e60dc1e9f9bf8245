"""Every private Lightning attribute vitkit touches, one function each, written against Lightning 2.6.6.

Lightning offers no public way to do these things; each function names the upstream issue that would make it
unneeded, or says that none was found. ``PRIVATE_ATTRIBUTES`` lists what they read (and the private hooks that
vit.train.csv_logger and vit.train.model_summary override), so tests/test_lightning_private.py fails by name when
an installed Lightning lacks one, and every access goes through ``_private``, which does the same at run time.
"""

from __future__ import annotations

from typing import Any

import lightning
from lightning import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn

LIGHTNING_VERSION = "2.6.6"
# owner (how the test builds one) -> the private attributes this module reads or writes on it
PRIVATE_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "trainer.fit_loop": ("_data_fetcher", "_combined_loader_states_to_load"),
    "ModelCheckpoint": ("_last_global_step_saved", "_save_last_checkpoint", "_monitor_candidates"),
    "ThroughputMonitor": ("_update",),
    "ModelSummary": ("_summary", "_max_depth"),
    "CSVLogger": ("_experiment",),
    "ExperimentWriter": ("_check_log_dir_exists",),
}


def restart_train_iterator(trainer: Trainer) -> bool:
    """Remake the fit loop's train iterator, so it starts from its loaders' current state; False before setup.

    Also marks the checkpoint's loader states as loaded, so Lightning never loads them a second time.
    """
    # Lightning 2.6.6, issue #20550 (open): when configure_optimizers reads estimated_stepping_batches, the train
    # iterator is made before the checkpoint is restored and the saved loader states are never loaded. The caller
    # loads them through the loaders' public load_state_dict; there is no public way to restart the iterator.
    fit_loop = trainer.fit_loop
    fetcher = _private(fit_loop, "_data_fetcher")
    if fetcher is None:
        return False
    _private(fit_loop, "_combined_loader_states_to_load")
    fit_loop._combined_loader_states_to_load = []
    iter(fetcher)
    return True


def last_saved_step(checkpoint: ModelCheckpoint) -> int:
    """The global step of the checkpoint callback's latest save (0 before any)."""
    # Lightning 2.6.6: ModelCheckpoint keeps the step of its last save only in this attribute; #9567 (open) asks
    # for graceful pre-emption, which would make LastCheckpoint's SIGTERM save, and this read, unneeded
    return _private(checkpoint, "_last_global_step_saved")


def save_last_now(checkpoint: ModelCheckpoint, trainer: Trainer) -> None:
    """Write the callback's ``last.ckpt`` now, through ModelCheckpoint's own routine."""
    # Lightning 2.6.6, #9567 (open): no public "save last now". This routine keeps last_model_path, the version
    # counter, save_last="link" and the removal of the previous file consistent; trainer.save_checkpoint would not.
    candidates = _private(checkpoint, "_monitor_candidates")(trainer)
    _private(checkpoint, "_save_last_checkpoint")(trainer, candidates)


def throughput_update(monitor: Any, trainer: Trainer, pl_module: Any, batch: Any) -> None:
    """Count a validation batch's time in ``ThroughputMonitor`` (so it leaves the training rate) without logging."""
    # Lightning 2.6.6, no upstream issue found: the monitor's validation hook both counts and logs (at evaluation
    # steps, which go back relative to training steps and which wandb refuses); counting alone has no public call
    loop = trainer.validate_loop if trainer.state.fn == TrainerFn.VALIDATING else trainer.fit_loop.epoch_loop.val_loop
    step = loop.batch_progress.total.ready
    _private(monitor, "_update")(trainer, pl_module, batch, step)


def summary_max_depth(callback: Any) -> int:
    """The ``max_depth`` a ``ModelSummary`` callback was made with."""
    # Lightning 2.6.6, no upstream issue found: the callback keeps it only here. vit.train.model_summary also
    # overrides the callback's ``_summary`` hook, the one place that builds the summary table (listed above)
    return _private(callback, "_max_depth")


def _private(obj: Any, name: str) -> Any:
    if not hasattr(obj, name):
        raise AttributeError(
            f"Lightning {lightning.__version__} has no {type(obj).__name__}.{name}, which "
            f"vit/train/lightning_private.py uses (written for Lightning {LIGHTNING_VERSION}); see the comment there"
        )
    return getattr(obj, name)
