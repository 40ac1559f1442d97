"""The model zoo (``models.md``): registry identity, weights resolution, loading failures, every architecture
built offline with a forward pass and quantization wrapping, and the tiny per-family models end to end.

Nothing here downloads: weights are random, written by the tests themselves, and found through ``--weights``
or a Hugging Face cache folder the tests lay out on disk (``models--ORG--NAME/snapshots/REV/FILE``).
"""

from __future__ import annotations

import copy
import dataclasses
import time

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from qbench.errors import QbenchError
from qbench.model import LoadRequest
from qbench.quant.base import CalibrationData
from qbench.quant.modules import in_scope_modules, rewrite_tower_attention
from qbench.quant.spec import BitSpec, Scope
from qbench.quant.verify import verify_quantized
from qbench.registry import build_registry
from qbench_plugins.models.align import load_align
from qbench_plugins.models.open_clip_loader import check_quick_gelu, load_open_clip, register_tiny_configs
from qbench_plugins.models.plugin import load_entry
from qbench_plugins.models.weights import available_locally
from qbench_plugins.models.zoo import CORE, ENTRIES, EXTENDED

pytestmark = pytest.mark.usefixtures("single_thread")
BY_NAME = {entry.name: entry for entry in ENTRIES}
OPEN_CLIP_ENTRIES = [entry for entry in ENTRIES if entry.loader == "open_clip"]
STUDY_CORE = {
    "clip-vit-b32-openai", "clip-vit-b32-laion400m", "clip-vit-b16-openai", "clip-vit-b16-laion400m",
    "clip-vit-l14-openai", "clip-vit-l14-laion400m", "clip-convnext-base-laion400m", "siglip-vit-b16",
    "coca-vit-b32-laion2b", "align-base",
}
STUDY_EXTENDED = {"eva02-vit-b16", "dfn-vit-b16", "clip-vit-b32-laion2b", "clip-vit-b16-laion2b", "clip-vit-l14-laion2b"}


# -- registry identity -------------------------------------------------------------------------------
def test_the_ten_core_and_five_extended_models_are_registered_with_the_toy():
    assert {entry.name for entry in CORE} == STUDY_CORE and {entry.name for entry in EXTENDED} == STUDY_EXTENDED
    models = {entry.name: entry.value for entry in build_registry().entries("models")}
    assert STUDY_CORE | STUDY_EXTENDED | {"toy-clip"} <= set(models)
    assert {name for name, spec in models.items() if spec.tier == "core"} == STUDY_CORE
    assert {name for name, spec in models.items() if spec.tier == "extended"} == STUDY_EXTENDED


@pytest.mark.parametrize("entry", OPEN_CLIP_ENTRIES, ids=lambda entry: entry.name)
def test_entry_matches_open_clips_pretrained_registry(entry):
    """Tag known, Hub repo as open_clip resolves it, and QuickGELU equal in the entry, the architecture
    config and the tag (a mismatch would compute with the wrong activation)."""
    cfg = open_clip.get_pretrained_cfg(entry.arch, entry.pretrained)
    assert cfg, f"{entry.arch}:{entry.pretrained} unknown to open_clip"
    assert cfg["hf_hub"].rstrip("/") == entry.hf_repo
    assert bool(cfg.get("quick_gelu", False)) == entry.quick_gelu
    assert bool(open_clip.get_model_config(entry.arch).get("quick_gelu", False)) == entry.quick_gelu
    check_quick_gelu(entry)
    text_cfg = open_clip.get_model_config(entry.arch)["text_cfg"]
    assert text_cfg["context_length"] == entry.context_length
    assert open_clip.get_model_config(entry.arch)["embed_dim"] == entry.embed_dim


def test_quickgelu_mismatch_is_an_error_naming_the_fix():
    wrong = dataclasses.replace(BY_NAME["clip-vit-b16-openai"], arch="ViT-B-16")  # OpenAI weights need QuickGELU
    with pytest.raises(QbenchError, match="QuickGELU mismatch for 'clip-vit-b16-openai'.*-quickgelu"):
        check_quick_gelu(wrong)
    with pytest.raises(QbenchError, match="QuickGELU mismatch"):
        load_open_clip(wrong, LoadRequest(random_init=True))


def test_list_models_shows_tier_architecture_source_tag_and_local_flag(capsys, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from cli_runner import run_cli

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache, whatever this machine holds

    code, out, _ = run_cli(capsys, "list", "models")
    assert code == 0
    for name in STUDY_CORE | STUDY_EXTENDED:
        assert name in out
    row = next(line for line in out.splitlines() if "clip-vit-l14-laion400m" in line)
    cells = [cell.strip() for cell in row.split("│")]
    assert cells[2] == "core" and "ViT-L-14" in cells[3] and cells[4] == "LAION-400M" and cells[6] == "no"
    toy = [cell.strip() for cell in next(line for line in out.splitlines() if "│ toy-clip " in line).split("│")]
    assert toy[2] == "toy" and toy[6] == "yes"
    assert "extended" in out


# -- weights resolution --------------------------------------------------------------------------------
def hub_cache_file(cache, repo: str, filename: str, content: bytes | None = None):
    """Lay out ``filename`` of ``repo`` the way huggingface_hub's cache does (refs/main -> snapshot)."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / "0123456789abcdef"
    snapshot.mkdir(parents=True, exist_ok=True)
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text("0123456789abcdef")
    path = snapshot / filename
    path.write_bytes(content if content is not None else b"")
    return path


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda entry: entry.name)
def test_missing_weights_fail_fast_with_one_line_naming_model_repo_cache_and_fixes(entry, tmp_path):
    started = time.perf_counter()
    with pytest.raises(QbenchError) as raised:
        load_entry(entry, LoadRequest(cache_dir=str(tmp_path)))
    elapsed = time.perf_counter() - started
    message = str(raised.value)
    assert "\n" not in message
    for part in (entry.name, entry.hf_repo, str(tmp_path), "--weights", "hf download"):
        assert part in message
    assert elapsed < 10, "a missing file must be found missing by a cache probe, never by a network timeout"
    assert not available_locally(entry, str(tmp_path))


def test_availability_follows_the_cache_including_tokenizer_files(tmp_path):
    clip, siglip, align = BY_NAME["clip-vit-b32-openai"], BY_NAME["siglip-vit-b16"], BY_NAME["align-base"]
    hub_cache_file(tmp_path, clip.hf_repo, "open_clip_model.safetensors")
    assert available_locally(clip, str(tmp_path))
    hub_cache_file(tmp_path, siglip.hf_repo, "open_clip_model.safetensors")
    assert not available_locally(siglip, str(tmp_path)), "SigLIP also needs its tokenizer.json"
    hub_cache_file(tmp_path, siglip.hf_repo, "tokenizer.json")
    assert available_locally(siglip, str(tmp_path))
    hub_cache_file(tmp_path, align.hf_repo, "model.safetensors")
    hub_cache_file(tmp_path, align.hf_repo, "vocab.txt")
    assert not available_locally(align, str(tmp_path)), "ALIGN also needs its image-processor config"
    hub_cache_file(tmp_path, align.hf_repo, "preprocessor_config.json")
    assert available_locally(align, str(tmp_path))


def test_bad_weights_arguments_are_one_line(tmp_path):
    entry = BY_NAME["clip-vit-b32-openai"]
    with pytest.raises(QbenchError, match="does not exist; pass a state-dict file"):
        load_entry(entry, LoadRequest(weights=str(tmp_path / "nope.safetensors")))
    with pytest.raises(QbenchError, match="exclude each other"):
        load_entry(entry, LoadRequest(weights=str(tmp_path), random_init=True))
    (tmp_path / "README.md").write_text("no weights here")
    with pytest.raises(QbenchError, match="holds no state-dict file.*pass the file itself"):
        load_entry(entry, LoadRequest(weights=str(tmp_path)))


# -- loading through the zoo loader with the tiny architectures of models.md §5 ---------------------------
TINY_FOR = {  # zoo entry -> the tiny config of the same family
    "clip-vit-b16-laion400m": "qbench-tiny-vit",
    "clip-vit-b32-openai": "qbench-tiny-vit-quickgelu",
    "siglip-vit-b16": "qbench-tiny-sigmoid",
    "clip-convnext-base-laion400m": "qbench-tiny-convnext",
    "coca-vit-b32-laion2b": "qbench-tiny-coca",
}


def tiny_state(arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    register_tiny_configs()
    torch.manual_seed(seed)
    return open_clip.create_model(arch, pretrained=None).state_dict()


def stub_tokenizer(vocab: int, context: int):
    """Deterministic ids standing in for a tokenizer whose files cannot be downloaded here."""

    def tokenize(texts):
        rows = [[(hash(word) % (vocab - 2)) + 1 for word in text.split()][:context] for text in texts]
        return torch.tensor([row + [0] * (context - len(row)) for row in rows])

    return tokenize


def tiny_load(name: str, **request) -> object:
    entry = BY_NAME[name]
    tokenizer = stub_tokenizer(49408, 16) if entry.tokenizer == "hf" else None
    return load_open_clip(entry, LoadRequest(**request), arch=TINY_FOR[name], tokenizer=tokenizer)


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("form", ["safetensors", "bin", "wrapped-pt", "module-prefix"])
def test_state_dict_forms_reload_bit_exactly(form, tmp_path):
    state = tiny_state("qbench-tiny-vit-quickgelu", seed=3)
    path = tmp_path / f"weights.{ {'safetensors': 'safetensors', 'bin': 'bin'}.get(form, 'pt') }"
    if form == "safetensors":
        save_file(state, str(path))
    elif form == "bin":
        torch.save(state, path)
    elif form == "wrapped-pt":
        torch.save({"state_dict": state, "epoch": 32}, path)
    else:
        torch.save({f"module.{key}": value for key, value in state.items()}, path)
    vlm = tiny_load("clip-vit-b32-openai", weights=str(path))
    assert vlm.load_info["weights_source"] == "file" and vlm.load_info["weights_path"] == str(path)
    for key, value in state.items():
        assert torch.equal(vlm.model.state_dict()[key], value), key


def test_weights_found_in_the_cache_are_loaded_without_network(tmp_path):
    entry = BY_NAME["clip-vit-b32-openai"]
    state = tiny_state("qbench-tiny-vit-quickgelu", seed=5)
    save_file(state, str(tmp_path / "weights.safetensors"))
    hub_cache_file(tmp_path, entry.hf_repo, "open_clip_model.safetensors", (tmp_path / "weights.safetensors").read_bytes())
    vlm = tiny_load("clip-vit-b32-openai", cache_dir=str(tmp_path))
    assert vlm.load_info["weights_source"] == "cache"
    assert torch.equal(vlm.model.state_dict()["visual.conv1.weight"], state["visual.conv1.weight"])


def test_wrong_architecture_and_pickled_archives_are_one_line(tmp_path):
    save_file(tiny_state("qbench-tiny-coca"), str(tmp_path / "coca.safetensors"))
    with pytest.raises(QbenchError) as raised:
        tiny_load("clip-vit-b32-openai", weights=str(tmp_path / "coca.safetensors"))
    assert "does not fit 'clip-vit-b32-openai'" in str(raised.value) and "\n" not in str(raised.value)
    torch.save(torch.nn.Linear(2, 2), tmp_path / "pickled.pt")  # a pickled module, as TorchScript archives are
    with pytest.raises(QbenchError, match="pickled object.*does not unpickle.*Hub conversion"):
        tiny_load("clip-vit-b32-openai", weights=str(tmp_path / "pickled.pt"))


def test_siglip_keeps_its_preprocessing_when_loaded_from_a_file(tmp_path):
    """A path leaves open_clip's default (OpenAI mean, shortest-side crop); the tag's 0.5 / squash must win."""
    save_file(tiny_state("qbench-tiny-sigmoid"), str(tmp_path / "siglip.safetensors"))
    vlm = tiny_load("siglip-vit-b16", weights=str(tmp_path / "siglip.safetensors"))
    steps = vlm.preprocess.transforms
    normalize = next(step for step in steps if type(step).__name__ == "Normalize")
    assert tuple(normalize.mean) == (0.5, 0.5, 0.5) and tuple(normalize.std) == (0.5, 0.5, 0.5)
    assert type(steps[0]).__name__ == "Resize" and tuple(steps[0].size) == (32, 32), "squash: no centre crop"
    assert vlm.logit_bias is not None


def test_tokenizers_that_need_downloaded_files_fail_with_one_line(tmp_path):
    save_file(tiny_state("qbench-tiny-sigmoid"), str(tmp_path / "siglip.safetensors"))
    with pytest.raises(QbenchError, match="tokenizer of 'siglip-vit-b16' needs tokenizer.json from timm/ViT-B-16-SigLIP"):
        load_open_clip(BY_NAME["siglip-vit-b16"], LoadRequest(weights=str(tmp_path / "siglip.safetensors")),
                       arch="qbench-tiny-sigmoid")
    with pytest.raises(QbenchError, match="tokenizer of 'align-base' needs vocab.txt or tokenizer.json"):
        load_align(BY_NAME["align-base"], LoadRequest(random_init=True, cache_dir=str(tmp_path)))


# -- every zoo architecture, offline --------------------------------------------------------------------
CONVNEXT_STAGES = (3, 3, 27, 3)


def expected_inventory(family: str, vision_depth: int, text_depth: int) -> dict[str, tuple[int, int]]:
    """``{tower: (Conv2d, Linear)}`` after the attention rewrite, heads excluded (``models.md`` §6.1 per block)."""
    text = (0, 6 * text_depth)  # q, k, v, out, fc, proj per block (BERT: q, k, v, out, intermediate, output)
    if family == "convnext":
        blocks = sum(min(vision_depth, n) for n in CONVNEXT_STAGES)
        return {"visual": (1 + blocks + 3, 2 * blocks), "text": text}  # stem, depthwise, downsamples; pointwise MLP
    if family == "align":
        # 272 Conv2d in the tower (55 MBConv blocks: depthwise, SE as 1x1 convs; no Linear) as §6.1 counts them,
        # minus the last block's projection conv, which qbench keeps in float as ALIGN's image head (§6.3)
        return {"visual": (272 - 1, 0), "text": text}
    per_block = {"clip": 6, "coca": 6, "siglip": 4, "eva02": 7}[family]  # timm ViT: qkv, proj, fc1, fc2
    return {"visual": (1, per_block * vision_depth), "text": text}


def inventory(vlm) -> dict[str, tuple[int, int]]:
    counts = {}
    for tower in ("visual", "text"):
        modules = [module for _, module in in_scope_modules(vlm, (tower,))]
        counts[tower] = (sum(isinstance(m, torch.nn.Conv2d) for m in modules),
                         sum(isinstance(m, torch.nn.Linear) for m in modules))
    return counts


def align_processor(image_size: int = 289):
    """align-base's image-processor settings (resize 346, crop 289, [-1, 1]) with a generated vocabulary."""
    from transformers import AlignProcessor, BertTokenizer, EfficientNetImageProcessor

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "the", "cat", "dog", "red", "square"]
    tokenizer = BertTokenizer(vocab={word: index for index, word in enumerate(words)})
    resize = round(image_size * 346 / 289)
    image_processor = EfficientNetImageProcessor(
        size={"height": resize, "width": resize}, crop_size={"height": image_size, "width": image_size},
        do_center_crop=True, rescale_factor=1 / 127.5, rescale_offset=True, do_normalize=False, include_top=False,
        resample=2,
    )
    return AlignProcessor(image_processor=image_processor, tokenizer=tokenizer)


def random_zoo_model(entry, depth: int | None):
    """The entry's architecture with random weights; ``depth`` reduces the number of blocks (not ALIGN)."""
    if entry.loader == "hf_align":
        return load_align(entry, LoadRequest(random_init=True), processor=align_processor())
    tokenizer = stub_tokenizer(32000, entry.context_length) if entry.tokenizer == "hf" else None
    request = LoadRequest(random_init=True)
    return load_open_clip(entry, request, depth=depth, tokenizer=tokenizer)


def depths(entry, depth: int | None) -> tuple[int, int]:
    if entry.loader == "hf_align":
        return 0, 12
    config = open_clip.get_model_config(entry.arch)
    full_vision = config["vision_cfg"].get("layers", 12)
    full_text = config["text_cfg"]["layers"]
    if depth is None:
        return (max(CONVNEXT_STAGES) if entry.family == "convnext" else full_vision), full_text
    return depth, min(depth, full_text)


def check_architecture(entry, depth: int | None) -> None:
    """Build, forward at the real input size, inventory, attention rewrite equivalence, w8a8 joint wrapping."""
    torch.manual_seed(0)
    vlm = random_zoo_model(entry, depth)
    pixels = images(2, entry.image_size)
    tokens = vlm.tokenize(["a photo of the cat", "a red square"])
    assert tokens.shape == (2, entry.context_length)
    with torch.no_grad():
        image, text = vlm.encode_image(pixels), vlm.encode_text(tokens)
    assert image.shape == (2, entry.embed_dim) and text.shape == (2, entry.embed_dim)
    assert torch.allclose(image.norm(dim=-1), torch.ones(2), atol=1e-4)
    assert torch.allclose(text.norm(dim=-1), torch.ones(2), atol=1e-4)
    assert vlm.logit_scale > 0 and ((vlm.logit_bias is not None) == (entry.logit_kind == "sigmoid"))
    names = dict(vlm.model.named_modules()) | dict(vlm.model.named_parameters())
    for head in vlm.head_modules:
        assert head in names, f"head {head} is neither a module nor a parameter of {entry.name}"

    rewritten = rewrite_tower_attention(vlm, ("visual", "text"))
    assert not any(isinstance(module, torch.nn.MultiheadAttention) and vlm.tower_of(name + ".")
                   for name, module in vlm.model.named_modules())
    with torch.no_grad():
        assert (vlm.encode_image(pixels) - image).abs().max() < 1e-4
        assert (vlm.encode_text(tokens) - text).abs().max() < 1e-4
    assert rewritten > 0 or entry.loader == "hf_align"
    vision_depth, text_depth = depths(entry, depth)
    assert inventory(vlm) == expected_inventory(entry.family, vision_depth, text_depth)
    for name, _ in in_scope_modules(vlm, ("visual", "text")):
        assert not any(name == head or name.startswith(head + ".") for head in vlm.head_modules)

    quantizer = build_registry().get("quantizers", "minmax")()
    data = CalibrationData(source="random", images=pixels, tokens=tokens, captions=("a", "b"), fingerprint="arch")
    result = quantizer.quantize(copy.deepcopy(vlm), BitSpec.parse("w8a8"), Scope.JOINT, data, 0)
    report = verify_quantized(result.model, pixels, tokens, Scope.JOINT.towers, float_extras=result.float_extras)
    assert report.passed, report.problems
    assert report.n_modules == sum(sum(counts) for counts in expected_inventory(entry.family, vision_depth, text_depth).values())
    with torch.no_grad():
        assert torch.isfinite(result.model.encode_image(pixels)).all()
        assert torch.isfinite(result.model.encode_text(tokens)).all()


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda entry: entry.name)
def test_every_zoo_architecture_builds_offline_runs_and_wraps(entry):
    """Real widths and input sizes, two blocks per tower (timm trunks: their first two blocks; ALIGN whole)."""
    check_architecture(entry, depth=2)


@pytest.mark.slow
@pytest.mark.parametrize("entry", ENTRIES, ids=lambda entry: entry.name)
def test_full_size_architectures_have_the_layer_counts_of_the_spec(entry):
    """Full depth: the module counts of ``models.md`` §6.1 (ALIGN: 271 convs, its head conv kept in float; text 72,
    its unused pooler dropped — §6.1 counts both)."""
    check_architecture(entry, depth=None)


def test_random_init_is_stamped_in_the_configuration():
    from qbench.engine.evaluate import EvalRequest, resolve

    plain = resolve(EvalRequest(model="clip-vit-b32-openai"), build_registry()).config
    smoke = resolve(EvalRequest(model="clip-vit-b32-openai", random_init=True), build_registry()).config
    assert smoke["random_init"] is True and plain["random_init"] is False
    assert smoke["weights_tag"] == "open_clip:ViT-B-32-quickgelu:openai:random-init"
    assert smoke["config_hash"] != plain["config_hash"]
