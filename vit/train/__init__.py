"""LightningModules (thin systems around the models), the optimiser recipe, and callbacks."""

from vit.train.callbacks import ReconstructionPlotter
from vit.train.classifier import ImageClassifier
from vit.train.prediction import PredictionWriter, attention_maps
from vit.train.pretrain import MAEPretrainer

__all__ = ["ImageClassifier", "MAEPretrainer", "PredictionWriter", "ReconstructionPlotter", "attention_maps"]
