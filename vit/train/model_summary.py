"""Lightning's model summary with our FLOP count (``vit.flops``) in its FLOPs column and ``Total FLOPs`` line.

Lightning counts FLOPs by running ``example_input_array`` under ``FlopCounterMode``; without one it prints 0, and
with one it would miss CPU attention and raise on patterned attention (flex attention). The count here is the
closed form the module gives (``forward_flops_per_image``): one image, forward only; a training step is about 3x.
"""

from __future__ import annotations

from typing import Any

from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelSummary, RichModelSummary
from lightning.pytorch.utilities.model_summary import ModelSummary as Summary

from vit.train.lightning_private import summary_max_depth


class CountedSummary(Summary):
    """A ``ModelSummary`` table whose FLOPs are ``flops`` for the ``model`` layer (the network) and the total."""

    def __init__(self, model: LightningModule, max_depth: int, flops: int) -> None:
        self._flops = flops
        super().__init__(model, max_depth=max_depth)

    @property
    def total_flops(self) -> int:
        return self._flops

    @property
    def flop_counts(self) -> dict[str, dict[Any, int]]:
        return {name: {"forward": self._flops} if name == "model" else {} for name in self.layer_names}


class FlopsModelSummary(ModelSummary):
    """``ModelSummary`` with the module's own forward FLOPs per image."""

    def _summary(self, trainer: Trainer, pl_module: LightningModule) -> Summary:  # lightning_private lists it
        return _counted(self, pl_module)


class RichFlopsModelSummary(RichModelSummary):
    """``RichModelSummary`` (the one Lightning picks beside ``RichProgressBar``) with the module's own FLOPs."""

    def _summary(self, trainer: Trainer, pl_module: LightningModule) -> Summary:
        return _counted(self, pl_module)


def _counted(callback: ModelSummary, pl_module: LightningModule) -> Summary:
    return CountedSummary(pl_module, summary_max_depth(callback), pl_module.forward_flops_per_image())


def count_model_flops(trainer: Trainer) -> None:
    """Make the trainer's model summary callback (Lightning's default one) show our FLOPs.

    The callback keeps its settings and becomes the subclass in place: returned from ``configure_callbacks``
    instead, it would replace the trainer's with a notice on every run. A custom summary callback is left alone.
    """
    for cb in trainer.callbacks:
        if type(cb) in (ModelSummary, RichModelSummary):
            cb.__class__ = RichFlopsModelSummary if type(cb) is RichModelSummary else FlopsModelSummary
