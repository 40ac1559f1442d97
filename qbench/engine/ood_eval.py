"""OOD detection over suites: every selected scorer on every (ID, OOD) pair, for FP32 and quantized.

Reads only cached features (:mod:`qbench.engine.features`). Per encoder state, each scorer's plan is prepared
once (e.g. negative labels are mined once) and each dataset is scored once per (scorer, plan), so the
ID split's scores are shared by every pair of a suite. Scorers that cannot run (a label file they need is
absent) are reported as skipped, not as failures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from qbench.analysis import metrics
from qbench.errors import QbenchError
from qbench.engine.features import TextEncoder
from qbench.scoring import ScoreContext, ScoreInputs, Scorer, ScorerPlan, ScorerResources, ScorerSkipped, TextFeatures
from qbench.suites import SuiteSpec

if TYPE_CHECKING:
    from qbench.engine.task_scoring import LogitBank

STATES = ("fp32", "quantized")
HISTOGRAM_BINS = 30


@dataclass
class OODOutcome:
    """Result records, skipped scorers and per-scorer provenance of all OOD tasks of a run."""

    results: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)
    scores: dict[tuple, np.ndarray] = field(default_factory=dict)
    histograms: list[dict[str, Any]] = field(default_factory=list)
    pairs: list["PairScores"] = field(default_factory=list)
    prepared: dict[tuple, Any] = field(default_factory=dict, repr=False)  # scorer.prepare per (scorer, plan, state, ID)


@dataclass(frozen=True)
class PairScores:
    """The per-sample ID and OOD scores of one (suite, task, scorer, OOD target), per state.

    The OOD records and score histograms of the pair are a function of these arrays alone
    (:func:`pair_results`), and the arrays are the run's per-sample OOD evidence (:mod:`qbench.engine.evidence`).
    """

    suite: str
    suite_version: int
    task: str
    scorer: str
    id_dataset: str
    ood_dataset: str
    ood_kind: str
    metrics: tuple[str, ...]
    scores: dict[str, tuple[np.ndarray, np.ndarray]]


def pair_results(pair: PairScores) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The records (one per metric) and score histograms (one per state) of one OOD pair, from its scores."""
    from qbench.analysis.ood_metrics import ood_metrics

    values: dict[str, dict[str, float]] = {}
    histograms = []
    for state in STATES:
        id_scores, ood_scores = pair.scores[state]
        values[state] = ood_metrics(id_scores, ood_scores,
                                    label=f"{pair.scorer} on {pair.id_dataset} vs {pair.ood_dataset} ({state})")
        histograms.append({
            "suite": pair.suite, "task": pair.task, "scorer": pair.scorer,
            "id_dataset": pair.id_dataset, "ood_dataset": pair.ood_dataset, "ood_kind": pair.ood_kind,
            "state": state, **score_histogram(id_scores, ood_scores),
        })
    results = []
    for metric in pair.metrics:
        fp, q = values["fp32"][metric], values["quantized"][metric]
        results.append({
            "suite": pair.suite, "suite_version": pair.suite_version, "task": pair.task,
            "scorer": pair.scorer, "id_dataset": pair.id_dataset, "ood_dataset": pair.ood_dataset,
            "ood_kind": pair.ood_kind, "dataset": pair.ood_dataset, "metric": metric,
            "fp32": fp, "quantized": q, "delta": metrics.relative_change(fp, q), "diff": q - fp,
        })
    return results, histograms


@dataclass(frozen=True)
class IdClassifier:
    """The ID label set of a pair and each state's ensemble classifier plus logit scale and bias."""

    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    heads: dict[str, np.ndarray]
    logit_scales: dict[str, float]
    logit_biases: dict[str, float | None]


def score_ood_tasks(
    suites: Sequence[SuiteSpec],
    scorers: dict[str, Scorer],
    selected: tuple[str, ...],
    bank: "LogitBank",
    text: TextEncoder,
    resources: ScorerResources,
    dataset_resources: Callable[[str], Mapping[str, Path]],
    seed: int,
    explicit: frozenset[str] = frozenset(),
    reuse_fp32: OODOutcome | None = None,
) -> OODOutcome:
    """Every detection sub-task of every suite (:attr:`qbench.suites.SuiteSpec.ood_tasks`: the OOD tasks, the shift
    detection of robustness tasks, a plugin task type's), from the cached features and zero-shot logits of ``bank``.

    Each detection runs its own scorers, or the ``--scorer`` ``selected`` ones where its scorers are the task
    type's default (:meth:`qbench.tasks.DetectionTask.running`).

    A scorer that skips itself (no label file, say) is reported in ``skipped``, unless the user
    asked for it by name (``explicit``): then it is a one-line error.

    ``reuse_fp32``: an outcome of the same run whose FP32 inputs were the same (the untuned setting, when only the
    quantized logit scale was re-fit): its FP32 prepared states and scores are taken as they are instead of being
    computed again (issue 16; a scorer is a function of its inputs, so they are the values it would compute).
    """
    outcome = OODOutcome()
    if reuse_fp32 is not None:
        outcome.prepared.update({key: value for key, value in reuse_fp32.prepared.items() if key[2] == "fp32"})
        outcome.scores.update({key: value for key, value in reuse_fp32.scores.items() if key[2] == "fp32"})
    prepared = outcome.prepared
    for suite in suites:
        for task in suite.ood_tasks:
            classifier = bank.classifier_for(task.id_dataset)
            for scorer_name in task.running(selected):
                scorer = scorers[scorer_name]
                for target in task.targets:
                    context = ScoreContext(
                        suite=suite.name, id_dataset=task.id_dataset, id_classnames=classifier.classnames,
                        id_templates=classifier.templates, ood_kind=target.kind, resources=resources,
                        dataset_resources=dataset_resources(task.id_dataset), seed=seed,
                    )
                    try:
                        plan = scorer.plan(context)
                    except ScorerSkipped as reason:
                        if scorer_name in explicit:
                            raise QbenchError(f"--scorer {scorer_name}: {reason}") from None
                        outcome.skipped.append({"suite": suite.name, "scorer": scorer_name,
                                                "ood_dataset": target.dataset, "reason": str(reason)})
                        continue
                    fingerprint = plan.fingerprint()  # hashes every prompt (70,794 for NegLabel): once per plan
                    outcome.provenance.setdefault(scorer_name, {"params": scorer.params(), "plans": {}})
                    outcome.provenance[scorer_name]["plans"][fingerprint] = dict(plan.provenance)
                    scores: dict[str, tuple[np.ndarray, np.ndarray]] = {}
                    for state in STATES:
                        text_features = _text_features(classifier, state, plan, text)
                        prep_key = (scorer_name, fingerprint, state, task.id_dataset)
                        if prep_key not in prepared:
                            prepared[prep_key] = scorer.prepare(text_features)
                        scores[state] = (
                            _scores(outcome, scorer, prep_key, prepared[prep_key], text_features, bank,
                                    state, task.id_dataset, task.id_dataset),
                            _scores(outcome, scorer, prep_key, prepared[prep_key], text_features, bank,
                                    state, target.dataset, task.id_dataset),
                        )
                    pair = PairScores(suite=suite.name, suite_version=suite.version, task=task.record_task,
                                      scorer=scorer_name, id_dataset=task.id_dataset, ood_dataset=target.dataset,
                                      ood_kind=target.kind, metrics=tuple(task.metrics), scores=scores)
                    outcome.pairs.append(pair)
                    results, histograms = pair_results(pair)
                    outcome.results += results
                    outcome.histograms += histograms
    return outcome


def score_histogram(id_scores: np.ndarray, ood_scores: np.ndarray, bins: int = HISTOGRAM_BINS) -> dict[str, list]:
    """Counts of ID and OOD scores over shared equal-width edges spanning both (for the score histogram plot)."""
    low = float(min(id_scores.min(), ood_scores.min()))
    high = float(max(id_scores.max(), ood_scores.max()))
    if high == low:  # all scores tied: one unit-wide window around them
        low, high = low - 0.5, high + 0.5
    edges = np.linspace(low, high, bins + 1)
    return {"edges": [float(edge) for edge in edges],
            "id_counts": [int(count) for count in np.histogram(id_scores, edges)[0]],
            "ood_counts": [int(count) for count in np.histogram(ood_scores, edges)[0]]}


def _text_features(classifier: IdClassifier, state: str, plan: ScorerPlan, text: TextEncoder) -> TextFeatures:
    head = classifier.heads[state]
    sets = {key: text.encode(state, prompts) if prompts else np.zeros((0, head.shape[1]))
            for key, prompts in plan.text_sets.items()}
    return TextFeatures(id_text=head, logit_scale=classifier.logit_scales[state], sets=sets)


def _scores(
    outcome: OODOutcome,
    scorer: Scorer,
    prep_key: tuple,
    prepared: Any,
    text_features: TextFeatures,
    bank: "LogitBank",
    state: str,
    dataset: str,
    label_set: str,
) -> np.ndarray:
    """Scores of one dataset under one (scorer, plan, state, ID label set), computed once; the logits over the
    ``label_set`` classifier come from ``bank``, shared by every scorer."""
    key = (*prep_key, dataset)
    if key not in outcome.scores:
        image_feats = bank.features[dataset][state]
        logits = bank(dataset, label_set)[state]
        scores = np.asarray(scorer.score(ScoreInputs(logits, image_feats, text_features), prepared), dtype=np.float64)
        if scores.shape != (len(image_feats),):
            raise QbenchError(f"scorer {scorer.name!r} returned shape {scores.shape} for {len(image_feats)} images of {dataset}; "
                              "a scorer must return one score per image")
        outcome.scores[key] = scores
    return outcome.scores[key]
