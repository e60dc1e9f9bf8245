"""``--profile``: where one step's time goes (matmul/attention share and the top ops), for each implementation."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch

import vit

from .cases import timm_twin
from .reference_mae import ReferenceMAE
from .steps import classifier_loss, infer_fn, train_fn
from .timing import sync

MATMUL_OPS = ("addmm", "mm", "bmm", "baddbmm", "matmul", "linear", "conv", "scaled_dot_product", "_flash_attention")


def profile_summary(fn: Callable[[], Any], device: torch.device, top: int = 12, runs: int = 3) -> str:
    """Self time per call of the ops ``fn`` runs (averaged over ``runs`` calls, after one untimed call):
    the share spent in matmul, convolution and attention kernels, and the top ops."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()
    sync(device)
    with profile(activities=acts) as prof:
        for _ in range(runs):
            fn()
        sync(device)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0 or e.self_device_time_total > 0]

    def time_of(e: Any) -> float:
        return (e.self_device_time_total if device.type == "cuda" else e.self_cpu_time_total) / runs

    total = sum(time_of(e) for e in events) or 1.0
    mm = sum(time_of(e) for e in events if e.key.startswith("aten::") and any(k in e.key for k in MATMUL_OPS))
    lines = [f"  matmul/conv/attention kernels: {100 * mm / total:.1f}% of {total / 1e3:,.1f} ms self time per call"]
    for e in sorted(events, key=time_of, reverse=True)[:top]:
        share, ms = 100 * time_of(e) / total, time_of(e) / 1e3
        lines.append(f"    {share:5.1f}%  {ms:9.2f} ms  x{e.count // runs:<5d} {e.key}")
    return "\n".join(lines)


def print_profiles(args: argparse.Namespace, device: torch.device) -> None:
    """Profile one forward and one training step of each implementation (fp32, eager)."""
    torch.manual_seed(0)
    if args.mae:
        ours = vit.create_model(args.model or "mae_vit_small_patch16", **args.model_args).to(device).train()
        models = {"ours": ours, "reference": ReferenceMAE.like(ours).to(device).train()}
        pe = ours.encoder.patch_embed
        x = torch.randn(args.batch_size, pe.in_chans, *pe.img_size, device=device)
        steps = {"train mask 0.75": lambda m: train_fn(m, lambda mod: mod(x, 0.75)[0], device, "fp32", args.optimizer)}
    else:
        name = args.model or "vit_small_patch16_224"
        ours = vit.create_model(name, **args.model_args).to(device)
        models = {"ours": ours}
        if args.against == "timm":
            models["timm"] = timm_twin(name, ours, args.model_args, device)
        pe = ours.patch_embed
        x = torch.randn(args.batch_size, pe.in_chans, *pe.img_size, device=device)
        y = torch.zeros(args.batch_size, dtype=torch.long, device=device)[: args.batch_size * (ours.num_classes > 0)]
        steps = {"infer": lambda m: infer_fn(m.eval(), x, device, "fp32"),
                 "train": lambda m: train_fn(m.train(), classifier_loss(x, y), device, "fp32", args.optimizer)}
    for step, make in steps.items():
        for impl, model in models.items():
            print(f"\nprofile: {impl}, {step}, batch {args.batch_size}")
            print(profile_summary(make(model), device))
