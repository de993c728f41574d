"""Cutting long text (a traceback, a log) down for an error message."""

from __future__ import annotations


def tail(text: str, lines: int) -> str:
    """The last `lines` lines of `text`, blank space around it dropped: a traceback's end names the failure,
    and a message that carries all of it buries that under frames the worker's own log already holds."""
    return "\n".join(text.strip().splitlines()[-lines:])
