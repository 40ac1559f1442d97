"""NegLabel OOD scorer: ID softmax mass against thousands of mined negative labels.

Jiang, Liu, Wang, Huang, Sun, Bai & Han (2024), "Negative Label Guided OOD Detection with Pretrained
Vision-Language Models", ICLR 2024 (reference code: github.com/XueJiang16/NegLabel). Contract:
``scoring.md`` §1.5.

1. **Lexicon** (:mod:`qbench_plugins.scorers.neglabel_lexicon_io`): WordNet nouns and adjectives. The
   default is qbench's shipped *rebuild* from WordNet 3.0, not the paper's released list (about 1.5 %
   of entries differ); ``--neglabel-lexicon PATH`` or ``--neglabel-wordnet DICT`` replace it.
2. **Mining** (:meth:`NegLabel.prepare`, once per encoder state): for each candidate the η-quantile
   (η = 0.95, linear interpolation as ``torch.quantile``) of its cosines to all ID label embeddings;
   nouns and adjectives are sorted separately, ascending (farthest from ID first), and the first
   ``⌊0.15·n⌋`` of each are kept (or ``m`` in total, split in proportion to the pool sizes).
3. **Grouping**: the last ``M mod ng`` negatives are dropped, the rest permuted with a CPU
   ``torch.Generator`` seeded ``group_seed`` and split into ``ng`` equal groups.
4. **Score** (τ = 0.01 on raw cosines): ``mean_g sigmoid(LSE_k(c_k/τ) − LSE_{j∈G_g}(n_j/τ))``, the
   stable form of ``Σ_k e^{c_k/τ} / (Σ_k e^{c_k/τ} + Σ_{j∈G_g} e^{n_j/τ})``; no negatives ⇒ 1.

Prompts (reference mode): ID labels and nouns ``the nice {}``, adjectives ``This is a {} photo``;
``prompt_mode="ensemble"`` uses the template-ensembled ID classifier instead (``scoring.md`` §1.8).
The reference draws its group permutation on the GPU, so group membership is not bit-identical to
qbench's CPU draw; averaging over 100 groups keeps the difference small.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qbench.errors import QbenchError
from qbench.hookspecs import hookimpl
from qbench.params import require_choice, require_positive
from qbench.scoring import (
    ResourceOption,
    ScoreContext,
    ScoreInputs,
    Scorer,
    ScorerConfig,
    ScorerPlan,
    ScorerResources,
    TextFeatures,
)
from qbench_plugins.scorers.neglabel_lexicon_io import (
    SHIPPED_SOURCE,
    Lexicon,
    load_lexicon,
    parse_wordnet,
    shipped_lexicon,
)

PROMPT_MODES = ("reference", "ensemble")
ID_TEMPLATE = "the nice {}"
NOUN_TEMPLATE = "the nice {}"
ADJECTIVE_TEMPLATE = "This is a {} photo"
ID_SET, NOUN_SET, ADJECTIVE_SET = "neglabel_id", "neglabel_nouns", "neglabel_adjectives"
CHUNK_ROWS = 4096  # rows of candidates / images handled at once, to bound memory
LEXICON_KEY, WORDNET_KEY = "neglabel_lexicon", "neglabel_wordnet"  # the scorer's resources (config keys too)
RESOURCES: tuple[ResourceOption, ...] = (
    ResourceOption(LEXICON_KEY, "path", "NegLabel lexicon: a word-list file or a folder of noun.*/adj.* files.",
                   flag="--neglabel-lexicon"),
    ResourceOption(WORDNET_KEY, "folder", "A WordNet 3.0 dict folder for NegLabel.", flag="--neglabel-wordnet"),
)

REBUILD_NOTE = "WordNet 3.0 rebuild, not the paper's released list (70,794 entries vs the reference's 70,000)"


@dataclass(frozen=True)
class NegLabelConfig(ScorerConfig):
    """The paper's defaults: η-quantile mining keeping 15 % of each pool, 100 groups, τ = 0.01.

    ``m > 0`` keeps ``m`` negatives in total instead of ``neg_frac`` of each pool.
    """

    eta: float = 0.95
    neg_frac: float = 0.15
    m: int = 0
    ngroup: int = 100
    tau: float = 0.01
    group_seed: int = 0
    prompt_mode: str = "reference"


def check_config(config: NegLabelConfig) -> NegLabelConfig:
    """``config`` itself when its values are usable; a one-line :class:`QbenchError` otherwise."""
    if not 0.0 <= config.eta <= 1.0:
        raise QbenchError(f"neglabel.eta must lie in [0, 1], got {config.eta!r}")
    if not 0.0 <= config.neg_frac <= 1.0:
        raise QbenchError(f"neglabel.neg_frac must lie in [0, 1], got {config.neg_frac!r}")
    if config.m < 0:
        raise QbenchError(f"neglabel.m must be >= 0 (0 = use neg_frac), got {config.m!r}")
    if config.ngroup < 1:
        raise QbenchError(f"neglabel.ngroup must be >= 1, got {config.ngroup!r}")
    require_positive(config.tau, "neglabel.tau")
    require_choice(config.prompt_mode, PROMPT_MODES, "neglabel.prompt_mode")
    return config


@dataclass(frozen=True)
class MinedNegatives:
    """What :meth:`NegLabel.prepare` hands to :meth:`NegLabel.score` for one encoder state.

    ``groups`` is ``ng × group size × d`` (group size 0 when nothing is kept); ``noun_indices`` and
    ``adjective_indices`` index the lexicon pools in mined order; ``words`` are the mined words in
    negative-matrix order (nouns then adjectives, before the ``M mod ng`` drop), for provenance.
    """

    id_text: np.ndarray
    groups: np.ndarray
    noun_indices: np.ndarray
    adjective_indices: np.ndarray
    words: tuple[str, ...]
    dropped: int


# ---------------------------------------------------------------- mining


def eta_quantile(candidates: np.ndarray, id_text: np.ndarray, eta: float) -> np.ndarray:
    """Per candidate row, the η-quantile of its cosines to every ID embedding (``torch.quantile``'s linear rule)."""
    candidates = np.asarray(candidates, dtype=np.float64)
    id_text = np.asarray(id_text, dtype=np.float64)
    out = np.empty(len(candidates), dtype=np.float64)
    for start in range(0, len(candidates), CHUNK_ROWS):
        block = candidates[start:start + CHUNK_ROWS] @ id_text.T
        out[start:start + CHUNK_ROWS] = np.quantile(block, eta, axis=1, method="linear")
    return out


def split_counts(n_nouns: int, n_adjectives: int, neg_frac: float, m: int = 0) -> tuple[int, int]:
    """How many nouns and adjectives to keep: ``⌊neg_frac·n⌋`` of each, or ``m`` split by pool size.

    With ``m > 0``: nouns ``round(m·n_nouns/(n_nouns+n_adjectives))`` (Python's ``round``), adjectives the rest.
    """
    if m == 0:
        return math.floor(n_nouns * neg_frac), math.floor(n_adjectives * neg_frac)
    pool = n_nouns + n_adjectives
    if m > pool:
        raise QbenchError(f"neglabel.m = {m} exceeds the lexicon's {pool} candidates; lower m or use a larger lexicon")
    nouns = round(m * n_nouns / pool)
    return nouns, m - nouns


def farthest_first(candidates: np.ndarray, id_text: np.ndarray, eta: float, keep: int) -> np.ndarray:
    """Indices of the ``keep`` candidates with the lowest η-quantile similarity, ascending (stable on ties)."""
    if keep == 0 or len(candidates) == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(eta_quantile(candidates, id_text, eta), kind="stable")
    return order[:keep].astype(np.int64)


def mine_negatives(
    nouns: np.ndarray, adjectives: np.ndarray, id_text: np.ndarray, eta: float, neg_frac: float, m: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Selected noun and adjective indices (``scoring.md`` §1.5 steps 2-3), each in mined order."""
    keep_nouns, keep_adjectives = split_counts(len(nouns), len(adjectives), neg_frac, m)
    return (farthest_first(nouns, id_text, eta, keep_nouns),
            farthest_first(adjectives, id_text, eta, keep_adjectives))


def group_negatives(negatives: np.ndarray, ngroup: int, seed: int = 0) -> tuple[np.ndarray, int]:
    """``(ng × M//ng × d groups, number dropped)``: drop the last ``M mod ng`` rows, permute, split.

    The permutation is ``torch.randperm`` on a CPU ``torch.Generator`` seeded ``seed``; with ``ng = 1``
    nothing is permuted. Group ``g`` holds permuted columns ``g·s … (g+1)·s − 1``, as in the reference.
    """
    negatives = np.asarray(negatives, dtype=np.float64)
    dropped = len(negatives) % ngroup
    kept = negatives[: len(negatives) - dropped]
    if ngroup > 1 and len(kept):
        import torch  # deferred: importing torch is slow and only mining needs it

        order = torch.randperm(len(kept), generator=torch.Generator().manual_seed(seed)).numpy()
        kept = kept[order]
    return kept.reshape(ngroup, len(kept) // ngroup, negatives.shape[1]), dropped


# ---------------------------------------------------------------- scoring


def logsumexp_rows(values: np.ndarray, *, overwrite: bool = False) -> np.ndarray:
    """Stable ``log Σ exp`` over the last axis (max-shifted); ``-inf`` for an empty axis.

    ``overwrite=True`` uses ``values`` (a float64 array the caller owns) as scratch for the shifted exponentials
    instead of allocating two more arrays of its size: the same operations, so the same bits, at about two thirds
    of the time on NegLabel's ``N × 100 × s`` cosines (issue 16).
    """
    if values.shape[-1] == 0:
        return np.full(values.shape[:-1], -np.inf)
    peak = np.max(values, axis=-1, keepdims=True)
    if not overwrite:
        return np.squeeze(peak, -1) + np.log(np.sum(np.exp(values - peak), axis=-1))
    np.subtract(values, peak, out=values)
    np.exp(values, out=values)
    return np.squeeze(peak, -1) + np.log(np.sum(values, axis=-1))


def sigmoid(x: np.ndarray) -> np.ndarray:
    """``1 / (1 + e^{−x})`` without overflow for large ``|x|``; exactly 1 at ``x = +inf``."""
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    positive = x >= 0
    out[positive] = 1.0 / (1.0 + np.exp(-x[positive]))
    shifted = np.exp(x[~positive])
    out[~positive] = shifted / (1.0 + shifted)
    return out


def grouped_score(id_cosines: np.ndarray, neg_cosines: np.ndarray, tau: float, *, overwrite: bool = False) -> np.ndarray:
    """``mean_g sigmoid(LSE_k(c/τ) − LSE_{j∈G_g}(n/τ))`` from cosines ``N × K`` and ``N × ng × s``.

    ``overwrite=True``: ``neg_cosines`` is a float64 array the caller no longer needs, scaled and exponentiated in
    place (same values, no copies of the largest array of a NegLabel score).
    """
    id_mass = logsumexp_rows(np.asarray(id_cosines, dtype=np.float64) / tau)
    if overwrite and isinstance(neg_cosines, np.ndarray) and neg_cosines.dtype == np.float64:
        neg_mass = logsumexp_rows(np.divide(neg_cosines, tau, out=neg_cosines), overwrite=True)
    else:
        neg_mass = logsumexp_rows(np.asarray(neg_cosines, dtype=np.float64) / tau)
    return np.mean(sigmoid(id_mass[:, None] - neg_mass), axis=1)


def neglabel_score(image_feats: np.ndarray, id_text: np.ndarray, groups: np.ndarray, tau: float) -> np.ndarray:
    """NegLabel scores of L2-normalised image features against ID text and grouped negatives (float64).

    The chunk size stays :data:`CHUNK_ROWS`: a matrix product over another number of rows may take another BLAS
    kernel and round differently, and every stored score must stay bit-identical.
    """
    image_feats = np.asarray(image_feats, dtype=np.float64)
    ngroup, size, dim = groups.shape
    flat = np.asarray(groups, dtype=np.float64).reshape(ngroup * size, dim)
    id_text = np.asarray(id_text, dtype=np.float64)
    out = np.empty(len(image_feats), dtype=np.float64)
    for start in range(0, len(image_feats), CHUNK_ROWS):
        block = image_feats[start:start + CHUNK_ROWS]
        neg_cosines = (block @ flat.T).reshape(len(block), ngroup, size)  # a fresh array: scored in place
        out[start:start + CHUNK_ROWS] = grouped_score(block @ id_text.T, neg_cosines, tau, overwrite=True)
    return out


# ---------------------------------------------------------------- the plugin


def resolve_lexicon(resources: ScorerResources) -> Lexicon:
    """The user's lexicon (``--neglabel-lexicon`` or ``--neglabel-wordnet``), else the shipped rebuild."""
    lexicon, wordnet = resources.path(LEXICON_KEY), resources.path(WORDNET_KEY)
    if lexicon is not None and wordnet is not None:
        raise QbenchError(f"give either --neglabel-lexicon or --neglabel-wordnet, not both ({lexicon}, {wordnet})")
    if lexicon is not None:
        return load_lexicon(lexicon)
    if wordnet is not None:
        return parse_wordnet(wordnet)
    return shipped_lexicon()


def lexicon_provenance(lexicon: Lexicon) -> dict[str, object]:
    """Where the words came from, their SHA-256 and counts, and how they relate to the paper's list."""
    if lexicon.source == SHIPPED_SOURCE:
        note = REBUILD_NOTE
    elif lexicon.source.startswith("wordnet"):
        note = "rebuilt from the user's WordNet dict folder, not the paper's released list"
    else:
        note = "user-supplied lexicon"
    return {"lexicon_source": lexicon.source, "lexicon_sha256": lexicon.sha256,
            "lexicon_nouns": len(lexicon.nouns), "lexicon_adjectives": len(lexicon.adjectives),
            "lexicon_note": note}


class NegLabel(Scorer):
    """NegLabel (Jiang et al., ICLR 2024): ID softmax mass against mined negative labels, grouped."""

    name = "neglabel"
    citation = "Jiang et al., ICLR 2024"
    summary = "ID softmax mass vs. negative labels mined from WordNet, averaged over groups"
    Config = NegLabelConfig
    resources = RESOURCES

    def __init__(self, config: NegLabelConfig | None = None) -> None:
        super().__init__(config)
        check_config(self.config)  # type: ignore[arg-type]
        self._lexicons: dict[tuple[Path | None, Path | None], Lexicon] = {}
        self._lexicon: Lexicon | None = None
        self._plans: dict[tuple, ScorerPlan] = {}

    def lexicon(self, resources: ScorerResources) -> Lexicon:
        """The lexicon for ``resources``, read once per scorer instance."""
        key = (resources.path(LEXICON_KEY), resources.path(WORDNET_KEY))
        if key not in self._lexicons:
            self._lexicons[key] = resolve_lexicon(resources)
        return self._lexicons[key]

    def plan(self, context: ScoreContext) -> ScorerPlan:
        """The lexicon's noun and adjective prompts (and the ID prompts in reference mode), built once per lexicon
        and ID label set: a run asks for a plan per OOD target, and formatting and hashing the 70,794 prompts
        each time cost more than scoring the pair (issue 16). The plan does not depend on the target."""
        config: NegLabelConfig = self.config  # type: ignore[assignment]
        lexicon = self.lexicon(context.resources)
        key = (context.resources.path(LEXICON_KEY), context.resources.path(WORDNET_KEY), tuple(context.id_classnames))
        if key not in self._plans:
            self._plans[key] = self._build_plan(context, lexicon)
        self._lexicon = lexicon
        return self._plans[key]

    def _build_plan(self, context: ScoreContext, lexicon: Lexicon) -> ScorerPlan:
        """:meth:`plan` for one lexicon and ID label set."""
        config: NegLabelConfig = self.config  # type: ignore[assignment]
        keep = split_counts(len(lexicon.nouns), len(lexicon.adjectives), config.neg_frac, config.m)
        total = sum(keep)
        if 0 < total < config.ngroup:
            raise QbenchError(f"neglabel keeps only {total} negatives for ngroup={config.ngroup} groups; "
                              "lower neglabel.ngroup or raise neglabel.neg_frac / neglabel.m")
        sets = {NOUN_SET: tuple(NOUN_TEMPLATE.format(word) for word in lexicon.nouns),
                ADJECTIVE_SET: tuple(ADJECTIVE_TEMPLATE.format(word) for word in lexicon.adjectives)}
        if config.prompt_mode == "reference":
            sets[ID_SET] = tuple(ID_TEMPLATE.format(name) for name in context.id_classnames)
        provenance = {
            **lexicon_provenance(lexicon),
            "id_text": ID_TEMPLATE if config.prompt_mode == "reference" else "ensemble classifier",
            "noun_prompt": NOUN_TEMPLATE, "adjective_prompt": ADJECTIVE_TEMPLATE,
            "negatives_kept": {"nouns": keep[0], "adjectives": keep[1], "dropped_for_grouping": total % config.ngroup},
            "grouping": f"CPU torch.randperm seeded {config.group_seed}; the reference draws its permutation on "
                        "the GPU, so group membership is not bit-identical to it (scoring.md 1.5)",
        }
        return ScorerPlan(text_sets=sets, provenance=provenance)

    def prepare(self, text: TextFeatures) -> MinedNegatives:
        """Mine this state's negatives from its own text embeddings and group them."""
        config: NegLabelConfig = self.config  # type: ignore[assignment]
        if config.prompt_mode == "reference":
            id_text = self._text_set(text, ID_SET)
        else:
            id_text = np.asarray(text.id_text, dtype=np.float64)
        nouns, adjectives = self._text_set(text, NOUN_SET, id_text), self._text_set(text, ADJECTIVE_SET, id_text)
        self._check_sizes(len(nouns), len(adjectives))
        noun_idx, adj_idx = mine_negatives(nouns, adjectives, id_text, config.eta, config.neg_frac, config.m)
        negatives = np.concatenate([nouns[noun_idx], adjectives[adj_idx]])
        groups, dropped = group_negatives(negatives, config.ngroup, config.group_seed)
        return MinedNegatives(id_text=id_text, groups=groups, noun_indices=noun_idx, adjective_indices=adj_idx,
                              words=self._mined_words(noun_idx, adj_idx), dropped=dropped)

    def score(self, inputs: ScoreInputs, prepared: MinedNegatives | None = None) -> np.ndarray:
        if not isinstance(prepared, MinedNegatives):
            raise QbenchError("neglabel.score needs the negatives from neglabel.prepare (was prepare run?)")
        tau = self.config.tau  # type: ignore[attr-defined]
        return neglabel_score(inputs.image_feats, prepared.id_text, prepared.groups, tau)

    def _text_set(self, text: TextFeatures, key: str, like: np.ndarray | None = None) -> np.ndarray:
        """Encoded prompt set ``key``; an empty set (which encoders may leave out) as a ``0 × d`` array."""
        if key in text.sets:
            return np.asarray(text.sets[key], dtype=np.float64)
        expected = self._expected_size(key)
        if expected == 0 and like is not None:
            return np.zeros((0, like.shape[1]), dtype=np.float64)
        raise QbenchError(f"neglabel needs the text set {key!r}, which was not encoded (was neglabel.plan run?)")

    def _check_sizes(self, n_nouns: int, n_adjectives: int) -> None:
        """The encoded sets must match the planned lexicon, or mined indices would name the wrong words."""
        if self._lexicon is None:
            return
        planned = (len(self._lexicon.nouns), len(self._lexicon.adjectives))
        if (n_nouns, n_adjectives) != planned:
            raise QbenchError(f"neglabel text sets hold {n_nouns} nouns and {n_adjectives} adjectives but the "
                              f"planned lexicon has {planned[0]} and {planned[1]}; re-run neglabel.plan")

    def _expected_size(self, key: str) -> int | None:
        if self._lexicon is None:
            return None
        return {NOUN_SET: len(self._lexicon.nouns), ADJECTIVE_SET: len(self._lexicon.adjectives)}.get(key)

    def _mined_words(self, noun_idx: np.ndarray, adj_idx: np.ndarray) -> tuple[str, ...]:
        """The mined words in negative-matrix order; empty when ``prepare`` ran without ``plan``."""
        if self._lexicon is None:
            return ()
        return (tuple(self._lexicon.nouns[i] for i in noun_idx)
                + tuple(self._lexicon.adjectives[i] for i in adj_idx))


@hookimpl
def qbench_register_scorers() -> list[type[Scorer]]:
    return [NegLabel]
