"""P2 benchmark (issue 16): ``qbench eval`` without model load and quantization, over the bare forward passes.

What it measures. The evaluation (``qbench.engine.evaluate.run``, feature cache off so every run encodes) is timed
from its own ``timing`` record: ``total_s - load_s - quantize_s``, i.e. batch planning, verification, encoding,
fingerprints, scoring. The *bare* forward passes are what no harness can avoid: decode + preprocess + encode every
image once per distinct image-encoder state, and every prompt set once per distinct text-encoder state (the
definition of ``benchmarks/perf/compute_once.py``), in batches of the run's batch size; a second bare variant in the
fixed-shape passes of :func:`qbench.engine.features.pass_layout` rows that qbench runs for reproducible features is
printed for information. Evaluation and bare timing alternate (eval, bare, eval, bare, ...) on one torch thread, so
machine load hits both alike; the ratio is the median of the per-pair ratios (goal: <= 1.10).

Two settings: ``toy-id`` on the toy model (32 px), and ``toy-id`` on a random-init open_clip ViT-B/32 at 224 px (the
toy images upscaled by its preprocessing; ``--vit-limit`` images, proxy and calibration cut to ``--vit-proxy`` pairs,
which only shortens quantization, excluded from the measure).

Usage: ``OMP_NUM_THREADS=1 python benchmarks/perf/p2.py [--quick] [--json] [--repeats 5] [--quantizer minmax]``
(``--json``: the last stdout line is ``{"p2_toy": ratio, "p2_vitb32": ratio}``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from typing import Any

import torch

from qbench.data import UnreadableImage
from qbench.engine.evaluate import EvalRequest, ResolvedRun, _load, quantize_model, resolve, run
from qbench.engine.features import TEXT_BATCH, EncodeCounter, pass_layout, state_fingerprints
from qbench.registry import build_registry

VIT_MODEL = "clip-vit-b32-openai"
"""The ViT-B/32 entry of ``qbench list models`` (random-init: no weights are read)."""


class Silent:
    """A progress reporter that reports nothing (the benchmark prints its own lines)."""

    def log(self, message: str) -> None:
        """Drop the line."""

    def track(self, items, description):
        """Iterate without drawing anything."""
        return iter(items)


def prompt_sets(resolved: ResolvedRun, datasets: dict[str, Any]) -> list[tuple[str, ...]]:
    """The class-prompt lists the evaluation encodes for its zero-shot heads (toy-id has no OOD scorer prompts)."""
    sets = []
    for suite in resolved.suites:
        for task in suite.tasks:
            dataset = datasets[getattr(task, "id_dataset", None) or task.dataset]
            sets.append(tuple(template.format(name) for name in dataset.classnames for template in dataset.templates))
    return list(dict.fromkeys(sets))


class Bare:
    """The forward passes alone, on models and data prepared once (loading and quantizing are not timed)."""

    def __init__(self, resolved: ResolvedRun) -> None:
        fp32, self.datasets, _ = _load(resolved, Silent())
        quantized = quantize_model(resolved, fp32, self._calibration(resolved, fp32), Silent()).model.eval()
        states = {"fp32": fp32, "quantized": quantized}
        self.preprocess = fp32.preprocess
        self.rows = pass_layout(fp32)[1]
        image_prints = state_fingerprints(states, "visual")
        text_prints = state_fingerprints(states, "text")
        self.image_states = list({image_prints[state]: model for state, model in states.items()}.values())
        self.text_states = list({text_prints[state]: model for state, model in states.items()}.values())
        self.prompts = prompt_sets(resolved, self.datasets)

    @staticmethod
    def _calibration(resolved: ResolvedRun, fp32):
        """The proxy pairs when the quantizer calibrates (the same window the evaluation draws)."""
        from pathlib import Path

        from qbench.data import DatasetRequest
        from qbench.engine.evaluate import _calibration

        if not resolved.proxy:
            return None
        request = resolved.request
        return _calibration(resolved, fp32, DatasetRequest(Path(request.data_root) if request.data_root else None,
                                                           request.seed))

    def seconds(self, batch_size: int, chunk: int | None = None) -> float:
        """Decode, preprocess and encode every image once per distinct image state in batches of ``batch_size``
        (forward passes of ``chunk`` rows when given), and every prompt set once per distinct text state."""
        started = time.perf_counter()
        with torch.no_grad():
            for dataset in self.datasets.values():
                for start in range(0, len(dataset), batch_size):
                    pixels = []
                    for index in range(start, min(start + batch_size, len(dataset))):
                        try:
                            pixels.append(self.preprocess(dataset.image(index)))
                        except UnreadableImage:
                            continue
                    batch = torch.stack(pixels)
                    for model in self.image_states:
                        for piece in batch.split(chunk or len(batch)):
                            model.encode_image(piece)
            for prompts in self.prompts:
                for model in self.text_states:
                    for start in range(0, len(prompts), TEXT_BATCH):
                        model.encode_text(model.tokenize(list(prompts[start:start + TEXT_BATCH])))
        return time.perf_counter() - started


def loaded_once(resolved: ResolvedRun) -> ResolvedRun:
    """``resolved`` with a model loader that builds the float model on first use and then returns the same object.

    Loading is not part of the measure (``load_s`` is subtracted), only of the wall time: a random-init ViT-B/32 takes
    ~20 s to build on a busy machine. Sharing the object is safe because nothing in a run changes the float model
    (the quantizer works on its own working copy, :mod:`qbench.engine.model_copy`).
    """
    built: list = []

    def load(request):
        if not built:
            built.append(resolved.model.loader(request))
        return built[0]

    return dataclasses.replace(resolved, model=dataclasses.replace(resolved.model, loader=load))


def measure(label: str, request: EvalRequest, repeats: int) -> float:
    """Interleaved eval / bare timings of one setting; prints them and returns the median per-pair ratio."""
    resolved = loaded_once(resolve(request, build_registry()))
    bare = Bare(resolved)
    harness, bares, chunked, ratios = [], [], [], []
    images = 0
    for _ in range(repeats):
        document = run(resolved, Silent(), EncodeCounter())
        timing = document["timing"]
        harness.append(timing["total_s"] - timing["load_s"] - timing["quantize_s"])
        batch_size = document["provenance"]["batching"]["batch_size"]
        bares.append(bare.seconds(batch_size))
        chunked.append(bare.seconds(batch_size, bare.rows))
        ratios.append(harness[-1] / bares[-1])
        images = sum(info["num_scored"] for info in document["datasets"].values())
    ratio = statistics.median(ratios)
    print(f"{label}: {images} images, {len(bare.image_states)} distinct image state(s), {len(bare.text_states)} distinct "
          f"text state(s), batch {batch_size}, quantizer {resolved.quantizer.name}, {repeats} interleaved repeats")
    print(f"  bare forward passes      {statistics.median(bares):7.3f} s (median)")
    print(f"  bare, {bare.rows}-row passes     {statistics.median(chunked):7.3f} s "
          f"(ratio to bare {statistics.median(c / b for c, b in zip(chunked, bares)):.3f})")
    print(f"  eval without load/quant  {statistics.median(harness):7.3f} s")
    print(f"  P2 {label}: {ratio:.3f}  (median of per-pair ratios {', '.join(f'{r:.3f}' for r in ratios)}; goal <= 1.10)")
    return ratio


def main() -> None:
    """Parse the options, run both settings, print the ratios (and the JSON line with ``--json``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 repeats, 32 ViT images (about 3 minutes on an idle 2-core machine)")
    parser.add_argument("--json", action="store_true", help="print the ratios as one JSON object on the last line")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--quantizer", default="minmax")
    parser.add_argument("--vit-limit", type=int, default=None, help="ViT-B/32 images (default 128, --quick 32)")
    parser.add_argument("--vit-proxy", type=int, default=32, help="ViT-B/32 proxy pairs and calibration images")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-vit", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    repeats = args.repeats or (2 if args.quick else 5)
    vit_limit = args.vit_limit or (32 if args.quick else 128)
    toy = measure("toy", EvalRequest(quantizer=args.quantizer, suites=("toy-id",), feature_cache=False,
                                     device=args.device), repeats)
    results = {"p2_toy": round(toy, 4)}
    if not args.skip_vit:
        calibrates = resolve(EvalRequest(quantizer=args.quantizer), build_registry()).quantizer.needs_data
        params = (("n_calibration", str(args.vit_proxy)),) if calibrates and args.quantizer == "minmax" else ()
        vit = measure("vitb32", EvalRequest(model=VIT_MODEL, random_init=True, quantizer=args.quantizer,
                                            quantizer_params=params, suites=("toy-id",), limit=vit_limit,
                                            proxy_n=args.vit_proxy, feature_cache=False, device=args.device), repeats)
        results["p2_vitb32"] = round(vit, 4)
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
