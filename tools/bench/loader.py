"""``vit bench --data``: loader images/s per worker count, ImageFolder vs litdata shards, against a train step.

The benchmark writes ``--data-images`` real JPEGs (500x375, smooth random scenes at quality 90, spread over 10
classes) as an ImageFolder tree and as litdata shards, then times a full pass of each loader for every worker count:
decode + RandomResizedCrop 224 + flip + normalise (MAE pretraining's pipeline), batches of ``--batch-size``. A pass
is timed from its first batch to its end, so worker start-up is left out; passes are interleaved across candidates
(rotating order) and medians reported. The train step of ``--model`` (default mae_vit_base_patch16, mask 0.75) is
timed on the device the same way. CPU cores a GPU needs = the GPU's img/s over the best img/s per loader core
measured; on a CUDA device the measured step is the GPU's rate, elsewhere it is assumed from
``--gpu-peak-tflops`` x ``--gpu-mfu`` / the step's counted FLOPs per image (default: an H100 SXM's 989 dense bf16
TFLOP/s, NVIDIA's datasheet, at 40% MFU, an assumption about a well-tuned run).

Beside them, ``device_rows`` times ``data.decode device``: the same decode + crop + flip + normalise of the same
files on the device (nvjpeg and CUDA kernels on a GPU, torch's threads on a CPU), from encoded batches already in
memory; it needs no loader cores, so it does not enter the cores-per-GPU figures.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import vit
from vit.data import ImageDataModule, StreamingDataModule, optimize_folder
from vit.flops import count_flops
from vit.models import MaskedAutoencoder

from .machine import others_cpu_share
from .steps import classifier_loss, train_fn
from .timing import time_interleaved

SOURCE_SIZE = (500, 375)  # (w, h), a typical ImageNet photo
CROP = 224
NUM_CLASSES = 10
MASK_RATIO = 0.75


def add_options(p: argparse._ActionsContainer) -> None:
    """The ``--data`` options."""
    p.add_argument("--data", action="store_true",
                   help="loader benchmark: img/s per worker count for ImageFolder and litdata shards (decode + "
                        "RandomResizedCrop 224 + flip + normalise on JPEGs it writes), the same on the device "
                        "(data.decode device), against --model's train step (default mae_vit_base_patch16), and the "
                        "CPU cores per GPU that step needs")
    p.add_argument("--data-images", type=int, default=300, help="JPEGs the --data benchmark writes (default 300)")
    p.add_argument("--data-workers", default="0,1,2", help="loader worker counts to time (default 0,1,2)")
    p.add_argument("--gpu-peak-tflops", type=float, default=989.0,
                   help="with --data off CUDA: the GPU's dense bf16 peak (default 989, H100 SXM datasheet)")
    p.add_argument("--gpu-mfu", type=float, default=0.4, help="with --data off CUDA: the MFU assumed (default 0.4)")


def bench_data(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The loader rows, the train step and the cores-per-GPU estimate (see module docstring)."""
    workers = sorted({int(w) for w in str(args.data_workers).split(",") if w.strip()})
    if not workers or min(workers) < 0 or args.data_images < args.batch_size:
        raise ValueError(f"--data-workers needs counts >= 0 (got {args.data_workers!r}) and --data-images at least "
                         f"--batch-size ({args.data_images} < {args.batch_size})")
    with tempfile.TemporaryDirectory(prefix="vit-bench-data-") as tmp:
        tree, shards = Path(tmp) / "jpegs", Path(tmp) / "shards"
        jpeg_bytes = write_jpegs(tree, args.data_images)
        optimize_folder(tree, shards, num_workers=max(1, min(4, max(workers))))
        rows = _time_loaders(args, tree, shards, workers)
        device_rows = _time_device_decode(args, tree, device)
    step = _train_step(args, device)
    return {"other_processes_cpu": others_cpu_share(args.cpu_start), "images": args.data_images,
            "source_size": list(SOURCE_SIZE), "crop": CROP, "jpeg_bytes_mean": statistics.mean(jpeg_bytes),
            "batch_size": args.batch_size, "rows": rows, "device_rows": device_rows, "train_step": step,
            **cores_per_gpu(rows, step, device, args)}


def write_jpegs(root: Path, n: int, seed: int = 0) -> list[int]:
    """``n`` JPEGs of smooth random scenes under ``root/<class>/``; returns their sizes in bytes."""
    rng = np.random.default_rng(seed)
    w, h = SOURCE_SIZE
    sizes = []
    for i in range(n):
        folder = root / f"c{i % NUM_CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        grain = rng.normal(0, 8, (h, w, 3))
        pixels = np.clip(np.asarray(coarse, dtype=np.float64) + grain, 0, 255).astype(np.uint8)
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        sizes.append(path.stat().st_size)
    return sizes


def cores_per_gpu(rows: list[dict[str, Any]], step: dict[str, Any], device: torch.device,
                  args: argparse.Namespace) -> dict[str, Any]:
    """The GPU img/s (measured on CUDA, else assumed) and the loader cores it needs per source."""
    if device.type == "cuda":
        gpu = {"img_per_s": step["img_per_s"], "source": f"measured: {step['model']} train step on {device}"}
    else:
        rate = args.gpu_peak_tflops * 1e12 * args.gpu_mfu / step["flops_per_img"]
        gpu = {"img_per_s": rate, "source": f"assumed: {args.gpu_peak_tflops:g} TFLOP/s peak x {args.gpu_mfu:g} MFU / "
               f"{step['flops_per_img'] / 1e9:.1f} GFLOP per image ({step['model']} train step, counted)"}
    per_core = {src: max(r["img_per_s"] / max(r["workers"], 1) for r in rows if r["source"] == src)
                for src in dict.fromkeys(r["source"] for r in rows)}
    return {"gpu": gpu, "img_per_s_per_core": per_core,
            "cores_per_gpu": {src: gpu["img_per_s"] / rate for src, rate in per_core.items()}}


def format_data(record: dict[str, Any]) -> str:
    """The ``--data`` table and summary."""
    lines = [f"loader: {record['images']} JPEGs {record['source_size'][0]}x{record['source_size'][1]} (mean "
             f"{record['jpeg_bytes_mean'] / 1024:.0f} KB), decode + RandomResizedCrop {record['crop']} + flip + "
             f"normalise, batch {record['batch_size']}; medians of interleaved full passes",
             f"other processes kept {100 * record['other_processes_cpu']:.0f}% of the CPUs busy meanwhile (the "
             "figures are trustworthy when this is near 0)",
             f"{'source':<8} {'workers':>7} {'img/s':>9} {'img/s/core':>10}"]
    for r in record["rows"]:
        lines.append(f"{r['source']:<8} {r['workers']:>7} {r['img_per_s']:>9,.1f} "
                     f"{r['img_per_s'] / max(r['workers'], 1):>10,.1f}")
    for r in record.get("device_rows", []):
        lines.append(f"{r['source']:<8} {'-':>7} {r['img_per_s']:>9,.1f} {'':>10} decode: device, on {r['device']}"
                     + (f" ({r['threads']} CPU threads)" if r["device"] == "cpu" else ""))
    s = record["train_step"]
    lines.append(f"train step: {s['model']} on {s['device']}, batch {s['batch']}: {s['img_per_s']:,.2f} img/s "
                 f"({s['flops_per_img'] / 1e9:.2f} GFLOP per image)")
    lines.append(f"GPU: {record['gpu']['img_per_s']:,.0f} img/s ({record['gpu']['source']})")
    lines.append("CPU cores per GPU to keep up: " + ", ".join(
        f"{src} {c:,.1f} (at {record['img_per_s_per_core'][src]:,.0f} img/s per core)"
        for src, c in record["cores_per_gpu"].items()))
    return "\n".join(lines)


def _time_loaders(args: argparse.Namespace, tree: Path, shards: Path, workers: list[int]) -> list[dict[str, Any]]:
    """One full pass per (source, workers) per repeat, interleaved in rotating order."""
    common = dict(img_size=CROP, batch_size=args.batch_size, task="pretrain", drop_last=True)
    modules = {}
    for w in workers:
        modules["folder", w] = ImageDataModule(root=str(tree), num_workers=w, **common)
        modules["shards", w] = StreamingDataModule(str(shards), num_workers=w, **common)
    loaders = {}
    for key, dm in modules.items():
        dm.setup("fit")
        loaders[key] = dm.train_dataloader()
        _pass(loaders[key])  # warm-up: page cache, worker start (persistent for the folder module)
    keys = list(loaders)
    rates: dict[Any, list[float]] = {k: [] for k in keys}
    for r in range(args.repeats):
        for j in range(len(keys)):
            key = keys[(j + r) % len(keys)]
            rates[key].append(_pass(loaders[key]))
    return [{"source": src, "workers": w, "img_per_s": statistics.median(rates[src, w]), "per_repeat": rates[src, w]}
            for src, w in keys]


def _time_device_decode(args: argparse.Namespace, tree: Path, device: torch.device) -> list[dict[str, Any]]:
    """img/s of ``decode: device`` on ``device``: MAE's pipeline on encoded batches read once, medians of passes."""
    dm = ImageDataModule(root=str(tree), img_size=CROP, batch_size=args.batch_size, task="pretrain", drop_last=True,
                         decode="device")
    dm.setup("fit")
    batches = [batch.to(device) for batch in dm.train_dataloader()]
    images = sum(len(batch.encoded) for batch in batches)

    def one_pass() -> float:
        start = time.perf_counter()
        for batch in batches:
            dm.on_after_batch_transfer(batch, 0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return images / max(time.perf_counter() - start, 1e-9)

    one_pass()  # warm-up: CUDA context, nvjpeg handles, page cache
    rates = [one_pass() for _ in range(args.repeats)]
    return [{"source": "device", "device": str(device), "threads": torch.get_num_threads(),
             "img_per_s": statistics.median(rates), "per_repeat": rates}]


def _pass(loader: Any) -> float:
    """Images per second over one pass, from the first batch to the last."""
    it = iter(loader)
    next(it)
    start, n = time.perf_counter(), 0
    for images, _ in it:
        n += images.shape[0]
    return n / max(time.perf_counter() - start, 1e-9)


def _train_step(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """img/s of ``--model``'s training step (MAE at mask 0.75, a ViT with cross-entropy), fp32 or bf16."""
    name = args.model or "mae_vit_base_patch16"
    torch.manual_seed(0)
    model = vit.create_model(name, **args.model_args).to(device).train()
    pe = model.encoder.patch_embed if isinstance(model, MaskedAutoencoder) else model.patch_embed
    x = torch.randn(args.batch_size, pe.in_chans, *pe.img_size, device=device)
    if isinstance(model, MaskedAutoencoder):
        def loss(m: torch.nn.Module, x: torch.Tensor = x) -> torch.Tensor:
            return m(x, MASK_RATIO)[0]
    else:
        loss = classifier_loss(x, torch.zeros(args.batch_size, dtype=torch.long, device=device))
    flops = _flops_per_img(model, x)
    model.zero_grad(set_to_none=True)
    dtype = args.dtypes[0]
    (m,) = time_interleaved([train_fn(model, loss, device, dtype, args.optimizer)], device, args.warmup,
                            args.repeats, args.min_time)
    return {"model": name, "device": str(device), "dtype": dtype, "batch": args.batch_size,
            "img_per_s": args.batch_size / statistics.median(m.times), "flops_per_img": flops}


def _flops_per_img(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Counted FLOPs of one image's forward and backward."""
    if isinstance(model, MaskedAutoencoder):
        return count_flops(lambda: model(x[:1], MASK_RATIO)[0].backward())
    return count_flops(lambda: model(x[:1]).float().square().mean().backward())
