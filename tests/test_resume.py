"""Exact resume after SIGKILL and SIGTERM, per-step RNG seeds, and checkpoint files that a kill cannot corrupt.

The runs are real ``vit fit`` processes on the shipped digits recipe with a smaller network: an uninterrupted run;
one killed with SIGKILL right after its first ``last.ckpt`` (mid-epoch 0: the resumed part crosses the epoch end, a
validation and the loader's re-shuffle); one killed right after the epoch-end ``last.ckpt``; and one sent SIGTERM
early in epoch 1, which saves at the next batch. Each is resumed with ``--ckpt_path last`` and must end with weights
and optimizer state bitwise equal to the uninterrupted run's.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from vit.train.checkpoint_io import AtomicCheckpointIO
from vit.train.exact_resume import ExactResume
from vit.train.last_checkpoint import SIGTERM_EXIT_CODE

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "mae" / "vit_tiny_digits.yaml"
VIT = str(Path(sys.executable).with_name("vit"))
NET = {"patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2,
       "decoder_embed_dim": 16, "decoder_depth": 1, "decoder_num_heads": 2}
MAX_STEPS = 70  # room after the signals: the interrupted runs must not finish first
EPOCH_STEPS = 44  # 1438 train digits // batch 32
ARGS = ["fit", "--config", str(RECIPE), "--model.init_args.model_kwargs", json.dumps(NET), "--data.batch_size", "32",
        "--trainer.max_steps", str(MAX_STEPS), "--trainer.limit_val_batches", "2",
        "--trainer.enable_model_summary", "false"]
LAST = Path("runs/mae_tiny_digits/checkpoints/last.ckpt")  # the recipe's LastCheckpoint, every 10 steps
TIMEOUT = 240


def _start(cwd: Path, *extra: str) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    # one thread each: three runs share two cores, and the same thread count on every run keeps sums bitwise equal
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    log = open(cwd / "log.txt", "a")  # noqa: SIM115 - the child writes it; closed with the process
    return subprocess.Popen([VIT, *ARGS, *extra], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)


def _wait(proc: subprocess.Popen, cwd: Path) -> int:
    try:
        return proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"run in {cwd} did not finish:\n{_log(cwd)}")


def _interrupt_after(proc: subprocess.Popen, cwd: Path, sig: int, min_step: int) -> None:
    """Send ``sig`` once last.ckpt holds ``min_step`` or more (files appear only complete: a rename)."""
    deadline = time.monotonic() + TIMEOUT
    while not ((cwd / LAST).exists() and _load(cwd / LAST)["global_step"] >= min_step):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no last.ckpt at step {min_step} before the run ended:\n{_log(cwd)}")
        time.sleep(0.01)
    proc.send_signal(sig)


def _log(cwd: Path, tail: int | None = 4000) -> str:
    text = (cwd / "log.txt").read_text(errors="replace")
    return text[-tail:] if tail else text


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


# name: (signal, send it once last.ckpt holds at least this step, expected exit status)
INTERRUPTIONS = {
    "killed": (signal.SIGKILL, 1, -signal.SIGKILL),
    "killed_at_epoch_end": (signal.SIGKILL, EPOCH_STEPS, -signal.SIGKILL),
    "terminated": (signal.SIGTERM, EPOCH_STEPS, SIGTERM_EXIT_CODE),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The uninterrupted run and each interrupted + resumed one; returns their folders."""
    base = tmp_path_factory.mktemp("resume")
    dirs = {name: base / name for name in ("straight", *INTERRUPTIONS)}
    procs = {name: _start(d) for name, d in dirs.items()}
    for name, (sig, step, _) in INTERRUPTIONS.items():
        _interrupt_after(procs[name], dirs[name], sig, step)
    codes = {name: _wait(p, dirs[name]) for name, p in procs.items()}
    assert codes["straight"] == 0, _log(dirs["straight"])
    for name, (_, _, code) in INTERRUPTIONS.items():
        assert codes[name] == code, _log(dirs[name])
    interrupted = {name: _load(dirs[name] / LAST) for name in INTERRUPTIONS}
    resumed = {name: _start(dirs[name], "--ckpt_path", "last") for name in interrupted}
    for name, p in resumed.items():
        assert _wait(p, dirs[name]) == 0, _log(dirs[name])
    for name, ckpt in interrupted.items():
        (dirs[name] / "interrupted.json").write_text(json.dumps({"global_step": ckpt["global_step"]}))
    return dirs


def _interrupted_step(d: Path) -> int:
    return json.loads((d / "interrupted.json").read_text())["global_step"]


def test_sigkill_mid_epoch_then_resume_is_bitwise_identical(runs) -> None:
    step = _interrupted_step(runs["killed"])
    assert 0 < step < EPOCH_STEPS, "the kill lands mid-epoch 0, after the first step checkpoint"
    assert "resuming from" in _log(runs["killed"], tail=None)
    _assert_same_run(_load(runs["straight"] / LAST), _load(runs["killed"] / LAST))


def test_sigkill_after_the_epoch_end_checkpoint_then_resume_is_bitwise_identical(runs) -> None:
    assert _interrupted_step(runs["killed_at_epoch_end"]) == EPOCH_STEPS
    _assert_same_run(_load(runs["straight"] / LAST), _load(runs["killed_at_epoch_end"] / LAST))


def test_sigterm_saves_at_the_next_batch_and_resumes_exactly(runs) -> None:
    step = _interrupted_step(runs["terminated"])
    log = _log(runs["terminated"], tail=None)
    assert "SIGTERM: saved" in log and f"at global step {step}" in log, log
    assert EPOCH_STEPS < step < MAX_STEPS, "SIGTERM lands mid-epoch 1"
    _assert_same_run(_load(runs["straight"] / LAST), _load(runs["terminated"] / LAST))


def _assert_same_run(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"] == MAX_STEPS
    # Lightning stores no global RNG state: exactness comes from ExactResume's per-step seeds instead
    assert not any("rng" in k.lower() for k in a)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), f"{k} differs after resume"
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values(),
                      strict=True):
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"AdamW {k} differs after resume"


# --- per-step RNG ---------------------------------------------------------------------------------------------


class _FakeTrainer:
    def __init__(self, rank: int, epoch: int) -> None:
        self.global_rank, self.current_epoch = rank, epoch


def test_step_rng_depends_only_on_seed_rank_epoch_and_batch() -> None:
    rng = ExactResume(seed=3)

    def draw(rank: int, epoch: int, batch: int) -> torch.Tensor:
        torch.rand(7)  # whatever ran before must not matter
        rng.on_train_batch_start(_FakeTrainer(rank, epoch), None, None, batch)
        return torch.rand(4)

    assert torch.equal(draw(0, 1, 5), draw(0, 1, 5))
    assert not torch.equal(draw(0, 1, 5), draw(1, 1, 5)), "ranks should mask differently"
    assert not torch.equal(draw(0, 1, 5), draw(0, 2, 5))
    assert not torch.equal(draw(0, 1, 5), draw(0, 1, 6))
    restored = ExactResume()
    restored.load_state_dict(rng.state_dict())
    assert restored.seed == 3


# --- atomic checkpoint files ------------------------------------------------------------------------------------


def _ckpt(version: int, size: int = 1000) -> dict:
    return {"version": version, "w": torch.full((size,), float(version))}


# what AtomicCheckpointIO calls, in order; a kill at any of them must leave the previous file whole
WRITE_STEPS = ("torch.save", "os.fsync", "os.replace")


@pytest.mark.parametrize("step", WRITE_STEPS)
def test_atomic_io_keeps_the_previous_file_when_a_write_dies(tmp_path, monkeypatch, step) -> None:
    io, path = AtomicCheckpointIO(), tmp_path / "ckpt" / "last.ckpt"
    io.save_checkpoint(_ckpt(1), path)
    module, name = step.split(".")
    real = getattr({"torch": torch, "os": os}[module], name)

    def dies(*args, **kwargs):
        if step == "torch.save":  # half a checkpoint reaches the file first
            args[1].write(b"half a checkpoint")
        elif step == "os.replace":
            assert Path(args[0]).parent == path.parent, "the temporary file is written beside its target"
        raise KeyboardInterrupt(f"killed in {step}")

    monkeypatch.setattr(f"{module}.{name}", dies)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint(_ckpt(2), path)
    monkeypatch.setattr(f"{module}.{name}", real)
    assert _load(path)["version"] == 1, "the previous checkpoint is intact"
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"], "no partial file is left beside it"


def test_atomic_io_never_copies_when_tmpdir_is_another_filesystem(tmp_path, monkeypatch) -> None:
    """Why AtomicCheckpointIO exists. With $TMPDIR on another filesystem (node-local /tmp, checkpoints on NFS), a
    rename from it fails with EXDEV and fsspec's move becomes a copy into last.ckpt: a kill during that copy
    destroys Lightning's previous checkpoint. Ours stages beside the target, so its rename never crosses."""
    staging = tmp_path / "node-local-tmp"
    staging.mkdir()
    lightning_path, ours_path = tmp_path / "lightning" / "last.ckpt", tmp_path / "ours" / "last.ckpt"
    TorchCheckpointIO().save_checkpoint(_ckpt(1), lightning_path)
    AtomicCheckpointIO().save_checkpoint(_ckpt(1), ours_path)

    def same_filesystem_only(real):
        def move(src, dst, *args, **kwargs):
            if Path(src).resolve().is_relative_to(staging) != Path(dst).resolve().is_relative_to(staging):
                raise OSError(errno.EXDEV, "Invalid cross-device link")
            return real(src, dst, *args, **kwargs)
        return move

    copies = []

    def copy_killed_halfway(src, dst, **kwargs) -> None:
        copies.append(dst)
        data = Path(src).read_bytes()
        Path(dst).write_bytes(data[: len(data) // 2])
        raise KeyboardInterrupt("killed mid-copy")

    monkeypatch.setattr(tempfile, "tempdir", str(staging))  # $TMPDIR, read by mkstemp() without dir=
    monkeypatch.setattr(os, "rename", same_filesystem_only(os.rename))
    monkeypatch.setattr(os, "replace", same_filesystem_only(os.replace))
    monkeypatch.setattr(shutil, "copyfile", copy_killed_halfway)
    with pytest.raises(KeyboardInterrupt):
        TorchCheckpointIO().save_checkpoint(_ckpt(2), lightning_path)
    with pytest.raises(Exception):  # noqa: B017 - any unpickling error: Lightning's previous checkpoint is gone
        _load(lightning_path)
    copies.clear()
    AtomicCheckpointIO().save_checkpoint(_ckpt(2), ours_path)
    assert copies == [] and _load(ours_path)["version"] == 2
    assert list(staging.iterdir()) == [] and [p.name for p in ours_path.parent.iterdir()] == ["last.ckpt"]


WRITER = """
import sys, torch
from vit.train.checkpoint_io import AtomicCheckpointIO
io, path = AtomicCheckpointIO(), sys.argv[1]
for v in range(1, 10_000):
    io.save_checkpoint({"version": v, "w": torch.full((8_000_000,), float(v))}, path)
    print(v, flush=True)
"""


def test_sigkill_during_checkpoint_writes_never_leaves_a_partial_file(tmp_path) -> None:
    path = tmp_path / "last.ckpt"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "1"
        time.sleep(0.3)  # a 32 MB checkpoint takes about that long: the kill lands in or between writes
        proc.kill()
        proc.wait(timeout=30)
    finally:
        proc.kill()
    ckpt = _load(path)
    assert torch.all(ckpt["w"] == ckpt["version"]), "a complete checkpoint of one version"
    AtomicCheckpointIO().save_checkpoint(_ckpt(0), path)  # a later save removes a killed writer's temporary file
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
