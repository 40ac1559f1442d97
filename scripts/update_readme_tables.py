"""Regenerate the result tables in README.md with qbench itself (never typed by hand).

Each table sits between ``<!-- qbench-table:NAME -->`` and ``<!-- /qbench-table:NAME -->`` markers and is
produced by the ``qbench eval`` command printed above it in the README; this script runs that command
with ``--markdown`` and splices the output in. Results come from (and go to) the results store, so a
re-run after an unchanged evaluation is fast.

Usage: ``python scripts/update_readme_tables.py [--check] [NAME ...]``
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
TABLE = re.compile(
    r"(?P<command>```bash\n(?P<argv>qbench eval [^\n]*)\n```\n\n)"
    r"<!-- qbench-table:(?P<name>[\w-]+) -->\n(?P<body>.*?)<!-- /qbench-table:(?P=name) -->",
    re.S,
)


def render(argv: str) -> str:
    """Run one README ``qbench eval`` command with ``--markdown`` and return the table it writes."""
    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder) / "table.md"
        command = [sys.executable, "-m", "qbench", *shlex.split(argv)[1:], "--markdown", str(target)]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        return target.read_text()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="tables to regenerate (default: all)")
    parser.add_argument("--check", action="store_true", help="exit 1 if a table differs from a fresh run")
    args = parser.parse_args()
    text = README.read_text()
    stale = []

    def replace(match: re.Match) -> str:
        if args.names and match["name"] not in args.names:
            return match[0]
        body = render(match["argv"])
        if body != match["body"]:
            stale.append(match["name"])
        return f"{match['command']}<!-- qbench-table:{match['name']} -->\n{body}<!-- /qbench-table:{match['name']} -->"

    updated = TABLE.sub(replace, text)
    if args.check:
        print("stale tables: " + ", ".join(stale) if stale else "README tables are up to date")
        return 1 if stale else 0
    README.write_text(updated)
    print(f"updated {len(stale)} table(s)" + (f": {', '.join(stale)}" if stale else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
