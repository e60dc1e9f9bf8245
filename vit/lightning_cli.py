"""VitCLI: the LightningCLI behind ``vit fit | validate | test | predict`` and ``vit plan``.

- Every run starts from ``configs/base/trainer.yaml`` (trainer defaults, CSV logger, the guard callbacks), applied
  as jsonargparse's ``default_config_files`` before any ``--config``; a recipe is a diff over it and appends
  callbacks with ``callbacks+:``.
- Outputs come from one place, ``trainer.default_root_dir``: every logger's ``save_dir`` is linked to it, and a
  ``ModelCheckpoint`` without a ``dirpath`` writes to ``<default_root_dir>/checkpoints``, where
  ``--ckpt_path last`` looks.
- A resumed run continues the checkpoint's wandb run: its id goes into ``WandbLogger(id=..., resume="allow")``
  before the loggers are made.
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace
from lightning import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from vit.train.architecture_check import check_checkpoint_matches
from vit.train.checkpoint_io import AtomicCheckpointIO
from vit.train.exact_resume import ExactResume
from vit.train.skipped_images import SkippedImages

BASE_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "base" / "trainer.yaml"
LAST_CHECKPOINT = re.compile(r"^last(-v\d+)?\.ckpt$")  # ModelCheckpoint's last name and its version suffix


class ConfigError(ValueError):
    """A configuration the run cannot start with; ``vit`` prints its message alone and exits with status 2."""


class VitCLI(LightningCLI):
    """LightningCLI over the base config: model and data module chosen by ``class_path`` (data defaults to
    ``ImageDataModule``), values linked once, outputs under ``trainer.default_root_dir``."""

    def __init__(self, model_class: type[LightningModule] = LightningModule,
                 datamodule_class: type[LightningDataModule] = LightningDataModule, *,
                 parser_kwargs: dict[str, Any] | None = None, run: bool = True, **kwargs: Any) -> None:
        base = {"default_config_files": [str(BASE_CONFIG)]}
        parser_kwargs = dict(parser_kwargs or {})
        if run:  # the subcommand parsers read the config files; without subcommands the main parser does
            for name in self.subcommands():
                parser_kwargs[name] = {**base, **parser_kwargs.get(name, {})}
        else:
            parser_kwargs = {**base, **parser_kwargs}
        self.resume_checkpoint: dict[str, Any] | None = None
        # models and data modules are chosen by class_path; the base config names vit.data.ImageDataModule
        kwargs.update(subclass_mode_model=True, subclass_mode_data=True)
        super().__init__(model_class, datamodule_class, parser_kwargs=parser_kwargs, run=run, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.init_args.img_size", "model.init_args.img_size")
        # jsonargparse sets a link into a list of classes on every item with that key: each logger's save_dir. A link
        # target cannot tell a set value from a default (WandbLogger's is "."), so logs always follow the root
        parser.link_arguments("trainer.default_root_dir", "trainer.logger.init_args.save_dir", compute_fn=_log_dir)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.get("trainer")
        if trainer is None:
            return
        if trainer.get("precision") is None:
            trainer["precision"] = _default_precision(trainer.get("accelerator"))
        root = trainer.get("default_root_dir") or "."
        dirs = []
        for item in _class_items(trainer.get("callbacks"), ModelCheckpoint):
            if item.init_args.get("dirpath") is None:
                item.init_args.dirpath = str(Path(root) / "checkpoints")
            dirs.append(Path(item.init_args.dirpath))
        if self.subcommand == "fit" and config.get("ckpt_path"):
            self.resume_checkpoint = _read_resume(config["ckpt_path"], dirs)
            run_id = (self.resume_checkpoint or {}).get("wandb_run_id")
            for item in _class_items(trainer.get("logger"), WandbLogger) if run_id else []:
                if item.init_args.get("id") is None and item.init_args.get("version") is None:
                    item.init_args.update(Namespace(id=run_id, resume="allow"))
                    rank_zero_info(f"wandb: continuing run {run_id}")

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as e:  # jsonargparse wraps the model's or data's own message in its union report
            raise ConfigError(_root_message(e)) from e

    def before_fit(self) -> None:
        self.trainer.callbacks.append(WandbRunId())
        _install_guards(self.trainer)
        ckpt, self.resume_checkpoint = self.resume_checkpoint, None
        if ckpt is not None:
            try:
                check_checkpoint_matches(_with_network(self.model, self.datamodule), ckpt,
                                         f"--ckpt_path {self.config_init[self.subcommand].ckpt_path}")
            except ValueError as e:
                raise ConfigError(str(e)) from e
            _skip_init_from(self.model)

    def after_fit(self) -> None:
        _report_outputs(self.trainer)

    def before_validate(self) -> None:
        if self.config_init[self.subcommand].get("ckpt_path"):
            _skip_init_from(self.model)

    before_test = before_predict = before_validate


class WandbRunId(Callback):
    """Stores the wandb run id in checkpoints so a resumed run continues the same wandb run."""

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and logger.version:
                checkpoint["wandb_run_id"] = logger.version


def _log_dir(default_root_dir: str | None) -> str:
    """Every logger's ``save_dir``: the run's root, as Lightning's own default logger does."""
    return default_root_dir or "."


def _class_items(value: Any, base: type) -> list[Namespace]:
    """The ``class_path`` / ``init_args`` items of a callbacks or logger setting whose class derives from ``base``."""
    items = value if isinstance(value, list) else [value]
    items = [i for i in items if isinstance(i, Namespace) and i.get("class_path")]
    for item in items:
        if item.get("init_args") is None:
            item.init_args = Namespace()
    return [i for i in items if issubclass(_import(i.class_path), base)]


def _import(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _read_resume(ckpt_path: str, dirs: list[Path]) -> dict[str, Any] | None:
    """The checkpoint a resume starts from, picked as Lightning does (``last``: the newest ``last*.ckpt``), or None."""
    if ckpt_path == "last":
        found = [p for d in dict.fromkeys(dirs) if d.is_dir() for p in d.iterdir() if LAST_CHECKPOINT.match(p.name)]
        if not found:
            where = ", ".join(str(d) for d in dict.fromkeys(dirs)) or "(no checkpoint callback)"
            rank_zero_info(f"--ckpt_path last: nothing to resume under {where}; starting from scratch")
            return None
        ckpt_path = str(max(found, key=lambda p: p.stat().st_mtime))
    elif not Path(ckpt_path).is_file():
        return None  # not a local file (a URL, "hpc"): Lightning resolves it, and reports what is missing
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    rank_zero_info(f"resuming from {ckpt_path}: epoch {ckpt.get('epoch')}, global step {ckpt.get('global_step')}")
    return ckpt


def _with_network(model: LightningModule, datamodule: Any) -> LightningModule:
    """``model`` with its network, to compare with a checkpoint. A classifier builds it in ``configure_model``, after
    this check; a copy is built here instead, for the data's classes on the meta device."""
    if getattr(model, "model", None) is not None or not hasattr(model, "build_network"):
        return model
    accepted = inspect.signature(type(model)).parameters  # hparams also hold LightningCLI's _class_path
    with torch.device("meta"):
        copy = type(model)(**{k: v for k, v in model.hparams.items() if k in accepted})
        copy.build_network(datamodule.num_classes, model.hparams.get("class_names") or datamodule.class_names)
    copy.hparams.update({k: v for k, v in model.hparams.items() if k not in accepted})
    return copy


def _skip_init_from(model: LightningModule) -> None:
    """Weights restored from --ckpt_path replace a classifier's ``init_from``: do not read (or need) that file."""
    if getattr(model, "init_from", None):
        rank_zero_info(f"weights come from --ckpt_path; model.init_from ({model.init_from}) is not read")
        model.init_from = None


def _install_guards(trainer: Trainer) -> None:
    """Exact resume (per-step RNG seeds) and atomic checkpoint files for every run, unless configured otherwise."""
    if not any(isinstance(cb, ExactResume) for cb in trainer.callbacks):
        trainer.callbacks.append(ExactResume())
    trainer.callbacks.append(SkippedImages())
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()


def _default_precision(accelerator: Any) -> str:
    """bf16-mixed when the run gets a CUDA GPU with bf16, else 32-true (bf16 autocast is slow on CPUs)."""
    gpu = accelerator in (None, "auto", "gpu", "cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return "bf16-mixed" if gpu else "32-true"


def _root_message(e: BaseException) -> str:
    """The innermost message of an exception chain: the model's or data module's own words."""
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    return str(e)


def _report_outputs(trainer: Trainer) -> None:
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
