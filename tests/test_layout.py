"""The package layout shows the architecture: each layer of ``qbench/`` imports only the layers below it.

Layers, bottom up: the core, i.e. the contracts and registry (top-level modules: hook specs, registry, the
plugin contracts, the public API, errors, atomic files) with the quantization primitives they define
(``qbench.quant``); analysis (pure functions over arrays); the engine (resolve, encode once, run, store,
sweep); reporting (plots, reports, leaderboard); the command line. ``qbench.testing`` (the conformance kit)
may use everything. Imports needed only for type annotations (``if TYPE_CHECKING:``) do not count, and
:data:`ALLOWED` lists the justified exceptions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "qbench"
ORDER = ("core", "analysis", "engine", "reporting", "cli", "testing")
SUBPACKAGES = {"analysis", "engine", "reporting", "cli", "testing"}  # qbench.quant belongs to the core
ENTRY_MODULES = {"qbench.__main__"}  # ``python -m qbench`` starts the command line
ALLOWED = {
    ("qbench.tasks", "qbench.engine.task_scoring"):
        "the task-type contract's record builders (paired_record, value_record) call the engine's record code "
        "lazily, so the record schema has one implementation",
}


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "qbench":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in SUBPACKAGES else "core"


def module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    return ".".join(part for part in relative.parts if part != "__init__")


def runtime_imports(tree: ast.AST) -> list[str]:
    """Every module imported at run time (module level or inside functions), skipping ``if TYPE_CHECKING:``."""
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.extend([node.module] + [f"{node.module}.{alias.name}" for alias in node.names])
        elif isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def upward_imports() -> list[str]:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        if module in ENTRY_MODULES:
            continue
        source_layer = layer_of(module)
        for imported in runtime_imports(ast.parse(path.read_text())):
            target_layer = layer_of(imported)
            allowed = any(module == source and imported.startswith(target) for source, target in ALLOWED)
            if target_layer and ORDER.index(target_layer) > ORDER.index(source_layer) and not allowed:
                problems.append(f"{module} ({source_layer}) imports {imported} ({target_layer})")
    return sorted(set(problems))


def test_every_layer_imports_only_the_layers_below_it():
    assert upward_imports() == []


def test_the_layers_exist_as_subpackages():
    for layer in SUBPACKAGES:
        assert (PACKAGE / layer / "__init__.py").is_file(), layer
    assert (PACKAGE / "hookspecs.py").is_file() and (PACKAGE / "api.py").is_file()


@pytest.mark.parametrize("source, imported", [("qbench.analysis.metrics", "qbench.engine.store"),
                                              ("qbench.quant.base", "qbench.engine.store")])
def test_the_check_sees_an_upward_import(source, imported):
    assert ORDER.index(layer_of(imported)) > ORDER.index(layer_of(source))
    tree = ast.parse(f"def f():\n    from {imported} import x\n")
    assert f"{imported}.x" in runtime_imports(tree)
