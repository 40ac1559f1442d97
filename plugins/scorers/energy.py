"""Energy OOD scorer.

Liu, Wang, Owens & Li, "Energy-based Out-of-distribution Detection", NeurIPS 2020: the free energy
``E(x; T) = −T·log Σ_k exp(z_k / T)`` is lower for in-distribution inputs. qbench returns its negation
``S = T·logsumexp(z / T)`` so that higher means more in-distribution (``scoring.md`` §1.2).

By default ``T = 1`` is applied to the **CLIP logits** ``z = s·c``; for OpenAI CLIP (s = 100) this is
``s`` times the ``T = 0.01``-on-cosine score some zero-shot papers use, so it ranks images identically.
``on="cosine"`` applies ``T`` to the raw cosines instead, as MCM's code does.
Properties: ``max z ≤ S ≤ max z + T·log K``; ``S(z + a) = S(z) + a``; ``S → max z`` as ``T → 0``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qbench.hookspecs import hookimpl
from qbench.params import require_choice, require_positive
from qbench.scoring import ScoreContext, ScoreInputs, Scorer, ScorerConfig, ScorerPlan

ENERGY_INPUTS = ("logits", "cosine")


@dataclass(frozen=True)
class EnergyConfig(ScorerConfig):
    """Temperature ``T`` (paper default 1) and what it divides: CLIP ``logits`` or raw ``cosine``."""

    temperature: float = 1.0
    on: str = "logits"


def check_energy_config(config: EnergyConfig) -> EnergyConfig:
    """``config`` itself when its values are usable; a one-line :class:`QbenchError` otherwise."""
    require_positive(config.temperature, "energy.temperature")
    require_choice(config.on, ENERGY_INPUTS, "energy.on")
    return config


def energy_score(values: np.ndarray, temperature: float) -> np.ndarray:
    """``T·logsumexp(values / T)`` per row in float64 (scipy's max-shifted, overflow-free form)."""
    from scipy.special import logsumexp  # here, not at the top: registering the scorer (qbench list) stays cheap

    z = np.asarray(values, dtype=np.float64)
    return temperature * logsumexp(z / temperature, axis=1)


class Energy(Scorer):
    """Negative free energy ``T·logsumexp(z / T)`` over the ID classes (higher = more in-distribution)."""

    name = "energy"
    citation = "Liu et al., NeurIPS 2020"
    summary = "negative free energy T*logsumexp(logits/T)"
    Config = EnergyConfig

    def plan(self, context: ScoreContext) -> ScorerPlan:
        config = check_energy_config(self.config)  # type: ignore[arg-type]
        return ScorerPlan(provenance={"applied_to": config.on, "temperature": config.temperature})

    def score(self, inputs: ScoreInputs, prepared: object = None) -> np.ndarray:
        config = check_energy_config(self.config)  # type: ignore[arg-type]
        values = inputs.logits if config.on == "logits" else inputs.cosines()
        return energy_score(values, config.temperature)


@hookimpl
def qbench_register_scorers() -> list[type[Scorer]]:
    return [Energy]
