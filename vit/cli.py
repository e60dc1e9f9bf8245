"""The ``vit`` command: LightningCLI for fit / validate / test / predict, plus export, bench and plan verbs."""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings
from pathlib import Path

import torch
from lightning import Callback, LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from vit.data import ImageDataModule
from vit.train.callbacks import SkippedImages
from vit.train.guards import AtomicCheckpointIO, ExactResume, check_checkpoint_matches

# verbs outside LightningCLI: name -> module with ``main(argv) -> int``
COMMANDS = {"export": "vit.export.command", "bench": "vit.bench", "plan": "vit.plan"}

log = logging.getLogger("vit")


class VitCLI(LightningCLI):
    """LightningCLI with the data module fixed, the model chosen by ``class_path``, and values linked once."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.img_size", "model.init_args.img_size")

    def before_instantiate_classes(self) -> None:
        trainer = (self.config[self.subcommand] if self.subcommand else self.config).get("trainer")
        if trainer is not None and trainer.get("precision") is None:
            trainer["precision"] = _default_precision(trainer.get("accelerator"))

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as e:  # jsonargparse wraps the model's or data's own message in its union report
            raise ConfigError(_root_message(e)) from e

    def before_fit(self) -> None:
        self.trainer.callbacks.append(WandbRunId())
        _install_guards(self.trainer)
        ckpt_path = self.config_init[self.subcommand].get("ckpt_path")
        ckpt = _resolve_resume(self.trainer, ckpt_path)
        if ckpt is not None:
            try:
                check_checkpoint_matches(self.model, ckpt, f"--ckpt_path {ckpt_path}")
            except ValueError as e:
                raise ConfigError(str(e)) from e
            _reattach_wandb(self.trainer, ckpt)
            _skip_init_from(self.model)

    def after_fit(self) -> None:
        _report_outputs(self.trainer)

    def before_validate(self) -> None:
        if self.config_init[self.subcommand].get("ckpt_path"):
            _skip_init_from(self.model)

    before_test = before_predict = before_validate


class ConfigError(ValueError):
    """A configuration the run cannot start with; ``vit`` prints its message alone and exits with status 2."""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vit`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        return int(importlib.import_module(COMMANDS[argv[0]]).main(argv[1:]) or 0)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not os.environ.get("WANDB_API_KEY") and not (Path.home() / ".netrc").is_file():
        os.environ.setdefault("WANDB_MODE", "offline")  # no key: wandb logs locally, never blocks on a login
    for pattern in (".*'set_vital' is deprecated.*", r".*isinstance\(treespec, LeafSpec\).*",
                    ".*LightningCLI's args parameter is intended.*",  # main always passes argv as args
                    # ImageClassifier builds its network in configure_model; it is not sharded
                    ".*WeightAveraging callback with a model that overrides the configure_model.*"):
        warnings.filterwarnings("ignore", message=pattern)  # third-party deprecation noise, not the user's concern
    torch.set_float32_matmul_precision("high")
    try:
        VitCLI(
            LightningModule,
            ImageDataModule,
            subclass_mode_model=True,
            args=argv,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"description": "vitkit: pretrain, fine-tune, evaluate and use Vision Transformers."},
        )
    except ConfigError as e:
        log.error("vit: error: %s", e)
        return 2
    return 0


def _checkpoint_callback(trainer) -> ModelCheckpoint | None:
    """The ModelCheckpoint that writes last.ckpt (else the first one)."""
    found = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)]
    return next((cb for cb in found if cb.save_last), found[0] if found else None)


class WandbRunId(Callback):
    """Stores the wandb run id in checkpoints so a resumed run continues the same wandb run."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and logger.version:
                checkpoint["wandb_run_id"] = logger.version


def _resolve_resume(trainer, ckpt_path: str | None) -> dict | None:
    """Say what a resume will start from (or that there is nothing to resume); return the checkpoint's dict."""
    if ckpt_path is None:
        return None
    if ckpt_path == "last":
        cb = _checkpoint_callback(trainer)
        dirpath = Path(cb.dirpath) if cb is not None and cb.dirpath else None
        last = dirpath / "last.ckpt" if dirpath is not None else None
        if last is None or not last.is_file():
            rank_zero_info(f"--ckpt_path last: nothing to resume under {dirpath}; starting from scratch")
            return None
        ckpt_path = str(last)
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    rank_zero_info(f"resuming from {ckpt_path}: epoch {ckpt.get('epoch')}, global step {ckpt.get('global_step')}")
    return ckpt


def _reattach_wandb(trainer, ckpt: dict) -> None:
    run_id = ckpt.get("wandb_run_id")
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and run_id and logger._experiment is None and not logger._id:
            # the experiment is created lazily at fit start: point it at the checkpoint's run first
            logger._wandb_init.update(id=run_id, resume="allow")
            logger._id = run_id
            rank_zero_info(f"wandb: continuing run {run_id}")


def _skip_init_from(model: LightningModule) -> None:
    """Weights restored from --ckpt_path replace a classifier's ``init_from``: do not read (or need) that file."""
    if getattr(model, "init_from", None):
        rank_zero_info(f"weights come from --ckpt_path; model.init_from ({model.init_from}) is not read")
        model.init_from = None


def _install_guards(trainer) -> None:
    """Exact resume (per-step RNG seeds) and atomic checkpoint files for every run, unless configured otherwise."""
    if not any(isinstance(cb, ExactResume) for cb in trainer.callbacks):
        trainer.callbacks.append(ExactResume())
    trainer.callbacks.append(SkippedImages())
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()


def _default_precision(accelerator) -> str:
    """bf16-mixed when the run gets a CUDA GPU with bf16, else 32-true (bf16 autocast is slow on CPUs)."""
    gpu = accelerator in (None, "auto", "gpu", "cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return "bf16-mixed" if gpu else "32-true"


def _root_message(e: BaseException) -> str:
    """The innermost message of an exception chain: the model's or data module's own words."""
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    return str(e)


def _report_outputs(trainer) -> None:
    checkpoints = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)]
    lines = [f"  last checkpoint: {p}" for p in dict.fromkeys(cb.last_model_path for cb in checkpoints) if p]
    for cb in checkpoints:
        if cb.best_model_path:
            lines.append(f"  best checkpoint: {cb.best_model_path} ({cb.monitor} = {cb.best_model_score:.4g})"
                         if cb.best_model_score is not None else f"  best checkpoint: {cb.best_model_path}")
    if trainer.log_dir:
        log_dir = Path(trainer.log_dir).resolve()
        metrics = log_dir / "metrics.csv"
        if metrics.is_file():
            lines.append(f"  metrics:         {metrics}")
            from vit.train.figures import save_learning_curves

            curves = save_learning_curves(metrics, log_dir / "learning_curves.png")
            if curves is not None:
                lines.append(f"  learning curves: {curves}")
        recon = log_dir / "reconstructions"
        if recon.is_dir():
            lines.append(f"  reconstructions: {recon}")
    if lines:
        rank_zero_info("outputs:\n" + "\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
