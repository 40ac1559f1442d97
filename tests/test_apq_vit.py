"""APQ-ViT (quantizers.md §2.5): the MPQ log2 softmax quantizer, the BBC block search, verification."""

from __future__ import annotations

import copy

import pytest
import torch

from qbench.quant.blockwise import capture_block_inputs, tower_inputs
from qbench.quant.fake_quant import count_unique_per_group
from qbench.quant.modules import Mode, QuantModule, rewrite_tower_attention
from qbench.quant.spec import BitSpec, Scope
from qbench.quant.structure import transformer_blocks
from qbench.quant.verify import verify_quantized
from qbench_plugins.quantizers.apq_vit import (
    MPQ_SCALES,
    APQViTQuantizer,
    MPQLog2Quantizer,
    alpha_grid,
    bbc_metric,
    block_output_gradients,
    mpq_quantize,
)
from qbench_plugins.quantizers.minmax import MinMaxQuantizer
from tiny_models import proxy_batch, tiny_vlm

SMALL = {"n_calibration": 8, "alpha_step": 0.1, "sweeps": 1}
"""A coarser grid and one sweep keep the block search cheap; the properties tested hold for any setting."""


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py: tiny models, one thread


@pytest.fixture(scope="module")
def float_model():
    return tiny_vlm()


@pytest.fixture(scope="module")
def calibration(float_model):
    return proxy_batch(float_model, n=8, seed=1)


def attention_probs(rows: int = 512, length: int = 50, seed: int = 0) -> torch.Tensor:
    """Softmax rows from flat to peaked (logit temperatures spanning two decades)."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, length, generator=generator)
    temperature = torch.logspace(-1, 1, rows).unsqueeze(1)
    return (logits * temperature).softmax(dim=-1)


# -- MPQ -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("scale", MPQ_SCALES)
def test_mpq_has_at_most_2b_values_all_powers_of_two_of_s(bits, scale):
    p = attention_probs()
    q = mpq_quantize(p, scale, bits)
    assert int(count_unique_per_group(q.reshape(1, -1)).max()) <= 2**bits
    nonzero = q[q > 0].double()
    k = -torch.log2(nonzero / scale)
    assert torch.allclose(k, k.round(), atol=1e-5)
    assert int(k.round().min()) >= 0 and int(k.round().max()) <= 2**bits - 2
    threshold = scale * 2.0 ** -(2**bits - 1.5)
    assert torch.all(q[p < threshold] == 0) and torch.all(q[p >= threshold * 1.0001] > 0)
    # nearest level in the log2 domain: never more than half an octave away
    kept = (p >= threshold) & (p <= scale)
    assert float((torch.log2(q[kept]) - torch.log2(p[kept])).abs().max()) <= 0.5 + 1e-5


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("scale", MPQ_SCALES)
def test_mpq_keeps_a_dominant_attention_weight_dominant(bits, scale):
    p = attention_probs(seed=bits)
    top = p.topk(2, dim=-1)
    dominant = top.values[:, 0] >= 2 * top.values[:, 1]
    assert int(dominant.sum()) > 20
    q = mpq_quantize(p, scale, bits)[dominant]
    winner = top.indices[dominant, 0]
    best = q.gather(1, winner[:, None]).squeeze(1)
    others = q.scatter(1, winner[:, None], float("-inf")).amax(dim=1)
    assert torch.all(best > others)


def test_mpq_quantizer_is_a_verifiable_slot_quantizer():
    quantizer = MPQLog2Quantizer(4, scale=MPQ_SCALES[2])
    p = attention_probs(rows=8)
    assert torch.equal(quantizer(p), p)  # calibrate mode: float through, nothing to observe
    assert quantizer.freeze() and quantizer.mode is Mode.QUANTIZE
    assert torch.equal(quantizer(p), mpq_quantize(p, MPQ_SCALES[2], 4))
    assert quantizer.bits == 4 and quantizer.group_view(p).shape == (1, p.numel())
    assert "scale" in quantizer.state_dict()


# -- BBC -------------------------------------------------------------------------------------------
def test_alpha_grid_runs_from_alpha_min_to_one():
    grid = alpha_grid(0.30, 0.05)
    assert len(grid) == 15 and grid[0] == pytest.approx(0.30) and grid[-1] == 1.0
    assert alpha_grid(0.35, 0.1)[-1] == 1.0  # 1.0 is always a candidate, even off the step


def test_block_search_never_raises_the_metric_above_alpha_one(float_model, calibration):
    """Recompute M_b for every block of the searched model, then again with the block's quantizers put back
    at their minmax ranges (α = 1, taken from an independent minmax run on the same pairs) and MPQ s = 1."""
    bits = BitSpec.parse("w4a8")
    result = APQViTQuantizer.from_params(SMALL).quantize(copy.deepcopy(float_model), bits, Scope.VISUAL, calibration, 0)
    minmax = MinMaxQuantizer.from_params({"n_calibration": 8}).quantize(
        copy.deepcopy(float_model), bits, Scope.VISUAL, calibration, 0
    )
    reference = copy.deepcopy(float_model)
    rewrite_tower_attention(reference, ("visual",))
    targets = block_output_gradients(reference, transformer_blocks(reference, ("visual",)), calibration)

    model = result.model
    blocks = transformer_blocks(model, ("visual",))
    calls = {b.name: capture_block_inputs(model, b.module, batch_size=8, **tower_inputs(b.tower, calibration)) for b in blocks}
    lowered = 0
    for block in blocks:
        target, grad = targets.outputs[block.name], targets.grads[block.name]
        searched = bbc_metric(block.module, calls[block.name], target, grad, 0.5)
        assert searched == pytest.approx(result.provenance["blocks"][block.name]["metric"], rel=1e-5)
        assert searched <= min(_metric_at_mpq_scales(block, calls[block.name], target, grad)) * (1 + 1e-9)
        _reset_to_minmax(block, minmax.model)
        at_one = bbc_metric(block.module, calls[block.name], target, grad, 0.5)
        assert at_one == pytest.approx(result.provenance["blocks"][block.name]["metric_alpha_1"], rel=1e-5)
        assert searched <= at_one
        lowered += searched < at_one
    assert lowered >= 1  # at W4 the search finds something better than plain minmax ranges


def _metric_at_mpq_scales(block, calls, target, grad) -> list[float]:
    """M_b at every MPQ scale, the clip ratios as searched (the MPQ scale is the last coordinate searched,
    so the chosen one must be the best of these); the chosen scale is restored."""
    chosen = block.attention.probs.level_scale
    values = []
    for scale in MPQ_SCALES:
        block.attention.probs.set_level_scale(scale)
        values.append(bbc_metric(block.module, calls, target, grad, 0.5))
    block.attention.probs.set_level_scale(chosen)
    return values


def _reset_to_minmax(block, minmax_vlm) -> None:
    """Copy (s, z) of the minmax model's quantizers into ``block``; MPQ back to s = 1."""
    for name, module in block.linears:
        twin = minmax_vlm.model.get_submodule(name)
        assert isinstance(module, QuantModule) and isinstance(twin, QuantModule)
        for mine, theirs in ((module.weight_quantizer, twin.weight_quantizer), (module.act_quantizer, twin.act_quantizer)):
            mine.scale, mine.zero_point = theirs.scale.clone(), theirs.zero_point.clone()
    block.attention.probs.set_level_scale(1.0)


def test_block_gradients_are_zero_after_end_of_text(float_model, calibration):
    reference = copy.deepcopy(float_model)
    rewrite_tower_attention(reference, Scope.JOINT.towers)
    blocks = transformer_blocks(reference, Scope.JOINT.towers)
    targets = block_output_gradients(reference, blocks, calibration)
    assert all(float(targets.grads[b.name].abs().sum()) > 0 for b in blocks)
    after_eot = (calibration.tokens.argmax(dim=-1)[:, None] < torch.arange(calibration.tokens.shape[1])[None, :])
    for block in blocks:
        if block.tower == "text":
            assert float(targets.grads[block.name][after_eot].abs().max()) == 0.0


def test_verification_passes_with_probs_slots_quantized(float_model, calibration):
    result = APQViTQuantizer.from_params(SMALL).quantize(
        copy.deepcopy(float_model), BitSpec.parse("w4a4"), Scope.JOINT, calibration, 0
    )
    report = verify_quantized(result.model, calibration.images[:4], calibration.tokens[:4], Scope.JOINT.towers)
    assert report.passed, report.problems
    blocks = transformer_blocks(result.model, Scope.JOINT.towers)
    assert {slot.name for slot in report.slots} == {f"{block.name}.attn.probs" for block in blocks}
    assert {slot.tower for slot in report.slots} == {"visual", "text"}
    for slot in report.slots:
        assert slot.act_bits == 4 and 2 <= slot.act_max_unique <= 16
    assert all(isinstance(block.attention.probs, MPQLog2Quantizer) for block in blocks)
