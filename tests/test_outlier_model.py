"""The toy model with planted activation outliers: same float function as toy-clip, and the measured
W8A8 accuracy ordering the outlier-aware PTQ methods were designed to produce (issue: SmoothQuant,
QuaRot and Outlier Suppression each beat MinMax)."""

from __future__ import annotations

import pytest
import torch

from qbench.engine.evaluate import EvalRequest, resolve, run
from qbench.model import LoadRequest
from qbench.registry import build_registry
from qbench_plugins.toyworld.plugin import OUTLIER_CHANNELS, load_toy_clip, load_toy_clip_outliers

LIMIT = 400


def test_planted_outliers_keep_the_float_function_and_create_outliers():
    plain, planted = load_toy_clip(LoadRequest()), load_toy_clip_outliers(LoadRequest())
    pixels = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(plain.encode_image(pixels), planted.encode_image(pixels), atol=1e-4)
    captured = {}
    block = planted.model.visual.transformer.resblocks[0]
    handle = block.ln_1.register_forward_hook(lambda module, inputs, output: captured.setdefault("x", output))
    with torch.no_grad():
        planted.encode_image(pixels)
    handle.remove()
    magnitude = captured["x"].abs().amax(dim=(0, 1))
    others = [c for c in range(magnitude.numel()) if c not in OUTLIER_CHANNELS]
    assert magnitude[list(OUTLIER_CHANNELS)].min() > 10 * magnitude[others].median()


@pytest.fixture(scope="module")
def accuracy_at_w8a8(tmp_path_factory):
    folder = tmp_path_factory.mktemp("outliers")
    registry = build_registry()

    measured: dict[str, tuple[float, float]] = {}

    def accuracy(quantizer: str) -> tuple[float, float]:
        if quantizer not in measured:
            request = EvalRequest(model="toy-clip-outliers", quantizer=quantizer, bits="w8a8", limit=LIMIT,
                                  proxy_n=256, cache_dir=str(folder))
            record = next(r for r in run(resolve(request, registry))["results"] if r["metric"] == "accuracy")
            measured[quantizer] = (record["fp32"], record["quantized"])
        return measured[quantizer]

    return accuracy


@pytest.mark.parametrize("method", ["smoothquant", "quarot", "outlier-suppression"])
def test_outlier_aware_methods_beat_minmax_on_accuracy(accuracy_at_w8a8, method):
    fp32, minmax = accuracy_at_w8a8("minmax")
    _, quantized = accuracy_at_w8a8(method)
    assert minmax < fp32 - 0.02  # the planted outliers really hurt per-tensor activation ranges
    assert quantized > minmax
