"""Light QAT (``quantizers.md`` §1.8) and the QAT plugins ``qat-ste*`` (§3.1) and ``lsq*`` (§3.2, §3.3):
the shared losses and schedule, the STE and EMA ranges of qat-ste, the LSQ wiring (every step learns, with
the right gradient scale, per channel for lsq-pc), training on the toy world, and seed determinism."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from qbench.quant.base import CalibrationData
from qbench.quant.lsq import LSQQuantizer
from qbench.quant.modules import QuantModule, TensorQuantizer, quant_modules, rewrite_tower_attention
from qbench.quant.qat import (
    Embeddings,
    batch_schedule,
    contrastive_loss,
    logit_kl,
    qat_loss,
    schedule_steps,
)
from qbench.errors import QbenchError
from qbench.quant.spec import BitSpec, Scope
from qbench.quant.verify import verify_quantized
from qbench_plugins.quantizers import apq_vit
from qbench_plugins.quantizers.lsq_qat import (
    LSQActivationQuantizer,
    LSQConfig,
    LSQHybridConfig,
    LSQPerChannelQuantizer,
    LSQQATQuantizer,
)
from qbench_plugins.quantizers.qat_ste import EMAActivationQuantizer, QATSTEConfig, QATSTEQuantizer
from qbench.registry import build_registry


pytestmark = pytest.mark.usefixtures("single_thread")


def run(quantizer, float_model, calibration, bits="w4a8", scope=Scope.VISUAL, seed=0):
    return quantizer.quantize(copy.deepcopy(float_model), BitSpec.parse(bits), scope, calibration, seed)


def untrained(cls, config_cls, float_model, calibration, scope=Scope.VISUAL):
    """The plugin's model right after quantizer initialisation (0 training steps)."""
    return run(cls(config_cls(steps=0)), float_model, calibration, scope=scope).model


def backward_contrastive(model, data: CalibrationData) -> None:
    """One contrastive loss of the quantized model on ``data``, backpropagated."""
    with torch.enable_grad():
        image, text = model.encode_image(data.images), model.encode_text(data.tokens)
        contrastive_loss(image, text, model.logit_scale, model.logit_bias).backward()


# -- registration and defaults ---------------------------------------------------------------------
@pytest.mark.parametrize("name, distill", [("qat-ste", "contrastive"), ("qat-ste-hybrid", "hybrid"),
                                          ("lsq", "contrastive"), ("lsq-hybrid", "hybrid"), ("lsq-pc", "hybrid")])
def test_registered_with_light_qat_defaults(name, distill):
    cls = build_registry().get("quantizers", name)
    assert cls.family == "qat" and cls.needs_data and cls.needs_grad
    assert cls.defaults() == {"steps": 100, "batch_size": 100, "lr_weights": 1e-6, "lr_quant": 1e-4,
                              "distill": distill, "distill_weight": 0.5, "distill_form": "additive",
                              "n_calibration": 1000}


STUDY_PTQ = {"minmax", "smoothquant", "igq-vit", "qwt", "apq-vit", "quarot", "outlier-suppression", "q-vlm"}
STUDY_QAT = {"qat-ste", "qat-ste-hybrid", "lsq", "lsq-hybrid", "lsq-pc", "qat-lora", "q-vit", "rot-lsq"}


def test_the_studys_sixteen_quantizers_are_registered_with_their_family():
    entries = build_registry().entries("quantizers")
    by_family = {family: {e.name for e in entries if e.value.family == family} for family in ("ptq", "qat")}
    assert STUDY_PTQ <= by_family["ptq"] and STUDY_QAT <= by_family["qat"]
    assert len(STUDY_PTQ | STUDY_QAT) == 16


def test_schedules_name_the_studys_training_lengths():
    assert [schedule_steps(name) for name in ("light", "medium", "long", "2700")] == [100, 900, 8100, 2700]
    for bad in ("0", "-5", "short", "1e3"):
        with pytest.raises(QbenchError, match="bad schedule"):
            schedule_steps(bad)


def test_one_contrastive_loss_is_shared_with_apq_vit():
    assert apq_vit.contrastive_loss is contrastive_loss


# -- losses and schedule ---------------------------------------------------------------------------
def unit(rows: int, seed: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(rows, 8, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_distillation_terms_vanish_for_the_teacher_and_add_with_weight_lambda():
    teacher = Embeddings(unit(6, 0), unit(6, 1))
    student = Embeddings(unit(6, 2), unit(6, 3))
    kwargs = {"weight": 0.5, "form": "additive", "scale": 10.0, "bias": None}
    base = contrastive_loss(student.image, student.text, 10.0, None)
    for distill in ("contrastive", "hybrid", "kl"):
        same = qat_loss(teacher, teacher, ("visual", "text"), distill=distill, **kwargs)
        assert torch.allclose(same, contrastive_loss(teacher.image, teacher.text, 10.0, None))
    hybrid = qat_loss(student, teacher, ("visual",), distill="hybrid", **kwargs)
    feat = (student.image - teacher.image).pow(2).sum(1).mean()
    assert torch.allclose(hybrid, base + 0.5 * feat)
    joint = qat_loss(student, teacher, ("visual", "text"), distill="hybrid", **kwargs)
    assert torch.allclose(joint, hybrid + 0.5 * (student.text - teacher.text).pow(2).sum(1).mean())
    kl = qat_loss(student, teacher, ("visual",), distill="kl", **kwargs)
    assert kl > base
    convex = qat_loss(student, teacher, ("visual",), distill="hybrid", **{**kwargs, "form": "convex"})
    assert torch.allclose(convex, 0.5 * base + 0.5 * feat)


def test_logit_kl_averages_rows_and_columns():
    student, teacher = torch.randn(5, 5), torch.randn(5, 5)
    rows = sum(torch.sum(p.softmax(0) * (p.log_softmax(0) - q.log_softmax(0))) for p, q in zip(teacher, student)) / 5
    cols = sum(torch.sum(p.softmax(0) * (p.log_softmax(0) - q.log_softmax(0))) for p, q in zip(teacher.T, student.T)) / 5
    assert torch.allclose(logit_kl(student, teacher), 0.5 * (rows + cols), atol=1e-6)


def test_schedule_reshuffles_every_epoch_with_a_seed_and_honours_small_data():
    batches = batch_schedule(10, 4, 7, seed=3)
    assert len(batches) == 7 and all(len(b) == 4 for b in batches)
    first_epoch = torch.cat(batches[:2])
    assert len(set(first_epoch.tolist())) == 8  # one epoch = 2 full batches of a permutation (tail dropped)
    assert all(torch.equal(a, b) for a, b in zip(batches, batch_schedule(10, 4, 7, seed=3)))
    assert not all(torch.equal(a, b) for a, b in zip(batches, batch_schedule(10, 4, 7, seed=4)))
    assert [len(b) for b in batch_schedule(6, 100, 3, seed=0)] == [6, 6, 6]


# -- qat-ste ---------------------------------------------------------------------------------------
def test_ste_gradient_is_upstream_inside_the_range_and_zero_outside():
    quantizer = EMAActivationQuantizer(4)
    quantizer.observe(torch.tensor([-1.0, 1.0]))
    assert quantizer.freeze()
    quantizer.eval()
    x = torch.tensor([-3.0, -0.9, -0.2, 0.0, 0.4, 0.99, 2.5], requires_grad=True)
    upstream = torch.arange(1.0, 8.0)
    (quantizer(x) * upstream).sum().backward()
    lo, hi = -1.0, 1.0
    inside = (x.detach() >= lo - quantizer.scale / 2) & (x.detach() <= hi + quantizer.scale / 2)
    assert torch.equal(x.grad, upstream * inside)
    assert x.grad[0] == 0 and x.grad[-1] == 0 and x.grad[1:-1].ne(0).all()


def test_ema_range_tracks_training_batches_and_is_frozen_in_eval():
    quantizer = EMAActivationQuantizer(8)
    quantizer.observe(torch.tensor([-1.0, 1.0]))
    quantizer.freeze()
    quantizer.train()
    quantizer(torch.tensor([-3.0, 5.0]))
    lo, hi = quantizer.observer.range()
    assert torch.allclose(lo, torch.tensor([-1.02])) and torch.allclose(hi, torch.tensor([1.04]))
    scale = quantizer.scale.clone()
    assert torch.allclose(scale, (hi - lo) / 255)
    quantizer.eval()
    quantizer(torch.tensor([-30.0, 50.0]))
    assert torch.equal(quantizer.scale, scale)


def test_qat_ste_scales_get_no_gradient_and_weights_are_requantized_per_step(float_model, calibration):
    model = untrained(QATSTEQuantizer, QATSTEConfig, float_model, calibration)
    modules = dict(quant_modules(model.model))
    for module in modules.values():
        for _, quantizer in module.quantizers():
            assert not list(quantizer.parameters())  # nothing learnable in the quantizers
    backward_contrastive(model, calibration)
    for module in modules.values():
        assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0
        for _, quantizer in module.quantizers():
            assert quantizer.scale is not None and not quantizer.scale.requires_grad and quantizer.scale.grad is None


def test_qat_ste_one_step_changes_weights_only(float_model, calibration):
    config = QATSTEConfig(steps=1, batch_size=8, lr_weights=1e-3)
    result = run(QATSTEQuantizer(config), float_model, calibration)
    trained = result.model.model.state_dict()
    reference = copy.deepcopy(float_model)
    rewrite_tower_attention(reference, Scope.VISUAL.towers)  # same module names as the student
    original = reference.model.state_dict()
    changed = {name for name, value in original.items() if name in trained and not torch.equal(value, trained[name])}
    weights = {f"{name}.weight" for name, _ in quant_modules(result.model.model)}
    assert weights <= changed  # every quantized weight moved
    assert all(name.endswith((".weight", ".bias")) for name in changed)
    assert not any("ln" in name or "text" in name or "logit" in name for name in changed)
    assert result.provenance["training"]["steps"] == 1 and len(result.provenance["training"]["losses"]) == 1


# -- lsq -------------------------------------------------------------------------------------------
def lsq_quantizers(model) -> list[tuple[str, LSQQuantizer, QuantModule]]:
    return [(f"{name}.{role}", quantizer, module) for name, module in quant_modules(model.model)
            for role, quantizer in module.quantizers()]


def test_every_lsq_step_receives_a_nonzero_gradient_scaled_by_g(float_model, calibration):
    model = untrained(LSQQATQuantizer, LSQConfig, float_model, calibration, scope=Scope.JOINT)
    entries = lsq_quantizers(model)
    assert entries and all(isinstance(q, LSQQuantizer) for _, q, _ in entries)
    backward_contrastive(model, calibration)
    for name, quantizer, module in entries:
        assert quantizer.step.shape == (1,), name
        assert quantizer.step.grad is not None and quantizer.step.grad.abs().sum() > 0, name
    module = next(m for _, _, m in entries if isinstance(m, torch.nn.Linear))
    weight_q = module.weight_quantizer
    assert isinstance(weight_q, LSQQuantizer) and weight_q.fmt.qmin == -8 and weight_q.fmt.qmax == 7
    assert weight_q.grad_factor(module.weight) == pytest.approx(1 / math.sqrt(module.weight.numel() * 7))
    x = torch.randn(4, 17, module.in_features)
    act_q = module.act_quantizer
    assert act_q.grad_factor(x) == pytest.approx(1 / math.sqrt(17 * module.in_features * act_q.fmt.qmax))


def test_lsq_step_gradient_of_a_plugin_quantizer_carries_the_factor_g(float_model, calibration):
    model = untrained(LSQQATQuantizer, LSQConfig, float_model, calibration)
    _, quantizer, module = lsq_quantizers(model)[0]
    weight = module.weight.detach()
    upstream = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0))
    (quantizer(weight) * upstream).sum().backward()
    s = quantizer.step.detach()
    v = weight / s
    analytic = torch.where(v < -8, torch.tensor(-8.0), torch.where(v > 7, torch.tensor(7.0), -v + v.round()))
    expected = (upstream * analytic).sum() * quantizer.grad_factor(weight)
    assert torch.allclose(quantizer.step.grad, expected.reshape(1), rtol=1e-4, atol=1e-8)


def test_lsq_pc_steps_are_per_channel_and_learn_from_their_own_channel(float_model, calibration):
    model = untrained(LSQPerChannelQuantizer, LSQHybridConfig, float_model, calibration)
    for _, module in quant_modules(model.model):
        assert module.weight_quantizer.step.shape == (module.weight.shape[0],)
    _, module = next(iter(quant_modules(model.model)))
    quantizer, weight = module.weight_quantizer, module.weight.detach()
    upstream = torch.zeros_like(weight)
    upstream[2] = torch.randn(weight[2].shape, generator=torch.Generator().manual_seed(1))
    (quantizer(weight) * upstream).sum().backward()
    grad = quantizer.step.grad
    assert grad[2] != 0 and torch.count_nonzero(grad) == 1
    assert quantizer.grad_factor(weight) == pytest.approx(1 / math.sqrt(weight[0].numel() * 7))


def test_lsq_activation_grid_is_unsigned_only_for_nonnegative_calibration_values():
    positive, mixed = LSQActivationQuantizer(4), LSQActivationQuantizer(4)
    first = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    positive.observe(first)
    positive.observe(torch.tensor([[0.0, 9.0]]))
    mixed.observe(first)
    mixed.observe(torch.tensor([[-0.1, 9.0]]))
    assert positive.freeze() and mixed.freeze()
    assert (positive.fmt.qmin, positive.fmt.qmax) == (0, 15)
    assert (mixed.fmt.qmin, mixed.fmt.qmax) == (-8, 7)
    assert torch.allclose(positive.step, torch.tensor([2 * 1.5 / math.sqrt(15)]))  # first batch only
    assert torch.allclose(mixed.step, torch.tensor([2 * 1.5 / math.sqrt(7)]))


# -- training ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy_world():
    from qbench.data import DatasetRequest
    from qbench.model import LoadRequest
    from qbench_plugins.toyworld.plugin import load_toy_clip, load_toy_proxy

    vlm = load_toy_clip(LoadRequest())
    pairs = load_toy_proxy(DatasetRequest(seed=0), 256)
    images = torch.stack([vlm.preprocess(image) for image in pairs.images])
    data = CalibrationData(pairs.source, images, vlm.tokenize(pairs.captions), pairs.captions, pairs.fingerprint)
    return vlm, data


def test_qat_lowers_the_loss_on_the_toy_world_and_stays_on_the_grid(toy_world):
    vlm, data = toy_world
    config = LSQConfig(steps=12, batch_size=64, lr_weights=1e-4, lr_quant=1e-3)
    result = LSQQATQuantizer(config).quantize(copy.deepcopy(vlm), BitSpec.parse("w4a8"), Scope.VISUAL, data, 0)
    record = result.provenance["training"]
    assert record["calibration_loss_after"] < 0.9 * record["calibration_loss_before"]
    assert len(record["losses"]) == 12 and record["batch_size"] == 64
    report = verify_quantized(result.model, data.images[:8], data.tokens[:8], Scope.VISUAL.towers)
    assert report.passed, report.problems


@pytest.mark.parametrize("cls, config_cls", [(QATSTEQuantizer, QATSTEConfig), (LSQPerChannelQuantizer, LSQHybridConfig)])
def test_same_seed_same_trained_model(cls, config_cls, float_model, calibration):
    config = config_cls(steps=4, batch_size=6, lr_weights=1e-3, lr_quant=1e-2)
    first = run(cls(config), float_model, calibration, seed=5).model.state_dict()
    second = run(cls(config), float_model, calibration, seed=5).model.state_dict()
    other = run(cls(config), float_model, calibration, seed=6).model.state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_progress_callback_sees_every_step(float_model, calibration):
    seen: list[tuple[int, int, float]] = []
    quantizer = QATSTEQuantizer(QATSTEConfig(steps=3, batch_size=8))
    quantizer.progress = lambda step, total, loss: seen.append((step, total, loss))
    result = run(quantizer, float_model, calibration)
    assert [(step, total) for step, total, _ in seen] == [(1, 3), (2, 3), (3, 3)]
    assert [loss for _, _, loss in seen] == result.provenance["training"]["losses"]


def test_tensor_quantizers_of_qat_ste_are_static_after_training(float_model, calibration):
    result = run(QATSTEQuantizer(QATSTEConfig(steps=1, batch_size=8)), float_model, calibration)
    for _, module in quant_modules(result.model.model):
        assert isinstance(module.weight_quantizer, TensorQuantizer) and not module.weight_quantizer.dynamic
        assert module.weight_quantizer.scale.shape == (module.weight.shape[0],)
