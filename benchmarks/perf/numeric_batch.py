"""Numeric-batch benchmark: CPU image-encoding throughput of fixed-shape passes vs memory-sized batches.

Since features must not depend on the batch size, every image encoding runs in passes of exactly
:data:`qbench.engine.batching.NUMERIC_BATCH` images, the last padded (:class:`qbench.engine.batching.FixedChunks`), instead of one
pass per memory-sized loader batch. This measures what that costs: the same preprocessed images are encoded the
old way (one pass per ``--batch-size`` slice) and the new way, interleaved (old, new, old, new, ...) so that load
changes on a shared machine hit both alike, with the torch thread count set explicitly. Prints images/s of each
(median over ``--repeats``) and the ratio new/old (below 1: the fixed passes are slower); ``--chunks`` compares
other pass sizes. It also checks that the
new features are the same for two batch sizes, bit for bit, and reports whether the old ones were.

Models: the toy world's ``toy-clip`` (32 px) and, with ``--vit``, a random-init open_clip ViT-B-32 at 224 px, a
realistic CPU encoder (``--images`` of them, default 96).

Usage: ``python benchmarks/perf/numeric_batch.py [--threads 2] [--batch-size 256] [--repeats 5] [--vit] [--chunks 32 64]``
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from qbench.engine.batching import NUMERIC_BATCH, AdaptiveBatch, FixedChunks


def old_encode(encode: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Before: one forward pass per loader batch of ``batch_size`` images (the last one short)."""
    return torch.cat([encode(piece) for piece in pixels.split(batch_size)])


def new_encode(encode: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor, batch_size: int,
               chunk: int = NUMERIC_BATCH) -> torch.Tensor:
    """Now: loader batches of ``batch_size`` fed to fixed passes of ``chunk`` images (:data:`NUMERIC_BATCH`)."""
    chunks = FixedChunks(encode, AdaptiveBatch(batch_size), size=chunk)
    for piece in pixels.split(batch_size):
        chunks.feed(piece)
    return chunks.finish()


def seconds(method: Callable, encode: Callable, pixels: torch.Tensor, batch_size: int) -> float:
    """Wall time of one encoding of ``pixels`` by ``method``."""
    started = time.perf_counter()
    with torch.no_grad():
        method(encode, pixels, batch_size)
    return time.perf_counter() - started


def toy_encoder(images: int) -> tuple[Callable, torch.Tensor, str]:
    """The toy world's FP32 image tower and ``images`` preprocessed toy-id images."""
    from qbench.data import DatasetRequest
    from qbench.engine.features import preprocess_images
    from qbench.model import LoadRequest
    from qbench.registry import build_registry

    registry = build_registry()
    model = registry.get("models", "toy-clip").loader(LoadRequest()).eval()
    dataset = registry.get("datasets", "toy-id-test").loader(DatasetRequest(None, 0))
    count = min(images, len(dataset))
    pixels = preprocess_images([dataset.image(index) for index in range(count)], model.preprocess, 256, 0)
    return model.encode_image, pixels, "toy-clip (32 px)"


def vit_encoder(images: int) -> tuple[Callable, torch.Tensor, str]:
    """A random-init open_clip ViT-B-32 image tower and ``images`` random 224 px inputs."""
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    pixels = torch.randn(images, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    return model.encode_image, pixels, "ViT-B-32 random init (224 px)"


def measure(encode: Callable, pixels: torch.Tensor, label: str, batch_size: int, repeats: int,
            chunks: tuple[int, ...] = (NUMERIC_BATCH,)) -> None:
    """Interleaved old/new timings (one new variant per chunk size), the ratios, and the bit-identity of features
    across batch sizes."""
    methods = {"old": old_encode, **{size: (lambda e, p, b, size=size: new_encode(e, p, b, size)) for size in chunks}}
    with torch.no_grad():
        equal = {name: torch.equal(method(encode, pixels, batch_size), method(encode, pixels, 7))
                 for name, method in methods.items()}
    times: dict = {name: [] for name in methods}
    for _ in range(repeats):
        for name, method in methods.items():
            times[name].append(seconds(method, encode, pixels, batch_size))
    rates = {name: len(pixels) / statistics.median(values) for name, values in times.items()}
    print(f"{label}, {len(pixels)} images, batch size {batch_size}, {torch.get_num_threads()} threads:")
    print(f"  old (one pass per batch)        {rates['old']:9.1f} images/s; features equal for batch {batch_size} and 7: {equal['old']}")
    for size in chunks:
        print(f"  new (passes of {size:3d}, last padded) {rates[size]:9.1f} images/s; features equal for batch {batch_size} "
              f"and 7: {equal[size]}; throughput ratio new/old: {rates[size] / rates['old']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256, help="the old loader batch (CPU auto plan: 16-256)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--images", type=int, default=96, help="ViT images (toy: the 1000 toy-id images)")
    parser.add_argument("--vit", action="store_true", help="also measure a ViT-B-32 at 224 px")
    parser.add_argument("--chunks", type=int, nargs="+", default=[NUMERIC_BATCH], help="pass sizes to compare")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    measure(*toy_encoder(1000), args.batch_size, args.repeats, tuple(args.chunks))
    if args.vit:
        measure(*vit_encoder(args.images), args.batch_size, args.repeats, tuple(args.chunks))


if __name__ == "__main__":
    main()
