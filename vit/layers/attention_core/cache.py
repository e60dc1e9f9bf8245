"""One copy of each static tensor a pattern needs (masks, index tables, block masks) per device and shape."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import TypeVar

import torch

T = TypeVar("T")
MAX_ENTRIES = 128  # a few grids x patterns x devices; least recently used entries go first

_CACHE: OrderedDict[Hashable, object] = OrderedDict()


def cached(key: Hashable, build: Callable[[], T]) -> T:
    """``build()`` once per ``key``; while torch.export or torch.compile traces, nothing is stored.

    Tracing runs on fake tensors, which must not outlive the trace; a value cached before the trace is used
    as it is (the trace records it as a constant).
    """
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]  # type: ignore[return-value]
    with torch.inference_mode(False):  # a table built under inference mode could not be saved for backward
        value = build()
    if not torch.compiler.is_compiling():
        _CACHE[key] = value
        if len(_CACHE) > MAX_ENTRIES:
            _CACHE.popitem(last=False)
    return value


def clear_cache() -> None:
    """Forget every cached tensor (tests, and to free device memory)."""
    _CACHE.clear()
