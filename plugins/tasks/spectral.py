"""Task type ``spectral``: spectral analysis of penultimate visual features and patch tokens (``scoring.md`` §3).

``max_images`` images (the first ones of each class) enter the fixed- and adaptive-basis SVD analyses,
``fourier_images`` the 2D Fourier analysis of ViT patch tokens; the feature taps are recorded during the
run's single encoding pass. Records and the ``spectral`` document section come from
:func:`qbench.engine.spectral_eval.spectral_task_outcome`; subspace accuracies depend on the argmax only, so a tuned
logit scale changes nothing and the task is scored once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from qbench.tasks import STAGE_FEATURES, TaskOutput, TaskRun, TaskType, identity
from qbench_plugins.tasks.fields import Fail, check_known, names, positive_int, required

SPECTRAL_ANALYSES = ("fixed", "adaptive", "fourier")
DEFAULT_SPECTRAL_IMAGES = 5000  # scoring.md §3.1: SVD images (first files per class), must exceed D
DEFAULT_FOURIER_IMAGES = 1000
STATES = ("fp32", "quantized")


@dataclass(frozen=True)
class SpectralTaskSpec:
    """The dataset, the analyses and how many images enter them."""

    dataset: str
    analyses: tuple[str, ...] = SPECTRAL_ANALYSES
    max_images: int = DEFAULT_SPECTRAL_IMAGES
    fourier_images: int = DEFAULT_FOURIER_IMAGES
    type: str = "spectral"

    @property
    def datasets(self) -> tuple[str, ...]:
        """The one dataset."""
        return (self.dataset,)


class Spectral(TaskType):
    """Fixed/adaptive-basis spectra and patch-token Fourier analysis, FP32 vs quantized."""

    name = "spectral"
    spec = SpectralTaskSpec
    summary = "spectra of penultimate features (SQNR, distortion, Sim_k, subspace accuracy) and patch-token Fourier RSE"
    fields = ("dataset", "analyses", "max_images", "fourier_images")
    stage = STAGE_FEATURES

    def parse(self, raw: Mapping[str, Any], fail: Fail) -> SpectralTaskSpec:
        """``dataset``, ``analyses`` (fixed, adaptive, fourier), ``max_images``, ``fourier_images``."""
        required(raw, ("dataset",), self.name, fail)
        analyses = names(raw.get("analyses", list(SPECTRAL_ANALYSES)), "analyses", fail)
        check_known(analyses, SPECTRAL_ANALYSES, "analysis", fail)
        if not analyses:
            raise fail("analyses must name at least one of " + ", ".join(SPECTRAL_ANALYSES))
        return SpectralTaskSpec(str(raw["dataset"]), analyses, positive_int(raw, "max_images", DEFAULT_SPECTRAL_IMAGES, fail),
                                positive_int(raw, "fourier_images", DEFAULT_FOURIER_IMAGES, fail))

    def taps(self, spec: SpectralTaskSpec) -> Mapping[str, tuple[str, ...]]:
        """Penultimate features for the SVD analyses, patch tokens for the Fourier analysis."""
        from qbench.analysis import spectral

        wanted = []
        if {"fixed", "adaptive"} & set(spec.analyses):
            wanted.append(spectral.PENULTIMATE)
        if "fourier" in spec.analyses:
            wanted.append(spectral.PATCH_TOKENS)
        return {spec.dataset: tuple(wanted)}

    def score(self, spec: SpectralTaskSpec, run: TaskRun) -> TaskOutput:
        """Records and the ``spectral`` section entry from the taps of the encoding pass."""
        from qbench.engine.spectral_eval import image_head, spectral_task_outcome

        heads = {state: image_head(model) for state, model in run.states.items()}
        taps = {state: dict(run.taps.get(spec.dataset, {}).get(state, {})) for state in STATES}
        records, section = spectral_task_outcome(spec, taps, run.labels[spec.dataset], run.classifier_for(spec.dataset), heads)
        return TaskOutput([{**identity(run.suite, self.name, spec.dataset), **record} for record in records],
                          {"spectral": [{"suite": run.suite.name, "dataset": spec.dataset, "analyses": list(spec.analyses),
                                         **section}]})
