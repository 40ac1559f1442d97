"""P1 (issue 16 items 0-1): every image passes through each encoder state exactly once per run, ``encoder_calls``
counts what the towers ran (it equals a forward hook the test installs itself), and the distinct-value verification
rides on the quantized state's own evaluation passes instead of a pass of its own."""

from __future__ import annotations

import copy
import dataclasses
import json
from collections import Counter
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import pytest
import torch

from qbench.data import ArrayImages, DatasetRequest
from qbench.engine import evaluate
from qbench.engine.batching import LEADING_CHUNK, NUMERIC_BATCH, AdaptiveBatch, FixedChunks
from qbench.engine.evaluate import VERIFICATION_BATCH, EvalRequest, resolve, run
from qbench.engine.features import (TEXT_BATCH, EncodeCounter, FeatureCache, _key, encode_dataset, tower_fingerprint,
                                    tower_module)
from qbench.plugins import get_plugin_manager
from qbench.quant import verify
from qbench.quant.verify import _Stats, verify_quantized
from qbench.registry import build_registry

pytestmark = pytest.mark.usefixtures("single_thread")

FIVE_SUITES = ("toy-id", "toy-ood", "robustness", "spurious", "spectral")
LIMIT = 40
"""Images per split: not a multiple of the 32-image pass, so every split ends in a short pass."""


def registry():
    return build_registry(get_plugin_manager(load_entrypoints=False))


class TowerHooks:
    """The test's own count: a forward hook on each state's image tower (``model.visual``) and on its token
    embedding (the first module of the text side), counting the batch rows of every completed call of exactly
    that module (a deep copy, e.g. the dropout probe's model, inherits the hook but is not the state)."""

    def __init__(self) -> None:
        self.images: Counter = Counter()
        self.texts: Counter = Counter()
        self.handles: list = []
        self.watched: set[int] = set()
        self.models: dict[str, object] = {}

    def watch(self, state: str, vlm) -> None:
        """Hook ``vlm``'s towers for ``state``; a module already hooked for another state (a baseline that is the
        float model itself) is not hooked twice, so its passes count once."""
        self.models[state] = vlm
        for module, bucket in ((vlm.model.visual, self.images), (vlm.model.token_embedding, self.texts)):
            if id(module) in self.watched:
                continue
            self.watched.add(id(module))

            def hook(called, args, output, target=module, bucket=bucket, state=state):
                if called is target:
                    bucket[state] += args[0].shape[0]

            self.handles.append(module.register_forward_hook(hook))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@contextmanager
def hooked_run(**settings) -> Iterator[tuple[TowerHooks, list]]:
    """Patch ``evaluate.obtain_quantized`` so the test hooks both states right after quantization (calibration
    passes belong to quantizing, not to the evaluation); yields the hooks and a list that receives the document."""
    hooks, documents = TowerHooks(), []
    original = evaluate.obtain_quantized

    def obtain(resolved, fp32, calibration, progress, reuse=None):
        quantized = original(resolved, fp32, calibration, progress, reuse)
        hooks.watch("fp32", fp32)
        hooks.watch("quantized", quantized.model)
        return quantized

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluate, "obtain_quantized", obtain)
        try:
            request = EvalRequest(limit=LIMIT, proxy_n=64, **settings)
            documents.append(run(resolve(request, registry())))
            yield hooks, documents
        finally:
            hooks.remove()


def scored(document) -> int:
    return sum(info["num_scored"] for info in document["datasets"].values())


def assert_one_pass_per_image(document, hooks: TowerHooks, states: tuple[str, ...]) -> None:
    """Per state: the test's hook counted exactly the scored images (the others none), per dataset too, and the
    document's ``encoder_calls`` says the same."""
    total = scored(document)
    assert total == LIMIT * len(document["datasets"])
    assert dict(hooks.images) == {state: total for state in states}  # P1 = 1.00 exactly, nothing else ran
    calls = document["encoder_calls"]
    assert calls["images"] == dict(hooks.images)
    assert calls["texts"] == dict(hooks.texts)
    assert calls["images_by_dataset"] == {name: {state: info["num_scored"] for state in states}
                                          for name, info in document["datasets"].items()}
    assert document["verification"]["passed"], document["verification"]["problems"]


# -- (a), (b): one suite ----------------------------------------------------------------------------------------
def test_minmax_encodes_every_image_once_per_state_verification_included(tmp_path):
    with hooked_run(quantizer="minmax", suites=("toy-id",), cache_dir=str(tmp_path)) as (hooks, documents):
        pass
    document = documents[0]
    assert_one_pass_per_image(document, hooks, ("fp32", "quantized"))  # the verification added no pass
    assert document["verification"]["n_modules"] > 0


def test_the_fp32_baseline_shares_the_fp32_features_and_needs_no_verification_pass(tmp_path):
    with hooked_run(quantizer="fp32", suites=("toy-id",), cache_dir=str(tmp_path)) as (hooks, documents):
        pass
    document = documents[0]
    assert_one_pass_per_image(document, hooks, ("fp32",))  # the quantized state adds 0
    # the report is what an instrumented pass on the verification batch gives: nothing quantized, passed
    model = hooks.models["quantized"]
    dataset = registry().get("datasets", "toy-id-test").loader(DatasetRequest())
    pixels = torch.stack([model.preprocess(dataset.image(index)) for index in range(VERIFICATION_BATCH)])
    resolved = resolve(EvalRequest(quantizer="fp32", suites=("toy-id",)), registry())
    separate = verify_quantized(model, pixels, model.tokenize(["a photo of a cat."]), resolved.scope.towers,
                                expect_quantized=False, bits=resolved.bits, quantizer=resolved.quantizer)
    assert document["verification"] == json.loads(json.dumps(separate.to_dict()))
    assert document["verification"]["n_modules"] == 0


# -- (c): the five toy suites ------------------------------------------------------------------------------------
@pytest.mark.parametrize("quantizer, states", [("fp32", ("fp32",)), ("minmax", ("fp32", "quantized"))])
def test_five_suites_encode_every_image_once_per_state(tmp_path, quantizer, states):
    with hooked_run(quantizer=quantizer, suites=FIVE_SUITES, cache_dir=str(tmp_path)) as (hooks, documents):
        pass
    document = documents[0]
    assert len(document["datasets"]) == 9  # id, near, far, four corrupted copies, two spurious groups
    assert_one_pass_per_image(document, hooks, states)
    assert document["dropout"]  # the dropout probe ran on its own copy, which neither count attributes to a state


# -- verification from the evaluation pass --------------------------------------------------------------------
def test_joint_scope_verification_equals_a_separate_pass_on_the_same_inputs(tmp_path):
    with hooked_run(quantizer="minmax", scope="joint", suites=("toy-id",), cache_dir=str(tmp_path)) as (hooks, documents):
        pass
    document = documents[0]
    assert_one_pass_per_image(document, hooks, ("fp32", "quantized"))
    dataset = registry().get("datasets", "toy-id-test").loader(DatasetRequest())
    prompts = [template.format(name) for name in dataset.classnames for template in dataset.templates]
    assert hooks.texts["quantized"] == len(prompts)  # the class prompts once: no extra verification pass
    model = hooks.models["quantized"]
    pixels = torch.stack([model.preprocess(dataset.image(index)) for index in range(VERIFICATION_BATCH)])
    resolved = resolve(EvalRequest(quantizer="minmax", scope="joint", suites=("toy-id",)), registry())
    separate = verify_quantized(model, pixels, model.tokenize(prompts[:TEXT_BATCH]), resolved.scope.towers,
                                expect_quantized=True, bits=resolved.bits, quantizer=resolved.quantizer)
    assert document["verification"] == json.loads(json.dumps(separate.to_dict()))
    assert {module["tower"] for module in document["verification"]["modules"]} == {"visual", "text"}


def test_a_run_without_passes_reuses_the_stored_report_and_falls_back_to_its_own_pass(tmp_path):
    settings = dict(quantizer="minmax", suites=("toy-id",), cache_dir=str(tmp_path))
    with hooked_run(**settings) as (_, first):
        pass
    with hooked_run(**settings) as (hooks, second):
        pass
    assert dict(hooks.images) == {} and second[0]["encoder_calls"]["images"] == {}  # every feature cached
    assert second[0]["verification"] == first[0]["verification"]  # the report the first run stored
    reports = list((tmp_path / "json").glob("verify-*.json"))
    assert len(reports) == 1
    reports[0].unlink()
    with hooked_run(**settings) as (hooks, third):
        pass
    assert third[0]["verification"] == first[0]["verification"]  # a separate pass on the same images: same report
    assert dict(hooks.images) == {"quantized": VERIFICATION_BATCH}  # that pass ran, and is counted
    assert third[0]["encoder_calls"]["images"] == {"quantized": VERIFICATION_BATCH}
    assert third[0]["encoder_calls"]["images_by_dataset"] == {}  # not an evaluation pass of any dataset


# -- the counter ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy():
    from qbench.model import LoadRequest
    from qbench_plugins.toyworld.plugin import load_toy_clip

    return load_toy_clip(LoadRequest()).eval()


class Silent:
    def log(self, message: str) -> None:
        pass

    def track(self, items, description):
        return iter(items)


def split(n: int, seed: int = 0) -> ArrayImages:
    pixels = np.random.default_rng(seed).integers(0, 255, size=(n, 32, 32, 3), dtype=np.uint8)
    return ArrayImages(f"random-{n}-{seed}", pixels, [0] * n, ["a"], ["{}"])


def test_the_counter_counts_its_tower_not_a_deep_copy_and_removes_its_hooks(toy):
    counter = EncodeCounter()
    pixels = torch.zeros(3, 3, 32, 32)
    with torch.no_grad(), counter.watching({"fp32": toy}):
        twin = copy.deepcopy(toy)  # carries the hook, as the dropout probe's copy does
        twin.encode_image(pixels)
        with counter.attributing("split"):
            toy.encode_image(pixels[:2])
        toy.encode_image(pixels)
        toy.encode_text(toy.tokenize(["a", "b", "c", "d"]))
    toy.encode_image(pixels)  # after the block: not counted
    assert counter.images == {"fp32": 5} and counter.images_by_dataset == {"split": {"fp32": 2}}
    assert counter.texts == {"fp32": 4}
    assert not tower_module(toy, "visual")._forward_hooks and not tower_module(toy, "text")._forward_hooks


def test_features_are_the_same_for_every_batch_size_and_the_last_pass_is_not_padded(toy):
    dataset = split(45)
    states = {"fp32": toy}
    prints = {"fp32": tower_fingerprint(toy, "visual")}
    passes: list[int] = []
    original = toy.encode_image

    def spy(pixels):
        passes.append(len(pixels))
        return original(pixels)

    features = {}
    for batch_size in (1, 7, 64):
        counter = EncodeCounter()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(toy, "encode_image", spy)
            features[batch_size] = encode_dataset(dataset, states, prints, batch_size, FeatureCache(None), Silent(),
                                                  counter).by_state["fp32"]
        assert counter.images == {"fp32": 45} and counter.images_by_dataset == {dataset.name: {"fp32": 45}}
    assert passes == [LEADING_CHUNK, 45 - LEADING_CHUNK] * 3  # fixed cuts, the last pass at its own size
    assert torch.equal(features[1], features[7]) and torch.equal(features[1], features[64])
    # the full passes are exactly what the padded passes gave; the short last one may differ in the last bits
    padded = FixedChunks(lambda rows: toy.encode_image(rows).float().cpu(), AdaptiveBatch(64), NUMERIC_BATCH)
    with torch.no_grad():
        padded.feed(torch.stack([toy.preprocess(dataset.image(index)) for index in range(45)]))
        old = padded.finish()
    assert torch.equal(features[1][:NUMERIC_BATCH], old[:NUMERIC_BATCH])
    torch.testing.assert_close(features[1], old, rtol=0, atol=1e-6)


def test_entries_of_padded_passes_are_not_reused(toy, tmp_path):
    dataset = split(10, seed=3)
    fingerprint = tower_fingerprint(toy, "visual")
    cache = FeatureCache(tmp_path)
    old_key = _key("image", fingerprint, dataset.fingerprint, repr(toy.preprocess))  # the v1 key: padded passes
    cache.put(old_key, {"features": torch.zeros(10, 16), "kept": torch.arange(10), "unreadable": torch.zeros(0, dtype=torch.int64)})
    counter = EncodeCounter()
    encoded = encode_dataset(dataset, {"fp32": toy}, {"fp32": fingerprint}, 8, cache, Silent(), counter)
    assert counter.images == {"fp32": 10} and not counter.cache_hits
    assert encoded.by_state["fp32"].abs().sum() > 0
    again = EncodeCounter()
    encode_dataset(dataset, {"fp32": toy}, {"fp32": fingerprint}, 8, cache, Silent(), again)
    assert again.images == {} and again.cache_hits == {"fp32": 1}  # the new entry is


@pytest.mark.parametrize("loader_batches", [[50], [1] * 50, [7, 30, 13], [3, 5]])
def test_fixed_chunks_cut_at_fixed_positions_without_padding(loader_batches):
    rows = torch.arange(50 * 3, dtype=torch.float64).reshape(50, 3)
    rows = rows[:sum(loader_batches)]
    calls: list[int] = []
    entered: list[int] = []

    @contextmanager
    def first():
        entered.append(len(calls))
        yield
        entered.append(len(calls))

    def encode(part):
        calls.append(len(part))
        return part * 2 + part.sum(dim=0, keepdim=True)  # depends on the pass: cuts must be where they should

    chunks = FixedChunks(encode, AdaptiveBatch(64), size=16, lead=8, pad=False, first_pass=first)
    start = 0
    for size in loader_batches:
        chunks.feed(rows[start:start + size])
        start += size
    output = chunks.finish()
    cuts = [0, 8] + list(range(24, len(rows), 16)) + [len(rows)]
    cuts = sorted({min(cut, len(rows)) for cut in cuts})
    expected = torch.cat([encode(rows[a:b]) for a, b in zip(cuts, cuts[1:])])
    assert torch.equal(output, expected)
    assert calls[:len(cuts) - 1] == [b - a for a, b in zip(cuts, cuts[1:])]
    assert entered == [0, 1]  # the context wrapped the first pass only


# -- cheaper instrumentation, same results ------------------------------------------------------------------------
def sorted_rows(work):
    """The instrumentation before: every row sorted whole."""
    ordered = work.sort(dim=1).values
    return ordered, ordered.reshape(-1)


def tensors() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    grid = torch.randint(-128, 128, (6, 200), generator=generator).float() * 0.0173
    grid[0, :5] = -0.0  # negative zero is zero
    log2 = (2.0 ** -torch.randint(0, 7, (4, 50), generator=generator).float()) * 0.3
    log2[1, :3] = 0.0
    return [grid, torch.randn(5, 40, generator=generator), grid.half(), grid.double(), log2, torch.full((3, 7), 0.25),
            torch.tensor([[1.5]]), -grid]


@pytest.mark.parametrize("grouping", ["per_tensor", "per_tensor_log2", "per_channel", "per_token", "instance-4"])
def test_the_faster_value_counting_gives_the_same_stats(grouping, monkeypatch):
    from qbench.quant.layout import LINEAR_INPUT, Grouping, TensorRule

    for bits in (8, 4, 3):
        rule = TensorRule(bits, Grouping.parse(grouping), LINEAR_INPUT)
        for tensor in tensors():
            fast, slow = _Stats(), _Stats()
            for stats in (fast, slow):
                with monkeypatch.context() as patch:
                    if stats is slow:
                        patch.setattr(verify, "_distinct_rows", sorted_rows)
                    stats.add(tensor, rule)
                    stats.add(tensor.reshape(2, -1, tensor.shape[-1]) if tensor.shape[0] % 2 == 0 else tensor, rule)
            assert dataclasses.asdict(fast) == dataclasses.asdict(slow)
            assert fast.observed == 2


@pytest.mark.parametrize("quantizer, bits", [("minmax", "w8a8"), ("igq-vit", "w8a8"), ("smoothquant", "w4a8")])
def test_the_faster_value_counting_gives_the_same_report(quantizer, bits, monkeypatch):
    resolved = resolve(EvalRequest(quantizer=quantizer, bits=bits, scope="joint", suites=("toy-id",), proxy_n=32), registry())
    fp32 = resolved.model.loader(evaluate.load_request(resolved.request)).eval()
    calibration = evaluate._calibration(resolved, fp32, DatasetRequest()) if resolved.proxy else None
    quantized = evaluate.quantize_model(resolved, fp32, calibration, evaluate.Progress())
    dataset = registry().get("datasets", "toy-id-test").loader(DatasetRequest())
    pixels = torch.stack([fp32.preprocess(dataset.image(index)) for index in range(8)])
    tokens = fp32.tokenize([template.format(name) for name in dataset.classnames for template in dataset.templates[:2]])

    def report():
        return verify_quantized(quantized.model, pixels, tokens, resolved.scope.towers, float_extras=quantized.float_extras,
                                bits=resolved.bits, quantizer=resolved.quantizer).to_dict()

    fast = report()
    monkeypatch.setattr(verify, "_distinct_rows", sorted_rows)
    assert fast == report()
    assert fast["passed"], fast["problems"]
