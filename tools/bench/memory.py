"""Peak memory of one call: CUDA's allocator statistics, or the resident-set high-water mark on Linux CPUs."""

from __future__ import annotations

import ctypes
import re
from collections.abc import Callable
from contextlib import suppress
from typing import Any

import torch

from .timing import sync


def peak_memory(fn: Callable[[], Any], device: torch.device) -> int:
    """Bytes one call of ``fn`` needs above what was allocated before it.

    CUDA: ``max_memory_allocated`` after a reset. CPU: the resident-set high-water mark (Linux ``VmHWM``,
    reset through ``/proc/self/clear_refs``) over the resident set before the call, after trimming the heap so
    memory freed by earlier calls is not counted as in use. Returns -1 where neither is available.
    """
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    try:
        _malloc_trim()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _proc_kib("VmRSS")
        fn()
        return (_proc_kib("VmHWM") - before) * 1024
    except OSError:
        return -1


def _proc_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field_name}:\s+(\d+) kB", f.read(), re.MULTILINE)
    return int(match.group(1)) if match else 0


def _malloc_trim() -> None:
    """Hand freed heap memory back to the OS (glibc), so the resident set before a call is what is in use."""
    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
