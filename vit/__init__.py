"""vitkit: Vision Transformers with timm-compatible weights, MAE pretraining, fine-tuning and export.

The public names are imported on first use, so ``vit --help`` (which imports this package) needs no torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from vit.version import __version__

if TYPE_CHECKING:
    from vit.export.load import load_backbone, load_weights
    from vit.models import MaskedAutoencoder, VisionTransformer, create_model, list_models

__all__ = [
    "MaskedAutoencoder",
    "VisionTransformer",
    "__version__",
    "create_model",
    "list_models",
    "load_backbone",
    "load_weights",
]

_LAZY = {"load_backbone": "vit.export.load", "load_weights": "vit.export.load", "MaskedAutoencoder": "vit.models",
         "VisionTransformer": "vit.models", "create_model": "vit.models", "list_models": "vit.models"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'vit' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
