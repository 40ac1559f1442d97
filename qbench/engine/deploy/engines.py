"""The integer engines ``qbench deploy-check`` can run, behind one small contract.

An engine turns a quantized :class:`~qbench.vlm.VLM` and its :class:`~qbench.engine.deploy.plan.ExportPlan` into a
:class:`DeployedModel`: a VLM whose image tower runs on the engine (integer kernels for the plan's layers, float
for its float maps and simulated layers) and whose text tower, tokenizer, preprocessing and logit scale are the
simulated model's, so the evaluation pipeline scores it like any other state. The same engine builds the FP32
twin (``plan=None``: the float model on the engine, for the timing ratios). Engines are optional dependencies
(``pip install 'qbench[deploy]'``); a missing one is a one-line error naming the extra.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from qbench.errors import QbenchError

ENGINES = ("torchao", "onnxruntime")
"""Engine names, in the order ``--engine`` lists them (torchao is the default)."""

ENGINE_MODULES = {
    "torchao": "qbench.engine.deploy.torchao_engine",
    "onnxruntime": "qbench.engine.deploy.onnx_engine",
}
"""The module implementing each engine: it defines ``build(vlm, plan, *, device, compile) -> DeployedModel``."""

ENGINE_REQUIREMENTS = {
    "torchao": ("torchao",),
    "onnxruntime": ("onnx", "onnxruntime", "onnxscript"),
}
"""Import names each engine needs (all in the ``deploy`` extra)."""


@dataclass
class DeployedModel:
    """A model running on an engine.

    ``vlm`` is the model to encode with (its ``encode_image`` runs the engine). ``int8_layers`` names the plan
    layers that run on integer kernels (names inside ``vlm.model``), ``int8_ops`` the engine's own operator
    names that did (e.g. ``aten::_int_mm``, ``QGemm``), ``notes`` every way the engine's arithmetic departs from
    qbench's fake quantization (a scale formula, a rounding mode), ``run_layer(name, x)`` runs one integer layer
    of the engine on ``x`` exactly as the model does (for the per-layer check), and ``exported()`` reads the
    integers, scales and zero points back *from the engine's own storage* (torchao tensors, ONNX initializers),
    per layer: ``{"weight_int", "weight_scale", "act_scale", "act_zero_point"}`` as tensors (None where absent).
    """

    vlm: Any
    engine: str
    version: str
    device: str
    int8_layers: list[str] = field(default_factory=list)
    int8_ops: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    run_layer: Callable[[str, Any], Any] | None = None
    exported: Callable[[], dict[str, dict[str, Any]]] | None = None

    def describe(self) -> dict[str, Any]:
        """Engine, version, device, integer layers and ops, notes: what a deploy-check record stores."""
        return {"engine": self.engine, "version": self.version, "device": self.device,
                "int8_layers": list(self.int8_layers), "int8_ops": sorted(set(self.int8_ops)), "notes": list(self.notes)}


def missing_requirement(engine: str) -> str | None:
    """The first import an engine needs that is not installed, or None (found without importing it, so an
    error about another requirement is not preceded by the import-time warnings of the installed ones)."""
    import importlib.util

    for module in ENGINE_REQUIREMENTS[engine]:
        if importlib.util.find_spec(module) is None:
            return module
    return None


def engine_module(engine: str) -> Any:
    """The module implementing ``engine``; a one-line error for an unknown engine or a missing extra."""
    if engine not in ENGINES:
        raise QbenchError(f"unknown --engine {engine!r}; available: {', '.join(ENGINES)}")
    missing = missing_requirement(engine)
    if missing is not None:
        raise QbenchError(f"--engine {engine} needs {missing!r}, which is not installed; install the extra: "
                          f"pip install 'qbench[deploy]'")
    return importlib.import_module(ENGINE_MODULES[engine])


def check_device(device: str) -> None:
    """``cpu`` or an available ``cuda``/``cuda:N``; a one-line error otherwise (no CUDA: says so)."""
    if device == "cpu":
        return
    if device == "cuda" or device.startswith("cuda:"):
        import torch

        if not torch.cuda.is_available():
            raise QbenchError("--device cuda was given but this machine has no CUDA device; use --device cpu")
        return
    raise QbenchError(f"bad --device {device!r}: use cpu, cuda or cuda:N")


def build(engine: str, vlm: Any, plan: Any, *, device: str = "cpu", compile: bool = True) -> DeployedModel:
    """``vlm`` on ``engine`` following ``plan`` (``plan=None``: the float model as is, the FP32 twin)."""
    check_device(device)
    if plan is not None and not plan.exportable:
        raise QbenchError(plan.not_exportable_line())
    return engine_module(engine).build(vlm, plan, device=device, compile=compile)
