"""``q-vit`` (``quantizers.md`` §3.5): the layout (LSQ weights per channel, LSQ+ inputs, q/k/v/probs at A bits,
8-bit patch embedding), IRM (identity at init, exact calibration statistics, running averages, gradients to
γ and β, text padding excluded), DGD (zero for identical models, positive after a perturbed q, gradient to
the q/k projections, text padding excluded), verification and a short training run."""

from __future__ import annotations

import copy

import pytest
import torch

from qbench.quant.lsq import LSQQuantizer
from qbench.quant.modules import QuantizableMultiheadAttention, quant_modules, rewrite_tower_attention, tensor_quantizers
from qbench.quant.observers import valid_tokens
from qbench.quant.qat import contrastive_loss, make_teacher
from qbench.quant.spec import BitSpec, Scope
from qbench.quant.verify import verify_quantized
from qbench.registry import build_registry
from qbench_plugins.quantizers.lsq_qat import LSQActivationQuantizer
from qbench_plugins.quantizers.q_vit import (
    DistributionGuidedDistillation,
    InformationRectification,
    QViTConfig,
    QViTQuantizer,
    RectifiedSlotQuantizer,
    gram_distance,
)


pytestmark = pytest.mark.usefixtures("single_thread")


def run(float_model, calibration, bits="w4a4", scope=Scope.VISUAL, seed=0, **config):
    quantizer = QViTQuantizer(QViTConfig(**config))
    return quantizer.quantize(copy.deepcopy(float_model), BitSpec.parse(bits), scope, calibration, seed)


@pytest.fixture(scope="module")
def untrained_joint(float_model, calibration):
    """The w4a4 joint-scope model right after calibration (0 training steps)."""
    return run(float_model, calibration, scope=Scope.JOINT, steps=0)


def attention_modules(model, towers=("visual", "text")):
    return {name: m for name, m in model.model.named_modules()
            if isinstance(m, QuantizableMultiheadAttention) and model.tower_of(name) in towers}


def irm_modules(model):
    return {name: m for name, m in model.model.named_modules() if isinstance(m, InformationRectification)}


def per_head(generator, n=6, heads=2, length=5, dim=3, shift=0.0, spread=1.0):
    return torch.randn(n, heads, length, dim, generator=generator) * spread + shift


# -- registration ----------------------------------------------------------------------------------
def test_registered_with_light_qat_hybrid_defaults_and_citation():
    cls = build_registry().get("quantizers", "q-vit")
    assert cls is QViTQuantizer and cls.family == "qat" and cls.needs_data and cls.needs_grad
    assert cls.defaults() == {"steps": 100, "batch_size": 100, "lr_weights": 1e-6, "lr_quant": 1e-4,
                              "distill": "hybrid", "distill_weight": 0.5, "distill_form": "additive",
                              "n_calibration": 1000, "dgd_weight": 1.0, "irm_momentum": 0.1, "irm_eps": 1e-5,
                              "patch_embed_bits": 8}
    assert "arXiv:2210.06707" in cls.citation and "arXiv:1902.08153" in cls.citation and "arXiv:2004.09576" in cls.citation


# -- layout and verification -----------------------------------------------------------------------
def test_slots_hold_a_bit_quantizers_patch_embedding_is_8_bit_and_verification_passes(untrained_joint, calibration):
    model = untrained_joint.model
    attention = attention_modules(model)
    assert {model.tower_of(name) for name in attention} == {"visual", "text"} and len(attention) == 4
    for name, module in attention.items():
        for slot in ("q", "k"):
            quantizer = getattr(module, slot)
            assert isinstance(quantizer, RectifiedSlotQuantizer) and quantizer.bits == 4, f"{name}.{slot}"
            assert isinstance(quantizer.irm, InformationRectification)
        for slot in ("v", "probs"):
            quantizer = getattr(module, slot)
            assert isinstance(quantizer, LSQActivationQuantizer) and quantizer.bits == 4, f"{name}.{slot}"
        assert module.probs.fmt.qmin == 0  # softmax is non-negative: unsigned grid from calibration
    modules = dict(quant_modules(model.model))
    patch = modules.pop("visual.conv1")
    assert patch.weight_quantizer.bits == 8 and patch.act_quantizer.bits == 8
    for name, module in modules.items():
        weight, act = module.weight_quantizer, module.act_quantizer
        assert isinstance(weight, LSQQuantizer) and weight.bits == 4 and weight.symmetric, name
        assert weight.step.shape == (module.weight.shape[0],), name  # per output channel
        assert isinstance(act, LSQQuantizer) and act.bits == 4 and act.learn_offset and act.offset is not None, name
    assert untrained_joint.float_extras.keys() == irm_modules(model).keys() and len(untrained_joint.float_extras) == 8
    report = verify_quantized(model, calibration.images[:4], calibration.tokens[:4], Scope.JOINT.towers,
                              float_extras=untrained_joint.float_extras)
    assert report.passed, report.problems
    assert len(report.slots) == 16 and all(s.act_bits == 4 and 2 <= s.act_max_unique <= 16 for s in report.slots)


def test_input_quantizer_reproduces_static_minmax_at_init(untrained_joint, calibration, float_model):
    """LSQ+ inputs initialised from the calibration min/max: at step 0 equal to the affine minmax quantizer."""
    module = dict(quant_modules(untrained_joint.model.model))["visual.transformer.resblocks.0.mlp.c_fc"]
    quantizer = module.act_quantizer
    scale, zero_point = quantizer.qparams_for(torch.zeros(1))
    assert torch.allclose(zero_point, zero_point.round(), atol=1e-4)  # integer zero point: β = −s·z
    x = torch.randn(3, 5, module.in_features)
    expected = scale * (torch.clamp(torch.round(x / scale) + zero_point.round(), 0, 15) - zero_point.round())
    assert torch.allclose(quantizer(x), expected, atol=1e-5)


# -- IRM -------------------------------------------------------------------------------------------
def test_irm_gathers_exact_calibration_statistics_and_is_the_identity_in_eval():
    generator = torch.Generator().manual_seed(0)
    batches = [per_head(generator, shift=3.0, spread=2.0), per_head(generator, n=4, shift=-1.0), per_head(generator, n=9)]
    irm = InformationRectification(2, 3)
    for batch in batches:
        irm.observe(batch)
    assert irm.finish_calibration()
    rows = torch.cat([b.transpose(1, 2).reshape(-1, 2, 3) for b in batches]).double()
    assert torch.allclose(irm.running_mean.double(), rows.mean(0), atol=1e-6)
    assert torch.allclose(irm.running_var.double(), rows.var(0, unbiased=False), atol=1e-5)
    assert torch.allclose(irm.gamma, torch.sqrt(irm.running_var + 1e-5)) and torch.equal(irm.beta, irm.running_mean)
    irm.eval()
    for batch in batches:
        assert (irm(batch) - batch).abs().max() <= 1e-5


def test_irm_is_the_identity_at_init_inside_the_quantized_model(untrained_joint, calibration):
    model = untrained_joint.model
    seen = []
    handles = [m.register_forward_hook(lambda mod, inputs, out: seen.append((inputs[0], out)))
               for m in irm_modules(model).values()]
    try:
        with torch.no_grad():
            model.encode_image(calibration.images)
            model.encode_text(calibration.tokens)
    finally:
        for handle in handles:
            handle.remove()
    assert len(seen) == 8
    for inputs, out in seen:
        assert (out - inputs).abs().max() <= 1e-5


def test_irm_running_statistics_update_in_training_and_are_used_in_eval():
    generator = torch.Generator().manual_seed(1)
    irm = InformationRectification(2, 3, momentum=0.1)
    irm.observe(per_head(generator))
    irm.finish_calibration()
    with torch.no_grad():
        irm.gamma.mul_(1.5)
        irm.beta.add_(0.25)
    mean0, var0 = irm.running_mean.clone(), irm.running_var.clone()
    batch = per_head(generator, shift=2.0, spread=3.0)
    rows = batch.transpose(1, 2).reshape(-1, 2, 3)
    irm.train()
    out = irm(batch)
    shape = (1, 2, 1, 3)
    mu, var = rows.mean(0), rows.var(0, unbiased=False)
    expected = (batch - mu.view(shape)) / torch.sqrt(var + 1e-5).view(shape) * irm.gamma.view(shape) + irm.beta.view(shape)
    assert torch.allclose(out, expected, atol=1e-5)  # batch statistics in training
    assert torch.allclose(irm.running_mean, 0.9 * mean0 + 0.1 * mu, atol=1e-6)
    assert torch.allclose(irm.running_var, 0.9 * var0 + 0.1 * rows.var(0, unbiased=True), atol=1e-6)
    assert int(irm.num_batches_tracked) == 1
    irm.eval()
    running = irm.running_mean.clone(), irm.running_var.clone()
    out = irm(batch)
    expected = ((batch - running[0].view(shape)) / torch.sqrt(running[1] + 1e-5).view(shape) * irm.gamma.view(shape)
                + irm.beta.view(shape))
    assert torch.allclose(out, expected, atol=1e-5)  # running statistics in eval, left unchanged
    assert torch.equal(irm.running_mean, running[0]) and int(irm.num_batches_tracked) == 1


def test_irm_statistics_skip_text_positions_after_end_of_text():
    generator = torch.Generator().manual_seed(2)
    x = per_head(generator, n=3, length=4)
    mask = torch.tensor([[True, True, False, False], [True, True, True, False], [True, True, True, True]])
    polluted = x.clone()
    polluted.transpose(1, 2)[~mask] = 1e3  # garbage at the padding positions
    valid = x.transpose(1, 2)[mask]
    irm = InformationRectification(2, 3)
    with valid_tokens(mask):
        irm.observe(polluted)
    irm.finish_calibration()
    assert torch.allclose(irm.running_mean, valid.mean(0), atol=1e-5)
    assert torch.allclose(irm.running_var, valid.var(0, unbiased=False), atol=1e-4)
    irm.train()
    with valid_tokens(mask):
        irm(polluted)
    assert torch.allclose(irm.running_mean, valid.mean(0), atol=1e-5)  # batch mean over valid tokens only


def test_irm_gamma_and_beta_receive_gradients(untrained_joint, calibration):
    model = copy.deepcopy(untrained_joint.model)
    with torch.enable_grad():
        image, text = model.encode_image(calibration.images), model.encode_text(calibration.tokens)
        contrastive_loss(image, text, model.logit_scale, model.logit_bias).backward()
    irms = irm_modules(model)
    assert len(irms) == 8
    for name, irm in irms.items():
        assert irm.gamma.grad is not None and irm.gamma.grad.abs().sum() > 0, name
        assert irm.beta.grad is not None and irm.beta.grad.abs().sum() > 0, name


def test_quantizer_parameters_are_every_step_offset_and_irm_parameter(untrained_joint):
    model = untrained_joint.model
    params = QViTQuantizer().quantizer_parameters(model, dict(quant_modules(model.model)))
    expected = {id(p) for _, q in tensor_quantizers(model.model) for p in q.parameters()}
    assert {id(p) for p in params} == expected and len(params) == len(expected)
    irm_params = {id(p) for irm in irm_modules(model).values() for p in (irm.gamma, irm.beta)}
    assert irm_params <= expected and len(irm_params) == 16


# -- DGD -------------------------------------------------------------------------------------------
def dgd_of(dgd, student, data, text=True):
    with dgd.capture():
        student.encode_image(data.images)
        if text:
            student.encode_text(data.tokens)
    return dgd(data.images, data.tokens)


def test_dgd_is_zero_for_identical_models_and_positive_after_perturbing_a_q_weight(float_model, calibration):
    student = copy.deepcopy(float_model)
    rewrite_tower_attention(student, Scope.JOINT.towers)
    dgd = DistributionGuidedDistillation(student, make_teacher(float_model), Scope.JOINT.towers, 1.0)
    assert dgd.n_blocks == 4
    with torch.no_grad():
        assert float(dgd_of(dgd, student, calibration)) == pytest.approx(0.0, abs=1e-6)
        student.model.visual.transformer.resblocks[1].attn.q_proj.weight.add_(
            0.05 * torch.randn(64, 64, generator=torch.Generator().manual_seed(0)))
        assert float(dgd_of(dgd, student, calibration)) > 1e-3


def test_dgd_gradient_reaches_q_and_k_projection_weights(untrained_joint, float_model, calibration):
    student = copy.deepcopy(untrained_joint.model)
    dgd = DistributionGuidedDistillation(student, make_teacher(float_model), Scope.JOINT.towers, 1.0)
    with torch.enable_grad():
        loss = dgd_of(dgd, student, calibration)
        assert loss > 0
        loss.backward()
    for name, module in attention_modules(student).items():
        for proj in (module.q_proj, module.k_proj):
            assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0, name
    irm = irm_modules(student)["visual.transformer.resblocks.1.attn.k.irm"]
    assert irm.gamma.grad.abs().sum() > 0


def test_gram_distance_is_per_example_frobenius_of_row_normalised_grams():
    generator = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 1, 4, 3, generator=generator), torch.randn(2, 1, 4, 3, generator=generator)
    def gram(x):
        g = x[0] @ x[0].T
        return g / g.norm(dim=1, keepdim=True)
    expected = torch.stack([(gram(s[i]) - gram(t[i])).norm() for i in range(2)]).reshape(2, 1)
    assert torch.allclose(gram_distance(s, t), expected, atol=1e-6)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    sub = (gram(s[0, :, :2]) - gram(t[0, :, :2])).norm()
    assert torch.allclose(gram_distance(s, t, mask)[0, 0], sub, atol=1e-6)  # G restricted to the valid tokens


def test_dgd_excludes_text_positions_after_end_of_text(untrained_joint, float_model, calibration):
    mask = calibration.tokens != 0
    assert (~mask).any(dim=1).all()  # every caption is padded
    student = copy.deepcopy(untrained_joint.model)
    dgd = DistributionGuidedDistillation(student, make_teacher(float_model), Scope.JOINT.towers, 1.0)
    with torch.no_grad():
        before = float(dgd_of(dgd, student, calibration))
        # change what the student computes at the padding positions only (causal attention: valid ones unchanged)
        student.model.token_embedding.weight[0] += 3.0 * torch.randn(64, generator=torch.Generator().manual_seed(4))
        after = float(dgd_of(dgd, student, calibration))
        with dgd.capture():
            student.encode_text(calibration.tokens)
        captured = dgd._student
        dgd._student = None
        teacher = dgd.teacher_qk(calibration.images, calibration.tokens)
        text_keys = [k for k in captured if student.tower_of(k) == "text"]
        assert len(text_keys) == 4
        text_only = {k: captured[k] for k in text_keys}, {k: teacher[k] for k in text_keys}
    assert after == pytest.approx(before, abs=1e-6)
    text_dgd = DistributionGuidedDistillation(student, make_teacher(float_model), ("text",), 1.0)
    masked = float(text_dgd.unweighted(*text_only, calibration.tokens))
    unmasked = float(text_dgd.unweighted(*text_only, None))
    assert unmasked > masked + 1e-3  # without the mask the padding positions would count


# -- training --------------------------------------------------------------------------------------
def test_short_training_lowers_the_objective_updates_irm_and_stays_verified(float_model, calibration):
    # lr_weights raised (1e-3); lr_quant stays at 1e-4: Adam moves a step by ~lr per update, and the 8-bit
    # probs / patch-embedding steps (~7e-3) collapse within a few updates at 1e-3 (measured)
    result = run(float_model, calibration, bits="w4a8", steps=8, batch_size=16, lr_weights=1e-3, lr_quant=1e-4)
    record = result.provenance["training"]
    assert record["auxiliary"] == "dgd" and len(record["auxiliary_losses"]) == 8
    assert record["calibration_loss_after"] < 0.9 * record["calibration_loss_before"]
    assert result.provenance["irm_training_batches"] == 8 * 4
    untrained = run(float_model, calibration, bits="w4a8", steps=0).model
    trained_irms, initial_irms = irm_modules(result.model), irm_modules(untrained)
    for name, irm in trained_irms.items():
        assert not torch.allclose(irm.running_mean, initial_irms[name].running_mean), name
        assert not torch.equal(irm.gamma, initial_irms[name].gamma), name
    report = verify_quantized(result.model, calibration.images[:4], None, Scope.VISUAL.towers,
                              float_extras=result.float_extras)
    assert report.passed, report.problems
