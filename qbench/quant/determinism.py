"""Reductions whose result does not depend on the number of torch threads (``qbench eval --threads``).

Why this exists: torch's CPU kernels reduce a tensor to a single value (``x.sum()``, ``x.mean()``, the
gradient of a per-tensor parameter broadcast over a large activation, a per-tensor norm) in two passes once it
has more than 32,768 elements: each thread sums its own slice and the partial sums are added, so the last float
bits depend on how many threads there were. Reductions that keep an output per row are split over the outputs
and do not have this problem. Measured on the built-in toy model: LSQ's activation steps (initialised from the mean
``|x|`` of a calibration batch, trained by the gradient summed over every activation) came out different with 1
and 2 threads, and after 100 Light-QAT steps LSQ w4a8 accuracy moved by 0.3 points.

Here such sums are accumulated in float64 in a fixed, sequential order (a cumulative sum along the reduced
dimension, which torch computes element after element whatever the thread count); the value is then rounded to
the input's dtype. On CUDA, whose reductions do not depend on CPU threads, they are plain float64 sums.
"""

from __future__ import annotations

from typing import Iterable

import torch


def ordered_sum(x: torch.Tensor, dim: int, keepdim: bool = False) -> torch.Tensor:
    """Float64 sum of ``x`` along ``dim``, added in index order on the CPU (the same bits for any thread count)."""
    wide = x.double()
    if wide.is_cuda or wide.shape[dim] == 0:
        return wide.sum(dim=dim, keepdim=keepdim)
    total = wide.cumsum(dim=dim).narrow(dim, wide.shape[dim] - 1, 1)
    return total if keepdim else total.squeeze(dim)


def ordered_mean(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Float64 mean of ``x`` along ``dim`` from :func:`ordered_sum` (thread-count independent)."""
    return ordered_sum(x, dim) / max(x.shape[dim], 1)


class _BroadcastColumns(torch.autograd.Function):
    """``column.expand(rows, width)`` whose backward sums the gradient over the width with :func:`ordered_sum`."""

    @staticmethod
    def forward(ctx, column: torch.Tensor, width: int) -> torch.Tensor:  # type: ignore[override]
        ctx.dtype = column.dtype
        return column.expand(column.shape[0], width)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return ordered_sum(grad, dim=1, keepdim=True).to(ctx.dtype), None


def broadcast_columns(column: torch.Tensor, width: int) -> torch.Tensor:
    """A ``(rows, 1)`` parameter column repeated over ``width`` columns (same values as broadcasting), whose
    gradient is reduced in a fixed order: implicit broadcasting would sum it with torch's thread-dependent
    two-pass reduction, e.g. the gradient of a per-tensor LSQ step over a whole activation."""
    if column.dim() != 2 or column.shape[1] != 1:
        raise ValueError(f"expected a (rows, 1) column, got shape {tuple(column.shape)}")
    return _BroadcastColumns.apply(column, width)


@torch.no_grad()
def clip_grad_norm_ordered(parameters: Iterable[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` (L2 norm over every gradient, coefficient ``max_norm / (norm + 1e-6)``
    capped at 1) with the norm accumulated by :func:`ordered_sum`, so clipping is the same for any thread count
    (torch's per-tensor norms of large gradients are thread-dependent two-pass reductions). Returns the norm."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    squares = torch.stack([ordered_sum(grad.detach().reshape(-1).double().square(), dim=0).cpu() for grad in grads])
    norm = ordered_sum(squares, dim=0).sqrt().to(grads[0].dtype)
    coefficient = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for grad in grads:
        grad.mul_(coefficient.to(grad.device, grad.dtype))
    return norm
