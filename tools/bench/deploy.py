"""``vit bench --deploy``: inference of exported backbones per deployment format, against timm eager, same weights.

For each model and batch: our eager model, timm's twin holding our weights (eager), ``torch.compile`` with
inductor freezing (weights folded and pre-packed for oneDNN), an AOTInductor package (``vit export --format
aoti``: one package, dynamic batch), onnxruntime on ``vit export --format onnx`` (its default session, ORT_ENABLE_ALL
in onnxruntime 1.32, and ORT_ENABLE_BASIC to show what the higher levels add), and bf16 autocast where the CPU has
native bf16 matmuls (AVX-512 BF16 / AMX; elsewhere it is skipped with the reason). Every format's output on the
timed batch is compared with our eager output first (fp32: max abs difference <= ``FP32_ATOL``; bf16 is reported
with its difference and never counted as equal); a format that differs is not timed. All formats of one (model,
batch) are timed interleaved in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import vit
from vit.export.aoti import load_package
from vit.export.writers import INPUT_NAME, export_model
from vit.flops import vit_forward_flops
from vit.models import VisionTransformer

from .cases import matmul_peak_of, timm_twin
from .timing import time_interleaved

MODELS = ("vit_small_patch16_224", "vit_base_patch16_224")
BATCHES = (1, 32)
FORMATS = ("eager", "timm", "compile", "aoti", "onnx", "onnx-basic", "bf16")
FP32_ATOL = 1e-4  # the export checks' tolerance: fp32 kernels that sum in another order differ by ~1e-5 on logits
NOT_OURS = ("timm",)  # the baseline; every other format runs our weights through our exported graph
PROFILED = ("eager", "compile", "aoti")
NOT_EXACT = ("bf16",)  # reported with its error, never the fastest "equal" format
# profiler op names that are matrix products: aten GEMMs, oneDNN (mkldnn) and MKL linears, convolutions, SDPA
MATMUL_KEYS = ("addmm", "::mm", "bmm", "matmul", "linear", "conv", "scaled_dot_product", "flash_attention", "mkl")


def add_options(p: argparse._ActionsContainer) -> None:
    """The ``--deploy`` options."""
    p.add_argument("--deploy", action="store_true",
                   help="inference per deployment format (eager, timm eager, torch.compile with freezing, "
                        "AOTInductor package, onnxruntime default and basic, bf16 where native) at each "
                        "--deploy-models x --deploy-batches, each checked equal to eager before it is timed")
    p.add_argument("--deploy-models", type=lambda s: _csv(s), default=list(MODELS), metavar="M,M,...",
                   help=f"registered names, each with --model-args (default {','.join(MODELS)})")
    p.add_argument("--deploy-batches", type=lambda s: [int(b) for b in _csv(s)], default=list(BATCHES),
                   metavar="B,B,...", help=f"batch sizes (default {','.join(map(str, BATCHES))})")
    p.add_argument("--deploy-formats", type=lambda s: _csv(s), default=list(FORMATS), metavar="F,F,...",
                   help=f"formats to time (default {','.join(FORMATS)}; eager is always run: it is the reference)")


def native_bf16() -> tuple[bool, str]:
    """Whether this CPU multiplies bf16 natively, and why (the cpuinfo flags it has or lacks)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return False, "cannot read /proc/cpuinfo to look for AVX-512 BF16 / AMX"
    found = sorted(flags & {"avx512_bf16", "amx_bf16"})
    if found:
        return True, f"the CPU has {' and '.join(found)}"
    return False, ("the CPU has neither avx512_bf16 nor amx_bf16: bf16 matmuls are emulated there, many times "
                   "slower than fp32")


def bench_deploy(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Records per (model, batch, format), the per-format keys, ``ratio.deploy`` and what was skipped and why."""
    if device.type != "cpu":
        raise ValueError("--deploy times CPU deployment formats (onnxruntime's and AOTInductor's CPU builds); "
                         "run it with --device cpu")
    unknown = [f for f in args.deploy_formats if f not in FORMATS]
    if unknown or not args.deploy_batches or min(args.deploy_batches) < 1:
        raise ValueError(f"--deploy-formats: unknown {unknown} (choose from {', '.join(FORMATS)}); "
                         f"--deploy-batches must be >= 1" if unknown else "--deploy-batches must be >= 1")
    formats = ["eager", *[f for f in FORMATS if f in args.deploy_formats and f != "eager"]]
    skipped = {}
    if "bf16" in formats:
        ok, why = native_bf16()
        if not ok:
            formats.remove("bf16")
            skipped["bf16"] = why
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="vit-deploy-") as tmp:
        for name in args.deploy_models:
            records += _bench_model(args, name, formats, Path(tmp) / name)
    return {"deploy": records, "skipped": skipped, **deploy_keys(records)}


def deploy_keys(records: list[dict[str, Any]]) -> dict[str, Any]:
    """``deploy.<format>.img_s`` and ``.compile_s`` (by ``model@bB``), ``ratio.deploy`` and friends.

    ``ratio.deploy`` is our fastest fp32 format equal to eager over timm eager, as the median of per-repeat
    ratios, for the first model at its largest batch; ``ratio.deploy_b1`` at batch 1; ``ratio.deploy.by_case``
    holds every (model, batch) with the format that won.
    """
    out: dict[str, Any] = {}
    for r in records:
        if r["img_s"] is not None:
            out.setdefault(f"deploy.{r['format']}.img_s", {})[_case(r)] = r["img_s"]
        if r["build_s"] is not None:
            out.setdefault(f"deploy.{r['format']}.compile_s", {})[_case(r)] = r["build_s"]
    by_case = {}
    for case in dict.fromkeys(_case(r) for r in records):
        rows = {r["format"]: r for r in records if _case(r) == case and r["img_s"] is not None}
        ours = [r for f, r in rows.items() if f not in NOT_OURS + NOT_EXACT and r["equal"]]
        if "timm" in rows and ours:
            best = max(ours, key=lambda r: r["img_s"])
            by_case[case] = {"format": best["format"], "ratio": _paired(best, rows["timm"])}
            if "bf16" in rows:
                by_case[case]["bf16_ratio"] = _paired(rows["bf16"], rows["timm"])
    out["ratio.deploy.by_case"] = by_case
    if records and by_case:
        first = records[0]["model"]
        batches = sorted({r["batch"] for r in records if r["model"] == first})
        for key, batch in (("ratio.deploy", batches[-1]), ("ratio.deploy_b1", 1)):
            if f"{first}@b{batch}" in by_case:
                out[key] = by_case[f"{first}@b{batch}"]["ratio"]
    return out


def format_deploy(result: dict[str, Any]) -> str:
    """The records as a table (img/s, over timm, max |diff| vs eager, build seconds) and the ratio lines."""
    head = ["model", "batch", "format", "img/s", "/timm", "max|diff|", "equal", "build s"]
    lines = [head]
    timm = {_case(r): r for r in result["deploy"] if r["format"] == "timm" and r["img_s"]}
    for r in result["deploy"]:
        t = timm.get(_case(r))
        rel = f"{_paired(r, t):.3f}x" if t and r["img_s"] else "-"
        lines.append([r["model"], str(r["batch"]), r["format"], f"{r['img_s']:,.2f}" if r["img_s"] else "-", rel,
                      f"{r['max_abs_diff']:.2e}", "yes" if r["equal"] else ("bf16" if r["format"] in NOT_EXACT
                                                                             else "NO"),
                      f"{r['build_s']:.1f}" if r["build_s"] is not None else "-"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True)))
            for line in lines]
    text.insert(1, "-" * len(text[0]))
    for fmt, why in result["skipped"].items():
        text.append(f"skipped {fmt}: {why}")
    for r in result["deploy"]:
        if "profile" in r:
            p = r["profile"]
            text.append(f"profile of {r['format']} {_case(r)}: matmul {100 * p['matmul_share']:.1f}% of "
                        f"{p['self_ms']:,.1f} ms self time per call; top: " + ", ".join(
                            f"{o['op']} {100 * o['share']:.1f}%" for o in p["top"][:6]))
            if "matmul_flop_s" in p:
                text.append(f"  matmuls at {p['matmul_flop_s'] / 1e9:,.1f} GFLOP/s = {100 * p['matmul_of_peak']:.0f}% "
                            f"of the measured fp32 peak ({p['matmul_peak_flop_s'] / 1e9:,.1f} GFLOP/s); with every "
                            f"other op at zero time this format would be {p['bound_if_only_matmul']:.2f}x faster")
    for case, best in result["ratio.deploy.by_case"].items():
        text.append(f"fastest equal format {case}: {best['format']}, {best['ratio']:.3f}x timm eager"
                    + (f" (bf16: {best['bf16_ratio']:.3f}x)" if "bf16_ratio" in best else ""))
    return "\n".join(text)


def _bench_model(args: argparse.Namespace, name: str, formats: list[str], tmp: Path) -> list[dict[str, Any]]:
    """One model's records: each format built once (export + compile, timed), checked, timed per batch."""
    torch.manual_seed(0)
    model = vit.create_model(name, **args.model_args)
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"{name} is not a VisionTransformer: --deploy times backbones and classifiers")
    model.eval()
    pe = model.patch_embed
    inputs = {b: torch.randn(b, pe.in_chans, *pe.img_size) for b in args.deploy_batches}
    runners: dict[str, Callable[[int], Callable[[torch.Tensor], torch.Tensor]]] = {}
    build_s = {}
    for fmt in formats:
        t0 = time.perf_counter()
        runners[fmt] = _BUILDERS[fmt](model, name, args, tmp)
        build_s[fmt] = time.perf_counter() - t0
    records = []
    for batch, x in inputs.items():
        with torch.no_grad():
            expected = model(x)
        fns, rows = [], []
        for fmt in formats:
            t0 = time.perf_counter()
            run = runners[fmt](batch)  # torch.compile specialises on the batch: its compile happens here
            with torch.no_grad():
                got = run(x).float()
            # export + compile (+ onnxruntime's session); torch.compile's is its first call at this batch
            build = build_s[fmt] + (time.perf_counter() - t0 if fmt == "compile" else 0.0)
            diff = (got - expected).abs().max().item() if got.shape == expected.shape else float("inf")
            equal = diff <= FP32_ATOL and fmt not in NOT_EXACT  # NaN compares false: not equal
            rec = {"model": name, "batch": batch, "format": fmt, "dtype": "bf16" if fmt == "bf16" else "fp32",
                   "max_abs_diff": diff, "equal": equal, "build_s": None if fmt in ("eager", "timm") else build,
                   "img_s": None, "seconds": []}
            records.append(rec)
            if equal or fmt in NOT_EXACT:
                rows.append(rec)
                fns.append(_no_grad(run, x))
        times = time_interleaved(fns, torch.device("cpu"), args.warmup, args.repeats, args.min_time,
                                 [f"{r['format']} {name} batch {batch}" for r in rows])
        for rec, m in zip(rows, times, strict=True):
            rec["seconds"] = list(m.times)
            rec["img_s"] = batch / statistics.median(m.times)
        if args.profile:
            # torch.profiler sees inside torch's formats only (onnxruntime runs its own kernels)
            fastest = max((i for i, r in enumerate(rows) if r["equal"] and r["format"] in PROFILED),
                          key=lambda i: rows[i]["img_s"])
            profile = op_profile(fns[fastest])
            rows[fastest]["profile"] = {**profile, **matmul_at_peak(profile, batch * vit_forward_flops(model),
                                                                   matmul_peak_of(args, torch.device("cpu"), "fp32"))}
    return records


def matmul_at_peak(profile: dict[str, Any], flops: int, peak: float) -> dict[str, float]:
    """The profiled call's matrix products against the machine: their FLOP/s (the forward's FLOPs over the
    matmul time), that over the measured fp32 matmul ``peak``, and the speedup left if everything else took no
    time (1 / matmul share), which bounds any fp32 format on this CPU once the matmuls run at the peak."""
    matmul_s = profile["self_ms"] * profile["matmul_share"] / 1e3
    achieved = flops / matmul_s if matmul_s > 0 else 0.0
    return {"matmul_flop_s": achieved, "matmul_peak_flop_s": peak, "matmul_of_peak": achieved / peak,
            "bound_if_only_matmul": 1.0 / profile["matmul_share"] if profile["matmul_share"] > 0 else float("inf")}


def op_profile(fn: Callable[[], Any], runs: int = 3, top: int = 10) -> dict[str, Any]:
    """Where ``fn``'s time goes (torch.profiler self CPU time, after one untimed call): the matmul share
    (GEMMs, oneDNN / MKL linears, convolutions, attention kernels) and the top ops."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(runs):
            fn()
    events = [(e.key, e.self_cpu_time_total / runs) for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(t for _, t in events) or 1.0
    matmul = sum(t for k, t in events if any(m in k.lower() for m in MATMUL_KEYS))
    return {"self_ms": total / 1e3, "matmul_share": matmul / total,
            "top": [{"op": k, "share": t / total} for k, t in sorted(events, key=lambda e: -e[1])[:top]]}


def _eager(model: nn.Module, name: str, args: argparse.Namespace, tmp: Path) -> Callable:
    return lambda batch: model


def _timm(model: nn.Module, name: str, args: argparse.Namespace, tmp: Path) -> Callable:
    twin = timm_twin(name, model, args.model_args, torch.device("cpu")).eval()
    return lambda batch: twin


def _compile(model: nn.Module, name: str, args: argparse.Namespace, tmp: Path) -> Callable:
    # one static graph per batch (a dynamic one is slower than either), weights frozen into it
    compiled: dict[int, Callable] = {}
    return lambda batch: compiled.setdefault(
        batch, torch.compile(model, dynamic=False, options={"freezing": True}))  # type: ignore[arg-type]


def _aoti(model: nn.Module, name: str, args: argparse.Namespace, tmp: Path) -> Callable:
    export_model(model, "aoti", tmp / "aoti")  # compiled with a dynamic batch, verified like every export
    package = load_package(tmp / "aoti")
    return lambda batch: package


def _onnx(model: nn.Module, name: str, args: argparse.Namespace, tmp: Path, level: str = "default") -> Callable:
    import onnxruntime as ort

    folder = tmp / "onnx"
    if not (folder / "model.onnx").is_file():
        export_model(model, "onnx", folder)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()  # the same cores as torch
    if level == "basic":
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(str(folder / "model.onnx"), opts, providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {INPUT_NAME: x.numpy()})[0])

    return lambda batch: run


def _onnx_basic(model: nn.Module, name: str, args: argparse.Namespace, tmp: Path) -> Callable:
    return _onnx(model, name, args, tmp, level="basic")


def _bf16(model: nn.Module, name: str, args: argparse.Namespace, tmp: Path) -> Callable:
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x)

    return lambda batch: run


_BUILDERS: dict[str, Callable[..., Callable]] = {
    "eager": _eager, "timm": _timm, "compile": _compile, "aoti": _aoti, "onnx": _onnx, "onnx-basic": _onnx_basic,
    "bf16": _bf16,
}


def _no_grad(run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Callable[[], torch.Tensor]:
    def step() -> torch.Tensor:
        with torch.no_grad():  # not inference_mode: frozen compiled graphs and AOTI packages run under no_grad
            return run(x)

    return step


def _paired(a: dict[str, Any], b: dict[str, Any]) -> float:
    """img/s of ``a`` over ``b``: the median of per-repeat ratios (the two ran interleaved, repeat by repeat)."""
    return statistics.median(tb / ta for ta, tb in zip(a["seconds"], b["seconds"], strict=True))


def _case(r: dict[str, Any]) -> str:
    return f"{r['model']}@b{r['batch']}"


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]
