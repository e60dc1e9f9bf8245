"""``vit bench --attention``: every attention pattern's core against dense SDPA, and a ViT dense vs windowed.

The core: q, k, v of the model's attention shape (ViT-S: 6 heads of 64) for ``--attention-batch`` images of N
patches on a square grid plus a class token, timed interleaved with dense SDPA per (tokens, step): ``fwd`` is a
forward without autograd, ``fwd+bwd`` a forward and the backward of a fixed upstream gradient. Each pattern runs
on the backend a model picks on this device (``vit.layers.attention_core``), and on the extra backends of
``--attention-backends`` (e.g. ``flex`` or ``mask`` on a CPU; flex on a CPU is forward only). ``build_ms`` is the
one-off time to build the pattern's cached tables or block mask, which a model pays once per grid.

End to end: the model (ViT-S/16 at 1,024 px: 4,096 tokens) dense and with ``--e2e-attention`` (every fourth block
dense), the same weights, inference at batch 1 and a training step, with FLOPs counted as density × dense.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import vit
from vit.flops import count_flops
from vit.layers import attention_schedule, density
from vit.layers.attention_core import attend, choose_backend
from vit.layers.attention_core.cache import clear_cache
from vit.layers.attention_core.flex import block_mask
from vit.layers.attention_core.oracle import oracle_mask
from vit.layers.attention_core.strided import strided_tables
from vit.layers.attention_core.tiles import tile_tables
from vit.layers.attention_core.window import window_tables

from .memory import peak_memory
from .steps import classifier_loss, infer_fn, train_fn
from .timing import sync, time_interleaved

PATTERNS = ("window:16", "window:16:shift", "neighborhood:7", "sliding:64", "strided:64", "kvpool:2", "kvpool:4")
TOKENS = {"cpu": (256, 1024, 4096), "cuda": (256, 1024, 4096, 16384)}
E2E_ATTENTION = "window:16*3,dense"  # ViTDet: windowed blocks, every fourth one global


def bench_attention(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Core records for every (tokens, step, pattern, backend) and the end-to-end records."""
    name = args.model or "vit_small_patch16_224"
    model_args = {"img_size": args.e2e_size, **args.model_args}
    torch.manual_seed(0)
    dense = vit.create_model(name, **model_args)
    heads, head_dim = dense.blocks[0].attn.num_heads, dense.blocks[0].attn.head_dim
    records: list[dict[str, Any]] = []
    for tokens in args.attention_tokens or TOKENS.get(device.type, TOKENS["cpu"]):
        records += _core(args, device, tokens, heads, head_dim)
    e2e = [] if args.no_e2e else _end_to_end(args, device, name, model_args, dense)
    info = {"model": name, "model_args": model_args, "heads": heads, "head_dim": head_dim,
            "batch": args.attention_batch, "e2e_attention": args.e2e_attention}
    return {"info": info, "attention": records, "end_to_end": e2e}


def _core(args: argparse.Namespace, device: torch.device, tokens: int, heads: int, head_dim: int) -> list[dict]:
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"--attention-tokens: {tokens} is not a square grid of patches")
    grid, P, B = (side, side), 1, args.attention_batch
    qkv = [torch.randn(B, heads, P + tokens, head_dim, device=device) for _ in range(3)]
    grad = torch.randn_like(qkv[0])
    patterns = [attention_schedule(p, 2)[1 if p.endswith(":shift") else 0] for p in args.attention_patterns]
    out = []
    for step in ("fwd", "fwd+bwd"):
        cases = [("dense", "sdpa", attention_schedule("dense", 1)[0])]
        for p in patterns:
            auto = choose_backend(p, qkv[0])
            for backend in dict.fromkeys([auto, *args.attention_backends]):
                if _runs(p, backend, step, device):
                    cases.append((str(p), backend, p))
        fns = [_core_fn(qkv, grad, p, grid, backend, step) for _, backend, p in cases]
        labels = [f"{n} [{b}] {tokens} tokens {step}" for n, b, _ in cases]
        times = time_interleaved(fns, device, args.warmup, args.repeats, args.min_time, labels)
        mems = [peak_memory(fn, device) for fn in fns]
        builds = [_build_ms(p, backend, grid, P, device) for _, backend, p in cases]  # leaves caches warm
        dense_s = times[0].times
        for (spelled, backend, p), m, mem, build in zip(cases, times, mems, builds, strict=True):
            out.append({"pattern": spelled, "backend": backend, "auto": backend == choose_backend(p, qkv[0]),
                        "tokens": tokens, "prefix": P, "batch": B,
                        "step": step, "ms": 1e3 * statistics.median(m.times),
                        "dense_ms": 1e3 * statistics.median(dense_s),
                        "speedup": statistics.median(dense_s) / statistics.median(m.times),
                        "speedup_paired": statistics.median(d / t for d, t in zip(dense_s, m.times, strict=True)),
                        "density": density(p, grid, P), "peak_mem": mem, "dense_peak_mem": mems[0],
                        "build_ms": build, "seconds": list(m.times)})
    return out


def _end_to_end(args: argparse.Namespace, device: torch.device, name: str, model_args: dict[str, Any],
                dense: torch.nn.Module) -> list[dict[str, Any]]:
    """Inference (batch 1) and a training step of the dense and the windowed model, interleaved per step."""
    windowed = vit.create_model(name, **model_args, attention=args.e2e_attention)
    windowed.load_state_dict(dense.state_dict())  # a dense checkpoint loads strictly: patterns add no parameters
    models = {"dense": dense.to(device), args.e2e_attention: windowed.to(device)}
    pe = dense.patch_embed
    x = torch.randn(1, pe.in_chans, *pe.img_size, device=device)
    y = torch.zeros(1, dtype=torch.long, device=device)
    flops = {k: {"infer": count_flops(lambda m=m: m.eval()(x)),
                 "train": count_flops(lambda m=m: classifier_loss(x, y)(m.train()).backward())}
             for k, m in models.items()}
    for m in models.values():
        m.zero_grad(set_to_none=True)
    out = []
    for step in ("infer", "train"):
        for m in models.values():
            m.train(step == "train")
        fns = [infer_fn(m, x, device, "fp32") if step == "infer" else
               train_fn(m, classifier_loss(x, y), device, "fp32", args.optimizer) for m in models.values()]
        times = time_interleaved(fns, device, args.warmup, args.repeats, args.min_time,
                                 [f"e2e {k} {step}" for k in models])
        base = times[0].times
        for (k, _), fn, m in zip(models.items(), fns, times, strict=True):
            out.append({"model": name, "img_size": list(pe.img_size), "attention": k, "step": step, "batch": 1,
                        "ms": 1e3 * statistics.median(m.times), "dense_ms": 1e3 * statistics.median(base),
                        "speedup": statistics.median(base) / statistics.median(m.times),
                        "flops": flops[k][step], "flop_speedup": flops["dense"][step] / flops[k][step],
                        "peak_mem": peak_memory(fn, device), "seconds": list(m.times)})
    return out


def e2e_profiles(args: argparse.Namespace, device: torch.device, profile: Callable[..., str]) -> str:
    """``--profile`` with ``--attention``: where the dense and the windowed model spend an inference forward."""
    name = args.model or "vit_small_patch16_224"
    model_args = {"img_size": args.e2e_size, **args.model_args}
    x = None
    lines = []
    for attention in ("dense", args.e2e_attention):
        torch.manual_seed(0)
        m = vit.create_model(name, **model_args, attention=attention).to(device).eval()
        x = torch.randn(1, m.patch_embed.in_chans, *m.patch_embed.img_size, device=device) if x is None else x
        lines += [f"\nprofile: {name} at {model_args['img_size']} px, attention {attention}, inference batch 1",
                  profile(infer_fn(m, x, device, "fp32"), device)]
    return "\n".join(lines)


def _runs(p: Any, backend: str, step: str, device: torch.device) -> bool:
    """Whether ``backend`` computes ``p`` for ``step`` here (flex: not kvpool; on a CPU forward only)."""
    try:
        choose_backend(p, torch.empty(0, device=device), backend=backend)
    except ValueError:
        return False
    return not (backend == "flex" and device.type == "cpu" and step != "fwd")


def _core_fn(qkv: list[torch.Tensor], grad: torch.Tensor, p: Any, grid: tuple[int, int], backend: str,
             step: str) -> Callable[[], Any]:
    if step == "fwd":
        def fwd() -> torch.Tensor:
            with torch.no_grad():
                return attend(*qkv, p, grid, backend=backend)
        return fwd
    leaves = [t.detach().requires_grad_() for t in qkv]

    def fwd_bwd() -> None:
        attend(*leaves, p, grid, backend=backend).backward(grad)
        for t in leaves:
            t.grad = None

    return fwd_bwd


def _build_ms(p: Any, backend: str, grid: tuple[int, int], P: int, device: torch.device) -> float:
    """Milliseconds to build the cached tables (or flex block mask) ``backend`` needs for ``p`` on ``grid``."""
    builders = {"window": lambda: window_tables(p, grid, P, device),
                "tiles": lambda: tile_tables(p, grid, P, device),
                "strided": lambda: strided_tables(p.size, grid[0] * grid[1], device),
                "mask": lambda: oracle_mask(p, grid, P, device),
                "flex": lambda: block_mask(p, grid, P, P + grid[0] * grid[1], device)}
    if backend not in builders:
        return 0.0
    clear_cache()
    sync(device)
    t0 = time.perf_counter()
    builders[backend]()
    sync(device)
    return 1e3 * (time.perf_counter() - t0)
