"""Errors a user can act on.

A :class:`UserError` is raised for bad input (flags, data paths, checkpoints, growth requests).
The CLI prints its message on one line prefixed with ``error:`` and exits with status 2 instead of
showing a traceback. Messages say what was wrong, what was expected and how to fix it.
"""


class UserError(Exception):
    """Bad input from the user; printed as one line, exit status 2."""


def one_line(err: BaseException) -> str:
    """The message on one line (library errors quoted in a UserError may span several)."""
    return " ".join(part.strip() for part in str(err).splitlines() if part.strip())


def require(condition: bool, message: str) -> None:
    """Raise :class:`UserError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise UserError(message)


class ArgumentParser(__import__("argparse").ArgumentParser):
    """argparse with Megatron-LM's ``allow_abbrev=False`` and errors as one-line :class:`UserError`\\ s.

    Abbreviations are off because with hundreds of flags a prefix silently taken as another flag
    (``--lr-warmup`` for ``--lr-warmup-iters`` today, for a different one tomorrow) is a wrong run.
    argparse's own error (usage screen + message, exit 2) becomes one ``error:`` line, exit 2.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message} (see {self.prog} --help)")
