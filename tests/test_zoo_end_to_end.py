"""The zoo end to end: every model family (as its tiny offline architecture) through joint-scope quantization,
text-embedding recomputation and a quantized-checkpoint round trip; and a full-size zoo model evaluated from
a local weights file on a miniature CIFAR-10 in the torchvision layout, through the CLI."""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle
import tarfile

import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import save_file

from cli_runner import run_cli
from qbench.engine.checkpoint import read_checkpoint, restore_quantized, save_checkpoint
from qbench.data import DatasetRequest
from qbench.errors import QbenchError
from qbench.model import LoadRequest
from qbench.quant.base import CalibrationData
from qbench.quant.spec import BitSpec, Scope
from qbench.quant.verify import verify_quantized
from qbench.registry import build_registry
from qbench_plugins.datasets.cifar import load_cifar10_test
from qbench_plugins.models.align import load_align, recalibrate_batchnorm
from qbench_plugins.models.open_clip_loader import load_open_clip, register_tiny_configs
from qbench_plugins.models.zoo import ENTRIES
from test_zoo import TINY_FOR, stub_tokenizer

pytestmark = pytest.mark.usefixtures("single_thread")
BY_NAME = {entry.name: entry for entry in ENTRIES}
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# -- one tiny model per family -----------------------------------------------------------------------------
def tiny_align_folder(folder, seed: int = 0):
    """A 0.03 M-parameter ALIGN with a generated BERT vocabulary and an EfficientNet processor, saved the way
    ``save_pretrained`` does (``models.md`` §5)."""
    from transformers import AlignConfig, AlignModel, AlignProcessor, BertTokenizer, EfficientNetImageProcessor

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "the", "cat", "dog", "red", "blue",
             "square", "circle", "small", "big", "star"]
    tokenizer = BertTokenizer(vocab={word: index for index, word in enumerate(words)})
    image_processor = EfficientNetImageProcessor(
        size={"height": 40, "width": 40}, crop_size={"height": 32, "width": 32}, do_center_crop=True,
        rescale_factor=1 / 127.5, rescale_offset=True, do_normalize=False, include_top=False)
    torch.manual_seed(seed)
    config = AlignConfig(
        text_config=dict(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=32),
        vision_config=dict(image_size=32, width_coefficient=0.25, depth_coefficient=0.34, hidden_dim=64,
                           in_channels=[32, 16, 24], out_channels=[16, 24, 32], kernel_sizes=[3, 3, 5],
                           strides=[1, 2, 2], num_block_repeats=[1, 1, 1], expand_ratios=[1, 6, 6]),
        projection_dim=8)
    model = AlignModel(config)
    recalibrate_batchnorm(model, 32)  # random init shrinks activations to nothing; trained BatchNorms do not
    model.eval().save_pretrained(folder)
    AlignProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def tiny_family_model(family: str, folder):
    """The zoo entry of ``family`` built on its tiny architecture, weights loaded from a file or folder."""
    if family == "align":
        entry = dataclasses.replace(BY_NAME["align-base"], context_length=16)
        return load_align(entry, LoadRequest(weights=str(tiny_align_folder(folder))), check=False), 32
    name = {"vit": "clip-vit-b16-laion400m", "quickgelu": "clip-vit-b32-openai", "sigmoid": "siglip-vit-b16",
            "convnext": "clip-convnext-base-laion400m", "coca": "coca-vit-b32-laion2b"}[family]
    arch = TINY_FOR[name]
    register_tiny_configs()
    torch.manual_seed(1)
    save_file(open_clip.create_model(arch, pretrained=None).state_dict(), str(folder / "weights.safetensors"))
    entry = BY_NAME[name]
    tokenizer = stub_tokenizer(49408, 16) if entry.tokenizer == "hf" else None
    vlm = load_open_clip(entry, LoadRequest(weights=str(folder / "weights.safetensors")), arch=arch, tokenizer=tokenizer)
    return vlm, open_clip.get_model_config(arch)["vision_cfg"]["image_size"]


FAMILIES = ["vit", "quickgelu", "sigmoid", "convnext", "coca", "align"]
CAPTIONS = ("a photo of the cat", "a red square", "a small blue circle", "the big star")


@pytest.mark.parametrize("family", FAMILIES)
def test_joint_scope_quantizes_the_text_tower_and_recomputes_text_embeddings(family, tmp_path):
    vlm, size = tiny_family_model(family, tmp_path)
    pixels = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    tokens = vlm.tokenize(CAPTIONS)
    data = CalibrationData(source="tiny", images=pixels, tokens=tokens, captions=CAPTIONS, fingerprint=f"tiny-{family}")
    quantizer = build_registry().get("quantizers", "minmax")()
    result = quantizer.quantize(copy.deepcopy(vlm), BitSpec.parse("w4a8"), Scope.JOINT, data, 0)
    report = verify_quantized(result.model, pixels, tokens, Scope.JOINT.towers, float_extras=result.float_extras)
    assert report.passed, report.problems
    assert any(module.tower == "text" for module in report.modules), "the text tower carries quantizers"
    classes, templates = ("cat", "square"), ("a photo of a {}.", "the {}")
    float_head = vlm.zero_shot_head(classes, templates)
    quantized_head = result.model.zero_shot_head(classes, templates)
    assert not torch.equal(float_head, quantized_head), "text embeddings come from the quantized text encoder"
    with torch.no_grad():
        expected = torch.nn.functional.normalize(result.model.encode_text(result.model.tokenize(["a photo of a cat.", "the cat"])).mean(0), dim=0)
    assert torch.allclose(quantized_head[0], expected, atol=1e-5)
    assert torch.equal(vlm.zero_shot_head(classes, templates), float_head), "the float model's cache is its own"

    save_checkpoint(tmp_path / "checkpoint", vlm, result, {"config_hash": f"tiny-{family}", "quantizer": "minmax"})
    restored = restore_quantized(read_checkpoint(tmp_path / "checkpoint"), vlm)
    with torch.no_grad():
        assert torch.equal(restored.model.encode_image(pixels), result.model.encode_image(pixels))
        assert torch.equal(restored.model.encode_text(tokens), result.model.encode_text(tokens))


def test_tiny_align_reloads_exactly_and_uses_its_temperature(tmp_path):
    from transformers import AlignModel, AlignProcessor

    vlm, _ = tiny_family_model("align", tmp_path)
    reference = AlignModel.from_pretrained(tmp_path, local_files_only=True).eval()
    processor = AlignProcessor.from_pretrained(tmp_path, local_files_only=True)
    texts = ["a photo of the cat", "a red square"]
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 60, 3), dtype=np.uint8))
    inputs = processor(images=image, text=texts, padding="max_length", max_length=16, return_tensors="pt")
    with torch.no_grad():
        expected = reference(**inputs).logits_per_image
        pixels = vlm.preprocess(image)[None]
        logits = vlm.logit_scale * vlm.encode_image(pixels) @ vlm.encode_text(vlm.tokenize(texts)).T
    assert torch.allclose(logits, expected, atol=1e-5)
    assert vlm.logit_scale == pytest.approx(1 / float(reference.temperature.detach()))
    assert vlm.logit_bias is None


def test_align_folder_of_another_architecture_is_refused(tmp_path):
    with pytest.raises(QbenchError, match="holds an ALIGN of another architecture"):
        load_align(BY_NAME["align-base"], LoadRequest(weights=str(tiny_align_folder(tmp_path))))


# -- CIFAR-10 in torchvision's layout, miniature ----------------------------------------------------------------
def write_cifar10(root, n: int = 12, seed: int = 0, archive: bool = False) -> np.ndarray:
    """``cifar-10-batches-py/{test_batch,batches.meta}`` with ``n`` images (pickled dicts, as the real files)."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = [int(i % 10) for i in range(n)]
    parts = {"test_batch": pickle.dumps({"batch_label": "testing batch 1 of 1", "labels": labels, "data": data,
                                         "filenames": [f"{i}.png" for i in range(n)]}),
             "batches.meta": pickle.dumps({"label_names": CIFAR10_NAMES, "num_cases_per_batch": n, "num_vis": 3072})}
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, content in parts.items():
        (folder / name).write_bytes(content)
    if archive:
        with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
            tar.add(folder, arcname="cifar-10-batches-py")
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()
    return data


@pytest.mark.parametrize("archive", [False, True], ids=["folder", "archive"])
def test_cifar10_miniature_in_torchvision_layout(tmp_path, archive):
    data = write_cifar10(tmp_path, archive=archive)
    dataset = load_cifar10_test(DatasetRequest(tmp_path))
    assert len(dataset) == 12 and dataset.classnames[1] == "automobile" and dataset.labels[3] == 3
    assert np.array_equal(np.asarray(dataset.image(5)), data[5].reshape(3, 32, 32).transpose(1, 2, 0))


def test_cifar10_corrupt_is_one_line(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(QbenchError) as raised:
        load_cifar10_test(DatasetRequest(tmp_path))
    assert "incomplete or corrupted" in str(raised.value) and "\n" not in str(raised.value)


# -- a full-size zoo model from a local file, through the CLI ------------------------------------------------------
def test_zoo_model_from_local_weights_evaluates_a_real_dataset_suite_end_to_end(tmp_path, capsys):
    """``qbench eval --model clip-vit-b32-openai --weights PATH --suite cifar10 --data-root ROOT``: the real
    ViT-B/32 architecture with random weights saved by the test, on a 12-image CIFAR-10."""
    torch.manual_seed(0)
    weights = tmp_path / "vit-b32.safetensors"
    save_file(open_clip.create_model("ViT-B-32-quickgelu", pretrained=None).state_dict(), str(weights))
    write_cifar10(tmp_path / "data")
    code, out, err = run_cli(capsys, "eval", "--model", "clip-vit-b32-openai", "--weights", str(weights),
                             "--suite", "cifar10", "--data-root", str(tmp_path / "data"), "--proxy-n", "8",
                             "--no-feature-cache", "--json")
    assert code == 0, err
    document = json.loads(out)
    assert document["config"]["model"] == "clip-vit-b32-openai"
    assert document["config"]["weights_tag"] == f"file:{weights}" and document["config"]["random_init"] is False
    assert document["model"]["weights_source"] == "file" and document["model"]["quick_gelu"] is True
    assert document["datasets"]["cifar10-test"]["num_scored"] == 12
    assert document["verification"]["passed"] and document["verification"]["n_modules"] == 73
    accuracy = [r for r in document["results"] if r["metric"] == "accuracy" and r["dataset"] == "cifar10-test"]
    assert accuracy and all(0.0 <= r["fp32"] <= 1.0 for r in accuracy)
