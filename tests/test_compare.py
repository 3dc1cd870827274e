"""Comparing campaigns: simulated campaigns of one camera with planted gain changes, solved into stores,
compared; the numbers are checked against a numpy computation on the stores and against the
simulation's truth."""

import datetime as dt
import functools

import numpy as np
import pytest
import xarray as xr

import flatnorm_dask as fn
from flatnorm_dask.camera import load_camera
from flatnorm_dask.cli import main
from flatnorm_dask.compare import EXPOSURE_SCALES_NOTE, compare, comparison_summary, flagged_rows
from flatnorm_dask.simulate import simulate_campaign
from flatnorm_dask.store import StoreError, open_store, read_commit, write_store
from flatnorm_dask.workflow import scale_dataset, solve_dataset

N_DET, N_EXP, SEED = 12, 8, 3
DAYS = {"a": 20251120, "b": 20260115, "c": 20260301}


def campaign(name, filters, **extra):
    return simulate_campaign("lsstcam", n_detectors=N_DET, n_exposures=N_EXP, filters=filters, seed=SEED,
                             day_obs=DAYS[name], **extra)


def to_store(tree, root, name):
    """Solve every filter of a campaign at amplifier level and write the store as the workflow does (the same
    solve_dataset / scale_dataset / write_store; the files and their reading are tested elsewhere)."""
    groups = {}
    for physical_filter, node in tree.children.items():
        ds = node.to_dataset()
        ds["status"] = xr.zeros_like(ds["det_count"], dtype=np.uint8)
        fit = solve_dataset(ds, "AMP")
        groups[physical_filter] = scale_dataset(ds, fit, "AMP", attrs={"physical_filter": physical_filter,
                                                                       "camera": "lsstcam"})
    return write_store(root / f"{name}.zarr", groups)


def without(tree, detector=None, amp=None):
    """The campaign without one detector, or with one amplifier masked in every exposure (r_57)."""
    children = {}
    for name, node in tree.children.items():
        ds = node.to_dataset()
        if detector is not None:
            ds = ds.drop_sel(detector=detector)
        if amp is not None and name == "r_57":
            cell = (ds.detector == amp[0]) & (ds.amp == amp[1])
            ds["amp_value"] = ds["amp_value"].where(~cell)
            ds["amp_count"] = ds["amp_count"].where(~cell, 0)
        children[name] = ds
    return xr.DataTree.from_dict({"/": xr.Dataset(attrs=tree.attrs), **children})


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Three campaigns of one camera: A; B (another realisation, three amplifiers' gains up 2 %, one detector
    left out, one amplifier dead); C (another realisation, the same three up 3 %)."""
    root = tmp_path_factory.mktemp("campaigns")
    a = campaign("a", ("r_57", "g_6"))
    dead = a.attrs["dead_detector"]
    live = [int(d) for d in a["r_57"]["detector"].values if d != dead]
    planted = [(live[1], "C13"), (live[4], "C02"), (live[6], "C17")]
    left_out, masked = live[9], (live[3], "C05")
    b = campaign("b", ("r_57", "i_39"), noise_seed=11, gain_change={row: 1.02 for row in planted})
    c = campaign("c", ("r_57",), noise_seed=12, gain_change={row: 1.03 for row in planted})
    b_written = without(without(b, detector=left_out), amp=masked)
    paths = {"a": to_store(a, root, "a"), "b": to_store(b_written, root, "b"), "c": to_store(c, root, "c")}
    return {"paths": paths, "truth": {"a": a, "b": b, "c": c}, "planted": planted, "dead": dead,
            "masked": masked, "left_out": left_out}


@functools.lru_cache
def stored(path, name="r_57"):
    """A store's group read with xarray alone (not through the package), loaded."""
    return xr.open_zarr(path, group=name, consolidated=False).load()


def expected_ratio(ref, other):
    """Ratio, uncertainty and significance of G computed here from two stores' groups, in numpy."""
    g_a, g_b = (ds["det_scale"].transpose("detector", "amp").reset_coords(drop=True) for ds in (ref, other))
    e_a, e_b = (ds["det_scale_err"].transpose("detector", "amp").reset_coords(drop=True) for ds in (ref, other))
    g_a, g_b = xr.align(g_a, g_b, join="outer")
    e_a, e_b = xr.align(e_a, e_b, join="outer")
    both = np.isfinite(e_a.values) & np.isfinite(e_b.values) & np.isfinite(g_a.values) & np.isfinite(g_b.values)
    raw = g_b.values / g_a.values
    norm = np.median(raw[both])
    ratio = np.where(both, raw / norm, np.nan)
    err = ratio * np.sqrt((e_a.values / g_a.values) ** 2 + (e_b.values / g_b.values) ** 2)
    labels = (g_a["detector"].values, g_a["amp"].values)
    return ratio, err, (ratio - 1) / err, norm, labels


def test_planted_gain_changes_are_flagged_and_nothing_else(stores):
    a, b = stores["paths"]["a"], stores["paths"]["b"]
    out = compare(a, b, threshold=5.0)
    assert list(out.children) == ["r_57"] and out.attrs["filters"] == ["r_57"]
    ds = out["r_57"].to_dataset().transpose("store", "detector", "amp")
    assert ds["store"].values.tolist() == [str(a), str(b)] and ds.attrs["level"] == "AMP"

    # The numbers, against the same formulas computed here on the stores (read by xarray alone).
    ratio, err, sig, norm, (dets, amps) = expected_ratio(stored(a), stored(b))
    got = ds.sel(detector=dets, amp=amps)
    np.testing.assert_allclose(got["ratio"].values[1], ratio, rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(got["ratio_err"].values[1], err, rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(got["significance"].values[1], sig, rtol=1e-9, atol=1e-12, equal_nan=True)
    assert ds.attrs["normalisation"] == [1.0, pytest.approx(norm, rel=1e-14)]

    # Exactly the planted amplifiers move beyond 5 sigma.
    rows, cols = np.nonzero(ds["flagged"].transpose("detector", "amp").values)
    assert {(int(ds["detector"][i]), str(ds["amp"][j].item())) for i, j in zip(rows, cols)} == set(stores["planted"])
    np.testing.assert_array_equal(got["flagged"].values, np.abs(np.nan_to_num(sig)) > 5.0)

    # And the ratios are the truth's: G of B over G of A (the planted ones 1 / 1.02), normalised the same way,
    # within the stated uncertainties; the uncertainties are honest (pulls of unit spread).
    ta, tb = (stores["truth"][k]["r_57"]["true_det_scale"].transpose("detector", "amp") for k in ("a", "b"))
    truth = (tb / ta).reindex(detector=ds["detector"], amp=ds["amp"]).values
    present = ds["present"].values.all(axis=0)
    truth = truth / np.median(truth[present])
    pull = (ds["ratio"].values[1] - truth)[present] / ds["ratio_err"].values[1][present]
    assert np.abs(pull).max() < 5 and 0.7 < pull.std() < 1.3
    for det, amp in stores["planted"]:
        row = ds.sel(detector=det, amp=amp)
        assert float(row["ratio"][1]) == pytest.approx(1 / 1.02, abs=5 * float(row["ratio_err"][1]))
        assert float(row["significance"][1]) < -20
    # The reference against itself: ratio 1, no uncertainty, no significance, where it has the row.
    ref_present = ds["present"].values[0]
    assert (ds["ratio"].values[0][ref_present] == 1).all() and (ds["ratio_err"].values[0][ref_present] == 0).all()
    assert np.isnan(ds["ratio"].values[0][~ref_present]).all()


def test_a_store_compared_with_itself_moves_nowhere(stores):
    a = stores["paths"]["a"]
    out = compare(a, a)
    assert out.attrs["stores"] == [str(a), f"{a} #2"]
    assert set(out.children) == {"r_57", "g_6"} and out.attrs["filters_in_some_stores"] == {}
    for name, node in out.children.items():
        ds = node.to_dataset()
        present = ds["present"].values
        np.testing.assert_array_equal(present[0], present[1])
        assert present[0].sum() == (N_DET - 1) * 16  # all but the dead detector
        assert (ds["ratio"].values[:, present[0]] == 1.0).all()  # exactly
        assert (ds["significance"].values[:, present[0]] == 0.0).all()
        assert not ds["flagged"].values.any() and ds.attrs["partial_rows"] == []
        assert ds.attrs["normalisation"] == [1.0, 1.0]
        np.testing.assert_array_equal(ds["det_scale"].values[0], ds["det_scale"].values[1])
    assert "0 row(s) moved beyond 5 sigma" in comparison_summary(out)


def test_rows_and_filters_present_in_only_some_stores(stores):
    a, b = stores["paths"]["a"], stores["paths"]["b"]
    out = compare(a, b)
    assert out.attrs["filters_in_some_stores"] == {"g_6": [str(a)], "i_39": [str(b)]}
    assert out.attrs["levels_differ"] == {} and out.attrs["exposure_scales"] == EXPOSURE_SCALES_NOTE
    ds = out["r_57"].to_dataset()
    names = dict(zip(ds["detector"].values.tolist(), ds["detector_name"].values.tolist()))
    masked_det, masked_amp = stores["masked"]
    gone = stores["left_out"]
    expected = [{"detector": gone, "detector_name": names[gone], "amp": amp, "present_in": [str(a)]}
                for amp in ds["amp"].values.tolist()]
    expected.append({"detector": masked_det, "detector_name": names[masked_det], "amp": masked_amp,
                     "present_in": [str(a)]})
    key = lambda row: (row["detector"], row["amp"])  # noqa: E731
    assert sorted(ds.attrs["partial_rows"], key=key) == sorted(expected, key=key)
    assert names[gone] == str(load_camera("lsstcam").detector_name[gone])  # names come from the stores (the camera's)
    # The masked amplifier has a G in B's store (the fill value) but no uncertainty: absent, as in the mask.
    b_group = stored(b)
    assert np.isfinite(b_group["det_scale"].sel(detector=masked_det, amp=masked_amp))
    assert np.isnan(b_group["det_scale_err"].sel(detector=masked_det, amp=masked_amp))
    present = ds["present"].transpose("store", "detector", "amp")
    assert not present.sel(detector=gone).values[1].any() and present.sel(detector=gone).values[0].all()
    assert not bool(present.sel(detector=masked_det, amp=masked_amp)[1])
    dead = stores["dead"]
    assert not present.sel(detector=dead).values.any()  # absent everywhere: not listed as partial
    # Campaign times come from the exposures' day_obs.
    assert ds["campaign_time"].values.tolist() == [dt.datetime(2025, 11, 20), dt.datetime(2026, 1, 15)]
    assert ds["time_source"].values.tolist() == ["day_obs", "day_obs"]
    text = comparison_summary(out)
    lines = text.splitlines()
    assert "  17 row(s) present in only some stores:" in lines
    assert f"    {names[gone]} C10: only in {a}" in lines
    assert f"    {names[masked_det]} {masked_amp}: only in {a}" in lines
    assert f"g_6: not compared, only in {a}\ni_39: not compared, only in {b}\n" in text


def test_three_stores_draw_each_flagged_rows_history(stores, tmp_path):
    pytest.importorskip("matplotlib")
    from flatnorm_dask import plot

    paths = [stores["paths"][k] for k in ("a", "b", "c")]
    out = compare(*paths)
    ds = out["r_57"].to_dataset()
    moved = flagged_rows(ds)
    # Flagged: the planted rows, most significant first (the 3 % change of C decides).
    assert {(int(d), str(a)) for d, a in zip(moved["detector"].values, moved["amp"].values)} == \
        set(stores["planted"])
    strength = np.abs(moved["significance"].values[1:]).max(axis=0)
    assert (np.diff(strength) <= 0).all()
    fig = plot.flagged_history(ds)
    panels = [ax for ax in fig.axes if ax.containers]
    assert len(panels) == 3
    times = np.array([np.datetime64(f"{d // 10000}-{d // 100 % 100:02d}-{d % 100:02d}") for d in DAYS.values()])
    for k, ax in enumerate(panels):
        det, amp = int(moved["detector"].values[k]), str(moved["amp"].values[k])
        assert ax.get_title() == f"{moved['detector_name'].values[k]} {amp}"
        # The points: each store's G of the row over its normalisation (the median ratio to A's G), computed
        # here from the stores.
        g = np.array([float(stored(p)["det_scale"].sel(detector=det, amp=amp)) for p in paths])
        err = np.array([float(stored(p)["det_scale_err"].sel(detector=det, amp=amp)) for p in paths])
        norms = [1.0] + [expected_ratio(stored(paths[0]), stored(p))[3] for p in paths[1:]]
        points = ax.containers[0].lines[0]
        np.testing.assert_array_equal(np.asarray(points.get_xdata()).astype("datetime64[D]"), times)
        np.testing.assert_allclose(points.get_ydata(), g / norms, rtol=1e-12)
        bars = ax.containers[0].lines[2][0].get_segments()
        np.testing.assert_allclose([s[1, 1] - s[0, 1] for s in bars], 2 * err / norms, rtol=1e-9)
        # 1, 1/1.02, 1/1.03 of the first campaign's G, within the noise.
        np.testing.assert_allclose(g / norms / (g[0]), [1, 1 / 1.02, 1 / 1.03], atol=5 * err.max() / g[0])

    written = plot.plot_comparison(out, tmp_path)
    assert sorted(p.name for p in written) == ["r_57_flagged_history.png", "r_57_ratio_1.png", "r_57_ratio_2.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in written)


def test_ratio_map_shows_the_ratio_and_outlines_the_flagged(stores):
    pytest.importorskip("matplotlib")
    from flatnorm_dask import plot
    from flatnorm_dask.camera import load_camera

    out = compare(stores["paths"]["a"], stores["paths"]["b"])
    ds = out["r_57"].to_dataset()
    one = ds.isel(store=1)
    fig = plot.focal_plane(one, variable="ratio", outline="flagged", centre=1.0)
    tiles, outlines = fig.axes[0].collections
    values = one["ratio"].transpose("detector", "amp").values.reshape(-1)
    np.testing.assert_array_equal(np.ma.getmaskarray(tiles.get_array()), np.isnan(values))
    np.testing.assert_allclose(tiles.get_array().data[~np.isnan(values)], values[~np.isnan(values)])
    assert tiles.norm.vcenter == 1.0
    # One outline per flagged amplifier, where the camera puts that amplifier.
    cam = load_camera("lsstcam")
    flagged = np.flatnonzero(one["flagged"].transpose("detector", "amp").values.reshape(-1))
    assert len(outlines.get_paths()) == len(stores["planted"]) == flagged.size
    tile_corners = [tiles.get_paths()[i].vertices.min(axis=0) for i in flagged]
    outline_corners = [p.vertices.min(axis=0) for p in outlines.get_paths()]
    np.testing.assert_allclose(outline_corners, tile_corners)
    det, amp = stores["planted"][0]
    i = list(cam.detector).index(det)
    col = int(cam.amp_col[cam.amp_names.index(amp)])
    x0 = cam.x_mm[i] - cam.detector_size_mm / 2 + col * cam.detector_size_mm / (int(cam.amp_col.max()) + 1)
    assert any(c[0] == pytest.approx(x0) for c in outline_corners)


def test_cli_compare_names_the_flagged_rows_and_writes_the_comparison(stores, tmp_path, capsys):
    a, b = stores["paths"]["a"], stores["paths"]["b"]
    assert main(["--quiet", "compare", str(a), str(b), "--threshold", "5", "--out", str(tmp_path / "cmp")]) == 0
    text = capsys.readouterr().out
    ds = compare(a, b)["r_57"].to_dataset()
    moved = flagged_rows(ds)
    assert f"  3 row(s) moved beyond 5 sigma:\n" in text
    for k in range(3):
        row = moved.isel(row=k)
        line = (f"    {row['detector_name'].item()} {row['amp'].item()}: {b} ratio {float(row['ratio'][1]):.5f} "
                f"+/- {float(row['ratio_err'][1]):.5f} ({float(row['significance'][1]):+.1f} sigma)")
        assert line in text
    assert f"only in {a}" in text and f"note: {EXPOSURE_SCALES_NOTE}" in text
    # The comparison is a complete store: it reads back as the same tree.
    saved = open_store(tmp_path / "cmp" / "comparison.zarr")
    back = saved["r_57"].to_dataset().load()
    for var in ("det_scale", "det_scale_err", "present", "ratio", "ratio_err", "significance", "flagged"):
        np.testing.assert_array_equal(back[var].values, ds[var].values)
    np.testing.assert_array_equal(back["campaign_time"].values, ds["campaign_time"].values)
    assert back.attrs["partial_rows"] == ds.attrs["partial_rows"]
    assert saved.attrs["filters_in_some_stores"] == {"g_6": [str(a)], "i_39": [str(b)]}
    assert sorted(p.name for p in (tmp_path / "cmp").glob("*.png")) == ["r_57_ratio_1.png"]

    # A comparison store is not a scales store: comparing it is refused in one line naming it and the group.
    assert main(["compare", str(tmp_path / "cmp" / "comparison.zarr"), str(a), "--out", str(tmp_path / "cmp")]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"flatnorm: error: {tmp_path / 'cmp' / 'comparison.zarr'}: group r_57: det_scale has dims "
        "('store', 'detector', 'amp'), not (detector[, amp]) with its det_scale_err")


def test_cli_errors_are_one_line(stores, tmp_path, capsys):
    a = stores["paths"]["a"]
    for argv, message in [
        ([str(a), str(tmp_path / "nope.zarr")], f"{tmp_path / 'nope.zarr'}: no such store"),
        ([str(a), str(a), "--threshold", "0"], "threshold must be a positive number of sigmas, got 0.0"),
        ([str(a), str(a), "--threshold", "nan"], "threshold must be a positive number of sigmas, got nan"),
    ]:
        assert main(["compare", *argv]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"flatnorm: error: {message}"]
    with pytest.raises(SystemExit) as stop:
        main(["compare", str(a)])
    assert stop.value.code == 2 and "the following arguments are required: B" in capsys.readouterr().err
    # --out naming a store being compared: refused before anything is written.
    store_dir = tmp_path / "here"
    write_store(store_dir / "comparison.zarr", {"r_57": stored(a)})
    assert main(["compare", str(store_dir / "comparison.zarr"), str(a), "--out", str(store_dir)]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"flatnorm: error: {store_dir / 'comparison.zarr'}: is one of the stores compared; choose another --out")
    assert stored(store_dir / "comparison.zarr")["det_scale"].identical(stored(a)["det_scale"])
    # Stores without a filter in common: the line names them.
    other = tmp_path / "other.zarr"
    write_store(other, {"y_10": stored(a)})
    assert main(["compare", str(a), str(other)]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"flatnorm: error: {a}, {other}: these stores share no physical filter at the same level: nothing to compare")


def test_levels_times_and_inputs(stores, tmp_path):
    a = stores["paths"]["a"]
    ds = stored(a)
    tree = open_store(a)
    # The same filter at another level is not compared, and is reported.
    detector_level = ds.drop_vars([v for v in ds.data_vars if "amp" in ds[v].dims])
    detector_level["det_scale"] = ds["det_scale"].mean("amp")
    detector_level["det_scale_err"] = ds["det_scale_err"].mean("amp")
    other = xr.DataTree.from_dict({"r_57": detector_level})
    out = compare(tree, other)
    assert out.attrs["stores"] == ["tree 1", "tree 2"] and not out.children
    assert out.attrs["levels_differ"] == {"r_57": {"tree 1": "AMP", "tree 2": "DETECTOR"}}
    assert out.attrs["filters_in_some_stores"] == {"g_6": ["tree 1"]}
    assert "r_57: not compared, levels differ (tree 1 AMP, tree 2 DETECTOR)" in comparison_summary(out)
    # Exposure ids that are not LSST's: the campaign time is the commit time, else unknown.
    plain = ds.assign_coords(exposure=np.arange(1, ds.sizes["exposure"] + 1))
    path = write_store(tmp_path / "plain.zarr", {"r_57": plain})
    out = compare(a, path, xr.DataTree.from_dict({"r_57": plain}))["r_57"]
    committed = dt.datetime.fromisoformat(read_commit(path)["time"]).replace(tzinfo=None)
    assert out["campaign_time"].values.astype("datetime64[s]").tolist() == [dt.datetime(2025, 11, 20), committed,
                                                                            None]
    assert out["time_source"].values.tolist() == ["day_obs", "commit", "unknown"]
    # Bad inputs: one line naming what is wrong.
    with pytest.raises(ValueError, match="^compare needs at least two stores"):
        compare(a)
    with pytest.raises(ValueError, match="^threshold must be a positive number of sigmas, got True"):
        compare(a, a, threshold=True)
    no_err = xr.DataTree.from_dict({"r_57": ds.drop_vars("det_scale_err")})
    with pytest.raises(StoreError, match="^tree 2: group r_57: no det_scale_err variable"):
        compare(a, no_err)


def test_top_level_compare_is_the_function():
    import importlib

    importlib.import_module("flatnorm_dask.compare")  # importing the submodule again must not shadow it
    assert fn.compare is compare and callable(fn.compare)
