"""SmoothQuant (quantizers.md §2.2) on tiny open_clip CLIPs with planted LN-gain outlier channels."""

import copy

import pytest
import torch

from qbench.errors import QbenchError
from qbench.quant.modules import rewrite_tower_attention
from qbench.quant.spec import BitSpec, Scope
from qbench.quant.structure import norm_reader_pairs
from qbench.quant.transforms import input_channel_absmax
from qbench.quant.verify import verify_quantized
from qbench_plugins.quantizers import smoothquant as smoothquant_plugin
from qbench_plugins.quantizers.minmax import MinMaxQuantizer
from qbench_plugins.quantizers.smoothquant import (
    SmoothQuantQuantizer,
    reader_input_absmax,
    smooth,
    smoothing_scales,
)
from tiny_models import embeddings, proxy_batch, tiny_vlm

pytestmark = pytest.mark.usefixtures("single_thread")

OUTLIERS = (3, 17)
BOTH = ("visual", "text")


@pytest.fixture(scope="module")
def outlier_vlm():
    return tiny_vlm(outlier_channels=OUTLIERS)


@pytest.fixture(scope="module")
def data(outlier_vlm):
    return proxy_batch(outlier_vlm, n=16, seed=1)


@pytest.fixture(scope="module")
def held_out(outlier_vlm):
    return proxy_batch(outlier_vlm, n=32, seed=7)


def quantize(vlm, data, bits="w8a8", scope=Scope.VISUAL, cls=SmoothQuantQuantizer, **params):
    return cls.from_params(params).quantize(copy.deepcopy(vlm), BitSpec.parse(bits), scope, data, seed=0)


def rel_max_diff(new: torch.Tensor, old: torch.Tensor) -> float:
    return float((new - old).abs().max() / old.abs().max())


def test_plugin_contract():
    assert (SmoothQuantQuantizer.name, SmoothQuantQuantizer.family) == ("smoothquant", "ptq")
    assert SmoothQuantQuantizer.needs_data and not SmoothQuantQuantizer.needs_grad
    assert "Xiao" in SmoothQuantQuantizer.citation and "2211.10438" in (smoothquant_plugin.__doc__ or "")
    assert SmoothQuantQuantizer.defaults() == {
        "alpha": 0.5, "n_calibration": 512, "act_granularity": "per_tensor", "batch_size": 100,
    }
    assert smoothquant_plugin.qbench_register_quantizers() == [SmoothQuantQuantizer]


def test_smoothing_scale_formula_and_clamps():
    a = torch.tensor([4.0, 0.0, 100.0, 1.0])
    w = torch.tensor([1.0, 0.5, 0.25, 0.0])
    s = smoothing_scales(a, w, alpha=0.5)
    expected = torch.tensor([2.0, 1e-5, 10.0 / 0.5, 1.0 / (1e-5) ** 0.5], dtype=torch.float64)
    assert torch.allclose(s, expected)
    assert torch.allclose(smoothing_scales(a[:1], w[:1], alpha=1.0), torch.tensor([4.0], dtype=torch.float64))


def test_folding_is_exact_and_flattens_the_channel_profile(outlier_vlm, data):
    """Before quantizers: same embeddings (rel. max diff ≤ 1e-5); per pair, max/median of a_j does not grow."""
    vlm = copy.deepcopy(outlier_vlm)
    rewrite_tower_attention(vlm, BOTH)
    before = embeddings(vlm, data)
    pairs = norm_reader_pairs(vlm, BOTH)
    stats_before = reader_input_absmax(vlm, pairs, data.images, data.tokens, batch_size=8)
    weight_before = {pair.norm_name: input_channel_absmax(pair) for pair in pairs}

    scales = smooth(vlm, BOTH, data, alpha=0.5, batch_size=8)
    after = embeddings(vlm, data)
    for old, new in zip(before, after):
        assert rel_max_diff(new, old) <= 1e-5
    assert len(scales) == len(pairs) == 8
    stats_after = reader_input_absmax(vlm, pairs, data.images, data.tokens, batch_size=8)
    for pair in pairs:
        a_old, a_new = stats_before[pair.norm_name], stats_after[pair.norm_name]
        s = scales[pair.norm_name].float()
        assert torch.allclose(s.double(), smoothing_scales(a_old, weight_before[pair.norm_name], 0.5))
        assert torch.allclose(a_new, a_old / s, rtol=1e-4)
        ratio_old = float(a_old.max() / a_old.median())
        ratio_new = float(a_new.max() / a_new.median())
        assert ratio_new < ratio_old  # spec: ≤; with planted outliers in every LN it must strictly drop
    visual_ln1 = stats_before["visual.transformer.resblocks.0.ln_1"]
    assert set(visual_ln1.topk(2).indices.tolist()) == set(OUTLIERS)  # the planted outliers are what was flattened


def test_w8a8_beats_minmax_on_planted_outliers(outlier_vlm, data, held_out):
    """Embedding error vs FP on held-out random images: smoothing < plain minmax (measured, not tuned)."""
    reference = embeddings(outlier_vlm, held_out)[0]

    def error(cls, **params):
        vlm = quantize(outlier_vlm, data, "w8a8", Scope.VISUAL, cls, **params).model
        return float((embeddings(vlm, held_out)[0] - reference).norm(dim=1).mean())

    minmax, smoothquant = error(MinMaxQuantizer), error(SmoothQuantQuantizer)
    per_token = error(SmoothQuantQuantizer, act_granularity="per_token")
    assert 0 < smoothquant < minmax
    assert 0 < per_token < minmax


@pytest.mark.parametrize("scope", [Scope.VISUAL, Scope.JOINT])
def test_provenance_and_verification(outlier_vlm, data, scope):
    result = quantize(outlier_vlm, data, "w8a8", scope, n_calibration=12, batch_size=5)
    report = verify_quantized(result.model, data.images[:4], data.tokens[:4], scope.towers)
    assert report.passed, report.problems
    provenance = result.provenance
    assert provenance["alpha"] == 0.5 and provenance["method"] == "smoothquant"
    expected_pairs = {"visual": 4} if scope is Scope.VISUAL else {"visual": 4, "text": 4}
    assert provenance["smoothed_pairs_by_tower"] == expected_pairs
    assert provenance["smoothed_pairs"] == sum(expected_pairs.values())
    stats = provenance["smoothing_scales"]
    assert 1e-5 <= stats["min"] <= stats["median"] <= stats["max"]
    assert provenance["calibration"]["n_images"] == 12
    assert provenance["calibration"]["n_texts"] == (12 if scope is Scope.JOINT else 0)
    assert provenance["activations"]["granularity"] == "per_tensor" and not provenance["activations"]["dynamic"]
    if scope is Scope.VISUAL:  # the text tower is out of scope: untouched, bit for bit
        assert torch.equal(result.model.encode_text(data.tokens[:4]), outlier_vlm.encode_text(data.tokens[:4]))


def test_per_token_is_dynamic_on_linear_inputs_only(outlier_vlm, data):
    result = quantize(outlier_vlm, data, "w8a8", Scope.VISUAL, act_granularity="per_token")
    report = verify_quantized(result.model, data.images[:4], None, ("visual",))
    assert report.passed, report.problems
    granularity = {check.name: check.act_granularity for check in report.modules}
    assert granularity.pop("visual.conv1") == "per_tensor"
    assert set(granularity.values()) == {"per_token"}


def test_text_statistics_ignore_padding(outlier_vlm, data):
    """Changing only what sits after end-of-text must not change any smoothing scale (§1.1)."""
    def scales(vlm):
        vlm = copy.deepcopy(vlm)
        rewrite_tower_attention(vlm, BOTH)
        return smooth(vlm, ("text",), data, alpha=0.5, batch_size=16)

    altered = copy.deepcopy(outlier_vlm)
    with torch.no_grad():
        altered.model.token_embedding.weight[0] += 50.0  # token 0 = padding after end-of-text
        altered.model.positional_embedding[-1] += 50.0  # last position: padding for every caption here
    original, changed = scales(outlier_vlm), scales(altered)
    assert original.keys() == changed.keys() and len(original) == 4
    for name in original:
        assert torch.equal(original[name], changed[name])


def test_bad_settings_are_one_line_errors(outlier_vlm, data):
    for params in ({"alpha": 1.5}, {"act_granularity": "per_channel"}, {"batch_size": 0}):
        with pytest.raises(QbenchError) as error:
            quantize(outlier_vlm, data, **params)
        assert "\n" not in str(error.value)
    with pytest.raises(QbenchError, match="needs calibration data"):
        quantize(outlier_vlm, None)
