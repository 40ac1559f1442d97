"""Checkpoint benchmark: how much of a QAT evaluation a saved quantized model saves, and what it costs to load.

Quantizes the toy model once with a QAT method (calibration + Light QAT), saves the checkpoint, restores
it, and checks that the restored model's image embeddings on the proxy pairs are bit-identical. Prints

* seconds to obtain the quantized model by quantizing (calibration + training) vs by restoring the
  checkpoint (read, hash check, structure rebuild, tensor assignment), and their ratio
  (restore / quantize; target: well below 0.1 for QAT);
* seconds to save, the checkpoint's size, and the number of structure records.

Usage: ``python benchmarks/perf/checkpoint.py [--quantizer lsq] [--bits w4a8] [--steps 100] [--device cpu|cuda]``
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from qbench.engine.checkpoint import read_checkpoint, restore_quantized, save_checkpoint
from qbench.data import DatasetRequest
from qbench.engine.evaluate import EvalRequest, Progress, _calibration, quantize_model, resolve
from qbench.model import LoadRequest
from qbench.registry import build_registry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy-clip")
    parser.add_argument("--quantizer", default="lsq")
    parser.add_argument("--bits", default="w4a8")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    params = (("steps", str(args.steps)),) if build_registry().get("quantizers", args.quantizer).family == "qat" else ()
    request = EvalRequest(model=args.model, quantizer=args.quantizer, quantizer_params=params, bits=args.bits,
                          device=args.device, suites=())
    resolved = resolve(request, build_registry(), require_suites=False)
    fp32 = resolved.model.loader(LoadRequest(device=args.device)).to(args.device).eval()
    calibration = _calibration(resolved, fp32, DatasetRequest(None, 0)) if resolved.proxy else None

    started = time.perf_counter()
    quantized = quantize_model(resolved, fp32, calibration, Progress())
    quantize_s = time.perf_counter() - started

    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder) / "checkpoint"
        started = time.perf_counter()
        checkpoint = save_checkpoint(target, fp32, quantized, resolved.quantization_config)
        save_s = time.perf_counter() - started
        size_mb = sum(path.stat().st_size for path in target.iterdir()) / 2**20
        started = time.perf_counter()
        restored = restore_quantized(read_checkpoint(target), fp32)
        restore_s = time.perf_counter() - started

    images = (calibration.images if calibration is not None else None)
    identical = "n/a (no proxy images)"
    if images is not None:
        with torch.no_grad():
            batch = images[:64]
            identical = str(torch.equal(quantized.model.eval().encode_image(batch), restored.model.encode_image(batch)))
    print(f"{args.quantizer} {args.bits} on {args.model} ({args.device}), {args.steps} QAT steps")
    print(f"quantize (calibration + training): {quantize_s:8.2f} s")
    print(f"restore from checkpoint:           {restore_s:8.2f} s   ratio restore/quantize = {restore_s / quantize_s:.4f}")
    print(f"save: {save_s:.2f} s, {size_mb:.1f} MiB, {len(checkpoint.document['structure'])} structure records, "
          f"{checkpoint.document['state']['tensors']} tensors")
    print(f"restored embeddings bit-identical: {identical}")


if __name__ == "__main__":
    main()
