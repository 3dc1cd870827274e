"""What an append reads: the input files a store does not already hold, sorted out on the workers.

A store records, per (detector, exposure) cell of each filter, the file read and its size and modification time
when it was read (:data:`flatnorm_dask.workflow.READING_VARIABLES`).  An append lists its inputs as any run does
(:func:`flatnorm_dask.ingest.list_campaign`, partitions that stay on the workers; a pattern scan's tasks stat
the files they find in the same pass); here each partition is compared, in a task, with the store's record
(:class:`HeldFiles`, read once by a task and shipped to the others by Dask), and only the files to read stay in
it:

- **added**: a file whose cell the store does not hold (a new exposure, detector or filter);
- **re-read**: the file the store holds for the cell, at the same path, whose size or modification time
  (``mtime_ns``) has changed since it was read, or is unknown (a URI);
- **replaced**: a cell the store holds from another path;
- a cell listed more than once in a partition is read whole (so that the duplicate is found as a run finds it).

Each partition's :class:`PartReport` holds counts and the indices of the held cells it listed: a held cell
listed by no partition is a file that **vanished** from the inputs (:func:`vanished_files`, a task); its cells
are kept.  The client receives the counts, and only the first vanished files.

Merging (:func:`plan_merge`, :func:`merge_block`): a filter the store holds keeps the store's chunks.  A chunk
whose cells stay where they were and gain no new reading (every chunk but the last of each row when the new
exposures sort after the store's) is linked from the version appended to, file for file
(:func:`flatnorm_dask.store.link_chunks`); each block of the other chunks is made by one task from the store's
cells, read with orthogonal selections through the committed version's store, and the reading tasks' blocks
that overlap it; the cells the new reading read win.  No task rechunks or reindexes a whole filter, and each
chunk of the merged group is linked or written exactly once.

The store's record of a filter is held whole by the tasks that compare partitions with it: about 150 bytes a
(detector, exposure) cell (its path, mostly).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .ingest import ABSENT, FILE_RECORD, grid_chunks
from .listing import FileTable, file_identities

__all__ = ["ABSENT_FILL", "NAMED_VANISHED", "HeldFiles", "MergePlan", "MergeSpec", "PartReport", "StoredGroup",
           "held_files", "merge_block", "plan_merge", "split_part", "vanished_files"]

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
    import zarr

    from .store import StoreError, committed_store

    # Read with zarr itself, not through xarray and dask: inside a task, a dask computation of the record would
    # be a graph of its own on the cluster (several seconds for a large store).  The record's arrays are
    # plain (no CF encoding), so the raw values are the ones xarray shows.
    root = zarr.open_group(committed_store(version), mode="r", zarr_format=3)
    out: dict[str, dict[str, np.ndarray]] = {"detectors": {}, "exposures": {}, "path": {}, "size": {},
                                             "mtime_ns": {}}
    for name, group in root.groups():
        arrays = set(group.array_keys())
        missing = [v for v in FILE_RECORD if v not in arrays]
        if missing:
            raise StoreError(f"{version.store}: group {name} has no record of the files it read ({', '.join(missing)}"
                             "): written by an older flatnorm; run it again without --append")
        out["detectors"][name] = group["detector"][...]
        out["exposures"][name] = group["exposure"][...]
        path, size, mtime = (_detector_by_exposure(group[v]) for v in FILE_RECORD)
        out["path"][name], out["size"][name], out["mtime_ns"][name] = path.astype(object), size, mtime
    return HeldFiles(**out)


def _detector_by_exposure(array: Any) -> np.ndarray:
    """A (detector, exposure) array of a store's group, read whole in that order of dimensions."""
    dims = tuple(array.metadata.dimension_names)
    return np.transpose(array[...], [dims.index("detector"), dims.index("exposure")])


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
    for name in table.filters():
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
        at = np.flatnonzero(same)
        # The files' size and mtime: stat'ed by the listing task that found them, or here.
        now = table.identity[rows[at]] if table.identity is not None else file_identities(table.path[rows[at]])
        unchanged = np.zeros(len(rows), dtype=bool)
        unchanged[at] = ((now[:, 0] >= 0) & (now[:, 0] == held.size[name][d[at], e[at]])
                         & (now[:, 1] == held.mtime_ns[name][d[at], e[at]]))
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
        seen[name] = cells
    kept = table.take(read)
    kept = dataclasses.replace(kept, problems=table.problems, n_listed=table.n_listed, seen=table.seen)
    return kept, PartReport(len(table), added, reread, replaced, seen, tuple(examples[:3]))


def vanished_files(held: HeldFiles, reports: Sequence[PartReport]) -> tuple[int, list[dict[str, Any]], int]:
    """How many held files no partition listed (the partitions' ``reports``), the first
    :data:`NAMED_VANISHED` of them as ``{"file", "physical_filter", "detector", "exposure"}`` records, and how
    many files the store holds -- a task (the paths stay on the worker but those)."""
    count, named, n_held = 0, [], 0
    for name, paths in held.path.items():
        n_held += int((paths != "").sum())
        listed = np.zeros(paths.size, dtype=bool)
        for report in reports:
            listed[report.seen.get(name, np.empty(0, np.int64))] = True
        gone = np.flatnonzero((paths.reshape(-1) != "") & ~listed)
        count += len(gone)
        for flat in gone[:max(0, NAMED_VANISHED - len(named))]:
            d, e = divmod(int(flat), len(held.exposures[name]))
            named.append({"file": str(paths[d, e]), "physical_filter": name, "detector": int(held.detectors[name][d]),
                          "exposure": int(held.exposures[name][e])})
    return count, named, n_held


# ----------------------------------------------------------------------------------------------- merging

#: What a cell holds where neither the store nor the new reading has a file (as a reading task fills an absent
#: cell).
ABSENT_FILL = {"background": np.nan, "weight": 0.0, "status": ABSENT, "reason": "",
               **dict(zip(FILE_RECORD, ("", -1, -1)))}


@dataclass(frozen=True)
class StoredGroup:
    """A filter's group of the store version appended to, as a merging task reads it: the version's Zarr store
    (:func:`flatnorm_dask.store.committed_store`, picklable) and the group's grid."""

    store: Any
    name: str
    detectors: np.ndarray
    exposures: np.ndarray


@dataclass(frozen=True)
class MergePlan:
    """How an append writes one filter's merged grid: its ids, its chunk sizes, the chunks it takes unchanged from
    the store (``linked``: (detector chunk, exposure chunk) indices, for
    :func:`flatnorm_dask.store.link_chunks`) and the blocks its merging tasks write (``blocks``: (detector,
    exposure) index ranges of the grid, each a run of whole chunks)."""

    detectors: np.ndarray
    exposures: np.ndarray
    det_chunk: int
    exp_chunk: int
    linked: tuple[tuple[int, int], ...]
    blocks: tuple[tuple[slice, slice], ...]

    @property
    def chunks(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The chunk sizes along detector and along exposure."""
        return grid_chunks(len(self.detectors), len(self.exposures), self.det_chunk, self.exp_chunk)

    def without_links(self, block_cells: int) -> MergePlan:
        """The same grid with every chunk merged (when the store's chunks cannot be taken as they are)."""
        return plan_merge(self.detectors, self.exposures, self.det_chunk, self.exp_chunk, block_cells=block_cells)


def _same_ids(merged: np.ndarray, stored: np.ndarray, size: int) -> np.ndarray:
    """Per chunk of ``size`` ids of the merged grid: whether the store's grid has the same ids at that chunk."""
    n = -(-len(merged) // size)
    return np.array([np.array_equal(merged[k * size:(k + 1) * size], stored[k * size:(k + 1) * size])
                     for k in range(n)], dtype=bool)


def _touched(merged: np.ndarray, read: np.ndarray, size: int) -> np.ndarray:
    """Per chunk of ``size`` ids of the merged grid: whether it holds any id of the new reading's grid."""
    hit = np.isin(merged, read)
    return np.array([hit[k * size:(k + 1) * size].any() for k in range(-(-len(merged) // size))], dtype=bool)


def plan_merge(detectors: np.ndarray, exposures: np.ndarray, det_chunk: int, exp_chunk: int, *,
               stored: tuple[np.ndarray, np.ndarray] | None = None, read: tuple[np.ndarray, np.ndarray] | None = None,
               block_cells: int) -> MergePlan:
    """Plan the writing of a filter's merged grid (sorted ``detectors`` x ``exposures``) in chunks of ``det_chunk``
    x ``exp_chunk`` cells.

    With ``stored`` (the store's grid, chunked the same way) and ``read`` (the new reading's grid), a chunk is
    linked from the store when it holds the same ids there and no cell of the new reading: its stored bytes are
    then the merged chunk's.  That is every chunk but the last of each row when new exposures sort after the
    store's (the usual append); an exposure that sorts among the stored ones shifts the chunks after it, which
    are merged.  The other chunks are merged in blocks of about ``block_cells`` cells: runs of neighbouring
    chunks along exposure.
    """
    n_rows, n_cols = -(-len(detectors) // det_chunk), -(-len(exposures) // exp_chunk)
    linked = np.zeros((n_rows, n_cols), dtype=bool)
    if stored is not None and read is not None:
        same = np.outer(_same_ids(detectors, stored[0], det_chunk), _same_ids(exposures, stored[1], exp_chunk))
        new = np.outer(_touched(detectors, read[0], det_chunk), _touched(exposures, read[1], exp_chunk))
        linked = same & ~new
    per_block = max(1, block_cells // (det_chunk * exp_chunk))
    blocks = []
    for i in range(n_rows):
        rows = slice(i * det_chunk, min((i + 1) * det_chunk, len(detectors)))
        todo = np.flatnonzero(~linked[i])
        # Runs of neighbouring chunks, each cut into blocks of at most per_block chunks.
        for run in np.split(todo, np.flatnonzero(np.diff(todo) > 1) + 1) if todo.size else ():
            for start in range(0, len(run), per_block):
                first, last = run[start], run[min(start + per_block, len(run)) - 1]
                blocks.append((rows, slice(first * exp_chunk, min((last + 1) * exp_chunk, len(exposures)))))
    return MergePlan(detectors, exposures, det_chunk, exp_chunk,
                     tuple((int(i), int(j)) for i, j in zip(*np.nonzero(linked))), tuple(blocks))


@dataclass(frozen=True)
class MergeSpec:
    """One block of a filter's merged grid: its detectors and exposures, its region of the grid, and the layout
    of its variables (name -> (dims, dtype), as the reading's)."""

    name: str
    detectors: np.ndarray
    exposures: np.ndarray
    amps: tuple[str, ...]
    region: dict[str, slice]
    variables: dict[str, tuple[tuple[str, ...], Any]]


def _empty_block(spec: MergeSpec) -> dict[str, np.ndarray]:
    sizes = {"detector": len(spec.detectors), "amp": len(spec.amps), "exposure": len(spec.exposures)}
    return {name: np.full(tuple(sizes[d] for d in dims), ABSENT_FILL[name], dtype=dtype)
            for name, (dims, dtype) in spec.variables.items()}


def _ix(array: np.ndarray, dims: tuple[str, ...], detectors: np.ndarray, exposures: np.ndarray) -> tuple:
    """The open mesh selecting some detectors and exposures (and every amplifier) of a variable."""
    return np.ix_(*[detectors if dim == "detector" else exposures if dim == "exposure" else np.arange(n)
                    for dim, n in zip(dims, array.shape)])


def _place(block: dict[str, np.ndarray], spec: MergeSpec, source: dict[str, np.ndarray], detectors: np.ndarray,
           exposures: np.ndarray, only: np.ndarray | None = None) -> None:
    """Put ``source``'s cells (over ``detectors`` x ``exposures``) where they fall in the block; with ``only``
    (a (detector, exposure) mask of the source), only those cells."""
    d_src, d_in = _positions(spec.detectors, detectors)  # each block detector's index in the source
    e_src, e_in = _positions(spec.exposures, exposures)
    d_dst, e_dst = np.flatnonzero(d_in), np.flatnonzero(e_in)
    if not d_dst.size or not e_dst.size:
        return
    d_src, e_src = d_src[d_dst], e_src[e_dst]
    for name, (dims, _) in spec.variables.items():
        values, target = source[name][_ix(source[name], dims, d_src, e_src)], block[name]
        where = _ix(target, dims, d_dst, e_dst)
        if only is not None:
            keep = only[np.ix_(d_src, e_src)]
            if "amp" in dims:
                keep = np.expand_dims(keep, dims.index("amp"))
            values = np.where(keep, values, target[where])
        target[where] = values


def _stored_block(old: StoredGroup, spec: MergeSpec) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray] | None:
    """The store's cells of the block's detectors and exposures (read with orthogonal selections), or None."""
    import zarr

    d_at, d_in = _positions(spec.detectors, old.detectors)
    e_at, e_in = _positions(spec.exposures, old.exposures)
    if not d_in.any() or not e_in.any():
        return None
    # The store's indices of the block's detectors and exposures that it holds.
    d_old = np.searchsorted(old.detectors, spec.detectors[d_in])
    e_old = np.searchsorted(old.exposures, spec.exposures[e_in])
    group = zarr.open_group(old.store, path=old.name, mode="r")
    out = {}
    for name, (dims, _) in spec.variables.items():
        selection = tuple(d_old if d == "detector" else e_old if d == "exposure" else slice(None) for d in dims)
        out[name] = np.asarray(group[name].get_orthogonal_selection(selection))
    return out, spec.detectors[d_in], spec.exposures[e_in]


def merge_block(spec: MergeSpec, old: StoredGroup | None, *new: Any) -> Any:
    """One block of a filter's merged grid -- a task: the store's cells, then over them the cells the new
    reading read (``new``: the reading's blocks that overlap this one, as :func:`flatnorm_dask.workflow.
    level_inputs` Datasets).  Returns the block as a numpy-backed Dataset."""
    import xarray as xr

    block = _empty_block(spec)
    stored = _stored_block(old, spec) if old is not None else None
    if stored is not None:
        _place(block, spec, *stored)
    for ds in new:
        values = {name: np.asarray(ds[name].transpose(*dims).values) for name, (dims, _) in spec.variables.items()}
        read = np.asarray(ds["status"].transpose("detector", "exposure").values) != ABSENT
        _place(block, spec, values, ds["detector"].values, ds["exposure"].values, only=read)
    return xr.Dataset({name: (dims, block[name]) for name, (dims, _) in spec.variables.items()},
                      coords={"detector": spec.detectors, "amp": list(spec.amps), "exposure": spec.exposures})
