"""Quantized checkpoints are sealed by one manifest hash over the canonical JSON (config, bits, per-module records,
verification) and the tensors: editing either file, swapping one in from another checkpoint or storing a tensor
of the wrong shape is refused with one line naming the file and the fix, from the library and from the CLI
(exit status 2); a kept quantized model that fails is discarded and quantized again."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoint_tools import reseal
from cli_runner import run_cli
from qbench.engine.checkpoint import CONFIG_FILE, STATE_FILE, read_checkpoint, restore_quantized, save_checkpoint
from qbench.engine.confighash import config_hash
from qbench.errors import QbenchError
from qbench.quant.spec import BitSpec, Scope
from qbench.engine.quantized_cache import QuantizedCache
from qbench.registry import build_registry
from tiny_models import embeddings, proxy_batch, tiny_vlm

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tiny():
    float_model = tiny_vlm()
    data = proxy_batch(float_model, n=16)
    quantizer = build_registry().get("quantizers", "minmax")()
    results = {bits: quantizer.quantize(copy.deepcopy(float_model), BitSpec.parse(bits), Scope.VISUAL, data, 0)
               for bits in ("w4a8", "w8a8")}
    return float_model, data, results


def save(tiny, folder: Path, bits: str = "w4a8") -> Path:
    float_model, _, results = tiny
    config = {"model": "tiny", "quantizer": "minmax", "bits": bits}
    save_checkpoint(folder, float_model, results[bits], {**config, "config_hash": config_hash(config)},
                    verification={"passed": True, "n_modules": 12})
    return folder


@pytest.fixture
def saved(tiny, tmp_path) -> Path:
    return save(tiny, tmp_path / "ck")


def edit_json(folder: Path, change) -> None:
    document = json.loads((folder / CONFIG_FILE).read_text())
    change(document)
    (folder / CONFIG_FILE).write_text(json.dumps(document, indent=1))


def one_line_refusal(call, *patterns: str) -> str:
    with pytest.raises(QbenchError) as raised:
        call()
    message = str(raised.value)
    assert "\n" not in message and "Traceback" not in message
    assert all(pattern in message for pattern in patterns), message
    return message


def relabel_bits_and_rehash(document):
    document["config"]["bits"] = "w2a2"
    config = {key: value for key, value in document["config"].items() if key != "config_hash"}
    document["config"]["config_hash"] = config_hash(config)


def edit_module_record(document):
    record = next(record for record in document["structure"] if record.get("attributes"))
    name = sorted(record["attributes"])[0]
    record["attributes"][name] = {"__tuple__": []} if record["attributes"][name] != {"__tuple__": []} else None


JSON_EDITS = {
    "bits-relabelled": lambda document: document["config"].update(bits="w2a2"),
    "bits-relabelled-config-hash-recomputed": relabel_bits_and_rehash,
    "per-module-record": edit_module_record,
    "verification": lambda document: document["verification"].update(n_modules=99),
    "extra-field": lambda document: document.update(note="looks fine"),
    "manifest-copy": lambda document: document["manifest"].update(sha256="0" * 64),
}


@pytest.mark.parametrize("edit", sorted(JSON_EDITS))
def test_any_json_edit_is_refused_on_read(edit, saved):
    edit_json(saved, JSON_EDITS[edit])
    one_line_refusal(lambda: read_checkpoint(saved), str(saved), CONFIG_FILE, "manifest hash", "qbench quantize")


def test_reformatting_the_json_is_not_an_edit(tiny, saved):
    document = json.loads((saved / CONFIG_FILE).read_text())
    (saved / CONFIG_FILE).write_text(json.dumps(dict(reversed(list(document.items())))))  # other key order, no indent
    restored = restore_quantized(read_checkpoint(saved), tiny[0])
    assert torch.equal(embeddings(restored.model, tiny[1])[0], embeddings(tiny[2]["w4a8"].model, tiny[1])[0])


def flip_tensor_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")
    raw[start + (len(raw) - start) // 3] ^= 0x01
    path.write_bytes(bytes(raw))


def test_a_tensor_edit_is_refused_on_restore(tiny, saved):
    flip_tensor_byte(saved / STATE_FILE)
    checkpoint = read_checkpoint(saved)  # the header and the JSON are intact
    one_line_refusal(lambda: restore_quantized(checkpoint, tiny[0]), str(saved), STATE_FILE, "SHA-256", "qbench quantize")


def test_tensors_edited_with_their_json_hash_updated_are_refused(saved):
    tensors = load_file(str(saved / STATE_FILE))
    name = next(key for key, value in sorted(tensors.items()) if value.is_floating_point() and bool(torch.isfinite(value).all()) and bool(value.abs().sum() > 0))
    tensors[name] = tensors[name] * 2
    save_file(tensors, str(saved / STATE_FILE), metadata=dict(_metadata(saved)))  # the old manifest kept
    from qbench.engine.integrity import tensors_digest

    assert tensors_digest(tensors) != read_checkpoint(saved).state_sha256
    edit_json(saved, lambda document: document["state"].update(sha256=tensors_digest(tensors)))
    one_line_refusal(lambda: read_checkpoint(saved), CONFIG_FILE, "manifest hash")


def _metadata(folder: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(folder / STATE_FILE), framework="pt") as handle:
        return dict(handle.metadata())


def test_files_swapped_between_checkpoints_are_refused(tiny, tmp_path):
    ours, theirs = save(tiny, tmp_path / "w4a8"), save(tiny, tmp_path / "w8a8", bits="w8a8")
    (ours / STATE_FILE).write_bytes((theirs / STATE_FILE).read_bytes())
    one_line_refusal(lambda: read_checkpoint(ours), CONFIG_FILE, "manifest hash", "another checkpoint")
    (theirs / CONFIG_FILE).write_text((tmp_path / "w4a8" / CONFIG_FILE).read_text())
    one_line_refusal(lambda: read_checkpoint(theirs), "manifest hash")


def test_a_tensor_file_without_a_manifest_is_refused(saved):
    save_file(load_file(str(saved / STATE_FILE)), str(saved / STATE_FILE))
    one_line_refusal(lambda: read_checkpoint(saved), STATE_FILE, "no manifest hash", "qbench quantize")


def test_version_1_checkpoints_are_refused(saved):
    edit_json(saved, lambda document: document.update(format_version=1))
    one_line_refusal(lambda: read_checkpoint(saved), "format version 1", "qbench quantize")


def test_a_tensor_of_the_wrong_shape_is_refused_at_restore_even_when_resealed(tiny, saved):
    float_model = tiny[0]
    expected = dict(float_model.model.named_parameters())
    tensors = load_file(str(saved / STATE_FILE))
    name = next(key for key in sorted(tensors) if key in expected and tensors[key].dim() == 2 and ".mlp." in key)
    tensors[name] = tensors[name][:-1].clone()
    reseal(saved, json.loads((saved / CONFIG_FILE).read_text()), tensors)
    checkpoint = read_checkpoint(saved)  # every hash is consistent: only the shape check stands
    found, wanted = tuple(tensors[name].shape), tuple(expected[name].shape)
    one_line_refusal(lambda: restore_quantized(checkpoint, float_model), name, str(found), str(wanted), "qbench quantize")


def test_a_kept_quantized_model_that_fails_its_manifest_is_quantized_again(tiny, tmp_path):
    float_model, _, results = tiny
    cache = QuantizedCache(tmp_path / "quantized")
    key = "k" * 16
    save_checkpoint(cache.folder(key), float_model, results["w4a8"], {"config_hash": key, "bits": "w4a8"})
    edit_json(cache.folder(key), lambda document: document["config"].update(bits="w2a2"))
    lines: list[str] = []

    class Log:
        def log(self, message: str) -> None:
            lines.append(message)

    assert cache.restore(key, float_model, Log()) is None
    assert len(lines) == 1 and "manifest hash" in lines[0] and "quantizing again" in lines[0]
    assert not cache.folder(key).exists()


# -- the CLI -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_checkpoint(tmp_path_factory):
    """A toy-world minmax w4a8 checkpoint written by 'qbench quantize'."""
    from qbench.cli import main

    folder = tmp_path_factory.mktemp("cli") / "minmax-w4a8"
    try:
        main(["quantize", "--quantizer", "minmax", "--bits", "w4a8", "--proxy-n", "100", "--out", str(folder)])
    except SystemExit as exit_:
        assert not exit_.code
    return folder


@pytest.fixture
def cli_copy(cli_checkpoint, tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(cli_checkpoint, tmp_path / "copy"))


EVAL = ("--suite", "toy-id", "--limit", "20", "--json")


def test_cli_refuses_a_relabelled_checkpoint_with_exit_2(cli_copy, capsys):
    edit_json(cli_copy, lambda document: document["config"].update(bits="w2a2"))
    code, out, err = run_cli(capsys, "eval", "--checkpoint", str(cli_copy), *EVAL)
    assert code == 2 and out == ""
    assert err.startswith("qbench: ") and len(err.strip().splitlines()) == 1
    assert str(cli_copy) in err and "manifest hash" in err and "qbench quantize" in err


def test_cli_refuses_a_wrong_shape_with_exit_2(cli_copy, capsys):
    tensors = load_file(str(cli_copy / STATE_FILE))
    name = next(key for key in sorted(tensors) if key.endswith("mlp.c_fc.weight"))
    tensors[name] = torch.cat([tensors[name], tensors[name][:1]])
    reseal(cli_copy, json.loads((cli_copy / CONFIG_FILE).read_text()), tensors)
    code, out, err = run_cli(capsys, "eval", "--checkpoint", str(cli_copy), *EVAL)
    assert code == 2 and out == ""
    lines = [line for line in err.strip().splitlines() if line.startswith("qbench: ")]
    assert len(lines) == 1 and "Traceback" not in err
    assert name in lines[0] and str(tuple(tensors[name].shape)) in lines[0]
