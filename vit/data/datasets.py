"""ImageFolder-style data sets read into RGB uint8 numpy arrays; every error names the file.

Conventions, stated once:
- Alpha (RGBA, LA, palette with transparency) is composited on black: a fully transparent pixel is 0
  whatever colour it stores, so hidden colour values never leak into training.
- 16-bit grey (PIL modes "I;16*" and "I") is scaled 0..65535 -> 0..255 (x * 255 / 65535, rounded).
- EXIF orientation is applied, so images are seen upright as in any viewer.
- Names starting with "." (".ipynb_checkpoints", macOS "._x.jpg") are ignored, as are files whose
  extension is not in `extensions`.
"""

import copy
import logging
import multiprocessing as mp
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import albumentations as A
import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision.datasets import folder as tv_folder

from vit.data.transforms import apply_transform

log = logging.getLogger(__name__)

_EXIF_ORIENTATION = 0x0112
IMG_EXTENSIONS = (*tv_folder.IMG_EXTENSIONS, ".gif", ".pbm")  # torchvision's, plus two formats PIL reads


class BadImageError(OSError):
    """An image file that cannot be decoded; the message names the path."""


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file fully into an [H, W, 3] uint8 RGB array (see module docstring for modes).

    Raises:
        BadImageError: the file is missing, empty, truncated or not a decodable image.
    """
    try:
        with Image.open(path) as img:
            img.load()
            if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:
                img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, zlib/struct errors, ...
        raise BadImageError(f"cannot read image {str(path)!r}: {type(e).__name__}: {e}") from e


def list_images(folder: str | os.PathLike, extensions: Sequence[str] = IMG_EXTENSIONS) -> list[Path]:
    """All image files under `folder` (recursive, links followed), sorted; hidden names skipped."""
    exts = tuple(e.lower() for e in extensions)
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath, f) for f in filenames if not f.startswith(".") and f.lower().endswith(exts)]
    return sorted(found)


def find_classes(root: str | os.PathLike) -> list[str]:
    """Class folder names directly under `root` (torchvision's `find_classes`, hidden names skipped), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"data folder {str(root)!r} does not exist or is not a directory")
    try:
        classes = [c for c in tv_folder.find_classes(root)[0] if not c.startswith(".")]
    except FileNotFoundError:
        classes = []
    if not classes:
        raise ValueError(f"no class folders in {str(root)!r}; expected root/<class>/<image files>")
    return classes


def scan(root: str | os.PathLike, extensions: Sequence[str] = IMG_EXTENSIONS) -> list[tuple[Path, str]]:
    """Fully decode every image file under `root`; return `(path, reason)` for each unreadable one."""
    bad = []
    for path in list_images(root, extensions):
        try:
            read_rgb(path)
        except BadImageError as e:
            bad.append((path, str(e.__cause__ or e)))
    return bad


class ImageFolderDataset(Dataset):
    """root/<class>/<image> tree; items are `(image [3, H, W] float32, label)`, label an int.

    An index is an int or `(index, sample_seed)`; with a seed the augmentation depends on it alone
    (see EpochSeededSampler), with an int on torch's RNG. Without a transform the item's image is the
    [H, W, 3] uint8 array.

    Args:
        root: folder holding one sub-folder per class (sorted names give the labels).
        transform: albumentations pipeline from vit.data.transforms.
        class_names: fix the classes and their order (e.g. the train set's, for a val set); every one
            must have a folder, and a folder not listed is an error.
        on_bad_image: "error" raises BadImageError naming the file; "skip" logs a warning, counts the file
            in `num_skipped` / `skipped_paths` and returns the next readable sample instead. `skipped_paths`
            lives in the process that read the file; `num_skipped` is shared with DataLoader workers.
        extensions: file name endings that count as images (case-insensitive).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: A.Compose | None = None,
        class_names: Sequence[str] | None = None,
        on_bad_image: Literal["error", "skip"] = "error",
        extensions: Sequence[str] = IMG_EXTENSIONS,
    ) -> None:
        if on_bad_image not in ("error", "skip"):
            raise ValueError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
        self.root = Path(root)
        found = find_classes(self.root)
        if class_names is None:
            class_names = found
        else:
            class_names = list(class_names)
            if extra := sorted(set(found) - set(class_names)):
                raise ValueError(f"class folders {extra} in {str(self.root)!r} are not among {class_names}")
        self.class_names = list(class_names)
        exts = tuple(e.lower() for e in extensions)
        if loose := [p.name for p in self.root.iterdir() if p.is_file() and p.name.lower().endswith(exts)]:
            log.warning(
                "ignoring %d image file(s) directly in %s, outside any class folder (e.g. %s)",
                len(loose),
                self.root,
                loose[0],
            )
        self.samples: list[tuple[Path, int]] = []
        for label, name in enumerate(self.class_names):
            folder = self.root / name
            files = list_images(folder, extensions) if folder.is_dir() else []
            if not files:
                raise ValueError(f"class folder {str(folder)!r} has no image files (extensions {extensions})")
            self.samples += [(p, label) for p in files]
        self.transform = transform
        self.on_bad_image = on_bad_image
        self.skipped_paths: list[Path] = []
        # a counter in shared memory: DataLoader workers inherit it, so the main process sees their skips
        self._skip_count = mp.Value("i", 0)

    @property
    def num_skipped(self) -> int:
        """Files skipped as unreadable, over all processes (each process counts a file once)."""
        return int(self._skip_count.value)

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def select(self, indices: Sequence[int], transform: A.Compose | None = None) -> "ImageFolderDataset":
        """A copy holding only `samples[i]` for i in `indices`, with its own transform and skip counts."""
        subset = copy.copy(self)
        subset.samples = [self.samples[i] for i in indices]
        subset.transform = transform
        subset.skipped_paths = []
        subset._skip_count = mp.Value("i", 0)
        return subset

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[torch.Tensor | np.ndarray, int]:
        index, seed = index if isinstance(index, tuple) else (index, None)
        image, label = self._load(int(index))
        if self.transform is None:
            return image, label
        if seed is None:
            # Draw from torch's RNG, which DataLoader seeds per worker: albumentations' own generator is
            # copied into every forked worker, which would then all replay the same augmentations.
            seed = int(torch.randint(2**31 - 1, ()))
        return apply_transform(self.transform, image, seed), label

    def _load(self, index: int) -> tuple[np.ndarray, int]:
        n = len(self.samples)
        for k in range(n):
            path, label = self.samples[(index + k) % n]
            if path in self.skipped_paths:
                continue
            try:
                return read_rgb(path), label
            except BadImageError as e:
                if self.on_bad_image == "error":
                    raise
                self.skipped_paths.append(path)
                with self._skip_count.get_lock():
                    self._skip_count.value += 1
                log.warning("skipping unreadable image (%d skipped so far): %s", self.num_skipped, e)
        raise BadImageError(f"no readable image in {str(self.root)!r}: all {n} files failed to decode")


class PredictDataset(Dataset):
    """Images for inference from a folder (recursive, sorted) or a list of files and folders.

    Items are `(image [3, H, W] float32, index)`; `paths[index]` names the file.
    """

    def __init__(
        self,
        paths_or_folder: str | os.PathLike | Sequence[str | os.PathLike],
        transform: A.Compose | None = None,
        extensions: Sequence[str] = IMG_EXTENSIONS,
    ) -> None:
        entries = [paths_or_folder] if isinstance(paths_or_folder, (str, os.PathLike)) else paths_or_folder
        self.paths: list[Path] = []
        for entry in (Path(e).expanduser() for e in entries):
            if entry.is_dir():
                self.paths += list_images(entry, extensions)
            elif entry.is_file():
                self.paths.append(entry)
            else:
                raise ValueError(f"predict path {str(entry)!r} does not exist")
        if not self.paths:
            raise ValueError(f"no image files found in {[str(e) for e in entries]}")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | np.ndarray, int]:
        image = read_rgb(self.paths[index])
        if self.transform is None:
            return image, index
        return apply_transform(self.transform, image), index


def _to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        wide = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
        grey = ((wide * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = np.asarray(img.convert("RGBA"), dtype=np.uint16)
        # Composite on black: premultiply by alpha, rounded.
        return ((rgba[:, :, :3] * rgba[:, :, 3:] + 127) // 255).astype(np.uint8)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.array(img, dtype=np.uint8)
