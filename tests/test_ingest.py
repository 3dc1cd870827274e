"""Discovery and parallel reading of statistics files into a DataTree."""

import os
import re
import shutil

import dask
import numpy as np
import pandas as pd
import pytest

from flatnorm_dask import listing, measure_scales
from flatnorm_dask.camera import load_camera
from flatnorm_dask.ingest import (
    IngestError,
    compile_pattern,
    discover,
    problems,
    read_campaign,
    solver_inputs,
    status_counts,
    verify_amp_names,
)
from flatnorm_dask.schema import StatsFormatError
from flatnorm_dask.simulate import BUTLER_PATTERN, SIMPLE_PATTERN, simulate_campaign, write_campaign


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    tree = simulate_campaign("lsstcam", n_detectors=12, n_exposures=7, filters=("g_6", "r_57"), seed=3)
    root = tmp_path_factory.mktemp("simple")
    manifest = write_campaign(tree, root, layout="simple")
    return tree, root, manifest


def copy_campaign(campaign, tmp_path):
    tree, root, _ = campaign
    dest = tmp_path / "inputs"
    shutil.copytree(root, dest)
    return tree, dest


def assert_matches_truth(ds, truth):
    for name in ("amp_value", "amp_count", "amp_sigma", "det_value", "det_count", "det_sigma"):
        np.testing.assert_array_equal(ds[name].values, truth[name].transpose(*ds[name].dims).values,
                                      err_msg=name)


def test_pattern_reading_gives_the_simulated_numbers(campaign):
    tree, root, _ = campaign
    got = read_campaign(root, pattern=SIMPLE_PATTERN, batch_size=30)
    assert sorted(got.children) == ["g_6", "r_57"]
    for name in ("g_6", "r_57"):
        ds, truth = got[name].to_dataset(), tree[name].to_dataset()
        assert ds["amp_value"].dims == ("detector", "amp", "exposure")
        assert ds["det_value"].dims == ("detector", "exposure")
        assert ds.detector.values.tolist() == sorted(truth.detector.values.tolist())
        assert ds.exposure.values.tolist() == sorted(truth.exposure.values.tolist())
        assert ds.amp.values.tolist() == list(truth.amp.values)
        assert isinstance(ds["amp_value"].data, dask.array.Array)
        # 30 files per task over 12 detectors: 2 exposures per chunk
        assert ds["amp_value"].chunks[2] == (2, 2, 2, 1)
        assert_matches_truth(ds, truth)
        assert (ds["status"].values == 0).all()


def reading_tasks(array) -> int:
    """The reading tasks an array needs (its graph culled to its own keys)."""
    graph = array.__dask_graph__().cull(set(dask.core.flatten(array.__dask_keys__())))
    return sum(str(key[0]).startswith("read-block") for key in dict(graph) if isinstance(key, tuple))


def test_tasks_are_batches_not_files(campaign):
    _, root, _ = campaign
    ds = read_campaign(root, pattern=SIMPLE_PATTERN, batch_size=1000)["g_6"].to_dataset()
    assert reading_tasks(ds["amp_value"].data) == 1  # 84 files, one task
    small = read_campaign(root, pattern=SIMPLE_PATTERN, batch_size=30)["g_6"].to_dataset()
    assert reading_tasks(small["amp_value"].data) == 4  # ceil(7 exposures / 2 per task)


def test_butler_layout_maps_names_and_obs_ids(tmp_path):
    tree = simulate_campaign("lsstcam", n_detectors=5, n_exposures=3, filters=("i_39",), seed=1)
    write_campaign(tree, tmp_path, layout="butler")
    files = discover(tmp_path, pattern=BUTLER_PATTERN, camera=load_camera("lsstcam"))
    assert len(files) == 15
    truth = tree["i_39"].to_dataset()
    assert sorted(set(files["exposure"])) == sorted(truth.exposure.values.tolist())
    assert sorted(set(files["detector"])) == sorted(truth.detector.values.tolist())
    got = read_campaign(files=files)["i_39"].to_dataset()
    assert_matches_truth(got, truth)


def test_pattern_validation():
    with pytest.raises(IngestError, match="must name the exposure"):
        compile_pattern("{detector}.yaml")
    regex = compile_pattern("{obs_id}/x_{obs_id}_{detector}.yaml")
    assert regex.fullmatch("MC_C_20251120_000001/x_MC_C_20251120_000001_7.yaml")
    assert not regex.fullmatch("MC_C_20251120_000001/x_MC_C_20251120_000002_7.yaml")


def _copy_to(root, source, relative):
    dest = root / relative
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(source, dest)


def test_day_obs_and_seq_num_fields_give_lsst_exposure_ids(campaign, tmp_path):
    _, root, _ = campaign
    source = discover(root, pattern=SIMPLE_PATTERN)["path"].iloc[0]
    for day, seq, det in [(20251120, 7, 3), (20251120, 99999, 3), (20260101, 0, 4)]:
        _copy_to(tmp_path, source, f"{day}/{seq}/flatStats_{det}.yaml")
    files = discover(tmp_path, pattern="{day_obs}/{seq_num}/flatStats_{detector}.yaml")
    assert sorted(zip(files["exposure"], files["detector"])) == [
        (2025112000007, 3), (2025112099999, 3), (2026010100000, 4)]
    obs = tmp_path / "obs"
    _copy_to(obs, source, "MC_O_20251120_000042/flatStats_5.yaml")
    files = discover(obs, pattern="{obs_id}/flatStats_{detector}.yaml")
    assert files["exposure"].tolist() == [20251120 * 100_000 + 42]


@pytest.mark.parametrize("pattern, relative", [
    ("{day_obs}/{seq_num}/flatStats_{detector}.yaml", "20251120/100000/flatStats_3.yaml"),
    ("{obs_id}/flatStats_{detector}.yaml", "MC_C_20251120_123456/flatStats_3.yaml"),
])
def test_sequence_numbers_beyond_five_digits_name_the_file(campaign, tmp_path, pattern, relative):
    # day_obs * 100000 + seq_num would be another day's exposure id: refused, naming the file.
    _, root, _ = campaign
    source = discover(root, pattern=SIMPLE_PATTERN)["path"].iloc[0]
    _copy_to(tmp_path, source, "20251120/5/flatStats_3.yaml" if "day_obs" in pattern
             else "MC_C_20251120_000005/flatStats_3.yaml")
    _copy_to(tmp_path, source, relative)
    with pytest.raises(IngestError) as err:
        discover(tmp_path, pattern=pattern)
    assert str(err.value).startswith(str(tmp_path / relative) + ": ")
    assert "seq_num" in str(err.value) and "0..99999" in str(err.value)


def test_solver_inputs_by_level(campaign):
    _, root, _ = campaign
    ds = read_campaign(root, pattern=SIMPLE_PATTERN)["g_6"].to_dataset()
    for level, names in [("AMP", ("amp_value", "amp_count")), ("detector", ("det_value", "det_count"))]:
        value, weight = solver_inputs(ds, level)
        assert (value.name, weight.name) == names
    with pytest.raises(ValueError, match="level must be one of"):
        solver_inputs(ds, "CCD")


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_manifest_input(campaign, tmp_path, kind):
    tree, root, manifest = campaign
    table = pd.read_csv(manifest)
    if kind == "parquet":
        path = tmp_path / "m.parquet"
        table.to_parquet(path)
    else:
        path = manifest
    got = read_campaign(root=root, manifest=path)
    assert_matches_truth(got["r_57"].to_dataset(), tree["r_57"].to_dataset())


def test_manifest_errors_name_file_and_column(tmp_path):
    bad = tmp_path / "m.csv"
    bad.write_text("path,exposure\na.yaml,1\n")
    with pytest.raises(IngestError, match=r"m\.csv: manifest lacks column\(s\) detector"):
        discover(manifest=bad)
    bad.write_text("path,exposure,detector\na.yaml,1,x\n")
    with pytest.raises(IngestError, match="column detector: not an integer id: 'x'"):
        discover(manifest=bad)


def test_missing_detector_and_exposure_are_masked(campaign, tmp_path):
    tree, root = copy_campaign(campaign, tmp_path)
    files = discover(root, pattern=SIMPLE_PATTERN)
    det, exp = int(files["detector"].iloc[5]), int(files["exposure"].iloc[5])
    drop = (files["physical_filter"] == "g_6") & (files["detector"] == det) & (files["exposure"] == exp)
    ds = read_campaign(files=files[~drop])["g_6"].to_dataset()
    cell = ds.sel(detector=det, exposure=exp)
    assert int(cell.status) == 1 and np.isnan(cell.det_value) and float(cell.det_count) == 0
    assert np.isnan(cell.amp_value).all() and (cell.amp_count == 0).all()
    assert problems(ds) == []  # absent is not a problem


def test_bad_file_raises_with_file_and_key(campaign, tmp_path):
    _, root = copy_campaign(campaign, tmp_path)
    files = discover(root, pattern=SIMPLE_PATTERN)
    victim = files["path"].iloc[9]
    text = open(victim).read()
    text = text.replace("AMP_N_3\n  - Int\n  - ", "AMP_N_3\n  - Int\n  - abc", 1) if "AMP_N_3\n" in text else \
        text.replace("[AMP_N_3, Int, ", "[AMP_N_3, Int, abc", 1)
    open(victim, "w").write(text)
    tree = read_campaign(files=files)
    with pytest.raises(StatsFormatError) as err:
        dask.compute(*[tree[n].to_dataset()["amp_value"] for n in tree.children])
    assert victim in str(err.value) and "AMP_N_3" in str(err.value)


def test_bad_files_are_masked_and_recorded(campaign, tmp_path):
    tree, root = copy_campaign(campaign, tmp_path)
    files = discover(root, pattern=SIMPLE_PATTERN)
    g = files[files["physical_filter"] == "g_6"].reset_index(drop=True)
    garbage, truncated, vanished = g["path"].iloc[0], g["path"].iloc[13], g["path"].iloc[20]
    open(garbage, "wb").write(os.urandom(300))
    text = open(truncated).read()
    open(truncated, "w").write(text[: len(text) // 3])
    os.remove(vanished)
    ds = read_campaign(files=files, on_error="mask")["g_6"].to_dataset().compute()
    found = {p["file"]: p["reason"] for p in problems(ds)}
    assert set(found) == {garbage, truncated, vanished}
    assert all(found.values())
    for path in found:
        row = g[g["path"] == path].iloc[0]
        cell = ds.sel(detector=row.detector, exposure=row.exposure)
        assert int(cell.status) == 2 and np.isnan(cell.det_value) and float(cell.det_count) == 0
    assert (ds["status"] == 0).sum() == ds["status"].size - 3


def test_duplicates_raise_or_mask(campaign, tmp_path):
    _, root = copy_campaign(campaign, tmp_path)
    files = discover(root, pattern=SIMPLE_PATTERN)
    dup = files.iloc[[4]].copy()
    copy = os.path.join(os.path.dirname(dup["path"].iloc[0]), "copy_of_file.yaml")
    shutil.copy(dup["path"].iloc[0], copy)
    dup["path"] = copy
    both = pd.concat([files, dup], ignore_index=True)
    name = dup["physical_filter"].iloc[0]
    first, dup_of = sorted([files["path"].iloc[4], copy])  # a cell's files are taken in path order
    cell = f"exposure {dup['exposure'].iloc[0]}, detector {dup['detector'].iloc[0]}"
    with pytest.raises(IngestError, match=f"^{re.escape(dup_of)}: duplicate of {re.escape(first)} \\({cell}\\)$"):
        read_campaign(files=both)[name].to_dataset()["status"].values
    ds = read_campaign(files=both, on_error="mask")[name].to_dataset()
    found = problems(ds)
    assert len(found) == 1 and "duplicate" in found[0]["reason"] and copy in found[0]["reason"]
    assert found[0]["file"] == first and found[0]["status"] == "duplicate"


@pytest.mark.parametrize("position", [0, 30])
def test_the_odd_amplifier_list_is_the_one_named(campaign, tmp_path, position):
    """The expected amplifier names are the camera's, or most files': a file listing others is the one named
    (raise) or masked (mask), even when it comes first in sort order."""
    _, root = copy_campaign(campaign, tmp_path)
    files = discover(root, pattern=SIMPLE_PATTERN)
    victim = files["path"].iloc[position]
    text = open(victim).read()
    open(victim, "w").write(text.replace("C10", "X99"))
    expected = list(load_camera("lsstcam").amp_names)
    for camera, source in ((None, "those of most of the"), (load_camera("lsstcam"), "those of camera lsstcam")):
        tree = read_campaign(files=files, camera=camera)
        with pytest.raises(StatsFormatError) as err:
            dask.compute(*[tree[n].to_dataset()["amp_value"] for n in sorted(tree.children)])
        assert str(err.value).startswith(f"{victim}: AMP_NAME_i: amplifier names ['X99', 'C11', ")
        assert f"differ from the expected {expected} ({source}" in str(err.value)
        tree = read_campaign(files=files, camera=camera, on_error="mask")
        nodes = [tree[n].to_dataset() for n in sorted(tree.children)]
        found = [p for ds in nodes for p in problems(ds)]
        assert [(p["file"], p["status"]) for p in found] == [(victim, "amplifier names differ")]
        counts = sum(status_counts(ds) for ds in nodes)
        assert counts.tolist() == [len(files) - 1, 0, 0, 1, 0]
        verify_amp_names(expected, nodes[0].attrs["amp_names_from"], counts)  # one odd file: masked, not refused


def test_amplifier_names_most_files_disagree_with(tmp_path, campaign):
    """A camera with as many amplifiers as the files gives the expected names; when most files list others,
    masking them would hide a wrong camera: refused.  Without the camera, most files' names are expected,
    and a camera of another amplifier count does not decide either."""
    _, root = copy_campaign(campaign, tmp_path)
    files = discover(root, pattern=SIMPLE_PATTERN)
    for path in files["path"]:
        text = open(path).read()
        open(path, "w").write(text.replace("C10", "X99"))
    tree = read_campaign(files=files, camera=load_camera("lsstcam"), on_error="mask")
    nodes = [tree[n].to_dataset() for n in tree.children]
    counts = sum(status_counts(ds) for ds in nodes)
    assert counts.tolist() == [0, 0, 0, len(files), 0]
    with pytest.raises(IngestError, match=rf"^{len(files)} of {len(files)} readable files list other amplifier "
                                          r"names than the expected \['C10', 'C11', .*\] \(those of camera lsstcam\)"):
        verify_amp_names(list(nodes[0].amp.values), nodes[0].attrs["amp_names_from"], counts)
    for camera in (None, load_camera("testcam")):  # testcam has 8 amplifiers, the files 16
        ds = read_campaign(files=files, camera=camera, on_error="mask")["g_6"].to_dataset()
        assert ds.amp.values[0] == "X99" and ds.attrs["amp_names_from"].startswith("those of most of the")
        assert problems(ds) == []


def test_filters_computed_together_keep_their_own_numbers(campaign):
    tree, root, _ = campaign
    got = read_campaign(root, pattern=SIMPLE_PATTERN, batch_size=30)
    names = sorted(got.children)
    for name, ds in zip(names, dask.compute(*[got[n].to_dataset() for n in names])):
        assert_matches_truth(ds, tree[name].to_dataset())


def test_cells_record_the_identity_of_the_file_read(campaign, tmp_path):
    _, root = copy_campaign(campaign, tmp_path)
    files = discover(root, pattern=SIMPLE_PATTERN)
    r = files[files["physical_filter"] == "r_57"]
    gone = r.iloc[3]
    os.utime(r["path"].iloc[0], ns=(10**18, 1_234_567_890_123_456_789))
    ds = read_campaign(files=files.drop(index=gone.name))["r_57"].to_dataset().compute()
    for row in r.drop(index=gone.name).itertuples():
        cell = ds.sel(detector=row.detector, exposure=row.exposure)
        st = os.stat(row.path)
        assert (str(cell.file.values), int(cell.file_size), int(cell.file_mtime_ns)) == \
            (row.path, st.st_size, st.st_mtime_ns)
    assert int(ds.sel(detector=r["detector"].iloc[0], exposure=r["exposure"].iloc[0]).file_mtime_ns) == \
        1_234_567_890_123_456_789
    cell = ds.sel(detector=gone.detector, exposure=gone.exposure)
    assert (str(cell.file.values), int(cell.file_size), int(cell.file_mtime_ns), int(cell.status)) == ("", -1, -1, 1)


def test_no_file_list_reaches_the_client_graph_on_a_cluster(campaign, dask_client):
    """Listed by tasks on the cluster: the graph the client builds refers to the listing tasks' tables, and
    holds no file path; the numbers are the same as read in this process."""
    import cloudpickle

    tree, root, _ = campaign
    got = read_campaign(root, pattern=SIMPLE_PATTERN, batch_size=30)
    for name in sorted(got.children):
        ds = got[name].to_dataset()
        graph = dict(ds["amp_value"].data.__dask_graph__())
        assert str(root).encode() not in cloudpickle.dumps(graph)
        assert_matches_truth(ds.compute(), tree[name].to_dataset())


@pytest.mark.parametrize("spread", [1, 256])
@pytest.mark.parametrize("on_error", ["raise", "mask"])
def test_a_directory_that_cannot_be_listed_is_an_error_or_a_problem(campaign, monkeypatch, on_error, spread):
    """Listed by the client (the top of the tree) or by a scan task (spread 1: the client lists the root only),
    a directory that cannot be listed stops the run or is recorded; it is never skipped in silence.  Read in
    this process (no cluster), where os.scandir is made to fail for it."""
    tree, root, _ = campaign
    exposure = int(tree["g_6"].exposure[2])
    victim = str(root / "g_6" / str(exposure))
    real = os.scandir

    def scandir(path="."):
        if os.fspath(path) == victim:
            raise PermissionError(13, "Permission denied", victim)
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(listing, "SCAN_SPREAD", spread)
    if on_error == "raise":
        with pytest.raises(IngestError, match=f"^{re.escape(victim)}: cannot list directory: Permission denied$"):
            read_campaign(root, pattern=SIMPLE_PATTERN)
        return
    got = read_campaign(root, pattern=SIMPLE_PATTERN, on_error="mask")
    assert got.attrs["problems"] == [{"file": victim, "reason": "cannot list directory: Permission denied"}]
    assert exposure not in got["g_6"].exposure.values
    assert (got["g_6"].sizes["exposure"], got["r_57"].sizes["exposure"]) == (6, 7)


def _manifest_with(source, path, row, column, value):
    table = pd.read_csv(source, dtype=str, keep_default_na=False)
    table.loc[row, column] = value
    table.to_csv(path, index=False)


@pytest.mark.parametrize("column, value, problem", [
    ("path", "", "empty cell"),
    ("path", "  ", "empty cell"),
    ("exposure", "", "empty cell"),
    ("detector", "", "empty cell"),
    ("physical_filter", "", "empty cell"),
    ("exposure", "9223372036854775808", "id 9223372036854775808 is out of the int64 range"),
    ("detector", "-9223372036854775809", "id -9223372036854775809 is out of the int64 range"),
    ("exposure", "99999999999999999999999", "id 99999999999999999999999 is out of the int64 range"),
    ("exposure", "12.5", "not an integer id: '12.5'"),
    ("detector", "1e30", "not an exact integer id: '1e30'"),
    ("detector", "three", "not an integer id: 'three'"),
])
def test_manifest_cells_are_checked_naming_the_line_and_column(campaign, tmp_path, monkeypatch, column, value,
                                                               problem):
    """Read in small byte ranges (several listing tasks), a bad cell far into the manifest is still named by
    its line as an editor shows it (the header is line 1)."""
    monkeypatch.setattr(listing, "MANIFEST_BLOCK_BYTES", 300)
    _, root, manifest = campaign
    bad = tmp_path / "bad.csv"
    _manifest_with(manifest, bad, 57, column, value)
    with pytest.raises(IngestError) as err:
        read_campaign(root=root, manifest=bad)
    assert str(err.value) == f"{bad}: line 59: column {column}: {problem}"


def test_manifest_lines_and_quoting(campaign, tmp_path, monkeypatch):
    monkeypatch.setattr(listing, "MANIFEST_BLOCK_BYTES", 200)
    tree, root, manifest = campaign
    lines = open(manifest).read().splitlines()
    blank = tmp_path / "blank.csv"  # blank lines are skipped, and counted
    blank.write_text("\n".join(lines[:10] + ["", ""] + lines[10:]) + "\n")
    got = read_campaign(root=root, manifest=blank)
    assert_matches_truth(got["r_57"].to_dataset(), tree["r_57"].to_dataset())
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("\n".join(lines[:10] + ["", lines[10] + ",extra"] + lines[11:]) + "\n")
    with pytest.raises(IngestError, match=rf"^{re.escape(str(ragged))}: line 12: expected 4 fields "
                                          r"\(path, exposure, detector, physical_filter\), found 5$"):
        read_campaign(root=root, manifest=ragged)
    quoted = tmp_path / "quoted.csv"
    quoted.write_text("\n".join(lines[:40] + ['"a\nb.yaml",1,2,r_57'] + lines[40:]) + "\n")
    with pytest.raises(IngestError, match=rf"^{re.escape(str(quoted))}: line 41: a quoted field holds a line break"):
        read_campaign(root=root, manifest=quoted)


def test_parquet_manifest_names_the_row(campaign, tmp_path):
    pytest.importorskip("pyarrow")
    _, root, manifest = campaign
    table = pd.read_csv(manifest)
    path = tmp_path / "m.parquet"
    for column, value, dtype, problem in [
            ("exposure", np.nan, "float64", "empty cell"),
            ("detector", 2**63, "uint64", "id 9223372036854775808 is out of the int64 range"),
            ("path", None, "object", "empty cell"),
            ("physical_filter", "", "object", "empty cell")]:
        bad = table.copy()
        bad[column] = bad[column].astype(dtype)
        bad.loc[100, column] = value
        bad.to_parquet(path, row_group_size=25)
        with pytest.raises(IngestError) as err:
            discover(root=root, manifest=path)
        assert str(err.value) == f"{path}: row 101: column {column}: {problem}"


def test_input_count_is_cheap_up_to_the_limit(campaign):
    """What a run counts to decide whether to start a cluster (the input source's ``count``)."""
    _, root, manifest = campaign
    files = discover(manifest=manifest)
    assert listing.input_source(manifest=manifest).count(10**6) == len(files) == 168
    assert listing.input_source(manifest=manifest).count(10) > 10
    assert listing.input_source(files=files).count(10) == 168
    assert listing.input_source(root, SIMPLE_PATTERN).count(10**6) == 169  # every file below the root: manifest.csv too
    assert 10 < listing.input_source(root, SIMPLE_PATTERN).count(10) < 169  # stops early


def test_distributed_read_equals_threaded_and_solver_runs_on_it(campaign, dask_cluster):
    distributed = pytest.importorskip("distributed")
    tree, root, _ = campaign
    threaded = read_campaign(root, pattern=SIMPLE_PATTERN, batch_size=20)["r_57"].to_dataset()
    # Three iterations: each is a round trip to the cluster, and the count is not what is compared.
    ref = measure_scales(threaded.amp_value, threaded.amp_count, 3)
    with distributed.Client(dask_cluster):
        ds = read_campaign(root, pattern=SIMPLE_PATTERN, batch_size=20)["r_57"].to_dataset()
        fit = measure_scales(ds.amp_value, ds.amp_count, 3)
        values = ds.amp_value.values
    np.testing.assert_array_equal(values, threaded.amp_value.values)
    np.testing.assert_allclose(fit.vectorG.values, ref.vectorG.values, rtol=1e-12)
    np.testing.assert_allclose(fit.vectorE.values, ref.vectorE.values, rtol=1e-12)
