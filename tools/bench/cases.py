"""The two benchmarks: a ViT's inference and training steps (with timm's twin), and MAE's at mask 0.75 and 0.0."""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import vit
from vit.export.interop import vit_to_timm
from vit.flops import count_flops, mae_forward_flops, vit_forward_flops
from vit.models import MaskedAutoencoder, VisionTransformer

from .reference_mae import ReferenceMAE
from .rows import Case, Row, measure
from .steps import classifier_loss, infer_fn, maybe_compile, train_fn
from .timing import matmul_peak

MASK_RATIOS = (0.75, 0.0)


def bench_vit(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Inference (batch 1 and ``batch_size``) and training steps of ours, and timm's twin with ``--against timm``."""
    name = args.model or "vit_small_patch16_224"
    torch.manual_seed(0)
    ours = vit.create_model(name, **args.model_args)
    if not isinstance(ours, VisionTransformer):
        raise ValueError(f"{name} is not a VisionTransformer (use --mae for MAE models)")
    ours = ours.to(device)
    models = {"ours": ours}
    pe = ours.patch_embed
    x1 = torch.randn(1, pe.in_chans, *pe.img_size, device=device)
    xb = torch.randn(args.batch_size, pe.in_chans, *pe.img_size, device=device)
    target = torch.randint(0, max(ours.num_classes, 1), (args.batch_size,), device=device)
    if ours.num_classes == 0:
        target = target[:0]
    info: dict[str, Any] = {"model": name}
    if args.against == "timm":
        models["timm"] = timm_twin(name, ours, args.model_args, device)
        with torch.no_grad():
            diff = (ours.eval()(x1) - models["timm"].eval()(x1)).abs().max().item()
        info["max_abs_diff_vs_timm"] = diff

    infer_flops = count_flops(lambda: ours.eval()(x1))
    with FlopCounterMode(display=False) as torch_only:  # without our SDPA formula, to show what it adds
        ours(x1)
    train_flops = count_flops(lambda: classifier_loss(x1, target[:1])(ours.train()).backward())
    ours.zero_grad(set_to_none=True)
    info.update(flops_infer=infer_flops, flops_train=train_flops, flops_analytical=vit_forward_flops(ours),
                flops_infer_torch_counter_only=torch_only.get_total_flops())

    rows: list[Row] = []
    for dtype in args.dtypes:
        peak = matmul_peak_of(args, device, dtype)
        for compiled in args.compile_modes:
            cases = []
            for impl, model in models.items():
                for x in (x1, xb) if args.batch_size > 1 else (x1,):
                    fn = infer_fn(maybe_compile(model, compiled), x, device, dtype)
                    cases.append(Case(impl, compiled, "infer", x.shape[0], fn, infer_flops))
                fn = train_fn(maybe_compile(model, compiled), classifier_loss(xb, target), device, dtype,
                              args.optimizer)
                cases.append(Case(impl, compiled, "train", args.batch_size, fn, train_flops))
            for step in ("infer", "train"):  # each model in eval mode for inference, train mode for training
                for m in models.values():
                    m.train(step == "train")
                rows += measure([c for c in cases if c.step == step], device, dtype, peak, args.warmup,
                                args.repeats, args.min_time)
    return {"info": info, "rows": rows}


def bench_mae(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """MAE pretraining steps at mask 0.75 and 0.0, ours and the reference, interleaved."""
    name = args.model or "mae_vit_small_patch16"
    torch.manual_seed(0)
    ours = vit.create_model(name, **args.model_args)
    if not isinstance(ours, MaskedAutoencoder):
        raise ValueError(f"{name} is not a MaskedAutoencoder; --mae needs an mae_* model such as mae_vit_small_patch16")
    ref = ReferenceMAE.like(ours)
    ours, ref = ours.to(device).train(), ref.to(device).train()
    pe = ours.encoder.patch_embed
    xb = torch.randn(args.batch_size, pe.in_chans, *pe.img_size, device=device)
    x1 = xb[:1]
    noise = torch.rand(1, pe.num_patches, device=device)
    with torch.no_grad():
        diff = (ours(x1, 0.75, noise)[0] - ref(x1, 0.75, noise)[0]).abs().item()
    flops, forward = {}, {}
    for r in MASK_RATIOS:
        with torch.no_grad():
            forward[r] = count_flops(lambda r=r: ours(x1, r))
        flops[r] = count_flops(lambda r=r: ours(x1, r)[0].backward())
        ours.zero_grad(set_to_none=True)
    info = {"model": name, "abs_loss_diff_vs_reference": diff,
            "flops_train": {str(r): f for r, f in flops.items()},
            "flops_forward": {str(r): f for r, f in forward.items()},
            "flops_forward_analytical": {str(r): mae_forward_flops(ours, r) for r in MASK_RATIOS}}

    rows: list[Row] = []
    for dtype in args.dtypes:
        peak = matmul_peak_of(args, device, dtype)
        for compiled in args.compile_modes:
            cases = []
            for impl, model in (("ours", ours), ("reference", ref))[: 2 if args.against == "reference" else 1]:
                for r in MASK_RATIOS:
                    fn = train_fn(maybe_compile(model, compiled), lambda mod, r=r: mod(xb, r)[0], device, dtype,
                                  args.optimizer)
                    cases.append(Case(impl, compiled, "train", args.batch_size, fn, flops[r], mask_ratio=r))
            # both masks, both implementations interleaved
            rows += measure(cases, device, dtype, peak, args.warmup, args.repeats, args.min_time)
    return {"info": info, "rows": rows}


def timm_twin(name: str, ours: nn.Module, model_args: dict[str, Any], device: torch.device) -> nn.Module:
    """timm's model of the same name and overrides, holding our weights."""
    import timm

    try:
        twin = timm.create_model(name, pretrained=False, **model_args)
    except Exception as err:  # timm raises several types for unknown names and arguments
        raise ValueError(f"timm cannot build {name!r} with {model_args}: {err}") from err
    twin.load_state_dict(vit_to_timm(ours.state_dict()))
    return twin.to(device)


def matmul_peak_of(args: argparse.Namespace, device: torch.device, dtype: str) -> float:
    """The matmul peak for ``dtype``, measured once per run and kept in ``args.peaks``."""
    if dtype not in args.peaks:
        size = args.peak_size or (8192 if device.type == "cuda" else 2048)
        tdtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        args.peaks[dtype] = matmul_peak(device, tdtype, size, repeats=max(args.repeats, 5), min_time=args.min_time)
    return args.peaks[dtype]
