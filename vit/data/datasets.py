"""ImageFolder-style data sets read into RGB uint8 numpy arrays; every error names the file.

Conventions, stated once:
- Alpha (RGBA, LA, palette with transparency) is composited on black: a fully transparent pixel is 0
  whatever colour it stores, so hidden colour values never leak into training.
- Wide samples are scaled by their type's full range, rounded: 16-bit grey (PIL "I;16*", and "I" read from a
  16-bit PNG or PGM) x * 255 / 65535; float grey (PIL "F") in [0, 1] x * 255. Samples with no known full
  range are refused with BadImageError, naming the file, the mode and the values found: integers wider than
  16 bits (an int32 TIFF: is 200 dark or bright?), floats outside [0, 1] or not finite. Nothing is guessed
  from the values, so no image trains as black or white by accident.
- EXIF orientation is applied, so images are seen upright as in any viewer.
- Names starting with "." (".ipynb_checkpoints", macOS "._x.jpg") are ignored, as are files whose
  extension is not in `extensions`. Entries named like images that are not regular files (a FIFO, a socket,
  a device, a broken link) are left out with a warning naming them: opening a FIFO would block forever.
"""

import copy
import io
import logging
import multiprocessing as mp
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import albumentations as A
import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision.datasets import folder as tv_folder

from vit.data.transforms import apply_transform
from vit.errors import BadInputError

log = logging.getLogger(__name__)

_EXIF_ORIENTATION = 0x0112
IMG_EXTENSIONS = (*tv_folder.IMG_EXTENSIONS, ".gif", ".pbm")  # torchvision's, plus two formats PIL reads
_MAX_NAMED = 10  # files named in one message; the rest are counted


class BadImageError(BadInputError, OSError):
    """An image file that cannot be decoded, or whose values have no faithful 8-bit form; the message names it."""

    def __init__(self, *args: object) -> None:
        # A DataLoader worker's error comes back as type(e)(<its whole traceback as text>): keep our own line
        if len(args) == 1 and isinstance(args[0], str) and "\nOriginal Traceback" in args[0]:
            args = (args[0].rsplit(f"{type(self).__name__}: ", 1)[-1].strip(),)
        super().__init__(*args)


class DataFolderError(BadInputError):
    """A data folder no data set can be built from (missing, no class folders, an empty class); names it."""


class UnreadableImagesError(BadInputError):
    """``scan`` found unreadable images and ``on_bad_image`` is "error"; the message names them."""


def read_rgb(path: str | os.PathLike | io.IOBase) -> np.ndarray:
    """Decode an image file fully into an [H, W, 3] uint8 RGB array (see module docstring for modes).

    Raises:
        BadImageError: the file is missing, empty, truncated, not a regular file, not a decodable image, or holds
            values with no known full range.
    """
    try:
        if isinstance(path, (str, os.PathLike)) and not stat.S_ISREG(os.stat(path).st_mode):
            raise OSError("not a regular file (a FIFO, socket or device named like an image)")
        with Image.open(path) as img:
            img.load()
            if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:
                img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, zlib/struct errors, ...
        raise BadImageError(f"cannot read image {str(path)!r}: {type(e).__name__}: {e}") from e


def list_images(folder: str | os.PathLike, extensions: Sequence[str] = IMG_EXTENSIONS) -> list[Path]:
    """All regular image files under `folder` (recursive, links followed, each folder once), sorted.

    Hidden names are skipped; entries named like images that are not regular files are left out with a warning.

    Raises:
        DataFolderError: a folder cannot be listed (permissions).
    """
    exts = tuple(e.lower() for e in extensions)
    found, odd, seen, pending = [], [], set(), [Path(folder)]
    while pending:
        current = pending.pop()
        try:
            key = (st := current.stat()).st_dev, st.st_ino
            if key in seen:  # a link back to a folder already listed
                continue
            seen.add(key)
            with os.scandir(current) as it:
                entries = [e for e in it if not e.name.startswith(".")]
            for e in entries:
                if e.is_dir():
                    pending.append(Path(e.path))
                elif e.name.lower().endswith(exts):
                    (found if e.is_file() else odd).append(Path(e.path))
        except OSError as err:
            raise DataFolderError(f"cannot list data folder {str(current)!r}: {err.strerror or err}") from err
    if odd:
        names = ", ".join(repr(str(p)) for p in sorted(odd)[:_MAX_NAMED]) + (" ..." if len(odd) > _MAX_NAMED else "")
        log.warning("leaving out %d entries named like images that are not regular files (FIFO, socket, device "
                    "or broken link): %s", len(odd), names)
    return sorted(found)


def find_classes(root: str | os.PathLike, allow_flat: bool = False) -> list[str]:
    """Class folder names directly under `root` (torchvision's `find_classes`, hidden names skipped), sorted.

    With `allow_flat`, a folder of images without class folders gives [] (one unlabelled set, e.g. for MAE).

    Raises:
        DataFolderError: `root` is not a folder, or has no class folders (and is not an allowed flat folder).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataFolderError(f"data folder {str(root)!r} does not exist or is not a directory")
    try:
        classes = [c for c in tv_folder.find_classes(root)[0] if not c.startswith(".")]
    except FileNotFoundError:
        classes = []
    if classes:
        return classes
    images = list_images(root)
    if allow_flat:
        if images:
            return []
        raise DataFolderError(f"no class folders and no image files in {str(root)!r}; expected root/<image files> "
                              f"or root/<class>/<image files>")
    if images:
        raise DataFolderError(
            f"no class folders in {str(root)!r}, which holds {len(images)} image files directly: classification "
            f"needs root/<class>/<image files> (a flat folder of images serves MAE pretraining, data.task pretrain)")
    raise DataFolderError(f"no class folders in {str(root)!r}; expected root/<class>/<image files>")


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
        on_bad_image: "error" raises BadImageError naming the file; "skip" logs a warning, marks the file
            (`num_skipped`, `skipped_paths`, `skipped_flags`: each file once, over DataLoader workers too) and
            returns the next readable sample instead.
        extensions: file name endings that count as images (case-insensitive).
        unlabelled: `root` may also be a flat folder of images (no class folders): every image then gets label 0
            and `class_names` is [] (MAE pretraining needs no classes).

    Raises:
        DataFolderError: no class folders (unless `unlabelled`), an empty class folder, or classes that do not
            match `class_names`.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: A.Compose | None = None,
        class_names: Sequence[str] | None = None,
        on_bad_image: Literal["error", "skip"] = "error",
        extensions: Sequence[str] = IMG_EXTENSIONS,
        unlabelled: bool = False,
    ) -> None:
        if on_bad_image not in ("error", "skip"):
            raise ValueError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
        self.root = Path(root)
        found = find_classes(self.root, allow_flat=unlabelled or class_names == [])
        if class_names is None:
            class_names = found
        else:
            class_names = list(class_names)
            if not class_names and found:
                raise DataFolderError(f"{str(self.root)!r} has class folders {found}, but the train folder is a "
                                      f"flat folder of images: use one layout for both")
            if extra := sorted(set(found) - set(class_names)):
                raise DataFolderError(f"class folders {extra} in {str(self.root)!r} are not among {class_names}")
        self.class_names = list(class_names)
        self.samples: list[tuple[Path, int]] = []
        if not self.class_names:  # a flat folder: one unlabelled set
            self.samples = [(p, 0) for p in list_images(self.root, extensions)]
        exts = tuple(e.lower() for e in extensions)
        if self.class_names and (loose := [p.name for p in self.root.iterdir()
                                           if p.is_file() and p.name.lower().endswith(exts)]):
            log.warning(
                "ignoring %d image file(s) directly in %s, outside any class folder (e.g. %s)",
                len(loose),
                self.root,
                loose[0],
            )
        for label, name in enumerate(self.class_names):
            folder = self.root / name
            files = list_images(folder, extensions) if folder.is_dir() else []
            if not files:
                raise DataFolderError(f"class folder {str(folder)!r} has no image files (extensions {extensions})")
            self.samples += [(p, label) for p in files]
        self.transform = transform
        self.on_bad_image = on_bad_image
        self._bad = _new_flags(len(self.samples))

    @property
    def num_skipped(self) -> int:
        """Distinct files skipped as unreadable, over all processes."""
        return int(self.skipped_flags().sum())

    @property
    def skipped_paths(self) -> list[Path]:
        """The files skipped as unreadable, over all processes, in sample order."""
        return [self.samples[i][0] for i in np.flatnonzero(self.skipped_flags())]

    def skipped_flags(self) -> np.ndarray:
        """[len(self)] uint8, 1 where the sample's file was skipped as unreadable (in any DataLoader worker)."""
        return np.frombuffer(self._bad.get_obj(), dtype=np.uint8)[: len(self.samples)].copy()

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def select(self, indices: Sequence[int], transform: A.Compose | None = None) -> "ImageFolderDataset":
        """A copy holding only `samples[i]` for i in `indices`, with its own transform and skip marks."""
        subset = copy.copy(self)
        subset.samples = [self.samples[i] for i in indices]
        subset.transform = transform
        subset._bad = _new_flags(len(subset.samples))
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
            i = (index + k) % n
            if self._bad[i]:
                continue
            path, label = self.samples[i]
            try:
                return read_rgb(path), label
            except BadImageError as e:
                if self.on_bad_image == "error":
                    raise BadImageError(f"{e} (--data.on_bad_image skip trains on without it; --data.scan true "
                                        f"lists every unreadable file before training)") from e.__cause__
                with self._bad.get_lock():  # two workers may meet the same file: mark and report it once
                    first = not self._bad[i]
                    self._bad[i] = 1
                if first:
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
            elif entry.exists():
                raise DataFolderError(f"predict path {str(entry)!r} is not a regular file or folder")
            else:
                raise DataFolderError(f"predict path {str(entry)!r} does not exist")
        if not self.paths:
            raise DataFolderError(f"no image files found in {[str(e) for e in entries]}")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | np.ndarray, int]:
        image = read_rgb(self.paths[index])
        if self.transform is None:
            return image, index
        return apply_transform(self.transform, image), index


def _new_flags(n: int) -> Any:  # a multiprocessing SynchronizedArray of uint8
    # shared memory: DataLoader workers inherit it, so every process sees (and counts once) each skipped file
    return mp.Array("B", max(n, 1))


def _to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode == "F":
        return _grey(_float_to_uint8(np.asarray(img, dtype=np.float32), img.mode))
    if img.mode.startswith("I"):
        return _grey(_int_to_uint8(np.asarray(img).astype(np.int64), _bit_depth(img), img.mode))
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = np.asarray(img.convert("RGBA"), dtype=np.uint16)
        # Composite on black: premultiply by alpha, rounded.
        return ((rgba[:, :, :3] * rgba[:, :, 3:] + 127) // 255).astype(np.uint8)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.array(img, dtype=np.uint8)


def _grey(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[:, :, None], 3, axis=2)


def _bit_depth(img: Image.Image) -> int | None:
    """Bits per sample of an integer-mode image, as its file declares them; None when the file does not say."""
    if img.mode.startswith("I;16"):
        return 16
    if img.format in ("PNG", "PPM"):  # their widest grey is 16 bits (Pillow reads PGM maxval > 255 as 16-bit)
        return 16
    bits = getattr(img, "tag_v2", {}).get(258)  # TIFF BitsPerSample
    return int(bits[0] if isinstance(bits, tuple) else bits) if bits else None


def _int_to_uint8(values: np.ndarray, bits: int | None, mode: str) -> np.ndarray:
    lo, hi = (int(values.min()), int(values.max())) if values.size else (0, 0)
    if bits is None or bits > 16 or lo < 0 or hi >= 1 << bits:
        width = f"{bits}-bit" if bits else "integer"
        raise ValueError(f"{width} samples (PIL mode {mode!r}, values {lo}..{hi}) have no known full range to "
                         f"scale to 0..255; save the image as 8- or 16-bit unsigned")
    top = (1 << bits) - 1
    return ((values * 255 + top // 2) // top).astype(np.uint8)


def _float_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    finite = bool(np.isfinite(values).all())
    lo, hi = (float(values.min()), float(values.max())) if values.size and finite else (0.0, 0.0)
    if not finite or lo < 0.0 or hi > 1.0:
        found = "non-finite values" if not finite else f"values {lo:.6g}..{hi:.6g}"
        raise ValueError(f"float samples (PIL mode {mode!r}, {found}) outside [0, 1] have no known full range to "
                         f"scale to 0..255; scale them to [0, 1] or save the image as 8- or 16-bit")
    return np.rint(values * 255.0).astype(np.uint8)
