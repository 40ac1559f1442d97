"""The README's worked plugin package, ``examples/qbench-acme`` (a calibrating PTQ method, a scorer and a
packaged suite), is pip-installed into a temporary folder and used as an outside author would: listed with
its distribution and version, evaluated with the real CLI, and run through ``pytest --qbench-conformance``
in a copy of its own folder; installing it changes no built-in configuration hash."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "qbench-acme"
README_FILES = (
    ("toml", "[project.entry-points.qbench]", "pyproject.toml"),
    ("python", "def qbench_register_quantizers", "qbench_acme/plugin.py"),
    ("yaml", "name: acme-toy-ood", "qbench_acme/acme-toy-ood.yaml"),
)


def readme_block(language: str, must_contain: str) -> str:
    blocks = re.findall(rf"```{language}\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    matching = [block for block in blocks if must_contain in block]
    assert len(matching) == 1, f"README must hold exactly one {language} block containing {must_contain!r}"
    return matching[0]


@pytest.mark.parametrize("language, marker, relative", README_FILES)
def test_the_readme_shows_the_example_package_verbatim(language, marker, relative):
    assert readme_block(language, marker) == (EXAMPLE / relative).read_text()


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    """pip-install the example package (no network: --no-deps, no build isolation) into its own folder."""
    source = tmp_path_factory.mktemp("source") / "qbench-acme"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    site = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(site), str(source)],
        check=True, capture_output=True, text=True,
    )
    assert (site / "qbench_acme-0.1.0.dist-info" / "entry_points.txt").is_file()
    assert (site / "qbench_acme" / "acme-toy-ood.yaml").is_file()  # package data shipped
    return site


def environment(site: Path | None, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "QBENCH_STORE": str(tmp_path / "store.sqlite"), "QBENCH_CACHE": str(tmp_path / "cache"),
           "COLUMNS": "200", "OMP_NUM_THREADS": "1", **extra}
    env.pop("PYTHONPATH", None)
    if site is not None:
        env["PYTHONPATH"] = str(site)
    return env


def run_qbench(env: dict[str, str], *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qbench", *args], capture_output=True, text=True, env=env,
                          timeout=900, cwd=cwd)


def test_installed_items_are_listed_with_their_distribution_and_version(plugin_site, tmp_path):
    listed = run_qbench(environment(plugin_site, tmp_path), "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert "warning" not in listed.stderr
    items = json.loads(listed.stdout)
    ours = {(kind, item["name"]): (item["distribution"], item["version"])
            for kind, entries in items.items() for item in entries if item["distribution"] == "qbench-acme"}
    assert ours == {("quantizers", "acme-percentile"): ("qbench-acme", "0.1.0"),
                    ("scorers", "max-logit"): ("qbench-acme", "0.1.0"),
                    ("suites", "acme-toy-ood"): ("qbench-acme", "0.1.0")}
    assert any(item["name"] == "minmax" and item["distribution"] == "qbench" for item in items["quantizers"])


def test_the_calibrating_method_scorer_and_suite_evaluate(plugin_site, tmp_path):
    result = run_qbench(environment(plugin_site, tmp_path), "eval", "--quantizer", "acme-percentile",
                        "--bits", "w8a8", "--suite", "acme-toy-ood", "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    config = document["config"]
    assert config["quantizer_params"] == {"percentile": 99.99, "n_calibration": 256, "batch_size": 32}
    assert config["plugins"] == {"quantizers:acme-percentile": "qbench-acme==0.1.0",
                                 "scorers:max-logit": "qbench-acme==0.1.0", "suites:acme-toy-ood": "qbench-acme==0.1.0"}
    assert config["proxy"] and config["proxy_n"] > 0  # a calibrating method is given proxy pairs
    assert document["verification"]["passed"]
    assert document["quantizer_provenance"]["calibration"]  # the calibration pass ran
    assert {record["scorer"] for record in document["results"] if record["task"] == "ood"} == {"max-logit", "msp"}
    accuracy = next(record for record in document["results"] if record["metric"] == "accuracy")
    assert accuracy["quantized"] > 0.5  # a working 8-bit model, far above the 10% of chance


def test_a_bad_hyperparameter_is_one_line_before_anything_runs(plugin_site, tmp_path):
    result = run_qbench(environment(plugin_site, tmp_path), "eval", "--quantizer", "acme-percentile",
                        "--qparam", "percentile=40", "--suite", "acme-toy-ood")
    assert result.returncode == 2
    assert result.stderr.strip() == "qbench: acme-percentile.percentile must be in (50.0, 100.0], got 40.0"


def test_the_package_passes_the_conformance_kit_in_its_own_folder(plugin_site, tmp_path):
    """An author's checkout: the package folder without qbench's tests, fixtures or source tree."""
    folder = tmp_path / "author" / "qbench-acme"
    shutil.copytree(EXAMPLE, folder, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    assert not list(folder.rglob("test_*.py"))
    result = subprocess.run([sys.executable, "-m", "pytest", "--qbench-conformance", "-q", "-p", "no:cacheprovider",
                             "-rA"], capture_output=True, text=True, cwd=folder, timeout=900,
                            env=environment(plugin_site, tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    for item in ("quantizer:acme-percentile", "scorer:max-logit", "suite:acme-toy-ood"):
        assert re.search(rf"PASSED \S*\[{re.escape(item)}\]", result.stdout), (item, result.stdout[-3000:])
    assert re.search(r"\b3 passed\b", result.stdout)


HASHES = """
from qbench.engine.evaluate import EvalRequest, resolve
from qbench.registry import build_registry
registry = build_registry()
for suites in (("toy-id",), ("toy-ood",), ("robustness",)):
    config = resolve(EvalRequest(suites=suites), registry).config
    print(suites[0], config["config_hash"], "plugins" in config)
"""


def test_installing_the_package_changes_no_builtin_configuration_hash(plugin_site, tmp_path):
    def hashes(site: Path | None) -> str:
        env = environment(site, tmp_path, QBENCH_DISABLE_PLUGINS="" if site else "qbench-acme")
        result = subprocess.run([sys.executable, "-c", HASHES], capture_output=True, text=True, env=env, timeout=600)
        assert result.returncode == 0, result.stderr
        return result.stdout

    with_package, without = hashes(plugin_site), hashes(None)
    assert with_package == without
    assert "True" not in without  # built-in runs carry no plugin identities


def test_without_the_package_its_names_are_unknown(tmp_path):
    env = environment(None, tmp_path, QBENCH_DISABLE_PLUGINS="qbench-acme")  # also when installed in the venv
    result = run_qbench(env, "eval", "--quantizer", "acme-percentile")
    assert result.returncode == 2
    assert result.stderr.startswith("qbench: ") and "available" in result.stderr
    assert "Traceback" not in result.stderr
