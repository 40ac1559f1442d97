"""Regenerate the sample outputs in README.md with qbench itself (never typed by hand).

Each sample sits between ``<!-- qbench-sample:NAME -->`` and ``<!-- /qbench-sample:NAME -->`` markers:

* ``quickstart-console``: what the README's quick-start command ``qbench eval`` prints on stdout;
* ``eval-json``: an abridged ``qbench eval --json`` document of the same run (the main sections first, the
  others by name; lists cut to their first item and ``"..."``; numbers to 6 significant digits; run-specific
  values such as timings, dates, paths and versions shown as ``"..."``, so the sample changes only when the
  tool's output does).

Both come from one evaluation in a fresh temporary results store and feature cache (so nothing stale is
served), offline (``HF_HUB_OFFLINE=1``): ``qbench eval`` computes it and ``qbench eval --json`` is served from
that store. Re-running with unchanged code rewrites the same text (idempotent).

Usage: ``python scripts/readme_samples.py [--check]`` (``--check``: exit 1 if README.md differs, write nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

README = Path(__file__).resolve().parents[1] / "README.md"
SAMPLE = re.compile(r"<!-- qbench-sample:(?P<name>[\w-]+) -->\n(?P<body>.*?)<!-- /qbench-sample:(?P=name) -->", re.S)
WIDTH = 116
"""Longest JSON line of the eval-json sample before an object or list is broken over several lines."""
CONFIG_KEYS = ("model", "quantizer", "quantizer_params", "bits", "scope", "seed", "limit", "suites", "proxy", "proxy_n",
               "weights_tag", "config_hash")
"""Config fields the JSON sample shows (the rest is ``"...": "..."``)."""
VERIFICATION_KEYS = ("passed", "n_modules", "problems", "float_extras", "modules")
VARIABLE_SECTIONS = ("provenance", "timing")
"""Sections whose values differ between identical runs (machine, versions, dates, seconds): keys only."""
FIRST_SECTIONS = ("config", "verification", "results", "reliability")
"""Shown first and in full (abridged); the other sections follow by name, the variable ones last."""


def isolated_env(folder: Path) -> dict[str, str]:
    """The environment for the sample run: offline, a fresh store and cache under ``folder``, no user config."""
    env = {key: value for key, value in os.environ.items() if key not in ("QBENCH_CONFIG", "QBENCH_DATA", "QBENCH_INDEX")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", QBENCH_STORE=str(folder / "results.sqlite"),
               QBENCH_CACHE=str(folder / "features"), XDG_CONFIG_HOME=str(folder / "config"))
    return env


def run_qbench(args: list[str], env: dict[str, str]) -> str:
    """stdout of ``python -m qbench ARGS`` (stderr, progress and logs, is discarded unless it fails)."""
    done = subprocess.run([sys.executable, "-m", "qbench", *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"qbench {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return done.stdout


def evaluate() -> tuple[str, dict[str, Any]]:
    """The quick-start command's console output and its ``--json`` document (one computation)."""
    with tempfile.TemporaryDirectory(prefix="qbench-readme-") as folder:
        env = isolated_env(Path(folder))
        console = run_qbench(["eval"], env)
        document = json.loads(run_qbench(["eval", "--json"], env))
    return console, document


def console_sample(console: str) -> str:
    """The console output as a fenced block (trailing spaces stripped)."""
    lines = [line.rstrip() for line in console.strip("\n").splitlines()]
    return "```\n" + "\n".join(lines) + "\n```\n"


def json_sample_document(document: dict[str, Any]) -> dict[str, Any]:
    """The abridged document the README shows: every top-level key, in order, each reduced to what stays the
    same between identical runs."""
    sample: dict[str, Any] = {}
    order = [key for key in FIRST_SECTIONS if key in document]
    order += sorted(key for key in document if key not in FIRST_SECTIONS and key not in VARIABLE_SECTIONS)
    order += [key for key in VARIABLE_SECTIONS if key in document]
    for key in order:
        value = document[key]
        if key == "config":
            sample[key] = {name: value[name] for name in CONFIG_KEYS if name in value} | {"...": "..."}
        elif key == "verification":
            kept = {name: value[name] for name in VERIFICATION_KEYS if name in value}
            if isinstance(kept.get("modules"), list):
                kept["modules"] = _first(kept["modules"])
            sample[key] = kept
        elif key == "results":
            sample[key] = _first(value)
        elif key == "reliability" and isinstance(value, list) and value:
            first = dict(value[0])
            if isinstance(first.get("bins"), list):
                first["bins"] = _first(first["bins"])
            sample[key] = [first, "..."] if len(value) > 1 else [first]
        elif key in VARIABLE_SECTIONS and isinstance(value, dict):
            sample[key] = {name: "..." for name in value}
        else:
            sample[key] = "..."
    return _rounded(sample)


def _rounded(value: Any) -> Any:
    """Floats to 6 significant digits (the sample's numbers stay true, without 17-digit noise)."""
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_rounded(item) for item in value]
    return value


def _first(items: Any) -> Any:
    """A list cut to its first item and ``"..."``."""
    if not isinstance(items, list) or len(items) <= 1:
        return items
    return [items[0], "..."]


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


def render_json(value: Any, indent: int = 0) -> str:
    """Compact JSON: an object or list that does not fit in :data:`WIDTH` is broken over lines, its items packed
    several to a line where they fit, and an item too long for a line broken the same way."""
    if indent + len(_compact(value)) <= WIDTH or not isinstance(value, (dict, list)) or not value:
        return _compact(value)
    pad = " " * (indent + 2)
    pairs = ([(f"{_compact(key)}: ", item) for key, item in value.items()] if isinstance(value, dict)
             else [("", item) for item in value])
    lines: list[str] = []
    current = ""
    for prefix, item in pairs:
        text = prefix + _compact(item)
        if len(pad) + len(text) + 1 > WIDTH:  # an item of its own, broken over lines
            if current:
                lines.append(current)
            lines.append(prefix + render_json(item, indent + 2))
            current = ""
        elif current and len(pad) + len(current) + 2 + len(text) + 1 > WIDTH:
            lines.append(current)
            current = text
        else:
            current = f"{current}, {text}" if current else text
    if current:
        lines.append(current)
    opening, closing = ("{", "}") if isinstance(value, dict) else ("[", "]")
    return opening + "\n" + ",\n".join(pad + line for line in lines) + "\n" + " " * indent + closing


def json_sample(document: dict[str, Any]) -> str:
    """The abridged ``--json`` document as a fenced block."""
    return "```json\n" + render_json(json_sample_document(document)) + "\n```\n"


def samples() -> dict[str, str]:
    """Every README sample, by marker name, freshly produced by the tool."""
    console, document = evaluate()
    return {"quickstart-console": console_sample(console), "eval-json": json_sample(document)}


def updated_readme(text: str, fresh: dict[str, str]) -> tuple[str, list[str]]:
    """``text`` with every marked sample replaced by its fresh version, and the names of those that changed."""
    stale: list[str] = []
    found: list[str] = []

    def replace(match: re.Match) -> str:
        name = match["name"]
        found.append(name)
        if name not in fresh:
            raise SystemExit(f"README.md has an unknown sample marker {name!r} (known: {', '.join(fresh)})")
        if fresh[name] != match["body"]:
            stale.append(name)
        return f"<!-- qbench-sample:{name} -->\n{fresh[name]}<!-- /qbench-sample:{name} -->"

    updated = SAMPLE.sub(replace, text)
    missing = sorted(set(fresh) - set(found))
    if missing:
        raise SystemExit(f"README.md lacks the sample marker(s) {', '.join(missing)}")
    return updated, stale


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a sample differs from a fresh run; write nothing")
    args = parser.parse_args()
    text = README.read_text(encoding="utf-8")
    updated, stale = updated_readme(text, samples())
    if args.check:
        print("stale samples: " + ", ".join(stale) if stale else "README samples are up to date")
        return 1 if stale else 0
    if updated != text:
        from qbench.atomic import write_output

        write_output(README, updated)
    print(f"updated {len(stale)} sample(s)" + (f": {', '.join(stale)}" if stale else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
