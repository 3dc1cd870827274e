"""Error text for users: one line, whatever the exception."""

from __future__ import annotations


def one_line(err: BaseException) -> str:
    """The exception's message on one line (its type name when empty; a KeyError's quotes removed)."""
    text = str(err).strip() or type(err).__name__
    if isinstance(err, KeyError) and text[:1] in ("'", '"'):
        text = text[1:-1]  # KeyError repr-quotes its message
    return " ".join(text.split())
