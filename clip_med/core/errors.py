"""Exception classes shared by the layers (no imports: the shard writer's workers import this too)."""

from __future__ import annotations


class UnknownName(KeyError, ValueError):
    """A name that is not among the known ones (a task, a label, a split, a column, a template field).

    A ``KeyError`` for code that looks names up, and a ``ValueError`` so that the command line
    reports it as the user's mistake (one line) rather than as a bug (a traceback).
    """

    def __str__(self) -> str:  # KeyError's own str() quotes the message
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()
