"""Checksums of what qbench reads back from disk: cache entries (features, prompt embeddings, corrupted
pixels, the dropout probe) and quantized checkpoints.

Why: a cached value that is read back silently decides a stored metric. A flipped bit, a truncated file, an
entry copied under another key or a NaN written by a broken disk must never be taken for a valid value, so
every entry carries a SHA-256 over its content *and the key it was stored under* (an entry moved to another
key fails its check) and is verified on every read. What fails is removed and recomputed.

A checksum stops accidents and careless edits, not an adversary who rewrites a file and its checksum
consistently; published numbers are trusted because the leaderboard recomputes them from per-sample
evidence, not because of these hashes.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

if TYPE_CHECKING:
    import torch


def canonical_json(value: Any) -> str:
    """The one text of a JSON value that its checksum is taken over: sorted keys, no whitespace, ASCII.

    Two documents with the same content give the same text whatever their key order or indentation, so a
    checksum survives re-formatting but no change of a value."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def json_digest(value: Any, *, bind: str = "") -> str:
    """SHA-256 (hex) of ``bind`` and the canonical JSON of ``value`` (``bind`` ties it to a key or format)."""
    return hashlib.sha256(f"{bind}\0{canonical_json(value)}".encode()).hexdigest()


def tensors_digest(tensors: Mapping[str, "torch.Tensor"], *, bind: str = "") -> str:
    """SHA-256 (hex) over ``bind`` and every tensor's name, dtype, shape and bytes, in name order.

    Names, dtypes and shapes count, so a renamed, retyped or reshaped tensor with the same bytes fails too."""
    import torch

    digest = hashlib.sha256(f"{bind}\0".encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def arrays_digest(arrays: Mapping[str, np.ndarray], *, bind: str = "") -> str:
    """:func:`tensors_digest` for NumPy arrays (the corrupted-pixel cache)."""
    digest = hashlib.sha256(f"{bind}\0".encode())
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}\0{array.dtype.str}\0{tuple(array.shape)}\0".encode())
        digest.update(array.reshape(-1).view(np.uint8))
    return digest.hexdigest()


def non_finite(tensors: Mapping[str, "torch.Tensor"]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an infinity (None when all are finite)."""
    import torch

    for name in sorted(tensors):
        tensor = tensors[name]
        if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all()):
            return name
    return None
