"""The package's layers only import downwards (docs/architecture.md).

Bottom to top: ``config`` and ``backends`` (definitions: dtype tables, layouts, option
dataclasses, backend resolution) → ``reference`` (the float64 ground truth) → ``ops`` (the
public functions and custom ops) → ``sampling`` → ``integrations``, ``bench``, ``demo``, ``cli``.
The Triton kernels (``kernels/``) import only triton and the standard library. Every ``import``
statement is checked, including those inside functions, so a lazy import cannot hide an arrow
that runs back up.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "python" / "rlkern"

#: Layer of each first-level module of rlkern; a module may import its own layer or lower ones.
LAYERS = {
    "_C": 0, "config": 0, "backends": 0, "nvcc": 0, "kernels": 0,
    "reference": 1,
    "ops": 2,
    "sampling": 3,
    "integrations": 4, "bench": 4, "demo": 4, "aot": 4, "cli": 4, "__main__": 4,
    "gpu_check": 4,
}


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    package = ".".join(("rlkern", *path.relative_to(PACKAGE).with_suffix("").parts[:-1]))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            if module == "rlkern":  # `from rlkern import _C` names a submodule, not the facade
                found += [(node.lineno, f"rlkern.{a.name}" if a.name in LAYERS else module)
                          for a in node.names]
            else:
                found.append((node.lineno, module))
    return found


def _layer_of(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "rlkern":
        return None
    if len(parts) == 1:
        return 4  # the package root is the public API, a facade for the top layer
    return LAYERS[parts[1]]


SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if "kernels" not in p.relative_to(PACKAGE).parts)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path: Path) -> None:
    own = path.relative_to(PACKAGE).with_suffix("").parts
    if own == ("__init__",):
        return
    level = LAYERS[own[0]]
    upward = [
        f"{path.relative_to(ROOT)}:{line} imports {module} (layer {_layer_of(module)} > {level})"
        for line, module in _imports(path)
        if (_layer_of(module) or 0) > level
    ]
    assert not upward, "\n".join(upward)


def test_every_module_has_a_layer() -> None:
    tops = {p.relative_to(PACKAGE).with_suffix("").parts[0] for p in PACKAGE.rglob("*.py")}
    assert tops - {"__init__"} <= set(LAYERS), sorted(tops - set(LAYERS))


@pytest.mark.parametrize("path", sorted((ROOT / "kernels").glob("*.py")), ids=lambda p: p.name)
def test_triton_kernels_import_only_triton(path: Path) -> None:
    allowed = {"triton", "rlkern", "__future__", *sys.stdlib_module_names}
    bad = [f"{path.name}:{line} imports {m}" for line, m in _imports_plain(path)
           if m.split(".")[0] not in allowed or (m.startswith("rlkern.") and not
           m.startswith("rlkern.kernels"))]
    assert not bad, "\n".join(bad)


def _imports_plain(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.lineno, "rlkern.kernels" if node.level else node.module or ""))
    return out
