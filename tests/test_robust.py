"""Robust fit (iterative clipping) and uncertainties: against planted faults and noise realisations."""

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr

from flatnorm_dask import measure_scales
from flatnorm_dask.config import load_config
from flatnorm_dask.simulate import SIMPLE_PATTERN, simulate_campaign, write_campaign
from flatnorm_dask.solver import _lower_median
from flatnorm_dask.workflow import run

NOISE = 1e-3


@pytest.fixture(scope="module")
def truth():
    ds = simulate_campaign("lsstcam", n_detectors=30, n_exposures=20, filters=("r_57",), seed=3)["r_57"]
    ds = ds.to_dataset()
    return ds.true_exp_scale.values, ds.true_det_scale.values, ds.amp_count.values.astype(float)


def noisy(truth, rng):
    """B = G x E with log-normal noise of variance NOISE**2 * mean(W) / W (the error model's assumption)."""
    E, G, W = truth
    with np.errstate(invalid="ignore", divide="ignore"):
        scale = NOISE * np.sqrt(np.nanmean(W) / W)
    return G[:, :, None] * E[None, None, :] * np.exp(scale * rng.standard_normal(W.shape))


def relative_to_truth(fit, truth):
    """G / G_true and E / E_true with the common normalisation factor taken out (filled rows dropped)."""
    E, G, _ = truth
    g = np.where(fit.filled_rows, np.nan, fit.vectorG / G)
    c = np.nanmedian(g)
    return g / c, fit.vectorE / E * c


def plant_faults(B):
    """A saturated exposure, an amplifier that dies, a 20% gain jump; returns the faulty cells."""
    B = B.copy()
    clean = B.copy()
    B[:, :, 5] = np.minimum(B[:, :, 5], np.nanpercentile(B[:, :, 5], 70))  # bright amps hit a ceiling
    B[3, 4, 14:] *= 0.02  # dies after exposure 13
    B[7, 2, 10:14] *= 1.2
    with np.errstate(invalid="ignore", divide="ignore"):
        deviation = np.abs(np.log(B / clean))
    return B, deviation


def test_clipping_off_is_the_plain_fit(truth):
    B = noisy(truth, np.random.default_rng(1))
    plain = measure_scales(B, truth[2])
    never = measure_scales(B, truth[2], clip_sigma=1e9)
    assert never.clip_rounds == 0 and not never.clipped.any()
    for name in ("vectorE", "vectorG", "bgModel", "errorE", "errorG"):
        np.testing.assert_array_equal(getattr(never, name), getattr(plain, name))


def test_robust_fit_recovers_truth_and_flags_planted_faults(truth):
    rng = np.random.default_rng(2)
    clean_B = noisy(truth, rng)
    B, deviation = plant_faults(clean_B)
    W = truth[2]
    clean = measure_scales(clean_B, W, tol=1e-12)
    plain = measure_scales(B, W, tol=1e-12)
    robust = measure_scales(B, W, tol=1e-12, clip_sigma=5.0)
    g_clean, e_clean = relative_to_truth(clean, truth)
    g_plain, e_plain = relative_to_truth(plain, truth)
    g_rob, e_rob = relative_to_truth(robust, truth)
    # In units of the fault-free fit's one-sigma uncertainties: the plain fit is biased far beyond the
    # noise, the robust one is within it (the largest of 480 rows may reach ~3.5 sigma by chance; the
    # saturated exposure lost 30% of its cells, so its own error is larger).
    def pulls(g, e, fit):
        return np.abs(g - 1) / (clean.errorG / clean.vectorG), np.abs(e - 1) / (fit.errorE / fit.vectorE)

    pg_clean, pe_clean = pulls(g_clean, e_clean, clean)
    pg_plain, pe_plain = pulls(g_plain, e_plain, clean)
    pg_rob, pe_rob = pulls(g_rob, e_rob, robust)
    assert np.nanmax(pg_clean) < 5 and np.max(pe_clean) < 5
    assert np.nanmax(pg_plain) > 100 and np.max(pe_plain) > 10
    assert np.nanmax(pg_rob) < 5 and np.max(pe_rob) < 5
    # Every cell moved by more than 10 noise sigmas is clipped; few others are.
    planted = (deviation > 10 * NOISE) & np.isfinite(deviation) & (W > 0)
    assert planted.sum() > 20 and robust.clipped[planted].all()
    assert (robust.clipped & ~(deviation > 0)).sum() <= 0.001 * B.size
    assert not (robust.used & robust.clipped).any()
    assert 1 <= robust.clip_rounds <= 5
    # Clipped cells keep their residual against the robust model; the cells of the fit are unchanged.
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = np.log(B / robust.bgModel)
    np.testing.assert_array_equal(robust.residual[robust.clipped], expected[robust.clipped])
    assert np.isfinite(robust.residual[robust.clipped]).all()
    np.testing.assert_array_equal(robust.residual[robust.used], expected[robust.used])


def test_robust_fit_same_on_numpy_and_dask(truth):
    B, _ = plant_faults(noisy(truth, np.random.default_rng(3)))
    W = truth[2]
    # Three iterations a fit: numpy and dask must agree whatever the count (each pass is graphs on dask).
    ref = measure_scales(B, W, 3, clip_sigma=4.0)
    # Four blocks, the last ones partial along both axes: enough for the reductions across blocks; in the
    # test's thread (the blocks' arithmetic, not a scheduler, is compared).
    with dask.config.set(scheduler="synchronous"):
        lazy = measure_scales(da.from_array(B, chunks=(16, 16, 12)), da.from_array(W, chunks=(16, 16, 12)), 3,
                              clip_sigma=4.0)
    assert lazy.clip_rounds == ref.clip_rounds
    np.testing.assert_array_equal(lazy.clipped.compute(), ref.clipped)
    # numpy (BLAS) and dask round the fit's sums apart: residuals of ~1e-3 agree to ~1e-14
    np.testing.assert_allclose(lazy.residual.compute(), ref.residual, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(lazy.vectorG, ref.vectorG, rtol=1e-12)
    np.testing.assert_allclose(lazy.vectorE, ref.vectorE, rtol=1e-12)
    np.testing.assert_allclose(lazy.errorG, ref.errorG, rtol=1e-9)


def test_uncertainties_match_the_spread_over_noise_realisations(truth):
    rng = np.random.default_rng(4)
    log_g, log_e, err_g, err_e = [], [], [], []
    for _ in range(150):
        fit = measure_scales(noisy(truth, rng), truth[2], tol=1e-13)
        log_g.append(np.log(fit.vectorG))
        log_e.append(np.log(fit.vectorE))
        err_g.append(fit.errorG / fit.vectorG)
        err_e.append(fit.errorE / fit.vectorE)
    ratio_g = np.std(log_g, axis=0) / np.mean(err_g, axis=0)
    ratio_e = np.std(log_e, axis=0) / np.mean(err_e, axis=0)
    # 150 realisations: the spread of one standard deviation estimate is about 6%.
    assert 0.9 < np.nanmedian(ratio_g) < 1.1 and 0.85 < np.median(ratio_e) < 1.15
    assert np.nanpercentile(ratio_g, 99) < 1.35 and np.nanpercentile(ratio_g, 1) > 0.7
    assert fit.filled_rows.any() and np.isnan(err_g[0][fit.filled_rows]).all()
    assert np.isfinite(err_g[0][~fit.filled_rows]).all()


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 1001])
def test_lower_median_exact_on_numpy_and_dask(n):
    rng = np.random.default_rng(n)
    x = np.round(rng.standard_normal((n, 3)), 2)  # ties included
    mask = rng.random(x.shape) < 0.8
    mask.flat[0] = True
    expected = np.sort(x[mask])[(mask.sum() - 1) // 2]
    assert _lower_median(x, mask) == pytest.approx(expected, abs=1e-12)
    lazy = _lower_median(da.from_array(x, chunks=(max(1, n // 3), 2)), da.from_array(mask, chunks=(max(1, n // 3), 2)))
    assert lazy == _lower_median(x, mask)


def test_workflow_writes_uncertainties_and_clipped_cells(tmp_path):
    tree = simulate_campaign("lsstcam", n_detectors=9, n_exposures=8, filters=("g_6",), seed=5)
    amp = tree["g_6"].amp_value.values
    # a 20% gain jump on one amplifier for three exposures, in the files themselves
    jump = tree["g_6"].to_dataset()
    jump["amp_value"] = (jump.amp_value.dims, np.where(
        (np.arange(amp.shape[0])[:, None, None] == 2) & (np.arange(amp.shape[1])[None, :, None] == 3)
        & (np.arange(amp.shape[2])[None, None, :] >= 5), amp * 1.2, amp))
    tree["g_6"] = xr.DataTree(jump)
    write_campaign(tree, tmp_path / "in", layout="simple")
    cfg = load_config(None, {"input.root": str(tmp_path / "in"), "input.pattern": SIMPLE_PATTERN,
                             "output.store": str(tmp_path / "s.zarr"), "solve.level": "AMP",
                             "solve.clip_sigma": 5.0})
    run(cfg, show_progress=False)
    ds = xr.open_zarr(tmp_path / "s.zarr", group="g_6").load()
    fit = measure_scales(jump.amp_value.sortby("exposure").values, jump.amp_count.sortby("exposure").values,
                         clip_sigma=5.0)
    np.testing.assert_allclose(ds.det_scale_err.values, fit.errorG, rtol=1e-9)
    np.testing.assert_allclose(ds.exp_scale_err.values, fit.errorE, rtol=1e-9)
    assert ds.attrs["n_clipped"] == int(fit.clipped.sum()) >= 3 and ds.attrs["clip_rounds"] >= 1
    assert not ds.used.sel(detector=2).isel(amp=3, exposure=slice(5, None)).any()
    np.testing.assert_array_equal(ds.used.values, fit.used)
    # The store keeps the residual of clipped cells (the jump, about log 1.2), NaN only where unusable.
    clipped = fit.clipped
    np.testing.assert_allclose(ds.residual.values[clipped], fit.residual[clipped], rtol=1e-9)
    assert (ds.residual.sel(detector=2).isel(amp=3, exposure=slice(5, None)) > 0.1).all()
    np.testing.assert_array_equal(np.isnan(ds.residual.values), np.isnan(fit.residual))
