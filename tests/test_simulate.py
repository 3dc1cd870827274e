"""Simulated campaigns, the PropertyList writer, and campaign files on disk."""

import csv
import math

import numpy as np
import pytest
import xarray as xr
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from flatnorm_dask.camera import load_camera
from flatnorm_dask.propertylist import format_propertylist
from flatnorm_dask.simulate import (
    BUTLER_PATTERN,
    LSSTCAM_FILTERS,
    SIMPLE_PATTERN,
    simulate_campaign,
    write_campaign,
)
from helpers import DATA, Items, PropertyListDumper, PropertyListLoader


def pyyaml_text(items, style):
    return yaml.dump(Items(items), Dumper=PropertyListDumper, default_flow_style=False if style == "block" else None)


def read_items(text):
    return yaml.load(text, Loader=PropertyListLoader)


def same_value(a, b):
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    return type(a) is type(b) and a == b


@pytest.fixture(scope="module")
def small():
    return simulate_campaign("testcam", n_exposures=6, filters=("g_6", "r_57"), seed=3, nan_amp_fraction=0.02)


@pytest.fixture(scope="module")
def lsst():
    return simulate_campaign("lsstcam", n_detectors=30, n_exposures=8, seed=1)


# --- simulate_campaign --------------------------------------------------------------------------------

def test_structure_and_coordinates(small):
    assert set(small.children) == {"g_6", "r_57"}
    cam = load_camera("testcam")
    seen = set()
    for name, node in small.children.items():
        ds = node.to_dataset()
        assert ds.attrs["physical_filter"] == name
        assert dict(ds.sizes) == {"detector": 9, "amp": 8, "exposure": 6}
        for var in ("amp_value", "amp_count", "amp_sigma"):
            assert ds[var].dims == ("detector", "amp", "exposure")
        for var in ("det_value", "det_count", "det_sigma"):
            assert ds[var].dims == ("detector", "exposure")
        assert ds["true_exp_scale"].dims == ("exposure",)
        assert ds["true_det_scale"].dims == ("detector", "amp")
        assert ds["amp_count"].dtype.kind == "i" and ds["det_count"].dtype.kind == "i"
        np.testing.assert_array_equal(ds["detector"], cam.detector)
        assert tuple(ds["amp"].values) == cam.amp_names
        np.testing.assert_array_equal(ds["detector_name"], cam.detector_name)
        exposures = ds["exposure"].values
        seq = ds["seq_num"].values
        np.testing.assert_array_equal(exposures, 20251120 * 100000 + seq)
        assert [str(o) for o in ds["obs_id"].values] == [f"MC_C_20251120_{s:06d}" for s in seq]
        assert not seen & set(exposures.tolist())  # distinct across filters
        seen |= set(exposures.tolist())


def test_lsstcam_subset_and_realistic_levels(lsst):
    ds = lsst["r_57"].to_dataset()
    assert dict(ds.sizes) == {"detector": 30, "amp": 16, "exposure": 8}
    assert str(ds["detector_name"].values[0]) == "R01_S00"
    level = ds["true_exp_scale"].values
    assert 10_000 < level.min() and level.max() < 45_000
    assert np.ptp(np.log(level)) < 0.2  # a few per cent of drift, not more
    counts = ds["amp_count"].values
    live = counts[counts > 0]
    assert 0.9e6 < live.min() and live.max() < 1.1e6


def test_deterministic_per_seed():
    a = simulate_campaign("testcam", n_exposures=4, seed=7)
    b = simulate_campaign("testcam", n_exposures=4, seed=7)
    c = simulate_campaign("testcam", n_exposures=4, seed=8)
    for name in a.children:
        xr.testing.assert_identical(a[name].to_dataset(), b[name].to_dataset())
        assert not np.array_equal(a[name]["amp_value"].values, c[name]["amp_value"].values, equal_nan=True)



def test_existing_arguments_give_the_campaign_they_gave_before():
    # tests/data/simulated_testcam_seed7.npz: written by simulate_campaign before noise_seed and gain_change
    # existed (see data/README.md); the default noise_seed, and noise_seed == seed, reproduce it bit for bit.
    with np.load(DATA / "simulated_testcam_seed7.npz") as saved:
        before = {key: saved[key] for key in saved.files}
    for extra in ({}, {"noise_seed": 7}):
        tree = simulate_campaign("testcam", n_exposures=3, filters=("g_6", "r_57"), seed=7, nan_amp_fraction=0.05,
                                 **extra)
        for key, values in before.items():
            name, var = key.split("/")
            np.testing.assert_array_equal(tree[name][var].values, values, err_msg=f"{extra}: {key}")
        assert tree["g_6"].attrs["noise_seed"] == 7 and tree["g_6"].attrs["gain_change"] == []


def test_noise_seed_keeps_the_camera_and_draws_a_new_realisation():
    a = simulate_campaign("lsstcam", n_detectors=12, n_exposures=5, seed=4)
    b = simulate_campaign("lsstcam", n_detectors=12, n_exposures=5, seed=4, noise_seed=9)
    assert a.attrs["dead_detector"] == b.attrs["dead_detector"] and b.attrs["noise_seed"] == 9
    for name in a.children:
        ta, tb = a[name].to_dataset(), b[name].to_dataset()
        # The camera and the illumination are the same: the responses are equal, and G only differs by the
        # normalisation (a count-weighted mean of one over each campaign's own counts).
        np.testing.assert_array_equal(ta["true_response"].values, tb["true_response"].values)
        ratio = (tb["true_det_scale"] / ta["true_det_scale"]).values
        np.testing.assert_allclose(ratio, ratio.flat[0], rtol=1e-12)
        assert ratio.flat[0] != 1.0  # the counts differ, so the normalisation does
        # The realisation is another: lamp, counts, masked cells and noise.
        for var in ("true_exp_scale", "amp_count", "amp_value"):
            assert not np.array_equal(ta[var].values, tb[var].values, equal_nan=True), var
        masked_a, masked_b = np.isnan(ta["amp_value"].values), np.isnan(tb["amp_value"].values)
        assert masked_a.sum() == masked_b.sum() and (masked_a != masked_b).any()


def test_gain_change_divides_the_planted_amplifiers_scale():
    a = simulate_campaign("testcam", n_exposures=4, filters=("r_57",), seed=2, nan_amp_fraction=0.0)
    amps = a["r_57"]["amp"].values
    change = {(3, str(amps[1])): 1.02, (5, str(amps[6])): 0.97}
    b = simulate_campaign("testcam", n_exposures=4, filters=("r_57",), seed=2, nan_amp_fraction=0.0,
                          gain_change=change)
    ta, tb = a["r_57"].to_dataset(), b["r_57"].to_dataset()
    expected_gain = ta["gain"].values.copy()
    for (det, amp), factor in change.items():
        expected_gain[list(ta.detector.values).index(det), list(amps).index(amp)] *= factor
    np.testing.assert_array_equal(tb["gain"].values, expected_gain)
    # Same realisation: every amplifier value moves by the same normalisation but the planted ones, which
    # also move by 1 / factor (ADU = electrons / gain).
    ratio = tb["amp_value"].values / ta["amp_value"].values
    planted = expected_gain / ta["gain"].values
    live = np.isfinite(ratio).all(axis=2)
    norm = ratio[live & (planted == 1)].mean()
    np.testing.assert_allclose(ratio[live], (norm / planted)[live][:, None] * np.ones((1, 4)), rtol=1e-12)
    assert b.attrs["gain_change"] == [[3, str(amps[1]), 1.02], [5, str(amps[6]), 0.97]]
    for bad, match in [({(99, "C10"): 1.1}, "detector 99 is not one of the campaign's 9 detectors"),
                       ({(3, "X"): 1.1}, "amplifier 'X' is not one of camera 'testcam'"),
                       ({(3, str(amps[0])): 0.0},
                        f"factor of \\(3, '{amps[0]}'\\) must be a finite positive number, got 0.0"),
                       ({(3, str(amps[0])): float("nan")}, "factor of .* must be a finite positive number, got nan"),
                       ({3: 1.1}, "keys are \\(detector id, amplifier name\\) pairs")]:
        with pytest.raises(ValueError, match=f"^gain_change: {match}"):
            simulate_campaign("testcam", n_exposures=2, gain_change=bad)
    with pytest.raises(ValueError, match="^noise_seed must be a non-negative integer"):
        simulate_campaign("testcam", n_exposures=2, noise_seed=-3)

def test_amplifier_levels_follow_one_over_gain(lsst):
    gain = load_camera("lsstcam").gain[:30]
    for node in lsst.children.values():
        ds = node.to_dataset()
        np.testing.assert_array_equal(ds["gain"].values, gain)
        # Truth: G is the response in electrons divided by the camera file's gain, up to one constant.
        ratio = ds["true_det_scale"].values * gain / ds["true_response"].values
        np.testing.assert_allclose(ratio, ratio.mean(), rtol=1e-12)
        # Data: value * gain / (E * response) is that constant, within the noise.
        value = ds["amp_value"].values
        level = ds["true_exp_scale"].values[None, None, :] * ds["true_response"].values[:, :, None]
        scaled = value * gain[:, :, None] / level
        ok = np.isfinite(scaled)
        np.testing.assert_allclose(scaled[ok], ratio.mean(), rtol=6 * ds.attrs["noise"])
        # Regressing the measured amp-to-amp pattern (response divided out) on gain within each
        # detector gives a slope of -1: ADU go as 1/gain.
        live = np.isfinite(value).all(axis=(1, 2))
        y = np.log(np.nanmedian(value[live], axis=2) / ds["true_response"].values[live])
        x = np.log(gain[live])
        y -= y.mean(axis=1, keepdims=True)
        x -= x.mean(axis=1, keepdims=True)
        assert (x * y).sum() / (x * x).sum() == pytest.approx(-1.0, abs=0.02)


def test_dead_detector(small):
    for node in small.children.values():
        ds = node.to_dataset()
        dead = ds.attrs["dead_detector"]
        assert dead in ds["detector"].values
        d = ds.sel(detector=dead)
        assert np.isnan(d["amp_value"]).all() and (d["amp_count"] == 0).all() and (d["amp_sigma"] == 0).all()
        assert np.isnan(d["det_value"]).all() and (d["det_count"] == 0).all()
        others = ds.drop_sel(detector=dead)
        assert np.isfinite(others["det_value"]).all() and (others["det_count"] > 0).all()
    alive = simulate_campaign("testcam", n_exposures=3, dead_detector=False, nan_amp_fraction=0.0)
    for node in alive.children.values():
        assert node.attrs["dead_detector"] == -1
        assert np.isfinite(node["amp_value"]).all() and (node["amp_count"] > 0).all()


def test_nan_amplifiers(small):
    for node in small.children.values():
        ds = node.to_dataset()
        live = ds.drop_sel(detector=ds.attrs["dead_detector"])
        bad = np.isnan(live["amp_value"].values)
        assert bad.sum() == max(1, round(0.02 * bad.size))
        assert (live["amp_count"].values[bad] == 0).all() and (live["amp_sigma"].values[bad] == 0).all()
        assert (live["amp_count"].values[~bad] > 0).all()
    # The default fraction still gives at least one on a small camera.
    default = simulate_campaign("testcam", n_exposures=2, filters=("i_39",), dead_detector=False)
    assert np.isnan(default["i_39"]["amp_value"].values).sum() == 1


def test_detector_statistics_from_amplifiers(small):
    ds = small["g_6"].to_dataset()
    value, count, sigma = (ds[v].values for v in ("amp_value", "amp_count", "amp_sigma"))
    for d in range(value.shape[0]):
        for e in range(value.shape[2]):
            num = tot = 0.0
            for a in range(value.shape[1]):
                if math.isfinite(value[d, a, e]) and count[d, a, e] > 0:
                    num += float(count[d, a, e]) * float(value[d, a, e])
                    tot += float(count[d, a, e])
            assert ds["det_count"].values[d, e] == int(tot)
            if tot:
                assert ds["det_value"].values[d, e] == pytest.approx(num / tot, rel=1e-13)
                # The pooled sigma is at least every amplifier's and covers the between-amp spread.
                finite = count[d, :, e] > 0
                assert ds["det_sigma"].values[d, e] >= sigma[d, finite, e].min()
            else:
                assert math.isnan(ds["det_value"].values[d, e])


def test_true_det_scale_count_weighted_mean_is_one(small, lsst):
    for tree in (small, lsst):
        for node in tree.children.values():
            weights = node["amp_count"].values.sum(axis=2)
            scale = node["true_det_scale"].values
            assert (weights * scale).sum() / weights.sum() == pytest.approx(1.0, rel=1e-12)
            # And the data are E x G x noise.
            model = node["true_exp_scale"].values[None, None, :] * scale[:, :, None]
            ok = node["amp_count"].values > 0
            np.testing.assert_allclose(node["amp_value"].values[ok], model[ok], rtol=6 * node.attrs["noise"])


def test_all_lsstcam_filters_and_bad_inputs():
    tree = simulate_campaign("testcam", n_exposures=2, filters=LSSTCAM_FILTERS)
    levels = {name: float(node["true_exp_scale"].mean()) for name, node in tree.children.items()}
    assert set(levels) == set(LSSTCAM_FILTERS)
    assert levels["u_24"] < levels["r_57"]
    for kwargs, match in [({"filters": ()}, "filters"), ({"filters": ("g_6", "g_6")}, "repeat"),
                          ({"filters": ("a/b",)}, "'/'"), ({"n_exposures": 0}, "n_exposures"),
                          ({"seed": -1}, "seed"), ({"noise": -1.0}, "noise"),
                          ({"nan_amp_fraction": 1.0}, "nan_amp_fraction"), ({"day_obs": 2025}, "day_obs"),
                          ({"n_exposures": 50_000}, "sequence numbers"), ({"n_detectors": 10}, "n_detectors")]:
        with pytest.raises(ValueError, match=match):
            simulate_campaign("testcam", **kwargs)


# --- format_propertylist ------------------------------------------------------------------------------

@pytest.mark.parametrize("style", ["block", "flow"])
def test_sample_files_byte_for_byte(style):
    text = (DATA / f"flatStats_{style}.yaml").read_text()
    items = read_items(text)
    assert all(comment == "" for *_, comment in items)  # the record has no comments to carry
    record = {name: value for name, _, value, _ in items}
    assert format_propertylist(record, style) == text
    assert [t for _, t, _, _ in read_items(format_propertylist(record, style))] == [t for _, t, _, _ in items]


def sample_record(n_amp=16, seed=0):
    rng = np.random.default_rng(seed)
    record = {"DETECTOR_MEDIAN": float(rng.uniform(1e4, 3e4)), "DETECTOR_SIGMA": 212.5,
              "DETECTOR_N": 15872011}
    for i in range(n_amp):
        record |= {f"AMP_NAME_{i}": f"C{i // 8}{i % 8}", f"AMP_MEDIAN_{i}": float(rng.uniform(1e4, 3e4)),
                   f"AMP_SIGMA_{i}": float(200 + i), f"AMP_N_{i}": 992000 + i}
    record |= {"AMP_MEDIAN_5": float("nan"), "AMP_SIGMA_5": 0.0, "AMP_N_5": 0}
    return record


@pytest.mark.parametrize("style", ["block", "flow"])
def test_round_trip_and_pyyaml_equality(style):
    record = sample_record()
    record |= {"X_INF": float("inf"), "X_NINF": -math.inf, "X_BIG": 1e17, "X_TINY": 5e-324, "X_NEG0": -0.0,
               "X_NP": np.float64(0.1), "X_NPINT": np.int64(7), "X_LONG": 2**40, "X_BOOL": True}
    text = format_propertylist(record, style)
    assert text.startswith("!<lsst.daf.base.PropertyList>\n")
    items = read_items(text)
    assert [name for name, *_ in items] == list(record)
    for (name, typ, value, comment), expected in zip(items, record.values()):
        native = expected.item() if isinstance(expected, np.generic) else expected
        assert same_value(value, native), name
        assert comment == ""
    types = {name: typ for name, typ, _, _ in items}
    assert (types["DETECTOR_N"], types["AMP_NAME_0"], types["AMP_MEDIAN_0"]) == ("Int", "String", "Double")
    assert (types["X_LONG"], types["X_BOOL"], types["X_NPINT"]) == ("LongLong", "Bool", "Int")
    assert text == pyyaml_text([[n, t, v, ""] for n, t, v, _ in items], style)


@pytest.mark.parametrize("style", ["block", "flow"])
def test_values_pyyaml_would_quote_or_nest(style):
    record = {"A": "yes", "B": "has space", "C": "123", "D": [1.5, 2.5], "E": None, "F" * 90: 1.0}
    text = format_propertylist(record, style)
    items = read_items(text)
    assert [v for _, _, v, _ in items] == ["yes", "has space", "123", [1.5, 2.5], None, 1.0]
    assert text == pyyaml_text(items, style)


@pytest.mark.parametrize("style", ["block", "flow"])
@pytest.mark.parametrize("word", ["y", "n", "Y", "NO", "No", "nO", "Null", "nULL", "on", "OFF", "True", "tRUE",
                                  "_", "_1", "x_1", "e1", "E", "inf", "nan", "C10", "R22_S11"])
def test_strings_quoted_exactly_as_pyyaml(word, style):
    text = format_propertylist({"AMP_NAME_0": word, word: 1}, style)
    items = read_items(text)
    assert (items[0][2], items[1][0]) == (word, word)
    assert text == pyyaml_text(items, style)


scalars = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.text(alphabet="ABCxyz019_", min_size=1, max_size=12),
    st.booleans(),
)


@settings(max_examples=200, deadline=None)
@given(values=st.lists(scalars, min_size=1, max_size=8), style=st.sampled_from(["block", "flow"]))
def test_any_scalars_match_pyyaml(values, style):
    record = {f"KEY_{i}": v for i, v in enumerate(values)}
    text = format_propertylist(record, style)
    items = read_items(text)
    assert text == pyyaml_text(items, style)
    for (_, _, value, _), expected in zip(items, values):
        assert same_value(value, expected)


def test_format_errors():
    with pytest.raises(ValueError, match="style"):
        format_propertylist({"A": 1.0}, "fancy")
    with pytest.raises(TypeError, match="cannot store"):
        format_propertylist({"A": object()})


# --- write_campaign -----------------------------------------------------------------------------------

def read_manifest(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("layout", ["butler", "simple"])
def test_write_campaign(tmp_path, small, layout):
    manifest = write_campaign(small, tmp_path, layout=layout, run="LSSTCam/runs/test")
    assert manifest == tmp_path / "manifest.csv"
    rows = read_manifest(manifest)
    assert list(rows[0]) == ["path", "exposure", "detector", "physical_filter"]
    assert len(rows) == 2 * 6 * 9
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.yaml"))
    assert files == sorted(r["path"] for r in rows)
    for row in rows:
        ds = small[row["physical_filter"]].to_dataset()
        exposure, detector = int(row["exposure"]), int(row["detector"])
        cell = ds.sel(exposure=exposure, detector=detector)
        fields = {"physical_filter": row["physical_filter"], "exposure": exposure, "detector": detector}
        if layout == "butler":
            obs_id = str(cell["obs_id"].values)
            fields |= {"run": "LSSTCam/runs/test", "run_name": "LSSTCam_runs_test", "day_obs": 20251120,
                       "obs_id": obs_id, "detector_name": str(cell["detector_name"].values)}
            assert row["path"] == BUTLER_PATTERN.format(**fields)
        else:
            assert row["path"] == SIMPLE_PATTERN.format(**fields)
    # One file read back in full: every value exactly as simulated.
    row = rows[len(rows) // 2 + 1]
    ds = small[row["physical_filter"]].to_dataset()
    cell = ds.sel(exposure=int(row["exposure"]), detector=int(row["detector"]))
    items = {name: value for name, _, value, _ in read_items((tmp_path / row["path"]).read_text())}
    assert same_value(items["DETECTOR_MEDIAN"], float(cell["det_value"]))
    assert items["DETECTOR_N"] == int(cell["det_count"])
    for i, amp in enumerate(cell["amp"].values):
        assert items[f"AMP_NAME_{i}"] == amp
        assert same_value(items[f"AMP_MEDIAN_{i}"], float(cell["amp_value"][i]))
        assert same_value(items[f"AMP_SIGMA_{i}"], float(cell["amp_sigma"][i]))
        assert items[f"AMP_N_{i}"] == int(cell["amp_count"][i])


@pytest.mark.parametrize("style", ["block", "flow"])
def test_written_files_equal_format_propertylist(tmp_path, small, style):
    manifest = write_campaign(small, tmp_path, layout="simple", style=style)
    dead = small["g_6"].attrs["dead_detector"]
    for row in read_manifest(manifest)[:20]:
        cell = small[row["physical_filter"]].to_dataset().sel(exposure=int(row["exposure"]),
                                                              detector=int(row["detector"]))
        record = {"DETECTOR_MEDIAN": float(cell["det_value"]), "DETECTOR_SIGMA": float(cell["det_sigma"]),
                  "DETECTOR_N": int(cell["det_count"])}
        for i, amp in enumerate(cell["amp"].values):
            record |= {f"AMP_NAME_{i}": str(amp), f"AMP_MEDIAN_{i}": float(cell["amp_value"][i]),
                       f"AMP_SIGMA_{i}": float(cell["amp_sigma"][i]), f"AMP_N_{i}": int(cell["amp_count"][i])}
        text = (tmp_path / row["path"]).read_text()
        assert text == format_propertylist(record, style)
        if int(row["detector"]) == dead:  # the dead detector's files exist, with NaN and zero counts
            assert "- .nan" in text or ", .nan," in text


@pytest.mark.parametrize("change", ["long amplifier names", "float counts", "counts beyond 32 bits"])
def test_written_files_equal_pyyaml_when_the_template_cannot_serve(tmp_path, small, change):
    ds = small["g_6"].to_dataset().isel(exposure=[0, 1], detector=[0, 1, 2])
    if change == "long amplifier names":  # a flow line of 80+ characters, which PyYAML wraps
        ds = ds.assign_coords(amp=[f"{a}_{'N' * 57}" for a in ds["amp"].values])
    elif change == "float counts":
        ds["amp_count"] = ds["amp_count"].astype(float)
    else:
        ds["det_count"] = ds["det_count"] + 2**31
    tree = xr.DataTree.from_dict({"g_6": ds})
    for style in ("block", "flow"):
        manifest = write_campaign(tree, tmp_path / style, layout="simple", style=style)
        rows = read_manifest(manifest)
        assert len(rows) == 6
        for row in rows:
            text = (tmp_path / style / row["path"]).read_text()
            items = read_items(text)
            assert text == pyyaml_text(items, style)
            cell = ds.sel(exposure=int(row["exposure"]), detector=int(row["detector"]))
            values = {name: value for name, _, value, _ in items}
            assert values["DETECTOR_N"] == cell["det_count"].item()
            assert [values[f"AMP_NAME_{i}"] for i in range(8)] == [str(a) for a in ds["amp"].values]
            for i in range(8):
                assert same_value(values[f"AMP_N_{i}"], cell["amp_count"][i].item())
            if change == "float counts":
                assert {typ for name, typ, _, _ in items if name.startswith("AMP_N_")} == {"Double"}
            if change == "counts beyond 32 bits":
                assert dict((n, t) for n, t, _, _ in items)["DETECTOR_N"] == "LongLong"
            if change == "long amplifier names" and style == "flow":
                assert "\n  '']\n" in text  # wrapped, as PyYAML (and so the butler) wraps long flow lines


def test_write_campaign_bad_arguments(tmp_path, small):
    with pytest.raises(ValueError, match="layout"):
        write_campaign(small, tmp_path, layout="flat")
    with pytest.raises(ValueError, match="style"):
        write_campaign(small, tmp_path, style="pretty")
    for run in ("", "/abs/run", "a//b", "../up"):
        with pytest.raises(ValueError, match="run"):
            write_campaign(small, tmp_path, run=run)
