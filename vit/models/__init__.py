"""Models: the VisionTransformer, its heads, the masked autoencoder, and the registry of named sizes."""

from vit.models.block import Block
from vit.models.heads import MAPHead
from vit.models.mae import MaskedAutoencoder
from vit.models.record import RECORD_KEY, NetworkRecord
from vit.models.registry import SIZES, create_model, list_models, model_config, register_model
from vit.models.vision_transformer import VisionTransformer

__all__ = [
    "RECORD_KEY",
    "SIZES",
    "Block",
    "MAPHead",
    "MaskedAutoencoder",
    "NetworkRecord",
    "VisionTransformer",
    "create_model",
    "list_models",
    "model_config",
    "register_model",
]
