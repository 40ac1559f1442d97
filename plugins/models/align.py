"""ALIGN (Jia et al., ICML 2021) through transformers, behind the same :class:`qbench.model.VLM` surface.

The public weights are Kakao Brain's COYO-700M reproduction (Byeon et al., 2022), ``kakaobrain/align-base``:
an EfficientNet-B7 image tower and a BERT-base text tower. :class:`AlignDualEncoder` gives ``AlignModel``
open_clip's encoder interface, so scorers, quantizers and the feature cache never special-case it:

* image embedding: the vision tower's mean-pooled output (ALIGN has no image projection);
* text embedding: ``text_projection`` of the ``[CLS]`` state, as ``AlignModel.get_text_features``;
* logits: cosine similarity divided by the learned ``temperature``, exposed as
  ``logit_scale = log(1 / temperature)`` so ``VLM.logit_scale`` (which exponentiates) is ``1 / temperature``.

Tokens are the BERT ids padded to ``max_length`` (64); the attention mask is ``ids != pad_token_id``, exact
because padding is the only place the pad id occurs. BERT's pooler is dropped after loading: ALIGN's text
embedding never uses it, and a quantizer would otherwise calibrate a layer that never runs. The module
kept in float as the image "head" is the last MBConv block's 1x1 projection conv (3840 -> 640 for
align-base), a qbench convention recorded in each result's provenance (``models.md`` §6.3).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import nn

from qbench.errors import QbenchError
from qbench.model import LoadRequest
from qbench.vlm import VLM

from .weights import WeightsSource, resolve_weights, state_dict_file, tokenizer_folder
from .zoo import ZooEntry

if TYPE_CHECKING:
    from qbench.analysis.spectral import TapPoint

ARCHITECTURE_KEYS = {
    "text_config": ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"),
    "vision_config": ("width_coefficient", "depth_coefficient", "hidden_dim", "num_block_repeats", "out_channels"),
    "": ("projection_dim",),
}
"""Config fields that fix the align-base layout; a ``--weights`` folder must agree on all of them."""


class AlignDualEncoder(nn.Module):
    """``AlignModel`` with open_clip's ``encode_image`` / ``encode_text`` / ``logit_scale`` interface."""

    def __init__(self, align: nn.Module, pad_token_id: int) -> None:
        super().__init__()
        self.align = align
        self.pad_token_id = int(pad_token_id)

    def encode_image(self, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        embedding = self.align.vision_model(pixel_values=pixels).pooler_output
        return nn.functional.normalize(embedding, dim=-1) if normalize else embedding

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        mask = (tokens != self.pad_token_id).long()
        states = self.align.text_model(input_ids=tokens, attention_mask=mask).last_hidden_state
        embedding = self.align.text_projection(states[:, 0, :])
        return nn.functional.normalize(embedding, dim=-1) if normalize else embedding

    @property
    def logit_scale(self) -> torch.Tensor:
        """``log(1 / temperature)``: exponentiated by the VLM, it divides cosine similarity by temperature."""
        return -torch.log(self.align.temperature)

    def penultimate_tap(self) -> TapPoint:
        """The spectral "penultimate visual feature" (``scoring.md`` §3.1): the pooled output of
        ``align.vision_model``, which already is the embedding (head = identity)."""
        from qbench.analysis.spectral import TapPoint

        return TapPoint("align.vision_model", "output", lambda out: out.pooler_output)


class ProcessorTransform:
    """An image processor (``EfficientNetImageProcessor``) as a PIL -> ``3 x H x W`` tensor transform.

    Its ``repr`` names the processor's full configuration, because the feature cache keys on it.
    """

    def __init__(self, image_processor: Any) -> None:
        self.image_processor = image_processor
        settings = json.dumps(image_processor.to_dict(), sort_keys=True, default=str)
        self._description = f"{type(image_processor).__name__}({hashlib.sha256(settings.encode()).hexdigest()[:16]})"

    def __call__(self, image) -> torch.Tensor:
        return self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]

    def __repr__(self) -> str:
        return self._description


def bert_tokenizer(tokenizer: Any, context_length: int) -> Callable[[Sequence[str]], torch.Tensor]:
    """Texts -> ``N x context_length`` BERT ids, padded to the maximum length as ALIGN was trained."""

    def tokenize(texts: Sequence[str]) -> torch.Tensor:
        encoded = tokenizer(list(texts), padding="max_length", max_length=context_length, truncation=True,
                            return_tensors="pt")
        return encoded["input_ids"]

    return tokenize


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def check_architecture(entry: ZooEntry, config: Any, where: str) -> None:
    """Refuse a model whose layout differs from ``AlignConfig()`` (align-base) in any field that fixes it."""
    from transformers import AlignConfig

    reference = AlignConfig()
    for section, keys in ARCHITECTURE_KEYS.items():
        for key in keys:
            got = getattr(getattr(config, section) if section else config, key)
            want = getattr(getattr(reference, section) if section else reference, key)
            if _plain(got) != _plain(want):
                name = f"{section}.{key}" if section else key
                raise QbenchError(
                    f"{where} holds an ALIGN of another architecture ({name}={got}, align-base has {want}); "
                    f"pass the weights of {entry.pretrained} for {entry.name!r}"
                )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict read the way open_clip reads one (``.safetensors`` or ``weights_only`` torch file, unwrapping
    ``state_dict`` and ``module.`` prefixes), so ALIGN accepts the same file forms as the open_clip models."""
    from open_clip.factory import load_state_dict

    state = load_state_dict(str(path), weights_only=True)
    if not isinstance(state, dict):
        raise QbenchError(f"{path} does not hold a state dict (a mapping of tensor names to tensors)")
    return state


def load_model(entry: ZooEntry, source: WeightsSource, request: LoadRequest, check: bool) -> nn.Module:
    """``AlignModel`` from the resolved source (strict for state-dict files)."""
    from transformers import AlignConfig, AlignModel

    offline = {"cache_dir": request.cache_dir, "local_files_only": True}
    if source.kind == "random-init":
        return AlignModel(AlignConfig())
    if source.kind in ("file", "folder") and (source.kind == "file" or not (source.path / "config.json").is_file()):
        path = source.path if source.kind == "file" else state_dict_file(source.path, entry)
        model = AlignModel(AlignConfig())
        missing, unexpected = model.load_state_dict(read_state_dict(path), strict=False)
        missing = [key for key in missing if not key.endswith("position_ids")]
        if missing or unexpected:
            detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
            raise QbenchError(f"checkpoint {path} does not fit {entry.name!r} ({detail}); pass the weights of "
                              f"{entry.pretrained}")
        return model
    name = str(source.path) if source.kind == "folder" else entry.pretrained
    kwargs = offline if source.kind != "download" else {"cache_dir": request.cache_dir}
    model = AlignModel.from_pretrained(name, **kwargs)
    if check:
        check_architecture(entry, model.config, f"{name}")
    return model


def load_processor(entry: ZooEntry, source: WeightsSource, request: LoadRequest) -> Any:
    """The ``AlignProcessor`` (BERT tokenizer + EfficientNet image processor) from folder, cache or Hub."""
    from transformers import AlignProcessor

    folder = tokenizer_folder(entry, source, request.cache_dir, request.allow_download)
    local = folder != entry.hf_repo
    return AlignProcessor.from_pretrained(folder, local_files_only=local, cache_dir=request.cache_dir)


@torch.no_grad()
def recalibrate_batchnorm(align: nn.Module, image_size: int, seed: int = 0) -> None:
    """Set every BatchNorm's running statistics from one batch of random images (random init only).

    transformers' random initialisation shrinks activations by about 1e-22 over the 55 MBConv blocks
    (measured: std 0.05 after the stem, 1e-22 after the last block), so a ``--random-init`` ALIGN would
    return embeddings too small to normalise. Batch statistics rescale each layer, as trained BatchNorms do.
    """
    norms = [module for module in align.vision_model.modules() if isinstance(module, nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average: one batch sets the statistics exactly
    align.vision_model.train()
    generator = torch.Generator().manual_seed(seed)
    align.vision_model(pixel_values=torch.randn(4, 3, image_size, image_size, generator=generator))
    align.vision_model.eval()
    for norm in norms:
        norm.momentum = 0.1


def crop_size(image_processor: Any) -> int:
    """The square input size the image processor produces (its crop, else its resize)."""
    size = getattr(image_processor, "crop_size", None) if getattr(image_processor, "do_center_crop", False) else None
    size = size or image_processor.size
    if isinstance(size, (int, float)):
        return int(size)
    height = getattr(size, "height", None)
    return int(height if height is not None else size["height"])


def vision_head(align: nn.Module) -> str:
    """The last MBConv block's projection conv, inside the dual encoder: ALIGN's image "head"."""
    last = len(align.vision_model.encoder.blocks) - 1
    return f"align.vision_model.encoder.blocks.{last}.projection.project_conv"


def load_align(entry: ZooEntry, request: LoadRequest, *, check: bool = True, processor: Any | None = None) -> VLM:
    """Build ``entry`` (``align-base``) as a VLM.

    ``check=False`` accepts another ALIGN layout (tiny tests); ``processor`` replaces the ``AlignProcessor``
    read from the weights folder or the cache (architecture tests, where the real vocabulary is absent).
    """
    source = resolve_weights(entry, request.weights, request.cache_dir, request.allow_download, request.random_init)
    processor = processor or load_processor(entry, source, request)
    try:
        align = load_model(entry, source, request, check)
    except QbenchError:
        raise
    except Exception as error:  # corrupt file, unreadable config: one line
        first = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise QbenchError(f"cannot load {entry.name!r} from {source.describe()}: {first}") from None
    align.text_model.pooler = None
    if source.kind == "random-init":
        recalibrate_batchnorm(align, crop_size(processor.image_processor))
    align.to(request.device).eval()
    encoder = AlignDualEncoder(align, processor.tokenizer.pad_token_id)
    heads = frozenset({f"align.{name}" for name in entry.head_modules} | {vision_head(align)})
    vlm = VLM(
        encoder, bert_tokenizer(processor.tokenizer, entry.context_length), ProcessorTransform(processor.image_processor),
        name=entry.name,
        tower_prefixes={"visual": ("align.vision_model.",), "text": ("align.text_model.", "align.text_projection")},
        head_modules=heads,
    )
    vlm.load_info = {
        "weights_source": source.kind,
        "weights_path": str(source.path) if source.path else None,
        "hf_repo": entry.hf_repo,
        "arch": "AlignModel",
        "head_modules": sorted(heads),
        **({"batchnorm": "recalibrated on random images (random init)"} if source.kind == "random-init" else {}),
    }
    return vlm
