"""Write an ImageFolder tree (or the built-in digits) once as litdata shards; vit.data.shards describes the layout.

Sources: ``SRC/train/<class>/<file>`` plus ``SRC/val/<class>/<file>``; or one ``SRC/<class>/<file>`` tree, of which
``val_split`` of every class is held out for val (``stratified_split``, seeded); or ``"digits"``, the built-in
digits tree. Files are stored byte for byte (PNG, JPEG, ... as they are), in a seeded random order: litdata
batches come from a few chunks at a time, so class-sorted chunks would make class-sorted batches. With ``verify``
every image is decoded once; an unreadable one is left out and named in the summary, like files whose extension
is not an image's. litdata's ``optimize`` runs ``num_workers`` processes, forked on Linux (a spawned one would
import torch and vitkit again, tens of seconds on a busy machine; the workers only read files and decode them with
PIL), spawned elsewhere; the process-wide multiprocessing start method litdata sets is put back afterwards.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vit.data.builtin import prepare_digits
from vit.data.datasets import IMG_EXTENSIONS, BadImageError, find_classes
from vit.data.shards import SPLITS, decode_image, write_meta
from vit.data.split import stratified_split

DIGITS = "digits"
DIGITS_SIZE = 32  # the size the digits recipes train at
START_METHOD = "fork" if sys.platform.startswith("linux") else "spawn"
Progress = Callable[[int, int], None]


@dataclass
class OptimizeSummary:
    """What ``optimize_folder`` wrote: per-split image counts and bytes, the classes, and every file left out."""

    out: str
    source: str
    classes: list[str]
    images: dict[str, int] = field(default_factory=dict)
    image_bytes: dict[str, int] = field(default_factory=dict)
    shard_bytes: dict[str, int] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def optimize_folder(
    src: str | os.PathLike,
    out: str | os.PathLike,
    num_workers: int = 1,
    val_split: float = 0.0,
    seed: int = 0,
    verify: bool = True,
    chunk_bytes: str = "64MB",
    progress: Progress | None = None,
) -> OptimizeSummary:
    """Write ``src`` as shards under ``out``/{train,val} plus ``out``/vitkit.json; ValueError naming what is wrong.

    Args:
        src: an ImageFolder tree (see module docstring) or ``"digits"``.
        out: a new or empty local folder.
        num_workers: litdata worker processes.
        val_split: fraction of each class held out for val, for a tree without a val folder.
        seed: the val split and the order samples are written in.
        verify: decode every image and leave out unreadable ones; False stores every file unread.
        chunk_bytes: litdata's chunk size (64MB: a few hundred ImageNet JPEGs per chunk).
        progress: called with (files done, files in all) about five times a second.
    """
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    roots = _split_roots(src, val_split)
    classes = find_classes(roots["train"])
    out_p = Path(out).expanduser()
    for split in SPLITS:
        if (out_p / split).is_dir() and any((out_p / split).iterdir()):
            raise ValueError(f"{str(out_p / split)!r} is not empty: remove it or choose another --out")
    listings = {split: _list_split(root, classes, split == "val") for split, root in roots.items()}
    if val_split > 0 and "val" not in roots:
        listings = _hold_out(listings["train"], val_split, seed)
    summary = OptimizeSummary(str(out_p), str(src), classes)
    summary.skipped = [s for listing in listings.values() for s in listing.ignored]
    total = sum(len(listing.items) for listing in listings.values())
    counter = mp.get_context(START_METHOD).Value("q", 0)
    with tempfile.TemporaryDirectory() as bad_dir, _polling(counter, total, progress):
        for split, listing in listings.items():
            if not listing.items:  # a val folder without images: no val shards
                continue
            order = np.random.default_rng([seed, SPLITS.index(split)]).permutation(len(listing.items))
            _write_split([listing.items[i] for i in order], out_p / split, num_workers, chunk_bytes,
                         _Encoder(verify, counter, bad_dir))
            bad = _read_bad(bad_dir)
            summary.skipped += bad
            bad_paths = {p for p, _ in bad}
            kept = [(p, label) for _, p, label in listing.items if p not in bad_paths]
            summary.images[split] = len(kept)
            summary.image_bytes[split] = sum(os.path.getsize(p) for p, _ in kept)
            summary.shard_bytes[split] = sum(f.stat().st_size for f in (out_p / split).iterdir())
    meta = {"classes": classes, "source": str(src), "stored": "file bytes as read, never re-encoded",
            "splits": {s: {"images": summary.images[s], "image_bytes": summary.image_bytes[s]} for s in summary.images},
            "skipped": [{"path": p, "reason": r} for p, r in summary.skipped]}
    write_meta(out_p, meta)
    return summary


@dataclass
class _Listing:
    items: list[tuple[int, str, int]]  # (index in the sorted listing, path, label)
    ignored: list[tuple[str, str]]  # (path, reason) of files that are not images


class _Encoder:
    """litdata's ``fn``: one (index, path, label) to a sample; None (left out, recorded) for an unreadable file."""

    def __init__(self, verify: bool, counter: Any, bad_dir: str) -> None:
        self.verify, self.counter, self.bad_dir = verify, counter, bad_dir

    def __call__(self, item: tuple[int, str, int]) -> dict[str, Any] | None:
        index, path, label = item
        try:
            data = Path(path).read_bytes()
            if self.verify:
                decode_image(data, path)
            return {"index": index, "image": data, "label": label, "path": path.encode()}
        except (OSError, BadImageError) as e:
            reason = str(e).replace("\n", " ")
            with open(os.path.join(self.bad_dir, f"{os.getpid()}.tsv"), "a") as f:
                f.write(f"{path}\t{reason}\n")
            return None
        finally:
            with self.counter.get_lock():
                self.counter.value += 1


def _split_roots(src: str | os.PathLike, val_split: float) -> dict[str, Path]:
    """{"train": folder, "val": folder} for a split layout, {"train": folder} for one tree."""
    if not 0.0 <= val_split < 1.0:
        raise ValueError(f"--val-split must be in [0, 1), got {val_split}")
    root = prepare_digits(DIGITS_SIZE) if str(src) == DIGITS else Path(src).expanduser()
    if not root.is_dir():
        raise ValueError(f"source folder {str(root)!r} does not exist or is not a directory")
    train, val = root / "train", root / "val"
    if val.is_dir() and not train.is_dir():
        raise ValueError(f"{str(root)!r} has a 'val' but no 'train' folder")
    if val.is_dir() and val_split > 0:
        raise ValueError(f"--val-split {val_split} but {str(root)!r} already has a 'val' folder")
    if train.is_dir():
        return {"train": train, "val": val} if val.is_dir() else {"train": train}
    return {"train": root}


def _list_split(root: Path, classes: list[str], is_val: bool) -> _Listing:
    """The image files of every class folder (sorted), and the other files found, named."""
    found = find_classes(root) if is_val else classes
    if extra := sorted(set(found) - set(classes)):
        raise ValueError(f"class folders {extra} in {str(root)!r} are not among the train classes {classes}")
    items: list[tuple[int, str, int]] = []
    ignored: list[tuple[str, str]] = []
    exts = tuple(e.lower() for e in IMG_EXTENSIONS)
    for label, name in enumerate(classes):
        folder = root / name
        files = sorted(_walk(folder)) if folder.is_dir() else []
        images = [p for p in files if p.lower().endswith(exts) and os.path.isfile(p)]
        ignored += [(p, "not an image file (extension)") for p in files if not p.lower().endswith(exts)]
        # a FIFO named like an image would block its reader forever
        ignored += [(p, "not a regular file") for p in files if p.lower().endswith(exts) and not os.path.isfile(p)]
        if not images and not is_val:
            raise ValueError(f"class folder {str(folder)!r} has no image files (extensions {IMG_EXTENSIONS})")
        items += [(len(items) + i, p, label) for i, p in enumerate(images)]
    return _Listing(items, ignored)


def _walk(folder: Path) -> list[str]:
    """Every non-hidden file under ``folder`` (links followed)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [os.path.join(dirpath, f) for f in filenames if not f.startswith(".")]
    return found


def _hold_out(listing: _Listing, val_split: float, seed: int) -> dict[str, _Listing]:
    train_idx, val_idx = stratified_split([label for _, _, label in listing.items], val_split, seed)
    train = [listing.items[i] for i in train_idx]
    val = [listing.items[i] for i in val_idx]
    return {"train": _Listing([(k, p, c) for k, (_, p, c) in enumerate(train)], listing.ignored),
            "val": _Listing([(k, p, c) for k, (_, p, c) in enumerate(val)], [])}


def _write_split(items: list, out: Path, num_workers: int, chunk_bytes: str, fn: _Encoder) -> None:
    from litdata import optimize

    before = mp.get_start_method(allow_none=True)
    try:
        optimize(fn=fn, inputs=items, output_dir=str(out), chunk_bytes=chunk_bytes, num_workers=num_workers,
                 reorder_files=False, start_method=START_METHOD, verbose=False)
    finally:
        mp.set_start_method(before, force=True)  # litdata sets it for the whole process
    if not (out / "index.json").is_file():
        raise ValueError(f"no readable image among the {len(items)} files for {str(out)!r}; see the skipped files")


def _read_bad(bad_dir: str) -> list[tuple[str, str]]:
    """The (path, reason) lines the workers recorded so far, then cleared."""
    bad = []
    for name in sorted(os.listdir(bad_dir)):
        path = os.path.join(bad_dir, name)
        with open(path) as f:
            bad += [tuple(line.rstrip("\n").split("\t", 1)) for line in f if line.strip()]
        os.remove(path)
    return sorted(bad)


@contextmanager
def _polling(counter: Any, total: int, progress: Progress | None) -> Iterator[None]:
    """Call ``progress(counter.value, total)`` from a thread while the block runs, and once when it ends."""
    if progress is None:
        yield
        return
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(0.2):
            progress(counter.value, total)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
    progress(counter.value, total)
