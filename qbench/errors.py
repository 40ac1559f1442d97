"""User-facing errors.

Every problem a user can cause (unknown plugin, bad bit spec, missing dataset root, unreadable
checkpoint, malformed submission) is raised as :class:`QbenchError` with a one-line message that names
the fix. The CLI prints ``qbench: <message>`` and exits non-zero without a traceback.
"""


class QbenchError(Exception):
    """An error caused by user input; its message is one line that says how to fix it."""
