"""NetworkRecord: the facts that rebuild a network, stored beside its weights in every checkpoint and export.

Training writes it (``checkpoint["vit_network"]``), exports write it into ``config.json``, and loaders build the
network from it instead of guessing from key names or training hyperparameters. It names the architecture and
its full constructor arguments, the registry name it came from, the image size and patch grid, the input
preprocessing (mean/std, crop, interpolation), the class names, and the head's kind when the head is not the
plain ``Linear`` the arguments build (a linear probe's non-affine BatchNorm + Linear records its eps), and, for
weights read from another library, how that library resamples the position grid for another image size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from torch import nn

from vit.models.mae import MaskedAutoencoder
from vit.models.vision_transformer import VisionTransformer

RECORD_KEY = "vit_network"  # where a Lightning checkpoint holds the record
RECORD_VERSION = 1
ARCHITECTURES: dict[str, type[nn.Module]] = {"VisionTransformer": VisionTransformer,
                                             "MaskedAutoencoder": MaskedAutoencoder}
HeadKind = Literal["linear", "none", "batchnorm_linear"]


@dataclass
class NetworkRecord:
    """What built a network; ``build()`` makes it again (untrained), ``to_dict()`` is its JSON form."""

    architecture: str
    model_args: dict[str, Any]
    name: str | None = None
    img_size: list[int] = field(default_factory=list)
    patch_size: list[int] = field(default_factory=list)
    num_classes: int = 0
    class_names: list[str] | None = None
    head: dict[str, Any] = field(default_factory=lambda: {"kind": "none"})
    mean: list[float] | None = None
    std: list[float] | None = None
    crop_pct: float | None = None
    interpolation: str | None = None
    encoder_args: dict[str, Any] | None = None  # an MAE's encoder, so its record also gives a backbone
    # how the source library resamples the position grid for another image size (Hugging Face ViT: no antialias)
    pos_resample: dict[str, Any] | None = None
    state_prefix: str = ""  # where the network's keys sit in the file's state dict ("model." in a .ckpt)
    record_version: int = RECORD_VERSION

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        name: str | None = None,
        preprocessing: Mapping[str, Any] | None = None,
        class_names: Sequence[str] | None = None,
    ) -> NetworkRecord:
        """The record of ``model`` as it is now (head included), with the data's ``preprocessing`` if known."""
        arch = type(model).__name__
        if arch not in ARCHITECTURES:
            raise TypeError(f"can record a VisionTransformer or a MaskedAutoencoder, not {arch}")
        encoder = model.encoder if isinstance(model, MaskedAutoencoder) else model
        pre = dict(preprocessing or {})
        num_classes = getattr(model, "num_classes", 0) if isinstance(model, VisionTransformer) else 0
        names = [str(c) for c in class_names] if class_names and len(class_names) == num_classes else None
        return cls(
            architecture=arch,
            model_args=_jsonable(model.model_args),
            name=name,
            img_size=list(encoder.patch_embed.img_size),
            patch_size=list(encoder.patch_embed.patch_size),
            num_classes=num_classes,
            class_names=names,
            head=_head_kind(model),
            mean=_floats(pre.get("mean")),
            std=_floats(pre.get("std")),
            crop_pct=pre.get("crop_pct"),
            interpolation=pre.get("interpolation"),
            encoder_args=_jsonable(encoder.model_args) if isinstance(model, MaskedAutoencoder) else None,
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "the record") -> NetworkRecord:
        """Read a record (a checkpoint's ``vit_network`` or an export's ``config.json``); errors name the field."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: the network record is a {type(data).__name__}, not a mapping")
        arch = data.get("architecture")
        if arch not in ARCHITECTURES:
            raise ValueError(f"{source}: 'architecture' is {arch!r}; expected one of {sorted(ARCHITECTURES)}")
        if not isinstance(data.get("model_args"), Mapping):
            raise ValueError(f"{source}: the network record has no 'model_args' mapping")
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in data.items() if k in known}
        values["model_args"] = dict(values["model_args"])
        record = cls(**values)
        if not record.img_size or not record.patch_size:
            record.img_size, record.patch_size = _sizes(record.model_args)
        return record

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (plain lists, numbers and strings)."""
        return _jsonable(asdict(self))

    @property
    def grid_size(self) -> tuple[int, int]:
        """The (h, w) patch grid the weights' position embeddings were made for."""
        (h, w), (ph, pw) = self.img_size, self.patch_size
        return h // ph, w // pw

    def encoder_record(self) -> NetworkRecord:
        """The record of the backbone: itself for a ViT, the encoder (no head) for an MAE."""
        if self.architecture == "VisionTransformer":
            return self
        if self.encoder_args is None:
            raise ValueError("the MAE record has no 'encoder_args'")
        return NetworkRecord("VisionTransformer", dict(self.encoder_args), None, list(self.img_size),
                             list(self.patch_size), mean=self.mean, std=self.std, crop_pct=self.crop_pct,
                             interpolation=self.interpolation, pos_resample=self.pos_resample)

    def build(self, **overrides: Any) -> nn.Module:
        """The recorded network with fresh weights; ``overrides`` replace constructor arguments."""
        return ARCHITECTURES[self.architecture](**{**self.model_args, **overrides})

    @property
    def preprocessing(self) -> dict[str, Any]:
        """What the inputs must look like: size, mean/std, crop and interpolation (None where unrecorded)."""
        return {"img_size": list(self.img_size), "mean": self.mean, "std": self.std, "crop_pct": self.crop_pct,
                "interpolation": self.interpolation}


def _head_kind(model: nn.Module) -> dict[str, Any]:
    head = getattr(model, "head", None)
    if isinstance(head, nn.Sequential) and len(head) == 2 and isinstance(head[0], nn.BatchNorm1d):
        return {"kind": "batchnorm_linear", "eps": float(head[0].eps)}
    return {"kind": "linear" if isinstance(head, nn.Linear) else "none"}


def _sizes(model_args: Mapping[str, Any]) -> tuple[list[int], list[int]]:
    def pair(v: Any) -> list[int]:
        return [int(v), int(v)] if isinstance(v, int) else [int(x) for x in v]

    return pair(model_args.get("img_size", 224)), pair(model_args.get("patch_size", 16))


def _floats(values: Any) -> list[float] | None:
    return None if values is None else [float(v) for v in values]


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return [_jsonable(v) for v in obj]
    return obj
