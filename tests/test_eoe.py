"""EOE: label files, post-processing, the scorer's §1.6 properties, prompts, replies, local generation."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from qbench.errors import QbenchError
from qbench.plugins import get_plugin_manager
from qbench.registry import build_registry
from qbench.scoring import ScoreContext, ScoreInputs, ScorerResources, ScorerSkipped, TextFeatures
from qbench_plugins.scorers import eoe_envision as envision
from qbench_plugins.scorers.eoe import EOEConfig, EnvisionedOutlierExposure, eoe_score
from qbench_plugins.toyworld import envisioned, world

ID = ("circle", "square", "star")
DIM = 8


# -- helpers ------------------------------------------------------------------------------------------
def context(tmp_path: Path | None = None, *, labels: Path | None = None, labels_dir: Path | None = None,
            builtin: Path | None = None, kind: str = "far", classnames=ID) -> ScoreContext:
    resources = ScorerResources(eoe_labels=labels, labels_dir=labels_dir)
    return ScoreContext(suite="toy-ood", id_dataset="toy-id-test", id_classnames=tuple(classnames),
                        id_templates=("a photo of a {}.",), ood_kind=kind, resources=resources,
                        dataset_resources={"eoe_labels": builtin} if builtin is not None else {})


def embed(prompt: str) -> np.ndarray:
    """A deterministic stand-in text tower: a unit vector seeded by the prompt's hash."""
    seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little")
    vector = np.random.default_rng(seed).normal(size=DIM)
    return vector / np.linalg.norm(vector)


def encode(plan, classnames=ID) -> TextFeatures:
    """Text features as the pipeline would build them from a plan (ensemble classifier = hashed names)."""
    sets = {key: np.array([embed(p) for p in prompts]).reshape(len(prompts), DIM) for key, prompts in plan.text_sets.items()}
    return TextFeatures(id_text=np.array([embed(f"ensemble {name}") for name in classnames]), logit_scale=100.0, sets=sets)


def images(n: int = 64, seed: int = 0) -> np.ndarray:
    feats = np.random.default_rng(seed).normal(size=(n, DIM))
    return feats / np.linalg.norm(feats, axis=1, keepdims=True)


def run_scorer(scorer: EnvisionedOutlierExposure, ctx: ScoreContext, feats: np.ndarray) -> np.ndarray:
    text = encode(scorer.plan(ctx), ctx.id_classnames)
    inputs = ScoreInputs(logits=np.zeros((len(feats), len(ctx.id_classnames))), image_feats=feats, text=text)
    return scorer.score(inputs, scorer.prepare(text))


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def write_json(path: Path, payload: dict) -> Path:
    path.write_text(json.dumps(payload), encoding="utf-8")
    return path


# -- score properties (§1.6) --------------------------------------------------------------------------
def test_no_outliers_equals_mcm():
    rng = np.random.default_rng(1)
    id_cos = rng.uniform(-1, 1, size=(50, 7))
    for temperature in (1.0, 0.1):
        mcm = softmax(id_cos / temperature).max(axis=1)
        got = eoe_score(id_cos, np.zeros((50, 0)), beta=0.25, temperature=temperature)
        np.testing.assert_allclose(got, mcm, rtol=0, atol=1e-15)


def test_scorer_with_every_label_removed_equals_mcm(tmp_path):
    labels = write_json(tmp_path / "l.json", {"far": ["Circle", " square ", "STAR"]})
    scorer, ctx, feats = EnvisionedOutlierExposure(), context(labels=labels), images()
    assert scorer.plan(ctx).text_sets["eoe_outliers"] == ()
    id_text = np.array([embed(f"a photo of a {name}") for name in ID])
    np.testing.assert_allclose(run_scorer(scorer, ctx, feats), softmax(feats @ id_text.T).max(axis=1), atol=1e-15)


def test_beta_zero_is_max_id_probability_of_the_extended_softmax():
    rng = np.random.default_rng(2)
    id_cos, out_cos = rng.uniform(-1, 1, (40, 5)), rng.uniform(-1, 1, (40, 9))
    q = softmax(np.concatenate([id_cos, out_cos], axis=1) / 0.5)
    np.testing.assert_allclose(eoe_score(id_cos, out_cos, beta=0.0, temperature=0.5), q[:, :5].max(axis=1), atol=1e-15)
    full = eoe_score(id_cos, out_cos, beta=0.25, temperature=0.5)
    np.testing.assert_allclose(full, q[:, :5].max(axis=1) - 0.25 * q[:, 5:].max(axis=1), atol=1e-15)


@pytest.mark.parametrize("beta", [0.0, 0.25, 1.0])
def test_range_is_minus_beta_to_one(beta):
    rng = np.random.default_rng(3)
    id_cos, out_cos = rng.uniform(-1, 1, (500, 4)), rng.uniform(-1, 1, (500, 30))
    extreme_id = np.array([[1.0, -1.0, -1.0, -1.0]]), np.full((1, 30), -1.0)
    extreme_out = np.full((1, 4), -1.0), np.array([[1.0] + [-1.0] * 29])
    for temperature in (1.0, 0.01):
        for ids, outs in ((id_cos, out_cos), extreme_id, extreme_out):
            scores = eoe_score(ids, outs, beta=beta, temperature=temperature)
            assert np.all(scores >= -beta - 1e-12) and np.all(scores <= 1.0 + 1e-12)
    assert eoe_score(*extreme_id, beta=beta, temperature=0.01)[0] > 0.99  # one ID label dominates
    assert eoe_score(*extreme_out, beta=beta, temperature=0.01)[0] < -beta + 0.01 + 1e-12  # one outlier dominates


def test_raising_an_outlier_cosine_lowers_the_score():
    id_cos = np.array([[0.3, 0.1]])
    low, high = eoe_score(id_cos, np.array([[0.0, 0.1]])), eoe_score(id_cos, np.array([[0.0, 0.4]]))
    assert high[0] < low[0]


def test_direction_id_like_images_outrank_outlier_like_images(tmp_path):
    labels = write_json(tmp_path / "l.json", {"far": ["kite", "wheel"]})
    scorer, ctx = EnvisionedOutlierExposure(EOEConfig(temperature=0.05)), context(labels=labels)
    id_like = np.array([embed("a photo of a circle"), embed("a photo of a star")])
    ood_like = np.array([embed("a photo of a kite"), embed("a photo of a wheel")])
    scores = run_scorer(scorer, ctx, np.concatenate([id_like, ood_like]))
    assert scores[:2].min() > scores[2:].max()


def test_duplicates_and_case_variants_do_not_change_the_score(tmp_path):
    clean = write_json(tmp_path / "clean.json", {"far": ["kite", "paper clip", "wheel"]})
    noisy = tmp_path / "noisy.txt"
    noisy.write_text("Wheel\n  KITE \n# a comment\n\nkite\nPaper Clip\nwheel\n", encoding="utf-8")
    feats = images()
    scores_clean = run_scorer(EnvisionedOutlierExposure(), context(labels=clean), feats)
    scores_noisy = run_scorer(EnvisionedOutlierExposure(), context(labels=noisy), feats)
    assert np.array_equal(scores_clean, scores_noisy)
    assert EnvisionedOutlierExposure().plan(context(labels=noisy)).text_sets["eoe_outliers"] == (
        "a photo of a kite", "a photo of a paper clip", "a photo of a wheel")


def test_scores_are_float64_and_deterministic(tmp_path):
    labels = write_json(tmp_path / "l.json", {"far": ["kite", "wheel", "moon"]})
    first = run_scorer(EnvisionedOutlierExposure(), context(labels=labels), images())
    second = run_scorer(EnvisionedOutlierExposure(), context(labels=labels), images())
    assert first.dtype == np.float64 and first.shape == (64,) and np.array_equal(first, second)


# -- post-processing ----------------------------------------------------------------------------------
def test_outlier_equal_to_an_id_label_is_removed_case_insensitively():
    assert envision.postprocess(["CIRCLE", " Star ", "kite"], ID, "far") == ("kite",)


def test_near_ood_drops_labels_sharing_a_word_with_an_id_label():
    labels = ["red circle", "square root", "circlet", "oval", "Star Fruit", "shooting-star"]
    assert envision.postprocess(labels, ID, "near") == ("circlet", "oval", "shooting-star")
    assert envision.postprocess(labels, ID, "far") == (
        "circlet", "oval", "red circle", "shooting-star", "square root", "star fruit")


def test_postprocess_sorts_dedupes_and_rejects_unknown_kinds():
    assert envision.postprocess(["b", "A", "a ", "", "  "], ("x",), "far") == ("a", "b")
    with pytest.raises(QbenchError, match="unknown OOD kind"):
        envision.postprocess(["a"], ID, "fine")


# -- label files ----------------------------------------------------------------------------------------
def test_json_values_are_concatenated_and_provenance_is_ignored(tmp_path):
    path = write_json(tmp_path / "labels.json", {"_provenance": {"source": "me"}, "circle": ["oval", "disc"], "far": ["kite"]})
    assert envision.load_labels(path) == ["oval", "disc", "kite"]
    assert envision.load_provenance(path) == {"source": "me"}


def test_text_file_skips_comments_and_blank_lines(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("# envisioned for toy\noval\n\n   \n  # indented comment\n disc \n", encoding="utf-8")
    assert envision.load_labels(path) == ["oval", "disc"]
    assert envision.load_provenance(path) == {}


def test_json_content_is_recognised_without_a_json_suffix(tmp_path):
    path = write_json(tmp_path / "labels.lst", {"far": ["kite"]})
    assert envision.load_labels(path) == ["kite"]


@pytest.mark.parametrize("payload, message", [
    ("[1, 2]", "JSON object"), ('{"far": "kite"}', "list of strings"), ('{"far": [1]}', "list of strings"),
    ("{not json", "not valid JSON"),
])
def test_malformed_json_is_a_one_line_error(tmp_path, payload, message):
    path = tmp_path / "bad.json"
    path.write_text(payload, encoding="utf-8")
    with pytest.raises(QbenchError, match=message) as caught:
        envision.load_labels(path)
    assert "\n" not in str(caught.value)


def test_write_label_file_round_trips(tmp_path):
    path = envision.write_label_file(tmp_path / "sub" / "x.json", {"far": ["kite", "moon"]}, {"source": "test"})
    assert envision.load_labels(path) == ["kite", "moon"]
    assert envision.load_provenance(path) == {"source": "test"}
    assert next(iter(json.loads(path.read_text()))) == "_provenance"
    with pytest.raises(QbenchError, match="reserved"):
        envision.write_label_file(tmp_path / "y.json", {"_provenance": ["a"]}, {})


# -- locating the file, skipping, provenance --------------------------------------------------------
def test_missing_label_file_skips_the_scorer():
    with pytest.raises(ScorerSkipped) as caught:
        EnvisionedOutlierExposure().plan(context())
    assert str(caught.value) == "no envisioned labels for toy-ood; pass --eoe-labels FILE or run 'qbench envision'"


def test_labels_dir_without_a_file_also_skips(tmp_path):
    with pytest.raises(ScorerSkipped):
        EnvisionedOutlierExposure().plan(context(labels_dir=tmp_path))
    path, searched = envision.find_label_file(context(labels_dir=tmp_path))
    assert path is None and str(tmp_path / "eoe") in searched


def test_explicit_missing_file_is_an_error(tmp_path):
    with pytest.raises(QbenchError, match="no such file"):
        EnvisionedOutlierExposure().plan(context(labels=tmp_path / "nope.json"))


def test_file_search_order(tmp_path):
    folder = tmp_path / "labels" / "eoe"
    folder.mkdir(parents=True)
    (folder / "toy-ood.txt").write_text("moon\n", encoding="utf-8")
    builtin = write_json(tmp_path / "builtin.json", {"far": ["kite"]})
    user = write_json(tmp_path / "user.json", {"far": ["wheel"]})
    assert envision.find_label_file(context(labels_dir=tmp_path / "labels", builtin=builtin))[0] == folder / "toy-ood.txt"
    write_json(folder / "toy-ood.json", {"far": ["leaf"]})
    assert envision.find_label_file(context(labels_dir=tmp_path / "labels", builtin=builtin))[0] == folder / "toy-ood.json"
    assert envision.find_label_file(context(labels=user, labels_dir=tmp_path / "labels", builtin=builtin))[0] == user
    assert envision.find_label_file(context(builtin=builtin))[0] == builtin


def test_plan_records_file_hash_count_and_source(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("kite\nKite\ncircle\nmoon\n", encoding="utf-8")
    plan = EnvisionedOutlierExposure().plan(context(labels=path))
    prov = plan.provenance
    assert prov["labels_file"] == str(path)
    assert prov["labels_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (prov["count"], prov["count_in_file"]) == (2, 4)
    assert "--eoe-labels" in prov["source"] and "Cao" in prov["citation"]
    assert plan.text_sets["eoe_id"] == ("a photo of a circle", "a photo of a square", "a photo of a star")


def test_changing_the_label_file_changes_the_plan_fingerprint(tmp_path):
    first = write_json(tmp_path / "a.json", {"far": ["kite"]})
    second = write_json(tmp_path / "b.json", {"far": ["kite", "moon"]})
    scorer = EnvisionedOutlierExposure()
    assert scorer.plan(context(labels=first)).fingerprint() != scorer.plan(context(labels=second)).fingerprint()


# -- prefilter and prompt modes --------------------------------------------------------------------------
def test_prefilter_drops_outliers_too_close_to_an_id_label():
    id_text = np.eye(DIM)[:2]
    close = np.array([0.9, np.sqrt(1 - 0.81)] + [0.0] * (DIM - 2))  # cosine 0.9 with ID row 0
    far_away = np.eye(DIM)[5]
    text = TextFeatures(id_text=id_text, logit_scale=1.0, sets={"eoe_id": id_text, "eoe_outliers": np.array([close, far_away])})
    kept = EnvisionedOutlierExposure(EOEConfig(prefilter=0.85)).prepare(text)
    assert kept.outliers.shape == (1, DIM) and np.array_equal(kept.outliers[0], far_away) and kept.prefiltered == 1
    assert EnvisionedOutlierExposure().prepare(text).outliers.shape == (2, DIM)  # 1.0 = off
    empty = TextFeatures(id_text=id_text, logit_scale=1.0, sets={"eoe_id": id_text, "eoe_outliers": np.array([])})
    assert EnvisionedOutlierExposure(EOEConfig(prefilter=0.5)).prepare(empty).outliers.shape == (0, DIM)


def test_ensemble_mode_uses_the_id_classifier(tmp_path):
    labels = write_json(tmp_path / "l.json", {"far": ["kite"]})
    scorer, ctx, feats = EnvisionedOutlierExposure(EOEConfig(prompt_mode="ensemble")), context(labels=labels), images()
    plan = scorer.plan(ctx)
    assert set(plan.text_sets) == {"eoe_outliers"}
    text = encode(plan)
    expected = eoe_score(feats @ text.id_text.T, feats @ text.sets["eoe_outliers"].T)
    inputs = ScoreInputs(logits=np.zeros((len(feats), 3)), image_feats=feats, text=text)
    np.testing.assert_allclose(scorer.score(inputs), expected, atol=1e-15)


@pytest.mark.parametrize("params, message", [
    ({"beta": "-1"}, "beta"), ({"temperature": "0"}, "temperature"), ({"prefilter": "1.5"}, "prefilter"),
    ({"prompt_mode": "fancy"}, "prompt_mode"),
])
def test_bad_parameters_are_one_line_errors(params, message):
    with pytest.raises(QbenchError, match=message):
        EnvisionedOutlierExposure.from_params(params)


def test_eoe_is_registered_with_paper_defaults():
    registry = build_registry(get_plugin_manager(load_entrypoints=False))
    scorer_class = registry.get("scorers", "eoe")
    assert scorer_class is EnvisionedOutlierExposure
    assert scorer_class.defaults() == {"beta": 0.25, "temperature": 1.0, "prefilter": 1.0, "prompt_mode": "reference"}


# -- prompts and replies -----------------------------------------------------------------------------------
@pytest.mark.parametrize("task", envision.TASKS)
def test_prompt_names_every_class_and_asks_for_bullets(task):
    names = world.ID_CLASSES
    prompt = envision.envision_prompt(names, task)
    assert all(name in prompt for name in names)
    assert "'- name'" in prompt and str(envision.PER_ROUND[task]) in prompt


def test_prompt_rejects_unknown_tasks_and_empty_class_lists():
    with pytest.raises(QbenchError, match="unknown envision task"):
        envision.envision_prompt(ID, "medium")
    with pytest.raises(QbenchError, match="at least one"):
        envision.envision_prompt((), "far")


def test_parse_reply_reads_bullets_only():
    reply = (
        "Broad categories: shapes, symbols\n"
        "Here are some classes:\n"
        "- Kite\n"
        "* **Paper clip**\n"
        "  - wheel: round and rolls\n"
        "3. moon.\n"
        "• traffic cone - orange\n"
        "-\n"
        "not a bullet\n"
    )
    assert envision.parse_reply(reply) == ["Kite", "Paper clip", "wheel", "moon", "traffic cone"]


def test_reply_to_layout_groups_near_replies_by_class():
    reply = "Circle:\n- oval\n- disc\n## Star\n- sparkle\n"
    assert envision.reply_to_layout(reply, ID, "near") == {"circle": ["oval", "disc"], "star": ["sparkle"]}
    assert envision.reply_to_layout("- kite\n- moon\n", ID, "far") == {"far": ["kite", "moon"]}


# -- generation with a local LLM ---------------------------------------------------------------------------
def test_collect_labels_repeats_until_enough_and_skips_repeats_and_id_labels():
    replies = ["- Kite\n- circle\n- moon", "- kite\n- wheel", "- leaf\n- tile\n- cup"]
    asked: list[int] = []

    def ask(prompt: str, round_index: int) -> str:
        asked.append(round_index)
        return replies[round_index]

    labels, rounds = envision.collect_labels(ask, "p", 4, ID, max_rounds=10)
    assert labels == ["kite", "moon", "wheel", "leaf"] and rounds == 3 and asked == [0, 1, 2]
    labels, rounds = envision.collect_labels(lambda p, r: "- kite", "p", 5, ID, max_rounds=4)
    assert labels == ["kite"] and rounds == 4


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory) -> Path:
    """A randomly initialised one-layer GPT-2 with a word-level tokenizer, saved to a local folder."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = ["[UNK]", "[EOS]", "\n", "-", "kite", "moon", "wheel", "leaf", "tile", "cup", "red", "blue"]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[EOS]", pad_token="[EOS]")
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=256, vocab_size=len(words),
                        bos_token_id=1, eos_token_id=1, pad_token_id=1)
    folder = tmp_path_factory.mktemp("tiny-llm")
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_generate_labels_runs_offline_from_a_local_folder(tiny_llm):
    result = envision.generate_labels(tiny_llm, ID, "far", n=4, seed=0, max_rounds=3, max_new_tokens=24)
    labels, provenance = result
    assert isinstance(labels, list) and labels and all(isinstance(label, str) and label == label.lower().strip() for label in labels)
    assert len(labels) <= 4 and len(set(labels)) == len(labels) and not set(labels) & set(ID)
    assert list(result.labels_by_key) == ["far"]
    assert provenance["source"] == "generated by local LLM"
    assert provenance["model"] == str(tiny_llm.resolve()) and provenance["task"] == "far"
    assert provenance["prompts"]["far"] == envision.envision_prompt(ID, "far", 4) and provenance["date"]
    assert 1 <= provenance["rounds"]["far"] <= 3
    again = envision.generate_labels(tiny_llm, ID, "far", n=4, seed=0, max_rounds=3, max_new_tokens=24)
    assert again.labels_by_key == result.labels_by_key  # seeded sampling is reproducible


def test_generate_labels_near_asks_per_class_and_writes_a_readable_file(tiny_llm, tmp_path):
    result = envision.generate_labels(tiny_llm, ID[:2], "near", n=2, seed=1, max_rounds=2, max_new_tokens=16, greedy=True)
    assert list(result.labels_by_key) == ["circle", "square"]
    assert set(result.provenance["rounds"].values()) == {1}  # greedy: one round, repeats cannot add labels
    path = envision.write_label_file(tmp_path / "eoe" / "toy-ood.json", result.labels_by_key, result.provenance)
    assert envision.load_labels(path) == result.labels
    assert envision.load_provenance(path)["source"] == "generated by local LLM"


@pytest.mark.parametrize("missing", ["DIR/absent", "nobody-qbench-test/absent-model"])
def test_missing_local_model_is_a_one_line_error(tmp_path, missing):
    target = missing.replace("DIR", str(tmp_path))
    with pytest.raises(QbenchError) as caught:
        envision.generate_labels(target, ID, "far", n=2)
    message = str(caught.value)
    assert "\n" not in message and target in message and "--eoe-llm" in message


# -- the toy world's shipped labels ------------------------------------------------------------------------
def test_toy_labels_never_name_a_held_out_class():
    labels = {label.lower() for label in envision.load_labels(envisioned.EOE_LABELS)}
    held_out = {name.lower() for name in world.NEAR_OOD_CLASSES + world.FAR_OOD_KINDS}
    assert not labels & held_out
    assert not labels & {name.lower() for name in world.ID_CLASSES}


def test_toy_labels_layout_and_post_processing():
    layout = json.loads(envisioned.EOE_LABELS.read_text())
    assert [key for key in layout if key in world.ID_CLASSES] == list(world.ID_CLASSES)
    assert all(len(layout[name]) == 3 for name in world.ID_CLASSES) and len(layout["far"]) == 50
    raw = envision.load_labels(envisioned.EOE_LABELS)
    assert len(envision.postprocess(raw, world.ID_CLASSES, "near")) == len(raw) == 80  # no overlap, no repeats


def test_toy_labels_say_they_are_an_offline_substitute():
    ctx = context(builtin=envisioned.EOE_LABELS, classnames=world.ID_CLASSES, kind="near")
    prov = EnvisionedOutlierExposure().plan(ctx).provenance
    assert prov["source"] == (
        "toy-world envisioned labels written for qbench (offline substitute, not generated by the paper's LLM)"
    )
    assert prov["count"] == 80 and prov["labels_file"] == str(envisioned.EOE_LABELS)


def test_the_toy_world_ships_its_labels_as_a_dataset_resource_under_the_eoe_key():
    registry = build_registry(get_plugin_manager(load_entrypoints=False))
    assert envisioned.EOE_RESOURCE_KEY == envision.LABELS_KEY
    assert dict(registry.get("datasets", "toy-id-test").resources) == {envision.LABELS_KEY: envisioned.EOE_LABELS}
    assert dict(registry.get("datasets", "toy-ood-far").resources) == {}  # only the ID side ships labels


def test_eoe_declares_its_files_and_model_as_resources():
    declared = {option.key: (option.kind, option.flag) for option in EnvisionedOutlierExposure.resources}
    assert declared == {"eoe_labels": ("file", "--eoe-labels"), "labels_dir": ("folder", "--labels-dir"),
                        "eoe_llm": ("value", "--eoe-llm")}


def test_a_dataset_resource_under_another_key_is_not_an_eoe_label_file(tmp_path):
    other = write_json(tmp_path / "other.json", {"far": ["kite"]})
    ctx = ScoreContext(suite="toy-ood", id_dataset="d", id_classnames=ID, id_templates=("{}",),
                       dataset_resources={"some_other_scorer_file": other})
    with pytest.raises(ScorerSkipped):
        EnvisionedOutlierExposure().plan(ctx)


def test_eoe_llm_generates_the_missing_label_file_once(tiny_llm, tmp_path, monkeypatch):
    monkeypatch.setenv("QBENCH_CACHE", str(tmp_path / "cache" / "features"))
    monkeypatch.setattr(envision, "DEFAULT_COUNT", {"far": 3, "near": 1, "fine": 3})
    calls = []
    real = envision.generate_labels
    monkeypatch.setattr(envision, "generate_labels",
                        lambda *args, **kwargs: calls.append(args) or real(*args, max_rounds=2, max_new_tokens=16, **kwargs))
    with_llm = ScoreContext(suite="my-suite", id_dataset="d", id_classnames=tuple(ID), id_templates=("{}",),
                            ood_kind="far", resources=ScorerResources(eoe_llm=str(tiny_llm)))
    plan = EnvisionedOutlierExposure().plan(with_llm)
    assert plan.provenance["source"] == "generated by local LLM"
    assert str(tmp_path / "cache" / "eoe") in plan.provenance["labels_file"]
    again = EnvisionedOutlierExposure().plan(with_llm)
    assert len(calls) == 1 and again.fingerprint() == plan.fingerprint()  # the saved file is reused
