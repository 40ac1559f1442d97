"""Spectral and dropout suite tasks (``scoring.md`` §3-4): taps recorded in the single encoding pass, the
image heads that turn a penultimate tap back into the embedding, and the records of both tasks."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from qbench.analysis import spectral
from qbench.engine.batching import AdaptiveBatch
from qbench.data import ArrayImages, DatasetRequest
from qbench.errors import QbenchError
from qbench.engine.features import (PATCH_AMPLITUDE, EncodeCounter, FeatureCache, encode_dataset, image_key, pass_key,
                             pass_layout, tap_plan, tower_fingerprint)
from qbench.engine.ood_eval import IdClassifier
from qbench.engine.spectral_eval import (balanced_subset, dropout_task_outcome, image_head, spectral_task_outcome,
                                  text_head)
from qbench_plugins.tasks.dropout import DropoutTaskSpec
from qbench_plugins.tasks.spectral import SpectralTaskSpec

pytestmark = pytest.mark.usefixtures("single_thread")

TAPS = (spectral.PENULTIMATE, spectral.PATCH_TOKENS)
N_IMAGES = 240  # > D = 80 (toy ViT width), 24 per class


class Silent:
    def log(self, message):
        pass

    def track(self, items, description):
        return iter(items)


@pytest.fixture(scope="module")
def toy():
    from qbench_plugins.toyworld.plugin import load_toy_clip, toy_dataset

    from qbench.model import LoadRequest

    model = load_toy_clip(LoadRequest())
    dataset = toy_dataset("toy-id-test", "id-test", DatasetRequest(), n=N_IMAGES)
    return model, dataset


def encode(model, dataset, batch_size=64, taps=(), cache=None, counter=None, encoder=None):
    states = {"fp32": model}
    prints = {"fp32": tower_fingerprint(model, "visual")}
    counter = counter if counter is not None else EncodeCounter()
    return encode_dataset(dataset, states, prints, batch_size, cache or FeatureCache(None), Silent(), counter,
                          taps=taps, encoder=encoder)


@pytest.fixture(scope="module")
def tapped(toy):
    model, dataset = toy
    return encode(model, dataset, taps=TAPS)


def normalised(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def classifier_of(model, dataset) -> IdClassifier:
    head = text_head(model, dataset.classnames, dataset.templates)
    return IdClassifier(classnames=dataset.classnames, templates=dataset.templates,
                        heads={"fp32": head, "quantized": head},
                        logit_scales={"fp32": model.logit_scale, "quantized": model.logit_scale},
                        logit_biases={"fp32": None, "quantized": None})


# --------------------------------------------------------------------------------------------------
# Tap capture in the encoding pass
# --------------------------------------------------------------------------------------------------


def test_taps_leave_embeddings_unchanged_and_head_reproduces_encode_image(toy, tapped):
    model, dataset = toy
    plain = encode(model, dataset)
    assert plain.taps == {}
    assert torch.equal(plain.by_state["fp32"], tapped.by_state["fp32"])  # hooks record, never change outputs
    h = tapped.taps["fp32"][spectral.PENULTIMATE]
    assert h.shape == (N_IMAGES, 80)
    head = image_head(model)
    np.testing.assert_array_equal(head, model.model.visual.proj.detach().double().numpy())
    rebuilt = normalised(h.double().numpy() @ head)
    np.testing.assert_allclose(rebuilt, tapped.by_state["fp32"].double().numpy(), atol=1e-6)


def test_patch_amplitude_is_per_image_channel_mean_of_token_spectrum(toy, tapped):
    model, dataset = toy
    amplitude = tapped.taps["fp32"][PATCH_AMPLITUDE]
    assert amplitude.shape == (N_IMAGES, 4, 4)  # 32 px, patch 8
    pixels = torch.stack([model.preprocess(dataset.image(i)) for i in range(3)])
    with torch.no_grad(), spectral.feature_taps(model, (spectral.PATCH_TOKENS,)) as taps:
        model.encode_image(pixels)
    maps = taps.features(spectral.PATCH_TOKENS)
    for i in range(3):
        np.testing.assert_allclose(amplitude[i].numpy(), spectral.fourier_amplitude(maps[i:i + 1]), rtol=1e-6, atol=1e-6)
    # the image mean of the per-image maps is the spec's A(u, v) over those images
    np.testing.assert_allclose(amplitude[:3].double().numpy().mean(axis=0), spectral.fourier_amplitude(maps),
                               rtol=1e-6, atol=1e-6)


def test_taps_same_for_any_batch_size_and_from_the_disk_cache(toy, tapped, tmp_path):
    model, dataset = toy
    cache = FeatureCache(tmp_path)
    small = encode(model, dataset, batch_size=7, taps=TAPS, cache=cache)
    large = encode(model, dataset, batch_size=1000, taps=TAPS)
    for name in (spectral.PENULTIMATE, PATCH_AMPLITUDE):
        # bit-identical on the development machine, but a BLAS may pick its kernel by batch shape (the
        # embeddings after visual.proj do differ in the last bits there), so float32 rounding is allowed
        torch.testing.assert_close(small.taps["fp32"][name], large.taps["fp32"][name], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(small.taps["fp32"][name], tapped.taps["fp32"][name], rtol=1e-5, atol=1e-5)
    counter = EncodeCounter()
    again = encode(model, dataset, batch_size=7, taps=TAPS, cache=cache, counter=counter)
    assert counter.images == {} and counter.cache_hits["fp32"] == 1
    for name in (spectral.PENULTIMATE, PATCH_AMPLITUDE):
        assert torch.equal(again.taps["fp32"][name], small.taps["fp32"][name])
    assert torch.equal(again.by_state["fp32"], small.by_state["fp32"])


def test_feature_cache_without_taps_is_unchanged_and_taps_force_one_encode(toy, tmp_path):
    model, dataset = toy
    cache = FeatureCache(tmp_path)
    encode(model, dataset, cache=cache)
    feature_key = image_key(tower_fingerprint(model, "visual"), dataset.fingerprint, repr(model.preprocess),
                            pass_key(pass_layout(model)))
    assert [path.name for path in tmp_path.rglob("*.safetensors")] == [f"{feature_key}.safetensors"]
    counter = EncodeCounter()
    with_taps = encode(model, dataset, taps=(spectral.PENULTIMATE,), cache=cache, counter=counter)
    assert counter.images["fp32"] == N_IMAGES  # cached features, no cached taps: encoded again
    assert set(with_taps.taps["fp32"]) == {spectral.PENULTIMATE}
    counter = EncodeCounter()
    without = encode(model, dataset, cache=cache, counter=counter)
    assert counter.images == {} and without.taps == {}
    counter = EncodeCounter()
    encode(model, dataset, taps=TAPS, cache=cache, counter=counter)
    assert counter.images["fp32"] == N_IMAGES  # other tap names, other key


def test_out_of_memory_retry_leaves_no_partial_tap_records(toy):
    """A half-batch that fails after the taps fired must not leave its rows behind."""
    model, dataset = toy
    subset = ArrayImages("toy-small", dataset.images[:20], dataset.labels[:20], dataset.classnames, dataset.templates)
    reference = encode(model, subset, batch_size=4, taps=TAPS)
    failures = []

    def fail_large(_module, args, _out):
        if args[0].shape[0] > 4:
            failures.append(args[0].shape[0])
            raise RuntimeError("CUDA out of memory. Tried to allocate 1 GiB")

    handle = model.model.visual.register_forward_hook(fail_large)  # fires after every tap inside the tower
    try:
        encoder = AdaptiveBatch(16, Silent(), "image")
        retried = encode(model, subset, batch_size=16, taps=TAPS, encoder=encoder)
    finally:
        handle.remove()
    assert failures == [20, 10, 5] and encoder.size == 2  # one pass of the 20 images (no padding), halved
    for name in (spectral.PENULTIMATE, PATCH_AMPLITUDE):
        assert retried.taps["fp32"][name].shape[0] == 20
        torch.testing.assert_close(retried.taps["fp32"][name], reference.taps["fp32"][name], rtol=1e-5, atol=1e-5)


def test_tap_plan_for_towers_without_grid_or_penultimate():
    import json
    from importlib import resources

    import open_clip

    from qbench.model import VLM
    from qbench.openclip_vlm import open_clip_vlm

    cfg = json.loads(resources.files("qbench").joinpath("model_configs", "qbench-tiny-convnext.json").read_text())
    cfg.pop("custom_text", None)
    torch.manual_seed(0)
    convnext = open_clip_vlm(open_clip.CLIP(**cfg), tokenizer=None, preprocess=None, name="tiny-convnext")
    plan = tap_plan(convnext, TAPS)
    assert plan.recorded == (spectral.PENULTIMATE,)  # no patch grid: no patch amplitude, and no error
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), spectral.feature_taps(convnext, plan.hooks) as taps:
        embedded = convnext.encode_image(images).double().numpy()
    head = image_head(convnext)
    assert head.bias is None or head.bias.shape == (embedded.shape[1],)
    rebuilt = normalised(head(taps.features(spectral.PENULTIMATE).double().numpy()))
    np.testing.assert_allclose(rebuilt, embedded, atol=1e-6)

    no_tower = VLM(torch.nn.Linear(2, 2), tokenizer=None, preprocess=None, name="headless", tower_prefixes={})
    assert image_head(no_tower) is None
    with pytest.raises(QbenchError, match="'headless' has no penultimate") as error:
        tap_plan(no_tower, TAPS)
    assert "\n" not in str(error.value)


# --------------------------------------------------------------------------------------------------
# spectral task
# --------------------------------------------------------------------------------------------------


def record_identity(records):
    return [(record["metric"], record.get("param")) for record in records]


def by_identity(records):
    return {(record["metric"], record.get("param")): record for record in records}


def test_balanced_subset_takes_first_images_per_class():
    labels = np.array([0, 0, 1, 0, 2, 1, 1, 2, 0, 2])
    assert balanced_subset(labels, 6).tolist() == [0, 1, 2, 4, 5, 7]  # 2 per class, index order
    assert balanced_subset(labels, 4).tolist() == [0, 1, 2, 4]  # 2 per class, then truncated to 4
    assert balanced_subset(labels, 100).tolist() == list(range(10))


def test_identical_states_give_the_no_quantization_limits(toy, tapped):
    model, dataset = toy
    labels = dataset.labels[tapped.kept]
    state_taps = {name: value.numpy() for name, value in tapped.taps["fp32"].items()}
    taps = {"fp32": state_taps, "quantized": dict(state_taps)}
    classifier = classifier_of(model, dataset)
    head = image_head(model)
    task = SpectralTaskSpec("toy-id-test", max_images=200, fourier_images=50)
    records, section = spectral_task_outcome(task, taps, labels, classifier, {"fp32": head, "quantized": head})

    identity = record_identity(records)
    assert len(identity) == len(set(identity))
    table = by_identity(records)
    assert section["n_images"] == 200 and section["dim"] == 80 and section["notes"] == []
    for (metric, _), record in table.items():
        if metric == "sqnr_db":
            assert record["value"] is None  # +inf: no noise at all
        elif metric in ("spectral_distortion", "csed", "max_energy_deviation"):
            assert record["value"] == 0.0
        elif metric == "subspace_similarity":
            assert record["value"] == pytest.approx(1.0, abs=1e-9)
        elif metric == "rse":
            assert record["value"] in (0.0, None)  # the 4x4 grid has an empty mid band
        elif metric in ("subspace_accuracy", "dc_amplitude"):
            assert record["fp32"] == record["quantized"] and record["diff"] == 0.0
    assert table[("k_sat", "theta=0.95")]["value"] == 1
    assert table[("rse", "band=all")]["value"] == 0.0 and table[("rse", "band=mid")]["value"] is None
    assert {f"ranks={a}-{b}" for a, b in spectral.octave_intervals(80)} <= {p for m, p in identity if m == "sqnr_db"}
    assert section["fourier"]["grid"] == [4, 4] and section["fourier"]["n_images"] == 50
    assert section["fixed"]["sqnr_db"] == [None] * 80

    # cumulative full-rank subspace accuracy = plain zero-shot accuracy of the embeddings on the same images
    rows = balanced_subset(labels, 200)
    logits = model.logit_scale * tapped.by_state["fp32"].double().numpy()[rows] @ classifier.heads["fp32"].T
    plain = float(np.mean(logits.argmax(axis=1) == labels[rows]))
    assert table[("subspace_accuracy", "ranks=1-80")]["fp32"] == pytest.approx(plain, abs=1e-12)
    assert 0.3 < plain  # the toy model classifies its shapes: the equality is not 0 == 0
    assert table[("subspace_accuracy", "ranks=1-1")]["fp32"] < plain


def synthetic_features(n: int, sigmas: np.ndarray, noise_std: float, seed: int = 0):
    """FP32 features with principal standard deviations ``sigmas`` along a random orthonormal basis, and a
    quantized copy with i.i.d. Gaussian noise of standard deviation ``noise_std`` on every coordinate."""
    rng = np.random.default_rng(seed)
    d = sigmas.size
    rotation, _ = np.linalg.qr(rng.standard_normal((d, d)))
    h_fp = (rng.standard_normal((n, d)) * sigmas) @ rotation.T + 3.0
    h_q = h_fp + noise_std * rng.standard_normal((n, d))
    return h_fp, h_q


def test_per_rank_sqnr_matches_closed_form_for_isotropic_noise():
    """SQNR(k) = 10 log10((σ_k²/n) / τ²) for noise of variance τ² independent of the FP32 features.

    The FP32 basis V is a function of H_fp only, so the projected noise (H_q - H_fp)V has i.i.d. N(0, τ²)
    entries and its summed square is τ²·χ²_n: relative SD sqrt(2/n), i.e. 10/ln 10 · sqrt(2/n) dB
    (0.097 dB for n = 4000). The tolerance is 6 of those SDs per rank (16 ranks: a false failure has
    probability ~1e-8); the closed form spans 40 dB here, so a wrong projection or a wrong mean fails.
    """
    n, tau = 4000, 0.1
    sigmas = np.logspace(1, -1, 16)  # σ_k²/τ² from 10^4 down to 1: SQNR 40 dB → 0 dB
    h_fp, h_q = synthetic_features(n, sigmas, tau)
    labels = np.arange(n) % 4
    task = SpectralTaskSpec("synthetic", analyses=("fixed",), max_images=n)
    records, section = spectral_task_outcome(task, {"fp32": {"penultimate": h_fp}, "quantized": {"penultimate": h_q}},
                                             labels, None, {})
    singular = spectral.eigenbasis(h_fp).singular_values
    expected = 10 * np.log10(singular**2 / n / tau**2)
    tolerance = 6 * 10 / math.log(10) * math.sqrt(2 / n)
    measured = np.array(section["fixed"]["sqnr_db"])
    np.testing.assert_allclose(measured, expected, rtol=0, atol=tolerance)
    assert expected[0] - expected[-1] > 35
    table = by_identity(records)
    assert table[("sqnr_db", "ranks=4-7")]["value"] == pytest.approx(measured[3:7].mean())
    assert table[("sqnr_db", "ranks=all")]["value"] == pytest.approx(measured.mean())
    assert section["adaptive"] is None and section["fourier"] is None
    assert table[("spectral_distortion", "ranks=16-16")]["value"] > 0  # noise lifts the weakest rank


def synthetic_classifier(d: int, k: int, rolled: bool = False) -> IdClassifier:
    """Class k's text embedding is basis vector k; ``rolled`` gives the quantized state other class texts."""
    text = np.eye(k, d)
    return IdClassifier(classnames=tuple("abcdefgh"[:k]), templates=("{}",),
                        heads={"fp32": text, "quantized": np.roll(text, 1, axis=0) if rolled else text},
                        logit_scales={"fp32": 10.0, "quantized": 20.0}, logit_biases={"fp32": None, "quantized": None})


def test_few_images_give_a_note_not_an_error():
    h_fp, h_q = synthetic_features(12, np.linspace(2, 1, 16), 0.01)
    labels = np.arange(12) % 3
    task = SpectralTaskSpec("synthetic", analyses=("fixed", "adaptive"), max_images=100)
    records, section = spectral_task_outcome(task, {"fp32": {"penultimate": h_fp}, "quantized": {"penultimate": h_q}},
                                             labels, synthetic_classifier(16, 3), {})
    assert section["n_images"] == 12
    assert any("do not exceed D = 16" in note for note in section["notes"])
    assert len(section["fixed"]["similarity"]) == 16 and len(section["adaptive"]["energy_deviation"]) == 16
    assert section["adaptive"]["energy_fp"][-1] == 1.0
    assert ("subspace_accuracy", "ranks=1-16") in record_identity(records)


def test_subspace_accuracy_scores_each_state_with_its_own_text_head():
    """Full-rank reconstruction is the features themselves, so the accuracy is the plain zero-shot accuracy
    with that state's classifier: a quantized text head with the classes shifted by one must show up."""
    rng = np.random.default_rng(3)
    labels = np.arange(300) % 4
    h = 0.3 * rng.standard_normal((300, 8))
    h[np.arange(300), labels] += 2.0  # feature dimension = class: the FP32 classifier is nearly perfect
    task = SpectralTaskSpec("synthetic", analyses=("adaptive",), max_images=300)
    records, section = spectral_task_outcome(task, {"fp32": {"penultimate": h}, "quantized": {"penultimate": h}},
                                             labels, synthetic_classifier(8, 4, rolled=True), {})
    full = by_identity(records)[("subspace_accuracy", "ranks=1-8")]
    rolled_predictions = (h @ np.roll(np.eye(4, 8), 1, axis=0).T).argmax(axis=1)
    assert full["fp32"] == float(np.mean(h[:, :4].argmax(axis=1) == labels)) > 0.9
    assert full["quantized"] == float(np.mean(rolled_predictions == labels)) < 0.1
    assert full["delta"] == pytest.approx((full["fp32"] - full["quantized"]) / full["fp32"])
    assert by_identity(records)[("csed", None)]["value"] == 0.0  # same features: same spectrum
    assert section["fixed"] is None and section["adaptive"]["intervals"][0] == [1, 1]


def test_fourier_without_patch_amplitude_says_why(toy, tapped):
    model, dataset = toy
    h = tapped.taps["fp32"][spectral.PENULTIMATE].numpy()
    task = SpectralTaskSpec("toy-id-test", analyses=("fourier",))
    records, section = spectral_task_outcome(task, {"fp32": {"penultimate": h}, "quantized": {"penultimate": h}},
                                             dataset.labels[tapped.kept], None, {})
    assert records == [] and section["fourier"] is None
    assert "no patch-token grid" in section["notes"][0]


# --------------------------------------------------------------------------------------------------
# dropout task
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preload", [True, False])
def test_dropout_rate_zero_is_free_and_the_model_is_untouched(toy, preload, monkeypatch):
    model, dataset = toy
    if not preload:
        monkeypatch.setattr("qbench.engine.spectral_eval.PRELOAD_BYTES", 0)
    before = {name: value.clone() for name, value in model.model.state_dict().items()}
    modules_before = [type(module) for module in model.modules()]
    task = DropoutTaskSpec("toy-id-test", rates=(0.0, 0.6), repeats=2, max_images=60)
    records, section = dropout_task_outcome(task, model, dataset, batch_size=32, workers=0, seed=0, progress=Silent())

    after = model.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[key], after[key]) for key in before)
    assert [type(module) for module in model.modules()] == modules_before
    identity = record_identity(records)
    assert identity == [("dropout_accuracy", "p=0.00"), ("dropout_delta", "p=0.00"),
                        ("dropout_accuracy", "p=0.60"), ("dropout_delta", "p=0.60")]
    table = by_identity(records)
    assert table[("dropout_delta", "p=0.00")]["value"] == 0.0
    assert table[("dropout_accuracy", "p=0.00")]["value"] == section["reference_accuracy"]
    assert all(record["fp32"] is None and record["quantized"] is None for record in records)
    assert table[("dropout_accuracy", "p=0.60")]["value"] < section["reference_accuracy"]
    assert section["n_images"] == 60 and section["preloaded"] is preload
    assert section["kept_fractions"][0] == [1.0, 1.0] and len(section["accuracies"][1]) == 2

    # the reference is the FP32 model's plain zero-shot accuracy on the class-balanced subset
    rows = balanced_subset(dataset.labels, 60)
    pixels = torch.stack([model.preprocess(dataset.image(int(i))) for i in rows])
    with torch.no_grad():
        embeddings = model.encode_image(pixels).double().numpy()
    head = text_head(model, dataset.classnames, dataset.templates)
    plain = float(np.mean((embeddings @ head.T).argmax(axis=1) == dataset.labels[rows]))
    assert section["reference_accuracy"] == pytest.approx(plain, abs=1 / 60 + 1e-12)  # rewrite: ~1e-6 logit changes


def test_dropout_vision_only_reuses_one_text_head(toy, monkeypatch):
    model, dataset = toy
    calls = []
    import qbench.engine.spectral_eval as spectral_eval

    original = spectral_eval.text_head
    monkeypatch.setattr(spectral_eval, "text_head", lambda *args: calls.append(1) or original(*args))
    task = DropoutTaskSpec("toy-id-test", rates=(0.3,), repeats=1, towers=("visual",), max_images=30)
    records, section = dropout_task_outcome(task, copy.deepcopy(model), dataset, batch_size=32, workers=0, seed=1,
                                            progress=Silent())
    assert len(calls) == 1 and section["towers"] == ["visual"]
    assert len(records) == 2


def test_align_penultimate_tap_is_its_pooled_embedding(tmp_path):
    """ALIGN (scoring.md §3.1): the penultimate feature is the pooled embedding itself, head = identity."""
    from tests.test_zoo_end_to_end import tiny_family_model

    from qbench.analysis import spectral
    from qbench.engine.features import has_patch_grid
    from qbench.engine.spectral_eval import image_head

    vlm, size = tiny_family_model("align", tmp_path)
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), spectral.feature_taps(vlm, (spectral.PENULTIMATE,)) as taps:
        embedded = vlm.encode_image(images)
    pooled = taps.features(spectral.PENULTIMATE)
    torch.testing.assert_close(pooled / pooled.norm(dim=1, keepdim=True), embedded.float())  # encode_image normalises
    assert image_head(vlm) is None and not has_patch_grid(vlm)
