"""Figures show the store's numbers: tile values are the scales, masked cells stay masked."""

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from flatnorm_dask import plot  # noqa: E402
from flatnorm_dask.camera import load_camera  # noqa: E402
from flatnorm_dask.simulate import simulate_campaign  # noqa: E402
from flatnorm_dask.workflow import scale_dataset, solve_dataset  # noqa: E402


def solved(level, n_detectors=18):
    tree = simulate_campaign("lsstcam", n_detectors=n_detectors, n_exposures=5, filters=("r_57",), seed=4)
    ds = tree["r_57"].to_dataset()
    ds["status"] = ds["det_value"].notnull().astype(np.uint8) * 0
    fit = solve_dataset(ds, level)
    out = scale_dataset(ds, fit, level, attrs={"physical_filter": "r_57"})
    return out.load(), ds


def test_focal_plane_detector_tiles_hold_the_scales():
    out, ds = solved("DETECTOR")
    fig = plot.focal_plane(out, "lsstcam")
    tiles = fig.axes[0].collections[0]
    values = tiles.get_array()
    assert values.shape == (out.sizes["detector"],)
    # The simulation's dead detector has no usable cell: its G is only the fill value, shown as masked.
    dead = ~out["used"].any("exposure").values
    assert dead.sum() == 1 and np.isfinite(out["det_scale"].values[dead]).all()
    np.testing.assert_array_equal(np.ma.getmaskarray(values), dead)
    np.testing.assert_allclose(values.data[~dead], out["det_scale"].values[~dead])
    # A tile sits where the camera puts its detector.
    cam = load_camera("lsstcam")
    det = int(out.detector[4])
    i = list(cam.detector).index(det)
    x0, y0 = tiles.get_paths()[4].vertices.min(axis=0)
    assert x0 == pytest.approx(cam.x_mm[i] - cam.detector_size_mm / 2)
    assert y0 == pytest.approx(cam.y_mm[i] - cam.detector_size_mm / 2)
    labels = [t.get_text() for t in fig.axes[0].texts]
    assert str(cam.detector_name[i]) in labels


def test_focal_plane_amp_tiles_follow_layout():
    out, _ = solved("AMP", n_detectors=3)
    fig = plot.focal_plane(out, "lsstcam")
    values = fig.axes[0].collections[0].get_array()
    assert values.shape == (3 * out.sizes["amp"],)
    dead = ~out["used"].any("exposure").values.reshape(-1)  # amplifiers of the dead detector
    assert dead.sum() == out.sizes["amp"]
    np.testing.assert_array_equal(np.ma.getmaskarray(values), dead)
    np.testing.assert_allclose(values.data[~dead], out["det_scale"].values.reshape(-1)[~dead])


def test_residual_map_masks_unused_cells():
    out, ds = solved("AMP", n_detectors=9)
    fig = plot.residual_map(out)
    image = fig.axes[0].images[0].get_array()
    used = out["used"].transpose("detector", "amp", "exposure").values.reshape(image.shape)
    assert (~used).any()  # the simulation has dead cells
    np.testing.assert_array_equal(np.ma.getmaskarray(image), ~used)
    resid = out["residual"].transpose("detector", "amp", "exposure").values.reshape(image.shape)
    np.testing.assert_allclose(image.data[used], resid[used])


def test_histogram_counts_used_cells_and_exposure_plot_values():
    out, _ = solved("DETECTOR")
    fig = plot.residual_histogram(out)
    counted = sum(p.get_height() for p in fig.axes[0].patches)
    assert counted == int(out["used"].sum())
    fig = plot.exposure_scales(out)
    line = fig.axes[0].lines[0]
    np.testing.assert_array_equal(line.get_xdata(), out.exposure.values)
    np.testing.assert_allclose(line.get_ydata(), out["exp_scale"].values)
