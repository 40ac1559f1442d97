"""Per-sample evidence of an evaluation, and every published metric recomputed from it (``qbench rescore``).

A result document states numbers; its evidence file holds what they are computed from, one array per
(state, dataset) or (state, OOD pair):

* the labels of every classification dataset, and per state (``fp32``, ``quantized`` and, with logit tuning,
  ``quantized-tuned``) each image's prediction, confidence (maximum softmax probability) and log-probability
  of the true class — accuracy, balanced accuracy, ECE, NLL, the paired bootstrap, reliability bins, bin
  trajectories, robustness δ and the spurious gaps (RSG, ΔRSG, V_add) are functions of these alone;
* every scorer's per-image score of the ID and OOD side of every OOD/shift-detection pair — AUROC, FPR@95
  and the other detection metrics and the score histograms are functions of these alone.

The live run computes its records *from* these arrays, through the same functions (:class:`OutcomeBank`,
:func:`qbench.engine.ood_eval.pair_results`) that :func:`rescore` applies to the file, so a stored result and its
rescoring agree exactly, and a number edited in the document no longer matches its evidence. Records of a
task type that is not evidence-backed (:attr:`qbench.tasks.TaskType.evidence_backed`; the built-in spectral
and dropout tasks, measured on features and model probes: :data:`NOT_EVIDENCE_TASKS`) are not recomputed,
and the leaderboard does not accept them.

The file is safetensors (never pickle): tensors named by position, and one JSON index in the header's
metadata saying which (state, dataset) or pair each tensor belongs to. The document carries the file's
SHA-256 (``evidence.sha256``); the file name is derived from the document's (:func:`evidence_path_for`).
Arrays are float64/int64, so a value is stored exactly as the run used it (about 20 bytes per image and
state, plus 8 bytes per image, state and OOD scorer).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np

from qbench.errors import QbenchError
from qbench.engine.task_scoring import ClassOutcome, OutcomeBank

if TYPE_CHECKING:
    from qbench.engine.ood_eval import PairScores
    from qbench.registry import Registry
    from qbench.suites import SuiteSpec
    from qbench.engine.task_scoring import LogitBank

FORMAT = "qbench-evidence"
VERSION = 1
SUFFIX = ".evidence.safetensors"
STATES = ("fp32", "quantized", "quantized-tuned")
TUNED_STATE = "quantized-tuned"
NOT_EVIDENCE_TASKS = frozenset({"spectral", "dropout"})
"""The built-in record tasks measured on features or model probes rather than per-sample outcomes (not recomputable
here); in general a task type says so itself (:attr:`qbench.tasks.TaskType.evidence_backed`)."""
TOLERANCE = 1e-9
"""Largest accepted difference between a stored number and its recomputation (relative above 1)."""
MAX_EVIDENCE_BYTES = 1 << 30
_METADATA_KEY = "qbench"
_OUTCOME_FIELDS = ("prediction", "confidence", "true_log_prob")


# -- writing -----------------------------------------------------------------------------------------


class EvidenceRecorder:
    """Collects a run's per-sample arrays as it scores them, then serialises them into one safetensors file."""

    def __init__(self) -> None:
        self.labels: dict[str, np.ndarray] = {}
        self.outcomes: dict[tuple[str, str], ClassOutcome] = {}
        self.pairs: list[tuple["PairScores", bool]] = []

    def add_bank(self, bank: "LogitBank", *, tuned: bool) -> None:
        """Every outcome ``bank`` computed; a tuned bank's quantized outcomes become ``quantized-tuned`` (its FP32
        outcomes are those of the untuned bank: the FP32 classifier is never tuned)."""
        for (dataset, state), outcome in bank.outcomes.items():
            self.labels.setdefault(dataset, np.asarray(bank.labels[dataset], dtype=np.int64))
            if tuned and state == "fp32":
                continue
            self.outcomes[(TUNED_STATE if tuned else state, dataset)] = outcome

    def add_pairs(self, pairs: Iterable["PairScores"], *, tuned: bool) -> None:
        self.pairs += [(pair, tuned) for pair in pairs]

    def to_bytes(self, config_hash: str) -> bytes:
        """The safetensors file: tensors ``t<i>`` and the JSON index in the header's metadata."""
        from safetensors.numpy import save

        tensors: dict[str, np.ndarray] = {}
        by_digest: dict[str, str] = {}

        def put(array: np.ndarray, dtype: type) -> str:
            array = np.ascontiguousarray(array, dtype=dtype)
            digest = hashlib.sha256(array.dtype.str.encode() + array.tobytes()).hexdigest()
            if digest not in by_digest:
                by_digest[digest] = f"t{len(tensors)}"
                tensors[by_digest[digest]] = array
            return by_digest[digest]

        index: dict[str, Any] = {
            "format": FORMAT, "version": VERSION, "config_hash": config_hash,
            "labels": {dataset: put(labels, np.int64) for dataset, labels in sorted(self.labels.items())},
            "outcomes": [
                {"state": state, "dataset": dataset, "prediction": put(outcome.prediction, np.int64),
                 "confidence": put(outcome.confidence, np.float64), "true_log_prob": put(outcome.true_log_prob, np.float64)}
                for (state, dataset), outcome in sorted(self.outcomes.items())
            ],
            "pairs": [
                {"suite": pair.suite, "task": pair.task, "scorer": pair.scorer, "id_dataset": pair.id_dataset,
                 "ood_dataset": pair.ood_dataset, "ood_kind": pair.ood_kind, "logit_tuned": tuned,
                 "scores": {state: [put(scores[0], np.float64), put(scores[1], np.float64)]
                            for state, scores in pair.scores.items()}}
                for pair, tuned in self.pairs
            ],
        }
        return save(tensors, metadata={_METADATA_KEY: json.dumps(index, sort_keys=True)})


def label_fingerprint(labels: np.ndarray) -> str:
    """SHA-256 of a dataset's labels in order, as little-endian int64: what a registration pins (``DatasetSpec``)."""
    return hashlib.sha256(np.ascontiguousarray(labels, dtype="<i8").tobytes()).hexdigest()


def evidence_summary(data: bytes) -> dict[str, Any]:
    """The document's ``evidence`` section for the file ``data``: format, version, size and SHA-256."""
    return {"format": FORMAT, "version": VERSION, "n_bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


class ResultDocument(dict):
    """A result document (a plain dict, as JSON) that also carries its evidence file's bytes until it is stored."""

    evidence_bytes: bytes | None = None


def attach_evidence(document: dict[str, Any], data: bytes) -> ResultDocument:
    """``document`` with its ``evidence`` section set and ``data`` attached for the store to write beside it."""
    result = ResultDocument(document)
    result["evidence"] = evidence_summary(data)
    result.evidence_bytes = data
    return result


def evidence_path_for(document_path: Path | str) -> Path:
    """The evidence file beside a document: ``<stem>.evidence.safetensors`` (derived, never read from the file)."""
    path = Path(document_path)
    return path.with_name(path.name[: -len(".json")] + SUFFIX if path.name.endswith(".json") else path.name + SUFFIX)


# -- reading -----------------------------------------------------------------------------------------


@dataclass
class Evidence:
    """A loaded, validated evidence file."""

    config_hash: str
    labels: dict[str, np.ndarray]
    outcomes: dict[tuple[str, str], ClassOutcome]
    pairs: list[dict[str, Any]] = field(default_factory=list)
    tensors: dict[str, np.ndarray] = field(default_factory=dict, repr=False)


def read_evidence(path: Path | str, expected_sha256: str | None) -> Evidence:
    """Load and validate ``path``: its SHA-256 must be ``expected_sha256`` (the document's), its index well formed,
    every array finite and of the right dtype and length. Any problem is one :class:`QbenchError` line."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        raise QbenchError(f"{path}: evidence file missing (or not a regular file); every result needs the "
                          f"'{SUFFIX}' file its evaluation wrote beside the document")
    if path.stat().st_size > MAX_EVIDENCE_BYTES:
        raise QbenchError(f"{path}: evidence file larger than {MAX_EVIDENCE_BYTES} bytes")
    data = path.read_bytes()
    return parse_evidence(data, str(path), expected_sha256)


def parse_evidence(data: bytes, source: str, expected_sha256: str | None) -> Evidence:
    """:func:`read_evidence` on bytes already read."""
    digest = hashlib.sha256(data).hexdigest()
    if expected_sha256 is not None and digest != expected_sha256:
        raise QbenchError(f"{source}: evidence SHA-256 {digest[:16]}… differs from the document's evidence.sha256 "
                          f"{str(expected_sha256)[:16]}…; the file is not this result's evidence (re-run the evaluation)")
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        tensors = load(data)
        metadata = _header_metadata(data)
    except (SafetensorError, ValueError, OverflowError, RecursionError, UnicodeDecodeError) as error:
        raise QbenchError(f"{source}: not a readable safetensors evidence file ({_first_line(error)})") from None
    try:
        index = json.loads(metadata.get(_METADATA_KEY, ""))
    except (json.JSONDecodeError, RecursionError):
        raise QbenchError(f"{source}: evidence index missing or not JSON") from None
    return _evidence_from_index(index, tensors, source)


def _header_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors header (the numpy loader does not return it)."""
    if len(data) < 8:
        raise ValueError("file shorter than a safetensors header")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise ValueError("header length beyond the end of the file")
    header = json.loads(data[8: 8 + size])
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise ValueError("__metadata__ is not an object")
    return metadata


def _evidence_from_index(index: Any, tensors: dict[str, np.ndarray], source: str) -> Evidence:
    check = _IndexCheck(source, tensors)
    if not isinstance(index, dict) or index.get("format") != FORMAT or index.get("version") != VERSION:
        raise QbenchError(f"{source}: evidence index is not {FORMAT} version {VERSION}")
    unknown = set(index) - {"format", "version", "config_hash", "labels", "outcomes", "pairs"}
    if unknown:
        raise QbenchError(f"{source}: unknown evidence index field(s) {', '.join(sorted(map(str, unknown)))}")
    labels = {str(name): check.array(key, np.int64, f"labels[{name}]") for name, key in check.mapping(index.get("labels"), "labels").items()}
    outcomes: dict[tuple[str, str], ClassOutcome] = {}
    for number, entry in enumerate(check.items(index.get("outcomes"), "outcomes")):
        where = f"outcomes[{number}]"
        check.fields(entry, {"state", "dataset", *_OUTCOME_FIELDS}, where)
        state, dataset = entry["state"], entry["dataset"]
        if state not in STATES or dataset not in labels:
            raise QbenchError(f"{source}: {where}: unknown state {state!r} or dataset {dataset!r} without labels")
        n = len(labels[dataset])
        outcome = ClassOutcome(*(check.array(entry[name], np.int64 if name == "prediction" else np.float64, f"{where}.{name}", n)
                                 for name in _OUTCOME_FIELDS))
        _check_outcome(outcome, source, where)
        if (state, dataset) in outcomes:
            raise QbenchError(f"{source}: {where}: a second outcome for {state}/{dataset}")
        outcomes[(state, dataset)] = outcome
    pairs = []
    for number, entry in enumerate(check.items(index.get("pairs"), "pairs")):
        where = f"pairs[{number}]"
        check.fields(entry, {"suite", "task", "scorer", "id_dataset", "ood_dataset", "ood_kind", "logit_tuned", "scores"}, where)
        scores = check.mapping(entry["scores"], f"{where}.scores")
        if set(scores) != {"fp32", "quantized"}:
            raise QbenchError(f"{source}: {where}.scores must hold exactly fp32 and quantized")
        pairs.append({**entry, "scores": {state: tuple(check.array(key, np.float64, f"{where}.scores.{state}")
                                                       for key in check.items(keys, f"{where}.scores.{state}", length=2))
                                          for state, keys in scores.items()}})
    return Evidence(str(index.get("config_hash")), labels, outcomes, pairs, tensors)


def _check_outcome(outcome: ClassOutcome, source: str, where: str) -> None:
    if np.any(outcome.prediction < 0):
        raise QbenchError(f"{source}: {where}.prediction holds a negative class")
    if np.any(outcome.confidence < 0) or np.any(outcome.confidence > 1):
        raise QbenchError(f"{source}: {where}.confidence outside [0, 1]")
    if np.any(outcome.true_log_prob > 0):
        raise QbenchError(f"{source}: {where}.true_log_prob above 0 (a log-probability)")


class _IndexCheck:
    """Typed access to the evidence index, each failure one line naming the index path."""

    def __init__(self, source: str, tensors: dict[str, np.ndarray]) -> None:
        self.source, self.tensors = source, tensors

    def fail(self, message: str) -> QbenchError:
        return QbenchError(f"{self.source}: evidence {message}")

    def mapping(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(f"{where} must be an object")
        return value

    def items(self, value: Any, where: str, length: int | None = None) -> list[Any]:
        if not isinstance(value, list) or (length is not None and len(value) != length):
            raise self.fail(f"{where} must be a list" + (f" of {length}" if length else ""))
        return value

    def fields(self, entry: Any, expected: set[str], where: str) -> None:
        if not isinstance(entry, dict) or set(entry) != expected:
            raise self.fail(f"{where} must have exactly the fields {', '.join(sorted(expected))}")

    def array(self, key: Any, dtype: type, where: str, length: int | None = None) -> np.ndarray:
        array = self.tensors.get(key) if isinstance(key, str) else None
        if array is None:
            raise self.fail(f"{where} names no tensor of the file")
        if array.dtype != np.dtype(dtype) or array.ndim != 1 or array.size == 0 or (length is not None and array.size != length):
            raise self.fail(f"{where}: expected a non-empty 1-D {np.dtype(dtype).name} array"
                            + (f" of {length}" if length is not None else "") + f", found {array.dtype.name} {array.shape}")
        if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
            raise self.fail(f"{where} holds NaN or infinite values")
        return array


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


# -- rescoring ---------------------------------------------------------------------------------------


class EvidenceBank(OutcomeBank):
    """Outcomes read from an evidence file; ``quantized_state`` picks the untuned or the tuned quantized arrays."""

    def __init__(self, evidence: Evidence, quantized_state: str = "quantized") -> None:
        self.evidence = evidence
        self.labels = evidence.labels
        self.quantized_state = quantized_state

    def outcome(self, dataset: str, state: str) -> ClassOutcome:
        name = self.quantized_state if state == "quantized" else state
        try:
            return self.evidence.outcomes[(name, dataset)]
        except KeyError:
            raise QbenchError(f"evidence has no {name} outcome for dataset {dataset!r}; the file does not cover "
                              "the suites the document lists") from None


@dataclass
class Rescored:
    """The evidence-backed sections of a result document, recomputed."""

    results: list[dict[str, Any]]
    reliability: list[dict[str, Any]]
    bin_trajectories: list[dict[str, Any]]
    ood_histograms: list[dict[str, Any]]
    unbacked_tasks: frozenset[str] | None = None
    """Record ``task`` names of the suites' task types that are not evidence-backed, so not recomputed (None:
    :data:`NOT_EVIDENCE_TASKS`); records of any other task are compared."""


def registered_suites(config: Mapping[str, Any], registry: "Registry") -> tuple["SuiteSpec", ...]:
    """The suites a document's config names, from the registry, at the stated versions."""
    suites = []
    for entry in config.get("suites") or []:
        suite = registry.get("suites", entry["name"])
        if suite.version != entry.get("version"):
            raise QbenchError(f"suite {suite.name!r} version {entry.get('version')!r} is not the registered version "
                              f"{suite.version}; re-run the evaluation with the current suite")
        suites.append(suite)
    return tuple(suites)


def rescore(document: Mapping[str, Any], evidence: Evidence, registry: "Registry") -> Rescored:
    """Every evidence-backed section of ``document`` recomputed from ``evidence`` with the registered suite tasks.

    The records come from the evidence-backed task types (:attr:`qbench.tasks.TaskType.evidence_backed`) and the
    detection pairs, assembled by the same functions as the live run (:func:`qbench.engine.task_scoring.score_logit_states`
    and :func:`qbench.engine.task_scoring.merge_tuned`): untuned records, then the tuned ones when the run tuned its
    logit scale.
    """
    from qbench.engine.task_scoring import merge_tuned, score_logit_states

    config = document.get("config") or {}
    if evidence.config_hash != config.get("config_hash"):
        raise QbenchError(f"evidence was written for configuration {evidence.config_hash!r}, not "
                          f"{config.get('config_hash')!r}")
    suites = registered_suites(config, registry)
    seed = config.get("seed") if isinstance(config.get("seed"), int) else 0
    untuned = score_logit_states(suites, EvidenceBank(evidence), _pair_sections(evidence, suites, document, tuned=False),
                                 tuned=False, target="quantized", evidence_only=True, seed=seed)
    tuned = None
    if config.get("logit_tuning"):
        tuned = score_logit_states(suites, EvidenceBank(evidence, TUNED_STATE),
                                   _pair_sections(evidence, suites, document, tuned=True),
                                   tuned=True, target=TUNED_STATE, evidence_only=True, seed=seed)
    merged = merge_tuned(untuned, tuned)
    return Rescored(results=merged.results, reliability=merged.reliability, bin_trajectories=merged.trajectories,
                    ood_histograms=merged.histograms, unbacked_tasks=unbacked_record_tasks(suites))


def unbacked_record_tasks(suites: Sequence["SuiteSpec"]) -> frozenset[str]:
    """The record ``task`` names :func:`rescore` cannot recompute for ``suites``: those of task types that are not
    evidence-backed (spectral, dropout, a plugin's that reads more than per-sample outcomes)."""
    return frozenset(task_type.name for suite in suites for task_type, _ in suite.typed_tasks()
                     if not task_type.evidence_backed)


def scorer_selection(config: Mapping[str, Any], suites: Sequence["SuiteSpec"]) -> tuple[str, ...]:
    """The scorers a run ran on its default-scorer detections, from its config: the config's scorers less those
    only listed by suites (:func:`qbench.engine.evaluate._resolve_scorers` put the ``--scorer`` selection, else the default
    scorers, first and the listed ones after)."""
    detections = [task for suite in suites for task in suite.ood_tasks]
    defaults = {name for task in detections if task.default_scorers for name in task.scorers}
    listed_only = {name for task in detections if not task.default_scorers for name in task.scorers} - defaults
    return tuple(name for name in (config.get("scorers") or {}) if name not in listed_only)


def _pair_sections(evidence: Evidence, suites: Sequence["SuiteSpec"], document: Mapping[str, Any], *,
                   tuned: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """OOD records and histograms of every registered detection pair, in the run's order, from the evidence scores.

    A pair is expected for every task target and every scorer the run ran on it (the suite's, else the run's
    selection: :func:`scorer_selection`), unless the document lists it as skipped; what to compute comes from
    the registered suite, only the scores from the file.
    """
    from qbench.engine.ood_eval import PairScores, pair_results

    by_identity = {(entry["suite"], entry["task"], entry["scorer"], entry["id_dataset"], entry["ood_dataset"],
                    entry["ood_kind"], entry["logit_tuned"]): entry for entry in evidence.pairs}
    skipped = {(item.get("suite"), item.get("scorer"), item.get("ood_dataset")) for item in document.get("skipped") or []
               if isinstance(item, dict)}
    selected = scorer_selection(document.get("config") or {}, suites)
    results: list[dict[str, Any]] = []
    histograms: list[dict[str, Any]] = []
    used = set()
    for suite in suites:
        for task in suite.ood_tasks:
            for scorer in task.running(selected):
                for target in task.targets:
                    identity = (suite.name, task.record_task, scorer, task.id_dataset, target.dataset, target.kind, tuned)
                    entry = by_identity.get(identity)
                    if entry is None:
                        if (suite.name, scorer, target.dataset) in skipped:
                            continue
                        raise QbenchError(f"evidence has no {scorer} scores for {task.id_dataset} vs {target.dataset} "
                                          f"({suite.name}{', tuned' if tuned else ''})")
                    used.add(identity)
                    pair = PairScores(suite=suite.name, suite_version=suite.version, task=task.record_task, scorer=scorer,
                                      id_dataset=task.id_dataset, ood_dataset=target.dataset, ood_kind=target.kind,
                                      metrics=tuple(task.metrics), scores=entry["scores"])
                    pair_records, pair_histograms = pair_results(pair)
                    results += pair_records
                    histograms += pair_histograms
    extra = [identity for identity in by_identity if identity[-1] == tuned and identity not in used]
    if extra:
        raise QbenchError(f"evidence holds scores for a pair no registered task has: {extra[0][2]} on "
                          f"{extra[0][3]} vs {extra[0][4]} ({extra[0][0]})")
    return results, histograms


# -- comparing -----------------------------------------------------------------------------------------


def evidence_backed(records: Iterable[Mapping[str, Any]], unbacked: frozenset[str] | None = None) -> list[Mapping[str, Any]]:
    """The records :func:`rescore` recomputes: all but those whose ``task`` is in ``unbacked``
    (:attr:`Rescored.unbacked_tasks`; default :data:`NOT_EVIDENCE_TASKS`, the built-in tasks measured on features
    and model probes)."""
    excluded = NOT_EVIDENCE_TASKS if unbacked is None else unbacked
    return [record for record in records if record.get("task") not in excluded]


def compare_sections(document: Mapping[str, Any], rescored: Rescored, tolerance: float = TOLERANCE) -> list[str]:
    """Every difference between ``document`` and its recomputation, as ``key.path: stored X, evidence gives Y``."""
    problems: list[str] = []
    stored_results = evidence_backed(document.get("results") or [], rescored.unbacked_tasks)
    _compare(stored_results, rescored.results, "results", tolerance, problems)
    for name in ("reliability", "bin_trajectories", "ood_histograms"):
        _compare(list(document.get(name) or []), getattr(rescored, name), name, tolerance, problems)
    return problems


def _close(a: float, b: float, tolerance: float) -> bool:
    return abs(a - b) <= tolerance * max(1.0, abs(a), abs(b))


def _compare(stored: Any, computed: Any, path: str, tolerance: float, problems: list[str], limit: int = 20) -> None:
    """Structural comparison: same keys, same strings and flags, numbers within ``tolerance`` (None only for None)."""
    if len(problems) >= limit:
        return
    if isinstance(computed, bool) or computed is None or isinstance(computed, str):
        if stored != computed or type(stored) is not type(computed):
            problems.append(f"{path}: stored {_show(stored)}, evidence gives {_show(computed)}")
    elif isinstance(computed, (int, float)):
        if isinstance(stored, bool) or not isinstance(stored, (int, float)) or not math.isfinite(stored) \
                or not _close(float(stored), float(computed), tolerance):
            problems.append(f"{path}: stored {_show(stored)}, evidence gives {_show(computed)}")
    elif isinstance(computed, (list, tuple)):
        if not isinstance(stored, (list, tuple)) or len(stored) != len(computed):
            problems.append(f"{path}: stored {len(stored) if isinstance(stored, (list, tuple)) else _show(stored)} "
                            f"entries, evidence gives {len(computed)}")
            return
        for number, (a, b) in enumerate(zip(stored, computed)):
            _compare(a, b, f"{path}[{number}]", tolerance, problems, limit)
    elif isinstance(computed, dict):
        if not isinstance(stored, dict) or set(stored) != set(computed):
            keys = set(stored) ^ set(computed) if isinstance(stored, dict) else set()
            problems.append(f"{path}: fields differ from the recomputation ({', '.join(sorted(map(str, keys))) or _show(stored)})")
            return
        for key in computed:
            _compare(stored[key], computed[key], f"{path}.{key}", tolerance, problems, limit)


def _show(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (int, float, str, bool)) or value is None else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def _full_run(document: Mapping[str, Any]) -> bool:
    """No ``--limit`` and no unreadable image skipped: the evidence labels are the whole split's."""
    datasets = document.get("datasets") if isinstance(document.get("datasets"), dict) else {}
    return (document.get("config") or {}).get("limit") is None and all(
        isinstance(info, dict) and info.get("num_scored") == info.get("num_images") for info in datasets.values())


def check_labels(evidence: Evidence, registry: "Registry", *, require_pinned: bool) -> None:
    """Each dataset's evidence labels must be the labels its registration pins (``DatasetSpec.label_fingerprint``);
    with ``require_pinned`` (leaderboard) a dataset without pinned labels is refused too."""
    for dataset, labels in evidence.labels.items():
        pinned = registry.get("datasets", dataset).label_fingerprint
        if pinned is None:
            if require_pinned:
                raise QbenchError(f"dataset {dataset!r} has no pinned label fingerprint in its registration, so its "
                                  "results cannot be checked for the leaderboard; pin DatasetSpec.label_fingerprint")
            continue
        if label_fingerprint(labels) != pinned:
            raise QbenchError(f"evidence labels of {dataset!r} are not the dataset's registered labels (fingerprint "
                              f"{label_fingerprint(labels)[:16]}… ≠ {pinned[:16]}…); results must be scored on the full, "
                              "unaltered split")


def check_evidence(document: Mapping[str, Any], evidence_path: Path | str, registry: "Registry | None" = None,
                   tolerance: float = TOLERANCE, *, require_pinned_labels: bool = False) -> Rescored:
    """Load ``evidence_path`` (checked against ``document['evidence']``), check its labels against the registered
    datasets, recompute, and raise one :class:`QbenchError` line at the first difference beyond ``tolerance``;
    returns the recomputation."""
    summary = document.get("evidence")
    if not isinstance(summary, dict) or not isinstance(summary.get("sha256"), str):
        raise QbenchError("the document has no evidence section (evidence.sha256); it was produced without per-sample "
                          "evidence: re-run it with this qbench")
    evidence = read_evidence(evidence_path, summary["sha256"])
    if registry is None:
        from qbench.registry import build_registry

        registry = build_registry()
    if require_pinned_labels or _full_run(document):  # a --limit run or skipped images score a subset of the labels
        check_labels(evidence, registry, require_pinned=require_pinned_labels)
    rescored = rescore(document, evidence, registry)
    problems = compare_sections(document, rescored, tolerance)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise QbenchError(f"{problems[0]}{more}: the document does not match its per-sample evidence")
    return rescored


# -- qbench rescore ------------------------------------------------------------------------------------


def locate(target: str, store_path: Path | str | None = None) -> tuple[dict[str, Any], Path]:
    """The document and evidence file ``qbench rescore TARGET`` names: a document JSON file (its evidence beside
    it, else the store's copy for its hash) or a stored config hash or unique prefix."""
    from qbench.engine.store import ResultStore

    candidate = Path(target).expanduser()
    if candidate.is_file() or target.endswith(".json"):
        document = _read_document(candidate)
        beside = evidence_path_for(candidate)
        if beside.exists():
            return document, beside
        store = ResultStore(store_path)
        return document, store.evidence_path(str(document["config"]["config_hash"]))
    store = ResultStore(store_path)
    config_hash = store.match_hash(target)
    document = store.get(config_hash)
    if document is None:
        raise QbenchError(f"no evaluation {target!r} in the store {store.root}; see 'qbench results'")
    return document, store.evidence_path(config_hash)


def _read_document(path: Path) -> dict[str, Any]:
    from qbench.engine.safe_json import read_json_file

    document = read_json_file(path)
    if not isinstance(document, dict) or not isinstance(document.get("config"), dict) \
            or not isinstance(document["config"].get("config_hash"), str):
        raise QbenchError(f"{path} is not a result document (an object with config.config_hash); pass the file "
                          "'qbench eval --json' or 'qbench submit' wrote, or a stored config hash")
    return document
