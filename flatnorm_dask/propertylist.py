"""The LSST PropertyList YAML format: its vocabulary, a fast exact reader, PyYAML's loaders, and a writer.

The butler stores a PropertyList as a YAML sequence tagged ``!<lsst.daf.base.PropertyList>`` whose items are
``[name, type, value, comment]`` lists (see ``FORMATS.md`` in the shared reference), written by PyYAML.
Loading one with PyYAML costs milliseconds, while the file itself reads in tens of microseconds, so this
module has a specialised parser for the shapes PyYAML emits: items in block or flow style (mixed within a
document, as ``default_flow_style=None`` writes them), names with spaces and dots, every element type
(numbers, plain, quoted and ``!<lsst.daf.base.DateTime>`` strings, ``true``/``false``, ``null``), repeated
keys as block or flow lists, and long scalars and flow items wrapped over several lines. It accepts a
document only if every byte of it matches those shapes, and resolves each scalar with YAML 1.1's rules, as
PyYAML does; anything else (comments, anchors and aliases, directives, other indentation, tabs, control
characters, non-ASCII text, escapes in double quotes) raises :class:`Fallback`, and the caller goes to PyYAML
(:func:`load`), so both paths return the same values. Files that differ only in their values (those of one
campaign) are read through learned layouts, see :class:`LayoutCache`.

Every regular expression here runs in time and memory linear in its input: repeats are possessive (no
backtracking stack grows with a long quoted string), and matching is anchored item by item.

The writer (:func:`format_propertylist`) produces the text PyYAML emits for a record, byte for byte, by
string formatting where it can and through PyYAML where quoting or structure is needed. Reader and writer
share one vocabulary: the tag, the YAML 1.1 words that are not strings, the spellings of non-finite floats.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Iterator, Mapping
from functools import lru_cache
from typing import Any

import numpy as np
import yaml

from ._text import short_repr
from .bounded import AliasRefused, without_aliases

__all__ = [
    "DATETIME_TAG",
    "FLOAT_SPELLINGS",
    "PROPERTYLIST_TAG",
    "STYLES",
    "YAML11_WORDS",
    "Fallback",
    "Layout",
    "LayoutCache",
    "PropertyList",
    "PropertyListError",
    "element_type",
    "float_text",
    "group_getter",
    "format_propertylist",
    "layout_floats",
    "load",
    "parse_items",
    "plain_text",
    "record_from_items",
    "record_template",
]

PROPERTYLIST_TAG = "lsst.daf.base.PropertyList"
#: The tag of a ``DateTime`` element's value: an ISO-8601 string in TAI, read here as that string.
DATETIME_TAG = "lsst.daf.base.DateTime"
#: Item styles: PyYAML's block style (its current default) or flow style (``default_flow_style=None``).
STYLES = ("block", "flow")

# --- Vocabulary: what the reader resolves and the writer must quote ----------------------------------------

#: Plain words that YAML 1.1 (PyYAML's resolver) reads as a bool or null rather than a string: the reader
#: resolves them to these values, and the writer quotes a string equal to one of them.
YAML11_WORDS: dict[str, bool | None] = {
    **{w: True for w in ("yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON")},
    **{w: False for w in ("no", "No", "NO", "false", "False", "FALSE", "off", "Off", "OFF")},
    **{w: None for w in ("null", "Null", "NULL")},
}
#: Python's text of the non-finite floats -> how PyYAML writes them.
FLOAT_SPELLINGS = {"nan": ".nan", "inf": ".inf", "-inf": "-.inf"}
# The reader's side: YAML's spellings (lower-cased; YAML 1.1 also allows ".NaN", ".Inf", "+.inf", ...).
_SPECIALS = {yaml_text: float(text) for text, yaml_text in FLOAT_SPELLINGS.items()} | {"+.inf": math.inf}
_FLOAT_TEXT = {yaml_text: text for text, yaml_text in FLOAT_SPELLINGS.items()}  # what float() reads

# A plain word: PyYAML writes such a string unquoted unless it is one of YAML11_WORDS, and reads it back as
# that string (or word's value).
_WORD = r"[A-Za-z_][A-Za-z0-9_]*"
_PLAIN = re.compile(_WORD + r"\Z")


class PropertyListError(ValueError):
    """A document PyYAML cannot load, or that holds a tag or an item a PropertyList cannot hold."""


class Fallback(Exception):
    """The fast parser met something it does not fully understand: read the document with :func:`load`."""


# --- The fast parser ---------------------------------------------------------------------------------------
#
# Scalars are written for a continuation indent: PyYAML wraps a long scalar at a single space, going on at
# its node's indentation (4 in an item, 6 in a list inside a block item). Only printable ASCII is accepted
# (no tab, CR or other control character: PyYAML folds line breaks such as CR inside quotes, rejects control
# characters, and its pure loader rejects tabs as separators where libyaml accepts them).

# Numbers as PyYAML's resolver reads them; only forms PyYAML itself emits are converted here, the rest
# (octal, sexagesimal, underscores, ...) go to the full loader (see _scalar).
_NUMBER = re.compile(r"(?:[-+]?[0-9]+\.[0-9]*(?:[eE][-+][0-9]+)?|\.[0-9]+(?:[eE][-+][0-9]+)?"
                     r"|[-+]?(?:0|[1-9][0-9]*)|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))\Z")
# A plain scalar: printable ASCII words (no space at the end) that PyYAML would write unquoted. A word
# starts with a character that is no indicator ("-", and in block context "?" and ":", only before a
# non-space); "#" may follow a non-space; in block context ",", "?", brackets and braces may follow too,
# and ":" before a non-space. Numbers are plain
# scalars too. A wrapped line goes on at the scalar's indentation.
_WORD_CHARS = {"flow": r"A-Za-z0-9_.()/+=!$%&*;<>@\\^`~|'\"\-", "block": r"A-Za-z0-9_.()/+=!$%&*;<>@\\^`~|'\"\-,?\[\]{}"}
_PLAIN_START = r"[A-Za-z0-9_.()/+=$;<\\^~]"
_QCHARS = r"[^'\x00-\x1f\x7f]"  # inside single quotes
_DQUOTED = r'"[^"\\\x00-\x1f\x7f]*+"'
_DATETIME = rf"!<{re.escape(DATETIME_TAG)}> '{_QCHARS}*+'"
# Numbers that read without a doubt: no '+' sign, no '-0', ints of at most 300 digits (Python's int() limit).
_FLOAT_TOKEN = r"-?[0-9]++\.[0-9]++(?:[eE][-+][0-9]++)?+|-?\.inf|\.nan"
_INT_TOKEN = r"0|-?[1-9][0-9]{0,299}+"
_SAFE_NUMBER = f"(?:{_FLOAT_TOKEN}|{_INT_TOKEN})"
# Comments are never used, but must be valid YAML scalars for the two paths to agree on what is an error:
# PyYAML fails on e.g. ``2001-13-45`` or ``0x_`` as a date or an int. A plain one that starts with a
# character no YAML 1.1 resolver claims is always valid (in flow style without '?': the pure loader ends a
# plain scalar there, libyaml does not); one that starts otherwise (a digit, "-", ".") is a plain scalar
# whose resolution the item parser checks (see _check_comment).
_COMMENT_START = r"[A-Za-z_()/$;\\^]"
_SAFE_COMMENT_FIRST = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_()/$;\\^'\"")
_COMMENT_CHARS = {"block": r"[^#:'\"\x00-\x1f\x7f]", "flow": r"[^#:,?\[\]{}'\"\x00-\x1f\x7f]"}
# PyYAML's own implicit resolvers (first character -> (tag, regex)), shared by its C and pure loaders.
_RESOLVERS = yaml.resolver.Resolver.yaml_implicit_resolvers


def _plain(indent: int, context: str, start: str | None = None) -> str:
    """A plain scalar in a context; ``start``: a regex its first character must match instead of the usual."""
    chars = _WORD_CHARS[context]
    follows = f"[{chars}#:]" if context == "block" else f"[{chars}#]"  # a non-space that may go on a word
    within = rf"(?:[{chars}#]|:(?={follows}))" if context == "block" else f"[{chars}#]"
    # a word after a space starts as any character within a word does, but "#" (" #" begins a comment)
    word = rf"(?:[{chars}]|:(?={follows})){within}*+" if context == "block" else rf"[{chars}]{within}*+"
    lead = "-?:" if context == "block" else "-"  # indicators only when a space follows
    first = start or rf"(?:{_PLAIN_START}|[{lead}](?={follows}))"
    return rf"{first}{within}*+(?: ++{word}|\n {{{indent}}}{word})*+"


def _squoted(indent: int) -> str:
    # A wrap replaces one space between two non-space characters, which is how PyYAML writes it.
    return rf"'(?:{_QCHARS}++|''|(?<=[^ '])\n {{{indent}}}(?=[^ '\x00-\x1f\x7f]))*+'"


def _scalar_pattern(indent: int, context: str, safe: bool = False) -> str:
    """A scalar; ``safe``: only forms that always read without PyYAML (see _SAFE_VALUES)."""
    if safe:
        return f"(?>{_SAFE_NUMBER}|{_plain(indent, context, '[A-Za-z_]')}|{_squoted(indent)}|{_DQUOTED}|{_DATETIME})"
    return f"(?>{_plain(indent, context)}|{_squoted(indent)}|{_DQUOTED}|{_DATETIME})"


def _comment_pattern(style: str, indent: int) -> str:
    chars = _COMMENT_CHARS[style]
    plain = rf"{_COMMENT_START}{chars}*+(?:\n {{{indent}}}(?! ){chars}++)*+"
    return f"(?:{_squoted(indent)}|{_DQUOTED}|{plain})"


def _value_pattern(style: str, safe: bool = False) -> str:
    """The value of an item: in a block item a scalar or a repeated key's list (a flow list wrapped at 4, or
    a block list at 4; elements at 6), in a flow item a scalar."""
    if style == "flow":
        return _scalar_pattern(4, "flow", safe)
    flow_element, block_element = _scalar_pattern(6, "flow", safe), _scalar_pattern(6, "block", safe)
    flow_list = rf"\[{flow_element}(?:,(?: |\n {{4}}){flow_element})*+\]"
    block_list = rf"- {block_element}(?:\n {{4}}- {block_element})*+"
    return f"(?>{_scalar_pattern(4, 'block', safe)}|{flow_list}|{block_list})"


_BLOCK_LIST_SEPARATOR = "\n    - "
_LIST_ELEMENT = re.compile(rf"({_scalar_pattern(6, 'flow')})(,(?: |\n {{4}})|\])")
_VALUES = {style: _value_pattern(style) for style in STYLES}
_NAMES = {style: f"(?>{_plain(4, style)}|{_squoted(4)}|{_DQUOTED})" for style in STYLES}
#: Between a flow item's elements: a comma, spaces or a wrap to the item's indentation (2).
_SEPARATOR = r" *+,(?>\n  | *+)"
#: Comments in a layout: those that are always valid; the item parser also takes any plain scalar it checks.
_COMMENTS = {style: _comment_pattern(style, 4) for style in STYLES}
_ITEM_COMMENTS = {style: f"(?:{_COMMENTS[style]}|{_plain(4, style)})" for style in STYLES}

# One item of each style; named groups: name, type, value, comment (and the flow item's separators).
_ITEMS = {
    "block": re.compile(
        rf"- - (?P<name>{_NAMES['block']})\n  - (?P<type>[A-Za-z]++)\n  - (?P<value>{_VALUES['block']})"
        rf"\n  - (?P<comment>{_ITEM_COMMENTS['block']})(?:\n|\Z)"),
    "flow": re.compile(
        rf"- \[ *+(?P<name>{_NAMES['flow']})(?P<s1>{_SEPARATOR})(?P<type>[A-Za-z]++)(?P<s2>{_SEPARATOR})"
        rf"(?P<value>{_VALUES['flow']})(?P<s3>{_SEPARATOR})(?P<comment>{_ITEM_COMMENTS['flow']}) *+\] *+(?:\n|\Z)"),
}
_STYLE_OF = {"-": "block", "[": "flow"}  # by the item's third character
_SEPARATOR_GROUPS = ("s1", "s2", "s3")
_HEADERS = (f"!<{PROPERTYLIST_TAG}>\n", f"--- !<{PROPERTYLIST_TAG}>\n")
_WRAP = re.compile(r"\n +")


def _unwrap(text: str) -> str:
    """A wrapped scalar's text: each line break and the indentation after it read as one space (YAML folding)."""
    return _WRAP.sub(" ", text) if "\n" in text else text


def _scalar(token: str) -> Any:
    """The value of a scalar token, resolved as YAML 1.1 (PyYAML) does; Fallback for forms left to PyYAML."""
    first = token[0]
    if first == "'":
        return _unwrap(token[1:-1]).replace("''", "'")
    if first == '"':
        return token[1:-1]
    if first == "!":  # a DateTime: its quoted string
        return _scalar(token[token.index("'"):])
    text = _unwrap(token)
    if first.isalpha() or first == "_":
        return YAML11_WORDS.get(text, text)
    if _NUMBER.match(token):
        if "." in token:
            special = _SPECIALS.get(token.lower())
            return float(token) if special is None else special
        try:
            return int(token)
        except ValueError:  # beyond Python's digit limit: PyYAML's error to report
            raise Fallback from None
    for _, regex in _RESOLVERS.get(first, ()):
        if regex.match(text):  # another number, a date, null, merge or value: PyYAML's to construct
            raise Fallback
    return text


def _check_comment(token: str) -> None:
    """Fallback for a plain comment PyYAML would resolve to something it cannot construct (a bad date...)."""
    if token[0] not in _SAFE_COMMENT_FIRST:
        _scalar(token)


def _value(token: str) -> Any:
    """The value of an item's value token: a scalar, or the list of a repeated key's values."""
    if token[0] == "[":
        values, pos = [], 1
        while True:
            element = _LIST_ELEMENT.match(token, pos)
            values.append(_scalar(element[1]))
            if element[2] == "]":
                return values
            pos = element.end()
    if token[:2] == "- ":
        return [_scalar(element) for element in token[2:].split(_BLOCK_LIST_SEPARATOR)]
    return _scalar(token)


def _items(text: str) -> Iterator[tuple[str, re.Match]]:
    """(style, match) of each item of a document in PyYAML's layout, in order; Fallback at anything else."""
    if not text.isascii():  # O(1) in CPython; non-ASCII line breaks and non-printables are PyYAML's
        raise Fallback
    for header in _HEADERS:
        if text.startswith(header):
            pos = len(header)
            break
    else:
        raise Fallback
    end = len(text)
    if pos == end:
        raise Fallback
    while pos < end:
        style = _STYLE_OF.get(text[pos + 2:pos + 3])
        match = _ITEMS[style].match(text, pos) if style is not None else None
        if match is None:
            raise Fallback
        _check_comment(match["comment"])
        yield style, match
        pos = match.end()


def parse_items(text: str) -> dict[str, Any]:
    """Name -> value of a PropertyList document in PyYAML's own layout, item by item.

    A repeated key (a list value) gives its last value, as :func:`record_from_items` does.

    Raises
    ------
    Fallback
        Anything outside the shapes described in the module docstring (the document may still be valid).
    """
    record: dict[str, Any] = {}
    try:
        for _, match in _items(text):
            name = _scalar(match["name"])
            if type(name) is not str:  # a name like "true" or "1.5" would not be a string key for PyYAML
                raise Fallback
            value = _value(match["value"])
            record[name] = value[-1] if type(value) is list else value
    except ValueError:  # an int beyond Python's digit limit: PyYAML's error
        raise Fallback from None
    return record


# --- Layouts: the files of a campaign differ only in their values -----------------------------------------
#
# The item parser costs about a microsecond and a half an item in Python. The butler writes every file of a
# campaign with the same names and types in the same order, so once two documents with the same names have
# been read, the second one becomes one regex (a layout): its names and types as fixed text, each value a
# group, each comment and separator the item parser's own pattern. A single C-level fullmatch then checks
# every byte of a document, and the values convert in bulk. A layout accepts only documents the item parser
# accepts: its groups take a subset of the item parser's value tokens (no '+' sign, no '-0', ints of at most
# 300 digits for the numbers; the item parser's value pattern itself for the rest), so a document it
# matches reads exactly as the item parser would read it.

_GROUPS = {  # group kind -> regex of the tokens a group of that kind takes
    "f": f"({_FLOAT_TOKEN})",
    "i": f"({_INT_TOKEN})",
    "w": r"([A-Za-z_][A-Za-z0-9_]*+)",
}
_KINDS = tuple((kind, re.compile(group)) for kind, group in _GROUPS.items())
_ANY_VALUE = "v"  # the kind of any other value, read by _value
# A "v" value whose every scalar is a number above, a plain scalar starting with a letter, or quoted: it
# always reads without PyYAML, so a layout group of this pattern needs no check; other values take the item
# parser's pattern, and the layout checks them (Layout.check).
_SAFE_VALUES = {style: _value_pattern(style, safe=True) for style in STYLES}
_SAFE_VALUE = {style: re.compile(pattern) for style, pattern in _SAFE_VALUES.items()}


def layout_floats(tokens) -> list[float]:
    """Floats of a layout's number tokens (its "f" and "i" groups), as the item parser reads them."""
    return list(map(float, map(_FLOAT_TEXT.get, tokens, tokens)))


def group_getter(indices: list[int]) -> Callable[[tuple], tuple]:
    """tuple -> tuple of its items at ``indices`` (operator.itemgetter returns a bare item for one index)."""
    if len(indices) == 1:
        index = indices[0]
        return lambda groups: (groups[index],)
    return operator.itemgetter(*indices) if indices else (lambda groups: ())


class Layout:
    """One document's names and types as fixed text, its values as regex groups; see the comment above.

    Attributes
    ----------
    regex : re.Pattern
        Matches the documents of this layout; its groups are their values.
    names : tuple of str
        Every name, in document order.
    groups : dict
        Name -> (group index, kind): kind "f" (a float token), "i" (an int token), "w" (a plain word, which
        may resolve to a bool or null, see :data:`YAML11_WORDS`) or "v" (any other value: text, quoted,
        DateTime, a list).
    plan : object
        What the owning :class:`LayoutCache`'s planner made of this layout (None without a planner).
    """

    def __init__(self, text: str, items: list[tuple[str, re.Match]]):
        pieces, names, kinds, checked, cursor = [], [], [], [], 0
        for style, match in items:
            names.append(_scalar(match["name"]))
            token = match["value"]
            kind = next((k for k, pattern in _KINDS if pattern.fullmatch(token)), _ANY_VALUE)
            kinds.append(kind)
            if kind in _GROUPS:
                group = _GROUPS[kind]
            elif _SAFE_VALUE[style].fullmatch(token):
                group = f"({_SAFE_VALUES[style]})"
            else:
                group = f"({_VALUES[style]})"
                checked.append(len(kinds) - 1)
            # The learned comment first (it was checked, and comments rarely change), then any safe one.
            comment = f"(?:{re.escape(match['comment'])}|{_COMMENTS[style]})"
            cuts = [(match.span("value"), group), (match.span("comment"), comment)]
            if style == "flow":
                cuts += [(match.span(group), _SEPARATOR) for group in _SEPARATOR_GROUPS]
            for (start, end), pattern in sorted(cuts):
                pieces += [re.escape(text[cursor:start]), pattern]
                cursor = end
        pieces.append(re.escape(text[cursor:]))
        self.regex = re.compile("".join(pieces))
        self.names = tuple(names)
        self.groups = {name: (j, kind) for j, (name, kind) in enumerate(zip(names, kinds))}
        by_kind = {k: [j for j, kj in enumerate(kinds) if kj == k] for k in (*_GROUPS, _ANY_VALUE)}
        self._floats, self._ints, self._words = (group_getter(by_kind[k]) for k in _GROUPS)
        self._float_names, self._int_names, self._word_names = (tuple(names[j] for j in by_kind[k])
                                                                 for k in _GROUPS)
        self._values = tuple((names[j], j) for j in by_kind[_ANY_VALUE])
        self._checked = tuple(checked)
        self.plan: Any = None

    def check(self, groups: tuple[str, ...]) -> None:
        """Raise Fallback when :func:`parse_items` would for a matched document's groups.

        Only "v" groups of the item parser's general pattern can: a plain scalar PyYAML resolves to a form it
        constructs itself (``07``, a date).
        """
        for j in self._checked:
            _value(groups[j])

    def record(self, match: re.Match) -> dict[str, Any]:
        """What :func:`parse_items` returns for the matched document (Fallback where it raises Fallback)."""
        groups = match.groups()
        record = dict.fromkeys(self.names)
        record.update(zip(self._float_names, layout_floats(self._floats(groups))))
        record.update(zip(self._int_names, map(int, self._ints(groups))))
        words = self._words(groups)
        record.update(zip(self._word_names, map(YAML11_WORDS.get, words, words)))
        for name, j in self._values:
            value = _value(groups[j])
            record[name] = value[-1] if type(value) is list else value
        return record


class LayoutCache:
    """The layouts learned from the documents one reader has parsed, most recently made first.

    A reader owns one (reading tasks make their own), so nothing is shared between readers or kept in the
    module. Give :meth:`learn` every document :func:`parse_items` read: the second one with the same names
    as an earlier one becomes a layout, and :meth:`match` then finds it for the documents that follow. A
    document with known names that no layout matched (its values took another form: a list, a quoted
    string...) is learned again at the 4th, 8th, 16th... such document, so a campaign whose files change
    form settles on layouts for its forms while one whose every file differs costs few compilations.

    Parameters
    ----------
    max_layouts : int
        Layouts kept (the oldest is dropped); 0 turns learning off.
    max_chars : int
        Longer documents are not learned (a layout regex is as long as its document).
    max_names : int
        Distinct name lists remembered while waiting for their second document (then forgotten at once).
    planner : callable, optional
        ``planner(layout)`` runs once when a layout is made; its result is ``layout.plan`` (e.g. how the
        layout's groups map onto a row of statistics).
    """

    def __init__(self, max_layouts: int = 8, max_chars: int = 200_000, max_names: int = 1024,
                 planner: Callable[[Layout], Any] | None = None):
        self.max_layouts, self.max_chars, self.max_names = max_layouts, max_chars, max_names
        self.planner = planner
        self.layouts: list[Layout] = []
        self._seen: dict[tuple, int] = {}

    def __len__(self) -> int:
        return len(self.layouts)

    def match(self, text: str) -> tuple[Layout, re.Match] | None:
        """The layout that matches every byte of ``text``, with its match; None if none does."""
        for layout in self.layouts:
            match = layout.regex.fullmatch(text)
            if match is not None:
                return layout, match
        return None

    def learn(self, text: str, record: dict[str, Any]) -> None:
        """Count a document :func:`parse_items` read as ``record``; make a layout at the 2nd, 4th, 8th... of
        its names."""
        if self.max_layouts < 1 or len(text) > self.max_chars:
            return
        key = tuple(record)
        if len(self._seen) >= self.max_names:
            self._seen.clear()
        seen = self._seen[key] = self._seen.get(key, 0) + 1
        if seen < 2 or seen & (seen - 1):
            return
        items = list(_items(text))
        if len(items) != len(record):  # a repeated name: left to the item parser
            return
        layout = Layout(text, items)
        self.layouts = [old for old in self.layouts if old.regex.pattern != layout.regex.pattern]
        if self.planner is not None:
            layout.plan = self.planner(layout)
        self.layouts.insert(0, layout)
        del self.layouts[self.max_layouts:]

    def clear(self) -> None:
        """Forget every layout and every document counted."""
        self.layouts.clear()
        self._seen.clear()


# --- PyYAML: the full loaders -------------------------------------------------------------------------------

class PropertyList(list):
    """The items of a PropertyList document, as :func:`load` builds them."""


class _BadTag(Exception):
    pass


def _loader_class(kind: str) -> type:
    """A safe loader that builds the PropertyList tag into a list of items, a DateTime into its string, and
    names any other tag; documents with aliases are refused (a statistics file has none, and they can expand
    without bound)."""
    if kind not in ("c", "pure"):
        raise ValueError(f"loader must be 'c' or 'pure', got {kind!r}")
    base = getattr(yaml, "CSafeLoader", yaml.SafeLoader) if kind == "c" else yaml.SafeLoader

    class Loader(without_aliases(base)):  # type: ignore[misc]
        pass

    def property_list(loader, node):
        if not isinstance(node, yaml.SequenceNode):
            raise _BadTag(f"the {PROPERTYLIST_TAG} tag is on a {node.id}, not a sequence")
        return PropertyList(loader.construct_sequence(node, deep=True))

    def date_time(loader, node):
        if not isinstance(node, yaml.ScalarNode):
            raise _BadTag(f"the {DATETIME_TAG} tag is on a {node.id}, not a string")
        return loader.construct_scalar(node)

    def other_tag(loader, suffix, node):
        raise _BadTag(f"unexpected YAML tag {short_repr(node.tag)} (expected !<{PROPERTYLIST_TAG}> or a plain "
                      "mapping)")

    Loader.add_constructor(PROPERTYLIST_TAG, property_list)
    Loader.add_constructor(DATETIME_TAG, date_time)
    Loader.add_multi_constructor("", other_tag)
    return Loader


_LOADERS = {kind: _loader_class(kind) for kind in ("c", "pure")}


def load(text: str, loader: str = "c") -> Any:
    """A YAML document with PyYAML's safe loader: a :class:`PropertyList` for a tagged one, else what it holds.

    Parameters
    ----------
    text : str
        The document.
    loader : {"c", "pure"}
        PyYAML's C loader (libyaml; the pure one if libyaml is missing) or its pure-Python one, which is
        what the LSST butler uses.

    Raises
    ------
    PropertyListError
        Not valid YAML (with the line), a tag other than the PropertyList's (or a DateTime), or an alias.
    """
    if loader not in _LOADERS:
        raise ValueError(f"loader must be 'c' or 'pure', got {loader!r}")
    try:
        return yaml.load(text, Loader=_LOADERS[loader])
    except (_BadTag, AliasRefused) as err:
        raise PropertyListError(str(err)) from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise PropertyListError(f"not valid YAML{where}: {err.problem or err.context}") from None
    except (yaml.YAMLError, ValueError, TypeError, RecursionError) as err:
        raise PropertyListError(f"not valid YAML: {err}") from None


def record_from_items(items: list) -> dict[str, Any]:
    """Name -> value of a PropertyList's items; a repeated key (a list value) gives its last value.

    Raises
    ------
    PropertyListError
        An item that is not a ``[name, type, value, comment]`` list, or a name that cannot be a key.
    """
    record: dict[str, Any] = {}
    for n, item in enumerate(items):
        if not isinstance(item, list) or len(item) < 3:
            raise PropertyListError(f"PropertyList item {n} is not a [name, type, value, comment] list: "
                                    f"{short_repr(item, 80)}")
        value = item[2]
        if isinstance(value, list):  # a repeated key: the last value is the scalar value
            if not value:
                continue
            value = value[-1]
        try:
            record[item[0]] = value
        except TypeError:  # a list or mapping as the name
            raise PropertyListError(f"PropertyList item {n} has an unhashable name: {short_repr(item[0])}") from None
    return record


# --- The writer ---------------------------------------------------------------------------------------------

_INT32 = (-(2**31), 2**31 - 1)
# PyYAML wraps a flow sequence before an item that would start past its best_width (80): a line of at most
# 81 characters is never wrapped (a few longer ones are not either; those go through PyYAML to be sure).
_FLOW_LINE_LIMIT = 81
_FLOW_ITEM_CHARS = len("- [, , , '']")  # a flow line less its name, type and value
# The longest text of a value of each element type (a double's repr, an int's digits and sign).
_LONGEST = {"Double": len("-2.2250738585072014e-308"), "Int": len(str(_INT32[0])),
            "LongLong": len(str(-(2**63))), "UnsignedLongLong": len(str(2**64 - 1)), "Bool": len("false"),
            "Undef": len("null")}


def float_text(x: float) -> str:
    """A float as PyYAML writes it: repr (exact round trip), ``.nan``/``.inf``, ``1.0e+17`` not ``1e+17``."""
    text = repr(x)
    special = FLOAT_SPELLINGS.get(text)
    if special is not None:
        return special
    if "e" in text and "." not in text:
        text = text.replace("e", ".0e", 1)
    return text


def _int_type(v: int) -> str:
    """PropertyList element type daf_base picks for a Python int: Int if 32-bit, else the 64-bit types."""
    if _INT32[0] <= v <= _INT32[1]:
        return "Int"
    if -(2**63) <= v < 2**63:
        return "LongLong"
    if 0 <= v < 2**64:
        return "UnsignedLongLong"
    raise ValueError(f"integer {v} does not fit a PropertyList element (64 bits)")


def element_type(value: object) -> tuple[str, object]:
    """(PropertyList element type, plain Python value) of one record value; a list is a repeated key."""
    if isinstance(value, (bool, np.bool_)):
        return "Bool", bool(value)
    if isinstance(value, (int, np.integer)):
        return _int_type(int(value)), int(value)
    if isinstance(value, (float, np.floating)):
        return "Double", float(value)
    if isinstance(value, str):
        return "String", str(value)
    if value is None:
        return "Undef", None
    if isinstance(value, (list, tuple, np.ndarray)) and len(value):
        natives = [element_type(v) for v in (value.tolist() if isinstance(value, np.ndarray) else value)]
        types = {t for t, _ in natives}
        ints = {"Int", "LongLong", "UnsignedLongLong"}
        if len(types) > 1 and not types <= ints:
            raise TypeError(f"mixed value types in a list: {sorted(types)}")
        if types <= ints:  # one type for all, as daf_base chooses it from the range of the values
            typ = ("Int" if types == {"Int"} else
                   "UnsignedLongLong" if "UnsignedLongLong" in types else "LongLong")
        else:
            typ = natives[0][0]
        return typ, [v for _, v in natives]
    raise TypeError(f"cannot store {type(value).__name__} {value!r} in a PropertyList")


def _plain_word(text: str) -> bool:
    """A string PyYAML writes unquoted: a plain word that YAML 1.1 does not read as a bool or null."""
    return _PLAIN.match(text) is not None and text not in YAML11_WORDS


def plain_text(typ: str, value: object) -> str | None:
    """The plain YAML text of a scalar of an element type, or None when PyYAML would quote or nest it."""
    if typ == "Double":
        return float_text(value)  # type: ignore[arg-type]
    if typ == "String":
        return value if _plain_word(value) else None  # type: ignore[arg-type]
    if typ == "Bool":
        return "true" if value else "false"
    if typ == "Undef":
        return "null"
    if isinstance(value, list):
        return None
    return str(value)


def _flow_line_fits(name: str, typ: str, text_chars: int) -> bool:
    return len(name) + len(typ) + text_chars + _FLOW_ITEM_CHARS <= _FLOW_LINE_LIMIT


@lru_cache(maxsize=256)
def _template(names: tuple[str, ...], types: tuple[str, ...], style: str) -> str:
    """The file with a ``%s`` slot per value; names are plain words, so no '%' to escape."""
    item = "- - {}\n  - {}\n  - %s\n  - ''\n" if style == "block" else "- [{}, {}, %s, '']\n"
    return f"!<{PROPERTYLIST_TAG}>\n" + "".join(item.format(n, t) for n, t in zip(names, types))


def record_template(names: tuple[str, ...], types: tuple[str, ...], style: str = "block",
                    longest: Mapping[str, int] | None = None) -> str | None:
    """The text of every record of these names and element types, with a ``%s`` slot per value.

    ``template % texts`` is then exactly what :func:`format_propertylist` writes, provided each value's
    text is its :func:`plain_text`. None when no template can promise that: a name PyYAML would quote, a
    type without plain text, or (flow style) a line that could be longer than PyYAML wraps.

    Parameters
    ----------
    names, types : tuple of str
        The record's names and element types, in order.
    style : {"block", "flow"}
    longest : mapping, optional
        Element type -> the longest value text to allow for (needed for "String" in flow style; the numeric
        types default to the longest text any value of the type has).
    """
    widths = {**_LONGEST, **(longest or {})}
    for name, typ in zip(names, types):
        if not _plain_word(name) or typ not in widths:
            return None
        if style == "flow" and not _flow_line_fits(name, typ, widths[typ]):
            return None
    return _template(tuple(names), tuple(types), style)


class _PropertyListDumper(yaml.SafeDumper):
    """PyYAML dumper with the PropertyList representer, for records the fast path does not handle."""


class _Items(list):
    pass


_PropertyListDumper.add_representer(
    _Items, lambda dumper, data: dumper.represent_sequence(PROPERTYLIST_TAG, list(data)))


def format_propertylist(record: Mapping[str, object], style: str = "block") -> str:
    """A record as the LSST butler writes a PropertyList, in YAML.

    Parameters
    ----------
    record : mapping
        Names to values, written in the mapping's order (for flat statistics see
        :func:`flatnorm_dask.schema.written_keys`). Floats become ``Double`` (written with ``repr``, so they
        read back exactly; NaN and infinities as ``.nan``, ``.inf``, ``-.inf``), ints ``Int`` (``LongLong``
        beyond 32 bits), str ``String``, bool ``Bool``, None ``Undef``; a list is a repeated key.
    style : {"block", "flow"}
        Inner lists in block style (current PyYAML default) or flow style (``default_flow_style=None``).

    Returns
    -------
    str
        Exactly the text PyYAML emits for the sequence of ``[name, type, value, '']`` items tagged
        ``!<lsst.daf.base.PropertyList>``. Built by string formatting; records with strings that need
        quoting, lists or over-long flow lines are handed to PyYAML itself.
    """
    if style not in STYLES:
        raise ValueError(f"style must be 'block' or 'flow', got {style!r}")
    names, types, values, texts = [], [], [], []
    fast = bool(record)
    for name, value in record.items():
        if not isinstance(name, str):
            raise TypeError(f"PropertyList names are strings, got {name!r}")
        typ, native = element_type(value)
        names.append(name)
        types.append(typ)
        values.append(native)
        if fast:
            text = plain_text(typ, native)
            if (text is None or not _plain_word(name)
                    or (style == "flow" and not _flow_line_fits(name, typ, len(text)))):
                fast = False
            texts.append(text)
    if fast:
        return _template(tuple(names), tuple(types), style) % tuple(texts)
    items = _Items([n, t, v, ""] for n, t, v in zip(names, types, values))
    flow = False if style == "block" else None  # None: lists of scalars in flow style, as in the samples
    return yaml.dump(items, Dumper=_PropertyListDumper, default_flow_style=flow, sort_keys=False)
