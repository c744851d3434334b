"""The one exception type localkv raises for problems a user can fix.

The CLI prints its message as one red line on stderr and exits non-zero; the
Python API lets it propagate. Anything else escaping is a bug.
"""


class LocalkvError(Exception):
    """A user-facing error: the message is one line that says what to do."""

    exit_code = 1


class Interrupted(LocalkvError):
    """The caller asked to stop (Ctrl-C, a client gone) while a prompt was read; the turn was rolled back."""

    exit_code = 130
