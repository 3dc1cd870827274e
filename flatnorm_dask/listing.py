"""Find the input files: a pattern's scan, a manifest's rows or a table's, listed by Dask tasks in partitions.

Each partition -- a run of directories below the root, a byte range of a CSV manifest, row groups of a Parquet
one, a slice of a table in memory -- is listed by one task into a :class:`FileTable` (numpy arrays, so that the
tasks need no pandas), which stays where it was made (in a worker's memory under distributed).  The client
receives a :class:`PartSummary` of each instead: per filter its exposure and detector ids, and the amplifier
names of a sample of its files.  :mod:`flatnorm_dask.ingest` lays out the reading from the summaries.

Bad inputs are errors naming the culprit (:class:`IngestError`): a manifest's row (a CSV's line as an editor
numbers it) and column for an empty required cell or an id outside int64; a directory that cannot be listed
(or, with ``on_error="mask"``, a recorded problem).
"""

from __future__ import annotations

import csv
import math
import os
import re
import stat
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .bounded import MAX_FILE_BYTES
from .formats import StatsReader
from .schema import DAY_OBS_PATTERN, OBS_ID_PATTERN, StatsFormatError, exposure_from_obs_id, exposure_id

__all__ = [
    "DEFAULT_FILTER",
    "FileTable",
    "IngestError",
    "PartSummary",
    "compile_pattern",
    "file_identities",
    "input_source",
    "object_array",
    "selected",
    "summarise",
]

DEFAULT_FILTER = "all"
REQUIRED_COLUMNS = ("path", "exposure", "detector")
FILTER_COLUMN = "physical_filter"

#: Files whose amplifier names each partition's summary reads, spread over its rows: enough that one odd
#: file cannot decide the names, cheap next to reading the partition.
AMP_SAMPLE = 16
#: Directories the client lists (breadth first) before it hands the rest of a pattern scan to tasks.
SCAN_SPREAD = 256
#: Directory entries the client may list while it looks for those directories (a flat tree stops early).
SCAN_CLIENT_ENTRIES = 200_000
#: Scan tasks of a pattern: each walks a run of at least SCAN_DIRS of the directories the client found (a
#: task costs a round trip, its routing tasks and about 20 ms for its sample of files, whose layout its reader
#: learns: 16 directories a task made listing cost 50% more CPU at 1,000 LSSTCam exposures than 64), and there
#: are at most SCAN_TASKS of them.
SCAN_DIRS = 64
SCAN_TASKS = 64
#: Bytes of a CSV manifest per listing task (about 50,000 rows), rows of a Parquet manifest or a table.
MANIFEST_BLOCK_BYTES = 4 * 2**20
PARTITION_ROWS = 50_000
_INT64 = (-(2**63), 2**63 - 1)

# Field types: what each named field may match, and which are integers.
_FIELD_REGEX = {
    "exposure": r"\d+",
    "detector": r"\d+",
    "day_obs": DAY_OBS_PATTERN,
    "seq_num": r"\d+",
    "obs_id": OBS_ID_PATTERN,
    "detector_name": r"[A-Za-z0-9]+_[A-Za-z0-9]+",
    "run": r".+?",
}
_ANY = r"[^/]+?"


class IngestError(ValueError):
    """Bad inputs found while listing or reading files: a one-line message naming the file, row or column."""


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """Regex for a filename pattern with ``{field}`` placeholders (a repeated field must repeat its value)."""
    parts, seen, pos = [], set(), 0
    for match in re.finditer(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", pattern):
        parts.append(re.escape(pattern[pos:match.start()]))
        name = match.group(1)
        if name in seen:
            parts.append(f"(?P={name})")
        else:
            parts.append(f"(?P<{name}>{_FIELD_REGEX.get(name, _ANY)})")
            seen.add(name)
        pos = match.end()
    parts.append(re.escape(pattern[pos:]))
    has_exposure = "exposure" in seen or "obs_id" in seen or {"day_obs", "seq_num"} <= seen
    has_detector = "detector" in seen or "detector_name" in seen
    if not (has_exposure and has_detector):
        raise IngestError(
            f"pattern {pattern!r} must name the exposure ({{exposure}}, {{obs_id}} or {{day_obs}} and "
            f"{{seq_num}}) and the detector ({{detector}} or {{detector_name}})")
    return re.compile("".join(parts))


# ------------------------------------------------------------------------------------------ file tables

def object_array(values: Sequence[Any]) -> np.ndarray:
    """A 1-d object array of ``values`` (strings stay Python strings: cheap to pass between tasks)."""
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def file_identities(paths: Sequence[str]) -> np.ndarray:
    """(size, mtime_ns) of each local file, an (n, 2) int64 array, so that a later run can tell whether a file
    changed (:mod:`flatnorm_dask.incremental`); (-1, -1) for a URI or a file that cannot be stat'ed.

    One stat a file, in one loop (the system call is most of the cost).
    """
    sizes, mtimes = np.full(len(paths), -1, dtype=np.int64), np.full(len(paths), -1, dtype=np.int64)
    found, size, mtime = [], [], []
    stat = os.stat
    for i, path in enumerate(paths):
        if "://" in path:
            continue
        try:
            st = stat(path)
        except (OSError, ValueError):
            continue
        found.append(i)
        size.append(st.st_size)
        mtime.append(st.st_mtime_ns)
    sizes[found], mtimes[found] = size, mtime
    return np.stack([sizes, mtimes], axis=1)


@dataclass(frozen=True)
class FileTable:
    """Input files with their data ids, as numpy arrays: what one listing task makes of its partition.

    ``path``, ``physical_filter``: object arrays of str; ``exposure``, ``detector``: int64.  ``problems``
    lists directories that could not be listed (``on_error="mask"``), as ``{"file", "reason"}`` records.
    After a down-selection, ``n_listed`` counts the rows before it and ``seen`` holds (some of) the values
    of the selection's field that the rows had.  ``identity``: each file's :func:`file_identities` when the
    listing task stat'ed them (a pattern scan for an append), else None.
    """

    path: np.ndarray
    exposure: np.ndarray
    detector: np.ndarray
    physical_filter: np.ndarray
    problems: tuple[dict[str, str], ...] = ()
    n_listed: int | None = None
    seen: tuple[str, ...] = ()
    identity: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.path)

    def filters(self) -> list[str]:
        """The physical filters the rows name, sorted.  (A set of the strings: ``np.unique`` of them costs a
        listing task ten times more.)"""
        return sorted(map(str, set(self.physical_filter.tolist())))

    def take(self, index: Any) -> FileTable:
        """The rows ``index`` selects (a boolean mask or positions)."""
        return FileTable(self.path[index], self.exposure[index], self.detector[index], self.physical_filter[index],
                         identity=None if self.identity is None else self.identity[index])

    @classmethod
    def concat(cls, tables: Sequence[FileTable]) -> FileTable:
        if not tables:
            return cls(object_array([]), np.empty(0, np.int64), np.empty(0, np.int64), object_array([]))
        return cls(*(np.concatenate([getattr(t, name) for t in tables])
                     for name in ("path", "exposure", "detector", "physical_filter")),
                   problems=tuple(p for t in tables for p in t.problems),
                   n_listed=sum(len(t) if t.n_listed is None else t.n_listed for t in tables),
                   seen=tuple(sorted({v for t in tables for v in t.seen})),
                   identity=None if any(t.identity is None for t in tables)
                   else np.concatenate([t.identity for t in tables]))

    def to_frame(self):
        """The table as a pandas DataFrame (``path, exposure, detector, physical_filter``)."""
        import pandas as pd

        return pd.DataFrame({"path": self.path.astype(str), "exposure": self.exposure, "detector": self.detector,
                             "physical_filter": self.physical_filter.astype(str)})


@dataclass(frozen=True)
class PartSummary:
    """What the client learns of a partition: per filter its file count and exposure and detector ids, the
    amplifier names of a sample of its files (each weighted by the files it stands for), its problems."""

    n_files: dict[str, int]
    exposures: dict[str, np.ndarray]
    detectors: dict[str, np.ndarray]
    amp_names: dict[tuple[str, ...], float]
    problems: tuple[dict[str, str], ...] = ()
    unread: tuple[str, ...] = ()  # a sampled file that could not be read, and why (for the error if none can)
    n_listed: int = 0  # rows listed, before a down-selection
    seen: tuple[str, ...] = ()  # values of the selection's field that the rows had


def summarise(table: FileTable, max_file_bytes: int = MAX_FILE_BYTES) -> PartSummary:
    """A partition's :class:`PartSummary` (its sample of files read with ``max_file_bytes`` as their size
    limit); runs in a task, where the partition is."""
    n_files, exposures, detectors = {}, {}, {}
    for name in table.filters():
        sel = table.physical_filter == name
        n_files[name] = int(sel.sum())
        exposures[name] = np.unique(table.exposure[sel])
        detectors[name] = np.unique(table.detector[sel])
    sample = np.unique(np.linspace(0, len(table) - 1, min(AMP_SAMPLE, len(table))).astype(int))
    reader, names, unread = StatsReader(max_bytes=max_file_bytes), Counter(), ()
    for i in sample:
        try:
            names[reader.read(table.path[i]).amp_names] += 1
        except StatsFormatError as err:  # the reading task will report it; the sample only counts names
            unread = unread or (str(err),)
    weight = len(table) / max(1, len(sample))
    return PartSummary(n_files, exposures, detectors, {k: v * weight for k, v in names.items()},
                       table.problems, unread, len(table) if table.n_listed is None else table.n_listed,
                       table.seen)


# -------------------------------------------------------------------------------------- pattern scans

def _list_directory(directory: str, on_error: str, problems: list[dict[str, str]]) -> tuple[list[str], list[str]]:
    """(file names, sub-directory names) of a directory, as ``os.walk`` sees them (symlinked directories are
    listed, not entered).  One that cannot be listed raises, or with ``mask`` is recorded and skipped."""
    files, dirs = [], []
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                try:
                    is_dir = entry.is_dir()
                except OSError:
                    is_dir = False
                if not is_dir:
                    files.append(entry.name)
                elif not entry.is_symlink():
                    dirs.append(entry.name)
    except OSError as err:
        reason = f"cannot list directory: {err.strerror or err}"
        if on_error == "raise":
            raise IngestError(f"{directory}: {reason}") from None
        problems.append({"file": directory, "reason": reason})
        return [], []
    return files, dirs


@dataclass(frozen=True)
class _Fields:
    """How a pattern's matched fields become ids: the regex, and the camera's detector ids by name."""

    regex: re.Pattern[str]
    detector_ids: dict[str, int] | None
    camera_name: str | None


def _int_ids(values: Sequence[str], paths: Sequence[str], what: str) -> np.ndarray:
    try:
        return np.array(values, dtype=object).astype(np.int64)
    except OverflowError:
        for path, value in zip(paths, values):
            if int(value) > _INT64[1]:
                raise IngestError(f"{path}: {what} {value} is out of the int64 range") from None
        raise


def _ids_from_fields(fields: dict[str, list[str]], paths: list[str], spec: _Fields) -> FileTable:
    """Turn matched pattern fields into integer exposure and detector ids (errors name the file)."""
    if "exposure" in fields:
        exposure = _int_ids(fields["exposure"], paths, "exposure")
    elif "obs_id" in fields:
        ids = {}
        for path, obs_id in zip(paths, fields["obs_id"]):
            if obs_id not in ids:
                try:
                    ids[obs_id] = exposure_from_obs_id(obs_id)
                except ValueError as err:
                    raise IngestError(f"{path}: {err}") from None
        exposure = np.array([ids[o] for o in fields["obs_id"]], dtype=np.int64)
    else:
        day_obs, seq_num = (_int_ids(fields[k], paths, k) for k in ("day_obs", "seq_num"))
        try:
            exposure = np.asarray(exposure_id(day_obs, seq_num), dtype=np.int64).reshape(-1)
        except ValueError:
            for path, day, seq in zip(paths, day_obs, seq_num):  # find the file to name
                try:
                    exposure_id(day, seq)
                except ValueError as err:
                    raise IngestError(f"{path}: {err}") from None
            raise
    if "detector" in fields:
        detector = _int_ids(fields["detector"], paths, "detector")
    else:
        ids = spec.detector_ids or {}
        try:
            detector = np.array([ids[name] for name in fields["detector_name"]], dtype=np.int64)
        except KeyError as err:
            bad = paths[fields["detector_name"].index(err.args[0])]
            raise IngestError(f"{bad}: detector {err.args[0]!r} is not in camera {spec.camera_name!r}") from None
    filters = fields.get(FILTER_COLUMN) or [DEFAULT_FILTER] * len(paths)
    return FileTable(object_array(paths), exposure, detector, object_array(filters))


def _scan(root: str, items: Sequence[tuple[str, bool]], spec: _Fields, on_error: str,
          carried: Sequence[dict[str, str]] = (), identity: bool = False) -> FileTable:
    """List the files below some directories that match the pattern -- a listing task.

    ``items`` are (directory, recursive): the files of each directory, and of its whole tree when recursive.
    ``carried``: problems the client met while listing the top of the tree, passed on with this table.
    ``identity``: stat each file found (:func:`file_identities`), in this task.
    """
    paths: list[str] = []
    matches: list[re.Match[str]] = []
    problems: list[dict[str, str]] = list(carried)
    stack = [(directory, recursive) for directory, recursive in reversed(items)]
    fullmatch = spec.regex.fullmatch
    while stack:
        directory, recursive = stack.pop()
        names, subdirs = _list_directory(directory, on_error, problems)
        rel = os.path.relpath(directory, root)
        prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        base = os.path.join(directory, "")  # + a name: os.path.join's path, without its cost for every file
        for name in names:
            match = fullmatch(prefix + name)
            if match:
                paths.append(base + name)
                matches.append(match)
        if recursive:
            stack.extend((os.path.join(directory, d), True) for d in sorted(subdirs, reverse=True))
    fields = {key: [match[key] for match in matches] for key in spec.regex.groupindex}
    table = _ids_from_fields(fields, paths, spec) if paths else FileTable.concat([])
    return FileTable(table.path, table.exposure, table.detector, table.physical_filter, tuple(problems),
                     identity=file_identities(paths) if identity else None)


class _PatternSource:
    """Files below a root directory whose relative paths match a pattern."""

    def __init__(self, root: str | os.PathLike, pattern: str, camera: Any):
        self.root = Path(root)
        self.name = str(self.root)
        self.pattern = pattern
        regex = compile_pattern(pattern.lstrip("/"))
        ids = None
        if "detector" not in regex.groupindex:
            if camera is None:
                raise IngestError(f"{self.root}: {{detector_name}} needs a camera to map names to ids")
            ids = dict(zip(camera.detector_name.tolist(), camera.detector.tolist()))
        self.spec = _Fields(regex, ids, getattr(camera, "name", None))
        if not self.root.is_dir():
            raise IngestError(f"{self.root}: input directory not found")

    def nothing_found(self) -> str:
        return f"{self.root}: no file matches pattern {self.pattern!r}"

    def count(self, limit: int) -> int:
        """Files below the root, matching or not, counted up to just past ``limit``: a bound, cheaply."""
        n, stack = 0, [str(self.root)]
        while stack and n <= limit:
            directory = stack.pop()
            names, subdirs = _list_directory(directory, "mask", [])
            n += len(names)
            stack += [os.path.join(directory, d) for d in subdirs]
        return n

    def partitions(self, on_error: str, identity: bool = False) -> list[Any]:
        """Delayed :class:`FileTable` s.  The client lists the top of the tree, breadth first, until it has
        about :data:`SCAN_SPREAD` directories; tasks walk runs of them (and match the files of the
        directories the client listed), and with ``identity`` stat the files they find."""
        import dask

        problems: list[dict[str, str]] = []
        shallow: list[str] = []
        frontier, listed = [str(self.root)], 0
        while frontier and len(frontier) < SCAN_SPREAD and listed < SCAN_CLIENT_ENTRIES:
            deeper: list[str] = []
            for i, directory in enumerate(frontier):
                if listed >= SCAN_CLIENT_ENTRIES:  # the rest of this level is walked by tasks, whole
                    deeper += frontier[i:]
                    break
                names, subdirs = _list_directory(directory, on_error, problems)
                listed += len(names) + len(subdirs)
                if names:
                    shallow.append(directory)
                deeper += [os.path.join(directory, d) for d in sorted(subdirs)]
            frontier = deeper
        items = [(d, False) for d in shallow] + [(d, True) for d in frontier]
        bounds = np.linspace(0, len(items), min(-(-len(items) // SCAN_DIRS), SCAN_TASKS) + 1).astype(int)
        scan = dask.delayed(_scan, pure=False)
        parts = [scan(str(self.root), items[a:b], self.spec, on_error, (), identity)
                 for a, b in zip(bounds[:-1], bounds[1:])]
        if problems:  # the client's own listing problems travel with an empty table
            parts.append(scan(str(self.root), [], self.spec, on_error, problems, identity))
        return parts


# ----------------------------------------------------------------------------------------------- manifests

class _BadCell(ValueError):
    """A manifest cell that cannot be used; the message says why (the caller names the row and column)."""


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or \
        (isinstance(value, str) and not value.strip())


def _parse_id(value: Any) -> int:
    """An id cell as an int: an integer, or text or a float holding one exactly, within int64."""
    if _blank(value):
        raise _BadCell("empty cell")
    if isinstance(value, (bool, np.bool_)):
        raise _BadCell(f"not an integer id: {value!r}")
    if isinstance(value, (int, np.integer)):
        number = int(value)
    else:
        text = value
        if isinstance(value, str):
            try:
                number = int(value)
            except ValueError:
                try:
                    value = float(value)
                except ValueError:
                    raise _BadCell(f"not an integer id: {text!r}") from None
        if not isinstance(value, str):
            value = float(value)
            if not (math.isfinite(value) and value.is_integer()):
                raise _BadCell(f"not an integer id: {text!r}")
            if abs(value) >= 2**53:  # beyond a float's exact integers: the id was already rounded
                raise _BadCell(f"not an exact integer id: {text!r}")
            number = int(value)
    if not _INT64[0] <= number <= _INT64[1]:
        raise _BadCell(f"id {number} is out of the int64 range")
    return number


def _id_column(values: np.ndarray, column: str, where: Callable[[int], str]) -> np.ndarray:
    """A manifest's id column as int64; the first bad cell raises, naming its row and the column."""
    if values.dtype.kind == "i":
        return values.astype(np.int64)
    if values.dtype.kind == "u" and not (values > _INT64[1]).any():
        return values.astype(np.int64)
    if values.dtype.kind == "O":
        try:
            return values.astype(np.int64)  # the usual case: int-like text or ints, checked by the cast
        except (ValueError, TypeError, OverflowError):
            pass
    out = np.empty(len(values), dtype=np.int64)
    for i, value in enumerate(values.tolist()):
        try:
            out[i] = _parse_id(value)
        except _BadCell as err:
            raise IngestError(f"{where(i)}: column {column}: {err}") from None
    return out


def _text_column(values: np.ndarray, column: str, where: Callable[[int], str]) -> list[str]:
    texts = values.tolist()
    for i, value in enumerate(texts):
        if _blank(value):
            raise IngestError(f"{where(i)}: column {column}: empty cell")
        if not isinstance(value, str):
            texts[i] = str(value)
    return texts


#: Values of the selection's field a listing task reports (for the message when nothing is selected).
_SEEN = 100


def selected(values: Sequence[Any], value: str) -> np.ndarray:
    """Which of a column's values match a down-selection's ``value``: equal ignoring case (the rule of
    cp_pipe's ``doDownSelection``); a missing value (empty, None, NA) never matches."""
    wanted = value.lower()
    return np.array([isinstance(v, str) and v != "" and v.lower() == wanted for v in values], dtype=bool)


def _checked_rows(columns: dict[str, np.ndarray], where: Callable[[int], str], base: str | None,
                  select: tuple[str, str] | None = None) -> FileTable:
    """A :class:`FileTable` from a manifest's columns; an empty required cell or a bad id raises naming the row.

    Relative paths are joined to ``base``; URIs (``s3://...``) are kept as they are.  With ``select``
    (field, value), only the rows whose field matches it (:func:`selected`) are checked and kept.
    """
    if select is not None:
        field, value = select
        column = columns[field]
        keep = np.flatnonzero(selected(column, value))
        seen = tuple(sorted({v for v in column.tolist() if isinstance(v, str) and v}))[:_SEEN]
        kept = _checked_rows({name: values[keep] for name, values in columns.items() if name != field},
                             lambda i: where(int(keep[i])), base)
        return FileTable(kept.path, kept.exposure, kept.detector, kept.physical_filter, n_listed=len(column),
                         seen=seen)
    paths = _text_column(columns["path"], "path", where)
    if base is not None:
        paths = [p if "://" in p or os.path.isabs(p) else os.path.join(base, p) for p in paths]
    exposure = _id_column(columns["exposure"], "exposure", where)
    detector = _id_column(columns["detector"], "detector", where)
    if FILTER_COLUMN in columns:
        filters = _text_column(columns[FILTER_COLUMN], FILTER_COLUMN, where)
    else:
        filters = [DEFAULT_FILTER] * len(paths)
    return FileTable(object_array(paths), exposure, detector, object_array(filters))


def _newlines_before(path: str, offset: int) -> int:
    """Line breaks in the first ``offset`` bytes of a file (read in pieces: memory stays small)."""
    n, left = 0, offset
    with open(path, "rb") as f:
        while left > 0:
            piece = f.read(min(left, 2**20))
            if not piece:
                break
            n, left = n + piece.count(b"\n"), left - len(piece)
    return n


def _csv_part(path: str, offset: int, length: int, columns: tuple[str, ...], base: str,
              select: tuple[str, str] | None = None) -> FileTable:
    """The rows of a CSV manifest's lines that start in ``[offset, offset + length)`` -- a listing task.

    Errors name the line as a text editor numbers it (the header is line 1).
    """
    import fsspec.utils

    try:
        with open(path, "rb") as f:
            data = fsspec.utils.read_block(f, offset, length, b"\n")
    except OSError as err:
        raise IngestError(f"{path}: cannot read manifest: {err.strerror or err}") from None

    def line(local: int) -> int:
        """The file's line number of the block's 1-based line ``local``."""
        return local if offset == 0 else _newlines_before(path, offset) + 1 + local

    try:
        text = data.decode("utf-8-sig" if offset == 0 else "utf-8")
    except UnicodeDecodeError as err:
        bad_line = line(data.count(b"\n", 0, err.start) + 1)
        raise IngestError(f"{path}: line {bad_line}: not UTF-8 text") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    reader = csv.reader(lines, strict=True)
    try:
        rows = list(reader)
    except csv.Error as err:
        raise IngestError(f"{path}: line {line(reader.line_num)}: {err}") from None
    if reader.line_num != len(rows):  # a quoted field ran over a line break: find it
        done, reader = 0, csv.reader(lines)
        for _ in reader:
            if reader.line_num - done > 1:
                raise IngestError(f"{path}: line {line(done + 1)}: a quoted field holds a line break, which "
                                  "manifest rows may not")
            done = reader.line_num
    first = 1 if offset == 0 else 0  # the header's line
    kept = [i for i in range(first, len(rows)) if rows[i] and not (len(rows[i]) == 1 and not rows[i][0].strip())]
    for i in kept:
        if len(rows[i]) != len(columns):
            raise IngestError(f"{path}: line {line(i + 1)}: expected {len(columns)} fields ({', '.join(columns)}), "
                              f"found {len(rows[i])}")
    values = list(zip(*(rows[i] for i in kept))) or [()] * len(columns)
    table = {name: object_array(column) for name, column in zip(columns, values)}
    return _checked_rows(table, lambda i: f"{path}: line {line(kept[i] + 1)}", base, select)


def _parquet_part(path: str, row_groups: list[int], first_row: int, columns: tuple[str, ...],
                  base: str, select: tuple[str, str] | None = None) -> FileTable:
    """The rows of some row groups of a Parquet manifest -- a listing task; errors name the row (1-based)."""
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path).read_row_groups(row_groups, columns=list(columns))
    except Exception as err:  # OSError, ArrowInvalid...
        raise IngestError(f"{path}: cannot read manifest: {' '.join(str(err).split())}") from None
    arrays = {name: table.column(name).to_numpy(zero_copy_only=False) for name in columns}
    return _checked_rows(arrays, lambda i: f"{path}: row {first_row + i + 1}", base, select)


class _ManifestSource:
    """The files a CSV or Parquet manifest lists (columns ``path, exposure, detector[, physical_filter]``)."""

    def __init__(self, manifest: str | os.PathLike, root: str | os.PathLike | None, select: tuple[str, str] | None):
        self.path = path = Path(manifest)
        self.name = str(path)
        self.base = str(Path(root) if root is not None else path.parent)
        self.select = select
        try:
            mode = path.stat().st_mode
        except OSError as err:
            raise IngestError(f"{path}: cannot read manifest: {err.strerror or err}") from None
        if not stat.S_ISREG(mode):
            raise IngestError(f"{path}: cannot read manifest: not a regular file")
        self.parquet = path.suffix.lower() in (".parquet", ".pq")
        names = self._parquet_header() if self.parquet else self._csv_header()
        used = (*REQUIRED_COLUMNS, *([select[0]] if select else []))
        missing = [c for c in used if c not in names]
        if missing:
            raise IngestError(f"{path}: manifest lacks column(s) {', '.join(missing)}")
        twice = sorted({c for c in names if names.count(c) > 1 and c in (*used, FILTER_COLUMN)})
        if twice:
            raise IngestError(f"{path}: manifest has column(s) {', '.join(twice)} more than once")
        self.columns = names

    def _csv_header(self) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                head = f.readline(2**20)
            self.size = self.path.stat().st_size
        except OSError as err:
            raise IngestError(f"{self.path}: cannot read manifest: {err.strerror or err}") from None
        if not head.strip():
            raise IngestError(f"{self.path}: cannot read manifest: no header line (path,exposure,detector)")
        try:
            return [c.strip() for c in next(csv.reader([head.decode("utf-8-sig").rstrip("\r\n")]))]
        except (UnicodeDecodeError, csv.Error, StopIteration) as err:
            raise IngestError(f"{self.path}: line 1: not a CSV header: {err}") from None

    def _parquet_header(self) -> list[str]:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise IngestError(f"{self.path}: a Parquet manifest needs pyarrow: pip install "
                              "'flatnorm-dask[parquet]'") from None
        try:
            meta = pq.ParquetFile(self.path).metadata
        except Exception as err:  # ArrowInvalid (not Parquet), OSError...
            raise IngestError(f"{self.path}: cannot read manifest: {' '.join(str(err).split())}") from None
        self.group_rows = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        return [meta.schema.column(i).name for i in range(meta.num_columns)]

    def nothing_found(self) -> str:
        return f"{self.path}: the manifest lists no files"

    def count(self, limit: int) -> int:
        """Rows, counted up to just past ``limit`` (a CSV's line breaks, the Parquet metadata's count)."""
        if self.parquet:
            return sum(self.group_rows)
        n = -1  # the header
        with open(self.path, "rb") as f:
            while n <= limit and (piece := f.read(2**20)):
                n += piece.count(b"\n")
        return max(n, 0)

    def partitions(self, on_error: str, identity: bool = False) -> list[Any]:
        import dask

        field = [self.select[0]] if self.select else []
        wanted = tuple(c for c in (*REQUIRED_COLUMNS, FILTER_COLUMN, *field) if c in self.columns)
        if self.parquet:
            parts, groups, first, rows = [], [], 0, 0
            for i, n in enumerate(self.group_rows):
                groups.append(i)
                rows += n
                if rows >= PARTITION_ROWS or i == len(self.group_rows) - 1:
                    parts.append(dask.delayed(_parquet_part, pure=False)(str(self.path), groups, first, wanted,
                                                                          self.base, self.select))
                    groups, first, rows = [], first + rows, 0
            return parts
        csv_part = dask.delayed(_csv_part, pure=False)
        return [csv_part(str(self.path), offset, MANIFEST_BLOCK_BYTES, tuple(self.columns), self.base, self.select)
                for offset in range(0, max(self.size, 1), MANIFEST_BLOCK_BYTES)]


class _TableSource:
    """Files listed by a table in memory (``path, exposure, detector[, physical_filter]``), e.g. a butler's;
    ``name`` says where it came from, in messages."""

    def __init__(self, files: Any, name: str, select: tuple[str, str] | None):
        self.name, self.select = name, select
        missing = [c for c in REQUIRED_COLUMNS if c not in files.columns]
        if missing:
            raise IngestError(f"{name}: file table lacks column(s) {', '.join(missing)}")
        if select and select[0] not in files.columns:
            raise IngestError(f"{name}: no {select[0]} column to select on")
        used = (*REQUIRED_COLUMNS, FILTER_COLUMN, *([select[0]] if select else []))
        self.columns = {c: np.asarray(files[c].to_numpy(), dtype=None if c in REQUIRED_COLUMNS[1:] else object)
                        for c in used if c in files.columns}
        self.n = len(files)

    def nothing_found(self) -> str:
        return f"{self.name}: no input files"

    def count(self, limit: int) -> int:
        return self.n

    def partitions(self, on_error: str, identity: bool = False) -> list[Any]:
        import dask

        part = dask.delayed(_table_part, pure=False)
        return [part({k: v[start:start + PARTITION_ROWS] for k, v in self.columns.items()}, start, self.name,
                     self.select)
                for start in range(0, self.n, PARTITION_ROWS)]


def _table_part(columns: dict[str, np.ndarray], first_row: int, name: str,
                select: tuple[str, str] | None) -> FileTable:
    return _checked_rows(columns, lambda i: f"{name}: row {first_row + i + 1}", None, select)


def input_source(root=None, pattern=None, manifest=None, camera=None, files=None, *, files_from: str = "file table",
                 select: tuple[str, str] | None = None) -> Any:
    """Where the inputs are: a pattern below a root, a manifest, or a file table (named ``files_from`` in
    messages); see :func:`flatnorm_dask.ingest.discover`.  ``select`` (field, value) keeps the rows whose field
    matches (:func:`selected`): a manifest's or a table's column.

    The source's ``partitions(on_error, identity=False)`` are Delayed :class:`FileTable` s (with ``identity``,
    a pattern scan's hold the files' :func:`file_identities`; a manifest's or a table's never do), its
    ``count(limit)`` a cheap count, ``name`` what messages call it and ``nothing_found()`` its message for no
    file.
    """
    if files is not None:
        if pattern is not None or manifest is not None:
            raise IngestError("give a file table, or a pattern or a manifest, not both")
        return _TableSource(files, files_from, select)
    if (pattern is None) == (manifest is None):
        raise IngestError("give exactly one of a pattern (with a root directory) or a manifest")
    if manifest is not None:
        return _ManifestSource(manifest, root, select)
    if root is None:
        raise IngestError("a pattern needs a root directory")
    if select is not None:
        raise IngestError(f"a pattern gives no column {select[0]} to select on: list the files in a manifest")
    return _PatternSource(root, pattern, camera)
