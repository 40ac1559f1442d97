"""The Scorer plugin contract (``scoring.md`` §0-1).

A scorer maps cached model outputs to one OOD score per image, higher meaning "more in-distribution".
Scorers never run a model: they read :class:`ScoreInputs`, built once per (encoder state, dataset) from
the feature cache, so every scorer and metric shares the same forward passes.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np


@dataclass(frozen=True)
class ScoreInputs:
    """Float64 arrays a scorer may read: logits ``N x K``, image features ``N x d``, ID text ``K x d``."""

    logits: np.ndarray
    image_feats: np.ndarray
    id_text: np.ndarray
    logit_scale: float


@dataclass(frozen=True)
class ScorerConfig:
    """Base of every scorer's hyperparameter dataclass."""


class Scorer(ABC):
    """Base class of scorer plugins; subclasses set the class attributes and implement ``score``."""

    name: ClassVar[str]
    citation: ClassVar[str]
    summary: ClassVar[str]
    Config: ClassVar[type[ScorerConfig]] = ScorerConfig

    def __init__(self, config: ScorerConfig | None = None) -> None:
        self.config = config if config is not None else self.Config()

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return dataclasses.asdict(cls.Config())

    @abstractmethod
    def score(self, inputs: ScoreInputs) -> np.ndarray:
        """One float64 score per image; higher = more in-distribution."""
