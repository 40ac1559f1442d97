"""``qbench deploy-check`` (issue 17): a ``qbench quantize`` checkpoint on the torchao int8 engine, side by side with
its simulation, through the evaluation pipeline; one-line refusals (not exportable, no CUDA, missing extra); the
``deploy_check`` record kind in the store; its section in ``qbench report``.

The end-to-end run (toy world, minmax W8A8, torchao without ``torch.compile``, 300 images of toy-id) is made once
per module; the checkpoints are made through the Python API of ``qbench quantize``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("torchao")

import torch  # noqa: E402

from cli_runner import run_cli  # noqa: E402
from submission_factory import run_qbench  # noqa: E402
from qbench.engine.store import DEPLOY_CHECK_FORMAT, CorruptDocument, ResultStore  # noqa: E402
from qbench.errors import QbenchError  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

LIMIT = 300
DEPLOY = ("--suite", "toy-id", "--limit", str(LIMIT), "--no-compile", "--repeats", "2")


def registry():
    """The built-in plugins only (no entry points)."""
    from qbench.plugins import get_plugin_manager
    from qbench.registry import build_registry

    return build_registry(get_plugin_manager(load_entrypoints=False))


def make_checkpoint(folder: Path, quantizer: str, proxy_n: int, scope: str = "visual") -> Path:
    """``qbench quantize --quantizer QUANTIZER --out FOLDER`` on the toy world, through its Python API."""
    from qbench.engine.evaluate import EvalRequest, quantize_to_checkpoint, resolve

    plugins = registry()
    request = EvalRequest(quantizer=quantizer, bits="w8a8", suites=(), proxy_n=proxy_n, scope=scope)
    resolved = resolve(request, plugins, require_suites=False)
    checkpoint, verification = quantize_to_checkpoint(resolved, plugins.get("proxies", request.proxy), folder)
    assert verification["passed"]
    return Path(checkpoint.path)


def call(*args: str) -> tuple[int, str, str]:
    """``qbench ARGS`` in-process (for module fixtures, which cannot use capsys): exit code, stdout, stderr."""
    return run_qbench(*args)


@dataclass
class World:
    root: Path
    checkpoint: Path
    store: Path
    record: dict
    stderr: str


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A minmax W8A8 checkpoint and one stored deploy check of it on toy-id (torchao, eager)."""
    root = tmp_path_factory.mktemp("deploy-check")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("QBENCH_CACHE", str(root / "cache"))
        patch.setenv("QBENCH_STORE", str(root / "unused-store"))
        patch.setenv("XDG_CONFIG_HOME", str(root / "xdg"))
        patch.delenv("QBENCH_CONFIG", raising=False)
        patch.delenv("QBENCH_DATA", raising=False)
        checkpoint = make_checkpoint(root / "minmax-w8a8", "minmax", 100)
        store = root / "store"
        code, out, err = call("deploy-check", "--checkpoint", str(checkpoint), *DEPLOY, "--json", "--store", str(store))
    assert code == 0, err
    return World(root, checkpoint, store, json.loads(out), err)


def one_line(err: str) -> str:
    """The only non-empty line of ``err`` (fails when there are more)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


# -- the end-to-end run ------------------------------------------------------------------------------
def test_real_int8_agrees_with_the_simulation(world):
    record = world.record
    assert record["kind"] == "deploy_check" and record["config"]["engine"] == "torchao"
    overall = record["agreement"]["all"]
    assert overall["n"] == LIMIT
    assert overall["real_vs_simulated"] >= 0.99
    assert record["summary"]["agreement_real_vs_simulated"] == overall["real_vs_simulated"]
    embeddings = record["embeddings"]
    assert 0 < embeddings["all"]["real_vs_simulated"]["rel_l2"] < embeddings["all"]["simulated_vs_fp32"]["rel_l2"]
    assert abs(embeddings["rel_l2_ratio"] - 1) <= 0.2 and embeddings["within_tolerance"]
    assert embeddings["all"]["real_vs_fp32"]["cosine"] > 0.99
    assert record["verification"]["passed"]


def test_each_image_goes_through_each_encoder_once(world):
    calls = world.record["encoder_calls"]
    assert calls["images"] == {"fp32": LIMIT, "quantized": LIMIT, "real": LIMIT}
    prints = calls["state_fingerprints"]["image"]
    assert len({prints["fp32"], prints["quantized"], prints["real"]}) == 3  # the cache never mixes real and simulated
    text = calls["state_fingerprints"]["text"]
    assert text["real"] == text["quantized"]  # the engine leaves the text tower alone


def test_every_metric_is_reported_from_both(world):
    rows = {row["metric"]: row for row in world.record["metrics"] if row["dataset"] == "toy-id-test"}
    assert {"accuracy", "ece", "nll"} <= set(rows)
    for row in rows.values():
        assert isinstance(row["simulated"], float) and isinstance(row["real"], float) and isinstance(row["fp32"], float)
        assert row["difference"] == row["real"] - row["simulated"]
        assert "delta_simulated" in row and "delta_real" in row
    assert world.record["summary"]["max_metric_difference"] < 0.02


def test_simulated_column_is_what_qbench_eval_reports(world, capsys):
    """The simulated state is scored exactly as 'qbench eval --checkpoint' scores the quantized model; the
    evaluation, stored in the same store, then reports with the deploy check of its checkpoint."""
    code, out, err = run_cli(capsys, "eval", "--checkpoint", str(world.checkpoint), "--suite", "toy-id", "--limit",
                             str(LIMIT), "--json", "--store", str(world.store))
    assert code == 0, err
    document = json.loads(out)
    evaluated = [record for record in document["results"] if record["dataset"] == "toy-id-test"]
    rows = [row for row in world.record["metrics"] if row["dataset"] == "toy-id-test"]
    assert [record["metric"] for record in evaluated] == [row["metric"] for row in rows]
    for record, row in zip(evaluated, rows):
        assert (row["fp32"], row["simulated"]) == (record["fp32"], record["quantized"]), row
    report = world.root / "report-of-eval"
    code, _, err = run_cli(capsys, "report", document["config"]["config_hash"], "--out", str(report), "--store",
                           str(world.store))
    assert code == 0, err
    text = (report / "report.md").read_text()
    assert "## Run 1:" in text and "## Deploy check 1:" in text and world.record["config"]["config_hash"] in text


def test_per_layer_check_passes_on_identical_inputs(world):
    layers = world.record["layers"]
    assert layers["available"] and layers["passed"] and layers["n_failed"] == 0
    assert layers["n_layers"] == len(world.record["plan"]["int8_layers"]) == len(world.record["engine"]["int8_layers"]) > 0
    assert all(row["rel_l2"] <= 1e-6 for row in layers["layers"]) and layers["max_rel_l2"] <= 1e-6


def test_engine_timings_and_plan_are_recorded(world):
    import torchao

    record = world.record
    engine = record["engine"]
    assert engine["version"] == torchao.__version__ and engine["compile"] is False
    assert any("_int_mm" in op for op in engine["int8_ops"]) and engine["notes"]
    speed = record["speed"]
    assert speed["repeats"] == 2 and speed["order"] == ["fp32_eager", "fp32_engine", "simulated", "real_int8"]
    assert all(len(samples) == 2 for samples in speed["samples_ms"].values())
    assert speed["ratios"]["real_int8_vs_fp32_eager"] == pytest.approx(
        speed["median_ms"]["fp32_eager"] / speed["median_ms"]["real_int8"])
    assert speed["threads"] == record["provenance"]["threads"]["torch_threads"] >= 1
    assert record["plan"]["exportable"] and not record["plan"]["problems"]
    assert "weight_int" not in json.dumps(record["plan"])  # a summary, not the tensors


def test_human_output_shows_the_side_by_side_tables(world, capsys):
    from qbench.cli import print_deploy_check

    print_deploy_check(world.record)
    out = capsys.readouterr().out
    for text in ("Agreement and embeddings", "Simulated vs real int8, per metric", "accuracy", "Per-layer check",
                 "passed", "real int8 (engine)", "note: int8 ops that ran: aten::_int_mm"):
        assert text in out, text


# -- the record kind in the store and in qbench report ------------------------------------------------
def test_stored_record_round_trips(world):
    store = ResultStore(world.store)
    check_hash = world.record["config"]["config_hash"]
    assert store.get_deploy_check(check_hash) == world.record
    assert store.deploy_checks() == [world.record]
    assert check_hash in world.stderr
    raw = json.loads(store.deploy_check_path(check_hash).read_text())
    assert raw["integrity"]["format"] == DEPLOY_CHECK_FORMAT
    assert check_hash not in store.stored_hashes()  # not an evaluation document


def test_report_shows_the_deploy_check_section(world, capsys, tmp_path):
    check_hash = world.record["config"]["config_hash"]
    code, _, err = run_cli(capsys, "report", check_hash[:8], "--out", str(tmp_path / "by-hash"), "--store", str(world.store))
    assert code == 0, err
    text = (tmp_path / "by-hash" / "report.md").read_text()
    assert "## Deploy check 1: toy-clip · minmax w8a8 · torchao" in text and "## Run" not in text
    assert "### Simulated vs real int8, per metric" in text and "| toy-id | toy-id-test | accuracy |" in text
    assert "### Speed" in text and "█" in text and "### Per-layer check" in text and "| passed |" in text
    saved = tmp_path / "record.json"
    saved.write_text(json.dumps(world.record))
    code, _, err = run_cli(capsys, "report", str(saved), "--out", str(tmp_path / "by-file"))
    assert code == 0, err
    assert (tmp_path / "by-file" / "report.md").read_text() == text


def test_a_flipped_byte_in_a_stored_deploy_check_is_named_not_hidden(capsys, tmp_path):
    store = ResultStore(tmp_path / "store")
    path = store.put_deploy_check(_record())
    raw = bytearray(path.read_bytes())
    raw[raw.index(b"0.5")] = ord("7")  # 0.5 -> 7.5: still JSON, checksum broken
    path.write_bytes(bytes(raw))
    code, out, err = run_cli(capsys, "report", "0123456789abcdef", "--out", str(tmp_path / "out"), "--store",
                             str(tmp_path / "store"))
    line = one_line(err)
    assert code == 2 and out == "" and "corrupt (checksum mismatch)" in line and "deploy-check" in line
    assert not (tmp_path / "out" / "report.md").exists()


def _record(check_hash: str = "0123456789abcdef") -> dict:
    """A small synthetic deploy-check record for the store tests."""
    return {"kind": "deploy_check", "version": 1, "config": {"config_hash": check_hash, "model": "toy-clip"},
            "provenance": {"created_at": "2026-01-01T00:00:00+00:00"}, "metrics": [{"metric": "accuracy", "real": 0.5}]}


def test_store_keeps_deploy_checks_apart_and_checks_them(tmp_path):
    store = ResultStore(tmp_path / "store")
    assert store.deploy_checks() == [] and not store.deploy_checks_dir.exists()  # old stores keep working
    path = store.put_deploy_check(_record())
    assert path == store.deploy_check_path("0123456789abcdef") and store.get_deploy_check("0123456789abcdef") == _record()
    assert store.documents() == [] and store.get_deploy_check("fedcba9876543210") is None
    path.write_text(path.read_text().replace('"real":0.5', '"real":0.6'))  # tampered after writing
    with pytest.raises(CorruptDocument, match="checksum mismatch"):
        store.get_deploy_check("0123456789abcdef")
    seen = []
    assert store.deploy_checks(on_corrupt=seen.append) == [] and len(seen) == 1
    store.put_deploy_check(_record())
    misplaced = store.documents_dir / "01" / "0123456789abcdef.json"  # a record copied among the evaluations
    misplaced.parent.mkdir(parents=True)
    misplaced.write_text(path.read_text())
    with pytest.raises(CorruptDocument):
        store.get("0123456789abcdef")
    with pytest.raises(QbenchError, match="deploy-check hash"):
        store.deploy_check_path("../escape")


# -- one-line refusals -------------------------------------------------------------------------------
def test_unexportable_checkpoint_is_one_line_and_stores_nothing(world, capsys, tmp_path):
    apq = make_checkpoint(tmp_path / "apq", "apq-vit", 16)
    store = tmp_path / "store"
    code, out, err = run_cli(capsys, "deploy-check", "--checkpoint", str(apq), "--suite", "toy-id", "--store", str(store))
    line = one_line(err)
    assert code == 2 and out == ""
    assert line.startswith("qbench: not exportable: ") and "attention" in line
    assert ResultStore(store).deploy_checks() == []


def test_a_joint_scope_checkpoint_says_its_text_tower_stays_simulated(world, capsys, tmp_path):
    assert not any("text tower" in note for note in world.record["engine"]["notes"])  # visual scope: nothing to say
    checkpoint = make_checkpoint(tmp_path / "joint", "minmax", 32, scope="joint")
    code, out, err = run_cli(capsys, "deploy-check", "--checkpoint", str(checkpoint), "--suite", "toy-id", "--limit", "40",
                             "--no-compile", "--repeats", "1", "--json", "--no-store")
    assert code == 0, err
    notes = json.loads(out)["engine"]["notes"]
    assert any("text tower" in note and "stays simulated" in note for note in notes)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_one_line(world, capsys, tmp_path):
    code, out, err = run_cli(capsys, "deploy-check", "--checkpoint", str(world.checkpoint), "--suite", "toy-id",
                             "--device", "cuda", "--store", str(tmp_path / "store"))
    assert code == 2 and out == ""
    assert "no CUDA device" in one_line(err)
    assert ResultStore(tmp_path / "store").deploy_checks() == []


def test_missing_extra_names_the_install_command(world, capsys, monkeypatch, tmp_path):
    from qbench.engine.deploy import engines

    monkeypatch.setattr(engines, "missing_requirement", lambda engine: "torchao")
    code, out, err = run_cli(capsys, "deploy-check", "--checkpoint", str(world.checkpoint), "--suite", "toy-id",
                             "--store", str(tmp_path / "store"))
    assert code == 2 and out == ""
    line = one_line(err)
    assert line.startswith("qbench: ") and "pip install 'qbench[deploy]'" in line


def test_layer_check_fails_a_layer_that_differs():
    """The per-layer check is not a formality: an engine layer off by 1e-5 relative fails it."""
    from qbench.engine.deploy.check import layer_check
    from qbench.engine.deploy.engines import DeployedModel
    from qbench.engine.deploy.plan import plan_export
    from qbench.quant.spec import BitSpec, Scope
    from tiny_models import proxy_batch, tiny_vlm

    model = tiny_vlm()
    quantizer = registry().get("quantizers", "minmax").from_params({})
    data = proxy_batch(model, n=8)
    simulated = quantizer.quantize(model, BitSpec.parse("w8a8"), Scope.VISUAL, data, 0).model.eval()
    plan = plan_export(simulated)
    assert plan.exportable

    def off(name: str, x: torch.Tensor) -> torch.Tensor:
        """The simulated layer, 1e-5 too large on the first layer only."""
        module = simulated.model.get_submodule(name)
        return module.forward(x) * (1 + 1e-5) if name == plan.layers[0].name else module.forward(x)

    fake = DeployedModel(vlm=simulated, engine="fake", version="0", device="cpu", run_layer=off)
    result = layer_check(simulated, plan, fake, data.images[:2])
    assert not result["passed"] and result["n_failed"] == 1 and result["worst_layer"] == plan.layers[0].name
    assert result["layers"][0]["rel_l2"] == pytest.approx(1e-5, rel=1e-2)
    exact = layer_check(simulated, plan, DeployedModel(vlm=simulated, engine="fake", version="0", device="cpu",
                                                       run_layer=lambda name, x: simulated.model.get_submodule(name).forward(x)),
                        data.images[:2])
    assert exact["passed"] and exact["max_rel_l2"] == 0.0


def test_side_by_side_refuses_records_that_do_not_pair():
    from qbench.engine.deploy.check import side_by_side

    ours = [{"suite": "s", "dataset": "d", "metric": "accuracy", "fp32": 0.5, "quantized": 0.4, "delta": 0.2}]
    rows = side_by_side(ours, [{**ours[0], "quantized": 0.45, "delta": 0.1}])
    assert rows[0]["difference"] == pytest.approx(0.05) and (rows[0]["delta_simulated"], rows[0]["delta_real"]) == (0.2, 0.1)
    with pytest.raises(RuntimeError, match="disagree"):
        side_by_side(ours, [{**ours[0], "metric": "ece"}])
