"""The CUDA paths, run on a GPU (issue 16 item 6): quantized encoders, the out-of-memory halving, QAT training and
``qbench eval --device cuda``. Every test here is marked ``cuda`` and skipped, with the reason, where
``torch.cuda.is_available()`` is false; on a GPU machine run ``python -m pytest -q -m cuda tests/test_cuda.py``
(``benchmarks/perf/device_check.sh`` does, among its other checks). One CPU test, marked ``slow`` and not
``cuda``, runs that script's ``--dry-run`` to completion.

Tolerances, stated once. Features are L2-normalised embeddings, compared per image by ``1 - cos``:

* a model quantized on the CPU and then moved to the GPU (same quantization parameters; only the kernels
  differ, including cuDNN's default TF32 patch-embedding convolution): ``1 - cos <= 1e-4`` (the CPU's own
  reaction to a relative input change of 1e-6 is ~5e-6; W8A8 MinMax itself is ~1.5e-5 from FP32);
* a model quantized on the GPU (calibration statistics reduced on the GPU, so a range may round differently and
  move a whole grid): ``1 - cos`` at most the quantizer's own W8A8 error on the CPU (its ``1 - cos`` to the FP32
  features), and never more than 1e-4 when that error is smaller.
"""

from __future__ import annotations

import copy
import json
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import pytest
import torch

from cli_runner import run_cli
from qbench.plugins import get_plugin_manager
from qbench.registry import build_registry

CUDA_REASON = ("needs a CUDA GPU: torch.cuda.is_available() is False here; run on a GPU machine with "
               "'python -m pytest -m cuda tests/test_cuda.py' or 'bash benchmarks/perf/device_check.sh'")
on_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_REASON)
"""With ``pytest.mark.cuda``, on every GPU test below (the dry run of the device script at the end is CPU-only)."""

CUDA = "cuda"
REGISTRY = build_registry(get_plugin_manager(load_entrypoints=False))
PTQ = [entry.name for entry in REGISTRY.entries("quantizers") if entry.value.family == "ptq"]
MOVED_TOLERANCE = 1e-4
"""Largest ``1 - cos`` per image between CPU features and the same quantized model's CUDA features."""


def one_minus_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row ``1 - cos`` of two batches of embeddings (renormalised, so the measure holds for any scale)."""
    a, b = a.double().cpu(), b.double().cpu()
    return 1.0 - torch.nn.functional.cosine_similarity(a, b, dim=-1)


def image_features(vlm: Any, images: torch.Tensor) -> torch.Tensor:
    """Image embeddings of ``images`` on whatever device ``vlm`` lives, returned on the CPU."""
    with torch.no_grad():
        return vlm.encode_image(images).float().cpu()


@pytest.mark.cuda
@on_cuda
def test_the_ptq_parametrization_is_the_registrys():
    """(a) below covers every built-in PTQ quantizer: the list comes from the registry, not a copy of it."""
    assert {"minmax", "smoothquant", "quarot", "qwt"} <= set(PTQ)
    assert all(REGISTRY.get("quantizers", name).family == "ptq" for name in PTQ)


# -- (a) every PTQ quantizer's encoder on CUDA -------------------------------------------------------------
@pytest.mark.cuda
@on_cuda
@pytest.mark.parametrize("name", PTQ)
def test_ptq_encoder_on_cuda_matches_the_cpu_and_verifies(name: str) -> None:
    """Quantized on the GPU as ``qbench eval --device cuda`` does it (float model on the device, calibration
    tensors on the CPU), the encoder passes the spec verification on the GPU and its features match the
    CPU-quantized encoder's; the CPU-quantized model moved to the GPU matches too (tolerances: module doc)."""
    from qbench.testing import proxy_batch
    from qbench.testing.conformance import check_quantized_model, quantize_for_check
    from qbench.testing.models import tiny_vlm

    cls = REGISTRY.get("quantizers", name)
    float_model = tiny_vlm()
    calibration = proxy_batch(float_model, n=16)
    held_out = proxy_batch(float_model, n=32, seed=7).images
    reference = image_features(float_model, held_out)

    on_cpu = quantize_for_check(cls, float_model, calibration, "w8a8", "visual")
    cpu_features = image_features(on_cpu.model, held_out)
    quantization_error = float(one_minus_cos(cpu_features, reference).max())

    on_gpu = quantize_for_check(cls, copy.deepcopy(float_model).to(CUDA), calibration, "w8a8", "visual")
    on_gpu.model.to(CUDA).eval()  # as the engine does after quantizing
    tensors = [*on_gpu.model.parameters(), *on_gpu.model.buffers()]
    assert all(tensor.device.type == torch.device(CUDA).type for tensor in tensors)
    check_quantized_model(cls, on_gpu, calibration, "w8a8", "visual")  # verification runs on the GPU
    gpu_difference = float(one_minus_cos(image_features(on_gpu.model, held_out), cpu_features).max())
    assert gpu_difference <= max(MOVED_TOLERANCE, quantization_error), (
        f"{name}: quantized on CUDA, 1 - cos to the CPU-quantized features is {gpu_difference:.2e}; the W8A8 "
        f"error itself is {quantization_error:.2e}")

    moved = copy.deepcopy(on_cpu.model).to(CUDA).eval()
    moved_difference = float(one_minus_cos(image_features(moved, held_out), cpu_features).max())
    assert moved_difference <= MOVED_TOLERANCE, (
        f"{name}: the CPU-quantized encoder moved to CUDA differs from itself on the CPU by 1 - cos "
        f"{moved_difference:.2e} (> {MOVED_TOLERANCE:g})")


# -- (b) out-of-memory halving with a real CUDA OOM -----------------------------------------------------------
class Lines:
    """A log that keeps its lines (the ``Log`` protocol of qbench.engine.batching)."""

    def __init__(self) -> None:
        """An empty log."""
        self.lines: list[str] = []

    def log(self, message: str) -> None:
        """Keep ``message``."""
        self.lines.append(message)


@contextmanager
def ballast(room: int) -> Iterator[int]:
    """Occupy the GPU's free memory but ``room`` bytes (1 GiB blocks held until exit); yields what is left free.

    The caching allocator's idle blocks are released first, so ``mem_get_info`` sees all of them as free."""
    torch.cuda.empty_cache()
    free, _total = torch.cuda.mem_get_info()
    blocks, remaining = [], free - room
    while remaining > 0:
        size = min(remaining, 1 << 30)
        try:
            blocks.append(torch.empty(size, dtype=torch.uint8, device=CUDA))
        except torch.cuda.OutOfMemoryError:
            break
        remaining -= size
    try:
        yield torch.cuda.mem_get_info()[0]
    finally:
        del blocks
        torch.cuda.empty_cache()


def peak_bytes_per_image(encode: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> float:
    """Peak CUDA memory of encoding ``images`` in one pass, per image (input on the device included)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    encode(images)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / len(images)


@pytest.mark.cuda
@on_cuda
def test_a_real_cuda_oom_halves_the_batch_and_keeps_the_features():
    """With all but room for ~256 images of the GPU taken, an 8192-image pass runs out of memory for real;
    :class:`AdaptiveBatch` halves until a pass fits, logs it, and its features equal the same passes (same
    shapes) run afterwards with the memory free: nothing is lost or reordered by the retries."""
    from qbench.engine.batching import AdaptiveBatch
    from qbench.model import LoadRequest
    from qbench_plugins.toyworld.plugin import load_toy_clip

    initial, fits = 8192, 256
    vlm = load_toy_clip(LoadRequest()).to(CUDA).eval()
    images = torch.rand(initial, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    passes: list[int] = []

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        """The toy encoder; records the rows of every pass that completed."""
        features = vlm.encode_image(pixels)
        passes.append(len(pixels))
        return features

    log = Lines()
    batch = AdaptiveBatch(initial, log, "image")
    with torch.no_grad():
        per_image = peak_bytes_per_image(encode, images[:fits])
        passes.clear()
        room = int(per_image * fits) + (64 << 20)
        with ballast(room) as left:
            assert left < per_image * initial / 2, f"could not fill the GPU: {left / 2**20:.0f} MiB still free"
            features = batch.apply_chunk(encode, images)
        reference = torch.cat([vlm.encode_image(piece) for piece in images.split(passes)])
    assert batch.retries >= 1 and batch.size < initial, batch.to_dict()
    assert sum(passes) == initial and max(passes) < initial
    assert any("out of memory" in line for line in log.lines), log.lines
    assert batch.to_dict()["oom_retries"] == batch.retries
    assert torch.equal(features.cpu(), reference.cpu())


# -- (c) QAT on CUDA ----------------------------------------------------------------------------------------
@pytest.mark.cuda
@on_cuda
def test_lsq_trains_on_cuda_and_lowers_the_loss():
    """LSQ (12 steps, W4A8) on the toy world with the model on the GPU: the calibration-set loss drops by at
    least 10 %, every parameter and buffer stays on the GPU, and the trained encoder verifies."""
    from qbench.data import DatasetRequest
    from qbench.model import LoadRequest
    from qbench.quant.base import CalibrationData
    from qbench.quant.spec import BitSpec, Scope
    from qbench.quant.verify import verify_quantized
    from qbench_plugins.quantizers.lsq_qat import LSQConfig, LSQQATQuantizer
    from qbench_plugins.toyworld.plugin import load_toy_clip, load_toy_proxy

    vlm = load_toy_clip(LoadRequest()).to(CUDA).eval()
    pairs = load_toy_proxy(DatasetRequest(seed=0), 256)
    images = torch.stack([vlm.preprocess(image) for image in pairs.images])
    data = CalibrationData(pairs.source, images, vlm.tokenize(pairs.captions), pairs.captions, pairs.fingerprint)
    config = LSQConfig(steps=12, batch_size=64, lr_weights=1e-4, lr_quant=1e-3)
    result = LSQQATQuantizer(config).quantize(copy.deepcopy(vlm), BitSpec.parse("w4a8"), Scope.VISUAL, data, 0)
    record = result.provenance["training"]
    assert record["calibration_loss_after"] < 0.9 * record["calibration_loss_before"], record
    assert len(record["losses"]) == 12
    tensors = [*result.model.parameters(), *result.model.buffers()]
    assert all(tensor.device.type == torch.device(CUDA).type for tensor in tensors)
    report = verify_quantized(result.model, data.images[:8], data.tokens[:8], Scope.VISUAL.towers)
    assert report.passed, report.problems


# -- (d) qbench eval --device cuda end to end ---------------------------------------------------------------
@pytest.mark.cuda
@on_cuda
def test_qbench_eval_on_cuda_agrees_with_the_cpu_on_toy_id(capsys):
    """``qbench eval --device cuda`` on toy-id (128 images, MinMax W8A8, two decoding workers) succeeds, records
    the GPU and passes verification; accuracy is within 2 images and ECE within 0.01 of the CPU run."""
    args = ("eval", "--suite", "toy-id", "--quantizer", "minmax", "--limit", "128", "--workers", "2", "--json",
            "--no-feature-cache")
    code, out, err = run_cli(capsys, *args, "--device", "cuda")
    assert code == 0, err
    gpu = json.loads(out)
    code, out, err = run_cli(capsys, *args, "--device", "cpu")
    assert code == 0, err
    cpu = json.loads(out)
    assert gpu["config"]["device"] == "cuda" and not gpu["provenance"]["device"].startswith("cpu")
    assert gpu["verification"]["passed"], gpu["verification"]["problems"]
    assert gpu["datasets"]["toy-id-test"]["num_scored"] == 128

    def metrics(document: dict) -> dict[tuple[str, str], float]:
        """(metric, state) -> value of the accuracy and ECE records of one run document."""
        return {(record["metric"], state): float(record[state]) for record in document["results"]
                for state in ("fp32", "quantized") if record["metric"] in ("accuracy", "ece")}

    on_gpu, on_cpu = metrics(gpu), metrics(cpu)
    assert on_gpu.keys() == on_cpu.keys() and len(on_gpu) == 4
    for (metric, state), value in on_gpu.items():
        tolerance = 2 / 128 if metric == "accuracy" else 0.01
        assert abs(value - on_cpu[(metric, state)]) <= tolerance, (metric, state, value, on_cpu[(metric, state)])
    assert on_gpu[("accuracy", "fp32")] > 0.5  # the trained toy model, not noise


# -- the device script's dry run (CPU) ----------------------------------------------------------------------
@pytest.mark.slow
def test_device_check_dry_run_completes(tmp_path):
    """``bash benchmarks/perf/device_check.sh --dry-run`` finishes on the CPU with status 0 and writes every toy
    case (each verified, P2 measured, P4 for every real quantizer) under ``$OUT``. Not marked ``cuda``: the
    script itself runs ``pytest -m cuda``."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # this interpreter's python first
    environment = {**os.environ, "OUT": str(tmp_path), "PATH": path}
    done = subprocess.run(["bash", str(root / "benchmarks" / "perf" / "device_check.sh"), "--dry-run"], cwd=root,
                          env=environment, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "device_check.json").read_text())
    toy = {result["quantizer"]: result for result in summary["results"] if result["model"] == "toy-clip"}
    assert set(toy) == {"fp32", "minmax", "smoothquant", "quarot", "lsq"} and summary["dry_run"]
    assert all(result["verified"] and result["p2"] > 0 for result in toy.values())
    assert all(toy[name]["p4"] > 0 for name in toy if name != "fp32") and "p4" not in toy["fp32"]
    assert re.search(r"\d+ (passed|skipped)", done.stdout), done.stdout[-3000:]  # the CUDA tests ran or said why not
