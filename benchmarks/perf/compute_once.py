"""P1 benchmark (issue 16): forward passes per image per encoder state, counted independently of qbench.

Runs ``qbench eval`` (the library entry point ``qbench.engine.evaluate.run``, feature cache off so every run encodes)
on the five toy suites (``toy-id``, ``toy-ood``, ``robustness``, ``spurious``, ``spectral``) once with ``minmax`` and
once with the ``fp32`` baseline. Right after quantization (calibration passes belong to quantizing) a forward hook of
this script's own goes on each state's image tower module (``model.visual``) and text-side token embedding; it counts
the batch rows of every completed call of exactly that module (a deep copy such as the dropout probe's model inherits
the hook but is not a state, so it is not counted). Prints, per quantizer and state,

* P1 = images the state's image tower ran / images scored (goal: exactly 1.00; the ``fp32`` baseline's quantized
  state shares the FP32 features, so it adds 0),
* whether the document's own ``encoder_calls`` equals this independent count (images and prompts).

Counts, not timings: one run per quantizer is exact (no repetitions needed).

Usage: ``OMP_NUM_THREADS=1 python benchmarks/perf/compute_once.py [--quick] [--json] [--limit N] [--device cpu|cuda]
[--suites toy-id,toy-ood,...] [--quantizers minmax,fp32]`` (``--quick``: 40 images per split; ``--json``: the last
stdout line is ``{"p1_fp32": x, "p1_quantized": x, "p1_baseline_quantized": x, "agrees": true}``: the FP32 state's
P1 (worst over the runs), the quantized state's (worst over the non-baseline runs), the baseline's quantized state
(passes per image it added, goal 0) and whether every document agreed with the hooks).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from typing import Any

import torch

from qbench.engine import evaluate
from qbench.engine.evaluate import EvalRequest, resolve, run
from qbench.registry import build_registry

FIVE_SUITES = ("toy-id", "toy-ood", "robustness", "spurious", "spectral")
QUICK_LIMIT = 40
"""Images per split with ``--quick``: not a multiple of the 32-image pass, so every split ends in a short pass."""


class Silent:
    """A progress reporter that says nothing."""

    def log(self, message: str) -> None:
        pass

    def track(self, items, description):
        return iter(items)


class TowerHooks:
    """This script's own forward hooks on each state's image tower and token embedding."""

    def __init__(self) -> None:
        self.images: Counter = Counter()
        self.texts: Counter = Counter()
        self.handles: list = []
        self.watched: set[int] = set()

    def watch(self, state: str, vlm: Any) -> None:
        """Count ``vlm``'s tower calls for ``state``; a module already hooked (a baseline that is the float model
        itself) is not hooked twice, so its passes count once, under the first state."""
        for module, bucket in ((vlm.model.visual, self.images), (vlm.model.token_embedding, self.texts)):
            if id(module) in self.watched:
                continue
            self.watched.add(id(module))

            def hook(called, args, output, target=module, bucket=bucket, state=state):
                if called is target:
                    bucket[state] += args[0].shape[0]

            self.handles.append(module.register_forward_hook(hook))

    def remove(self) -> None:
        """Take every hook off again."""
        for handle in self.handles:
            handle.remove()


def counted_run(quantizer: str, suites: tuple[str, ...], limit: int | None, device: str) -> tuple[dict, TowerHooks]:
    """One evaluation with this script's hooks on both states, put on right after quantization."""
    hooks = TowerHooks()
    original = evaluate.obtain_quantized

    def obtain(resolved, fp32, calibration, progress, reuse=None):
        quantized = original(resolved, fp32, calibration, progress, reuse)
        hooks.watch("fp32", fp32)
        hooks.watch("quantized", quantized.model)
        return quantized

    evaluate.obtain_quantized = obtain
    try:
        request = EvalRequest(quantizer=quantizer, suites=suites, limit=limit, device=device, feature_cache=False)
        document = run(resolve(request, build_registry()), Silent())
    finally:
        evaluate.obtain_quantized = original
        hooks.remove()
    return document, hooks


def main() -> None:
    """Run each quantizer once, print P1 per state and whether the documents agree, and the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suites", default=",".join(FIVE_SUITES))
    parser.add_argument("--quantizers", default="minmax,fp32")
    parser.add_argument("--limit", type=int, default=None, help="images per split (default: all; --quick: 40)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_LIMIT} images per split")
    parser.add_argument("--json", action="store_true", help="print the measured values as JSON on the last line")
    args = parser.parse_args()
    torch.manual_seed(0)
    limit = args.limit if args.limit is not None else (QUICK_LIMIT if args.quick else None)
    suites = tuple(name for name in args.suites.split(",") if name)
    values: dict[str, Any] = {"p1_fp32": None, "p1_quantized": None, "p1_baseline_quantized": None, "agrees": True}
    for quantizer in (name for name in args.quantizers.split(",") if name):
        document, hooks = counted_run(quantizer, suites, limit, args.device)
        images = sum(info["num_scored"] for info in document["datasets"].values())
        calls = document["encoder_calls"]
        agrees = calls["images"] == dict(hooks.images) and calls["texts"] == dict(hooks.texts)
        baseline = document["config"]["quantizer"] == "fp32"
        p1 = {state: hooks.images.get(state, 0) / images for state in ("fp32", "quantized")}
        print(f"{quantizer}: {len(document['datasets'])} datasets, {images} images scored, suites {', '.join(suites)}")
        print(f"  P1 fp32 {p1['fp32']:.3f}  quantized {p1['quantized']:.3f}"
              f"{'  (baseline: the quantized state shares the FP32 features; goal 0 for it)' if baseline else ''}  "
              f"(independent hooks; goal 1.00)")
        print(f"  prompts encoded: {dict(hooks.texts)}; document's encoder_calls {'agree' if agrees else 'DISAGREE'}: "
              f"images {calls['images']}, texts {calls['texts']}")
        print(f"  verification passed: {document['verification']['passed']} "
              f"({document['verification']['n_modules']} modules)")
        values["agrees"] = values["agrees"] and agrees
        values["p1_fp32"] = max(values["p1_fp32"] or 0.0, p1["fp32"])
        key = "p1_baseline_quantized" if baseline else "p1_quantized"
        values[key] = max(values[key] or 0.0, p1["quantized"])
    if args.json:
        print(json.dumps(values))


if __name__ == "__main__":
    main()
