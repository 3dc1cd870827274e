"""Discovery and parallel reading of statistics files into a DataTree."""

import os
import shutil

import dask
import numpy as np
import pandas as pd
import pytest

from flatnorm_dask import measure_scales
from flatnorm_dask.camera import load_camera
from flatnorm_dask.ingest import IngestError, compile_pattern, discover, problems, read_campaign, solver_inputs
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


def test_tasks_are_batches_not_files(campaign):
    _, root, _ = campaign
    ds = read_campaign(root, pattern=SIMPLE_PATTERN, batch_size=1000)["g_6"].to_dataset()
    graph = dict(ds["amp_value"].data.__dask_graph__())
    names = [k[0] if isinstance(k, tuple) else k for k in graph]
    readers = [n for n in names if str(n).startswith("_read_block")]
    assert len(readers) == 1  # 84 files, one task
    small = read_campaign(root, pattern=SIMPLE_PATTERN, batch_size=30)["g_6"].to_dataset()
    names = [k[0] if isinstance(k, tuple) else k for k in small["amp_value"].data.__dask_graph__()]
    assert sum(str(n).startswith("_read_block") for n in names) == 4  # ceil(7 exposures / 2 per task)


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
    with pytest.raises(IngestError, match="duplicate of"):
        read_campaign(files=both)
    ds = read_campaign(files=both, on_error="mask")[dup["physical_filter"].iloc[0]].to_dataset()
    found = problems(ds)
    assert len(found) == 1 and "duplicate" in found[0]["reason"] and copy in found[0]["reason"]


def test_amplifier_names_must_agree(campaign, tmp_path):
    _, root = copy_campaign(campaign, tmp_path)
    files = discover(root, pattern=SIMPLE_PATTERN)
    victim = files["path"].iloc[30]
    text = open(victim).read()
    open(victim, "w").write(text.replace("C10", "X99"))
    with pytest.raises(StatsFormatError, match="amplifier names"):
        tree = read_campaign(files=files)
        dask.compute(*[tree[n].to_dataset()["amp_value"] for n in tree.children])
    tree = read_campaign(files=files, on_error="mask")
    name = files["physical_filter"].iloc[30]
    found = problems(tree[name].to_dataset())
    assert [p["file"] for p in found] == [victim]


def test_distributed_read_equals_threaded_and_solver_runs_on_it(campaign):
    distributed = pytest.importorskip("distributed")
    tree, root, _ = campaign
    threaded = read_campaign(root, pattern=SIMPLE_PATTERN, batch_size=20)["r_57"].to_dataset()
    ref = measure_scales(threaded.amp_value, threaded.amp_count)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster, \
            distributed.Client(cluster):
        ds = read_campaign(root, pattern=SIMPLE_PATTERN, batch_size=20)["r_57"].to_dataset()
        fit = measure_scales(ds.amp_value, ds.amp_count)
        values = ds.amp_value.values
    np.testing.assert_array_equal(values, threaded.amp_value.values)
    np.testing.assert_allclose(fit.vectorG.values, ref.vectorG.values, rtol=1e-12)
    np.testing.assert_allclose(fit.vectorE.values, ref.vectorE.values, rtol=1e-12)
