"""The decomposition against independent loop implementations, on numpy, dask and a LocalCluster."""

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st

from flatnorm_dask import measure_scales
from flatnorm_dask.solver import FitError, max_weight, memory_bytes


def reference_loop(b, w, iterations=10):
    """The documented algorithm written plainly, one np.average per row or column (finite data only)."""
    n_rows, n_exp = b.shape
    log_b = np.log(b)
    log_g = np.zeros(n_rows)
    log_e = np.array([np.average(log_b[:, j] - log_g, weights=w[:, j]) for j in range(n_exp)])
    for _ in range(iterations):
        log_g = np.array([np.average(log_b[i, :] - log_e, weights=w[i, :]) for i in range(n_rows)])
        log_e = np.array([np.average(log_b[:, j] - log_g, weights=w[:, j]) for j in range(n_exp)])
        flux = np.average(np.exp(log_g), weights=w.sum(axis=1))
        log_g = log_g - np.log(flux)
    log_e = np.array([np.average(log_b[:, j] - log_g, weights=w[:, j]) for j in range(n_exp)])
    return np.exp(log_e), np.exp(log_g)


def masked_loop(b, w, iterations=10):
    """The same scheme where a bad cell leaves numerator and denominator (lists of good cells only)."""
    n_rows, n_exp = b.shape
    good = np.isfinite(b) & (b > 0) & np.isfinite(w) & (w > 0)

    def mean(cells):
        vals = [v for v, _ in cells]
        wts = [x for _, x in cells]
        return sum(v * x for v, x in zip(vals, wts)) / sum(wts) if wts else np.nan

    log_g = [0.0] * n_rows
    log_e = [mean([(np.log(b[i, j]) - log_g[i], w[i, j]) for i in range(n_rows) if good[i, j]])
             for j in range(n_exp)]
    for _ in range(iterations):
        log_g = [mean([(np.log(b[i, j]) - log_e[j], w[i, j]) for j in range(n_exp) if good[i, j]])
                 for i in range(n_rows)]
        known = [g for g in log_g if not np.isnan(g)]
        fill = sum(known) / len(known)
        log_g = [fill if np.isnan(g) else g for g in log_g]
        log_e = [mean([(np.log(b[i, j]) - log_g[i], w[i, j]) for i in range(n_rows) if good[i, j]])
                 for j in range(n_exp)]
        row_w = [sum(w[i, j] for j in range(n_exp) if good[i, j]) for i in range(n_rows)]
        flux = sum(rw * np.exp(g) for rw, g in zip(row_w, log_g)) / sum(row_w)
        log_g = [g - np.log(flux) for g in log_g]
    log_e = [mean([(np.log(b[i, j]) - log_g[i], w[i, j]) for i in range(n_rows) if good[i, j]])
             for j in range(n_exp)]
    return np.exp(log_e), np.exp(log_g)


def simulate(n_rows=40, n_exp=12, noise=1e-3, seed=0):
    rng = np.random.default_rng(seed)
    e = rng.uniform(1e4, 4e4, n_exp)
    g = rng.uniform(0.7, 1.3, n_rows)
    b = np.outer(g, e) * np.exp(rng.normal(0, noise, (n_rows, n_exp)))
    w = rng.integers(500_000, 1_000_000, (n_rows, n_exp)).astype(float)
    return b, w, e, g


def test_parity_with_reference_on_finite_data():
    b, w, *_ = simulate(n_rows=60, n_exp=25, noise=0.02)
    e_ref, g_ref = reference_loop(b, w)
    fit = measure_scales(b, w)
    np.testing.assert_allclose(fit.vectorE, e_ref, rtol=1e-12, atol=0)
    np.testing.assert_allclose(fit.vectorG, g_ref, rtol=1e-12, atol=0)
    np.testing.assert_allclose(fit.bgModel, np.outer(g_ref, e_ref), rtol=1e-12)
    assert fit.iterations == 10


@pytest.mark.parametrize("iterations", [0, 1, 3])
def test_parity_other_iteration_counts_and_no_weights(iterations):
    b, _, *_ = simulate(seed=3, noise=0.05)
    e_ref, g_ref = reference_loop(b, np.ones_like(b), iterations)
    fit = measure_scales(b, iterations=iterations)
    np.testing.assert_allclose(fit.vectorE, e_ref, rtol=1e-12)
    np.testing.assert_allclose(fit.vectorG, g_ref, rtol=1e-12)


def test_bad_cells_leave_numerator_and_denominator():
    b, w, *_ = simulate(n_rows=15, n_exp=9, noise=0.01, seed=5)
    b[2, 3] = np.nan
    b[4, 1] = -5.0
    b[5, 5] = 0.0
    b[6, 0] = np.inf
    w[7, 2] = 0.0
    w[8, 8] = np.nan
    b[11, :] = np.nan  # a dead detector
    fit = measure_scales(b, w)
    e_exp, g_exp = masked_loop(b, w)
    np.testing.assert_allclose(fit.vectorE, e_exp, rtol=1e-12)
    np.testing.assert_allclose(fit.vectorG, g_exp, rtol=1e-12)
    assert fit.filled_rows.tolist() == [i == 11 for i in range(15)]
    assert not fit.empty_exposures.any()
    assert not fit.used[2, 3] and not fit.used[7, 2] and fit.used[0, 0]
    assert fit.used.sum() == b.size - 6 - 9


def test_bad_cells_do_not_bias_neighbours():
    """With exact data, masking some cells must still recover the truth exactly (the reference does not)."""
    b, w, e, g = simulate(noise=0.0, seed=2)
    b[3, 4] = np.nan
    w[5, 6] = 0.0
    fit = measure_scales(b, w, tol=1e-14, max_iter=500)
    ratio = fit.vectorE / e
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-10)
    np.testing.assert_allclose(fit.vectorG * ratio[0], g, rtol=1e-10)


def test_empty_exposure_gets_nan_and_is_reported():
    b, w, *_ = simulate(n_rows=10, n_exp=6, seed=9)
    b[:, 2] = np.nan
    fit = measure_scales(b, w)
    assert np.isnan(fit.vectorE[2]) and np.isfinite(np.delete(fit.vectorE, 2)).all()
    assert fit.empty_exposures.tolist() == [False, False, True, False, False, False]
    assert np.isnan(fit.bgModel[:, 2]).all()
    e_exp, g_exp = masked_loop(np.delete(b, 2, axis=1), np.delete(w, 2, axis=1))
    np.testing.assert_allclose(np.delete(fit.vectorE, 2), e_exp, rtol=1e-12)
    np.testing.assert_allclose(fit.vectorG, g_exp, rtol=1e-12)


def test_no_usable_cell_is_an_error():
    with pytest.raises(ValueError, match="no usable cell"):
        measure_scales(np.full((3, 4), np.nan))


def test_bad_arguments():
    b, w, *_ = simulate()
    with pytest.raises(ValueError, match="shape"):
        measure_scales(b, w[:, :3])
    with pytest.raises(ValueError, match="tol must be positive"):
        measure_scales(b, w, tol=0)
    with pytest.raises(ValueError, match="iterations"):
        measure_scales(b, w, iterations=-1)


def test_convergence_mode_stops_at_tolerance():
    b, w, *_ = simulate(noise=0.05, seed=4)
    fit = measure_scales(b, w, tol=1e-11)
    assert fit.converged and fit.max_change < 1e-11
    assert 1 < fit.iterations < 100
    assert fit.history[-2] >= 1e-11  # it did not stop early
    capped = measure_scales(b, w, tol=1e-15, max_iter=2)
    assert capped.iterations == 2 and not capped.converged


def test_residual_scatter_matches_direct_computation():
    b, w, *_ = simulate(noise=0.01, seed=8)
    fit = measure_scales(b, w)
    resid = np.log(b / np.outer(fit.vectorG, fit.vectorE))
    assert fit.residual_scatter == pytest.approx(np.sqrt(np.sum(w * resid**2) / w.sum()), rel=1e-9)
    assert 0.005 < fit.residual_scatter < 0.02


def rms_loop(b, w, used, model):
    """Weighted RMS of log(b / model) over used cells, per row and per column, one row or column at a time."""
    def rms(i_cells):
        cells = [(np.log(b[i, j] / model[i, j]), w[i, j]) for i, j in i_cells if used[i, j]]
        total = sum(x for _, x in cells)
        return np.sqrt(sum(x * r * r for r, x in cells) / total) if cells else np.nan

    n_rows, n_exp = b.shape
    return (np.array([rms([(i, j) for j in range(n_exp)]) for i in range(n_rows)]),
            np.array([rms([(i, j) for i in range(n_rows)]) for j in range(n_exp)]))


def test_residual_is_log_b_over_model_on_every_usable_cell():
    b, w, *_ = simulate(n_rows=15, n_exp=9, noise=0.01, seed=21)
    b[2, 3], b[4, 1], w[7, 2] = np.nan, -1.0, 0.0
    b[11, :] = np.nan  # a row without data: filled G, residual NaN, RMS NaN
    b[:, 6] = np.nan  # an exposure without data: NaN model
    exclude = np.zeros(b.shape, bool)
    exclude[5, 5] = True  # usable, but left out of the fit
    fit = measure_scales(b, w, exclude=exclude)
    usable = np.isfinite(b) & (b > 0) & (w > 0)
    assert fit.used.sum() == usable.sum() - 1 and not fit.used[5, 5]
    # The formula the store used before the solver returned it, bit for bit on the cells of the fit.
    with np.errstate(invalid="ignore", divide="ignore"):
        before = np.where(fit.used, np.log(np.where(fit.used, b, 1.0) / fit.bgModel), np.nan)
    np.testing.assert_array_equal(np.where(fit.used, fit.residual, np.nan), before)
    # A usable cell outside the fit keeps its residual; every unusable cell is NaN.
    assert fit.residual[5, 5] == np.log(b[5, 5] / fit.bgModel[5, 5])
    np.testing.assert_array_equal(np.isnan(fit.residual), ~usable)
    row_rms, exp_rms = rms_loop(b, w, fit.used, fit.bgModel)
    np.testing.assert_allclose(fit.row_rms, row_rms, rtol=1e-12)
    np.testing.assert_allclose(fit.exp_rms, exp_rms, rtol=1e-12)
    assert np.isnan(fit.row_rms[11]) and np.isnan(fit.exp_rms[6]) and np.isfinite(np.delete(fit.exp_rms, 6)).all()
    sq = np.sum(np.where(fit.used, w * fit.residual ** 2, 0.0))
    assert fit.residual_scatter == pytest.approx(np.sqrt(sq / w[fit.used].sum()), rel=1e-13)


def test_residual_is_lazy_on_dask_and_equal_to_numpy():
    b, w, *_ = simulate(n_rows=6 * 4, n_exp=10, seed=22, noise=0.02)
    b[3, 3] = np.nan
    ref = measure_scales(b.reshape(6, 4, 10), w.reshape(6, 4, 10))
    lazy = measure_scales(da.from_array(b.reshape(6, 4, 10), chunks=(2, 3, 4)),
                          da.from_array(w.reshape(6, 4, 10), chunks=(2, 3, 4)))
    assert isinstance(lazy.residual, da.Array) and lazy.residual.shape == (6, 4, 10)
    assert lazy.row_rms.shape == (6, 4) and lazy.exp_rms.shape == (10,)
    # numpy (BLAS) and dask round the fit's sums apart: residuals of ~1e-3 agree to ~1e-14
    np.testing.assert_allclose(lazy.residual.compute(), ref.residual, rtol=1e-9, atol=1e-12)
    assert np.isnan(lazy.residual.compute()[0, 3, 3])
    np.testing.assert_allclose(lazy.row_rms, ref.row_rms, rtol=1e-9)
    np.testing.assert_allclose(lazy.exp_rms, ref.exp_rms, rtol=1e-9)


@pytest.mark.parametrize("clip_sigma", [None, 3.0])
def test_memory_bytes_is_what_the_solver_persists(monkeypatch, clip_sigma):
    """memory_bytes(shape) equals the bytes of the arrays the solver keeps in memory on dask."""
    b, w, *_ = simulate(n_rows=4 * 8, n_exp=16, seed=23, noise=0.01)
    b[5, 2:6] *= 2  # outliers, so that a robust fit runs rounds
    persisted = []
    real_persist = dask.persist

    def spy(*arrays, **kwargs):
        persisted.append(sum(a.nbytes for a in arrays))
        return real_persist(*arrays, **kwargs)

    monkeypatch.setattr(dask, "persist", spy)
    # In the test's thread: a robust fit is a few hundred graphs of a few tasks, and only their bytes matter here.
    monkeypatch.setitem(dask.config.config, "scheduler", "synchronous")
    cube = [da.from_array(x.reshape(4, 8, 16), chunks=(2, 8, 8)) for x in (b, w)]
    # Two iterations a fit: what is held does not depend on how many passes read it.
    fit = measure_scales(*cube, iterations=2, clip_sigma=clip_sigma)
    assert persisted[0] == memory_bytes((4, 8, 16)) == 17 * b.size
    if clip_sigma is None:
        assert len(persisted) == 1
    else:
        # Each round holds the residual while it looks for outliers, then the clipped mask and the weights
        # of the next fit; the search that finds nothing new holds only the residual.
        per_round = memory_bytes((4, 8, 16), clipping=True) - memory_bytes((4, 8, 16))
        assert per_round == 17 * b.size and 1 <= fit.clip_rounds < 5
        assert persisted[1:] == [8 * b.size, b.size, 8 * b.size] * fit.clip_rounds + [8 * b.size]
        assert sum(persisted[1:4]) == per_round
    persisted.clear()
    measure_scales(*cube, iterations=2, clip_sigma=clip_sigma, persist=False)
    assert persisted == []  # streamed: nothing held


def test_amplifier_rows_are_det_times_namp_plus_amp():
    b, w, *_ = simulate(n_rows=5 * 4, n_exp=7, seed=6)
    flat = measure_scales(b, w)
    cube = measure_scales(b.reshape(5, 4, 7), w.reshape(5, 4, 7))
    assert cube.vectorG.shape == (5, 4)
    np.testing.assert_allclose(cube.vectorG[3, 2], flat.vectorG[3 * 4 + 2], rtol=1e-13)
    np.testing.assert_allclose(cube.bgModel.reshape(20, 7), flat.bgModel, rtol=1e-13)


def test_dask_matches_numpy_and_model_stays_lazy():
    b, w, *_ = simulate(n_rows=64, n_exp=30, seed=1, noise=0.02)
    b[3, 3] = np.nan
    ref = measure_scales(b, w)
    lazy = measure_scales(da.from_array(b, chunks=(16, 7)), da.from_array(w, chunks=(16, 7)))
    assert isinstance(lazy.bgModel, da.Array) and isinstance(lazy.used, da.Array)
    np.testing.assert_allclose(lazy.vectorE, ref.vectorE, rtol=1e-12)
    np.testing.assert_allclose(lazy.vectorG, ref.vectorG, rtol=1e-12)
    np.testing.assert_allclose(lazy.bgModel.compute(), ref.bgModel, rtol=1e-12)
    assert lazy.residual_scatter == pytest.approx(ref.residual_scatter, rel=1e-10)


def test_dask_cube_with_chunked_amp_axis():
    b, w, *_ = simulate(n_rows=6 * 8, n_exp=10, seed=11)
    ref = measure_scales(b.reshape(6, 8, 10), w.reshape(6, 8, 10))
    lazy = measure_scales(da.from_array(b.reshape(6, 8, 10), chunks=(2, 3, 4)),
                          da.from_array(w.reshape(6, 8, 10), chunks=(2, 3, 4)))
    np.testing.assert_allclose(lazy.vectorG, ref.vectorG, rtol=1e-12)
    np.testing.assert_allclose(lazy.bgModel.compute(), ref.bgModel, rtol=1e-12)


def test_each_iteration_computes_the_same_small_graph(monkeypatch):
    """Only vectors come back, and the graph does not grow with the iteration count."""
    b, w, *_ = simulate(n_rows=32, n_exp=20, seed=12)
    sizes, returned = [], []
    real_compute = dask.compute

    def spy(*args, **kwargs):
        sizes.append(sum(len(a.__dask_graph__()) for a in args if hasattr(a, "__dask_graph__")))
        out = real_compute(*args, **kwargs)
        returned.append(max(np.size(o) for o in out))
        return out

    monkeypatch.setattr(dask, "compute", spy)
    measure_scales(da.from_array(b, chunks=(8, 5)), da.from_array(w, chunks=(8, 5)), iterations=12)
    per_iteration = sizes[1:13]  # after the constant sums, before the final E and scatter
    assert len(set(per_iteration)) == 1
    assert max(returned) <= max(b.shape)


def test_xarray_input_gives_labelled_output():
    b, w, *_ = simulate(n_rows=4 * 3, n_exp=5, seed=13)
    coords = {"detector": [10, 11, 12, 13], "amp": ["C0", "C1", "C2"], "exposure": [100, 101, 102, 103, 104]}
    values = xr.DataArray(b.reshape(4, 3, 5), dims=("detector", "amp", "exposure"), coords=coords)
    counts = xr.DataArray(w.reshape(4, 3, 5), dims=("detector", "amp", "exposure"), coords=coords)
    fit = measure_scales(values.transpose("exposure", "detector", "amp"), counts)
    ref = measure_scales(b.reshape(4, 3, 5), w.reshape(4, 3, 5))
    assert fit.vectorE.dims == ("exposure",) and fit.vectorE.exposure.values.tolist() == coords["exposure"]
    assert fit.vectorG.dims == ("detector", "amp")
    np.testing.assert_allclose(fit.vectorG.sel(detector=12, amp="C1"), ref.vectorG[2, 1], rtol=1e-13)
    np.testing.assert_allclose(fit.bgModel.values, ref.bgModel, rtol=1e-13)


def test_distributed_cluster_gives_same_numbers(dask_client):
    b, w, *_ = simulate(n_rows=48, n_exp=20, seed=14, noise=0.01)
    b[1, 1] = np.nan
    # Three iterations: each is a round trip to the cluster, and the count is not what is compared.
    ref = measure_scales(b, w, 3)
    fit = measure_scales(da.from_array(b, chunks=(12, 10)), da.from_array(w, chunks=(12, 10)), 3)
    model, residual = dask.compute(fit.bgModel, fit.residual)  # on the session's shared cluster
    np.testing.assert_allclose(fit.vectorE, ref.vectorE, rtol=1e-12)
    np.testing.assert_allclose(fit.vectorG, ref.vectorG, rtol=1e-12)
    np.testing.assert_allclose(model, ref.bgModel, rtol=1e-12)
    np.testing.assert_allclose(residual, ref.residual, rtol=1e-9, atol=1e-12)
    assert np.isnan(residual[1, 1]) and fit.residual_scatter == pytest.approx(ref.residual_scatter, rel=1e-10)


# ---- no silent wrong numbers ---------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # in dask's tasks, before the check
@pytest.mark.parametrize("lazy", [False, True], ids=["numpy", "dask"])
@pytest.mark.parametrize("count", [1e308, 1e200])
def test_one_huge_weight_is_an_error_naming_its_cell(count, lazy):
    """One corrupt pixel count made every scale NaN (1e308) or wrong by orders of magnitude (1e200)."""
    b, w, *_ = simulate(n_rows=10, n_exp=8, seed=21)
    w[3, 5] = count
    if lazy:
        b, w = da.from_array(b, chunks=(5, 4)), da.from_array(w, chunks=(5, 4))
    with pytest.raises(FitError) as err:
        measure_scales(b, w)
    assert str(err.value) == (f"weight {count:.6g} is above the largest the fit's sums can hold "
                              f"({max_weight(80):.3g} for 80 cells) (row 3; exposure 5)")
    assert (err.value.rows, err.value.exposures) == ((3,), (5,))


def test_a_huge_weight_is_named_by_its_labels():
    b, w, *_ = simulate(n_rows=4 * 3, n_exp=5, seed=22)
    w[7, 2] = 1e200  # detector 12 (index 2), amp C1, exposure 102
    coords = {"detector": [10, 11, 12, 13], "amp": ["C0", "C1", "C2"], "exposure": [100, 101, 102, 103, 104],
              "detector_name": ("detector", ["R00_S00", "R00_S01", "R00_S02", "R00_S10"])}
    values = xr.DataArray(b.reshape(4, 3, 5), dims=("detector", "amp", "exposure"), coords=coords)
    counts = xr.DataArray(w.reshape(4, 3, 5), dims=("detector", "amp", "exposure"), coords=coords)
    with pytest.raises(FitError, match=r"\(detector=12 \(R00_S02\) amp=C1; exposure=102\)$"):
        measure_scales(values, counts)
    with pytest.raises(FitError, match=r"\(amp=C1 detector=12 \(R00_S02\); exposure=102\)$"):  # input's order
        measure_scales(values.transpose("exposure", "amp", "detector"), counts)
    with pytest.raises(FitError, match=r"\(detector 2 amp 1; exposure 2\)$"):  # unlabelled cube: indices
        measure_scales(b.reshape(4, 3, 5), w.reshape(4, 3, 5))


def test_weights_up_to_the_bound_give_the_unit_weight_fit():
    """Equal weights drop out of every weighted mean: at the bound, the sums hold and the fit is unchanged."""
    b, _, *_ = simulate(n_rows=30, n_exp=12, noise=0.02, seed=23)
    limit = max_weight(b.size)
    unit = measure_scales(b, np.ones_like(b))
    at_limit = measure_scales(b, np.full_like(b, limit))
    for name in ("vectorE", "vectorG", "errorE", "errorG", "row_rms", "exp_rms"):
        np.testing.assert_allclose(getattr(at_limit, name), getattr(unit, name), rtol=1e-12, err_msg=name)
    assert at_limit.residual_scatter == pytest.approx(unit.residual_scatter, rel=1e-12)
    above = np.full_like(b, limit)
    above[0, 0] = np.nextafter(limit, np.inf)
    with pytest.raises(FitError, match=r"above the largest .* \(row 0; exposure 0\)"):
        measure_scales(b, above)


def test_a_non_finite_result_from_finite_input_is_an_error():
    """Finite values near the float64 limit whose fitted E lies beyond it."""
    big = np.finfo(np.float64).max
    b = np.array([[big, big, big], [big, big / 2, big / 3]])
    assert np.isfinite(b).all()
    with pytest.raises(FitError, match=r"^the fit gave a non-finite exposure scale E from finite input "
                                       r"\(exposure 0\)$"):
        measure_scales(b)


def test_without_degrees_of_freedom_errors_are_nan_not_an_error():
    """One exposure: as many parameters as cells, so no scatter to estimate the uncertainties from."""
    b, w, e, g = simulate(n_rows=6, n_exp=1, noise=0.0, seed=24)
    fit = measure_scales(b, w)
    assert np.isnan(fit.errorE).all() and np.isnan(fit.errorG).all()
    np.testing.assert_allclose(fit.vectorG / fit.vectorG[0], g / g[0], rtol=1e-12)
    np.testing.assert_allclose(b[:, 0] / fit.vectorG, fit.vectorE[0], rtol=1e-12)


# ---- properties -------------------------------------------------------------------------------------

shapes = st.tuples(st.integers(2, 12), st.integers(2, 12))


@st.composite
def campaigns(draw):
    n_rows, n_exp = draw(shapes)
    seed = draw(st.integers(0, 2**32 - 1))
    b, w, *_ = simulate(n_rows, n_exp, noise=draw(st.floats(0, 0.1)), seed=seed)
    return b, w


@settings(max_examples=40, deadline=None)
@given(campaigns(), st.floats(1e-3, 1e3))
def test_scaling_b_changes_only_e(data, factor):
    b, w = data
    base, scaled = measure_scales(b, w), measure_scales(b * factor, w)
    np.testing.assert_allclose(scaled.vectorG, base.vectorG, rtol=1e-9)
    np.testing.assert_allclose(scaled.vectorE, base.vectorE * factor, rtol=1e-9)


@settings(max_examples=40, deadline=None)
@given(campaigns(), st.randoms(use_true_random=False))
def test_permutations_permute_outputs(data, rnd):
    b, w = data
    rows = np.array(rnd.sample(range(b.shape[0]), b.shape[0]))
    cols = np.array(rnd.sample(range(b.shape[1]), b.shape[1]))
    base = measure_scales(b, w)
    perm = measure_scales(b[rows][:, cols], w[rows][:, cols])
    np.testing.assert_allclose(perm.vectorG, base.vectorG[rows], rtol=1e-10)
    np.testing.assert_allclose(perm.vectorE, base.vectorE[cols], rtol=1e-10)


@settings(max_examples=40, deadline=None)
@given(campaigns())
def test_g_weighted_mean_is_one(data):
    b, w = data
    fit = measure_scales(b, w)
    assert np.average(fit.vectorG, weights=w.sum(axis=1)) == pytest.approx(1.0, rel=1e-12)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32 - 1), st.floats(1e-4, 1e-2))
def test_recovers_known_scales_within_noise(seed, noise):
    b, w, e, g = simulate(n_rows=50, n_exp=20, noise=noise, seed=seed)
    fit = measure_scales(b, w, tol=1e-12)
    g_true = g / np.average(g, weights=w.sum(axis=1))
    e_true = e * np.average(g, weights=w.sum(axis=1))
    # Each G averages 20 cells, each E 50: allow 6 sigma of the mean plus the normalisation's own error.
    np.testing.assert_allclose(fit.vectorG, g_true, rtol=6 * noise / np.sqrt(20) + 2 * noise / np.sqrt(50))
    np.testing.assert_allclose(fit.vectorE, e_true, rtol=6 * noise / np.sqrt(50) + 2 * noise / np.sqrt(20))


# ---- warm start ---------------------------------------------------------------------------------------


def _grown(seed=31, n_rows=60, n_old=40, n_new=5, noise=0.02):
    """A campaign and the G of a converged fit of its first ``n_old`` exposures (what a store holds)."""
    b, w, *_ = simulate(n_rows=n_rows, n_exp=n_old + n_new, noise=noise, seed=seed)
    old = measure_scales(b[:, :n_old], w[:, :n_old], tol=1e-12)
    return b, w, old.vectorG


@pytest.mark.parametrize("lazy", [False, True], ids=["numpy", "dask"])
def test_warm_start_converges_in_fewer_iterations_to_the_same_scales(lazy):
    b, w, g_old = _grown()
    if lazy:
        b, w = da.from_array(b, chunks=(20, 15)), da.from_array(w, chunks=(20, 15))
    cold = measure_scales(b, w, tol=1e-10)
    warm = measure_scales(b, w, tol=1e-10, initial_g=g_old)
    assert cold.converged and warm.converged
    assert warm.iterations < cold.iterations
    # Same fixed point: both stop within a few tolerances of it.
    np.testing.assert_allclose(warm.vectorG, cold.vectorG, rtol=1e-8, atol=0)
    np.testing.assert_allclose(warm.vectorE, cold.vectorE, rtol=1e-8, atol=0)
    assert warm.residual_scatter == pytest.approx(cold.residual_scatter, rel=1e-8)


def test_warm_start_from_the_fixed_point_stays_there():
    b, w, *_ = simulate(n_rows=30, n_exp=20, noise=0.01, seed=32)
    fit = measure_scales(b, w, tol=1e-13)
    again = measure_scales(b, w, tol=1e-10, initial_g=fit.vectorG)
    assert again.iterations == 1
    np.testing.assert_allclose(again.vectorG, fit.vectorG, rtol=1e-12)
    np.testing.assert_allclose(again.vectorE, fit.vectorE, rtol=1e-12)


def test_warm_start_with_rows_without_a_starting_value():
    """New detectors, with data in the new exposures only and no starting G, reach the cold start's answer."""
    b, w, *_ = simulate(n_rows=48, n_exp=63, noise=0.02, seed=33)
    new = [3, 17]
    b[new, :60] = np.nan
    old = measure_scales(np.delete(b[:, :60], new, 0), np.delete(w[:, :60], new, 0), tol=1e-12)
    start = np.full(48, np.nan)
    start[np.setdiff1d(np.arange(48), new)] = old.vectorG
    start[5] = 0.0  # not positive: no starting value either
    cold = measure_scales(b, w, tol=1e-10)
    warm = measure_scales(b, w, tol=1e-10, initial_g=start)
    assert warm.iterations < cold.iterations
    np.testing.assert_allclose(warm.vectorG, cold.vectorG, rtol=1e-9)
    np.testing.assert_allclose(warm.vectorE, cold.vectorE, rtol=1e-9)
    # No starting value at all: the cold start itself, bit for bit.
    none = measure_scales(b, w, tol=1e-10, initial_g=np.full(48, np.nan))
    np.testing.assert_array_equal(none.vectorG, cold.vectorG)
    assert none.iterations == cold.iterations


def test_warm_start_of_labelled_input_is_aligned_by_coordinates():
    b, w, g_old = _grown(seed=34, n_rows=4 * 3)
    coords = {"detector": [10, 11, 12, 13], "amp": ["C0", "C1", "C2"], "exposure": np.arange(b.shape[1])}
    values = xr.DataArray(b.reshape(4, 3, -1), dims=("detector", "amp", "exposure"), coords=coords)
    counts = xr.DataArray(w.reshape(4, 3, -1), dims=("detector", "amp", "exposure"), coords=coords)
    # The start knows detectors 13, 12, 11 (in another order, amps first) but not 10: a new detector.
    start = xr.DataArray(g_old.reshape(4, 3), dims=("detector", "amp"),
                         coords={"detector": coords["detector"], "amp": coords["amp"]})
    start = start.sel(detector=[13, 12, 11]).transpose("amp", "detector")
    expected = g_old.reshape(4, 3).copy()
    expected[0] = np.nan
    warm = measure_scales(values, counts, tol=1e-10, initial_g=start)
    raw = measure_scales(b.reshape(4, 3, -1), w.reshape(4, 3, -1), tol=1e-10, initial_g=expected)
    np.testing.assert_array_equal(warm.vectorG.values, raw.vectorG)
    assert warm.iterations == raw.iterations


def test_warm_start_of_the_wrong_shape_is_an_error():
    b, w, *_ = simulate(n_rows=10, n_exp=6, seed=35)
    with pytest.raises(ValueError, match=r"initial_g shape \(9,\) differs from the row shape \(10,\)"):
        measure_scales(b, w, initial_g=np.ones(9))
    with pytest.raises(ValueError, match=r"initial_g shape \(10,\) differs from the row shape \(2, 5\)"):
        measure_scales(b.reshape(2, 5, 6), w.reshape(2, 5, 6), initial_g=np.ones(10))
