"""The vision-language model interface every Model plugin returns.

A Model plugin registers a :class:`ModelSpec` whose loader turns a :class:`LoadRequest` into a
:class:`~qbench.vlm.VLM`: a CLIP-like dual encoder behind one surface (normalised image and text
embeddings, tokenizer, preprocessing, logit scale and bias, and the module inventory a quantizer may touch).
Scorers and metrics only ever see what that interface returns, so they never special-case model families.

This module is torch-free at import time, so registering plugins (``qbench list``, ``qbench --help``) does
not import torch: :class:`~qbench.vlm.VLM` is an ``nn.Module`` and lives in :mod:`qbench.vlm`;
``from qbench.model import VLM`` still works and imports torch only then (PEP 562 ``__getattr__``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from qbench.errors import QbenchError

if TYPE_CHECKING:
    from qbench.vlm import VLM

__all__ = ["LoadRequest", "ModelSpec", "VLM"]

_TORCH_NAMES = frozenset({"VLM", "QUANTIZABLE_TYPES"})
"""Names that moved to :mod:`qbench.vlm` and are still served from here on first use."""


def __getattr__(name: str) -> Any:
    """``qbench.model.VLM`` (and ``QUANTIZABLE_TYPES``): import :mod:`qbench.vlm` (and torch) only when asked.

    Keeps ``from qbench.model import VLM`` working for third-party code and for quantized checkpoints that
    name ``qbench.model:VLM``, while ``import qbench.model`` itself stays cheap.
    """
    if name in _TORCH_NAMES:
        from qbench import vlm

        return getattr(vlm, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class LoadRequest:
    """What the user asked for when loading a model.

    ``weights`` is a file or folder given with ``--weights``; ``cache_dir`` the Hugging Face hub cache
    (``--hf-cache``, default ``$HF_HUB_CACHE``); ``allow_download`` permits network access
    (``--allow-download``); ``random_init`` builds the architecture with random weights (``--random-init``,
    smoke runs only: such results are stamped and refused by the leaderboard).
    """

    weights: str | None = None
    device: str = "cpu"
    cache_dir: str | None = None
    allow_download: bool = False
    random_init: bool = False

    def __post_init__(self) -> None:
        if self.random_init and self.weights:
            raise QbenchError("--random-init and --weights exclude each other: drop one of them")


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: identity, provenance and a loader that builds its :class:`VLM`.

    ``weights_tag`` is what identifies the weights in results (an open_clip tag, a Hugging Face id, or
    the SHA-256 prefix of a shipped file); it is part of every configuration hash.
    """

    name: str
    family: str
    arch: str
    weights_tag: str
    pretraining_data: str
    description: str
    citation: str
    loader: Callable[[LoadRequest], "VLM"] = field(compare=False, repr=False)
    weights_available: Callable[[], bool] = field(default=lambda: True, compare=False, repr=False)
    tier: str = ""
    """``core`` (the study's ten), ``extended`` (other models its figures name), ``toy``, or empty."""
