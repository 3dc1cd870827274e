"""Simulated flat-field campaigns: realistic per-amplifier statistics, and files as the butler writes them.

``simulate_campaign`` builds the statistics that cp_pipe's flat measurement step would produce for a
campaign of flats (one record per exposure and detector), with the truth they were drawn from.
``format_propertylist`` and ``write_campaign`` put them on disk in the LSST PropertyList YAML layout,
fast enough for hundreds of thousands of files.

The model, per filter, amplifier (d, a) and exposure e::

    amp_value[d, a, e] = true_exp_scale[e] * true_det_scale[d, a] * exp(noise * N(0, 1))
    true_det_scale    ~ vignetting(x, y) * sensor response[d, a] / gain[d, a]

so the structure between amplifiers is the camera's real gain pattern (ADU = electrons / gain).
"""

from __future__ import annotations

import csv
import math
import os
import re
import zlib
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import xarray as xr
import yaml

from .camera import Camera, load_camera

__all__ = [
    "BUTLER_PATTERN",
    "LSSTCAM_FILTERS",
    "PROPERTYLIST_TAG",
    "SIMPLE_PATTERN",
    "format_propertylist",
    "simulate_campaign",
    "write_campaign",
]

LSSTCAM_FILTERS = ("u_24", "g_6", "r_57", "i_39", "z_20", "y_10")
BUTLER_PATTERN = ("{run}/flatStats/{day_obs}/{obs_id}/"
                  "flatStats_LSSTCam_{physical_filter}_{obs_id}_{detector_name}_{run_name}.yaml")
SIMPLE_PATTERN = "{physical_filter}/{exposure}/flatStats_{detector}.yaml"
PROPERTYLIST_TAG = "lsst.daf.base.PropertyList"

# Mean flat level in ADU by band: the flat-field projector gives less light in u and y.
_LAMP_ADU = {"u": 12_000.0, "g": 30_000.0, "r": 38_000.0, "i": 34_000.0, "z": 24_000.0, "y": 15_000.0}
# Response of ITL sensors relative to E2V by band (illustrative: ITL is bluer-poor and redder-rich).
_ITL_RELATIVE = {"u": 0.92, "g": 0.97, "r": 1.00, "i": 1.02, "z": 1.04, "y": 1.06}
# Pixels per amplifier that a flat statistic can use (trimmed data section).
_AMP_PIXELS = {"E2V": 512 * 2002, "ITL": 509 * 2000}
_DEFAULT_PIXELS = 1_000_000
_EXPOSURE_MULTIPLIER = 100_000  # LSST exposure id = day_obs * 100000 + seq_num
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
        Seed; the same arguments give identical results.
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

    Returns
    -------
    xarray.DataTree
        One child per filter, named after it, each a Dataset with

        - ``amp_value``, ``amp_sigma`` (float, ADU), ``amp_count`` (int): dims (detector, amp, exposure);
        - ``det_value``, ``det_sigma``, ``det_count``: dims (detector, exposure); the count-weighted
          mean, pooled standard deviation and total count of the finite amplifiers;
        - truth: ``true_exp_scale`` (exposure; ADU), ``true_det_scale`` (detector, amp; count-weighted
          mean 1 over the cells with data), ``true_response`` (detector, amp; relative illumination x
          sensor response in electrons, so ``true_det_scale ∝ true_response / gain``) and ``gain``;
        - coords ``detector`` (int), ``amp`` (names), ``exposure`` (``day_obs * 100000 + seq``, sequence
          numbers distinct across filters) and non-index ``obs_id``, ``seq_num`` (exposure),
          ``detector_name``, ``detector_type`` (detector).

        Attributes record the inputs, ``physical_filter`` and the ``dead_detector`` id (-1 if none).
    """
    cam = camera if isinstance(camera, Camera) else load_camera(camera)
    if n_detectors is not None:
        cam = cam.subset(n_detectors)
    filters = _check_inputs(filters, n_exposures, seed, noise, nan_amp_fraction, day_obs)

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

    common = {"camera": cam.name, "seed": int(seed), "day_obs": int(day_obs), "noise": float(noise),
              "nan_amp_fraction": float(nan_amp_fraction),
              "dead_detector": int(cam.detector[dead]) if dead >= 0 else -1}
    children: dict[str, xr.Dataset] = {}
    for k, physical_filter in enumerate(filters):
        band = _band(physical_filter)
        rng = _rng(seed, "filter", physical_filter)
        level = _LAMP_ADU.get(band, 10_000.0 + 30_000.0 * (zlib.crc32(band.encode()) % 1000) / 1000)

        # Illumination: radial vignetting and a 1 % projector gradient in a filter-dependent direction.
        angle = rng.uniform(0.0, 2 * np.pi)
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

        det_scale = response / cam.gain
        det_scale /= _weighted_mean(det_scale, count.sum(axis=2))
        value = exp_scale[None, None, :] * det_scale[:, :, None]
        value *= np.exp(noise * rng.standard_normal(value.shape))
        gain = cam.gain[:, :, None]
        sigma = np.sqrt(value / gain + (_PRNU * value) ** 2) * np.exp(0.02 * rng.standard_normal(value.shape))
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
                "gain": (("detector", "amp"), cam.gain.copy(), {"units": "electron/adu"}),
            },
            coords={
                "detector": cam.detector.copy(),
                "amp": np.array(cam.amp_names, dtype=str),
                "exposure": int(day_obs) * _EXPOSURE_MULTIPLIER + seq,
                "obs_id": ("exposure", np.array([f"MC_C_{day_obs}_{s:06d}" for s in seq])),
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
    if n_exposures * len(filters) >= _EXPOSURE_MULTIPLIER:
        raise ValueError(f"{n_exposures} exposures x {len(filters)} filters do not fit the 5-digit "
                         "sequence numbers of one day_obs")
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not (noise >= 0 and math.isfinite(noise)):
        raise ValueError(f"noise must be a finite number >= 0, got {noise!r}")
    if not 0 <= nan_amp_fraction < 1:
        raise ValueError(f"nan_amp_fraction must be in [0, 1), got {nan_amp_fraction!r}")
    if int(day_obs) != day_obs or not 19000101 <= day_obs <= 99991231:
        raise ValueError(f"day_obs must be an integer YYYYMMDD, got {day_obs!r}")
    return filters


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


# --- PropertyList YAML ------------------------------------------------------------------------------

_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# Words PyYAML would read back as bool or null, so it quotes them.
_RESERVED = frozenset("yes Yes YES no No NO true True TRUE false False FALSE on On ON off Off OFF "
                      "null Null NULL".split())
_FLOAT_SPECIAL = {"nan": ".nan", "inf": ".inf", "-inf": "-.inf"}
_INT32 = (-(2**31), 2**31 - 1)
_FLOW_WIDTH = 80  # PyYAML's default best_width: flow lines up to this length are never wrapped
_STYLES = ("block", "flow")


def _float_text(x: float) -> str:
    """A float as PyYAML writes it: repr (exact round trip), ``.nan``/``.inf``, ``1.0e+17`` not ``1e+17``."""
    text = repr(x)
    special = _FLOAT_SPECIAL.get(text)
    if special is not None:
        return special
    if "e" in text and "." not in text:
        text = text.replace("e", ".0e", 1)
    return text


def _int_type(v: int) -> str:
    """PropertyList element type daf_base picks for a Python int: Int if 32-bit, else the 64-bit types."""
    if _INT32[0] <= v <= _INT32[1]:
        return "Int"
    if -(2**63) <= v < 2**63:
        return "LongLong"
    if 0 <= v < 2**64:
        return "UnsignedLongLong"
    raise ValueError(f"integer {v} does not fit a PropertyList element (64 bits)")


def _native(value: object) -> tuple[str, object]:
    """(element type, Python value) of one record value."""
    if isinstance(value, (bool, np.bool_)):
        return "Bool", bool(value)
    if isinstance(value, (int, np.integer)):
        return _int_type(int(value)), int(value)
    if isinstance(value, (float, np.floating)):
        return "Double", float(value)
    if isinstance(value, str):
        return "String", str(value)
    if value is None:
        return "Undef", None
    if isinstance(value, (list, tuple, np.ndarray)) and len(value):
        natives = [_native(v) for v in (value.tolist() if isinstance(value, np.ndarray) else value)]
        types = {t for t, _ in natives}
        ints = {"Int", "LongLong", "UnsignedLongLong"}
        if len(types) > 1 and not types <= ints:
            raise TypeError(f"mixed value types in a list: {sorted(types)}")
        if types <= ints:  # one type for all, as daf_base chooses it from the range of the values
            typ = ("Int" if types == {"Int"} else
                   "UnsignedLongLong" if "UnsignedLongLong" in types else "LongLong")
        else:
            typ = natives[0][0]
        return typ, [v for _, v in natives]
    raise TypeError(f"cannot store {type(value).__name__} {value!r} in a PropertyList")


def _text(typ: str, value: object) -> str | None:
    """The plain YAML text of a scalar, or None when PyYAML would need quoting or structure."""
    if typ == "Double":
        return _float_text(value)  # type: ignore[arg-type]
    if typ == "String":
        return value if _PLAIN.match(value) and value not in _RESERVED else None  # type: ignore[arg-type]
    if typ == "Bool":
        return "true" if value else "false"
    if typ == "Undef":
        return "null"
    if isinstance(value, list):
        return None
    return str(value)


@lru_cache(maxsize=256)
def _template(names: tuple[str, ...], types: tuple[str, ...], style: str) -> str:
    """The file with a ``%s`` slot per value; names are plain identifiers, so no '%' to escape."""
    item = "- - {}\n  - {}\n  - %s\n  - ''\n" if style == "block" else "- [{}, {}, %s, '']\n"
    return f"!<{PROPERTYLIST_TAG}>\n" + "".join(item.format(n, t) for n, t in zip(names, types))


class _PropertyListDumper(yaml.SafeDumper):
    """PyYAML dumper with the PropertyList representer, for records the fast path does not handle."""


class _Items(list):
    pass


_PropertyListDumper.add_representer(
    _Items, lambda dumper, data: dumper.represent_sequence(PROPERTYLIST_TAG, list(data)))


def format_propertylist(record: Mapping[str, object], style: str = "block") -> str:
    """A record as the LSST butler writes a PropertyList, in YAML.

    Parameters
    ----------
    record : mapping
        Names to values, written in the mapping's order (for flat statistics: ``DETECTOR_MEDIAN``,
        ``DETECTOR_SIGMA``, ``DETECTOR_N``, then ``AMP_NAME_i``, ``AMP_MEDIAN_i``, ``AMP_SIGMA_i``,
        ``AMP_N_i`` for each amplifier). Floats become ``Double`` (written with ``repr``, so they read
        back exactly; NaN and infinities as ``.nan``, ``.inf``, ``-.inf``), ints ``Int`` (``LongLong``
        beyond 32 bits), str ``String``, bool ``Bool``, None ``Undef``; a list is a repeated key.
    style : {"block", "flow"}
        Inner lists in block style (current PyYAML default) or flow style (``default_flow_style=None``).

    Returns
    -------
    str
        Exactly the text PyYAML emits for the sequence of ``[name, type, value, '']`` items tagged
        ``!<lsst.daf.base.PropertyList>``. Built by string formatting; records with strings that need
        quoting, lists or over-long flow lines are handed to PyYAML itself.
    """
    if style not in _STYLES:
        raise ValueError(f"style must be 'block' or 'flow', got {style!r}")
    names, types, values, texts = [], [], [], []
    fast = bool(record)
    for name, value in record.items():
        if not isinstance(name, str):
            raise TypeError(f"PropertyList names are strings, got {name!r}")
        typ, native = _native(value)
        names.append(name)
        types.append(typ)
        values.append(native)
        if fast:
            text = _text(typ, native)
            if (text is None or not _PLAIN.match(name) or name in _RESERVED
                    or (style == "flow" and len(name) + len(typ) + len(text) + 11 > _FLOW_WIDTH)):
                fast = False
            texts.append(text)
    if fast:
        return _template(tuple(names), tuple(types), style) % tuple(texts)
    items = _Items([n, t, v, ""] for n, t, v in zip(names, types, values))
    flow = False if style == "block" else None  # None: lists of scalars in flow style, as in the samples
    return yaml.dump(items, Dumper=_PropertyListDumper, default_flow_style=flow, sort_keys=False)


# --- Files on disk ----------------------------------------------------------------------------------

def _check_run(run: str) -> list[str]:
    parts = run.split("/")
    if not run or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"run must be a relative collection name like 'LSSTCam/runs/flatSim', got {run!r}")
    return parts


def write_campaign(
    tree: xr.DataTree,
    outdir: str | os.PathLike,
    *,
    layout: str = "butler",
    style: str = "block",
    run: str = "LSSTCam/runs/flatSim",
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

    Returns
    -------
    pathlib.Path
        ``outdir/manifest.csv``: columns ``path,exposure,detector,physical_filter``, paths relative to
        ``outdir`` with '/' separators, one row per file in (filter, exposure, detector) order.
    """
    if layout not in ("butler", "simple"):
        raise ValueError(f"layout must be 'butler' or 'simple', got {layout!r}")
    if style not in _STYLES:
        raise ValueError(f"style must be 'block' or 'flow', got {style!r}")
    run_parts = _check_run(run)
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, int, int, str]] = []
    for node_name, node in tree.children.items():
        ds = node.to_dataset()
        physical_filter = str(ds.attrs.get("physical_filter", node_name))
        rows += _write_filter(ds, outdir, physical_filter, layout, style, run, run_parts)
    manifest = outdir / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["path", "exposure", "detector", "physical_filter"])
        writer.writerows(rows)
    return manifest


def _write_filter(ds: xr.Dataset, outdir: Path, physical_filter: str, layout: str, style: str, run: str,
                  run_parts: list[str]) -> list[tuple[str, int, int, str]]:
    missing = [v for v in ("amp_value", "amp_sigma", "amp_count", "det_value", "det_sigma", "det_count")
               if v not in ds]
    if missing:
        raise ValueError(f"filter {physical_filter!r}: dataset lacks {', '.join(missing)}")
    amp_v = ds["amp_value"].transpose("exposure", "detector", "amp").values
    amp_s = ds["amp_sigma"].transpose("exposure", "detector", "amp").values
    amp_n = ds["amp_count"].transpose("exposure", "detector", "amp").values
    det_v = ds["det_value"].transpose("exposure", "detector").values
    det_s = ds["det_sigma"].transpose("exposure", "detector").values
    det_n = ds["det_count"].transpose("exposure", "detector").values
    amps = [str(a) for a in ds["amp"].values]
    detectors = [int(d) for d in ds["detector"].values]
    exposures = [int(e) for e in ds["exposure"].values]
    if "obs_id" in ds.coords:
        obs_ids = [str(o) for o in ds["obs_id"].values]
    else:
        obs_ids = [f"MC_C_{e // _EXPOSURE_MULTIPLIER}_{e % _EXPOSURE_MULTIPLIER:06d}" for e in exposures]
    if layout == "butler":
        if "detector_name" not in ds.coords:
            raise ValueError(f"filter {physical_filter!r}: the butler layout needs a 'detector_name' "
                             "coordinate")
        det_names = [str(n) for n in ds["detector_name"].values]
        run_name = run.replace("/", "_")

    # One template per filter when every count is a 32-bit Int (always, for real cameras); otherwise
    # each record goes through format_propertylist, which picks the wider type.
    names = ["DETECTOR_MEDIAN", "DETECTOR_SIGMA", "DETECTOR_N"]
    types = ["Double", "Double", "Int"]
    for i in range(len(amps)):
        names += [f"AMP_NAME_{i}", f"AMP_MEDIAN_{i}", f"AMP_SIGMA_{i}", f"AMP_N_{i}"]
        types += ["String", "Double", "Double", "Int"]
    counts_fit = all(int(a.min(initial=0)) >= _INT32[0] and int(a.max(initial=0)) <= _INT32[1]
                     for a in (amp_n, det_n))
    amps_plain = all(_text("String", a) is not None for a in amps)
    template = _template(tuple(names), tuple(types), style) if counts_fit and amps_plain else None
    if template is not None and style == "flow":
        template = None if max(len(n) for n in names) + 6 + 24 + 11 > _FLOW_WIDTH else template

    ftext = _float_text
    rows = []
    made: set[Path] = set()
    for e, exposure in enumerate(exposures):
        if layout == "butler":
            rel_dir = "/".join([*run_parts, "flatStats", str(exposure // _EXPOSURE_MULTIPLIER), obs_ids[e]])
        else:
            rel_dir = f"{physical_filter}/{exposure}"
        directory = outdir / rel_dir
        if directory not in made:
            directory.mkdir(parents=True, exist_ok=True)
            made.add(directory)
        av, as_, an = amp_v[e].tolist(), amp_s[e].tolist(), amp_n[e].tolist()
        dv, ds_, dn = det_v[e].tolist(), det_s[e].tolist(), det_n[e].tolist()
        for d, detector in enumerate(detectors):
            if template is not None:
                parts = [ftext(dv[d]), ftext(ds_[d]), str(dn[d])]
                for a, amp in enumerate(amps):
                    parts += (amp, ftext(av[d][a]), ftext(as_[d][a]), str(an[d][a]))
                text = template % tuple(parts)
            else:
                record: dict[str, object] = {"DETECTOR_MEDIAN": dv[d], "DETECTOR_SIGMA": ds_[d],
                                             "DETECTOR_N": dn[d]}
                for a, amp in enumerate(amps):
                    record |= {f"AMP_NAME_{a}": amp, f"AMP_MEDIAN_{a}": av[d][a], f"AMP_SIGMA_{a}": as_[d][a],
                               f"AMP_N_{a}": an[d][a]}
                text = format_propertylist(record, style)
            if layout == "butler":
                name = (f"flatStats_LSSTCam_{physical_filter}_{obs_ids[e]}_{det_names[d]}_{run_name}.yaml")
            else:
                name = f"flatStats_{detector}.yaml"
            with open(directory / name, "wb") as f:
                f.write(text.encode())
            rows.append((f"{rel_dir}/{name}", exposure, detector, physical_filter))
    return rows
