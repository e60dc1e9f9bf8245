"""AOTInductor packages: the network exported with a dynamic batch and compiled ahead of time for this machine.

``model.pt2`` holds compiled C++ kernels for the exporting CPU's instruction set (or GPU) and this torch version,
the weights frozen in (constant-folded, pre-packed for oneDNN). Load it with
``torch._inductor.aoti_load_package(path)`` (or ``load_package`` here): a callable, images → outputs, with
no Python model code. Compiling takes a minute or more on a CPU; running it is the fastest deployable path.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from vit.export.folder import CONFIG_NAME
from vit.export.verify import ExportReport, check, sample_images

TRACE_BATCH = 2  # the example batch: neither checked size, so the batch is not specialised
PACKAGE_NAME = "model.pt2"
# freezing folds the weights into the graph as constants and lets inductor pre-pack them for oneDNN / mkldnn
INDUCTOR_CONFIGS: dict[str, Any] = {"freezing": True}


class _Job(Protocol):
    models: dict[tuple[int, int], nn.Module]
    out: Path
    report: ExportReport

    @property
    def first(self) -> nn.Module: ...

    def config(self, model: nn.Module, fmt: str, **extra: Any) -> dict[str, Any]: ...


def compile_package(model: nn.Module, example: torch.Tensor, path: str | Path) -> Path:
    """``torch.export`` ``model`` on ``example`` with a dynamic batch, compile it with AOTInductor into ``path``."""
    with torch.no_grad():
        program = torch.export.export(model.eval(), (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                                      strict=False)
        return Path(torch._inductor.aoti_compile_and_package(program, package_path=str(path),
                                                            inductor_configs=dict(INDUCTOR_CONFIGS)))


def load_package(path: str | Path) -> Any:
    """The compiled network of an AOTInductor package (a ``.pt2`` file, or a folder ``vit export`` wrote)."""
    path = Path(path)
    if path.is_dir():
        path = path / PACKAGE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no AOTInductor package at {path}")
    return torch._inductor.aoti_load_package(str(path))


def compiled_for() -> dict[str, str]:
    """What a package compiled here needs from the machine that loads it: CPU instruction set, torch, platform."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    return {"cpu_vec_isa": str(pick_vec_isa()) or "none", "torch": torch.__version__,
            "platform": f"{platform.system()}-{platform.machine()}"}


def write_aoti(job: _Job) -> None:
    """The ``aoti`` format: one package per image size (``model.pt2`` for the first), each re-run and compared."""
    files = {}
    target = compiled_for()
    for i, (size, model) in enumerate(job.models.items()):
        path = job.out / (PACKAGE_NAME if i == 0 else f"model_{_fmt(size)}.pt2")
        t0 = time.perf_counter()
        compile_package(model, sample_images(model, TRACE_BATCH, size), path)
        job.report.write_seconds += time.perf_counter() - t0
        files[_fmt(size)] = path.name
        job.report.files.append(path)
        t0 = time.perf_counter()
        check(job.report, f"torch._inductor.aoti_load_package {_fmt(size)}", model, load_package(path), size)
        job.report.check_seconds += time.perf_counter() - t0
    job.report.notes.append(f"compiled for this machine ({target['cpu_vec_isa']}, torch {target['torch']}): "
                            f"load it with torch._inductor.aoti_load_package on the same CPU kind and torch")
    extra = {"files": files, "output_name": "logits" if job.first.num_classes else "features",
             "dynamic_axes": ["batch"], "compiled_for": target}
    path = job.out / CONFIG_NAME
    path.write_text(json.dumps(job.config(job.first, "aoti", **extra), indent=2) + "\n")
    job.report.files.append(path)


def _fmt(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"
