"""Does a ViT still learn under efficient attention? dense vs window, neighborhood, kvpool and a mixed schedule.

Trains the recipe configs/supervised/vit_tiny_digits64_window.yaml (the built-in digits drawn at 64x64, patch 4:
256 tokens; width 64, depth 4) once per pattern and seed, everything else equal (recipe, epochs, data split,
seed per run), and prints the top-1 accuracy on the fixed held-out digits (360 images, 20% of each class) after
the last epoch, the wall time and the CPU time of the process (the fairer figure on a shared machine at a fixed
thread count), as mean ± standard deviation over the seeds. Runs go to ``--workdir``.

Run:  python tools/attention_patterns.py [--epochs N] [--seeds 0,1,2] [--patterns 'dense;window:4;...'] [--json F]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
import warnings
from pathlib import Path

import torch
import yaml
from lightning import LightningModule

from vit.data import ImageDataModule
from vit.lightning_cli import VitCLI

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "supervised" / "vit_tiny_digits64_window.yaml"
NETWORK = yaml.safe_load(RECIPE.read_text())["model"]["init_args"]["model_kwargs"]  # the recipe's; attention varies
PATTERNS = ("dense", "window:4", "window:4:shift", "neighborhood:5", "kvpool:2", "window:4:shift*3,dense")


def fit(attention: str, seed: int, epochs: int | None, root: Path) -> tuple[float, float, float]:
    """Train the recipe with ``attention``; return (held-out top-1 after the last epoch, wall s, CPU s)."""
    overrides = ["--seed_everything", str(seed), "--trainer.default_root_dir", str(root),
                 "--model.init_args.model_kwargs", json.dumps({**NETWORK, "attention": attention})]
    if epochs:
        overrides += ["--trainer.max_epochs", str(epochs)]
    start, cpu = time.perf_counter(), time.process_time()
    cli = VitCLI(LightningModule, ImageDataModule, subclass_mode_model=True, save_config_kwargs={"overwrite": True},
                 args=["fit", "--config", str(RECIPE), *overrides])
    return (float(cli.trainer.callback_metrics["val/acc1"]), time.perf_counter() - start,
            time.process_time() - cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/attention_patterns", help="where the runs are written")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default: the recipe's)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--patterns", default=";".join(PATTERNS),
                        help="patterns or schedules, separated by ';' (schedules hold commas; default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", dest="json_path", help="also write the per-run results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    os.environ.setdefault("WANDB_MODE", "offline")
    warnings.filterwarnings("ignore", message=".*(set_vital|LeafSpec|overrides the configure_model|deprecated).*")
    if args.threads:
        torch.set_num_threads(args.threads)
    patterns = [p.strip() for p in args.patterns.split(";") if p.strip()]
    seeds = [int(s) for s in args.seeds.split(",")]
    workdir = Path(args.workdir).resolve()
    runs: dict[str, list[tuple[float, float, float]]] = {p: [] for p in patterns}
    for seed in seeds:  # seed-major, so a machine that slows down mid-way hits every pattern alike
        for p in patterns:
            runs[p].append(fit(p, seed, args.epochs, workdir / p.replace(":", "_").replace(",", "+") / f"seed{seed}"))
            acc, wall, cpu = runs[p][-1]
            print(f"{p:<24} seed {seed}: top-1 {100 * acc:.2f}%, {wall:.0f} s wall, {cpu:.0f} s CPU", flush=True)
    print(f"\nbuilt-in digits at 64x64, patch 4 (256 tokens), held-out split (360 images); "
          f"{args.epochs or 'the recipe'} epochs; seeds {args.seeds}; {torch.get_num_threads()} threads; "
          f"runs in {workdir}")
    print(f"{'attention':<24} {'top-1 (%)':>16} {'wall (s)':>14} {'CPU (s)':>14}")
    for p, results in runs.items():
        acc, wall, cpu = ([100 * r[0] for r in results], [r[1] for r in results], [r[2] for r in results])
        print(f"{p:<24} {_mean_sd(acc, 2):>16} {_mean_sd(wall, 0):>14} {_mean_sd(cpu, 0):>14}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"seeds": seeds, "epochs": args.epochs, "runs": {
            p: [{"seed": s, "top1": a, "wall_s": w, "cpu_s": c} for s, (a, w, c) in zip(seeds, r, strict=True)]
            for p, r in runs.items()}}, indent=2))


def _mean_sd(values: list[float], digits: int) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


if __name__ == "__main__":
    main()
