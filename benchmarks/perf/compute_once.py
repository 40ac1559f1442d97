"""Compute-once benchmark: forward passes per image and harness overhead for a full ID + OOD run.

Runs ``qbench eval`` (the library entry point, feature cache off) on the toy world with the
``toy-ood`` suite and every registered scorer, then times the *bare* forward passes over the same
inputs: decode + preprocess + encode every image through each encoder state, and encode every prompt
set once per distinct text-encoder state. Prints

* forward passes per image for each encoder state (target: 1.0),
* the wall-time ratio of the evaluation (without model loading and quantization, which are not
  forward passes) to the bare forward passes (target: <= 1.10), and the ratio of the whole run.

Usage: ``python benchmarks/perf/compute_once.py [--suite toy-ood] [--device cpu|cuda] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from qbench.data import DatasetRequest
from qbench.engine.evaluate import EvalRequest, resolve, run
from qbench.engine.features import TEXT_BATCH, EncodeCounter, tower_fingerprint
from qbench.model import LoadRequest
from qbench.registry import build_registry
from qbench.scoring import ScoreContext, ScorerSkipped


class Silent:
    def log(self, message: str) -> None:
        pass

    def track(self, items, description):
        return iter(items)


def bare_forward_seconds(resolved, device: str, batch_size: int) -> float:
    """Time of the forward passes alone: every image once per image state, every prompt once per text state,
    in batches of the evaluation's (possibly automatic) ``batch_size``."""
    request = resolved.request
    datasets = {name: spec.loader(DatasetRequest(None, request.seed)) for name, spec in resolved.datasets.items()}
    fp32 = resolved.model.loader(LoadRequest(weights=request.weights, device=device)).to(device).eval()
    calibration = None
    if resolved.proxy:
        from qbench.engine.evaluate import _calibration

        calibration = _calibration(resolved, fp32, DatasetRequest(None, request.seed))
    quantized = resolved.quantizer.quantize(copy.deepcopy(fp32), resolved.bits, resolved.scope, calibration, request.seed).model.eval()
    states = {"fp32": fp32, "quantized": quantized}
    prompt_sets = _prompt_sets(resolved, datasets)
    distinct_text = {tower_fingerprint(model, "text"): model for model in states.values()}
    started = time.perf_counter()
    with torch.no_grad():
        for dataset in datasets.values():
            for start in range(0, len(dataset), batch_size):
                indices = range(start, min(start + batch_size, len(dataset)))
                pixels = torch.stack([fp32.preprocess(dataset.image(index)) for index in indices])
                for model in states.values():
                    model.encode_image(pixels)
        for prompts in prompt_sets:
            for model in distinct_text.values():
                for start in range(0, len(prompts), TEXT_BATCH):
                    model.encode_text(model.tokenize(list(prompts[start:start + TEXT_BATCH])))
    return time.perf_counter() - started


def _prompt_sets(resolved, datasets) -> list[tuple[str, ...]]:
    """The prompt lists the evaluation encodes: each ID classifier's prompts and every scorer plan's sets."""
    sets = []
    for suite in resolved.suites:
        for task in suite.tasks:
            id_name = getattr(task, "id_dataset", None) or task.dataset
            dataset = datasets[id_name]
            sets.append(tuple(template.format(name) for name in dataset.classnames for template in dataset.templates))
            for target in getattr(task, "targets", ()):
                for scorer in resolved.scorers.values():
                    context = ScoreContext(suite.name, id_name, tuple(dataset.classnames), tuple(dataset.templates),
                                           target.kind, resolved.request.resources,
                                           resolved.datasets[id_name].resources, resolved.request.seed)
                    try:
                        sets.extend(prompts for prompts in scorer.plan(context).text_sets.values() if prompts)
                    except ScorerSkipped:
                        pass
    return list(dict.fromkeys(sets))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="toy-ood")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    resolved = resolve(EvalRequest(suites=(args.suite,), device=args.device, feature_cache=False), build_registry())
    evals, harness, bares = [], [], []
    for _ in range(args.repeats):
        counter = EncodeCounter()
        document = run(resolved, Silent(), counter)
        timing = document["timing"]
        evals.append(timing["total_s"])
        harness.append(timing["total_s"] - timing["load_s"] - timing["quantize_s"])
        bares.append(bare_forward_seconds(resolved, args.device, document["provenance"]["batching"]["batch_size"]))
    images = sum(info["num_scored"] for info in document["datasets"].values())
    print(f"suite {args.suite}: {len(document['datasets'])} datasets, {images} images, "
          f"{len(resolved.scorers)} scorers, {len(document['results'])} result records")
    for state, count in sorted(counter.images.items()):
        print(f"forward passes per image, {state}: {count / images:.3f}  (target 1.0)")
    for state, count in sorted(counter.texts.items()):
        print(f"prompts encoded, {state} text tower: {count}")
    bare, total, around = statistics.median(bares), statistics.median(evals), statistics.median(harness)
    print(f"bare forward passes: {bare:.2f} s (median of {args.repeats})")
    print(f"eval without load/quantize: {around:.2f} s  ratio {around / bare:.3f}  (target <= 1.10)")
    print(f"eval, whole run:            {total:.2f} s  ratio {total / bare:.3f}")


if __name__ == "__main__":
    main()
