"""Robustness, spurious, spectral and dropout suite tasks: parsing, closed-form scoring, the toy world end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qbench.analysis import metrics
from qbench.errors import QbenchError
from qbench.engine.ood_eval import IdClassifier
from qbench.suites import parse_suite
from qbench.engine.task_scoring import LogitBank, score_classification_tasks, trajectory_sections
from qbench_plugins.tasks.dropout import DropoutTaskSpec
from qbench_plugins.tasks.robustness import SHIFTED_MEAN, RobustnessTaskSpec
from qbench_plugins.tasks.spectral import SpectralTaskSpec
from qbench_plugins.tasks.spurious import SpuriousTaskSpec
from tests.cli_runner import run_cli


def _suite(*tasks: dict) -> dict:
    return {"name": "s", "version": 2, "tasks": list(tasks)}


# -- parsing -----------------------------------------------------------------------------------------------
def test_every_new_task_type_parses_with_defaults():
    suite = parse_suite(_suite(
        {"type": "robustness", "clean_dataset": "a", "shifted_datasets": ["b", "c"]},
        {"type": "spurious", "common_dataset": "n", "counter_dataset": "c"},
        {"type": "spectral", "dataset": "a"},
        {"type": "dropout", "dataset": "a", "rates": [0, 0.5]},
    ))
    robustness, spurious, spectral, dropout = suite.tasks
    assert isinstance(robustness, RobustnessTaskSpec) and robustness.metrics == ("accuracy",) and robustness.detection
    assert isinstance(spurious, SpuriousTaskSpec) and spurious.datasets == ("n", "c")
    assert isinstance(spectral, SpectralTaskSpec) and spectral.analyses == ("fixed", "adaptive", "fourier")
    assert isinstance(dropout, DropoutTaskSpec) and dropout.rates == (0.0, 0.5) and dropout.towers == ("visual", "text")
    assert suite.datasets == ("a", "b", "c", "n")
    detection = suite.ood_tasks[0]
    assert detection.id_dataset == "a" and [t.kind for t in detection.targets] == ["shift", "shift"]
    assert detection.record_task == "robustness" and detection.metrics == ("auroc", "fpr95")
    assert detection.default_scorers and detection.running(("msp",)) == ("msp",)  # --scorer replaces the default


def test_detection_off_leaves_no_ood_task():
    suite = parse_suite(_suite({"type": "robustness", "clean_dataset": "a", "shifted_datasets": ["b"], "detection": False}))
    assert suite.ood_tasks == ()


@pytest.mark.parametrize("task, fragment", [
    ({"type": "robustness", "clean_dataset": "a"}, "needs shifted_datasets"),
    ({"type": "robustness", "clean_dataset": "a", "shifted_datasets": []}, "at least one"),
    ({"type": "robustness", "clean_dataset": "a", "shifted_datasets": ["b"], "metrics": ["ece"]}, "add accuracy"),
    ({"type": "robustness", "clean_dataset": "a", "shifted_datasets": ["b"], "detection": "yes"}, "true or false"),
    ({"type": "robustness", "clean_dataset": "a", "shifted_datasets": ["b"], "detection_metrics": ["x"]}, "unknown detection metric"),
    ({"type": "spurious", "common_dataset": "a", "counter_dataset": "a"}, "two different splits"),
    ({"type": "spectral", "dataset": "a", "analyses": ["wavelet"]}, "unknown analysis"),
    ({"type": "spectral", "dataset": "a", "max_images": 0}, "positive integer"),
    ({"type": "dropout", "dataset": "a", "rates": [1.5]}, "in [0, 1]"),
    ({"type": "dropout", "dataset": "a", "towers": ["audio"]}, "unknown tower"),
    ({"type": "spurious", "common_dataset": "a", "counter_dataset": "b", "typo": 1}, "unknown field(s) typo"),
])
def test_bad_task_fields_are_one_line_errors(task, fragment):
    with pytest.raises(QbenchError) as error:
        parse_suite(_suite(task), source="bad.yaml")
    message = str(error.value)
    assert fragment in message and "bad.yaml" in message and "\n" not in message


# -- scoring from features ------------------------------------------------------------------------------------
def _classifier(k: int, d: int) -> IdClassifier:
    heads = np.eye(k, d)
    return IdClassifier(tuple(f"c{i}" for i in range(k)), ("{}",), {"fp32": heads, "quantized": heads},
                        {"fp32": 10.0, "quantized": 10.0}, {"fp32": None, "quantized": None})


def _features_with_accuracy(labels: np.ndarray, correct: np.ndarray, k: int, d: int) -> np.ndarray:
    """One-hot features on the true class where ``correct``, on the next class otherwise."""
    targets = np.where(correct, labels, (labels + 1) % k)
    return np.eye(k, d)[targets]


def _bank(groups: dict[str, tuple[np.ndarray, np.ndarray]], k: int = 4, d: int = 6) -> LogitBank:
    rng = np.random.default_rng(0)
    features, labels = {}, {}
    for name, (fp_correct, q_correct) in groups.items():
        y = rng.integers(0, k, size=len(fp_correct))
        labels[name] = y
        features[name] = {"fp32": _features_with_accuracy(y, fp_correct, k, d),
                          "quantized": _features_with_accuracy(y, q_correct, k, d)}
    classifier = _classifier(k, d)
    return LogitBank(features, labels, lambda name: classifier)


def _correct(n: int, right: int) -> np.ndarray:
    return np.arange(n) < right


def test_robustness_records_follow_the_relative_change_formula():
    bank = _bank({"clean": (_correct(100, 90), _correct(100, 88)),
                  "shift-a": (_correct(100, 60), _correct(100, 45)),
                  "shift-b": (_correct(100, 40), _correct(100, 40))})
    suite = parse_suite(_suite({"type": "robustness", "clean_dataset": "clean", "shifted_datasets": ["shift-a", "shift-b"]}))
    records = {record["dataset"]: record for record in score_classification_tasks([suite], bank)}
    assert records["clean"]["fp32"] == pytest.approx(0.90) and records["clean"]["quantized"] == pytest.approx(0.88)
    assert records["shift-a"]["delta"] == pytest.approx((0.60 - 0.45) / 0.60)
    assert records["shift-b"]["delta"] == 0.0 and records["shift-b"]["diff"] == 0.0
    mean = records[SHIFTED_MEAN]
    assert mean["fp32"] == pytest.approx(0.50) and mean["quantized"] == pytest.approx(0.425)
    assert mean["delta"] == pytest.approx(0.075 / 0.50)
    assert {record["task"] for record in records.values()} == {"robustness"}


def test_spurious_records_match_the_closed_form_and_the_identity():
    bank = _bank({"common": (_correct(200, 180), _correct(200, 171)),
                  "counter": (_correct(100, 60), _correct(100, 48))})
    suite = parse_suite(_suite({"type": "spurious", "common_dataset": "common", "counter_dataset": "counter"}))
    records = {(record["dataset"], record["metric"]): record for record in score_classification_tasks([suite], bank)}
    a_n, a_c, q_n, q_c = 0.90, 0.60, 0.855, 0.48
    rsg = records[("common+counter", "rsg")]
    assert rsg["fp32"] == pytest.approx((a_n - a_c) / a_n) and rsg["quantized"] == pytest.approx((q_n - q_c) / q_n)
    delta_rsg = records[("common+counter", "delta_rsg")]
    assert delta_rsg["value"] == pytest.approx((q_n - q_c) / q_n - (a_n - a_c) / a_n)
    assert delta_rsg["fp32"] is None and delta_rsg["quantized"] is None
    v_add = records[("common+counter", "v_add")]
    d_c, d_n = (a_c - q_c) / a_c, (a_n - q_n) / a_n
    assert v_add["value"] == pytest.approx(d_c - d_n)
    assert delta_rsg["value"] == pytest.approx((1 - rsg["fp32"]) * v_add["value"] / (1 - d_n), abs=1e-12)
    assert records[("counter", "accuracy")]["fp32"] == pytest.approx(a_c)


def test_scaling_both_groups_equally_gives_zero_gap_change():
    bank = _bank({"common": (_correct(100, 80), _correct(100, 40)), "counter": (_correct(100, 60), _correct(100, 30))})
    suite = parse_suite(_suite({"type": "spurious", "common_dataset": "common", "counter_dataset": "counter"}))
    records = {record["metric"]: record for record in score_classification_tasks([suite], bank) if record["dataset"] == "common+counter"}
    assert records["delta_rsg"]["value"] == pytest.approx(0.0, abs=1e-12)
    assert records["v_add"]["value"] == pytest.approx(0.0, abs=1e-12)


def test_balanced_accuracy_weights_classes_equally():
    from qbench.engine.task_scoring import balanced_accuracy

    labels = np.array([0] * 8 + [1] * 2)
    logits = np.zeros((10, 2))
    logits[:8, 0] = 1.0  # class 0 all right
    logits[8:, 0] = 1.0  # class 1 all wrong
    assert metrics.accuracy(logits, labels) == pytest.approx(0.8)
    assert balanced_accuracy(logits, labels) == pytest.approx(0.5)


def test_trajectory_of_an_unchanged_model_stays_put():
    same = _correct(50, 30)
    bank = _bank({"clean": (same, same)})
    [section] = trajectory_sections(bank, ["clean"], "quantized")
    assert section["flip_rate"] == 0.0
    for row in section["bins"]:
        assert row["conf_q"] == row["conf_fp"] and row["acc_q"] == row["acc_fp"]
        assert row["transition"][row["index"]] == pytest.approx(1.0) and sum(row["transition"]) == pytest.approx(1.0)


# -- corrupted splits follow the model ------------------------------------------------------------------------
def test_corrupted_split_resizes_to_the_model_crop():
    from PIL import Image

    from qbench.data import ArrayImages
    from qbench.engine.corruptions import CorruptedImages, follow_model_size
    from torchvision import transforms

    base = ArrayImages("base", np.full((2, 32, 32, 3), 128, np.uint8), np.array([0, 1]), ("a", "b"), ("{}",))
    split = CorruptedImages(base, "contrast", 3, 0, size=None, follow_model=True)
    preprocess = transforms.Compose([transforms.Resize(48, interpolation=transforms.InterpolationMode.BILINEAR),
                                     transforms.CenterCrop(48), transforms.ToTensor()])
    adapted = follow_model_size(split, preprocess)
    assert adapted.size == 48 and adapted.interpolation == "bilinear" and adapted.array(0).shape == (48, 48, 3)
    assert adapted.fingerprint != split.fingerprint and adapted.name == split.name
    fixed = CorruptedImages(base, "contrast", 3, 0, size=64)
    assert follow_model_size(fixed, preprocess) is fixed
    assert isinstance(adapted.image(1), Image.Image)


# -- the toy world end to end -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy_shift_document(tmp_path_factory):
    import contextlib
    import io

    from qbench.cli import main

    store = tmp_path_factory.mktemp("store") / "results.sqlite"
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        try:
            main(["eval", "--suite", "robustness", "--suite", "spurious", "--json", "--no-feature-cache",
                  "--store", str(store), "--scorer", "msp", "--scorer", "energy"])
        except SystemExit as exit_:
            assert not exit_.code, out.getvalue()
    return json.loads(out.getvalue())


def test_toy_robustness_and_spurious_records(toy_shift_document):
    results = toy_shift_document["results"]
    robustness = [r for r in results if r["task"] == "robustness" and not r.get("scorer")]
    shifted = {r["dataset"] for r in robustness if r.get("role") == "shifted"}
    assert shifted == {f"toy-shift-{c}" for c in ("gaussian_noise", "defocus_blur", "brightness", "contrast")}
    for record in robustness:
        assert record["delta"] == pytest.approx((record["fp32"] - record["quantized"]) / record["fp32"])
    clean = next(r for r in robustness if r["dataset"] == "toy-id-test" and r["metric"] == "accuracy")
    mean = next(r for r in robustness if r["dataset"] == SHIFTED_MEAN and r["metric"] == "accuracy")
    assert mean["fp32"] < clean["fp32"]  # corruptions cost the FP32 model accuracy: measured, not assumed
    detection = [r for r in results if r["task"] == "robustness" and r.get("scorer")]
    assert {(r["scorer"], r["ood_dataset"], r["metric"]) for r in detection} == {
        (scorer, dataset, metric) for scorer in ("msp", "energy") for dataset in shifted for metric in ("auroc", "fpr95")}
    assert all(r["ood_kind"] == "shift" and r["id_dataset"] == "toy-id-test" for r in detection)
    spurious = {(r["dataset"], r["metric"]): r for r in results if r["task"] == "spurious"}
    rsg = spurious[("toy-spurious-common+toy-spurious-counter", "rsg")]
    assert rsg["fp32"] > 0.1  # the toy model leans on the background cue
    assert spurious[("toy-spurious-common", "accuracy")]["fp32"] > spurious[("toy-spurious-counter", "accuracy")]["fp32"]
    for metric in ("delta_rsg", "v_add"):
        assert spurious[("toy-spurious-common+toy-spurious-counter", metric)]["value"] is not None


def test_toy_document_has_histograms_and_trajectories(toy_shift_document):
    histograms = toy_shift_document["ood_histograms"]
    assert {(h["scorer"], h["state"]) for h in histograms} == {(s, t) for s in ("msp", "energy") for t in ("fp32", "quantized")}
    for item in histograms:
        assert len(item["edges"]) == len(item["id_counts"]) + 1 == len(item["ood_counts"]) + 1
        assert sum(item["id_counts"]) == 1000 and sum(item["ood_counts"]) == 1000
    trajectories = {t["dataset"]: t for t in toy_shift_document["bin_trajectories"]}
    assert set(trajectories) == {"toy-id-test", "toy-spurious-common", "toy-spurious-counter",
                                 *(f"toy-shift-{c}" for c in ("gaussian_noise", "defocus_blur", "brightness", "contrast"))}
    assert sum(row["n"] for row in trajectories["toy-id-test"]["bins"]) == 1000


def test_toy_document_is_a_valid_submission(toy_shift_document):
    from qbench.reporting.leaderboard import submission_from_eval, validate_submission

    submission = validate_submission(submission_from_eval(toy_shift_document, "tests"), "toy")
    assert len(submission.results) == len(toy_shift_document["results"])


def test_screen_output_shows_values_and_shift_pairs(capsys):
    code, out, err = run_cli(capsys, "eval", "--suite", "spurious", "--no-feature-cache")
    assert code == 0, err
    assert "v_add" in out and "delta_rsg" in out and "rsg" in out and "toy-spurious-counter" in out


# -- leaderboard ranges ------------------------------------------------------------------------------------------
def _with_record(document: dict, metric: str, **changes) -> dict:
    """A copy of the toy run's document with the first ``metric`` record changed (``None`` deletes a key)."""
    import copy

    document = copy.deepcopy(document)
    record = next(item for item in document["results"] if item["metric"] == metric)
    for key, value in changes.items():
        if value is None and key in ("value",):
            record.pop(key, None)
        else:
            record[key] = value
    if record.get("fp32") is not None and record.get("quantized") is not None:  # keep delta/diff consistent
        record["delta"] = metrics.relative_change(record["fp32"], record["quantized"])
        record["diff"] = record["quantized"] - record["fp32"]
    return document


def test_leaderboard_checks_single_value_and_gap_records(toy_shift_document):
    from qbench.reporting.leaderboard import validate_submission

    good = validate_submission(_with_record(toy_shift_document, "v_add", value=-0.2), "ok")
    assert next(record for record in good.results if record.metric == "v_add").value == -0.2
    validate_submission(_with_record(toy_shift_document, "rsg", fp32=-0.1, quantized=0.3), "negative rsg is fine")
    with pytest.raises(QbenchError, match="needs a value"):
        validate_submission(_with_record(toy_shift_document, "v_add", value=None), "x")
    with pytest.raises(QbenchError, match="above 1"):
        validate_submission(_with_record(toy_shift_document, "rsg", fp32=1.5, quantized=0.3), "x")
    with pytest.raises(QbenchError, match="must be a number for accuracy"):
        validate_submission(_with_record(toy_shift_document, "accuracy", fp32=None, quantized=0.3), "x")


def test_cifar10c_suite_end_to_end_on_a_miniature_cifar10(capsys, tmp_path):
    """The real-data robustness suite on a 12-image CIFAR-10 in torchvision's layout (toy model: 32 px crop)."""
    from tests.test_zoo_end_to_end import write_cifar10

    write_cifar10(tmp_path / "data", n=12)
    code, out, err = run_cli(capsys, "eval", "--suite", "cifar10c-ic", "--data-root", str(tmp_path / "data"), "--json",
                             "--no-feature-cache", "--scorer", "msp")
    assert code == 0, err
    document = json.loads(out)
    datasets = document["datasets"]
    assert {name for name in datasets if name.startswith("cifar10c-ic-")} == {
        f"cifar10c-ic-{c}" for c in ("gaussian_noise", "defocus_blur", "brightness", "contrast")}
    assert all(datasets[name]["num_scored"] == 12 for name in datasets)
    assert any("after resizing to 32 px (bicubic)" in note for note in datasets["cifar10c-ic-contrast"]["notes"])
    assert len({datasets[name]["fingerprint"] for name in datasets}) == 5
    metrics_seen = {(r["dataset"], r["metric"]) for r in document["results"] if not r.get("scorer")}
    assert ("shifted-mean", "accuracy") in metrics_seen and ("cifar10c-ic-brightness", "nll") in metrics_seen


def test_missing_cifar_root_for_the_corruption_suite_is_one_line(capsys, tmp_path):
    code, out, err = run_cli(capsys, "eval", "--suite", "cifar10c-ic", "--data-root", str(tmp_path))
    assert code != 0 and "Traceback" not in err
    assert "cifar-10" in err.lower() and len(err.strip().splitlines()) == 1


def test_accuracy_records_carry_a_paired_bootstrap(toy_shift_document):
    accuracy = [r for r in toy_shift_document["results"] if r["metric"] == "accuracy" and r.get("role") != "mean"
                and not r.get("scorer")]
    assert accuracy
    for record in accuracy:
        boot = record["bootstrap"]
        assert boot["resamples"] == 1000 and boot["diff"] == pytest.approx(record["diff"])
        assert boot["ci_low"] <= boot["diff"] <= boot["ci_high"] and 0 < boot["p_value"] <= 1
        expected_se = np.sqrt(record["fp32"] * (1 - record["fp32"]) / 1000)  # binomial SE of a 1,000-image accuracy
        assert boot["se_fp"] == pytest.approx(expected_se, rel=0.15)


# -- spectral and dropout suites on the toy world ---------------------------------------------------------------
def _eval_json(capsys, *args: str) -> dict:
    code, out, err = run_cli(capsys, "eval", "--json", "--no-feature-cache", *args)
    assert code == 0, err
    return json.loads(out)


def _by_param(document: dict, metric: str) -> dict:
    return {r.get("param"): r for r in document["results"] if r["metric"] == metric}


def test_spectral_suite_of_an_unquantized_model_shows_no_distortion(capsys):
    document = _eval_json(capsys, "--suite", "spectral", "--quantizer", "fp32")
    assert all(r["value"] is None for r in _by_param(document, "sqnr_db").values())  # +inf: no noise at all
    assert all(r["value"] == pytest.approx(0.0, abs=1e-12) for r in _by_param(document, "spectral_distortion").values())
    assert all(r["value"] == pytest.approx(1.0, abs=1e-9) for r in _by_param(document, "subspace_similarity").values())
    assert all(r["value"] in (None, 0.0) for r in _by_param(document, "rse").values())
    for record in _by_param(document, "subspace_accuracy").values():
        assert record["fp32"] == record["quantized"]
    [section] = document["spectral"]
    assert section["dim"] == 80 and section["fourier"]["grid"] == [4, 4]
    assert section["fixed"]["k_sat"] == 1
    [probe] = document["dropout"]
    assert probe["rates"] == [0.05, 0.1, 0.2, 0.3] and probe["repeats"] == 3
    assert set(_by_param(document, "dropout_delta")) == {"p=0.05", "p=0.10", "p=0.20", "p=0.30"}


def test_spectral_suite_of_a_4bit_model_loses_most_snr_at_high_ranks(capsys):
    document = _eval_json(capsys, "--suite", "spectral", "--bits", "w4a8")
    sqnr = _by_param(document, "sqnr_db")
    bands = [param for param in sqnr if param != "ranks=all"]
    assert sqnr[bands[0]]["value"] > sqnr[bands[-1]]["value"] + 3.0  # measured on the toy ViT: the tail is noisiest
    full = _by_param(document, "subspace_accuracy")["ranks=1-80"]
    assert 0.5 < full["quantized"] <= 1.0
    rse = _by_param(document, "rse")["band=all"]["value"]
    assert rse is not None and rse > 0
    drops = [r["value"] for r in sorted(_by_param(document, "dropout_delta").values(), key=lambda r: r["param"])]
    assert drops == sorted(drops)  # more weights dropped, more accuracy lost (mean of 3 repeats)


def test_done_when_command_has_every_record(capsys):
    """The issue's acceptance command, offline on the toy world: every record kind is present."""
    document = _eval_json(capsys, "--suite", "robustness", "--suite", "spurious", "--suite", "spectral", "--scorer", "msp")
    kinds = {(r["task"], r["metric"]) for r in document["results"]}
    expected = {("robustness", m) for m in ("accuracy", "ece", "nll", "auroc", "fpr95")}
    expected |= {("spurious", m) for m in ("accuracy", "accuracy_balanced", "rsg", "delta_rsg", "v_add")}
    expected |= {("spectral", m) for m in ("sqnr_db", "spectral_distortion", "subspace_similarity", "k_sat",
                                           "subspace_accuracy", "csed", "max_energy_deviation", "rse", "dc_amplitude")}
    expected |= {("dropout", m) for m in ("dropout_accuracy", "dropout_delta")}
    assert expected <= kinds
    rsg = next(r for r in document["results"] if r["metric"] == "rsg")
    assert rsg["fp32"] > 0
    for section in ("reliability", "bin_trajectories", "ood_histograms", "spectral", "dropout"):
        assert document[section], section


def test_dropout_probe_runs_once_per_float_model_across_a_grid(capsys, tmp_path):
    code, out, err = run_cli(capsys, "eval", "--suite", "spectral", "--quantizer", "fp32", "--quantizer", "minmax",
                             "--json", "--cache-dir", str(tmp_path / "cache"))
    assert code == 0, err
    first, second = json.loads(out)["runs"]
    assert err.count("dropout probe: evaluation 13/13") == 1 and "served from the feature cache" in err
    assert first["dropout"][0]["accuracies"] == second["dropout"][0]["accuracies"]
    assert _by_param(first, "dropout_delta") == _by_param(second, "dropout_delta")
