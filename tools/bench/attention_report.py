"""What ``vit bench --attention`` prints: the core table, the end-to-end table, and the targets met or missed."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import torch

from .machine import env

# (what, pattern kind, tokens, step, least speedup): the CPU targets against the dense core forward
CPU_TARGETS = (("window at 4,096 tokens", "window", 4096, 10.0), ("kvpool:4 at 4,096 tokens", "kvpool:4", 4096, 5.0),
               ("neighborhood at 4,096 tokens", "neighborhood", 4096, 1.0),
               ("sliding at 4,096 tokens", "sliding", 4096, 1.0), ("strided at 4,096 tokens", "strided", 4096, 1.0))
E2E_TARGET = 2.5


def attention_header(args: argparse.Namespace, device: torch.device, info: dict[str, Any]) -> str:
    """Device, load, method and the core's shape."""
    e = env(device, args.cpu_start)
    return "\n".join([
        f"vit bench --attention: {info['model']} {json.dumps(info['model_args'])}",
        f"device: {e['device_name']} ({e['device']}, {e['threads']} threads), torch {e['torch']}; fp32; medians of "
        f"{args.repeats} interleaved repeats after {args.warmup} warm-up",
        f"other processes kept {100 * e['other_processes_cpu']:.0f}% of the {os.cpu_count()} CPUs busy during the run "
        "(figures are trustworthy when this is near 0)",
        f"core: {info['heads']} heads of {info['head_dim']}, batch {info['batch']}, N patches + 1 class token; "
        "speedup = dense ms / ms (same tokens, same step, same run); density = visible pairs / dense pairs",
    ]) + "\n"


def core_table(records: list[dict[str, Any]]) -> str:
    """One line per (tokens, step, pattern, backend)."""
    head = ["tokens", "step", "pattern", "backend", "density", "ms", "dense ms", "speedup", "peak mem", "dense mem",
            "build ms"]
    lines = [head] + [[f"{r['tokens']:,}", r["step"], r["pattern"], r["backend"], f"{r['density']:.3f}",
                       f"{r['ms']:,.2f}", f"{r['dense_ms']:,.2f}", f"{r['speedup']:.2f}x", _mib(r["peak_mem"]),
                       _mib(r["dense_peak_mem"]), f"{r['build_ms']:,.1f}"] for r in records]
    return _align(lines, left=4)


def e2e_table(records: list[dict[str, Any]]) -> str:
    """One line per (step, attention) of the end-to-end model."""
    if not records:
        return ""
    head = ["model", "img", "attention", "step", "ms", "dense ms", "speedup", "FLOP speedup", "GFLOP", "peak mem"]
    lines = [head] + [[r["model"], "x".join(map(str, r["img_size"])), r["attention"], r["step"], f"{r['ms']:,.1f}",
                       f"{r['dense_ms']:,.1f}", f"{r['speedup']:.2f}x", f"{r['flop_speedup']:.2f}x",
                       f"{r['flops'] / 1e9:,.1f}", _mib(r["peak_mem"])] for r in records]
    return "\n" + _align(lines, left=4)


def targets(records: list[dict[str, Any]], e2e: list[dict[str, Any]], device: torch.device) -> dict[str, Any]:
    """The issue's targets that this run measured: {what: {"speedup", "target", "met"}} (CPU targets on a CPU)."""
    out: dict[str, Any] = {}
    if device.type == "cpu":
        for what, kind, tokens, least in CPU_TARGETS:
            got = [r for r in records if r["tokens"] == tokens and r["step"] == "fwd" and r["auto"]
                   and (r["pattern"] == kind or r["pattern"].split(":")[0] == kind)]
            if got:  # every spelling of the kind must meet it (window and window:shift)
                worst = min(got, key=lambda r: r["speedup"])
                out[what] = {"speedup": worst["speedup"], "target": least, "met": worst["speedup"] >= least,
                             "pattern": worst["pattern"], "backend": worst["backend"]}
    for r in e2e:
        if r["attention"] != "dense" and device.type == "cpu":
            out[f"end to end ({r['step']})"] = {"speedup": r["speedup"], "target": E2E_TARGET,
                                                "met": r["speedup"] >= E2E_TARGET, "flop_speedup": r["flop_speedup"]}
    return out


def targets_text(found: dict[str, Any]) -> str:
    """The targets in words."""
    if not found:
        return ""
    lines = ["", "targets (fp32, this machine):"]
    for what, t in found.items():
        if "pattern" in t:
            extra = f" [{t['pattern']} on {t['backend']}]"
        else:  # the dense blocks, projections and MLPs bound what a schedule can save
            bound = t["flop_speedup"]
            extra = f" (FLOP bound {bound:.2f}x{': the target is above it' if t['target'] > bound else ''})"
        lines.append(f"  {what:32s} {t['speedup']:6.2f}x  target >= {t['target']:g}x: "
                     f"{'met' if t['met'] else 'NOT met'}{extra}")
    return "\n".join(lines)


def _align(lines: list[list[str]], left: int) -> str:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    text = ["  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True)))
            for line in lines]
    text.insert(1, "-" * len(text[0]))
    return "\n".join(text)


def _mib(n: int) -> str:
    return "n/a" if n < 0 else f"{n / 2**20:,.1f} MiB"
