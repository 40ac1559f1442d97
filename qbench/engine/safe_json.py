"""Reading JSON that someone else wrote: bounded in size and depth, strict about what JSON allows.

Python's ``json`` module accepts things a document exchanged between people should not contain, and fails
badly on others:

* ``NaN``, ``Infinity`` and ``-Infinity`` literals (not JSON, but ``json.loads`` takes them), and numbers such as
  ``1.8e308`` that overflow to infinity;
* duplicate object keys (the last one silently wins, so a reviewer reading the first sees another number);
* arbitrarily deep nesting, which ends in a ``RecursionError`` traceback (the C parser recurses);
* arbitrarily large files, strings and arrays (memory, and a rendered table nobody can review).

:func:`read_json_file` and :func:`parse_json_text` refuse all of these with one :class:`~qbench.errors.QbenchError`
line that names the source, the key path where the problem sits (``results[3].fp32``) and the fix. The depth is
checked on the raw text *before* parsing, by a loop over the characters (no recursion), so a 200,000-deep array is
refused without ever reaching the parser.
"""

from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from qbench.errors import QbenchError

MAX_JSON_BYTES = 5 * 1024 * 1024
"""Largest file :func:`read_json_file` reads (5 MiB). A full toy evaluation document is ~100 KiB; a pretrained
model's with every OOD suite and scorer stays well below 1 MiB."""
MAX_JSON_DEPTH = 32
"""Deepest nesting of arrays/objects accepted. Result documents nest at most 6 levels."""
MAX_STRING_CHARS = 4096
"""Longest string anywhere in a document (a file path is at most 4096 bytes on Linux)."""
MAX_ARRAY_ITEMS = 20_000
"""Most items in any one array or members in any one object."""
MAX_NUMBER_CHARS = 40
"""Longest number literal: a float64 needs at most 24 characters; longer literals only serve to stall parsing."""
MAX_NODES = 1_000_000
"""Most values (numbers, strings, arrays, objects, ...) in one document."""

_CONSTANTS = ("NaN", "Infinity", "-Infinity")


@dataclass(frozen=True)
class _Rejected:
    """Placeholder the parser hooks put where a value is not acceptable; reported with its path after parsing."""

    reason: str


class _Objects(dict):
    """A JSON object built by :func:`_object_hook`; ``duplicate`` names a key that appeared more than once."""

    duplicate: str | None = None


def _object_hook(pairs: list[tuple[str, Any]]) -> _Objects:
    """Build an object from its key/value pairs, remembering (not silently dropping) a repeated key."""
    built = _Objects()
    for key, value in pairs:
        if key in built and built.duplicate is None:
            built.duplicate = key
        built[key] = value
    return built


def _reject_constant(name: str) -> _Rejected:
    return _Rejected(f"is {name}, which is not JSON (NaN and infinities have no JSON form)")


def _parse_float(text: str) -> float | _Rejected:
    if len(text) > MAX_NUMBER_CHARS:
        return _Rejected(f"is a number literal of {len(text)} characters (at most {MAX_NUMBER_CHARS})")
    value = float(text)
    if not math.isfinite(value):
        return _Rejected(f"is {text}, which overflows a 64-bit float (not a finite number)")
    return value


def _parse_int(text: str) -> int | _Rejected:
    if len(text) > MAX_NUMBER_CHARS:
        return _Rejected(f"is a number literal of {len(text)} characters (at most {MAX_NUMBER_CHARS})")
    return int(text)


def nesting_depth(text: str, limit: int = MAX_JSON_DEPTH) -> tuple[int, int] | None:
    """``(depth, offset)`` of the first bracket that opens nesting deeper than ``limit``, else None.

    Scans the raw text in one loop (string contents and their escapes skipped), so the depth of a hostile
    document is known before the recursive parser ever sees it.
    """
    depth = 0
    in_string = False
    escaped = False
    for offset, char in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                return depth, offset
        elif char in "]}":
            depth -= 1
    return None


def _line_column(text: str, offset: int) -> tuple[int, int]:
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


def _walk(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every ``(path, value)`` pair of a parsed document, parents first, iteratively (depth is already bounded)."""
    stack = [(path, value)]
    while stack:
        current_path, current = stack.pop()
        yield current_path, current
        if isinstance(current, dict):
            children = [(f"{current_path}.{key}" if current_path else str(key), item) for key, item in current.items()]
        elif isinstance(current, list):
            children = [(f"{current_path}[{index}]", item) for index, item in enumerate(current)]
        else:
            continue
        stack.extend(reversed(children))


def _where(path: str) -> str:
    return path or "the top-level value"


def _first_problem(document: Any) -> str | None:
    """The first hook placeholder, repeated key or size-limit breach in ``document``, as ``path problem``."""
    nodes = 0
    for path, value in _walk(document):
        nodes += 1
        if nodes > MAX_NODES:
            return f"the document holds more than {MAX_NODES:,} values"
        if isinstance(value, _Rejected):
            return f"{_where(path)} {value.reason}"
        if isinstance(value, _Objects) and value.duplicate is not None:
            return f"{_where(path)} repeats the key {json.dumps(value.duplicate)[:60]} (keys must be unique)"
        if isinstance(value, str) and len(value) > MAX_STRING_CHARS:
            return f"{_where(path)} is a string of {len(value):,} characters (at most {MAX_STRING_CHARS:,})"
        if isinstance(value, (list, dict)) and len(value) > MAX_ARRAY_ITEMS:
            kind = "array" if isinstance(value, list) else "object"
            return f"{_where(path)} is an {kind} of {len(value):,} entries (at most {MAX_ARRAY_ITEMS:,})"
        if isinstance(value, dict):
            for key in value:
                if len(key) > MAX_STRING_CHARS:
                    return f"{_where(path)} has a key of {len(key):,} characters (at most {MAX_STRING_CHARS:,})"
    return None


def _plain(value: Any) -> Any:
    """``value`` with every :class:`_Objects` turned into a plain dict (iteratively, depth is bounded)."""
    if not isinstance(value, (dict, list)):
        return value
    root = dict(value) if isinstance(value, dict) else list(value)
    stack = [root]
    while stack:
        container = stack.pop()
        keys = container.keys() if isinstance(container, dict) else range(len(container))
        for key in keys:
            item = container[key]
            if isinstance(item, (dict, list)):
                item = dict(item) if isinstance(item, dict) else list(item)
                container[key] = item
                stack.append(item)
    return root


def parse_json_text(text: str, source: str) -> Any:
    """Parse untrusted JSON ``text``; every refusal is one :class:`QbenchError` line prefixed with ``source``.

    Refused: nesting deeper than :data:`MAX_JSON_DEPTH` (checked before parsing), syntax errors (line and column
    given), ``NaN``/``Infinity`` literals, numbers that overflow a float or run longer than
    :data:`MAX_NUMBER_CHARS` characters, duplicate keys, strings longer than :data:`MAX_STRING_CHARS`, arrays
    or objects with more than :data:`MAX_ARRAY_ITEMS` entries, and more than :data:`MAX_NODES` values.
    """
    deep = nesting_depth(text)
    if deep is not None:
        line, column = _line_column(text, deep[1])
        raise QbenchError(f"{source}: JSON nests deeper than {MAX_JSON_DEPTH} levels (line {line} column {column}); "
                          "a result document never does, re-export it with qbench")
    try:
        document = json.loads(text, object_pairs_hook=_object_hook, parse_constant=_reject_constant,
                              parse_float=_parse_float, parse_int=_parse_int)
    except json.JSONDecodeError as error:
        raise QbenchError(f"{source}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg}") from None
    except (ValueError, RecursionError) as error:  # defensive: the depth scan should make RecursionError impossible
        raise QbenchError(f"{source}: invalid JSON ({type(error).__name__}: {str(error)[:120]})") from None
    problem = _first_problem(document)
    if problem is not None:
        raise QbenchError(f"{source}: {problem}; re-export the file with qbench")
    return _plain(document)


def read_json_file(path: Path | str, *, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Read and parse the untrusted JSON file ``path`` (see :func:`parse_json_text`).

    The file is opened without following a symbolic link and must be a regular file of at most ``max_bytes``
    bytes holding UTF-8 text; at most ``max_bytes + 1`` bytes are ever read, so a huge file costs nothing.
    """
    path = Path(path)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        descriptor = os.open(path, flags)
    except OSError as error:
        if os.path.islink(path):
            raise QbenchError(f"{path}: is a symbolic link; submit the file itself, not a link") from None
        raise QbenchError(f"{path}: cannot read ({error.strerror or error})") from None
    with os.fdopen(descriptor, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise QbenchError(f"{path}: is not a regular file; submit a plain JSON file")
        if info.st_size > max_bytes:
            raise QbenchError(f"{path}: is {_size(info.st_size)}, more than the {_size(max_bytes)} a JSON document may "
                              "have; re-export it with qbench")
        raw = handle.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise QbenchError(f"{path}: is larger than the {_size(max_bytes)} a JSON document may have; re-export it with qbench")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        column = error.start - (raw.rfind(b"\n", 0, error.start) + 1) + 1
        raise QbenchError(f"{path}: is not UTF-8 text (byte 0x{raw[error.start]:02x} at line {line} byte {column}); "
                          "save it as UTF-8") from None
    return parse_json_text(text, str(path))


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 1024 / 1024:.1f} MiB" if n_bytes >= 1024 * 1024 else f"{n_bytes:,} bytes"
