"""Scorer plugins on hand-built logits where the right answer is known."""

import numpy as np
import pytest

from qbench.scoring import ScoreInputs, TextFeatures
from qbench_plugins.scorers.msp import MaximumSoftmaxProbability


def inputs_for(logits: np.ndarray) -> ScoreInputs:
    n, k = logits.shape
    return ScoreInputs(logits=logits, image_feats=np.zeros((n, 4)), text=TextFeatures(np.zeros((k, 4)), 1.0))


def test_msp_is_the_largest_softmax_probability():
    logits = np.array([[np.log(3.0), 0.0, 0.0], [0.0, 0.0, 0.0]])
    scores = MaximumSoftmaxProbability().score(inputs_for(logits))
    np.testing.assert_allclose(scores, [3 / 5, 1 / 3], rtol=1e-12)


def test_msp_ranks_confident_inputs_as_more_in_distribution():
    confident, unsure = np.array([[10.0, 0.0]]), np.array([[0.1, 0.0]])
    scorer = MaximumSoftmaxProbability()
    assert scorer.score(inputs_for(confident))[0] > scorer.score(inputs_for(unsure))[0]
    assert scorer.score(inputs_for(confident + 100.0))[0] == pytest.approx(scorer.score(inputs_for(confident))[0])


# -- generic scorer resources ----------------------------------------------------------------------------
from pathlib import Path  # noqa: E402

from qbench.errors import QbenchError  # noqa: E402
from qbench.scoring import (  # noqa: E402
    ResourceOption,
    Scorer,
    ScorerResources,
    declared_resources,
    parse_resources,
    resource_fingerprints,
)


def test_resource_fingerprints_keep_the_hashes_of_earlier_configs(tmp_path):
    """The same keys and digests as before resources were generic (computed with the old per-field code on
    these exact files), so the config hashes of stored runs that gave scorer files do not move."""
    lexicon = tmp_path / "lex"
    lexicon.mkdir()
    (lexicon / "noun.txt").write_text("noun.a\n")
    (lexicon / "adj.txt").write_text("adj\n")
    labels = tmp_path / "labels.txt"
    labels.write_text("kite\nmoon\n")
    prints = resource_fingerprints(ScorerResources(neglabel_lexicon=lexicon, eoe_labels=labels, eoe_llm="org/model"))
    assert prints == {"neglabel_lexicon": "2826012aad117302", "eoe_labels": "a59b22301f5f573d", "eoe_llm": "org/model"}
    labels.write_text("kite\n")  # content changes the hash; a move does not
    assert resource_fingerprints(ScorerResources(eoe_labels=labels))["eoe_labels"] != "a59b22301f5f573d"
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    lexicon.rename(moved / "lex")
    assert resource_fingerprints(ScorerResources(neglabel_lexicon=moved / "lex")) == {"neglabel_lexicon": "2826012aad117302"}


def test_a_missing_resource_path_is_one_line_naming_it(tmp_path):
    with pytest.raises(QbenchError) as caught:
        resource_fingerprints(ScorerResources(my_lexicon=tmp_path / "nope.txt"))
    assert "my-lexicon path" in str(caught.value) and "does not exist" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_scorer_resources_are_an_immutable_typed_mapping(tmp_path):
    resources = ScorerResources({"a_file": tmp_path}, b_value="x", c_missing=None)
    assert dict(resources) == {"a_file": tmp_path, "b_value": "x"} and len(resources) == 2
    assert resources.path("a_file") == tmp_path and resources.path("c_missing") is None
    assert resources == ScorerResources(b_value="x", a_file=tmp_path) and hash(resources) == hash(ScorerResources(dict(resources)))
    assert ScorerResources() == {} and not ScorerResources(x=None)
    with pytest.raises(AttributeError):
        resources.extra = 1  # type: ignore[attr-defined]
    with pytest.raises(QbenchError, match="path or a string"):
        ScorerResources(count=3)  # type: ignore[arg-type]


@pytest.mark.parametrize("args, message", [
    (("My-Key", "file", "h"), "lower-case"),
    (("my_key", "blob", "h"), "use one of file, folder, path, value"),
    (("my_key", "file", "h", "my-key"), "long option"),
])
def test_bad_resource_declarations_are_one_line_errors(args, message):
    with pytest.raises(QbenchError, match=message):
        ResourceOption(*args)


def test_resource_values_are_converted_by_kind(tmp_path):
    a_file = tmp_path / "f.txt"
    a_file.write_text("x")
    assert ResourceOption("k", "value", "h").convert(" org/model ") == "org/model"
    assert ResourceOption("k", "path", "h").convert(str(tmp_path)) == tmp_path
    assert ResourceOption("k", "file", "h").convert("~/x.txt") == Path("~/x.txt").expanduser()
    with pytest.raises(QbenchError, match="--my-file .* is a folder"):
        ResourceOption("k", "file", "h", flag="--my-file").convert(str(tmp_path))
    with pytest.raises(QbenchError, match="--resource k .* is not a folder"):
        ResourceOption("k", "folder", "h").convert(str(a_file))


class _Declaring(Scorer):
    name = "declaring"
    citation = "test"
    summary = "test"
    resources = (ResourceOption("my_prompts", "file", "prompts", flag="--my-prompts"),
                 ResourceOption("my_model", "value", "a model id"))

    def score(self, inputs, prepared=None):
        return np.zeros(len(inputs.logits))


def test_parse_resources_checks_keys_against_the_declarations(tmp_path):
    declared = declared_resources([_Declaring])
    parsed = parse_resources(declared, {"my_prompts": str(tmp_path / "p.txt")}, ["my-model=org/m"])
    assert dict(parsed) == {"my_prompts": tmp_path / "p.txt", "my_model": "org/m"}
    with pytest.raises(QbenchError, match="unknown scorer resource 'my_promts'; did you mean 'my_prompts'"):
        parse_resources(declared, {}, ["my_promts=x"])
    with pytest.raises(QbenchError, match="given twice"):
        parse_resources(declared, {"my_prompts": "a"}, ["my_prompts=b"])
    with pytest.raises(QbenchError, match="use KEY=VALUE"):
        parse_resources(declared, {}, ["my_prompts"])


def test_conflicting_declarations_keep_the_first_with_one_warning(capsys):
    class Other(_Declaring):
        name = "other"
        resources = (ResourceOption("my_prompts", "folder", "another meaning"),
                     ResourceOption("their_prompts", "file", "x", flag="--my-prompts"))

    declared = declared_resources([_Declaring, Other])
    assert declared["my_prompts"].kind == "file"
    assert declared["their_prompts"].flag is None  # its flag was taken: it stays reachable as --resource
    err = capsys.readouterr().err
    assert err.count("qbench: warning:") == 2 and "'my_prompts' differently" in err and "--my-prompts" in err


def test_scorer_resources_survive_copying_and_a_sweep_job_file(tmp_path):
    import copy
    import pickle

    resources = ScorerResources(my_file=tmp_path / "f.txt", my_value="x")
    assert copy.deepcopy(resources) == resources and copy.copy(resources) == resources
    assert pickle.loads(pickle.dumps(resources)) == resources  # submitit writes a sweep unit's request this way


def test_a_dataset_ships_resources_as_a_read_only_mapping_of_paths():
    from qbench.data import DatasetSpec

    spec = DatasetSpec("d", "id", "a split", "test", loader=lambda request: None,
                       resources={"my_labels": "/data/labels.json", "unused": None})
    assert dict(spec.resources) == {"my_labels": Path("/data/labels.json")}
    with pytest.raises(TypeError):
        spec.resources["other"] = Path("x")  # type: ignore[index]
    with pytest.raises(QbenchError, match="mapping of key -> file path"):
        DatasetSpec("d", "id", "a split", "test", loader=lambda request: None, resources=Path("x"))  # type: ignore[arg-type]
