"""Parse one flat-statistics file: the LSST PropertyList YAML, or a plain YAML/JSON mapping.

The butler stores ``flatStats`` as a YAML sequence tagged ``!<lsst.daf.base.PropertyList>`` whose items are
``[name, type, value, comment]`` lists (see ``FORMATS.md`` in the shared reference). Loading one with
``yaml.safe_load`` costs milliseconds, while the file itself reads in tens of microseconds, so this module has
a specialised parser for exactly the shapes PyYAML emits (block or flow style, one item after another). It
accepts a document only if every byte of it matches those shapes and resolves each scalar with YAML 1.1's
rules, as PyYAML does; anything else (comments, anchors, wrapped long strings, repeated keys as lists,
directives, other indentation, tabs, control characters, non-ASCII text) goes to PyYAML's C loader, so both
paths return the same values. Once two documents with the same names have been read, the text of the second
minus its values becomes a "layout" regex: documents of the same campaign then match in one C-level pass and
convert in bulk (see ``_Layout``), again only when they read exactly as the item-by-item parser reads them.

Public entry points: :func:`read_stats` (a path to a :class:`StatsRow`), :func:`parse_record` (text to a
mapping, fast path first), :func:`parse_record_slow` (PyYAML only), :func:`extract_stats` (mapping to
:class:`StatsRow`).
"""

from __future__ import annotations

import json
import math
import operator
import os
import re
from typing import Any, Mapping, NamedTuple

import numpy as np
import yaml

__all__ = [
    "PROPERTYLIST_TAG",
    "STAT_NAMES",
    "StatsFormatError",
    "StatsRow",
    "extract_stats",
    "parse_record",
    "parse_record_slow",
    "read_record",
    "read_stats",
]

PROPERTYLIST_TAG = "lsst.daf.base.PropertyList"

#: Order of the three statistics in :attr:`StatsRow.det` and the rows of :attr:`StatsRow.amp`.
STAT_NAMES = ("MEDIAN", "N", "SIGMA")


class StatsFormatError(ValueError):
    """A statistics file that cannot be used, with the file, the key (if one is to blame) and the reason."""

    def __init__(self, path: str | os.PathLike | None, reason: str, key: str | None = None):
        self.path = None if path is None else os.fspath(path)
        self.reason = reason
        self.key = key
        where = self.path if self.path is not None else "<text>"
        super().__init__(f"{where}: {key}: {reason}" if key else f"{where}: {reason}")

    def __reduce__(self):  # keep path/key/reason when a worker sends the error back
        return type(self), (self.path, self.reason, self.key)


class StatsRow(NamedTuple):
    """The statistics of one (detector, exposure) file.

    Attributes
    ----------
    det : ndarray, shape (3,)
        Detector ``MEDIAN`` (clipped mean), ``N`` (pixel count) and ``SIGMA``, in :data:`STAT_NAMES` order.
    amp_names : tuple of str
        Amplifier names in the file's order (``AMP_NAME_0``, ``AMP_NAME_1``, ...).
    amp : ndarray, shape (3, nAmp)
        The same three statistics per amplifier.
    """

    det: np.ndarray
    amp_names: tuple[str, ...]
    amp: np.ndarray


# --- The fast path ---------------------------------------------------------------------------------------

class _Fallback(Exception):
    """The fast parser met something it does not fully understand."""


# YAML 1.1 plain scalars as PyYAML's resolver reads them; only forms PyYAML itself emits are listed, the
# rest (octal, sexagesimal, underscores, timestamps, ...) fail to match and go to the full loader.
_INT = r"[-+]?(?:0|[1-9][0-9]*)"
_FLOAT = r"[-+]?[0-9]+\.[0-9]*(?:[eE][-+][0-9]+)?|\.[0-9]+(?:[eE][-+][0-9]+)?"
_SPECIAL = r"[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)"
_WORD = r"[A-Za-z_][A-Za-z0-9_]*"
# Quoted scalars and comments: printable ASCII only (no tab, CR or other control character: PyYAML folds
# line breaks such as CR inside quotes, rejects control characters, and its pure loader rejects tabs as
# separators where libyaml accepts them).
_SQUOTED = r"'(?:[^'\x00-\x1f\x7f]|'')*'"
_DQUOTED = r'"[^"\\\x00-\x1f\x7f]*"'
_VALUE = f"{_INT}|{_FLOAT}|{_SPECIAL}|{_WORD}|{_SQUOTED}|{_DQUOTED}"
_NAME = r"[A-Za-z_][A-Za-z0-9_.]*"
# Comments are never used, but must be valid YAML scalars for the two paths to agree on what is an error;
# a plain one may not start with a digit (PyYAML fails on e.g. ``2001-13-45`` or ``0x_`` as a date or int),
# nor hold '?' in flow style (the pure loader ends a plain scalar there, libyaml does not).
_COMMENT_BLOCK = rf"{_SQUOTED}|{_DQUOTED}|[A-Za-z(][^#:'\"\x00-\x1f\x7f]*"
_COMMENT_FLOW = rf"{_SQUOTED}|{_DQUOTED}|[A-Za-z(][^#:,?\[\]{{}}'\"\x00-\x1f\x7f]*"

_BLOCK_ITEM = re.compile(
    rf"- - ({_NAME})\n  - ([A-Za-z]+)\n  - ({_VALUE})\n  - (?:{_COMMENT_BLOCK})(?:\n|\Z)")
_FLOW_ITEM = re.compile(
    rf"- \[ *({_NAME}) *, *([A-Za-z]+) *, *({_VALUE}) *, *(?:{_COMMENT_FLOW}) *\] *(?:\n|\Z)")
_HEADERS = (f"!<{PROPERTYLIST_TAG}>\n", f"--- !<{PROPERTYLIST_TAG}>\n")

# Plain words that YAML 1.1 does not read as strings.
_WORDS: dict[str, Any] = {w: True for w in ("yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON")}
_WORDS.update({w: False for w in ("no", "No", "NO", "false", "False", "FALSE", "off", "Off", "OFF")})
_WORDS.update({w: None for w in ("null", "Null", "NULL")})
_SPECIALS = {".nan": math.nan, ".inf": math.inf, "+.inf": math.inf, "-.inf": -math.inf}


def _scalar(token: str) -> Any:
    first = token[0]
    if first == "'":
        return token[1:-1].replace("''", "'")
    if first == '"':
        return token[1:-1]
    if first.isalpha() or first == "_":
        return _WORDS.get(token, token)
    if "." in token:
        special = _SPECIALS.get(token.lower())
        return float(token) if special is None else special
    return int(token)


def _parse_fast(text: str) -> dict[str, Any]:
    """Name -> value of a PropertyList document in PyYAML's own layout; raises _Fallback otherwise."""
    found = _match_layout(text)
    if found is not None:
        return found[0].record(found[1])
    record = _parse_general(text)
    _learn(text, record)
    return record


def _parse_general(text: str) -> dict[str, Any]:
    """:func:`_parse_fast` item by item, without the layouts."""
    if not text.isascii():  # O(1) in CPython; non-ASCII line breaks and non-printables are PyYAML's
        raise _Fallback
    for header in _HEADERS:
        if text.startswith(header):
            break
    else:
        raise _Fallback
    pos = len(header)
    item = _BLOCK_ITEM if text.startswith("- -", pos) else _FLOW_ITEM
    record: dict[str, Any] = {}
    for m in item.finditer(text, pos):
        if m.start() != pos:
            raise _Fallback
        pos = m.end()
        name, _, value = m.groups()
        if name in _WORDS:  # a name like "true" would not be a string key for PyYAML
            raise _Fallback
        try:
            record[name] = _scalar(value)
        except ValueError:  # an int beyond Python's digit limit: PyYAML's error
            raise _Fallback from None
    if pos != len(text) or not record:
        raise _Fallback
    return record


# --- Layouts: the files of a campaign differ only in their values -----------------------------------------
#
# The general parser costs about a microsecond and a half an item in Python. The butler writes every file of a
# campaign with the same names, types and comments in the same order, so once two documents with the same
# names have been read, the text of the second one with its values cut out becomes one regex (a layout) whose
# groups are the values: a single C-level fullmatch then checks every byte of a document, and the values
# convert in bulk. A layout is made only of text the general parser accepted, and its groups accept only a
# subset of the general parser's tokens (no '+' sign, no '-0', ints of at most 300 digits), so a document it
# matches reads exactly as the general parser would read it.

_FLOAT_GROUP = r"(-?[0-9]+\.[0-9]+(?:[eE][-+][0-9]+)?|-?\.inf|\.nan)"
_INT_GROUP = r"(0|-?[1-9][0-9]{0,299})"
_WORD_GROUP = f"({_WORD})"
_KINDS = tuple((kind, re.compile(group)) for kind, group in (("f", _FLOAT_GROUP), ("i", _INT_GROUP),
                                                               ("w", _WORD_GROUP)))
_FLOAT_TEXT = {".nan": "nan", ".inf": "inf", "-.inf": "-inf"}  # YAML's spellings that float() does not read
_MAX_LAYOUTS = 8
_MAX_LAYOUT_CHARS = 200_000
_LAYOUTS: list[_Layout] = []  # most recently made first
_SEEN: dict[tuple, int] = {}  # names of the documents the general parser read -> how many times


def _getter(indices: list[int]):
    """tuple -> tuple of its items at ``indices`` (operator.itemgetter returns a bare item for one index)."""
    if len(indices) == 1:
        index = indices[0]
        return lambda groups: (groups[index],)
    return operator.itemgetter(*indices) if indices else (lambda groups: ())


class _Layout:
    """One document's text with its values as regex groups; see the comment above."""

    def __init__(self, text: str, items: list[tuple[str, int, int]]):
        pieces, names, kinds = [], [], []
        self.template: dict[str, Any] = {}  # every name in order, with the values that are not groups
        cursor = 0
        for name, start, end in items:
            token = text[start:end]
            kind = next((k for k, pattern in _KINDS if pattern.fullmatch(token)), None)
            self.template[name] = None if kind else _scalar(token)
            if kind is not None:
                pieces += [re.escape(text[cursor:start]), _KINDS_GROUP[kind]]
                names.append(name)
                kinds.append(kind)
                cursor = end
        pieces.append(re.escape(text[cursor:]))
        self.regex = re.compile("".join(pieces))
        by_kind = {k: [j for j, kj in enumerate(kinds) if kj == k] for k in "fiw"}
        self.floats, self.ints, self.words = (_getter(by_kind[k]) for k in "fiw")
        self.float_names, self.int_names, self.word_names = (tuple(names[j] for j in by_kind[k]) for k in "fiw")

        # What extract_stats needs, when it can only succeed (numbers where numbers go, words for names).
        self.stats = None
        group = {n: j for j, n in enumerate(names)}
        n_amp = 0
        while f"AMP_NAME_{n_amp}" in self.template:
            n_amp += 1
        numeric = lambda key: key in group and kinds[group[key]] in "fi"  # noqa: E731
        optional = lambda key: key not in self.template or numeric(key)  # noqa: E731
        amps = range(n_amp)
        if (numeric("DETECTOR_MEDIAN") and numeric("DETECTOR_N") and optional("DETECTOR_SIGMA")
                and sum(1 for n in self.template if n.startswith("AMP_NAME_")) == n_amp
                and all(f"AMP_NAME_{i}" in group and kinds[group[f"AMP_NAME_{i}"]] == "w" for i in amps)
                and all(numeric(f"AMP_MEDIAN_{i}") and numeric(f"AMP_N_{i}") and optional(f"AMP_SIGMA_{i}")
                        for i in amps)):
            nan = len(names)  # row() appends a "nan" to the groups for absent sigmas
            self.n_amp = n_amp
            self.stats = _getter([group["DETECTOR_MEDIAN"], group["DETECTOR_N"], group.get("DETECTOR_SIGMA", nan)]
                                 + [group[f"AMP_MEDIAN_{i}"] for i in amps] + [group[f"AMP_N_{i}"] for i in amps]
                                 + [group.get(f"AMP_SIGMA_{i}", nan) for i in amps])
            self.counts = _getter([group["DETECTOR_N"]] + [group[f"AMP_N_{i}"] for i in amps])
            self.amp_names = _getter([group[f"AMP_NAME_{i}"] for i in amps])

    def record(self, match: re.Match) -> dict[str, Any]:
        """What the general parser returns for the matched document."""
        groups = match.groups()
        record = self.template.copy()
        floats = self.floats(groups)
        record.update(zip(self.float_names, map(float, map(_FLOAT_TEXT.get, floats, floats))))
        record.update(zip(self.int_names, map(int, self.ints(groups))))
        words = self.words(groups)
        record.update(zip(self.word_names, map(_WORDS.get, words, words)))
        return record

    def row(self, match: re.Match) -> StatsRow | None:
        """extract_stats of record(match), or None when extract_stats has to decide (it may raise)."""
        groups = match.groups()
        names = self.amp_names(groups)
        if not _WORDS.keys().isdisjoint(names) or "-" in "".join(self.counts(groups)):
            return None  # a name YAML reads as a bool or null, or maybe a negative count
        tokens = self.stats(groups + ("nan",))
        values = np.array(list(map(float, map(_FLOAT_TEXT.get, tokens, tokens))))
        return StatsRow(values[:3], names, values[3:].reshape(3, self.n_amp))


_KINDS_GROUP = {"f": _FLOAT_GROUP, "i": _INT_GROUP, "w": _WORD_GROUP}


def _match_layout(text: str) -> tuple[_Layout, re.Match] | None:
    for layout in _LAYOUTS:
        match = layout.regex.fullmatch(text)
        if match is not None:
            return layout, match
    return None


def _learn(text: str, record: dict[str, Any]) -> None:
    """Make a layout from the second document the general parser reads with the same names."""
    if len(text) > _MAX_LAYOUT_CHARS:
        return
    key = tuple(record)
    if len(_SEEN) >= 1024:
        _SEEN.clear()
    seen = _SEEN[key] = _SEEN.get(key, 0) + 1
    if seen != 2:
        return
    header = next(h for h in _HEADERS if text.startswith(h))
    item = _BLOCK_ITEM if text.startswith("- -", len(header)) else _FLOW_ITEM
    items = [(m.group(1), m.start(3), m.end(3)) for m in item.finditer(text, len(header))]
    if len(items) != len(record):  # a repeated name: left to the general parser
        return
    _LAYOUTS.insert(0, _Layout(text, items))
    del _LAYOUTS[_MAX_LAYOUTS:]


# --- The full loader -------------------------------------------------------------------------------------

def _loader_class(kind: str) -> type:
    """A safe loader that builds the PropertyList tag into a list of items and names any other tag."""
    if kind not in ("c", "pure"):
        raise ValueError(f"loader must be 'c' or 'pure', got {kind!r}")
    base = getattr(yaml, "CSafeLoader", yaml.SafeLoader) if kind == "c" else yaml.SafeLoader

    class Loader(base):  # type: ignore[misc, valid-type]
        pass

    def property_list(loader, node):
        if not isinstance(node, yaml.SequenceNode):
            raise _BadTag(f"the {PROPERTYLIST_TAG} tag is on a {node.id}, not a sequence")
        return _PropertyList(loader.construct_sequence(node, deep=True))

    def other_tag(loader, suffix, node):
        raise _BadTag(f"unexpected YAML tag {node.tag!r} (expected !<{PROPERTYLIST_TAG}> or a plain mapping)")

    Loader.add_constructor(PROPERTYLIST_TAG, property_list)
    Loader.add_multi_constructor("", other_tag)
    return Loader


class _BadTag(Exception):
    pass


class _PropertyList(list):
    """The items of a PropertyList document, as the full loader builds them."""


_LOADERS = {kind: _loader_class(kind) for kind in ("c", "pure")}


def _record_from_items(items: list, path) -> dict[str, Any]:
    record: dict[str, Any] = {}
    for n, item in enumerate(items):
        if not isinstance(item, list) or len(item) < 3:
            raise StatsFormatError(path, f"PropertyList item {n} is not a [name, type, value, comment] list: "
                                         f"{item!r:.80}")
        value = item[2]
        if isinstance(value, list):  # a repeated key: the last value is the scalar value
            if not value:
                continue
            value = value[-1]
        try:
            record[item[0]] = value
        except TypeError:  # a list or mapping as the name
            raise StatsFormatError(path, f"PropertyList item {n} has an unhashable name: {item[0]!r:.60}") \
                from None
    return record


def parse_record_slow(text: str, path: str | os.PathLike | None = None, loader: str = "c") -> dict[str, Any]:
    """Name -> value of a statistics document, with PyYAML only (the reference for the fast path).

    Parameters
    ----------
    text : str
        The document: a PropertyList sequence or a plain mapping.
    path : path-like, optional
        Named in errors.
    loader : {"c", "pure"}
        PyYAML's C loader (libyaml; the pure one if libyaml is missing) or its pure-Python one, which is
        what the LSST butler uses.

    Raises
    ------
    StatsFormatError
        Not valid YAML, another tag, or neither a PropertyList nor a mapping.
    """
    try:
        data = yaml.load(text, Loader=_LOADERS[loader] if loader in _LOADERS else _loader_class(loader))
    except _BadTag as err:
        raise StatsFormatError(path, str(err)) from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise StatsFormatError(path, f"not valid YAML{where}: {err.problem or err.context}") from None
    except (yaml.YAMLError, ValueError, TypeError, RecursionError) as err:
        raise StatsFormatError(path, f"not valid YAML: {err}") from None
    if isinstance(data, _PropertyList):
        return _record_from_items(data, path)
    if isinstance(data, dict):
        return {k: (v[-1] if isinstance(v, list) and v else v) for k, v in data.items()}
    kind = "empty" if data is None else f"a YAML {type(data).__name__}"
    raise StatsFormatError(path, f"not a PropertyList or a mapping of statistics (the document is {kind})")


def parse_record(text: str, path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Name -> value of a statistics document, by the fastest path that reads it exactly.

    PropertyList documents in the layout PyYAML writes take the specialised parser; JSON objects are read
    as JSON (so ``1e5`` is a number, as JSON says); everything else goes through :func:`parse_record_slow`.
    """
    try:
        return _parse_fast(text)
    except _Fallback:
        pass
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except (ValueError, RecursionError):
            data = None  # e.g. a YAML flow mapping: YAML reads it below
        if isinstance(data, dict):
            return {k: (v[-1] if isinstance(v, list) and v else v) for k, v in data.items()}
    return parse_record_slow(text, path)


# --- From a mapping to numbers ---------------------------------------------------------------------------

def _number(record: Mapping[str, Any], key: str, path, required: bool = True) -> float:
    try:
        value = record[key]
    except KeyError:
        if required:
            raise StatsFormatError(path, "missing", key=key) from None
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise StatsFormatError(path, f"not a number: {value!r:.60}", key=key)
    try:
        return float(value)
    except OverflowError:  # an int beyond the float range
        raise StatsFormatError(path, f"number out of range: {value!r:.60}", key=key) from None


def _count(record: Mapping[str, Any], key: str, path) -> float:
    value = _number(record, key, path)
    if value < 0:
        raise StatsFormatError(path, f"negative pixel count {value:g}", key=key)
    return value


def extract_stats(record: Mapping[str, Any], path: str | os.PathLike | None = None) -> StatsRow:
    """The statistics the normalisation uses, from a parsed record.

    ``*_MEDIAN`` and ``*_N`` are required for the detector and every amplifier; ``*_SIGMA`` is optional (NaN
    when absent). Amplifiers are ``AMP_NAME_0`` .. ``AMP_NAME_{n-1}`` with no gap. NaN values are kept (the
    solver leaves such cells out); a count may be NaN but not negative.

    Raises
    ------
    StatsFormatError
        Naming the file and the key: missing, not a number, a negative count, a gap in the amplifier
        numbering or a name that is not a string.
    """
    det = np.array([_number(record, "DETECTOR_MEDIAN", path), _count(record, "DETECTOR_N", path),
                    _number(record, "DETECTOR_SIGMA", path, required=False)])
    names = []
    while (key := f"AMP_NAME_{len(names)}") in record:
        name = record[key]
        if not isinstance(name, str):
            raise StatsFormatError(path, f"amplifier name is not a string: {name!r:.60}", key=key)
        names.append(name)
    n_amp = len(names)
    if sum(1 for k in record if isinstance(k, str) and k.startswith("AMP_NAME_")) != n_amp:
        raise StatsFormatError(path, "missing while higher-numbered amplifier names exist", key=f"AMP_NAME_{n_amp}")
    amp = np.empty((3, n_amp))
    for i in range(n_amp):
        amp[0, i] = _number(record, f"AMP_MEDIAN_{i}", path)
        amp[1, i] = _count(record, f"AMP_N_{i}", path)
        amp[2, i] = _number(record, f"AMP_SIGMA_{i}", path, required=False)
    return StatsRow(det, tuple(names), amp)


# --- Files -----------------------------------------------------------------------------------------------

def _local_path(path: str | os.PathLike) -> str | os.PathLike:
    """A plain path, or the file a ``file:`` URI names (``file:///a%20b`` -> ``/a b``, as lsst.resources reads it)."""
    if isinstance(path, str) and path.startswith("file:"):
        from urllib.parse import urlparse
        from urllib.request import url2pathname

        return url2pathname(urlparse(path).path)
    return path


def _read_text(path: str | os.PathLike) -> str:
    try:
        if isinstance(path, str) and "://" in path and not path.startswith("file://"):
            from lsst.resources import ResourcePath  # remote URIs (S3, WebDAV, ...): optional dependency

            data = ResourcePath(path).read()
        else:
            with open(_local_path(path), "rb") as f:
                data = f.read()
    except ImportError:
        raise StatsFormatError(path, "reading URIs needs lsst-resources: pip install 'flatnorm-dask[butler]'") \
            from None
    except OSError as err:
        raise StatsFormatError(path, f"cannot read: {err.strerror or err}") from None
    if not data.strip():
        raise StatsFormatError(path, "empty file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise StatsFormatError(path, f"not UTF-8 text (byte {err.start}): binary or corrupt file") from None


def read_record(path: str | os.PathLike) -> dict[str, Any]:
    """Name -> value of every entry of a statistics file (see :func:`parse_record`)."""
    return parse_record(_read_text(path), path)


def read_stats(path: str | os.PathLike) -> StatsRow:
    """Read one statistics file: the detector's and each amplifier's median, pixel count and sigma.

    Parameters
    ----------
    path : path-like or URI
        A PropertyList YAML (block or flow style) or a plain YAML/JSON mapping; ``s3://`` and other URIs are
        read through ``lsst.resources`` when it is installed.

    Raises
    ------
    StatsFormatError
        The file cannot be read or parsed, or a statistic is missing or malformed; the message names the
        file and, where one is to blame, the key.
    """
    text = _read_text(path)
    found = _match_layout(text)
    if found is not None and found[0].stats is not None:
        row = found[0].row(found[1])
        if row is not None:
            return row
    return extract_stats(parse_record(text, path), path)
