"""The Scorer plugin contract (``scoring.md`` §0-1).

A scorer maps cached model outputs to one OOD score per image, **higher meaning more
in-distribution**. Scorers never run a model. Their life in one evaluation has three steps:

1. :meth:`Scorer.plan` — before any model runs, from the :class:`ScoreContext` (ID class names, the
   pair, user-supplied resources): which extra prompt sets the scorer needs encoded (a lexicon of
   negative words, outlier labels, generic prompts, reference-prompt ID labels) and what to record
   in provenance. A scorer that cannot run for a reason that is not an error (a label file it needs
   is absent) raises :class:`ScorerSkipped`.
2. :meth:`Scorer.prepare` — once per encoder state (FP32, quantized), from that state's
   :class:`TextFeatures`: work that depends on text only, such as mining negative labels.
3. :meth:`Scorer.score` — once per (state, dataset), from :class:`ScoreInputs` read from the feature
   cache. ID features are shared by every pair of a suite.

Every prompt set is encoded by each state's own text tower exactly once per run (a quantized text
tower yields its own text features; ``scoring.md`` §0).

**Resources** (:mod:`qbench.resources`). A scorer declares the user files and values it reads as
:class:`ResourceOption` entries in ``Scorer.resources`` (a key, the kind ``file``/``folder``/``path``/
``value``, an optional flag and a help line). ``qbench eval`` turns each declared flag into an option and
accepts every declared key as ``--resource KEY=VALUE``; the values reach the scorer as
:class:`ScorerResources` (an immutable mapping key -> :class:`~pathlib.Path` or ``str``) in
``ScoreContext.resources``, and their content hashes enter the configuration under the same keys. A
dataset plugin may ship a default for a key (``DatasetSpec.resources``), which the scorer finds in
``ScoreContext.dataset_resources``.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping

import numpy as np

from qbench.errors import QbenchError
from qbench.resources import (  # noqa: F401  (re-exported: scorer plugins import them from here)
    RESOURCE_KINDS,
    ResourceOption,
    ScorerResources,
    declared_resources,
    parse_resources,
    resource_fingerprints,
)
from qbench.params import Configurable, PluginConfig

__all__ = ["ScoreContext", "ScoreInputs", "Scorer", "ScorerConfig", "ScorerPlan", "ScorerSkipped", "TextFeatures"]


class ScorerSkipped(Exception):
    """Raised by :meth:`Scorer.plan` when the scorer has nothing to run on (reported, not a failure)."""


@dataclass(frozen=True)
class ScoreContext:
    """What a scorer knows before any model runs: the suite, the ID label set, the pair, resources.

    ``ood_kind`` is ``"near"``, ``"far"`` or ``"shift"`` (a scorer's label count or overlap rule may depend
    on it); ``resources`` are the user's; ``dataset_resources`` are files the ID dataset's plugin ships
    (``DatasetSpec.resources``, keyed like scorer resources), for a scorer to use when the user gives none.
    """

    suite: str
    id_dataset: str
    id_classnames: tuple[str, ...]
    id_templates: tuple[str, ...]
    ood_kind: str = "far"
    resources: ScorerResources = field(default_factory=ScorerResources)
    dataset_resources: Mapping[str, Path] = field(default_factory=dict, hash=False)
    seed: int = 0


@dataclass(frozen=True)
class ScorerPlan:
    """The prompt sets a scorer needs (key -> prompts, in order) and provenance to record."""

    text_sets: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    provenance: Mapping[str, Any] = field(default_factory=dict)

    def fingerprint(self) -> str:
        """Hash of every prompt, in order: changes whenever a lexicon, label file or prompt changes."""
        digest = hashlib.sha256()
        for key in sorted(self.text_sets):
            digest.update(key.encode() + b"\0" + "\n".join(self.text_sets[key]).encode() + b"\1")
        return digest.hexdigest()[:16]


@dataclass(frozen=True)
class TextFeatures:
    """Text-side inputs of one encoder state, float64, rows L2-normalised.

    ``id_text`` is the template-ensembled ID classifier ``K x d`` (the one accuracy uses); ``sets``
    holds the state's embeddings of each prompt set the plan requested (``M x d``, same order).
    """

    id_text: np.ndarray
    logit_scale: float
    sets: Mapping[str, np.ndarray] = field(default_factory=dict)

    def get(self, key: str, scorer: str) -> np.ndarray:
        """The encoded prompt set ``key`` (``0 x d`` when the plan asked for an empty list), float64.

        A set the scorer's plan never requested is a one-line error naming the scorer.
        """
        if key not in self.sets:
            raise QbenchError(f"{scorer} needs the text set {key!r}, which was not encoded (was {scorer}.plan run?)")
        values = np.asarray(self.sets[key], dtype=np.float64)
        return values.reshape(0, self.id_text.shape[1]) if values.size == 0 else values


@dataclass(frozen=True)
class ScoreInputs:
    """Float64 arrays a scorer may read for one (state, dataset): logits ``N x K``, features ``N x d``."""

    logits: np.ndarray
    image_feats: np.ndarray
    text: TextFeatures

    @property
    def id_text(self) -> np.ndarray:
        return self.text.id_text

    @property
    def logit_scale(self) -> float:
        return self.text.logit_scale

    def cosines(self, text: np.ndarray | None = None) -> np.ndarray:
        """``f · t`` for every image and text row (ID classifier by default): raw cosines, ``N x M``."""
        return self.image_feats @ (self.id_text if text is None else text).T


@dataclass(frozen=True)
class ScorerConfig(PluginConfig):
    """Base of every scorer's hyperparameter dataclass (typed fields, the paper's defaults)."""


class Scorer(Configurable, ABC):
    """Base class of scorer plugins; subclasses set the class attributes and implement ``score``."""

    kind = "scorer"
    name: ClassVar[str]
    citation: ClassVar[str]
    summary: ClassVar[str]
    Config: ClassVar[type[ScorerConfig]] = ScorerConfig
    resources: ClassVar[tuple[ResourceOption, ...]] = ()
    """User files and values this scorer reads (``qbench eval`` options, ``--resource KEY=VALUE``)."""

    def plan(self, context: ScoreContext) -> ScorerPlan:
        """Extra prompt sets to encode and provenance; the output-based scorers need none."""
        return ScorerPlan()

    def prepare(self, text: TextFeatures) -> Any:
        """Per-state work on text features only (e.g. negative mining); the result is passed to ``score``."""
        return None

    @abstractmethod
    def score(self, inputs: ScoreInputs, prepared: Any = None) -> np.ndarray:
        """One float64 score per image; higher = more in-distribution."""
