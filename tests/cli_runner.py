"""Running the CLI in-process for tests: exit code, stdout and stderr of one ``qbench`` invocation."""

from __future__ import annotations

from qbench.cli import main


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    try:
        main(list(args))
        code = 0
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err
