"""Offline data for tests and conformance checks: calibration batches and a constructed scorer case.

Calibration (:class:`~qbench.quant.base.CalibrationData`, what a quantizer receives):

* :func:`proxy_batch` — ``n`` random images and captions of random words (no files, no registry);
* :func:`calibration_from_proxy` — a window of a registered proxy source, preprocessed and tokenized for the
  model under test exactly as an evaluation prepares it.

Scorers (:class:`ScorerCase`, built by :func:`scorer_case`): a feature space where the right answer is known.
ID class ``k``'s text embedding is the basis vector ``e_k``; every prompt that names no ID class is encoded by
:class:`HashTextEncoder` to a deterministic direction in the complement of the ID span; ID images sit next to
their class embedding (cosine ``id_cosine``) and OOD images lie in the complement, orthogonal to every ID class.
So an ID image is confidently matched to one ID class and an OOD image to none: softmax-, energy- and
entropy-style scores are high on ID and flat on OOD, and scores that compare ID classes against extra prompt
sets (negative labels, generic or outlier-label prompts, all in the complement) see OOD images close to
those prompts and ID images far from them. Every OOD score built on "higher = more in-distribution" ranks ID
above OOD here, which is what :func:`qbench.testing.conformance.check_scorer` asserts.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:  # torch is imported when a batch is built, never when this module is imported
    from qbench.data import ProxySpec
    from qbench.model import VLM
    from qbench.quant.base import CalibrationData
    from qbench.scoring import ScoreContext, ScoreInputs, ScorerPlan, TextFeatures

CAPTION_WORDS = ("red", "blue", "circle", "square", "a", "photo", "of", "small", "big", "star")


def proxy_batch(vlm: "VLM", n: int = 16, seed: int = 1) -> "CalibrationData":
    """``n`` random ``3 x 32 x 32`` images and 5-word captions as calibration data (never evaluation data).

    Deterministic in ``seed`` (a private ``torch.Generator``); the captions are tokenized by ``vlm``.
    """
    import torch

    from qbench.quant.base import CalibrationData

    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=generator)
    captions = tuple(
        " ".join(CAPTION_WORDS[int(i)] for i in torch.randint(0, len(CAPTION_WORDS), (5,), generator=generator))
        for _ in range(n)
    )
    return CalibrationData(source="tiny-random", images=images, tokens=vlm.tokenize(captions),
                           captions=captions, fingerprint=f"tiny-{n}-{seed}")


def calibration_from_proxy(vlm: "VLM", proxy: "ProxySpec", n: int = 16, seed: int = 0,
                           data_root: str | None = None) -> "CalibrationData":
    """Pairs ``[seed*n, (seed+1)*n)`` of a registered proxy source, preprocessed with ``vlm.preprocess`` and
    tokenized with ``vlm.tokenize``: the calibration data an evaluation of ``vlm`` would hand a quantizer.

    A source that gives fewer than ``n`` pairs is a one-line error (as in an evaluation).
    """
    import torch

    from qbench.data import DatasetRequest
    from qbench.errors import QbenchError
    from qbench.quant.base import CalibrationData

    pairs = proxy.loader(DatasetRequest(data_root=data_root, seed=seed), n)
    if len(pairs.images) < n:
        raise QbenchError(f"proxy {proxy.name!r} gave only {len(pairs.images)} pairs, {n} requested; ask for fewer")
    if vlm.preprocess is None:
        raise QbenchError(f"model {vlm.name!r} has no preprocessing transform; build it with one to read a proxy")
    images = torch.stack([vlm.preprocess(image) for image in pairs.images[:n]])
    captions = tuple(pairs.captions[:n])
    return CalibrationData(source=pairs.source, images=images, tokens=vlm.tokenize(captions), captions=captions,
                           fingerprint=pairs.fingerprint)


# -- the constructed scorer case --------------------------------------------------------------------------
class HashTextEncoder:
    """A deterministic text "encoder" over ``dim`` dimensions whose first ``len(classnames)`` are the ID span.

    A prompt naming ID classes (whole words, case-insensitive; longer names first) encodes to the normalised
    sum of their basis vectors ``e_k``; any other prompt to a unit vector in the complement of the ID span,
    drawn from the BLAKE2b digest of its text, so the same prompt always gets the same embedding and two
    different prompts almost surely different ones. Each prompt list is encoded once per encoder (cached), so
    lexicons of ~10^5 prompts cost well under a second.
    """

    def __init__(self, classnames: Sequence[str], dim: int) -> None:
        """ID classes span the first ``len(classnames)`` of ``dim`` dimensions; the rest hold every other prompt."""
        if dim <= len(classnames):
            raise ValueError(f"dim {dim} leaves no room outside the {len(classnames)} ID directions")
        self.classnames = tuple(classnames)
        self.dim = dim
        self.extra = dim - len(self.classnames)
        ordered = sorted(range(len(self.classnames)), key=lambda k: -len(self.classnames[k]))
        self._index = {self.classnames[k].lower(): k for k in ordered}
        alternatives = "|".join(re.escape(self.classnames[k].lower()) for k in ordered)
        self._pattern = re.compile(rf"(?<![a-z0-9])(?:{alternatives})(?![a-z0-9])")
        self._cache: dict[tuple[str, ...], np.ndarray] = {}

    def encode(self, prompts: Sequence[str]) -> np.ndarray:
        """``len(prompts) x dim`` float64 embeddings, every row of unit length (a fresh array per call)."""
        key = tuple(str(prompt) for prompt in prompts)
        if key not in self._cache:
            self._cache[key] = self._encode(key)
        return self._cache[key].copy()

    def _encode(self, prompts: tuple[str, ...]) -> np.ndarray:
        """Encode without the cache: class rows first, then every other prompt's digest in one buffer."""
        out = np.zeros((len(prompts), self.dim), dtype=np.float64)
        hashed = []
        for row, prompt in enumerate(prompts):
            classes = {self._index[match] for match in self._pattern.findall(prompt.lower())}
            if classes:
                out[row, sorted(classes)] = 1.0
            else:
                hashed.append(row)
        if hashed:
            digests = b"".join(hashlib.blake2b(prompts[row].encode("utf-8"), digest_size=2 * self.extra).digest()
                               for row in hashed)
            values = np.frombuffer(digests, dtype="<u2").astype(np.float64).reshape(len(hashed), self.extra)
            values = values / 32767.5 - 1.0
            values[~values.any(axis=1)] = 1.0  # an all-zero digest (never seen in practice) still gets a direction
            out[hashed, len(self.classnames):] = values
        return out / np.linalg.norm(out, axis=1, keepdims=True)


@dataclass(frozen=True)
class ScorerCase:
    """ID and OOD image features, the ID label set and a text encoder, as a scorer sees them in a run.

    ``id_feats`` (``N_id x d``) and ``ood_feats`` (``N_ood x d``) are unit rows; ``id_labels`` the class of each
    ID image; logits are ``logit_scale * feats @ id_text.T`` as the engine computes them.
    """

    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    encoder: HashTextEncoder
    id_feats: np.ndarray
    id_labels: np.ndarray
    ood_feats: np.ndarray
    logit_scale: float = 100.0
    description: str = field(default="", compare=False)

    @property
    def id_text(self) -> np.ndarray:
        """The template-ensembled ID classifier ``K x d``: each class's prompts encoded, averaged, normalised."""
        rows = [self.encoder.encode([template.format(name) for template in self.templates]).mean(axis=0)
                for name in self.classnames]
        head = np.stack(rows)
        return head / np.linalg.norm(head, axis=1, keepdims=True)

    def context(self, base: "ScoreContext | None" = None) -> "ScoreContext":
        """``base`` (resources, OOD kind, seed, ...) with this case's suite, ID dataset, classes and templates."""
        import dataclasses

        from qbench.scoring import ScoreContext

        fields = {"suite": "qbench-conformance", "id_dataset": "qbench-conformance-id",
                  "id_classnames": self.classnames, "id_templates": self.templates}
        return dataclasses.replace(base, **fields) if base is not None else ScoreContext(**fields)

    def text_features(self, plan: "ScorerPlan") -> "TextFeatures":
        """The classifier and every prompt set ``plan`` requested, encoded once (``0 x d`` for an empty set)."""
        from qbench.scoring import TextFeatures

        sets = {key: self.encoder.encode(tuple(prompts)) if len(prompts) else np.zeros((0, self.encoder.dim))
                for key, prompts in plan.text_sets.items()}
        return TextFeatures(id_text=self.id_text, logit_scale=self.logit_scale, sets=sets)

    def inputs(self, feats: np.ndarray, text: "TextFeatures") -> "ScoreInputs":
        """Score inputs for ``feats`` as the engine builds them from cached features."""
        from qbench.scoring import ScoreInputs

        feats = np.array(feats, dtype=np.float64)  # a private copy: a scorer cannot change the case
        return ScoreInputs(logits=self.logit_scale * feats @ text.id_text.T, image_feats=feats, text=text)


DEFAULT_CLASSNAMES = ("apple", "bicycle", "cloud", "dolphin")
DEFAULT_TEMPLATES = ("a photo of a {}.", "a drawing of the {}.")


def scorer_case(classnames: Sequence[str] = DEFAULT_CLASSNAMES, templates: Sequence[str] = DEFAULT_TEMPLATES,
                per_class: int = 6, n_ood: int = 24, extra_dims: int = 12, id_cosine: float = 0.95,
                seed: int = 0) -> ScorerCase:
    """The constructed case of this module's docstring: ``per_class`` ID images per class at cosine
    ``id_cosine`` to their class embedding (the rest of their length in a random complement direction) and
    ``n_ood`` OOD images uniformly on the unit sphere of the complement. Deterministic in ``seed``."""
    classnames = tuple(classnames)
    k = len(classnames)
    encoder = HashTextEncoder(classnames, k + extra_dims)
    rng = np.random.default_rng(seed)

    def complement(n: int) -> np.ndarray:
        """``n`` random unit rows with zero ID components (uniform on the complement's unit sphere)."""
        rows = np.zeros((n, k + extra_dims))
        rows[:, k:] = rng.normal(size=(n, extra_dims))
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)

    labels = np.repeat(np.arange(k), per_class)
    id_feats = id_cosine * np.eye(k, k + extra_dims)[labels] + np.sqrt(1 - id_cosine**2) * complement(len(labels))
    ood_feats = complement(n_ood)
    description = (f"{k} ID classes, {len(labels)} ID images at cosine {id_cosine} to their class text embedding, "
                   f"{n_ood} OOD images orthogonal to every ID class embedding")
    return ScorerCase(classnames, tuple(templates), encoder, id_feats, labels, ood_feats, description=description)
