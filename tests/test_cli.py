"""The CLI end to end: listing, the default toy-world evaluation, the store, and one-line errors."""

import json
import os
import subprocess
import sys

import pytest

from cli_runner import run_cli




def test_list_shows_builtins_with_sources(capsys):
    code, out, _ = run_cli(capsys, "list")
    assert code == 0
    for expected in ("models", "quantizers", "scorers", "suites", "toy-clip", "minmax", "fp32", "msp",
                     "toy-id", "builtin:qbench_plugins.quantizers.minmax"):
        assert expected in out


def test_list_one_kind(capsys):
    code, out, _ = run_cli(capsys, "list", "quantizers")
    assert code == 0 and "minmax" in out and "toy-clip" not in out


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--model", "toy-clp"], "unknown model 'toy-clp'; did you mean 'toy-clip'"),
        (["--quantizer", "nope"], "unknown quantizer 'nope'"),
        (["--suite", "toy-idd"], "unknown suite 'toy-idd'; did you mean 'toy-id'"),
        (["--bits", "w9a8"], "bad bit spec 'w9a8'"),
        (["--bits", "8bit"], "use the form wXaY"),
        (["--scope", "text"], "bad scope 'text'"),
        (["--qparam", "n_calibration"], "bad --qparam"),
        (["--qparam", "alpha=0.5"], "quantizer 'minmax' has no parameter 'alpha'"),
        (["--qparam", "n_calibration=many"], "bad value 'many'"),
        (["--device", "tpu"], "bad --device 'tpu'"),
        (["--suite", "cifar10"], "needs a data root: pass --data-root DIR"),
        (["--suite", "cifar10", "--data-root", "/nonexistent/qbench-data"], "data root /nonexistent/qbench-data does not exist"),
        (["--weights", "/nonexistent/ckpt.safetensors"], "checkpoint path /nonexistent/ckpt.safetensors does not exist"),
        (["--checkpoint", "/nonexistent/qbench-ckpt"], "checkpoint folder /nonexistent/qbench-ckpt does not exist"),
        (["--quantizer", "lsq", "--schedule", "0"], "bad schedule '0'"),
    ],
)
def test_bad_input_is_one_clear_line(capsys, args, expected):
    code, out, err = run_cli(capsys, "eval", *args)
    assert code == 2
    assert out == ""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("qbench: ")
    assert expected in lines[0]
    assert "Traceback" not in err


def test_missing_cifar_folder_names_the_layout(capsys, tmp_path):
    code, _, err = run_cli(capsys, "eval", "--suite", "cifar10", "--data-root", str(tmp_path))
    assert code == 2
    assert "cifar-10-batches-py" in err and "Traceback" not in err


def test_corrupt_checkpoint_is_one_clear_line(capsys, tmp_path):
    corrupt = tmp_path / "broken.safetensors"
    corrupt.write_bytes(b"this is not a checkpoint")
    code, _, err = run_cli(capsys, "eval", "--weights", str(corrupt))
    assert code == 2
    assert err.startswith("qbench: ") and str(corrupt) in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def default_json(tmp_path_factory):
    """One default evaluation in a fresh process, as a user runs it (with its own empty store)."""
    env = {**os.environ, "QBENCH_STORE": str(tmp_path_factory.mktemp("store") / "results.sqlite")}
    completed = subprocess.run(
        [sys.executable, "-m", "qbench", "eval", "--json"], capture_output=True, text=True, timeout=600, env=env
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout), completed.stderr


def test_default_eval_json_shape(default_json):
    document, stderr = default_json
    assert "Traceback" not in stderr
    config = document["config"]
    for key in ("model", "weights_tag", "quantizer", "quantizer_params", "bits", "scope", "proxy", "seed",
                "suites", "device", "qbench_version", "config_hash"):
        assert key in config
    assert (config["model"], config["quantizer"], config["bits"], config["scope"]) == ("toy-clip", "minmax", "w8a8", "visual")
    assert document["verification"]["passed"] is True
    assert document["verification"]["n_modules"] > 0
    metrics = {record["metric"]: record for record in document["results"]}
    assert set(metrics) == {"accuracy", "ece", "nll"}
    for record in document["results"]:
        assert record["dataset"] == "toy-id-test"
        assert set(record) >= {"dataset", "metric", "fp32", "quantized", "delta"}
    accuracy = metrics["accuracy"]
    assert 0.8 <= accuracy["fp32"] <= 1.0
    assert 0.0 <= accuracy["quantized"] <= 1.0
    assert accuracy["delta"] == pytest.approx((accuracy["fp32"] - accuracy["quantized"]) / accuracy["fp32"])


def test_repeat_is_served_from_store_unless_forced(capsys, tmp_path):
    store = str(tmp_path / "s.sqlite")
    args = ("eval", "--json", "--store", store, "--quantizer", "fp32")
    code, out, err = run_cli(capsys, *args)
    assert code == 0 and "served from the store" not in err
    first = json.loads(out)
    code, out, err = run_cli(capsys, *args)
    assert code == 0 and "served from the store" in err
    assert json.loads(out) == first
    code, out, err = run_cli(capsys, *args, "--force")
    assert code == 0 and "served from the store" not in err
    forced = json.loads(out)
    assert forced["config"]["config_hash"] == first["config"]["config_hash"]
    # FP32 baseline: both columns come from the same float model
    for record in forced["results"]:
        assert record["fp32"] == pytest.approx(record["quantized"], abs=1e-12)


def test_four_bit_weights_cost_accuracy(capsys, tmp_path, default_json):
    """w4a8 must lose accuracy against w8a8 on the toy world: a measured effect, not a constant."""
    code, out, _ = run_cli(capsys, "eval", "--json", "--bits", "w4a8", "--store", str(tmp_path / "s.sqlite"))
    assert code == 0
    w4 = {record["metric"]: record for record in json.loads(out)["results"]}["accuracy"]
    w8 = {record["metric"]: record for record in default_json[0]["results"]}["accuracy"]
    assert w4["fp32"] == pytest.approx(w8["fp32"])
    assert w4["quantized"] < w8["quantized"]


def test_results_export_csv(capsys, tmp_path):
    store = str(tmp_path / "s.sqlite")
    assert run_cli(capsys, "eval", "--quantizer", "fp32", "--store", store)[0] == 0
    csv = tmp_path / "r.csv"
    code, _, err = run_cli(capsys, "results", "--store", store, "--csv", str(csv))
    assert code == 0 and "wrote 3 result records" in err
    assert csv.read_text().count("\n") == 4


def test_a_grid_runs_every_configuration_and_writes_a_markdown_summary(capsys, tmp_path):
    target = tmp_path / "table.md"
    code, out, err = run_cli(capsys, "eval", "--quantizer", "minmax", "--quantizer", "fp32", "--bits", "w8a8",
                             "--bits", "w4a8", "--limit", "60", "--proxy-n", "60", "--json", "--markdown", str(target))
    assert code == 0, err
    runs = json.loads(out)["runs"]
    assert [(run["config"]["quantizer"], run["config"]["bits"]) for run in runs] == [
        ("minmax", "w8a8"), ("minmax", "w4a8"), ("fp32", "w8a8"), ("fp32", "w4a8")]
    lines = target.read_text().splitlines()
    assert lines[0].startswith("| quantizer | bits |") and len(lines) == 2 + 4
    assert all(run["config"]["config_hash"] in target.read_text() for run in runs)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--quantizer", "family:nope"], "no built-in quantizer of family 'nope'"),
        (["--quantizer", "minmax", "--quantizer", "fp32", "--qparam", "n_calibration=8"], "--qparam applies to one quantizer"),
        (["--quantizer", "minmax", "--bits", "w8a8", "--bits", "w9a9"], "bad bit spec 'w9a9'"),
    ],
)
def test_bad_grids_fail_before_any_work(capsys, args, expected):
    code, out, err = run_cli(capsys, "eval", *args)
    assert code == 2 and out == "" and expected in err and "loaded model" not in err


def test_run_config_yaml_sets_defaults_and_flags_override_it(capsys, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("quantizer: minmax\nbits: [w4a8]\nqparams: {n_calibration: 40}\nproxy-n: 40\nlimit: 40\n")
    code, out, err = run_cli(capsys, "eval", "--config", str(config), "--json")
    assert code == 0, err
    resolved = json.loads(out)["config"]
    assert (resolved["bits"], resolved["limit"], resolved["quantizer_params"]["n_calibration"]) == ("w4a8", 40, 40)
    code, out, err = run_cli(capsys, "eval", "--config", str(config), "--bits", "w8a8", "--json")
    assert code == 0 and json.loads(out)["config"]["bits"] == "w8a8"


@pytest.mark.parametrize(
    "content, expected",
    [("bitz: w8a8\n", "unknown setting 'bitz'"), ("- a\n- b\n", "must be a mapping"), ("qparams: 3\n", "qparams must be a mapping")],
)
def test_bad_run_config_is_one_line(capsys, tmp_path, content, expected):
    config = tmp_path / "run.yaml"
    config.write_text(content)
    code, out, err = run_cli(capsys, "eval", "--config", str(config))
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1
