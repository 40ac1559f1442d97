"""The declared public API: ``qbench.api`` names what plugin authors import, and each name's own module
declares it in ``__all__``; the example plugin package imports nothing else from qbench."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import qbench.api as api

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "qbench-acme"


@pytest.mark.parametrize("name", api.__all__)
def test_every_public_name_resolves_and_is_declared_by_its_module(name):
    module_name = api._MODULE_OF[name]
    module = importlib.import_module(module_name)
    assert getattr(api, name) is getattr(module, name)
    assert name in getattr(module, "__all__", ()), f"{module_name}.__all__ must declare {name}"


def test_an_unknown_name_says_where_the_api_is_listed():
    with pytest.raises(AttributeError, match=r"qbench\.api\.__all__"):
        api.NoSuchThing  # noqa: B018


def test_importing_the_api_is_free_until_a_name_is_used():
    """A plugin module importing qbench.api at the top must not make 'qbench --help' import torch; the contracts
    a plugin subclasses at registration (Quantizer, PTQQuantizer) are torch-free too, a torch-side name is not."""
    code = ("import sys, qbench.api; print('torch' in sys.modules); qbench.api.Quantizer; qbench.api.PTQQuantizer; "
            "print('torch' in sys.modules); qbench.api.TensorQuantizer; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False", "True"]


def test_the_example_package_imports_only_the_public_api():
    for path in EXAMPLE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "qbench":
                assert node.module in ("qbench.api", "qbench.testing"), f"{path.name} imports {node.module}"
            if isinstance(node, ast.Import):
                assert not any(alias.name.split(".")[0] == "qbench" for alias in node.names), path.name
