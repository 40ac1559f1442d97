"""Real-dataset adapters on miniature on-disk copies of their layouts (suites.md §1, §2, §7).

Every fixture is built in ``tmp_path``: CIFAR-100 pickles in torchvision's format, an ImageNet val tree
with real wnids (layouts A-D), the MOS far-OOD folders with nested images and DTD's category folders.
"""

from __future__ import annotations

import functools
import hashlib
import io
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qbench.cli import main
from qbench.data import DatasetRequest, FileImages, UnreadableImage, image_files
from qbench.errors import QbenchError
from qbench.plugins import get_plugin_manager
from qbench.registry import build_registry
from qbench_plugins.datasets import imagenet
from qbench_plugins.datasets.cifar import CIFAR18_TEMPLATES, load_cifar100_test
from qbench_plugins.datasets.imagefolder import folder_dataset

# Three real wnids outside the MCM subsets (class indices 0, 1 and 999) and the ImageNet-10 wnids.
EXTRA_WNIDS = {"n01440764": 0, "n01443537": 1, "n15075141": 999}
IN10_WNIDS = [wnid for wnid, _ in imagenet.IMAGENET10]
IN10_INDICES = [10, 30, 238, 284, 339, 352, 510, 569, 817, 895]  # suites.md §1.1
IN20_INDICES = [26, 27, 28, 46, 49, 269, 279, 294, 327, 340, 417, 466, 472, 657, 665, 780, 802, 812, 820, 847]
IN100_INDICES = [
    6, 9, 17, 20, 28, 44, 48, 77, 87, 95, 98, 101, 107, 109, 113, 127, 142, 146, 162, 175, 189, 197, 219, 227, 237,
    258, 264, 267, 285, 289, 290, 296, 314, 331, 365, 368, 370, 375, 381, 434, 442, 448, 454, 478, 491, 493, 513, 516,
    519, 521, 527, 528, 537, 547, 557, 564, 566, 567, 568, 571, 577, 580, 609, 618, 626, 639, 642, 684, 689, 698, 700,
    705, 710, 715, 718, 719, 736, 740, 751, 754, 764, 775, 780, 786, 799, 837, 842, 845, 854, 864, 871, 894, 900, 913,
    918, 928, 936, 976, 981, 996,
]
IN100_SHA256 = "03614d17127166823c69de1557967383bcf9fbabe3132f70540373919ecd5764"  # suites.md §1.2


def write_image(path: Path, value: int = 0, size: int = 6) -> Path:
    """A tiny solid-colour image; the format follows the suffix (JPEG for .JPEG/.jpg)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".jpeg": "JPEG", ".jpg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".webp": "WEBP"}[path.suffix.lower()]
    Image.new("RGB", (size, size), (value, 255 - value, 7)).save(path, format=fmt)
    return path


def load(loader, root: Path | None):
    return loader(DatasetRequest(data_root=root))


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message
    return message


# --- image_files and FileImages -------------------------------------------------------------------------


def test_image_files_is_recursive_case_insensitive_sorted_and_skips_non_images(tmp_path):
    for relative in ("b/2.JPEG", "b/1.jpg", "a/deep/x.PNG", "c.webp", "d.Bmp", "a/z.jpeg"):
        write_image(tmp_path / relative)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "a" / "._z.jpeg").write_bytes(b"AppleDouble stub")
    write_image(tmp_path / ".hidden" / "h.jpg")
    found = [path.relative_to(tmp_path).as_posix() for path in image_files(tmp_path)]
    assert found == ["a/deep/x.PNG", "a/z.jpeg", "b/1.jpg", "b/2.JPEG", "c.webp", "d.Bmp"]


def test_corrupt_image_raises_unreadable_on_access_not_at_construction(tmp_path):
    good = write_image(tmp_path / "cls" / "good.jpg", 10, size=32)
    bad = tmp_path / "cls" / "bad.jpg"
    bad.write_bytes(good.read_bytes()[:60])  # truncated JPEG
    dataset = FileImages("t", tmp_path, [bad, good], [0, 0], ["thing"], ["a {}."])
    assert len(dataset) == 2 and dataset.fingerprint  # building and fingerprinting never decode
    with pytest.raises(UnreadableImage) as caught:
        dataset.image(0)
    assert caught.value.path == bad and caught.value.reason and "bad.jpg" in str(caught.value)
    image = dataset.image(1)
    assert image.mode == "RGB" and image.size == (32, 32)


def test_grayscale_files_come_back_rgb(tmp_path):
    path = tmp_path / "g.png"
    Image.new("L", (5, 5), 100).save(path)
    image = FileImages("g", tmp_path, [path], [-1], [], []).image(0)
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (100, 100, 100)


def test_file_images_rejects_bad_labels_and_foreign_paths(tmp_path):
    path = write_image(tmp_path / "a.jpg")
    with pytest.raises(ValueError, match="labels must be -1"):
        FileImages("t", tmp_path, [path], [1], ["only"], ["{}"])
    with pytest.raises(ValueError, match="labels must be -1"):
        FileImages("t", tmp_path, [path], [-2], ["only"], ["{}"])
    with pytest.raises(ValueError, match="not under the dataset root"):
        FileImages("t", tmp_path / "elsewhere", [path], [0], ["only"], ["{}"])


def test_fingerprint_follows_paths_sizes_and_labels_not_location(tmp_path):
    root = tmp_path / "one"
    paths = [write_image(root / "x" / f"{i}.png", i) for i in range(3)]

    def build(base: Path, labels=(0, 1, 0), names=("p", "q")) -> FileImages:
        return FileImages("t", base, [base / p.relative_to(root) for p in paths], labels, names, ["{}"])

    reference = build(root).fingerprint
    assert build(root).fingerprint == reference
    shutil.copytree(root, tmp_path / "two")
    assert build(tmp_path / "two").fingerprint == reference  # moving the data root keeps it
    reordered = FileImages("t", root, paths[::-1], [0, 1, 0][::-1], ["p", "q"], ["{}"])
    assert reordered.fingerprint == reference  # records are sorted
    assert build(root, labels=(1, 1, 0)).fingerprint != reference
    assert build(root, names=("p", "r")).fingerprint != reference
    with (tmp_path / "two" / "x" / "0.png").open("ab") as handle:
        handle.write(b"\0")
    assert build(tmp_path / "two").fingerprint != reference


def test_folder_dataset_labels_sorted_class_folders(tmp_path):
    for cls, count in (("zebra", 1), ("ant", 2), ("moth", 0)):
        (tmp_path / cls).mkdir()
        for i in range(count):
            write_image(tmp_path / cls / "sub" / f"{i}.jpg")
    dataset = folder_dataset("bugs", tmp_path, ["a photo of a {}."], expected_images=3)
    assert dataset.classnames == ("ant", "moth", "zebra")
    assert dataset.labels.tolist() == [0, 0, 2]
    assert any("moth" in note for note in dataset.notes) and not any("published" in n for n in dataset.notes)
    renamed = folder_dataset("bugs", tmp_path, ["{}"], classnames=["Ant", "Moth", "Zebra"], expected_images=10)
    assert renamed.classnames == ("Ant", "Moth", "Zebra")
    assert any("found 3 images" in note and "10" in note for note in renamed.notes)
    with pytest.raises(QbenchError, match="2 class names given for 3 class folders"):
        folder_dataset("bugs", tmp_path, ["{}"], classnames=["a", "b"])
    with pytest.raises(QbenchError) as caught:
        folder_dataset("nothing", tmp_path / "absent", ["{}"])
    assert "ImageFolder layout" in one_line(caught)


# --- CIFAR-100 -------------------------------------------------------------------------------------------


def cifar100_pickles(n: int = 7) -> tuple[bytes, bytes, np.ndarray, list[int], list[str]]:
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 100, size=n)]
    names = ["apple", "aquarium_fish"] + [f"class_{i}" for i in range(2, 100)]
    test = pickle.dumps({"filenames": [f"{i}.png" for i in range(n)], "data": data, "fine_labels": labels,
                         "coarse_labels": [0] * n})
    meta = pickle.dumps({"fine_label_names": names, "coarse_label_names": ["c"] * 20})
    return test, meta, data, labels, names


def test_cifar100_folder_layout(tmp_path):
    test, meta, data, labels, _ = cifar100_pickles()
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    (folder / "test").write_bytes(test)
    (folder / "meta").write_bytes(meta)
    dataset = load(load_cifar100_test, tmp_path)
    assert dataset.name == "cifar100-test" and len(dataset) == 7
    assert dataset.labels.tolist() == labels
    assert len(dataset.classnames) == 100 and dataset.classnames[:3] == ("apple", "aquarium fish", "class 2")
    assert dataset.templates == CIFAR18_TEMPLATES and len(dataset.templates) == 18
    expected = data[3].reshape(3, 32, 32).transpose(1, 2, 0)  # CHW rows -> HWC
    assert np.array_equal(np.asarray(dataset.image(3)), expected)


def test_cifar100_archive_gives_the_same_split(tmp_path):
    test, meta, *_ = cifar100_pickles()
    folder = tmp_path / "unpacked" / "cifar-100-python"
    folder.mkdir(parents=True)
    (folder / "test").write_bytes(test)
    (folder / "meta").write_bytes(meta)
    packed = tmp_path / "packed"
    packed.mkdir()
    with tarfile.open(packed / "cifar-100-python.tar.gz", "w:gz") as tar:
        for part, raw in (("test", test), ("meta", meta)):
            info = tarfile.TarInfo(f"cifar-100-python/{part}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    assert load(load_cifar100_test, packed).fingerprint == load(load_cifar100_test, tmp_path / "unpacked").fingerprint


def test_cifar100_missing_and_corrupt_are_one_line(tmp_path):
    with pytest.raises(QbenchError) as caught:
        load(load_cifar100_test, tmp_path)
    assert "cifar-100-python/" in one_line(caught) and "--data-root" in str(caught.value)
    with pytest.raises(QbenchError) as caught:
        load(load_cifar100_test, None)
    assert "'cifar100-test'" in one_line(caught) and "QBENCH_DATA" in str(caught.value)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    (folder / "test").write_bytes(b"not a pickle")
    (folder / "meta").write_bytes(cifar100_pickles()[1])
    with pytest.raises(QbenchError) as caught:
        load(load_cifar100_test, tmp_path)
    assert "incomplete or corrupted" in one_line(caught)


# --- ImageNet ------------------------------------------------------------------------------------------


def test_shipped_wnid_list_is_the_standard_ilsvrc2012_order():
    wnids = imagenet.imagenet_wnids()
    assert len(wnids) == 1000 and list(wnids) == sorted(wnids)
    assert [wnids[i] for i in IN10_INDICES] == IN10_WNIDS
    assert [wnids[i] for i in IN20_INDICES] == [wnid for wnid, _ in imagenet.IMAGENET20]
    in100 = "\n".join(sorted(wnids[i] for i in IN100_INDICES))
    assert hashlib.sha256(in100.encode()).hexdigest() == IN100_SHA256  # independent check of the order
    assert all(wnids[index] == wnid for wnid, index in EXTRA_WNIDS.items())


def test_openai_names_and_templates():
    names, templates = imagenet.openai_classnames(), imagenet.openai_templates()
    assert len(names) == 1000 and names[10] == "brambling" and names[352] == "impala (antelope)"
    assert len(templates) == 80 and all(t.count("{}") == 1 for t in templates)
    assert templates[0].format("cat") == "a bad photo of a cat."


def test_imagenetx_split_lists():
    id_, ood = imagenet.imagenetx_id_indices(), imagenet.imagenetx_ood_indices()
    assert len(id_) == len(ood) == 500 and not set(id_) & set(ood) and sorted(id_ + ood) == list(range(1000))
    assert id_[:6] == (0, 2, 4, 5, 7, 10) and id_[-1] == 994  # suites.md §1.3: "0,2,4-5,7,10-11,...,991-994"


@pytest.fixture
def imagenet_root(tmp_path) -> Path:
    """``imagenet/val/<wnid>/`` with two images for each of 3 extra wnids and the ImageNet-10 wnids."""
    val = tmp_path / "data" / "imagenet" / "val"
    for k, wnid in enumerate([*EXTRA_WNIDS, *IN10_WNIDS]):
        for i in range(2):
            write_image(val / wnid / f"ILSVRC2012_val_{k:04d}{i}.JPEG", k)
    return tmp_path / "data"


def test_imagenet1k_val_layout_a(imagenet_root):
    dataset = load(_loader("imagenet1k-val"), imagenet_root)
    assert len(dataset) == 26 and dataset.layout.endswith("(A)")
    by_wnid = {path.parent.name: int(label) for path, label in zip(dataset.paths, dataset.labels)}
    assert {wnid: by_wnid[wnid] for wnid in EXTRA_WNIDS} == EXTRA_WNIDS
    assert [by_wnid[wnid] for wnid in IN10_WNIDS] == IN10_INDICES
    assert dataset.classnames == imagenet.openai_classnames() and len(dataset.templates) == 80
    assert any("50,000" in note for note in dataset.notes)
    assert any("13 of its 1000 classes" in note for note in dataset.notes)
    assert dataset.image(0).mode == "RGB"


@functools.cache
def _registry():
    return build_registry(get_plugin_manager(load_entrypoints=False))


def _loader(name: str):
    """The registered loader, so the tests exercise the plugin registration too."""
    return _registry().get("datasets", name).loader


def test_imagenet10_is_derived_and_relabelled(imagenet_root):
    dataset = load(_loader("imagenet10-val"), imagenet_root)
    assert len(dataset) == 20
    assert dataset.classnames == tuple(imagenet.openai_classnames()[i] for i in IN10_INDICES)
    assert dataset.classnames[5] == "impala (antelope)"
    assert [path.parent.name for path in dataset.paths[::2]] == IN10_WNIDS  # sorted wnid = label order
    assert dataset.labels.tolist() == [label for label in range(10) for _ in range(2)]
    assert any("500" in note for note in dataset.notes)
    assert imagenet.mcm_classnames("imagenet10-val")[4:6] == ("horse", "antelope")


def test_imagenet20_absent_classes_is_a_one_line_error(imagenet_root):
    with pytest.raises(QbenchError) as caught:
        load(_loader("imagenet20-val"), imagenet_root)
    assert "'imagenet20-val'" in one_line(caught) and "imagenet/val/<wnid>/" in str(caught.value)


def test_imagenet20_from_mcm_folder(imagenet_root):
    mcm = imagenet_root / "ImageNet20" / "val"
    write_image(mcm / "n04389033" / "t.JPEG")  # tank, last of the 20
    write_image(mcm / "n01630670" / "n.JPEG")  # smooth newt, first
    dataset = load(_loader("imagenet20-val"), imagenet_root)
    assert dataset.labels.tolist() == [0, 19] and "MCM" in dataset.layout
    assert dataset.classnames[0] == "smooth newt" and len(dataset.classnames) == 20
    write_image(mcm / "n01440764" / "x.JPEG")  # not an ImageNet-20 class
    with pytest.raises(QbenchError) as caught:
        load(_loader("imagenet20-val"), imagenet_root)
    assert "not in imagenet20-val" in one_line(caught)


def test_imagenetx_halves(imagenet_root):
    id_half = load(_loader("imagenetx-id-val"), imagenet_root)
    ood_half = load(_loader("imagenetx-ood-val"), imagenet_root)
    id_wnids = {path.parent.name for path in id_half.paths}
    ood_wnids = {path.parent.name for path in ood_half.paths}
    assert len(id_half) + len(ood_half) == 26 and not id_wnids & ood_wnids
    assert {"n01440764", "n01530575"} <= id_wnids and {"n01443537", "n15075141"} <= ood_wnids  # 0, 10 | 1, 999
    label_of = {path.parent.name: int(label) for path, label in zip(id_half.paths, id_half.labels)}
    assert label_of["n01440764"] == 0 and label_of["n01530575"] == 5  # position of 10 in 0,2,4,5,7,10
    assert len(id_half.classnames) == len(ood_half.classnames) == 500
    assert ood_half.classnames[0] == imagenet.openai_classnames()[1]


def test_unknown_folder_in_val_is_rejected(imagenet_root):
    (imagenet_root / "imagenet" / "val" / "train").mkdir()
    with pytest.raises(QbenchError) as caught:
        load(_loader("imagenet1k-val"), imagenet_root)
    assert "not ILSVRC-2012 wnids: train" in one_line(caught)


def test_corrupt_imagenet_file_surfaces_on_access(imagenet_root):
    victim = next((imagenet_root / "imagenet" / "val" / "n01443537").iterdir())
    victim.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    dataset = load(_loader("imagenet1k-val"), imagenet_root)
    position = dataset.paths.index(victim)
    with pytest.raises(UnreadableImage):
        dataset.image(position)
    assert dataset.image(position + 1).mode == "RGB"


def test_imagenet_layout_c_loc_csv(tmp_path):
    base = tmp_path / "imagenet"
    write_image(base / "ILSVRC" / "Data" / "CLS-LOC" / "val" / "ILSVRC2012_val_00000001.JPEG")
    write_image(base / "ILSVRC" / "Data" / "CLS-LOC" / "val" / "ILSVRC2012_val_00000002.JPEG")
    write_image(base / "ILSVRC" / "Data" / "CLS-LOC" / "val" / "ILSVRC2012_val_00000003.JPEG")
    (base / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\n"
        "ILSVRC2012_val_00000002,n01530575 1 2 3 4 n01440764 5 6 7 8\n"
        "ILSVRC2012_val_00000001,n15075141 1 2 3 4\n"
    )
    dataset = load(_loader("imagenet1k-val"), tmp_path)
    assert [p.name for p in dataset.paths] == ["ILSVRC2012_val_00000001.JPEG", "ILSVRC2012_val_00000002.JPEG"]
    assert dataset.labels.tolist() == [999, 10] and dataset.layout.endswith("(C)")
    assert any("no row" in note for note in dataset.notes)
    in10 = load(_loader("imagenet10-val"), tmp_path)
    assert in10.labels.tolist() == [0] and len(in10.classnames) == 10


def test_imagenet_layout_d_openood_list(tmp_path):
    write_image(tmp_path / "images_largescale" / "imagenet_1k" / "val" / "a.JPEG")
    write_image(tmp_path / "images_largescale" / "imagenet_1k" / "val" / "b.JPEG")
    listing = tmp_path / "benchmark_imglist" / "imagenet" / "test_imagenet.txt"
    listing.parent.mkdir(parents=True)
    listing.write_text("imagenet_1k/val/a.JPEG 65\nimagenet_1k/val/b.JPEG 999\nimagenet_1k/val/gone.JPEG 3\n")
    dataset = load(_loader("imagenet1k-val"), tmp_path)
    assert dataset.labels.tolist() == [65, 999] and dataset.layout.endswith("(D)")
    assert any("missing" in note for note in dataset.notes)
    listing.write_text("imagenet_1k/val/a.JPEG sixty-five\n")
    with pytest.raises(QbenchError) as caught:
        load(_loader("imagenet1k-val"), tmp_path)
    assert "line 1" in one_line(caught)


def test_imagenet_layout_b_unpacks_with_torchvision_once(tmp_path, monkeypatch):
    base = tmp_path / "imagenet"
    base.mkdir()
    (base / "ILSVRC2012_img_val.tar").write_bytes(b"tar")
    (base / "ILSVRC2012_devkit_t12.tar.gz").write_bytes(b"devkit")
    calls = []

    def fake_imagenet(root: str, split: str):
        calls.append((root, split))
        write_image(Path(root) / "val" / "n01443537" / "x.JPEG")

    monkeypatch.setattr(imagenet, "_torchvision_imagenet", lambda: fake_imagenet)
    dataset = load(_loader("imagenet1k-val"), tmp_path)
    assert calls == [(str(base), "val")] and dataset.labels.tolist() == [1] and "(B)" in dataset.layout
    again = load(_loader("imagenet1k-val"), tmp_path)  # now unpacked: layout A, no second call
    assert len(calls) == 1 and again.layout.endswith("(A)")


def test_imagenet_layout_b_failure_is_one_line(tmp_path, monkeypatch):
    base = tmp_path / "imagenet"
    base.mkdir()
    (base / "ILSVRC2012_img_val.tar").write_bytes(b"tar")
    (base / "ILSVRC2012_devkit_t12.tar.gz").write_bytes(b"devkit")

    def corrupted(root: str, split: str):
        raise RuntimeError("The archive ILSVRC2012_devkit_t12.tar.gz is not present in the root directory or is corrupted.\nmore")

    monkeypatch.setattr(imagenet, "_torchvision_imagenet", lambda: corrupted)
    with pytest.raises(QbenchError) as caught:
        load(_loader("imagenet1k-val"), tmp_path)
    assert "cannot unpack the ImageNet archives" in one_line(caught) and "is corrupted" in str(caught.value)


def test_imagenet_missing_is_one_line_naming_layouts(tmp_path):
    with pytest.raises(QbenchError) as caught:
        load(_loader("imagenet1k-val"), tmp_path)
    message = one_line(caught)
    assert "imagenet/val/<wnid>/*.JPEG" in message and "--data-root DIR (or QBENCH_DATA)" in message
    with pytest.raises(QbenchError) as caught:
        load(_loader("imagenet10-val"), None)
    assert "'imagenet10-val'" in one_line(caught) and "QBENCH_DATA" in str(caught.value)
    with pytest.raises(QbenchError) as caught:
        load(_loader("imagenetx-id-val"), tmp_path / "nowhere")
    assert "does not exist" in one_line(caught) and "'imagenetx-id-val'" in str(caught.value)


# --- MOS far-OOD sets and DTD ----------------------------------------------------------------------------


def test_mos_inaturalist_nested_unlabelled_with_count_note(tmp_path):
    folder = tmp_path / "iNaturalist" / "images"
    write_image(folder / "b.jpg")
    write_image(folder / "a.JPG")
    write_image(folder / "more" / "c.png")
    (folder / "README.txt").write_text("x")
    dataset = load(_loader("inaturalist-ood"), tmp_path)
    assert [p.relative_to(tmp_path / "iNaturalist").as_posix() for p in dataset.paths] == [
        "images/a.JPG", "images/b.jpg", "images/more/c.png"]
    assert dataset.labels.tolist() == [-1, -1, -1] and dataset.classnames == () and dataset.templates == ()
    assert dataset.notes == ("inaturalist-ood: found 3 images, the published split has 10,000 (partial or modified copy?)",)
    assert dataset.info["concept_counts"] == {"more": 1} and dataset.layout == "iNaturalist/"


def test_mos_sun_concept_counts_and_fingerprint(tmp_path):
    for concept, count in (("lake", 2), ("desert", 1)):
        for i in range(count):
            write_image(tmp_path / "SUN" / "images" / concept / f"{i}.jpg", i)
    dataset = load(_loader("sun-ood"), tmp_path)
    assert dataset.info["concept_counts"] == {"desert": 1, "lake": 2}
    assert dataset.fingerprint == load(_loader("sun-ood"), tmp_path).fingerprint
    write_image(tmp_path / "SUN" / "images" / "lake" / "9.jpg")
    assert load(_loader("sun-ood"), tmp_path).fingerprint != dataset.fingerprint


def test_mos_missing_and_empty_folders_are_one_line(tmp_path):
    with pytest.raises(QbenchError) as caught:
        load(_loader("places-ood"), tmp_path)
    message = one_line(caught)
    assert "Places/" in message and "Places.tar.gz" in message and "--data-root DIR (or QBENCH_DATA)" in message
    (tmp_path / "SUN" / "images").mkdir(parents=True)
    (tmp_path / "SUN" / "images" / "list.txt").write_text("no images here")
    with pytest.raises(QbenchError) as caught:
        load(_loader("sun-ood"), tmp_path)
    assert "no images in" in one_line(caught) and "SUN/" in str(caught.value)
    with pytest.raises(QbenchError) as caught:
        load(_loader("dtd-ood"), None)
    assert "'dtd-ood'" in one_line(caught) and "dtd/images/<category>" in str(caught.value)


@pytest.mark.parametrize("layout", ["dtd/images", "dtd"])
def test_dtd_category_folders(tmp_path, layout):
    for category in ("woven", "banded"):
        for i in range(2):
            write_image(tmp_path / layout / category / f"{category}_{i:04d}.jpg", i)
    (tmp_path / "dtd" / "labels").mkdir(parents=True)
    (tmp_path / "dtd" / "labels" / "train1.txt").write_text("banded/banded_0000.jpg\n")
    dataset = load(_loader("dtd-ood"), tmp_path)
    assert len(dataset) == 4 and set(dataset.labels.tolist()) == {-1}
    assert [p.parent.name for p in dataset.paths] == ["banded", "banded", "woven", "woven"]
    assert dataset.info["concept_counts"] == {"banded": 2, "woven": 2}
    assert any("5,640" in note for note in dataset.notes) and any("47" in note for note in dataset.notes)


# --- registration and the CLI ---------------------------------------------------------------------------


def test_new_datasets_are_registered_with_roles():
    registry = build_registry(get_plugin_manager(load_entrypoints=False))
    roles = {name: registry.get("datasets", name).role for name in (
        "cifar100-test", "imagenet1k-val", "imagenet10-val", "imagenet20-val", "imagenetx-id-val",
        "imagenetx-ood-val", "inaturalist-ood", "sun-ood", "places-ood", "dtd-ood")}
    assert roles == {
        "cifar100-test": "id", "imagenet1k-val": "id", "imagenet10-val": "id", "imagenet20-val": "id",
        "imagenetx-id-val": "id", "imagenetx-ood-val": "ood", "inaturalist-ood": "ood", "sun-ood": "ood",
        "places-ood": "ood", "dtd-ood": "ood",
    }
    assert all(registry.get("datasets", name).citation for name in roles)


def test_cli_missing_far_ood_folder_is_one_line(capsys, imagenet_root):
    try:
        main(["eval", "--suite", "in1k-vs-dtd", "--data-root", str(imagenet_root)])
        code = 0
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in captured.err
    assert lines[0].startswith("qbench: ") and "dtd/images/<category>" in lines[0]
