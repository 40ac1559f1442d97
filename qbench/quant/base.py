"""The Quantizer plugin contract (``quantizers.md`` §1.10).

A quantizer is a class with a name, a family (``baseline``, ``ptq`` or ``qat``), flags saying whether it
needs calibration data and gradients, a frozen ``Config`` dataclass of hyperparameters whose defaults are
the paper's, and one method, :meth:`Quantizer.quantize`, that turns a float :class:`~qbench.model.VLM`
into a fake-quantized one. The core hands it a private deep copy, so it may modify the model in place.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping

from qbench.params import Configurable, PluginConfig
from qbench.quant.layout import QuantLayout
from qbench.quant.spec import BitSpec, Scope

if TYPE_CHECKING:  # the registry imports every plugin, and the plugins import this module: keep it torch-free
    import torch

    from qbench.registry import Registry
    from qbench.vlm import VLM

__all__ = ["CalibrationData", "FAMILIES", "QuantizedModel", "Quantizer", "QuantizerConfig"]

FAMILIES = ("baseline", "ptq", "qat")

ProgressCallback = Callable[[int, int, float], None]
"""``progress(step, total, loss)``, called by a training method after every optimizer step (step 1 … total)."""


@dataclass(frozen=True)
class CalibrationData:
    """Proxy image-caption pairs used to calibrate or train a quantizer (never evaluation images).

    ``images`` are already preprocessed for the model under test; ``tokens`` are the tokenized captions
    (used in joint scope and by QAT losses). ``fingerprint`` identifies the exact sample list.
    """

    source: str
    images: torch.Tensor
    tokens: torch.Tensor
    captions: tuple[str, ...]
    fingerprint: str

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def take(self, n: int) -> "CalibrationData":
        """The first ``n`` pairs, as a method with a smaller calibration budget uses."""
        n = min(n, len(self))
        return dataclasses.replace(
            self, images=self.images[:n], tokens=self.tokens[:n], captions=self.captions[:n]
        )


@dataclass(frozen=True)
class QuantizerConfig(PluginConfig):
    """Base of every quantizer's hyperparameter dataclass (subclass it with typed, defaulted fields)."""


@dataclass
class QuantizedModel:
    """A quantizer's output: the fake-quantized model plus what is worth auditing about the fit.

    ``float_extras`` names modules a method adds and keeps in float by design (e.g. a compensation
    branch), with the reason; the verifier lists and excludes them. ``artifacts`` are tensors worth
    keeping that the deployed model no longer computes with (a LoRA method's trained factors, merged
    into the zero points); checkpoints store them beside the model.
    """

    model: VLM
    provenance: dict[str, Any] = field(default_factory=dict)
    float_extras: dict[str, str] = field(default_factory=dict)
    artifacts: dict[str, torch.Tensor] = field(default_factory=dict)


class Quantizer(Configurable, ABC):
    """Base class of quantizer plugins; subclasses set the class attributes and implement ``quantize``."""

    kind = "quantizer"
    name: ClassVar[str]
    family: ClassVar[str]
    citation: ClassVar[str]
    summary: ClassVar[str]
    needs_data: ClassVar[bool] = False
    needs_grad: ClassVar[bool] = False
    Config: ClassVar[type[QuantizerConfig]] = QuantizerConfig
    progress: ProgressCallback | None = None
    """Set by the runner (the CLI draws a progress bar from it); methods that train call it after each step."""
    registry: "Registry | None" = None
    """The registry this quantizer was resolved with (:meth:`bind`); None for one constructed directly."""

    @classmethod
    def from_params(cls, params: Mapping[str, Any], registry: "Registry | None" = None) -> "Quantizer":
        """Build from user overrides (:meth:`Configurable.from_params`) and, given the run's ``registry``,
        :meth:`bind` it, so that a method naming other plugins resolves them there at resolution time."""
        quantizer = super().from_params(params)
        if registry is not None:
            quantizer.bind(registry)
        return quantizer

    def bind(self, registry: "Registry") -> None:
        """Resolution-time hook: remember the registry the run was resolved with (``evaluate.resolve`` passes
        its own), so a method that looks up other plugins (QwT's base method) uses that registry — a test
        registry, one without a disabled plugin — never a global one it builds itself. A method that names
        other plugins overrides this to check them now (one-line :class:`~qbench.errors.QbenchError`, the
        registry's did-you-mean message) and calls ``super().bind(registry)``."""
        self.registry = registry

    def plugin_registry(self) -> "Registry":
        """The registry to look other plugins up in: the bound one, else the built-ins-only registry (qbench's
        own plugins, no entry points), so a quantizer constructed directly in a test or script still works
        with built-in plugins; an installed plugin is found only through a bound registry."""
        if self.registry is not None:
            return self.registry
        from qbench.plugins import get_plugin_manager  # lazy: see the TYPE_CHECKING import above
        from qbench.registry import build_registry

        return build_registry(get_plugin_manager(load_entrypoints=False))

    @abstractmethod
    def quantize(
        self,
        model: VLM,
        bits: BitSpec,
        scope: Scope,
        calibration: CalibrationData | None,
        seed: int,
    ) -> QuantizedModel:
        """Fake-quantize ``model`` (a private copy, modified in place) and return it with provenance."""

    def verification_layout(self, bits: BitSpec) -> QuantLayout:
        """Which of the core's groupings this run's configuration implies (``quantizers.md`` §1.9).

        The verifier counts distinct values per group of what each kernel consumes; the groups are cut by
        the core (:class:`~qbench.quant.layout.Grouping`), a method only *selects* among them. Default: the
        baseline layout (§1.6: weights per channel, inputs per tensor, no attention slots), or the config's
        ``weight_granularity`` / ``act_granularity`` fields where the method has them. Methods whose
        documented layout differs override this as a function of ``self.config`` and ``bits`` only.
        """
        weight = getattr(self.config, "weight_granularity", "per_channel")
        act = getattr(self.config, "act_granularity", "per_tensor")
        conv = act if act in ("per_tensor", "per_token") or str(act).startswith("instance") else "per_tensor"
        return QuantLayout(weight=str(weight), linear_input=str(act), conv_input=str(conv))

