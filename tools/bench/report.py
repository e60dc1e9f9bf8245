"""What ``vit bench`` prints: the header (device, load, FLOP checks), the table of rows and the ratio summary."""

from __future__ import annotations

import argparse
import json
import os
import statistics
from typing import Any

import torch

from .machine import env
from .rows import Row


def header(args: argparse.Namespace, device: torch.device, info: dict[str, Any]) -> str:
    """Model, device and method; other processes' CPU share; matmul peaks; FLOP and parity cross-checks."""
    e = env(device, args.cpu_start)
    lines = [f"vit bench: {info['model']} {json.dumps(args.model_args) if args.model_args else ''}".rstrip(),
             f"device: {e['device_name']} ({e['device']}, {e['threads']} threads), torch {e['torch']}, "
             f"timm {e['timm']}; medians of {args.repeats} interleaved repeats after {args.warmup} warm-up "
             "(ratios: median of the per-repeat ratios)",
             f"other processes kept {100 * e['other_processes_cpu']:.0f}% of the {os.cpu_count()} CPUs busy "
             "during the run (figures are trustworthy when this is near 0)"]
    for dtype, peak in args.peaks.items():
        lines.append(f"matmul peak ({dtype}): {peak / 1e9:,.1f} GFLOP/s  (MFU = achieved / this)")
    if "flops_analytical" in info:
        lines.append(f"FLOPs/img forward: counted {info['flops_infer'] / 1e9:.4f} G (torch's counter alone: "
                     f"{info['flops_infer_torch_counter_only'] / 1e9:.4f} G), analytical "
                     f"{info['flops_analytical'] / 1e9:.4f} G; train step (fwd+bwd) {info['flops_train'] / 1e9:.4f} G")
    if "flops_forward_analytical" in info:
        lines.append("FLOPs/img forward: " + "; ".join(
            f"mask {r}: counted {info['flops_forward'][r] / 1e9:.4f} G, analytical {a / 1e9:.4f} G"
            for r, a in info["flops_forward_analytical"].items()))
    if "max_abs_diff_vs_timm" in info:
        lines.append(f"same weights as timm: max |logit diff| = {info['max_abs_diff_vs_timm']:.2e}")
    if "abs_loss_diff_vs_reference" in info:
        lines.append(f"same weights as the reference MAE: |loss diff| = {info['abs_loss_diff_vs_reference']:.2e}")
    return "\n".join(lines) + "\n"


def format_table(rows: list[Row]) -> str:
    """The rows as an aligned text table."""
    mae = any(r.mask_ratio is not None for r in rows)
    head = ["impl", "dtype", "compile", "step", *(["mask"] if mae else []), "batch", "img/s", "ms/step",
            "GFLOP/img", "GFLOP/s", "MFU", "peak mem"]
    lines = [head]
    for r in rows:
        lines.append([
            r.impl, r.dtype, "yes" if r.compiled else "-", r.step,
            *([f"{r.mask_ratio:.2f}"] if mae else []), str(r.batch), f"{r.img_per_s:,.2f}",
            f"{1e3 * statistics.median(r.seconds):,.1f}", f"{r.flops_per_img / 1e9:.3f}",
            f"{r.flops_per_s / 1e9:,.1f}", f"{100 * r.mfu:.1f}%", _fmt_bytes(r.peak_mem_bytes),
        ])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = ["  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True)))
            for line in lines]
    text.insert(1, "-" * len(text[0]))
    return "\n".join(text)


def summary_text(summary: dict[str, float], mae: bool) -> str:
    """The ratios in words: MAE speedup and efficiency per (dtype, compile), or ours / timm per key."""
    if not summary:
        return ""
    lines = [""]
    if mae:
        for sfx in sorted({k.removeprefix("mae.flop_ratio") for k in summary if k.startswith("mae.flop_ratio")}):
            get = {k.removesuffix(sfx): v for k, v in summary.items() if k.endswith(sfx)} if sfx else summary
            tag = f" [{sfx.strip('.').replace('.', ', ')}]" if sfx else ""
            line = f"MAE mask 0.75 vs 0.0{tag}: FLOP ratio {get['mae.flop_ratio']:.2f}x"
            if "mae.speedup" in get:
                line += f"; ours: speedup {get['mae.speedup']:.2f}x, efficiency {100 * get['mae.efficiency']:.0f}%"
            if "mae.reference.speedup" in get:
                line += (f"; reference: speedup {get['mae.reference.speedup']:.2f}x, efficiency "
                         f"{100 * get['mae.reference.efficiency']:.0f}%")
                line += (f"\n  ours / reference: {get['mae.ratio_vs_reference']:.3f}x at mask 0.75, "
                         f"{get['mae.ratio_vs_reference_mask0']:.3f}x at mask 0.0")
            lines.append(line)
    else:
        lines.append("ours / timm (img/s):")
        lines += [f"  {k:36s} {v:.3f}x" for k, v in sorted(summary.items())]
    return "\n".join(lines)


def _fmt_bytes(n: int) -> str:
    return "n/a" if n < 0 else f"{n / 2**20:,.0f} MiB"
