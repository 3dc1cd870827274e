"""Simulated flat-field campaigns: realistic per-amplifier statistics, and files as the butler writes them.

``simulate_campaign`` builds the statistics that cp_pipe's flat measurement step would produce for a
campaign of flats (one record per exposure and detector), with the truth they were drawn from.
``write_campaign`` puts them on disk in the LSST PropertyList YAML layout (written by
:mod:`flatnorm_dask.propertylist`), fast enough for hundreds of thousands of files.

The model, per filter, amplifier (d, a) and exposure e::

    amp_value[d, a, e] = true_exp_scale[e] * true_det_scale[d, a] * exp(noise * N(0, 1))
    true_det_scale    ~ vignetting(x, y) * sensor response[d, a] / gain[d, a]

so the structure between amplifiers is the camera's real gain pattern (ADU = electrons / gain).

Two campaigns of one camera share ``seed`` (the camera and its illumination) and differ in ``noise_seed`` (the
lamp, the masked cells, the noise); ``gain_change`` plants a change of chosen amplifiers' gains between them.
"""

from __future__ import annotations

import csv
import math
import os
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import xarray as xr

from . import propertylist as pl
from .camera import Camera, load_camera
from .schema import (
    AMP_VARIABLES,
    DET_VARIABLES,
    EXPOSURE_MULTIPLIER,
    STATISTICS_DATASET_TYPE,
    butler_file_pattern,
    exposure_id,
    format_obs_id,
    split_exposure,
    written_keys,
)

__all__ = [
    "BUTLER_PATTERN",
    "LSSTCAM_FILTERS",
    "SIMPLE_PATTERN",
    "simulate_campaign",
    "write_campaign",
]

LSSTCAM_FILTERS = ("u_24", "g_6", "r_57", "i_39", "z_20", "y_10")
#: Where the butler layout puts the files: the butler's own template for the stock statistics dataset type.
BUTLER_PATTERN = butler_file_pattern()
SIMPLE_PATTERN = "{physical_filter}/{exposure}/flatStats_{detector}.yaml"

# Mean flat level in ADU by band: the flat-field projector gives less light in u and y.
_LAMP_ADU = {"u": 12_000.0, "g": 30_000.0, "r": 38_000.0, "i": 34_000.0, "z": 24_000.0, "y": 15_000.0}
# Response of ITL sensors relative to E2V by band (illustrative: ITL is bluer-poor and redder-rich).
_ITL_RELATIVE = {"u": 0.92, "g": 0.97, "r": 1.00, "i": 1.02, "z": 1.04, "y": 1.06}
# Pixels per amplifier that a flat statistic can use (trimmed data section).
_AMP_PIXELS = {"E2V": 512 * 2002, "ITL": 509 * 2000}
_DEFAULT_PIXELS = 1_000_000
_DRIFT_RHO, _DRIFT_STEP = 0.9, 0.01  # AR(1) lamp drift in log: stationary scatter ~2.3 %
_PRNU = 0.005  # pixel response non-uniformity entering the clipped sigma


def _rng(seed: int, *tags: str) -> np.random.Generator:
    """An independent random stream per (seed, tags): one component's draws do not shift another's."""
    return np.random.default_rng([seed, *(zlib.crc32(t.encode()) for t in tags)])


def _vignetting(r_mm: np.ndarray) -> np.ndarray:
    """Relative illumination against focal-plane radius: flat to 180 mm, then a smooth fall to ~0.7."""
    t = np.clip((r_mm - 180.0) / 200.0, 0.0, 1.5)
    return 1.0 - 0.35 * t**2


def _band(physical_filter: str) -> str:
    return physical_filter.split("_", 1)[0].lower()


def _weighted_mean(values: np.ndarray, weights: np.ndarray) -> float:
    total = weights.sum()
    if total <= 0:  # nothing observed at all (a one-detector camera that is dead): plain mean
        return float(values.mean())
    return float((values * weights).sum() / total)


def simulate_campaign(
    camera: Camera | str | os.PathLike = "lsstcam",
    *,
    n_detectors: int | None = None,
    n_exposures: int = 20,
    filters: Sequence[str] = ("g_6", "r_57"),
    seed: int = 0,
    noise: float = 1e-3,
    nan_amp_fraction: float = 0.002,
    dead_detector: bool = True,
    day_obs: int = 20251120,
    noise_seed: int | None = None,
    gain_change: Mapping[tuple[int, str], float] | None = None,
) -> xr.DataTree:
    """Simulate the flat statistics of a campaign, with the truth they were drawn from.

    Parameters
    ----------
    camera : Camera, str or path-like
        Camera, or a name / CSV path for `load_camera`.
    n_detectors : int, optional
        Keep only the first ``n_detectors`` detectors.
    n_exposures : int
        Exposures per filter.
    filters : sequence of str
        Physical filters, e.g. ``LSSTCAM_FILTERS``; the band is the part before ``_``.
    seed : int
        Seed; the same arguments give identical results.  It draws the camera (sensor responses, masked-pixel
        fractions, the dead detector) and each filter's illumination, and by default the realisation too.
    noise : float
        Sigma of the multiplicative log-normal noise of each amplifier value.
    nan_amp_fraction : float
        Fraction of (detector, amp, exposure) cells of live detectors that are fully masked (value NaN,
        count 0, sigma 0): exactly ``round(fraction * cells)``, at least one when the fraction is > 0.
    dead_detector : bool
        Make one detector (chosen from the seed, the same in every filter) NaN with zero counts in every
        exposure.
    day_obs : int
        Observing day (YYYYMMDD) of the exposure ids.
    noise_seed : int, optional
        Seed of the realisation: the lamp drift, the pixels clipped per exposure, the masked cells and the
        noise.  None (default) or ``seed`` keeps the realisation of ``seed`` alone; another value keeps the
        camera and the illumination of ``seed`` and draws a new realisation (another campaign of the camera).
    gain_change : mapping of (int, str) to float, optional
        ``{(detector id, amplifier name): factor}``: multiply those amplifiers' gains by ``factor`` (a gain
        jump between campaigns).  Their ADU level, hence their true scale, divides by it.

    Returns
    -------
    xarray.DataTree
        One child per filter, named after it, each a Dataset with

        - ``amp_value``, ``amp_sigma`` (float, ADU), ``amp_count`` (int): dims (detector, amp, exposure);
        - ``det_value``, ``det_sigma``, ``det_count``: dims (detector, exposure); the count-weighted
          mean, pooled standard deviation and total count of the finite amplifiers;
        - truth: ``true_exp_scale`` (exposure; ADU), ``true_det_scale`` (detector, amp; count-weighted
          mean 1 over the cells with data), ``true_response`` (detector, amp; relative illumination x
          sensor response in electrons, so ``true_det_scale ∝ true_response / gain``) and ``gain`` (with
          ``gain_change`` applied);
        - coords ``detector`` (int), ``amp`` (names), ``exposure`` (``day_obs * 100000 + seq``, sequence
          numbers distinct across filters) and non-index ``obs_id``, ``seq_num`` (exposure),
          ``detector_name``, ``detector_type`` (detector).

        Attributes record the inputs (``gain_change`` as ``[detector, amp, factor]`` triples),
        ``physical_filter`` and the ``dead_detector`` id (-1 if none).
    """
    cam = camera if isinstance(camera, Camera) else load_camera(camera)
    if n_detectors is not None:
        cam = cam.subset(n_detectors)
    filters = _check_inputs(filters, n_exposures, seed, noise, nan_amp_fraction, day_obs)
    noise_seed = seed if noise_seed is None else _check_seed(noise_seed, "noise_seed")
    gain = _changed_gains(cam, gain_change or {})

    n_det, n_amp = cam.n_detector, cam.n_amp
    # Camera-level truth, shared by all filters: sensor response, masked-pixel fractions, the dead CCD.
    rng = _rng(seed, "camera")
    det_response = np.exp(0.015 * rng.standard_normal(n_det))
    amp_response = np.exp(0.005 * rng.standard_normal((n_det, n_amp)))
    defect_fraction = rng.uniform(0.0, 0.02, (n_det, n_amp))
    dead_choice = int(rng.integers(n_det))  # drawn regardless, so the flag does not shift other draws
    dead = dead_choice if dead_detector else -1
    pixels = np.array([_AMP_PIXELS.get(str(t), _DEFAULT_PIXELS) for t in cam.detector_type], dtype=float)
    amp_x, amp_y = cam.amp_centres()
    radius = np.hypot(amp_x, amp_y)
    is_itl = np.asarray(cam.detector_type) == "ITL"

    common = {"camera": cam.name, "seed": int(seed), "noise_seed": int(noise_seed), "day_obs": int(day_obs),
              "noise": float(noise), "nan_amp_fraction": float(nan_amp_fraction),
              "dead_detector": int(cam.detector[dead]) if dead >= 0 else -1,
              "gain_change": [[int(d), str(a), float(f)] for (d, a), f in (gain_change or {}).items()]}
    children: dict[str, xr.Dataset] = {}
    for k, physical_filter in enumerate(filters):
        band = _band(physical_filter)
        rng = _rng(seed, "filter", physical_filter)
        level = _LAMP_ADU.get(band, 10_000.0 + 30_000.0 * (zlib.crc32(band.encode()) % 1000) / 1000)

        # Illumination: radial vignetting and a 1 % projector gradient in a filter-dependent direction.
        angle = rng.uniform(0.0, 2 * np.pi)
        if noise_seed != seed:  # the rest is the realisation; with noise_seed == seed it continues the stream
            rng = _rng(noise_seed, "realisation", physical_filter)
        tilt = 1.0 + 0.01 * (amp_x * np.cos(angle) + amp_y * np.sin(angle)) / 300.0
        qe = np.where(is_itl, _ITL_RELATIVE.get(band, 1.0), 1.0)
        response = _vignetting(radius) * tilt * (qe * det_response)[:, None] * amp_response

        # Lamp: mean-reverting drift of a few per cent around the filter's level.
        steps = _DRIFT_STEP * rng.standard_normal(n_exposures)
        drift = np.empty(n_exposures)
        drift[0] = steps[0] / math.sqrt(1 - _DRIFT_RHO**2)
        for e in range(1, n_exposures):
            drift[e] = _DRIFT_RHO * drift[e - 1] + steps[e]
        exp_scale = level * np.exp(drift)

        # Counts: usable pixels less fixed defects less a few per mille clipped in each exposure.
        clipped = rng.uniform(0.001, 0.004, (n_det, n_amp, n_exposures))
        count = np.rint(pixels[:, None, None] * (1 - defect_fraction)[:, :, None] * (1 - clipped))
        count = count.astype(np.int64)

        masked = np.zeros((n_det, n_amp, n_exposures), dtype=bool)
        if dead >= 0:
            masked[dead] = True
        live = np.flatnonzero(~masked)
        if nan_amp_fraction > 0 and live.size:
            n_nan = min(live.size, max(1, round(nan_amp_fraction * live.size)))
            masked.flat[rng.choice(live, size=n_nan, replace=False)] = True
        count[masked] = 0

        det_scale = response / gain
        det_scale /= _weighted_mean(det_scale, count.sum(axis=2))
        value = exp_scale[None, None, :] * det_scale[:, :, None]
        value *= np.exp(noise * rng.standard_normal(value.shape))
        sigma = (np.sqrt(value / gain[:, :, None] + (_PRNU * value) ** 2)
                 * np.exp(0.02 * rng.standard_normal(value.shape)))
        value[masked] = np.nan
        sigma[masked] = 0.0

        det_value, det_sigma, det_count = _detector_statistics(value, sigma, count)
        seq = k * n_exposures + np.arange(1, n_exposures + 1)
        children[physical_filter] = xr.Dataset(
            data_vars={
                "amp_value": (("detector", "amp", "exposure"), value, {"units": "adu"}),
                "amp_count": (("detector", "amp", "exposure"), count),
                "amp_sigma": (("detector", "amp", "exposure"), sigma, {"units": "adu"}),
                "det_value": (("detector", "exposure"), det_value, {"units": "adu"}),
                "det_count": (("detector", "exposure"), det_count),
                "det_sigma": (("detector", "exposure"), det_sigma, {"units": "adu"}),
                "true_exp_scale": ("exposure", exp_scale, {"units": "adu"}),
                "true_det_scale": (("detector", "amp"), det_scale),
                "true_response": (("detector", "amp"), response),
                "gain": (("detector", "amp"), gain.copy(), {"units": "electron/adu"}),
            },
            coords={
                "detector": cam.detector.copy(),
                "amp": np.array(cam.amp_names, dtype=str),
                "exposure": exposure_id(day_obs, seq),
                "obs_id": ("exposure", np.array([format_obs_id(day_obs, s) for s in seq])),
                "seq_num": ("exposure", seq),
                "detector_name": ("detector", np.asarray(cam.detector_name, dtype=str)),
                "detector_type": ("detector", np.asarray(cam.detector_type, dtype=str)),
            },
            attrs={"physical_filter": physical_filter, "lamp_level_adu": level, **common},
        )
    root = xr.Dataset(attrs={"filters": list(filters), **common})
    return xr.DataTree.from_dict({"/": root, **children})


def _check_inputs(filters: Sequence[str], n_exposures: int, seed: int, noise: float,
                  nan_amp_fraction: float, day_obs: int) -> list[str]:
    if isinstance(filters, str):
        filters = [filters]
    filters = list(filters)
    if not filters:
        raise ValueError("filters is empty: give at least one physical filter")
    for f in filters:
        if not isinstance(f, str) or not f or "/" in f or f != f.strip():
            raise ValueError(f"physical filter names must be non-empty strings without '/': {f!r}")
    if len(set(filters)) != len(filters):
        raise ValueError(f"filters repeat a name: {filters}")
    if int(n_exposures) != n_exposures or n_exposures < 1:
        raise ValueError(f"n_exposures must be a positive integer, got {n_exposures!r}")
    if n_exposures * len(filters) >= EXPOSURE_MULTIPLIER:
        raise ValueError(f"{n_exposures} exposures x {len(filters)} filters do not fit the 5-digit "
                         "sequence numbers of one day_obs")
    _check_seed(seed, "seed")
    if not (noise >= 0 and math.isfinite(noise)):
        raise ValueError(f"noise must be a finite number >= 0, got {noise!r}")
    if not 0 <= nan_amp_fraction < 1:
        raise ValueError(f"nan_amp_fraction must be in [0, 1), got {nan_amp_fraction!r}")
    if int(day_obs) != day_obs or not 19000101 <= day_obs <= 99991231:
        raise ValueError(f"day_obs must be an integer YYYYMMDD, got {day_obs!r}")
    return filters


def _check_seed(seed: int, name: str) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {seed!r}")
    return int(seed)


def _changed_gains(cam: Camera, gain_change: Mapping[tuple[int, str], float]) -> np.ndarray:
    """The camera's gains, with ``{(detector id, amplifier name): factor}`` applied."""
    gain = cam.gain.copy()
    rows = {int(d): i for i, d in enumerate(cam.detector)}
    columns = {name: a for a, name in enumerate(cam.amp_names)}
    for key, factor in gain_change.items():
        if not (isinstance(key, tuple) and len(key) == 2):
            raise ValueError(f"gain_change: keys are (detector id, amplifier name) pairs, got {key!r}")
        detector, amp = key
        if isinstance(detector, bool) or not isinstance(detector, (int, np.integer)) or int(detector) not in rows:
            raise ValueError(f"gain_change: detector {detector!r} is not one of the campaign's "
                             f"{cam.n_detector} detectors of camera {cam.name!r}")
        if amp not in columns:
            raise ValueError(f"gain_change: amplifier {amp!r} is not one of camera {cam.name!r}'s "
                             f"({', '.join(cam.amp_names)})")
        if isinstance(factor, bool) or not isinstance(factor, (int, float, np.integer, np.floating)) \
                or not (math.isfinite(factor) and factor > 0):
            raise ValueError(f"gain_change: factor of ({detector}, {amp!r}) must be a finite positive number, "
                             f"got {factor!r}")
        gain[rows[int(detector)], columns[amp]] *= float(factor)
    return gain


def _detector_statistics(value: np.ndarray, sigma: np.ndarray,
                         count: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Whole-detector statistics from amplifier ones: count-weighted mean and pooled sigma."""
    finite = np.isfinite(value) & (count > 0)
    w = np.where(finite, count, 0).astype(float)
    v = np.where(finite, value, 0.0)
    total = w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (w * v).sum(axis=1) / total
        # Pooled variance of the union of the amplifiers' pixels: within- plus between-amp spread.
        spread = w * (np.where(finite, sigma, 0.0) ** 2 + (v - mean[:, None, :]) ** 2)
        pooled = np.sqrt(spread.sum(axis=1) / total)
    empty = total == 0
    mean[empty] = np.nan
    pooled[empty] = 0.0
    return mean, pooled, np.where(finite, count, 0).sum(axis=1).astype(np.int64)


# --- Files on disk ----------------------------------------------------------------------------------

def _check_run(run: str) -> None:
    if not run or any(p in ("", ".", "..") for p in run.split("/")):
        raise ValueError(f"run must be a relative collection name like 'LSSTCam/runs/flatSim', got {run!r}")


def write_campaign(
    tree: xr.DataTree,
    outdir: str | os.PathLike,
    *,
    layout: str = "butler",
    style: str = "block",
    run: str = "LSSTCam/runs/flatSim",
    dataset_type: str = STATISTICS_DATASET_TYPE,
) -> Path:
    """Write one statistics file per (filter, exposure, detector) of a simulated campaign.

    Every cell is written, including the dead detector's (NaN values, zero counts), as it would be
    upstream.

    Parameters
    ----------
    tree : xarray.DataTree
        Output of `simulate_campaign` (or any tree of the same variables and coordinates).
    outdir : path-like
        Root directory; created if needed. Existing files of the same names are overwritten.
    layout : {"butler", "simple"}
        ``BUTLER_PATTERN`` (``run`` nested as directories; its '/' become '_' in the file name) or
        ``SIMPLE_PATTERN``.
    style : {"block", "flow"}
        YAML style, see `format_propertylist`.
    run : str
        Butler run collection, for the butler layout.
    dataset_type : str
        Dataset type named in the butler layout's paths (:func:`flatnorm_dask.schema.butler_file_pattern`);
        ``flatStats`` gives the layout of older pipelines' repositories.

    Returns
    -------
    pathlib.Path
        ``outdir/manifest.csv``: columns ``path,exposure,detector,physical_filter``, paths relative to
        ``outdir`` with '/' separators, one row per file in (filter, exposure, detector) order.
    """
    if layout not in ("butler", "simple"):
        raise ValueError(f"layout must be 'butler' or 'simple', got {layout!r}")
    if style not in pl.STYLES:
        raise ValueError(f"style must be 'block' or 'flow', got {style!r}")
    _check_run(run)
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, int, int, str]] = []
    for node_name, node in tree.children.items():
        ds = node.to_dataset()
        physical_filter = str(ds.attrs.get("physical_filter", node_name))
        rows += _write_filter(ds, outdir, physical_filter, layout, style, run, dataset_type)
    manifest = outdir / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["path", "exposure", "detector", "physical_filter"])
        writer.writerows(rows)
    return manifest


def _array_type(values: np.ndarray) -> str | None:
    """The PropertyList element type of every value of an array, or None when they differ."""
    if values.dtype.kind == "f":
        return "Double"
    if values.dtype.kind in "iu" and values.size:
        types = {pl.element_type(int(v))[0] for v in (values.min(), values.max())}
        return types.pop() if len(types) == 1 else None
    return None


def _write_filter(ds: xr.Dataset, outdir: Path, physical_filter: str, layout: str, style: str, run: str,
                  dataset_type: str) -> list[tuple[str, int, int, str]]:
    missing = [v for v in (*DET_VARIABLES.values(), *AMP_VARIABLES.values()) if v not in ds]
    if missing:
        raise ValueError(f"filter {physical_filter!r}: dataset lacks {', '.join(missing)}")
    det = {stat: ds[var].transpose("exposure", "detector").values for stat, var in DET_VARIABLES.items()}
    amp = {stat: ds[var].transpose("exposure", "amp", "detector").values for stat, var in AMP_VARIABLES.items()}
    amps = [str(a) for a in ds["amp"].values]
    detectors = [int(d) for d in ds["detector"].values]
    exposures = [int(e) for e in ds["exposure"].values]
    if "obs_id" in ds.coords:
        obs_ids = [str(o) for o in ds["obs_id"].values]
    else:
        obs_ids = [format_obs_id(*split_exposure(e)) for e in exposures]
    if layout == "butler":
        if "detector_name" not in ds.coords:
            raise ValueError(f"filter {physical_filter!r}: the butler layout needs a 'detector_name' "
                             "coordinate")
        det_names = [str(n) for n in ds["detector_name"].values]
        pattern = butler_file_pattern(dataset_type)
        fixed = {"run": run, "run_name": run.replace("/", "_"), "physical_filter": physical_filter}
    else:
        pattern, fixed = SIMPLE_PATTERN, {"physical_filter": physical_filter}

    # One template per filter when the values have the element types cp_pipe writes (always, for real
    # cameras: counts are 32-bit Ints); otherwise each record goes through format_propertylist, which picks
    # the types from the values.
    keys = written_keys(len(amps))
    names = tuple(key for key, _, _, _ in keys)
    types = tuple(typ for _, _, _, typ in keys)
    wanted = {(stat, i is None, typ) for _, stat, i, typ in keys if stat is not None}
    as_written = (all(_array_type((det if per_detector else amp)[stat]) == typ
                      for stat, per_detector, typ in wanted)
                  and all(pl.plain_text("String", a) is not None for a in amps))
    template = (pl.record_template(names, types, style, longest={"String": max(map(len, amps), default=0)})
                if as_written else None)
    text_of = {"Double": pl.float_text, "Int": str}

    rows = []
    made: set[Path] = set()
    for e, exposure in enumerate(exposures):
        fields = {**fixed, "exposure": exposure, "day_obs": split_exposure(exposure)[0], "obs_id": obs_ids[e]}
        # One column of values (or texts) per key, each over the detectors.
        det_e = {stat: values[e].tolist() for stat, values in det.items()}
        amp_e = {stat: values[e].tolist() for stat, values in amp.items()}
        columns = [[amps[i]] * len(detectors) if stat is None else det_e[stat] if i is None else amp_e[stat][i]
                   for _, stat, i, _ in keys]
        if template is not None:
            texts = [column if typ == "String" else list(map(text_of[typ], column))
                     for column, typ in zip(columns, types)]
            documents = (template % parts for parts in zip(*texts))
        else:
            documents = (pl.format_propertylist(dict(zip(names, values)), style) for values in zip(*columns))
        for d, (detector, text) in enumerate(zip(detectors, documents)):
            rel_path = pattern.format(**fields, detector=detector,
                                      detector_name=det_names[d] if layout == "butler" else "")
            path = outdir / rel_path
            if path.parent not in made:
                path.parent.mkdir(parents=True, exist_ok=True)
                made.add(path.parent)
            with open(path, "wb") as f:
                f.write(text.encode())
            rows.append((rel_path, exposure, detector, physical_filter))
    return rows
