"""Task types as an extension point (issue 15, item 5) and stable default scorers (item 3).

A "top5" task type is written here, in the test, as a third-party package would write it: a
:class:`qbench.tasks.TaskType` subclass and a suite YAML using ``type: top5``, registered through
``extra_plugins``. No core module knows about it; the toy world evaluates it end to end.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pytest

from cli_runner import run_cli
from qbench.engine import evaluate
from qbench.errors import QbenchError
from qbench.hookspecs import hookimpl
from qbench.plugins import get_plugin_manager
from qbench.registry import build_registry
from qbench.suites import load_suite, parse_suite
from qbench.reporting.report import format_value
from qbench.tasks import TaskOutput, TaskRun, TaskType, builtin_task_types, paired_record, using_task_types

README = Path(__file__).resolve().parents[1] / "README.md"
SEEN_LOGITS: dict[str, dict[str, np.ndarray]] = {}


@dataclass(frozen=True)
class TopKSpec:
    type: str
    dataset: str
    k: int

    @property
    def datasets(self) -> tuple[str, ...]:
        return (self.dataset,)


class TopK(TaskType):
    """Top-k zero-shot accuracy of each state (k = 5 by default)."""

    name = "top5"
    summary = "top-k zero-shot accuracy, FP32 vs quantized"
    fields = ("dataset", "k")

    def parse(self, raw: Mapping[str, Any], fail) -> TopKSpec:
        if "dataset" not in raw:
            raise fail("a top5 task needs a dataset")
        k = raw.get("k", 5)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise fail(f"k must be a positive integer, got {k!r}")
        return TopKSpec(self.name, str(raw["dataset"]), k)

    def score(self, spec: TopKSpec, run: TaskRun) -> TaskOutput:
        logits = run.bank(spec.dataset)  # each state's float64 logits from the cached features
        labels = run.bank.labels[spec.dataset]
        SEEN_LOGITS[f"{spec.dataset}/{'tuned' if run.tuned else 'untuned'}"] = {**logits, "labels": labels}
        hit = {state: float(np.mean(np.any(np.argsort(-logits[state], axis=1)[:, :spec.k] == labels[:, None], axis=1)))
               for state in ("fp32", "quantized")}
        return TaskOutput([paired_record(run.suite, self.name, spec.dataset, f"top{spec.k}_accuracy",
                                         hit["fp32"], hit["quantized"], param=f"k={spec.k}")])


TOP5_SUITE = """\
name: toy-top5
version: 1
description: Top-1 and top-5 accuracy on the toy ID split.
tasks:
  - type: zeroshot
    dataset: toy-id-test
    metrics: [accuracy]
  - type: top5
    dataset: toy-id-test
"""


class TopKPlugin:
    """A third-party package: the task type and a suite using it (parsed inside the hook)."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "toy-top5.yaml"
        self.path.write_text(TOP5_SUITE, encoding="utf-8")

    @hookimpl
    def qbench_register_task_types(self) -> list[type[TaskType]]:
        return [TopK]

    @hookimpl
    def qbench_register_suites(self) -> list:
        return [load_suite(self.path)]


def _registry(*plugins: object):
    return build_registry(get_plugin_manager(load_entrypoints=False, extra_plugins=plugins))


def _top_k(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Top-k accuracy computed independently: the true class's logit is beaten by fewer than k others."""
    true = logits[np.arange(len(labels)), labels]
    return float(np.mean((logits > true[:, None]).sum(axis=1) < k))


@pytest.fixture(scope="module")
def top5_run(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("top5")
    registry = _registry(TopKPlugin(folder))
    request = evaluate.EvalRequest(suites=("toy-top5",), bits="w4a8", limit=300, feature_cache=False, logit_tuning=True,
                                   proxy_n=200)
    document = evaluate.run(evaluate.resolve(request, registry))
    return folder, registry, document


def test_a_task_type_written_in_a_test_plugs_in_and_scores_from_the_cached_logits(top5_run):
    _, registry, document = top5_run
    assert registry.entry("task_types", "top5").value is TopK
    results = document["results"]
    top5 = [record for record in results if record["task"] == "top5"]
    assert [record["logit_tuned"] for record in top5] == [False, True]  # a logit-stage task: scored again when tuned
    seen = SEEN_LOGITS["toy-id-test/untuned"]
    labels = seen["labels"]
    assert len(labels) == 300 and seen["fp32"].shape == (300, 10)
    record = top5[0]
    assert record["metric"] == "top5_accuracy" and record["param"] == "k=5" and record["dataset"] == "toy-id-test"
    assert record["fp32"] == pytest.approx(_top_k(seen["fp32"], labels, 5), abs=1e-12)
    assert record["quantized"] == pytest.approx(_top_k(seen["quantized"], labels, 5), abs=1e-12)
    assert record["delta"] == pytest.approx((record["fp32"] - record["quantized"]) / record["fp32"])
    # the logits the task saw are the run's own: their top-1 is the zero-shot accuracy record of the same run
    top1 = next(r for r in results if r["task"] == "zeroshot" and r["metric"] == "accuracy" and not r["logit_tuned"])
    assert top1["fp32"] == pytest.approx(float(np.mean(seen["fp32"].argmax(axis=1) == labels)), abs=1e-12)
    assert top1["quantized"] == pytest.approx(float(np.mean(seen["quantized"].argmax(axis=1) == labels)), abs=1e-12)
    assert record["fp32"] >= top1["fp32"] and record["quantized"] >= top1["quantized"]
    assert record["quantized"] < 1.0 or record["fp32"] < 1.0 or top1["quantized"] < 1.0  # not a vacuous comparison


def test_a_plugin_task_without_evidence_support_leaves_rescore_working(top5_run):
    from qbench.engine.evidence import Rescored, compare_sections, parse_evidence, rescore

    _, registry, document = top5_run
    evidence = parse_evidence(document.evidence_bytes, "memory", document["evidence"]["sha256"])
    rescored = rescore(document, evidence, registry)
    assert isinstance(rescored, Rescored) and rescored.unbacked_tasks == frozenset({"top5"})
    assert compare_sections(document, rescored) == []
    assert all(record["task"] != "top5" for record in rescored.results)


def test_report_renders_an_unknown_task_type_generically(top5_run, capsys):
    folder, _, document = top5_run
    path = folder / "run.json"
    path.write_text(json.dumps(dict(document)), encoding="utf-8")
    code, _, err = run_cli(capsys, "report", str(path), "--out", str(folder / "report"))
    assert code == 0, err
    text = (folder / "report" / "report.md").read_text(encoding="utf-8")
    assert "### top5" in text
    section = text.split("### top5", 1)[1].split("###", 1)[0]
    record = next(r for r in document["results"] if r["task"] == "top5" and not r["logit_tuned"])
    assert "top5_accuracy" in section and "k=5" in section
    row = next(line for line in section.splitlines() if "top5_accuracy" in line and "| no |" in line)
    assert format_value(record["fp32"], "top5_accuracy") in row and format_value(record["quantized"], "top5_accuracy") in row


# -- YAML errors ---------------------------------------------------------------------------------------------
def test_unknown_task_type_in_yaml_names_the_close_match(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text(TOP5_SUITE.replace("type: top5", "type: top-5"), encoding="utf-8")
    with using_task_types({**builtin_task_types(), "top5": TopK}):
        with pytest.raises(QbenchError) as caught:
            load_suite(path)
    message = str(caught.value)
    assert message.startswith(f"suite {path}: task 2: unknown task type 'top-5'; did you mean 'top5'?")
    assert "\n" not in message


def test_a_bad_field_of_a_plugin_task_type_names_file_task_and_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(TOP5_SUITE + "    k: 0\n", encoding="utf-8")
    with using_task_types({**builtin_task_types(), "top5": TopK}):
        with pytest.raises(QbenchError) as caught:
            load_suite(path)
    assert str(caught.value) == f"suite {path}: task 2 (top5): k must be a positive integer, got 0"
    path.write_text(TOP5_SUITE + "    top: 3\n", encoding="utf-8")
    with using_task_types({**builtin_task_types(), "top5": TopK}):
        with pytest.raises(QbenchError, match=r"task 2 \(top5\): unknown field\(s\) top in a top5 task \(allowed: type, dataset, k\)"):
            load_suite(path)


def test_a_plugin_task_type_that_crashes_while_parsing_is_one_line():
    class Broken(TopK):
        name = "broken"

        def parse(self, raw, fail):
            return raw["missing"]

    with using_task_types({"broken": Broken}):
        with pytest.raises(QbenchError) as caught:
            parse_suite({"name": "x", "version": 1, "tasks": [{"type": "broken", "dataset": "d"}]}, source="b.yaml")
    assert str(caught.value).startswith("suite b.yaml: task 1 (broken): task type 'broken'")
    assert "KeyError" in str(caught.value) and "\n" not in str(caught.value)


# -- stable default scorers (item 3) -----------------------------------------------------------------------------
def _extra_scorer_plugin():
    from qbench_plugins.scorers.msp import MaximumSoftmaxProbability

    class CopyOfMSP(MaximumSoftmaxProbability):
        name = "msp-copy"

    class ExtraScorer:
        @hookimpl
        def qbench_register_scorers(self):
            return [CopyOfMSP]

    return ExtraScorer()


def test_installing_a_scorer_changes_no_ood_hash():
    plain = _registry()
    extra = _registry(_extra_scorer_plugin())
    assert "msp-copy" in extra.names("scorers") and "msp-copy" not in plain.names("scorers")
    request = evaluate.EvalRequest(suites=("toy-ood",))
    before = evaluate.resolve(request, plain)
    after = evaluate.resolve(request, extra)
    assert after.config["config_hash"] == before.config["config_hash"]
    assert list(after.scorers) == ["energy", "entropy", "eoe", "generic-negative", "mcm", "msp", "neglabel"]
    quoted = [line for line in README.read_text(encoding="utf-8").splitlines() if "qbench report" in line and "config hash" in line]
    prefix = quoted[0].split("qbench report ", 1)[1].split()[0]  # the toy-ood run the README's plots section stores
    assert len(prefix) >= 8 and after.config["config_hash"].startswith(prefix)
    both = evaluate.EvalRequest(suites=("toy-id", "toy-ood", "robustness"))
    assert evaluate.resolve(both, extra).config["config_hash"] == evaluate.resolve(both, plain).config["config_hash"]


def test_scorer_selection_replaces_the_default_but_not_listed_scorers():
    registry = _registry(_extra_scorer_plugin())
    chosen = evaluate.resolve(evaluate.EvalRequest(suites=("toy-ood",), scorers=("msp-copy", "mcm")), registry)
    assert list(chosen.scorers) == ["msp-copy", "mcm"]
    [detection] = chosen.suites[0].ood_tasks
    assert detection.running(("msp-copy", "mcm")) == ("msp-copy", "mcm")
    listed = parse_suite({"name": "x", "version": 1, "tasks": [
        {"type": "ood", "id_dataset": "toy-id-test", "ood_datasets": ["toy-ood-far"], "scorers": ["energy"]}]})
    assert listed.ood_tasks[0].running(("mcm",)) == ("energy",)
