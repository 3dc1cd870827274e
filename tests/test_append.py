"""``flatnorm run --append STORE``: only the files the store does not hold are read, the grown campaign is solved
again from the store's scales, and the result is a run's over all the files; atomic like every commit."""

import contextlib
import io
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from helpers import Command  # noqa: E402
from flatnorm_dask import cli
from flatnorm_dask.simulate import SIMPLE_PATTERN, simulate_campaign, write_campaign
from flatnorm_dask.store import (
    StoreChangedError,
    current_version,
    history_entry,
    open_store,
    store_history,
    store_summary,
    transaction,
    verify_store,
    write_store,
)

FILTERS = ("g_6", "r_57")
#: Inputs as the store keeps them: identical, bit for bit, whether a cell was read by the run or the append.
INPUTS = ("background", "weight", "status", "reason", "file", "file_size", "file_mtime_ns")
TOL = 1e-10


def simulated(n_detectors=5, n_exposures=8, filters=FILTERS, seed=11):
    return simulate_campaign("lsstcam", n_detectors=n_detectors, n_exposures=n_exposures, filters=filters, seed=seed)


def write_cells(tree, root, **isel):
    """Write the files of some cells of a simulated campaign (``isel`` by dimension), per filter."""
    part = xr.DataTree.from_dict({name: tree[name].to_dataset().isel(**isel) for name in tree.children})
    write_campaign(part, root, layout="simple")


def run(store, root, *extra, append=False, capsys=None):
    args = ["run", "--input", str(root), "--pattern", SIMPLE_PATTERN, "--no-progress", "--tol", str(TOL),
            "--level", "AMP", "--append" if append else "--output", str(store), *map(str, extra)]
    status = cli.main(args)
    out = capsys.readouterr() if capsys is not None else None
    assert status == 0, out.err if out else args
    return out.out if out else None


def spoil(paths):
    """Make files unreadable to our reader (garbage of the same length) while keeping their size and mtime."""
    for path in paths:
        st = os.stat(path)
        Path(path).write_bytes(b"\x00" * st.st_size)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def held_paths(store):
    return [str(p) for name in open_store(store).children
            for p in open_store(store)[name]["file"].values.ravel() if p]


def assert_same_store(appended, full, *, inputs_identical=True):
    """The append's store against a run's over the same files: inputs bit for bit, scales to the solve's
    tolerance (returned: the largest relative difference)."""
    a, f = open_store(appended), open_store(full)
    assert sorted(a.children) == sorted(f.children)
    worst = 0.0
    for name in f.children:
        ga, gf = a[name].to_dataset(), f[name].to_dataset()
        for dim in ("detector", "amp", "exposure"):
            np.testing.assert_array_equal(ga[dim].values, gf[dim].values)
        if inputs_identical:
            for var in INPUTS:
                np.testing.assert_array_equal(ga[var].values, gf[var].values, err_msg=f"{name}/{var}")
        for var in ("det_scale", "exp_scale", "model"):
            x, y = ga[var].values, gf[var].values
            np.testing.assert_array_equal(np.isnan(x), np.isnan(y))
            ok = np.isfinite(y)
            worst = max(worst, float(np.max(np.abs(x[ok] / y[ok] - 1))))
        np.testing.assert_array_equal(ga["used"].values, gf["used"].values)
        assert ga.attrs["problems"] == gf.attrs["problems"]
        assert ga.attrs["converged"] and gf.attrs["converged"]
    assert worst < 100 * TOL, worst
    return worst


@pytest.fixture(scope="module")
def grown(tmp_path_factory, scheduler_address):
    """A store of 6 exposures, the files of 2 more and a run over all of them; the append (see ``appended``) runs
    on the session's cluster, the runs in this process."""
    tree = simulated()
    tmp = tmp_path_factory.mktemp("grown")
    root = tmp / "inputs"
    write_cells(tree, root, exposure=slice(0, 6))
    store, full = tmp / "s.zarr", tmp / "full.zarr"
    run(store, root)
    first = current_version(store).id
    old_files = held_paths(store)
    write_cells(tree, root, exposure=slice(6, 8))
    run(full, root)
    spoil(old_files)  # from here on, reading an old file would be a problem, or an error
    return tree, root, store, full, first, old_files, scheduler_address


@pytest.fixture(scope="module")
def appended(grown):
    tree, root, store, full, first, old_files, address = grown
    args = ["run", "--input", str(root), "--pattern", SIMPLE_PATTERN, "--no-progress", "--tol", str(TOL), "--level",
            "AMP", "--append", str(store), "--scheduler", address]
    buffer = io.StringIO()  # cli.main's report (a module-scoped fixture cannot take capsys)
    with contextlib.redirect_stdout(buffer):
        assert cli.main(args) == 0
    return buffer.getvalue()


def test_append_reads_only_new_files_and_equals_a_full_run(grown, appended):
    tree, root, store, full, first, old_files, _ = grown
    # The old files are garbage now: had the append read one, it would be a problem (or an error).
    worst = assert_same_store(store, full)
    print(f"append vs full run: largest relative difference of G, E and the model {worst:.1e} (tol {TOL})")
    a, f = open_store(store), open_store(full)
    for name in FILTERS:
        # Warm-started from the stored G: fewer iterations than the full run's cold start, to the same tolerance.
        assert a[name].attrs["iterations"] < f[name].attrs["iterations"], name
    n_new, n_old = 2 * 5 * 2, 2 * 5 * 6
    assert f"{n_new} file(s) read ({n_new} added, 0 re-read as changed, 0 replacing another path); " \
           f"{n_old} cell(s) kept; filters solved again: g_6, r_57; new version " in appended
    history = store_history(store)
    assert [h["kind"] for h in history] == ["run", "append"]
    assert history[0]["version"] == first and history[1]["based_on"] == first
    assert history[1]["version"] == current_version(store).id != first
    assert history[1]["files"] == {"read": n_new, "added": n_new, "reread": 0, "replaced": 0, "vanished": 0,
                                   "kept": n_old}
    assert history[1]["filters"] == list(FILTERS) and history[1]["config"]["output"]["append"] == str(store)
    info = store_summary(store)
    assert "history: 2 run(s) and append(s)" in info
    assert f"append: {n_new} file(s) read ({n_new} added); {n_old} cell(s) kept; filters g_6, r_57; version " \
           f"{history[1]['version']}" in info
    assert verify_store(store)


def test_an_append_with_nothing_new_reads_nothing_and_keeps_the_numbers(grown, appended, capsys):
    _, root, store, _, _, _, _ = grown
    before = open_store(store)
    out = run(store, root, append=True, capsys=capsys)
    assert "0 file(s) read (0 added, 0 re-read as changed, 0 replacing another path); 80 cell(s) kept; " \
           "filters solved again: none" in out
    after = open_store(store)
    for name in FILTERS:  # untouched filters are copied as they are
        xr.testing.assert_identical(after[name].to_dataset(), before[name].to_dataset())
    assert [h["kind"] for h in store_history(store)] == ["run", "append", "append"]


def test_new_detectors_and_a_new_filter(tmp_path, capsys):
    tree = simulated(n_detectors=4, n_exposures=4, filters=("g_6", "r_57"), seed=12)
    root = tmp_path / "in"
    write_campaign(xr.DataTree.from_dict({"r_57": tree["r_57"].to_dataset().isel(detector=slice(0, 3))}), root,
                   layout="simple")
    store, full = tmp_path / "s.zarr", tmp_path / "full.zarr"
    run(store, root, capsys=capsys)
    kept = held_paths(store)
    write_cells(tree, root, detector=[3])  # a new detector in r_57, and in g_6 (a new filter)
    write_cells(xr.DataTree.from_dict({"g_6": tree["g_6"]}), root, detector=slice(0, 3))
    run(full, root, capsys=capsys)
    spoil(kept)
    out = run(store, root, append=True, capsys=capsys)
    assert "20 file(s) read (20 added, 0 re-read as changed, 0 replacing another path); 12 cell(s) kept; " \
           "filters solved again: g_6, r_57" in out
    assert_same_store(store, full)
    assert open_store(store)["r_57"].sizes["detector"] == 4


def test_changed_file_reread_and_a_cell_from_another_path_replaced(tmp_path, capsys):
    """With a manifest: one held file rewritten (new mtime), one cell now listed from another path."""
    tree = simulated(n_detectors=3, n_exposures=4, filters=("r_57",), seed=13)
    root = tmp_path / "in"
    write_campaign(tree, root, layout="simple")
    files = sorted(str(p) for p in root.rglob("*.yaml"))
    table = pd.DataFrame({"path": files, "physical_filter": [Path(p).parts[-3] for p in files],
                          "exposure": [int(Path(p).parts[-2]) for p in files],
                          "detector": [int(Path(p).stem.split("_")[1]) for p in files]})
    manifest = tmp_path / "files.csv"
    table.to_csv(manifest, index=False)
    store = tmp_path / "s.zarr"
    base = ["run", "--manifest", str(manifest), "--no-progress", "--tol", str(TOL), "--level", "AMP"]
    assert cli.main([*base, "--output", str(store)]) == 0
    changed, moved = files[0], files[5]
    st = os.stat(changed)
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # touched: read again
    other = tmp_path / "elsewhere" / Path(moved).name
    other.parent.mkdir()
    shutil.copy(moved, other)
    table.loc[5, "path"] = str(other)
    table.to_csv(manifest, index=False)
    capsys.readouterr()
    assert cli.main([*base, "--append", str(store)]) == 0
    out = capsys.readouterr().out
    assert "2 file(s) read (0 added, 1 re-read as changed, 1 replacing another path); 10 cell(s) kept" in out
    assert f"replaced: {moved} -> {other}" in out
    ds = open_store(store)["r_57"]
    assert str(other) in ds["file"].values and moved not in ds["file"].values
    d, e = np.argwhere(ds["file"].values == changed)[0]
    assert ds["file_mtime_ns"].values[d, e] == st.st_mtime_ns + 1_000_000_000


def test_a_vanished_file_is_reported_and_its_cells_kept(tmp_path, capsys):
    tree = simulated(n_detectors=3, n_exposures=4, filters=("r_57",), seed=14)
    root = tmp_path / "in"
    write_campaign(tree, root, layout="simple")
    store = tmp_path / "s.zarr"
    run(store, root, capsys=capsys)
    before = open_store(store)["r_57"].to_dataset().load()
    gone = sorted(root.rglob("*.yaml"))[4]
    gone.unlink()
    out = run(store, root, append=True, capsys=capsys)
    assert "1 file(s) vanished from the inputs; their cells are kept:" in out and str(gone) in out
    after = open_store(store)["r_57"].to_dataset()
    for var in INPUTS:
        np.testing.assert_array_equal(after[var].values, before[var].values)
    [entry] = store_history(store)[1:]
    assert entry["files"]["vanished"] == 1 and entry["vanished_files"] == [str(gone)]
    assert f"1 file(s) vanished from the inputs (their cells kept), e.g. {gone}" in store_summary(store)


# ------------------------------------------------------------------------------------------- atomic


@pytest.fixture
def small(tmp_path, capsys):
    tree = simulated(n_detectors=3, n_exposures=4, filters=("r_57",), seed=15)
    root = tmp_path / "in"
    write_cells(tree, root, exposure=slice(0, 3))
    store = tmp_path / "s.zarr"
    run(store, root, capsys=capsys)
    write_cells(tree, root, exposure=slice(3, 4))
    return root, store, current_version(store)


def unchanged(store, version):
    assert current_version(store).id == version.id and verify_store(store)
    assert not list(store.parent.glob(f".{store.name}.versions/*.partial-*"))


@pytest.mark.parametrize("how, status, line", [
    ("exception", 1, "flatnorm: error: disk on fire"),
    (signal.SIGINT, 130, "flatnorm: interrupted (SIGINT)"),
    (signal.SIGTERM, 143, "flatnorm: terminated (SIGTERM)")], ids=["exception", "SIGINT", "SIGTERM"])
def test_an_interrupted_append_leaves_the_store_as_it_was(small, monkeypatch, capsys, how, status, line):
    """Stopped with its new version sealed, before the commit: the old store stays, the staging goes."""
    root, store, version = small

    def stop(step, path):
        if step == "sealed":
            if how == "exception":
                raise RuntimeError("disk on fire")
            os.kill(os.getpid(), how)  # the command's own handler turns it into an exception here
            time.sleep(5)

    monkeypatch.setattr(transaction, "_pause_at", stop)
    # SIGINT as in a terminal: a suite started in the background (by a script's "&") inherits it ignored, and
    # the command rightly leaves an ignored SIGINT ignored.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert cli.main(["run", "--input", str(root), "--pattern", SIMPLE_PATTERN, "--no-progress", "--level",
                         "AMP", "--append", str(store)]) == status
    finally:
        signal.signal(signal.SIGINT, previous)
    assert capsys.readouterr().err.strip().splitlines()[-1] == line
    unchanged(store, version)


def test_an_append_commits_only_onto_the_version_it_started_from(small, monkeypatch, capsys):
    """Another run commits while the append writes: the append fails with one line, that run's store stays."""
    root, store, version = small
    other = {}

    def meanwhile(step, path):
        if step == "sealed" and not other:
            monkeypatch.setattr(transaction, "_pause_at", None)
            other["store"] = write_store(path, {"r_57": xr.Dataset({"x": ("y", [1.0])})}, overwrite=True)
            other["version"] = current_version(path).id

    monkeypatch.setattr(transaction, "_pause_at", meanwhile)
    status = cli.main(["run", "--input", str(root), "--pattern", SIMPLE_PATTERN, "--no-progress", "--level", "AMP",
                       "--append", str(store)])
    assert status == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"flatnorm: error: {StoreChangedError(store)}"
    assert current_version(store).id == other["version"] != version.id
    assert not list(store.parent.glob(f".{store.name}.versions/*.partial-*"))


@pytest.mark.slow
def test_a_killed_append_leaves_the_store_as_it_was(small, tmp_path):
    """SIGKILL with the new version sealed: no clean-up at all; the sealed staging is never a store."""
    root, store, version = small
    flags = tmp_path / "flags"
    flags.mkdir()
    proc = Command(["run", "--input", root, "--pattern", SIMPLE_PATTERN, "--no-progress", "--level", "AMP",
                    "--append", store], env={"FLATNORM_TEST_PAUSE": f"sealed@{flags}"})
    deadline = time.monotonic() + 120
    while not list(flags.glob("sealed.*")):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    [staged] = store.parent.glob(f".{store.name}.versions/*.partial-*")
    proc.kill()
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert current_version(store).id == version.id and verify_store(store) and staged.exists()
    assert "history: 1 run(s)" in store_summary(store)


# ------------------------------------------------------------------------------------------- options


@pytest.mark.parametrize("extra, message", [
    (["--output", "x.zarr"], "command line: output.store: cannot be combined with output.append (set in command "
                             "line): an append writes to the store it appends to"),
    (["--overwrite"], "command line: output.overwrite: cannot be combined with output.append (set in command "
                      "line): an append writes to the store it appends to")])
def test_append_is_exclusive_with_output_and_overwrite(tmp_path, capsys, extra, message):
    status = cli.main(["run", "--input", str(tmp_path), "--pattern", SIMPLE_PATTERN, "--append",
                       str(tmp_path / "s.zarr"), *extra])
    assert status == 1 and capsys.readouterr().err.strip() == f"flatnorm: error: {message}"


def test_append_to_no_store_or_at_another_level(small, tmp_path, capsys):
    root, store, version = small
    args = ["run", "--input", str(root), "--pattern", SIMPLE_PATTERN, "--no-progress"]
    assert cli.main([*args, "--append", str(tmp_path / "none.zarr")]) == 1
    assert capsys.readouterr().err.strip() == f"flatnorm: error: {tmp_path / 'none.zarr'}: no such store"
    assert cli.main([*args, "--level", "DETECTOR", "--append", str(store)]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"flatnorm: error: {store}: group r_57 was solved at level AMP, not DETECTOR; an append solves at the "
        "store's level (--level)")
    unchanged(store, version)


def test_history_entries():
    entry = history_entry("append", {"solve": {}}, {"read": 3, "added": 2, "reread": 1}, ["r_57"], based_on="v1")
    assert entry["files"] == {"read": 3, "added": 2, "reread": 1, "replaced": 0, "vanished": 0, "kept": 0}
    assert entry["based_on"] == "v1" and entry["version"] is None and entry["kind"] == "append"
    with pytest.raises(ValueError, match="kind must be run or append"):
        history_entry("merge", {}, {}, [])
    with pytest.raises(ValueError, match=r"unknown file count\(s\) \['copied'\]"):
        history_entry("run", {}, {"copied": 1}, [])


def test_split_part_sorts_listed_files_against_the_store(tmp_path):
    """The comparison a listing task makes, against an independent account of each row."""
    from flatnorm_dask.incremental import HeldFiles, split_part, vanished_files
    from flatnorm_dask.listing import FileTable, object_array

    files = {name: tmp_path / f"{name}.yaml" for name in ("same", "touched", "moved_old", "moved_new", "dup_a",
                                                          "dup_b", "new", "gone")}
    for path in files.values():
        path.write_text("x")
    ident = {name: (os.stat(p).st_size, os.stat(p).st_mtime_ns) for name, p in files.items()}
    # The store holds 2 detectors x 3 exposures of r_57: same, touched, moved_old, dup_a, gone, and no file.
    grid = [["same", "touched", "moved_old"], ["dup_a", "gone", ""]]
    path = np.array([[str(files[n]) if n else "" for n in row] for row in grid], dtype=object)
    size = np.array([[ident[n][0] if n else -1 for n in row] for row in grid])
    mtime = np.array([[ident[n][1] if n else -1 for n in row] for row in grid])
    mtime[0, 1] -= 1  # "touched" was read before its last change
    held = HeldFiles({"r_57": np.array([10, 20])}, {"r_57": np.array([100, 200, 300])}, {"r_57": path},
                     {"r_57": size}, {"r_57": mtime})
    rows = [("same", 10, 100, "r_57"), ("touched", 10, 200, "r_57"), ("moved_new", 10, 300, "r_57"),
            ("dup_a", 20, 100, "r_57"), ("dup_b", 20, 100, "r_57"), ("new", 20, 300, "r_57"),
            ("new", 30, 100, "r_57"), ("new", 10, 100, "g_6")]
    table = FileTable(object_array([str(files[r[0]]) for r in rows]), np.array([r[2] for r in rows]),
                      np.array([r[1] for r in rows]), object_array([r[3] for r in rows]))
    kept, report = split_part(table, held)
    # Read: all but "same"; the duplicate cell whole (both files), so that it is found as a run finds it.
    assert kept.path.tolist() == table.path[1:].tolist()
    # dup_a is read again (its cell is listed twice), dup_b is "another path" for the same cell.
    assert (report.added, report.reread, report.replaced) == (3, 2, 2)
    assert report.replaced_examples[0] == (str(files["moved_old"]), str(files["moved_new"]))
    n_vanished, named, n_held = vanished_files(held, [report])
    assert (n_vanished, n_held) == (1, 5) and named == [{"file": str(files["gone"]), "physical_filter": "r_57",
                                                         "detector": 20, "exposure": 200}]


def test_a_scan_stats_what_it_finds_and_split_part_compares_that(tmp_path):
    """An append's pattern scan records each file's (size, mtime_ns) in the same task (FileTable.identity), and
    split_part compares the store's record with those, stat'ing the files itself only for a table without them."""
    import dataclasses

    import dask

    from flatnorm_dask.incremental import HeldFiles, split_part
    from flatnorm_dask.listing import FileTable, file_identities, input_source

    for exposure in (100, 200):
        (tmp_path / "r_57" / str(exposure)).mkdir(parents=True)
        (tmp_path / "r_57" / str(exposure) / "flatStats_10.yaml").write_text("x" * exposure)
    source = input_source(tmp_path, SIMPLE_PATTERN)
    plain = FileTable.concat(dask.compute(*source.partitions("raise"), scheduler="sync"))
    assert plain.identity is None  # a run that does not append stats nothing while listing
    table = FileTable.concat(dask.compute(*source.partitions("raise", identity=True), scheduler="sync"))
    table = table.take(np.argsort(table.exposure))
    stats = [os.stat(p) for p in table.path]
    assert table.identity.tolist() == [[st.st_size, st.st_mtime_ns] for st in stats]
    assert [st.st_size for st in stats] == [100, 200]
    # A URI and a file that is not there have no identity.
    assert file_identities(["s3://bucket/a.yaml", str(tmp_path / "none.yaml"), table.path[0]]).tolist() == [
        [-1, -1], [-1, -1], [100, stats[0].st_mtime_ns]]

    held = HeldFiles({"r_57": np.array([10])}, {"r_57": np.array([100, 200])},
                     {"r_57": table.path.reshape(1, 2).copy()}, {"r_57": table.identity[:, 0].reshape(1, 2)},
                     {"r_57": table.identity[:, 1].reshape(1, 2)})
    kept, report = split_part(table, held)
    assert len(kept) == 0 and (report.added, report.reread, report.replaced) == (0, 0, 0)
    # The listing saw exposure 200's file with another mtime than the store's record: it is read again.
    seen_changed = dataclasses.replace(table, identity=table.identity + [[0, 0], [0, 1]])
    kept, report = split_part(seen_changed, held)
    assert kept.path.tolist() == [table.path[1]] and report.reread == 1
    # A table listed without identity (a manifest's): split_part stats the files, which are unchanged.
    kept, report = split_part(dataclasses.replace(seen_changed, identity=None), held)
    assert len(kept) == 0 and report.reread == 0


def test_a_store_without_a_record_of_its_files_is_refused(small, tmp_path, capsys):
    """A store written before the per-cell file record (here: by write_store, without one): every file would
    look new, so the append says what to do instead."""
    root, _, _ = small
    old = tmp_path / "old.zarr"
    write_store(old, {"r_57": xr.Dataset({"det_scale": ("detector", [1.0])}, coords={"detector": [0]},
                                         attrs={"level": "AMP"})})
    assert cli.main(["run", "--input", str(root), "--pattern", SIMPLE_PATTERN, "--no-progress", "--level", "AMP",
                     "--append", str(old)]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"flatnorm: error: {old}: group r_57 has no record of the files it read (file, file_size, file_mtime_ns): "
        "written by an older flatnorm; run it again without --append")


# ------------------------------------------------------------------------------------------- chunks kept


def test_plan_merge_links_the_chunks_that_keep_their_cells():
    """Against a cell-by-cell account: a chunk is linked exactly when the store holds the same ids there and the new
    reading has no cell in it; the blocks to merge cover every other chunk, once, in runs of whole chunks."""
    from flatnorm_dask.incremental import plan_merge

    def check(stored, read, expected_linked, block_cells=10_000):
        (sd, se), (rd, re_) = stored, read
        dets, exps = np.union1d(sd, rd), np.union1d(se, re_)
        plan = plan_merge(dets, exps, 3, 2, stored=stored, read=read, block_cells=block_cells)
        assert set(plan.linked) == expected_linked
        owner = np.zeros((len(dets), len(exps)), dtype=int)  # how many times each cell is written or linked
        for i, j in plan.linked:
            owner[i * 3:(i + 1) * 3, j * 2:(j + 1) * 2] += 1
            # Independent account: same ids at the chunk in both grids, and no cell of the new reading.
            assert np.array_equal(dets[i * 3:(i + 1) * 3], sd[i * 3:(i + 1) * 3])
            assert np.array_equal(exps[j * 2:(j + 1) * 2], se[j * 2:(j + 1) * 2])
            assert not (np.isin(dets[i * 3:(i + 1) * 3], rd).any() and np.isin(exps[j * 2:(j + 1) * 2], re_).any())
        for rows, columns in plan.blocks:
            assert rows.start % 3 == 0 and columns.start % 2 == 0  # whole chunks
            assert columns.stop % 2 == 0 or columns.stop == len(exps)
            assert (columns.stop - columns.start) * (rows.stop - rows.start) <= max(block_cells, 6)
            owner[rows, columns] += 1
        assert (owner == 1).all()
        return plan

    dets, exps = np.arange(100, 107), np.arange(10, 19)  # 3 detector chunks (3, 3, 1) x 5 exposure chunks
    # Two new exposures after the store's: the last, partial, exposure chunk gains cells; the others are linked.
    plan = check((dets, exps), (dets, np.array([19, 20])), {(i, j) for i in range(3) for j in range(4)})
    assert plan.blocks == ((slice(0, 3), slice(8, 11)), (slice(3, 6), slice(8, 11)), (slice(6, 7), slice(8, 11)))
    # An exposure that sorts among the store's shifts every chunk from its own on.
    gap = np.delete(exps, 3)
    check((dets, gap), (dets, np.array([13])), {(i, 0) for i in range(3)})
    # A file of one held cell read again (detector 104, exposure 15): only its chunk is merged.
    check((dets, exps), (np.array([104]), np.array([15])), {(i, j) for i in range(3) for j in range(5)} - {(1, 2)})
    # A new detector among the store's: the detector chunks from its own on are merged, whatever the exposure.
    check((np.delete(dets, 4), exps), (np.array([104]), exps), {(0, j) for j in range(5)})
    # Blocks of one chunk each: runs are cut.
    plan = check((dets, gap), (dets, np.array([13])), {(i, 0) for i in range(3)}, block_cells=6)
    assert len(plan.blocks) == 3 * 4


def grown_in_chunks(tmp_path):
    """Inputs stored in chunks of 3 exposures (batch_size 15 over 5 detectors): a store of 7 exposures of g_6 and
    r_57; then r_57 gains 2 exposures and one of its files (exposure 0, the first detector) changes, and a full run
    reads them all.  Returns the store, the full run's, the version appended to and a run function."""
    from flatnorm_dask.config import load_config
    from flatnorm_dask.workflow import run as run_workflow

    tree = simulated(n_detectors=5, n_exposures=9)
    root, store, full = tmp_path / "in", tmp_path / "s.zarr", tmp_path / "full.zarr"
    settings = {"input.root": str(root), "input.pattern": SIMPLE_PATTERN, "input.batch_size": 15,
                "solve.level": "AMP", "solve.tol": TOL}

    def run_with(**options):
        return run_workflow(load_config(None, {**settings, **options}), show_progress=False)

    write_cells(tree, root, exposure=slice(0, 7))
    run_with(**{"output.store": str(store)})
    base = current_version(store)
    write_cells(xr.DataTree.from_dict({"r_57": tree["r_57"]}), root, exposure=slice(7, 9))
    changed = sorted((root / "r_57").rglob("*.yaml"))[0]
    st = os.stat(changed)
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    run_with(**{"output.store": str(full)})
    return store, full, base, run_with


def test_an_append_links_the_chunks_it_keeps_and_never_changes_the_version_it_read(tmp_path):
    """r_57 gains 2 exposures after its 7 and one of its files changes; g_6 gets nothing new (grown_in_chunks).
    The append equals a full run; the chunks it keeps are the files of the version it read, which stays byte for
    byte as it was, and stays so when versions are deleted."""
    store, full, base, run_with = grown_in_chunks(tmp_path)
    before = {p: p.read_bytes() for p in base.path.rglob("*") if p.is_file()}
    summary = run_with(**{"output.append": str(store)})
    assert (summary.append.files["added"], summary.append.files["reread"]) == (10, 1)
    assert_same_store(store, full)
    new = current_version(store).path

    def linked(group, variable):
        """The chunk files of a variable that are the base version's own files."""
        chunks = sorted((new / group / variable).rglob("c/**/*"))
        return [str(p.relative_to(new / group / variable)) for p in chunks
                if p.is_file() and (base.path / p.relative_to(new)).exists()
                and os.path.samefile(p, base.path / p.relative_to(new))]

    # g_6, untouched: every chunk of every variable, solver's outputs included.
    for variable in ("background", "file", "model", "used", "det_scale", "exp_scale"):
        stored = sorted(str(p.relative_to(base.path / "g_6" / variable))
                        for p in (base.path / "g_6" / variable).rglob("c/**/*") if p.is_file())
        assert stored and linked("g_6", variable) == stored, variable
    # r_57: the inputs' middle exposure chunk only (the first holds the changed file, the last gained exposures);
    # the solver's outputs are all new.
    assert linked("r_57", "background") == ["c/0/0/1"] and linked("r_57", "file_mtime_ns") == ["c/0/1"]
    assert linked("r_57", "model") == [] and linked("r_57", "exp_scale") == []
    assert {p: p.read_bytes() for p in base.path.rglob("*") if p.is_file()} == before
    assert verify_store(base)
    # Every older version deleted: the files the new one links are still its own.
    run_with(**{"output.append": str(store), "output.keep_versions": 0})
    assert not base.path.exists() and verify_store(store)
    assert_same_store(store, full)


def test_an_append_copies_what_it_cannot_link(tmp_path, monkeypatch):
    """Where the staged arrays could not take the store's files (link_chunks refuses: laid out otherwise), the
    untouched filter is copied whole and the other merged in full, to the same store."""
    from flatnorm_dask import workflow

    store, full, base, run_with = grown_in_chunks(tmp_path)
    monkeypatch.setattr(workflow, "link_chunks", lambda *args, **kwargs: None)
    run_with(**{"output.append": str(store)})
    assert_same_store(store, full)
    new = current_version(store).path
    assert not [p for p in new.rglob("c/**/*") if p.is_file() and os.stat(p).st_nlink > 1]
    a, b = open_store(store)["g_6"].to_dataset(), open_store(base)["g_6"].to_dataset()
    xr.testing.assert_identical(a.load(), b.load())
