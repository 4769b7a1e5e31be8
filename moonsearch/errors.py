"""One error type for bad input from the person running moonsearch.

A :class:`UserError` is something the user can fix (a wrong name, a missing file, an option out of
range, a malformed catalog): the command line answers it with one line on stderr and exit code 2.
Anything else is a bug and keeps its traceback. ``UserError`` is a ``ValueError`` so library callers
that catch ``ValueError`` keep working; the subclasses below also keep the builtin type their callers
may expect (a missing file is still a ``FileNotFoundError``, an unknown item still a ``KeyError``).
"""
from __future__ import annotations


class UserError(ValueError):
    """Bad input; the message names the row, file, field or option and what to do."""


class MissingFile(UserError, FileNotFoundError):
    """A file or folder the user named (or that a step before should have made) is not there."""


class UnknownItem(UserError, KeyError):
    """An item id, category or name that the index or registry does not know."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class Unavailable(RuntimeError):
    """A part of the service cannot answer now (a search shard died or timed out): HTTP 503, and the
    request is not answered from the parts that are left."""
