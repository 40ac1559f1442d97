"""The study's model zoo: ten core VLMs and the extended entries its figures name (``models.md`` §1).

Each :class:`ZooEntry` is the static identity of one pre-trained model: the loader family, the open_clip
architecture and pretrained tag (or the Hugging Face id for ALIGN), the Hub repo its weights live in, the
QuickGELU flag the checkpoint was trained with, the modules that play the role of the final projection
(kept in float, ``models.md`` §6.3), and the papers to cite. Nothing here imports torch, open_clip or
transformers, so ``qbench list models`` stays fast; :mod:`.open_clip_loader` and :mod:`.align` build the
models, :mod:`.weights` finds their files.

The pairing is the study's design: OpenAI's WIT-400M weights against LAION-400M weights at ViT-B/32,
B/16 and L/14 (same architecture, same data scale, different source), plus one model from each other
family (ConvNeXt, SigLIP, CoCa, ALIGN). QuickGELU is part of a checkpoint's identity: OpenAI weights and
the B/32 LAION-400M weights were trained with it, the B/16 and L/14 LAION-400M weights were not.
``tests/test_zoo.py`` checks every flag and repo against open_clip's own pretrained registry.
"""

from __future__ import annotations

from dataclasses import dataclass

CLIP = "Radford et al., Learning Transferable Visual Models From Natural Language Supervision, ICML 2021"
LAION400M = "Schuhmann et al., LAION-400M, NeurIPS Data-Centric AI Workshop 2021"
OPENCLIP = "Cherti et al., Reproducible Scaling Laws for Contrastive Language-Image Learning, CVPR 2023"
LAION5B = "Schuhmann et al., LAION-5B, NeurIPS Datasets and Benchmarks 2022"
CONVNEXT = "Liu et al., A ConvNet for the 2020s, CVPR 2022"
SIGLIP = "Zhai et al., Sigmoid Loss for Language Image Pre-Training, ICCV 2023"
COCA = "Yu et al., CoCa: Contrastive Captioners are Image-Text Foundation Models, TMLR 2022"
ALIGN = "Jia et al., Scaling Up Visual and Vision-Language Representation Learning With Noisy Text Supervision, ICML 2021"
COYO = "Byeon et al., COYO-700M: Image-Text Pair Dataset, 2022 (github.com/kakaobrain/coyo-dataset)"
EVA = "Sun et al., EVA-CLIP: Improved Training Techniques for CLIP at Scale, 2023"
DFN = "Fang et al., Data Filtering Networks, ICLR 2024"

VIT_HEADS = ("visual.proj", "text_projection")  # Parameters, not modules: listed for the record


@dataclass(frozen=True)
class ZooEntry:
    """One registered pre-trained VLM (``models.md`` §7).

    ``loader`` is ``open_clip`` or ``hf_align``. ``pretrained`` is the open_clip tag (for ALIGN the Hugging
    Face id); ``hf_repo`` the Hub repository holding the weights (and, for SigLIP and ALIGN, the tokenizer
    and image-processor files). ``head_modules`` are module names inside the wrapped model that project
    into the joint space; Parameters among them (CLIP's ``visual.proj``) are recorded but never seen by a
    module scan. ``logit_kind`` is ``softmax`` (CLIP-style) or ``sigmoid`` (SigLIP, with a logit bias).
    ``note`` is shown by ``qbench list models`` (e.g. why the DFN entry is a B/16).
    """

    name: str
    family: str
    loader: str
    arch: str
    pretrained: str
    hf_repo: str
    data: str
    quick_gelu: bool
    image_size: int
    embed_dim: int
    context_length: int
    tokenizer: str
    head_modules: tuple[str, ...]
    logit_kind: str
    params: str
    citation: str
    tier: str = "core"
    note: str = ""

    @property
    def weights_tag(self) -> str:
        """What names the weights in results: ``open_clip:ARCH:TAG`` or ``hf:ID``."""
        if self.loader == "hf_align":
            return f"hf:{self.pretrained}"
        return f"open_clip:{self.arch}:{self.pretrained}"

    @property
    def needs_tokenizer_files(self) -> bool:
        """SigLIP's SentencePiece and ALIGN's WordPiece tokenizers come from the Hub repo, not open_clip."""
        return self.tokenizer in ("hf", "bert")


def _openai_clip(name: str, arch: str, size: str, params: str, embed: int, repo: str) -> ZooEntry:
    return ZooEntry(
        name, "clip", "open_clip", arch, "openai", repo, "WIT-400M (OpenAI)", True, 224, embed, 77, "open_clip",
        VIT_HEADS, "softmax", params, CLIP, note=f"OpenAI CLIP {size}",
    )


def _laion_clip(name: str, arch: str, tag: str, data: str, quick_gelu: bool, params: str, embed: int, repo: str,
                tier: str = "core") -> ZooEntry:
    citation = f"{CLIP}; {LAION400M if '400m' in tag else LAION5B}; {OPENCLIP}"
    return ZooEntry(
        name, "clip", "open_clip", arch, tag, repo, data, quick_gelu, 224, embed, 77, "open_clip",
        VIT_HEADS, "softmax", params, citation, tier=tier,
    )


CORE: tuple[ZooEntry, ...] = (
    _openai_clip("clip-vit-b32-openai", "ViT-B-32-quickgelu", "ViT-B/32", "87.85 / 63.43", 512,
                 "timm/vit_base_patch32_clip_224.openai"),
    _laion_clip("clip-vit-b32-laion400m", "ViT-B-32-quickgelu", "laion400m_e32", "LAION-400M", True,
                "87.85 / 63.43", 512, "timm/vit_base_patch32_clip_224.laion400m_e32"),
    _openai_clip("clip-vit-b16-openai", "ViT-B-16-quickgelu", "ViT-B/16", "86.19 / 63.43", 512,
                 "timm/vit_base_patch16_clip_224.openai"),
    _laion_clip("clip-vit-b16-laion400m", "ViT-B-16", "laion400m_e32", "LAION-400M", False,
                "86.19 / 63.43", 512, "timm/vit_base_patch16_clip_224.laion400m_e32"),
    _openai_clip("clip-vit-l14-openai", "ViT-L-14-quickgelu", "ViT-L/14", "303.97 / 123.65", 768,
                 "timm/vit_large_patch14_clip_224.openai"),
    _laion_clip("clip-vit-l14-laion400m", "ViT-L-14", "laion400m_e32", "LAION-400M", False,
                "303.97 / 123.65", 768, "timm/vit_large_patch14_clip_224.laion400m_e32"),
    ZooEntry(
        "clip-convnext-base-laion400m", "convnext", "open_clip", "convnext_base", "laion400m_s13b_b51k",
        "laion/CLIP-convnext_base-laion400M-s13B-b51K", "LAION-400M", False, 224, 512, 77, "open_clip",
        ("visual.head.proj", "text_projection"), "softmax", "88.09 / 63.43", f"{CONVNEXT}; {LAION400M}; {OPENCLIP}",
    ),
    ZooEntry(
        "siglip-vit-b16", "siglip", "open_clip", "ViT-B-16-SigLIP", "webli", "timm/ViT-B-16-SigLIP", "WebLI",
        False, 224, 768, 64, "hf", ("visual.trunk.attn_pool", "text.text_projection"), "sigmoid",
        "92.88 / 110.27", SIGLIP,
        note="head: the MAP attention-pool is kept whole in float (qbench convention)",
    ),
    ZooEntry(
        "coca-vit-b32-laion2b", "coca", "open_clip", "coca_ViT-B-32", "laion2b_s13b_b90k",
        "laion/CoCa-ViT-B-32-laion2B-s13B-b90k", "LAION-2B", False, 224, 512, 76, "open_clip",
        ("visual.attn_pool", "visual.proj", "text.text_projection"), "softmax",
        "89.16 / 63.43 (+100.97 caption decoder, unused)", f"{COCA}; {LAION5B}; {OPENCLIP}",
        note="contrastive dual encoder only: the caption decoder is built, never run",
    ),
    ZooEntry(
        "align-base", "align", "hf_align", "AlignModel", "kakaobrain/align-base", "kakaobrain/align-base",
        "COYO-700M (Kakao Brain's public ALIGN reproduction)", False, 289, 640, 64, "bert",
        ("text_projection",), "softmax", "62.14 / 109.48 (+0.49 text projection)", f"{ALIGN}; {COYO}",
        note="EfficientNet-B7 + BERT-base; head: the last MBConv block's 1x1 projection conv (qbench convention)",
    ),
)

EXTENDED: tuple[ZooEntry, ...] = (
    ZooEntry(
        "eva02-vit-b16", "eva02", "open_clip", "EVA02-B-16", "merged2b_s8b_b131k",
        "timm/eva02_base_patch16_clip_224.merged2b_s8b_b131k", "Merged-2B (LAION-2B + COYO-700M)", False, 224,
        512, 77, "open_clip", ("visual.trunk.head", "text.text_projection"), "softmax", "86.26 / 63.43", EVA,
        tier="extended",
    ),
    ZooEntry(
        "dfn-vit-b16", "clip", "open_clip", "ViT-B-16-quickgelu", "dfn2b", "apple/DFN2B-CLIP-ViT-B-16", "DFN-2B",
        True, 224, 512, 77, "open_clip", VIT_HEADS, "softmax", "86.19 / 63.43", f"{DFN}; {CLIP}", tier="extended",
        note="the figures' 'DFN-ViT-B-32' is this B/16: open_clip has no DFN ViT-B/32 checkpoint",
    ),
    _laion_clip("clip-vit-b32-laion2b", "ViT-B-32", "laion2b_s34b_b79k", "LAION-2B", False, "87.85 / 63.43", 512,
                "laion/CLIP-ViT-B-32-laion2B-s34B-b79K", tier="extended"),
    _laion_clip("clip-vit-b16-laion2b", "ViT-B-16", "laion2b_s34b_b88k", "LAION-2B", False, "86.19 / 63.43", 512,
                "laion/CLIP-ViT-B-16-laion2B-s34B-b88K", tier="extended"),
    _laion_clip("clip-vit-l14-laion2b", "ViT-L-14", "laion2b_s32b_b82k", "LAION-2B", False, "303.97 / 123.65", 768,
                "laion/CLIP-ViT-L-14-laion2B-s32B-b82K", tier="extended"),
)

ENTRIES: tuple[ZooEntry, ...] = CORE + EXTENDED
