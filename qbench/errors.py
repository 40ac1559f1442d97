"""User-facing errors.

Every problem a user can cause (unknown plugin, bad bit spec, missing dataset root, unreadable
checkpoint, malformed submission) is raised as :class:`QbenchError` with a one-line message that names
the fix. The CLI prints ``qbench: <message>`` and exits non-zero without a traceback.
"""

__all__ = ["QbenchError", "warn"]


class QbenchError(Exception):
    """An error caused by user input; its message is one line that says how to fix it."""


def warn(message: str) -> None:
    """Print one line, ``qbench: warning: <message>``, on stderr: a problem that does not stop the command (a
    malformed suite file that is skipped, a plugin that could not register). Whitespace is collapsed, so the
    warning stays on one line."""
    import sys

    print(f"qbench: warning: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
