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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from qbench.errors import QbenchError
from qbench.hookspecs import hookimpl
from qbench.lazy import forward_names
from qbench.quant.base import CalibrationData, QuantizedModel, Quantizer, QuantizerConfig
from qbench.quant.layout import QuantLayout
from qbench.quant.ptq import PTQQuantizer, require_calibration
from qbench.quant.spec import BitSpec, Scope

if TYPE_CHECKING:  # the torch side is imported where it is used: registering (qbench list) stays cheap
    from qbench.quant.structure import TransformerBlock
    from qbench.registry import Registry
    from qbench.vlm import VLM
    from qbench_plugins.quantizers.qwt_modules import CompensationFit

COMPENSATION_ATTR = "qwt_compensation"
FLOAT_EXTRA_REASON = "QwT compensation, float by design, d²+d params"

__getattr__ = forward_names(__name__, {
    name: "qbench_plugins.quantizers.qwt_modules"
    for name in ("CompensationFit", "QwTCompensation", "_NormalEquations", "_apply_compensation", "compensation_disabled",
                 "fit_compensation", "install_compensation")
})
"""The compensation module, its hook and the fit live in :mod:`qbench_plugins.quantizers.qwt_modules` (torch)."""


@dataclass(frozen=True)
class QwTConfig(QuantizerConfig):
    """``n_calibration`` proxy images for the regression (official: 512), the base PTQ method by registry
    name, the relative ridge λ/(tr(X̃ᵀX̃)/(d+1)) and the capture batch size."""

    n_calibration: int = 512
    base: str = "minmax"
    ridge: float = 1e-6
    batch_size: int = 100


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
        from qbench.quant.structure import transformer_blocks

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
        import torch

        from qbench.quant.blockwise import capture_block_inputs, tower_inputs
        from qbench_plugins.quantizers.qwt_modules import fit_compensation, install_compensation

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
