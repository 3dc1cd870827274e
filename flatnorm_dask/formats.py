"""Read one flat-statistics file: the LSST PropertyList YAML, or a plain YAML/JSON mapping, to a StatsRow.

A :class:`StatsReader` reads files one after another: PropertyList documents in PyYAML's own layout take
the fast parser of :mod:`flatnorm_dask.propertylist` (through the layouts it learns, which the reader owns),
JSON objects are read as JSON, and everything else goes to PyYAML. The statistics are then taken out with
the checks of :func:`flatnorm_dask.schema.extract_stats`; for a document that matched a layout whose values
can only pass those checks, straight from the layout's groups (see :class:`_RowPlan`), with the same result.

Every file is read with bounds (:mod:`flatnorm_dask.bounded`): regular files only, at most ``max_bytes``
bytes (``input.max_file_bytes``), UTF-8 text, no YAML aliases; URIs (``s3://``, WebDAV...) through
:mod:`flatnorm_dask.remote`, many requests in flight when read with :meth:`StatsReader.read_many`.

Public entry points: :func:`read_stats_file` (a path to a :class:`~flatnorm_dask.schema.StatsRow`),
:class:`StatsReader` (the same for many files, learning their layout; :meth:`~StatsReader.read_many` for a
batch), :func:`parse_record` (text to a mapping, fast path first), :func:`parse_record_slow` (PyYAML only),
:func:`read_record` (a path to a mapping).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from . import propertylist as pl
from .bounded import MAX_FILE_BYTES, RefusedFile, decode_text, read_bytes
from .remote import DEFAULT_MAX_REQUESTS, RemoteReader, is_remote
from .schema import (
    COUNT_STAT,
    OPTIONAL_STATS,
    STAT_NAMES,
    StatsFormatError,
    StatsRow,
    amp_name_key,
    amplifier_names,
    extract_stats,
    row_keys,
)

__all__ = [
    "StatsFormatError",
    "StatsReader",
    "StatsRow",
    "parse_record",
    "parse_record_slow",
    "read_record",
    "read_stats_file",
]


def _last_values(mapping: Mapping[Any, Any]) -> dict[Any, Any]:
    """A plain mapping's record: a list value (a repeated key) gives its last element."""
    return {k: (v[-1] if isinstance(v, list) and v else v) for k, v in mapping.items()}


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
        data = pl.load(text, loader)
        if isinstance(data, pl.PropertyList):
            return pl.record_from_items(data)
    except pl.PropertyListError as err:
        raise StatsFormatError(path, str(err)) from None
    if isinstance(data, dict):
        return _last_values(data)
    kind = "empty" if data is None else f"a YAML {type(data).__name__}"
    raise StatsFormatError(path, f"not a PropertyList or a mapping of statistics (the document is {kind})")


class _RowPlan:
    """How a layout's groups make the StatsRow that extract_stats would make of its documents.

    Made only for a layout whose documents can only pass extract_stats' checks (numbers where numbers go,
    words for the amplifier names, no gap in their numbering); :meth:`row` still hands over to
    extract_stats a document whose names read as a bool or null, or whose counts may be negative or beyond
    :data:`~flatnorm_dask.schema.MAX_PIXEL_COUNT`.
    """

    def __init__(self, n_amp: int, values, counts, names):
        self.n_amp, self.values, self.counts, self.names = n_amp, values, counts, names

    @classmethod
    def of(cls, layout: pl.Layout) -> _RowPlan | None:
        """The plan of a layout, or None when its documents must go through extract_stats."""
        groups = layout.groups
        try:
            n_amp = len(amplifier_names(dict.fromkeys(layout.names, "")))  # the numbering, whatever the names
        except StatsFormatError:
            return None
        names = [groups.get(amp_name_key(i), (None, None)) for i in range(n_amp)]
        if any(kind != "w" for _, kind in names):
            return None
        nan = len(groups)  # row() appends a "nan" token to the groups, for absent optional statistics
        values, counts = [], []
        for key, stat in row_keys(n_amp):
            index, kind = groups.get(key, (None, None))
            if kind in ("f", "i"):
                values.append(index)
                if stat == COUNT_STAT:
                    counts.append(index)
            elif key not in groups and stat in OPTIONAL_STATS:
                values.append(nan)
            else:  # missing, or another kind of value (a string, a list...): extract_stats says what is wrong
                return None
        return cls(n_amp, pl.group_getter(values), pl.group_getter(counts), pl.group_getter([j for j, _ in names]))

    _WORDS = pl.YAML11_WORDS.keys()
    _N_STAT = len(STAT_NAMES)
    # A count token that may be negative or beyond MAX_PIXEL_COUNT (2**53 has 16 digits): a sign, an
    # exponent, an infinity, or more than 15 characters.
    _SUSPECT_COUNT = frozenset("-eEf")

    def row(self, groups: tuple[str, ...]) -> StatsRow | None:
        """extract_stats of the matched document, or None when extract_stats has to decide (it may raise)."""
        names = self.names(groups)
        counts = self.counts(groups)
        if (not self._WORDS.isdisjoint(names) or not self._SUSPECT_COUNT.isdisjoint("".join(counts))
                or max(map(len, counts), default=0) > 15):
            return None
        values = np.array(pl.layout_floats(self.values(groups + ("nan",))))
        n_stat = self._N_STAT
        return StatsRow(values[:n_stat], names, values[n_stat:].reshape(n_stat, self.n_amp))


def _local_path(path: str | os.PathLike) -> str | os.PathLike:
    """A plain path, or the file a ``file:`` URI names (``file:///a%20b`` -> ``/a b``, as lsst.resources reads it)."""
    if isinstance(path, str) and path.startswith("file:"):
        from urllib.parse import urlparse
        from urllib.request import url2pathname

        return url2pathname(urlparse(path).path)
    return path


class StatsReader:
    """Reads statistics files one after another, learning the layout that files of one campaign share.

    Each reader owns its :class:`~flatnorm_dask.propertylist.LayoutCache`: a reading task makes one for its
    files, and readers never share state.

    Parameters
    ----------
    layouts : LayoutCache, optional
        The layouts to learn into (a new cache by default; ``LayoutCache(max_layouts=0)`` reads every file
        item by item).
    max_bytes : int
        Largest file read (``input.max_file_bytes``); a larger one is an error naming the file.
    max_requests : int
        Remote files (``s3://``...) fetched at once by :meth:`read_many`.
    """

    def __init__(self, layouts: pl.LayoutCache | None = None, *, max_bytes: int = MAX_FILE_BYTES,
                 max_requests: int = DEFAULT_MAX_REQUESTS):
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, got {max_bytes!r}")
        self.layouts = pl.LayoutCache() if layouts is None else layouts
        if self.layouts.planner is None:
            self.layouts.planner = _RowPlan.of
        self.max_bytes = max_bytes
        self.remote = RemoteReader(max_bytes, max_requests)

    def text(self, path: str | os.PathLike) -> str:
        """The file's text.

        Raises
        ------
        StatsFormatError
            It cannot be read, is not a regular file, is larger than ``max_bytes``, is empty, or is not
            UTF-8 text.
        """
        try:
            data = self.remote.fetch(path) if is_remote(path) else read_bytes(_local_path(path), self.max_bytes)
        except (OSError, RefusedFile, ImportError) as err:
            raise _read_error(path, err) from None
        return self._decode(path, data)

    def _decode(self, path, data: bytes) -> str:
        if not data.strip():
            raise StatsFormatError(path, "empty file")
        try:
            return decode_text(data)
        except RefusedFile as err:
            raise StatsFormatError(path, str(err)) from None

    def parse(self, text: str, path: str | os.PathLike | None = None) -> dict[str, Any]:
        """Name -> value of a statistics document, by the fastest path that reads it exactly.

        PropertyList documents in the layout PyYAML writes take the fast parser (through a learned layout,
        or item by item); JSON objects are read as JSON (so ``1e5`` is a number, as JSON says); everything
        else goes through :func:`parse_record_slow`.
        """
        found = self.layouts.match(text)
        if found is None:
            return self._parse_unmatched(text, path)
        try:
            return found[0].record(found[1])
        except pl.Fallback:
            return parse_record_slow(text, path)

    def _parse_unmatched(self, text: str, path) -> dict[str, Any]:
        """:meth:`parse` of a document that no layout matches."""
        try:
            record = pl.parse_items(text)
        except pl.Fallback:
            pass
        else:
            self.layouts.learn(text, record)
            return record
        if text.lstrip().startswith("{"):
            try:
                data = json.loads(text)
            except (ValueError, RecursionError):
                data = None  # e.g. a YAML flow mapping: YAML reads it below
            if isinstance(data, dict):
                return _last_values(data)
        return parse_record_slow(text, path)

    def record(self, path: str | os.PathLike) -> dict[str, Any]:
        """Name -> value of every entry of a statistics file (see :meth:`parse`)."""
        return self.parse(self.text(path), path)

    def read(self, path: str | os.PathLike) -> StatsRow:
        """The detector's and each amplifier's median, pixel count and sigma in one statistics file.

        Parameters
        ----------
        path : path-like or URI
            A PropertyList YAML (block or flow style) or a plain YAML/JSON mapping; ``s3://`` URIs are read
            through obstore, other URIs through ``lsst.resources`` (see :mod:`flatnorm_dask.remote`).

        Raises
        ------
        StatsFormatError
            The file cannot be read or parsed, or a statistic is missing or malformed; the message names the
            file and, where one is to blame, the key.
        """
        return self._row(self.text(path), path)

    def read_many(self, paths: Iterable[str | os.PathLike]) -> Iterator[StatsRow | StatsFormatError]:
        """:meth:`read` of each path, in input order: its StatsRow, or the StatsFormatError it raised.

        Errors are yielded, not raised, so that a caller decides per file (stop, or mask and go on). Remote
        files are fetched ``max_requests`` at a time while earlier ones are parsed; local files are read one
        after another (their reads are faster than a thread hand-off). At most ``max_requests`` fetched
        files wait in memory. Stopping the iteration early cancels the fetches not yet started.
        """
        paths = list(paths)
        remote = [path for path in paths if is_remote(path)]
        fetched = self.remote.fetch_many(remote) if remote else None
        try:
            for path in paths:
                try:
                    if is_remote(path):
                        _, data = next(fetched)
                        if isinstance(data, Exception):
                            raise _read_error(path, data)
                        text = self._decode(path, data)
                    else:
                        text = self.text(path)
                    yield self._row(text, path)
                except StatsFormatError as err:
                    yield err
        finally:
            if fetched is not None:
                fetched.close()

    def _row(self, text: str, path) -> StatsRow:
        found = self.layouts.match(text)
        if found is None:
            return extract_stats(self._parse_unmatched(text, path), path)
        layout, match = found
        try:
            if layout.plan is not None:
                groups = match.groups()
                layout.check(groups)
                row = layout.plan.row(groups)
                if row is not None:
                    return row
            record = layout.record(match)
        except pl.Fallback:  # a value PyYAML constructs itself: the document is PyYAML's to read
            record = parse_record_slow(text, path)
        return extract_stats(record, path)


def _read_error(path, err: BaseException) -> StatsFormatError:
    """The StatsFormatError of a file that could not be read (an OSError, a refusal, a missing library)."""
    if isinstance(err, OSError):
        return StatsFormatError(path, f"cannot read: {err.strerror or err}")
    return StatsFormatError(path, str(err))


def read_stats_file(path: str | os.PathLike) -> StatsRow:
    """Read one statistics file (see :meth:`StatsReader.read`); to read many, use one :class:`StatsReader`."""
    return StatsReader().read(path)


def read_record(path: str | os.PathLike) -> dict[str, Any]:
    """Name -> value of every entry of one statistics file (see :meth:`StatsReader.record`)."""
    return StatsReader().record(path)


def parse_record(text: str, path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Name -> value of one statistics document (see :meth:`StatsReader.parse`)."""
    return StatsReader().parse(text, path)
