"""Fault tolerance: a corpus of bad inputs (raise or mask), and a worker killed in the middle of a run."""

import os
import re
import shutil
import signal
import threading
import time

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from flatnorm_dask.config import load_config
from flatnorm_dask.simulate import simulate_campaign, write_campaign
from flatnorm_dask.store import open_store
from flatnorm_dask.workflow import run
from helpers import in_process  # noqa: E402


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    tree = simulate_campaign("lsstcam", n_detectors=10, n_exposures=6, filters=("r_57",), seed=11)
    root = tmp_path_factory.mktemp("faults")
    manifest = write_campaign(tree, root, layout="simple")
    return root, manifest


def _set_item(key, value=None, rename=None):
    """A breaker that rewrites one PropertyList item's value (block layout) or renames its key."""
    def breaker(path):
        lines = path.read_text().splitlines(keepends=True)
        at = lines.index(f"- - {key}\n")
        if rename:
            lines[at] = f"- - {rename}\n"
        else:
            lines[at + 2] = f"  - {value}\n"
        path.write_text("".join(lines))
    return breaker


def _retag(path):
    path.write_text(path.read_text().replace("lsst.daf.base.PropertyList", "lsst.daf.base.PropertySet", 1))


def _unreadable(path):
    path.unlink()
    path.mkdir()  # a directory where the file was: unreadable even as root


# name -> (how to break the file, a regular expression the reason must match)
FAULTS = {
    "truncated": (lambda p: p.write_text(p.read_text()[:700]), r"missing|PropertyList item \d+ is not a \[name"),
    "garbage": (lambda p: p.write_bytes(bytes(range(256)) * 3), r"NUL byte at byte 0: a binary file"),
    "empty": (lambda p: p.write_text(""), r"empty file"),
    "wrong_tag": (_retag, r"unexpected YAML tag 'lsst.daf.base.PropertySet'"),
    "missing_key": (_set_item("DETECTOR_N", rename="OTHER_KEY"), r"DETECTOR_N: missing"),
    "string_for_number": (_set_item("AMP_MEDIAN_2", "abc"), r"AMP_MEDIAN_2: not a number: 'abc'"),
    "negative_count": (_set_item("AMP_N_1", "-5"), r"AMP_N_1: negative pixel count -5"),
    "unreadable": (_unreadable, r"cannot read: Is a directory"),
}


@pytest.fixture
def inputs(campaign, tmp_path):
    root, _ = campaign
    dest = tmp_path / "in"
    shutil.copytree(root, dest)
    return dest, pd.read_csv(dest / "manifest.csv")


def _break(dest, table, index, fault):
    path = dest / table["path"].iloc[index]
    FAULTS[fault][0](path)
    return str(path)


def _cfg(dest, store, **overrides):
    return load_config(None, {"input.manifest": str(dest / "manifest.csv"), "output.store": str(store),
                              "solve.level": "AMP", **overrides})


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_each_bad_input_stops_with_file_and_reason(inputs, tmp_path, fault):
    dest, table = inputs
    victim = _break(dest, table, 17, fault)
    store = tmp_path / "out.zarr"
    with pytest.raises(Exception) as err:
        run(_cfg(dest, store), show_progress=False)
    message = str(err.value)
    assert message.startswith(victim) and re.search(FAULTS[fault][1], message), message
    assert not store.exists() and not list(tmp_path.glob(".out.zarr*"))


def test_vanished_and_duplicate_files_stop_with_file_and_reason(inputs, tmp_path):
    dest, table = inputs
    doubled = pd.concat([table, table.iloc[[3]]])
    doubled.to_csv(dest / "manifest.csv", index=False)
    with pytest.raises(Exception, match=r"duplicate of .*" + str(table["path"].iloc[3]).replace(".", r"\.")):
        run(_cfg(dest, tmp_path / "a.zarr"), show_progress=False)
    table.to_csv(dest / "manifest.csv", index=False)
    (dest / table["path"].iloc[5]).unlink()  # listed, then gone before it is read
    with pytest.raises(Exception, match=f"{dest / table['path'].iloc[5]}: cannot read: No such file"):
        run(_cfg(dest, tmp_path / "b.zarr"), show_progress=False)


def test_every_bad_input_masked_and_listed_by_the_cli(inputs, tmp_path):
    dest, table = inputs
    expected = {}
    for i, fault in enumerate(sorted(FAULTS)):
        expected[_break(dest, table, 2 + 5 * i, fault)] = FAULTS[fault][1]
    gone = dest / table["path"].iloc[1]
    gone.unlink()
    expected[str(gone)] = "cannot read: No such file"
    pd.concat([table, table.iloc[[0]]]).to_csv(dest / "manifest.csv", index=False)
    expected[str(dest / table["path"].iloc[0])] = "duplicate"
    store = tmp_path / "masked.zarr"
    result = in_process("run", "--manifest", dest / "manifest.csv", "--output", store, "--on-error", "mask",
                        "--workers", 2, "--no-progress")
    assert result.returncode == 0, result.stderr
    ds = open_store(store)["r_57"].to_dataset()
    found = {p["file"]: p["reason"] for p in ds.attrs["problems"]}
    assert set(found) == set(expected)
    for path, pattern in expected.items():
        assert re.search(pattern, found[path]), (path, found[path])
    assert int((ds["status"] != 0).sum()) == len(expected)
    assert f"{len(expected)} problem(s)" in result.stdout


@pytest.mark.slow
def test_worker_killed_mid_run_gives_the_same_numbers(tmp_path):
    from distributed import Client, LocalCluster

    tree = simulate_campaign("lsstcam", n_detectors=30, n_exposures=10, filters=("g_6",), seed=12)
    write_campaign(tree, tmp_path / "in", layout="simple")
    overrides = {"input.root": str(tmp_path / "in"), "input.pattern": "{physical_filter}/{exposure}/flatStats_{detector}.yaml",
                 "input.batch_size": 30, "solve.level": "AMP", "solve.tol": 1e-10}  # ten reading tasks
    run(load_config(None, {**overrides, "output.store": str(tmp_path / "clean.zarr")}), show_progress=False)

    killed = []
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        pids = client.run(os.getpid)

        def held(dask_scheduler):
            return {ws.address: len(ws.has_what) for ws in dask_scheduler.workers.values()}

        def kill_when_data_is_held():
            # As soon as a worker holds results (read blocks, persisted solver inputs), kill it: they
            # are lost, and the scheduler must recompute them on the new worker or the other one.
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                for address, n_keys in client.run_on_scheduler(held).items():
                    if n_keys >= 2 and address in pids:
                        os.kill(pids[address], signal.SIGKILL)
                        killed.append(time.monotonic())
                        return
                time.sleep(0.01)

        killer = threading.Thread(target=kill_when_data_is_held)
        killer.start()
        run(load_config(None, {**overrides, "output.store": str(tmp_path / "killed.zarr")}), show_progress=False)
        finished = time.monotonic()
        killer.join()
        assert killed and killed[0] < finished, "no worker was killed during the run"
        assert set(client.run(os.getpid).values()) != set(pids.values())  # the nanny started a new worker
    clean = xr.open_zarr(tmp_path / "clean.zarr", group="g_6").load()
    again = xr.open_zarr(tmp_path / "killed.zarr", group="g_6").load()
    for name in ("exp_scale", "det_scale", "exp_scale_err", "det_scale_err", "model", "used"):
        np.testing.assert_array_equal(again[name].values, clean[name].values, err_msg=name)
