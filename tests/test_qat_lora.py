"""``qat-lora`` — QA-LoRA (``quantizers.md`` §3.4): with B = 0 the adapter model is the base group-quantized
model; only A and B train; the merge into real-valued zero points reproduces the adapter layers and keeps
at most 2^b values per (row, group); fallback layers; the patch-embedding adapter pools F.unfold groups in the
conv weight's order; dropout only while training; same seed, same model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from qbench.errors import QbenchError
from qbench.quant.calibrate import calibrate_and_freeze
from qbench.quant.fake_quant import count_unique_per_group
from qbench.quant.modules import (
    QuantConv2d,
    QuantLinear,
    TensorQuantizer,
    make_activation_quantizer,
    make_weight_quantizer,
    quant_modules,
    quantize_modules,
    rewrite_tower_attention,
)
from qbench.quant.spec import BitSpec, Scope
from qbench.quant.verify import verify_quantized
from qbench.registry import build_registry
from qbench_plugins.quantizers.qat_lora import (
    ADAPTER,
    FALLBACK,
    GROUP_ONLY,
    GroupWeightQuantizer,
    QALoRAConfig,
    QALoRAConv2d,
    QALoRALinear,
    QALoRAModule,
    QALoRAQuantizer,
    layer_plan,
)


pytestmark = pytest.mark.usefixtures("single_thread")

TRAIN = {"steps": 3, "batch_size": 8, "lr_quant": 1e-2}  # a raised lr so that B moves in a few steps


class Unmerged(QALoRAQuantizer):
    """The plugin stopped before its merge: the trained adapter model."""

    def finalize(self, model, wrapped):
        return {}


def run(cls, config, float_model, calibration, bits="w4a8", scope=Scope.JOINT, seed=0):
    result = cls(config).quantize(copy.deepcopy(float_model), BitSpec.parse(bits), scope, calibration, seed)
    result.model.eval()  # Light QAT hands the student back in the wrapper's mode; compare in eval mode
    return result


@pytest.fixture(scope="module")
def untrained(float_model, calibration):
    return run(Unmerged, QALoRAConfig(steps=0), float_model, calibration).model


@pytest.fixture(scope="module")
def trained(float_model, calibration):
    return run(Unmerged, QALoRAConfig(**TRAIN), float_model, calibration).model


def merged_copy(model):
    """A deep copy of an adapter model merged by the plugin's own finalize step; returns (copy, provenance)."""
    merged = copy.deepcopy(model)
    provenance = QALoRAQuantizer().finalize(merged, dict(quant_modules(merged.model)))
    return merged.eval(), provenance


def adapters(model) -> dict[str, QALoRAModule]:
    return {name: m for name, m in quant_modules(model.model) if isinstance(m, QALoRAModule)}


@torch.no_grad()
def encode(model, data):
    return model.encode_image(data.images), model.encode_text(data.tokens)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# -- registration ----------------------------------------------------------------------------------
def test_registered_with_hybrid_light_qat_defaults_and_the_qa_lora_citation():
    cls = build_registry().get("quantizers", "qat-lora")
    assert cls is QALoRAQuantizer and cls.family == "qat" and cls.needs_data and cls.needs_grad
    assert cls.defaults() == {"steps": 100, "batch_size": 100, "lr_weights": 1e-6, "lr_quant": 1e-4,
                              "distill": "hybrid", "distill_weight": 0.5, "distill_form": "additive",
                              "n_calibration": 1000, "group_size": 32, "rank": 8, "alpha": 16.0, "dropout": 0.05}
    assert "arXiv:2309.14717" in cls.citation and "yuhuixu1993/qa-lora" in cls.citation


@pytest.mark.parametrize("params", [{"rank": 0}, {"group_size": 0}, {"dropout": 1.0}, {"alpha": float("inf")}])
def test_bad_settings_are_one_line_errors(params, float_model, calibration):
    with pytest.raises(QbenchError):
        run(QALoRAQuantizer, QALoRAConfig(steps=0, **params), float_model, calibration)


# -- B = 0 -----------------------------------------------------------------------------------------
def base_group_quantized(float_model, calibration, towers):
    """The same layers group-quantized without adapters, built from the core primitives only."""
    vlm = copy.deepcopy(float_model)
    rewrite_tower_attention(vlm, towers)
    quantize_modules(
        vlm, towers,
        lambda name, m: (TensorQuantizer(4, symmetric=False, granularity="group-32") if m.weight[0].numel() % 32 == 0
                         else make_weight_quantizer(4, "per_channel")),
        lambda name, m: make_activation_quantizer(8),
    )
    calibrate_and_freeze(vlm, calibration, towers, n=len(calibration), batch_size=16, method="base")
    return vlm.eval()


def test_with_B_zero_the_adapter_model_is_the_base_group_quantized_model(untrained, float_model, calibration):
    layers = adapters(untrained)
    assert len(layers) == 25  # the patch conv and every Linear of both towers (all rows divisible by 32)
    for name, module in layers.items():
        assert module.lora_A.shape == (8, module.weight[0].numel() // 32), name
        assert torch.count_nonzero(module.lora_B) == 0 and module.lora_B.shape == (module.weight.shape[0], 8), name
        bound = (6.0 / sum(module.lora_A.shape)) ** 0.5  # Xavier-uniform
        assert module.lora_A.abs().max() <= bound and module.lora_A.std() > bound / 4, name
    base = base_group_quantized(float_model, calibration, Scope.JOINT.towers)
    image, text = encode(untrained, calibration)
    base_image, base_text = encode(base, calibration)
    assert torch.equal(image, base_image) and torch.equal(text, base_text)


# -- training --------------------------------------------------------------------------------------
def test_training_moves_the_lora_factors_and_nothing_else(trained, untrained):
    before, after = untrained.state_dict(), trained.state_dict()
    assert before.keys() == after.keys()
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    lora = {key for key in before if key.endswith((".lora_A", ".lora_B"))}
    assert len(lora) == 2 * 25 and changed == lora  # every factor moved; weights, biases, (s, z), norms did not
    assert all(torch.count_nonzero(m.lora_B) > 0 for m in adapters(trained).values())
    quantizer = QALoRAQuantizer()
    wrapped = dict(quant_modules(trained.model))
    assert quantizer.trainable_weights(wrapped) == []
    params = quantizer.quantizer_parameters(trained, wrapped)
    assert {id(p) for p in params} == {id(p) for m in adapters(trained).values() for p in (m.lora_A, m.lora_B)}


# -- merge -----------------------------------------------------------------------------------------
def adapter_io(model, data) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Input and output of every adapter layer on one batch of images and captions."""
    seen, handles = {}, []
    for name, module in adapters(model).items():
        handles.append(module.register_forward_hook(
            lambda m, args, out, name=name: seen.__setitem__(name, (args[0].detach(), out.detach()))))
    try:
        encode(model, data)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def test_merged_layers_equal_the_adapter_layers_and_hold_at_most_2_to_the_b_values(trained, calibration):
    merged, provenance = merged_copy(trained)
    assert provenance["adapters_merged"] == 25 and provenance["zero_point_shift_steps"]["max_abs"] > 0.05
    assert provenance["deployed_extra_parameters"] == 0
    io = adapter_io(trained, calibration)
    before = adapters(trained)
    modules = dict(quant_modules(merged.model))
    assert len(io) == 25 and not adapters(merged)
    for name, (x, out) in io.items():
        module = modules[name]
        assert type(module) in (QuantLinear, QuantConv2d), name  # a plain quantized layer, branch dropped
        assert not any("lora" in key for key, _ in module.named_parameters()) and not hasattr(module, "group_size")
        with torch.no_grad():
            assert relative(module(x), out) <= 1e-5, name
        quantizer = module.weight_quantizer
        assert isinstance(quantizer, GroupWeightQuantizer) and quantizer.merged
        original = before[name].weight_quantizer
        assert torch.equal(quantizer.zero_point, original.zero_point) and torch.equal(quantizer.scale, original.scale)
        real = quantizer.dequant_zero_point
        assert not torch.equal(real, real.round())  # the zero points became real-valued
        with torch.no_grad():
            deployed = quantizer(module.weight)
        groups = quantizer.group_view(deployed)
        codes = quantizer.group_view(module.weight.detach()).div(quantizer.scale[:, None]).round()
        codes = (codes + quantizer.zero_point[:, None]).clamp(0, 15)  # the integer codes are the unmerged ones
        assert torch.allclose(groups, (codes - real[:, None]) * quantizer.scale[:, None], rtol=0, atol=1e-6)
        unique = count_unique_per_group(groups)
        assert int(unique.max()) <= 2**4 and int(unique.max()) >= 2, name
    report = verify_quantized(merged, calibration.images[:4], calibration.tokens[:4], Scope.JOINT.towers)
    assert report.passed, report.problems
    assert {check.weight_granularity for check in report.modules} == {"group-32"}


def test_merged_embeddings_equal_the_adapter_model(float_model, calibration):
    # A16: with activation quantizers a 1e-7 float difference can move an activation across a rounding
    # boundary in a later layer (a whole step), so the model-level comparison is made with float inputs;
    # the layer-level one above runs at A8.
    model = run(Unmerged, QALoRAConfig(**TRAIN), float_model, calibration, bits="w4a16").model
    merged, _ = merged_copy(model)
    for adapted, plain in zip(encode(model, calibration), encode(merged, calibration)):
        assert relative(plain, adapted) <= 1e-5
    base = copy.deepcopy(model)
    for module in adapters(base).values():
        module.lora_B.data.zero_()
    assert relative(encode(base, calibration)[0], encode(model, calibration)[0]) > 1e-3  # the branch mattered


def test_the_plugin_returns_the_merged_model(float_model, calibration):
    result = run(QALoRAQuantizer, QALoRAConfig(**TRAIN), float_model, calibration, scope=Scope.VISUAL)
    modules = dict(quant_modules(result.model.model))
    assert len(modules) == 13 and all(type(m) in (QuantLinear, QuantConv2d) for m in modules.values())
    assert all(m.weight_quantizer.merged for m in modules.values())
    assert result.provenance["weight_layout"] == {"group_asym_with_adapter": 13, "group_asym_without_adapter": 0,
                                                  "per_channel_sym_fallback": 0}
    assert result.provenance["extra_parameters"] == result.provenance["lora"]["trained_parameters"] > 0
    assert result.provenance["weights"]["granularity"] == "group-32"


# -- layer plan ------------------------------------------------------------------------------------
def test_layers_whose_rows_do_not_divide_into_groups_fall_back_to_per_channel_without_adapter(float_model, calibration):
    # g = 48: the patch conv (3·8·8 = 192 inputs) keeps an adapter, every Linear (64 or 256 inputs) falls back
    config = QALoRAConfig(steps=0, group_size=48)
    unmerged = run(Unmerged, config, float_model, calibration, scope=Scope.VISUAL).model
    assert list(adapters(unmerged)) == ["visual.conv1"]
    assert adapters(unmerged)["visual.conv1"].lora_A.shape == (8, 4)
    result = run(QALoRAQuantizer, config, float_model, calibration, scope=Scope.VISUAL)
    modules = dict(quant_modules(result.model.model))
    linears = [name for name, m in modules.items() if isinstance(m, QuantLinear)]
    assert len(linears) == 12
    assert result.provenance["weight_layout"] == {"group_asym_with_adapter": 1, "group_asym_without_adapter": 0,
                                                  "per_channel_sym_fallback": 12}
    assert result.provenance["fallback_modules"] == linears
    for name in linears:
        quantizer = modules[name].weight_quantizer
        assert not isinstance(quantizer, GroupWeightQuantizer) and str(quantizer.granularity) == "per_channel"
        assert quantizer.symmetric and quantizer.scale.shape == (modules[name].weight.shape[0],)
    assert str(modules["visual.conv1"].weight_quantizer.granularity) == "group-48"
    report = verify_quantized(result.model, calibration.images[:4], None, Scope.VISUAL.towers)
    assert report.passed, report.problems


def test_grouped_and_depthwise_convs_get_no_adapter():
    assert layer_plan(torch.nn.Conv2d(3, 16, 8, stride=8), 32) == ADAPTER  # 192 inputs
    assert layer_plan(torch.nn.Conv2d(64, 64, 1, groups=2), 32) == GROUP_ONLY  # rows of 32: group weights only
    assert layer_plan(torch.nn.Conv2d(16, 16, 3, groups=16), 32) == FALLBACK  # depthwise 3×3: rows of 9
    assert layer_plan(torch.nn.Linear(80, 8), 32) == FALLBACK and layer_plan(torch.nn.Linear(96, 8), 32) == ADAPTER


# -- the patch-embedding conv ----------------------------------------------------------------------
def test_patch_embedding_adapter_pools_the_conv_weights_flattened_groups(trained):
    conv = adapters(trained)["visual.conv1"]
    assert isinstance(conv, QALoRAConv2d) and conv.lora_A.shape == (8, 3 * 8 * 8 // 32)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    pooled = conv.pooled_input(x)
    assert pooled.shape == (2, 6, 16)
    for i in range(4):
        for j in range(4):
            patch = x[:, :, 8 * i: 8 * i + 8, 8 * j: 8 * j + 8].reshape(2, -1)  # (c, kh, kw): the weight's row order
            assert torch.allclose(pooled[:, :, 4 * i + j], patch.reshape(2, 6, 32).mean(dim=2), atol=1e-6)
    with torch.no_grad():
        x_hat, weight = conv.quantized_operands(x)
        main = F.conv2d(x_hat, weight, conv.bias, stride=8)
        branch = torch.einsum("or,rk,nkl->nol", conv.lora_B, conv.lora_A, conv.pooled_input(x_hat)) * 2.0
        assert torch.allclose(conv(x), main + branch.reshape(main.shape), atol=1e-5)
        assert branch.abs().max() > 1e-3


# -- dropout ---------------------------------------------------------------------------------------
def test_lora_dropout_is_active_only_while_training(trained):
    module = copy.deepcopy(adapters(trained)["visual.transformer.resblocks.0.mlp.c_fc"])
    assert isinstance(module, QALoRALinear) and module.dropout == 0.05
    x = torch.randn(4, 17, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        module.eval()
        calls = module.dropout_calls  # 3 training steps so far
        reference = module(x)
        assert torch.equal(module(x), reference) and module.dropout_calls == calls == 3
        x_hat, weight = module.quantized_operands(x)
        branch = 2.0 * module.pooled_input(x_hat) @ module.lora_A.T @ module.lora_B.T  # (α/r) = 2
        expected = F.linear(x_hat, weight, module.bias) + branch
        assert torch.allclose(reference, expected, atol=1e-6)
        module.weight_quantizer.train()  # Light QAT: student in eval mode, its quantizers in training mode
        first, second = module(x), module(x)
        assert not torch.equal(first, reference) and not torch.equal(first, second)
        module.weight_quantizer.eval()
        module.train()  # a module in training mode drops as well
        assert not torch.equal(module(x), reference)
        ones = torch.ones(200, 500)
        dropped = module.drop(ones)
        assert 0.04 < float((dropped == 0).float().mean()) < 0.06
        assert torch.allclose(dropped[dropped != 0], torch.tensor(1 / 0.95))
        module.dropout = 0.0
        assert torch.equal(module(x), reference)
    replay = copy.deepcopy(adapters(trained)["visual.transformer.resblocks.0.mlp.c_fc"]).train()
    with torch.no_grad():
        assert torch.equal(replay(x), first)  # masks replay from (seed, module, call)


# -- determinism -----------------------------------------------------------------------------------
def test_same_seed_same_model(float_model, calibration):
    config = QALoRAConfig(**TRAIN)
    first = run(QALoRAQuantizer, config, float_model, calibration, scope=Scope.VISUAL, seed=5).model.state_dict()
    second = run(QALoRAQuantizer, config, float_model, calibration, scope=Scope.VISUAL, seed=5).model.state_dict()
    other = run(QALoRAQuantizer, config, float_model, calibration, scope=Scope.VISUAL, seed=6).model.state_dict()
    assert first.keys() == second.keys() and any(key.endswith("dequant_zero_point") for key in first)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
