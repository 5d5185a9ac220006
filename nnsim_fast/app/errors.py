"""How the command line reports a bad argument: one line on stderr, exit status 2."""
from __future__ import annotations

import re

PROG = "nnsim-fast"


class UsageError(Exception):
    """A bad argument or input: reported as one line on stderr, exit status 2."""

    def __init__(self, message: str, prog: str = PROG) -> None:
        super().__init__(message)
        self.prog = prog


def one_line(error: BaseException) -> str:
    """An exception's message on one line (a KeyError's key without its quotes)."""
    text = str(error).strip() or type(error).__name__
    if isinstance(error, KeyError) and len(error.args) == 1 and isinstance(error.args[0], str):
        text = error.args[0]
    return re.sub(r"\s+", " ", text)
