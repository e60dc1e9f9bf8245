"""A case to time, the row its measurement becomes, and the grouped interleaved measurement between them."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .memory import peak_memory
from .timing import time_interleaved


@dataclass
class Case:
    """A callable to time plus what the table says about it."""

    impl: str
    compiled: bool
    step: str
    batch: int
    fn: Callable[[], Any]
    flops_per_img: int
    mask_ratio: float | None = None


@dataclass
class Row:
    """One measured configuration: who, what step, how fast, how many FLOPs, how much memory."""

    impl: str
    dtype: str
    compiled: bool
    step: str
    batch: int
    seconds: list[float]
    flops_per_img: int
    peak_flops: float
    mask_ratio: float | None = None
    peak_mem_bytes: int = -1

    @property
    def img_per_s(self) -> float:
        return self.batch / statistics.median(self.seconds)

    @property
    def flops_per_s(self) -> float:
        return self.flops_per_img * self.img_per_s

    @property
    def mfu(self) -> float:
        return self.flops_per_s / self.peak_flops

    def record(self) -> dict[str, Any]:
        """A JSON-ready dict with the derived figures."""
        rec = asdict(self)
        rec.update(img_per_s=self.img_per_s, img_per_s_best=self.batch / min(self.seconds),
                   ms_per_step=1e3 * statistics.median(self.seconds), flops_per_s=self.flops_per_s, mfu=self.mfu)
        return rec


def measure(
    cases: list[Case], device: torch.device, dtype: str, peak: float, warmup: int, repeats: int, min_time: float
) -> list[Row]:
    """Time ``cases`` interleaved, grouped by (step, batch) so each group's figures are comparable."""
    rows = []
    groups: dict[tuple[str, int], list[Case]] = {}
    for c in cases:
        groups.setdefault((c.step, c.batch), []).append(c)
    for group in groups.values():
        labels = [f"{c.impl} {c.step} batch {c.batch}" + ("" if c.mask_ratio is None else f" mask {c.mask_ratio}")
                  for c in group]
        times = time_interleaved([c.fn for c in group], device, warmup, repeats, min_time, labels)
        for c, m in zip(group, times, strict=True):
            mem = peak_memory(c.fn, device)
            rows.append(Row(c.impl, dtype, c.compiled, c.step, c.batch, m.times, c.flops_per_img, peak,
                            c.mask_ratio, mem))
    return rows
