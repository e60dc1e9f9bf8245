"""The built-in data set: scikit-learn's digits written once as an ImageFolder tree.

Layout: `<cache>/digits-<size>/{train,val}/<0..9>/<NNNN>.png` plus `manifest.json`, where NNNN is the
image's index in `load_digits()` and <cache> is `cache_dir`, else `$VIT_CACHE_DIR`, else `~/.cache/vitkit`.
Images are the 8x8 grey digits (values 0..16 scaled to 0..255) upsampled with bicubic interpolation
(nearest would make every 4x4 patch of a 32x32 image one flat colour) and stored as RGB PNG.
Split: 20% of each class held out for val (`stratified_split`, seed 0): 1,437 train and 360 val images.
The tree is built in a temporary folder and renamed into place, so concurrent callers (DDP ranks) and
killed runs never leave a half-written tree; `manifest.json` marks a complete one and is not rewritten.
"""

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from timm.layers import to_2tuple

from vit.data.split import stratified_split

log = logging.getLogger(__name__)

DIGITS_CLASSES = tuple(str(i) for i in range(10))
DIGITS_VAL_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
MANIFEST = "manifest.json"
_FORMAT_VERSION = 2  # 2: split by scikit-learn's train_test_split
_STALE_TMP_SECONDS = 3600


def default_cache_dir() -> Path:
    """`$VIT_CACHE_DIR` when set, else `~/.cache/vitkit`."""
    return Path(os.environ.get("VIT_CACHE_DIR") or Path.home() / ".cache" / "vitkit").expanduser()


def prepare_digits(img_size: int | Sequence[int] = 32, cache_dir: str | os.PathLike | None = None) -> Path:
    """Write the digits tree for `img_size` unless a complete one exists; return its root folder."""
    h, w = to_2tuple(img_size)
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    name = f"digits-{h}" if h == w else f"digits-{h}x{w}"
    final = base / name
    if _is_complete(final, (h, w)):
        return final
    base.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(base, name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=base))
    tmp.chmod(0o755)  # mkdtemp makes it private; the published tree is a shared cache
    try:
        start = time.perf_counter()
        _write_digits(tmp, (h, w))
        if _publish(tmp, final, (h, w)):
            log.info("wrote digits (%dx%d) to %s in %.1fs", h, w, final, time.perf_counter() - start)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _write_digits(folder: Path, hw: tuple[int, int]) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # [1797, 8, 8]
    train, val = stratified_split(digits.target, DIGITS_VAL_FRACTION, DIGITS_SPLIT_SEED)
    counts: dict[str, dict[str, int]] = {}
    for split, indices in (("train", train), ("val", val)):
        counts[split] = {c: 0 for c in DIGITS_CLASSES}
        for c in DIGITS_CLASSES:
            (folder / split / c).mkdir(parents=True)
        for i in indices:
            label = DIGITS_CLASSES[digits.target[i]]
            grey = Image.fromarray(images[i]).resize((hw[1], hw[0]), Image.Resampling.BICUBIC)
            grey.convert("RGB").save(folder / split / label / f"{i:04d}.png", compress_level=1)
            counts[split][label] += 1
    manifest = {
        "name": "digits",
        "source": "sklearn.datasets.load_digits",
        "version": _FORMAT_VERSION,
        "img_size": list(hw),
        "classes": list(DIGITS_CLASSES),
        "val_fraction": DIGITS_VAL_FRACTION,
        "split_seed": DIGITS_SPLIT_SEED,
        "num_images": len(images),
        "counts": counts,
    }
    # Written last: its presence in the published folder means the tree is complete.
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))


def _publish(tmp: Path, final: Path, hw: tuple[int, int]) -> bool:
    """Rename `tmp` to `final`; False when another process published a complete tree first."""
    for _ in range(2):
        try:
            os.rename(tmp, final)  # atomic; fails when `final` is a non-empty folder
            return True
        except OSError:
            if _is_complete(final, hw):
                return False
            # An incomplete or outdated tree (written by hand or by an older version): move it aside.
            stale = final.with_name(f".{final.name}.stale-{os.getpid()}")
            try:
                os.rename(final, stale)
            except OSError:
                continue
            shutil.rmtree(stale, ignore_errors=True)
    raise OSError(f"could not publish the digits tree to {str(final)!r}")


def _is_complete(folder: Path, hw: tuple[int, int]) -> bool:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return manifest.get("version") == _FORMAT_VERSION and manifest.get("img_size") == list(hw)


def _remove_stale_tmp(base: Path, name: str) -> None:
    """Remove temporary trees left by killed runs (old enough that no live writer can own them)."""
    for old in base.glob(f".{name}.tmp-*"):
        try:
            if time.time() - old.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            continue
