"""Butler in, butler out: a real LSST data repository (lsst-daf-butler) as input and output.

The repository is built once per module in a temp dir: LSSTCam-like dimension records, a ``flatStats``
dataset type, and a small simulated campaign ingested (copied) into it, so the files live under the butler's
own template.  Other runs hold a campaign with missing detectors and a partial re-run of one filter, chained
before the original run.

Tests that need ``lsst.daf.butler`` are skipped when it cannot be imported (the ``test`` extra installs it);
the config tests and the "not installed" tests always run.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flatnorm_dask import measure_scales, scales_dict
from flatnorm_dask.config import Config, ConfigError, load_config
from flatnorm_dask.ingest import discover
from flatnorm_dask.simulate import BUTLER_PATTERN, SIMPLE_PATTERN, simulate_campaign, write_campaign
from flatnorm_dask.store import export_scales, open_store
from helpers import error_line  # noqa: E402

INSTRUMENT = "LSSTCam"
FILTERS = ("g_6", "r_57")
N_DET, N_EXP = 6, 4
DAY_OBS = 20251120
RUN = "LSSTCam/runs/flatSim"  # the complete campaign
PARTIAL = "LSSTCam/other/partial"  # the same campaign with detectors missing
RERUN = "LSSTCam/other/rerun"  # r_57's first two exposures again, other numbers (another seed)
CHAIN = "LSSTCam/flats"  # CHAINED: [RERUN, RUN]
MISSING_ALL = 4  # detector with no dataset at all in PARTIAL
MISSING_SOME = 1  # detector without datasets in PARTIAL's r_57 exposures 1 and 3
INSTALL_HINT = "pip install 'flatnorm-dask[butler]'"


def flatnorm(*args, prelude: str = "", timeout=300):
    """The ``flatnorm`` command in a subprocess; ``prelude`` runs first in the same interpreter."""
    code = textwrap.dedent(f"""
        import runpy, sys
        {prelude}
        sys.argv = ["flatnorm", *sys.argv[1:]]
        runpy.run_module("flatnorm_dask.cli", run_name="__main__", alter_sys=True)
    """)
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)




def assert_scales_close(got, expected, rtol=1e-12, where="scales"):
    """Nested cpFlatNormScales dicts: the same keys at every level, floats equal to rtol (NaN == NaN)."""
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
    """cpFlatNormScales of one filter by the solver itself, on a Dataset's numbers (numpy, 10 iterations)."""
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


def _ingest(daf_butler, butler, directory, manifest, run, keep=lambda row: True):
    dataset_type = butler.get_dataset_type("flatStats")
    butler.registry.registerRun(run)
    datasets = [
        daf_butler.FileDataset(path=str(directory / row.path), refs=[daf_butler.DatasetRef(
            dataset_type, {"instrument": INSTRUMENT, "exposure": int(row.exposure), "detector": int(row.detector)},
            run=run)])
        for row in pd.read_csv(manifest).itertuples() if keep(row)]
    butler.ingest(*datasets, transfer="copy")
    return len(datasets)


@pytest.fixture(scope="module")
def repo(daf_butler, campaign, rerun_campaign, tmp_path_factory):
    """A butler repository holding the campaign in RUN, a gappy copy in PARTIAL and a re-run in RERUN."""
    from flatnorm_dask.camera import load_camera

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
        for exposure, obs_id, seq in zip(node["exposure"].values, node["obs_id"].values, node["seq_num"].values):
            exposures.append({"instrument": INSTRUMENT, "id": int(exposure), "obs_id": str(obs_id),
                              "physical_filter": name, "day_obs": DAY_OBS, "group": str(obs_id),
                              "seq_num": int(seq), "observation_type": "flat", "exposure_time": 15.0,
                              "dark_time": 15.0})
    registry.insertDimensionData("group", *[{"instrument": INSTRUMENT, "name": e["group"]} for e in exposures])
    registry.insertDimensionData("exposure", *exposures)
    registry.registerDatasetType(daf_butler.DatasetType(
        "flatStats", ("instrument", "exposure", "detector"), "PropertyList", universe=butler.dimensions))

    files = tmp_path_factory.mktemp("campaign")
    manifest = write_campaign(campaign, files, layout="simple")
    rerun_files = tmp_path_factory.mktemp("rerun")
    rerun_manifest = write_campaign(rerun_campaign, rerun_files, layout="simple")
    r_exposures = campaign["r_57"]["exposure"].values
    _ingest(daf_butler, butler, files, manifest, RUN)
    _ingest(daf_butler, butler, files, manifest, PARTIAL, keep=lambda row: not (
        row.detector == MISSING_ALL or (row.detector == MISSING_SOME and row.physical_filter == "r_57"
                                        and row.exposure in r_exposures[[1, 3]])))
    _ingest(daf_butler, butler, rerun_files, rerun_manifest, RERUN,
            keep=lambda row: row.physical_filter == "r_57" and row.exposure in r_exposures[:2])
    registry.registerCollection(CHAIN, daf_butler.CollectionType.CHAINED)
    registry.setCollectionChain(CHAIN, [RERUN, RUN])
    return root


# ----------------------------------------------------------------------------------- butler in, butler out

@pytest.fixture(scope="module")
def cli_run(repo, tmp_path_factory):
    """The whole command, as a user runs it: butler in, Zarr store and butler out, a real LocalCluster."""
    store = tmp_path_factory.mktemp("out") / "scales.zarr"
    result = flatnorm("run", "--butler", repo, "--collections", RUN, "--output", store, "--level", "AMP",
                      "--output-butler", repo, "--output-run", "flatnorm/amp", "--workers", 2, "--no-progress",
                      "--batch-size", 10)
    assert result.returncode == 0, result.stderr
    return store, result


def test_cli_puts_cpFlatNormScales_equal_to_the_solver_and_the_store(daf_butler, repo, campaign, cli_run):
    store, result = cli_run
    butler = daf_butler.Butler.from_config(str(repo))
    dataset_type = butler.get_dataset_type("cpFlatNormScales")
    assert dataset_type.storageClass_name == "StructuredDataDict"
    assert set(dataset_type.dimensions.required) == {"instrument", "physical_filter"}
    refs = butler.query_datasets("cpFlatNormScales", collections="flatnorm/amp")
    assert sorted(ref.dataId["physical_filter"] for ref in refs) == sorted(FILTERS)
    exported = export_scales(store)
    for name in FILTERS:
        got = butler.get("cpFlatNormScales", instrument=INSTRUMENT, physical_filter=name,
                         collections="flatnorm/amp")
        assert list(got) == ["expScale", "detScale"]
        det = int(campaign[name]["detector"][0])
        assert isinstance(got["detScale"][det]["C10"], float)  # AMP level: {det: {amp: G}}
        assert_scales_close(got, expected_scales(campaign[name].to_dataset(), "AMP"))
        assert_scales_close(got, exported[name], rtol=0)  # the very numbers of the store
    assert result.stdout.count("butler: cpFlatNormScales") == len(FILTERS)
    tree = open_store(store)
    assert tree.attrs["config"]["input"]["butler"] == str(repo)
    assert tree.attrs["config"]["input"]["collections"] == [RUN]


def test_the_file_table_comes_from_the_registry_and_matches_the_pattern_route(daf_butler, repo):
    from flatnorm_dask.butler import find_inputs
    from flatnorm_dask.camera import load_camera

    table = find_inputs(repo, [RUN])
    assert list(table.columns) == ["path", "exposure", "detector", "physical_filter"]
    assert table.attrs["instrument"] == INSTRUMENT
    assert len(table) == N_DET * N_EXP * len(FILTERS)
    assert table["path"].str.startswith(str(repo / RUN) + "/").all()  # plain local paths, not file:// URIs
    # Without the registry, the butler's own file names give the same table through the pattern route.
    by_pattern = discover(repo / "LSSTCam" / "runs", BUTLER_PATTERN, camera=load_camera("lsstcam"))
    pd.testing.assert_frame_equal(table, by_pattern, check_like=False)
    # --where and --instrument restrict the query (the only instrument is taken when none is given).
    some = find_inputs(repo, RUN, where="detector < 3 AND exposure.seq_num > 1 AND physical_filter = 'g_6'")
    assert set(some["detector"]) == {0, 1, 2} and set(some["physical_filter"]) == {"g_6"}
    assert len(some) == 3 * (N_EXP - 1)
    pd.testing.assert_frame_equal(find_inputs(repo, RUN, instrument=INSTRUMENT), table)


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
        a, b = (butler.get("cpFlatNormScales", instrument=INSTRUMENT, physical_filter=name, collections=run)
                for run in ("flatnorm/det-butler", "flatnorm/det-files"))
        assert_scales_close(a, b, rtol=0)
        assert_scales_close(a, expected_scales(campaign[name].to_dataset(), "DETECTOR"))
        assert all(isinstance(g, float) for g in a["detScale"].values())


def test_missing_detectors_are_masked_not_an_error(daf_butler, repo, campaign, tmp_path):
    summary = run_here(tmp_path, input__butler=str(repo), input__collections=PARTIAL, solve__level="AMP")
    tree = open_store(summary.store)
    r_exposures = campaign["r_57"]["exposure"].values
    for name in FILTERS:
        ds = tree[name].to_dataset()
        assert MISSING_ALL not in ds["detector"].values  # no dataset at all: not a row of the output
        truth = campaign[name].to_dataset().drop_sel(detector=[MISSING_ALL])
        if name == "r_57":
            status = ds["status"].sel(detector=MISSING_SOME).values
            assert (status == 1).sum() == 2  # "absent": masked
            assert not ds["used"].sel(detector=MISSING_SOME, exposure=list(r_exposures[[1, 3]])).any()
            truth = mask_cells(truth, MISSING_SOME, r_exposures[[1, 3]])
        assert_scales_close(export_scales(tree)[name], expected_scales(truth, "AMP"))
        assert ds.attrs["problems"] == []  # a missing dataset is not a bad file


def test_a_chain_takes_each_data_id_from_its_first_run(daf_butler, repo, campaign, rerun_campaign, tmp_path):
    """Duplicates across the runs of a chain: the registry's find-first search returns, per data id, the
    dataset of the first run in the chain that has one; the later runs' duplicates are never read."""
    from flatnorm_dask.butler import find_inputs

    butler = daf_butler.Butler.from_config(str(repo))
    every = butler.query_datasets("flatStats", collections=CHAIN, find_first=False, limit=None)
    assert len(every) == N_DET * N_EXP * len(FILTERS) + N_DET * 2  # the registry holds the duplicates

    table = find_inputs(repo, [CHAIN])
    assert len(table) == N_DET * N_EXP * len(FILTERS)
    assert not table.duplicated(["exposure", "detector"]).any()
    r_exposures = campaign["r_57"]["exposure"].values
    from_rerun = table["path"].str.startswith(str(repo / RERUN) + "/")
    assert (from_rerun == table["exposure"].isin(r_exposures[:2])).all()
    # The same through a list of collections, whose order decides: the chain's order, or the reverse.
    pd.testing.assert_frame_equal(find_inputs(repo, [RERUN, RUN]), table)
    assert find_inputs(repo, f"{RUN},{RERUN}".split(","))["path"].str.startswith(str(repo / RUN) + "/").all()

    summary = run_here(tmp_path, input__butler=str(repo), input__collections=CHAIN, solve__level="AMP")
    merged = campaign["r_57"].to_dataset().copy(deep=True)
    rerun = rerun_campaign["r_57"].to_dataset()
    for var in ("amp_value", "amp_count"):
        merged[var][..., :2] = rerun[var][..., :2].values
    got = export_scales(summary.store)
    assert_scales_close(got["r_57"], expected_scales(merged, "AMP"))
    assert_scales_close(got["g_6"], expected_scales(campaign["g_6"].to_dataset(), "AMP"))
    assert open_store(summary.store)["r_57"].attrs["problems"] == []


def test_an_output_run_holding_scales_is_refused_before_any_work(daf_butler, repo, cli_run, tmp_path):
    from flatnorm_dask.butler import ButlerError

    with pytest.raises(ButlerError, match=r"run 'flatnorm/amp' already holds cpFlatNormScales for g_6, r_57"):
        run_here(tmp_path, input__butler=str(repo), input__collections=RUN, output__butler=str(repo),
                 output__run="flatnorm/amp")
    assert not (tmp_path / "scales.zarr").exists()
    assert not list(tmp_path.glob(".scales.zarr.partial-*"))  # the staging directory is cleaned up


def test_butler_errors_are_one_line(daf_butler, repo, tmp_path, capsys):
    from flatnorm_dask.cli import main

    cases = [
        (["--butler", repo, "--collections", "no/such/run"], "No collection with name 'no/such/run'"),
        (["--butler", repo, "--collections", RUN, "--dataset-type", "flatStatz"],
         "dataset type 'flatStatz' is not registered"),
        (["--butler", repo, "--collections", RUN, "--where", "detector = = 3"], "Failed to parse"),
        (["--butler", repo, "--collections", RUN, "--where", "detector > 100"], "no flatStats datasets"),
        (["--butler", tmp_path / "nowhere", "--collections", RUN], "cannot open the butler repository"),
        (["--input", repo / "LSSTCam" / "runs", "--pattern", BUTLER_PATTERN, "--instrument", "HSC",
          "--output-butler", repo, "--output-run", "x"], "physical_filter 'g_6' of instrument 'HSC' is not"),
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

NO_BUTLER = "sys.modules['lsst.daf.butler'] = None  # any import of it now raises ImportError"


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
def test_without_lsst_daf_butler_the_butler_options_say_what_to_install(args, simple_files, tmp_path):
    args = [str(simple_files) if a == "{files}" else a for a in args]
    result = flatnorm("run", *args, "--output", tmp_path / "s.zarr", "--no-progress", prelude=NO_BUTLER)
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
    assert (cfg.input.dataset_type, cfg.input.where, cfg.output.run) == ("flatStats", "detector < 9",
                                                                         "u/me/scales")
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
])
def test_butler_options_are_checked(overrides, key, problem):
    with pytest.raises(ConfigError, match=rf"^overrides: {key.replace('.', '[.]')}: .*{problem}"):
        load_config(None, overrides)
