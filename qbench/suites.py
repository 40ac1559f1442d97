"""Declarative benchmark suites: versioned YAML files naming datasets and metrics.

A suite file looks like::

    name: toy-id
    version: 1
    description: Zero-shot accuracy and calibration on the toy world's ID test split.
    tasks:
      - type: zeroshot
        dataset: toy-id-test
        metrics: [accuracy, ece, nll]
      - type: ood
        id_dataset: toy-id-test
        ood_datasets:
          - {dataset: toy-ood-near, kind: near}
          - {dataset: toy-ood-far, kind: far}
        scorers: [msp, mcm]            # omitted: every registered scorer
        metrics: [auroc, fpr95]        # omitted: auroc, fpr95, aupr_in, aupr_out
      - type: robustness               # accuracy under shift, relative change, shift detection
        clean_dataset: toy-id-test
        shifted_datasets: [toy-shift-contrast, toy-shift-brightness]
        metrics: [accuracy]            # zero-shot metrics on the clean and every shifted set
        detection: true                # clean as ID vs each shifted set as OOD, every scorer
        detection_metrics: [auroc, fpr95]
      - type: spurious                 # accuracy on common / counter backgrounds, RSG, ΔRSG, V_add
        common_dataset: toy-spurious-common
        counter_dataset: toy-spurious-counter
      - type: spectral                 # scoring.md §3 on penultimate features and patch tokens
        dataset: toy-id-test
        analyses: [fixed, adaptive, fourier]
        max_images: 5000               # SVD images (first per class); fourier_images: 1000
      - type: dropout                  # scoring.md §4 weight-dropout redundancy probe of the FP32 model
        dataset: toy-id-test
        rates: [0.05, 0.1, 0.2, 0.3]
        repeats: 3
        towers: [visual, text]

The version is part of every result's configuration hash, so changing what a suite measures means
bumping it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from qbench.errors import QbenchError, warn

TASK_TYPES = ("zeroshot", "ood", "robustness", "spurious", "spectral", "dropout")
ZEROSHOT_METRICS = ("accuracy", "ece", "nll")
OOD_KINDS = ("near", "far")
SHIFT_KIND = "shift"
"""The ``ood_kind`` of shift-detection records: clean split as ID, a shifted copy of it as OOD."""
DEFAULT_OOD_METRICS = ("auroc", "fpr95", "aupr_in", "aupr_out")
DEFAULT_DETECTION_METRICS = ("auroc", "fpr95")
SPECTRAL_ANALYSES = ("fixed", "adaptive", "fourier")
DEFAULT_SPECTRAL_IMAGES = 5000  # scoring.md §3.1: SVD images (first files per class), must exceed D
DEFAULT_FOURIER_IMAGES = 1000
DEFAULT_DROPOUT_RATES = (0.05, 0.10, 0.20, 0.30)  # scoring.md §4
DEFAULT_DROPOUT_REPEATS = 3
DEFAULT_DROPOUT_IMAGES = 10000  # scoring.md §4: 10 per class of ImageNet-1k val
TOWERS = ("visual", "text")


@dataclass(frozen=True)
class TaskSpec:
    """Zero-shot classification on one dataset, with a list of metrics."""

    type: str
    dataset: str
    metrics: tuple[str, ...]

    @property
    def datasets(self) -> tuple[str, ...]:
        return (self.dataset,)


@dataclass(frozen=True)
class OODTarget:
    """One OOD split of a pair and whether it is near- or far-OOD for the ID set."""

    dataset: str
    kind: str = "far"


@dataclass(frozen=True)
class OODTaskSpec:
    """OOD detection: one ID split against several OOD splits, every scorer on every pair.

    ``scorers`` empty means every registered scorer (or the ``--scorer`` selection); the ID split's
    features are computed once and shared by all pairs.
    """

    id_dataset: str
    targets: tuple[OODTarget, ...]
    scorers: tuple[str, ...] = ()
    metrics: tuple[str, ...] = DEFAULT_OOD_METRICS
    type: str = "ood"
    record_task: str = "ood"  # the ``task`` of its records: "robustness" for a robustness task's shift detection

    @property
    def datasets(self) -> tuple[str, ...]:
        return (self.id_dataset, *(target.dataset for target in self.targets))


@dataclass(frozen=True)
class RobustnessTaskSpec:
    """Zero-shot metrics on a clean split and on shifted copies of it (natural shifts, corruptions).

    Records per set: FP32 and quantized values and the relative change δ(D) = (A_fp − A_q)/A_fp
    (``scoring.md`` §2.6), plus the mean over the shifted sets. With ``detection`` the clean split is
    the ID side and every shifted set the OOD side of a shift-detection task (every scorer, AUROC and
    FPR@95 by default), scored from the same cached features as the accuracies.
    """

    clean_dataset: str
    shifted_datasets: tuple[str, ...]
    metrics: tuple[str, ...] = ("accuracy",)
    detection: bool = True
    scorers: tuple[str, ...] = ()
    detection_metrics: tuple[str, ...] = DEFAULT_DETECTION_METRICS
    type: str = "robustness"

    @property
    def datasets(self) -> tuple[str, ...]:
        return (self.clean_dataset, *self.shifted_datasets)

    def detection_task(self) -> OODTaskSpec | None:
        """Shift detection as an OOD task (clean = ID, each shifted set = OOD of kind ``shift``)."""
        if not self.detection:
            return None
        return OODTaskSpec(self.clean_dataset, tuple(OODTarget(name, SHIFT_KIND) for name in self.shifted_datasets),
                           self.scorers, self.detection_metrics, record_task="robustness")


@dataclass(frozen=True)
class SpuriousTaskSpec:
    """Accuracy on a common-background and a counter-background split of the same classes (CounterAnimal).

    Records: accuracy (pooled and class-balanced) on each group, RSG of each model, ΔRSG and the added
    vulnerability V_add (``scoring.md`` §2.6, ``suites.md`` §4).
    """

    common_dataset: str
    counter_dataset: str
    type: str = "spurious"

    @property
    def datasets(self) -> tuple[str, ...]:
        return (self.common_dataset, self.counter_dataset)


@dataclass(frozen=True)
class SpectralTaskSpec:
    """Spectral analysis of penultimate visual features and patch tokens (``scoring.md`` §3).

    ``max_images`` images (the first ones of each class, class-balanced) enter the SVD analyses,
    ``fourier_images`` the 2D Fourier analysis of ViT patch tokens. The taps are read during the run's
    single encoding pass.
    """

    dataset: str
    analyses: tuple[str, ...] = SPECTRAL_ANALYSES
    max_images: int = DEFAULT_SPECTRAL_IMAGES
    fourier_images: int = DEFAULT_FOURIER_IMAGES
    type: str = "spectral"

    @property
    def datasets(self) -> tuple[str, ...]:
        return (self.dataset,)


@dataclass(frozen=True)
class DropoutTaskSpec:
    """The weight-dropout redundancy probe of the FP32 model (``scoring.md`` §4): a model-level record."""

    dataset: str
    rates: tuple[float, ...] = DEFAULT_DROPOUT_RATES
    repeats: int = DEFAULT_DROPOUT_REPEATS
    towers: tuple[str, ...] = TOWERS
    rescale: bool = False
    max_images: int = DEFAULT_DROPOUT_IMAGES
    type: str = "dropout"

    @property
    def datasets(self) -> tuple[str, ...]:
        return (self.dataset,)


Task = TaskSpec | OODTaskSpec | RobustnessTaskSpec | SpuriousTaskSpec | SpectralTaskSpec | DropoutTaskSpec


@dataclass(frozen=True)
class SuiteSpec:
    """A parsed suite: name, version, description, tasks, and the file it came from."""

    name: str
    version: int
    description: str
    tasks: tuple[Task, ...]
    source: str = ""

    @property
    def datasets(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(name for task in self.tasks for name in task.datasets))

    @property
    def ood_tasks(self) -> tuple[OODTaskSpec, ...]:
        """Every OOD-detection task: the OOD tasks and the shift detection of the robustness tasks."""
        tasks = []
        for task in self.tasks:
            if isinstance(task, OODTaskSpec):
                tasks.append(task)
            elif isinstance(task, RobustnessTaskSpec) and task.detection_task() is not None:
                tasks.append(task.detection_task())
        return tuple(tasks)

    @property
    def scorers(self) -> tuple[str, ...]:
        """Scorers named by the suite's OOD tasks (empty: the suite defers to every registered scorer)."""
        return tuple(dict.fromkeys(name for task in self.ood_tasks for name in task.scorers))


def load_suite(path: Path) -> SuiteSpec:
    """Parse and validate one suite YAML file; problems are one-line errors naming the file and field."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise QbenchError(f"cannot read suite file {path}: {first}") from None
    return parse_suite(raw, source=str(path))


def parse_suite(raw: object, source: str = "<memory>") -> SuiteSpec:
    def fail(problem: str) -> QbenchError:
        return QbenchError(f"suite {source}: {problem}")

    if not isinstance(raw, dict):
        raise fail("expected a mapping with name, version, description and tasks")
    unknown = [str(key) for key in raw if key not in SUITE_FIELDS]
    if unknown:
        raise fail(f"unknown field(s) {', '.join(unknown)} (allowed: {', '.join(SUITE_FIELDS)})")
    missing = [key for key in ("name", "version", "tasks") if key not in raw]
    if missing:
        raise fail(f"missing field(s) {', '.join(missing)}")
    if isinstance(raw["version"], bool) or not isinstance(raw["version"], int) or raw["version"] < 1:
        raise fail(f"version must be a positive integer, got {raw['version']!r}")
    if not isinstance(raw["tasks"], list) or not raw["tasks"]:
        raise fail("tasks must be a non-empty list")
    tasks = tuple(_parse_task(task, fail) for task in raw["tasks"])
    return SuiteSpec(
        name=str(raw["name"]),
        version=raw["version"],
        description=str(raw.get("description", "")),
        tasks=tasks,
        source=source,
    )


SUITE_FIELDS = ("name", "version", "description", "tasks")
"""The top-level fields of a suite file; any other is an error listing these."""

_TASK_FIELDS: dict[str, tuple[str, ...]] = {
    "zeroshot": ("type", "dataset", "metrics"),
    "ood": ("type", "id_dataset", "ood_datasets", "scorers", "metrics"),
    "robustness": ("type", "clean_dataset", "shifted_datasets", "metrics", "detection", "scorers", "detection_metrics"),
    "spurious": ("type", "common_dataset", "counter_dataset"),
    "spectral": ("type", "dataset", "analyses", "max_images", "fourier_images"),
    "dropout": ("type", "dataset", "rates", "repeats", "towers", "rescale", "max_images"),
}


def _parse_task(raw: object, fail) -> Task:
    if not isinstance(raw, dict):
        raise fail(f"each task must be a mapping, got {raw!r}")
    task_type = raw.get("type", "zeroshot")
    if task_type not in TASK_TYPES:
        raise fail(f"unknown task type {task_type!r} (available: {', '.join(TASK_TYPES)})")
    unknown = [str(key) for key in raw if key not in _TASK_FIELDS[task_type]]
    if unknown:
        raise fail(f"unknown field(s) {', '.join(unknown)} in a {task_type} task (allowed: {', '.join(_TASK_FIELDS[task_type])})")
    parsers = {"ood": _parse_ood_task, "robustness": _parse_robustness_task, "spurious": _parse_spurious_task,
               "spectral": _parse_spectral_task, "dropout": _parse_dropout_task}
    if task_type in parsers:
        return parsers[task_type](raw, fail)
    if "dataset" not in raw:
        raise fail(f"each task needs a type and a dataset, got {raw!r}")
    metrics = _names(raw.get("metrics", ZEROSHOT_METRICS), "metrics", fail)
    _check_known(metrics, ZEROSHOT_METRICS, "metric", fail)
    return TaskSpec(type=task_type, dataset=str(raw["dataset"]), metrics=metrics)


def _parse_ood_task(raw: dict, fail) -> OODTaskSpec:
    from qbench.ood_metrics import OOD_METRICS

    if "id_dataset" not in raw or not raw.get("ood_datasets"):
        raise fail("an ood task needs id_dataset and a non-empty ood_datasets list")
    if not isinstance(raw["ood_datasets"], list):
        raise fail("ood_datasets must be a list of {dataset: NAME, kind: near|far}")
    targets = tuple(_parse_target(item, fail) for item in raw["ood_datasets"])
    metrics = _names(raw.get("metrics", DEFAULT_OOD_METRICS), "metrics", fail)
    _check_known(metrics, OOD_METRICS, "metric", fail)
    return OODTaskSpec(
        id_dataset=str(raw["id_dataset"]),
        targets=targets,
        scorers=_names(raw.get("scorers", ()), "scorers", fail),
        metrics=metrics,
    )


def _required(raw: dict, keys: tuple[str, ...], task_type: str, fail) -> None:
    missing = [key for key in keys if key not in raw]
    if missing:
        raise fail(f"a {task_type} task needs {', '.join(missing)}")


def _parse_robustness_task(raw: dict, fail) -> RobustnessTaskSpec:
    from qbench.ood_metrics import OOD_METRICS

    _required(raw, ("clean_dataset", "shifted_datasets"), "robustness", fail)
    shifted = _names(raw["shifted_datasets"], "shifted_datasets", fail)
    if not shifted:
        raise fail("shifted_datasets must name at least one shifted split")
    metrics = _names(raw.get("metrics", ["accuracy"]), "metrics", fail)
    _check_known(metrics, ZEROSHOT_METRICS, "metric", fail)
    if "accuracy" not in metrics:
        raise fail("a robustness task measures accuracy (the relative change δ is defined on it); add accuracy to metrics")
    detection = raw.get("detection", True)
    if not isinstance(detection, bool):
        raise fail(f"detection must be true or false, got {detection!r}")
    detection_metrics = _names(raw.get("detection_metrics", list(DEFAULT_DETECTION_METRICS)), "detection_metrics", fail)
    _check_known(detection_metrics, OOD_METRICS, "detection metric", fail)
    return RobustnessTaskSpec(str(raw["clean_dataset"]), shifted, metrics, detection,
                              _names(raw.get("scorers", []), "scorers", fail), detection_metrics)


def _parse_spurious_task(raw: dict, fail) -> SpuriousTaskSpec:
    _required(raw, ("common_dataset", "counter_dataset"), "spurious", fail)
    if raw["common_dataset"] == raw["counter_dataset"]:
        raise fail("common_dataset and counter_dataset must be two different splits")
    return SpuriousTaskSpec(str(raw["common_dataset"]), str(raw["counter_dataset"]))


def _positive_int(raw: dict, key: str, default: int, fail) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise fail(f"{key} must be a positive integer, got {value!r}")
    return value


def _parse_spectral_task(raw: dict, fail) -> SpectralTaskSpec:
    _required(raw, ("dataset",), "spectral", fail)
    analyses = _names(raw.get("analyses", list(SPECTRAL_ANALYSES)), "analyses", fail)
    _check_known(analyses, SPECTRAL_ANALYSES, "analysis", fail)
    if not analyses:
        raise fail("analyses must name at least one of " + ", ".join(SPECTRAL_ANALYSES))
    return SpectralTaskSpec(str(raw["dataset"]), analyses, _positive_int(raw, "max_images", DEFAULT_SPECTRAL_IMAGES, fail),
                            _positive_int(raw, "fourier_images", DEFAULT_FOURIER_IMAGES, fail))


def _parse_dropout_task(raw: dict, fail) -> DropoutTaskSpec:
    _required(raw, ("dataset",), "dropout", fail)
    rates_raw = raw.get("rates", list(DEFAULT_DROPOUT_RATES))
    if not isinstance(rates_raw, list) or not rates_raw:
        raise fail(f"rates must be a non-empty list of numbers in [0, 1], got {rates_raw!r}")
    rates = []
    for rate in rates_raw:
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= float(rate) <= 1.0:
            raise fail(f"each dropout rate must be a number in [0, 1], got {rate!r}")
        rates.append(float(rate))
    towers = _names(raw.get("towers", list(TOWERS)), "towers", fail)
    _check_known(towers, TOWERS, "tower", fail)
    if not towers:
        raise fail("towers must name visual, text or both")
    rescale = raw.get("rescale", False)
    if not isinstance(rescale, bool):
        raise fail(f"rescale must be true or false, got {rescale!r}")
    return DropoutTaskSpec(str(raw["dataset"]), tuple(rates), _positive_int(raw, "repeats", DEFAULT_DROPOUT_REPEATS, fail),
                           towers, rescale, _positive_int(raw, "max_images", DEFAULT_DROPOUT_IMAGES, fail))


def _parse_target(raw: object, fail) -> OODTarget:
    if isinstance(raw, str):
        return OODTarget(raw)
    if not isinstance(raw, dict) or "dataset" not in raw:
        raise fail(f"each ood_datasets entry needs a dataset (and kind near|far), got {raw!r}")
    kind = str(raw.get("kind", "far"))
    if kind not in OOD_KINDS:
        raise fail(f"ood kind must be near or far, got {kind!r} for {raw['dataset']}")
    return OODTarget(str(raw["dataset"]), kind)


def _names(raw: object, field: str, fail) -> tuple[str, ...]:
    if isinstance(raw, str) or not isinstance(raw, (list, tuple)):
        raise fail(f"{field} must be a list, got {raw!r}")
    return tuple(str(item) for item in raw)


def _check_known(names: tuple[str, ...], known: tuple[str, ...], what: str, fail) -> None:
    unknown = [name for name in names if name not in known]
    if unknown:
        raise fail(f"unknown {what}(s) {', '.join(unknown)} (available: {', '.join(known)})")


def load_suite_dir(folder: Path) -> list[SuiteSpec]:
    """Every ``*.yaml`` suite directly inside ``folder``, sorted by file name.

    A file that cannot be read or parsed is reported in one warning line and skipped, so one malformed suite
    does not disable every command; naming that suite then says it is unknown."""
    suites = []
    for path in sorted(Path(folder).glob("*.yaml")):
        try:
            suites.append(load_suite(path))
        except QbenchError as error:
            warn(f"{error}; this suite is skipped until the file is fixed")
    return suites
