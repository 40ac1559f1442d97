"""The shared post-training quantization template: :class:`PTQQuantizer` (``quantizers.md`` §1.6-§1.7).

Every PTQ method of qbench does the same thing around what makes it that method:

1. check its configuration (one-line :class:`~qbench.errors.QbenchError` naming the setting) and take the
   first ``n_calibration`` proxy pairs (data-free methods take none);
2. rewrite the in-scope attention so q/k/v/out are Linears (and a ``probs`` slot exists);
3. :meth:`PTQQuantizer.prepare` — anything done on the *float* model before quantizers go in: an exact
   equivalence transform (SmoothQuant's smoothing, Outlier Suppression's gamma migration, QuaRot's
   rotations) and/or float targets the method needs later (APQ-ViT's block gradients);
4. :meth:`PTQQuantizer.wrap` — every in-scope Linear/Conv2d gets the quantizers of
   :meth:`PTQQuantizer.weight_quantizer` / :meth:`PTQQuantizer.act_quantizer` (default: the baseline
   layout, weights per-channel symmetric minmax, inputs per-tensor asymmetric static minmax);
5. :meth:`PTQQuantizer.install` — quantizers outside the wrapped modules (attention ``probs`` slots);
6. :meth:`PTQQuantizer.calibrate` — the calibration pass over the proxy pairs, then freeze (data-free
   methods only freeze: weights observe themselves, activations are dynamic);
7. :meth:`PTQQuantizer.refine` — a search or light tuning on the calibrated model (Q-VLM's blockwise range
   search and LayerNorm tuning, APQ-ViT's BBC search, Outlier Suppression's LSQ+ tuning);
8. provenance: method, config, bits, scope, seed, the calibration record, the first module's quantizer
   settings (:meth:`PTQQuantizer.module_settings`), the layout counts, the added parameter count
   (:meth:`PTQQuantizer.extra_parameters`) and whatever the steps returned.

A step returns an :class:`~qbench.quant.qat.Additions` (provenance entries and float modules the verifier
must list, the same record QAT methods return); state a method needs in a later step goes in
:attr:`PTQRun.state`. A new PTQ method overrides only the steps that make it that method: a calibrating
method with its own activation observer is a ``Config`` and an :meth:`PTQQuantizer.act_quantizer`.
A method that genuinely does not fit (QwT wraps another method's result) overrides :meth:`quantize` and says
so in its docstring.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qbench.errors import QbenchError
from qbench.quant.base import CalibrationData, QuantizedModel, Quantizer
from qbench.quant.qat import Additions
from qbench.quant.spec import BitSpec, Scope

if TYPE_CHECKING:  # PTQ plugins subclass this at registration (qbench list): the torch side is imported in the steps
    from torch import nn

    from qbench.quant.modules import QuantModule, TensorQuantizer
    from qbench.vlm import VLM

__all__ = ["Additions", "DEFAULT_CALIBRATION_BATCH", "PTQQuantizer", "PTQRun", "require_calibration"]

DEFAULT_CALIBRATION_BATCH = 100
"""Calibration batch size of a method whose ``Config`` has no ``batch_size`` field."""


def require_calibration(method: str, calibration: CalibrationData | None) -> CalibrationData:
    """``calibration`` when it holds pairs; else the one-line error every calibrating method gives."""
    if calibration is None or len(calibration) == 0:
        raise QbenchError(f"quantizer {method!r} needs calibration data: pass a proxy (--proxy) with image-caption pairs")
    return calibration


@dataclass
class PTQRun:
    """One PTQ quantization in progress: what the template's steps read and write.

    ``model`` is the private copy being quantized (modified in place); ``data`` the first ``n_calibration``
    proxy pairs (None for a data-free method); ``rewritten`` the number of attention modules rewritten;
    ``wrapped`` the quantized modules once :meth:`PTQQuantizer.wrap` ran (``{name inside vlm.model:
    module}``); ``state`` what a method's step leaves for its later steps (e.g. float targets captured in
    :meth:`PTQQuantizer.prepare` and used in :meth:`PTQQuantizer.refine`).
    """

    model: VLM
    bits: BitSpec
    scope: Scope
    seed: int
    data: CalibrationData | None
    rewritten: int = 0
    wrapped: dict[str, QuantModule] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def towers(self) -> tuple[str, ...]:
        """The towers in scope (the image tower always; the text tower in joint scope)."""
        return tuple(self.scope.towers)

    def need_data(self) -> CalibrationData:
        """The calibration pairs, for a step that cannot run without them (a bug if called data-free)."""
        if self.data is None:
            raise RuntimeError("this PTQ step needs calibration data, but the method declared needs_data=False")
        return self.data


class PTQQuantizer(Quantizer):
    """Base class of PTQ plugins: :meth:`quantize` is the shared template, each step an overridable method.

    Class attributes as for every :class:`~qbench.quant.base.Quantizer` (``name``, ``citation``,
    ``summary``, ``Config``); ``needs_data`` defaults to True (set False for a data-free method, which then
    gets no calibration pairs and is frozen without a calibration pass). A ``Config`` field
    ``n_calibration`` sets how many proxy pairs the method uses (default: all it is given) and
    ``batch_size`` the calibration batch size (default :data:`DEFAULT_CALIBRATION_BATCH`).
    """

    family = "ptq"
    needs_data = True
    needs_grad = False

    # -- steps a method overrides -------------------------------------------------------------------
    def check(self, bits: BitSpec) -> None:
        """Validate the configuration before touching the model (one-line QbenchError naming the setting).

        Default: ``n_calibration`` and ``batch_size``, where the ``Config`` has them, must be >= 1.
        """
        for setting in ("n_calibration", "batch_size"):
            value = getattr(self.config, setting, None)
            if value is not None and value < 1:
                raise QbenchError(f"{self.name}: {setting} must be >= 1, got {value}")

    def prepare(self, run: PTQRun) -> Additions:
        """Work on the float model (attention already rewritten) before any quantizer goes in: an exact
        equivalence transform and/or float targets kept in ``run.state``. None by default."""
        return Additions()

    def weight_quantizer(self, bits: BitSpec, name: str, module: nn.Module) -> TensorQuantizer:
        """The weight quantizer of one in-scope module: per-output-channel symmetric minmax by default."""
        from qbench.quant.modules import make_weight_quantizer

        return make_weight_quantizer(bits.weight_bits)

    def act_quantizer(self, bits: BitSpec, name: str, module: nn.Module) -> TensorQuantizer | None:
        """The input quantizer of one in-scope module: per-tensor asymmetric static minmax by default (None
        at A16, activations stay float)."""
        from qbench.quant.modules import make_activation_quantizer

        return make_activation_quantizer(bits.act_bits)

    def wrap(self, run: PTQRun) -> dict[str, QuantModule]:
        """Replace every in-scope Linear/Conv2d by its quantized twin from the two factories."""
        from qbench.quant.modules import quantize_modules

        return quantize_modules(
            run.model,
            run.towers,
            lambda name, module: self.weight_quantizer(run.bits, name, module),
            lambda name, module: self.act_quantizer(run.bits, name, module),
        )

    def install(self, run: PTQRun) -> Additions:
        """Quantizers outside the wrapped modules (e.g. attention ``probs`` slots), before calibration."""
        return Additions()

    def calibrate(self, run: PTQRun) -> dict[str, Any] | None:
        """The calibration pass over ``run.data`` (captions through the text tower in joint scope), then
        freeze; returns the provenance ``calibration`` record. Data-free: freeze only (strict) and None."""
        from qbench.quant.calibrate import calibrate_and_freeze, freeze_quantizers

        if run.data is None:
            freeze_quantizers(run.model.model, strict=True)  # weights observe themselves; activations are dynamic
            return None
        return calibrate_and_freeze(
            run.model, run.data, run.towers, n=len(run.data), batch_size=self.calibration_batch_size(run),
            method=self.name,
        )

    def refine(self, run: PTQRun) -> Additions:
        """A search or light tuning on the calibrated model (none by default)."""
        return Additions()

    def module_settings(self, run: PTQRun) -> dict[str, Any]:
        """Provenance of the quantizer settings: the first quantized module's weight and input quantizers."""
        from qbench.quant.modules import first_module_settings

        return first_module_settings(run.wrapped)

    def extra_parameters(self, run: PTQRun) -> int:
        """How many parameters the method adds to the model (0 by default)."""
        return 0

    # -- helpers ------------------------------------------------------------------------------------
    def calibration_batch_size(self, run: PTQRun) -> int:
        """The method's own hashed calibration batch size (``Config.batch_size``), never the evaluation's."""
        return int(getattr(self.config, "batch_size", DEFAULT_CALIBRATION_BATCH))

    def calibration_subset(self, calibration: CalibrationData | None) -> CalibrationData | None:
        """The first ``n_calibration`` pairs (all when the ``Config`` has no such field); None data-free.

        A calibrating method given no pairs is a one-line error naming the fix.
        """
        if not self.needs_data:
            return None
        data = require_calibration(self.name, calibration)
        n = getattr(self.config, "n_calibration", None)
        return data.take(int(n)) if n is not None else data

    # -- the template -------------------------------------------------------------------------------
    def quantize(
        self,
        model: VLM,
        bits: BitSpec,
        scope: Scope,
        calibration: CalibrationData | None,
        seed: int,
    ) -> QuantizedModel:
        """check → subset → rewrite → prepare → wrap → install → calibrate → refine → provenance."""
        from qbench.quant.modules import layout_counts, rewrite_tower_attention

        self.check(bits)
        run = PTQRun(model, bits, scope, seed, self.calibration_subset(calibration))
        run.rewritten = rewrite_tower_attention(model, run.towers)
        additions = self.prepare(run)
        run.wrapped = self.wrap(run)
        additions = additions.merge(self.install(run))
        fitted = self.calibrate(run)
        additions = additions.merge(self.refine(run))
        model.clear_caches()
        provenance = {
            "method": self.name,
            "config": self.params(),
            "bits": str(bits),
            "scope": scope.value,
            "seed": seed,
            "calibration": fitted,
            **self.module_settings(run),
            **layout_counts(model, run.wrapped, run.rewritten),
            "extra_parameters": self.extra_parameters(run),
            **additions.provenance,
        }
        return QuantizedModel(model, provenance=provenance, float_extras=dict(additions.float_extras))
