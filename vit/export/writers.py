"""Writing exports: safetensors + config.json, timm's hub folder, official MAE, ONNX and torch.export, each verified.

``export_model`` selects the network (an MAE's encoder, with or without the head), builds one per exported
resolution, hands them to the format's writer, and fails with ``ExportCheckError`` when what a consumer loads
back (our loader, ``timm.create_model("local-dir:...")``, the MAE layout, onnxruntime, ``torch.export.load``)
differs from the source.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vit.errors import BadInputError
from vit.export.aoti import write_aoti
from vit.export.config import export_config, normalisation
from vit.export.folder import CONFIG_NAME, MAE_WEIGHTS_NAME, WEIGHTS_NAME
from vit.export.formats import DEFAULT_OPSET, FORMATS, WEIGHT_FORMATS
from vit.export.interop import vit_to_mae_official, vit_to_timm
from vit.export.load import load_backbone, load_weights, resize_model
from vit.export.timm_hub import RECORD_FIELD, hub_config, hub_notes, model_card
from vit.export.verify import ExportCheckError, ExportReport, check, features_and_head, sample_images
from vit.layers import to_2tuple
from vit.models import MaskedAutoencoder, NetworkRecord, VisionTransformer

log = logging.getLogger(__name__)

README_NAME = "README.md"  # the model card of a timm hub folder
TRACE_BATCH = 2  # the example batch for tracing: neither checked size, so batch is not specialised
INPUT_NAME = "images"


class MissingExtraError(ImportError):
    """An optional dependency a format needs is not installed."""


class ExportFolderError(BadInputError):
    """An output folder that holds another format's export (its files would be replaced)."""


def export_model(
    model: nn.Module,
    fmt: str,
    out: str | Path,
    *,
    record: NetworkRecord | None = None,
    source: str | None = None,
    image_sizes: Sequence[int | tuple[int, int]] | None = None,
    head: bool | None = None,
    opset: int = DEFAULT_OPSET,
    atol: float = 1e-4,
    force: bool = False,
) -> ExportReport:
    """Write ``model`` to ``out`` in format ``fmt`` and check what a consumer loads back against it.

    Args:
        model: a ``VisionTransformer``, or a ``MaskedAutoencoder`` (its encoder for every format but "mae").
        fmt: one of ``FORMATS``.
        out: the directory to write (created; files of the same name are replaced).
        record: the source's network record (its name, preprocessing and class names go into config.json);
            None records ``model`` as it is, without preprocessing.
        source: where the model came from, for config.json.
        image_sizes: resolutions to export for (default: the model's). The weight formats store one; ONNX
            and torch.export write one graph per size (``model.onnx`` / ``model.pt2`` for the first).
        head: True keeps the classifier (an error without one), False drops it, None keeps what there is.
        opset: ONNX opset (>= 17).
        atol: the max abs difference a check may show.
        force: write even into a folder holding another format's export (its files of the same name are lost).
    Raises ``ExportCheckError`` (carrying the report) when a check exceeds ``atol``, and ``ExportFolderError``
    when ``out`` holds another format's export and ``force`` is not set.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out = Path(out)
    if not force:
        _check_export_folder(out, fmt)
    record = record or NetworkRecord.from_model(model)
    model = _select_network(model, fmt, head)
    sizes = _image_sizes(model, fmt, image_sizes)
    if isinstance(model, VisionTransformer):
        # every size resampled from the source's own grid (the training resolution)
        own = model.patch_embed.img_size
        models = {size: model if size == own else resize_model(model, size, record.pos_resample).eval()
                  for size in sizes}
    else:
        models = {sizes[0]: model}
    out.mkdir(parents=True, exist_ok=True)
    report = ExportReport(format=fmt, out=out, atol=atol)
    job = _Job(models, out, record, source, report, opset)
    if not normalisation(record)[2]:
        report.notes.append("the source records no input mean/std: config.json says ImageNet's (timm's default)")
    if fmt in ("onnx", "torch-export", "aoti") and getattr(job.first, "dynamic_img_size", False):
        report.notes.append("one graph per --image-size: the model's forward resamples positions only when the "
                            "patch grid differs, a branch torch.export fixes at trace time")
    with torch.no_grad():
        _WRITERS[fmt](job)
    failed = [c for c in report.checks if not c.ok]
    if failed:
        raise ExportCheckError(
            f"{fmt} export in {out} does not reproduce the source model: "
            + "; ".join(f"{c.name}: max |diff| {c.max_abs_diff:.3g} > {c.atol:g}" for c in failed),
            report,
        )
    return report


@dataclass
class _Job:
    """One export in progress: the networks per size, where they go, and the source's record."""

    models: dict[tuple[int, int], nn.Module]
    out: Path
    record: NetworkRecord
    source: str | None
    report: ExportReport
    opset: int

    @property
    def first(self) -> nn.Module:
        return next(iter(self.models.values()))

    def record_of(self, model: nn.Module) -> NetworkRecord:
        """``model``'s own record (as selected and resized) with the source's name, preprocessing and classes."""
        mean, std, _ = normalisation(self.record)
        pre = {**self.record.preprocessing, "mean": mean, "std": std}
        name = self.record.name if self.record.architecture == type(model).__name__ else None  # an MAE's encoder
        record = NetworkRecord.from_model(model, name, pre, self.record.class_names)
        record.pos_resample = self.record.pos_resample
        return record

    def config(self, model: nn.Module, fmt: str, **extra: Any) -> dict[str, Any]:
        return export_config(self.record_of(model), fmt, self.source, **extra)


def _write_safetensors(job: _Job) -> None:
    (size, model), = job.models.items()
    t0 = time.perf_counter()
    job.report.files += [_save_safetensors(model.state_dict(), job.out / WEIGHTS_NAME),
                     _write_json(job.out / CONFIG_NAME, job.config(model, "safetensors"))]
    job.report.write_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    loaded = load_backbone(job.out)
    check(job.report, f"vit.load_backbone (features, logits) {_fmt(size)}", model, features_and_head(loaded),
          size, source=features_and_head(model))
    job.report.check_seconds = time.perf_counter() - t0


def _write_timm(job: _Job) -> None:
    """timm's hub layout: config.json (timm's fields, our record under "vitkit"), model.safetensors, README.md."""
    import timm

    (size, model), = job.models.items()
    t0 = time.perf_counter()
    record = job.record_of(model)
    config = hub_config(model, record, job.config(model, "timm"))
    job.report.files += [_save_safetensors(vit_to_timm(model.state_dict()), job.out / WEIGHTS_NAME),
                         _write_json(job.out / CONFIG_NAME, config), job.out / README_NAME]
    (job.out / README_NAME).write_text(model_card(model, config, record))
    job.report.write_seconds = time.perf_counter() - t0
    job.report.notes += hub_notes(model)
    t0 = time.perf_counter()
    ref = timm.create_model(f"local-dir:{job.out}", pretrained=True).eval()
    check(job.report, f"timm.create_model(local-dir, pretrained) (features, logits) {_fmt(size)}", model,
          features_and_head(ref), size, source=features_and_head(model))
    ours = load_backbone(job.out)
    check(job.report, f"vit.load_backbone (features, logits) {_fmt(size)}", model, features_and_head(ours), size,
          source=features_and_head(model))
    job.report.check_seconds = time.perf_counter() - t0


def _write_mae(job: _Job) -> None:
    (size, model), = job.models.items()
    t0 = time.perf_counter()
    path = job.out / MAE_WEIGHTS_NAME
    state = {k: v.detach().clone() for k, v in vit_to_mae_official(model.state_dict()).items()}
    torch.save({"model": state}, path)
    job.report.files += [path, _write_json(job.out / CONFIG_NAME, job.config(model, "mae"))]
    job.report.write_seconds = time.perf_counter() - t0
    if not isinstance(model, MaskedAutoencoder):
        job.report.notes.append("the source is a ViT: wrote the encoder-only layout (as mae_pretrain_vit_*.pth)")
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

        check(job.report, f"MAE (loss, pred, mask) {_fmt(size)}", model, run(fresh), size, source=run(model))
    else:
        check(job.report, f"encoder-only layout {_fmt(size)}", model, fresh, size)
    job.report.check_seconds = time.perf_counter() - t0


def _write_onnx(job: _Job) -> None:
    onnx, ort = _require_onnx()
    if job.opset < 17:
        raise ValueError(f"--opset must be >= 17 (LayerNormalization is an opset-17 op), got {job.opset}")
    files, opsets = {}, {}
    output_name = _output_name(next(iter(job.models.values())))
    for i, (size, model) in enumerate(job.models.items()):
        path = job.out / ("model.onnx" if i == 0 else f"model_{_fmt(size)}.onnx")
        t0 = time.perf_counter()
        big = sum(p.numel() * p.element_size() for p in model.state_dict().values()) > 1.5 * 2**30
        torch.onnx.export(
            model, (sample_images(model, TRACE_BATCH, size),), str(path), dynamo=True, opset_version=job.opset,
            input_names=[INPUT_NAME], output_names=[output_name], verbose=False, external_data=big,
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
        )
        job.report.write_seconds += time.perf_counter() - t0
        opsets[_fmt(size)] = max(o.version for o in onnx.load(str(path), load_external_data=False).opset_import
                                 if o.domain in ("", "ai.onnx"))
        if opsets[_fmt(size)] != job.opset:
            job.report.notes.append(f"{path.name}: asked for opset {job.opset}, "
                                    f"the exporter wrote {opsets[_fmt(size)]}")
        files[_fmt(size)] = path.name
        job.report.files += sorted(job.out.glob(path.name + "*"))  # external data, when the model is over 2 GB
        t0 = time.perf_counter()
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

        def run_ort(x: torch.Tensor, session: Any = session) -> torch.Tensor:
            return torch.from_numpy(session.run(None, {INPUT_NAME: x.numpy()})[0])

        check(job.report, f"onnxruntime {_fmt(size)}", model, run_ort, size)
        job.report.check_seconds += time.perf_counter() - t0
    extra = {"files": files, "input_name": INPUT_NAME, "output_name": output_name, "dynamic_axes": ["batch"],
             "opset": opsets}
    job.report.files.append(_write_json(job.out / CONFIG_NAME, job.config(job.first, "onnx", **extra)))


def _write_torch_export(job: _Job) -> None:
    files = {}
    for i, (size, model) in enumerate(job.models.items()):
        path = job.out / ("model.pt2" if i == 0 else f"model_{_fmt(size)}.pt2")
        t0 = time.perf_counter()
        program = torch.export.export(model, (sample_images(model, TRACE_BATCH, size),),
                                      dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), strict=False)
        torch.export.save(program, path)
        job.report.write_seconds += time.perf_counter() - t0
        files[_fmt(size)] = path.name
        job.report.files.append(path)
        t0 = time.perf_counter()
        check(job.report, f"torch.export.load {_fmt(size)}", model, torch.export.load(path).module(), size)
        job.report.check_seconds += time.perf_counter() - t0
    extra = {"files": files, "output_name": _output_name(job.first), "dynamic_axes": ["batch"]}
    job.report.files.append(_write_json(job.out / CONFIG_NAME, job.config(job.first, "torch-export", **extra)))


_WRITERS = {"safetensors": _write_safetensors, "timm": _write_timm, "mae": _write_mae, "onnx": _write_onnx,
            "torch-export": _write_torch_export, "aoti": write_aoti}


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


def _fmt(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def _check_export_folder(out: Path, fmt: str) -> None:
    """Refuse ``out`` when its ``config.json`` belongs to another export than ``fmt`` (or to no export of ours):
    every format writes a ``config.json``, and some share ``model.safetensors``."""
    config = out / CONFIG_NAME
    if not config.is_file():
        return
    try:
        data = json.loads(config.read_text())
        held = data.get("format") or (data.get(RECORD_FIELD) or {}).get("format")
    except (OSError, ValueError, AttributeError):
        held = None
    if held == fmt:
        return  # the same export again: its files are replaced
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    shown = ", ".join(files[:6]) + (f", ... ({len(files) - 6} more)" if len(files) > 6 else "")
    what = f"a {held} export" if held else "a config.json that is not a vitkit export"
    raise ExportFolderError(f"--out {out} already holds {what} ({shown}); writing the {fmt} format there would "
                            f"replace them: choose another --out, or pass --force")
