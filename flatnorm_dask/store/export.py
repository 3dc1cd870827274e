"""A store's scales in the structure LSST's flat combination reads: ``cpFlatNormScales`` dicts and YAML."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import yaml

from .read import group_datasets, open_tree
from .transaction import StoreError, staging_path

__all__ = ["export_scales", "write_scales_yaml"]


def export_scales(path_or_tree: str | os.PathLike | xr.DataTree) -> dict[str, dict]:
    """The ``cpFlatNormScales`` structure of every group: ``{filter: {"expScale": ..., "detScale": ...}}``.

    Parameters
    ----------
    path_or_tree : path-like or DataTree
        A complete store (opened with :func:`flatnorm_dask.store.open_store`) or a tree shaped like one.

    Returns
    -------
    dict
        Per filter, :func:`flatnorm_dask.records.scales_dict` of the group's coordinates and scales: plain
        ints (detector, exposure), strs (amplifier) and floats.
    """
    from ..records import scales_dict

    source = "" if isinstance(path_or_tree, xr.DataTree) else f"{os.fspath(path_or_tree)}: "
    out: dict[str, dict] = {}
    for name, ds in group_datasets(open_tree(path_or_tree)).items():
        where = f"{source}group {name}"
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
    tmp = staging_path(out_path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            yaml.dump(data, f, Dumper=_ScalesDumper, default_flow_style=False, sort_keys=False)
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out_path
