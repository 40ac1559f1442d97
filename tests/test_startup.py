"""Startup stays light (issue 16 item 4): commands that never run a model import no heavy library.

``qbench list`` (every kind, ``--json``), ``qbench --help``, ``qbench eval --help``, ``qbench report --help`` and
``qbench results`` load every plugin module (the built-ins and the installed entry points, as the real CLI does)
but must import neither torch nor anything else that costs seconds and hundreds of MB: plugin registration is
torch-free (contracts and numpy at module level; ``nn.Module`` classes in sibling modules, torch inside
functions). Each command runs in a fresh interpreter through the real entry point (:func:`qbench.cli.main`),
with an isolated store, cache and config, and reports the heavy top-level packages left in ``sys.modules``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

FORBIDDEN = ("torch", "torchvision", "open_clip", "transformers", "scipy", "sklearn", "pandas", "safetensors")
"""Top-level packages a light command must not import (PIL is tolerated: the corruption constants need it)."""

MARKER = "QBENCH-STARTUP-MODULES "

PROBE = f"""
import json, sys
FORBIDDEN = {FORBIDDEN!r}
code = 0
if sys.argv[1] == "--code":
    exec(sys.argv[2])
else:
    from qbench.cli import main
    sys.argv = ["qbench", *sys.argv[1:]]
    try:
        main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
loaded = sorted({{name.split(".")[0] for name in sys.modules}} & set(FORBIDDEN))
sys.stdout.flush()
print({MARKER!r} + json.dumps({{"code": code, "loaded": loaded}}))
"""
"""Run a qbench command (or, after ``--code``, a snippet) and print the forbidden packages it left loaded."""


def isolated_env(tmp_path: Path) -> dict[str, str]:
    """The test's environment with a private store, cache and config home; no developer config or data root."""
    env = {**os.environ, "QBENCH_STORE": str(tmp_path / "results.sqlite"), "QBENCH_CACHE": str(tmp_path / "features"),
           "XDG_CONFIG_HOME": str(tmp_path / "xdg-config"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "COLUMNS": "200"}
    for name in ("QBENCH_CONFIG", "QBENCH_DATA", "QBENCH_DISABLE_PLUGINS"):
        env.pop(name, None)
    return env


def probe(env: dict[str, str], *args: str) -> tuple[int, str, list[str]]:
    """Exit code, output (without the marker line) and forbidden packages loaded by ``qbench *args``."""
    done = subprocess.run([sys.executable, "-c", PROBE, *args], env=env, capture_output=True, text=True, timeout=600)
    lines = done.stdout.splitlines()
    reports = [line for line in lines if line.startswith(MARKER)]
    assert len(reports) == 1, f"the probe did not report (rc {done.returncode}):\n{done.stdout}\n{done.stderr}"
    report = json.loads(reports[0][len(MARKER):])
    output = "\n".join(line for line in lines if not line.startswith(MARKER)) + done.stderr
    return report["code"], output, report["loaded"]


LIGHT_COMMANDS = [
    ("list",),
    ("list", "--json"),
    ("list", "quantizers"),
    ("list", "scorers"),
    ("list", "models"),
    ("--help",),
    ("eval", "--help"),
    ("report", "--help"),
    ("results",),
]


@pytest.mark.parametrize("args", LIGHT_COMMANDS, ids=[" ".join(args) for args in LIGHT_COMMANDS])
def test_light_commands_import_no_heavy_library(args, tmp_path):
    code, output, loaded = probe(isolated_env(tmp_path), *args)
    assert code == 0, output
    assert loaded == [], f"qbench {' '.join(args)} imported {loaded}"


def test_list_still_shows_every_kind_and_the_installed_plugin(tmp_path):
    """Registration is complete, not just cheap: built-ins of every kind and the example plugin are listed."""
    code, output, loaded = probe(isolated_env(tmp_path), "list", "--json")
    assert code == 0 and loaded == [], output
    listing = json.loads(output[output.index("{"):output.rindex("}") + 1])
    names = {kind: {item["name"] for item in items} for kind, items in listing.items()}
    assert {"fp32", "minmax", "q-vit", "qwt", "apq-vit", "quarot", "qat-lora", "q-vlm"} <= names["quantizers"]
    assert {"energy", "generic-negative", "msp"} <= names["scorers"]
    assert "toy-clip" in names["models"] and "toy-id" in names["suites"]
    if any(point.name == "acme" for point in entry_points(group="qbench")):  # the README's example package
        assert "acme-percentile" in names["quantizers"] and "max-logit" in names["scorers"]


def test_the_probe_sees_a_heavy_import(tmp_path):
    """The check can fail: asking qbench.model for VLM (moved to qbench.vlm, served lazily) imports torch."""
    code, output, loaded = probe(isolated_env(tmp_path), "--code", "import qbench.model\nqbench.model.VLM")
    assert code == 0, output
    assert "torch" in loaded


def test_results_on_a_store_with_a_real_evaluation(tmp_path):
    """``qbench results`` lists a document written by a real ``qbench eval`` without importing torch."""
    env = isolated_env(tmp_path)
    done = subprocess.run([sys.executable, "-m", "qbench", "eval", "--suite", "toy-id", "--limit", "8",
                           "--qparam", "n_calibration=16"], env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout + done.stderr
    code, output, loaded = probe(env, "results")
    assert code == 0, output
    assert "toy-clip" in output and "minmax" in output and "first 8 (partial)" in output
    assert loaded == [], f"qbench results imported {loaded}"


def test_every_builtin_plugin_module_imports_without_torch(tmp_path):
    """Each built-in plugin module, imported alone in registration order, leaves no heavy package loaded
    (names the first module that pulls one in)."""
    snippet = (
        "import qbench_plugins, sys, importlib\n"
        f"forbidden = {FORBIDDEN!r}\n"
        "for name in qbench_plugins.BUILTIN_PLUGINS:\n"
        "    importlib.import_module(name)\n"
        "    heavy = sorted({m.split('.')[0] for m in sys.modules} & set(forbidden))\n"
        "    if heavy:\n"
        "        raise SystemExit(f'{name} imported {heavy}')\n"
    )
    done = subprocess.run([sys.executable, "-c", snippet], env=isolated_env(tmp_path), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr


# -- the moved classes stay where old code and checkpoints look for them ----------------------------
MOVED = [
    ("qbench.model", "VLM", "qbench.vlm"),
    ("qbench_plugins.quantizers.qat_ste", "EMAActivationQuantizer", "qbench_plugins.quantizers.qat_ste_modules"),
    ("qbench_plugins.quantizers.lsq_qat", "LSQActivationQuantizer", "qbench_plugins.quantizers.lsq_qat_modules"),
    ("qbench_plugins.quantizers.q_vit", "InformationRectification", "qbench_plugins.quantizers.q_vit_modules"),
    ("qbench_plugins.quantizers.q_vit", "RectifiedSlotQuantizer", "qbench_plugins.quantizers.q_vit_modules"),
    ("qbench_plugins.quantizers.q_vlm", "PositionQuantizer", "qbench_plugins.quantizers.q_vlm_modules"),
    ("qbench_plugins.quantizers.qat_lora", "QALoRALinear", "qbench_plugins.quantizers.qat_lora_modules"),
    ("qbench_plugins.quantizers.qwt", "QwTCompensation", "qbench_plugins.quantizers.qwt_modules"),
    ("qbench_plugins.quantizers.qwt", "_apply_compensation", "qbench_plugins.quantizers.qwt_modules"),
    ("qbench_plugins.quantizers.quarot", "ClippedTokenQuantizer", "qbench_plugins.quantizers.quarot_modules"),
    ("qbench_plugins.quantizers.apq_vit", "MPQLog2Quantizer", "qbench_plugins.quantizers.apq_vit_modules"),
]


@pytest.mark.parametrize("old, name, new", MOVED, ids=[f"{old}.{name}" for old, name, _ in MOVED])
def test_moved_names_resolve_from_their_old_module(old, name, new):
    """``from old import Name`` gives the very object (PEP 562), and a checkpoint naming ``old:Name`` loads."""
    import importlib

    from qbench.engine.checkpoint import resolve_name

    moved = getattr(importlib.import_module(new), name)
    assert getattr(importlib.import_module(old), name) is moved
    kind = "function" if name.startswith("_") else "module"
    assert resolve_name(f"{old}:{name}", kind) is moved


def test_a_name_that_never_existed_is_still_an_attribute_error():
    import qbench.model
    import qbench_plugins.quantizers.qwt as qwt

    with pytest.raises(AttributeError):
        qbench.model.NoSuchName  # noqa: B018
    with pytest.raises(AttributeError):
        qwt.NoSuchName  # noqa: B018


# -- qbench.lazy.no_grad: @torch.no_grad() without importing torch at decoration time -----------------
def test_lazy_no_grad_matches_torch_no_grad():
    import torch

    from qbench.lazy import no_grad

    weight = torch.ones(3, requires_grad=True)

    @no_grad
    def scaled(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Inside: no graph."""
        return x * weight, torch.is_grad_enabled()

    out, enabled = scaled(torch.ones(3))
    assert not enabled and not out.requires_grad
    assert torch.is_grad_enabled()  # restored after the call
    assert scaled.__name__ == "scaled" and scaled.__doc__ == "Inside: no graph."
    assert (torch.ones(3) * weight).requires_grad  # outside: gradients as usual


def test_lazy_no_grad_refuses_generators():
    from qbench.lazy import no_grad

    def numbers():
        """A generator."""
        yield 1

    with pytest.raises(TypeError, match="plain functions"):
        no_grad(numbers)
