"""What the figures ran on: device, library versions, and how busy other processes kept the CPUs meanwhile."""

from __future__ import annotations

import os
import platform
import re
import time
from typing import Any

import torch


def env(device: torch.device, cpu_start: tuple[float, float, float] | None = None) -> dict[str, Any]:
    """Device name, threads, torch / timm / Python versions, other processes' CPU share since ``cpu_start``."""
    import timm

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {"device": str(device), "device_name": name, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(),
            "other_processes_cpu": others_cpu_share(cpu_start) if cpu_start else None}


def cpu_times() -> tuple[float, float, float]:
    """(wall seconds, busy CPU seconds of the whole machine, CPU seconds of this process)."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
        busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        busy = float("nan")
    t = os.times()
    return time.perf_counter(), busy, t.user + t.system


def others_cpu_share(start: tuple[float, float, float]) -> float:
    """Mean share of the CPUs that other processes kept busy since ``start`` (0 = the benchmark ran alone)."""
    wall0, busy0, own0 = start
    wall1, busy1, own1 = cpu_times()
    return max(0.0, ((busy1 - busy0) - (own1 - own0)) / ((wall1 - wall0) * (os.cpu_count() or 1)))


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            match = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.MULTILINE)
        return match.group(1) if match else platform.processor()
    except OSError:
        return platform.processor()
