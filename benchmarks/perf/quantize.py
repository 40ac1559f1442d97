"""Quantize-time benchmark: seconds per quantization method, and the calibration-search speed-up (issue 16, item 3).

Quantizes a copy of one model with every built-in quantizer (``fp32`` included as the floor) at each bit
width, visual scope, on ``--proxy-n`` synthetic proxy pairs (random images at the model's resolution, short
captions), on one torch thread, and prints the seconds each ``Quantizer.quantize`` call took (the deep copy
of the model is made before the clock starts). Settings are the methods' defaults except where a default
would take hours here; every change is printed next to the method:

* ``n_calibration`` and ``batch_size`` capped at ``--proxy-n``;
* training steps (``steps`` of the QAT methods, ``ln_steps`` of q-vlm) set to ``--qat-steps``;
* apq-vit's search grid coarsened (``alpha_step`` 0.1, one sweep): at the defaults it evaluates ~340 block
  passes per block (about 17 minutes per bit width on ViT-B/32 here).

Then, for ``quarot`` (whose time is dominated by the MSE observer's clip search) and ``apq-vit`` (whose search
runs the quantized blocks hundreds of times), it times the same quantization with the fast paths off
(``qbench.quant.fake_quant.fused_fake_quant(False)``: the per-candidate MSE loop with a straight-through clip
mask per candidate, masks and re-quantized weights on every block pass: the code before issue 16) and on,
interleaved (before, after, before, after ...), and prints ``before/after`` = the speed-up; both give
bit-identical models (``tests/test_fused_fake_quant.py``).

Models: ``vitb32`` (default), a random-init open_clip ViT-B/32 at 224 px from the model registry
(``clip-vit-b32-laion2b`` with ``random_init``); ``toy``, the built-in ``toy-clip`` (what ``--quick`` uses).
A full run on ViT-B/32 takes tens of minutes on one thread. ``--quick``: the toy model, w4a8 only,
``fp32``, ``minmax``, ``quarot`` and ``apq-vit``, one before/after repetition (about two minutes here).
With ``--json`` the last stdout line is ``{"model": ..., "seconds": {bits: {method: s}}, "params": {method:
{...}}, "before_after": {method: {"before_s": s, "after_s": s, "ratio": r}}}``.

Usage: ``python benchmarks/perf/quantize.py [--quick] [--json] [--model vitb32|toy] [--bits w8a8 w4a8]
[--methods NAME ...] [--proxy-n 32] [--qat-steps 2] [--repeats 2] [--threads 1]``
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from typing import Any

import torch

MODELS = {
    "vitb32": ("clip-vit-b32-laion2b", True, 224),
    "toy": ("toy-clip", False, 32),
}
"""Label -> (model registry name, random init, image size)."""

SEARCH_METHODS = ("quarot", "apq-vit")
"""Methods timed with the fast paths off and on (the before/after of the calibration-search speed-up)."""

QUICK_METHODS = ("fp32", "minmax", "quarot", "apq-vit")


def registry():
    """The built-ins-only registry (no entry points: the benchmark measures qbench's own methods)."""
    from qbench.plugins import get_plugin_manager
    from qbench.registry import build_registry

    return build_registry(get_plugin_manager(load_entrypoints=False))


def load(label: str, proxy_n: int, reg) -> tuple[Any, Any]:
    """The float VLM of ``label`` and ``proxy_n`` synthetic proxy pairs for it."""
    from qbench.model import LoadRequest
    from qbench.quant.base import CalibrationData

    name, random_init, size = MODELS[label]
    torch.manual_seed(0)
    model = reg.get("models", name).loader(LoadRequest(random_init=random_init)).eval()
    generator = torch.Generator().manual_seed(0)
    captions = tuple(f"a photo of a small thing number {index}" for index in range(proxy_n))
    images = torch.randn(proxy_n, 3, size, size, generator=generator)
    data = CalibrationData("synthetic-proxy", images, model.tokenize(captions), captions, f"synthetic-{proxy_n}")
    return model, data


def bench_params(name: str, defaults: dict[str, Any], proxy_n: int, qat_steps: int) -> dict[str, Any]:
    """The overrides this benchmark applies to ``name``'s defaults (module docstring), empty when none."""
    changes: dict[str, Any] = {}
    for key in ("n_calibration", "batch_size"):
        if key in defaults and defaults[key] > proxy_n:
            changes[key] = proxy_n
    for key in ("steps", "ln_steps"):
        if key in defaults and defaults[key] > qat_steps:
            changes[key] = qat_steps
    if name == "apq-vit":
        changes.update(alpha_step=0.1, sweeps=1)
    return changes


def quantize_seconds(reg, name: str, params: dict[str, Any], model, bits: str, data, fast: bool = True) -> float:
    """Seconds of one ``quantize`` call of ``name`` on a fresh deep copy of ``model`` (copy made before timing)."""
    from qbench.quant.fake_quant import fused_fake_quant
    from qbench.quant.spec import BitSpec, Scope

    quantizer = reg.get("quantizers", name).from_params(params, reg)
    private = copy.deepcopy(model)
    spec = BitSpec.parse(bits)
    with fused_fake_quant(fast):
        started = time.perf_counter()
        quantizer.quantize(private, spec, Scope.VISUAL, data, seed=0)
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="toy model, w4a8, fp32/minmax/quarot/apq-vit")
    parser.add_argument("--json", action="store_true", help="print the measurements as one JSON line, last")
    parser.add_argument("--model", choices=sorted(MODELS), default=None)
    parser.add_argument("--bits", nargs="+", default=None)
    parser.add_argument("--methods", nargs="+", default=None, help="default: every built-in quantizer")
    parser.add_argument("--proxy-n", type=int, default=32)
    parser.add_argument("--qat-steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=None, help="before/after repetitions (default 2, quick 1)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reg = registry()
    label = args.model or ("toy" if args.quick else "vitb32")
    bits_list = args.bits or (["w4a8"] if args.quick else ["w8a8", "w4a8"])
    methods = args.methods or (list(QUICK_METHODS) if args.quick else sorted(reg.names("quantizers")))
    repeats = args.repeats or (1 if args.quick else 2)
    model, data = load(label, args.proxy_n, reg)
    print(f"model {label} ({MODELS[label][0]}{', random init' if MODELS[label][1] else ''}), "
          f"{args.proxy_n} synthetic proxy pairs, visual scope, threads={args.threads}")

    params = {name: bench_params(name, reg.get("quantizers", name).defaults(), args.proxy_n, args.qat_steps)
              for name in methods}
    seconds: dict[str, dict[str, float]] = {}
    for bits in bits_list:
        seconds[bits] = {}
        for name in methods:
            elapsed = quantize_seconds(reg, name, params[name], model, bits, data)
            seconds[bits][name] = round(elapsed, 3)
            changed = ", ".join(f"{key}={value}" for key, value in params[name].items()) or "defaults"
            print(f"  {bits} {name:<20} {elapsed:9.2f} s   ({changed})", flush=True)

    before_after: dict[str, dict[str, float]] = {}
    bits = "w4a8" if "w4a8" in bits_list else bits_list[0]
    for name in SEARCH_METHODS:
        if name not in methods:
            continue
        before, after = [], []
        for _ in range(repeats):
            before.append(quantize_seconds(reg, name, params[name], model, bits, data, fast=False))
            after.append(quantize_seconds(reg, name, params[name], model, bits, data, fast=True))
        ratios = [b / a for b, a in zip(before, after)]
        before_after[name] = {
            "before_s": round(statistics.median(before), 3),
            "after_s": round(statistics.median(after), 3),
            "ratio": round(statistics.median(ratios), 3),
        }
        print(f"search {name} {bits}: before {statistics.median(before):.2f} s, after {statistics.median(after):.2f} s, "
              f"before/after {statistics.median(ratios):.2f}x (median of {repeats} interleaved)", flush=True)
    if args.json:
        print(json.dumps({"model": label, "seconds": seconds, "params": params, "before_after": before_after}))


if __name__ == "__main__":
    main()
