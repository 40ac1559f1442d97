"""IGQ-ViT (quantizers.md §2.3): dynamic instance groups, per-group value counts, the G = 1 reduction,
k-means, and end-to-end verification on the tiny CLIP."""

from __future__ import annotations

import copy

import pytest
import torch

from qbench.errors import QbenchError
from qbench.quant.fake_quant import QuantFormat, count_unique_per_group
from qbench.quant.instance_groups import InstanceGroupQuantizer, grouped_rows, kmeans, valid_positions
from qbench.quant.modules import TensorQuantizer
from qbench.quant.observers import valid_tokens
from qbench.quant.spec import BitSpec, Scope
from qbench.quant.verify import verify_quantized
from qbench_plugins.quantizers.igq_vit import IGQViTQuantizer
from tiny_models import embeddings, proxy_batch, tiny_vlm


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny tensors gain nothing from intra-op threads on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def channel_data(n: int = 6, tokens: int = 10, channels: int = 12, seed: int = 0) -> torch.Tensor:
    """``(n, tokens, channels)`` activations whose channel ranges span two orders of magnitude."""
    generator = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-1, 1, channels)
    offsets = torch.linspace(-1.0, 2.0, channels)
    return torch.randn(n, tokens, channels, generator=generator) * scales + offsets


def calibrated(x: torch.Tensor, bits: int = 4, groups: int = 4, layout: str = "channels_last"):
    quantizer = InstanceGroupQuantizer(bits, groups, layout=layout)
    quantizer(x)  # calibrate mode: observe, pass float through
    assert quantizer.freeze()
    return quantizer


def test_grouping_is_dynamic_permuting_channel_ranges_permutes_assignments():
    x = channel_data()
    quantizer = calibrated(x)
    perm = torch.randperm(x.shape[-1], generator=torch.Generator().manual_seed(3))
    pair = torch.stack([x[0], x[0][:, perm]])  # instance 1 = instance 0 with its channels permuted
    assignment = quantizer.assign(pair)
    assert torch.equal(assignment[1], assignment[0][perm])
    assert assignment[0].unique().numel() > 1  # several groups in use, so the check is not vacuous
    assert not torch.equal(assignment[0], assignment[1])
    out = quantizer(pair)
    assert torch.equal(out[1], out[0][:, perm])


def test_at_most_2b_values_per_instance_and_group():
    x = channel_data(seed=1)
    quantizer = calibrated(x, bits=3, groups=4)
    out = quantizer(channel_data(seed=2))
    counts = count_unique_per_group(quantizer.group_view(out))
    assert counts.max() <= 2**3 and counts.max() >= 2
    per_instance = count_unique_per_group(out.reshape(out.shape[0], -1))
    assert per_instance.max() > 2**3  # different groups use different grids: a per-instance count would fail


def test_group_view_rows_hold_exactly_the_groups_elements():
    units = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    assignment = torch.tensor([[1, 0, 1, 2], [0, 0, 0, 0]])
    rows = grouped_rows(units, assignment, 3).reshape(2, 3, -1)
    assert set(rows[0, 0].tolist()) == {3.0, 4.0, 5.0}
    assert set(rows[0, 1].tolist()) == {0.0, 1.0, 2.0, 6.0, 7.0, 8.0}
    assert set(rows[0, 2].tolist()) == {9.0, 10.0, 11.0}
    assert set(rows[1, 0].tolist()) == set(units[1].flatten().tolist())
    assert rows[1, 1].unique().numel() == 1 and rows[1, 2].unique().numel() == 1  # empty groups add nothing


def test_g1_is_static_per_tensor_asymmetric_with_the_mean_channel_range():
    """G = 1: one centroid = (mean over calibration (instance, channel) of the channel min, same for max);
    every channel uses it, so IGQ equals a static per-tensor asymmetric quantizer with that range."""
    calibration = channel_data(seed=4)
    quantizer = calibrated(calibration, bits=4, groups=1)
    mins, maxs = calibration.amin(dim=1).double(), calibration.amax(dim=1).double()  # (instance, channel)
    lo, hi = mins.mean().float().reshape(1), maxs.mean().float().reshape(1)  # k-means averages in float64
    reference = TensorQuantizer(4, symmetric=False, granularity="per_tensor")
    reference.scale, reference.zero_point = QuantFormat(4, symmetric=False).qparams(lo, hi)
    reference.set_mode("quantize")
    x = channel_data(seed=5)
    assert torch.equal(quantizer.lower, lo) and torch.equal(quantizer.upper, hi)
    assert torch.equal(quantizer(x), reference(x))


def test_kmeans_lowers_the_assignment_cost_from_its_quantile_init():
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[-1.0, 1.0], [-3.0, 4.0], [-0.2, 9.0], [-6.0, 20.0]])
    points = torch.cat([c + 0.3 * torch.randn(50, 2, generator=generator) for c in centres])
    result = kmeans(points, 4, iters=20)
    assert result.cost < result.init_cost
    assert kmeans(points, 4, iters=0).cost == pytest.approx(result.init_cost)
    found = sorted(result.centroids[:, 1].tolist())
    assert found == pytest.approx(sorted(centres[:, 1].tolist()), abs=0.3)


def test_softmax_rows_are_unsigned_and_grouped_by_row_max():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 2, 9, 9, generator=generator) * torch.linspace(0.1, 6.0, 9).view(1, 1, 9, 1)
    probs = logits.softmax(dim=-1)
    quantizer = calibrated(probs, bits=4, groups=3, layout="rows")
    assert torch.equal(quantizer.lower, torch.zeros(3)) and torch.equal(quantizer.zero_point, torch.zeros(3))
    out = quantizer(probs)
    assert out.min() >= 0 and count_unique_per_group(quantizer.group_view(out)).max() <= 16
    assignment = quantizer.assign(probs)  # (instance, head·row): sharper rows (larger max) go to larger ranges
    row_max = probs.amax(dim=-1).reshape(4, -1)
    chosen = (row_max - quantizer.upper[assignment]) ** 2
    assert torch.all(chosen[..., None] <= (row_max[..., None] - quantizer.upper) ** 2 + 1e-12)


def test_text_calibration_ignores_positions_after_end_of_text():
    x = torch.zeros(2, 5, 3)
    x[:, :3] = 1.0
    x[:, 3:] = 100.0  # padding garbage
    mask = torch.tensor([[True, True, True, False, False]] * 2)
    with valid_tokens(mask):
        assert torch.equal(valid_positions(x), mask)
        quantizer = calibrated(x, groups=1)
    assert quantizer.upper.item() == pytest.approx(1.0)
    assert valid_positions(x) is None  # no mask active


@pytest.fixture(scope="module")
def model_and_data():
    vlm = tiny_vlm(outlier_channels=(3, 17))
    return vlm, proxy_batch(vlm, n=8)


def test_quantized_tiny_clip_verifies_with_grouped_softmax(model_and_data):
    vlm, data = model_and_data
    result = IGQViTQuantizer.from_params({"n_calibration": 8, "groups": 4}).quantize(
        copy.deepcopy(vlm), BitSpec.parse("w4a8"), Scope.JOINT, data, seed=0
    )
    report = verify_quantized(result.model, data.images[:4], data.tokens[:4], Scope.JOINT.towers)
    assert report.passed, report.problems
    assert len(report.slots) == 4 and all(s.act_granularity == "instance-row-groups-4" for s in report.slots)
    assert all(m.act_granularity == "instance-channel-groups-4" for m in report.modules)
    assert result.provenance["probs_slots"] == 4
    image, text = embeddings(result.model, data)
    assert torch.isfinite(image).all() and torch.isfinite(text).all()
    costs = [q.kmeans_cost for _, q in result.model.model.named_modules() if isinstance(q, InstanceGroupQuantizer)]
    assert costs and all(final <= init for init, final in costs)


def test_allocate_is_rejected_with_a_one_line_error(model_and_data):
    vlm, data = model_and_data
    with pytest.raises(QbenchError, match="not implemented") as error:
        quantizer = IGQViTQuantizer.from_params({"allocate": True})
        quantizer.quantize(copy.deepcopy(vlm), BitSpec.parse("w8a8"), Scope.VISUAL, data, 0)
    assert "\n" not in str(error.value)
