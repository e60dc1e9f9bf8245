"""The ``vit`` command: LightningCLI for fit / validate / test / predict (``VitCLI``), plus export, plan, bench, data.

Every verb runs inside one error boundary: a known error (``vit.errors``, a config the parser rejects, Lightning's
misconfiguration, a checkpoint that cannot be read, an output that cannot be written) is one line
``vit: error: ...`` on stderr and exit status 2 (bad input) or 1 (a fault while running); ``--debug`` or
``VIT_DEBUG=1`` shows the traceback instead. Each verb imports only what it needs, so ``vit --help`` is quick.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import pickle
import re
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vit import help_cache
from vit.errors import VitError

if TYPE_CHECKING:
    from vit.lightning_cli import ConfigError, VitCLI

__all__ = ["COMMANDS", "VERBS", "ConfigError", "VitCLI", "main"]

# every verb and its line in `vit --help`
VERBS = {
    "fit": "train from a YAML recipe: MAE pretraining, fine-tuning, linear or attentive probes",
    "validate": "evaluate a checkpoint on the validation split",
    "test": "evaluate a checkpoint on the test split",
    "predict": "write predictions (and optional attention maps) of a checkpoint for a folder of images",
    "export": "write a checkpoint's network as safetensors, timm, MAE, ONNX or torch.export, verified",
    "plan": "validate a recipe and print what its run would do (batch, lr, steps, memory, FLOPs)",
    "bench": "throughput, memory and FLOPs side by side with timm (source checkout only)",
    "data": "prepare data sets: `vit data optimize` writes litdata shards for streaming",
}
# verbs outside LightningCLI: name -> module with ``main(argv) -> int``
COMMANDS = {"export": "vit.export.command", "bench": "vit.bench", "plan": "vit.plan", "data": "vit.data.command"}
DEBUG_FLAG = "--debug"
# third-party noise on every run, not the user's concern
QUIET_WARNINGS = (
    ".*'set_vital' is deprecated.*", r".*isinstance\(treespec, LeafSpec\).*",
    ".*LightningCLI's args parameter is intended.*",  # main always passes argv as args
    # ImageClassifier builds its network in configure_model; it is not sharded
    ".*WeightAveraging callback with a model that overrides the configure_model.*",
    # a run shorter than one validation: the best-checkpoint monitor has no value yet; the last checkpoint is kept
    ".*ModelCheckpoint.*could not find the monitored key.*",
)
# (logger, words) of log lines dropped: Lightning's tip to try its hosted logger, on every run
QUIET_LOGS = (("lightning.pytorch.utilities.rank_zero", "litlogger"), ("lightning.fabric.utilities.rank_zero",
                                                                       "litlogger"))
# argparse reads "-1e-3" as an option, not as the value of the option before it
_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$", re.IGNORECASE)

log = logging.getLogger("vit")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vit`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv or os.environ.get("VIT_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != DEBUG_FLAG]
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    try:
        if argv[0] in COMMANDS:
            logging.basicConfig(level=logging.WARNING, format="%(message)s")
            return int(importlib.import_module(COMMANDS[argv[0]]).main(argv[1:]) or 0)
        verb = help_cache.help_verb(argv)
        if verb is not None:
            sys.stdout.write(_verb_help(verb, argv))
            return 0
        return _lightning(argv)
    except Exception as e:
        known = None if debug else describe_error(e)
        if known is None:
            raise
        message, code = known
        log.error("vit: error: %s", message)
        return code


def usage() -> str:
    """What ``vit --help`` prints: every verb with one line."""
    width = max(map(len, VERBS))
    lines = ["usage: vit VERB [options]   (vit VERB --help for a verb's options)", "",
             "vitkit: pretrain, fine-tune, evaluate, export and use Vision Transformers.", "", "verbs:"]
    lines += [f"  {verb:<{width}}  {text}" for verb, text in VERBS.items()]
    lines += ["", f"{DEBUG_FLAG} (or VIT_DEBUG=1) shows the traceback of an error instead of its one line."]
    return "\n".join(lines)


def describe_error(e: BaseException) -> tuple[str, int] | None:
    """(one-line message, exit status) for an error ``vit`` knows, or None for a bug (shown as a traceback)."""
    from argparse import ArgumentError

    if isinstance(e, VitError):
        return _one_line(str(e)), e.exit_code
    if isinstance(e, ArgumentError):  # jsonargparse's report of a config it cannot parse
        return parse_error_line(str(e)), 2
    if type(e).__name__ == "MisconfigurationException":  # Lightning's, without importing Lightning here
        return _one_line(str(e)), 2
    if isinstance(e, pickle.UnpicklingError):
        return _one_line(str(e)), 2
    if isinstance(e, FileNotFoundError):
        return _one_line(f"{e.strerror or e}: {e.filename}" if e.filename else str(e)), 2
    if isinstance(e, OSError):  # an output that cannot be written: a full disk, a read-only folder
        where = f" ({e.filename})" if e.filename else ""
        return _one_line(f"{e.strerror or e}{where}"), 1
    if isinstance(e, ValueError):  # a value our code or a library rejects, named in the message
        return _one_line(str(e)), 2
    return None


def parse_error_line(text: str) -> str:
    """jsonargparse's multi-line report as one line: the key, the innermost reason, and the value given."""
    key = re.search(r'Parser key "([^"]+)"', text)
    lines = [line.strip().removeprefix("- ").strip() for line in text.strip().splitlines()]
    skip = ("Parser key", "Does not validate", "Subtypes:", "Errors:", "Given value type:", "Problem with given",
            "Expected a <class 'NoneType'>")
    reasons = [line for line in lines if line and not line.startswith(skip) and not line.startswith("Given value:")]
    given = [line.removeprefix("Given value:").strip() for line in lines if line.startswith("Given value:")]
    reason = reasons[-1] if reasons else lines[-1]
    value = f", got {given[-1]}" if given and "NestedArg" not in given[-1] else ""
    return _one_line(f"{key.group(1)}: {reason}{value}" if key else f"{reason}{value}")


def __getattr__(name: str) -> Any:
    if name in ("ConfigError", "VitCLI"):  # imported on use: they need Lightning
        return getattr(importlib.import_module("vit.lightning_cli"), name)
    raise AttributeError(f"module 'vit.cli' has no attribute {name!r}")


def _lightning(argv: list[str]) -> int:
    """fit / validate / test / predict through LightningCLI."""
    if not os.environ.get("WANDB_API_KEY") and not (Path.home() / ".netrc").is_file():
        os.environ.setdefault("WANDB_MODE", "offline")  # no key: wandb logs locally, never blocks on a login
    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    import torch
    from lightning import LightningDataModule, LightningModule

    from vit.lightning_cli import VitCLI

    # after Lightning's import: it gives its loggers their own handler only while the root has none
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name, words in QUIET_LOGS:
        if not any(isinstance(f, _Drop) and f.words == words for f in logging.getLogger(name).filters):
            logging.getLogger(name).addFilter(_Drop(words))
    torch.set_float32_matmul_precision("high")
    VitCLI(
        LightningModule,
        LightningDataModule,
        args=_join_negative_values(argv),
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": "vitkit: pretrain, fine-tune, evaluate and use Vision Transformers."},
    )
    return 0


def _verb_help(verb: str, argv: list[str]) -> str:
    """A LightningCLI verb's help: the stored text when this setup has rendered it before, else rendered now."""
    text = help_cache.cached_help(verb)
    if text is None:
        os.environ["COLUMNS"] = str(help_cache.WIDTH)  # argparse wraps at $COLUMNS: one text per cache key
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                _lightning(argv)
        except SystemExit as e:  # argparse ends its help with exit 0; anything else is an error, not a help
            if e.code not in (0, None):
                raise
        text = out.getvalue()
        if text:
            help_cache.store_help(verb, text)
    return text


def _join_negative_values(argv: list[str]) -> list[str]:
    """``--key -1e-3`` as ``--key=-1e-3``: argparse takes a negative number in exponent form for an option."""
    out: list[str] = []
    for arg in argv:
        if out and _NEGATIVE_NUMBER.match(arg) and out[-1].startswith("--") and "=" not in out[-1]:
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


class _Drop(logging.Filter):
    """Drops the log records whose message contains ``words``."""

    def __init__(self, words: str) -> None:
        super().__init__()
        self.words = words

    def filter(self, record: logging.LogRecord) -> bool:
        return self.words not in record.getMessage()


def _one_line(text: str) -> str:
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
