"""``qwt`` — Quantization without Tears (``quantizers.md`` §2.4).

M. Fu, H. Yu, J. Shao, J. Zhou, K. Zhu, J. Wu, "Quantization without Tears", CVPR 2025,
arXiv:2411.13918; official code github.com/wujx2001/QwT.

QwT keeps a post-training-quantized network as it is and adds, after every block, a small *float*
linear compensation fitted in closed form so that the compensated block reproduces the float block:
``out = block_q(x) + x·W + b``. Procedure (blocks in forward order, n = 512 proxy images as in the
official code):

1. quantize with a base PTQ method (``base``, default ``minmax``: any PTQ quantizer of the registry the run
   was resolved with, with its own default configuration; see :meth:`QwTQuantizer.bind`);
2. for block k: X = the inputs of block k in the *already compensated* quantized model (captured with
   :func:`qbench.quant.blockwise.capture_block_inputs`, so the compensations of blocks < k act);
   ``Y_fp = block_fp(X)`` (the same block with its quantizers off) and ``Y_q = block_q(X)``; rows = all
   tokens (text: positions after end-of-text excluded, ``quantizers.md`` §1.1);
3. ``X̃ = [X, 1]``, ``[W; b] = (X̃ᵀX̃ + λI)⁻¹ X̃ᵀ (Y_fp − Y_q)`` in float64 with
   ``λ = ridge · tr(X̃ᵀX̃)/(d+1)`` (the official code uses a plain inverse; the tiny ridge only guards a
   singular X̃ᵀX̃), accumulated batch by batch from the normal equations;
4. ``R² = 1 − SS_res/SS_tot`` on the calibration rows (SS_tot about the per-column mean, as in the
   official code); R² ≤ 0 ⇒ W = b = 0; then the next block's inputs are captured through the compensated
   block.

The compensation (:class:`QwTCompensation`, d² + d parameters per block) is attached to the block as the
submodule ``qwt_compensation`` and applied by a forward hook, so module names, and therefore every
quantized module's name and state-dict key, stay those of the base model. It is float by design (the
follow-up QwT-v2 targets exactly this overhead), listed in :attr:`QuantizedModel.float_extras` and counted
in provenance. Blocks are the residual transformer blocks of each in-scope tower found by
:func:`qbench.quant.structure.transformer_blocks` (open_clip towers today; ConvNeXt/MBConv blocks are not
discovered yet, so those towers get no compensation).

"Block_fp = quantizers off" is exact for bases whose transforms are float-exact (minmax, SmoothQuant
folding, QuaRot rotations); a base that changes float parameters beyond that (Q-VLM's LayerNorm tuning)
is compensated towards its own tuned float block.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch
from torch import nn

from qbench.errors import QbenchError
from qbench.hookspecs import hookimpl
from qbench.model import VLM
from qbench.quant.base import CalibrationData, QuantizedModel, Quantizer, QuantizerConfig
from qbench.quant.ptq import PTQQuantizer, require_calibration
from qbench.quant.blockwise import BlockCall, capture_block_inputs, run_block, stream_input, token_rows, tower_inputs
from qbench.quant.layout import QuantLayout
from qbench.quant.spec import BitSpec, Scope
from qbench.quant.structure import TransformerBlock, transformer_blocks

if TYPE_CHECKING:
    from qbench.registry import Registry

COMPENSATION_ATTR = "qwt_compensation"
FLOAT_EXTRA_REASON = "QwT compensation, float by design, d²+d params"


@dataclass(frozen=True)
class QwTConfig(QuantizerConfig):
    """``n_calibration`` proxy images for the regression (official: 512), the base PTQ method by registry
    name, the relative ridge λ/(tr(X̃ᵀX̃)/(d+1)) and the capture batch size."""

    n_calibration: int = 512
    base: str = "minmax"
    ridge: float = 1e-6
    batch_size: int = 100


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


# -- the plugin ------------------------------------------------------------------------------------
class QwTQuantizer(PTQQuantizer):
    """Base PTQ + closed-form float linear compensation after every block (Fu et al., CVPR 2025).

    A :class:`~qbench.quant.ptq.PTQQuantizer` that overrides :meth:`quantize` instead of filling in the
    template's steps: QwT does not choose quantizers or calibrate them itself, it runs another PTQ method
    (which follows the template) and then adds its compensation to that method's result.

    The base method comes from the registry the run was resolved with: :meth:`bind` (called by
    ``evaluate.resolve`` through ``from_params(params, registry=...)``) checks ``base`` there, a one-line
    did-you-mean error for an unknown name. A QwT constructed directly (tests, scripts) and never bound looks
    its base up in the built-ins-only registry (:meth:`~qbench.quant.base.Quantizer.plugin_registry`): a
    built-in base works, an installed plugin's base needs ``bind``.
    """

    name = "qwt"
    citation = (
        "M. Fu, H. Yu, J. Shao, J. Zhou, K. Zhu, J. Wu, 'Quantization without Tears', CVPR 2025, "
        "arXiv:2411.13918; github.com/wujx2001/QwT"
    )
    summary = "base PTQ plus a closed-form float linear compensation x·W + b after every block (ridge, R² > 0)"
    needs_data = True
    needs_grad = False
    Config = QwTConfig

    def bind(self, registry: "Registry") -> None:
        """Remember the run's registry and check the base method in it now (resolution time)."""
        super().bind(registry)
        self._base_class(registry)

    def quantize(
        self,
        model: VLM,
        bits: BitSpec,
        scope: Scope,
        calibration: CalibrationData | None,
        seed: int,
    ) -> QuantizedModel:
        config: QwTConfig = self.config  # type: ignore[assignment]
        self._check(config, calibration)
        base = self._base_quantizer()
        based = base.quantize(model, bits, scope, calibration if base.needs_data else None, seed)
        model = based.model
        subset = calibration.take(config.n_calibration)
        blocks = transformer_blocks(model, scope.towers)
        fits = {block.name: self._compensate(model, block, subset, config) for block in blocks}
        model.clear_caches()
        extras = dict(based.float_extras)
        extras.update({f"{name}.{COMPENSATION_ATTR}": FLOAT_EXTRA_REASON for name in fits})
        return QuantizedModel(
            model,
            provenance=self._provenance(config, bits, scope, seed, subset, based, blocks, fits),
            float_extras=extras,
        )

    def verification_layout(self, bits: BitSpec) -> QuantLayout:
        """The base PTQ method's layout: QwT only adds float compensation (a float extra) after each block
        (Fu et al., CVPR 2025, arXiv:2411.13918); the quantized modules are the base's."""
        return self._base_quantizer().verification_layout(bits)

    # -- steps ------------------------------------------------------------------------------------
    def _check(self, config: QwTConfig, calibration: CalibrationData | None) -> None:
        require_calibration(self.name, calibration)
        if config.n_calibration < 1 or config.batch_size < 1:
            raise QbenchError(
                f"qwt: n_calibration and batch_size must be >= 1, got {config.n_calibration}, {config.batch_size}"
            )
        if not config.ridge >= 0.0:
            raise QbenchError(f"qwt.ridge must be >= 0, got {config.ridge}")

    def _base_class(self, registry: "Registry") -> type[Quantizer]:
        """The class of ``config.base`` in ``registry``; it must be another PTQ quantizer."""
        name = self.config.base  # type: ignore[attr-defined]
        try:
            cls = registry.get("quantizers", name)
        except QbenchError as error:
            if self.registry is not None:
                raise
            raise QbenchError(
                f"qwt.base: {error}; an unbound qwt looks its base up among the built-ins only, so resolve it "
                "through the registry that has the base (QwTQuantizer.from_params(params, registry=...))"
            ) from None
        if cls.family != "ptq" or cls.name == self.name:
            raise QbenchError(f"qwt.base must name another PTQ quantizer, got {name!r} (family {cls.family})")
        return cls

    def _base_quantizer(self) -> Quantizer:
        """The base PTQ method with its default configuration, bound to the same registry."""
        registry = self.plugin_registry()
        return self._base_class(registry).from_params({}, registry=registry)

    def _compensate(self, model: VLM, block: TransformerBlock, data: CalibrationData, config: QwTConfig) -> CompensationFit:
        """Capture block inputs through the compensated prefix, fit, install (zeros when R² ≤ 0)."""
        inputs = tower_inputs(block.tower, data)
        calls = capture_block_inputs(model, block.module, batch_size=config.batch_size, **inputs)
        fit = fit_compensation(block.module, calls, ridge=config.ridge)
        weight, bias = fit.weight, fit.bias
        if not fit.applied:
            weight, bias = torch.zeros_like(weight), torch.zeros_like(bias)
        install_compensation(block.module, weight, bias)
        return fit

    def _provenance(
        self,
        config: QwTConfig,
        bits: BitSpec,
        scope: Scope,
        seed: int,
        data: CalibrationData,
        based: QuantizedModel,
        blocks: Sequence[TransformerBlock],
        fits: dict[str, CompensationFit],
    ) -> dict[str, Any]:
        per_block = {
            name: {
                "r2": fit.r2,
                "applied": fit.applied,
                "rows": fit.rows,
                "err_before": fit.err_before,
                "err_after": fit.err_after if fit.applied else fit.err_before,
                "ridge_lambda": fit.ridge_lambda,
                "extra_parameters": fit.weight.numel() + fit.bias.numel(),
            }
            for name, fit in fits.items()
        }
        base_extra = based.provenance.get("extra_parameters", 0) or 0
        return {
            "method": self.name,
            "config": self.params(),
            "bits": str(bits),
            "scope": scope.value,
            "seed": seed,
            "base": based.provenance,
            "calibration": {"source": data.source, "fingerprint": data.fingerprint, "n_images": int(data.images.shape[0]),
                            "n_texts": int(data.tokens.shape[0]) if "text" in scope.towers else 0},
            "blocks": per_block,
            "blocks_by_tower": dict(Counter(block.tower for block in blocks)),
            "blocks_compensated": sum(fit.applied for fit in fits.values()),
            "extra_parameters": base_extra + sum(entry["extra_parameters"] for entry in per_block.values()),
            "compensation_parameters": sum(entry["extra_parameters"] for entry in per_block.values()),
        }


@hookimpl
def qbench_register_quantizers() -> list[type[Quantizer]]:
    return [QwTQuantizer]
