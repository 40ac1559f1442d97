"""Suite tasks ``spectral`` and ``dropout``: records and document sections from :mod:`qbench.analysis.spectral`.

* ``spectral`` (``scoring.md`` §3) reads the taps recorded during the run's single encoding pass
  (:func:`qbench.engine.features.encode_dataset` with ``taps``): penultimate visual features for the fixed-basis
  (§3.2) and adaptive-basis (§3.3) analyses, per-image patch-token Fourier amplitudes for the 2D Fourier
  analysis (§3.4). The same class-balanced image subset enters both states.
* ``dropout`` (``scoring.md`` §4) runs :func:`qbench.analysis.spectral.weight_dropout_probe` on the FP32 model: each
  dropped copy encodes the probe images and is scored zero-shot with its own text head.

Both return ``(records, section)``: records carry ``metric``, ``param`` (where one metric has several
records), ``fp32``, ``quantized``, ``delta``, ``diff`` and, for single-value metrics, ``value`` (the
contract in ``issue7_contract.md``); the task types (``spectral``, ``dropout``) add suite, suite version, task
and dataset, the run ``logit_tuned``. Section entries are plain JSON (lists of floats, ``None`` for non-finite numbers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol, Sequence

import numpy as np

from qbench.analysis import spectral
from qbench.engine.batching import AdaptiveBatch, FixedChunks, image_shape_of, model_numeric_batch
from qbench.errors import QbenchError
from qbench.engine.features import (PATCH_AMPLITUDE, TEXT_BATCH, PreprocessedImages, Progress, ensemble_head,
                             image_batches)
from qbench.analysis.metrics import accuracy as top1_accuracy
from qbench.engine.task_scoring import finite_or_none, metric_pair, metric_value

if TYPE_CHECKING:
    import torch

    from qbench.data import LabeledImages
    from qbench.model import VLM
    from qbench.engine.ood_eval import IdClassifier

STATES = ("fp32", "quantized")


class SpectralSettings(Protocol):
    """What :func:`spectral_task_outcome` reads of a spectral task (the built-in ``spectral`` task type's spec)."""

    analyses: tuple[str, ...]
    max_images: int
    fourier_images: int


class DropoutSettings(Protocol):
    """What :func:`dropout_task_outcome` reads of a dropout task (the built-in ``dropout`` task type's spec)."""

    rates: tuple[float, ...]
    repeats: int
    towers: tuple[str, ...]
    rescale: bool
    max_images: int


PRELOAD_BYTES = 1 << 30
"""Probe images are preprocessed once into one tensor when it fits in this many bytes, else decoded per pass."""

ImageHead = np.ndarray | Callable[[np.ndarray], np.ndarray]
"""A D x d matrix (``h @ head``) or a callable on float64 arrays: what :func:`qbench.analysis.spectral.zero_shot_logits`
accepts as ``head``."""


# --------------------------------------------------------------------------------------------------
# Image heads (models.md §6.3): penultimate feature -> joint embedding
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearHead:
    """``h @ weightᵀ + bias`` in float64: a Linear image head (timm ``head.proj``, EVA02 ``trunk.head``)."""

    weight: np.ndarray
    bias: np.ndarray | None

    def __call__(self, features: np.ndarray) -> np.ndarray:
        out = np.asarray(features, dtype=np.float64) @ self.weight.T
        return out if self.bias is None else out + self.bias


def image_head(vlm: "VLM") -> ImageHead | None:
    """The FP32-kept image head that maps ``vlm``'s penultimate tap to its (unnormalised) embedding.

    Chosen by where :func:`qbench.analysis.spectral.penultimate_tap` reads, so tap and head always fit together
    (``scoring.md`` §3.1, §3.3): open_clip ViTs (CLIP, DFN, CoCa) read before the ``visual.proj`` Parameter,
    returned as a D x d float64 matrix; timm towers read the input of ``head.proj`` (ConvNeXt) or
    ``trunk.head`` (EVA02), returned as a :class:`LinearHead` with its bias; a tap on the tower output
    (SigLIP's attention pool) and a model without an open_clip ``visual`` tower (ALIGN, whose pooled
    embedding is the feature) have no head: ``None``, the identity.
    """
    from torch import nn

    visual = getattr(vlm.model, "visual", None)
    if not isinstance(visual, nn.Module):
        return None
    point = spectral.penultimate_tap(vlm)
    if point.module in ("visual.ln_post", "visual.attn_pool_contrastive"):
        proj = getattr(visual, "proj", None)
        return None if proj is None else proj.detach().to("cpu").double().numpy().copy()
    if point.module == "visual":
        return None
    module = vlm.model.get_submodule(point.module)
    if not isinstance(module, nn.Linear):
        raise QbenchError(f"model {vlm.name!r}: the penultimate tap reads {point.module}, which is not a Linear head")
    bias = None if module.bias is None else module.bias.detach().to("cpu").double().numpy().copy()
    return LinearHead(module.weight.detach().to("cpu").double().numpy().copy(), bias)


# --------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------


def balanced_subset(labels: np.ndarray, max_images: int) -> np.ndarray:
    """Indices of the first ``ceil(max_images / K)`` images of each class in index order, truncated to
    ``max_images`` (``scoring.md`` §3.1: "the first 5 files per class"; K = classes present in ``labels``).

    Deterministic and the same for every state, so FP32 and quantized features describe the same images.
    """
    y = np.asarray(labels)
    if y.size == 0:
        return np.zeros(0, dtype=np.int64)
    quota = math.ceil(max_images / np.unique(y).size)
    order = np.argsort(y, kind="stable")
    sorted_labels = y[order]
    rank_sorted = np.arange(y.size) - np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank = np.empty(y.size, dtype=np.int64)
    rank[order] = rank_sorted
    return np.flatnonzero(rank < quota)[:max_images].astype(np.int64)


def _curve(values: Any) -> list:
    """A 1-D or 2-D array as nested lists of floats, non-finite entries as ``None``."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 0:
        return finite_or_none(array)  # type: ignore[return-value]
    return [_curve(row) if array.ndim > 1 else finite_or_none(row) for row in array]


def _ranks(interval: tuple[int, int]) -> str:
    return f"ranks={interval[0]}-{interval[1]}"


# --------------------------------------------------------------------------------------------------
# spectral task: scoring.md §3
# --------------------------------------------------------------------------------------------------


def basis_of(features: np.ndarray) -> spectral.Eigenbasis:
    """:func:`qbench.analysis.spectral.eigenbasis` with the features' own mean; with n <= D (which the spec rules out,
    §3.1) a complete basis instead of an error: the SVD's right singular vectors completed to D x D, the
    singular values padded with zeros, so every curve keeps length D (its tail ranks carry no signal)."""
    h = np.asarray(features, dtype=np.float64)
    n, d = h.shape
    if n > d:
        return spectral.eigenbasis(h)
    mean = h.mean(axis=0)
    _, sigma, vt = np.linalg.svd(h - mean, full_matrices=True)
    singular = np.zeros(d)
    singular[: sigma.size] = sigma
    return spectral.Eigenbasis(mean=mean, basis=vt.T.copy(), singular_values=singular, n=n)


def adaptive_intervals(dim: int) -> list[tuple[int, int]]:
    """The octave bands then the cumulative intervals of ``scoring.md`` §3.3, duplicates (``[1,1]``) once."""
    return list(dict.fromkeys(spectral.octave_intervals(dim) + spectral.cumulative_intervals(dim)))


def spectral_task_outcome(
    task: SpectralSettings,
    taps: dict[str, dict[str, np.ndarray]],
    labels: np.ndarray,
    classifier: "IdClassifier",
    heads: dict[str, ImageHead | None],
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Records and the ``spectral`` section entry of one spectral task (``scoring.md`` §3).

    ``taps[state]`` (state ``fp32``/``quantized``) holds ``penultimate`` (n x D) and, for ViT towers,
    ``patch_amplitude`` (n x H' x W'), rows aligned with ``labels``; ``classifier`` gives each state's text
    head and logit scale for the subspace accuracies, ``heads`` each state's image head
    (:func:`image_head`). The SVD analyses use :func:`balanced_subset` of ``task.max_images`` images, the
    Fourier analysis one of ``task.fourier_images``; the same rows for both states.
    """
    y = np.asarray(labels)
    notes: list[str] = []
    fixed = adaptive = fourier = None
    records: list[dict[str, Any]] = []
    n_images = dim = 0
    if {"fixed", "adaptive"} & set(task.analyses):
        h_fp, h_q = (_tap(taps, state, spectral.PENULTIMATE, y.size) for state in STATES)
        rows = balanced_subset(y, task.max_images)
        h_fp, h_q, y_sub = h_fp[rows], h_q[rows], y[rows]
        n_images, dim = h_fp.shape
        if n_images < task.max_images:
            notes.append(f"{n_images} images available for the SVD analyses (max_images {task.max_images})")
        if n_images <= dim:
            notes.append(f"n = {n_images} images do not exceed D = {dim} feature dimensions, which scoring.md §3.1 "
                         f"requires: ranks beyond {max(n_images - 1, 0)} carry no FP32 signal and their SQNR, "
                         "distortion and similarity are not meaningful")
        basis_fp, basis_q = basis_of(h_fp), basis_of(h_q)
        if "fixed" in task.analyses:
            fixed_records, fixed = _fixed(h_fp, h_q, basis_fp, basis_q)
            records += fixed_records
        if "adaptive" in task.analyses:
            adaptive_records, adaptive = _adaptive(h_fp, h_q, y_sub, basis_fp, basis_q, classifier, heads)
            records += adaptive_records
    if "fourier" in task.analyses:
        if all(PATCH_AMPLITUDE in taps.get(state, {}) for state in STATES):
            fourier_records, fourier = _fourier(taps, y, task.fourier_images)
            records += fourier_records
            if fourier["n_images"] < task.fourier_images:
                notes.append(f"{fourier['n_images']} images available for the Fourier analysis "
                             f"(fourier_images {task.fourier_images})")
        else:
            notes.append("no Fourier analysis: the image tower has no patch-token grid (scoring.md §3.4 is defined "
                         "on ViT patch-token maps; ConvNeXt and ALIGN towers have none)")
    section = {"n_images": int(n_images), "dim": int(dim), "fixed": fixed, "adaptive": adaptive, "fourier": fourier,
               "notes": notes}
    return records, section


def _tap(taps: dict[str, dict[str, np.ndarray]], state: str, name: str, n: int) -> np.ndarray:
    if state not in taps or name not in taps[state]:
        raise ValueError(f"spectral task: no {name!r} tap for state {state!r} (encode the dataset with taps)")
    value = np.asarray(taps[state][name], dtype=np.float64)
    if value.shape[0] != n:
        raise ValueError(f"spectral task: {name!r} tap of {state!r} has {value.shape[0]} rows for {n} labels")
    return value


def _fixed(h_fp: np.ndarray, h_q: np.ndarray, basis_fp: spectral.Eigenbasis,
           basis_q: spectral.Eigenbasis) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Fixed basis (§3.2): SQNR and distortion per octave band and over all ranks, Sim_k, k_sat."""
    spectrum = spectral.fixed_basis_spectrum(h_fp, h_q, basis_fp)
    similarity = spectral.subspace_similarity(basis_fp.basis, basis_q.basis)
    k_sat = spectral.saturation_rank(similarity)
    dim = basis_fp.dim
    octaves = spectral.octave_intervals(dim)
    records = []
    for metric, curve in (("sqnr_db", spectrum.sqnr_db), ("spectral_distortion", spectrum.distortion)):
        with np.errstate(invalid="ignore"):
            means = spectral.band_means(curve, octaves)
            overall = float(np.mean(curve))
        records += [metric_value(metric, mean, _ranks(band)) for band, mean in zip(octaves, means)]
        records.append(metric_value(metric, overall, "ranks=all"))
    for _, k in spectral.cumulative_intervals(dim):
        records.append(metric_value("subspace_similarity", similarity[k - 1], f"k={k}"))
    records.append(metric_value("k_sat", k_sat, f"theta={spectral.DEFAULT_SATURATION_THRESHOLD:g}"))
    section = {"magnitude_fp": _curve(spectrum.magnitude_fp), "magnitude_q": _curve(spectrum.magnitude_q),
               "distortion": _curve(spectrum.distortion), "sqnr_db": _curve(spectrum.sqnr_db),
               "similarity": _curve(similarity), "k_sat": k_sat}
    return records, section


def _adaptive(h_fp: np.ndarray, h_q: np.ndarray, labels: np.ndarray, basis_fp: spectral.Eigenbasis,
              basis_q: spectral.Eigenbasis, classifier: "IdClassifier",
              heads: dict[str, ImageHead | None]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Adaptive basis (§3.3): subspace accuracy of each model in its own basis, cumulative energy deviation."""
    intervals = adaptive_intervals(basis_fp.dim)
    accuracy = {}
    for state, h, basis in (("fp32", h_fp, basis_fp), ("quantized", h_q, basis_q)):
        accuracy[state] = spectral.subspace_accuracy(h, classifier.heads[state], labels, classifier.logit_scales[state],
                                                     intervals, basis=basis, head=heads.get(state))
    records = [metric_pair("subspace_accuracy", fp, q, _ranks(interval))
               for interval, fp, q in zip(intervals, accuracy["fp32"], accuracy["quantized"])]
    energy = spectral.energy_deviation(basis_fp.singular_values, basis_q.singular_values)
    records.append(metric_value("csed", energy.csed))
    records.append(metric_value("max_energy_deviation", energy.max_abs))
    section = {"intervals": [list(interval) for interval in intervals],
               "accuracy_fp": _curve(accuracy["fp32"]), "accuracy_q": _curve(accuracy["quantized"]),
               "energy_fp": _curve(spectral.cumulative_energy(basis_fp.singular_values)),
               "energy_q": _curve(spectral.cumulative_energy(basis_q.singular_values)),
               "energy_deviation": _curve(energy.curve), "csed": finite_or_none(energy.csed),
               "max_abs_deviation": finite_or_none(energy.max_abs)}
    return records, section


def _fourier(taps: dict[str, dict[str, np.ndarray]], labels: np.ndarray,
             max_images: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """2D Fourier (§3.4): image-averaged amplitude per state, RSE map, radial profiles and bands, DC terms."""
    rows = balanced_subset(labels, max_images)
    amplitude = {state: _tap(taps, state, PATCH_AMPLITUDE, labels.size)[rows].mean(axis=0) for state in STATES}
    rse = spectral.relative_spectral_error(amplitude["fp32"], amplitude["quantized"])
    bands = spectral.radial_bands(rse)
    dc = {state: spectral.dc_term(amplitude[state]) for state in STATES}
    records = [metric_value("rse", getattr(bands, band), f"band={band}") for band in ("low", "mid", "high")]
    records.append(metric_value("rse", float(rse.mean()), "band=all"))
    records.append(metric_pair("dc_amplitude", dc["fp32"], dc["quantized"]))
    section = {"grid": [int(size) for size in rse.shape], "n_images": int(rows.size),
               "amplitude_fp": _curve(amplitude["fp32"]), "amplitude_q": _curve(amplitude["quantized"]),
               "rse": _curve(rse), "radial_rse": _curve(spectral.radial_profile(rse)),
               "radial_amplitude_fp": _curve(spectral.radial_profile(amplitude["fp32"])),
               "radial_amplitude_q": _curve(spectral.radial_profile(amplitude["quantized"])),
               "bands": {band: finite_or_none(getattr(bands, band)) for band in ("low", "mid", "high")},
               "dc_fp": finite_or_none(dc["fp32"]), "dc_q": finite_or_none(dc["quantized"])}
    return records, section


# --------------------------------------------------------------------------------------------------
# dropout task: scoring.md §4
# --------------------------------------------------------------------------------------------------


class _SubsetImage:
    """``image(i)`` of a dataset restricted to ``rows`` (a class, not a lambda: loader workers may pickle it)."""

    def __init__(self, dataset: "LabeledImages", rows: np.ndarray) -> None:
        self.dataset = dataset
        self.rows = rows

    def __call__(self, index: int):
        return self.dataset.image(int(self.rows[index]))


class ProbeImages:
    """The dropout probe set: a class-balanced subset, preprocessed once when it fits in
    :data:`PRELOAD_BYTES`, else decoded again on every pass. Unreadable images are dropped (with their labels)."""

    def __init__(self, dataset: "LabeledImages", rows: np.ndarray, preprocess: Callable, batch_size: int,
                 workers: int, preload_bytes: int | None = None) -> None:
        self.images = PreprocessedImages(_SubsetImage(dataset, rows), len(rows), preprocess)
        self.labels_all = np.asarray(dataset.labels)[rows]
        self.batch_size = batch_size
        self.workers = workers
        self._pixels: list["torch.Tensor"] | None = None
        self.labels: np.ndarray | None = None
        limit = PRELOAD_BYTES if preload_bytes is None else preload_bytes
        if math.prod(image_shape_of(preprocess)) * 4 * len(rows) <= limit:
            pixels, kept = [], []
            for batch, indices in self._decode():
                pixels.append(batch)
                kept.extend(indices)
            self._pixels = pixels
            self.labels = self.labels_all[np.asarray(kept, dtype=np.int64)]

    @property
    def preloaded(self) -> bool:
        return self._pixels is not None

    def _decode(self) -> Iterator[tuple["torch.Tensor", list[int]]]:
        for batch in image_batches(self.images, self.batch_size, self.workers):
            if batch.failure:
                raise QbenchError(batch.failure)
            if batch.indices:
                yield batch.pixels, batch.indices

    def batches(self) -> Iterator["torch.Tensor"]:
        """Pixel batches in order; after a full pass :attr:`labels` holds the labels of the images read."""
        if self._pixels is not None:
            yield from self._pixels
            return
        kept: list[int] = []
        for pixels, indices in self._decode():
            kept.extend(indices)
            yield pixels
        self.labels = self.labels_all[np.asarray(kept, dtype=np.int64)]


def text_head(model: "VLM", classnames: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    """``K x d`` ensemble zero-shot classifier of ``model``'s own text tower (``suites.md`` §6), prompts
    encoded in chunks of :data:`qbench.engine.features.TEXT_BATCH` and combined by :func:`ensemble_head`."""
    import torch

    prompts = [template.format(name) for name in classnames for template in templates]
    if not prompts:
        raise QbenchError("dropout task: the dataset has no class names or templates to build a zero-shot head")
    with torch.no_grad():
        chunks = [model.encode_text(model.tokenize(prompts[start:start + TEXT_BATCH])).float().cpu()
                  for start in range(0, len(prompts), TEXT_BATCH)]
    return ensemble_head(torch.cat(chunks).double().numpy(), len(classnames), len(templates))


def zero_shot_evaluator(probe: ProbeImages, classnames: Sequence[str], templates: Sequence[str],
                        text_changes: bool, fixed_head: np.ndarray, encoder: AdaptiveBatch,
                        progress: Progress, total: int) -> Callable[["VLM"], float]:
    """``model -> top-1 accuracy`` on the probe set, with ``model``'s own text head when dropout reaches the
    text tower (``text_changes``), else with ``fixed_head`` (the untouched text tower's, computed once)."""
    import torch

    calls = [0]

    def evaluate(model: "VLM") -> float:
        calls[0] += 1
        progress.log(f"dropout probe: evaluation {calls[0]}/{total} on {probe.images.count} images")
        head = text_head(model, classnames, templates) if text_changes else fixed_head
        chunks = FixedChunks(lambda pixels: model.encode_image(pixels).float().cpu(), encoder, model_numeric_batch(model))
        with torch.no_grad():  # fixed-shape passes (qbench.engine.batching.numeric_batch): the same for any batch size
            for pixels in probe.batches():
                chunks.feed(pixels)
            embeddings = chunks.finish()
        logits = model.logit_scale * embeddings.double().numpy() @ head.T
        return top1_accuracy(logits, probe.labels)

    return evaluate


def rate_params(rates: Sequence[float]) -> list[str]:
    """``p=0.10`` per rate; more digits when two rates would print alike (record identity must be unique)."""
    params = [f"p={rate:.2f}" for rate in rates]
    if len(set(params)) < len(params):
        params = [f"p={rate:.6g}" for rate in rates]
    return params


def dropout_task_outcome(
    task: DropoutSettings,
    fp32: "VLM",
    dataset: "LabeledImages",
    *,
    batch_size: int,
    workers: int,
    seed: int,
    progress: Progress,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Records and the ``dropout`` section entry of the weight-dropout probe of the FP32 model (``scoring.md`` §4).

    The probe set is :func:`balanced_subset` of ``task.max_images`` images of ``dataset``; each evaluation
    encodes it with the dropped copy and scores zero-shot top-1 with that copy's own text head (recomputed
    when ``"text"`` is in ``task.towers``). ``fp32`` itself is never modified (the probe works on a copy).
    Records per rate: ``dropout_accuracy`` = A_drop(p) and ``dropout_delta`` = δ_drop(p), both single values.
    """
    if len(set(task.rates)) < len(task.rates):
        raise QbenchError(f"dropout task on {dataset.name!r}: rates {list(task.rates)} repeat a value")
    rows = balanced_subset(dataset.labels, task.max_images)
    if rows.size == 0:
        raise QbenchError(f"dropout task: dataset {dataset.name!r} is empty")
    probe = ProbeImages(dataset, rows, fp32.preprocess, batch_size, workers)
    classnames, templates = tuple(dataset.classnames), tuple(dataset.templates)
    text_changes = "text" in task.towers
    fixed_head = None if text_changes else text_head(fp32, classnames, templates)
    encoder = AdaptiveBatch(batch_size, progress, "image")
    total = 1 + len(task.rates) * task.repeats
    evaluate = zero_shot_evaluator(probe, classnames, templates, text_changes, fixed_head, encoder, progress, total)
    result = spectral.weight_dropout_probe(evaluate, fp32, task.rates, seed=seed, repeats=task.repeats,
                                           towers=task.towers, rescale=task.rescale)
    records = []
    for param, mean, drop in zip(rate_params(result.rates), result.mean_accuracy, result.relative_drop):
        records.append(metric_value("dropout_accuracy", mean, param))
        records.append(metric_value("dropout_delta", drop, param))
    section = {"n_images": int(probe.labels.size), "towers": list(task.towers), "rescale": bool(task.rescale),
               "rates": list(result.rates), "repeats": int(task.repeats), "seed": int(seed),
               "reference_accuracy": result.reference_accuracy,
               "accuracies": [list(row) for row in result.accuracies], "mean_accuracy": list(result.mean_accuracy),
               "relative_drop": list(result.relative_drop), "kept_fractions": [list(row) for row in result.kept_fractions],
               "preloaded": probe.preloaded}
    return records, section
