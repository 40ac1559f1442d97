"""The torch side of ``qwt`` (:mod:`qbench_plugins.quantizers.qwt`): the compensation module, its forward hook and
the closed-form fit.

Kept apart from the registration module so that registering the plugin (``qbench list``) does not import torch;
the quantizer imports this module when it compensates the blocks.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from qbench.quant.blockwise import BlockCall, run_block, stream_input, token_rows
from qbench_plugins.quantizers.qwt import COMPENSATION_ATTR

__all__ = ["CompensationFit", "QwTCompensation", "compensation_disabled", "fit_compensation", "install_compensation"]


# -- the compensation module -----------------------------------------------------------------------
class QwTCompensation(nn.Module):
    """``x ↦ x·W + b`` with ``W`` of shape ``(d, d)`` (input features × output features), kept in float.

    ``enabled`` lets analysis code look at the bare quantized block (:func:`compensation_disabled`).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        if weight.dim() != 2 or weight.shape[0] != weight.shape[1] or bias.shape != weight.shape[1:]:
            raise ValueError(f"QwT compensation needs W (d, d) and b (d,), got {tuple(weight.shape)}, {tuple(bias.shape)}")
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)
        self.enabled = True

    @property
    def n_parameters(self) -> int:
        return self.weight.numel() + self.bias.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.to(x.dtype) + self.bias.to(x.dtype)


def _apply_compensation(block: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
    """Forward hook of a compensated block: ``block_q(x) + x·W + b`` (module-level so deep copies keep it)."""
    compensation: QwTCompensation = getattr(block, COMPENSATION_ATTR)
    if not compensation.enabled:
        return output
    return output + compensation(stream_input(args, kwargs))


def install_compensation(block: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> QwTCompensation:
    """Attach ``x·W + b`` after ``block`` (cast to the block's parameter dtype and device)."""
    if hasattr(block, COMPENSATION_ATTR):
        raise ValueError(f"{type(block).__name__} already carries a QwT compensation")
    reference = next(block.parameters())
    compensation = QwTCompensation(
        weight.to(device=reference.device, dtype=reference.dtype),
        bias.to(device=reference.device, dtype=reference.dtype),
    )
    block.add_module(COMPENSATION_ATTR, compensation)
    block.register_forward_hook(_apply_compensation, with_kwargs=True)
    return compensation


@contextmanager
def compensation_disabled(model: nn.Module) -> Iterator[None]:
    """Every QwT compensation below ``model`` bypassed (the base quantized blocks), re-enabled after."""
    compensations = [module for module in model.modules() if isinstance(module, QwTCompensation)]
    previous = [module.enabled for module in compensations]
    try:
        for module in compensations:
            module.enabled = False
        yield
    finally:
        for module, enabled in zip(compensations, previous):
            module.enabled = enabled


# -- the closed-form fit ---------------------------------------------------------------------------
@dataclass(frozen=True)
class CompensationFit:
    """Ridge solution of ``Y_fp − Y_q ≈ X·W + b`` on the calibration rows, float64.

    ``weight``/``bias`` are the raw solution (before the R² rule); ``err_before`` = ‖Y_fp − Y_q‖² and
    ``err_after`` = ‖Y_fp − Y_q − (XW + b)‖² summed over the rows; ``r2`` = 1 − err_after/SS_tot.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    r2: float
    rows: int
    err_before: float
    err_after: float
    ridge_lambda: float

    @property
    def applied(self) -> bool:
        """The official rule: only a fit that explains some variance (R² > 0) is kept."""
        return self.r2 > 0.0


class _NormalEquations:
    """Running ``X̃ᵀX̃``, ``X̃ᵀE``, ``Σ E²``, ``Σ E`` and the row count for ``E ≈ X̃·β`` (float64)."""

    def __init__(self, d_in: int, d_out: int, device: torch.device) -> None:
        options = {"dtype": torch.float64, "device": device}
        self.gram = torch.zeros(d_in + 1, d_in + 1, **options)
        self.cross = torch.zeros(d_in + 1, d_out, **options)
        self.err_sum = torch.zeros(d_out, **options)
        self.err_sq = torch.zeros((), **options)
        self.rows = 0

    def add(self, x: torch.Tensor, e: torch.Tensor) -> None:
        x1 = torch.cat([x.double(), x.new_ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
        e = e.double()
        self.gram += x1.T @ x1
        self.cross += x1.T @ e
        self.err_sum += e.sum(dim=0)
        self.err_sq += e.pow(2).sum()
        self.rows += x.shape[0]

    def solve(self, ridge: float) -> CompensationFit:
        size = self.gram.shape[0]
        lam = ridge * float(torch.trace(self.gram)) / size
        eye = torch.eye(size, dtype=torch.float64, device=self.gram.device)
        beta = torch.linalg.solve(self.gram + lam * eye, self.cross)
        err_before = float(self.err_sq)
        residual = err_before - 2.0 * float((beta * self.cross).sum()) + float((beta * (self.gram @ beta)).sum())
        residual = max(residual, 0.0)
        total = err_before - float(self.err_sum.pow(2).sum()) / max(self.rows, 1)
        r2 = 1.0 - residual / total if total > 0.0 else 0.0
        return CompensationFit(beta[:-1], beta[-1], r2, self.rows, err_before, residual, lam)


@torch.no_grad()
def fit_compensation(
    block: nn.Module, calls: Sequence[BlockCall], *, ridge: float, quantized: bool = True
) -> CompensationFit:
    """Fit ``Y_fp − Y_q ≈ X·W + b`` for one block on its captured calls (``quantized=False``: Y_q = Y_fp).

    ``Y_fp`` is the block with its quantizers off, ``Y_q`` with them on; both read the same X. Rows are
    the valid token positions of every batch.
    """
    if not calls:
        raise ValueError("fit_compensation needs at least one captured batch")
    equations: _NormalEquations | None = None
    for call in calls:
        y_fp = run_block(block, call, quantized=False)
        y_q = run_block(block, call, quantized=quantized)
        x = token_rows(call.x, call.valid)
        e = token_rows(y_fp, call.valid).double() - token_rows(y_q, call.valid).double()
        if equations is None:
            equations = _NormalEquations(x.shape[1], e.shape[1], x.device)
        equations.add(x, e)
    return equations.solve(ridge)
