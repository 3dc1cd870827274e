"""Figures from a store's per-filter Dataset: focal-plane map of G, E per exposure, residual map and histogram;
and from a comparison of stores (:func:`flatnorm_dask.compare`): the focal-plane map of the G ratio and the
flagged rows' G against campaign time.

Each function takes the Dataset of one filter (``open_store(path)[filter].to_dataset()``, or a comparison's
child) and returns a matplotlib Figure; masked cells stay visible as such (grey), never as a colour of the scale.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["exposure_scales", "flagged_history", "focal_plane", "plot_comparison", "plot_store",
           "residual_histogram", "residual_map"]

MASKED_COLOUR = "0.75"


def _figure(**kwargs):
    from matplotlib.figure import Figure

    return Figure(**kwargs)  # no pyplot: no global state, no GUI backend needed


def _camera_of(ds, camera):
    from .camera import load_camera

    if camera is None:
        camera = ds.attrs.get("camera") or "lsstcam"
    return load_camera(camera) if isinstance(camera, (str, os.PathLike)) else camera


def _cmap(name: str = "viridis"):
    import matplotlib

    return matplotlib.colormaps[name].with_extremes(bad=MASKED_COLOUR)


def focal_plane(ds, camera: Any = None, *, variable: str = "det_scale", label: bool = True,
                outline: str | None = None, centre: float | None = None, title: str | None = None):
    """Map of a per-row variable (G by default) over the focal plane: one tile per detector, or per amplifier.

    Parameters
    ----------
    ds : xarray.Dataset
        One filter of a store, or of a comparison (:func:`flatnorm_dask.compare`, one store selected), with
        ``variable`` over dims (detector,) or (detector, amp).
    camera : Camera or str, optional
        Geometry; by default the Dataset's ``camera`` attribute, else LSSTCam.
    variable : str
        The variable shown (``det_scale``, ``row_rms``, a comparison's ``ratio``...); its ``long_name``
        labels the colour bar.
    label : bool
        Write detector names on the tiles.
    outline : str, optional
        A boolean per-row variable (e.g. a comparison's ``flagged``) whose true rows are outlined in black.
    centre : float, optional
        Centre a diverging colour scale here (e.g. 1 for a ratio), symmetric over the data.
    title : str, optional
        Title; by default the filter, the variable and the camera.

    Returns
    -------
    matplotlib.figure.Figure
        Its first axes holds one ``PatchCollection`` whose array lists the values tile by tile, in the
        order of ``ds.detector`` (and ``ds.amp`` within a detector); NaN tiles are masked, and so are
        rows of a store without a used cell, whose G is only the fill value (the mean of the others).  With
        ``outline``, a second collection holds the outlines, in the same order.
    """
    from matplotlib.collections import PatchCollection
    from matplotlib.colors import CenteredNorm
    from matplotlib.patches import Rectangle

    cam = _camera_of(ds, camera)
    values_da = ds[variable]
    rows = [d for d in ("detector", "amp") if d in values_da.dims]
    if set(values_da.dims) != set(rows):
        raise ValueError(f"{variable} has dims {values_da.dims}; a focal-plane map needs (detector[, amp])")
    if "used" in ds and "exposure" in ds["used"].dims:
        values_da = values_da.where(ds["used"].any("exposure"))
    values_da = values_da.transpose(*rows).load()
    marked = ds[outline].transpose(*rows).values.astype(bool) if outline is not None else None
    det_ids = values_da["detector"].values
    index = {int(d): i for i, d in enumerate(cam.detector)}
    missing = [int(d) for d in det_ids if int(d) not in index]
    if missing:
        raise ValueError(f"detectors {missing[:5]} are not in camera {cam.name!r}")
    size = cam.detector_size_mm
    patches, values, edges = [], [], []
    per_amp = "amp" in rows
    if per_amp:
        amp_pos = {name: (int(c), int(r)) for name, c, r in zip(cam.amp_names, cam.amp_col, cam.amp_row)}
        n_col, n_row = int(np.max(cam.amp_col)) + 1, int(np.max(cam.amp_row)) + 1
        unknown = [str(a) for a in values_da["amp"].values if str(a) not in amp_pos]
        if unknown:
            raise ValueError(f"amplifiers {unknown[:5]} are not in camera {cam.name!r}")
    for k, det in enumerate(det_ids):
        i = index[int(det)]
        x0, y0 = cam.x_mm[i] - size / 2, cam.y_mm[i] - size / 2
        if per_amp:
            for a, amp in enumerate(values_da["amp"].values):
                col, row = amp_pos[str(amp)]
                w, h = size / n_col, size / n_row
                patches.append(Rectangle((x0 + col * w, y0 + row * h), w, h))
                values.append(values_da.values[k, a])
                if marked is not None and marked[k, a]:
                    edges.append(Rectangle((x0 + col * w, y0 + row * h), w, h))
        else:
            patches.append(Rectangle((x0, y0), size, size))
            values.append(values_da.values[k])
            if marked is not None and marked[k]:
                edges.append(Rectangle((x0, y0), size, size))
    fig = _figure(figsize=(8, 7), layout="constrained")
    ax = fig.add_subplot()
    shown = np.ma.masked_invalid(np.asarray(values, dtype=float))
    norm = CenteredNorm(vcenter=centre) if centre is not None else None
    tiles = PatchCollection(patches, cmap=_cmap("RdBu_r" if centre is not None else "viridis"), norm=norm,
                            edgecolor="none")
    tiles.set_array(shown)
    ax.add_collection(tiles)
    if marked is not None:
        ax.add_collection(PatchCollection(edges, facecolor="none", edgecolor="black", linewidth=1.2))
    if label:
        for det in det_ids:
            i = index[int(det)]
            ax.text(cam.x_mm[i], cam.y_mm[i], str(cam.detector_name[i]), ha="center", va="center",
                    fontsize=4, color="white" if centre is None else "0.3")
    xs, ys = cam.x_mm[[index[int(d)] for d in det_ids]], cam.y_mm[[index[int(d)] for d in det_ids]]
    ax.set_xlim(xs.min() - size, xs.max() + size)
    ax.set_ylim(ys.min() - size, ys.max() + size)
    ax.set_aspect("equal")
    ax.set_xlabel("focal-plane x (mm)")
    ax.set_ylabel("focal-plane y (mm)")
    what = values_da.attrs.get("long_name") or (
        f"{'amplifier' if per_amp else 'detector'} scale G" if variable == "det_scale" else variable)
    fig.colorbar(tiles, ax=ax, label=what)
    if title is None:
        short = "G" if variable == "det_scale" else variable
        title = f"{ds.attrs.get('physical_filter', '')} {short} ({cam.name}); grey: no data".strip()
    ax.set_title(title)
    return fig


def exposure_scales(ds):
    """E against exposure id; exposures without data are marked at the bottom axis."""
    e = ds["exp_scale"].load()
    fig = _figure(figsize=(8, 4), layout="constrained")
    ax = fig.add_subplot()
    ids = e["exposure"].values
    ax.plot(ids, e.values, "o-", ms=3)
    bad = ~np.isfinite(e.values)
    if bad.any():
        ax.plot(ids[bad], np.full(bad.sum(), np.nanmin(e.values)), "x", color="red", label="no data")
        ax.legend()
    ax.set_xlabel("exposure id")
    ax.set_ylabel("exposure scale E")
    ax.ticklabel_format(axis="x", useOffset=False, style="plain")
    ax.set_title(f"{ds.attrs.get('physical_filter', '')} exposure scales".strip())
    return fig


def _rows(da):
    """Residual-like (detector[, amp], exposure) array as a 2-D (row, exposure) numpy array."""
    rows = [d for d in da.dims if d != "exposure"]
    return da.transpose(*rows, "exposure").values.reshape(-1, da.sizes["exposure"])


def residual_map(ds):
    """Heat map of log residuals, rows (detector or detector x amp) by exposure; unused cells grey."""
    resid = _rows(ds["residual"])
    used = _rows(ds["used"]).astype(bool)
    shown = np.ma.masked_where(~used | ~np.isfinite(resid), resid)
    lim = float(np.nanpercentile(np.abs(resid[used]), 99)) if used.any() else 1.0
    fig = _figure(figsize=(8, 6), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(shown, aspect="auto", interpolation="nearest", cmap=_cmap("RdBu_r"), vmin=-lim, vmax=lim)
    fig.colorbar(image, ax=ax, label="log(background / model)")
    ax.set_xlabel("exposure index")
    ax.set_ylabel("row (detector" + (" x amp)" if "amp" in ds["residual"].dims else ")"))
    ax.set_title(f"{ds.attrs.get('physical_filter', '')} residuals; grey: not used".strip())
    return fig


def residual_histogram(ds, bins: int = 80):
    """Histogram of log residuals: used cells, and usable cells left out of the fit (clipped).

    The store's ``residual`` is defined on every usable cell; ``used`` says which entered the fit.
    """
    resid = _rows(ds["residual"])
    used = _rows(ds["used"]).astype(bool)
    has_residual = np.isfinite(resid)
    kept, left_out = resid[used & has_residual], resid[~used & has_residual]
    fig = _figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    edges = np.histogram_bin_edges(np.concatenate([kept, left_out]), bins)
    ax.hist(kept, bins=edges, label=f"used ({kept.size})", color="C0")
    if left_out.size:
        ax.hist(left_out, bins=edges, label=f"left out ({left_out.size})", color="C3", alpha=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("log(background / model)")
    ax.set_ylabel("cells")
    ax.legend()
    ax.set_title(f"{ds.attrs.get('physical_filter', '')} residual distribution".strip())
    return fig


def plot_store(store: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """Write every figure of every filter of a (complete) store as PNG; return the paths.

    The camera is the one the store's recorded config names (else each group's ``camera`` attribute, else
    LSSTCam).
    """
    from .store import group_datasets, open_store, stored_config

    tree = open_store(store)
    cfg = stored_config(tree, store)
    camera = cfg.input.camera if cfg is not None else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, ds in group_datasets(tree).items():
        for kind, fig in (("focal_plane", focal_plane(ds, camera)), ("exposure_scales", exposure_scales(ds)),
                          ("residual_map", residual_map(ds)), ("residual_hist", residual_histogram(ds))):
            path = out / f"{name}_{kind}.png"
            fig.savefig(path, dpi=120)
            written.append(path)
    return written


def flagged_history(ds, max_rows: int = 12):
    """Each flagged row's G against campaign time, with one-sigma error bars: one panel per row.

    ``ds`` is one filter of :func:`flatnorm_dask.compare`.  Every store's G is put on the reference's
    normalisation (divided by the store's ``normalisation``), so that only the row's own change shows.  The
    ``max_rows`` most significant flagged rows are drawn, most significant first (the title says when there
    are more); stores without a campaign time or without the row are left out of its panel.

    Returns
    -------
    matplotlib.figure.Figure
        ``axes[k]`` is the k-th row's panel, titled with its label; ``axes[k].containers[0].lines[0]`` holds
        its points (campaign times, normalised G).  Without flagged rows, one empty panel says so.
    """
    from matplotlib.dates import AutoDateLocator, ConciseDateFormatter

    from .compare import flagged_rows

    moved = flagged_rows(ds)
    n_moved = moved.sizes["row"]
    n_shown = min(n_moved, max_rows)
    norm = np.asarray(ds.attrs["normalisation"], dtype=float)
    times = ds["campaign_time"].values
    n_cols = min(max(n_shown, 1), 3)
    n_rows = max(1, -(-n_shown // n_cols))
    fig = _figure(figsize=(4 * n_cols, 1 + 2.6 * n_rows), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, sharex=True, squeeze=False).ravel()
    for row, ax in zip(range(n_shown), axes):
        one = moved.isel(row=row)
        g, err = one["det_scale"].values / norm, one["det_scale_err"].values / norm
        keep = np.isfinite(g) & ~np.isnat(times)
        ax.errorbar(times[keep], g[keep], yerr=err[keep], marker="o", capsize=3)
        ax.set_title(one["label"].item(), fontsize="medium")
        ax.ticklabel_format(axis="y", useOffset=False)
        locator = AutoDateLocator(maxticks=5)
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))
    for ax in axes[n_shown:]:
        if n_shown:
            ax.set_axis_off()
        else:
            ax.text(0.5, 0.5, "no row moved beyond the threshold", ha="center", va="center", transform=ax.transAxes)
    fig.supxlabel("campaign time")
    fig.supylabel("G (on the reference's normalisation)")
    more = f", the {max_rows} most significant shown" if n_moved > max_rows else ""
    fig.suptitle(f"{ds.attrs.get('physical_filter', '')}: the {n_moved} flagged row(s){more}".strip())
    return fig


def plot_comparison(tree, out_dir: str | os.PathLike, camera: Any = None) -> list[Path]:
    """Write the figures of a comparison (:func:`flatnorm_dask.compare`) as PNG; return the paths.

    Per filter: ``{filter}_ratio_{k}.png``, the focal-plane map of the G ratio of store ``k`` (1, 2, ... in
    the order given) to the reference, flagged rows outlined; with three or more stores also
    ``{filter}_flagged_history.png`` (:func:`flagged_history`).  The camera is ``camera``, else each
    filter's ``camera`` attribute, else LSSTCam.
    """
    from .store import group_datasets

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, ds in group_datasets(tree).items():
        stores = ds["store"].values.tolist()
        figures = []
        for k, store in enumerate(stores[1:], 1):
            title = f"{name}: G ratio {store} / {stores[0]}\nnormalised; outlined: flagged rows"
            figures.append((f"ratio_{k}", focal_plane(ds.sel(store=store), camera, variable="ratio",
                                                      outline="flagged", centre=1.0, title=title)))
        if len(stores) >= 3:
            figures.append(("flagged_history", flagged_history(ds)))
        for kind, fig in figures:
            path = out / f"{name}_{kind}.png"
            fig.savefig(path, dpi=120)
            written.append(path)
    return written
