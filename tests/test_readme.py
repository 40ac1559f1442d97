"""The README is the contract with new users: its quick-start commands are what CI runs, and the
leaderboard markdown it points to is rendered from the committed submissions."""

from __future__ import annotations

import re
from pathlib import Path

from qbench.reporting.leaderboard import load_submissions, render_markdown

REPO = Path(__file__).resolve().parents[1]


def bash_blocks(markdown: str) -> list[str]:
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", markdown, flags=re.S)]


def test_ci_runs_exactly_the_first_two_readme_commands():
    readme = (REPO / "README.md").read_text()
    first_two = bash_blocks(readme)[:2]
    assert len(first_two) == 2 and all("\n" not in block for block in first_two)
    ci_commands = [
        line.strip()
        for line in (REPO / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#") and not line.startswith(("set ", "cd "))
    ]
    assert ci_commands == first_two


def test_first_command_installs_and_runs_the_default_evaluation():
    install, tests = bash_blocks((REPO / "README.md").read_text())[:2]
    assert install.startswith("python3 -m venv .venv") and install.endswith("qbench eval")
    assert "pip install" in install and "-e '.[test,deploy]'" in install  # deploy: the int8 engines' tests run too
    assert "python -m pytest -q" in tests and tests.endswith("qbench leaderboard --check")
    # the suite runs with a third-party plugin installed: installing one must change no built-in result
    assert tests.index("pip install --no-deps --no-build-isolation ./examples/qbench-acme") < tests.index("pytest")


def test_committed_leaderboard_is_rendered_from_the_submissions():
    submissions = load_submissions(REPO / "leaderboard" / "submissions")
    assert submissions, "the leaderboard ships at least one submission"
    assert (REPO / "leaderboard" / "README.md").read_text() == render_markdown(submissions)


def test_readme_result_tables_come_from_the_command_above_them():
    """Each table between qbench-table markers has one row per configuration of the command above it,
    with the config hashes a run of that command stores (scripts/update_readme_tables.py writes them)."""
    import shlex

    from qbench.registry import build_registry
    from qbench.engine.sweep import expand_quantizer

    readme = (REPO / "README.md").read_text()
    tables = re.findall(r"```bash\n(qbench eval [^\n]*)\n```\n\n<!-- qbench-table:([\w-]+) -->\n(.*?)<!-- /qbench-table:\2 -->",
                        readme, flags=re.S)
    assert tables, "README has tool-made result tables"
    registry = build_registry()
    for command, name, body in tables:
        argv = shlex.split(command)
        quantizers = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--quantizer"]
        bits = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--bits"] or ["w8a8"]
        expanded = [name for value in quantizers for name in expand_quantizer(value, registry)]
        grid = [(q, b) for q in dict.fromkeys(expanded) for b in bits]
        rows = [line.split(" | ") for line in body.strip().splitlines()[2:]]
        if "--logit-tuning" in argv:  # an untuned and a tuned row per configuration
            grid = [(q, b, tuned) for q, b in grid for tuned in ("no", "yes")]
            header = body.strip().splitlines()[0].strip("| ").split(" | ")
            column = header.index("tuned")
            assert [(row[0].lstrip("| "), row[1], row[column]) for row in rows] == grid, name
        else:
            assert [(row[0].lstrip("| "), row[1]) for row in rows] == grid, name
        assert all(re.fullmatch(r"[0-9a-f]{16}", row[-1].rstrip(" |")) for row in rows)
