"""The hooks of qbench-acme: one calibrating PTQ method, one OOD scorer, one suite.

Everything is imported from ``qbench.api``, the declared public API for plugin authors. Registration stays
light: the module level imports only the contracts (no torch), and the quantizer factory that needs torch is
imported inside the method that uses it, so ``qbench list`` and ``qbench --help`` stay fast with this plugin
installed.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files

import numpy as np

from qbench.api import (
    PTQQuantizer,
    QuantizerConfig,
    Scorer,
    ScoreInputs,
    SuiteSpec,
    hookimpl,
    load_suite,
    require_in_range,
)


@dataclass(frozen=True)
class PercentileConfig(QuantizerConfig):
    """Typed hyperparameters with the paper's defaults; override with --qparam percentile=99.9.

    Values are checked when the configuration is built, so a bad value is a one-line error before any
    model is loaded.
    """

    percentile: float = 99.99
    n_calibration: int = 256
    batch_size: int = 32

    def __post_init__(self) -> None:
        require_in_range(self.percentile, 50.0, 100.0, "acme-percentile.percentile", include_low=False)


class PercentilePTQ(PTQQuantizer):
    """Static per-tensor activation ranges clipped at the p-th percentile of the calibration activations.

    H. Wu, P. Judd, X. Zhang, M. Isaev and P. Micikevicius, "Integer Quantization for Deep Learning
    Inference: Principles and Empirical Evaluation", arXiv:2004.09602, 2020 (percentile calibration).
    Weights keep qbench's per-channel symmetric min-max; only the activation observer differs, so the
    method is a ``Config`` and one override of the shared PTQ template.
    """

    name = "acme-percentile"
    citation = "Wu et al., arXiv:2004.09602, 2020"
    summary = "static per-tensor activations clipped at the p-th percentile of calibration activations"
    Config = PercentileConfig

    def act_quantizer(self, bits, name, module):
        from qbench.api import make_activation_quantizer  # imports torch: only when a model is quantized

        return make_activation_quantizer(
            bits.act_bits, observer="percentile", observer_kwargs={"percentile": self.config.percentile}
        )


class MaxLogit(Scorer):
    """MaxLogit: the largest zero-shot logit; higher means more in-distribution.

    D. Hendrycks, S. Basart, M. Mazeika, A. Zou, J. Kwon, M. Mostajabi, J. Steinhardt and D. Song,
    "Scaling Out-of-Distribution Detection for Real-World Settings", ICML 2022, arXiv:1911.11132.
    """

    name = "max-logit"
    citation = "Hendrycks et al., ICML 2022, arXiv:1911.11132"
    summary = "largest zero-shot logit (unnormalised, unlike MSP)"

    def score(self, inputs: ScoreInputs, prepared: object = None) -> np.ndarray:
        return np.max(inputs.logits, axis=1).astype(np.float64)


@hookimpl
def qbench_register_quantizers():
    return [PercentilePTQ]


@hookimpl
def qbench_register_scorers():
    return [MaxLogit]


@hookimpl
def qbench_register_suites() -> list[SuiteSpec]:
    return [load_suite(files("qbench_acme") / "acme-toy-ood.yaml")]
