"""`vit export`: write a checkpoint's network in a format other projects load without our code, and verify it."""

from __future__ import annotations

import argparse
import json
import logging
import pickle
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from vit.export.formats import DEFAULT_OPSET, FORMATS

if TYPE_CHECKING:
    from vit.export.verify import ExportReport

DESCRIPTION = """\
Export a trained network for other projects, then re-run seeded sample inputs (batch 1 and 3, at every
exported resolution) through the source and through what a consumer loads back, printing the max abs
difference per check; exits non-zero when one exceeds --atol.

SOURCE is one of:
  a Lightning .ckpt of our LightningModules (the network is rebuilt from the record it holds),
  a run directory (searched recursively for *.ckpt: the best checkpoint ModelCheckpoint recorded when it
    monitored a metric, else the newest last*.ckpt, else the newest *.ckpt),
  an export directory (config.json, our record of the network, + model.safetensors),
  a timm hub folder (ours, or timm's save_for_hf of a model vitkit has a name for),
  a Hugging Face save_pretrained folder of ViT, ViTMAE, DINOv2 or DINOv2 with registers (no transformers needed),
  a plain state dict (.pth / .safetensors) with --model NAME [--model-args JSON].
--format timm writes timm's hub layout (config.json, model.safetensors, README.md): timm.create_model(
"local-dir:DIR", pretrained=True) and transformers' AutoModel.from_pretrained(DIR) load it, and so do we.
An MAE source exports its encoder, except with --format mae (the full MAE, official layout).
Every file is read with safetensors or torch.load(weights_only=True): pickled code is refused.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `vit export`."""
    p = argparse.ArgumentParser(prog="vit export", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", type=Path, help="checkpoint, run directory, export directory or state dict")
    p.add_argument("--format", default="safetensors", choices=FORMATS, help="what to write (default: safetensors)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--image-size", action="append", type=_image_size, metavar="N|HxW",
                   help="resolution to export for (default: the training one); repeat for several "
                        "(onnx / torch-export write one graph per size)")
    head = p.add_mutually_exclusive_group()
    head.add_argument("--with-head", dest="head", action="store_const", const=True,
                      help="keep the classifier head (an error if the source has none)")
    head.add_argument("--backbone-only", dest="head", action="store_const", const=False,
                      help="drop the classifier head (num_classes=0)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset, >= 17 (default {DEFAULT_OPSET})")
    p.add_argument("--model", help="registered model name, for a plain state dict (overrides a checkpoint's)")
    p.add_argument("--model-args", type=_json_dict, metavar="JSON", help="constructor overrides, e.g. "
                   "'{\"img_size\": 32, \"depth\": 2}'")
    p.add_argument("--atol", type=float, default=1e-4, help="max abs difference a check may show (default 1e-4)")
    p.add_argument("--force", action="store_true",
                   help="write into --out even when it holds another format's export (its files are replaced)")
    p.add_argument("-v", "--verbose", action="store_true", help="log what is loaded and resampled")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run `vit export` with ``argv`` (without the program name); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error argparse has already explained
        return int(e.code or 0)
    if args.verbose:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("vit").setLevel(logging.INFO)
    from vit.export.load import build_network, record_of  # after parsing: --help needs no torch
    from vit.export.read import read_weights
    from vit.export.verify import ExportCheckError
    from vit.export.writers import export_model

    try:
        t0 = time.perf_counter()
        weights = read_weights(args.source)
        model = build_network(weights, name=args.model, model_args=args.model_args)
        print(f"source: {weights.source} ({_describe(model)}, read in {time.perf_counter() - t0:.2f} s)")
        for note in weights.notes:
            print(f"  note: {note}")
        report = export_model(model, args.format, args.out, record=record_of(weights, model), source=weights.source,
                              image_sizes=args.image_size, head=args.head, opset=args.opset, atol=args.atol,
                              force=args.force)
    except ExportCheckError as e:  # the export does not reproduce the source: a fault, exit status 1
        _print_report(e.report)
        return _error(e, 1)
    except (FileNotFoundError, ValueError, ImportError, pickle.UnpicklingError) as e:
        # bad input (missing file, wrong keys, unsafe pickle, a folder of another export, missing extra)
        return _error(e, 2)
    except OSError as e:  # an output that cannot be written
        return _error(f"{e.strerror or e} ({e.filename or args.out})", 1)
    _print_report(report)
    return 0


def _error(e: BaseException | str, code: int) -> int:
    """Print ``vit export: error: ...`` as one line on stderr; returns ``code``."""
    print(f"vit export: error: {' '.join(str(e).split())}", file=sys.stderr)
    return code


def _print_report(report: ExportReport) -> None:
    print(f"format {report.format} -> {report.out}: {', '.join(p.name for p in report.files)}")
    for note in report.notes:
        print(f"  note: {note}")
    for c in report.checks:
        print(f"  check {c.name}: max |diff| = {c.max_abs_diff:.3g} {'ok' if c.ok else f'FAILED (> {c.atol:g})'}")
    status = "all within" if all(c.ok for c in report.checks) else "NOT all within"
    print(f"export {report.write_seconds:.3f} s, checks {report.check_seconds:.3f} s: {len(report.checks)} checks "
          f"{status} {report.atol:g}")


def _describe(model: object) -> str:
    encoder = getattr(model, "encoder", model)
    n = sum(p.numel() for p in model.parameters())  # type: ignore[attr-defined]
    h, w = encoder.patch_embed.img_size
    classes = getattr(model, "num_classes", 0)
    return f"{type(model).__name__}, {n / 1e6:.2f}M parameters, {h}x{w}" + (f", {classes} classes" if classes else "")


def _image_size(text: str) -> tuple[int, int]:
    try:
        parts = [int(v) for v in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts) <= 0:
        raise argparse.ArgumentTypeError(f"expected N or HxW (e.g. 224 or 240x320), got {text!r}")
    return (parts[0], parts[-1])


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text!r}") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


if __name__ == "__main__":
    sys.exit(main())
