"""litdata shards: ``vit data optimize``, StreamingDataModule, exact resume after SIGKILL, and DDP on two CPU processes.

The tiny tree has 3 classes × 8 train and × 2 val PNGs of 12×12 seeded noise, a broken JPEG and a text file. Pixel
(0, 0) of every image holds its id (red) and class (green), so a batch made with ``aug="none"``, mean 0 and std 1
says which files it holds. Runs are interrupted in this process by raising in a callback, and a real ``vit fit``
process from the digits shards by SIGKILL; both resume bitwise.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from lightning import Callback, Trainer
from litdata import StreamingDataset
from PIL import Image

from vit.cli import main as vit_main
from vit.data import BadImageError, ImageDataModule, StreamingDataModule, apply_transform
from vit.data.builtin import MANIFEST, prepare_digits
from vit.data.command import main as data_main
from vit.data.optimize import optimize_folder
from vit.data.shard_dataset import collate_images, sample_seed
from vit.data.shards import decode_image, read_meta
from vit.train import ImageClassifier, MAEPretrainer
from vit.train.exact_resume import ExactResume
from vit.train.last_checkpoint import LastCheckpoint

CLASSES = ["ant", "bee", "cat"]
PER_CLASS = {"train": 8, "val": 2}
SIZE = 12
NET = {"patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2,
       "decoder_embed_dim": 16, "decoder_depth": 1, "decoder_num_heads": 2}
PLAIN = dict(img_size=SIZE, task="classify", aug="none", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), crop_pct=1.0)
TIMEOUT = 300
ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "mae" / "vit_tiny_digits.yaml"


def _write_tree(root: Path) -> dict[str, list[Path]]:
    """The tiny tree (see module docstring); returns the image files of each split."""
    files: dict[str, list[Path]] = {"train": [], "val": []}
    uid = 0
    for split, n in PER_CLASS.items():
        for label, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                uid += 1
                pixels = np.random.default_rng(uid).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
                pixels[0, 0] = (uid, 80 * label, 7)
                path = root / split / name / f"{i:02d}.png"
                Image.fromarray(pixels).save(path)
                files[split].append(path)
    (root / "train" / "bee" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "train" / "ant" / "notes.txt").write_text("not an image")
    return files


def _ids(images: torch.Tensor) -> list[int]:
    """The ids in pixel (0, 0) of a batch loaded with PLAIN settings."""
    return [round(v) for v in (images[:, 0, 0, 0] * 255).tolist()]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> tuple[Path, dict[str, list[Path]]]:
    root = tmp_path_factory.mktemp("tree")
    return root, _write_tree(root)


@pytest.fixture(scope="module")
def shards(tree, tmp_path_factory):
    """The tree written with two workers; returns (shards folder, summary)."""
    out = tmp_path_factory.mktemp("shards") / "out"
    return out, optimize_folder(tree[0], out, num_workers=2)


@pytest.fixture(scope="module")
def digits_shards(tmp_path_factory):
    """The built-in digits as shards; returns (shards folder, summary)."""
    out = tmp_path_factory.mktemp("digits") / "shards"
    return out, optimize_folder("digits", out)


@pytest.fixture(scope="module")
def unverified(tree, tmp_path_factory) -> Path:
    """The tree written without decoding first: the broken JPEG is in the shards."""
    out = tmp_path_factory.mktemp("unverified") / "out"
    optimize_folder(tree[0], out, verify=False)
    return out


# --- vit data optimize ------------------------------------------------------------------------------------------


def test_optimize_summary_names_skipped_files(tree, shards) -> None:
    root, files = tree
    out, summary = shards
    assert summary.classes == CLASSES
    assert summary.images == {"train": 24, "val": 6}
    assert summary.image_bytes["train"] == sum(p.stat().st_size for p in files["train"])
    skipped = dict(summary.skipped)
    assert set(skipped) == {str(root / "train" / "bee" / "broken.jpg"), str(root / "train" / "ant" / "notes.txt")}
    assert "cannot read image" in skipped[str(root / "train" / "bee" / "broken.jpg")]
    meta = read_meta(str(out))
    assert meta["classes"] == CLASSES and meta["splits"]["val"]["images"] == 6
    assert {s["path"] for s in meta["skipped"]} == set(skipped)


def test_shards_hold_the_files_bytes_labels_and_paths(tree, shards) -> None:
    _, files = tree
    out, _ = shards
    for split in ("train", "val"):
        ds = StreamingDataset(str(out / split))
        samples = [ds[i] for i in range(len(ds))]
        assert len(samples) == len(files[split])
        by_path = {bytes(s["path"]).decode(): s for s in samples}
        assert set(by_path) == {str(p) for p in files[split]}
        for path, s in by_path.items():
            assert s["image"] == Path(path).read_bytes(), f"{path}: stored bytes differ from the file"
            assert CLASSES[s["label"]] == Path(path).parent.name
        # index = position in the sorted listing (the broken file keeps its number), whatever order litdata wrote
        indices = sorted(s["index"] for s in samples)
        assert len(set(indices)) == len(indices) and indices[-1] <= len(indices)
        assert [bytes(s["path"]).decode() for s in sorted(samples, key=lambda s: s["index"])] == sorted(by_path)


def test_optimize_digits_matches_the_builtin_tree(digits_shards) -> None:
    summary = digits_shards[1]
    counts = json.loads((prepare_digits(32) / MANIFEST).read_text())["counts"]
    assert summary.classes == [str(i) for i in range(10)]
    assert summary.images == {split: sum(c.values()) for split, c in counts.items()}
    assert summary.skipped == []


def test_val_split_holds_out_part_of_each_class(tree, tmp_path) -> None:
    summary = optimize_folder(tree[0] / "train", tmp_path / "out", val_split=0.25)
    assert sum(summary.images.values()) == 24 and 6 <= summary.images["val"] <= 7  # 25 files, one unreadable
    val = StreamingDataset(str(tmp_path / "out" / "val"))
    counts = np.bincount([val[i]["label"] for i in range(len(val))], minlength=3)
    assert all(2 <= c <= 3 for c in counts), counts


@pytest.mark.slow
def test_vit_data_optimize_subprocess(tree, tmp_path) -> None:
    out = tmp_path / "shards"
    vit = str(Path(sys.executable).with_name("vit"))
    proc = subprocess.run([vit, "data", "optimize", str(tree[0]), "--out", str(out), "--num-workers", "1"],
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote 30 images in 3 classes from {tree[0]} to {out}" in proc.stdout
    assert "train: 24 images" in proc.stdout and "val: 6 images" in proc.stdout
    assert "skipped: 2 file(s):" in proc.stdout and "broken.jpg: cannot read image" in proc.stdout
    assert (out / "vitkit.json").is_file()


@pytest.mark.parametrize("case", ["missing", "not_empty", "val_and_split"])
def test_vit_data_errors_are_one_line_naming_the_folder(tree, shards, tmp_path, capsys, case) -> None:
    src, out = str(tree[0]), str(tmp_path / "new")
    argv, named = {
        "missing": (["optimize", str(tmp_path / "nope"), "--out", out], str(tmp_path / "nope")),
        "not_empty": (["optimize", src, "--out", str(shards[0])], str(shards[0] / "train")),
        "val_and_split": (["optimize", src, "--out", out, "--val-split", "0.2"], src),
    }[case]
    assert data_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vit data: error: ") and named in err[0], err


# --- StreamingDataModule ----------------------------------------------------------------------------------------


def test_module_reads_classes_and_preprocessing_like_the_folder_module(tree, shards) -> None:
    dm = StreamingDataModule(str(shards[0]), img_size=SIZE, crop_pct=0.9)
    assert dm.class_names == CLASSES and dm.num_classes == 3
    assert dm.preprocessing == ImageDataModule(str(tree[0]), img_size=SIZE, crop_pct=0.9).preprocessing


def test_local_url_is_read_through_the_litdata_cache(shards, tmp_path) -> None:
    dm = StreamingDataModule(f"local:{shards[0]}", batch_size=6, cache_dir=str(tmp_path / "cache"), **PLAIN)
    assert dm.class_names == CLASSES
    dm.setup("fit")
    images, labels = next(iter(dm.val_dataloader()))
    assert images.shape == (6, 3, SIZE, SIZE) and labels.shape == (6,)
    assert any((tmp_path / "cache").rglob("*.bin")), "chunks should be cached"


def test_one_epoch_reads_every_train_image_once(shards) -> None:
    dm = StreamingDataModule(str(shards[0]), batch_size=4, **PLAIN)
    dm.setup("fit")
    ids = [i for images, _ in dm.train_dataloader() for i in _ids(images)]
    assert sorted(ids) == list(range(1, 25))


def test_augmentation_is_a_function_of_seed_epoch_and_sample_index(shards) -> None:
    dm = StreamingDataModule(str(shards[0]), img_size=8, task="pretrain", seed=3)
    dm.setup("fit")
    ds = dm.train_dataset
    raw = StreamingDataset(str(shards[0] / "train"))[5]
    ds.current_epoch = 2
    image, label = ds.decode(raw)
    expected = apply_transform(ds.image_transform, decode_image(raw["image"], "x"), sample_seed(3, 2, raw["index"]))
    assert torch.equal(image, expected) and label == raw["label"]

    def epoch_images(num_workers: int, epoch: int) -> set[bytes]:
        dm = StreamingDataModule(str(shards[0]), img_size=8, task="pretrain", seed=3, batch_size=4,
                                 num_workers=num_workers)
        dm.setup("fit")
        loader = dm.train_dataloader()
        loader.set_epoch(epoch)
        return {img.numpy().tobytes() for images, _ in loader for img in images}

    # other workers read other samples in another order, yet every sample is augmented the same
    assert epoch_images(0, 0) == epoch_images(2, 0)
    assert epoch_images(0, 0).isdisjoint(epoch_images(0, 1)), "a new epoch should augment anew"


def test_train_mae_and_classifier_from_shards(shards, tmp_path) -> None:
    def fit(model, task: str) -> Trainer:
        dm = StreamingDataModule(str(shards[0]), img_size=SIZE, batch_size=4, task=task)
        trainer = Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, accelerator="cpu", logger=False,
                          enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                          default_root_dir=tmp_path)  # the confusion figures go under the run's root
        trainer.fit(model, dm)
        return trainer

    mae = fit(MAEPretrainer("mae_vit_tiny_patch16", model_kwargs=NET, img_size=SIZE, warmup_epochs=0), "pretrain")
    assert mae.global_step == 2 and torch.isfinite(mae.callback_metrics["val/loss"])
    encoder = {k: v for k, v in NET.items() if not k.startswith("decoder")}
    clf = ImageClassifier("vit_tiny_patch16_224", model_kwargs={**encoder, "img_size": SIZE}, warmup_epochs=0)
    trainer = fit(clf, "classify")
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["val/loss"])
    assert clf.num_classes == 3 and clf.class_names == CLASSES, "classes come from the shards' metadata"


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_bad_image_in_shards_follows_the_policy(tree, unverified, policy, caplog) -> None:
    dm = StreamingDataModule(str(unverified), batch_size=5, drop_last=False, on_bad_image=policy, **PLAIN)
    dm.setup("fit")
    broken = str(tree[0] / "train" / "bee" / "broken.jpg")
    if policy == "error":
        with pytest.raises(BadImageError, match="broken.jpg"):
            list(dm.train_dataloader())
        return
    batches = list(dm.train_dataloader())
    assert [len(labels) for _, labels in batches] == [5] * 5, "25 samples: the broken one's place is filled"
    ids = [i for images, _ in batches for i in _ids(images)]
    assert set(ids) == set(range(1, 25)) and len(ids) == 25, "one good image stands in for the broken one"
    assert dm.num_skipped == 1
    assert broken in caplog.text


def test_a_batch_of_only_unreadable_images_is_an_error() -> None:
    images, labels = collate_images([(None, 0), (torch.ones(3, 2, 2), 1), (None, 2)])
    assert labels.tolist() == [1, 1, 1] and images.shape == (3, 3, 2, 2)
    with pytest.raises(BadImageError, match="all 2 images of a batch are unreadable"):
        collate_images([(None, 0), (None, 1)])


def test_input_dir_must_hold_shards(tmp_path) -> None:
    with pytest.raises(ValueError, match="input_dir must be an existing folder"):
        StreamingDataModule(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="vit data optimize"):
        _ = StreamingDataModule(str(tmp_path)).num_classes


# --- exact resume, in this process (the SIGKILL of a `vit fit` process is tested below) --------------------------

MAX_STEPS = 15  # 6 steps an epoch (24 images, batch 4, 2 workers); last.ckpt every 4 steps and at epoch ends


class _Interrupt(RuntimeError):
    """Stops a run from a callback, leaving only its checkpoints behind."""


class _StopAt(Callback):
    """Raises before global step ``step``; records the step a run started (or resumed) at."""

    def __init__(self, step: int) -> None:
        self.step, self.first_step = step, None

    def on_train_batch_start(self, trainer: Trainer, pl_module, batch, batch_idx: int) -> None:
        if self.first_step is None:
            self.first_step = trainer.global_step
        if trainer.global_step == self.step:
            raise _Interrupt(f"stopped before step {self.step}")


def _fit(shards_dir: Path, root: Path, stop_at: int = -1, resume: bool = False) -> tuple[Trainer, MAEPretrainer]:
    """MAE pretraining (crops and flips) from shards with two loader workers; ``stop_at`` interrupts it."""
    torch.manual_seed(0)
    dm = StreamingDataModule(str(shards_dir), img_size=SIZE, batch_size=4, num_workers=2, task="pretrain", seed=1)
    model = MAEPretrainer("mae_vit_tiny_patch16", model_kwargs=NET, img_size=SIZE, warmup_epochs=1)
    callbacks = [ExactResume(seed=0), LastCheckpoint(dirpath=str(root / "ckpt"), every_n_train_steps=4),
                 _StopAt(stop_at)]
    trainer = Trainer(default_root_dir=str(root), accelerator="cpu", devices=1, max_steps=MAX_STEPS, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1, callbacks=callbacks)
    trainer.fit(model, dm, ckpt_path="last" if resume else None)
    return trainer, model


@pytest.fixture(scope="module")
def straight(shards, tmp_path_factory) -> tuple[Trainer, MAEPretrainer]:
    """The uninterrupted run."""
    return _fit(shards[0], tmp_path_factory.mktemp("straight"))


@pytest.mark.slow
@pytest.mark.parametrize(("stop_at", "resumes_at"), [(9, 8), (7, 6)], ids=["mid_epoch", "after_epoch_end_save"])
def test_interrupted_and_resumed_run_ends_bitwise_equal(shards, straight, tmp_path, stop_at, resumes_at) -> None:
    """Stopped before step 9 it resumes from step 8, mid-epoch 1, and crosses that epoch's end; before step 7 it
    resumes from the epoch-end save at 6, where Lightning drops the loader state (issue #20550)."""
    with pytest.raises(_Interrupt):
        _fit(shards[0], tmp_path, stop_at=stop_at)
    trainer, resumed = _fit(shards[0], tmp_path, resume=True)
    assert next(cb for cb in trainer.callbacks if isinstance(cb, _StopAt)).first_step == resumes_at
    assert straight[0].global_step == trainer.global_step == MAX_STEPS
    a, b = straight[1].state_dict(), resumed.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    sa, sb = (t.optimizers[0].state_dict()["state"] for t in (straight[0], trainer))
    for i in sa:
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), f"AdamW {k} differs after resume"


# --- real processes ---------------------------------------------------------------------------------------------


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    # one thread everywhere, this process included where it compares: the same thread count keeps sums bitwise equal
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    log = open(cwd / "log.txt", "a")  # noqa: SIM115 - the child writes it; closed with the process
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)


def _wait(proc: subprocess.Popen, cwd: Path) -> int:
    try:
        return proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"run in {cwd} did not finish:\n{(cwd / 'log.txt').read_text()[-4000:]}")


def _tests_on_path() -> dict[str, str]:
    """PYTHONPATH for a `vit` process that instantiates this file's callbacks by class_path."""
    return {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}


# --- DDP: two CPU processes, gloo, through `vit fit` -----------------------------------------------------------


class RankIds(Callback):
    """Records the ids of every training image a rank sees; at the end saves them with the rank's weights."""

    def __init__(self, out: str) -> None:
        self.out, self.ids = Path(out), []

    def on_train_batch_start(self, trainer: Trainer, pl_module, batch, batch_idx: int) -> None:
        self.ids += _ids(batch[0])

    def on_train_end(self, trainer: Trainer, pl_module) -> None:
        torch.save({"ids": self.ids, "world_size": trainer.world_size, "state_dict": pl_module.state_dict()},
                   self.out / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_ranks_read_disjoint_samples_and_end_equal(shards, tmp_path) -> None:
    probe = {"class_path": "test_streaming.RankIds", "init_args": {"out": str(tmp_path)}}
    overlay = {"trainer": {"callbacks+": [probe]}}
    (tmp_path / "overlay.yaml").write_text(yaml.safe_dump(overlay))
    plain = [a for k, v in PLAIN.items() for a in (f"--data.init_args.{k}", v if isinstance(v, str) else json.dumps(v))]
    cmd = [str(Path(sys.executable).with_name("vit")), "fit", "--config", str(RECIPE), "--config", "overlay.yaml",
           "--data.class_path", "vit.data.StreamingDataModule", "--data.init_args.input_dir", str(shards[0]), *plain,
           "--data.init_args.batch_size", "4", "--trainer.strategy", "ddp", "--trainer.devices", "2",
           "--trainer.accelerator", "cpu", "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "1",
           "--model.init_args.model_kwargs", json.dumps(NET), "--trainer.enable_model_summary", "false"]
    proc = _run(cmd, tmp_path, _tests_on_path())
    assert _wait(proc, tmp_path) == 0, (tmp_path / "log.txt").read_text()[-6000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    assert len(r0["ids"]) == len(r1["ids"]) == 12, "each rank reads half of the 24 train images"
    assert set(r0["ids"]).isdisjoint(r1["ids"]) and set(r0["ids"]) | set(r1["ids"]) == set(range(1, 25))
    for k, v in r0["state_dict"].items():
        assert torch.equal(v, r1["state_dict"][k]), f"{k} differs between ranks"


# --- through the `vit` command (LightningCLI, data chosen by class_path) -----------------------------------------

CLI_STEPS = 30  # 22 steps an epoch (1,437 digits, batch 64): the resumed part crosses the end of epoch 0


def _cli_args(shards_dir: Path, root: Path) -> list[str]:
    return ["fit", "--config", str(RECIPE),
            "--data.class_path", "vit.data.StreamingDataModule", "--data.init_args.input_dir", str(shards_dir),
            "--trainer.default_root_dir", str(root), "--trainer.max_steps", str(CLI_STEPS),
            "--model.init_args.model_kwargs", json.dumps(NET), "--trainer.limit_val_batches", "2",
            "--trainer.enable_model_summary", "false"]


class KillAt(Callback):
    """SIGKILLs its own process before global step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: Trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.slow
def test_vit_fit_streams_shards_and_resumes_bitwise_after_sigkill(digits_shards, tmp_path) -> None:
    shards_dir, straight, killed = digits_shards[0], tmp_path / "straight", tmp_path / "killed"
    killed.mkdir()
    (killed / "kill.yaml").write_text(yaml.safe_dump(
        {"trainer": {"callbacks+": [{"class_path": "test_streaming.KillAt", "init_args": {"step": 11}}]}}))
    vit = str(Path(sys.executable).with_name("vit"))
    env = _tests_on_path()
    proc = _run([vit, *_cli_args(shards_dir, killed), "--config", str(killed / "kill.yaml")], killed, env)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses run
    try:
        assert vit_main(_cli_args(shards_dir, straight)) == 0
    finally:
        torch.set_num_threads(threads)
    assert _wait(proc, killed) == -signal.SIGKILL, (killed / "log.txt").read_text()[-4000:]
    last = Path("checkpoints") / "last.ckpt"
    assert torch.load(killed / last, weights_only=False)["global_step"] == 10, "killed mid-epoch 0, after step 10"
    proc = _run([vit, *_cli_args(shards_dir, killed), "--ckpt_path", "last"], killed, env)
    assert _wait(proc, killed) == 0, (killed / "log.txt").read_text()[-4000:]
    a, b = (torch.load(d / last, weights_only=False) for d in (straight, killed))
    assert a["global_step"] == b["global_step"] == CLI_STEPS
    assert a["datamodule_hyper_parameters"]["input_dir"] == str(shards_dir)
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), f"{k} differs after resume"
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values(),
                      strict=True):
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"AdamW {k} differs after resume"
