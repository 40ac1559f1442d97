"""Any ``<folder>/<class>/<images>`` tree as a zero-shot dataset and suite, declared in the user config file.

The config file (``$QBENCH_CONFIG``, else ``$XDG_CONFIG_HOME/qbench/config.yaml``, else
``~/.config/qbench/config.yaml``; see :func:`qbench.data.config_path`) may hold an ``imagefolders:`` mapping
from a short name to a folder, or to ``{path: ..., templates: ...}``::

    data_root: /data
    imagefolders:
      flowers: flowers102/test          # relative: under the data root
      pets: {path: /srv/pets/test, templates: photo1}

Each entry registers the dataset **and** the one-task suite ``imagefolder:<name>`` (accuracy, ECE, NLL), so
``qbench eval --suite imagefolder:flowers`` evaluates the folder and a plugin's own suites can name the
dataset. A relative path is resolved against the data root at load time (``--data-root``, ``$QBENCH_DATA``
or ``data_root:``), an absolute one is used as is. The layout is torchvision's ``ImageFolder``
(:func:`~qbench_plugins.datasets.imagefolder.folder_dataset`): labels follow the sorted class folders,
images are collected recursively, class names are the folder names with ``_`` read as a space.
``templates`` is a list of prompts with one ``{}`` each, or the name of a set of ``suites.md`` §6
(``openai80``, the default: OpenAI's 80 ImageNet prompts from Radford et al., "Learning Transferable Visual
Models From Natural Language Supervision", ICML 2021; ``openai7``, ``cifar18``, ``photo1``, ``nice1``).
The suite's version is derived from the declared path and templates, so editing either never serves a
stored result of the old declaration. A malformed entry is a one-line error naming the config file.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from qbench.data import DatasetRequest, DatasetSpec, FileImages, config_path, read_config
from qbench.errors import QbenchError
from qbench.hookspecs import hookimpl
from qbench.suites import ZEROSHOT_METRICS, SuiteSpec
from qbench_plugins.tasks.zeroshot import ZeroShotSpec
from qbench_plugins.datasets.cifar import CIFAR18_TEMPLATES, resolve_root
from qbench_plugins.datasets.imagefolder import class_folders, folder_dataset
from qbench_plugins.datasets.imagenet import _zero_shot_metadata, openai_templates

PREFIX = "imagefolder:"
CONFIG_KEY = "imagefolders"
DEFAULT_TEMPLATES = "openai80"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
EXAMPLE = "imagefolders: {flowers: flowers102/test}"
TEMPLATE_SETS: dict[str, Callable[[], tuple[str, ...]]] = {
    "openai80": openai_templates,
    "openai7": lambda: tuple(template("{}") for template in _zero_shot_metadata().SIMPLE_IMAGENET_TEMPLATES),
    "cifar18": lambda: CIFAR18_TEMPLATES,
    "photo1": lambda: ("a photo of a {}.",),
    "nice1": lambda: ("the nice {}",),
}


@dataclass(frozen=True)
class DeclaredFolder:
    """One ``imagefolders:`` entry: its short name, the path as written, and its prompt templates."""

    name: str
    path: str
    templates: tuple[str, ...]
    source: str

    @property
    def reference(self) -> str:
        """The dataset and suite name, ``imagefolder:<name>``."""
        return f"{PREFIX}{self.name}"

    @property
    def version(self) -> int:
        """A suite version that changes whenever the declared path or templates change."""
        digest = hashlib.sha256("\n".join((self.path, *self.templates)).encode()).hexdigest()
        return 1 + int(digest[:6], 16)


def declared_folders(config: dict[str, Any] | None = None) -> list[DeclaredFolder]:
    """The config file's ``imagefolders:`` entries, validated; none when the key is absent."""
    config = read_config() if config is None else config
    raw = config.get(CONFIG_KEY)
    if raw is None:
        return []
    source = str(config_path())
    if not isinstance(raw, dict):
        raise QbenchError(f"config file {source}: {CONFIG_KEY} must be a mapping of name to folder, e.g. '{EXAMPLE}'; fix it")
    return [_declared(str(name), value, source) for name, value in raw.items()]


def _declared(name: str, value: Any, source: str) -> DeclaredFolder:
    """Validate one entry: ``name: PATH`` or ``name: {path: PATH, templates: SET_OR_LIST}``."""
    def fail(problem: str) -> QbenchError:
        return QbenchError(f"config file {source}: {CONFIG_KEY}.{name} {problem}; fix it (e.g. '{EXAMPLE}')")

    if not NAME.match(name):
        raise fail("is not a valid name (letters, digits, '.', '_' or '-', starting with a letter or digit)")
    entry = {"path": value} if isinstance(value, str) else value
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not entry["path"].strip():
        raise fail("needs a folder path, given as 'name: PATH' or 'name: {path: PATH, templates: openai80}'")
    unknown = sorted(set(entry) - {"path", "templates"})
    if unknown:
        raise fail(f"has unknown key(s) {', '.join(map(str, unknown))} (known: path, templates)")
    return DeclaredFolder(name, entry["path"].strip(), _templates(entry.get("templates", DEFAULT_TEMPLATES), fail), source)


def _templates(value: Any, fail: Callable[[str], QbenchError]) -> tuple[str, ...]:
    """A named template set or a non-empty list of prompts, each with exactly one ``{}``."""
    if isinstance(value, str):
        if value not in TEMPLATE_SETS:
            raise fail(f"names unknown templates {value!r} (sets: {', '.join(TEMPLATE_SETS)}, or a list of prompts with {{}})")
        return TEMPLATE_SETS[value]()
    if not isinstance(value, list) or not value or not all(isinstance(item, str) and item.count("{}") == 1 for item in value):
        raise fail("templates must be a set name or a non-empty list of prompts, each with exactly one {}")
    return tuple(value)


def load_declared(declared: DeclaredFolder, request: DatasetRequest) -> FileImages:
    """The declared folder as an ``ImageFolder`` split; a missing folder is a one-line error naming the layout."""
    path = Path(declared.path).expanduser()
    layout = f"{declared.path}/<class>/<images> (ImageFolder layout, one sub-folder per class)"
    folder = path if path.is_absolute() else resolve_root(request, declared.reference, layout) / path
    if not folder.is_dir():
        where = "" if path.is_absolute() else ", or pass --data-root DIR (or QBENCH_DATA) where DIR holds it"
        raise QbenchError(
            f"dataset {declared.reference!r} (declared in {declared.source}): folder {folder} not found; expected "
            f"{folder}/<class>/<images> (ImageFolder layout, one sub-folder per class); fix its path there{where}"
        )
    names = [name.replace("_", " ") for name in class_folders(folder)]
    return folder_dataset(declared.reference, folder, declared.templates, names or None, layout="imagefolder")


@hookimpl
def qbench_register_datasets() -> list[DatasetSpec]:
    return [
        DatasetSpec(
            folder.reference, "id", f"user ImageFolder {folder.path} (declared in {folder.source})",
            "user data (ImageFolder layout)", functools.partial(load_declared, folder),
        )
        for folder in declared_folders()
    ]


@hookimpl
def qbench_register_suites() -> list[SuiteSpec]:
    return [
        SuiteSpec(
            folder.reference, folder.version,
            f"Zero-shot accuracy, ECE and NLL on the user ImageFolder {folder.path} ({len(folder.templates)} prompts).",
            (ZeroShotSpec("zeroshot", folder.reference, ZEROSHOT_METRICS),), source=folder.source,
        )
        for folder in declared_folders()
    ]
