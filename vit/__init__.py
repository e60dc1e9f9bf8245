"""vitkit: Vision Transformers with timm-compatible weights, MAE pretraining, fine-tuning and export."""

from vit.export.load import load_backbone, load_weights
from vit.models import MaskedAutoencoder, VisionTransformer, create_model, list_models
from vit.version import __version__

__all__ = [
    "MaskedAutoencoder",
    "VisionTransformer",
    "__version__",
    "create_model",
    "list_models",
    "load_backbone",
    "load_weights",
]
