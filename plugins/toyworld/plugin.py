"""The offline toy world as qbench plugins: the ``toy-clip`` model, the ``toy-*`` splits, ``toy-proxy``.

Everything here works without network access: the model is an open_clip custom config
(``qbench-toy-vit.json`` next to this file) with weights shipped in ``weights/toy-clip.safetensors``
(trained by ``scripts/train_toy.py``), and the data are rendered by :mod:`.world`.

Dataset conventions: every split carries the ten ID class names and the toy prompt templates. OOD
splits (``toy-ood-near``, ``toy-ood-far``) have no ID label, so their labels are all ``-1``; the held-out
class of each near-OOD image is available from ``world.generate("ood-near", ...)``. Per-split seeds are
derived from the split name and ``DatasetRequest.seed``, so evaluation data never share a generator
with the training or proxy streams.

open_clip and torch are imported inside functions: importing this module (done for every CLI call)
stays cheap, and the model config is registered only when a model is first built.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from qbench.data import ArrayImages, DatasetRequest, DatasetSpec, ProxyPairs, ProxySpec
from qbench.errors import QbenchError
from qbench.hookspecs import hookimpl
from qbench.engine.corruptions import STUDY_CORRUPTIONS, STUDY_SEVERITY

from . import envisioned, world

if TYPE_CHECKING:  # qbench.vlm imports torch; keep importing this module cheap
    from qbench.model import LoadRequest, ModelSpec
    from qbench.vlm import VLM
    from qbench.engine.corruptions import CorruptedImages

MODEL_NAME = "toy-clip"
ARCH = "qbench-toy-vit"
CONFIG_DIR = Path(__file__).resolve().parent
WEIGHTS_PATH = CONFIG_DIR / "weights" / "toy-clip.safetensors"
TRAIN_COMMAND = "python scripts/train_toy.py"

EVAL_IMAGES = 1000  # images per evaluation split
SHIFT_CORRUPTIONS: tuple[str, ...] = STUDY_CORRUPTIONS  # the four corruptions of suites.md §3.3
SHIFT_SEVERITY = STUDY_SEVERITY

CLIP_CITATION = (
    "Radford et al., Learning Transferable Visual Models From Natural Language Supervision, ICML 2021; "
    "Ilharco et al., OpenCLIP, 2021 (doi:10.5281/zenodo.5143773)"
)
WORLD_CITATION = "qbench toy world (procedural, this repository)"
CORRUPTION_CITATION = "Hendrycks & Dietterich, ICLR 2019 (imagecorruptions by Michaelis et al., 2019)"


# -- model ---------------------------------------------------------------------------------------------
_config_registered = False


def register_model_config() -> None:
    """Make ``qbench-toy-vit`` known to open_clip (once per process; later calls do nothing)."""
    global _config_registered
    if _config_registered:
        return
    import open_clip

    if ARCH not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)
    _config_registered = True


def weights_available() -> bool:
    """Whether the shipped weights file is present."""
    return WEIGHTS_PATH.is_file()


@functools.lru_cache(maxsize=None)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_tag(path: Path = WEIGHTS_PATH) -> str:
    """``toy-v1-<first 12 hex of the file's SHA-256>``: results name the exact shipped weights."""
    if not path.is_file():
        return "toy-v1-missing"
    stat = path.stat()
    return "toy-v1-" + _file_sha256(str(path), stat.st_size, stat.st_mtime_ns)[:12]


def architecture_summary() -> str:
    """A short description of the towers, read from the shipped config (so it never drifts from it)."""
    config = json.loads((CONFIG_DIR / f"{ARCH}.json").read_text())
    vision, text = config["vision_cfg"], config["text_cfg"]
    return (
        f"ViT {vision['image_size']}px/{vision['patch_size']}, {vision['layers']}x{vision['width']}; "
        f"text {text['layers']}x{text['width']}, {text['context_length']} tokens; embed {config['embed_dim']}"
    )


def load_toy_clip(request: LoadRequest) -> VLM:
    """Build ``toy-clip`` from the shipped weights (or ``request.weights``) as a :class:`VLM`, offline."""
    import open_clip

    register_model_config()
    if request.random_init:
        model = open_clip.create_model(ARCH, pretrained=None, device=request.device)
        return open_clip_vlm_for(model, open_clip.get_tokenizer(ARCH), toy_preprocess(model))
    path = Path(request.weights).expanduser() if request.weights else WEIGHTS_PATH
    if not path.is_file():
        if request.weights:
            fix = "pass --weights with the path of an existing toy-clip .safetensors file"
        else:
            fix = f"re-create them with '{TRAIN_COMMAND}' or pass --weights PATH"
        raise QbenchError(f"toy-clip weights not found at {path}; {fix}")
    try:
        model = open_clip.create_model(ARCH, pretrained=str(path), device=request.device)
    except Exception as error:  # corrupt file, wrong architecture, unreadable: one line for the user
        reason = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
        raise QbenchError(
            f"cannot load toy-clip weights from {path} ({reason}); pass a state dict of '{ARCH}' "
            f"or re-create the file with '{TRAIN_COMMAND}'"
        ) from None
    tokenizer = open_clip.get_tokenizer(ARCH)
    preprocess = toy_preprocess(model)
    return open_clip_vlm_for(model, tokenizer, preprocess)


OUTLIER_MODEL_NAME = "toy-clip-outliers"
OUTLIER_CHANNELS: tuple[int, ...] = (7, 42)
OUTLIER_GAIN = 40.0


def load_toy_clip_outliers(request: LoadRequest) -> VLM:
    """``toy-clip`` re-parameterised so a few residual channels carry activation outliers (same function).

    In every block of both towers, the LayerNorm gain and bias of :data:`OUTLIER_CHANNELS` are multiplied
    by :data:`OUTLIER_GAIN` and the matching input columns of the Linears reading that norm are divided
    by it. The float model computes exactly what ``toy-clip`` computes (up to rounding), but the inputs of
    q/k/v and fc1 now have the few huge channels real CLIPs have — the setting SmoothQuant, QuaRot and
    Outlier Suppression were designed for, which the toy model, trained small, lacks.
    """
    import torch

    vlm = load_toy_clip(request)
    with torch.no_grad():
        for module in vlm.model.modules():
            if not all(hasattr(module, name) for name in ("ln_1", "ln_2", "attn", "mlp")):
                continue
            channels = list(OUTLIER_CHANNELS)
            for norm in (module.ln_1, module.ln_2):
                norm.weight[channels] *= OUTLIER_GAIN
                norm.bias[channels] *= OUTLIER_GAIN
            module.attn.in_proj_weight[:, channels] /= OUTLIER_GAIN
            module.mlp.c_fc.weight[:, channels] /= OUTLIER_GAIN
    vlm.name = OUTLIER_MODEL_NAME
    return vlm


def toy_preprocess(model) -> Callable:
    """open_clip's evaluation transform for the model (resize + centre crop to 32 px, CLIP normalisation)."""
    from qbench.openclip_vlm import open_clip_preprocess

    return open_clip_preprocess(model)


def open_clip_vlm_for(model, tokenizer: Callable, preprocess: Callable) -> VLM:
    """Wrap the open_clip model as the ``toy-clip`` VLM."""
    from qbench.openclip_vlm import open_clip_vlm

    return open_clip_vlm(model, tokenizer, preprocess, name=MODEL_NAME)


@hookimpl
def qbench_register_models() -> list[ModelSpec]:
    from qbench.model import ModelSpec

    return [
        ModelSpec(
            name=MODEL_NAME,
            family="clip",
            arch=ARCH,
            weights_tag=weights_tag(),
            pretraining_data="qbench toy world (procedural)",
            description=f"tiny CLIP ({architecture_summary()}) trained on the offline toy world; ships with qbench",
            citation=CLIP_CITATION,
            loader=load_toy_clip,
            weights_available=weights_available,
            tier="toy",
        ),
        ModelSpec(
            name=OUTLIER_MODEL_NAME,
            family="clip",
            arch=ARCH,
            weights_tag=f"{weights_tag()}-outliers{len(OUTLIER_CHANNELS)}x{OUTLIER_GAIN:g}",
            pretraining_data="qbench toy world (procedural)",
            description=f"toy-clip with {len(OUTLIER_CHANNELS)} planted activation-outlier channels (x{OUTLIER_GAIN:g}); "
                        "same float function, for outlier-aware quantizers",
            citation=CLIP_CITATION,
            loader=load_toy_clip_outliers,
            weights_available=weights_available,
            tier="toy",
        ),
    ]


# -- datasets ------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _generated(split: str, n: int, seed: int) -> world.ToySplit:
    """A generated split, cached: the ID test split is shared by the ID and all shift datasets."""
    generated = world.generate(split, n, seed)
    generated.images.setflags(write=False)
    return generated


def toy_dataset(name: str, split: str, request: DatasetRequest, n: int = EVAL_IMAGES) -> ArrayImages:
    """``n`` images of world split ``split`` as an ID-label-space :class:`ArrayImages` (OOD labels -1)."""
    generated = _generated(split, n, request.seed)
    in_label_space = generated.classnames == world.ID_CLASSES
    labels = generated.labels if in_label_space else np.full(len(generated), -1, np.int64)
    return ArrayImages(name, generated.images, labels, world.ID_CLASSES, world.TEMPLATES)


def shifted_dataset(corruption: str, request: DatasetRequest, n: int = EVAL_IMAGES) -> "CorruptedImages":
    """The ID test images corrupted with ``corruption`` at severity 3, seeded by the request.

    The same resize-then-corrupt pipeline as ``cifar10c-ic`` (:class:`qbench.engine.corruptions.CorruptedImages`):
    each image is resized to the model's crop (32 px for the toy ViT, so a no-op) and corrupted with a
    per-image seed, so toy and CIFAR-10-C shifts share one code path.
    """
    from qbench.engine.corruptions import CorruptedImages

    base = toy_dataset("toy-id-test", "id-test", request, n)
    return CorruptedImages(base, corruption, SHIFT_SEVERITY, request.seed, size=None, name=f"toy-shift-{corruption}",
                           follow_model=True)


def _split_loader(name: str, split: str) -> Callable[[DatasetRequest], ArrayImages]:
    def load(request: DatasetRequest) -> ArrayImages:
        return toy_dataset(name, split, request)

    load.__name__ = f"load_{name.replace('-', '_')}"
    load.__doc__ = f"The {name} split ({EVAL_IMAGES} images) of the toy world."
    return load


def _shift_loader(corruption: str) -> Callable[[DatasetRequest], ArrayImages]:
    def load(request: DatasetRequest) -> ArrayImages:
        return shifted_dataset(corruption, request)

    load.__name__ = f"load_toy_shift_{corruption}"
    load.__doc__ = f"toy-id-test corrupted with {corruption} (severity {SHIFT_SEVERITY})."
    return load


LABEL_FINGERPRINTS = {
    "toy-id-test": "521873f888bc6f708d34449471a340e8b7dcad64c5631ab2e0eccc0bc16bc264",
    "toy-spurious-common": "77329d574848988db74da3909c7c431e10ff342af4c177f07facf1f3777aa5f1",
    "toy-spurious-counter": "dce2a78115719e98985f169c22e377f76466108a4f5ad5910868e95bf5cef129",
}
"""The labels of the classification splits, pinned (``DatasetSpec.label_fingerprint``); every shift keeps
toy-id-test's labels. A change to the world generator that moves a label fails tests/test_evidence.py."""


def _shipped_resources(role: str) -> dict[str, Path]:
    """Files shipped for scorers with the ID split: the envisioned outlier labels (EOE's ``eoe_labels`` key)."""
    if role != "id" or envisioned.EOE_LABELS is None:
        return {}
    return {envisioned.EOE_RESOURCE_KEY: envisioned.EOE_LABELS}


def toy_dataset_specs() -> list[DatasetSpec]:
    """Every toy evaluation split: ID, near/far OOD, spurious common/counter and four shifts."""
    plain = [
        ("toy-id-test", "id-test", "id", f"ID test split: {len(world.ID_CLASSES)} shape classes, each on its common "
         f"background {world.COMMON_BACKGROUND_PROB:.0%} of the time"),
        ("toy-ood-near", "ood-near", "ood", "near OOD: held-out shapes resembling ID shapes (labels -1)"),
        ("toy-ood-far", "ood-far", "ood", "far OOD: bare textures and scribbles, no shape (labels -1)"),
        ("toy-spurious-common", "spurious-common", "spurious", "every ID image on its class's common background"),
        ("toy-spurious-counter", "spurious-counter", "spurious", "every ID image on a background other than its class's common one"),
    ]
    specs = [
        DatasetSpec(name, role, f"{description}; {EVAL_IMAGES} images, 32x32", WORLD_CITATION, _split_loader(name, split),
                    resources=_shipped_resources(role), label_fingerprint=LABEL_FINGERPRINTS.get(name))
        for name, split, role, description in plain
    ]
    specs += [
        DatasetSpec(
            f"toy-shift-{corruption}",
            "shift",
            f"toy-id-test with {corruption.replace('_', ' ')} at severity {SHIFT_SEVERITY}; {EVAL_IMAGES} images",
            f"{WORLD_CITATION}; {CORRUPTION_CITATION}",
            _shift_loader(corruption),
            label_fingerprint=LABEL_FINGERPRINTS["toy-id-test"],
        )
        for corruption in SHIFT_CORRUPTIONS
    ]
    return specs


@hookimpl
def qbench_register_datasets() -> list[DatasetSpec]:
    return toy_dataset_specs()


# -- proxy -----------------------------------------------------------------------------------------------
def load_toy_proxy(request: DatasetRequest, n: int) -> ProxyPairs:
    """Pairs ``[seed*n, (seed+1)*n)`` of the fixed proxy stream (training distribution, own seeds)."""
    if n < 1:
        raise QbenchError(f"bad proxy size {n}: it must be a positive number of image-caption pairs")
    if request.seed < 0:
        raise QbenchError(f"bad seed {request.seed} for toy-proxy: use a seed >= 0")
    window = world.stream_window("proxy", 0, request.seed * n, (request.seed + 1) * n)
    from PIL import Image

    digest = hashlib.sha256()
    digest.update(window.images.tobytes())
    digest.update("\n".join(window.captions).encode())
    return ProxyPairs(
        source="toy-proxy",
        images=tuple(Image.fromarray(image) for image in window.images),
        captions=window.captions,
        fingerprint=digest.hexdigest()[:16],
    )


@hookimpl
def qbench_register_proxies() -> list[ProxySpec]:
    return [
        ProxySpec(
            name="toy-proxy",
            description="image-caption pairs from the toy world's training distribution (disjoint seed stream)",
            loader=load_toy_proxy,
        )
    ]
