"""Camera geometry without the LSST stack: detectors, amplifiers, gains and focal-plane positions.

A camera is read from a CSV with one row per amplifier (see ``data/CAMERAS.md``). Two ship with the
package: ``lsstcam`` (the 189 science CCDs of Rubin's LSSTCam, measured gains from obs_lsst) and
``testcam`` (one synthetic raft of 9 CCDs with 8 amplifiers each, for fast tests).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache, cached_property
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["CAMERAS", "Camera", "load_camera"]

CAMERAS = ("lsstcam", "testcam")

# Columns every camera file must have; the others (ccd_serial, read_noise, saturation, raft, sensor,
# detector_size_mm) are optional.
_REQUIRED = ("detector", "detector_name", "detector_type", "amp_index", "amp_name", "gain",
             "x_mm", "y_mm", "amp_col", "amp_row")
_INT_COLUMNS = ("detector", "amp_index", "amp_col", "amp_row")
_FLOAT_COLUMNS = ("gain", "x_mm", "y_mm")


@dataclass(frozen=True, eq=False, repr=False)
class Camera:
    """Detectors and amplifiers of a mosaic camera, in camera order.

    Attributes
    ----------
    name : str
        Camera name (``"lsstcam"``, ``"testcam"`` or the stem of a CSV file).
    detector : numpy.ndarray
        Integer detector ids, sorted ascending, shape (n_detector,).
    detector_name : numpy.ndarray
        Detector names such as ``"R22_S11"``, shape (n_detector,).
    detector_type : numpy.ndarray
        Sensor vendor, ``"E2V"`` or ``"ITL"`` for LSSTCam, shape (n_detector,).
    x_mm, y_mm : numpy.ndarray
        Detector centre in the focal plane, mm, shape (n_detector,).
    amp_names : tuple of str
        Amplifier names in camera order (LSSTCam: C10..C17, C07..C00).
    amp_col, amp_row : numpy.ndarray
        Position of each amplifier within a detector, column 0..n-1 left to right and row 0..m-1 bottom
        to top (C1x on top), shape (n_amp,).
    gain : numpy.ndarray
        Gain in e-/ADU, shape (n_detector, n_amp).
    detector_size_mm : float
        Side of the square tile drawn for one detector (the CCD pitch, 42.25 mm for LSSTCam).
    """

    name: str
    detector: np.ndarray
    detector_name: np.ndarray
    detector_type: np.ndarray
    x_mm: np.ndarray
    y_mm: np.ndarray
    amp_names: tuple[str, ...]
    amp_col: np.ndarray
    amp_row: np.ndarray
    gain: np.ndarray
    detector_size_mm: float

    def __post_init__(self) -> None:
        # Arrays are shared between a camera and its subsets: make them read-only so nobody edits a
        # camera in place by accident.
        for field in ("detector", "detector_name", "detector_type", "x_mm", "y_mm", "amp_col", "amp_row",
                      "gain"):
            getattr(self, field).setflags(write=False)

    @property
    def n_detector(self) -> int:
        """Number of detectors."""
        return int(self.detector.size)

    @property
    def n_amp(self) -> int:
        """Number of amplifiers per detector."""
        return len(self.amp_names)

    @cached_property
    def _index_by_name(self) -> dict[str, int]:
        return {str(n): int(d) for n, d in zip(self.detector_name, self.detector)}

    def detector_id(self, name: str) -> int:
        """Detector id of a detector name such as ``"R22_S11"``.

        Raises
        ------
        KeyError
            If the camera has no detector of that name; the message names it.
        """
        try:
            return self._index_by_name[name]
        except KeyError:
            raise KeyError(f"detector {name!r} is not in camera {self.name!r}") from None

    def subset(self, n_detectors: int) -> Camera:
        """The first ``n_detectors`` detectors (in id order), e.g. for a small demo.

        The subset keeps the camera's name, so geometry loaded again by name is a superset of it.
        """
        if not 1 <= int(n_detectors) <= self.n_detector:
            raise ValueError(f"n_detectors must be between 1 and {self.n_detector} for camera "
                             f"{self.name!r}, got {n_detectors!r}")
        n = int(n_detectors)
        return Camera(self.name, self.detector[:n], self.detector_name[:n], self.detector_type[:n],
                      self.x_mm[:n], self.y_mm[:n], self.amp_names, self.amp_col, self.amp_row,
                      self.gain[:n], self.detector_size_mm)

    def amp_centres(self) -> tuple[np.ndarray, np.ndarray]:
        """Focal-plane centres (x, y) in mm of every amplifier, each of shape (n_detector, n_amp).

        Amplifiers tile the detector's ``detector_size_mm`` square in their (col, row) layout; detector
        rotations are ignored (see ``CAMERAS.md``).
        """
        n_col, n_row = int(self.amp_col.max()) + 1, int(self.amp_row.max()) + 1
        size = self.detector_size_mm
        dx = (self.amp_col + 0.5) / n_col * size - size / 2
        dy = (self.amp_row + 0.5) / n_row * size - size / 2
        return self.x_mm[:, None] + dx[None, :], self.y_mm[:, None] + dy[None, :]

    def __repr__(self) -> str:
        return f"Camera({self.name!r}, {self.n_detector} detectors x {self.n_amp} amplifiers)"


def _camera_file(name_or_path: str | os.PathLike) -> tuple[str, Path | Traversable]:
    text = os.fspath(name_or_path)
    if text.lower() in CAMERAS:
        return text.lower(), resources.files("flatnorm_dask") / "data" / f"{text.lower()}.csv"
    path = Path(text)
    if not path.is_file():
        raise ValueError(f"unknown camera {text!r}: not one of {', '.join(CAMERAS)} and not a CSV file")
    return path.stem, path


def load_camera(name_or_path: str | os.PathLike = "lsstcam") -> Camera:
    """Load a camera by name (``"lsstcam"``, ``"testcam"``) or from a CSV file of the same columns.

    Parameters
    ----------
    name_or_path : str or path-like
        Camera name, or a CSV with one row per amplifier and columns ``detector, detector_name,
        detector_type, amp_index, amp_name, gain, x_mm, y_mm, amp_col, amp_row`` (others are ignored;
        an optional ``detector_size_mm`` column sets the tile size, else the smallest spacing of
        detector centres is used).

    Returns
    -------
    Camera

    Raises
    ------
    ValueError
        If the file is missing or malformed; the message names the file, and the column and line where
        it can.
    """
    text = os.fspath(name_or_path)
    if text.lower() in CAMERAS:
        return _packaged_camera(text.lower())
    return _read_camera(*_camera_file(text))


@cache
def _packaged_camera(name: str) -> Camera:
    # Package data does not change while the process runs, and a Camera is immutable (its arrays are
    # read-only): each is parsed once (~0.1 s for LSSTCam), not once a run, plot or simulation.
    return _read_camera(*_camera_file(name))


def _read_camera(name: str, source: Path | Traversable) -> Camera:
    where = str(source)
    try:
        with source.open("r", newline="") as f:
            table = pd.read_csv(f, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise ValueError(f"{where}: cannot read camera CSV: {err}") from None
    return _build(name, table, where)


def _column(table: pd.DataFrame, column: str, kind: type, where: str) -> np.ndarray:
    """Parse one column, naming the first bad cell (line numbers count the header as line 1)."""
    raw = table[column].str.strip()
    if kind is str:
        bad = raw == ""
        values = raw.to_numpy(dtype=str)
    else:
        parsed = pd.to_numeric(raw, errors="coerce")
        bad = parsed.isna()
        if kind is int:
            bad |= parsed.notna() & (parsed != parsed.round())
        else:
            bad |= ~np.isfinite(parsed.fillna(0.0))
        values = parsed.to_numpy(dtype=float)
        if kind is int and not bad.any():
            values = values.astype(np.int64)
    if bad.any():
        line = int(np.flatnonzero(bad.to_numpy())[0]) + 2
        what = {str: "empty", int: "not an integer", float: "not a finite number"}[kind]
        raise ValueError(f"{where}: column {column!r}, line {line}: {what}: {table[column].iloc[line - 2]!r}")
    return values


def _build(name: str, table: pd.DataFrame, where: str) -> Camera:
    table = table.rename(columns=lambda c: str(c).strip())
    missing = [c for c in _REQUIRED if c not in table.columns]
    if missing:
        raise ValueError(f"{where}: camera CSV lacks column(s) {', '.join(map(repr, missing))}")
    if table.empty:
        raise ValueError(f"{where}: camera CSV has no rows")
    cols = {c: _column(table, c, int, where) for c in _INT_COLUMNS}
    cols |= {c: _column(table, c, float, where) for c in _FLOAT_COLUMNS}
    cols |= {c: _column(table, c, str, where) for c in ("detector_name", "detector_type", "amp_name")}
    if (cols["gain"] <= 0).any():
        line = int(np.flatnonzero(cols["gain"] <= 0)[0]) + 2
        raise ValueError(f"{where}: column 'gain', line {line}: gain must be positive")
    for c in ("amp_col", "amp_row"):
        if (cols[c] < 0).any():
            raise ValueError(f"{where}: column {c!r}: negative amplifier position")

    order = np.lexsort((cols["amp_index"], cols["detector"]))
    cols = {c: v[order] for c, v in cols.items()}
    detectors, first = np.unique(cols["detector"], return_index=True)
    counts = np.diff(np.append(first, len(order)))
    if (counts != counts[0]).any():
        k = int(np.flatnonzero(counts != counts[0])[0])
        raise ValueError(f"{where}: column 'detector': detectors have different numbers of amplifiers "
                         f"(detector {int(detectors[k])} has {int(counts[k])}, detector "
                         f"{int(detectors[0])} has {int(counts[0])})")
    n_det, n_amp = detectors.size, int(counts[0])
    grid = {c: v.reshape(n_det, n_amp) for c, v in cols.items()}
    if (grid["amp_index"] != np.arange(n_amp)).any():
        d = int(detectors[np.flatnonzero((grid["amp_index"] != np.arange(n_amp)).any(axis=1))[0]])
        raise ValueError(f"{where}: column 'amp_index': detector {d} does not number its amplifiers "
                         f"0..{n_amp - 1} exactly once")
    # Per-detector and per-amplifier columns must agree between the rows that repeat them.
    for c in ("detector_name", "detector_type", "x_mm", "y_mm"):
        differs = (grid[c] != grid[c][:, :1]).any(axis=1)
        if differs.any():
            raise ValueError(f"{where}: column {c!r}: differs between the amplifiers of detector "
                             f"{int(detectors[np.flatnonzero(differs)[0]])}")
    for c in ("amp_name", "amp_col", "amp_row"):
        differs = (grid[c] != grid[c][:1, :]).any(axis=1)
        if differs.any():
            raise ValueError(f"{where}: column {c!r}: detector {int(detectors[np.flatnonzero(differs)[0]])} "
                             f"lists its amplifiers differently from detector {int(detectors[0])}")
    amp_names = tuple(str(a) for a in grid["amp_name"][0])
    if len(set(amp_names)) != n_amp:
        raise ValueError(f"{where}: column 'amp_name': repeated amplifier name in {list(amp_names)}")
    layout = set(zip(grid["amp_col"][0].tolist(), grid["amp_row"][0].tolist()))
    if len(layout) != n_amp:
        raise ValueError(f"{where}: columns 'amp_col', 'amp_row': two amplifiers share a position")
    det_names = grid["detector_name"][:, 0]
    if len(set(det_names.tolist())) != n_det:
        raise ValueError(f"{where}: column 'detector_name': the same name is used by two detectors")

    x, y = grid["x_mm"][:, 0].copy(), grid["y_mm"][:, 0].copy()
    return Camera(name=name, detector=detectors.astype(np.int64), detector_name=det_names.copy(),
                  detector_type=grid["detector_type"][:, 0].copy(), x_mm=x, y_mm=y, amp_names=amp_names,
                  amp_col=grid["amp_col"][0].copy(), amp_row=grid["amp_row"][0].copy(),
                  gain=grid["gain"].copy(), detector_size_mm=_tile_size(table, x, y, where))


def _tile_size(table: pd.DataFrame, x: np.ndarray, y: np.ndarray, where: str) -> float:
    if "detector_size_mm" in table.columns:
        sizes = _column(table, "detector_size_mm", float, where)
        if np.unique(sizes).size != 1 or sizes[0] <= 0:
            raise ValueError(f"{where}: column 'detector_size_mm': must be one positive value")
        return float(sizes[0])
    if x.size < 2:
        return 1.0
    # Smallest Chebyshev distance between centres: the CCD pitch for a grid of square detectors.
    dist = np.maximum(np.abs(x[:, None] - x[None, :]), np.abs(y[:, None] - y[None, :]))
    dist[np.diag_indices_from(dist)] = np.inf
    size = float(dist.min())
    if size <= 0:
        raise ValueError(f"{where}: columns 'x_mm', 'y_mm': two detectors share a centre")
    return size
