"""Exporters: safetensors + config.json, timm, official MAE, ONNX and torch.export, each verified by re-running.

Every export re-runs seeded sample inputs through the source model and through what a consumer loads back
(our loader, timm, the MAE layout, onnxruntime, ``torch.export.load``) at batch sizes 1 and 3, at every
resolution the export claims, and fails with ``ExportCheckError`` when the max abs difference exceeds ``atol``.
"""

from __future__ import annotations

import inspect
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vit.export.interop import vit_to_mae_official, vit_to_timm
from vit.export.load import (
    CONFIG_NAME,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MAE_WEIGHTS_NAME,
    WEIGHTS_NAME,
    load_backbone,
    load_weights,
    resize_model,
)
from vit.layers import to_2tuple
from vit.models import MaskedAutoencoder, VisionTransformer, list_models, model_config

log = logging.getLogger(__name__)

FORMATS = ("safetensors", "timm", "mae", "onnx", "torch-export")
WEIGHT_FORMATS = ("safetensors", "timm", "mae")
TIMM_CONFIG_NAME = "timm_config.json"
# opset 18 is the dynamo exporter's own; asking for 17 adds a version conversion that cannot express an
# antialiased Resize (position-embedding resampling when it is not constant-folded)
DEFAULT_OPSET = 18
CHECK_BATCHES = (1, 3)
TRACE_BATCH = 2  # the example batch for tracing: neither checked size, so batch is not specialised
INPUT_NAME = "images"
# Arguments that make a named size (timm's name is only "exact" when these match the registered ones).
_STRUCTURAL = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")


class ExportCheckError(RuntimeError):
    """The exported model's outputs differ from the source model's by more than the tolerance."""

    def __init__(self, message: str, report: ExportReport) -> None:
        super().__init__(message)
        self.report = report


class MissingExtraError(ImportError):
    """An optional dependency a format needs is not installed."""


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


def export_model(
    model: nn.Module,
    fmt: str,
    out: str | Path,
    *,
    meta: dict[str, Any] | None = None,
    image_sizes: Sequence[int | tuple[int, int]] | None = None,
    head: bool | None = None,
    opset: int = DEFAULT_OPSET,
    atol: float = 1e-4,
) -> ExportReport:
    """Write ``model`` to ``out`` in format ``fmt`` and check what a consumer loads back against it.

    Args:
        model: a ``VisionTransformer``, or a ``MaskedAutoencoder`` (its encoder for every format but "mae").
        fmt: one of ``FORMATS``.
        out: the directory to write (created; files of the same name are replaced).
        meta: ``source``, ``class_names``, ``mean``, ``std`` for config.json (see ``model_from_checkpoint``).
        image_sizes: resolutions to export for (default: the model's). The weight formats store one; ONNX
            and torch.export write one graph per size (``model.onnx`` / ``model.pt2`` for the first).
        head: True keeps the classifier (an error without one), False drops it, None keeps what there is.
        opset: ONNX opset (>= 17).
        atol: the max abs difference a check may show.
    Raises ``ExportCheckError`` (carrying the report) when a check exceeds ``atol``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out = Path(out)
    meta = {"source": None, "class_names": None, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
            **(meta or {})}
    model = _select_network(model, fmt, head)
    sizes = _image_sizes(model, fmt, image_sizes)
    if isinstance(model, VisionTransformer):
        # every size resampled from the source's own grid (the training resolution)
        own = model.patch_embed.img_size
        models = {size: model if size == own else resize_model(model, size).eval() for size in sizes}
        model = models[sizes[0]]
    else:
        models = {sizes[0]: model}
    if meta.get("class_names") and len(meta["class_names"]) != getattr(model, "num_classes", 0):
        meta["class_names"] = None  # the head was dropped
    out.mkdir(parents=True, exist_ok=True)
    report = ExportReport(format=fmt, out=out, atol=atol)
    if fmt in ("onnx", "torch-export") and getattr(model, "dynamic_img_size", False):
        report.notes.append("one graph per --image-size: the model's forward resamples positions only when the "
                            "patch grid differs, a branch torch.export fixes at trace time")
    with torch.no_grad():
        _WRITERS[fmt](models, out, meta, report, opset)
    failed = [c for c in report.checks if not c.ok]
    if failed:
        raise ExportCheckError(
            f"{fmt} export in {out} does not reproduce the source model: "
            + "; ".join(f"{c.name}: max |diff| {c.max_abs_diff:.3g} > {c.atol:g}" for c in failed),
            report,
        )
    return report


def export_config(model: nn.Module, meta: dict[str, Any], fmt: str, **extra: Any) -> dict[str, Any]:
    """The config.json written beside every export: enough to rebuild the model without any YAML."""
    import vit

    encoder = model.encoder if isinstance(model, MaskedAutoencoder) else model
    config = {
        "format_version": 1,
        "format": fmt,
        "architecture": type(model).__name__,
        "model_args": _jsonable(model.model_args),
        "img_size": list(encoder.patch_embed.img_size),
        "patch_size": list(encoder.patch_embed.patch_size),
        "mean": meta.get("mean"),
        "std": meta.get("std"),
        "class_names": meta.get("class_names"),
        "num_classes": getattr(model, "num_classes", 0),
        "vitkit_version": vit.__version__,
        "source": None if meta.get("source") is None else str(meta["source"]),
    }
    if isinstance(model, MaskedAutoencoder):
        config["encoder_args"] = _jsonable(encoder.model_args)
    return {**config, **extra}


def timm_config(model: VisionTransformer, mean: Sequence[float] = IMAGENET_MEAN,
                std: Sequence[float] = IMAGENET_STD) -> dict[str, Any]:
    """How timm builds ``model``: ``timm.create_model(architecture, **model_args)``, plus a pretrained_cfg overlay.

    ``architecture`` is the timm name needing the fewest overrides; ``exact`` says whether it is the same
    named size (patch, width, depth, heads and mlp ratio as registered), the rest being ordinary overrides.
    """
    import timm

    ours = _to_timm_args(model.model_args)
    best: tuple[tuple[int, int, str], str, dict[str, Any]] | None = None
    for name in list_models("vit_*"):
        if not timm.is_model(name):
            continue
        cls, registered = model_config(name)
        if cls is not VisionTransformer:
            continue
        reference = _to_timm_args({**_defaults(VisionTransformer), **registered})
        diff = {k: v for k, v in ours.items() if not _same_value(k, v, reference.get(k))}
        score = (sum(k in _STRUCTURAL for k in diff), len(diff), name)
        if best is None or score < best[0]:
            best = (score, name, diff)
    if best is None:
        raise RuntimeError("no registered ViT name is also a timm model")
    (n_structural, _, _), name, diff = best
    h, w = model.patch_embed.img_size
    return {
        "architecture": name,
        "model_args": _jsonable(diff),
        "exact": n_structural == 0,
        # timm's own pretrained_cfg for the name may point at other weights (npz loader, another head size)
        "pretrained_cfg": {"custom_load": False, "num_classes": model.num_classes, "input_size": [3, h, w],
                           "mean": list(mean), "std": list(std)},
    }


# ---------------------------------------------------------------------------------------------- writers


def _write_safetensors(models: dict, out: Path, meta: dict, report: ExportReport, opset: int) -> None:
    (size, model), = models.items()
    t0 = time.perf_counter()
    report.files += [_save_safetensors(model.state_dict(), out / WEIGHTS_NAME),
                     _write_json(out / CONFIG_NAME, export_config(model, meta, "safetensors"))]
    report.write_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    loaded = load_backbone(out)
    _check(report, f"vit.load_backbone (features, logits) {_fmt(size)}", model, _features_and_head(loaded), size,
           source=_features_and_head(model))
    report.check_seconds = time.perf_counter() - t0


def _write_timm(models: dict, out: Path, meta: dict, report: ExportReport, opset: int) -> None:
    import timm
    from safetensors.torch import load_file

    (size, model), = models.items()
    t0 = time.perf_counter()
    cfg = timm_config(model, meta["mean"], meta["std"])
    weights = _save_safetensors(vit_to_timm(model.state_dict()), out / WEIGHTS_NAME)
    report.files += [weights, _write_json(out / TIMM_CONFIG_NAME, cfg),
                     _write_json(out / CONFIG_NAME, export_config(model, meta, "timm", timm=cfg))]
    report.write_seconds = time.perf_counter() - t0
    if not cfg["exact"]:
        report.notes.append(f"no timm model name has this architecture; timm_config.json builds it as "
                            f"{cfg['architecture']} with overrides of {sorted(cfg['model_args'])}")
    t0 = time.perf_counter()
    ref = timm.create_model(cfg["architecture"], pretrained=False, **cfg["model_args"]).eval()
    ref.load_state_dict(load_file(str(weights)), strict=True)
    _check(report, f"timm load_state_dict(strict) (features, logits) {_fmt(size)}", model, _features_and_head(ref),
           size, source=_features_and_head(model))
    overlay = dict(cfg["pretrained_cfg"], file=str(weights))
    pre = timm.create_model(cfg["architecture"], pretrained=True, pretrained_cfg_overlay=overlay,
                            **cfg["model_args"]).eval()
    _check(report, f"timm pretrained_cfg_overlay (features, logits) {_fmt(size)}", model, _features_and_head(pre),
           size, source=_features_and_head(model))
    report.check_seconds = time.perf_counter() - t0


def _write_mae(models: dict, out: Path, meta: dict, report: ExportReport, opset: int) -> None:
    (size, model), = models.items()
    t0 = time.perf_counter()
    path = out / MAE_WEIGHTS_NAME
    state = {k: v.detach().clone() for k, v in vit_to_mae_official(model.state_dict()).items()}
    torch.save({"model": state}, path)
    report.files += [path, _write_json(out / CONFIG_NAME, export_config(model, meta, "mae"))]
    report.write_seconds = time.perf_counter() - t0
    if not isinstance(model, MaskedAutoencoder):
        report.notes.append("the source is a ViT: wrote the encoder-only layout (as mae_pretrain_vit_*.pth)")
    t0 = time.perf_counter()
    fresh = type(model)(**model.model_args).eval()
    load_weights(fresh, path)  # read back through torch.load(weights_only=True)
    if isinstance(model, MaskedAutoencoder):
        num_patches = model.encoder.patch_embed.num_patches

        def run(m: MaskedAutoencoder) -> Callable[[torch.Tensor], tuple[torch.Tensor, ...]]:
            def fn(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
                noise = torch.rand(x.shape[0], num_patches, generator=torch.Generator().manual_seed(0))
                return m(x, noise=noise)
            return fn

        _check(report, f"MAE (loss, pred, mask) {_fmt(size)}", model, run(fresh), size, source=run(model))
    else:
        _check(report, f"encoder-only layout {_fmt(size)}", model, fresh, size)
    report.check_seconds = time.perf_counter() - t0


def _write_onnx(models: dict, out: Path, meta: dict, report: ExportReport, opset: int) -> None:
    onnx, ort = _require_onnx()
    if opset < 17:
        raise ValueError(f"--opset must be >= 17 (LayerNormalization is an opset-17 op), got {opset}")
    files, opsets = {}, {}
    output_name = _output_name(next(iter(models.values())))
    for i, (size, model) in enumerate(models.items()):
        path = out / ("model.onnx" if i == 0 else f"model_{_fmt(size)}.onnx")
        t0 = time.perf_counter()
        big = sum(p.numel() * p.element_size() for p in model.state_dict().values()) > 1.5 * 2**30
        torch.onnx.export(
            model, (_sample(model, TRACE_BATCH, size),), str(path), dynamo=True, opset_version=opset,
            input_names=[INPUT_NAME], output_names=[output_name], verbose=False, external_data=big,
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
        )
        report.write_seconds += time.perf_counter() - t0
        opsets[_fmt(size)] = max(o.version for o in onnx.load(str(path), load_external_data=False).opset_import
                                 if o.domain in ("", "ai.onnx"))
        if opsets[_fmt(size)] != opset:
            report.notes.append(f"{path.name}: asked for opset {opset}, the exporter wrote {opsets[_fmt(size)]}")
        files[_fmt(size)] = path.name
        report.files += sorted(out.glob(path.name + "*"))  # external data, when the model is over 2 GB
        t0 = time.perf_counter()
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

        def run_ort(x: torch.Tensor, session: Any = session) -> torch.Tensor:
            return torch.from_numpy(session.run(None, {INPUT_NAME: x.numpy()})[0])

        _check(report, f"onnxruntime {_fmt(size)}", model, run_ort, size)
        report.check_seconds += time.perf_counter() - t0
    extra = {"files": files, "input_name": INPUT_NAME, "output_name": output_name, "dynamic_axes": ["batch"],
             "opset": opsets}
    report.files.append(_write_json(out / CONFIG_NAME, export_config(models[next(iter(models))], meta, "onnx",
                                                                     **extra)))


def _write_torch_export(models: dict, out: Path, meta: dict, report: ExportReport, opset: int) -> None:
    files = {}
    for i, (size, model) in enumerate(models.items()):
        path = out / ("model.pt2" if i == 0 else f"model_{_fmt(size)}.pt2")
        t0 = time.perf_counter()
        program = torch.export.export(model, (_sample(model, TRACE_BATCH, size),),
                                      dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), strict=False)
        torch.export.save(program, path)
        report.write_seconds += time.perf_counter() - t0
        files[_fmt(size)] = path.name
        report.files.append(path)
        t0 = time.perf_counter()
        _check(report, f"torch.export.load {_fmt(size)}", model, torch.export.load(path).module(), size)
        report.check_seconds += time.perf_counter() - t0
    first = models[next(iter(models))]
    extra = {"files": files, "output_name": _output_name(first), "dynamic_axes": ["batch"]}
    report.files.append(_write_json(out / CONFIG_NAME, export_config(first, meta, "torch-export", **extra)))


_WRITERS = {"safetensors": _write_safetensors, "timm": _write_timm, "mae": _write_mae, "onnx": _write_onnx,
            "torch-export": _write_torch_export}


# ---------------------------------------------------------------------------------------------- helpers


def _select_network(model: nn.Module, fmt: str, head: bool | None) -> nn.Module:
    if isinstance(model, MaskedAutoencoder):
        if head:
            raise ValueError("--with-head: an MAE has no classifier head (its encoder is exported as a backbone)")
        if fmt == "mae":
            return model.eval()
        model = model.encoder  # the decoder only serves pretraining
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"can export a VisionTransformer or a MaskedAutoencoder, not {type(model).__name__}")
    if head and model.num_classes == 0:
        raise ValueError("--with-head: the source model has no classifier head (num_classes=0)")
    if head is False and model.num_classes > 0:
        backbone = VisionTransformer(**{**model.model_args, "num_classes": 0})
        load_weights(backbone, {k: v for k, v in model.state_dict().items() if not k.startswith("head.")})
        model = backbone
    return model.eval()


def _image_sizes(model: nn.Module, fmt: str, image_sizes: Sequence | None) -> list[tuple[int, int]]:
    encoder = model.encoder if isinstance(model, MaskedAutoencoder) else model
    own = encoder.patch_embed.img_size
    sizes = list(dict.fromkeys(to_2tuple(s) for s in image_sizes)) if image_sizes else [own]
    for size in sizes:
        encoder.patch_embed.grid_size_for(size)  # ValueError when the patch does not divide it
    if fmt in WEIGHT_FORMATS and len(sizes) > 1:
        raise ValueError(f"the {fmt} format stores weights for one image size (consumers resample on load); "
                         f"got {len(sizes)}: {', '.join(map(_fmt, sizes))}")
    if isinstance(model, MaskedAutoencoder) and sizes != [own]:
        raise ValueError(f"the mae format keeps the training resolution {_fmt(own)}")
    return sizes


def _check(
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
        x = _sample(model, batch, size)
        key = (id(model), getattr(source, "__qualname__", ""), size, batch)
        if key not in report.source_outputs:
            report.source_outputs[key] = _as_tuple(source(x))
        a, b = report.source_outputs[key], _as_tuple(exported(x.clone()))
        if len(a) != len(b) or any(u.shape != v.shape for u, v in zip(a, b, strict=False)):
            raise ExportCheckError(f"{name}: output shapes differ: {[tuple(u.shape) for u in a]} vs "
                                   f"{[tuple(v.shape) for v in b]}", report)
        diffs = [(u.float() - v.float()).abs().max().item() for u, v in zip(a, b, strict=True)]
        worst = max([worst, *[d if d == d else float("inf") for d in diffs]])  # NaN counts as a failure
        log.debug("%s batch %d: max |diff| %.3g", name, batch, max(diffs))
    report.checks.append(Check(f"{name} batches {','.join(map(str, CHECK_BATCHES))}", worst, report.atol))


def _features_and_head(model: nn.Module) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Images → (``forward_features``, ``forward_head`` of them): both outputs for one pass (ours and timm's)."""

    def features_and_head(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = model.forward_features(x)
        return tokens, model.forward_head(tokens)

    return features_and_head


def _sample(model: nn.Module, batch: int, size: tuple[int, int]) -> torch.Tensor:
    encoder = model.encoder if isinstance(model, MaskedAutoencoder) else model
    in_chans = encoder.patch_embed.in_chans if isinstance(encoder, VisionTransformer) else 3
    g = torch.Generator().manual_seed(1000 * batch + size[0] + size[1])
    return torch.randn(batch, in_chans, *size, generator=g)


def _as_tuple(out: Any) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, tuple | list) else (out,)


def _output_name(model: VisionTransformer) -> str:
    return "logits" if model.num_classes else "features"


def _require_onnx() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError as e:
        raise MissingExtraError(f"the onnx format needs the onnx extra (missing module {e.name!r}): "
                                f"pip install vitkit[onnx]") from e
    return onnx, onnxruntime


def _save_safetensors(state: dict[str, torch.Tensor], path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})
    return path


def _write_json(path: Path, obj: dict) -> Path:
    path.write_text(json.dumps(obj, indent=2) + "\n")
    return path


def _to_timm_args(args: dict[str, Any]) -> dict[str, Any]:
    """Our constructor arguments as timm's ``VisionTransformer`` takes them (names already agree)."""
    out = {k: v for k, v in args.items() if k != "zero_head_init"}
    if out.get("pos_embed") == "sincos":
        out["pos_embed"] = "learn"  # the fixed table is stored in the weights; timm only needs the slot
    return out


def _same_value(key: str, a: Any, b: Any) -> bool:
    if key in ("img_size", "patch_size"):
        return to_2tuple(a) == to_2tuple(b)
    return a == b


def _defaults(cls: type) -> dict[str, Any]:
    return {k: p.default for k, p in inspect.signature(cls).parameters.items() if p.default is not p.empty}


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return [_jsonable(v) for v in obj]
    return obj


def _fmt(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"
