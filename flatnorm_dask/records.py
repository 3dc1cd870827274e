"""The reference task's ``run()`` without the LSST stack: records and data ids <-> matrices <-> scales dict.

``normalize`` takes per-(detector, exposure) statistic records (mappings such as a PropertyList read by
:mod:`flatnorm_dask.formats`) with their data ids and returns the scales structure (``cpFlatNormalizeScales``)
the LSST flat combination consumes.  Each record goes through :func:`flatnorm_dask.schema.extract_stats`, so it passes the
same checks as a file that :mod:`flatnorm_dask.formats` reads.  Unlike the reference, amplifier rows are
``det * nAmp + amp`` on the way in and on the way out, and a non-finite statistic masks its cell instead of
corrupting a weight.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .schema import (
    COUNT_STAT,
    STAT_INDEX,
    VALUE_STAT,
    StatsFormatError,
    amp_name_key,
    check_level,
    extract_stats,
)
from .solver import measure_scales

__all__ = ["kept_exposures", "normalize", "records_to_matrices", "scales_dict"]


def records_to_matrices(
    records: Sequence[Mapping[str, Any]],
    dims: Sequence[Mapping[str, Any]],
    level: str = "DETECTOR",
    camera: Any = None,
) -> tuple[np.ndarray, np.ndarray, list[int], list[int], list[str]]:
    """Fill the statistic and weight matrices from records and their data ids.

    Returns
    -------
    values, counts : ndarray, (nRows, nExposures)
        Rows are detectors (DETECTOR level) or ``det * nAmp + amp`` (AMP level).  Cells without a record
        are NaN with weight 0.
    exposures, detectors : list of int
        Sorted ids labelling the columns and the detectors.
    amp_names : list of str
        Amplifier names (from ``camera`` when given, else from the first record).

    Raises
    ------
    KeyError
        A data id lacks ``exposure`` or ``detector``.
    StatsFormatError
        A record that :func:`~flatnorm_dask.schema.extract_stats` refuses (a statistic missing or not a
        number, a negative count, a gap in the amplifier numbering, a name that is not a string), or at
        amplifier level with other amplifier names; the message names the record, its data id and the key.
    ValueError
        No records, as many data ids as records, or two records of one (exposure, detector).
    """
    level = check_level(level)
    if len(records) != len(dims):
        raise ValueError(f"{len(records)} records but {len(dims)} data ids")
    ids = []
    for i, dim in enumerate(dims):
        try:
            ids.append((int(dim["exposure"]), int(dim["detector"])))
        except KeyError as err:
            raise KeyError(f"data id {i} ({dict(dim)}): dimension {err.args[0]!r} missing") from None
    exposures = sorted({e for e, _ in ids})
    detectors = sorted({d for _, d in ids})
    exp_index = {e: i for i, e in enumerate(exposures)}
    det_index = {d: i for i, d in enumerate(detectors)}

    if not records:
        raise ValueError("no records to normalise")
    rows = []
    seen: dict[tuple[int, int], int] = {}
    for i, (record, (exp, det)) in enumerate(zip(records, ids)):
        where = f"record {i} (exposure {exp}, detector {det})"
        if (exp, det) in seen:
            raise ValueError(f"{where}: duplicate of record {seen[exp, det]}")
        seen[exp, det] = i
        rows.append(extract_stats(record, where))
    # The output lists every amplifier of every detector, so names are needed at both levels.
    if camera is not None:
        amp_names = [str(a) for a in camera.amp_names]
    elif rows[0].amp_names:
        amp_names = list(rows[0].amp_names)
    else:
        raise StatsFormatError(f"record 0 (exposure {ids[0][0]}, detector {ids[0][1]})",
                               "missing: no amplifier names, and no camera to give them", key=amp_name_key(0))
    n_amp = len(amp_names)
    n_rows = len(detectors) * (n_amp if level == "AMP" else 1)
    values = np.full((n_rows, len(exposures)), np.nan)
    counts = np.zeros((n_rows, len(exposures)))
    value, count = STAT_INDEX[VALUE_STAT], STAT_INDEX[COUNT_STAT]
    for i, (row, (exp, det)) in enumerate(zip(rows, ids)):
        col = exp_index[exp]
        if level == "DETECTOR":
            cells, stats = det_index[det], row.det
        else:
            if list(row.amp_names) != amp_names:
                raise StatsFormatError(f"record {i} (exposure {exp}, detector {det})",
                                       f"amplifier names {list(row.amp_names)} differ from {amp_names}",
                                       key=amp_name_key("i"))
            cells, stats = slice(det_index[det] * n_amp, (det_index[det] + 1) * n_amp), row.amp
        values[cells, col] = stats[value]
        counts[cells, col] = stats[count]
    return values, counts, exposures, detectors, amp_names


def kept_exposures(exp_scale: Any) -> np.ndarray:
    """Which exposures the scales structure lists: those whose E is finite and positive.

    The one rule for leaving an exposure out.  An exposure without a usable cell has E NaN; listed, it would
    make the flat combination divide that flat by NaN.  Left out of ``expScale`` for every detector and
    amplifier, the combination drops that flat instead (it combines the exposures listed under a detector's
    first amplifier).
    """
    scale = np.asarray(exp_scale, dtype=float)
    with np.errstate(invalid="ignore"):
        return np.isfinite(scale) & (scale > 0)


def scales_dict(
    exposure: Sequence[int],
    detector: Sequence[int],
    amp_names: Sequence[str],
    exp_scale: np.ndarray,
    det_scale: np.ndarray,
) -> dict[str, dict]:
    """The scales structure (``cpFlatNormalizeScales``) from scale vectors.

    Parameters
    ----------
    exposure, detector : sequence of int
        Ids labelling ``exp_scale`` and the first axis of ``det_scale``.
    amp_names : sequence of str
        Amplifier names; also the second axis of ``det_scale`` at amplifier level.
    exp_scale : array, (nExposures,)
        E per exposure.
    det_scale : array, (nDetectors,) or (nDetectors, nAmps)
        G per detector (detector level) or per amplifier (amplifier level).

    Returns
    -------
    dict
        ``{"expScale": {det: {amp: {exp: E}}}, "detScale": {det: G}}``, or ``{det: {amp: G}}`` for
        ``detScale`` at amplifier level; plain Python ints, strs and floats.  Exposures that
        :func:`kept_exposures` leaves out (E not finite) are absent from ``expScale``; every detector given
        is listed.
    """
    exp_scale = np.asarray(exp_scale, dtype=float)
    kept = kept_exposures(exp_scale)
    per_exposure = {int(e): float(v) for e, v, keep in zip(exposure, exp_scale, kept, strict=True) if keep}
    det_scale = np.asarray(det_scale, dtype=float)
    exp_out = {int(d): {str(a): dict(per_exposure) for a in amp_names} for d in detector}
    if det_scale.ndim == 1:
        det_out: dict = {int(d): float(g) for d, g in zip(detector, det_scale)}
    else:
        det_out = {int(d): {str(a): float(g) for a, g in zip(amp_names, row)}
                   for d, row in zip(detector, det_scale)}
    return {"expScale": exp_out, "detScale": det_out}


def normalize(
    records: Sequence[Mapping[str, Any]],
    dims: Sequence[Mapping[str, Any]],
    level: str = "DETECTOR",
    camera: Any = None,
    iterations: int = 10,
    **solver_options: Any,
) -> dict[str, dict]:
    """Normalise flat exposures to a consistent level: the reference task's ``run``.

    Parameters
    ----------
    records : sequence of mapping
        Per-(exposure, detector) statistics with ``DETECTOR_MEDIAN``, ``DETECTOR_N``, ``AMP_NAME_i``,
        ``AMP_MEDIAN_i`` and ``AMP_N_i``.
    dims : sequence of mapping
        The matching data ids, each with ``exposure`` and ``detector``.
    level : {"DETECTOR", "AMP"}
        Fit one G per detector or one per amplifier.
    camera : Camera, optional
        Supplies the amplifier names (``camera.amp_names``); taken from the records otherwise.
    iterations : int, optional
        Fixed iteration count (the reference's ``scaleMaxIter``, 10).
    **solver_options
        Passed to :func:`flatnorm_dask.measure_scales` (e.g. ``tol``, ``max_iter``).

    Returns
    -------
    dict
        ``{"expScale": {det: {ampName: {exp: float}}}, "detScale": {det: float}}`` at detector level, with
        ``detScale`` ``{det: {ampName: float}}`` at amplifier level.  An exposure without a usable record
        (E NaN) is left out of ``expScale`` (:func:`kept_exposures`).

    Raises
    ------
    KeyError
        A data id lacks ``exposure`` or ``detector``.
    StatsFormatError
        A record the file reader would refuse too, see :func:`records_to_matrices`; the message names the
        record, its data id and the key.
    """
    level = check_level(level)
    values, counts, exposures, detectors, amp_names = records_to_matrices(records, dims, level, camera)
    if level == "AMP":
        values = values.reshape(len(detectors), len(amp_names), len(exposures))
        counts = counts.reshape(values.shape)
    fit = measure_scales(values, counts, iterations, **solver_options)
    return scales_dict(exposures, detectors, amp_names, fit.vectorE, fit.vectorG)
