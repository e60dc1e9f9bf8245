"""Interleaved timing: every repeat runs each candidate once, in rotating order, so drifting load hits all alike."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch.utils.benchmark import Measurement, TaskSpec, timer


def time_interleaved(
    fns: Sequence[Callable[[], Any]], device: torch.device, warmup: int, repeats: int, min_time: float,
    labels: Sequence[str] | None = None,
) -> list[Measurement]:
    """One ``Measurement`` per ``fn``, one block time per repeat (``.times``: seconds per call, in repeat order).

    Each fn is called ``warmup`` times first (at least once), then timed over enough calls to last ``min_time``
    seconds, so short calls (batch 1) are not dominated by timer and launch noise.
    """
    iters = []
    for fn in fns:
        for _ in range(max(warmup, 1)):
            fn()
        once = _time_block(fn, 1, device)
        iters.append(max(1, math.ceil(min_time / max(once, 1e-6))))
    blocks: list[list[float]] = [[] for _ in fns]
    for r in range(repeats):
        for j in range(len(fns)):
            i = (j + r) % len(fns)
            blocks[i].append(_time_block(fns[i], iters[i], device))
    names = labels or [f"candidate {i}" for i in range(len(fns))]
    return [
        Measurement(n, raw, TaskSpec(stmt=name, setup="pass", num_threads=torch.get_num_threads()))
        for n, raw, name in zip(iters, blocks, names, strict=True)
    ]


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 3, min_time: float = 0.3) -> float:
    """FLOP/s of large square matmuls, best of ``repeats``: the peak MFU is measured against.

    The best rather than the median, because a peak is what the device can do when nothing else runs.
    """
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    (m,) = time_interleaved([lambda: a @ b], device, warmup=1, repeats=repeats, min_time=min_time)
    return 2 * size**3 / min(m.times)


def sync(device: torch.device) -> None:
    """Wait for the work queued on ``device``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_block(fn: Callable[[], Any], iters: int, device: torch.device) -> float:
    """Seconds for ``iters`` calls; torch.utils.benchmark's ``timer`` waits for the current accelerator."""
    with _current(device):
        start = timer()
        for _ in range(iters):
            fn()
        return timer() - start


def _current(device: torch.device) -> AbstractContextManager[Any]:
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()
