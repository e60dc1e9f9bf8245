"""``vit bench``: throughput, peak memory, FLOPs and MFU of our models, side by side with timm and the MAE reference.

Everything is measured in one process, interleaved (each repeat runs every candidate once, in rotating order),
after warm-up, and reported as medians, because a shared machine drifts between runs. FLOPs are counted with
``FlopCounterMode`` plus our own formula for the fused attention kernels (the CPU flash kernel has none in
torch, which would under-count a ViT-S by ~8%), and are model FLOPs: the backward of attention counts its four
gradient matmuls, not the scores the kernel recomputes. MFU is achieved FLOP/s over a measured matmul peak.

Run ``vit bench --help`` (or ``python tools/benchmark.py --help``) for the options.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext, suppress
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import vit
from vit.export.interop import vit_to_mae_official, vit_to_timm
from vit.models import MaskedAutoencoder, VisionTransformer

aten = torch.ops.aten

# ------------------------------------------------------------------------------------------------- FLOP counting


def sdpa_flops(q_shape: Sequence[int], k_shape: Sequence[int], v_shape: Sequence[int]) -> int:
    """Forward FLOPs of softmax(q kᵀ) v for q [..., N, d], k [..., M, d], v [..., M, dv]: two batched matmuls.

    Heads are taken from the query, so grouped-query attention (fewer key/value heads) counts correctly.
    """
    *lead, N, d = q_shape
    M, dv = k_shape[-2], v_shape[-1]
    b = math.prod(lead)
    return 2 * b * N * M * d + 2 * b * N * M * dv


def sdpa_backward_flops(q_shape: Sequence[int], k_shape: Sequence[int], v_shape: Sequence[int]) -> int:
    """Backward model FLOPs: dV = Pᵀ·dO, dP = dO·Vᵀ, dQ = dS·K, dK = dSᵀ·Q, twice the forward.

    Kernels that recompute the scores do one more matmul; torch's own CUDA formulas count it, we do not, so
    fused and manual attention count the same and MFU means the same on every device.
    """
    return 2 * sdpa_flops(q_shape, k_shape, v_shape)


def _sdpa_forward_formula(q: Sequence[int], k: Sequence[int], v: Sequence[int], *args: Any, **kwargs: Any) -> int:
    return sdpa_flops(q, k, v)


def _sdpa_backward_formula(
    grad_out: Sequence[int], q: Sequence[int], k: Sequence[int], v: Sequence[int], *args: Any, **kwargs: Any
) -> int:
    return sdpa_backward_flops(q, k, v)


def sdpa_flop_mapping() -> dict[Any, Callable[..., int]]:
    """``custom_mapping`` for ``FlopCounterMode``: every fused SDPA kernel, forward and backward.

    The CPU flash kernel (``_scaled_dot_product_flash_attention_for_cpu``) has no formula in torch, so its
    attention would count as zero; the CUDA kernels are overridden too so the backward counts model FLOPs
    everywhere. All these ops take (q, k, v) [B, H, N, d] first, their backwards (grad_out, q, k, v).
    """
    names = [
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
    ]
    mapping: dict[Any, Callable[..., int]] = {}
    for name in names:
        if hasattr(aten, name):
            mapping[getattr(aten, name)] = _sdpa_forward_formula
        if hasattr(aten, f"{name}_backward"):
            mapping[getattr(aten, f"{name}_backward")] = _sdpa_backward_formula
    return mapping


def count_flops(fn: Callable[[], Any]) -> int:
    """Total FLOPs of everything ``fn()`` runs (matmuls, convolutions and attention; 2 FLOPs per MAC)."""
    with FlopCounterMode(display=False, custom_mapping=sdpa_flop_mapping()) as counter:
        fn()
    return counter.get_total_flops()


def vit_forward_flops(model: VisionTransformer) -> int:
    """Analytical forward FLOPs of one image at the model's ``img_size``: matmuls, attention, patch projection.

    Norms, activations, softmax and additions are not counted (nor by ``FlopCounterMode``); they are a few
    per mille of the total.
    """
    pe = model.patch_embed
    D, L = model.embed_dim, pe.num_patches
    T = model.num_prefix_tokens + L
    flops = 2 * L * pe.in_chans * pe.patch_size[0] * pe.patch_size[1] * D
    for blk in model.blocks:
        hidden = blk.mlp.fc1.out_features
        flops += 2 * T * D * 3 * D + 2 * T * T * D * 2 + 2 * T * D * D + 2 * 2 * T * D * hidden
    if model.attn_pool is not None:
        P = model.attn_pool.latent.shape[1]
        S = T if model.pool_include_prefix else L
        hidden = model.attn_pool.mlp.fc1.out_features
        flops += 2 * P * D * D + 2 * S * D * 2 * D + 2 * P * S * D * 2 + 2 * P * D * D + 2 * 2 * P * D * hidden
    if isinstance(model.head, nn.Linear):
        flops += 2 * D * model.head.out_features
    return flops


# ----------------------------------------------------------------------------------------- the reference MAE


class ReferenceMAE(nn.Module):
    """MAE built the way its authors build it: timm ``Block``s on the visible tokens and their masking code.

    Written here only to time ours against. Parameter names are the official checkpoint's, so
    ``vit_to_mae_official(ours.state_dict())`` loads into it and both compute the same loss for the same noise.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = False,
    ) -> None:
        super().__init__()
        from timm.layers import PatchEmbed
        from timm.models.vision_transformer import Block

        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        L = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, L + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer) for _ in range(depth)]
        )
        self.norm = norm_layer(embed_dim)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, L + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [
                Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans)
        self.patch_size, self.in_chans, self.norm_pix_loss = patch_size, in_chans, norm_pix_loss

    @classmethod
    def like(cls, mae: MaskedAutoencoder) -> ReferenceMAE:
        """A reference with the configuration and the weights of our ``mae``."""
        a = mae.model_args
        if a.get("reg_tokens") or a.get("qk_norm") or not a.get("qkv_bias", True):
            raise ValueError("the reference MAE has a class token only, qkv bias and no qk-norm")
        ph, pw = (a["patch_size"],) * 2 if isinstance(a["patch_size"], int) else a["patch_size"]
        if ph != pw:
            raise ValueError(f"the reference MAE needs square patches, got {ph}x{pw}")
        keys = ("img_size", "in_chans", "embed_dim", "depth", "num_heads", "decoder_embed_dim", "decoder_depth",
                "decoder_num_heads", "mlp_ratio", "norm_pix_loss")
        ref = cls(patch_size=ph, **{k: a[k] for k in keys})
        ref.load_state_dict(vit_to_mae_official(mae.state_dict()))
        return ref

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] → [B, L, p·p·C]."""
        p, c = self.patch_size, self.in_chans
        h, w = imgs.shape[2] // p, imgs.shape[3] // p
        x = imgs.reshape(imgs.shape[0], c, h, p, w, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(imgs.shape[0], h * w, p * p * c)

    def random_masking(
        self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep the lowest-noise patches of [B, L, D]; mask [B, L] is 0 for kept, 1 for removed."""
        B, L, D = x.shape
        keep = int(L * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(B, L, device=x.device)
        shuffle = torch.argsort(noise, dim=1)
        restore = torch.argsort(shuffle, dim=1)
        kept = torch.gather(x, 1, shuffle[:, :keep].unsqueeze(-1).repeat(1, 1, D))
        mask = torch.ones(B, L, device=x.device)
        mask[:, :keep] = 0
        return kept, torch.gather(mask, 1, restore), restore

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Visible tokens through the encoder: [B, 1 + L_keep, D], mask, ids_restore."""
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        x, mask, restore = self.random_masking(x, mask_ratio, noise)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, restore

    def forward_decoder(self, x: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        """[B, 1 + L_keep, D] → per-patch pixels [B, L, p·p·C]."""
        x = self.decoder_embed(x)
        masked = self.mask_token.repeat(x.shape[0], restore.shape[1] + 1 - x.shape[1], 1)
        patches = torch.cat([x[:, 1:], masked], dim=1)
        patches = torch.gather(patches, 1, restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """→ (loss over masked patches, or over all when none is masked; pred; mask)."""
        latent, mask, restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, restore)
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)
        loss = (loss * mask).sum() / mask.sum() if mask_ratio > 0 else loss.mean()
        return loss, pred, mask


# ------------------------------------------------------------------------------------------ timing and memory


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_calls(fn: Callable[[], Any], iters: int, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / iters


def time_interleaved(
    fns: Sequence[Callable[[], Any]], device: torch.device, warmup: int, repeats: int, min_time: float
) -> list[list[float]]:
    """Seconds per call of each ``fn``, one figure per repeat; every repeat runs each fn once, in rotating order.

    Each fn is called ``warmup`` times first (at least once), then timed over enough calls to last
    ``min_time`` seconds, so short calls (batch 1) are not dominated by timer and launch noise.
    """
    iters = []
    for fn in fns:
        for _ in range(max(warmup, 1)):
            fn()
        once = _time_calls(fn, 1, device)
        iters.append(max(1, math.ceil(min_time / max(once, 1e-6))))
    times: list[list[float]] = [[] for _ in fns]
    for r in range(repeats):
        for j in range(len(fns)):
            i = (j + r) % len(fns)
            times[i].append(_time_calls(fns[i], iters[i], device))
    return times


def _proc_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field_name}:\s+(\d+) kB", f.read(), re.MULTILINE)
    return int(match.group(1)) if match else 0


def peak_memory(fn: Callable[[], Any], device: torch.device) -> int:
    """Bytes one call of ``fn`` needs above what was allocated before it.

    CUDA: ``max_memory_allocated`` after a reset. CPU: the resident-set high-water mark (Linux ``VmHWM``,
    reset through ``/proc/self/clear_refs``) over the resident set before the call, after trimming the heap so
    memory freed by earlier calls is not counted as in use. Returns -1 where neither is available.
    """
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
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


def _malloc_trim() -> None:
    """Hand freed heap memory back to the OS (glibc), so the resident set before a call is what is in use."""
    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 3, min_time: float = 0.3) -> float:
    """FLOP/s of large square matmuls, best of ``repeats``: the peak MFU is measured against.

    The best rather than the median, because a peak is what the device can do when nothing else runs.
    """
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    (times,) = time_interleaved([lambda: a @ b], device, warmup=1, repeats=repeats, min_time=min_time)
    return 2 * size**3 / min(times)


# ---------------------------------------------------------------------------------------------------- cases


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


def _autocast(device: torch.device, dtype: str) -> AbstractContextManager[Any]:
    return torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()


def _optimizer(model: nn.Module, impl: str) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    # "fused" is one multi-tensor kernel, on CUDA and on CPU; on CPU torch's default is a per-tensor for-loop,
    # 7x slower for ViT-S's 22M parameters (56 vs 7.5 ms a step on the 2-core dev machine)
    kwargs = {"fused": {"fused": True}, "foreach": {"foreach": True}, "forloop": {"foreach": False}}[impl]
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05, **kwargs)


def _infer_fn(model: nn.Module, x: torch.Tensor, device: torch.device, dtype: str) -> Callable[[], Any]:
    def step() -> torch.Tensor:
        with torch.inference_mode(), _autocast(device, dtype):
            return model(x)

    return step


def _train_fn(
    model: nn.Module, forward_loss: Callable[[nn.Module], torch.Tensor], device: torch.device, dtype: str,
    optimizer: str = "fused",
) -> Callable[[], Any]:
    opt = _optimizer(model, optimizer)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with _autocast(device, dtype):
            loss = forward_loss(model)
        loss.backward()
        opt.step()

    return step


def _classifier_loss(x: torch.Tensor, target: torch.Tensor) -> Callable[[nn.Module], torch.Tensor]:
    def loss(model: nn.Module) -> torch.Tensor:
        out = model(x).float()
        return F.cross_entropy(out, target) if out.shape[-1] > 1 and target.numel() else out.square().mean()

    return loss


def _maybe_compile(model: nn.Module, compiled: bool) -> nn.Module:
    # one static graph per case: with a shared wrapper the second batch size would recompile a dynamic-shape
    # graph, slower than either static one
    return torch.compile(model, dynamic=False) if compiled else model  # type: ignore[return-value]


def _measure(
    cases: list[Case], args: argparse.Namespace, device: torch.device, dtype: str, peak: float
) -> list[Row]:
    """Time ``cases`` interleaved, grouped by (step, batch) so each group's figures are comparable."""
    rows = []
    groups: dict[tuple[str, int], list[Case]] = {}
    for c in cases:
        groups.setdefault((c.step, c.batch), []).append(c)
    for group in groups.values():
        times = time_interleaved([c.fn for c in group], device, args.warmup, args.repeats, args.min_time)
        for c, t in zip(group, times, strict=True):
            mem = peak_memory(c.fn, device)
            rows.append(Row(c.impl, dtype, c.compiled, c.step, c.batch, t, c.flops_per_img, peak, c.mask_ratio, mem))
    return rows


# -------------------------------------------------------------------------------------------------- ViT mode


def _timm_twin(name: str, ours: nn.Module, model_args: dict[str, Any], device: torch.device) -> nn.Module:
    import timm

    try:
        twin = timm.create_model(name, pretrained=False, **model_args)
    except Exception as err:  # timm raises several types for unknown names and arguments
        raise ValueError(f"timm cannot build {name!r} with {model_args}: {err}") from err
    twin.load_state_dict(vit_to_timm(ours.state_dict()))
    return twin.to(device)


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
        models["timm"] = _timm_twin(name, ours, args.model_args, device)
        with torch.no_grad():
            diff = (ours.eval()(x1) - models["timm"].eval()(x1)).abs().max().item()
        info["max_abs_diff_vs_timm"] = diff

    infer_flops = count_flops(lambda: ours.eval()(x1))
    with FlopCounterMode(display=False) as torch_only:  # without our SDPA formula, to show what it adds
        ours(x1)
    train_flops = count_flops(lambda: _classifier_loss(x1, target[:1])(ours.train()).backward())
    ours.zero_grad(set_to_none=True)
    info.update(flops_infer=infer_flops, flops_train=train_flops, flops_analytical=vit_forward_flops(ours),
                flops_infer_torch_counter_only=torch_only.get_total_flops())

    rows: list[Row] = []
    for dtype in args.dtypes:
        peak = _peak(args, device, dtype)
        for compiled in args.compile_modes:
            cases = []
            for impl, model in models.items():
                for x in (x1, xb) if args.batch_size > 1 else (x1,):
                    fn = _infer_fn(_maybe_compile(model, compiled), x, device, dtype)
                    cases.append(Case(impl, compiled, "infer", x.shape[0], fn, infer_flops))
                fn = _train_fn(_maybe_compile(model, compiled), _classifier_loss(xb, target), device, dtype,
                               args.optimizer)
                cases.append(Case(impl, compiled, "train", args.batch_size, fn, train_flops))
            rows += _measure_modes(cases, args, device, dtype, peak, models)
    return {"info": info, "rows": rows}


def _measure_modes(
    cases: list[Case], args: argparse.Namespace, device: torch.device, dtype: str, peak: float,
    models: dict[str, nn.Module],
) -> list[Row]:
    """``_measure`` with each model switched to eval for inference cases and to train for training cases."""
    rows = []
    for step in ("infer", "train"):
        for m in models.values():
            m.train(step == "train")
        rows += _measure([c for c in cases if c.step == step], args, device, dtype, peak)
    return rows


def _peak(args: argparse.Namespace, device: torch.device, dtype: str) -> float:
    if dtype not in args.peaks:
        size = args.peak_size or (8192 if device.type == "cuda" else 2048)
        tdtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        args.peaks[dtype] = matmul_peak(device, tdtype, size, repeats=max(args.repeats, 5), min_time=args.min_time)
    return args.peaks[dtype]


# -------------------------------------------------------------------------------------------------- MAE mode


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
    ratios = (0.75, 0.0)
    flops = {}
    for r in ratios:
        flops[r] = count_flops(lambda r=r: ours(x1, r)[0].backward())
        ours.zero_grad(set_to_none=True)
    info = {"model": name, "abs_loss_diff_vs_reference": diff,
            "flops_train": {str(r): f for r, f in flops.items()}}

    rows: list[Row] = []
    for dtype in args.dtypes:
        peak = _peak(args, device, dtype)
        for compiled in args.compile_modes:
            cases = []
            for impl, model in (("ours", ours), ("reference", ref))[: 2 if args.against == "reference" else 1]:
                for r in ratios:
                    fn = _train_fn(_maybe_compile(model, compiled), lambda mod, r=r: mod(xb, r)[0], device, dtype,
                                   args.optimizer)
                    cases.append(Case(impl, compiled, "train", args.batch_size, fn, flops[r], mask_ratio=r))
            rows += _measure(cases, args, device, dtype, peak)  # both masks, both implementations interleaved
    return {"info": info, "rows": rows}


# --------------------------------------------------------------------------------------------- summaries


def _find(rows: list[Row], **want: Any) -> Row | None:
    for r in rows:
        if all(getattr(r, k) == v for k, v in want.items()):
            return r
    return None


def paired_ratio(a: Row, b: Row) -> float:
    """img/s of ``a`` over ``b``: the median over repeats of each repeat's ratio.

    ``a`` and ``b`` ran in the same interleaved group, so repeat r of each ran back to back; pairing them cancels
    load that drifts over the run, which a ratio of the two medians would not.
    """
    return statistics.median((a.batch / ta) / (b.batch / tb) for ta, tb in zip(a.seconds, b.seconds, strict=True))


def _suffix(dtype: str, compiled: bool, first: tuple[str, bool]) -> str:
    return "" if (dtype, compiled) == first else f".{dtype}{'.compile' if compiled else ''}"


def vit_ratios(rows: list[Row], batch: int, first: tuple[str, bool]) -> dict[str, float]:
    """ours / timm img/s per step; keys ``ratio.infer`` (batch B), ``ratio.infer_b1``, ``ratio.train``."""
    out = {}
    for dtype, compiled in {(r.dtype, r.compiled) for r in rows}:
        sfx = _suffix(dtype, compiled, first)
        for key, step, b in (("infer", "infer", batch), ("infer_b1", "infer", 1), ("train", "train", batch)):
            ours = _find(rows, impl="ours", dtype=dtype, compiled=compiled, step=step, batch=b)
            theirs = _find(rows, impl="timm", dtype=dtype, compiled=compiled, step=step, batch=b)
            if ours and theirs:
                out[f"ratio.{key}{sfx}"] = paired_ratio(ours, theirs)
    return out


def mae_ratios(rows: list[Row], flops: dict[str, int], first: tuple[str, bool]) -> dict[str, float]:
    """Speedup of mask 0.75 over 0.0, the FLOP ratio, efficiency, and ours / reference at 0.75."""
    out = {}
    flop_ratio = flops["0.0"] / flops["0.75"]
    for dtype, compiled in {(r.dtype, r.compiled) for r in rows}:
        sfx = _suffix(dtype, compiled, first)
        got = {(r.impl, r.mask_ratio): r for r in rows if r.dtype == dtype and r.compiled == compiled}
        out[f"mae.flop_ratio{sfx}"] = flop_ratio
        for impl, prefix in (("ours", "mae"), ("reference", "mae.reference")):
            if (impl, 0.75) in got:
                speedup = paired_ratio(got[impl, 0.75], got[impl, 0.0])
                out[f"{prefix}.speedup{sfx}"] = speedup
                out[f"{prefix}.efficiency{sfx}"] = speedup / flop_ratio
        if ("reference", 0.75) in got:
            out[f"mae.ratio_vs_reference{sfx}"] = paired_ratio(got["ours", 0.75], got["reference", 0.75])
            out[f"mae.ratio_vs_reference_mask0{sfx}"] = paired_ratio(got["ours", 0.0], got["reference", 0.0])
    return out


def _fmt_bytes(n: int) -> str:
    return "n/a" if n < 0 else f"{n / 2**20:,.0f} MiB"


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


# ------------------------------------------------------------------------------------------------- profile


MATMUL_OPS = ("addmm", "mm", "bmm", "baddbmm", "matmul", "linear", "conv", "scaled_dot_product", "_flash_attention")


def profile_summary(fn: Callable[[], Any], device: torch.device, top: int = 12, runs: int = 3) -> str:
    """Self time per call of the ops ``fn`` runs (averaged over ``runs`` calls, after one untimed call):
    the share spent in matmul, convolution and attention kernels, and the top ops."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()
    _sync(device)
    with profile(activities=acts) as prof:
        for _ in range(runs):
            fn()
        _sync(device)
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


# ----------------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    """The ``vit bench`` options."""
    p = argparse.ArgumentParser(
        prog="vit bench", description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="Example: vit bench --model vit_small_patch16_224 --batch-size 32 --against timm",
    )
    p.add_argument("--model", help="registered name (default vit_small_patch16_224; with --mae mae_vit_small_patch16)")
    p.add_argument("--model-args", type=json.loads, default={}, help="JSON constructor overrides, e.g. '{\"depth\":2}'")
    p.add_argument("--batch-size", type=int, default=32, help="the large batch (inference and training)")
    p.add_argument("--against", choices=["none", "timm", "reference"],
                   help="time timm's model of the same name (default: none), or with --mae the reference MAE "
                        "(default: reference)")
    p.add_argument("--mae", action="store_true", help="MAE pretraining steps: mask 0.75 vs 0.0, ours vs reference")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd versions")
    p.add_argument("--dtype", choices=["fp32", "bf16", "both"], default="fp32",
                   help="bf16 = autocast. On CPUs without native bf16 matmuls (AVX-512 BF16 / AMX) it is many times "
                        "slower than fp32; with them it can be faster: measure with 'both'")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda when available)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per case; medians are reported")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per case before timing")
    p.add_argument("--min-time", type=float, default=0.25, help="seconds each timed repeat lasts at least")
    p.add_argument("--peak-size", type=int, help="matmul size for the peak (default 2048 CPU, 8192 CUDA)")
    p.add_argument("--optimizer", choices=["fused", "foreach", "forloop"], default="fused",
                   help="AdamW implementation in the training step (forloop = torch's CPU default)")
    p.add_argument("--profile", action="store_true", help="print the top ops of one step of each model")
    p.add_argument("--json", dest="json_path", help="write a machine-readable record here")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; prints a table, optionally writes JSON. Returns a process exit code."""
    args = build_parser().parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)  # leave the caller's process as it was (tests call main in-process)


def _run(args: argparse.Namespace) -> int:
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("vit bench: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    if not isinstance(args.model_args, dict):
        print("vit bench: --model-args must be a JSON object", file=sys.stderr)
        return 2
    args.cpu_start = _cpu_times()  # other processes compete for the cores: their share is printed with the figures
    args.against = args.against or ("reference" if args.mae else "none")
    if args.against == ("timm" if args.mae else "reference"):
        print(f"vit bench: --against {args.against} needs {'no ' if args.mae else ''}--mae", file=sys.stderr)
        return 2
    args.dtypes = ["fp32", "bf16"] if args.dtype == "both" else [args.dtype]
    args.compile_modes = [False, True] if args.compile else [False]
    args.peaks = {}
    first = (args.dtypes[0], False)
    try:
        result = bench_mae(args, device) if args.mae else bench_vit(args, device)
    except ValueError as err:
        print(f"vit bench: {err}", file=sys.stderr)
        return 2
    rows, info = result["rows"], result["info"]
    summary = mae_ratios(rows, info["flops_train"], first) if args.mae else vit_ratios(rows, args.batch_size, first)

    print(_header(args, device, info))
    print(format_table(rows))
    print(_summary_text(summary, args.mae))
    if args.profile:
        _print_profiles(args, device)
    if args.json_path:
        config = {k: v for k, v in vars(args).items() if k not in ("peaks", "cpu_start")}
        record = {"config": config, "env": _env(device, args.cpu_start), "info": info, "peak_flops": args.peaks,
                  "rows": [r.record() for r in rows], **summary}
        with open(args.json_path, "w") as f:
            json.dump(record, f, indent=2)
    return 0


def _env(device: torch.device, cpu_start: tuple[float, float, float] | None = None) -> dict[str, Any]:
    import timm

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {"device": str(device), "device_name": name, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(),
            "other_processes_cpu": _others_cpu_share(cpu_start) if cpu_start else None}


def _cpu_times() -> tuple[float, float, float]:
    """(wall seconds, busy CPU seconds of the whole machine, CPU seconds of this process)."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
        busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        busy = float("nan")
    t = os.times()
    return time.perf_counter(), busy, t.user + t.system


def _others_cpu_share(start: tuple[float, float, float]) -> float:
    """Mean share of the CPUs that other processes kept busy since ``start`` (0 = the benchmark ran alone)."""
    wall0, busy0, own0 = start
    wall1, busy1, own1 = _cpu_times()
    return max(0.0, ((busy1 - busy0) - (own1 - own0)) / ((wall1 - wall0) * (os.cpu_count() or 1)))


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            match = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.MULTILINE)
        return match.group(1) if match else platform.processor()
    except OSError:
        return platform.processor()


def _header(args: argparse.Namespace, device: torch.device, info: dict[str, Any]) -> str:
    env = _env(device, args.cpu_start)
    lines = [f"vit bench: {info['model']} {json.dumps(args.model_args) if args.model_args else ''}".rstrip(),
             f"device: {env['device_name']} ({env['device']}, {env['threads']} threads), torch {env['torch']}, "
             f"timm {env['timm']}; medians of {args.repeats} interleaved repeats after {args.warmup} warm-up "
             "(ratios: median of the per-repeat ratios)",
             f"other processes kept {100 * env['other_processes_cpu']:.0f}% of the {os.cpu_count()} CPUs busy "
             "during the run (figures are trustworthy when this is near 0)"]
    for dtype, peak in args.peaks.items():
        lines.append(f"matmul peak ({dtype}): {peak / 1e9:,.1f} GFLOP/s  (MFU = achieved / this)")
    if "flops_analytical" in info:
        lines.append(f"FLOPs/img forward: counted {info['flops_infer'] / 1e9:.4f} G (torch's counter alone: "
                     f"{info['flops_infer_torch_counter_only'] / 1e9:.4f} G), analytical "
                     f"{info['flops_analytical'] / 1e9:.4f} G; train step (fwd+bwd) {info['flops_train'] / 1e9:.4f} G")
    if "max_abs_diff_vs_timm" in info:
        lines.append(f"same weights as timm: max |logit diff| = {info['max_abs_diff_vs_timm']:.2e}")
    if "abs_loss_diff_vs_reference" in info:
        lines.append(f"same weights as the reference MAE: |loss diff| = {info['abs_loss_diff_vs_reference']:.2e}")
    return "\n".join(lines) + "\n"


def _summary_text(summary: dict[str, float], mae: bool) -> str:
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


def _print_profiles(args: argparse.Namespace, device: torch.device) -> None:
    """Profile one forward and one training step of each implementation (fp32, eager)."""
    torch.manual_seed(0)
    if args.mae:
        ours = vit.create_model(args.model or "mae_vit_small_patch16", **args.model_args).to(device).train()
        models = {"ours": ours, "reference": ReferenceMAE.like(ours).to(device).train()}
        pe = ours.encoder.patch_embed
        x = torch.randn(args.batch_size, pe.in_chans, *pe.img_size, device=device)
        steps = {"train mask 0.75": lambda m: _train_fn(m, lambda mod: mod(x, 0.75)[0], device, "fp32", args.optimizer)}
    else:
        name = args.model or "vit_small_patch16_224"
        ours = vit.create_model(name, **args.model_args).to(device)
        models = {"ours": ours}
        if args.against == "timm":
            models["timm"] = _timm_twin(name, ours, args.model_args, device)
        pe = ours.patch_embed
        x = torch.randn(args.batch_size, pe.in_chans, *pe.img_size, device=device)
        y = torch.zeros(args.batch_size, dtype=torch.long, device=device)[: args.batch_size * (ours.num_classes > 0)]
        steps = {"infer": lambda m: _infer_fn(m.eval(), x, device, "fp32"),
                 "train": lambda m: _train_fn(m.train(), _classifier_loss(x, y), device, "fp32",
                                                    args.optimizer)}
    for step, make in steps.items():
        for impl, model in models.items():
            print(f"\nprofile: {impl}, {step}, batch {args.batch_size}")
            print(profile_summary(make(model), device))


if __name__ == "__main__":
    sys.exit(main())
