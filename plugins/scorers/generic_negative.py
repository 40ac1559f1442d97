"""Generic-negative OOD scorer (qbench definition, ``scoring.md`` §1.7).

The literature has no canonical "generic negative" scorer; qbench fixes one. A small set of
content-free prompts (default ``a photo of something.``) acts as a catch-all negative class, and the
score is the softmax mass that stays on the ID classes:

``S_GN(x) = Σ_k e^{c_k/τ} / (Σ_k e^{c_k/τ} + Σ_{g∈G} e^{c_g/τ}) = sigmoid(LSE_k(c/τ) − LSE_g(c_g/τ))``

with raw cosines ``c`` against the ensemble ID classifier and the generic prompts, ``τ = 0.01``. This is
NegLabel's formula (Jiang et al., "Negative Label Guided OOD Detection with Pretrained Vision-Language
Models", ICLR 2024) with one group whose negatives are ``G``. The sigmoid form is evaluated because it
never overflows. Properties: ``G = ∅ ⇒ 1``; adding a generic prompt never raises the score; the model's
logit scale plays no part. ``--generic-prompts FILE`` (one prompt per line, blank lines and ``#``
comments ignored) replaces the prompts of the configuration.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qbench.errors import QbenchError
from qbench.hookspecs import hookimpl
from qbench.params import require_positive
from qbench.scoring import ResourceOption, ScoreContext, ScoreInputs, Scorer, ScorerConfig, ScorerPlan

GENERIC_SET = "generic"
PROMPTS_KEY = "generic_prompts"
DEFAULT_GENERIC_PROMPTS: tuple[str, ...] = ("a photo of something.",)


@dataclass(frozen=True)
class GenericNegativeConfig(ScorerConfig):
    """Temperature ``τ`` on raw cosines and the generic prompts (replaced by a prompt file when given)."""

    temperature: float = 0.01
    prompts: tuple[str, ...] = DEFAULT_GENERIC_PROMPTS


def check_generic_config(config: GenericNegativeConfig) -> GenericNegativeConfig:
    """``config`` itself when its values are usable; a one-line :class:`QbenchError` otherwise."""
    require_positive(config.temperature, "generic-negative.temperature")
    if not isinstance(config.prompts, tuple) or not all(isinstance(p, str) and p.strip() for p in config.prompts):
        raise QbenchError(
            f"generic-negative.prompts must be a tuple of non-blank prompts, got {config.prompts!r} "
            "(use --generic-prompts FILE to pass prompts from the command line)"
        )
    return config


def read_prompt_file(path: Path) -> tuple[str, ...]:
    """The prompts of ``path``, one per line, stripped; blank lines and ``#`` comment lines are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise QbenchError(
            f"cannot read generic prompts file {path} ({type(error).__name__}); pass a UTF-8 text file"
        ) from None
    prompts = tuple(line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#"))
    if not prompts:
        raise QbenchError(f"generic prompts file {path} has no prompts (blank lines and # comments are ignored)")
    return prompts


def generic_negative_score(id_cosines: np.ndarray, generic_cosines: np.ndarray, temperature: float) -> np.ndarray:
    """``sigmoid(LSE(c/τ) − LSE(g/τ))`` per row in float64; exactly 1 when there are no generic prompts."""
    from scipy.special import expit, logsumexp  # here, not at the top: registering the scorer (qbench list) stays cheap

    c = np.asarray(id_cosines, dtype=np.float64)
    g = np.asarray(generic_cosines, dtype=np.float64)
    if g.shape[1] == 0:
        return np.ones(c.shape[0], dtype=np.float64)
    return expit(logsumexp(c / temperature, axis=1) - logsumexp(g / temperature, axis=1))


class GenericNegative(Scorer):
    """ID softmax mass against a catch-all class of generic prompts (higher = more in-distribution)."""

    name = "generic-negative"
    citation = "qbench definition (NegLabel's formula, Jiang et al., ICLR 2024, with generic negatives)"
    summary = "ID softmax mass vs. generic 'a photo of something.' prompts, tau = 0.01"
    Config = GenericNegativeConfig
    resources = (ResourceOption(PROMPTS_KEY, "file", "Generic-negative prompts, one per line.", flag="--generic-prompts"),)

    def plan(self, context: ScoreContext) -> ScorerPlan:
        config = check_generic_config(self.config)  # type: ignore[arg-type]
        path = context.resources.path(PROMPTS_KEY)
        if path is not None:
            prompts, source = read_prompt_file(path), str(path)
        else:
            prompts = config.prompts
            source = "default" if prompts == DEFAULT_GENERIC_PROMPTS else "configuration"
        digest = hashlib.sha256("\n".join(prompts).encode()).hexdigest()
        provenance = {
            "generic_prompts_source": source,
            "generic_prompts": len(prompts),
            "generic_prompts_sha256": digest,
        }
        return ScorerPlan(text_sets={GENERIC_SET: prompts}, provenance=provenance)

    def score(self, inputs: ScoreInputs, prepared: object = None) -> np.ndarray:
        config = check_generic_config(self.config)  # type: ignore[arg-type]
        generic = inputs.text.get(GENERIC_SET, self.name)
        return generic_negative_score(inputs.cosines(), inputs.cosines(generic), config.temperature)


@hookimpl
def qbench_register_scorers() -> list[type[Scorer]]:
    return [GenericNegative]
