"""LightningModules (thin systems around the models), the optimiser recipe, and callbacks."""

from vit.train.classifier import ImageClassifier
from vit.train.confusion import ConfusionReport
from vit.train.prediction import PredictionWriter, attention_maps
from vit.train.pretrain import MAEPretrainer
from vit.train.reconstruction import ReconstructionPlotter

__all__ = ["ConfusionReport", "ImageClassifier", "MAEPretrainer", "PredictionWriter", "ReconstructionPlotter",
           "attention_maps"]
