"""The :class:`VLM` module: the torch side of the model interface of :mod:`qbench.model`.

:class:`VLM` wraps a CLIP-like dual encoder (open_clip today; transformers ALIGN later) behind one
surface: the image and text encoders returning L2-normalised embeddings, the tokenizer, the image
preprocessing, the logit scale (and SigLIP's bias), and the module inventory a quantizer may touch
(every Linear/Conv2d of a tower except the tower's final projection into the joint space,
``models.md`` §6). It lives apart from the plain contracts (:class:`~qbench.model.ModelSpec`,
:class:`~qbench.model.LoadRequest`) because it is an ``nn.Module`` and importing it imports torch: plugin
registration and commands such as ``qbench list`` import only :mod:`qbench.model`, which stays torch-free
(``qbench.model.VLM`` still resolves here, on first use).
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch
from torch import nn

__all__ = ["QUANTIZABLE_TYPES", "VLM"]

QUANTIZABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)


class VLM(nn.Module):
    """A dual-encoder VLM with normalised embeddings, a cached zero-shot head and a layer inventory.

    ``tower_prefixes`` maps ``"visual"``/``"text"`` to the qualified-name prefixes (inside ``model``)
    of that tower's modules; ``head_modules`` are the modules that project into the joint space and
    stay in float.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Callable[[Sequence[str]], torch.Tensor],
        preprocess: Callable,
        *,
        name: str,
        tower_prefixes: dict[str, tuple[str, ...]],
        head_modules: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.name = name
        self.tower_prefixes = dict(tower_prefixes)
        self.head_modules = frozenset(head_modules)
        self.load_info: dict[str, object] = {}
        """How the weights were obtained (source, path, repo) and the head convention: run provenance."""
        self._head_cache: dict[tuple, torch.Tensor] = {}

    # -- encoders -----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings for a preprocessed batch."""
        return self.model.encode_image(pixels.to(self.device), normalize=True)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """L2-normalised text embeddings for a tokenized batch."""
        return self.model.encode_text(tokens.to(self.device), normalize=True)

    @property
    def logit_scale(self) -> float:
        """The multiplicative logit scale ``s = exp(logit_scale)`` (never a hard-coded 100)."""
        return float(self.model.logit_scale.detach().exp())

    @property
    def logit_bias(self) -> float | None:
        bias = getattr(self.model, "logit_bias", None)
        return None if bias is None else float(bias.detach())

    # -- zero-shot head -----------------------------------------------------------------------
    @torch.no_grad()
    def zero_shot_head(self, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        """Class embeddings ``K x d``: each class's template embeddings normalised, averaged, renormalised.

        Computed once per text-encoder state: the result is cached on this instance, and a quantizer
        that changes the text tower works on a copy whose cache starts empty (see :meth:`clear_caches`).
        """
        key = (tuple(classnames), tuple(templates))
        if key not in self._head_cache:
            rows = []
            for classname in classnames:
                texts = [template.format(classname) for template in templates]
                embeddings = self.encode_text(self.tokenize(texts)).float()
                mean = embeddings.mean(dim=0)
                rows.append(mean / mean.norm())
            self._head_cache[key] = torch.stack(rows).cpu()
        return self._head_cache[key]

    def clear_caches(self) -> None:
        """Forget cached text heads; call after anything changes the text tower."""
        self._head_cache.clear()

    # -- layer inventory ----------------------------------------------------------------------
    def tower_of(self, qualified_name: str) -> str | None:
        for tower, prefixes in self.tower_prefixes.items():
            if any(qualified_name.startswith(prefix) for prefix in prefixes):
                return tower
        return None

    def _inside_head(self, qualified_name: str) -> bool:
        """True for a head module and for anything nested in one (a head may be a small Sequential)."""
        return any(qualified_name == head or qualified_name.startswith(head + ".") for head in self.head_modules)

    def quantizable_modules(self, towers: Sequence[str]) -> Iterator[tuple[str, nn.Module]]:
        """Every Linear/Conv2d of the given towers, heads excluded, as ``(name inside model, module)``."""
        for qualified_name, module in self.model.named_modules():
            if not isinstance(module, QUANTIZABLE_TYPES) or self._inside_head(qualified_name):
                continue
            if self.tower_of(qualified_name) in towers:
                yield qualified_name, module
