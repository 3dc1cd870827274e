"""A store's scales as LSST's flat combination reads them: one ``cpFlatNormalizeScales`` mapping per
physical_filter, as dicts or YAML files, and the exposures those leave out.

One file holds exactly what one scales dataset of the stock pipelines holds (``expScale`` and ``detScale`` at
the top), so the flat combination reads it as it is.  Where the files go follows one rule
(:func:`scales_yaml_paths`), for ``flatnorm export`` and ``run --scales-yaml`` alike: a path ending in
``.yaml`` (or ``.yml``) is one file, of one filter; any other path is a directory that gets
``<physical_filter>.yaml`` per filter.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import yaml

from .read import group_datasets, open_store, resolve_store, verify_store
from .transaction import OutputPathError, StoreError, StoreVersion, check_output_file, staging_path

__all__ = ["YAML_SUFFIXES", "export_scales", "exposures_left_out", "scales_yaml_paths", "write_scales_yaml"]

#: Suffixes that make an output path one YAML file rather than a directory of them.
YAML_SUFFIXES = (".yaml", ".yml")


def _groups(path_or_tree: str | os.PathLike | StoreVersion | xr.DataTree,
            filters: Sequence[str] | None) -> tuple[str, dict[str, xr.Dataset]]:
    """The groups of a store or tree (all, or ``filters`` in that order) and how messages name the source.

    A store is verified first (:func:`flatnorm_dask.store.verify_store`: every file its commit lists is
    there), and the version verified is the version read, whatever is committed meanwhile.
    """
    if isinstance(path_or_tree, xr.DataTree):
        source, tree = "", path_or_tree
    else:
        version = resolve_store(path_or_tree)
        verify_store(version)
        source, tree = f"{os.fspath(version.store)}: ", open_store(version)
    groups = group_datasets(tree)
    if filters is None:
        return source, groups
    unknown = [name for name in filters if name not in groups]
    if unknown:
        raise StoreError(f"{source}no group (physical_filter) {', '.join(map(repr, unknown))}; the store holds "
                         f"{', '.join(groups)}")
    return source, {name: groups[name] for name in filters}


def _scales(ds: xr.Dataset, where: str) -> dict:
    """One group's scales mapping (:func:`flatnorm_dask.records.scales_dict` of its coordinates and scales)."""
    from ..records import scales_dict

    for var in ("exp_scale", "det_scale"):
        if var not in ds:
            raise StoreError(f"{where}: no {var} variable")
    if "amp" not in ds.coords:
        raise StoreError(f"{where}: no amp coordinate (the scales list every amplifier)")
    det_dims = ("detector", "amp") if "amp" in ds["det_scale"].dims else ("detector",)
    return scales_dict(
        ds["exposure"].values.tolist(),
        ds["detector"].values.tolist(),
        [str(a) for a in ds["amp"].values.tolist()],
        np.asarray(ds["exp_scale"].transpose("exposure").values, dtype=float),
        np.asarray(ds["det_scale"].transpose(*det_dims).values, dtype=float),
    )


def export_scales(path_or_tree: str | os.PathLike | StoreVersion | xr.DataTree,
                  filters: Sequence[str] | None = None) -> dict[str, dict]:
    """The scales mapping of every group (or of ``filters``): ``{filter: {"expScale": ..., "detScale": ...}}``.

    Parameters
    ----------
    path_or_tree : path-like, StoreVersion or DataTree
        A complete store (verified with :func:`flatnorm_dask.store.verify_store`, opened with
        :func:`flatnorm_dask.store.open_store`) or a tree shaped like one.
    filters : sequence of str, optional
        Only these groups, in this order; an unknown name is an error.

    Returns
    -------
    dict
        Per filter, :func:`flatnorm_dask.records.scales_dict` of the group's coordinates and scales: plain
        ints (detector, exposure), strs (amplifier) and floats.  An exposure whose E is not finite (no usable
        cell: see :func:`exposures_left_out`) is absent from ``expScale`` for every detector and amplifier.
    """
    source, groups = _groups(path_or_tree, filters)
    return {name: _scales(ds, f"{source}group {name}") for name, ds in groups.items()}


def exposures_left_out(ds: xr.Dataset) -> list[dict[str, Any]]:
    """The exposures of one group that the scales leave out, and why: ``[{"exposure": id, "reason": text}]``.

    An exposure is left out when :func:`flatnorm_dask.records.kept_exposures` says so (its E is not finite:
    no cell of it entered the fit).  The reason counts its detectors by what kept them out: no file (absent),
    a masked file (listed in the group's ``problems``), a file without a finite positive statistic and
    count at the fit's level, or every usable cell clipped.

    Parameters
    ----------
    ds : xarray.Dataset
        A group as :func:`flatnorm_dask.workflow.scale_dataset` builds it (``exp_scale``, ``status``,
        ``background``, ``weight``, ``used``); only the left-out exposures' cells are computed.
    """
    from ..ingest import ABSENT, OK
    from ..records import kept_exposures
    from ..solver import usable_cells

    left = np.flatnonzero(~kept_exposures(ds["exp_scale"].values))
    if left.size == 0:
        return []
    cells = ds[["status", "background", "weight", "used"]].isel(exposure=left).load()
    amp_dims = [d for d in cells["background"].dims if d not in ("detector", "exposure")]  # AMP level: amp

    def per_detector(cell: xr.DataArray) -> np.ndarray:
        return (cell.any(amp_dims) if amp_dims else cell).transpose("detector", "exposure").values

    usable = per_detector(usable_cells(cells["background"], cells["weight"]))
    used = per_detector(cells["used"])
    statuses = cells["status"].transpose("detector", "exposure").values
    out = []
    for j, exposure in enumerate(cells["exposure"].values.tolist()):
        status = statuses[:, j]
        ok = status == OK
        counts = {
            "without a file": int((status == ABSENT).sum()),
            "masked (see problems)": int((~ok & (status != ABSENT)).sum()),
            "without a finite positive statistic and count": int((ok & ~usable[:, j]).sum()),
            "all usable cells clipped": int((ok & usable[:, j] & ~used[:, j]).sum()),
        }
        parts = ", ".join(f"{n} {what}" for what, n in counts.items() if n)
        out.append({"exposure": int(exposure),
                    "reason": f"no usable cell in {status.size} detector(s): {parts}"})
    return out


def scales_yaml_paths(out: str | os.PathLike, filters: Sequence[str]) -> dict[str, Path]:
    """Where the scales YAML of each of ``filters`` goes, by the one rule of ``export`` and ``--scales-yaml``.

    A path ending in ``.yaml`` or ``.yml`` is one file and takes exactly one filter; any other path is a
    directory (created when written) that gets ``<physical_filter>.yaml`` for each filter.

    Raises
    ------
    ValueError
        A ``.yaml`` path for several filters (or none), an existing directory where a file is asked, or a
        target that exists and is not a regular file (a directory, a FIFO, a device).
    OutputPathError
        A target whose directory cannot be made or written (:func:`flatnorm_dask.store.check_output_file`).
    """
    out = Path(out)
    filters = list(filters)
    if out.suffix.lower() in YAML_SUFFIXES:
        if len(filters) != 1:
            raise ValueError(f"{out}: one YAML file holds one physical_filter's scales, and there are "
                             f"{len(filters)} ({', '.join(filters)}): give a directory (each filter gets "
                             "<physical_filter>.yaml) or choose one filter")
        if out.is_dir():
            raise ValueError(f"{out}: is a directory; a path ending in {out.suffix} names one YAML file")
        targets = {filters[0]: out}
    elif out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory (a path without a .yaml suffix is a directory "
                         "that gets <physical_filter>.yaml per filter)")
    else:
        targets = {name: out / f"{name}.yaml" for name in filters}
    for target in targets.values():
        if (target.exists() or target.is_symlink()) and not target.is_file():
            raise ValueError(f"{target}: exists and is not a regular file; it would not be replaced")
        check_output_file(target)  # its directory, or the first one that exists, must be writable
    return targets


class _ScalesDumper(getattr(yaml, "CSafeDumper", yaml.SafeDumper)):  # C emitter: LSSTCam exports are large
    """Safe dumper that never writes anchors/aliases (shared sub-dicts are written out in full)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _write_yaml(data: dict, out_path: Path) -> None:
    """Write beside ``out_path`` and rename into place, so a reader never sees half of it.  A symbolic link
    keeps naming the file, which is replaced; an error names ``out_path``, not the temporary file."""
    target = check_output_file(out_path)
    tmp = staging_path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            yaml.dump(data, f, Dumper=_ScalesDumper, default_flow_style=False, sort_keys=False)
        os.replace(tmp, target)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise OutputPathError(f"{out_path}: cannot write it: {err.strerror or err}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_scales_yaml(path_or_tree: str | os.PathLike | StoreVersion | xr.DataTree, out: str | os.PathLike,
                      filters: Sequence[str] | None = None) -> list[Path]:
    """Write each filter's :func:`export_scales` as its own YAML file, where :func:`scales_yaml_paths` says.

    Parameters
    ----------
    path_or_tree : path-like, StoreVersion or DataTree
        A complete store (verified first), or a tree shaped like one.
    out : path-like
        A directory (``<physical_filter>.yaml`` per filter) or, for one filter, a ``.yaml`` file.
    filters : sequence of str, optional
        Only these filters; default every group of the store.

    Returns
    -------
    list of pathlib.Path
        The files written, in the store's group order.  Each holds ``{"expScale": ..., "detScale": ...}``
        with int keys and float values; ``yaml.safe_load`` reads it back.
    """
    source, groups = _groups(path_or_tree, filters)
    targets = scales_yaml_paths(out, list(groups))  # checked before anything is computed or written
    data = {name: _scales(ds, f"{source}group {name}") for name, ds in groups.items()}
    for name, target in targets.items():
        _write_yaml(data[name], target)
    return list(targets.values())
