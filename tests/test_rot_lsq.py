"""``rot-lsq`` (quantizers.md §3.6): QuaRot's exact rotation, then LSQ quantizers trained with Light QAT.

Defining properties: before training, with the quantizers switched off, the rotated model computes the
float function; the rotation and Hadamard buffers are never trained (bit-identical after training while the
weights move); every step size receives a gradient; the fixed float maps are listed for the verifier.
"""

from __future__ import annotations

import copy

import pytest
import torch

from qbench.quant.lsq import LSQQuantizer
from qbench.quant.modules import quant_modules, set_quantizer_mode
from qbench.quant.qat import contrastive_loss
from qbench.quant.rotation import MatrixMap, RMSNorm
from qbench.quant.spec import BitSpec, Scope
from qbench.quant.verify import verify_quantized
from qbench.registry import build_registry
from qbench_plugins.quantizers.rot_lsq import RotLSQConfig, RotLSQQuantizer
from tiny_models import embeddings, proxy_batch, tiny_vlm

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def float_model():
    return tiny_vlm(outlier_channels=(3, 17))


@pytest.fixture(scope="module")
def calibration(float_model):
    return proxy_batch(float_model, n=16)


def run(float_model, calibration, scope=Scope.VISUAL, seed=0, **config):
    quantizer = RotLSQQuantizer(RotLSQConfig(**config))
    return quantizer.quantize(copy.deepcopy(float_model), BitSpec.parse("w4a8"), scope, calibration, seed)


def fixed_maps(model) -> dict[str, torch.Tensor]:
    return {name: module.matrix.detach().clone() for name, module in model.model.named_modules() if isinstance(module, MatrixMap)}


def test_registered_as_qat_with_the_hybrid_regime():
    cls = build_registry().get("quantizers", "rot-lsq")
    assert cls.family == "qat" and cls.needs_data and cls.needs_grad
    assert cls.defaults()["distill"] == "hybrid" and cls.defaults()["steps"] == 100


@pytest.mark.parametrize("scope", [Scope.VISUAL, Scope.JOINT], ids=["visual", "joint"])
def test_before_training_the_rotated_model_is_the_float_model(float_model, calibration, scope):
    result = run(float_model, calibration, scope=scope, steps=0)
    assert any(isinstance(m, RMSNorm) for m in result.model.model.modules())
    set_quantizer_mode(result.model.model, "off")
    image, text = embeddings(result.model, calibration)
    ref_image, ref_text = embeddings(float_model, calibration)
    assert (image - ref_image).abs().max() <= 1e-4 * ref_image.abs().max()
    assert (text - ref_text).abs().max() <= 1e-4 * ref_text.abs().max()


def test_rotation_buffers_are_bit_identical_after_training_while_weights_move(float_model, calibration):
    untrained = run(float_model, calibration, steps=0).model
    trained = run(float_model, calibration, steps=3, batch_size=8, lr_weights=1e-3, lr_quant=1e-2).model
    before, after = fixed_maps(untrained), fixed_maps(trained)
    assert before and before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)
    moved = [name for name, module in quant_modules(trained.model)
             if not torch.equal(module.weight, dict(quant_modules(untrained.model))[name].weight)]
    assert moved


def test_every_step_size_receives_a_gradient(float_model, calibration):
    model = run(float_model, calibration, steps=0).model
    quantizers = [q for _, module in quant_modules(model.model) for _, q in module.quantizers()]
    assert quantizers and all(isinstance(q, LSQQuantizer) for q in quantizers)
    with torch.enable_grad():
        image, text = model.encode_image(calibration.images), model.encode_text(calibration.tokens)
        contrastive_loss(image, text, model.logit_scale, model.logit_bias).backward()
    assert all(q.step.grad is not None and q.step.grad.abs().sum() > 0 for q in quantizers)


def test_fixed_maps_are_listed_and_the_model_verifies(float_model, calibration):
    result = run(float_model, calibration, steps=2, batch_size=8)
    maps = fixed_maps(result.model)
    assert set(maps) <= set(result.float_extras)
    report = verify_quantized(result.model, calibration.images[:4], calibration.tokens[:4], Scope.VISUAL.towers,
                              float_extras=result.float_extras)
    assert report.passed, report.problems
    assert result.provenance["rotation"]["towers"][0]["tower"] == "visual"
    assert result.provenance["training"]["steps"] == 2
