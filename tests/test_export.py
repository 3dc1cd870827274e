"""The scales files: one per physical filter, each exactly one scales dataset, written where the one rule says;
exposures without a usable cell left out, recorded in the store and listed by ``flatnorm info``.

The stores come from the whole workflow on simulated statistics files (threaded scheduler, in this process).
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import xarray as xr
import yaml

from flatnorm_dask import measure_scales
from flatnorm_dask.camera import load_camera
from flatnorm_dask.config import load_config
from flatnorm_dask.simulate import SIMPLE_PATTERN, simulate_campaign, write_campaign
from flatnorm_dask.store import export_scales, open_store
from flatnorm_dask.workflow import run
from helpers import combination_lookup, error_line, in_process  # noqa: E402

FILTERS = ("g_6", "r_57")
N_DET, N_EXP = 5, 5
EMPTY = 2  # index of g_6's exposure whose statistics are all NaN


@pytest.fixture(scope="module")
def campaign():
    """Two filters; in g_6 one exposure without a usable cell, in r_57 one detector without any."""
    tree = simulate_campaign("lsstcam", n_detectors=N_DET, n_exposures=N_EXP, filters=FILTERS, seed=5,
                             dead_detector=False)
    g = tree["g_6"].to_dataset()
    sel = {"exposure": g["exposure"].values[EMPTY]}
    for var in ("amp_value", "det_value"):
        g[var].loc[sel] = np.nan
    for var in ("amp_count", "det_count"):
        g[var].loc[sel] = 0
    r = tree["r_57"].to_dataset()
    dead = {"detector": r["detector"].values[1]}
    for var in ("amp_value", "det_value"):
        r[var].loc[dead] = np.nan
    tree["g_6"], tree["r_57"] = g, r
    return tree


@pytest.fixture(scope="module")
def files(campaign, tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    write_campaign(campaign, root, layout="simple")
    return root


def run_here(out, files, **options):
    return run(load_config(None, {"output.store": str(out / "s.zarr"), "input.root": str(files),
                                  "input.pattern": SIMPLE_PATTERN, **options}), show_progress=False)


@pytest.fixture(scope="module")
def store(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    summary = run_here(out, files, **{"output.scales_yaml": str(out / "scales")})
    return summary, out


def expected(ds):
    """One filter's scales from the solver on the simulated numbers, built with plain loops: every detector and
    amplifier, the exposures whose E is finite."""
    ds = ds.sortby(["detector", "exposure"])
    fit = measure_scales(ds["det_value"].values, ds["det_count"].values)
    amps = [str(a) for a in ds["amp"].values]
    exp_scale = {int(e): float(v) for e, v in zip(ds["exposure"].values, fit.vectorE) if math.isfinite(v)}
    return {"expScale": {int(d): {a: dict(exp_scale) for a in amps} for d in ds["detector"].values},
            "detScale": {int(d): float(g) for d, g in zip(ds["detector"].values, fit.vectorG)}}


def assert_close(got, want):
    assert got.keys() == want.keys()
    for key in want:
        if isinstance(want[key], dict):
            assert_close(got[key], want[key])
        else:
            assert got[key] == pytest.approx(want[key], rel=1e-12), key


def test_run_writes_one_file_per_filter_each_one_scales_dataset(campaign, store):
    summary, out = store
    assert summary.scales_yaml == [out / "scales" / "g_6.yaml", out / "scales" / "r_57.yaml"]
    assert sorted(p.name for p in (out / "scales").iterdir()) == ["g_6.yaml", "r_57.yaml"]
    exported = export_scales(summary.store)
    amps = load_camera("lsstcam").amp_names
    for name in FILTERS:
        got = yaml.safe_load((out / "scales" / f"{name}.yaml").read_text())
        assert list(got) == ["expScale", "detScale"]  # nothing else at the top: the combination reads it as is
        assert got == exported[name]
        assert_close(got, expected(campaign[name].to_dataset()))
        ds = open_store(summary.store)[name]
        for detector in ds["detector"].values.tolist():  # every input flat finds its E
            inputs = ds["exposure"].values.tolist()
            lookup = combination_lookup(got, detector, amps, inputs)
            e = dict(zip(inputs, ds["exp_scale"].values.tolist()))
            assert lookup == {x: [e[x]] * len(amps) for x in inputs if math.isfinite(e[x])}


def test_an_exposure_without_a_usable_cell_is_left_out_and_recorded(campaign, store):
    summary, out = store
    g = open_store(summary.store)["g_6"]
    empty = int(campaign["g_6"]["exposure"][EMPTY])
    assert np.isnan(g["exp_scale"].sel(exposure=empty))
    assert g.attrs["exposures_left_out"] == [{"exposure": empty, "reason": (
        f"no usable cell in {N_DET} detector(s): {N_DET} without a finite positive statistic and count")}]
    got = yaml.safe_load((out / "scales" / "g_6.yaml").read_text())
    assert all(empty not in per_exposure for per_amp in got["expScale"].values()
               for per_exposure in per_amp.values())
    assert all(len(per_exposure) == N_EXP - 1 for per_amp in got["expScale"].values()
               for per_exposure in per_amp.values())
    # r_57's detector without any usable cell keeps its entries: E is the exposures', measured elsewhere.
    r = open_store(summary.store)["r_57"]
    assert r.attrs["exposures_left_out"] == [] and r.attrs["n_filled_rows"] == 1
    dead = int(campaign["r_57"]["detector"][1])
    r_scales = yaml.safe_load((out / "scales" / "r_57.yaml").read_text())
    assert r_scales["expScale"][dead] == r_scales["expScale"][int(r["detector"][0])]
    info = in_process("info", summary.store)
    assert info.returncode == 0, info.stderr
    lines = info.stdout.splitlines()
    assert "    1 exposure(s) left out of expScale (E not finite)" in lines
    assert f"      {empty}: {g.attrs['exposures_left_out'][0]['reason']}" in lines
    assert sum("left out of expScale" in line for line in lines) == 1  # r_57 has none to list


def test_export_to_a_directory_or_one_filter_to_a_file(store, tmp_path):
    summary, out = store
    result = in_process("export", summary.store, "-o", tmp_path / "d")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [str(tmp_path / "d" / f"{name}.yaml") for name in FILTERS]
    for name in FILTERS:
        assert (tmp_path / "d" / f"{name}.yaml").read_bytes() == (out / "scales" / f"{name}.yaml").read_bytes()
    result = in_process("export", summary.store, "--filter", "r_57", "-o", tmp_path / "r.yaml")
    assert result.returncode == 0 and result.stdout.splitlines() == [str(tmp_path / "r.yaml")]
    assert (tmp_path / "r.yaml").read_bytes() == (out / "scales" / "r_57.yaml").read_bytes()
    result = in_process("export", summary.store, "--filter", "r_57", "-o", tmp_path / "only")
    assert result.stdout.splitlines() == [str(tmp_path / "only" / "r_57.yaml")]
    assert not list(tmp_path.glob(".*"))  # no staging files left beside them


@pytest.mark.parametrize("args, message", [
    (["-o", "{tmp}/s.yaml"], "{tmp}/s.yaml: one YAML file holds one physical_filter's scales, and there are 2 "
     "(g_6, r_57): give a directory (each filter gets <physical_filter>.yaml) or choose one filter"),
    (["--filter", "i_39", "-o", "{tmp}/d"], "{store}: no group (physical_filter) 'i_39'; the store holds g_6, r_57"),
    (["-o", "{tmp}/file"], "{tmp}/file: exists and is not a directory (a path without a .yaml suffix is a "
     "directory that gets <physical_filter>.yaml per filter)"),
    (["--filter", "g_6", "-o", "{tmp}/dir.yaml"], "{tmp}/dir.yaml: is a directory; a path ending in .yaml names "
     "one YAML file"),
    (["-o", "{tmp}/d2"], "{tmp}/d2/g_6.yaml: exists and is not a regular file; it would not be replaced"),
    (["--filter", "r_57", "-o", "{tmp}/fifo.yml"], "{tmp}/fifo.yml: exists and is not a regular file; it would not "
     "be replaced"),
])
def test_export_refusals_are_one_line_and_write_nothing(store, tmp_path, args, message):
    summary, _ = store
    (tmp_path / "file").write_text("mine\n")
    (tmp_path / "dir.yaml").mkdir()
    (tmp_path / "d2" / "g_6.yaml").mkdir(parents=True)
    os.mkfifo(tmp_path / "fifo.yml")
    before = sorted(tmp_path.rglob("*"))
    fill = {"tmp": tmp_path, "store": summary.store}
    line = error_line(in_process("export", summary.store, *[a.format(**fill) for a in args]))
    assert line == f"flatnorm: error: {message.format(**fill)}"
    assert sorted(tmp_path.rglob("*")) == before and (tmp_path / "file").read_text() == "mine\n"


def test_run_scales_yaml_file_needs_one_filter_checked_before_any_work(campaign, files, tmp_path):
    result = in_process("run", "--input", files, "--pattern", SIMPLE_PATTERN, "--output", tmp_path / "s.zarr",
                      "--scales-yaml", tmp_path / "scales.yaml", "--no-progress")
    line = error_line(result)
    assert f"{tmp_path / 'scales.yaml'}: one YAML file holds one physical_filter's scales, and there are 2" in line
    assert list(tmp_path.iterdir()) == []  # no store, no staging, no file
    # A run of one filter writes that file.
    one = tmp_path / "one"
    write_campaign(xr.DataTree.from_dict({"r_57": campaign["r_57"].to_dataset()}), one, layout="simple")
    summary = run_here(tmp_path, one, **{"output.scales_yaml": str(tmp_path / "r.yaml")})
    assert summary.scales_yaml == [tmp_path / "r.yaml"]
    assert yaml.safe_load((tmp_path / "r.yaml").read_text()) == export_scales(summary.store)["r_57"]
