"""The Zarr store of a run: one group per physical_filter, written in three steps so that no reader ever sees
a half-written store.

1. :func:`prepare_store` refuses an existing store (unless ``overwrite``) and creates an empty staging
   directory beside it, ``.NAME.partial-<id>``.
2. :func:`write_groups` writes every group's metadata (and its in-memory arrays) into the staging directory
   and returns the Dask tasks that write the chunked arrays, for the caller to compute on its cluster.
3. :func:`commit_store` flushes the files, consolidates the metadata, adds the commit marker (the root
   attribute ``flatnorm_commit``) as the very last write, and renames the staging directory into place.

Readers (:func:`open_store`, :func:`export_scales`, ``flatnorm info``) refuse a store without the marker.
A killed run leaves only its ``.NAME.partial-*`` directory, which is never opened as a store; it is not
removed automatically, because a directory of that name may belong to a run still writing on another node.

Layout of a group (built by the caller; written as given): ``exp_scale`` (exposure), ``det_scale``
(detector[, amp]), per-cell ``background``, ``weight``, ``model``, ``residual``, ``used`` over
(detector[, amp], exposure), coordinates ``detector``, ``amp`` (names), ``exposure``, and JSON attributes
(``level``, ``iterations``, ``converged``, ``residual_scatter``, ``problems``, ...).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import shutil
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import xarray as xr
import yaml

log = logging.getLogger(__name__)

__all__ = [
    "COMMIT_ATTR",
    "IncompleteStoreError",
    "StoreError",
    "StoreExistsError",
    "commit_store",
    "export_scales",
    "is_complete",
    "open_store",
    "prepare_store",
    "store_summary",
    "write_groups",
    "write_scales_yaml",
    "write_store",
]

#: Root attribute whose presence makes a store complete.
COMMIT_ATTR = "flatnorm_commit"
_PARTIAL = "partial"
_STRING_DTYPE = np.dtypes.StringDType() if hasattr(np.dtypes, "StringDType") else object  # numpy < 2: object
_TRASH = "trash"


class StoreError(RuntimeError):
    """A store cannot be written or read; the one-line message names its path."""


class IncompleteStoreError(StoreError):
    """The path holds no commit marker: an interrupted run, or one still writing."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(f"{os.fspath(path)}: not a complete flatnorm store (no commit marker); it was interrupted "
                         "or is being written — rerun with --overwrite")


class StoreExistsError(StoreError):
    """The output path exists and ``overwrite`` was not given."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(f"{os.fspath(path)} exists; pass --overwrite to replace it")


# --------------------------------------------------------------------------------------------------- write

def _sibling(path: Path, kind: str) -> Path:
    """A hidden name beside ``path`` in the same directory, so that os.rename stays on one file system."""
    return path.with_name(f".{path.name}.{kind}-{uuid.uuid4().hex[:12]}")


def _check_replaceable(path: Path) -> None:
    """With --overwrite, replace only a Zarr store (complete or not), never e.g. a home directory by a typo."""
    if path.is_dir() and not path.is_symlink():
        if (path / "zarr.json").is_file() or not any(path.iterdir()):
            return
    raise StoreError(f"{path} exists and is not a Zarr store directory; refusing to replace it, even with "
                     "--overwrite")


def prepare_store(path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Check that ``path`` may be written and create the empty staging directory for it.

    Nothing is deleted here: an existing store is replaced only by :func:`commit_store`, once the new one
    is complete.

    Parameters
    ----------
    path : path-like
        The store to write (a directory, e.g. ``scales.zarr``).  Missing parent directories are created.
    overwrite : bool
        Allow replacing an existing store at ``path``.

    Returns
    -------
    Path
        The staging directory, ``.NAME.partial-<id>`` beside ``path``.

    Raises
    ------
    StoreExistsError
        ``path`` exists and ``overwrite`` is false.
    StoreError
        ``path`` exists but is not a Zarr store (never replaced), or the staging directory cannot be made.
    """
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise StoreExistsError(path)
        _check_replaceable(path)
    leftovers = sorted(path.parent.glob(f".{path.name}.{_PARTIAL}-*")) if path.parent.is_dir() else []
    if leftovers:
        # Not removed: another run (maybe on another node) could still be writing into one of them.
        log.warning("%d staging director%s of interrupted or running writes beside %s (e.g. %s); remove them "
                    "once no run writes there", len(leftovers), "y" if len(leftovers) == 1 else "ies", path,
                    leftovers[0].name)
    staging = _sibling(path, _PARTIAL)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
    except OSError as err:
        raise StoreError(f"{path}: cannot create the staging directory {staging}: {err.strerror or err}") from None
    return staging


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


def _zarr_ready(ds: xr.Dataset, name: str) -> xr.Dataset:
    """A copy of ``ds`` that writes cleanly: strings as variable-length UTF-8, dask chunks on zarr chunks."""
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
            if not regular:
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
                 root_attrs: Mapping[str, Any] | None = None) -> list:
    """Write the root and every group's metadata into ``staging``; return the delayed chunk writes.

    Parameters
    ----------
    staging : path-like
        The empty directory returned by :func:`prepare_store`.
    datasets : mapping of str to Dataset, or DataTree
        One Dataset per group (physical_filter), numpy- or dask-backed; a DataTree's children are used.
        Attributes must be JSON-serialisable after converting numpy scalars and arrays.
    root_attrs : mapping, optional
        Root attributes (config, versions, creation time...); ``flatnorm_commit`` is reserved.

    Returns
    -------
    list of dask.delayed.Delayed
        One per group; compute them (on any scheduler whose workers see ``staging``) before
        :func:`commit_store`.  In-memory variables are already written when this returns.
    """
    import zarr

    staging = Path(staging)
    if not staging.is_dir():
        raise StoreError(f"{staging}: staging directory not found (call prepare_store first)")
    if any(staging.iterdir()):
        raise StoreError(f"{staging}: staging directory is not empty")
    if isinstance(datasets, xr.DataTree):
        datasets = {name: node.to_dataset() for name, node in datasets.children.items()}
    attrs = _jsonable(dict(root_attrs or {}), "root attrs")
    if COMMIT_ATTR in attrs:
        raise ValueError(f"root attribute {COMMIT_ATTR!r} is reserved for the commit marker")
    zarr.create_group(str(staging), zarr_format=3, attributes=attrs)
    writes = []
    for name, ds in datasets.items():
        name = _check_group_name(name)
        if isinstance(ds, xr.DataTree):
            ds = ds.to_dataset()
        ready = _zarr_ready(ds, name)
        writes.append(ready.to_zarr(str(staging), group=name, mode="w-", compute=False, zarr_format=3,
                                    consolidated=False))
    return writes


def append_variables(staging: str | os.PathLike, name: str, ds: xr.Dataset) -> Any:
    """Add ``ds``'s variables to group ``name`` of a staging store written by :func:`write_groups`.

    The group's attributes become ``ds.attrs`` merged over the existing ones.  Returns the delayed chunk
    writes (in-memory variables are written before it returns); compute them before :func:`commit_store`.
    """
    import zarr

    name = _check_group_name(name)
    group = zarr.open_group(str(staging), path=name, mode="r+", zarr_format=3)
    ready = _zarr_ready(ds.assign_attrs({**dict(group.attrs), **ds.attrs}), name)
    existing = [v for v in ready.data_vars if v in set(group.array_keys())]
    if existing:
        raise StoreError(f"{staging}/{name}: variables {existing} are already written")
    return ready.to_zarr(str(staging), group=name, mode="a", compute=False, zarr_format=3, consolidated=False)


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory below ``root``, so a power cut after the rename cannot expose a
    store whose marker is on disk but whose chunks are not."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync(Path(dirpath, name))
        _fsync(Path(dirpath))  # some file systems cannot fsync a directory: then nothing more can be done


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def commit_store(staging: str | os.PathLike, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Mark the staged store complete and move it to ``path``.

    The commit marker (root attribute ``flatnorm_commit`` = ``{"time", "groups", "flatnorm_dask"}``) is the
    last thing written, after every chunk is flushed and the metadata consolidated; then ``staging`` is
    renamed to ``path``.  An existing store (``overwrite``) is first renamed to ``.NAME.trash-<id>``, the new
    one renamed in, and only then the old one deleted: at every moment ``path`` is either the complete old
    store, absent (between the two renames), or the complete new store.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    StoreExistsError
        ``path`` appeared while the store was written and ``overwrite`` is false.
    StoreError
        ``staging`` is not a staged store, or a rename failed (the old store is then put back).
    """
    import zarr

    staging, path = Path(staging), Path(path)
    if not (staging / "zarr.json").is_file():
        raise StoreError(f"{staging}: not a staged store (no zarr.json; was write_groups called?)")
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise StoreExistsError(path)
        _check_replaceable(path)
    groups = sorted(zarr.open_group(str(staging), mode="r", use_consolidated=False).group_keys())
    _fsync_tree(staging)
    with warnings.catch_warnings():
        # zarr notes that consolidated metadata is not in the v3 spec yet; readers without it still work.
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        zarr.consolidate_metadata(str(staging), zarr_format=3)
    from . import __version__

    marker = {"time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "groups": groups,
              "flatnorm_dask": __version__}
    # Opened through the consolidated metadata, so the attribute update keeps it.
    zarr.open_group(str(staging), mode="r+").attrs.update({COMMIT_ATTR: marker})
    _fsync(staging / "zarr.json")  # the marker itself, before the rename makes it visible
    _fsync(staging)

    trash = None
    if path.exists() or path.is_symlink():
        trash = _sibling(path, _TRASH)
        try:
            os.rename(path, trash)
        except OSError as err:
            raise StoreError(f"{path}: cannot move the old store aside: {err.strerror or err}") from None
    try:
        os.rename(staging, path)
    except OSError as err:
        reason = err.strerror or str(err)
        if trash is not None:
            try:
                os.rename(trash, path)
            except OSError:
                raise StoreError(f"{path}: cannot rename the new store into place ({reason}); the old store "
                                 f"is at {trash}") from None
            raise StoreError(f"{path}: cannot rename the new store into place ({reason}); the old store is "
                             "kept") from None
        if path.exists():  # another run committed first: rename does not replace a non-empty directory
            raise StoreExistsError(path) from None
        raise StoreError(f"{path}: cannot rename the new store into place: {reason}") from None
    _fsync(path.parent)
    if trash is not None:
        if trash.is_dir() and not trash.is_symlink():
            shutil.rmtree(trash, ignore_errors=True)
        else:
            trash.unlink(missing_ok=True)
    return path


def write_store(path: str | os.PathLike, datasets: Mapping[str, xr.Dataset] | xr.DataTree, *,
                root_attrs: Mapping[str, Any] | None = None, overwrite: bool = False) -> Path:
    """:func:`prepare_store`, :func:`write_groups`, ``dask.compute`` (on the active scheduler or client) and
    :func:`commit_store` in one call; the staging directory is removed if anything fails."""
    import dask

    staging = prepare_store(path, overwrite=overwrite)
    try:
        dask.compute(*write_groups(staging, datasets, root_attrs=root_attrs))
        return commit_store(staging, path, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------------------- read

def _marker(path: Path) -> dict | None:
    """The commit marker of the store at ``path``, or None (read from the root zarr.json, the v3 metadata)."""
    try:
        with open(path / "zarr.json", encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    marker = meta.get("attributes", {}).get(COMMIT_ATTR) if isinstance(meta, dict) else None
    if isinstance(marker, dict) and isinstance(marker.get("groups"), list):
        return marker
    return None


def _is_staging(path: Path) -> bool:
    # Between the marker write and the rename a staging directory holds a marker: still not a store.
    return path.name.startswith(".") and f".{_PARTIAL}-" in path.name


def is_complete(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a committed flatnorm store (its root holds the commit marker)."""
    path = Path(path)
    return not _is_staging(path) and _marker(path) is not None


def open_store(path: str | os.PathLike) -> xr.DataTree:
    """Open a complete store lazily: one child per physical_filter, variables as dask arrays.

    Raises
    ------
    StoreError
        ``path`` does not exist, or a group listed by the commit marker is missing.
    IncompleteStoreError
        ``path`` exists but has no commit marker (an interrupted or running write, or not a store).
    """
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        raise StoreError(f"{path}: no such store")
    marker = None if _is_staging(path) else _marker(path)
    if marker is None:
        raise IncompleteStoreError(path)
    try:
        tree = xr.open_datatree(str(path), engine="zarr", chunks={})
    except Exception as err:  # corrupt metadata: say which store
        raise StoreError(f"{path}: cannot open the store: {err}") from err
    missing = [g for g in marker["groups"] if g not in tree.children]
    if missing:
        raise StoreError(f"{path}: group(s) {', '.join(missing)} listed by the commit marker are missing")
    return tree


def _tree(path_or_tree: str | os.PathLike | xr.DataTree) -> xr.DataTree:
    return path_or_tree if isinstance(path_or_tree, xr.DataTree) else open_store(path_or_tree)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3e}"
    return str(value)


def store_summary(path: str | os.PathLike, max_problems: int = 5) -> str:
    """What a store holds, for ``flatnorm info``: groups and their sizes, fit diagnostics, problems and
    provenance.  Reads metadata only."""
    tree = open_store(path)
    attrs = dict(tree.attrs)
    marker = attrs.get(COMMIT_ATTR, {})
    lines = [f"flatnorm store {os.fspath(path)}"]
    versions = attrs.get("versions")
    if isinstance(versions, Mapping):
        lines.append("  written by " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    lines.append(f"  created {attrs.get('created', 'unknown')}, committed {marker.get('time', 'unknown')}")
    config = attrs.get("config")
    if isinstance(config, Mapping):
        inp, solve = config.get("input") or {}, config.get("solve") or {}
        source = inp.get("pattern") or inp.get("manifest")
        mode = f"tol {solve.get('tol')}, max_iter {solve.get('max_iter')}" if solve.get("tol") else \
            f"{solve.get('iterations')} iterations"
        where = f"{inp.get('root')} ({source})"
        if inp.get("butler"):
            where = (f"butler {inp['butler']} ({inp.get('dataset_type')} in "
                     f"{', '.join(inp.get('collections') or [])}{' where ' + inp['where'] if inp.get('where') else ''})")
        lines.append(f"  config: input {where}, camera {inp.get('camera')}, "
                     f"level {solve.get('level')}, {mode}")
    lines.append(f"  {len(tree.children)} group(s): {', '.join(tree.children)}")
    for name, node in tree.children.items():
        ds = node.to_dataset()
        ga = ds.attrs
        shape = " x ".join(f"{ds.sizes[d]} {d}s" for d in ("detector", "amp", "exposure") if d in ds.sizes)
        converged = ga.get("converged")
        state = "converged" if converged is True else "NOT converged" if converged is False else "convergence ?"
        lines.append(f"  {name}: level {ga.get('level', '?')}; {shape}; {ga.get('iterations', '?')} iterations, "
                     f"{state}; residual scatter {_fmt(ga.get('residual_scatter', '?'))}; "
                     f"{ga.get('n_files', '?')} files")
        if ga.get("clip_rounds"):
            lines.append(f"    robust fit: {ga.get('n_clipped')} cell(s) clipped in {ga['clip_rounds']} round(s)")
        problems = ga.get("problems") or []
        lines.append(f"    {len(problems)} problem(s)")
        for item in problems[:max_problems]:
            if isinstance(item, Mapping):
                lines.append(f"      {item.get('file')}: {item.get('reason')}")
            else:
                lines.append(f"      {item}")
        if len(problems) > max_problems:
            lines.append(f"      ... and {len(problems) - max_problems} more")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------- export

def export_scales(path_or_tree: str | os.PathLike | xr.DataTree) -> dict[str, dict]:
    """The ``cpFlatNormScales`` structure of every group: ``{filter: {"expScale": ..., "detScale": ...}}``.

    Parameters
    ----------
    path_or_tree : path-like or DataTree
        A complete store (opened with :func:`open_store`) or a tree shaped like one.

    Returns
    -------
    dict
        Per filter, :func:`flatnorm_dask.records.scales_dict` of the group's coordinates and scales: plain
        ints (detector, exposure), strs (amplifier) and floats.
    """
    from .records import scales_dict

    tree = _tree(path_or_tree)
    out: dict[str, dict] = {}
    for name, node in tree.children.items():
        ds = node.to_dataset()
        where = f"{os.fspath(path_or_tree)}: group {name}" if not isinstance(path_or_tree, xr.DataTree) \
            else f"group {name}"
        for var in ("exp_scale", "det_scale"):
            if var not in ds:
                raise StoreError(f"{where}: no {var} variable")
        if "amp" not in ds.coords:
            raise StoreError(f"{where}: no amp coordinate (cpFlatNormScales lists every amplifier)")
        det_dims = ("detector", "amp") if "amp" in ds["det_scale"].dims else ("detector",)
        out[name] = scales_dict(
            ds["exposure"].values.tolist(),
            ds["detector"].values.tolist(),
            [str(a) for a in ds["amp"].values.tolist()],
            np.asarray(ds["exp_scale"].transpose("exposure").values, dtype=float),
            np.asarray(ds["det_scale"].transpose(*det_dims).values, dtype=float),
        )
    return out


class _ScalesDumper(getattr(yaml, "CSafeDumper", yaml.SafeDumper)):  # C emitter: LSSTCam exports are large
    """Safe dumper that never writes anchors/aliases (shared sub-dicts are written out in full)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def write_scales_yaml(path_or_tree: str | os.PathLike | xr.DataTree, out_path: str | os.PathLike) -> Path:
    """Write :func:`export_scales` as YAML (int keys, floats; ``yaml.safe_load`` reads it back).

    The file is written beside ``out_path`` and renamed into place, so a reader never sees half of it.
    """
    data = export_scales(path_or_tree)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(out_path, _PARTIAL)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            yaml.dump(data, f, Dumper=_ScalesDumper, default_flow_style=False, sort_keys=False)
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out_path
