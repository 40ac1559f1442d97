"""``qbench deploy-check``: the quantized model on real integer kernels, side by side with its simulation.

Every number qbench reports elsewhere comes from fake quantization. A deploy check takes a checkpoint of
``qbench quantize --out``, plans its export (:func:`~qbench.engine.deploy.plan.plan_export`: qbench's own integers,
scales and zero points, or one "not exportable" line), builds it on an engine
(:func:`~qbench.engine.deploy.engines.build`) and evaluates a suite with three image encoders, through the
pipeline ``qbench eval`` uses:

* ``fp32`` (the float model), ``simulated`` (the checkpoint's fake-quantized model) and ``real`` (the engine);
* every image is decoded and preprocessed once and goes through each encoder once
  (:func:`~qbench.engine.features.encode_datasets` with the three states in one pass; the feature cache keys the
  real state by its own fingerprint, :func:`real_fingerprint`, so it never mixes with the simulated state's);
* the suite's tasks are scored twice from those features (:func:`~qbench.engine.evaluate.score_tasks`), once with
  the simulated state and once with the real one as the quantized column; the FP32 detections of the first
  scoring are reused by the second. The distinct-value verification rides on the simulated state's first pass.

The record (:func:`run_deploy_check`, stored as the ``deploy_check`` kind by
:meth:`~qbench.engine.store.ResultStore.put_deploy_check`) holds: per-image top-1 agreement (real vs simulated,
each vs FP32), embedding cosine and relative L2 against FP32 for both and their ratio, every metric of the suite
from both and the difference, a per-layer check on identical inputs (relative L2 of the engine's layer against the
simulated module, :data:`LAYER_TOLERANCE`), timings of one interleaved run (FP32 eager, FP32 on the engine,
simulated, real int8) as ratios of medians, the engine, its version, the integer ops that ran and every departure
from qbench's arithmetic (``DeployedModel.describe()``), the plan summary and the thread count.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from qbench import __version__
from qbench.engine.confighash import config_hash
from qbench.engine.store import DEPLOY_CHECK_KIND
from qbench.errors import QbenchError

if TYPE_CHECKING:
    import torch

    from qbench.engine.deploy.engines import DeployedModel
    from qbench.engine.deploy.plan import ExportPlan
    from qbench.engine.evaluate import Encoding, EvalRequest, Progress, ResolvedRun
    from qbench.registry import Registry

KIND = DEPLOY_CHECK_KIND
"""The record kind (``record["kind"]``), stored beside the evaluation documents (:mod:`qbench.engine.store`)."""
RECORD_VERSION = 1
REAL_STATE = "real"
"""The engine's state in the encoding pass (``fp32`` and ``quantized`` = simulated are the pipeline's own)."""
REAL_FINGERPRINT_FORMAT = "qbench-deploy-real-v1"
"""Part of the real state's fingerprint (:func:`real_fingerprint`): bump it when the engines compute differently."""
LAYER_TOLERANCE = 1e-6
"""Relative L2 a layer of the engine may differ from the simulated module on identical inputs (issue 17)."""
LAYER_CHECK_IMAGES = 8
"""Images of the first batch whose layer inputs the per-layer check captures (inputs of every layer are kept)."""
TIMING_BATCH = 32
"""Images per timed encoder call (the batch of ``benchmarks/perf/int8.py``), fewer when the split is smaller."""
DEFAULT_REPEATS = 5
EMBEDDING_RATIO_TOLERANCE = 0.2
"""Real and simulated relative L2 against FP32 should agree within this fraction (issue 17: "within ~20 %")."""
TIMED = ("fp32_eager", "fp32_engine", "simulated", "real_int8")
"""The encoders of the timing run, in the order each repeat calls them."""
VALUE_KEYS = frozenset({"fp32", "quantized", "delta", "diff", "bootstrap", "value", "delta_common", "delta_counter"})
"""Result-record fields that hold numbers (everything else identifies the record)."""


@dataclass(frozen=True)
class DeployCheckRequest:
    """Everything ``qbench deploy-check`` takes: a checkpoint folder, suites, the engine and how to time it."""

    checkpoint: str
    suites: tuple[str, ...]
    engine: str = "torchao"
    device: str = "cpu"
    limit: int | None = None
    compile: bool = True
    repeats: int = DEFAULT_REPEATS
    data_root: str | None = None
    batch_size: int | None = None
    workers: int | None = None
    threads: Any = None  # qbench.engine.threads.ThreadSetting chosen by the caller (provenance)
    cache_dir: str | None = None
    feature_cache: bool = True
    weights: str | None = None  # the float model's local weights, as given to 'qbench quantize'
    hf_cache: str | None = None
    allow_download: bool = False
    random_init: bool = False  # a checkpoint of a random-init model (smoke runs, benchmarks)


def check_request(request: DeployCheckRequest) -> None:
    """The one-line errors a deploy check can give before any model work: device, engine and its extra, repeats,
    suites, checkpoint folder."""
    from qbench.engine.deploy import engines

    engines.check_device(request.device)
    engines.engine_module(request.engine)
    if not isinstance(request.repeats, int) or request.repeats < 1:
        raise QbenchError(f"bad --repeats {request.repeats!r}: it must be a positive whole number of timed repetitions")
    if not request.suites:
        raise QbenchError("no suite given: pass --suite NAME (see 'qbench list suites')")
    if not Path(request.checkpoint).expanduser().is_dir():
        raise QbenchError(f"--checkpoint {request.checkpoint} is not a folder; pass a folder written by "
                          "'qbench quantize --out DIR'")


def eval_request(request: DeployCheckRequest) -> "EvalRequest":
    """The :class:`~qbench.engine.evaluate.EvalRequest` of the simulated evaluation (the checkpoint's settings)."""
    from qbench.engine.evaluate import EvalRequest

    return EvalRequest(checkpoint=request.checkpoint, suites=tuple(request.suites), device=request.device,
                       limit=request.limit, data_root=request.data_root, batch_size=request.batch_size,
                       workers=request.workers, threads=request.threads, cache_dir=request.cache_dir,
                       feature_cache=request.feature_cache, weights=request.weights, hf_cache=request.hf_cache,
                       allow_download=request.allow_download, random_init=request.random_init)


def check_config(resolved: "ResolvedRun", request: DeployCheckRequest) -> dict[str, Any]:
    """The hashed identity of a deploy check: the evaluation's configuration (model, checkpoint, suites, limit,
    device) plus the engine settings; its ``config_hash`` names the stored record."""
    keep = ("model", "weights_tag", "quantizer", "quantizer_params", "bits", "scope", "seed", "limit", "suites",
            "device", "qbench_version", "random_init", "checkpoint", "plugins")
    config = {"kind": KIND, **{key: resolved.config[key] for key in keep if key in resolved.config},
              "engine": request.engine, "compile": bool(request.compile), "repeats": int(request.repeats)}
    config["config_hash"] = config_hash(config)
    return config


def run_deploy_check(request: DeployCheckRequest, registry: "Registry", progress: "Progress | None" = None) -> dict[str, Any]:
    """Run a deploy check and return its record (not stored; see :meth:`ResultStore.put_deploy_check`).

    An unexportable checkpoint is the one-line ``not exportable: <reason>`` before anything is encoded.
    """
    import torch

    from qbench.engine.deploy import engines
    from qbench.engine.deploy.plan import plan_export
    from qbench.engine.evaluate import (Progress, _load, _seed_everything, batch_plan, obtain_quantized, provenance,
                                        resolve, thread_provenance)
    from qbench.engine.features import EncodeCounter

    progress = progress or Progress()
    check_request(request)
    evaluation = eval_request(request)
    resolved = resolve(evaluation, registry)
    config = check_config(resolved, request)
    started = time.perf_counter()
    _seed_everything(resolved.request.seed)  # the checkpoint's seed
    quiet = Progress()  # nothing is printed before the plan says the checkpoint is exportable
    fp32, datasets, feature_root = _load(resolved, quiet)
    restored = obtain_quantized(resolved, fp32, lambda: None, quiet)
    simulated = restored.model.to(request.device).eval()
    simulated.clear_caches()
    plan = plan_export(simulated)
    if not plan.exportable:
        raise QbenchError(plan.not_exportable_line())
    progress.log(f"restored {resolved.quantizer.name} ({resolved.bits}, {resolved.scope.value} scope) from "
                 f"{resolved.checkpoint.path}: {len(plan.layers)} integer layers"  # type: ignore[union-attr]
                 + (f", {len(plan.float_ops)} float maps" if plan.float_ops else "")
                 + (f", {len(plan.simulated)} simulated convolutions" if plan.simulated else ""))
    batching = batch_plan(evaluation, fp32, progress)
    timings: dict[str, float] = {"load_s": time.perf_counter() - started}

    mark = time.perf_counter()
    deployed = engines.build(request.engine, simulated, plan, device=request.device, compile=request.compile)
    if "text" in resolved.scope.towers:  # the engines run the image tower; say what that leaves simulated
        deployed.notes.append("the checkpoint quantizes the text tower too (joint scope): it stays simulated "
                              "(fake quantization in float) in the real model; only the image tower runs on the engine")
    pixels = first_pixels(datasets, fp32.preprocess, TIMING_BATCH).to(request.device)
    with torch.no_grad():  # warm-up: compilation, and the engine's one-time record of its integer ops
        deployed.vlm.encode_image(pixels)
    timings["build_s"] = time.perf_counter() - mark
    progress.log(f"built the {deployed.engine} {deployed.version} model on {deployed.device}: "
                 f"{len(deployed.int8_layers)} int8 layers ({', '.join(sorted(set(deployed.int8_ops))) or 'no int8 op recorded'})")

    counter = EncodeCounter()
    mark = time.perf_counter()
    states = {"fp32": fp32, "quantized": simulated, REAL_STATE: deployed.vlm}
    with counter.watching(states):
        encodings, verifier, prints = encode_three(resolved, states, deployed, datasets, batching, feature_root,
                                                   progress, counter, restored.float_extras, request)
        timings["encode_s"] = time.perf_counter() - mark
        mark = time.perf_counter()
        scored_sim, ood_sim, sections_sim, _ = score(resolved, encodings["simulated"], datasets, batching, progress)
        scored_real, _, sections_real, _ = score(resolved, encodings["real"], datasets, batching, progress,
                                                 reuse_fp32=ood_sim)
        timings["score_s"] = time.perf_counter() - mark
        verification = verifier.finish(encodings["simulated"].cache, prints["image"]["quantized"],
                                       prints["text"]["quantized"])
    agreement, embeddings = compare_features(encodings, datasets)
    mark = time.perf_counter()
    layers = layer_check(simulated, plan, deployed, pixels[:LAYER_CHECK_IMAGES])
    timings["layer_check_s"] = time.perf_counter() - mark
    mark = time.perf_counter()
    fp32_engine = engines.build(request.engine, fp32, None, device=request.device, compile=request.compile)
    speed = time_encoders({"fp32_eager": fp32.encode_image, "fp32_engine": fp32_engine.vlm.encode_image,
                           "simulated": simulated.encode_image, "real_int8": deployed.vlm.encode_image},
                          pixels, request.repeats, request.device)
    timings["timing_s"] = time.perf_counter() - mark
    timings["total_s"] = time.perf_counter() - started
    engine = {**deployed.describe(), "compile": bool(request.compile)}
    record = {
        "kind": KIND,
        "version": RECORD_VERSION,
        "config": config,
        "provenance": {**provenance(request.device), "threads": thread_provenance(evaluation),
                       "batching": batching.to_dict()},
        "checkpoint": {"path": str(resolved.checkpoint.path), **resolved.config.get("checkpoint", {})},  # type: ignore[union-attr]
        "engine": engine,
        "fp32_engine": fp32_engine.describe(),
        "plan": plan.to_dict(),
        "verification": verification,
        "datasets": {name: {"num_images": len(dataset), "num_scored": int(len(encodings["simulated"].encoded[name].kept)),
                            "fingerprint": dataset.fingerprint} for name, dataset in datasets.items()},
        "agreement": agreement,
        "embeddings": embeddings,
        "metrics": side_by_side(scored_sim.results, scored_real.results),
        "sections": {"simulated": sorted(name for name, entries in sections_sim.items() if entries),
                     "real": sorted(name for name, entries in sections_real.items() if entries)},
        "skipped": ood_sim.skipped,
        "layers": layers,
        "speed": speed,
        "encoder_calls": {"images": dict(counter.images), "texts": dict(counter.texts),
                          "cache_hits": dict(counter.cache_hits), "state_fingerprints": prints},
        "timing": {key: round(value, 3) for key, value in timings.items()},
    }
    record["summary"] = summary(record)
    return record


# -- encoding --------------------------------------------------------------------------------------
def real_fingerprint(simulated_print: str, deployed: "DeployedModel", compile: bool) -> str:
    """The real state's image-tower fingerprint: the simulated tower it was built from, the engine, its version
    and device, compilation, the integer layers and the engine's notes. Never equal to the simulated state's
    fingerprint, so the feature cache keeps the two apart; equal for the same checkpoint on the same engine."""
    import torch

    parts = {"format": REAL_FINGERPRINT_FORMAT, "qbench_version": __version__, "torch": torch.__version__,
             "simulated": simulated_print, "engine": deployed.engine, "version": deployed.version,
             "device": deployed.device, "compile": bool(compile), "int8_layers": list(deployed.int8_layers),
             "notes": list(deployed.notes)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def encode_three(resolved: "ResolvedRun", states: dict[str, Any], deployed: "DeployedModel", datasets: dict[str, Any],
                 batching: Any, feature_root: Path | None, progress: "Progress", counter: Any,
                 float_extras: dict[str, str], request: DeployCheckRequest) -> tuple[dict[str, "Encoding"], Any, dict]:
    """Encode every dataset once with the FP32, simulated and real image towers (one decode, one pass per state),
    the prompts once per text-tower state, and return the two scoring views: ``simulated`` ({fp32, quantized =
    simulated}) and ``real`` ({fp32, quantized = real}); the verifier; the fingerprints.

    The real model's text tower, logit scale and preprocessing must be the simulated model's (the engine contract):
    it shares the simulated state's prompt embeddings, checked by fingerprint."""
    from qbench.engine.batching import AdaptiveBatch
    from qbench.engine.evaluate import Encoding, RunVerification, feature_taps
    from qbench.engine.features import EncodedSplit, FeatureCache, TextEncoder, encode_datasets, state_fingerprints, tap_plan

    fp32, simulated, real = states["fp32"], states["quantized"], states[REAL_STATE]
    pair = {"fp32": fp32, "quantized": simulated}
    image_prints = state_fingerprints(pair, "visual")
    image_prints[REAL_STATE] = real_fingerprint(image_prints["quantized"], deployed, request.compile)
    text_prints = state_fingerprints({**pair, REAL_STATE: real}, "text")
    if text_prints[REAL_STATE] != text_prints["quantized"] or real.logit_scale != simulated.logit_scale:
        raise QbenchError(f"the {deployed.engine} engine changed the text tower or the logit scale of the model it "
                          "deployed (only the image tower may change); report this with the checkpoint")
    taps = feature_taps(resolved.suites)
    for names in taps.values():
        try:
            tap_plan(real, names)
        except QbenchError as error:
            raise QbenchError(f"the suites' feature taps cannot be recorded on the {deployed.engine} engine ({error}); "
                              "deploy-check a suite without spectral tasks") from None
    verifier = RunVerification(resolved, simulated, float_extras, datasets)
    cache = FeatureCache(feature_root, log=progress.log)
    image_batch = AdaptiveBatch(batching.batch_size, progress, "image")
    encoded = encode_datasets(datasets, states, image_prints, batching.batch_size, cache, progress, counter,
                              workers=batching.workers, encoder=image_batch, taps=taps, observer=verifier)
    text = TextEncoder(pair, {state: text_prints[state] for state in pair}, cache, progress, counter, observer=verifier)
    labels = {name: datasets[name].labels[split.kept] for name, split in encoded.items()}
    views = {}
    for view, quantized in (("simulated", "quantized"), ("real", REAL_STATE)):
        chosen = {"fp32": "fp32", "quantized": quantized}
        splits = {name: EncodedSplit(split.kept, {state: split.by_state[source] for state, source in chosen.items()},
                                     split.unreadable, {state: split.taps[source] for state, source in chosen.items()
                                                        if source in split.taps})
                  for name, split in encoded.items()}
        features = {name: {state: split.by_state[state].double().numpy() for state in chosen} for name, split in splits.items()}
        views[view] = Encoding({state: states[source] for state, source in chosen.items()}, cache,
                               {state: image_prints[source] for state, source in chosen.items()},
                               {state: text_prints[source] for state, source in chosen.items()},
                               image_batch, splits, text, features, labels)
    return views, verifier, {"image": image_prints, "text": text_prints}


def score(resolved: "ResolvedRun", encoding: "Encoding", datasets: dict[str, Any], batching: Any, progress: "Progress",
          reuse_fp32: Any = None) -> tuple[Any, Any, dict[str, list], Any]:
    """Every task of the suites from ``encoding``'s features (:func:`qbench.engine.evaluate.score_tasks`)."""
    from qbench.engine.evaluate import score_tasks

    return score_tasks(resolved, encoding, datasets, batching, progress, None, {}, reuse_fp32=reuse_fp32)


def first_pixels(datasets: dict[str, Any], preprocess: Callable, count: int) -> "torch.Tensor":
    """The first ``count`` readable images of the first dataset, preprocessed (fewer when the split is smaller):
    the batch the timings and the per-layer check run on."""
    import torch

    from qbench.data import UnreadableImage

    dataset = next(iter(datasets.values()))
    pixels = []
    for index in range(len(dataset)):
        if len(pixels) == count:
            break
        try:
            pixels.append(preprocess(dataset.image(index)))
        except UnreadableImage:
            continue
    if not pixels:
        raise QbenchError(f"dataset {dataset.name!r}: no image could be read; check its files")
    return torch.stack(pixels)


# -- comparisons -----------------------------------------------------------------------------------
def _embedding_stats(ours: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Mean per-image cosine and relative L2 ``‖a − b‖/‖b‖`` of ``ours`` against ``reference`` (and the worst)."""
    norm_ours = np.linalg.norm(ours, axis=1)
    norm_ref = np.linalg.norm(reference, axis=1)
    cosine = np.sum(ours * reference, axis=1) / np.maximum(norm_ours * norm_ref, 1e-300)
    rel = np.linalg.norm(ours - reference, axis=1) / np.maximum(norm_ref, 1e-300)
    return {"cosine": float(cosine.mean()), "min_cosine": float(cosine.min()), "rel_l2": float(rel.mean()),
            "max_rel_l2": float(rel.max()), "n": int(len(rel))}


def _ratio(numerator: float, denominator: float) -> float | None:
    """``numerator / denominator``, None for a zero denominator (a ratio JSON can hold)."""
    return None if denominator == 0 else numerator / denominator


def compare_features(encodings: dict[str, "Encoding"], datasets: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per-image top-1 agreement (datasets with class names; each state's zero-shot head, the real state sharing the
    simulated text tower) and embedding cosine / relative L2, per dataset and over all images, from the features
    the metrics were computed from (no encoder runs here)."""
    from qbench.engine.features import zero_shot_head

    simulated, real = encodings["simulated"], encodings["real"]
    pairs = {"real_vs_simulated": ("real", "simulated"), "simulated_vs_fp32": ("simulated", "fp32"),
             "real_vs_fp32": ("real", "fp32")}
    predictions: dict[str, dict[str, np.ndarray]] = {}
    embeddings: dict[str, Any] = {"datasets": {}}
    pooled: dict[str, list[np.ndarray]] = {"fp32": [], "simulated": [], "real": []}
    for name, dataset in datasets.items():
        feats = {"fp32": simulated.features[name]["fp32"], "simulated": simulated.features[name]["quantized"],
                 "real": real.features[name]["quantized"]}
        for state, value in feats.items():
            pooled[state].append(value)
        embeddings["datasets"][name] = {pair: _embedding_stats(feats[a], feats[b]) for pair, (a, b) in pairs.items()}
        if dataset.classnames:
            heads = {state: zero_shot_head(simulated.text, text_state, dataset.classnames, dataset.templates)
                     for state, text_state in (("fp32", "fp32"), ("simulated", "quantized"), ("real", "quantized"))}
            predictions[name] = {state: np.argmax(feats[state] @ heads[state].T, axis=1) for state in feats}
    whole = {state: np.concatenate(values) for state, values in pooled.items()}
    embeddings["all"] = {pair: _embedding_stats(whole[a], whole[b]) for pair, (a, b) in pairs.items()}
    overall = embeddings["all"]
    embeddings["rel_l2_ratio"] = _ratio(overall["real_vs_fp32"]["rel_l2"], overall["simulated_vs_fp32"]["rel_l2"])
    embeddings["cosine_gap_ratio"] = _ratio(1 - overall["real_vs_fp32"]["cosine"], 1 - overall["simulated_vs_fp32"]["cosine"])
    ratio = embeddings["rel_l2_ratio"]
    embeddings["within_tolerance"] = ratio is not None and abs(ratio - 1) <= EMBEDDING_RATIO_TOLERANCE
    embeddings["tolerance"] = EMBEDDING_RATIO_TOLERANCE
    agreement: dict[str, Any] = {"datasets": {}}
    for name, by_state in predictions.items():
        agreement["datasets"][name] = {pair: float(np.mean(by_state[a] == by_state[b])) for pair, (a, b) in pairs.items()}
        agreement["datasets"][name]["n"] = int(len(by_state["fp32"]))
    if predictions:
        joined = {state: np.concatenate([by_state[state] for by_state in predictions.values()]) for state in pooled}
        agreement["all"] = {pair: float(np.mean(joined[a] == joined[b])) for pair, (a, b) in pairs.items()}
        agreement["all"]["n"] = int(len(joined["fp32"]))
        agreement["all"]["disagreements"] = int(np.sum(joined["real"] != joined["simulated"]))
    else:
        agreement["all"] = None
    return agreement, embeddings


def _identity(record: dict[str, Any]) -> dict[str, Any]:
    """The fields that say which result a record is (suite, task, dataset, metric, scorer, param, ...)."""
    return {key: value for key, value in record.items() if key not in VALUE_KEYS and not isinstance(value, (dict, list))}


def side_by_side(simulated: Sequence[dict[str, Any]], real: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per result record: the FP32 value, the simulated and real values and ``real − simulated`` (paired
    records: the quantized column; single-value records: the value), and δ of both where the record has one.
    The two scorings run the same tasks in the same order; a mismatch is an internal error, never a silent zip."""
    if len(simulated) != len(real):
        raise RuntimeError(f"the simulated and real scorings gave {len(simulated)} and {len(real)} records")
    rows = []
    for ours, theirs in zip(simulated, real):
        identity = _identity(ours)
        if identity != _identity(theirs):
            raise RuntimeError(f"the simulated and real scorings disagree on record {identity} vs {_identity(theirs)}")
        paired = ours.get("fp32") is not None or ours.get("quantized") is not None
        key = "quantized" if paired else "value"
        sim_value, real_value = ours.get(key), theirs.get(key)
        row = {**identity, "fp32": ours.get("fp32") if paired else None, "simulated": sim_value, "real": real_value,
               "difference": None if sim_value is None or real_value is None else real_value - sim_value}
        if ours.get("delta") is not None or theirs.get("delta") is not None:
            row["delta_simulated"], row["delta_real"] = ours.get("delta"), theirs.get("delta")
        rows.append(row)
    return rows


def layer_check(simulated: Any, plan: "ExportPlan", deployed: "DeployedModel", pixels: "torch.Tensor") -> dict[str, Any]:
    """Each integer layer of the engine against the simulated module on the same input (the input the simulated
    layer received on one pass over ``pixels``, after its pre-hooks): relative L2, and pass at
    :data:`LAYER_TOLERANCE`."""
    import torch

    from qbench.engine.deploy.plan import capture_layer_inputs

    result: dict[str, Any] = {"tolerance": LAYER_TOLERANCE, "images": int(pixels.shape[0])}
    if deployed.run_layer is None:
        return {**result, "available": False, "passed": None, "layers": []}
    captured = capture_layer_inputs(simulated, plan, pixels)
    rows = []
    for layer in plan.layers:
        x = captured.inputs[layer.name]
        with torch.no_grad():
            expected = simulated.model.get_submodule(layer.name).forward(x).detach().double().cpu()
            got = deployed.run_layer(layer.name, x).detach().double().cpu()
        if got.shape != expected.shape:
            raise RuntimeError(f"the {deployed.engine} layer {layer.name} gave shape {tuple(got.shape)}, "
                               f"the simulated one {tuple(expected.shape)}")
        denominator = float(expected.norm())
        rel = float((got - expected).norm()) / denominator if denominator > 0 else float((got - expected).norm())
        rows.append({"name": layer.name, "kind": layer.kind, "rel_l2": rel, "passed": rel <= LAYER_TOLERANCE})
    worst = max(rows, key=lambda row: row["rel_l2"]) if rows else None
    return {**result, "available": True, "passed": all(row["passed"] for row in rows), "n_layers": len(rows),
            "n_failed": sum(not row["passed"] for row in rows), "max_rel_l2": worst["rel_l2"] if worst else None,
            "worst_layer": worst["name"] if worst else None, "layers": rows}


def time_encoders(encoders: dict[str, Callable[["torch.Tensor"], Any]], pixels: "torch.Tensor", repeats: int,
                  device: str) -> dict[str, Any]:
    """One interleaved timing run: after one untimed call of each encoder (compilation, caches), ``repeats`` rounds
    calling each encoder once in :data:`TIMED` order; medians (ms) and the ratios that matter (speed-ups are
    ``median(reference) / median(model)``, > 1 = faster)."""
    import torch

    def synchronize() -> None:
        """Wait for queued CUDA kernels, so a timed call ends when its work does."""
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)

    samples: dict[str, list[float]] = {name: [] for name in encoders}
    with torch.no_grad():
        for encode in encoders.values():
            encode(pixels)
        synchronize()
        for _ in range(repeats):
            for name, encode in encoders.items():
                began = time.perf_counter()
                encode(pixels)
                synchronize()
                samples[name].append(1000 * (time.perf_counter() - began))
    medians = {name: statistics.median(values) for name, values in samples.items()}

    def speedup(reference: str, model: str) -> float | None:
        """How many times faster ``model`` ran than ``reference`` (ratio of medians)."""
        return _ratio(medians[reference], medians[model])

    return {
        "batch": int(pixels.shape[0]), "repeats": repeats, "order": list(encoders), "threads": torch.get_num_threads(),
        "median_ms": medians, "samples_ms": samples,
        "ratios": {"real_int8_vs_fp32_eager": speedup("fp32_eager", "real_int8"),
                   "real_int8_vs_fp32_engine": speedup("fp32_engine", "real_int8"),
                   "fp32_engine_vs_fp32_eager": speedup("fp32_eager", "fp32_engine"),
                   "simulated_vs_fp32_eager": speedup("fp32_eager", "simulated"),
                   "real_int8_vs_simulated": speedup("simulated", "real_int8")},
    }


def summary(record: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of a record: agreement, embedding ratio, layer check, largest metric difference, speed."""
    overall = record["agreement"].get("all") or {}
    differences = [abs(row["difference"]) for row in record["metrics"] if isinstance(row.get("difference"), (int, float))]
    return {
        "agreement_real_vs_simulated": overall.get("real_vs_simulated"),
        "rel_l2_ratio": record["embeddings"]["rel_l2_ratio"],
        "embeddings_within_tolerance": record["embeddings"]["within_tolerance"],
        "layer_check_passed": record["layers"].get("passed"),
        "max_layer_rel_l2": record["layers"].get("max_rel_l2"),
        "max_metric_difference": max(differences) if differences else None,
        "speedup_vs_fp32_eager": record["speed"]["ratios"]["real_int8_vs_fp32_eager"],
        "speedup_vs_fp32_engine": record["speed"]["ratios"]["real_int8_vs_fp32_engine"],
        "verified": bool(record["verification"].get("passed")),
    }
