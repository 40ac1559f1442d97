"""Validated registration and plugin identity, through real installed-looking distributions.

Each test writes a folder that looks like a pip install (a plugin module next to a ``*.dist-info`` folder
holding ``METADATA`` and ``entry_points.txt``) and puts it on ``sys.path``, so discovery goes through
``importlib.metadata`` exactly as for a pip-installed package. A catalogue of broken plugins must each give
exactly one warning line naming the package while ``qbench list`` keeps working and lists every built-in.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cli_runner import run_cli
from qbench import __version__
from qbench.engine.evaluate import EvalRequest, resolve
from qbench.hookspecs import hookimpl
from qbench.plugins import get_plugin_manager
from qbench.registry import PluginContractError, build_registry, plugin_identities

MODULES = ("acme_plugin", "zeta_plugin", "broken_plugin")

QUANTIZER = '''
from qbench.hookspecs import hookimpl
from qbench.quant.base import Quantizer, QuantizedModel


class AcmeQuantizer(Quantizer):
    """Returns the model unchanged (only its registration matters here)."""

    name = {name!r}
    family = {family!r}
    citation = {citation!r}
    summary = "acme test quantizer"

    def quantize(self, model, bits, scope, calibration, seed):
        return QuantizedModel(model)
'''

VALID = QUANTIZER.format(name="acme-q", family="ptq", citation="Acme et al. 2025") + '''

@hookimpl
def qbench_register_quantizers():
    return [AcmeQuantizer]
'''


def quantizer_module(*, name: str = "acme-q", family: str = "ptq", citation: str = "Acme et al. 2025",
                     returns: str = "[AcmeQuantizer]") -> str:
    """A plugin module registering one quantizer class; ``returns`` is what the hook returns."""
    return QUANTIZER.format(name=name, family=family, citation=citation) + f'''

@hookimpl
def qbench_register_quantizers():
    return {returns}
'''


class Site:
    """Folders on ``sys.path`` laid out like ``pip install --target``: modules plus ``*.dist-info``."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root, self.monkeypatch, self.count = root, monkeypatch, 0

    def install(self, distribution: str, version: str, module: str, source: str, *,
                entry_point: str | None = None) -> Path:
        """Write ``module.py`` and the distribution's metadata in a new folder and put it on ``sys.path``."""
        self.count += 1
        folder = self.root / f"site{self.count}"
        folder.mkdir(parents=True)
        (folder / f"{module}.py").write_text(textwrap.dedent(source))
        info = folder / f"{distribution.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n")
        name = entry_point or module.removesuffix("_plugin")
        (info / "entry_points.txt").write_text(f"[qbench]\n{name} = {module}\n")
        self.monkeypatch.syspath_prepend(str(folder))
        importlib.invalidate_caches()
        return folder

    @property
    def pythonpath(self) -> str:
        """``PYTHONPATH`` for a subprocess: every folder installed so far, newest first (as on ``sys.path``)."""
        return os.pathsep.join(str(self.root / f"site{index}") for index in range(self.count, 0, -1))


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A fresh fake site; the plugin modules are forgotten before and after, so each test imports its own."""
    for name in MODULES:
        monkeypatch.delitem(sys.modules, name, raising=False)
    yield Site(tmp_path / "site", monkeypatch)
    for name in MODULES:
        sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def builtin_names() -> dict[str, set[str]]:
    """Every built-in name per kind (a registry without entry points)."""
    registry = build_registry(get_plugin_manager(load_entrypoints=False))
    return {kind: set(registry.names(kind)) for kind in registry}


def list_json(capsys) -> tuple[int, dict, list[str]]:
    """``qbench list --json`` in-process with a fresh registry: exit code, listing, warning lines."""
    from qbench import cli

    cli.registry.cache_clear()
    try:
        code, out, err = run_cli(capsys, "list", "--json")
    finally:
        cli.registry.cache_clear()
    return code, (json.loads(out) if code == 0 else {}), [line for line in err.splitlines() if line.strip()]


def assert_one_warning(lines: list[str], *fragments: str) -> str:
    """Exactly one stderr line, a qbench warning, holding every fragment; returns it."""
    assert len(lines) == 1, lines
    assert lines[0].startswith("qbench: warning: "), lines
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def assert_builtins_listed(listing: dict, builtin_names: dict[str, set[str]]) -> None:
    """Every built-in of every kind is still listed, as qbench 0.1.0."""
    for kind, names in builtin_names.items():
        listed = {item["name"]: item for item in listing[kind]}
        assert names <= set(listed), (kind, names - set(listed))
        assert all((listed[name]["distribution"], listed[name]["version"]) == ("qbench", __version__)
                   for name in names)


# -- the catalogue of broken plugins --------------------------------------------------------------------
NOT_A_SUBCLASS = '''
from qbench.hookspecs import hookimpl


class Impostor:
    name = "impostor"
    family = "ptq"


@hookimpl
def qbench_register_quantizers():
    return [Impostor]
'''

MISSPELLED = VALID + '''

@hookimpl
def qbench_register_quantizer():
    return [AcmeQuantizer]
'''

CATALOGUE = {
    "not-a-subclass": (NOT_A_SUBCLASS, "quantizer 'impostor' is not a subclass of qbench.quant.base.Quantizer"),
    "wrong-family": (quantizer_module(family="PTQ"), "quantizer 'acme-q' has family 'PTQ'; use one of baseline, ptq, qat"),
    "single-class": (quantizer_module(returns="AcmeQuantizer"),
                     "returned the class acme_plugin.AcmeQuantizer, not a list"),
    "missing-citation": (quantizer_module(citation=""), "quantizer 'acme-q' has no citation"),
    "misspelled-hook": (MISSPELLED, "'qbench_register_quantizer' is not a qbench hook",
                        "did you mean qbench_register_quantizers?"),
    "import-error": ("import qbench_no_such_module_xyz\n", "failed to import",
                     "ModuleNotFoundError: No module named 'qbench_no_such_module_xyz'"),
    "syntax-error": ("def broken(:\n    pass\n", "failed to import", "SyntaxError: "),
    "bad-hook-arguments": (VALID.replace("def qbench_register_quantizers():", "def qbench_register_quantizers(config):"),
                           "failed to register", "PluginValidationError", "'config'"),
    "duplicate-builtin": (quantizer_module(name="minmax"), "quantizer 'minmax' is registered twice",
                          "builtin:qbench_plugins.quantizers.minmax", "the one from qbench is kept"),
}


@pytest.mark.parametrize("case", sorted(CATALOGUE))
def test_broken_plugin_gives_one_warning_naming_its_package(case, site, capsys, builtin_names):
    source, *fragments = CATALOGUE[case]
    site.install("qbench-acme", "0.2", "acme_plugin", source)
    code, listing, lines = list_json(capsys)
    assert code == 0
    line = assert_one_warning(lines, "qbench-acme 0.2", *fragments)
    assert "Traceback" not in line
    assert_builtins_listed(listing, builtin_names)
    if case == "duplicate-builtin":
        minmax = next(item for item in listing["quantizers"] if item["name"] == "minmax")
        assert minmax["builtin"] and minmax["distribution"] == "qbench"
    if case == "misspelled-hook":  # the plugin's correctly spelled hook still works
        acme = next(item for item in listing["quantizers"] if item["name"] == "acme-q")
        assert (acme["distribution"], acme["version"], acme["source"]) == ("qbench-acme", "0.2", "acme")
    else:
        assert {item["distribution"] for kind in listing.values() for item in kind} == {"qbench"}


def test_duplicate_between_packages_keeps_the_first_distribution_in_sorted_order(site, capsys):
    site.install("qbench-zeta", "1.0", "zeta_plugin", VALID.replace("AcmeQuantizer", "ZetaQuantizer"))
    site.install("qbench-acme", "0.2", "acme_plugin", VALID)  # later on the path, but first in sorted order
    code, listing, lines = list_json(capsys)
    assert code == 0
    assert_one_warning(lines, "quantizer 'acme-q' is registered twice", "qbench-acme 0.2 (acme)",
                       "qbench-zeta 1.0 (zeta)", "the one from qbench-acme is kept")
    acme = next(item for item in listing["quantizers"] if item["name"] == "acme-q")
    assert acme["distribution"] == "qbench-acme"


def test_disabled_plugin_is_never_imported(site, capsys, monkeypatch):
    site.install("qbench-acme", "0.2", "acme_plugin", VALID)
    site.install("Broken_Pkg", "1.0", "broken_plugin", "raise RuntimeError('imported although disabled')\n")
    monkeypatch.setenv("QBENCH_DISABLE_PLUGINS", "  broken-pkg ,")
    code, listing, lines = list_json(capsys)
    assert code == 0 and lines == []
    assert "broken_plugin" not in sys.modules
    assert "acme-q" in {item["name"] for item in listing["quantizers"]}  # the other package still loads


def test_disable_by_entry_point_name_and_unknown_name_warns_once(site, capsys, monkeypatch):
    site.install("qbench-acme", "0.2", "acme_plugin", VALID)
    monkeypatch.setenv("QBENCH_DISABLE_PLUGINS", "ACME, qbench-acmee")
    code, listing, lines = list_json(capsys)
    assert code == 0
    assert_one_warning(lines, "QBENCH_DISABLE_PLUGINS names 'qbench-acmee'", "matches no installed qbench plugin",
                       "qbench-acme")
    assert "acme-q" not in {item["name"] for item in listing["quantizers"]}
    assert "acme_plugin" not in sys.modules


def test_without_the_variable_the_broken_package_warns(site, capsys):
    """The control for the disabled case: the same package, not disabled, does get imported and fails."""
    site.install("Broken_Pkg", "1.0", "broken_plugin", "raise RuntimeError('imported although disabled')\n")
    code, _, lines = list_json(capsys)
    assert code == 0
    assert_one_warning(lines, "plugin Broken_Pkg 1.0 (entry point broken) failed to import",
                       "RuntimeError: imported although disabled", "QBENCH_DISABLE_PLUGINS=Broken_Pkg")


def test_a_load_problem_is_reported_once_per_process(site, capsys):
    """The CLI may build a manager for its command hooks and another for the registry: one warning, not two."""
    site.install("qbench-acme", "0.2", "acme_plugin", "import qbench_no_such_module_xyz\n")
    site.install("qbench-zeta", "1.0", "zeta_plugin", MISSPELLED.replace("acme-q", "zeta-q"))
    first, second = get_plugin_manager(), get_plugin_manager()
    assert first.get_plugin("zeta") is not None and second.get_plugin("zeta") is not None
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2, lines
    assert "qbench-acme 0.2" in lines[0] and "failed to import" in lines[0]
    assert "qbench-zeta 1.0" in lines[1] and "did you mean qbench_register_quantizers?" in lines[1]


def test_real_cli_lists_a_plugin_with_distribution_and_version_beside_broken_ones(site, tmp_path):
    """End to end in a subprocess (as a user runs it): one good and two broken packages."""
    site.install("qbench-acme", "0.2", "acme_plugin", VALID)
    site.install("qbench-zeta", "1.0", "zeta_plugin", "import qbench_no_such_module_xyz\n")
    site.install("Broken_Pkg", "1.0", "broken_plugin", quantizer_module(name="broken-q", family="PTQ"))
    env = {**os.environ, "PYTHONPATH": site.pythonpath, "QBENCH_STORE": str(tmp_path / "store.sqlite"),
           "QBENCH_CACHE": str(tmp_path / "features"), "XDG_CONFIG_HOME": str(tmp_path / "xdg"),
           "OMP_NUM_THREADS": "1"}
    env.pop("QBENCH_DISABLE_PLUGINS", None)
    result = subprocess.run([sys.executable, "-m", "qbench", "list", "quantizers"], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    warnings = result.stderr.splitlines()
    assert len(warnings) == 2, warnings
    assert any("qbench-zeta 1.0" in line and "ModuleNotFoundError" in line for line in warnings)
    assert any("Broken_Pkg 1.0" in line and "family 'PTQ'" in line for line in warnings)
    assert "qbench-acme 0.2 (acme)" in result.stdout
    assert "minmax" in result.stdout and "broken-q" not in result.stdout


# -- validation of every kind (in-process plugins) ------------------------------------------------------
class WrongKinds:
    """Registers objects of the wrong kind, and shapes that are not lists."""

    qbench_distribution = ("qbench-wrong", "3.1")

    @hookimpl
    def qbench_register_datasets(self):
        from qbench.data import ProxySpec

        return [ProxySpec(name="not-a-dataset", description="a proxy", loader=lambda request, n: None)]

    @hookimpl
    def qbench_register_models(self):
        return {"toy": "a dict"}

    @hookimpl
    def qbench_register_scorers(self):
        from qbench.scoring import Scorer

        class NoSummary(Scorer):
            name = "no-summary"
            citation = "x"
            summary = ""

        return (scorer for scorer in [NoSummary])

    @hookimpl
    def qbench_register_task_types(self):
        from qbench.tasks import TaskType

        class Unnamed(TaskType):
            summary = "no name"

        return [Unnamed, "zeroshot"]


def test_every_kind_is_validated_with_one_warning_per_problem(capsys):
    registry = build_registry(get_plugin_manager(load_entrypoints=False, extra_plugins=(WrongKinds(),)))
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 5, lines
    assert all(line.startswith("qbench: warning: plugin qbench-wrong 3.1 (") for line in lines)
    text = "\n".join(lines)
    assert "dataset 'not-a-dataset' is not a qbench.data.DatasetSpec" in text
    assert "qbench_register_models returned a dict" in text
    assert "qbench_register_scorers returned a generator" in text
    assert "task type" in text and "has no name" in text
    assert "task type a str ('zeroshot') is not a subclass of qbench.tasks.TaskType" in text
    assert "not-a-dataset" not in registry.names("datasets") and "toy-clip" in registry.names("models")


class BuiltinImpostor:
    """A would-be built-in registering a non-quantizer."""

    @hookimpl
    def qbench_register_quantizers(self):
        return [object]


def test_a_builtin_breaking_the_contract_raises():
    manager = get_plugin_manager(load_entrypoints=False)
    manager.register(BuiltinImpostor(), name="builtin:tests.impostor")
    with pytest.raises(PluginContractError, match="is not a subclass of qbench.quant.base.Quantizer"):
        build_registry(manager)


class DeclaredQuantizers:
    """An in-process plugin declaring its distribution."""

    qbench_distribution = ("qbench-declared", "1.2")

    @hookimpl
    def qbench_register_quantizers(self):
        from qbench.quant.base import QuantizedModel, Quantizer

        class Declared(Quantizer):
            name, family, citation, summary = "declared-q", "ptq", "test", "test"

            def quantize(self, model, bits, scope, calibration, seed):
                return QuantizedModel(model)

        return [Declared]


class UndeclaredQuantizers(DeclaredQuantizers):
    """The same without a declared distribution."""

    qbench_distribution = None


def test_identity_of_in_process_plugins(capsys):
    registry = build_registry(get_plugin_manager(load_entrypoints=False, extra_plugins=(DeclaredQuantizers(),)))
    assert registry.identity("quantizers", "declared-q") == "qbench-declared==1.2"
    assert registry.identity("quantizers", "minmax") == f"qbench=={__version__}"
    assert plugin_identities(registry, {"quantizers": ["declared-q", "minmax"], "task_types": ["no-such-type"]}) == {
        "quantizers:declared-q": "qbench-declared==1.2"}
    undeclared = build_registry(get_plugin_manager(load_entrypoints=False, extra_plugins=(UndeclaredQuantizers(),)))
    assert undeclared.identity("quantizers", "declared-q") == "<unpackaged>==0"
    assert capsys.readouterr().err == ""


# -- identity in the config hash --------------------------------------------------------------------------
def resolved_config(request: EvalRequest) -> dict:
    """The resolved configuration of ``request`` with every installed plugin (entry points included)."""
    return resolve(request, build_registry(get_plugin_manager()), check_device=False).config


def test_plugin_version_enters_the_config_hash_and_builtin_hashes_do_not_move(site, monkeypatch):
    builtin_only = resolved_config(EvalRequest(quantizer="minmax"))
    assert "plugins" not in builtin_only
    site.install("qbench-acme", "0.1", "acme_plugin", VALID)
    first = resolved_config(EvalRequest(quantizer="acme-q"))
    with_package = resolved_config(EvalRequest(quantizer="minmax"))
    assert first["plugins"] == {"quantizers:acme-q": "qbench-acme==0.1"}
    assert with_package == builtin_only  # installing a plugin changes no built-in configuration or hash

    monkeypatch.setattr(sys, "path", [entry for entry in sys.path if not entry.startswith(str(site.root))])
    sys.modules.pop("acme_plugin", None)
    site.install("qbench-acme", "0.2", "acme_plugin", VALID)  # same code, new version
    second = resolved_config(EvalRequest(quantizer="acme-q"))
    assert second["plugins"] == {"quantizers:acme-q": "qbench-acme==0.2"}
    assert second["config_hash"] != first["config_hash"]
    assert {key: value for key, value in second.items() if key not in ("plugins", "config_hash")} == {
        key: value for key, value in first.items() if key not in ("plugins", "config_hash")}


def test_a_third_party_quantizer_version_enters_the_quantization_config_of_checkpoints():
    """The checkpoint / kept-model identity (``quantization_config``) carries the quantizer's plugin identity, and
    only the kinds that determine the quantized model (not the scorers or suites of the run)."""
    registry = build_registry(get_plugin_manager(load_entrypoints=False, extra_plugins=(DeclaredQuantizers(),)))
    resolved = resolve(EvalRequest(quantizer="declared-q", suites=("toy-ood",)), registry, check_device=False)
    quantization = resolved.quantization_config
    assert quantization["plugins"] == {"quantizers:declared-q": "qbench-declared==1.2"}
    builtin = resolve(EvalRequest(quantizer="minmax"), registry, check_device=False).quantization_config
    assert "plugins" not in builtin
