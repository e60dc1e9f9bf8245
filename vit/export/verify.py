"""Verifying an export: seeded sample inputs re-run through the source and through what a consumer loads back.

Batch sizes 1 and 3 at every exported resolution; a check fails when the max abs difference exceeds ``atol``
(NaN always fails). The source's outputs are cached on the report, so several consumers of one export are
compared with one run of the source.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vit.models import MaskedAutoencoder, VisionTransformer

log = logging.getLogger(__name__)

CHECK_BATCHES = (1, 3)


class ExportCheckError(RuntimeError):
    """The exported model's outputs differ from the source model's by more than the tolerance."""

    def __init__(self, message: str, report: ExportReport) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class Check:
    """One re-run of sample inputs: what was compared and the max abs difference of the outputs."""

    name: str
    max_abs_diff: float
    atol: float

    @property
    def ok(self) -> bool:
        """Whether the difference is within tolerance (NaN is not)."""
        return self.max_abs_diff <= self.atol


@dataclass
class ExportReport:
    """What ``export_model`` wrote and how its checks went; ``seconds`` splits writing from checking."""

    format: str
    out: Path
    files: list[Path] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    atol: float = 1e-4
    write_seconds: float = 0.0
    check_seconds: float = 0.0
    source_outputs: dict = field(default_factory=dict, repr=False)


def check(
    report: ExportReport,
    name: str,
    model: nn.Module,
    exported: Callable,
    size: tuple[int, int],
    source: Callable | None = None,
) -> None:
    """Run sample batches through ``source`` (default: ``model``) and ``exported``; record the max abs difference.

    The source's outputs are kept on the report, so checks of one export against the same source run it once.
    """
    worst = 0.0
    source = source or model
    for batch in CHECK_BATCHES:
        x = sample_images(model, batch, size)
        key = (id(model), getattr(source, "__qualname__", ""), size, batch)
        if key not in report.source_outputs:
            report.source_outputs[key] = as_tuple(source(x))
        a, b = report.source_outputs[key], as_tuple(exported(x.clone()))
        if len(a) != len(b) or any(u.shape != v.shape for u, v in zip(a, b, strict=False)):
            raise ExportCheckError(f"{name}: output shapes differ: {[tuple(u.shape) for u in a]} vs "
                                   f"{[tuple(v.shape) for v in b]}", report)
        diffs = [(u.float() - v.float()).abs().max().item() for u, v in zip(a, b, strict=True)]
        worst = max([worst, *[d if d == d else float("inf") for d in diffs]])  # NaN counts as a failure
        log.debug("%s batch %d: max |diff| %.3g", name, batch, max(diffs))
    report.checks.append(Check(f"{name} batches {','.join(map(str, CHECK_BATCHES))}", worst, report.atol))


def features_and_head(model: nn.Module) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Images → (``forward_features``, ``forward_head`` of them): both outputs for one pass (ours and timm's)."""

    def features_and_head(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = model.forward_features(x)
        return tokens, model.forward_head(tokens)

    return features_and_head


def sample_images(model: nn.Module, batch: int, size: tuple[int, int]) -> torch.Tensor:
    """Seeded random images [batch, C, *size] for the model's input channels (the same for every run)."""
    encoder = model.encoder if isinstance(model, MaskedAutoencoder) else model
    in_chans = encoder.patch_embed.in_chans if isinstance(encoder, VisionTransformer) else 3
    g = torch.Generator().manual_seed(1000 * batch + size[0] + size[1])
    return torch.randn(batch, in_chans, *size, generator=g)


def as_tuple(out: Any) -> tuple[torch.Tensor, ...]:
    """A model output as a tuple of tensors."""
    return tuple(out) if isinstance(out, tuple | list) else (out,)
