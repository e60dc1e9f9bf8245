"""``vit bench``: throughput, peak memory, FLOPs and MFU of our models, side by side with timm and the MAE reference.

The options, the run, and what it prints and writes. Exit status 0, or 2 with one ``vit bench: ...`` line on
stderr for a usage error (unknown model, CUDA missing, an option that needs ``--mae``).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from .attention import PATTERNS, bench_attention, e2e_profiles
from .attention_report import attention_header, core_table, e2e_table, targets, targets_text
from .cases import bench_mae, bench_vit
from .deploy import add_options as add_deploy_options
from .deploy import bench_deploy, format_deploy
from .loader import add_options as add_data_options
from .loader import bench_data, format_data
from .machine import cpu_times, env
from .profiling import print_profiles, profile_summary
from .ratios import mae_ratios, vit_ratios
from .report import format_table, header, summary_text


def build_parser() -> argparse.ArgumentParser:
    """The ``vit bench`` options."""
    p = argparse.ArgumentParser(
        prog="vit bench", description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="Examples: vit bench --model vit_small_patch16_224 --batch-size 32 --against timm\n"
               "          vit bench --attention --json attention.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", help="registered name (default vit_small_patch16_224; with --mae mae_vit_small_patch16)")
    p.add_argument("--model-args", type=json.loads, default={}, help="JSON constructor overrides, e.g. '{\"depth\":2}'")
    p.add_argument("--batch-size", type=int, default=32, help="the large batch (inference and training)")
    p.add_argument("--against", choices=["none", "timm", "reference"],
                   help="time timm's model of the same name (default: none), or with --mae the reference MAE "
                        "(default: reference)")
    p.add_argument("--mae", action="store_true", help="MAE pretraining steps: mask 0.75 vs 0.0, ours vs reference")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd versions")
    p.add_argument("--dtype", choices=["fp32", "bf16", "both"], default="fp32",
                   help="bf16 = autocast. On CPUs without native bf16 matmuls (AVX-512 BF16 / AMX) it is many times "
                        "slower than fp32; with them it can be faster: measure with 'both'")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda when available)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per case; medians are reported")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per case before timing")
    p.add_argument("--min-time", type=float, default=0.25, help="seconds each timed repeat lasts at least")
    p.add_argument("--peak-size", type=int, help="matmul size for the peak (default 2048 CPU, 8192 CUDA)")
    p.add_argument("--optimizer", choices=["fused", "foreach", "forloop"], default="fused",
                   help="AdamW implementation in the training step (forloop = torch's CPU default)")
    p.add_argument("--profile", action="store_true", help="print the top ops of one step of each model")
    p.add_argument("--json", dest="json_path", help="write a machine-readable record here")
    a = p.add_argument_group("attention patterns (--attention)")
    a.add_argument("--attention", action="store_true",
                   help="time every attention pattern's core against dense SDPA at 256, 1,024 and 4,096 tokens "
                        "(and 16,384 on a GPU), fwd and fwd+bwd, and --model (default ViT-S/16) at --e2e-size px "
                        "dense vs --e2e-attention")
    a.add_argument("--attention-patterns", type=_csv, default=list(PATTERNS), metavar="P,P,...",
                   help=f"patterns to time (default {','.join(PATTERNS)})")
    a.add_argument("--attention-tokens", type=lambda s: [int(t) for t in _csv(s)], metavar="N,N,...",
                   help="patch counts, each a square grid (default 256,1024,4096; on a GPU also 16384)")
    a.add_argument("--attention-backends", type=_csv, default=[], metavar="B,B,...",
                   help="backends to time besides each pattern's own choice, e.g. flex,mask "
                        "(flex on a CPU: compiled forward only)")
    a.add_argument("--attention-batch", type=int, default=1, help="images in the core (default 1)")
    a.add_argument("--e2e-size", type=int, default=1024, help="image size of the end-to-end model (default 1024)")
    a.add_argument("--e2e-attention", default="window:16*3,dense",
                   help="the end-to-end model's schedule (default window:16*3,dense: every fourth block dense)")
    a.add_argument("--no-e2e", action="store_true", help="skip the end-to-end model")
    add_data_options(p.add_argument_group("loader (--data)"))
    add_deploy_options(p.add_argument_group("deployment formats (--deploy)"))
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; prints a table, optionally writes JSON. Returns a process exit code."""
    args = build_parser().parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)  # leave the caller's process as it was (tests call main in-process)


def _run(args: argparse.Namespace) -> int:
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return _error("--device cuda but CUDA is not available")
    if not isinstance(args.model_args, dict):
        return _error("--model-args must be a JSON object")
    args.cpu_start = cpu_times()  # other processes compete for the cores: their share is printed with the figures
    args.peaks = {}  # matmul peaks, measured once per run where a verb needs them
    if args.attention:
        return _run_attention(args, device)
    if args.deploy:
        return _run_deploy(args, device)
    args.against = args.against or ("reference" if args.mae else "none")
    if args.against == ("timm" if args.mae else "reference"):
        return _error(f"--against {args.against} needs {'no ' if args.mae else ''}--mae")
    args.dtypes = ["fp32", "bf16"] if args.dtype == "both" else [args.dtype]
    args.compile_modes = [False, True] if args.compile else [False]
    if args.data:
        return _run_data(args, device)
    first = (args.dtypes[0], False)
    try:
        result = bench_mae(args, device) if args.mae else bench_vit(args, device)
    except ValueError as err:
        return _error(str(err))
    rows, info = result["rows"], result["info"]
    summary = mae_ratios(rows, info["flops_train"], first) if args.mae else vit_ratios(rows, args.batch_size, first)

    print(header(args, device, info))
    print(format_table(rows))
    print(summary_text(summary, args.mae))
    if args.profile:
        print_profiles(args, device)
    if args.json_path:
        config = {k: v for k, v in vars(args).items() if k not in ("peaks", "cpu_start")}
        record = {"config": config, "env": env(device, args.cpu_start), "info": info, "peak_flops": args.peaks,
                  "rows": [r.record() for r in rows], **summary}
        with open(args.json_path, "w") as f:
            json.dump(record, f, indent=2)
    return 0


def _run_attention(args: argparse.Namespace, device: torch.device) -> int:
    """``--attention``: the pattern cores and the end-to-end model; table, targets, JSON (list under "attention")."""
    if args.mae:
        return _error("--attention times ViT attention; it does not combine with --mae")
    try:
        result = bench_attention(args, device)
    except ValueError as err:
        return _error(str(err))
    found = targets(result["attention"], result["end_to_end"], device)
    print(attention_header(args, device, result["info"]))
    print(core_table(result["attention"]))
    print(e2e_table(result["end_to_end"]))
    print(targets_text(found))
    if args.profile and not args.no_e2e:
        print(e2e_profiles(args, device, profile_summary))
    if args.json_path:
        config = {k: v for k, v in vars(args).items() if k not in ("peaks", "cpu_start")}
        record = {"config": config, "env": env(device, args.cpu_start), **result, "targets": found}
        with open(args.json_path, "w") as f:
            json.dump(record, f, indent=2)
    return 0


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _run_data(args: argparse.Namespace, device: torch.device) -> int:
    """``--data``: the loader benchmark; its record is the JSON's ``data`` key."""
    try:
        record = bench_data(args, device)
    except ValueError as err:
        return _error(str(err))
    print(format_data(record))
    if args.json_path:
        config = {k: v for k, v in vars(args).items() if k not in ("peaks", "cpu_start")}
        with open(args.json_path, "w") as f:
            json.dump({"config": config, "env": env(device, args.cpu_start), "data": record}, f, indent=2)
    return 0


def _run_deploy(args: argparse.Namespace, device: torch.device) -> int:
    """``--deploy``: every deployment format against timm eager; records under "deploy", keys ``deploy.*``."""
    if args.mae:
        return _error("--deploy times inference of backbones; it does not combine with --mae")
    try:
        result = bench_deploy(args, device)
    except ValueError as err:
        return _error(str(err))
    e = env(device, args.cpu_start)
    print(f"vit bench --deploy: {e['device_name']}, {e['threads']} threads, torch {e['torch']}; medians of "
          f"{args.repeats} interleaved repeats (ratios: median of per-repeat ratios); other processes kept "
          f"{100 * e['other_processes_cpu']:.0f}% of the CPUs busy")
    print(format_deploy(result))
    if args.json_path:
        config = {k: v for k, v in vars(args).items() if k not in ("peaks", "cpu_start")}
        with open(args.json_path, "w") as f:
            json.dump({"config": config, "env": e, "peak_flops": args.peaks, **result}, f, indent=2)
    return 0


def _error(message: str) -> int:
    print(f"vit bench: {message}", file=sys.stderr)
    return 2
