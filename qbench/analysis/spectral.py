"""Spectral analysis of quantized features and the weight-dropout redundancy probe (``scoring.md`` §3-4).

The source study ("Less Precise Can Be More Reliable: A Systematic Evaluation of Quantization's Impact on
VLMs Beyond Accuracy", Bouguerra et al.; Sec. 5 and Appendix C) explains quantization's effect on
reliability as *spectral filtering*: rounding noise of roughly constant size swamps the high-rank,
low-variance principal components of the penultimate visual features, so the quantized model keeps the
coarse, high-variance structure and loses fine detail. Its first version ("... CLIP quantization
reliability", appendix "Relative Spectral Error") shows the same thing in the 2D Fourier spectrum of
ViT patch-token maps. This module turns those definitions into small pure functions:

* **fixed basis** (study App. C.1, ``scoring.md`` §3.2): SVD of the centred FP32 features; per-rank
  projected magnitude, spectral distortion, SQNR; subspace similarity ``Sim_k`` and its saturation rank;
* **adaptive basis** (study App. C.2, ``scoring.md`` §3.3): SVD of the quantized features with their own
  mean; zero-shot accuracy of rank-interval reconstructions; cumulative spectral-energy deviation;
* **Fourier** (first study, appendix; ``scoring.md`` §3.4): channel- and image-averaged ``|fft2|`` of
  patch-token maps, the Relative Spectral Error (RSE) map and radial band means;
* **weight dropout** (study Sec. 4.1 / Fig. 2, ``scoring.md`` §4): accuracy drop under random removal
  of exactly the weights a quantizer would touch;
* **feature taps** (``scoring.md`` §3.1): forward hooks that record the penultimate visual feature and
  the patch tokens of a :class:`qbench.model.VLM` for the duration of a ``with`` block.

Array analyses take NumPy arrays or CPU/GPU tensors, work in float64 on CPU (like the scorers,
``scoring.md`` §0) and return NumPy arrays, floats or frozen dataclasses. Ranks are 1-based in every
public argument and rank intervals are inclusive ``(a, b)`` pairs, as in the spec.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from qbench.analysis.metrics import accuracy as top1_accuracy
from qbench.analysis.metrics import relative_change
from qbench.model import VLM

ArrayLike = Any
"""A NumPy array, a torch tensor (any device) or anything ``numpy.asarray`` accepts."""

DEFAULT_SATURATION_THRESHOLD = 0.95
DEFAULT_RSE_EPS = 1e-8
DEFAULT_DROPOUT_RATES: tuple[float, ...] = (0.05, 0.10, 0.20, 0.30)
PENULTIMATE = "penultimate"
PATCH_TOKENS = "patch_tokens"


# --------------------------------------------------------------------------------------------------
# Input conversion
# --------------------------------------------------------------------------------------------------


def _as_float64(array: ArrayLike, name: str, ndim: int | None = None) -> np.ndarray:
    """``array`` as a finite float64 NumPy array (tensors are detached and moved to the CPU first)."""
    if isinstance(array, torch.Tensor):
        array = array.detach().to("cpu", torch.float64).numpy()
    out = np.asarray(array, dtype=np.float64)
    if ndim is not None and out.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {out.shape}")
    if not np.all(np.isfinite(out)):
        raise ValueError(f"{name} contain NaN or inf")
    return out


def _paired_features(h_fp: ArrayLike, h_q: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    fp = _as_float64(h_fp, "FP32 features", ndim=2)
    q = _as_float64(h_q, "quantized features", ndim=2)
    if fp.shape != q.shape:
        raise ValueError(f"FP32 and quantized features differ in shape: {fp.shape} vs {q.shape}")
    return fp, q


# --------------------------------------------------------------------------------------------------
# Eigenbases (shared by the fixed and the adaptive analysis)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Eigenbasis:
    """The principal basis of a feature matrix ``H`` (n x D): ``H - mean = U diag(singular_values) basisᵀ``.

    ``basis`` is D x D with orthonormal columns ``v_1..v_D`` (rank k = column k-1), singular values in
    descending order. Column signs are whatever LAPACK returns; every quantity built on top is
    sign-invariant.
    """

    mean: np.ndarray
    basis: np.ndarray
    singular_values: np.ndarray
    n: int

    @property
    def dim(self) -> int:
        return int(self.basis.shape[0])


def eigenbasis(features: ArrayLike, mean: ArrayLike | None = None) -> Eigenbasis:
    """Thin SVD of ``features`` centred with ``mean`` (default: their own column mean).

    Eq. (2) of the study for FP32 features (``scoring.md`` §3.2) and Eq. (9) for quantized ones (§3.3).
    The spec requires more samples than dimensions (n > D) so that all D ranks are defined; fewer is a
    ``ValueError`` rather than a silently truncated basis.
    """
    h = _as_float64(features, "features", ndim=2)
    n, d = h.shape
    if n <= d:
        raise ValueError(f"spectral analysis needs more samples than dimensions, got n={n} <= D={d}")
    mu = h.mean(axis=0) if mean is None else _as_float64(mean, "mean", ndim=1)
    if mu.shape != (d,):
        raise ValueError(f"mean must have shape ({d},), got {mu.shape}")
    _, sigma, vt = np.linalg.svd(h - mu, full_matrices=False)
    return Eigenbasis(mean=mu, basis=vt.T.copy(), singular_values=sigma, n=n)


# --------------------------------------------------------------------------------------------------
# Fixed basis (FP32 eigenbasis): study App. C.1, scoring.md §3.2
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FixedBasisSpectrum:
    """Per-rank curves of the fixed-basis analysis, index k-1 for rank k (``scoring.md`` §3.2).

    ``magnitude_fp`` = σ_k/√n, ``magnitude_q`` the quantized projected magnitude (study Eq. 3),
    ``distortion`` = log10(m_q/m_fp) (Eq. 4; < 0 means rank k is damped), ``sqnr_db`` the per-rank SQNR
    (Eq. 5-7; +inf where the projected noise is exactly zero), ``signal_power``/``noise_power`` the
    summed squares it is built from.
    """

    singular_values: np.ndarray
    magnitude_fp: np.ndarray
    magnitude_q: np.ndarray
    distortion: np.ndarray
    signal_power: np.ndarray
    noise_power: np.ndarray
    sqnr_db: np.ndarray


def spectral_distortion(magnitude_fp: ArrayLike, magnitude_q: ArrayLike) -> np.ndarray:
    """``D(k) = log10(m_q(k) / m_fp(k))`` (study Eq. 4): < 0 damping, > 0 amplification / injected noise.

    A rank whose FP32 magnitude is 0 (rank-deficient features) gives ±inf or NaN, left visible on purpose.
    """
    m_fp = _as_float64(magnitude_fp, "FP32 magnitudes", ndim=1)
    m_q = _as_float64(magnitude_q, "quantized magnitudes", ndim=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log10(m_q) - np.log10(m_fp)


def sqnr_db(signal_power: ArrayLike, noise_power: ArrayLike) -> np.ndarray:
    """``10·log10(P_S / P_N)`` element-wise, +inf where the noise power is exactly 0 (``scoring.md`` §3.2).

    The study (Eq. 7) adds an ε to the denominator; the spec instead makes noise-free ranks +inf, so that
    q = fp is recognisable exactly instead of reading as a large finite number that depends on ε.
    """
    s = _as_float64(signal_power, "signal power", ndim=1)
    noise = _as_float64(noise_power, "noise power", ndim=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = s / noise
        out = 10.0 * np.log10(ratio)
    out[(noise == 0) & (s > 0)] = np.inf
    return out


def fixed_basis_spectrum(h_fp: ArrayLike, h_q: ArrayLike, basis: Eigenbasis | None = None) -> FixedBasisSpectrum:
    """Project FP32 and quantized features on the frozen FP32 eigenbasis and compare them rank by rank.

    ``P_fp = (H_fp - μ_fp)V`` and ``P_q = (H_q - μ_fp)V`` (study Eq. 2-3, ``scoring.md`` §3.2); the ranks
    keep the FP32 order (not re-sorted by the quantized energy, as the study prescribes). Signal power
    ``Σ_i P_fp[i,k]²`` and noise power ``Σ_i (P_q[i,k] - P_fp[i,k])²`` (Eq. 5-6, sums instead of means:
    the 1/n cancels in the ratio); the noise is computed as ``(H_q - H_fp)V`` so that identical features
    give an exactly zero noise and SQNR = +inf. ``basis`` may be passed to reuse an FP32 SVD.
    """
    fp, q = _paired_features(h_fp, h_q)
    if basis is None:
        basis = eigenbasis(fp)
    if basis.dim != fp.shape[1]:
        raise ValueError(f"basis has dimension {basis.dim}, features have {fp.shape[1]}")
    v = basis.basis
    p_fp = (fp - basis.mean) @ v
    p_q = (q - basis.mean) @ v
    noise = (q - fp) @ v
    n = fp.shape[0]
    magnitude_fp = np.sqrt(np.sum(p_fp**2, axis=0) / n)
    magnitude_q = np.sqrt(np.sum(p_q**2, axis=0) / n)
    signal_power = np.sum(p_fp**2, axis=0)
    noise_power = np.sum(noise**2, axis=0)
    return FixedBasisSpectrum(
        singular_values=basis.singular_values,
        magnitude_fp=magnitude_fp,
        magnitude_q=magnitude_q,
        distortion=spectral_distortion(magnitude_fp, magnitude_q),
        signal_power=signal_power,
        noise_power=noise_power,
        sqnr_db=sqnr_db(signal_power, noise_power),
    )


def subspace_similarity(basis_fp: ArrayLike, basis_q: ArrayLike) -> np.ndarray:
    """``Sim_k = ‖V_kᵀ W_k‖_F² / k`` for k = 1..D (``scoring.md`` §3.2), the mean squared cosine of the
    principal angles between the top-k FP32 and top-k quantized principal subspaces.

    ``basis_fp`` (V) and ``basis_q`` (W) are D x D with orthonormal columns in rank order (e.g.
    ``eigenbasis(h_fp).basis`` and ``eigenbasis(h_q).basis``). Sim_k ∈ [0, 1]; column signs and any
    rotation *within* a top-k subspace leave it unchanged; Sim_D = 1 for two complete bases.
    All k at once: with ``M = VᵀW``, ``‖V_kᵀW_k‖_F²`` is the k x k leading block sum of ``M²``.
    """
    v = _as_float64(basis_fp, "FP32 basis", ndim=2)
    w = _as_float64(basis_q, "quantized basis", ndim=2)
    if v.shape != w.shape:
        raise ValueError(f"bases differ in shape: {v.shape} vs {w.shape}")
    squared = (v.T @ w) ** 2
    block_sums = np.cumsum(np.cumsum(squared, axis=0), axis=1)
    k_max = min(v.shape)
    ranks = np.arange(1, k_max + 1)
    return block_sums[ranks - 1, ranks - 1] / ranks


def saturation_rank(similarity: ArrayLike, threshold: float = DEFAULT_SATURATION_THRESHOLD) -> int | None:
    """``k_sat(θ) = min{k : Sim_j ≥ θ for all j ≥ k}`` (1-based; ``scoring.md`` §3.2, default θ = 0.95).

    ``None`` when even the last entry is below θ (cannot happen for complete bases, where Sim_D = 1, but
    a truncated curve may end low).
    """
    sim = _as_float64(similarity, "similarity", ndim=1)
    below = np.flatnonzero(sim < threshold)
    if below.size == 0:
        return 1
    last = int(below[-1])
    return None if last == sim.size - 1 else last + 2


def reconstruction_similarity(h_fp: ArrayLike, h_q: ArrayLike, basis: Eigenbasis | None = None) -> np.ndarray:
    """The study's own "subspace similarity" curve (App. C.1, Eq. 8): mean cosine between the rank-k
    reconstruction of the *quantized* features in the FP32 basis and the FP32 features, k = 1..D.

    ``x̂_k = μ + Σ_{j≤k} ((x_q - μ)·v_j) v_j`` and ``Sim_k = mean_i cos(x̂_k^(i), x_fp^(i))``. ``scoring.md``
    §3.2 replaced this by the principal-angle :func:`subspace_similarity`; this form is kept so the
    study's Fig. 8d-e can be reproduced side by side. Computed for all k with running sums (orthonormal
    ``v_j`` make ``‖x̂_k‖²`` a cumulative sum), O(nD) after the projections.
    """
    fp, q = _paired_features(h_fp, h_q)
    if basis is None:
        basis = eigenbasis(fp)
    v, mu = basis.basis, basis.mean
    p_q = (q - mu) @ v
    dots = (mu @ fp.T)[:, None] + np.cumsum(p_q * (fp @ v), axis=1)
    norms_sq = mu @ mu + np.cumsum(2.0 * p_q * (mu @ v)[None, :] + p_q**2, axis=1)
    fp_norms = np.linalg.norm(fp, axis=1)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        cosines = dots / (np.sqrt(np.maximum(norms_sq, 0.0)) * fp_norms)
    return cosines.mean(axis=0)


# --------------------------------------------------------------------------------------------------
# Rank intervals
# --------------------------------------------------------------------------------------------------


def octave_intervals(dim: int) -> list[tuple[int, int]]:
    """``[1,1], [2,3], [4,7], …``: octave bands ``[2^j, 2^{j+1}-1]`` clipped to ``dim`` (``scoring.md`` §3.3).

    The last band is ``[2^J, dim]`` (e.g. ``[512, 768]`` for D = 768).
    """
    if dim < 1:
        raise ValueError(f"dim must be positive, got {dim}")
    out = []
    lo = 1
    while lo <= dim:
        out.append((lo, min(2 * lo - 1, dim)))
        lo *= 2
    return out


def cumulative_intervals(dim: int) -> list[tuple[int, int]]:
    """``[1, k]`` for k = 1, 2, 4, …, and ``[1, dim]`` last (``scoring.md`` §3.3)."""
    if dim < 1:
        raise ValueError(f"dim must be positive, got {dim}")
    out = []
    k = 1
    while k < dim:
        out.append((1, k))
        k *= 2
    out.append((1, dim))
    return out


def _check_interval(interval: tuple[int, int], dim: int) -> tuple[int, int]:
    a, b = (int(interval[0]), int(interval[1]))
    if not 1 <= a <= b <= dim:
        raise ValueError(f"rank interval {interval} must satisfy 1 <= a <= b <= {dim}")
    return a, b


def band_means(curve: ArrayLike, intervals: Sequence[tuple[int, int]]) -> np.ndarray:
    """Mean of a per-rank curve (index k-1 for rank k) over each inclusive 1-based rank interval.

    Used for the octave-band summaries of D(k) and SQNR(k) (``scoring.md`` §3.2); a band containing a
    +inf SQNR averages to +inf.
    """
    values = np.asarray(curve, dtype=np.float64)
    return np.array([values[a - 1 : b].mean() for a, b in (_check_interval(i, values.size) for i in intervals)])


# --------------------------------------------------------------------------------------------------
# Adaptive basis (quantized eigenbasis): study App. C.2, scoring.md §3.3
# --------------------------------------------------------------------------------------------------


def reconstruct(features: ArrayLike, basis: Eigenbasis, interval: tuple[int, int], keep_mean: bool = True) -> np.ndarray:
    """``h̃ = μ + B_[a,b] B_[a,b]ᵀ (h - μ)``: features restricted to ranks a..b of ``basis`` (study Eq. 10).

    ``keep_mean=False`` drops ``μ`` (the spec's non-default alternative, ``--subspace-keep-mean`` off).
    With the full interval ``[1, D]`` and ``keep_mean`` the features come back unchanged (up to rounding).
    """
    h = _as_float64(features, "features", ndim=2)
    a, b = _check_interval(interval, basis.dim)
    band = basis.basis[:, a - 1 : b]
    projected = ((h - basis.mean) @ band) @ band.T
    return basis.mean + projected if keep_mean else projected


Head = Callable[[np.ndarray], np.ndarray]


def _apply_head(features: np.ndarray, head: ArrayLike | Head | None) -> np.ndarray:
    if head is None:
        return features
    if callable(head):
        return _as_float64(head(features), "head output", ndim=2)
    return features @ _as_float64(head, "head", ndim=2)


def zero_shot_logits(
    features: ArrayLike,
    class_text: ArrayLike,
    logit_scale: float,
    head: ArrayLike | Head | None = None,
) -> np.ndarray:
    """``s · normalise(head(h)) · Tᵀ``: CLIP logits (``scoring.md`` §0) from penultimate features.

    ``head`` is the model's FP32-kept image head (``models.md`` §6.3): a D x d matrix such as
    ``visual.proj`` for open_clip ViTs, a callable on float64 arrays (e.g. a Linear with bias), or
    ``None`` when the penultimate feature already is the embedding (SigLIP, ALIGN). ``class_text`` is the
    K x d L2-normalised text classifier of the same model. The SigLIP bias is omitted: it is
    class-constant and never changes an argmax or a softmax.
    """
    embedded = _apply_head(_as_float64(features, "features", ndim=2), head)
    text = _as_float64(class_text, "class text embeddings", ndim=2)
    if embedded.shape[1] != text.shape[1]:
        raise ValueError(f"head output dimension {embedded.shape[1]} != text embedding dimension {text.shape[1]}")
    norms = np.linalg.norm(embedded, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError("a reconstructed embedding is exactly zero and cannot be normalised")
    return float(logit_scale) * (embedded / norms) @ text.T


def subspace_accuracy(
    features: ArrayLike,
    class_text: ArrayLike,
    labels: ArrayLike,
    logit_scale: float,
    intervals: Sequence[tuple[int, int]],
    *,
    basis: Eigenbasis | None = None,
    head: ArrayLike | Head | None = None,
    keep_mean: bool = True,
) -> np.ndarray:
    """Zero-shot top-1 accuracy (fraction) of each rank-interval reconstruction (``scoring.md`` §3.3).

    For each ``[a, b]``: :func:`reconstruct` with ``basis`` (default: the features' *own* eigenbasis
    and mean, i.e. V for FP32 features and W for quantized ones, study Eq. 9-10), then the model's head,
    L2 normalisation, logits with the model's own text classifier and logit scale, and top-1 accuracy
    (ties to the lowest class, :func:`qbench.analysis.metrics.accuracy`). The study reports the relative change
    of these accuracies between the quantized and the FP32 model (its Eq. 11); combine two calls with
    :func:`qbench.analysis.metrics.relative_change` (spec sign: > 0 when the quantized model lost accuracy).
    """
    h = _as_float64(features, "features", ndim=2)
    if basis is None:
        basis = eigenbasis(h)
    y = np.asarray(labels)
    return np.array(
        [
            top1_accuracy(zero_shot_logits(reconstruct(h, basis, interval, keep_mean), class_text, logit_scale, head), y)
            for interval in intervals
        ]
    )


def cumulative_energy(singular_values: ArrayLike) -> np.ndarray:
    """``E(k) = Σ_{j≤k} σ_j² / Σ_j σ_j²`` (study Eq. 12, ``scoring.md`` §3.3); E(D) = 1 exactly."""
    sigma = _as_float64(singular_values, "singular values", ndim=1)
    energy = np.cumsum(sigma**2)
    if energy[-1] <= 0:
        raise ValueError("all singular values are zero: the cumulative energy is undefined")
    out = energy / energy[-1]
    out[-1] = 1.0
    return out


@dataclass(frozen=True)
class EnergyDeviation:
    """``ΔE(k) = E_q(k) - E_fp(k)`` (index k-1), its signed area ``CSED = (1/D) Σ_k ΔE(k)`` and
    ``max_k |ΔE(k)|`` (``scoring.md`` §3.3). Positive at low k: energy moved to the leading ranks."""

    curve: np.ndarray
    csed: float
    max_abs: float


def energy_deviation(singular_values_fp: ArrayLike, singular_values_q: ArrayLike) -> EnergyDeviation:
    """Cumulative spectral-energy deviation between the quantized and the FP32 SVD (study Fig. 9C).

    Each model's singular values come from its own SVD (ranks re-sorted per model, as the study notes).
    """
    e_fp = cumulative_energy(singular_values_fp)
    e_q = cumulative_energy(singular_values_q)
    if e_fp.shape != e_q.shape:
        raise ValueError(f"spectra differ in length: {e_fp.size} vs {e_q.size}")
    curve = e_q - e_fp
    return EnergyDeviation(curve=curve, csed=float(curve.mean()), max_abs=float(np.max(np.abs(curve))))


# --------------------------------------------------------------------------------------------------
# 2D Fourier spectrum of patch-token maps: first study's appendix, scoring.md §3.4
# --------------------------------------------------------------------------------------------------


def tokens_to_grid(tokens: ArrayLike, grid: tuple[int, int], prefix_tokens: int | None = None) -> np.ndarray:
    """Patch tokens ``(B, P + H'W', C)`` → maps ``(B, C, H', W')`` in row-major patch order (§3.4 step 1).

    ``prefix_tokens`` (CLS, registers) are dropped from the front; by default their number is the token
    count minus the grid size (``scoring.md`` §3.1).
    """
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.detach().to("cpu", torch.float64).numpy()
    t = np.asarray(tokens, dtype=np.float64)
    if t.ndim != 3:
        raise ValueError(f"tokens must be (B, T, C), got shape {t.shape}")
    height, width = int(grid[0]), int(grid[1])
    prefix = t.shape[1] - height * width if prefix_tokens is None else int(prefix_tokens)
    if prefix < 0 or t.shape[1] - prefix != height * width:
        raise ValueError(f"{t.shape[1]} tokens do not hold a {height}x{width} grid after {prefix} prefix tokens")
    patches = t[:, prefix:, :]
    return patches.reshape(t.shape[0], height, width, t.shape[2]).transpose(0, 3, 1, 2)


def _shifted_spectrum(maps: ArrayLike, demean: bool) -> np.ndarray:
    m = _as_float64(maps, "token maps", ndim=4)
    if demean:
        m = m - m.mean(axis=(-2, -1), keepdims=True)
    return np.fft.fftshift(np.fft.fft2(m, axes=(-2, -1)), axes=(-2, -1))


def fourier_amplitude(maps: ArrayLike, demean: bool = False) -> np.ndarray:
    """``A(u, v)``: ``|fftshift(fft2(map))|`` averaged over channels and images (§3.4 steps 2-3).

    ``maps`` is ``(B, C, H', W')``; the result is one H' x W' map with zero frequency at index
    ``(H'//2, W'//2)``. ``demean`` subtracts each channel's spatial mean first (``--fft-demean``), which
    zeroes the DC term.
    """
    return np.abs(_shifted_spectrum(maps, demean)).mean(axis=(0, 1))


def dc_term(amplitude: ArrayLike) -> float:
    """The zero-frequency entry of a centred (fftshifted) amplitude map, reported separately (§3.4)."""
    a = _as_float64(amplitude, "amplitude", ndim=2)
    return float(a[a.shape[0] // 2, a.shape[1] // 2])


def relative_spectral_error(amplitude_fp: ArrayLike, amplitude_q: ArrayLike, eps: float = DEFAULT_RSE_EPS) -> np.ndarray:
    """``RSE(u, v) = |A_q - A_fp| / (A_fp + ε)``, ε = 1e-8 (first study, appendix "Relative Spectral
    Error"; ``scoring.md`` §3.4 step 4). Exactly zero where the two spectra agree."""
    fp = _as_float64(amplitude_fp, "FP32 amplitude", ndim=2)
    q = _as_float64(amplitude_q, "quantized amplitude", ndim=2)
    if fp.shape != q.shape:
        raise ValueError(f"spectra differ in shape: {fp.shape} vs {q.shape}")
    return np.abs(q - fp) / (fp + eps)


def relative_spectral_error_complex(
    maps_fp: ArrayLike, maps_q: ArrayLike, eps: float = DEFAULT_RSE_EPS, demean: bool = False
) -> np.ndarray:
    """``--rse-mode complex``: ``mean_{b,c} |F_q - F_fp| / (A_fp + ε)`` with the complex spectra compared
    per image and channel *before* averaging (§3.4), so phase changes count too. qbench's reading of the
    spec's one-line description: same denominator as :func:`relative_spectral_error`."""
    f_fp = _shifted_spectrum(maps_fp, demean)
    f_q = _shifted_spectrum(maps_q, demean)
    if f_fp.shape != f_q.shape:
        raise ValueError(f"token maps differ in shape: {f_fp.shape} vs {f_q.shape}")
    return np.abs(f_q - f_fp).mean(axis=(0, 1)) / (np.abs(f_fp).mean(axis=(0, 1)) + eps)


def radial_index(shape: tuple[int, int]) -> np.ndarray:
    """``r = round(sqrt(u² + v²))`` per entry of a centred H' x W' map, (u, v) measured from (H'//2, W'//2)."""
    u = np.arange(shape[0]) - shape[0] // 2
    v = np.arange(shape[1]) - shape[1] // 2
    return np.rint(np.sqrt(u[:, None] ** 2 + v[None, :] ** 2)).astype(np.int64)


def radial_profile(spectrum: ArrayLike) -> np.ndarray:
    """Mean of a centred map over each integer radius 0..r_max (index r); a radius with no entry is NaN."""
    s = _as_float64(spectrum, "spectrum", ndim=2)
    r = radial_index(s.shape).ravel()
    counts = np.bincount(r)
    sums = np.bincount(r, weights=s.ravel())
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts


@dataclass(frozen=True)
class RadialBands:
    """Means of a centred spectrum map over the low (r ≤ 1), mid and high (r ≥ ⌈H'/2⌉ - 1) bands (§3.4)."""

    low: float
    mid: float
    high: float


def radial_bands(spectrum: ArrayLike) -> RadialBands:
    """Low/mid/high band means over map entries (not over radii); an empty mid band (tiny grids) is NaN."""
    s = _as_float64(spectrum, "spectrum", ndim=2)
    r = radial_index(s.shape)
    high_from = math.ceil(s.shape[0] / 2) - 1
    low = r <= 1
    high = (r >= high_from) & ~low
    mid = ~low & ~high

    def mean(mask: np.ndarray) -> float:
        return float(s[mask].mean()) if mask.any() else float("nan")

    return RadialBands(low=mean(low), mid=mean(mid), high=mean(high))


# --------------------------------------------------------------------------------------------------
# Weight-dropout redundancy probe: study Sec. 4.1 / Fig. 2, scoring.md §4
# --------------------------------------------------------------------------------------------------


def mask_seed(seed: int, repeat: int, module_name: str) -> int:
    """First 8 bytes of SHA-256 of ``"{seed}:{repeat}:{module name}"`` as an integer (``scoring.md`` §4).

    Read little-endian and cleared to 63 bits, like :func:`qbench.quant.rotation.derived_generator`, so it
    is a valid ``torch.Generator`` seed; independent of module iteration order and of the interpreter
    (Python's ``hash`` is salted per process).
    """
    digest = hashlib.sha256(f"{seed}:{repeat}:{module_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def dropout_mask(shape: Sequence[int], rate: float, seed: int, repeat: int, module_name: str) -> torch.Tensor:
    """Boolean keep-mask: each element kept independently with probability ``1 - rate`` (CPU generator).

    ``u ~ U[0, 1)`` per element and keep ``u >= rate``: rate 0 keeps everything, rate 1 nothing.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"dropout rate must lie in [0, 1], got {rate}")
    generator = torch.Generator().manual_seed(mask_seed(seed, repeat, module_name))
    return torch.rand(tuple(shape), generator=generator, dtype=torch.float64) >= rate


def dropout_targets(vlm: VLM, towers: Sequence[str]) -> list[tuple[str, nn.Parameter]]:
    """``(module name, weight)`` of every Linear/Conv2d a quantizer would touch in ``towers``.

    The quantizers' own inventory (``models.md`` §6.1, :func:`qbench.quant.modules.in_scope_modules`):
    heads, embeddings, norms, biases and ``logit_scale`` are never targets. Attention must already be
    rewritten (:func:`qbench.quant.modules.rewrite_tower_attention`), otherwise q/k/v would be missed.
    """
    from qbench.quant.modules import in_scope_modules

    return [(name, module.weight) for name, module in in_scope_modules(vlm, towers)]


@torch.no_grad()
def apply_weight_dropout(
    vlm: VLM,
    rate: float,
    *,
    seed: int,
    repeat: int = 0,
    towers: Sequence[str] = ("visual", "text"),
    rescale: bool = False,
    originals: dict[str, torch.Tensor] | None = None,
) -> float:
    """Zero target weights of ``vlm`` **in place** with :func:`dropout_mask`; returns the kept fraction.

    ``originals`` (name → weight) are the values to mask (default: the current weights), so the same
    model can be re-masked for another rate or repeat without compounding. ``rescale`` multiplies kept
    weights by 1/(1-rate) (``--dropout-rescale``, off by default; undefined at rate 1). Text heads cached
    on ``vlm`` are cleared, since they were computed with the old text tower.
    """
    if rescale and rate >= 1.0:
        raise ValueError("--dropout-rescale is undefined at rate 1")
    kept = total = 0
    for name, weight in dropout_targets(vlm, towers):
        source = weight if originals is None else originals[name]
        mask = dropout_mask(weight.shape, rate, seed, repeat, name).to(weight.device)
        masked = source * mask.to(source.dtype)
        if rescale:
            masked = masked / (1.0 - rate)
        weight.copy_(masked)
        kept += int(mask.sum())
        total += mask.numel()
    vlm.clear_caches()
    return kept / total if total else float("nan")


@dataclass(frozen=True)
class DropoutProbeResult:
    """Accuracies under weight dropout (``scoring.md`` §4), one entry per rate in ``rates``.

    ``accuracies[i][r]`` and ``kept_fractions[i][r]`` per repeat; ``mean_accuracy[i]`` = A_drop(p);
    ``absolute_drop[i]`` = A_fp - A_drop(p); ``relative_drop[i]`` = δ_drop(p) = (A_fp - A_drop)/A_fp
    (``None`` when A_fp = 0). ``reference_accuracy`` is A_fp.
    """

    reference_accuracy: float
    rates: tuple[float, ...]
    accuracies: tuple[tuple[float, ...], ...]
    kept_fractions: tuple[tuple[float, ...], ...]
    mean_accuracy: tuple[float, ...]
    absolute_drop: tuple[float, ...]
    relative_drop: tuple[float | None, ...]


def weight_dropout_probe(
    evaluate: Callable[[VLM], float],
    vlm: VLM,
    rates: Sequence[float] = DEFAULT_DROPOUT_RATES,
    *,
    seed: int = 0,
    repeats: int = 3,
    towers: Sequence[str] = ("visual", "text"),
    rescale: bool = False,
    reference_accuracy: float | None = None,
) -> DropoutProbeResult:
    """Accuracy drop of ``vlm`` under random weight dropout: the study's redundancy proxy (Sec. 4.1,
    Fig. 2: drop under dropout correlates with drop under PTQ, r = 0.91), ``scoring.md`` §4.

    ``evaluate(model) -> accuracy`` is called on a **deep copy** of ``vlm``; the input model is never
    modified (the spec's "restore the original weights" holds trivially). The copy gets the quantizers'
    attention rewrite for ``towers`` so the targets are exactly the weights a quantizer would touch,
    then for every rate and repeat its target weights are set to ``original · mask`` (masks from
    :func:`dropout_mask`, seeded per ``seed``, repeat and module name). ``reference_accuracy`` (A_fp)
    defaults to ``evaluate`` on the rewritten, undropped copy, so rate 0 gives a drop of exactly 0 even
    though the rewrite changes logits by ~1e-6.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    from qbench.quant.modules import rewrite_tower_attention

    work = copy.deepcopy(vlm)
    work.clear_caches()
    rewrite_tower_attention(work, towers)
    originals = {name: weight.detach().clone() for name, weight in dropout_targets(work, towers)}
    reference = float(evaluate(work)) if reference_accuracy is None else float(reference_accuracy)

    accuracies: list[tuple[float, ...]] = []
    kept_fractions: list[tuple[float, ...]] = []
    for rate in rates:
        row, kept_row = [], []
        for repeat in range(repeats):
            kept_row.append(
                apply_weight_dropout(work, float(rate), seed=seed, repeat=repeat, towers=towers,
                                     rescale=rescale, originals=originals)
            )
            row.append(float(evaluate(work)))
        accuracies.append(tuple(row))
        kept_fractions.append(tuple(kept_row))
    means = tuple(float(np.mean(row)) for row in accuracies)
    return DropoutProbeResult(
        reference_accuracy=reference,
        rates=tuple(float(rate) for rate in rates),
        accuracies=tuple(accuracies),
        kept_fractions=tuple(kept_fractions),
        mean_accuracy=means,
        absolute_drop=tuple(reference - mean for mean in means),
        relative_drop=tuple(relative_change(reference, mean) for mean in means),
    )


# --------------------------------------------------------------------------------------------------
# Feature taps: scoring.md §3.1
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TapPoint:
    """Where a tap reads: ``module`` inside ``vlm.model``, its ``input`` (forward pre-hook) or ``output``
    (forward hook), and ``transform`` turning what the hook sees into the recorded batch."""

    module: str
    where: str
    transform: Callable[[torch.Tensor], torch.Tensor]


def _is_open_clip_vit(visual: nn.Module) -> bool:
    return hasattr(visual, "ln_post") and hasattr(visual, "transformer") and hasattr(visual, "_global_pool")


def _is_timm_tower(visual: nn.Module) -> bool:
    return isinstance(getattr(visual, "trunk", None), nn.Module)


def _visual(vlm: VLM) -> nn.Module:
    visual = getattr(vlm.model, "visual", None)
    if not isinstance(visual, nn.Module):
        raise ValueError(f"{vlm.name}: no open_clip image tower at model.visual; feature taps not supported")
    return visual


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def penultimate_tap(vlm: VLM) -> TapPoint:
    """The "penultimate visual feature" of ``scoring.md`` §3.1 (study App. C: "penultimate visual layer").

    * open_clip ViT (CLIP, DFN, CoCa): the pooled token after ``ln_post``, i.e. the input of the
      ``visual.proj`` Parameter. ``proj`` is not a module, so the tap is the output of ``ln_post`` pooled
      with the tower's own ``_global_pool`` (CLS for ``pool_type='tok'``, mean for ``'avg'``); with
      ``final_ln_after_pool`` ``ln_post`` already sees the pooled vector; with a contrastive attentional
      pooler it is that pooler's output.
    * timm towers: the input of ``visual.head.proj`` (ConvNeXt: pooled and normed), else the input of
      ``visual.trunk.head`` when it is a Linear (EVA02), else the tower output (SigLIP: the MAP-pool
      embedding, head = identity).
    * any other architecture a model plugin wraps: the wrapped model declares its own tap with a
      ``penultimate_tap()`` method returning a :class:`TapPoint` (a dual encoder whose pooled vision output
      already is the embedding taps that output, head = identity, ``scoring.md`` §3.1).
    Other towers raise ``ValueError``.
    """
    declared = getattr(vlm.model, "penultimate_tap", None)
    if callable(declared):
        return declared()
    visual = _visual(vlm)
    if _is_open_clip_vit(visual):
        if getattr(visual, "attn_pool_contrastive", None) is not None:
            return TapPoint("visual.attn_pool_contrastive", "output",
                            lambda out: out.squeeze(1) if out.dim() == 3 and out.shape[1] == 1 else out)

        def pool(out: torch.Tensor) -> torch.Tensor:
            if out.dim() == 2:
                return out
            if not getattr(visual.transformer, "batch_first", True):
                out = out.permute(1, 0, 2)
            return visual._global_pool(out)[0]

        return TapPoint("visual.ln_post", "output", pool)
    if _is_timm_tower(visual):
        head = getattr(visual, "head", None)
        if isinstance(getattr(head, "proj", None), nn.Linear):
            return TapPoint("visual.head.proj", "input", lambda x: x)
        if isinstance(getattr(visual.trunk, "head", None), nn.Linear):
            return TapPoint("visual.trunk.head", "input", lambda x: x)
        return TapPoint("visual", "output", lambda x: x)
    raise ValueError(f"{vlm.name}: no penultimate tap is defined for image tower {type(visual).__name__}")


def patch_grid(vlm: VLM) -> tuple[int, int]:
    """``(H', W') = image_size / patch_size`` of a ViT image tower (open_clip or timm)."""
    visual = _visual(vlm)
    if _is_open_clip_vit(visual):
        return tuple(int(g) for g in visual.grid_size)  # type: ignore[return-value]
    patch_embed = getattr(getattr(visual, "trunk", None), "patch_embed", None)
    if patch_embed is not None and getattr(patch_embed, "grid_size", None) is not None:
        return tuple(int(g) for g in patch_embed.grid_size)  # type: ignore[return-value]
    raise ValueError(f"{vlm.name}: image tower {type(visual).__name__} has no patch grid")


def _channel_centred(tokens: torch.Tensor) -> torch.Tensor:
    """Tokens minus their mean over channels: the part of the stream the final LayerNorm keeps."""
    return tokens - tokens.mean(dim=-1, keepdim=True)


def patch_tokens_tap(vlm: VLM) -> TapPoint:
    """Patch-token maps ``(B, C, H', W')`` for the Fourier analysis (``scoring.md`` §3.1, §3.4).

    open_clip ViT: the stream the final norm reads — the output of ``visual.transformer.resblocks[-1]``,
    before ``ln_post`` (the first study's choice: "output of the final residual block ... prior to
    ln_post") — read as the input of ``ln_post`` so that float maps attached in front of it (a rotation
    method's un-rotation) have been applied; timm ViT: output of ``trunk.blocks[-1]`` before ``trunk.norm``.
    Prefix tokens (CLS, registers) are dropped, and each token's mean over channels is removed — the
    final LayerNorm removes it too, so nothing the model uses is lost, and an exact re-parameterisation
    of the stream (QuaRot centres it, then rotates it and un-rotates it before ``ln_post``) leaves the
    maps unchanged instead of inflating the RSE. (Measured on the toy ViT with QuaRot w8a16: mean RSE
    3.8e-3 at the raw block output, 1.6e-4 with this tap.) ConvNeXt: output of the last stage, already
    a map. With ``final_ln_after_pool`` or an attentional pooler (CoCa) ``ln_post`` sees pooled tokens, so
    the block output is read (QuaRot refuses those towers anyway).
    """
    visual = _visual(vlm)
    if _is_open_clip_vit(visual):
        grid = patch_grid(vlm)
        last = len(visual.transformer.resblocks) - 1
        batch_first = getattr(visual.transformer, "batch_first", True)

        def to_maps(out: torch.Tensor) -> torch.Tensor:
            tokens = out if batch_first else out.permute(1, 0, 2)
            return torch.from_numpy(tokens_to_grid(_channel_centred(tokens), grid))

        if getattr(visual, "final_ln_after_pool", False) or getattr(visual, "attn_pool", None) is not None:
            return TapPoint(f"visual.transformer.resblocks.{last}", "output", to_maps)  # ln_post reads pooled tokens
        return TapPoint("visual.ln_post", "input", to_maps)
    trunk = getattr(visual, "trunk", None)
    if isinstance(getattr(trunk, "blocks", None), nn.Sequential) and len(trunk.blocks) > 0:
        grid = patch_grid(vlm)
        prefix = int(getattr(trunk, "num_prefix_tokens", 1))
        return TapPoint(f"visual.trunk.blocks.{len(trunk.blocks) - 1}", "output",
                        lambda out: torch.from_numpy(tokens_to_grid(_channel_centred(out), grid, prefix)))
    stages = getattr(trunk, "stages", None)
    if isinstance(stages, nn.Sequential) and len(stages) > 0:
        return TapPoint(f"visual.trunk.stages.{len(stages) - 1}", "output", lambda out: out)
    raise ValueError(f"{vlm.name}: no patch-token tap is defined for image tower {type(visual).__name__}")


TAP_POINTS: dict[str, Callable[[VLM], TapPoint]] = {PENULTIMATE: penultimate_tap, PATCH_TOKENS: patch_tokens_tap}


class FeatureRecorder:
    """Batches recorded by :func:`feature_taps`, kept as float32 CPU tensors in call order."""

    def __init__(self, names: Sequence[str]) -> None:
        self._batches: dict[str, list[torch.Tensor]] = {name: [] for name in names}

    def record(self, name: str, value: torch.Tensor) -> None:
        self._batches[name].append(value.detach().to("cpu", torch.float32))

    def features(self, name: str) -> torch.Tensor:
        """All recorded batches of tap ``name`` concatenated along the batch axis."""
        batches = self._batches[name]
        if not batches:
            raise ValueError(f"tap {name!r} recorded nothing: was the image tower run inside the block?")
        return torch.cat(batches, dim=0)

    def clear(self) -> None:
        for batches in self._batches.values():
            batches.clear()


@contextlib.contextmanager
def feature_taps(vlm: VLM, taps: Sequence[str] = (PENULTIMATE,)) -> Iterator[FeatureRecorder]:
    """Record the named taps (``"penultimate"``, ``"patch_tokens"``) on every image forward in the block.

    Hooks are registered on entry and removed on exit, also when the block raises (``scoring.md`` §3.1:
    "registered for the analysis only and removed afterwards"); they record and never change outputs.
    """
    unknown = [name for name in taps if name not in TAP_POINTS]
    if unknown:
        raise ValueError(f"unknown feature taps {unknown}; choose from {sorted(TAP_POINTS)}")
    recorder = FeatureRecorder(taps)
    handles = []
    try:
        for name in taps:
            point = TAP_POINTS[name](vlm)
            module = vlm.model.get_submodule(point.module)
            if point.where == "input":
                def pre_hook(_m: nn.Module, args: tuple, _name: str = name, _point: TapPoint = point) -> None:
                    recorder.record(_name, _point.transform(args[0]))

                handles.append(module.register_forward_pre_hook(pre_hook))
            else:
                def hook(_m: nn.Module, _args: tuple, out: Any, _name: str = name, _point: TapPoint = point) -> None:
                    recorder.record(_name, _point.transform(_first(out)))

                handles.append(module.register_forward_hook(hook))
        yield recorder
    finally:
        for handle in handles:
            handle.remove()
