"""Compare campaigns: which detectors' (or amplifiers') scales G moved between stores, and by how much.

:func:`compare` is a pure function of the stores' Datasets (paths are opened with
:func:`flatnorm_dask.store.open_store`); :func:`comparison_summary` is the text ``flatnorm compare`` prints.

Only G is compared.  G is defined up to each campaign's normalisation (a count-weighted mean of one over its
own rows and counts), so the ratio of a store's G to the first (reference) store's is divided by its median
over the rows both stores hold: a few rows that moved do not shift it.  Exposure scales E are not compared:
each campaign's E is its own lamp level.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .schema import LEVELS, split_exposure

if TYPE_CHECKING:
    import xarray as xr

__all__ = ["DEFAULT_THRESHOLD", "EXPOSURE_SCALES_NOTE", "compare", "comparison_summary", "flagged_rows"]

#: Significance (in sigma) beyond which a row counts as moved.
DEFAULT_THRESHOLD = 5.0

EXPOSURE_SCALES_NOTE = ("exposure scales E are not compared: each campaign's E is its own lamp level, so the E "
                        "of different campaigns are not comparable")

_DETECTOR_LEVEL, _AMP_LEVEL = LEVELS


def compare(*stores: str | os.PathLike | xr.DataTree, threshold: float = DEFAULT_THRESHOLD) -> xr.DataTree:
    """Compare the detector (or amplifier) scales G of two or more stores, row by row.

    Parameters
    ----------
    *stores : path-like or DataTree
        Complete stores (opened with :func:`flatnorm_dask.store.open_store`) or trees shaped like one; the
        first is the reference.  A store may be given twice (compared with itself).
    threshold : float
        A row is flagged when its significance exceeds ``threshold`` (in absolute value) in any store.

    Returns
    -------
    xarray.DataTree
        One child per physical filter that every store holds at the same level (DETECTOR or AMP, from
        ``det_scale``'s dims), each a Dataset over the union of the stores' rows (``detector`` ids, and
        ``amp`` names at amplifier level; aligned by id and name) and a ``store`` dimension (labels: the paths
        as given, ``tree N`` for trees, made unique):

        - ``det_scale``, ``det_scale_err``: each store's G and its one-sigma uncertainty, NaN where the row
          is not present;
        - ``present``: the row has a G in the store: ``det_scale`` finite and positive, ``det_scale_err``
          finite and non-negative (a row without a used cell has ``det_scale_err`` NaN: absent);
        - ``ratio``: ``(G / G_reference) / normalisation`` where the row is present in both, the
          normalisation being the ratio's median over those rows (attribute ``normalisation``);
        - ``ratio_err``: ``ratio * hypot(err / G, err_ref / G_ref)`` (the normalisation's own uncertainty,
          about 1.25 sigma / sqrt(rows), is left out);
        - ``significance``: ``(ratio - 1) / ratio_err`` (0 where the ratio is exactly 1);
        - ``flagged`` (rows only): ``|significance| > threshold`` in any store.

        The reference's own entries are ratio 1, uncertainty 0 and significance 0 where it has the row.
        Coordinates: ``detector_name`` (from the stores, else ""), per store ``campaign_time`` (the mean
        observing day of the filter's exposures with a scale, by the exposure-id rule ``day_obs * 100000 +
        seq_num``; else the store's commit time; else NaT) and ``time_source`` (``day_obs``, ``commit`` or
        ``unknown``).  Attributes: ``physical_filter``, ``level``, ``threshold``, ``reference``,
        ``normalisation`` and ``n_shared_rows`` (per store, in ``store`` order), ``camera`` (when a store
        records one) and ``partial_rows``: every row present in some stores but not all (``detector``,
        ``detector_name``, ``amp``, ``present_in``).

        Root attributes: ``stores``, ``reference``, ``threshold``, ``filters`` (compared),
        ``filters_in_some_stores`` (``{filter: [stores holding it]}``), ``levels_differ`` (``{filter:
        {store: level}}``, not compared) and ``exposure_scales``, the note that E is not compared.

    Raises
    ------
    ValueError
        Fewer than two stores, or a threshold that is not a positive number.
    StoreError
        A store that cannot be opened, or a group without ``det_scale`` / ``det_scale_err`` (the message
        names the store and the group).
    """
    import xarray as xr

    from .store import group_datasets, open_tree

    if len(stores) < 2:
        raise ValueError(f"compare needs at least two stores (the first is the reference), got {len(stores)}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.integer, np.floating)) \
            or not (np.isfinite(threshold) and threshold > 0):
        raise ValueError(f"threshold must be a positive number of sigmas, got {threshold!r}")
    threshold = float(threshold)
    labels = _labels(stores)
    trees = [open_tree(s) for s in stores]
    groups = [group_datasets(t) for t in trees]

    every = [name for name in groups[0] if all(name in g for g in groups[1:])]
    levels = [{name: _level(g[name], label, name) for name in every} for g, label in zip(groups, labels)]
    in_some = {name: [label for label, g in zip(labels, groups) if name in g]
               for name in dict.fromkeys(n for g in groups for n in g) if name not in every}
    differ = {name: {label: lv[name] for label, lv in zip(labels, levels)}
              for name in every if len({lv[name] for lv in levels}) > 1}
    compared = [name for name in every if name not in differ]

    children = {name: _compare_filter([g[name] for g in groups], trees, labels, name, levels[0][name], threshold)
                for name in compared}
    root = xr.Dataset(attrs={
        "stores": labels, "reference": labels[0], "threshold": threshold, "filters": compared,
        "filters_in_some_stores": in_some, "levels_differ": differ, "exposure_scales": EXPOSURE_SCALES_NOTE})
    return xr.DataTree.from_dict({"/": root, **children})


def _labels(stores: Sequence[Any]) -> list[str]:
    """A unique label per store: its path as given, or ``tree N``; a repeated one gets `` #N`` (position)."""
    import xarray as xr

    labels: list[str] = []
    for i, store in enumerate(stores, 1):
        label = f"tree {i}" if isinstance(store, xr.DataTree) else os.fspath(store)
        labels.append(f"{label} #{i}" if label in labels else label)
    return labels


def _level(ds: xr.Dataset, label: str, name: str) -> str:
    """The scaling level of a group, from its ``det_scale`` (checked to be there with its uncertainty)."""
    from .store import StoreError

    for var in ("det_scale", "det_scale_err"):
        if var not in ds:
            raise StoreError(f"{label}: group {name}: no {var} variable (not a flatnorm scales store?)")
    dims = ds["det_scale"].dims
    if set(dims) not in ({"detector"}, {"detector", "amp"}) or set(ds["det_scale_err"].dims) != set(dims):
        raise StoreError(f"{label}: group {name}: det_scale has dims {dims}, not (detector[, amp]) with its "
                         "det_scale_err")
    return _AMP_LEVEL if "amp" in dims else _DETECTOR_LEVEL


def _union(values: Sequence[np.ndarray]) -> list:
    """The union of label arrays, in order of first appearance."""
    return list(dict.fromkeys(v for array in values for v in array.tolist()))


def _compare_filter(datasets: list[xr.Dataset], trees: list[xr.DataTree], labels: list[str], name: str,
                    level: str, threshold: float) -> xr.Dataset:
    import xarray as xr

    rows = ["detector", "amp"] if level == _AMP_LEVEL else ["detector"]
    index = {"detector": sorted(int(d) for d in _union([ds["detector"].values for ds in datasets]))}
    if level == _AMP_LEVEL:
        index["amp"] = [str(a) for a in _union([ds["amp"].values for ds in datasets])]

    def aligned(ds: xr.Dataset, var: str) -> np.ndarray:
        da = ds[var].transpose(*rows).reset_coords(drop=True).load()  # names are gathered apart
        da = da.assign_coords({dim: [(str if dim == "amp" else int)(v) for v in da[dim].values] for dim in rows})
        return np.asarray(da.reindex(index).values, dtype=float)

    g = np.stack([aligned(ds, "det_scale") for ds in datasets])
    err = np.stack([aligned(ds, "det_scale_err") for ds in datasets])
    with np.errstate(invalid="ignore"):
        present = np.isfinite(g) & (g > 0) & np.isfinite(err) & (err >= 0)
    g = np.where(present, g, np.nan)
    err = np.where(present, err, np.nan)

    both = present & present[:1]
    with np.errstate(invalid="ignore", divide="ignore"):
        raw = g / g[:1]
        normalisation = np.array([np.median(r[b]) if b.any() else np.nan for r, b in zip(raw, both)])
        ratio = np.where(both, raw / normalisation.reshape((-1,) + (1,) * len(rows)), np.nan)
        relative = err / g
        ratio_err = np.where(both, ratio * np.hypot(relative, relative[:1]), np.nan)
        significance = np.where(ratio == 1.0, 0.0, (ratio - 1.0) / ratio_err)
    ratio_err[0] = np.where(both[0], 0.0, np.nan)  # the reference against itself, exactly
    significance[0] = np.where(both[0], 0.0, np.nan)
    with np.errstate(invalid="ignore"):
        flagged = (np.abs(significance[1:]) > threshold).any(axis=0)

    names = _detector_names(datasets, index["detector"])
    times, sources = zip(*(_campaign_time(ds, tree) for ds, tree in zip(datasets, trees)))
    store_rows = ("store", *rows)
    out = xr.Dataset(
        {
            "det_scale": (store_rows, g, {"long_name": "scale G as stored"}),
            "det_scale_err": (store_rows, err, {"long_name": "one-sigma uncertainty of det_scale"}),
            "present": (store_rows, present, {"long_name": "row has a G in the store"}),
            "ratio": (store_rows, ratio, {"long_name": "G ratio to the reference, normalised"}),
            "ratio_err": (store_rows, ratio_err, {"long_name": "one-sigma uncertainty of ratio"}),
            "significance": (store_rows, significance, {"long_name": "(ratio - 1) / ratio_err"}),
            "flagged": (rows, flagged, {"long_name": f"|significance| > {threshold:g} in a store"}),
        },
        coords={
            "store": labels,
            **index,
            "detector_name": ("detector", names),
            "campaign_time": ("store", np.array(times, dtype="datetime64[s]")),
            "time_source": ("store", list(sources)),
        },
        attrs={
            "physical_filter": name,
            "level": level,
            "threshold": threshold,
            "reference": labels[0],
            "normalisation": normalisation.tolist(),
            "n_shared_rows": both.reshape(len(labels), -1).sum(axis=1).tolist(),
            "partial_rows": _partial_rows(present, labels, index, names),
        },
    )
    camera = next((ds.attrs["camera"] for ds in datasets if ds.attrs.get("camera")), None)
    if camera is not None:
        out.attrs["camera"] = str(camera)
    return out


def _detector_names(datasets: list[xr.Dataset], detectors: list[int]) -> np.ndarray:
    """Each detector's name from the first store that records a non-empty one, else ""."""
    names = dict.fromkeys(detectors, "")
    for ds in reversed(datasets):  # the first store's names win
        if "detector_name" in ds.coords:
            for det, det_name in zip(ds["detector"].values.tolist(), ds["detector_name"].values.tolist()):
                if det_name:
                    names[int(det)] = str(det_name)
    return np.array([names[d] for d in detectors], dtype=str)


def _partial_rows(present: np.ndarray, labels: list[str], index: dict[str, list], names: np.ndarray) -> list[dict]:
    """The rows present in some stores but not all, with where they are."""
    some = present.any(axis=0) & ~present.all(axis=0)
    out = []
    for pos in zip(*np.nonzero(some)):
        row: dict[str, Any] = {"detector": index["detector"][pos[0]], "detector_name": str(names[pos[0]])}
        if "amp" in index:
            row["amp"] = index["amp"][pos[1]]
        row["present_in"] = [label for label, p in zip(labels, present[(slice(None), *pos)]) if p]
        out.append(row)
    return out


def _campaign_time(ds: xr.Dataset, tree: xr.DataTree) -> tuple[np.datetime64, str]:
    """When a store's campaign of one filter was taken: the mean observing day of its exposures with a
    scale (the LSST exposure-id rule), else the store's commit time, else NaT."""
    from .store import COMMIT_ATTR

    exposures = ds["exposure"].values if "exposure" in ds.coords else np.array([], dtype=np.int64)
    if "exp_scale" in ds and exposures.size:
        exposures = exposures[np.isfinite(np.asarray(ds["exp_scale"].values, dtype=float))]
    day_obs, counts = np.unique([split_exposure(e)[0] for e in exposures.tolist()], return_counts=True)
    try:
        days = [dt.datetime.strptime(f"{day:08d}", "%Y%m%d").replace(tzinfo=dt.timezone.utc) for day in day_obs]
    except ValueError:  # not LSST exposure ids: the rule does not apply
        days = []
    if days:
        seconds = np.average([day.timestamp() for day in days], weights=counts)
        return np.datetime64(int(round(seconds)), "s"), "day_obs"
    record = tree.attrs.get(COMMIT_ATTR)
    if isinstance(record, dict) and isinstance(record.get("time"), str):
        try:
            when = dt.datetime.fromisoformat(record["time"])
        except ValueError:
            pass
        else:
            if when.tzinfo is not None:
                when = when.astimezone(dt.timezone.utc).replace(tzinfo=None)
            return np.datetime64(when, "s"), "commit"
    return np.datetime64("NaT", "s"), "unknown"


# --------------------------------------------------------------------------------------------- the report

def _row_label(detector: int, detector_name: str, amp: str | None = None) -> str:
    name = detector_name or f"detector {detector}"
    return name if amp is None else f"{name} {amp}"


def flagged_rows(ds: xr.Dataset) -> xr.Dataset:
    """The flagged rows of one filter's comparison, most significant first.

    Returns
    -------
    xarray.Dataset
        ``ds`` stacked over a ``row`` dimension (detector[, amp]) and reduced to its flagged rows, ordered by
        their largest ``|significance|`` over the stores, with a ``label`` coordinate per row: ``R22_S11
        C10`` (``detector 94 C10`` where the detector has no name; no amplifier at detector level).
    """
    rows = [d for d in ("detector", "amp") if d in ds["flagged"].dims]
    flat = ds.stack(row=rows)
    amps = flat["amp"].values.tolist() if "amp" in rows else [None] * flat.sizes["row"]
    labels = [_row_label(int(d), str(n), None if a is None else str(a))
              for d, n, a in zip(flat["detector"].values.tolist(), flat["detector_name"].values.tolist(), amps)]
    flat = flat.assign_coords(label=("row", labels))
    flat = flat.isel(row=np.flatnonzero(flat["flagged"].values))
    strength = np.abs(flat["significance"].isel(store=slice(1, None))).max("store").values
    return flat.isel(row=np.argsort(-strength, kind="stable"))


def _time_text(time: np.datetime64, source: str) -> str:
    if np.isnat(time):
        return "time unknown"
    text = np.datetime_as_string(time, unit="D" if source == "day_obs" else "s")
    return f"{text} ({source})"


def comparison_summary(tree: xr.DataTree, max_rows: int = 50) -> str:
    """The text of ``flatnorm compare``: per filter the rows compared, the flagged rows (most significant
    first) with their ratios and significances, the rows present in only some stores, and the note on
    exposure scales.  Lists longer than ``max_rows`` are cut, saying how many more there are."""
    attrs = tree.attrs
    stores = list(attrs["stores"])
    lines = [f"comparison of {len(stores)} stores; reference {stores[0]}; threshold {attrs['threshold']:g} sigma"]
    for name, node in tree.children.items():
        ds = node.to_dataset()
        rows = ds["flagged"].dims
        n_rows = int(np.prod([ds.sizes[d] for d in rows]))
        present = ds["present"].transpose("store", *rows).values.reshape(len(stores), -1)
        lines.append(f"{name} ({ds.attrs['level']} level): {int(present.all(axis=0).sum())} of {n_rows} rows in "
                     "every store")
        for k, label in enumerate(stores):
            norm = ds.attrs["normalisation"][k]
            extra = "" if k == 0 else (f"; {ds.attrs['n_shared_rows'][k]} rows shared with the reference, "
                                       f"normalisation {norm:.6g}")
            lines.append(f"  {label}: {_time_text(ds['campaign_time'].values[k], str(ds['time_source'].values[k]))}"
                         f"{extra}")
        moved = flagged_rows(ds)
        n_moved = moved.sizes["row"]
        lines.append(f"  {n_moved} row(s) moved beyond {ds.attrs['threshold']:g} sigma" + (":" if n_moved else ""))
        for row in range(min(n_moved, max_rows)):
            one = moved.isel(row=row)
            parts = [f"{stores[k]} ratio {float(one['ratio'][k]):.5f} +/- {float(one['ratio_err'][k]):.5f} "
                     f"({float(one['significance'][k]):+.1f} sigma)"
                     for k in range(1, len(stores)) if bool(one["present"][k]) and bool(one["present"][0])]
            lines.append(f"    {one['label'].item()}: " + "; ".join(parts))
        if n_moved > max_rows:
            lines.append(f"    ... and {n_moved - max_rows} more")
        partial = ds.attrs["partial_rows"]
        lines.append(f"  {len(partial)} row(s) present in only some stores" + (":" if partial else ""))
        for row in partial[:max_rows]:
            label = _row_label(row["detector"], row["detector_name"], row.get("amp"))
            lines.append(f"    {label}: only in {', '.join(row['present_in'])}")
        if len(partial) > max_rows:
            lines.append(f"    ... and {len(partial) - max_rows} more")
    if not tree.children:
        lines.append("no physical filter is held by every store at the same level: nothing compared")
    for name, holders in attrs["filters_in_some_stores"].items():
        lines.append(f"{name}: not compared, only in {', '.join(holders)}")
    for name, by_store in attrs["levels_differ"].items():
        lines.append(f"{name}: not compared, levels differ ("
                     + ", ".join(f"{label} {level}" for label, level in by_store.items()) + ")")
    lines.append(f"note: {attrs['exposure_scales']}")
    return "\n".join(lines)
