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


def test_histogram_shows_clipped_cells_with_their_residual():
    tree = simulate_campaign("lsstcam", n_detectors=9, n_exposures=8, filters=("r_57",), seed=5)
    ds = tree["r_57"].to_dataset()
    jump = (ds.detector == ds.detector[2]) & (ds.amp == ds.amp[3]) & (ds.exposure >= ds.exposure[5])
    ds["amp_value"] = ds["amp_value"].where(~jump, ds["amp_value"] * 1.2)  # a gain jump: cells to clip
    ds["status"] = ds["det_value"].notnull().astype(np.uint8) * 0
    fit = solve_dataset(ds, "AMP", clip_sigma=5.0)
    out = scale_dataset(ds, fit, "AMP").load()
    clipped = fit.clipped.transpose(*out["residual"].dims).values
    assert clipped.sum() >= 3 and np.isfinite(out["residual"].values[clipped]).all()
    fig = plot.residual_histogram(out, bins=40)
    heights = np.array([p.get_height() for p in fig.axes[0].patches])
    assert heights.size == 80  # used, then left out
    assert heights[:40].sum() == int(out["used"].sum()) and heights[40:].sum() == clipped.sum()
    edges = [p.get_x() for p in fig.axes[0].patches[40:]] + [fig.axes[0].patches[-1].get_x()
                                                             + fig.axes[0].patches[-1].get_width()]
    counts, _ = np.histogram(out["residual"].values[clipped], bins=np.array(edges))
    np.testing.assert_array_equal(heights[40:], counts)
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == [
        f"used ({int(out['used'].sum())})", f"left out ({clipped.sum()})"]


def test_plot_store_uses_the_recorded_config(tmp_path, monkeypatch):
    from flatnorm_dask.store import StoreError, write_store

    out, _ = solved("DETECTOR", n_detectors=4)
    config = {"input": {"root": "/data", "pattern": "{exposure}/{detector}.yaml", "camera": "testcam"}}
    store = write_store(tmp_path / "s.zarr", {"r_57": out}, root_attrs={"config": config})
    cameras = []
    real = plot.focal_plane

    def focal_plane(ds, camera=None, **kwargs):
        cameras.append(camera)  # the simulated detectors are LSSTCam's: draw on that geometry
        return real(ds, "lsstcam", **kwargs)

    monkeypatch.setattr(plot, "focal_plane", focal_plane)
    written = plot.plot_store(store, tmp_path / "figures")
    assert cameras == ["testcam"]
    assert sorted(p.name for p in written) == [f"r_57_{kind}.png" for kind in
                                               ("exposure_scales", "focal_plane", "residual_hist", "residual_map")]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in written)
    bad = write_store(tmp_path / "bad.zarr", {"r_57": out}, root_attrs={"config": {"input": {"camera": 7}}})
    with pytest.raises(StoreError, match=f"^{bad}: config attribute: input.camera: expected a non-empty string"):
        plot.plot_store(bad, tmp_path / "bad")
