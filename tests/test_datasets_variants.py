"""ImageNet variants, CounterAnimal, user ImageFolders and data-root resolution on miniature layouts
(suites.md §3.1-3.2, §4, §7). Every fixture is built in ``tmp_path``; no test reads real data or the
developer's own config file (``XDG_CONFIG_HOME`` points into ``tmp_path``)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli_runner import run_cli
from qbench import cli
from qbench.data import DatasetRequest, config_path, resolve_data_root
from qbench.errors import QbenchError
from qbench.engine.features import EncodeCounter, FeatureCache, encode_dataset, tower_fingerprint
from qbench.plugins import get_plugin_manager
from qbench.registry import build_registry
from qbench_plugins.datasets import imagenet_variants
from qbench_plugins.datasets.imagenet import imagenet_wnids, openai_classnames, openai_templates
from qbench_plugins.datasets.imagenet_variants import ClassSubset, subset_indices

# suites.md §3.2, transcribed independently of the shipped index files.
A_WNIDS_SHA256 = "f6aa4b23244554d9b864fd715ae20048f6a9686388911b2dfbf1ada01bf0f520"
R_WNIDS_SHA256 = "e19a59d84e3746fafd34d2ccf6ae604a44e9a0500a596f343c878a89e30ce624"
A_HEAD, A_TAIL = [6, 11, 13, 15, 17, 22, 23, 27], [981, 984, 986, 987, 988]
R_HEAD, R_TAIL = [1, 2, 4, 6, 8, 9, 11, 13], [967, 980, 981, 983, 988]


@pytest.fixture(autouse=True)
def no_user_config(tmp_path, monkeypatch):
    """No developer config, data root or cached CLI registry leaks into (or out of) these tests."""
    monkeypatch.delenv("QBENCH_CONFIG", raising=False)
    monkeypatch.delenv("QBENCH_DATA", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    cli.registry.cache_clear()
    yield
    cli.registry.cache_clear()


def write_image(path: Path, value: int = 0, size: int = 32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    Image.new("RGB", (size, size), (value, 255 - value, 7)).save(path, format=fmt)
    return path


def registry():
    return build_registry(get_plugin_manager(load_entrypoints=False))


def load(name: str, root: Path | None):
    return registry().get("datasets", name).loader(DatasetRequest(data_root=root))


def one_line(caught: pytest.ExceptionInfo) -> str:
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def wnid(index: int) -> str:
    return imagenet_wnids()[index]


# --- ImageNet-A / -R class subsets ------------------------------------------------------------------------


@pytest.mark.parametrize("name, checksum, head, tail", [
    ("imagenet-a", A_WNIDS_SHA256, A_HEAD, A_TAIL),
    ("imagenet-r", R_WNIDS_SHA256, R_HEAD, R_TAIL),
])
def test_shipped_subsets_match_the_checksums_of_suites_md(name, checksum, head, tail):
    indices = subset_indices(name)
    assert len(indices) == len(set(indices)) == 200 and list(indices) == sorted(indices)
    assert list(indices[:8]) == head and list(indices[-5:]) == tail
    sorted_wnids = "\n".join(sorted(wnid(index) for index in indices))
    assert hashlib.sha256(sorted_wnids.encode()).hexdigest() == checksum
    assert subset_indices("imagenet-v2") == tuple(range(1000))


def test_a_damaged_subset_list_is_refused():
    wrong = ClassSubset("ImageNet-A", "imagenet_a_indices.txt", "0" * 64)
    with pytest.raises(QbenchError) as caught:
        imagenet_variants._subset(wrong)
    assert "imagenet_a_indices.txt is damaged" in one_line(caught)


def test_imagenet_a_is_200_way_with_the_1k_mapping(tmp_path):
    for k, index in enumerate((988, 6, 11)):  # last, first and second class of the subset
        for i in range(2):
            write_image(tmp_path / "imagenet-a" / wnid(index) / f"{k}{i}.jpg", k * 40)
    (tmp_path / "imagenet-a" / "README.txt").write_text("ImageNet-A")
    dataset = load("imagenet-a", tmp_path)
    assert dataset.labels.tolist() == [0, 0, 1, 1, 199, 199]  # sorted wnid order = label order
    assert [path.parent.name for path in dataset.paths[::2]] == [wnid(6), wnid(11), wnid(988)]
    names = openai_classnames()
    assert len(dataset.classnames) == 200 and dataset.classnames[0] == names[6] and dataset.classnames[199] == names[988]
    assert dataset.templates == openai_templates() and len(dataset.templates) == 80
    mapping = dataset.info["imagenet_indices"]
    assert [mapping[label] for label in dataset.labels.tolist()] == [6, 6, 11, 11, 988, 988]
    assert dataset.layout == "imagenet-a/<wnid>/" and dataset.info["classes_found"] == 3
    assert any("found 6 images" in note and "7,500" in note for note in dataset.notes)
    assert any("3 of its 200 classes" in note for note in dataset.notes)


def test_imagenet_r_rejects_a_class_outside_its_subset(tmp_path):
    write_image(tmp_path / "imagenet-r" / wnid(1) / "art_0.jpg")  # goldfish: in R, not in A
    dataset = load("imagenet-r", tmp_path)
    assert dataset.labels.tolist() == [0] and dataset.classnames[0] == openai_classnames()[1]
    assert any("30,000" in note for note in dataset.notes)
    write_image(tmp_path / "imagenet-r" / wnid(0) / "x.jpg")  # tench: not an ImageNet-R class
    with pytest.raises(QbenchError) as caught:
        load("imagenet-r", tmp_path)
    message = one_line(caught)
    assert wnid(0) in message and "not one of the 200 ImageNet-R classes" in message


def test_corrupt_jpeg_in_imagenet_a_is_counted_not_fatal(tmp_path):
    from qbench.model import LoadRequest
    from qbench_plugins.toyworld.plugin import load_toy_clip

    good = write_image(tmp_path / "imagenet-a" / wnid(6) / "good.jpg", 10)
    write_image(tmp_path / "imagenet-a" / wnid(11) / "also_good.jpg", 90)
    (tmp_path / "imagenet-a" / wnid(6) / "truncated.jpg").write_bytes(good.read_bytes()[:80])
    dataset = load("imagenet-a", tmp_path)
    assert len(dataset) == 3
    states = {"fp32": load_toy_clip(LoadRequest())}
    prints = {"fp32": tower_fingerprint(states["fp32"], "visual")}

    class Silent:
        def log(self, message):
            pass

        def track(self, items, description):
            return iter(items)

    split = encode_dataset(dataset, states, prints, 2, FeatureCache(None), Silent(), EncodeCounter())
    broken = [path.name for path in dataset.paths].index("truncated.jpg")
    assert sorted(split.kept.tolist()) == sorted(set(range(3)) - {broken})
    assert len(split.unreadable) == 1 and "truncated.jpg" in split.unreadable[0]


# --- ImageNetV2 and ImageNet-Sketch -------------------------------------------------------------------


def test_imagenet_v2_label_is_the_integer_folder_name_not_lexical_order(tmp_path):
    folder = tmp_path / "imagenetv2-matched-frequency-format-val"
    for name in ("0", "2", "10"):  # ImageFolder would label these 0, 2, 1
        write_image(folder / name / f"{name}a.jpeg")
    dataset = load("imagenet-v2", tmp_path)
    by_folder = {path.parent.name: int(label) for path, label in zip(dataset.paths, dataset.labels)}
    assert by_folder == {"0": 0, "2": 2, "10": 10}
    assert dataset.classnames == openai_classnames() and len(dataset.templates) == 80
    assert dataset.info["label_rule"] == "int(folder)" and dataset.info["imagenet_indices"] == "all"
    assert any("10,000" in note for note in dataset.notes) and any("3 of its 1000" in note for note in dataset.notes)


@pytest.mark.parametrize("bad", ["train", "1000", "-1"])
def test_imagenet_v2_non_index_folder_is_one_line(tmp_path, bad):
    folder = tmp_path / "imagenetv2-matched-frequency-format-val"
    write_image(folder / "5" / "a.jpeg")
    write_image(folder / bad / "b.jpeg")
    with pytest.raises(QbenchError) as caught:
        load("imagenet-v2", tmp_path)
    assert "not a class-index folder 0..999" in one_line(caught) and bad in str(caught.value)


@pytest.mark.parametrize("layout", ["sketch", "imagenet-sketch", "imagenet-sketch/sketch"])
def test_imagenet_sketch_layouts(tmp_path, layout):
    for index in (999, 0, 500):
        write_image(tmp_path / layout / wnid(index) / "sketch_1.JPEG")
    dataset = load("imagenet-sketch", tmp_path)
    assert dataset.labels.tolist() == [0, 500, 999] and len(dataset.classnames) == 1000
    assert dataset.layout == f"{layout}/<wnid>/" and any("50,889" in note for note in dataset.notes)


def test_imagenet_sketch_foreign_folder_is_one_line(tmp_path):
    write_image(tmp_path / "sketch" / "n99999999" / "x.jpg")
    with pytest.raises(QbenchError) as caught:
        load("imagenet-sketch", tmp_path)
    assert "not an ILSVRC-2012 wnid folder" in one_line(caught)


@pytest.mark.parametrize("name, layout", [
    ("imagenet-v2", "imagenetv2-matched-frequency-format-val/<0..999>/"),
    ("imagenet-a", "imagenet-a/<wnid>/"),
    ("imagenet-r", "imagenet-r/<wnid>/"),
    ("imagenet-sketch", "sketch/<wnid>/* or imagenet-sketch/<wnid>/*"),
])
def test_missing_variants_are_one_line_naming_layout_and_fix(tmp_path, name, layout):
    with pytest.raises(QbenchError) as caught:
        load(name, tmp_path)
    message = one_line(caught)
    assert layout in message and "--data-root DIR (or QBENCH_DATA)" in message
    with pytest.raises(QbenchError) as caught:
        load(name, None)
    assert repr(name) in one_line(caught) and "QBENCH_DATA" in str(caught.value)
    folder = "6" if name == "imagenet-v2" else wnid(6)
    (tmp_path / layout.split("/")[0] / folder).mkdir(parents=True)  # a class folder without images
    with pytest.raises(QbenchError) as caught:
        load(name, tmp_path)
    assert "no images in the class folders" in one_line(caught) and layout in str(caught.value)


# --- CounterAnimal --------------------------------------------------------------------------------


def counteranimal_tree(base: Path) -> Path:
    """``LAION-final/`` with 2 classes (100 black swan, 2 great white shark), backgrounds per group."""
    release = base / "counteranimal" / "LAION-final"
    for i in range(3):
        write_image(release / "100 black swan" / "common-water" / f"c{i}.jpg", i)
    write_image(release / "100 black swan" / "counter-grass" / "k0.jpg", 50)
    write_image(release / "2 great white shark" / "common-ocean" / "c0.jpg", 70)
    for i in range(2):
        write_image(release / "2 great white shark" / "counter-land" / f"k{i}.jpg", 90 + i)
    (release / "imagenet_names.txt").write_text("0\ttench, Tinca tinca\n1\tgoldfish, Carassius auratus\n")
    return release


def test_counteranimal_groups_are_1000_way_with_imagenet_labels(tmp_path):
    counteranimal_tree(tmp_path)
    common, counter = load("counteranimal-common", tmp_path), load("counteranimal-counter", tmp_path)
    assert common.labels.tolist() == [2, 100, 100, 100] and counter.labels.tolist() == [2, 2, 100]
    assert {path.parent.name for path in common.paths} == {"common-water", "common-ocean"}
    assert {path.parent.name for path in counter.paths} == {"counter-grass", "counter-land"}
    assert common.classnames == openai_classnames() and common.templates == openai_templates()
    assert common.info["backgrounds"] == {2: ["ocean"], 100: ["water"]}
    assert counter.info["class_counts"] == {2: 2, 100: 1} and counter.info["label_space"] == "imagenet-1k"
    assert any("7,174" in note for note in common.notes) and any("5,926" in note for note in counter.notes)
    assert any("found 2 class folders" in note and "45" in note for note in counter.notes)
    assert common.info["imagenet_names_file"] is True


@pytest.mark.parametrize("pointing_at", ["counteranimal", "counteranimal/LAION-final"])
def test_counteranimal_root_may_be_the_release_folder_itself(tmp_path, pointing_at):
    counteranimal_tree(tmp_path)
    reference = load("counteranimal-counter", tmp_path)
    moved = load("counteranimal-counter", tmp_path / pointing_at)
    assert moved.fingerprint == reference.fingerprint and moved.labels.tolist() == reference.labels.tolist()


def test_counteranimal_bad_or_missing_layout_is_one_line(tmp_path):
    with pytest.raises(QbenchError) as caught:
        load("counteranimal-common", tmp_path)
    message = one_line(caught)
    assert "LAION-final/<idx> <class name>" in message and "--data-root DIR (or QBENCH_DATA)" in message
    release = counteranimal_tree(tmp_path)
    write_image(release / "misc" / "x.jpg")
    with pytest.raises(QbenchError) as caught:
        load("counteranimal-common", tmp_path)
    assert "misc" in one_line(caught) and "<ImageNet index 0-999> <class name>" in str(caught.value)


def test_counteranimal_class_without_a_group_is_noted(tmp_path):
    release = counteranimal_tree(tmp_path)
    write_image(release / "340 zebra" / "common-grass" / "z.jpg")
    counter = load("counteranimal-counter", tmp_path)
    assert 340 not in counter.labels.tolist()
    assert any("without a counter sub-folder: 340 zebra" in note for note in counter.notes)
    assert load("counteranimal-common", tmp_path).labels.tolist().count(340) == 1


def test_new_datasets_are_registered_with_roles_and_citations():
    found = registry()
    roles = {name: found.get("datasets", name).role for name in (
        "imagenet-v2", "imagenet-a", "imagenet-r", "imagenet-sketch", "counteranimal-common", "counteranimal-counter")}
    assert roles == {"imagenet-v2": "shift", "imagenet-a": "shift", "imagenet-r": "shift", "imagenet-sketch": "shift",
                     "counteranimal-common": "spurious", "counteranimal-counter": "spurious"}
    assert all(found.get("datasets", name).citation for name in roles)


# --- data root resolution and the config file ---------------------------------------------------------


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "xdg" / "qbench" / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_data_root_precedence_option_then_env_then_config(tmp_path, monkeypatch):
    assert resolve_data_root(None) is None  # nothing anywhere
    write_config(tmp_path, "data_root: /from/config\n")
    assert config_path() == tmp_path / "xdg" / "qbench" / "config.yaml"
    assert resolve_data_root(None) == "/from/config"
    monkeypatch.setenv("QBENCH_DATA", "/from/env")
    assert resolve_data_root(None) == "/from/env"
    assert resolve_data_root("/from/option") == "/from/option"
    monkeypatch.setenv("QBENCH_DATA", "")
    assert resolve_data_root("") == "/from/config"  # empty values count as unset


def test_config_locations_and_relative_data_root(tmp_path, monkeypatch):
    explicit = tmp_path / "elsewhere" / "qbench.yaml"
    explicit.parent.mkdir()
    explicit.write_text("data_root: datasets\n")
    monkeypatch.setenv("QBENCH_CONFIG", str(explicit))
    assert resolve_data_root(None) == str(tmp_path / "elsewhere" / "datasets")  # relative to the file
    monkeypatch.delenv("QBENCH_CONFIG")
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert config_path() == tmp_path / "home" / ".config" / "qbench" / "config.yaml"


@pytest.mark.parametrize("text, expected", [
    ("data_root: [unclosed\n", "is not readable YAML"),
    ("- /data\n", "must be a YAML mapping"),
    ("data_root: 5\n", "data_root must be a folder path"),
    ("data_root: ''\n", "data_root must be a folder path"),
])
def test_malformed_config_is_one_line_naming_the_file(tmp_path, text, expected):
    path = write_config(tmp_path, text)
    with pytest.raises(QbenchError) as caught:
        resolve_data_root(None)
    message = one_line(caught)
    assert expected in message and str(path) in message and "fix it" in message
    assert resolve_data_root("/given") == "/given"  # the file is not read when not needed


def test_qbench_config_naming_no_file_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("QBENCH_CONFIG", str(tmp_path / "absent.yaml"))
    with pytest.raises(QbenchError) as caught:
        resolve_data_root(None)
    assert "absent.yaml" in one_line(caught) and "unset QBENCH_CONFIG" in str(caught.value)


def test_cli_takes_the_data_root_from_the_config_file(capsys, tmp_path):
    (tmp_path / "data").mkdir()
    write_config(tmp_path, f"data_root: {tmp_path / 'data'}\n")
    code, _, err = run_cli(capsys, "eval", "--suite", "cifar10")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err
    assert "CIFAR-10 not found" in lines[0] and str(tmp_path / "data" / "cifar-10-batches-py") in lines[0]


# --- user ImageFolders declared in the config file ---------------------------------------------------


def flower_folder(base: Path) -> Path:
    for cls, count in (("sun_flower", 2), ("daisy", 1), ("rose", 1)):
        for i in range(count):
            write_image(base / cls / "nested" / f"{i}.png", 30 * i)
    return base


def test_declared_imagefolder_registers_a_dataset_and_a_suite(tmp_path):
    flower_folder(tmp_path / "data" / "flowers" / "test")
    flower_folder(tmp_path / "abs_pets")
    write_config(tmp_path, (
        f"data_root: {tmp_path / 'data'}\n"
        "imagefolders:\n"
        "  flowers: flowers/test\n"
        f"  pets: {{path: {tmp_path / 'abs_pets'}, templates: ['a photo of {{}}, a pet.', 'art of {{}}.']}}\n"
    ))
    found = registry()
    suite = found.get("suites", "imagefolder:flowers")
    assert suite.datasets == ("imagefolder:flowers",) and suite.tasks[0].type == "zeroshot"
    assert found.get("datasets", "imagefolder:flowers").role == "id"
    flowers = load("imagefolder:flowers", Path(resolve_data_root(None)))
    assert flowers.classnames == ("daisy", "rose", "sun flower") and flowers.labels.tolist() == [0, 1, 2, 2]
    assert flowers.templates == openai_templates()  # the default set
    pets = load("imagefolder:pets", None)  # absolute path: no data root needed
    assert pets.templates == ("a photo of {}, a pet.", "art of {}.") and len(pets) == 4
    assert found.get("suites", "imagefolder:pets").version != suite.version


def test_suite_version_follows_the_declaration(tmp_path):
    write_config(tmp_path, "imagefolders: {flowers: flowers/test}\n")
    first = registry().get("suites", "imagefolder:flowers").version
    assert registry().get("suites", "imagefolder:flowers").version == first
    write_config(tmp_path, "imagefolders: {flowers: flowers/val}\n")
    assert registry().get("suites", "imagefolder:flowers").version != first
    write_config(tmp_path, "imagefolders: {flowers: {path: flowers/val, templates: photo1}}\n")
    flower_folder(tmp_path / "data" / "flowers" / "val")
    assert load("imagefolder:flowers", tmp_path / "data").templates == ("a photo of a {}.",)


def test_declared_imagefolder_missing_folder_names_the_layout(tmp_path):
    config = write_config(tmp_path, "imagefolders: {flowers: flowers/test}\n")
    (tmp_path / "data").mkdir()
    with pytest.raises(QbenchError) as caught:
        load("imagefolder:flowers", tmp_path / "data")
    message = one_line(caught)
    assert str(tmp_path / "data" / "flowers" / "test") in message and "<class>/<images> (ImageFolder layout" in message
    assert str(config) in message and "--data-root DIR (or QBENCH_DATA)" in message
    with pytest.raises(QbenchError) as caught:
        load("imagefolder:flowers", None)
    assert "needs a data root" in one_line(caught)
    (tmp_path / "data" / "flowers" / "test" / "empty_class").mkdir(parents=True)
    with pytest.raises(QbenchError) as caught:
        load("imagefolder:flowers", tmp_path / "data")
    assert "no images" in one_line(caught)


@pytest.mark.parametrize("text, expected", [
    ("imagefolders: [flowers/test]\n", "imagefolders must be a mapping"),
    ("imagefolders: {'bad name': x}\n", "is not a valid name"),
    ("imagefolders: {flowers: {templates: photo1}}\n", "needs a folder path"),
    ("imagefolders: {flowers: {path: x, prompts: photo1}}\n", "unknown key(s) prompts"),
    ("imagefolders: {flowers: {path: x, templates: imagenet}}\n", "unknown templates 'imagenet'"),
    ("imagefolders: {flowers: {path: x, templates: ['no placeholder']}}\n", "exactly one {}"),
])
def test_malformed_imagefolder_entries_are_one_line(tmp_path, text, expected, capsys):
    """A malformed entry is one warning line naming the file and the fix; the plugin's datasets are skipped and
    every other registration still works (issue 14: one bad declaration must not disable every command)."""
    path = write_config(tmp_path, text)
    built = registry()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]  # one per hook (datasets, suites)
    assert lines and all(line.startswith("qbench: warning:") and expected in line and str(path) in line for line in lines)
    assert "imagefolder:flowers" not in {entry.name for entry in built.entries("datasets")}
    assert built.get("suites", "toy-id").name == "toy-id"


def test_cli_evaluates_a_declared_imagefolder_end_to_end(capsys, tmp_path):
    flower_folder(tmp_path / "data" / "flowers")
    write_config(tmp_path, f"data_root: {tmp_path / 'data'}\nimagefolders: {{flowers: {{path: flowers, templates: photo1}}}}\n")
    code, out, err = run_cli(capsys, "eval", "--suite", "imagefolder:flowers", "--quantizer", "fp32", "--json")
    assert code == 0, err
    document = json.loads(out)
    assert document["datasets"]["imagefolder:flowers"]["num_images"] == 4
    accuracy = [r for r in document["results"] if r["dataset"] == "imagefolder:flowers" and r["metric"] == "accuracy"]
    assert accuracy and all(np.isfinite(record["fp32"]) for record in accuracy)
