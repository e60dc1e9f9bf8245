"""ImageClassifier: fine-tune, linear-probe or attentive-probe a VisionTransformer on labelled images.

Conventions, stated once:
- The network is ``self.model`` (a ``VisionTransformer``), so checkpoints hold it under ``model.`` and
  ``vit.load_weights`` / ``vit export`` read them like any backbone.
- ``num_classes`` and ``class_names`` default to the datamodule's. The network is then built in
  ``configure_model`` (Lightning calls it before a checkpoint is restored, and ``EMAWeightAveraging`` calls it
  before copying the weights); both values are written back into ``hparams`` so the checkpoint describes itself.
- ``init_from`` is read in ``configure_model`` too, before EMA copies the weights (rules in ``init_from.py``).
  Restoring a checkpoint (``--ckpt_path`` or ``load_from_checkpoint``) replaces every weight afterwards.
- Checkpoints record the network (``NetworkRecord``: model arguments, head kind, preprocessing, class names),
  so exports and ``vit.load_backbone`` rebuild it without reading these hyperparameters.
- Linear probe (MAE's recipe): the frozen backbone's pooled feature → ``BatchNorm1d(affine=False)`` → ``Linear``,
  held as ``model.head = Sequential(bn, linear)`` (keys ``head.0.*``, ``head.1.*``; the record names the head's
  kind and eps, and exports fold the two into one ``head``, exact in eval mode).
  MAE optimises it with LARS, which torch lacks; we use SGD with momentum (the linear-evaluation optimiser of
  MoCo v3 and DINO). Over BatchNorm-ed features one linear layer is well conditioned, and LARS's per-layer trust
  ratio only rescales the single layer's step, which the learning rate absorbs.
- Pooling: ``global_pool`` defaults to ``avg`` for fine-tuning and linear probing (MAE's fine-tune default).
  An MAE never asks its class token to summarise the image: the token reaches the loss only through the
  decoder's attention. MAE's linear probe reads it anyway; on the digits the class-token and average probes land
  within two images of each other, and ``avg`` also serves encoders without a class token (``token`` follows
  the paper).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning import Callback
from lightning.pytorch.utilities import rank_zero_info
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from vit.models import VisionTransformer, create_model
from vit.train.confusion import ConfusionReport
from vit.train.init_from import load_pretrained
from vit.train.module import VitModule
from vit.train.optim import OptimizerName

log = logging.getLogger(__name__)

Mode = Literal["finetune", "linear_probe", "attentive_probe"]
# the modules a probe trains; everything else is the frozen backbone
PROBE_PARTS = {"linear_probe": ("head",), "attentive_probe": ("head", "attn_pool")}
PROBE_BN_EPS = 1e-6  # MAE's linear probe BatchNorm; the network record carries it to every loader


class ImageClassifier(VitModule):
    """A ``VisionTransformer`` classifier with the MAE fine-tuning recipe, or a probe on a frozen backbone.

    Args:
        model: a registered ViT name, e.g. ``vit_base_patch16_224``.
        model_kwargs: constructor overrides of that model (e.g. ``{"patch_size": 4, "embed_dim": 128}``).
        img_size: input size (linked from ``data.img_size`` by the CLI).
        num_classes: classifier outputs; None takes the datamodule's ``num_classes``.
        class_names: label names (stored in checkpoints for predict); None takes the datamodule's.
        init_from: pretrained weights: a Lightning checkpoint of ours (MAE or classifier), an export directory,
            a timm state dict or an official MAE checkpoint. A decoder is dropped, positions are resampled for
            another image size, the head is re-initialised when its class count differs.
        mode: ``finetune`` trains everything; ``linear_probe`` / ``attentive_probe`` train only a linear head
            (after a non-affine BatchNorm) / a MAP head on the frozen backbone.
        global_pool: ``token``, ``avg`` or ``map``; None: ``map`` for the attentive probe, else ``avg``.
        optimizer: ``adamw`` or ``sgd`` (momentum ``momentum``); None: ``sgd`` for the linear probe, else ``adamw``.
        base_lr: lr per 256 images; the lr is ``base_lr × effective batch / 256`` unless ``lr`` is given.
        lr: absolute lr (overrides the scaling rule).
        weight_decay: decay on weights (none on norms, biases, tokens, positions).
        layer_decay: layer-wise lr decay (block i gets ``layer_decay ** (depth + 1 - i)``); None or 1 disables it.
        betas: AdamW betas. momentum: SGD momentum.
        warmup_epochs / min_lr_ratio: per-step linear warmup, then cosine down to ``min_lr_ratio × lr``.
        drop_path_rate: stochastic depth when fine-tuning (probes run the backbone in eval mode).
        mixup / cutmix: mixup and cutmix alphas (0 disables each); batches are mixed in ``training_step``.
        mixup_prob / mixup_switch_prob / mixup_mode: timm ``Mixup``'s ``prob``, ``switch_prob`` and ``mode``.
        label_smoothing: smoothing of the (mixed or plain) targets.
    """

    def __init__(
        self,
        model: str = "vit_base_patch16_224",
        model_kwargs: dict[str, Any] | None = None,
        img_size: int | tuple[int, int] | None = None,
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        init_from: str | None = None,
        mode: Mode = "finetune",
        global_pool: Literal["token", "avg", "map"] | None = None,
        optimizer: Literal["adamw", "sgd"] | None = None,
        base_lr: float = 5e-4,
        lr: float | None = None,
        weight_decay: float = 0.05,
        layer_decay: float | None = 0.65,
        betas: tuple[float, float] = (0.9, 0.999),
        momentum: float = 0.9,
        warmup_epochs: float = 5.0,
        min_lr_ratio: float = 0.0,
        drop_path_rate: float = 0.1,
        mixup: float = 0.8,
        cutmix: float = 1.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        mixup_mode: Literal["batch", "pair", "elem"] = "batch",
        label_smoothing: float = 0.1,
    ) -> None:
        super().__init__()
        _check_values(locals())
        if isinstance(img_size, list):
            img_size = tuple(img_size)
        self.save_hyperparameters()
        self.mode = mode
        self.global_pool = global_pool or (model_kwargs or {}).get("global_pool") or (
            "map" if mode == "attentive_probe" else "avg"
        )
        if mode == "attentive_probe" and self.global_pool != "map":
            raise ValueError(f"model.mode='attentive_probe' needs global_pool='map', got {self.global_pool!r}")
        if mode == "linear_probe" and self.global_pool == "map":
            raise ValueError("model.mode='linear_probe' pools with 'token' or 'avg'; for 'map' use 'attentive_probe'")
        self.optimizer_name: OptimizerName = optimizer or ("sgd" if mode == "linear_probe" else "adamw")
        self.init_from = init_from
        self.model: VisionTransformer | None = None
        self.class_names: list[str] = []
        self.last_per_class: list[tuple[str, float, int]] = []
        self.soft_target_loss = SoftTargetCrossEntropy()
        self.mixup_fn: Mixup | None = None
        self._weights_ready = False
        self._names_given = bool(class_names)
        if num_classes is not None:
            self.build_network(num_classes, class_names)

    @property
    def num_classes(self) -> int:
        """Classifier outputs (0 until the network is built)."""
        return len(self.class_names)

    # ----------------------------------------------------------------------------------------------- building
    def configure_model(self) -> None:
        """Build the network for the datamodule's classes when needed, then load ``init_from`` (once)."""
        dm = self.attached_datamodule()
        if self.model is None:
            n = getattr(dm, "num_classes", None)
            if n is None:
                raise ValueError("model.num_classes is unset and no datamodule with num_classes is attached")
            self.build_network(n, self.hparams.class_names or getattr(dm, "class_names", None))
        elif not self._weights_ready and not self._names_given:
            names = getattr(dm, "class_names", None)
            if names and len(names) == self.num_classes:  # num_classes was given, the names were not
                self._set_classes(list(names))
        if not self._weights_ready:
            self._weights_ready = True
            if self.init_from:
                self._load_init(self.init_from)

    def build_network(self, num_classes: int, class_names: list[str] | None = None) -> None:
        """Build ``self.model`` for ``num_classes`` (named ``class_names``); ``configure_model`` calls it."""
        hp = self.hparams
        if num_classes <= 0:
            raise ValueError(f"model.num_classes must be positive, got {num_classes}")
        names = [str(c) for c in class_names] if class_names else [str(i) for i in range(num_classes)]
        if len(names) != num_classes:
            raise ValueError(f"model.class_names has {len(names)} names for {num_classes} classes")
        kwargs = dict(hp.model_kwargs or {}, num_classes=num_classes, global_pool=self.global_pool)
        if hp.img_size is not None:
            kwargs["img_size"] = hp.img_size
        # probes run the frozen backbone in eval mode, where drop path is off anyway
        kwargs["drop_path_rate"] = hp.drop_path_rate if self.mode == "finetune" else 0.0
        net = create_model(hp.model, **kwargs)
        if not isinstance(net, VisionTransformer):
            raise ValueError(f"model.model {hp.model!r} is not a VisionTransformer; see vit.list_models('vit_*')")
        self.model = net
        self._set_classes(names)

    def _set_classes(self, names: list[str]) -> None:
        """(Re)make the head, metrics and mixing for ``names``, and record them in ``hparams`` for checkpoints."""
        if self.class_names and len(names) != self.num_classes:
            self.model.reset_classifier(len(names))
        self.class_names = list(names)
        self.hparams["num_classes"] = len(names)
        self.hparams["class_names"] = list(names)
        n, dim = len(names), self.model.embed_dim
        if self.mode == "linear_probe" and not isinstance(self.model.head, nn.Sequential):
            # MAE's linear probe: a BatchNorm without affine parameters whitens the frozen features
            self.model.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=PROBE_BN_EPS), nn.Linear(dim, n))
        self.val_metrics = _metrics(n)
        self.test_metrics = _metrics(n)
        hp = self.hparams
        self.mixup_fn = None
        if (hp.mixup > 0 or hp.cutmix > 0) and hp.mixup_prob > 0:
            self.mixup_fn = Mixup(mixup_alpha=hp.mixup, cutmix_alpha=hp.cutmix, prob=hp.mixup_prob,
                                switch_prob=hp.mixup_switch_prob, mode=hp.mixup_mode,
                                label_smoothing=hp.label_smoothing, num_classes=n)
        self._freeze_backbone()

    def _load_init(self, source: str) -> None:
        # MAE: a tiny head init for fine-tuning (std 2e-5), 0.01 for the linear probe
        rank_zero_info(load_pretrained(self.model, source, head_std=0.01 if self.mode == "linear_probe" else 2e-5))

    def _freeze_backbone(self) -> None:
        if self.mode == "finetune":
            return
        trainable = PROBE_PARTS[self.mode]
        for name, p in self.model.named_parameters():
            p.requires_grad = name.split(".")[0] in trainable

    def train(self, mode: bool = True) -> ImageClassifier:
        """Lightning's train/eval switch; a probe's frozen backbone stays in eval mode (no drop path, fixed norms)."""
        super().train(mode)
        if mode and self.mode != "finetune" and self.model is not None:
            for name, child in self.model.named_children():
                if name not in PROBE_PARTS[self.mode]:
                    child.eval()
        return self

    # ----------------------------------------------------------------------------------------------- steps
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] → logits [B, num_classes]."""
        if self.mode == "finetune":
            return self.model(x)
        with torch.no_grad():  # the frozen backbone: no graph, no gradients
            tokens = self.model.forward_features(x)
        return self.model.forward_head(tokens)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.mixup_fn is not None:
            if x.shape[0] % 2:
                raise ValueError(f"mixup/cutmix pair up a batch and need an even batch size, got {x.shape[0]}")
            x, soft = self.mixup_fn(x, y)
            loss = self.soft_target_loss(self(x), soft)
        else:
            loss = F.cross_entropy(self(x), y, label_smoothing=self.hparams.label_smoothing)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=x.shape[0])
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_metrics)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_metrics)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        """Class probabilities [B, num_classes] and the data set indices [B] of the images."""
        x, index = batch
        return {"probs": self(x).float().softmax(dim=-1), "index": index}

    def _eval_step(self, batch: Any, stage: str, metrics: nn.ModuleDict) -> None:
        x, y = batch
        logits = self(x)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), on_epoch=True, sync_dist=True, batch_size=x.shape[0])
        for name, metric in metrics.items():
            metric.update(logits, y)
            if name in ("acc1", "acc5"):  # per_class and confusion go to ConfusionReport
                self.log(f"{stage}/{name}", metric, on_epoch=True, prog_bar=name == "acc1", batch_size=x.shape[0])

    def configure_callbacks(self) -> list[Callback]:
        """``VitModule``'s, and the confusion-matrix PNG and per-class accuracy after each validation and test epoch."""
        return [*super().configure_callbacks(), ConfusionReport()]

    # ----------------------------------------------------------------------------------------------- optimiser
    def optimizer_choice(self) -> tuple[OptimizerName, float | None]:
        return self.optimizer_name, self.hparams.layer_decay if self.mode == "finetune" else None

    def on_fit_start(self) -> None:
        self._check_data()
        super().on_fit_start()

    def describe_run(self) -> str:
        hp = self.hparams
        mixing = f"mixup {hp.mixup} / cutmix {hp.cutmix}" if self.mixup_fn is not None else "no mixup"
        decay = f", layer decay {hp.layer_decay}" if self.mode == "finetune" and hp.layer_decay else ""
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return (f"{self.mode} {hp.model} ({self.global_pool} pool, {self.num_classes} classes): {trainable:,} "
                f"trainable parameters; {self.optimizer_name}{decay}; {super().describe_run()}; {mixing}, "
                f"label smoothing {hp.label_smoothing}")

    def on_validation_start(self) -> None:
        if self.trainer.state.fn != "fit":
            self._check_data()

    def on_test_start(self) -> None:
        self._check_data()

    def _check_data(self) -> None:
        n = getattr(self.trainer.datamodule, "num_classes", None)
        if n is not None and n != self.num_classes:
            raise ValueError(f"the data has {n} classes but the classifier {self.num_classes} "
                             f"({self.class_names[:5]}...): evaluate on the classes it was trained on")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Take the classes of the checkpoint (predict shows its names); its weights replace ``init_from``'s."""
        self._weights_ready = True
        names = checkpoint.get("hyper_parameters", {}).get("class_names")
        if names and self.model is not None and list(names) != self.class_names:
            self._set_classes(list(names))


def _metrics(num_classes: int) -> nn.ModuleDict:
    metrics = {"acc1": MulticlassAccuracy(num_classes, top_k=1, average="micro")}
    if num_classes >= 5:
        metrics["acc5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    metrics["per_class"] = MulticlassAccuracy(num_classes, average=None)
    metrics["confusion"] = MulticlassConfusionMatrix(num_classes)
    return nn.ModuleDict(metrics)


def _check_values(args: dict[str, Any]) -> None:
    """The ranges the type hints cannot say (jsonargparse checks the types and choices)."""
    for name in ("mixup", "cutmix", "label_smoothing", "warmup_epochs", "weight_decay", "drop_path_rate"):
        if args[name] < 0:
            raise ValueError(f"model.{name} must be >= 0, got {args[name]}")
    if not 0.0 <= args["mixup_prob"] <= 1.0:
        raise ValueError(f"model.mixup_prob must be in [0, 1], got {args['mixup_prob']}")
    if not 0.0 <= args["label_smoothing"] < 1.0:
        raise ValueError(f"model.label_smoothing must be in [0, 1), got {args['label_smoothing']}")
    if args["layer_decay"] is not None and not 0.0 < args["layer_decay"] <= 1.0:
        raise ValueError(f"model.layer_decay must be in (0, 1] or null, got {args['layer_decay']}")
    for name in ("base_lr", "lr"):
        if args[name] is not None and args[name] <= 0:
            raise ValueError(f"model.{name} must be positive, got {args[name]}")
