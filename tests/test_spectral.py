"""Spectral analysis and weight-dropout probe (``scoring.md`` §3-4, checklist §5) on synthetic arrays and
the tiny open_clip ViT.

Synthetic features are built as ``H = 1μᵀ + U diag(s) Vᵀ`` with ``U`` (n x D) orthonormal columns that are
also orthogonal to the all-ones vector (so the column mean of ``U diag(s) Vᵀ`` is zero and ``μ`` is the
exact mean), ``V`` a random D x D orthogonal matrix and distinct descending ``s``. Then the FP32 SVD
returns exactly ``σ_k = s_k`` and ``v_k = ±V[:, k]``.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from qbench.analysis import spectral
from qbench.quant.modules import rewrite_tower_attention
from tiny_models import tiny_vlm

N, D = 400, 12


def orthonormal_columns(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """``k`` orthonormal columns in R^n, all orthogonal to the ones vector (zero column mean)."""
    q, _ = np.linalg.qr(np.column_stack([np.ones(n), rng.standard_normal((n, k))]))
    return q[:, 1:]


def synthetic(seed: int = 0, n: int = N, d: int = D):
    rng = np.random.default_rng(seed)
    cols = orthonormal_columns(rng, n, 2 * d)
    u, u_noise = cols[:, :d], cols[:, d:]
    v, _ = np.linalg.qr(rng.standard_normal((d, d)))
    s = np.geomspace(100.0, 0.5, d)
    mu = rng.standard_normal(d)
    h = mu + (u * s) @ v.T
    return h, u, u_noise, v, s, mu, rng


# --------------------------------------------------------------------------------------------------
# Fixed basis
# --------------------------------------------------------------------------------------------------


def test_fixed_basis_closed_form_noise_confined_to_chosen_ranks():
    """Noise ``E = U_n diag(e) Vᵀ`` with ``U_n ⟂ U`` (and ⟂ 1) sits only on the ranks with ``e_k ≠ 0``.

    Projected on the FP32 basis: ``P_fp = U diag(s)`` (up to column signs) and ``P_q - P_fp = E V =
    U_n diag(e)``. Hence signal power ``Σ_i P_fp[i,k]² = s_k²``, noise power ``e_k²`` and

        SQNR(k) = 10 log10(s_k² / e_k²) = 20 log10(s_k / e_k)          (+inf where e_k = 0).

    ``m_fp(k) = s_k/√n``; because ``U_nᵀU = 0`` the cross term vanishes, ``m_q(k)² = (s_k² + e_k²)/n`` and

        D(k) = log10(m_q/m_fp) = ½ log10(1 + e_k²/s_k²)                 (0 where e_k = 0).
    """
    h, _, u_noise, v, s, _, _ = synthetic()
    e = np.zeros(D)
    e[[2, 7, 11]] = [5.0, 1.0, 2.0]
    h_q = h + (u_noise * e) @ v.T

    result = spectral.fixed_basis_spectrum(h, h_q)
    noisy = e > 0
    np.testing.assert_allclose(result.singular_values, s, rtol=1e-10)
    np.testing.assert_allclose(result.magnitude_fp, s / math.sqrt(N), rtol=1e-10)
    np.testing.assert_allclose(result.sqnr_db[noisy], 20 * np.log10(s[noisy] / e[noisy]), rtol=1e-8)
    assert np.all(np.isposinf(result.sqnr_db[~noisy]) | (result.sqnr_db[~noisy] > 200))
    np.testing.assert_allclose(result.distortion, 0.5 * np.log10(1 + e**2 / s**2), atol=1e-10)
    # the study's high-rank collapse: same noise amplitude hurts rank 12 far more than rank 3
    assert result.sqnr_db[11] < result.sqnr_db[2]


def test_fixed_basis_isotropic_gaussian_noise():
    """Isotropic noise ``N(0, σ²I)``: for any fixed unit ``v_k``, ``Σ_i (n_i·v_k)² ~ σ² χ²_n`` so the noise
    power is ``≈ nσ²`` (relative sd √(2/n) ≈ 3 % at n = 2000) and

        SQNR(k) ≈ 10 log10(s_k² / (nσ²)),   D(k) ≈ ½ log10(1 + nσ²/s_k²)

    (the cross term has mean 0 and sd ~ s_k σ). SQNR falls with rank, as the spec's property says."""
    n, sigma = 2000, 0.2
    h, _, _, _, s, _, rng = synthetic(seed=3, n=n)
    h_q = h + sigma * rng.standard_normal(h.shape)

    result = spectral.fixed_basis_spectrum(h, h_q)
    np.testing.assert_allclose(result.sqnr_db, 10 * np.log10(s**2 / (n * sigma**2)), atol=0.5)
    np.testing.assert_allclose(result.distortion, 0.5 * np.log10(1 + n * sigma**2 / s**2), atol=0.02)
    assert np.all(np.diff(result.sqnr_db) < 0)


def test_fixed_basis_identity():
    """q = fp ⇒ D ≡ 0, SQNR ≡ +inf, Sim_k ≡ 1 (``scoring.md`` §3.2)."""
    h, *_ = synthetic()
    result = spectral.fixed_basis_spectrum(h, h.copy())
    assert np.all(result.distortion == 0)
    assert np.all(np.isposinf(result.sqnr_db))
    basis = spectral.eigenbasis(h).basis
    np.testing.assert_allclose(spectral.subspace_similarity(basis, spectral.eigenbasis(h.copy()).basis), 1, atol=1e-12)
    np.testing.assert_allclose(spectral.reconstruction_similarity(h, h)[-1], 1.0, atol=1e-12)


def test_fixed_basis_uses_fp32_mean():
    """A pure mean shift δ of the quantized features is noise, not removed: noise power = n (δ·v_k)²."""
    h, _, _, _, s, _, rng = synthetic(seed=5)
    delta = rng.standard_normal(D)
    result = spectral.fixed_basis_spectrum(h, h + delta)
    v = spectral.eigenbasis(h).basis
    np.testing.assert_allclose(result.noise_power, N * (delta @ v) ** 2, rtol=1e-8)
    np.testing.assert_allclose(result.sqnr_db, 10 * np.log10(s**2 / (N * (delta @ v) ** 2)), rtol=1e-8)


def rotated_basis(v: np.ndarray, a: int, b: int, theta: float) -> np.ndarray:
    """``v`` with columns a and b (1-based) rotated by θ in their plane."""
    w = v.copy()
    w[:, a - 1] = math.cos(theta) * v[:, a - 1] + math.sin(theta) * v[:, b - 1]
    w[:, b - 1] = -math.sin(theta) * v[:, a - 1] + math.cos(theta) * v[:, b - 1]
    return w


def test_subspace_similarity_rotated_subspace_closed_form():
    """Rotate ``v_a`` towards ``v_b`` (a < b) by θ: ``w_a = cos θ v_a + sin θ v_b``, ``w_b = -sin θ v_a + cos θ v_b``.

    For k < a the top-k spans agree: Sim_k = 1. For a ≤ k < b, ``V_kᵀW_k`` is the identity except column
    a, whose only entry inside the span is cos θ, so ``‖V_kᵀW_k‖_F² = k - 1 + cos²θ`` and
    ``Sim_k = 1 - sin²θ/k``. For k ≥ b both spans contain v_a and v_b again: Sim_k = 1.
    Checked on bases directly and end to end through the SVD of features ``U diag(s) Wᵀ``."""
    h, u, _, v, s, mu, _ = synthetic(seed=1)
    a, b, theta = 3, 9, 0.7
    k = np.arange(1, D + 1)
    expected = np.where((k >= a) & (k < b), 1 - math.sin(theta) ** 2 / k, 1.0)

    w = rotated_basis(v, a, b, theta)
    np.testing.assert_allclose(spectral.subspace_similarity(v, w), expected, atol=1e-12)

    h_q = mu + (u * s) @ w.T
    sim = spectral.subspace_similarity(spectral.eigenbasis(h).basis, spectral.eigenbasis(h_q).basis)
    np.testing.assert_allclose(sim, expected, atol=1e-9)
    # k_sat: Sim_k ≥ θ_thr ⇔ k ≥ k* = ⌈sin²θ/(1 - θ_thr)⌉ on [a, b), and Sim = 1 elsewhere, so
    # k_sat = 1 if k* ≤ a, b if k* ≥ b, else k*   (θ_thr = 0.8, 0.9, 0.95, 0.99 → 1, 5, 9, 9)
    for threshold, expected_rank in ((0.8, 1), (0.9, 5), (0.95, b), (0.99, b)):
        k_star = math.ceil(math.sin(theta) ** 2 / (1 - threshold))
        assert expected_rank == (1 if k_star <= a else b if k_star >= b else k_star)
        assert spectral.saturation_rank(sim, threshold) == expected_rank
    # rotating the quantized features inside their full span keeps Sim_D = 1
    assert sim[-1] == pytest.approx(1.0, abs=1e-12)


def test_saturation_rank_edges():
    assert spectral.saturation_rank(np.ones(5)) == 1
    assert spectral.saturation_rank(np.array([1.0, 0.5, 0.96, 0.94, 1.0])) == 5
    assert spectral.saturation_rank(np.array([1.0, 0.9])) is None


def test_reconstruction_similarity_identity_curve():
    """Paper Eq. 8 with q = fp: ``x̂_k`` is the rank-k PCA reconstruction of x itself; its cosine to x,
    computed here directly, must equal the running-sum implementation for every k."""
    h, *_ = synthetic(seed=2)
    basis = spectral.eigenbasis(h)
    direct = []
    for k in range(1, D + 1):
        x_hat = spectral.reconstruct(h, basis, (1, k))
        cos = np.sum(x_hat * h, axis=1) / (np.linalg.norm(x_hat, axis=1) * np.linalg.norm(h, axis=1))
        direct.append(cos.mean())
    np.testing.assert_allclose(spectral.reconstruction_similarity(h, h, basis), direct, rtol=1e-10)
    assert direct[0] < direct[-1]


def test_band_and_interval_helpers():
    assert spectral.octave_intervals(768)[-1] == (512, 768)
    assert spectral.octave_intervals(12) == [(1, 1), (2, 3), (4, 7), (8, 12)]
    assert spectral.cumulative_intervals(12) == [(1, 1), (1, 2), (1, 4), (1, 8), (1, 12)]
    assert spectral.cumulative_intervals(8) == [(1, 1), (1, 2), (1, 4), (1, 8)]
    np.testing.assert_allclose(spectral.band_means(np.arange(1.0, 13.0), [(1, 1), (2, 3), (4, 7)]), [1, 2.5, 5.5])


def test_eigenbasis_needs_more_samples_than_dims():
    with pytest.raises(ValueError, match="more samples"):
        spectral.eigenbasis(np.random.default_rng(0).standard_normal((5, 5)))


# --------------------------------------------------------------------------------------------------
# Adaptive basis
# --------------------------------------------------------------------------------------------------


def zero_shot_problem(seed: int = 0, n: int = 300, d: int = 16, joint: int = 8, k: int = 6):
    rng = np.random.default_rng(seed)
    features = rng.standard_normal((n, d)) * np.geomspace(4, 0.2, d) + rng.standard_normal(d)
    head = rng.standard_normal((d, joint))
    text = rng.standard_normal((k, joint))
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    embedded = features @ head
    plain = 50.0 * (embedded / np.linalg.norm(embedded, axis=1, keepdims=True)) @ text.T
    labels = np.argmax(plain + 2.0 * rng.standard_normal(plain.shape), axis=1)  # imperfect accuracy
    return features, head, text, labels, plain


def test_all_ranks_reconstruction_reproduces_full_accuracy():
    """Cumulative D-rank subspace with the mean kept ⇒ ``h̃ = μ + VVᵀ(h - μ) = h``: logits equal the plain
    ones to 1e-6 and the accuracy is the plain accuracy (``scoring.md`` §3.3)."""
    features, head, text, labels, plain = zero_shot_problem()
    d = features.shape[1]
    basis = spectral.eigenbasis(features)
    logits = spectral.zero_shot_logits(spectral.reconstruct(features, basis, (1, d)), text, 50.0, head)
    np.testing.assert_allclose(logits, plain, atol=1e-6)

    plain_acc = float(np.mean(np.argmax(plain, axis=1) == labels))
    assert 0.2 < plain_acc < 1.0
    acc = spectral.subspace_accuracy(features, text, labels, 50.0, [(1, d), (1, 1), (2, 3)], head=head)
    assert acc[0] == plain_acc
    # a truncated subspace loses information; dropping the mean changes the result too
    assert acc[1] < plain_acc
    no_mean = spectral.subspace_accuracy(features, text, labels, 50.0, [(1, d)], head=head, keep_mean=False)
    assert no_mean[0] != plain_acc


def test_interval_reconstruction_keeps_only_its_band():
    """Features with the mean removed and projected on [a, b] have zero coordinates outside that band."""
    features, *_ = zero_shot_problem(seed=4)
    basis = spectral.eigenbasis(features)
    coords = (spectral.reconstruct(features, basis, (4, 7)) - basis.mean) @ basis.basis
    np.testing.assert_allclose(np.delete(coords, [3, 4, 5, 6], axis=1), 0, atol=1e-10)
    np.testing.assert_allclose(coords[:, 3:7], (features - basis.mean) @ basis.basis[:, 3:7], atol=1e-10)


def test_energy_deviation_closed_form():
    """``E(k) = Σ_{j≤k} s_j²/Σ s_j²`` from the chosen spectra; ΔE(D) = 0, q = fp ⇒ ΔE ≡ 0.
    Damping the tail of the quantized spectrum moves energy to the leading ranks (ΔE > 0 before D)."""
    h, u, _, v, s, mu, _ = synthetic()
    s_q = s * np.linspace(1.0, 0.3, D)
    h_q = mu + (u * s_q) @ v.T
    e_fp = np.cumsum(s**2) / np.sum(s**2)
    e_q = np.cumsum(s_q**2) / np.sum(s_q**2)

    sv_fp = spectral.eigenbasis(h).singular_values
    sv_q = spectral.eigenbasis(h_q).singular_values
    dev = spectral.energy_deviation(sv_fp, sv_q)
    np.testing.assert_allclose(dev.curve, e_q - e_fp, atol=1e-12)
    assert dev.curve[-1] == 0.0
    assert np.all(dev.curve[:-1] > 0)
    assert dev.csed == pytest.approx(np.mean(e_q - e_fp), abs=1e-12)
    assert dev.max_abs == pytest.approx(np.max(np.abs(e_q - e_fp)), abs=1e-12)
    same = spectral.energy_deviation(sv_fp, sv_fp)
    assert np.all(same.curve == 0) and same.csed == 0 and same.max_abs == 0


# --------------------------------------------------------------------------------------------------
# Fourier spectrum and RSE
# --------------------------------------------------------------------------------------------------


def test_rse_zero_for_identical_features_and_positive_otherwise():
    rng = np.random.default_rng(0)
    maps = rng.standard_normal((5, 8, 7, 7))
    a_fp = spectral.fourier_amplitude(maps)
    assert np.all(spectral.relative_spectral_error(a_fp, spectral.fourier_amplitude(maps.copy())) == 0)
    assert np.all(spectral.relative_spectral_error_complex(maps, maps.copy()) == 0)
    noisy = maps + 0.3 * rng.standard_normal(maps.shape)
    assert np.all(spectral.relative_spectral_error(a_fp, spectral.fourier_amplitude(noisy)) > 0)
    assert np.all(spectral.relative_spectral_error_complex(maps, noisy) > 0)


def test_fourier_constant_map_all_energy_at_dc():
    maps = np.full((2, 3, 4, 4), 2.5)
    a = spectral.fourier_amplitude(maps)
    assert spectral.dc_term(a) == pytest.approx(2.5 * 16)
    assert a[2, 2] == spectral.dc_term(a)
    assert np.count_nonzero(np.abs(a) > 1e-9) == 1
    assert np.all(spectral.fourier_amplitude(maps, demean=True) < 1e-9)


def test_fourier_checkerboard_peaks_at_nyquist_corner():
    """(-1)^(i+j) on an even grid is the (-H/2, -W/2) frequency, at index (0, 0) after fftshift."""
    i, j = np.indices((6, 6))
    maps = ((-1.0) ** (i + j))[None, None]
    a = spectral.fourier_amplitude(maps)
    assert np.unravel_index(np.argmax(a), a.shape) == (0, 0)
    assert a[0, 0] == pytest.approx(36)
    assert spectral.radial_bands(a).high > spectral.radial_bands(a).low


def test_fourier_symmetry_and_plane_wave():
    """Real input ⇒ ``A(u, v) = A(-u, -v)`` (index (H-i) mod H after the shift); a plane wave
    cos(2π·f·x/W) along the width puts half its amplitude sum at (0, ±f) from the centre."""
    rng = np.random.default_rng(1)
    a = spectral.fourier_amplitude(rng.standard_normal((3, 4, 8, 8)))
    flipped = a[(-np.arange(8)) % 8][:, (-np.arange(8)) % 8]
    np.testing.assert_allclose(a, flipped, rtol=1e-12)

    x = np.arange(8)
    wave = np.tile(np.cos(2 * np.pi * 2 * x / 8), (8, 1))[None, None]
    a = spectral.fourier_amplitude(wave)
    assert a[4, 4 + 2] == pytest.approx(32) and a[4, 4 - 2] == pytest.approx(32)
    assert np.sum(a) == pytest.approx(64)


def test_radial_profile_and_bands():
    spectrum = spectral.radial_index((7, 7)).astype(float)
    profile = spectral.radial_profile(spectrum)
    np.testing.assert_allclose(profile, np.arange(profile.size))
    bands = spectral.radial_bands(spectrum)
    assert bands.low < bands.mid < bands.high
    assert bands.mid == 2.0  # H' = 7: low r ≤ 1, high r ≥ ⌈7/2⌉ - 1 = 3, mid r = 2


def test_tokens_to_grid_row_major():
    tokens = np.arange(2 * 17 * 3, dtype=float).reshape(2, 17, 3)  # CLS + 4x4 patches, C = 3
    maps = spectral.tokens_to_grid(tokens, (4, 4))
    assert maps.shape == (2, 3, 4, 4)
    np.testing.assert_array_equal(maps[1, 2, 1, 3], tokens[1, 1 + 1 * 4 + 3, 2])
    with pytest.raises(ValueError):
        spectral.tokens_to_grid(tokens, (3, 3), prefix_tokens=1)


# --------------------------------------------------------------------------------------------------
# Feature taps on the tiny ViT (32 px, patch 8 → 4 x 4 grid)
# --------------------------------------------------------------------------------------------------


def hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_penultimate_tap_is_input_of_visual_proj():
    vlm = tiny_vlm()
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    before = hook_count(vlm.model)
    with torch.no_grad(), spectral.feature_taps(vlm, (spectral.PENULTIMATE, spectral.PATCH_TOKENS)) as taps:
        embedded = vlm.encode_image(images)
    assert hook_count(vlm.model) == before
    h = taps.features(spectral.PENULTIMATE)
    assert h.shape == (5, 64)
    projected = h @ vlm.model.visual.proj.detach()
    torch.testing.assert_close(projected / projected.norm(dim=1, keepdim=True), embedded, atol=1e-6, rtol=1e-5)
    # it is the CLS token after ln_post, not just any vector that projects right
    visual = vlm.model.visual
    with torch.no_grad():
        x = visual.ln_post(visual.transformer(visual._embeds(images)))
    torch.testing.assert_close(h, x[:, 0], atol=1e-6, rtol=1e-5)


def test_patch_tokens_tap_grid_reshape():
    vlm = tiny_vlm()
    assert spectral.patch_grid(vlm) == (4, 4)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    seen = []
    handle = vlm.model.visual.transformer.resblocks[-1].register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        with torch.no_grad(), spectral.feature_taps(vlm, (spectral.PATCH_TOKENS,)) as taps:
            vlm.encode_image(images)
    finally:
        handle.remove()
    maps = taps.features(spectral.PATCH_TOKENS)
    assert maps.shape == (3, 64, 4, 4)
    tokens = seen[0]  # (B, 1 + 16, C), batch-first; token 0 is CLS
    tokens = tokens - tokens.mean(dim=-1, keepdim=True)  # the tap keeps what ln_post keeps: no per-token channel mean
    torch.testing.assert_close(maps[:, :, 2, 1], tokens[:, 1 + 2 * 4 + 1, :])
    torch.testing.assert_close(maps[:, :, 0, 0], tokens[:, 1, :])
    torch.testing.assert_close(maps.mean(dim=1), torch.zeros(3, 4, 4), atol=1e-6, rtol=0)


def test_patch_tokens_tap_sees_through_an_exact_stream_rotation():
    """QuaRot's float re-parameterisation (centre, rotate, un-rotate before ln_post) must give RSE ~ 0."""
    from qbench.quant.rotation import rotate_model

    vlm = tiny_vlm()
    rotated = copy.deepcopy(vlm)
    rewrite_tower_attention(rotated, ("visual",))
    rotate_model(rotated, ("visual",), 0, online_hadamard=True)
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    amplitudes = []
    for model in (vlm, rotated):
        with torch.no_grad(), spectral.feature_taps(model, (spectral.PATCH_TOKENS,)) as taps:
            model.encode_image(images)
        amplitudes.append(spectral.fourier_amplitude(taps.features(spectral.PATCH_TOKENS).double().numpy()))
    rse = spectral.relative_spectral_error(*amplitudes)
    assert rse.max() < 1e-4
    # the raw output of the last block is in the rotated, centred basis: there the maps would differ
    raw = []
    for model in (vlm, rotated):
        seen = []
        handle = model.model.visual.transformer.resblocks[-1].register_forward_hook(lambda m, a, out: seen.append(out))
        with torch.no_grad():
            model.encode_image(images)
        handle.remove()
        raw.append(spectral.fourier_amplitude(spectral.tokens_to_grid(seen[0], (4, 4))))
    assert spectral.relative_spectral_error(*raw).mean() > 100 * rse.mean()


def test_taps_removed_on_error_and_record_nothing_outside():
    vlm = tiny_vlm()
    with pytest.raises(RuntimeError):
        with spectral.feature_taps(vlm) as taps:
            raise RuntimeError("boom")
    assert hook_count(vlm.model) == 0
    with torch.no_grad():
        vlm.encode_image(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="recorded nothing"):
        taps.features(spectral.PENULTIMATE)
    with pytest.raises(ValueError, match="unknown"):
        with spectral.feature_taps(vlm, ("logits",)):
            pass


# --------------------------------------------------------------------------------------------------
# Weight-dropout probe
# --------------------------------------------------------------------------------------------------


CLASSES = ["red circle", "blue square", "small star", "big photo", "green"]


def zero_shot_evaluator(images: torch.Tensor, labels: torch.Tensor):
    @torch.no_grad()
    def evaluate(model) -> float:
        head = model.zero_shot_head(CLASSES, ["a photo of a {}."])
        logits = model.logit_scale * model.encode_image(images).float().cpu() @ head.T
        return float((logits.argmax(dim=1) == labels).float().mean())

    return evaluate


def probe_setup():
    vlm = tiny_vlm()
    images = torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        head = vlm.zero_shot_head(CLASSES, ["a photo of a {}."])  # also fills the cache a copy must drop
        labels = (vlm.encode_image(images) @ head.T).argmax(dim=1)  # FP32 accuracy 1 by construction
    return vlm, zero_shot_evaluator(images, labels)


def test_dropout_probe_does_not_mutate_and_rate_zero_is_free():
    vlm, evaluate = probe_setup()
    state = {k: v.clone() for k, v in vlm.model.state_dict().items()}
    modules_before = [type(m) for m in vlm.model.modules()]

    result = spectral.weight_dropout_probe(evaluate, vlm, rates=(0.0, 0.5), seed=0, repeats=2)

    after = vlm.model.state_dict()
    assert state.keys() == after.keys()
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert [type(m) for m in vlm.model.modules()] == modules_before  # no attention rewrite on the input
    assert result.reference_accuracy == 1.0
    assert result.absolute_drop[0] == 0.0 and result.relative_drop[0] == 0.0
    assert result.kept_fractions[0] == (1.0, 1.0)
    assert result.absolute_drop[1] > 0  # half the weights gone: the tiny model no longer agrees with itself
    assert result.relative_drop[1] == pytest.approx(result.absolute_drop[1] / result.reference_accuracy)
    again = spectral.weight_dropout_probe(evaluate, vlm, rates=(0.5,), seed=0, repeats=2)
    assert again.accuracies[0] == result.accuracies[1]  # same seed ⇒ same masks ⇒ same accuracies


def test_dropout_targets_only_quantizer_weights():
    """p = 1 zeroes every target element and nothing else; p = 0.3 keeps ≈ 70 % within 6 sigma."""
    vlm = tiny_vlm()
    work = copy.deepcopy(vlm)
    rewrite_tower_attention(work, ("visual", "text"))
    reference = {k: v.clone() for k, v in work.model.state_dict().items()}
    targets = {name + ".weight" for name, _ in spectral.dropout_targets(work, ("visual", "text"))}
    assert "visual.transformer.resblocks.0.attn.q_proj.weight" in targets
    assert not any("ln_" in t or "embedding" in t for t in targets)

    kept = spectral.apply_weight_dropout(work, 1.0, seed=0)
    assert kept == 0.0
    state = work.model.state_dict()
    for key, value in state.items():
        if key in targets:
            assert torch.count_nonzero(value) == 0, key
        else:
            assert torch.equal(value, reference[key]), key

    total = sum(reference[t].numel() for t in targets)
    kept = spectral.apply_weight_dropout(work, 0.3, seed=0, originals={t[: -len(".weight")]: reference[t] for t in targets})
    assert abs(kept - 0.7) <= 6 * math.sqrt(0.3 * 0.7 / total)
    assert spectral.dropout_mask((50,), 0.3, 1, 0, "a").equal(spectral.dropout_mask((50,), 0.3, 1, 0, "a"))
    assert not spectral.dropout_mask((50,), 0.3, 1, 0, "a").equal(spectral.dropout_mask((50,), 0.3, 1, 1, "a"))
    assert spectral.mask_seed(0, 0, "x") == spectral.mask_seed(0, 0, "x") != spectral.mask_seed(0, 0, "y")


def test_dropout_probe_recomputes_cached_text_head():
    """Text-tower-only dropout must reach the zero-shot head: the input's cached FP32 head (copied by the
    deep copy) has to be dropped, otherwise the vision tower is untouched and nothing could change."""
    vlm, evaluate = probe_setup()
    result = spectral.weight_dropout_probe(evaluate, vlm, rates=(0.6,), seed=0, repeats=1, towers=("text",))
    assert result.absolute_drop[0] > 0


@pytest.mark.parametrize(
    "config, image_size, tap_module",
    [
        ("qbench-tiny-sigmoid", 32, "visual.ln_post"),  # avg-pooled ViT
        ("qbench-tiny-coca", 32, "visual.ln_post"),  # attentional pooler before ln_post
        ("qbench-tiny-convnext", 64, "visual.head.proj"),  # timm tower: input of head.proj
    ],
)
def test_penultimate_tap_other_tiny_towers(config, image_size, tap_module):
    """The tap, pushed through the tower's own head and normalised, gives back ``encode_image``."""
    import json
    from importlib import resources

    import open_clip

    from qbench.openclip_vlm import open_clip_vlm

    cfg = json.loads(resources.files("qbench").joinpath("model_configs", f"{config}.json").read_text())
    custom_text = cfg.pop("custom_text", False)
    torch.manual_seed(0)
    if "coca" in config:
        model = open_clip.CoCa(**cfg)
    elif custom_text:
        model = open_clip.CustomTextCLIP(**cfg)
    else:
        model = open_clip.CLIP(**cfg)
    vlm = open_clip_vlm(model, tokenizer=None, preprocess=None, name=config)
    assert spectral.penultimate_tap(vlm).module == tap_module
    images = torch.randn(3, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), spectral.feature_taps(vlm, (spectral.PENULTIMATE, spectral.PATCH_TOKENS)) as taps:
        embedded = vlm.encode_image(images)
        h = taps.features(spectral.PENULTIMATE)
        visual = model.visual
        projected = h @ visual.proj if isinstance(getattr(visual, "proj", None), torch.nn.Parameter) else visual.head.proj(h)
    torch.testing.assert_close(projected / projected.norm(dim=1, keepdim=True), embedded, atol=1e-6, rtol=1e-5)
    maps = taps.features(spectral.PATCH_TOKENS)
    assert maps.ndim == 4 and maps.shape[:2] == (3, 64)
    assert hook_count(model) == 0
