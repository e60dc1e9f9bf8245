"""What MAE pretraining buys on the built-in digits: pretrain → fine-tune, against the same budget from scratch.

Runs the shipped recipes in order, in ``--workdir`` (their relative ``runs/...`` paths land there):

    configs/mae/vit_tiny_digits.yaml          MAE pretraining
    configs/finetune/vit_tiny_digits.yaml     fine-tuning from its last checkpoint
    configs/supervised/vit_tiny_digits.yaml   the same architecture, epochs and regularisation from scratch
    configs/linprobe/vit_tiny_digits*.yaml    with --probes: linear and attentive probes of the MAE encoder

and prints the top-1 accuracy on the fixed held-out digits (360 images, 20% of each class, never trained on; the
other 1,437 train) after the last epoch, with the wall time of each stage.

Run:  python tools/digits_finetune.py [--workdir runs/digits_finetune] [--mae-epochs N] [--epochs N] [--probes]

Each comparison needs its own ``--workdir``: ``vit`` refuses to start a run in a folder that already holds a run's
checkpoints (``--reuse-mae`` keeps the pretraining run of an earlier comparison there).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
import warnings
from pathlib import Path

import torch
from lightning import LightningModule

from vit.data import ImageDataModule
from vit.lightning_cli import VitCLI

ROOT = Path(__file__).resolve().parents[1]
MAE_CKPT = "runs/mae_tiny_digits/checkpoints/last.ckpt"


def fit(config: str, *overrides: str) -> tuple[dict[str, float], float, int]:
    """Fit one recipe; return its final callback metrics, the wall time and the epochs run."""
    start = time.perf_counter()
    cli = VitCLI(LightningModule, ImageDataModule, subclass_mode_model=True, save_config_kwargs={"overwrite": True},
                 args=["fit", "--config", str(ROOT / config), *overrides])
    wall = time.perf_counter() - start
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    return metrics, wall, cli.trainer.current_epoch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/digits_finetune", help="where the runs are written")
    parser.add_argument("--mae-epochs", type=int, default=None, help="MAE epochs (default: the recipe's)")
    parser.add_argument("--epochs", type=int, default=None, help="fine-tune and scratch epochs (default: the recipe's)")
    parser.add_argument("--reuse-mae", action="store_true", help=f"skip pretraining when {MAE_CKPT} exists")
    parser.add_argument("--probes", action="store_true", help="also run the linear and attentive probes")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("WANDB_MODE", "offline")
    warnings.filterwarnings("ignore", message=".*(set_vital|LeafSpec|overrides the configure_model).*")
    torch.set_float32_matmul_precision("high")
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)

    rows = []
    if not (args.reuse_mae and Path(MAE_CKPT).is_file()):
        extra = ["--trainer.max_epochs", str(args.mae_epochs)] if args.mae_epochs else []
        metrics, wall, epochs = fit("configs/mae/vit_tiny_digits.yaml", *extra)
        rows.append(("MAE pretraining", epochs, wall, f"val/loss {metrics.get('val/loss', float('nan')):.3f}"))
    extra = ["--trainer.max_epochs", str(args.epochs)] if args.epochs else []
    stages = [("fine-tuned from MAE", "configs/finetune/vit_tiny_digits.yaml"),
              ("from scratch", "configs/supervised/vit_tiny_digits.yaml")]
    if args.probes:
        stages += [("linear probe of MAE", "configs/linprobe/vit_tiny_digits.yaml"),
                   ("attentive probe of MAE", "configs/linprobe/vit_tiny_digits_attentive.yaml")]
    top1 = {}
    for name, config in stages:
        metrics, wall, epochs = fit(config, *(extra if "linprobe" not in config else []))
        top1[name] = metrics["val/acc1"]
        rows.append((name, epochs, wall, f"top-1 {100 * top1[name]:.2f}%"))

    print(f"\nbuilt-in digits, held-out split (360 images); runs in {workdir}")
    print(f"{'stage':<24} {'epochs':>6} {'wall':>8}  result")
    for name, epochs, wall, result in rows:
        print(f"{name:<24} {epochs:>6} {wall:>7.0f}s  {result}")
    gain = 100 * (top1["fine-tuned from MAE"] - top1["from scratch"])
    print(f"MAE pretraining adds {gain:+.2f} points of top-1 over the same fine-tuning budget from scratch")


if __name__ == "__main__":
    main()
