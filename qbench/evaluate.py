"""``qbench eval``: resolve a configuration, quantize, encode every image once per state, score, store.

The pipeline, and why it is shaped this way:

1. Resolve every name (model, quantizer, suites, datasets, proxy) and parse bits/scope *before* any
   heavy work, so bad input fails in one line within a second.
2. Hash the full configuration; an identical earlier evaluation is served from the results store.
3. Load datasets (missing roots fail here, still before any model work), the FP32 model and, when the
   quantizer needs it, the proxy calibration set.
4. Quantize a private deep copy, then verify on one batch that every quantized tensor holds at most
   2^b values (``quantizers.md`` §1.9).
5. Compute once: each image is preprocessed once and encoded once per encoder state (FP32, quantized);
   logits and metrics for every suite read those cached features.
"""

from __future__ import annotations

import copy
import platform
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from qbench import __version__
from qbench.confighash import config_hash
from qbench.data import DatasetRequest, DatasetSpec, LabeledImages, ProxySpec
from qbench.errors import QbenchError
from qbench.model import LoadRequest, ModelSpec, VLM
from qbench.quant.base import CalibrationData, Quantizer
from qbench.quant.spec import BitSpec, Scope
from qbench.registry import Registry
from qbench.suites import SuiteSpec

STATES = ("fp32", "quantized")
DEFAULT_PROXY = "toy-proxy"
VERIFICATION_BATCH = 32


@dataclass(frozen=True)
class EvalRequest:
    """Everything a user can set on ``qbench eval``; defaults give the offline toy-world run."""

    model: str = "toy-clip"
    quantizer: str = "minmax"
    quantizer_params: tuple[tuple[str, str], ...] = ()
    bits: str = "w8a8"
    scope: str = "visual"
    suites: tuple[str, ...] = ("toy-id",)
    seed: int = 0
    device: str = "cpu"
    proxy: str = DEFAULT_PROXY
    proxy_n: int = 1000
    data_root: str | None = None
    weights: str | None = None
    batch_size: int = 256


@dataclass(frozen=True)
class ResolvedRun:
    """A request with every name looked up and every value parsed; ``config`` is what gets hashed."""

    request: EvalRequest
    model: ModelSpec
    quantizer: Quantizer
    bits: BitSpec
    scope: Scope
    suites: tuple[SuiteSpec, ...]
    datasets: dict[str, DatasetSpec]
    proxy: ProxySpec | None
    config: dict[str, Any]


class Progress:
    """Progress reporting hooks; the CLI passes a rich-backed implementation, tests the silent default."""

    def log(self, message: str) -> None:
        """A status line (the CLI sends it to stderr)."""

    def track(self, items: Sequence, description: str) -> Iterator:
        return iter(items)


@dataclass
class EncodeCounter:
    """How many images each encoder state has encoded (the compute-once guarantee is tested on it)."""

    images: Counter = field(default_factory=Counter)


def resolve(request: EvalRequest, registry: Registry) -> ResolvedRun:
    """Look up every plugin and parse every value; all user errors surface here as one line."""
    model = registry.get("models", request.model)
    quantizer_class = registry.get("quantizers", request.quantizer)
    quantizer = quantizer_class.from_params(dict(request.quantizer_params))
    bits = BitSpec.parse(request.bits)
    scope = Scope.parse(request.scope)
    if not request.suites:
        raise QbenchError("no suite given: pass --suite NAME (see 'qbench list suites')")
    suites = tuple(registry.get("suites", name) for name in dict.fromkeys(request.suites))
    datasets = {name: registry.get("datasets", name) for suite in suites for name in suite.datasets}
    proxy = registry.get("proxies", request.proxy) if quantizer.needs_data else None
    if request.proxy_n < 1:
        raise QbenchError(f"bad --proxy-n {request.proxy_n}: it must be a positive number of image-caption pairs")
    _check_device(request.device)
    config = {
        "model": model.name,
        "weights_tag": model.weights_tag if request.weights is None else f"file:{request.weights}",
        "quantizer": quantizer.name,
        "quantizer_params": quantizer.params(),
        "bits": str(bits),
        "scope": scope.value,
        "proxy": proxy.name if proxy else None,
        "proxy_n": request.proxy_n if proxy else 0,
        "seed": request.seed,
        "suites": [{"name": suite.name, "version": suite.version} for suite in suites],
        "device": request.device,
        "qbench_version": __version__,
        "random_init": False,
    }
    config["config_hash"] = config_hash(config)
    return ResolvedRun(request, model, quantizer, bits, scope, suites, datasets, proxy, config)


def _check_device(device: str) -> None:
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise QbenchError(f"bad --device {device!r}: use cpu, cuda or cuda:N")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise QbenchError("--device cuda was given but no CUDA device is available; use --device cpu")


def run(resolved: ResolvedRun, progress: Progress | None = None, counter: EncodeCounter | None = None) -> dict[str, Any]:
    """Execute a resolved evaluation and return its result document (the ``--json`` object)."""
    import torch

    progress = progress or Progress()
    counter = counter if counter is not None else EncodeCounter()
    request = resolved.request
    timings: dict[str, float] = {}
    started = time.perf_counter()
    _seed_everything(request.seed)

    data_request = DatasetRequest(Path(request.data_root) if request.data_root else None, request.seed)
    datasets = {name: spec.loader(data_request) for name, spec in resolved.datasets.items()}
    fp32 = resolved.model.loader(LoadRequest(weights=request.weights, device=request.device))
    fp32 = fp32.to(request.device).eval()
    progress.log(f"loaded model {resolved.model.name} ({resolved.config['weights_tag']})")
    timings["load_s"] = time.perf_counter() - started

    calibration = _calibration(resolved, fp32, data_request) if resolved.proxy else None
    progress.log(f"quantizing with {resolved.quantizer.name} ({resolved.bits}, {resolved.scope.value} scope)")
    mark = time.perf_counter()
    quantized_model = resolved.quantizer.quantize(
        copy.deepcopy(fp32), resolved.bits, resolved.scope, calibration, request.seed
    )
    quantized = quantized_model.model.to(request.device).eval()
    quantized.clear_caches()
    timings["quantize_s"] = time.perf_counter() - mark

    verification = _verify(resolved, quantized, quantized_model.float_extras, next(iter(datasets.values())))
    states = {"fp32": fp32, "quantized": quantized}
    mark = time.perf_counter()
    features = {
        name: encode_dataset(dataset, states, request.batch_size, progress, counter)
        for name, dataset in datasets.items()
    }
    timings["encode_s"] = time.perf_counter() - mark
    logits = {
        name: {state: zero_shot_logits(states[state], datasets[name], features[name][state]) for state in STATES}
        for name in datasets
    }
    results, reliability = _score_suites(resolved.suites, datasets, logits)
    timings["total_s"] = time.perf_counter() - started
    return {
        "config": resolved.config,
        "provenance": provenance(request.device),
        "verification": verification,
        "quantizer_provenance": quantized_model.provenance,
        "datasets": {
            name: {"num_images": len(dataset), "fingerprint": dataset.fingerprint, "unreadable": dataset.unreadable}
            for name, dataset in datasets.items()
        },
        "results": results,
        "reliability": reliability,
        "timing": {key: round(value, 3) for key, value in timings.items()},
    }


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _calibration(resolved: ResolvedRun, model: VLM, data_request: DatasetRequest) -> CalibrationData:
    """The proxy window for this seed, preprocessed and tokenized for the model under test."""
    import torch

    pairs = resolved.proxy.loader(data_request, resolved.request.proxy_n)
    if len(pairs.images) < resolved.request.proxy_n:
        raise QbenchError(
            f"proxy {resolved.proxy.name!r} gave only {len(pairs.images)} pairs, {resolved.request.proxy_n} requested; "
            "lower --proxy-n or add data"
        )
    images = torch.stack([model.preprocess(image) for image in pairs.images])
    return CalibrationData(
        source=pairs.source,
        images=images,
        tokens=model.tokenize(pairs.captions),
        captions=pairs.captions,
        fingerprint=pairs.fingerprint,
    )


def _verify(resolved: ResolvedRun, model: VLM, float_extras: dict[str, str], dataset: LabeledImages) -> dict[str, Any]:
    """Distinct-value verification on one evaluation batch (images, and class prompts for the text tower)."""
    import torch

    from qbench.quant.verify import verify_quantized

    count = min(VERIFICATION_BATCH, len(dataset))
    images = torch.stack([model.preprocess(dataset.image(index)) for index in range(count)])
    prompts = [template.format(name) for name in dataset.classnames for template in dataset.templates[:1]]
    report = verify_quantized(
        model,
        images,
        model.tokenize(prompts),
        resolved.scope.towers,
        float_extras=float_extras,
        expect_quantized=resolved.quantizer.family != "baseline",
    )
    return report.to_dict()


def encode_dataset(
    dataset: LabeledImages,
    states: dict[str, VLM],
    batch_size: int,
    progress: Progress,
    counter: EncodeCounter,
) -> dict[str, "torch.Tensor"]:
    """Image features of every state: each batch is preprocessed once and encoded once per state."""
    import torch

    preprocess = next(iter(states.values())).preprocess
    outputs: dict[str, list] = {state: [] for state in states}
    starts = range(0, len(dataset), batch_size)
    with torch.no_grad():
        for start in progress.track(starts, f"encoding {dataset.name}"):
            indices = range(start, min(start + batch_size, len(dataset)))
            pixels = torch.stack([preprocess(dataset.image(index)) for index in indices])
            for state, model in states.items():
                outputs[state].append(model.encode_image(pixels).float().cpu())
                counter.images[state] += len(indices)
    return {state: torch.cat(chunks) for state, chunks in outputs.items()}


def zero_shot_logits(model: VLM, dataset: LabeledImages, image_features) -> np.ndarray:
    """``s * f @ W^T (+ b)`` in float64, with the state's own (possibly quantized) text head."""
    head = model.zero_shot_head(dataset.classnames, dataset.templates).double().numpy()
    logits = model.logit_scale * image_features.double().numpy() @ head.T
    if model.logit_bias is not None:
        logits = logits + model.logit_bias
    return logits


def _score_suites(
    suites: Sequence[SuiteSpec],
    datasets: dict[str, LabeledImages],
    logits: dict[str, dict[str, np.ndarray]],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    from qbench import metrics

    metric_functions: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
        "accuracy": metrics.accuracy,
        "ece": metrics.expected_calibration_error,
        "nll": metrics.negative_log_likelihood,
    }
    results, reliability = [], []
    for suite in suites:
        for task in suite.tasks:
            labels = datasets[task.dataset].labels
            for metric in task.metrics:
                fp = metric_functions[metric](logits[task.dataset]["fp32"], labels)
                q = metric_functions[metric](logits[task.dataset]["quantized"], labels)
                results.append(
                    {
                        "suite": suite.name,
                        "suite_version": suite.version,
                        "dataset": task.dataset,
                        "metric": metric,
                        "fp32": fp,
                        "quantized": q,
                        "delta": metrics.relative_change(fp, q),
                        "diff": q - fp,
                    }
                )
    for name, per_state in logits.items():
        for state, state_logits in per_state.items():
            bins = metrics.reliability_bins(state_logits, datasets[name].labels)
            reliability.append({"dataset": name, "state": state, "bins": [_bin_dict(item) for item in bins]})
    return results, reliability


def _bin_dict(item) -> dict[str, Any]:
    import dataclasses

    return {key: (None if isinstance(value, float) and np.isnan(value) else value) for key, value in dataclasses.asdict(item).items()}


def provenance(device: str) -> dict[str, Any]:
    """Software versions and machine facts stored with every result."""
    import open_clip
    import torch

    return {
        "qbench_version": __version__,
        "torch_version": torch.__version__,
        "open_clip_version": open_clip.__version__,
        "python_version": sys.version.split()[0],
        "platform": platform.platform(),
        "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else f"cpu ({platform.processor() or platform.machine()})",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
