"""The flat-normalisation decomposition, on numpy or dask arrays.

Flat statistics ``B[row, exposure]`` (a row is a detector, or a detector's amplifier) are modelled as
``B = G[row] * E[exposure]`` and fitted in log space by alternating weighted means, the weights being the
pixel counts behind each statistic (Magnier's Pan-STARRS scheme, as used by LSST cp_pipe's
``CpFlatNormalizationTask.measureScales``).

This module is pure: arrays in, arrays out, no I/O and no cluster.  Every operation is an elementwise
ufunc, a ``sum`` or a matrix-vector product, so one implementation serves numpy and dask.  On dask the log
data and weights are persisted once; each iteration then computes one fixed-size graph (two passes over
the weights) and brings back only the row and exposure vectors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["CONVERGENCE_TOL", "ScaleResult", "measure_scales", "usable_cells"]

#: Largest change of log G between iterations below which a fixed-count run is reported converged.
CONVERGENCE_TOL = 1e-8


@dataclass(frozen=True)
class ScaleResult:
    """What :func:`measure_scales` returns.

    Attributes
    ----------
    vectorE : array, (nExposures,)
        Exposure scales E; NaN for an exposure with no usable cell.
    vectorG : array, row shape
        Row (detector or amplifier) scales G; their weighted mean is 1.
    bgModel : array, input shape
        The fitted statistics E x G (numpy for numpy input, lazy dask for dask input).
    used : array of bool, input shape
        Cells that entered the fit.
    iterations : int
        Alternating iterations run (not counting the initial and final E updates).
    converged : bool
        Whether the last change of log G was below ``tol`` (or :data:`CONVERGENCE_TOL` in fixed mode).
    max_change : float
        Largest absolute change of log G in the last iteration.
    tol : float or None
        The tolerance asked for; None in fixed-iteration mode.
    residual_scatter : float
        Weighted RMS of the log residuals ``log(B / model)`` over used cells.
    filled_rows : ndarray of bool, row shape
        Rows with no usable cell, whose G was filled with the mean of the others.
    empty_exposures : ndarray of bool, (nExposures,)
        Exposures with no usable cell (their E is NaN).
    """

    vectorE: Any
    vectorG: Any
    bgModel: Any
    used: Any
    iterations: int
    converged: bool
    max_change: float
    tol: float | None
    residual_scatter: float
    filled_rows: Any
    empty_exposures: Any
    history: tuple[float, ...] = field(default=(), repr=False)


def usable_cells(values, weights):
    """Cells fit for the log-space fit: finite positive value with a finite positive weight."""
    return np.isfinite(values) & (values > 0) & np.isfinite(weights) & (weights > 0)


def _is_dask(x) -> bool:
    return type(x).__module__.startswith("dask.")


def _compute(*arrays):
    """Materialise small results: dask.compute when any input is lazy, identity otherwise."""
    if any(_is_dask(a) for a in arrays):
        import dask

        return dask.compute(*arrays)
    return arrays


def _like(vector: np.ndarray, template, axis: int):
    """``vector`` as an array chunked like ``template`` along ``axis`` (numpy stays numpy)."""
    if _is_dask(template):
        import dask.array as da

        return da.from_array(vector, chunks=(template.chunks[axis],))
    return vector


def measure_scales(
    bgMatrix,
    bgCounts=None,
    iterations: int = 10,
    *,
    tol: float | None = None,
    max_iter: int = 1000,
    exclude=None,
) -> ScaleResult:
    """Decompose flat statistics into exposure and row scales, ``B ~ E x G``.

    Parameters
    ----------
    bgMatrix : array, (nRows, nExposures) or (nDetectors, nAmps, nExposures)
        Statistics (e.g. clipped means) per row and exposure; numpy, dask, or an ``xarray.DataArray``
        (whose ``exposure`` dimension, or else its last one, is the exposure axis).  With three
        dimensions the rows are detector x amplifier, row index ``det * nAmp + amp``.
    bgCounts : array, same shape, optional
        Weights (pixel counts) of each statistic; all ones when omitted.
    iterations : int, optional
        Number of alternating iterations in fixed mode (the reference's default is 10).
    tol : float, optional
        Convergence mode: iterate until the largest change of log G is below ``tol``, at most
        ``max_iter`` times.  ``iterations`` is then ignored.
    max_iter : int, optional
        Iteration limit in convergence mode.
    exclude : array of bool, same shape, optional
        Cells to leave out of the fit in addition to the unusable ones (e.g. clipped outliers).

    Returns
    -------
    ScaleResult
        ``vectorE``, ``vectorG``, ``bgModel`` (= E x G) and diagnostics.  For ``xarray`` input the
        arrays are labelled DataArrays.

    Notes
    -----
    A cell is used when its value is finite and positive and its weight finite and positive (and not
    excluded); an unusable cell leaves both the numerator and the denominator of every weighted mean.
    With finite data and the default iteration count the result equals the reference algorithm's:
    the same initial E, the same order of the G update, the fill of empty rows with the unweighted mean
    of the others, the E update, the normalisation of G to a count-weighted mean of one, and a final E
    update.
    """
    if tol is None and (not isinstance(iterations, (int, np.integer)) or iterations < 0):
        raise ValueError(f"iterations must be a non-negative integer, got {iterations!r}")
    if tol is not None and not tol > 0:
        raise ValueError(f"tol must be positive, got {tol!r}")
    if hasattr(bgMatrix, "dims") and hasattr(bgMatrix, "coords"):
        return _measure_labelled(bgMatrix, bgCounts, iterations, tol=tol, max_iter=max_iter, exclude=exclude)

    shape = bgMatrix.shape
    if len(shape) not in (2, 3):
        raise ValueError(f"bgMatrix must have 2 or 3 dimensions, got shape {shape}")
    for name, other in (("bgCounts", bgCounts), ("exclude", exclude)):
        if other is not None and other.shape != shape:
            raise ValueError(f"{name} shape {other.shape} differs from bgMatrix shape {shape}")
    values, weights, skip = (_rows(a) if a is not None else None for a in (bgMatrix, bgCounts, exclude))
    if weights is None:
        weights = np.ones_like(values, dtype=float)
    fit = _solve(values, weights, skip, iterations, tol, max_iter)
    if len(shape) == 3:
        fit = _unflatten(fit, shape)
    return fit


def _rows(a):
    """View a (det, amp, exp) array as (det * amp, exp) rows; 2-D arrays pass through."""
    if a.ndim == 2:
        return a
    if _is_dask(a):
        a = a.rechunk({1: -1})  # merging two axes needs the inner one whole
    return a.reshape(a.shape[0] * a.shape[1], a.shape[2])


def _unflatten(fit: ScaleResult, shape: tuple[int, ...]) -> ScaleResult:
    row_shape = shape[:2]
    return ScaleResult(
        vectorE=fit.vectorE,
        vectorG=fit.vectorG.reshape(row_shape),
        bgModel=fit.bgModel.reshape(shape),
        used=fit.used.reshape(shape),
        iterations=fit.iterations,
        converged=fit.converged,
        max_change=fit.max_change,
        tol=fit.tol,
        residual_scatter=fit.residual_scatter,
        filled_rows=fit.filled_rows.reshape(row_shape),
        empty_exposures=fit.empty_exposures,
        history=fit.history,
    )


def _solve(values, weights, exclude, iterations, tol, max_iter) -> ScaleResult:
    used = usable_cells(values, weights)
    if exclude is not None:
        used = used & ~exclude.astype(bool)
    # Unused cells carry weight 0 and log value 0, so they vanish from every sum.
    log_b = np.where(used, np.log(np.where(used, values, 1.0)), 0.0)
    w = np.where(used, weights, 0).astype(np.float64)
    if _is_dask(w):
        import dask

        log_b, w, used = dask.persist(log_b, w, used)

    wl = w * log_b
    row_w, col_w, row_wl, col_wl = (np.asarray(v, dtype=np.float64) for v in _compute(
        w.sum(axis=1), w.sum(axis=0), wl.sum(axis=1), wl.sum(axis=0)))
    filled = row_w == 0
    empty = col_w == 0
    if filled.all():
        raise ValueError("no usable cell: every value is non-finite or non-positive, or has no weight")
    live_rows = ~filled
    # NaN instead of 0 in the denominators: part of the division runs in worker tasks, outside any errstate.
    row_w_safe = np.where(filled, np.nan, row_w)

    with np.errstate(invalid="ignore", divide="ignore"):
        def update_e(g_sum):
            return (col_wl - g_sum) / col_w

        log_e = update_e(0.0)  # initial G = 1
        log_g = np.zeros(row_w.shape)
        history: list[float] = []
        limit = max_iter if tol is not None else iterations
        for _ in range(limit):
            e_known = np.where(empty, 0.0, log_e)  # an empty exposure's column has no weight anyway
            g_new = (row_wl - w @ e_known) / row_w_safe
            # Rows without weight drop out of W^T g, so the fill below cannot change it: both passes
            # over W go in one graph and one round trip.
            g_new, g_sum = _compute(g_new, w.T @ np.where(live_rows, g_new, 0.0))
            g_new = np.array(g_new, dtype=np.float64)
            if filled.any():
                g_new[filled] = g_new[live_rows].mean()
            log_e = update_e(np.asarray(g_sum, dtype=np.float64))
            flux = np.sum(row_w * np.exp(g_new)) / np.sum(row_w)
            g_new -= np.log(flux)
            history.append(float(np.max(np.abs(g_new - log_g))))
            log_g = g_new
            if tol is not None and history[-1] < tol:
                break
        (g_sum,) = _compute(w.T @ np.where(live_rows, log_g, 0.0))
        log_e = update_e(np.asarray(g_sum, dtype=np.float64))

        e_known = np.where(empty, 0.0, log_e)
        e_lazy, g_lazy = _like(e_known, w, 1), _like(log_g, w, 0)
        resid = log_b - e_lazy[None, :] - g_lazy[:, None]
        (sq,) = _compute((w * resid * resid).sum())
        scatter = float(np.sqrt(sq / row_w.sum()))
        model = np.exp(_like(log_e, w, 1)[None, :] + g_lazy[:, None])

    max_change = history[-1] if history else float("nan")
    return ScaleResult(
        vectorE=np.exp(log_e),
        vectorG=np.exp(log_g),
        bgModel=model,
        used=used,
        iterations=len(history),
        converged=bool(max_change < (tol if tol is not None else CONVERGENCE_TOL)),
        max_change=max_change,
        tol=tol,
        residual_scatter=scatter,
        filled_rows=filled,
        empty_exposures=empty,
        history=tuple(history),
    )


def _measure_labelled(da_in, counts, iterations, **kwargs) -> ScaleResult:
    """xarray front end: solve on the underlying arrays, return labelled results."""
    import xarray as xr

    exp_dim = "exposure" if "exposure" in da_in.dims else da_in.dims[-1]
    row_dims = tuple(d for d in da_in.dims if d != exp_dim)
    order = (*row_dims, exp_dim)
    values = da_in.transpose(*order)

    def raw(x):
        if x is None:
            return None
        return x.transpose(*order).data if isinstance(x, xr.DataArray) else x

    fit = measure_scales(values.data, raw(counts), iterations,
                         exclude=raw(kwargs.pop("exclude")), **kwargs)
    row_coords = {d: values[d] for d in row_dims if d in values.coords}
    exp_coords = {exp_dim: values[exp_dim]} if exp_dim in values.coords else {}

    def full(x, name):
        return xr.DataArray(x, dims=order, coords=values.coords, name=name)

    return ScaleResult(
        vectorE=xr.DataArray(fit.vectorE, dims=(exp_dim,), coords=exp_coords, name="exp_scale"),
        vectorG=xr.DataArray(fit.vectorG, dims=row_dims, coords=row_coords, name="det_scale"),
        bgModel=full(fit.bgModel, "model"),
        used=full(fit.used, "used"),
        iterations=fit.iterations,
        converged=fit.converged,
        max_change=fit.max_change,
        tol=fit.tol,
        residual_scatter=fit.residual_scatter,
        filled_rows=xr.DataArray(fit.filled_rows, dims=row_dims, coords=row_coords),
        empty_exposures=xr.DataArray(fit.empty_exposures, dims=(exp_dim,), coords=exp_coords),
        history=fit.history,
    )
