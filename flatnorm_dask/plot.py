"""Figures from a store's per-filter Dataset: focal-plane map of G, E per exposure, residual map and histogram.

Each function takes the Dataset of one filter (``open_store(path)[filter].to_dataset()``) and returns a
matplotlib Figure; masked cells stay visible as such (grey), never as a colour of the scale.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["exposure_scales", "focal_plane", "plot_store", "residual_histogram", "residual_map"]

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


def focal_plane(ds, camera: Any = None, *, label: bool = True):
    """Map of G over the focal plane: one tile per detector, or per amplifier at amplifier level.

    Parameters
    ----------
    ds : xarray.Dataset
        One filter of a store (``det_scale`` with dims (detector,) or (detector, amp)).
    camera : Camera or str, optional
        Geometry; by default the store's ``camera`` attribute, else LSSTCam.
    label : bool
        Write detector names on the tiles.

    Returns
    -------
    matplotlib.figure.Figure
        Its first axes holds one ``PatchCollection`` whose array lists the scales tile by tile, in the
        order of ``ds.detector`` (and ``ds.amp`` within a detector); NaN tiles are masked, and so are
        rows without a used cell, whose G is only the fill value (the mean of the others).
    """
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    cam = _camera_of(ds, camera)
    scale = ds["det_scale"]
    if "used" in ds:
        scale = scale.where(ds["used"].any("exposure"))
    scale = scale.load()
    det_ids = scale["detector"].values
    index = {int(d): i for i, d in enumerate(cam.detector)}
    missing = [int(d) for d in det_ids if int(d) not in index]
    if missing:
        raise ValueError(f"detectors {missing[:5]} are not in camera {cam.name!r}")
    size = cam.detector_size_mm
    patches, values = [], []
    per_amp = "amp" in scale.dims
    if per_amp:
        amp_pos = {name: (int(c), int(r)) for name, c, r in zip(cam.amp_names, cam.amp_col, cam.amp_row)}
        n_col, n_row = int(np.max(cam.amp_col)) + 1, int(np.max(cam.amp_row)) + 1
        scale = scale.transpose("detector", "amp")
    for k, det in enumerate(det_ids):
        i = index[int(det)]
        x0, y0 = cam.x_mm[i] - size / 2, cam.y_mm[i] - size / 2
        if per_amp:
            for a, amp in enumerate(scale["amp"].values):
                col, row = amp_pos[str(amp)]
                w, h = size / n_col, size / n_row
                patches.append(Rectangle((x0 + col * w, y0 + row * h), w, h))
                values.append(scale.values[k, a])
        else:
            patches.append(Rectangle((x0, y0), size, size))
            values.append(scale.values[k])
    fig = _figure(figsize=(8, 7), layout="constrained")
    ax = fig.add_subplot()
    tiles = PatchCollection(patches, cmap=_cmap(), edgecolor="none")
    tiles.set_array(np.ma.masked_invalid(np.asarray(values, dtype=float)))
    ax.add_collection(tiles)
    if label:
        for det in det_ids:
            i = index[int(det)]
            ax.text(cam.x_mm[i], cam.y_mm[i], str(cam.detector_name[i]), ha="center", va="center",
                    fontsize=4, color="white")
    xs, ys = cam.x_mm[[index[int(d)] for d in det_ids]], cam.y_mm[[index[int(d)] for d in det_ids]]
    ax.set_xlim(xs.min() - size, xs.max() + size)
    ax.set_ylim(ys.min() - size, ys.max() + size)
    ax.set_aspect("equal")
    ax.set_xlabel("focal-plane x (mm)")
    ax.set_ylabel("focal-plane y (mm)")
    fig.colorbar(tiles, ax=ax, label=f"{'amplifier' if per_amp else 'detector'} scale G")
    ax.set_title(f"{ds.attrs.get('physical_filter', '')} G ({cam.name}); grey: no data".strip())
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
