"""Camera geometry: the packaged LSSTCam and test cameras, and errors for malformed camera files."""

import re
import shutil
from importlib import resources

import numpy as np
import pandas as pd
import pytest

from flatnorm_dask.camera import Camera, load_camera
from helpers import DATA

SHARED_AMPS = DATA / "lsstcam_amplifiers.csv"  # the obs_lsst-derived table, see tests/data/README.md
LSST_AMPS = ("C10", "C11", "C12", "C13", "C14", "C15", "C16", "C17",
             "C07", "C06", "C05", "C04", "C03", "C02", "C01", "C00")
CORNER_RAFTS = {"R00", "R04", "R40", "R44"}


@pytest.fixture(scope="module")
def lsstcam() -> Camera:
    return load_camera("lsstcam")


def test_lsstcam_detectors_and_amplifiers(lsstcam):
    assert lsstcam.name == "lsstcam"
    assert lsstcam.n_detector == 189
    np.testing.assert_array_equal(lsstcam.detector, np.arange(189))
    assert lsstcam.detector_id("R22_S11") == 94
    assert lsstcam.detector_name[94] == "R22_S11"
    assert lsstcam.amp_names == LSST_AMPS
    assert lsstcam.n_amp == 16
    assert lsstcam.gain.shape == (189, 16)
    assert set(lsstcam.detector_type) == {"E2V", "ITL"}
    assert lsstcam.detector_size_mm == 42.25


def test_lsstcam_matches_the_shared_amplifier_table(lsstcam):
    shared = pd.read_csv(SHARED_AMPS).sort_values(["detector", "amp_index"])
    assert len(shared) == lsstcam.n_detector * lsstcam.n_amp
    np.testing.assert_array_equal(lsstcam.gain, shared["gain"].to_numpy().reshape(189, 16))  # exact
    per_det = shared.drop_duplicates("detector")
    np.testing.assert_array_equal(lsstcam.detector_name, per_det["detector_name"])
    np.testing.assert_array_equal(lsstcam.detector_type, per_det["detector_type"])
    assert tuple(shared["amp_name"][:16]) == lsstcam.amp_names


def test_lsstcam_positions_on_the_nominal_grid(lsstcam):
    i = lsstcam.detector_id("R22_S11")
    assert (lsstcam.x_mm[i], lsstcam.y_mm[i]) == (0.0, 0.0)
    for name, x, y in zip(lsstcam.detector_name, lsstcam.x_mm, lsstcam.y_mm):
        r, c, s, t = map(int, re.fullmatch(r"R(\d)(\d)_S(\d)(\d)", name).groups())
        assert x == (c - 2) * 127.0 + (t - 1) * 42.25, name  # first digit row (y), second column (x)
        assert y == (r - 2) * 127.0 + (s - 1) * 42.25, name
    # Known corners: R01 bottom row left of centre, R10 left column below centre, R43 top right.
    assert lsstcam.y_mm[lsstcam.detector_id("R01_S11")] == -254.0
    assert lsstcam.x_mm[lsstcam.detector_id("R10_S11")] == -254.0
    assert (lsstcam.x_mm[188], lsstcam.y_mm[188]) == (169.25, 296.25)
    # No two detectors overlap: centres at least one CCD pitch apart in x or y.
    dx = np.abs(lsstcam.x_mm[:, None] - lsstcam.x_mm[None, :])
    dy = np.abs(lsstcam.y_mm[:, None] - lsstcam.y_mm[None, :])
    off_diag = ~np.eye(189, dtype=bool)
    assert np.maximum(dx, dy)[off_diag].min() == 42.25


def test_lsstcam_has_no_corner_rafts(lsstcam):
    rafts = {str(n)[:3] for n in lsstcam.detector_name}
    assert len(rafts) == 21
    assert not rafts & CORNER_RAFTS
    for raft in rafts:
        assert sum(str(n).startswith(raft) for n in lsstcam.detector_name) == 9
    # Geometrically: nothing in the 127 mm corner cells of the 5 x 5 grid.
    in_corner = (np.abs(lsstcam.x_mm) > 190) & (np.abs(lsstcam.y_mm) > 190)
    assert not in_corner.any()


def test_amplifier_layout(lsstcam):
    for name, col, row in zip(lsstcam.amp_names, lsstcam.amp_col, lsstcam.amp_row):
        assert (row, col) == (int(name[1]), int(name[2]))
    layout = set(zip(lsstcam.amp_col.tolist(), lsstcam.amp_row.tolist()))
    assert layout == {(c, r) for c in range(8) for r in range(2)}
    x, y = lsstcam.amp_centres()
    assert x.shape == y.shape == (189, 16)
    i = lsstcam.detector_id("R22_S11")
    np.testing.assert_allclose(x[i].mean(), 0.0, atol=1e-12)
    assert (y[i][lsstcam.amp_row == 1] > 0).all() and (y[i][lsstcam.amp_row == 0] < 0).all()  # C1x on top


def test_detector_id_unknown_name(lsstcam):
    with pytest.raises(KeyError, match="R00_S11"):
        lsstcam.detector_id("R00_S11")


def test_subset(lsstcam):
    sub = lsstcam.subset(5)
    assert sub.n_detector == 5 and sub.n_amp == 16
    np.testing.assert_array_equal(sub.detector, np.arange(5))
    np.testing.assert_array_equal(sub.gain, lsstcam.gain[:5])
    assert sub.name == lsstcam.name and sub.detector_size_mm == lsstcam.detector_size_mm
    for bad in (0, 190):
        with pytest.raises(ValueError, match="n_detectors"):
            lsstcam.subset(bad)


def test_camera_arrays_are_read_only(lsstcam):
    with pytest.raises(ValueError):
        lsstcam.gain[0, 0] = 1.0


def test_testcam():
    cam = load_camera("testcam")
    assert cam.n_detector == 9 and cam.n_amp == 8
    np.testing.assert_array_equal(cam.detector, np.arange(9))
    assert list(cam.detector_name) == [f"R22_S{s}{t}" for s in range(3) for t in range(3)]
    assert cam.amp_names == ("C10", "C11", "C12", "C13", "C03", "C02", "C01", "C00")
    assert np.all(np.abs(cam.gain / 1.5 - 1) <= 0.025 + 1e-12)
    assert np.unique(cam.gain).size > 5  # a real spread, not a constant
    assert (cam.x_mm[4], cam.y_mm[4]) == (0.0, 0.0)
    assert cam.detector_size_mm == 42.25


def _testcam_table() -> pd.DataFrame:
    with (resources.files("flatnorm_dask") / "data" / "testcam.csv").open() as f:
        return pd.read_csv(f, dtype=str, keep_default_na=False)


def test_load_from_path(tmp_path):
    path = tmp_path / "mycam.csv"
    with (resources.files("flatnorm_dask") / "data" / "testcam.csv").open("rb") as src, open(path, "wb") as dst:
        shutil.copyfileobj(src, dst)
    cam = load_camera(path)
    ref = load_camera("testcam")
    assert cam.name == "mycam"
    np.testing.assert_array_equal(cam.gain, ref.gain)
    np.testing.assert_array_equal(cam.x_mm, ref.x_mm)
    # Row order in the file does not matter.
    _testcam_table().sample(frac=1.0, random_state=1).to_csv(path, index=False)
    np.testing.assert_array_equal(load_camera(str(path)).gain, ref.gain)


def _cell(column, row, value):
    """An edit setting one cell (row counts data rows from 0; the file line is row + 2)."""
    return lambda t: t.assign(**{column: t[column].where(t.index != row, value)})


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.drop(columns=["gain"]), r"lacks column\(s\) 'gain'"),
        (lambda t: t.drop(columns=["x_mm", "amp_row"]), r"'x_mm', 'amp_row'"),
        (_cell("gain", 5, "abc"), r"column 'gain', line 7: not a finite number: 'abc'"),
        (_cell("gain", 0, "-1.5"), r"column 'gain', line 2: gain must be positive"),
        (_cell("detector", 3, "2.5"), r"column 'detector', line 5: not an integer"),
        (_cell("detector_name", 9, "R22_S99"), r"column 'detector_name'.*detector 1"),
        (_cell("amp_name", 12, "C99"), r"column 'amp_name'.*detector 1"),
        (_cell("amp_index", 1, "0"), r"column 'amp_index'.*detector 0"),
        (lambda t: t.drop(index=[20]), r"different numbers of amplifiers"),
        (lambda t: t.assign(x_mm="0.0", y_mm="0.0"), r"share a centre"),
        (lambda t: t.iloc[:0], r"no rows"),
    ],
)
def test_malformed_camera_csv(tmp_path, edit, message):
    path = tmp_path / "broken.csv"
    edit(_testcam_table()).to_csv(path, index=False)
    with pytest.raises(ValueError, match=message) as info:
        load_camera(path)
    assert str(path) in str(info.value)


def test_unknown_camera_name():
    with pytest.raises(ValueError, match="unknown camera 'hsc'.*lsstcam, testcam"):
        load_camera("hsc")


def test_unreadable_camera_file(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("")
    with pytest.raises(ValueError, match="empty.csv"):
        load_camera(path)
