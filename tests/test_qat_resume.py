"""Resumable Light QAT (``qbench.quant.training_state``): every registered QAT method, interrupted after a step
checkpoint and run again, ends bit-identical to an uninterrupted run (model tensors, artifacts, provenance with
the training record); unusable step files (corrupt, truncated, another run's) are discarded with a reason and
training restarts from step 0; the step file is a safetensors file read without pickle; staging leaves nothing."""

from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path

import pytest
import torch

from qbench.atomic import PARTIAL_DIR
from qbench.errors import QbenchError
from qbench.quant.base import QuantizedModel
from qbench.quant.spec import BitSpec, Scope
from qbench.quant.training_state import STATE_FILE, STATE_KEY, TrainingCheckpoints, read_step_file
from qbench.registry import build_registry

pytestmark = pytest.mark.usefixtures("single_thread")
QAT = sorted(entry.name for entry in build_registry().entries("quantizers") if entry.value.family == "qat")
PARAMS = {"steps": 6, "batch_size": 4, "lr_weights": 1e-3, "lr_quant": 1e-2}
SEED = 3


class Interrupted(Exception):
    """Stands for a crash or preemption in the middle of training."""


def interrupt_after(step: int):
    def progress(current: int, total: int, loss: float) -> None:
        if current == step:
            raise Interrupted(f"stopped after step {current} of {total}")

    return progress


def quantize(name: str, float_model, calibration, scope: Scope = Scope.VISUAL, *, checkpoints=None, progress=None,
             **overrides) -> QuantizedModel:
    quantizer = build_registry().get("quantizers", name).from_params({**PARAMS, **overrides})
    quantizer.training_checkpoints = checkpoints
    quantizer.progress = progress
    return quantizer.quantize(copy.deepcopy(float_model), BitSpec.parse("w4a8"), scope, calibration, SEED)


_REFERENCE: dict[tuple[str, Scope], QuantizedModel] = {}


def uninterrupted(name: str, float_model, calibration, scope: Scope = Scope.VISUAL) -> QuantizedModel:
    """The run without step checkpoints, once per (method, scope)."""
    if (name, scope) not in _REFERENCE:
        _REFERENCE[name, scope] = quantize(name, float_model, calibration, scope)
    return _REFERENCE[name, scope]


def assert_identical(result: QuantizedModel, reference: QuantizedModel) -> None:
    state, expected = result.model.state_dict(), reference.model.state_dict()
    assert state.keys() == expected.keys()
    different = [key for key in expected if not torch.equal(state[key], expected[key])]
    assert not different, different[:5]
    assert result.artifacts.keys() == reference.artifacts.keys()
    assert all(torch.equal(result.artifacts[key], reference.artifacts[key]) for key in reference.artifacts)
    assert result.provenance == reference.provenance  # training record (losses, loss before/after) included


class Events:
    """What the checkpoints reported."""

    def __init__(self) -> None:
        self.resumed: list[tuple[int, int]] = []
        self.discarded: list[str] = []

    def checkpoints(self, folder: Path, root: Path | None = None) -> TrainingCheckpoints:
        return TrainingCheckpoints(folder, every_steps=2, root=root,
                                   on_resume=lambda step, total: self.resumed.append((step, total)),
                                   on_discard=self.discarded.append)


def interrupted_run(name: str, float_model, calibration, folder: Path, scope: Scope = Scope.VISUAL, **overrides) -> Path:
    """A run stopped right after step 5: the stored state is step 4's."""
    events = Events()
    with pytest.raises(Interrupted):
        quantize(name, float_model, calibration, scope, checkpoints=events.checkpoints(folder),
                 progress=interrupt_after(5), **overrides)
    assert events.resumed == [] and events.discarded == []
    path = folder / STATE_FILE
    assert path.is_file()
    return path


# -- every QAT method resumes exactly --------------------------------------------------------------
@pytest.mark.parametrize("scope", [Scope.VISUAL, Scope.JOINT], ids=["visual", "joint"])
@pytest.mark.parametrize("name", QAT)
def test_interrupted_run_resumes_bit_identical(name, scope, float_model, calibration, tmp_path):
    reference = uninterrupted(name, float_model, calibration, scope)
    interrupted_run(name, float_model, calibration, tmp_path / "steps", scope)
    events, seen = Events(), []
    checkpoints = events.checkpoints(tmp_path / "steps")
    result = quantize(name, float_model, calibration, scope, checkpoints=checkpoints,
                      progress=lambda step, total, loss: seen.append(step))
    assert events.resumed == [(4, 6)] and events.discarded == []
    assert seen == [5, 6]  # absolute step numbers, only the remaining steps
    assert_identical(result, reference)
    checkpoints.clear()
    assert not checkpoints.path.exists()


def test_every_study_qat_method_is_covered():
    assert {"qat-ste", "qat-ste-hybrid", "lsq", "lsq-hybrid", "lsq-pc", "qat-lora", "q-vit", "rot-lsq"} <= set(QAT)


@pytest.mark.parametrize("name, module_type", [("qat-ste", "EMAActivationQuantizer"), ("qat-lora", "QALoRALinear")])
def test_training_time_attributes_outside_the_state_dict_are_stored(name, module_type, float_model, calibration, tmp_path):
    """qat-ste's EMA observer ranges and qat-lora's dropout call counters change every step but are plain
    attributes; the step file carries them (without them the resumed run diverges)."""
    path = interrupted_run(name, float_model, calibration, tmp_path / "steps")
    tensors, metadata = read_step_file(path)
    extra = json.loads(metadata[STATE_KEY])["extra"]
    assert extra
    if name == "qat-ste":
        assert all(set(entry["tensors"]) == {"lo", "hi"} and entry["values"]["n_batches"] > 1 for entry in extra.values())
        assert all(f"extra/{module}/lo" in tensors for module in extra)
    else:
        assert all(entry["values"]["dropout_calls"] == 4 for entry in extra.values())  # one call per step, 4 steps


# -- unusable step files ---------------------------------------------------------------------------
def flip_tensor_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")
    raw[start + (len(raw) - start) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 100])


def edit_record(path: Path) -> None:
    """Change a recorded loss in the JSON body, leaving its checksum as it was (an edit of the JSON alone)."""
    from safetensors.torch import save_file

    tensors, metadata = read_step_file(path)
    body = json.loads(metadata[STATE_KEY])
    body["record"]["losses"][0] += 1.0
    save_file(tensors, str(path), metadata={**metadata, STATE_KEY: json.dumps(body, sort_keys=True)})


@pytest.mark.parametrize("damage, reason", [(flip_tensor_byte, "tensor checksum mismatch"), (truncate, "unreadable"),
                                            (edit_record, "metadata checksum mismatch")],
                         ids=["flipped-byte", "truncated", "edited-json"])
def test_damaged_step_file_is_discarded_and_training_restarts(damage, reason, float_model, calibration, tmp_path):
    damage(interrupted_run("qat-ste", float_model, calibration, tmp_path / "steps"))
    events = Events()
    result = quantize("qat-ste", float_model, calibration, checkpoints=events.checkpoints(tmp_path / "steps"))
    assert events.resumed == [] and len(events.discarded) == 1 and reason in events.discarded[0]
    assert "\n" not in events.discarded[0]
    assert_identical(result, uninterrupted("qat-ste", float_model, calibration))


def test_step_file_of_another_run_is_discarded(float_model, calibration, tmp_path):
    interrupted_run("lsq", float_model, calibration, tmp_path / "steps", steps=8)
    events = Events()
    result = quantize("lsq", float_model, calibration, checkpoints=events.checkpoints(tmp_path / "steps"))
    assert events.resumed == [] and len(events.discarded) == 1
    assert "another run" in events.discarded[0] and "steps" in events.discarded[0]
    assert_identical(result, uninterrupted("lsq", float_model, calibration))


def test_every_steps_must_be_positive(tmp_path):
    with pytest.raises(QbenchError, match="every_steps >= 1"):
        TrainingCheckpoints(tmp_path, every_steps=0)


# -- file format and staging -----------------------------------------------------------------------
def test_step_file_is_safetensors_and_loads_without_pickle(float_model, calibration, tmp_path, monkeypatch):
    path = interrupted_run("q-vit", float_model, calibration, tmp_path / "steps")
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    assert raw[8:9] == b"{" and STATE_KEY in json.loads(raw[8 : 8 + size])["__metadata__"]
    assert not raw.startswith((b"\x80", b"PK"))  # neither a pickle nor a torch.save zip

    def forbidden(*args, **kwargs):
        raise AssertionError("a step state must load without pickle")

    for target, attribute in ((pickle, "loads"), (pickle, "load"), (torch, "load")):
        monkeypatch.setattr(target, attribute, forbidden)
    events = Events()
    result = quantize("q-vit", float_model, calibration, checkpoints=events.checkpoints(tmp_path / "steps"))
    assert events.resumed == [(4, 6)]
    assert_identical(result, uninterrupted("q-vit", float_model, calibration))


def test_a_normal_run_leaves_no_staged_files(float_model, calibration, tmp_path):
    root = tmp_path / "cache"
    events = Events()
    checkpoints = events.checkpoints(root / "qat" / "run", root=root)
    result = quantize("lsq", float_model, calibration, checkpoints=checkpoints)
    assert events.resumed == [] and events.discarded == []
    assert checkpoints.path.is_file()  # step 4's state, until the caller has saved the model
    assert list((root / PARTIAL_DIR).iterdir()) == []
    assert not (root / "qat" / "run" / PARTIAL_DIR).exists()
    assert_identical(result, uninterrupted("lsq", float_model, calibration))
    checkpoints.clear()
    assert list((root / "qat" / "run").iterdir()) == []
