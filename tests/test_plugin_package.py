"""A third-party quantizer package, written exactly as the README shows, is installed with pip into a
temporary folder and discovered through the ``qbench`` entry-point group by the real CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def readme_block(language: str, must_contain: str) -> str:
    blocks = re.findall(rf"```{language}\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    matching = [block for block in blocks if must_contain in block]
    assert len(matching) == 1, f"README must hold exactly one {language} block containing {must_contain!r}"
    return matching[0]


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    """pip-install the README's example package (no network: --no-deps, no build isolation)."""
    source = tmp_path_factory.mktemp("qbench-dynamic")
    (source / "pyproject.toml").write_text(readme_block("toml", "[project.entry-points.qbench]"))
    package = source / "qbench_dynamic"
    package.mkdir()
    (package / "__init__.py").write_text(readme_block("python", "def qbench_register_quantizers"))
    site = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(site), str(source)],
        check=True, capture_output=True, text=True,
    )
    assert (site / "qbench_dynamic-0.1.0.dist-info" / "entry_points.txt").is_file()
    return site


def run_qbench(site: Path, *args: str, store: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site), "QBENCH_STORE": str(store), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "qbench", *args], capture_output=True, text=True, env=env, timeout=600)


def test_installed_plugin_is_listed_with_its_package(plugin_site, tmp_path):
    listed = run_qbench(plugin_site, "list", "quantizers", store=tmp_path / "store.sqlite")
    assert listed.returncode == 0, listed.stderr
    assert "dynamic-token" in listed.stdout
    assert "qbench-dynamic (dynamic_token)" in listed.stdout
    assert "minmax" in listed.stdout  # the built-ins are still there


def test_installed_plugin_evaluates_and_verifies(plugin_site, tmp_path):
    result = run_qbench(plugin_site, "eval", "--quantizer", "dynamic-token", "--bits", "w4a8", "--json",
                        store=tmp_path / "store.sqlite")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["config"]["quantizer"] == "dynamic-token"
    assert document["config"]["quantizer_params"] == {"weight_granularity": "per_channel"}
    verification = document["verification"]
    assert verification["passed"] and verification["n_modules"] > 0
    assert all(module["weight_max_unique"] <= 16 for module in verification["modules"])
    accuracy = next(record for record in document["results"] if record["metric"] == "accuracy")
    assert accuracy["quantized"] > 0.5  # a working 4-bit model, far above the 10% of chance


def test_without_the_package_the_name_is_unknown(tmp_path):
    result = run_qbench(tmp_path, "eval", "--quantizer", "dynamic-token", store=tmp_path / "store.sqlite")
    assert result.returncode == 2
    assert result.stderr.startswith("qbench: ") and "available" in result.stderr
    assert "Traceback" not in result.stderr
