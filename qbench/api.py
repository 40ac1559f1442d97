"""The public API for plugin authors: everything a third-party package imports from qbench.

A plugin package imports from here (and the conformance kit from :mod:`qbench.testing`), never from
qbench's internal modules, whose layout may change between releases::

    from qbench.api import PTQQuantizer, QuantizerConfig, Scorer, hookimpl

Names are resolved on first use (PEP 562), so importing this module, or a plugin module that imports it,
costs nothing until a name is touched: ``qbench --help`` stays fast with plugins installed. Every name
in :data:`__all__` is part of the contract; ``tests/test_public_api.py`` checks that each resolves and
that the modules they come from declare them in their own ``__all__``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_SOURCES: dict[str, tuple[str, ...]] = {
    # hooks, errors, typed hyperparameters
    "qbench.hookspecs": ("hookimpl",),
    "qbench.errors": ("QbenchError", "warn"),
    "qbench.params": ("PluginConfig", "require_choice", "require_in_range", "require_positive"),
    # quantizers
    "qbench.quant.base": ("FAMILIES", "CalibrationData", "QuantizedModel", "Quantizer", "QuantizerConfig"),
    "qbench.quant.ptq": ("PTQQuantizer", "PTQRun", "require_calibration"),
    "qbench.quant.qat": ("Additions", "LightQATConfig", "LightQATQuantizer"),
    "qbench.quant.spec": ("BitSpec", "Scope"),
    "qbench.quant.layout": ("QuantLayout",),
    "qbench.quant.modules": ("TensorQuantizer", "make_activation_quantizer", "make_weight_quantizer",
                             "quantize_modules", "rewrite_tower_attention"),
    "qbench.quant.calibrate": ("calibrate_and_freeze", "freeze_quantizers"),
    # scorers
    "qbench.scoring": ("ScoreContext", "ScoreInputs", "Scorer", "ScorerConfig", "ScorerPlan", "ScorerSkipped",
                       "TextFeatures"),
    "qbench.resources": ("ResourceOption", "ScorerResources"),
    # benchmarks: suites and task types
    "qbench.suites": ("SuiteSpec", "load_suite", "parse_suite"),
    "qbench.tasks": ("DetectionTask", "OODTarget", "STAGE_FEATURES", "STAGE_LOGITS", "STAGE_MODEL", "TaskOutput",
                     "TaskRun", "TaskType", "paired_record", "value_record"),
    # models and data
    "qbench.model": ("LoadRequest", "ModelSpec", "VLM"),
    "qbench.data": ("ArrayImages", "DatasetRequest", "DatasetSpec", "FileImages", "LabeledImages", "ProxySpec"),
    # the registry, for tests and tools
    "qbench.plugins": ("get_plugin_manager",),
    "qbench.registry": ("Registry", "build_registry"),
}
_MODULE_OF = {name: module for module, names in _SOURCES.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    """Import the name's module on first use and cache the object here."""
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"qbench.api has no name {name!r}; the public API is qbench.api.__all__")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # static checkers and IDEs see the real objects
    from qbench.data import ArrayImages, DatasetRequest, DatasetSpec, FileImages, LabeledImages, ProxySpec
    from qbench.errors import QbenchError, warn
    from qbench.hookspecs import hookimpl
    from qbench.model import VLM, LoadRequest, ModelSpec
    from qbench.params import PluginConfig, require_choice, require_in_range, require_positive
    from qbench.plugins import get_plugin_manager
    from qbench.quant.base import FAMILIES, CalibrationData, QuantizedModel, Quantizer, QuantizerConfig
    from qbench.quant.calibrate import calibrate_and_freeze, freeze_quantizers
    from qbench.quant.layout import QuantLayout
    from qbench.quant.modules import (
        TensorQuantizer,
        make_activation_quantizer,
        make_weight_quantizer,
        quantize_modules,
        rewrite_tower_attention,
    )
    from qbench.quant.ptq import PTQQuantizer, PTQRun, require_calibration
    from qbench.quant.qat import Additions, LightQATConfig, LightQATQuantizer
    from qbench.quant.spec import BitSpec, Scope
    from qbench.registry import Registry, build_registry
    from qbench.resources import ResourceOption, ScorerResources
    from qbench.scoring import ScoreContext, ScoreInputs, Scorer, ScorerConfig, ScorerPlan, ScorerSkipped, TextFeatures
    from qbench.suites import SuiteSpec, load_suite, parse_suite
    from qbench.tasks import (
        STAGE_FEATURES,
        STAGE_LOGITS,
        STAGE_MODEL,
        DetectionTask,
        OODTarget,
        TaskOutput,
        TaskRun,
        TaskType,
        paired_record,
        value_record,
    )
