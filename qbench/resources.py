"""Scorer resources: the user files and values a scorer declares it reads, and their typed, hashed values.

Kept apart from :mod:`qbench.scoring` (which needs numpy) so that a plugin module declaring resources or
commands stays light to import; :mod:`qbench.scoring` re-exports every name. See :mod:`qbench.scoring`
("Resources") for how the declarations reach ``qbench eval`` and the configuration.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping

from qbench.errors import QbenchError, warn

if TYPE_CHECKING:
    from qbench.scoring import Scorer

__all__ = ["ResourceOption", "ScorerResources", "declared_resources", "parse_resources", "resource_fingerprints"]

RESOURCE_KINDS: tuple[str, ...] = ("file", "folder", "path", "value")
"""``file``/``folder``: a path of that kind; ``path``: a file or a folder; ``value``: a plain string (a model id)."""
_RESOURCE_KEY = re.compile(r"[a-z][a-z0-9_]*")
_RESOURCE_FLAG = re.compile(r"--[a-z][a-z0-9-]*")


@dataclass(frozen=True)
class ResourceOption:
    """One user-supplied file or value a scorer reads, declared in ``Scorer.resources``.

    ``key`` names it everywhere: ``--resource KEY=VALUE``, a run-config key, the ``scorer_resources`` entry
    of the configuration (its content hash) and ``ScoreContext.resources[key]``. ``flag`` (``--my-lexicon``),
    when given, is a dedicated ``qbench eval`` option for it. ``kind`` says how the value is read:
    ``file``, ``folder`` or ``path`` (either) become a :class:`~pathlib.Path` whose content is hashed;
    ``value`` stays a string that is hashed as written.
    """

    key: str
    kind: str
    help: str
    flag: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not _RESOURCE_KEY.fullmatch(self.key):
            raise QbenchError(f"scorer resource key {self.key!r} must be lower-case letters, digits and '_' "
                              "(e.g. 'my_lexicon')")
        if self.kind not in RESOURCE_KINDS:
            raise QbenchError(f"scorer resource {self.key!r} has kind {self.kind!r}; use one of {', '.join(RESOURCE_KINDS)}")
        if self.flag is not None and (not isinstance(self.flag, str) or not _RESOURCE_FLAG.fullmatch(self.flag)):
            raise QbenchError(f"scorer resource {self.key!r} has flag {self.flag!r}; use a long option such as "
                              f"'--{self.key.replace('_', '-')}'")

    @property
    def label(self) -> str:
        """How the user gives it: the flag, else ``--resource KEY``."""
        return self.flag or f"--resource {self.key}"

    def convert(self, raw: Any) -> Path | str:
        """The typed value of ``raw`` as the user wrote it: an expanded :class:`Path`, or the string itself.

        An existing path of the wrong kind (a folder for a ``file``) is a one-line error; whether the path
        exists is checked when the run is resolved, as for every resource.
        """
        text = str(raw).strip()
        if not text:
            raise QbenchError(f"{self.label} needs a value ({self.help})")
        if self.kind == "value":
            return text
        path = Path(text).expanduser()
        if self.kind == "file" and path.is_dir():
            raise QbenchError(f"{self.label} {path} is a folder; pass a file ({self.help})")
        if self.kind == "folder" and path.exists() and not path.is_dir():
            raise QbenchError(f"{self.label} {path} is not a folder; pass a folder ({self.help})")
        return path


class ScorerResources(Mapping[str, "Path | str"]):
    """User-supplied scorer resources: an immutable mapping from a declared key to a Path or a string.

    Built from a mapping and/or keyword arguments (``ScorerResources({"my_lexicon": path})``,
    ``ScorerResources(my_lexicon=path)``); ``None`` values mean "not given" and are dropped. Every value is
    recorded in the configuration (:func:`resource_fingerprints`).
    """

    __slots__ = ("_items",)

    def __init__(self, values: Mapping[str, Path | str | None] | None = None, /, **named: Path | str | None) -> None:
        merged = {**dict(values or {}), **named}
        items = []
        for key, value in merged.items():
            if value is None:
                continue
            if not isinstance(key, str) or not key:
                raise QbenchError(f"scorer resource keys are non-empty strings, got {key!r}")
            if not isinstance(value, (Path, str)):
                raise QbenchError(f"scorer resource {key!r} must be a path or a string, got {type(value).__name__}")
            items.append((key, value))
        object.__setattr__(self, "_items", tuple(sorted(items, key=lambda item: item[0])))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("ScorerResources is immutable")

    def __reduce__(self) -> tuple[Any, ...]:
        """Rebuilt from its items (copies, and the job files of a sweep's workers), not by setting attributes."""
        return (ScorerResources, (dict(self._items),))

    def __getitem__(self, key: str) -> Path | str:
        for name, value in self._items:
            if name == key:
                return value
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(name for name, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(self._items)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ScorerResources):
            return self._items == other._items
        return isinstance(other, Mapping) and dict(self._items) == dict(other)

    def __repr__(self) -> str:
        return f"ScorerResources({dict(self._items)!r})"

    def path(self, key: str) -> Path | None:
        """The resource ``key`` as an expanded path, or None when it was not given."""
        value = self.get(key)
        return None if value is None else Path(value).expanduser()


def resource_fingerprints(resources: Mapping[str, Path | str]) -> dict[str, str]:
    """What the configuration records of each given resource, under its key.

    A path: the first 16 hex digits of a SHA-256 over its content (a folder: every file, by relative path
    and bytes, sorted; a file: its name and bytes), so the hash changes when a lexicon or label file
    does and not when it moves. A string value: the string itself. A path that does not exist is a
    one-line error.
    """
    prints: dict[str, str] = {}
    for key, value in resources.items():
        if not isinstance(value, Path):
            prints[key] = str(value)
            continue
        path = value
        if not path.exists():
            raise QbenchError(f"{key.replace('_', '-')} path {path} does not exist; pass an existing file or folder")
        digest = hashlib.sha256()
        for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if file.is_file():
                digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
                digest.update(file.read_bytes())
        prints[key] = digest.hexdigest()[:16]
    return prints


def declared_resources(scorers: Iterable[type["Scorer"]]) -> dict[str, ResourceOption]:
    """Every resource the given scorer classes declare, by key (the first declaration of a key wins).

    Two scorers may share a key (and so one file) only if they declare it identically; a different
    declaration of the same key, or a flag already used by another key, is one warning and is ignored.
    """
    declared: dict[str, ResourceOption] = {}
    flags: dict[str, str] = {}
    for scorer in scorers:
        for option in getattr(scorer, "resources", ()) or ():
            if not isinstance(option, ResourceOption):
                warn(f"scorer {getattr(scorer, 'name', scorer)!r} declares a resource that is not a ResourceOption "
                     f"({option!r}); it is ignored")
                continue
            known = declared.get(option.key)
            if known is not None and known != option:
                warn(f"scorer {scorer.name!r} declares resource {option.key!r} differently from another scorer; "
                     "the first declaration is kept")
                continue
            if option.flag is not None and flags.get(option.flag, option.key) != option.key:
                warn(f"scorer {scorer.name!r}: flag {option.flag} of resource {option.key!r} is already used by "
                     f"resource {flags[option.flag]!r}; give it another flag (it stays available as --resource)")
                option = dataclasses.replace(option, flag=None)
            declared.setdefault(option.key, option)
            if option.flag is not None:
                flags[option.flag] = option.key
    return declared


def parse_resources(declared: Mapping[str, ResourceOption], given: Mapping[str, Any],
                    assignments: Iterable[str] = ()) -> ScorerResources:
    """:class:`ScorerResources` from values given by key (dedicated flags, run-config keys; ``None`` = not
    given) and ``KEY=VALUE`` assignments (``--resource``). Every key must be declared by a registered
    scorer; an unknown key is a one-line error with the close matches; a key given twice is an error."""
    values: dict[str, Path | str] = {}
    for key, raw in given.items():
        if raw is None:
            continue
        values[key] = _declared(declared, key).convert(raw)
    for assignment in assignments:
        key, sep, raw = str(assignment).partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise QbenchError(f"bad --resource {assignment!r}: use KEY=VALUE (keys: {', '.join(sorted(declared)) or 'none declared'})")
        option = _declared(declared, key)
        if key in values:
            raise QbenchError(f"scorer resource {key!r} is given twice ({option.label} and --resource {key}); give it once")
        values[key] = option.convert(raw)
    return ScorerResources(values)


def _declared(declared: Mapping[str, ResourceOption], key: str) -> ResourceOption:
    """The declaration of ``key``, or a one-line error naming the close matches and every declared key."""
    if key in declared:
        return declared[key]
    close = difflib.get_close_matches(key, list(declared), n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(name) for name in close)}?" if close else ""
    listed = ", ".join(sorted(declared)) or "none declared"
    raise QbenchError(f"unknown scorer resource {key!r}{hint} (resources of the registered scorers: {listed}; "
                      "see 'qbench eval --help')")
