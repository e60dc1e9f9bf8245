"""The ``vit`` command: LightningCLI for fit / validate / test / predict (``VitCLI``), plus export, bench and plan."""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings
from pathlib import Path

import torch
from lightning import LightningDataModule, LightningModule

from vit.lightning_cli import ConfigError, VitCLI

__all__ = ["COMMANDS", "ConfigError", "VitCLI", "main"]

# verbs outside LightningCLI: name -> module with ``main(argv) -> int``
COMMANDS = {"export": "vit.export.command", "bench": "vit.bench", "plan": "vit.plan", "data": "vit.data.command"}

log = logging.getLogger("vit")


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
            LightningDataModule,
            args=argv,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"description": "vitkit: pretrain, fine-tune, evaluate and use Vision Transformers."},
        )
    except ConfigError as e:
        log.error("vit: error: %s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
