"""Zarr encoding: how a run's Datasets are written into a store's groups, one group per physical_filter.

:func:`write_groups` writes every group's metadata (and its in-memory arrays) into a staging directory of
:mod:`flatnorm_dask.store.transaction` and returns the Dask tasks that write the chunked arrays, for the
caller to compute on its cluster; :func:`append_variables` adds variables to a group already written;
:func:`link_chunks` gives a group chunks of a committed version as they are (hard links: an append).
:func:`write_store` does all of it in one transaction.

Layout of a group (built by the caller; written as given): ``exp_scale`` (exposure), ``det_scale``
(detector[, amp]), per-cell ``background``, ``weight``, ``model``, ``residual``, ``used`` over
(detector[, amp], exposure), coordinates ``detector``, ``amp`` (names), ``exposure``, and JSON attributes
(``level``, ``iterations``, ``converged``, ``residual_scatter``, ``problems``, ...).
"""

from __future__ import annotations

import collections
import datetime as dt
import itertools
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import xarray as xr

from .read import CommittedStore, group_datasets
from .transaction import COMMIT_ATTR, StagingStore, StoreError, store_transaction

__all__ = ["append_variables", "link_chunks", "write_chunks", "write_groups", "write_region", "write_store"]

_STRING_DTYPE = np.dtypes.StringDType() if hasattr(np.dtypes, "StringDType") else object  # numpy < 2: object


def _jsonable(value: Any, where: str) -> Any:
    """``value`` as plain JSON types (numpy scalars and arrays, tuples, paths and datetimes converted)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)  # NaN stays NaN: zarr-python writes and reads it (as JSON's common extension)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist(), where)
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: attribute keys must be strings, got {key!r}")
            out[key] = _jsonable(item, f"{where}.{key}")
        return out
    if isinstance(value, (list, tuple)):
        return [_jsonable(item, f"{where}[{i}]") for i, item in enumerate(value)]
    raise TypeError(f"{where}: {type(value).__name__} is not JSON-serialisable: {value!r}")


def _zarr_ready(ds: xr.Dataset, name: str, layout_only: bool = False) -> xr.Dataset:
    """A copy of ``ds`` that writes cleanly: strings as variable-length UTF-8, dask chunks on zarr chunks.

    ``layout_only``: the dask-backed variables are to be laid out (metadata), their chunks written by other
    tasks: each becomes one dask chunk of nothing, with its zarr chunks in its encoding, so that the writes
    xarray prepares (and nobody computes) are one task a variable, not one a chunk.
    """
    ds = ds.copy()
    ds.attrs = _jsonable(dict(ds.attrs), f"group {name} attrs")
    replaced: dict[str, xr.Variable] = {}
    for var_name, var in ds.variables.items():
        var = var.copy(deep=False)
        var.attrs = _jsonable(dict(var.attrs), f"{name}/{var_name} attrs")
        # Stale encodings (chunks, fill values of a store the data was read from) must not leak in.
        var.encoding = {}
        if var.dtype.kind == "U" or (var.dtype == object and var.chunks is None
                                     and all(isinstance(v, str) for v in var.values.flat)):
            # Fixed-width numpy strings would be zarr's fixed_length_utf32, which has no v3 spec yet; the
            # variable-length "string" type has one.  numpy's StringDType maps to it without xarray
            # loading dask-backed strings to infer a type, as it does for object arrays.
            var = var.astype(_STRING_DTYPE)
        chunks = None
        if var.chunks is not None:  # dask-backed; numpy variables are written by the client, zarr-chunked
            sizes, regular = [], True
            for dim_chunks in var.chunks:
                first = dim_chunks[0] if dim_chunks else 0
                # xarray needs every dask chunk but the last to be a whole number of zarr chunks.
                if any(c != first for c in dim_chunks[:-1]) or (dim_chunks and dim_chunks[-1] > first):
                    regular = False
                    first = max(dim_chunks)
                sizes.append(max(first, 1))
            if layout_only:
                import dask.array as da

                var = var.copy(deep=False, data=da.empty(var.shape, dtype=var.dtype, chunks=var.shape))
            elif not regular:
                var = var.chunk(dict(zip(var.dims, sizes)))
            chunks = tuple(sizes)
        var.encoding = {"chunks": chunks} if chunks else {}
        replaced[var_name] = var
    coords = {k: v for k, v in replaced.items() if k in ds.coords}
    data_vars = {k: v for k, v in replaced.items() if k not in ds.coords}
    return xr.Dataset(data_vars, coords=coords, attrs=ds.attrs)


def _check_group_name(name: Any) -> str:
    if not isinstance(name, str) or not name or "/" in name or name in (".", "..") or name.startswith("."):
        raise ValueError(f"bad group (physical_filter) name {name!r}: must be non-empty, without '/', "
                         "not starting with '.'")
    return name


def write_groups(staging: str | os.PathLike, datasets: Mapping[str, xr.Dataset] | xr.DataTree, *,
                 root_attrs: Mapping[str, Any] | None = None, layout_only: bool = False) -> list:
    """Write the root and every group's metadata into ``staging``; return the delayed chunk writes.

    Parameters
    ----------
    staging : path-like
        The empty directory returned by :func:`flatnorm_dask.store.prepare_store`.
    datasets : mapping of str to Dataset, or DataTree
        One Dataset per group (physical_filter), numpy- or dask-backed; a DataTree's children are used.
        Attributes must be JSON-serialisable after converting numpy scalars and arrays.
    root_attrs : mapping, optional
        Root attributes (config, versions, creation time...); ``flatnorm_commit`` is reserved.
    layout_only : bool
        Lay the dask-backed variables out (metadata, chunked as their dask chunks) without preparing their
        writes, for tasks that write the chunks themselves (:func:`write_region`, :func:`link_chunks`,
        :func:`write_chunks`): a large lazy Dataset is laid out in a fraction of the time.

    Returns
    -------
    list of dask.delayed.Delayed
        One per group (none with ``layout_only``); compute them (on any scheduler whose workers see
        ``staging``) before :func:`flatnorm_dask.store.commit_store`.  In-memory variables are already written
        when this returns.
    """
    import zarr

    staging = Path(staging)
    if not staging.is_dir():
        raise StoreError(f"{staging}: staging directory not found (call prepare_store first)")
    if any(staging.iterdir()):
        raise StoreError(f"{staging}: staging directory is not empty")
    attrs = _jsonable(dict(root_attrs or {}), "root attrs")
    if COMMIT_ATTR in attrs:
        raise ValueError(f"root attribute {COMMIT_ATTR!r} is reserved for the commit marker")
    groups = {_check_group_name(name): ds for name, ds in group_datasets(datasets).items()}
    store = StagingStore(staging)
    zarr.create_group(store, zarr_format=3, attributes=attrs)
    writes = [_zarr_ready(ds, name, layout_only).to_zarr(store, group=name, mode="w-", compute=False, zarr_format=3,
                                                         consolidated=False)
              for name, ds in groups.items()]
    return [] if layout_only else writes


def write_chunks(staging: str | os.PathLike, name: str, ds: xr.Dataset) -> Any:
    """The delayed writes of the dask-backed variables of ``ds`` into group ``name`` of a staging store that
    :func:`write_groups` laid out from it with ``layout_only``: what :func:`write_groups` would have returned
    for it.  Compute them before :func:`flatnorm_dask.store.commit_store`."""
    name = _check_group_name(name)
    ready = _zarr_ready(ds, name)
    return ready[[v for v in ready.data_vars if ready[v].chunks is not None]].to_zarr(
        StagingStore(staging), group=name, mode="r+", compute=False, zarr_format=3, consolidated=False)


def append_variables(staging: str | os.PathLike, name: str, ds: xr.Dataset) -> Any:
    """Add ``ds``'s variables to group ``name`` of a staging store written by :func:`write_groups`.

    The group's attributes become ``ds.attrs`` merged over the existing ones.  Returns the delayed chunk
    writes (in-memory variables are written before it returns); compute them before
    :func:`flatnorm_dask.store.commit_store`.
    """
    import zarr

    name = _check_group_name(name)
    store = StagingStore(staging)
    group = zarr.open_group(store, path=name, mode="r+", zarr_format=3)
    ready = _zarr_ready(ds.assign_attrs({**dict(group.attrs), **ds.attrs}), name)
    written = set(group.array_keys())
    existing = [v for v in ready.data_vars if v in written]
    if existing:
        raise StoreError(f"{staging}/{name}: variables {existing} are already written")
    return ready.to_zarr(store, group=name, mode="a", compute=False, zarr_format=3, consolidated=False)


def write_region(staging: str | os.PathLike, name: str, ds: xr.Dataset, region: Mapping[str, slice]) -> None:
    """Write an in-memory Dataset into a region of group ``name`` of a staging store, whose arrays
    :func:`write_groups` made from a lazy Dataset of the same layout (and left to be filled).

    For tasks that each write their own block, e.g. a reading task: ``region`` maps dimensions to slices and
    should cover whole chunks, so that tasks writing side by side never write into the same chunk.
    """
    import asyncio

    from zarr.core.sync import sync

    # Variables, not DataArrays: making a DataArray of each costs more than its write.
    variables = {var_name: ds.variables[var_name] for var_name in ds.data_vars}
    values = {var_name: var.values.astype(_STRING_DTYPE) if var.dtype.kind in "OU" else var.values
              for var_name, var in variables.items()}
    where = {var_name: tuple(region.get(dim, slice(None)) for dim in var.dims) for var_name, var in variables.items()}

    async def write() -> None:
        arrays = await _opened_arrays(os.fspath(staging), _check_group_name(name), list(values))
        await asyncio.gather(*(arrays[var_name].setitem(where[var_name], values[var_name]) for var_name in values))

    # One trip to zarr's event loop for all the variables (rather than two a variable): a reading task
    # writes its block in a few milliseconds.
    sync(write())


#: Arrays of staging groups that this process's :func:`write_region` calls opened, by (staging, group), most
#: recent last; at most :data:`_OPENED_GROUPS` groups.  A staging directory's name is new for every run and its
#: arrays' metadata never change once :func:`write_groups` wrote it, so the tasks of a run that land on one
#: worker open each array once, not once a block: opening (reading and parsing its metadata) cost a third of a
#: reading task's write.  Only zarr's event loop thread touches it.
_OPENED: collections.OrderedDict[tuple[str, str], dict[str, Any]] = collections.OrderedDict()
_OPENED_GROUPS = 16


async def _opened_arrays(staging: str, name: str, variables: list[str]) -> dict[str, Any]:
    """zarr's arrays of ``variables`` in group ``name`` of a staging store, opened once per process (see
    :data:`_OPENED`), through :class:`StagingStore`: a block written after its run failed (and removed the staging)
    or was committed is refused at each write, whenever the array was opened."""
    import asyncio

    from zarr.api.asynchronous import open_group

    arrays = _OPENED.setdefault((staging, name), {})
    _OPENED.move_to_end((staging, name))
    while len(_OPENED) > _OPENED_GROUPS:
        _OPENED.popitem(last=False)
    missing = [v for v in variables if v not in arrays]
    if missing:
        group = await open_group(StagingStore(staging), path=name, mode="r+", zarr_format=3)
        arrays.update(zip(missing, await asyncio.gather(*(group.getitem(v) for v in missing))))
    return arrays


#: What an array's metadata (its ``zarr.json``) may differ in for another array's chunk files to decode to the
#: same values in it: its shape (grown by an append).
_LAYOUT_FREE = ("shape",)


def _array_metadata(file: Path) -> dict[str, Any] | None:
    try:
        return json.loads(file.read_bytes())
    except FileNotFoundError:
        return None


def link_chunks(source: CommittedStore, staging: str | os.PathLike, name: str, variables: Iterable[str],
                chunks: Iterable[Mapping[str, int]] | None = None, *, same_shape: bool = False) -> int | None:
    """Give arrays of group ``name`` of a staging store chunks of a committed version as they are: its files,
    hard-linked (copied where the file system cannot link them), instead of decoding and encoding them again.

    The staged arrays must have been laid out (by :func:`write_groups`) with the version's metadata, shape apart
    (``same_shape``: shape too): same data type, chunk grid, chunk keys, codecs, fill value and attributes, so
    that each chunk file decodes to the same values.  A committed version never changes, and the staging store
    never writes into a file it holds (:class:`flatnorm_dask.store.transaction.StagingStore`): a linked file
    stays the version's, byte for byte.

    Parameters
    ----------
    source : CommittedStore
        The committed version (:func:`flatnorm_dask.store.committed_store`).
    staging : path-like
        The staging directory.
    name : str
        The group, in both.
    variables : iterable of str
        The arrays whose chunks are linked.
    chunks : iterable of mappings of str to int, optional
        The chunks to link, each as chunk indices by dimension name (every chunk along a dimension it does not
        name); all the chunks of each array when not given.
    same_shape : bool
        Whether the arrays' shapes must be the version's too.

    Returns
    -------
    int or None
        The number of files linked (a chunk of fill values only has no file, in either store); None, with
        nothing linked, when an array is missing in either store or laid out otherwise.

    Raises
    ------
    DamagedStoreError
        The version lacks a chunk file its commit manifest lists.
    """
    import zarr

    name = _check_group_name(name)
    store = StagingStore(staging)
    ignored = () if same_shape else _LAYOUT_FREE
    arrays = {}
    for var in variables:
        key = f"{name}/{var}/zarr.json"
        staged, stored = _array_metadata(Path(staging) / key), _array_metadata(source.file_of(key))
        if staged is None or stored is None or \
                {k: v for k, v in staged.items() if k not in ignored} != {k: v for k, v in stored.items()
                                                                          if k not in ignored}:
            return None
        arrays[var] = zarr.open_array(store, path=f"{name}/{var}", mode="r", zarr_format=3).metadata
    selections = [{}] if chunks is None else list(chunks)
    n = 0
    for var, meta in arrays.items():
        counts = [-(-size // chunk) for size, chunk in zip(meta.shape, meta.chunks)]
        dims = meta.dimension_names or (None,) * len(counts)
        # An array without some of the dimensions selected on is linked once per chunk, however many ask.
        coords = dict.fromkeys(itertools.chain.from_iterable(
            itertools.product(*[[selection[dim]] if dim in selection else range(count)
                                for dim, count in zip(dims, counts)])
            for selection in selections))
        for chunk in coords:
            key = f"{name}/{var}/{meta.encode_chunk_key(chunk)}"
            if store.link(key, source.file_of(key)):
                n += 1
            else:
                source.check_missing(key)
    return n


def write_store(path: str | os.PathLike, datasets: Mapping[str, xr.Dataset] | xr.DataTree, *,
                root_attrs: Mapping[str, Any] | None = None, **commit: Any) -> Path:
    """:func:`write_groups` and ``dask.compute`` (on the active scheduler or client) in one
    :func:`flatnorm_dask.store.store_transaction` (``commit``: its keywords, e.g. ``overwrite=True``): the store
    is committed, or nothing is left.  Returns ``path``."""
    import dask

    with store_transaction(path, **commit) as txn:
        dask.compute(*write_groups(txn.staging, datasets, root_attrs=root_attrs))
    return Path(path)
