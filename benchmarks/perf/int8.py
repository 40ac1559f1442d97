"""Real int8 vs simulated int8 (issue 17): speed and agreement of qbench's quantized ViT-B/32 on integer engines.

What it measures. A random-init open_clip ViT-B/32 at 224 px (``clip-vit-b32-openai``, no weights read) is quantized
W8A8 by each ``--quantizers`` method (calibrated on ``--calibration`` random proxy pairs), planned with
:func:`qbench.engine.deploy.plan.plan_export` and deployed on each ``--engine`` through
:func:`qbench.engine.deploy.engines.build`. One interleaved run (A, B, C, D, A, B, ...) times the image tower on one
batch of ``--batch`` toy-id images for: FP32 eager (torch), FP32 on the engine (torchao: the compiled float tower;
ONNX Runtime: the float graph), simulated (qbench's fake quantization) and real int8 (the engine). Printed: the
median of the per-round ratios real-int8 speed / FP32 eager (goal >= 1.5x on CPU), real-int8 / FP32 engine and
simulated / FP32 eager (speed: > 1 is faster), and, over ``--images`` toy-id images, the zero-shot prediction
agreement and embedding cosine / relative L2 error against FP32 for simulated and real, and real against simulated.
An engine that cannot run a method (e.g. ONNX Runtime with QuaRot's per-token activations) prints its one-line
refusal instead.

Usage: ``python benchmarks/perf/int8.py [--quick] [--json] [--engine torchao onnxruntime] [--threads 2]``
(``--json``: the last stdout line is one JSON object with every number).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from p2 import VIT_MODEL, Silent  # noqa: E402

from qbench.data import DatasetRequest, UnreadableImage  # noqa: E402
from qbench.engine.deploy.engines import ENGINES, build, missing_requirement  # noqa: E402
from qbench.engine.deploy.plan import plan_export  # noqa: E402
from qbench.engine.evaluate import EvalRequest, _calibration, _load, quantize_model, resolve  # noqa: E402
from qbench.errors import QbenchError  # noqa: E402
from qbench.registry import build_registry  # noqa: E402


def request_for(quantizer: str, args: argparse.Namespace, registry: Any) -> EvalRequest:
    """The ViT-B/32 W8A8 request of one method (calibration cut to ``--calibration`` pairs)."""
    defaults = registry.get("quantizers", quantizer).defaults()
    params = (("n_calibration", str(args.calibration)),) if "n_calibration" in defaults else ()
    return EvalRequest(model=VIT_MODEL, random_init=True, quantizer=quantizer, quantizer_params=params, bits="w8a8",
                       suites=("toy-id",), limit=args.images, proxy_n=args.calibration, feature_cache=False)


def pixels_of(resolved: Any, fp32: Any, datasets: dict[str, Any], count: int) -> tuple[torch.Tensor, Any]:
    """The first ``count`` toy-id images at the model's resolution, and the dataset they come from."""
    dataset = next(iter(datasets.values()))
    images = []
    for index in range(min(count, len(dataset))):
        try:
            images.append(fp32.preprocess(dataset.image(index)))
        except UnreadableImage:
            continue
    return torch.stack(images), dataset


def encode(model: Any, pixels: torch.Tensor, batch: int) -> torch.Tensor:
    """Normalised image embeddings of ``pixels`` in batches of ``batch``."""
    with torch.no_grad():
        return torch.cat([model.encode_image(piece).float() for piece in pixels.split(batch)])


def seconds(model: Any, pixels: torch.Tensor) -> float:
    """Wall time of one ``encode_image`` of the timing batch."""
    with torch.no_grad():
        started = time.perf_counter()
        model.encode_image(pixels)
        return time.perf_counter() - started


def quality(reference: torch.Tensor, other: torch.Tensor, head: torch.Tensor, other_head: torch.Tensor) -> dict[str, float]:
    """Prediction agreement (zero-shot argmax, each model with its own text head), mean cosine, relative L2."""
    agree = (reference @ head.T).argmax(dim=1) == (other @ other_head.T).argmax(dim=1)
    cosine = torch.nn.functional.cosine_similarity(reference, other, dim=1)
    return {"agreement": float(agree.float().mean()), "cosine": float(cosine.mean()),
            "rel_l2": float((other - reference).norm() / reference.norm())}


def interleaved(variants: dict[str, Any], pixels: torch.Tensor, repeats: int) -> dict[str, list[float]]:
    """``repeats`` rounds, each timing every variant once in order (after one untimed warm-up call each)."""
    for model in variants.values():
        seconds(model, pixels)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, model in variants.items():
            times[name].append(seconds(model, pixels))
    return times


def ratio(times: dict[str, list[float]], slow: str, fast: str) -> float:
    """Median over rounds of ``time(slow) / time(fast)``: how many times faster ``fast`` is."""
    return statistics.median(a / b for a, b in zip(times[slow], times[fast]))


def run_method(quantizer: str, args: argparse.Namespace, registry: Any, fp32: Any, pixels: torch.Tensor,
               batch: torch.Tensor, dataset: Any, fp32_engines: dict[str, Any], fp32_embed: torch.Tensor,
               fp32_head: torch.Tensor, log: Callable[[str], None]) -> dict[str, Any]:
    """Quantize with one method, deploy on every engine, time and compare; returns this method's numbers."""
    resolved = resolve(request_for(quantizer, args, registry), registry)
    calibration = (_calibration(resolved, fp32, DatasetRequest(None, resolved.request.seed))
                   if resolved.proxy and resolved.quantizer.needs_data else None)
    started = time.perf_counter()
    simulated = quantize_model(resolved, fp32, calibration, Silent()).model.eval()
    log(f"{quantizer}: quantized in {time.perf_counter() - started:.0f} s")
    plan = plan_export(simulated)
    record: dict[str, Any] = {"plan_layers": len(plan.layers), "float_ops": len(plan.float_ops), "engines": {}}
    sim_head = simulated.zero_shot_head(dataset.classnames, dataset.templates)
    sim_embed = encode(simulated, pixels, args.batch)
    record["simulated"] = quality(fp32_embed, sim_embed, fp32_head, sim_head)
    variants: dict[str, Any] = {"fp32_eager": fp32}
    for engine, twin in fp32_engines.items():
        variants[f"fp32_{engine}"] = twin.vlm
    variants["simulated"] = simulated
    for engine in args.engine:
        started = time.perf_counter()
        try:
            deployed = build(engine, simulated, plan, device="cpu", compile=True)
            real_embed = encode(deployed.vlm, pixels, args.batch)
        except QbenchError as error:
            log(f"{quantizer} on {engine}: {error}")
            record["engines"][engine] = {"refused": str(error)}
            continue
        except Exception as error:  # an engine bug: report it and go on with the other engines
            first = (str(error).strip().splitlines() or [""])[0][:300]
            log(f"{quantizer} on {engine}: FAILED ({type(error).__name__}: {first})")
            record["engines"][engine] = {"refused": f"FAILED: {type(error).__name__}: {first}"}
            continue
        log(f"{quantizer} on {engine}: built and ran in {time.perf_counter() - started:.0f} s, "
            f"{len(deployed.int8_layers)}/{len(plan.layers)} layers on {sorted(set(deployed.int8_ops))}")
        real_head = deployed.vlm.zero_shot_head(dataset.classnames, dataset.templates)
        record["engines"][engine] = {
            "version": deployed.version, "int8_layers": len(deployed.int8_layers),
            "int8_ops": sorted(set(deployed.int8_ops)),
            "real": quality(fp32_embed, real_embed, fp32_head, real_head),
            "real_vs_simulated": quality(sim_embed, real_embed, sim_head, real_head),
        }
        variants[f"real_{engine}"] = deployed.vlm
    times = interleaved(variants, batch, args.repeats)
    record["median_s"] = {name: round(statistics.median(values), 4) for name, values in times.items()}
    record["seconds"] = {name: [round(value, 4) for value in values] for name, values in times.items()}
    record["simulated"]["speed_vs_fp32_eager"] = ratio(times, "fp32_eager", "simulated")
    for engine, numbers in record["engines"].items():
        if "refused" in numbers:
            continue
        numbers["speed_vs_fp32_eager"] = ratio(times, "fp32_eager", f"real_{engine}")
        numbers["speed_vs_fp32_engine"] = ratio(times, f"fp32_{engine}", f"real_{engine}")
        numbers["fp32_engine_vs_fp32_eager"] = ratio(times, "fp32_eager", f"fp32_{engine}")
    del variants, simulated
    gc.collect()
    return record


def show(quantizer: str, record: dict[str, Any], args: argparse.Namespace) -> None:
    """Print one method's block."""
    sim = record["simulated"]
    print(f"{quantizer} W8A8: {record['plan_layers']} integer layers, {record['float_ops']} float maps; "
          f"median seconds per batch of {args.batch}: "
          + ", ".join(f"{name} {value:.3f}" for name, value in record["median_s"].items()))
    print(f"  simulated        : speed/FP32-eager {sim['speed_vs_fp32_eager']:.2f}x | vs FP32: agreement "
          f"{sim['agreement']:.3f}, cosine {sim['cosine']:.5f}, relL2 {sim['rel_l2']:.4f}")
    for engine, numbers in record["engines"].items():
        if "refused" in numbers:
            print(f"  real {engine:<12}: {numbers['refused']}")
            continue
        real, cross = numbers["real"], numbers["real_vs_simulated"]
        print(f"  real {engine:<12}: speed/FP32-eager {numbers['speed_vs_fp32_eager']:.2f}x (goal >= 1.5x), "
              f"speed/FP32-{engine} {numbers['speed_vs_fp32_engine']:.2f}x (FP32-{engine}/FP32-eager "
              f"{numbers['fp32_engine_vs_fp32_eager']:.2f}x) | vs FP32: agreement {real['agreement']:.3f}, cosine "
              f"{real['cosine']:.5f}, relL2 {real['rel_l2']:.4f} | vs simulated: agreement "
              f"{cross['agreement']:.3f}, relL2 {cross['rel_l2']:.4f} | {numbers['int8_layers']} int8 layers on "
              f"{', '.join(numbers['int8_ops'])} ({engine} {numbers['version']})")


def main() -> None:
    """Parse the options, build the models, run the interleaved timing per method, print the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds, 32 images, 8 calibration pairs")
    parser.add_argument("--json", action="store_true", help="print every number as one JSON object on the last line")
    parser.add_argument("--engine", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--quantizers", nargs="+", default=["minmax", "smoothquant", "quarot"])
    parser.add_argument("--threads", type=int, default=2, help="torch (and ORT intra-op) threads; default 2")
    parser.add_argument("--batch", type=int, default=32, help="images per timed batch (default 32)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 5, --quick 2)")
    parser.add_argument("--images", type=int, default=None, help="images for agreement (default 512: one flip is 0.2 %%, against the 99 %% goal; --quick 32)")
    parser.add_argument("--calibration", type=int, default=None, help="calibration pairs (default 32, --quick 8)")
    args = parser.parse_args()
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.images = max(args.images or (32 if args.quick else 512), args.batch)
    args.calibration = args.calibration or (8 if args.quick else 32)
    torch.set_num_threads(args.threads)
    engines = []
    for engine in args.engine:
        missing = missing_requirement(engine)
        if missing is None:
            engines.append(engine)
        else:
            print(f"skipping --engine {engine}: {missing!r} is not installed (pip install 'qbench[deploy]')")
    args.engine = engines

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    registry = build_registry()
    first = resolve(request_for(args.quantizers[0], args, registry), registry)
    started = time.perf_counter()
    fp32, datasets, _ = _load(first, Silent())
    fp32.eval()
    log(f"ViT-B/32 (random init) loaded in {time.perf_counter() - started:.0f} s; torch threads {torch.get_num_threads()}")
    pixels, dataset = pixels_of(first, fp32, datasets, args.images)
    batch = pixels[:args.batch]
    fp32_embed = encode(fp32, pixels, args.batch)
    fp32_head = fp32.zero_shot_head(dataset.classnames, dataset.templates)
    fp32_engines = {}
    for engine in args.engine:
        started = time.perf_counter()
        fp32_engines[engine] = build(engine, fp32, None, device="cpu", compile=True)
        twin = quality(fp32_embed, encode(fp32_engines[engine].vlm, pixels, args.batch), fp32_head, fp32_head)
        log(f"FP32 twin on {engine} built in {time.perf_counter() - started:.0f} s (vs eager: relL2 {twin['rel_l2']:.2e})")
    results: dict[str, Any] = {"threads": torch.get_num_threads(), "batch": args.batch, "images": len(pixels),
                               "calibration": args.calibration, "repeats": args.repeats, "engines": args.engine,
                               "methods": {}}
    print(f"int8 benchmark: ViT-B/32 random init, 224 px, batch {args.batch}, {len(pixels)} toy-id images, "
          f"{torch.get_num_threads()} thread(s), {args.repeats} interleaved rounds, engines {', '.join(args.engine)}")
    for quantizer in args.quantizers:
        record = run_method(quantizer, args, registry, fp32, pixels, batch, dataset, fp32_engines, fp32_embed,
                            fp32_head, log)
        results["methods"][quantizer] = record
        show(quantizer, record, args)
        sys.stdout.flush()
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
