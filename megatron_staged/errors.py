"""Errors a user can act on.

A :class:`UserError` is raised for bad input (flags, data paths, checkpoints, growth requests).
The CLI prints its message on one line prefixed with ``error:`` and exits with status 2 instead of
showing a traceback. Messages say what was wrong, what was expected and how to fix it.
"""


class UserError(Exception):
    """Bad input from the user; printed as one line, exit status 2."""


def require(condition: bool, message: str) -> None:
    """Raise :class:`UserError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise UserError(message)
