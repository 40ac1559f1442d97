"""Suite YAML parsing and validation."""

import pytest

from qbench.errors import QbenchError
from qbench.suites import load_suite, load_suite_dir, parse_suite
from qbench_benchmarks import SUITE_DIR


def test_shipped_suites_parse_and_are_versioned():
    suites = {suite.name: suite for suite in load_suite_dir(SUITE_DIR)}
    assert "toy-id" in suites
    toy = suites["toy-id"]
    assert toy.version >= 1
    assert toy.datasets == ("toy-id-test",)
    assert toy.tasks[0].metrics == ("accuracy", "ece", "nll")


@pytest.mark.parametrize(
    "raw, problem",
    [
        ([], "expected a mapping"),
        ({"name": "x", "tasks": [{"dataset": "d"}]}, "missing field(s) version"),
        ({"name": "x", "version": "one", "tasks": [{"dataset": "d"}]}, "version must be a positive integer"),
        ({"name": "x", "version": 1, "tasks": []}, "tasks must be a non-empty list"),
        ({"name": "x", "version": 1, "tasks": [{"type": "zeroshot"}]}, "each task needs"),
        ({"name": "x", "version": 1, "tasks": [{"dataset": "d", "type": "captioning"}]}, "unknown task type"),
        ({"name": "x", "version": 1, "tasks": [{"dataset": "d", "metrics": ["acc"]}]}, "unknown metric(s) acc"),
    ],
)
def test_malformed_suites_name_the_problem(raw, problem):
    with pytest.raises(QbenchError) as caught:
        parse_suite(raw, source="s.yaml")
    assert problem in str(caught.value)
    assert str(caught.value).startswith("suite s.yaml: ")


def test_unreadable_yaml_is_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(QbenchError, match="cannot read suite file") as caught:
        load_suite(path)
    assert "\n" not in str(caught.value)


def test_ood_suites_parse_with_pairs_kinds_and_default_metrics():
    suites = {suite.name: suite for suite in load_suite_dir(SUITE_DIR)}
    toy = suites["toy-ood"]
    ood = [task for task in toy.tasks if task.type == "ood"][0]
    assert ood.id_dataset == "toy-id-test"
    assert [(target.dataset, target.kind) for target in ood.targets] == [("toy-ood-near", "near"), ("toy-ood-far", "far")]
    assert ood.metrics == ("auroc", "fpr95", "aupr_in", "aupr_out")
    # no scorers listed: the OOD task type's default, the study's six plus generic-negative, whatever is installed
    assert ood.scorers == ("energy", "entropy", "eoe", "generic-negative", "mcm", "msp", "neglabel")
    assert ood.default_scorers and toy.ood_tasks[0].default_scorers
    assert toy.datasets == ("toy-id-test", "toy-ood-near", "toy-ood-far")
    for name in ("c10-vs-c100", "c100-vs-c10", "in10-vs-in20", "in20-vs-in10", "inx",
                 "in1k-vs-inat", "in1k-vs-sun", "in1k-vs-places", "in1k-vs-dtd", "in1k-mos"):
        assert any(task.type == "ood" for task in suites[name].tasks), name


def test_every_dataset_a_shipped_suite_names_is_registered():
    from qbench.registry import build_registry

    registry = build_registry()
    for suite in load_suite_dir(SUITE_DIR):
        for dataset in suite.datasets:
            registry.get("datasets", dataset)  # raises with did-you-mean when missing


@pytest.mark.parametrize(
    "task, problem",
    [
        ({"type": "ood", "ood_datasets": [{"dataset": "b"}]}, "needs id_dataset and a non-empty ood_datasets"),
        ({"type": "ood", "id_dataset": "a", "ood_datasets": "b"}, "ood_datasets must be a list"),
        ({"type": "ood", "id_dataset": "a", "ood_datasets": [{"dataset": "b", "kind": "medium"}]}, "near or far"),
        ({"type": "ood", "id_dataset": "a", "ood_datasets": [{"kind": "near"}]}, "needs a dataset"),
        ({"type": "ood", "id_dataset": "a", "ood_datasets": ["b"], "metrics": ["auc"]}, "unknown metric(s) auc"),
        ({"type": "ood", "id_dataset": "a", "ood_datasets": ["b"], "scorers": "msp"}, "scorers must be a list"),
    ],
)
def test_malformed_ood_tasks_name_the_problem(task, problem):
    with pytest.raises(QbenchError) as caught:
        parse_suite({"name": "x", "version": 1, "tasks": [task]}, source="s.yaml")
    assert problem in str(caught.value)


def test_an_ood_target_may_be_a_bare_name():
    suite = parse_suite({"name": "x", "version": 1, "tasks": [{"type": "ood", "id_dataset": "a", "ood_datasets": ["b"]}]})
    assert suite.tasks[0].targets[0].dataset == "b" and suite.tasks[0].targets[0].kind == "far"


def test_unknown_task_type_names_the_close_match():
    with pytest.raises(QbenchError) as caught:
        parse_suite({"name": "x", "version": 1, "tasks": [{"type": "robustnes", "clean_dataset": "a"}]}, source="s.yaml")
    message = str(caught.value)
    assert message.startswith("suite s.yaml: task 1: unknown task type 'robustnes'; did you mean 'robustness'?")
    assert "available: dropout, ood, robustness, spectral, spurious, zeroshot" in message and "\n" not in message


def test_a_bad_task_field_names_the_file_the_task_and_the_field():
    tasks = [{"dataset": "a"}, {"type": "spectral", "dataset": "a", "max_images": -3}]
    with pytest.raises(QbenchError) as caught:
        parse_suite({"name": "x", "version": 1, "tasks": tasks}, source="s.yaml")
    assert str(caught.value) == "suite s.yaml: task 2 (spectral): max_images must be a positive integer, got -3"


def test_listed_scorers_are_kept_and_an_empty_list_is_refused():
    suite = parse_suite({"name": "x", "version": 1, "tasks": [
        {"type": "ood", "id_dataset": "a", "ood_datasets": ["b"], "scorers": ["msp", "mcm"]}]})
    [detection] = suite.ood_tasks
    assert detection.scorers == ("msp", "mcm") and not detection.default_scorers
    assert detection.running(("energy",)) == ("msp", "mcm")  # --scorer never replaces listed scorers
    with pytest.raises(QbenchError, match="scorers must name at least one scorer"):
        parse_suite({"name": "x", "version": 1, "tasks": [
            {"type": "ood", "id_dataset": "a", "ood_datasets": ["b"], "scorers": []}]})
