"""Less work around the forward passes (issue 16, P2): the working copy a quantizer gets (no copy for the baseline,
the text tower shared in visual scope, guarded), fast fingerprints with unchanged digests, and the automatic batch
size read from available (not free) memory, recorded in provenance.

Every change here must leave results exactly as they were: fingerprints are compared with the original
implementation (copied below), quantized models and run documents with the full-deep-copy path they replace.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import sys
import types

import pytest
import torch

from qbench.engine import batching, features, model_copy
from qbench.engine.evaluate import EvalRequest, Progress, quantize_model, resolve, run
from qbench.engine.features import CACHE_FORMAT, state_fingerprints, tower_fingerprint
from qbench.engine.model_copy import WorkingCopy, working_copy
from qbench.errors import QbenchError
from qbench.model import LoadRequest
from qbench.plugins import get_plugin_manager
from qbench.quant.base import QuantizedModel, Quantizer, QuantizerConfig
from qbench.quant.spec import BitSpec, Scope
from qbench.registry import build_registry
from qbench.testing.data import proxy_batch
from qbench.testing.models import tiny_vlm

pytestmark = pytest.mark.usefixtures("single_thread")
REGISTRY = build_registry(get_plugin_manager(load_entrypoints=False))
PTQ_FAST = {"n_calibration": "16", "batch_size": "8", "epochs": "1", "sweeps": "1", "ln_steps": "2", "kmeans_iters": "2",
            "w_clip_grid": "10"}
QAT_FAST = {"steps": "2", "batch_size": "8", "n_calibration": "16"}


def reference_fingerprint(vlm, tower: str) -> str:
    """The implementation of ``tower_fingerprint`` before issue 16 (every tensor copied to bytes): the digests of
    existing feature caches, which the fast one must reproduce exactly."""
    digest = hashlib.sha256(f"{CACHE_FORMAT}:{tower}".encode())
    for name, module in vlm.model.named_modules():
        owner = vlm.tower_of(name + ".") if name else None
        if owner not in (tower, None):
            continue
        digest.update(f"{name}|{type(module).__name__}|{module.extra_repr()}".encode())
        for tensor_name, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if tensor is None:
                continue
            data = tensor.detach().cpu().contiguous()
            digest.update(f"{tensor_name}|{data.dtype}|{tuple(data.shape)}".encode())
            digest.update(data.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:24]


@pytest.fixture(scope="module")
def toy():
    """The shipped toy model (FP32, eval mode)."""
    return REGISTRY.get("models", "toy-clip").loader(LoadRequest()).eval()


@pytest.fixture(scope="module")
def toy_pairs(toy):
    """16 proxy pairs for the toy model."""
    return proxy_batch(toy, n=16)


def quantizer(name: str, fast: dict[str, str] | None = None) -> Quantizer:
    """A built-in quantizer with its calibration and search cut down to what a test can afford."""
    cls = REGISTRY.get("quantizers", name)
    fields = {field.name for field in dataclasses.fields(cls.Config)}
    return cls.from_params({key: value for key, value in (fast or {}).items() if key in fields}, registry=REGISTRY)


def prints(vlm) -> tuple[str, str]:
    """Both tower fingerprints."""
    return tower_fingerprint(vlm, "visual"), tower_fingerprint(vlm, "text")


# -- fingerprints --------------------------------------------------------------------------------------------------
def test_fast_fingerprints_equal_the_original_implementation(toy, toy_pairs):
    quantized = quantizer("minmax", PTQ_FAST).quantize(copy.deepcopy(toy), BitSpec.parse("w4a8"), Scope.JOINT, toy_pairs, 0)
    for model in (toy, quantized.model):
        for tower in ("visual", "text"):
            assert tower_fingerprint(model, tower) == reference_fingerprint(model, tower)
    assert prints(quantized.model) != prints(toy)


def test_state_fingerprints_hash_each_distinct_content_once(toy, toy_pairs, monkeypatch):
    quantized = quantize_model(_resolved(), toy, toy_pairs, Progress()).model  # visual scope: text tower shared
    nudged = copy.deepcopy(toy)
    with torch.no_grad():
        nudged.model.token_embedding.weight[0, 0] = torch.nextafter(nudged.model.token_embedding.weight[0, 0],
                                                                    torch.tensor(1.0))
    hashed = []
    real = features._stream_digest
    monkeypatch.setattr(features, "_stream_digest", lambda stream: hashed.append(1) or real(stream))
    states = {"fp32": toy, "same": toy, "quantized": quantized, "nudged": nudged}
    text = state_fingerprints(states, "text")
    assert len(hashed) == 2  # fp32 once (its alias and the shared text tower reuse it); the nudged copy differs
    visual = state_fingerprints(states, "visual")
    assert len(hashed) == 2 + 3  # fp32, the quantized visual tower, and the nudged copy (token_embedding counts for both)
    monkeypatch.setattr(features, "_stream_digest", real)
    for state, model in states.items():
        assert (visual[state], text[state]) == (reference_fingerprint(model, "visual"), reference_fingerprint(model, "text"))
    assert text["quantized"] == text["fp32"] != text["nudged"] and visual["quantized"] != visual["fp32"]


def test_non_persistent_buffers_stay_in_the_key(toy):
    """The toy (open_clip) CLIP keeps its causal mask as a non-persistent buffer; it always entered the digest, so
    dropping such buffers would change every existing key. A derived cache must be a plain attribute instead."""
    assert "attn_mask" in toy.model._non_persistent_buffers_set
    changed = copy.deepcopy(toy)
    changed.model.attn_mask.fill_(0.0)
    assert tower_fingerprint(changed, "text") != tower_fingerprint(toy, "text")
    changed = copy.deepcopy(toy)
    changed.model.cached_note = torch.ones(3)  # a plain attribute: not part of the key
    assert prints(changed) == prints(toy)


# -- the working copy ---------------------------------------------------------------------------------------------
def _resolved(quantizer_name: str = "minmax", scope: str = "visual", **params: str):
    """A resolved toy-id run (built-in registry) with a fast quantizer."""
    request = EvalRequest(quantizer=quantizer_name, scope=scope, suites=("toy-id",), quantizer_params=tuple(params.items()))
    resolved = resolve(request, REGISTRY)
    return dataclasses.replace(resolved, quantizer=quantizer(quantizer_name, {**PTQ_FAST, **params}))


def test_the_baseline_gets_the_float_model_itself(toy):
    work = working_copy(toy, quantizer("fp32"), Scope.VISUAL)
    assert work.model is toy and work.mode == "same"
    work.check()
    assert quantize_model(_resolved("fp32"), toy, None, Progress()).model is toy


def test_visual_scope_shares_the_text_tower_and_copies_the_rest(toy):
    work = working_copy(toy, quantizer("minmax"), Scope.VISUAL)
    assert work.mode == "shared:text" and work.model is not toy
    assert work.model.model.transformer is toy.model.transformer
    assert all(a is b for a, b in zip(work.model.model.transformer.parameters(), toy.model.transformer.parameters()))
    assert work.model.model.visual is not toy.model.visual
    assert not any(a is b for a, b in zip(work.model.model.visual.parameters(), toy.model.visual.parameters()))
    assert work.model.model.token_embedding is not toy.model.token_embedding  # outside both towers: copied
    assert work.model.model.logit_scale is not toy.model.logit_scale
    assert work.model.tokenizer is toy.tokenizer and work.model.preprocess is toy.preprocess
    joint = working_copy(toy, quantizer("minmax"), Scope.JOINT)
    assert joint.mode == "copy" and joint.model.model.transformer is not toy.model.transformer
    assert joint.model.tokenizer is toy.tokenizer


class TextMeddler(Quantizer):
    """A broken method: in visual scope it scales a text-tower weight (and, as a baseline, the model it was given)."""

    name = "test-meddler"
    family = "ptq"
    citation = "a test method"
    summary = "changes a tower outside its scope"
    needs_data = False
    needs_grad = False
    Config = QuantizerConfig

    def quantize(self, model, bits, scope, calibration, seed) -> QuantizedModel:
        """Write into the first text-tower weight through ``.data`` (no autograd version bump)."""
        next(model.model.transformer.parameters()).data.mul_(1.5)
        return QuantizedModel(model, provenance={"method": self.name})


class MeddlingBaseline(TextMeddler):
    """The same breach by a method that declares the baseline family (it is handed the float model itself)."""

    name = "test-meddling-baseline"
    family = "baseline"

    def quantize(self, model, bits, scope, calibration, seed) -> QuantizedModel:
        """Change a weight in place through the parameter itself."""
        with torch.no_grad():
            next(model.model.visual.parameters()).add_(1.0)
        return QuantizedModel(model, provenance={"method": self.name})


def test_a_quantizer_that_changes_the_shared_tower_stops_the_run_naming_itself():
    fp32 = tiny_vlm()
    resolved = dataclasses.replace(_resolved(), quantizer=TextMeddler())
    with pytest.raises(QbenchError) as error:
        quantize_model(resolved, fp32, None, Progress())
    message = str(error.value)
    assert "\n" not in message and "'test-meddler'" in message and "text tower" in message and "visual scope" in message
    joint = dataclasses.replace(_resolved(scope="joint"), quantizer=TextMeddler())
    before = prints(fp32)
    quantize_model(joint, fp32, None, Progress())  # joint scope: a private full copy, the float model untouched
    assert prints(fp32) == before


def test_a_baseline_that_changes_the_float_model_is_caught():
    fp32 = tiny_vlm()
    resolved = dataclasses.replace(_resolved("fp32"), quantizer=MeddlingBaseline())
    with pytest.raises(QbenchError, match="'test-meddling-baseline' \\(family baseline\\) changed the float model") as error:
        quantize_model(resolved, fp32, None, Progress())
    assert "\n" not in str(error.value)


def test_the_guard_puts_back_training_flags_of_the_shared_tower():
    fp32 = tiny_vlm().eval()
    work = working_copy(fp32, quantizer("minmax"), Scope.VISUAL)
    work.model.train()
    work.check()
    assert not any(module.training for module in fp32.model.transformer.modules())
    assert work.model.model.visual.training  # the copied tower is the quantizer's own


PTQ = [name for name in REGISTRY.names("quantizers") if REGISTRY.get("quantizers", name).family in ("ptq", "baseline")]
QAT = [name for name in REGISTRY.names("quantizers") if REGISTRY.get("quantizers", name).family == "qat"]


@pytest.mark.parametrize("name", PTQ)
def test_every_built_in_ptq_method_leaves_the_shared_tower_alone_and_quantizes_as_before(name, toy, toy_pairs):
    """On the toy model: in visual scope the guard passes, the float model is unchanged, and the quantized model equals
    the one quantized on a full private deep copy (the old path); in joint scope the float model is unchanged too."""
    before = prints(toy)
    for scope in (Scope.VISUAL, Scope.JOINT):
        torch.manual_seed(0)
        work = working_copy(toy, quantizer(name, PTQ_FAST), scope)
        new = quantizer(name, PTQ_FAST).quantize(work.model, BitSpec.parse("w8a8"), scope, toy_pairs, 0).model
        work.check()
        assert prints(toy) == before, f"{name} changed the float model in {scope.value} scope"
        if scope is Scope.VISUAL:
            torch.manual_seed(0)
            old = quantizer(name, PTQ_FAST).quantize(copy.deepcopy(toy), BitSpec.parse("w8a8"), scope, toy_pairs, 0).model
            assert prints(new.eval()) == prints(old.eval())


@pytest.mark.parametrize("name", QAT)
def test_every_built_in_qat_method_trains_as_before_with_the_text_tower_shared(name):
    """QAT toggles ``requires_grad`` and training modes on the whole model while it trains: on a tiny CLIP in visual
    scope, the guard passes and the trained model equals the one trained on a full deep copy."""
    fp32 = tiny_vlm().eval()
    pairs = proxy_batch(fp32, n=16)
    before = prints(fp32)
    torch.manual_seed(0)
    work = working_copy(fp32, quantizer(name, QAT_FAST), Scope.VISUAL)
    new = quantizer(name, QAT_FAST).quantize(work.model, BitSpec.parse("w8a8"), Scope.VISUAL, pairs, 0).model
    work.check()
    assert prints(fp32) == before
    torch.manual_seed(0)
    old = quantizer(name, QAT_FAST).quantize(copy.deepcopy(fp32), BitSpec.parse("w8a8"), Scope.VISUAL, pairs, 0).model
    assert prints(new.eval()) == prints(old.eval())


def test_a_shared_tower_model_saves_and_restores_completely(toy, toy_pairs, tmp_path):
    from qbench.engine.checkpoint import read_checkpoint, restore_quantized, save_checkpoint

    resolved = _resolved()
    quantized = quantize_model(resolved, toy, toy_pairs, Progress())
    assert quantized.model.model.transformer is toy.model.transformer
    save_checkpoint(tmp_path / "ckpt", toy, quantized, resolved.quantization_config)
    restored = restore_quantized(read_checkpoint(tmp_path / "ckpt"), toy)
    assert prints(restored.model) == prints(quantized.model)
    assert restored.model.model.transformer is not toy.model.transformer  # a restored model is its own copy


@pytest.mark.parametrize("quantizer_name", ["minmax", "fp32"])
def test_a_run_is_identical_to_the_full_copy_path(quantizer_name, monkeypatch):
    request = EvalRequest(quantizer=quantizer_name, suites=("toy-id",), limit=40, proxy_n=40, batch_size=16, workers=0,
                          feature_cache=False)
    resolved = resolve(request, REGISTRY)
    new = run(resolved)
    monkeypatch.setattr(model_copy, "working_copy",
                        lambda fp32, quantizer, scope: WorkingCopy(copy.deepcopy(fp32), "copy"))
    old = run(resolved)
    for key in ("results", "reliability", "verification", "quantizer_provenance", "datasets", "bin_trajectories"):
        assert new[key] == old[key], key
    assert new["encoder_calls"]["state_fingerprints"] == old["encoder_calls"]["state_fingerprints"]


# -- available memory ---------------------------------------------------------------------------------------------
def _fake_psutil(monkeypatch, available: int) -> None:
    """A psutil whose ``virtual_memory().available`` is ``available`` bytes (and whose ``free`` is far lower)."""
    fake = types.ModuleType("psutil")
    fake.virtual_memory = lambda: types.SimpleNamespace(available=available, free=available // 64)
    monkeypatch.setitem(sys.modules, "psutil", fake)


def test_automatic_batch_size_reads_available_ram_and_records_the_source(monkeypatch):
    shape = (3, 224, 224)
    per_image = batching.per_image_bytes(shape)
    _fake_psutil(monkeypatch, int(64 * per_image / batching.CPU_MEMORY_FRACTION))
    monkeypatch.setattr(batching.os, "sysconf", lambda name: pytest.fail("free pages must not be read"), raising=False)
    plan = batching.plan_batching("cpu", None, 0, shape)
    assert plan.batch_size == 64
    assert plan.to_dict()["memory_source"] == batching.RAM_SOURCE == "psutil.virtual_memory().available"
    assert plan.batch_size == batching.plan_batching("cpu", None, 0, shape).batch_size  # same memory, same batch
    _fake_psutil(monkeypatch, int(20 * per_image / batching.CPU_MEMORY_FRACTION))
    assert batching.plan_batching("cpu", None, 0, shape).batch_size == 16
    assert batching.plan_batching("cpu", 12, 0, shape).to_dict()["memory_source"] is None  # --batch-size: nothing read


def test_the_cuda_plan_reads_free_gpu_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (int(8 * 2**30), int(80 * 2**30)))
    plan = batching.plan_batching("cuda:0", None, 0, (3, 224, 224))
    assert plan.to_dict()["memory_source"] == batching.CUDA_MEMORY_SOURCE and plan.batch_size == 64


def test_missing_psutil_is_one_line_naming_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil raises ImportError
    with pytest.raises(QbenchError, match="pip install psutil") as error:
        batching.plan_batching("cpu", None, 0)
    assert "\n" not in str(error.value)


def test_a_run_records_the_memory_source():
    request = EvalRequest(quantizer="fp32", suites=("toy-id",), limit=8, workers=0, feature_cache=False)
    document = run(resolve(request, REGISTRY))
    assert document["provenance"]["batching"]["memory_source"] == batching.RAM_SOURCE


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: torch.cuda.is_available() is False here")
def test_fingerprints_and_the_shared_tower_on_cuda(toy, toy_pairs):
    """On a GPU the digests are those of the same model on the CPU (tensors are read on the device and copied to the
    host one at a time), and the visual-scope working copy shares and guards the text tower there too."""
    on_gpu = copy.deepcopy(toy).to("cuda")
    assert prints(on_gpu) == (reference_fingerprint(toy, "visual"), reference_fingerprint(toy, "text"))
    quantized = quantize_model(_resolved(), on_gpu, toy_pairs, Progress()).model  # visual scope
    assert quantized.model.transformer is on_gpu.model.transformer
    states = {"fp32": on_gpu, "alias": on_gpu, "quantized": quantized}
    for tower in ("visual", "text"):
        assert state_fingerprints(states, tower) == {state: tower_fingerprint(model, tower) for state, model in states.items()}
    assert prints(on_gpu) == prints(toy)
