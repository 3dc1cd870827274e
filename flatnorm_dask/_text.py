"""Error text for users: one line, whatever the exception; values shown in bounded space."""

from __future__ import annotations

import reprlib
from typing import Any


def one_line(err: BaseException) -> str:
    """The exception's message on one line (its type name when empty; a KeyError's quotes removed)."""
    text = str(err).strip() or type(err).__name__
    if isinstance(err, KeyError) and text[:1] in ("'", '"'):
        text = text[1:-1]  # KeyError repr-quotes its message
    return " ".join(text.split())


class _ShortRepr(reprlib.Repr):
    """reprlib's bounded repr, which also bounds subclasses of list, tuple and dict (a parsed document's)."""

    def repr1(self, x: Any, level: int) -> str:
        for kind, method in ((str, self.repr_str), (list, self.repr_list), (tuple, self.repr_tuple),
                             (dict, self.repr_dict)):
            if isinstance(x, kind) and type(x) is not kind:
                return method(kind(x) if kind is str else x, level)
        return super().repr1(x, level)


_SHORT = _ShortRepr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxdict = 3, 6, 6, 4


def short_repr(value: Any, limit: int = 60) -> str:
    """``repr(value)`` in at most ``limit`` characters, computed in bounded time and memory.

    A plain ``f"{value!r:.60}"`` builds the whole repr first: for a value parsed from a hostile document
    that can be huge. Here only a bounded part of a container or string is ever formatted.
    """
    _SHORT.maxstring = _SHORT.maxother = max(limit, 12)
    text = _SHORT.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
