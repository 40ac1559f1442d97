"""Q-VLM (quantizers.md §2.8): per-position static activations, entropy, entropy-driven partition,
blockwise shrink search, visual LayerNorm tuning, and end-to-end verification on the tiny CLIP."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from qbench.quant.fake_quant import count_unique_per_group
from qbench.quant.modules import QuantModule, rewrite_tower_attention
from qbench.quant.observers import valid_tokens
from qbench.quant.spec import BitSpec, Scope
from qbench.quant.verify import verify_quantized
from qbench_plugins.quantizers.q_vlm import (
    PositionQuantizer,
    QVLMQuantizer,
    entropy_partition,
    search_block,
    shrink_grid,
    token_entropy,
)
from tiny_models import embeddings, proxy_batch, tiny_vlm

SMALL = {"n_calibration": 8, "batch_size": 8, "ln_steps": 4, "sweeps": 1}


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny tensors gain nothing from intra-op threads on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def float_vlm():
    return tiny_vlm(outlier_channels=(3, 17))


@pytest.fixture(scope="module")
def data(float_vlm):
    return proxy_batch(float_vlm, n=8)


def run(float_vlm, data, bits="w4a8", scope=Scope.VISUAL, **params):
    quantizer = QVLMQuantizer.from_params({**SMALL, **params})
    return quantizer.quantize(copy.deepcopy(float_vlm), BitSpec.parse(bits), scope, data, seed=0)


@pytest.fixture(scope="module")
def joint(float_vlm, data):
    return run(float_vlm, data, scope=Scope.JOINT)


# -- per-position quantizer ------------------------------------------------------------------------
def test_one_range_per_token_position_and_at_most_2b_values_each():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 5, generator=generator) * torch.tensor([0.1, 1, 2, 4, 8, 16]).view(1, 6, 1)
    quantizer = PositionQuantizer(3)
    quantizer(x)
    assert quantizer.freeze()
    assert torch.equal(quantizer.upper, x.amax(dim=(0, 2))) and torch.equal(quantizer.lower, x.amin(dim=(0, 2)))
    out = quantizer(x)
    counts = count_unique_per_group(quantizer.group_view(out))
    assert counts.shape == (6,) and counts.max() <= 8 and counts.min() >= 2
    assert count_unique_per_group(out.reshape(1, -1)).item() > 8  # positions really have their own grids
    quantizer.set_shrink(0.5)
    assert out.abs().max() > quantizer(x).abs().max()  # shrinking clips


def test_text_positions_after_end_of_text_are_not_observed():
    x = torch.ones(2, 4, 3)
    x[0, 2:] = 50.0  # instance 0 ends at position 1; positions 2-3 are padding there
    x[1, 3] = 70.0  # instance 1 ends at position 2; position 3 is padding for everyone
    quantizer = PositionQuantizer(8)
    with valid_tokens(torch.tensor([[True, True, False, False], [True, True, True, False]])):
        quantizer(x)
    quantizer.freeze()
    assert quantizer.upper.tolist() == [1.0, 1.0, 1.0, 1.0]  # position 3 (never valid): union of the others


# -- entropy and partition -------------------------------------------------------------------------
def test_token_entropy_is_an_entropy_over_tokens():
    uniform = torch.ones(2, 8, 3)
    h, count = token_entropy(uniform)
    assert count == 6 and h / count == pytest.approx(math.log(8))
    one_hot = torch.zeros(2, 8, 3)
    one_hot[:, 0] = 5.0
    assert token_entropy(one_hot)[0] == pytest.approx(0.0, abs=1e-6)
    valid = torch.zeros(2, 8, dtype=torch.bool)
    valid[:, :4] = True
    h, count = token_entropy(uniform, valid)
    assert h / count == pytest.approx(math.log(4))
    assert token_entropy(torch.zeros(2, 8, 3))[1] == 0  # no mass: left out


def test_partition_closes_blocks_on_low_entropy_or_size():
    names = [f"l{i}" for i in range(8)]
    entropies = dict(zip(names, [5.0, 5.0, 5.0, 5.0, 1.0, 5.0, 1.0, 5.0]))  # median 5: only 1.0 < τ
    blocks = entropy_partition(names, entropies, max_block_layers=3)
    assert blocks == [["l0", "l1", "l2"], ["l3", "l4"], ["l5", "l6"], ["l7"]]
    assert entropy_partition(names, entropies, 3) == blocks


def test_partition_is_deterministic_and_covers_every_layer_once(joint, float_vlm, data):
    again = run(float_vlm, data, scope=Scope.JOINT)
    for tower in ("visual", "text"):
        partition = joint.provenance["towers"][tower]["partition"]
        assert partition == again.provenance["towers"][tower]["partition"]
        flat = [name for block in partition for name in block]
        modules = joint.model.model.named_modules()
        layers = [n for n, m in modules if isinstance(m, QuantModule) and joint.model.tower_of(n) == tower]
        assert sorted(flat) == sorted(layers) and len(flat) == len(set(flat))
        assert all(1 <= len(block) <= 3 for block in partition)


# -- block search ----------------------------------------------------------------------------------
def test_search_never_ends_above_the_error_at_c_1():
    quantizers = [PositionQuantizer(4), PositionQuantizer(4)]
    for quantizer in quantizers:
        quantizer(torch.randn(2, 3, 4))
        quantizer.freeze()
    calls = []

    def evaluate() -> float:  # bumpy, minimum at (0.6, 0.9)
        a, b = (q.shrink for q in quantizers)
        calls.append((a, b))
        return (a - 0.6) ** 2 + (b - 0.9) ** 2 + 0.05 * math.sin(40 * a)

    grid = shrink_grid(0.4, 0.1)
    assert grid == (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4)
    factors, start, best = search_block(quantizers, evaluate, grid, sweeps=2)
    assert best <= start and best == pytest.approx(evaluate())
    assert [q.shrink for q in quantizers] == factors and factors != [1.0, 1.0]
    assert len(calls) == len(set(calls)) + 1  # every configuration evaluated once (plus the check above)


def test_block_mse_never_rises_above_c_1_on_the_tiny_clip(joint):
    for tower in ("visual", "text"):
        blocks = joint.provenance["towers"][tower]["blocks"]
        assert all(block["mse"] <= block["mse_at_1"] for block in blocks)
    visual = joint.provenance["towers"]["visual"]["blocks"]
    assert any(block["mse"] < block["mse_at_1"] for block in visual)  # the search found something


# -- visual LayerNorm tuning -----------------------------------------------------------------------
def changed_parameters(float_vlm, quantized, scope: Scope) -> set[str]:
    reference = copy.deepcopy(float_vlm)
    rewrite_tower_attention(reference, scope.towers)
    before = dict(reference.model.named_parameters())
    return {name for name, p in quantized.model.model.named_parameters() if not torch.equal(p, before[name])}


def test_tuning_changes_only_visual_layernorm_parameters(joint, float_vlm):
    changed = changed_parameters(float_vlm, joint, Scope.JOINT)
    assert changed, "LN tuning changed nothing"
    assert all(name.startswith("visual.") and ("ln_" in name) for name in changed), changed
    assert all(p.requires_grad for p in joint.model.model.parameters())  # flags restored


def test_no_tuning_changes_no_parameter(float_vlm, data):
    assert not changed_parameters(float_vlm, run(float_vlm, data, ln_steps=0, sweeps=0), Scope.VISUAL)


def test_tuning_lowers_mean_entropy_when_the_entropy_term_weighs(float_vlm, data):
    """With the default λ_H = 0.01 the feature term dominates and entropy may move either way (recorded in
    provenance); with a weight that makes the entropy term count, step 4 lowers it."""
    tuning = run(float_vlm, data, ln_steps=10, sweeps=0, entropy_weight=1.0, ln_lr=1e-3).provenance["ln_tuning"]
    assert tuning["entropy_mean_after"] < tuning["entropy_mean_before"]
    assert tuning["loss_last"] < tuning["loss_first"]


# -- end to end ------------------------------------------------------------------------------------
def test_quantized_tiny_clip_verifies_per_position(joint, data):
    report = verify_quantized(joint.model, data.images[:4], data.tokens[:4], Scope.JOINT.towers)
    assert report.passed, report.problems
    kinds = {(m.kind, m.act_granularity) for m in report.modules}
    assert kinds == {("Linear", "per_position"), ("Conv2d", "per_tensor")}
    image, text = embeddings(joint.model, data)
    assert torch.isfinite(image).all() and torch.isfinite(text).all()
    provenance = joint.provenance
    assert "before_tuning" in provenance["towers"]["visual"] and "before_tuning" not in provenance["towers"]["text"]
    assert set(provenance["towers"]["visual"]["shrink"].values()) <= set(shrink_grid(0.4, 0.1))
