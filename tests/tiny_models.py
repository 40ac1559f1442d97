"""Tiny open_clip CLIPs and proxy batches for quantizer tests: re-exported from the installable kit
(:mod:`qbench.testing.models`, :mod:`qbench.testing.data`) so qbench's tests and third-party packages
build the very same models and batches (built in milliseconds, no weights).

``outlier_channels`` plants activation outliers the way real CLIPs have them: the LayerNorm gains of
those residual-stream channels are multiplied by ``outlier_gain`` in every block, so the inputs of
q/k/v and fc1 carry a few channels far larger than the rest (the SmoothQuant / QuaRot setting).
"""

from __future__ import annotations

from qbench.testing.data import proxy_batch
from qbench.testing.models import CONTEXT, WIDTH, embeddings, tiny_vlm

__all__ = ["CONTEXT", "WIDTH", "embeddings", "proxy_batch", "tiny_vlm"]
