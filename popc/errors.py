"""The one error type users see: a short, actionable message, no traceback."""


class PopcError(Exception):
    """A problem with the user's input or environment, reported as one line.

    The CLI prints ``str(error)`` and exits non-zero; ``--debug`` shows the traceback.
    """


class NotOnIndex(PopcError):
    """A distribution popc fetches (evaluation data) that the package index does not offer:
    the environment's, not the user's, to fix."""
