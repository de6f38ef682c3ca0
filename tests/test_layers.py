"""The package's import rule (docs/architecture.md), checked on the source of every module:
each layer imports only the layers below it, modules import each other without cycles, and
imports sit at module top except in the CLI and for optional dependencies."""

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1] / "turbo"

# Lowest first; packages on one row are peers and do not import each other.
LAYERS: list[tuple[str, ...]] = [
    ("core",),
    ("merging",),
    ("models", "kernels"),
    ("graph", "data"),
    ("quant",),
    ("runtimes",),
    ("export",),
    ("serving",),
    ("tools",),
    ("cli",),
]
RANK = {package: rank for rank, row in enumerate(LAYERS) for package in row}
LAZY_ALLOWED = ("cli",)  # start-up speed: `turbo --help` imports no torch
OPTIONAL = ("tensorrt", "triton", "datasets", "pycocoevalcap", "matplotlib", "tritonclient",
            "triton_python_backend_utils")  # loaded where used (the last: only inside tritonserver)


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name
    imported: str  # dotted module name (for `from a import b`, a.b when a.b is a module, else a)
    line: int
    top_level: bool


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def parse_imports(path: Path, root: Path, modules: set[str]) -> list[Import]:
    name = module_name(path, root)
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                       for alias in node.names]
        else:
            continue
        found += [Import(name, target, node.lineno, id(node) in top) for target in targets]
    return found


def package_of(module: str) -> str | None:
    """The layer package of a turbo module (`python -m turbo` belongs to the CLI); None outside turbo."""
    parts = module.split(".")
    if len(parts) < 2 or parts[0] != "turbo":
        return None
    return "cli" if parts[1] == "__main__" else parts[1]


def upward_imports(imports: list[Import]) -> list[str]:
    problems = []
    for imp in imports:
        source, target = package_of(imp.importer), package_of(imp.imported)
        if source is None or target is None or source == target:
            continue
        if RANK[target] >= RANK[source]:
            problems.append(f"{imp.importer}:{imp.line} imports {imp.imported} ({source} may not import {target})")
    return problems


def cycles(imports: list[Import]) -> list[list[str]]:
    """Every strongly connected group of more than one turbo module (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for imp in imports:
        if imp.imported.startswith("turbo.") and imp.imported != imp.importer:
            graph.setdefault(imp.importer, set()).add(imp.imported)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def optional_modules(imports: list[Import]) -> set[str]:
    """turbo modules that import an optional dependency at their top: they are loaded lazily too."""
    return {imp.importer for imp in imports if imp.top_level and imp.imported.split(".")[0] in OPTIONAL}


def lazy_imports(imports: list[Import]) -> list[str]:
    optional = optional_modules(imports)
    return [f"{imp.importer}:{imp.line} imports {imp.imported} inside a function"
            for imp in imports
            if not imp.top_level and package_of(imp.importer) not in LAZY_ALLOWED
            and imp.imported.split(".")[0] not in OPTIONAL and imp.imported not in optional]


def all_imports(root: Path) -> list[Import]:
    paths = sorted(root.rglob("*.py"))
    modules = {module_name(path, root) for path in paths}
    return [imp for path in paths for imp in parse_imports(path, root, modules)]


def test_every_package_has_a_layer():
    packages = {path.name for path in ROOT.iterdir() if (path / "__init__.py").is_file()}
    assert packages == set(RANK)


def test_no_package_imports_one_above_it():
    assert upward_imports(all_imports(ROOT)) == []


def test_no_import_cycles():
    assert cycles(all_imports(ROOT)) == []


def test_imports_at_module_top():
    assert lazy_imports(all_imports(ROOT)) == []


@pytest.fixture
def broken_tree(tmp_path) -> Path:
    """A made-up package that breaks each rule once."""
    root = tmp_path / "turbo"
    files = {
        "__init__.py": "",
        "core/__init__.py": "",
        "core/errors.py": "from turbo.models import registry\n",  # upward
        "models/__init__.py": "",
        "models/registry.py": "import turbo.models.loading\n",
        "models/loading.py": "from turbo.models import registry\n",  # cycle with registry
        "kernels/__init__.py": "",
        "kernels/fused.py": "def f():\n    import torch\n    import triton\n",  # torch lazily; triton allowed
        "cli/__init__.py": "",
        "cli/app.py": "def main():\n    import turbo.models.registry\n",  # allowed in the CLI
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_the_rules_catch_each_breach(broken_tree):
    imports = all_imports(broken_tree)
    assert upward_imports(imports) == [
        "turbo.core.errors:1 imports turbo.models.registry (core may not import models)"]
    assert cycles(imports) == [["turbo.models.loading", "turbo.models.registry"]]
    assert lazy_imports(imports) == ["turbo.kernels.fused:2 imports torch inside a function"]
