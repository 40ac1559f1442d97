"""NegLabel's candidate lexicon: the shipped WordNet 3.0 rebuild, user lexicons, and the WordNet parser.

``scoring.md`` §1.5. A lexicon is two ordered, duplicate-free word lists: nouns and adjectives. It can
come from three places, and every path ends in the same :class:`Lexicon`:

- the **shipped** lexicon, ``neglabel_lexicon/nouns.txt`` + ``adjectives.txt`` next to this module,
  rebuilt from WordNet 3.0 by ``scripts/build_neglabel_lexicon.py`` (which calls
  :func:`parse_wordnet` below, so there is one implementation). It is a *rebuild* from WordNet, not
  the list released with the NegLabel paper; the spec measures the difference at about 1.5 %;
- a **user lexicon** (``--neglabel-lexicon PATH``): a folder of ``noun*``/``adj*`` files in the
  reference layout, or a single text file (nouns only), see :func:`load_lexicon`;
- a **WordNet 3.0 dict folder** (``--neglabel-wordnet DICT``), see :func:`parse_wordnet`.

Every user mistake (missing path, nothing usable in it) is a one-line :class:`QbenchError`.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator

from qbench.errors import QbenchError

SHIPPED_FOLDER = "neglabel_lexicon"
NOUNS_FILE = "nouns.txt"
ADJECTIVES_FILE = "adjectives.txt"
SHIPPED_SOURCE = "wordnet-3.0 rebuild (shipped)"

EXCLUDED_NOUN_LEXFILES = frozenset({"noun.animal", "noun.food"})
ADJECTIVE_LEXFILES = frozenset({"adj.all", "adj.pert", "adj.ppl"})

# lexnames(5WN) of WordNet 3.0: used when a dict folder lacks its ``lexnames`` file.
WORDNET30_LEXNAMES: dict[int, str] = dict(enumerate((
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling",
    "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person",
    "noun.phenomenon", "noun.plant", "noun.possession", "noun.process", "noun.quantity", "noun.relation",
    "noun.shape", "noun.state", "noun.substance", "noun.time", "verb.body", "verb.change",
    "verb.cognition", "verb.communication", "verb.competition", "verb.consumption", "verb.contact",
    "verb.creation", "verb.emotion", "verb.motion", "verb.perception", "verb.possession", "verb.social",
    "verb.stative", "verb.weather", "adj.ppl",
)))

# Adjective syntactic markers appended to a lemma in data.adj (wninput(5WN)): "galore(ip)".
_SENSE_MARKER = re.compile(r"\((?:a|p|ip)\)$")


@dataclass(frozen=True)
class Lexicon:
    """Candidate negative labels: nouns then adjectives, each in reading order, no word in both.

    ``source`` says where the words came from (recorded in provenance with :attr:`sha256`).
    """

    nouns: tuple[str, ...]
    adjectives: tuple[str, ...]
    source: str

    @property
    def sha256(self) -> str:
        """SHA-256 of the final list: one ``n\\t<word>\\n`` line per noun, then ``a\\t<word>\\n`` per adjective."""
        digest = hashlib.sha256()
        for tag, words in (("n", self.nouns), ("a", self.adjectives)):
            for word in words:
                digest.update(f"{tag}\t{word}\n".encode())
        return digest.hexdigest()

    def __len__(self) -> int:
        return len(self.nouns) + len(self.adjectives)


def dedupe(nouns: Iterable[str], adjectives: Iterable[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Keep each word's first occurrence; a word already seen as a noun is not repeated as an adjective."""
    seen: set[str] = set()

    def first_occurrences(words: Iterable[str]) -> tuple[str, ...]:
        kept = []
        for word in words:
            if word not in seen:
                seen.add(word)
                kept.append(word)
        return tuple(kept)

    kept_nouns = first_occurrences(nouns)  # nouns first: they claim shared words
    return kept_nouns, first_occurrences(adjectives)


def _build(nouns: Iterable[str], adjectives: Iterable[str], source: str, where: Path) -> Lexicon:
    """Dedupe into a :class:`Lexicon`; an empty result is the user's error, named with its path."""
    kept_nouns, kept_adjectives = dedupe(nouns, adjectives)
    if not kept_nouns and not kept_adjectives:
        raise QbenchError(f"NegLabel lexicon {where} holds no words: expected one word or phrase per line")
    return Lexicon(kept_nouns, kept_adjectives, source)


# ---------------------------------------------------------------- plain word lists (user, shipped)


def read_word_file(path: Path) -> list[str]:
    """Stripped non-blank lines of a UTF-8 text file, in order."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise QbenchError(f"cannot read NegLabel lexicon file {path} ({type(error).__name__}): "
                          "expected a UTF-8 text file with one word per line") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_lexicon(path: Path | str) -> Lexicon:
    """A user lexicon: a folder of ``noun*``/``adj*`` files, or one text file read as nouns.

    In a folder, files whose name starts with ``noun`` hold nouns and those starting with ``adj`` hold
    adjectives (the reference layout ``noun.act.txt``, ``adj.all.txt``; the shipped ``nouns.txt`` /
    ``adjectives.txt`` also qualify); others are ignored. Noun files are read in sorted file-name
    order, then adjective files likewise, so a noun is never repeated as an adjective.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        return _load_folder(path)
    if path.is_file():
        return _build(read_word_file(path), (), f"lexicon file {path}", path)
    raise QbenchError(f"NegLabel lexicon {path} does not exist: expected a folder of noun.*/adj.* "
                      "text files or a single text file with one noun per line")


def _load_folder(folder: Path) -> Lexicon:
    files = sorted(entry for entry in folder.iterdir() if entry.is_file())
    noun_files = [entry for entry in files if entry.name.startswith("noun")]
    adjective_files = [entry for entry in files if entry.name.startswith("adj")]
    if not noun_files and not adjective_files:
        raise QbenchError(f"NegLabel lexicon folder {folder} has no noun*/adj* files: expected "
                          "files such as noun.act.txt and adj.all.txt with one word per line")
    nouns = [word for entry in noun_files for word in read_word_file(entry)]
    adjectives = [word for entry in adjective_files for word in read_word_file(entry)]
    return _build(nouns, adjectives, f"lexicon folder {folder}", folder)


@lru_cache(maxsize=1)
def shipped_lexicon() -> Lexicon:
    """The WordNet 3.0 rebuild shipped in ``qbench_plugins/scorers/neglabel_lexicon/`` (read once)."""
    folder = importlib.resources.files(__package__).joinpath(SHIPPED_FOLDER)
    words = {}
    for name in (NOUNS_FILE, ADJECTIVES_FILE):
        resource = folder.joinpath(name)
        if not resource.is_file():
            raise QbenchError(f"the shipped NegLabel lexicon file {name} is missing from {folder}: "
                              "reinstall qbench or rebuild it with scripts/build_neglabel_lexicon.py")
        words[name] = [line.strip() for line in resource.read_text(encoding="utf-8").splitlines() if line.strip()]
    return _build(words[NOUNS_FILE], words[ADJECTIVES_FILE], SHIPPED_SOURCE, Path(str(folder)))


def write_lexicon(lexicon: Lexicon, folder: Path) -> tuple[Path, Path]:
    """Write ``nouns.txt`` and ``adjectives.txt`` (one entry per line) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, words in ((NOUNS_FILE, lexicon.nouns), (ADJECTIVES_FILE, lexicon.adjectives)):
        target = folder / name
        target.write_text("".join(f"{word}\n" for word in words), encoding="utf-8")
        written.append(target)
    return written[0], written[1]


# ---------------------------------------------------------------- WordNet 3.0 dict folder


def normalise_lemma(lemma: str) -> str:
    """A data-file lemma as a lexicon entry: marker ``(a)``/``(p)``/``(ip)`` removed, ``_``→space, lowercase."""
    return _SENSE_MARKER.sub("", lemma).replace("_", " ").lower()


def read_lexnames(dict_dir: Path) -> dict[int, str]:
    """Lexicographer file number → name from ``dict/lexnames`` (the WordNet 3.0 table if it is absent)."""
    path = dict_dir / "lexnames"
    if not path.is_file():
        return dict(WORDNET30_LEXNAMES)
    names: dict[int, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0].isdigit():
            names[int(fields[0])] = fields[1]
    return names


def data_files(dict_dir: Path, pos: str) -> list[Path]:
    """``data.<pos>``, or its split parts ``data.<pos>1``, ``data.<pos>2``, … in numeric order."""
    whole = dict_dir / f"data.{pos}"
    if whole.is_file():
        return [whole]
    parts = [entry for entry in dict_dir.glob(f"data.{pos}*") if entry.name[len(f"data.{pos}"):].isdigit()]
    return sorted(parts, key=lambda entry: int(entry.name[len(f"data.{pos}"):]))


def iter_synsets(paths: Iterable[Path]) -> Iterator[tuple[int, str]]:
    """``(lex file number, first lemma)`` of every synset line; license lines (leading space) skipped.

    Data line: ``offset lex_filenum ss_type w_cnt word lex_id ...`` (wndb(5WN)).
    """
    for path in paths:
        with path.open(encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip() or line[0] == " ":
                    continue
                fields = line.split(" ", 5)
                if len(fields) < 5 or not fields[1].isdigit():
                    raise QbenchError(f"{path}:{line_number} is not a WordNet data line: expected "
                                      "'offset lex_filenum ss_type w_cnt word lex_id ...'")
                yield int(fields[1]), fields[4]


def parse_wordnet(dict_dir: Path | str) -> Lexicon:
    """The NegLabel lexicon from a WordNet 3.0 ``dict`` folder, following ``scoring.md`` §1.5.

    The first lemma of each synset in an allowed lexicographer file (every ``noun.*`` except
    ``noun.animal`` and ``noun.food``; ``adj.all``, ``adj.pert``, ``adj.ppl``; the file number is read
    from the data line), normalised by :func:`normalise_lemma`. Synsets are grouped by lexicographer
    file and the files read in sorted name order (data-file order within one), nouns first; the first
    occurrence of each word is kept and a noun is not repeated as an adjective.
    """
    dict_dir = Path(dict_dir).expanduser()
    noun_paths, adjective_paths = data_files(dict_dir, "noun"), data_files(dict_dir, "adj")
    if not dict_dir.is_dir() or not noun_paths or not adjective_paths:
        raise QbenchError(f"{dict_dir} is not a WordNet 3.0 dict folder: expected data.noun (or "
                          "data.noun1, data.noun2, ...) and data.adj in it")
    lexnames = read_lexnames(dict_dir)
    nouns = _by_lexfile(iter_synsets(noun_paths), lexnames, _is_allowed_noun_file)
    adjectives = _by_lexfile(iter_synsets(adjective_paths), lexnames, ADJECTIVE_LEXFILES.__contains__)
    return _build(nouns, adjectives, f"wordnet dict {dict_dir}", dict_dir)


def _is_allowed_noun_file(name: str) -> bool:
    return name.startswith("noun.") and name not in EXCLUDED_NOUN_LEXFILES


def _by_lexfile(synsets: Iterable[tuple[int, str]], lexnames: dict[int, str], allowed) -> list[str]:
    """Normalised lemmas of the allowed lexicographer files, concatenated in sorted file-name order."""
    groups: dict[str, list[str]] = {}
    for number, lemma in synsets:
        name = lexnames.get(number, f"lexfile.{number}")
        if allowed(name):
            groups.setdefault(name, []).append(normalise_lemma(lemma))
    return [word for name in sorted(groups) for word in groups[name]]
