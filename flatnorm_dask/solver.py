"""The flat-normalisation decomposition, on numpy or dask arrays.

Flat statistics ``B[row, exposure]`` (a row is a detector, or a detector's amplifier) are modelled as
``B = G[row] * E[exposure]`` and fitted in log space by alternating weighted means, the weights being the
pixel counts behind each statistic (Magnier's Pan-STARRS scheme, as used by LSST cp_pipe's
``CpFlatNormalizationTask.measureScales``).

This module is pure: arrays in, arrays out, no I/O and no cluster.  Every operation is an elementwise
ufunc, a ``sum`` or a matrix-vector product, so one implementation serves numpy and dask.  On dask the log
data and weights are persisted once (unless ``persist=False``; :func:`memory_bytes` says what that holds);
each iteration then computes one fixed-size graph (two passes over the weights) and brings back only the row
and exposure vectors.

The fit's diagnostics are defined here and nowhere else: the residual ``log(B / model)`` of every usable
cell (lazy on dask), its weighted scatter over the cells that entered the fit, and that scatter per row and
per exposure.

A fit never returns non-finite numbers where the input had usable cells: weights too large for the sums
(:func:`max_weight`) and any non-finite scale, scatter or uncertainty of a row or exposure with usable cells
raise :class:`FitError`, naming the rows and exposures concerned.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["CONVERGENCE_TOL", "FitError", "ScaleResult", "max_weight", "measure_scales", "memory_bytes",
           "usable_cells"]

#: Largest change of log G between iterations below which a fixed-count run is reported converged.
CONVERGENCE_TOL = 1e-8

#: Per cell, what the solver keeps in memory while it iterates on persisted inputs: the log value and the
#: weight (float64) and the mask of cells in the fit (bool); a robust fit also keeps each round's weights
#: (float64), its clipped mask (bool) and, while it looks for outliers, the residual (float64).
#: :func:`_solve` and :func:`_outliers` persist exactly these.
_HELD_PER_CELL = (np.float64, np.float64, np.bool_)
_HELD_PER_CELL_CLIPPING = (np.float64, np.bool_, np.float64)


class FitError(ValueError):
    """The fit cannot give finite numbers for its input: no usable cell, a weight too large for the sums, or a
    non-finite scale, scatter or uncertainty.

    ``problem`` says what went wrong; ``rows`` and ``exposures`` are the indices concerned (rows numbered as
    the solver does, ``det * nAmp + amp`` for three-dimensional input), named in the message.
    """

    def __init__(self, problem: str, rows: Sequence[int] = (), exposures: Sequence[int] = (), *,
                 row_name=None, exposure_name=None):
        self.problem = problem
        self.rows = tuple(int(i) for i in rows)
        self.exposures = tuple(int(j) for j in exposures)
        where = [_listed(self.rows, row_name or "row {}".format),
                 _listed(self.exposures, exposure_name or "exposure {}".format)]
        where = [w for w in where if w]
        super().__init__(problem + (f" ({'; '.join(where)})" if where else ""))

    def named(self, row_name, exposure_name) -> FitError:
        """The same error, its rows and exposures named by ``row_name(i)`` and ``exposure_name(j)``."""
        return FitError(self.problem, self.rows, self.exposures, row_name=row_name, exposure_name=exposure_name)


def _listed(indices: tuple[int, ...], name, most: int = 3) -> str:
    shown = ", ".join(name(i) for i in indices[:most])
    return shown + (f" and {len(indices) - most} more" if len(indices) > most else "")


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
        Weighted RMS of ``residual`` over used cells.
    residual : array, input shape
        ``log(B / model)`` on every usable cell (finite positive value and weight), NaN elsewhere: a clipped
        or excluded cell keeps its residual, and ``used`` says which cells entered the fit.  Lazy (dask) for
        dask input.
    row_rms : ndarray, row shape
        Weighted RMS of ``residual`` over each row's used cells; NaN for filled rows.
    exp_rms : ndarray, (nExposures,)
        Weighted RMS of ``residual`` over each exposure's used cells; NaN for empty exposures.
    filled_rows : ndarray of bool, row shape
        Rows with no usable cell, whose G was filled with the mean of the others.
    empty_exposures : ndarray of bool, (nExposures,)
        Exposures with no usable cell (their E is NaN).
    errorE : ndarray, (nExposures,)
        One-sigma uncertainty of each E (see Notes of :func:`measure_scales`); NaN for empty exposures, and
        everywhere when the fit has no degree of freedom left (no more used cells than free parameters).
    errorG : ndarray, row shape
        One-sigma uncertainty of each G; NaN for filled rows (and without a degree of freedom).
    clipped : array of bool, input shape
        Usable cells rejected as outliers (all False without clipping).
    clip_rounds : int
        Rejection rounds run (0 without clipping).
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
    residual: Any
    row_rms: Any
    exp_rms: Any
    filled_rows: Any
    empty_exposures: Any
    errorE: Any = None
    errorG: Any = None
    clipped: Any = None
    clip_rounds: int = 0
    history: tuple[float, ...] = field(default=(), repr=False)


# Which ScaleResult fields have the shape of a cell, of a row and of the exposure axis.
_CELL_FIELDS = ("bgModel", "residual", "used", "clipped")
_ROW_FIELDS = ("vectorG", "errorG", "row_rms", "filled_rows")
_EXP_FIELDS = ("vectorE", "errorE", "exp_rms", "empty_exposures")


def usable_cells(values, weights):
    """Cells fit for the log-space fit: finite positive value with a finite positive weight."""
    return np.isfinite(values) & (values > 0) & np.isfinite(weights) & (weights > 0)


def max_weight(n_cells: int) -> float:
    """The largest weight a fit of ``n_cells`` cells accepts: ``sqrt(float64 max / n_cells) / 2``.

    With every weight at most this, none of the fit's sums can overflow: ``n`` weights, or squared weights
    (the uncertainties), sum to at most a quarter of the largest float64, and weights times a log value or a
    squared residual (at most about 745 and 2.2e6) stay far below it.  That is 6.7e150 for a million cells:
    no pixel count comes near it, but a corrupt one (1e200) does, and would otherwise make every scale of
    the fit NaN or wrong.
    """
    return math.sqrt(np.finfo(np.float64).max / max(1, int(n_cells))) / 2


def memory_bytes(shape: Sequence[int], *, clipping: bool = False) -> int:
    """Bytes the solver holds in memory (on dask: in the workers') while it fits an input of ``shape`` with
    ``persist=True``.

    Parameters
    ----------
    shape : sequence of int
        The shape of ``bgMatrix``.
    clipping : bool
        Whether the fit is robust (``clip_sigma`` given), which keeps each round's weights and mask too.

    Returns
    -------
    int
    """
    held = _HELD_PER_CELL + (_HELD_PER_CELL_CLIPPING if clipping else ())
    return math.prod(int(n) for n in shape) * sum(np.dtype(t).itemsize for t in held)


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

        if _is_dask(vector):
            return vector.rechunk((template.chunks[axis],))
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
    clip_sigma: float | None = None,
    clip_rounds: int = 5,
    persist: bool = True,
    initial_g=None,
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
        Cells to leave out of the fit in addition to the unusable ones.
    clip_sigma : float, optional
        Robust fit: after each fit, reject usable cells whose weight-normalised log residual lies more than
        ``clip_sigma`` robust standard deviations (1.4826 x MAD) from the median, and fit again, until the
        rejected set stops changing or after ``clip_rounds`` rounds.  None (default): the plain fit.
    clip_rounds : int, optional
        Most rejection rounds.
    persist : bool, optional
        Dask input only: keep the log values and weights in the cluster's memory for the iterations
        (fastest), or recompute them from the input's own source (e.g. a Zarr store) at every pass, so that
        worker memory stays bounded by the chunk size whatever the campaign's size.
    initial_g : array, row shape, optional
        Warm start: row scales G to start the iterations from (e.g. those of an earlier fit of part of the
        same data), instead of 1.  NaN (or a non-positive value) marks a row without a starting value (a new
        detector, say), which starts at the geometric mean of the given ones.  E needs no starting value:
        the first step computes it from G exactly, as every later step does.  For ``xarray`` input a
        DataArray is aligned by its row coordinates (rows it lacks have no starting value).  The result is the
        same fixed point as a cold start's; with ``tol`` it is reached in fewer iterations when the start is
        close to it.

    Returns
    -------
    ScaleResult
        ``vectorE``, ``vectorG``, ``bgModel`` (= E x G) and diagnostics.  For ``xarray`` input the
        arrays are labelled DataArrays.

    Raises
    ------
    FitError
        No usable cell; a weight above :func:`max_weight` (the sums would overflow); or a non-finite E, G,
        scatter or uncertainty of a row or exposure that has usable cells.  The message names the rows and
        exposures (by their coordinates for ``xarray`` input).
    ValueError
        Bad arguments (shapes, ``tol``, ``iterations``, ...).

    Notes
    -----
    A cell is used when its value is finite and positive and its weight finite and positive (and not
    excluded); an unusable cell leaves both the numerator and the denominator of every weighted mean.
    Exposures without a usable cell get E = NaN, and rows without one the mean G of the others (both
    reported in the result); any other non-finite number is an error, never a result.
    With finite data and the default iteration count the result equals the reference algorithm's:
    the same initial E, the same order of the G update, the fill of empty rows with the unweighted mean
    of the others, the E update, the normalisation of G to a count-weighted mean of one, and a final E
    update.

    Uncertainties assume each used cell's log value has variance ``s**2 / W`` (W its weight), with ``s**2``
    the weighted residual variance per degree of freedom; an exposure's error combines its own cells with
    the errors of the rows it is measured against, and likewise for a row (first-order propagation; the
    common normalisation of G is a further ``s**2 / sum(W)``, negligible for a camera).
    """
    if clip_sigma is not None and not clip_sigma > 0:
        raise ValueError(f"clip_sigma must be positive, got {clip_sigma!r}")
    if not isinstance(clip_rounds, (int, np.integer)) or clip_rounds < 1:
        raise ValueError(f"clip_rounds must be a positive integer, got {clip_rounds!r}")
    if tol is None and (not isinstance(iterations, (int, np.integer)) or iterations < 0):
        raise ValueError(f"iterations must be a non-negative integer, got {iterations!r}")
    if tol is not None and not tol > 0:
        raise ValueError(f"tol must be positive, got {tol!r}")
    if hasattr(bgMatrix, "dims") and hasattr(bgMatrix, "coords"):
        return _measure_labelled(bgMatrix, bgCounts, iterations, tol=tol, max_iter=max_iter, exclude=exclude,
                                 clip_sigma=clip_sigma, clip_rounds=clip_rounds, persist=persist,
                                 initial_g=initial_g)

    shape = bgMatrix.shape
    if len(shape) not in (2, 3):
        raise ValueError(f"bgMatrix must have 2 or 3 dimensions, got shape {shape}")
    for name, other in (("bgCounts", bgCounts), ("exclude", exclude)):
        if other is not None and other.shape != shape:
            raise ValueError(f"{name} shape {other.shape} differs from bgMatrix shape {shape}")
    values, weights, skip = (_rows(a) if a is not None else None for a in (bgMatrix, bgCounts, exclude))
    if weights is None:
        weights = np.ones_like(values, dtype=float)
    start = None
    if initial_g is not None:
        start = np.asarray(initial_g, dtype=np.float64)
        if start.shape != tuple(shape[:-1]):
            raise ValueError(f"initial_g shape {start.shape} differs from the row shape {tuple(shape[:-1])}")
        start = _start_log_g(start.reshape(-1))
        if not start[1].any():
            start = None  # no starting value at all: the cold start
    try:
        fit = _solve(values, weights, skip, iterations, tol, max_iter, clip_sigma, clip_rounds,
                     persist and _is_dask(values), start)
    except FitError as err:
        if len(shape) == 3:
            raise err.named(lambda i: f"detector {i // shape[1]} amp {i % shape[1]}", "exposure {}".format) from None
        raise
    if len(shape) == 3:
        fit = _unflatten(fit, shape)
    return fit


def _start_log_g(initial_g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log G to start from and the rows that have a starting value (positive and finite); the others start at
    the mean log of the given ones (0, i.e. G = 1, when none is given)."""
    known = np.isfinite(initial_g) & (initial_g > 0)
    log_g = np.zeros(initial_g.shape)
    log_g[known] = np.log(initial_g[known])
    log_g[~known] = log_g[known].mean() if known.any() else 0.0
    return log_g, known


def _rows(a):
    """View a (det, amp, exp) array as (det * amp, exp) rows; 2-D arrays pass through."""
    if a.ndim == 2:
        return a
    if _is_dask(a):
        a = a.rechunk({1: -1})  # merging two axes needs the inner one whole
    return a.reshape(a.shape[0] * a.shape[1], a.shape[2])


def _unflatten(fit: ScaleResult, shape: tuple[int, ...]) -> ScaleResult:
    changes = {name: getattr(fit, name).reshape(shape) for name in _CELL_FIELDS}
    changes.update({name: getattr(fit, name).reshape(shape[:2]) for name in _ROW_FIELDS})
    return dataclasses.replace(fit, **changes)


# On dask, products with a vector are elementwise products and sums, not matmul: BLAS may round a chunk
# differently with its memory alignment, which varies with how a worker received it, and reruns must give
# identical numbers.  On numpy (one array, one process) BLAS is several times faster.
def _row_dot(w, v: np.ndarray):
    """sum_j w[i, j] v[j]"""
    return (w * _like(v, w, 1)[None, :]).sum(axis=1) if _is_dask(w) else w @ v


def _col_dot(w, v: np.ndarray):
    """sum_i w[i, j] v[i]"""
    return (w * _like(v, w, 0)[:, None]).sum(axis=0) if _is_dask(w) else v @ w


def _persisted(*arrays, keep: bool):
    if not keep:
        return arrays
    import dask

    return dask.persist(*arrays)


def _solve(values, weights, exclude, iterations, tol, max_iter, clip_sigma, clip_rounds, persist,
           start_log_g=None) -> ScaleResult:
    usable = usable_cells(values, weights)
    positive = np.where(usable, values, 1.0)
    in_fit = usable if exclude is None else usable & ~exclude.astype(bool)
    # Cells out of the fit carry weight 0 and log value 0 (log 1), so they vanish from every sum.
    log_b = np.log(positive if exclude is None else np.where(in_fit, values, 1.0))
    w_all = np.where(in_fit, weights, 0).astype(np.float64, copy=False)
    # What memory_bytes counts (_HELD_PER_CELL).
    log_b, w_all, in_fit = _persisted(log_b, w_all, in_fit, keep=persist)
    if exclude is None:
        usable = in_fit  # the same cells, already in memory
    clipped = np.zeros_like(in_fit)  # numpy or dask, like its input
    rounds = 0
    while True:
        # _HELD_PER_CELL_CLIPPING: each round's weights, clipped mask and (in _outliers) residual.
        w = w_all if rounds == 0 else _persisted(np.where(clipped, 0.0, w_all), keep=persist)[0]
        fit = _fit(log_b, w, positive, usable, iterations, tol, max_iter, start_log_g)
        if clip_sigma is None or rounds == clip_rounds:
            break
        new = _outliers(fit, w_all, in_fit, clip_sigma, persist)
        (changed,) = _compute((new != clipped).sum())
        if not changed:
            break
        (clipped,), rounds = _persisted(new, keep=persist), rounds + 1
    return dataclasses.replace(fit, clipped=clipped, clip_rounds=rounds)


def _residual(positive, usable, model):
    """``log(B / model)`` on usable cells, NaN elsewhere: the one definition of the fit's residual.

    ``positive`` is B with 1 on the unusable cells, so that no task takes the log of a non-positive value
    (on dask these run in worker tasks, outside any errstate).
    """
    return np.where(usable, np.log(positive / model), np.nan)


def _fit(log_b, w, positive, usable, iterations, tol, max_iter, start_log_g=None) -> ScaleResult:
    """One alternating fit of log B = e + g on cells with weight w > 0 (log_b is 0 elsewhere).

    ``positive`` (B, 1 where unusable) and ``usable`` give the residual, on every usable cell.  The iterations
    start from ``start_log_g`` (a warm start), else from G = 1.
    """
    with np.errstate(over="ignore"):  # (numpy) a weight too large to multiply is refused just below
        wl = w * log_b
    # The largest weight of each row comes in the same pass: it must be checked before the sums are trusted.
    row_w, col_w, row_wl, col_wl, row_max = (np.asarray(v, dtype=np.float64) for v in _compute(
        w.sum(axis=1), w.sum(axis=0), wl.sum(axis=1), wl.sum(axis=0), w.max(axis=1)))
    _check_weights(w, row_max)
    filled = row_w == 0
    empty = col_w == 0
    if filled.all():
        raise FitError("no usable cell: every value is non-finite or non-positive, or has no weight")
    live_rows = ~filled
    # NaN instead of 0 in the denominators: part of the division runs in worker tasks, outside any errstate.
    row_w_safe = np.where(filled, np.nan, row_w)
    col_w_safe = np.where(empty, np.nan, col_w)

    # Overflow too: a scale or model beyond float64 is refused by _check_finite below, not warned about.
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        def update_e(g_sum):
            return (col_wl - g_sum) / col_w

        if start_log_g is None:
            log_e = update_e(0.0)  # initial G = 1
            log_g = np.zeros(row_w.shape)
        else:
            # E from the rows with a starting value only, where an exposure has cells in them: a row without
            # one (a new detector) would otherwise pull every E by its guessed G.
            log_g, known = start_log_g
            given = (known & live_rows).astype(np.float64)
            g_known = np.where(given > 0, log_g, 0.0)
            g_sum, known_w, known_wl, known_g_sum = (np.asarray(v, dtype=np.float64) for v in _compute(
                _col_dot(w, np.where(live_rows, log_g, 0.0)), _col_dot(w, given), _col_dot(wl, given),
                _col_dot(w, g_known)))
            log_e = np.where(known_w > 0, (known_wl - known_g_sum) / np.where(known_w > 0, known_w, 1.0),
                             update_e(g_sum))
            guessed = ~known & live_rows
            if guessed.any():  # their G from that E, so that the first change measured is the fit's own
                (g_from_e,) = _compute((row_wl - _row_dot(w, np.where(empty, 0.0, log_e))) / row_w_safe)
                log_g = np.where(guessed, np.asarray(g_from_e, dtype=np.float64), log_g)
                (g_sum,) = _compute(_col_dot(w, np.where(live_rows, log_g, 0.0)))
                log_e = update_e(np.asarray(g_sum, dtype=np.float64))  # and E from the whole start
            # Normalised as each iteration normalises G (E moving the other way): the start of a fit with more
            # data has another normalisation, a shift that the change measured need not count.
            shift = np.log(np.sum(row_w * np.exp(log_g)) / np.sum(row_w))
            log_g, log_e = log_g - shift, log_e + shift
        history: list[float] = []
        limit = max_iter if tol is not None else iterations
        for _ in range(limit):
            e_known = np.where(empty, 0.0, log_e)  # an empty exposure's column has no weight anyway
            g_new = (row_wl - _row_dot(w, e_known)) / row_w_safe
            # Rows without weight drop out of W^T g, so the fill below cannot change it: both passes
            # over W go in one graph and one round trip.
            g_new, g_sum = _compute(g_new, _col_dot(w, np.where(live_rows, g_new, 0.0)))
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
        (g_sum,) = _compute(_col_dot(w, np.where(live_rows, log_g, 0.0)))
        log_e = update_e(np.asarray(g_sum, dtype=np.float64))

        model = np.exp(_like(log_e, w, 1)[None, :] + _like(log_g, w, 0)[:, None])
        residual = _residual(positive, usable, model)
        used = w > 0
        w_r2 = w * np.where(used, residual, 0.0) ** 2
        w2 = w * w
        inv_row = np.where(filled, 0.0, 1.0 / row_w_safe)
        inv_col = np.where(empty, 0.0, 1.0 / col_w_safe)
        row_sq, exp_sq, n_used, w2_col, w2_row = (np.asarray(v, dtype=np.float64) for v in _compute(
            w_r2.sum(axis=1), w_r2.sum(axis=0), used.sum(), _row_dot(w2, inv_col), _col_dot(w2, inv_row)))
        sq = float(row_sq.sum())
        scatter = float(np.sqrt(sq / row_w.sum()))
        # Residual variance per unit weight, per degree of freedom (one gauge freedom between e and g).
        dof = int(n_used) - int(live_rows.sum()) - int((~empty).sum()) + 1
        s2 = sq / dof if dof > 0 else np.nan
        var_g = s2 * (inv_row + inv_row ** 2 * w2_col)
        var_e = s2 * (inv_col + inv_col ** 2 * w2_row)

        vector_e, vector_g = np.exp(log_e), np.exp(log_g)
        error_e = np.where(empty, np.nan, vector_e * np.sqrt(var_e))
        error_g = np.where(filled, np.nan, vector_g * np.sqrt(var_g))
        row_rms, exp_rms = np.sqrt(row_sq / row_w_safe), np.sqrt(exp_sq / col_w_safe)
    _check_finite(filled, empty, {"exposure scale E": (None, vector_e), "scale G": (vector_g, None),
                                  "residual scatter per row / exposure": (row_rms, exp_rms)},
                  scatter, {"uncertainty of G / of E": (error_g, error_e)} if dof > 0 else {})
    max_change = history[-1] if history else float("nan")
    return ScaleResult(
        vectorE=vector_e,
        vectorG=vector_g,
        bgModel=model,
        used=used,
        iterations=len(history),
        converged=bool(max_change < (tol if tol is not None else CONVERGENCE_TOL)),
        max_change=max_change,
        tol=tol,
        residual_scatter=scatter,
        residual=residual,
        row_rms=row_rms,
        exp_rms=exp_rms,
        filled_rows=filled,
        empty_exposures=empty,
        errorE=error_e,
        errorG=error_g,
        history=tuple(history),
    )


def _check_weights(w, row_max: np.ndarray) -> None:
    """Refuse weights above :func:`max_weight`, naming the first such cell (found only on that rare path)."""
    limit = max_weight(math.prod(w.shape))
    rows = np.flatnonzero(row_max > limit)
    if rows.size:
        (exposure,) = _compute(w[rows[0]].argmax())
        raise FitError(f"weight {row_max[rows[0]]:.6g} is above the largest the fit's sums can hold "
                       f"({limit:.3g} for {math.prod(w.shape):,} cells)", rows[:1], [int(exposure)])


def _check_finite(filled: np.ndarray, empty: np.ndarray, per_row_exposure: dict[str, tuple[Any, Any]],
                  scatter: float, optional: dict[str, tuple[Any, Any]]) -> None:
    """Raise FitError for any non-finite number of a row or exposure that has usable cells.

    The values are (row vector or None, exposure vector or None) by name; filled rows and empty exposures
    are skipped, as they have no number of their own.
    """
    for name, (by_row, by_exposure) in {**per_row_exposure, **optional}.items():
        rows = np.flatnonzero(~filled & ~np.isfinite(by_row)) if by_row is not None else np.array([], int)
        exposures = (np.flatnonzero(~empty & ~np.isfinite(by_exposure)) if by_exposure is not None
                     else np.array([], int))
        if rows.size or exposures.size:
            raise FitError(f"the fit gave a non-finite {name} from finite input", rows, exposures)
    if not math.isfinite(scatter):
        raise FitError("the fit gave a non-finite residual scatter from finite input")


def _outliers(fit: ScaleResult, w_all, in_fit, k: float, persist: bool):
    """Cells of the fit whose weight-normalised residual is beyond k robust sigmas of the used cells'.

    The residuals are first median-polished (exposure medians, then row medians, over used cells, twice): a
    bad cell pulls its row's and exposure's mean-based fit, and without the polish a row with a few wild
    cells, or one measured against a biased exposure, would see all its cells rejected, then stay rejected.
    """
    used = fit.used
    # Evaluated some twenty times below: held in memory rather than recomputed from the input each time.
    (residual,) = _persisted(fit.residual, keep=persist)
    # Rows and exposures with no used cell get zeros, not all-NaN slices (which warn in worker tasks).
    masked = np.where(used, residual, np.nan)
    masked = np.where(_like(fit.filled_rows, w_all, 0)[:, None] | _like(fit.empty_exposures, w_all, 1)[None, :],
                      0.0, masked)
    row_offset, exp_offset = np.zeros(fit.filled_rows.shape), np.zeros(fit.empty_exposures.shape)

    def less_offsets(x):
        return x - _like(row_offset, w_all, 0)[:, None] - _like(exp_offset, w_all, 1)[None, :]

    for _ in range(2):
        (step,) = _compute(_nanmedian(less_offsets(masked), axis=0))
        exp_offset = exp_offset + step
        (step,) = _compute(_nanmedian(less_offsets(masked), axis=1))
        row_offset = row_offset + step
    polished = less_offsets(residual)
    (mean_w,) = _compute(w_all.sum() / in_fit.sum())
    # Scaled so that cells of typical weight keep their residual: a cell with fewer pixels is noisier.
    z = polished * np.sqrt(w_all / float(mean_w))
    centre = _lower_median(z, used)
    spread = 1.4826 * _lower_median(abs(z - centre), used)
    # "not within" rather than "beyond": a cell without a residual (its exposure lost every cell to
    # clipping, so has no model) stays rejected.
    return in_fit & ~(abs(z - centre) <= k * spread)


def _nanmedian(x, axis: int):
    if _is_dask(x):
        import dask.array as da

        return da.nanmedian(x, axis=axis)
    return np.nanmedian(x, axis=axis)


def _lower_median(x, mask, bins: int = 512, rounds: int = 8) -> float:
    """The lower median of ``x`` over ``mask``, by histogram refinement: a few small reductions, the same
    on numpy and on dask, each bringing back only ``bins`` counts.  Exact to ~1e-15 of the data range."""
    x = np.where(mask, x, 0.0)
    weight = mask.astype(np.float64)
    lo, hi, n = (float(v) for v in _compute(np.where(mask, x, np.inf).min(), np.where(mask, x, -np.inf).max(),
                                            weight.sum()))
    if n == 0:
        return float("nan")
    rank = (n - 1) // 2  # zero-based rank of the lower median
    below = 0.0  # masked values known to lie below lo
    histogram = _histogram_function(x)
    for _ in range(rounds):
        if not hi - lo > 4 * bins * np.finfo(np.float64).eps * max(abs(lo), abs(hi)):
            break  # as narrow as float64 bins can be
        counts, edges = histogram(x, bins=bins, range=(lo, hi), weights=weight)
        (counts,) = _compute(counts)
        cumulative = below + np.cumsum(counts)
        b = min(int(np.searchsorted(cumulative, rank, side="right")), bins - 1)
        below = below + (cumulative[b - 1] - below if b else 0.0)
        lo, hi = float(edges[b]), float(edges[b + 1])
    return 0.5 * (lo + hi) if hi > lo else lo


def _histogram_function(x):
    if _is_dask(x):
        import dask.array as da

        return da.histogram
    return np.histogram


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

    initial_g = kwargs.pop("initial_g")
    if isinstance(initial_g, xr.DataArray):
        # Aligned by label: rows the input has and the start lacks get NaN (no starting value).
        missing = [d for d in row_dims if d not in initial_g.dims]
        if missing or set(initial_g.dims) - set(row_dims):
            raise ValueError(f"initial_g dims {initial_g.dims} differ from the row dims {row_dims}")
        initial_g = initial_g.reset_coords(drop=True).transpose(*row_dims).reindex(
            {d: values[d] for d in row_dims if d in values.coords and d in initial_g.coords}).values
    try:
        fit = measure_scales(values.data, raw(counts), iterations, exclude=raw(kwargs.pop("exclude")),
                             initial_g=initial_g, **kwargs)
    except FitError as err:
        raise err.named(*_label_names(values, row_dims, exp_dim)) from None
    row_coords = {d: values[d] for d in row_dims if d in values.coords}
    exp_coords = {exp_dim: values[exp_dim]} if exp_dim in values.coords else {}

    names = {"vectorE": "exp_scale", "errorE": "exp_scale_err", "vectorG": "det_scale",
             "errorG": "det_scale_err", "bgModel": "model"}
    changes = {}
    for group, dims, coords in ((_CELL_FIELDS, order, values.coords), (_ROW_FIELDS, row_dims, row_coords),
                                (_EXP_FIELDS, (exp_dim,), exp_coords)):
        for f in group:
            changes[f] = xr.DataArray(getattr(fit, f), dims=dims, coords=coords, name=names.get(f, f))
    return dataclasses.replace(fit, **changes)


def _label_names(values, row_dims: tuple[str, ...], exp_dim: str):
    """Functions naming a solver row and an exposure index by the coordinates of labelled input, e.g.
    ``detector=94 (R22_S11) amp=C10`` and ``exposure=2025112000042``."""
    shape = tuple(values.sizes[d] for d in row_dims)

    def label(dim: str, i: int) -> str:
        if dim not in values.coords:
            return f"{dim} {i}"
        text = f"{dim}={values[dim].values[i]}"
        if dim == "detector" and "detector_name" in values.coords and values["detector_name"].dims == (dim,):
            text += f" ({values['detector_name'].values[i]})"
        return text

    def row_name(i: int) -> str:
        return " ".join(label(d, k) for d, k in zip(row_dims, np.unravel_index(i, shape)))

    return row_name, lambda j: label(exp_dim, j)
