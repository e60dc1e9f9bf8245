"""``vit bench``: a launcher for the benchmark, a tool that lives in the source checkout (``tools/bench/``).

It finds the checkout this package was imported from and runs the harness there, the same as
``python tools/benchmark.py``. FLOP counting, which ``vit plan`` shares, is library code in ``vit.flops``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import vit

TOOLS_DIR = Path(vit.__file__).resolve().parents[1] / "tools"
HARNESS = "bench"  # tools/bench, imported under this name


def main(argv: list[str] | None = None) -> int:
    """Run the checkout's harness with ``argv`` and return its exit status; 2 and one line when there is none."""
    folder = TOOLS_DIR / HARNESS
    if not (folder / "__init__.py").is_file():
        print(f"vit bench: error: the benchmark ships with the source checkout, not the installed package ({folder} "
              "is missing); in a checkout run `python tools/benchmark.py --help`, or `pip install -e .` there",
              file=sys.stderr)
        return 2
    return _harness(folder).main(argv)


def _harness(folder: Path) -> ModuleType:
    """The harness's command module, with ``folder`` imported as a package (tools/ is not put on sys.path)."""
    if HARNESS not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            HARNESS, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot import the benchmark harness from {folder}")
        package = importlib.util.module_from_spec(spec)
        sys.modules[HARNESS] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"{HARNESS}.command")


if __name__ == "__main__":
    sys.exit(main())
