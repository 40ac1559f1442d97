"""Maximum concept matching (MCM) OOD scorer.

Ming, Cai, Gu, Sun & Li, "Delving into Out-of-Distribution Detection with Vision-Language
Representations", NeurIPS 2022: ``S_MCM(x) = max_k softmax(c(x) / τ)_k`` over the **raw cosines**
``c_k = f(x)·t_k`` between the image and the ID class text embeddings, with the paper's default
``τ = 1`` (``scoring.md`` §1.4). It ignores the model's logit scale by design, so with ``τ = 1`` and
K = 1000 every score lies in ``[1/1000, e²/(e²+999)]``.

ID text features are the template-ensembled classifier (``prompt_mode="ensemble"``) or, in
``prompt_mode="reference"``, the paper's single prompt ``a photo of a {}.`` per ID class, requested
from the encoder as the text set ``id_photo`` (``scoring.md`` §1.8).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qbench.hookspecs import hookimpl
from qbench.params import require_choice, require_positive
from qbench.analysis.metrics import softmax
from qbench.scoring import ScoreContext, ScoreInputs, Scorer, ScorerConfig, ScorerPlan

PROMPT_MODES = ("ensemble", "reference")
REFERENCE_TEMPLATE = "a photo of a {}."
REFERENCE_SET = "id_photo"


@dataclass(frozen=True)
class MCMConfig(ScorerConfig):
    """Softmax temperature ``τ`` over raw cosines (paper default 1) and which ID text features to use."""

    temperature: float = 1.0
    prompt_mode: str = "ensemble"


def check_mcm_config(config: MCMConfig) -> MCMConfig:
    """``config`` itself when its values are usable; a one-line :class:`QbenchError` otherwise."""
    require_positive(config.temperature, "mcm.temperature")
    require_choice(config.prompt_mode, PROMPT_MODES, "mcm.prompt_mode")
    return config


def mcm_score(cosines: np.ndarray, temperature: float) -> np.ndarray:
    """``max_k softmax(cosines / τ)_k`` per row in float64 (stable, max-shifted softmax)."""
    return np.max(softmax(np.asarray(cosines, dtype=np.float64) / temperature, axis=1), axis=1)


class MaximumConceptMatching(Scorer):
    """MCM: ``max_k softmax(cos / τ)_k`` over ID concepts, ignoring the logit scale."""

    name = "mcm"
    citation = "Ming et al., NeurIPS 2022"
    summary = "max softmax of raw image-text cosines / tau over ID classes"
    Config = MCMConfig

    def plan(self, context: ScoreContext) -> ScorerPlan:
        config = check_mcm_config(self.config)  # type: ignore[arg-type]
        if config.prompt_mode == "ensemble":
            return ScorerPlan(provenance={"id_text": "ensemble classifier"})
        prompts = tuple(REFERENCE_TEMPLATE.format(name) for name in context.id_classnames)
        return ScorerPlan(text_sets={REFERENCE_SET: prompts}, provenance={"id_text": REFERENCE_TEMPLATE})

    def score(self, inputs: ScoreInputs, prepared: object = None) -> np.ndarray:
        config = check_mcm_config(self.config)  # type: ignore[arg-type]
        if config.prompt_mode == "ensemble":
            cosines = inputs.cosines()
        else:
            cosines = inputs.cosines(inputs.text.get(REFERENCE_SET, self.name))
        return mcm_score(cosines, config.temperature)


@hookimpl
def qbench_register_scorers() -> list[type[Scorer]]:
    return [MaximumConceptMatching]
