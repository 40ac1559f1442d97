"""The shared PTQ template (:class:`qbench.quant.ptq.PTQQuantizer`): the built-in PTQ methods fill in its steps
instead of re-copying it, a new method written in a few lines passes the conformance kit, and the steps run in
the documented order on the model state each one is documented to see."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch

from qbench.errors import QbenchError
from qbench.plugins import get_plugin_manager
from qbench.quant.base import QuantizerConfig
from qbench.quant.modules import Mode, QuantModule, make_activation_quantizer, quant_modules, tensor_quantizers
from qbench.quant.ptq import Additions, PTQQuantizer, PTQRun
from qbench.quant.spec import BitSpec, Scope
from qbench.registry import build_registry
from qbench.testing import check_quantizer

pytestmark = pytest.mark.usefixtures("single_thread")
REGISTRY = build_registry(get_plugin_manager(load_entrypoints=False))


# -- a new calibrating PTQ method, as an author would write it -------------------------------------------
@dataclass(frozen=True)
class PercentileConfig(QuantizerConfig):
    """Proxy pairs, calibration batch size and the activation percentile."""

    n_calibration: int = 12
    batch_size: int = 5
    percentile: float = 99.0


class PercentilePTQ(PTQQuantizer):
    """Baseline layout with percentile activation ranges: only the activation observer is this method's."""

    name = "test-percentile"
    citation = "a test method, no paper"
    summary = "per-tensor activation ranges from the p-th percentile"
    Config = PercentileConfig

    def act_quantizer(self, bits, name, module):
        return make_activation_quantizer(bits.act_bits, observer="percentile",
                                         observer_kwargs={"percentile": self.config.percentile})


def test_a_new_ptq_method_in_a_few_lines_passes_the_conformance_kit(float_model, calibration, tmp_path):
    check_quantizer(PercentilePTQ, float_model, calibration, folder=tmp_path)


def test_the_template_calibrates_with_the_methods_own_subset_batch_and_observer(float_model, calibration):
    result = PercentilePTQ().quantize(copy.deepcopy(float_model), BitSpec.parse("w8a8"), Scope.JOINT, calibration, 0)
    provenance = result.provenance
    assert provenance["calibration"]["n_images"] == 12 and provenance["calibration"]["n_texts"] == 12
    assert provenance["calibration"]["batch_size"] == 5 and provenance["calibration"]["uncalibrated"] == []
    assert provenance["method"] == "test-percentile" and provenance["config"]["percentile"] == 99.0
    assert provenance["quantized_modules"] == len(dict(quant_modules(result.model.model))) > 0
    assert set(provenance["quantized_modules_by_tower"]) == {"visual", "text"}
    assert provenance["activations"]["observer"] == "percentile"
    for _, module in quant_modules(result.model.model):  # every input quantizer has its (s, z), none calibrating
        assert module.act_quantizer.observer.name == "percentile" and module.act_quantizer.scale is not None
        assert module.act_quantizer.mode is Mode.QUANTIZE


def test_default_check_rejects_a_zero_calibration_budget(float_model, calibration):
    with pytest.raises(QbenchError, match="n_calibration must be >= 1, got 0") as error:
        PercentilePTQ(PercentileConfig(n_calibration=0)).quantize(
            copy.deepcopy(float_model), BitSpec.parse("w8a8"), Scope.VISUAL, calibration, 0)
    assert "\n" not in str(error.value)


# -- the steps: order and what each one sees ------------------------------------------------------------
class RecordingPTQ(PercentilePTQ):
    """Records which step ran and what state the model was in when it did."""

    name = "test-recording"

    def __init__(self, config=None) -> None:
        super().__init__(config)
        self.calls: list[tuple[str, object]] = []

    def check(self, bits):
        self.calls.append(("check", None))
        super().check(bits)

    def prepare(self, run: PTQRun) -> Additions:
        self.calls.append(("prepare", len(dict(quant_modules(run.model.model)))))
        run.state["prepared"] = True
        return Additions(provenance={"prepared": True})

    def install(self, run: PTQRun) -> Additions:
        self.calls.append(("install", len(run.wrapped)))
        return Additions(float_extras={"visual.test_extra": "a float module for the test"})

    def calibrate(self, run: PTQRun):
        self.calls.append(("calibrate", run.state.get("prepared")))
        return super().calibrate(run)

    def refine(self, run: PTQRun) -> Additions:
        calibrating = [name for name, q in tensor_quantizers(run.model.model) if q.mode is Mode.CALIBRATE]
        self.calls.append(("refine", calibrating))
        return Additions(provenance={"extra_parameters": 7})


def test_steps_run_in_order_on_the_documented_model_state(float_model, calibration):
    quantizer = RecordingPTQ()
    result = quantizer.quantize(copy.deepcopy(float_model), BitSpec.parse("w8a8"), Scope.VISUAL, calibration, 0)
    steps = [step for step, _ in quantizer.calls]
    assert steps == ["check", "prepare", "install", "calibrate", "refine"]
    seen = dict(quantizer.calls)
    assert seen["prepare"] == 0  # the float model: nothing wrapped yet
    assert seen["install"] == result.provenance["quantized_modules"] > 0  # after wrap
    assert seen["calibrate"] is True  # state left by prepare reaches later steps
    assert seen["refine"] == []  # the calibrated model: every quantizer frozen
    assert result.provenance["prepared"] is True and result.provenance["extra_parameters"] == 7
    assert result.float_extras == {"visual.test_extra": "a float module for the test"}


class DataFreePTQ(PercentilePTQ):
    """A data-free method: dynamic per-token inputs, no calibration pass."""

    name = "test-data-free"
    needs_data = False

    def act_quantizer(self, bits, name, module):
        return make_activation_quantizer(bits.act_bits, "per_token") if isinstance(module, torch.nn.Linear) else None


def test_a_data_free_method_gets_no_data_and_is_frozen_without_a_pass(float_model, calibration):
    result = DataFreePTQ().quantize(copy.deepcopy(float_model), BitSpec.parse("w4a8"), Scope.VISUAL, calibration, 0)
    assert result.provenance["calibration"] is None
    modules = dict(quant_modules(result.model.model))
    assert modules and all(module.weight_quantizer.scale is not None for module in modules.values())
    assert all(q.mode is Mode.QUANTIZE for _, q in tensor_quantizers(result.model.model))


# -- the built-ins share the template ------------------------------------------------------------------
PTQ_METHODS = sorted(entry.name for entry in REGISTRY.entries("quantizers") if entry.value.family == "ptq")
WRAPS_ANOTHER_METHOD = {"qwt"}  # documented: QwT runs its base method, then adds compensation


def test_every_builtin_ptq_method_is_a_ptq_quantizer():
    assert {"minmax", "smoothquant", "outlier-suppression", "igq-vit", "q-vlm", "qwt", "apq-vit", "quarot"} <= set(PTQ_METHODS)
    assert all(issubclass(REGISTRY.get("quantizers", name), PTQQuantizer) for name in PTQ_METHODS)


@pytest.mark.parametrize("name", [name for name in PTQ_METHODS if name not in WRAPS_ANOTHER_METHOD])
def test_builtin_ptq_methods_use_the_shared_quantize(name):
    """They override steps, never the template itself (re-copying it is what the base class replaced)."""
    cls = REGISTRY.get("quantizers", name)
    assert cls.quantize is PTQQuantizer.quantize


def test_a_method_that_wraps_another_overrides_quantize_and_says_why():
    cls = REGISTRY.get("quantizers", "qwt")
    assert cls.quantize is not PTQQuantizer.quantize and "overrides :meth:`quantize`" in cls.__doc__


def test_wrapped_modules_are_quant_modules(float_model, calibration):
    """``run.wrapped`` is the template's record of what was quantized: exactly the model's quantized modules."""
    seen: dict[str, QuantModule] = {}

    class Peek(PercentilePTQ):
        name = "test-peek"

        def refine(self, run):
            seen.update(run.wrapped)
            return Additions()

    result = Peek().quantize(copy.deepcopy(float_model), BitSpec.parse("w8a8"), Scope.JOINT, calibration, 0)
    assert set(seen) == {name for name, _ in quant_modules(result.model.model)}
