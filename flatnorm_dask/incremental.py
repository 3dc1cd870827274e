"""What an append reads: the input files a store does not already hold, sorted out on the workers.

A store records, per (detector, exposure) cell of each filter, the file read and its size and modification time
when it was read (:data:`flatnorm_dask.workflow.READING_VARIABLES`).  An append lists its inputs as any run does
(:func:`flatnorm_dask.ingest.list_campaign`, partitions that stay on the workers); here each partition is
compared, in a task, with the store's record (:class:`HeldFiles`, read once by a task and shipped to the others
by Dask), and only the files to read stay in it:

- **added**: a file whose cell the store does not hold (a new exposure, detector or filter);
- **re-read**: the file the store holds for the cell, at the same path, whose size or modification time
  (``mtime_ns``) has changed since it was read, or is unknown (a URI);
- **replaced**: a cell the store holds from another path;
- a cell listed more than once in a partition is read whole (so that the duplicate is found as a run finds it).

The client receives only counts and the indices of the held cells that were listed (:class:`PartReport`):
a held cell listed by no partition is a file that **vanished** from the inputs; its cells are kept.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .ingest import file_identity
from .listing import FileTable

__all__ = ["NAMED_VANISHED", "HeldFiles", "PartReport", "held_files", "merged_seen", "split_part", "vanished_files"]

#: Vanished files named in a run's summary and in the store's history (the counts are complete).
NAMED_VANISHED = 20


@dataclass(frozen=True)
class HeldFiles:
    """What a store version holds per filter: its grid's ids and, per cell, the file read ("" if none) and its
    size and mtime_ns when read (-1 if unknown)."""

    detectors: dict[str, np.ndarray]
    exposures: dict[str, np.ndarray]
    path: dict[str, np.ndarray]
    size: dict[str, np.ndarray]
    mtime_ns: dict[str, np.ndarray]

    def cells(self, name: str) -> int:
        return len(self.detectors[name]) * len(self.exposures[name])


def held_files(version: Any) -> HeldFiles:
    """The files a committed store version holds -- a task (it reads only the version's identity arrays).

    Raises
    ------
    StoreError
        The store predates the per-cell record of the files read (a store written before it cannot be appended
        to: every file would look new).
    """
    from .store import StoreError, group_datasets, open_store

    tree = open_store(version)
    out: dict[str, dict[str, np.ndarray]] = {"detectors": {}, "exposures": {}, "path": {}, "size": {},
                                             "mtime_ns": {}}
    for name, ds in group_datasets(tree).items():
        missing = [v for v in ("file", "file_size", "file_mtime_ns") if v not in ds]
        if missing:
            raise StoreError(f"{version.store}: group {name} has no record of the files it read ({', '.join(missing)}"
                             "): written by an older flatnorm; run it again without --append")
        ds = ds[["file", "file_size", "file_mtime_ns"]].transpose("detector", "exposure").load()
        out["detectors"][name] = ds["detector"].values
        out["exposures"][name] = ds["exposure"].values
        out["path"][name] = ds["file"].values.astype(object)
        out["size"][name] = ds["file_size"].values
        out["mtime_ns"][name] = ds["file_mtime_ns"].values
    return HeldFiles(**out)


@dataclass(frozen=True)
class PartReport:
    """What the client learns of one listing partition compared with the store: counts, the flat indices
    (``detector * n_exposures + exposure``) of the held cells it lists, per filter, and a few replaced paths."""

    n_listed: int = 0
    added: int = 0
    reread: int = 0
    replaced: int = 0
    seen: dict[str, np.ndarray] = field(default_factory=dict)
    replaced_examples: tuple[tuple[str, str], ...] = ()


def _positions(ids: np.ndarray, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of each id in a sorted grid, and whether it is there."""
    at = np.searchsorted(grid, ids)
    inside = at < len(grid)
    inside[inside] = grid[at[inside]] == ids[inside]
    return np.where(inside, at, 0), inside


def split_part(table: FileTable, held: HeldFiles) -> tuple[FileTable, PartReport]:
    """The rows of a listing partition to read, and its :class:`PartReport` -- a task."""
    read = np.ones(len(table), dtype=bool)
    added = reread = replaced = 0
    seen, examples = {}, []
    for name in np.unique(table.physical_filter.astype(str)) if len(table) else ():
        rows = np.flatnonzero(table.physical_filter == name)
        if name not in held.detectors:  # a new filter
            added += len(rows)
            continue
        d, d_in = _positions(table.detector[rows], held.detectors[name])
        e, e_in = _positions(table.exposure[rows], held.exposures[name])
        inside = d_in & e_in
        held_path = np.where(inside, held.path[name][d, e], "")
        new = held_path == ""
        same = ~new & (held_path == table.path[rows])
        unchanged = np.zeros(len(rows), dtype=bool)
        for k in np.flatnonzero(same):
            size, mtime = file_identity(str(table.path[rows[k]]))
            unchanged[k] = size >= 0 and (size, mtime) == (held.size[name][d[k], e[k]], held.mtime_ns[name][d[k], e[k]])
        cell = d * len(held.exposures[name]) + e
        # A cell listed twice here is read whole: the duplicate is then found as a run would find it.
        cells, counts = np.unique(cell[inside], return_counts=True)
        twice = inside & np.isin(cell, cells[counts > 1])
        unchanged &= ~twice
        read[rows] = ~unchanged
        added += int(new.sum())
        reread += int((same & ~unchanged).sum())
        moved = ~new & ~same
        replaced += int(moved.sum())
        examples += [(str(held_path[k]), str(table.path[rows[k]])) for k in np.flatnonzero(moved)[:3]]
        seen[str(name)] = np.unique(cell[inside])
    kept = table.take(read)
    kept = dataclasses.replace(kept, problems=table.problems, n_listed=table.n_listed, seen=table.seen)
    return kept, PartReport(len(table), added, reread, replaced, seen, tuple(examples[:3]))


def vanished_files(held: HeldFiles, seen: dict[str, np.ndarray]) -> tuple[int, list[dict[str, Any]], int]:
    """How many held files no partition listed, the first :data:`NAMED_VANISHED` of them as ``{"file",
    "physical_filter", "detector", "exposure"}`` records, and how many files the store holds -- a task (the
    paths stay on the worker but those)."""
    count, named, n_held = 0, [], 0
    for name, paths in held.path.items():
        n_held += int((paths != "").sum())
        listed = np.zeros(paths.size, dtype=bool)
        listed[seen.get(name, np.empty(0, np.int64))] = True
        gone = np.flatnonzero((paths.reshape(-1) != "") & ~listed)
        count += len(gone)
        for flat in gone[:max(0, NAMED_VANISHED - len(named))]:
            d, e = divmod(int(flat), len(held.exposures[name]))
            named.append({"file": str(paths[d, e]), "physical_filter": name, "detector": int(held.detectors[name][d]),
                          "exposure": int(held.exposures[name][e])})
    return count, named, n_held


def merged_seen(reports: Sequence[PartReport]) -> dict[str, np.ndarray]:
    """The held cells listed by any partition, per filter."""
    names = {name for r in reports for name in r.seen}
    return {name: np.unique(np.concatenate([r.seen[name] for r in reports if name in r.seen])) for name in names}
