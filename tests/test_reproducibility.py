"""Reproducible by hash: one configuration hash gives the same result document whatever the batch size
(``--batch-size``, or the one chosen from free memory) and the torch thread count (``--threads``).

How it is made so, and what each test pins down:

* image towers run in fixed-shape passes of :data:`~qbench.engine.batching.NUMERIC_BATCH` images cut at fixed positions
  of the image stream (:class:`~qbench.engine.batching.FixedChunks`): a forward pass's float rounding depends on its
  batch shape, so before, a 1-image remainder batch moved ECE/NLL by ~1e-9;
* training-based quantizers train on one torch thread (:func:`qbench.engine.threads.training_threads`): torch's CPU
  softmax/LayerNorm backward and large one-value reductions sum in per-thread pieces, and training amplifies it;
* LSQ's step initialisation and gradients and the Light-QAT gradient clip sum in a fixed order
  (:mod:`qbench.quant.determinism`), thread-independent even outside the pinned training.

Each equality test also checks that what it compares is not trivially equal: two separate computations (own
caches, images really encoded, the model really trained), with inputs that the old code computed differently.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from qbench.engine.batching import CUDA_NUMERIC_BATCH, NUMERIC_BATCH, AdaptiveBatch, FixedChunks, numeric_batch
from qbench.quant.determinism import broadcast_columns, clip_grad_norm_ordered, ordered_sum
from qbench.engine.evaluate import EvalRequest, resolve, run
from qbench.engine.features import EncodeCounter
from qbench.quant.lsq import lsq_fake_quantize
from qbench.registry import build_registry
from qbench.engine.threads import TRAINING_THREADS, ThreadSetting, training_threads

VOLATILE = ("provenance", "timing", "encoder_calls")
"""What may differ between two computations of one configuration: where/when/how fast, and cache counters."""
LIMIT = 33
"""Images per split: with --batch-size 16 the last loader batch holds one image, a pass shape whose rounding
differs from a larger pass on MKL (see test_the_old_per_batch_encoding_would_have_differed)."""


def comparable(document: dict) -> str:
    """The document without :data:`VOLATILE` fields, as canonical JSON (exact float reprs)."""
    return json.dumps({key: value for key, value in document.items() if key not in VOLATILE}, sort_keys=True, default=str)


def evaluate(tmp_path, name: str, *, batch_size: int, threads: int, **settings) -> tuple[dict, EncodeCounter]:
    """One evaluation in its own feature/quantized-model cache with ``threads`` torch threads (restored after)."""
    request = EvalRequest(batch_size=batch_size, workers=0, limit=LIMIT, proxy_n=100, cache_dir=str(tmp_path / name),
                          threads=ThreadSetting(threads, "flag"), **settings)
    counter, previous = EncodeCounter(), torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return run(resolve(request, build_registry()), counter=counter), counter
    finally:
        torch.set_num_threads(previous)


def assert_reproduced(tmp_path, **settings) -> tuple[dict, dict]:
    """--batch-size 16 on 1 thread and --batch-size 256 on 2 threads: same hash, identical documents, and both
    really computed (images encoded in each run, nothing served from a cache)."""
    small, small_calls = evaluate(tmp_path, "small", batch_size=16, threads=1, **settings)
    large, large_calls = evaluate(tmp_path, "large", batch_size=256, threads=2, **settings)
    assert small["config"]["config_hash"] == large["config"]["config_hash"]
    assert (small["provenance"]["batching"]["batch_size"], large["provenance"]["batching"]["batch_size"]) == (16, 256)
    assert (small["provenance"]["threads"]["torch_threads"], large["provenance"]["threads"]["torch_threads"]) == (1, 2)
    for calls in (small_calls, large_calls):
        assert calls.images["fp32"] == LIMIT and calls.images["quantized"] == LIMIT and not calls.cache_hits
    assert comparable(small) == comparable(large)
    return small, large


def metrics(document: dict) -> dict[str, tuple[float, float]]:
    """Metric name -> (FP32, quantized) of a toy-id document."""
    return {record["metric"]: (record["fp32"], record["quantized"]) for record in document["results"]}


# -- end to end --------------------------------------------------------------------------------------------------
def test_minmax_gives_the_same_document_for_any_batch_size_and_thread_count(tmp_path):
    document, _ = assert_reproduced(tmp_path, quantizer="minmax", bits="w4a8")
    values = metrics(document)
    assert set(values) == {"accuracy", "ece", "nll"}
    assert all(np.isfinite(pair).all() for pair in values.values())
    assert values["nll"][0] != values["nll"][1]  # a real quantized model, not the float one twice


def test_a_training_quantizer_gives_the_same_document_for_any_batch_size_and_thread_count(tmp_path):
    params = (("steps", "6"), ("batch_size", "50"), ("n_calibration", "100"))
    document, _ = assert_reproduced(tmp_path, quantizer="lsq", bits="w4a8", quantizer_params=params)
    training = document["quantizer_provenance"]["training"]
    assert len(training["losses"]) == 6 and training["batch_size"] == 50  # the quantizer's own batch, not the plan's
    assert len(set(training["losses"])) > 1  # it trained: the losses moved


def test_the_old_per_batch_encoding_would_have_differed():
    """Why LIMIT is 33: encoding the 33rd image alone (the old last batch of --batch-size 16) rounds differently
    from encoding it with the others (the old --batch-size 256), so the equality tests above can fail."""
    from qbench.data import DatasetRequest
    from qbench.engine.features import preprocess_images
    from qbench.model import LoadRequest

    registry = build_registry()
    model = registry.get("models", "toy-clip").loader(LoadRequest()).eval()
    dataset = registry.get("datasets", "toy-id-test").loader(DatasetRequest(None, 0))
    pixels = preprocess_images([dataset.image(index) for index in range(LIMIT)], model.preprocess, 64, 0)
    with torch.no_grad():
        alone = model.encode_image(pixels[LIMIT - 1:])
        together = model.encode_image(pixels)[LIMIT - 1:]
    if torch.equal(alone, together):
        pytest.skip("this machine's kernels round a 1-image and a 33-image pass alike")
    torch.testing.assert_close(alone, together, rtol=0, atol=1e-5)  # last bits only


# -- fixed-shape encoding ----------------------------------------------------------------------------------------
def shape_sensitive(calls: list[int]):
    """An encoder whose output depends on the pass it is in (each row plus its pass's mean): a stand-in for
    kernels whose rounding depends on the batch shape, exaggerated so any change of pass shows."""

    def encode(rows: torch.Tensor) -> torch.Tensor:
        calls.append(len(rows))
        return rows + rows.mean(dim=0, keepdim=True)

    return encode


@pytest.mark.parametrize("loader_batches", [[16, 16, 16, 2], [50], [1] * 50, [7, 30, 13]])
def test_fixed_chunks_cut_the_stream_at_fixed_positions_whatever_the_loader_batches(loader_batches):
    rows = torch.arange(50 * 3, dtype=torch.float64).reshape(50, 3)
    reference_calls: list[int] = []
    reference = FixedChunks(shape_sensitive(reference_calls), AdaptiveBatch(64), size=16)
    reference.feed(rows)
    expected = reference.finish()
    calls: list[int] = []
    seen: list[int] = []
    chunks = FixedChunks(shape_sensitive(calls), AdaptiveBatch(64), size=16, on_encoded=seen.append)
    start = 0
    for size in loader_batches:
        chunks.feed(rows[start:start + size])
        start += size
    assert torch.equal(chunks.finish(), expected)
    assert calls == reference_calls == [16] * 4  # every pass full-size: the last (2 rows) padded
    assert seen == [16, 16, 16, 2]  # real rows only, for the encoder counters
    per_batch = torch.cat([shape_sensitive([])(rows[:16]), shape_sensitive([])(rows[16:50])])
    assert not torch.equal(per_batch, expected)  # the comparison can fail: other passes give other rows


def test_the_numeric_batch_is_larger_on_a_gpu():
    assert (numeric_batch("cpu"), numeric_batch("cuda"), numeric_batch("cuda:1")) == (NUMERIC_BATCH, CUDA_NUMERIC_BATCH,
                                                                                        CUDA_NUMERIC_BATCH)


def test_small_cpu_inputs_run_in_larger_passes_up_to_the_pixel_budget():
    sizes = {side: numeric_batch("cpu", (3, side, side)) for side in (32, 64, 112, 160, 224, 336)}
    assert sizes == {32: 128, 64: 128, 112: 128, 160: 32, 224: NUMERIC_BATCH, 336: NUMERIC_BATCH}
    assert numeric_batch("cuda", (3, 32, 32)) == CUDA_NUMERIC_BATCH  # the GPU pass does not depend on the input


def test_a_models_passes_follow_its_input_shape():
    from qbench.engine.features import pass_layout
    from qbench.model import LoadRequest

    toy = build_registry().get("models", "toy-clip").loader(LoadRequest())
    assert pass_layout(toy) == (32, 128)  # the 32 px toy: a first pass of 32 (the verified images), then 128 rows


def test_evaluation_encodes_in_passes_of_the_numeric_batch(tmp_path, monkeypatch):
    passes: list[int] = []
    original = AdaptiveBatch.apply_chunk

    def spy(self, encode, chunk):
        passes.append(len(chunk))
        return original(self, encode, chunk)

    monkeypatch.setattr(AdaptiveBatch, "apply_chunk", spy)
    document = run(resolve(EvalRequest(quantizer="fp32", batch_size=16, limit=LIMIT, cache_dir=str(tmp_path)), build_registry()))
    assert passes == [NUMERIC_BATCH, 1]  # 33 images, loader batches of 16: a pass of 32, then the last image alone
    assert document["provenance"]["batching"]["image_encode_batch"]["numeric_batch"] == numeric_batch("cpu", (3, 32, 32))


# -- thread-independent arithmetic -------------------------------------------------------------------------------
def at_threads(threads: int, compute):
    """``compute()`` with ``threads`` torch threads (the previous count restored)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return compute()
    finally:
        torch.set_num_threads(previous)


def test_ordered_sum_is_thread_independent_where_torch_sum_is_not():
    values = [torch.randn(1 << 20, generator=torch.Generator().manual_seed(seed)) for seed in range(3)]
    plain = [[at_threads(threads, lambda: x.sum()) for x in values] for threads in (1, 2)]
    assert any(not torch.equal(a, b) for a, b in zip(*plain))  # torch's two-pass sum: the hazard is real
    ordered = [[at_threads(threads, lambda: ordered_sum(x, 0)) for x in values] for threads in (1, 2, 3)]
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(*ordered))
    assert all(abs(float(a) - float(x.double().sum())) < 1e-9 for a, x in zip(ordered[0], values))


def test_lsq_step_gradient_over_a_large_activation_is_thread_independent():
    activations = [torch.randn(1, 200_000, generator=torch.Generator().manual_seed(seed)) for seed in range(3)]

    def step_grad(fake_quantize, x: torch.Tensor) -> torch.Tensor:
        step = torch.tensor([0.05], requires_grad=True)
        fake_quantize(x, step).sum().backward()
        return step.grad

    broadcast = lambda x, step: x * step.reshape(-1, 1)  # noqa: E731  (torch reduces its gradient in two passes)
    lsq = lambda x, step: lsq_fake_quantize(x, step, -8, 7, 1.0)  # noqa: E731
    plain = [[at_threads(threads, lambda: step_grad(broadcast, x)) for x in activations] for threads in (1, 2)]
    assert any(not torch.equal(a, b) for a, b in zip(*plain))  # the hazard is real on this machine
    grads = [[at_threads(threads, lambda: step_grad(lsq, x)) for x in activations] for threads in (1, 2, 3)]
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(*grads))


def test_broadcast_columns_matches_broadcasting_and_its_gradient():
    column = torch.randn(3, 1, generator=torch.Generator().manual_seed(1), requires_grad=True)
    rows = torch.randn(3, 5, generator=torch.Generator().manual_seed(2))
    (rows * broadcast_columns(column, 5)).sum().backward()
    assert torch.equal(broadcast_columns(column, 5).detach(), column.detach().expand(3, 5))
    torch.testing.assert_close(column.grad, rows.sum(dim=1, keepdim=True), rtol=1e-6, atol=1e-6)


def test_ordered_clip_matches_torch_clip_grad_norm():
    generator = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(40, 30, generator=generator)) for _ in range(3)]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, twin in zip(params, twins):
        p.grad = torch.randn(p.shape, generator=generator)
        twin.grad = p.grad.clone()
    norm = clip_grad_norm_ordered(params, 1.0)
    reference = torch.nn.utils.clip_grad_norm_(twins, 1.0)
    torch.testing.assert_close(norm, reference, rtol=1e-6, atol=0)
    assert float(norm) > 1.0  # clipping really happened
    for p, twin in zip(params, twins):
        torch.testing.assert_close(p.grad, twin.grad, rtol=1e-6, atol=1e-7)


# -- training threads ------------------------------------------------------------------------------------------
def test_training_quantizers_quantize_on_the_training_threads(monkeypatch):
    from qbench.engine.evaluate import Progress, quantize_model
    from qbench.quant.base import QuantizedModel

    registry = build_registry()
    seen: dict[str, int] = {}
    for name in ("lsq", "minmax"):
        resolved = resolve(EvalRequest(quantizer=name), registry)

        def spy(self, *args, name=name) -> QuantizedModel:
            seen[name] = torch.get_num_threads()
            return QuantizedModel(model=None)

        monkeypatch.setattr(type(resolved.quantizer), "quantize", spy)
        at_threads(2, lambda: quantize_model(resolved, None, None, Progress()))
    assert seen == {"lsq": TRAINING_THREADS, "minmax": 2}  # training pinned, calibration-only left alone
    assert at_threads(2, torch.get_num_threads) == 2  # and the count is restored afterwards


def test_unpinned_training_would_depend_on_the_threads():
    """The hazard the pin removes, shown with Q-ViT (materialised softmax and IRM statistics in training):
    quantizing outside :func:`training_threads` with 1 and with 2 threads gives different models."""
    from qbench.data import DatasetRequest
    from qbench.engine.evaluate import _calibration
    from qbench.model import LoadRequest

    registry = build_registry()
    params = (("steps", "1"), ("batch_size", "32"), ("n_calibration", "32"))
    resolved = resolve(EvalRequest(quantizer="q-vit", bits="w4a8", quantizer_params=params, proxy_n=32), registry)
    fp32 = registry.get("models", "toy-clip").loader(LoadRequest()).eval()
    pairs = _calibration(resolved, fp32, DatasetRequest(None, 0))

    def trained(threads: int) -> list[torch.Tensor]:
        quantize = lambda: resolved.quantizer.quantize(copy.deepcopy(fp32), resolved.bits, resolved.scope, pairs, 0)  # noqa: E731
        model = at_threads(threads, quantize).model
        return [tensor.detach().clone() for tensor in model.model.state_dict().values()]

    one, two = trained(1), trained(2)
    if all(torch.equal(a, b) for a, b in zip(one, two)):
        pytest.skip("this machine's kernels trained Q-ViT alike on 1 and 2 threads")
    assert len(one) == len(two)
