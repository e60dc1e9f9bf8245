"""Bad input through the `vit` command, the way a user meets it: each case gets one line ``vit: error: ...`` that
names the file, key or field, exit status 2 (bad input) or 1 (a fault while running), and nothing written.

Most cases run in-process (``vit.cli.main``) on the tiny MAE recipe; the error line is read from the ``vit``
logger, which the console script prints to stderr (one subprocess case checks that).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from vit.cli import main
from vit.train import checkpoint_io

ROOT = Path(__file__).resolve().parents[1]
MAE = ROOT / "configs" / "mae" / "vit_tiny_digits.yaml"
FINETUNE = ROOT / "configs" / "finetune" / "vit_tiny_digits.yaml"
NET = {"patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2,
       "decoder_embed_dim": 16, "decoder_depth": 1, "decoder_num_heads": 2}
TINY = ["--model.init_args.model_kwargs", json.dumps(NET), "--trainer.enable_model_summary", "false",
        "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", "--data.batch_size", "16"]
RUN = Path("runs/mae_tiny_digits")  # the recipe's root, under each test's working directory


def fit(*args: str) -> int:
    return main(["fit", "--config", str(MAE), *TINY, *args])


def error_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "vit" and r.levelno >= logging.ERROR]


def tree(root: Path) -> dict[str, int]:
    """Every file under ``root`` with its modification time: what a failed command must leave as it was."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-epoch (2 step) run of the tiny MAE recipe; tests copy its folder."""
    cwd = tmp_path_factory.mktemp("trained")
    before = Path.cwd()
    os.chdir(cwd)
    try:
        assert fit("--trainer.max_epochs", "1") == 0
    finally:
        os.chdir(before)
    return cwd / RUN


@pytest.fixture
def run_copy(trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The trained run, copied under a fresh working directory; returns its checkpoint folder."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(trained, RUN)
    return RUN / "checkpoints"


@pytest.fixture
def bad_files(tmp_path: Path, trained: Path) -> dict[str, Path]:
    """Files that are not checkpoints, and one that is a pickle that would run code (it writes ``pwned``)."""
    good = (trained / "checkpoints" / "last.ckpt").read_bytes()
    files = {"truncated": good[: len(good) // 2], "empty": b"", "random": os.urandom(4096)}
    out = {}
    for name, data in files.items():
        out[name] = tmp_path / f"{name}.ckpt"
        out[name].write_bytes(data)

    class Evil:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    out["malicious"] = tmp_path / "malicious.ckpt"
    torch.save({"state_dict": {}, "callbacks": Evil()}, out["malicious"])
    out["missing"] = tmp_path / "missing.ckpt"
    return out


# --- the command itself ---------------------------------------------------------------------------------------


def test_help_lists_every_verb(capsys: pytest.CaptureFixture) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for verb in ("fit", "validate", "test", "predict", "export", "plan", "bench", "data"):
        assert any(line.split()[:1] == [verb] and len(line.split()) > 2 for line in out.splitlines()), verb


def test_help_imports_only_what_the_verb_needs() -> None:
    code = ("import sys, contextlib, io; from vit.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()): main(['--help'])\n"
            "print('torch' in sys.modules)\n"
            "with contextlib.redirect_stdout(io.StringIO()): main(['export', '--help'])\n"
            "print('lightning' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"], "vit --help imports torch / vit export --help lightning"


def test_a_short_run_is_quiet(tmp_path, monkeypatch, caplog) -> None:
    """No tip to install Lightning's hosted logger, no warning that a run stopped before validation has no
    val/loss for the best checkpoint."""
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.INFO)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert fit("--trainer.max_steps", "1") == 0
    assert "resuming" not in caplog.text and "`Trainer.fit` stopped" in caplog.text
    assert "litlogger" not in caplog.text
    assert not [w for w in caught if "could not find the monitored key" in str(w.message)]


# --- bad configs ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "named"), [
    (["--model.init_args.base_lr=-1e-3"], "model.base_lr must be positive, got -0.001"),
    (["--model.init_args.base_lr", "-1e-3"], "model.base_lr must be positive, got -0.001"),
    (["--trainer.max_epochs", "-5"], "`max_epochs` must be a non-negative integer or -1. You passed in -5"),
    (["--model.init_args.no_such_key", "3"], "model: Option 'no_such_key' is not accepted"),
    (["--trainer.max_epochs", "many"], "trainer.max_epochs: Expected a <class 'int'>, got many"),
], ids=["base_lr=", "base_lr space", "max_epochs<0", "unknown key", "wrong type"])
def test_bad_config_is_one_line_before_anything_is_written(tmp_path, monkeypatch, caplog, args, named) -> None:
    monkeypatch.chdir(tmp_path)
    assert fit("--trainer.max_steps", "2", *args) == 2
    (line,) = error_lines(caplog)
    assert line.startswith("vit: error: ") and named in line
    assert list(tmp_path.iterdir()) == [], "nothing is written"


def test_debug_shows_the_traceback(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="base_lr must be positive"):
        fit("--model.init_args.base_lr=-1", "--debug")
    monkeypatch.setenv("VIT_DEBUG", "1")
    with pytest.raises(ValueError, match="base_lr must be positive"):
        fit("--model.init_args.base_lr=-1")


def test_console_script_prints_one_line_on_stderr(tmp_path, bad_files) -> None:
    vit = str(Path(sys.executable).with_name("vit"))
    out = subprocess.run([vit, "fit", "--config", str(MAE), "--ckpt_path", str(bad_files["random"])],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, WANDB_MODE="offline"))
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("vit: error: --ckpt_path: ") and "random.ckpt is not a checkpoint" in lines[-1]
    assert sum("error" in line for line in lines) == 1 and "Traceback" not in out.stderr
    assert not (tmp_path / "runs").exists()


# --- bad checkpoints --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["truncated", "empty", "random", "malicious", "missing"])
@pytest.mark.parametrize("where", ["fit --ckpt_path", "predict --ckpt_path", "init_from"])
def test_bad_checkpoint_file_is_named(tmp_path, monkeypatch, caplog, bad_files, kind, where) -> None:
    monkeypatch.chdir(tmp_path)
    path = str(bad_files[kind])
    if where == "fit --ckpt_path":
        code = fit("--ckpt_path", path)
    elif where == "predict --ckpt_path":
        code = main(["predict", "--config", str(FINETUNE), "--ckpt_path", path])
    else:
        code = main(["fit", "--config", str(FINETUNE), "--model.init_args.init_from", path,
                     "--trainer.max_steps", "1"])
    assert code == 2
    (line,) = error_lines(caplog)
    assert f"{kind}.ckpt" in line
    if kind == "malicious":
        assert "would run code" in line and "it imports io.open" in line
    elif kind == "missing":
        assert "no such file" in line
    else:
        assert "is not a checkpoint" in line and "would run code" not in line
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "runs").exists()


def test_checkpoint_of_another_module_names_both_classes(run_copy, tmp_path, caplog) -> None:
    before = tree(tmp_path)
    assert main(["fit", "--config", str(FINETUNE), "--ckpt_path", str(run_copy / "last.ckpt")]) == 2
    (line,) = error_lines(caplog)
    assert "is a checkpoint of vit.train.MAEPretrainer, but this config trains vit.train.ImageClassifier" in line
    assert "init_from" in line
    assert tree(tmp_path) == before and not Path("runs/finetune_tiny_digits").exists()


@pytest.mark.parametrize("ckpt_path", ["explicit", "last"])
def test_resume_of_another_architecture_names_the_field(run_copy, tmp_path, caplog, ckpt_path) -> None:
    before = tree(tmp_path)
    path = str(run_copy / "last.ckpt") if ckpt_path == "explicit" else "last"
    assert fit("--model.init_args.model_kwargs", json.dumps(dict(NET, embed_dim=64)), "--trainer.max_epochs", "2",
               "--ckpt_path", path) == 2
    (line,) = error_lines(caplog)
    assert "holds another architecture" in line and "model.model_kwargs.embed_dim: checkpoint 32, config 64" in line
    assert tree(tmp_path) == before


def test_last_resumes_the_newest_last_file_and_says_which(run_copy, caplog) -> None:
    """Two ``last*.ckpt``: the one announced is the one Lightning restores (the newest), passed to it by path."""
    newer = run_copy / "last-v1.ckpt"
    shutil.copy(run_copy / "last.ckpt", newer)
    stamp = time.time() + 10
    os.utime(newer, (stamp, stamp))
    caplog.set_level(logging.INFO)
    assert fit("--trainer.max_epochs", "2", "--ckpt_path", "last") == 0
    assert f"resuming from {newer}: epoch 0, global step 2" in caplog.text
    restored = [r.getMessage() for r in caplog.records if "Restoring states from the checkpoint path" in r.getMessage()]
    assert restored and all(str(newer) in m for m in restored), restored


# --- outputs ----------------------------------------------------------------------------------------------------


def test_unwritable_checkpoint_folder_is_refused_before_the_first_step(tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "blocker").write_text("a file where the run folder should go")
    assert fit("--trainer.default_root_dir", "blocker/run", "--trainer.max_steps", "2") == 2
    (line,) = error_lines(caplog)
    assert "trainer.default_root_dir blocker/run is not writable" in line and "blocker is not a folder" in line

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr("vit.lightning_cli.tempfile.TemporaryFile", denied)  # root ignores chmod: simulate it
    caplog.clear()
    assert fit("--trainer.max_steps", "2") == 2
    (line,) = error_lines(caplog)
    assert "is not writable (Permission denied" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]


def test_full_disk_names_the_file_and_keeps_the_previous_checkpoint(run_copy, monkeypatch, caplog) -> None:
    last = run_copy / "last.ckpt"
    previous = last.read_bytes()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_io.torch, "save", full)
    assert fit("--trainer.max_epochs", "2", "--ckpt_path", "last") == 1
    (line,) = error_lines(caplog)
    # the epoch end writes the best checkpoint first, then last.ckpt
    assert f"could not write checkpoint {run_copy.resolve()}/best-epoch=001.ckpt (No space left on device)" in line
    assert "the checkpoints already there are intact (best-epoch=000.ckpt, last.ckpt)" in line
    assert last.read_bytes() == previous and not list(run_copy.glob(".*.tmp"))


def test_resume_with_another_length_warns_naming_both(run_copy) -> None:
    with pytest.warns(UserWarning, match=r"max_epochs 1 -> 2\): 2 -> 4 optimizer steps"):
        assert fit("--trainer.max_epochs", "2", "--ckpt_path", "last") == 0


def test_export_refuses_a_folder_of_another_format(trained, tmp_path, capsys) -> None:
    out = tmp_path / "export"
    ckpt = str(trained / "checkpoints" / "last.ckpt")
    assert main(["export", ckpt, "--out", str(out)]) == 0
    before = tree(out)
    capsys.readouterr()
    assert main(["export", ckpt, "--format", "mae", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vit export: error: --out")
    assert "holds a safetensors export (config.json, model.safetensors)" in err[0] and "--force" in err[0]
    assert tree(out) == before
    assert main(["export", ckpt, "--out", str(out)]) == 0, "the same format again replaces its own files"
    assert main(["export", ckpt, "--format", "mae", "--out", str(out), "--force"]) == 0


def test_failed_overwrite_keeps_the_previous_file(tmp_path, monkeypatch) -> None:
    target = tmp_path / "last.ckpt"
    io = checkpoint_io.AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, target)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_io.torch, "save", full)
    with pytest.raises(checkpoint_io.CheckpointWriteError, match=r"last.ckpt \(No space left on device\); the "
                                                                 r"previous last.ckpt is intact"):
        io.save_checkpoint({"step": 2}, target)
    assert torch.load(target, weights_only=True) == {"step": 1} and sorted(tmp_path.iterdir()) == [target]


def test_a_non_finite_stop_is_one_line_and_a_runtime_fault() -> None:
    from vit.cli import describe_error
    from vit.train.nonfinite import NonFiniteError

    err = NonFiniteError("non-finite values at global step 12: loss nan;\nstopped before the update")
    assert isinstance(err, FloatingPointError)
    assert describe_error(err) == ("non-finite values at global step 12: loss nan; stopped before the update", 1)
