"""Read flat-statistics files in parallel into a chunked ``xarray.DataTree``.

Listing and reading are both Dask tasks, so that the client never holds the list of files (a few hundred bytes
a file) and its memory stays flat however large the campaign:

1. **Listing** (:mod:`flatnorm_dask.listing`): tasks list the inputs in partitions that stay on the workers;
   the client receives a summary of each.
2. **Layout** (:func:`list_campaign`): from the summaries the client lays out each filter's (detector,
   exposure) grid in blocks of about ``batch_size`` cells, and chooses the expected amplifier names: the
   camera's when one is given and it has as many amplifiers as the files, else those of most files.
3. **Reading** (:class:`Campaign`): one task per partition routes its rows to the blocks they fall in; one
   task per block reads its files with its own :class:`~flatnorm_dask.formats.StatsReader` into packed numpy
   arrays (channels: :class:`~flatnorm_dask.schema.PackedChannels`).  :meth:`Campaign.tree` makes them the
   lazy variables of a DataTree (:func:`read_campaign`); :meth:`Campaign.blocks` hands each block, in the
   task that read it, to a function -- a run writes it into its store there.

A cell's ``status`` says what happened to it (see :data:`STATUS`).  With ``on_error="mask"`` a bad file masks
its cell, and its ``reason`` says why; :func:`problems` lists them.  Each cell also records the file read
(``file``) and its identity when read (``file_size``, ``file_mtime_ns``).

Only numpy, the standard library, the statistics reader and the config schema (for its defaults) are imported
at load time: the tasks run this module's functions on the workers.
"""

from __future__ import annotations

import functools
import itertools
import logging
import operator
import os
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .bounded import MAX_FILE_BYTES
from .config import InputConfig
from .formats import StatsReader
from .listing import (
    AMP_SAMPLE,
    FileTable,
    IngestError,
    PartSummary,
    compile_pattern,
    file_identities,
    input_source,
    object_array,
    summarise,
)
from .schema import (
    AMP_VARIABLES,
    COUNT_STAT,
    DET_VARIABLES,
    ON_ERROR,
    PackedChannels,
    VALUE_STAT,
    StatsFormatError,
    amp_name_key,
    check_level,
)

log = logging.getLogger(__name__)

__all__ = [
    "STATUS",
    "Campaign",
    "FILE_RECORD",
    "Grid",
    "IngestError",
    "compile_pattern",
    "discover",
    "file_identities",
    "list_campaign",
    "problems",
    "read_campaign",
    "solver_inputs",
    "status_counts",
    "verify_amp_names",
]

#: Cell status codes stored in the ``status`` variable.
STATUS = {0: "ok", 1: "absent", 2: "unreadable", 3: "amplifier names differ", 4: "duplicate"}
OK, ABSENT, BAD_FILE, AMP_MISMATCH, DUPLICATE = range(5)

DUPLICATE_SEPARATOR = " | "  # joins the paths of duplicate files in a cell's ``file`` entry
#: The variables that record, per cell, the file read and its identity when it was read (path, size in bytes,
#: mtime_ns; "" and -1 where none): what a later run compares to tell new or changed files.
FILE_RECORD = ("file", "file_size", "file_mtime_ns")
_STRINGS = np.dtypes.StringDType()


# ------------------------------------------------------------------------------------------------ layout

@dataclass(frozen=True)
class Grid:
    """One filter's (detector, exposure) grid, cut into blocks of about ``batch_size`` cells (one read task
    each): all the detectors of a block for a run of exposures, unless there are more detectors than that."""

    name: str
    detectors: np.ndarray
    exposures: np.ndarray
    n_files: int
    batch_size: int

    @property
    def det_chunk(self) -> int:
        return min(len(self.detectors), self.batch_size)

    @property
    def exp_chunk(self) -> int:
        return max(1, self.batch_size // self.det_chunk)

    @property
    def chunks(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return grid_chunks(len(self.detectors), len(self.exposures), self.det_chunk, self.exp_chunk)

    def blocks_of(self, detectors: np.ndarray, exposures: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Block rows and columns holding some (detector, exposure) ids."""
        return (np.searchsorted(self.detectors, detectors) // self.det_chunk,
                np.searchsorted(self.exposures, exposures) // self.exp_chunk)


def grid_chunks(n_detectors: int, n_exposures: int, det_chunk: int, exp_chunk: int
                ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The chunk sizes along detector and along exposure of a grid cut into ``det_chunk`` x ``exp_chunk``
    blocks (the last ones smaller), as dask and zarr give them."""
    def sizes(n: int, size: int) -> tuple[int, ...]:
        return tuple(min(size, n - start) for start in range(0, n, size))

    return sizes(n_detectors, det_chunk), sizes(n_exposures, exp_chunk)


def _grids(summaries: Sequence[PartSummary], batch_size: int) -> list[Grid]:
    names = sorted({name for s in summaries for name in s.n_files})
    return [Grid(name,
                  np.unique(np.concatenate([s.detectors[name] for s in summaries if name in s.detectors])),
                  np.unique(np.concatenate([s.exposures[name] for s in summaries if name in s.exposures])),
                  sum(s.n_files.get(name, 0) for s in summaries), batch_size)
            for name in names]


def _expected_amp_names(summaries: Sequence[PartSummary], camera: Any) -> tuple[tuple[str, ...], str]:
    """The amplifier names every file should list, and where they come from (for messages).

    The camera's, when one is given and has as many amplifiers as most files; otherwise those of most files
    (of the samples the partitions read, each weighted by the files it stands for).  A single odd file --
    the first in sort order, say -- never decides.
    """
    tally: Counter = Counter()
    for s in summaries:
        tally.update(s.amp_names)
    if not tally:
        if camera is not None:
            return tuple(camera.amp_names), f"those of camera {camera.name}"
        unread = next((s.unread[0] for s in summaries if s.unread), "")
        raise IngestError(f"none of the files sampled for their amplifier names could be read, e.g. {unread}")
    majority = max(tally, key=lambda names: (tally[names], names))
    if camera is not None and len(camera.amp_names) == len(majority):
        return tuple(camera.amp_names), f"those of camera {camera.name}"
    n = sum(min(AMP_SAMPLE, sum(s.n_files.values())) for s in summaries)
    return majority, f"those of most of the {n} files sampled"


# ----------------------------------------------------------------------------------------------- the tasks

def _route(table: FileTable, grids: dict[str, Grid]) -> dict[tuple[str, int, int], tuple[np.ndarray, ...]]:
    """A partition's rows by the block they fall in: (filter, block row, block column) -> (detector index and
    exposure index within the block, path) -- a task."""
    out = {}
    for name, grid in grids.items():
        rows = np.flatnonzero(table.physical_filter == name)
        det = np.searchsorted(grid.detectors, table.detector[rows])
        exp = np.searchsorted(grid.exposures, table.exposure[rows])
        bi, bj = det // grid.det_chunk, exp // grid.exp_chunk
        order = np.lexsort((bj, bi))
        bi, bj = bi[order], bj[order]
        starts = np.flatnonzero(np.r_[True, (bi[1:] != bi[:-1]) | (bj[1:] != bj[:-1])]) if len(rows) else []
        for start, end in zip(starts, [*starts[1:], len(rows)]):
            i, j, sel = int(bi[start]), int(bj[start]), order[start:end]
            out[(name, i, j)] = (det[sel] - i * grid.det_chunk, exp[sel] - j * grid.exp_chunk,
                                 table.path[rows[sel]])
    return out


def _piece(routed: dict, key: tuple[str, int, int]) -> tuple[np.ndarray, ...]:
    return routed.get(key) or (np.empty(0, np.int64), np.empty(0, np.int64), object_array([]))


@dataclass(frozen=True)
class _BlockSpec:
    """What a reading task needs besides its files: where its block is, the expected amplifier names."""

    name: str
    detectors: np.ndarray
    exposures: np.ndarray
    region: dict[str, slice]
    amp_names: tuple[str, ...]
    amp_source: str
    on_error: str
    max_file_bytes: int


def _reason(err: StatsFormatError) -> str:
    return err.reason if err.key is None else f"key {err.key}: {err.reason}"


def _read_block(spec: _BlockSpec, *pieces: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    """Read one block's files -- a task.

    Returns the packed statistics (detector, channel, exposure), the files' identity (2, detector, exposure:
    size and mtime_ns, -1 where none), and per cell the file read and, for a masked cell, why.
    """
    n_det, n_exp = len(spec.detectors), len(spec.exposures)
    channels = PackedChannels(len(spec.amp_names))
    packed = np.full((n_det, channels.size, n_exp), np.nan)
    packed[:, channels.status, :] = ABSENT
    packed[:, channels.det_channel(COUNT_STAT), :] = 0.0  # an absent cell has no pixels
    packed[:, channels.amp_channels(COUNT_STAT), :] = 0.0
    identity = np.full((2, n_det, n_exp), -1, dtype=np.int64)
    files = np.full((n_det, n_exp), "", dtype=_STRINGS)
    reasons = np.full((n_det, n_exp), "", dtype=_STRINGS)

    cells = np.concatenate([p[0] * n_exp + p[1] for p in pieces]) if pieces else np.empty(0, np.int64)
    paths = np.concatenate([p[2] for p in pieces]) if pieces else object_array([])
    order = np.argsort(cells, kind="stable")
    cells, paths = cells[order], paths[order]
    unique, first, count = np.unique(cells, return_index=True, return_counts=True)
    single = count == 1
    for cell, at, n in zip(unique[~single], first[~single], count[~single]):  # rare: a cell listed twice
        d, e = divmod(int(cell), n_exp)
        same = sorted(map(str, paths[at:at + n]))
        if spec.on_error == "raise":
            raise IngestError(f"{same[1]}: duplicate of {same[0]} (exposure {spec.exposures[e]}, "
                              f"detector {spec.detectors[d]})")
        packed[d, channels.status, e] = DUPLICATE
        files[d, e] = DUPLICATE_SEPARATOR.join(same)
        reasons[d, e] = f"duplicate (detector, exposure): {files[d, e]}"
    d_all, e_all = np.divmod(unique[single], n_exp)
    to_read = [str(p) for p in paths[first[single]]]
    files[d_all, e_all] = to_read
    identity[:, d_all, e_all] = file_identities(to_read).T  # before each file is read

    # Each file's numbers are collected, then put in place at once (one fancy assignment, not three a file).
    ok, dets, amps = [], [], []
    # One reader for the block: the files after the first read through the layout it learns from them.
    reader = StatsReader(max_bytes=spec.max_file_bytes)
    for k, row in enumerate(reader.read_many(to_read)):
        code = BAD_FILE
        if not isinstance(row, StatsFormatError) and row.amp_names != spec.amp_names:
            row = StatsFormatError(to_read[k], f"amplifier names {list(row.amp_names)} differ from the expected "
                                   f"{list(spec.amp_names)} ({spec.amp_source})", key=amp_name_key("i"))
            code = AMP_MISMATCH
        if isinstance(row, StatsFormatError):
            if spec.on_error == "raise":
                raise row
            packed[d_all[k], channels.status, e_all[k]] = code
            reasons[d_all[k], e_all[k]] = _reason(row)
            continue
        ok.append(k)
        dets.append(row.det)
        amps.append(row.amp.reshape(-1))
    if ok:
        d_ok, e_ok = d_all[ok], e_all[ok]
        packed[d_ok, channels.status, e_ok] = OK
        packed[d_ok, channels.det, e_ok] = np.array(dets)
        packed[d_ok, channels.amp, e_ok] = np.array(amps)
    return packed, identity, files, reasons


def _dataset(outputs: Sequence[Any], detectors: np.ndarray, exposures: np.ndarray, amp_names: Sequence[str],
             attrs: Mapping[str, Any]):
    """The Dataset of reading tasks' outputs (one block's numpy arrays, or a filter's dask arrays alike)."""
    import xarray as xr

    packed, identity, files, reasons = outputs
    channels = PackedChannels(len(amp_names))
    cell = ("detector", "exposure")
    amp_cell = ("detector", "amp", "exposure")
    path_var, size_var, mtime_var = FILE_RECORD
    ds = xr.Dataset(
        {
            "status": (cell, packed[:, channels.status, :].astype(np.uint8)),
            **{name: (amp_cell if per_amp else cell, packed[:, index, :])
               for name, per_amp, index in channels.variables()},
            path_var: (cell, files, {"long_name": "file read for the cell ('' if none; duplicates joined by "
                                                  f"{DUPLICATE_SEPARATOR!r})"}),
            size_var: (cell, identity[0], {"long_name": "size in bytes of the file when it was read (-1 if unknown)"}),
            mtime_var: (cell, identity[1], {"long_name": "modification time (ns since the epoch) of the file when "
                                                         "it was read (-1 if unknown)"}),
            "reason": (cell, reasons, {"long_name": "why the cell was masked ('' if it was not)"}),
        },
        coords={"detector": detectors, "amp": list(amp_names), "exposure": exposures},
        attrs=dict(attrs),
    )
    ds["status"].attrs.update(flag_meanings=" ".join(v.replace(" ", "_") for v in STATUS.values()),
                              flag_values=list(STATUS))
    return ds


def _read_block_then(spec: _BlockSpec, then: Callable, *pieces: tuple[np.ndarray, ...]) -> Any:
    """Read one block's files and hand their Dataset to ``then`` (with the filter's name and the block's
    region of the filter's grid) -- a task; returns what ``then`` returns."""
    block = _dataset(_read_block(spec, *pieces), spec.detectors, spec.exposures, spec.amp_names, {})
    return then(spec.name, block, spec.region)


# --------------------------------------------------------------------------------------------- the plan

@dataclass
class Campaign:
    """A listed campaign: its filters' grids and the reading tasks that fill them, not yet run.

    Made by :func:`list_campaign`; :meth:`tree` gives its lazy DataTree, :meth:`blocks` one task per block.
    The listing tasks' tables stay on the workers for as long as the Campaign (or a graph made of it) lives.
    """

    grids: list[Grid]
    amp_names: tuple[str, ...]
    amp_source: str
    on_error: str
    max_file_bytes: int
    problems: list[dict[str, str]]
    camera: Any
    n_listed: int
    _parts: list[Any]
    _summaries: list[PartSummary]

    @property
    def filters(self) -> list[str]:
        return [grid.name for grid in self.grids]

    @property
    def n_files(self) -> dict[str, int]:
        return {grid.name: grid.n_files for grid in self.grids}

    def _graph(self, then: Callable | None):
        """One graph layer for the whole campaign: a routing task per partition, a piece per (partition, block)
        it feeds, a reading task per block.  Returns the graph, its layer name and each filter's grid of
        block keys.

        One layer of tasks rather than a delayed call per block: the client's cost stays a few microseconds a
        block, and no file list enters the graph.
        """
        from dask._task_spec import Task, TaskRef
        from dask.highlevelgraph import HighLevelGraph

        token = uuid.uuid4().hex[:16]  # reading files is not pure: every graph gets its own keys
        layer: dict[Any, Any] = {}
        pieces: dict[tuple[int, int, int], list[Any]] = {}
        index = {grid.name: g for g, grid in enumerate(self.grids)}
        for p, (part, summary) in enumerate(zip(self._parts, self._summaries)):
            present = {name: self.grids[index[name]] for name in summary.n_files}
            if not present:
                continue
            route = (f"route-files-{token}", p)
            layer[route] = Task(route, _route, TaskRef(part.key), present)
            for name, grid in present.items():
                rows, cols = grid.blocks_of(summary.detectors[name], summary.exposures[name])
                for i, j in itertools.product(np.unique(rows).tolist(), np.unique(cols).tolist()):
                    key = (f"route-piece-{token}", p, index[name], i, j)
                    layer[key] = Task(key, _piece, TaskRef(route), (name, i, j))
                    pieces.setdefault((index[name], i, j), []).append(key)
        blocks = []
        for g, grid in enumerate(self.grids):
            det_chunks, exp_chunks = grid.chunks
            keys = []
            for i, j in itertools.product(range(len(det_chunks)), range(len(exp_chunks))):
                key = (f"read-block-{token}", g, i, j)
                d0, e0 = i * grid.det_chunk, j * grid.exp_chunk
                d1, e1 = d0 + det_chunks[i], e0 + exp_chunks[j]
                spec = _BlockSpec(grid.name, grid.detectors[d0:d1], grid.exposures[e0:e1],
                                  {"detector": slice(d0, d1), "exposure": slice(e0, e1)}, self.amp_names,
                                  self.amp_source, self.on_error, self.max_file_bytes)
                refs = [TaskRef(k) for k in pieces.get((g, i, j), [])]
                layer[key] = (Task(key, _read_block, spec, *refs) if then is None else
                              Task(key, _read_block_then, spec, then, *refs))
                keys.append(key)
            blocks.append(object_array(keys).reshape(len(det_chunks), len(exp_chunks)))
        name = f"read-campaign-{token}"
        return HighLevelGraph.from_collections(name, layer, dependencies=list(self._parts)), name, blocks

    def tree(self):
        """The campaign as a DataTree of lazy variables (see :func:`read_campaign`)."""
        import xarray as xr

        graph, layer, keys = self._graph(None)
        children = {}
        for g, (grid, k) in enumerate(zip(self.grids, keys)):
            det_chunks, exp_chunks = grid.chunks
            n_channels = PackedChannels(len(self.amp_names)).size
            outputs = [_block_array(graph, layer, k, g, 0, (det_chunks, (n_channels,), exp_chunks),
                                    lambda i, j: (i, 0, j), np.float64),
                       _block_array(graph, layer, k, g, 1, ((2,), det_chunks, exp_chunks), lambda i, j: (0, i, j),
                                    np.int64),
                       *(_block_array(graph, layer, k, g, output, (det_chunks, exp_chunks), lambda i, j: (i, j),
                                      _STRINGS) for output in (2, 3))]
            ds = _dataset(outputs, grid.detectors, grid.exposures, self.amp_names,
                          {"n_files": grid.n_files, "on_error": self.on_error, "amp_names_from": self.amp_source})
            if self.camera is not None:
                _name_detectors(ds, self.camera)
            children[grid.name] = ds
        return xr.DataTree.from_dict({"/": xr.Dataset(attrs={"problems": self.problems}), **children})

    def release(self) -> None:
        """Let go of the listing tasks' tables (on the workers); the Campaign makes no graph after this."""
        self._parts, self._summaries = [], []

    def blocks(self, then: Callable[[str, Any, dict[str, slice]], Any]) -> list[Any]:
        """One Delayed per block of every filter: the task that reads the block's files, then returns
        ``then(filter, block, region)``, where ``block`` is the block's Dataset (numpy-backed, laid out as a
        node of :meth:`tree`) and ``region`` its ``{"detector": slice, "exposure": slice}`` in the filter's grid.

        ``then`` runs on the worker that read the block (e.g. to write it into a store); it must be picklable.
        """
        from dask.delayed import Delayed

        graph, layer, keys = self._graph(then)
        return [Delayed(key, graph, layer=layer) for k in keys for key in k.flat]


def _block_array(graph, layer: str, keys: np.ndarray, g: int, output: int, chunks: tuple, where: Callable, dtype):
    """A dask array of one output of filter ``g``'s reading tasks: chunk ``where(i, j)`` is output ``output``
    of block (i, j)."""
    import dask.array as da
    from dask._task_spec import Task, TaskRef
    from dask.highlevelgraph import HighLevelGraph

    name = f"{layer}-{g}-{output}"
    tasks = {}
    for (i, j), key in np.ndenumerate(keys):
        chunk = (name, *where(i, j))
        tasks[chunk] = Task(chunk, operator.getitem, TaskRef(key), output)
    graph = HighLevelGraph({**graph.layers, name: tasks}, {**graph.dependencies, name: {layer}})
    return da.Array(graph, name, chunks, dtype=dtype)


def _name_detectors(ds, camera: Any) -> None:
    """Add the camera's detector names as a ``detector_name`` coordinate (ids it does not know get "")."""
    names = dict(zip(camera.detector.tolist(), camera.detector_name.tolist()))
    ds.coords["detector_name"] = ("detector", np.array([names.get(int(d), "") for d in ds["detector"].values],
                                                        dtype=object))


def list_campaign(
    root: str | os.PathLike | None = None,
    pattern: str | None = None,
    manifest: str | os.PathLike | None = None,
    on_error: str = "raise",
    *,
    camera: Any = None,
    batch_size: int = InputConfig.batch_size,
    files: Any = None,
    files_from: str = "file table",
    select: tuple[str, str] | None = None,
    max_file_bytes: int = MAX_FILE_BYTES,
    restrict: Callable[[list[Any], Callable[[Any], PartSummary]], tuple[list[Any], list[PartSummary], int]]
    | None = None,
    identity: bool = False,
) -> Campaign:
    """List a campaign's files (by Dask tasks, on the active scheduler) and lay out their reading.

    The arguments are :func:`read_campaign`'s; nothing is read yet but a sample of files for their amplifier
    names.  ``files_from`` names a file table in messages (a butler repository, say).  ``restrict`` keeps
    only some of the files listed: given the listing's partitions (Delayed :class:`FileTable` s, on the
    workers) and the function that summarises a partition (:func:`flatnorm_dask.listing.summarise`, for its
    tasks), it returns the partitions to read, their summaries and how many files were listed (summarised in
    the same computation as its own work: one wait for the workers); when it keeps none of them, the Campaign is
    empty (no filter) rather than an error (an append with nothing new to read).  ``identity``: a pattern
    scan's tasks stat the files they find, in the same pass (:class:`flatnorm_dask.listing.FileTable`'s
    ``identity``), for ``restrict`` to compare with what it holds.
    """
    import dask

    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size!r}")
    source = input_source(root, pattern, manifest, camera, files, files_from=files_from, select=select)
    parts = source.partitions(on_error, identity)
    parts = list(dask.persist(*parts)) if parts else []
    summarise_part = functools.partial(summarise, max_file_bytes=max_file_bytes)
    if restrict is None:
        n_found = None
        summaries = list(dask.compute(*[dask.delayed(summarise_part, pure=False)(p) for p in parts]))
    else:
        parts, summaries, n_found = restrict(parts, summarise_part)
    log.debug("listed %d files in %d partitions", sum(n for s in summaries for n in s.n_files.values()), len(parts))
    listing = [p for s in summaries for p in s.problems]
    grids = _grids(summaries, batch_size)
    n_listed = sum(s.n_listed for s in summaries)
    if not grids and n_found:
        return Campaign([], (), "", on_error, max_file_bytes, listing, camera, n_listed, parts, summaries)
    if not grids and select and n_listed:
        seen = sorted({v for s in summaries for v in s.seen})
        shown = ", ".join(repr(v) for v in seen[:10]) + (f" and {len(seen) - 10} more" if len(seen) > 10 else "")
        raise IngestError(f"{source.name}: no input exposure has {select[0]} = {select[1]!r} (compared "
                          f"case-insensitively); {'the values there: ' + shown if seen else 'none has a value'}")
    if not grids:
        raise IngestError(source.nothing_found() + (f" ({listing[0]['file']}: {listing[0]['reason']})"
                                                    if listing else ""))
    amp_names, amp_source = _expected_amp_names(summaries, camera)
    return Campaign(grids, amp_names, amp_source, on_error, max_file_bytes, listing, camera, n_listed, parts, summaries)


def read_campaign(
    root: str | os.PathLike | None = None,
    pattern: str | None = None,
    manifest: str | os.PathLike | None = None,
    on_error: str = "raise",
    *,
    camera: Any = None,
    batch_size: int = InputConfig.batch_size,
    files: Any = None,
    select: tuple[str, str] | None = None,
    max_file_bytes: int = MAX_FILE_BYTES,
):
    """Read flat statistics files into a DataTree, one child node per physical_filter.

    The files are listed now (by Dask tasks, on the active scheduler) and read lazily.

    Parameters
    ----------
    root, pattern, manifest
        Where the files are: see :func:`discover`.
    files : pandas.DataFrame, optional
        Instead of the above, a file table such as :func:`discover` returns.
    on_error : {"raise", "mask"}
        On an unreadable or malformed file, a duplicate (detector, exposure), amplifier names that differ
        from the expected ones, or a directory that cannot be listed: raise an error naming the file (and the
        key), or mask the cell and record why.
    camera : Camera, optional
        Maps a pattern's ``{detector_name}`` to ids, names the detectors, and gives the expected amplifier
        names when it has as many as the files (otherwise most files' names are expected).
    batch_size : int
        Files per reading task (and so per chunk).
    select : (field, value), optional
        A down-selection (:func:`flatnorm_dask.schema.parse_selection`): only the files whose manifest or
        table column ``field`` equals ``value``, ignoring case (:func:`flatnorm_dask.listing.selected`).
    max_file_bytes : int
        Largest file read; a larger one is a bad file (see :class:`~flatnorm_dask.formats.StatsReader`).

    Returns
    -------
    xarray.DataTree
        Child nodes named after the filters (``all`` when the inputs carry none).  Each Dataset has
        ``amp_value``, ``amp_count``, ``amp_sigma`` (detector, amp, exposure), ``det_value``, ``det_count``,
        ``det_sigma``, ``status``, ``file``, ``file_size``, ``file_mtime_ns`` and ``reason`` (detector,
        exposure) as lazy dask arrays chunked along exposure (and detector).  A detector or exposure with no
        file is absent: NaN with count 0.  The root's ``problems`` attribute lists directories that could not
        be listed (with ``mask``).
    """
    return list_campaign(root, pattern, manifest, on_error, camera=camera, batch_size=batch_size, files=files,
                         select=select, max_file_bytes=max_file_bytes).tree()


def discover(
    root: str | os.PathLike | None = None,
    pattern: str | None = None,
    manifest: str | os.PathLike | None = None,
    camera: Any = None,
):
    """List the input files with their data ids, as one table (on the client: for a look, or small campaigns).

    Parameters
    ----------
    root : path
        Directory searched with ``pattern``; also the base of relative manifest paths (default: the
        manifest's own directory).
    pattern : str
        Path below ``root`` with named fields, e.g. ``{physical_filter}/{exposure}/flatStats_{detector}.yaml``.
        Integer fields ``exposure`` and ``detector``; or ``obs_id`` (or ``day_obs`` and ``seq_num``) and
        ``detector_name`` (mapped to ids through ``camera``); optional ``physical_filter``; other fields
        match anything.
    manifest : path
        CSV or Parquet file with columns ``path, exposure, detector[, physical_filter]``.  An empty required
        cell or an id that is not an int64 integer is an error naming the manifest, the row (a CSV's line
        number) and the column.
    camera : Camera, optional
        Needed for ``{detector_name}`` fields.

    Returns
    -------
    pandas.DataFrame
        Columns ``path`` (absolute), ``exposure``, ``detector``, ``physical_filter``, sorted.
    """
    import dask

    source = input_source(root, pattern, manifest, camera, None)
    table = FileTable.concat(list(dask.compute(*source.partitions("raise"))))
    if not len(table):
        raise IngestError(source.nothing_found())
    return table.to_frame().sort_values(["physical_filter", "exposure", "detector", "path"], kind="stable",
                                        ignore_index=True)


# ----------------------------------------------------------------------------------------------- checks

def problems(ds) -> list[dict[str, Any]]:
    """The masked cells of a :func:`read_campaign` node (or of a block, or of a store's group), as ``{"file",
    "status", "reason", "detector", "exposure"}`` records; a duplicate's ``file`` is the first of its paths."""
    import dask

    # One compute for the three (each would otherwise read a lazy node's files again).
    status, files, reasons = dask.compute(*(ds[name].data for name in ("status", "file", "reason")))
    detectors, exposures = ds["detector"].values, ds["exposure"].values
    return [{"file": str(files[d, e]).split(DUPLICATE_SEPARATOR)[0], "status": STATUS[int(status[d, e])],
             "reason": str(reasons[d, e]), "detector": int(detectors[d]), "exposure": int(exposures[e])}
            for d, e in zip(*np.nonzero((status != OK) & (status != ABSENT)))]


def status_counts(ds) -> np.ndarray:
    """Cells of each status code (indexed by code) of a node, a block or a store's group."""
    return np.bincount(np.asarray(ds["status"].values).ravel(), minlength=len(STATUS))[:len(STATUS)]


def verify_amp_names(amp_names: Sequence[str], amp_source: str, counts: np.ndarray) -> None:
    """Refuse a campaign in which more files list other amplifier names than list the expected ones.

    ``counts`` are the campaign's :func:`status_counts`.  With ``mask``, such files are masked one by one;
    when they are most of the campaign, the expected names were the wrong ones (a camera whose amplifiers are
    listed in another order, say), and masking would hide it.
    """
    if counts[AMP_MISMATCH] > counts[OK]:
        raise IngestError(f"{int(counts[AMP_MISMATCH])} of {int(counts[AMP_MISMATCH] + counts[OK])} readable files "
                          f"list other amplifier names than the expected {list(map(str, amp_names))} "
                          f"({amp_source}); check input.camera, whose amplifier names are expected when it has as "
                          "many as the files")


def solver_inputs(ds, level: str) -> tuple[Any, Any]:
    """The statistic and weight arrays the solver takes, for a scaling level."""
    variables = AMP_VARIABLES if check_level(level) == "AMP" else DET_VARIABLES
    return ds[variables[VALUE_STAT]], ds[variables[COUNT_STAT]]
