"""Kill-and-resume trials: does every interrupted run, resumed with ``--ckpt_path last``, end bitwise equal?

Runs the tiny MAE recipe (configs/mae/vit_tiny_digits.yaml with a 1-block network, 12 steps an epoch, a
checkpoint every 10 steps and at each epoch end) once straight through, then N trials. Each trial is stopped by
SIGKILL or SIGTERM at a random moment: mid training step, mid validation, or right after a checkpoint write (at
the next batch start). Then it is resumed with ``--ckpt_path last`` and its final weights and AdamW state are
compared with the straight run's, tensor by tensor, with ``torch.equal``. A SIGTERM must also end the run with
exit status 143 and a SIGKILL with -9; the resumed run must exit 0.

The signal comes from inside the run (``ChaosTrigger``, a callback added only to the interrupted run), so that
"during validation" lands there for sure; a timer of a few milliseconds moves it off the hook into the work.
Each run is ``vit.cli.main(argv)`` in a process forked from this one after the imports (a fresh interpreter
spends most of a tiny run importing), in its own folder, with one thread: the same thread count on every run
keeps sums bitwise equal. POSIX only (fork).

Run:  python tools/chaos.py [--trials 10] [--seed 0] [--jobs 2] [--workdir DIR]
Prints one line per trial and ``k of N bitwise equal``; the exit status is 0 only when all are.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning import Callback, Trainer

from vit.cli import main as vit_main

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "mae" / "vit_tiny_digits.yaml"
NET = {"patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2,
       "decoder_embed_dim": 16, "decoder_depth": 1, "decoder_num_heads": 2}
EPOCH_STEPS = 12  # limit_train_batches: validation (2 batches) and an epoch-end checkpoint every 12 steps
SAVE_EVERY = 10  # the base config's LastCheckpoint every_n_train_steps
LAST = Path("runs/mae_tiny_digits/checkpoints/last.ckpt")  # under each run's working directory
TIMEOUT_S = 300
EXPECTED_EXIT = {"SIGKILL": -signal.SIGKILL, "SIGTERM": 143}


class ChaosTrigger(Callback):
    """Sends ``signal`` to its own process at a moment: ``at`` "train" (the start of the batch after ``step``
    optimizer steps), "val" (validation batch ``batch`` of the first validation after ``step`` steps); ``delay``
    seconds later, from a timer thread, when it is positive."""

    def __init__(self, at: str, step: int, signal: str, delay: float = 0.0, batch: int = 0) -> None:
        self.at, self.step, self.signal, self.delay, self.batch = at, step, signal, delay, batch
        self._fired = False

    def on_train_batch_start(self, trainer: Trainer, pl_module, batch, batch_idx: int) -> None:
        if self.at == "train" and trainer.global_step == self.step:
            self._fire()

    def on_validation_batch_start(self, trainer: Trainer, pl_module, batch, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        if (self.at == "val" and not trainer.sanity_checking and trainer.global_step >= self.step
                and batch_idx == self.batch):
            self._fire()

    def _fire(self) -> None:
        if self._fired:
            return
        self._fired = True
        sig = getattr(signal, self.signal)
        if self.delay > 0:
            threading.Timer(self.delay, os.kill, (os.getpid(), sig)).start()
        else:
            os.kill(os.getpid(), sig)


@dataclass
class Trial:
    index: int
    signal: str
    at: str
    step: int
    delay: float
    batch: int = 0
    exit_code: int | None = None
    resumed_from: int | None = None
    resume_exit: int | None = None
    equal: bool = False
    detail: str = ""

    def moment(self) -> str:
        where = {"train": f"in training step {self.step + 1}",
                 "ckpt": f"right after the checkpoint at step {self.step}",
                 "val": f"in validation after step {self.step} (batch {self.batch})"}[self.at]
        return f"{self.signal} {where}" + (f" (+{self.delay * 1000:.0f} ms)" if self.delay else "")


def plan_trials(n: int, seed: int, max_steps: int) -> list[Trial]:
    """N trials cycling through the moments (train, val, after a checkpoint) and the signals (SIGKILL, SIGTERM):
    every pair comes up within six trials; the steps and delays are drawn from ``seed``."""
    rng = random.Random(seed)
    epoch_ends = [s for s in range(EPOCH_STEPS, max_steps, EPOCH_STEPS)]
    saves = sorted({*range(SAVE_EVERY, max_steps, SAVE_EVERY), *epoch_ends})
    trials = []
    for i in range(n):
        at = ("train", "val", "ckpt")[i % 3]
        sig = ("SIGKILL", "SIGTERM")[i % 2]
        if at == "train":
            trials.append(Trial(i, sig, at, rng.randrange(1, max_steps - 2), rng.uniform(0.0, 0.05)))
        elif at == "val":
            trials.append(Trial(i, sig, at, rng.choice(epoch_ends), rng.uniform(0.0, 0.02), batch=rng.randrange(2)))
        else:
            trials.append(Trial(i, sig, at, rng.choice(saves), 0.0))
    return trials


def run_args(max_steps: int) -> list[str]:
    return ["fit", "--config", str(RECIPE), "--model.init_args.model_kwargs", json.dumps(NET),
            "--data.batch_size", "32", "--trainer.max_steps", str(max_steps),
            "--trainer.limit_train_batches", str(EPOCH_STEPS), "--trainer.limit_val_batches", "2",
            "--trainer.enable_model_summary", "false"]


def start(cwd: Path, args: list[str]) -> int:
    """Fork a process that runs ``vit <args>`` in ``cwd`` (output appended to cwd/log.txt); its pid."""
    cwd.mkdir(parents=True, exist_ok=True)
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        os.chdir(cwd)
        out = open("log.txt", "a", buffering=1)  # noqa: SIM115 - this process ends with os._exit
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
        sys.stdout = sys.stderr = out
        logging.root.handlers = []  # main() sets up its own, writing to the log
        torch.set_num_threads(1)
        code = vit_main(args)
    except SystemExit as e:  # a SIGTERM ends a run with SIGTERMException(143)
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    except BaseException:  # reported in the log; the exit status says it failed
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        os._exit(code)


def run_all(jobs: int, tasks: list[tuple[Path, list[str], Callable[[int], tuple[Path, list[str]] | None]]]) -> None:
    """Run ``(cwd, args, then)`` tasks, ``jobs`` at a time; ``then(exit status)`` may return a follow-up task."""
    queue, running = deque(tasks), {}
    while queue or running:
        while queue and len(running) < jobs:
            cwd, args, then = queue.popleft()
            running[start(cwd, args)] = (time.monotonic(), then)
        ended = [(pid, status) for pid in running for pid, status in [os.waitpid(pid, os.WNOHANG)] if pid]
        for pid, status in ended:
            follow = running.pop(pid)[1](os.waitstatus_to_exitcode(status))
            if follow is not None:
                queue.appendleft(follow)
        if not ended:
            for late in [p for p, (t0, _) in running.items() if time.monotonic() - t0 > TIMEOUT_S]:
                os.kill(late, signal.SIGKILL)  # reaped next time round, exit status -9: the task fails
            time.sleep(0.05)


def trial_args(trial: Trial, max_steps: int) -> list[str]:
    at = "train" if trial.at == "ckpt" else trial.at  # after a checkpoint: the start of the next batch
    spec = {"class_path": "chaos.ChaosTrigger",
            "init_args": {"at": at, "step": trial.step, "signal": trial.signal, "delay": trial.delay,
                          "batch": trial.batch}}
    return [*run_args(max_steps), f"--trainer.callbacks+={json.dumps(spec)}"]


def trial_task(trial: Trial, work: Path, max_steps: int) -> tuple[Path, list[str], Callable]:
    """The interrupted run of ``trial``, followed (when it ended as its signal should) by its resume."""
    cwd = work / f"trial_{trial.index}"

    def resumed(code: int) -> None:
        trial.resume_exit = code
        if code != 0:
            trial.detail = f"the resumed run exited {code}"

    def interrupted(code: int) -> tuple[Path, list[str], Callable] | None:
        trial.exit_code = code
        if code != EXPECTED_EXIT[trial.signal]:
            trial.detail = f"exit {code}, expected {EXPECTED_EXIT[trial.signal]}"
            return None
        trial.resumed_from = load(cwd / LAST)["global_step"] if (cwd / LAST).exists() else 0
        return cwd, [*run_args(max_steps), "--ckpt_path", "last"], resumed

    return cwd, trial_args(trial, max_steps), interrupted


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def differences(a: dict, b: dict) -> list[str]:
    """What differs between two final checkpoints: step, weights, AdamW state (empty: bitwise equal)."""
    out = [] if a["global_step"] == b["global_step"] else [f"global_step {a['global_step']} vs {b['global_step']}"]
    if a["state_dict"].keys() != b["state_dict"].keys():
        return [*out, "different weight names"]
    out += [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    for i, (sa, sb) in enumerate(zip(a["optimizer_states"][0]["state"].values(),
                                     b["optimizer_states"][0]["state"].values(), strict=True)):
        out += [f"AdamW {k} of parameter {i}" for k in sa if not torch.equal(sa[k], sb[k])]
    return out


def chaos(trials: int, seed: int = 0, jobs: int = 2, workdir: Path | None = None, max_steps: int = 30,
          report: Callable[[str], None] = print) -> list[Trial]:
    """Run the straight run and ``trials`` interrupted + resumed ones; report a line each and the tally."""
    import vit.lightning_cli  # noqa: F401 - imported once here, shared by every forked run
    from vit.data import prepare_digits

    work = Path(workdir or tempfile.mkdtemp(prefix="vitkit-chaos-"))
    prepare_digits(32)  # once, before the runs: they would all write it at the same time
    done = plan_trials(trials, seed, max_steps)
    straight: list[int] = []
    run_all(max(1, jobs), [(work / "straight", run_args(max_steps), straight.append),
                           *(trial_task(t, work, max_steps) for t in done)])
    if straight != [0]:
        raise RuntimeError(f"the uninterrupted run failed (exit {straight}); see {work}/straight/log.txt")
    reference = load(work / "straight" / LAST)
    for t in done:
        if not t.detail:
            diff = differences(reference, load(work / f"trial_{t.index}" / LAST))
            t.equal = not diff
            t.detail = "bitwise equal" if t.equal else "differs: " + ", ".join(diff[:4])
        resumed = f", resumed from step {t.resumed_from}" if t.resumed_from is not None else ""
        report(f"trial {t.index}: {t.moment()}: exit {t.exit_code}{resumed}: {t.detail}")
    report(f"{sum(t.equal for t in done)} of {len(done)} bitwise equal")
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0, help="draws the moments and signals")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--workdir", type=Path, help="where the runs go (default: a new temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the run folders (always kept with --workdir)")
    args = parser.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="vitkit-chaos-"))
    try:
        done = chaos(args.trials, args.seed, args.jobs, work, args.max_steps)
    finally:
        if args.workdir is None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if all(t.equal for t in done) else 1


if __name__ == "__main__":
    sys.exit(main())
