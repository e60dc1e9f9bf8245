"""The callables that get timed: an inference step and a training step (forward, backward, AdamW)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def infer_fn(model: nn.Module, x: torch.Tensor, device: torch.device, dtype: str) -> Callable[[], Any]:
    """One inference-mode forward of ``x``, under bf16 autocast when ``dtype`` is ``"bf16"``."""

    def step() -> torch.Tensor:
        with torch.inference_mode(), _autocast(device, dtype):
            return model(x)

    return step


def train_fn(
    model: nn.Module, forward_loss: Callable[[nn.Module], torch.Tensor], device: torch.device, dtype: str,
    optimizer: str = "fused",
) -> Callable[[], Any]:
    """One training step: zero grads, ``forward_loss(model)`` (autocast for bf16), backward, AdamW step."""
    opt = _optimizer(model, optimizer)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with _autocast(device, dtype):
            loss = forward_loss(model)
        loss.backward()
        opt.step()

    return step


def classifier_loss(x: torch.Tensor, target: torch.Tensor) -> Callable[[nn.Module], torch.Tensor]:
    """Cross-entropy of ``model(x)`` against ``target``; the mean square output for headless models."""

    def loss(model: nn.Module) -> torch.Tensor:
        out = model(x).float()
        return F.cross_entropy(out, target) if out.shape[-1] > 1 and target.numel() else out.square().mean()

    return loss


def maybe_compile(model: nn.Module, compiled: bool) -> nn.Module:
    """``torch.compile(model)`` with a static graph when ``compiled``, else the model itself."""
    # one static graph per case: with a shared wrapper the second batch size would recompile a dynamic-shape
    # graph, slower than either static one
    return torch.compile(model, dynamic=False) if compiled else model  # type: ignore[return-value]


def _autocast(device: torch.device, dtype: str) -> AbstractContextManager[Any]:
    return torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()


def _optimizer(model: nn.Module, impl: str) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    # "fused" is one multi-tensor kernel, on CUDA and on CPU; on CPU torch's default is a per-tensor for-loop,
    # 7x slower for ViT-S's 22M parameters (56 vs 7.5 ms a step on the 2-core dev machine)
    kwargs = {"fused": {"fused": True}, "foreach": {"foreach": True}, "forloop": {"foreach": False}}[impl]
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05, **kwargs)
