"""Corrupted-image cache benchmark (``suites.md`` §3.3): corrupting on the fly vs reading the pixel cache.

Builds a CIFAR-like split of random 32x32 images, resizes each to the model crop (224 px, bicubic) and
corrupts it with each of the four ``cifar10c-ic`` corruptions at severity 3, once into an empty pixel
cache (corrupt + write) and once from the filled cache (read). Prints milliseconds per image for both,
their ratio (read / corrupt; the saving for every quantized model evaluated after the first), the cache
size per image, and checks that the cached pixels equal freshly corrupted ones.

Usage: ``python benchmarks/perf/corruption_cache.py [--images 100] [--size 224]``
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from qbench.data import ArrayImages
from qbench.engine.corruptions import CorruptedImages, STUDY_CORRUPTIONS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    base = ArrayImages("random", rng.integers(0, 256, (args.images, 32, 32, 3), dtype=np.uint8),
                       rng.integers(0, 10, args.images), tuple(f"c{i}" for i in range(10)), ("{}",))
    with tempfile.TemporaryDirectory() as folder:
        for corruption in STUDY_CORRUPTIONS:
            split = CorruptedImages(base, corruption, 3, 0, size=args.size).with_pixel_cache(Path(folder))
            started = time.perf_counter()
            fresh = [split.array(index) for index in range(args.images)]
            corrupt_ms = 1000 * (time.perf_counter() - started) / args.images
            started = time.perf_counter()
            cached = [split.array(index) for index in range(args.images)]
            read_ms = 1000 * (time.perf_counter() - started) / args.images
            assert all(np.array_equal(a, b) for a, b in zip(fresh, cached))
            size = sum(path.stat().st_size for path in (Path(folder) / split.fingerprint).glob("*.safetensors")) / args.images
            print(f"{corruption:15s} corrupt+write {corrupt_ms:7.2f} ms/image · cached read {read_ms:6.3f} ms/image · "
                  f"ratio {read_ms / corrupt_ms:.4f} · {size / 1024:.0f} KiB/image")


if __name__ == "__main__":
    main()
