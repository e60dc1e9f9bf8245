"""The layout of vitkit's litdata shards, written by ``vit data optimize`` and read by StreamingDataModule.

    DIR/vitkit.json       classes, per-split counts and bytes, the source; written last, so it marks a complete set
    DIR/train/            litdata shards (index.json + chunk-*.bin), one sample per image file
    DIR/val/              the same, when the source has a val split

A sample is ``{"index": int, "image": bytes, "label": int, "path": bytes}``: the file's bytes exactly as stored
(never re-encoded), the class index into ``classes``, and the source path (UTF-8; kept as bytes because litdata
would read a str naming an existing image file as an image). ``index`` is the file's position in the sorted listing
of its split's image files (an unreadable one left out keeps its number), so a sample's augmentation seed does not
depend on how litdata chunked or ordered the shards.
DIR may be a local folder or any URL litdata streams from (``s3://``, ``gs://``, ``azure://``, ``r2://``, ``hf://``,
and ``local:/path``, a local folder read through litdata's cache as if it were remote).
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from vit.data.datasets import BadImageError, read_rgb

FORMAT = "vitkit-image-shards"
FORMAT_VERSION = 1
META_NAME = "vitkit.json"
SPLITS = ("train", "val")


def is_url(location: str) -> bool:
    """Whether litdata reads ``location`` through a downloader and a cache (``s3://...``, ``local:/path``)."""
    return location.startswith("local:") or ("://" in location and not location.startswith("file://"))


def split_location(input_dir: str, split: str) -> str:
    """The shards folder of ``split`` under ``input_dir`` (a path or a URL)."""
    if is_url(input_dir):
        return input_dir.rstrip("/") + "/" + split
    return str(Path(input_dir.removeprefix("file://")).expanduser() / split)


def decode_image(data: bytes, name: str) -> np.ndarray:
    """A sample's encoded bytes to an [H, W, 3] uint8 RGB array, as ``read_rgb`` reads files; errors name ``name``."""
    buffer = io.BytesIO(data)
    try:
        return read_rgb(buffer)
    except BadImageError as e:
        cause = e.__cause__ or e
        detail = str(cause).replace(repr(buffer), "its bytes")  # PIL names the buffer object
        raise BadImageError(f"cannot read image {name!r}: {type(cause).__name__}: {detail}") from cause


def write_meta(out: Path, meta: dict[str, Any]) -> None:
    """Write ``vitkit.json`` under ``out`` atomically (a rename), marking the shards complete."""
    record = {"format": FORMAT, "version": FORMAT_VERSION, **meta}
    tmp = out / f".{META_NAME}.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, out / META_NAME)


def read_meta(input_dir: str, storage_options: dict | None = None) -> dict[str, Any]:
    """The ``vitkit.json`` record of a shards folder or URL; ValueError naming the location when it is missing."""
    location = f"{input_dir.rstrip('/')}/{META_NAME}"
    try:
        if is_url(input_dir):
            text = _download_text(input_dir, location, storage_options)
        else:
            text = (Path(input_dir.removeprefix("file://")).expanduser() / META_NAME).read_text()
        meta = json.loads(text)
    except (OSError, ValueError) as e:
        raise ValueError(f"no readable {META_NAME} at {location!r} ({type(e).__name__}: {e}): is it a folder "
                         "written by `vit data optimize SRC --out DIR`?") from e
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{location!r} is not a {FORMAT} v{FORMAT_VERSION} record (found {meta.get('format')!r} "
                         f"v{meta.get('version')!r}); write the shards again with this version's `vit data optimize`")
    return meta


def _download_text(remote_dir: str, remote_file: str, storage_options: dict | None) -> str:
    """A small remote file's text, fetched with litdata's downloader for the URL's scheme (its credentials too)."""
    from litdata.streaming.downloader import get_downloader

    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, META_NAME)
        get_downloader(remote_dir, tmp, [], storage_options or {}).download_file(remote_file, local)
        return Path(local).read_text()
