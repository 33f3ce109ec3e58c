"""The one error type users see: a short, actionable message, no traceback."""


class PopcError(Exception):
    """A problem with the user's input or environment, reported as one line.

    The CLI prints ``str(error)`` and exits non-zero; ``--debug`` shows the traceback.
    """
