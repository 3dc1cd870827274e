"""Find flat-statistics files and read them in parallel into a chunked ``xarray.DataTree``.

Discovery (a filename pattern with named fields, or a manifest) runs on the client and yields a file table.
Reading runs in Dask tasks, each covering one block of (detector, exposure) cells, about ``batch_size``
files: the task parses its files with its own :class:`~flatnorm_dask.formats.StatsReader` and returns one
packed numpy block (channels: :class:`~flatnorm_dask.schema.PackedChannels`), so the client never touches the
statistics.  The Datasets are slices of those packed blocks.

A cell's ``status`` says what happened to it (see :data:`STATUS`).  With ``on_error="mask"`` a bad file masks
its cell; :func:`problems` turns the statuses back into (file, reason) records.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .bounded import MAX_FILE_BYTES
from .formats import StatsReader
from .schema import (
    AMP_VARIABLES,
    COUNT_STAT,
    DAY_OBS_PATTERN,
    DET_VARIABLES,
    OBS_ID_PATTERN,
    ON_ERROR,
    PackedChannels,
    VALUE_STAT,
    StatsFormatError,
    check_level,
    exposure_from_obs_id,
    exposure_id,
)

__all__ = [
    "STATUS",
    "IngestError",
    "compile_pattern",
    "discover",
    "problems",
    "read_campaign",
    "select_files",
    "solver_inputs",
]

#: Cell status codes stored in the ``status`` variable.
STATUS = {0: "ok", 1: "absent", 2: "unreadable", 3: "amplifier names differ", 4: "duplicate"}
OK, ABSENT, BAD_FILE, AMP_MISMATCH, DUPLICATE = range(5)

DEFAULT_FILTER = "all"
DUPLICATE_SEPARATOR = " | "  # joins the paths of duplicate files in a cell's ``file`` entry

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
    """Bad inputs found while listing files: a one-line message naming the file or column."""


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


def _exposure_ids(table: pd.DataFrame) -> Any:
    """Exposure ids from matched pattern fields: ``exposure``, ``obs_id``, or ``day_obs`` and ``seq_num``."""
    if "exposure" in table:
        return table["exposure"].astype(np.int64)
    if "obs_id" in table:
        ids = []
        for path, obs_id in zip(table["path"], table["obs_id"]):
            try:
                ids.append(exposure_from_obs_id(obs_id))
            except ValueError as err:
                raise IngestError(f"{path}: {err}") from None
        return np.array(ids, dtype=np.int64)
    day_obs, seq_num = table["day_obs"].astype(np.int64), table["seq_num"].astype(np.int64)
    try:
        return exposure_id(day_obs.to_numpy(), seq_num.to_numpy())
    except ValueError:
        for path, day, seq in zip(table["path"], day_obs, seq_num):  # find the file to name
            try:
                exposure_id(day, seq)
            except ValueError as err:
                raise IngestError(f"{path}: {err}") from None
        raise


def _ids_from_fields(table: pd.DataFrame, camera: Any, source: str) -> pd.DataFrame:
    """Turn matched pattern fields into integer exposure and detector ids."""
    out = pd.DataFrame({"path": table["path"]})
    out["exposure"] = _exposure_ids(table)
    if "detector" in table:
        out["detector"] = table["detector"].astype(np.int64)
    else:
        if camera is None:
            raise IngestError(f"{source}: {{detector_name}} needs a camera to map names to ids")
        ids = {}
        for name in pd.unique(table["detector_name"]):
            try:
                ids[name] = camera.detector_id(name)
            except KeyError:
                bad = table["path"][table["detector_name"] == name].iloc[0]
                raise IngestError(f"{bad}: detector {name!r} is not in camera {camera.name!r}") from None
        out["detector"] = table["detector_name"].map(ids).astype(np.int64)
    out["physical_filter"] = table["physical_filter"].astype(str) if "physical_filter" in table else DEFAULT_FILTER
    return out


def discover(
    root: str | os.PathLike | None = None,
    pattern: str | None = None,
    manifest: str | os.PathLike | None = None,
    camera: Any = None,
    columns: Sequence[str] = (),
) -> pd.DataFrame:
    """List the input files with their data ids.

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
        CSV or Parquet file with columns ``path, exposure, detector[, physical_filter]``.
    camera : Camera, optional
        Needed for ``{detector_name}`` fields.
    columns : sequence of str
        Further manifest columns to keep (as strings), such as the exposure field of a down-selection
        (:func:`select_files`); a pattern has none.

    Returns
    -------
    pandas.DataFrame
        Columns ``path`` (absolute), ``exposure``, ``detector``, ``physical_filter`` and ``columns``, sorted.
    """
    if (pattern is None) == (manifest is None):
        raise IngestError("give exactly one of a pattern (with a root directory) or a manifest")
    if manifest is not None:
        table = _read_manifest(Path(manifest), root, tuple(columns))
    else:
        if root is None:
            raise IngestError("a pattern needs a root directory")
        if columns:
            raise IngestError(f"a pattern gives no column {', '.join(columns)}: list the files in a manifest")
        table = _scan(Path(root), pattern, camera)
    return table.sort_values(["physical_filter", "exposure", "detector", "path"], kind="stable",
                             ignore_index=True)


def _scan(root: Path, pattern: str, camera: Any) -> pd.DataFrame:
    if not root.is_dir():
        raise IngestError(f"{root}: input directory not found")
    regex = compile_pattern(pattern.lstrip("/"))
    rows = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root)
        prefix = "" if rel_dir == "." else rel_dir.replace(os.sep, "/") + "/"
        for name in filenames:
            match = regex.fullmatch(prefix + name)
            if match:
                fields = match.groupdict()
                fields["path"] = os.path.join(dirpath, name)
                rows.append(fields)
    if not rows:
        raise IngestError(f"{root}: no file matches pattern {pattern!r}")
    return _ids_from_fields(pd.DataFrame(rows), camera, str(root))


def _read_manifest(path: Path, root: str | os.PathLike | None, columns: tuple[str, ...] = ()) -> pd.DataFrame:
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            table = pd.read_parquet(path)
        else:
            table = pd.read_csv(path, dtype=dict.fromkeys(("path", "physical_filter", *columns), str))
    except (OSError, ValueError, ImportError) as err:
        raise IngestError(f"{path}: cannot read manifest: {err}") from None
    missing = [c for c in ("path", "exposure", "detector", *columns) if c not in table.columns]
    if missing:
        raise IngestError(f"{path}: manifest lacks column(s) {', '.join(missing)}")
    for column in ("exposure", "detector"):
        values = pd.to_numeric(table[column], errors="coerce")
        if values.isna().any() or (values != values.round()).any():
            bad = table[column][values.isna() | (values != values.round())].iloc[0]
            raise IngestError(f"{path}: column {column}: not an integer id: {bad!r}")
        table[column] = values.astype(np.int64)
    base = Path(root) if root is not None else path.parent
    table["path"] = [p if os.path.isabs(p) else str(base / p) for p in table["path"].astype(str)]
    if "physical_filter" not in table:
        table["physical_filter"] = DEFAULT_FILTER
    table["physical_filter"] = table["physical_filter"].fillna(DEFAULT_FILTER).astype(str)
    for column in columns:
        table[column] = table[column].astype("string")  # an empty cell stays missing, never the text "nan"
    return table[["path", "exposure", "detector", "physical_filter", *columns]].copy()


def select_files(files: pd.DataFrame, field: str, value: str, source: str) -> pd.DataFrame:
    """The rows of a file table whose exposure ``field`` equals ``value``, compared case-insensitively.

    The down-selection of cp_pipe's normalisation task (``doDownSelection``), on a column named after the
    exposure record field (:data:`flatnorm_dask.schema.SELECT_FIELDS`): from the butler's exposure records
    (:func:`flatnorm_dask.butler.find_inputs`) or a manifest (:func:`discover` with ``columns``).  A missing
    value never matches.

    Raises
    ------
    IngestError
        No such column, or no row left; the message names ``source`` and the values that are there.
    """
    if field not in files.columns:
        raise IngestError(f"{source}: no {field} column to select on")
    values = files[field].astype("string")
    keep = (values.str.lower() == value.lower()).fillna(False).to_numpy(dtype=bool)
    if not keep.any():
        seen = sorted(values.dropna().unique())
        shown = ", ".join(repr(v) for v in seen[:10]) + (f" and {len(seen) - 10} more" if len(seen) > 10 else "")
        raise IngestError(f"{source}: no input exposure has {field} = {value!r} (compared case-insensitively); "
                          f"{'the values there: ' + shown if seen else 'none has a value'}")
    return files[keep].reset_index(drop=True)


def _probe_amp_names(paths: Sequence[str], on_error: str, max_file_bytes: int) -> tuple[str, ...]:
    """Amplifier names from the first readable file (the reference gets them from the camera)."""
    reader = StatsReader(max_bytes=max_file_bytes)
    for path in paths:
        try:
            return reader.read(path).amp_names
        except StatsFormatError:
            if on_error == "raise":
                raise
    raise IngestError(f"none of the {len(paths)} files could be read")


def _read_block(rows: np.ndarray, cols: np.ndarray, paths: Sequence[str], shape: tuple[int, int],
                amp_names: tuple[str, ...], on_error: str, duplicates: np.ndarray,
                max_file_bytes: int = MAX_FILE_BYTES) -> np.ndarray:
    """Read one block of files into a packed array (detector, channel, exposure) -- runs in a Dask task.

    The channels are :class:`~flatnorm_dask.schema.PackedChannels`'; one reader serves the whole block, so
    the files after the second read through the layout it learns from them.
    """
    channels = PackedChannels(len(amp_names))
    block = np.full((shape[0], channels.size, shape[1]), np.nan)
    status = channels.status
    block[:, status, :] = ABSENT
    block[:, channels.det_channel(COUNT_STAT), :] = 0.0  # an absent cell has no pixels
    block[:, channels.amp_channels(COUNT_STAT), :] = 0.0
    results = StatsReader(max_bytes=max_file_bytes).read_many(p for p, dup in zip(paths, duplicates) if not dup)
    for r, c, path, dup in zip(rows, cols, paths, duplicates):
        if dup:
            block[r, status, c] = DUPLICATE
            continue
        stats = next(results)
        if isinstance(stats, StatsFormatError):
            if on_error == "raise":
                raise stats
            block[r, status, c] = BAD_FILE
            continue
        if stats.amp_names != amp_names:
            if on_error == "raise":
                raise StatsFormatError(path, f"amplifier names {list(stats.amp_names)} differ from "
                                       f"{list(amp_names)} of the other files", key="AMP_NAME_i")
            block[r, status, c] = AMP_MISMATCH
            continue
        block[r, status, c] = OK
        block[r, channels.det, c] = stats.det
        block[r, channels.amp, c] = stats.amp.reshape(-1)
    return block


def _chunk_bounds(n: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def _read_filter(files: pd.DataFrame, amp_names: tuple[str, ...], on_error: str, batch_size: int,
                 max_file_bytes: int):
    """One filter's Dataset, backed by one Dask task per block of about ``batch_size`` files."""
    import dask
    import dask.array as da
    import xarray as xr

    detectors = np.unique(files["detector"].to_numpy())
    exposures = np.unique(files["exposure"].to_numpy())
    det_idx = np.searchsorted(detectors, files["detector"].to_numpy())
    exp_idx = np.searchsorted(exposures, files["exposure"].to_numpy())
    dup = files.duplicated(["exposure", "detector"], keep=False).to_numpy()
    if dup.any() and on_error == "raise":
        first = files[dup].iloc[0]
        others = files[dup & (files["exposure"] == first.exposure) & (files["detector"] == first.detector)]
        raise IngestError(f"{others['path'].iloc[1]}: duplicate of {others['path'].iloc[0]} "
                          f"(exposure {first.exposure}, detector {first.detector})")
    n_det, n_exp = len(detectors), len(exposures)
    det_chunk = min(n_det, batch_size)
    exp_chunk = max(1, batch_size // det_chunk)
    paths = files["path"].to_numpy()
    channels = PackedChannels(len(amp_names))

    rows_of_blocks = []
    for d0, d1 in _chunk_bounds(n_det, det_chunk):
        in_rows = (det_idx >= d0) & (det_idx < d1)
        blocks = []
        for e0, e1 in _chunk_bounds(n_exp, exp_chunk):
            sel = in_rows & (exp_idx >= e0) & (exp_idx < e1)
            task = dask.delayed(_read_block, pure=True)(
                det_idx[sel] - d0, exp_idx[sel] - e0, paths[sel].tolist(), (d1 - d0, e1 - e0),
                amp_names, on_error, dup[sel], max_file_bytes)
            blocks.append(da.from_delayed(task, shape=(d1 - d0, channels.size, e1 - e0), dtype=np.float64))
        rows_of_blocks.append(da.concatenate(blocks, axis=2))
    packed = da.concatenate(rows_of_blocks, axis=0)

    cell = ("detector", "exposure")
    amp_cell = ("detector", "amp", "exposure")
    file_grid = np.full((n_det, n_exp), "", dtype=object)
    file_grid[det_idx[~dup], exp_idx[~dup]] = paths[~dup]
    for (d, e), group in files[dup].groupby([det_idx[dup], exp_idx[dup]]):
        file_grid[d, e] = DUPLICATE_SEPARATOR.join(group["path"])
    statistics = {name: (amp_cell if per_amp else cell, packed[:, index, :])
                  for name, per_amp, index in channels.variables()}
    ds = xr.Dataset(
        {
            "status": (cell, packed[:, channels.status, :].astype(np.uint8)),
            **statistics,
            "file": (cell, file_grid.astype(str)),
        },
        coords={"detector": detectors, "amp": list(amp_names), "exposure": exposures},
        attrs={"n_files": int(len(files)), "on_error": on_error},
    )
    ds["status"].attrs["flag_meanings"] = " ".join(v.replace(" ", "_") for v in STATUS.values())
    ds["status"].attrs["flag_values"] = list(STATUS)
    return ds


def read_campaign(
    root: str | os.PathLike | None = None,
    pattern: str | None = None,
    manifest: str | os.PathLike | None = None,
    on_error: str = "raise",
    *,
    camera: Any = None,
    batch_size: int = 1000,
    files: pd.DataFrame | None = None,
    max_file_bytes: int = MAX_FILE_BYTES,
):
    """Read flat statistics files into a DataTree, one child node per physical_filter.

    Parameters
    ----------
    root, pattern, manifest, camera
        Where the files are: see :func:`discover`.  Amplifier names come from the files.
    files : pandas.DataFrame, optional
        Instead of the above, a file table such as :func:`discover` returns.
    on_error : {"raise", "mask"}
        On an unreadable or malformed file, a duplicate (detector, exposure) or amplifier names that
        disagree: raise an error naming the file and key, or mask the cell and record its status.
    batch_size : int
        Files per Dask task (and so per chunk).
    max_file_bytes : int
        Largest file read; a larger one is a bad file (see :class:`~flatnorm_dask.formats.StatsReader`).

    Returns
    -------
    xarray.DataTree
        Child nodes named after the filters (``all`` when the inputs carry none).  Each Dataset has
        ``amp_value``, ``amp_count``, ``amp_sigma`` (detector, amp, exposure), ``det_value``,
        ``det_count``, ``det_sigma`` and ``status`` (detector, exposure) as lazy dask arrays chunked along
        exposure (and detector), and ``file`` (detector, exposure), the path read for each cell.
        A detector or exposure with no file is absent: NaN with count 0.
    """
    import xarray as xr

    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size!r}")
    if files is None:
        files = discover(root, pattern, manifest, camera)
    if len(files) == 0:
        raise IngestError("no input files")
    # The files, not the camera, say which amplifiers they list: a camera mismatch must not mask everything.
    amp_names = _probe_amp_names(files["path"].tolist(), on_error, max_file_bytes)
    children = {str(name): _read_filter(group, amp_names, on_error, batch_size, max_file_bytes)
                for name, group in files.groupby("physical_filter", sort=True)}
    if camera is not None:
        for ds in children.values():
            _name_detectors(ds, camera)
    return xr.DataTree.from_dict(children)


def _name_detectors(ds, camera: Any) -> None:
    """Add the camera's detector names as a ``detector_name`` coordinate (ids it does not know get "")."""
    names = dict(zip(camera.detector.tolist(), camera.detector_name.tolist()))
    ds.coords["detector_name"] = ("detector", np.array([names.get(int(d), "") for d in ds["detector"].values],
                                                        dtype=object))


def problems(ds, status: np.ndarray | None = None, max_file_bytes: int = MAX_FILE_BYTES) -> list[dict[str, str]]:
    """The (file, reason) records of a filter's masked cells.

    Parameters
    ----------
    ds : xarray.Dataset
        A node of :func:`read_campaign`'s tree.
    status : ndarray, optional
        ``ds.status`` already computed (it is computed here otherwise).
    max_file_bytes : int
        The limit the files were read with.

    Notes
    -----
    Only the flagged files are read again, on the client, to recover each parser's exact message.
    """
    status = np.asarray(ds["status"].values if status is None else status)
    files = ds["file"].values
    reader = StatsReader(max_bytes=max_file_bytes)
    out = []
    for d, e in zip(*np.nonzero((status != OK) & (status != ABSENT))):
        path, code = str(files[d, e]), int(status[d, e])
        if code == BAD_FILE:
            try:
                reader.read(path)
                reason = "unreadable when read by the worker"  # e.g. it has since been fixed or appeared
            except StatsFormatError as err:
                reason = err.reason if err.key is None else f"key {err.key}: {err.reason}"
        elif code == DUPLICATE:
            reason = f"duplicate (detector, exposure): {path}"
            path = path.split(DUPLICATE_SEPARATOR)[0]
        else:
            reason = STATUS[code]
        out.append({"file": path, "reason": reason, "detector": int(ds.detector[d]),
                    "exposure": int(ds.exposure[e])})
    return out


def solver_inputs(ds, level: str) -> tuple[Any, Any]:
    """The statistic and weight arrays the solver takes, for a scaling level."""
    variables = AMP_VARIABLES if check_level(level) == "AMP" else DET_VARIABLES
    return ds[variables[VALUE_STAT]], ds[variables[COUNT_STAT]]
