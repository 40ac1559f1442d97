"""Quantized checkpoints: ``qbench quantize --out`` then ``qbench eval --checkpoint`` reproduces the metrics of a
direct run without calibrating or training again; the files are safetensors + JSON and loading never unpickles;
broken, tampered or mismatched checkpoints and conflicting flags are one-line errors.

(Every registered quantizer's round trip on a tiny model is in ``test_quantizer_conformance.py``.)
"""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
from safetensors.torch import load_file

from checkpoint_tools import reseal
from cli_runner import run_cli
from qbench.engine.checkpoint import CONFIG_FILE, STATE_FILE, read_checkpoint, restore_quantized, save_checkpoint
from qbench.engine.confighash import config_hash
from qbench.errors import QbenchError
from qbench.quant.modules import quant_modules
from qbench.quant.spec import BitSpec, Scope
from qbench.registry import build_registry
from tiny_models import embeddings, proxy_batch, tiny_vlm

QUANTIZE = ("--quantizer", "lsq", "--bits", "w4a8", "--qparam", "steps=2", "--qparam", "batch_size=50", "--proxy-n", "100")
EVALUATE = ("--suite", "toy-id", "--limit", "200", "--logit-tuning", "--json")


@pytest.fixture(scope="module")
def cli_checkpoint(tmp_path_factory):
    """A toy-world lsq checkpoint written by the CLI (2 training steps on 100 proxy pairs)."""
    folder = tmp_path_factory.mktemp("ckpt") / "lsq-w4a8"
    from qbench.cli import main  # run_cli needs the function-scoped capsys; a module fixture calls main itself

    try:
        main(["quantize", *QUANTIZE, "--out", str(folder)])
    except SystemExit as exit_:
        assert not exit_.code
    return folder


def test_quantize_writes_safetensors_and_a_hashed_json_config(cli_checkpoint):
    document = json.loads((cli_checkpoint / CONFIG_FILE).read_text())
    config = document["config"]
    assert config["quantizer"] == "lsq" and config["bits"] == "w4a8" and config["quantizer_params"]["steps"] == 2
    assert config["config_hash"] == config_hash(config)
    assert document["verification"]["passed"]
    assert document["quantizer_provenance"]["training"]["steps"] == 2
    tensors = load_file(str(cli_checkpoint / STATE_FILE))
    steps = [key for key in tensors if key.endswith("weight_quantizer.step")]
    assert len(steps) == document["verification"]["n_modules"]  # one learned LSQ step per quantized weight


def test_checkpoint_evaluation_reproduces_the_direct_run(cli_checkpoint, capsys):
    code, out, err = run_cli(capsys, "eval", *QUANTIZE, *EVALUATE)
    assert code == 0, err
    direct = json.loads(out)
    code, out, err = run_cli(capsys, "eval", "--checkpoint", str(cli_checkpoint), *EVALUATE)
    assert code == 0, err
    restored = json.loads(out)
    flat = " ".join(err.split())  # rich wraps long lines
    assert "no calibration or training" in flat and "trained" not in flat and "quantizing with" not in flat
    assert restored["config"]["checkpoint"]["config_hash"] == read_checkpoint(cli_checkpoint).config_hash
    assert restored["config"]["config_hash"] != direct["config"]["config_hash"]
    assert [r["metric"] for r in restored["results"]] == [r["metric"] for r in direct["results"]]
    assert any(r["logit_tuned"] for r in restored["results"])
    for ours, theirs in zip(restored["results"], direct["results"]):
        assert ours["fp32"] == theirs["fp32"] and ours["quantized"] == theirs["quantized"], ours
    assert restored["logit_tuning"]["s_after"] == direct["logit_tuning"]["s_after"]
    assert restored["verification"]["passed"]


def test_checkpoint_fixes_the_quantization_settings(cli_checkpoint, capsys):
    code, out, err = run_cli(capsys, "eval", "--checkpoint", str(cli_checkpoint), "--quantizer", "minmax")
    assert code == 2 and out == "" and err.startswith("qbench: ") and "drop --quantizer" in err
    assert len(err.strip().splitlines()) == 1


def test_an_occupied_out_folder_needs_force(cli_checkpoint, capsys, tmp_path):
    code, _, err = run_cli(capsys, "quantize", "--quantizer", "fp32", "--out", str(cli_checkpoint))
    assert code == 2 and "pass --force" in err and len(err.strip().splitlines()) == 1
    other = tmp_path / "notes"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, "quantize", "--quantizer", "fp32", "--out", str(other), "--force")
    assert code == 2 and "not a qbench checkpoint" in err and (other / "notes.txt").exists()


def test_schedule_sets_steps_of_qat_quantizers_only(capsys, tmp_path):
    code, _, err = run_cli(capsys, "quantize", "--quantizer", "minmax", "--schedule", "light", "--out", str(tmp_path / "x"))
    assert code == 2 and "--schedule sets the training length of QAT quantizers" in err
    code, _, err = run_cli(capsys, "quantize", "--quantizer", "lsq", "--schedule", "forever", "--out", str(tmp_path / "x"))
    assert code == 2 and "bad schedule 'forever'" in err and "light (100 steps)" in err
    code, _, err = run_cli(capsys, "eval", "--quantizer", "lsq", "--schedule", "light", "--qparam", "steps=3")
    assert code == 2 and "give one of them" in err


# -- the library API on a tiny model ----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    float_model = tiny_vlm()
    data = proxy_batch(float_model, n=16)
    quantizer = build_registry().get("quantizers", "lsq-pc").from_params({"steps": 2, "batch_size": 8})
    result = quantizer.quantize(copy.deepcopy(float_model), BitSpec.parse("w4a8"), Scope.VISUAL, data, 0)
    return float_model, data, result


@pytest.fixture
def saved(tiny, tmp_path):
    float_model, _, result = tiny
    save_checkpoint(tmp_path / "ck", float_model, result, {"config_hash": "cafe", "model": "tiny"})
    return tmp_path / "ck"


def test_restoring_never_unpickles(tiny, saved, monkeypatch):
    float_model, data, result = tiny

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint load must not unpickle")

    for target, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(target, name, refuse)
    restored = restore_quantized(read_checkpoint(saved), float_model)
    assert torch.equal(embeddings(restored.model, data)[0], embeddings(result.model, data)[0])


def test_a_tampered_tensor_file_is_refused(tiny, saved):
    state = saved / STATE_FILE
    raw = bytearray(state.read_bytes())
    raw[-1] ^= 0xFF
    state.write_bytes(bytes(raw))
    with pytest.raises(QbenchError, match="does not match its recorded SHA-256"):
        restore_quantized(read_checkpoint(saved), tiny[0])


def test_other_float_weights_are_refused(saved):
    with pytest.raises(QbenchError, match="made from other weights"):
        restore_quantized(read_checkpoint(saved), tiny_vlm(seed=1))


@pytest.mark.parametrize("name", ["builtins:eval", "os:system", "subprocess:Popen", "torch.hub:load"])
def test_names_outside_the_allow_list_are_refused(tiny, saved, name):
    document = json.loads((saved / CONFIG_FILE).read_text())
    document["structure"][0]["class"] = name
    reseal(saved, document)  # hashes re-sealed consistently: the allow-list must still refuse the name
    with pytest.raises(QbenchError, match="not allowed|not one"):
        restore_quantized(read_checkpoint(saved), tiny[0])


@pytest.mark.parametrize("damage, message", [
    (lambda folder: (folder / CONFIG_FILE).unlink(), "has no qbench-checkpoint.json"),
    (lambda folder: (folder / STATE_FILE).unlink(), "has no model.safetensors"),
    (lambda folder: (folder / CONFIG_FILE).write_text("{not json"), "is not valid JSON"),
    (lambda folder: (folder / CONFIG_FILE).write_text('{"format": "other"}'), "is not a qbench quantized checkpoint"),
])
def test_broken_folders_are_one_line_errors(saved, damage, message):
    damage(saved)
    with pytest.raises(QbenchError, match=message) as error:
        read_checkpoint(saved)
    assert "\n" not in str(error.value)


def test_a_module_holding_a_lambda_cannot_be_saved(tiny, tmp_path):
    float_model, _, result = tiny
    model = copy.deepcopy(result)
    name, module = next(iter(quant_modules(model.model.model)))
    module.weight_quantizer.transform = lambda x: x
    with pytest.raises(QbenchError, match=rf"{name}.weight_quantizer.transform.*lambda"):
        save_checkpoint(tmp_path / "bad", float_model, model, {"config_hash": "x"})
    assert not (tmp_path / "bad").exists()


def test_qat_lora_checkpoints_keep_the_trained_adapters_beside_the_merged_model(tmp_path):
    float_model = tiny_vlm()
    data = proxy_batch(float_model, n=16)
    quantizer = build_registry().get("quantizers", "qat-lora").from_params({"steps": 2, "batch_size": 8, "lr_quant": 1e-2})
    result = quantizer.quantize(copy.deepcopy(float_model), BitSpec.parse("w4a8"), Scope.VISUAL, data, 0)
    adapters = result.provenance["weight_layout"]["group_asym_with_adapter"]
    assert adapters and len(result.artifacts) == 2 * adapters
    assert any(name.endswith("lora_B") and tensor.abs().sum() > 0 for name, tensor in result.artifacts.items())
    assert not any("lora" in name for name, _ in result.model.model.named_parameters())  # merged away
    save_checkpoint(tmp_path / "ck", float_model, result, {"config_hash": "x"})
    restored = restore_quantized(read_checkpoint(tmp_path / "ck"), float_model)
    assert restored.artifacts.keys() == result.artifacts.keys()
    assert all(torch.equal(restored.artifacts[name].cpu(), result.artifacts[name]) for name in result.artifacts)
