"""Exact (float) re-parameterisations across a LayerNorm and the Linears that read it.

Shared by SmoothQuant (per-channel smoothing scales), Outlier Suppression (gamma migration) and QuaRot
(folding the norm's affine part before rotating). Each transform leaves the block's float output
unchanged up to rounding; the maths runs in float64 and is cast back (``quantizers.md`` §1.1).

With ``n = (x − μ)/σ`` the normalised input, a LayerNorm computes ``γ ⊙ n + β`` and a reader
``W (γ ⊙ n + β) + b``:

* :func:`scale_norm_and_readers` — ``γ ← γ / s``, ``β ← β / s``, ``W ← W · diag(s)``: the reader's input
  is divided by ``s`` per channel and its weight columns multiplied back (SmoothQuant).
* :func:`fold_norm_into_readers` — ``b ← b + W β``, ``W ← W · diag(γ)``, then ``γ = 1, β = 0``: the norm
  becomes affine-free and the readers absorb it (QuaRot / SliceGPT).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from qbench.quant.structure import NormReaders


def _readers(pair: NormReaders) -> Sequence[nn.Linear]:
    return [reader for _, reader in pair.readers]


@torch.no_grad()
def scale_norm_and_readers(pair: NormReaders, scales: torch.Tensor) -> None:
    """Divide the norm's output channels by ``scales`` and multiply the readers' input columns by them."""
    s = scales.detach().to(torch.float64).flatten()
    norm = pair.norm
    if norm.weight is None:
        raise ValueError(f"{pair.norm_name} has no affine weight to absorb a scale")
    if s.numel() != norm.weight.numel() or not torch.all(s > 0):
        raise ValueError(f"scales for {pair.norm_name} must be {norm.weight.numel()} positive values")
    norm.weight.copy_((norm.weight.double() / s).to(norm.weight.dtype))
    if norm.bias is not None:
        norm.bias.copy_((norm.bias.double() / s).to(norm.bias.dtype))
    for reader in _readers(pair):
        reader.weight.copy_((reader.weight.double() * s).to(reader.weight.dtype))


@torch.no_grad()
def fold_norm_into_readers(pair: NormReaders) -> None:
    """Move the norm's ``γ, β`` into every reader (``b += W β``, ``W ← W diag(γ)``); the norm keeps ``γ = 1, β = 0``."""
    norm = pair.norm
    device = pair.readers[0][1].weight.device
    gamma = (norm.weight.double() if norm.weight is not None
             else torch.ones(norm.normalized_shape, dtype=torch.float64, device=device))
    beta = norm.bias.double() if norm.bias is not None else torch.zeros_like(gamma)
    for reader in _readers(pair):
        weight = reader.weight.double()
        shift = weight @ beta
        if reader.bias is None:
            reader.bias = nn.Parameter(shift.to(reader.weight.dtype))
        else:
            reader.bias.copy_((reader.bias.double() + shift).to(reader.bias.dtype))
        reader.weight.copy_((weight * gamma).to(reader.weight.dtype))
    if norm.weight is not None:
        norm.weight.fill_(1.0)
    if norm.bias is not None:
        norm.bias.zero_()


def input_channel_absmax(pair: NormReaders) -> torch.Tensor:
    """``max_rows |W_{:, j}|`` over all readers of the pair: SmoothQuant's weight-side statistic ``w_j``."""
    return torch.stack([reader.weight.detach().abs().amax(dim=0) for reader in _readers(pair)]).amax(dim=0)


GAMMA_FLOOR = 1e-6
"""Smallest |γ| gamma migration divides by (Outlier Suppression, ``quantizers.md`` §2.7); the sign is kept."""


@torch.no_grad()
def migrate_gamma(pair: NormReaders, floor: float = GAMMA_FLOOR) -> torch.Tensor:
    """Outlier Suppression's gamma migration: the norm's scale γ moves into its readers.

    ``W (γ ⊙ n + β) + b = (W · diag(γ)) (n + β/γ) + b``: the norm becomes ``n + β/γ`` (weight 1, bias
    ``β/γ``) and every reader's input columns are multiplied by γ, so the quantized activation no longer
    carries γ's outlier channels (Wei et al., NeurIPS 2022, arXiv:2209.13325). |γ| is floored at
    ``floor`` with its sign kept (γ = 0 counts as positive) so ``β/γ`` stays finite; the transform is
    exact in float unless a |γ| was below the floor. Maths in float64, cast back. Returns the γ that was
    migrated (after flooring, float64), e.g. for provenance.
    """
    norm = pair.norm
    if norm.weight is None:
        raise ValueError(f"{pair.norm_name} has no affine weight to migrate")
    gamma = norm.weight.double()
    sign = torch.where(gamma < 0, -1.0, 1.0).to(torch.float64)
    gamma = sign * gamma.abs().clamp(min=floor)
    if norm.bias is not None:
        norm.bias.copy_((norm.bias.double() / gamma).to(norm.bias.dtype))
    norm.weight.fill_(1.0)
    for reader in _readers(pair):
        reader.weight.copy_((reader.weight.double() * gamma).to(reader.weight.dtype))
    return gamma
