"""The Zarr store: round trips, the commit marker, refusal and replacement, distributed writes, export."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
from pathlib import Path

import dask
import numpy as np
import pytest
import xarray as xr
import yaml
import zarr
from dask.delayed import Delayed

from flatnorm_dask.store import (
    COMMIT_ATTR,
    DamagedStoreError,
    IncompleteStoreError,
    StagingStore,
    StoreError,
    StoreExistsError,
    StoreVersion,
    commit_store,
    committed_store,
    current_version,
    export_scales,
    group_datasets,
    is_complete,
    link_chunks,
    open_store,
    prepare_store,
    read_commit,
    store_summary,
    store_transaction,
    verify_store,
    write_chunks,
    write_groups,
    write_region,
    write_scales_yaml,
    write_store,
)

AMPS = ["C10", "C11", "C12", "C07", "C00"]
VARIABLES = ("exp_scale", "det_scale", "background", "weight", "model", "residual", "used")


def make_group(level: str = "AMP", n_det: int = 6, n_exp: int = 9, seed: int = 0, chunks: dict | None = None,
               problems: int = 2) -> xr.Dataset:
    """A filter's Dataset shaped as the workflow builds it (numbers are arbitrary but realistic)."""
    rng = np.random.default_rng(seed)
    detector = np.array([0, 3, 4, 17, 94, 188][:n_det])  # detector 0 must survive (no fill-value masking)
    exposure = 2025112000000 + np.arange(1, n_exp + 1) * 7
    rows = ("detector", "amp") if level == "AMP" else ("detector",)
    row_shape = (n_det, len(AMPS)) if level == "AMP" else (n_det,)
    exp_scale = rng.uniform(1e4, 3e4, n_exp)
    det_scale = rng.uniform(0.8, 1.2, row_shape)
    model = det_scale[..., None] * exp_scale
    background = model * rng.normal(1, 1e-3, model.shape)
    background.flat[::11] = np.nan  # masked cells
    weight = np.where(np.isnan(background), 0.0, rng.integers(1e5, 2e6, model.shape).astype(float))
    used = np.isfinite(background)
    residual = np.where(used, np.log(background / model), np.nan)
    cell = (*rows, "exposure")
    ds = xr.Dataset(
        {
            "exp_scale": ("exposure", exp_scale),
            "det_scale": (rows, det_scale),
            "background": (cell, background),
            "weight": (cell, weight),
            "model": (cell, model),
            "residual": (cell, residual),
            "used": (cell, used),
            "exp_scale_err": ("exposure", rng.uniform(0, 1, n_exp)),
        },
        coords={"detector": detector, "amp": AMPS, "exposure": exposure,
                "obs_id": ("exposure", [f"MC_C_20251120_{i:06d}" for i in range(n_exp)])},
        attrs={"level": level, "iterations": np.int64(10), "converged": np.bool_(True), "tolerance": None,
               "residual_scatter": np.float64(1.25e-3), "n_files": n_det * n_exp,
               "problems": [{"file": f"/data/f{i}.yaml", "reason": "DETECTOR_N missing"} for i in range(problems)]},
    )
    ds["det_scale"].attrs["long_name"] = "G"
    if chunks:
        ds = ds.chunk(chunks)
    return ds


def plain_attrs(attrs: dict) -> dict:
    """What the store should hold: numpy scalars as Python ones."""
    return json.loads(json.dumps({k: v.item() if isinstance(v, np.generic) else v for k, v in attrs.items()}))


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def leftovers(path: Path) -> list[Path]:
    """Unfinished work beside or below a store: staging directories, versions being deleted, new pointers."""
    found = [*path.parent.glob(f".{path.name}.partial-*"), *path.parent.glob(f".{path.name}.pointer-*")]
    versions = path.parent / f".{path.name}.versions"
    if versions.is_dir():
        found += [p for p in versions.iterdir() if ".partial-" in p.name or ".deleting-" in p.name]
    return sorted(found)


@pytest.mark.parametrize("level", ["AMP", "DETECTOR"])
def test_round_trip_open_zarr_and_open_store(tmp_path, level):
    groups = {"r_57": make_group(level, seed=1), "g_6": make_group(level, seed=2, chunks={"exposure": 4})}
    path = write_store(tmp_path / "s.zarr", groups, root_attrs={"created": "2026-01-01T00:00:00+00:00",
                                                                   "config": {"solve": {"level": level}}})
    assert path == tmp_path / "s.zarr" and is_complete(path) and not leftovers(path)
    tree = open_store(path)
    assert sorted(tree.children) == ["g_6", "r_57"]
    assert tree.attrs["config"] == {"solve": {"level": level}}
    assert sorted(tree.attrs[COMMIT_ATTR]["groups"]) == ["g_6", "r_57"]
    for name, original in groups.items():
        expected = original.load()
        expected.attrs = plain_attrs(expected.attrs)
        lazy = tree[name].to_dataset()
        assert lazy["background"].chunks is not None  # opened lazily, as dask arrays
        for got in (xr.open_zarr(path, group=name).load(), lazy.load()):
            xr.testing.assert_identical(got, expected)
            assert got.attrs == expected.attrs
            assert got["det_scale"].attrs["long_name"] == "G"
            assert got["amp"].values.tolist() == AMPS and got["obs_id"].values.tolist()[0] == "MC_C_20251120_000000"
            assert got["detector"].values.tolist()[0] == 0
            assert got["detector"].dtype == np.int64 and got["exposure"].dtype == np.int64
            assert got["used"].dtype == bool and got["background"].dtype == np.float64
            cell = ("detector", "amp", "exposure") if level == "AMP" else ("detector", "exposure")
            assert got["background"].dims == cell and got["det_scale"].dims == cell[:-1]
            np.testing.assert_array_equal(got["background"].values, expected["background"].values)


def test_attrs_numpy_scalars_nan_and_nested_values(tmp_path):
    ds = make_group(problems=0)
    ds.attrs.update(residual_scatter=np.float32(np.nan), shape=np.array([3, 4]), nested={"a": (1, np.int8(2))},
                    path=tmp_path)
    path = write_store(tmp_path / "s.zarr", {"all": ds}, root_attrs={"versions": {"numpy": np.__version__}})
    attrs = open_store(path)["all"].attrs
    assert math.isnan(attrs["residual_scatter"]) and attrs["shape"] == [3, 4]
    assert attrs["nested"] == {"a": [1, 2]} and attrs["path"] == str(tmp_path) and attrs["problems"] == []
    assert attrs["converged"] is True and type(attrs["iterations"]) is int


def test_bad_attrs_and_names_are_refused(tmp_path):
    ds = make_group()
    ds.attrs["bad"] = object()
    with pytest.raises(TypeError, match="bad"):
        write_store(tmp_path / "a.zarr", {"r": ds})
    with pytest.raises(ValueError, match=COMMIT_ATTR):
        write_store(tmp_path / "b.zarr", {"r": make_group()}, root_attrs={COMMIT_ATTR: 1})
    with pytest.raises(ValueError, match="group"):
        write_store(tmp_path / "c.zarr", {"r/57": make_group()})
    # A failed write leaves neither a store nor a staging directory.
    for name in ("a.zarr", "b.zarr", "c.zarr"):
        assert not (tmp_path / name).exists() and not leftovers(tmp_path / name)


def test_setup_then_delayed_chunk_writes(tmp_path):
    path = tmp_path / "s.zarr"
    staging = prepare_store(path)
    assert staging.parent == tmp_path / ".s.zarr.versions" and ".partial-" in staging.name
    assert not any(staging.iterdir()) and not os.path.lexists(path)
    writes = write_groups(staging, {"r_57": make_group(chunks={"detector": 2, "exposure": 4})})
    assert len(writes) == 1 and all(isinstance(w, Delayed) for w in writes)
    # Metadata is in place; the dask-backed chunks are not written until the caller computes.
    assert (staging / "r_57" / "background" / "zarr.json").is_file()
    assert not (staging / "r_57" / "background" / "c").exists()
    dask.compute(*writes)
    assert (staging / "r_57" / "background" / "c").is_dir()
    with pytest.raises(StoreError, match="not empty"):
        write_groups(staging, {"r_57": make_group()})
    version = commit_store(staging, path)
    assert version.store == path and version.path == path.resolve() and is_complete(path) and not staging.exists()
    assert os.readlink(path) == f".s.zarr.versions/{version.id}"  # relative: the directory can be moved


def test_interrupted_write_is_never_a_store(tmp_path):
    path = tmp_path / "s.zarr"
    staging = prepare_store(path)
    dask.compute(*write_groups(staging, {"r_57": make_group(chunks={"exposure": 3})}))
    # The run dies here, before commit_store.
    assert not path.exists() and not is_complete(path) and not is_complete(staging)
    with pytest.raises(StoreError) as err:
        open_store(path)
    assert str(path) in str(err.value)
    with pytest.raises(IncompleteStoreError, match="--overwrite") as err:
        open_store(staging)
    assert str(staging) in str(err.value) and "no commit marker" in str(err.value)
    # Even an empty staging directory (killed before any write) is refused as incomplete.
    with pytest.raises(IncompleteStoreError):
        open_store(prepare_store(path))


def test_store_without_marker_is_refused(tmp_path):
    path = write_store(tmp_path / "s.zarr", {"r_57": make_group()})
    meta_file = path / "zarr.json"
    meta = json.loads(meta_file.read_text())
    del meta["attributes"][COMMIT_ATTR]
    meta_file.write_text(json.dumps(meta))
    assert not is_complete(path)
    with pytest.raises(IncompleteStoreError) as err:
        open_store(path)
    assert str(err.value).startswith(f"{path}: not a complete flatnorm store")
    with pytest.raises(IncompleteStoreError):
        export_scales(path)
    with pytest.raises(IncompleteStoreError):
        store_summary(path)


def test_existing_store_is_refused_and_left_byte_for_byte(tmp_path):
    path = write_store(tmp_path / "s.zarr", {"r_57": make_group(seed=1)})
    before = snapshot(path)
    with pytest.raises(StoreExistsError) as err:
        write_store(path, {"r_57": make_group(seed=2)})
    assert str(err.value) == f"{path} exists; pass --overwrite to replace it"
    assert snapshot(path) == before and not leftovers(path)
    # The same when someone else commits between prepare and commit (a concurrent run).
    other = tmp_path / "t.zarr"
    staging = prepare_store(other)
    dask.compute(*write_groups(staging, {"r_57": make_group(seed=3)}))
    write_store(other, {"r_57": make_group(seed=4)})
    theirs = snapshot(other)
    with pytest.raises(StoreExistsError):
        commit_store(staging, other)
    assert snapshot(other) == theirs


def test_overwrite_replaces_and_cleans_up(tmp_path):
    path = write_store(tmp_path / "s.zarr", {"r_57": make_group(seed=1), "g_6": make_group(seed=1)})
    new = make_group(seed=2)
    write_store(path, {"r_57": new}, overwrite=True)
    tree = open_store(path)
    assert list(tree.children) == ["r_57"]  # the old group is gone with the old store
    np.testing.assert_array_equal(tree["r_57"]["det_scale"].values, new["det_scale"].values)
    assert not leftovers(path)


def test_failed_swap_keeps_the_old_store(tmp_path, monkeypatch):
    path = write_store(tmp_path / "s.zarr", {"r_57": make_group(seed=1)})
    before = snapshot(path)
    real_rename = os.rename

    def rename(src, dst):
        if ".partial-" in str(src):  # the new store cannot be moved in (e.g. the disk went read-only)
            raise OSError(30, "Read-only file system")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(StoreError) as err:
        write_store(path, {"r_57": make_group(seed=2)}, overwrite=True)
    assert str(err.value) == f"{path}: cannot commit the new store: Read-only file system"
    monkeypatch.undo()
    assert snapshot(path) == before and is_complete(path) and not leftovers(path)


def test_staging_with_marker_is_still_not_a_store(tmp_path, monkeypatch):
    path = tmp_path / "s.zarr"
    staging = prepare_store(path)
    dask.compute(*write_groups(staging, {"r_57": make_group()}))
    # Killed between writing the marker and the rename: the marker is there, the name says staging.
    monkeypatch.setattr(os, "rename", lambda src, dst: (_ for _ in ()).throw(OSError(5, "I/O error")))
    with pytest.raises(StoreError):
        commit_store(staging, path)
    monkeypatch.undo()
    assert COMMIT_ATTR in json.loads((staging / "zarr.json").read_text())["attributes"]
    assert not is_complete(staging) and not path.exists()
    with pytest.raises(IncompleteStoreError):
        open_store(staging)


def test_overwrite_never_replaces_something_that_is_not_a_store(tmp_path):
    victim = tmp_path / "home"
    victim.mkdir()
    (victim / "thesis.tex").write_text("years of work")
    with pytest.raises(StoreError, match="exists and is not a flatnorm store; refusing to replace it, even with"):
        write_store(victim, {"r_57": make_group()}, overwrite=True)
    assert (victim / "thesis.tex").read_text() == "years of work" and not leftovers(victim)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]  # refused before anything was made


def test_leftover_staging_is_reported_not_removed(tmp_path, caplog):
    path = tmp_path / "s.zarr"
    running = prepare_store(path)  # a run still writing (recent): not even reported
    with caplog.at_level(logging.WARNING, logger="flatnorm_dask.store"):
        write_store(path, {"r_57": make_group()})
    assert running.is_dir() and not caplog.text
    killed = prepare_store(tmp_path / "t.zarr")  # a run killed two days ago
    two_days_ago = killed.stat().st_mtime - 2 * 86400
    os.utime(killed, (two_days_ago, two_days_ago))
    with caplog.at_level(logging.WARNING, logger="flatnorm_dask.store"):
        write_store(tmp_path / "t.zarr", {"r_57": make_group()})
    assert killed.is_dir() and running.is_dir()
    assert "1 unfinished write older than a day" in caplog.text and killed.name in caplog.text


def test_distributed_write_from_workers_and_rerun_identical(tmp_path, dask_client):
    client = dask_client  # the session's shared two-worker cluster
    # Irregular dask chunks (as ingest batches give) must be aligned to zarr chunks, not refused.
    ds = make_group(n_det=6, n_exp=9, seed=5).chunk({"detector": (2, 3, 1), "exposure": (4, 4, 1)})
    ds["model"] = ds["model"] * 1.0  # a lazy derived variable, computed during the write
    expected = ds.compute()
    first = write_store(tmp_path / "a.zarr", {"r_57": ds})  # dask.compute uses the active client
    again = write_store(tmp_path / "b.zarr", {"r_57": ds})
    assert client.run(lambda: 1) and len(client.scheduler_info()["workers"]) == 2
    a = xr.open_zarr(first, group="r_57").load()
    b = xr.open_zarr(again, group="r_57").load()
    expected.attrs = plain_attrs(expected.attrs)
    xr.testing.assert_identical(a, expected)
    xr.testing.assert_identical(a, b)
    chunks = zarr.open_array(str(first / "r_57" / "background"), mode="r").chunks
    assert chunks == (3, len(AMPS), 4)  # one zarr chunk per (rechunked) dask chunk


def test_store_summary_reports_groups_and_provenance(tmp_path):
    root = {"created": "2026-01-01T00:00:00+00:00", "versions": {"numpy": "2.4", "zarr": "3.1"},
            "config": {"input": {"root": "/data", "pattern": "{exposure}/{detector}.yaml", "camera": "lsstcam"},
                       "solve": {"level": "AMP", "iterations": 10, "tol": None}}}
    path = write_store(tmp_path / "s.zarr", {"r_57": make_group(problems=7), "g_6": make_group(problems=0)},
                       root_attrs=root)
    text = store_summary(path)
    for word in ("r_57", "g_6", "6 detectors", "5 amps", "9 exposures", "level AMP", "10 iterations",
                 "converged", "1.250e-03", "7 problem(s)", "/data/f0.yaml: DETECTOR_N missing", "and 2 more",
                 "numpy 2.4", "2026-01-01", str(path)):
        assert word in text, word


def test_store_summary_reads_the_config_through_the_schema(tmp_path):
    groups = {"r_57": make_group(problems=0)}
    butler = {"input": {"butler": "/repo/main", "collections": "LSSTCam/runs/a, LSSTCam/runs/b",
                        "where": "exposure.day_obs = 20251120"},
              "solve": {"level": "amp", "tol": "1e-10", "max_iter": 50}}
    text = store_summary(write_store(tmp_path / "b.zarr", groups, root_attrs={"config": butler}))
    # Canonical spellings and defaults from the schema: AMP, the collections split, cpFlatStatistics, lsstcam.
    assert ("  config: input butler /repo/main (cpFlatStatistics in LSSTCam/runs/a, LSSTCam/runs/b where "
            "exposure.day_obs = 20251120), camera lsstcam, level AMP, tol 1e-10, max_iter 50") in text.splitlines()
    bad = {"input": {"root": "/data", "pattern": "{exposure}.yaml"}, "solve": {"levle": "AMP"}}
    path = write_store(tmp_path / "bad.zarr", groups, root_attrs={"config": bad})
    [line] = [line for line in store_summary(path).splitlines() if "config" in line]
    assert line.startswith(f"  config: not readable: {path}: config attribute: solve.levle: unknown option")
    assert "r_57: level AMP" in store_summary(path)  # the rest is still shown
    assert "config" not in store_summary(write_store(tmp_path / "none.zarr", groups))


def test_transaction_commits_or_leaves_nothing(tmp_path):
    path = tmp_path / "s.zarr"
    with store_transaction(path) as txn:
        staging = txn.staging
        assert staging.is_dir() and read_commit(staging) is None and not path.exists() and txn.version is None
        dask.compute(*write_groups(staging, {"r_57": make_group(chunks={"exposure": 4})}))
    assert is_complete(path) and not staging.exists() and not leftovers(path)
    assert txn.version.path == path.resolve() and txn.version.store == path
    record = read_commit(path)
    assert record["groups"] == ["r_57"] and record == open_store(path).attrs[COMMIT_ATTR]
    before = snapshot(path)
    with pytest.raises(ZeroDivisionError):  # the work fails: the old store stays, the staging goes
        with store_transaction(path, overwrite=True) as txn:
            dask.compute(*write_groups(txn.staging, {"r_57": make_group(seed=3)}))
            1 / 0
    assert snapshot(path) == before and not leftovers(path)
    # Another run commits the same path first: this one loses at its commit and removes its staging.
    other = tmp_path / "t.zarr"
    with pytest.raises(StoreExistsError, match="exists; pass --overwrite"):
        with store_transaction(other) as txn:
            dask.compute(*write_groups(txn.staging, {"r_57": make_group(seed=4)}))
            write_store(other, {"g_6": make_group(seed=5)})
    assert list(open_store(other).children) == ["g_6"] and not leftovers(other)


def test_group_datasets_of_trees_and_mappings(tmp_path):
    groups = {"r_57": make_group(seed=1), "g_6": make_group(seed=2)}
    tree = xr.DataTree.from_dict({name: ds for name, ds in groups.items()})
    for source in (groups, tree, dict(tree.children)):
        got = group_datasets(source)
        assert list(got) == ["r_57", "g_6"] and all(isinstance(ds, xr.Dataset) for ds in got.values())
        xr.testing.assert_identical(got["g_6"], groups["g_6"])
    stored = group_datasets(open_store(write_store(tmp_path / "s.zarr", tree)))
    assert sorted(stored) == ["g_6", "r_57"]
    np.testing.assert_array_equal(stored["r_57"]["background"].values, groups["r_57"]["background"].values)


def expected_scales(ds: xr.Dataset) -> dict:
    """One filter's scales built here with plain loops, independently of records.scales_dict: every detector
    and amplifier, the exposures whose E is finite."""
    amps = [str(a) for a in ds["amp"].values]
    e = {int(x): float(v) for x, v in zip(ds["exposure"].values, ds["exp_scale"].values) if math.isfinite(v)}
    det_scale = {}
    for i, d in enumerate(ds["detector"].values):
        g = ds["det_scale"].values[i]
        det_scale[int(d)] = {a: float(g[j]) for j, a in enumerate(amps)} if g.ndim else float(g)
    return {"expScale": {int(d): {a: dict(e) for a in amps} for d in ds["detector"].values},
            "detScale": det_scale}


def test_export_yaml_reads_back_as_the_scales_of_each_filter(tmp_path):
    groups = {"r_57": make_group("AMP", seed=1), "g_6": make_group("DETECTOR", seed=2, chunks={"exposure": 2})}
    path = write_store(tmp_path / "s.zarr", groups)
    out = write_scales_yaml(path, tmp_path / "out")
    assert sorted(out) == [tmp_path / "out" / "g_6.yaml", tmp_path / "out" / "r_57.yaml"]
    for file in out:
        name = file.stem
        text = file.read_text()
        assert "&id" not in text and "!!" not in text  # plain YAML: no anchors, no Python tags
        got = yaml.safe_load(text)
        assert got == expected_scales(groups[name].load())
        assert export_scales(open_store(path))[name] == got
    got = yaml.safe_load((tmp_path / "out" / "r_57.yaml").read_text())
    det = next(iter(got["detScale"]))
    assert type(det) is int and type(got["detScale"][det]["C10"]) is float
    assert type(next(iter(got["expScale"][det]["C00"]))) is int
    assert not leftovers(out[0]) and not leftovers(out[1])


def test_export_keeps_nan_g_and_leaves_out_nan_e(tmp_path):
    ds = make_group("DETECTOR")
    ds["det_scale"][1] = np.nan  # a detector's G, were it NaN, is still listed
    ds["exp_scale"][2] = np.nan  # an exposure without a usable cell is not
    path = write_store(tmp_path / "s.zarr", {"all": ds})
    [file] = write_scales_yaml(path, tmp_path / "s.yaml")
    got = yaml.safe_load(file.read_text())
    assert math.isnan(got["detScale"][3]) and got["detScale"][0] == float(ds["det_scale"][0])
    left_out = int(ds["exposure"][2])
    assert got["expScale"] == expected_scales(ds)["expScale"] and left_out not in got["expScale"][3]["C07"]
    assert all(len(per_amp) == ds.sizes["exposure"] - 1 for amps in got["expScale"].values()
               for per_amp in amps.values())


def test_export_needs_amp_names(tmp_path):
    path = write_store(tmp_path / "s.zarr", {"all": make_group("DETECTOR").drop_vars("amp")})
    with pytest.raises(StoreError, match="amp coordinate"):
        export_scales(path)


# ------------------------------------------------------------------------------------------ linked chunks


def grown_store(tmp_path: Path, chunks: dict | None = None) -> tuple[Path, StoreVersion, xr.Dataset, Path]:
    """A store of 9 exposures in chunks of 3, and a staging directory laid out for the same group grown to 12
    (``chunks`` for its chunks) as an append lays it out: metadata and coordinates, no chunk yet."""
    grown = make_group(n_exp=12, chunks={"exposure": 3})
    grown = grown.assign_coords(obs_id=grown["obs_id"].compute())
    store = write_store(tmp_path / "s.zarr", {"r_57": grown.isel(exposure=slice(0, 9))})
    base = current_version(store)
    staging = prepare_store(store, expect_version=base.id)
    write_groups(staging, {"r_57": grown.chunk(chunks) if chunks else grown})
    return store, base, grown, staging


CHUNKED = ("exp_scale", "det_scale", "background", "weight", "model", "residual", "used", "exp_scale_err")


def test_linked_chunks_are_the_committed_files_and_never_written_through(tmp_path):
    store, base, grown, staging = grown_store(tmp_path)
    before = snapshot(base.path)
    n = link_chunks(committed_store(base), staging, "r_57", CHUNKED, [{"exposure": j} for j in range(3)])
    # 3 chunks of each per-exposure array (the cells' hold every detector and amplifier), det_scale's one chunk.
    assert n == 3 * 7 + 1
    for key in ("background/c/0/0/2", "exp_scale/c/1", "det_scale/c/0/0"):
        assert os.path.samefile(staging / "r_57" / key, base.path / "r_57" / key)
    # The last chunk is written, det_scale (linked) again with other values: its file is replaced, never
    # written into (it is the committed version's file too).
    block = grown.isel(exposure=slice(9, 12)).load()
    block["det_scale"] = block["det_scale"] * 2
    write_region(staging, "r_57", block[list(CHUNKED)], {"exposure": slice(9, 12)})
    assert not os.path.samefile(staging / "r_57" / "det_scale/c/0/0", base.path / "r_57" / "det_scale/c/0/0")
    version = commit_store(staging, store, expect_version=base.id)
    assert snapshot(base.path) == before  # the committed version, byte for byte
    assert verify_store(base) and verify_store(version)
    expected = grown.load().assign(det_scale=grown["det_scale"] * 2)
    xr.testing.assert_equal(open_store(store)["r_57"].to_dataset().load(), expected)
    xr.testing.assert_equal(open_store(base)["r_57"].to_dataset().load(), grown.isel(exposure=slice(0, 9)))
    assert os.path.samefile(version.path / "r_57" / "model/c/0/0/1", base.path / "r_57" / "model/c/0/0/1")


def test_chunks_are_copied_where_the_file_system_cannot_link_them(tmp_path, monkeypatch):
    store, base, grown, staging = grown_store(tmp_path)

    def cannot(source, target):
        raise OSError(errno.EXDEV, "Invalid cross-device link", str(source), None, str(target))

    monkeypatch.setattr(os, "link", cannot)
    assert link_chunks(committed_store(base), staging, "r_57", CHUNKED) == 3 * 7 + 1
    key = "r_57/background/c/0/0/1"
    assert not os.path.samefile(staging / key, base.path / key)
    assert (staging / key).read_bytes() == (base.path / key).read_bytes()
    monkeypatch.undo()
    write_region(staging, "r_57", grown.isel(exposure=slice(9, 12)).load()[list(CHUNKED)], {"exposure": slice(9, 12)})
    commit_store(staging, store, expect_version=base.id)
    xr.testing.assert_equal(open_store(store)["r_57"].to_dataset().load(), grown.load())


@pytest.mark.parametrize("change", ["chunks", "attrs"])
def test_chunks_of_another_layout_are_never_linked(tmp_path, change):
    """Staged arrays laid out otherwise (other chunks, or attributes that decode the values otherwise): chunk
    files of the store would not hold the same values; nothing is linked."""
    store, base, grown, staging = (grown_store(tmp_path, {"exposure": 4}) if change == "chunks" else
                                   grown_store(tmp_path))
    if change == "attrs":  # as a staged array with another fill value would say
        array = zarr.open_array(StagingStore(staging), path="r_57/background", mode="r+")
        array.attrs["_FillValue"] = -1.0
    assert link_chunks(committed_store(base), staging, "r_57", CHUNKED) is None
    assert not [v for v in CHUNKED if (staging / "r_57" / v / "c").exists()]


def test_linking_from_a_damaged_store_names_the_missing_chunk(tmp_path):
    store, base, grown, staging = grown_store(tmp_path)
    (base.path / "r_57" / "weight" / "c" / "0" / "0" / "1").unlink()
    with pytest.raises(DamagedStoreError, match=f"^{store}: damaged store: r_57/weight/c/0/0/1 is missing"):
        link_chunks(committed_store(base), staging, "r_57", CHUNKED)


def test_a_layout_only_write_is_the_layout_of_a_full_write(tmp_path):
    """write_groups(layout_only) lays a lazy group out exactly as a full write does (every metadata file equal,
    no chunk of its lazy variables written), and write_chunks then writes what the full write would have."""
    ds = make_group(chunks={"exposure": 4})
    full, laid = tmp_path / "full.zarr", tmp_path / "laid.zarr"
    write_store(full, {"r_57": ds})
    with store_transaction(laid) as txn:
        assert write_groups(txn.staging, {"r_57": ds}, layout_only=True) == []
        group = txn.staging / "r_57"
        metadata = {str(p.relative_to(group)): p.read_bytes() for p in group.rglob("zarr.json")}
        assert len(metadata) == 1 + len(ds.variables) and not (group / "background" / "c").exists()
        written = current_version(full).path / "r_57"
        assert metadata == {key: (written / key).read_bytes() for key in metadata}
        dask.compute(write_chunks(txn.staging, "r_57", ds), scheduler="sync")
    xr.testing.assert_identical(open_store(laid)["r_57"].to_dataset().load(),
                                open_store(full)["r_57"].to_dataset().load())
