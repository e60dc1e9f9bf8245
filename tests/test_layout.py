"""The package's shape: imports point one way (layers ← models ← export/train ← cli), no cycles, no private
Lightning attributes outside the one adapter, and importing the library has no side effects on its user."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import lightning
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vit"
ADAPTER = "vit.train.lightning_private"
# what each sub-package may import from vit (besides itself and vit.version) and which libraries it must not
ALLOWED = {
    "vit.layers": (set(), ("lightning", "albumentations", "safetensors", "wandb", "matplotlib")),
    "vit.models": ({"vit.layers"}, ("lightning", "albumentations", "safetensors", "wandb", "matplotlib")),
    "vit.export": ({"vit.layers", "vit.models"}, ("lightning", "albumentations", "wandb", "matplotlib")),
    "vit.data": (set(), ("vit.models", "wandb")),
    "vit.train": ({"vit.layers", "vit.models", "vit.export", "vit.data", "vit.flops"}, ()),
}


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
            for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path) -> set[str]:
    """Every module ``name`` imports, at any depth of its code (function-level imports count too)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module if node.level == 0 else _resolve(name, path, node)
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return found


def _resolve(name: str, path: Path, node: ast.ImportFrom) -> str:
    parts = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    return ".".join(parts[: len(parts) - node.level + 1] + [node.module])


def _ours(imported: set[str], modules: dict[str, Path]) -> set[str]:
    return {m for m in imported if m in modules}


def test_imports_point_one_way() -> None:
    modules = _modules()
    problems = []
    for name, path in modules.items():
        package = ".".join(name.split(".")[:2])
        if package not in ALLOWED:
            continue
        may, never = ALLOWED[package]
        imported = _imports(name, path)
        for dep in _ours(imported, modules):
            dep_package = ".".join(dep.split(".")[:2])
            if dep_package not in may | {package, "vit.version", "vit.errors"}:  # errors: every layer raises them
                problems.append(f"{name} imports {dep}")
        problems += [f"{name} imports {m}" for m in imported if m.split(".")[0] in never or m in never]
    assert not problems, "\n".join(sorted(problems))


def test_no_import_cycles() -> None:
    modules = _modules()
    graph = {name: {d for d in _ours(_imports(name, path), modules) if d != name and not name.startswith(d + ".")}
             for name, path in modules.items()}
    # a package's __init__ re-exporting its own modules is not a cycle of ideas: look through it
    for name in graph:
        graph[name] = {d for d in graph[name] if not (name.startswith(d + ".") or d == "vit")}
    seen: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        seen[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if seen.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in seen and (cycle := visit(dep)):
                return cycle
        seen[node] = 2
        stack.pop()
        return None

    for name in sorted(graph):
        if name not in seen and (cycle := visit(name)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def _lightning_private_names() -> set[str]:
    names = set()
    for path in Path(lightning.__file__).parent.rglob("*.py"):
        text = path.read_text(errors="ignore")
        names |= set(re.findall(r"self\.(_[a-z]\w*)\s*[:=]", text))
        names |= set(re.findall(r"def (_[a-z]\w*)\(self", text))
    return names


def test_no_private_lightning_attributes_outside_the_adapter() -> None:
    private = _lightning_private_names()
    problems = []
    for name, path in _modules().items():
        if name == ADAPTER:
            continue
        text = path.read_text()
        own = set(re.findall(r"self\.(_[a-z]\w*)\s*[:=]", text)) | set(re.findall(r"def (_[a-z]\w*)\(", text))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(("lightning", "wandb")):
                problems += [f"{name}: imports {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
            if isinstance(node, ast.Attribute) and node.attr in private:
                owner = node.value.id if isinstance(node.value, ast.Name) else None
                # on self: a Lightning base class's private attribute, unless this file defines its own
                if owner not in ("self", "cls") or node.attr not in own:
                    problems.append(f"{name}:{node.lineno} uses .{node.attr}")
    assert not problems, "\n".join(problems)


def test_importing_the_library_changes_nothing_for_its_user() -> None:
    code = ("import matplotlib, logging, warnings; before = matplotlib.get_backend(); n = len(warnings.filters); "
            "import vit, vit.train, vit.export, vit.data; "
            "assert matplotlib.get_backend() == before, (before, matplotlib.get_backend()); "
            "assert not logging.getLogger().handlers; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
