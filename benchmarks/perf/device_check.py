"""Device check, the measuring part (issue 16 item 6): FP32 vs W8A8 evaluations of toy, ViT-B/32 and ViT-L/14 on
one device, with throughput, P2, P4 and peak GPU memory. Called by ``benchmarks/perf/device_check.sh``.

For every (model, quantizer) case it runs one ``qbench eval`` through the library (``resolve`` + ``run``: the
``toy-id`` suite, the feature cache off, random-init weights for the ViTs, the toy images upscaled by the model's
preprocessing) and then, on the very models that run built (its FP32 model and its quantized model, captured
from the run), the bare forward passes:

* **throughput**: evaluation images per second of the run without loading and quantizing
  (``images / (total_s - load_s - quantize_s)``), and images per second of one bare FP32 / quantized forward
  pass over the same preprocessed images in passes of :func:`qbench.engine.batching.numeric_batch` rows;
* **P2**: the run without loading and quantizing over the bare work of ``benchmarks/perf/p2.py``'s definition:
  decode + preprocess every image once, encode it once per distinct image state (FP32, and the quantized model
  unless the quantizer is the ``fp32`` baseline), and encode the class prompts once per distinct text state
  (two only for a joint-scope quantizer); goal <= 1.10;
* **P4**: quantized forward / FP32 forward on the same pixels (goal <= 1.5);
* **peak GPU memory**: ``torch.cuda.max_memory_allocated`` over the run (loading, quantizing, encoding, scoring),
  reset before each case.

Bare passes are timed with ``torch.cuda.synchronize`` around them (CUDA kernels are asynchronous), after one
warm-up pass per model, as interleaved repetitions (FP32, quantized, FP32, ...; medians). One evaluation per case:
the bare timings repeat, the evaluation (which quantizes) does not.

Short settings keep the whole check inside its time budget: calibration is cut to ``--proxy-n`` pairs
(``n_calibration`` of every quantizer that has one), LSQ trains ``--qat-steps`` steps on batches of ``--qat-batch``
pairs; a case that would start after ``--budget-s`` seconds is reported as skipped, and a case that fails is
reported (first line of its error) while the others still run. The ViTs go first (they are what the check is
for), the toy model last. ``--dry-run`` runs the same code on the CPU with tiny sizes:
the toy model on 64 images with every quantizer, ViT-B/32 on 2 images with ``fp32`` and ``minmax``, ViT-L/14
skipped. Results go to ``--out`` (default ``$OUT`` or a temporary folder) as ``device_check.json``.

Usage: ``python benchmarks/perf/device_check.py [--dry-run] [--device cuda] [--models vitb32,vitl14,toy]
[--quantizers fp32,minmax,smoothquant,quarot,lsq] [--limit 500] [--budget-s 270] [--out DIR]``
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

MODELS = {"toy": "toy-clip", "vitb32": "clip-vit-b32-laion2b", "vitl14": "clip-vit-l14-laion2b"}
"""Short names of the checked models and their ``qbench list models`` entries (open_clip ViT-B-32 and ViT-L-14)."""
QUANTIZERS = ("fp32", "minmax", "smoothquant", "quarot", "lsq")
P2_GOAL, P4_GOAL = 1.10, 1.5


class Silent:
    """A progress reporter that reports nothing (this script prints its own lines)."""

    def log(self, message: str) -> None:
        """Drop the line."""

    def track(self, items: Any, description: str) -> Any:
        """Iterate without drawing anything."""
        return iter(items)


@dataclasses.dataclass(frozen=True)
class Case:
    """One evaluation of the check: a model, a quantizer, how many images and how short its calibration is."""

    label: str
    model: str
    quantizer: str
    limit: int
    proxy_n: int
    qat_steps: int
    qat_batch: int
    random_init: bool


def plan(args: argparse.Namespace) -> list[Case]:
    """The cases to run, in order; ``--dry-run`` shrinks them to CPU size (ViT-L/14 left out)."""
    cases = []
    for label in args.models:
        if label not in MODELS:
            raise SystemExit(f"unknown model {label!r}; use some of {', '.join(MODELS)}")
        quantizers = args.quantizers
        limit, proxy_n, steps = args.limit, args.proxy_n, args.qat_steps
        if args.dry_run and label != "toy":
            if label == "vitl14":
                continue
            quantizers = [name for name in quantizers if name in ("fp32", "minmax")]
            limit, proxy_n, steps = 2, 8, 1
        cases += [Case(label, MODELS[label], name, limit, proxy_n, steps, args.qat_batch, label != "toy")
                  for name in quantizers]
    return cases


def quantizer_params(registry: Any, case: Case) -> tuple[tuple[str, str], ...]:
    """Short-run overrides for the quantizer's own parameters (only those it declares): ``n_calibration`` cut to
    the proxy size, and for a training quantizer ``steps`` and a training batch that fits ViT-L/14's
    activations for backward in GPU memory (~0.8 GB per 224 px image)."""
    cls = registry.get("quantizers", case.quantizer)
    defaults = cls.defaults()
    params = {}
    if "n_calibration" in defaults:
        params["n_calibration"] = str(case.proxy_n)
    if "batch_size" in defaults:
        cap = case.qat_batch if getattr(cls, "needs_grad", False) else case.proxy_n
        params["batch_size"] = str(min(int(defaults["batch_size"]), case.proxy_n, cap))
    if "steps" in defaults:
        params["steps"] = str(case.qat_steps)
    return tuple(sorted(params.items()))


def synchronize(device: str) -> None:
    """Wait for queued CUDA kernels (no-op on the CPU), so a timer around GPU work measures the work."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def timed(device: str, work: Callable[[], Any]) -> float:
    """Seconds ``work()`` takes, synchronized on both ends."""
    synchronize(device)
    started = time.perf_counter()
    work()
    synchronize(device)
    return time.perf_counter() - started


class Captured:
    """The FP32 model and the quantization result of one run, kept by wrapping the run's loader and quantizer."""

    def __init__(self) -> None:
        """Nothing captured yet."""
        self.fp32 = None
        self.quantized = None

    def wrap(self, resolved: Any) -> Any:
        """``resolved`` with a model loader and a quantizer that remember what they return."""
        loader = resolved.model.loader

        def load(request: Any) -> Any:
            """The run's own loader; the model it builds is kept."""
            self.fp32 = loader(request)
            return self.fp32

        quantize = resolved.quantizer.quantize

        def quantize_and_keep(*args: Any, **kwargs: Any) -> Any:
            """The run's own quantizer; the result it returns is kept."""
            self.quantized = quantize(*args, **kwargs)
            return self.quantized

        resolved.quantizer.quantize = quantize_and_keep  # this run's own quantizer instance only
        return dataclasses.replace(resolved, model=dataclasses.replace(resolved.model, loader=load))


def bare_inputs(resolved: Any, fp32: Any, limit: int) -> tuple[list, list[str]]:
    """The evaluation's images (first ``limit`` of each dataset, sized for the model like the engine does) and
    its class prompts."""
    from qbench.data import DatasetRequest

    try:
        from qbench.engine.corruptions import follow_model_size
    except ImportError:  # an older layout: toy-id needs no resizing
        def follow_model_size(dataset: Any, preprocess: Any) -> Any:
            """No resizing."""
            return dataset

    images, prompts = [], []
    for spec in resolved.datasets.values():
        dataset = follow_model_size(spec.loader(DatasetRequest(None, 0)), fp32.preprocess)
        images += [dataset.image(index) for index in range(min(limit, len(dataset)))]
        if dataset.classnames:
            prompts += [template.format(name) for name in dataset.classnames for template in dataset.templates]
    return images, list(dict.fromkeys(prompts))


def bare_seconds(device: str, fp32: Any, quantized: Any, images: list, prompts: list[str], repeats: int,
                 joint: bool) -> dict[str, float]:
    """Median seconds of the bare work: preprocessing, an FP32 and a quantized image pass (interleaved), prompts."""
    import torch

    from qbench.engine.batching import model_numeric_batch

    rows = model_numeric_batch(fp32)
    pixels: list = []
    preprocess_s = timed(device, lambda: pixels.append(torch.stack([fp32.preprocess(image) for image in images])))
    pixels = pixels[0]

    def encode(model: Any) -> None:
        """One image pass of ``model`` over every pixel row, in fixed-size passes."""
        for piece in pixels.split(rows):
            model.encode_image(piece)

    def encode_prompts(model: Any) -> None:
        """Every class prompt through ``model``'s text tower once."""
        for start in range(0, len(prompts), 1024):
            model.encode_text(model.tokenize(prompts[start:start + 1024]))

    models = {"fp32": fp32} if quantized is None else {"fp32": fp32, "quantized": quantized}
    seconds: dict[str, list[float]] = {state: [] for state in models}
    with torch.no_grad():
        for model in models.values():  # warm-up: lazy CUDA init, cuDNN/cuBLAS choices
            encode(model)
        for _ in range(repeats):
            for state, model in models.items():
                seconds[state].append(timed(device, lambda: encode(model)))
        text_s = timed(device, lambda: encode_prompts(fp32))
        if joint and quantized is not None:
            text_s += timed(device, lambda: encode_prompts(quantized))
    result = {"preprocess_s": preprocess_s, "text_s": text_s,
              **{f"{state}_forward_s": statistics.median(values) for state, values in seconds.items()}}
    result["bare_s"] = preprocess_s + text_s + sum(result[f"{state}_forward_s"] for state in models)
    return result


def run_case(case: Case, device: str, repeats: int, registry: Any) -> dict[str, Any]:
    """One evaluation and its bare passes; a dict of the measured numbers."""
    import torch

    from qbench.engine.evaluate import EvalRequest, resolve, run

    cuda = device.startswith("cuda")
    request = EvalRequest(model=case.model, quantizer=case.quantizer, suites=("toy-id",), device=device,
                          limit=case.limit, proxy_n=case.proxy_n, random_init=case.random_init, feature_cache=False,
                          quantizer_params=quantizer_params(registry, case))
    captured = Captured()
    resolved = captured.wrap(resolve(request, registry))
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    document = run(resolved, Silent())
    synchronize(device)
    wall = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    timing = document["timing"]
    images = sum(info["num_scored"] for info in document["datasets"].values())
    harness = timing["total_s"] - timing["load_s"] - timing["quantize_s"]
    baseline = resolved.quantizer.family == "baseline"
    quantized = None
    if not baseline and captured.quantized is not None:
        quantized = captured.quantized.model.to(device).eval()
    result: dict[str, Any] = {
        "case": f"{case.label} {case.quantizer}", "model": case.model, "quantizer": case.quantizer, "images": images,
        "wall_s": round(wall, 3), "timing": timing, "peak_gpu_mib": None if peak is None else round(peak / 2**20, 1),
        "verified": bool(document.get("verification", {}).get("passed")),
        "eval_images_per_s": images / harness if harness > 0 else None,
        "accuracy": {state: record[state] for record in document["results"] if record.get("metric") == "accuracy"
                     for state in ("fp32", "quantized")},
    }
    if captured.fp32 is None:
        result["bare_skipped"] = "the run's FP32 model was not captured"
        return result
    if not baseline and quantized is None:
        result["bare_skipped"] = "the run's quantized model was not captured"
        return result
    inputs, prompts = bare_inputs(resolved, captured.fp32, case.limit)
    bare = bare_seconds(device, captured.fp32, quantized, inputs, prompts, repeats,
                        joint=resolved.scope.value == "joint")
    result.update({key: round(value, 4) for key, value in bare.items()})
    result["p2"] = harness / bare["bare_s"]
    result["fp32_images_per_s"] = len(inputs) / bare["fp32_forward_s"]
    if quantized is not None:
        result["quantized_images_per_s"] = len(inputs) / bare["quantized_forward_s"]
        result["p4"] = bare["quantized_forward_s"] / bare["fp32_forward_s"]
    return result


def line(result: dict[str, Any]) -> str:
    """One printed line per case."""
    def number(key: str, form: str) -> str:
        """``result[key]`` formatted, or a dash of the same width when it was not measured."""
        value = result.get(key)
        width = int(form.split(".")[0] or 0)
        return "-".rjust(width) if value is None else format(value, form)

    peak = "-" if result.get("peak_gpu_mib") is None else f"{result['peak_gpu_mib']:.0f} MiB"
    p4 = number("p4", ".2f") if result.get("p4") is not None else "- (fp32)"
    return (f"{result['case']:<22} {result['images']:>4} img  eval {number('eval_images_per_s', '8.1f')} img/s  "
            f"fwd fp32 {number('fp32_images_per_s', '8.1f')} quant {number('quantized_images_per_s', '8.1f')} img/s  "
            f"P2 {number('p2', '.2f')} (goal <= {P2_GOAL})  P4 {p4} (goal <= {P4_GOAL})  peak GPU {peak}  "
            f"quantize {result['timing']['quantize_s']:.1f} s  verified {'yes' if result['verified'] else 'NO'}")


def device_facts(device: str) -> dict[str, Any]:
    """torch, CUDA and device facts for the record."""
    import torch

    facts: dict[str, Any] = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
                             "torch_threads": torch.get_num_threads(), "device": device}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        free, total = torch.cuda.mem_get_info(device)
        facts.update({"gpu": props.name, "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda,
                      "gpu_total_gib": round(total / 2**30, 1), "gpu_free_gib": round(free / 2**30, 1),
                      "cudnn": torch.backends.cudnn.version(),
                      "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
                      "tf32_cudnn": torch.backends.cudnn.allow_tf32})
    return facts


def output_folder(path: Path | None) -> Path:
    """Where the JSON goes: ``--out``, else ``$OUT``, else a new temporary folder."""
    if path is not None:
        folder = path
    elif os.environ.get("OUT"):
        folder = Path(os.environ["OUT"])
    else:
        folder = Path(tempfile.mkdtemp(prefix="qbench-device-check-"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def main(argv: list[str] | None = None) -> int:
    """Parse the options, run every case within the budget, print one line per case and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes (toy on 64 images, ViT-B/32 on 2)")
    parser.add_argument("--device", default=None, help="cuda (default) or cpu (the default with --dry-run)")
    parser.add_argument("--models", default=None, type=lambda text: text.split(","),
                        help="some of toy,vitb32,vitl14 (default vitb32,vitl14,toy; toy,vitb32 with --dry-run)")
    parser.add_argument("--quantizers", default=",".join(QUANTIZERS), type=lambda text: text.split(","))
    parser.add_argument("--limit", type=int, default=None, help="images per dataset (default 500; 64 with --dry-run)")
    parser.add_argument("--proxy-n", type=int, default=None, help="calibration pairs (default 256; 32 with --dry-run)")
    parser.add_argument("--qat-steps", type=int, default=None, help="LSQ steps (default 20; 2 with --dry-run)")
    parser.add_argument("--qat-batch", type=int, default=16, help="LSQ training batch (default 16)")
    parser.add_argument("--repeats", type=int, default=None, help="bare-pass repetitions (default 5; 2 with --dry-run)")
    parser.add_argument("--budget-s", type=float, default=270.0, help="start no case after this many seconds")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    dry = args.dry_run
    device = args.device or ("cpu" if dry else "cuda")
    args.models = args.models or (["toy", "vitb32"] if dry else ["vitb32", "vitl14", "toy"])
    args.limit = args.limit or (64 if dry else 500)
    args.proxy_n = args.proxy_n or (32 if dry else 256)
    args.qat_steps = args.qat_steps or (2 if dry else 20)
    repeats = args.repeats or (2 if dry else 5)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    out = output_folder(args.out)
    os.environ["QBENCH_STORE"] = str(out / "store.sqlite")  # nothing of the developer's store or cache is used
    os.environ["QBENCH_CACHE"] = str(out / "cache")

    import torch

    from qbench.registry import build_registry

    if device == "cpu":
        torch.set_num_threads(1)
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA device: torch.cuda.is_available() is False; run with --dry-run (CPU) instead")
    registry = build_registry()
    facts = device_facts(device)
    print("device: " + ", ".join(f"{key} {value}" for key, value in facts.items()))
    from qbench.atomic import write_output

    started = time.perf_counter()
    results, skipped, failed = [], [], []
    path = out / "device_check.json"
    for case in plan(args):
        elapsed = time.perf_counter() - started
        name = f"{case.label} {case.quantizer}"
        if elapsed > args.budget_s:
            skipped.append(name)
            print(f"{name}: skipped, the budget of {args.budget_s:.0f} s is spent ({elapsed:.0f} s)")
            continue
        try:
            result = run_case(case, device, repeats, registry)
        except Exception as error:  # one broken case (e.g. out of memory while training) must not hide the rest
            first = str(error).splitlines()[0][:300] if str(error) else ""
            failed.append({"case": name, "error": f"{type(error).__name__}: {first}"})
            print(f"{name}: FAILED {type(error).__name__}: {first}", flush=True)
        else:
            results.append(result)
            print(line(result), flush=True)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        summary = {"facts": facts, "dry_run": dry, "results": results, "failed": failed, "skipped": skipped,
                   "elapsed_s": round(time.perf_counter() - started, 1)}
        write_output(path, json.dumps(summary, indent=1, default=str))  # after every case: a timeout keeps them
    verified = all(result["verified"] for result in results)
    print(f"device check: {len(results)} case(s) in {time.perf_counter() - started:.0f} s, {len(failed)} failed, "
          f"{len(skipped)} skipped; all verified: {'yes' if verified else 'NO'}; wrote {path}")
    return 0 if verified and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
