"""VitCLI: the LightningCLI behind ``vit fit | validate | test | predict`` and ``vit plan``.

- Every run starts from ``configs/base/trainer.yaml`` (trainer defaults, CSV logger, the guard callbacks), applied
  as jsonargparse's ``default_config_files`` before any ``--config``; a recipe is a diff over it and appends
  callbacks with ``callbacks+:``.
- Outputs come from one place, ``trainer.default_root_dir``: every logger's ``save_dir`` is linked to it, and a
  ``ModelCheckpoint`` without a ``dirpath`` writes to ``<default_root_dir>/checkpoints``, where
  ``--ckpt_path last`` looks.
- One folder per run: a fit without ``--ckpt_path`` refuses a checkpoint folder that already holds checkpoints
  (another run's); a resumed run continues the checkpoint's CSV version folder (``ResumableCSVLogger`` appends
  to its ``metrics.csv``) and its wandb run (the id goes into ``WandbLogger(id=..., resume="allow")``), both
  set before the loggers are made.
"""

from __future__ import annotations

import importlib
import inspect
import re
import tempfile
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

from vit.errors import BadInputError
from vit.export.read import read_checkpoint
from vit.train.architecture_check import check_checkpoint_matches, check_module_class
from vit.train.checkpoint_io import AtomicCheckpointIO
from vit.train.csv_logger import ResumableCSVLogger
from vit.train.exact_resume import ExactResume
from vit.train.init_from import read_source
from vit.train.last_checkpoint import LastCheckpoint
from vit.train.run_folder import MovedRun
from vit.train.schedule import RunLength
from vit.train.skipped_images import SkippedImages

BASE_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "base" / "trainer.yaml"
LAST_CHECKPOINT = re.compile(r"^last(-v\d+)?\.ckpt$")  # ModelCheckpoint's last name and its version suffix


class ConfigError(BadInputError):
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
        parser_kwargs.setdefault("exit_on_error", False)  # a parse error is raised, for ``vit``'s one-line report
        self.resume_checkpoint: dict[str, Any] | None = None
        self.model_asked: Namespace | None = None  # the model config as given, before a checkpoint's hparams
        # models and data modules are chosen by class_path; the base config names vit.data.ImageDataModule
        kwargs.update(subclass_mode_model=True, subclass_mode_data=True)
        super().__init__(model_class, datamodule_class, parser_kwargs=parser_kwargs, run=run, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.init_args.img_size", "model.init_args.img_size")
        # jsonargparse sets a link into a list of classes on every item with that key: each logger's save_dir. A link
        # target cannot tell a set value from a default (WandbLogger's is "."), so logs always follow the root
        parser.link_arguments("trainer.default_root_dir", "trainer.logger.init_args.save_dir", compute_fn=_log_dir)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then read an explicit ``--ckpt_path`` file (one clear error for a bad file or another module's
        checkpoint) before LightningCLI merges its hyperparameters into the model config."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand) if subcommand else None
        path = config.get("ckpt_path") if isinstance(config, Namespace) else None
        if not path or _special_checkpoint(path):
            return
        if not Path(path).is_file():
            raise BadInputError(f"--ckpt_path {path}: no such file")
        check_module_class(read_resumable(path), _class_path(config.get("model")), f"--ckpt_path {path}")
        if subcommand == "fit" and isinstance(config.get("model"), Namespace):
            self.model_asked = config.model.clone()  # a resume builds what the config says, then checks it matches

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
        if self.model_asked is not None:  # LightningCLI replaced it with the checkpoint's hyperparameters
            config["model"] = self.model_asked
        last = _newest_last(dirs) if config.get("ckpt_path") == "last" else None
        if last is not None:  # the file announced is the file restored: Lightning gets its path
            config["ckpt_path"] = last
            ckpt = read_resumable(last)
            check_module_class(ckpt, _class_path(config.get("model")), f"--ckpt_path last ({last})")
            if self.subcommand != "fit":
                self.resume_checkpoint = ckpt  # checked against the model before it is restored
        if self.subcommand == "fit" and not config.get("ckpt_path"):
            _refuse_another_run(dirs)
        if self.subcommand == "fit" and config.get("ckpt_path"):
            self.resume_checkpoint = _read_resume(config["ckpt_path"], dirs)
            csv_version = (self.resume_checkpoint or {}).get("log_versions", {}).get("csv")
            for item in _class_items(trainer.get("logger"), ResumableCSVLogger) if csv_version is not None else []:
                if item.init_args.get("version") is None:  # metrics and figures continue in the run's folder
                    item.init_args.version = csv_version
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
        _check_writable(self.trainer)
        self.trainer.callbacks += [LoggerVersions(), MovedRun()]
        # last.ckpt saves after the other checkpoint callbacks at an epoch end, so it records their new best
        self.trainer.callbacks.sort(key=lambda cb: isinstance(cb, LastCheckpoint))
        _install_guards(self.trainer)
        ckpt, self.resume_checkpoint = self.resume_checkpoint, None
        if ckpt is not None:
            try:
                check_checkpoint_matches(_with_network(self.model, self.datamodule), ckpt,
                                         f"--ckpt_path {self.config_init[self.subcommand].ckpt_path}")
            except ValueError as e:
                raise ConfigError(str(e)) from e
            _skip_init_from(self.model)
        elif getattr(self.model, "init_from", None):
            read_source(self.model.init_from)  # a bad file is named now, before the run writes anything

    def after_fit(self) -> None:
        _report_outputs(self.trainer)

    def before_validate(self) -> None:
        ckpt, self.resume_checkpoint = self.resume_checkpoint, None
        if ckpt is not None:
            check_checkpoint_matches(_with_network(self.model, self.datamodule), ckpt,
                                     f"--ckpt_path {self.config_init[self.subcommand].ckpt_path}")
        if self.config_init[self.subcommand].get("ckpt_path"):
            _skip_init_from(self.model)

    before_test = before_predict = before_validate


class LoggerVersions(Callback):
    """Stores the wandb run id and the CSV log's version in checkpoints, so a resumed run continues both."""

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and logger.version:
                checkpoint["wandb_run_id"] = logger.version
            elif isinstance(logger, ResumableCSVLogger):
                checkpoint.setdefault("log_versions", {})["csv"] = logger.version


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
    """The checkpoint a resume starts from (``last`` is resolved to a file before), or None."""
    if ckpt_path == "last":
        where = ", ".join(str(d) for d in dict.fromkeys(dirs)) or "(no checkpoint callback)"
        rank_zero_info(f"--ckpt_path last: nothing to resume under {where}; starting from scratch")
        return None
    if not Path(ckpt_path).is_file():
        return None  # not a local file (a URL, "hpc"): Lightning resolves it, and reports what is missing
    ckpt = read_resumable(ckpt_path)
    rank_zero_info(f"resuming from {ckpt_path}: epoch {ckpt.get('epoch')}, global step {ckpt.get('global_step')}")
    return ckpt


def read_resumable(path: str | Path) -> dict[str, Any]:
    """The checkpoint at ``path`` as plain data; a file that is not one is a ``BadInputError`` naming it."""
    try:
        return read_checkpoint(path)
    except BadInputError as e:
        raise type(e)(f"--ckpt_path: {e}") from e
    except (OSError, ValueError) as e:
        raise BadInputError(f"--ckpt_path {path}: {e}") from e


def _newest_last(dirs: list[Path]) -> str | None:
    """The ``last*.ckpt`` a resume continues: the newest by modification time (then by name), as Lightning picks."""
    found = [p for d in dict.fromkeys(dirs) if d.is_dir() for p in d.iterdir() if LAST_CHECKPOINT.match(p.name)]
    return str(max(found, key=lambda p: (p.stat().st_mtime_ns, p.name))) if found else None


def _class_path(model: Any) -> str | None:
    return model.get("class_path") if isinstance(model, Namespace) else None


def _special_checkpoint(path: str) -> bool:
    """Whether ``--ckpt_path`` names no local file: Lightning's "last" / "best" / "hpc" / "registry", or a URL."""
    return path in ("last", "best", "hpc") or path.startswith("registry") or "://" in path


def _check_writable(trainer: Trainer) -> None:
    """Every checkpoint folder (and the run's root) can be written, checked before the first step."""
    folders = [("trainer.default_root_dir", trainer.default_root_dir)]
    folders += [(f"{type(cb).__name__}.dirpath", cb.dirpath) for cb in trainer.checkpoint_callbacks
                if getattr(cb, "dirpath", None) and "://" not in str(cb.dirpath)]
    for what, folder in folders:
        existing = Path(folder).absolute()
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        try:
            if not existing.is_dir():
                raise NotADirectoryError(f"{existing} is not a folder")
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as e:
            raise BadInputError(f"{what} {folder} is not writable ({getattr(e, 'strerror', None) or e}: "
                                f"{existing}); choose another folder") from e


def _refuse_another_run(dirs: list[Path]) -> None:
    """A new run never writes into a checkpoint folder that holds another run's checkpoints (``last`` and
    ``best-*`` of two runs would mix, and a later resume or export would pick among them)."""
    for d in dict.fromkeys(dirs):
        found = sorted(p.name for p in d.glob("*.ckpt")) if d.is_dir() else []
        if found:
            shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
            raise ConfigError(f"{d} already holds another run's checkpoints ({shown}): continue that run with "
                              f"--ckpt_path last, or start a new one in another folder with "
                              f"--trainer.default_root_dir DIR")


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
    trainer.callbacks += [SkippedImages(), RunLength()]
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
