"""Bad data, bad configs and numerical faults, end to end through ``vit fit`` (in-process, tiny network).

Each failure must come before any training, name the file or the field, and leave no checkpoint behind; a
non-finite step must stop the run (or be skipped) without a NaN reaching the weights or the last checkpoint.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from vit.cli import main
from vit.data import ImageDataModule
from vit.train import MAEPretrainer
from vit.train.last_checkpoint import SIGTERM_EXIT_CODE, LastCheckpoint
from vit.train.nonfinite import NonFiniteGuard

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "mae" / "vit_tiny_digits.yaml"
NET = {"patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2,
       "decoder_embed_dim": 16, "decoder_depth": 1, "decoder_num_heads": 2}
TINY = ["--model.init_args.model_kwargs", json.dumps(NET), "--trainer.enable_model_summary", "false",
        "--trainer.limit_val_batches", "1"]
CKPT_DIR = Path("runs/mae_tiny_digits/checkpoints")  # the recipe's, under the test's working directory
BAD = ("truncated.jpg", "empty.png", "text pretending.jpg")


def fit(*args: str) -> int:
    return main(["fit", "--config", str(RECIPE), *TINY, *args])


class NaNInjector(Callback):
    """Turns the loss into NaN (in place, before backward) at the given global steps, on the given rank."""

    def __init__(self, steps: list[int], rank: int | None = None) -> None:
        self.steps, self.rank = set(steps), rank

    def on_before_backward(self, trainer: Trainer, pl_module, loss: torch.Tensor) -> None:
        if trainer.global_step in self.steps and self.rank in (None, trainer.global_rank):
            loss.mul_(float("nan"))


def _inject(*steps: int) -> str:
    spec = {"class_path": "test_reliability.NaNInjector", "init_args": {"steps": list(steps)}}
    return f"--trainer.callbacks+={json.dumps(spec)}"


# --- bad data ---------------------------------------------------------------------------------------------------


def _rgb(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture
def messy_tree(tmp_path) -> Path:
    """train/{cat,dog} and val/{cat,dog}: every odd image a user's folder holds, three unreadable files."""
    root = tmp_path / "messy"
    cat, dog = root / "train" / "cat", root / "train" / "dog"
    for d in (cat, dog, root / "val" / "cat", root / "val" / "dog"):
        d.mkdir(parents=True)
    Image.fromarray(_rgb(40, 30, 0)).convert("L").save(cat / "grey.png")
    Image.fromarray(np.dstack([_rgb(32, 32, 1), np.full((32, 32), 128, np.uint8)])).save(cat / "rgba.png")
    Image.fromarray(_rgb(32, 32, 2)).convert("P", palette=Image.Palette.ADAPTIVE).save(cat / "palette.png")
    Image.fromarray((np.arange(48 * 48, dtype=np.uint16) * 28).reshape(48, 48)).save(cat / "sixteen bit.png")
    Image.fromarray(_rgb(2000, 3000, 3)).save(cat / "huge.jpg", quality=70)
    Image.fromarray(_rgb(1, 1, 4)).save(cat / "one pixel.png")
    Image.fromarray(_rgb(32, 32, 5)).save(cat / "chat noir ünïcødé 猫.png")
    jpeg = cat / "huge.jpg"
    (cat / "truncated.jpg").write_bytes(jpeg.read_bytes()[:2000])
    (cat / "empty.png").write_bytes(b"")
    (cat / "text pretending.jpg").write_text("not an image")
    (cat / "notes.txt").write_text("ignored: not an image extension")
    for i in range(6):
        Image.fromarray(_rgb(36, 36, 10 + i)).save(dog / f"dog {i}.jpg")
    for cls in ("cat", "dog"):
        Image.fromarray(_rgb(32, 32, 20)).save(root / "val" / cls / "v.png")
    return root


def _data(root: Path, *args: str) -> list[str]:
    return ["--data.root", str(root), "--data.batch_size", "4", "--data.drop_last", "false", *args]


def _error_line(caplog) -> str:
    """The one ``vit: error:`` line the command logged."""
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("vit: error:")]
    assert len(lines) == 1 and "\n" not in lines[0], caplog.text
    return lines[0]


def test_scan_reports_every_unreadable_file_before_training(messy_tree, tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.WARNING, logger="vit")
    assert fit(*_data(messy_tree, "--data.scan", "true"), "--trainer.max_steps", "2") == 2
    line = _error_line(caplog)
    assert "scan found 3 unreadable" in line and "--data.on_bad_image skip" in line
    for name in BAD:
        assert name in line
    assert "notes.txt" not in line
    assert not Path("runs").exists(), "nothing may be written before the data is known to be good"


def test_unreadable_file_stops_the_run_naming_it(messy_tree, tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.ERROR, logger="vit")
    assert fit(*_data(messy_tree), "--trainer.max_epochs", "1") == 2
    line = _error_line(caplog)
    assert line.startswith("vit: error: cannot read image") and any(name in line for name in BAD), line
    assert "--data.scan true" in line


def test_flat_folder_pretrains_and_is_one_line_for_classification(tmp_path, monkeypatch, caplog) -> None:
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(8):
        Image.fromarray(_rgb(32, 32, i)).save(flat / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    assert fit("--data.root", str(flat), "--data.batch_size", "4", "--trainer.max_steps", "2") == 0
    assert torch.load(CKPT_DIR / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 2
    caplog.set_level(logging.ERROR, logger="vit")
    recipe = ROOT / "configs" / "supervised" / "vit_tiny_digits.yaml"
    assert main(["fit", "--config", str(recipe), "--data.root", str(flat), "--trainer.default_root_dir",
                 "classify"]) == 2
    assert "classification needs root/<class>/<image files>" in _error_line(caplog)
    assert not Path("classify").exists()


def test_skip_trains_on_every_readable_image_and_reports_the_rest(messy_tree, tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.WARNING, logger="vit")
    assert fit(*_data(messy_tree, "--data.on_bad_image", "skip", "--data.scan", "true"),
               "--trainer.max_epochs", "1", "--trainer.log_every_n_steps", "1") == 0
    text = caplog.text
    assert "scan found 3 unreadable" in text
    skipped = {m.getMessage() for m in caplog.records if "skipping unreadable image" in m.getMessage()}
    assert all(any(name in m for m in skipped) for name in BAD), "each skipped file is named"
    assert not any(good in m for m in skipped for good in ("grey", "rgba", "palette", "sixteen", "huge", "pixel",
                                                            "ünïcødé", "dog")), "odd but readable images load"
    ckpt = torch.load(CKPT_DIR / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 4  # 16 samples (unreadable ones replaced by readable ones) in batches of 4
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


def test_skipped_image_count_reaches_the_metrics(messy_tree, tmp_path, monkeypatch) -> None:
    """Two workers both meet some bad files (each takes the next file in place of one): still 3, not more."""
    monkeypatch.chdir(tmp_path)
    assert fit(*_data(messy_tree, "--data.on_bad_image", "skip", "--data.num_workers", "2"),
               "--trainer.max_epochs", "1", "--trainer.log_every_n_steps", "1") == 0
    metrics = next(Path("runs").rglob("metrics.csv"))
    with open(metrics) as f:
        counts = [float(r["data/skipped_images"]) for r in csv.DictReader(f) if r.get("data/skipped_images")]
    assert counts and counts[-1] == len(BAD), counts


@pytest.mark.parametrize("layout", ["empty class", "no class", "no image at all"])
def test_empty_class_or_data_set_is_an_error_before_training(tmp_path, monkeypatch, caplog, layout) -> None:
    root = tmp_path / "data"
    (root / "cat").mkdir(parents=True)
    if layout == "empty class":
        Image.fromarray(_rgb(32, 32, 0)).save(root / "cat" / "a.png")
        (root / "bird").mkdir()
    elif layout == "no class":
        (root / "cat").rmdir()
    else:
        (root / "cat" / "readme.txt").write_text("no images here")
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.ERROR, logger="vit")
    assert fit("--data.root", str(root), "--data.batch_size", "1", "--trainer.max_steps", "1") == 2
    assert {"empty class": "bird", "no class": "no class folders", "no image at all": "has no image files"}[
        layout] in _error_line(caplog)
    assert not Path("runs").exists(), "the folder is checked before the run writes anything"


# --- bad configs --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model.init_args.mask_ratio", "1.2"], "mask_ratio must be in [0, 1), got 1.2"),
        (["--model.init_args.mask_ratio", "-0.1"], "mask_ratio must be in [0, 1), got -0.1"),
        (["--model.init_args.model", "mae_vit_bse_patch16"], "did you mean mae_vit_base_patch16"),
        (["--data.img_size", "30"], "not divisible by patch size 4"),
        (["--model.init_args.model_kwargs", json.dumps(dict(NET, embed_dim=36, num_heads=8))],
         "embed_dim 36 is not divisible by num_heads 8"),
        (["--data.batch_size", "0"], "batch_size must be positive, got 0"),
        (["--model", "vit.train.ImageClassifier", "--model.init_args.model", "vit_tiny_patch16_224",
          "--model.init_args.num_classes", "0"], "num_classes must be positive"),
    ],
    ids=["mask>1", "mask<0", "model name", "img/patch", "dim/heads", "batch", "num_classes"],
)
def test_bad_config_is_a_clear_error_before_any_work(tmp_path, monkeypatch, caplog, args, message) -> None:
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.ERROR, logger="vit")
    assert fit(*args) == 2
    assert message in caplog.text
    assert "Given value type" not in caplog.text, "jsonargparse's union report is not shown"
    assert not Path("runs").exists()


def test_bad_config_through_the_console_script(tmp_path) -> None:
    vit = str(Path(sys.executable).with_name("vit"))
    out = subprocess.run([vit, "fit", "--config", str(RECIPE), "--model.init_args.mask_ratio", "1.2"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "vit: error: model.mask_ratio must be in [0, 1), got 1.2" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "runs").exists()


def test_resuming_another_architecture_names_the_fields(tmp_path, monkeypatch, caplog) -> None:
    """The config changed (embed_dim 64 -> 32) and the run is resumed with --ckpt_path last: an error, not a
    traceback from load_state_dict. (An explicit checkpoint path is different: LightningCLI then takes the
    model's hyperparameters from the checkpoint itself.)"""
    other = MAEPretrainer(model="mae_vit_tiny_patch16", model_kwargs=dict(NET, embed_dim=64), img_size=32)
    monkeypatch.chdir(tmp_path)
    CKPT_DIR.mkdir(parents=True)
    torch.save({"state_dict": other.state_dict(), "hyper_parameters": dict(other.hparams), "epoch": 0,
                "global_step": 5}, CKPT_DIR / "last.ckpt")
    caplog.set_level(logging.ERROR, logger="vit")
    assert fit("--ckpt_path", "last") == 2
    assert "another architecture" in caplog.text
    assert "model.model_kwargs.embed_dim: checkpoint 64, config 32" in caplog.text
    assert sorted(p.name for p in CKPT_DIR.iterdir()) == ["last.ckpt"]


def test_a_classifier_resumes_and_a_changed_one_is_named(tmp_path, monkeypatch, caplog) -> None:
    """A classifier builds its network in configure_model, after the resume check: the check must still see it."""
    monkeypatch.chdir(tmp_path)
    net = {"patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2}
    args = ["fit", "--config", str(ROOT / "configs" / "supervised" / "vit_tiny_digits.yaml"), "--data.batch_size", "16",
            "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
            "--trainer.enable_model_summary", "false"]
    assert main([*args, "--model.init_args.model_kwargs", json.dumps(net), "--trainer.max_epochs", "1"]) == 0
    assert main([*args, "--model.init_args.model_kwargs", json.dumps(net), "--trainer.max_epochs", "2",
                 "--ckpt_path", "last"]) == 0
    last = Path("runs/supervised_tiny_digits/checkpoints/last.ckpt")
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 4
    caplog.set_level(logging.ERROR, logger="vit")
    assert main([*args, "--model.init_args.model_kwargs", json.dumps(dict(net, embed_dim=64)),
                 "--trainer.max_epochs", "3", "--ckpt_path", "last"]) == 2
    assert "fields that differ: model.model_kwargs.embed_dim: checkpoint 32, config 64. " in caplog.text


# --- numerical faults -------------------------------------------------------------------------------------------


def test_nan_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.chdir(tmp_path)
    assert fit("--data.batch_size", "32", "--trainer.max_steps", "15", _inject(12)) == 1  # a runtime fault
    errors = [r.getMessage() for r in caplog.records if r.getMessage().startswith("vit: error:")]
    assert len(errors) == 1 and "non-finite values at global step 12" in errors[0], errors
    assert "last.ckpt" in errors[0] and "\n" not in errors[0]
    ckpt = torch.load(CKPT_DIR / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 10  # the recipe saves every 10 steps; nothing was written after the fault
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


class _Snapshots(Callback):
    def __init__(self) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.moments: dict[int, list[torch.Tensor]] = {}

    def on_train_batch_end(self, trainer: Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.weights[trainer.global_step] = {k: v.clone() for k, v in pl_module.state_dict().items()}
        state = trainer.optimizers[0].state
        self.moments[trainer.global_step] = [s["exp_avg"].clone() for s in state.values()]


def _tiny_fit(tmp_path: Path, guard: NonFiniteGuard, steps: list[int], max_steps: int) -> _Snapshots:
    snaps = _Snapshots()
    model = MAEPretrainer(model="mae_vit_tiny_patch16", model_kwargs=NET, img_size=32, warmup_epochs=0)
    trainer = Trainer(max_epochs=1, max_steps=max_steps, limit_val_batches=0, enable_progress_bar=False,
                      enable_model_summary=False, log_every_n_steps=1, default_root_dir=tmp_path,
                      logger=CSVLogger(tmp_path, name="", version=""),
                      callbacks=[NaNInjector(steps), guard, snaps, LastCheckpoint(str(tmp_path / "ckpt"))])
    trainer.fit(model, ImageDataModule(task="pretrain", batch_size=16, img_size=32))
    return snaps


def test_skip_drops_the_update_and_logs_the_count(tmp_path) -> None:
    snaps = _tiny_fit(tmp_path, NonFiniteGuard("skip"), steps=[3], max_steps=6)
    # the batch seen after 3 steps had a NaN loss: weights and AdamW moments stay exactly as they were
    changed = [k for k in snaps.weights[3] if not torch.equal(snaps.weights[3][k], snaps.weights[4][k])]
    assert changed == [], changed
    assert all(torch.equal(a, b) for a, b in zip(snaps.moments[3], snaps.moments[4], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(snaps.moments[4], snaps.moments[5], strict=True))
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())
    with open(tmp_path / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/nonfinite_skipped")]
    assert rows and float(rows[-1]["train/nonfinite_skipped"]) == 1.0


def test_skip_gives_up_after_too_many_in_a_row(tmp_path) -> None:
    with pytest.raises(FloatingPointError, match="3 steps in a row"):
        _tiny_fit(tmp_path, NonFiniteGuard("skip", max_consecutive_skips=2), steps=[2, 3, 4], max_steps=8)


# --- shipped recipes --------------------------------------------------------------------------------------------

RECIPES = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if p.parent.name not in ("scale", "base"))


def _name(p: Path) -> str:
    return f"{p.parent.name}/{p.name}"


@pytest.fixture(scope="module")
def effective() -> dict[Path, dict]:
    """Each recipe as the run sees it: merged over configs/base/trainer.yaml by ``vit fit --print_config``."""
    configs = {}
    for recipe in RECIPES:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            main(["fit", "--config", str(recipe), "--print_config"])
        configs[recipe] = yaml.safe_load(out.getvalue())
    return configs


@pytest.mark.parametrize("recipe", RECIPES, ids=_name)
def test_recipes_use_bf16_not_fp16_and_clip_gradients(recipe: Path, effective) -> None:
    trainer = effective[recipe]["trainer"]
    assert str(trainer.get("precision")) in ("None", "32-true", "bf16-mixed", "bf16-true"), trainer.get("precision")
    assert float(trainer.get("gradient_clip_val") or 0) > 0, "gradient clipping is on in every recipe"
    if trainer.get("accelerator") == "gpu":
        assert trainer.get("precision") == "bf16-mixed"


@pytest.mark.parametrize("recipe", RECIPES, ids=_name)
def test_recipes_keep_last_ckpt_current(recipe: Path, effective) -> None:
    callbacks = effective[recipe]["trainer"]["callbacks"]
    assert "vit.train.last_checkpoint.LastCheckpoint" in [cb["class_path"] for cb in callbacks]
    for cb in callbacks:
        args = cb.get("init_args") or {}
        # ModelCheckpoint(save_last=True, monitor=...) rewrites last.ckpt only when the monitored metric improves
        assert not (args.get("save_last") and args.get("monitor")), "a monitored save_last goes stale"


@pytest.mark.parametrize(("accelerator", "cuda", "bf16", "expected"), [
    ("auto", True, True, "bf16-mixed"), ("gpu", True, True, "bf16-mixed"), ("auto", True, False, "32-true"),
    ("auto", False, False, "32-true"), ("cpu", True, True, "32-true"),
])
def test_unset_precision_is_bf16_on_a_gpu_and_fp32_on_a_cpu(monkeypatch, accelerator, cuda, bf16, expected) -> None:
    from vit.lightning_cli import _default_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert _default_precision(accelerator) == expected


# --- pre-emption: a run stuck waiting for a batch still ends -----------------------------------------------------


class _Linear(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(4, 1)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.net(batch).square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _LinearWithVal(_Linear):
    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("val/loss", self.net(batch).square().mean())


class _Hangs(Dataset):
    """Items 0 .. ok-1 load; item ``ok`` hangs (a FIFO, a dead network mount) after setting ``blocked``. It gives
    up after 30 s, so that a regression fails the test instead of hanging it."""

    def __init__(self, ok: int) -> None:
        self.ok, self.blocked = ok, threading.Event()

    def __len__(self) -> int:
        return 64

    def __getitem__(self, index: int) -> torch.Tensor:
        if index >= self.ok:
            self.blocked.set()
            threading.Event().wait(timeout=30)
            raise RuntimeError("the stuck run was not ended")
        return torch.full((4,), float(index))


def _stuck_fit(tmp_path: Path, grace: float, signals: int) -> tuple[SystemExit, LastCheckpoint, float]:
    """Train until the loader hangs at step 2, then send ``signals`` SIGTERMs; the exit and the seconds it took."""
    data = _Hangs(ok=8)
    last = LastCheckpoint(str(tmp_path / "ckpt"), every_n_train_steps=1, sigterm_grace=grace)
    trainer = Trainer(max_steps=50, enable_progress_bar=False, enable_model_summary=False, logger=False,
                      callbacks=[last], default_root_dir=tmp_path)
    sent: list[float] = []

    def terminate() -> None:
        data.blocked.wait(timeout=60)
        for _ in range(signals):
            time.sleep(0.2)
            sent.append(time.monotonic())
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=terminate, daemon=True).start()
    with pytest.raises(SystemExit) as err:
        trainer.fit(_Linear(), DataLoader(data, batch_size=4))
    return err.value, last, time.monotonic() - sent[0]


def test_a_stuck_run_ends_after_the_grace_period(tmp_path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="vit")
    exit_, last, took = _stuck_fit(tmp_path, grace=0.5, signals=1)
    assert exit_.code == SIGTERM_EXIT_CODE
    assert 0.5 <= took < 10, took
    assert "no batch finished for 0.5 s after SIGTERM" in caplog.text
    assert "global step 2" in caplog.text, "the message names the checkpoint the resume starts from"
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["global_step"] == 2
    assert signal.getsignal(signal.SIGTERM) is not last._stuck._handle, "the handler is removed again"
    assert last._stuck._done.is_set(), "no timer is left to end this process later"


def test_a_second_sigterm_ends_a_stuck_run_at_once(tmp_path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="vit")
    exit_, _, _ = _stuck_fit(tmp_path, grace=0, signals=2)
    assert exit_.code == SIGTERM_EXIT_CODE
    assert "a second SIGTERM: ending the run now" in caplog.text


class _TermDuringValidation(Callback):
    def on_validation_batch_start(self, trainer: Trainer, *args) -> None:
        if not trainer.sanity_checking:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_during_validation_exits_143_not_0(tmp_path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="vit")
    last = LastCheckpoint(str(tmp_path / "ckpt"), every_n_train_steps=3)
    trainer = Trainer(max_steps=20, limit_train_batches=4, limit_val_batches=3, num_sanity_val_steps=0,
                      enable_progress_bar=False, enable_model_summary=False, logger=False, default_root_dir=tmp_path,
                      callbacks=[last, _TermDuringValidation()])
    data = DataLoader(torch.randn(16, 4), batch_size=4)
    with pytest.raises(SystemExit) as err:
        trainer.fit(_LinearWithVal(), data, data)
    assert err.value.code == SIGTERM_EXIT_CODE
    assert "SIGTERM during validation: stopping without a save; --ckpt_path last continues from" in caplog.text
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["global_step"] == 3


# --- chaos: kill-and-resume at random moments --------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="tools/chaos.py forks its runs")
def test_chaos_trials_resume_bitwise_equal(tmp_path) -> None:
    """tools/chaos.py at N=2: a SIGKILL mid training step, a SIGTERM during validation; both resumed runs end with
    the uninterrupted run's weights and AdamW state, bit for bit. In a fresh interpreter, as a user runs it: the
    tool forks its runs, and autograd refuses to run in a child forked from a process that already used it."""
    code = ("import dataclasses, json, sys; sys.path.insert(0, 'tools'); import chaos; lines = []; "
            f"trials = chaos.chaos(2, seed=0, jobs=3, workdir={str(tmp_path)!r}, report=lines.append); "
            "print(json.dumps({'trials': [dataclasses.asdict(t) for t in trials], 'lines': lines}))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    trials, lines = result["trials"], result["lines"]
    assert [(t["signal"], t["at"]) for t in trials] == [("SIGKILL", "train"), ("SIGTERM", "val")]
    assert [t["exit_code"] for t in trials] == [-signal.SIGKILL, SIGTERM_EXIT_CODE], "\n".join(lines)
    assert lines[-1] == "2 of 2 bitwise equal", "\n".join(lines)
