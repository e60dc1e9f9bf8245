"""LightningModules (thin systems around the models), the optimiser recipe, and callbacks."""

from vit.train.callbacks import ReconstructionPlotter
from vit.train.pretrain import MAEPretrainer

__all__ = ["MAEPretrainer", "ReconstructionPlotter"]
