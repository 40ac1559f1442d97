"""P4 benchmark: cost of a fake-quantized W8A8 forward pass relative to the FP32 one (issue 16, item 2).

Builds the image tower of the built-in toy model (``toy-clip``, shipped weights, 32 px) and of a random-init
open_clip ViT-B/32 at 224 px (the model registry's ``clip-vit-b32-laion2b`` with ``random_init``), quantizes
a copy of each with ``minmax`` W8A8 (visual scope, a few random calibration images), and times
``encode_image`` on a batch of 32 under ``torch.no_grad`` (as an evaluation runs it) for three variants,
interleaved (FP32, fast, reference, FP32, fast, reference, ...) so that load changes on a shared machine hit
all of them alike, on one torch thread unless told otherwise:

* ``fp32``: the float model;
* ``fast``: the quantized model as it runs now (fused quantize–dequantize, cached fake-quantized weights);
* ``reference``: the same quantized model with ``qbench.quant.fake_quant.fused_fake_quant(False)``, i.e. the
  code path before issue 16 (straight-through node and clip mask on every call, weights re-quantized on every
  forward).

Prints ``P4 toy <fast/fp32>`` and ``P4 vitb32 <fast/fp32>`` (medians of the per-repetition ratios; goal <= 1.5),
the reference ratios for before/after, and whether fast and reference features are bit-identical. With
``--json`` the last stdout line is ``{"p4_toy": r, "p4_vitb32": r, "p4_toy_reference": r,
"p4_vitb32_reference": r}``.

Usage: ``python benchmarks/perf/fakequant.py [--quick] [--json] [--models toy vitb32] [--repeats N] [--threads 1]``
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

MODELS = {
    "toy": ("toy-clip", False, 32),
    "vitb32": ("clip-vit-b32-laion2b", True, 224),
}
"""Benchmark label -> (model registry name, random init, image size)."""

BATCH = 32


@dataclass
class Subject:
    """The float and the quantized model of one benchmark row, and the batch they encode."""

    label: str
    fp32: Callable[[torch.Tensor], torch.Tensor]
    quantized: Callable[[torch.Tensor], torch.Tensor]
    images: torch.Tensor


def build(label: str, calibration_images: int) -> Subject:
    """Load ``label``'s model from the registry (built-ins only), quantize a copy with minmax W8A8 (visual)."""
    from qbench.model import LoadRequest
    from qbench.plugins import get_plugin_manager
    from qbench.quant.base import CalibrationData
    from qbench.quant.spec import BitSpec, Scope
    from qbench.registry import build_registry

    name, random_init, size = MODELS[label]
    registry = build_registry(get_plugin_manager(load_entrypoints=False))
    torch.manual_seed(0)
    fp32 = registry.get("models", name).loader(LoadRequest(random_init=random_init)).eval()
    generator = torch.Generator().manual_seed(0)
    captions = tuple(f"a photo of thing {index}" for index in range(calibration_images))
    data = CalibrationData(
        "benchmark-random", torch.randn(calibration_images, 3, size, size, generator=generator),
        fp32.tokenize(captions), captions, f"random-{calibration_images}",
    )
    params = {"n_calibration": calibration_images, "batch_size": calibration_images}
    quantizer = registry.get("quantizers", "minmax").from_params(params, registry)
    quantized = quantizer.quantize(copy.deepcopy(fp32), BitSpec.parse("w8a8"), Scope.VISUAL, data, seed=0).model.eval()
    images = torch.randn(BATCH, 3, size, size, generator=generator)
    return Subject(label, fp32.encode_image, quantized.encode_image, images)


def seconds(encode: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, calls: int, fast: bool) -> float:
    """Wall time of ``calls`` forward passes of ``encode`` on ``images`` without gradients."""
    from qbench.quant.fake_quant import fused_fake_quant

    with torch.no_grad(), fused_fake_quant(fast):
        started = time.perf_counter()
        for _ in range(calls):
            encode(images)
        return time.perf_counter() - started


def measure(subject: Subject, repeats: int, calls: int) -> dict[str, float]:
    """Interleaved repetitions of the three variants; the median ratios to FP32, and bit-identity."""
    from qbench.quant.fake_quant import fused_fake_quant

    few = subject.images[:8]
    with torch.no_grad():
        fast_features = subject.quantized(few)
        with fused_fake_quant(False):
            reference_features = subject.quantized(few)
    identical = torch.equal(fast_features, reference_features)
    for variant in (subject.fp32, subject.quantized):  # warm-up (allocator, weight cache, lazy inits)
        seconds(variant, few, 1, True)
    fast_ratios, reference_ratios = [], []
    for _ in range(repeats):
        fp32 = seconds(subject.fp32, subject.images, calls, True)
        fast = seconds(subject.quantized, subject.images, calls, True)
        reference = seconds(subject.quantized, subject.images, calls, False)
        fast_ratios.append(fast / fp32)
        reference_ratios.append(reference / fp32)
    return {
        "fast": statistics.median(fast_ratios),
        "reference": statistics.median(reference_ratios),
        "identical": identical,
        "spread": (min(fast_ratios), max(fast_ratios)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (about a minute here)")
    parser.add_argument("--json", action="store_true", help="print the measured ratios as one JSON line, last")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["toy", "vitb32"])
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repetitions (default 15, quick 5)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (5 if args.quick else 15)
    results: dict[str, float] = {}
    for label in args.models:
        subject = build(label, calibration_images=4 if label == "vitb32" else 32)
        calls = 5 if label == "toy" else 1  # ~0.1 s per toy timing, ~1-3 s per ViT-B/32 timing
        result = measure(subject, repeats if label == "toy" else max(3, repeats // 3), calls)
        low, high = result["spread"]
        print(f"P4 {label} {result['fast']:.3f}")
        print(f"  {label}: reference path (before issue 16) {result['reference']:.3f}x FP32; fast path "
              f"{result['fast']:.3f}x (range {low:.2f}-{high:.2f}); speed-up of the quantized forward "
              f"{result['reference'] / result['fast']:.2f}x; features bit-identical: {result['identical']}")
        results[f"p4_{label}"] = round(result["fast"], 4)
        results[f"p4_{label}_reference"] = round(result["reference"], 4)
    print(f"threads={args.threads}, batch={BATCH}, interleaved medians, goal: P4 <= 1.5")
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
