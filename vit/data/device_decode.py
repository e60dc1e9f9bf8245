"""Decode and augment on the training device (``decode: device``): the loader yields encoded files, not pixels.

Where a GPU has few CPU cores to feed it, its loader workers only read bytes; ``torchvision.io.decode_jpeg`` decodes a
whole batch with nvjpeg, and the crop, flip and normalisation run on the GPU too. The same code runs on the CPU
(``device="cpu"``), which is how it is tested without a GPU.

It reproduces the pipelines that are RandomResizedCrop + flip or a plain resize (MAE pretraining, presets "none" and
"light") and the evaluation resize + centre crop, with the CPU pipeline's geometry: the same crop-box rules,
Python's rounding, ``crop_pct``. JPEG decoding is libjpeg-turbo's on the CPU, as PIL's, and enlarging uses OpenCV's
bicubic kernel; pixels differ a little where an image shrinks, where torch's antialiased bicubic stands in for
OpenCV's INTER_AREA. The draws of a training sample come from a ``torch.Generator`` seeded by its augmentation seed,
a pure function of (seed, epoch, sample index), so a resumed run gets the same crops; they are not the CPU
pipeline's draws, so switching ``decode`` changes the run.

Files that are not plain JPEGs (PNG and other formats, CMYK JPEGs, JPEGs with an EXIF rotation) and JPEGs that the
device's decoder refuses are decoded on the CPU by ``read_rgb``, exactly as the CPU pipeline decodes them, and then
moved to the device; a file neither decoder reads raises BadImageError naming it.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.layers import to_2tuple
from torchvision.io import ImageReadMode, decode_jpeg

from vit.data.datasets import BadImageError
from vit.data.shards import decode_image
from vit.data.transforms import TRAIN_PRESETS

PRETRAIN_SCALE = (0.2, 1.0)  # build_pretrain_transform's RandomResizedCrop area range (MAE's)
RATIO = (3 / 4, 4 / 3)  # albumentations' RandomResizedCrop aspect range
DEVICE_PRESETS = [k for k, v in TRAIN_PRESETS.items() if not (v["randaug"] or v["color_jitter"] or v["erase_prob"])]
_EXIF_ORIENTATION = 0x0112


class EncodedSample(NamedTuple):
    """One file as the loader yields it: its bytes, label, sample index, augmentation seed (None: eval) and name."""

    encoded: torch.Tensor
    label: int
    index: int
    seed: int | None
    name: str


@dataclass
class EncodedBatch:
    """A batch of encoded files. ``to(device)`` moves the labels and records the device; the bytes stay on the CPU,
    where ``decode_jpeg`` reads them whatever device it decodes on."""

    encoded: list[torch.Tensor]
    labels: torch.Tensor
    indices: torch.Tensor
    seeds: list[int] | None
    names: list[str]
    device: torch.device = torch.device("cpu")

    @property
    def train(self) -> bool:
        """Whether the batch is augmented (its samples carry seeds) rather than evaluated."""
        return self.seeds is not None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> EncodedBatch:
        return replace(self, labels=self.labels.to(device, non_blocking=non_blocking), device=torch.device(device))

    def pin_memory(self) -> EncodedBatch:
        """Pin the labels only: decode_jpeg reads the bytes from host memory, and pinning a batch of small tensors
        one by one costs more than it could save."""
        return replace(self, labels=self.labels.pin_memory())


class EncodedImages(torch.utils.data.Dataset):
    """``(path, label)`` samples as EncodedSample items; an index is an int or ``(index, seed)`` (EpochSeededSampler).

    With ``train`` every item needs a seed: the device draws its crop and flip from it.
    """

    def __init__(self, samples: Sequence[tuple[Path, int]], train: bool) -> None:
        self.samples = list(samples)
        self.train = train

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int | tuple[int, int]) -> EncodedSample:
        index, seed = index if isinstance(index, tuple) else (index, None)
        if self.train and seed is None:
            raise ValueError("EncodedImages(train=True) needs (index, seed) items, as EpochSeededSampler yields")
        path, label = self.samples[int(index)]
        try:
            data = np.fromfile(path, dtype=np.uint8)
        except OSError as e:
            raise BadImageError(f"cannot read image {str(path)!r}: {type(e).__name__}: {e}") from e
        return EncodedSample(torch.from_numpy(data), label, int(index), seed if self.train else None, str(path))


def encoded_tensor(data: bytes | np.ndarray) -> torch.Tensor:
    """A file's bytes (as litdata stores them) as the 1-D uint8 tensor ``decode_jpeg`` reads."""
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())


def collate_encoded(items: list[EncodedSample]) -> EncodedBatch:
    """EncodedSample items to one EncodedBatch; train and eval items do not mix."""
    seeds = [s.seed for s in items]
    if None in seeds and any(s is not None for s in seeds):
        raise ValueError("collate_encoded: a batch mixes training samples (with seeds) and evaluation samples")
    return EncodedBatch([s.encoded for s in items], torch.tensor([s.label for s in items]),
                        torch.tensor([s.index for s in items]), None if None in seeds else seeds,
                        [s.name for s in items])


def decode_images(
    encoded: Sequence[torch.Tensor], names: Sequence[str], device: torch.device | str
) -> list[torch.Tensor]:
    """Encoded files to [3, H, W] uint8 RGB tensors on ``device``: plain JPEGs in one batched ``decode_jpeg``, the
    rest on the CPU by ``read_rgb`` (see module docstring).

    Raises:
        BadImageError: a file neither decoder reads; the message names it.
    """
    device = torch.device(device)
    out: list[torch.Tensor | None] = [None] * len(encoded)
    jpegs = [i for i, e in enumerate(encoded) if _plain_jpeg(e)]
    for i, image in zip(jpegs, _decode_jpegs([encoded[i] for i in jpegs], device), strict=True):
        out[i] = image
    for i, image in enumerate(out):
        if image is None:
            pixels = decode_image(encoded[i].numpy().tobytes(), names[i])  # [H, W, 3] uint8, as read_rgb reads it
            out[i] = torch.from_numpy(pixels).permute(2, 0, 1).contiguous().to(device)
    return out


class DeviceTransform:
    """Crop (or resize), flip and normalise decoded [3, H, W] uint8 images on their device to [B, 3, h, w] float32.

    With ``scale`` it is RandomResizedCrop(scale, RATIO), else a plain resize to ``img_size`` (``crop_pct`` 1) or
    a resize of the image to ``img_size / crop_pct`` (both sides at least, aspect kept) and a centre crop.
    Resizes are bicubic (antialiased where they shrink), values clamped and rounded to 0..255 as a uint8 image's.
    """

    def __init__(self, img_size: int | Sequence[int], mean: Sequence[float], std: Sequence[float],
                 scale: tuple[float, float] | None = None, flip: bool = False, crop_pct: float = 1.0) -> None:
        self.size = to_2tuple(img_size)
        self.mean = [255.0 * m for m in mean]
        self.std = [255.0 * s for s in std]
        self.scale, self.flip, self.crop_pct = scale, flip, crop_pct

    @property
    def random(self) -> bool:
        """Whether the transform draws (and so needs a seed per image)."""
        return self.scale is not None or self.flip

    def __call__(self, images: Sequence[torch.Tensor], seeds: Sequence[int] | None = None) -> torch.Tensor:
        if self.random and (seeds is None or len(seeds) != len(images)):
            raise ValueError(f"a random DeviceTransform needs one seed per image: {len(images)} images, seeds {seeds}")
        out = []
        for i, image in enumerate(images):
            gen = torch.Generator().manual_seed(int(seeds[i])) if self.random else None
            x = self._geometry(image, gen)
            if self.flip and _uniform(gen) < 0.5:
                x = x.flip(-1)
            out.append(x)
        batch = torch.stack(out)
        mean = torch.tensor(self.mean, device=batch.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=batch.device).view(1, 3, 1, 1)
        return (batch - mean) / std

    def _geometry(self, image: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        H, W = image.shape[-2:]
        if self.scale is not None:
            y, x, h, w = _random_resized_box(H, W, self.scale, gen)
            return _resize(image[:, y:y + h, x:x + w], self.size)
        if self.crop_pct == 1.0:
            return _resize(image, self.size)
        h, w = self.size
        s = max(math.floor(h / self.crop_pct) / H, math.floor(w / self.crop_pct) / W)
        resized = _resize(image, (max(1, round(H * s)), max(1, round(W * s))))
        top, left = (resized.shape[-2] - h) // 2, (resized.shape[-1] - w) // 2
        return resized[:, top:top + h, left:left + w]


class DevicePipeline:
    """An EncodedBatch to ``[images [B, 3, h, w] float32, labels [B]]`` on the batch's device."""

    def __init__(self, train: DeviceTransform, eval: DeviceTransform) -> None:
        self.train, self.eval = train, eval

    def __call__(self, batch: EncodedBatch) -> list[torch.Tensor]:
        images = decode_images(batch.encoded, batch.names, batch.device)
        if batch.train:
            return [self.train(images, batch.seeds), batch.labels]
        return [self.eval(images), batch.labels]


def unsupported(task: str, aug: str, on_bad_image: str) -> str | None:
    """Why ``decode: device`` cannot reproduce this data configuration, or None when it can."""
    if on_bad_image != "error":
        return f"data.decode 'device' needs data.on_bad_image 'error', got {on_bad_image!r}"
    if task == "classify" and aug not in DEVICE_PRESETS:
        return f"data.decode 'device' supports aug {'|'.join(DEVICE_PRESETS)}, got {aug!r}"
    return None


def build_device_pipeline(img_size: int | Sequence[int], mean: Sequence[float], std: Sequence[float],
                          crop_pct: float, task: str, aug: str) -> DevicePipeline:
    """The device twin of the data modules' pipelines: ``task`` pretrain (MAE) or classify with preset ``aug``."""
    if why := unsupported(task, aug, "error"):
        raise ValueError(why)
    if task == "pretrain":
        train = DeviceTransform(img_size, mean, std, scale=PRETRAIN_SCALE, flip=True)
    else:
        preset = TRAIN_PRESETS[aug]
        train = DeviceTransform(img_size, mean, std, scale=preset["rrc_scale"], flip=preset["flip"])
    return DevicePipeline(train, DeviceTransform(img_size, mean, std, crop_pct=crop_pct))


def _plain_jpeg(encoded: torch.Tensor) -> bool:
    """A baseline-decodable JPEG the device reads as the CPU pipeline does: grey or YCbCr/RGB, no EXIF rotation."""
    if encoded.numel() < 3 or bytes(encoded[:3].tolist()) != b"\xff\xd8\xff":
        return False
    try:
        with Image.open(io.BytesIO(encoded.numpy().tobytes())) as img:  # reads the headers only
            return img.format == "JPEG" and img.mode in ("L", "RGB") and img.getexif().get(_EXIF_ORIENTATION, 1) == 1
    except Exception:  # unreadable headers: read_rgb gives the error that names the file
        return False


def _decode_jpegs(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """One batched decode; if it fails, each file alone, None for those the device's decoder refuses."""
    if not encoded:
        return []
    try:
        return _decode_jpeg(encoded, device)
    except RuntimeError:
        pass
    out: list[torch.Tensor | None] = []
    for e in encoded:
        try:
            out.append(_decode_jpeg([e], device)[0])
        except RuntimeError:
            out.append(None)
    return out


def _decode_jpeg(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders in favour of torchcodec
        warnings.filterwarnings("ignore", "The image decoding and encoding capabilities", DeprecationWarning)
        return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)


def _uniform(gen: torch.Generator | None, low: float = 0.0, high: float = 1.0) -> float:
    return low + (high - low) * float(torch.rand((), generator=gen, dtype=torch.float64))


def _random_resized_box(H: int, W: int, scale: tuple[float, float], gen: torch.Generator | None
                        ) -> tuple[int, int, int, int]:
    """(top, left, h, w) by albumentations' RandomResizedCrop rule: 10 tries, then the central crop in RATIO."""
    area = H * W
    log_lo, log_hi = math.log(RATIO[0]), math.log(RATIO[1])
    for _ in range(10):
        target = _uniform(gen, scale[0] * area, scale[1] * area)
        aspect = math.exp(_uniform(gen, log_lo, log_hi))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= W and 0 < h <= H:
            return int((H - h + 1) * _uniform(gen)), int((W - w + 1) * _uniform(gen)), h, w
    in_ratio = W / H
    if in_ratio < RATIO[0]:
        h, w = round(W / RATIO[0]), W
    elif in_ratio > RATIO[1]:
        h, w = H, round(H * RATIO[1])
    else:
        h, w = H, W
    return (H - h) // 2, (W - w) // 2, h, w


def _resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[3, H, W] uint8 to [3, h, w] float32 in 0..255 (whole values), bicubic one axis at a time: plain (OpenCV's
    INTER_CUBIC kernel) where the axis grows, antialiased where it shrinks (OpenCV's INTER_AREA is a box filter)."""
    x = image.float()[None]
    for dim, n in ((2, size[0]), (3, size[1])):
        if x.shape[dim] != n:
            target = (n, x.shape[3]) if dim == 2 else (x.shape[2], n)
            x = F.interpolate(x, size=target, mode="bicubic", align_corners=False, antialias=n < x.shape[dim])
    return x[0].clamp_(0, 255).round_()
