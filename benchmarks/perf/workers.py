"""Data-loader workers benchmark: images/s of the encoding pass with ``--workers auto`` vs ``--workers 0``.

Encodes every image of a toy-world suite through the FP32 and the quantized (minmax w8a8) model exactly as
``qbench eval`` does (:func:`qbench.engine.features.encode_datasets`, feature cache off), once with decoding and
preprocessing in the main process and once with the automatic number of loader workers (plus any
``--compare N`` counts), and checks that the features are bit-identical. Prints the usable cores, the
automatic batch size and workers, images/s per setting (median of ``--repeats``) and the ratio to
``workers=0`` (above 1: workers are faster).

Toy images are 32 px arrays in memory, so decoding is cheap and the encoder dominates; real JPEG datasets
shift the balance towards workers.

Usage: ``python benchmarks/perf/workers.py [--suite toy-ood] [--device cpu|cuda] [--repeats 3] [--compare 1 2]``
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from qbench.engine.batching import auto_workers, available_cpus, image_shape_of, plan_batching
from qbench.data import DatasetRequest
from qbench.engine.evaluate import EvalRequest, resolve
from qbench.engine.features import EncodeCounter, FeatureCache, encode_datasets, tower_fingerprint
from qbench.model import LoadRequest
from qbench.registry import build_registry


class Silent:
    def log(self, message: str) -> None:
        pass

    def track(self, items, description):
        return iter(items)


def encode_seconds(datasets, states, prints, batch_size: int, workers: int) -> tuple[float, dict]:
    """Wall time of one encoding pass over every dataset, and its features."""
    started = time.perf_counter()
    encoded = encode_datasets(datasets, states, prints, batch_size, FeatureCache(None), Silent(), EncodeCounter(),
                              workers=workers)
    if any(model.device.type == "cuda" for model in states.values()):
        torch.cuda.synchronize()
    return time.perf_counter() - started, encoded


def identical(first: dict, second: dict) -> bool:
    """Same kept indices and bit-identical features for every dataset and state."""
    return all(
        first[name].kept.tolist() == second[name].kept.tolist()
        and all(torch.equal(first[name].by_state[state], second[name].by_state[state]) for state in first[name].by_state)
        for name in first
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="toy-ood")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=None, help="default: automatic, as qbench eval")
    parser.add_argument("--compare", type=int, nargs="*", default=[], help="further worker counts to time")
    args = parser.parse_args()
    torch.manual_seed(0)
    resolved = resolve(EvalRequest(suites=(args.suite,), device=args.device, proxy_n=100), build_registry())
    datasets = {name: spec.loader(DatasetRequest()) for name, spec in resolved.datasets.items()}
    fp32 = resolved.model.loader(LoadRequest(device=args.device)).to(args.device).eval()
    from qbench.engine.evaluate import _calibration

    calibration = _calibration(resolved, fp32, DatasetRequest()) if resolved.proxy else None
    quantized = resolved.quantizer.quantize(copy.deepcopy(fp32), resolved.bits, resolved.scope, calibration, 0).model
    states = {"fp32": fp32, "quantized": quantized.to(args.device).eval()}
    prints = {state: tower_fingerprint(model, "visual") for state, model in states.items()}
    plan = plan_batching(args.device, args.batch_size, None, image_shape_of(fp32.preprocess))
    settings = list(dict.fromkeys([0, auto_workers(args.device), *args.compare]))
    encode_seconds(datasets, states, prints, plan.batch_size, 0)  # warm-up: first-call allocations and caches
    times = {workers: [] for workers in settings}
    reference, same = None, True
    for _ in range(args.repeats):
        for workers in settings:
            seconds, encoded = encode_seconds(datasets, states, prints, plan.batch_size, workers)
            times[workers].append(seconds)
            reference = reference or encoded
            same = same and identical(reference, encoded)
    images = sum(len(dataset) for dataset in datasets.values())
    print(f"suite {args.suite} on {args.device}: {len(datasets)} datasets, {images} images x {len(states)} encoder states; "
          f"{available_cpus()} usable cores; {plan.describe()}")
    base = images / statistics.median(times[0])
    for workers in settings:
        rate = images / statistics.median(times[workers])
        label = f"workers={workers}" + (" (auto)" if workers == auto_workers(args.device) else "")
        print(f"{label:18s} {rate:8.1f} images/s  ratio to workers=0: {rate / base:.3f}")
    print(f"features bit-identical across worker counts: {same}")


if __name__ == "__main__":
    main()
