"""``pytest --qbench-conformance`` as a plugin author runs it: in a folder holding no test file, with a third-party
package importable through ``PYTHONPATH`` and discovered through its ``*.dist-info`` entry points. Its quantizer,
scorer, suite, model and dataset are checked and pass; a deliberately broken scorer fails with a readable line; with no
third-party item the run says so in one skipped test; without the flag the plugin does nothing and imports no
torch. (This is discovery, so the registry here is built with entry points.)"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from importlib.metadata import distributions
from pathlib import Path

import pytest

ACME_MODULE = '''
"""acme-qbench: a third-party qbench plugin with a quantizer, a scorer, a suite, a model and a dataset."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qbench.data import DatasetSpec
from qbench.errors import QbenchError
from qbench.hookspecs import hookimpl
from qbench.model import ModelSpec
from qbench.quant.base import QuantizedModel, Quantizer, QuantizerConfig
from qbench.quant.calibrate import freeze_quantizers
from qbench.quant.layout import QuantLayout
from qbench.quant.modules import (
    make_activation_quantizer, make_weight_quantizer, quantize_modules, rewrite_tower_attention,
)
from qbench.scoring import ScoreInputs, Scorer
from qbench.suites import parse_suite
from qbench.testing import tiny_family_vlm


@dataclass(frozen=True)
class TokenConfig(QuantizerConfig):
    """Weights per output channel or per tensor."""

    weight_granularity: str = "per_channel"


class AcmeToken(Quantizer):
    """Static weights, activations quantized per token at run time (no calibration data)."""

    name = "acme-token"
    family = "ptq"
    citation = "acme, 2026"
    summary = "static weights, dynamic per-token activations"
    needs_data = False
    Config = TokenConfig

    def quantize(self, model, bits, scope, calibration, seed):
        rewrite_tower_attention(model, scope.towers)
        wrapped = quantize_modules(
            model, scope.towers,
            lambda name, module: make_weight_quantizer(bits.weight_bits, self.config.weight_granularity),
            lambda name, module: make_activation_quantizer(bits.act_bits, "per_token"),
        )
        freeze_quantizers(model.model)
        model.clear_caches()
        return QuantizedModel(model, provenance={"modules": len(wrapped)})

    def verification_layout(self, bits):
        return QuantLayout(weight=self.config.weight_granularity, linear_input="per_token", conv_input="per_token")


class AcmeMargin(Scorer):
    """Gap between the best and the second-best ID cosine."""

    name = "acme-margin"
    citation = "acme, 2026"
    summary = "top-1 minus top-2 cosine to the ID classes"

    def score(self, inputs: ScoreInputs, prepared=None) -> np.ndarray:
        cosines = np.sort(inputs.cosines(), axis=1)
        return cosines[:, -1] - cosines[:, -2]


def load_acme_tiny(request):
    """A tiny random CLIP; a weights file must exist."""
    if request.weights and not Path(request.weights).is_file():
        raise QbenchError(f"acme-tiny weights not found at {request.weights}; pass --weights with an existing file")
    return tiny_family_vlm("clip")


def load_acme_folder(request):
    """Images of one class below <data root>/acme/ (never present in this test)."""
    where = "no data root" if request.data_root is None else f"{request.data_root}/acme/ is missing"
    raise QbenchError(f"dataset 'acme-folder': {where}; pass --data-root DIR (or set QBENCH_DATA) with acme/*.png")


@hookimpl
def qbench_register_quantizers():
    return [AcmeToken]


@hookimpl
def qbench_register_models():
    return [ModelSpec(name="acme-tiny", family="clip", arch="qbench-tiny-vit", weights_tag="acme-random-v1",
                      pretraining_data="none", description="tiny random CLIP", citation="acme, 2026",
                      loader=load_acme_tiny)]


@hookimpl
def qbench_register_datasets():
    return [DatasetSpec(name="acme-folder", role="ood", description="acme images", citation="acme, 2026",
                        loader=load_acme_folder)]


@hookimpl
def qbench_register_scorers():
    return [AcmeMargin]


@hookimpl
def qbench_register_suites():
    return [parse_suite({"name": "acme-ood", "version": 1, "description": "toy ID vs far OOD, acme's scorer",
                         "tasks": [{"type": "ood", "id_dataset": "toy-id-test",
                                    "ood_datasets": [{"dataset": "toy-ood-far", "kind": "far"}],
                                    "scorers": ["acme-margin"]}]}, source="acme")]
'''

BROKEN_MODULE = '''
"""acme-broken: a scorer that returns NaN for images far from every ID class."""

import numpy as np

from qbench.hookspecs import hookimpl
from qbench.scoring import Scorer


class AcmeNaN(Scorer):
    name = "acme-nan"
    citation = "acme, 2026"
    summary = "max cosine, NaN when no class is close"

    def score(self, inputs, prepared=None):
        best = inputs.cosines().max(axis=1)
        return np.where(best > 0.5, best, np.nan)


@hookimpl
def qbench_register_scorers():
    return [AcmeNaN]
'''


def install(site: Path, distribution: str, module: str, source: str) -> None:
    """Make ``module`` importable from ``site`` with a ``*.dist-info`` declaring its ``qbench`` entry point, as
    pip would leave it (no pip run needed)."""
    (site / f"{module}.py").write_text(textwrap.dedent(source), encoding="utf-8")
    info = site / f"{distribution.replace('-', '_')}-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 0.1.0\n", encoding="utf-8")
    (info / "entry_points.txt").write_text(f"[qbench]\n{module} = {module}\n", encoding="utf-8")


def installed_plugin_distributions() -> list[str]:
    """Distributions with a ``qbench`` entry point installed in this environment (not the test's own)."""
    from importlib.metadata import entry_points

    return sorted({point.dist.name for point in entry_points(group="qbench") if point.dist is not None})


def run_pytest(folder: Path, site: Path | None, *args: str) -> subprocess.CompletedProcess:
    """``python -m pytest ARGS`` in ``folder``, with ``site`` on PYTHONPATH and an isolated qbench store/cache."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("PYTEST_", "QBENCH_")) and key != "PYTHONPATH"}
    env.update({"QBENCH_STORE": str(folder.parent / "store.sqlite"), "QBENCH_CACHE": str(folder.parent / "cache"),
                "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "250"})
    if site is not None:
        env["PYTHONPATH"] = str(site)
    installed = installed_plugin_distributions()
    if installed:  # packages installed in this environment (the README's example) are not this test's subject
        env["QBENCH_DISABLE_PLUGINS"] = ",".join(installed)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def pytest_plugin_installed():
    """Fail early, naming the fix, when qbench's pytest11 entry point is not installed."""
    # every distribution, as pytest (pluggy) reads them: a stale ``qbench.egg-info`` in a checkout may shadow
    # the installed metadata in the de-duplicated ``entry_points()`` view
    points = [point for dist in distributions() for point in dist.entry_points if point.group == "pytest11"]
    if not any(point.value == "qbench.testing.pytest_plugin" for point in points):
        pytest.fail("qbench's pytest11 entry point is missing: reinstall qbench (pip install -e .)")


@pytest.fixture
def empty_folder(tmp_path) -> Path:
    """The author's repository: a folder with no test file."""
    folder = tmp_path / "author-repo"
    folder.mkdir()
    return folder


def test_third_party_items_pass_and_a_broken_scorer_fails(pytest_plugin_installed, empty_folder, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    install(site, "acme-qbench", "acme_qbench", ACME_MODULE)
    install(site, "acme-broken", "acme_broken", BROKEN_MODULE)
    result = run_pytest(empty_folder, site, "--qbench-conformance", "-v", "-rA")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    for item in ("quantizer:acme-token", "scorer:acme-margin", "suite:acme-ood", "model:acme-tiny",
                 "dataset:acme-folder"):
        assert f"conformance_tests.py::test_conformance[{item}] PASSED" in output, output
    assert "conformance_tests.py::test_conformance[scorer:acme-nan] FAILED" in output, output
    assert ("scorer 'acme-nan': score() returned 24 non-finite score(s) (NaN or inf) of 24 on OOD images; "
            "every score must be a finite number") in output, output
    assert "qbench conformance: 6 third-party plugin item(s) to check" in output  # built-ins are not checked
    assert "minmax" not in output
    assert "Traceback" not in output


def test_without_third_party_items_the_run_says_so_beside_the_authors_tests(pytest_plugin_installed, empty_folder):
    (empty_folder / "test_mine.py").write_text("def test_mine():\n    assert True\n", encoding="utf-8")
    result = run_pytest(empty_folder, None, "--qbench-conformance", "-rs")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "1 passed, 1 skipped" in output and "no third-party qbench plugin item is installed" in output, output


def test_without_the_flag_nothing_is_collected_and_torch_is_not_imported(pytest_plugin_installed, empty_folder):
    probe = ("import sys, pytest; code = pytest.main(['-q', '-p', 'no:cacheprovider']); "
             "print('exit', int(code), 'torch' in sys.modules, 'qbench.testing.pytest_plugin' in sys.modules)")
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST_")}
    result = subprocess.run([sys.executable, "-c", probe], cwd=empty_folder, env=env, capture_output=True, text=True,
                            timeout=300)
    assert "exit 5 False True" in result.stdout, result.stdout + result.stderr  # 5: no tests collected


def test_importing_the_kit_is_light():
    probe = ("import sys, qbench.testing, qbench.testing.pytest_plugin; "
             "print(sorted(m for m in ('torch', 'open_clip', 'scipy', 'sklearn') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


def test_selection_separates_builtins_from_installed_items():
    from qbench.plugins import get_plugin_manager
    from qbench.registry import build_registry
    from qbench.testing import conformance_entries, is_builtin

    registry = build_registry(get_plugin_manager(load_entrypoints=False))
    assert conformance_entries(registry) == []
    every = conformance_entries(registry, include_builtins=True)
    assert {kind for kind, _ in every} == {"quantizers", "scorers", "suites", "models", "datasets"}
    assert all(is_builtin(entry) for _, entry in every)
