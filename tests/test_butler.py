"""Butler in, butler out: a real LSST data repository (lsst-daf-butler) as input and output.

The repository is built once per module in a temp dir the way the stock cp_pipe pipelines build it:
LSSTCam-like dimension records, the ``cpFlatStatistics`` dataset type (PropertyList; instrument,
physical_filter, exposure, detector), and a small simulated campaign ingested (copied) into it, so the files
live under the butler's own template.  Other runs hold a campaign with missing detectors, a partial re-run of
one filter chained before the original run, the campaign under the older pipelines' name ``flatStats``, and a
campaign with an exposure of NaN statistics.  One exposure of r_57 has another ``observation_reason``.

The names the tests expect are spelled out here, not imported: the tests check the code against the
stock pipelines' names.  Tests that need ``lsst.daf.butler`` are skipped when it cannot be imported (the
``test`` extra installs it); the config tests and the "not installed" tests always run.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from flatnorm_dask import measure_scales, scales_dict
from flatnorm_dask.camera import load_camera
from flatnorm_dask.config import Config, ConfigError, load_config
from flatnorm_dask.ingest import IngestError, discover
from flatnorm_dask.simulate import BUTLER_PATTERN, SIMPLE_PATTERN, simulate_campaign, write_campaign
from flatnorm_dask.store import export_scales, open_store, store_summary
from helpers import combination_lookup, error_line, in_process  # noqa: E402

INSTRUMENT = "LSSTCam"
FILTERS = ("g_6", "r_57")
N_DET, N_EXP = 6, 4
DAY_OBS = 20251120
STATS = "cpFlatStatistics"  # the stock pipelines' names (pipelines/_ingredients/cpFlat.yaml)
SCALES = "cpFlatNormalizeScales"
LEGACY_STATS, LEGACY_SCALES = "flatStats", "cpFlatNormScales"  # older pipelines' names
RUN = "LSSTCam/runs/flatSim"  # the complete campaign
PARTIAL = "LSSTCam/other/partial"  # the same campaign with detectors missing
RERUN = "LSSTCam/other/rerun"  # r_57's first two exposures again, other numbers (another seed)
CHAIN = "LSSTCam/flats"  # CHAINED: [RERUN, RUN]
LEGACY = "LSSTCam/legacy/flatSim"  # the campaign as flatStats
NAN = "LSSTCam/nan/flatSim"  # the campaign with exposures without a usable cell, see nan_campaign
MISSING_ALL = 4  # detector with no dataset at all in PARTIAL
MISSING_SOME = 1  # detector without datasets in PARTIAL's r_57 exposures 1 and 3
OTHER_REASON = 3  # index of the r_57 exposure whose observation_reason is not a flat's
INSTALL_HINT = "pip install 'flatnorm-dask[butler]'"
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def assert_scales_close(got, expected, rtol=1e-12, where="scales"):
    """Nested scales dicts: the same keys at every level, floats equal to rtol (NaN == NaN)."""
    if isinstance(expected, dict):
        assert isinstance(got, dict), where
        assert list(got) == list(expected), f"{where}: keys {list(got)} != {list(expected)}"
        for key in expected:
            assert_scales_close(got[key], expected[key], rtol, f"{where}[{key!r}]")
    else:
        assert isinstance(got, float), f"{where}: {got!r} is not a float"
        if math.isnan(expected):
            assert math.isnan(got), f"{where}: {got} != nan"
        else:
            assert got == pytest.approx(expected, rel=rtol), where


def expected_scales(ds, level):
    """The scales of one filter by the solver itself, on a Dataset's numbers (numpy, 10 iterations)."""
    ds = ds.sortby(["detector", "exposure"])
    if level == "AMP":
        fit = measure_scales(ds.amp_value.values, ds.amp_count.values)
    else:
        fit = measure_scales(ds.det_value.values, ds.det_count.values)
    return scales_dict(ds.exposure.values, ds.detector.values, [str(a) for a in ds.amp.values],
                       np.asarray(fit.vectorE), np.asarray(fit.vectorG))


def mask_cells(ds, detector, exposures):
    """``ds`` with the cells of ``detector`` in ``exposures`` absent, as reading leaves a missing file."""
    ds = ds.copy(deep=True)
    sel = {"detector": detector, "exposure": list(exposures)}
    for var in ("amp_value", "det_value"):
        ds[var].loc[sel] = np.nan
    for var in ("amp_count", "det_count"):
        ds[var].loc[sel] = 0
    return ds


def run_here(tmp_path, name="scales.zarr", **overrides):
    """workflow.run in this process (threaded scheduler): quicker than the CLI for the variants."""
    from flatnorm_dask.workflow import run

    options = {"output.store": str(tmp_path / name), **{k.replace("__", "."): v for k, v in overrides.items()}}
    return run(load_config(None, options), show_progress=False)


def assert_combination_gets_the_store_e(scales, ds, left_out=()):
    """For every input (detector, exposure) with data, the flat combination's lookup on ``scales`` gives the
    store's E for each of the camera's amplifiers; the exposures ``left_out`` are not combined at all."""
    amps = load_camera("lsstcam").amp_names
    exp_scale = dict(zip(ds["exposure"].values.tolist(), ds["exp_scale"].values.tolist()))
    has_data = ds["status"].values == 0  # a file was read for the cell
    checked = 0
    for i, detector in enumerate(ds["detector"].values.tolist()):
        inputs = [e for e, ok in zip(ds["exposure"].values.tolist(), has_data[i]) if ok]
        got = combination_lookup(scales, detector, amps, inputs)
        assert got is not None, f"detector {detector} would be skipped"
        assert list(got) == [e for e in inputs if e not in left_out], detector
        for exposure, per_amp in got.items():
            assert per_amp == [exp_scale[exposure]] * len(amps), (detector, exposure)
            checked += 1
    assert checked > 0


# --------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def daf_butler():
    return pytest.importorskip("lsst.daf.butler")


@pytest.fixture(scope="module")
def campaign():
    return simulate_campaign("lsstcam", n_detectors=N_DET, n_exposures=N_EXP, filters=FILTERS, seed=3,
                             day_obs=DAY_OBS)


@pytest.fixture(scope="module")
def rerun_campaign():
    return simulate_campaign("lsstcam", n_detectors=N_DET, n_exposures=N_EXP, filters=FILTERS, seed=9,
                             day_obs=DAY_OBS)


def nan_statistics(ds, sel):
    """``ds`` with the statistics of the cells ``sel`` not usable: NaN values, zero counts."""
    ds = ds.copy(deep=True)
    for var in ("amp_value", "det_value"):
        ds[var].loc[sel] = np.nan
    for var in ("amp_count", "det_count", "amp_sigma", "det_sigma"):
        ds[var].loc[sel] = 0
    return ds


@pytest.fixture(scope="module")
def nan_campaign(campaign):
    """The campaign with exposures that have no usable cell: g_6's third exposure has NaN statistics in
    every detector; r_57's second has detector 0's file missing, detector 1's unreadable (see ``repo``) and
    NaN statistics in the others."""
    g, r = campaign["g_6"].to_dataset(), campaign["r_57"].to_dataset()
    g = nan_statistics(g, {"exposure": g["exposure"].values[2]})
    r = nan_statistics(r, {"exposure": r["exposure"].values[1]})
    return {"g_6": g, "r_57": r, "left_out": {"g_6": int(g["exposure"][2]), "r_57": int(r["exposure"][1])}}


def _ingest(daf_butler, butler, directory, manifest, run, dataset_type=STATS, keep=lambda row: True):
    dtype = butler.get_dataset_type(dataset_type)
    butler.registry.registerRun(run)
    datasets = [
        daf_butler.FileDataset(path=str(directory / row.path), refs=[daf_butler.DatasetRef(
            dtype, {"instrument": INSTRUMENT, "exposure": int(row.exposure), "detector": int(row.detector)},
            run=run)])
        for row in pd.read_csv(manifest).itertuples() if keep(row)]
    butler.ingest(*datasets, transfer="copy")
    return len(datasets)


def observation_reason(name, index):
    """The exposure records' observation_reason: a flat's, in mixed case, except one r_57 exposure."""
    if name == "r_57" and index == OTHER_REASON:
        return "dark"
    return "Flat" if index % 2 else "FLAT"


@pytest.fixture(scope="module")
def repo(daf_butler, campaign, rerun_campaign, nan_campaign, tmp_path_factory):
    """A butler repository holding the campaign in RUN, a gappy copy in PARTIAL, a re-run in RERUN, the
    campaign as flatStats in LEGACY and the NaN campaign in NAN."""
    root = tmp_path_factory.mktemp("repo")
    daf_butler.Butler.makeRepo(str(root))
    butler = daf_butler.Butler.from_config(str(root), writeable=True)
    registry = butler.registry
    cam = load_camera("lsstcam").subset(N_DET)
    registry.insertDimensionData("instrument", {
        "name": INSTRUMENT, "class_name": "lsst.obs.lsst.LsstCam", "detector_max": 1000,
        "exposure_max": 6_050_123_199_999, "visit_max": 6_050_123_199_999})
    registry.insertDimensionData("physical_filter", *[
        {"instrument": INSTRUMENT, "name": f, "band": f.split("_")[0]} for f in FILTERS])
    registry.insertDimensionData("detector", *[
        {"instrument": INSTRUMENT, "id": int(d), "full_name": str(n), "raft": str(n).split("_")[0],
         "name_in_raft": str(n).split("_")[1], "purpose": "SCIENCE"}
        for d, n in zip(cam.detector, cam.detector_name)])
    registry.insertDimensionData("day_obs", {"instrument": INSTRUMENT, "id": DAY_OBS})
    exposures = []
    for name, node in campaign.children.items():
        for i, (exposure, obs_id, seq) in enumerate(zip(node["exposure"].values, node["obs_id"].values,
                                                        node["seq_num"].values)):
            exposures.append({"instrument": INSTRUMENT, "id": int(exposure), "obs_id": str(obs_id),
                              "physical_filter": name, "day_obs": DAY_OBS, "group": str(obs_id),
                              "seq_num": int(seq), "observation_type": "flat", "exposure_time": 15.0,
                              "dark_time": 15.0, "observation_reason": observation_reason(name, i)})
    registry.insertDimensionData("group", *[{"instrument": INSTRUMENT, "name": e["group"]} for e in exposures])
    registry.insertDimensionData("exposure", *exposures)
    for name in (STATS, LEGACY_STATS):
        registry.registerDatasetType(daf_butler.DatasetType(
            name, ("instrument", "physical_filter", "exposure", "detector"), "PropertyList",
            universe=butler.dimensions))

    files = tmp_path_factory.mktemp("campaign")
    manifest = write_campaign(campaign, files, layout="simple")
    rerun_files = tmp_path_factory.mktemp("rerun")
    rerun_manifest = write_campaign(rerun_campaign, rerun_files, layout="simple")
    nan_files = tmp_path_factory.mktemp("nan")
    nan_tree = campaign.copy()
    for name in FILTERS:
        nan_tree[name] = nan_campaign[name]
    nan_manifest = write_campaign(nan_tree, nan_files, layout="simple")
    r = campaign["r_57"]
    r_exposures = r["exposure"].values
    (nan_files / "r_57" / str(r_exposures[1]) / "flatStats_1.yaml").write_text("not: [a statistics file\n")
    _ingest(daf_butler, butler, files, manifest, RUN)
    _ingest(daf_butler, butler, files, manifest, PARTIAL, keep=lambda row: not (
        row.detector == MISSING_ALL or (row.detector == MISSING_SOME and row.physical_filter == "r_57"
                                        and row.exposure in r_exposures[[1, 3]])))
    _ingest(daf_butler, butler, rerun_files, rerun_manifest, RERUN,
            keep=lambda row: row.physical_filter == "r_57" and row.exposure in r_exposures[:2])
    _ingest(daf_butler, butler, files, manifest, LEGACY, dataset_type=LEGACY_STATS)
    _ingest(daf_butler, butler, nan_files, nan_manifest, NAN,
            keep=lambda row: not (row.exposure == r_exposures[1] and row.detector == int(r["detector"][0])))
    registry.registerCollection(CHAIN, daf_butler.CollectionType.CHAINED)
    registry.setCollectionChain(CHAIN, [RERUN, RUN])
    return root


# ----------------------------------------------------------------------------------- butler in, butler out

@pytest.fixture(scope="module")
def cli_run(repo, scheduler_address, tmp_path_factory):
    """The whole command as a user runs it, with no naming flags: butler in, Zarr store and butler out."""
    store = tmp_path_factory.mktemp("out") / "scales.zarr"
    result = in_process("run", "--butler", repo, "--collections", RUN, "--output", store, "--level", "AMP",
                        "--output-butler", repo, "--output-run", "flatnorm/amp", "--scheduler", scheduler_address,
                        "--no-progress", "--batch-size", 10)
    assert result.returncode == 0, result.stderr
    return store, result


def test_stock_names_by_default_and_the_combination_reads_the_store_e(daf_butler, repo, campaign, cli_run):
    store, result = cli_run
    butler = daf_butler.Butler.from_config(str(repo))
    dataset_type = butler.get_dataset_type(SCALES)
    assert dataset_type.storageClass_name == "StructuredDataDict"
    assert set(dataset_type.dimensions.required) == {"instrument", "physical_filter"}
    refs = butler.query_datasets(SCALES, collections="flatnorm/amp")
    assert sorted(ref.dataId["physical_filter"] for ref in refs) == sorted(FILTERS)
    with pytest.raises(daf_butler.MissingDatasetTypeError):
        butler.get_dataset_type(LEGACY_SCALES)  # nothing under the old name
    exported = export_scales(store)
    tree = open_store(store)
    for name in FILTERS:
        got = butler.get(SCALES, instrument=INSTRUMENT, physical_filter=name, collections="flatnorm/amp")
        assert list(got) == ["expScale", "detScale"]
        det = int(campaign[name]["detector"][0])
        assert isinstance(got["detScale"][det]["C10"], float)  # AMP level: {det: {amp: G}}
        assert_scales_close(got, expected_scales(campaign[name].to_dataset(), "AMP"))
        assert_scales_close(got, exported[name], rtol=0)  # the very numbers of the store
        ds = tree[name].to_dataset()
        assert ds.attrs["exposures_left_out"] == []
        assert_combination_gets_the_store_e(got, ds)
        # The dead detector (no usable cell at all) is still listed: its flats are normalised by the E the
        # other detectors measured, as the reference task does; its G is the filled one the store holds.
        dead = campaign.attrs["dead_detector"]
        assert dead in got["expScale"] and ds.attrs["n_filled_rows"] >= len(ds["amp"])
        assert not ds["used"].sel(detector=dead).any()
    assert result.stdout.count(f"butler: {SCALES} {INSTRUMENT} ") == len(FILTERS)
    assert tree.attrs["config"]["input"]["butler"] == str(repo)
    assert tree.attrs["config"]["input"]["collections"] == [RUN]
    assert tree.attrs["config"]["input"]["dataset_type"] == STATS


def test_the_file_table_comes_from_the_registry_and_matches_the_pattern_route(daf_butler, repo):
    from flatnorm_dask.butler import find_inputs

    table = find_inputs(repo, [RUN])
    assert list(table.columns) == ["path", "exposure", "detector", "physical_filter"]
    assert table.attrs["instrument"] == INSTRUMENT
    assert len(table) == N_DET * N_EXP * len(FILTERS)
    assert table["path"].str.startswith(str(repo / RUN) + "/").all()  # plain local paths, not file:// URIs
    assert table["path"].str.contains(f"/{STATS}/").all()
    # Without the registry, the butler's own file names give the same table through the pattern route: the
    # shipped LSSTCam config's pattern, and the simulator's.
    shipped = load_config(CONFIGS / "lsstcam.yaml").input.pattern
    assert shipped == BUTLER_PATTERN
    by_pattern = discover(repo / "LSSTCam" / "runs", shipped, camera=load_camera("lsstcam"))
    pd.testing.assert_frame_equal(table, by_pattern, check_like=False)
    # --where and --instrument restrict the query (the only instrument is taken when none is given).
    some = find_inputs(repo, RUN, where="detector < 3 AND exposure.seq_num > 1 AND physical_filter = 'g_6'")
    assert set(some["detector"]) == {0, 1, 2} and set(some["physical_filter"]) == {"g_6"}
    assert len(some) == 3 * (N_EXP - 1)
    pd.testing.assert_frame_equal(find_inputs(repo, RUN, instrument=INSTRUMENT), table)
    # Exposure record fields come as columns, for down-selection.
    fields = find_inputs(repo, RUN, exposure_fields=["observation_reason", "group"])
    pd.testing.assert_frame_equal(fields[list(table.columns)], table)
    records = {r.id: r for r in daf_butler.Butler.from_config(str(repo)).query_dimension_records(
        "exposure", instrument=INSTRUMENT, explain=False)}
    assert [(r.observation_reason, r.group) for r in map(records.get, fields["exposure"])] == list(
        zip(fields["observation_reason"], fields["group"]))
    assert set(fields["observation_reason"]) == {"FLAT", "Flat", "dark"}


def test_legacy_names_by_flag_and_the_legacy_layout(daf_butler, repo, campaign, tmp_path):
    """A repository of older pipelines: flatStats in, cpFlatNormScales out, by flag; its files by the
    pattern configs/lsstcam.yaml documents for them."""
    summary = run_here(tmp_path, input__butler=str(repo), input__collections=LEGACY,
                       input__dataset_type=LEGACY_STATS, output__butler=str(repo), output__run="flatnorm/legacy",
                       output__dataset_type=LEGACY_SCALES)
    assert [line.split()[0] for line in summary.butler_datasets] == [LEGACY_SCALES] * len(FILTERS)
    butler = daf_butler.Butler.from_config(str(repo))
    try:  # the stock type is registered only once some run has written it
        stock = butler.query_datasets(SCALES, collections="flatnorm/legacy", explain=False)
    except daf_butler.MissingDatasetTypeError:
        stock = []
    assert not stock
    for name in FILTERS:
        got = butler.get(LEGACY_SCALES, instrument=INSTRUMENT, physical_filter=name, collections="flatnorm/legacy")
        assert_scales_close(got, expected_scales(campaign[name].to_dataset(), "DETECTOR"))
    # The documented flag for the legacy layout, as the config's comment spells it.
    [flag] = re.findall(r'^\s*#\s+--pattern "([^"]+)"', (CONFIGS / "lsstcam.yaml").read_text(), flags=re.M)
    assert f"/{LEGACY_STATS}/" in flag and f"/{LEGACY_STATS}_" in flag
    legacy = discover(repo / "LSSTCam" / "legacy", flag, camera=load_camera("lsstcam"))
    from flatnorm_dask.butler import find_inputs

    pd.testing.assert_frame_equal(legacy, find_inputs(repo, LEGACY, LEGACY_STATS))


def test_detector_level_and_the_pattern_route_into_a_butler(daf_butler, repo, campaign, tmp_path):
    """DETECTOR level puts {det: G}; file inputs (pattern route) go out to a butler with --instrument."""
    from_butler = run_here(tmp_path, "a.zarr", input__butler=str(repo), input__collections=RUN,
                           output__butler=str(repo), output__run="flatnorm/det-butler")
    from_files = run_here(tmp_path, "b.zarr", input__root=str(repo / "LSSTCam" / "runs"),
                          input__pattern=BUTLER_PATTERN, input__instrument=INSTRUMENT,
                          output__butler=str(repo), output__run="flatnorm/det-files")
    assert len(from_butler.butler_datasets) == len(from_files.butler_datasets) == len(FILTERS)
    butler = daf_butler.Butler.from_config(str(repo))
    for name in FILTERS:
        a, b = (butler.get(SCALES, instrument=INSTRUMENT, physical_filter=name, collections=run)
                for run in ("flatnorm/det-butler", "flatnorm/det-files"))
        assert_scales_close(a, b, rtol=0)
        assert_scales_close(a, expected_scales(campaign[name].to_dataset(), "DETECTOR"))
        assert all(isinstance(g, float) for g in a["detScale"].values())


def test_down_selection_on_exposure_records(daf_butler, repo, campaign, tmp_path):
    """--select keeps the exposures whose record field equals the value, ignoring case, as the task does."""
    summary = run_here(tmp_path, input__butler=str(repo), input__collections=RUN, solve__level="AMP",
                       input__select="observation_reason=flat")
    tree = open_store(summary.store)
    r_exposures = campaign["r_57"]["exposure"].values
    assert tree["r_57"]["exposure"].values.tolist() == np.delete(r_exposures, OTHER_REASON).tolist()
    got = export_scales(tree)
    kept = campaign["r_57"].to_dataset().drop_sel(exposure=[r_exposures[OTHER_REASON]])
    assert_scales_close(got["r_57"], expected_scales(kept, "AMP"))
    assert_scales_close(got["g_6"], expected_scales(campaign["g_6"].to_dataset(), "AMP"))
    assert tree.attrs["config"]["input"]["select"] == "observation_reason=flat"
    assert "exposures with observation_reason=flat" in store_summary(summary.store)
    # A filter left without exposures is not solved (the task has no work for it); the others are.
    only = run_here(tmp_path, "dark.zarr", input__butler=str(repo), input__collections=RUN,
                    input__select="Observation_Reason=DARK")
    assert [f.name for f in only.filters] == ["r_57"]
    assert open_store(only.store)["r_57"]["exposure"].values.tolist() == [int(r_exposures[OTHER_REASON])]


def test_down_selection_errors_are_one_line_before_any_work(daf_butler, repo, tmp_path):
    store = tmp_path / "s.zarr"
    result = in_process("run", "--butler", repo, "--collections", RUN, "--select", "observation_reason=bias",
                        "--output", store, "--no-progress")
    line = error_line(result)
    assert (f"{repo}: no input exposure has observation_reason = 'bias' (compared case-insensitively); the "
            "values there: 'FLAT', 'Flat', 'dark'") in line, line
    result = in_process("run", "--butler", repo, "--collections", RUN, "--select", "exposure_time=15",
                        "--output", store, "--no-progress")
    line = error_line(result)
    assert ("command line: input.select: unknown exposure field 'exposure_time' in 'exposure_time=15' (choose from "
            "observation_reason, observation_type, science_program, group)") in line, line
    assert not store.exists() and not list(tmp_path.iterdir())


def test_down_selection_on_a_manifest_column(campaign, simple_files, tmp_path):
    manifest = pd.read_csv(simple_files / "manifest.csv")
    index = {(name, int(e)): i for name in FILTERS for i, e in enumerate(campaign[name]["exposure"].values)}
    manifest["observation_reason"] = [observation_reason(f, index[f, e])
                                      for f, e in zip(manifest["physical_filter"], manifest["exposure"])]
    manifest.loc[0, "observation_reason"] = None  # an empty cell never matches
    manifest.to_csv(tmp_path / "manifest.csv", index=False)
    summary = run_here(tmp_path, input__manifest=str(tmp_path / "manifest.csv"), input__root=str(simple_files),
                       input__select="observation_reason=dark")
    ds = open_store(summary.store)["r_57"]
    assert [f.name for f in summary.filters] == ["r_57"]
    assert ds["exposure"].values.tolist() == [int(campaign["r_57"]["exposure"][OTHER_REASON])]
    kept = manifest[manifest["observation_reason"].str.lower() == "flat"]
    summary = run_here(tmp_path, "flat.zarr", input__manifest=str(tmp_path / "manifest.csv"),
                       input__root=str(simple_files), input__select="observation_reason=FLAT")
    assert sum(open_store(summary.store)[f].attrs["n_files"] for f in FILTERS) == len(kept)
    # A manifest without the column: one line naming it.
    with pytest.raises(IngestError, match=r"manifest\.csv: manifest lacks column\(s\) science_program"):
        run_here(tmp_path, "x.zarr", input__manifest=str(tmp_path / "manifest.csv"), input__root=str(simple_files),
                 input__select="science_program=x")


@pytest.fixture(scope="module")
def nan_run(repo, tmp_path_factory):
    """The NaN campaign solved at AMP level, with masking, into a store, scales files and the butler."""
    out = tmp_path_factory.mktemp("nan")
    summary = run_here(out, input__butler=str(repo), input__collections=NAN, input__on_error="mask",
                       solve__level="AMP", output__butler=str(repo), output__run="flatnorm/nan",
                       output__scales_yaml=str(out / "scales"))
    return summary, out


def test_exposures_without_a_usable_cell_are_left_out_everywhere(daf_butler, repo, nan_campaign, nan_run):
    summary, out = nan_run
    butler = daf_butler.Butler.from_config(str(repo))
    tree = open_store(summary.store)
    exported = export_scales(tree)
    for name in FILTERS:
        ds = tree[name].to_dataset()
        left_out = nan_campaign["left_out"][name]
        assert np.isnan(ds["exp_scale"].sel(exposure=left_out))  # the store keeps the solver's NaN
        from_butler = butler.get(SCALES, instrument=INSTRUMENT, physical_filter=name, collections="flatnorm/nan")
        from_file = yaml.safe_load((out / "scales" / f"{name}.yaml").read_text())
        assert from_file == from_butler == exported[name]  # the same mapping everywhere
        for detector, per_amp in from_butler["expScale"].items():
            for amp, per_exposure in per_amp.items():
                assert sorted(per_exposure) == sorted(set(ds["exposure"].values.tolist()) - {left_out})
                assert all(math.isfinite(v) for v in per_exposure.values())
        # The numbers of the other exposures are those of the solver on the same statistics.
        assert_scales_close(from_butler, expected_scales(nan_campaign[name], "AMP"))
        assert_combination_gets_the_store_e(from_butler, ds, left_out=[left_out])
    reasons = {name: open_store(summary.store)[name].attrs["exposures_left_out"] for name in FILTERS}
    assert reasons["g_6"] == [{"exposure": nan_campaign["left_out"]["g_6"], "reason": (
        f"no usable cell in {N_DET} detector(s): {N_DET} without a finite positive statistic and count")}]
    assert reasons["r_57"] == [{"exposure": nan_campaign["left_out"]["r_57"], "reason": (
        f"no usable cell in {N_DET} detector(s): 1 without a file, 1 masked (see problems), {N_DET - 2} without a "
        "finite positive statistic and count")}]
    info = in_process("info", summary.store).stdout.splitlines()
    for name in FILTERS:
        exposure = nan_campaign["left_out"][name]
        assert f"      {exposure}: {reasons[name][0]['reason']}" in info
    assert info.count("    1 exposure(s) left out of expScale (E not finite)") == len(FILTERS)
    assert [f.n_empty_exposures for f in summary.filters] == [1, 1]


def test_an_output_run_holding_scales_is_refused_before_any_work(daf_butler, repo, cli_run, tmp_path):
    from flatnorm_dask.butler import ButlerError

    with pytest.raises(ButlerError, match=rf"run 'flatnorm/amp' already holds {SCALES} for g_6, r_57"):
        run_here(tmp_path, input__butler=str(repo), input__collections=RUN, output__butler=str(repo),
                 output__run="flatnorm/amp")
    assert not (tmp_path / "scales.zarr").exists()
    assert not list(tmp_path.glob(".scales.zarr*"))  # the staging directory is cleaned up


def test_butler_errors_are_one_line(daf_butler, repo, cli_run, tmp_path, capsys):
    from flatnorm_dask.cli import main

    hint = "--dataset-type NAME"
    cases = [
        (["--butler", repo, "--collections", "no/such/run"], "No collection with name 'no/such/run'"),
        (["--butler", repo, "--collections", RUN, "--dataset-type", "flatStatz"],
         f"dataset type 'flatStatz' is not registered in the repository; statistics-like dataset types there: "
         f"{STATS} (choose with {hint})"),
        (["--butler", repo, "--collections", CHAIN, "--dataset-type", "flatStatz"],
         f"statistics-like dataset types there: {STATS} (choose with {hint})"),  # a chain's children's types
        # An older repository's collections: the stock name finds nothing, the message says what is there.
        (["--butler", repo, "--collections", LEGACY],
         f"no {STATS} datasets in collection(s) {LEGACY}; statistics-like dataset types there: {LEGACY_STATS} "
         f"(choose with {hint})"),
        (["--butler", repo, "--collections", f"{LEGACY},{RUN}", "--dataset-type", LEGACY_STATS,
          "--where", "detector > 100"], f"no {LEGACY_STATS} datasets in collection(s) {LEGACY}, {RUN} where "
         "detector > 100 for instrument LSSTCam"),
        (["--butler", repo, "--collections", RUN, "--where", "detector = = 3"], "Failed to parse"),
        (["--butler", tmp_path / "nowhere", "--collections", RUN], "cannot open the butler repository"),
        (["--input", repo / "LSSTCam" / "runs", "--pattern", BUTLER_PATTERN, "--instrument", "HSC",
          "--output-butler", repo, "--output-run", "x"], "physical_filter 'g_6' of instrument 'HSC' is not"),
        (["--butler", repo, "--collections", RUN, "--output-butler", repo, "--output-run", "flatnorm/x",
          "--output-dataset-type", LEGACY_STATS], "is registered differently from what is written here"),
        # Collections holding scales only (and the statistics' type registered): nothing statistics-like.
        (["--butler", repo, "--collections", "flatnorm/amp"],
         f"no {STATS} datasets in collection(s) flatnorm/amp; the collections hold no statistics-like dataset "
         "type (dimensions exposure and detector, storage class PropertyList)"),
    ]
    for args, message in cases:  # in this process: quicker than a subprocess each
        code = main(["run", *map(str, args), "--output", str(tmp_path / "s.zarr"), "--no-progress"])
        err = capsys.readouterr().err
        line = error_line(subprocess.CompletedProcess([], code, "", err))
        assert message in line, line
    assert not (tmp_path / "s.zarr").exists()


def test_file_uris_are_read_as_the_files_they_name(daf_butler, campaign, tmp_path):
    from lsst.resources import ResourcePath

    from flatnorm_dask.formats import read_stats_file

    folder = tmp_path / "a b%c"  # characters a file URI must quote
    write_campaign(campaign, folder, layout="simple")
    path = folder / "g_6" / str(int(campaign["g_6"]["exposure"][0])) / "flatStats_0.yaml"
    uri = str(ResourcePath(str(path)))
    assert uri.startswith("file:///") and "%20" in uri
    by_uri, by_path = read_stats_file(uri), read_stats_file(path)
    np.testing.assert_array_equal(by_uri.amp, by_path.amp)
    assert by_uri.amp_names == by_path.amp_names


# ------------------------------------------------------------------------------------ without the package

@pytest.fixture(scope="module")
def simple_files(campaign, tmp_path_factory):
    root = tmp_path_factory.mktemp("simple")
    write_campaign(campaign, root, layout="simple")
    return root


@pytest.mark.parametrize("args", [
    ["--butler", "/repo/main", "--collections", "LSSTCam/runs/flatSim"],
    ["--input", "{files}", "--pattern", SIMPLE_PATTERN, "--output-butler", "/repo/main", "--output-run", "x",
     "--instrument", INSTRUMENT],
], ids=["input", "output"])
def test_without_lsst_daf_butler_the_butler_options_say_what_to_install(args, simple_files, tmp_path, monkeypatch):
    args = [str(simple_files) if a == "{files}" else a for a in args]
    monkeypatch.setitem(sys.modules, "lsst.daf.butler", None)  # any import of it now raises ImportError
    result = in_process("run", *args, "--output", tmp_path / "s.zarr", "--no-progress")
    line = error_line(result)
    assert "lsst-daf-butler" in line and INSTALL_HINT in line, line
    assert not (tmp_path / "s.zarr").exists()


def test_without_lsst_daf_butler_file_inputs_still_run(simple_files, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lsst.daf.butler", None)
    with pytest.raises(ImportError):
        import lsst.daf.butler  # noqa: F401
    summary = run_here(tmp_path, input__root=str(simple_files), input__pattern=SIMPLE_PATTERN)
    assert [f.name for f in summary.filters] == list(FILTERS) and summary.butler_datasets == []


# ------------------------------------------------------------------------------------------------- config

def test_butler_options_load_and_round_trip(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("input:\n  butler: /repo/main\n  collections: [LSSTCam/calib, LSSTCam/runs/x]\n"
                    "  where: detector < 9\noutput:\n  butler: /repo/main\n  run: u/me/scales\n")
    cfg = load_config(path)
    assert cfg.input.collections == ["LSSTCam/calib", "LSSTCam/runs/x"]
    # The stock pipelines' names by default.
    assert (cfg.input.dataset_type, cfg.output.dataset_type) == (STATS, SCALES)
    assert (cfg.input.where, cfg.output.run, cfg.input.select) == ("detector < 9", "u/me/scales", None)
    assert Config.from_dict(cfg.to_dict()) == cfg
    flags = load_config(None, {"input.butler": "/r", "input.collections": "a, b,"})
    assert flags.input.collections == ["a", "b"]


def test_butler_input_is_an_alternative_to_files(tmp_path):
    lsst = Path(__file__).resolve().parent.parent / "configs" / "lsstcam.yaml"
    # A flag replaces the file's choice of inputs, in both directions.
    cfg = load_config(lsst, {"input.butler": "/r", "input.collections": "c"})
    assert (cfg.input.pattern, cfg.input.root, cfg.input.butler) == (None, None, "/r")
    path = tmp_path / "b.yaml"
    path.write_text("input:\n  butler: /r\n  collections: c\n  where: detector = 1\n")
    cfg = load_config(path, {"input.root": "/d", "input.pattern": SIMPLE_PATTERN})
    assert (cfg.input.butler, cfg.input.collections, cfg.input.where) == (None, None, None)
    with pytest.raises(ConfigError, match=r"^overrides: input\.pattern: cannot be combined with input\.butler"):
        load_config(None, {"input.butler": "/r", "input.collections": "c", "input.pattern": SIMPLE_PATTERN})
    bad = tmp_path / "bad.yaml"
    bad.write_text("input:\n  butler: /r\n  collections: c\n  manifest: m.csv\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: input\.manifest: cannot be combined with input\.butler"):
        load_config(bad)


@pytest.mark.parametrize("overrides, key, problem", [
    ({"input.butler": "/r"}, "input.collections", "required with input.butler"),
    ({"input.collections": "c"}, "input.collections", "only applies to a butler"),
    ({"input.butler": "/r", "input.collections": []}, "input.collections", "at least one"),
    ({"input.butler": "/r", "input.collections": [1]}, "input.collections", "expected a list of names"),
    ({"output.butler": "/r", "input.butler": "/r", "input.collections": "c"}, "output.run", "required with"),
    ({"output.run": "x"}, "output.butler", "required with output.run"),
    ({"output.butler": "/r", "output.run": "x", "input.root": "/d", "input.pattern": SIMPLE_PATTERN},
     "input.instrument", "required with output.butler"),
    ({"output.dataset_type": LEGACY_SCALES}, "output.dataset_type", "only applies to a butler repository"),
    ({"input.root": "/d", "input.pattern": SIMPLE_PATTERN, "input.select": "group=x"}, "input.select",
     "a pattern gives no such field"),
    ({"input.butler": "/r", "input.collections": "c", "input.select": "observation_reason"}, "input.select",
     "expected FIELD=VALUE, got 'observation_reason'"),
    ({"input.butler": "/r", "input.collections": "c", "input.select": "reason=flat"}, "input.select",
     "unknown exposure field 'reason'"),
    ({"input.butler": "/r", "input.collections": "c", "input.select": "group="}, "input.select",
     "no value after '='"),
    ({"input.butler": "/r", "input.collections": "c", "input.select": ["group=x"]}, "input.select",
     "expected FIELD=VALUE, got a list"),
])
def test_butler_options_are_checked(overrides, key, problem):
    with pytest.raises(ConfigError, match=rf"^overrides: {key.replace('.', '[.]')}: .*{problem}"):
        load_config(None, overrides)


def test_a_selection_is_stored_in_its_canonical_spelling(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("input:\n  manifest: m.csv\n  select: ' Science_Program = Survey=2026 '\n")
    cfg = load_config(path)
    assert cfg.input.select == "science_program= Survey=2026 "  # the value as given, after the first '='
    assert Config.from_dict(cfg.to_dict()) == cfg
