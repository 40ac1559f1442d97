"""Tests for qbench.engine.corruptions (on-the-fly corruptions, suites.md §3.3) and qbench.analysis.robustness (the §2.6 spurious-gap metrics)."""

from __future__ import annotations

import colorsys
import warnings

import numpy as np
import pytest
from PIL import Image

from qbench.engine import corruptions as C
from qbench.analysis import robustness as R
from qbench.data import ArrayImages, FileImages, UnreadableImage
from qbench.errors import QbenchError

SIZE = 64  # small resize target keeps the tests fast; 224 is exercised once


def _imagecorruptions():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import imagecorruptions
    return imagecorruptions


def textured_base(n: int = 3, seed: int = 0, side: int = 32) -> ArrayImages:
    """Mid-grey images with a smooth colour gradient plus moderate texture (no saturated pixels)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side] / (side - 1)
    images = []
    for _ in range(n):
        smooth = np.stack([90 + 60 * x, 100 + 50 * y, 110 + 40 * (1 - x)], axis=-1)
        texture = rng.normal(0, 20, size=(side, side, 3))
        images.append(np.clip(smooth + texture, 0, 255).astype(np.uint8))
    return ArrayImages("tex", np.stack(images), list(range(n)), [f"class {i}" for i in range(n)], ["a {}."])


def high_frequency_energy(image: np.ndarray) -> float:
    """Mean absolute difference between horizontally and vertically adjacent pixels."""
    a = image.astype(np.float64)
    return float(np.abs(np.diff(a, axis=0)).mean() + np.abs(np.diff(a, axis=1)).mean())


def mean_value_channel(image: np.ndarray) -> float:
    """Mean HSV value (max over RGB) in [0, 1]."""
    return float((image.astype(np.float64).max(axis=-1) / 255.0).mean())


def resized(base: ArrayImages, index: int, size: int = SIZE) -> np.ndarray:
    return np.asarray(base.image(index).resize((size, size), Image.Resampling.BICUBIC))


# --------------------------------------------------------------------------------------------------
# Constants and validation
# --------------------------------------------------------------------------------------------------


def test_suite_constants_match_spec_and_toy_world():
    from qbench_plugins.toyworld import plugin

    assert C.STUDY_CORRUPTIONS == ("gaussian_noise", "defocus_blur", "brightness", "contrast")
    assert C.STUDY_SEVERITY == 3
    assert C.STUDY_CORRUPTIONS == plugin.SHIFT_CORRUPTIONS
    assert C.STUDY_SEVERITY == plugin.SHIFT_SEVERITY


def test_corruption_ids_are_the_package_numbers():
    names = _imagecorruptions().get_corruption_names("all")
    for corruption in C.STUDY_CORRUPTIONS:
        assert C.corruption_id(corruption) == names.index(corruption)
    assert C.corruption_id("gaussian_noise") == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"corruption": "rain"},
        {"corruption": "contrast", "severity": 0},
        {"corruption": "contrast", "severity": 6},
        {"corruption": "contrast", "seed": -1},
        {"corruption": "contrast", "size": 31},
        {"corruption": "contrast", "interpolation": "cubic-ish"},
    ],
)
def test_bad_arguments_are_one_line_errors(kwargs):
    with pytest.raises(QbenchError) as caught:
        C.CorruptedImages(textured_base(1), **kwargs)
    assert "\n" not in str(caught.value)


def test_below_32_px_is_a_one_line_size_error_and_32_px_works():
    small = ArrayImages("small", np.full((1, 31, 31, 3), 128, np.uint8), [0], ["a"], ["{}"])
    with pytest.raises(QbenchError, match="at least 32x32") as caught:
        C.CorruptedImages(small, "contrast", size=None).image(0)
    assert "\n" not in str(caught.value)
    ok = ArrayImages("ok", np.full((1, 32, 32, 3), 128, np.uint8), [0], ["a"], ["{}"])
    assert C.CorruptedImages(ok, "contrast", size=None).array(0).shape == (32, 32, 3)
    # the suite pipeline resizes first, so a 31 px base is fine there
    assert C.CorruptedImages(small, "contrast", size=SIZE).array(0).shape == (SIZE, SIZE, 3)


# --------------------------------------------------------------------------------------------------
# Determinism and the global RNG
# --------------------------------------------------------------------------------------------------


def test_gaussian_noise_same_seed_identical_other_seed_different():
    base = textured_base(2)
    first = C.CorruptedImages(base, "gaussian_noise", 3, seed=0, size=SIZE)
    again = C.CorruptedImages(base, "gaussian_noise", 3, seed=0, size=SIZE)
    other = C.CorruptedImages(base, "gaussian_noise", 3, seed=1, size=SIZE)
    for index in range(2):
        np.testing.assert_array_equal(first.array(index), again.array(index))
        assert not np.array_equal(first.array(index), other.array(index))
    # order of access does not matter: image 1 first, then image 0
    reordered = C.CorruptedImages(base, "gaussian_noise", 3, seed=0, size=SIZE)
    late = reordered.array(1), reordered.array(0)
    np.testing.assert_array_equal(late[0], first.array(1))
    np.testing.assert_array_equal(late[1], first.array(0))


def test_noise_differs_between_indices_of_identical_images():
    same = np.repeat(textured_base(1).images, 2, axis=0)
    base = ArrayImages("twins", same, [0, 0], ["a"], ["{}"])
    corrupted = C.CorruptedImages(base, "gaussian_noise", size=SIZE)
    assert not np.array_equal(corrupted.array(0), corrupted.array(1))


def test_noise_uses_seed_sequence_of_seed_corruption_id_index():
    base = textured_base(4)
    seed, index = 5, 3
    expected_input = resized(base, index)
    state = np.random.RandomState(np.random.MT19937(np.random.SeedSequence([seed, C.corruption_id("gaussian_noise"), index])))
    saved = np.random.get_state()
    np.random.set_state(state.get_state())
    try:
        expected = _imagecorruptions().corrupt(expected_input, corruption_name="gaussian_noise", severity=3)
    finally:
        np.random.set_state(saved)
    got = C.CorruptedImages(base, "gaussian_noise", 3, seed=seed, size=SIZE).array(index)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("corruption", ["defocus_blur", "brightness", "contrast"])
def test_deterministic_corruptions_ignore_the_seed(corruption):
    base = textured_base(2)
    a = C.CorruptedImages(base, corruption, seed=0, size=SIZE)
    b = C.CorruptedImages(base, corruption, seed=123, size=SIZE)
    for index in range(2):
        np.testing.assert_array_equal(a.array(index), b.array(index))
    assert a.fingerprint != b.fingerprint  # the seed is still part of the cache key


@pytest.mark.parametrize("corruption", C.STUDY_CORRUPTIONS)
def test_global_numpy_rng_state_is_unchanged_and_irrelevant(corruption):
    base = textured_base(1)
    corrupted = C.CorruptedImages(base, corruption, size=SIZE)
    np.random.seed(7)
    np.random.standard_normal()  # leaves a cached Gaussian in the legacy state too
    before = np.random.get_state()
    out_a = corrupted.array(0)
    after = np.random.get_state()
    assert before[0] == after[0]
    np.testing.assert_array_equal(before[1], after[1])
    assert before[2:] == after[2:]
    np.random.seed(99999)  # a different caller state must not change the corrupted pixels
    np.testing.assert_array_equal(corrupted.array(0), out_a)


def test_rng_state_is_restored_when_the_corruption_fails(monkeypatch):
    base = textured_base(1)
    corrupted = C.CorruptedImages(base, "gaussian_noise", size=SIZE)
    package = _imagecorruptions()

    def broken(image, corruption_name, severity):
        np.random.random(10)  # consume some of the seeded state, then fail
        raise ValueError("boom\nsecond line")

    monkeypatch.setattr(package, "corrupt", broken)
    np.random.seed(3)
    before = np.random.get_state()
    with pytest.raises(QbenchError, match="boom") as caught:
        corrupted.array(0)
    assert "\n" not in str(caught.value)
    np.testing.assert_array_equal(np.random.get_state()[1], before[1])
    assert np.random.get_state()[2] == before[2]


# --------------------------------------------------------------------------------------------------
# Resize, then corrupt
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("corruption", ["defocus_blur", "gaussian_noise"])
def test_resize_happens_before_the_corruption(corruption):
    base = textured_base(2)
    corrupted = C.CorruptedImages(base, corruption, seed=0, size=SIZE)
    index = 1
    got = corrupted.array(index)
    assert got.shape == (SIZE, SIZE, 3)
    resize_then_corrupt = C.corrupt_array(resized(base, index), corruption, 3, 0, index)
    np.testing.assert_array_equal(got, resize_then_corrupt)
    at_32 = C.corrupt_array(base.images[index], corruption, 3, 0, index)
    corrupt_then_resize = np.asarray(Image.fromarray(at_32).resize((SIZE, SIZE), Image.Resampling.BICUBIC))
    assert np.abs(got.astype(int) - corrupt_then_resize.astype(int)).mean() > 2.0


def test_default_size_is_224_bicubic():
    base = textured_base(1)
    corrupted = C.CorruptedImages(base, "contrast")
    got = corrupted.array(0)
    assert got.shape == (224, 224, 3)
    np.testing.assert_array_equal(got, C.corrupt_array(resized(base, 0, 224), "contrast", 3, 0, 0))
    assert isinstance(corrupted.image(0), Image.Image) and corrupted.image(0).size == (224, 224)


def test_non_square_base_is_resized_on_the_short_side_and_centre_cropped():
    rng = np.random.default_rng(1)
    wide = rng.integers(0, 256, size=(40, 80, 3), dtype=np.uint8)
    image = C.resize_for_corruption(Image.fromarray(wide), SIZE)
    assert image.size == (SIZE, SIZE)
    full = np.asarray(Image.fromarray(wide).resize((128, SIZE), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(np.asarray(image), full[:, 32:96])


# --------------------------------------------------------------------------------------------------
# Direction of each corruption
# --------------------------------------------------------------------------------------------------


def test_brightness_raises_the_hsv_value_channel():
    base = textured_base(2)
    for index in range(2):
        clean = resized(base, index)
        out = C.CorruptedImages(base, "brightness", size=SIZE).array(index)
        assert mean_value_channel(out) > mean_value_channel(clean) + 0.2  # +0.3 on V, minus clipping
        # check the definition on one pixel through colorsys as an independent HSV reference
        h, s, v = colorsys.rgb_to_hsv(*(clean[5, 5] / 255.0))
        assert colorsys.rgb_to_hsv(*(out[5, 5] / 255.0))[2] == pytest.approx(min(1.0, v + 0.3), abs=2 / 255)


def test_contrast_lowers_the_standard_deviation_and_keeps_the_mean():
    base = textured_base(2)
    for index in range(2):
        clean = resized(base, index).astype(np.float64)
        out = C.CorruptedImages(base, "contrast", size=SIZE).array(index).astype(np.float64)
        assert out.std() < 0.3 * clean.std()  # factor 0.2 at severity 3, plus uint8 truncation
        assert abs(out.mean() - clean.mean()) < 3.0


def test_gaussian_noise_adds_zero_mean_noise_of_about_0_18():
    grey = ArrayImages("grey", np.full((1, 32, 32, 3), 128, np.uint8), [0], ["a"], ["{}"])
    out = C.CorruptedImages(grey, "gaussian_noise", size=SIZE).array(0).astype(np.float64) / 255.0
    noise = out - 128 / 255.0
    assert noise.std() == pytest.approx(0.18, abs=0.02)
    assert abs(noise.mean()) < 0.02  # uint8 truncation biases by < 1/255


def test_defocus_blur_removes_high_frequencies():
    base = textured_base(2)
    for index in range(2):
        clean = resized(base, index)
        out = C.CorruptedImages(base, "defocus_blur", size=SIZE).array(index)
        assert high_frequency_energy(out) < 0.5 * high_frequency_energy(clean)


# --------------------------------------------------------------------------------------------------
# Split contract: labels, fingerprints, unreadable files
# --------------------------------------------------------------------------------------------------


def test_split_metadata_and_fingerprints():
    base = textured_base(3)
    corrupted = C.CorruptedImages(base, "contrast", size=SIZE)
    assert len(corrupted) == len(base)
    np.testing.assert_array_equal(corrupted.labels, base.labels)
    assert corrupted.classnames == base.classnames and corrupted.templates == base.templates
    fingerprints = {
        C.CorruptedImages(base, "contrast", size=SIZE).fingerprint,
        C.CorruptedImages(base, "brightness", size=SIZE).fingerprint,
        C.CorruptedImages(base, "contrast", severity=2, size=SIZE).fingerprint,
        C.CorruptedImages(base, "contrast", seed=1, size=SIZE).fingerprint,
        C.CorruptedImages(base, "contrast", size=SIZE + 1).fingerprint,
        C.CorruptedImages(textured_base(3, seed=1), "contrast", size=SIZE).fingerprint,
        base.fingerprint,
    }
    assert len(fingerprints) == 7
    assert corrupted.fingerprint == C.CorruptedImages(base, "contrast", size=SIZE).fingerprint
    suite = C.corrupted_splits(base, size=SIZE)
    assert tuple(suite) == C.STUDY_CORRUPTIONS
    assert all(split.severity == 3 for split in suite.values())


def test_unreadable_base_image_propagates(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(textured_base(1).images[0]).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png at all")
    base = FileImages("files", tmp_path, [good, bad], [0, 1], ["a", "b"], ["{}"])
    corrupted = C.CorruptedImages(base, "brightness", size=SIZE)
    assert corrupted.array(0).shape == (SIZE, SIZE, 3)
    with pytest.raises(UnreadableImage) as caught:
        corrupted.image(1)
    assert caught.value.path == bad
    with pytest.raises(IndexError):
        corrupted.array(2)


# --------------------------------------------------------------------------------------------------
# scoring.md §2.6 metrics
# --------------------------------------------------------------------------------------------------


def test_metrics_on_a_hand_computed_case():
    # FP32: A_N = 0.8, A_C = 0.5; quantized: A_N = 0.6, A_C = 0.3
    assert R.relative_change(0.8, 0.6) == pytest.approx(0.25, abs=1e-15)
    assert R.relative_spurious_gap(0.8, 0.5) == pytest.approx(0.375, abs=1e-15)
    assert R.relative_spurious_gap(0.6, 0.3) == pytest.approx(0.5, abs=1e-15)
    assert R.delta_rsg(0.8, 0.5, 0.6, 0.3) == pytest.approx(0.125, abs=1e-15)
    assert R.added_vulnerability(0.8, 0.5, 0.6, 0.3) == pytest.approx(0.4 - 0.25, abs=1e-15)
    assert R.delta_rsg_identity(0.375, 0.15, 0.25) == pytest.approx(0.125, abs=1e-15)
    gap = R.spurious_gap(0.8, 0.5, 0.6, 0.3)
    assert (gap.delta_common, gap.delta_counter) == pytest.approx((0.25, 0.4), abs=1e-15)
    assert gap.delta_rsg == pytest.approx(0.125, abs=1e-15) and gap.v_add == pytest.approx(0.15, abs=1e-15)
    assert abs(gap.identity_residual) <= 1e-12


def test_signs_follow_the_spec():
    assert R.relative_change(0.8, 0.7) > 0  # lost accuracy
    assert R.relative_change(0.8, 0.9) < 0
    assert R.delta_rsg(0.8, 0.6, 0.8, 0.4) > 0  # counter group dropped: gap widened
    assert R.added_vulnerability(0.8, 0.6, 0.8, 0.4) > 0


def test_identity_holds_to_1e_12_on_random_inputs():
    rng = np.random.default_rng(2024)
    worst = 0.0
    for fp_n, fp_c, q_n, q_c in rng.uniform(0.01, 1.0, size=(2000, 4)):
        rsg_fp = R.relative_spurious_gap(fp_n, fp_c)
        d_n = R.relative_change(fp_n, q_n)
        lhs = R.delta_rsg(fp_n, fp_c, q_n, q_c)
        rhs = R.delta_rsg_identity(rsg_fp, R.added_vulnerability(fp_n, fp_c, q_n, q_c), d_n)
        worst = max(worst, abs(lhs - rhs))
    assert worst <= 1e-12


def test_equal_models_and_common_scaling_give_zero():
    rng = np.random.default_rng(5)
    for fp_n, fp_c, factor in rng.uniform(0.05, 1.0, size=(200, 3)):
        assert R.delta_rsg(fp_n, fp_c, fp_n, fp_c) == 0.0
        assert R.added_vulnerability(fp_n, fp_c, fp_n, fp_c) == 0.0
        assert R.delta_rsg(fp_n, fp_c, factor * fp_n, factor * fp_c) == pytest.approx(0.0, abs=1e-12)
        assert R.added_vulnerability(fp_n, fp_c, factor * fp_n, factor * fp_c) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(
    "call",
    [
        lambda: R.relative_change(0.0, 0.3),
        lambda: R.relative_spurious_gap(0.0, 0.2),
        lambda: R.delta_rsg(0.0, 0.2, 0.5, 0.2),  # A_N(fp) = 0
        lambda: R.delta_rsg(0.5, 0.2, 0.0, 0.2),  # A_N(q) = 0
        lambda: R.added_vulnerability(0.5, 0.0, 0.5, 0.1),  # A_C(fp) = 0
        lambda: R.added_vulnerability(0.0, 0.5, 0.1, 0.5),  # A_N(fp) = 0
        lambda: R.delta_rsg_identity(0.3, 0.1, 1.0),  # δ_N = 1
        lambda: R.relative_change(float("nan"), 0.3),
    ],
)
def test_zero_cases_are_one_line_errors(call):
    with pytest.raises(QbenchError) as caught:
        call()
    assert "\n" not in str(caught.value)


def test_zero_cases_are_null_in_the_stored_summary():
    gap = R.spurious_gap(0.8, 0.0, 0.6, 0.1)  # A_C(fp) = 0: δ_C and V_add undefined, RSG defined
    assert gap.delta_counter is None and gap.v_add is None and gap.identity_residual is None
    assert gap.rsg_fp == 1.0 and gap.delta_rsg == pytest.approx(R.relative_spurious_gap(0.6, 0.1) - 1.0)
    gap = R.spurious_gap(0.8, 0.5, 0.0, 0.0)  # quantized model collapsed
    assert gap.rsg_q is None and gap.delta_rsg is None and gap.delta_common == 1.0 and gap.identity_residual is None
    gap = R.spurious_gap(0.0, 0.0, 0.0, 0.0)
    assert all(value is None for value in (gap.delta_common, gap.delta_counter, gap.rsg_fp, gap.rsg_q, gap.delta_rsg, gap.v_add))


def test_pixel_cache_serves_corrupted_images_without_recomputing(tmp_path, monkeypatch):
    from qbench.data import ArrayImages

    rng = np.random.default_rng(0)
    base = ArrayImages("base", rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8), np.array([0, 1, 0]), ("a", "b"), ("{}",))
    split = C.CorruptedImages(base, "gaussian_noise", 3, 0, size=40).with_pixel_cache(tmp_path)
    first = [split.array(i) for i in range(3)]
    files = sorted((tmp_path / split.fingerprint).glob("*.safetensors"))
    assert [path.name for path in files] == ["0000000.safetensors", "0000001.safetensors", "0000002.safetensors"]

    def refuse(*args, **kwargs):
        raise AssertionError("corrupted again although the pixel cache has the image")

    monkeypatch.setattr(C, "corrupt_array", refuse)
    again = C.CorruptedImages(base, "gaussian_noise", 3, 0, size=40).with_pixel_cache(tmp_path)
    assert all(np.array_equal(a, b) for a, b in zip(first, (again.array(i) for i in range(3))))
    assert again.fingerprint == split.fingerprint and split.at_size(40).pixel_cache == tmp_path
    monkeypatch.undo()
    files[1].write_bytes(b"damaged")  # a damaged entry is recomputed and rewritten, never fatal
    assert np.array_equal(again.array(1), first[1]) and C._read_pixels(files[1], again._pixel_key(1), 40) is not None
    other_seed = C.CorruptedImages(base, "gaussian_noise", 3, 1, size=40).with_pixel_cache(tmp_path)
    assert not np.array_equal(other_seed.array(0), first[0])  # a different seed is a different key
