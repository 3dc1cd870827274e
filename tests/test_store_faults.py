"""Faults around the store (issue 12): output paths that cannot be written, stores damaged after their commit,
runs stopped by a signal, and concurrent runs of the ``flatnorm`` command.

Concurrency at the level of the transaction (every interleaving, the lock, readers) is in test_commit.py.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import time
from pathlib import Path

import dask
import numpy as np
import pytest
import xarray as xr
import yaml
import zarr

from flatnorm_dask.cli import main
from flatnorm_dask.simulate import SIMPLE_PATTERN, simulate_campaign, write_campaign
from flatnorm_dask.store import (
    MANIFEST_FILE,
    DamagedStoreError,
    StagingStore,
    StoreError,
    abort_store,
    check_output_file,
    commit_store,
    export_scales,
    is_complete,
    open_store,
    prepare_store,
    store_transaction,
    verify_store,
    write_groups,
    write_region,
    write_scales_yaml,
    write_store,
)
from helpers import Command, error_line  # noqa: E402

INTERNAL = (".partial-", ".versions", ".pointer-", ".deleting-", ".lock")


def written_campaign(tmp_path_factory, name: str, n_detectors: int, n_exposures: int) -> Path:
    """A simulated r_57 campaign written as files in a new directory, its root."""
    root = tmp_path_factory.mktemp(name)
    write_campaign(simulate_campaign("lsstcam", n_detectors=n_detectors, n_exposures=n_exposures,
                                     filters=("r_57",), seed=3), root, layout="simple")
    return root


@pytest.fixture(scope="module")
def campaign(tmp_path_factory) -> Path:
    return written_campaign(tmp_path_factory, "campaign", 40, 8)


@pytest.fixture(scope="module")
def small_campaign(tmp_path_factory) -> Path:
    """A few files, for the runs paused at a commit step: how many they read is not what they test."""
    return written_campaign(tmp_path_factory, "small", 6, 4)


def one_error(capsys, argv: list) -> str:
    """Run the command in-process; it must fail with exactly one line on stderr, naming no internal file."""
    assert main([str(a) for a in argv]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("flatnorm: error:")]
    assert errors == lines[-1:] and "Traceback" not in "".join(lines), lines
    assert not any(word in errors[0] for word in INTERNAL), errors[0]
    return errors[0].removeprefix("flatnorm: error: ")


def run_args(campaign: Path, store: Path, *extra) -> list:
    return ["run", "--input", campaign, "--pattern", SIMPLE_PATTERN, "--output", store, "--no-progress", *extra]


def nothing_written(where: Path, *keep: str) -> bool:
    return sorted(p.name for p in where.iterdir()) == sorted(keep)


# ------------------------------------------------------------------------------------------- output paths

def test_output_that_is_not_a_store_is_never_replaced(campaign, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "data.bin").write_bytes(b"\0" * 10)
    link = tmp_path / "link.zarr"
    link.symlink_to(elsewhere)
    fifo = tmp_path / "fifo.zarr"
    os.mkfifo(fifo)
    other = tmp_path / "other.zarr"  # somebody else's Zarr store
    zarr.create_group(str(other), zarr_format=3, attributes={"owner": "someone else"})
    for target in (notes, link, fifo, elsewhere, other):
        for flags in ([], ["--overwrite"]):
            assert one_error(capsys, run_args(campaign, target, *flags)) == \
                f"{target} exists and is not a flatnorm store; refusing to replace it, even with --overwrite"
    assert notes.read_text() == "keep me" and (elsewhere / "data.bin").stat().st_size == 10
    assert os.readlink(link) == str(elsewhere)
    assert zarr.open_group(str(other), mode="r").attrs["owner"] == "someone else"
    assert nothing_written(tmp_path, "notes.txt", "elsewhere", "link.zarr", "fifo.zarr", "other.zarr")
    # An empty directory (made by mkdir, say) is no one's data: --overwrite replaces it.
    empty = tmp_path / "empty.zarr"
    empty.mkdir()
    assert one_error(capsys, run_args(campaign, empty)) == f"{empty} exists; pass --overwrite to replace it"
    write_store(empty, groups(), overwrite=True)
    assert is_complete(empty) and os.path.islink(empty)


def test_output_below_a_file_is_refused_before_any_work(campaign, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("x")
    store = tmp_path / "notes.txt" / "deeper" / "s.zarr"
    assert one_error(capsys, run_args(campaign, store)) == f"{store}: {tmp_path / 'notes.txt'} is not a directory"
    assert nothing_written(tmp_path, "notes.txt")


def test_scales_yaml_is_checked_before_any_work(campaign, tmp_path, capsys):
    """Checked before the files are read (export's own rules, tests/test_export.py; here: what cannot be
    written at all, and the store itself)."""
    store = tmp_path / "s.zarr"
    (tmp_path / "notes.txt").write_text("x")
    notes = tmp_path / "notes.txt"
    cases = {
        notes / "s.yaml": f"{notes / 's.yaml'}: {notes} is not a directory",
        notes / "scales": f"{notes / 'scales' / 'r_57.yaml'}: {notes} is not a directory",  # a directory of files
        store / "s.yaml": f"{store / 's.yaml'}: the scales YAML cannot be the store {store} or inside it",
        store: f"{store}: the scales YAML cannot be the store {store} or inside it",
    }
    for yaml_path, message in cases.items():
        assert one_error(capsys, run_args(campaign, store, "--scales-yaml", yaml_path)) == message
    assert nothing_written(tmp_path, "notes.txt")  # no store, no staging, no lock


def test_export_writes_through_links_and_names_no_temporary_file(tmp_path, capsys):
    store = write_store(tmp_path / "s.zarr", groups())
    (tmp_path / "notes.txt").write_text("x")
    target = tmp_path / "notes.txt" / "g.yaml"
    assert one_error(capsys, ["export", store, "--filter", "g_6", "-o", target]) == \
        f"{target}: {tmp_path / 'notes.txt'} is not a directory"
    # Missing directories are made; a symbolic link keeps pointing at the file it names, which is replaced.
    real = tmp_path / "calib" / "r.yaml"
    assert main(["export", str(store), "--filter", "r_57", "-o", str(real)]) == 0
    link = tmp_path / "current.yaml"
    link.symlink_to(real)
    real.write_text("old")
    assert write_scales_yaml(store, link, ["r_57"]) == [link] and os.path.islink(link)
    assert yaml.safe_load(real.read_text()) == export_scales(store)["r_57"]
    assert [p.name for p in real.parent.iterdir()] == ["r.yaml"]  # no temporary file left


def test_a_write_failing_on_a_worker_names_the_store(tmp_path, dask_client):
    """A chunk that cannot be written (a full disk, say; here a file in the way of its directory), on a worker:
    the error names the store, not the file in the staging directory, and nothing is left."""
    store = tmp_path / "s.zarr"
    with pytest.raises(StoreError) as err:
        with store_transaction(store) as txn:
            writes = write_groups(txn.staging, groups())
            (txn.staging / "r_57" / "det_scale" / "c").write_text("in the way")
            dask_client.compute(writes, sync=True)
    assert str(err.value) == f"{store}: cannot write it: Not a directory"
    deadline = time.monotonic() + 60  # the other chunk writes may still be running: let them end
    while any(dask_client.run(lambda dask_worker: len(dask_worker.state.executing)).values()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert nothing_written(tmp_path)


def test_writes_racing_an_abort_leave_nothing(tmp_path):
    """Chunk writes in threads while the staging directory is abandoned: a write that passed its check of the
    root just before the abort renamed it must not make the directory again (zarr makes missing parents).
    Each round leaves nothing at all; before the fix about half the rounds left a directory behind."""
    import contextlib
    import threading

    for round_ in range(30):
        base = tmp_path / f"round{round_}"
        staging = prepare_store(base / "s.zarr")
        array = zarr.create_array(StagingStore(staging), name="r_57/det_scale", shape=(48,), chunks=(1,),
                                  dtype="f8")
        def write(i):
            with contextlib.suppress(StoreError, FileNotFoundError):  # refused: the staging is gone
                array[i] = 1.0

        threads = [threading.Thread(target=write, args=(i,)) for i in range(48)]
        for thread in threads:
            thread.start()
        abort_store(staging)
        for thread in threads:
            thread.join()
        assert not list(base.rglob("*")), (round_, sorted(base.rglob("*")))


def test_a_late_write_never_brings_back_an_abandoned_staging(tmp_path):
    """A chunk write that starts after its run failed elsewhere (zarr's LocalStore would make the directory
    again) is refused; nor can anything be written into a committed version."""
    store = tmp_path / "s.zarr"
    staging = prepare_store(store)
    dask.compute(*write_groups(staging, groups()), scheduler="sync")
    # As a worker holds it: the store unpickled, the array opened before the run failed.
    late = zarr.open_array(pickle.loads(pickle.dumps(StagingStore(staging))), path="r_57/det_scale", mode="r+")
    abort_store(staging)
    with pytest.raises(StoreError, match="this write came after its store was committed or abandoned"):
        late[0, 0] = 2.0
    assert nothing_written(tmp_path)
    staging = prepare_store(store)
    dask.compute(*write_groups(staging, groups()), scheduler="sync")
    late = zarr.open_array(StagingStore(staging), path="r_57/det_scale", mode="r+")
    commit_store(staging, store)
    with pytest.raises(StoreError, match="this write came after"):
        late[0, 0] = 2.0
    assert is_complete(store)


def test_block_writes_of_a_process_go_to_their_own_run_and_never_after_it(tmp_path):
    """write_region keeps the arrays it opened (a reading task writes a block of each variable per task): a
    run's blocks land in its own staging directory, the next run's in its own, and a block written once its
    run was abandoned or committed is refused, though the arrays were opened before."""
    def blocks(seed):
        whole = groups(seed)["r_57"]
        return whole, [(whole.isel(exposure=slice(e, e + 2)).compute(), {"exposure": slice(e, e + 2)})
                       for e in range(0, 6, 2)]

    store = tmp_path / "s.zarr"
    for seed in (1, 2):  # the second run replaces the first, at the same store path
        whole, parts = blocks(seed)
        with store_transaction(store, overwrite=True) as txn:
            write_groups(txn.staging, {"r_57": whole.chunk({"exposure": 2, "detector": 4})})  # layout only
            for block, region in parts:
                write_region(txn.staging, "r_57", block, region)
        got = open_store(store)["r_57"]
        for name in ("exp_scale", "det_scale"):
            np.testing.assert_array_equal(got[name].values, whole[name].values)

    for finish in (abort_store, lambda staging: commit_store(staging, store, overwrite=True)):
        _, parts = blocks(3)
        staging = prepare_store(store, overwrite=True)
        write_groups(staging, {"r_57": groups(3)["r_57"].chunk({"exposure": 2, "detector": 4})})
        write_region(staging, "r_57", *parts[0])  # opens the arrays
        finish(staging)
        with pytest.raises(StoreError, match="this write came after its store was committed or abandoned"):
            write_region(staging, "r_57", *parts[1])
        assert not staging.exists()


def test_output_checks_of_the_store(tmp_path):
    # Missing parents are created; nothing else is made before the run writes.
    staging = prepare_store(tmp_path / "a" / "b" / "s.zarr")
    assert staging.parent == tmp_path / "a" / "b" / ".s.zarr.versions"
    assert check_output_file(tmp_path / "new" / "f.yaml") == tmp_path / "new" / "f.yaml"
    assert not (tmp_path / "new").exists()
    # A versions directory replaced by something else (a link to another file system, say) is refused.
    (tmp_path / "other").mkdir()
    (tmp_path / ".t.zarr.versions").symlink_to(tmp_path / "other")
    with pytest.raises(StoreError, match=r"t\.zarr: \.t\.zarr\.versions beside it is not a directory written by"):
        prepare_store(tmp_path / "t.zarr")


# ----------------------------------------------------------------------------------------- damaged stores

def groups(seed: int = 0) -> dict[str, xr.Dataset]:
    """Two filters' scales, chunked so that each variable has several chunk files."""
    rng = np.random.default_rng(seed)
    out = {}
    for name in ("g_6", "r_57"):
        ds = xr.Dataset({"exp_scale": ("exposure", rng.uniform(1e4, 2e4, 6)),
                         "det_scale": (("detector", "amp"), rng.uniform(0.9, 1.1, (4, 2)))},
                        coords={"detector": [0, 1, 2, 3], "amp": ["C10", "C11"], "exposure": np.arange(6) + 100})
        out[name] = ds.chunk({"exposure": 2, "detector": 2})
    return out


def test_a_deleted_chunk_is_reported_never_exported_as_nan(tmp_path, capsys):
    store = write_store(tmp_path / "s.zarr", groups())
    n_files = verify_store(store)
    assert is_complete(store) and main(["info", str(store)]) == 0
    assert f"all {n_files} files of its commit manifest present" in capsys.readouterr().out
    lazy = open_store(store)  # opened before the damage, read after it
    (store / "r_57" / "exp_scale" / "c" / "1").unlink()
    expected = f"{store}: damaged store: r_57/exp_scale/c/1 is missing (1 of the {n_files} files its commit " \
               "manifest lists are missing or changed)"
    assert one_error(capsys, ["info", store]) == expected
    assert one_error(capsys, ["export", store, "-o", tmp_path / "scales"]) == expected
    assert not (tmp_path / "scales").exists() and not is_complete(store)
    with pytest.raises(DamagedStoreError, match=f"^{store}: damaged store: r_57/exp_scale/c/1 is missing"):
        lazy["r_57"]["exp_scale"].values
    with pytest.raises(DamagedStoreError):
        export_scales(lazy)  # an opened tree is not verified first, but its reads still are


def test_other_damage(tmp_path, capsys):
    stores = {kind: write_store(tmp_path / f"{kind}.zarr", groups()) for kind in
              ("truncated", "group", "manifest", "edited")}
    chunk = stores["truncated"] / "g_6" / "det_scale" / "c" / "0" / "0"
    size = chunk.stat().st_size
    chunk.write_bytes(chunk.read_bytes()[:-3])
    shutil.rmtree(stores["group"] / "g_6")
    (stores["manifest"] / MANIFEST_FILE).unlink()
    manifest = json.loads((stores["edited"] / MANIFEST_FILE).read_text())
    del manifest["keys"]["g_6/det_scale/c/0/0"]
    (stores["edited"] / MANIFEST_FILE).write_text(json.dumps(manifest))
    messages = {kind: one_error(capsys, ["info", path]) for kind, path in stores.items()}
    assert messages["truncated"].startswith(f"{stores['truncated']}: damaged store: g_6/det_scale/c/0/0 has "
                                            f"{size - 3} bytes, not {size} (1 of the")
    assert messages["group"].startswith(f"{stores['group']}: damaged store: g_6/")
    assert messages["manifest"] == f"{stores['manifest']}: damaged store: its commit manifest is missing"
    assert messages["edited"] == f"{stores['edited']}: damaged store: its commit manifest was changed after the commit"


def test_chunks_never_written_are_not_damage(tmp_path):
    """zarr does not write a chunk holding only the fill value: such a chunk reads as NaN, rightly."""
    data = groups()
    data["r_57"]["exp_scale"][2:4] = np.nan  # exactly the second chunk
    store = write_store(tmp_path / "s.zarr", data)
    assert not (store / "r_57" / "exp_scale" / "c" / "1").exists()
    assert verify_store(store) > 0 and is_complete(store)
    stored = open_store(store)["r_57"]["exp_scale"].values
    assert np.isnan(stored).tolist() == [False, False, True, True, False, False]
    assert sorted(export_scales(store)["r_57"]["expScale"][0]["C10"]) == [100, 101, 104, 105]  # NaN E left out


def test_a_store_from_before_manifests_is_still_read(tmp_path, capsys):
    store = write_store(tmp_path / "s.zarr", groups())
    meta = json.loads((store / "zarr.json").read_text())
    del meta["attributes"]["flatnorm_commit"]["manifest"]
    (store / "zarr.json").write_text(json.dumps(meta))
    (store / MANIFEST_FILE).unlink()
    assert verify_store(store) is None and is_complete(store)
    assert main(["info", str(store)]) == 0
    assert "written before commit manifests: files not verified" in capsys.readouterr().out
    assert export_scales(store).keys() == {"g_6", "r_57"}


# ------------------------------------------------------------------------------------------------ signals

def start(args: list, **env: str) -> Command:
    """The command in a process and session of its own (forked with the package imported: helpers.Command),
    SIGINT handled as in a terminal (not ignored as in a background job, whatever this test process
    inherited), what it prints kept."""
    return Command(args, env=env, capture=True, new_session=True)


def wait_for(pattern: str, where: Path, proc: Command, timeout: float = 120) -> list[Path]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        found = list(where.glob(pattern))
        if found:
            return found
        time.sleep(0.005)
    ended = proc.poll() is not None
    raise AssertionError(f"{pattern} never appeared (exit status {proc.poll()}): "
                         f"{proc.communicate()[1] if ended else 'still running'}")


def stopped_cleanly(proc: Command, status: int, line: str, store: Path) -> None:
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err
    lines = err.strip().splitlines()
    assert lines[-1] == line and [x for x in lines if x.startswith("flatnorm:")] == [line], err
    assert "Traceback" not in err and " ERROR" not in err and "asyncio" not in err, err
    assert not os.path.lexists(store) and not store.with_name(f".{store.name}.versions").exists()


@pytest.mark.parametrize("sig, status, line, min_files", [
    (signal.SIGINT, 130, "flatnorm: interrupted (SIGINT)", 0),
    (signal.SIGTERM, 143, "flatnorm: terminated (SIGTERM)", 0),
    (signal.SIGINT, 130, "flatnorm: interrupted (SIGINT)", 10**6)], ids=["SIGINT", "SIGTERM", "SIGINT-in-process"])
@pytest.mark.slow
def test_signal_to_the_whole_job_while_writing(campaign, tmp_path, sig, status, line, min_files):
    """Ctrl-C in a terminal, or a batch system's SIGTERM, reaches every process of the job, its own cluster's
    workers too (or, for a run too small for a cluster, the reading threads of its own process): one line,
    the status a shell expects, the staging directory removed."""
    store = tmp_path / "s.zarr"
    proc = start(run_args(campaign, store, "--workers", 1, "--batch-size", 10, "--local-min-files", min_files))
    # Once the reading tasks have written chunks of the inputs into the staging store:
    wait_for(".s.zarr.versions/*.partial-*/r_57/background/c/*", tmp_path, proc)
    os.killpg(proc.pid, sig)
    stopped_cleanly(proc, status, line, store)


@pytest.mark.parametrize("sig, status, line, step", [
    (signal.SIGTERM, 143, "flatnorm: terminated (SIGTERM)", "sealed"),
    (signal.SIGINT, 130, "flatnorm: interrupted (SIGINT)", "locked")], ids=["SIGTERM-sealed", "SIGINT-locked"])
def test_signal_between_commit_steps(small_campaign, tmp_path, scheduler_address, sig, status, line, step):
    """Paused by the test hook with the store sealed (its commit record written) or the lock held: the
    signalled run removes its staging directory and ends with one line."""
    store = tmp_path / "s.zarr"
    flags = tmp_path / "flags"
    flags.mkdir()
    proc = start(run_args(small_campaign, store, "--scheduler", scheduler_address),
                 FLATNORM_TEST_PAUSE=f"{step}@{flags}")
    wait_for(f"{step}.*", flags, proc)
    assert len(list(store.parent.glob(".s.zarr.versions/*.partial-*"))) == 1
    proc.send_signal(sig)
    stopped_cleanly(proc, status, line, store)
    # The lock file is made when a commit first takes the lock: it was signalled where it was meant to be.
    assert store.with_name(".s.zarr.lock").exists() == (step == "locked")


# ------------------------------------------------------------------------------------- concurrent commands

@pytest.mark.slow
def test_concurrent_commands_one_winner_and_an_overwrite(small_campaign, tmp_path, scheduler_address):
    """Three ``flatnorm run`` of the same output, all past their start-up check and paused with their stores
    sealed: released in turn, the first without --overwrite wins, the second loses with one line and leaves
    nothing, the third (--overwrite) replaces the first's store."""
    store = tmp_path / "s.zarr"
    flags = tmp_path / "flags"
    flags.mkdir()
    runs = {}
    for iterations, extra in ((11, []), (12, []), (13, ["--overwrite"])):
        runs[iterations] = start(run_args(small_campaign, store, "--scheduler", scheduler_address, "--iterations",
                                          iterations, *extra), FLATNORM_TEST_PAUSE=f"sealed@{flags}")
    paused = {it: wait_for(f"sealed.{proc.pid}", flags, proc)[0] for it, proc in runs.items()}
    results = {}
    for it in (12, 11, 13):
        paused[it].unlink()  # release this run
        results[it] = runs[it].communicate(timeout=300)
        results[it] = subprocess.CompletedProcess(runs[it].args, runs[it].returncode, *results[it])
    assert results[12].returncode == 0 and results[13].returncode == 0, (results[12].stderr, results[13].stderr)
    assert error_line(results[11]) == f"flatnorm: error: {store} exists; pass --overwrite to replace it"
    assert open_store(store).attrs["config"]["solve"]["iterations"] == 13 and is_complete(store)
    versions = sorted(os.listdir(store.with_name(".s.zarr.versions")))
    assert len(versions) == 2 and not [v for v in versions if ".partial-" in v]  # 13's, and 12's kept
    previous = open_store(store.with_name(".s.zarr.versions") / versions[0])
    assert previous.attrs["config"]["solve"]["iterations"] == 12
