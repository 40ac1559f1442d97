"""``qbench eval``: resolve a configuration, quantize, encode every image once per state, score, store.

The pipeline, and why it is shaped this way:

1. Resolve every name (model, quantizer, suites, datasets, proxy) and parse bits/scope *before* any
   heavy work, so bad input fails in one line within a second.
2. Hash the full configuration; an identical earlier evaluation is served from the results store.
3. Load datasets (missing roots fail here, still before any model work), the FP32 model and, when the
   quantizer needs it, the proxy calibration set.
4. Quantize a working copy (:mod:`qbench.engine.model_copy`: none for the ``fp32`` baseline, the in-scope towers
   otherwise) (or, with ``checkpoint``, rebuild the quantized model saved by
   ``qbench quantize`` without calibrating or training again), then verify on one batch that every
   quantized tensor holds at most 2^b values (``quantizers.md`` §1.9): recorded on the quantized state's own
   first evaluation pass (:class:`RunVerification`), not on a pass of its own.
5. Compute once (:mod:`qbench.engine.features`): each image is preprocessed once and encoded once per encoder
   state (FP32, quantized), each prompt set once per text-encoder state, with an on-disk cache keyed by
   the encoder state so a second run of the same checkpoint skips the forward passes; the datasets and
   feature taps come from the suites' task types (:mod:`qbench.tasks`).
6. Score each task through its task type (:func:`score_tasks`): the logit-stage tasks and the OOD
   detections every task declares (scored once, shared by all tasks) from those features, then the
   feature-stage tasks (spectral) and the model-stage probes (dropout). With ``logit_tuning``
   (``quantizers.md`` §5), the quantized model's logit scale is re-fit on the proxy pairs and every
   logit-stage and OOD record is scored again from the same cached features with that scale for the
   quantized column (records marked ``logit_tuned``); only the logits change.
7. Assemble the document and its per-sample evidence (:mod:`qbench.engine.evidence`).
"""

from __future__ import annotations

import platform
import random
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from qbench import __version__
from qbench.atomic import remove_orphan_partials
from qbench.engine.confighash import config_hash
from qbench.data import DatasetRequest, DatasetSpec, LabeledImages, LimitedImages, ProxySpec, UnreadableImage
from qbench.errors import QbenchError
from qbench.engine.evidence import EvidenceRecorder, attach_evidence
from qbench.builtins import eval_defaults
from qbench.engine.batching import LEADING_CHUNK, AdaptiveBatch, BatchPlan, image_shape_of, plan_batching
from qbench.engine.features import (TEXT_BATCH, EncodeCounter, FeatureCache, PassObserver, TextEncoder, default_cache_dir,
                             encode_datasets, pass_key, pass_layout, preprocess_images, state_fingerprints, zero_shot_head)
from qbench.model import LoadRequest, ModelSpec, VLM
from qbench.quant.base import CalibrationData, ProgressCallback, QuantizedModel, Quantizer
from qbench.quant.spec import BitSpec, Scope
from qbench.registry import Registry, plugin_identities
from qbench.scoring import Scorer, ScorerResources, resource_fingerprints
from qbench.engine.corruptions import default_pixel_cache, follow_model_size, with_pixel_cache
from qbench.suites import SuiteSpec
from qbench.engine.quantized_cache import QAT_CHECKPOINT_EVERY, QuantizedCache, default_quantized_cache
from qbench.engine.threads import TRAINING_THREADS, ThreadSetting, training_threads

if TYPE_CHECKING:
    from qbench.engine.checkpoint import Checkpoint
    from qbench.engine.logit_tuning import LogitTuning
    from qbench.engine.task_scoring import ScoredStates

STATES = ("fp32", "quantized")
EVALUATION_DATA_SEED = 0
"""Seed of generated evaluation data (toy splits, corrupted copies): fixed, so the test images are the same for every
run seed. The run seed varies what the quantizer draws (calibration window, QAT order), so statistics over seeds
measure the quantizer's randomness on one test set and the FP32 model is deterministic (``scoring.md`` §2.7)."""
VERIFICATION_BATCH = LEADING_CHUNK
"""Images the distinct-value verification checks: the first pass of the verified split (:class:`RunVerification`)."""
QUANTIZATION_KEYS = ("model", "weights_tag", "quantizer", "quantizer_params", "bits", "scope", "proxy", "proxy_n",
                     "seed", "device", "qbench_version", "random_init")
"""The part of a run configuration that determines the quantized model (what a checkpoint records)."""
QUANTIZATION_PLUGIN_KINDS = ("models", "quantizers", "proxies")
"""Registry kinds whose third-party plugin identity (``config["plugins"]``) enters the quantization config."""


@dataclass(frozen=True)
class EvalRequest:
    """Everything a user can set on ``qbench eval``. Model, quantizer, suites and proxy default to what the
    built-in plugins declare for an argument-less run (:func:`qbench.builtins.eval_defaults`, offline)."""

    model: str = field(default_factory=lambda: eval_defaults().model)
    quantizer: str = field(default_factory=lambda: eval_defaults().quantizer)
    quantizer_params: tuple[tuple[str, str], ...] = ()
    bits: str = "w8a8"
    scope: str = "visual"
    suites: tuple[str, ...] = field(default_factory=lambda: eval_defaults().suites)
    seed: int = 0
    device: str = "cpu"
    proxy: str = field(default_factory=lambda: eval_defaults().proxy)
    proxy_n: int = 1000
    data_root: str | None = None
    weights: str | None = None
    hf_cache: str | None = None  # Hugging Face hub cache to probe for pretrained weights (default $HF_HUB_CACHE)
    allow_download: bool = False  # let pretrained-model loaders download missing weights (off: never touch the network)
    random_init: bool = False  # the model's architecture with random weights (smoke runs; stamped, refused by the leaderboard)
    batch_size: int | None = None  # images per batch; None: chosen from the device's memory (qbench.engine.batching)
    workers: int | None = None  # image-decoding processes; None: chosen from the usable cores
    scorers: tuple[str, ...] = ()
    scorer_params: tuple[tuple[str, str, str], ...] = ()  # (scorer, name, value)
    resources: ScorerResources = field(default_factory=ScorerResources)
    feature_cache: bool = True
    cache_dir: str | None = None
    limit: int | None = None  # first N images of every dataset (quick looks; part of the config hash)
    logit_tuning: bool = False  # also score with the logit scale re-fit on the proxy (quantizers.md §5)
    checkpoint: str | None = None  # a 'qbench quantize --out' folder: its quantized model instead of quantizing
    threads: ThreadSetting | None = None  # torch threads chosen by the caller (qbench.engine.threads; provenance, not hashed)
    qat_checkpoint_every: int = QAT_CHECKPOINT_EVERY  # QAT optimizer steps between step checkpoints (not hashed)
    refresh_cache: bool = False  # recompute cached features and overwrite them ('eval --force'; not hashed)


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
    scorers: dict[str, Scorer]
    config: dict[str, Any]
    checkpoint: "Checkpoint | None" = None

    @property
    def quantization_config(self) -> dict[str, Any]:
        """The settings that determine the quantized model, hashed on their own (a checkpoint's identity)."""
        config = {key: self.config[key] for key in QUANTIZATION_KEYS}
        plugins = {item: identity for item, identity in self.config.get("plugins", {}).items()
                   if item.split(":", 1)[0] in QUANTIZATION_PLUGIN_KINDS}
        if plugins:  # a third-party model, quantizer or proxy: its version determines the quantized model too
            config["plugins"] = plugins
        config["config_hash"] = config_hash(config)
        return config


class Progress:
    """Progress reporting hooks; the CLI passes a rich-backed implementation, tests the silent default."""

    def log(self, message: str) -> None:
        """A status line (the CLI sends it to stderr)."""

    def track(self, items: Sequence, description: str) -> Iterator:
        return iter(items)

    @contextmanager
    def training(self, description: str) -> Iterator[ProgressCallback | None]:
        """A ``(step, total, loss)`` callback for a quantizer that trains (the CLI draws a progress bar)."""
        yield None


def checkpoint_request(request: EvalRequest) -> tuple[EvalRequest, "Checkpoint"]:
    """``request`` with the model, quantizer, bits, scope, seed and proxy of its checkpoint, and the checkpoint."""
    import dataclasses

    from qbench.engine.checkpoint import read_checkpoint

    checkpoint = read_checkpoint(request.checkpoint)
    saved = checkpoint.config
    try:
        request = dataclasses.replace(
            request, model=saved["model"], quantizer=saved["quantizer"],
            quantizer_params=tuple(saved["quantizer_params"].items()), bits=saved["bits"], scope=saved["scope"],
            seed=int(saved["seed"]), proxy=saved["proxy"] or request.proxy, proxy_n=int(saved["proxy_n"]) or request.proxy_n,
        )
    except (KeyError, AttributeError, TypeError, ValueError) as error:
        raise QbenchError(f"checkpoint {checkpoint.path}: its config lacks or mangles {error}; re-create it with 'qbench quantize'") from None
    return request, checkpoint


def resolve(request: EvalRequest, registry: Registry, *, require_suites: bool = True,
            check_device: bool = True) -> ResolvedRun:
    """Look up every plugin and parse every value; all user errors surface here as one line.

    With ``request.checkpoint`` the quantization settings come from the checkpoint. ``require_suites=False``
    resolves a quantization alone (``qbench quantize``). ``check_device=False`` accepts a CUDA device this
    machine does not have (a sweep planned on a login node for GPU jobs; the job checks it again).
    """
    checkpoint = None
    if request.checkpoint is not None:
        request, checkpoint = checkpoint_request(request)
    model = registry.get("models", request.model)
    quantizer_class = registry.get("quantizers", request.quantizer)
    quantizer = quantizer_class.from_params(dict(request.quantizer_params), registry=registry)
    bits = BitSpec.parse(request.bits)
    scope = Scope.parse(request.scope)
    if require_suites and not request.suites:
        raise QbenchError("no suite given: pass --suite NAME (see 'qbench list suites')")
    suites = tuple(registry.get("suites", name) for name in dict.fromkeys(request.suites))
    datasets = {name: registry.get("datasets", name) for suite in suites for name in suite.datasets}
    scorers = _resolve_scorers(request, suites, registry)
    needs_proxy = quantizer.needs_data or request.logit_tuning
    proxy = registry.get("proxies", request.proxy) if needs_proxy else None
    if request.limit is not None and (_not_whole(request.limit) or request.limit < 1):
        raise QbenchError(f"bad --limit {request.limit!r}: it must be a positive whole number of images per dataset")
    if _not_whole(request.seed) or not 0 <= request.seed < 2**32:
        raise QbenchError(f"bad seed {request.seed!r}: seeds are whole numbers from 0 to {2**32 - 1}")
    if request.proxy_n < 1:
        raise QbenchError(f"bad --proxy-n {request.proxy_n}: it must be a positive number of image-caption pairs")
    _check_device(request.device, available=check_device)
    config = {
        "model": model.name,
        "weights_tag": _weights_tag(model, request),
        "quantizer": quantizer.name,
        "quantizer_params": quantizer.params(),
        "bits": str(bits),
        "scope": scope.value,
        "proxy": proxy.name if proxy else None,
        "proxy_n": request.proxy_n if proxy else 0,
        "seed": request.seed,
        "limit": request.limit,
        "suites": [{"name": suite.name, "version": suite.version} for suite in suites],
        "scorers": {name: scorer.params() for name, scorer in scorers.items()},
        "scorer_resources": _resource_fingerprints(request.resources) if scorers else {},
        "device": request.device,
        "qbench_version": __version__,
        "random_init": request.random_init,
    }
    if request.logit_tuning:  # only when on, so the hashes of untuned runs stay what they were
        config["logit_tuning"] = True
    if checkpoint is not None:  # the quantized model comes from a file: name it (same settings, other provenance)
        config["checkpoint"] = {"config_hash": checkpoint.config_hash, "sha256": checkpoint.state_sha256[:16]}
    identities = plugin_identities(registry, {
        "models": [model.name], "quantizers": [quantizer.name], "scorers": list(scorers),
        "suites": [suite.name for suite in suites], "datasets": list(datasets), "proxies": [proxy.name] if proxy else [],
        "task_types": [task.type for suite in suites for task in suite.tasks]})
    if identities:  # third-party items only: built-ins are pinned by qbench_version, so built-in hashes stay put
        config["plugins"] = identities
    config["config_hash"] = config_hash(config)
    if checkpoint is not None and not request.logit_tuning:
        proxy = None  # recorded in the config (the checkpoint was calibrated on it) but not loaded: nothing to fit
    return ResolvedRun(request, model, quantizer, bits, scope, suites, datasets, proxy, scorers, config, checkpoint)


def _not_whole(value: object) -> bool:
    """True for anything but an integer (a bool, or 5.5 from a settings file, is not a count or a seed)."""
    import numbers

    return isinstance(value, bool) or not isinstance(value, numbers.Integral)


def _weights_tag(model: ModelSpec, request: EvalRequest) -> str:
    """The registered tag, ``file:PATH`` for ``--weights``, or the tag stamped ``:random-init``."""
    if request.random_init:
        return f"{model.weights_tag}:random-init"
    return model.weights_tag if request.weights is None else f"file:{request.weights}"


def feature_cache_root(request: EvalRequest) -> Path | None:
    """The request's feature cache folder (``--cache-dir``, else ``$QBENCH_CACHE`` or the default); None when
    ``--no-feature-cache`` turns every disk cache off (features, corrupted pixels, kept quantized models)."""
    if not request.feature_cache:
        return None
    return Path(request.cache_dir).expanduser() if request.cache_dir else default_cache_dir()


def load_request(request: EvalRequest) -> LoadRequest:
    """What the model loader needs from an evaluation request."""
    return LoadRequest(weights=request.weights, device=request.device, cache_dir=request.hf_cache,
                       allow_download=request.allow_download, random_init=request.random_init)


def _resolve_scorers(request: EvalRequest, suites: Sequence[SuiteSpec], registry: Registry) -> dict[str, Scorer]:
    """Scorers the detection tasks will run; none without a detection task.

    Each detection task runs the scorers its suite lists, else its task type's default (declared by the task
    type plugin), never "whatever is installed", so installing a scorer changes
    no configuration. ``--scorer`` replaces the default scorers for this run; scorers a suite lists always
    run for that suite. ``--sparam scorer.name=value`` overrides apply to the scorer they name, which must be
    one that runs.
    """
    detections = [task for suite in suites for task in suite.ood_tasks]
    if not detections:
        if request.scorers or request.scorer_params:
            raise QbenchError("--scorer/--sparam given but no selected suite has an OOD task; add a suite with one (see 'qbench list suites')")
        return {}
    defaults = [name for task in detections if task.default_scorers for name in task.scorers]
    listed = [name for task in detections if not task.default_scorers for name in task.scorers]
    names = list(dict.fromkeys([*(list(request.scorers) or defaults), *listed]))
    overrides: dict[str, dict[str, str]] = {}
    for scorer, key, value in request.scorer_params:
        if scorer not in names:
            raise QbenchError(f"--sparam {scorer}.{key}: scorer {scorer!r} does not run in this evaluation (running: {', '.join(names)})")
        overrides.setdefault(scorer, {})[key] = value
    return {name: registry.get("scorers", name).from_params(overrides.get(name, {})) for name in names}


def _resource_fingerprints(resources: ScorerResources) -> dict[str, str]:
    """Content hashes of user-supplied scorer files (and values as written), by resource key, for the config
    hash (:func:`qbench.scoring.resource_fingerprints`)."""
    return resource_fingerprints(resources)


def _check_device(device: str, *, available: bool = True) -> None:
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise QbenchError(f"bad --device {device!r}: use cpu, cuda or cuda:N")
    if available and device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise QbenchError("--device cuda was given but no CUDA device is available; use --device cpu")


def run(resolved: ResolvedRun, progress: Progress | None = None, counter: EncodeCounter | None = None) -> dict[str, Any]:
    """Execute a resolved evaluation and return its result document (the ``--json`` object).

    A short pipeline: load the datasets and the FP32 model, quantize (or restore), encode every dataset once per
    state (with the feature taps the task types ask for), score every task through its task type
    (:func:`score_tasks`; the OOD detections once for all tasks), and assemble the document. The verification
    records its kernels on the quantized state's own first evaluation pass and class-prompt pass
    (:class:`RunVerification`), and ``encoder_calls`` comes from forward hooks on the states' towers
    (:meth:`EncodeCounter.watching`), so it counts every pass that ran.
    """
    progress = progress or Progress()
    counter = counter if counter is not None else EncodeCounter()
    request = resolved.request
    timings: dict[str, float] = {}
    started = time.perf_counter()
    _seed_everything(request.seed)

    data_request = DatasetRequest(Path(request.data_root) if request.data_root else None, request.seed)
    fp32, datasets, feature_root = _load(resolved, progress)
    timings["load_s"] = time.perf_counter() - started
    plan = batch_plan(request, fp32, progress)

    calibration = _lazy_calibration(resolved, fp32, data_request, plan)
    mark = time.perf_counter()
    reuse = QuantizedCache(default_quantized_cache(feature_root), request.qat_checkpoint_every) if feature_root is not None else None
    quantized_model = obtain_quantized(resolved, fp32, calibration, progress, reuse)
    quantized = quantized_model.model.to(request.device).eval()
    quantized.clear_caches()
    timings["quantize_s"] = time.perf_counter() - mark
    states = {"fp32": fp32, "quantized": quantized}
    with counter.watching(states):  # encoder_calls: every completed pass of the states' towers from here on
        tuning = _tune_logit_scale(quantized, calibration(), plan.batch_size, progress) if request.logit_tuning else None
        verifier = RunVerification(resolved, quantized, quantized_model.float_extras, datasets)

        mark = time.perf_counter()
        encoding = encode_run(resolved, states, datasets, plan, feature_root, progress, counter, observer=verifier)
        timings["encode_s"] = time.perf_counter() - mark

        scored, ood, sections, evidence = score_tasks(resolved, encoding, datasets, plan, progress, tuning, timings)
        verification = verifier.finish(encoding.cache, encoding.image_prints["quantized"],
                                       encoding.text_prints["quantized"])
    timings["total_s"] = time.perf_counter() - started
    document = {
        "config": resolved.config,
        "provenance": {**provenance(request.device), "threads": thread_provenance(request), "batching": {
            **plan.to_dict(), "image_encode_batch": encoding.image_batch.to_dict(),
            "text_encode_batch": encoding.text.batch.to_dict()}},
        "model": dict(getattr(fp32, "load_info", {}) or {}),
        "verification": verification,
        "quantizer_provenance": quantized_model.provenance,
        "datasets": {
            name: {
                "num_images": len(dataset),
                "num_scored": int(len(encoding.encoded[name].kept)),
                "fingerprint": dataset.fingerprint,
                "unreadable": len(encoding.encoded[name].unreadable),
                "unreadable_examples": encoding.encoded[name].unreadable[:5],
                **({"notes": list(dataset.notes)} if getattr(dataset, "notes", None) else {}),
            }
            for name, dataset in datasets.items()
        },
        "results": scored.results,
        "skipped": ood.skipped,
        "scorers": ood.provenance,
        "reliability": scored.reliability,
        "bin_trajectories": scored.trajectories,
        "ood_histograms": scored.histograms,
        **sections,
        "encoder_calls": {
            "images": dict(counter.images), "texts": dict(counter.texts), "cache_hits": dict(counter.cache_hits),
            "images_by_dataset": {name: dict(counts) for name, counts in counter.images_by_dataset.items()},
            "state_fingerprints": {"image": encoding.image_prints, "text": encoding.text_prints},
        },
        "timing": {key: round(value, 3) for key, value in timings.items()},
    }
    if tuning is not None:
        pairs = calibration()
        document["logit_tuning"] = {**tuning.to_dict(), "proxy": pairs.source, "proxy_n": len(pairs),
                                    "proxy_fingerprint": pairs.fingerprint}
    return attach_evidence(document, evidence.to_bytes(resolved.config["config_hash"]))


def _load(resolved: ResolvedRun, progress: Progress) -> tuple[VLM, dict[str, LabeledImages], Path | None]:
    """The run's evaluation datasets (fixed data seed, sized for the model, pixel-cached, ``--limit``ed), the FP32
    model on its device, and the feature cache root (files a killed run left half-written are removed first)."""
    request = resolved.request
    evaluation_data = DatasetRequest(Path(request.data_root) if request.data_root else None, EVALUATION_DATA_SEED)
    datasets = {name: spec.loader(evaluation_data) for name, spec in resolved.datasets.items()}
    fp32 = resolved.model.loader(load_request(request))
    fp32 = fp32.to(request.device).eval()
    progress.log(f"loaded model {resolved.model.name} ({resolved.config['weights_tag']})")
    feature_root = feature_cache_root(request)
    pixel_root = default_pixel_cache(feature_root) if feature_root is not None else None
    for root in (feature_root, pixel_root):  # files a killed run left half-written (qbench.atomic)
        if root is not None:
            remove_orphan_partials(root)
    datasets = {name: with_pixel_cache(follow_model_size(dataset, fp32.preprocess), pixel_root) for name, dataset in datasets.items()}
    if request.limit:
        datasets = {name: LimitedImages(dataset, request.limit) for name, dataset in datasets.items()}
    return fp32, datasets, feature_root


@dataclass
class Encoding:
    """The run's one encoding pass: models per state, their fingerprints, cached features and taps, text encoder."""

    states: dict[str, VLM]
    cache: FeatureCache
    image_prints: dict[str, str]
    text_prints: dict[str, str]
    image_batch: AdaptiveBatch
    encoded: dict[str, Any]
    text: TextEncoder
    features: dict[str, dict[str, np.ndarray]]
    labels: dict[str, np.ndarray]

    def taps(self) -> dict[str, dict[str, dict[str, np.ndarray]]]:
        """Dataset -> state -> tap -> float64 array, for the datasets encoded with taps."""
        return {name: {state: {tap: tensor.double().numpy() for tap, tensor in by_tap.items()}
                       for state, by_tap in split.taps.items()}
                for name, split in self.encoded.items() if split.taps}


def encode_run(resolved: ResolvedRun, states: dict[str, VLM], datasets: dict[str, LabeledImages], plan: BatchPlan,
               feature_root: Path | None, progress: Progress, counter: EncodeCounter,
               observer: PassObserver | None = None) -> Encoding:
    """Encode every dataset once per state (cached on disk by encoder state), recording the taps every task type asks
    for; ``observer`` (the run's :class:`RunVerification`) may wrap the first pass of each image and prompt encoding."""
    request = resolved.request
    cache = FeatureCache(feature_root, log=progress.log, refresh=request.refresh_cache)
    image_prints = state_fingerprints(states, "visual")
    text_prints = state_fingerprints(states, "text")
    image_batch = AdaptiveBatch(plan.batch_size, progress, "image")
    encoded = encode_datasets(datasets, states, image_prints, plan.batch_size, cache, progress, counter,
                              workers=plan.workers, encoder=image_batch, taps=feature_taps(resolved.suites),
                              observer=observer)
    text = TextEncoder(states, text_prints, cache, progress, counter, observer=observer)
    features = {name: {state: split.by_state[state].double().numpy() for state in STATES} for name, split in encoded.items()}
    labels = {name: datasets[name].labels[split.kept] for name, split in encoded.items()}
    return Encoding(states, cache, image_prints, text_prints, image_batch, encoded, text, features, labels)


def obtain_quantized(resolved: ResolvedRun, fp32: VLM, calibration: Callable[[], CalibrationData | None], progress: Progress,
                     reuse: QuantizedCache | None = None) -> QuantizedModel:
    """The quantized twin of ``fp32``: rebuilt from the run's checkpoint, kept from an earlier attempt of the same
    quantization (``reuse``, :mod:`qbench.engine.quantized_cache`), or made by its quantizer now (and then kept).

    ``calibration`` builds the proxy pairs on first call; a restored model never needs them.
    """
    if resolved.checkpoint is not None:
        from qbench.engine.checkpoint import restore_quantized

        quantized = restore_quantized(resolved.checkpoint, fp32)
        progress.log(f"restored {resolved.quantizer.name} ({resolved.bits}, {resolved.scope.value} scope) from checkpoint "
                     f"{resolved.checkpoint.path} (config {resolved.checkpoint.config_hash}); no calibration or training")
        return quantized
    if reuse is None or resolved.quantizer.family == "baseline":  # nothing worth keeping in a baseline
        return quantize_model(resolved, fp32, calibration(), progress)
    from qbench.engine.checkpoint import save_checkpoint

    config = resolved.quantization_config
    return reuse.obtain(
        config["config_hash"], fp32,
        lambda steps: quantize_model(resolved, fp32, calibration(), progress, steps),
        lambda quantized, folder: save_checkpoint(folder, fp32, quantized, config, staging_root=reuse.root),
        progress,
    )


def quantize_model(resolved: ResolvedRun, fp32: VLM, calibration: CalibrationData | None, progress: Progress,
                   training_checkpoints: Any = None) -> QuantizedModel:
    """Run the quantizer on its working copy of ``fp32``, with a training progress callback if it trains and
    ``training_checkpoints`` (:class:`~qbench.quant.training_state.TrainingCheckpoints`) for a QAT method to
    resume from.

    The working copy (:func:`qbench.engine.model_copy.working_copy`) is ``fp32`` itself for the baseline family
    and otherwise a deep copy that shares the towers outside the scope with ``fp32``; a quantizer that changed
    what it shares stops the run with a one-line error naming it."""
    from qbench.engine.model_copy import working_copy

    quantizer = resolved.quantizer
    pinned = f"; training on {TRAINING_THREADS} torch thread, so --threads cannot change it" if quantizer.needs_grad else ""
    progress.log(f"quantizing with {quantizer.name} ({resolved.bits}, {resolved.scope.value} scope){pinned}")
    training_bar = getattr(progress, "training", None)  # optional: log/track-only reporters have none
    with training_bar(f"{quantizer.name} {resolved.bits}") if training_bar else nullcontext() as callback:
        quantizer.progress = callback
        quantizer.training_checkpoints = training_checkpoints
        try:
            work = working_copy(fp32, quantizer, resolved.scope)
            with training_threads(quantizer.needs_grad):  # qbench.engine.threads: thread-dependent backward kernels
                quantized = quantizer.quantize(
                    work.model, resolved.bits, resolved.scope, calibration if quantizer.needs_data else None,
                    resolved.request.seed,
                )
        finally:
            quantizer.progress = None
            quantizer.training_checkpoints = None
    work.check()
    training = quantized.provenance.get("training") if isinstance(quantized.provenance, dict) else None
    if training and training.get("steps"):
        progress.log(f"trained {training['steps']} steps × {training['batch_size']} pairs: batch loss "
                     f"{training['first_loss']:.4f} -> {training['last_loss']:.4f}, calibration-set loss "
                     f"{training['calibration_loss_before']:.4f} -> {training['calibration_loss_after']:.4f}")
    return quantized


def _lazy_calibration(resolved: ResolvedRun, fp32: VLM, data_request: DatasetRequest,
                      plan: BatchPlan) -> Callable[[], CalibrationData | None]:
    """The run's proxy pairs, built on first use only (a restored quantized model without logit tuning needs none)."""
    built: list[CalibrationData | None] = []

    def calibration() -> CalibrationData | None:
        if not built:
            built.append(_calibration(resolved, fp32, data_request, plan=plan) if resolved.proxy else None)
        return built[0]

    return calibration


def thread_provenance(request: EvalRequest) -> dict[str, Any]:
    """The torch thread count this run used and where it came from (``qbench.engine.threads``)."""
    import torch

    if request.threads is not None:
        return request.threads.to_dict()
    return {"torch_threads": torch.get_num_threads(), "source": "caller"}


def quantize_to_checkpoint(resolved: ResolvedRun, verification_proxy: ProxySpec, out: str | Path, progress: Progress | None = None,
                           *, overwrite: bool = False) -> tuple["Checkpoint", dict[str, Any]]:
    """``qbench quantize``: load the float model, quantize it once, verify it on proxy pairs, save a checkpoint.

    Returns the checkpoint and the verification report. The target folder is checked before any work.
    """
    from qbench.engine.checkpoint import CONFIG_FILE, save_checkpoint

    progress = progress or Progress()
    request = resolved.request
    target = Path(out).expanduser()
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not overwrite)):
        raise QbenchError(f"--out {target} exists and is not empty; choose another folder or pass --force to replace it")
    if target.is_dir() and overwrite and any(target.iterdir()) and not (target / CONFIG_FILE).is_file():
        raise QbenchError(f"--out {target} holds files that are not a qbench checkpoint; --force only replaces checkpoints")
    _seed_everything(request.seed)
    data_request = DatasetRequest(Path(request.data_root) if request.data_root else None, request.seed)
    fp32 = resolved.model.loader(load_request(request)).to(request.device).eval()
    progress.log(f"loaded model {resolved.model.name} ({resolved.config['weights_tag']})")
    plan = batch_plan(request, fp32, progress)
    calibration = _calibration(resolved, fp32, data_request, plan=plan) if resolved.proxy else None
    quantized = quantize_model(resolved, fp32, calibration, progress)
    quantized.model.to(request.device).eval()
    pairs = calibration if calibration is not None else _calibration(resolved, fp32, data_request, verification_proxy,
                                                                     VERIFICATION_BATCH, plan=plan)
    verification = verification_on_proxy(resolved, quantized.model, quantized, pairs)
    checkpoint = save_checkpoint(target, fp32, quantized, resolved.quantization_config, verification=verification,
                                 overwrite=overwrite, batching=plan.to_dict())
    return checkpoint, verification


def verification_on_proxy(resolved: ResolvedRun, model: VLM, quantized: QuantizedModel, pairs: CalibrationData) -> dict[str, Any]:
    """The distinct-value verification on the first proxy pairs (``qbench quantize`` has no evaluation data)."""
    from qbench.quant.verify import verify_quantized

    batch = pairs.take(VERIFICATION_BATCH)
    report = verify_quantized(model, batch.images, batch.tokens, resolved.scope.towers,
                              float_extras=quantized.float_extras,
                              expect_quantized=resolved.quantizer.family != "baseline",
                              bits=resolved.bits, quantizer=resolved.quantizer)
    return report.to_dict()


def batch_plan(request: EvalRequest, model: VLM, progress: Progress) -> BatchPlan:
    """The run's batch size and workers (the request's, else chosen for ``model`` on its device), logged once.

    Called once the float model is on the device, so the memory it measures (available RAM, or free GPU memory;
    recorded as the plan's ``memory_source``) is what encoding has left.
    """
    plan = plan_batching(request.device, request.batch_size, request.workers, image_shape_of(model.preprocess))
    progress.log(plan.describe())
    return plan


def _tune_logit_scale(quantized: VLM, calibration: CalibrationData, batch_size: int, progress: Progress) -> LogitTuning:
    """Re-fit the quantized model's logit scale on the proxy pairs (its towers as deployed, encoded once)."""
    from qbench.engine.logit_tuning import tune_model_scale

    tuning = tune_model_scale(quantized, calibration.images, calibration.tokens, batch_size)
    progress.log(f"logit tuning on {len(calibration)} proxy pairs: s {tuning.s_before:.4g} -> {tuning.s_after:.4g} "
                 f"(proxy loss {tuning.loss_before:.4f} -> {tuning.loss_after:.4f})")
    return tuning


def _tuned_classifiers(classifier_for: Callable, tuned_scale: float) -> Callable:
    """The same classifiers with the quantized state's logit scale replaced by ``tuned_scale`` (FP32 untouched).

    Heads and cached features are shared, so tuned scores cost no forward pass.
    """
    import dataclasses

    built: dict[str, Any] = {}

    def tuned_for(name: str):
        if name not in built:
            classifier = classifier_for(name)
            built[name] = dataclasses.replace(classifier, logit_scales={**classifier.logit_scales, "quantized": tuned_scale})
        return built[name]

    return tuned_for


TASK_SECTIONS = ("spectral", "dropout")
"""Document sections every result document has (the submission schema requires them), empty when no task fills them;
a task type may add others (:attr:`qbench.tasks.TaskOutput.sections`)."""


def score_states(resolved: ResolvedRun, features: dict[str, dict[str, np.ndarray]], labels: dict[str, np.ndarray],
                 classifier_for: Callable, text: TextEncoder, *, tuned: bool,
                 evidence: "EvidenceRecorder | None" = None, reuse_fp32: Any = None) -> tuple["ScoredStates", Any]:
    """One logit-scale setting: every logit-stage task through its task type, the OOD detections of every task
    (scored once, shared), reliability bins and bin trajectories, from one logit bank; and the OOD outcome.

    ``reuse_fp32``: the OOD outcome of the untuned setting, when this one changes only the quantized logit scale;
    its FP32 scores are taken instead of scoring the unchanged FP32 state again
    (:func:`qbench.engine.ood_eval.score_ood_tasks`)."""
    from qbench.engine.task_scoring import LogitBank, score_logit_states

    bank = LogitBank(features, labels, classifier_for)
    ood = _score_ood(resolved, bank, text, reuse_fp32)
    scored = score_logit_states(resolved.suites, bank, (ood.results, ood.histograms), tuned=tuned,
                                target="quantized-tuned" if tuned else "quantized", ood=ood, seed=resolved.request.seed)
    if evidence is not None:  # the arrays every record above was computed from (qbench.engine.evidence)
        evidence.add_bank(bank, tuned=tuned)
        evidence.add_pairs(ood.pairs, tuned=tuned)
    return scored, ood


def score_tasks(resolved: ResolvedRun, encoding: Encoding, datasets: dict[str, LabeledImages], plan: BatchPlan,
                progress: Progress, tuning: "LogitTuning | None", timings: dict[str, float], *, reuse_fp32: Any = None
                ) -> tuple["ScoredStates", Any, dict[str, list[dict[str, Any]]], EvidenceRecorder]:
    """Every task of every suite through its task type, by stage (:mod:`qbench.tasks`).

    Logit-stage tasks and the shared OOD detections first, untuned then (with ``tuning``) with the tuned quantized
    logit scale, merged as :func:`qbench.engine.task_scoring.merge_tuned` (the same assembly ``qbench rescore`` uses);
    then the feature-stage tasks once, then the model-stage tasks (timed as ``<task type>_s``). Returns the
    scored sections, the OOD outcome (skipped scorers, provenance), the task sections and the evidence.
    ``reuse_fp32``: the OOD outcome of an earlier scoring of the same FP32 features (``qbench deploy-check`` scores
    the simulated and the real quantized state against one FP32 state), whose FP32 scores are taken as they are.
    """
    import dataclasses

    from qbench.engine.task_scoring import mark_tuned, merge_tuned
    from qbench.tasks import STAGE_FEATURES, STAGE_MODEL, TaskRun

    mark = time.perf_counter()
    classifier_for = _classifiers(datasets, encoding.states, encoding.text)
    evidence = EvidenceRecorder()
    untuned, ood = score_states(resolved, encoding.features, encoding.labels, classifier_for, encoding.text, tuned=False,
                                evidence=evidence, reuse_fp32=reuse_fp32)
    tuned = None
    if tuning is not None:
        tuned, _ = score_states(resolved, encoding.features, encoding.labels,
                                _tuned_classifiers(classifier_for, tuning.s_after), encoding.text, tuned=True, evidence=evidence,
                                reuse_fp32=ood)  # the FP32 state is never tuned: its OOD scores are the untuned ones
    scored = merge_tuned(untuned, tuned)
    sections: dict[str, list[dict[str, Any]]] = {name: [] for name in TASK_SECTIONS}
    base = TaskRun(suite=resolved.suites[0] if resolved.suites else None, seed=resolved.request.seed, ood=ood,
                   features=encoding.features, labels=encoding.labels, classifier_for=classifier_for,
                   states=encoding.states, fp32=encoding.states["fp32"], datasets=datasets, batch_size=plan.batch_size,
                   workers=plan.workers, cache=encoding.cache, progress=progress,
                   fingerprints={state: (encoding.image_prints[state], encoding.text_prints[state]) for state in STATES})
    for stage in (STAGE_FEATURES, STAGE_MODEL):
        staged = [(suite, task_type, task) for suite in resolved.suites for task_type, task in suite.typed_tasks()
                  if task_type.stage == stage]
        if stage == STAGE_FEATURES and staged:
            base = dataclasses.replace(base, taps=encoding.taps())
        if stage == STAGE_MODEL:
            timings["score_s"] = time.perf_counter() - mark
        for suite, task_type, task in staged:
            began = time.perf_counter()
            output = task_type.score(task, dataclasses.replace(base, suite=suite))
            scored.results += mark_tuned(output.records, False)
            for name, entries in output.sections.items():
                sections.setdefault(name, []).extend(entries)
            if stage == STAGE_MODEL:
                key = f"{task_type.name}_s"
                timings[key] = timings.get(key, 0.0) + time.perf_counter() - began
    return scored, ood, sections, evidence


def feature_taps(suites: Sequence[SuiteSpec]) -> dict[str, tuple[str, ...]]:
    """Dataset -> the feature taps its tasks read (:meth:`qbench.tasks.TaskType.taps`), recorded during the run's
    one encoding pass."""
    taps: dict[str, set[str]] = {}
    for suite in suites:
        for task_type, task in suite.typed_tasks():
            for dataset, names in task_type.taps(task).items():
                taps.setdefault(dataset, set()).update(names)
    return {name: tuple(sorted(names)) for name, names in taps.items() if names}


def _classifiers(datasets: dict[str, LabeledImages], states: dict[str, VLM], text: TextEncoder):
    """A memoised lookup: ID dataset name -> its label set's classifier for every state."""
    from qbench.engine.ood_eval import IdClassifier

    built: dict[str, IdClassifier] = {}

    def classifier_for(name: str) -> IdClassifier:
        if name not in built:
            dataset = datasets[name]
            if not dataset.classnames:
                raise QbenchError(f"dataset {name!r} has no class names, so it cannot be the ID side of a suite task")
            built[name] = IdClassifier(
                classnames=tuple(dataset.classnames),
                templates=tuple(dataset.templates),
                heads={state: zero_shot_head(text, state, dataset.classnames, dataset.templates) for state in STATES},
                logit_scales={state: states[state].logit_scale for state in STATES},
                logit_biases={state: states[state].logit_bias for state in STATES},
            )
        return built[name]

    return classifier_for


def _score_ood(resolved: ResolvedRun, bank, text: TextEncoder, reuse_fp32: Any = None):
    """Every detection of the run's suites with the resolved scorers, from ``bank`` (none without scorers);
    ``reuse_fp32`` as in :func:`score_states`."""
    from qbench.engine.ood_eval import OODOutcome, score_ood_tasks

    if not resolved.scorers:
        return OODOutcome()
    dataset_resources = {name: spec.resources for name, spec in resolved.datasets.items()}
    return score_ood_tasks(
        resolved.suites, resolved.scorers, tuple(resolved.request.scorers),
        bank, text, resolved.request.resources, lambda name: dataset_resources.get(name, {}), resolved.request.seed,
        explicit=frozenset(resolved.request.scorers), reuse_fp32=reuse_fp32,
    )


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _calibration(resolved: ResolvedRun, model: VLM, data_request: DatasetRequest,
                 proxy: ProxySpec | None = None, n: int | None = None, *, plan: BatchPlan | None = None) -> CalibrationData:
    """The proxy window for this seed, preprocessed (by ``plan``'s workers) and tokenized for the model under test."""
    proxy = proxy or resolved.proxy
    n = n or resolved.request.proxy_n
    pairs = proxy.loader(data_request, n)
    if len(pairs.images) < n:
        raise QbenchError(
            f"proxy {proxy.name!r} gave only {len(pairs.images)} pairs, {n} requested; "
            "lower --proxy-n or add data"
        )
    batch_size, workers = (plan.batch_size, plan.workers) if plan else (256, 0)
    images = preprocess_images(pairs.images, model.preprocess, batch_size, workers)
    return CalibrationData(
        source=pairs.source,
        images=images,
        tokens=model.tokenize(pairs.captions),
        captions=pairs.captions,
        fingerprint=pairs.fingerprint,
    )


VERIFY_CACHE_FORMAT = "qbench-verify-v1"
"""Part of the cache key of a stored verification report (:meth:`RunVerification.finish`): bump it when what the
verification checks or reports changes."""


class RunVerification:
    """The distinct-value verification of one ``qbench eval`` (``quantizers.md`` §1.9), recorded on passes the run
    makes anyway: a :class:`~qbench.engine.features.PassObserver` of the run's encoding.

    What is verified is what the separate pass of earlier versions verified: the first readable images (at most
    :data:`VERIFICATION_BATCH`) of the first split that has class names, and, with the text tower in scope, the
    first :data:`~qbench.engine.features.TEXT_BATCH` prompts of that split's zero-shot classifier (every class with
    every template; ``a photo of a {}.`` of ``object`` without class names). The first image pass of every split
    holds exactly those images (:data:`~qbench.engine.batching.LEADING_CHUNK` = :data:`VERIFICATION_BATCH`), and
    the first pass of the classifier's prompts those prompts, so the kernel recorder
    (:class:`~qbench.quant.verify.VerificationSession`) wraps the quantized state's first pass of each instead of
    running one of its own. A tower without any watched module (an unquantized ``fp32`` baseline) needs no pass.
    When a needed pass did not run because its features were cached, :meth:`finish` reuses the report stored by the
    run that made them, else runs the missing passes itself.
    """

    def __init__(self, resolved: ResolvedRun, model: VLM, float_extras: dict[str, str],
                 datasets: dict[str, LabeledImages]) -> None:
        from qbench.quant.verify import VerificationSession

        self.resolved = resolved
        self.model = model
        self.session = VerificationSession(model, resolved.scope.towers, float_extras=float_extras,
                                           expect_quantized=resolved.quantizer.family != "baseline",
                                           bits=resolved.bits, quantizer=resolved.quantizer)
        labelled = [dataset for dataset in datasets.values() if dataset.classnames]
        self.dataset = labelled[0] if labelled else next(iter(datasets.values()))
        classnames = self.dataset.classnames or ("object",)
        templates = self.dataset.templates or ("a photo of a {}.",)
        self.prompts = tuple(template.format(name) for name in classnames for template in templates)
        self.needed = tuple(tower for tower in ("visual", "text") if self.session.needs(tower))
        """Towers whose pass can change the report (in scope and holding a watched module)."""

    def image_pass(self, dataset: str, state: str) -> Any:
        """The recorder around the quantized state's first pass over the verified split (None for any other)."""
        if state == "quantized" and dataset == self.dataset.name and self._open("visual"):
            return self.session.recording("visual")
        return None

    def text_pass(self, state: str, prompts: Sequence[str]) -> Any:
        """The recorder around the first pass of the quantized state's prompts of the verified classifier."""
        if state == "quantized" and self._open("text") and tuple(prompts) == self.prompts:
            return self.session.recording("text")
        return None

    def _open(self, tower: str) -> bool:
        """Whether ``tower`` still needs its recorded pass."""
        return tower in self.needed and tower not in self.session.recorded

    def finish(self, cache: FeatureCache | None, image_print: str, text_print: str) -> dict[str, Any]:
        """The report (``VerificationReport.to_dict()``, as JSON reads it back): from the recorded passes; where a
        needed pass did not run, the report a run with the same quantized state stored (``cache``), else from
        separate passes for what is missing (:meth:`run_missing`). Reports made from passes are stored."""
        import json

        missing = [tower for tower in self.needed if tower not in self.session.recorded]
        key = self.cache_key(image_print, text_print) if self.needed else None
        if missing and cache is not None and key is not None:
            stored = cache.get_json(key)
            if isinstance(stored, dict) and {"passed", "n_modules", "modules", "problems"} <= stored.keys():
                return stored
        self.run_missing(missing)
        report = json.loads(json.dumps(self.session.report().to_dict()))
        if cache is not None and key is not None:
            cache.put_json(key, report)
        return report

    def run_missing(self, towers: Sequence[str]) -> None:
        """Separate recorded passes for ``towers`` on exactly what the evaluation's passes would have held."""
        import torch

        if "visual" in towers:
            pixels = []
            for index in range(len(self.dataset)):
                if len(pixels) == VERIFICATION_BATCH:
                    break
                try:
                    pixels.append(self.model.preprocess(self.dataset.image(index)))
                except UnreadableImage:
                    continue
            if not pixels:
                raise QbenchError(f"dataset {self.dataset.name!r}: no image could be read for verification; check its files")
            with self.session.recording("visual"):
                self.model.encode_image(torch.stack(pixels))
        if "text" in towers:
            with self.session.recording("text"):
                self.model.encode_text(self.model.tokenize(list(self.prompts[:TEXT_BATCH])))

    def cache_key(self, image_print: str, text_print: str) -> str:
        """Everything the report depends on: the quantized towers' states, the verified split and its
        preprocessing, the prompts, the pass layout and device, bits, scope, quantizer and its parameters."""
        import hashlib
        import json

        resolved = self.resolved
        parts = {
            "format": VERIFY_CACHE_FORMAT, "qbench_version": __version__, "image": image_print, "text": text_print,
            "dataset": self.dataset.fingerprint, "preprocess": repr(self.model.preprocess),
            "prompts": hashlib.sha256("\n".join(self.prompts[:TEXT_BATCH]).encode()).hexdigest(),
            "images": VERIFICATION_BATCH, "passes": pass_key(pass_layout(self.model)), "device": resolved.request.device,
            "bits": str(resolved.bits), "scope": resolved.scope.value, "quantizer": resolved.quantizer.name,
            "quantizer_params": resolved.quantizer.params(), "expect_quantized": self.session.expect_quantized,
            "float_extras": sorted(self.session.extras.items()),
        }
        text = json.dumps(parts, sort_keys=True, default=str)
        return "verify-" + hashlib.sha256(text.encode()).hexdigest()[:32]


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
